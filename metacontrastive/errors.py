"""``BadInput``: an input the user must fix (a file, an option, a missing package).

The command line (``python -m metacontrastive ...``) prints such an error as one line that names the
input and what to do, without a traceback; anything else is a bug and keeps its traceback.
"""
from __future__ import annotations

__all__ = ["BadInput"]


class BadInput(ValueError):
    """An input the user must fix; its message names the input and what to do about it."""
