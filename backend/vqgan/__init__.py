"""Stage 1: the 3D VQGAN autoencoder (model, codebook, losses, safe loading of official weights).

Public API::

    VQGANConfig(...)                      architecture dataclass (defaults = official release)
    VQGAN(config)                         encode / quantize / decode / decode_indices / latent_min_max
    Codebook(n_codes, embedding_dim, ...) EMA vector quantiser (buffers embeddings, N, z_avg)
    load_autoencoder(path, *, map_location="cpu", config=None) -> VQGAN (eval mode)
    safe_load(path, *, map_location="cpu")  restricted-unpickler torch.load

Heavy training pieces (discriminators, perceptual loss, losses) live in their own modules.
"""

from backend.vqgan.codebook import Codebook, QuantizerOutput, nearest_code
from backend.vqgan.model import VQGAN, VQGANConfig
from backend.vqgan.official import load_autoencoder, load_autoencoder_with_extras, safe_load

__all__ = [
    "Codebook",
    "QuantizerOutput",
    "VQGAN",
    "VQGANConfig",
    "load_autoencoder",
    "load_autoencoder_with_extras",
    "nearest_code",
    "safe_load",
]
