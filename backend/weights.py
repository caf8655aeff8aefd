"""The weights folder: where it is, what it holds, whether it loads, and fetching the released files.

One folder holds the released file names —
``AutoencoderModel.ckpt`` (stage 1, shared by all organs) and ``{organ}_early.pt`` /
``{organ}_noearly.pt`` (stage 2, per organ) — or our own checkpoints saved under the same names.

The folder is found, in order, from: an explicit argument, the environment variable
``DIFFTUMOR_WEIGHTS``, the user config ``~/.config/difftumor/config.json`` (key ``weights_dir``;
``$XDG_CONFIG_HOME`` is honoured). The napari widget remembers the folder with :func:`set_weights_dir`.

``difftumor weights check [DIR]`` and ``difftumor weights fetch`` (``backend/cli/weights.py``) use
:func:`check_folder` and :func:`fetch`. sha256 sums are cached in the user cache folder
(``$XDG_CACHE_HOME/difftumor/sha256-cache.json``, default ``~/.cache/difftumor``) keyed by absolute path, size
and mtime, so that a check of 1.5 GB of weights is instant the second time and nothing is written into the
user's folders. docs/weights.md gives the rules ``weights check`` applies.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import logging
import os
import time
import urllib.parse
from dataclasses import dataclass, field
from pathlib import Path

from backend.errors import DiffTumorError

log = logging.getLogger(__name__)

ENV_VAR = "DIFFTUMOR_WEIGHTS"
AE_NAME = "AutoencoderModel.ckpt"
WEIGHT_ORGANS = ("liver", "pancreas", "kidney")  # organs with released diffusion weights
STAGES = ("early", "noearly")
SHA_CACHE = "sha256-cache.json"  # in the user cache folder (cache_dir()), never beside the weights
SHA_CACHE_SIZE = 2000  # entries kept (most recently computed)
MANIFEST_PATH = Path(__file__).with_name("weights_manifest.json")


# --------------------------------------------------------------------------------------------
# user config
# --------------------------------------------------------------------------------------------
def config_path() -> Path:
    base = os.environ.get("XDG_CONFIG_HOME") or str(Path.home() / ".config")
    return Path(base) / "difftumor" / "config.json"


def read_config() -> dict:
    p = config_path()
    if not p.is_file():
        return {}
    try:
        data = json.loads(p.read_text(encoding="utf-8"))
    except (OSError, ValueError) as exc:
        raise DiffTumorError(f"{p}: not a readable JSON config ({exc}); fix or delete it") from exc
    return data if isinstance(data, dict) else {}


def write_config(data: dict) -> Path:
    p = config_path()
    p.parent.mkdir(parents=True, exist_ok=True)
    from backend.io import write_text_atomic

    return write_text_atomic(p, json.dumps(data, indent=2, sort_keys=True))


def get_weights_dir_setting() -> Path | None:
    """The folder remembered in the user config, or None."""
    v = read_config().get("weights_dir")
    return Path(v).expanduser() if v else None


def set_weights_dir(path) -> Path:
    """Remember ``path`` as the weights folder in the user config (None forgets it)."""
    data = read_config()
    if path is None:
        data.pop("weights_dir", None)
    else:
        data["weights_dir"] = str(Path(path).expanduser().resolve())
    return write_config(data)


def resolve_weights_dir(path=None, *, what: str = "--weights") -> tuple[Path | None, str]:
    """(folder, where it came from) — ``argument``, ``$DIFFTUMOR_WEIGHTS``, ``user config`` or (None, "none").

    An explicit argument or environment value that is not a folder is an error (one line); ``what``
    names the argument in it (``--weights``, or ``weights folder`` for a positional one).
    """
    if path is not None:
        p = Path(path).expanduser()
        if not p.is_dir():
            raise DiffTumorError(f"{what} {p}: not a folder")
        return p, "argument"
    env = os.environ.get(ENV_VAR)
    if env:
        p = Path(env).expanduser()
        if not p.is_dir():
            raise DiffTumorError(f"${ENV_VAR}={env}: not a folder")
        return p, f"${ENV_VAR}"
    p = get_weights_dir_setting()
    if p is not None:
        if not p.is_dir():
            raise DiffTumorError(f"{config_path()}: weights_dir {p} is not a folder; set another with "
                                 "'difftumor weights check DIR --remember'")
        return p, "user config"
    return None, "none"


# --------------------------------------------------------------------------------------------
# the folder's content
# --------------------------------------------------------------------------------------------
def weight_organ(organ: str) -> str:
    """Which released organ's weights serve ``organ`` (kidney_left/right -> kidney)."""
    return "kidney" if organ.startswith("kidney") else organ


def diffusion_name(organ: str, stage: str) -> str:
    """File name for ``stage`` in {"early", "noearly", "mid_late"} (mid_late = noearly)."""
    st = "noearly" if stage in ("noearly", "mid_late") else stage
    if st not in STAGES:
        raise ValueError(f"stage {stage!r} is not one of early, noearly, mid_late")
    return f"{weight_organ(organ)}_{st}.pt"


@dataclass
class WeightsFolder:
    """A weights folder (``root`` may be None: nothing found)."""

    root: Path | None
    source: str = "argument"
    _sha: dict = field(default_factory=dict, repr=False)

    @classmethod
    def find(cls, path=None) -> WeightsFolder:
        root, source = resolve_weights_dir(path)
        return cls(root, source)

    def path(self, name: str) -> Path | None:
        if self.root is None:
            return None
        p = self.root / name
        return p if p.is_file() else None

    def files_for(self, organ: str, stage: str) -> list[str]:
        """File names needed for ``stage`` of ``organ`` (the AE encodes; early decodes with the .pt's VQGAN)."""
        return [AE_NAME, diffusion_name(organ, stage)]

    def missing(self, organ: str, stage: str) -> list[str]:
        return [n for n in self.files_for(organ, stage) if self.path(n) is None]

    def has(self, organ: str, stage: str) -> bool:
        return not self.missing(organ, stage)

    def require(self, organ: str, stage: str) -> dict[str, Path]:
        """Paths for ``stage`` of ``organ`` or one clear sentence naming what is missing."""
        if weight_organ(organ) not in WEIGHT_ORGANS:
            raise DiffTumorError(
                f"no diffusion model for {organ}: DiffTumor's weights exist for {', '.join(WEIGHT_ORGANS)}; use "
                f"--method model-based, or another organ's model with --weights-organ (e.g. --weights-organ liver)")
        miss = self.missing(organ, stage)
        if miss:
            where = f"weights folder {self.root}" if self.root else (
                f"no weights folder (give --weights DIR, set ${ENV_VAR}, or run 'difftumor weights fetch')"
            )
            raise DiffTumorError(f"{where}: missing {', '.join(miss)} needed for {stage} {organ} tumours")
        return {n: self.path(n) for n in self.files_for(organ, stage)}

    def sha256(self, name: str) -> str:
        p = self.path(name)
        if p is None:
            raise FileNotFoundError(name)
        return sha256_cached(p)


# --------------------------------------------------------------------------------------------
# sha256 with a (size, mtime) cache
# --------------------------------------------------------------------------------------------
def sha256_file(path: Path, chunk: int = 8 << 20) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while True:
            b = f.read(chunk)
            if not b:
                break
            h.update(b)
    return h.hexdigest()


def cache_dir() -> Path:
    """The user cache folder: ``$XDG_CACHE_HOME/difftumor`` or ``~/.cache/difftumor``."""
    base = os.environ.get("XDG_CACHE_HOME") or str(Path.home() / ".cache")
    return Path(base) / "difftumor"


def sha_cache_path() -> Path:
    return cache_dir() / SHA_CACHE


def _read_sha_cache(path: Path) -> dict:
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError):  # absent or damaged: start afresh (it is only a cache)
        return {}
    return data if isinstance(data, dict) else {}


def sha256_cached(path: Path) -> str:
    """sha256 of ``path``, cached in the user cache folder (:func:`sha_cache_path`) under the file's absolute
    path, size and mtime_ns; nothing is written next to the file. The cache keeps the :data:`SHA_CACHE_SIZE`
    most recently used entries; a cache that cannot be written only costs a recomputation."""
    path = Path(path)
    st = path.stat()
    key = str(path.resolve())
    side = sha_cache_path()
    cache = _read_sha_cache(side)
    entry = cache.get(key)
    if (isinstance(entry, dict) and entry.get("size") == st.st_size and entry.get("mtime_ns") == st.st_mtime_ns
            and isinstance(entry.get("sha256"), str)):
        return entry["sha256"]
    digest = sha256_file(path)
    cache = _read_sha_cache(side)  # re-read: another process may have added entries meanwhile
    cache[key] = {"size": st.st_size, "mtime_ns": st.st_mtime_ns, "sha256": digest, "at": time.time()}
    if len(cache) > SHA_CACHE_SIZE:
        keep = sorted(cache, key=lambda k: cache[k].get("at", 0) if isinstance(cache[k], dict) else 0)[-SHA_CACHE_SIZE:]
        cache = {k: cache[k] for k in keep}
    from backend.io import write_text_atomic

    with contextlib.suppress(OSError):  # unwritable cache folder: no cache, still correct
        side.parent.mkdir(parents=True, exist_ok=True)
        write_text_atomic(side, json.dumps(cache, indent=1, sort_keys=True))
    return digest


# --------------------------------------------------------------------------------------------
# check
# --------------------------------------------------------------------------------------------
def load_weight_file(path: Path):
    """Load through the stage-1 / stage-2 loaders (raises DiffTumorError on a broken file)."""
    if path.name == AE_NAME:
        from backend.vqgan.official import load_autoencoder

        return load_autoencoder(path)
    from backend.diffusion.official import load_diffusion

    return load_diffusion(path)


def manifest() -> dict:
    return json.loads(MANIFEST_PATH.read_text(encoding="utf-8"))


EXPECTED_NAMES = f"{AE_NAME}, {{{','.join(WEIGHT_ORGANS)}}}_{{{','.join(STAGES)}}}.pt"  # for messages


def other_weight_files(root) -> list[str]:
    """Names of ``.pt`` / ``.ckpt`` files in ``root`` that are not among the expected names
    (e.g. a renamed release file, which the loaders will not find)."""
    expected = {AE_NAME} | {diffusion_name(o, s) for o in WEIGHT_ORGANS for s in STAGES}
    return sorted(p.name for p in Path(root).iterdir()
                  if p.is_file() and p.suffix in (".pt", ".ckpt") and p.name not in expected)


def latent_mismatch(denoiser_config, latent_channels: int) -> str:
    """Why a denoiser cannot run on an autoencoder with ``latent_channels`` latent channels ("" when it can):
    it predicts the latent (out_dim channels) from latent + masked latent + mask (2 * latent + 1)."""
    want_in, want_out = 2 * latent_channels + 1, latent_channels
    if denoiser_config.channels == want_in and denoiser_config.out_dim == want_out:
        return ""
    return (f"denoiser has {denoiser_config.channels} input / {denoiser_config.out_dim} output channels, but "
            f"{AE_NAME} has {latent_channels} latent channels (needs {want_in} / {want_out})")


RELEASE_T = {"early": 4, "noearly": 200}  # diffusion steps of the released models
STAGE_WORDS = {"early": "early tumours", "noearly": "mid/late tumours"}
PUT_ITS_AE = (f"put the autoencoder it was trained with in the folder as {AE_NAME} (for one of our runs: the "
              "autoencoder run's checkpoint_last.pt), or use another weights folder")


def stage_mismatch(name: str, ck) -> str:
    """Why the diffusion file ``name`` ({organ}_{early,noearly}.pt) holds another stage than its name says ("" if not).

    A file we wrote records its stage (``difftumor.stage``): that decides. A file in the plain release layout is
    told by its number of diffusion steps: the release's early model has T = 4, its noearly model T = 200.
    """
    organ, _, rest = name.rpartition("_")
    named = rest.removesuffix(".pt")
    if named not in STAGES:
        return ""
    meta = ck.meta or {}
    T = ck.timesteps
    recorded_T = meta.get("timesteps")
    if isinstance(recorded_T, int) and recorded_T != T:
        return (f"records T = {recorded_T} diffusion steps but its noise schedule has {T}: the file is damaged; "
                "save it again from its training run")
    recorded = meta.get("stage")
    if recorded in STAGES:
        if recorded != named:
            return (f"holds a model for {STAGE_WORDS[recorded]} (stage {recorded}, T = {T}, as recorded in the file) "
                    f"but its name says {named} ({STAGE_WORDS[named]}); rename it to {organ}_{recorded}.pt")
        return ""
    other = next(s for s in STAGES if s != named)
    if T == RELEASE_T[other] != RELEASE_T[named]:
        return (f"has T = {T} diffusion steps, as the release's {other} model (its {named} model has "
                f"T = {RELEASE_T[named]}), but its name says {named} ({STAGE_WORDS[named]}); if it is the {other} "
                f"model, rename it to {organ}_{other}.pt")
    return ""


def _codebook(shape) -> str:
    return f"{shape[0]} codes of {shape[1]} channels"


def autoencoder_mismatch(ck, ae, ae_sha256) -> tuple[str, str]:
    """(error, warning) for a diffusion checkpoint ``ck`` beside the autoencoder model ``ae``.

    The denoiser learnt the latent space of the autoencoder it was trained with, a copy of which the file embeds
    (``vqgan.*``). error: that copy has another codebook or architecture, or (for a file we wrote) other weights;
    or the file records the sha256 of its autoencoder and has no copy, and ``ae_sha256()`` differs.
    warning: a file in the plain release layout whose copy has the same shapes but other weights (the release
    decodes early tumours with that copy).
    """
    from backend.vqgan.official import OPTIONAL_KEYS

    ref = {k: v.detach().cpu() for k, v in ae.state_dict().items()}
    emb = ck.vqgan_state
    ours = bool(ck.meta)
    if not emb:
        record = (ck.meta or {}).get("autoencoder")
        sha = record.get("sha256") if isinstance(record, dict) else None
        if sha and sha != ae_sha256():
            return (f"was trained with the autoencoder {record.get('path', '?')} (sha256 {str(sha)[:12]}…), but "
                    f"{AE_NAME} is another file (sha256 {ae_sha256()[:12]}…); {PUT_ITS_AE}"), ""
        return "", ""
    codes, own = emb.get("codebook.embeddings"), ref["codebook.embeddings"]
    if codes is not None and tuple(codes.shape) != tuple(own.shape):
        return (f"was trained with an autoencoder whose codebook has {_codebook(codes.shape)}, but {AE_NAME} has "
                f"{_codebook(own.shape)}; {PUT_ITS_AE}"), ""
    keys = [k for k in ref if k not in OPTIONAL_KEYS]  # codebook.N / z_avg: training-only state
    missing = [k for k in keys if k not in emb]
    shaped = [k for k in keys if k in emb and tuple(emb[k].shape) != tuple(ref[k].shape)]
    if missing or shaped:
        first = (f"'{shaped[0]}' has shape {tuple(emb[shaped[0]].shape)}, {tuple(ref[shaped[0]].shape)} in {AE_NAME}"
                 if shaped else f"it lacks '{missing[0]}'")
        return (f"was trained with an autoencoder of another architecture than {AE_NAME} ({len(missing) + len(shaped)} "
                f"of its embedded copy's tensors differ in shape; first: {first}); {PUT_ITS_AE}"), ""
    differ = [k for k in keys if not _same_tensor(emb[k], ref[k])]
    if not differ:
        return "", ""
    text = (f"was trained with another autoencoder (its embedded copy differs from {AE_NAME} in {len(differ)} of "
            f"{len(keys)} tensors, e.g. '{differ[0]}')")
    if ours:
        return f"{text}; {PUT_ITS_AE}", ""
    return "", (f"{text}; the release encodes with {AE_NAME} and decodes early tumours with that copy, so both "
                "should come from the same release")


def _same_tensor(a, b) -> bool:
    import torch

    return a.shape == b.shape and torch.equal(a.to(b.dtype), b)


def fit_problems(name: str, ck, ae=None, ae_sha256=None) -> tuple[str, str]:
    """(error, warning) for the diffusion file ``name`` loaded as ``ck``: its stage against its name, and, with
    the folder's autoencoder model ``ae``, its latent channels and embedded autoencoder against it."""
    problem = stage_mismatch(name, ck)
    if problem or ae is None:
        return problem, ""
    problem = latent_mismatch(ck.unet.config, ae.config.embedding_dim)
    if problem:
        return f"{problem}; {PUT_ITS_AE}", ""
    return autoencoder_mismatch(ck, ae, ae_sha256 or (lambda: ""))


def require_fit(root, name: str, ck, ae, ae_sha256) -> None:
    """Raise one line when the diffusion file ``name`` cannot synthesise with the folder's autoencoder ``ae``;
    log a warning for a doubtful pair (see :func:`fit_problems`)."""
    error, warning = fit_problems(name, ck, ae, ae_sha256)
    if error:
        raise DiffTumorError(f"weights folder {root}: {name} does not fit the folder: it {error}")
    if warning:
        log.warning("weights folder %s: %s %s", root, name, warning)


def check_folder(root, *, organs=WEIGHT_ORGANS, load: bool = True) -> list[dict]:
    """One row per expected file: name, present, size, sha256, expected sha256 match, loads, compatible,
    error, warning. ``compatible`` (diffusion files that load) says whether the file can synthesise in this
    folder: its stage matches its name, and (when the autoencoder loads) its denoiser's channels and embedded
    autoencoder fit the folder's autoencoder (:func:`fit_problems`)."""
    folder = WeightsFolder(Path(root))
    expected = {f["name"]: f.get("sha256") for f in manifest()["files"]}
    names = [AE_NAME] + [diffusion_name(o, s) for o in organs for s in STAGES]
    rows = []
    ae = None  # the autoencoder model, once it loads
    for name in names:
        row = {"name": name, "present": False, "size": None, "sha256": None, "sha_ok": None, "loads": None,
               "compatible": None, "error": "", "warning": ""}
        p = folder.path(name)
        if p is not None:
            row.update(present=True, size=p.stat().st_size, sha256=sha256_cached(p))
            if expected.get(name):
                row["sha_ok"] = row["sha256"] == expected[name]
            if load:
                try:
                    loaded = load_weight_file(p)
                    row["loads"] = True
                except Exception as exc:  # any failure = this file is unusable; say why in one line
                    row["loads"] = False
                    row["error"] = " ".join(str(exc).split())[:600]
                else:
                    if name == AE_NAME:
                        ae = loaded
                    else:
                        ae_row = rows[0]
                        error, warning = fit_problems(name, loaded, ae, lambda row=ae_row: row["sha256"])
                        row.update(error=error, warning=warning)
                        if error or ae is not None:
                            row["compatible"] = not error
        rows.append(row)
    return rows


# --------------------------------------------------------------------------------------------
# fetch
# --------------------------------------------------------------------------------------------
def fetch_plan(*, organs=WEIGHT_ORGANS, base_url: str | None = None) -> list[dict]:
    """Manifest entries needed for ``organs`` (the AE always), with their full URL."""
    m = manifest()
    base = (base_url or m["base_url"]).rstrip("/") + "/"
    want = {AE_NAME} | {diffusion_name(o, s) for o in organs for s in STAGES}
    return [dict(f, url=base + f["path"]) for f in m["files"] if f["name"] in want]


def _range_total(content_range: str | None) -> int | None:
    """The full size N from a ``Content-Range: bytes a-b/N`` or ``bytes */N`` header (None if absent/unknown)."""
    try:
        return int(str(content_range).rsplit("/", 1)[1])
    except (IndexError, ValueError):
        return None


def download(url: str, dest: Path, *, sha256: str | None = None, progress: bool = True, chunk: int = 1 << 20,
             timeout: float = 60.0) -> Path:
    """Download ``url`` to ``dest`` through ``dest.part`` with HTTP Range resume, then verify and rename.

    A partial ``.part`` left by an interrupted run is resumed when the server honours ``Range``
    (status 206); otherwise the download restarts, as it does when the part is not a prefix-sized piece
    of the file (larger than the file on the server). A connection that closes before the announced size
    keeps the part file and raises one clear line (rerun to resume); nothing incomplete is renamed to
    ``dest``. A sha256 mismatch deletes the part file and raises one clear line.
    """
    import http.client
    import urllib.error
    import urllib.request

    dest = Path(dest)
    part = dest.with_name(dest.name + ".part")
    have = part.stat().st_size if part.is_file() else 0
    resp = None
    complete = False
    for _attempt in range(2):  # a second try without Range when the part does not fit the file
        req = urllib.request.Request(url, headers={"User-Agent": "difftumor-weights"})
        if have:
            req.add_header("Range", f"bytes={have}-")
        try:
            resp = urllib.request.urlopen(req, timeout=timeout)
            break
        except urllib.error.HTTPError as exc:
            if exc.code == 416 and have:  # nothing left past `have`: complete, or a part larger than the file
                if _range_total(exc.headers.get("Content-Range")) == have:  # unknown size: start again, to be safe
                    complete = True
                    break
                log.warning("%s: the partial download (%d bytes) does not fit the file on the server; starting again",
                            part, have)
                part.unlink()
                have = 0
                continue
            raise DiffTumorError(f"{url}: download failed (HTTP {exc.code} {exc.reason})") from exc
        except (urllib.error.URLError, OSError) as exc:
            raise DiffTumorError(f"{url}: download failed ({getattr(exc, 'reason', exc)})") from exc
    if resp is not None:
        with resp:
            resumed = have and resp.status == 206
            if not resumed:
                have = 0
            total = resp.headers.get("Content-Length")
            total = int(total) + have if total is not None else None
            from tqdm import tqdm

            with open(part, "ab" if resumed else "wb") as f, tqdm(
                total=total, initial=have, unit="B", unit_scale=True, desc=dest.name, leave=False,
                disable=None if progress else True,  # None: no bar when stderr is not a terminal
            ) as bar:
                while True:
                    try:
                        b = resp.read(chunk)
                    except (OSError, http.client.HTTPException) as exc:
                        raise DiffTumorError(f"{url}: connection lost after {f.tell()} bytes ({exc}); rerun to resume") from exc
                    if not b:
                        break
                    f.write(b)
                    bar.update(len(b))
                got = f.tell()
            if total is not None and got != total:
                raise DiffTumorError(f"{url}: the server sent {got} of {total} bytes; the partial file {part} is kept, "
                                     "rerun to resume")
    elif not complete:  # pragma: no cover - the loop always breaks with a response or complete
        raise DiffTumorError(f"{url}: download failed")
    if sha256:
        got = sha256_file(part)
        if got != sha256:
            part.unlink()
            raise DiffTumorError(f"{url}: sha256 {got[:16]}… differs from the expected {sha256[:16]}…; the partial file "
                                 "was deleted, rerun to retry")
    os.replace(part, dest)
    return dest


def fetch(dest=None, *, organs=WEIGHT_ORGANS, base_url: str | None = None, progress: bool = True, force: bool = False) -> list[Path]:
    """Download the released files for ``organs`` into ``dest`` (default: the resolved weights folder)."""
    if dest is None:
        dest, _ = resolve_weights_dir(None)
        if dest is None:
            raise DiffTumorError(f"weights fetch: no destination; give --dest DIR or set ${ENV_VAR}")
    dest = Path(dest).expanduser()
    if base_url is not None and urllib.parse.urlsplit(base_url).scheme not in ("http", "https", "ftp", "file"):
        raise DiffTumorError(f"--base-url {base_url}: not a URL (http://, https://, ftp:// or file://)")
    if dest.exists() and not dest.is_dir():
        raise DiffTumorError(f"--dest {dest}: is an existing file; give a folder")
    made = [d for d in (dest, *dest.parents) if not d.exists()][::-1]
    try:
        dest.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise DiffTumorError(f"--dest {dest}: cannot create the folder ({exc.strerror or exc})") from None
    got, failed = [], []
    plan = fetch_plan(organs=organs, base_url=base_url)
    try:
        for f in plan:  # every file is tried: one that fails (404, checksum) does not stop the others
            target = dest / f["name"]
            if target.is_file() and not force:
                log.info("%s: present, skipped", target)
                got.append(target)
                continue
            t0 = time.perf_counter()
            try:
                download(f["url"], target, sha256=f.get("sha256"), progress=progress)
            except KeyboardInterrupt:
                log.warning("interrupted: %s.part keeps what was downloaded; rerun the same command to resume", target)
                raise
            except DiffTumorError as exc:  # this file: HTTP error, checksum, connection lost
                failed.append(str(exc))
                continue
            except OSError as exc:  # the part file or the rename: a read-only or full folder stops everything
                where = getattr(exc, "filename", None) or target
                raise DiffTumorError(f"--dest {dest}: cannot write {where} ({exc.strerror or exc})") from None
            log.info("%s: downloaded in %.1f s", target, time.perf_counter() - t0)
            got.append(target)
        if failed:
            kept = (f"the other {len(got)} {'is' if len(got) == 1 else 'are'} in {dest}" if got
                    else "nothing was written")
            raise DiffTumorError(f"weights fetch: {len(failed)} of {len(plan)} files failed: {'; '.join(failed)}; "
                                 f"{kept}; rerun the same command to retry the failed ones")
    except BaseException:
        for d in reversed(made):  # folders this call made and nothing was written into
            try:
                d.rmdir()
            except OSError:
                break
        raise
    return got
