"""Agents: plugins that, given a chat's context, yield the tokens of a reply.

An agent kind only knows how to produce tokens (``base.Agent``); the runner
(``runner.py``) owns everything else: the background task, ordering, cancellation, timeout,
storing the reply and emitting the stream events.
"""
from __future__ import annotations

from app.agents.base import Agent, AgentContext, AgentError

__all__ = ["Agent", "AgentContext", "AgentError", "agent_for"]


def agent_for(config: dict) -> Agent | None:
    """The agent for a workspace's configuration, or None for ``kind: none``."""
    kind = (config or {}).get("kind", "none")
    if kind == "echo":
        from app.agents.echo import EchoAgent

        return EchoAgent()
    if kind == "openai":
        from app.agents.openai import OpenAIAgent

        return OpenAIAgent(config)
    if kind == "webhook":
        from app.agents.webhook import WebhookAgent

        return WebhookAgent(config)
    if kind == "python":
        from app.agents.python import PythonAgent

        return PythonAgent(config)
    return None
