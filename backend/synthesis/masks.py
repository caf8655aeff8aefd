"""Tumour masks: the release's random generator, a user-placed ellipsoid, and user-drawn masks.

Three ways to get a tumour mask:

* :func:`generate_tumor_mask` — the DiffTumor release's generator (official_pipeline.md §4),
  re-written with numpy/scipy: size class -> integer semi-axes, an ellipsoid in a (4a, 4b, 4c) box,
  three successive random-grid elastic deformations (axis pairs (0,1), (1,2), (0,2), 3x3 control
  grid, the size class's sigma, nearest-neighbour resampling), a centre sampled slice-wise inside
  the organ (liver slices eroded by a 5x5 square), clipping to the organ (kidney medium/large: 50 %
  unclipped). It works in **model space**: 1 mm isotropic, RAS+ voxel axes, array layout (X, Y, Z).
* :func:`ellipsoid_mask` — a user-placed ellipsoid built directly on the CT's own grid (any spacing
  and direction), centre in world (LPS mm, as SimpleITK) or voxel coordinates, three radii in mm, a
  rotation (Euler angles in degrees) and an irregularity in [0, 1] (smooth random displacement).
* :func:`validate_tumor_mask` — checks a user-drawn mask (shape, values, non-empty, inside the organ).

Everything is reproducible from a ``numpy.random.Generator`` (or an integer seed).
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import asdict, dataclass

import numpy as np
from scipy import ndimage

from backend.errors import DiffTumorError


@dataclass(frozen=True)
class SizeClass:
    """One size class of the release's generator (official_pipeline.md §4), in mm at 1 mm spacing."""

    name: str
    radius: int  # base radius r
    semi_axes: tuple[int, int]  # inclusive integer range of each semi-axis
    count: tuple[int, int]  # inclusive range of the number of tumours per draw
    sigma: tuple[float, float]  # elastic sigma range (voxels = mm)
    sigma_integer: bool  # the release draws an integer sigma for small/medium/large

    @property
    def diameter_mm(self) -> tuple[int, int]:
        """Range of ellipsoid diameters (2 x semi-axis) before deformation."""
        return 2 * self.semi_axes[0], 2 * self.semi_axes[1]

    @property
    def stage(self) -> str:
        """Diffusion stage the release uses for this class: tiny/small -> early, else mid/late."""
        return "early" if self.name in ("tiny", "small") else "mid_late"


def _axes(r: int, hi: float = 1.25) -> tuple[int, int]:
    return int(0.75 * r), int(hi * r)


SIZE_CLASSES: dict[str, SizeClass] = {
    "tiny": SizeClass("tiny", 4, _axes(4), (1, 3), (0.5, 1.0), False),
    "small": SizeClass("small", 8, _axes(8), (1, 3), (1, 2), True),
    "medium": SizeClass("medium", 16, _axes(16), (1, 1), (3, 6), True),
    "large": SizeClass("large", 32, _axes(32, 2.0), (1, 1), (5, 10), True),
}
"""Size classes by name (tiny 6–10 mm, small 12–20 mm, medium 24–40 mm, large 48–128 mm diameter)."""

ORGANS_WITH_RANDOM_CENTRE = ("liver", "kidney", "kidney_left", "kidney_right")


@dataclass
class TumorParams:
    """What the generator drew for one tumour (for provenance)."""

    size: str
    semi_axes: tuple[int, int, int]
    sigma: float
    centre: tuple[int, int, int]  # model-space voxel (X, Y, Z)
    clipped_to_organ: bool
    voxels: int = 0  # its voxels in the returned mask (1 mm grid), after clipping to the organ
    centre_world_mm: tuple[float, float, float] | None = None  # filled in by the engine (LPS mm)
    centre_voxel_xyz: tuple[int, int, int] | None = None  # filled in by the engine: index on the CT's grid

    def to_dict(self) -> dict:
        """For provenance: ``centre`` (a voxel of the generator's 1 mm model grid) is named
        ``centre_model_voxel_xyz`` so that it is not mistaken for an index into the CT."""
        d = asdict(self)
        d["centre_model_voxel_xyz"] = d.pop("centre")
        return d


def as_rng(seed_or_rng) -> np.random.Generator:
    if isinstance(seed_or_rng, np.random.Generator):
        return seed_or_rng
    return np.random.default_rng(seed_or_rng)


def sample_size_class(rng: np.random.Generator) -> str:
    """The release's training mix: early 0.8 (tiny/small 0.5/0.5), medium 0.1, large 0.1."""
    u = rng.random()
    if u < 0.8:
        return "tiny" if rng.random() < 0.5 else "small"
    return "medium" if u < 0.9 else "large"


# --------------------------------------------------------------------------------------------
# shape
# --------------------------------------------------------------------------------------------
def ellipsoid_box(semi_axes: Sequence[int]) -> np.ndarray:
    """Binary (4a, 4b, 4c) array holding the ellipsoid with semi-axes (a, b, c) centred at (2a, 2b, 2c)."""
    a, b, c = (int(v) for v in semi_axes)
    i, j, k = np.ogrid[: 4 * a, : 4 * b, : 4 * c]
    return ((i - 2 * a) / a) ** 2 + ((j - 2 * b) / b) ** 2 + ((k - 2 * c) / c) ** 2 <= 1.0


def _grid_displacement(shape2d: tuple[int, int], sigma: float, rng: np.random.Generator, points: int = 3) -> np.ndarray:
    """Dense (2, n0, n1) displacement from a ``points x points`` random control grid (cubic spline)."""
    coarse = rng.standard_normal((2, points, points)) * sigma
    n0, n1 = shape2d
    u = np.linspace(0, points - 1, n0)[:, None] * np.ones((1, n1))
    v = np.linspace(0, points - 1, n1)[None, :] * np.ones((n0, 1))
    return np.stack([ndimage.map_coordinates(c, [u, v], order=3, mode="nearest") for c in coarse])


def elastic_deform(mask: np.ndarray, sigma: float, rng: np.random.Generator, axes: tuple[int, int]) -> np.ndarray:
    """Random-grid elastic deformation of ``mask`` in the plane ``axes``, nearest-neighbour, zero outside.

    Like ``elasticdeform.deform_random_grid(points=3, order=0, axis=axes)``: a 3x3 grid of Gaussian
    displacements (std ``sigma`` voxels) is interpolated to every in-plane position and the same 2D
    warp is applied to every slice along the remaining axis.
    """
    a0, a1 = axes
    moved = np.moveaxis(mask, (a0, a1), (0, 1))  # (n0, n1, rest)
    n0, n1 = moved.shape[:2]
    disp = _grid_displacement((n0, n1), sigma, rng)
    i, j = np.meshgrid(np.arange(n0), np.arange(n1), indexing="ij")
    si = np.floor(i + disp[0] + 0.5).astype(np.int64)
    sj = np.floor(j + disp[1] + 0.5).astype(np.int64)
    inside = (si >= 0) & (si < n0) & (sj >= 0) & (sj < n1)
    out = np.zeros_like(moved)
    out[inside] = moved[si[inside], sj[inside]]
    return np.moveaxis(out, (0, 1), (a0, a1))


def deformed_ellipsoid(semi_axes: Sequence[int], sigma: float, rng: np.random.Generator) -> np.ndarray:
    """The release's tumour shape: ellipsoid box + elastic deformations on axis pairs (0,1), (1,2), (0,2)."""
    shape = ellipsoid_box(semi_axes)
    for axes in ((0, 1), (1, 2), (0, 2)):
        shape = elastic_deform(shape, sigma, rng, axes)
    return shape


def paste_centered(canvas: np.ndarray, shape: np.ndarray, centre: Sequence[int]) -> None:
    """OR ``shape`` into ``canvas`` with its box centred on ``centre`` (clipped at the borders)."""
    dst, src = [], []
    for c, n, N in zip(centre, shape.shape, canvas.shape):
        start = int(c) - n // 2
        lo, hi = max(start, 0), min(start + n, N)
        if hi <= lo:
            return
        dst.append(slice(lo, hi))
        src.append(slice(lo - start, hi - start))
    canvas[tuple(dst)] |= shape[tuple(src)]


# --------------------------------------------------------------------------------------------
# location
# --------------------------------------------------------------------------------------------
def _z_range_draw(try_index: int, rng: np.random.Generator) -> float:
    if try_index < 11:
        return rng.uniform(0.3, 0.7)
    if try_index < 21:
        return rng.uniform(0.2, 0.8)
    if try_index < 31:
        return rng.uniform(0.1, 0.9)
    return rng.uniform(0.0, 1.0)


def random_centre(organ: np.ndarray, rng: np.random.Generator, *, erode: bool, max_tries: int = 200) -> tuple[int, int, int]:
    """The release's ``random_select``: a slice along Z (middle first), then a random organ voxel in it."""
    zs = np.flatnonzero(organ.any(axis=(0, 1)))
    z0, z1 = int(zs[0]), int(zs[-1])
    square = np.ones((5, 5), dtype=bool)
    for t in range(max_tries):
        z = z0 + int(round(_z_range_draw(t, rng) * (z1 - z0)))
        sl = organ[:, :, z]
        if erode:
            sl = ndimage.binary_erosion(sl, structure=square)
        xy = np.argwhere(sl)
        if len(xy):
            x, y = xy[rng.integers(len(xy))]
            return int(x), int(y), z
    # an organ too thin for the eroded slice search: fall back to any organ voxel
    pts = np.argwhere(organ)
    x, y, z = pts[rng.integers(len(pts))]
    return int(x), int(y), int(z)


def bbox_centre(mask: np.ndarray) -> tuple[int, ...]:
    idx = [np.flatnonzero(mask.any(axis=tuple(a for a in range(mask.ndim) if a != d))) for d in range(mask.ndim)]
    return tuple(int((i[0] + i[-1]) // 2) for i in idx)


# --------------------------------------------------------------------------------------------
# the release's generator
# --------------------------------------------------------------------------------------------
def draw_semi_axes(size: str, rng: np.random.Generator) -> tuple[int, int, int]:
    lo, hi = SIZE_CLASSES[size].semi_axes
    return tuple(int(v) for v in rng.integers(lo, hi + 1, size=3))


def draw_sigma(size: str, rng: np.random.Generator) -> float:
    sc = SIZE_CLASSES[size]
    if sc.sigma_integer:
        return float(rng.integers(int(sc.sigma[0]), int(sc.sigma[1]) + 1))
    return float(rng.uniform(*sc.sigma))


def check_organ_fits(organ: np.ndarray, size: str, *, name: str = "organ mask") -> None:
    """Refuse an absent organ, or one whose volume is smaller than the smallest tumour of ``size``."""
    n = int(organ.sum())
    if n == 0:
        raise DiffTumorError(f"{name}: the organ is absent (no voxel carries its label)")
    a = SIZE_CLASSES[size].semi_axes[0]
    need = 4.0 / 3.0 * math.pi * a**3
    if n < need:
        raise DiffTumorError(
            f"{name}: the organ is {n} mm³ (resampled to 1 mm), too small for a {size} tumour (at least {need:.0f} mm³); "
            f"choose a smaller size"
        )


PLACE_TRIES = 50  # centres tried per tumour before it counts as not fitting apart from the others


def _volume_ml(n_voxels: int) -> str:
    ml = n_voxels / 1000.0  # 1 mm voxels
    return f"{ml:,.0f} ml" if ml >= 10 else f"{ml:.2g} ml"


def _size_words(size: str) -> str:
    lo, hi = SIZE_CLASSES[size].diameter_mm
    return f"{size} tumours ({lo}-{hi} mm)"


def max_tumours(organ: np.ndarray, size: str) -> int:
    """An upper bound on how many tumours of ``size`` fit in ``organ`` (1 mm grid): its volume over the
    volume of the class's smallest ellipsoid."""
    a = SIZE_CLASSES[size].semi_axes[0]
    return int(int(np.count_nonzero(organ)) // (4.0 / 3.0 * math.pi * a**3))


def check_count_fits(organ: np.ndarray, size: str, count: int, *, organ_name: str = "organ",
                     name: str = "organ mask") -> None:
    """Refuse a number of tumours that cannot fit: more than :func:`max_tumours`, or more than one large tumour
    where the release places it at the organ's centre (not liver or kidney)."""
    n = int(np.count_nonzero(organ))
    if size == "large" and organ_name not in ORGANS_WITH_RANDOM_CENTRE and count > 1:
        raise DiffTumorError(f"{name}: a large {organ_name} tumour is placed at the organ's centre, so only one fits "
                             f"(asked for {count})")
    most = max_tumours(organ, size)
    if count > most:
        raise DiffTumorError(f"{name}: the {organ_name} is {_volume_ml(n)} (on the 1 mm grid); at most {most} "
                             f"{_size_words(size)} fit in that volume (asked for {count})")


def _placement(canvas_shape, shape_shape, centre):
    """(canvas slices, shape slices) of a box of ``shape_shape`` centred on ``centre`` (None: off the canvas)."""
    dst, src = [], []
    for c, n, N in zip(centre, shape_shape, canvas_shape):
        start = int(c) - n // 2
        lo, hi = max(start, 0), min(start + n, N)
        if hi <= lo:
            return None
        dst.append(slice(lo, hi))
        src.append(slice(lo - start, hi - start))
    return tuple(dst), tuple(src)


def generate_tumor_mask(
    organ_mask: np.ndarray,
    organ: str,
    *,
    size: str | None = None,
    count: int | None = None,
    rng=0,
    gap: int = 1,
    name: str = "organ mask",
) -> tuple[np.ndarray, list[TumorParams]]:
    """Draw tumours like the release, in model space (1 mm, RAS (X, Y, Z) array).

    ``size`` None draws the release's training mix (:func:`sample_size_class`); ``count`` None draws
    from the class's count range. Returns the boolean mask and one :class:`TumorParams` per tumour.

    Unlike the release, tumours never touch: a tumour whose shape would come within ``gap`` voxels of one
    already placed gets a new centre (up to :data:`PLACE_TRIES`), so every tumour reported is a tumour of its
    own. An asked-for ``count`` that cannot be placed so is refused in one line naming the organ's volume
    and how many fit (:func:`check_count_fits` refuses the hopeless ones before drawing); with ``count``
    None the tumours that find no room are left out (at least one is always placed).
    """
    rng = as_rng(rng)
    organ_mask = np.asarray(organ_mask, dtype=bool)
    if organ_mask.ndim != 3:
        raise ValueError(f"organ_mask must be 3D (X, Y, Z), got shape {organ_mask.shape}")
    if size is None:
        size = sample_size_class(rng)
    if size not in SIZE_CLASSES:
        raise ValueError(f"size {size!r} is not one of {sorted(SIZE_CLASSES)}")
    check_organ_fits(organ_mask, size, name=name)
    sc = SIZE_CLASSES[size]
    asked = count is not None
    if count is None:
        count = int(rng.integers(sc.count[0], sc.count[1] + 1))
    if count < 1:
        raise ValueError(f"count must be >= 1, got {count}")
    if asked:
        check_count_fits(organ_mask, size, count, organ_name=organ, name=name)
    kidney = organ.startswith("kidney")
    random_loc = organ in ORGANS_WITH_RANDOM_CENTRE or size != "large"
    erode = organ == "liver"
    canvas = np.zeros_like(organ_mask)
    taken = np.zeros_like(organ_mask)  # placed tumours grown by `gap`: no new tumour may reach into it
    grow = np.ones((2 * gap + 1,) * 3, bool) if gap > 0 else None
    params: list[TumorParams] = []
    placed: list[tuple] = []  # (canvas slices, shape slices, shape) per tumour
    for _ in range(count):
        axes = draw_semi_axes(size, rng)
        sigma = draw_sigma(size, rng)
        shape = deformed_ellipsoid(axes, sigma, rng)
        if not random_loc:  # large tumour outside liver/kidney: bbox-cropped shape on the organ's bbox centre
            nz = np.argwhere(shape)
            lo, hi = nz.min(0), nz.max(0)
            shape = shape[lo[0] : hi[0], lo[1] : hi[1], lo[2] : hi[2]]  # the release drops the max index
        for _try in range(PLACE_TRIES if random_loc else 1):
            centre = random_centre(organ_mask, rng, erode=erode) if random_loc else bbox_centre(organ_mask)
            where = _placement(canvas.shape, shape.shape, centre)
            if where is None or not (taken[where[0]] & shape[where[1]]).any():
                break
        else:
            where = "no room"
        if where == "no room":
            if asked:
                raise DiffTumorError(f"{name}: the {organ} is {_volume_ml(int(organ_mask.sum()))} (on the 1 mm grid); "
                                     f"only {len(params)} {_size_words(size)} could be placed in it apart from each "
                                     f"other (asked for {count})")
            break  # the release's random count: keep those that fit
        if where is not None:
            dst, src = where
            canvas[dst] |= shape[src]
            if grow is not None:
                pad = np.pad(shape[src], gap)
                grown = ndimage.binary_dilation(pad, structure=grow)
                lo = [d.start - gap for d in dst]
                gdst = tuple(slice(max(low, 0), min(low + g, N)) for low, g, N in zip(lo, grown.shape, canvas.shape))
                gsrc = tuple(slice(d.start - low, d.stop - low) for d, low in zip(gdst, lo))
                taken[gdst] |= grown[gsrc]
            else:
                taken[dst] |= shape[src]
        placed.append((where, shape))
        params.append(TumorParams(size, axes, sigma, tuple(int(c) for c in centre), True))
    clip = True
    if kidney and size in ("medium", "large"):
        clip = bool(rng.random() >= 0.5)
    mask = canvas & organ_mask if clip else canvas
    for p, (where, shape) in zip(params, placed):
        p.clipped_to_organ = clip
        if where is not None:
            dst, src = where
            p.voxels = int(np.count_nonzero(shape[src] & organ_mask[dst] if clip else shape[src]))
    if not mask.any():  # vanishingly rare (shape warped away): redraw deterministically from this rng
        return generate_tumor_mask(organ_mask, organ, size=size, count=count if asked else None, rng=rng, gap=gap,
                                   name=name)
    return mask, params


# --------------------------------------------------------------------------------------------
# user-placed ellipsoid on the CT's own grid
# --------------------------------------------------------------------------------------------
def _rotation_matrix(rotation) -> np.ndarray:
    """3x3 rotation from Euler angles in degrees (extrinsic x, y, z about the LPS axes) or a matrix."""
    if rotation is None:
        return np.eye(3)
    r = np.asarray(rotation, dtype=np.float64)
    if r.shape == (3, 3):
        return r
    if r.shape != (3,):
        raise ValueError(f"rotation must be 3 Euler angles in degrees or a 3x3 matrix, got shape {r.shape}")
    from scipy.spatial.transform import Rotation

    return Rotation.from_euler("xyz", r, degrees=True).as_matrix()


def ellipsoid_mask(
    geometry,
    centre: Sequence[float],
    radii_mm: Sequence[float],
    *,
    voxel: bool = False,
    rotation=None,
    irregularity: float = 0.0,
    rng=0,
) -> np.ndarray:
    """Boolean (z, y, x) mask of an ellipsoid on ``geometry``'s grid (a ``backend.io.Geometry``).

    * ``centre``: world point (LPS mm, as SimpleITK reports it) or, with ``voxel=True``, a
      continuous voxel index (x, y, z) in SimpleITK order.
    * ``radii_mm``: semi-axes along the world L, P, S axes before rotation.
    * ``rotation``: Euler angles in degrees, extrinsic rotations about world x (L), y (P), z (S)
      applied in that order (``scipy.spatial.transform.Rotation.from_euler("xyz")``), or a 3x3 matrix.
    * ``irregularity`` in [0, 1]: a smooth random displacement of the surface, from a 3x3x3 control
      grid of Gaussian displacements with std ``irregularity * 0.3 * mean radius`` mm (the release's
      elastic sigma is ~0.2–0.4 of the radius for medium tumours); 0 = a perfect ellipsoid.
    """
    radii = np.asarray(radii_mm, dtype=np.float64)
    if radii.shape != (3,) or np.any(radii <= 0) or not np.all(np.isfinite(radii)):
        raise DiffTumorError(f"radii: need three positive numbers in mm, got {list(radii_mm)}")
    if not 0.0 <= float(irregularity) <= 1.0:
        raise DiffTumorError(f"irregularity: must lie in [0, 1], got {irregularity}")
    c = np.asarray(centre, dtype=np.float64)
    if c.shape != (3,) or not np.all(np.isfinite(c)):
        raise DiffTumorError(f"centre: need three numbers (x, y, z), got {list(centre)}")
    world_c = geometry.voxel_to_world(c) if voxel else c
    idx_c = geometry.world_to_voxel(world_c)
    size = np.asarray(geometry.size)
    if np.any(idx_c < -0.5) or np.any(idx_c > size - 0.5):
        raise DiffTumorError(f"centre: {np.round(c, 2).tolist()} lies outside the image (voxel index "
                             f"{np.round(idx_c, 1).tolist()}, size {[int(v) for v in size]})")
    R = _rotation_matrix(rotation)
    amp = float(irregularity) * 0.3 * float(radii.mean())
    reach = radii.max() + 3.0 * amp + 1.0  # mm
    # voxel bounding box of the sphere of radius `reach` around the centre
    spacing = np.asarray(geometry.spacing)
    D = geometry.direction_matrix
    half = reach / spacing * np.abs(np.linalg.inv(D)).sum(axis=1)  # generous
    lo = np.maximum(np.floor(idx_c - half).astype(int), 0)
    hi = np.minimum(np.ceil(idx_c + half).astype(int) + 1, size)
    out = np.zeros(geometry.shape, dtype=bool)
    if np.any(hi <= lo):
        return out
    ii, jj, kk = np.meshgrid(*[np.arange(a, b) for a, b in zip(lo, hi)], indexing="ij")
    pts = geometry.voxel_to_world(np.stack([ii, jj, kk], axis=-1)) - world_c  # (nx, ny, nz, 3) mm
    if amp > 0:
        rng = as_rng(rng)
        coarse = rng.standard_normal((3, 3, 3, 3)) * amp
        u = np.clip((pts @ R) / reach, -1, 1) + 1.0  # in [0, 2] = control-grid coordinates
        disp = np.stack(
            [ndimage.map_coordinates(coarse[d], np.moveaxis(u, -1, 0), order=3, mode="nearest") for d in range(3)],
            axis=-1,
        )
        pts = pts + disp
    local = pts @ R  # coordinates along the rotated ellipsoid axes
    inside = ((local / radii) ** 2).sum(-1) <= 1.0  # (nx, ny, nz)
    out[lo[2] : hi[2], lo[1] : hi[1], lo[0] : hi[0]] = inside.transpose(2, 1, 0)
    if not out.any():  # smaller than a voxel: keep the centre voxel
        k = np.clip(np.rint(idx_c).astype(int), 0, size - 1)
        out[k[2], k[1], k[0]] = True
    return out


# --------------------------------------------------------------------------------------------
# user-drawn masks
# --------------------------------------------------------------------------------------------
def validate_tumor_mask(
    mask: np.ndarray,
    organ_mask: np.ndarray,
    *,
    name: str = "tumor mask",
    min_inside: float = 0.5,
) -> np.ndarray:
    """Check a user-drawn mask against the organ and return it as bool.

    Refuses: a shape different from the organ mask's, NaN/inf values, an empty mask, a mask
    with less than ``min_inside`` of its voxels inside the organ. Any non-zero value is tumour.
    """
    m = np.asarray(mask)
    if m.shape != np.shape(organ_mask):
        raise DiffTumorError(f"{name}: array shape {m.shape} differs from the CT's {np.shape(organ_mask)}")
    if m.dtype.kind == "f" and not np.all(np.isfinite(m)):
        raise DiffTumorError(f"{name}: contains NaN or infinite values")
    m = m != 0
    n = int(m.sum())
    if n == 0:
        raise DiffTumorError(f"{name}: is empty (no tumour voxel)")
    inside = int((m & np.asarray(organ_mask, dtype=bool)).sum())
    if inside < min_inside * n:
        raise DiffTumorError(
            f"{name}: only {inside} of its {n} voxels ({100.0 * inside / n:.0f} %) lie inside the organ; place the tumour inside the organ"
        )
    return m


def largest_diameter_mm(mask: np.ndarray, spacing: Sequence[float] = (1.0, 1.0, 1.0)) -> float:
    """Rotation-invariant largest diameter of a blob: 2·sqrt(5·λ_max) of its voxel-coordinate covariance.

    Exact for a solid ellipsoid (variance along a semi-axis a is a²/5); ``spacing`` is per array axis.
    """
    pts = np.argwhere(mask).astype(np.float64) * np.asarray(spacing, dtype=np.float64)
    if len(pts) < 2:
        return float(max(spacing))
    lam = np.linalg.eigvalsh(np.cov(pts.T)).max()
    return float(2.0 * math.sqrt(5.0 * max(lam, 0.0)))
