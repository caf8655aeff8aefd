"""The realism report: features, the real-vs-synthetic classifier, and `difftumor realism` on the shared CT."""

import json

import numpy as np
import pytest

from backend.cli import main
from backend.realism import FEATURES, compare, tumour_features


def _rows(rng, n, shift=0.0):
    return [{f: float(rng.normal(shift if i < 3 else 0.0, 1.0)) for i, f in enumerate(FEATURES)} for _ in range(n)]


def test_classifier_auc_is_chance_for_one_distribution_and_one_for_two():
    rng = np.random.default_rng(0)
    same = compare(_rows(rng, 40), _rows(rng, 40), seed=0, n_boot=200)
    assert 0.3 <= same["auc"] <= 0.7 and same["auc_ci95"][0] < 0.5 < same["auc_ci95"][1]
    apart = compare(_rows(rng, 40), _rows(rng, 40, shift=4.0), seed=0, n_boot=200)
    assert apart["auc"] >= 0.97 and apart["auc_ci95"][0] > 0.9
    assert set(list(apart["feature_auc"])[:3]) == {"mean_hu", "std_hu", "contrast_hu"}  # the shifted ones first
    with pytest.raises(Exception, match="at least 5 real and 5 synthetic"):
        compare(_rows(rng, 4), _rows(rng, 5))


@pytest.fixture(scope="module")
def shared(totalseg_ct, totalseg_seg):
    from backend.io import read_image
    from backend.organs import load_organ_mask

    ct = read_image(totalseg_ct)
    return ct, load_organ_mask(totalseg_seg, "liver", reference=ct)


def _flat(ct, organ, seed):
    """A crude fake 'real' set: grainless discs of constant HU (what the old model-based output looked like)."""
    from backend.synthesis.engine import random_tumor_mask

    mask, _ = random_tumor_mask(ct, organ, organ="liver", size="small", count=2, seed=seed)
    a = ct.array.copy()
    a[mask] = 15
    return a, mask


def test_features_see_the_grain_and_the_contrast(shared):
    from backend.synthesis.engine import SynthesisEngine

    ct, organ = shared
    r = SynthesisEngine(None, device="cpu").synthesize(ct, organ, organ="liver", size="medium", count=1, seed=0,
                                                       method="model-based", mass_effect="off")
    s = ct.geometry.spacing[::-1]
    [f] = tumour_features(r.ct.array, r.tumor_mask, r.label >= 1, s)
    assert 0.7 <= f["noise_ratio"] <= 1.4 and f["contrast_hu"] < -10 and f["solidity"] < 1.0
    a, mask = _flat(ct, organ, 0)
    flat = tumour_features(a, mask, organ, s)
    assert len(flat) == 2 and all(g["noise_ratio"] < 0.05 and g["std_hu"] == 0 for g in flat)


def test_realism_command_end_to_end(shared, tmp_path, capsys, totalseg_ct, totalseg_seg):
    from backend.io import Volume, write_image

    ct, organ = shared
    syn = []
    for seed in (1, 2, 3):
        out = tmp_path / f"syn{seed}"
        assert main(["synthesize", "--ct", str(totalseg_ct), "--organs", str(totalseg_seg), "--organ", "liver",
                     "--size", "small", "--count", "2", "--method", "model-based", "--seed", str(seed),
                     "--out", str(out)]) == 0
        syn.append(str(out))
    real = []
    for seed in (4, 5, 6):
        a, mask = _flat(ct, organ, seed)
        lab = np.where(organ, 1, 0).astype(np.uint8)
        lab[mask] = 2
        c, lpath = tmp_path / f"real{seed}_ct.nii.gz", tmp_path / f"real{seed}_lab.nii.gz"
        write_image(Volume(a, ct.geometry), c)
        write_image(Volume(lab, ct.geometry), lpath)
        real.append(f"{c},{lpath}")
    capsys.readouterr()
    rep = tmp_path / "report"
    assert main(["realism", "--synthetic", *syn, "--real", *real, "--organ", "liver", "--out", str(rep),
                 "--folds", "3"]) == 0
    text = capsys.readouterr().out
    assert "real vs synthetic: AUC" in text and "noise" in text
    summary = json.loads((rep / "realism.json").read_text())
    assert summary["n_tumours"] == {"real": 6, "synthetic": 6}
    assert summary["auc"] >= 0.9  # grainless flat discs are told apart from the model-based tumours
    assert list(summary["feature_auc"])[0] in ("std_hu", "noise_ratio", "std_ratio", "glcm_homogeneity",
                                                "glcm_energy", "glcm_contrast", "glcm_correlation", "skewness")
    lines = (rep / "realism.csv").read_text().splitlines()
    assert len(lines) == 13 and "noise_ratio" in lines[0]
    assert (rep / "realism_embedding.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert not [p for p in rep.iterdir() if p.name.startswith(".")]  # no temporary left behind


def test_realism_bad_input_is_one_line(tmp_path, capsys, totalseg_ct, totalseg_seg):
    assert main(["realism", "--synthetic", str(tmp_path / "nope"), "--organ", "liver", "--out", str(tmp_path / "r")]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "--synthetic" in err[0] and "nope" in err[0]
    # a healthy organ map: no tumour to measure
    assert main(["realism", "--synthetic", f"{totalseg_ct},{totalseg_seg}", "--organ", "liver",
                 "--out", str(tmp_path / "r")]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "labels no tumour" in err[0]
    assert not (tmp_path / "r").exists()
    # a file of the same name that this command did not write is never replaced
    (tmp_path / "r").mkdir()
    (tmp_path / "r" / "realism.csv").write_text("mine")
    assert main(["realism", "--synthetic", str(tmp_path / "r"), "--organ", "liver", "--out", str(tmp_path / "r")]) == 2
    assert "not written by 'difftumor realism'" in capsys.readouterr().err
    assert (tmp_path / "r" / "realism.csv").read_text() == "mine"


def test_help_does_not_import_torch():
    import subprocess
    import sys

    code = "import sys; from backend.cli import build_parser; build_parser(); print('torch' in sys.modules)"
    assert subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout.strip() == "False"


def test_realism_without_real_and_with_too_few_tumours(shared, tmp_path, capsys, totalseg_ct, totalseg_seg):
    """Without --real it crashed in the embedding (after writing two of its three files); with 2-3 tumours a
    side it printed 'AUC 0.50 (95% CI 0.50-0.50)' while single features separated perfectly."""
    from backend.io import Volume, write_image

    ct, organ = shared
    syn = tmp_path / "syn"
    assert main(["synthesize", "--ct", str(totalseg_ct), "--organs", str(totalseg_seg), "--organ", "liver",
                 "--size", "small", "--count", "2", "--method", "model-based", "--seed", "1", "--out", str(syn)]) == 0
    capsys.readouterr()
    alone = tmp_path / "alone"
    assert main(["realism", "--synthetic", str(syn), "--organ", "liver", "--out", str(alone)]) == 0
    assert "no --real tumours" in capsys.readouterr().out
    assert sorted(p.name for p in alone.iterdir()) == ["realism.csv", "realism.json", "realism_embedding.png"]
    a, mask = _flat(ct, organ, 4)
    lab = np.where(organ, 1, 0).astype(np.uint8)
    lab[mask] = 2
    c, lpath = tmp_path / "real_ct.nii.gz", tmp_path / "real_lab.nii.gz"
    write_image(Volume(a, ct.geometry), c)
    write_image(Volume(lab, ct.geometry), lpath)
    few = tmp_path / "few"
    assert main(["realism", "--synthetic", str(syn), "--real", f"{c},{lpath}", "--organ", "liver",
                 "--out", str(few)]) == 0
    text = capsys.readouterr().out
    assert "too few tumours for a classifier's AUC: 2 real / 2 synthetic" in text and "AUC 0.50" not in text
    summary = json.loads((few / "realism.json").read_text())
    assert summary["auc"] is None and summary["feature_auc"]
