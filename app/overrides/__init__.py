"""Every place where we reach into a library's private names or replace a library's object.

Each module here changes one library, and says what it relies on in ``REQUIRES``: the
private names (or undocumented attributes) it reads, calls, replaces or copies. The rest of
the app calls the small public functions and classes of these modules, never a library's
private name itself; our own policy (limits, token buckets, slow clients) stays where it is
and is handed to these hooks. docs/overrides.md says, per override, why and whether it could
go upstream.

``VERSIONS`` is what these overrides were written for and tested with. ``check_versions``
compares it with what is installed (the app logs a warning at start when they differ) and
``check_requirements`` checks that every name in every ``REQUIRES`` still exists with the
shape we use; tests/test_overrides.py fails on either.
"""
from __future__ import annotations

import hashlib
import importlib
import inspect
import logging
import re
from dataclasses import dataclass
from importlib import metadata
from typing import Any, Mapping

#: The versions the overrides were written for (requirements.txt pins the same).
VERSIONS: Mapping[str, str] = {
    "python-engineio": "4.15.1",
    "python-socketio": "5.18.1",
    "Flask-SocketIO": "5.7.0",
    "eventlet": "0.41.3",
    "gevent": "26.9.0",
    "simple-websocket": "1.1.0",
    "wsproto": "1.3.2",
    "redis": "8.1.0",
}
#: Libraries the app runs without (ASYNC_MODE=gevent is optional): absent is not a mismatch.
OPTIONAL = frozenset({"gevent"})
#: The modules of this package, each with its REQUIRES.
MODULES = ("engineio", "socketio", "flask_socketio", "simple_websocket", "eventlet",
           "eventlet_websocket", "redis_eventlet")


@dataclass(frozen=True)
class Needed:
    """One library name an override relies on, and the shape it must still have.

    ``target`` is ``"module:Qualified.name"``. ``params``: the parameter names of a callable
    (``self`` left out), in order. ``assigned``: the name is an instance attribute, which the
    class's source must assign (``self.<name> =``). ``source_sha``: the override copies this
    function; the first 12 hex digits of the SHA-256 of its source when it was copied.
    """

    library: str
    target: str
    params: tuple[str, ...] | None = None
    assigned: bool = False
    source_sha: str | None = None

    def problem(self) -> str | None:
        """What no longer holds of this name in the installed library; None if all does."""
        module_name, _, qualname = self.target.partition(":")
        try:
            obj: Any = importlib.import_module(module_name)
        except ImportError as exc:
            return f"{self.target}: cannot import {module_name} ({exc})"
        *path, name = qualname.split(".")
        for part in path:
            obj = getattr(obj, part, None)
            if obj is None:
                return f"{self.target}: {part} is gone"
        if self.assigned:
            source = inspect.getsource(obj)
            if not re.search(rf"\bself\.{re.escape(name)}\s*=", source):
                return f"{self.target}: {path[-1]} no longer assigns self.{name}"
            return None
        if not hasattr(obj, name):
            return f"{self.target}: {name} is gone"
        obj = inspect.getattr_static(obj, name)
        if isinstance(obj, (staticmethod, classmethod)):
            obj = obj.__func__
        if self.params is not None:
            found = tuple(p for p in inspect.signature(obj).parameters if p != "self")
            if found != self.params:
                return f"{self.target}: parameters are now {found}, not {self.params}"
        if self.source_sha is not None:
            digest = source_digest(obj)
            if digest != self.source_sha:
                return (f"{self.target}: its source changed (sha {digest}, copied from "
                        f"{self.source_sha}); re-copy it and keep our changes")
        return None


def source_digest(obj: Any) -> str:
    """The first 12 hex digits of the SHA-256 of ``obj``'s source."""
    return hashlib.sha256(inspect.getsource(obj).encode()).hexdigest()[:12]


def installed_version(library: str) -> str | None:
    """The installed version of a distribution, or None when it is not installed."""
    try:
        return metadata.version(library)
    except metadata.PackageNotFoundError:
        return None


def check_versions(expected: Mapping[str, str] = VERSIONS) -> list[str]:
    """One sentence per library whose installed version is not the one the overrides were
    written for: which library, which version, and what to re-check."""
    problems = []
    for library, version in expected.items():
        found = installed_version(library)
        if found == version or (found is None and library in OPTIONAL):
            continue
        problems.append(
            f"{library} is {found or 'not installed'}, the overrides were written for "
            f"{version}: re-read, in {library} {found}, each name that the REQUIRES of "
            f"app/overrides/*.py lists for {library} (docs/overrides.md says why each is "
            f"used), run tests/test_overrides.py, then update VERSIONS in "
            f"app/overrides/__init__.py")
    return problems


def requirements(module: str) -> tuple[Needed, ...]:
    """The REQUIRES of one module of this package (optional libraries absent: none)."""
    needed = _REQUIRES.get(module)
    if needed is None:
        try:
            needed = importlib.import_module(f"{__name__}.{module}").REQUIRES
        except ImportError:  # an optional library (gevent) that is not installed
            needed = ()
        _REQUIRES[module] = needed
    return needed


_REQUIRES: dict[str, tuple[Needed, ...]] = {}


def check_requirements() -> list[str]:
    """What no longer holds of the private names the overrides rely on (empty: all does)."""
    problems = []
    for module in MODULES:
        for needed in requirements(module):
            if needed.library in OPTIONAL and installed_version(needed.library) is None:
                continue
            problem = needed.problem()
            if problem is not None:
                problems.append(f"{needed.library} (app/overrides/{module}.py): {problem}")
    return problems


def warn_on_other_versions(logger: logging.Logger) -> list[str]:
    """Log a warning for each library whose version the overrides were not written for."""
    problems = check_versions()
    for problem in problems:
        logger.warning("library overrides: %s", problem)
    return problems
