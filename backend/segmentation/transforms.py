"""On-the-fly tumour synthesis as a MONAI map transform, plus the label mapping used in training.

:class:`RandTumorSynthesisd` works on model-space crops after the usual MONAI transforms: ``image``
(1, X, Y, Z) in [0, 1] (HU window [-175, 250], RAS, 1 mm) and ``label`` (1, X, Y, Z) with
0 background / 1 organ / 2 tumour. For a healthy case (``data[healthy_key]`` true), with
probability ``prob`` it draws a stage (early / mid / large with ``stage_probs``; early splits
tiny/small 0.5/0.5 as in the release), draws tumour masks with the release's generator
(:func:`backend.synthesis.masks.generate_tumor_mask`) inside the crop's organ, and inserts them

* ``method="model-based"``: :func:`backend.synthesis.model_based.synthesize_model_based` (no weights);
* ``method="diffusion"``: the released latent diffusion on the crop
  (:func:`backend.synthesis.diffusion_crop.iter_synthesize_crop` with the engine's
  :meth:`~backend.synthesis.engine.SynthesisEngine.stage_models`) and the release's blend
  (pancreas: the whole crop becomes the reconstruction, as released).

``mass_effect`` ("auto" | "on" | "off", as :class:`~backend.synthesis.request.SynthesisRequest`; "auto":
model-based tumours of 20 mm and more, none for diffusion) pushes the tissue aside first; the label map
is warped with the image (nearest neighbour), so the organ label still matches the crop.
The tumour voxels get label 2. Real-tumour cases pass unchanged. ``weights_organ`` selects whose
diffusion weights are used (cross-organ setting: liver weights in pancreas crops). The transform
seeds like every MONAI transform (``set_random_state``); engines are created lazily in each worker.
``data["synthetic"]`` is set to 1 when a tumour was inserted, else 0.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Hashable, Mapping, Sequence

import numpy as np
import torch
from monai.config import KeysCollection
from monai.transforms import MapTransform, Randomizable, RandomizableTransform

from backend.errors import DiffTumorError
from backend.synthesis.masks import SIZE_CLASSES

log = logging.getLogger(__name__)

METHODS = ("model-based", "diffusion")
# the release's three draws (stage_probs): early (size class tiny or small, 0.5/0.5), medium, large; the
# diffusion stage of each follows from its size class (backend.synthesis.stage: tiny/small early, else mid_late)
STAGES = ("early", "mid", "large")
STAGE_SIZES = {"mid": "medium", "large": "large"}


def _as_bool(v) -> bool:
    if torch.is_tensor(v) or isinstance(v, np.ndarray):
        return bool(np.asarray(v).reshape(-1)[0]) if np.asarray(v).size else False
    return bool(v)


class RandTumorSynthesisd(RandomizableTransform, MapTransform):
    """Insert synthetic tumours into healthy model-space crops (see the module docstring)."""


    def __init__(
        self,
        keys: KeysCollection = ("image", "label"),
        prob: float = 0.5,
        stage_probs: Sequence[float] = (0.8, 0.1, 0.1),
        *,
        organ: str = "liver",
        method: str = "model-based",
        weights_dir: str | None = None,
        weights_organ: str | None = None,
        healthy_key: str = "healthy",
        organ_label: int = 1,
        tumor_label: int = 2,
        device: str = "cpu",
        mass_effect: str = "auto",
        allow_missing_keys: bool = False,
    ):
        MapTransform.__init__(self, keys, allow_missing_keys)
        RandomizableTransform.__init__(self, prob)
        if len(self.keys) != 2:
            raise ValueError(f"keys must name the image and the label, got {self.keys}")
        if method not in METHODS:
            raise ValueError(f"method {method!r} is not one of {', '.join(METHODS)}")
        probs = np.asarray(stage_probs, dtype=float)
        if probs.shape != (3,) or (probs < 0).any() or not np.isclose(probs.sum(), 1.0):
            raise ValueError(f"stage_probs must be 3 non-negative numbers (early, mid, large) summing to 1, got {stage_probs}")
        from backend.organs import parse_organ

        self.organ = parse_organ(organ)
        self.weights_organ = parse_organ(weights_organ) if weights_organ else self.organ
        self.method, self.weights_dir, self.device = method, weights_dir, device
        from backend.synthesis.request import SynthesisRequest

        self.mass_effect = SynthesisRequest(organ=self.organ, mass_effect=mass_effect).mass_effect  # checked once
        self.stage_probs = probs
        self.healthy_key, self.organ_label, self.tumor_label = healthy_key, organ_label, tumor_label
        self._engine = None  # created lazily (once per worker process)

    # ------------------------------------------------------------------------------ randomness
    def randomize(self, data=None) -> None:
        super().randomize(None)  # sets self._do_transform with probability prob
        self._stage = STAGES[int(self.R.choice(3, p=self.stage_probs))]
        self._size = ("tiny" if self.R.rand() < 0.5 else "small") if self._stage == "early" else STAGE_SIZES[self._stage]
        self._seed = int(self.R.randint(0, 2**31 - 1))

    # ------------------------------------------------------------------------------- synthesis
    def _engine_for_diffusion(self):
        if self._engine is None:
            from torch.utils.data import get_worker_info

            from backend.synthesis.engine import SynthesisEngine

            # In a DataLoader worker the parallelism comes from the workers: keep the worker's one
            # thread (raising it in a forked worker can deadlock OpenMP, whose pool the parent started).
            threads = torch.get_num_threads() if get_worker_info() is not None else None
            self._engine = SynthesisEngine(self.weights_dir, device=self.device, threads=threads)
            ok, why = self._engine.diffusion_available(self.weights_organ, SIZE_CLASSES[self._size].stage)
            if not ok:
                raise DiffTumorError(f"synthesis.method=diffusion: {why}")
        return self._engine

    def request(self):
        """The :class:`~backend.synthesis.request.SynthesisRequest` of this draw (size class and seed)."""
        from backend.synthesis.request import Generated, SynthesisRequest

        return SynthesisRequest(organ=self.organ, tumor=Generated(self._size), method=self.method, seed=self._seed,
                                weights_organ=self.weights_organ if self.weights_organ != self.organ else None,
                                mass_effect=self.mass_effect)

    def __call__(self, data: Mapping[Hashable, torch.Tensor]) -> dict:
        d = dict(data)
        self.randomize()
        d["synthetic"] = torch.tensor(0, dtype=torch.uint8)
        if not self._do_transform or not _as_bool(d.get(self.healthy_key, False)):
            return d
        from backend.synthesis.diffusion_crop import synthesize_training_crop

        img_key, lab_key = self.keys
        image, label = d[img_key], d[lab_key]
        lab = np.asarray(label.detach().cpu() if torch.is_tensor(label) else label)
        organ = lab[0] == self.organ_label
        img = np.asarray(image.detach().cpu() if torch.is_tensor(image) else image, dtype=np.float32)
        painted = synthesize_training_crop(self.request(), img[0], organ, engine=self._engine_for_diffusion,
                                           label=lab[0])
        if painted is None:
            log.debug("crop has %d organ voxels, too few for a %s tumour; left unchanged", int(organ.sum()), self._size)
            return d
        img = img.copy()
        img[0], tumor, moved = painted
        lab = lab.copy()
        lab[0] = moved  # the labels moved with the tissue (mass effect), nearest neighbour
        lab[0][tumor] = self.tumor_label
        d[img_key] = _like(image, img)
        d[lab_key] = _like(label, lab)
        d["synthetic"] = torch.tensor(1, dtype=torch.uint8)
        return d


def _like(ref, arr: np.ndarray):
    """``arr`` as the type of ``ref`` (MetaTensor keeps its meta data)."""
    if torch.is_tensor(ref):
        out = ref.clone()
        out.copy_(torch.from_numpy(np.ascontiguousarray(arr)).to(ref.dtype))
        return out
    return arr.astype(ref.dtype, copy=False)


#: Release foreground radius (mm) per organ for the healthy-crop retry loop (kidney halves use kidney's).
FOREGROUND_RADIUS_MM = {"liver": 30.0, "pancreas": 15.0, "kidney": 25.0, "kidney_left": 25.0,
                        "kidney_right": 25.0, "spleen": 25.0}


class RandOrganCropd(Randomizable, MapTransform):
    """``RandCropByPosNegLabeld`` with the release's retry loop for healthy CTs.

    A crop of a healthy case must hold more than (4/3)·π·R³ foreground (label > 0) voxels, so the
    synthesis has organ to put a tumour in; R starts at ``radius`` (release: liver 30, pancreas 15,
    kidney 25 voxels at 1 mm), shrinks by ``relax_by`` every ``relax_every`` tries (never below
    ``min_radius``) and after ``max_tries`` the last crop is kept. Real-tumour cases take the first
    crop, as in the release. The foreground / background indices are computed once per call (not once
    per try) unless ``fg_indices_key`` / ``bg_indices_key`` already hold them (``FgBgToIndicesd``; for
    whole CTs they are large, so caching them costs memory). Returns a list of one sample, like the
    MONAI cropper it wraps.
    """

    def __init__(self, keys: KeysCollection, label_key: str, spatial_size, *, radius: float, pos: float = 1.0,
                 neg: float = 1.0, image_key: str | None = None, image_threshold: float = 0.0,
                 healthy_key: str = "healthy", relax_every: int = 5, relax_by: float = 5.0, min_radius: float = 5.0,
                 max_tries: int = 30, fg_indices_key: str = "_fg_indices", bg_indices_key: str = "_bg_indices",
                 allow_missing_keys: bool = False):
        from monai.transforms import FgBgToIndices, RandCropByPosNegLabeld

        MapTransform.__init__(self, keys, allow_missing_keys)
        if radius <= 0 or max_tries < 1 or relax_every < 1:
            raise ValueError(f"radius must be > 0 and max_tries, relax_every >= 1, got {radius}, {max_tries}, {relax_every}")
        self.label_key, self.healthy_key = label_key, healthy_key
        self.radius, self.relax_every, self.relax_by, self.min_radius = float(radius), relax_every, relax_by, min_radius
        self.max_tries = max_tries
        self.fg_key, self.bg_key = fg_indices_key, bg_indices_key
        self.image_key = image_key
        self._indices = FgBgToIndices(image_threshold)
        self.cropper = RandCropByPosNegLabeld(keys, label_key, spatial_size, pos=pos, neg=neg, num_samples=1,
                                              image_key=image_key, image_threshold=image_threshold,
                                              fg_indices_key=fg_indices_key, bg_indices_key=bg_indices_key,
                                              allow_missing_keys=allow_missing_keys)
        self.tries = 0  # of the last call (for logs and tests)

    def set_random_state(self, seed=None, state=None):
        super().set_random_state(seed, state)
        self.cropper.set_random_state(state=self.R)  # one stream: the crops draw from this transform's state
        return self

    def randomize(self, data=None) -> None:  # the wrapped cropper draws the crop centres
        pass

    def min_foreground(self, tries_done: int) -> float:
        """Foreground voxels a healthy crop must exceed after ``tries_done`` failed tries."""
        r = max(self.radius - self.relax_by * (tries_done // self.relax_every), self.min_radius)
        return 4.0 / 3.0 * math.pi * r**3

    def __call__(self, data):
        d = dict(data)
        if self.fg_key not in d or self.bg_key not in d:
            image = d[self.image_key] if self.image_key else None
            d[self.fg_key], d[self.bg_key] = self._indices(d[self.label_key], image)
        healthy = _as_bool(d.get(self.healthy_key, False))
        for tries in range(1, self.max_tries + 1):
            self.tries = tries
            out = self.cropper(d)
            if not healthy:
                break
            fg = int((out[0][self.label_key] > 0).sum())
            if fg > self.min_foreground(self.tries - 1):
                break
        if healthy and fg <= self.min_foreground(self.tries - 1):
            log.debug("no crop with enough organ after %d tries (%d foreground voxels); kept the last", self.tries, fg)
        return out


class MapLabelsd(MapTransform):
    """Raw dataset labels -> 0 background / 1 organ / 2 tumour.

    ``organ_values`` and ``tumor_values`` list the raw values of the organ and of its tumours
    (e.g. MSD liver: [1] and [2]; KiTS: [1] and [2] (+ cyst 3 as tumour or organ, your choice);
    TotalSegmentator liver: [5] and []). Every other value becomes background. With ``values_key``,
    a sample may carry its own ``(organ_values, tumor_values)`` under that key (popped from the dict),
    so sources with different conventions share one pipeline.
    """

    def __init__(self, keys: KeysCollection = "label", organ_values=(1,), tumor_values=(2,), *,
                 values_key: str | None = None, allow_missing_keys=False):
        super().__init__(keys, allow_missing_keys)
        self.organ_values, self.tumor_values = tuple(organ_values), tuple(tumor_values)
        self.values_key = values_key
        _check_disjoint(self.organ_values, self.tumor_values)

    def __call__(self, data):
        d = dict(data)
        organ_values, tumor_values = self.organ_values, self.tumor_values
        if self.values_key is not None and self.values_key in d:
            organ_values, tumor_values = (tuple(int(v) for v in vs) for vs in d.pop(self.values_key))
            _check_disjoint(organ_values, tumor_values)
        for key in self.key_iterator(d):
            raw = d[key]
            t = raw if torch.is_tensor(raw) else torch.as_tensor(np.asarray(raw))
            out = torch.zeros_like(t)
            if organ_values:
                out[torch.isin(t, torch.tensor(organ_values, dtype=t.dtype))] = 1
            if tumor_values:
                out[torch.isin(t, torch.tensor(tumor_values, dtype=t.dtype))] = 2
            d[key] = out
        return d


def _check_disjoint(organ_values, tumor_values) -> None:
    if set(organ_values) & set(tumor_values):
        raise ValueError(f"organ values {tuple(organ_values)} and tumour values {tuple(tumor_values)} overlap")


class LoadVolumed(MapTransform):
    """Read images with :func:`backend.io.read_image` (NIfTI, NRRD, MHA/MHD, DICOM folders) into
    channel-first MetaTensors (1, X, Y, Z) with MONAI's RAS affine, ready for ``Orientationd`` /
    ``Spacingd``. Replaces ``LoadImaged`` + ``EnsureChannelFirstd`` without needing nibabel or ITK."""

    def __init__(self, keys: KeysCollection = ("image", "label"), allow_missing_keys: bool = False):
        super().__init__(keys, allow_missing_keys)

    def __call__(self, data):
        from monai.data import MetaTensor

        from backend.io import read_image

        d = dict(data)
        for key in self.key_iterator(d):
            vol = read_image(d[key])
            g = vol.geometry
            affine = np.eye(4)
            # LPS world (ITK) -> RAS world (MONAI): flip x and y
            affine[:3, :3] = np.diag([-1.0, -1.0, 1.0]) @ g.direction_matrix @ np.diag(g.spacing)
            affine[:3, 3] = np.diag([-1.0, -1.0, 1.0]) @ np.asarray(g.origin)
            arr = np.ascontiguousarray(vol.array.transpose(2, 1, 0))[None]  # (z, y, x) -> (1, X, Y, Z)
            if arr.dtype.kind == "f":
                arr = arr.astype(np.float32, copy=False)
            elif arr.dtype not in (np.uint8, np.int16, np.int32, np.int64):
                arr = arr.astype(np.int32)
            meta = {"filename_or_obj": str(d[key]), "spatial_shape": np.asarray(arr.shape[1:]),
                    "original_affine": affine.copy(), "original_channel_dim": "no_channel"}
            d[key] = MetaTensor(torch.from_numpy(arr), affine=torch.from_numpy(affine), meta=meta)
        return d
