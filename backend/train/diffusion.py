"""`difftumor train diffusion`: stage-2 conditional latent diffusion (official STEP2 recipe, top to bottom).

    difftumor train diffusion --config backend/configs/diffusion.yaml data.source=/data/Task03_Liver stage=early
    difftumor train diffusion --config backend/configs/diffusion.yaml data.source=... stage=noearly [--resume]
    torchrun --nproc_per_node 4 -m backend.cli train diffusion --config ...           (DDP, same options)

Order: config -> device/seed -> data (CT + label map -> RAS 1 mm, HU window, tumours split by stage,
crops centred on organ or tumour) -> frozen autoencoder -> denoiser (new or resumed) + EMA -> Adam ->
loop (gradient accumulation, EMA every 10 steps with warm start, metrics, checkpoints).

Stage split (TNM T1 as in the paper): a tumour = one connected component of the tumour labels; it is
*early* when its largest diameter is < ``early_diameter_mm`` (20 mm), otherwise mid/late
(:func:`backend.synthesis.stage.stage_of`, the rule synthesis uses). ``stage=early``
trains the T = 4 model on early tumours, ``stage=noearly`` the T = 200 model on the others; the mask of a
crop covers the tumours of the chosen stage (tumours of the other stage stay visible as context).

Outputs in ``output_dir``: ``checkpoint_last.pt`` (our format, for ``--resume``), ``{organ}_{stage}.pt``
(the released layout {step, model, ema, scaler}: usable wherever the released files are, by this
package and by the authors' loader), ``metrics.csv``, ``config.yaml`` (the settings of the latest run).
Cross-organ use: ``data.organ`` only names the training data; the weights file can be loaded for any organ
(paper section 4.2), e.g. copy
``liver_early.pt`` to ``pancreas_early.pt`` in a weights folder to synthesise pancreatic tumours with it.
"""

from __future__ import annotations

import contextlib
import copy
import logging
from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal

import numpy as np
import torch

from backend.checkpoint import load_checkpoint, save_checkpoint
from backend.diffusion.ddpm import DDPMScheduler
from backend.diffusion.inferer import DiffusionInferer, LossType, encode_condition, encode_latent
from backend.diffusion.official import save_official
from backend.diffusion.schedule import PredictionType
from backend.diffusion.unet import Unet3D, Unet3DConfig
from backend.errors import DiffTumorError
from backend.train.checkpoint import (
    check_resume,
    load_resume_checkpoint,
    rank_rng_states,
    refuse_fresh_run_over,
    restore_rank_rng_state,
    resume_path,
)
from backend.train.config import CROP_VOXELS, NON_NEGATIVE, POSITIVE, PROBABILITY, RangeChecked, config_to_dict, ranged
from backend.train.data import DrawSchedule, next_batch
from backend.train.distributed import start_run, wrap_ddp
from backend.train.loop import TrainingLoop, check_output_dir, optimizer_step
from backend.weights import WEIGHT_ORGANS

log = logging.getLogger(__name__)

Stage = Literal["early", "noearly"]
Organ = Literal[WEIGHT_ORGANS]  # the organs whose {organ}_{stage}.pt a weights folder is read for
DEFAULT_T = {"early": 4, "noearly": 200}  # released models


@dataclass
class DataConfig(RangeChecked):
    source: str = ""  # MSD dataset.json, list file (image,label) or AbdomenAtlas tree; labels required
    organ: Organ = "liver"  # organ of the training data (names the output file; weights work for any organ)
    organ_labels: tuple[int, ...] = ranged((1,), **NON_NEGATIVE)  # label ids of the organ (MSD / LiTS / KiTS: 1)
    tumor_labels: tuple[int, ...] = ranged((2,), **NON_NEGATIVE)  # label ids of the tumour (MSD / LiTS / KiTS: 2)
    crop_size: tuple[int, int, int] = ranged((96, 96, 96), **CROP_VOXELS)  # (X, Y, Z) in RAS; divisible by the AE's factor
    spacing: tuple[float, float, float] = ranged((1.0, 1.0, 1.0), gt=0.0)  # mm
    hu_min: float = ranged(-175.0, ge=-2000.0, le=4000.0)  # HU window -> [-1, 1]
    hu_max: float = ranged(250.0, ge=-2000.0, le=4000.0)
    crop_ratios: tuple[float, float, float] = ranged((0.0, 1.0, 1.0), **NON_NEGATIVE)  # centre on bg / organ / tumour
    rotate90_prob: float = ranged(0.1, **PROBABILITY)
    batch_size: int = ranged(2, **POSITIVE)  # crops per micro-batch
    cache: bool = True  # keep preprocessed volumes in memory


@dataclass
class OptimConfig(RangeChecked):
    lr: float = ranged(1e-4, gt=0.0)
    grad_accum: int = ranged(2, **POSITIVE)  # micro-batches per optimizer step
    ema_decay: float = ranged(0.995, ge=0.0, le=1.0)
    ema_every: int = ranged(10, **POSITIVE)  # EMA update period (optimizer steps)
    ema_start: int = ranged(2000, **NON_NEGATIVE)  # before this step the EMA is a plain copy of the online weights
    grad_clip: float = ranged(0.0, **NON_NEGATIVE)  # 0 = no clipping (released)


@dataclass
class DiffusionTrainConfig(RangeChecked):
    output_dir: str = "runs/diffusion"
    autoencoder: str = ""  # frozen stage-1 weights: official AutoencoderModel.ckpt or one of ours
    stage: Stage = "early"
    timesteps: int = ranged(0, **NON_NEGATIVE)  # 0 = released default for the stage (early 4, noearly 200)
    early_diameter_mm: float = ranged(20.0, gt=0.0)  # tumours with largest diameter below this are "early" (TNM T1; stage_of)
    prediction_type: PredictionType = "epsilon"  # epsilon as released; "sample" = x0 as the paper states
    loss: LossType = "l1"
    seed: int = ranged(1234)  # any whole number
    device: str = "auto"
    max_steps: int = ranged(60000, **POSITIVE)
    log_every: int = ranged(10, **POSITIVE)
    checkpoint_every: int = ranged(1000, **POSITIVE)
    threads: int = ranged(0, **NON_NEGATIVE)  # CPU threads (0 = torch default)
    tensorboard: bool = True
    model: Unet3DConfig = field(default_factory=Unet3DConfig)
    data: DataConfig = field(default_factory=DataConfig)
    optim: OptimConfig = field(default_factory=OptimConfig)

    @property
    def T(self) -> int:
        return self.timesteps or DEFAULT_T[self.stage]


# ---------------------------------------------------------------------------------------- data
def tumour_components(mask: np.ndarray, spacing) -> tuple[np.ndarray, list[dict]]:
    """Connected components (26-connectivity) of a boolean mask with their largest extent in mm."""
    from scipy import ndimage

    labels, n = ndimage.label(mask, structure=np.ones((3, 3, 3), bool))
    comps = []
    for i, sl in enumerate(ndimage.find_objects(labels), start=1):
        extent = [(s.stop - s.start) * float(sp) for s, sp in zip(sl, spacing)]
        comps.append({"id": i, "diameter_mm": max(extent), "extent_vox": [s.stop - s.start for s in sl]})
    return labels, comps


class TumourCropStore:
    """Training cases as (image, stage label) in model space + seeded crops centred on organ or tumour.

    The crop label is 0 background, 1 organ, 2 tumour of the selected stage. Cases without such a
    tumour are skipped and counted (``skipped``), as are unreadable ones and ones whose label map holds
    none of ``data.organ_labels`` (``no_organ``); tumours larger than the crop are dropped from the mask
    with one warning each (``too_large``). :meth:`exhausted` says why, once no case is usable.
    """

    def __init__(self, cases, cfg: DiffusionTrainConfig):
        from monai.transforms import Compose, RandCropByLabelClassesd, RandRotate90d, SpatialPadd

        self.cfg, self.dc = cfg, cfg.data
        self.cases = list(cases)
        self.cache: dict[int, dict] = {}
        self.skipped: dict[int, str] = {}
        self.no_organ: list[int] = []  # cases with a tumour whose label map holds none of data.organ_labels
        self.too_large = 0
        dc = self.dc
        self.pad = SpatialPadd(keys=("image", "label"), spatial_size=dc.crop_size, mode=("minimum", "constant"))
        self.rand = Compose([
            RandCropByLabelClassesd(keys=("image", "label"), label_key="label", spatial_size=dc.crop_size,
                                    ratios=list(dc.crop_ratios), num_classes=3, num_samples=1, warn=False),
            RandRotate90d(keys=("image", "label"), prob=dc.rotate90_prob, spatial_axes=(0, 1)),
        ])

    def __len__(self):
        return len(self.cases)

    def _prepare(self, item: int) -> dict | None:
        from backend.io import check_same_grid, read_image
        from backend.preprocess import hu_to_unit, to_model_space

        case, dc = self.cases[item], self.dc
        if case.label is None:
            return self._skip(item, f"{case.image}: no label map")
        try:
            image = read_image(case.image)
            label = read_image(case.label)
            check_same_grid(image, label, names=("image", "label"))
            ct = to_model_space(image, spacing=dc.spacing)
            lab = to_model_space(label, spacing=dc.spacing, is_label=True).array
        except (DiffTumorError, RuntimeError, OSError) as exc:
            return self._skip(item, " ".join(str(exc).split())[:200])
        tumour = np.isin(lab, dc.tumor_labels)
        if not tumour.any():
            return self._skip(item, f"{case.label}: no tumour (labels {list(dc.tumor_labels)})", expected=True)
        organ = np.isin(lab, dc.organ_labels)
        if not organ.any():  # a wrong data.organ_labels: the crops would be drawn without an organ
            self.no_organ.append(item)
            return self._skip(item, f"{case.label}: no organ voxel (organ labels {list(dc.organ_labels)}; the label "
                                    f"map holds {np.unique(lab).astype(int).tolist()})")
        comps_lab, comps = tumour_components(tumour, dc.spacing)
        from scipy import ndimage

        from backend.synthesis.stage import Stage, stage_of

        boxes = ndimage.find_objects(comps_lab)
        keep = []
        for c in comps:  # the stage rule of synthesis too: largest diameter (backend/synthesis/stage.py)
            box = boxes[c["id"] - 1]
            early = stage_of(comps_lab[box] == c["id"], dc.spacing, self.cfg.early_diameter_mm) is Stage.EARLY
            if early != (self.cfg.stage == "early"):
                continue
            if any(e > s for e, s in zip(c["extent_vox"], dc.crop_size)):
                self.too_large += 1
                log.warning("%s: tumour of extent %s voxels is larger than the crop %s; left out of the mask",
                            case.label, tuple(c["extent_vox"]), tuple(dc.crop_size))
                continue
            keep.append(c["id"])
        if not keep:
            return self._skip(item, f"{case.label}: no {self.cfg.stage} tumour", expected=True)
        stage_label = organ.astype(np.uint8) | tumour.astype(np.uint8)  # organ incl. tumours
        stage_label[np.isin(comps_lab, keep)] = 2
        unit = hu_to_unit(torch.from_numpy(ct.array.astype(np.float32)), window=(dc.hu_min, dc.hu_max))
        return self.pad({"image": unit[None], "label": torch.from_numpy(stage_label)[None]})

    def _skip(self, item: int, reason: str, *, expected: bool = False) -> None:
        """Leave case ``item`` out. A case without a tumour of this stage is ``expected`` (each stage trains on
        part of a dataset): logged at debug level and counted; an unreadable case is a warning."""
        self.skipped[item] = reason
        if expected:
            log.debug("skipping case (%d skipped so far): %s", len(self.skipped), reason)
        else:
            log.warning("skipping case (%d skipped so far): %s", len(self.skipped), reason)
        return None

    def exhausted(self) -> DiffTumorError | None:
        """The error when no case is usable (None while some may be): a wrong organ label is named as such."""
        if len(self.skipped) < len(self):
            return None
        dc = self.dc
        if self.no_organ:
            files = ", ".join(str(self.cases[i].label) for i in self.no_organ[:3])
            files += ", ..." if len(self.no_organ) > 3 else ""
            return DiffTumorError(f"{dc.source}: data.organ_labels={list(dc.organ_labels)}: no label map with a tumour "
                                  f"holds the organ (checked {len(self.no_organ)}: {files}; e.g. "
                                  f"{self.skipped[self.no_organ[0]]})")
        return DiffTumorError(
            f"{dc.source}: none of the {len(self)} cases has a usable {self.cfg.stage} tumour "
            f"(tumour labels {list(dc.tumor_labels)}; e.g. {next(iter(self.skipped.values()))})")

    def crop(self, item: int, draw_id: int) -> tuple[torch.Tensor, torch.Tensor] | None:
        """(image (1, X, Y, Z) in [-1, 1], tumour mask (1, X, Y, Z) {0, 1}) or None for a skipped case."""
        if item in self.skipped:
            return None
        d = self.cache.get(item)
        if d is None:
            d = self._prepare(item)
            if d is None:
                return None
            if self.dc.cache:
                self.cache[item] = d
        self.rand.set_random_state(seed=draw_id % (2**32))
        out = self.rand(d)
        out = out[0] if isinstance(out, list) else out
        image = torch.as_tensor(out["image"]).float()
        mask = (torch.as_tensor(out["label"]) == 2).float()
        return image, mask


def crop_batch(store: TumourCropStore, schedule: DrawSchedule, batch_size: int):
    """(image, mask) each (B, 1, Z, X, Y) in the official permuted layout."""
    got = next_batch(store.crop, schedule, batch_size, exhausted=lambda: store.exhausted())
    perm = (0, 1, 4, 2, 3)  # (B,1,X,Y,Z) -> (B,1,Z,X,Y)
    images, masks = (torch.stack(v).permute(perm).contiguous() for v in zip(*got))
    return images, masks


# ---------------------------------------------------------------------------------------- model
def load_frozen_autoencoder(cfg: DiffusionTrainConfig, device):
    """(VQGAN in eval mode with no gradients, full state to embed in the released-layout file)."""
    from backend.vqgan.official import load_autoencoder_with_extras

    if not cfg.autoencoder:
        raise DiffTumorError("autoencoder: no stage-1 weights given (official AutoencoderModel.ckpt or one of ours)")
    try:
        vq, extras, _ = load_autoencoder_with_extras(cfg.autoencoder)
    except (TypeError, KeyError):  # one of our checkpoints, but its model_config is not a VQGAN's
        stage = load_checkpoint(cfg.autoencoder).get("stage")
        raise DiffTumorError(f"autoencoder={cfg.autoencoder}: is a {stage} training checkpoint, not an autoencoder "
                             "(give AutoencoderModel.ckpt or an autoencoder run's checkpoint_last.pt)") from None
    if vq.config.embedding_dim != cfg.model.out_dim or cfg.model.channels != 2 * cfg.model.out_dim + 1:
        raise DiffTumorError(
            f"{cfg.autoencoder}: autoencoder latent has {vq.config.embedding_dim} channels but model.out_dim="
            f"{cfg.model.out_dim}, model.channels={cfg.model.channels} (need {vq.config.embedding_dim} and "
            f"{2 * vq.config.embedding_dim + 1})"
        )
    embed = {**{k: v.detach().cpu() for k, v in vq.state_dict().items()}, **extras}
    vq.requires_grad_(False)
    return vq.to(device).eval(), embed


def autoencoder_record(path) -> dict:
    """What a diffusion checkpoint records of its frozen autoencoder: the file and its sha256."""
    from backend.weights import sha256_cached

    p = Path(path)
    return {"path": str(p.resolve()), "sha256": sha256_cached(p)}


def check_same_autoencoder(ckpt_path, saved: dict | None, current: dict, logger) -> None:
    """Refuse to resume on another autoencoder's latents (the denoiser learnt the saved one's latent space)."""
    if not saved:
        logger.warning("%s records no autoencoder (written before autoencoder records); resuming on %s, make sure it "
                       "is the one this run was trained with", ckpt_path, current["path"])
        return
    if saved.get("sha256") != current["sha256"]:
        raise DiffTumorError(f"autoencoder={current['path']}: {ckpt_path} was trained with another autoencoder, "
                             f"{saved.get('path')} (sha256 {str(saved.get('sha256'))[:12]}, this one "
                             f"{current['sha256'][:12]}); resume with that file")


@torch.no_grad()
def ema_update(ema: torch.nn.Module, model: torch.nn.Module, decay: float, *, copy_only: bool) -> None:
    """ema <- decay * ema + (1 - decay) * model, or a plain copy during warm start."""
    for e, p in zip(ema.parameters(), model.parameters()):
        if copy_only:
            e.copy_(p)
        else:
            e.lerp_(p, 1.0 - decay)


def check_config(cfg: DiffusionTrainConfig) -> None:
    """The checks that involve two settings (each setting's own range is checked when the config is built)."""
    if not cfg.data.source:
        raise DiffTumorError("data.source: no training data given (MSD dataset.json, list file or AbdomenAtlas tree)")
    if not cfg.data.hu_min < cfg.data.hu_max:
        raise DiffTumorError(f"data.hu_min={cfg.data.hu_min}, data.hu_max={cfg.data.hu_max}: need hu_min < hu_max")


def read_resume(cfg: DiffusionTrainConfig, resume, ckpt_path: Path, device) -> tuple[dict | None, int]:
    """(checkpoint, step) of ``--resume``, checked before any data is read (same denoiser, noise process and
    organ; steps left to train), or (None, 0) for a fresh run, which may not overwrite an earlier run."""
    if not resume:
        refuse_fresh_run_over(ckpt_path, "output_dir")
        return None, 0
    ck = load_resume_checkpoint(resume, ckpt_path, "diffusion", map_location=device)
    same = {"model": cfg.model.to_dict(), "T": cfg.T, "stage": cfg.stage, "prediction_type": cfg.prediction_type,
            "data.organ": cfg.data.organ}
    return ck, check_resume(resume_path(resume, ckpt_path), ck, same, saved={"T": ck.get("timesteps")},
                            max_steps=cfg.max_steps)


def check_crop(cfg: DiffusionTrainConfig, vqgan) -> None:
    """The crop must map to a latent the U-Net's levels can halve."""
    down = vqgan.config.downsample  # (Z, X, Y)
    x, y, z = cfg.data.crop_size
    if any(s % f for s, f in zip((z, x, y), down)) or any((s // f) % 2 ** (len(cfg.model.dim_mults) - 1)
                                                          for s, f in zip((x, y), down[1:])):
        raise DiffTumorError(f"data.crop_size {tuple(cfg.data.crop_size)}: not compatible with the autoencoder "
                             f"factor {tuple(down)} and {len(cfg.model.dim_mults)} U-Net levels")


class Denoiser:
    """The trained state: U-Net, its EMA copy, the noise process (DDPM scheduler + inferer) and Adam."""

    def __init__(self, cfg: DiffusionTrainConfig, device, ck: dict | None):
        self.unet = Unet3D(cfg.model).to(device)
        self.ema = copy.deepcopy(self.unet).eval().requires_grad_(False)
        self.scheduler = DDPMScheduler(cfg.T, prediction_type=cfg.prediction_type).to(device)
        self.inferer = DiffusionInferer(self.scheduler, loss=cfg.loss)
        self.opt = torch.optim.Adam(self.unet.parameters(), lr=cfg.optim.lr)
        if ck is not None:
            self.unet.load_state_dict(ck["model"])
            self.ema.load_state_dict(ck["ema"])
            self.opt.load_state_dict(ck["optimizers"][0])
            for group in self.opt.param_groups:  # the restored state holds the old run's lr; this run's config decides
                group["lr"] = cfg.optim.lr
        self.unet.train()


def train_step(d: Denoiser, net, vqgan, store, schedule, step: int, cfg: DiffusionTrainConfig, dist) -> float:
    """One optimizer step over ``optim.grad_accum`` micro-batches (DDP syncs gradients on the last one), then
    the EMA update every ``optim.ema_every`` steps; returns the mean loss."""
    total, accum = 0.0, cfg.optim.grad_accum
    for micro in range(accum):
        image, mask = (v.to(dist.device) for v in crop_batch(store, schedule, cfg.data.batch_size))
        x0 = encode_latent(vqgan, image)  # (B, 8, z, x, y), normalised
        cond = encode_condition(vqgan, image, mask)  # (B, 9, z, x, y)
        sync = not dist.distributed or micro == accum - 1
        with net.no_sync() if not sync else contextlib.nullcontext():
            loss = d.inferer(net, x0, cond)["loss"]
            (loss / accum).backward()
        total += float(loss.detach()) / accum
    optimizer_step(d.opt, d.unet.parameters(), clip=cfg.optim.grad_clip)  # gradients accumulated above
    d.opt.zero_grad(set_to_none=True)
    if step % cfg.optim.ema_every == 0:
        ema_update(d.ema, d.unet, cfg.optim.ema_decay, copy_only=step < cfg.optim.ema_start)
    return total


# ---------------------------------------------------------------------------------------- train
def train(cfg: DiffusionTrainConfig, *, resume: str | None = None) -> dict:
    """Run (or resume) training; returns a summary (step, last metrics, checkpoint paths, skipped counts)."""
    from backend.data import list_cases

    check_config(cfg)
    out = check_output_dir(cfg.output_dir)
    dist, logger = start_run(cfg.device, seed=cfg.seed, threads=cfg.threads, logger_name=__name__)
    ckpt_path, official_path = out / "checkpoint_last.pt", out / f"{cfg.data.organ}_{cfg.stage}.pt"
    ck, step = read_resume(cfg, resume, ckpt_path, dist.device)
    vqgan, vqgan_state = load_frozen_autoencoder(cfg, dist.device)  # frozen: the latent space of stage 1
    ae_record = autoencoder_record(cfg.autoencoder)
    if ck is not None:
        check_same_autoencoder(resume_path(resume, ckpt_path), ck.get("autoencoder"), ae_record, logger)

    # data: CT + stage label in model space, seeded crops centred on organ or tumour
    store = TumourCropStore(list_cases(cfg.data.source, require_labels=True), cfg)
    schedule = DrawSchedule(len(store), seed=cfg.seed, rank=dist.rank, world_size=dist.world_size)
    check_crop(cfg, vqgan)

    # denoiser, EMA, optimiser (new or resumed)
    d = Denoiser(cfg, dist.device, ck)
    if ck is not None:
        schedule.load_state_dict(ck["data"])
        restore_rank_rng_state(ck, dist, seed=cfg.seed)
        logger.info("resumed from step %d", step)
    net = wrap_ddp(d.unet, dist)

    def save(reason: str) -> None:
        rngs = rank_rng_states(dist)  # every rank takes part (a collective under torchrun)
        if not dist.is_main:
            return
        save_checkpoint(ckpt_path, stage="diffusion", config=config_to_dict(cfg), model_config=cfg.model.to_dict(),
                        timesteps=cfg.T, autoencoder=ae_record, step=step, model=d.unet.state_dict(),
                        ema=d.ema.state_dict(), optimizers=[d.opt.state_dict()], scaler={}, rng=rngs[0],
                        rng_ranks=rngs, data=schedule.state_dict(), skipped=len(store.skipped))
        save_official(official_path, model=d.unet, ema=d.ema, scheduler=d.scheduler, vqgan_state=vqgan_state, step=step,
                      extra={"organ": cfg.data.organ, "stage": cfg.stage, "prediction_type": cfg.prediction_type})
        logger.info("checkpoint (%s) at step %d: %s, %s", reason, step, ckpt_path, official_path)

    last: dict = {}
    with TrainingLoop(dist, out / "metrics.csv", step=step, max_steps=cfg.max_steps, log_every=cfg.log_every,
                      desc=f"diffusion ({cfg.stage})", tensorboard_dir=out / "tensorboard" if cfg.tensorboard else None,
                      config=cfg) as loop:
        while loop.running(step):
            loss = train_step(d, net, vqgan, store, schedule, step, cfg, dist)
            step += 1
            last = {"loss": loss, "lr": cfg.optim.lr, "skipped_cases": len(store.skipped),
                    "tumours_too_large": store.too_large}
            loop.tick()
            if loop.due(step):
                loop.log(step, last, loss=f"{loss:.4f}")
            if step % cfg.checkpoint_every == 0 and step < cfg.max_steps:
                save("periodic")
        save("interrupted" if loop.interrupted else "final")
    return {"step": step, "metrics": last, "checkpoint": ckpt_path, "weights": official_path,
            "skipped": len(store.skipped), "too_large": store.too_large, "interrupted": loop.interrupted}
