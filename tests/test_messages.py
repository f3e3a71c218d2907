"""REST: a chat's message history, offset and keyset paging (CONTRACT.md section 2)."""
from __future__ import annotations

import re

import pytest

from tests.conftest import assert_error

ISO_Z = re.compile(r"^\d{4}-\d{2}-\d{2}T\d{2}:\d{2}:\d{2}(\.\d+)?Z$")
MESSAGE_KEYS = {"id", "chat_id", "role", "user_id", "content", "client_message_id", "reply_to",
                "created_at"}
PAGE_KEYS = {"messages", "total", "offset", "limit", "has_more"}


def history(tenant, chat_id: str, query: str = "") -> dict:
    r = tenant.api.get(f"/api/v1/chats/{chat_id}/messages" + (f"?{query}" if query else ""))
    assert r.status_code == 200, r.get_data(as_text=True)
    page = r.get_json()
    assert set(page) == PAGE_KEYS
    return page


def ids(page: dict) -> list[str]:
    return [m["id"] for m in page["messages"]]


def paging(page: dict) -> tuple:
    return page["total"], page["offset"], page["limit"], page["has_more"]


@pytest.fixture
def chat(tenant) -> dict:
    return tenant.chat("alice")


# --- shape and default paging ---------------------------------------------------------------

def test_message_has_the_contract_shape_with_string_ids(tenant, chat):
    [message_id] = tenant.messages(chat["id"], 1)
    page = history(tenant, chat["id"])
    assert paging(page) == (1, 0, 50, False)
    [message] = page["messages"]
    assert set(message) == MESSAGE_KEYS
    assert message["id"] == message_id and isinstance(message["id"], str)
    assert message["chat_id"] == chat["id"] and isinstance(message["chat_id"], str)
    assert message["role"] == "user"
    assert message["user_id"] == "alice"
    assert message["content"] == "message 0"
    assert message["client_message_id"] == "c0"
    assert message["reply_to"] is None
    assert ISO_Z.match(message["created_at"]), message["created_at"]


def test_reply_to_is_the_string_id_of_the_message_replied_to(tenant, chat):
    from app.extensions import db
    from app.models import Message

    [question] = tenant.messages(chat["id"], 1)
    reply = Message(chat_id=chat["id"], role="agent", content="answer", reply_to=int(question))
    db.session.add(reply)
    db.session.commit()
    last = history(tenant, chat["id"])["messages"][-1]
    assert last["id"] == str(reply.id)
    assert last["role"] == "agent" and last["reply_to"] == question
    assert last["user_id"] is None and last["client_message_id"] is None


def test_empty_chat_has_an_empty_history(tenant, chat):
    page = history(tenant, chat["id"])
    assert page["messages"] == [] and paging(page) == (0, 0, 50, False)


def test_history_is_oldest_first_by_default(tenant, chat):
    stored = tenant.messages(chat["id"], 5)
    page = history(tenant, chat["id"])
    assert ids(page) == stored
    assert [m["content"] for m in page["messages"]] == [f"message {i}" for i in range(5)]
    assert ids(history(tenant, chat["id"], "order=asc")) == stored


def test_history_limit_defaults_to_50(tenant, chat):
    stored = tenant.messages(chat["id"], 60)
    page = history(tenant, chat["id"])
    assert ids(page) == stored[:50]
    assert paging(page) == (60, 0, 50, True)


def test_history_limit_may_be_200_but_not_201(tenant, chat):
    stored = tenant.messages(chat["id"], 201)
    page = history(tenant, chat["id"], "limit=200")
    assert ids(page) == stored[:200] and paging(page) == (201, 0, 200, True)
    error = assert_error(tenant.api.get(f"/api/v1/chats/{chat['id']}/messages?limit=201"), 400,
                         "validation_error")
    assert "limit" in error["details"]


def test_history_pages_with_offset_and_limit(tenant, chat):
    stored = tenant.messages(chat["id"], 7)
    first = history(tenant, chat["id"], "limit=3")
    second = history(tenant, chat["id"], "offset=3&limit=3")
    last = history(tenant, chat["id"], "offset=6&limit=3")
    beyond = history(tenant, chat["id"], "offset=7&limit=3")
    assert ids(first) == stored[0:3] and paging(first) == (7, 0, 3, True)
    assert ids(second) == stored[3:6] and paging(second) == (7, 3, 3, True)
    assert ids(last) == stored[6:] and paging(last) == (7, 6, 3, False)
    assert ids(beyond) == [] and paging(beyond) == (7, 7, 3, False)


def test_history_exactly_filling_the_page_has_no_more(tenant, chat):
    tenant.messages(chat["id"], 4)
    assert paging(history(tenant, chat["id"], "limit=4")) == (4, 0, 4, False)


def test_order_desc_returns_newest_first_and_pages_from_the_newest(tenant, chat):
    stored = tenant.messages(chat["id"], 6)
    newest_first = stored[::-1]
    page = history(tenant, chat["id"], "order=desc")
    assert ids(page) == newest_first and paging(page) == (6, 0, 50, False)
    page = history(tenant, chat["id"], "order=desc&offset=2&limit=3")
    assert ids(page) == newest_first[2:5] and paging(page) == (6, 2, 3, True)


@pytest.mark.parametrize("query, field", [
    ("order=bogus", "order"), ("order=DESC", "order"), ("order=", "order"),
    ("limit=0", "limit"), ("limit=-5", "limit"), ("limit=abc", "limit"),
    ("offset=-1", "offset"), ("offset=abc", "offset"),
    ("after_id=abc", "after_id"), ("after_id=-1", "after_id"), ("after_id=1.5", "after_id"),
    ("after_id=", "after_id"), ("after_id=99999999999999999999", "after_id"),
    ("before_id=abc", "before_id"), ("before_id=-1", "before_id"),
    # beyond the 64-bit range of ids and offsets: not a position in any history
    ("after_id=9223372036854775808", "after_id"), ("before_id=9999999999999999999", "before_id"),
    ("offset=9223372036854775808", "offset"),
])
def test_invalid_history_query_is_a_validation_error(tenant, chat, query, field):
    tenant.messages(chat["id"], 1)
    error = assert_error(tenant.api.get(f"/api/v1/chats/{chat['id']}/messages?{query}"), 400,
                         "validation_error")
    assert field in error["details"]


# --- keyset paging --------------------------------------------------------------------------

def test_after_id_returns_only_newer_messages_oldest_first(tenant, chat):
    stored = tenant.messages(chat["id"], 10)
    page = history(tenant, chat["id"], f"after_id={stored[3]}")
    assert ids(page) == stored[4:] and paging(page) == (6, 0, 50, False)


def test_after_id_pages_the_newer_messages_with_offset_and_limit(tenant, chat):
    stored = tenant.messages(chat["id"], 10)
    page = history(tenant, chat["id"], f"after_id={stored[3]}&limit=2")
    assert ids(page) == stored[4:6] and paging(page) == (6, 0, 2, True)
    page = history(tenant, chat["id"], f"after_id={stored[3]}&offset=4&limit=2")
    assert ids(page) == stored[8:10] and paging(page) == (6, 4, 2, False)


def test_after_the_newest_message_there_is_nothing(tenant, chat):
    stored = tenant.messages(chat["id"], 3)
    page = history(tenant, chat["id"], f"after_id={stored[-1]}")
    assert page["messages"] == [] and paging(page) == (0, 0, 50, False)


def test_after_id_zero_is_the_whole_history(tenant, chat):
    stored = tenant.messages(chat["id"], 3)
    assert ids(history(tenant, chat["id"], "after_id=0")) == stored


def test_before_id_with_order_desc_is_the_page_right_before_the_cursor(tenant, chat):
    stored = tenant.messages(chat["id"], 12)
    page = history(tenant, chat["id"], f"before_id={stored[10]}&order=desc&limit=3")
    assert ids(page) == [stored[9], stored[8], stored[7]]
    assert paging(page) == (10, 0, 3, True)
    # the next older page continues from the oldest id seen
    older = history(tenant, chat["id"], f"before_id={stored[7]}&order=desc&limit=3")
    assert ids(older) == [stored[6], stored[5], stored[4]] and older["total"] == 7


def test_before_id_ascending_starts_at_the_oldest_message(tenant, chat):
    stored = tenant.messages(chat["id"], 12)
    page = history(tenant, chat["id"], f"before_id={stored[10]}&limit=3")
    assert ids(page) == stored[0:3] and paging(page) == (10, 0, 3, True)


def test_before_the_oldest_message_there_is_nothing(tenant, chat):
    stored = tenant.messages(chat["id"], 3)
    page = history(tenant, chat["id"], f"before_id={stored[0]}&order=desc")
    assert page["messages"] == [] and paging(page) == (0, 0, 50, False)


def test_after_id_and_before_id_bound_a_range(tenant, chat):
    stored = tenant.messages(chat["id"], 10)
    query = f"after_id={stored[2]}&before_id={stored[7]}"
    page = history(tenant, chat["id"], query)
    assert ids(page) == stored[3:7] and paging(page) == (4, 0, 50, False)
    page = history(tenant, chat["id"], query + "&order=desc&limit=3")
    assert ids(page) == [stored[6], stored[5], stored[4]] and paging(page) == (4, 0, 3, True)
    page = history(tenant, chat["id"], query + "&offset=3")
    assert ids(page) == [stored[6]] and paging(page) == (4, 3, 50, False)


def test_an_empty_range_is_an_empty_page(tenant, chat):
    stored = tenant.messages(chat["id"], 5)
    page = history(tenant, chat["id"], f"after_id={stored[3]}&before_id={stored[1]}")
    assert page["messages"] == [] and page["total"] == 0 and page["has_more"] is False


# --- isolation and deletion -----------------------------------------------------------------

def test_messages_of_one_chat_never_appear_in_another_chats_history(tenant):
    from app.extensions import db
    from app.models import Message

    first = tenant.chat("alice")
    second = tenant.chat("alice")
    first_ids = tenant.messages(first["id"], 3)
    second_ids = tenant.messages(second["id"], 2)
    # more messages in the first chat, stored after the second chat's (ids interleave)
    later = [Message(chat_id=first["id"], role="system", content=f"later {i}") for i in range(2)]
    db.session.add_all(later)
    db.session.commit()
    more_first_ids = [str(m.id) for m in later]
    assert int(more_first_ids[0]) > int(second_ids[-1])

    page = history(tenant, first["id"])
    assert ids(page) == first_ids + more_first_ids and page["total"] == 5
    assert {m["chat_id"] for m in page["messages"]} == {first["id"]}
    page = history(tenant, second["id"])
    assert ids(page) == second_ids and page["total"] == 2
    # a cursor taken from another chat only bounds, never leaks
    page = history(tenant, second["id"], f"after_id={first_ids[0]}")
    assert set(ids(page)) <= set(second_ids)


def test_history_of_unknown_chat_is_chat_not_found(tenant):
    assert_error(tenant.api.get("/api/v1/chats/" + "0" * 32 + "/messages"), 404,
                 "chat_not_found")


def test_history_of_another_tenants_chat_is_chat_not_found(tenant, other_tenant):
    chat = other_tenant.chat("alice")
    other_tenant.messages(chat["id"], 2)
    assert_error(tenant.api.get(f"/api/v1/chats/{chat['id']}/messages"), 404, "chat_not_found")


def test_deleting_the_chat_deletes_its_messages(tenant):
    from sqlalchemy import select

    from app.extensions import db
    from app.models import Message

    chat = tenant.chat("alice")
    other = tenant.chat("alice")
    stored = tenant.messages(chat["id"], 4)
    kept = tenant.messages(other["id"], 2)

    assert tenant.api.delete(f"/api/v1/chats/{chat['id']}").status_code == 204
    assert_error(tenant.api.get(f"/api/v1/chats/{chat['id']}/messages"), 404, "chat_not_found")

    db.session.expire_all()
    assert db.session.execute(select(Message).where(Message.chat_id == chat["id"])).all() == []
    assert db.session.execute(
        select(Message).where(Message.id.in_([int(i) for i in stored]))).all() == []
    remaining = db.session.execute(
        select(Message.id).where(Message.chat_id == other["id"])).scalars().all()
    assert sorted(str(i) for i in remaining) == sorted(kept)
    assert ids(history(tenant, other["id"])) == kept
