"""`difftumor train {autoencoder,diffusion,segmentation}`: argument parsing and the three thin handlers.

Registering the stages imports no trainer (and so neither torch nor MONAI): each handler imports its
trainer when it runs. :data:`STAGE_MODULES` lists the trainer modules whose stage is offered.
"""

from __future__ import annotations

import importlib
import logging

log = logging.getLogger(__name__)

STAGE_MODULES: list[str] = [
    "backend.train.autoencoder",
    "backend.train.diffusion",
    "backend.train.segmentation",
]

# stage -> (help, description, example config, checkpoint that --resume continues)
STAGES = {
    "autoencoder": (
        "train the stage-1 3D VQGAN autoencoder",
        "Train the 3D VQGAN (official STEP1 recipe). Settings: --config YAML plus key=value overrides, e.g. "
        "data.source=/data/AbdomenAtlas max_steps=1000 model.n_hiddens=8.",
        "backend/configs/autoencoder.yaml", "OUTPUT_DIR/checkpoint_last.pt"),
    "diffusion": (
        "train the stage-2 conditional latent diffusion model",
        "Train the tumour diffusion model on CT + label maps with tumours (MSD / LiTS / KiTS layouts). stage=early "
        "trains the T=4 model on tumours < 20 mm, stage=noearly the T=200 model on the others. Settings: --config "
        "YAML plus key=value overrides, e.g. data.source=/data/Task03_Liver/dataset.json "
        "autoencoder=AutoencoderModel.ckpt.",
        "backend/configs/diffusion.yaml", "OUTPUT_DIR/checkpoint_last.pt"),
    "segmentation": (
        "train tumour segmentation with on-the-fly synthetic tumours (U-Net / nnU-Net / SwinUNETR)",
        "Train a segmentation network (background / organ / tumour) on real-tumour CTs and/or healthy CTs that "
        "receive synthetic tumours on the fly. Settings come from --config and key=value overrides (e.g. "
        "network.name=swinunetr data.fold=2 synthesis.enabled=false).",
        "backend/configs/segmentation*.yaml", "out_dir/last.pt"),
}


def register(sub) -> None:
    offered = [stage for stage in STAGES if f"backend.train.{stage}" in STAGE_MODULES]
    if not offered:
        return
    parser = sub.add_parser("train", help="train a stage (autoencoder, diffusion, segmentation)")
    stages = parser.add_subparsers(dest="stage", metavar="STAGE", required=True)
    for stage in offered:
        help_text, description, config, checkpoint = STAGES[stage]
        p = stages.add_parser(stage, help=help_text, description=description)
        add_config_arguments(p, config, checkpoint)
        p.set_defaults(func=HANDLERS[stage])


def add_config_arguments(parser, config: str, checkpoint: str) -> None:
    """The arguments every ``difftumor train STAGE`` takes: ``--config YAML``, ``--resume [CHECKPOINT]``
    and ``key=value`` overrides (the CLI takes a bare ``--resume`` before an override as "the last
    checkpoint" and accepts overrides on both sides of the options)."""
    parser.add_argument("--config", help=f"YAML config (see {config})")
    parser.add_argument("--resume", nargs="?", const="last", default=None, metavar="CHECKPOINT",
                        help=f"continue from {checkpoint} (or the given checkpoint); model settings must match it")
    parser.add_argument("overrides", nargs="*", metavar="key=value", help="config overrides (dotted keys)")


def _train(stage: str, config_class: str, args) -> dict:
    from backend.train.config import load_config

    trainer = importlib.import_module(f"backend.train.{stage}")
    cfg = load_config(getattr(trainer, config_class), args.config, args.overrides)
    return trainer.train(cfg, resume=args.resume)


def autoencoder_handler(args) -> int:
    summary = _train("autoencoder", "AutoencoderTrainConfig", args)
    log.info("stopped at step %d (l1 %.4f); checkpoint %s; %d unreadable image(s) skipped",
             summary["step"], summary["metrics"].get("recon_l1", float("nan")), summary["checkpoint"],
             summary["skipped"])
    return 130 if summary["interrupted"] else 0


def diffusion_handler(args) -> int:
    summary = _train("diffusion", "DiffusionTrainConfig", args)
    log.info("stopped at step %d (loss %.4f); weights %s; %d case(s) skipped (no tumour of this stage, or unreadable;"
             " -v lists them), %d tumour(s) larger than the crop",
             summary["step"], summary["metrics"].get("loss", float("nan")), summary["weights"], summary["skipped"],
             summary["too_large"])
    return 130 if summary["interrupted"] else 0


def segmentation_handler(args) -> int:
    result = _train("segmentation", "SegmentationConfig", args)
    if result["rank"] == 0:
        best = f"best validation tumour DSC {result['best']:.4f}" if result["best"] >= 0 else "no validation run"
        print(f"trained {result['step']} steps; {best}; outputs in {result['out_dir']}")
    return 130 if result["interrupted"] else 0


HANDLERS = {"autoencoder": autoencoder_handler, "diffusion": diffusion_handler, "segmentation": segmentation_handler}
