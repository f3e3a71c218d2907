"""The workspaces' agent configurations, kept in the process: read once, forgotten on change.

Every message needs its workspace's agent configuration (will it get a reply, from what);
reading it from the database was one query per message, inside the chat's lock. This process
keeps what it read, by workspace id, and serves an entry only to the tenant that owns the
workspace (the id is a random primary key, unique across tenants; the tenant is checked too).

An entry is forgotten:

- when the workspace's configuration changes or the workspace is deleted: after the commit,
  the writer calls ``forget``, which drops it on this process and, when REDIS_URL is set,
  publishes the request on the client manager's global channel so that every other process
  drops it as well (``ChatRedisManager.forget_agent`` in app/chat/delivery.py);
- in any case MAX_AGE_SECONDS after it was read, a backstop: a request lost on the way (Redis
  away when it was published, a process that was not listening while it passed, a change
  written into the database by hand) heals by then;
- and nothing is kept while this process does not hear the global channel (Redis away, or
  the manager's listener not started): every message reads the database then, as before.

A read that began before a ``forget`` must not store what it read after it (under eventlet a
PostgreSQL query yields): ``forget`` moves a generation counter, and a read stores its result
only if the counter has not moved meanwhile.
"""
from __future__ import annotations

import threading
import time
from typing import Any, Callable

from sqlalchemy import bindparam, select

from app.extensions import db, socketio
from app.models import Workspace

#: The longest an entry is served without being read again (seconds).
MAX_AGE_SECONDS = 5.0

#: What a workspace without an agent (or a workspace that is gone) answers.
NO_AGENT: dict[str, Any] = {"kind": "none"}

_workspaces = Workspace.__table__
_SELECT_AGENT = select(_workspaces.c.tenant_id, _workspaces.c.agent).where(
    _workspaces.c.id == bindparam("workspace_id"))


class AgentConfigs:
    """workspace id -> (expires at, tenant id, agent configuration), with a generation
    counter that every ``forget`` moves (see the module)."""

    def __init__(self, max_age: float = MAX_AGE_SECONDS,
                 clock: Callable[[], float] = time.monotonic) -> None:
        self.max_age = max_age
        self.clock = clock
        self.generation = 0
        self._entries: dict[str, tuple[float, str, dict[str, Any]]] = {}
        self._lock = threading.Lock()
        self._sweep_at = 1024  # entries; past it, a put first drops the expired ones

    def get(self, tenant_id: str, workspace_id: str) -> dict[str, Any] | None:
        """A copy of the tenant's workspace's configuration if kept and fresh; else None."""
        entry = self._entries.get(workspace_id)
        if entry is None or entry[0] <= self.clock() or entry[1] != tenant_id:
            return None
        return dict(entry[2])

    def put(self, generation: int, tenant_id: str, workspace_id: str,
            agent: dict[str, Any]) -> None:
        """Keep ``agent``, read when the counter was at ``generation``, unless a ``forget``
        came since (what was read may be older than that change)."""
        with self._lock:
            if generation != self.generation:
                return
            if len(self._entries) >= self._sweep_at:
                now = self.clock()
                for key in [key for key, entry in self._entries.items() if entry[0] <= now]:
                    del self._entries[key]
                self._sweep_at = max(1024, 2 * len(self._entries))
            self._entries[workspace_id] = (self.clock() + self.max_age, tenant_id, dict(agent))

    def forget(self, workspace_id: str) -> None:
        """Drop the workspace's entry, and any read of it still under way."""
        with self._lock:
            self.generation += 1
            self._entries.pop(workspace_id, None)

    def clear(self) -> None:
        """Drop every entry, and every read under way."""
        with self._lock:
            self.generation += 1
            self._entries.clear()

    def __len__(self) -> int:
        return len(self._entries)


#: This process's configurations (one per process: the workspace id is the key).
configs = AgentConfigs()


def workspace_agent(tenant_id: str, workspace_id: str) -> dict[str, Any]:
    """The tenant's workspace's agent configuration (``{"kind": "none"}`` for none, or when
    the workspace is gone or not the tenant's): this process's copy, or read from the
    database (a connection of its own, held for that query only)."""
    if not _hears_forget_requests():
        configs.clear()  # what was kept may miss a change published meanwhile
        return dict(_read(tenant_id, workspace_id))
    agent = configs.get(tenant_id, workspace_id)
    if agent is not None:
        return agent
    generation = configs.generation
    agent = _read(tenant_id, workspace_id)
    if agent is not NO_AGENT:
        configs.put(generation, tenant_id, workspace_id, agent)
    return dict(agent)


def forget(workspace_id: str) -> None:
    """The workspace's agent configuration changed, or the workspace was deleted: drop what
    this process and every other one keep of it. Call after the change is committed."""
    configs.forget(workspace_id)
    server = socketio.server
    publish = getattr(server.manager, "forget_agent", None) if server is not None else None
    if publish is not None:  # a message queue: the other processes (ChatRedisManager)
        publish(workspace_id)


def _read(tenant_id: str, workspace_id: str) -> dict[str, Any]:
    with db.engine.connect() as conn:
        row = conn.execute(_SELECT_AGENT, {"workspace_id": workspace_id}).one_or_none()
    if row is None or row.tenant_id != tenant_id:
        return NO_AGENT
    return dict(row.agent or NO_AGENT)


def _hears_forget_requests() -> bool:
    """Whether a ``forget`` published by another process reaches this one now (always, with
    one process: there is no other)."""
    server = socketio.server
    return server is None or getattr(server.manager, "listening", True)
