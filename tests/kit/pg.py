"""PostgreSQL from a test's side: holding a chat's row so that the server's insert waits."""
from __future__ import annotations

import psycopg2


class ChatRowLock:
    """Holds ``FOR UPDATE`` on one chat's row: inserting a message into that chat waits for
    it (the foreign key check takes ``FOR KEY SHARE``); other chats are not touched."""

    def __init__(self, database_url: str, chat_id: str):
        self.conn = psycopg2.connect(database_url)
        self.chat_id = chat_id

    def __enter__(self):
        with self.conn.cursor() as cur:
            cur.execute("SELECT id FROM chats WHERE id = %s FOR UPDATE", (self.chat_id,))
            assert cur.fetchone() is not None
        return self

    def waiters(self) -> int:
        """How many other sessions wait for a lock (our server's handler, once it waits)."""
        with psycopg2.connect(self.conn.dsn) as probe, probe.cursor() as cur:
            cur.execute("SELECT count(*) FROM pg_stat_activity WHERE wait_event_type = 'Lock' "
                        "AND datname = current_database()")
            return cur.fetchone()[0]

    def release(self) -> None:
        if not self.conn.closed:
            self.conn.rollback()
            self.conn.close()

    def __exit__(self, *exc):
        self.release()
