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
    with pytest.raises(ValueError):
        with oom_guard():
            raise ValueError("other errors pass through")


def _tuned_in_child(env_value: str | None) -> str:
    import os
    import subprocess
    import sys

    env = {k: v for k, v in os.environ.items() if k != "DIFFTUMOR_MALLOC_TUNING"}
    if env_value is not None:
        env["DIFFTUMOR_MALLOC_TUNING"] = env_value
    code = "from backend.device import keep_freed_memory as k; print(k(), k())"
    return subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=60,
                          check=True).stdout.strip()


def test_keep_freed_memory_on_glibc_and_its_opt_out():
    import platform

    if platform.libc_ver()[0] != "glibc":
        pytest.skip("mallopt is glibc's")
    assert _tuned_in_child("1") == "True True"  # applied once, then reported
    assert _tuned_in_child(None) == "False False"  # opt-in: it raises the peak memory
    assert _tuned_in_child("0") == "False False"
