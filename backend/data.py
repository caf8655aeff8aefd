"""The case lister: every command that reads a dataset lists its cases here.

:func:`list_cases` turns whatever the user points at into a sorted list of :class:`Case` records
(image path, optional label path, optional per-organ segmentation folder, optional organ, a case name).
Supported sources, detected in this order:

1. an MSD ``dataset.json`` (or a folder holding one): ``training`` entries ``{"image", "label"}``,
   paths relative to the JSON's folder (``imagesTr`` / ``labelsTr``);
2. a list file (any other regular file, e.g. ``.txt``/``.csv``), in the one list-file format below;
3. a folder of case folders (AbdomenAtlas-style tree) and/or CT files: ``<root>/<case>/ct.<ext>`` with
   optional ``segmentations/`` (per-organ masks such as ``liver.nii.gz``) and optional
   ``combined_labels.nii.gz`` (used as ``label``), or ``label.nii.gz`` instead, which makes the output
   folder of ``difftumor synthesize --ct DIR --n K`` (``<case>_s<k>/ct.nii.gz`` + ``label.nii.gz``,
   1 organ / 2 tumour) a data source too;
   CT files (``*.nii.gz``, ``*.nii``, ``*.nrrd``, ``*.mha``, ...) in the same folder are cases too, labels
   absent.

With ``labels=FOLDER`` (CTs in one folder, their labels in another, as ``difftumor synthesize --ct DIR
--organs DIR`` takes them) each case's label is ``FOLDER/<case>.<ext>``, or the case folder
``FOLDER/<case>/`` (its ``segmentations/`` and ``combined_labels.nii.gz``); for case folders ``FOLDER`` may
be the CT folder itself.

**List-file format** (one format for every command): one case per line, ``image[,label[,organ]]``, comma-
or tab-separated; ``#`` starts a comment; blank lines are ignored; relative paths are taken relative to
the list file's folder; an empty field means "none" (``ct.nii.gz,,liver``). An optional first line
``image,label,organ`` (any order; ``mask`` is accepted for ``label``) names the columns. An ``image`` may
name an AbdomenAtlas case folder. Example::

    # image, label, organ
    imagesTr/liver_1.nii.gz, labelsTr/liver_1.nii.gz, liver
    /data/atlas/BDMAP_00001

Nothing is read here beyond directory listings (and the JSON/list text); reading and preprocessing
happen in the stage's transforms. Every problem is one DiffTumorError line naming the path.

Public API::

    Case(image: Path, label: Path | None = None, segmentations: Path | None = None, name: str = "",
         organ: str | None = None)
    list_cases(source, *, labels=None, require_labels=False) -> list[Case]
    split_cases(cases, *, val_fraction=0.1, seed=0, min_val=1) -> (train, val)
    label_for(case, organ) -> (label file, is a binary organ mask)
    case_ct_file(folder) -> Path | None       ``folder/ct.<ext>`` of a case folder
"""

from __future__ import annotations

import dataclasses
import json
import random
from dataclasses import dataclass
from pathlib import Path

from backend.errors import DiffTumorError
from backend.io import IMAGE_SUFFIXES, image_suffix, strip_image_suffix

ATLAS_IMAGE = "ct.nii.gz"
ATLAS_LABEL = "combined_labels.nii.gz"
SYNTHESIZED_LABEL = "label.nii.gz"  # what `difftumor synthesize` writes beside ct.nii.gz


@dataclass(frozen=True)
class Case:
    image: Path
    label: Path | None = None
    segmentations: Path | None = None  # AbdomenAtlas per-organ mask folder
    name: str = ""
    organ: str | None = None  # the organ a list file names for this case (None: the command's --organ)

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


LIST_COLUMNS = ("image", "label", "organ")
_COLUMN_ALIASES = {"mask": "label"}


def _fields(line: str) -> list[str]:
    return [p.strip() for p in line.replace("\t", ",").split(",")]


def _from_list(list_path: Path) -> list[Case]:
    try:
        lines = list_path.read_text(encoding="utf-8-sig").splitlines()  # -sig: Excel writes a BOM
    except (OSError, UnicodeDecodeError) as exc:
        raise DiffTumorError(f"{list_path}: not a readable list file ({type(exc).__name__})") from None
    base = list_path.parent
    columns, cases, header = list(LIST_COLUMNS), [], False
    for n, line in enumerate(lines, 1):
        line = line.split("#", 1)[0].strip()
        if not line:
            continue
        parts = _fields(line)
        while parts and not parts[-1]:
            parts.pop()
        named = [_COLUMN_ALIASES.get(p.lower(), p.lower()) for p in parts]
        if not cases and columns == list(LIST_COLUMNS) and "image" in named:  # a header line names the columns
            unknown = [p for p in named if p not in LIST_COLUMNS]
            if unknown or len(set(named)) != len(named):
                raise DiffTumorError(f"{list_path}: line {n}: header columns must be among image, label (or mask), "
                                     f"organ, each once; got {', '.join(parts)}")
            columns, header = named, True
            continue
        if len(parts) > len(columns):
            raise DiffTumorError(f"{list_path}: line {n}: expected 'image[,label[,organ]]', got {len(parts)} fields")
        row = dict(zip(columns, parts))
        if not row.get("image"):
            raise DiffTumorError(f"{list_path}: line {n}: no image")
        where = f"{list_path}: line {n}"
        img = _resolve(base, row["image"], where, "image")
        lab = _resolve(base, row["label"], where, "label") if row.get("label") else None
        organ = row.get("organ") or None
        if img.is_dir() and case_ct_file(img):  # a line may name an AbdomenAtlas case folder
            cases.append(dataclasses.replace(_atlas_case(img), organ=organ))
        else:
            cases.append(Case(img, lab, None, strip_image_suffix(img), organ))
    if not cases:
        raise DiffTumorError(f"{list_path}: the list file names no cases{' (a header and no rows)' if header else ''}")
    return cases


def case_ct_file(folder: Path) -> Path | None:
    """``folder/ct.<ext>``: the CT of an AbdomenAtlas / TotalSegmentator case folder, or None."""
    return next((folder / f"ct{sfx}" for sfx in IMAGE_SUFFIXES if (folder / f"ct{sfx}").is_file()), None)


def _atlas_case(case_dir: Path, name: str | None = None) -> Case:
    seg = case_dir / "segmentations"
    lab = next((p for p in (case_dir / ATLAS_LABEL, case_dir / SYNTHESIZED_LABEL) if p.is_file()), None)
    return Case(case_ct_file(case_dir) or case_dir / ATLAS_IMAGE, lab, seg if seg.is_dir() else None,
                name or case_dir.name)


def _pair_labels(cases: list[Case], labels: Path) -> list[Case]:
    """Each case's label from the folder ``labels``: ``<case>.<ext>`` or the case folder ``<case>/``."""
    if not labels.is_dir():
        raise DiffTumorError(f"{labels}: the labels of a CT folder must be a folder too")
    entries = sorted(p for p in labels.iterdir() if not p.name.startswith("."))
    files = {strip_image_suffix(p): p for p in entries if p.is_file() and image_suffix(p)}
    folders = {p.name: p for p in entries if p.is_dir()}
    out = []
    for c in cases:
        if c.name in files:
            out.append(dataclasses.replace(c, label=files[c.name], segmentations=None))
        elif c.name in folders:
            folder = _atlas_case(folders[c.name])
            out.append(dataclasses.replace(c, label=folder.label, segmentations=folder.segmentations))
        else:
            shown = c.image.name if c.image.is_file() else c.name
            raise DiffTumorError(f"{labels}: no label file or case folder for {shown}")
    return out


def list_cases(source, *, labels=None, require_labels: bool = False) -> list[Case]:
    """All cases under ``source`` (see module docstring), their labels paired from the folder ``labels`` if
    given. Raises one-line DiffTumorErrors."""
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
        # case folders (<case>/ct.<ext>) and CT files, side by side as `difftumor synthesize --ct DIR` takes them
        entries = sorted(p for p in src.iterdir() if not p.name.startswith("."))
        cases = [_atlas_case(p) if p.is_dir() else Case(p, None, None, strip_image_suffix(p)) for p in entries
                 if (p.is_dir() and case_ct_file(p)) or (p.is_file() and image_suffix(p))]
    if not cases:
        raise DiffTumorError(
            f"{src}: no CT images found (expected image files, <case>/{ATLAS_IMAGE} folders, an MSD dataset.json "
            "or a list file)"
        )
    if labels is not None:
        cases = _pair_labels(cases, Path(labels).expanduser())
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
