"""``echo``: streams the user's words back, a word at a time (demos and tests)."""
from __future__ import annotations

import re
import time
from typing import Any, Iterator

from app.agents.base import AgentContext


class EchoAgent:
    def __init__(self, config: dict[str, Any] | None = None) -> None:
        pass  # built from its configuration like every kind; it reads delay_ms per reply

    def stream(self, context: AgentContext) -> Iterator[str]:
        # delay_ms between words makes the stream visible to people (the demo uses 40);
        # time.sleep yields to the event loop under eventlet and gevent (monkey-patched)
        delay = int(context.config.get("delay_ms") or 0) / 1000
        for index, word in enumerate(re.findall(r"\s*\S+", context.message["content"])):
            if delay and index:
                time.sleep(delay)
            yield word
