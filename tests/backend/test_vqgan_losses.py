"""VQGAN loss pieces: discriminators (2D/3D), hinge, feature matching, slices, LPIPS loading."""

from __future__ import annotations

import json

import pytest
import torch

from backend.errors import DiffTumorError
from backend.vqgan.discriminator import NLayerDiscriminator
from backend.vqgan.losses import (
    LossConfig,
    VQGANLoss,
    disc_factor,
    feature_matching,
    generator_adv_loss,
    hinge_d_loss,
    l1_recon,
    random_plane_slices,
)
from backend.vqgan.perceptual import LPIPS, build_lpips


@pytest.fixture(scope="module")
def official_keys(shared_dir):
    layout = json.loads((shared_dir / "reference" / "difftumor_official_layout.json").read_text(encoding="utf-8"))["vqgan"]
    return {k: tuple(s) for k, s, _ in layout["state_dict"]}


@pytest.mark.parametrize("dims, prefix, count", [(2, "image_discriminator.", 2_764_481), (3, "video_discriminator.", 11_049_665)])
def test_discriminator_matches_official_layout(official_keys, dims, prefix, count):
    d = NLayerDiscriminator(1, 64, 3, spatial_dims=dims)
    ours = {prefix + k: tuple(v.shape) for k, v in d.state_dict().items()}
    assert ours == {k: s for k, s in official_keys.items() if k.startswith(prefix)}
    assert sum(p.numel() for p in d.parameters()) == count


@pytest.mark.parametrize("dims", [2, 3])
def test_discriminator_outputs(dims):
    d = NLayerDiscriminator(1, 8, 3, spatial_dims=dims)
    logits, feats = d(torch.randn(2, 1, *(16,) * dims))
    assert len(feats) == 5 and feats[-1] is logits and logits.shape[:2] == (2, 1)
    with pytest.raises(ValueError, match="spatial_dims must be 2 or 3"):
        NLayerDiscriminator(spatial_dims=1)


def test_scalar_losses():
    assert l1_recon(torch.ones(2, 3), torch.zeros(2, 3)).item() == 4.0
    real, fake = torch.tensor([2.0, 0.0]), torch.tensor([-2.0, 1.0])
    assert hinge_d_loss(real, fake).item() == pytest.approx(0.5 * (0.5 + 1.0))
    assert generator_adv_loss(fake).item() == pytest.approx(0.5)
    f = [torch.ones(2), torch.ones(2) * 2, torch.zeros(1)]
    r = [torch.zeros(2), torch.zeros(2), torch.ones(1) * 100]  # the logits (last) are not matched
    assert feature_matching(f, r, n_layers=3).item() == pytest.approx(1.0 + 2.0)
    assert disc_factor(9, 10) == 0.0 and disc_factor(10, 10) == 1.0


def test_random_plane_slices_are_real_slices():
    x = torch.arange(2 * 4 * 5 * 6, dtype=torch.float32).view(2, 1, 4, 5, 6)
    g = torch.Generator().manual_seed(0)
    (a, b, c), (a2, _, _) = random_plane_slices(x, x * 2, generator=g)
    assert a.shape == (2, 1, 5, 6) and b.shape == (2, 1, 4, 6) and c.shape == (2, 1, 4, 5)
    assert torch.equal(a2, a * 2)
    for i in range(2):
        assert any(torch.equal(a[i, 0], x[i, 0, k]) for k in range(4))
        assert any(torch.equal(b[i, 0], x[i, 0, :, k]) for k in range(5))
        assert any(torch.equal(c[i, 0], x[i, 0, :, :, k]) for k in range(6))


def test_perceptual_off_without_weights_warns():
    with pytest.warns(UserWarning, match="perceptual loss is OFF"):
        assert build_lpips(None, None) is None


def test_lpips_loads_torchvision_format(tmp_path, official_keys):
    torch.manual_seed(0)
    ref = LPIPS()
    vgg = {}
    for k, v in ref.net.state_dict().items():  # slice<s>.<idx>.<w|b> -> features.<idx>.<w|b>
        _, idx, kind = k.split(".")
        vgg[f"features.{idx}.{kind}"] = torch.randn_like(v) * 0.05
    for i in (31, 32):  # torchvision files also hold classifier weights: ignored
        vgg[f"classifier.{i}.weight"] = torch.zeros(2, 2)
    lin = {f"lin{k}.model.1.weight": torch.rand(1, c, 1, 1) for k, c in enumerate((64, 128, 256, 512, 512))}
    torch.save(vgg, tmp_path / "vgg16.pth")
    torch.save(lin, tmp_path / "vgg.pth")
    model = build_lpips(tmp_path / "vgg16.pth", tmp_path / "vgg.pth")
    assert {"perceptual_model." + k: tuple(v.shape) for k, v in model.state_dict().items()} == {
        k: s for k, s in official_keys.items() if k.startswith("perceptual_model.")
    }
    assert torch.equal(getattr(model.net.slice3, "12").weight, vgg["features.12.weight"])
    a, b = torch.rand(2, 1, 32, 32) * 2 - 1, torch.rand(2, 1, 32, 32) * 2 - 1
    assert torch.allclose(model(a, a), torch.zeros(2), atol=1e-6)
    assert (model(a, b) > 0).all()
    torch.save({"features.0.weight": torch.zeros(3)}, tmp_path / "bad.pth")
    with pytest.raises(DiffTumorError, match="bad.pth: not the expected LPIPS/VGG16 weights"):
        build_lpips(tmp_path / "bad.pth", tmp_path / "vgg.pth")


def test_loss_module_steps_and_official_extras(parity_dir):
    from backend.vqgan.official import load_autoencoder_with_extras

    _, extras, _ = load_autoencoder_with_extras(parity_dir / "AutoencoderModel.ckpt")
    with pytest.warns(UserWarning):
        full = VQGANLoss(LossConfig())
    assert full.load_extras(extras) == ["image_discriminator", "video_discriminator"]
    with pytest.warns(UserWarning):
        loss = VQGANLoss(LossConfig(disc_channels=8, discriminator_iter_start=2))
    x = torch.rand(2, 1, 16, 16, 16) * 2 - 1
    x_hat = (x + 0.1 * torch.randn_like(x)).requires_grad_()
    g0, logs0 = loss.generator_loss(x, x_hat, torch.tensor(0.1), step=0)
    assert "g_adv" not in logs0 and g0.item() == pytest.approx(4 * (x_hat - x).abs().mean().item() + 0.1, rel=1e-5)
    g2, logs2 = loss.generator_loss(x, x_hat, torch.tensor(0.1), step=2)
    assert "g_adv" in logs2 and "feat_match" in logs2
    g2.backward()
    assert x_hat.grad is not None
    d0, _ = loss.discriminator_loss(x, x_hat, step=0)
    d2, _ = loss.discriminator_loss(x, x_hat, step=2)
    assert d0.item() == 0.0 and d2.item() > 0
