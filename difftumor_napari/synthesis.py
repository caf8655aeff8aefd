"""Synthesis as a Qt-free task: request -> generator of progress -> outcome; saving; messages.

The "Synthesis" widget (``_qt/synthesis_widget.py``) builds a :class:`SynthesisJob` (the layers' arrays + a
:class:`backend.synthesis.request.SynthesisRequest`, :func:`build_job`) from its layers and
runs :func:`synthesis_steps` in a napari ``thread_worker`` (or, with ``DIFFTUMOR_NAPARI_NOTHREADS=1``
and in scripts, through :func:`run_sync`). The generator yields ``(message, done, total)`` from the
engine (:meth:`backend.synthesis.engine.SynthesisEngine.iter_run`) and returns a
:class:`SynthesisOutcome`. Nothing here touches Qt.

Arrays are on the napari display grid (the reader's LPS grid, (z, y, x)); :func:`save_outcome`
writes them back onto the file's ORIGINAL grid, orientation and dtype with the writer of every
synthesis output (:mod:`backend.synthesis.outputs`).
"""

from __future__ import annotations

import os
import threading
from collections.abc import Generator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from backend.errors import DiffTumorError

if TYPE_CHECKING:
    from backend.synthesis.request import SynthesisRequest

NOTHREADS_ENV = "DIFFTUMOR_NAPARI_NOTHREADS"
METHODS = ("auto", "diffusion", "model-based")
DEVICES = ("auto", "cuda", "mps", "cpu")
STAGES = ("auto", "early", "mid_late")

Progress = tuple[str, int, int]


def threads_disabled() -> bool:
    """True when ``DIFFTUMOR_NAPARI_NOTHREADS`` asks for synchronous runs (tests, debugging)."""
    return os.environ.get(NOTHREADS_ENV, "").strip().lower() in ("1", "true", "yes", "on")


def user_message(exc: BaseException, what: str) -> str:
    """One clear sentence for a notification: user errors verbatim, out-of-memory with a remedy."""
    if isinstance(exc, DiffTumorError):
        return str(exc)
    if isinstance(exc, MemoryError):
        return f"{what}: ran out of memory; close other layers or crop the CT, then try again (nothing was changed)"
    try:
        from backend.device import is_oom

        if is_oom(exc):
            return f"{what}: ran out of GPU memory; choose device 'cpu' and run again (nothing was changed)"
    except ImportError:  # torch absent: cannot be a torch OOM
        pass
    text = " ".join(str(exc).split()) or type(exc).__name__
    return f"{what} failed ({type(exc).__name__}: {text[:300]})"


# --------------------------------------------------------------------------------------------
# method choice
# --------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class MethodStatus:
    method: str  # the method that will run: "diffusion" or "model-based"
    reason: str  # one sentence for the widget


def _stage_words(stages: Sequence[str], steps: int | None) -> str:
    """'early tumour: T = 4' / 'mid/late tumour: 50 DDIM steps' for the method line."""
    parts = []
    for st in sorted(set(stages)):
        if st == "early":
            parts.append("early tumour: T = 4 model, 4 steps")
        else:
            parts.append(f"mid/late tumour: T = 200 model, {int(steps or 50)} DDIM steps")
    return "; ".join(parts)


def method_status(requested: str, organ: str, stages: Sequence[str], weights_dir: str | os.PathLike | None,
                  device: str = "cpu", *, weights_organ: str | None = None, steps: int | None = None) -> MethodStatus:
    """Which method runs and why, as the engine will decide it (:func:`backend.synthesis.engine.choose_method`:
    diffusion needs the weights of ``weights_organ`` (default ``organ``) for every stage in ``stages``).

    ``requested`` "auto" picks diffusion when the weights are there, model-based otherwise;
    "diffusion" without weights is a user error (raised); "model-based" always runs. Only the weights
    folder's listing is read (no engine, no network is built).
    """
    from backend.synthesis.engine import missing_weights
    from backend.weights import WeightsFolder, diffusion_name

    if requested not in METHODS:
        raise DiffTumorError(f"method '{requested}': choose one of {', '.join(METHODS)}")
    if requested == "model-based":
        return MethodStatus("model-based", "Model-based synthesis (chosen; needs no weights)")
    model_organ = weights_organ or organ
    if weights_dir and not Path(weights_dir).expanduser().is_dir():  # the widget's words, not the CLI's '--weights'
        raise DiffTumorError(f"Weights folder {weights_dir}: no such folder; choose the folder with the DiffTumor "
                             "weights under Weights, or method 'model-based'")
    weights = WeightsFolder.find(weights_dir or None)
    missing = missing_weights(weights, model_organ, stages)
    why = None if missing is None else missing[1]
    if weights.root is None:  # say it in the widget's words, not the command line's
        why = "no weights folder yet; choose the folder with the DiffTumor weights under Weights to run diffusion"
    if why is None:
        files = ", ".join(diffusion_name(model_organ, st) for st in sorted(set(stages)))
        cross = f" ({model_organ} model painting {organ} tumours)" if model_organ != organ else ""
        return MethodStatus("diffusion", f"DiffTumor diffusion{cross} — {_stage_words(stages, steps)} "
                                         f"({files} in {weights.root})")
    if requested == "diffusion":
        raise DiffTumorError(f"diffusion: {why}; choose the weights folder or method 'model-based'")
    return MethodStatus("model-based", f"Model-based synthesis: {why}")


# --------------------------------------------------------------------------------------------
# the task
# --------------------------------------------------------------------------------------------
@dataclass
class SynthesisJob:
    """One run of the widget: the layers' arrays on the display grid and the library's request."""

    ct: np.ndarray  # (z, y, x) HU
    geometry: Any  # backend.io.Geometry of that grid
    organ_mask: np.ndarray  # bool
    tumor_mask: np.ndarray  # bool or ids (non-zero = tumour)
    request: SynthesisRequest  # what to synthesize (backend.synthesis.request)
    device: str = "auto"
    weights_dir: str | None = None
    placements: list[dict] = field(default_factory=list)
    source: str | None = None  # file the CT came from (provenance)
    existing_tumor: np.ndarray | None = None  # tumours already labelled (kept as tumour, never painted over)

    def __post_init__(self):
        if self.device not in DEVICES:
            raise ValueError(f"device {self.device!r} is not one of {', '.join(DEVICES)}")

    @property
    def organ(self) -> str:
        return self.request.organ

    def settings(self) -> dict:
        """The request's settings plus the widget's own (device, weights folder): the provenance's ``settings``."""
        return {**self.request.settings(), "device": self.device, "weights": self.weights_dir}


def build_job(*, ct, geometry, organ_mask, tumor_mask, organ: str, method: str = "auto", device: str = "auto",
              stage: str = "auto", steps: int | None = None, seed: int = 0, weights_dir: str | None = None,
              placements=(), source: str | None = None, keep_intermediates: bool = True, existing_tumor=None,
              weights_organ: str | None = None, sigma: float | None = None,
              pancreas_blend: bool = False, mass_effect: str = "auto", phase: str | None = None) -> SynthesisJob:
    """The widget's values -> a :class:`SynthesisJob` (its request checked by
    :class:`~backend.synthesis.request.SynthesisRequest`). ``stage`` "auto" lets the engine choose from each
    tumour's size; ``steps`` are the DDIM steps of mid/late tumours; ``weights_organ`` None or ``organ`` means
    the organ's own weights; ``keep_intermediates`` (diffusion) feeds the Inspection widget; ``mass_effect`` is
    the request's (auto | on | off); ``phase`` (model-based contrast: non-contrast | enhanced; None or "auto": told
    from the organ's HU)."""
    from backend.synthesis.request import SynthesisRequest, UserMask

    if stage not in STAGES:
        raise ValueError(f"stage {stage!r} is not one of {', '.join(STAGES)}")
    tumor = np.asarray(tumor_mask) > 0
    request = SynthesisRequest(
        organ=organ, tumor=UserMask(tumor), method=method, seed=int(seed),
        stage=None if stage == "auto" else stage, ddim_steps=int(steps) if steps else None,
        sigma=None if sigma is None else float(sigma), pancreas_blend=bool(pancreas_blend),
        keep_intermediates=bool(keep_intermediates), mass_effect=mass_effect,
        phase=None if phase in (None, "auto") else phase,
        weights_organ=weights_organ if weights_organ and weights_organ != organ else None)
    return SynthesisJob(np.asarray(ct), geometry, np.asarray(organ_mask, bool), tumor, request, device, weights_dir,
                        list(placements), source, None if existing_tumor is None else np.asarray(existing_tumor, bool))


@dataclass
class SynthesisOutcome:
    """The engine's result on the display grid, plus the job it answers."""

    ct: np.ndarray
    label: np.ndarray
    tumor_mask: np.ndarray
    provenance: dict
    intermediates: dict[str, np.ndarray]
    request: SynthesisJob


_ENGINES: dict = {}  # (weights folder, device, folder listing) -> SynthesisEngine; the last one only


def _folder_signature(folder) -> tuple:
    """Names, sizes and mtimes of a weights folder's files: a changed file means a fresh engine."""
    if not folder or not Path(folder).is_dir():
        return ()
    return tuple(sorted((p.name, p.stat().st_size, p.stat().st_mtime_ns) for p in Path(folder).iterdir() if p.is_file()))


_ENGINE_LOCK = threading.Lock()  # the warm-up thread and a run may ask at the same time


def shared_engine(weights_dir, device: str):
    """One engine kept between runs, so its loaded networks and per-CT cache serve the next tumour."""
    from backend.synthesis.engine import SynthesisEngine
    from backend.weights import resolve_weights_dir

    with _ENGINE_LOCK:
        folder = weights_dir or resolve_weights_dir()[0]  # None: $DIFFTUMOR_WEIGHTS / user config, as the engine does
        key = (str(weights_dir or ""), str(folder or ""), device, _folder_signature(folder))
        if key not in _ENGINES:
            _ENGINES.clear()  # one set of networks in memory at a time
            _ENGINES[key] = SynthesisEngine(weights_dir=weights_dir, device=device)
        return _ENGINES[key]


def warm_engine(weights_dir, device: str) -> None:
    """Worker (a background thread; must not touch Qt): make the shared engine before the first Synthesize
    click, so that click does not wait for torch to be imported (~1.3 s on the 2-core machine, most of a
    model-based run). A failure here is only logged: the run that needs the engine reports it to the user."""
    import logging

    try:
        shared_engine(weights_dir, device)
    except Exception as exc:  # noqa: BLE001 - reported by the run itself
        logging.getLogger(__name__).debug("engine warm-up failed: %s", exc)


def engine_generator(job: SynthesisJob):
    """The engine's ``iter_run`` generator for ``job`` (imports torch/backend lazily).

    The engine is shared between runs (:func:`shared_engine`): a second tumour reuses the loaded
    networks and the engine's per-CT cache.
    """
    from backend.io import Volume

    engine = shared_engine(job.weights_dir, job.device)
    return engine.iter_run(job.request, Volume(job.ct, job.geometry), job.organ_mask, existing_tumor=job.existing_tumor)


def synthesis_steps(job: SynthesisJob, *, cancel: threading.Event | None = None,
                    make_generator=engine_generator) -> Generator[Progress, None, SynthesisOutcome]:
    """Run the engine, yielding ``(message, done, total)``; returns a :class:`SynthesisOutcome`.

    Worker function: must not touch Qt. ``cancel`` (set from the GUI thread) stops the run at the
    next step with :class:`DiffTumorError`; a napari worker's ``quit()`` stops it at the next yield.
    """
    if not np.asarray(job.tumor_mask).any():
        raise DiffTumorError("tumour mask: it is empty; place a tumour (Tumor placement widget) or paint one first")
    if not np.asarray(job.organ_mask).any():
        raise DiffTumorError(f"{job.organ}: the organ mask is empty; choose the organ label layer and organ")
    yield ("preparing", 0, 1)
    gen = make_generator(job)
    while True:
        if cancel is not None and cancel.is_set():
            gen.close()
            raise DiffTumorError("synthesis: cancelled by the user (nothing was changed)")
        try:
            message, done, total = next(gen)
        except StopIteration as stop:
            result = stop.value
            break
        yield (str(message), int(done), int(total))
    prov = dict(getattr(result, "provenance", {}) or {})
    prov.setdefault("seed", int(job.request.seed))
    prov["placements"] = job.placements
    prov.setdefault("organ", job.organ)
    inter = dict(getattr(result, "intermediates", None) or prov.pop("intermediates", None) or {})
    ct = result.ct.array if hasattr(result.ct, "array") else np.asarray(result.ct)
    return SynthesisOutcome(ct, np.asarray(result.label), np.asarray(result.tumor_mask), prov, inter, job)


# --------------------------------------------------------------------------------------------
# saving
# --------------------------------------------------------------------------------------------
def free_stem(folder, stem: str) -> str:
    """``stem`` if none of its files exist in ``folder``, else the first free ``stem_2``, ``stem_3``, ..."""
    from backend.synthesis.outputs import free_stem as free

    return free(folder, stem)


def provenance_record(outcome: SynthesisOutcome) -> dict:
    """The provenance written beside the images, in the format of every synthesis output
    (:func:`backend.synthesis.outputs.provenance`; docs/synthesis.md)."""
    from backend.synthesis.outputs import provenance

    job = outcome.request
    extra = {k: v for k, v in outcome.provenance.items() if k == "placements"}
    return provenance(outcome.provenance, settings=job.settings(), inputs={"ct": job.source}, **extra)


def save_outcome(outcome: SynthesisOutcome, folder, stem: str, ct_metadata: dict, *,
                 scale: Sequence[float], translate: Sequence[float]) -> dict[str, Path]:
    """Write ``<stem>_ct.nii.gz``, ``<stem>_label.nii.gz`` (0/1/2 label) and ``<stem>_provenance.json``.

    The layers are brought back to the CT file's original grid, orientation and dtype
    (:func:`difftumor_napari._writer.layer_volume`; HU rounded back to int16 when the source was int16)
    and written by :func:`backend.synthesis.outputs.write_output`, the writer of the command line. A missing
    folder is created; existing files are never replaced (the caller picks another stem, see
    :func:`free_stem`); the files appear together (staging folder), the provenance last.
    """
    from backend.synthesis.outputs import write_output
    from difftumor_napari._writer import layer_volume

    folder = Path(folder)
    try:
        folder.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise DiffTumorError(f"{folder}: cannot create the output folder ({exc.strerror or exc})") from None
    meta = {"name": stem, "metadata": ct_metadata, "scale": tuple(scale), "translate": tuple(translate)}
    info = dict((ct_metadata or {}).get("difftumor", {}))
    ct = outcome.ct
    if np.issubdtype(np.dtype(info.get("dtype", ct.dtype)), np.integer) and not np.issubdtype(ct.dtype, np.integer):
        ct = np.rint(ct)
    label_meta = {**meta, "metadata": {"difftumor": {**info, "dtype": "uint8"}}} if info else meta
    images = {"ct": layer_volume(ct, meta, labels=False, target=folder / f"{stem}_ct.nii.gz"),
              "label": layer_volume(np.asarray(outcome.label).astype(np.uint8), label_meta, labels=True,
                                    target=folder / f"{stem}_label.nii.gz")}
    return write_output(folder, images, provenance_record(outcome), stem=stem, replace=False)


def default_save_folder(source: str | None) -> Path:
    """Where results are saved unless the user picks a folder: ``difftumor_results`` next to the CT file
    (its folder for a DICOM series) when that folder is writable, else ``DiffTumor`` in the user's
    documents (home when there is no Documents folder); never inside the installed package."""
    package = Path(__file__).resolve().parent.parent
    if source:
        folder = Path(source).expanduser().resolve()
        folder = folder if folder.is_dir() else folder.parent
        inside_package = folder == package or package in folder.parents
        if folder.is_dir() and os.access(folder, os.W_OK | os.X_OK) and not inside_package:
            return folder / "difftumor_results"
    home = Path.home()
    documents = home / "Documents"
    return (documents if documents.is_dir() else home) / "DiffTumor"
