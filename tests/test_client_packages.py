"""The installable clients (contract section 8): ``pip install ./clients/python`` alone gives
``workspace_chat_client`` and the ``workspace-chat`` command with client dependencies only, and
the server's own distribution declares its dependencies."""
from __future__ import annotations

import subprocess
import sys
import venv
import zipfile
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent


@pytest.fixture(scope="module")
def client_venv(tmp_path_factory) -> Path:
    target = tmp_path_factory.mktemp("client-venv")
    venv.create(target, with_pip=True)
    python = target / "bin" / "python"
    install = subprocess.run([str(python), "-m", "pip", "install", "--quiet",
                              str(ROOT / "clients" / "python")],
                             capture_output=True, text=True, timeout=600)
    assert install.returncode == 0, install.stderr
    return target


def test_the_python_client_installs_alone_with_client_dependencies_only(client_venv):
    python = client_venv / "bin" / "python"
    probe = subprocess.run(
        [str(python), "-c",
         "import sys, workspace_chat_client as w; "
         "print(w.ChatClient.__name__, w.ReplyPendingError(None).code); "
         "import importlib.util as u; "
         "print(*[m for m in ('flask', 'eventlet', 'gevent', 'app') if u.find_spec(m)])"],
        capture_output=True, text=True, timeout=60, cwd=client_venv)
    assert probe.returncode == 0, probe.stderr
    names, server_modules = probe.stdout.splitlines()[0], probe.stdout.splitlines()[1:]
    assert names == "ChatClient reply_pending"
    assert server_modules in ([], [""]), server_modules


def test_the_workspace_chat_command_comes_with_the_client_package(client_venv):
    command = client_venv / "bin" / "workspace-chat"
    run = subprocess.run([str(command), "--help"], capture_output=True, text=True, timeout=60)
    assert run.returncode == 0, run.stderr
    assert "--api-key" in run.stdout and "--chat" in run.stdout


def test_the_server_distribution_declares_its_dependencies(tmp_path):
    build = subprocess.run([sys.executable, "-m", "pip", "wheel", "--quiet", "--no-deps",
                            "-w", str(tmp_path), str(ROOT)],
                           capture_output=True, text=True, timeout=600)
    assert build.returncode == 0, build.stderr
    (wheel,) = tmp_path.glob("workspace_chat-*.whl")
    with zipfile.ZipFile(wheel) as archive:
        names = archive.namelist()
        metadata = next(archive.read(n).decode() for n in names if n.endswith("METADATA"))
    requires = {line.split(":", 1)[1].strip() for line in metadata.splitlines()
                if line.startswith("Requires-Dist:")}
    pinned = {line.split("#")[0].strip() for line in
              (ROOT / "requirements.txt").read_text().splitlines()
              if line.split("#")[0].strip()}
    assert pinned <= requires, pinned - requires
    # the demo page's files ship with it; the client package and node_modules do not
    assert "app/demo/templates/demo/index.html" in names
    assert not [n for n in names if "node_modules" in n or n.startswith("workspace_chat_client")]
