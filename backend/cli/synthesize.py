"""`difftumor synthesize`: put synthetic tumours into one CT or a whole dataset.

One CT::

    difftumor synthesize --ct ct.nii.gz --organs seg.nii.gz --organ liver --size small --count 2 --out out/
    difftumor synthesize --ct ct.nii.gz --organs seg.nii.gz --organ kidney --center 12.5,-30,88 --radii 8,6,6 --out out/
    difftumor synthesize --ct ct.nii.gz --organs seg.nii.gz --organ pancreas --tumor-mask mask.nrrd --out out/

writes ``out/ct.nii.gz``, ``out/label.nii.gz`` (0 background, 1 organ, 2 tumour) and
``out/provenance.json`` (each atomically; provenance last, so its presence marks a finished case).

A dataset::

    difftumor synthesize --ct cts/ --organs labels/ --organ liver --n 3 --out aug/ [--shard 0/4]

pairs ``cts/<case>.<ext>`` with ``labels/<case>.<ext>`` (or an AbdomenAtlas case folder
``labels/<case>/``), writes ``aug/<case>_s<k>/`` for k < n, skips finished outputs (resumable) and
takes every n-th case for ``--shard i/n`` (under ``torchrun``: RANK / WORLD_SIZE).
"""

from __future__ import annotations

import json
import logging
import os
from pathlib import Path

log = logging.getLogger(__name__)

MAX_SEED = 2**32 - 1


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
    p.add_argument("--ct", required=True, help="CT file or DICOM folder; a folder of CT files for dataset mode")
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
    p.add_argument("--irregularity", type=float, default=0.0, help="ellipsoid surface irregularity in [0,1] (default 0)")
    p.add_argument("--size", choices=["tiny", "small", "medium", "large"], help="random tumours of this size class (release generator)")
    p.add_argument("--count", type=int, default=None, help="number of random tumours (default: the class's range)")
    p.add_argument("--method", choices=["auto", "diffusion", "model-based"], default="auto",
                   help="auto = diffusion when the organ's weights are found, else model-based")
    p.add_argument("--stage", choices=["early", "mid_late"], default=None, help="override the stage chosen from the size")
    p.add_argument("--sigma", type=float, default=None, help="blend blur in voxels (default: U(0,4) as released)")
    p.add_argument("--ddim-steps", type=int, default=50, help="DDIM steps for mid/late tumours (default 50)")
    p.add_argument("--pancreas-blend", action="store_true", help="blend pancreas tumours like the other organs")
    p.add_argument("--weights", default=None, help="weights folder (default: $DIFFTUMOR_WEIGHTS or the user config)")
    p.add_argument("--seed", type=seed_arg, default=0,
                   help="random seed for tumour placement, shape and texture (default 0: identical runs give identical "
                        "tumours; give another seed for other tumours). Dataset mode derives one seed per output from it")
    p.add_argument("--keep-intermediates", action="store_true",
                   help="diffusion: also write masked.nii.gz, reconstruction.nii.gz (autoencoder round trip of the "
                        "crop) and decoded.nii.gz (raw decoded sample), float32 HU on the CT grid (one extra decode)")
    p.add_argument("--device", default="auto", help="auto, cuda, cuda:N, mps or cpu")
    p.add_argument("--n", type=int, default=1, help="dataset mode: synthetic versions per CT")
    p.add_argument("--shard", default=None, help="dataset mode: i/n = process every n-th case starting at i")
    p.add_argument("--out", required=True, help="output folder")
    p.set_defaults(func=handler)


def _floats(text: str, n: int, name: str) -> list[float]:
    from backend.errors import DiffTumorError

    try:
        vals = [float(v) for v in text.replace(" ", "").split(",")]
    except ValueError:
        vals = []
    if len(vals) != n:
        raise DiffTumorError(f"{name} {text}: need {n} comma-separated numbers")
    return vals


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


def _tumor_mask(args, ct):
    from backend.errors import DiffTumorError
    from backend.io import read_image

    if args.tumor_mask:
        return read_image(args.tumor_mask)
    if args.center:
        if not args.radii:
            raise DiffTumorError("--center: also give --radii A,B,C (mm)")
        from backend.synthesis.masks import ellipsoid_mask

        rot = _floats(args.rotation, 3, "--rotation") if args.rotation else None
        return ellipsoid_mask(ct.geometry, _floats(args.center, 3, "--center"), _floats(args.radii, 3, "--radii"),
                              voxel=args.voxel, rotation=rot, irregularity=args.irregularity, rng=args.seed)
    if args.radii:
        raise DiffTumorError("--radii: give --center X,Y,Z as well")
    return None


def synthesize_case(engine, ct_path, organs_path, out_dir: Path, args, seed: int) -> dict:
    """Read, synthesize, then write the three outputs (nothing is written when anything fails)."""
    from backend.io import read_image, write_image
    from backend.organs import load_organ_mask

    ct = read_image(ct_path)
    organ = load_organ_mask(organs_path, args.organ, label_id=args.organ_label, reference=ct)
    tumor = _tumor_mask(args, ct)
    result = engine.synthesize(
        ct, organ, tumor, organ=args.organ, method=args.method, seed=seed, stage=args.stage, size=args.size,
        count=args.count, sigma=args.sigma, ddim_steps=args.ddim_steps, pancreas_blend=args.pancreas_blend,
        tumor_name=str(args.tumor_mask or "tumor mask"), organ_name=str(organs_path),
        keep_intermediates=bool(getattr(args, "keep_intermediates", False)),
        weights_organ=args.weights_organ,
    )
    out_dir.mkdir(parents=True, exist_ok=True)
    write_image(result.ct, out_dir / "ct.nii.gz", overwrite=True)
    write_image(result.label_volume(), out_dir / "label.nii.gz", overwrite=True)
    for key, vol in result.intermediates.items():  # empty unless asked for (and diffusion ran)
        write_image(vol, ct.geometry, out_dir / f"{key}.nii.gz", overwrite=True)
    prov = dict(result.provenance, inputs={"ct": str(ct_path), "organs": str(organs_path),
                                           "tumor_mask": str(args.tumor_mask) if args.tumor_mask else None})
    if getattr(args, "keep_intermediates", False):
        from backend.synthesis.engine import INTERMEDIATES

        prov["intermediates"] = {f"{k}.nii.gz": INTERMEDIATES[k] for k in result.intermediates}
    tmp = out_dir / ".provenance.json.tmp"
    tmp.write_text(json.dumps(prov, indent=1, default=str), encoding="utf-8")
    os.replace(tmp, out_dir / "provenance.json")
    return prov


def dataset_cases(ct_dir: Path, organs_dir: Path) -> list[tuple[str, Path, Path]]:
    from backend.errors import DiffTumorError
    from backend.io import image_suffix, strip_image_suffix

    if not organs_dir.is_dir():
        raise DiffTumorError(f"--organs {organs_dir}: with a CT folder, --organs must be a folder too")
    cases = []
    for p in sorted(ct_dir.iterdir()):
        if not image_suffix(p):
            continue
        case = strip_image_suffix(p)
        match = [q for q in organs_dir.iterdir() if (image_suffix(q) and strip_image_suffix(q) == case) or (q.is_dir() and q.name == case)]
        if not match:
            raise DiffTumorError(f"--organs {organs_dir}: no label file or case folder for {p.name}")
        cases.append((case, p, match[0]))
    if not cases:
        raise DiffTumorError(f"--ct {ct_dir}: no CT files (.nii.gz, .nii, .nrrd, .mha, .mhd) in this folder")
    return cases


def handler(args) -> int:
    from backend.errors import DiffTumorError
    from backend.synthesis.engine import SynthesisEngine

    if args.n < 1:
        raise DiffTumorError(f"--n {args.n}: must be >= 1")
    ct_path, out = Path(args.ct), Path(args.out)
    if not ct_path.exists():
        raise DiffTumorError(f"--ct {ct_path}: no such file or folder")
    from backend.io import image_suffix

    # a folder holding image files is a dataset; any other folder is read as one DICOM series
    dataset = ct_path.is_dir() and any(p.is_file() and image_suffix(p) for p in ct_path.iterdir())
    engine = SynthesisEngine(args.weights, device=args.device)
    if not dataset:
        prov = synthesize_case(engine, ct_path, Path(args.organs), out, args, args.seed)
        log.info("%s: %s tumour(s) by %s (%s) -> %s", ct_path.name, len(prov["tumours"]), prov["method"], prov["method_reason"], out)
        return 0

    from tqdm import tqdm

    rank, world = parse_shard(args.shard)
    cases = dataset_cases(ct_path, Path(args.organs))
    jobs = [(ci, case, c, o, k) for ci, (case, c, o) in enumerate(cases) for k in range(args.n)]
    jobs = [j for j in jobs if j[0] % world == rank]
    failures = 0
    for ci, case, c, o, k in tqdm(jobs, desc=f"synthesize shard {rank}/{world}", unit="case"):
        dest = out / f"{case}_s{k}"
        if (dest / "provenance.json").is_file():
            continue
        try:
            synthesize_case(engine, c, o, dest, args, args.seed + 1000 * ci + k)
        except DiffTumorError as exc:
            failures += 1
            log.error("%s: %s", case, exc)
    if failures:
        log.error("%d of %d outputs failed (see the messages above); rerun to retry them", failures, len(jobs))
        return 1
    return 0
