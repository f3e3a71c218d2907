"""The scenarios of `bench/run.py`: what load each one offers and what it reads off the servers.

Each ``run_*`` function starts a fresh target, runs the load generator against it once, and
returns the result as a dict (the load generator's figures plus the server's CPU and memory).
Sizes are at scale 1; ``--quick`` runs them at 0.1 (fewer chats or clients, the same rate per
chat) with short phases.
"""
from __future__ import annotations

import json
import signal
import subprocess
import time
from pathlib import Path

from targets import (BENCH, LOADGEN_CORE, PYTHON, Target, Tenant, cpu_seconds, pinned,
                     rss_kb, start)

SIZES = {
    # 1 chat x 200 clients, 10 senders, each sending its next message on the previous ack
    "busy": dict(chats=1, clients_per_chat=200, senders_per_chat=10, messages_per_sender=100),
    # 100 chats x 10 clients, every client a sender, paced at --rate for --duration
    "many": dict(chats=100, clients_per_chat=10, senders_per_chat=10),
    # 5,000 connections (100 chats x 50): server CPU per connect, memory per connection
    "connect": dict(chats=100, clients_per_chat=50),
    # 100 chats x 10 clients, one message per chat that the echo agent streams back
    "stream": dict(chats=100, clients_per_chat=10, words=200),
    # 100 chats x 10 clients: a burst at twice the rate `many` handled, then a slower phase
    "overload": dict(chats=100, clients_per_chat=10, senders_per_chat=10),
}
ECHO = {"kind": "echo", "delay_ms": 0}


def size(name: str, args) -> dict:
    out = dict(SIZES[name])
    if args.scale != 1:
        keys = ("clients_per_chat", "messages_per_sender") if name == "busy" else ("chats",)
        for key in keys:
            if key in out:
                out[key] = max(1, round(out[key] * args.scale))
        if "senders_per_chat" in out:
            out["senders_per_chat"] = min(out["senders_per_chat"], out["clients_per_chat"])
    return out


def offered_rate(chats: int, args) -> float:
    """--rate is for 100 chats (10 msg/s per chat by default); scaled runs keep it per chat."""
    return args.rate * chats / 100


# --- one run --------------------------------------------------------------------------------

class Run:
    """A target started for one scenario, the load generator, and CPU read between phases."""

    def __init__(self, name: str, target_name: str, args, workdir: Path,
                 extra_env: dict | None = None, tag: str = ""):
        self.name, self.args, self.tag = name, args, tag
        self.target: Target = start(target_name, args, workdir, extra_env)
        self.tenant = Tenant(self.target)
        self.loadgen = None
        self.profiler = None
        self.sent_spec: dict = {}

    def spec(self, mode: str, chats: list[dict], **extra) -> dict:
        spec = {"url": self.target.url, "kind": "ours" if self.target.ours else "bare",
                "scenario": self.name, "mode": mode, "connect_concurrency": 100,
                "chats": chats, **extra}
        others = self.target.servers[1:]
        if others:  # one idle client in a chat of its own on every other process
            spec["idle_clients"] = [self.tenant.chats(1, url=s.url)[0] for s in others]
        return spec

    def launch(self, spec: dict) -> None:
        self.sent_spec = spec
        command = pinned(["node", str(BENCH / "loadgen.mjs"), json.dumps(spec)], LOADGEN_CORE,
                         self.args)
        self.loadgen = subprocess.Popen(command, stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                                        text=True, cwd=BENCH)

    def expect(self, phase: str | None = None) -> dict:
        line = self.loadgen.stdout.readline()
        data = json.loads(line) if line.strip() else {}
        if phase and data.get("phase") != phase:
            raise SystemExit(f"load generator failed (expected {phase!r}): {data or 'no output'}")
        if not data:
            raise SystemExit("load generator exited without a result")
        return data

    def go(self) -> None:
        self.loadgen.stdin.write("go\n")
        self.loadgen.stdin.flush()

    def cpu(self) -> tuple[list[float], float]:
        """CPU seconds so far of each server process tree, and of the load generator."""
        return ([cpu_seconds(pids) for pids in self.target.pids()],
                cpu_seconds([self.loadgen.pid]))

    def start_profile(self) -> None:
        if self.args.profile and self.target.ours:
            out = BENCH / "out" / f"profile-{self.name}{self.tag}-{self.args.database}.txt"
            self.profiler = subprocess.Popen(
                [str(Path(PYTHON).parent / "py-spy"), "record", "--format", "raw", "--rate",
                 "250", "--nonblocking", "-o", str(out), "--pid", str(self.target.pids()[0][-1])],
                stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)

    def stop_profile(self) -> None:
        if self.profiler is not None:
            self.profiler.send_signal(signal.SIGINT)
            self.profiler.wait(timeout=60)

    def measure_load(self) -> dict:
        """Connected clients: send (after "go"), and the CPU spent until the result came."""
        header = self.expect("connected")
        if header["connect_failures"]:
            raise SystemExit(f"{self.name}: {header['connect_failures']} clients failed to connect")
        time.sleep(1)  # let connection-time work finish before measuring
        rss = sum(rss_kb(pids) for pids in self.target.pids())
        cpu_before, gen_before = self.cpu()
        self.start_profile()
        self.go()
        result = self.expect()
        cpu_after, gen_after = self.cpu()
        self.stop_profile()
        per_process = [round(a - b, 3) for a, b in zip(cpu_after, cpu_before)]
        result.update(self.labels(), server_cpu_s=round(sum(per_process), 3),
                      loadgen_cpu_s=round(gen_after - gen_before, 3),
                      server_rss_mb=round(rss / 1024, 1))
        if len(per_process) > 1:
            result["per_process_cpu_s"] = per_process
        return result

    def labels(self) -> dict:
        args, ours = self.args, self.target.ours
        return {"target": self.target.name, "database": args.database if ours else None,
                "processes": len(self.target.servers), "root": str(args.root) if ours else None,
                "async_mode": args.async_mode, "pinned": args.pin}

    def close(self) -> None:
        if self.loadgen is not None and self.loadgen.poll() is None:
            self.loadgen.kill()
            self.loadgen.wait()
        self.target.stop()


def per_1000(cpu_s: float, count: int) -> float | None:
    return round(1000 * 1000 * cpu_s / count, 2) if count else None


def add_costs(result: dict) -> dict:
    result["server_cpu_ms_per_1000_deliveries"] = per_1000(result["server_cpu_s"],
                                                           result.get("deliveries", 0))
    if "per_process_cpu_s" in result:
        result["per_process_cpu_ms_per_message"] = [
            round(per_1000(cpu, result["acked"]) / 1000, 3) if result["acked"] else None
            for cpu in result["per_process_cpu_s"]]
    return result


# --- the scenarios --------------------------------------------------------------------------

def run_busy(target: str, args, workdir: Path, context: dict) -> list[dict]:
    s = size("busy", args)
    run = Run("busy", target, args, workdir)
    try:
        run.launch(run.spec("closed", run.tenant.chats(s["chats"]),
                            clients_per_chat=s["clients_per_chat"],
                            senders_per_chat=s["senders_per_chat"],
                            messages_per_sender=s["messages_per_sender"]))
        return [add_costs(run.measure_load())]
    finally:
        run.close()


def run_many(target: str, args, workdir: Path, context: dict) -> list[dict]:
    s = size("many", args)
    rate = offered_rate(s["chats"], args)
    run = Run("many", target, args, workdir)
    try:
        run.launch(run.spec("paced", run.tenant.chats(s["chats"]),
                            clients_per_chat=s["clients_per_chat"],
                            senders_per_chat=s["senders_per_chat"],
                            phases=[{"name": "many", "rate": rate,
                                     "duration_s": args.duration}],
                            drain_s=max(10, args.duration)))
        result = add_costs(run.measure_load())
        result["offered_per_s"] = rate
        if target == "ours":
            context["many_handled_per_s"] = result["messages_per_s"]
        return [result]
    finally:
        run.close()


def run_connect(target: str, args, workdir: Path, context: dict) -> list[dict]:
    s = size("connect", args)
    run = Run("connect", target, args, workdir)
    try:
        run.launch({**run.spec("idle", run.tenant.chats(s["chats"]),
                               clients_per_chat=s["clients_per_chat"]),
                    "connect_handshake": True, "connect_deadline_s": 120})
        run.expect("ready")
        pids = run.target.pids()[0]
        rss_before = rss_kb(pids)
        cpu_before, gen_before = run.cpu()
        run.start_profile()
        run.go()
        header = run.expect("connected")
        cpu_after, gen_after = run.cpu()
        run.stop_profile()
        time.sleep(1)
        rss_after = rss_kb(run.target.pids()[0])
        run.go()
        result = run.expect()
        connected = max(1, header["clients"])
        cpu = cpu_after[0] - cpu_before[0]
        result.update(run.labels(), server_cpu_s=round(cpu, 3),
                      loadgen_cpu_s=round(gen_after - gen_before, 3),
                      server_cpu_ms_per_connect=round(1000 * cpu / connected, 3),
                      server_kb_per_connection=round((rss_after - rss_before) / connected, 1),
                      server_rss_mb=round(rss_after / 1024, 1))
        return [result]
    finally:
        run.close()


def run_stream(target: str, args, workdir: Path, context: dict) -> list[dict]:
    """Ours twice (STREAM_FLUSH_MS 20, the default, and 0); the bare server once."""
    s = size("stream", args)
    variants = [("flush20", {"STREAM_FLUSH_MS": "20"}), ("flush0", {"STREAM_FLUSH_MS": "0"})] \
        if target == "ours" else [(None, {})]
    results = []
    for variant, env in variants:
        run = Run("stream", target, args, workdir, env, tag=f"-{variant}" if variant else "")
        try:
            chats = run.tenant.chats(s["chats"], agent=dict(ECHO, delay_ms=args.echo_delay_ms))
            run.launch(run.spec("stream", chats, clients_per_chat=s["clients_per_chat"],
                                words=s["words"], drain_s=60))
            result = run.measure_load()
        finally:
            run.close()
        result["variant"] = variant
        result["server_cpu_ms_per_1000_token_events"] = per_1000(result["server_cpu_s"],
                                                                 result["token_events"])
        result["server_cpu_ms_per_1000_words"] = per_1000(result["server_cpu_s"],
                                                          result["token_words"])
        results.append(result)
    return results


def run_overload(target: str, args, workdir: Path, context: dict) -> list[dict]:
    """Twice what ours handled in `many` (or twice --rate), then a phase at half of that."""
    s = size("overload", args)
    handled = context.get("many_handled_per_s") or offered_rate(s["chats"], args)
    burst, recovery = 2 * handled, handled / 2
    run = Run("overload", target, args, workdir)
    try:
        run.launch(run.spec("paced", run.tenant.chats(s["chats"]),
                            clients_per_chat=s["clients_per_chat"],
                            senders_per_chat=s["senders_per_chat"],
                            report_acked_ids=run.target.ours, drain_s=30,
                            phases=[{"name": "burst", "rate": burst,
                                     "duration_s": args.duration},
                                    {"name": "recovery", "rate": recovery,
                                     "duration_s": args.recovery_duration}]))
        result = add_costs(run.measure_load())
        result["offered_per_s"] = {"burst": burst, "recovery": recovery}
        acked_ids = result.pop("acked_ids", None)
        if acked_ids is not None:
            result["acked_checked_in_history"] = sum(len(ids) for ids in acked_ids.values())
            result["acked_missing_from_history"] = missing_from_history(run, acked_ids)
        return [result]
    finally:
        run.close()


def missing_from_history(run: Run, acked_ids: dict) -> int:
    """How many acknowledged messages GET /api/v1/chats/<id>/messages does not list."""
    missing = 0
    for index, ids in acked_ids.items():
        chat_id = run.sent_spec["chats"][int(index)]["auth"]["chat_id"]
        stored = run.tenant.history_ids(chat_id)
        missing += len(set(ids) - stored)
    return missing


RUNNERS = {"busy": run_busy, "many": run_many, "connect": run_connect, "stream": run_stream,
           "overload": run_overload}
