// The load generator of `make bench`: socket.io-client 4.x clients in chats, senders at a rate.
//
//   node bench/loadgen.mjs '<spec as JSON>'
//
// spec: {url, kind: "ours" | "bare", scenario, chats: [{auth: {...}, url?}], clients_per_chat,
//        senders_per_chat, mode, connect_concurrency, drain_s, ack_timeout_s (2),
//        idle_clients: [{url, auth}] (one more client each, in chats of their own, held idle),
//        report_acked_ids (ours: the id of every acknowledged message, per chat)}
// mode:
//   "closed"  each sender sends messages_per_sender messages, the next as soon as the previous
//             one is acknowledged (the most deliveries per second the server manages)
//   "paced"   phases: [{name, rate (messages/s offered over all chats), duration_s}], one after
//             the other; message k of a sender is due at a fixed time, a sender still waiting
//             for an ack sends as soon as it comes (latency counts from "due"), and a message
//             whose due time is past its phase's end is not sent (counted as not_sent)
//   "stream"  the first client of each chat sends one message of `words` words; counts the
//             message_stream_token events (and the words in them) every client receives until
//             every client has its message_stream_ended
//   "idle"    connect and hold
//
// "ours" clients connect to /chat with the chat's auth ({chat_id, connection_string}) and send
// `message` with the message string of connection_established, then each ack's
// next_message_string; "bare" clients connect with {chat_id} and send {content, chat_id}
// (stream: true asks the bare server to stream the words back). Every client records each
// `message_received`: latency from the time the message was due, loss and duplicates.
// A refused sender waits the refusal's details.retry_after before its next message, as the
// contract asks of clients (section 9), and keeps its message string after server_busy.
//
// Handshakes on stdin (the runner reads the server's CPU and memory between them): with
// connect_handshake it prints {"phase": "ready"} and waits for a line before connecting; with
// handshake it prints {"phase": "connected", ...} once every client is connected and waits for
// a line before sending (idle: before disconnecting). The result is one JSON line.
import { io } from "socket.io-client";
import { createInterface } from "node:readline";
import { performance } from "node:perf_hooks";

const spec = JSON.parse(process.argv[2]);
const ours = spec.kind === "ours";
const mode = spec.mode || "closed";
const clientsPerChat = spec.clients_per_chat;
const sendersPerChat = mode === "idle" ? 0 : mode === "stream" ? 1 : spec.senders_per_chat;
const drainMs = (spec.drain_s ?? 10) * 1000;
const ackTimeoutMs = (spec.ack_timeout_s ?? 2) * 1000;

const stdinLines = [];
let stdinWaiter = null;
createInterface({ input: process.stdin }).on("line", (line) => {
  if (stdinWaiter) { const w = stdinWaiter; stdinWaiter = null; w(line); }
  else stdinLines.push(line);
});
const nextLine = () => new Promise((resolve) => {
  if (stdinLines.length) resolve(stdinLines.shift()); else stdinWaiter = resolve;
});
const sleep = (ms) => new Promise((r) => setTimeout(r, ms));
const round = (x, digits = 2) => Math.round(x * 10 ** digits) / 10 ** digits;

function percentile(sorted, p) {
  if (!sorted.length) return null;
  const i = Math.min(sorted.length - 1, Math.ceil((p / 100) * sorted.length) - 1);
  return round(sorted[Math.max(0, i)]);
}

function summary(values) {
  const sorted = Float64Array.from(values).sort();
  return { p50: percentile(sorted, 50), p90: percentile(sorted, 90), p99: percentile(sorted, 99),
           max: sorted.length ? round(sorted[sorted.length - 1]) : null };
}

// --- per-phase counters -------------------------------------------------------------------

const phases = (mode === "paced" ? spec.phases : [{ name: "run" }]).map((p) => ({
  ...p, sent: 0, acked: 0, acks_within_timeout: 0, acks_late: 0, unanswered: 0, not_sent: 0,
  refused: {}, deliveries: 0, latencies: [], ackLatencies: [],
}));

// --- clients -----------------------------------------------------------------------------

const clients = [];          // {socket, chat, index, messageString, seen: Map(sender -> ...)}
const idleClients = [];
const connectErrors = {};
let deliveries = 0, duplicated = 0, outOfOrder = 0, unexpected = 0, lastDelivery = 0;
let connectFailures = 0, notAttempted = 0, disconnectsDuringRun = 0, running = false;
let tokenEvents = 0, tokenWords = 0, streamEnds = 0, lastStreamEvent = 0;

// content: "m:<chat>:<sender>:<seq>:<due>:<phase>", then filler words in stream mode
function onDelivery(client, message) {
  const head = typeof message?.content === "string" ? message.content.split(" ", 1)[0] : "";
  const parts = head.split(":");
  if (parts[0] !== "m" || parts.length !== 6 || Number(parts[1]) !== client.chat) {
    unexpected++;
    return;
  }
  const now = performance.now();
  const sender = Number(parts[2]), seq = Number(parts[3]), phase = phases[Number(parts[5])];
  let seen = client.seen.get(sender);
  if (!seen) { seen = { set: new Set(), last: -1 }; client.seen.set(sender, seen); }
  if (seen.set.has(seq)) { duplicated++; return; }
  seen.set.add(seq);
  if (seq < seen.last) outOfOrder++;
  seen.last = Math.max(seen.last, seq);
  deliveries++;
  phase.deliveries++;
  lastDelivery = now;
  phase.latencies.push(now - Number(parts[4]));
}

function connectOne(chat, index, target) {
  return new Promise((resolve) => {
    const socket = io((target.url || spec.url) + "/chat", {
      transports: ["websocket"], auth: target.auth, reconnection: false, forceNew: true,
      timeout: (spec.connect_timeout_s || 10) * 1000,
    });
    const client = { socket, chat, index, messageString: null, seen: new Map() };
    let settled = false;
    const done = (ok) => { if (!settled) { settled = true; resolve(ok ? client : null); } };
    socket.on("message_received", (m) => onDelivery(client, m));
    socket.on("message_stream_token", (t) => {
      tokenEvents++;
      tokenWords += (String(t?.token ?? "").match(/\S+/g) || []).length;
      lastStreamEvent = performance.now();
    });
    socket.on("message_stream_ended", () => { streamEnds++; lastStreamEvent = performance.now(); });
    socket.on("connect_error", (err) => {
      connectFailures++;
      const key = `connect:${err?.data?.code || err.message}`;
      connectErrors[key] = (connectErrors[key] || 0) + 1;
      socket.close();
      done(false);
    });
    socket.on("disconnect", () => { if (running) disconnectsDuringRun++; });
    if (ours) {
      socket.on("connection_established", (data) => {
        client.messageString = data.message_string;
        done(true);
      });
    } else {
      socket.on("connect", () => done(true));
    }
  });
}

async function connectAll() {
  const jobs = [];
  for (let chat = 0; chat < spec.chats.length; chat++)
    for (let i = 0; i < clientsPerChat; i++) jobs.push([chat, i]);
  const concurrency = spec.connect_concurrency || 100;
  // A server that stops accepting (socketio.run's eventlet server holds at 1,024
  // connections) would otherwise keep the run waiting for every remaining client in turn.
  const deadline = performance.now() + (spec.connect_deadline_s || 60) * 1000;
  let next = 0;
  async function worker() {
    while (next < jobs.length) {
      const [chat, i] = jobs[next++];
      if (performance.now() > deadline) {
        notAttempted++;
        continue;
      }
      const client = await connectOne(chat, i, spec.chats[chat]);
      if (client) clients.push(client);
    }
  }
  await Promise.all(Array.from({ length: Math.min(concurrency, jobs.length) }, worker));
  for (const [i, target] of (spec.idle_clients || []).entries()) {
    const client = await connectOne(-1 - i, 0, target);
    if (client) idleClients.push(client); else throw new Error(`idle client ${i} refused`);
  }
}

// --- senders -----------------------------------------------------------------------------

let stopWaiting;
const stopped = new Promise((resolve) => { stopWaiting = resolve; });
const ackedIds = {};  // chat index -> ids of acknowledged messages (report_acked_ids)
const ackedPerChat = new Map();

// Resolves with the ack, or null when the run gives up waiting (after phases + drain_s).
function emitWithAck(socket, event, payload) {
  return Promise.race([new Promise((resolve) => socket.emit(event, payload, resolve)),
                       stopped.then(() => null)]);
}

async function send(client, senderIndex, seq, due, phaseIndex, extra = "") {
  const phase = phases[phaseIndex];
  const content = `m:${client.chat}:${senderIndex}:${seq}:${due}:${phaseIndex}${extra}`;
  const payload = ours
    ? { content, message_string: client.messageString,
        client_message_id: `${client.chat}-${senderIndex}-${phaseIndex}-${seq}` }
    : { content, chat_id: spec.chats[client.chat].auth.chat_id, stream: mode === "stream" };
  const sentAt = performance.now();
  phase.sent++;
  const ack = await emitWithAck(client.socket, "message", payload);
  if (ack === null) { phase.unanswered++; return false; }
  const took = performance.now() - sentAt;
  phase.ackLatencies.push(took);
  if (ack && ack.ok) {
    phase.acked++;
    if (took > ackTimeoutMs) phase.acks_late++; else phase.acks_within_timeout++;
    ackedPerChat.set(client.chat, (ackedPerChat.get(client.chat) || 0) + 1);
    if (spec.report_acked_ids) (ackedIds[client.chat] ||= []).push(String(ack.message.id));
    if (ours) client.messageString = ack.next_message_string;
    return true;
  }
  const code = ack?.error?.code || "no_ack";
  phase.refused[code] = (phase.refused[code] || 0) + 1;
  // a refused message string was not spent (server_busy is answered before any check), but
  // the other refusals spend it: ask for a new one after those
  if (ours && code !== "server_busy") {
    const fresh = await emitWithAck(client.socket, "get_message_string", {});
    if (fresh === null) return false;
    client.messageString = fresh?.message_string;
  }
  // as a client library does (CONTRACT.md section 9): wait retry_after before sending again
  const retryAfter = Number(ack?.error?.details?.retry_after);
  if (retryAfter > 0) await Promise.race([sleep(retryAfter * 1000), stopped]);
  return true;
}

async function runClosed(client, senderIndex) {
  for (let seq = 0; seq < spec.messages_per_sender; seq++)
    if (!(await send(client, senderIndex, seq, performance.now(), 0))) return;
}

// Sender `slot` of `slots` (all senders of all chats) spreads its due times over the interval.
async function runPaced(client, senderIndex, slot, slots, start) {
  let phaseStart = start, seq = 0;  // seq counts on across phases (duplicates are per seq)
  for (const [index, phase] of phases.entries()) {
    const interval = (1000 * slots) / phase.rate;
    const phaseEnd = phaseStart + phase.duration_s * 1000;
    let due = phaseStart + (interval * slot) / slots;
    for (; due < phaseEnd; seq++, due += interval) {
      const wait = due - performance.now();
      if (wait > 0) await sleep(wait);
      else if (performance.now() >= phaseEnd) { phase.not_sent++; continue; }
      if (!(await send(client, senderIndex, seq, due, index))) return;
    }
    phaseStart = phaseEnd;
  }
}

function membersOf(chat) {
  return clients.filter((c) => c.chat === chat).length;
}

function phaseReport(phase, seconds) {
  const { latencies, ackLatencies, ...counts } = phase;
  return { ...counts, messages_per_s: seconds ? Math.round(phase.acked / seconds) : null,
           latency_ms: summary(latencies), ack_latency_ms: summary(ackLatencies) };
}

async function runLoad() {
  running = true;
  const start = performance.now();
  const senders = [];
  const slots = spec.chats.length * sendersPerChat;
  for (let chat = 0; chat < spec.chats.length; chat++) {
    const members = clients.filter((c) => c.chat === chat).slice(0, sendersPerChat);
    members.forEach((c, i) => {
      if (mode === "closed") senders.push(runClosed(c, i));
      else if (mode === "paced")
        senders.push(runPaced(c, i, chat * sendersPerChat + i, slots, start));
      else senders.push(send(c, i, 0, performance.now(), 0, " w".repeat(spec.words - 1)));
    });
  }
  const phasesMs = mode === "paced" ? spec.phases.reduce((t, p) => t + p.duration_s * 1000, 0) : 0;
  const giveUp = setTimeout(stopWaiting, phasesMs + drainMs + (mode === "closed" ? 60000 : 0));
  await Promise.all(senders);
  const lastAck = performance.now();
  let expected = 0;
  for (const [chat, count] of ackedPerChat) expected += count * membersOf(chat);
  let expectedEnds = 0;
  if (mode === "stream") for (const chat of ackedPerChat.keys()) expectedEnds += membersOf(chat);
  const deadline = lastAck + drainMs;
  while ((deliveries < expected || streamEnds < expectedEnds) && performance.now() < deadline)
    await sleep(5);
  clearTimeout(giveUp);
  running = false;
  const end = Math.max(lastDelivery, lastAck, lastStreamEvent);
  const seconds = (end - start) / 1000;
  const total = (key) => phases.reduce((t, p) => t + p[key], 0);
  const refused = {};
  for (const p of phases)
    for (const [code, n] of Object.entries(p.refused)) refused[code] = (refused[code] || 0) + n;
  const result = {
    sent: total("sent"), acked: total("acked"), acks_within_timeout: total("acks_within_timeout"),
    acks_late: total("acks_late"), unanswered: total("unanswered"), not_sent: total("not_sent"),
    refused, expected_deliveries: expected, deliveries,
    lost: Math.max(0, expected - deliveries), duplicated, out_of_order: outOfOrder, unexpected,
    disconnects_during_run: disconnectsDuringRun, duration_s: round(seconds, 3),
    messages_per_s: Math.round(total("acked") / seconds),
    deliveries_per_s: Math.round(deliveries / seconds),
    latency_ms: summary(phases.flatMap((p) => p.latencies)),
    ack_latency_ms: summary(phases.flatMap((p) => p.ackLatencies)),
  };
  if (mode === "paced") {
    result.phases = phases.map((p) => phaseReport(p, p.duration_s));
  }
  if (mode === "stream") {
    Object.assign(result, {
      stream_ends: streamEnds, expected_stream_ends: expectedEnds, token_events: tokenEvents,
      token_words: tokenWords, token_events_per_s: Math.round(tokenEvents / seconds),
      token_words_per_s: Math.round(tokenWords / seconds) });
  }
  if (spec.report_acked_ids) result.acked_ids = ackedIds;
  return result;
}

async function main() {
  if (spec.connect_handshake) {
    console.log(JSON.stringify({ phase: "ready" }));
    await nextLine();
  }
  const t0 = performance.now();
  await connectAll();
  const connectS = round((performance.now() - t0) / 1000);
  const header = { phase: "connected", clients: clients.length, idle_clients: idleClients.length,
                   connect_failures: connectFailures + notAttempted, connect_s: connectS };
  console.log(JSON.stringify(header));
  await nextLine();
  let result = { kind: spec.kind, scenario: spec.scenario, chats: spec.chats.length,
                 clients: clients.length, connect_failures: connectFailures + notAttempted,
                 connect_errors: connectErrors, connect_s: connectS };
  if (mode !== "idle") result = { ...result, ...(await runLoad()) };
  for (const c of [...clients, ...idleClients]) c.socket.close();
  // process.exit() right after a write to a pipe cuts the output at 64 KB (the overload
  // scenario's acknowledged ids are more): exit once the line is flushed
  process.stdout.write(JSON.stringify(result) + "\n", () => process.exit(0));
}

main().catch((err) => {
  console.error(err);
  process.exit(1);
});
