"""The shared-state interface: what every process serving a tenant must agree on.

Spent message strings, connection counts per tenant, busy chats (an agent reply streaming),
stop signals and the reply streaming so far. Implementations (``memory``, ``redis``,
``resilient``) import this module; it imports none of them.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import ContextManager, Protocol


@dataclass(frozen=True)
class StreamProgress:
    """A streaming reply as far as it got: what a client joining mid-stream needs."""

    message_id: str
    reply_to: str
    content: str
    tokens: int


class SharedState(Protocol):
    #: Seconds a connection counts towards its tenant's limit without a renewal.
    connection_lease: float
    #: Whether connections stop counting unless ``refresh_connections`` renews them (every
    #: third of ``connection_lease``); False where they count until released.
    connections_expire: bool

    def spend(self, key: str, ttl: float) -> bool:
        """Mark ``key`` used for ``ttl`` seconds; False if it already was."""

    def is_spent(self, key: str) -> bool:
        """Whether ``key`` has been spent (and not yet forgotten)."""

    def spend_here(self, key: str, ttl: float) -> bool:
        """``spend`` for a key that only this process can spend (a message string bound to
        one of its connections): decided by this process at once; other processes' ``is_spent``
        may see it a moment later."""

    def acquire_connection(self, tenant_id: str, sid: str, limit: int) -> bool:
        """Count a connection for a tenant unless it already has ``limit``."""

    def refresh_connections(self, by_tenant: dict[str, list[str]]) -> None:
        """Renew the lease of this process's live connections (sids by tenant)."""

    def release_connection(self, tenant_id: str, sid: str) -> None:
        """Stop counting a connection (idempotent)."""

    def connection_count(self, tenant_id: str) -> int:
        """How many connections the tenant has open."""

    def mark_busy(self, chat_id: str, owner: str, ttl: float) -> bool:
        """Mark a chat busy (a reply is streaming) unless it already is."""

    def clear_busy(self, chat_id: str, owner: str) -> None:
        """Free a chat, if ``owner`` is the one who marked it busy."""

    def busy_owner(self, chat_id: str) -> str | None:
        """Who marked the chat busy, or None when it is free."""

    def request_stop(self, chat_id: str, owner: str, ttl: float) -> None:
        """Ask the reply ``owner`` streaming in a chat to stop."""

    def stop_requested(self, chat_id: str, owner: str) -> bool:
        """Whether someone asked the reply ``owner`` to stop."""

    def stream_begin(self, chat_id: str, message_id: str, reply_to: str, ttl: float) -> None:
        """A reply started streaming in a chat."""

    def stream_append(self, chat_id: str, message_id: str, token: str) -> None:
        """One more token of the chat's streaming reply."""

    def stream_progress(self, chat_id: str) -> StreamProgress | None:
        """The reply streaming in a chat so far, or None."""

    def join_reads(self, chat_id: str, spent_key: str) -> tuple[StreamProgress | None, bool]:
        """What a client joining a chat reads: ``stream_progress(chat_id)`` and
        ``is_spent(spent_key)``, in one round trip."""

    def stream_end(self, chat_id: str, message_id: str) -> None:
        """The chat's reply has ended."""

    def chat_lock_wait(self, chat_id: str) -> float:
        """About how long (seconds) a message of this process would now wait for the chat's
        lock behind this process's others: the overload check refuses past a limit."""

    def chat_lock(self, chat_id: str) -> ContextManager[None]:
        """Held while a chat's message is stored and broadcast, so that every client gets a
        chat's messages in the order of their ids."""
