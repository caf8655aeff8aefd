"""Parity of the stage-2 re-implementation with the released code (fixtures in shared/reference/parity).

Tolerances are those of parity/README.md section 3: the 2e-5 * max(1, max|ref|) rule for single
network evaluations and the 50-step DDIM, and the looser count/mean rule for the 4-step ancestral chain.
"""

from __future__ import annotations

import pytest
import torch

from backend.diffusion.ddim import DDIMScheduler
from backend.diffusion.ddpm import DDPMScheduler
from backend.diffusion.inferer import DiffusionInferer, build_condition, decode_latent, normalize_latent
from backend.diffusion.official import load_diffusion, official_state_dict, same_state, save_official
from backend.diffusion.schedule import SCHEDULE_BUFFER_NAMES
from backend.errors import DiffTumorError


@pytest.fixture(autouse=True)
def _two_threads():
    before = torch.get_num_threads()
    torch.set_num_threads(min(2, before))
    yield
    torch.set_num_threads(before)


def assert_close_rule(got: torch.Tensor, ref: torch.Tensor, rel: float = 2e-5):
    tol = rel * max(1.0, ref.abs().max().item())
    diff = (got - ref).abs().max().item()
    assert diff <= tol, f"max |diff| {diff:.3g} > {tol:.3g}"


@pytest.fixture(scope="module")
def early(parity_dir):
    return load_diffusion(parity_dir / "liver_early.pt")


@pytest.fixture(scope="module")
def noearly(parity_dir):
    return load_diffusion(parity_dir / "liver_noearly.pt")


def test_load_reads_T_schedule_and_embedded_vqgan(early, noearly, parity_dir):
    assert early.timesteps == 4 and noearly.timesteps == 200
    assert early.step == 60000
    assert len(early.vqgan_state) == 154 and "codebook.embeddings" in early.vqgan_state
    assert not early.unet.training
    # stored buffers equal the scheduler's own (recomputed) buffers
    sched = early.ddpm_scheduler()
    for name in SCHEDULE_BUFFER_NAMES:
        torch.testing.assert_close(early.schedule[name], getattr(sched, name), rtol=1e-6, atol=1e-7)
    raw = torch.load(parity_dir / "liver_noearly.pt", map_location="cpu", weights_only=True)["ema"]
    assert same_state(raw, {"vqgan." + k: v for k, v in noearly.vqgan_state.items()})
    assert same_state(early.vqgan_state, noearly.vqgan_state)


def test_expected_T_and_channels_mismatch_is_one_clear_error(parity_dir, tmp_path):
    with pytest.raises(DiffTumorError, match="T = 4 diffusion steps, expected T = 200"):
        load_diffusion(parity_dir / "liver_early.pt", timesteps=200)
    with pytest.raises(DiffTumorError, match="17 input / 8 output channels, expected 9 / 4"):
        load_diffusion(parity_dir / "liver_early.pt", latent_channels=4)
    with pytest.raises(DiffTumorError, match="not found"):
        load_diffusion(tmp_path / "missing.pt")
    bad = tmp_path / "bad.pt"
    bad.write_bytes(b"not a checkpoint")
    with pytest.raises(DiffTumorError, match="not a readable diffusion checkpoint"):
        load_diffusion(bad)


def test_unet_early_forward(early, parity_outputs):
    P = parity_outputs
    with torch.inference_mode():
        out = early.unet(P["x_t"], torch.tensor([2]), P["cond"])
    assert_close_rule(out, P["unet_out_early_t2"])


def test_ema_not_model_weights_are_used(parity_dir, early, parity_outputs):
    P = parity_outputs
    online = load_diffusion(parity_dir / "liver_early.pt", use_ema=False)
    with torch.inference_mode():
        out = online.unet(P["x_t"], torch.tensor([2]), P["cond"])
    assert (out - P["unet_out_early_t2"]).abs().max() > 1e-2


def test_unet_noearly_forward(noearly, parity_outputs):
    P = parity_outputs
    with torch.inference_mode():
        out = noearly.unet(P["x_t"], torch.tensor([101]), P["cond"])
    assert_close_rule(out, P["unet_out_noearly_t101"])
    assert_close_rule(out - P["x_t"], P["unet_out_noearly_t101"] - P["x_t"])


def test_early_single_steps_given_reference(early, parity_outputs):
    P = parity_outputs
    sched = early.ddpm_scheduler()
    xs, eps, noise = P["early_x_seq"], P["early_eps_seq"], P["early_noise"]
    for i, t in enumerate((3, 2, 1, 0)):
        x_prev, _ = sched.step(eps[i], t, xs[i], noise=noise[i + 1])
        ref = xs[i + 1] if i < 3 else P["early_sample_latent"]
        assert (x_prev - ref).abs().max().item() <= 1e-4


def test_early_ancestral_sample_from_given_noise(early, parity_outputs):
    P = parity_outputs
    inferer = DiffusionInferer(early.ddpm_scheduler())
    steps = []
    unet = early.unet

    def recording(x, t, cond):
        steps.append((x.clone(), unet(x, t, cond)))
        return steps[-1][1]

    with torch.inference_mode():
        z = inferer.sample(recording, P["cond"], noise=P["early_noise"][:4], latent_channels=8)
    assert len(steps) == 4 and torch.equal(steps[0][0], P["early_noise"][0])
    assert_close_rule(steps[0][1], P["early_eps_seq"][0])
    ref = P["early_sample_latent"]
    diff = (z - ref).abs()
    assert diff.max().item() <= 5e-3
    assert int((diff > 1e-4).sum()) <= 200
    assert diff.mean().item() <= 2e-5
    assert z.abs().max() <= 1.0  # the last step returns the clipped x0 estimate


@pytest.mark.slow  # 50 full-size U-Net evaluations: ~20 s on 2 idle cores
def test_ddim_50_steps_from_given_xT(noearly, parity_outputs):
    P = parity_outputs
    sched = noearly.ddim_scheduler(50)
    assert torch.equal(sched.timesteps.flip(0), P["ddim_timesteps"])
    inferer = DiffusionInferer(sched)
    with torch.inference_mode():
        z = inferer.sample(noearly.unet, P["cond"], noise=P["ddim_xT"])
    assert_close_rule(z, P["ddim_sample_latent"])


def test_condition_from_reference_latent(parity_outputs, parity_dir):
    P = parity_outputs
    emb = torch.load(parity_dir / "liver_early.pt", map_location="cpu", weights_only=True)["ema"][
        "vqgan.codebook.embeddings"
    ]
    z_norm = normalize_latent(P["z_enc"], emb.min(), emb.max())
    assert_close_rule(z_norm, P["z_enc_norm"])
    mask = P["tumor_mask"].float().permute(0, 1, 4, 2, 3)
    cond = build_condition(z_norm, mask)
    assert_close_rule(cond, P["cond"])
    assert int((cond[:, 8] > 0).sum()) == 24  # tumour voxels surviving the nearest 96 -> 24 resize


def test_condition_through_autoencoder(parity_outputs, parity_dir):
    from backend.diffusion.inferer import encode_condition
    from backend.vqgan import official

    P = parity_outputs
    vqgan = official.load_autoencoder(parity_dir / "AutoencoderModel.ckpt").eval()
    volume = P["x"].permute(0, 1, 4, 2, 3)
    mask = P["tumor_mask"].float().permute(0, 1, 4, 2, 3)
    with torch.inference_mode():
        cond = encode_condition(vqgan, volume, mask)
    assert_close_rule(cond, P["cond"])
    early = load_diffusion(parity_dir / "liver_early.pt")
    assert same_state(early.vqgan_state, vqgan)
    assert early.autoencoder(vqgan) is vqgan  # equal weights: one copy in memory
    other = official.load_autoencoder(parity_dir / "AutoencoderModel.ckpt")
    with torch.no_grad():
        other.decoder.conv_last.conv.bias.add_(1.0)
    embedded = early.autoencoder(other)
    assert embedded is not other and same_state(early.vqgan_state, embedded)
    # de-normalise + re-quantise + decode the reference early latent (decode_latent)
    with torch.inference_mode():
        decoded = decode_latent(vqgan, P["early_sample_latent"])
    assert_close_rule(decoded, P["early_decoded"])


def test_written_official_layout_round_trips(early, tmp_path):
    path = save_official(
        tmp_path / "x_early.pt",
        model=early.unet,
        ema=early.unet,
        scheduler=DDPMScheduler(4),
        vqgan_state=early.vqgan_state,
        step=7,
    )
    blob = torch.load(path, map_location="cpu", weights_only=True)
    assert set(blob) == {"step", "model", "ema", "scaler", "difftumor"}
    assert len(blob["ema"]) == 466
    again = load_diffusion(path)
    assert again.step == 7 and again.timesteps == 4
    assert same_state(early.unet.state_dict(), again.unet)
    assert again.unet.config == early.unet.config
    sd = official_state_dict(early.unet, DDIMScheduler(4, num_inference_steps=2), None)
    assert len(sd) == 312
