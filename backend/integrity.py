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
  pixel data element against rows x columns x frames x samples x bits, and against the file's size;
  :func:`backend.integrity_dicom.check_dicom_files`).

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


def _nifti_endian(header: bytes) -> tuple[str, int] | None:
    """(struct byte-order prefix, sizeof_hdr) of a NIfTI-1 (348) or NIfTI-2 (540) header; None if neither."""
    for endian in "<>":
        (sizeof_hdr,) = struct.unpack(endian + "i", header[:4])
        if sizeof_hdr in (348, 540):
            return endian, sizeof_hdr
    return None


def nifti_layout(header: bytes):
    """(numpy dtype, dims, vox_offset, slope, inter) of a NIfTI-1/2 header, or None (not NIfTI, or a type that is
    not a plain scalar)."""
    if len(header) < 348 or (found := _nifti_endian(header)) is None:
        return None
    endian, sizeof_hdr = found
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
    if (found := _nifti_endian(header)) is None:
        return None
    endian, sizeof_hdr = found
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
