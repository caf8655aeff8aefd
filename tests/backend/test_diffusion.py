"""Stage-2 building blocks on tiny networks: Unet3D layout, cosine schedule, DDPM/DDIM steps, inferer."""

from __future__ import annotations

import json

import pytest
import torch

from backend.diffusion.ddim import DDIMScheduler, ddim_timesteps
from backend.diffusion.ddpm import DDPMScheduler
from backend.diffusion.inferer import (
    DiffusionInferer,
    build_condition,
    denormalize_latent,
    mask_code,
    normalize_latent,
)
from backend.diffusion.schedule import SCHEDULE_BUFFER_NAMES, cosine_betas, schedule_buffers, schedule_mismatch
from backend.diffusion.unet import Unet3D, Unet3DConfig

TINY = Unet3DConfig(dim=8, dim_mults=(1, 2), channels=5, out_dim=2, attn_heads=2, attn_dim_head=8, rotary_dim=8)


pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture
def tiny():
    torch.manual_seed(0)
    return Unet3D(TINY).eval()


@pytest.fixture(scope="module")
def layout(shared_dir):
    return json.loads((shared_dir / "reference" / "difftumor_official_layout.json").read_text(encoding="utf-8"))["diffusion"]


# --- Unet3D ------------------------------------------------------------------------------------------
def test_full_size_state_dict_equals_released_layout(layout):
    model = Unet3D()
    sd = model.state_dict()
    ref = {k[len("denoise_fn."):]: shape for k, shape, _ in layout["state_dict"] if k.startswith("denoise_fn.")}
    assert set(sd) == set(ref)
    assert all(list(sd[k].shape) == ref[k] for k in ref)
    assert sum(p.numel() for p in model.parameters()) == 6_018_576
    assert sum(k.endswith("rotary_emb.freqs") for k in sd) == 10


def test_rotary_freqs_are_lang_frequencies():
    model = Unet3D()
    freqs = model.state_dict()["init_temporal_attn.fn.fn.fn.rotary_emb.freqs"]
    torch.testing.assert_close(freqs, 1.0 / 10000 ** (torch.arange(0, 32, 2).float() / 32))


@pytest.mark.parametrize("dtype,dim", [(torch.float32, 32), (torch.float64, 32), (torch.float32, 40), (torch.bfloat16, 32)])
def test_rotary_rotation_equals_the_interleaved_pair_formula(dtype, dim):
    from backend.diffusion.attention import RotaryEmbedding

    torch.manual_seed(0)
    r = RotaryEmbedding(32)
    cos, sin = r.cos_sin(24)
    t = torch.randn(3, 8, 24, dim).to(dtype)
    ref = torch.float64 if dtype == torch.float64 else torch.float32
    x1, x2 = t[..., 0:32:2].to(ref), t[..., 1:32:2].to(ref)  # interleaved pairs (x1, x2)
    c, s_ = cos.to(ref), sin.to(ref)
    want = torch.stack((x1 * c - x2 * s_, x2 * c + x1 * s_), dim=-1).flatten(-2)
    got = RotaryEmbedding.rotate(t, cos, sin)
    assert got.shape == t.shape and (got.dtype == dtype or dtype == torch.bfloat16)  # bf16: promoted, as before
    tol = 0 if dtype == torch.float32 else (1e-12 if dtype == torch.float64 else 2e-2)
    assert (got[..., :32].to(ref) - want).abs().max() <= tol
    assert torch.equal(got[..., 32:], t[..., 32:])  # features beyond the rotary dim pass unchanged
    tg = torch.randn(2, 2, 24, 32, requires_grad=True)  # trains through the complex view too
    RotaryEmbedding.rotate(tg, cos, sin).square().sum().backward()
    assert tg.grad is not None and torch.isfinite(tg.grad).all()


@pytest.mark.parametrize("frames", [4, 6])
def test_tiny_unet_shapes_and_time_dependence(tiny, frames):
    x = torch.randn(2, 2, frames, 8, 8)
    cond = torch.randn(2, 3, frames, 8, 8)
    with torch.no_grad():
        a = tiny(x, torch.tensor([0, 3]), cond)
        b = tiny(x, torch.tensor([5, 3]), cond)
    assert a.shape == x.shape
    assert not torch.allclose(a[0], b[0]) and torch.allclose(a[1], b[1], atol=1e-6)


def test_slices_interact_only_through_temporal_attention(tiny):
    # perturbing one frame changes the other frames (temporal attention is active)
    x = torch.randn(1, 2, 4, 8, 8)
    cond = torch.randn(1, 3, 4, 8, 8)
    x2 = x.clone()
    x2[:, :, 0] += 1.0
    with torch.no_grad():
        d = (tiny(x, torch.tensor([1]), cond) - tiny(x2, torch.tensor([1]), cond)).abs()
    assert d[:, :, 3].max() > 0


def test_unet_rejects_bad_arguments(tiny):
    with pytest.raises(ValueError, match="input channels"):
        tiny(torch.randn(1, 2, 4, 8, 8), torch.tensor([0]), torch.randn(1, 2, 4, 8, 8))
    with pytest.raises(ValueError, match="divisible"):
        tiny(torch.randn(1, 2, 4, 6, 6)[..., :5, :5], torch.tensor([0]), torch.randn(1, 3, 4, 5, 5))
    with pytest.raises(ValueError, match="resnet_groups"):
        Unet3DConfig(dim=12)
    with pytest.raises(ValueError, match="dim must be"):
        Unet3DConfig(dim=7)


def test_unet_state_dict_round_trip_gives_same_output(tiny, tmp_path):
    torch.save({"cfg": TINY.to_dict(), "sd": tiny.state_dict()}, tmp_path / "m.pt")
    blob = torch.load(tmp_path / "m.pt", weights_only=True)
    again = Unet3D(Unet3DConfig(**blob["cfg"])).eval()
    again.load_state_dict(blob["sd"], strict=True)
    x, c = torch.randn(1, 2, 4, 8, 8), torch.randn(1, 3, 4, 8, 8)
    with torch.no_grad():
        assert torch.equal(tiny(x, torch.tensor([2]), c), again(x, torch.tensor([2]), c))


# --- schedule ----------------------------------------------------------------------------------------
def test_cosine_schedule_matches_released_values(layout):
    ref = layout["schedule_buffers_early_T4"]
    got = schedule_buffers(cosine_betas(4))
    assert list(got) == list(SCHEDULE_BUFFER_NAMES)
    for name, (_, values) in ref.items():
        torch.testing.assert_close(got[name], torch.tensor(values), rtol=1e-5, atol=1e-6)
    ref200 = layout["schedule_buffers_noearly_T200_first5_last2"]
    got200 = schedule_buffers(cosine_betas(200))
    for name, values in ref200.items():
        sel = torch.cat((got200[name][:5], got200[name][-2:]))
        torch.testing.assert_close(sel, torch.tensor(values), rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("T", [1, 7, 1000])
def test_cosine_schedule_any_T(T):
    betas = cosine_betas(T)
    assert betas.dtype == torch.float64 and betas.shape == (T,)
    assert (betas >= 0).all() and (betas <= 0.9999).all()
    buffers = schedule_buffers(betas)
    assert schedule_mismatch(buffers) is None
    buffers["betas"] = buffers["betas"] * 1.1
    assert "betas" in schedule_mismatch(buffers)
    with pytest.raises(ValueError, match="timesteps must be a positive integer, got 0"):
        cosine_betas(0)


def test_scheduler_state_dict_is_the_twelve_released_buffers():
    assert list(DDPMScheduler(4).state_dict()) == list(SCHEDULE_BUFFER_NAMES)
    with pytest.raises(ValueError, match="prediction_type 'v'"):
        DDPMScheduler(4, prediction_type="v")


def test_add_noise_and_x0_round_trip():
    s = DDPMScheduler(10)
    x0, eps = torch.randn(3, 2, 2, 4, 4), torch.randn(3, 2, 2, 4, 4)
    t = torch.tensor([0, 4, 9])
    xt = s.add_noise(x0, eps, t)
    for i in range(3):
        ti = int(t[i])
        torch.testing.assert_close(s.predict_x0_from_eps(xt[i], ti, eps[i]), x0[i], rtol=1e-4, atol=2e-3)


# --- samplers ----------------------------------------------------------------------------------------
def test_ddpm_step_rules():
    s = DDPMScheduler(4)
    x, eps, z = torch.randn(1, 2, 2, 4, 4), torch.randn(1, 2, 2, 4, 4), torch.randn(1, 2, 2, 4, 4)
    prev, x0 = s.step(eps, 3, x, noise=z)
    assert x0.abs().max() <= 1.0  # clipped as released
    expected_mean = s.posterior_mean_coef1[3] * x0 + s.posterior_mean_coef2[3] * x
    torch.testing.assert_close(prev, expected_mean + torch.exp(0.5 * s.posterior_log_variance_clipped[3]) * z)
    last, x0_last = s.step(eps, 0, x, noise=z)  # no noise at t = 0: returns the clipped x0
    torch.testing.assert_close(last, x0_last)
    with pytest.raises(ValueError, match="DDIMScheduler"):
        s.set_timesteps(2)


def test_ddim_timesteps_uniform_plus_one():
    assert ddim_timesteps(200, 50).tolist() == list(range(1, 198, 4))
    assert ddim_timesteps(200, 50, "uniform").tolist() == list(range(0, 197, 4))
    s = DDIMScheduler(200)
    assert int(s.timesteps[0]) == 197 and int(s.timesteps[-1]) == 1
    with pytest.raises(ValueError, match="uniform"):
        ddim_timesteps(10, 10)
    with pytest.raises(ValueError, match="spacing"):
        DDIMScheduler(10, spacing="quadratic")


def test_ddim_first_step_uses_abar0_and_is_deterministic():
    s = DDIMScheduler(200, num_inference_steps=50)
    x, eps = torch.randn(1, 2, 2, 4, 4), torch.randn(1, 2, 2, 4, 4)
    prev, x0 = s.step(eps, 1, x)
    a0 = s.alphas_cumprod[0]
    torch.testing.assert_close(prev, a0.sqrt() * x0 + (1 - a0).sqrt() * eps)
    s_eta = DDIMScheduler(200, num_inference_steps=50, eta=1.0)
    g1, g2 = torch.Generator().manual_seed(3), torch.Generator().manual_seed(3)
    assert torch.equal(s_eta.step(eps, 101, x, generator=g1)[0], s_eta.step(eps, 101, x, generator=g2)[0])
    assert not torch.equal(s_eta.step(eps, 101, x)[0], s.step(eps, 101, x)[0])


@pytest.mark.parametrize("make", [lambda: DDPMScheduler(4), lambda: DDIMScheduler(20, num_inference_steps=5, eta=0.5)])
def test_sampling_is_reproducible_with_generator_or_explicit_noise(tiny, make):
    sched = make()
    inferer = DiffusionInferer(sched)
    cond = torch.randn(1, 3, 4, 8, 8)
    with torch.no_grad():
        a = inferer.sample(tiny, cond, generator=torch.Generator().manual_seed(7))
        b = inferer.sample(tiny, cond, generator=torch.Generator().manual_seed(7))
        c = inferer.sample(tiny, cond, generator=torch.Generator().manual_seed(8))
        # the same draws handed over explicitly, in the documented order [x_T, z_1, ...]
        g = torch.Generator().manual_seed(7)
        n_noise = sum(sched.needs_noise(int(t)) for t in sched.timesteps)
        noises = [torch.randn(a.shape, generator=g) for _ in range(1 + n_noise)]
        d = inferer.sample(tiny, cond, noise=noises)
    assert a.shape == (1, 2, 4, 8, 8)
    assert torch.equal(a, b) and not torch.equal(a, c)
    torch.testing.assert_close(a, d)
    with pytest.raises(ValueError, match="entries"):
        inferer.sample(tiny, cond, noise=noises[:2])


def test_iter_sample_reports_progress(tiny):
    inferer = DiffusionInferer(DDIMScheduler(20, num_inference_steps=5))
    it = inferer.iter_sample(tiny, torch.randn(1, 3, 4, 8, 8), generator=torch.Generator().manual_seed(0))
    progress = []
    with torch.no_grad():
        try:
            while True:
                progress.append(next(it))
        except StopIteration as stop:
            out = stop.value
    assert progress == [(i, 5) for i in range(1, 6)] and out.shape == (1, 2, 4, 8, 8)


# --- training objective and condition ----------------------------------------------------------------
@pytest.mark.parametrize("prediction_type,loss", [("epsilon", "l1"), ("sample", "l2")])
def test_training_forward(tiny, prediction_type, loss):
    inferer = DiffusionInferer(DDPMScheduler(10, prediction_type=prediction_type), loss=loss)
    x0, cond = torch.rand(2, 2, 4, 8, 8) * 2 - 1, torch.randn(2, 3, 4, 8, 8)
    out = inferer(tiny, x0, cond, generator=torch.Generator().manual_seed(0))
    noise_target = prediction_type == "epsilon"
    assert not torch.equal(out["target"], x0) if noise_target else torch.equal(out["target"], x0)
    ref = (out["prediction"] - out["target"]).abs().mean() if loss == "l1" else ((out["prediction"] - out["target"]) ** 2).mean()
    torch.testing.assert_close(out["loss"], ref)
    out["loss"].backward()
    assert tiny.init_conv.weight.grad is not None
    with pytest.raises(ValueError, match="loss 'huber'"):
        DiffusionInferer(DDPMScheduler(4), loss="huber")


def test_latent_normalisation_round_trip_and_condition():
    z = torch.randn(1, 8, 4, 4, 4) * 3
    zn = normalize_latent(z, -4.9, 4.3)
    torch.testing.assert_close(denormalize_latent(zn, -4.9, 4.3), z)
    torch.testing.assert_close(normalize_latent(torch.tensor([-4.9, 4.3]), -4.9, 4.3), torch.tensor([-1.0, 1.0]))
    mask = torch.zeros(1, 1, 16, 16, 16)
    mask[..., 4, 8, 12] = 1  # on the nearest grid (every 4th voxel) -> survives
    mask[..., 5, 5, 5] = 1  # off the grid -> dropped
    code = mask_code(mask, (4, 4, 4))
    assert code.shape == (1, 1, 4, 4, 4) and set(code.unique().tolist()) == {-1.0, 1.0}
    assert code[0, 0, 1, 2, 3] == 1 and int((code > 0).sum()) == 1
    cond = build_condition(zn, mask)
    assert cond.shape == (1, 9, 4, 4, 4) and torch.equal(cond[:, :8], zn)
    with pytest.raises(ValueError, match="mask must be"):
        build_condition(zn, mask[0])
