"""Synthesis engine: parity with the release, geometry/dtype, bit-identity outside the support, seeds, bad input."""

import numpy as np
import pytest
import torch

from backend.errors import DiffTumorError
from backend.io import Geometry, Volume, read_image
from backend.organs import load_organ_mask
from backend.preprocess import hu_to_unit
from backend.synthesis import blend, crops
from backend.synthesis.diffusion_crop import iter_synthesize_crop
from backend.synthesis.engine import SynthesisEngine, run_sync
from backend.synthesis.masks import ellipsoid_mask


@pytest.fixture(scope="module")
def real(totalseg_ct, totalseg_seg):
    ct = read_image(totalseg_ct)
    return ct, load_organ_mask(totalseg_seg, "liver", reference=ct)


@pytest.fixture(scope="module")
def engine(parity_dir):
    torch.set_num_threads(2)
    return SynthesisEngine(parity_dir, device="cpu", threads=2)


def test_early_crop_parity_with_release(engine, parity_outputs, real):
    """Done-when 1: the engine's crop (cut from the real CT) + early sampler + blend (sigma 2) = blend_early."""
    ct, _ = real
    grid = crops.model_grid(ct.geometry)
    crop = crops.Crop(grid, (172, 119, -3))  # the parity crop (parity grid has no half-voxel extension)
    x = hu_to_unit(crops.crop_from(ct.array, ct.geometry, crop, nearest=False, pad=-1175.0), "[-1,1]")
    ref_x = parity_outputs["x"][0, 0].numpy()
    x[:, :, :4] = -1.0
    x[:, :, 92:] = -1.0
    assert np.abs(x - ref_x).max() < 1e-6
    mask = parity_outputs["tumor_mask"][0, 0].numpy().astype(np.float32)
    models = engine.stage_models("liver", "early")
    assert models.decoder is models.autoencoder  # embedded VQGAN equals the AE in the fixtures
    noise = list(parity_outputs["early_noise"].unbind(0))
    decoded = run_sync(iter_synthesize_crop(ref_x, mask, models, device=torch.device("cpu"), noise=noise))
    m_blur = blend.blur_mask(mask, 2.0)
    out = blend.blend01((ref_x + 1) / 2, m_blur, decoded)
    assert np.abs(out - parity_outputs["blend_early"][0, 0].numpy()).max() <= 2e-4


@pytest.mark.slow
def test_diffusion_on_real_ct_geometry_dtype_support(engine, real):
    ct, organ = real
    r = engine.synthesize(ct, organ, organ="liver", size="small", count=1, seed=3, sigma=1.5)
    assert r.provenance["method"] == "diffusion" and r.provenance["tumours"][0]["stage"] == "early"
    assert r.ct.geometry == ct.geometry and r.ct.array.dtype == ct.array.dtype == np.int16
    changed = r.ct.array != ct.array
    assert changed.any()
    # every change lies within the blurred-mask reach (sigma 1.5 -> 6 mm = 2 voxels at 3 mm, +1 for interpolation)
    from scipy import ndimage

    reach = ndimage.binary_dilation(r.tumor_mask, np.ones((3, 3, 3), bool), iterations=3)
    assert not (changed & ~reach).any()
    assert set(np.unique(r.label)) == {0, 1, 2} and not (r.tumor_mask & ~organ).any()
    sha = r.provenance["tumours"][0]["weights_sha256"]
    assert set(sha) == {"AutoencoderModel.ckpt", "liver_early.pt"} and all(len(v) == 64 for v in sha.values())


@pytest.mark.slow
def test_cross_organ_kidney_with_liver_weights(engine, totalseg_ct, totalseg_seg):
    """Paper section 4.2: liver diffusion weights paint kidney tumours; without them the kidney falls back."""
    ct = read_image(totalseg_ct)
    kidney = load_organ_mask(totalseg_seg, "kidney", reference=ct)
    auto = engine.synthesize(ct, kidney, organ="kidney", size="tiny", count=1, seed=5, sigma=1.0)
    assert auto.provenance["method"] == "model-based" and "kidney" in auto.provenance["method_reason"]
    cross = engine.synthesize(ct, kidney, organ="kidney", size="tiny", count=1, seed=5, sigma=1.0,
                              weights_organ="liver", method="diffusion")
    prov = cross.provenance
    assert prov["method"] == "diffusion" and prov["organ"] == "kidney" and prov["weights_organ"] == "liver"
    assert set(prov["tumours"][0]["weights_sha256"]) == {"AutoencoderModel.ckpt", "liver_early.pt"}
    assert (cross.ct.array != ct.array).any() and cross.ct.array.dtype == ct.array.dtype
    with pytest.raises(DiffTumorError, match="stomach"):
        engine.synthesize(ct, kidney, organ="kidney", weights_organ="stomach", seed=5)


def _synthetic_ct(dtype=np.int16, spacing=(0.8, 0.8, 2.5)):
    rng = np.random.default_rng(0)
    a = rng.normal(-1000, 10, (40, 96, 96))
    organ = np.zeros(a.shape, bool)
    organ[8:32, 20:76, 20:76] = True
    a[organ] = rng.normal(55, 8, organ.sum())
    g = Geometry((96, 96, 40), spacing, (5.0, -3.0, 100.0), (-1, 0, 0, 0, -1, 0, 0, 0, 1))
    return Volume(a.astype(dtype), g), organ


@pytest.mark.parametrize("dtype", [np.int16, np.float32])
def test_model_based_engine_support_dtype_seed(dtype, tmp_path):
    ct, organ = _synthetic_ct(dtype)
    e = SynthesisEngine(tmp_path, device="cpu")  # empty folder: auto falls back to model-based
    r1 = e.synthesize(ct, organ, organ="liver", size="small", count=2, seed=5)
    r2 = e.synthesize(ct, organ, organ="liver", size="small", count=2, seed=5)
    r3 = e.synthesize(ct, organ, organ="liver", size="small", count=2, seed=6)
    assert r1.provenance["method"] == "model-based" and "lacks" in r1.provenance["method_reason"]
    assert np.array_equal(r1.ct.array, r2.ct.array) and not np.array_equal(r1.ct.array, r3.ct.array)
    assert r1.ct.array.dtype == dtype and r1.ct.geometry == ct.geometry
    from scipy import ndimage

    # without mass effect (a small tumour may reach 20 mm: tests/backend/test_engine_mass_effect.py) only the
    # blend's reach changes
    r0 = e.synthesize(ct, organ, organ="liver", size="small", count=2, seed=5, mass_effect="off")
    changed = r0.ct.array != ct.array
    assert changed.any() and not (changed & ~ndimage.binary_dilation(r0.tumor_mask, np.ones((3, 3, 3), bool), iterations=8)).any()
    assert not (r1.tumor_mask & ~organ).any() and not (r0.tumor_mask & ~organ).any()


def test_iter_synthesize_yields_progress_and_user_ellipsoid(tmp_path):
    ct, organ = _synthetic_ct()
    tumour = ellipsoid_mask(ct.geometry, (48, 48, 20), (6, 6, 6), voxel=True)
    e = SynthesisEngine(tmp_path, device="cpu")
    steps = []
    gen = e.iter_synthesize(ct, organ, tumour, organ="liver", method="model-based", seed=0)
    while True:
        try:
            steps.append(next(gen))
        except StopIteration as stop:
            result = stop.value
            break
    assert steps and all(len(s) == 3 for s in steps)
    assert np.array_equal(result.tumor_mask, tumour) and result.provenance["mask"]["source"] == "user"


def test_diffusion_without_weights_is_one_sentence(tmp_path):
    ct, organ = _synthetic_ct()
    e = SynthesisEngine(tmp_path, device="cpu")
    with pytest.raises(DiffTumorError, match="missing AutoencoderModel.ckpt, liver_early.pt"):
        e.synthesize(ct, organ, organ="liver", method="diffusion", size="tiny")


def test_bad_inputs(tmp_path):
    ct, organ = _synthetic_ct()
    e = SynthesisEngine(tmp_path, device="cpu")
    kw = dict(organ="liver", method="model-based")
    with pytest.raises(DiffTumorError, match="absent"):
        e.synthesize(ct, np.zeros_like(organ), **kw)
    small = np.zeros_like(organ)
    small[20, 50, 50] = True
    with pytest.raises(DiffTumorError, match="too small"):
        e.synthesize(ct, small, size="large", **kw)
    outside = np.zeros_like(organ)
    outside[2:5, 2:8, 2:8] = True
    with pytest.raises(DiffTumorError, match="inside the organ"):
        e.synthesize(ct, organ, outside, **kw)
    with pytest.raises(DiffTumorError, match="differs from the CT"):
        e.synthesize(ct, organ, outside[:, :50], **kw)
    nan_ct = Volume(ct.array.astype(np.float32), ct.geometry)
    nan_ct.array[0, 0, 0] = np.nan
    with pytest.raises(DiffTumorError, match="NaN"):
        e.synthesize(nan_ct, organ, **kw)
    mr = Volume((np.abs(ct.array.astype(np.float32)) + 300.0) * 1.5, ct.geometry)
    with pytest.raises(DiffTumorError, match="does not look like a CT"):
        e.synthesize(mr, organ, **kw)
    a = ct.array.astype(np.float32)
    scaled = Volume((a - a.min()) / (a.max() - a.min()), ct.geometry)  # a CT normalised to 0..1
    with pytest.raises(DiffTumorError, match=r"intensities span only"):
        e.synthesize(scaled, organ, **kw)
    labels_as_ct = Volume(np.where(organ, 5, 0).astype(np.uint8), ct.geometry)
    labels_as_ct.array[0, :2, :2] = 7
    with pytest.raises(DiffTumorError, match="looks like a label map"):
        e.synthesize(labels_as_ct, organ, **kw)


def test_mask_grid_float_noise_accepted_different_grid_refused(tmp_path):
    ct, organ = _synthetic_ct(spacing=(1.0, 1.0, 1.0))
    tumour = ellipsoid_mask(ct.geometry, (48, 48, 20), (5, 5, 5), voxel=True).astype(np.uint8)
    g = ct.geometry
    noisy = Geometry(g.size, (0.9999999999999929, 1.0, 1.0000000000000002), g.origin, g.direction)
    e = SynthesisEngine(tmp_path, device="cpu")
    r = e.synthesize(ct, organ, Volume(tumour, noisy), organ="liver", method="model-based")
    assert r.tumor_mask.sum() == tumour.sum()
    other = Geometry(g.size, (1.0, 1.0, 1.2), g.origin, g.direction)
    with pytest.raises(DiffTumorError, match="grid does not match"):
        e.synthesize(ct, organ, Volume(tumour, other), organ="liver", method="model-based")


@pytest.mark.gpu
def test_early_crop_on_gpu_matches_release(parity_dir, parity_outputs):
    gpu = SynthesisEngine(parity_dir, device="cuda")
    models = gpu.stage_models("liver", "early")
    x = parity_outputs["x"][0, 0].numpy()
    mask = parity_outputs["tumor_mask"][0, 0].numpy().astype(np.float32)
    noise = list(parity_outputs["early_noise"].unbind(0))
    decoded = run_sync(iter_synthesize_crop(x, mask, models, device=gpu.device, noise=noise))
    out = blend.blend01((x + 1) / 2, blend.blur_mask(mask, 2.0), decoded)
    diff = np.abs(out - parity_outputs["blend_early"][0, 0].numpy())
    # GPU convolutions may flip a near-tie code (parity README §3); the blend stays within 2e-4 almost everywhere
    assert (diff <= 2e-4).mean() > 0.999 and diff.max() < 0.05


def test_stage_and_diameter_per_tumour_not_per_crop(tmp_path):
    """Two 6 mm tumours 40 mm apart share one crop; each is early, and the crop is not one 90 mm 'tumour'."""
    from backend.synthesis.engine import component_diameters_mm, group_components

    ct, organ = _synthetic_ct()
    tumour = (ellipsoid_mask(ct.geometry, (48, 48, 12), (3, 3, 3), voxel=True)
              | ellipsoid_mask(ct.geometry, (48, 48, 28), (3, 3, 3), voxel=True))
    assert len(group_components(tumour, ct.geometry)) == 1
    diameters = component_diameters_mm(tumour, ct.geometry.spacing[::-1])
    assert len(diameters) == 2 and all(5 < d < 8 for d in diameters)  # 6 mm spheres on a 0.8 x 0.8 x 2.5 mm grid
    e = SynthesisEngine(tmp_path, device="cpu")
    asked = []
    e.diffusion_available = lambda organ, stage: (asked.append(stage), (False, "no weights here"))[1]
    r = e.synthesize(ct, organ, tumour, organ="liver", seed=0)
    assert asked == ["early"]  # the stage the weights were looked up for
    assert r.provenance["n_tumours"] == 2 and len(r.provenance["tumours"]) == 1
    crop = r.provenance["tumours"][0]
    assert crop["tumours"] == 2 and crop["diameter_mm"] < 8 and len(crop["diameters_mm"]) == 2


def test_existing_tumours_stay_tumour_and_are_not_painted_over(tmp_path):
    """An MSD-style label (1 organ, 2 tumour): the real tumour keeps label 2, new tumours avoid it."""
    ct, organ = _synthetic_ct()
    real_tumour = ellipsoid_mask(ct.geometry, (40, 40, 20), (8, 8, 8), voxel=True) & organ
    e = SynthesisEngine(tmp_path, device="cpu")
    r = e.synthesize(ct, organ, organ="liver", size="small", count=3, seed=1, existing_tumor=real_tumour)
    assert (r.label[real_tumour] == 2).all()
    assert not (r.tumor_mask & real_tumour).any() and r.tumor_mask.any()
    assert np.array_equal(r.ct.array[real_tumour], ct.array[real_tumour])  # the real tumour is untouched
    assert r.provenance["mask"]["existing_tumour_voxels"] == int(real_tumour.sum())
    assert set(np.unique(r.label)) == {0, 1, 2}
    user = ellipsoid_mask(ct.geometry, (40, 40, 20), (4, 4, 4), voxel=True)  # entirely on the real tumour
    with pytest.raises(DiffTumorError, match="entirely on the tumours already"):
        e.synthesize(ct, organ, user, organ="liver", method="model-based", existing_tumor=real_tumour)


def test_user_tumour_larger_than_the_crop_is_refused(engine, real):
    """A tumour wider than the 96 mm crop used to be labelled 2 in full while the CT outside the crop was left
    unchanged (no error): a wrong label for training. Diffusion refuses it in one line; model-based still runs."""
    from backend.synthesis.engine import outside_crop

    ct, organ = real
    zz, yy, xx = np.indices(organ.shape)
    c = np.argwhere(organ).mean(0)
    big = organ & ((((zz - c[0]) ** 2 + (yy - c[1]) ** 2 + (xx - c[2]) ** 2) * 9.0) <= 70.0 ** 2)
    assert outside_crop(ct.geometry, big).any()
    with pytest.raises(DiffTumorError, match=r"across does not fit the diffusion model's 96 mm crop \(\d+ of its"):
        engine.synthesize(ct, organ, big, organ="liver", method="diffusion", seed=0, ddim_steps=1)
    small = organ & ((((zz - c[0]) ** 2 + (yy - c[1]) ** 2 + (xx - c[2]) ** 2) * 9.0) <= 30.0 ** 2)
    assert not outside_crop(ct.geometry, small).any()
    assert engine.synthesize(ct, organ, big, organ="liver", method="model-based", seed=0).tumor_mask.sum() == big.sum()


@pytest.mark.slow
def test_generated_large_tumour_is_cut_to_its_crop(engine, real):
    """A generated large tumour (up to 128 mm) is cut to the crop the model paints, as the release's crops cut it."""
    from backend.synthesis.engine import group_components, outside_crop

    ct, organ = real
    r = engine.synthesize(ct, organ, organ="liver", size="large", count=1, seed=0, ddim_steps=1, method="diffusion",
                          sigma=1.0)
    assert r.provenance["mask"]["clipped_to_crop_voxels"] > 0
    assert not any(outside_crop(ct.geometry, g).any() for g in group_components(r.tumor_mask, ct.geometry))
    assert ((r.label == 2) == r.tumor_mask).all()


# ------------------------------------------------------------------ a weights folder whose files do not fit
def _tiny_folder(root, *, ae_codes=16, trained_codes=16, early_T=4, noearly_T=10, noearly_stage="noearly"):
    import tiny_weights as tw

    tw.autoencoder(root / tw.AE_NAME, n_codes=ae_codes)
    trained = tw.autoencoder(root / "trained_with.ckpt", n_codes=trained_codes)
    (root / "trained_with.ckpt").unlink()
    tw.diffusion(root / "liver_early.pt", trained, T=early_T, stage="early")
    tw.diffusion(root / "liver_noearly.pt", trained, T=noearly_T, stage=noearly_stage)
    return root


def test_synthesis_refuses_a_folder_whose_autoencoder_does_not_fit_in_one_line(tmp_path):
    """Was a ~100-line 'size mismatch for codebook.embeddings' RuntimeError."""
    ct, organ = _synthetic_ct()
    e = SynthesisEngine(_tiny_folder(tmp_path, ae_codes=64), device="cpu")
    with pytest.raises(DiffTumorError, match=(
            r"^weights folder .*: liver_early\.pt does not fit the folder: it was trained with an autoencoder whose "
            r"codebook has 16 codes of 8 channels, but AutoencoderModel\.ckpt has 64 codes of 8 channels; put")):
        e.synthesize(ct, organ, organ="liver", method="diffusion", size="tiny", count=1, seed=0)


def test_synthesis_refuses_a_misnamed_stage_file(tmp_path):
    ct, organ = _synthetic_ct()
    e = SynthesisEngine(_tiny_folder(tmp_path, noearly_T=4, noearly_stage="early"), device="cpu")
    big = ellipsoid_mask(ct.geometry, (48, 48, 20), (14, 14, 14), voxel=True) & organ  # 28 mm: mid/late
    with pytest.raises(DiffTumorError, match=r"liver_noearly\.pt does not fit the folder: it holds a model for early "
                                             r"tumours .* rename it to liver_early\.pt$"):
        e.synthesize(ct, organ, big, organ="liver", method="diffusion", seed=0, ddim_steps=2)


def test_provenance_records_the_T_the_model_was_trained_with(tmp_path, one_thread):
    """The provenance said 'T=200' for every mid/late model and 'T=4' for every early one."""
    ct, organ = _synthetic_ct()
    e = SynthesisEngine(_tiny_folder(tmp_path, noearly_T=10), device="cpu")
    big = ellipsoid_mask(ct.geometry, (48, 48, 20), (14, 14, 14), voxel=True) & organ
    r = e.synthesize(ct, organ, big, organ="liver", method="diffusion", seed=0, ddim_steps=2, sigma=1.0)
    crop = r.provenance["tumours"][0]
    assert crop["stage"] == "mid_late" and crop["timesteps"] == 10
    assert crop["sampler"] == "DDIM 2 steps, eta 0 (T=10)"


def test_more_tumours_than_fit_are_refused_and_the_provenance_says_what_was_placed(tmp_path):
    """--size small --count 10000 gave one merged 'tumour' over half the organ and a provenance of 1 tumour."""
    ct, organ = _synthetic_ct()
    e = SynthesisEngine(tmp_path, device="cpu")
    with pytest.raises(DiffTumorError, match=r"^organ mask: the liver is \d+ ml( \(on the 1 mm grid\))?; at most \d+ small "
                                             r"tumours \(12-20 mm\) fit in that volume \(asked for 10000\)$"):
        e.synthesize(ct, organ, organ="liver", method="model-based", size="small", count=10000, seed=0)
    r = e.synthesize(ct, organ, organ="liver", method="model-based", size="tiny", count=3, seed=2)
    m = r.provenance["mask"]
    assert m["count_requested"] == 3 and m["count_placed"] == 3 and len(m["tumours"]) == 3
    assert all(t["voxels"] > 0 for t in m["tumours"])
    assert r.provenance["n_tumours"] == 3  # three tumours apart on the CT's own grid, not one blob


def test_random_tumor_masks_refuses_more_tumours_than_fit():
    """The napari placement's per-tumour draws: 10000 small tumours were drawn one by one into one organ."""
    from backend.synthesis.engine import random_tumor_masks

    ct, organ = _synthetic_ct()
    with pytest.raises(DiffTumorError, match=r"^organ mask: the liver is \d+ ml .* \(asked for 10000\)$"):
        random_tumor_masks(ct.geometry, organ, organ="liver", size="small", count=10000, seed=0)
