"""How deep a decoded JSON value nests: input nested deeper than MAX_JSON_DEPTH is refused.

Python's json module recurses, so a body nested about 1,000 deep raised RecursionError (a
500 with a traceback); the contract refuses anything deeper than 64 levels (section 9).
"""
from __future__ import annotations

from typing import Any

#: Deepest nesting accepted in any JSON a client sends (REST bodies, socket payloads, frames).
MAX_JSON_DEPTH = 64


def too_deep(value: Any, limit: int = MAX_JSON_DEPTH) -> bool:
    """Whether ``value`` (decoded JSON) nests lists and dicts more than ``limit`` levels."""
    stack = [(value, 1)]
    while stack:
        item, depth = stack.pop()
        if isinstance(item, dict):
            children = item.values()
        elif isinstance(item, (list, tuple)):
            children = item
        else:
            continue
        if depth > limit:
            return True
        stack.extend((child, depth + 1) for child in children)
    return False

