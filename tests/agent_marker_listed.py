"""Like tests/agent_marker.py, but allow-listed: the control that shows the marker works
(saving a workspace with a listed callable imports its module, so the file appears)."""
import os
import pathlib

_directory = os.environ.get("AGENT_IMPORT_MARKER")
if _directory:
    pathlib.Path(_directory, f"{__name__}-{os.environ.get('ASYNC_MODE', '')}").write_text("x")


def reply(context):
    yield "imported"
