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
package and by the authors' loader), ``metrics.csv``, ``config.yaml`` (the settings of the latest run). Cross-organ use: ``data.organ`` only names the
training data; the weights file can be loaded for any organ (paper section 4.2), e.g. copy
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

from backend.diffusion.ddpm import DDPMScheduler
from backend.diffusion.inferer import DiffusionInferer, LossType, encode_condition, encode_latent
from backend.diffusion.official import save_official
from backend.diffusion.schedule import PredictionType
from backend.diffusion.unet import Unet3D, Unet3DConfig
from backend.errors import DiffTumorError
from backend.weights import WEIGHT_ORGANS
from backend.train.common import (
    DrawSchedule,
    TrainingLoop,
    add_config_arguments,
    check_output_dir,
    check_positive,
    check_resume,
    config_to_dict,
    load_config,
    load_checkpoint,
    load_resume_checkpoint,
    refuse_fresh_run_over,
    resume_path,
    rank_rng_states,
    restore_rank_rng_state,
    save_checkpoint,
    start_run,
    wrap_ddp,
)

log = logging.getLogger(__name__)

Stage = Literal["early", "noearly"]
Organ = Literal[WEIGHT_ORGANS]  # the organs whose {organ}_{stage}.pt a weights folder is read for
DEFAULT_T = {"early": 4, "noearly": 200}  # released models


@dataclass
class DataConfig:
    source: str = ""  # MSD dataset.json, list file (image,label) or AbdomenAtlas tree; labels required
    organ: Organ = "liver"  # organ of the training data (names the output file; weights work for any organ)
    organ_labels: tuple[int, ...] = (1,)  # label ids of the organ (MSD / LiTS / KiTS: 1)
    tumor_labels: tuple[int, ...] = (2,)  # label ids of the tumour (MSD / LiTS / KiTS: 2)
    crop_size: tuple[int, int, int] = (96, 96, 96)  # (X, Y, Z) in RAS; divisible by the autoencoder's factor
    spacing: tuple[float, float, float] = (1.0, 1.0, 1.0)
    hu_min: float = -175.0
    hu_max: float = 250.0
    crop_ratios: tuple[float, float, float] = (0.0, 1.0, 1.0)  # crop centre on background / organ / tumour
    rotate90_prob: float = 0.1
    batch_size: int = 2  # crops per micro-batch
    cache: bool = True  # keep preprocessed volumes in memory


@dataclass
class OptimConfig:
    lr: float = 1e-4
    grad_accum: int = 2  # micro-batches per optimizer step
    ema_decay: float = 0.995
    ema_every: int = 10  # EMA update period (optimizer steps)
    ema_start: int = 2000  # before this step the EMA is a plain copy of the online weights (warm start)
    grad_clip: float = 0.0  # 0 = no clipping (released)


@dataclass
class DiffusionTrainConfig:
    output_dir: str = "runs/diffusion"
    autoencoder: str = ""  # frozen stage-1 weights: official AutoencoderModel.ckpt or one of ours
    stage: Stage = "early"
    timesteps: int = 0  # 0 = released default for the stage (early 4, noearly 200)
    early_diameter_mm: float = 20.0  # tumours with largest diameter below this are "early" (TNM T1; stage_of)
    prediction_type: PredictionType = "epsilon"  # epsilon as released; "sample" = x0 as the paper states
    loss: LossType = "l1"
    seed: int = 1234
    device: str = "auto"
    max_steps: int = 60000
    log_every: int = 10
    checkpoint_every: int = 1000
    threads: int = 0  # CPU threads (0 = torch default)
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
    tumour are skipped and counted (``skipped``), as are unreadable ones; tumours larger than the crop
    are dropped from the mask with one warning each (``too_large``).
    """

    def __init__(self, cases, cfg: DiffusionTrainConfig):
        from monai.transforms import Compose, RandCropByLabelClassesd, RandRotate90d, SpatialPadd

        self.cfg, self.dc = cfg, cfg.data
        self.cases = list(cases)
        self.cache: dict[int, dict] = {}
        self.skipped: dict[int, str] = {}
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
        from backend.preprocess import to_model_space

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
        stage_label = np.isin(lab, dc.organ_labels).astype(np.uint8) | tumour.astype(np.uint8)  # organ incl. tumours
        stage_label[np.isin(comps_lab, keep)] = 2
        unit = (np.clip(ct.array.astype(np.float32), dc.hu_min, dc.hu_max) - dc.hu_min) / (dc.hu_max - dc.hu_min) * 2 - 1
        return self.pad({"image": torch.from_numpy(unit)[None], "label": torch.from_numpy(stage_label)[None]})

    def _skip(self, item: int, reason: str, *, expected: bool = False) -> None:
        """Leave case ``item`` out. A case without a tumour of this stage is ``expected`` (each stage trains on
        part of a dataset): logged at debug level and counted; an unreadable case is a warning."""
        self.skipped[item] = reason
        if expected:
            log.debug("skipping case (%d skipped so far): %s", len(self.skipped), reason)
        else:
            log.warning("skipping case (%d skipped so far): %s", len(self.skipped), reason)
        return None

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


def next_batch(store: TumourCropStore, schedule: DrawSchedule, batch_size: int):
    """(image, mask) each (B, 1, Z, X, Y) in the official permuted layout."""
    images, masks = [], []
    while len(images) < batch_size:
        item, draw = next(schedule)
        got = store.crop(item, draw)
        if got is not None:
            images.append(got[0])
            masks.append(got[1])
        elif len(store.skipped) == len(store):
            raise DiffTumorError(
                f"{store.dc.source}: none of the {len(store)} cases has a usable {store.cfg.stage} tumour "
                f"(tumour labels {list(store.dc.tumor_labels)}; e.g. {next(iter(store.skipped.values()))})"
            )
    perm = (0, 1, 4, 2, 3)  # (B,1,X,Y,Z) -> (B,1,Z,X,Y)
    return torch.stack(images).permute(perm).contiguous(), torch.stack(masks).permute(perm).contiguous()


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


# ---------------------------------------------------------------------------------------- train
def train(cfg: DiffusionTrainConfig, *, resume: str | None = None) -> dict:
    """Run (or resume) training; returns a summary (step, last metrics, checkpoint paths, skipped counts)."""
    from backend.data import list_cases

    if not cfg.data.source:
        raise DiffTumorError("data.source: no training data given (MSD dataset.json, list file or AbdomenAtlas tree)")
    check_positive(cfg, "max_steps", "log_every", "checkpoint_every", "data.batch_size", "optim.grad_accum",
                   "optim.ema_every", zero_ok=("timesteps", "threads"))
    out = check_output_dir(cfg.output_dir)
    dist, logger = start_run(cfg.device, seed=cfg.seed, threads=cfg.threads, logger_name=__name__)
    device = dist.device
    ckpt_path = out / "checkpoint_last.pt"
    official_path = out / f"{cfg.data.organ}_{cfg.stage}.pt"
    ck, step = None, 0
    if resume:  # checked before any data is read: same denoiser, noise process, organ and autoencoder
        ck = load_resume_checkpoint(resume, ckpt_path, "diffusion", map_location=device)
        ck_path = resume_path(resume, ckpt_path)
        step = check_resume(ck_path, ck, {"model": cfg.model.to_dict(), "T": cfg.T, "stage": cfg.stage,
                                          "prediction_type": cfg.prediction_type, "data.organ": cfg.data.organ},
                            saved={"T": ck.get("timesteps")}, max_steps=cfg.max_steps)
    else:
        refuse_fresh_run_over(ckpt_path, "output_dir")
    vqgan, vqgan_state = load_frozen_autoencoder(cfg, device)
    ae_record = autoencoder_record(cfg.autoencoder)
    if ck is not None:
        check_same_autoencoder(ck_path, ck.get("autoencoder"), ae_record, logger)

    # data
    store = TumourCropStore(list_cases(cfg.data.source, require_labels=True), cfg)
    schedule = DrawSchedule(len(store), seed=cfg.seed, rank=dist.rank, world_size=dist.world_size)

    # frozen autoencoder (loaded above), denoiser, EMA, optimiser
    down = vqgan.config.downsample  # (Z, X, Y)
    x, y, z = cfg.data.crop_size
    if any(s % f for s, f in zip((z, x, y), down)) or any((s // f) % 2 ** (len(cfg.model.dim_mults) - 1)
                                                          for s, f in zip((x, y), down[1:])):
        raise DiffTumorError(f"data.crop_size {tuple(cfg.data.crop_size)}: not compatible with the autoencoder "
                             f"factor {tuple(down)} and {len(cfg.model.dim_mults)} U-Net levels")
    unet = Unet3D(cfg.model).to(device)
    ema = copy.deepcopy(unet).eval().requires_grad_(False)
    scheduler = DDPMScheduler(cfg.T, prediction_type=cfg.prediction_type).to(device)
    inferer = DiffusionInferer(scheduler, loss=cfg.loss)
    opt = torch.optim.Adam(unet.parameters(), lr=cfg.optim.lr)
    if ck is not None:
        unet.load_state_dict(ck["model"])
        ema.load_state_dict(ck["ema"])
        opt.load_state_dict(ck["optimizers"][0])
        for group in opt.param_groups:  # the restored state holds the old run's lr; this run's config decides
            group["lr"] = cfg.optim.lr
        schedule.load_state_dict(ck["data"])
        restore_rank_rng_state(ck, dist, seed=cfg.seed)
        logger.info("resumed from step %d", step)
    net = wrap_ddp(unet, dist)
    unet.train()

    def save(reason: str) -> None:
        rngs = rank_rng_states(dist)  # every rank takes part (a collective under torchrun)
        if not dist.is_main:
            return
        extra = {"organ": cfg.data.organ, "stage": cfg.stage, "prediction_type": cfg.prediction_type}
        save_checkpoint(ckpt_path, stage="diffusion", config=config_to_dict(cfg), model_config=cfg.model.to_dict(),
                        timesteps=cfg.T, autoencoder=ae_record, step=step, model=unet.state_dict(), ema=ema.state_dict(),
                        optimizers=[opt.state_dict()], scaler={}, rng=rngs[0], rng_ranks=rngs, data=schedule.state_dict(),
                        skipped=len(store.skipped))
        save_official(official_path, model=unet, ema=ema, scheduler=scheduler, vqgan_state=vqgan_state, step=step,
                      extra=extra)
        logger.info("checkpoint (%s) at step %d: %s, %s", reason, step, ckpt_path, official_path)

    last: dict = {}
    with TrainingLoop(dist, out / "metrics.csv", step=step, max_steps=cfg.max_steps, log_every=cfg.log_every,
                      desc=f"diffusion ({cfg.stage})", tensorboard_dir=out / "tensorboard" if cfg.tensorboard else None,
                      config=cfg) as loop:
        while loop.running(step):
            total = 0.0
            for micro in range(cfg.optim.grad_accum):
                image, mask = next_batch(store, schedule, cfg.data.batch_size)
                image, mask = image.to(device), mask.to(device)
                x0 = encode_latent(vqgan, image)  # (B, 8, z, x, y), normalised
                cond = encode_condition(vqgan, image, mask)  # (B, 9, z, x, y)
                sync = not dist.distributed or micro == cfg.optim.grad_accum - 1
                ctx = net.no_sync() if not sync else contextlib.nullcontext()
                with ctx:
                    loss = inferer(net, x0, cond)["loss"]
                    (loss / cfg.optim.grad_accum).backward()
                total += float(loss.detach()) / cfg.optim.grad_accum
            if cfg.optim.grad_clip > 0:
                torch.nn.utils.clip_grad_norm_(unet.parameters(), cfg.optim.grad_clip)
            opt.step()
            opt.zero_grad(set_to_none=True)
            if step % cfg.optim.ema_every == 0:
                ema_update(ema, unet, cfg.optim.ema_decay, copy_only=step < cfg.optim.ema_start)
            step += 1
            last = {"loss": total, "lr": cfg.optim.lr, "skipped_cases": len(store.skipped),
                    "tumours_too_large": store.too_large}
            loop.tick()
            if loop.due(step):
                loop.log(step, last, loss=f"{total:.4f}")
            if step % cfg.checkpoint_every == 0 and step < cfg.max_steps:
                save("periodic")
        save("interrupted" if loop.interrupted else "final")
    return {"step": step, "metrics": last, "checkpoint": ckpt_path, "weights": official_path,
            "skipped": len(store.skipped), "too_large": store.too_large, "interrupted": loop.interrupted}


# ------------------------------------------------------------------------------------------ CLI
def register(sub) -> None:
    p = sub.add_parser("diffusion", help="train the stage-2 conditional latent diffusion model",
                       description="Train the tumour diffusion model on CT + label maps with tumours (MSD / LiTS / "
                                   "KiTS layouts). stage=early trains the T=4 model on tumours < 20 mm, stage=noearly "
                                   "the T=200 model on the others. Settings: --config YAML plus key=value overrides, "
                                   "e.g. data.source=/data/Task03_Liver/dataset.json autoencoder=AutoencoderModel.ckpt.")
    add_config_arguments(p, "backend/configs/diffusion.yaml", "OUTPUT_DIR/checkpoint_last.pt")
    p.set_defaults(func=_handler)


def _handler(args) -> int:
    cfg = load_config(DiffusionTrainConfig, args.config, args.overrides)
    summary = train(cfg, resume=args.resume)
    log.info("stopped at step %d (loss %.4f); weights %s; %d case(s) skipped (no tumour of this stage, or unreadable;"
             " -v lists them), %d tumour(s) larger than the crop",
             summary["step"], summary["metrics"].get("loss", float("nan")), summary["weights"], summary["skipped"],
             summary["too_large"])
    return 130 if summary["interrupted"] else 0
