"""Our checkpoint files: one format, written by training and read by training, inference and the weights
tools (so this module is not part of ``backend.train``).

A checkpoint is a plain dict of tensors, numbers, strings, lists and dicts (loadable with
``weights_only=True``, so loading it runs no code) holding at least ``format`` (:data:`CHECKPOINT_FORMAT`),
``version`` (package), ``saved_at``, ``stage``, ``config`` (plain dict), ``step`` and ``model``; the stages
add ``model_config``, ``optimizers``, ``ema``, ``scaler``, ``schedulers``, ``rng``, ``rng_ranks`` and ``data``.
"""

from __future__ import annotations

import time
from pathlib import Path

import torch

from backend import __version__
from backend.errors import DiffTumorError, load_failure_cause

CHECKPOINT_FORMAT = "difftumor-checkpoint-1"


def save_checkpoint(path, **state) -> Path:
    """Write ``state`` (+ format, package version, time) atomically (:func:`backend.io.atomic_write`)."""
    from backend.io import atomic_write

    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    payload = {"format": CHECKPOINT_FORMAT, "version": __version__, "saved_at": time.time(), **state}
    with atomic_write(path) as tmp:
        torch.save(payload, tmp)
    return path


def load_checkpoint(path, *, map_location="cpu") -> dict:
    """Load one of our checkpoints safely (``weights_only=True``); one-line errors naming the file."""
    path = Path(path)
    if not path.is_file():
        raise DiffTumorError(f"{path}: checkpoint file not found")
    try:
        ckpt = torch.load(path, map_location=map_location, weights_only=True)
    except Exception as exc:
        raise DiffTumorError(f"{path}: not a readable DiffTumor checkpoint ({load_failure_cause(exc)})") from None
    if not isinstance(ckpt, dict) or ckpt.get("format") != CHECKPOINT_FORMAT:
        raise DiffTumorError(f"{path}: not a DiffTumor training checkpoint (no '{CHECKPOINT_FORMAT}' format tag)")
    return ckpt
