"""Checkpoint state that belongs to training: RNG snapshots, and the rules of ``--resume``.

    rng_state() -> dict / set_rng_state(state)            weights_only-loadable RNG snapshot (python, numpy, torch)
    seed_everything(seed)                                 python, numpy, torch (+cuda)
    rank_rng_states(dist) / restore_rank_rng_state(ckpt, dist, seed=)   every rank's RNG in a checkpoint
    resume_path(resume, default) / load_resume_checkpoint(resume, default, stage)
    refuse_fresh_run_over(checkpoint, key)                no fresh run over an earlier run's checkpoint
    check_resume(path, ckpt, current, *, max_steps) -> step   refuse a resume with changed settings / nothing to do
    resume_lr_scheduler(scheduler, state) -> list[str]    the config's LR schedule, continued at the saved step

Saving and loading the file itself: :mod:`backend.checkpoint` (also used outside training).
"""

from __future__ import annotations

import random
import warnings
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np
import torch

from backend.checkpoint import load_checkpoint
from backend.errors import DiffTumorError

if TYPE_CHECKING:  # pragma: no cover
    from backend.train.distributed import DistInfo


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)


def rng_state() -> dict:
    """Snapshot of the python, numpy and torch (CPU + CUDA) generators, weights_only-loadable."""
    np_state = np.random.get_state()
    state = {
        "python": [random.getstate()[0], list(random.getstate()[1]), random.getstate()[2]],
        "numpy": [np_state[0], torch.from_numpy(np_state[1].astype(np.int64)), int(np_state[2]), int(np_state[3]),
                  float(np_state[4])],
        "torch": torch.get_rng_state(),
    }
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: dict) -> None:
    v, internal, gauss = state["python"]
    random.setstate((v, tuple(internal), gauss))
    name, keys, pos, has_gauss, cached = state["numpy"]
    np.random.set_state((name, keys.numpy().astype(np.uint32), pos, has_gauss, cached))
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def rank_rng_states(dist: DistInfo) -> list[dict]:
    """:func:`rng_state` of every rank, in rank order (a collective under torchrun: call it on all ranks).
    A checkpoint keeps them all, so that each rank resumes its own random stream (ranks draw different
    noise, :func:`start_run`)."""
    state = rng_state()
    if not dist.distributed:
        return [state]
    states: list = [None] * dist.world_size
    torch.distributed.all_gather_object(states, state)
    return states


def restore_rank_rng_state(ckpt: dict, dist: DistInfo, *, seed: int) -> None:
    """Set this rank's generators from a checkpoint written with :func:`rank_rng_states` (``rng_ranks``).
    A checkpoint from another number of processes (or one holding only rank 0's ``rng``) gives rank 0 its
    saved state and reseeds the other ranks from (seed, rank, step), so they still draw different noise."""
    states = ckpt.get("rng_ranks")
    if states and len(states) == dist.world_size:
        set_rng_state(states[dist.rank])
        return
    set_rng_state(ckpt["rng"] if "rng" in ckpt else states[0])
    if dist.rank > 0:
        seed_everything(seed + dist.rank + 1_000_003 * int(ckpt.get("step", 0)))


def refuse_fresh_run_over(checkpoint, key: str) -> None:
    """A run without ``--resume`` whose output folder already holds ``checkpoint`` would overwrite the
    earlier run's weights and mix its metrics: one line, before anything is written."""
    checkpoint = Path(checkpoint)
    if checkpoint.is_file():
        raise DiffTumorError(f"{key}={checkpoint.parent}: holds {checkpoint.name} of an earlier run; add --resume to "
                             f"continue it, or give another {key} (or delete the folder) to start afresh")


def resume_path(resume, default_path) -> Path:
    """The file ``--resume`` names: ``default_path`` for a bare ``--resume`` (``"last"`` or ``True``)."""
    return Path(default_path if resume in ("last", True) else resume)


def load_resume_checkpoint(resume, default_path, stage: str, *, map_location="cpu") -> dict:
    """The checkpoint ``--resume`` names (``"last"`` or ``True``: ``default_path``), refused in one line
    when it was written by another stage."""
    path = resume_path(resume, default_path)
    ckpt = load_checkpoint(path, map_location=map_location)
    if ckpt.get("stage") != stage:
        article = "an" if stage[:1] in "aeiou" else "a"
        raise DiffTumorError(f"{path}: not {article} {stage} training checkpoint (stage {ckpt.get('stage')!r})")
    return ckpt


def _flat(d, prefix: str = "") -> dict:
    out = {}
    for k, v in (d or {}).items():
        if isinstance(v, dict):
            out.update(_flat(v, f"{prefix}{k}."))
        else:
            out[f"{prefix}{k}"] = list(v) if isinstance(v, tuple) else v
    return out


def check_resume(path, ckpt: dict, current: dict, *, max_steps: int, saved: dict | None = None) -> int:
    """Refuse a resume whose checkpoint does not fit this run; returns the checkpoint's step.

    ``current`` maps the settings that must not change (e.g. ``{"model": cfg.model.to_dict(), "T": 4,
    "stage": "early", "data.organ": "liver"}``) to this run's values; the checkpoint's values are read from
    its ``config`` (dotted keys, nested dicts flattened) unless ``saved`` gives them (e.g. ``{"T": 4}``);
    ``model`` is compared field by field with ``ckpt["model_config"]``. One line names the checkpoint and every
    differing key as ``key: checkpoint X, config Y``. A checkpoint already at or past ``max_steps`` is refused
    too, so that it is not rewritten by a run that trains nothing.
    """
    saved_cfg = _flat(ckpt.get("config"))
    diffs = []
    for key, value in current.items():
        if key == "model":
            old, new = _flat(ckpt.get("model_config"), "model."), _flat(value, "model.")
            diffs += [f"{k}: checkpoint {old.get(k, 'unset')}, config {new.get(k, 'unset')}"
                      for k in sorted(set(old) | set(new)) if old.get(k) != new.get(k)]
            continue
        old = (saved or {}).get(key, saved_cfg.get(key, "unset"))
        if (list(old) if isinstance(old, tuple) else old) != (list(value) if isinstance(value, tuple) else value):
            diffs.append(f"{key}: checkpoint {old}, config {value}")
    if diffs:
        raise DiffTumorError(f"{path}: --resume needs the checkpoint's settings ({'; '.join(diffs)}); "
                             "drop the change or train into a new output folder")
    step = int(ckpt["step"])
    if max_steps <= step:
        raise DiffTumorError(f"max_steps={max_steps}: {path} is already at step {step}; nothing to train "
                             "(raise max_steps to continue)")
    return step


_SCHEDULER_BOOKKEEPING = {"last_epoch", "lr_lambdas", "verbose"}  # state that is not a schedule setting


def resume_lr_scheduler(scheduler, state: dict) -> list[str]:
    """Continue ``scheduler``, freshly built from the current config, at the step count saved in ``state``
    (a scheduler ``state_dict()`` from the checkpoint) while keeping the current schedule: its total steps,
    warm-up, milestones and base LR. The learning rate at step k is then the one a fresh run with the
    current config has at step k. (``load_state_dict`` would bring back the old schedule, so a resume with
    a larger ``max_steps`` restarted the cosine from LR 0.)

    Call it after the optimizer's ``load_state_dict``, which brings back the old run's LR: the LR is reset
    to the fresh scheduler's and the scheduler is stepped as often as the saved one was, so chained
    schedules (MultiStepLR) come out exactly as in an uninterrupted run. Returns the settings that differ
    from the saved ones, e.g. ``["t_total 8 -> 12"]``, for the log.
    """
    fresh = scheduler.state_dict()
    if fresh["last_epoch"] != 0:
        raise ValueError("resume_lr_scheduler needs a scheduler that has not been stepped yet")
    changed = [f"{k} {state[k]} -> {v}" for k, v in fresh.items()
               if not k.startswith("_") and k not in _SCHEDULER_BOOKKEEPING and k in state and state[k] != v]
    for group, base, lr in zip(scheduler.optimizer.param_groups, scheduler.base_lrs, scheduler.get_last_lr()):
        group["initial_lr"], group["lr"] = base, lr
    with warnings.catch_warnings():  # torch warns that the optimizer has not stepped yet; here that is intended
        warnings.simplefilter("ignore", UserWarning)
        for _ in range(int(state["last_epoch"])):
            scheduler.step()
    return changed
