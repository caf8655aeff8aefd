"""Weights folder: discovery, user config, check (sha256 cache, loading), fetch with Range resume."""

import hashlib
import http.server
import json
import threading
from pathlib import Path

import pytest

from backend import weights
from backend.errors import DiffTumorError


@pytest.fixture(autouse=True)
def _loopback_only(monkeypatch):
    """These tests never reach the internet: a connection to anything but 127.0.0.1 fails the test."""
    import socket

    real = socket.socket.connect

    def connect(self, address):
        host = address[0] if isinstance(address, tuple) else address
        if host not in ("127.0.0.1", "::1", "localhost"):
            raise AssertionError(f"test tried to connect to {address!r}; use the local server")
        return real(self, address)

    monkeypatch.setattr(socket.socket, "connect", connect)


@pytest.fixture(autouse=True)
def _isolated_config(tmp_path, monkeypatch):
    monkeypatch.setenv("XDG_CONFIG_HOME", str(tmp_path / "cfg"))
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "cache"))
    monkeypatch.delenv(weights.ENV_VAR, raising=False)


def test_resolution_order(tmp_path, monkeypatch):
    a, b, c = (tmp_path / n for n in "abc")
    for d in (a, b, c):
        d.mkdir()
    assert weights.resolve_weights_dir() == (None, "none")
    weights.set_weights_dir(c)
    assert weights.get_weights_dir_setting() == c.resolve()
    assert weights.resolve_weights_dir() == (c.resolve(), "user config")
    monkeypatch.setenv(weights.ENV_VAR, str(b))
    assert weights.resolve_weights_dir()[1] == "$DIFFTUMOR_WEIGHTS"
    assert weights.resolve_weights_dir(a) == (a, "argument")
    with pytest.raises(DiffTumorError, match="not a folder"):
        weights.resolve_weights_dir(tmp_path / "nope")
    weights.set_weights_dir(None)
    assert weights.get_weights_dir_setting() is None


def test_missing_weights_one_sentence(tmp_path):
    (tmp_path / "AutoencoderModel.ckpt").write_bytes(b"x")
    folder = weights.WeightsFolder.find(tmp_path)
    assert folder.has("liver", "early") is False
    with pytest.raises(DiffTumorError, match=r"missing liver_early\.pt needed for early liver tumours"):
        folder.require("liver", "early")
    with pytest.raises(DiffTumorError, match="no weights folder"):
        weights.WeightsFolder(None).require("kidney_left", "mid_late")
    assert weights.diffusion_name("kidney_right", "mid_late") == "kidney_noearly.pt"


def test_sha256_cache(tmp_path, monkeypatch):
    folder = tmp_path / "w"
    folder.mkdir()
    p = folder / "liver_early.pt"
    p.write_bytes(b"abc" * 1000)
    digest = hashlib.sha256(p.read_bytes()).hexdigest()
    assert weights.sha256_cached(p) == digest
    calls = []
    monkeypatch.setattr(weights, "sha256_file", lambda path, chunk=0: calls.append(path) or "recomputed")
    assert weights.sha256_cached(p) == digest and not calls  # served from the cache
    p.write_bytes(b"changed")
    assert weights.sha256_cached(p) == "recomputed" and calls


def test_sha256_cache_lives_in_the_user_cache_folder_not_beside_the_files(tmp_path):
    """.sha256-cache.json was written into the user's weights and run folders."""
    folder = tmp_path / "w"
    folder.mkdir()
    (folder / "liver_early.pt").write_bytes(b"not a checkpoint")
    (folder / weights.AE_NAME).write_bytes(b"nor this")
    weights.check_folder(folder)
    assert sorted(q.name for q in folder.iterdir()) == ["AutoencoderModel.ckpt", "liver_early.pt"]
    cache = json.loads((tmp_path / "cache" / "difftumor" / "sha256-cache.json").read_text(encoding="utf-8"))
    entry = cache[str((folder / "liver_early.pt").resolve())]
    assert entry["sha256"] == hashlib.sha256(b"not a checkpoint").hexdigest() and entry["size"] == 16
    folder.chmod(0o500)  # a read-only folder is fine too: nothing is written there
    try:
        assert weights.sha256_cached(folder / "liver_early.pt") == entry["sha256"]
    finally:
        folder.chmod(0o700)


def test_check_reports_present_missing_and_broken(tmp_path):
    (tmp_path / "liver_early.pt").write_bytes(b"not a checkpoint")
    rows = {r["name"]: r for r in weights.check_folder(tmp_path)}
    assert rows["AutoencoderModel.ckpt"]["present"] is False
    assert rows["liver_early.pt"]["present"] and rows["liver_early.pt"]["loads"] is False
    assert rows["liver_early.pt"]["error"]
    assert len(rows) == 7


def test_check_loads_the_official_autoencoder(parity_dir, tmp_path):
    (tmp_path / "AutoencoderModel.ckpt").symlink_to(parity_dir / "AutoencoderModel.ckpt")
    row = weights.check_folder(tmp_path, organs=())[0]
    assert row["loads"] is True, row["error"]
    assert len(row["sha256"]) == 64


# ------------------------------------------------------------------ fetch against 127.0.0.1
class _RangeHandler(http.server.BaseHTTPRequestHandler):
    root: Path
    seen: list
    short: bool = False  # announce the whole body but send only half of it, then close

    def log_message(self, *args):
        pass

    def do_GET(self):
        p = self.root / self.path.lstrip("/")
        if not p.is_file():
            self.send_error(404)
            return
        data = p.read_bytes()
        rng = self.headers.get("Range")
        self.seen.append((self.path, rng))
        if rng:
            start = int(rng.split("=")[1].split("-")[0])
            if start >= len(data):
                self.send_response(416)
                self.send_header("Content-Range", f"bytes */{len(data)}")
                self.send_header("Content-Length", "0")
                self.end_headers()
                return
            body = data[start:]
            self.send_response(206)
            self.send_header("Content-Range", f"bytes {start}-{len(data) - 1}/{len(data)}")
        else:
            body = data
            self.send_response(200)
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body[: len(body) // 2] if self.short else body)
        self.close_connection = True


@pytest.fixture
def server(tmp_path):
    root = tmp_path / "srv"
    (root / "AutoencoderModel").mkdir(parents=True)
    (root / "DiffusionModel").mkdir()
    files = {"AutoencoderModel/AutoencoderModel.ckpt": b"A" * 300_000 + b"B" * 77}
    for s in ("early", "noearly"):
        files[f"DiffusionModel/liver_{s}.pt"] = (s.encode() * 50_000)[:123_457]
    for rel, data in files.items():
        (root / rel).write_bytes(data)
    handler = type("H", (_RangeHandler,), {"root": root, "seen": []})
    httpd = http.server.ThreadingHTTPServer(("127.0.0.1", 0), handler)
    t = threading.Thread(target=httpd.serve_forever, daemon=True)
    t.start()
    yield f"http://127.0.0.1:{httpd.server_address[1]}", files, handler.seen
    httpd.shutdown()


def test_fetch_downloads_verifies_and_skips(server, tmp_path):
    base, files, seen = server
    dest = tmp_path / "w"
    got = weights.fetch(dest, organs=("liver",), base_url=base, progress=False)
    assert sorted(p.name for p in got) == ["AutoencoderModel.ckpt", "liver_early.pt", "liver_noearly.pt"]
    for rel, data in files.items():
        assert (dest / Path(rel).name).read_bytes() == data
    assert not list(dest.glob("*.part"))
    n = len(seen)
    weights.fetch(dest, organs=("liver",), base_url=base, progress=False)
    assert len(seen) == n  # present files are not downloaded again


def test_fetch_resumes_interrupted_part(server, tmp_path):
    base, files, seen = server
    data = files["AutoencoderModel/AutoencoderModel.ckpt"]
    dest = tmp_path / "w"
    dest.mkdir()
    (dest / "AutoencoderModel.ckpt.part").write_bytes(data[:123_456])
    sha = hashlib.sha256(data).hexdigest()
    weights.download(f"{base}/AutoencoderModel/AutoencoderModel.ckpt", dest / "AutoencoderModel.ckpt", sha256=sha, progress=False)
    assert (dest / "AutoencoderModel.ckpt").read_bytes() == data
    assert seen[-1][1] == "bytes=123456-"


def test_fetch_bad_checksum_and_404(server, tmp_path):
    base, _, _ = server
    target = tmp_path / "AutoencoderModel.ckpt"
    with pytest.raises(DiffTumorError, match="sha256 .* differs"):
        weights.download(f"{base}/AutoencoderModel/AutoencoderModel.ckpt", target, sha256="0" * 64, progress=False)
    assert not target.exists() and not target.with_name(target.name + ".part").exists()
    with pytest.raises(DiffTumorError, match="HTTP 404"):
        weights.download(f"{base}/nothing.pt", tmp_path / "nothing.pt", progress=False)


def test_fetch_never_installs_a_file_the_server_cut_short(server, tmp_path):
    """The connection closes before the announced Content-Length: the part is kept (resumable), nothing is
    installed under the real name, and a later complete download finishes it."""
    base, files, seen = server
    data = files["AutoencoderModel/AutoencoderModel.ckpt"]
    target = tmp_path / "AutoencoderModel.ckpt"
    url = f"{base}/AutoencoderModel/AutoencoderModel.ckpt"
    _RangeHandler.short = True
    try:
        with pytest.raises(DiffTumorError, match=f"sent {len(data) // 2} of {len(data)} bytes.*rerun to resume"):
            weights.download(url, target, progress=False)
    finally:
        _RangeHandler.short = False
    assert not target.exists()
    assert target.with_name(target.name + ".part").read_bytes() == data[: len(data) // 2]
    weights.download(url, target, progress=False)
    assert target.read_bytes() == data and seen[-1][1] == f"bytes={len(data) // 2}-"


def test_fetch_restarts_when_the_part_is_larger_than_the_file(server, tmp_path, caplog):
    """A stale part longer than the file on the server (HTTP 416) is not taken for a complete download."""
    base, files, seen = server
    data = files["AutoencoderModel/AutoencoderModel.ckpt"]
    target = tmp_path / "AutoencoderModel.ckpt"
    target.with_name(target.name + ".part").write_bytes(b"x" * (len(data) + 1000))
    weights.download(f"{base}/AutoencoderModel/AutoencoderModel.ckpt", target, progress=False)
    assert target.read_bytes() == data
    assert "does not fit the file on the server" in caplog.text
    # a part that is already the whole file is complete (416 with the same size)
    part = target.with_name(target.name + ".part")
    part.write_bytes(data)
    target.unlink()
    weights.download(f"{base}/AutoencoderModel/AutoencoderModel.ckpt", target, progress=False)
    assert target.read_bytes() == data and seen[-1][1] == f"bytes={len(data)}-"


def test_an_organ_without_released_weights_is_one_sentence(tmp_path):
    (tmp_path / "AutoencoderModel.ckpt").write_bytes(b"x")
    with pytest.raises(DiffTumorError, match=r"^no diffusion model for spleen: .* --method model-based"):
        weights.WeightsFolder(tmp_path).require("spleen", "early")


def test_check_names_a_truncated_diffusion_file_in_a_few_words(tmp_path, capsys):
    import torch

    from backend.cli import main

    good = tmp_path / "good.pt"
    torch.save({"ema": {"w": torch.zeros(1000)}}, good)
    (tmp_path / "liver_early.pt").write_bytes(good.read_bytes()[:500])
    good.unlink()
    assert main(["weights", "check", str(tmp_path)]) == 1
    out = capsys.readouterr().out
    assert "liver_early.pt: not a readable diffusion checkpoint (truncated or damaged file)" in out
    assert "miniz" not in out


def test_the_tests_cannot_reach_the_release_server():
    import urllib.request

    with pytest.raises(AssertionError, match="use the local server"):
        urllib.request.urlopen("http://93.184.215.14/", timeout=1)


def test_manifest_lists_release_urls():
    m = json.loads(weights.MANIFEST_PATH.read_text(encoding="utf-8"))
    assert m["base_url"].startswith("https://huggingface.co/MrGiovanni/DiffTumor")
    plan = weights.fetch_plan(organs=("kidney",))
    assert {p["name"] for p in plan} == {"AutoencoderModel.ckpt", "kidney_early.pt", "kidney_noearly.pt"}
    assert all(p["url"].startswith(m["base_url"]) for p in plan)


def _cli(argv):
    """`difftumor` with only the weights command registered."""
    import backend.cli

    saved = backend.cli.COMMAND_MODULES
    backend.cli.COMMAND_MODULES = ["backend.cli.weights"]
    try:
        return backend.cli.main(argv)
    finally:
        backend.cli.COMMAND_MODULES = saved


def test_check_of_a_folder_without_weights_fails_and_says_what_was_expected(tmp_path, capsys, caplog):
    empty = tmp_path / "w"
    empty.mkdir()
    assert _cli(["weights", "check", str(empty)]) == 1  # was 0
    assert "MISSING  AutoencoderModel.ckpt" in capsys.readouterr().out
    assert [(r.levelname, r.getMessage()) for r in caplog.records] == [(
        "ERROR", f"weights folder {empty} holds none of the expected files (AutoencoderModel.ckpt, "
        f"{{liver,pancreas,kidney}}_{{early,noearly}}.pt); download them with 'difftumor weights fetch --dest {empty}'"
    )]
    caplog.clear()
    (empty / "liver.pt").write_bytes(b"renamed release file")
    assert _cli(["weights", "check", str(empty), "--no-load", "--json"]) == 1
    assert caplog.records[-1].getMessage().endswith("; it holds liver.pt, which must carry the expected names")
    (empty / "liver_early.pt").write_bytes(b"x")  # one expected file present: listed, not an error
    assert _cli(["weights", "check", str(empty), "--no-load"]) == 0


def test_remember_an_empty_folder_warns_but_remembers(tmp_path, caplog):
    empty = tmp_path / "w"
    empty.mkdir()
    assert _cli(["weights", "check", str(empty), "--remember"]) == 1
    assert weights.get_weights_dir_setting() == empty.resolve()  # `weights fetch` then downloads into it
    assert [r.getMessage() for r in caplog.records if r.levelname == "WARNING"] == [
        f"remembered {empty} as the weights folder although it holds no weights yet "
        "('difftumor weights fetch' downloads into it)"]


def test_remember_a_folder_with_a_broken_file_warns(tmp_path, caplog):
    """docs/weights.md promised a warning; only an empty folder gave one."""
    folder = tmp_path / "w"
    folder.mkdir()
    (folder / "AutoencoderModel.ckpt").write_bytes(b"not a checkpoint")
    assert _cli(["weights", "check", str(folder), "--remember"]) == 1
    assert weights.get_weights_dir_setting() == folder.resolve()
    assert [r.getMessage() for r in caplog.records if r.levelname == "WARNING"] == [
        f"remembered {folder} as the weights folder although AutoencoderModel.ckpt is broken or does not fit "
        "(see below)"]


def test_check_names_a_positional_folder_as_given(tmp_path, capsys):
    assert _cli(["weights", "check", str(tmp_path / "nonexist")]) == 2
    assert capsys.readouterr().err.strip() == f"difftumor: error: weights folder {tmp_path / 'nonexist'}: not a folder"
    with pytest.raises(DiffTumorError, match=r"^--weights .*nonexist: not a folder$"):
        weights.resolve_weights_dir(tmp_path / "nonexist")  # synthesize's option keeps its name


def test_check_calls_a_pair_with_different_latent_channels_incompatible(tmp_path, capsys):
    """A 4-channel autoencoder beside a denoiser trained on 8-channel latents loads, but cannot synthesise."""

    from backend.cli import main
    from backend.diffusion.ddpm import DDPMScheduler
    from backend.diffusion.official import save_official
    from backend.diffusion.unet import Unet3D, Unet3DConfig
    from backend.train.common import save_checkpoint
    from backend.vqgan.model import VQGAN, VQGANConfig

    ae_cfg = VQGANConfig(n_hiddens=8, num_groups=8, downsample=(4, 4, 4), embedding_dim=4, n_codes=16)
    save_checkpoint(tmp_path / weights.AE_NAME, stage="autoencoder", config={}, model_config=ae_cfg.to_dict(), step=0,
                    model=VQGAN(ae_cfg).state_dict())
    unet = Unet3D(Unet3DConfig(dim=8, dim_mults=(1, 2), attn_heads=2, attn_dim_head=8, rotary_dim=8))  # 17 in / 8 out
    save_official(tmp_path / "liver_early.pt", model=unet, ema=unet, scheduler=DDPMScheduler(4), vqgan_state=None, step=0)
    row = {r["name"]: r for r in weights.check_folder(tmp_path)}["liver_early.pt"]
    assert row["loads"] is True and row["compatible"] is False
    assert "17 input / 8 output channels" in row["error"] and "4 latent channels (needs 9 / 4)" in row["error"]
    assert main(["weights", "check", str(tmp_path)]) == 1
    out = capsys.readouterr().out
    assert "INCOMPATIBLE liver_early.pt" in out and "liver     diffusion ready for: nothing" in out


def test_fetch_refuses_bad_dest_and_base_url_in_one_line_and_writes_nothing(tmp_path, capsys):
    """A file as --dest, a base URL that is no URL, an unreachable server and an unwritable folder were
    tracebacks (FileExistsError, ValueError, OSError) or left an empty folder behind."""
    a_file = tmp_path / "notes.txt"
    a_file.write_text("x")
    cases = [
        (["--dest", str(a_file)], "is an existing file"),
        (["--dest", str(tmp_path / "w1"), "--base-url", "mirror/weights"], "--base-url mirror/weights: not a URL"),
        (["--dest", str(tmp_path / "w2" / "sub"), "--base-url", "http://127.0.0.1:1"], "download failed"),
    ]
    for argv, words in cases:
        assert _cli(["weights", "fetch", "--organ", "liver", *argv]) == 2
        err = capsys.readouterr().err.strip()
        assert len(err.splitlines()) == 1 and words in err, err
    assert not (tmp_path / "w1").exists() and not (tmp_path / "w2").exists()


def test_fetch_names_the_file_it_cannot_write(tmp_path, monkeypatch, capsys):
    def read_only(url, dest, **kw):
        raise OSError(30, "Read-only file system", str(dest) + ".part")

    monkeypatch.setattr(weights, "download", read_only)
    dest = tmp_path / "w"
    assert _cli(["weights", "fetch", "--organ", "liver", "--dest", str(dest), "--base-url", "http://127.0.0.1:1"]) == 2
    err = capsys.readouterr().err.strip()
    assert err == f"difftumor: error: --dest {dest}: cannot write {dest}/AutoencoderModel.ckpt.part (Read-only file system)"
    assert not dest.exists()


# ------------------------------------------------------------------ do the folder's files fit together?
def _tiny():
    import tiny_weights

    return tiny_weights


def _rows(root):
    return {r["name"]: r for r in weights.check_folder(root, organs=("liver",))}


def test_check_refuses_an_autoencoder_with_another_codebook_than_the_denoisers(tmp_path, capsys):
    """Issue 14 defect 3: an official-size autoencoder beside our own diffusion files was 'ready for: early,
    mid/late', then synthesis died in a 'size mismatch for codebook' traceback."""
    tw = _tiny()
    tw.autoencoder(tmp_path / weights.AE_NAME, n_codes=64)  # stands in for the official 16384 x 8 codebook
    ours = tw.autoencoder(tmp_path / "ours.ckpt", n_codes=16)
    (tmp_path / "ours.ckpt").unlink()
    tw.diffusion(tmp_path / "liver_early.pt", ours, T=4, stage="early")
    tw.diffusion(tmp_path / "liver_noearly.pt", ours, T=10, stage="noearly")
    rows = _rows(tmp_path)
    for name in ("liver_early.pt", "liver_noearly.pt"):
        assert rows[name]["loads"] is True and rows[name]["compatible"] is False, rows[name]
        assert ("was trained with an autoencoder whose codebook has 16 codes of 8 channels, but "
                "AutoencoderModel.ckpt has 64 codes of 8 channels") in rows[name]["error"], rows[name]["error"]
    assert _cli(["weights", "check", str(tmp_path)]) == 1
    out = capsys.readouterr().out
    assert "INCOMPATIBLE liver_early.pt" in out and "liver     diffusion ready for: nothing" in out


def test_check_refuses_our_denoiser_beside_another_autoencoder_of_the_same_shape(tmp_path):
    """Same architecture, other weights: the denoiser learnt another latent space. Our files say so for sure; a
    file in the plain release layout is only warned about (the release decodes early tumours with its own copy)."""
    tw = _tiny()
    tw.autoencoder(tmp_path / weights.AE_NAME, seed=0)
    other = tw.autoencoder(tmp_path / "other.ckpt", seed=1)
    (tmp_path / "other.ckpt").unlink()
    tw.diffusion(tmp_path / "liver_early.pt", other, stage="early")
    tw.diffusion(tmp_path / "liver_noearly.pt", other, T=200, stage=None)
    rows = _rows(tmp_path)
    assert rows["liver_early.pt"]["compatible"] is False
    assert "was trained with another autoencoder (its embedded copy differs from AutoencoderModel.ckpt" in rows["liver_early.pt"]["error"]
    assert rows["liver_noearly.pt"]["compatible"] is True
    assert "differs from AutoencoderModel.ckpt" in rows["liver_noearly.pt"]["warning"]


def test_check_compares_a_recorded_autoencoder_sha256(tmp_path):
    """A file without an embedded copy that records the sha256 of its autoencoder is checked against it."""
    tw = _tiny()
    tw.autoencoder(tmp_path / weights.AE_NAME)
    tw.diffusion(tmp_path / "liver_early.pt", None, extra={"autoencoder": {"path": "/x/ae.ckpt", "sha256": "ab" * 32}})
    row = _rows(tmp_path)["liver_early.pt"]
    assert row["compatible"] is False and "sha256 abababababab" in row["error"], row


def test_check_refuses_a_file_whose_stage_contradicts_its_name(tmp_path, capsys):
    """A T = 4 early model saved as liver_noearly.pt passed, and its provenance then said T=200."""
    tw = _tiny()
    vq = tw.autoencoder(tmp_path / weights.AE_NAME)
    tw.diffusion(tmp_path / "liver_noearly.pt", vq, T=4, stage="early")
    row = _rows(tmp_path)["liver_noearly.pt"]
    assert row["compatible"] is False
    assert row["error"] == ("holds a model for early tumours (stage early, T = 4, as recorded in the file) but its name "
                            "says noearly (mid/late tumours); rename it to liver_early.pt")
    tw.diffusion(tmp_path / "liver_noearly.pt", vq, T=4, stage=None)  # plain release layout: told by T
    row = _rows(tmp_path)["liver_noearly.pt"]
    assert row["compatible"] is False and "T = 4 diffusion steps, as the release's early model" in row["error"]
    tw.diffusion(tmp_path / "liver_early.pt", vq, T=4, stage="early")
    assert _cli(["weights", "check", str(tmp_path)]) == 1
    assert "liver     diffusion ready for: early\n" in capsys.readouterr().out


def test_fetch_tries_every_file_and_reports_each_that_failed(server, tmp_path, capsys):
    """A 404 stopped the fetch before the other files were tried."""
    base, files, _ = server
    (Path(server_root := tmp_path / "srv") / "DiffusionModel" / "liver_early.pt").unlink()  # the 2nd of 3 files
    dest = tmp_path / "w"
    assert _cli(["weights", "fetch", "--organ", "liver", "--dest", str(dest), "--base-url", base]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1, err
    assert err.startswith("difftumor: error: weights fetch: 1 of 3 files failed: ") and "liver_early.pt" in err
    assert "HTTP 404" in err and f"the other 2 are in {dest}" in err
    assert sorted(p.name for p in dest.iterdir()) == ["AutoencoderModel.ckpt", "liver_noearly.pt"]  # kept
    assert server_root.is_dir()
