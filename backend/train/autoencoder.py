"""`difftumor train autoencoder`: stage-1 VQGAN training (official STEP1 recipe, reads top to bottom).

    difftumor train autoencoder --config backend/configs/autoencoder.yaml data.source=/data/atlas [--resume]
    torchrun --nproc_per_node 4 -m backend.cli train autoencoder --config ...      (DDP, same options)

Order: config -> device/seed -> data (read, RAS, 1 mm, HU window, pad; MONAI CacheDataset; seeded crops)
-> model (new, from ``init_from``, or resumed) -> two Adam optimisers + MultiStepLR -> validation helper
-> loop (generator step, discriminator step after ``discriminator_iter_start``, metrics, checkpoints).
Data order and crops depend only on (seed, step), and all RNG states are checkpointed, so ``--resume``
continues exactly the schedule of an uninterrupted run. Unreadable images are skipped and counted.
"""

from __future__ import annotations

import logging
import math
import warnings
from dataclasses import dataclass, field
from pathlib import Path

import torch

from backend.checkpoint import save_checkpoint
from backend.errors import DiffTumorError
from backend.train.checkpoint import (
    check_resume,
    load_resume_checkpoint,
    rank_rng_states,
    refuse_fresh_run_over,
    restore_rank_rng_state,
    resume_lr_scheduler,
    resume_path,
)
from backend.train.config import CROP_VOXELS, NON_NEGATIVE, POSITIVE, RangeChecked, config_to_dict, ranged
from backend.train.data import DrawSchedule, next_batch
from backend.train.distributed import allreduce_grads, start_run, wrap_ddp
from backend.train.loop import TrainingLoop, amp_dtype, autocast, check_output_dir, grad_scaler, optimizer_step
from backend.vqgan.losses import LossConfig, VQGANLoss, disc_factor
from backend.vqgan.model import VQGAN, VQGANConfig

log = logging.getLogger(__name__)

METRIC_KEYS = ("recon_l1", "commitment", "perceptual", "g_adv", "feat_match", "g_total", "d_image", "d_video",
               "d_total")


@dataclass
class DataConfig(RangeChecked):
    source: str = ""  # CT folder, AbdomenAtlas tree, MSD dataset.json or list file
    val_source: str | None = None  # default: a seeded split of `source` (training cases if val_fraction 0)
    val_fraction: float = ranged(0.1, ge=0.0, lt=1.0)
    crop_size: tuple[int, int, int] = ranged((96, 96, 96), **CROP_VOXELS)  # (X, Y, Z) in RAS; divisible by downsample
    spacing: tuple[float, float, float] = ranged((1.0, 1.0, 1.0), gt=0.0)  # mm
    hu_min: float = ranged(-175.0, ge=-2000.0, le=4000.0)  # HU window -> [-1, 1]
    hu_max: float = ranged(250.0, ge=-2000.0, le=4000.0)
    cache_rate: float = ranged(1.0, ge=0.0, le=1.0)  # fraction of preprocessed volumes kept in memory
    batch_size: int = ranged(2, **POSITIVE)


@dataclass
class OptimConfig(RangeChecked):
    lr: float = ranged(1.875e-5, gt=0.0)  # official effective LR (3e-4 x 1/8 x 2/4)
    betas: tuple[float, float] = ranged((0.5, 0.9), ge=0.0, lt=1.0)
    milestones: tuple[int, ...] = ranged((40000, 50000, 60000), **POSITIVE)  # steps at which the LR drops
    gamma: float = ranged(0.1, gt=0.0)  # LR factor at each milestone
    grad_clip: float = ranged(1.0, **NON_NEGATIVE)  # max gradient norm (0: no clipping)


@dataclass
class AutoencoderTrainConfig(RangeChecked):
    output_dir: str = "runs/autoencoder"
    seed: int = ranged(1234)  # any whole number
    device: str = "auto"
    max_steps: int = ranged(80000, **POSITIVE)
    amp: bool = True  # fp16 autocast + GradScaler, used on CUDA only
    log_every: int = ranged(10, **POSITIVE)
    checkpoint_every: int = ranged(1000, **POSITIVE)
    val_every: int = ranged(1000, **NON_NEGATIVE)  # 0: no validation
    val_cases: int = ranged(2, **NON_NEGATIVE)
    init_from: str | None = None  # official AutoencoderModel.ckpt or one of ours: weights only
    threads: int = ranged(0, **NON_NEGATIVE)  # CPU threads (0 = leave torch's default)
    tensorboard: bool = True  # also log to TensorBoard when installed
    model: VQGANConfig = field(default_factory=VQGANConfig)
    loss: LossConfig = field(default_factory=LossConfig)
    data: DataConfig = field(default_factory=DataConfig)
    optim: OptimConfig = field(default_factory=OptimConfig)


# ---------------------------------------------------------------------------------------- data
def _check_crop(cfg: AutoencoderTrainConfig) -> None:
    x, y, z = cfg.data.crop_size
    permuted = (z, x, y)  # the model sees (Z, X, Y)
    if any(s % f for s, f in zip(permuted, cfg.model.downsample)):
        raise DiffTumorError(
            f"data.crop_size {tuple(cfg.data.crop_size)} (X, Y, Z): every side must be divisible by the "
            f"downsampling factor {tuple(cfg.model.downsample)} (Z, X, Y)"
        )


class VolumeStore:
    """Preprocessed volumes (MONAI CacheDataset of deterministic transforms) + seeded random crops.

    ``crop(item, draw_id)`` returns a (1, X, Y, Z) tensor or None when that case could not be read
    (it is then counted in ``failed`` and never tried again).
    """

    def __init__(self, cases, dc: DataConfig, *, random_crop: bool = True):
        from monai.data import CacheDataset
        from monai.transforms import CenterSpatialCropd, RandSpatialCropd, SpatialPadd, Transform

        from backend.io import read_image
        from backend.preprocess import hu_to_unit, to_model_space

        pad = SpatialPadd(keys="image", spatial_size=dc.crop_size, mode="minimum")

        def det(d):
            # file space -> model space (RAS, (X, Y, Z), 1 mm; the project's shared preprocessing,
            # = MONAI Orientationd("RAS") + Spacingd), then the HU window -> [-1, 1] and padding to the crop
            ms = to_model_space(read_image(d["image"]), spacing=dc.spacing)
            unit = hu_to_unit(torch.from_numpy(ms.array.astype("float32")), window=(dc.hu_min, dc.hu_max))
            return pad({"image": unit[None]})  # (1, X, Y, Z)

        class _SafeLoad(Transform):  # deterministic => cached by CacheDataset; errors become a marker
            def __call__(self, d):
                try:
                    return det({"image": d["image"]})
                except Exception as exc:  # unreadable/corrupt file: skip it, do not stop the run
                    return {"error": f"{d['image']}: {type(exc).__name__}: {' '.join(str(exc).split())[:200]}"}

        self.cases = list(cases)
        self.dataset = CacheDataset([c.as_dict() for c in self.cases], transform=_SafeLoad(),
                                    cache_rate=dc.cache_rate, num_workers=0, progress=False)
        self.crop_t = (RandSpatialCropd(keys="image", roi_size=dc.crop_size, random_size=False) if random_crop
                       else CenterSpatialCropd(keys="image", roi_size=dc.crop_size))
        self.failed: set[int] = set()

    def __len__(self):
        return len(self.cases)

    def crop(self, item: int, draw_id: int = 0) -> torch.Tensor | None:
        if item in self.failed:
            return None
        d = self.dataset[item]
        if "error" in d:
            self.failed.add(item)
            log.warning("skipping unreadable image (%d skipped so far): %s", len(self.failed), d["error"])
            return None
        if hasattr(self.crop_t, "set_random_state"):
            self.crop_t.set_random_state(seed=draw_id % (2**32))
        return torch.as_tensor(self.crop_t(d)["image"]).float()  # (1, X, Y, Z)


def crop_batch(store: VolumeStore, schedule: DrawSchedule, batch_size: int) -> torch.Tensor:
    """(B, 1, Z, X, Y) batch in the official permuted layout; unreadable cases are skipped."""
    def exhausted():
        if len(store.failed) == len(store):
            return DiffTumorError(f"{store.cases[0].image.parent}: none of the {len(store)} training images "
                                  "could be read")
        return None

    crops = next_batch(store.crop, schedule, batch_size, exhausted=exhausted)
    return torch.stack(crops).permute(0, 1, 4, 2, 3).contiguous()  # (B,1,X,Y,Z) -> (B,1,Z,X,Y)


# ---------------------------------------------------------------------------------- validation
@torch.no_grad()
def validate(model: VQGAN, store: VolumeStore, cfg: AutoencoderTrainConfig, step: int, device) -> dict:
    """PSNR/SSIM in HU space over centre crops of the validation cases; PNG mid-slices saved."""
    from monai.metrics import SSIMMetric

    from backend.preprocess import unit_to_hu

    was_training = model.training
    model.eval()
    dc, rng = cfg.data, float(cfg.data.hu_max - cfg.data.hu_min)
    ssim = SSIMMetric(spatial_dims=3, data_range=rng)
    psnrs, ssims = [], []
    out_dir = Path(cfg.output_dir) / "validation"
    for i in range(min(cfg.val_cases, len(store))):
        crop = store.crop(i)
        if crop is None:
            continue
        x = crop[None].permute(0, 1, 4, 2, 3).to(device)
        x_hat = model.decode(model.encode(x))
        hx, hr = (unit_to_hu(v, window=(dc.hu_min, dc.hu_max)) for v in (x, x_hat))
        mse = torch.mean((hx - hr) ** 2).item()
        psnrs.append(10 * math.log10(rng**2 / max(mse, 1e-12)))
        ssims.append(float(ssim(hr.float().cpu(), hx.float().cpu()).mean()))
        _save_png(out_dir / f"step{step:07d}_case{i}.png", hx[0, 0].cpu(), hr[0, 0].cpu())
    model.train(was_training)
    if not psnrs:
        return {}
    return {"val_psnr_hu": sum(psnrs) / len(psnrs), "val_ssim_hu": sum(ssims) / len(ssims)}


def _save_png(path: Path, x, x_hat) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from backend.io import atomic_write

    path.parent.mkdir(parents=True, exist_ok=True)
    z, xx, y = (s // 2 for s in x.shape)  # volume in (Z, X, Y)
    planes = [(x[z].T, x_hat[z].T), (x[:, xx], x_hat[:, xx]), (x[:, :, y], x_hat[:, :, y])]
    fig, axes = plt.subplots(2, 3, figsize=(9, 6))
    for j, (a, b) in enumerate(planes):
        for r, img in enumerate((a, b)):
            axes[r, j].imshow(img.numpy(), cmap="gray", vmin=-175, vmax=250, origin="lower")
            axes[r, j].axis("off")
    axes[0, 0].set_title("input (top) / reconstruction (bottom)", loc="left", fontsize=8)
    fig.tight_layout()
    with atomic_write(path, suffix=".png") as tmp:
        fig.savefig(tmp, dpi=80)
    plt.close(fig)


# ---------------------------------------------------------------------------------------- model
def check_config(cfg: AutoencoderTrainConfig) -> None:
    """The checks that involve two settings (each setting's own range is checked when the config is built)."""
    _check_crop(cfg)
    if not cfg.data.source:
        raise DiffTumorError("data.source: no training data given (a CT folder, AbdomenAtlas tree, dataset.json or "
                             "list file)")
    if not cfg.data.hu_min < cfg.data.hu_max:
        raise DiffTumorError(f"data.hu_min={cfg.data.hu_min}, data.hu_max={cfg.data.hu_max}: need hu_min < hu_max")


def read_resume(cfg: AutoencoderTrainConfig, resume, ckpt_path: Path, device) -> tuple[dict | None, int]:
    """(checkpoint, step) of ``--resume`` (checked before any data is read: same model, steps left to train),
    or (None, 0) for a fresh run, which may not overwrite an earlier run's checkpoint."""
    if not resume:
        refuse_fresh_run_over(ckpt_path, "output_dir")
        return None, 0
    ck = load_resume_checkpoint(resume, ckpt_path, "autoencoder", map_location=device)
    # the discriminators' architecture is model state too (it is in the checkpoint's loss_model)
    same = {"model": cfg.model.to_dict(), "loss.disc_channels": cfg.loss.disc_channels,
            "loss.disc_layers": cfg.loss.disc_layers}
    return ck, check_resume(resume_path(resume, ckpt_path), ck, same, max_steps=cfg.max_steps)


def read_data(cfg: AutoencoderTrainConfig, dist) -> tuple[VolumeStore, VolumeStore | None]:
    """Training volumes and (rank 0) the validation volumes: ``data.val_source`` or a seeded split."""
    from backend.data import list_cases, split_cases

    cases = list_cases(cfg.data.source)
    if cfg.data.val_source:
        train_cases, val_cases = cases, list_cases(cfg.data.val_source)
    else:
        train_cases, val_cases = split_cases(cases, val_fraction=cfg.data.val_fraction, seed=cfg.seed)
        val_cases = val_cases or train_cases  # val_fraction 0: monitor reconstructions of training cases
    train_store = VolumeStore(train_cases, cfg.data)
    val_store = VolumeStore(val_cases[: cfg.val_cases], cfg.data, random_crop=False) if dist.is_main else None
    return train_store, val_store


class Parts:
    """The trained state: VQGAN, losses (with the two discriminators), their Adam optimisers and
    MultiStepLR schedules, and the AMP scaler they share; new, initialised from ``init_from`` or resumed."""

    def __init__(self, cfg: AutoencoderTrainConfig, device, logger, ck: dict | None):
        self.model = VQGAN(cfg.model).to(device)
        self.loss = VQGANLoss(cfg.loss, cfg.model.image_channels).to(device)
        if cfg.init_from and ck is None:
            from backend.vqgan.official import load_autoencoder_with_extras

            init, extras, _ = load_autoencoder_with_extras(cfg.init_from, config=cfg.model)
            self.model.load_state_dict(init.state_dict())
            logger.info("initialised from %s (%s)", cfg.init_from, ", ".join(["vqgan", *self.loss.load_extras(extras)]))
        self.g_params = list(self.model.parameters())
        self.d_params = [*self.loss.image_discriminator.parameters(), *self.loss.video_discriminator.parameters()]
        o = cfg.optim
        self.opt_g = torch.optim.Adam(self.g_params, lr=o.lr, betas=o.betas)
        self.opt_d = torch.optim.Adam(self.d_params, lr=o.lr, betas=o.betas)
        self.sched_g = torch.optim.lr_scheduler.MultiStepLR(self.opt_g, list(o.milestones), o.gamma)
        self.sched_d = torch.optim.lr_scheduler.MultiStepLR(self.opt_d, list(o.milestones), o.gamma)
        self.amp = amp_dtype(device, cfg.amp, prefer_bf16=False)  # float16 on CUDA, as released
        self.scaler = grad_scaler(device, cfg.amp)
        if ck is not None:
            self.model.load_state_dict(ck["model"])
            self.loss.load_state_dict(ck["loss_model"], strict=False)
            for opt, state in zip((self.opt_g, self.opt_d), ck["optimizers"]):
                opt.load_state_dict(state)
            # the LR schedules follow this run's config (milestones, gamma, lr), continued at the saved step
            changed = resume_lr_scheduler(self.sched_g, ck["schedulers"][0])
            resume_lr_scheduler(self.sched_d, ck["schedulers"][1])  # same settings as sched_g
            self.scaler.load_state_dict(ck["scaler"])
            if changed:
                logger.info("learning-rate schedule rebuilt for the current config (%s)", ", ".join(changed))
        self.model.train()
        self.loss.train()

    def state(self) -> dict:
        """What the checkpoint holds of them (format unchanged since the first release)."""
        return dict(model=self.model.state_dict(), loss_model=self.loss.state_dict(),
                    optimizers=[self.opt_g.state_dict(), self.opt_d.state_dict()],
                    schedulers=[self.sched_g.state_dict(), self.sched_d.state_dict()], scaler=self.scaler.state_dict(),
                    ema=None)


def train_step(parts: Parts, net, x: torch.Tensor, step: int, cfg: AutoencoderTrainConfig, dist) -> dict:
    """One generator step, then (from ``loss.discriminator_iter_start``) one discriminator step; the logs."""
    with autocast(x.device, parts.amp):
        x_hat, q = net(x)
    g_loss, logs = parts.loss.generator_loss(x, x_hat.float(), q.commitment_loss.float(), step)
    optimizer_step(parts.opt_g, parts.g_params, loss=g_loss, scaler=parts.scaler, clip=cfg.optim.grad_clip,
                   update=False)
    if disc_factor(step, cfg.loss.discriminator_iter_start) > 0:
        d_loss, d_logs = parts.loss.discriminator_loss(x, x_hat.float(), step)
        optimizer_step(parts.opt_d, parts.d_params, loss=d_loss, scaler=parts.scaler, clip=cfg.optim.grad_clip,
                       before_unscale=lambda: allreduce_grads(parts.d_params, dist), update=False)
        logs.update(d_logs)
    parts.scaler.update()
    parts.sched_g.step()
    with warnings.catch_warnings():  # D is idle before its start step; its LR schedule still counts steps
        warnings.simplefilter("ignore", UserWarning)
        parts.sched_d.step()
    row = {k: 0.0 for k in METRIC_KEYS}  # fixed CSV columns (adversarial terms 0 before start)
    row.update({k: float(v) for k, v in logs.items()})
    row.update(perplexity=float(q.perplexity), lr=parts.sched_g.get_last_lr()[0])
    return row


# ---------------------------------------------------------------------------------------- train
def train(cfg: AutoencoderTrainConfig, *, resume: str | None = None) -> dict:
    """Run (or resume) training; returns a summary dict (last step, last metrics, checkpoint path)."""
    check_config(cfg)
    out = check_output_dir(cfg.output_dir)
    dist, logger = start_run(cfg.device, seed=cfg.seed, threads=cfg.threads, logger_name=__name__)
    ckpt_path = out / "checkpoint_last.pt"
    ck, step = read_resume(cfg, resume, ckpt_path, dist.device)

    # data: preprocessed volumes, a seeded resumable order of crops
    train_store, val_store = read_data(cfg, dist)
    schedule = DrawSchedule(len(train_store), seed=cfg.seed, rank=dist.rank, world_size=dist.world_size)

    # model, losses, optimisers (new or resumed)
    parts = Parts(cfg, dist.device, logger, ck)
    if ck is not None:
        schedule.load_state_dict(ck["data"])
        restore_rank_rng_state(ck, dist, seed=cfg.seed)
        logger.info("resumed from step %d", step)
    net = wrap_ddp(parts.model, dist, broadcast_buffers=False)

    def save(reason: str) -> None:
        rngs = rank_rng_states(dist)  # every rank takes part (a collective under torchrun)
        if dist.is_main:
            save_checkpoint(ckpt_path, stage="autoencoder", config=config_to_dict(cfg),
                            model_config=cfg.model.to_dict(), step=step, **parts.state(), rng=rngs[0], rng_ranks=rngs,
                            data=schedule.state_dict(), skipped=sorted(train_store.failed))
            logger.info("checkpoint (%s) at step %d: %s", reason, step, ckpt_path)

    last: dict = {}
    with TrainingLoop(dist, out / "metrics.csv", step=step, max_steps=cfg.max_steps, log_every=cfg.log_every,
                      desc="autoencoder", tensorboard_dir=out / "tensorboard" if cfg.tensorboard else None,
                      config=cfg, validation=cfg.val_every > 0) as loop:
        while loop.running(step):
            x = crop_batch(train_store, schedule, cfg.data.batch_size).to(dist.device)  # (B,1,Z,X,Y)
            last = train_step(parts, net, x, step, cfg, dist)
            step += 1
            last["skipped"] = len(train_store.failed)
            loop.tick()
            if loop.due(step):
                loop.log(step, last, l1=f"{last['recon_l1']:.4f}", ppl=f"{last['perplexity']:.0f}")
            if dist.is_main and cfg.val_every > 0 and (step % cfg.val_every == 0 or step == cfg.max_steps):
                val = validate(parts.model, val_store, cfg, step, dist.device)
                if val:
                    logger.info("step %d: %s", step, ", ".join(f"{k} {v:.4f}" for k, v in val.items()))
                    loop.log_validation(step, val)
                    last.update(val)
            if step % cfg.checkpoint_every == 0 and step < cfg.max_steps:
                save("periodic")
        save("interrupted" if loop.interrupted else "final")
    return {"step": step, "metrics": last, "checkpoint": ckpt_path, "skipped": len(train_store.failed),
            "interrupted": loop.interrupted}
