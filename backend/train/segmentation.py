"""`difftumor train segmentation`: tumour segmentation trained with tumours synthesized on the fly.

Reads top to bottom: config, device/seed, data (k-fold split saved as ``splits.json``; a seeded,
resumable draw stream, see :class:`~backend.train.common.SeededDraws`), transforms
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

from backend.errors import DiffTumorError
from backend.segmentation.networks import NetworkConfig

log = logging.getLogger(__name__)


@dataclass
class DataConfig:
    real: str | None = None  # CTs with real tumours: MSD dataset.json, LiTS/KiTS folder list file, AbdomenAtlas tree
    healthy: str | None = None  # healthy CTs (+ organ labels) that receive synthetic tumours
    organ_values: list[int] = field(default_factory=lambda: [1])  # raw organ label values in `real`
    tumor_values: list[int] = field(default_factory=lambda: [2])  # raw tumour values in `real` (KiTS cyst: add 3)
    healthy_organ_values: list[int] | None = None  # raw organ values in `healthy` (None: organ_values; TotalSeg liver: [5])
    # CTs with tumours synthesized beforehand (`difftumor synthesize --ct DIR --n K --out DIR`, labels 1 organ /
    # 2 tumour): extra training cases, never validated, no on-the-fly synthesis (keeps it off the training step)
    presynthesized: str | None = None
    use_real_for_training: bool = True  # false = "synthetic only": real cases only validate
    folds: int = 5  # k of the k-fold split of the real cases (1 = no validation split)
    fold: int = 0
    split_seed: int = 0
    split_file: str | None = None  # reuse an existing splits.json instead of drawing one
    pos_neg: list[float] = field(default_factory=lambda: [1.0, 1.0])  # RandCropByPosNegLabel pos : neg
    foreground_radius: float | None = None  # healthy crops need > 4/3·π·R³ organ voxels (None: release R per organ)
    crop_tries: int = 30  # healthy-crop retries before the last crop is kept (R shrinks by 5 every 5 tries)
    cache_rate: float = 0.0  # fraction of the deterministic preprocessing cached in memory
    num_workers: int = 4  # DataLoader workers (the synthesis runs there, off the GPU step)


@dataclass
class SynthesisConfig:
    enabled: bool = True
    method: Literal["model-based", "diffusion"] = "model-based"
    prob: float = 0.5  # release: a healthy crop gets a tumour with p 0.5
    stage_probs: list[float] = field(default_factory=lambda: [0.8, 0.1, 0.1])  # early / mid / large
    weights_dir: str | None = None  # diffusion weights folder (None: $DIFFTUMOR_WEIGHTS / user config)
    weights_organ: str | None = None  # cross-organ: use this organ's diffusion weights (None: `organ`)
    device: str = "cpu"  # where the workers run the diffusion model ("cuda" needs spawn workers)


@dataclass
class SegmentationConfig:
    organ: str = "liver"
    out_dir: str = "runs/segmentation"
    network: NetworkConfig = field(default_factory=NetworkConfig)
    data: DataConfig = field(default_factory=DataConfig)
    synthesis: SynthesisConfig = field(default_factory=SynthesisConfig)
    roi_size: list[int] = field(default_factory=lambda: [96, 96, 96])
    hu_range: list[float] = field(default_factory=lambda: [-175.0, 250.0])  # -> [0, 1], clipped
    rotate90_prob: float = 0.1
    shift_intensity: float = 0.1
    shift_intensity_prob: float = 0.2
    batch_size: int = 2  # per process
    lr: float = 2e-4
    weight_decay: float = 1e-5
    warmup_steps: int = 500  # linear warm-up, then cosine annealing to 0 at max_steps
    max_steps: int = 40000
    grad_clip: float = 12.0  # max gradient norm (0: off)
    amp: bool = True  # bfloat16/float16 autocast on CUDA
    val_every: int = 2000  # steps (0: never)
    val_overlap: float = 0.5  # sliding-window overlap during validation (release 0.5)
    save_every: int = 1000
    log_every: int = 20
    seed: int = 0
    device: str = "auto"


# ------------------------------------------------------------------------------------- checks
def check_config(cfg: SegmentationConfig) -> None:
    """Refuse, in one line naming the key, a setting that would fail (or silently mislead) later: in the
    middle of training, in a DataLoader worker, or at the first validation after hours of training."""
    from backend.organs import parse_organ

    def bad(key: str, value, why: str):
        raise DiffTumorError(f"{key}={value}: {why}")

    def probability(key: str, value):
        if not 0.0 <= value <= 1.0:
            bad(key, value, "must be a probability in [0, 1]")

    def organ_name(key: str, value: str):
        try:
            parse_organ(value)
        except DiffTumorError as exc:
            raise DiffTumorError(f"{key}={value}: {exc}") from None

    organ_name("organ", cfg.organ)
    if len(cfg.roi_size) != 3 or any(int(s) < 1 for s in cfg.roi_size):
        bad("roi_size", list(cfg.roi_size), "needs 3 positive crop sizes (x, y, z voxels at 1 mm), e.g. [96, 96, 96]")
    try:  # the network's own checks (SwinUNETR: multiples of 32) with the crop size training will use
        NetworkConfig(**{**cfg.network.__dict__, "roi_size": tuple(cfg.roi_size)})
    except ValueError as exc:
        raise DiffTumorError(f"network.name={cfg.network.name}: {exc}") from None
    if len(cfg.hu_range) != 2 or not cfg.hu_range[0] < cfg.hu_range[1]:
        bad("hu_range", list(cfg.hu_range), "needs [low, high] Hounsfield units with low < high, e.g. [-175, 250]")
    if not cfg.lr > 0:
        bad("lr", cfg.lr, "must be > 0")
    for key in ("weight_decay", "grad_clip", "warmup_steps", "shift_intensity"):
        if getattr(cfg, key) < 0:
            bad(key, getattr(cfg, key), "must be 0 or more")
    if not 0.0 <= cfg.val_overlap < 1.0:
        bad("val_overlap", cfg.val_overlap, "sliding-window overlap must be in [0, 1)")
    probability("rotate90_prob", cfg.rotate90_prob)
    probability("shift_intensity_prob", cfg.shift_intensity_prob)
    d = cfg.data
    if len(d.pos_neg) != 2 or min(d.pos_neg) < 0 or max(d.pos_neg) <= 0:
        bad("data.pos_neg", list(d.pos_neg), "needs [pos, neg] crop weights, >= 0 and not both 0, e.g. [1, 1]")
    if d.folds < 1:
        bad("data.folds", d.folds, "must be >= 1")
    if d.split_file is None and not 0 <= d.fold < max(d.folds, 1):
        bad("data.fold", d.fold, f"must be 0..{d.folds - 1} with data.folds={d.folds}")
    if d.num_workers < 0:
        bad("data.num_workers", d.num_workers, "must be 0 (load in the main process) or more")
    probability("data.cache_rate", d.cache_rate)
    if d.crop_tries < 1:
        bad("data.crop_tries", d.crop_tries, "must be >= 1")
    if d.foreground_radius is not None and not d.foreground_radius > 0:
        bad("data.foreground_radius", d.foreground_radius, "must be > 0 mm (or null for the release's radius)")
    if not d.organ_values:
        bad("data.organ_values", list(d.organ_values), "needs at least one organ label value, e.g. [1]")
    for key, values in (("data.organ_values", d.organ_values), ("data.tumor_values", d.tumor_values),
                        ("data.healthy_organ_values", d.healthy_organ_values or [])):
        if any(int(v) < 0 for v in values):
            bad(key, list(values), "label values are whole numbers >= 0")
    common_values = sorted(set(d.organ_values) & set(d.tumor_values))
    if common_values:
        raise DiffTumorError(f"data.organ_values={list(d.organ_values)} and data.tumor_values={list(d.tumor_values)}: "
                             f"{common_values} in both; a label value is either organ or tumour")
    s = cfg.synthesis
    probability("synthesis.prob", s.prob)
    if len(s.stage_probs) != 3 or min(s.stage_probs) < 0 or not math.isclose(sum(s.stage_probs), 1.0, abs_tol=1e-6):
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
                             f"{', '.join(WEIGHT_ORGANS)}); set synthesis.weights_organ or synthesis.method=model-based")
    folder = WeightsFolder(*resolve_weights_dir(s.weights_dir, what="synthesis.weights_dir"))
    if folder.root is None:
        raise DiffTumorError("synthesis.method=diffusion: no weights folder found (set synthesis.weights_dir=DIR or "
                             "$DIFFTUMOR_WEIGHTS, or run 'difftumor weights fetch'); synthesis.method=model-based needs none")
    stages = [st for st, p in (("early", s.stage_probs[0]), ("mid_late", s.stage_probs[1] + s.stage_probs[2])) if p > 0]
    missing = sorted({n for st in stages for n in folder.missing(organ, st)}, key=lambda n: (n != AE_NAME, n))
    if missing:
        where = "synthesis.weights_dir" if folder.source == "argument" else folder.source
        raise DiffTumorError(f"weights folder {folder.root} (from {where}): lacks {', '.join(missing)}, needed for "
                             f"{organ} tumours with synthesis.method=diffusion")
    return f"diffusion synthesis with {organ} weights from {folder.root} ({folder.source})"


def _read_grid(path: str):
    """The voxel grid of an image file from its header only (no voxel data read)."""
    import SimpleITK as sitk

    from backend.io import Geometry, read_image

    p = Path(path)
    if p.is_dir():  # a DICOM series: read it whole
        return read_image(p).geometry
    reader = sitk.ImageFileReader()
    reader.SetFileName(str(p))
    try:
        reader.ReadImageInformation()
    except RuntimeError:
        return read_image(p).geometry  # raises the one-line reason
    if reader.GetDimension() != 3:
        return read_image(p).geometry  # 4D with one frame is fine; others raise the one-line reason
    return Geometry(reader.GetSize(), reader.GetSpacing(), reader.GetOrigin(), reader.GetDirection())


def check_items(items: list[dict], *, threads: int = 8) -> tuple[list[dict], list[tuple[str, str]]]:
    """Split ``items`` into usable ones and ``(case, reason)`` for cases whose image or label cannot be read
    or whose label is not on the image's grid. Headers only, so it is quick on large datasets."""
    from concurrent.futures import ThreadPoolExecutor

    from backend.io import check_same_grid

    def reason(item: dict) -> str | None:
        try:
            check_same_grid(_read_grid(item["image"]), _read_grid(item["label"]), names=(item["image"], item["label"]))
        except DiffTumorError as exc:
            return str(exc)
        return None

    with ThreadPoolExecutor(max_workers=max(1, min(threads, len(items)))) as pool:
        reasons = list(pool.map(reason, items))
    ok = [it for it, r in zip(items, reasons) if r is None]
    skipped = [(it["name"], r) for it, r in zip(items, reasons) if r is not None]
    return ok, skipped


def _write_skipped(path: Path, skipped: list[tuple[str, str, str]]) -> None:
    """``case,role,reason`` of the cases left out (header only when none was)."""
    import csv
    import io

    from backend.io import write_text_atomic

    text = io.StringIO()
    w = csv.writer(text, lineterminator="\n")
    w.writerow(["case", "role", "reason"])
    w.writerows(skipped)
    write_text_atomic(path, text.getvalue())


# --------------------------------------------------------------------------------------- data
def _label_for(case, organ: str) -> tuple[str, bool]:
    """(label file, is a binary organ mask) of a case. AbdomenAtlas cases use
    ``segmentations/<organ>.nii.gz`` (a 0/1 organ mask) when it exists, else their label file."""
    if case.segmentations is not None:
        p = Path(case.segmentations) / f"{organ}.nii.gz"
        if p.is_file():
            return str(p), True
    if case.label is not None:
        return str(case.label), False
    raise DiffTumorError(f"{case.image}: case has no label and no segmentations/{organ}.nii.gz")


def build_items(cfg: SegmentationConfig, out_dir: Path, *, write: bool = True):
    """(train items, val items, splits) as MONAI dicts; writes (``write``) or reuses ``splits.json``."""
    from backend.data import list_cases
    from backend.segmentation.splits import fold_cases, load_splits, make_kfold, save_splits

    if cfg.data.real is None and cfg.data.healthy is None and cfg.data.presynthesized is None:
        raise DiffTumorError("data: give data.real, data.healthy and/or data.presynthesized")
    real = list_cases(cfg.data.real, require_labels=True) if cfg.data.real else []
    healthy = list_cases(cfg.data.healthy, require_labels=True) if cfg.data.healthy else []
    h_values = cfg.data.healthy_organ_values or cfg.data.organ_values
    by_name = {}
    for c in real:
        path, _ = _label_for(c, cfg.organ)
        by_name[c.name] = {"image": str(c.image), "label": path, "name": c.name, "healthy": 0,
                           "label_values": (tuple(cfg.data.organ_values), tuple(cfg.data.tumor_values))}
    for c in healthy:
        path, binary = _label_for(c, cfg.organ)
        by_name[c.name] = {"image": str(c.image), "label": path, "name": c.name, "healthy": 1,
                           "label_values": ((1,) if binary else tuple(h_values), ())}
    split_path = out_dir / "splits.json"
    if cfg.data.split_file:
        splits = load_splits(Path(cfg.data.split_file))
    elif split_path.is_file():
        splits = load_splits(split_path)
    else:
        splits = make_kfold([c.name for c in real], [c.name for c in healthy], k=cfg.data.folds,
                            seed=cfg.data.split_seed, organ=cfg.organ)
    missing = sorted({n for f in splits["folds"] for n in f["train"] + f["val"]} - set(by_name))
    if missing:
        raise DiffTumorError(f"split file: {len(missing)} case(s) not in the data sources (first: {missing[0]})")
    if write:
        save_splits(splits, split_path)
    split_name = cfg.data.split_file or split_path
    train, val = fold_cases(splits, cfg.data.fold, where=f"data.fold={cfg.data.fold}: split file {split_name}")
    if not cfg.data.use_real_for_training:
        train = [n for n in train if by_name[n]["healthy"]]
    extra = []
    if cfg.data.presynthesized:
        for c in list_cases(cfg.data.presynthesized, require_labels=True):
            path, binary = _label_for(c, cfg.organ)
            extra.append({"image": str(c.image), "label": path, "name": f"presynthesized/{c.name}", "healthy": 0,
                          "label_values": ((1,), ()) if binary else ((1,), (2,))})
    if not train and not extra:
        raise DiffTumorError("data: no training case left (synthetic-only runs need data.healthy or data.presynthesized)")
    return [by_name[n] for n in train] + extra, [by_name[n] for n in val], splits


def build_transforms(cfg: SegmentationConfig, *, train: bool):
    """Appendix E.2: orientation, 1 mm, HU window, pad/crop 96³, rotate-90, intensity shift, synthesis."""
    from monai import transforms as T

    from backend.organs import parse_organ
    from backend.segmentation.transforms import (FOREGROUND_RADIUS_MM, LoadVolumed, MapLabelsd, RandOrganCropd,
                                                 RandTumorSynthesisd)

    keys = ["image", "label"]
    lo, hi = cfg.hu_range
    xs = [
        LoadVolumed(keys),  # (1, X, Y, Z) MetaTensors with the RAS affine (any format backend.io reads)
        MapLabelsd("label", values_key="label_values"),
        T.Orientationd(keys, axcodes="RAS", labels=(("L", "R"), ("P", "A"), ("I", "S"))),  # explicit: no FutureWarning
        T.Spacingd(keys, pixdim=(1.0, 1.0, 1.0), mode=("bilinear", "nearest")),
        T.ScaleIntensityRanged("image", a_min=lo, a_max=hi, b_min=0.0, b_max=1.0, clip=True),
    ]
    if not train:
        return T.Compose(xs + [T.EnsureTyped(keys, dtype=(torch.float32, torch.uint8), track_meta=False)])
    pos, neg = cfg.data.pos_neg
    radius = cfg.data.foreground_radius or FOREGROUND_RADIUS_MM[parse_organ(cfg.organ)]
    xs += [
        T.SpatialPadd(keys, spatial_size=cfg.roi_size, value=0),
        # the release's crop: pos : neg around the label, healthy crops retried until they hold enough organ
        # (crop-centre candidates are found once per draw, not cached: for a whole CT they take hundreds of MB)
        RandOrganCropd(keys, "label", cfg.roi_size, radius=radius, pos=pos, neg=neg, image_key="image",
                       image_threshold=0, max_tries=cfg.data.crop_tries),
        T.RandRotate90d(keys, prob=cfg.rotate90_prob, max_k=3),
        T.RandShiftIntensityd("image", offsets=cfg.shift_intensity, prob=cfg.shift_intensity_prob),
    ]
    if cfg.synthesis.enabled:
        s = cfg.synthesis
        xs.append(RandTumorSynthesisd(keys, prob=s.prob, stage_probs=s.stage_probs, organ=cfg.organ, method=s.method,
                                      weights_dir=s.weights_dir, weights_organ=s.weights_organ, device=s.device))
    xs.append(T.EnsureTyped(keys, dtype=(torch.float32, torch.uint8), track_meta=False))
    return T.Compose(xs)


class _CaseErrors(torch.utils.data.Dataset):
    """A MONAI dataset whose user errors (a DiffTumorError anywhere in MONAI's chain of "applying
    transform" RuntimeErrors) come out as one DiffTumorError naming the case."""

    def __init__(self, dataset, items: list[dict]):
        self.dataset, self.items = dataset, items

    @property
    def transform(self):  # SeededDraws reseeds it
        return self.dataset.transform

    def __len__(self) -> int:
        return len(self.dataset)

    def __getitem__(self, index):
        try:
            return self.dataset[index]
        except Exception as exc:
            cause = user_error(exc)
            if cause is None:
                raise
            raise DiffTumorError(f"training case {self.items[index]['name']}: {cause}") from None


def user_error(exc: BaseException) -> str | None:
    """The message of the DiffTumorError behind ``exc`` (its cause chain, or the text of an error a
    DataLoader worker re-raised in the main process), else None."""
    seen = exc
    while seen is not None:
        if isinstance(seen, DiffTumorError):
            text = str(seen)
            break
        seen = seen.__cause__ or seen.__context__
    else:
        text = str(exc) if "DiffTumorError: " in str(exc) else None
    if text is not None and "DiffTumorError: " in text:  # a worker's traceback text: keep its last message
        text = text.rsplit("DiffTumorError: ", 1)[1]
    return text


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
def train(cfg: SegmentationConfig, *, resume: bool | str | None = None) -> dict:
    from monai.data import CacheDataset, DataLoader, Dataset
    from monai.losses import DiceCELoss
    from monai.optimizers import WarmupCosineSchedule

    from backend.segmentation.networks import build_network
    from backend.train import common

    # config, device, seed: every check before anything is written
    common.check_positive(cfg, "max_steps", "batch_size", "log_every", "save_every", zero_ok=("val_every",))
    check_config(cfg)
    out_dir = common.check_output_dir(cfg.out_dir, "out_dir")
    dist, logger = common.start_run(cfg.device, seed=cfg.seed, logger_name=__name__)
    last_path, best_path = out_dir / "last.pt", out_dir / "best.pt"
    cfg.network = NetworkConfig(**{**cfg.network.__dict__, "roi_size": tuple(cfg.roi_size)})
    ckpt = common.load_resume_checkpoint(resume, last_path, "segmentation") if resume else None
    if ckpt is not None:  # same network, organ and training/validation cases, and steps left to train
        # (another fold, or real cases left out of training, would train on cases the run validated on)
        common.check_resume(common.resume_path(resume, last_path), ckpt,
                            {"model": common.config_to_dict(cfg.network), "organ": cfg.organ,
                             "data.fold": cfg.data.fold, "data.use_real_for_training": cfg.data.use_real_for_training},
                            max_steps=cfg.max_steps)
    else:  # a fresh run would overwrite the earlier run's checkpoints and mix its CSVs
        common.refuse_fresh_run_over(last_path, "out_dir")
    weights_note = check_diffusion_weights(cfg)
    if weights_note:
        logger.info("%s", weights_note)
    elif cfg.synthesis.enabled and cfg.synthesis.weights_organ:
        logger.warning("synthesis.weights_organ=%s is read by the diffusion method only; synthesis.method=%s "
                       "ignores it (the cross-organ setting needs synthesis.method=diffusion)",
                       cfg.synthesis.weights_organ, cfg.synthesis.method)

    # data: rank 0 draws and saves the split, the other ranks read it; cases whose label is not on the CT's
    # grid (or that cannot be read) are left out with a warning and listed in skipped.csv
    if dist.is_main:
        train_items, val_items, splits = build_items(cfg, out_dir, write=False)
        train_items, skipped = check_items(train_items)
        val_items, skipped_val = check_items(val_items)
        skipped = [(c, "train", r) for c, r in skipped] + [(c, "validation", r) for c, r in skipped_val]
        for case, role, reason in skipped:
            logger.warning("skipped %s case %s: %s", role, case, reason)
        if not train_items:
            raise DiffTumorError(f"data: none of the training cases can be used (first: {skipped[0][0]}: {skipped[0][2]})")
        out_dir.mkdir(parents=True, exist_ok=True)
        from backend.io import write_text_atomic
        from backend.segmentation.splits import save_splits

        save_splits(splits, out_dir / "splits.json")
        write_text_atomic(out_dir / "config.yaml", yaml.safe_dump(common.config_to_dict(cfg), sort_keys=False))
        _write_skipped(out_dir / "skipped.csv", skipped)
        if ckpt is None:  # a fresh run: rows of an earlier attempt that crashed before its first checkpoint go
            for name in ("metrics.csv", "val_metrics.csv"):
                common.MetricsWriter(out_dir / name).truncate_after(0)
    if dist.distributed:
        torch.distributed.barrier()
    if not dist.is_main:
        train_items, val_items, _ = build_items(cfg, out_dir, write=False)
        train_items, val_items = check_items(train_items)[0], check_items(val_items)[0]
    tf = build_transforms(cfg, train=True)
    ds = (CacheDataset(train_items, tf, cache_rate=cfg.data.cache_rate, num_workers=cfg.data.num_workers or None,
                       progress=False) if cfg.data.cache_rate > 0 else Dataset(train_items, tf))
    # a seeded, resumable stream of draws: each draw reseeds the random transforms (crop, augmentation,
    # synthesis), so a resumed run sees exactly the data an uninterrupted one would have seen
    schedule = common.DrawSchedule(len(ds), seed=cfg.seed, rank=dist.rank, world_size=dist.world_size)
    draws = int(ckpt.get("draws", 0)) if ckpt is not None else 0
    schedule.seek(draws)
    loader = DataLoader(common.SeededDraws(_CaseErrors(ds, train_items)), batch_size=cfg.batch_size, sampler=common.DrawSampler(schedule),
                        num_workers=cfg.data.num_workers, persistent_workers=cfg.data.num_workers > 0,
                        pin_memory=dist.device.type == "cuda",
                        # CUDA in worker processes (diffusion synthesis on the GPU) needs spawned workers
                        multiprocessing_context="spawn" if cfg.synthesis.device.startswith("cuda") and cfg.data.num_workers else None)
    logger.info("training on %d cases (%d healthy), validating on %d; fold %d", len(train_items),
             sum(i["healthy"] for i in train_items), len(val_items), cfg.data.fold)

    # model, new or resumed
    model = build_network(cfg.network).to(dist.device)
    opt = torch.optim.AdamW(model.parameters(), lr=cfg.lr, weight_decay=cfg.weight_decay)
    sched = WarmupCosineSchedule(opt, warmup_steps=min(cfg.warmup_steps, max(cfg.max_steps - 1, 0)), t_total=cfg.max_steps)
    step, best = 0, -1.0
    if ckpt is not None:
        model.load_state_dict(ckpt["model"])
        opt.load_state_dict(ckpt["optimizer"])
        # the schedule follows this run's max_steps / warm-up / lr, continued at the saved step
        changed = common.resume_lr_scheduler(sched, ckpt["scheduler"])
        step, best = int(ckpt["step"]), float(ckpt.get("best", -1.0))
        common.set_rng_state(ckpt["rng"])
        logger.info("resumed from %s at step %d", last_path, step)
        if changed:
            logger.info("learning-rate schedule rebuilt for the current config (%s)", ", ".join(changed))
    net = common.wrap_ddp(model, dist)
    loss_fn = DiceCELoss(to_onehot_y=True, softmax=True, squared_pred=True, smooth_nr=0.0, smooth_dr=1e-6)
    use_amp = cfg.amp and dist.device.type == "cuda"
    amp_dtype = torch.bfloat16 if use_amp and torch.cuda.is_bf16_supported() else torch.float16
    scaler = torch.amp.GradScaler("cuda", enabled=use_amp and amp_dtype == torch.float16)

    def save(path: Path):
        common.save_checkpoint(
            path, stage="segmentation", config=common.config_to_dict(cfg),
            model_config=common.config_to_dict(cfg.network), organ=cfg.organ, step=step, best=best,
            model=model.state_dict(), optimizer=opt.state_dict(), scheduler=sched.state_dict(), rng=common.rng_state(),
            draws=draws,
        )

    # loop
    val_writer = common.MetricsWriter(out_dir / "val_metrics.csv") if dist.is_main else None
    if val_writer is not None and step > 0:
        val_writer.truncate_after(step)  # validations after the checkpoint are run again
    batches = iter(loader)
    run_loss, run_syn, n_run = 0.0, 0.0, 0
    result = {"step": step, "best": best}
    with common.TrainingLoop(dist, out_dir / "metrics.csv", step=step, max_steps=cfg.max_steps,
                             log_every=cfg.log_every, desc="segmentation") as loop:
        while loop.running(step):
            try:
                batch = next(batches)
            except Exception as exc:  # a worker's DiffTumorError arrives as text with its traceback
                cause = user_error(exc)
                if cause is None:
                    raise
                raise DiffTumorError(cause) from None
            x = batch["image"].to(dist.device, non_blocking=True)  # (B, 1, X, Y, Z) in [0, 1]
            y = batch["label"].to(dist.device, non_blocking=True)  # (B, 1, X, Y, Z) in {0, 1, 2}
            draws += x.shape[0]
            with torch.autocast(dist.device.type, dtype=amp_dtype, enabled=use_amp):
                loss = loss_fn(net(x), y)
            opt.zero_grad(set_to_none=True)
            scaler.scale(loss).backward()
            if cfg.grad_clip > 0:
                scaler.unscale_(opt)
                torch.nn.utils.clip_grad_norm_(model.parameters(), cfg.grad_clip)
            scaler.step(opt)
            scaler.update()
            sched.step()
            step += 1
            if not math.isfinite(loss.item()):
                raise DiffTumorError(f"training diverged at step {step} (loss {loss.item()}); lower lr")
            run_loss += loss.item()
            run_syn += float(batch["synthetic"].float().mean()) if "synthetic" in batch else 0.0
            n_run += 1
            loop.tick()
            if loop.due(step):
                row = {"loss": run_loss / n_run, "lr": sched.get_last_lr()[0], "synthetic_fraction": run_syn / n_run}
                loop.log(step, row, loss=f"{row['loss']:.4f}")
                result.update(row)
                run_loss, run_syn, n_run = 0.0, 0.0, 0
            if cfg.val_every and val_items and (step % cfg.val_every == 0 or step == cfg.max_steps) and dist.is_main:
                metrics = validate(model, val_items, cfg, dist.device)
                val_writer.write(step, metrics)
                result.update(metrics)
                if metrics["val_tumor_dsc"] > best:
                    best = metrics["val_tumor_dsc"]
                    save(best_path)
            if dist.is_main and (step % cfg.save_every == 0):
                save(last_path)
        if dist.is_main:
            save(last_path)
            if not best_path.is_file():
                save(best_path)
            val_writer.close()
    result.update(step=step, best=best, out_dir=str(out_dir), rank=dist.rank, interrupted=loop.interrupted)
    return result


# ---------------------------------------------------------------------------------------- CLI
def register(stages) -> None:
    p = stages.add_parser(
        "segmentation",
        help="train tumour segmentation with on-the-fly synthetic tumours (U-Net / nnU-Net / SwinUNETR)",
        description="Train a segmentation network (background / organ / tumour) on real-tumour CTs and/or healthy "
        "CTs that receive synthetic tumours on the fly. Settings come from --config and key=value overrides "
        "(e.g. network.name=swinunetr data.fold=2 synthesis.enabled=false).",
    )
    from backend.train.common import add_config_arguments

    add_config_arguments(p, "backend/configs/segmentation*.yaml", "out_dir/last.pt")
    p.set_defaults(func=handler)


def handler(args) -> int:
    from backend.train.common import load_config

    cfg = load_config(SegmentationConfig, args.config, args.overrides)
    result = train(cfg, resume=args.resume)
    if result["rank"] == 0:
        best = f"best validation tumour DSC {result['best']:.4f}" if result["best"] >= 0 else "no validation run"
        print(f"trained {result['step']} steps; {best}; outputs in {result['out_dir']}")
    return 130 if result["interrupted"] else 0
