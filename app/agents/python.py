"""``python``: a ``package.module:function`` generator that yields tokens."""
from __future__ import annotations

import importlib
from typing import Any, Callable, Iterator

from app.agents.base import AgentContext, AgentError

_loaded: dict[str, Callable[..., Any]] = {}


def load_callable(path: str) -> Callable[..., Any]:
    """Import ``package.module:function`` once; ValueError with a reason if it cannot be."""
    if path in _loaded:
        return _loaded[path]
    module_name, _, attribute = path.partition(":")
    if not module_name or not attribute:
        raise ValueError("Must be 'package.module:function'.")
    try:
        module = importlib.import_module(module_name)
    except Exception as exc:  # ImportError and anything the module raises while importing
        raise ValueError(f"Cannot import module {module_name!r}.") from exc
    function = getattr(module, attribute, None)
    if not callable(function):
        raise ValueError(f"{module_name!r} has no callable {attribute!r}.")
    _loaded[path] = function
    return function


class PythonAgent:
    def __init__(self, config: dict[str, Any]):
        self.function = load_callable(config["callable"])

    def stream(self, context: AgentContext) -> Iterator[str]:
        for token in self.function(context):
            if not isinstance(token, str):
                raise AgentError("the agent yielded something that is not text")
            yield token
