"""RandTumorSynthesisd (on-the-fly synthesis) and MapLabelsd."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from monai.data import MetaTensor
from monai.transforms import Compose
from scipy import ndimage

from backend.errors import DiffTumorError
from backend.segmentation.transforms import MapLabelsd, RandTumorSynthesisd


def _sample(healthy=1, size=64):
    rng = np.random.default_rng(0)
    img = MetaTensor(torch.from_numpy(0.52 + 0.02 * rng.standard_normal((1, size, size, size)).astype(np.float32)))
    lab = torch.zeros((1, size, size, size), dtype=torch.uint8)
    lab[0, 8:56, 8:56, 8:56] = 1
    return {"image": img, "label": MetaTensor(lab), "healthy": torch.tensor(healthy)}


def test_healthy_crop_gets_a_tumour_inside_the_organ_and_label_2():
    t = RandTumorSynthesisd(prob=1.0, organ="liver")
    t.set_random_state(3)
    data = _sample()
    out = t(data)
    tumour = out["label"][0] == 2
    assert out["synthetic"].item() == 1 and tumour.any()
    assert bool((data["label"][0][tumour] == 1).all())  # liver tumours stay inside the organ
    changed = (out["image"] != data["image"])[0].numpy()
    near = ndimage.binary_dilation(tumour.numpy(), np.ones((3, 3, 3), bool), iterations=7)  # edge blur reach
    assert changed[tumour.numpy()].any() and not changed[~near].any()
    assert float(out["image"][0][tumour].mean()) < float(data["image"][0][tumour].mean())  # hypo-attenuating
    assert 0.0 <= float(out["image"].min()) and float(out["image"].max()) <= 1.0
    assert isinstance(out["image"], MetaTensor) and out["image"].dtype == torch.float32
    assert data["label"].max() == 1  # input untouched


def test_real_tumour_cases_and_prob_zero_pass_unchanged():
    t = RandTumorSynthesisd(prob=1.0)
    data = _sample(healthy=0)
    out = t(data)
    assert out["image"] is data["image"] and out["synthetic"].item() == 0
    t0 = RandTumorSynthesisd(prob=0.0)
    out = t0(_sample())
    assert out["synthetic"].item() == 0 and int(out["label"].max()) == 1


def test_seeded_like_other_monai_transforms():
    def run(seed):
        c = Compose([RandTumorSynthesisd(prob=0.5)]).set_random_state(seed)
        return [c(_sample()) for _ in range(4)]

    a, b = run(7), run(7)
    for x, y in zip(a, b):
        assert torch.equal(x["label"], y["label"]) and torch.equal(x["image"], y["image"])
    assert any(not torch.equal(x["label"], z["label"]) for x, z in zip(a, run(8)))


def test_stage_probabilities_pick_the_size_classes():
    t = RandTumorSynthesisd(prob=1.0, stage_probs=(0.0, 0.0, 1.0))
    t.set_random_state(0)
    t.randomize()
    assert t._size == "large"
    t = RandTumorSynthesisd(prob=1.0, stage_probs=(1.0, 0.0, 0.0)).set_random_state(0)
    sizes = set()
    for _ in range(20):
        t.randomize()
        sizes.add(t._size)
    assert sizes == {"tiny", "small"}


def test_crop_without_enough_organ_is_left_unchanged():
    t = RandTumorSynthesisd(prob=1.0, stage_probs=(0, 0, 1))
    data = _sample()
    data["label"] = MetaTensor(torch.zeros_like(data["label"]))
    data["label"][0, 30:33, 30:33, 30:33] = 1
    out = t(data)
    assert out["synthetic"].item() == 0 and torch.equal(out["image"], data["image"])


def test_bad_arguments():
    with pytest.raises(ValueError, match="stage_probs"):
        RandTumorSynthesisd(stage_probs=(0.5, 0.5, 0.5))
    with pytest.raises(ValueError, match="method"):
        RandTumorSynthesisd(method="gan")
    with pytest.raises(DiffTumorError, match=r"^unknown organ 'brain'; choose one of liver, pancreas, kidney"):
        RandTumorSynthesisd(organ="brain")


def test_diffusion_without_weights_is_one_clear_error(tmp_path):
    t = RandTumorSynthesisd(prob=1.0, method="diffusion", weights_dir=str(tmp_path), organ="pancreas",
                            weights_organ="liver")
    assert t.weights_organ == "liver" and t.organ == "pancreas"
    with pytest.raises(DiffTumorError, match="diffusion"):
        t(_sample())


def test_map_labels():
    raw = MetaTensor(torch.tensor([[[0, 1, 2, 3, 5]]]))
    out = MapLabelsd(organ_values=(1, 3), tumor_values=(2,))({"label": raw})["label"]
    assert out.tolist() == [[[0, 1, 2, 1, 0]]]
    out = MapLabelsd(organ_values=(5,), tumor_values=())({"label": raw})["label"]
    assert out.tolist() == [[[0, 0, 0, 0, 1]]]
    with pytest.raises(ValueError, match="overlap"):
        MapLabelsd(organ_values=(1,), tumor_values=(1,))


@pytest.mark.slow
def test_diffusion_path_with_official_format_weights_cross_organ(parity_dir):
    """Liver early-stage diffusion weights used in a kidney crop (cross-organ), release blend."""
    torch.set_num_threads(2)
    t = RandTumorSynthesisd(prob=1.0, stage_probs=(1.0, 0.0, 0.0), method="diffusion", weights_dir=str(parity_dir),
                            organ="kidney", weights_organ="liver")
    t.set_random_state(0)
    data = _sample(size=96)
    out = t(data)
    tumour = out["label"][0] == 2
    assert out["synthetic"].item() == 1 and tumour.any()
    changed = (out["image"] != data["image"])[0]
    assert bool(changed[tumour].any())
    assert 0.0 <= float(out["image"].min()) and float(out["image"].max()) <= 1.0
    far = ~torch.from_numpy(ndimage.binary_dilation(tumour.numpy(), np.ones((3, 3, 3), bool), iterations=17))
    assert not bool(changed[far].any())  # blend reach: sigma <= 4 voxels, truncate 4


@pytest.mark.slow
def test_diffusion_path_takes_a_crop_the_latent_unet_cannot(parity_dir):
    """A 48^3 training crop (latent 12^3; the U-Net needs in-plane multiples of 8) is edge-padded for the
    network and cut back: same shape out, tumour painted, voxels far from it unchanged."""
    torch.set_num_threads(2)
    t = RandTumorSynthesisd(prob=1.0, stage_probs=(1.0, 0.0, 0.0), method="diffusion", weights_dir=str(parity_dir),
                            organ="liver")
    t.set_random_state(0)
    data = _sample(size=48)
    out = t(data)
    assert out["image"].shape == data["image"].shape == (1, 48, 48, 48)
    tumour = out["label"][0] == 2
    assert out["synthetic"].item() == 1 and tumour.any()
    changed = (out["image"] != data["image"])[0]
    assert bool(changed[tumour].any())
    far = ~torch.from_numpy(ndimage.binary_dilation(tumour.numpy(), np.ones((3, 3, 3), bool), iterations=17))
    assert not bool(changed[far].any())


def test_load_volumed_matches_monai_loadimaged(totalseg_seg):
    """Our SimpleITK loader gives MONAI's array and RAS affine (so Orientationd/Spacingd agree)."""
    from monai import transforms as T

    from backend.segmentation.transforms import LoadVolumed

    ours = T.Compose([LoadVolumed(["label"]), T.Orientationd(["label"], axcodes="RAS")])({"label": str(totalseg_seg)})
    ref = T.Compose([T.LoadImaged(["label"]), T.EnsureChannelFirstd(["label"]),
                     T.Orientationd(["label"], axcodes="RAS")])({"label": str(totalseg_seg)})
    assert ours["label"].shape == ref["label"].shape == (1, 122, 101, 30)
    assert torch.equal(ours["label"].as_tensor().long(), ref["label"].as_tensor().long())
    assert torch.allclose(ours["label"].affine.double(), ref["label"].affine.double(), atol=1e-4)


@pytest.mark.slow
def test_diffusion_synthesis_in_a_forked_dataloader_worker(parity_dir):
    """Training runs the synthesis in DataLoader workers. The parent has already started OpenMP's thread
    pool; a forked worker that raised its own thread count used to deadlock there (no batch, ever)."""
    from monai.data import DataLoader, Dataset

    torch.set_num_threads(2)
    a = torch.randn(512, 512)
    _ = a @ a  # the parent's OpenMP pool is running
    t = RandTumorSynthesisd(prob=1.0, stage_probs=(1.0, 0.0, 0.0), method="diffusion", weights_dir=str(parity_dir),
                            organ="liver")
    t.set_random_state(0)
    loader = DataLoader(Dataset([_sample(size=96)], t), batch_size=1, num_workers=1,
                        multiprocessing_context="fork", timeout=240)
    batch = next(iter(loader))  # a deadlock ends in DataLoader's timeout error instead of hanging the suite
    assert batch["synthetic"].tolist() == [1] and bool((batch["label"] == 2).any())


def _case(healthy, organ_box=(slice(0, 12), slice(0, 12), slice(0, 12)), size=64):
    img = MetaTensor(torch.full((1, size, size, size), 0.5))
    lab = torch.zeros((1, size, size, size), dtype=torch.uint8)
    lab[(0, *organ_box)] = 1
    return {"image": img, "label": MetaTensor(lab), "healthy": torch.tensor(healthy)}


def test_organ_crop_retries_healthy_crops_until_they_hold_enough_organ():
    from backend.segmentation.transforms import RandOrganCropd

    # 12³ organ corner (1728 voxels) of a 64³ CT, 24³ crops. R = 8 (2145 voxels) cannot be met, so every
    # healthy case retries; from try 6 R = 7 (1437 voxels) needs a crop over most of the organ block
    t = RandOrganCropd(("image", "label"), "label", (24, 24, 24), radius=8.0, relax_every=5, relax_by=1.0,
                       image_key="image", image_threshold=0, neg=3.0)
    assert t.min_foreground(0) == pytest.approx(4 / 3 * np.pi * 8**3)
    assert t.min_foreground(5) == pytest.approx(4 / 3 * np.pi * 7**3)
    assert t.min_foreground(1000) == pytest.approx(4 / 3 * np.pi * 5**3)  # floor
    t.set_random_state(0)
    for _ in range(5):
        out = t(_case(1))
        assert isinstance(out, list) and len(out) == 1
        crop = out[0]
        assert tuple(crop["image"].shape) == (1, 24, 24, 24)
        assert t.tries >= 6 and int((crop["label"] > 0).sum()) > t.min_foreground(t.tries - 1)
        assert not {"_fg_indices", "_bg_indices"} & set(crop)
    # a real-tumour case takes the first crop, as in the release; with neg 3 : pos 1 most crops miss the organ
    tries, empty = [], 0
    for _ in range(20):
        out = t(_case(0))[0]
        tries.append(t.tries)
        empty += int((out["label"] > 0).sum()) == 0
    assert set(tries) == {1} and empty > 0


def test_organ_crop_gives_up_after_max_tries_and_keeps_the_last_crop():
    from backend.segmentation.transforms import RandOrganCropd

    t = RandOrganCropd(("image", "label"), "label", (24, 24, 24), radius=30.0, max_tries=7, image_key="image")
    t.set_random_state(1)
    out = t(_case(1))[0]  # 1728 organ voxels can never beat R >= 5 after 7 tries (R = 25: 65,450)
    assert t.tries == 7 and tuple(out["label"].shape) == (1, 24, 24, 24)


def test_organ_crop_is_seeded_through_compose():
    from backend.segmentation.transforms import RandOrganCropd

    def boxes(seed):
        c = Compose([RandOrganCropd(("image", "label"), "label", (24, 24, 24), radius=5.0, image_key="image")])
        c.set_random_state(seed)
        return [c(_case(1, organ_box=(slice(0, 40),) * 3))[0]["label"].affine[:3, 3].tolist() for _ in range(6)]

    assert boxes(3) == boxes(3)
    assert boxes(3) != boxes(4)


def _organ_sample(size=64):
    """An organ (label 1, about 60 HU) filling the crop below x = 40, fat above: a large tumour near x = 40
    pushes the boundary."""
    rng = np.random.default_rng(0)
    from backend.synthesis.blend import hu_to_01

    lab = np.zeros((1, size, size, size), np.uint8)
    lab[0, 4:40, 4:60, 4:60] = 1
    hu = np.where(lab[0] == 1, 60.0, -100.0) + rng.normal(0, 8, lab[0].shape)
    img = MetaTensor(torch.from_numpy(hu_to_01(hu)[None].astype(np.float32)))
    return {"image": img, "label": MetaTensor(torch.from_numpy(lab)), "healthy": torch.tensor(1)}


@pytest.mark.parametrize("mode", ["auto", "off"])
def test_mass_effect_warps_the_label_with_the_image(mode):
    """A large model-based tumour with mass effect: the organ label moves with the tissue, so the voxels it gained
    show organ in the image (not fat); with mass effect off the organ label is the input's."""
    t = RandTumorSynthesisd(prob=1.0, stage_probs=(0.0, 0.0, 1.0), organ="liver", mass_effect=mode).set_random_state(1)
    data = _organ_sample()
    out = t(data)
    assert out["synthetic"].item() == 1
    before, after = data["label"][0].numpy(), out["label"][0].numpy()
    grown = (after == 1) & (before == 0)
    if mode == "off":
        assert not grown.any() and ((after == 1) | (after == 2)).sum() == (before == 1).sum()
        return
    assert grown.sum() > 20, "the organ label did not move"
    img0, img1 = data["image"][0].numpy(), out["image"][0].numpy()
    assert img0[grown].mean() < 0.2 < img1[grown].mean()  # fat (-100 HU = 0.18) became organ (60 HU = 0.55)


def test_bad_mass_effect_is_one_clear_error():
    with pytest.raises(DiffTumorError, match="^mass effect maybe: choose auto"):
        RandTumorSynthesisd(mass_effect="maybe")
