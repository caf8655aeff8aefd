"""Device resolution, CPU threads, OOM message."""

import pytest
import torch

from backend.device import allowed_cpus, oom_guard, resolve_device, setup_cpu_threads
from backend.errors import DiffTumorError


def test_resolve_device_cpu_and_auto():
    assert resolve_device("cpu").type == "cpu"
    expected = "cuda" if torch.cuda.is_available() else ("mps" if torch.backends.mps.is_available() else "cpu")
    assert resolve_device("auto").type == expected


def test_resolve_device_errors():
    with pytest.raises(DiffTumorError, match="unknown device"):
        resolve_device("tpu")
    if not torch.cuda.is_available():
        with pytest.raises(DiffTumorError, match="no CUDA GPU"):
            resolve_device("cuda")


def test_threads_use_allowed_cpus():
    before = torch.get_num_threads()
    try:
        assert setup_cpu_threads() == allowed_cpus() == torch.get_num_threads()
    finally:
        torch.set_num_threads(before)


def test_oom_becomes_one_line_with_cpu_hint():
    with pytest.raises(DiffTumorError, match="out of GPU memory.*--device cpu"):
        with oom_guard("synthesis", "cuda:0"):
            raise torch.cuda.OutOfMemoryError("CUDA out of memory. Tried to allocate 2 GiB")
    with pytest.raises(ValueError, match="^other errors pass through$"):
        with oom_guard():
            raise ValueError("other errors pass through")


_RSS_CHILD = """
import os
import numpy as np
from backend.device import reuse_freed_memory

def rss_mb():
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE") / 2**20

def kept_after_free():  # MB still resident after a touched 64 MB buffer is freed
    base = rss_mb()
    a = np.ones(64 << 18, np.float32)
    del a
    return round(rss_mb() - base)

outside = kept_after_free()
with reuse_freed_memory() as on:
    inside = kept_after_free()
    held = rss_mb()
given_back = round(held - rss_mb())  # malloc_trim on leaving the block
trimmed = kept_after_free()
print(on, outside, inside, given_back, trimmed)
"""


def _rss_in_child(env_value: str | None) -> list[str]:
    import os
    import subprocess
    import sys

    env = {k: v for k, v in os.environ.items() if k != "DIFFTUMOR_MALLOC_TUNING"}
    if env_value is not None:
        env["DIFFTUMOR_MALLOC_TUNING"] = env_value
    return subprocess.run([sys.executable, "-c", _RSS_CHILD], env=env, capture_output=True, text=True,
                          timeout=60, check=True).stdout.split()


def test_reuse_freed_memory_keeps_buffers_inside_and_gives_them_back_after():
    import platform

    if platform.libc_ver()[0] != "glibc":
        pytest.skip("mallopt is glibc's")
    on, outside, inside, given_back, trimmed = _rss_in_child(None)  # on by default
    assert on == "True" and int(given_back) > 48
    assert int(outside) < 16 and int(trimmed) < 16  # glibc default: a large buffer is unmapped on free
    assert int(inside) > 48  # kept for the next layer (no fresh pages to fault in and zero)
    on, outside, inside, _, trimmed = _rss_in_child("0")  # DIFFTUMOR_MALLOC_TUNING=0: plain glibc
    assert on == "False" and int(inside) < 16
