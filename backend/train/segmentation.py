"""`difftumor train segmentation`: tumour segmentation trained with tumours synthesized on the fly.

Reads top to bottom: config, device/seed, data (k-fold split saved as ``splits.json``; a seeded,
resumable draw stream, see :class:`~backend.train.data.SeededDraws`), transforms
(appendix E.2 + :class:`~backend.segmentation.transforms.RandTumorSynthesisd` in the DataLoader
workers), model (new or resumed), optimizer (AdamW + linear warm-up / cosine), validation helper,
loop. Outputs in ``out_dir``: ``config.yaml``, ``splits.json``, ``last.pt`` / ``best.pt``,
``metrics.csv`` (step, loss, lr, synthetic fraction) and ``val_metrics.csv`` (tumour/organ DSC).

The paper's settings are config switches (README "Stage 3"):

* real only: ``synthesis.enabled=false`` (and no ``data.healthy``);
* real + synthetic: ``data.healthy=DIR`` with ``synthesis.enabled=true``;
* synthetic only: ``data.use_real_for_training=false`` (real tumours are used for validation only);
* cross-organ: ``organ=pancreas synthesis.method=diffusion synthesis.weights_organ=liver``.

Multi-GPU: ``torchrun --nproc_per_node N $(which difftumor) train segmentation --config ...`` (rank 0
writes the split, logs, validates and saves; checked on CPU with 2 gloo processes).
"""

from __future__ import annotations

import logging
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal

import torch
import yaml

from backend.checkpoint import save_checkpoint
from backend.errors import DiffTumorError
from backend.segmentation.networks import NetworkConfig
from backend.train.checkpoint import (
    check_resume,
    load_resume_checkpoint,
    refuse_fresh_run_over,
    resume_lr_scheduler,
    resume_path,
    rng_state,
    set_rng_state,
)
from backend.train.config import NON_NEGATIVE, POSITIVE, PROBABILITY, RangeChecked, config_to_dict, ranged
from backend.train.data import DrawSampler, DrawSchedule, SeededDraws
from backend.train.distributed import start_run, wrap_ddp
from backend.train.loop import (
    MetricsWriter,
    TrainingLoop,
    amp_dtype,
    autocast,
    check_output_dir,
    grad_scaler,
    optimizer_step,
)
from backend.train.segmentation_data import (
    CaseErrors,
    build_items,
    build_transforms,
    check_items,
    user_error,
    write_skipped,
)

log = logging.getLogger(__name__)

LABEL = {"ge": 0, "why": "label values are whole numbers >= 0"}


@dataclass
class DataConfig(RangeChecked):
    real: str | None = None  # CTs with real tumours: MSD dataset.json, LiTS/KiTS folder list file, AbdomenAtlas tree
    healthy: str | None = None  # healthy CTs (+ organ labels) that receive synthetic tumours
    organ_values: list[int] = ranged(default_factory=lambda: [1], **LABEL)  # raw organ label values in `real`
    tumor_values: list[int] = ranged(default_factory=lambda: [2], **LABEL)  # raw tumour values in `real` (KiTS: +3)
    healthy_organ_values: list[int] | None = ranged(None, **LABEL)  # raw organ values in `healthy` (None: organ_values;
    # TotalSegmentator liver: [5])
    # CTs with tumours synthesized beforehand (`difftumor synthesize --ct DIR --n K --out DIR`, labels 1 organ /
    # 2 tumour): extra training cases, never validated, no on-the-fly synthesis (keeps it off the training step)
    presynthesized: str | None = None
    use_real_for_training: bool = True  # false = "synthetic only": real cases only validate
    folds: int = ranged(5, ge=1, why="must be >= 1")  # k of the k-fold split of the real cases (1 = no validation)
    fold: int = ranged(0)  # 0 .. folds - 1 (checked against data.folds)
    split_seed: int = ranged(0)  # any whole number
    split_file: str | None = None  # reuse an existing splits.json instead of drawing one
    pos_neg: list[float] = ranged(default_factory=lambda: [1.0, 1.0], ge=0.0,  # RandCropByPosNegLabel pos : neg
                                  why="needs [pos, neg] crop weights, >= 0 and not both 0, e.g. [1, 1]")
    # healthy crops need > 4/3·π·R³ organ voxels (None: release R per organ)
    foreground_radius: float | None = ranged(None, gt=0.0, why="must be > 0 mm (or null for the release's radius)")
    crop_tries: int = ranged(30, ge=1, why="must be >= 1")  # healthy-crop retries before the last crop is kept
    cache_rate: float = ranged(0.0, **PROBABILITY)  # fraction of the deterministic preprocessing cached in memory
    num_workers: int = ranged(4, ge=0, why="must be 0 (load in the main process) or more")  # DataLoader workers


@dataclass
class SynthesisConfig(RangeChecked):
    enabled: bool = True
    method: Literal["model-based", "diffusion"] = "model-based"
    prob: float = ranged(0.5, **PROBABILITY)  # release: a healthy crop gets a tumour with p 0.5
    stage_probs: list[float] = ranged(default_factory=lambda: [0.8, 0.1, 0.1], ge=0.0,  # early / mid / large
                                      why="needs 3 probabilities (early, mid, large) >= 0 summing to 1")
    weights_dir: str | None = None  # diffusion weights folder (None: $DIFFTUMOR_WEIGHTS / user config)
    weights_organ: str | None = None  # cross-organ: use this organ's diffusion weights (None: `organ`)
    device: str = "cpu"  # where the workers run the diffusion model ("cuda" needs spawn workers)
    # push the tissue aside (labels warped with it): auto = model-based tumours of 20 mm and more, none for diffusion
    mass_effect: Literal["auto", "on", "off"] = "auto"


@dataclass
class SegmentationConfig(RangeChecked):
    organ: str = "liver"
    out_dir: str = "runs/segmentation"
    network: NetworkConfig = field(default_factory=NetworkConfig)
    data: DataConfig = field(default_factory=DataConfig)
    synthesis: SynthesisConfig = field(default_factory=SynthesisConfig)
    roi_size: list[int] = ranged(default_factory=lambda: [96, 96, 96], ge=1, le=512,
                                 why="needs 3 crop sizes of 1 to 512 (x, y, z voxels at 1 mm), e.g. [96, 96, 96]")
    hu_range: list[float] = ranged(default_factory=lambda: [-175.0, 250.0], ge=-2000.0, le=4000.0)  # -> [0, 1]
    rotate90_prob: float = ranged(0.1, **PROBABILITY)
    shift_intensity: float = ranged(0.1, **NON_NEGATIVE)
    shift_intensity_prob: float = ranged(0.2, **PROBABILITY)
    batch_size: int = ranged(2, **POSITIVE)  # per process
    lr: float = ranged(2e-4, gt=0.0)
    weight_decay: float = ranged(1e-5, **NON_NEGATIVE)
    warmup_steps: int = ranged(500, **NON_NEGATIVE)  # linear warm-up, then cosine annealing to 0 at max_steps
    max_steps: int = ranged(40000, **POSITIVE)
    grad_clip: float = ranged(12.0, **NON_NEGATIVE)  # max gradient norm (0: off)
    amp: bool = True  # bfloat16/float16 autocast on CUDA
    val_every: int = ranged(2000, **NON_NEGATIVE)  # steps (0: never)
    # sliding-window overlap during validation (release 0.5)
    val_overlap: float = ranged(0.5, ge=0.0, lt=1.0, why="sliding-window overlap must be in [0, 1)")
    save_every: int = ranged(1000, **POSITIVE)
    log_every: int = ranged(20, **POSITIVE)
    seed: int = ranged(0)  # any whole number
    device: str = "auto"


# ------------------------------------------------------------------------------------- checks
def check_config(cfg: SegmentationConfig) -> None:
    """Refuse, in one line naming the key, a setting that would fail (or silently mislead) later: in the
    middle of training, in a DataLoader worker, or at the first validation after hours of training. Each
    setting's own range is checked when the config is built; these checks involve two settings or other code."""
    from backend.organs import parse_organ

    def bad(key: str, value, why: str):
        raise DiffTumorError(f"{key}={value}: {why}")

    def organ_name(key: str, value: str):
        try:
            parse_organ(value)
        except DiffTumorError as exc:
            raise DiffTumorError(f"{key}={value}: {exc}") from None

    organ_name("organ", cfg.organ)
    if len(cfg.roi_size) != 3:
        bad("roi_size", list(cfg.roi_size), "needs 3 positive crop sizes (x, y, z voxels at 1 mm), e.g. [96, 96, 96]")
    try:  # the network's own checks (SwinUNETR: multiples of 32) with the crop size training will use
        NetworkConfig(**{**cfg.network.__dict__, "roi_size": tuple(cfg.roi_size)})
    except ValueError as exc:
        raise DiffTumorError(f"network.name={cfg.network.name}: {exc}") from None
    if len(cfg.hu_range) != 2 or not cfg.hu_range[0] < cfg.hu_range[1]:
        bad("hu_range", list(cfg.hu_range), "needs [low, high] Hounsfield units with low < high, e.g. [-175, 250]")
    d = cfg.data
    if len(d.pos_neg) != 2 or max(d.pos_neg) <= 0:
        bad("data.pos_neg", list(d.pos_neg), "needs [pos, neg] crop weights, >= 0 and not both 0, e.g. [1, 1]")
    if d.split_file is None and not 0 <= d.fold < max(d.folds, 1):
        bad("data.fold", d.fold, f"must be 0..{d.folds - 1} with data.folds={d.folds}")
    if not d.organ_values:
        bad("data.organ_values", list(d.organ_values), "needs at least one organ label value, e.g. [1]")
    common_values = sorted(set(d.organ_values) & set(d.tumor_values))
    if common_values:
        raise DiffTumorError(f"data.organ_values={list(d.organ_values)} and data.tumor_values={list(d.tumor_values)}: "
                             f"{common_values} in both; a label value is either organ or tumour")
    s = cfg.synthesis
    if len(s.stage_probs) != 3 or not math.isclose(sum(s.stage_probs), 1.0, abs_tol=1e-6):
        bad("synthesis.stage_probs", list(s.stage_probs), "needs 3 probabilities (early, mid, large) >= 0 summing to 1")
    if s.weights_organ is not None:
        organ_name("synthesis.weights_organ", s.weights_organ)


def check_diffusion_weights(cfg: SegmentationConfig) -> str | None:
    """With ``synthesis.method=diffusion``: the weights folder and the files the drawn stages need, checked
    before training starts (the DataLoader would otherwise fail at the first synthetic crop). Returns a
    line for the log, or None when the diffusion method is not used."""
    from backend.organs import parse_organ
    from backend.weights import AE_NAME, WEIGHT_ORGANS, WeightsFolder, resolve_weights_dir, weight_organ

    s = cfg.synthesis
    if not s.enabled or s.method != "diffusion" or not cfg.data.healthy:  # synthesis only touches healthy CTs
        return None
    organ = parse_organ(s.weights_organ or cfg.organ)
    if weight_organ(organ) not in WEIGHT_ORGANS:
        raise DiffTumorError(f"synthesis.method=diffusion: no diffusion weights exist for {organ} (released: "
                             f"{', '.join(WEIGHT_ORGANS)}); set synthesis.weights_organ or "
                             "synthesis.method=model-based")
    folder = WeightsFolder(*resolve_weights_dir(s.weights_dir, what="synthesis.weights_dir"))
    if folder.root is None:
        raise DiffTumorError("synthesis.method=diffusion: no weights folder found (set synthesis.weights_dir=DIR or "
                             "$DIFFTUMOR_WEIGHTS, or run 'difftumor weights fetch'); "
                             "synthesis.method=model-based needs none")
    stages = [st for st, p in (("early", s.stage_probs[0]), ("mid_late", s.stage_probs[1] + s.stage_probs[2])) if p > 0]
    missing = sorted({n for st in stages for n in folder.missing(organ, st)}, key=lambda n: (n != AE_NAME, n))
    if missing:
        where = "synthesis.weights_dir" if folder.source == "argument" else folder.source
        raise DiffTumorError(f"weights folder {folder.root} (from {where}): lacks {', '.join(missing)}, needed for "
                             f"{organ} tumours with synthesis.method=diffusion")
    return f"diffusion synthesis with {organ} weights from {folder.root} ({folder.source})"


# --------------------------------------------------------------------------------- validation
@torch.no_grad()
def validate(model, items, cfg: SegmentationConfig, device) -> dict:
    """Mean tumour / organ DSC on whole validation CTs in model space (sliding window)."""
    from monai.data import Dataset
    from monai.inferers import sliding_window_inference

    from backend.segmentation.metrics import dice

    model.eval()
    tf = build_transforms(cfg, train=False)
    tumour, organ = [], []
    for item, d in zip(items, Dataset(items, tf)):
        if not bool(d["label"].any()):  # no organ and no tumour: would score 1 or 0 for nothing
            if item["name"] not in _EMPTY_WARNED:
                _EMPTY_WARNED.add(item["name"])
                organ_values, tumor_values = item["label_values"]
                log.warning("validation case %s: label %s holds none of the organ values %s / tumour values %s; "
                            "not scored", item["name"], item["label"], list(organ_values), list(tumor_values))
            continue
        x = d["image"][None].to(device)
        logits = sliding_window_inference(x, cfg.roi_size, 2, model, overlap=cfg.val_overlap, mode="gaussian")
        pred = logits.argmax(1)[0].cpu().numpy()
        lab = d["label"][0].numpy()
        tumour.append(dice(pred == 2, lab == 2))
        organ.append(dice(pred >= 1, lab >= 1))
    model.train()
    mean = lambda v: float(sum(v) / len(v)) if v else float("nan")  # noqa: E731
    return {"val_tumor_dsc": mean(tumour), "val_organ_dsc": mean(organ), "val_cases": len(tumour)}


_EMPTY_WARNED: set[str] = set()  # validation cases already reported as empty (once per process)


# --------------------------------------------------------------------------------------- main
def read_resume(cfg: SegmentationConfig, resume, last_path: Path) -> dict | None:
    """The ``--resume`` checkpoint, checked before anything is written (same network, organ and training /
    validation cases, steps left to train), or None for a fresh run, which may not overwrite an earlier one."""
    if not resume:  # a fresh run would overwrite the earlier run's checkpoints and mix its CSVs
        refuse_fresh_run_over(last_path, "out_dir")
        return None
    ckpt = load_resume_checkpoint(resume, last_path, "segmentation")
    # (another fold, or real cases left out of training, would train on cases the run validated on)
    check_resume(resume_path(resume, last_path), ckpt,
                 {"model": config_to_dict(cfg.network), "organ": cfg.organ, "data.fold": cfg.data.fold,
                  "data.use_real_for_training": cfg.data.use_real_for_training}, max_steps=cfg.max_steps)
    return ckpt


def log_synthesis(cfg: SegmentationConfig, logger) -> None:
    note = check_diffusion_weights(cfg)
    if note:
        logger.info("%s", note)
    elif cfg.synthesis.enabled and cfg.synthesis.weights_organ:
        logger.warning("synthesis.weights_organ=%s is read by the diffusion method only; synthesis.method=%s "
                       "ignores it (the cross-organ setting needs synthesis.method=diffusion)",
                       cfg.synthesis.weights_organ, cfg.synthesis.method)


def prepare_cases(cfg: SegmentationConfig, out_dir: Path, dist, logger, *, fresh: bool):
    """(train items, val items). Rank 0 draws (or reuses) the split and writes ``splits.json``, ``config.yaml``
    and ``skipped.csv`` (cases whose label is not on the CT's grid, or that cannot be read, are left out with a
    warning); the other ranks then read the same split."""
    from backend.io import write_text_atomic
    from backend.segmentation.splits import save_splits

    if dist.is_main:
        train_items, val_items, splits = build_items(cfg, out_dir, write=False)
        train_items, skipped = check_items(train_items)
        val_items, skipped_val = check_items(val_items)
        skipped = [(c, "train", r) for c, r in skipped] + [(c, "validation", r) for c, r in skipped_val]
        for case, role, reason in skipped:
            logger.warning("skipped %s case %s: %s", role, case, reason)
        if not train_items:
            raise DiffTumorError(f"data: none of the training cases can be used (first: {skipped[0][0]}: "
                                 f"{skipped[0][2]})")
        out_dir.mkdir(parents=True, exist_ok=True)
        save_splits(splits, out_dir / "splits.json")
        write_text_atomic(out_dir / "config.yaml", yaml.safe_dump(config_to_dict(cfg), sort_keys=False))
        write_skipped(out_dir / "skipped.csv", skipped)
        if fresh:  # rows of an earlier attempt that crashed before its first checkpoint go
            for name in ("metrics.csv", "val_metrics.csv"):
                MetricsWriter(out_dir / name).truncate_after(0)
    if dist.distributed:
        torch.distributed.barrier()
    if not dist.is_main:
        train_items, val_items, _ = build_items(cfg, out_dir, write=False)
        train_items, val_items = check_items(train_items)[0], check_items(val_items)[0]
    return train_items, val_items


def make_loader(cfg: SegmentationConfig, items: list[dict], dist, draws: int):
    """A DataLoader over a seeded, resumable stream of draws: each draw reseeds the random transforms (crop,
    augmentation, synthesis), so a resumed run sees exactly the data an uninterrupted one would have seen."""
    from monai.data import CacheDataset, DataLoader, Dataset

    tf = build_transforms(cfg, train=True)
    ds = (CacheDataset(items, tf, cache_rate=cfg.data.cache_rate, num_workers=cfg.data.num_workers or None,
                       progress=False) if cfg.data.cache_rate > 0 else Dataset(items, tf))
    schedule = DrawSchedule(len(ds), seed=cfg.seed, rank=dist.rank, world_size=dist.world_size).seek(draws)
    workers = cfg.data.num_workers
    return DataLoader(SeededDraws(CaseErrors(ds, items)), batch_size=cfg.batch_size, sampler=DrawSampler(schedule),
                      num_workers=workers, persistent_workers=workers > 0, pin_memory=dist.device.type == "cuda",
                      # CUDA in worker processes (diffusion synthesis on the GPU) needs spawned workers
                      multiprocessing_context="spawn" if cfg.synthesis.device.startswith("cuda") and workers else None)


class Segmenter:
    """The trained state: network, AdamW with linear warm-up + cosine, loss, AMP (new or resumed)."""

    def __init__(self, cfg: SegmentationConfig, device, ckpt: dict | None, logger, source: Path):
        from monai.losses import DiceCELoss
        from monai.optimizers import WarmupCosineSchedule

        from backend.segmentation.networks import build_network

        self.model = build_network(cfg.network).to(device)
        self.opt = torch.optim.AdamW(self.model.parameters(), lr=cfg.lr, weight_decay=cfg.weight_decay)
        self.sched = WarmupCosineSchedule(self.opt, warmup_steps=min(cfg.warmup_steps, max(cfg.max_steps - 1, 0)),
                                          t_total=cfg.max_steps)
        self.step, self.best = 0, -1.0
        if ckpt is not None:
            self.model.load_state_dict(ckpt["model"])
            self.opt.load_state_dict(ckpt["optimizer"])
            # the schedule follows this run's max_steps / warm-up / lr, continued at the saved step
            changed = resume_lr_scheduler(self.sched, ckpt["scheduler"])
            self.step, self.best = int(ckpt["step"]), float(ckpt.get("best", -1.0))
            set_rng_state(ckpt["rng"])
            logger.info("resumed from %s at step %d", source, self.step)
            if changed:
                logger.info("learning-rate schedule rebuilt for the current config (%s)", ", ".join(changed))
        self.loss = DiceCELoss(to_onehot_y=True, softmax=True, squared_pred=True, smooth_nr=0.0, smooth_dr=1e-6)
        self.amp = amp_dtype(device, cfg.amp, prefer_bf16=True)
        self.scaler = grad_scaler(device, cfg.amp, self.amp or torch.float16)

    def train_step(self, net, batch: dict, cfg: SegmentationConfig, device) -> float:
        x = batch["image"].to(device, non_blocking=True)  # (B, 1, X, Y, Z) in [0, 1]
        y = batch["label"].to(device, non_blocking=True)  # (B, 1, X, Y, Z) in {0, 1, 2}
        with autocast(device, self.amp):
            loss = self.loss(net(x), y)
        optimizer_step(self.opt, self.model.parameters(), loss=loss, scaler=self.scaler, clip=cfg.grad_clip)
        self.sched.step()
        self.step += 1
        if not math.isfinite(loss.item()):
            raise DiffTumorError(f"training diverged at step {self.step} (loss {loss.item()}); lower lr")
        return loss.item()


def next_batch(batches) -> dict:
    try:
        return next(batches)
    except Exception as exc:  # a worker's DiffTumorError arrives as text with its traceback
        cause = user_error(exc)
        if cause is None:
            raise
        raise DiffTumorError(cause) from None


def train(cfg: SegmentationConfig, *, resume: bool | str | None = None) -> dict:
    # config, device, seed: every check before anything is written
    check_config(cfg)
    out_dir = check_output_dir(cfg.out_dir, "out_dir")
    dist, logger = start_run(cfg.device, seed=cfg.seed, logger_name=__name__)
    last_path, best_path = out_dir / "last.pt", out_dir / "best.pt"
    cfg.network = NetworkConfig(**{**cfg.network.__dict__, "roi_size": tuple(cfg.roi_size)})
    ckpt = read_resume(cfg, resume, last_path)
    log_synthesis(cfg, logger)

    # data: the split, and a seeded resumable stream of draws through the DataLoader workers
    train_items, val_items = prepare_cases(cfg, out_dir, dist, logger, fresh=ckpt is None)
    draws = int(ckpt.get("draws", 0)) if ckpt is not None else 0
    batches = iter(make_loader(cfg, train_items, dist, draws))
    logger.info("training on %d cases (%d healthy), validating on %d; fold %d", len(train_items),
                sum(i["healthy"] for i in train_items), len(val_items), cfg.data.fold)

    # model, new or resumed
    seg = Segmenter(cfg, dist.device, ckpt, logger, last_path)
    net = wrap_ddp(seg.model, dist)

    def save(path: Path):
        save_checkpoint(path, stage="segmentation", config=config_to_dict(cfg),
                        model_config=config_to_dict(cfg.network), organ=cfg.organ, step=seg.step, best=seg.best,
                        model=seg.model.state_dict(), optimizer=seg.opt.state_dict(), scheduler=seg.sched.state_dict(),
                        rng=rng_state(), draws=draws)

    # loop
    val_writer = MetricsWriter(out_dir / "val_metrics.csv") if dist.is_main else None
    if val_writer is not None and seg.step > 0:
        val_writer.truncate_after(seg.step)  # validations after the checkpoint are run again
    run_loss, run_syn, n_run = 0.0, 0.0, 0
    result = {"step": seg.step, "best": seg.best}
    with TrainingLoop(dist, out_dir / "metrics.csv", step=seg.step, max_steps=cfg.max_steps, log_every=cfg.log_every,
                      desc="segmentation") as loop:
        while loop.running(seg.step):
            batch = next_batch(batches)
            draws += batch["image"].shape[0]
            run_loss += seg.train_step(net, batch, cfg, dist.device)
            run_syn += float(batch["synthetic"].float().mean()) if "synthetic" in batch else 0.0
            n_run += 1
            loop.tick()
            step = seg.step
            if loop.due(step):
                row = {"loss": run_loss / n_run, "lr": seg.sched.get_last_lr()[0],
                       "synthetic_fraction": run_syn / n_run}
                loop.log(step, row, loss=f"{row['loss']:.4f}")
                result.update(row)
                run_loss, run_syn, n_run = 0.0, 0.0, 0
            if cfg.val_every and val_items and (step % cfg.val_every == 0 or step == cfg.max_steps) and dist.is_main:
                metrics = validate(seg.model, val_items, cfg, dist.device)
                val_writer.write(step, metrics)
                result.update(metrics)
                if metrics["val_tumor_dsc"] > seg.best:
                    seg.best = metrics["val_tumor_dsc"]
                    save(best_path)
            if dist.is_main and (step % cfg.save_every == 0):
                save(last_path)
        if dist.is_main:
            save(last_path)
            if not best_path.is_file():
                save(best_path)
            val_writer.close()
    result.update(step=seg.step, best=seg.best, out_dir=str(out_dir), rank=dist.rank, interrupted=loop.interrupted)
    return result
