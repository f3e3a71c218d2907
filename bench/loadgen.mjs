// The load generator of `make bench`: socket.io-client 4.x clients in chats, senders at a rate.
//
//   node bench/loadgen.mjs '<spec as JSON>'
//
// spec: {url, kind: "ours" | "bare", chats: [{auth: {...}}], clients_per_chat, senders_per_chat,
//        messages_per_sender, rate_per_chat (messages/s per chat; 0 = each sender sends its next
//        message as soon as the previous one is acknowledged), idle (connect and hold only),
//        connect_concurrency, drain_s, handshake (wait for "go" on stdin before sending)}
//
// "ours" clients connect to /chat with the chat's auth ({chat_id, connection_string}) and send
// `message` with the message string of connection_established, then each ack's
// next_message_string; "bare" clients connect with {chat_id} and send {content, chat_id}.
// Every client records each `message_received`: latency is measured from the time a message was
// due to be sent (so a server that falls behind shows it), loss and duplicates per receiver.
//
// With handshake, it prints {"phase": "connected", ...} once every client is connected, waits for
// a line on stdin (the runner reads the server's CPU and memory meanwhile), runs, and prints the
// result as one JSON line. Idle runs print "connected", wait for a line, then disconnect.
import { io } from "socket.io-client";
import { createInterface } from "node:readline";
import { performance } from "node:perf_hooks";

const spec = JSON.parse(process.argv[2]);
const ours = spec.kind === "ours";
const clientsPerChat = spec.clients_per_chat;
const sendersPerChat = spec.idle ? 0 : spec.senders_per_chat;
const perSender = spec.messages_per_sender || 0;
const ratePerChat = spec.rate_per_chat || 0;
const drainMs = (spec.drain_s ?? 10) * 1000;

const stdinLines = [];
let stdinWaiter = null;
if (spec.handshake) {
  createInterface({ input: process.stdin }).on("line", (line) => {
    if (stdinWaiter) { const w = stdinWaiter; stdinWaiter = null; w(line); }
    else stdinLines.push(line);
  });
}
const nextLine = () => new Promise((resolve) => {
  if (stdinLines.length) resolve(stdinLines.shift()); else stdinWaiter = resolve;
});

function percentile(sorted, p) {
  if (!sorted.length) return null;
  const i = Math.min(sorted.length - 1, Math.ceil((p / 100) * sorted.length) - 1);
  return Math.round(sorted[Math.max(0, i)] * 100) / 100;
}

function summary(values) {
  const sorted = Float64Array.from(values).sort();
  return { p50: percentile(sorted, 50), p90: percentile(sorted, 90), p99: percentile(sorted, 99),
           max: sorted.length ? Math.round(sorted[sorted.length - 1] * 100) / 100 : null };
}

// --- clients -----------------------------------------------------------------------------

const clients = [];          // {socket, chat, index, messageString, seen: Map(sender -> Set)}
const latencies = [];
const ackLatencies = [];
const errors = {};
let deliveries = 0, duplicated = 0, outOfOrder = 0, unexpected = 0, lastDelivery = 0;
let connectFailures = 0, notAttempted = 0, disconnectsDuringRun = 0, running = false;

function onDelivery(client, message) {
  const parts = typeof message?.content === "string" ? message.content.split(":") : [];
  if (parts[0] !== "m" || parts.length !== 5 || Number(parts[1]) !== client.chat) {
    unexpected++;
    return;
  }
  const now = performance.now();
  const sender = Number(parts[2]), seq = Number(parts[3]);
  let seen = client.seen.get(sender);
  if (!seen) { seen = { set: new Set(), last: -1 }; client.seen.set(sender, seen); }
  if (seen.set.has(seq)) { duplicated++; return; }
  seen.set.add(seq);
  if (seq < seen.last) outOfOrder++;
  seen.last = Math.max(seen.last, seq);
  deliveries++;
  lastDelivery = now;
  latencies.push(now - Number(parts[4]));
}

function connectOne(chat, index) {
  return new Promise((resolve) => {
    const auth = spec.chats[chat].auth;
    const socket = io(spec.url + "/chat", {
      transports: ["websocket"], auth, reconnection: false, forceNew: true,
      timeout: (spec.connect_timeout_s || 10) * 1000,
    });
    const client = { socket, chat, index, messageString: null, seen: new Map() };
    let settled = false;
    const done = (ok) => { if (!settled) { settled = true; resolve(ok ? client : null); } };
    socket.on("message_received", (m) => onDelivery(client, m));
    socket.on("connect_error", (err) => {
      connectFailures++;
      errors[`connect:${err?.data?.code || err.message}`] =
        (errors[`connect:${err?.data?.code || err.message}`] || 0) + 1;
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
      const client = await connectOne(chat, i);
      if (client) clients.push(client);
    }
  }
  await Promise.all(Array.from({ length: Math.min(concurrency, jobs.length) }, worker));
}

// --- senders -----------------------------------------------------------------------------

function emitWithAck(socket, event, payload) {
  return new Promise((resolve) => socket.emit(event, payload, (ack) => resolve(ack)));
}

const acked = new Map();  // chat -> acknowledged messages
let sent = 0, late = 0;

async function runSender(client, senderIndex, start) {
  // Paced: message k is due at start + phase + k * interval; a sender still waiting for the
  // previous ack sends as soon as it comes (counted as late), and latency counts from "due".
  const interval = ratePerChat > 0 ? (1000 * sendersPerChat) / ratePerChat : 0;
  const phase = interval ? (interval * senderIndex) / sendersPerChat : 0;
  for (let seq = 0; seq < perSender; seq++) {
    let due = performance.now();
    if (interval) {
      due = start + phase + seq * interval;
      const wait = due - performance.now();
      if (wait > 0) await new Promise((r) => setTimeout(r, wait));
      else if (wait < -interval) late++;
    }
    const content = `m:${client.chat}:${senderIndex}:${seq}:${due}`;
    const payload = ours
      ? { content, message_string: client.messageString,
          client_message_id: `${client.chat}-${senderIndex}-${seq}` }
      : { content, chat_id: spec.chats[client.chat].auth.chat_id };
    const sentAt = performance.now();
    sent++;
    const ack = await emitWithAck(client.socket, "message", payload);
    ackLatencies.push(performance.now() - sentAt);
    if (ack && ack.ok) {
      acked.set(client.chat, (acked.get(client.chat) || 0) + 1);
      if (ours) client.messageString = ack.next_message_string;
    } else {
      const code = ack?.error?.code || "no_ack";
      errors[code] = (errors[code] || 0) + 1;
      if (ours) {
        const fresh = await emitWithAck(client.socket, "get_message_string", {});
        client.messageString = fresh?.message_string;
      }
    }
  }
}

function membersOf(chat) {
  return clients.filter((c) => c.chat === chat).length;
}

async function main() {
  const t0 = performance.now();
  await connectAll();
  const connectS = (performance.now() - t0) / 1000;
  const header = { phase: "connected", clients: clients.length,
                   connect_failures: connectFailures + notAttempted,
                   connect_s: Math.round(connectS * 100) / 100 };
  if (spec.handshake) {
    console.log(JSON.stringify(header));
    await nextLine();
  }
  let result = { kind: spec.kind, scenario: spec.scenario, chats: spec.chats.length,
                 clients: clients.length, connect_failures: connectFailures + notAttempted,
                 connect_s: header.connect_s };
  if (!spec.idle) {
    running = true;
    const start = performance.now();
    const senders = [];
    for (let chat = 0; chat < spec.chats.length; chat++) {
      const members = clients.filter((c) => c.chat === chat);
      members.slice(0, sendersPerChat).forEach((c, i) => senders.push(runSender(c, i, start)));
    }
    await Promise.all(senders);
    const lastAck = performance.now();
    let expected = 0;
    for (const [chat, count] of acked) expected += count * membersOf(chat);
    const deadline = lastAck + drainMs;
    while (deliveries < expected && performance.now() < deadline)
      await new Promise((r) => setTimeout(r, 5));
    running = false;
    const end = Math.max(lastDelivery, lastAck);
    const seconds = (end - start) / 1000;
    const ackedTotal = [...acked.values()].reduce((a, b) => a + b, 0);
    result = { ...result, sent, acked: ackedTotal, errors, late_sends: late,
               expected_deliveries: expected, deliveries, lost: Math.max(0, expected - deliveries),
               duplicated, out_of_order: outOfOrder, unexpected,
               disconnects_during_run: disconnectsDuringRun,
               duration_s: Math.round(seconds * 1000) / 1000,
               messages_per_s: Math.round(ackedTotal / seconds),
               deliveries_per_s: Math.round(deliveries / seconds),
               latency_ms: summary(latencies), ack_latency_ms: summary(ackLatencies) };
  } else {
    result.errors = errors;
  }
  for (const c of clients) c.socket.close();
  console.log(JSON.stringify(result));
  process.exit(0);
}

main().catch((err) => {
  console.error(err);
  process.exit(1);
});
