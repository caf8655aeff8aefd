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

This module parses and prints only: the options become a :class:`backend.synthesis.request.SynthesisRequest`
(:func:`build_request`; its errors are re-worded with the flags by :func:`cli_words`), the engine runs it and
:mod:`backend.synthesis.outputs` writes and checks the outputs (docs/synthesis.md).
"""

from __future__ import annotations

import logging
import os
from contextlib import contextmanager
from pathlib import Path

log = logging.getLogger(__name__)

RUN_FILE = "difftumor_synthesize.json"  # = backend.synthesis.outputs.RUN_FILE (no import: --help stays light)
OUTPUT_FILES = ("ct.nii.gz", "label.nii.gz", "provenance.json")  # = backend.synthesis.outputs.OUTPUT_FILES
MAX_SEED = 2**32 - 1
DEFAULT_DDIM_STEPS = 50
# the request's field names whose command-line flag is not "--" + the name with dashes
FLAGS = {"centre": "--center", "overwrite": "pass --overwrite"}


def _flag(dest: str) -> str:
    """The command-line flag of an option (a request field, a setting): ``ddim_steps`` -> ``--ddim-steps``."""
    return FLAGS.get(dest, "--" + dest.replace("_", "-"))


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
    p.add_argument("--ddim-steps", "--steps", dest="ddim_steps", type=int, default=None,
                   help=f"diffusion: sampler steps for mid/late tumours (default {DEFAULT_DDIM_STEPS}; 15 with --sampler dpm++)")
    p.add_argument("--sampler", default=None,  # checked by the request: a bad name is one line
                   help="diffusion, mid/late tumours: ddim (default, as released) or dpm++ (DPM-Solver++(2M), opt-in)")
    p.add_argument("--pancreas-blend", action="store_true", help="diffusion: blend pancreas tumours like the other organs")
    p.add_argument("--mass-effect", default="auto", metavar="auto|on|off",
                   help="push the tissue around the tumour outward, organ label with it (both methods). auto "
                        "(default): model-based tumours of 20 mm and more, none for diffusion (as released); on: "
                        "every tumour; off: none")
    p.add_argument("--phase", default=None, metavar="auto|non-contrast|enhanced",
                   help="model-based: the contrast phase whose tumour contrast is drawn (default auto: told from the "
                        "organ's HU)")
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
    """Refuse options that contradict each other, and values the request does not see (one line naming them).
    The values of the request's own options are checked by :func:`build_request`."""
    from backend.errors import DiffTumorError

    if args.n is not None and args.n < 1:
        raise DiffTumorError(f"--n {args.n}: must be >= 1")
    if args.shard is not None:
        parse_shard(args.shard)
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
        _floats(args.radii, 3, "--radii")
        if args.rotation:
            _floats(args.rotation, 3, "--rotation")
        return
    if args.radii:
        raise DiffTumorError("--radii: give --center X,Y,Z as well")
    for dest, value in (("rotation", args.rotation), ("irregularity", args.irregularity), ("voxel", args.voxel)):
        if value not in (None, False):
            raise DiffTumorError(f"{_flag(dest)}: only used for an ellipsoid; give --center X,Y,Z and --radii A,B,C as well")


def build_request(args):
    """The :class:`~backend.synthesis.request.SynthesisRequest` of the command line (a ``--tumor-mask`` is read
    per case, see :func:`synthesize_case`)."""
    from backend.synthesis.request import Ellipsoid, Generated, SynthesisRequest, UserMask

    if args.tumor_mask:
        tumor = UserMask(None, f"--tumor-mask {args.tumor_mask}", os.path.abspath(args.tumor_mask))
    elif args.center:
        tumor = Ellipsoid(_floats(args.center, 3, "--center"), _floats(args.radii, 3, "--radii"), voxel=args.voxel,
                          rotation=_floats(args.rotation, 3, "--rotation") if args.rotation else None,
                          irregularity=args.irregularity or 0.0,
                          name=f"ellipsoid (--center {args.center} --radii {args.radii})")
    else:
        tumor = Generated(args.size, args.count)
    with cli_words(args):
        return SynthesisRequest(organ=args.organ, tumor=tumor, method=args.method, seed=args.seed, stage=args.stage,
                                sigma=args.sigma, ddim_steps=args.ddim_steps, pancreas_blend=args.pancreas_blend,
                                keep_intermediates=bool(args.keep_intermediates), weights_organ=args.weights_organ,
                                mass_effect=args.mass_effect, phase=args.phase, sampler=args.sampler)


@contextmanager
def cli_words(args):
    """Rename the option in a library error (``blend blur sigma 30: ...``) to its flag (``--sigma 30: ...``),
    quoting the value as the user typed it."""
    from backend.synthesis.request import OptionError

    try:
        yield
    except OptionError as exc:
        typed = {"centre": args.center and args.center + (" --voxel" if args.voxel else ""),
                 "radii": args.radii, "rotation": args.rotation}.get(exc.option)
        raise exc.renamed(_flag(exc.option), typed) from None


def _check_inputs_exist(args) -> None:
    from backend.errors import DiffTumorError

    for dest in ("ct", "organs", "tumor_mask"):
        value = getattr(args, dest)
        if value and not Path(value).exists():
            raise DiffTumorError(f"{_flag(dest)} {value}: no such file or folder")


def check_out_writable(out: Path) -> None:
    """``--out`` must be a folder (or not exist yet) that we may create and write in."""
    from backend.synthesis.outputs import check_out_writable as check

    check(out, names=_flag)


def run_settings(args, request, engine) -> dict:
    """What defines the outputs (recorded in the run file and each provenance; a resume must match it)."""

    def absolute(p):
        return os.path.abspath(p) if p else None

    return {"ct": absolute(args.ct), "organs": absolute(args.organs), "organ_label": args.organ_label,
            **request.settings(), "weights": str(engine.weights.root) if engine.weights.root is not None else None,
            "n": args.n or 1}


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


def synthesize_case(engine, ct_path, organs_path, out_dir: Path, args, request, settings: dict):
    """Read, synthesize, then write the outputs (nothing is left behind when anything fails); returns the result."""
    import dataclasses

    from backend.errors import DiffTumorError
    from backend.organs import load_organ_and_tumors
    from backend.synthesis import outputs

    ct = _read(Path(ct_path), "--ct")
    try:
        organ, existing = load_organ_and_tumors(organs_path, args.organ, label_id=args.organ_label, reference=ct)
    except DiffTumorError as exc:  # the organs module names the file; say which option gave it
        raise DiffTumorError(f"--organs {exc}") from None
    if args.tumor_mask:
        request = dataclasses.replace(request, tumor=dataclasses.replace(
            request.tumor, mask=_read(Path(args.tumor_mask), "--tumor-mask")))
    with cli_words(args):
        # an MSD/LiTS/KiTS map's tumours (existing) stay tumour, never painted over
        result = engine.run(request, ct, organ, existing_tumor=existing, organ_name=str(organs_path))
        prov = outputs.provenance(
            result.provenance, settings=settings, organ_label=args.organ_label,
            inputs={"ct": os.path.abspath(ct_path), "organs": os.path.abspath(organs_path),
                    "tumor_mask": os.path.abspath(args.tumor_mask) if args.tumor_mask else None},
            intermediates=list(result.intermediates) if args.keep_intermediates else None)
        outputs.write_output(out_dir, outputs.result_images(result), prov, names=_flag)
    result.provenance = prov
    return result


def _warn_unused(result, warned: set) -> None:
    """Say once per (method, options) which given options the engine found had no effect."""
    prov = result.provenance
    names = [_flag(d) for d in result.unused]
    key = (prov.get("method"), tuple(names))
    if names and key not in warned:
        warned.add(key)
        log.warning("%s had no effect: the %s method ran (%s)", ", ".join(names), prov.get("method"),
                    prov.get("method_reason", ""))


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
# dataset mode: the cases of a folder
# --------------------------------------------------------------------------------------------
def is_dataset_folder(folder: Path) -> bool:
    """A folder of CT files, or of case folders each holding ``ct.<ext>`` (any other folder is one DICOM CT)."""
    from backend.data import case_ct_file
    from backend.io import image_suffix

    return folder.is_dir() and any((p.is_file() and image_suffix(p)) or (p.is_dir() and case_ct_file(p))
                                   for p in folder.iterdir() if not p.name.startswith("."))


def dataset_cases(ct_dir: Path, organs_dir: Path) -> list[tuple[str, Path, Path]]:
    """(case, CT, labels) for every case :func:`backend.data.list_cases` finds in ``ct_dir`` with ``labels=
    organs_dir``; labels: the file ``organs_dir/<case>.<ext>`` or the case folder ``organs_dir/<case>/``."""
    from backend.data import list_cases
    from backend.errors import DiffTumorError

    organs_dir = organs_dir.expanduser()
    try:
        cases = list_cases(ct_dir, labels=organs_dir)
    except DiffTumorError as exc:  # the lister names the folder; say which option gave it
        raise DiffTumorError(f"{'--organs' if str(exc).startswith(str(organs_dir)) else '--ct'} {exc}") from None
    from_file = lambda c: c.segmentations is None and c.label is not None and c.label.parent == organs_dir  # noqa: E731
    return [(c.name, c.image, c.label if from_file(c) else organs_dir / c.name) for c in cases]


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


# --------------------------------------------------------------------------------------------
# the command
# --------------------------------------------------------------------------------------------
def handler(args) -> int:
    from backend.errors import DiffTumorError
    from backend.synthesis import outputs

    check_options(args)
    request = build_request(args)
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
        outputs.check_single_out(out, {d: getattr(args, d) for d in ("ct", "organs", "tumor_mask")}, args.overwrite,
                                 names=_flag)
    else:
        outputs.check_dataset_out(out, {"ct": args.ct, "organs": args.organs}, names=_flag)

    from backend.synthesis.engine import SynthesisEngine

    engine = SynthesisEngine(args.weights, device=rank_device(args.device, sharded_by_flag=args.shard is not None))
    settings = run_settings(args, request, engine)
    warned: set = set()
    if not dataset:
        result = synthesize_case(engine, ct_path, Path(args.organs), out, args, request, settings)
        _warn_unused(result, warned)
        log.info("%s: %s tumour(s) by %s -> %s", ct_path.name, result.provenance["n_tumours"],
                 result.provenance["method"], out)
        return 0
    return _run_dataset(engine, args, request, ct_path, out, settings, warned)


def _run_dataset(engine, args, request, ct_path: Path, out: Path, settings: dict, warned: set) -> int:
    import dataclasses

    from tqdm import tqdm
    from tqdm.contrib.logging import logging_redirect_tqdm

    from backend.errors import DiffTumorError
    from backend.synthesis import outputs

    rank, world = parse_shard(args.shard)
    cases = dataset_cases(ct_path, Path(args.organs))
    outputs.start_dataset_run(out, settings, args.overwrite, names=_flag)
    n = args.n or 1
    jobs = [(ci, case, c, o, k) for ci, (case, c, o) in enumerate(cases) for k in range(n)]
    jobs = [j for j in jobs if j[0] % world == rank]
    todo = [j for j in jobs if not outputs.output_done(out / f"{j[1]}_s{j[4]}", settings)]
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
            for _, case, c, o, k in tqdm(todo, desc=desc, unit="output", disable=not todo):
                try:
                    case_request = dataclasses.replace(request, seed=output_seed(args.seed, case, k))
                    _warn_unused(synthesize_case(engine, c, o, out / f"{case}_s{k}", args, case_request, settings),
                                 warned)
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
