"""VQGAN architecture and codebook behaviour (tiny networks on CPU; the official layout at full size)."""

from __future__ import annotations

import json

import pytest
import torch

from backend.vqgan import VQGAN, Codebook, VQGANConfig, nearest_code

TINY = dict(n_hiddens=4, num_groups=4, n_codes=32, embedding_dim=4)


@pytest.fixture(autouse=True)
def _threads():
    torch.set_num_threads(2)


def test_official_names_shapes_and_counts(shared_dir):
    layout = json.loads((shared_dir / "reference" / "difftumor_official_layout.json").read_text(encoding="utf-8"))["vqgan"]
    official = {k: tuple(s) for k, s, _ in layout["state_dict"] if not k.startswith(("image_", "video_", "perceptual_"))}
    ours = {k: tuple(v.shape) for k, v in VQGAN().state_dict().items()}
    assert ours == official
    m = VQGAN()
    count = lambda mod: sum(p.numel() for p in mod.parameters())  # noqa: E731
    assert count(m.encoder) == 441_568 and count(m.decoder) == 948_417
    assert count(m.pre_vq_conv) + count(m.post_vq_conv) == 520 + 576
    assert list(m.codebook.parameters()) == []


@pytest.mark.parametrize("downsample", [(4, 4, 4), (2, 2, 2), (4, 2, 1)])
def test_shapes_round_trip(downsample):
    m = VQGAN(VQGANConfig(downsample=downsample, **TINY)).eval()
    x = torch.rand(2, 1, 16, 8, 12) * 2 - 1
    with torch.inference_mode():
        z = m.encode(x)
        assert z.shape == (2, 4, 16 // downsample[0], 8 // downsample[1], 12 // downsample[2])
        z_q, idx = m.quantize(z)
        assert idx.shape == (2, *z.shape[2:]) and idx.dtype == torch.long
        y = m.decode(z)
        assert y.shape == x.shape
        assert torch.equal(y, m.decode_indices(idx))
        assert torch.allclose(m.decode(z_q, quantize=False), y, atol=1e-5)  # z_q = (e - z) + z ~ e
        assert torch.equal(m.decode_stage_2_outputs(z), y)
        assert torch.equal(m.encode_stage_2_inputs(x), z)
    lo, hi = m.latent_min_max()
    assert lo == m.codebook.embeddings.min().item() and hi == m.codebook.embeddings.max().item()


def test_bad_config_and_input():
    with pytest.raises(ValueError, match="powers of two"):
        VQGANConfig(downsample=(3, 4, 4))
    with pytest.raises(ValueError, match="padding_type"):
        VQGANConfig(padding_type="zeros")
    with pytest.raises(ValueError, match="norm_type"):
        VQGANConfig(norm_type="batch")
    m = VQGAN(VQGANConfig(**TINY))
    with pytest.raises(ValueError, match="not divisible"):
        m.encode(torch.zeros(1, 1, 10, 8, 8))


def test_same_padding_keeps_edges_replicated():
    m = VQGAN(VQGANConfig(**TINY)).eval()
    x = torch.full((1, 1, 8, 8, 8), 0.3)
    with torch.inference_mode():
        z = m.encode(x)
    # a constant input with replicate padding gives a constant latent (zero padding would not)
    assert torch.allclose(z, z[..., :1, :1, :1].expand_as(z), atol=1e-5)


@pytest.mark.parametrize("chunk", [1, 7, 4096])
def test_nearest_code_matches_brute_force_and_ties(chunk):
    g = torch.Generator().manual_seed(0)
    e = torch.randn(300, 8, generator=g)
    z = torch.randn(1000, 8, generator=g)
    brute = ((z[:, None, :] - e[None]) ** 2).sum(-1).argmin(1)
    assert torch.equal(nearest_code(z, e, chunk=chunk), brute)
    e2 = torch.cat([e[:5], e[:5]])  # exact duplicates: the first index wins
    assert nearest_code(e[:5], e2, chunk=chunk).tolist() == [0, 1, 2, 3, 4]


def test_first_argmin_equals_argmin_with_ties_and_nan():
    from backend.vqgan.codebook import first_argmin

    torch.manual_seed(4)
    d = torch.randn(64, 1024)
    d[3, 100] = d[3, 900] = d[3, 129] = -10.0  # ties across and inside blocks: the first wins
    d[4] = 2.0  # a constant row
    d[5, 700] = float("nan")
    d[6, 5] = d[6, 600] = float("nan")
    d[7, 127], d[7, 128] = -9.0, -9.0  # a tie at a block edge
    assert torch.equal(first_argmin(d), d.argmin(dim=1))
    odd = torch.randn(8, 1000)  # not a multiple of the block: plain argmin
    assert torch.equal(first_argmin(odd), odd.argmin(dim=1))


def test_codebook_eval_is_pure_lookup():
    cb = Codebook(16, 4).eval()
    before = {k: v.clone() for k, v in cb.state_dict().items()}
    z = torch.randn(2, 4, 3, 3, 3)
    out = cb(z)
    assert torch.equal(out.indices, cb.lookup(z))
    assert all(torch.equal(before[k], v) for k, v in cb.state_dict().items())
    assert out.z_q.shape == (2, 4, 3, 3, 3)


def test_codebook_training_init_ema_and_restart():
    torch.manual_seed(0)
    cb = Codebook(8, 2, restart_thres=1.0).train()
    z = torch.randn(1, 2, 4, 4, 4)  # 64 vectors >= 8 codes: init picks 8 of them (no noise)
    cb(z)
    flat = z.movedim(1, -1).reshape(-1, 2)
    # data-dependent init: every initial code was one of the batch vectors (then EMA-updated)
    assert not cb._need_init
    assert cb.N.sum().item() == pytest.approx(0.99 * 8 + 0.01 * 64, rel=1e-5)
    # EMA step by hand on a fresh codebook with a known state
    cb2 = Codebook(4, 2, restart_thres=0.0).train()
    cb2._need_init = False
    e0 = torch.tensor([[0.0, 0.0], [10.0, 0.0], [0.0, 10.0], [10.0, 10.0]])
    cb2.embeddings.copy_(e0), cb2.z_avg.copy_(e0), cb2.N.fill_(1.0)
    pts = torch.tensor([[1.0, 0.0], [9.0, 0.0], [11.0, 0.0]])
    out = cb2(pts.t().reshape(1, 2, 3, 1, 1))
    assert out.indices.flatten().tolist() == [0, 1, 1]
    n_exp = torch.tensor([0.99 + 0.01, 0.99 + 0.02, 0.99, 0.99])
    assert torch.allclose(cb2.N, n_exp)
    z_avg1 = 0.99 * e0[1] + 0.01 * torch.tensor([20.0, 0.0])
    n = n_exp.sum()
    w1 = (n_exp[1] + 1e-7) / (n + 4e-7) * n
    assert torch.allclose(cb2.embeddings[1], z_avg1 / w1, atol=1e-5)
    assert out.commitment_loss.item() == pytest.approx(0.25 * ((1 + 1 + 1) / 6), rel=1e-5)
    # dead-code restart: with a threshold above every count, all codes are replaced by batch vectors
    cb3 = Codebook(4, 2, restart_thres=100.0).train()
    cb3._need_init = False
    cb3(flat.t().reshape(1, 2, 64, 1, 1))
    dists = torch.cdist(cb3.embeddings, flat).min(1).values
    assert (dists < 0.05).all()


def test_load_state_clears_init_flag():
    cb = Codebook(8, 2)
    cb.load_state_dict(Codebook(8, 2).state_dict())
    assert not cb._need_init


def test_decode_keeps_no_graph_under_inference_mode():
    m = VQGAN(VQGANConfig(**TINY))
    with torch.inference_mode():
        y = m.decode(torch.randn(1, 4, 2, 2, 2))
    assert not y.requires_grad
    y = m(torch.rand(1, 1, 8, 8, 8))[0]
    assert y.requires_grad  # training forward still builds a graph (no forced no_grad)


def _released_decoder_with_lively_norms(seed=0) -> VQGAN:
    """Released decoder widths (GroupNorm 32 on 64 and 32 channels), random non-trivial norm affines."""
    torch.manual_seed(seed)
    m = VQGAN(VQGANConfig(n_codes=64)).eval()
    for mod in m.decoder.modules():
        if isinstance(mod, torch.nn.GroupNorm):
            mod.weight.data.uniform_(0.5, 2.0)
            mod.bias.data.normal_(0.0, 0.5)
    return m


def test_cpu_inference_layout_matches_the_default_path():
    """Inference decodes channels-last with its own GroupNorm statistics; training keeps PyTorch's layout."""
    m = _released_decoder_with_lively_norms()
    z = torch.randn(1, 8, 6, 8, 7) * 3
    with torch.no_grad():  # grad mode off but not inference mode: same fast path
        fast = m.decode(z, quantize=False)
    with torch.enable_grad():
        slow = m.decode(z, quantize=False).detach()  # default layout, nn.GroupNorm
    assert fast.is_contiguous() and fast.shape == slow.shape == (1, 1, 24, 32, 28)
    assert (fast - slow).abs().max() <= 2e-5 * max(1.0, slow.abs().max().item())


def test_group_statistics_are_accurate_for_any_grouping():
    from backend.vqgan.model import _norm_silu
    torch.manual_seed(1)
    for c, g, size in ((64, 32, (16, 16, 8)), (32, 32, (8, 8, 8)), (16, 4, (5, 7, 3)), (32, 32, (50, 40, 35))):
        norm = torch.nn.GroupNorm(g, c, eps=1e-6)
        norm.weight.data.uniform_(0.5, 2.0)
        norm.bias.data.normal_()
        x = torch.randn(2, c, *size) + 100  # an offset mean: a one-pass variance loses digits here
        ref = torch.nn.functional.silu(norm.double()(x.double()))
        norm.float()
        with torch.inference_mode():
            got = _norm_silu(norm, x.contiguous(memory_format=torch.channels_last_3d))
        assert (got.double() - ref).abs().max() < 1e-4, (c, g, size)  # PyTorch's own channels-last kernel: 5e-2


def test_activation_written_into_a_padded_buffer_equals_f_pad():
    from backend.vqgan.model import _norm_silu

    torch.manual_seed(3)
    norm = torch.nn.GroupNorm(4, 8, eps=1e-6)
    x = (torch.randn(2, 8, 5, 6, 7) * 2 + 1).contiguous(memory_format=torch.channels_last_3d)
    for pad in ((1, 1, 1, 1, 1, 1), (1, 2, 0, 1, 2, 0), (0, 0, 3, 0, 0, 1)):
        with torch.inference_mode():
            got = _norm_silu(norm, x, pad)
            want = torch.nn.functional.pad(_norm_silu(norm, x), pad, mode="replicate")
        assert got.is_contiguous(memory_format=torch.channels_last_3d) and got.shape == want.shape, pad
        assert (got - want).abs().max() <= 1e-6, pad  # the strided write may round the last bit differently
        wl, wr, hl, hr, dl, dr = pad
        inner = got[:, :, dl : got.shape[2] - dr, hl : got.shape[3] - hr, wl : got.shape[4] - wr]
        assert torch.equal(got, torch.nn.functional.pad(inner, pad, mode="replicate")), pad  # borders exact


@pytest.mark.parametrize("region", [
    (slice(0, 24), slice(0, 32), slice(0, 28)),  # the whole volume
    (slice(5, 13), slice(9, 20), slice(3, 11)),  # interior
    (slice(0, 3), slice(25, 32), slice(27, 28)),  # touching borders (replicate padding inside the box)
])
def test_region_decode_equals_the_slice_of_the_full_decode(region):
    m = _released_decoder_with_lively_norms(seed=2)
    z = torch.randn(1, 8, 6, 8, 7) * 3
    with torch.inference_mode():
        full = m.decode(z, quantize=True)
        part = m.decode(z, quantize=True, region=region)
    want = full[(..., *region)]
    assert part.shape == want.shape
    assert (part - want).abs().max() <= 1e-5 * max(1.0, full.abs().max().item())


def test_region_decode_rejects_an_empty_or_outside_box():
    m = VQGAN(VQGANConfig(**TINY)).eval()
    with torch.inference_mode(), pytest.raises(ValueError, match="outside the output"):
        m.decode(torch.randn(1, 4, 2, 2, 2), quantize=False, region=(slice(0, 4), slice(3, 3), slice(0, 8)))
