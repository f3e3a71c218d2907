"""What counts as text a client may send: the one check every door uses."""
from __future__ import annotations

#: The message for a string that is not text.
TEXT_ERROR = "Must be valid text (no NUL characters or lone surrogates)."


def is_text(value: str) -> bool:
    """Whether a string can be stored and looked up: no NUL (PostgreSQL refuses one in any
    string) and no lone surrogate (it has no UTF-8 encoding)."""
    if "\x00" in value:
        return False
    try:
        value.encode("utf-8")
    except UnicodeEncodeError:
        return False
    return True
