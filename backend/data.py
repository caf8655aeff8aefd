"""Dataset listing shared by all training stages.

:func:`list_cases` turns whatever the user points at into a sorted list of :class:`Case` records
(image path, optional label path, optional per-organ segmentation folder, a case name). Supported
sources, detected in this order:

1. an MSD ``dataset.json`` (or a folder holding one): ``training`` entries ``{"image", "label"}``,
   paths relative to the JSON's folder (``imagesTr`` / ``labelsTr``);
2. a list file (any other regular file, e.g. ``.txt``/``.csv``): one case per line, ``image[,label]``
   (comma or tab separated; ``#`` comments and blank lines ignored; relative paths are taken relative
   to the list file's folder);
3. an AbdomenAtlas-style tree: ``<root>/<case>/ct.nii.gz`` with optional ``segmentations/`` (per-organ
   masks such as ``liver.nii.gz``) and optional ``combined_labels.nii.gz`` (used as ``label``), or
   ``label.nii.gz`` instead, which makes the output folder of ``difftumor synthesize --ct DIR --n K``
   (``<case>_s<k>/ct.nii.gz`` + ``label.nii.gz``, 1 organ / 2 tumour) a data source too;
4. a folder of CT files (``*.nii.gz``, ``*.nii``, ``*.nrrd``, ``*.mha``, ...), labels absent.

Nothing is read here beyond directory listings (and the JSON/list text); reading and preprocessing
happen in the stage's transforms. Every problem is one DiffTumorError line naming the path.

Public API::

    Case(image: Path, label: Path | None = None, segmentations: Path | None = None, name: str = "")
    list_cases(source, *, require_labels=False) -> list[Case]
    split_cases(cases, *, val_fraction=0.1, seed=0, min_val=1) -> (train, val)
    label_for(case, organ) -> (label file, is a binary organ mask)
"""

from __future__ import annotations

import json
import random
from dataclasses import dataclass
from pathlib import Path

from backend.errors import DiffTumorError
from backend.io import image_suffix, strip_image_suffix

ATLAS_IMAGE = "ct.nii.gz"
ATLAS_LABEL = "combined_labels.nii.gz"
SYNTHESIZED_LABEL = "label.nii.gz"  # what `difftumor synthesize` writes beside ct.nii.gz


@dataclass(frozen=True)
class Case:
    image: Path
    label: Path | None = None
    segmentations: Path | None = None  # AbdomenAtlas per-organ mask folder
    name: str = ""

    def as_dict(self) -> dict:
        """MONAI dictionary-transform input: ``{"image": str, "label": str?, "name": str}``."""
        d = {"image": str(self.image), "name": self.name}
        if self.label is not None:
            d["label"] = str(self.label)
        return d


def _resolve(base: Path, entry: str, where: str, what: str) -> Path:
    p = Path(entry.strip())
    p = p if p.is_absolute() else (base / p)
    if not p.exists():
        raise DiffTumorError(f"{where}: {what} '{entry.strip()}' does not exist")
    return p


def _from_msd(json_path: Path) -> list[Case]:
    try:
        meta = json.loads(json_path.read_text(encoding="utf-8"))
    except (OSError, json.JSONDecodeError) as exc:
        raise DiffTumorError(f"{json_path}: not a readable dataset.json ({exc})") from None
    entries = meta.get("training") if isinstance(meta, dict) else None
    if not isinstance(entries, list):
        raise DiffTumorError(f"{json_path}: no 'training' list (expected the MSD dataset.json layout)")
    base = json_path.parent
    cases = []
    for i, e in enumerate(entries):
        if isinstance(e, str):
            e = {"image": e}
        if not isinstance(e, dict) or "image" not in e:
            raise DiffTumorError(f"{json_path}: training entry {i} has no 'image'")
        img = _resolve(base, e["image"], f"{json_path}: training entry {i}", "image")
        lab = _resolve(base, e["label"], f"{json_path}: training entry {i}", "label") if e.get("label") else None
        cases.append(Case(img, lab, None, strip_image_suffix(img)))
    return cases


def _from_list(list_path: Path) -> list[Case]:
    try:
        lines = list_path.read_text(encoding="utf-8").splitlines()
    except (OSError, UnicodeDecodeError) as exc:
        raise DiffTumorError(f"{list_path}: not a readable list file ({type(exc).__name__})") from None
    base = list_path.parent
    cases = []
    for n, line in enumerate(lines, 1):
        line = line.split("#", 1)[0].strip()
        if not line:
            continue
        parts = [p.strip() for p in line.replace("\t", ",").split(",") if p.strip()]
        if len(parts) > 2:
            raise DiffTumorError(f"{list_path}: line {n}: expected 'image[,label]', got {len(parts)} fields")
        img = _resolve(base, parts[0], f"{list_path}: line {n}", "image")
        lab = _resolve(base, parts[1], f"{list_path}: line {n}", "label") if len(parts) == 2 else None
        if img.is_dir() and (img / ATLAS_IMAGE).is_file():  # a line may name an AbdomenAtlas case folder
            cases.append(_atlas_case(img))
        else:
            cases.append(Case(img, lab, None, strip_image_suffix(img)))
    return cases


def _atlas_case(case_dir: Path) -> Case:
    seg = case_dir / "segmentations"
    lab = next((p for p in (case_dir / ATLAS_LABEL, case_dir / SYNTHESIZED_LABEL) if p.is_file()), None)
    return Case(case_dir / ATLAS_IMAGE, lab, seg if seg.is_dir() else None, case_dir.name)


def list_cases(source, *, require_labels: bool = False) -> list[Case]:
    """All cases under ``source`` (see module docstring). Raises one-line DiffTumorErrors."""
    src = Path(source).expanduser()
    if not src.exists():
        raise DiffTumorError(f"{src}: data source does not exist")
    if src.is_dir() and (src / "dataset.json").is_file():
        src = src / "dataset.json"
    if src.is_file():
        if image_suffix(src):
            cases = [Case(src, None, None, strip_image_suffix(src))]
        elif src.suffix.lower() == ".json":
            cases = _from_msd(src)
        else:
            cases = _from_list(src)
    else:
        atlas = sorted(d for d in src.iterdir() if d.is_dir() and (d / ATLAS_IMAGE).is_file())
        if atlas:
            cases = [_atlas_case(d) for d in atlas]
        else:
            files = sorted(p for p in src.iterdir() if p.is_file() and image_suffix(p) and not p.name.startswith("."))
            cases = [Case(p, None, None, strip_image_suffix(p)) for p in files]
    if not cases:
        raise DiffTumorError(
            f"{src}: no CT images found (expected image files, <case>/{ATLAS_IMAGE} folders, an MSD dataset.json "
            "or a list file)"
        )
    if require_labels:
        missing = [c for c in cases if c.label is None and c.segmentations is None]
        if missing:
            raise DiffTumorError(f"{src}: {len(missing)} of {len(cases)} cases have no label "
                                 f"(first: {missing[0].image})")
    return cases


def split_cases(cases: list[Case], *, val_fraction: float = 0.1, seed: int = 0, min_val: int = 1):
    """Deterministic (seeded) train/validation split; with a single case both lists hold it."""
    if not 0 <= val_fraction < 1:
        raise ValueError(f"val_fraction must be in [0, 1), got {val_fraction}")
    if len(cases) < 2:
        return list(cases), list(cases)
    order = list(range(len(cases)))
    random.Random(seed).shuffle(order)
    n_val = min(len(cases) - 1, max(min_val, round(val_fraction * len(cases)))) if val_fraction > 0 else 0
    val = sorted(order[:n_val])
    train = sorted(order[n_val:])
    return [cases[i] for i in train], [cases[i] for i in val]


def label_for(case: Case, organ: str) -> tuple[str, bool]:
    """(label file, is a binary organ mask) of ``case`` for ``organ``: AbdomenAtlas cases use
    ``segmentations/<organ>.nii.gz`` (a 0/1 organ mask) when it exists, else their label file."""
    if case.segmentations is not None:
        p = Path(case.segmentations) / f"{organ}.nii.gz"
        if p.is_file():
            return str(p), True
    if case.label is not None:
        return str(case.label), False
    raise DiffTumorError(f"{case.image}: case has no label and no segmentations/{organ}.nii.gz")
