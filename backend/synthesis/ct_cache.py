"""Per-CT cache of the synthesis engine: a second tumour in the same CT skips the checks and the organ's
model-space mask (see :class:`backend.synthesis.engine.SynthesisEngine`)."""

from __future__ import annotations

import hashlib
from dataclasses import dataclass, field

import numpy as np

from backend.io import Geometry, Volume
from backend.synthesis import masks
from backend.synthesis.placement import _organ_in_model_space

CT_CACHE_SIZE = 4  # CTs (x organ masks) remembered per engine


def ct_key(ct: Volume) -> tuple:
    """Identity + cheap content fingerprint of a CT: object id, shape, dtype, geometry, hash of a strided sample.

    A CT edited in place outside the sampled voxels keeps its key; the cache only holds what a
    wrong hit cannot corrupt much (the CT-likeness check, the organ's model-space mask, which is keyed
    by the full organ-mask hash anyway).
    """
    a = ct.array
    step = max(1, int(round((a.size / 65536) ** (1 / 3))))
    sample = np.ascontiguousarray(a[::step, ::step, ::step])
    return (id(a), a.shape, a.dtype.str, ct.geometry, hashlib.blake2b(sample.tobytes(), digest_size=16).hexdigest())


@dataclass
class CTEntry:
    checked: bool
    organ_models: dict = field(default_factory=dict)  # reach (mm) -> (organ_m, model grid, slices, sub-grid)

    def organ_model(self, geometry: Geometry, organ_arr: np.ndarray, size: str):
        reach = max(10.0, 2.0 * masks.SIZE_CLASSES[size].semi_axes[1])
        if reach not in self.organ_models:
            prepared = _organ_in_model_space(geometry, organ_arr, size)
            prepared[0].flags.writeable = False  # shared by later calls: nobody may edit it
            self.organ_models[reach] = prepared
        return self.organ_models[reach]
