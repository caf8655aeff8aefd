"""CT and mask I/O with exact geometry: :class:`Geometry`, :class:`Volume`, read/write.

Conventions (see ``docs/architecture.md``):

* ``Volume.array`` is a numpy array in SimpleITK order **(z, y, x)**.
* ``Geometry`` stores ``size``, ``spacing`` and ``origin`` in SimpleITK **(x, y, z)** order and
  ``direction`` as a row-major 9-tuple (column ``j`` = world direction of index axis ``j``), all in
  the LPS world frame that ITK uses.
* Integer images stay integer: the pixel type SimpleITK reads is kept.
* Files are written atomically (temporary file in the same folder, then :func:`os.replace`), and the
  file a :class:`Volume` was read from is never overwritten unless the caller asks for it.

NIfTI stores spacing, origin and direction as float32. Geometry read from a NIfTI file therefore
survives any number of read/write round trips bit-exactly; geometry made up in float64 (e.g.
spacing 0.7) comes back as its nearest float32 value, which :meth:`Geometry.matches` accepts.
"""

from __future__ import annotations

import errno
import os
import uuid
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np

from backend.errors import DiffTumorError
from backend.geometry import Geometry

if TYPE_CHECKING:  # pragma: no cover
    import SimpleITK as sitk

PathLike = str | os.PathLike

#: File endings SimpleITK reads/writes here (besides DICOM series folders for reading).
IMAGE_SUFFIXES = (".nii.gz", ".nii", ".nrrd", ".nhdr", ".mha", ".mhd")


def image_suffix(path: PathLike) -> str:
    """The image file ending of ``path`` (``".nii.gz"`` counts as one), lower case; "" if unknown."""
    name = Path(path).name.lower()
    for suffix in IMAGE_SUFFIXES:
        if name.endswith(suffix):
            return suffix
    return ""


def strip_image_suffix(path: PathLike) -> str:
    """File name of ``path`` without its image ending (``case_001.nii.gz`` -> ``case_001``)."""
    name = Path(path).name
    suffix = image_suffix(name)
    return name[: len(name) - len(suffix)] if suffix else Path(name).stem


def label_map_range(array: np.ndarray) -> tuple[int, int] | None:
    """(min, max) when ``array`` looks like a label map rather than a CT, else ``None``: whole numbers in
    0..1000, at most 256 distinct values, and piecewise constant (at least 90 % of neighbouring voxels
    along a row are equal; CT noise makes them differ, also in a crop of soft tissue alone). Sampled on
    about 32 slices."""
    if not np.issubdtype(array.dtype, np.integer) or array.size == 0:
        return None
    slices = array[:: max(1, array.shape[0] // 32)]  # (z, y, x): about 32 whole slices
    lo, hi = int(slices.min()), int(slices.max())
    if not (0 <= lo and hi <= 1000) or len(np.unique(slices[:, ::4, ::4])) > 256:
        return None
    if array.shape[-1] > 1 and np.mean(slices[..., 1:] == slices[..., :-1]) < 0.9:
        return None
    return lo, hi


def check_same_grid(a, b, *, names: tuple[str, str] = ("image", "mask"), rtol: float = 1e-6, atol: float = 1e-5) -> None:
    """Raise :class:`DiffTumorError` unless ``a`` and ``b`` (Geometry or Volume) share one grid.

    ``names`` name the two inputs in the message, e.g. ``("ct.nii.gz", "organs.nii.gz")``; the
    message reads ``"organs.nii.gz: grid does not match ct.nii.gz (size ... vs ...)"``.
    """
    ga = a.geometry if isinstance(a, Volume) else a
    gb = b.geometry if isinstance(b, Volume) else b
    if not ga.matches(gb, rtol=rtol, atol=atol):
        diff = gb.describe_difference(ga, rtol=rtol, atol=atol)
        raise DiffTumorError(f"{names[1]}: grid does not match {names[0]} ({diff}); resample it onto the same grid first")


# --------------------------------------------------------------------------------------------
# Volume
# --------------------------------------------------------------------------------------------
@dataclass
class Volume:
    """A 3D image: ``array`` (z, y, x) in SimpleITK order + its :class:`Geometry` (+ source file)."""

    array: np.ndarray
    geometry: Geometry
    path: Path | None = field(default=None)

    def __post_init__(self):
        self.array = np.asarray(self.array)
        if self.array.ndim != 3:
            raise ValueError(f"Volume.array must be 3D (z, y, x), got shape {self.array.shape}")
        if tuple(self.array.shape) != self.geometry.shape:
            raise ValueError(
                f"Volume.array shape {self.array.shape} (z, y, x) does not match geometry size {self.geometry.size} (x, y, z)"
            )
        if self.path is not None:
            self.path = Path(self.path)

    @property
    def shape(self) -> tuple[int, ...]:
        return tuple(self.array.shape)

    @property
    def dtype(self) -> np.dtype:
        return self.array.dtype

    @property
    def spacing(self) -> tuple[float, float, float]:
        return self.geometry.spacing

    @property
    def origin(self) -> tuple[float, float, float]:
        return self.geometry.origin

    @property
    def direction(self) -> tuple[float, ...]:
        return self.geometry.direction

    @property
    def name(self) -> str:
        return str(self.path) if self.path is not None else "<in-memory volume>"

    def with_array(self, array: np.ndarray) -> Volume:
        """A new Volume on the same grid (no source path: it is new data)."""
        return Volume(np.asarray(array), self.geometry, None)

    def to_sitk(self) -> sitk.Image:
        import SimpleITK as sitk

        arr = self.array
        if arr.dtype == np.bool_:
            arr = arr.astype(np.uint8)
        image = sitk.GetImageFromArray(np.ascontiguousarray(arr), isVector=False)
        return self.geometry.apply_to(image)

    @classmethod
    def from_sitk(cls, image: sitk.Image, path: PathLike | None = None) -> Volume:
        import SimpleITK as sitk

        return cls(sitk.GetArrayFromImage(image), Geometry.from_image(image), path)


# --------------------------------------------------------------------------------------------
# Reading
# --------------------------------------------------------------------------------------------
def _dicom_series_files(folder: Path, max_depth: int = 3) -> list[str]:
    """Files of the largest DICOM series in ``folder`` or, if it holds none, in its sub-folders."""
    import SimpleITK as sitk

    reader = sitk.ImageSeriesReader
    warn = sitk.ProcessObject.GetGlobalWarningDisplay()
    sitk.ProcessObject.SetGlobalWarningDisplay(False)  # "No Series were found" is reported by us
    best: list[str] = []
    try:
        for root, dirs, _ in os.walk(folder):
            dirs.sort()
            if len(Path(root).relative_to(folder).parts) >= max_depth:
                dirs.clear()
            for sid in reader.GetGDCMSeriesIDs(root) or ():
                files = list(reader.GetGDCMSeriesFileNames(root, sid))
                if len(files) > len(best):
                    best = files
            if best and Path(root) == folder:
                break  # series directly in the folder win over nested ones
    finally:
        sitk.ProcessObject.SetGlobalWarningDisplay(warn)
    return best


_ERRNO_WHY = {
    errno.EINVAL: "the file system refuses this name or operation (e.g. one of : * ? \" < > | in a name on a "
    "FAT, exFAT, NTFS or network drive)",
    errno.ENAMETOOLONG: "the name is too long for the file system",
    errno.EACCES: "permission denied",
    errno.EPERM: "operation not permitted here",
    errno.EROFS: "read-only file system",
    errno.ENOSPC: "no space left on the device",
    errno.EDQUOT: "disk quota exceeded",
    errno.ENOENT: "no such file or folder (or a folder on the way cannot be created here)",
    errno.ENOTDIR: "a part of the path is a file, not a folder",
    errno.EISDIR: "is a folder, not a file",
    errno.ELOOP: "too many symbolic links on the way",
    errno.EXDEV: "cannot move a file across file systems here",
}


def error_reason(exc: OSError) -> str:
    """What is wrong, in words a user can act on (``permission denied``, ``no space left on the device``)."""
    return _ERRNO_WHY.get(exc.errno, exc.strerror or type(exc).__name__)


def os_error_message(exc: OSError, path: PathLike | None = None) -> str:
    """One line for an :class:`OSError`: the path it concerns and what is wrong, in words a user can act on
    (``"out/a:b.csv: the file system refuses this name or operation (...)"`` rather than ``[Errno 22] Invalid
    argument``)."""
    where = exc.filename if exc.filename is not None else path
    why = error_reason(exc)
    return f"{shown_path(where) if where is not None else 'file system'}: {why}"


def shown_path(path: PathLike) -> str:
    """``path`` as text that can always be printed (bytes that are not UTF-8 shown as \\xNN)."""
    text = os.fsdecode(path) if isinstance(path, (bytes, os.PathLike)) else str(path)
    return text.encode("utf-8", "surrogateescape").decode("utf-8", "backslashreplace")


def check_path_name(path: PathLike) -> None:
    """Refuse a path SimpleITK cannot open: a name that is not valid UTF-8 (it would abort the process)."""
    try:
        os.fsdecode(path).encode("utf-8")
    except UnicodeEncodeError:
        raise DiffTumorError(f"{shown_path(path)}: the name is not valid UTF-8 text, which SimpleITK cannot open; "
                             "rename it") from None


def read_image(path: PathLike) -> Volume:
    """Read a 3D image (NIfTI, NRRD, MHA/MHD, or a DICOM series folder) into a :class:`Volume`.

    A DICOM folder holding several series gives the series with the most files (sub-folders
    are searched, three levels deep, when the folder itself holds no series). The pixel type is
    kept (int16 CT stays int16). Raises :class:`DiffTumorError` naming the file for a missing or
    unreadable file, a file cut short or with damaged compressed data (``"<path>: truncated or corrupt:
    <reason>"``, :mod:`backend.integrity`), a 2D or 4D image, or a multi-component (vector/RGB) image.
    """
    import SimpleITK as sitk

    from backend.integrity_dicom import check_dicom_files

    path = Path(path)
    check_path_name(path)
    try:
        if not path.exists():
            raise DiffTumorError(f"{path}: no such file or folder")
        if not (path.is_dir() or path.is_file()):
            raise DiffTumorError(f"{path}: not an image file or folder (a device, pipe or socket)")
    except OSError as exc:
        raise DiffTumorError(os_error_message(exc, path)) from None
    try:
        if path.is_dir():
            files = _dicom_series_files(path)
            if not files:
                images = sorted(p.name for p in path.iterdir() if p.is_file() and image_suffix(p) and not p.name.startswith("."))
                if images:  # e.g. a synthesize output folder: name its files
                    raise DiffTumorError(f"{path}: a folder of image files, not a DICOM series; give one of them "
                                         f"({', '.join(images[:4])}{', ...' if len(images) > 4 else ''})")
                raise DiffTumorError(f"{path}: folder holds no DICOM series (expected a folder of .dcm slices)")
            folder = Path(files[0]).parent
            series = {os.path.abspath(f) for f in files}
            others = [p for p in sorted(folder.iterdir()) if p.is_file() and os.path.abspath(p) not in series]
            check_dicom_files(files, others=others)
            reader = sitk.ImageSeriesReader()
            reader.SetFileNames(files)
            image = reader.Execute()
        else:
            image = _read_checked_file(path)
    except DiffTumorError:
        raise
    except RuntimeError as exc:
        kind = "a DICOM series" if path.is_dir() else "an image file"
        raise DiffTumorError(f"{path}: cannot read as {kind} (corrupt or unsupported: {_itk_reason(exc)})") from None

    if isinstance(image, Volume):  # a gzip NIfTI's own voxels, as stored (NaN kept, no scaling): nothing to put right
        return image
    volume = Volume.from_sitk(_as_3d(image, path), path)
    _reconcile_float_nifti(volume, path)
    return volume


def _read_checked_file(path: Path) -> sitk.Image | Volume:
    """SimpleITK's read of one file, refused when the file is cut short or damaged (:mod:`backend.integrity`).

    A gzip NIfTI holding a plain scalar 3D volume (the usual CT or label file) is inflated once, by the check,
    straight into the array; SimpleITK reads its header only (geometry and pixel type come from it as before).
    Other compressed files are checked in a second thread while SimpleITK reads them (both release the GIL);
    uncompressed ones are checked first (header bytes and the file size). The check's reason wins over
    SimpleITK's when both fail."""
    import SimpleITK as sitk

    from backend.integrity import check_image_file, needs_stream_check

    reader = sitk.ImageFileReader()
    reader.SetFileName(str(path))
    check_image_file(path, streams=False)  # sizes first: SimpleITK never sees a file cut short of its header's promise
    if not needs_stream_check(path):
        return reader.Execute()
    if path.name.lower().endswith(".nii.gz"):
        volume = _read_gzip_nifti(reader, path)
        if volume is not None:
            return volume
    from concurrent.futures import ThreadPoolExecutor

    with ThreadPoolExecutor(max_workers=1, thread_name_prefix="difftumor-integrity") as pool:
        check = pool.submit(check_image_file, path)
        try:
            image = reader.Execute()
        except RuntimeError:
            check.result()  # a DiffTumorError naming the damage, if that is why SimpleITK failed
            raise
        check.result()
    return image


def _sitk_scalar_dtypes() -> dict:
    import SimpleITK as sitk

    return {sitk.sitkInt8: np.int8, sitk.sitkUInt8: np.uint8, sitk.sitkInt16: np.int16, sitk.sitkUInt16: np.uint16,
            sitk.sitkInt32: np.int32, sitk.sitkUInt32: np.uint32, sitk.sitkInt64: np.int64, sitk.sitkUInt64: np.uint64,
            sitk.sitkFloat32: np.float32, sitk.sitkFloat64: np.float64}


def _read_gzip_nifti(reader, path: Path) -> Volume | None:
    """A plain scalar 3D gzip NIfTI as a Volume, its data inflated once with the integrity check; None for
    other layouts (4D, vector, scaled to float by ITK, ...), which SimpleITK reads whole."""
    from backend.integrity import Broken, broken, check_image_file, read_gzip_nifti_voxels

    try:
        reader.ReadImageInformation()
    except RuntimeError:
        check_image_file(path)  # the precise reason, when the file is cut or damaged
        raise
    dtype = _sitk_scalar_dtypes().get(reader.GetPixelID())
    size = tuple(reader.GetSize())
    if (reader.GetDimension() != 3 or reader.GetNumberOfComponents() != 1
            or dtype is None or min(size) < 2):
        return None
    try:
        arr = read_gzip_nifti_voxels(path, size, dtype)
    except Broken as exc:
        raise broken(path, str(exc)) from None
    if arr is None:
        return None
    # ReadImageInformation gives -0.0 where a full read gives 0.0 (same grid, but printed "-0")
    direction = tuple(v + 0.0 for v in reader.GetDirection())
    return Volume(arr, Geometry(size, reader.GetSpacing(), reader.GetOrigin(), direction), path)


def _reconcile_float_nifti(volume: Volume, path: Path) -> None:
    """Where ITK's NIfTI reader returned float voxels, put right what it changed (nibabel reads the header):

    * whole numbers stored as integers with a whole-number scaling (e.g. uint16 with scl_inter -1024, as some
      converters write CT) come back as float32: give them an integer type that holds them (int16 when they
      fit, else int32), so an integer CT stays integer through synthesis and saving;
    * float data: NaN / +-inf voxels, which ITK (before ITK 6) silently turns into 0 - a valid intensity - are
      put back, so that the non-finite checks downstream see them.
    """
    name = path.name.lower()
    arr = volume.array
    if not (name.endswith(".nii") or name.endswith(".nii.gz")) or arr.dtype.kind != "f" or arr.size == 0:
        return
    import nibabel as nib

    try:
        img = nib.load(str(path))
        slope, inter = img.header.get_slope_inter()
        stored = img.header.get_data_dtype()
    except Exception:  # noqa: BLE001 - ITK read it; nibabel's view is only a cross-check
        return
    if stored.kind in "iu":  # integers hold no NaN; the values are whole if the scaling is
        whole = lambda v: v is None or (np.isfinite(v) and float(v) == round(float(v)))  # noqa: E731
        if not (whole(slope) and whole(inter)) or not np.array_equal(arr, np.round(arr)):
            return
        lo, hi = float(arr.min()), float(arr.max())
        for dtype in (np.int16, np.int32):
            if np.iinfo(dtype).min <= lo and hi <= np.iinfo(dtype).max:
                volume.array = arr.astype(dtype)
                return
        return
    if not (arr == 0).any():
        return
    try:
        raw = np.asarray(img.dataobj)
    except Exception:  # noqa: BLE001
        return
    raw = raw.reshape(raw.shape[:3]) if raw.ndim > 3 and raw.size == int(np.prod(raw.shape[:3])) else raw
    if raw.ndim != 3 or raw.shape[::-1] != arr.shape:
        return
    bad = ~np.isfinite(raw.T)  # nibabel (i, j, k) -> our (k, j, i)
    if bad.any():
        arr[bad] = raw.T[bad]


def _itk_reason(exc: Exception) -> str:
    """The most informative single line of an ITK exception text."""
    lines = [ln.strip() for ln in str(exc).splitlines() if ln.strip()]
    for ln in reversed(lines):
        if "rror" in ln or "nable" in ln or "not" in ln:
            ln = ln.replace("sitk::ERROR:", "").replace("ERROR:", "")
            return ln.strip(" :")[:200]
    return (lines[-1] if lines else type(exc).__name__)[:200]


def _as_3d(image: sitk.Image, path: Path) -> sitk.Image:
    import SimpleITK as sitk

    n_comp = image.GetNumberOfComponentsPerPixel()
    if n_comp != 1:
        raise DiffTumorError(f"{path}: image has {n_comp} components per voxel (vector/RGB); expected a scalar 3D CT or mask")
    dim = image.GetDimension()
    size = tuple(image.GetSize())
    if dim == 4 and size[3] == 1:  # a 3D volume stored with a singleton time axis
        image = sitk.Extract(image, (*size[:3], 0), (0, 0, 0, 0))
        dim, size = 3, size[:3]
    if dim == 2:
        raise DiffTumorError(f"{path}: image is 2D {size}; expected a 3D volume")
    if dim != 3:
        raise DiffTumorError(f"{path}: image is {dim}D {size}; expected a 3D volume (4D/time series are not supported)")
    if min(size) < 2:
        raise DiffTumorError(f"{path}: image is a single slice {size}; expected a 3D volume")
    return image


# --------------------------------------------------------------------------------------------
# Writing
# --------------------------------------------------------------------------------------------
def write_text_atomic(path: str | os.PathLike, text: str) -> Path:
    """Write ``text`` (UTF-8) to ``path`` atomically: a temporary file in the same folder, flushed to disk,
    then :func:`os.replace`; a failure leaves the old file (or none) and no temporary behind."""
    path = Path(path)
    with atomic_write(path) as tmp, open(tmp, "w", encoding="utf-8", newline="") as fh:
        fh.write(text)
        fh.flush()
        os.fsync(fh.fileno())
    return path


def write_image(
    data: Volume | np.ndarray,
    path: PathLike | Geometry,
    geometry: Geometry | PathLike | None = None,
    *,
    overwrite: bool = False,
    overwrite_source: bool | None = None,
    compress: bool = True,
) -> Path:
    """Write a Volume (or a (z, y, x) array + Geometry) atomically; the format follows the extension.

    Both ``write_image(volume, path)``/``write_image(array, path, geometry)`` and the
    ``write_image(array, geometry, path)`` order are accepted. Writing onto the file ``data`` was
    read from is refused unless ``overwrite=True`` (alias ``overwrite_source=True``); other
    existing files are replaced. Booleans are written as uint8. Returns the written path.
    """
    import SimpleITK as sitk

    if isinstance(path, Geometry):  # (data, geometry, path) order
        path, geometry = geometry, path
    if path is None:
        raise ValueError("write_image needs an output path")
    if overwrite_source is not None:
        overwrite = overwrite or overwrite_source
    target = Path(path)

    if isinstance(data, Volume):
        if geometry is not None and not geometry.matches(data.geometry, rtol=0, atol=0):
            data = Volume(data.array, geometry, data.path)
        volume = data
    else:
        if geometry is None:
            raise ValueError("write_image(array, path) needs a geometry")
        volume = Volume(np.asarray(data), geometry)

    check_path_name(target)
    suffix = image_suffix(target)
    if not suffix:
        raise DiffTumorError(f"{target}: unknown output format; use one of {', '.join(IMAGE_SUFFIXES)}")
    if not target.parent.is_dir():
        raise DiffTumorError(f"{target}: output folder {target.parent} does not exist")
    if volume.path is not None and not overwrite and _same_file(volume.path, target):
        raise DiffTumorError(f"{target}: refusing to overwrite the input file this volume was read from (pass overwrite=True)")
    if suffix in (".mhd", ".nhdr"):
        # Header + separate data file: an atomic rename of two files is not possible; write directly.
        sitk.WriteImage(volume.to_sitk(), str(target), useCompression=compress)
        return target

    # Keep the real ending on the temporary name so SimpleITK picks the right writer; let the
    # writer create it (mkstemp would leave mode 0600 on the result).
    try:
        with atomic_write(target, suffix=f".tmp{suffix}") as tmp:
            sitk.WriteImage(volume.to_sitk(), str(tmp), useCompression=compress)
    except RuntimeError as exc:
        refused = _cannot_create_in(target.parent)  # ITK names neither the folder nor the reason, only its temp file
        if refused:
            raise DiffTumorError(f"cannot write to {target.parent}: {refused}") from None
        raise DiffTumorError(f"{target}: cannot write image ({_itk_reason(exc)})") from None
    except OSError as exc:
        raise DiffTumorError(os_error_message(exc, target)) from None
    return target


def _cannot_create_in(folder: Path) -> str | None:
    """Why no file can be created in ``folder`` ('permission denied', 'read-only file system', ...), or None."""
    import tempfile

    try:
        with tempfile.TemporaryFile(dir=folder):
            return None
    except OSError as exc:
        return (exc.strerror or type(exc).__name__).lower()


def _same_file(a: Path, b: Path) -> bool:
    try:
        return b.exists() and os.path.samefile(a, b)
    except OSError:
        return Path(os.path.abspath(a)) == Path(os.path.abspath(b))


class atomic_write:  # noqa: N801 - used like open(): ``with atomic_write(path) as tmp: ...``
    """Write a file atomically: ``with atomic_write(path) as tmp: save(tmp)``.

    ``tmp`` is a fresh temporary path in ``path``'s folder (ending in ``suffix``, so that writers that pick
    a format from the name see the right one). When the block ends without an error, ``tmp`` replaces
    ``path`` (:func:`os.replace`: readers see the old file or the new one, never half of one); on an error
    the temporary file is removed and ``path`` is left as it was.
    """

    def __init__(self, path: PathLike, *, suffix: str = ".tmp"):
        self.path = Path(path)
        self.tmp = self.path.with_name(f".{self.path.name}.{os.getpid()}.{uuid.uuid4().hex[:8]}{suffix}")

    def __enter__(self) -> Path:
        return self.tmp

    def __exit__(self, exc_type, exc, tb) -> bool:
        try:
            if exc_type is None:
                os.replace(self.tmp, self.path)
        finally:
            if self.tmp.exists():
                self.tmp.unlink()
        return False
