"""Is each file of a DICOM series complete? The DICOM part of :mod:`backend.integrity`.

GDCM (inside SimpleITK) reads a slice whose pixel data is cut short without a word, and leaves a slice it
cannot parse out of the series. :func:`check_dicom_files` walks each file's top-level elements to the pixel
data element (explicit/implicit VR, little/big endian; encapsulated fragments up to their delimiter) and
compares its length with rows x columns x frames x samples x bits and with the file's size. Deflated files
are left to SimpleITK.
"""

from __future__ import annotations

import struct
from pathlib import Path

from backend.errors import DiffTumorError
from backend.integrity import Broken, broken

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
