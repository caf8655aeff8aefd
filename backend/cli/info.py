"""`difftumor info PATH`: geometry, intensities and (for label maps) the organs in an image."""

from __future__ import annotations

import argparse
import json

import numpy as np

MAX_LABELS = 255  # an integer image with at most this many distinct non-negative values is a label map
SAMPLE_VOXELS = 8_000_000  # percentiles of larger images come from an evenly strided sample


def register(sub) -> None:
    parser = sub.add_parser(
        "info",
        help="show geometry, HU range and organs of a CT or label file",
        description=(
            "Print size, spacing, origin, direction and intensity range of a CT or mask "
            "(NIfTI, NRRD, MHA/MHD or a DICOM series folder). For label maps, list the organs "
            "found with voxel counts and volumes."
        ),
    )
    parser.add_argument("path", help="image file or DICOM series folder")
    parser.add_argument("--json", action="store_true", help="print one JSON object instead of text")
    parser.set_defaults(func=handler)


def is_label_map(array: np.ndarray) -> bool:
    """Integer (or bool) image with few distinct non-negative values."""
    if array.dtype == np.bool_:
        return True
    if not np.issubdtype(array.dtype, np.integer) or array.size == 0:
        return False
    lo, hi = int(array.min()), int(array.max())
    if lo < 0 or hi > 65535:
        return False
    return int(np.count_nonzero(np.bincount(array.ravel()))) <= MAX_LABELS + 1


def describe(volume) -> dict:
    """Everything ``difftumor info`` reports, as a JSON-friendly dict."""
    from backend.organs import MSD_LABELS, ORGANS, detect_convention, organs_present
    from backend.preprocess import orientation_code

    g = volume.geometry
    arr = volume.array
    info = {
        "path": str(volume.path) if volume.path else None,
        **g.to_dict(),
        "orientation": orientation_code(g),
        "extent_mm": [round(n * s, 3) for n, s in zip(g.size, g.spacing)],
        "dtype": str(arr.dtype),
    }
    if is_label_map(arr):
        counts = np.bincount(arr.ravel().astype(np.int64))
        convention = detect_convention(np.flatnonzero(counts))
        found = organs_present(volume, convention=convention)
        named_ids = _named_ids(convention)
        info["kind"] = "label map"
        info["convention"] = convention
        entries = {
            name: {"label": named_ids[name], "voxels": n, "volume_ml": round(n * g.voxel_volume_ml, 2)}
            for name, n in found.items()
        }
        # the organs this project synthesizes in (or MSD organ/tumor) first, other named structures apart
        main_names = set(ORGANS) | set(MSD_LABELS.values())
        info["organs"] = {k: v for k, v in entries.items() if k in main_names}
        info["structures"] = {k: v for k, v in entries.items() if k not in main_names}
        info["other_labels"] = [int(i) for i in np.flatnonzero(counts) if i != 0 and int(i) not in named_ids.values()]
    else:
        info["kind"] = "image"
        finite = arr
        if arr.dtype.kind in "fc":  # NaN / inf voxels: counted and named, statistics over the finite ones
            nan = np.isnan(arr)
            inf = np.isinf(arr)
            info["nan_voxels"], info["inf_voxels"] = int(nan.sum()), int(inf.sum())
            if info["nan_voxels"] or info["inf_voxels"]:
                finite = arr[~(nan | inf)]
        info["finite_voxels"] = int(finite.size)
        if finite.size == 0:
            info["min"] = info["max"] = info["mean"] = None
            info["percentiles"] = {}
            return info
        flat = finite.ravel()
        if flat.size > SAMPLE_VOXELS:
            flat = flat[:: int(np.ceil(flat.size / SAMPLE_VOXELS))]
        pct = np.percentile(flat, [1, 5, 50, 95, 99])
        info["min"], info["max"] = _num(finite.min()), _num(finite.max())
        info["mean"] = round(float(finite.mean(dtype=np.float64)), 2)
        info["percentiles"] = {f"p{p}": round(float(v), 2) for p, v in zip((1, 5, 50, 95, 99), pct)}
    return info


def _named_ids(convention: str) -> dict[str, int]:
    from backend.organs import MSD_LABELS, TOTALSEG_NAMES

    table = MSD_LABELS if convention == "msd" else TOTALSEG_NAMES
    return {name: i for i, name in table.items()}


def _num(v):
    return int(v) if np.issubdtype(type(v), np.integer) else round(float(v), 3)


def _vec(values, fmt="{:.6g}") -> str:
    return "(" + ", ".join(fmt.format(v) for v in values) + ")"


def format_text(info: dict) -> str:
    d = np.reshape(info["direction"], (3, 3))
    rows = "; ".join(" ".join(f"{v:.6g}" for v in row) for row in d)
    lines = [
        f"File:        {info['path']}",
        f"Size:        {' x '.join(map(str, info['size']))} voxels (x, y, z)",
        f"Spacing:     {_vec(info['spacing'])} mm",
        f"Origin:      {_vec(info['origin'])} mm (LPS)",
        f"Direction:   [{rows}]  (axes point {info['orientation']})",
        f"Extent:      {_vec(info['extent_mm'])} mm",
        f"Type:        {info['dtype']} ({info['kind']})",
    ]
    if info["kind"] == "image":
        p = info["percentiles"]
        bad = info.get("nan_voxels", 0) + info.get("inf_voxels", 0)
        if bad:
            lines.append(f"Non-finite:  {info['nan_voxels']:,} NaN and {info['inf_voxels']:,} inf voxel(s) of "
                         f"{bad + info['finite_voxels']:,}; the statistics below are over the "
                         f"{info['finite_voxels']:,} finite ones")
        if info["min"] is None:
            lines.append("Range:       no finite voxel")
        else:
            lines.append(f"Range:       min {info['min']}, max {info['max']}, mean {info['mean']}")
            lines.append("Percentiles: " + ", ".join(f"{k} {v:g}" for k, v in p.items()))
    else:
        conv = {"msd": "MSD/LiTS/KiTS (1 organ, 2 tumor)", "totalseg": "TotalSegmentator v2 ids"}[info["convention"]]
        lines.append(f"Labels:      {conv}")
        if info["organs"]:
            lines.append("Organs:")
        if not info["organs"]:
            lines.append("Organs:      none of liver, pancreas, kidneys, spleen")
        for name, o in info["organs"].items():
            lines.append(f"  {name:<20} label {o['label']:>3}: {o['voxels']:>9} voxels, {o['volume_ml']:>9.1f} mL")
        if info["structures"]:
            names = [f"{k} ({v['label']})" for k, v in info["structures"].items()]
            lines.append(f"Also:        {', '.join(names)}")
        if info["other_labels"]:
            lines.append(f"Other ids:   {', '.join(map(str, info['other_labels']))}")
    return "\n".join(lines)


def handler(args: argparse.Namespace) -> int:
    from backend.errors import DiffTumorError
    from backend.io import os_error_message, read_image

    try:
        info = describe(read_image(args.path))
    except OSError as exc:  # one line naming the path, not a traceback
        raise DiffTumorError(os_error_message(exc, args.path)) from None
    print(json.dumps(info, indent=2) if args.json else format_text(info))
    return 0
