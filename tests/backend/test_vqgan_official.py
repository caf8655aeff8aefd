"""Safe loading of official/own/plain checkpoints and parity with the official outputs."""

from __future__ import annotations

import os
import pickle
import re
import zipfile

import pytest
import torch

from backend.errors import DiffTumorError
from backend.vqgan import VQGAN, VQGANConfig, load_autoencoder, load_autoencoder_with_extras, safe_load


def _tol(ref: torch.Tensor) -> float:
    return 2e-5 * max(1.0, ref.abs().max().item())


@pytest.fixture(scope="module")
def official_ae(parity_dir):
    torch.set_num_threads(2)
    return load_autoencoder_with_extras(parity_dir / "AutoencoderModel.ckpt")


def test_official_ckpt_loads_strictly(official_ae, parity_dir):
    model, extras, info = official_ae
    assert info["format"] == "lightning" and info["cfg"]["model"]["n_codes"] == 16384
    assert model.config == VQGANConfig()
    assert not model.training
    assert len(extras) == 25 + 25 + 33  # discriminators + LPIPS recognised, not loaded into the VQGAN
    raw = safe_load(parity_dir / "AutoencoderModel.ckpt")["state_dict"]
    for k, v in model.state_dict().items():
        assert torch.equal(v, raw[k]), k


def test_parity_encode_and_indices(official_ae, parity_outputs):
    model = official_ae[0]
    ref = parity_outputs
    x = (ref["x"] * (1 - ref["tumor_mask"].float())).permute(0, 1, 4, 2, 3)  # masked volume, (B,1,Z,X,Y)
    with torch.inference_mode():
        z = model.encode(x)
        assert (z - ref["z_enc"]).abs().max().item() <= _tol(ref["z_enc"])
        assert torch.equal(model.codebook.lookup(ref["z_enc"]), ref["z_enc_indices"])
        assert torch.equal(model.quantize(z)[1], ref["z_enc_indices"])


@pytest.mark.parametrize(
    "latent, indices, decoded",
    [
        (None, "z_enc_indices", "decoded_of_z_enc"),
        # full-size decodes take ~5 s each on 2 free cores; the two sampler paths run as slow tests
        pytest.param("early_sample_latent_denorm", "early_indices", "early_decoded", marks=pytest.mark.slow),
        pytest.param("ddim_sample_latent_denorm", "ddim_indices", "ddim_decoded", marks=pytest.mark.slow),
    ],
)
def test_parity_decode(official_ae, parity_outputs, latent, indices, decoded):
    model, ref = official_ae[0], parity_outputs
    with torch.inference_mode():
        if latent is not None:
            assert torch.equal(model.codebook.lookup(ref[latent]), ref[indices])
        y = model.decode_indices(ref[indices])
    assert (y - ref[decoded]).abs().max().item() <= _tol(ref[decoded])


def test_latent_min_max_uses_embeddings(official_ae):
    lo, hi = official_ae[0].latent_min_max()
    assert lo == pytest.approx(-4.8994, abs=1e-4) and hi == pytest.approx(4.3468, abs=1e-4)


class _WritesFile:
    def __init__(self, target):
        self.target = target

    def __reduce__(self):
        return (os.system, (f"touch {self.target}",))


def test_malicious_zip_checkpoint_is_refused(tmp_path):
    marker = tmp_path / "pwned"
    path = tmp_path / "evil.ckpt"
    torch.save({"state_dict": {}, "hyper_parameters": _WritesFile(marker)}, path)
    with pytest.raises(DiffTumorError, match=r"evil\.ckpt: refusing to load: .*'(posix|os)\.system'"):
        load_autoencoder(path)
    assert not marker.exists()


def test_malicious_legacy_pickle_and_custom_class_refused(tmp_path):
    marker = tmp_path / "pwned2"
    path = tmp_path / "evil.pt"
    path.write_bytes(pickle.dumps(_WritesFile(marker), protocol=2))
    with pytest.raises(DiffTumorError, match="refusing to load"):
        safe_load(path)
    path2 = tmp_path / "custom.pt"
    torch.save({"x": VQGANConfig()}, path2)  # a harmless but unknown class is refused too
    with pytest.raises(DiffTumorError, match="VQGANConfig"):
        safe_load(path2)
    assert not marker.exists()


def test_plain_state_dict_and_other_architecture(tmp_path):
    tiny = VQGAN(VQGANConfig(n_hiddens=8, num_groups=8, n_codes=64, embedding_dim=4, downsample=(2, 2, 2)))
    path = tmp_path / "plain.pt"
    torch.save(tiny.state_dict(), path)
    loaded = load_autoencoder(path)
    assert loaded.config.n_hiddens == 8 and loaded.config.downsample == (2, 2, 2)
    for k, v in tiny.state_dict().items():
        assert torch.equal(v, loaded.state_dict()[k])
    with pytest.raises(DiffTumorError, match=r"plain\.pt: checkpoint does not match .*\(\d+ mismatching tensors; first: "):
        load_autoencoder(path, config=VQGANConfig(n_hiddens=8, num_groups=8, n_codes=64, embedding_dim=8))


def test_unreadable_files(tmp_path):
    with pytest.raises(DiffTumorError, match="not found"):
        load_autoencoder(tmp_path / "missing.ckpt")
    bad = tmp_path / "bad.ckpt"
    with zipfile.ZipFile(bad, "w") as z:
        z.writestr("junk.txt", "hello")
    with pytest.raises(DiffTumorError, match=r"bad\.ckpt: not a readable PyTorch checkpoint"):
        load_autoencoder(bad)
    lst = tmp_path / "list.pt"
    torch.save([1, 2], lst)
    with pytest.raises(DiffTumorError, match="it holds a list, not a dict of weights; give "):
        load_autoencoder(lst)


def test_damaged_autoencoder_file_gives_a_short_cause(tmp_path):
    """A truncated checkpoint: one line with a short cause, not PyTorch's paragraph about miniz."""
    import torch

    from backend.errors import DiffTumorError
    from backend.vqgan.official import safe_load

    good = tmp_path / "ok.pt"
    torch.save({"w": torch.zeros(1000)}, good)
    bad = tmp_path / "AutoencoderModel.ckpt"
    bad.write_bytes(good.read_bytes()[:300])
    with pytest.raises(DiffTumorError) as err:
        safe_load(bad)
    text = str(err.value)  # a short cause, then what to do; not PyTorch's paragraph
    assert "(truncated or damaged file); download it again" in text and "miniz" not in text
    assert len(text) - len(str(bad)) < 200


def test_loader_messages_say_which_file_what_it_is_and_what_to_do(tmp_path):
    """'expected a dict with a 'ema' state dict (found: ... ema ...)' told a user nothing they could act on."""
    from backend.diffusion.official import load_diffusion
    from backend.train.common import save_checkpoint

    cases = []
    p = tmp_path / "liver_early.pt"
    torch.save({"step": 3, "model": {}, "scaler": {}}, p)
    cases.append((load_diffusion, p, r"liver_early\.pt: not a DiffTumor diffusion checkpoint: it has no 'ema' weights "
                                     r"\(keys found: step, model, scaler\); give a released"))
    q = tmp_path / "run" / "checkpoint_last.pt"
    save_checkpoint(q, stage="diffusion", model={}, ema={"w": torch.zeros(1)}, step=1)
    cases.append((load_diffusion, q, r"checkpoint_last\.pt: is a diffusion training checkpoint \(what --resume reads\), "
                                     r"not a diffusion model file; use the \{organ\}_\{stage\}\.pt its run wrote"))
    r = tmp_path / "noearly.pt"
    torch.save({"ema": {"betas": torch.zeros(3)}}, r)
    cases.append((load_diffusion, r, r"noearly\.pt: not a DiffTumor diffusion checkpoint: its noise schedule is not"))
    s = tmp_path / "AutoencoderModel.ckpt"
    torch.save({"weight": torch.zeros(2), "bias": torch.zeros(2)}, s)
    cases.append((load_autoencoder, s, r"AutoencoderModel\.ckpt: not a DiffTumor autoencoder checkpoint: it lacks the "
                                       r"autoencoder weights 'encoder\.conv_first\.conv\.weight', .*\(keys found: weight, "
                                       r"bias\); give the released AutoencoderModel\.ckpt"))
    for load, path, pattern in cases:
        with pytest.raises(DiffTumorError) as err:
            load(path)
        text = str(err.value)
        assert re.match(f"^{re.escape(str(tmp_path))}/.*{pattern}", text), text
        assert "\n" not in text and "; " in text  # one line, ending in what to do
