"""What counts as text a client may send: the one check every door uses."""
from __future__ import annotations

from typing import Any, Iterator

#: The message for a string that is not text.
TEXT_ERROR = "Must be valid text (no NUL characters or lone surrogates)."


def is_text(value: str) -> bool:
    """Whether a string can be stored and looked up: no NUL (PostgreSQL refuses one in any
    string) and no lone surrogate (it has no UTF-8 encoding)."""
    return "\x00" not in value and not has_lone_surrogate(value)


def has_lone_surrogate(value: str) -> bool:
    """Whether a string holds a lone surrogate (\\ud800-\\udfff): no character, no UTF-8."""
    try:
        value.encode("utf-8")
    except UnicodeEncodeError:
        return True
    return False


def strings_in(value: Any) -> Iterator[str]:
    """Every string in parsed JSON: object keys and values, at any depth (no recursion)."""
    stack = [value]
    while stack:
        item = stack.pop()
        if isinstance(item, str):
            yield item
        elif isinstance(item, dict):
            stack.extend(item.keys())
            stack.extend(item.values())
        elif isinstance(item, list):
            stack.extend(item)
