"""/metrics counts /ws/chat connections, messages and errors (``transport="websocket"``) as it
counts Socket.IO's: both adapters record them through the chat session (app/chat/session.py).
"""
from __future__ import annotations

import requests
from prometheus_client.parser import text_string_to_metric_families

from tests.kit.plain import PlainClient
from tests.kit.rest import new_tenant
from tests.kit.wait import wait_until


def metric(url: str, name: str, **labels: str) -> float:
    """The sum of the samples ``name`` whose labels include ``labels`` (0 if none)."""
    r = requests.get(url + "/metrics", timeout=10)
    assert r.status_code == 200, r.text
    return sum(sample.value for family in text_string_to_metric_families(r.text)
               for sample in family.samples
               if sample.name == name and all(sample.labels.get(k) == v
                                              for k, v in labels.items()))


def test_metrics_count_a_plain_websocket_connection_its_messages_and_its_errors(live_server):
    url = live_server.url
    tenant = new_tenant(url)
    chat_id = tenant.chat("ann")
    names = {"open": ("workspace_chat_socket_connections", {}),
             "connects": ("workspace_chat_socket_connects_total", {}),
             "messages": ("workspace_chat_messages_total", {}),
             "timed": ("workspace_chat_message_seconds_count", {}),
             "invalid": ("workspace_chat_errors_total",
                         {"code": "validation_error", "transport": "websocket"}),
             "refused": ("workspace_chat_errors_total",
                         {"code": "invalid_api_key", "transport": "websocket"})}
    before = {key: metric(url, name, **labels) for key, (name, labels) in names.items()}

    def grew(key: str) -> float:
        name, labels = names[key]
        return metric(url, name, **labels) - before[key]

    plain = PlainClient(live_server, chat_id=chat_id, api_key=tenant.key, user_id="ann")
    try:
        plain.until("connection_established")
        wait_until(lambda: grew("open") == 1, timeout=10, message="the connections gauge to count it")
        assert grew("connects") == 1

        plain.send({"content": "hello"})  # sent with the connection's kept message string
        assert plain.until("message")[0]["ok"] is True
        assert grew("messages") == 1 and grew("timed") == 1

        plain.send({"event": "wave", "data": {}})
        assert plain.until("error")[0]["code"] == "validation_error"
        assert grew("invalid") == 1
    finally:
        plain.close()

    refused = PlainClient(live_server, chat_id=chat_id, api_key="wc_wrong", user_id="ann")
    try:
        assert refused.until("error")[0]["code"] == "invalid_api_key"
    finally:
        refused.close()
    assert grew("refused") == 1
    wait_until(lambda: grew("open") == 0, timeout=10, message="the connections gauge to drop it")
