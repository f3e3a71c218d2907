"""`make bench`: the same socket.io-client load against our server and a bare Flask-SocketIO one.

    python bench/run.py [--scenario NAME ...] [--target NAME ...] [--quick] [--rate 1000]
                        [--database sqlite|postgresql] [--processes N] [--pin/--no-pin]
                        [--async-mode eventlet|gevent] [--profile] [--root CHECKOUT]

Targets (bench/targets.py), each started fresh for each scenario on free loopback ports:
  ours          the Procfile's web: line (gunicorn, our gunicorn.conf.py) after its release: line,
                with a tenant, chats and connection strings made over the REST API; clients
                connect with connection strings and send with message strings
  bare-tuned    bench/bare_server.py --tuned (TCP_NODELAY, 10,000 connections, no compression):
                it broadcasts and acknowledges, nothing else; every ratio is against it
  bare-default  bench/bare_server.py as ``socketio.run(app)`` leaves it (only when asked for)

Scenarios (bench/scenarios.py; sizes at scale 1):
  busy      1 chat x 200 clients, 10 senders each sending on the previous ack: server CPU per
            1,000 deliveries, deliveries/s
  many      100 chats x 10 clients, --rate messages/s offered (10/s per chat) for --duration:
            messages/s handled, deliveries/s, latency p50/p99, acks later than 2 s, refusals by
            code, lost/dup, server CPU per 1,000 deliveries
  connect   5,000 clients (100 chats x 50) connect: server CPU per connect (ours: connection
            string verified, connection_established with a message string), memory per connection
  stream    100 chats x 10 clients; one 200-word message per chat, streamed back by the chat's
            echo agent (ours with STREAM_FLUSH_MS 20 and 0; the bare server emits one token
            event per word): token events delivered/s, server CPU per 1,000 token events
  overload  twice what ours handled in `many` (or twice --rate) for --duration, then half of it
            for --recovery-duration: acks within / after 2 s, server_busy refusals, latency in
            the recovery phase; every acknowledged message must be in the REST history

--processes N (ours only, with REDIS_URL --redis-url, flushed first; use --database postgresql)
starts N server processes on distinct ports; every client is on the first, plus one idle client
in a chat of its own on each other one; each process's CPU per message is reported.

Pinning (default when there are 2 cores or more): server processes on core 0, the load
generator on core 1 (``taskset -c``). Each run prints one JSON line, then a Markdown table of
ours against bare-tuned from the same invocation; everything is also written to bench/out/.

--root runs "ours" from another checkout of this repository with this venv, for a before/after
comparison in one go: ``git worktree add /tmp/before <commit>``, then ``--root /tmp/before``.
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

from scenarios import RUNNERS, size  # noqa: E402
from targets import BENCH, ROOT, drop_pg_databases  # noqa: E402

OUT = BENCH / "out"
TARGETS = ["ours", "bare-tuned", "bare-default"]
DEFAULT_TARGETS = ["ours", "bare-tuned"]


# --- the Markdown table ---------------------------------------------------------------------

def _num(value, digits: int = 1) -> str:
    if value is None:
        return "–"
    if isinstance(value, float) and not value.is_integer():
        return f"{value:,.{digits}f}"
    return f"{int(value):,}"


def _ratio(ours, bare) -> str:
    if ours is None or bare in (None, 0):
        return ""
    return f"{ours / bare:.2f}×"


def _refusals(result: dict) -> str:
    refused = result.get("refused") or {}
    return ", ".join(f"{n} {code}" for code, n in sorted(refused.items())) or "0"


def _p(result: dict, key: str, phase: int | None = None):
    source = result if phase is None else result["phases"][phase]
    return source["latency_ms"][key]


def rows_for(name: str, ours: dict, bare: dict | None, args) -> list[tuple]:
    """(figure, ours, bare, ratio) of one scenario, ratio True (ours / bare), False (none) or a
    text of its own; bare may be missing."""
    b = bare or {}
    get = lambda r, k: r.get(k) if r else None  # noqa: E731
    s = size(name, args)
    if name == "busy":
        label = f"1 chat × {s['clients_per_chat']} clients, next message on ack"
        return [(f"{label}: server CPU ms per 1,000 deliveries",
                 ours["server_cpu_ms_per_1000_deliveries"],
                 get(b, "server_cpu_ms_per_1000_deliveries"), True),
                ("same: deliveries/s", ours["deliveries_per_s"], get(b, "deliveries_per_s"),
                 True)]
    if name in ("many", "overload"):
        label = f"{s['chats']} chats × {s['clients_per_chat']} clients"
        if name == "many":
            label += f", {_num(ours['offered_per_s'], 0)} msg/s offered"
            if ours["processes"] > 1 or args.processes:
                label += f", {ours['processes']} process(es), {ours['database']} + Redis"
            rows = [
                (f"{label}: server CPU ms per 1,000 deliveries",
                 ours["server_cpu_ms_per_1000_deliveries"],
                 get(b, "server_cpu_ms_per_1000_deliveries"), True),
                ("same: messages handled per second", ours["messages_per_s"],
                 get(b, "messages_per_s"), True),
                ("same: deliveries per second", ours["deliveries_per_s"],
                 get(b, "deliveries_per_s"), True),
                ("same: latency p50 (ms)", _p(ours, "p50"), bare and _p(bare, "p50"), True),
                ("same: latency p99 (ms)", _p(ours, "p99"), bare and _p(bare, "p99"), True),
                ("same: acks later than 2 s", ours["acks_late"], get(b, "acks_late"), False),
                ("same: refusals", _refusals(ours), bare and _refusals(bare), False),
                ("same: lost / duplicated", f"{ours['lost']} / {ours['duplicated']}",
                 bare and f"{bare['lost']} / {bare['duplicated']}", False)]
            per_process = ours.get("per_process_cpu_ms_per_message") or []
            for i, ms in enumerate(per_process):
                share = f"{ms / per_process[0]:.1%} of process 1" if i and per_process[0] else ""
                rows.append((f"same: process {i + 1} CPU ms per message of process 1's chats",
                             ms, None, share))
            return rows
        offered = ours["offered_per_s"]
        label += f", {_num(offered['burst'], 0)} msg/s offered for {args.duration:g} s"
        burst, recovery = ours["phases"][0], ours["phases"][1]
        bb, br = (bare["phases"][0], bare["phases"][1]) if bare else ({}, {})
        return [
            (f"{label}: acks within 2 s", burst["acks_within_timeout"],
             bb.get("acks_within_timeout"), False),
            ("same: acks after 2 s", burst["acks_late"], bb.get("acks_late"), False),
            ("same: server_busy refusals", burst["refused"].get("server_busy", 0),
             bb.get("refused", {}).get("server_busy", 0) if bare else None, False),
            ("same: other refusals", _refusals({"refused": {
                k: v for k, v in burst["refused"].items() if k != "server_busy"}}),
             bare and _refusals({"refused": {k: v for k, v in bb["refused"].items()
                                             if k != "server_busy"}}), False),
            ("same: messages not sent (sender still waiting at the phase's end)",
             burst["not_sent"], bb.get("not_sent"), False),
            (f"then {_num(offered['recovery'], 0)} msg/s for {args.recovery_duration:g} s: "
             "latency p99 (ms)", _p(ours, "p99", 1), bare and _p(bare, "p99", 1), True),
            ("same: acks after 2 s", recovery["acks_late"], br.get("acks_late"), False),
            (f"acknowledged ({ours['acked_checked_in_history']:,}) but missing from the history",
             ours["acked_missing_from_history"], None, False)]
    if name == "connect":
        label = f"{ours['clients']:,} connections ({s['chats']} chats × {s['clients_per_chat']})"
        return [(f"{label}: server CPU ms per connect", ours["server_cpu_ms_per_connect"],
                 get(b, "server_cpu_ms_per_connect"), True),
                ("same: memory per connection (KB)", ours["server_kb_per_connection"],
                 get(b, "server_kb_per_connection"), True),
                ("same: connect time (s)", ours["connect_s"], get(b, "connect_s"), True)]
    if name == "stream":
        flush = ours["variant"].replace("flush", "STREAM_FLUSH_MS=")
        label = (f"{s['chats']} chats × {s['clients_per_chat']} clients, a {s['words']}-word "
                 f"echo reply per chat, {flush}")
        return [(f"{label}: token events delivered/s", ours["token_events_per_s"],
                 get(b, "token_events_per_s"), True),
                ("same: server CPU ms per 1,000 token events",
                 ours["server_cpu_ms_per_1000_token_events"],
                 get(b, "server_cpu_ms_per_1000_token_events"), True),
                ("same: words delivered/s", ours["token_words_per_s"],
                 get(b, "token_words_per_s"), True),
                ("same: server CPU ms per 1,000 words delivered",
                 ours["server_cpu_ms_per_1000_words"], get(b, "server_cpu_ms_per_1000_words"),
                 True),
                ("same: replies ended / expected",
                 f"{ours['stream_ends']} / {ours['expected_stream_ends']}",
                 bare and f"{bare['stream_ends']} / {bare['expected_stream_ends']}", False)]
    return []


def table(results: list[dict], args) -> list[str]:
    lines = ["| scenario | ours | bare | ratio |", "| --- | ---: | ---: | ---: |"]
    for name in RUNNERS:
        bare = next((r for r in results if r["scenario"] == name
                     and r["target"] == "bare-tuned"), None)
        for ours in (r for r in results if r["scenario"] == name and r["target"] == "ours"):
            for figure, mine, theirs, ratio in rows_for(name, ours, bare, args):
                cells = [figure, mine if isinstance(mine, str) else _num(mine, 2),
                         theirs if isinstance(theirs, str) else _num(theirs, 2),
                         ratio if isinstance(ratio, str) else
                         _ratio(mine, theirs) if ratio else ""]
                lines.append("| " + " | ".join(cells) + " |")
    return lines


# --- main -----------------------------------------------------------------------------------

def parse_args(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--scenario", action="append", choices=list(RUNNERS))
    parser.add_argument("--target", action="append", choices=TARGETS,
                        help="default: ours and bare-tuned")
    parser.add_argument("--quick", action="store_true",
                        help="a check of the harness: --scale 0.1, 3 s phases, 2 s recovery")
    parser.add_argument("--scale", type=float, default=None,
                        help="multiply chats (busy: clients and messages); default 1")
    parser.add_argument("--rate", type=float, default=1000,
                        help="many: messages/s offered over 100 chats (scaled with chats)")
    parser.add_argument("--duration", type=float, default=None,
                        help="seconds of many and of the overload burst (default 10)")
    parser.add_argument("--recovery-duration", type=float, default=None,
                        help="seconds of overload's phase after the burst (default 5)")
    parser.add_argument("--echo-delay-ms", type=int, default=0,
                        help="stream: the echo agent's delay_ms between words")
    parser.add_argument("--pin", action=argparse.BooleanOptionalAction,
                        default=(os.cpu_count() or 1) >= 2,
                        help="servers on core 0, the load generator on core 1 (taskset)")
    parser.add_argument("--database", default="sqlite", choices=["sqlite", "postgresql"])
    parser.add_argument("--processes", type=int, default=0,
                        help="ours as N processes sharing --redis-url (flushed first)")
    parser.add_argument("--redis-url", default="redis://127.0.0.1:6379/8")
    parser.add_argument("--async-mode", default="eventlet", choices=["eventlet", "gevent"])
    parser.add_argument("--pg-admin-dsn",
                        default="postgresql://postgres@127.0.0.1:5432/postgres")
    parser.add_argument("--root", type=Path, default=ROOT,
                        help="the checkout whose server is 'ours' (default: this one)")
    parser.add_argument("--profile", action="store_true",
                        help="record our server with py-spy into bench/out/profile-*.txt")
    args = parser.parse_args(argv)
    args.root = args.root.resolve()
    quick = args.quick
    args.scale = args.scale if args.scale is not None else (0.1 if quick else 1.0)
    args.duration = args.duration if args.duration is not None else (3.0 if quick else 10.0)
    args.recovery_duration = (args.recovery_duration if args.recovery_duration is not None
                              else (2.0 if quick else 5.0))
    return args


def main() -> None:
    args = parse_args()
    OUT.mkdir(exist_ok=True)
    if not (BENCH / "node_modules" / "socket.io-client").exists():
        subprocess.run(["npm", "ci", "--no-audit", "--no-fund", "--loglevel=error"], cwd=BENCH,
                       check=True)
    machine = {"cpus": os.cpu_count(), "cpu": _cpu_model(), "python": platform.python_version(),
               "node": subprocess.run(["node", "--version"], capture_output=True,
                                      text=True).stdout.strip(),
               "loadavg_before": Path("/proc/loadavg").read_text().split()[:3]}
    print(json.dumps({"machine": machine, "args": vars(args)}, default=str), flush=True)
    results, context = [], {}
    targets = args.target or DEFAULT_TARGETS
    # ours first: overload offers twice what ours handled in `many`
    ordered = sorted(targets, key=lambda t: t != "ours")
    try:
        with tempfile.TemporaryDirectory(prefix="wc-bench-") as tmp:
            for name in args.scenario or list(RUNNERS):
                for target in ordered:
                    for result in RUNNERS[name](target, args, Path(tmp), context):
                        results.append(result)
                        print(json.dumps(result), flush=True)
    finally:
        drop_pg_databases(args)
    lines = table(results, args)
    print()
    for line in lines:
        print(line)
    stamp = time.strftime("%Y%m%d-%H%M%S")
    (OUT / f"bench-{stamp}.json").write_text(json.dumps(
        {"machine": machine, "args": vars(args), "results": results, "table": lines},
        indent=2, default=str))


def _cpu_model() -> str:
    for line in Path("/proc/cpuinfo").read_text().splitlines():
        if line.startswith("model name"):
            return line.split(":", 1)[1].strip()
    return platform.processor()


if __name__ == "__main__":
    main()
