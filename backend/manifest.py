"""Which files in an output folder a command wrote: a small JSON manifest kept in that folder.

A command that reuses an output folder (``difftumor evaluate --out DIR`` run twice) may replace or remove
only the files it wrote there itself and that nobody changed since. :class:`OutputManifest` lists those
files with their size and SHA-256; anything else in the way is the user's, and the command refuses in
one line before writing anything (:meth:`OutputManifest.claim`).

The manifest is updated after each file is written (atomically), so an interrupted run leaves a
manifest that matches what is on disk, except for the one file being written at the moment of the
interruption: that file is listed nowhere and the next run refuses it (move it away by hand).
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Iterable
from pathlib import Path

from backend.errors import DiffTumorError

FORMAT = 1


def file_digest(path: Path) -> dict:
    """``{"size": bytes, "sha256": hex}`` of a file (read in 1 MiB chunks)."""
    h = hashlib.sha256()
    size = 0
    with open(path, "rb") as fh:
        while chunk := fh.read(1 << 20):
            h.update(chunk)
            size += len(chunk)
    return {"size": size, "sha256": h.hexdigest()}


class OutputManifest:
    """The files ``command`` wrote into ``folder`` (paths relative to it), in ``folder/name``."""

    def __init__(self, folder: Path, *, command: str, name: str):
        self.folder = Path(folder)
        self.command = command
        self.path = self.folder / name
        self.files: dict[str, dict] = {}
        if self.path.is_file():
            try:
                data = json.loads(self.path.read_text(encoding="utf-8"))
                files = data["files"]
                if not isinstance(files, dict):
                    raise TypeError("'files' is not a table")
                self.files = {str(k): dict(v) for k, v in files.items()}
            except (ValueError, KeyError, TypeError, AttributeError) as exc:
                raise DiffTumorError(
                    f"{self.path}: not a manifest of {command} ({exc}); move it away or choose another --out"
                ) from None

    def _key(self, path: Path) -> str:
        return Path(path).resolve().relative_to(self.folder.resolve()).as_posix()

    def owns(self, path: Path) -> bool:
        """True when ``path`` is listed and unchanged (same size and SHA-256) since it was written."""
        entry = self.files.get(self._key(path))
        if entry is None or not Path(path).is_file():
            return False
        if Path(path).stat().st_size != entry.get("size"):
            return False
        return file_digest(Path(path))["sha256"] == entry.get("sha256")

    def refusal(self, path: Path) -> DiffTumorError:
        return DiffTumorError(
            f"{path}: not written by {self.command} (not in {self.path}, or changed since); "
            "move it away or choose another --out"
        )

    def claim(self, paths: Iterable[Path]) -> None:
        """Refuse (one line naming the first one) when any existing path of ``paths`` is not ours."""
        for p in paths:
            p = Path(p)
            if p.is_dir() and not p.is_symlink():
                raise DiffTumorError(f"{p}: is a folder where {self.command} writes a file; move it away or choose another --out")
            if (p.exists() or p.is_symlink()) and not self.owns(p):
                raise self.refusal(p)

    def record(self, path: Path) -> None:
        """List ``path`` (just written) with its size and hash, and save the manifest."""
        self.files[self._key(path)] = file_digest(Path(path))
        self.save()

    def remove(self, path: Path) -> None:
        """Delete ``path`` if it is ours (checked by :meth:`claim` beforehand) and drop it from the list."""
        p = Path(path)
        if p.exists() and not self.owns(p):
            raise self.refusal(p)
        p.unlink(missing_ok=True)
        if self.files.pop(self._key(p), None) is not None:
            self.save()

    def save(self) -> None:
        from backend.io import write_text_atomic

        text = json.dumps({"format": FORMAT, "command": self.command, "files": dict(sorted(self.files.items()))},
                          indent=1)
        write_text_atomic(self.path, text + "\n")
