"""Command-line parsing shared by every subcommand: ``--resume`` next to key=value overrides."""

from __future__ import annotations

import pytest

from backend.cli import build_parser, main, parse


@pytest.fixture(scope="module")
def parser():
    return build_parser()


@pytest.mark.parametrize(
    "argv, resume, overrides",
    [
        # a bare --resume before an override means "the last checkpoint", not a file called "max_steps=10"
        (["--resume", "max_steps=10", "seed=3"], "last", ["max_steps=10", "seed=3"]),
        (["seed=3", "--resume"], "last", ["seed=3"]),
        # overrides on both sides of an option are all kept, in the order given
        (["a=1", "--resume", "b=2", "c=3"], "last", ["a=1", "b=2", "c=3"]),
        (["--config", "x.yaml", "a=1", "--resume", "b=2"], "last", ["a=1", "b=2"]),
        (["--resume", "run/ck.pt", "a=1"], "run/ck.pt", ["a=1"]),
        (["--resume=run/ck.pt", "a=1"], "run/ck.pt", ["a=1"]),
        (["a=1"], None, ["a=1"]),
    ],
)
@pytest.mark.parametrize("stage", ["autoencoder", "diffusion", "segmentation"])
def test_resume_and_overrides(parser, stage, argv, resume, overrides):
    args = parse(parser, ["train", stage, *argv])
    assert args.resume == resume
    assert args.overrides == overrides


def test_checkpoint_named_like_an_override_is_still_a_checkpoint(parser, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    (tmp_path / "step=100.pt").write_bytes(b"")
    args = parse(parser, ["train", "autoencoder", "--resume", "step=100.pt", "max_steps=200"])
    assert args.resume == "step=100.pt" and args.overrides == ["max_steps=200"]


def test_unknown_words_are_still_refused(parser, capsys):
    with pytest.raises(SystemExit) as exc:
        parse(parser, ["train", "autoencoder", "a=1", "--resume", "b=2", "--typo"])
    assert exc.value.code == 2
    err = capsys.readouterr().err
    assert "unrecognized arguments: --typo" in err and "b=2" not in err.splitlines()[-1]
    # commands without overrides take no key=value words
    with pytest.raises(SystemExit):
        main(["info", "ct.nii.gz", "x=1"])
    assert "unrecognized arguments: x=1" in capsys.readouterr().err


def test_everything_after_double_dash_is_left_alone(parser):
    args = parse(parser, ["train", "autoencoder", "--", "--resume"])
    assert args.resume is None and args.overrides == ["--resume"]


def test_output_into_a_closed_pipe_ends_quietly(totalseg_seg):
    """``difftumor ... | head`` used to end with a BrokenPipeError traceback."""
    import subprocess
    import sys

    code = ("import sys; from backend.cli import entry; "
            f"sys.argv = ['difftumor', 'info', {str(totalseg_seg)!r}]; entry()")
    proc = subprocess.Popen([sys.executable, "-c", code], stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    proc.stdout.close()  # the reader is gone before the command writes anything
    err = proc.stderr.read().decode("utf-8", "replace")
    assert proc.wait(timeout=60) == 141
    assert "Traceback" not in err and "BrokenPipeError" not in err, err


HEAVY = ("torch", "monai", "qtpy", "PyQt5", "PyQt6", "PySide2", "PySide6", "napari", "difftumor_napari", "vispy")


def _imported_after(code: str) -> list[str]:
    """The heavy packages a fresh interpreter holds after running ``code``."""
    import subprocess
    import sys

    probe = f"{code}\nimport sys\nprint('HEAVY:' + ','.join(m for m in {HEAVY!r} if m in sys.modules))"
    proc = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr
    line = [ln for ln in proc.stdout.splitlines() if ln.startswith("HEAVY:")][-1]
    return [m for m in line[len("HEAVY:"):].split(",") if m]


def test_help_and_parser_import_neither_torch_nor_qt():
    """The command line is the top layer: building every subcommand's parser and printing the help of the
    command and of each subcommand group loads neither torch (seconds) nor a GUI toolkit."""
    code = ("import contextlib, io\nfrom backend.cli import build_parser, main\nbuild_parser()\n"
            "for argv in (['--help'], ['train', '--help'], ['train', 'diffusion', '--help'], ['study', '--help'],"
            " ['weights', '--help'], ['synthesize', '--help'], ['evaluate', '--help'], ['demo', '--help']):\n"
            "    with contextlib.redirect_stdout(io.StringIO()), contextlib.suppress(SystemExit):\n"
            "        main(argv)")
    assert _imported_after(code) == []


def test_info_imports_neither_torch_nor_qt(totalseg_ct):
    code = f"from backend.cli import main\nassert main(['info', {str(totalseg_ct)!r}]) == 0"
    assert _imported_after(code) == []
