"""One stage rule for training and synthesis (backend/synthesis/stage.py)."""

import numpy as np
import pytest

from backend.errors import DiffTumorError
from backend.io import Geometry
from backend.synthesis.engine import planned_stages
from backend.synthesis.stage import Stage, stage_of, stage_of_diameter


def _ball(shape, centre, radius):
    zz, yy, xx = np.indices(shape)
    return (zz - centre[0]) ** 2 + (yy - centre[1]) ** 2 + (xx - centre[2]) ** 2 <= radius**2


def test_spellings_parse_to_two_stages():
    assert Stage.parse("early") is Stage.EARLY
    assert Stage.parse("noearly") is Stage.parse("mid_late") is Stage.parse("mid/late") is Stage.MID_LATE
    assert Stage.MID_LATE.weights_name == "noearly" and Stage.EARLY.weights_name == "early"
    assert Stage.EARLY in {"early"} and "mid_late" in {Stage.MID_LATE} and f"{Stage.MID_LATE}" == "mid_late"
    with pytest.raises(DiffTumorError, match="stage 'large': choose early or mid_late"):
        Stage.parse("large")


def test_threshold_is_20_mm_and_scales_with_spacing():
    assert stage_of_diameter(19.9) is Stage.EARLY and stage_of_diameter(20.0) is Stage.MID_LATE
    ball = _ball((30, 30, 30), (15, 15, 15), 6)  # 12 voxels across
    assert stage_of(ball, (1.0, 1.0, 1.0)) is Stage.EARLY
    assert stage_of(ball, (2.0, 2.0, 2.0)) is Stage.MID_LATE  # 24 mm


def test_a_diagonal_tumour_is_measured_by_its_diameter_not_its_bounding_box():
    """25 mm along the diagonal: every bounding-box extent is under 20 mm (training's old rule said early)."""
    rod = np.zeros((40, 40, 40), bool)
    for t in np.linspace(0.0, 1.0, 200):
        p = np.rint(np.array([8, 8, 8]) + t * np.array([14, 14, 14])).astype(int)
        rod[p[0] - 1:p[0] + 2, p[1] - 1:p[1] + 2, p[2] - 1:p[2] + 2] = True
    extents = [s.stop - s.start for s in np.s_[tuple(slice(a.min(), a.max() + 1) for a in np.nonzero(rod))]]
    assert max(extents) < 20
    assert stage_of(rod, (1.0, 1.0, 1.0)) is Stage.MID_LATE


def test_planned_stages_follow_the_largest_tumour_of_each_crop_group():
    """Two 10 mm tumours 40 mm apart share one crop: early (the group's union is 50 mm across, which the
    widget's old rule took for mid/late)."""
    g = Geometry((64, 64, 64), (1.0, 1.0, 1.0), (0.0, 0.0, 0.0))
    two = _ball(g.shape, (32, 32, 12), 5) | _ball(g.shape, (32, 32, 52), 5)
    assert planned_stages(two, g) == [Stage.EARLY]
    assert planned_stages(two | _ball(g.shape, (32, 12, 32), 12), g) == [Stage.MID_LATE]
