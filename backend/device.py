"""Device choice, CPU threads and out-of-memory handling.

* :func:`resolve_device` — ``"auto"`` (cuda > mps > cpu) or an explicit ``"cuda"``, ``"cuda:N"``,
  ``"mps"``, ``"cpu"``; asking for a device that is absent is one clear error, not a silent fallback.
* :func:`setup_cpu_threads` — use every CPU this process may run on (``os.sched_getaffinity``).
* :func:`oom_guard` — a context manager turning ``torch.cuda.OutOfMemoryError`` into a one-line
  :class:`DiffTumorError` that suggests ``--device cpu``.
"""

from __future__ import annotations

import contextlib
import os

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
    return isinstance(exc, RuntimeError) and "out of memory" in str(exc).lower() and ("cuda" in str(exc).lower() or "mps" in str(exc).lower())


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
