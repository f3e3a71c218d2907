"""``python``: a ``package.module:function`` generator that yields tokens.

Only callables the operator lists in ``PYTHON_AGENTS`` may be used: a tenant choosing any
importable ``module:function`` could run ``setup:setup`` (a setup.py on the path) or
``sys:exit``. The list is checked before anything is imported, when a workspace is saved and
again at every reply (a callable taken off the list stops working at once).
"""
from __future__ import annotations

import importlib
from typing import Any, Callable, Iterator

from flask import current_app

from app.agents.base import AgentContext, AgentError

_loaded: dict[str, Callable[..., Any]] = {}

NOT_ALLOWED = "Not an allowed python agent (the operator lists them in PYTHON_AGENTS)."


def is_allowed(path: str, config: Any = None) -> bool:
    """Whether the operator lists ``path`` in PYTHON_AGENTS (exactly as written)."""
    config = config if config is not None else current_app.config
    return isinstance(path, str) and path in (config.get("PYTHON_AGENTS") or [])


def load_callable(path: str) -> Callable[..., Any]:
    """Import an allow-listed ``package.module:function`` once; ValueError with a reason if it
    is not allowed or cannot be loaded. Nothing is imported for a path that is not allowed."""
    if not is_allowed(path):
        raise ValueError(NOT_ALLOWED)
    if path in _loaded:
        return _loaded[path]
    module_name, _, attribute = path.partition(":")
    if not module_name or not attribute:
        raise ValueError("Must be 'package.module:function'.")
    try:
        module = importlib.import_module(module_name)
    except BaseException as exc:  # ImportError, and anything (SystemExit too) it raises
        raise ValueError(f"Cannot import module {module_name!r}.") from exc
    function = getattr(module, attribute, None)
    if not callable(function):
        raise ValueError(f"{module_name!r} has no callable {attribute!r}.")
    _loaded[path] = function
    return function


class PythonAgent:
    def __init__(self, config: dict[str, Any]):
        self.path = config["callable"]  # loaded when a reply runs, after the allow-list check

    def stream(self, context: AgentContext) -> Iterator[str]:
        try:
            function = load_callable(self.path)
        except ValueError as exc:
            raise AgentError(str(exc).rstrip(".")) from None
        for token in function(context):
            if not isinstance(token, str):
                raise AgentError("the agent yielded something that is not text")
            yield token
