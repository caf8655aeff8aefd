"""A small labelled dataset made from ONE CT + organ labels, for smoke runs and the e2e benchmark.

Variants of the CT (cropped around the organ with different margins, mirrored left-right or
front-back, shifted in intensity) are written as separate cases. Healthy cases keep their organ
label (values 0/1); "real-tumour" cases get a tumour from the synthesis engine's model-based
method (labels 0/1/2). The real-tumour cases are held out by the k-fold split like real data.
Nothing here is a substitute for real data: it only exercises the whole pipeline end to end.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np

from backend.io import Geometry, Volume, read_image, write_image


def _crop(vol: Volume, organ: np.ndarray, margin_vox: tuple[int, int, int], box_mm: float | None, rng):
    idx = np.argwhere(organ)
    if box_mm is None:  # the organ's bounding box + margin
        lo = np.maximum(idx.min(0) - margin_vox, 0)
        hi = np.minimum(idx.max(0) + 1 + np.asarray(margin_vox), organ.shape)
    else:  # a box of box_mm around a random organ voxel (the organ may be cut)
        half = np.ceil(box_mm / 2.0 / np.asarray(vol.spacing[::-1])).astype(int)
        c = idx[rng.integers(len(idx))]
        lo = np.clip(c - half, 0, None)
        hi = np.minimum(lo + 2 * half, organ.shape)
        lo = np.maximum(hi - 2 * half, 0)
    sl = tuple(slice(int(a), int(b)) for a, b in zip(lo, hi))
    g = vol.geometry
    start_xyz = np.array([sl[2].start, sl[1].start, sl[0].start], float)
    size = (sl[2].stop - sl[2].start, sl[1].stop - sl[1].start, sl[0].stop - sl[0].start)
    geo = Geometry(size, g.spacing, tuple(g.voxel_to_world(start_xyz)), g.direction)
    return sl, geo


def make_toy_dataset(ct_path, organ_labels_path, out_dir, *, organ: str = "liver", n_healthy: int = 4,
                     n_tumor: int = 5, seed: int = 0, box_mm: float | None = None) -> dict:
    """Write images and the list files ``healthy.txt`` / ``real.txt`` (``image,label`` per line);
    returns their paths. ``box_mm`` crops boxes of that size around the organ (smaller, faster cases)."""
    from backend.organs import load_organ_mask
    from backend.synthesis.engine import SynthesisEngine

    out = Path(out_dir)
    (out / "images").mkdir(parents=True, exist_ok=True)
    ct = read_image(ct_path)
    organ_mask = np.asarray(load_organ_mask(organ_labels_path, organ), dtype=bool)
    rng = np.random.default_rng(seed)
    engine = SynthesisEngine(weights_dir=None, device="cpu")
    lists = {"healthy": [], "real": []}
    for i in range(n_healthy + n_tumor):
        kind = "healthy" if i < n_healthy else "real"
        margin = tuple(int(m) for m in rng.integers(4, 9, size=3))
        margin = (min(margin[0], 2), margin[1], margin[2])  # (z, y, x); the scan is short in z
        sl, geo = _crop(ct, organ_mask, margin, box_mm, rng)
        img = ct.array[sl].copy()
        org = organ_mask[sl].copy()
        if i % 3 == 1:  # mirror front-back
            img, org = img[:, ::-1].copy(), org[:, ::-1].copy()
        if i % 3 == 2:  # mirror left-right
            img, org = img[:, :, ::-1].copy(), org[:, :, ::-1].copy()
        img = (img.astype(np.int32) + int(rng.integers(-15, 16))).astype(ct.array.dtype)
        vol = Volume(img, geo)
        name = f"{kind}_{i:03d}"
        if kind == "healthy":
            label = org.astype(np.uint8)
        else:
            res = engine.synthesize(vol, org, organ=organ, method="model-based", seed=seed * 1000 + i,
                                    size=("small", "medium")[i % 2])
            vol, label = res.ct, res.label.astype(np.uint8)
        write_image(vol, out / "images" / f"{name}.nii.gz")
        write_image(label, out / "images" / f"{name}_label.nii.gz", geo)
        lists[kind].append(f"images/{name}.nii.gz,images/{name}_label.nii.gz")
    for kind, lines in lists.items():
        (out / f"{kind}.txt").write_text("\n".join(lines) + "\n", encoding="utf-8")
    return {k: str(out / f"{k}.txt") for k in lists}
