"""A python agent module that records that it was imported (tests/test_agent_security.py):
importing it creates ``<AGENT_IMPORT_MARKER>/<module name>-<ASYNC_MODE>``. Never allow-listed,
so the file must never appear."""
import os
import pathlib

_directory = os.environ.get("AGENT_IMPORT_MARKER")
if _directory:
    pathlib.Path(_directory, f"{__name__}-{os.environ.get('ASYNC_MODE', '')}").write_text("x")


def reply(context):
    yield "imported"
