"""What the engine paints tumour groups into, and the per-group steps that move tissue (mass effect).

:class:`Painting` holds the CT being painted plus the organ and synthetic-tumour masks, which move with the
tissue whenever a tumour pushes it aside (:mod:`backend.synthesis.mass_effect`), so that the output label
always matches the output CT. Tumours already in the CT (``fixed``: labelled real tumours) never move.

* model-based: :func:`paint_model_based` (:func:`backend.synthesis.model_based.model_based_tumor` with the
  request's organ, contrast phase and mass effect, the labelled real tumours avoided);
* diffusion: :func:`push_tissue` displaces the tissue on the CT's own grid *before* the group's crop is
  cut, so the crop the model sees (context and blend background) is the displaced anatomy and the organ and
  labels are warped by the very same field on the CT's grid (nearest neighbour).
"""

from __future__ import annotations

from dataclasses import asdict, dataclass

import numpy as np

from backend.synthesis.mass_effect import (
    MassEffectConfig,
    apply_mass_effect,
    equivalent_diameter_mm,
    mass_effect_applies,
)
from backend.synthesis.model_based import ModelBasedConfig, model_based_tumor

MASS_EFFECT_RULE = {
    "auto": "model-based tumours of {d:g} mm and more (equivalent diameter); none for diffusion (as released)",
    "on": "every tumour",
    "off": "none",
}


@dataclass
class Painting:
    """What the tumour groups are painted into, one after the other (see ``SynthesisEngine._paint``)."""

    out: np.ndarray  # the CT's array, painted in place
    rng: np.random.Generator
    noise: object = None
    intermediates: dict | None = None
    organ: np.ndarray | None = None  # bool (z, y, x): the organ, moved with the tissue
    tumor: np.ndarray | None = None  # bool (z, y, x): the synthetic tumours painted so far, moved with the tissue
    fixed: np.ndarray | None = None  # bool (z, y, x): labelled real tumours, never changed nor moved


def mass_effect_summary(request, method: str, crops_info, config: MassEffectConfig = MassEffectConfig()) -> dict:
    """The provenance's top-level ``mass_effect`` entry: the mode asked for, the one used for ``method``, its rule
    and how many tumour groups pushed tissue."""
    mode = request.mass_effect_mode(method)
    applied = [c for c in crops_info if (c.get("mass_effect") or {}).get("applied")]
    return {"requested": request.mass_effect, "mode": mode,
            "rule": MASS_EFFECT_RULE[request.mass_effect].format(d=config.min_diameter_mm),
            "groups_applied": len(applied), "config": asdict(config)}


def paint_model_based(state: Painting, spacing_zyx, group: np.ndarray, request,
                      config: ModelBasedConfig, mass_config: MassEffectConfig = MassEffectConfig()) -> dict:
    """Paint one group with the model-based method (mass effect first when it applies); returns its provenance."""
    res = model_based_tumor(state.out, spacing_zyx, state.organ, group, rng=state.rng, config=config,
                            organ=request.organ, phase=request.phase or "auto",
                            mass_effect=request.mass_effect_mode("model-based"), mass_effect_config=mass_config,
                            avoid=state.fixed, labels=[state.tumor])
    state.out, state.organ = res.ct, res.organ
    state.tumor = res.labels[0] | group
    params = dict(res.params)
    return {"params": params, "mass_effect": params.pop("mass_effect")}


def push_tissue(state: Painting, spacing_zyx, group: np.ndarray, mode: str,
                mass_config: MassEffectConfig = MassEffectConfig()) -> dict:
    """Diffusion: displace the tissue around ``group`` on the CT's grid when ``mode`` applies (before the crop is
    cut); moves the organ and the tumours painted so far with it. Returns the group's mass-effect entry."""
    spacing = np.asarray(spacing_zyx, dtype=np.float64)
    applies = mass_effect_applies(mode, group, spacing, mass_config)
    entry = {"mode": mode, "applied": applies,
             "equivalent_diameter_mm": round(equivalent_diameter_mm(group, spacing), 2),
             "min_diameter_mm": mass_config.min_diameter_mm}
    if applies:
        res = apply_mass_effect(state.out, group, spacing, labels=[state.organ, state.tumor], config=mass_config,
                                fixed=state.fixed)
        state.out = res.ct
        state.organ, state.tumor = res.labels[0] | group, res.labels[1]  # the tumour grows inside its organ
        entry.update(res.info)
    return entry
