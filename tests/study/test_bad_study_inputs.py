"""The bad-input sweep (issue 14) over ``study create`` and ``study report``: the installed ``difftumor``
command on wrong inputs; each must end with exit 2, one line naming the input, and its folder unchanged
(docs/bad-inputs.md; the machinery is tests/backend/bad_input_sweep.py)."""

from __future__ import annotations

import shutil
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "backend"))
from bad_input_sweep import Spec, cut, image, phantom, registry, sweep_tests  # noqa: E402

CASES, case = registry()


def _study_sources(w: Path) -> tuple[Path, Path]:
    for kind in ("real", "syn"):
        for i in range(2):
            image(w / kind / f"{kind}{i}.nii.gz", phantom(i + (kind == "syn") * 10)[0])
    return w / "real", w / "syn"


def study_create(real, syn, out, *extra) -> list[str]:
    return ["study", "create", "--real", str(real), "--synthetic", str(syn), "--out", str(out), *extra]


@case("study-real-folder-empty")
def _(w, kit):
    real, syn = _study_sources(w)
    shutil.rmtree(real)
    real.mkdir()
    return Spec(study_create(real, syn, w / "study"), (str(real), "--real"))


@case("study-synthetic-truncated")
def _(w, kit):
    real, syn = _study_sources(w)
    cut(kit / "real_crop.nii.gz", syn / "syn0.nii.gz", 0.5)
    return Spec(study_create(real, syn, w / "study"), ("syn0.nii.gz",))


@case("study-real-label-map")
def _(w, kit):
    real, syn = _study_sources(w)
    image(real / "real0.nii.gz", phantom()[1])
    return Spec(study_create(real, syn, w / "study"), ("real0.nii.gz",))


@case("study-csv-missing-image-column")
def _(w, kit):
    real, syn = _study_sources(w)
    (w / "real.csv").write_text("path,organ\nreal/real0.nii.gz,liver\n")
    return Spec(study_create(w / "real.csv", syn, w / "study"), ("real.csv",))


@case("study-csv-names-absent-file")
def _(w, kit):
    real, syn = _study_sources(w)
    (w / "real.csv").write_text("image\nreal/real0.nii.gz\nreal/ghost.nii.gz\n")
    return Spec(study_create(w / "real.csv", syn, w / "study"), ("ghost.nii.gz", "real.csv"))


@case("study-spacing-negative")
def _(w, kit):
    real, syn = _study_sources(w)
    return Spec(study_create(real, syn, w / "study", "--spacing", "-1"), ("--spacing",))


@case("study-roi-size-zero")
def _(w, kit):
    real, syn = _study_sources(w)
    return Spec(study_create(real, syn, w / "study", "--roi-size", "0,160,96"), ("--roi-size",))


@case("study-window-reversed")
def _(w, kit):
    real, syn = _study_sources(w)
    return Spec(study_create(real, syn, w / "study", "--window", "240,-160"), ("--window",))


@case("study-readers-empty")
def _(w, kit):
    real, syn = _study_sources(w)
    return Spec(study_create(real, syn, w / "study", "--readers", ","), ("--readers",))


@case("study-out-inside-real-folder")
def _(w, kit):
    real, syn = _study_sources(w)
    return Spec(study_create(real, syn, real / "study"), ("--out", str(real)))


@case("study-key-out-inside-synthetic-folder")
def _(w, kit):
    real, syn = _study_sources(w)
    return Spec(study_create(real, syn, w / "study", "--key-out", str(syn / "key")), ("--key-out", str(syn)))


@case("study-out-exists")
def _(w, kit):
    real, syn = _study_sources(w)
    (w / "study").mkdir()
    (w / "study" / "old.txt").write_text("keep me\n")
    return Spec(study_create(real, syn, w / "study"), ("study",))


@case("study-out-name-too-long")
def _(w, kit):
    real, syn = _study_sources(w)
    return Spec(study_create(real, syn, w / ("s" * 300)), ("s" * 300,), says="the name is too long")


@case("study-report-answers-broken")
def _(w, kit):
    (w / "answers.csv").write_bytes(b"\x00\x01garbage\xff")
    (w / "key").mkdir()
    (w / "key" / "key.csv").write_text("case_id,truth,organ\nK1,real,liver\n")
    return Spec(["study", "report", "--answers", str(w / "answers.csv"), "--key", str(w / "key"),
                 "--out", str(w / "report")], ("answers.csv",))


@case("study-report-key-absent")
def _(w, kit):
    (w / "answers.csv").write_text("reader,case_id,answer,confidence,seconds,answered_at\nR1,K1,real,,3.0,2026-01-01\n")
    return Spec(["study", "report", "--answers", str(w / "answers.csv"), "--key", str(w / "nokey"),
                 "--out", str(w / "report")], ("nokey",))


sweep, test_bad_input = sweep_tests(CASES)


def test_the_study_sweep_has_its_cases():
    assert len(CASES) >= 10
