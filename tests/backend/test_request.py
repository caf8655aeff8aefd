"""SynthesisRequest: checked once, errors in the user's words, its own settings (backend/synthesis/request.py)."""

import numpy as np
import pytest

from backend.errors import DiffTumorError
from backend.io import Geometry
from backend.synthesis.request import Ellipsoid, Generated, OptionError, SynthesisRequest, UserMask
from backend.synthesis.stage import Stage


@pytest.mark.parametrize("kwargs, text", [
    ({"sigma": 30.0}, "blend blur sigma 30: the blend blur must lie in [0, 20] voxels"),
    ({"ddim_steps": 0}, "DDIM steps 0: must be >= 1"),
    ({"stage": "large"}, "stage large: choose early or mid_late"),
    ({"method": "gan"}, "method gan: choose one of auto, diffusion, model-based"),
    ({"organ": "brain"}, "organ brain: unknown organ 'brain'"),
    ({"weights_organ": "stomach"}, "weights organ stomach: unknown organ"),
    ({"tumor": Generated(size="huge")}, "size class huge: choose one of tiny, small, medium, large"),
    ({"tumor": Generated(count=0)}, "number of tumours 0: must be >= 1"),
    ({"tumor": Ellipsoid((1, 2, 3), (5, -1, 5))}, "ellipsoid radii 5,-1,5: the ellipsoid's semi-axes must be > 0 mm"),
    ({"tumor": Ellipsoid((1, 2), (5, 5, 5))}, "ellipsoid centre 1,2: need 3 numbers"),
    ({"tumor": Ellipsoid((1, 2, 3), (5, 5, 5), irregularity=2)}, "ellipsoid irregularity 2: must lie in [0, 1]"),
])
def test_bad_values_are_one_line_in_plain_words(kwargs, text):
    with pytest.raises(OptionError) as info:
        SynthesisRequest(**{"organ": "liver", **kwargs})
    assert str(info.value).startswith(text) and "--" not in str(info.value)


def test_a_front_end_renames_the_option():
    with pytest.raises(OptionError) as info:
        SynthesisRequest(organ="liver", sigma=25)
    assert str(info.value.renamed("--sigma")) == "--sigma 25: the blend blur must lie in [0, 20] voxels"
    assert isinstance(info.value, DiffTumorError)


def test_values_are_normalised_and_settings_are_plain_json():
    r = SynthesisRequest(organ="Kidney-Left", weights_organ="LIVER", stage="noearly", seed=4,
                         tumor=Ellipsoid((1, 2, 3), (4, 5, 6), voxel=True))
    assert r.organ == "kidney_left" and r.weights_organ == "liver" and r.model_organ == "liver"
    assert r.stage is Stage.MID_LATE and r.steps == 50
    s = r.settings()
    assert s["stage"] == "mid_late" and s["center"] == [1.0, 2.0, 3.0] and s["voxel"] is True
    assert s["radii"] == [4.0, 5.0, 6.0] and s["irregularity"] == 0.0 and s["size"] is None and s["seed"] == 4
    assert set(SynthesisRequest(organ="liver").settings()) == set(s)  # the same keys whatever the mask source
    assert SynthesisRequest(organ="liver", tumor=UserMask(None, file="/m.nii.gz")).settings()["tumor_mask"] == "/m.nii.gz"


def test_unused_options_are_decided_from_method_and_stages():
    r = SynthesisRequest(organ="liver", sigma=2.0, ddim_steps=20, keep_intermediates=True)
    assert r.given() == ["sigma", "ddim_steps", "keep_intermediates"]
    assert r.unused("model-based", [Stage.EARLY]) == ["sigma", "ddim_steps", "keep_intermediates"]
    assert r.unused("diffusion", [Stage.EARLY]) == ["ddim_steps"]
    assert r.unused("diffusion", [Stage.EARLY, Stage.MID_LATE]) == []


def test_ellipsoid_outside_the_image_names_the_centre():
    g = Geometry((10, 10, 10), (2.0, 2.0, 2.0), (0.0, 0.0, 0.0))
    e = Ellipsoid((5, 5, 50), (3, 3, 3), voxel=True)
    with pytest.raises(OptionError, match=r"ellipsoid centre 5,5,50: lies outside the image .*10 x 10 x 10 voxels"):
        e.build(g, seed=0)
    mask, entry = Ellipsoid((4, 4, 4), (3, 3, 3), voxel=True).build(g, seed=0)
    assert mask.shape == (10, 10, 10) and mask[4, 4, 4] and entry["ellipsoid"]["centre_world_mm_lps"] == [8.0, 8.0, 8.0]


def test_engine_runs_a_request_and_says_what_was_unused(tmp_path):
    from backend.phantom import make_phantom
    from backend.synthesis.engine import SynthesisEngine

    ct, labels = make_phantom(0)[:2]
    organ = labels.array == 5
    request = SynthesisRequest(organ="liver", tumor=Generated("tiny", 1), method="model-based", seed=2, sigma=1.0)
    result = SynthesisEngine(tmp_path, device="cpu").run(request, ct, organ)
    assert result.unused == ["sigma"] and result.provenance["method"] == "model-based"
    assert result.provenance["weights_sha256"] == {} and result.tumor_mask.any()
    again = SynthesisEngine(tmp_path, device="cpu").synthesize(ct, organ, organ="liver", size="tiny", count=1,
                                                               method="model-based", seed=2, sigma=1.0)
    np.testing.assert_array_equal(again.ct.array, result.ct.array)  # the keyword form is the same request
