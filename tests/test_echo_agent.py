"""The echo agent's ``delay_ms`` (contract section 5): validated when saved, and waited between
words so that people can see a reply stream."""
from __future__ import annotations

import pytest

from app.agents.base import AgentContext
from app.agents.echo import EchoAgent
from tests.conftest import assert_error


def _context(content: str, config: dict) -> AgentContext:
    message = {"id": "1", "role": "user", "content": content}
    return AgentContext("t", "w", "c", message, [], config, timeout=5)


def test_echo_streams_the_words_back_waiting_delay_ms_between_them(monkeypatch):
    waits = []
    monkeypatch.setattr("app.agents.echo.time.sleep", waits.append)
    tokens = list(EchoAgent().stream(_context("one two  three", {"kind": "echo",
                                                                 "delay_ms": 40})))
    assert "".join(tokens) == "one two  three" and len(tokens) == 3
    assert waits == [0.04, 0.04]  # between words, not before the first


def test_echo_without_delay_never_waits(monkeypatch):
    waits = []
    monkeypatch.setattr("app.agents.echo.time.sleep", waits.append)
    assert "".join(EchoAgent().stream(_context("a b", {"kind": "echo"}))) == "a b"
    assert waits == []


@pytest.mark.parametrize("delay", [0, 40, 1000])
def test_a_workspace_takes_an_echo_agent_with_delay_ms(tenant, delay):
    ws = tenant.workspace(agent={"kind": "echo", "delay_ms": delay})
    assert ws["agent"] == {"kind": "echo", "delay_ms": delay}


@pytest.mark.parametrize("delay", [-1, 1001, "40", 2.5, None])
def test_delay_ms_outside_0_to_1000_is_a_validation_error(tenant, delay):
    r = tenant.api.post("/api/v1/workspaces", json={"owner_id": "alice", "name": "T",
                                                     "agent": {"kind": "echo",
                                                               "delay_ms": delay}})
    error = assert_error(r, 400, "validation_error")
    assert "agent" in error["details"], error
