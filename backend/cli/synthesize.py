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
(:func:`build_request`; library errors are re-worded with the flags by :func:`cli_words`),
:mod:`backend.synthesis.dataset` reads the inputs, runs it on one CT or a dataset (shards, seeds, resume) and
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


def check_options(args) -> None:
    """Refuse options that contradict each other, and values the request does not see (one line naming them).
    The values of the request's own options are checked by :func:`build_request`."""
    from backend.errors import DiffTumorError

    if args.n is not None and args.n < 1:
        raise DiffTumorError(f"--n {args.n}: must be >= 1")
    if args.shard is not None:
        from backend.synthesis.dataset import parse_shard

        with cli_words(args):
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
    per case, see :func:`backend.synthesis.dataset.synthesize_case`)."""
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
        raise _in_flags(exc, args) from None


def _in_flags(exc, args):
    """A library error as the command line says it: an option error under the option's flag."""
    from backend.synthesis.request import OptionError

    if not isinstance(exc, OptionError):
        return exc
    typed = {"centre": args.center and args.center + (" --voxel" if args.voxel else ""),
             "radii": args.radii, "rotation": args.rotation}.get(exc.option)
    return exc.renamed(_flag(exc.option), typed)


def check_out_writable(out: Path) -> None:
    """``--out`` must be a folder (or not exist yet) that we may create and write in."""
    from backend.synthesis.outputs import check_out_writable as check

    check(out, names=_flag)


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
# the command
# --------------------------------------------------------------------------------------------
def handler(args) -> int:
    from backend.synthesis import dataset, outputs

    check_options(args)
    request = build_request(args)
    inputs = {d: getattr(args, d) for d in ("ct", "organs", "tumor_mask")}
    ct_path, out = Path(args.ct), Path(args.out)
    with cli_words(args):
        dataset.check_inputs_exist(inputs)
        # a folder holding image files or case folders is a dataset; any other folder is read as one DICOM series
        is_dataset = dataset.is_dataset_folder(ct_path)
        if not is_dataset:
            dataset.check_single_ct(ct_path, {"n": args.n, "shard": args.shard}, names=_flag)
        check_out_writable(out)
        if not is_dataset:
            outputs.check_single_out(out, inputs, args.overwrite, names=_flag)
        else:
            outputs.check_dataset_out(out, {"ct": args.ct, "organs": args.organs}, names=_flag)

    from backend.synthesis.engine import SynthesisEngine

    engine = SynthesisEngine(args.weights, device=dataset.rank_device(args.device, sharded_by_flag=args.shard is not None))
    settings = dataset.run_settings(request, engine, ct=args.ct, organs=args.organs, organ_label=args.organ_label,
                                    n=args.n)
    warned: set = set()
    if not is_dataset:
        with cli_words(args):
            result = dataset.synthesize_case(engine, request, ct_path, Path(args.organs), out, settings=settings,
                                             organ_label=args.organ_label, tumor_mask=args.tumor_mask, names=_flag)
        _warn_unused(result, warned)
        log.info("%s: %s tumour(s) by %s -> %s", ct_path.name, result.provenance["n_tumours"],
                 result.provenance["method"], out)
        return 0
    with cli_words(args):
        plan = dataset.plan_dataset(ct_path, Path(args.organs), out, settings, n=args.n, shard=args.shard,
                                    overwrite=args.overwrite, names=_flag)
    return _run_dataset(engine, args, request, plan, out, settings, warned)


def _run_dataset(engine, args, request, plan, out: Path, settings: dict, warned: set) -> int:
    """Synthesize the plan's outputs under a progress bar, saying what failed, what was skipped and how to
    resume."""
    from tqdm import tqdm
    from tqdm.contrib.logging import logging_redirect_tqdm

    from backend.synthesis.dataset import iter_dataset

    todo, jobs, rank, world = plan.todo, plan.outputs, plan.rank, plan.world
    if plan.skipped:
        log.info("%d of %d outputs already done in %s (skipped); %d to synthesize", plan.skipped, len(jobs),
                 out, len(todo))
    engine_log = logging.getLogger("backend.synthesis.engine")
    once = _OncePerMessage()
    engine_log.addFilter(once)
    failures = done = 0
    try:
        with logging_redirect_tqdm():
            desc = "synthesize" if world == 1 else f"synthesize shard {rank}/{world}"
            runs = iter_dataset(engine, request, plan, settings=settings, organ_label=args.organ_label,
                                tumor_mask=args.tumor_mask, names=_flag)
            for job, result, error in tqdm(runs, desc=desc, unit="output", total=len(todo), disable=not todo):
                if error is not None:
                    failures += 1
                    log.error("%s: %s", job.case, _in_flags(error, args))
                else:
                    done += 1
                    _warn_unused(result, warned)
    except KeyboardInterrupt:
        left = len(todo) - done - failures
        log.warning("interrupted with %d of %d outputs left; re-run the same command to resume (finished outputs "
                    "are kept and skipped)", left, len(jobs))
        raise
    finally:
        engine_log.removeFilter(once)
    shard = "" if world == 1 else f" (shard {rank}/{world}: {len(jobs)} of {plan.n_cases * plan.n})"
    log.info("%d of %d outputs written to %s, %d already there, %d failed%s", done, len(jobs), out,
             plan.skipped, failures, shard)
    if failures:
        log.error("%d of %d outputs failed (see the messages above); rerun to retry them", failures, len(jobs))
        return 1
    return 0


def __getattr__(name: str):
    """The library functions this module used to hold (``synth_cli.output_seed``, ...), imported on first use
    so that ``difftumor --help`` stays light."""
    if name in ("output_seed", "parse_shard", "rank_device", "is_dataset_folder", "dataset_cases"):
        from backend.synthesis import dataset

        return getattr(dataset, name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
