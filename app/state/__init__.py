"""Shared runtime state behind one small interface: in memory for one process, Redis for many.

``protocol`` says what the state is; ``memory``, ``redis`` and ``resilient`` implement it and
import only ``protocol`` (and each other, downwards); ``create_state`` picks one.
"""
from __future__ import annotations

from app.state.protocol import SharedState, StreamProgress

__all__ = ["SharedState", "StreamProgress", "create_state"]


def create_state(redis_url: str | None, connection_lease: float = 60.0) -> SharedState:
    """The state implementation for this configuration."""
    if redis_url:
        from app.state.redis import RedisState
        from app.state.resilient import ResilientState

        return ResilientState(RedisState(redis_url, connection_lease=connection_lease))
    from app.state.memory import MemoryState

    return MemoryState(connection_lease=connection_lease)
