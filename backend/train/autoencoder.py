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

from backend.errors import DiffTumorError
from backend.train.common import (
    DrawSchedule,
    TrainingLoop,
    add_config_arguments,
    check_output_dir,
    check_positive,
    check_resume,
    config_to_dict,
    load_config,
    load_resume_checkpoint,
    refuse_fresh_run_over,
    resume_lr_scheduler,
    resume_path,
    rank_rng_states,
    restore_rank_rng_state,
    save_checkpoint,
    start_run,
    wrap_ddp,
)
from backend.vqgan.losses import LossConfig, VQGANLoss, disc_factor
from backend.vqgan.model import VQGAN, VQGANConfig

log = logging.getLogger(__name__)

METRIC_KEYS = ("recon_l1", "commitment", "perceptual", "g_adv", "feat_match", "g_total", "d_image", "d_video", "d_total")


@dataclass
class DataConfig:
    source: str = ""  # CT folder, AbdomenAtlas tree, MSD dataset.json or list file
    val_source: str | None = None  # default: a seeded split of `source` (training cases if val_fraction 0)
    val_fraction: float = 0.1
    crop_size: tuple[int, int, int] = (96, 96, 96)  # (X, Y, Z) in RAS; divisible by model.downsample
    spacing: tuple[float, float, float] = (1.0, 1.0, 1.0)
    hu_min: float = -175.0
    hu_max: float = 250.0
    cache_rate: float = 1.0  # fraction of preprocessed volumes kept in memory
    batch_size: int = 2


@dataclass
class OptimConfig:
    lr: float = 1.875e-5  # official effective LR (3e-4 x 1/8 x 2/4)
    betas: tuple[float, float] = (0.5, 0.9)
    milestones: tuple[int, ...] = (40000, 50000, 60000)
    gamma: float = 0.1
    grad_clip: float = 1.0


@dataclass
class AutoencoderTrainConfig:
    output_dir: str = "runs/autoencoder"
    seed: int = 1234
    device: str = "auto"
    max_steps: int = 80000
    amp: bool = True  # fp16 autocast + GradScaler, used on CUDA only
    log_every: int = 10
    checkpoint_every: int = 1000
    val_every: int = 1000
    val_cases: int = 2
    init_from: str | None = None  # official AutoencoderModel.ckpt or one of ours: weights only
    threads: int = 0  # CPU threads (0 = leave torch's default)
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
        from backend.preprocess import to_model_space

        pad = SpatialPadd(keys="image", spatial_size=dc.crop_size, mode="minimum")

        def det(d):
            # file space -> model space (RAS, (X, Y, Z), 1 mm; the project's shared preprocessing,
            # = MONAI Orientationd("RAS") + Spacingd), then the HU window -> [-1, 1] and padding to the crop
            ms = to_model_space(read_image(d["image"]), spacing=dc.spacing)
            hu = torch.from_numpy(ms.array.astype("float32"))
            unit = (hu.clamp(dc.hu_min, dc.hu_max) - dc.hu_min) / (dc.hu_max - dc.hu_min) * 2 - 1
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


def next_batch(store: VolumeStore, schedule: DrawSchedule, batch_size: int) -> torch.Tensor:
    """(B, 1, Z, X, Y) batch in the official permuted layout; unreadable cases are skipped."""
    crops, tries = [], 0
    while len(crops) < batch_size:
        item, draw = next(schedule)
        c = store.crop(item, draw)
        tries += 1
        if c is not None:
            crops.append(c)
        elif len(store.failed) == len(store):
            raise DiffTumorError(f"{store.cases[0].image.parent}: none of the {len(store)} training images could be read")
    return torch.stack(crops).permute(0, 1, 4, 2, 3).contiguous()  # (B,1,X,Y,Z) -> (B,1,Z,X,Y)


# ---------------------------------------------------------------------------------- validation
def _to_hu(v: torch.Tensor, dc: DataConfig) -> torch.Tensor:
    return (v.clamp(-1, 1) + 1) / 2 * (dc.hu_max - dc.hu_min) + dc.hu_min


@torch.no_grad()
def validate(model: VQGAN, store: VolumeStore, cfg: AutoencoderTrainConfig, step: int, device) -> dict:
    """PSNR/SSIM in HU space over centre crops of the validation cases; PNG mid-slices saved."""
    from monai.metrics import SSIMMetric

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
        hx, hr = _to_hu(x, dc), _to_hu(x_hat, dc)
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
    tmp = path.with_name(f".{path.stem}.tmp.png")
    fig.savefig(tmp, dpi=80)
    plt.close(fig)
    tmp.replace(path)


# ---------------------------------------------------------------------------------------- train
def _allreduce_grads(params, world: int) -> None:
    for p in params:
        if p.grad is not None:
            torch.distributed.all_reduce(p.grad)
            p.grad.div_(world)


def train(cfg: AutoencoderTrainConfig, *, resume: str | None = None) -> dict:
    """Run (or resume) training; returns a summary dict (last step, last metrics, checkpoint path)."""
    from backend.data import list_cases, split_cases

    _check_crop(cfg)
    if not cfg.data.source:
        raise DiffTumorError("data.source: no training data given (a CT folder, AbdomenAtlas tree, dataset.json or list file)")
    check_positive(cfg, "max_steps", "log_every", "checkpoint_every", "data.batch_size",
                   zero_ok=("val_every", "val_cases", "threads"))
    out = check_output_dir(cfg.output_dir)
    dist, logger = start_run(cfg.device, seed=cfg.seed, threads=cfg.threads, logger_name=__name__)
    device = dist.device
    ckpt_path = out / "checkpoint_last.pt"
    ck, step = None, 0
    if resume:  # checked before any data is read: same model, and steps left to train
        ck = load_resume_checkpoint(resume, ckpt_path, "autoencoder", map_location=device)
        # the discriminators' architecture is model state too (it is in the checkpoint's loss_model)
        step = check_resume(resume_path(resume, ckpt_path), ck, {"model": cfg.model.to_dict(),
                                                                 "loss.disc_channels": cfg.loss.disc_channels,
                                                                 "loss.disc_layers": cfg.loss.disc_layers},
                            max_steps=cfg.max_steps)
    else:
        refuse_fresh_run_over(ckpt_path, "output_dir")

    # data
    cases = list_cases(cfg.data.source)
    if cfg.data.val_source:
        train_cases, val_cases = cases, list_cases(cfg.data.val_source)
    else:
        train_cases, val_cases = split_cases(cases, val_fraction=cfg.data.val_fraction, seed=cfg.seed)
        val_cases = val_cases or train_cases  # val_fraction 0: monitor reconstructions of training cases
    train_store = VolumeStore(train_cases, cfg.data)
    val_store = VolumeStore(val_cases[: cfg.val_cases], cfg.data, random_crop=False) if dist.is_main else None
    schedule = DrawSchedule(len(train_store), seed=cfg.seed, rank=dist.rank, world_size=dist.world_size)

    # model, losses, optimisers
    model = VQGAN(cfg.model).to(device)
    loss_mod = VQGANLoss(cfg.loss, cfg.model.image_channels).to(device)
    if cfg.init_from and not resume:
        from backend.vqgan.official import load_autoencoder_with_extras

        init, extras, _ = load_autoencoder_with_extras(cfg.init_from, config=cfg.model)
        model.load_state_dict(init.state_dict())
        logger.info("initialised from %s (%s)", cfg.init_from, ", ".join(["vqgan", *loss_mod.load_extras(extras)]))
    ae_params = [p for n, p in model.named_parameters()]
    d_params = list(loss_mod.image_discriminator.parameters()) + list(loss_mod.video_discriminator.parameters())
    opt_g = torch.optim.Adam(ae_params, lr=cfg.optim.lr, betas=cfg.optim.betas)
    opt_d = torch.optim.Adam(d_params, lr=cfg.optim.lr, betas=cfg.optim.betas)
    sched_g = torch.optim.lr_scheduler.MultiStepLR(opt_g, list(cfg.optim.milestones), cfg.optim.gamma)
    sched_d = torch.optim.lr_scheduler.MultiStepLR(opt_d, list(cfg.optim.milestones), cfg.optim.gamma)
    use_amp = cfg.amp and device.type == "cuda"
    scaler = torch.amp.GradScaler("cuda", enabled=use_amp)
    if ck is not None:
        model.load_state_dict(ck["model"])
        loss_mod.load_state_dict(ck["loss_model"], strict=False)
        for o, s in zip((opt_g, opt_d), ck["optimizers"]):
            o.load_state_dict(s)
        # the LR schedules follow this run's config (milestones, gamma, lr), continued at the saved step
        changed = resume_lr_scheduler(sched_g, ck["schedulers"][0])
        resume_lr_scheduler(sched_d, ck["schedulers"][1])  # same settings as sched_g
        scaler.load_state_dict(ck["scaler"])
        schedule.load_state_dict(ck["data"])
        restore_rank_rng_state(ck, dist, seed=cfg.seed)
        logger.info("resumed from step %d", step)
        if changed:
            logger.info("learning-rate schedule rebuilt for the current config (%s)", ", ".join(changed))
    ddp_model = wrap_ddp(model, dist, broadcast_buffers=False)
    model.train()
    loss_mod.train()

    def save(reason: str) -> Path:
        rngs = rank_rng_states(dist)  # every rank takes part (a collective under torchrun)
        if dist.is_main:
            save_checkpoint(
                ckpt_path, stage="autoencoder", config=config_to_dict(cfg), model_config=cfg.model.to_dict(), step=step,
                model=model.state_dict(), loss_model=loss_mod.state_dict(),
                optimizers=[opt_g.state_dict(), opt_d.state_dict()], schedulers=[sched_g.state_dict(), sched_d.state_dict()],
                scaler=scaler.state_dict(), ema=None, rng=rngs[0], rng_ranks=rngs, data=schedule.state_dict(),
                skipped=sorted(train_store.failed),
            )
            logger.info("checkpoint (%s) at step %d: %s", reason, step, ckpt_path)
        return ckpt_path

    last: dict = {}
    with TrainingLoop(dist, out / "metrics.csv", step=step, max_steps=cfg.max_steps, log_every=cfg.log_every,
                      desc="autoencoder", tensorboard_dir=out / "tensorboard" if cfg.tensorboard else None,
                      config=cfg, validation=cfg.val_every > 0) as loop:
        while loop.running(step):
            x = next_batch(train_store, schedule, cfg.data.batch_size).to(device)  # (B,1,Z,X,Y)
            with torch.autocast(device.type, dtype=torch.float16, enabled=use_amp):
                x_hat, q = ddp_model(x)
            g_loss, logs = loss_mod.generator_loss(x, x_hat.float(), q.commitment_loss.float(), step)
            opt_g.zero_grad(set_to_none=True)
            scaler.scale(g_loss).backward()
            scaler.unscale_(opt_g)
            torch.nn.utils.clip_grad_norm_(ae_params, cfg.optim.grad_clip)
            scaler.step(opt_g)
            if disc_factor(step, cfg.loss.discriminator_iter_start) > 0:
                d_loss, d_logs = loss_mod.discriminator_loss(x, x_hat.float(), step)
                opt_d.zero_grad(set_to_none=True)
                scaler.scale(d_loss).backward()
                if dist.distributed:
                    _allreduce_grads(d_params, dist.world_size)
                scaler.unscale_(opt_d)
                torch.nn.utils.clip_grad_norm_(d_params, cfg.optim.grad_clip)
                scaler.step(opt_d)
                logs.update(d_logs)
            scaler.update()
            sched_g.step()
            with warnings.catch_warnings():  # D is idle before its start step; its LR schedule still counts steps
                warnings.simplefilter("ignore", UserWarning)
                sched_d.step()
            step += 1
            last = {k: 0.0 for k in METRIC_KEYS}  # fixed CSV columns (adversarial terms 0 before start)
            last.update({k: float(v) for k, v in logs.items()})
            last.update(perplexity=float(q.perplexity), lr=sched_g.get_last_lr()[0], skipped=len(train_store.failed))
            loop.tick()
            if loop.due(step):
                loop.log(step, last, l1=f"{last['recon_l1']:.4f}", ppl=f"{last['perplexity']:.0f}")
            if dist.is_main and cfg.val_every > 0 and (step % cfg.val_every == 0 or step == cfg.max_steps):
                val = validate(model, val_store, cfg, step, device)
                if val:
                    logger.info("step %d: %s", step, ", ".join(f"{k} {v:.4f}" for k, v in val.items()))
                    loop.log_validation(step, val)
                    last.update(val)
            if step % cfg.checkpoint_every == 0 and step < cfg.max_steps:
                save("periodic")
        save("interrupted" if loop.interrupted else "final")
    return {"step": step, "metrics": last, "checkpoint": ckpt_path, "skipped": len(train_store.failed),
            "interrupted": loop.interrupted}


# ------------------------------------------------------------------------------------------ CLI
def register(sub) -> None:
    p = sub.add_parser("autoencoder", help="train the stage-1 3D VQGAN autoencoder",
                       description="Train the 3D VQGAN (official STEP1 recipe). Settings: --config YAML plus key=value "
                                   "overrides, e.g. data.source=/data/AbdomenAtlas max_steps=1000 model.n_hiddens=8.")
    add_config_arguments(p, "backend/configs/autoencoder.yaml", "OUTPUT_DIR/checkpoint_last.pt")
    p.set_defaults(func=_handler)


def _handler(args) -> int:
    cfg = load_config(AutoencoderTrainConfig, args.config, args.overrides)
    summary = train(cfg, resume=args.resume)
    m = summary["metrics"]
    log.info("stopped at step %d (l1 %.4f); checkpoint %s; %d unreadable image(s) skipped",
             summary["step"], m.get("recon_l1", float("nan")), summary["checkpoint"], summary["skipped"])
    return 130 if summary["interrupted"] else 0
