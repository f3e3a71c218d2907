"""``echo``: streams the user's words back, a word at a time (demos and tests)."""
from __future__ import annotations

import re
from typing import Iterator

from app.agents.base import AgentContext


class EchoAgent:
    def stream(self, context: AgentContext) -> Iterator[str]:
        yield from re.findall(r"\s*\S+", context.message["content"])
