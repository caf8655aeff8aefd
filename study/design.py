"""Blinded study creation: one reader package per reader that cannot give the truth away, and a separate key.

``create_study`` re-writes every case (real or synthetic) through one identical path:
read (backend.io.read_image, which refuses damaged files) -> one linear resampling onto a fixed grid
that is at once canonical (LPS, identity direction), at one common spacing and cropped to a fixed-size
box around the tumor mask (or the volume centre when no masks are given), placed by a rule that ignores
where the centroid falls within its voxel (:mod:`study.resample`) -> rounded to int16 HU clipped to
[-1024, 3071] -> written as NIfTI with origin zero, no description, no source metadata, the same
compression (none by default, so every case file also has the same byte size) and the same
modification time. Case ids, and which source each id gets, come from 128 bits of the operating
system's randomness, never from the seed: a seed can be guessed or replayed, fresh entropy cannot, and
the key records the assignment itself. The seed (recorded in the key only) shuffles each reader's order
of the sorted ids, so the orders are reproducible without saying anything about the classes. Files are
written in id order, which is unrelated to the class. While writing, every case is measured and the
classes are compared for confounds (:mod:`study.confounds`); the warnings go to the key folder.

Study folder (``STUDY/``, the coordinator's): ``packages.json`` and one reader package per reader,
``STUDY/<reader>/``, which is what that reader gets (and nothing else): ``study.json`` (versioned
metadata: the one reader and their order, every case's file, byte size and sha256, grid, display
window, options), ``cases/<ID>.nii[.gz]`` (hard links to one copy where the file system allows) and,
once they read, ``answers/<reader>.sqlite`` holding only their answers. Nothing of the truth, nothing
random that was drawn with the truth. Answer key (``STUDY.key/`` by default, kept by the coordinator):
``key.csv`` with columns ``case_id,truth,organ,source,mask``, ``key.json`` (study id, seed, resampling
phase), ``confounds.txt`` / ``confounds.json`` and ``case_statistics.csv``. :func:`read_key` is the one
function that reads the key.
"""

from __future__ import annotations

import csv
import json
import logging
import os
import re
import secrets
import shutil
import uuid
from collections.abc import Callable, Iterator
from dataclasses import asdict, dataclass, field
from datetime import datetime, timezone
from pathlib import Path

import numpy as np

from backend.errors import DiffTumorError
from study.resample import HU_RANGE

log = logging.getLogger(__name__)

STUDY_FORMAT = "difftumor-reader-study"
PACKAGES_FORMAT = "difftumor-reader-packages"
STUDY_VERSION = 2  # 2: one package per reader, byte size and sha256 of every case
KEY_COLUMNS = ("case_id", "truth", "organ")
READER_PATTERN = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,63}$")
ID_ALPHABET = "ACDEFHJKLMNPRTUVWXY34679"  # no look-alikes (0/O, 1/I, 5/S, 8/B, 2/Z)
ID_LENGTH = 5
FIXED_MTIME = 946684800  # 2000-01-01: every case file gets this mtime (write order stays hidden)


def check_reader_name(reader: str) -> str:
    """Reader names become file names: letters, digits, '_', '-', '.' only."""
    if not READER_PATTERN.match(reader or ""):
        raise DiffTumorError(
            f"reader {reader!r}: use 1-64 letters, digits, '_', '-' or '.', starting with a letter or digit"
        )
    return reader


@dataclass(frozen=True)
class StudyOptions:
    unsure: bool = False  # offer an "Unsure" answer (counted, excluded from the rates)
    confidence: bool = False  # ask a 1 (guess) .. 5 (certain) confidence with every answer
    revisit: bool = False  # allow going back and changing earlier answers


@dataclass(frozen=True)
class StudySettings:
    readers: tuple[str, ...] = ("R1",)
    seed: int | None = None  # reader orders; None: drawn at random. Recorded in key.json only
    spacing: tuple[float, float, float] = (1.0, 1.0, 1.0)  # mm, (x, y, z), common to all cases
    roi_size_mm: tuple[float, float, float] = (160.0, 160.0, 96.0)  # fixed box (x, y, z) around the tumor
    window: tuple[float, float] = (-160.0, 240.0)  # HU display window (abdomen W400/L40)
    compress: bool = False  # .nii.gz: smaller, but file sizes then vary with content
    organ: str = "all"  # organ for cases whose list gives none
    options: StudyOptions = field(default_factory=StudyOptions)
    strict: bool = False  # refuse to create a study with confounds between the classes

    def __post_init__(self):
        if not self.readers:
            raise DiffTumorError("--readers: give at least one reader")
        for r in self.readers:
            check_reader_name(r)
        if len(set(self.readers)) != len(self.readers):
            raise DiffTumorError(f"--readers: duplicate reader names in {','.join(self.readers)}")
        if len(self.spacing) != 3 or min(self.spacing) <= 0:
            raise DiffTumorError(f"--spacing {self.spacing}: need three positive values in mm")
        if len(self.roi_size_mm) != 3 or min(self.roi_size_mm) <= 0:
            raise DiffTumorError(f"--roi-size {self.roi_size_mm}: need three positive values in mm")
        if len(self.window) != 2 or self.window[0] >= self.window[1]:
            raise DiffTumorError(f"--window {self.window}: need LOW,HIGH with LOW < HIGH")

    @property
    def grid_size(self) -> tuple[int, int, int]:
        """Output voxels (x, y, z)."""
        return tuple(max(2, int(round(r / s))) for r, s in zip(self.roi_size_mm, self.spacing))


@dataclass(frozen=True)
class CaseSource:
    image: Path
    truth: str
    organ: str
    mask: Path | None = None


@dataclass(frozen=True)
class Study:
    """A reader package as loaded from ``study.json``."""

    root: Path
    study_id: str
    readers: tuple[str, ...]
    orders: dict[str, tuple[str, ...]]
    case_files: dict[str, str]  # case id -> path relative to root
    case_checks: dict[str, tuple[int, str]]  # case id -> (bytes, sha256) as written; empty for version 1
    spacing: tuple[float, float, float]
    size: tuple[int, int, int]  # (x, y, z)
    window: tuple[float, float]
    options: StudyOptions
    created: str = ""

    @property
    def case_ids(self) -> tuple[str, ...]:
        return tuple(sorted(self.case_files))

    def case_path(self, case_id: str) -> Path:
        return self.root / self.case_files[case_id]

    @property
    def centre_zyx(self) -> tuple[float, float, float]:
        """World coordinates (mm, napari z, y, x order) of the ROI centre = centre of every case."""
        return tuple((n - 1) / 2 * s for n, s in zip(reversed(self.size), reversed(self.spacing)))


# --------------------------------------------------------------------------------------------
# Loading
# --------------------------------------------------------------------------------------------
def _read_json(path: Path, what: str) -> dict:
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError) as exc:
        raise DiffTumorError(f"{path}: unreadable {what} ({exc})") from None
    if not isinstance(data, dict):
        raise DiffTumorError(f"{path}: unreadable {what} (not a JSON object)")
    return data


def package_readers(folder: str | Path) -> dict[str, Path] | None:
    """A study folder's reader packages (reader -> folder), or None when ``folder`` holds no ``packages.json``."""
    root = Path(folder)
    path = root / "packages.json"
    if not path.is_file():
        return None
    meta = _read_json(path, "study folder index")
    if meta.get("format") != PACKAGES_FORMAT or not isinstance(meta.get("readers"), dict):
        raise DiffTumorError(f"{path}: not a difftumor study folder index")
    return {str(r): root / check_reader_name(str(sub)) for r, sub in meta["readers"].items()}


def load_study(folder: str | Path, reader: str | None = None) -> Study:
    """The reader package ``folder`` (with ``study.json``), or ``reader``'s package in the study folder ``folder``.

    One clear error if it is neither, or if ``reader`` is not a reader of it.
    """
    root = Path(folder)
    if not root.is_dir():
        raise DiffTumorError(f"{root}: not a folder (expected a study created by 'difftumor study create')")
    packages = package_readers(root)
    if packages is not None and not (root / "study.json").is_file():
        if reader is None:
            raise DiffTumorError(f"{root}: a study folder holding one package per reader ({', '.join(packages)}); "
                                 f"give --reader, or open a reader's own folder (e.g. {next(iter(packages.values()))})")
        if reader not in packages:
            raise DiffTumorError(f"reader {reader!r}: not in this study (readers: {', '.join(packages)})")
        root = packages[reader]
    study = _load_package(root)
    if reader is not None and reader not in study.readers:
        raise DiffTumorError(f"reader {reader!r}: not in this study (readers: {', '.join(study.readers)})")
    return study


def _load_package(root: Path) -> Study:
    meta_path = root / "study.json"
    if not root.is_dir():
        raise DiffTumorError(f"{root}: not a folder (expected a reader package created by 'difftumor study create')")
    if not meta_path.is_file():
        raise DiffTumorError(f"{root}: not a study (no study.json; create one with 'difftumor study create')")
    meta = _read_json(meta_path, "study metadata")
    if meta.get("format") != STUDY_FORMAT:
        raise DiffTumorError(f"{meta_path}: not a difftumor study (format {meta.get('format')!r})")
    if int(meta.get("version", 0)) > STUDY_VERSION:
        raise DiffTumorError(f"{meta_path}: study version {meta['version']} is newer than this difftumor supports")
    try:
        cases = {c["id"]: c["file"] for c in meta["cases"]}
        checks = {c["id"]: (int(c["bytes"]), str(c["sha256"])) for c in meta["cases"] if "sha256" in c}
        if int(meta.get("version", 0)) >= 2 and len(checks) != len(cases):
            raise KeyError("sha256")
        orders = {r: tuple(o) for r, o in meta["orders"].items()}
        study = Study(
            root=root,
            study_id=str(meta["study_id"]),
            readers=tuple(meta["readers"]),
            orders=orders,
            case_files=cases,
            case_checks=checks,
            spacing=tuple(float(s) for s in meta["grid"]["spacing"]),
            size=tuple(int(s) for s in meta["grid"]["size"]),
            window=tuple(float(w) for w in meta["display"]["window"]),
            options=StudyOptions(**meta["options"]),
            created=str(meta.get("created", "")),
        )
    except (KeyError, TypeError, ValueError) as exc:
        raise DiffTumorError(f"{meta_path}: incomplete study metadata (missing or bad {exc})") from None
    for reader, order in study.orders.items():
        if sorted(order) != sorted(cases):
            raise DiffTumorError(f"{meta_path}: the order of reader {reader} does not list every case exactly once")
    return study


def file_sha256(path: Path) -> str:
    import hashlib

    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def check_case_file(study: Study, case_id: str) -> None:
    """Refuse (one line) a case file that is missing or not byte for byte what ``create`` wrote."""
    path = study.case_path(case_id)
    if not path.is_file():
        raise DiffTumorError(f"{path}: case file is missing from the reader package")
    expected = study.case_checks.get(case_id)
    if expected is None:  # a version-1 package has no checksums
        return
    size, digest = expected
    actual = path.stat().st_size
    if actual != size:
        raise DiffTumorError(f"{path}: case file has {actual} bytes, 'study create' wrote {size} (truncated or replaced)")
    if file_sha256(path) != digest:
        raise DiffTumorError(f"{path}: case file differs from what 'study create' wrote (sha256 mismatch)")


def check_case_files(study: Study, case_ids) -> None:
    """:func:`check_case_file` on every case in ``case_ids``; the error names the first bad one and counts the rest."""
    bad: list[str] = []
    for cid in case_ids:
        try:
            check_case_file(study, cid)
        except DiffTumorError as exc:
            bad.append(str(exc))
    if bad:
        more = f" (and {len(bad) - 1} more damaged case file(s))" if len(bad) > 1 else ""
        raise DiffTumorError(f"{bad[0]}{more}; ask the study coordinator for an intact copy of the reader package")


# --------------------------------------------------------------------------------------------
# Inputs and key
# --------------------------------------------------------------------------------------------
def list_cases(spec: str | Path, truth: str, organ: str = "all") -> list[CaseSource]:
    """Cases from a folder of images or a CSV with columns ``image[,mask][,organ]`` (paths relative to it)."""
    from backend.io import IMAGE_SUFFIXES, image_suffix

    spec = Path(spec)
    flag = f"--{truth}"
    if spec.is_dir():
        images = sorted(p for p in spec.iterdir() if p.is_file() and image_suffix(p) in IMAGE_SUFFIXES)
        if not images:
            raise DiffTumorError(f"{flag} {spec}: folder holds no images ({', '.join(IMAGE_SUFFIXES)})")
        return [CaseSource(p, truth, organ) for p in images]
    if not spec.is_file():
        raise DiffTumorError(f"{flag} {spec}: no such folder or CSV file")
    with open(spec, newline="", encoding="utf-8-sig") as f:
        reader = csv.DictReader(f)
        rows = [{(k or "").strip(): v for k, v in row.items()} for row in reader]
        header = [(c or "").strip() for c in reader.fieldnames or []]
    if "image" not in header:
        raise DiffTumorError(f"{flag} {spec}: CSV needs a header with an 'image' column (optional 'mask', 'organ')")
    if not rows:
        raise DiffTumorError(f"{flag} {spec}: CSV lists no cases (a header and no rows)")
    out = []
    for i, row in enumerate(rows, start=2):
        image = (row.get("image") or "").strip()
        if not image:
            raise DiffTumorError(f"{flag} {spec}: line {i} has no image")
        mask = (row.get("mask") or "").strip()
        resolve = lambda p: (spec.parent / p) if not Path(p).is_absolute() else Path(p)  # noqa: E731
        out.append(CaseSource(resolve(image), truth, (row.get("organ") or "").strip() or organ,
                              resolve(mask) if mask else None))
    for c in out:
        for p in (c.image, c.mask):
            if p is not None and not p.exists():
                raise DiffTumorError(f"{flag} {spec}: {p} does not exist")
    return out


def read_key(path: str | Path) -> dict[str, tuple[str, str]]:
    """The unblinding key: case id -> (truth, organ). ``path`` is key.csv or the folder holding it."""
    path = Path(path)
    if path.is_dir():
        path = path / "key.csv"
    if not path.is_file():
        raise DiffTumorError(f"{path}: no such key file (expected key.csv with columns {','.join(KEY_COLUMNS)})")
    try:
        return _read_key_csv(path)
    except (UnicodeDecodeError, csv.Error) as exc:
        raise DiffTumorError(f"{path}: unreadable key CSV ({exc})") from None


def _read_key_csv(path: Path) -> dict[str, tuple[str, str]]:
    with open(path, newline="", encoding="utf-8-sig") as f:  # -sig: a key saved by Excel starts with a BOM
        reader = csv.DictReader(f)
        missing = [c for c in KEY_COLUMNS if c not in (reader.fieldnames or [])]
        if missing:
            raise DiffTumorError(f"{path}: key lacks column(s) {','.join(missing)} (needs {','.join(KEY_COLUMNS)})")
        key: dict[str, tuple[str, str]] = {}
        for row in reader:
            i = reader.line_num  # the row's line in the file (DictReader skips blank lines)
            cid, truth, organ = ((row[c] or "").strip() for c in KEY_COLUMNS)  # None: the line is short
            if not cid:
                raise DiffTumorError(f"{path}: line {i}: case_id is empty")
            if truth not in ("real", "synthetic"):
                raise DiffTumorError(f"{path}: line {i}: truth {truth!r} must be real or synthetic")
            if cid in key:
                raise DiffTumorError(f"{path}: line {i}: case {cid} appears twice")
            key[cid] = (truth, organ.lower() or "all")  # 'Liver' and 'liver' are one organ (one row of Table 1)
    if not key:
        raise DiffTumorError(f"{path}: key lists no cases")
    return key


# --------------------------------------------------------------------------------------------
# Creation
# --------------------------------------------------------------------------------------------
def reader_orders(case_ids: list[str], readers, seed: int) -> dict[str, list[str]]:
    """Each reader's reading order: the sorted case ids shuffled by one stream per reader
    (``default_rng([seed, 1, k])`` for the k-th reader), so adding a reader never changes the others'
    orders and the key's seed reproduces them."""
    ids = sorted(case_ids)
    return {r: [ids[int(i)] for i in np.random.default_rng([seed, 1, k]).permutation(len(ids))]
            for k, r in enumerate(readers)}


def _case_ids(n: int, rng: np.random.Generator) -> list[str]:
    ids: list[str] = []
    seen = set()
    while len(ids) < n:
        token = "".join(rng.choice(list(ID_ALPHABET), size=ID_LENGTH))
        if token not in seen:
            seen.add(token)
            ids.append(token)
    return ids


def _write_json(path: Path, data: dict) -> None:
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.write_text(json.dumps(data, indent=2) + "\n", encoding="utf-8")
    os.replace(tmp, path)


def default_key_path(out: Path) -> Path:
    return out.parent / f"{out.name}.key"


def _check_inputs(real: list[CaseSource], synthetic: list[CaseSource], out: Path, key_dir: Path) -> list[CaseSource]:
    for target, flag in ((out, "--out"), (key_dir, "--key-out")):
        if target.exists() and (not target.is_dir() or any(target.iterdir())):
            raise DiffTumorError(f"{flag} {target}: already exists and is not empty; refusing to overwrite")
    if key_dir.resolve().is_relative_to(out.resolve()):
        raise DiffTumorError(f"--key-out {key_dir}: must not be inside the reader package {out}")
    if not real or not synthetic:
        raise DiffTumorError("study: need at least one real and one synthetic case")
    cases = list(real) + list(synthetic)
    seen: dict[Path, CaseSource] = {}
    for c in cases:  # one image twice would be two cases (or contradicting truths) that are one
        first = seen.setdefault(Path(c.image).resolve(), c)
        if first is not c:
            raise DiffTumorError(f"study: {c.image} is listed twice (as {first.truth} and as {c.truth}); "
                                 "each image may be one case only")
    with_mask = sum(c.mask is not None for c in cases)
    if 0 < with_mask < len(cases):
        raise DiffTumorError(f"study: {with_mask} of {len(cases)} cases have a tumor mask; give masks for all or none "
                             "(otherwise the view centring differs between cases)")
    unnamed = sum(c.organ.lower() == "all" for c in cases)
    if 0 < unnamed < len(cases):
        named = sorted({c.organ for c in cases if c.organ.lower() != "all"})
        raise DiffTumorError(f"study: {unnamed} of {len(cases)} cases have no organ but the others have one "
                             f"({', '.join(named)}); give every case an organ (CSV column 'organ', or --organ), or none")
    return cases


def voxel_digest(volume) -> str:
    """sha256 of a volume's voxels (shape, dtype and values): the same CT under two paths or formats."""
    import hashlib

    arr = np.ascontiguousarray(volume.array)
    digest = hashlib.sha256(f"{arr.shape}{arr.dtype.str}".encode())
    digest.update(memoryview(arr).cast("B"))
    return digest.hexdigest()


def _read_case(src: CaseSource):
    from backend.io import check_same_grid, label_map_range, read_image

    volume = read_image(src.image)  # refuses missing, unreadable and damaged (e.g. truncated) files
    labels = label_map_range(volume.array)
    if labels is not None:  # e.g. a folder of synthesize outputs: ct.nii.gz beside label.nii.gz
        raise DiffTumorError(
            f"--{src.truth}: {src.image} looks like a label map (whole values {labels[0]}..{labels[1]}), not a CT; "
            "give CT images only (tumor masks go in a CSV's 'mask' column)")
    mask = read_image(src.mask) if src.mask is not None else None
    if mask is not None:
        check_same_grid(volume, mask, names=(str(src.image), str(src.mask)))
    return volume, mask


def _link_or_copy(src: Path, dst: Path) -> None:
    """``dst`` as a hard link to ``src`` (one copy on disk for all readers), else a copy with the same mtime."""
    try:
        os.link(src, dst)
    except OSError:
        shutil.copy2(src, dst)


def _confound_report(rows: list[dict], truths: list[str], key_dir: Path) -> dict:
    from study.confounds import compare_classes

    result = compare_classes(rows, truths)
    lines = [w["message"] for w in result["warnings"]]
    auc = result["classifier"]["auc"]
    lines.append("classifier: " + ("too few cases for a cross-validated AUC (needs 3 per class)" if auc is None else
                                   f"cross-validated AUC {auc:.2f} on {', '.join(result['classifier']['features'])} "
                                   f"(warning above {result['classifier']['warn_above']})"))
    (key_dir / "confounds.txt").write_text("\n".join(lines) + "\n", encoding="utf-8")
    _write_json(key_dir / "confounds.json", result)
    return result


def iter_create_study(real: list[CaseSource], synthetic: list[CaseSource], out: str | Path, *,
                      settings: StudySettings | None = None, key_out: str | Path | None = None,
                      ) -> Iterator[tuple[str, int, int]]:
    """Create the study folder (one package per reader) and the key; yields ``(message, done, total)``,
    returns the first reader's :class:`Study`. Confound warnings are logged (and written to the key);
    with ``settings.strict`` any confound refuses the study.

    Everything is built in hidden temporary folders beside the targets and moved into place at
    the end, so a failure (or a strict refusal) leaves no half-made study. Existing targets are never
    overwritten.
    """
    from backend.io import Geometry, write_image
    from study.confounds import case_statistics
    from study.resample import draw_phase, preprocess_case, resample_labels

    settings = settings or StudySettings()
    out = Path(out)
    key_dir = Path(key_out) if key_out else default_key_path(out)
    cases = _check_inputs(real, synthetic, out, key_dir)
    seed = settings.seed if settings.seed is not None else int(np.random.SeedSequence().entropy % (2**31))
    rng = np.random.default_rng(secrets.randbits(128))  # ids, assignment, study id: never from the seed
    perm = rng.permutation(len(cases))
    ids = sorted(_case_ids(len(cases), rng))
    assigned = {ids[i]: cases[int(p)] for i, p in enumerate(perm)}  # id -> source, class-independent
    orders = reader_orders(ids, settings.readers, seed)
    phase = draw_phase()
    suffix = ".nii.gz" if settings.compress else ".nii"
    size = settings.grid_size
    geometry = Geometry(size=size, spacing=tuple(float(s) for s in settings.spacing), origin=(0.0, 0.0, 0.0))
    grid = dict(size=size, spacing=geometry.spacing)

    out.parent.mkdir(parents=True, exist_ok=True)
    key_dir.parent.mkdir(parents=True, exist_ok=True)
    tmp_out = out.parent / f".{out.name}.partial-{uuid.uuid4().hex[:8]}"
    tmp_key = key_dir.parent / f".{key_dir.name}.partial-{uuid.uuid4().hex[:8]}"
    first = settings.readers[0]
    try:
        (tmp_out / first / "cases").mkdir(parents=True)
        tmp_key.mkdir(parents=True)
        total = len(ids)
        entries, rows, modes, digests = [], [], {}, {}
        for done, cid in enumerate(ids):
            src = assigned[cid]
            yield (f"case {done + 1} of {total}", done, total)
            volume, mask = _read_case(src)
            digest = voxel_digest(volume)
            twin = digests.setdefault(digest, src)
            if twin is not src:
                raise DiffTumorError(f"study: {src.image} ({src.truth}) holds the same voxels as {twin.image} ({twin.truth}); "
                                     "each image may be one case only")
            arr, placement, padded = preprocess_case(volume, mask, phase=phase, **grid)
            path = tmp_out / first / "cases" / f"{cid}{suffix}"
            write_image(arr, path, geometry, compress=settings.compress)
            os.utime(path, (FIXED_MTIME, FIXED_MTIME))
            nbytes = path.stat().st_size
            entries.append({"id": cid, "file": f"cases/{cid}{suffix}", "bytes": nbytes, "sha256": file_sha256(path)})
            labels = resample_labels(mask, placement, **grid) if mask is not None else None
            rows.append(case_statistics(volume, arr, labels, padded, nbytes if settings.compress else None))
            modes[cid] = ",".join(placement.modes)
        truths = [assigned[cid].truth for cid in ids]
        confounds = _confound_report(rows, truths, tmp_key)
        for w in confounds["warnings"]:
            log.warning("%s", w["message"])
        if confounds["classifier"]["auc"] is not None:
            log.info("confound check: a classifier on the image statistics alone reaches cross-validated AUC %.2f",
                     confounds["classifier"]["auc"])
        if settings.strict and confounds["warnings"]:
            names = ", ".join(w["statistic"] for w in confounds["warnings"])
            raise DiffTumorError(f"study --strict: {len(confounds['warnings'])} confound(s) between the real and synthetic "
                                 f"cases ({names}); nothing was written")
        study_id = uuid.UUID(int=int(rng.integers(0, 2**63)) << 64 | int(rng.integers(0, 2**63))).hex
        created = datetime.now(timezone.utc).isoformat(timespec="seconds")
        for reader in settings.readers:
            package = tmp_out / reader
            if reader != first:
                (package / "cases").mkdir(parents=True)
                for e in entries:
                    _link_or_copy(tmp_out / first / e["file"], package / e["file"])
            _write_json(package / "study.json", {
                "format": STUDY_FORMAT,
                "version": STUDY_VERSION,
                "study_id": study_id,
                "created": created,
                "readers": [reader],
                "orders": {reader: orders[reader]},
                "cases": entries,
                "grid": {"spacing": list(geometry.spacing), "size": list(size), "orientation": "LPS",
                         "dtype": "int16", "hu_range": list(HU_RANGE), "compressed": settings.compress},
                "display": {"window": list(settings.window)},
                "options": asdict(settings.options),
            })
        _write_json(tmp_out / "packages.json", {"format": PACKAGES_FORMAT, "version": STUDY_VERSION,
                                                "study_id": study_id, "readers": {r: r for r in settings.readers}})
        with open(tmp_key / "key.csv", "w", newline="", encoding="utf-8") as f:
            w = csv.writer(f)
            w.writerow([*KEY_COLUMNS, "source", "mask", "placement"])
            for cid in ids:
                src = assigned[cid]
                w.writerow([cid, src.truth, src.organ, str(src.image.resolve()),
                            str(src.mask.resolve()) if src.mask else "", modes[cid]])
        with open(tmp_key / "case_statistics.csv", "w", newline="", encoding="utf-8") as f:
            w = csv.writer(f)
            w.writerow(["case_id", "truth", *rows[0]])
            for cid, row in zip(ids, rows):
                w.writerow([cid, assigned[cid].truth, *row.values()])
        _write_json(tmp_key / "key.json", {
            "format": "difftumor-study-key", "version": STUDY_VERSION, "study_id": study_id, "seed": seed,
            "created": created, "n_real": len(real), "n_synthetic": len(synthetic),
            "resampling": {"phase": list(phase), "policy": (
                "per world axis: source voxels copied with an integer shift where the source spacing equals the "
                "study spacing, else grid points at 'phase' source voxels from the source voxel centres (drawn "
                "once per study from OS randomness); key.csv 'placement' gives each case's mode per axis")},
        })
        for tmp, final in ((tmp_key, key_dir), (tmp_out, out)):
            if final.exists():
                final.rmdir()  # checked empty above
            os.replace(tmp, final)
    finally:
        for tmp in (tmp_out, tmp_key):
            if tmp.exists():
                shutil.rmtree(tmp, ignore_errors=True)
    yield ("done", len(ids), len(ids))
    return load_study(out, first)


def run_generator(gen: Iterator, progress: Callable[[str, int, int], None] | None = None):
    """Run a ``(message, done, total)`` generator to the end and return its result."""
    while True:
        try:
            msg = next(gen)
        except StopIteration as stop:
            return stop.value
        if progress is not None:
            progress(*msg)


def create_study(real, synthetic, out, *, settings: StudySettings | None = None, key_out=None,
                 progress: Callable[[str, int, int], None] | None = None) -> Study:
    return run_generator(iter_create_study(real, synthetic, out, settings=settings, key_out=key_out), progress)
