"""Reading streamed HTTP replies: server-sent events and newline-delimited JSON."""
from __future__ import annotations

import json
from typing import Any, Iterator

import requests
from flask import current_app

from app.agents import net
from app.agents.base import AgentError

USER_AGENT = "workspace-chat-agent/1"


def post(url: str, timeout: float, **kwargs: Any) -> requests.Response:
    """POST to a checked destination (``net``), with a connect/read timeout, no redirects.

    Failures become AgentErrors whose text tells nothing about the network behind: one
    message for every connection-level failure (an open port must not look different from a
    closed one), the status of an error answer but never its body."""
    headers = {"User-Agent": USER_AGENT, **kwargs.pop("headers", {})}
    allow_private = bool(current_app.config.get("AGENT_ALLOW_PRIVATE_NETWORKS"))
    try:
        # Not closed here: the streamed response still reads from the session's connection.
        response = net.session(allow_private).post(
            url, headers=headers, stream=True, allow_redirects=False,
            timeout=(min(10.0, timeout), timeout), **kwargs)
    except net.DestinationRefused:
        raise AgentError("destination not allowed") from None
    except (requests.RequestException, OSError, ValueError):
        raise AgentError("could not reach the agent") from None
    if 300 <= response.status_code < 400:
        response.close()
        raise AgentError(f"the agent answered with a redirect (HTTP {response.status_code}), "
                         "which is not followed")
    if response.status_code >= 400:
        response.close()
        raise AgentError(f"the agent answered HTTP {response.status_code}")
    return response


def lines(response: requests.Response) -> Iterator[str]:
    """The response body's lines, decoded as UTF-8, each as soon as it has arrived.

    ``iter_lines`` reads fixed-size chunks, so on a body without chunked encoding short
    tokens would wait in a buffer until 512 bytes or the end arrived; ``read1`` returns
    whatever is there.
    """
    buffer = b""
    try:
        while True:
            chunk = response.raw.read1(8192)
            if not chunk:
                break
            buffer += chunk
            while b"\n" in buffer:
                line, buffer = buffer.split(b"\n", 1)
                yield line.rstrip(b"\r").decode("utf-8", "replace")
        if buffer:
            yield buffer.rstrip(b"\r").decode("utf-8", "replace")
    except (requests.RequestException, OSError, ValueError) as exc:
        raise AgentError(f"the agent's reply broke off: {type(exc).__name__}") from exc
    except Exception as exc:  # urllib3's protocol errors
        raise AgentError(f"the agent's reply broke off: {type(exc).__name__}") from exc
    finally:
        response.close()


def sse_data(response: requests.Response) -> Iterator[str]:
    """The ``data:`` payloads of a text/event-stream body, up to ``[DONE]``."""
    data: list[str] = []
    for line in lines(response):
        if line.startswith("data:"):
            data.append(line[5:].lstrip(" "))
        elif line == "" and data:
            payload = "\n".join(data)
            data = []
            if payload.strip() == "[DONE]":
                return
            yield payload
    if data and "\n".join(data).strip() != "[DONE]":
        yield "\n".join(data)


def json_object(text: str) -> dict[str, Any]:
    try:
        value = json.loads(text)
    except ValueError as exc:
        raise AgentError("the agent sent something that is not JSON") from exc
    if not isinstance(value, dict):
        raise AgentError("the agent sent JSON that is not an object")
    return value


def token_of(item: dict[str, Any]) -> str:
    token = item.get("token")
    if not isinstance(token, str):
        raise AgentError("the agent sent an item without a string 'token'")
    return token
