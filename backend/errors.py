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
