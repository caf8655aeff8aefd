"""Shared training utilities: config parsing, RNG snapshots, checkpoints, metrics, data order."""

from __future__ import annotations

import csv
import random
import re
import signal
from dataclasses import dataclass, field
from typing import Literal

import numpy as np
import pytest
import torch

from backend.checkpoint import load_checkpoint, save_checkpoint
from backend.errors import DiffTumorError
from backend.train.checkpoint import resume_lr_scheduler, rng_state, seed_everything, set_rng_state
from backend.train.config import (
    NON_NEGATIVE,
    POSITIVE,
    PROBABILITY,
    config_to_dict,
    load_config,
    ranged,
)
from backend.train.data import DrawSchedule
from backend.train.distributed import setup_distributed
from backend.train.loop import GracefulInterrupt, MetricsWriter


@dataclass
class Inner:
    lr: float = 1e-4
    betas: tuple[float, float] = (0.5, 0.9)
    crop: tuple[int, ...] = (96, 96, 96)

    def __post_init__(self):
        if self.lr <= 0:
            raise ValueError(f"lr must be > 0, got {self.lr}")


@dataclass
class Outer:
    name: str = "run"
    steps: int = 10
    amp: bool = True
    mode: Literal["a", "b"] = "a"
    weights: str | None = None
    inner: Inner = field(default_factory=Inner)


def test_yaml_and_overrides(tmp_path):
    p = tmp_path / "c.yaml"
    p.write_text("steps: 20\ninner:\n  lr: 0.001\n  crop: [32, 32, 32]\n", encoding="utf-8")
    cfg = load_config(Outer, p, ["inner.lr=2e-3", "amp=false", "mode=b", "inner.crop=64", "steps=30"])
    assert cfg.steps == 30 and cfg.amp is False and cfg.mode == "b"
    assert cfg.inner.lr == 2e-3 and cfg.inner.crop == (64,) and cfg.inner.betas == (0.5, 0.9)
    assert cfg.weights is None
    round_trip = load_config(Outer, None, [f"{k}={v}" for k, v in parse_flat(config_to_dict(cfg)).items()])
    assert round_trip == cfg


def parse_flat(d, prefix=""):
    out = {}
    for k, v in d.items():
        if isinstance(v, dict):
            out.update(parse_flat(v, f"{prefix}{k}."))
        elif v is None:
            out[f"{prefix}{k}"] = "null"
        else:
            out[f"{prefix}{k}"] = str(list(v) if isinstance(v, (list, tuple)) else v)
    return out


@pytest.mark.parametrize(
    "overrides, match",
    [
        (["stepz=3"], "unknown key 'stepz'"),
        (["inner.foo=1"], "unknown key 'inner.foo'"),
        (["steps=abc"], "key 'steps': expected an integer"),
        (["steps=1.5"], "key 'steps': expected an integer"),
        (["mode=c"], "key 'mode': 'c' is not allowed"),
        (["amp=maybe"], "key 'amp': expected true/false"),
        (["inner.lr=-1"], "lr must be > 0"),
        (["inner.betas=[1]"], "expected 2 values"),
        (["noequals"], "expected key=value"),
    ],
)
def test_bad_overrides(overrides, match):
    with pytest.raises(DiffTumorError, match=match) as info:
        load_config(Outer, None, overrides)
    assert "\n" not in str(info.value)


def test_bad_files(tmp_path):
    with pytest.raises(DiffTumorError, match="not found"):
        load_config(Outer, tmp_path / "nope.yaml")
    bad = tmp_path / "bad.yaml"
    bad.write_text("- a\n- b\n", encoding="utf-8")
    with pytest.raises(DiffTumorError, match="mapping"):
        load_config(Outer, bad)


def test_rng_state_round_trip(tmp_path):
    seed_everything(3)
    state = rng_state()
    save_checkpoint(tmp_path / "r.pt", stage="t", config={}, step=0, rng=state)
    a = (random.random(), np.random.rand(), torch.rand(1).item())
    set_rng_state(load_checkpoint(tmp_path / "r.pt")["rng"])
    assert (random.random(), np.random.rand(), torch.rand(1).item()) == a


def test_checkpoint_atomic_and_versioned(tmp_path):
    m = torch.nn.Linear(3, 2)
    opt = torch.optim.Adam(m.parameters())
    m(torch.ones(1, 3)).sum().backward()
    opt.step()
    path = save_checkpoint(tmp_path / "sub" / "ck.pt", stage="x", config={"a": 1}, step=7,
                           model=m.state_dict(), optimizers=[opt.state_dict()])
    assert sorted(p.name for p in path.parent.iterdir()) == ["ck.pt"]  # no temp left
    ck = load_checkpoint(path)
    assert ck["step"] == 7 and ck["version"] and ck["config"] == {"a": 1}
    opt2 = torch.optim.Adam(m.parameters())
    opt2.load_state_dict(ck["optimizers"][0])
    (tmp_path / "junk.pt").write_bytes(b"not a checkpoint")
    with pytest.raises(DiffTumorError, match="junk.pt: not a readable"):
        load_checkpoint(tmp_path / "junk.pt")
    torch.save({"x": 1}, tmp_path / "other.pt")
    with pytest.raises(DiffTumorError, match="other.pt: not a DiffTumor training checkpoint"):
        load_checkpoint(tmp_path / "other.pt")


def _warmup_cosine(opt, warmup, total):
    from monai.optimizers import WarmupCosineSchedule

    return WarmupCosineSchedule(opt, warmup_steps=warmup, t_total=total)


def _multistep(opt, milestones):
    return torch.optim.lr_scheduler.MultiStepLR(opt, list(milestones), 0.5)


@pytest.mark.parametrize(
    "make_old, make_new, changed",
    [
        # `train segmentation max_steps=12 --resume` after 8 steps (was: LR 0 at step 8, then climbing again)
        (lambda o: _warmup_cosine(o, 2, 8), lambda o: _warmup_cosine(o, 2, 12), ["t_total 8 -> 12"]),
        (lambda o: _warmup_cosine(o, 2, 8), lambda o: _warmup_cosine(o, 3, 20),
         ["warmup_steps 2 -> 3", "t_total 8 -> 20"]),
        # chained schedule: the LR is rebuilt from the config, not from the optimizer's restored LR
        (lambda o: _multistep(o, (3, 6)), lambda o: _multistep(o, (3, 10)),
         ["milestones Counter({3: 1, 6: 1}) -> Counter({3: 1, 10: 1})"]),
    ],
)
@pytest.mark.parametrize("new_lr", [1e-2, 5e-3])
def test_resumed_lr_schedule_equals_a_fresh_run_with_the_new_settings(tmp_path, make_old, make_new, changed, new_lr):
    def parts(lr, make):
        param = torch.nn.Parameter(torch.ones(3))
        opt = torch.optim.AdamW([param], lr=lr)
        return param, opt, make(opt)

    def train_steps(param, opt, sched, n):
        lrs = []
        for _ in range(n):
            param.grad = torch.ones_like(param)
            opt.step()
            sched.step()
            lrs.append(opt.param_groups[0]["lr"])
        return lrs

    param, opt, sched = parts(1e-2, make_old)
    train_steps(param, opt, sched, 8)
    save_checkpoint(tmp_path / "last.pt", stage="t", config={}, step=8, optimizer=opt.state_dict(),
                    scheduler=sched.state_dict())
    ck = load_checkpoint(tmp_path / "last.pt")

    param, opt, sched = parts(new_lr, make_new)
    opt.load_state_dict(ck["optimizer"])
    got = resume_lr_scheduler(sched, ck["scheduler"])
    assert got == changed + ([f"base_lrs [0.01] -> [{new_lr}]"] if new_lr != 1e-2 else [])
    assert opt.state[param]["step"] == 8  # the optimizer's moments still come from the checkpoint
    resumed = [opt.param_groups[0]["lr"]] + train_steps(param, opt, sched, 8)

    param, fresh_opt, fresh = parts(new_lr, make_new)
    expected = train_steps(param, fresh_opt, fresh, 16)[7:]  # LR after steps 8..16 of a fresh run
    assert resumed == expected  # exactly
    assert sched.state_dict()["last_epoch"] == fresh.state_dict()["last_epoch"] == 16


def test_resume_lr_scheduler_refuses_a_stepped_scheduler():
    opt = torch.optim.SGD([torch.nn.Parameter(torch.ones(1))], lr=1.0)
    sched = _multistep(opt, (2,))
    opt.step()
    sched.step()
    with pytest.raises(ValueError, match="not been stepped"):
        resume_lr_scheduler(sched, {"last_epoch": 3})


def test_metrics_csv_appends_header_once(tmp_path):
    w = MetricsWriter(tmp_path / "m.csv")
    w.write(1, {"loss": torch.tensor(0.5), "lr": 1e-3})
    w2 = MetricsWriter(tmp_path / "m.csv")  # a resumed run appends
    w2.write(2, {"loss": 0.25, "lr": 1e-3})
    rows = list(csv.reader(open(tmp_path / "m.csv", encoding="utf-8")))
    assert rows == [["step", "loss", "lr"], ["1", "0.5", "0.001"], ["2", "0.25", "0.001"]]
    with pytest.raises(ValueError, match="not among the CSV columns"):
        w2.write(3, {"new": 1})


def test_draw_schedule_resumes_and_shards():
    s = DrawSchedule(5, seed=1)
    full = [next(s) for _ in range(12)]
    assert sorted(i for i, _ in full[:5]) == list(range(5))
    assert len({d for _, d in full}) == 12
    s2 = DrawSchedule(5, seed=1)
    [next(s2) for _ in range(7)]
    s3 = DrawSchedule(5, seed=1)
    s3.load_state_dict(s2.state_dict())
    assert [next(s3) for _ in range(5)] == full[7:]
    r0 = [next(DrawSchedule(5, seed=1, rank=0, world_size=2)) for _ in range(1)]
    r1 = [next(DrawSchedule(5, seed=1, rank=1, world_size=2)) for _ in range(1)]
    assert r0[0][1] != r1[0][1]


@pytest.mark.parametrize("workers", [0, 2])
def test_seeded_draws_resume_the_dataloader_stream_exactly(workers):
    from monai.data import CacheDataset
    from monai.transforms import Compose, RandGaussianNoised, ScaleIntensityd

    from backend.train.data import DrawSampler, SeededDraws

    items = [{"x": torch.full((1, 4, 4), float(i)), "i": i} for i in range(5)]
    ds = CacheDataset(items, Compose([ScaleIntensityd("x", minv=None, maxv=None, factor=0.0),
                                      RandGaussianNoised("x", prob=0.7)]), progress=False)

    def batches(n_draws_done, n):
        schedule = DrawSchedule(len(ds), seed=3).seek(n_draws_done)
        loader = torch.utils.data.DataLoader(SeededDraws(ds), batch_size=2, sampler=DrawSampler(schedule),
                                             num_workers=workers)
        it = iter(loader)
        return [next(it) for _ in range(n)]

    full = batches(0, 7)  # 14 draws: crosses two epoch boundaries (5 items)
    resumed = batches(4 * 2, 3)  # a run stopped after 4 steps of batch 2, resumed
    for a, b in zip(full[4:], resumed):
        assert a["i"].tolist() == b["i"].tolist() and torch.equal(a["x"], b["x"])
    assert sorted(sum((b["i"].tolist() for b in full[:3]), [])[:5]) == list(range(5))  # epochs are permutations


def test_training_loop_logs_on_schedule_and_stops_on_ctrl_c(tmp_path):
    from backend.train.distributed import DistInfo
    from backend.train.loop import TrainingLoop

    step, logged = 0, []
    with TrainingLoop(DistInfo(), tmp_path / "m.csv", step=0, max_steps=7, log_every=3, desc="t") as loop:
        while loop.running(step):
            step += 1
            loop.tick()
            if loop.due(step):
                logged.append(step)
                loop.log(step, {"loss": 1.0 / step})
            if step == 5:
                signal.raise_signal(signal.SIGINT)  # first Ctrl-C: finish the step, then stop
    assert loop.interrupted and step == 5 and logged == [3]
    assert [r["step"] for r in csv.DictReader(open(tmp_path / "m.csv", encoding="utf-8"))] == ["3"]
    assert signal.getsignal(signal.SIGINT) is not loop._stop._handler
    assert not TrainingLoop(DistInfo(rank=1, world_size=2), tmp_path / "r1.csv", step=0, max_steps=3,
                            log_every=1, desc="t").due(3)  # only rank 0 logs
    assert not (tmp_path / "r1.csv").exists()


def test_resume_checkpoint_must_come_from_the_same_stage(tmp_path):
    from backend.train.checkpoint import load_resume_checkpoint

    save_checkpoint(tmp_path / "last.pt", stage="diffusion", config={}, step=3, model={})
    assert load_resume_checkpoint("last", tmp_path / "last.pt", "diffusion")["step"] == 3
    with pytest.raises(DiffTumorError, match=r"last\.pt: not an autoencoder training checkpoint \(stage 'diffusion'\)"):
        load_resume_checkpoint(True, tmp_path / "last.pt", "autoencoder")


def test_graceful_interrupt_sets_flag():
    with GracefulInterrupt() as stop:
        signal.raise_signal(signal.SIGINT)
        assert stop.requested
    assert signal.getsignal(signal.SIGINT) is not stop._handler


def test_setup_single_process_cpu(monkeypatch):
    for k in ("RANK", "WORLD_SIZE", "LOCAL_RANK"):
        monkeypatch.delenv(k, raising=False)
    d = setup_distributed("cpu")
    assert d.is_main and not d.distributed and d.device.type == "cpu"


def test_resume_drops_metrics_rows_logged_after_the_checkpoint(tmp_path):
    """A run killed after its step-3 checkpoint had logged steps 4-5; the resumed run logs them again."""
    from backend.train.distributed import DistInfo
    from backend.train.loop import TrainingLoop

    w = MetricsWriter(tmp_path / "m.csv")
    for s in range(1, 6):
        w.write(s, {"loss": 1.0 / s})
    with TrainingLoop(DistInfo(), tmp_path / "m.csv", step=3, max_steps=5, log_every=1, desc="t") as loop:
        step = 3
        while loop.running(step):
            step += 1
            loop.tick()
            loop.log(step, {"loss": 0.0})
    steps = [r["step"] for r in csv.DictReader(open(tmp_path / "m.csv", encoding="utf-8"))]
    assert steps == ["1", "2", "3", "4", "5"]
    assert not list(tmp_path.glob(".m.csv.tmp*"))


def test_training_loop_removes_the_folder_it_created_when_nothing_was_trained(tmp_path):
    from backend.train.distributed import DistInfo
    from backend.train.loop import TrainingLoop

    out = tmp_path / "run"
    with pytest.raises(DiffTumorError, match="no usable case"):
        with TrainingLoop(DistInfo(), out / "m.csv", step=0, max_steps=3, log_every=1, desc="t"):
            raise DiffTumorError("no usable case")
    assert not out.exists()
    (tmp_path / "kept").mkdir()  # a folder that was there before is left alone
    with pytest.raises(DiffTumorError, match="^no usable case$"):
        with TrainingLoop(DistInfo(), tmp_path / "kept" / "m.csv", step=0, max_steps=3, log_every=1, desc="t"):
            raise DiffTumorError("no usable case")
    assert (tmp_path / "kept").is_dir()


def test_check_resume_names_the_file_and_every_changed_setting(tmp_path):
    from backend.train.checkpoint import check_resume

    ckpt = {"step": 7, "config": {"stage": "early", "data": {"organ": "liver"}},
            "model_config": {"dim": 8, "dim_mults": [1, 2], "channels": 17}}
    same = {"model": {"dim": 8, "dim_mults": (1, 2), "channels": 17}, "stage": "early", "data.organ": "liver", "T": 4}
    assert check_resume("ck.pt", ckpt, same, saved={"T": 4}, max_steps=8) == 7
    changed = {**same, "model": {"dim": 16, "dim_mults": (1, 2), "channels": 17}, "stage": "noearly", "T": 200}
    with pytest.raises(DiffTumorError) as err:
        check_resume("runs/x/checkpoint_last.pt", ckpt, changed, saved={"T": 4}, max_steps=8)
    msg = str(err.value)
    assert msg.startswith("runs/x/checkpoint_last.pt: ") and "\n" not in msg
    assert "model.dim: checkpoint 8, config 16" in msg and "stage: checkpoint early, config noearly" in msg
    assert "T: checkpoint 4, config 200" in msg and "channels" not in msg
    with pytest.raises(DiffTumorError, match="data.organ: checkpoint liver, config kidney"):
        check_resume("ck.pt", ckpt, {**same, "data.organ": "kidney"}, saved={"T": 4}, max_steps=8)
    with pytest.raises(DiffTumorError, match=r"max_steps=7: ck\.pt is already at step 7; nothing to train"):
        check_resume("ck.pt", ckpt, same, saved={"T": 4}, max_steps=7)


@dataclass
class Ranged:
    steps: int = ranged(10, **POSITIVE)
    every: int = ranged(0, **NON_NEGATIVE)
    p: float = ranged(0.5, **PROBABILITY)
    crop: tuple[int, ...] = ranged((8, 8), **POSITIVE)
    scale: float = 1.0  # no declared range: still has to be finite
    inner: Inner = field(default_factory=Inner)


@pytest.mark.parametrize("override, message", [
    ("steps=0", "steps=0: must be a positive integer"),
    ("every=-1", "every=-1: must be 0 or more"),
    ("p=1.5", "p=1.5: must be a probability in [0, 1]"),
    ("p=.nan", "p=nan: must be a finite number"),
    ("crop=[8,0]", "crop=[8, 0]: each value must be a positive integer"),
    ("scale=.inf", "scale=inf: must be a finite number"),
    ("inner.lr=.nan", "inner.lr=nan: must be a finite number"),
])
def test_declared_ranges_are_checked_where_the_config_is_built(override, message):
    with pytest.raises(DiffTumorError, match=f"^{re.escape(message)}$"):
        load_config(Ranged, None, [override])
    assert load_config(Ranged, None, ["steps=1", "every=0", "p=1", "crop=[1]"]).steps == 1


def test_output_dir_is_checked_in_one_line(tmp_path):
    from backend.train.loop import check_output_dir

    (tmp_path / "f.txt").write_text("x")
    with pytest.raises(DiffTumorError, match=r"output_dir=.*f\.txt: exists and is not a folder"):
        check_output_dir(tmp_path / "f.txt")
    assert check_output_dir(tmp_path / "new") == tmp_path / "new"


@pytest.mark.parametrize("content, cause", [
    (b"garbage\n", "not a file of tensors and plain values; nothing in it was run"),
    (None, "truncated or damaged file"),
    # read as torch's legacy format these failed with "KeyError: 1785425525" or "error: unpack requires ..."
    (b"\x80\x02junkjunkjunk", "not a PyTorch file, or damaged"),
    (b"junk", "not a PyTorch file, or damaged"),
])
def test_unreadable_checkpoint_gives_a_short_cause(tmp_path, content, cause):
    path = tmp_path / "c.pt"
    if content is None:
        save_checkpoint(path, stage="x", config={}, step=0, model={"w": torch.zeros(1000)})
        data = path.read_bytes()
        path.write_bytes(data[: len(data) // 2])
    else:
        path.write_bytes(content)
    with pytest.raises(DiffTumorError) as err:
        load_checkpoint(path)
    assert str(err.value) == f"{path}: not a readable DiffTumor checkpoint ({cause})"


@pytest.mark.skipif(torch.cuda.is_available(), reason="needs a machine without CUDA")
def test_device_error_names_the_config_key():
    from backend.train.distributed import start_run

    with pytest.raises(DiffTumorError, match=r"^device=cuda: no CUDA GPU .*; use device=cpu$"):
        start_run("cuda", seed=0)


def test_fresh_run_starts_its_csvs_afresh_and_writes_its_config(tmp_path):
    """A fresh run (step 0) in a folder where an earlier attempt logged rows but never saved a checkpoint used
    to append to that attempt's CSVs."""
    from dataclasses import dataclass

    from backend.train.distributed import DistInfo
    from backend.train.loop import TrainingLoop

    @dataclass
    class Cfg:
        lr: float = 1e-3
        name: str = "run"

    for path in (tmp_path / "m.csv", tmp_path / "val_metrics.csv"):
        w = MetricsWriter(path)
        for s in (1, 2, 3):
            w.write(s, {"old": 1.0})
    with TrainingLoop(DistInfo(), tmp_path / "m.csv", step=0, max_steps=2, log_every=1, desc="t", config=Cfg(),
                      validation=True) as loop:
        step = 0
        while loop.running(step):
            step += 1
            loop.tick()
            loop.log(step, {"loss": 0.5})
        loop.log_validation(step, {"val_dsc": 0.25})
    rows = list(csv.DictReader(open(tmp_path / "m.csv", encoding="utf-8")))
    assert [(r["step"], r["loss"]) for r in rows] == [("1", "0.5"), ("2", "0.5")] and "old" not in rows[0]
    rows = list(csv.DictReader(open(tmp_path / "val_metrics.csv", encoding="utf-8")))
    assert rows == [{"step": "2", "val_dsc": "0.25"}]
    assert load_config(Cfg, tmp_path / "config.yaml") == Cfg()


def test_fresh_run_over_a_checkpoint_is_refused(tmp_path):
    from backend.train.checkpoint import refuse_fresh_run_over

    refuse_fresh_run_over(tmp_path / "last.pt", "out_dir")  # nothing there: fine
    save_checkpoint(tmp_path / "last.pt", stage="segmentation", config={}, step=3, model={})
    with pytest.raises(DiffTumorError, match=r"out_dir=.*: holds last\.pt of an earlier run; add --resume"):
        refuse_fresh_run_over(tmp_path / "last.pt", "out_dir")


def test_log_lines_do_not_break_the_progress_bar(tmp_path, monkeypatch):
    """While the loop runs, console log lines go through tqdm.write (above the bar), not into the bar's line."""
    import logging

    import tqdm

    from backend.train.distributed import DistInfo
    from backend.train.loop import TrainingLoop

    written = []
    monkeypatch.setattr(tqdm.tqdm, "write", classmethod(lambda cls, s, file=None, end="\n", nolock=False:
                                                       written.append(s)))
    root = logging.getLogger()
    handler = logging.StreamHandler()
    root.addHandler(handler)
    try:
        with TrainingLoop(DistInfo(), tmp_path / "m.csv", step=0, max_steps=1, log_every=1, desc="t") as loop:
            logging.getLogger("backend.test").warning("skipping a case")
            loop.tick()
    finally:
        root.removeHandler(handler)
    assert any("skipping a case" in s for s in written)


class _RecordingScaler:
    """Stands in for an enabled torch.amp.GradScaler (CUDA only) and records the calls of one step."""

    def __init__(self):
        self.calls = []

    def scale(self, loss):
        self.calls.append("scale")
        return loss * 4.0

    def unscale_(self, optimizer):
        self.calls.append("unscale")
        for group in optimizer.param_groups:
            for p in group["params"]:
                p.grad.div_(4.0)

    def step(self, optimizer):
        self.calls.append("step")
        optimizer.step()

    def update(self):
        self.calls.append("update")


def test_optimizer_step_backpropagates_clips_steps_and_updates_the_scaler():
    from backend.train.loop import optimizer_step

    model = torch.nn.Linear(3, 1, bias=False)
    with torch.no_grad():
        model.weight.fill_(1.0)
    opt = torch.optim.SGD(model.parameters(), lr=1.0)
    model.weight.grad = torch.full_like(model.weight, 100.0)  # stale: zeroed before the backward pass
    scaler, hook = _RecordingScaler(), []
    loss = (model(torch.tensor([[3.0, 0.0, 4.0]])) ** 1).sum()  # d loss / d w = (3, 0, 4), norm 5
    optimizer_step(opt, list(model.parameters()), loss=loss, scaler=scaler, clip=1.0,
                   before_unscale=lambda: hook.append(model.weight.grad.clone()))
    assert scaler.calls == ["scale", "unscale", "step", "update"]
    assert torch.allclose(hook[0], torch.tensor([[12.0, 0.0, 16.0]]))  # scaled gradient, before unscaling
    assert torch.allclose(model.weight, torch.tensor([[1 - 0.6, 1.0, 1 - 0.8]]))  # clipped to norm 1, then SGD

    # no loss: the gradients are already accumulated; no clipping at clip=0; update=False leaves the scaler
    model.weight.grad = torch.tensor([[10.0, 0.0, 0.0]])
    scaler = _RecordingScaler()
    optimizer_step(opt, list(model.parameters()), scaler=scaler, clip=0.0, update=False)
    assert scaler.calls == ["step"] and torch.allclose(model.weight, torch.tensor([[0.4 - 10.0, 1.0, 0.2]]))
    optimizer_step(opt, list(model.parameters()))  # fp32 without a scaler: a plain step
    assert torch.allclose(model.weight, torch.tensor([[0.4 - 20.0, 1.0, 0.2]]))
