"""Device choice, CPU threads and out-of-memory handling.

* :func:`resolve_device` — ``"auto"`` (cuda > mps > cpu) or an explicit ``"cuda"``, ``"cuda:N"``,
  ``"mps"``, ``"cpu"``; asking for a device that is absent is one clear error, not a silent fallback.
* :func:`setup_cpu_threads` — use every CPU this process may run on (``os.sched_getaffinity``).
* :func:`oom_guard` — a context manager turning ``torch.cuda.OutOfMemoryError`` into a one-line
  :class:`DiffTumorError` that suggests ``--device cpu``.
* :func:`reuse_freed_memory` — a context manager (glibc, CPU): large freed buffers are reused within a
  network call instead of being page-faulted in again; given back to the kernel afterwards.
"""

from __future__ import annotations

import contextlib
import os
import threading

from backend.errors import DiffTumorError

DEVICE_CHOICES = ("auto", "cuda", "mps", "cpu")


def _mps_available(torch) -> bool:
    mps = getattr(torch.backends, "mps", None)
    return bool(mps is not None and mps.is_available())


def resolve_device(name: str = "auto"):
    """``torch.device`` for ``name``; raises DiffTumorError for unknown or unavailable devices."""
    import torch

    name = str(name or "auto").strip().lower()
    base = name.split(":")[0]
    if base not in DEVICE_CHOICES or (":" in name and base != "cuda"):
        raise DiffTumorError(f"--device {name}: unknown device; choose one of {', '.join(DEVICE_CHOICES)} (or cuda:N)")
    if base == "auto":
        if torch.cuda.is_available():
            return torch.device("cuda")
        if _mps_available(torch):
            return torch.device("mps")
        return torch.device("cpu")
    if base == "cuda":
        if not torch.cuda.is_available():
            raise DiffTumorError(f"--device {name}: no CUDA GPU is available to this process; use --device cpu")
        dev = torch.device(name)
        if dev.index is not None and dev.index >= torch.cuda.device_count():
            raise DiffTumorError(f"--device {name}: only {torch.cuda.device_count()} CUDA device(s) present")
        return dev
    if base == "mps" and not _mps_available(torch):
        raise DiffTumorError("--device mps: Apple MPS is not available here; use --device cpu")
    return torch.device(base)


def allowed_cpus() -> int:
    try:
        return len(os.sched_getaffinity(0))
    except (AttributeError, OSError):
        return os.cpu_count() or 1


_M_TRIM_THRESHOLD, _M_MMAP_MAX = -1, -4  # <malloc.h>
_GLIBC_MMAP_MAX, _GLIBC_TRIM_THRESHOLD = 65536, 128 * 1024  # glibc's defaults
_reuse_lock = threading.Lock()
_reuse_depth = 0


def _glibc_malloc():
    """(mallopt, malloc_trim) of the running glibc, or None elsewhere."""
    try:
        import ctypes

        libc = ctypes.CDLL(None)
        return libc.mallopt, libc.malloc_trim  # AttributeError off glibc
    except (OSError, AttributeError):
        return None


def malloc_tuning_enabled() -> bool:
    """``DIFFTUMOR_MALLOC_TUNING`` (default on; ``0``/``false``/``off`` turns it off)."""
    return os.environ.get("DIFFTUMOR_MALLOC_TUNING", "1").strip().lower() not in ("0", "false", "no", "off")


@contextlib.contextmanager
def reuse_freed_memory(device=None):
    """Within the block, glibc's malloc keeps freed memory for reuse instead of returning it to the kernel.

    CPU inference allocates and frees activations of 10-120 MB per layer. By default glibc serves each
    with a fresh ``mmap`` and unmaps it on free, so every layer page-faults (and the kernel zeroes) its
    output again. Inside the block large allocations come from the heap (``M_MMAP_MAX = 0``, 1 GiB trim
    threshold) and are reused; on leaving it the defaults come back and ``malloc_trim`` returns the free
    heap to the kernel, so a long napari session does not keep it. Measured on the 2-core development
    machine (bench/synthesis.py): early tumour about 0.5 s faster, peak memory unchanged (about 1.1 GB).
    Nests; a no-op off glibc, for other devices, or with ``DIFFTUMOR_MALLOC_TUNING=0``. Yields whether
    it is in effect.
    """
    global _reuse_depth
    fns = None
    if (device is None or str(device).startswith("cpu")) and malloc_tuning_enabled():
        fns = _glibc_malloc()
    if fns is None:
        yield False
        return
    mallopt, malloc_trim = fns
    with _reuse_lock:
        if _reuse_depth == 0:
            mallopt(_M_MMAP_MAX, 0)
            mallopt(_M_TRIM_THRESHOLD, 1 << 30)
        _reuse_depth += 1
    try:
        yield True
    finally:
        with _reuse_lock:
            _reuse_depth -= 1
            if _reuse_depth == 0:
                mallopt(_M_MMAP_MAX, _GLIBC_MMAP_MAX)
                mallopt(_M_TRIM_THRESHOLD, _GLIBC_TRIM_THRESHOLD)
                malloc_trim(0)


def setup_cpu_threads(n: int | None = None) -> int:
    """Set torch's intra-op threads to ``n`` (default: all CPUs this process may use); returns it."""
    import torch

    n = int(n) if n else allowed_cpus()
    if torch.get_num_threads() != n:
        torch.set_num_threads(n)
    return n


def is_oom(exc: BaseException) -> bool:
    import torch

    oom = getattr(torch.cuda, "OutOfMemoryError", None)
    if oom is not None and isinstance(exc, oom):
        return True
    text = str(exc).lower()
    return isinstance(exc, RuntimeError) and "out of memory" in text and ("cuda" in text or "mps" in text)


@contextlib.contextmanager
def oom_guard(what: str = "synthesis", device=None):
    """Turn a GPU out-of-memory error inside the block into one clear line suggesting the CPU."""
    try:
        yield
    except Exception as exc:
        if not is_oom(exc):
            raise
        try:
            import torch

            torch.cuda.empty_cache()
        except Exception:  # pragma: no cover - best effort only
            pass
        dev = f" on {device}" if device is not None else ""
        raise DiffTumorError(f"{what}: ran out of GPU memory{dev}; rerun with --device cpu (or free the GPU)") from exc
