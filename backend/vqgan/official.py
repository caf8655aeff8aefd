"""Safe loading of autoencoder checkpoints: the authors' Lightning ``AutoencoderModel.ckpt``, our own
training checkpoints, and plain state dicts.

Nothing pickled is executed. :func:`safe_load` passes ``torch.load`` a pickle module whose
``Unpickler.find_class`` admits only the globals such files need:

* ``collections.OrderedDict`` / ``Counter`` / ``defaultdict``, builtins ``dict`` / ``list`` / ``int``
  (``__builtin__.long`` under protocol 2), ``typing.Any``;
* ``torch._utils._rebuild_tensor_v2`` (torch resolves the storage classes itself);
* the five omegaconf names (``DictConfig``, ``ListConfig``, ``AnyNode``, ``Metadata``,
  ``ContainerMetadata``) mapped to one inert stand-in that only records its pickled state.

Any other global (``os.system``, ``builtins.eval``, a custom class ...) is refused with a
:class:`~backend.errors.DiffTumorError` before it is resolved, so it never runs. The stand-ins are then
walked into a plain config dict, and the architecture is built from that config (never from a YAML).

Public API::

    safe_load(path, *, map_location="cpu") -> object
    load_autoencoder(path, *, map_location="cpu", config=None) -> VQGAN
    load_autoencoder_with_extras(path, *, map_location="cpu", config=None) -> (VQGAN, extras, info)
    official_config(cfg: dict) -> VQGANConfig
"""

from __future__ import annotations

import collections
import io
import pickle
import types
import typing
from pathlib import Path

import torch

from backend.errors import DiffTumorError, load_failure_cause
from backend.vqgan.model import VQGAN, VQGANConfig

# Keys of the official LightningModule that are not part of the inference model: recognised, and
# handed back as "extras" (the training loss module loads them; inference ignores them).
EXTRA_PREFIXES = ("image_discriminator.", "video_discriminator.", "perceptual_model.")
# Training-only codebook state: filled from the embeddings when a plain state dict lacks it.
OPTIONAL_KEYS = ("codebook.N", "codebook.z_avg")
GIVE = "give the released AutoencoderModel.ckpt ('difftumor weights fetch') or an autoencoder run's checkpoint_last.pt"


def _keys(mapping, n: int = 8) -> str:
    keys = [str(k) for k in mapping]
    return ", ".join(keys[:n]) + (f", ... ({len(keys)} in all)" if len(keys) > n else "") if keys else "none"


class _OmegaConfStandIn:
    """Inert replacement for omegaconf containers/nodes: remembers the pickled state, runs nothing."""

    def __init__(self, *args, **kwargs):
        self.state = None

    def __setstate__(self, state):
        self.state = state


_ALLOWED = {
    ("collections", "OrderedDict"): collections.OrderedDict,
    ("collections", "Counter"): collections.Counter,
    ("collections", "defaultdict"): collections.defaultdict,
    ("builtins", "dict"): dict,
    ("builtins", "list"): list,
    ("builtins", "int"): int,
    ("__builtin__", "dict"): dict,
    ("__builtin__", "list"): list,
    ("__builtin__", "int"): int,
    ("__builtin__", "long"): int,
    ("typing", "Any"): typing.Any,
    ("torch._utils", "_rebuild_tensor_v2"): torch._utils._rebuild_tensor_v2,
}
for _name in ("dictconfig.DictConfig", "listconfig.ListConfig", "nodes.AnyNode", "base.Metadata", "base.ContainerMetadata"):
    _mod, _cls = _name.rsplit(".", 1)
    _ALLOWED[(f"omegaconf.{_mod}", _cls)] = _OmegaConfStandIn


class RefusedGlobal(pickle.UnpicklingError):
    def __init__(self, module: str, name: str):
        super().__init__(f"{module}.{name}")
        self.qualname = f"{module}.{name}"


class _RestrictedUnpickler(pickle.Unpickler):
    def find_class(self, module, name):
        obj = _ALLOWED.get((module, name))
        if obj is None:
            raise RefusedGlobal(module, name)
        return obj


def _restricted_load(file, **kwargs):
    return _RestrictedUnpickler(file, **kwargs).load()


# What torch.load needs from a pickle module: Unpickler (zip format) and load (legacy format).
restricted_pickle = types.ModuleType("difftumor_restricted_pickle")
restricted_pickle.Unpickler = _RestrictedUnpickler
restricted_pickle.load = _restricted_load
restricted_pickle.__dict__["loads"] = lambda data, **kw: _restricted_load(io.BytesIO(data), **kw)


def safe_load(path, *, map_location="cpu"):
    """``torch.load`` through the restricted unpickler; one-line DiffTumorError on any problem."""
    path = Path(path)
    if not path.is_file():
        raise DiffTumorError(f"{path}: autoencoder checkpoint not found (no such file); {GIVE}")
    try:
        return torch.load(path, map_location=map_location, pickle_module=restricted_pickle, weights_only=False)
    except RefusedGlobal as exc:
        raise DiffTumorError(
            f"{path}: refusing to load: the checkpoint asks for global '{exc.qualname}', which is not allowed "
            "(only tensors, plain containers and omegaconf configs are read; nothing in the file was executed); it is "
            f"not a checkpoint DiffTumor reads: {GIVE}"
        ) from None
    except Exception as exc:  # truncated zip, not a torch file, ...
        raise DiffTumorError(f"{path}: not a readable PyTorch checkpoint ({load_failure_cause(exc)}); download it again "
                             "('difftumor weights fetch --force') or save it again from its training run") from None


def to_plain(obj):
    """Walk omegaconf stand-ins (and containers) into plain dicts/lists/values."""
    if isinstance(obj, _OmegaConfStandIn):
        st = obj.state
        if isinstance(st, tuple):  # (dict_state, slot_state)
            st = next((s for s in st if isinstance(s, dict)), {})
        if not isinstance(st, dict):
            return None
        if "_content" in st:
            return to_plain(st["_content"])
        if "_val" in st:
            return to_plain(st["_val"])
        return None
    if isinstance(obj, dict):
        return {k: to_plain(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [to_plain(v) for v in obj]
    return obj


def official_config(cfg: dict) -> VQGANConfig:
    """VQGANConfig from the official ``hyper_parameters['cfg']`` (plain dict with model/dataset)."""
    model = dict(cfg.get("model") or {})
    ds = dict(cfg.get("dataset") or {})
    kw = {k: model[k] for k in ("n_hiddens", "embedding_dim", "n_codes", "num_groups", "norm_type",
                                "padding_type", "restart_thres", "no_random_restart") if model.get(k) is not None}
    if model.get("downsample") is not None:
        kw["downsample"] = tuple(model["downsample"])
    if ds.get("image_channels") is not None:
        kw["image_channels"] = int(ds["image_channels"])
    return VQGANConfig(**kw)


def _config_from_shapes(sd: dict) -> VQGANConfig:
    """Best-effort architecture of a bare state dict (official naming); strides assumed isotropic."""
    w = sd.get("encoder.conv_first.conv.weight")
    e = sd.get("codebook.embeddings")
    if w is None or e is None or "pre_vq_conv.conv.weight" not in sd:
        raise KeyError("'encoder.conv_first.conv.weight', 'codebook.embeddings', 'pre_vq_conv.conv.weight'")
    levels = len({k.split(".")[2] for k in sd if k.startswith("encoder.conv_blocks.")})
    h = int(w.shape[0])
    return VQGANConfig(image_channels=int(w.shape[1]), n_hiddens=h, downsample=(2**levels,) * 3,
                       embedding_dim=int(e.shape[1]), n_codes=int(e.shape[0]), num_groups=min(32, 2 * h))


def _find_state(path: Path, obj) -> tuple[dict, VQGANConfig | None, dict]:
    """(state_dict, config or None, info) from any supported checkpoint layout."""
    if not isinstance(obj, dict):
        raise DiffTumorError(f"{path}: not an autoencoder checkpoint: it holds a {type(obj).__name__}, not a dict of "
                             f"weights; {GIVE}")
    info: dict = {}
    if "state_dict" in obj and "hyper_parameters" in obj:  # official Lightning file
        hp = to_plain(obj["hyper_parameters"]) or {}
        cfg = hp.get("cfg") if isinstance(hp, dict) else None
        info = {"format": "lightning", "global_step": obj.get("global_step"), "cfg": cfg}
        return dict(obj["state_dict"]), official_config(cfg) if cfg else None, info
    if "model" in obj and "model_config" in obj:  # our own checkpoint (backend.checkpoint)
        if obj.get("stage", "autoencoder") != "autoencoder":  # its model_config is another network's
            raise DiffTumorError(f"{path}: is a {obj.get('stage')} training checkpoint, not an autoencoder (give "
                                 "AutoencoderModel.ckpt or an autoencoder run's checkpoint_last.pt)")
        info = {"format": "difftumor", "step": obj.get("step"), "version": obj.get("version")}
        return dict(obj["model"]), VQGANConfig(**obj["model_config"]), info
    for key in ("ema", "model", "state_dict"):  # e.g. the diffusion Trainer.save files (vqgan.*)
        if isinstance(obj.get(key), dict) and any(str(k).startswith("vqgan.") for k in obj[key]):
            info = {"format": f"embedded ({key})"}
            return dict(obj[key]), None, info
    info = {"format": "state_dict"}
    return obj, None, info


def load_autoencoder_with_extras(path, *, map_location="cpu", config: VQGANConfig | None = None):
    """(VQGAN in eval mode, extras state dict (discriminators/LPIPS), info dict). Strict on the model."""
    path = Path(path)
    sd, cfg, info = _find_state(path, safe_load(path, map_location=map_location))
    if any(str(k).startswith("vqgan.") for k in sd):
        sd = {k[len("vqgan."):]: v for k, v in sd.items() if str(k).startswith("vqgan.")}
    sd = {k: v for k, v in sd.items() if torch.is_tensor(v)}
    extras = {k: v for k, v in sd.items() if k.startswith(EXTRA_PREFIXES)}
    sd = {k: v for k, v in sd.items() if not k.startswith(EXTRA_PREFIXES)}
    try:
        cfg = config or cfg or _config_from_shapes(sd)
    except KeyError as exc:
        raise DiffTumorError(f"{path}: not a DiffTumor autoencoder checkpoint: it lacks the autoencoder weights "
                             f"{exc.args[0]} (keys found: {_keys(sd)}); {GIVE}") from None
    except ValueError as exc:
        raise DiffTumorError(f"{path}: not a DiffTumor autoencoder checkpoint: the architecture its weights describe is "
                             f"not supported ({exc}); {GIVE}") from None
    try:
        model = VQGAN(cfg)
    except ValueError as exc:
        raise DiffTumorError(f"{path}: its autoencoder configuration cannot be built ({exc}); the file is damaged or "
                             f"from another program; {GIVE}") from None
    expected = model.state_dict()
    problems = []
    for k, v in expected.items():
        if k not in sd:
            if k not in OPTIONAL_KEYS:
                problems.append(f"missing '{k}'")
        elif tuple(sd[k].shape) != tuple(v.shape):
            problems.append(f"'{k}' has shape {tuple(sd[k].shape)}, expected {tuple(v.shape)}")
    problems += [f"unexpected '{k}'" for k in sd if k not in expected]
    if problems:
        raise DiffTumorError(
            f"{path}: checkpoint does not match the autoencoder architecture its configuration describes "
            f"({len(problems)} mismatching tensors; first: {problems[0]}); the file is damaged or from another "
            f"program; {GIVE}"
        )
    if "codebook.z_avg" not in sd:
        sd["codebook.z_avg"] = sd["codebook.embeddings"].clone()
    if "codebook.N" not in sd:
        sd["codebook.N"] = torch.ones_like(expected["codebook.N"])
    model.load_state_dict({k: v.to(expected[k].dtype) for k, v in sd.items()}, strict=True)
    return model.eval(), extras, info


def load_autoencoder(path, *, map_location="cpu", config: VQGANConfig | None = None) -> VQGAN:
    """Load a VQGAN (eval mode) from an official .ckpt, one of our checkpoints, or a plain state dict."""
    return load_autoencoder_with_extras(path, map_location=map_location, config=config)[0]
