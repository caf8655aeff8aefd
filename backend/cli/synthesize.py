"""`difftumor synthesize`: put synthetic tumours into one CT or a whole dataset.

One CT::

    difftumor synthesize --ct ct.nii.gz --organs seg.nii.gz --organ liver --size small --count 2 --out out/
    difftumor synthesize --ct ct.nii.gz --organs seg.nii.gz --organ kidney --center 12.5,-30,88 --radii 8,6,6 --out out/
    difftumor synthesize --ct ct.nii.gz --organs seg.nii.gz --organ pancreas --tumor-mask mask.nrrd --out out/

writes ``out/ct.nii.gz``, ``out/label.nii.gz`` (0 background, 1 organ, 2 tumour) and
``out/provenance.json`` (each atomically; provenance last, so its presence marks a finished case).
A non-empty ``out/`` is refused unless ``--overwrite`` is given.

A dataset::

    difftumor synthesize --ct cts/ --organs labels/ --organ liver --n 3 --out aug/ [--shard 0/4]

pairs ``cts/<case>.<ext>`` (or a case folder ``cts/<case>/ct.<ext>``) with ``labels/<case>.<ext>`` (or an
AbdomenAtlas case folder ``labels/<case>/``), writes ``aug/<case>_s<k>/`` for k < n and takes every n-th case
for ``--shard i/n`` (under ``torchrun``: RANK / WORLD_SIZE, GPU LOCAL_RANK). Each output is assembled in a
hidden staging folder and renamed into place, so a killed run leaves no half-written output. The settings that define the outputs are
recorded in ``aug/difftumor_synthesize.json`` (:data:`RUN_FILE`) and in each provenance; a re-run with
the same settings resumes (an output counts as done when all its files exist and its provenance has
these settings), a run with other settings is refused unless ``--overwrite`` is given.
"""

from __future__ import annotations

import json
import logging
import os
from pathlib import Path

log = logging.getLogger(__name__)

RUN_FILE = "difftumor_synthesize.json"  # dataset mode: the settings the folder's outputs were made with
OUTPUT_FILES = ("ct.nii.gz", "label.nii.gz", "provenance.json")  # provenance last: it marks a finished output
STAGING = ".difftumor-partial"  # an output being written (see write_outputs); a killed run leaves only this
MAX_SEED = 2**32 - 1
DEFAULT_DDIM_STEPS = 50
# options that only the diffusion method reads (defaults None/False, so "given" can be told apart)
DIFFUSION_ONLY = ("sigma", "stage", "ddim_steps", "keep_intermediates", "pancreas_blend", "weights_organ")


def _flag(dest: str) -> str:
    return "--" + dest.replace("_", "-")


def seed_arg(text: str) -> int:
    """``--seed``: a whole number in [0, 2**32 - 1], checked while parsing (one line, no traceback)."""
    from backend.errors import DiffTumorError

    try:
        value = int(text)
    except ValueError:
        value = -1
    if not 0 <= value <= MAX_SEED:
        raise DiffTumorError(f"--seed {text}: must be a whole number from 0 to {MAX_SEED}")
    return value


def register(sub) -> None:
    p = sub.add_parser(
        "synthesize",
        help="insert synthetic tumours into a CT (or a dataset of CTs)",
        description="Insert realistic synthetic tumours (latent diffusion as released, or model-based) into CTs "
        "in their own geometry. Writes ct.nii.gz, label.nii.gz and provenance.json.",
    )
    p.add_argument("--ct", required=True, help="CT file or DICOM folder; dataset mode: a folder of CT files, or of "
                   "case folders holding ct.nii.gz (AbdomenAtlas, TotalSegmentator)")
    p.add_argument("--organs", required=True, help="organ label file (TotalSegmentator/AbdomenAtlas/MSD) or folder")
    p.add_argument("--organ", required=True, help="liver, pancreas, kidney, kidney_left, kidney_right or spleen")
    p.add_argument("--organ-label", type=int, default=None, help="label id of the organ in --organs (overrides the convention)")
    p.add_argument("--weights-organ", default=None,
                   help="use this organ's diffusion weights (cross-organ, paper section 4.2: e.g. --organ pancreas "
                        "--weights-organ liver); default: --organ")
    where = p.add_mutually_exclusive_group()
    where.add_argument("--tumor-mask", help="your own tumour mask on the CT grid (non-zero = tumour)")
    where.add_argument("--center",
                       help="ellipsoid centre X,Y,Z in world mm, LPS (as ITK/SimpleITK report it; 3D Slicer shows RAS: "
                            "flip the signs of its first two numbers), or a voxel index with --voxel; "
                            "negative values may follow the option directly (--center -60.5,20,-310)")
    p.add_argument("--voxel", action="store_true", help="--center is a voxel index (x,y,z)")
    p.add_argument("--radii", help="ellipsoid semi-axes A,B,C in mm (with --center)")
    p.add_argument("--rotation", default=None, help="ellipsoid Euler angles in degrees about x,y,z (with --center)")
    p.add_argument("--irregularity", type=float, default=None, help="ellipsoid surface irregularity in [0,1] (with --center; default 0)")
    p.add_argument("--size", choices=["tiny", "small", "medium", "large"], help="random tumours of this size class (release generator)")
    p.add_argument("--count", type=int, default=None, help="number of random tumours (default: the class's range)")
    p.add_argument("--method", choices=["auto", "diffusion", "model-based"], default="auto",
                   help="auto = diffusion when the organ's weights are found, else model-based")
    p.add_argument("--stage", choices=["early", "mid_late"], default=None, help="diffusion: override the stage chosen from the size")
    p.add_argument("--sigma", type=float, default=None, help="diffusion: blend blur in voxels (default: U(0,4) as released)")
    p.add_argument("--ddim-steps", type=int, default=None, help=f"diffusion: DDIM steps for mid/late tumours (default {DEFAULT_DDIM_STEPS})")
    p.add_argument("--pancreas-blend", action="store_true", help="diffusion: blend pancreas tumours like the other organs")
    p.add_argument("--weights", default=None, help="weights folder (default: $DIFFTUMOR_WEIGHTS or the user config)")
    p.add_argument("--seed", type=seed_arg, default=0,
                   help="random seed for tumour placement, shape and texture (default 0: identical runs give identical "
                        "tumours; give another seed for other tumours). Dataset mode derives one seed per output from "
                        "it and the case's name (recorded in each provenance.json)")
    p.add_argument("--keep-intermediates", action="store_true",
                   help="diffusion: also write masked.nii.gz, reconstruction.nii.gz (autoencoder round trip of the "
                        "crop) and decoded.nii.gz (raw decoded sample), float32 HU on the CT grid (one extra decode)")
    p.add_argument("--device", default="auto", help="auto, cuda, cuda:N, mps or cpu")
    p.add_argument("--n", type=int, default=None, help="dataset mode: synthetic versions per CT (default 1)")
    p.add_argument("--shard", default=None, help="dataset mode: i/n = process every n-th case starting at i "
                   "(default under torchrun: RANK/WORLD_SIZE; put '--' before 'difftumor' so torchrun leaves --n alone)")
    p.add_argument("--out", required=True, help="output folder (refused when it is not empty, unless --overwrite)")
    p.add_argument("--overwrite", action="store_true",
                   help="write into a non-empty --out: replace the results there (dataset mode: redo outputs made "
                        "with other settings; other files are left alone)")
    p.set_defaults(func=handler)


# --------------------------------------------------------------------------------------------
# option checks (before anything is read or written)
# --------------------------------------------------------------------------------------------
def _floats(text: str, n: int, name: str) -> list[float]:
    import math

    from backend.errors import DiffTumorError

    try:
        vals = [float(v) for v in text.replace(" ", "").split(",")]
    except ValueError:
        vals = []
    if len(vals) != n or not all(math.isfinite(v) for v in vals):
        raise DiffTumorError(f"{name} {text}: need {n} comma-separated numbers")
    return vals


def output_seed(seed: int, case: str, k: int) -> int:
    """Dataset mode: the seed of output ``k`` of ``case``, from ``--seed``, the case's name and k (numpy's
    SeedSequence), so it does not change when other cases are added to or removed from the folder, and
    distinct outputs never share a seed the way ``seed + 1000 * case index + k`` did for k >= 1000."""
    import zlib

    import numpy as np

    return int(np.random.SeedSequence([seed, zlib.crc32(case.encode("utf-8")), k]).generate_state(1)[0])


def parse_shard(text: str | None) -> tuple[int, int]:
    from backend.errors import DiffTumorError

    if text is None:
        return int(os.environ.get("RANK", 0)), int(os.environ.get("WORLD_SIZE", 1))
    try:
        i, n = (int(v) for v in text.split("/"))
    except ValueError:
        i, n = -1, 0
    if not (n >= 1 and 0 <= i < n):
        raise DiffTumorError(f"--shard {text}: expected i/n with 0 <= i < n")
    return i, n


def check_options(args) -> None:
    """Refuse values out of range and options that contradict each other (one line naming them)."""
    from backend.errors import DiffTumorError

    if args.n is not None and args.n < 1:
        raise DiffTumorError(f"--n {args.n}: must be >= 1")
    if args.count is not None and args.count < 1:
        raise DiffTumorError(f"--count {args.count}: must be >= 1")
    if args.ddim_steps is not None and args.ddim_steps < 1:
        raise DiffTumorError(f"--ddim-steps {args.ddim_steps}: must be >= 1")
    if args.shard is not None:
        parse_shard(args.shard)
    from backend.organs import parse_organ

    for dest in ("organ", "weights_organ"):
        if getattr(args, dest) is not None:
            try:
                parse_organ(getattr(args, dest))
            except DiffTumorError as exc:
                raise DiffTumorError(f"{_flag(dest)} {getattr(args, dest)}: {exc}") from None
    random = [f for f in ("size", "count") if getattr(args, f) is not None]
    placed = [f for f in ("tumor_mask", "center", "radii") if getattr(args, f)]
    if random and placed:
        raise DiffTumorError(
            f"{_flag(random[0])} with {_flag(placed[0])}: {'/'.join(map(_flag, random))} "
            f"{'draws' if len(random) == 1 else 'draw'} random tumours, "
            f"{_flag(placed[0])} places your own; give one or the other")
    if args.center:
        if not args.radii:
            raise DiffTumorError("--center: also give --radii A,B,C (mm)")
        _floats(args.center, 3, "--center")
        radii = _floats(args.radii, 3, "--radii")
        if min(radii) <= 0:
            raise DiffTumorError(f"--radii {args.radii}: the ellipsoid's semi-axes must be > 0 mm")
        if args.rotation:
            _floats(args.rotation, 3, "--rotation")
        if args.irregularity is not None and not 0.0 <= args.irregularity <= 1.0:
            raise DiffTumorError(f"--irregularity {args.irregularity}: must lie in [0, 1]")
        return
    if args.radii:
        raise DiffTumorError("--radii: give --center X,Y,Z as well")
    for dest, value in (("rotation", args.rotation), ("irregularity", args.irregularity), ("voxel", args.voxel)):
        if value not in (None, False):
            raise DiffTumorError(f"{_flag(dest)}: only used for an ellipsoid; give --center X,Y,Z and --radii A,B,C as well")


def _check_inputs_exist(args) -> None:
    from backend.errors import DiffTumorError

    for dest in ("ct", "organs", "tumor_mask"):
        value = getattr(args, dest)
        if value and not Path(value).exists():
            raise DiffTumorError(f"{_flag(dest)} {value}: no such file or folder")


def check_out_writable(out: Path) -> None:
    """``--out`` must be a folder (or not exist yet) that we may create and write in."""
    from backend.errors import DiffTumorError

    if out.exists() and not out.is_dir():
        raise DiffTumorError(f"--out {out}: is an existing file; give a folder")
    base = out
    while not base.exists() and base.parent != base:
        base = base.parent
    if not base.is_dir():
        raise DiffTumorError(f"--out {out}: {base} is a file, not a folder")
    if not os.access(base, os.W_OK | os.X_OK):
        try:
            read_only = bool(os.statvfs(base).f_flag & os.ST_RDONLY)
        except (OSError, AttributeError):  # pragma: no cover - no statvfs (Windows)
            read_only = False
        why = "read-only file system" if read_only else "permission denied"
        where = "" if base == out else f" (in {base})"
        raise DiffTumorError(f"--out {out}: cannot write here{where}: {why}")


def _os_error(out: Path, exc: OSError, *, stage: Path | None = None, out_dir: Path | None = None):
    from backend.errors import DiffTumorError

    where = str(exc.filename) if getattr(exc, "filename", None) else str(out)
    if stage is not None and where.startswith(str(stage)):  # name the file as the user will see it
        where = str(out_dir) + where[len(str(stage)):]
    return DiffTumorError(f"--out {out}: cannot write {where}: {exc.strerror or exc}")


def run_settings(args, engine) -> dict:
    """What defines the outputs (recorded in the run file and each provenance; a resume must match it)."""
    from backend.organs import parse_organ

    def absolute(p):
        return os.path.abspath(p) if p else None

    def numbers(text, n, name):
        return _floats(text, n, name) if text else None

    return {
        "ct": absolute(args.ct),
        "organs": absolute(args.organs),
        "organ": parse_organ(args.organ),
        "organ_label": args.organ_label,
        "weights_organ": parse_organ(args.weights_organ) if args.weights_organ else None,
        "tumor_mask": absolute(args.tumor_mask),
        "center": numbers(args.center, 3, "--center"),
        "voxel": bool(args.voxel),
        "radii": numbers(args.radii, 3, "--radii"),
        "rotation": numbers(args.rotation, 3, "--rotation"),
        "irregularity": (args.irregularity or 0.0) if args.center else None,
        "size": args.size,
        "count": args.count,
        "method": args.method,
        "stage": args.stage,
        "sigma": args.sigma,
        "ddim_steps": args.ddim_steps or DEFAULT_DDIM_STEPS,
        "pancreas_blend": bool(args.pancreas_blend),
        "keep_intermediates": bool(args.keep_intermediates),
        "weights": str(engine.weights.root) if engine.weights.root is not None else None,
        "seed": args.seed,
        "n": args.n or 1,
    }


# --------------------------------------------------------------------------------------------
# one output
# --------------------------------------------------------------------------------------------
def _read(path: Path, flag: str):
    from backend.errors import DiffTumorError
    from backend.io import read_image

    try:
        return read_image(path)
    except DiffTumorError as exc:
        text = str(exc)
        raise DiffTumorError(f"{flag} {text}" if text.startswith(str(path)) else f"{flag} {path}: {text}") from None


def _tumor_mask(args, ct, seed: int):
    """(tumour mask or None, its provenance entry, its name for engine messages)."""
    import numpy as np

    from backend.errors import DiffTumorError

    if args.tumor_mask:
        path = Path(args.tumor_mask)
        entry = {"source": "mask file", "file": os.path.abspath(path)}
        return _read(path, "--tumor-mask"), entry, f"--tumor-mask {path}"
    if not args.center:
        return None, None, "tumor mask"
    from backend.synthesis.masks import ellipsoid_mask

    given = _floats(args.center, 3, "--center")
    radii = _floats(args.radii, 3, "--radii")
    rot = _floats(args.rotation, 3, "--rotation") if args.rotation else None
    irregularity = args.irregularity or 0.0
    g = ct.geometry
    world = np.asarray(g.voxel_to_world(np.asarray(given)) if args.voxel else given, float)
    index = np.asarray(g.world_to_voxel(world), float)
    size = [int(v) for v in g.size]
    if np.any(index < -0.5) or np.any(index > np.asarray(size) - 0.5):
        raise DiffTumorError(
            f"--center {args.center}{' --voxel' if args.voxel else ''}: lies outside the image (voxel index "
            f"{', '.join(f'{v:.1f}' for v in index)}; the image has {' x '.join(map(str, size))} voxels)")
    mask = ellipsoid_mask(g, given, radii, voxel=args.voxel, rotation=rot, irregularity=irregularity, rng=seed)
    entry = {
        "source": "ellipsoid",
        "ellipsoid": {
            "centre_given": given,
            "centre_given_as": "voxel index (x, y, z)" if args.voxel else "world mm (LPS)",
            "centre_world_mm_lps": [round(float(v), 2) for v in world],
            "centre_voxel_xyz": [round(float(v), 2) for v in index],
            "radii_mm": radii,
            "rotation_deg_xyz": rot or [0.0, 0.0, 0.0],
            "irregularity": irregularity,
            "irregularity_seed": int(seed),
        },
    }
    return mask, entry, f"ellipsoid (--center {args.center} --radii {args.radii})"


def synthesize_case(engine, ct_path, organs_path, out_dir: Path, args, seed: int, settings: dict | None = None) -> dict:
    """Read, synthesize, then write the outputs (nothing is left behind when anything fails)."""
    from backend.errors import DiffTumorError
    from backend.organs import load_organ_and_tumors

    ct = _read(Path(ct_path), "--ct")
    try:
        organ, existing = load_organ_and_tumors(organs_path, args.organ, label_id=args.organ_label, reference=ct)
    except DiffTumorError as exc:  # the organs module names the file; say which option gave it
        raise DiffTumorError(f"--organs {exc}") from None
    tumor, mask_entry, tumor_name = _tumor_mask(args, ct, seed)
    result = engine.synthesize(
        ct, organ, tumor, organ=args.organ, method=args.method, seed=seed, stage=args.stage, size=args.size,
        count=args.count, sigma=args.sigma, ddim_steps=args.ddim_steps or DEFAULT_DDIM_STEPS,
        pancreas_blend=args.pancreas_blend, tumor_name=tumor_name, organ_name=str(organs_path),
        keep_intermediates=bool(args.keep_intermediates), weights_organ=args.weights_organ,
        existing_tumor=existing,  # an MSD/LiTS/KiTS map's tumours stay tumour, never painted over
    )
    prov = dict(result.provenance)
    if mask_entry is not None:  # the engine only knows "a mask came in": say which and with what parameters
        prov["mask"] = {**prov.get("mask", {}), **mask_entry}
    prov["organ_label"] = args.organ_label
    prov["inputs"] = {"ct": os.path.abspath(ct_path), "organs": os.path.abspath(organs_path),
                      "tumor_mask": os.path.abspath(args.tumor_mask) if args.tumor_mask else None}
    if settings is not None:
        prov["settings"] = settings
    if args.keep_intermediates:
        from backend.synthesis.engine import INTERMEDIATES

        prov["intermediates"] = {f"{k}.nii.gz": INTERMEDIATES[k] for k in result.intermediates}
    images = {"ct.nii.gz": result.ct, "label.nii.gz": result.label_volume()}
    images.update({f"{k}.nii.gz": (vol, ct.geometry) for k, vol in result.intermediates.items()})
    write_outputs(out_dir, images, prov, out_flag_value=Path(args.out))
    return prov


def _staging(out_dir: Path) -> Path:
    """Where an output is assembled before it is published: a hidden folder beside a new output folder
    (renamed into place when complete, so the output appears whole or not at all), or inside an existing
    one (files moved in, provenance last). A run killed meanwhile leaves only this folder, which the next
    write of the same output removes."""
    if out_dir.is_dir():
        return out_dir / STAGING
    return out_dir.parent / f".{out_dir.name}{STAGING}"


def write_outputs(out_dir: Path, images: dict, prov: dict, *, out_flag_value: Path) -> None:
    """Write the images, then provenance.json, into a staging folder (:func:`_staging`) and publish them
    in ``out_dir``; on any failure remove what this call wrote (and the folders it made) and report an
    OSError as one line naming the path."""
    import shutil

    from backend.io import write_image, write_text_atomic
    from backend.synthesis.engine import INTERMEDIATES

    made = [d for d in (out_dir, *out_dir.parents) if not d.exists()][::-1]
    stage = _staging(out_dir)
    published: list[Path] = []
    try:
        for d in made[:-1] if out_dir in made else made:
            d.mkdir()
        if stage.exists():  # left by a run that was killed while writing this output
            shutil.rmtree(stage)
        stage.mkdir()
        for name, data in images.items():
            if isinstance(data, tuple):
                write_image(data[0], data[1], stage / name)
            else:
                write_image(data, stage / name)
        write_text_atomic(stage / "provenance.json", json.dumps(prov, indent=1, default=str))
        if stage.parent != out_dir:
            os.rename(stage, out_dir)  # a new output folder appears complete
        else:
            # the old provenance goes first: an output without one is unfinished (redone on resume)
            (out_dir / "provenance.json").unlink(missing_ok=True)
            for name in (*images, "provenance.json"):
                os.replace(stage / name, out_dir / name)
                published.append(out_dir / name)
            stage.rmdir()
    except BaseException as exc:
        shutil.rmtree(stage, ignore_errors=True)
        for p in published:
            try:
                p.unlink(missing_ok=True)
            except OSError:  # pragma: no cover - the folder turned read-only under us
                pass
        for d in reversed(made):
            try:
                d.rmdir()
            except OSError:  # pragma: no cover - someone else wrote there meanwhile
                pass
        if isinstance(exc, OSError):
            raise _os_error(out_flag_value, exc, stage=stage, out_dir=out_dir) from None
        raise
    for key in INTERMEDIATES:  # a replaced result's intermediates that this run did not make
        if f"{key}.nii.gz" not in images:
            (out_dir / f"{key}.nii.gz").unlink(missing_ok=True)


def unused_options(args, prov: dict) -> list[str]:
    """The diffusion-only options the user gave that had no effect on this output."""
    given = [d for d in DIFFUSION_ONLY if getattr(args, d) not in (None, False)]
    if prov.get("method") != "diffusion":
        return [_flag(d) for d in given]
    from backend.synthesis.blend import uses_blend

    organ = prov.get("organ", args.organ)
    stages = {t.get("stage") for t in prov.get("tumours", [])}
    unused = []
    if "ddim_steps" in given and "mid_late" not in stages:
        unused.append("ddim_steps")  # early tumours use the ancestral sampler
    if "sigma" in given and not uses_blend(organ, args.pancreas_blend):
        unused.append("sigma")  # the pancreas crop is replaced, not blended
    if "pancreas_blend" in given and organ != "pancreas":
        unused.append("pancreas_blend")
    return [_flag(d) for d in unused]


def _warn_unused(args, prov: dict, warned: set) -> None:
    names = unused_options(args, prov)
    key = (prov.get("method"), tuple(names))
    if names and key not in warned:
        warned.add(key)
        log.warning("%s had no effect: the %s method ran (%s)", ", ".join(names), prov.get("method"),
                    prov.get("method_reason", ""))


# --------------------------------------------------------------------------------------------
# existing outputs
# --------------------------------------------------------------------------------------------
def _show(value) -> str:
    if value is None:
        return "(not given)"
    if isinstance(value, bool):
        return "on" if value else "off"
    if isinstance(value, list):
        return ",".join(f"{v:g}" if isinstance(v, float) else str(v) for v in value)
    return str(value)


def check_single_out(out: Path, args) -> None:
    """A non-empty --out needs --overwrite, and never may an output replace one of the inputs."""
    from backend.errors import DiffTumorError

    if not out.is_dir():
        return
    present = sorted(p.name for p in out.iterdir() if p.name != STAGING)  # STAGING: a killed run's leftover
    if present and not args.overwrite:
        shown = ", ".join(present[:3]) + (", ..." if len(present) > 3 else "")
        raise DiffTumorError(f"--out {out}: folder is not empty ({shown}); choose another --out, or pass --overwrite "
                             "to replace the results there")
    from backend.synthesis.engine import INTERMEDIATES

    outputs = [out / n for n in (*OUTPUT_FILES, *(f"{k}.nii.gz" for k in INTERMEDIATES))]
    for dest in ("ct", "organs", "tumor_mask"):
        value = getattr(args, dest)
        if value and any(o.exists() and os.path.samefile(value, o) for o in outputs):
            raise DiffTumorError(f"{_flag(dest)} {value}: is one of the files --out {out} would replace; "
                                 "choose another --out")


def check_dataset_out(out: Path, args) -> None:
    """Dataset mode: --out may not be the --ct or --organs folder. Its ``<case>_s<k>/ct.nii.gz`` outputs would
    be read as new cases by the next run of the same command, so that resuming fails (or synthesizes on
    synthetic CTs)."""
    from backend.errors import DiffTumorError

    if not out.is_dir():
        return
    for dest in ("ct", "organs"):
        if os.path.samefile(getattr(args, dest), out):
            raise DiffTumorError(f"--out {out}: is the --{dest} folder; its outputs would be read as new cases "
                                 "by the next run; choose another --out (e.g. a folder beside it)")


def start_dataset_run(out: Path, settings: dict, overwrite: bool) -> None:
    """Refuse a non-empty --out made by another run (other settings, or not by this command) unless
    ``overwrite``; then record ``settings`` in :data:`RUN_FILE` (atomically)."""
    from backend import __version__
    from backend.errors import DiffTumorError
    from backend.io import write_text_atomic

    run_file = out / RUN_FILE
    # another shard starting at the same moment may have made the folder and be writing the run file
    # (a hidden temporary until it is complete): that folder counts as empty
    begun = out.is_dir() and any(not _run_file_temp(p.name) for p in out.iterdir())
    if begun and not overwrite:
        try:
            old = json.loads(run_file.read_text(encoding="utf-8"))["settings"]
        except (OSError, ValueError, KeyError, TypeError):
            raise DiffTumorError(f"--out {out}: folder is not empty and holds no {RUN_FILE} from an earlier "
                                 "'difftumor synthesize' run; choose another --out, or pass --overwrite") from None
        for key in settings:
            if old.get(key) != settings[key]:
                raise DiffTumorError(
                    f"--out {out}: holds results made with {_flag(key)} {_show(old.get(key))}, but this run has "
                    f"{_flag(key)} {_show(settings[key])}; choose another --out, or pass --overwrite to redo them")
    made = not out.exists()
    try:
        out.mkdir(parents=True, exist_ok=True)
        write_text_atomic(run_file, json.dumps({"command": "difftumor synthesize", "version": __version__,
                                                "settings": settings}, indent=1))
    except OSError as exc:
        if made and out.is_dir() and not any(out.iterdir()):
            out.rmdir()
        raise _os_error(out, exc) from None


def _run_file_temp(name: str) -> bool:
    """A temporary of :data:`RUN_FILE` while backend.io.write_text_atomic writes it."""
    return name.startswith(f".{RUN_FILE}.") and name.endswith(".tmp")


def output_done(dest: Path, settings: dict) -> bool:
    """All of the output's files exist and its provenance was written with these settings."""
    try:
        prov = json.loads((dest / "provenance.json").read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return False
    if not isinstance(prov, dict) or prov.get("settings") != settings:
        return False
    names = [*OUTPUT_FILES, *(prov.get("intermediates") or {})]
    return all((dest / n).is_file() for n in names)


class _OncePerMessage(logging.Filter):
    """Let each distinct message through once (the engine's per-output 'synthesis method' line)."""

    def __init__(self):
        super().__init__()
        self.seen: set[str] = set()

    def filter(self, record: logging.LogRecord) -> bool:
        text = record.getMessage()
        if text in self.seen:
            return False
        self.seen.add(text)
        return True


# --------------------------------------------------------------------------------------------
# the command
# --------------------------------------------------------------------------------------------
def case_ct_file(folder: Path) -> Path | None:
    """``folder/ct.<ext>``: the CT of an AbdomenAtlas / TotalSegmentator case folder, or None."""
    from backend.io import IMAGE_SUFFIXES

    return next((folder / f"ct{sfx}" for sfx in IMAGE_SUFFIXES if (folder / f"ct{sfx}").is_file()), None)


def _visible(folder: Path) -> list[Path]:
    """Entries of ``folder`` sorted by name, without hidden ones (macOS '._' copies in the MSD archives,
    staging folders)."""
    return sorted(p for p in folder.iterdir() if not p.name.startswith("."))


def is_dataset_folder(folder: Path) -> bool:
    """A folder of CT files, or of case folders each holding ``ct.<ext>`` (any other folder is one DICOM CT)."""
    from backend.io import image_suffix

    return folder.is_dir() and any((p.is_file() and image_suffix(p)) or (p.is_dir() and case_ct_file(p))
                                   for p in _visible(folder))


def dataset_cases(ct_dir: Path, organs_dir: Path) -> list[tuple[str, Path, Path]]:
    """(case, CT, labels) for every CT in ``ct_dir``: ``<case>.<ext>`` files, or ``<case>/ct.<ext>`` case folders
    (AbdomenAtlas, TotalSegmentator). Labels: ``organs_dir/<case>.<ext>`` or the case folder
    ``organs_dir/<case>/`` (its ``segmentations/``); ``--organs`` may be the ``--ct`` folder itself."""
    from backend.errors import DiffTumorError
    from backend.io import image_suffix, strip_image_suffix

    if not organs_dir.is_dir():
        raise DiffTumorError(f"--organs {organs_dir}: with a CT folder, --organs must be a folder too")
    labels = _visible(organs_dir)
    cases = []
    for p in _visible(ct_dir):
        if p.is_file() and image_suffix(p):
            case, ct = strip_image_suffix(p), p
        elif p.is_dir() and case_ct_file(p):
            case, ct = p.name, case_ct_file(p)
        else:
            continue
        match = [q for q in labels if (q.is_file() and image_suffix(q) and strip_image_suffix(q) == case)
                 or (q.is_dir() and q.name == case)]
        if not match:
            raise DiffTumorError(f"--organs {organs_dir}: no label file or case folder for {p.name}")
        cases.append((case, ct, match[0]))
    if not cases:
        raise DiffTumorError(f"--ct {ct_dir}: no CT files found in this folder (accepted: {_accepted()}, or case "
                             "folders holding ct.nii.gz)")
    return cases


def _accepted() -> str:
    from backend.io import IMAGE_SUFFIXES

    return ", ".join(IMAGE_SUFFIXES)


def rank_device(device: str, *, sharded_by_flag: bool) -> str:
    """Under ``torchrun`` on a machine with several GPUs, rank r uses GPU ``LOCAL_RANK`` (modulo the GPUs
    present) when ``--device`` is auto or cuda; otherwise ``device`` as given."""
    world = int(os.environ.get("WORLD_SIZE", 1))
    local = os.environ.get("LOCAL_RANK")
    if sharded_by_flag or world < 2 or local is None or str(device).lower() not in ("auto", "cuda"):
        return device
    import torch

    if not torch.cuda.is_available():
        return device
    return f"cuda:{int(local) % torch.cuda.device_count()}"


def handler(args) -> int:
    from backend.errors import DiffTumorError

    check_options(args)
    _check_inputs_exist(args)
    ct_path, out = Path(args.ct), Path(args.out)
    # a folder holding image files or case folders is a dataset; any other folder is read as one DICOM series
    dataset = is_dataset_folder(ct_path)
    if not dataset:
        dataset_flags = [f for f in ("n", "shard") if getattr(args, f) is not None]
        if ct_path.is_dir() and (dataset_flags or not any(files for _, _, files in os.walk(ct_path))):
            raise DiffTumorError(f"--ct {ct_path}: no CT files found in this folder (accepted: {_accepted()}, "
                                 "or a folder of DICOM slices for one CT)")
        if dataset_flags:
            flag = dataset_flags[0]
            raise DiffTumorError(f"{_flag(flag)} {getattr(args, flag)}: only for dataset mode (--ct a folder of CT files); "
                                 f"--ct {ct_path} is a single CT")
    check_out_writable(out)
    if not dataset:
        check_single_out(out, args)
    else:
        check_dataset_out(out, args)

    from backend.synthesis.engine import SynthesisEngine

    engine = SynthesisEngine(args.weights, device=rank_device(args.device, sharded_by_flag=args.shard is not None))
    settings = run_settings(args, engine)
    warned: set = set()
    if not dataset:
        prov = synthesize_case(engine, ct_path, Path(args.organs), out, args, args.seed, settings)
        _warn_unused(args, prov, warned)
        log.info("%s: %s tumour(s) by %s -> %s", ct_path.name, prov["n_tumours"], prov["method"], out)
        return 0
    return _run_dataset(engine, args, ct_path, out, settings, warned)


def _run_dataset(engine, args, ct_path: Path, out: Path, settings: dict, warned: set) -> int:
    from tqdm import tqdm
    from tqdm.contrib.logging import logging_redirect_tqdm

    from backend.errors import DiffTumorError

    rank, world = parse_shard(args.shard)
    cases = dataset_cases(ct_path, Path(args.organs))
    start_dataset_run(out, settings, args.overwrite)
    n = args.n or 1
    jobs = [(ci, case, c, o, k) for ci, (case, c, o) in enumerate(cases) for k in range(n)]
    jobs = [j for j in jobs if j[0] % world == rank]
    todo = [j for j in jobs if not output_done(out / f"{j[1]}_s{j[4]}", settings)]
    if len(todo) < len(jobs):
        log.info("%d of %d outputs already done in %s (skipped); %d to synthesize", len(jobs) - len(todo), len(jobs),
                 out, len(todo))
    engine_log = logging.getLogger("backend.synthesis.engine")
    once = _OncePerMessage()
    engine_log.addFilter(once)
    failures = done = 0
    try:
        with logging_redirect_tqdm():
            desc = "synthesize" if world == 1 else f"synthesize shard {rank}/{world}"
            for ci, case, c, o, k in tqdm(todo, desc=desc, unit="output", disable=not todo):
                try:
                    prov = synthesize_case(engine, c, o, out / f"{case}_s{k}", args, output_seed(args.seed, case, k), settings)
                    _warn_unused(args, prov, warned)
                except DiffTumorError as exc:
                    failures += 1
                    log.error("%s: %s", case, exc)
                else:
                    done += 1
    except KeyboardInterrupt:
        left = len(todo) - done - failures
        log.warning("interrupted with %d of %d outputs left; re-run the same command to resume (finished outputs "
                    "are kept and skipped)", left, len(jobs))
        raise
    finally:
        engine_log.removeFilter(once)
    shard = "" if world == 1 else f" (shard {rank}/{world}: {len(jobs)} of {len(cases) * n})"
    log.info("%d of %d outputs written to %s, %d already there, %d failed%s", done, len(jobs), out,
             len(jobs) - len(todo), failures, shard)
    if failures:
        log.error("%d of %d outputs failed (see the messages above); rerun to retry them", failures, len(jobs))
        return 1
    return 0
