"""Organ vocabulary and organ masks from the four label conventions.

Organs: ``liver``, ``pancreas``, ``kidney`` (left + right together), ``kidney_left``,
``kidney_right``, ``spleen``.

Conventions understood by :func:`load_organ_mask`:

``totalseg``
    One multi-label file with TotalSegmentator v2 ids: 1 spleen, 2 kidney_right, 3 kidney_left,
    5 liver, 7 pancreas (``kidney`` = 2 + 3).
``atlas``
    An AbdomenAtlas-style case folder ``<case>/segmentations/<organ>.nii.gz`` (the
    ``segmentations`` folder itself is accepted too); ``kidney`` = ``kidney_left`` +
    ``kidney_right`` files (a case with only one kidney file uses that one).
``msd``
    MSD / LiTS / KiTS label maps: 0 background, 1 organ, 2 tumor (KiTS21 adds 3 cyst). The organ
    mask is every labelled voxel (``label >= 1``): the organ *including* its tumors. These maps
    do not tell kidney sides apart, so ``kidney_left``/``kidney_right`` are refused.
explicit ``label_id``
    ``mask = (labels == label_id)`` on any label file, whatever the convention.

``convention="auto"`` picks: a folder -> ``atlas``; a label map whose values are a subset of
{0, 1, 2} -> ``msd`` (this includes a plain binary organ mask), or of {0, 1, 2, 3} with label 2
touching label 1 (KiTS21: a tumour touches its kidney) -> ``msd``; anything else -> ``totalseg``.
A TotalSegmentator map that happens to hold only ids 1 and 2 is therefore read as ``msd``: pass
``convention="totalseg"`` for such a cropped map.
"""

from __future__ import annotations

import logging
import os
from pathlib import Path
from typing import Literal

import numpy as np

from backend.errors import DiffTumorError
from backend.io import Geometry, Volume, check_same_grid, read_image

ORGANS: tuple[str, ...] = ("liver", "pancreas", "kidney", "kidney_left", "kidney_right", "spleen")

#: TotalSegmentator v2 ("total" task) ids of the single structures this project names.
TOTALSEG_IDS: dict[str, int] = {
    "spleen": 1,
    "kidney_right": 2,
    "kidney_left": 3,
    "liver": 5,
    "pancreas": 7,
    "aorta": 52,
    "inferior_vena_cava": 63,
}

_RIBS = [f"rib_{side}_{k}" for side in ("left", "right") for k in range(1, 13)]

#: The 117 classes of TotalSegmentator v2's "total" task (multi-label output ids 1..117, ``--ml``).
TOTALSEG_V2_NAMES: dict[int, str] = dict(enumerate([
    "spleen", "kidney_right", "kidney_left", "gallbladder", "liver", "stomach", "pancreas", "adrenal_gland_right",
    "adrenal_gland_left", "lung_upper_lobe_left", "lung_lower_lobe_left", "lung_upper_lobe_right",
    "lung_middle_lobe_right", "lung_lower_lobe_right", "esophagus", "trachea", "thyroid_gland", "small_bowel",
    "duodenum", "colon", "urinary_bladder", "prostate", "kidney_cyst_left", "kidney_cyst_right", "sacrum",
    "vertebrae_S1", "vertebrae_L5", "vertebrae_L4", "vertebrae_L3", "vertebrae_L2", "vertebrae_L1",
    *[f"vertebrae_T{k}" for k in range(12, 0, -1)], *[f"vertebrae_C{k}" for k in range(7, 0, -1)],
    "heart", "aorta", "pulmonary_vein", "brachiocephalic_trunk", "subclavian_artery_right", "subclavian_artery_left",
    "common_carotid_artery_right", "common_carotid_artery_left", "brachiocephalic_vein_left",
    "brachiocephalic_vein_right", "atrial_appendage_left", "superior_vena_cava", "inferior_vena_cava",
    "portal_vein_and_splenic_vein", "iliac_artery_left", "iliac_artery_right", "iliac_vena_left", "iliac_vena_right",
    "humerus_left", "humerus_right", "scapula_left", "scapula_right", "clavicula_left", "clavicula_right",
    "femur_left", "femur_right", "hip_left", "hip_right", "spinal_cord", "gluteus_maximus_left",
    "gluteus_maximus_right", "gluteus_medius_left", "gluteus_medius_right", "gluteus_minimus_left",
    "gluteus_minimus_right", "autochthon_left", "autochthon_right", "iliopsoas_left", "iliopsoas_right", "brain",
    "skull", *_RIBS, "sternum", "costal_cartilages",
], start=1))  # fmt: skip

#: Names of the TotalSegmentator v2 ("total" task) ids this project lists (abdomen and lower thorax; ``info``).
TOTALSEG_NAMES: dict[int, str] = {i: TOTALSEG_V2_NAMES[i] for i in (
    1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 13, 14, 18, 19, 20, *range(27, 34), 52, 63, 64, 79, 86, 87, 88, 89,
    *range(98, 104), *range(110, 116), 117)}  # fmt: skip

#: Label ids that make up each organ of :data:`ORGANS` in a TotalSegmentator map.
ORGAN_TOTALSEG_IDS: dict[str, tuple[int, ...]] = {
    "liver": (5,),
    "pancreas": (7,),
    "kidney": (2, 3),
    "kidney_left": (3,),
    "kidney_right": (2,),
    "spleen": (1,),
}

#: Per-organ files (without extension) of an AbdomenAtlas ``segmentations`` folder.
ATLAS_FILES: dict[str, tuple[str, ...]] = {
    "liver": ("liver",),
    "pancreas": ("pancreas",),
    "kidney": ("kidney_left", "kidney_right"),
    "kidney_left": ("kidney_left",),
    "kidney_right": ("kidney_right",),
    "spleen": ("spleen",),
}

Convention = Literal["auto", "totalseg", "atlas", "msd"]
CONVENTIONS: tuple[str, ...] = ("auto", "totalseg", "atlas", "msd")
MSD_LABELS = {1: "organ", 2: "tumor", 3: "cyst"}

_ALIASES = {
    "kidneys": "kidney",
    "left_kidney": "kidney_left",
    "right_kidney": "kidney_right",
    "kidney_l": "kidney_left",
    "kidney_r": "kidney_right",
}

Source = str | os.PathLike | Volume | np.ndarray
log = logging.getLogger(__name__)


def parse_organ(name: str) -> str:
    """Normalise an organ name (case, spaces, dashes, a few aliases) or raise listing the allowed ones."""
    key = "_".join(str(name).strip().lower().replace("-", " ").replace("_", " ").split())
    key = _ALIASES.get(key, key)
    if key not in ORGANS:
        raise DiffTumorError(f"unknown organ '{name}'; choose one of {', '.join(ORGANS)}")
    return key


def detect_convention(labels: np.ndarray) -> str:
    """``"msd"`` if the values are a subset of {0, 1, 2}, else ``"totalseg"`` (see the module docstring).

    Values {0, 1, 2, 3} are either KiTS21 (kidney, tumour, cyst) or a TotalSegmentator map holding only
    the spleen and the kidneys; for a volume the two are told apart by anatomy: a KiTS tumour (2) touches
    its kidney (1), TotalSegmentator's right kidney (2) never touches the spleen (1).
    """
    values = set(np.unique(labels).tolist())
    if values <= {0, 1, 2}:
        return "msd"
    if values <= {0, 1, 2, 3} and {1, 2} <= values and np.ndim(labels) == 3 and _touches(labels, 2, 1):
        return "msd"
    return "totalseg"


def _touches(labels: np.ndarray, a: int, b: int) -> bool:
    """Whether a voxel of label ``a`` is face-adjacent to one of label ``b`` (looked at in ``a``'s bounding box)."""
    from scipy import ndimage

    box = ndimage.find_objects((labels == a).astype(np.uint8))[0]
    box = tuple(slice(max(s.start - 1, 0), s.stop + 1) for s in box)
    sub = labels[box]
    return bool((ndimage.binary_dilation(sub == a) & (sub == b)).any())


def _describe(source) -> str:
    if isinstance(source, Volume):
        return source.name
    if isinstance(source, np.ndarray):
        return "<label array>"
    return str(source)


MAX_LABEL_ID = 1000  # no label convention comes near this; a CT (HU up to 3000) does


def _as_labels(arr: np.ndarray, name: str) -> np.ndarray:
    """Integer label array; float maps are accepted only when every value is a whole number.
    Negative values or ids above :data:`MAX_LABEL_ID` mean an intensity image (a CT given as labels)."""
    if arr.dtype == np.bool_:
        return arr.astype(np.uint8)
    if not np.issubdtype(arr.dtype, np.integer):
        if not np.all(np.isfinite(arr)) or not np.array_equal(arr, np.round(arr)):
            raise DiffTumorError(f"{name}: not a label map (values are not whole numbers)")
        arr = arr.astype(np.int32)
    lo, hi = int(arr.min()), int(arr.max())
    if lo < 0 or hi > MAX_LABEL_ID:
        raise DiffTumorError(f"{name}: not a label map (values {lo}..{hi}; labels are 0..{MAX_LABEL_ID}); "
                             "is this the CT rather than its organ labels?")
    return arr


def _check_reference(reference, geometry: Geometry | None, name: str) -> None:
    if reference is None or geometry is None:
        return
    ref_geo = reference.geometry if isinstance(reference, Volume) else reference
    ref_name = reference.name if isinstance(reference, Volume) else "the CT"
    check_same_grid(ref_geo, geometry, names=(ref_name, name))


def load_organ_mask(
    source: Source,
    organ: str,
    *,
    convention: Convention = "auto",
    label_id: int | None = None,
    reference: Geometry | Volume | None = None,
) -> np.ndarray:
    """The boolean (z, y, x) mask of ``organ`` from a label file, AbdomenAtlas folder, Volume or array.

    ``reference`` (the CT's Geometry or Volume) makes a mask on a different grid an error.
    Raises :class:`DiffTumorError` naming the source for an unknown organ or convention, an organ
    absent from the mask, a grid mismatch, or an unreadable file.
    """
    return load_organ_and_tumors(source, organ, convention=convention, label_id=label_id, reference=reference)[0]


def load_organ_and_tumors(
    source: Source,
    organ: str,
    *,
    convention: Convention = "auto",
    label_id: int | None = None,
    reference: Geometry | Volume | None = None,
) -> tuple[np.ndarray, np.ndarray | None]:
    """(organ mask, tumours already labelled in it or None), as :func:`load_organ_mask` reads the organ.

    Only MSD / LiTS / KiTS maps label tumours (value 2, inside the organ mask ``label >= 1``); the
    other conventions, and an explicit ``label_id``, give None.
    """
    organ = parse_organ(organ)
    if convention not in CONVENTIONS:
        raise DiffTumorError(f"unknown label convention '{convention}'; choose one of {', '.join(CONVENTIONS)}")
    name = _describe(source)

    if not isinstance(source, (Volume, np.ndarray)) and Path(source).is_dir():
        if label_id is not None or convention not in ("auto", "atlas"):
            raise DiffTumorError(f"{name}: a folder is read as an AbdomenAtlas case; "
                                 f"convention '{convention}' / label_id need a label file")
        return _load_atlas(Path(source), organ, reference), None
    if convention == "atlas":
        raise DiffTumorError(f"{name}: convention 'atlas' needs a case folder with segmentations/<organ>.nii.gz")

    if isinstance(source, np.ndarray):
        labels, geometry = _as_labels(np.asarray(source), name), None
    else:
        volume = source if isinstance(source, Volume) else read_image(source)
        labels, geometry = _as_labels(volume.array, name), volume.geometry
    _check_reference(reference, geometry, name)

    if label_id is not None:
        mask = labels == int(label_id)
        if not mask.any():
            raise DiffTumorError(f"{name}: no voxels with label {int(label_id)} in this mask")
        warn_label_contradicts(labels, int(label_id), organ, convention, name)
        return mask, None

    if convention == "auto":
        convention = detect_convention(labels)
    if convention == "msd":
        if organ in ("kidney_left", "kidney_right"):
            raise DiffTumorError(f"{name}: MSD/KiTS label maps do not tell kidney sides apart; use organ 'kidney'")
        mask = labels >= 1
        if not mask.any():
            raise DiffTumorError(f"{name}: the label map is empty (every voxel 0), so it holds no '{organ}'")
        tumors = labels == 2
        return mask, (tumors if tumors.any() else None)

    ids = ORGAN_TOTALSEG_IDS[organ]
    mask = np.isin(labels, ids)
    if not mask.any():
        id_text = "label " + " or ".join(str(i) for i in ids)
        raise DiffTumorError(f"{name}: no '{organ}' voxels ({id_text}) in this mask")
    return mask, None


def warn_label_contradicts(labels: np.ndarray, label_id: int, organ: str, convention: str, name: str) -> None:
    """Log one warning when ``label_id`` names another structure than ``organ`` in the map's vocabulary
    (TotalSegmentator v2 or MSD/LiTS/KiTS, as :func:`detect_convention` reads the map): e.g. label 99, a rib in a
    TotalSegmentator map, given as the liver. The label is still used: the user asked for it."""
    if convention == "auto":
        convention = detect_convention(labels)
    if convention == "msd":
        what = MSD_LABELS.get(label_id)
        if what and what != "organ":
            log.warning("%s: label %d is the %s in an MSD/LiTS/KiTS label map, not the %s; using it as the %s as asked",
                        name, label_id, what, organ, organ)
        return
    if convention != "totalseg":
        return
    ids = ORGAN_TOTALSEG_IDS[organ]
    vocab = TOTALSEG_V2_NAMES.get(label_id)
    if vocab is not None and label_id not in ids:
        log.warning("%s: label %d is '%s' in TotalSegmentator v2, not the %s (label %s); using it as the %s as asked",
                    name, label_id, vocab, organ, " or ".join(map(str, ids)), organ)


def _atlas_file(seg_dir: Path, stem: str) -> Path | None:
    for suffix in (".nii.gz", ".nii"):
        p = seg_dir / f"{stem}{suffix}"
        if p.is_file():
            return p
    return None


def _load_atlas(folder: Path, organ: str, reference) -> np.ndarray:
    seg_dir = folder / "segmentations" if (folder / "segmentations").is_dir() else folder
    files = [f for f in (_atlas_file(seg_dir, stem) for stem in ATLAS_FILES[organ]) if f is not None]
    if not files:
        wanted = " or ".join(f"{stem}.nii.gz" for stem in ATLAS_FILES[organ])
        raise DiffTumorError(f"{folder}: no {wanted} in {seg_dir} (AbdomenAtlas case folder expected)")
    mask = None
    first_geometry = None
    for f in files:
        volume = read_image(f)
        _check_reference(reference, volume.geometry, str(f))
        if first_geometry is None:
            first_geometry = volume.geometry
        else:
            check_same_grid(first_geometry, volume.geometry, names=(str(files[0]), str(f)))
        arr = volume.array
        part = arr >= 0.5 if np.issubdtype(arr.dtype, np.floating) else arr > 0
        mask = part if mask is None else (mask | part)
    if not mask.any():
        raise DiffTumorError(f"{folder}: no '{organ}' voxels in {', '.join(f.name for f in files)}")
    return mask


def organs_present(source: Volume | np.ndarray, *, convention: Convention = "auto") -> dict[str, int]:
    """Voxel counts of the named structures found in a label map (for ``difftumor info``).

    TotalSegmentator maps give the structures of :data:`TOTALSEG_NAMES` that are present (other ids
    are left out); MSD-style maps give ``organ`` / ``tumor`` (/ ``cyst``) counts.
    """
    arr = source.array if isinstance(source, Volume) else np.asarray(source)
    labels = _as_labels(arr, _describe(source))
    if convention == "auto":
        convention = detect_convention(labels)
    counts = np.bincount(labels.ravel().astype(np.int64, copy=False)) if labels.min() >= 0 else None
    if counts is None:
        raise DiffTumorError(f"{_describe(source)}: label map has negative values")

    def count(i: int) -> int:
        return int(counts[i]) if i < len(counts) else 0

    table = MSD_LABELS if convention == "msd" else TOTALSEG_NAMES
    return {name: count(i) for i, name in sorted(table.items()) if count(i) > 0}
