"""Writing synthesis results: one writer, one provenance format, resume checks for dataset runs.

    prov = provenance(result, settings=request.settings(), inputs={"ct": "/data/ct.nii.gz"})
    write_output(out_dir, result_images(result), prov)                # out/ct.nii.gz, label.nii.gz, provenance.json
    write_output(folder, images, prov, stem="case1", replace=False)   # folder/case1_ct.nii.gz, case1_label.nii.gz, ...

Used by ``difftumor synthesize`` (one CT and dataset mode) and the napari "Synthesis" widget (Save).

* **Atomic**: an output is assembled in a hidden staging folder (:data:`STAGING`) and then published:
  renamed into place when the output folder is new (it appears whole or not at all), else its files are
  moved in one by one, the provenance last. A killed run leaves only the staging folder, which the next
  write of the same output removes. On any failure what this call wrote is removed again.
* **Provenance last**: ``provenance.json`` marks a finished output; :func:`output_done` (resume) checks it
  and every file it lists.
* **Never replaces what it did not make**: with ``replace=False`` (the widget) an existing file is refused;
  :func:`free_stem` offers the next free stem.
* **Errors** name the output folder in the caller's words: ``names`` maps an option name (``"out"``, the
  settings' keys) to the front end's label (default: plain words, see
  :data:`backend.synthesis.request.OPTION_NAMES`; the CLI passes its flags).

Provenance format (docs/synthesis.md): the engine's provenance (method and why, organ, weights, seed,
version, device, mask, tumours per crop, timings) plus ``settings`` (the request and the front end's own
settings), ``inputs`` (the files read), ``files`` (what this output holds), ``intermediates`` (when
written) and ``created`` (UTC time).
"""

from __future__ import annotations

import json
import os
import shutil
from collections.abc import Callable
from datetime import datetime, timezone
from pathlib import Path

import numpy as np

from backend.synthesis.request import OPTION_NAMES, OptionError, show

RUN_FILE = "difftumor_synthesize.json"  # dataset mode: the settings the folder's outputs were made with
OUTPUT_FILES = ("ct.nii.gz", "label.nii.gz", "provenance.json")  # provenance last: it marks a finished output
STAGING = ".difftumor-partial"  # an output being written; a killed run leaves only this

Names = Callable[[str], str]


def plain_names(option: str) -> str:
    return OPTION_NAMES.get(option, option)


def file_name(key: str, stem: str | None = None) -> str:
    """``ct`` -> ``ct.nii.gz`` (or ``<stem>_ct.nii.gz``); ``provenance`` -> ``provenance.json``; an intermediate
    key (``decoded``) -> ``decoded.nii.gz``."""
    name = f"{key}.json" if key == "provenance" else f"{key}.nii.gz"
    return f"{stem}_{name}" if stem else name


def output_paths(folder, stem: str | None = None) -> list[Path]:
    """The CT, label and provenance files of one output."""
    return [Path(folder) / file_name(k, stem) for k in ("ct", "label", "provenance")]


def free_stem(folder, stem: str) -> str:
    """``stem`` if none of its files exist in ``folder``, else the first free ``stem_2``, ``stem_3``, ..."""
    k, candidate = 1, stem
    while any(p.exists() for p in output_paths(folder, candidate)):
        k += 1
        candidate = f"{stem}_{k}"
    return candidate


# --------------------------------------------------------------------------------------------
# provenance
# --------------------------------------------------------------------------------------------
def result_images(result, *, intermediates: bool = True) -> dict:
    """``{"ct": Volume, "label": Volume, <intermediate>: (array, geometry)}`` of an engine result."""
    images = {"ct": result.ct, "label": result.label_volume()}
    if intermediates:
        images.update({k: (vol, result.ct.geometry) for k, vol in result.intermediates.items()})
    return images


def provenance(result_provenance: dict, *, settings: dict, inputs: dict, intermediates=None, **extra) -> dict:
    """The provenance of one output: the engine's, then ``settings``, ``inputs``, the descriptions of the
    ``intermediates`` written (keys of :data:`backend.synthesis.engine.INTERMEDIATES`; None: not asked for, so
    no entry) and ``extra`` fields of the front end (the CLI's ``organ_label``, the widget's ``placements``)."""
    prov = dict(result_provenance)
    prov.update(extra)
    prov["inputs"] = inputs
    prov["settings"] = settings
    if intermediates is not None:
        from backend.synthesis.engine import INTERMEDIATES

        prov["intermediates"] = {file_name(k): INTERMEDIATES[k] for k in intermediates}
    return prov


def _json_default(o):
    if isinstance(o, np.generic):
        return o.item()
    if isinstance(o, np.ndarray):
        return o.tolist()
    if isinstance(o, (tuple, set)):
        return list(o)
    return str(o)


def provenance_text(prov: dict) -> str:
    return json.dumps(prov, indent=1, default=_json_default)


# --------------------------------------------------------------------------------------------
# the writer
# --------------------------------------------------------------------------------------------
def _staging(out_dir: Path, stem: str | None) -> Path:
    if stem:
        return out_dir / f".{stem}{STAGING}"
    if out_dir.is_dir():
        return out_dir / STAGING
    return out_dir.parent / f".{out_dir.name}{STAGING}"


def write_output(out_dir, images: dict, prov: dict, *, stem: str | None = None, replace: bool = True,
                 names: Names = plain_names) -> dict[str, Path]:
    """Write ``images`` (key -> Volume or (array, geometry); keys ``ct``, ``label`` and intermediates) and the
    provenance (with ``files`` and ``created`` added) as one output in ``out_dir``; returns key -> path.

    ``replace`` False refuses when any file of the output exists (nothing is written). With ``replace`` True
    and no ``stem`` (the CLI's output folder) the intermediates of a replaced output that this one lacks are
    removed. See the module docstring for staging and failures.
    """
    from backend.io import write_image, write_text_atomic

    out_dir = Path(out_dir)
    targets = {k: out_dir / file_name(k, stem) for k in (*images, "provenance")}
    if not replace:
        taken = [p for p in targets.values() if p.exists()]
        if taken:
            from backend.errors import DiffTumorError

            raise DiffTumorError(f"{taken[0]}: already exists; nothing was overwritten (choose another file name stem)")
    prov = {**prov, "files": {k: p.name for k, p in targets.items() if k != "provenance"},
            "created": datetime.now(timezone.utc).isoformat(timespec="seconds")}
    made = [d for d in (out_dir, *out_dir.parents) if not d.exists()][::-1]
    # a new output folder is the staging folder renamed; files with a stem go into the folder itself
    to_make = made[:-1] if (out_dir in made and not stem) else made
    stage = _staging(out_dir, stem)
    published: list[Path] = []
    try:
        for d in to_make:
            d.mkdir()
        if stage.exists():  # left by a run that was killed while writing this output
            shutil.rmtree(stage)
        stage.mkdir()
        for key, data in images.items():
            if isinstance(data, tuple):
                write_image(data[0], data[1], stage / targets[key].name)
            else:
                write_image(data, stage / targets[key].name)
        write_text_atomic(stage / targets["provenance"].name, provenance_text(prov))
        if stage.parent != out_dir:
            os.rename(stage, out_dir)  # a new output folder appears complete
        else:
            # the old provenance goes first: an output without one is unfinished (redone on resume)
            targets["provenance"].unlink(missing_ok=True)
            for p in targets.values():
                os.replace(stage / p.name, p)
                published.append(p)
            stage.rmdir()
    except BaseException as exc:
        shutil.rmtree(stage, ignore_errors=True)
        _undo(published, made)
        if isinstance(exc, OSError):
            raise _os_error(out_dir, exc, stage=stage, names=names) from None
        raise
    if replace and not stem:
        from backend.synthesis.engine import INTERMEDIATES

        for key in INTERMEDIATES:  # a replaced result's intermediates that this output does not have
            if key not in images:
                (out_dir / file_name(key)).unlink(missing_ok=True)
    return targets


def _undo(published: list[Path], made: list[Path]) -> None:
    for p in published:
        try:
            p.unlink(missing_ok=True)
        except OSError:  # pragma: no cover - the folder turned read-only under us
            pass
    for d in reversed(made):
        try:
            d.rmdir()
        except OSError:  # pragma: no cover - someone else wrote there meanwhile
            pass


def _os_error(out: Path, exc: OSError, *, stage: Path | None = None, names: Names = plain_names) -> OptionError:
    where = str(exc.filename) if getattr(exc, "filename", None) else str(out)
    if stage is not None and where.startswith(str(stage)):  # name the file as the user will see it
        where = str(out) + where[len(str(stage)):]
    from backend.io import error_reason

    what = "cannot write in it" if Path(where) == Path(out) else f"cannot write {where}"
    return OptionError("out", out, f"{what}: {error_reason(exc)}", label=names("out"))


# --------------------------------------------------------------------------------------------
# output folders: checks before a run, resume
# --------------------------------------------------------------------------------------------
def check_out_writable(out: Path, names: Names = plain_names) -> None:
    """``out`` must be a folder (or not exist yet) that we may create and write in."""
    out = Path(out)
    if out.exists() and not out.is_dir():
        raise OptionError("out", out, "is an existing file; give a folder", label=names("out"))
    base = out
    while not base.exists() and base.parent != base:
        base = base.parent
    if not base.is_dir():
        raise OptionError("out", out, f"{base} is a file, not a folder", label=names("out"))
    if not os.access(base, os.W_OK | os.X_OK):
        try:
            read_only = bool(os.statvfs(base).f_flag & os.ST_RDONLY)
        except (OSError, AttributeError):  # pragma: no cover - no statvfs (Windows)
            read_only = False
        why = "read-only file system" if read_only else "permission denied"
        where = "" if base == out else f" (in {base})"
        raise OptionError("out", out, f"cannot write here{where}: {why}", label=names("out"))


def start_dataset_run(out: Path, settings: dict, overwrite: bool, names: Names = plain_names) -> None:
    """Refuse a non-empty ``out`` made by another run (other settings, or not by ``difftumor synthesize``)
    unless ``overwrite``; then record ``settings`` in :data:`RUN_FILE` (atomically)."""
    from backend import __version__
    from backend.io import write_text_atomic

    out = Path(out)
    run_file = out / RUN_FILE
    # another shard starting at the same moment may have made the folder and be writing the run file
    # (a hidden temporary until it is complete): that folder counts as empty
    begun = out.is_dir() and any(not _run_file_temp(p.name) for p in out.iterdir())
    if begun and not overwrite:
        try:
            old = json.loads(run_file.read_text(encoding="utf-8"))["settings"]
        except (OSError, ValueError, KeyError, TypeError):
            raise OptionError("out", out, f"folder is not empty and holds no {RUN_FILE} from an earlier "
                              f"'difftumor synthesize' run; choose another {names('out')}, or {names('overwrite')}",
                              label=names("out")) from None
        for key in settings:
            if old.get(key) != settings[key]:
                raise OptionError("out", out, f"holds results made with {names(key)} {_shown(old.get(key))}, but "
                                  f"this run has {names(key)} {_shown(settings[key])}; choose another {names('out')}, "
                                  f"or {names('overwrite')} to redo them", label=names("out"))
    made = not out.exists()
    try:
        out.mkdir(parents=True, exist_ok=True)
        write_text_atomic(run_file, json.dumps({"command": "difftumor synthesize", "version": __version__,
                                                "settings": settings}, indent=1))
    except OSError as exc:
        if made and out.is_dir() and not any(out.iterdir()):
            out.rmdir()
        raise _os_error(out, exc, names=names) from None


def _shown(value) -> str:
    return "(not given)" if value is None else show(value)


def _run_file_temp(name: str) -> bool:
    """A temporary of :data:`RUN_FILE` while backend.io.write_text_atomic writes it."""
    return name.startswith(f".{RUN_FILE}.") and name.endswith(".tmp")


def output_done(dest: Path, settings: dict) -> bool:
    """All of the output's files exist and its provenance was written with these settings (resume)."""
    dest = Path(dest)
    try:
        prov = json.loads((dest / "provenance.json").read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return False
    if not isinstance(prov, dict) or prov.get("settings") != settings:
        return False
    names = [*OUTPUT_FILES, *(prov.get("intermediates") or {})]
    return all((dest / n).is_file() for n in names)


def check_single_out(out: Path, inputs: dict, overwrite: bool, names: Names = plain_names) -> None:
    """A non-empty ``out`` needs ``overwrite``, and never may an output replace one of the ``inputs``
    (option name -> path or None)."""
    from backend.synthesis.engine import INTERMEDIATES

    out = Path(out)
    if not out.is_dir():
        return
    present = sorted(p.name for p in out.iterdir() if p.name != STAGING)  # STAGING: a killed run's leftover
    if present and not overwrite:
        shown = ", ".join(present[:3]) + (", ..." if len(present) > 3 else "")
        raise OptionError("out", out, f"folder is not empty ({shown}); choose another {names('out')}, or "
                          f"{names('overwrite')} to replace the results there", label=names("out"))
    outputs = [out / n for n in (*OUTPUT_FILES, *(file_name(k) for k in INTERMEDIATES))]
    for option, value in inputs.items():
        if value and any(o.exists() and os.path.samefile(value, o) for o in outputs):
            raise OptionError(option, value, f"is one of the files {names('out')} {out} would replace; choose "
                              f"another {names('out')}", label=names(option))


def check_dataset_out(out: Path, inputs: dict, names: Names = plain_names) -> None:
    """Dataset mode: ``out`` may not be one of the input folders (option name -> folder). Its
    ``<case>_s<k>/ct.nii.gz`` outputs would be read as new cases by the next run of the same command, so
    that resuming fails (or synthesizes on synthetic CTs)."""
    out = Path(out)
    if not out.is_dir():
        return
    for option, folder in inputs.items():
        if os.path.samefile(folder, out):
            raise OptionError("out", out, f"is the {names(option)} folder; its outputs would be read as new cases "
                              f"by the next run; choose another {names('out')} (e.g. a folder beside it)",
                              label=names("out"))
