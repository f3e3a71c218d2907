"""The one time format of the API and the logs: ISO 8601 UTC, milliseconds, trailing Z."""
from __future__ import annotations

from datetime import datetime, timezone


def iso_z(moment: datetime) -> str:
    """``moment`` (naive UTC, or aware) as ``2026-11-22T04:12:26.663Z``."""
    if moment.tzinfo is not None:
        moment = moment.astimezone(timezone.utc).replace(tzinfo=None)
    return moment.isoformat(timespec="milliseconds") + "Z"
