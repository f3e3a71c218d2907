// A socket.io-client 4.x client on the /chat namespace, driven by tests/test_realtime_node.py.
//
// Usage: node chat_client.mjs '<json config>'
//   config: {url, auth, transports?: ["websocket"] | ["polling"], messages?: ["text", ...],
//            expect?: {event: count}, ack_timeout_ms?: 10000, wait_ms?: 10000}
//   After sending, it waits (up to wait_ms) until its own messages came back as
//   message_received and it has received at least ``expect[event]`` of each listed event.
//
// Prints one JSON line per event received ({"event", "data"}), per ack ({"ack"}), then a final
// line ({"done": {...}}) and exits 0. A refused connection prints
// {"connect_error": {"message", "code"}} and exits 0. Anything unexpected exits 1.
import { io } from "socket.io-client";

const config = JSON.parse(process.argv[2] || "{}");
const ackTimeout = config.ack_timeout_ms ?? 10000;
const waitMs = config.wait_ms ?? 10000;

function out(line) {
  process.stdout.write(JSON.stringify(line) + "\n");
}

function finish(code, line) {
  if (line) out(line);
  // Let stdout drain before exiting.
  process.stdout.write("", () => process.exit(code));
}

const guard = setTimeout(() => finish(1, { fatal: "overall timeout" }),
  (config.overall_timeout_ms ?? 60000));
guard.unref();

const socket = io(config.url + "/chat", {
  auth: config.auth ?? {},
  transports: config.transports ?? ["websocket"],
  reconnection: false,
  timeout: 10000,
});

const received = [];         // [name, data] in arrival order
const waiters = [];          // [predicate, resolve]

function notify() {
  for (let i = waiters.length - 1; i >= 0; i--) {
    if (waiters[i][0]()) {
      waiters[i][1](true);
      waiters.splice(i, 1);
    }
  }
}

function waitUntil(predicate, ms) {
  if (predicate()) return Promise.resolve(true);
  return new Promise((resolve) => {
    const entry = [predicate, resolve];
    waiters.push(entry);
    setTimeout(() => {
      const index = waiters.indexOf(entry);
      if (index >= 0) {
        waiters.splice(index, 1);
        resolve(false);
      }
    }, ms);
  });
}

socket.onAny((event, ...args) => {
  const data = args.length === 1 ? args[0] : args;
  received.push([event, data]);
  out({ event, data });
  notify();
});

socket.on("connect_error", (err) => {
  finish(0, { connect_error: { message: err.message, code: err.data && err.data.code } });
});

socket.on("disconnect", (reason) => {
  out({ disconnect: reason });
});

async function run() {
  const established = await waitUntil(
    () => received.some(([name]) => name === "connection_established"), 10000);
  if (!established) return finish(1, { fatal: "no connection_established" });
  let messageString = received.find(([name]) => name === "connection_established")[1]
    .message_string;
  const acked = [];
  for (const content of config.messages ?? []) {
    let ack;
    try {
      ack = await socket.timeout(ackTimeout).emitWithAck("message", {
        content, message_string: messageString,
      });
    } catch (err) {
      return finish(1, { fatal: `no ack: ${err.message}` });
    }
    out({ ack });
    if (!ack || !ack.ok) break;
    acked.push(ack.message.id);
    messageString = ack.next_message_string;
  }
  // Wait for this client's own messages to come back as message_received, and for the
  // events the caller expects.
  const count = (event) => received.filter(([name]) => name === event).length;
  const ownBack = await waitUntil(() => acked.every((id) => received.some(
    ([name, data]) => name === "message_received" && data && data.id === id)), waitMs);
  const expected = await waitUntil(() => Object.entries(config.expect ?? {}).every(
    ([event, n]) => count(event) >= n), waitMs);
  socket.disconnect();
  finish(0, {
    done: { events: received.length, acked: acked.length, own_received: ownBack, expected },
  });
}

socket.on("connect", () => {
  out({ connect: { id: socket.id, transport: socket.io.engine.transport.name } });
});

run().catch((err) => finish(1, { fatal: String(err && err.stack || err) }));
