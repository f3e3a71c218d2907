"""`make bench`: the same socket.io-client load against our server and a bare Flask-SocketIO one.

    python bench/run.py [--scenario NAME ...] [--target NAME ...] [--database sqlite|postgresql]
                        [--async-mode eventlet|gevent] [--scale 0.5] [--profile]
                        [--root CHECKOUT]

Targets, each started fresh for each scenario on a free loopback port:
  ours          the Procfile's web: line (gunicorn, our gunicorn.conf.py) after its release: line,
                with a tenant, chats and connection strings made over the REST API; clients
                connect with connection strings and send with message strings; every message is
                stored before it is broadcast
  bare-default  bench/bare_server.py as ``socketio.run(app)`` leaves it
  bare-tuned    bench/bare_server.py --tuned (TCP_NODELAY, 10,000 connections, no compression)

Scenarios:
  chat-200      1 chat x 200 clients; 10 senders, each sending its next message as soon as the
                previous one is acknowledged (the most deliveries per second the server manages)
  chats-100x10  100 chats x 10 clients, every client sending 2 messages/s (20/s per chat) for 10 s
  idle-5000     5,000 connections (100 chats x 50) held idle: server memory per connection

For each run it prints one JSON line: the load generator's figures (deliveries/s, latency
p50/p90/p99/max from when a message was due, lost, duplicated) plus the server's CPU seconds
(from /proc, utime+stime of every server process, over the sending phase only), CPU ms per
1,000 deliveries, the load generator's own CPU, and server memory. Then a summary of ours as
a ratio of each bare run. Figures are also written to bench/out/.

--root runs "ours" from another checkout of this repository with this venv, for a before/after
comparison in one go: ``git worktree add /tmp/before <commit>``, then ``--root /tmp/before``.
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import re
import shlex
import signal
import socket
import subprocess
import sys
import tempfile
import time
import uuid
from pathlib import Path

import requests

ROOT = Path(__file__).resolve().parent.parent
BENCH = ROOT / "bench"
OUT = BENCH / "out"
PYTHON = sys.executable
ADMIN_TOKEN = "bench-admin-token"
CLK_TCK = os.sysconf("SC_CLK_TCK")
PAGE_KB = os.sysconf("SC_PAGE_SIZE") // 1024

SCENARIOS = {
    "chat-200": dict(chats=1, clients_per_chat=200, senders_per_chat=10,
                     messages_per_sender=100, rate_per_chat=0),
    "chats-100x10": dict(chats=100, clients_per_chat=10, senders_per_chat=10,
                         messages_per_sender=20, rate_per_chat=20),
    "idle-5000": dict(chats=100, clients_per_chat=50, idle=True),
}
TARGETS = ["ours", "bare-tuned", "bare-default"]


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


def procfile(kind: str, root: Path) -> str:
    for line in (root / "Procfile").read_text().splitlines():
        match = re.match(rf"^{kind}:\s*(.+)$", line)
        if match:
            return match.group(1)
    raise SystemExit(f"Procfile has no {kind}: line")


def start(target: str, args, workdir: Path) -> Server:
    port = free_port()
    env = {k: v for k, v in os.environ.items() if not k.startswith("FLASK_")}
    env["PATH"] = f"{Path(PYTHON).parent}{os.pathsep}{env.get('PATH', '')}"
    log = workdir / f"{target}-{port}.log"
    if target == "ours":
        env.update({
            "PORT": str(port), "SECRET_KEY": "bench-secret", "ADMIN_TOKEN": ADMIN_TOKEN,
            "ASYNC_MODE": args.async_mode, "DATABASE_URL": database_url(args, workdir),
            # the load needs more than the per-tenant defaults (50 connections, 100 REST
            # requests a minute, 10 messages a second per connection); the checks still run
            "MAX_CONNECTIONS_PER_TENANT": "20000", "RATE_LIMIT_REST": "100000/minute",
            "RATE_LIMIT_MESSAGES": "1000/second", "ACCESS_LOG": "0",
        })
        subprocess.run(shlex.split(procfile("release", args.root)), cwd=args.root, env=env,
                       check=True, capture_output=True, timeout=120)
        command = ["bash", "-c", "exec " + procfile("web", args.root)]
    else:
        command = [PYTHON, str(BENCH / "bare_server.py"), "--port", str(port),
                   "--async-mode", args.async_mode]
        if target == "bare-tuned":
            command.append("--tuned")
    process = subprocess.Popen(command, cwd=args.root if target == "ours" else ROOT, env=env,
                               stdout=open(log, "wb"), stderr=subprocess.STDOUT,
                               start_new_session=True)
    server = Server(process, f"http://127.0.0.1:{port}", log)
    server.wait_ready()
    return server


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


# --- one run --------------------------------------------------------------------------------

def chats_for(target: str, server: Server, count: int) -> list[dict]:
    """The auth payload of each chat: ours made over REST, the bare server's made up."""
    if target != "ours":
        return [{"auth": {"chat_id": f"chat-{i}"}} for i in range(count)]
    http = requests.Session()
    r = http.post(server.url + "/admin/tenants", json={"name": "bench"},
                  headers={"Authorization": f"Bearer {ADMIN_TOKEN}"}, timeout=10)
    r.raise_for_status()
    http.headers["X-API-Key"] = r.json()["api_key"]
    chats = []
    for i in range(count):
        chat = http.post(server.url + "/api/v1/chats/", json={"user_id": "bench"}, timeout=10)
        chat.raise_for_status()
        chat_id = chat.json()["id"]
        string = http.post(f"{server.url}/api/v1/chats/{chat_id}/connection-string",
                           json={"user_id": "bench"}, timeout=10)
        string.raise_for_status()
        chats.append({"auth": {"chat_id": chat_id,
                               "connection_string": string.json()["connection_string"]}})
    return chats


def scaled(scenario: dict, factor: float) -> dict:
    if factor == 1:
        return dict(scenario)
    out = dict(scenario)
    for key in ("chats", "clients_per_chat", "messages_per_sender"):
        if key in out:
            out[key] = max(1, round(out[key] * factor))
    out["senders_per_chat"] = min(out.get("senders_per_chat", 0), out["clients_per_chat"])
    return out


def run_one(target: str, name: str, args, workdir: Path) -> dict:
    scenario = scaled(SCENARIOS[name], args.scale)
    server = start(target, args, workdir)
    try:
        rss_before = rss_kb(server.pids)
        spec = {"url": server.url, "kind": "ours" if target == "ours" else "bare",
                "scenario": name, "handshake": True, "connect_concurrency": 100,
                **{k: v for k, v in scenario.items() if k != "chats"},
                "chats": chats_for(target, server, scenario["chats"])}
        loadgen = subprocess.Popen(["node", str(BENCH / "loadgen.mjs"), json.dumps(spec)],
                                   stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True,
                                   cwd=BENCH)
        header = json.loads(loadgen.stdout.readline() or "{}")
        if header.get("phase") != "connected":
            raise SystemExit(f"load generator failed: {header}")
        time.sleep(1)  # let connection-time work finish before measuring
        pids = server.pids
        rss_connected = rss_kb(pids)
        cpu_before, gen_before = cpu_seconds(pids), cpu_seconds([loadgen.pid])
        profiler = None
        if args.profile and target == "ours":
            profile = OUT / f"profile-{name}-{args.database}.txt"
            profiler = subprocess.Popen(
                [str(Path(PYTHON).parent / "py-spy"), "record", "--format", "raw", "--rate",
                 "250", "--nonblocking", "-o", str(profile), "--pid", str(pids[-1])],
                stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        loadgen.stdin.write("go\n")
        loadgen.stdin.flush()
        result = json.loads(loadgen.stdout.readline())
        cpu = cpu_seconds(pids) - cpu_before
        gen_cpu = cpu_seconds([loadgen.pid]) - gen_before
        loadgen.wait(timeout=60)
        if profiler is not None:
            profiler.send_signal(signal.SIGINT)
            profiler.wait(timeout=60)
        result.update({"target": target, "database": args.database if target == "ours" else None,
                       "root": str(args.root) if target == "ours" else None,
                       "async_mode": args.async_mode,
                       "server_cpu_s": round(cpu, 3), "loadgen_cpu_s": round(gen_cpu, 3),
                       "server_rss_mb": round(rss_connected / 1024, 1)})
        if scenario.get("idle"):
            connected = max(1, result["clients"])
            result["server_kb_per_connection"] = round((rss_connected - rss_before) / connected,
                                                       1)
        elif result.get("deliveries"):
            result["server_cpu_ms_per_1000_deliveries"] = round(
                1000 * 1000 * cpu / result["deliveries"], 1)
        return result
    finally:
        server.stop()


# --- summary --------------------------------------------------------------------------------

def summarize(results: list[dict]) -> list[str]:
    lines = []
    for name in SCENARIOS:
        runs = {r["target"]: r for r in results if r["scenario"] == name}
        ours = runs.get("ours")
        if ours is None:
            continue
        for base in ("bare-tuned", "bare-default"):
            bare = runs.get(base)
            if bare is None:
                continue
            if ours.get("server_kb_per_connection") is not None:
                lines.append(f"{name}: memory per connection ours "
                             f"{ours['server_kb_per_connection']} KB, {base} "
                             f"{bare['server_kb_per_connection']} KB")
                continue
            ratio = ours["deliveries_per_s"] / max(1, bare["deliveries_per_s"])
            cpu_ratio = (ours["server_cpu_ms_per_1000_deliveries"]
                         / max(0.001, bare["server_cpu_ms_per_1000_deliveries"]))
            lines.append(
                f"{name}: ours/{base} deliveries/s {ours['deliveries_per_s']}/"
                f"{bare['deliveries_per_s']} = {ratio:.2f}; CPU ms per 1,000 deliveries "
                f"{ours['server_cpu_ms_per_1000_deliveries']}/"
                f"{bare['server_cpu_ms_per_1000_deliveries']} = {cpu_ratio:.2f}x; p99 "
                f"{ours['latency_ms']['p99']}/{bare['latency_ms']['p99']} ms")
    return lines


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--scenario", action="append", choices=list(SCENARIOS))
    parser.add_argument("--target", action="append", choices=TARGETS)
    parser.add_argument("--database", default="sqlite", choices=["sqlite", "postgresql"])
    parser.add_argument("--async-mode", default="eventlet", choices=["eventlet", "gevent"])
    parser.add_argument("--pg-admin-dsn",
                        default="postgresql://postgres@127.0.0.1:5432/postgres")
    parser.add_argument("--scale", type=float, default=1.0,
                        help="multiply chats, clients and messages (a quick run: 0.2)")
    parser.add_argument("--root", type=Path, default=ROOT,
                        help="the checkout whose server is 'ours' (default: this one)")
    parser.add_argument("--profile", action="store_true",
                        help="record our server with py-spy into bench/out/profile-*.txt")
    args = parser.parse_args()
    args.root = args.root.resolve()
    OUT.mkdir(exist_ok=True)
    if not (BENCH / "node_modules" / "socket.io-client").exists():
        subprocess.run(["npm", "ci", "--no-audit", "--no-fund", "--loglevel=error"], cwd=BENCH,
                       check=True)
    machine = {"cpus": os.cpu_count(), "cpu": _cpu_model(), "python": platform.python_version(),
               "node": subprocess.run(["node", "--version"], capture_output=True,
                                      text=True).stdout.strip(),
               "loadavg_before": Path("/proc/loadavg").read_text().split()[:3]}
    print(json.dumps({"machine": machine, "args": vars(args)}, default=str), flush=True)
    results = []
    try:
        with tempfile.TemporaryDirectory(prefix="wc-bench-") as tmp:
            for name in args.scenario or list(SCENARIOS):
                for target in args.target or TARGETS:
                    result = run_one(target, name, args, Path(tmp))
                    results.append(result)
                    print(json.dumps(result), flush=True)
    finally:
        drop_pg_databases(args)
    lines = summarize(results)
    for line in lines:
        print(line)
    stamp = time.strftime("%Y%m%d-%H%M%S")
    (OUT / f"bench-{stamp}.json").write_text(json.dumps(
        {"machine": machine, "args": vars(args), "results": results, "summary": lines},
        indent=2, default=str))


def _cpu_model() -> str:
    for line in Path("/proc/cpuinfo").read_text().splitlines():
        if line.startswith("model name"):
            return line.split(":", 1)[1].strip()
    return platform.processor()


if __name__ == "__main__":
    main()
