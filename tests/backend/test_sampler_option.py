"""The opt-in mid/late sampler (``SynthesisRequest.sampler``, ``--sampler``): the release's DDIM stays the default,
bit for bit; DPM-Solver++ runs only when asked for and says so in the provenance."""

import numpy as np
import pytest
import torch

from backend.cli import main
from backend.diffusion.ddim import DDIMScheduler
from backend.diffusion.dpm_solver import DPMSolverMultistepScheduler
from backend.errors import DiffTumorError
from backend.io import Geometry, Volume
from backend.synthesis.engine import SynthesisEngine
from backend.synthesis.masks import ellipsoid_mask
from backend.synthesis.request import OptionError, SynthesisRequest, UserMask
from backend.synthesis.stage import Stage


def test_request_checks_the_sampler_and_its_default_steps():
    with pytest.raises(OptionError) as info:
        SynthesisRequest(organ="liver", sampler="euler")
    assert str(info.value) == "sampler euler: choose one of ddim, dpm++"
    default = SynthesisRequest(organ="liver")
    assert default.sampler_name == "ddim" and default.steps == 50 and default.settings()["sampler"] == "ddim"
    assert "sampler" not in default.given()
    fast = SynthesisRequest(organ="liver", sampler="dpm++")
    assert fast.steps == 15 and fast.settings()["sampler"] == "dpm++"
    assert SynthesisRequest(organ="liver", sampler="dpm++", ddim_steps=10).steps == 10
    assert fast.unused("diffusion", [Stage.EARLY]) == ["sampler"]  # early tumours use the ancestral sampler
    assert fast.unused("diffusion", [Stage.EARLY, Stage.MID_LATE]) == []


def test_default_mid_late_sampler_is_the_released_ddim_50(parity_dir, parity_outputs):
    engine = SynthesisEngine(parity_dir, device="cpu")
    request = SynthesisRequest(organ="liver")
    models = engine.stage_models("liver", "mid_late", request.steps, request.sampler_name)
    assert type(models.scheduler) is DDIMScheduler and models.steps == 50
    assert torch.equal(models.scheduler.timesteps.flip(0), parity_outputs["ddim_timesteps"])
    fast = engine.stage_models("liver", "mid_late", 15, "dpm++")
    assert isinstance(fast.scheduler, DPMSolverMultistepScheduler) and len(fast.scheduler.timesteps) == 15
    assert fast.unet is not None and fast is not models


def _synthetic_ct():
    rng = np.random.default_rng(0)
    a = rng.normal(-1000, 10, (40, 96, 96))
    organ = np.zeros(a.shape, bool)
    organ[8:32, 20:76, 20:76] = True
    a[organ] = rng.normal(55, 8, organ.sum())
    g = Geometry((96, 96, 40), (0.8, 0.8, 2.5), (5.0, -3.0, 100.0), (-1, 0, 0, 0, -1, 0, 0, 0, 1))
    return Volume(a.astype(np.int16), g), organ


@pytest.fixture
def tiny(tmp_path):
    import tiny_weights as tw

    ae = tw.autoencoder(tmp_path / tw.AE_NAME)
    tw.diffusion(tmp_path / "liver_early.pt", ae, T=4, stage="early")
    tw.diffusion(tmp_path / "liver_noearly.pt", ae, T=10, stage="noearly")
    return tmp_path


def test_default_and_explicit_ddim_are_bit_identical_and_dpm_differs(tiny, one_thread):
    ct, organ = _synthetic_ct()
    engine = SynthesisEngine(tiny, device="cpu")
    big = ellipsoid_mask(ct.geometry, (48, 48, 20), (14, 14, 14), voxel=True) & organ  # 28 mm: mid/late

    def run(steps=3, **kw):
        return engine.run(SynthesisRequest(organ="liver", tumor=UserMask(big), method="diffusion", seed=0, sigma=1.0,
                                           ddim_steps=steps, **kw), ct, organ)

    default, ddim, dpm = run(), run(sampler="ddim"), run(sampler="dpm++")
    assert np.array_equal(default.ct.array, ddim.ct.array)
    assert default.provenance["tumours"][0]["sampler"] == "DDIM 3 steps, eta 0 (T=10)"
    assert dpm.provenance["tumours"][0]["sampler"] == "DPM-Solver++(2M) 3 steps, logsnr_uniform grid (T=10)"
    assert not np.array_equal(default.ct.array, dpm.ct.array)
    assert np.array_equal(default.tumor_mask, dpm.tumor_mask)  # the sampler changes the texture, not the mask
    with pytest.raises(DiffTumorError, match=r"^DPM-Solver\+\+ steps 10: liver_noearly\.pt was trained "
                                             r"with T = 10 steps; give 1 to 9 \(DPM-Solver\+\+"):
        run(sampler="dpm++", steps=10)  # DDIM takes 10 on T = 10; DPM-Solver++ calls t = 9 .. 1


def test_cli_sampler_flag(tiny, tmp_path, capsys, one_thread):
    from backend.io import write_image

    ct, organ = _synthetic_ct()
    write_image(ct, tmp_path / "ct.nii.gz")
    write_image(Volume(organ.astype(np.uint8), ct.geometry), tmp_path / "seg.nii.gz")
    common = ["synthesize", "--ct", str(tmp_path / "ct.nii.gz"), "--organs", str(tmp_path / "seg.nii.gz"),
              "--organ", "liver", "--organ-label", "1", "--center", "48,48,20", "--voxel", "--radii", "14,14,14",
              "--stage", "mid_late", "--method", "diffusion", "--weights", str(tiny), "--device", "cpu"]
    assert main([*common, "--sampler", "dpm++", "--steps", "4", "--out", str(tmp_path / "a")]) == 0
    import json

    prov = json.loads((tmp_path / "a" / "provenance.json").read_text())
    assert prov["settings"]["sampler"] == "dpm++" and prov["settings"]["ddim_steps"] == 4
    assert prov["tumours"][0]["sampler"].startswith("DPM-Solver++(2M) 4 steps")
    capsys.readouterr()
    assert main([*common, "--sampler", "heun", "--out", str(tmp_path / "b")]) == 2
    assert capsys.readouterr().err.strip() == "difftumor: error: --sampler heun: choose one of ddim, dpm++"
    assert not (tmp_path / "b").exists()
