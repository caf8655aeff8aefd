"""Training utilities shared by the three stages (autoencoder, diffusion, segmentation).

Public API (all pure Python + torch; no stage-specific code)::

    load_config(cls, path=None, overrides=()) -> cls          YAML file + ["a.b=3", ...] into a dataclass
    config_to_dict(cfg) -> dict                               nested plain dict (YAML/checkpoint friendly)
    seed_everything(seed) -> None                             python, numpy, torch (+cuda)
    rng_state() -> dict / set_rng_state(state)                 weights_only-loadable RNG snapshot
    rank_rng_states(dist) / restore_rank_rng_state(ckpt, dist, seed=)  every rank's RNG in a checkpoint
    DistInfo / setup_distributed(device="auto") -> DistInfo   torchrun env vars; gloo on CPU, nccl on CUDA
    teardown_distributed()                                    destroy the process group if any
    get_logger(name, dist) -> logging.Logger                  INFO on rank 0, WARNING on other ranks
    save_checkpoint(path, **state) -> Path                    atomic (tmp + os.replace), adds version/time
    load_checkpoint(path, *, map_location="cpu") -> dict      torch.load(weights_only=True), one-line errors
    GracefulInterrupt()                                       context manager: Ctrl-C sets .requested
    MetricsWriter(path, *, tensorboard_dir=None)              CSV (append, header once) + optional TensorBoard
    progress(total, *, initial=0, enabled=True, desc="")      tqdm on rank 0, a no-op bar elsewhere
    DrawSchedule(n_items, *, seed, rank=0, world_size=1)      resumable, seeded, sharded order of items
    DrawSampler(schedule) / SeededDraws(dataset)              that order through a DataLoader, reseeded per draw
    start_run(device, *, seed, threads=0, logger_name)        setup_distributed + threads + seeds + logger
    add_config_arguments(parser, config, checkpoint)          --config, --resume [CHECKPOINT], key=value overrides
    load_resume_checkpoint(resume, default_path, stage)       --resume's checkpoint, checked for its stage
    refuse_fresh_run_over(checkpoint, key)                    no fresh run over an earlier run's checkpoint
    check_resume(path, ckpt, current, *, max_steps) -> step   refuse a resume with changed settings / nothing to do
    check_positive(cfg, *names) / check_output_dir(path)      one-line checks before anything is created
    resume_lr_scheduler(scheduler, state) -> list[str]        the config's LR schedule, continued at the saved step
    wrap_ddp(model, dist, **kwargs)                           DDP under torchrun, else the model itself
    TrainingLoop(dist, metrics_path, *, step, max_steps, ...) Ctrl-C, progress bar, metrics CSVs, config.yaml,
                                                              teardown

A checkpoint written with :func:`save_checkpoint` is a plain dict of tensors, numbers, strings, lists
and dicts (loadable with ``weights_only=True``) holding at least ``version`` (package), ``stage``,
``config`` (plain dict), ``step``, ``model``; stages add ``model_config``, ``optimizers``, ``ema``,
``scaler``, ``schedulers``, ``rng`` (:func:`rng_state`), ``rng_ranks`` (:func:`rank_rng_states`) and ``data`` (e.g. :meth:`DrawSchedule.state_dict`).
"""

from __future__ import annotations

import contextlib
import csv
import io
import dataclasses
import logging
import os
import random
import signal
import time
import types
import typing
import warnings
from dataclasses import dataclass, fields, is_dataclass
from pathlib import Path

import numpy as np
import torch
import yaml

from backend import __version__
from backend.errors import DiffTumorError, load_failure_cause

CHECKPOINT_FORMAT = "difftumor-checkpoint-1"


# ------------------------------------------------------------------------------------------ config
def _type_name(tp) -> str:
    return getattr(tp, "__name__", None) or str(tp).replace("typing.", "")


def _coerce(value, tp, where: str):
    """Convert a YAML value to the annotated type ``tp`` (raises ValueError with a short reason)."""
    origin = typing.get_origin(tp)
    args = typing.get_args(tp)
    if tp is typing.Any:
        return value
    if origin in (typing.Union, types.UnionType):
        if value is None and type(None) in args:
            return None
        errors = []
        for a in args:
            if a is type(None):
                continue
            try:
                return _coerce(value, a, where)
            except (ValueError, TypeError) as exc:
                errors.append(str(exc))
        raise ValueError(errors[0] if errors else f"expected {_type_name(tp)}")
    if origin is typing.Literal:
        if value not in args:
            raise ValueError(f"{value!r} is not allowed; allowed: {', '.join(map(repr, args))}")
        return value
    if is_dataclass(tp):
        if not isinstance(value, dict):
            raise ValueError(f"expected a mapping, got {value!r}")
        return _build(tp, value, where)
    if origin in (tuple, list):
        if isinstance(value, (int, float, str)) and not isinstance(value, bool) and origin is tuple and args and args[-1] is Ellipsis:
            value = [value]
        if not isinstance(value, (list, tuple)):
            raise ValueError(f"expected a list, got {value!r}")
        if origin is tuple and args and args[-1] is not Ellipsis:
            if len(value) != len(args):
                raise ValueError(f"expected {len(args)} values, got {len(value)}")
            return tuple(_coerce(v, a, where) for v, a in zip(value, args))
        inner = args[0] if args else typing.Any
        out = [_coerce(v, inner, where) for v in value]
        return tuple(out) if origin is tuple else out
    if origin is dict or tp is dict:
        if not isinstance(value, dict):
            raise ValueError(f"expected a mapping, got {value!r}")
        return dict(value)
    if tp is bool:
        if isinstance(value, bool):
            return value
        if isinstance(value, str) and value.lower() in ("true", "false", "yes", "no", "1", "0", "on", "off"):
            return value.lower() in ("true", "yes", "1", "on")
        raise ValueError(f"expected true/false, got {value!r}")
    if tp is int:
        if isinstance(value, bool) or not isinstance(value, (int, float, str)):
            raise ValueError(f"expected an integer, got {value!r}")
        try:
            f = float(value)
        except ValueError:
            raise ValueError(f"expected an integer, got {value!r}") from None
        if not f.is_integer():
            raise ValueError(f"expected an integer, got {value!r}")
        return int(f)
    if tp is float:
        if isinstance(value, bool):
            raise ValueError(f"expected a number, got {value!r}")
        try:
            return float(value)
        except (TypeError, ValueError):
            raise ValueError(f"expected a number, got {value!r}") from None
    if tp is str:
        if isinstance(value, (dict, list)):
            raise ValueError(f"expected a string, got {value!r}")
        return str(value)
    if tp is Path:
        return Path(str(value))
    return value


def _build(cls, data: dict, where: str, prefix: str = ""):
    hints = typing.get_type_hints(cls)
    known = {f.name: f for f in fields(cls) if f.init}
    kwargs = {}
    for key, value in data.items():
        if key not in known:
            raise DiffTumorError(
                f"{where}: unknown key '{prefix}{key}' (known: {', '.join(sorted(known))})"
            )
        tp = hints[key]
        if is_dataclass(tp) and isinstance(value, dict):
            kwargs[key] = _build(tp, value, where, prefix=f"{prefix}{key}.")
            continue
        try:
            kwargs[key] = _coerce(value, tp, where)
        except (ValueError, TypeError) as exc:
            raise DiffTumorError(f"{where}: key '{prefix}{key}': {exc}") from None
    try:
        return cls(**kwargs)
    except (ValueError, TypeError) as exc:
        raise DiffTumorError(f"{where}: {' '.join(str(exc).split())}") from None


def _merge(base: dict, override: dict) -> dict:
    out = dict(base)
    for k, v in override.items():
        out[k] = _merge(out[k], v) if isinstance(v, dict) and isinstance(out.get(k), dict) else v
    return out


def add_config_arguments(parser, config: str, checkpoint: str) -> None:
    """The arguments every ``difftumor train STAGE`` takes: ``--config YAML``, ``--resume [CHECKPOINT]``
    and ``key=value`` overrides (the CLI takes a bare ``--resume`` before an override as "the last
    checkpoint" and accepts overrides on both sides of the options)."""
    parser.add_argument("--config", help=f"YAML config (see {config})")
    parser.add_argument("--resume", nargs="?", const="last", default=None, metavar="CHECKPOINT",
                        help=f"continue from {checkpoint} (or the given checkpoint); model settings must match it")
    parser.add_argument("overrides", nargs="*", metavar="key=value", help="config overrides (dotted keys)")


def parse_overrides(overrides) -> dict:
    """``["a.b=3", "c=[1,2]"]`` -> nested dict; values are parsed as YAML scalars/lists."""
    out: dict = {}
    for item in overrides or ():
        if "=" not in item:
            raise DiffTumorError(f"override '{item}': expected key=value")
        key, raw = item.split("=", 1)
        key = key.strip()
        if not key:
            raise DiffTumorError(f"override '{item}': empty key")
        try:
            value = yaml.safe_load(raw) if raw.strip() else ""
        except yaml.YAMLError:
            value = raw
        node = out
        parts = key.split(".")
        for p in parts[:-1]:
            node = node.setdefault(p, {})
            if not isinstance(node, dict):
                raise DiffTumorError(f"override '{item}': '{p}' is not a section")
        node[parts[-1]] = value
    return out


def load_config(cls, path=None, overrides=()):
    """Build dataclass ``cls`` from an optional YAML file and ``key=value`` overrides (dotted keys for
    nested dataclasses). Types are coerced from the annotations; unknown keys and bad values raise
    one-line DiffTumorErrors naming the file (or "override")."""
    data: dict = {}
    where = "config"
    if path is not None:
        path = Path(path)
        where = str(path)
        if not path.is_file():
            raise DiffTumorError(f"{path}: config file not found")
        try:
            loaded = yaml.safe_load(path.read_text(encoding="utf-8")) or {}
        except yaml.YAMLError as exc:
            raise DiffTumorError(f"{path}: not valid YAML ({' '.join(str(exc).split())})") from None
        if not isinstance(loaded, dict):
            raise DiffTumorError(f"{path}: expected a mapping of settings at the top level")
        data = loaded
    ov = parse_overrides(overrides)
    if ov:
        where = f"{where} + overrides" if path is not None else "override"
    return _build(cls, _merge(data, ov), where)


def config_to_dict(cfg) -> dict:
    """Nested plain dict (tuples -> lists, Paths -> str) of a config dataclass."""

    def plain(v):
        if is_dataclass(v):
            return {f.name: plain(getattr(v, f.name)) for f in fields(v)}
        if isinstance(v, (list, tuple)):
            return [plain(x) for x in v]
        if isinstance(v, dict):
            return {k: plain(x) for k, x in v.items()}
        if isinstance(v, Path):
            return str(v)
        return v

    return plain(cfg)


# ------------------------------------------------------------------------------------ seeds / RNG
def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)


def rng_state() -> dict:
    """Snapshot of the python, numpy and torch (CPU + CUDA) generators, weights_only-loadable."""
    np_state = np.random.get_state()
    state = {
        "python": [random.getstate()[0], list(random.getstate()[1]), random.getstate()[2]],
        "numpy": [np_state[0], torch.from_numpy(np_state[1].astype(np.int64)), int(np_state[2]), int(np_state[3]), float(np_state[4])],
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


def rank_rng_states(dist: "DistInfo") -> list[dict]:
    """:func:`rng_state` of every rank, in rank order (a collective under torchrun: call it on all ranks).
    A checkpoint keeps them all, so that each rank resumes its own random stream (ranks draw different
    noise, :func:`start_run`)."""
    state = rng_state()
    if not dist.distributed:
        return [state]
    states: list = [None] * dist.world_size
    torch.distributed.all_gather_object(states, state)
    return states


def restore_rank_rng_state(ckpt: dict, dist: "DistInfo", *, seed: int) -> None:
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


# ---------------------------------------------------------------------------------- distributed
@dataclass
class DistInfo:
    rank: int = 0
    world_size: int = 1
    local_rank: int = 0
    device: torch.device = dataclasses.field(default_factory=lambda: torch.device("cpu"))

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @property
    def distributed(self) -> bool:
        return self.world_size > 1


def setup_distributed(device: str = "auto") -> DistInfo:
    """Read torchrun's RANK/WORLD_SIZE/LOCAL_RANK; init the process group when WORLD_SIZE > 1
    (nccl on CUDA, gloo on CPU). Without torchrun: a single process on ``device``."""
    from backend.device import resolve_device

    dev = resolve_device(device)
    rank = int(os.environ.get("RANK", 0))
    world = int(os.environ.get("WORLD_SIZE", 1))
    local = int(os.environ.get("LOCAL_RANK", 0))
    if dev.type == "cuda":
        dev = torch.device("cuda", local if world > 1 else (dev.index or 0))
        torch.cuda.set_device(dev)
    if world > 1 and not torch.distributed.is_initialized():
        backend = "nccl" if dev.type == "cuda" else "gloo"
        torch.distributed.init_process_group(backend=backend, rank=rank, world_size=world)
    return DistInfo(rank=rank, world_size=world, local_rank=local, device=dev)


def teardown_distributed(*, wait_for_all: bool = False) -> None:
    """Destroy the process group. ``wait_for_all`` (a normal end of training): first a barrier, so that no
    rank tears down its gloo/NCCL threads while another (rank 0 validating or saving) is still working;
    a rank that leaves early could abort in the C++ runtime ("terminate called without an active
    exception"). After an error no barrier: the other ranks may never arrive."""
    if torch.distributed.is_available() and torch.distributed.is_initialized():
        if wait_for_all:
            torch.distributed.barrier()
        torch.distributed.destroy_process_group()


def get_logger(name: str, dist: DistInfo | None = None) -> logging.Logger:
    """Logger that speaks on rank 0 only (warnings still show on every rank)."""
    log = logging.getLogger(name)
    if dist is not None and not dist.is_main:
        log.setLevel(logging.WARNING)
    return log


# ---------------------------------------------------------------------------------- checkpoints
def save_checkpoint(path, **state) -> Path:
    """Write ``state`` (+ format, package version, time) atomically: tmp file then os.replace."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    payload = {"format": CHECKPOINT_FORMAT, "version": __version__, "saved_at": time.time(), **state}
    tmp = path.with_name(f".{path.name}.tmp{os.getpid()}")
    try:
        torch.save(payload, tmp)
        os.replace(tmp, path)
    finally:
        if tmp.exists():
            tmp.unlink()
    return path


def load_checkpoint(path, *, map_location="cpu") -> dict:
    """Load one of our checkpoints safely (``weights_only=True``)."""
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


class GracefulInterrupt(contextlib.AbstractContextManager):
    """Within the block, the first Ctrl-C (SIGINT) only sets ``requested``; the loop then saves a
    checkpoint and stops. A second Ctrl-C interrupts immediately. Main thread only (else inert)."""

    def __init__(self):
        self.requested = False
        self._previous = None

    def _handler(self, signum, frame):
        if self.requested:
            raise KeyboardInterrupt
        self.requested = True
        logging.getLogger(__name__).warning("interrupt received: saving a checkpoint, then stopping (Ctrl-C again to abort)")

    def __enter__(self):
        try:
            self._previous = signal.signal(signal.SIGINT, self._handler)
        except ValueError:  # not the main thread
            self._previous = None
        return self

    def __exit__(self, *exc):
        if self._previous is not None:
            signal.signal(signal.SIGINT, self._previous)
        return False


def _is_number(text: str) -> bool:
    try:
        float(text)
    except ValueError:
        return False
    return True


class MetricsWriter:
    """Append rows of metrics to a CSV (header written once; the columns are fixed by the first row,
    or by the existing header when a resumed run appends) and, if TensorBoard is installed and
    ``tensorboard_dir`` is given, to TensorBoard as well. Create it on rank 0 only."""

    def __init__(self, path, *, tensorboard_dir=None):
        self.path = Path(path)
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self.columns: list[str] | None = None
        if self.path.is_file() and self.path.stat().st_size:
            with open(self.path, newline="", encoding="utf-8") as f:
                self.columns = next(csv.reader(f), None)
        self.tb = None
        if tensorboard_dir is not None:
            try:
                from torch.utils.tensorboard import SummaryWriter

                self.tb = SummaryWriter(str(tensorboard_dir))
            except Exception:  # tensorboard not installed
                logging.getLogger(__name__).info("TensorBoard is not installed; metrics go to %s only", self.path)

    def truncate_after(self, step: int) -> int:
        """Drop rows logged after ``step`` (a run that crashed after its last checkpoint logged them, and the
        resumed run logs those steps again); the CSV is rewritten atomically. Returns the rows dropped."""
        if self.columns is None:
            return 0
        with open(self.path, newline="", encoding="utf-8") as f:
            rows = list(csv.reader(f))
        keep = [rows[0]] + [r for r in rows[1:] if not r or not _is_number(r[0]) or float(r[0]) <= step]
        if len(keep) == len(rows):
            return 0
        from backend.io import write_text_atomic

        text = io.StringIO()
        csv.writer(text).writerows(keep)
        write_text_atomic(self.path, text.getvalue())
        return len(rows) - len(keep)

    def write(self, step: int, metrics: dict) -> None:
        row = {"step": step, **{k: (float(v) if torch.is_tensor(v) else v) for k, v in metrics.items()}}
        new = self.columns is None
        if new:
            self.columns = list(row)
        extra = [k for k in row if k not in self.columns]
        if extra:
            raise ValueError(f"{self.path}: metrics {extra} are not among the CSV columns {self.columns}")
        with open(self.path, "a", newline="", encoding="utf-8") as f:
            w = csv.DictWriter(f, fieldnames=self.columns)
            if new:
                w.writeheader()
            w.writerow(row)
        if self.tb is not None:
            for k, v in row.items():
                if k != "step" and isinstance(v, (int, float)):
                    self.tb.add_scalar(k, v, step)

    def close(self) -> None:
        if self.tb is not None:
            self.tb.close()


class _NullBar:
    def update(self, n=1):
        pass

    def set_postfix(self, *a, **k):
        pass

    def close(self):
        pass


def progress(total: int, *, initial: int = 0, enabled: bool = True, desc: str = ""):
    """tqdm progress bar (rank 0) or an inert one."""
    if not enabled:
        return _NullBar()
    from tqdm.auto import tqdm

    return tqdm(total=total, initial=initial, desc=desc, dynamic_ncols=True, leave=False)


# ------------------------------------------------------------------------------ run scaffolding
def start_run(device: str, *, seed: int, threads: int = 0, logger_name: str = __name__) -> tuple[DistInfo, logging.Logger]:
    """Process setup every stage does first: torchrun/device, rank-aware logger, CPU threads, seeds
    (``seed + rank``, so ranks draw different noise)."""
    try:
        dist = setup_distributed(device)
    except DiffTumorError as exc:  # resolve_device speaks of the inference CLIs' --device flag
        raise DiffTumorError(str(exc).replace("--device ", "device=")) from None
    if threads > 0:
        torch.set_num_threads(threads)
    seed_everything(seed + dist.rank)
    return dist, get_logger(logger_name, dist)


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


def check_positive(cfg, *names: str, zero_ok: tuple[str, ...] = ()) -> None:
    """Refuse, in one line naming the key, a setting in ``names`` (dotted) that is < 1, or one in ``zero_ok``
    that is < 0. Called before anything is created, so a bad value leaves nothing behind."""
    for name in (*names, *zero_ok):
        value = cfg
        for part in name.split("."):
            value = getattr(value, part)
        low = 0 if name in zero_ok else 1
        if value < low:
            raise DiffTumorError(f"{name}={value}: must be {'0 or more' if low == 0 else 'a positive integer'}")


def check_output_dir(path, key: str = "output_dir") -> Path:
    """``path`` as a Path; one line when it exists but is not a folder."""
    path = Path(path)
    if path.exists() and not path.is_dir():
        raise DiffTumorError(f"{key}={path}: exists and is not a folder")
    return path


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
    ``model`` is compared field by field with ``ckpt["model_config"]``. One line names the checkpoint and every differing key as
    ``key: checkpoint X, config Y``. A checkpoint already at or past ``max_steps`` is refused too, so that
    it is not rewritten by a run that trains nothing.
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


def wrap_ddp(model: torch.nn.Module, dist: DistInfo, **kwargs) -> torch.nn.Module:
    """``model`` in DistributedDataParallel under torchrun, else itself."""
    if not dist.distributed:
        return model
    return torch.nn.parallel.DistributedDataParallel(
        model, device_ids=[dist.device.index] if dist.device.type == "cuda" else None, **kwargs)


class TrainingLoop(contextlib.AbstractContextManager):
    """The loop's bookkeeping, shared by the stages: Ctrl-C handling (:class:`GracefulInterrupt`), the
    progress bar and the metrics CSV on rank 0, and on exit (also after an error) closing them and
    leaving the process group::

        with TrainingLoop(dist, out / "metrics.csv", step=step, max_steps=n, log_every=20, desc="stage") as loop:
            while loop.running(step):
                ...; step += 1
                loop.tick()
                if loop.due(step):
                    loop.log(step, {"loss": loss}, loss=f"{loss:.4f}")
            save("interrupted" if loop.interrupted else "final")
    """

    def __init__(self, dist: DistInfo, metrics_path, *, step: int, max_steps: int, log_every: int, desc: str,
                 tensorboard_dir=None, config=None, validation: bool = False):
        self.dist, self.max_steps, self.log_every = dist, max_steps, log_every
        self.out_dir = Path(metrics_path).parent
        self._created = dist.is_main and not self.out_dir.exists()  # removed again if nothing gets trained
        self._ticks = 0
        self.metrics = MetricsWriter(metrics_path, tensorboard_dir=tensorboard_dir) if dist.is_main else None
        self.val_metrics = (MetricsWriter(self.out_dir / "val_metrics.csv", tensorboard_dir=None)
                            if dist.is_main and validation else None)
        for writer in (self.metrics, self.val_metrics):
            if writer is not None and step == 0 and writer.columns is not None:
                # a fresh run (the stages refuse one over a checkpoint): rows of an earlier attempt that never
                # saved a checkpoint are not this run's
                writer.path.unlink()
                writer.columns = None
            elif writer is not None and step > 0:  # resumed: rows after the checkpoint are logged again
                dropped = writer.truncate_after(step)
                if dropped:
                    logging.getLogger(__name__).info("%s: dropped %d row(s) logged after the checkpoint's step %d",
                                                     writer.path, dropped, step)
        if config is not None and dist.is_main:  # the settings this run trains with, next to its outputs
            from backend.io import write_text_atomic

            write_text_atomic(self.out_dir / "config.yaml", yaml.safe_dump(config_to_dict(config), sort_keys=False))
        self.bar = progress(max_steps, initial=step, enabled=dist.is_main, desc=desc)
        self._stop = GracefulInterrupt()

    def __enter__(self):
        self._stop.__enter__()
        self._log_redirect = contextlib.nullcontext()
        if not isinstance(self.bar, _NullBar):  # log lines go above the bar instead of through it
            from tqdm.contrib.logging import logging_redirect_tqdm

            self._log_redirect = logging_redirect_tqdm()
        self._log_redirect.__enter__()
        return self

    def __exit__(self, *exc):
        try:
            self._log_redirect.__exit__(*exc)
            self._stop.__exit__(*exc)
            self.bar.close()
            for writer in (self.metrics, self.val_metrics):
                if writer is not None:
                    writer.close()
            if exc[0] is not None and self._created and self._ticks == 0:
                # e.g. no usable training case: the error is the whole story, leave no empty run folder
                import shutil

                shutil.rmtree(self.out_dir, ignore_errors=True)
        finally:
            teardown_distributed(wait_for_all=exc[0] is None)
        return False

    @property
    def interrupted(self) -> bool:
        return self._stop.requested

    def running(self, step: int) -> bool:
        return step < self.max_steps and not self._stop.requested

    def tick(self) -> None:
        self._ticks += 1
        self.bar.update(1)

    def due(self, step: int) -> bool:
        """Whether rank 0 logs at ``step`` (every ``log_every`` steps and at the last one)."""
        return self.dist.is_main and (step % self.log_every == 0 or step == self.max_steps)

    def log(self, step: int, row: dict, **postfix) -> None:
        if postfix:
            self.bar.set_postfix(**postfix)
        if self.metrics is not None:
            self.metrics.write(step, row)

    def log_validation(self, step: int, row: dict) -> None:
        """A validation result as a row of ``val_metrics.csv`` (rank 0; the loop was made with
        ``validation=True``)."""
        if self.val_metrics is not None:
            self.val_metrics.write(step, row)


class DrawSchedule:
    """Seeded, resumable stream of item indices: each epoch is a permutation of ``range(n_items)``
    drawn from ``seed + epoch`` and sharded round-robin over ranks. ``next()`` returns
    ``(item_index, draw_id)``; ``draw_id`` is globally unique and can seed the random transforms of that
    draw, so the data a run sees depends only on (seed, position), not on worker timing.
    """

    def __init__(self, n_items: int, *, seed: int, rank: int = 0, world_size: int = 1):
        if n_items < 1:
            raise ValueError("DrawSchedule needs at least one item")
        self.n_items, self.seed, self.rank, self.world_size = n_items, seed, rank, world_size
        self.epoch = 0
        self.position = 0  # index into this rank's shard of the current epoch
        self._order: list[int] | None = None

    def _shard(self) -> list[int]:
        if self._order is None:
            g = torch.Generator().manual_seed(self.seed + self.epoch)
            perm = torch.randperm(self.n_items, generator=g).tolist()
            while len(perm) % self.world_size:  # equal shards on every rank
                perm.append(perm[len(perm) % self.n_items])
            self._order = perm[self.rank :: self.world_size]
        return self._order

    def __iter__(self):
        return self

    def __next__(self) -> tuple[int, int]:
        shard = self._shard()
        if self.position >= len(shard):
            self.epoch, self.position, self._order = self.epoch + 1, 0, None
            shard = self._shard()
        item = shard[self.position]
        draw_id = ((self.epoch * len(shard) + self.position) * self.world_size + self.rank) + self.seed * 1_000_003
        self.position += 1
        return item, draw_id

    def state_dict(self) -> dict:
        return {"epoch": self.epoch, "position": self.position, "seed": self.seed, "n_items": self.n_items}

    def load_state_dict(self, state: dict) -> None:
        self.epoch, self.position, self._order = int(state["epoch"]), int(state["position"]), None

    def seek(self, n_draws: int) -> "DrawSchedule":
        """Position the stream after ``n_draws`` draws of this rank (the state a run had after them)."""
        shard_len = -(-self.n_items // self.world_size)
        self.epoch, self.position = divmod(int(n_draws), shard_len)
        self._order = None
        return self


class DrawSampler(torch.utils.data.Sampler):
    """Endless DataLoader sampler over a :class:`DrawSchedule`: yields ``(item, draw_id)`` keys for
    :class:`SeededDraws`. The DataLoader reads ahead, so a trainer resumes with
    ``DrawSchedule.seek(draws consumed by its steps)``, not with the schedule's own position."""

    def __init__(self, schedule: DrawSchedule):
        self.schedule = schedule

    def __iter__(self):
        while True:
            yield next(self.schedule)


class SeededDraws(torch.utils.data.Dataset):
    """A MONAI dataset read through :class:`DrawSampler` keys: before each item its random transforms
    are reseeded from the draw id, so what a step sees depends only on (seed, position) — not on the
    number of workers, their timing, or where a run was interrupted and resumed."""

    def __init__(self, dataset):
        self.dataset = dataset

    def __len__(self) -> int:
        return len(self.dataset)

    def __getitem__(self, key):
        item, draw_id = key
        self.dataset.transform.set_random_state(seed=draw_id % 2**32)
        return self.dataset[item]

