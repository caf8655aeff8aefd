"""The training loop's bookkeeping and the one optimizer step, shared by the three stages.

    TrainingLoop(dist, metrics_path, *, step, max_steps, ...)   Ctrl-C, progress bar, metrics CSVs, config.yaml,
                                                                teardown
    optimizer_step(optimizer, params, *, loss=None, scaler=None, clip=0.0, ...)   backward, AMP, clipping, step
    autocast(device, enabled, dtype) / grad_scaler(device, amp, dtype)           AMP on CUDA only
    GracefulInterrupt()                                         context manager: Ctrl-C sets .requested
    MetricsWriter(path, *, tensorboard_dir=None)                CSV (append, header once) + optional TensorBoard
    progress(total, *, initial=0, enabled=True, desc="")        tqdm on rank 0, a no-op bar elsewhere
    check_output_dir(path, key)                                 one-line check before anything is created
"""

from __future__ import annotations

import contextlib
import csv
import io
import logging
import signal
from pathlib import Path

import torch
import yaml

from backend.errors import DiffTumorError
from backend.train.config import config_to_dict
from backend.train.distributed import DistInfo, teardown_distributed


def optimizer_step(optimizer, params, *, loss=None, scaler=None, clip: float = 0.0, before_unscale=None,
                   update: bool = True) -> None:
    """One optimizer step, the same for every stage.

    With ``loss``: zero the gradients and back-propagate it (scaled by the AMP ``scaler``); without: the
    gradients are already there (accumulated micro-batches). Then ``before_unscale()`` (e.g. averaging
    gradients DDP does not own), unscale and clip the gradient norm of ``params`` to ``clip`` (0: no
    clipping), step, and update the scaler (``update=False`` when a second optimizer shares it this step).
    """
    scaler = scaler or _NO_SCALER
    if loss is not None:
        optimizer.zero_grad(set_to_none=True)
        scaler.scale(loss).backward()
    if before_unscale is not None:
        before_unscale()
    if clip > 0:
        scaler.unscale_(optimizer)
        torch.nn.utils.clip_grad_norm_(params, clip)
    scaler.step(optimizer)
    if update:
        scaler.update()


_NO_SCALER = torch.amp.GradScaler("cuda", enabled=False)  # fp32: scale/step/update pass through


def grad_scaler(device: torch.device, amp: bool, dtype=torch.float16) -> torch.amp.GradScaler:
    """A GradScaler that is active for float16 autocast on CUDA only (bfloat16 needs none)."""
    return torch.amp.GradScaler("cuda", enabled=amp and device.type == "cuda" and dtype == torch.float16)


def amp_dtype(device: torch.device, amp: bool, *, prefer_bf16: bool) -> torch.dtype | None:
    """The autocast dtype on CUDA (bfloat16 where supported if ``prefer_bf16``, else float16), None off CUDA."""
    if not (amp and device.type == "cuda"):
        return None
    return torch.bfloat16 if prefer_bf16 and torch.cuda.is_bf16_supported() else torch.float16


def autocast(device: torch.device, dtype: torch.dtype | None):
    """``torch.autocast`` to ``dtype`` (None: off)."""
    return torch.autocast(device.type, dtype=dtype or torch.float16, enabled=dtype is not None)


def check_output_dir(path, key: str = "output_dir") -> Path:
    """``path`` as a Path; one line when it exists but is not a folder."""
    path = Path(path)
    if path.exists() and not path.is_dir():
        raise DiffTumorError(f"{key}={path}: exists and is not a folder")
    return path


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
        logging.getLogger(__name__).warning("interrupt received: saving a checkpoint, then stopping "
                                            "(Ctrl-C again to abort)")

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
