"""The servers `bench/run.py` measures, and what it reads of them (/proc, REST).

  ours          the Procfile's web: line (gunicorn, our gunicorn.conf.py) after its release: line;
                with --processes N, N of them on distinct ports sharing the database and Redis
  bare-tuned    bench/bare_server.py --tuned (TCP_NODELAY, 10,000 connections, no compression)
  bare-default  bench/bare_server.py as ``socketio.run(app)`` leaves it

With pinning, every server process runs on core 0 (``taskset -c 0``; children inherit it) and
the load generator on core 1.
"""
from __future__ import annotations

import os
import re
import shlex
import signal
import socket
import subprocess
import sys
import time
import uuid
from pathlib import Path

import requests

ROOT = Path(__file__).resolve().parent.parent
BENCH = ROOT / "bench"
PYTHON = sys.executable
ADMIN_TOKEN = "bench-admin-token"
CLK_TCK = os.sysconf("SC_CLK_TCK")
PAGE_KB = os.sysconf("SC_PAGE_SIZE") // 1024
SERVER_CORE, LOADGEN_CORE = "0", "1"


def pinned(command: list[str], core: str, args) -> list[str]:
    return ["taskset", "-c", core, *command] if args.pin else command


# --- processes and /proc --------------------------------------------------------------------

def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def process_tree(pid: int) -> list[int]:
    """The pid and its descendants (gunicorn: the master and its worker)."""
    pids = [pid]
    for task in Path(f"/proc/{pid}/task").glob("*"):
        try:
            children = (task / "children").read_text().split()
        except OSError:
            continue
        for child in children:
            pids.extend(process_tree(int(child)))
    return pids


def cpu_seconds(pids: list[int]) -> float:
    """utime + stime of the processes, in seconds."""
    total = 0
    for pid in pids:
        try:
            fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
        except OSError:
            continue
        total += int(fields[11]) + int(fields[12])  # fields 14 and 15 of stat(5)
    return total / CLK_TCK


def rss_kb(pids: list[int]) -> int:
    total = 0
    for pid in pids:
        try:
            total += int(Path(f"/proc/{pid}/statm").read_text().split()[1]) * PAGE_KB
        except OSError:
            continue
    return total


class Server:
    """One server process tree (gunicorn: master and worker) on its own port."""

    def __init__(self, process: subprocess.Popen, url: str, log: Path):
        self.process, self.url, self.log = process, url, log

    @property
    def pids(self) -> list[int]:
        return process_tree(self.process.pid)

    def wait_ready(self) -> None:
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline:
            if self.process.poll() is not None:
                raise SystemExit(f"server exited:\n{self.log.read_text(errors='replace')}")
            try:
                if requests.get(self.url + "/healthz", timeout=1).status_code == 200:
                    return
            except requests.RequestException:
                pass
            time.sleep(0.1)
        self.stop()
        raise SystemExit(f"server did not start:\n{self.log.read_text(errors='replace')}")

    def stop(self) -> None:
        if self.process.poll() is None:
            os.killpg(self.process.pid, signal.SIGTERM)
            try:
                self.process.wait(timeout=30)
            except subprocess.TimeoutExpired:
                os.killpg(self.process.pid, signal.SIGKILL)
                self.process.wait()


class Target:
    """What one run measures: ours (one or more processes) or a bare server."""

    def __init__(self, name: str, servers: list[Server]):
        self.name, self.servers = name, servers

    @property
    def ours(self) -> bool:
        return self.name == "ours"

    @property
    def url(self) -> str:
        return self.servers[0].url

    def pids(self) -> list[list[int]]:
        return [server.pids for server in self.servers]

    def stop(self) -> None:
        for server in self.servers:
            server.stop()


def procfile(kind: str, root: Path) -> str:
    for line in (root / "Procfile").read_text().splitlines():
        match = re.match(rf"^{kind}:\s*(.+)$", line)
        if match:
            return match.group(1)
    raise SystemExit(f"Procfile has no {kind}: line")


def _spawn(command: list[str], cwd: Path, env: dict, log: Path, port: int) -> Server:
    process = subprocess.Popen(command, cwd=cwd, env=env, stdout=open(log, "wb"),
                               stderr=subprocess.STDOUT, start_new_session=True)
    server = Server(process, f"http://127.0.0.1:{port}", log)
    server.wait_ready()
    return server


def start(name: str, args, workdir: Path, extra_env: dict | None = None) -> Target:
    env = {k: v for k, v in os.environ.items() if not k.startswith("FLASK_")}
    env.pop("REDIS_URL", None)
    env["PATH"] = f"{Path(PYTHON).parent}{os.pathsep}{env.get('PATH', '')}"
    if name != "ours":
        port = free_port()
        command = [PYTHON, str(BENCH / "bare_server.py"), "--port", str(port),
                   "--async-mode", args.async_mode] + (["--tuned"] if name == "bare-tuned" else [])
        server = _spawn(pinned(command, SERVER_CORE, args), ROOT, env,
                        workdir / f"{name}-{port}.log", port)
        return Target(name, [server])
    env.update({
        "SECRET_KEY": "bench-secret", "ADMIN_TOKEN": ADMIN_TOKEN,
        "ASYNC_MODE": args.async_mode, "DATABASE_URL": database_url(args, workdir),
        # the load needs more than the per-tenant defaults (50 connections, 100 REST
        # requests a minute, 10 messages a second per connection); the checks still run
        "MAX_CONNECTIONS_PER_TENANT": "20000", "RATE_LIMIT_REST": "100000/minute",
        "RATE_LIMIT_MESSAGES": "1000/second", "ACCESS_LOG": "0",
        **(extra_env or {}),
    })
    if args.processes:
        flush_redis(args.redis_url)
        env["REDIS_URL"] = args.redis_url
    subprocess.run(shlex.split(procfile("release", args.root)), cwd=args.root, env=env,
                   check=True, capture_output=True, timeout=120)
    servers = []
    try:
        for _ in range(args.processes or 1):
            port = free_port()
            command = pinned(["bash", "-c", "exec " + procfile("web", args.root)],
                             SERVER_CORE, args)
            servers.append(_spawn(command, args.root, {**env, "PORT": str(port)},
                                  workdir / f"ours-{port}.log", port))
    except BaseException:
        Target(name, servers).stop()
        raise
    return Target(name, servers)


def flush_redis(url: str) -> None:
    import redis

    redis.Redis.from_url(url).flushdb()


_pg_databases: list[str] = []


def database_url(args, workdir: Path) -> str:
    if args.database == "sqlite":
        return f"sqlite:///{workdir}/bench-{uuid.uuid4().hex[:8]}.db"
    import psycopg2

    name = f"wc_bench_{uuid.uuid4().hex[:8]}"
    conn = psycopg2.connect(args.pg_admin_dsn)
    conn.autocommit = True
    with conn.cursor() as cur:
        cur.execute(f'CREATE DATABASE "{name}"')
    conn.close()
    _pg_databases.append(name)
    return args.pg_admin_dsn.rsplit("/", 1)[0] + "/" + name


def drop_pg_databases(args) -> None:
    if not _pg_databases:
        return
    import psycopg2

    conn = psycopg2.connect(args.pg_admin_dsn)
    conn.autocommit = True
    with conn.cursor() as cur:
        for name in _pg_databases:
            cur.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')
    conn.close()
    _pg_databases.clear()


# --- REST: chats to load, history to check --------------------------------------------------

class Tenant:
    """Ours: a tenant made over the admin API, and its chats (the bare server's are made up)."""

    def __init__(self, target: Target):
        self.target, self.http = target, None
        if target.ours:
            self.http = requests.Session()
            r = self.http.post(target.url + "/admin/tenants", json={"name": "bench"},
                               headers={"Authorization": f"Bearer {ADMIN_TOKEN}"}, timeout=10)
            r.raise_for_status()
            self.http.headers["X-API-Key"] = r.json()["api_key"]
        self.made = 0

    def chats(self, count: int, agent: dict | None = None, url: str | None = None) -> list[dict]:
        """The loadgen's entry of each new chat: {auth, url?}, chat_id in auth."""
        first, self.made = self.made, self.made + count
        if not self.target.ours:
            return [{"auth": {"chat_id": f"chat-{i}"}} for i in range(first, first + count)]
        base = self.target.url
        body = {"user_id": "bench"}
        if agent is not None:
            ws = self.http.post(base + "/api/v1/workspaces", timeout=10,
                                json={"owner_id": "bench", "name": "bench", "agent": agent})
            ws.raise_for_status()
            body["workspace_id"] = ws.json()["id"]
        chats = []
        for _ in range(count):
            chat = self.http.post(base + "/api/v1/chats/", json=body, timeout=10)
            chat.raise_for_status()
            chat_id = chat.json()["id"]
            string = self.http.post(f"{base}/api/v1/chats/{chat_id}/connection-string",
                                    json={"user_id": "bench"}, timeout=10)
            string.raise_for_status()
            entry = {"auth": {"chat_id": chat_id,
                              "connection_string": string.json()["connection_string"]}}
            if url:
                entry["url"] = url
            chats.append(entry)
        return chats

    def history_ids(self, chat_id: str) -> set[str]:
        """Every stored message id of the chat (GET .../messages, keyset pages of 200)."""
        ids, after = set(), None
        while True:
            params = {"limit": 200, **({"after_id": after} if after else {})}
            r = self.http.get(f"{self.target.url}/api/v1/chats/{chat_id}/messages",
                              params=params, timeout=30)
            r.raise_for_status()
            page = r.json()
            ids.update(str(m["id"]) for m in page["messages"])
            if not page["messages"] or not page["has_more"]:
                return ids
            after = page["messages"][-1]["id"]
