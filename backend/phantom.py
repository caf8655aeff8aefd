"""A procedural abdominal CT phantom (portal-venous phase) with TotalSegmentator-style labels.

:func:`make_phantom` paints analytic shapes in world millimetres onto an LPS grid with identity
direction (index x -> patient's left, y -> posterior, z -> superior), so the (z, y, x) array shows
axial slices radiologically (anterior at the top, the patient's left on the screen's right).
Everything random (body outline, organ positions/sizes, bowel loops, texture, noise) comes from
``numpy.random.default_rng(seed)``: the same seed gives bit-identical volumes.

Layers, painted in order (later ones win): air, skin, subcutaneous fat, abdominal wall muscle,
visceral fat, bowel (small bowel with fluid/gas, colon with stool/gas), paraspinal and psoas
muscles, organs (liver with portal/hepatic vessels, gallbladder, stomach with an air-fluid level,
spleen, kidneys with cortex/medulla/sinus fat, pancreas), vessels (aorta, IVC, portal vein), spine
(vertebral bodies with cortex and discs, posterior elements, spinal canal), ribs. The HU image is
then blurred slightly (partial volume) and CT-like correlated noise is added.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
from scipy import ndimage

from backend.io import Geometry, Volume, write_image
from backend.organs import TOTALSEG_NAMES

#: Label ids (TotalSegmentator v2 "total" task) used by the phantom.
PHANTOM_LABELS: dict[int, str] = {
    i: TOTALSEG_NAMES[i]
    for i in (1, 2, 3, 4, 5, 6, 7, 18, 20, 28, 29, 30, 31, 32, 33, 52, 63, 64, 79, 86, 87, 88, 89, *range(98, 104), *range(110, 116))
}
_ID = {name: i for i, name in PHANTOM_LABELS.items()}

DEFAULT_SHAPE = (64, 192, 192)  # (z, y, x)
DEFAULT_SPACING = (1.75, 1.75, 2.5)  # (x, y, z) mm: 336 x 336 x 160 mm field of view


class _Canvas:
    """HU image + label map being painted, with world coordinates (mm, LPS, centred on 0)."""

    def __init__(self, shape, spacing, rng: np.random.Generator):
        nz, ny, nx = shape
        sx, sy, sz = spacing
        self.shape = shape
        self.spacing = spacing
        self.rng = rng
        # broadcastable world coordinates: X (1, 1, nx), Y (1, ny, 1), Z (nz, 1, 1)
        self.X = ((np.arange(nx, dtype=np.float32) - (nx - 1) / 2) * sx)[None, None, :]
        self.Y = ((np.arange(ny, dtype=np.float32) - (ny - 1) / 2) * sy)[None, :, None]
        self.Z = ((np.arange(nz, dtype=np.float32) - (nz - 1) / 2) * sz)[:, None, None]
        self.hu = np.full(shape, -1000.0, np.float32)
        self.labels = np.zeros(shape, np.uint8)

    def paint(self, mask, hu, label: int | None = None, *, keep_labels: bool = False):
        mask = np.broadcast_to(mask, self.shape)
        if np.ndim(hu):
            self.hu[mask] = np.broadcast_to(hu, self.shape)[mask]
        else:
            self.hu[mask] = hu
        if label is not None:
            self.labels[mask] = label
        elif not keep_labels:
            self.labels[mask] = 0

    def smooth_field(self, cells_mm: float = 40.0, *, planar: bool = False) -> np.ndarray:
        """Smooth random field in [-1, 1] with structure size ~``cells_mm`` (irregular shapes, texture).

        Random values on a coarse lattice, linearly interpolated by one small matrix product per
        axis (much cheaper than ``ndimage.zoom`` on the full grid). ``planar``: one (1, y, x) field.
        """
        shape = (1, *self.shape[1:]) if planar else self.shape
        coarse = [max(2, int(round(n * s / cells_mm)) + 1) for n, s in zip(shape, self.spacing[::-1])]
        out = self.rng.uniform(-1, 1, size=coarse).astype(np.float32)
        for axis in (2, 1, 0):  # x first: the array grows the least before the big axes
            n, k = shape[axis], coarse[axis]
            pos = np.linspace(0, k - 1, n)
            lo = np.minimum(np.floor(pos).astype(int), k - 2)
            w = (pos - lo).astype(np.float32)
            m = np.zeros((n, k), np.float32)
            m[np.arange(n), lo] = 1 - w
            m[np.arange(n), lo + 1] = w
            out = np.moveaxis(np.tensordot(m, out, axes=([1], [axis])), 0, axis)
        return np.ascontiguousarray(out)

    def box(self, lo, hi):
        """Index slices (z, y, x) of the world box [lo, hi] (mm, x/y/z order), clipped to the grid."""
        sl = []
        for axis, coord in ((2, self.Z), (1, self.Y), (0, self.X)):
            n, s = self.shape[2 - axis], self.spacing[axis]
            first = float(coord.ravel()[0])
            i0 = int(np.floor((lo[axis] - first) / s)) - 1
            i1 = int(np.ceil((hi[axis] - first) / s)) + 2
            sl.append(slice(min(max(i0, 0), n), min(max(i1, 0), n)))
        return tuple(sl)

    def coords(self, sl):
        return self.X[..., sl[2]], self.Y[:, sl[1], :], self.Z[sl[0]]

    def jitter(self, scale: float) -> float:
        return float(self.rng.uniform(-scale, scale))


def _ellipsoid(c: _Canvas, center, radii, *, yaw_deg: float = 0.0, pitch_deg: float = 0.0, field=None, amp=0.0):
    """Boolean ellipsoid; yaw rotates in the axial plane, pitch tilts the long (z) axis toward x.

    Evaluated only inside its bounding box (``amp`` enlarges the box for the irregular surface).
    """
    out = np.zeros(c.shape, bool)
    grow = np.sqrt(1.0 + amp)  # q + amp * field <= 1 reaches at most sqrt(1 + amp) radii out
    reach = [max(radii) * grow] * 3 if (yaw_deg or pitch_deg) else [r * grow for r in radii]
    lo = [center[i] - reach[i] for i in range(3)]
    hi = [center[i] + reach[i] for i in range(3)]
    sl = c.box(lo, hi)
    X, Y, Z = c.coords(sl)
    dx, dy, dz = X - center[0], Y - center[1], Z - center[2]
    if yaw_deg or pitch_deg:
        a, b = np.deg2rad(yaw_deg), np.deg2rad(pitch_deg)
        u = np.cos(a) * dx + np.sin(a) * dy
        v = -np.sin(a) * dx + np.cos(a) * dy
        u, w = np.cos(b) * u - np.sin(b) * dz, np.sin(b) * u + np.cos(b) * dz
        dx, dy, dz = u, v, w
    q = (dx / radii[0]) ** 2 + (dy / radii[1]) ** 2 + (dz / radii[2]) ** 2
    if field is not None:
        q = q + amp * field[sl]
    out[sl] = q <= 1.0
    return out


def _tube(c: _Canvas, points, radii, z_limits=None):
    """Boolean tube of varying radius around a polyline of world points (mm), evaluated per segment box."""
    out = np.zeros(c.shape, bool)
    pts = np.asarray(points, np.float32)
    rad = np.broadcast_to(np.asarray(radii, np.float32), (len(pts),))
    for (p0, p1), (r0, r1) in zip(zip(pts[:-1], pts[1:]), zip(rad[:-1], rad[1:])):
        r = max(r0, r1)
        sl = c.box(np.minimum(p0, p1) - r, np.maximum(p0, p1) + r)
        X, Y, Z = c.coords(sl)
        seg = p1 - p0
        length2 = float(seg @ seg)
        t = ((X - p0[0]) * seg[0] + (Y - p0[1]) * seg[1] + (Z - p0[2]) * seg[2]) / length2
        t = np.clip(t, 0.0, 1.0)
        d2 = (X - p0[0] - t * seg[0]) ** 2 + (Y - p0[1] - t * seg[1]) ** 2 + (Z - p0[2] - t * seg[2]) ** 2
        out[sl] |= d2 <= (r0 + t * (r1 - r0)) ** 2
    if z_limits is not None:
        out &= (c.Z >= z_limits[0]) & (c.Z <= z_limits[1])
    return out


def _body(c: _Canvas):
    """Body outline and its inner shells (the same in every slice, computed in 2D and broadcast).

    Returns (``inside(depth)`` function, subcutaneous fat thickness, visceral cavity mask).
    """
    rng = c.rng
    a = 148.0 + c.jitter(8)  # half width (left-right), mm
    b_ant, b_post = 100.0 + c.jitter(6), 88.0 + c.jitter(4)
    phases = rng.uniform(0, 2 * np.pi, 2)
    b = np.where(c.Y < 0, b_ant, b_post).astype(np.float32)
    theta = np.arctan2(c.Y / b, c.X / a)
    wobble = 1 + 0.025 * np.sin(3 * theta + phases[0]) + 0.015 * np.sin(5 * theta + phases[1])
    back_flat = np.where(c.Y > 0, 1 - 0.12 * np.cos(theta) ** 8, 1.0)  # flatter back than a true ellipse

    def inside(depth_mm):
        """Inside the body shrunk by ``depth_mm`` (scalar or per-angle array)."""
        aa, bb = (a * wobble - depth_mm), (b * wobble * back_flat - depth_mm)
        return (c.X / aa) ** 2 + (c.Y / bb) ** 2 <= 1.0

    fat = 14 + 8 * np.cos(theta) ** 2 - 4 * np.sin(theta) + 2 * c.smooth_field(60, planar=True)  # flanks thickest, back thinnest
    muscle = 11 + 3 * np.cos(theta) ** 2
    c.paint(inside(0.0), 30.0)  # skin
    c.paint(inside(2.5), -105.0)  # subcutaneous fat
    c.paint(inside(fat), 52.0)  # abdominal wall muscle
    cavity = inside(fat + muscle)
    c.paint(cavity, -92.0)  # visceral (mesenteric/retroperitoneal) fat
    return inside, fat, cavity


def _bowel(c: _Canvas, cavity):
    rng = c.rng
    texture = c.smooth_field(12)
    # colon: ascending (patient's right), descending (left), transverse (anterior, upper)
    colon = _tube(c, [(-98, 10, -80), (-102, 5, 0), (-90, -20, 25)], 22)
    colon |= _tube(c, [(-90, -20, 25), (-30, -55, 35), (40, -50, 40), (95, -10, 45)], 19)
    colon |= _tube(c, [(95, -10, 45), (100, 15, 0), (98, 10, -80)], 20)
    colon &= cavity
    colon_wall = colon & ~ndimage.binary_erosion(colon, iterations=2)
    gas = colon & (c.Y < -5 + 25 * texture) & (texture > -0.2)
    stool = -120 + 150 * texture
    c.paint(colon, stool, _ID["colon"])
    c.paint(colon & gas, -1000.0, _ID["colon"])
    c.paint(colon_wall, 40.0, _ID["colon"])
    # small bowel: random short loops in the anterior / inferior cavity
    loops = np.zeros(c.shape, bool)
    gas_loops = np.zeros(c.shape, bool)
    for _ in range(64):
        p0 = np.array([rng.uniform(-80, 80), rng.uniform(-85, 15), rng.uniform(-90, 25)])
        p1 = p0 + rng.normal(0, 30, 3) * np.array([1.0, 0.6, 1.0])
        p2 = p1 + rng.normal(0, 25, 3) * np.array([1.0, 0.6, 1.0])
        seg = _tube(c, [p0, p1, p2], rng.uniform(9, 14))
        loops |= seg
        if rng.uniform() < 0.25:
            gas_loops |= seg & (c.Y < p0[1] - 2)
    loops &= cavity & ~colon
    wall = loops & ~ndimage.binary_erosion(loops, iterations=2)
    c.paint(loops, 18 + 10 * texture, _ID["small_bowel"])
    c.paint(loops & gas_loops, -950.0, _ID["small_bowel"])
    c.paint(wall, 45.0, _ID["small_bowel"])
    # mesenteric vessels: thin bright branches in the fat between the loops
    for _ in range(14):
        p0 = np.array([rng.uniform(-15, 15), rng.uniform(-30, -10), rng.uniform(-90, 0)])
        p1 = p0 + rng.normal(0, 1, 3) * np.array([45, 25, 30])
        vessel = _tube(c, [p0, p1], rng.uniform(1.8, 3.0)) & cavity & (c.labels == 0)
        c.paint(vessel, 150.0, None)


def _muscles(c: _Canvas, spine_y: float, wall):
    for side, name in ((1, "left"), (-1, "right")):
        erector = _ellipsoid(c, (side * 33, spine_y + 42, 0), (24, 19, 1e4)) & wall
        c.paint(erector, 55.0, _ID[f"autochthon_{name}"])
        psoas_r = np.clip(6 + (30 - c.Z) * 0.12, 0, 22)  # psoas grows toward the pelvis
        psoas = (c.X - side * (30 + 0.1 * (30 - c.Z))) ** 2 + (c.Y - spine_y - 2) ** 2 <= psoas_r**2
        c.paint(psoas & (c.Z < 40), 50.0, _ID[f"iliopsoas_{name}"])


def _organs(c: _Canvas, cavity, spine_y: float):
    j = c.jitter
    texture = 4 * c.smooth_field(12)
    # liver: right lobe + left lobe across the midline, irregular surface
    lobed = c.smooth_field(50)
    liver = _ellipsoid(c, (-62 + j(5), -8 + j(5), 50 + j(5)), (82, 78, 76), yaw_deg=-15, field=lobed, amp=0.25)
    liver |= _ellipsoid(c, (-8 + j(4), -50, 52 + j(4)), (48, 28, 38), yaw_deg=15, field=lobed, amp=0.25)
    liver &= cavity & ~_ellipsoid(c, (0, spine_y + 5, 0), (40, 40, 1e4))
    c.paint(liver, 106.0 + texture, _ID["liver"])
    # intrahepatic portal / hepatic veins: brighter branches from the hilum
    hilum = np.array([-28.0, -5.0, 22.0])
    vessels = np.zeros(c.shape, bool)
    for _ in range(9):
        end = hilum + c.rng.normal(0, 1, 3) * np.array([50, 35, 35]) + np.array([-35, -5, 20])
        mid = (hilum + end) / 2 + c.rng.normal(0, 8, 3)
        vessels |= _tube(c, [hilum, mid, end], [6.0, 4.0, 2.5])
    c.paint(vessels & liver, 165.0 + texture, _ID["liver"])
    # gallbladder at the inferior surface of the liver
    gb = _ellipsoid(c, (-48 + j(4), -50 + j(4), -5 + j(5)), (16, 15, 30), pitch_deg=-20)
    c.paint(gb & cavity, 8.0 + 0.5 * texture, _ID["gallbladder"])
    # stomach (left upper quadrant) with wall, fluid and an anterior air-fluid level
    st = _ellipsoid(c, (45 + j(5), -38 + j(5), 52 + j(5)), (42, 32, 42), yaw_deg=30) & cavity & ~liver
    c.paint(st, 15.0 + texture, _ID["stomach"])
    c.paint(st & (c.Y < -38 + j(5) - 12), -1000.0, _ID["stomach"])
    c.paint(st & ~ndimage.binary_erosion(st, iterations=2), 55.0, _ID["stomach"])
    # spleen: posterolateral on the patient's left, crescent-shaped
    spleen = _ellipsoid(c, (85 + j(4), 45 + j(4), 45 + j(5)), (34, 60, 56), yaw_deg=-45, field=lobed, amp=0.2)
    spleen &= ~_ellipsoid(c, (55, 28, 45), (14, 28, 44), yaw_deg=-45) & cavity & ~st
    c.paint(spleen, 112.0 + texture, _ID["spleen"])
    # kidneys: right lower than left (liver above it); cortex, medulla, sinus fat at the hilum
    for side, name, zc in ((-1, "right", -22 + j(5)), (1, "left", -8 + j(5))):
        center = (side * (62 + j(3)), spine_y + 20 + j(3), zc)
        yaw = side * 35.0
        kid = _ellipsoid(c, center, (27, 36, 56), yaw_deg=yaw, pitch_deg=side * 10) & cavity
        medulla = _ellipsoid(c, center, (17, 25, 44), yaw_deg=yaw, pitch_deg=side * 10)
        hilum_pt = (center[0] - side * 18, center[1] - 8, zc)
        sinus = _ellipsoid(c, hilum_pt, (12, 11, 20), yaw_deg=yaw)
        c.paint(kid, 175.0 + texture, _ID[f"kidney_{name}"])
        c.paint(kid & medulla, 135.0 + texture, _ID[f"kidney_{name}"])
        c.paint(kid & sinus, -60.0, None)
    # pancreas: head near the duodenum (right), body across the aorta, tail to the splenic hilum
    wav = texture / 4
    pts = [(-38 + j(3), -18, -14), (-8, -28 + j(3), -4), (30, -18, 6), (62 + j(3), 12, 18)]
    panc = _tube(c, pts, [19.0, 13.0, 12.0, 11.0]) & (wav > -0.7) & cavity & ~liver & ~st
    c.paint(panc, 100.0 + 2 * texture + 8 * wav, _ID["pancreas"])
    return liver


def _vessels(c: _Canvas, spine_y: float, liver):
    c.paint(_tube(c, [(12, spine_y - 32, -100), (10, spine_y - 30, 100)], 11.5), 170.0, _ID["aorta"])
    c.paint(_tube(c, [(-24, spine_y - 30, -100), (-26, spine_y - 32, 100)], [11.0, 12.0]), 125.0, _ID["inferior_vena_cava"])
    portal = _tube(c, [(-8, -12, -60), (-10, -15, -10), (-28, -5, 22)], [7.0, 8.0, 7.0])
    splenic = _tube(c, [(-10, -15, -10), (30, -8, 0), (62, 22, 14)], 4.5)
    c.paint((portal | splenic) & ~liver, 160.0, _ID["portal_vein_and_splenic_vein"])


def _spine(c: _Canvas, spine_y: float):
    period, disc = 36.0, 8.0
    vertebrae = ("vertebrae_T11", "vertebrae_T12", "vertebrae_L1", "vertebrae_L2", "vertebrae_L3", "vertebrae_L4")
    top = 70.0
    level = np.floor((top + period / 2 - c.Z) / period).astype(int)  # 0 = T11
    zc = top - level * period
    in_body_z = np.abs(c.Z - zc) <= (period - disc) / 2
    body = ((c.X / 22) ** 2 + ((c.Y - spine_y) / 17) ** 2 <= 1) & np.ones(c.shape, bool)
    inner = (c.X / 19.5) ** 2 + ((c.Y - spine_y) / 14.5) ** 2 <= 1
    canal = c.X**2 + (c.Y - spine_y - 27) ** 2 <= 9.5**2
    arch = (c.X**2 + (c.Y - spine_y - 27) ** 2 <= 17**2) & ~canal & (c.Y > spine_y + 12)
    spinous = (np.abs(c.X) <= 4) & (c.Y > spine_y + 35) & (c.Y < spine_y + 55)
    transverse = (np.abs(c.X) <= 38) & (np.abs(c.Y - spine_y - 24) <= 4) & (np.abs(c.Z - zc + 3) <= 5)
    posterior = (arch | spinous | transverse) & (np.abs(c.Z - zc + 3) <= 13)
    for i, name in enumerate(vertebrae):
        sel = level == i
        c.paint(body & in_body_z & sel, 650.0, _ID[name])
        c.paint(inner & in_body_z & sel, 230.0, _ID[name])
        c.paint(posterior & sel, 520.0, _ID[name])
    c.paint(body & ~in_body_z, 85.0, None)  # intervertebral discs
    c.paint(canal, 22.0, _ID["spinal_cord"])


def _ribs(c: _Canvas, inside, fat):
    """Lower ribs 7-12 as tubes following the body wall, descending anteriorly (arc segments in axial)."""
    a_n, b_n = 148.0, 94.0
    phi = np.arctan2(np.abs(c.X) / a_n, c.Y / b_n)  # 0 posterior midline, pi/2 lateral, pi anterior
    ring_out = inside(fat + 2.0)
    ring_in = inside(fat + 11.0)
    shell = ring_out & ~ring_in
    for k in range(7, 13):
        z0 = 70.0 + (11 - k) * 36.0  # the rib starts at the level of its vertebra
        end = {7: 2.7, 8: 2.6, 9: 2.45, 10: 2.3, 11: 1.9, 12: 1.45}[k]
        zk = z0 - 48.0 * (phi - 0.55)
        rib = shell & (np.abs(c.Z - zk) <= 5.5) & (phi >= 0.55) & (phi <= end)
        marrow = rib & (np.abs(c.Z - zk) <= 2.5)
        for side, name in ((1, "left"), (-1, "right")):
            s = rib & (np.sign(c.X) == side)
            lid = _ID[f"rib_{name}_{k}"]
            c.paint(s, 700.0, lid)
            c.paint(s & marrow, 280.0, lid)


def make_phantom(
    seed: int = 0,
    *,
    shape: tuple[int, int, int] = DEFAULT_SHAPE,
    spacing: tuple[float, float, float] = DEFAULT_SPACING,
    noise_hu: float = 12.0,
) -> tuple[Volume, Volume]:
    """Procedural abdominal CT: ``(ct, labels)`` Volumes on one LPS grid (identity direction).

    ``shape`` is (z, y, x); ``spacing`` is (x, y, z) mm. The anatomy is fixed in millimetres
    (about 300 x 190 mm body, upper abdomen from T11 to L3/L4), so a coarser grid shows the same
    anatomy. ``ct`` is int16 HU (portal-venous phase, noise std ``noise_hu``); ``labels`` is uint8
    with the TotalSegmentator ids of :data:`PHANTOM_LABELS`.
    """
    rng = np.random.default_rng(seed)
    c = _Canvas(tuple(int(s) for s in shape), tuple(float(s) for s in spacing), rng)
    spine_y = 22.0 + c.jitter(2)  # vertebral body centre, posterior of the body centre

    inside, fat, cavity = _body(c)
    _bowel(c, cavity)
    _muscles(c, spine_y, inside(fat))
    liver = _organs(c, cavity, spine_y)
    _vessels(c, spine_y, liver)
    _spine(c, spine_y)
    _ribs(c, inside, fat)

    # partial-volume blur (in-plane ~ 1 mm, along z less), then correlated CT-like noise
    sig = [0.35 * 2.5 / c.spacing[2], 0.8 * 1.75 / c.spacing[1], 0.8 * 1.75 / c.spacing[0]]
    hu = ndimage.gaussian_filter(c.hu, sig, mode="nearest")
    if noise_hu > 0:
        noise = rng.standard_normal(c.shape, dtype=np.float32)
        noise = ndimage.gaussian_filter(noise, [0.4, 1.0, 1.0], mode="wrap")
        hu += noise * (noise_hu / float(noise.std()))
    ct = np.clip(np.rint(hu), -1024, 3071).astype(np.int16)

    size = c.shape[::-1]
    origin = tuple(-(n - 1) / 2 * s for n, s in zip(size, c.spacing))
    geometry = Geometry(size, c.spacing, origin)
    return Volume(ct, geometry), Volume(c.labels, geometry)


def save_phantom(folder, seed: int = 0, **kwargs) -> tuple[Path, Path]:
    """Write ``phantom_ct.nii.gz`` and ``phantom_organs.nii.gz`` into ``folder``; return both paths."""
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    ct, labels = make_phantom(seed, **kwargs)
    return write_image(ct, folder / "phantom_ct.nii.gz"), write_image(labels, folder / "phantom_organs.nii.gz")
