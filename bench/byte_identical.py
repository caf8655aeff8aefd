"""Are `difftumor synthesize` outputs byte-identical between two versions of the code?

A refactor must not change what the command writes. This script runs the same `difftumor synthesize`
commands (model-based, fixed seed, no weights needed) on the shared real CT with two checkouts, the one
before and this one, and compares what they wrote:

* each image (``ct.nii.gz``, ``label.nii.gz``): the decompressed NIfTI bytes (header and voxels); when those
  differ, the voxel arrays, dtype and geometry separately, to say which part changed;
* ``provenance.json``: every key, after removing timings (``seconds``, ``created``) and replacing the output
  folder by ``<OUT>``; keys that exist on one side only are listed apart from values that differ.

Usage::

    python bench/byte_identical.py --before-rev dbfbcb9          # a temporary git worktree of that commit
    python bench/byte_identical.py --before /tmp/wt-before       # or an existing checkout
    python bench/byte_identical.py --before-rev dbfbcb9 --after-rev 972ba6d   # two commits
    python bench/byte_identical.py --before-rev dbfbcb9 --json   # one JSON object

Exit status 0 when every image is identical (provenance differences are reported, not counted: the
provenance format may change on purpose), 1 otherwise.
"""

from __future__ import annotations

import argparse
import gzip
import json
import os
import subprocess
import sys
import tempfile
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
DATA = REPO.parent / "shared" / "data" / "totalseg_abdomen_3mm"
CT, SEG = "example_ct_sm.nii.gz", "example_seg.nii.gz"
TIMING_KEYS = {"seconds", "created"}

# name -> synthesize arguments after --ct/--organs (single CT) or the dataset's folders
CASES = {
    "liver generated small x2": ["--organ", "liver", "--size", "small", "--count", "2", "--seed", "7"],
    "kidney ellipsoid (world mm)": ["--organ", "kidney", "--center", "-64.4,-125.3,118.2", "--radii", "9,8,7",
                                    "--seed", "3"],
    "pancreas generated medium": ["--organ", "pancreas", "--size", "medium", "--seed", "11"],
    "spleen ellipsoid (voxel) rotated": ["--organ", "spleen", "--center", "22,37,18", "--voxel", "--radii", "8,6,6",
                                         "--rotation", "20,0,30", "--irregularity", "0.5", "--seed", "5"],
}
DATASET = ["--organ", "liver", "--size", "tiny", "--n", "2", "--seed", "1"]


def run(tree: Path, argv: list[str], home: Path) -> None:
    env = {**os.environ, "PYTHONPATH": str(tree), "XDG_CONFIG_HOME": str(home), "OMP_NUM_THREADS": "1"}
    env.pop("DIFFTUMOR_WEIGHTS", None)
    code = "import sys\nfrom backend.cli import main\nsys.exit(main(sys.argv[1:]))"
    cmd = [sys.executable, "-c", code, "synthesize", "--method", "model-based", "--device", "cpu", *argv]
    out = subprocess.run(cmd, cwd=tree, env=env, capture_output=True, text=True)
    if out.returncode != 0:
        raise SystemExit(f"{tree}: synthesize {' '.join(argv)} failed:\n{out.stderr}")


def synthesize_all(tree: Path, out: Path) -> None:
    """Every case of :data:`CASES` into ``out/<k>/``, and the dataset run into ``out/dataset/``."""
    home = out / ".config"
    for k, (_, args) in enumerate(CASES.items()):
        run(tree, ["--ct", str(DATA / CT), "--organs", str(DATA / SEG), *args, "--out", str(out / str(k))], home)
    cts, labels = out / ".in" / "cts", out / ".in" / "labels"
    for folder, name in ((cts, CT), (labels, SEG)):
        folder.mkdir(parents=True, exist_ok=True)
        for case in ("caseA", "caseB"):
            (folder / f"{case}.nii.gz").symlink_to(DATA / name)
    run(tree, ["--ct", str(cts), "--organs", str(labels), *DATASET, "--out", str(out / "dataset")], home)


def outputs(root: Path) -> dict[str, Path]:
    return {p.relative_to(root).as_posix(): p for p in sorted(root.rglob("*"))
            if p.is_file() and not any(part.startswith(".") for part in p.relative_to(root).parts)}


def compare_image(a: Path, b: Path) -> dict:
    ra, rb = gzip.decompress(a.read_bytes()), gzip.decompress(b.read_bytes())
    if ra == rb:
        return {"identical": True, "bytes": len(ra)}
    import numpy as np
    import SimpleITK as sitk

    ia, ib = sitk.ReadImage(str(a)), sitk.ReadImage(str(b))
    xa, xb = sitk.GetArrayFromImage(ia), sitk.GetArrayFromImage(ib)
    same_grid = (ia.GetSize(), ia.GetSpacing(), ia.GetOrigin(), ia.GetDirection()) == \
                (ib.GetSize(), ib.GetSpacing(), ib.GetOrigin(), ib.GetDirection())
    return {"identical": False, "header_identical": ra[:352] == rb[:352], "grid_identical": same_grid,
            "dtype": [str(xa.dtype), str(xb.dtype)],
            "voxels_differing": int(np.sum(xa != xb)) if xa.shape == xb.shape else "shape differs"}


def _flat(value, prefix: str = "") -> dict[str, object]:
    if isinstance(value, dict):
        out: dict[str, object] = {}
        for k, v in value.items():
            if k not in TIMING_KEYS:
                out.update(_flat(v, f"{prefix}.{k}" if prefix else k))
        return out
    if isinstance(value, list) and any(isinstance(v, (dict, list)) for v in value):
        out = {}
        for i, v in enumerate(value):
            out.update(_flat(v, f"{prefix}[{i}]"))
        return out
    return {prefix: value}


def compare_provenance(a: Path, b: Path, out_a: Path, out_b: Path) -> dict:
    fa = _flat(json.loads(a.read_text(encoding="utf-8").replace(str(out_a), "<OUT>")))
    fb = _flat(json.loads(b.read_text(encoding="utf-8").replace(str(out_b), "<OUT>")))
    return {"identical": fa == fb,
            "only_before": sorted(set(fa) - set(fb)), "only_after": sorted(set(fb) - set(fa)),
            "differ": {k: [fa[k], fb[k]] for k in sorted(set(fa) & set(fb)) if fa[k] != fb[k]}}


def compare(before: Path, after: Path, work: Path) -> dict:
    out_a, out_b = work / "before", work / "after"
    synthesize_all(before, out_a)
    synthesize_all(after, out_b)
    files_a, files_b = outputs(out_a), outputs(out_b)
    report: dict = {"before": str(before), "after": str(after), "missing": sorted(set(files_a) ^ set(files_b)),
                    "images": {}, "provenance": {}, "other": {}}
    for name in sorted(set(files_a) & set(files_b)):
        a, b = files_a[name], files_b[name]
        if name.endswith(".nii.gz"):
            report["images"][name] = compare_image(a, b)
        elif name.endswith("provenance.json"):
            report["provenance"][name] = compare_provenance(a, b, out_a, out_b)
        else:
            report["other"][name] = compare_provenance(a, b, out_a, out_b) if name.endswith(".json") else \
                {"identical": a.read_bytes() == b.read_bytes()}
    report["images_identical"] = not report["missing"] and all(r["identical"] for r in report["images"].values())
    return report


def _print(report: dict) -> None:
    print(f"before: {report['before']}\nafter:  {report['after']}")
    for name, r in report["images"].items():
        print(f"  {name:45s} {'identical' if r['identical'] else 'DIFFERS ' + json.dumps(r)}"
              + (f" ({r['bytes']:,} NIfTI bytes)" if r["identical"] else ""))
    for name, r in {**report["provenance"], **report["other"]}.items():
        if r["identical"]:
            print(f"  {name:45s} identical (timings and the output folder aside)")
            continue
        print(f"  {name:45s} differs:")
        for key in ("only_before", "only_after"):
            if r.get(key):
                print(f"      {key}: {', '.join(r[key])}")
        for k, (va, vb) in r.get("differ", {}).items():
            print(f"      {k}: {json.dumps(va)} -> {json.dumps(vb)}")
    if report["missing"]:
        print(f"  written by one side only: {', '.join(report['missing'])}")
    n = len(report["images"])
    print(f"result: {n} images, {'all byte-identical' if report['images_identical'] else 'NOT all identical'}")


def _describe(rev: str) -> str:
    out = subprocess.run(["git", "-C", str(REPO), "log", "-1", "--format=%h %s", rev], capture_output=True, text=True)
    return out.stdout.strip() or rev


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    src = parser.add_mutually_exclusive_group(required=True)
    src.add_argument("--before", type=Path, help="checkout of the earlier code")
    src.add_argument("--before-rev", help="commit of the earlier code (checked out into a temporary git worktree)")
    dst = parser.add_mutually_exclusive_group()
    dst.add_argument("--after", type=Path, default=REPO, help="checkout of the later code (default: this one)")
    dst.add_argument("--after-rev", help="commit of the later code (a temporary git worktree)")
    parser.add_argument("--json", action="store_true", help="print one JSON object")
    args = parser.parse_args(argv)
    with tempfile.TemporaryDirectory(prefix="byte-identical-") as tmp:
        work = Path(tmp)
        trees = {"before": args.before, "after": args.after}
        made = []
        for side, rev in (("before", args.before_rev), ("after", args.after_rev)):
            if rev:
                trees[side] = work / f"tree-{side}"
                subprocess.run(["git", "-C", str(REPO), "worktree", "add", "--detach", "-q", str(trees[side]), rev],
                               check=True)
                made.append(trees[side])
        try:
            report = compare(trees["before"].resolve(), trees["after"].resolve(), work)
        finally:
            for tree in made:  # only the worktrees made here
                subprocess.run(["git", "-C", str(REPO), "worktree", "remove", "--force", str(tree)], check=False)
        for side, rev in (("before", args.before_rev), ("after", args.after_rev)):
            if rev:
                report[side] = _describe(rev)
    if args.json:
        print(json.dumps(report, indent=1))
    else:
        _print(report)
    return 0 if report["images_identical"] else 1


if __name__ == "__main__":
    sys.exit(main())
