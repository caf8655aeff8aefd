"""`difftumor train {autoencoder,diffusion,segmentation}`.

Each stage module listed in :data:`STAGE_MODULES` defines ``register(subparsers)`` for its own
subcommand under ``train``. A stage is listed only once its training works.
"""

from __future__ import annotations

import importlib

STAGE_MODULES: list[str] = [
    "backend.train.autoencoder",
    "backend.train.diffusion",
    "backend.train.segmentation",
]


def register(sub) -> None:
    if not STAGE_MODULES:
        return
    parser = sub.add_parser("train", help="train a stage (autoencoder, diffusion, segmentation)")
    stages = parser.add_subparsers(dest="stage", metavar="STAGE", required=True)
    for name in STAGE_MODULES:
        importlib.import_module(name).register(stages)
