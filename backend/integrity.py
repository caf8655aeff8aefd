"""Is an image file complete? Checks that SimpleITK does not make before it reads one.

SimpleITK 2.5 reads a cut-off ``.nii.gz`` (or ``.nii``) without a word and fills the missing part with
zeros; a cut-off MetaImage fails with "No such file or directory". :func:`check_image_file` refuses
such files first, with the precise reason, as one :class:`DiffTumorError` line
``"<path>: truncated or corrupt: <reason>"``:

* **compressed data** (gzip, whatever the file's name; zlib inside MetaImage; gzip/bzip2 inside NRRD) is
  inflated as a stream, in 1 MiB pieces, to its end: every gzip member's CRC-32 and length trailer (zlib:
  Adler-32) must match. Nothing is kept but a few header bytes, so memory stays small; the time is one
  inflate of the file (``bench/io_integrity.py`` measures it), which :func:`backend.io.read_image` runs
  beside SimpleITK's own read, in a second thread;
* **the amount of data the header promises**: NIfTI-1/2 (``vox_offset + nvox * bitpix / 8``, also inside a
  ``.nii.gz``; ``.hdr``/``.img`` pairs), NRRD (attached or detached ``raw``/``gzip``/``bzip2`` data with
  ``line skip``/``byte skip``), MetaImage ``.mha``/``.mhd`` (``LOCAL`` or one data file, raw or
  ``CompressedData`` with ``CompressedDataSize``) and each DICOM file of a series (the length of the
  pixel data element against rows x columns x frames x samples x bits, and against the file's size).

Layouts these checks do not cover (NRRD ascii/hex, MetaImage ``LIST`` data files, deflated DICOM) are
left to SimpleITK, which reads them as before.
"""

from __future__ import annotations

import bz2
import os
import re
import struct
import zlib
from pathlib import Path

from backend.errors import DiffTumorError

CHUNK = 1 << 20  # bytes read from the file at a time
OUT_CHUNK = 1 << 18  # at most this many inflated bytes per call: small buffers that stay in the CPU cache
GZIP_MAGIC = b"\x1f\x8b"


class Broken(Exception):
    """The reason a file is incomplete (turned into a DiffTumorError naming the file)."""


def broken(path, reason: str) -> DiffTumorError:
    return DiffTumorError(f"{path}: truncated or corrupt: {reason}")


def check_image_file(path, *, streams: bool = True) -> None:
    """Raise :class:`DiffTumorError` when the image file ``path`` is cut off or its compressed data is damaged.

    ``streams=False``: only what the file sizes tell (no inflating), which takes microseconds."""
    path = Path(path)
    try:
        _check(path, streams)
    except Broken as exc:
        raise broken(path, str(exc)) from None
    except OSError as exc:
        raise DiffTumorError(f"{path}: cannot read ({exc.strerror or exc})") from None


def needs_stream_check(path) -> bool:
    """True when checking ``path`` means inflating compressed data (worth a thread beside the read)."""
    path = Path(path)
    name = path.name.lower()
    try:
        with open(path, "rb") as fh:
            head = fh.read(4096)
    except OSError:
        return False
    if head[:2] == GZIP_MAGIC:
        return True
    if name.endswith((".mha", ".mhd")):
        return bool(re.search(rb"CompressedData\s*=\s*True", head, re.IGNORECASE))
    if name.endswith((".nrrd", ".nhdr")):
        return bool(re.search(rb"encoding\s*:\s*(gzip|gz|bzip2|bz2)", head, re.IGNORECASE))
    return False


def _check(path: Path, streams: bool) -> None:
    size = path.stat().st_size
    if size == 0:
        raise Broken("the file is empty (0 bytes)")
    with open(path, "rb") as fh:
        head = fh.read(4096)
    name = path.name.lower()
    if head[:2] == GZIP_MAGIC:
        if not streams:
            return
        total, prefix = inflate(path, 0, "gzip", keep=540)
        if name.endswith((".nii.gz", ".nii")):
            promised = nifti_promise(prefix, single_file=True)
            if promised is not None and total < promised:
                raise Broken(f"the image data ends early (the complete compressed stream holds {total:,} of the "
                             f"{promised:,} bytes its NIfTI header promises)")
        return
    if name.endswith(".nii"):
        promised = nifti_promise(head, single_file=True)
        _need(promised, size, "NIfTI header")
    elif name.endswith(".hdr"):
        promised = nifti_promise(head, single_file=False)
        img = path.with_suffix(".img")
        if promised is not None and img.is_file():
            _check_part(img, 0, None, promised, header=path, what="NIfTI/Analyze header", streams=streams)
    elif name.endswith((".mha", ".mhd")):
        _check_metaimage(path, streams)
    elif name.endswith((".nrrd", ".nhdr")):
        _check_nrrd(path, head, streams)


def _need(promised: int | None, have: int, what: str) -> None:
    if promised is not None and have < promised:
        raise Broken(f"the image data ends early (the file holds {have:,} of the {promised:,} bytes its {what} promises)")


# ------------------------------------------------------------------------------------- streams
def inflate(path: Path, offset: int, kind: str, *, keep: int = 0, limit: int | None = None, sink=None) -> tuple[int, bytes]:
    """Inflate the compressed stream starting at byte ``offset`` of ``path`` to its end, checking it.

    ``kind``: ``"gzip"`` (every member, each with its CRC-32/length trailer; zero padding or other bytes after
    a complete last member are allowed, as gzip allows them), ``"zlib"`` (zlib or gzip header, Adler-32/CRC-32
    checked) or ``"bzip2"``. ``limit``: compressed bytes that belong to the stream (MetaImage
    ``CompressedDataSize``). ``sink``: called with each inflated piece, in order (to keep the data). Returns
    (inflated bytes, the first ``keep`` of them). Raises :class:`Broken` when the stream ends early or fails a
    check.
    """
    total = 0
    prefix = bytearray()

    def take(out: bytes) -> None:
        nonlocal total
        total += len(out)
        if len(prefix) < keep:
            prefix.extend(out[: keep - len(prefix)])
        if sink is not None and out:
            sink(out)

    with open(path, "rb") as fh:
        fh.seek(offset)
        left = limit

        def read() -> bytes:
            nonlocal left
            n = CHUNK if left is None else min(CHUNK, left)
            data = fh.read(n) if n > 0 else b""
            if left is not None:
                left -= len(data)
            return data

        data = read()
        while True:  # one stream (gzip member) per pass
            d = _decompressor(kind)
            try:
                while not d.eof:
                    if not data:
                        data = read()
                    if not data:  # end of the file: what the decompressor still holds, then the verdict
                        while not d.eof and (out := d.decompress(b"", OUT_CHUNK)):
                            take(out)
                        if not d.eof:
                            raise Broken("the compressed data ends early")
                        break
                    take(d.decompress(data, OUT_CHUNK))
                    if kind == "bzip2":
                        data = b""  # BZ2Decompressor keeps unconsumed input itself
                        while not d.eof and not d.needs_input:
                            take(d.decompress(b"", OUT_CHUNK))
                    else:
                        data = d.unconsumed_tail
            except (zlib.error, OSError, EOFError, ValueError) as exc:
                raise Broken(_stream_reason(exc)) from None
            if kind != "gzip":
                return total, bytes(prefix)
            data = d.unused_data
            if len(data) < 2:
                data += read()
            if data[:2] != GZIP_MAGIC:
                return total, bytes(prefix)  # the end, zero padding or trailing bytes after a complete member


def _decompressor(kind: str):
    if kind == "gzip":  # each member: a gzip header (or zlib, as some NRRD writers use), detected
        return zlib.decompressobj(32 + zlib.MAX_WBITS)
    if kind == "zlib":
        return zlib.decompressobj(32 + zlib.MAX_WBITS)  # zlib or gzip header, detected
    if kind == "bzip2":
        return bz2.BZ2Decompressor()
    raise ValueError(f"unknown stream kind {kind!r}")


def _stream_reason(exc: Exception) -> str:
    text = str(exc)
    if "incorrect data check" in text:
        return "the compressed data fails its checksum (damaged)"
    if "incorrect length check" in text:
        return "the compressed data fails its length check (damaged or cut and joined)"
    if "incorrect header check" in text or "unknown compression method" in text:
        return "the compressed data does not start with a valid header"
    detail = text.split(":", 1)[-1].strip() if "while decompressing" in text else text
    return f"the compressed data is damaged ({detail})"


def _check_part(file: Path, offset: int, encoding: str | None, promised: int | None, *, header: Path, what: str,
                streams: bool, compressed_size: int | None = None) -> None:
    """Data of ``promised`` bytes at ``offset`` of ``file``, raw (``encoding`` None) or compressed; a data file
    apart from its ``header`` is named in the message."""
    if not file.is_file():
        raise DiffTumorError(f"{file}: data file named in the {what} of {header} does not exist")
    if file != header:
        try:
            _check_part(file, offset, encoding, promised, header=file, what=f"{what} ({header})", streams=streams,
                        compressed_size=compressed_size)
        except Broken as exc:
            raise broken(file, f"{exc}") from None
        return
    size = file.stat().st_size
    if encoding is None:
        _need(None if promised is None else offset + promised, size, what)
        return
    if compressed_size is not None and size - offset < compressed_size:
        raise Broken(f"the compressed data ends early (the file holds {max(0, size - offset):,} of the "
                     f"{compressed_size:,} compressed bytes its {what} promises)")
    if not streams:
        return
    total, _ = inflate(file, offset, encoding, limit=compressed_size)
    if promised is not None and total < promised:
        raise Broken(f"the image data ends early (the complete compressed stream holds {total:,} of the "
                     f"{promised:,} bytes its {what} promises)")


# --------------------------------------------------------------------------------------- NIfTI
NIFTI_DTYPES = {2: "u1", 4: "i2", 8: "i4", 16: "f4", 64: "f8", 256: "i1", 512: "u2", 768: "u4", 1024: "i8",
                1280: "u8"}  # NIfTI datatype code -> numpy scalar type (byte order from the header)


def nifti_layout(header: bytes):
    """(numpy dtype, dims, vox_offset, slope, inter) of a NIfTI-1/2 header, or None (not NIfTI, or a type that is
    not a plain scalar)."""
    if len(header) < 348:
        return None
    for endian in "<>":
        (sizeof_hdr,) = struct.unpack(endian + "i", header[:4])
        if sizeof_hdr in (348, 540):
            break
    else:
        return None
    if len(header) < sizeof_hdr:
        return None
    if sizeof_hdr == 348:
        if header[344:347] not in (b"n+1", b"ni1"):
            return None
        dim = struct.unpack(endian + "8h", header[40:56])
        (code,) = struct.unpack(endian + "h", header[70:72])
        (vox_offset, slope, inter) = struct.unpack(endian + "3f", header[108:120])
    else:
        (code,) = struct.unpack(endian + "h", header[12:14])
        dim = struct.unpack(endian + "8q", header[16:80])
        (vox_offset,) = struct.unpack(endian + "q", header[168:176])
        (slope, inter) = struct.unpack(endian + "2d", header[176:192])
    if code not in NIFTI_DTYPES or not 1 <= dim[0] <= 7:
        return None
    import numpy as np

    return np.dtype(endian + NIFTI_DTYPES[code]), tuple(int(d) for d in dim[1 : dim[0] + 1]), int(vox_offset), slope, inter


def read_gzip_nifti_voxels(path: Path, size_xyz: tuple[int, ...], dtype):
    """The voxels of a gzip NIfTI file as a (z, y, x) array of ``dtype`` (native byte order), inflated once, with
    the stream checked to its end (:func:`inflate`); None when the file's layout is not a plain scalar 3D volume
    of that type without scaling (SimpleITK then reads it). Raises :class:`Broken` for a cut or damaged file."""
    import numpy as np

    state: dict = {"head": bytearray(), "buf": None, "pos": 0, "skip": False}

    def sink(piece: bytes) -> None:
        if state["skip"]:
            return
        if state["buf"] is None:
            state["head"].extend(piece)
            if len(state["head"]) < 540:
                return
            layout = nifti_layout(bytes(state["head"][:540]))
            ok = layout is not None
            if ok:
                file_dtype, dims, vox_offset, slope, inter = layout
                dims3 = dims + (1,) * (3 - len(dims)) if len(dims) < 3 else dims
                unscaled = slope in (0.0, 1.0) and inter == 0.0  # else SimpleITK's float conversion applies
                ok = (tuple(dims3[:3]) == tuple(size_xyz) and all(d == 1 for d in dims3[3:]) and unscaled
                      and file_dtype.newbyteorder("=") == np.dtype(dtype).newbyteorder("="))
            if not ok:
                state["skip"] = True
                return
            state["dtype"], state["offset"] = file_dtype, max(vox_offset, 348)
            state["buf"] = np.empty(state["offset"] + int(np.prod(size_xyz)) * file_dtype.itemsize, np.uint8)
            piece, state["head"] = bytes(state["head"]), None
        buf, pos = state["buf"], state["pos"]
        n = min(len(piece), len(buf) - pos)
        buf[pos : pos + n] = np.frombuffer(piece, np.uint8, count=n)
        state["pos"] = pos + n

    total, _ = inflate(path, 0, "gzip", sink=sink)
    if state["buf"] is None:
        return None
    if state["pos"] < len(state["buf"]):
        raise Broken(f"the image data ends early (the complete compressed stream holds {total:,} of the "
                     f"{len(state['buf']):,} bytes its NIfTI header promises)")
    arr = state["buf"][state["offset"] :].view(state["dtype"]).reshape(tuple(size_xyz)[::-1])
    return arr if arr.dtype.isnative else arr.astype(arr.dtype.newbyteorder("="))


def nifti_promise(header: bytes, *, single_file: bool) -> int | None:
    """Bytes a NIfTI-1/-2 (or Analyze 7.5) file must hold: voxel offset + voxels x bits / 8; None if ``header``
    is no such header (then SimpleITK decides). ``single_file`` False: the ``.img`` of a pair (no offset
    floor). Raises :class:`Broken` for a header cut short."""
    if len(header) < 4:
        raise Broken(f"the NIfTI header is incomplete ({len(header)} of 348 bytes)")
    for endian in "<>":
        (sizeof_hdr,) = struct.unpack(endian + "i", header[:4])
        if sizeof_hdr in (348, 540):
            break
    else:
        return None
    if len(header) < sizeof_hdr:
        raise Broken(f"the NIfTI header is incomplete ({len(header)} of {sizeof_hdr} bytes)")
    if sizeof_hdr == 348:
        dim = struct.unpack(endian + "8h", header[40:56])
        (bitpix,) = struct.unpack(endian + "h", header[72:74])
        (vox_offset,) = struct.unpack(endian + "f", header[108:112])
    else:
        (bitpix,) = struct.unpack(endian + "h", header[14:16])
        dim = struct.unpack(endian + "8q", header[16:80])
        (vox_offset,) = struct.unpack(endian + "q", header[168:176])
    ndim = dim[0]
    if not 1 <= ndim <= 7 or bitpix <= 0 or any(d <= 0 for d in dim[1 : ndim + 1]) or vox_offset != vox_offset:
        return None  # a header SimpleITK will refuse (or read) on its own terms
    nvox = 1
    for d in dim[1 : ndim + 1]:
        nvox *= int(d)
    data = (nvox * int(bitpix) + 7) // 8
    offset = max(int(vox_offset), sizeof_hdr) if single_file else max(int(vox_offset), 0)
    return offset + data


# ------------------------------------------------------------------------------------ MetaImage
META_TYPE_BYTES = {
    "MET_CHAR": 1, "MET_UCHAR": 1, "MET_SHORT": 2, "MET_USHORT": 2, "MET_INT": 4, "MET_UINT": 4,
    "MET_LONG": 4, "MET_ULONG": 4, "MET_LONG_LONG": 8, "MET_ULONG_LONG": 8, "MET_FLOAT": 4, "MET_DOUBLE": 8,
}


def _check_metaimage(path: Path, streams: bool) -> None:
    fields: dict[str, str] = {}
    offset = 0
    with open(path, "rb") as fh:
        while True:
            line = fh.readline(65536)
            if not line:
                return  # no ElementDataFile: not a MetaImage header SimpleITK can read either
            key, sep, value = line.decode("latin-1").partition("=")
            if sep:
                fields[key.strip().lower()] = value.strip()
            if key.strip().lower() == "elementdatafile":
                offset = fh.tell()
                break
    try:
        dims = [int(v) for v in fields.get("dimsize", "").split()]
        ndims = int(fields.get("ndims", len(dims)))
        channels = int(fields.get("elementnumberofchannels", "1"))
        header_size = int(fields["headersize"]) if "headersize" in fields else None
        compressed_size = int(fields["compresseddatasize"]) if "compresseddatasize" in fields else None
    except ValueError:
        return
    etype = fields.get("elementtype", "").upper().removesuffix("_ARRAY")
    if etype not in META_TYPE_BYTES or len(dims) < ndims or any(d <= 0 for d in dims[:ndims]):
        return
    if fields.get("binarydata", "true").lower() == "false":
        return  # ASCII voxels
    promised = META_TYPE_BYTES[etype] * channels
    for d in dims[:ndims]:
        promised *= d
    compressed = fields.get("compresseddata", "false").lower() == "true"
    target = fields.get("elementdatafile", "")
    if target.lower() == "local":
        data_file = path
    elif target.upper().startswith("LIST") or "%" in target or not target:
        return  # one file per slice: left to SimpleITK
    else:
        data_file = Path(target) if os.path.isabs(target) else path.parent / target
        offset = 0
    if header_size is not None and header_size >= 0:
        offset = header_size if data_file != path else offset + header_size
    elif header_size == -1 and not compressed and data_file.is_file():
        offset = max(0, data_file.stat().st_size - promised)  # data at the end of the file
    _check_part(data_file, offset, "zlib" if compressed else None, promised, header=path, what="MetaImage header",
                streams=streams, compressed_size=compressed_size if compressed else None)


# ----------------------------------------------------------------------------------------- NRRD
NRRD_TYPE_BYTES = {}
for _names, _n in (
    (("signed char", "int8", "int8_t", "uchar", "unsigned char", "uint8", "uint8_t"), 1),
    (("short", "short int", "signed short", "signed short int", "int16", "int16_t", "ushort", "unsigned short",
      "unsigned short int", "uint16", "uint16_t"), 2),
    (("int", "signed int", "int32", "int32_t", "uint", "unsigned int", "uint32", "uint32_t", "float"), 4),
    (("longlong", "long long", "long long int", "signed long long", "signed long long int", "int64", "int64_t",
      "ulonglong", "unsigned long long", "unsigned long long int", "uint64", "uint64_t", "double"), 8),
):
    NRRD_TYPE_BYTES.update(dict.fromkeys(_names, _n))
NRRD_ENCODINGS = {"raw": None, "gzip": "gzip", "gz": "gzip", "bzip2": "bzip2", "bz2": "bzip2"}


def _check_nrrd(path: Path, head: bytes, streams: bool) -> None:
    if not head.startswith(b"NRRD"):
        return
    fields: dict[str, str] = {}
    attached_offset = None
    with open(path, "rb") as fh:
        fh.readline()  # NRRD000x
        while True:
            line = fh.readline(65536)
            if not line:
                break  # end of a detached header
            text = line.decode("latin-1").rstrip("\r\n")
            if not text.strip():
                attached_offset = fh.tell()
                break
            if text.startswith("#") or ":=" in text:
                continue
            key, sep, value = text.partition(":")
            if sep:
                fields[key.strip().lower().replace(" ", "")] = value.strip()
    encoding = fields.get("encoding", "").lower()
    kind = NRRD_ENCODINGS.get(encoding, "skip")
    ntype = " ".join(fields.get("type", "").lower().split())
    try:
        sizes = [int(v) for v in fields.get("sizes", "").split()]
        line_skip = int(fields.get("lineskip", "0"))
        byte_skip = int(fields.get("byteskip", "0"))
        block = int(fields.get("blocksize", "0"))
    except ValueError:
        return
    item = block if ntype == "block" else NRRD_TYPE_BYTES.get(ntype)
    if kind == "skip" or not item or not sizes or any(s <= 0 for s in sizes):
        return
    promised = item
    for s in sizes:
        promised *= s
    target = fields.get("datafile")
    if target is None:
        if attached_offset is None:
            raise Broken("the NRRD header ends before its data")
        data_file, offset = path, attached_offset
    elif target.upper().startswith("LIST") or len(target.split()) > 1 or "%" in target:
        return  # one file per slice: left to SimpleITK
    else:
        data_file, offset = (Path(target) if os.path.isabs(target) else path.parent / target), 0
    if not data_file.is_file():
        raise DiffTumorError(f"{data_file}: data file named in the NRRD header {path} does not exist")
    if line_skip > 0:
        with open(data_file, "rb") as fh:
            fh.seek(offset)
            for _ in range(line_skip):
                if not fh.readline():
                    break
            offset = fh.tell()
    if kind is None:
        if byte_skip == -1:
            _need(promised, data_file.stat().st_size, "NRRD header")
            return
        offset += max(0, byte_skip)
    else:
        promised += max(0, byte_skip)  # compressed: bytes are skipped after decompression
    _check_part(data_file, offset, kind, promised, header=path, what="NRRD header", streams=streams)


# ---------------------------------------------------------------------------------------- DICOM
_LONG_VRS = {b"OB", b"OD", b"OF", b"OL", b"OV", b"OW", b"SQ", b"SV", b"UC", b"UN", b"UR", b"UT", b"UV"}
_DEFLATED = "1.2.840.10008.1.2.1.99"
_BIG_ENDIAN = "1.2.840.10008.1.2.2"
_IMPLICIT = "1.2.840.10008.1.2"
_NATIVE = {"1.2.840.10008.1.2", "1.2.840.10008.1.2.1", "1.2.840.10008.1.2.2"}
_WANTED = {(0x0028, 0x0002): "samples", (0x0028, 0x0008): "frames", (0x0028, 0x0010): "rows",
           (0x0028, 0x0011): "columns", (0x0028, 0x0100): "bits", (0x0002, 0x0010): "syntax",
           (0x0020, 0x000E): "series"}


def check_dicom_files(files, *, others=()) -> None:
    """Raise :class:`DiffTumorError` naming the first DICOM file of the series ``files`` whose pixel data is cut
    short. ``others``: the other files of the series' folder; GDCM leaves a slice it cannot parse out of the
    series (the volume then silently lacks it), so one of them that is cut short, or that belongs to this
    series but holds no pixel data, is refused too."""
    uid = None
    for f in files:
        f = Path(f)
        values, reason = _dicom_state(f)
        if reason is not None:
            raise broken(f, reason)
        uid = uid or values.get("series")
    for f in others:
        f = Path(f)
        if not (f.suffix.lower() == ".dcm" or _has_preamble(f)):
            continue
        values, reason = _dicom_state(f)
        if reason is None:
            continue
        series = values.get("series")
        # a slice of this series, or a file cut before it names its series; not a DICOMDIR, a report or another
        # series' object without pixel data
        if (series is not None and series == uid) or (series is None and reason != NO_PIXEL_DATA):
            raise broken(f, f"{reason}; the series in {f.parent} would be read without it")


def _has_preamble(path: Path) -> bool:
    try:
        with open(path, "rb") as fh:
            fh.seek(128)
            return fh.read(4) == b"DICM"
    except OSError:
        return False


def _dicom_state(path: Path) -> tuple[dict, str | None]:
    """(values read, reason the file is broken or None)."""
    values: dict = {}
    try:
        _check_dicom(path, values)
    except Broken as exc:
        return values, str(exc)
    except OSError as exc:
        raise DiffTumorError(f"{path}: cannot read ({exc.strerror or exc})") from None
    return values, None


def _check_dicom(path: Path, values: dict) -> None:
    size = path.stat().st_size
    if size == 0:
        raise Broken("the file is empty (0 bytes)")
    with open(path, "rb") as fh:
        buf = fh.read(min(size, 1 << 18))
    try:
        found = _walk_dicom(buf, size, values)
    except _NeedMore:
        with open(path, "rb") as fh:
            buf = fh.read()
        try:
            found = _walk_dicom(buf, size, values)
        except _NeedMore:
            raise Broken("the file ends inside its header") from None
    if found is None:
        return  # not a layout we check (e.g. deflated)
    pixel_pos, pixel_len = found
    if pixel_pos is None:
        raise Broken(NO_PIXEL_DATA)
    if pixel_len is None:  # encapsulated (compressed) fragments: walk the items to the sequence delimiter
        _walk_fragments(path, pixel_pos, size, "<" if values.get("syntax") != _BIG_ENDIAN else ">")
        return
    if pixel_pos + pixel_len > size:
        raise Broken(f"the pixel data ends early (the file holds {size - pixel_pos:,} of the {pixel_len:,} bytes "
                     "its pixel data element promises)")
    try:
        rows, cols = int(values["rows"]), int(values["columns"])
        bits = int(values.get("bits", 16))
        samples = int(values.get("samples", 1))
        frames = int(str(values.get("frames", "1")).strip() or 1)
    except (KeyError, ValueError):
        return
    expected = (rows * cols * frames * samples * bits + 7) // 8
    if values.get("syntax", "") in _NATIVE and values.get("pixel_tag") == 0x0010 and pixel_len < expected:
        raise Broken(f"the pixel data is short ({pixel_len:,} of the {expected:,} bytes {rows} x {cols} x {frames} "
                     f"frame(s) x {bits} bits need)")


class _NeedMore(Exception):
    pass


NO_PIXEL_DATA = "the file holds no pixel data (cut before it?)"


def _walk_fragments(path: Path, pos: int, size: int, e: str) -> None:
    """Encapsulated pixel data from ``pos``: items (FFFE,E000) of defined length up to the sequence delimiter
    (FFFE,E0DD); one running past the end of the file, or no delimiter, is a cut file."""
    with open(path, "rb") as fh:
        while True:
            fh.seek(pos)
            head = fh.read(8)
            if len(head) < 8:
                raise Broken("the compressed pixel data ends early (no end-of-sequence marker)")
            group, elem, length = struct.unpack(e + "HHI", head)
            if group != 0xFFFE:
                raise Broken("the compressed pixel data is damaged (not a sequence of fragments)")
            if elem == 0xE0DD:
                return
            pos += 8 + length
            if length == 0xFFFFFFFF or pos > size:
                raise Broken("the compressed pixel data ends early (a fragment runs past the end of the file)")


def _walk_dicom(buf: bytes, size: int, values: dict):
    """Walk the top-level elements to the pixel data, filling ``values``: (pixel data position | None,
    length | None for undefined), or None for a layout not checked."""
    pos = 132 if buf[128:132] == b"DICM" else 0
    explicit, little = True, True
    meta_done = pos == 0
    if pos == 0:  # no preamble: guess implicit little endian (the default transfer syntax)
        explicit = len(buf) > 6 and buf[4:6].isalpha() and buf[4:6].isupper()
    while True:
        if pos + 8 > len(buf):
            if len(buf) < size:
                raise _NeedMore
            return None, None
        e = "<" if little or (buf[pos : pos + 2] == b"\x02\x00") else ">"
        group, elem = struct.unpack(e + "HH", buf[pos : pos + 4])
        if not meta_done and group != 0x0002:
            meta_done = True
            syntax = str(values.get("syntax", "")).strip("\0 ")
            values["syntax"] = syntax
            if syntax == _DEFLATED:
                return None
            explicit, little = syntax != _IMPLICIT, syntax != _BIG_ENDIAN
            e = "<" if little else ">"
            group, elem = struct.unpack(e + "HH", buf[pos : pos + 4])
        use_explicit = explicit or group == 0x0002
        vr = buf[pos + 4 : pos + 6]
        if use_explicit and vr.isalpha():
            if vr in _LONG_VRS:
                if pos + 12 > len(buf):
                    raise _NeedMore if len(buf) < size else Broken("the file ends inside its header")
                (length,) = struct.unpack(e + "I", buf[pos + 8 : pos + 12])
                start = pos + 12
            else:
                (length,) = struct.unpack(e + "H", buf[pos + 6 : pos + 8])
                start = pos + 8
        else:
            (length,) = struct.unpack(e + "I", buf[pos + 4 : pos + 8])
            start = pos + 8
        if group == 0x7FE0 and elem in (0x0008, 0x0009, 0x0010):  # (float / double / integer) pixel data
            values["pixel_tag"] = elem
            return start, None if length == 0xFFFFFFFF else length
        if length == 0xFFFFFFFF:
            pos = _skip_undefined(buf, start, size, use_explicit, e)
            continue
        end = start + length
        name = _WANTED.get((group, elem))
        if name is not None:
            if end > len(buf):
                raise _NeedMore if len(buf) < size else Broken("the file ends inside its header")
            raw = buf[start:end]
            if name in ("syntax", "frames", "series"):
                values[name] = raw.decode("ascii", "replace").strip("\0 ")
            elif length >= 2:
                values[name] = struct.unpack(e + "H", raw[:2])[0]
        if end > size:
            raise Broken("the file ends inside its header")
        if end > len(buf):
            raise _NeedMore
        pos = end


def _skip_undefined(buf: bytes, pos: int, size: int, explicit: bool, e: str) -> int:
    """Position after an undefined-length sequence starting at ``pos`` (its items, up to its delimiter)."""
    depth = 1
    while depth:
        if pos + 8 > len(buf):
            raise _NeedMore if len(buf) < size else Broken("the file ends inside a sequence of its header")
        group, elem = struct.unpack(e + "HH", buf[pos : pos + 4])
        if group == 0xFFFE:  # item / item delimiter / sequence delimiter: tag + 4-byte length
            (length,) = struct.unpack(e + "I", buf[pos + 4 : pos + 8])
            if elem == 0xE0DD or elem == 0xE00D:  # sequence / item delimitation
                pos += 8
                if elem == 0xE0DD:
                    depth -= 1
                continue
            pos += 8  # an item: its elements follow (undefined length) or we skip it whole
            if length != 0xFFFFFFFF:
                pos += length
            continue
        vr = buf[pos + 4 : pos + 6]
        if explicit and vr.isalpha():
            if vr in _LONG_VRS:
                (length,) = struct.unpack(e + "I", buf[pos + 8 : pos + 12])
                pos += 12
            else:
                (length,) = struct.unpack(e + "H", buf[pos + 6 : pos + 8])
                pos += 8
        else:
            (length,) = struct.unpack(e + "I", buf[pos + 4 : pos + 8])
            pos += 8
        if length == 0xFFFFFFFF:
            depth += 1  # a nested sequence: its items follow
        else:
            pos += length
    return pos
