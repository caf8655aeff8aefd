"""Training of the three stages (`difftumor train ...`; the command line is :mod:`backend.cli.train`).

One module per stage, each ``train(cfg, resume=None)`` reading top to bottom (config, device/seed, data,
model new or resumed, optimiser, loop): :mod:`.autoencoder`, :mod:`.diffusion`, :mod:`.segmentation`
(its data in :mod:`.segmentation_data`). Shared by concept: :mod:`.config` (dataclasses from YAML +
overrides, ranges), :mod:`.checkpoint` (RNG state, ``--resume`` rules; the file format is
:mod:`backend.checkpoint`), :mod:`.distributed` (torchrun/DDP), :mod:`.loop` (TrainingLoop, metrics, the
optimizer step), :mod:`.data` (seeded resumable draw order).
"""
