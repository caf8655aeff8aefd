"""The engine's model-based path: the request's organ and phase, mass effect for both methods, labels that match."""

import numpy as np
import pytest
from scipy import ndimage

from backend.errors import DiffTumorError
from backend.io import Geometry, Volume, read_image
from backend.organs import load_organ_mask
from backend.synthesis.engine import SynthesisEngine
from backend.synthesis.request import Ellipsoid, Generated, SynthesisRequest


@pytest.fixture(scope="module")
def slab():
    """1 mm grid: an organ (60 HU) below a boundary at y = 60 with fat (-100 HU) above; the tumour
    centre (x, y, z) = (45, 40, 35) with radius 15 mm puts its surface 5 mm below the boundary."""
    rng = np.random.default_rng(0)
    shape = (70, 110, 90)  # (z, y, x)
    organ = np.zeros(shape, bool)
    organ[:, :60, :] = True
    ct = (np.where(organ, 60.0, -100.0) + rng.normal(0, 8, shape)).astype(np.int16)
    ct[:, 100:, :] = -1000  # some air, as in any CT
    return Volume(ct, Geometry(shape[::-1], (1.0, 1.0, 1.0), (0.0, 0.0, 0.0))), organ


def _ball(centre=(45, 40, 35), radii=(15, 15, 15)):
    return Ellipsoid(centre, radii, voxel=True)


def _far(tumour, reach_mm):
    return ndimage.distance_transform_edt(~tumour) > reach_mm + 2


def _check_pushed(r, ct, organ):
    """The organ label bulges above the tumour, the CT moved with it, nothing changed beyond the field."""
    me = r.provenance["tumours"][0]["mass_effect"]
    assert me["applied"] and r.provenance["mass_effect"]["groups_applied"] == 1
    new_organ = r.label == 1
    col_before = np.flatnonzero(organ[35, :, 45]).max()
    col_after = np.flatnonzero(new_organ[35, :, 45] | r.tumor_mask[35, :, 45]).max()
    assert col_after - col_before >= 2, "the organ boundary above the tumour did not move"
    grown = new_organ & ~organ  # organ label where there was fat: the CT there must be organ now too
    assert grown.sum() > 50 and ct.array[grown].mean() < -50 < r.ct.array[grown].mean()
    far = _far(r.tumor_mask, me["reach_mm"])
    assert np.array_equal(r.ct.array[far], ct.array[far]) and np.array_equal(new_organ[far], organ[far])
    near = (ndimage.distance_transform_edt(~r.tumor_mask) <= 10) & ~r.tumor_mask
    assert np.abs(r.ct.array[near].astype(float) - ct.array[near]).mean() >= 5


def test_model_based_mass_effect_auto_moves_organ_and_label_together(slab):
    ct, organ = slab
    engine = SynthesisEngine(None, device="cpu")
    r = engine.run(SynthesisRequest(organ="liver", tumor=_ball(), method="model-based", seed=0), ct, organ)
    _check_pushed(r, ct, organ)
    assert r.provenance["mass_effect"]["requested"] == "auto"
    off = engine.run(SynthesisRequest(organ="liver", tumor=_ball(), method="model-based", seed=0,
                                      mass_effect="off"), ct, organ)
    assert not off.provenance["tumours"][0]["mass_effect"]["applied"]
    assert np.array_equal(off.label == 1, organ & ~off.tumor_mask)
    small = engine.run(SynthesisRequest(organ="liver", tumor=_ball(radii=(6, 6, 6)), method="model-based"), ct, organ)
    assert not small.provenance["tumours"][0]["mass_effect"]["applied"]  # auto: under 20 mm
    on = engine.run(SynthesisRequest(organ="liver", tumor=_ball(radii=(6, 6, 6)), method="model-based",
                                     mass_effect="on"), ct, organ)
    assert on.provenance["tumours"][0]["mass_effect"]["applied"]


def test_request_organ_and_phase_reach_the_model(totalseg_ct, totalseg_seg):
    ct = read_image(totalseg_ct)
    kidney = load_organ_mask(totalseg_seg, "kidney_left", reference=ct)
    engine = SynthesisEngine(None, device="cpu")
    r = engine.run(SynthesisRequest(organ="kidney_left", tumor=Generated("tiny", 1), method="model-based", seed=1),
                   ct, kidney)
    p = r.provenance["tumours"][0]["params"]
    assert p["contrast_table"] == "kidney" and p["phase"] == "non-contrast" and p["phase_source"] == "auto"
    assert -20 <= p["contrast_hu"] <= -8  # the kidney's non-contrast range, not the liver's
    r = engine.run(SynthesisRequest(organ="kidney_left", tumor=Generated("tiny", 1), method="model-based", seed=1,
                                    phase="enhanced"), ct, kidney)
    p = r.provenance["tumours"][0]["params"]
    assert p["phase"] == "enhanced" and p["phase_source"] == "given" and -90 <= p["contrast_hu"] <= -40
    assert r.provenance["mass_effect"]["mode"] == "auto" and not r.unused


def test_model_based_on_the_real_ct_mass_effect_changes_tissue_within_10_mm(totalseg_ct, totalseg_seg):
    ct = read_image(totalseg_ct)
    liver = load_organ_mask(totalseg_seg, "liver", reference=ct)
    depth = ndimage.distance_transform_edt(liver, sampling=ct.geometry.spacing[::-1])
    # a centre 20 mm deep: the 15 mm tumour's surface 5 mm below the liver's, as far from the image's z ends
    # (90 mm field of view) as can be
    cand = np.argwhere(np.abs(depth - 20.0) < 1.6)
    z, y, x = cand[np.argmin(np.abs(cand[:, 0] - depth.shape[0] / 2))]
    r = SynthesisEngine(None, device="cpu").run(
        SynthesisRequest(organ="liver", tumor=Ellipsoid((int(x), int(y), int(z)), (15, 15, 15), voxel=True),
                         method="model-based", seed=2, mass_effect="on"), ct, liver)
    me = r.provenance["tumours"][0]["mass_effect"]
    assert me["applied"] and me["surface_push_mm"] > 2
    s = ct.geometry.spacing[::-1]
    dist = ndimage.distance_transform_edt(~r.tumor_mask, sampling=s)
    near = (dist <= 10) & ~r.tumor_mask
    assert np.abs(r.ct.array[near].astype(float) - ct.array[near]).mean() >= 5
    far = dist > me["reach_mm"] + 2 * max(s)
    assert np.array_equal(r.ct.array[far], ct.array[far]) and np.array_equal(r.label[far] == 1, liver[far])
    assert ((r.label == 1) != (liver & ~r.tumor_mask)).any()  # the organ label moved with the tissue


def test_mass_effect_option_is_checked_in_the_request():
    with pytest.raises(DiffTumorError, match="^mass effect sometimes: choose auto"):
        SynthesisRequest(organ="liver", mass_effect="sometimes")
    with pytest.raises(DiffTumorError, match="^contrast phase arterial: choose auto, non-contrast or enhanced"):
        SynthesisRequest(organ="liver", phase="arterial")
    req = SynthesisRequest(organ="liver", phase="auto", mass_effect="on")
    assert req.phase is None and req.settings()["mass_effect"] == "on"
    assert req.mass_effect_mode("diffusion") == "on"
    assert SynthesisRequest(organ="liver").mass_effect_mode("diffusion") == "off"  # auto keeps the release
    assert SynthesisRequest(organ="liver", phase="enhanced").unused("diffusion", []) == ["phase"]


@pytest.mark.slow
def test_diffusion_mass_effect_on_with_parity_weights(slab, parity_dir):
    ct, organ = slab
    engine = SynthesisEngine(parity_dir, device="cpu", threads=2)
    req = dict(organ="liver", tumor=_ball(), method="diffusion", stage="early", sigma=1.0, seed=0)
    r = engine.run(SynthesisRequest(**req, mass_effect="on"), ct, organ)
    assert r.provenance["method"] == "diffusion"
    _check_pushed(r, ct, organ)
    plain = engine.run(SynthesisRequest(**req), ct, organ)  # auto: the release's output, no displacement
    assert not plain.provenance["tumours"][0]["mass_effect"]["applied"]
    assert np.array_equal(plain.label == 1, organ & ~plain.tumor_mask)
    moved = r.ct.array != plain.ct.array
    assert moved[~plain.tumor_mask].sum() > 1000  # the tissue around the tumour moved
