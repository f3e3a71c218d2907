"""Every command in README.md and docs/ runs as written, against a server started with the
README's own first command, ``make run``.

Each fenced block in ``sh``, ``python`` or ``js`` is run, in its file's order, unless the line
before it is ``<!-- doc-test: skip: REASON -->`` (a block that starts a server, writes into the
repository, or is a fragment of a program of yours). Blocks see what a reader has at that point,
as environment variables: ``URL``, ``KEY`` (the demo api key ``make run`` printed), ``WS`` (the
demo workspace it printed), ``CHAT`` (a chat in it), ``ADMIN_TOKEN``, ``TENANT`` and ``KEY_ID``
(a tenant and one of its keys, for the admin examples). A line ``NAME=wc_...`` whose value is
elided with ``...`` or ``…`` stands for "the value printed above" and is not run. The docs say
``localhost:8000``; the test's server listens on another port, which is put in their place.
``curl`` fails on an HTTP error status, so an example that gets a 4xx fails the test.
"""
from __future__ import annotations

import os
import re
import shutil
import subprocess
from dataclasses import dataclass
from pathlib import Path

import pytest
import requests

from tests.kit.node import JS_PACKAGE, run_js  # noqa: F401 (fixture)
from tests.kit.servers import ADMIN_TOKEN, ROOT, free_port, stop_server, wait_healthy

pytestmark = pytest.mark.e2e

DOCS = [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]
BLOCK = re.compile(r"(?:<!-- doc-test: (?P<mark>.*?) -->\n)?^```(?P<lang>[a-z]*)\n(?P<body>.*?)^```",
                   re.S | re.M)
RUNNABLE = {"sh": "sh", "bash": "sh", "python": "python", "js": "js"}
ELIDED = re.compile(r"^\s*[A-Z_]+=\S*(\.\.\.|…)\S*\s*(#.*)?$")
DEMO_KEY_FILE = ROOT / "instance" / "demo_api_key"


@dataclass
class Block:
    path: Path
    line: int
    lang: str
    body: str
    mark: str | None

    @property
    def id(self) -> str:
        return f"{self.path.relative_to(ROOT)}:{self.line}"


def blocks() -> list[Block]:
    found = []
    for path in DOCS:
        text = path.read_text()
        for match in BLOCK.finditer(text):
            lang = RUNNABLE.get(match["lang"])
            if lang is None:
                continue  # output, JSON bodies, file listings: shown, not run
            line = text.count("\n", 0, match.start("body"))
            found.append(Block(path, line, lang, match["body"], match["mark"]))
    return found


BLOCKS = blocks()


def test_every_runnable_block_is_run_or_says_why_not():
    assert len(BLOCKS) >= 10, [b.id for b in BLOCKS]
    for block in BLOCKS:
        if block.mark is not None:
            assert re.fullmatch(r"skip: \S.{10,}", block.mark), (
                f"{block.id}: write <!-- doc-test: skip: REASON --> with a reason")


@pytest.fixture(scope="module")
def reader(tmp_path_factory, run_js):  # noqa: F811
    """``make run`` as the README says, and what a reader of the docs has at hand."""
    tmp = tmp_path_factory.mktemp("docs")
    saved = DEMO_KEY_FILE.read_bytes() if DEMO_KEY_FILE.exists() else None
    port = free_port()
    env = {k: v for k, v in os.environ.items()
           if not k.startswith(("FLASK_", "PYTEST_", "VIRTUAL_ENV"))}
    # a reader's shell: no virtual environment active, the repo's .venv not on PATH
    env["PATH"] = os.pathsep.join(p for p in env["PATH"].split(os.pathsep)
                                  if not p.startswith(str(ROOT)))
    env.update({"PORT": str(port), "DATABASE_URL": f"sqlite:///{tmp / 'docs.db'}",
                "SECRET_KEY": "docs-secret", "ADMIN_TOKEN": ADMIN_TOKEN, "ACCESS_LOG": "0"})
    log_path = tmp / "make-run.log"
    log = open(log_path, "wb")
    process = subprocess.Popen(["make", "run"], cwd=ROOT, env=env, stdout=log,
                               stderr=subprocess.STDOUT, start_new_session=True)
    url = f"http://127.0.0.1:{port}"
    try:
        wait_healthy(url, process, 180, log_path, interval=0.2)
        printed = log_path.read_text(errors="replace")
        key = re.search(r"^demo api key:\s+(\S+)$", printed, re.M)[1]
        ws = re.search(r"^demo workspace:\s+(\S+)", printed, re.M)[1]
        assert f"Serving on http://localhost:{port}" in printed, printed
        admin = {"Authorization": f"Bearer {ADMIN_TOKEN}"}
        tenant = requests.post(url + "/admin/tenants", json={"name": "Docs"}, headers=admin,
                               timeout=10).json()
        spare = requests.post(f"{url}/admin/tenants/{tenant['id']}/api-keys", headers=admin,
                              timeout=10).json()
        chat = requests.post(url + "/chat", json={"user_id": "demo", "workspace_id": ws},
                             headers={"X-API-Key": key}, timeout=10).json()["id"]
        seat = requests.post(f"{url}/api/v1/chats/{chat}/connection-string",
                             json={"user_id": "demo"}, headers={"X-API-Key": key},
                             timeout=10).json()["connection_string"]
        env.update({"URL": url, "KEY": key, "WS": ws, "CHAT": chat, "TENANT": tenant["id"],
                    "KEY_ID": spare["id"], "CONNECTION_STRING": seat,
                    "DOCS_PORT": str(port)})
        yield env
    finally:
        stop_server(process)
        if saved is None:
            DEMO_KEY_FILE.unlink(missing_ok=True)
        else:
            DEMO_KEY_FILE.write_bytes(saved)


def as_run(block: Block, port: str) -> str:
    body = "\n".join(line for line in block.body.splitlines() if not ELIDED.match(line))
    return body.replace("localhost:8000", f"127.0.0.1:{port}")


SH_PRELUDE = """set -euo pipefail
curl() { command curl --silent --show-error --fail-with-body "$@"; }
"""
PY_PRELUDE = """import os
url, api_key, key = os.environ["URL"], os.environ["KEY"], os.environ["KEY"]
KEY, chat_id, connection_string = key, os.environ["CHAT"], os.environ["CONNECTION_STRING"]
WS, CHAT = os.environ["WS"], os.environ["CHAT"]
"""
JS_PRELUDE = """const url = process.env.URL, chatId = process.env.CHAT;
const connectionString = process.env.CONNECTION_STRING;
"""


@pytest.mark.parametrize("block", BLOCKS, ids=[b.id for b in BLOCKS])
def test_the_documented_command_runs(block, reader, tmp_path):
    if block.mark is not None:
        pytest.skip(block.mark)
    code = as_run(block, reader["DOCS_PORT"])
    if block.lang == "sh":
        command = ["bash", "-c", SH_PRELUDE + code]
    elif block.lang == "python":
        command = [str(ROOT / ".venv" / "bin" / "python"), "-c", PY_PRELUDE + code]
    else:
        # inside the package: `import ... from "workspace-chat-client"` resolves to it (a
        # package may import itself by name), and socket.io-client is its dependency
        script = JS_PACKAGE / f".doc-{os.getpid()}-{block.line}.mjs"
        imports = "".join(line + "\n" for line in code.splitlines() if line.startswith("import "))
        rest = "\n".join(line for line in code.splitlines() if not line.startswith("import "))
        script.write_text(imports + JS_PRELUDE + rest)
        command = [shutil.which("node") or "node", str(script)]
    try:
        run = subprocess.run(command, cwd=ROOT, env=reader, capture_output=True, text=True,
                             timeout=90, stdin=subprocess.DEVNULL)
    finally:
        if block.lang == "js":
            script.unlink(missing_ok=True)
    assert run.returncode == 0, (f"{block.id} failed ({run.returncode}):\n{code}\n"
                                 f"--- stdout\n{run.stdout}\n--- stderr\n{run.stderr}")
    assert "Traceback" not in run.stderr, run.stderr
    json_lines = [line for line in run.stdout.splitlines() if line.startswith('{"error"')]
    assert not json_lines, json_lines
