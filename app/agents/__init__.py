"""Agents: plugins that, given a chat's context, yield the tokens of a reply.

An agent kind only knows how to produce tokens (``base.Agent``); the runner
(``runner.py``) owns everything else: the background task, ordering, cancellation, timeout,
storing the reply and emitting the stream events. ``KINDS`` lists every kind, once: the
workspace schema (``app.schemas.AgentSchema``) validates a configuration by it.
"""
from __future__ import annotations

import importlib
from dataclasses import dataclass

from app.agents.base import Agent, AgentContext, AgentError

__all__ = ["Agent", "AgentContext", "AgentError", "AgentKind", "KINDS", "agent_for"]


@dataclass(frozen=True)
class AgentKind:
    """One kind of agent: the configuration fields it accepts and requires, and its class."""

    fields: frozenset[str] = frozenset()
    required: frozenset[str] = frozenset()
    #: ``module:Class`` in this package, built from the configuration when a reply starts.
    agent: str | None = None


KINDS: dict[str, AgentKind] = {
    "none": AgentKind(),
    "echo": AgentKind(frozenset({"delay_ms"}), frozenset(), "echo:EchoAgent"),
    "openai": AgentKind(frozenset({"base_url", "model", "api_key", "system_prompt", "history"}),
                        frozenset({"base_url", "model"}), "openai:OpenAIAgent"),
    "webhook": AgentKind(frozenset({"url", "secret"}), frozenset({"url"}), "webhook:WebhookAgent"),
    "python": AgentKind(frozenset({"callable"}), frozenset({"callable"}), "python:PythonAgent"),
}


def agent_for(config: dict) -> Agent | None:
    """The agent for a workspace's configuration, or None for ``kind: none``."""
    kind = KINDS.get((config or {}).get("kind", "none"))
    if kind is None or kind.agent is None:
        return None
    module, name = kind.agent.split(":")
    # Imported on first use: a kind's dependencies load only where it is configured.
    return getattr(importlib.import_module(f"{__name__}.{module}"), name)(config)
