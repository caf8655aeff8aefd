"""bench/synthesis.py's floor of the exact path: FLOPs counted on the real official-configuration modules."""

import importlib.util
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch

REPO = Path(__file__).resolve().parents[2]


def _bench():
    spec = importlib.util.spec_from_file_location("bench_synthesis", REPO / "bench" / "synthesis.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def test_exact_flops_match_the_release_architecture():
    from backend.diffusion.unet import Unet3D
    from backend.vqgan.model import VQGAN

    torch.manual_seed(0)
    ae = VQGAN().eval()
    flops = _bench().exact_flops(SimpleNamespace(autoencoder=ae, unet=Unet3D().eval(), decoder=ae))
    # official_pipeline.md 2.1: 13.43 GFLOP per Unet3D forward at 24^3 (probe of the released model). Issue 19 folds
    # the linear attention's output projection into its per-head context: q (n pixels x h*d) then meets one
    # (h*d x c) matrix instead of the (d x e) context and the projection, which counts 13.05; the floor counts
    # what this code does
    assert abs(flops["unet_call"] / 1e9 - 13.05) < 0.07
    # hand count of the encoder convolutions (96^3 -> 24^3): 14.99 GMAC = 29.98 GFLOP
    assert 29.5 < flops["encode"] / 1e9 < 30.5
    # the decode must run the whole crop up to the last GroupNorm: far more than a 32^3 region alone
    assert flops["decode"] > 250e9


def test_conv_rate_is_the_convolution_flops_over_the_median_time():
    """The rate is FLOPs / median seconds: the FLOPs of that convolution as PyTorch counts them, the median of
    the timed runs (not the warm-up). A clock that advances 4, 1, 2 s per run makes the median 2 s."""
    from torch.utils.flop_counter import FlopCounterMode

    bench = _bench()
    with FlopCounterMode(display=False) as counter:
        torch.nn.Conv3d(32, 32, 3, device="meta")(torch.empty(1, 32, 98, 98, 98, device="meta"))
    flops = counter.get_total_flops()
    ticks = iter([0.0, 4.0, 10.0, 11.0, 20.0, 22.0])
    assert bench.conv_gflops(repeats=3, clock=lambda: next(ticks)) == pytest.approx(flops / 2.0 / 1e9, rel=1e-12)
