"""One synthesis request: the options of a run, checked once, in the user's words.

    from backend.synthesis.request import Ellipsoid, Generated, SynthesisRequest, UserMask

    request = SynthesisRequest(organ="liver", tumor=Generated(size="small", count=2), method="model-based", seed=3)
    result = engine.run(request, ct, organ_mask)          # SynthesisEngine.run / iter_run
    result.provenance["settings"] == request.settings()  # what the request asked for
    result.unused                                        # options the engine found had no effect

Every front end (the ``difftumor synthesize`` command, the napari "Synthesis" widget, the training transform
:class:`backend.segmentation.transforms.RandTumorSynthesisd`) builds one and hands it to the engine; the
engine alone decides the method, the stage of each tumour and what was unused (docs/synthesis.md lists the
fields and the provenance format).

Where the tumours come from (``tumor``):

* :class:`Generated` -- the release's random generator (size class + count; None draws the release's mix);
* :class:`Ellipsoid` -- one ellipsoid at a world point (LPS mm) or a voxel index, built on the CT's grid;
* :class:`UserMask` -- a mask on the CT's grid (a painted layer, a file).

Errors are :class:`OptionError` (a :class:`~backend.errors.DiffTumorError`) naming the option in plain words
(``blend blur sigma 30: must lie in [0, 20] voxels``); a front end that has its own names for the options
(the CLI's ``--sigma``) rewrites the name with :meth:`OptionError.renamed`. A new option (a sampler, mass
effect) is one field here, one line in :meth:`SynthesisRequest._check` and one in :data:`OPTION_NAMES`.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from backend.errors import DiffTumorError
from backend.synthesis.stage import Stage

METHODS = ("auto", "diffusion", "model-based")
DEFAULT_DDIM_STEPS = 50
SAMPLERS = ("ddim", "dpm++")  # mid/late tumours: the release's DDIM, or DPM-Solver++(2M) (opt-in, fewer steps)
DEFAULT_DPM_STEPS = 15
SIGMA_RANGE = (0.0, 20.0)  # voxels
# the options only the diffusion method reads (their defaults are None/False, so "given" can be told apart)
DIFFUSION_ONLY = ("sigma", "stage", "ddim_steps", "keep_intermediates", "pancreas_blend", "weights_organ", "sampler")
MODEL_BASED_ONLY = ("phase",)  # default None: told from the organ's HU
MASS_EFFECT = ("auto", "on", "off")  # = backend.synthesis.mass_effect.MASS_EFFECT_MODES
PHASES = ("non-contrast", "enhanced")  # = backend.synthesis.model_based.PHASES

#: plain-language names of the options, as errors and the widget say them
OPTION_NAMES = {
    "organ": "organ",
    "weights_organ": "weights organ",
    "method": "method",
    "seed": "seed",
    "stage": "stage",
    "sigma": "blend blur sigma",
    "ddim_steps": "DDIM steps",
    "sampler": "sampler",
    "pancreas_blend": "pancreas blend",
    "keep_intermediates": "keep intermediates",
    "mass_effect": "mass effect",
    "phase": "contrast phase",
    "size": "size class",
    "count": "number of tumours",
    "centre": "ellipsoid centre",
    "radii": "ellipsoid radii",
    "rotation": "ellipsoid rotation",
    "irregularity": "ellipsoid irregularity",
    "out": "output folder",
    "overwrite": "overwrite",
    "ct": "CT",
    "organs": "organ labels",
    "tumor_mask": "tumour mask",
}


class OptionError(DiffTumorError):
    """A bad option value: ``"<option name> <value>: <what is wrong>"`` (``option`` is the field's name)."""

    def __init__(self, option: str, value: Any, what: str, *, label: str | None = None):
        self.option, self.value, self.what = option, value, what
        shown = "" if value is None else f" {show(value)}"
        super().__init__(f"{label or OPTION_NAMES.get(option, option)}{shown}: {what}")

    def renamed(self, label: str, value: Any = None) -> DiffTumorError:
        """The same error under a front end's name for the option (e.g. ``--sigma``), optionally its own text
        for the value."""
        return DiffTumorError(f"{label}{'' if (value if value is not None else self.value) is None else ' '}"
                              f"{show(value if value is not None else self.value)}: {self.what}")


def show(value) -> str:
    """A value as a user typed it: 1.5, 12,-30,88 (no numpy reprs, no brackets)."""
    if isinstance(value, bool):
        return "on" if value else "off"
    if isinstance(value, (list, tuple, np.ndarray)):
        return ",".join(show(v) for v in value)
    if isinstance(value, (float, np.floating)):
        return f"{float(value):g}"
    if isinstance(value, np.integer):
        return str(int(value))
    return str(value)


def _three(values, option: str) -> tuple[float, float, float]:
    try:
        out = tuple(float(v) for v in values)
    except (TypeError, ValueError):
        out = ()
    if len(out) != 3 or not all(math.isfinite(v) for v in out):
        raise OptionError(option, values, "need 3 numbers")
    return out  # type: ignore[return-value]


# --------------------------------------------------------------------------------------------
# where the tumours come from
# --------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class Generated:
    """Random tumours from the release's generator: ``size`` class (None: the release's training mix) and
    ``count`` (None: the class's range)."""

    size: str | None = None
    count: int | None = None

    def check(self) -> None:
        from backend.synthesis.masks import SIZE_CLASSES

        if self.size is not None and self.size not in SIZE_CLASSES:
            raise OptionError("size", self.size, f"choose one of {', '.join(SIZE_CLASSES)}")
        if self.count is not None and int(self.count) < 1:
            raise OptionError("count", self.count, "must be >= 1")

    def settings(self) -> dict:
        return {"size": self.size, "count": self.count}


@dataclass(frozen=True)
class Ellipsoid:
    """One ellipsoid: ``centre`` in world mm (LPS, as ITK reports it) or, with ``voxel``, a voxel index (x, y, z);
    semi-axes ``radii`` in mm; Euler ``rotation`` in degrees about x, y, z; surface ``irregularity`` in [0, 1]
    (its random surface is drawn from the request's seed). ``name`` is how messages call it."""

    centre: Sequence[float]
    radii: Sequence[float]
    voxel: bool = False
    rotation: Sequence[float] | None = None
    irregularity: float = 0.0
    name: str | None = None

    def check(self) -> None:
        _three(self.centre, "centre")
        if min(_three(self.radii, "radii")) <= 0:
            raise OptionError("radii", self.radii, "the ellipsoid's semi-axes must be > 0 mm")
        if self.rotation is not None:
            _three(self.rotation, "rotation")
        if not 0.0 <= float(self.irregularity) <= 1.0:
            raise OptionError("irregularity", self.irregularity, "must lie in [0, 1]")

    @property
    def label(self) -> str:
        return self.name or f"ellipsoid (centre {show(self.centre)}, radii {show(self.radii)} mm)"

    def settings(self) -> dict:
        return {"center": list(_three(self.centre, "centre")), "voxel": bool(self.voxel),
                "radii": list(_three(self.radii, "radii")),
                "rotation": list(_three(self.rotation, "rotation")) if self.rotation is not None else None,
                "irregularity": float(self.irregularity)}

    def build(self, geometry, seed: int) -> tuple[np.ndarray, dict]:
        """(bool (z, y, x) mask on ``geometry``'s grid, its provenance entry); the centre must lie in the image."""
        from backend.synthesis.masks import ellipsoid_mask

        given, radii = list(_three(self.centre, "centre")), list(_three(self.radii, "radii"))
        rot = list(_three(self.rotation, "rotation")) if self.rotation is not None else None
        world = np.asarray(geometry.voxel_to_world(np.asarray(given)) if self.voxel else given, float)
        index = np.asarray(geometry.world_to_voxel(world), float)
        size = [int(v) for v in geometry.size]
        if np.any(index < -0.5) or np.any(index > np.asarray(size) - 0.5):
            raise OptionError("centre", self.centre,
                              f"lies outside the image (voxel index {', '.join(f'{v:.1f}' for v in index)}; "
                              f"the image has {' x '.join(map(str, size))} voxels)")
        mask = ellipsoid_mask(geometry, given, radii, voxel=self.voxel, rotation=rot,
                              irregularity=float(self.irregularity), rng=seed)
        entry = {"source": "ellipsoid", "ellipsoid": {
            "centre_given": given,
            "centre_given_as": "voxel index (x, y, z)" if self.voxel else "world mm (LPS)",
            "centre_world_mm_lps": [round(float(v), 2) for v in world],
            "centre_voxel_xyz": [round(float(v), 2) for v in index],
            "radii_mm": radii,
            "rotation_deg_xyz": rot or [0.0, 0.0, 0.0],
            "irregularity": float(self.irregularity),
            "irregularity_seed": int(seed),
        }}
        return mask, entry


@dataclass(frozen=True, eq=False)
class UserMask:
    """A tumour mask on the CT's grid: (z, y, x) array or Volume, non-zero = tumour. ``name`` is how messages
    call it; ``file`` the file it was read from (recorded in the provenance)."""

    mask: Any
    name: str = "tumor mask"
    file: str | None = None

    def check(self) -> None:
        pass

    @property
    def label(self) -> str:
        return self.name

    def settings(self) -> dict:
        return {"tumor_mask": self.file}

    def entry(self) -> dict:
        return {"source": "mask file", "file": self.file} if self.file else {}


MaskSource = Generated | Ellipsoid | UserMask


# --------------------------------------------------------------------------------------------
# the request
# --------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class SynthesisRequest:
    """What to synthesize (the CT and organ mask are given to the engine beside it).

    ``None`` means "the method's default", so the engine can tell an option the user gave from one they
    did not (and report a given one that had no effect in :attr:`SynthesisResult.unused`).
    """

    organ: str  # liver, pancreas, kidney, kidney_left, kidney_right, spleen (aliases accepted, normalised)
    tumor: MaskSource = field(default_factory=Generated)
    method: str = "auto"  # auto = diffusion when the weights for the organ and every stage are found
    seed: int = 0  # placement, shape, blur and diffusion noise
    stage: Stage | None = None  # diffusion: override the stage chosen from each tumour's size
    sigma: float | None = None  # diffusion: blend blur in voxels (None: U(0, 4) per tumour, as released)
    ddim_steps: int | None = None  # diffusion, mid/late tumours: DDIM steps (None: 50, as released)
    pancreas_blend: bool = False  # diffusion, pancreas: blend like the other organs instead of replacing the crop
    keep_intermediates: bool = False  # diffusion: masked / reconstruction / decoded volumes (one extra decode)
    weights_organ: str | None = None  # diffusion: whose weights paint the tumours (cross-organ; None: ``organ``)
    # both methods: push the tissue around the tumour outward (backend.synthesis.mass_effect). "auto":
    # model-based tumours of 20 mm and more (equivalent diameter), none for diffusion (the release has none,
    # so its default outputs stay the release's); "on": every tumour of either method; "off": none
    mass_effect: str = "auto"
    phase: str | None = None  # model-based: "non-contrast" | "enhanced" contrast (None or "auto": from the organ's HU)
    sampler: str | None = None  # diffusion, mid/late: "ddim" (None: as released) or "dpm++" (DPM-Solver++(2M))

    def __post_init__(self):
        self._check()

    def _check(self) -> None:
        from backend.organs import parse_organ

        for name in ("organ", "weights_organ"):
            value = getattr(self, name)
            if value is not None:
                try:
                    object.__setattr__(self, name, parse_organ(value))
                except DiffTumorError as exc:
                    raise OptionError(name, value, str(exc)) from None
        if self.method not in METHODS:
            raise OptionError("method", self.method, f"choose one of {', '.join(METHODS)}")
        if self.stage is not None:
            try:
                object.__setattr__(self, "stage", Stage.parse(self.stage))
            except DiffTumorError:
                raise OptionError("stage", self.stage, "choose early or mid_late") from None
        if self.sigma is not None and not SIGMA_RANGE[0] <= float(self.sigma) <= SIGMA_RANGE[1]:
            raise OptionError("sigma", self.sigma, "the blend blur must lie in [0, 20] voxels")
        if self.sampler is not None and self.sampler not in SAMPLERS:
            raise OptionError("sampler", self.sampler, f"choose one of {', '.join(SAMPLERS)}")
        if self.ddim_steps is not None and int(self.ddim_steps) < 1:
            raise OptionError("ddim_steps", self.ddim_steps, "must be >= 1")
        if not 0 <= int(self.seed) <= 2**32 - 1:
            raise OptionError("seed", self.seed, f"must be a whole number from 0 to {2**32 - 1}")
        if self.mass_effect not in MASS_EFFECT:
            raise OptionError("mass_effect", self.mass_effect, "choose auto (model-based tumours of 20 mm and more), "
                              "on (every tumour, both methods) or off")
        if self.phase == "auto":
            object.__setattr__(self, "phase", None)
        if self.phase is not None and self.phase not in PHASES:
            raise OptionError("phase", self.phase, f"choose auto, {' or '.join(PHASES)}")
        if not isinstance(self.tumor, (Generated, Ellipsoid, UserMask)):
            raise TypeError(f"tumor must be Generated, Ellipsoid or UserMask, got {type(self.tumor).__name__}")
        self.tumor.check()

    # ------------------------------------------------------------------ derived
    @property
    def model_organ(self) -> str:
        """Whose diffusion weights run."""
        return self.weights_organ or self.organ

    @property
    def steps(self) -> int:
        """Sampler steps for mid/late tumours (``ddim_steps``; default 50 for DDIM, 15 for DPM-Solver++)."""
        return int(self.ddim_steps or (DEFAULT_DPM_STEPS if self.sampler == "dpm++" else DEFAULT_DDIM_STEPS))

    @property
    def sampler_name(self) -> str:
        """The mid/late sampler that runs: ``sampler``, or the release's ``"ddim"``."""
        return self.sampler or "ddim"

    def given(self) -> list[str]:
        """The diffusion-only options that were set (not left at their default)."""
        return [name for name in DIFFUSION_ONLY if getattr(self, name) not in (None, False)]

    def mass_effect_mode(self, method: str) -> str:
        """The mass-effect mode of :mod:`backend.synthesis.mass_effect` for ``method``: "auto" is "off" for
        diffusion (faithful to the release), the size rule for model-based."""
        return "off" if self.mass_effect == "auto" and method == "diffusion" else self.mass_effect

    def unused(self, method: str, stages: Sequence[Stage]) -> list[str]:
        """The given method-specific options that have no effect when ``method`` ran on tumours of ``stages``."""
        from backend.synthesis.blend import uses_blend

        given = self.given()
        if method != "diffusion":
            return given
        unused = [name for name in MODEL_BASED_ONLY if getattr(self, name) is not None]
        if "ddim_steps" in given and Stage.MID_LATE not in set(stages):
            unused.append("ddim_steps")  # early tumours use the ancestral sampler
        if "sampler" in given and Stage.MID_LATE not in set(stages):
            unused.append("sampler")
        if "sigma" in given and not uses_blend(self.organ, self.pancreas_blend):
            unused.append("sigma")  # the pancreas crop is replaced, not blended
        if "pancreas_blend" in given and self.organ != "pancreas":
            unused.append("pancreas_blend")
        return unused

    def settings(self) -> dict:
        """The request as plain JSON values (recorded in the provenance; a resumed run must match it)."""
        tumor = {"tumor_mask": None, "center": None, "voxel": False, "radii": None, "rotation": None,
                 "irregularity": None, "size": None, "count": None}
        tumor.update(self.tumor.settings())
        return {
            "organ": self.organ,
            "weights_organ": self.weights_organ,
            **tumor,
            "method": self.method,
            "stage": None if self.stage is None else self.stage.value,
            "sigma": self.sigma,
            "ddim_steps": self.steps,
            "sampler": self.sampler_name,
            "pancreas_blend": bool(self.pancreas_blend),
            "keep_intermediates": bool(self.keep_intermediates),
            "mass_effect": self.mass_effect,
            "phase": self.phase,
            "seed": int(self.seed),
        }
