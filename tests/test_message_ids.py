"""Message ids are 64-bit and exact in JSON (contract section 2: ids are strings). A JavaScript
number loses integers past 2**53; a 32-bit SERIAL would run out after 2**31 messages (about 12
days at 2,000 messages/s). Both databases are checked from a fresh schema, with the id counter
moved past 2**53, through the REST history and its keyset paging."""
from __future__ import annotations

import pytest
from sqlalchemy import text

from tests.conftest import base_config

BIG = 2**53 + 1  # the first integer a JavaScript number cannot hold


@pytest.fixture(params=["sqlite", "postgresql"])
def big_id_app(request, tmp_path, pg_database_factory):
    from flask_migrate import upgrade

    from app import create_app
    from app.extensions import db

    url = ("sqlite:///" + str(tmp_path / "ids.db") if request.param == "sqlite"
           else pg_database_factory())
    application = create_app(base_config(url))
    with application.app_context():
        upgrade()
        if request.param == "postgresql":
            kind = db.session.execute(text(
                "SELECT data_type FROM information_schema.columns "
                "WHERE table_name = 'messages' AND column_name = 'id'")).scalar_one()
            assert kind == "bigint"
            db.session.execute(text(f"ALTER SEQUENCE messages_id_seq RESTART WITH {BIG}"))
            db.session.commit()
        yield application, request.param
        db.session.remove()
        db.engine.dispose()


def test_message_ids_past_2_to_the_53_stay_exact_strings(big_id_app):
    from app.auth import create_tenant
    from app.extensions import db
    from app.models import Message

    application, backend = big_id_app
    with application.app_context():
        client = application.test_client()
        _, key = create_tenant("Big")
        headers = {"X-API-Key": key}
        chat = client.post("/api/v1/chats/", json={"user_id": "ann"}, headers=headers).get_json()
        if backend == "sqlite":  # SQLite continues after the largest id (64-bit rowid)
            db.session.add(Message(id=BIG - 1, chat_id=chat["id"], role="system", content="seed"))
            db.session.commit()
        first = Message(chat_id=chat["id"], role="user", content="one")
        db.session.add(first)
        db.session.commit()
        reply = Message(chat_id=chat["id"], role="agent", content="two", reply_to=first.id,
                        finish_reason="stop")
        db.session.add(reply)
        db.session.commit()
        assert first.id == BIG and reply.id == BIG + 1

        page = client.get(f"/api/v1/chats/{chat['id']}/messages?order=desc&limit=2",
                          headers=headers).get_json()
        assert [m["id"] for m in page["messages"]] == [str(BIG + 1), str(BIG)]
        assert page["messages"][0]["reply_to"] == str(BIG)
        after = client.get(f"/api/v1/chats/{chat['id']}/messages?after_id={BIG}",
                           headers=headers).get_json()
        assert [m["id"] for m in after["messages"]] == [str(BIG + 1)]
