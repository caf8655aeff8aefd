"""Segmentation backbones: names, shapes, release sizes, bad arguments."""

from __future__ import annotations

import pytest
import torch

from backend.segmentation.networks import NetworkConfig, build_network, count_parameters


@pytest.mark.parametrize("name,size", [("unet", 32), ("nnunet", 32), ("dynunet", 32), ("swinunetr", 64)])
def test_tiny_networks_map_crops_to_three_class_logits(name, size):
    torch.manual_seed(0)
    model = build_network(NetworkConfig(name=name, tiny=True, roi_size=(size,) * 3)).eval()
    with torch.no_grad():
        y = model(torch.rand(1, 1, size, size, size))
    assert y.shape == (1, 3, size, size, size)
    assert count_parameters(model) < 5_000_000


def test_release_sizes():
    unet = build_network(NetworkConfig(name="unet"))
    assert [m.out_channels for m in unet.modules() if isinstance(m, torch.nn.Conv3d)][:1] == [16]
    assert 4_000_000 < count_parameters(unet) < 6_000_000
    swin = build_network(NetworkConfig(name="swinunetr"))
    assert swin.swinViT.layers1c is not None  # v2: residual conv block before each stage
    assert 60_000_000 < count_parameters(swin) < 80_000_000


def test_bad_network_arguments():
    with pytest.raises(ValueError, match="unet, nnunet, swinunetr"):
        NetworkConfig(name="resnet")
    with pytest.raises(ValueError, match="multiples of 32"):
        NetworkConfig(name="swinunetr", roi_size=(96, 96, 80))
