"""Synthesis as a Qt-free task: request -> generator of progress -> outcome; saving; messages.

The "Synthesis" widget (``_synthesis.py``) builds a :class:`SynthesisRequest` from its layers and
runs :func:`synthesis_steps` in a napari ``thread_worker`` (or, with ``DIFFTUMOR_NAPARI_NOTHREADS=1``
and in scripts, through :func:`run_sync`). The generator yields ``(message, done, total)`` from the
engine (:meth:`backend.synthesis.engine.SynthesisEngine.iter_synthesize`) and returns a
:class:`SynthesisOutcome`. Nothing here touches Qt.

Arrays are on the napari display grid (the reader's LPS grid, (z, y, x)); :func:`save_outcome`
writes them back onto the file's ORIGINAL grid, orientation and dtype through the plugin writer.
"""

from __future__ import annotations

import json
import os
import threading
from dataclasses import dataclass, field
from datetime import datetime, timezone
from pathlib import Path
from typing import Any, Generator, Sequence

import numpy as np

from backend.errors import DiffTumorError

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
    """Which method runs and why, as the engine will decide it (diffusion needs the weights of
    ``weights_organ`` (default ``organ``) for every stage in ``stages``).

    ``requested`` "auto" picks diffusion when the weights are there, model-based otherwise;
    "diffusion" without weights is a user error (raised); "model-based" always runs.
    """
    from backend.synthesis.engine import SynthesisEngine
    from backend.weights import diffusion_name

    if requested not in METHODS:
        raise DiffTumorError(f"method '{requested}': choose one of {', '.join(METHODS)}")
    if requested == "model-based":
        return MethodStatus("model-based", "Model-based synthesis (chosen; needs no weights)")
    model_organ = weights_organ or organ
    if weights_dir and not Path(weights_dir).expanduser().is_dir():  # the widget's words, not the CLI's '--weights'
        raise DiffTumorError(f"Weights folder {weights_dir}: no such folder; choose the folder with the DiffTumor "
                             "weights under Weights, or method 'model-based'")
    engine = SynthesisEngine(weights_dir=weights_dir or None, device=device)
    checks = [engine.diffusion_available(model_organ, st) for st in sorted(set(stages))]
    missing = [reason for ok, reason in checks if not ok]
    if engine.weights.root is None:  # say it in the widget's words, not the command line's
        missing = ["no weights folder yet; choose the folder with the DiffTumor weights under Weights "
                   "to run diffusion"]
    if not missing:
        files = ", ".join(diffusion_name(model_organ, st) for st in sorted(set(stages)))
        cross = f" ({model_organ} model painting {organ} tumours)" if model_organ != organ else ""
        return MethodStatus("diffusion", f"DiffTumor diffusion{cross} — {_stage_words(stages, steps)} "
                                         f"({files} in {engine.weights.root})")
    if requested == "diffusion":
        raise DiffTumorError(f"diffusion: {missing[0]}; choose the weights folder or method 'model-based'")
    return MethodStatus("model-based", f"Model-based synthesis: {missing[0]}")


# --------------------------------------------------------------------------------------------
# the task
# --------------------------------------------------------------------------------------------
@dataclass
class SynthesisRequest:
    """Everything one synthesis run needs, on the display grid."""

    ct: np.ndarray  # (z, y, x) HU
    geometry: Any  # backend.io.Geometry of that grid
    organ_mask: np.ndarray  # bool
    tumor_mask: np.ndarray  # bool or ids (non-zero = tumour)
    organ: str
    method: str = "auto"
    device: str = "auto"
    stage: str = "auto"
    steps: int | None = None  # sampling steps (None: the method's default)
    seed: int = 0
    weights_dir: str | None = None
    placements: list[dict] = field(default_factory=list)
    source: str | None = None  # file the CT came from (provenance)
    keep_intermediates: bool = True  # diffusion: masked / reconstruction / decoded volumes for Inspection
    existing_tumor: np.ndarray | None = None  # tumours already labelled (kept as tumour, never painted over)
    weights_organ: str | None = None  # diffusion: whose weights paint the tumours (None: ``organ``; cross-organ)
    sigma: float | None = None  # diffusion: blend blur in voxels (None: U(0, 4) per tumour, as released)
    pancreas_blend: bool = False  # diffusion, pancreas: blend like liver/kidney instead of replacing the crop

    def __post_init__(self):
        for name, allowed in (("method", METHODS), ("device", DEVICES), ("stage", STAGES)):
            value = getattr(self, name)
            if value not in allowed:
                raise ValueError(f"{name} {value!r} is not one of {', '.join(allowed)}")


@dataclass
class SynthesisOutcome:
    """The engine's result on the display grid, plus the request it answers."""

    ct: np.ndarray
    label: np.ndarray
    tumor_mask: np.ndarray
    provenance: dict
    intermediates: dict[str, np.ndarray]
    request: SynthesisRequest


_ENGINES: dict = {}  # (weights folder, device, folder listing) -> SynthesisEngine; the last one only


def _folder_signature(folder) -> tuple:
    """Names, sizes and mtimes of a weights folder's files: a changed file means a fresh engine."""
    if not folder or not Path(folder).is_dir():
        return ()
    return tuple(sorted((p.name, p.stat().st_size, p.stat().st_mtime_ns) for p in Path(folder).iterdir() if p.is_file()))


def shared_engine(weights_dir, device: str):
    """One engine kept between runs, so its loaded networks and per-CT cache serve the next tumour."""
    from backend.synthesis.engine import SynthesisEngine
    from backend.weights import resolve_weights_dir

    folder = weights_dir or resolve_weights_dir()[0]  # None: $DIFFTUMOR_WEIGHTS / user config, as the engine does
    key = (str(weights_dir or ""), str(folder or ""), device, _folder_signature(folder))
    if key not in _ENGINES:
        _ENGINES.clear()  # one set of networks in memory at a time
        _ENGINES[key] = SynthesisEngine(weights_dir=weights_dir, device=device)
    return _ENGINES[key]


def engine_generator(request: SynthesisRequest):
    """The engine's ``iter_synthesize`` generator for ``request`` (imports torch/backend lazily).

    The engine is shared between runs (:func:`shared_engine`): a second tumour reuses the loaded
    networks and the engine's per-CT cache.
    """
    from backend.io import Volume

    engine = shared_engine(request.weights_dir, request.device)
    kwargs = dict(organ=request.organ, method=request.method, seed=int(request.seed),
                  stage=None if request.stage == "auto" else request.stage)
    if request.keep_intermediates:
        kwargs["keep_intermediates"] = True  # one extra encode + decode per crop; ignored by model-based
    if request.steps:
        kwargs["ddim_steps"] = int(request.steps)  # mid/late DDIM steps; early tumours use the release's T = 4
    if request.existing_tumor is not None:
        kwargs["existing_tumor"] = np.asarray(request.existing_tumor, bool)
    if request.weights_organ and request.weights_organ != request.organ:
        kwargs["weights_organ"] = request.weights_organ  # the paper's cross-organ setting
    if request.sigma is not None:
        kwargs["sigma"] = float(request.sigma)
    if request.pancreas_blend:
        kwargs["pancreas_blend"] = True
    return engine.iter_synthesize(Volume(request.ct, request.geometry), np.asarray(request.organ_mask, bool),
                                  np.asarray(request.tumor_mask) > 0, **kwargs)


def synthesis_steps(request: SynthesisRequest, *, cancel: threading.Event | None = None,
                    make_generator=engine_generator) -> Generator[Progress, None, SynthesisOutcome]:
    """Run the engine, yielding ``(message, done, total)``; returns a :class:`SynthesisOutcome`.

    Worker function: must not touch Qt. ``cancel`` (set from the GUI thread) stops the run at the
    next step with :class:`DiffTumorError`; a napari worker's ``quit()`` stops it at the next yield.
    """
    if not np.asarray(request.tumor_mask).any():
        raise DiffTumorError("tumour mask: it is empty; place a tumour (Tumor placement widget) or paint one first")
    if not np.asarray(request.organ_mask).any():
        raise DiffTumorError(f"{request.organ}: the organ mask is empty; choose the organ label layer and organ")
    yield ("preparing", 0, 1)
    gen = make_generator(request)
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
    prov.setdefault("seed", int(request.seed))
    prov["placements"] = request.placements
    prov.setdefault("organ", request.organ)
    inter = dict(getattr(result, "intermediates", None) or prov.pop("intermediates", None) or {})
    ct = result.ct.array if hasattr(result.ct, "array") else np.asarray(result.ct)
    return SynthesisOutcome(ct, np.asarray(result.label), np.asarray(result.tumor_mask), prov, inter, request)


def run_sync(gen: Generator, on_progress=None):
    """Drive a progress generator to its end on this thread; returns its return value."""
    while True:
        try:
            item = next(gen)
        except StopIteration as stop:
            return stop.value
        if on_progress is not None:
            on_progress(item)


# --------------------------------------------------------------------------------------------
# saving
# --------------------------------------------------------------------------------------------
def provenance_record(outcome: SynthesisOutcome, files: dict[str, str]) -> dict:
    """The JSON written beside the images: method, weights checksums, seed, masks, version, files."""
    from backend import __version__

    prov = dict(outcome.provenance)
    prov.update(
        difftumor_version=__version__,
        created=datetime.now(timezone.utc).isoformat(timespec="seconds"),
        source_ct=outcome.request.source,
        seed=prov.get("seed", outcome.request.seed),
        requested={"method": outcome.request.method, "device": outcome.request.device,
                   "stage": outcome.request.stage, "steps": outcome.request.steps,
                   "weights_organ": outcome.request.weights_organ or outcome.request.organ,
                   "sigma": "random U(0, 4) per tumour" if outcome.request.sigma is None else outcome.request.sigma,
                   "pancreas_blend": outcome.request.pancreas_blend,
                   "keep_intermediates": outcome.request.keep_intermediates},
        tumor_voxels=int(np.count_nonzero(outcome.tumor_mask)),
        files=files,
    )
    prov.setdefault("method", outcome.request.method)
    sha: dict = dict(prov.get("weights_sha256") or {})
    for t in prov.get("tumours", []):
        sha.update(t.get("weights_sha256") or {})
    prov["weights_sha256"] = sha  # empty for the model-based method (no weights used)
    return prov


def write_json_atomic(path: Path, data: dict) -> Path:
    from backend.io import write_text_atomic

    return write_text_atomic(path, json.dumps(data, indent=2, sort_keys=True, default=_json_default))


def _json_default(o):
    if isinstance(o, np.generic):
        return o.item()
    if isinstance(o, np.ndarray):
        return o.tolist()
    if isinstance(o, (Path, tuple, set)):
        return str(o) if isinstance(o, Path) else list(o)
    raise TypeError(f"not JSON serialisable: {type(o).__name__}")


def output_paths(folder, stem: str) -> list[Path]:
    """The three files :func:`save_outcome` writes for ``stem``."""
    return [Path(folder) / f"{stem}{suffix}" for suffix in ("_ct.nii.gz", "_tumor.nii.gz", "_provenance.json")]


def free_stem(folder, stem: str) -> str:
    """``stem`` if none of its files exist in ``folder``, else the first free ``stem_2``, ``stem_3``, ..."""
    k, candidate = 1, stem
    while any(p.exists() for p in output_paths(folder, candidate)):
        k += 1
        candidate = f"{stem}_{k}"
    return candidate


def save_outcome(outcome: SynthesisOutcome, folder, stem: str, ct_metadata: dict, *,
                 scale: Sequence[float], translate: Sequence[float]) -> dict[str, Path]:
    """Write ``<stem>_ct.nii.gz``, ``<stem>_tumor.nii.gz`` (0/1/2 label) and ``<stem>_provenance.json``.

    Images go through :func:`difftumor_napari._writer.write_layer` with the CT layer's metadata, so
    they land on the original file grid, orientation and dtype (HU rounded back to int16 when the
    source was int16). A missing folder is created; existing files are never replaced (the caller
    picks another stem, see :func:`free_stem`); every file is written atomically.
    """
    from difftumor_napari._writer import write_layer

    folder = Path(folder)
    try:
        folder.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise DiffTumorError(f"{folder}: cannot create the output folder ({exc.strerror or exc})") from None
    taken = [p for p in output_paths(folder, stem) if p.exists()]
    if taken:
        raise DiffTumorError(f"{taken[0]}: already exists; nothing was overwritten (choose another file name stem)")
    meta = {"name": stem, "metadata": ct_metadata, "scale": tuple(scale), "translate": tuple(translate)}
    info = dict((ct_metadata or {}).get("difftumor", {}))
    ct = outcome.ct
    if np.issubdtype(np.dtype(info.get("dtype", ct.dtype)), np.integer) and not np.issubdtype(ct.dtype, np.integer):
        ct = np.rint(ct)
    ct_path = write_layer(folder / f"{stem}_ct.nii.gz", ct, meta, labels=False)
    label_meta = {**meta, "metadata": {"difftumor": {**info, "dtype": "uint8"}}} if info else meta
    label_path = write_layer(folder / f"{stem}_tumor.nii.gz", np.asarray(outcome.label).astype(np.uint8), label_meta,
                             labels=True)
    files = {"ct": ct_path.name, "label": label_path.name}
    prov_path = write_json_atomic(folder / f"{stem}_provenance.json", provenance_record(outcome, files))
    return {"ct": ct_path, "label": label_path, "provenance": prov_path}
