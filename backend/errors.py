"""User-facing errors.

Every problem a user can cause (bad file, wrong organ, missing weights, ...) is raised as a
:class:`DiffTumorError` whose message is ONE line naming the input and what is wrong. The CLI turns
it into ``difftumor: error: <message>`` with exit code 2, the napari plugin into a notification.
Programming errors stay ordinary exceptions.
"""

from __future__ import annotations


class DiffTumorError(Exception):
    """A problem with the user's input, reported as one clear line."""

    def __init__(self, message: str):
        message = " ".join(str(message).split())  # always one line
        super().__init__(message)


def load_failure_cause(exc: Exception) -> str:
    """A short cause for a failed ``torch.load``: PyTorch's own text advises ``weights_only=False``, which we
    refuse on purpose (it can run code from the file), or runs to several sentences about miniz."""
    text = " ".join(str(exc).split())
    if "invalid load key" in text or isinstance(exc, EOFError):
        return "not a PyTorch file, or truncated"
    if "zip archive" in text or "central directory" in text:
        return "truncated or damaged file"
    if "Weights only load failed" in text:
        return "not a file of tensors and plain values; nothing in it was run"
    import pickle
    import struct

    # random bytes read as torch's legacy (pre-zip) format fail deep in the unpickler with these
    if isinstance(exc, (KeyError, IndexError, struct.error, UnicodeDecodeError, pickle.UnpicklingError)):
        return "not a PyTorch file, or damaged"
    return f"{type(exc).__name__}: {text.split('. ')[0][:120]}"
