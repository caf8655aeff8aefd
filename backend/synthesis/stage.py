"""The tumour stage: one name and one rule for training and synthesis.

The release trains two diffusion models per organ: ``{organ}_early.pt`` (T = 4) for early tumours and
``{organ}_noearly.pt`` (T = 200, sampled by DDIM) for the others. The paper calls a tumour *early* when it
is smaller than 2 cm (TNM T1), which is a statement about its greatest dimension. :func:`stage_of` is that
rule, for every caller:

* synthesis: the engine chooses the model for each tumour group (and the widget shows which one will run);
* training: ``difftumor train diffusion`` decides which tumours of a label map a stage trains on.

Definition (the choice documented): the largest diameter is the rotation-invariant one of
:func:`backend.synthesis.masks.largest_diameter_mm` (2·sqrt(5·λ_max) of the voxel-coordinate covariance,
exact for a solid ellipsoid), computed in millimetres. Training used to take the largest *bounding-box
extent* instead; the two disagree for an oblique or elongated tumour (a 25 mm tumour lying diagonally
has a bounding box under 20 mm on every axis) and by one voxel at the threshold (an extent counts whole
voxels). The greatest dimension of the paper is the diameter, not an axis-aligned box, so the diameter
wins and training now uses it too. A generated tumour of the release's generator keeps its size class's
stage (tiny/small early, medium/large mid/late; :attr:`~backend.synthesis.masks.SizeClass.stage`), as
released.

Spelling: :class:`Stage` values are ``"early"`` and ``"mid_late"`` (what the engine, the CLI's
``--stage`` and the provenance say); :attr:`Stage.weights_name` is the release's file-name spelling
(``early`` / ``noearly``), and :meth:`Stage.parse` accepts both.
"""

from __future__ import annotations

from collections.abc import Sequence
from enum import Enum

import numpy as np

EARLY_MAX_DIAMETER_MM = 20.0  # the paper: tumours under 2 cm are early


class Stage(str, Enum):
    EARLY = "early"
    MID_LATE = "mid_late"

    def __str__(self) -> str:  # "early", not "Stage.EARLY", in messages and JSON
        return self.value

    __hash__ = str.__hash__  # Stage.EARLY and "early" are one key in a set or dict

    @property
    def weights_name(self) -> str:
        """The release's spelling in weight file names: ``early`` / ``noearly``."""
        return "early" if self is Stage.EARLY else "noearly"

    @classmethod
    def parse(cls, value: str | Stage, name: str = "stage") -> Stage:
        """``early``, ``mid_late`` (also the release's ``noearly`` and ``mid/late``) -> Stage; a user error otherwise."""
        if isinstance(value, Stage):
            return value
        text = str(value).strip().lower().replace("/", "_").replace("-", "_")
        if text in ("noearly", "mid_late", "midlate"):
            return cls.MID_LATE
        if text == "early":
            return cls.EARLY
        from backend.errors import DiffTumorError

        raise DiffTumorError(f"{name} '{value}': choose early or mid_late")


def stage_of_diameter(diameter_mm: float, threshold_mm: float = EARLY_MAX_DIAMETER_MM) -> Stage:
    """Early below ``threshold_mm`` (20 mm), mid/late from it on."""
    return Stage.EARLY if float(diameter_mm) < threshold_mm else Stage.MID_LATE


def stage_of(mask: np.ndarray, spacing: Sequence[float], threshold_mm: float = EARLY_MAX_DIAMETER_MM) -> Stage:
    """The stage of ONE tumour (a boolean mask; ``spacing`` in mm per array axis): early when its largest
    diameter (see the module docstring) is under ``threshold_mm``."""
    from backend.synthesis.masks import largest_diameter_mm

    return stage_of_diameter(largest_diameter_mm(np.asarray(mask, bool), spacing), threshold_mm)
