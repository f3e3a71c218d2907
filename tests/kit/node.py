"""Node.js for the tests that drive the JavaScript clients: the npm packages a directory's
lockfile names, installed once (one installer at a time), and the ``node`` to run them with.

Used by tests/test_realtime_node.py (socket.io-client in tests/node), tests/test_js_client.py
and tests/test_docs.py (the package in clients/js).
"""
from __future__ import annotations

import fcntl
import json
import os
import shutil
import subprocess
from pathlib import Path
from typing import Any

import pytest

from tests.kit.servers import ROOT, unavailable

#: The socket.io-client script and its lockfile.
NODE_DIR = ROOT / "tests" / "node"
#: The JavaScript client package (npm name workspace-chat-client).
JS_PACKAGE = ROOT / "clients" / "js"


def npm_installed(directory: Path, fallback_to_install: bool = False) -> str:
    """Install ``directory``'s dependencies from its lockfile unless socket.io-client is there
    already; return the path of ``node``. Skips (fails under CI) without node and npm or when
    the install fails. ``fallback_to_install``: try ``npm install`` when ``npm ci`` fails."""
    node, npm = shutil.which("node"), shutil.which("npm")
    if node is None or npm is None:
        unavailable(f"node and npm are needed for the tests of {directory.name}")
    installed = directory / "node_modules" / "socket.io-client" / "package.json"
    # One installer at a time, should several test sessions share this checkout.
    with open(directory / "package.json") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        if not installed.exists():
            ci = subprocess.run([npm, "ci", "--no-audit", "--no-fund"], cwd=directory,
                                capture_output=True, text=True, timeout=300)
            if ci.returncode != 0:
                if not fallback_to_install:
                    unavailable(f"npm ci failed in {directory}:\n{ci.stderr}")
                fallback = subprocess.run([npm, "install", "--no-audit", "--no-fund"],
                                          cwd=directory, capture_output=True, text=True,
                                          timeout=300)
                if fallback.returncode != 0:
                    unavailable(f"npm ci failed:\n{ci.stderr}\nnpm install failed:\n"
                                f"{fallback.stderr}")
    return node


def run_node(node: str, directory: Path, script: str, config: dict[str, Any],
             timeout: float) -> tuple[subprocess.CompletedProcess, list[str]]:
    """Run ``node script <config as JSON>`` in ``directory``; the process and its non-empty
    output lines."""
    process = subprocess.run([node, script, json.dumps(config)], cwd=directory,
                             capture_output=True, text=True, timeout=timeout,
                             env={**os.environ, "NODE_NO_WARNINGS": "1"})
    return process, [line for line in process.stdout.splitlines() if line.strip()]


@pytest.fixture(scope="module")
def run_js():
    """Runs clients/js/test/e2e.mjs; installs the package's dependencies from its lockfile."""
    node = npm_installed(JS_PACKAGE)

    def run(config: dict[str, Any]) -> dict[str, Any]:
        process, lines = run_node(node, JS_PACKAGE, "test/e2e.mjs", config, 90)
        assert process.returncode == 0 and lines, (process.stdout, process.stderr)
        return json.loads(lines[-1])

    return run
