// End-to-end check of workspace-chat-client against a real server, driven by
// tests/test_js_client.py: node e2e.mjs '{"url", "api_key", "chat_id", "scenario"}'.
// Prints one JSON line with what happened; the Python test asserts on it. Exits 1 on a crash.
import { ChatClient, ChatError, compareIds } from "../src/index.js";

const config = JSON.parse(process.argv[2]);
const guard = setTimeout(() => { console.log(JSON.stringify({ fatal: "timeout" })); process.exit(1); }, 60000);

// What a browser's own backend does: it holds the API key and hands out connection strings.
async function connectionStringFor(userId, chatId) {
  const response = await fetch(`${config.url}/api/v1/chats/${chatId}/connection-string`, {
    method: "POST",
    headers: { "X-API-Key": config.api_key, "Content-Type": "application/json" },
    body: JSON.stringify({ user_id: userId }),
  });
  const body = await response.json();
  if (!response.ok) throw new ChatError(body.error.code, body.error.message);
  return body.connection_string;
}

function client(userId, counter) {
  return new ChatClient(config.url, {
    transports: config.transports || ["websocket"],
    getConnectionString: (chatId) => { counter && counter.count++; return connectionStringFor(userId, chatId); },
    ackTimeout: 10000,
  });
}

function until(emitter, event, predicate = () => true, ms = 15000) {
  return new Promise((resolve, reject) => {
    const timer = setTimeout(() => { off(); reject(new Error(`no ${event} in ${ms} ms`)); }, ms);
    const off = emitter.on(event, (data) => {
      if (predicate(data)) { clearTimeout(timer); off(); resolve(data); }
    });
  });
}

async function sendAndWaitForReply(sender, text) {
  const ended = until(sender, "streamEnd");
  const message = await sender.send(text);
  await ended;
  return message;
}

async function codeOf(promise) {
  try {
    await promise;
    return null;
  } catch (err) {
    return err instanceof ChatError ? err.code : `not a ChatError: ${err}`;
  }
}

async function basics() {
  const result = {};
  const ann = client("ann");
  const bob = client("bob");
  result.not_connected = await codeOf(ann.send("too early"));
  const established = await ann.connect(config.chat_id);
  result.session = ann.session;
  result.established_user = established.user_id;
  await bob.connect(config.chat_id);

  const tokens = [];
  ann.on("token", (data) => tokens.push(data));
  const bobTyping = until(ann, "typing");
  bob.typing(true);
  result.typing = await bobTyping;

  const ended = until(ann, "streamEnd");
  const started = until(ann, "streamStart");
  const message = await ann.send("hello there world");
  result.message = message;
  result.reply_pending_flag = ann.replyPending;
  result.second_send = await codeOf(ann.send("again"));
  const start = await started;
  result.stream_reply_to = start.reply_to;
  result.bob_send_while_streaming = await codeOf(bob.send("me too"));
  const end = await ended;
  result.stream_content = end.content;
  result.tokens_joined = tokens.filter((t) => t.message_id === end.message_id)
    .sort((a, b) => a.index - b.index).map((t) => t.token).join("");
  result.after_end_pending = ann.replyPending;
  result.after_end_send = (await sendAndWaitForReply(ann, "after the reply")).content;
  result.stop_when_idle = await ann.stopGeneration();

  // connect() while connected leaves first and updates the session.
  const firstSid = ann.session.sid;
  await ann.connect(config.chat_id);
  result.reconnected_sid_changed = ann.session.sid !== firstSid && ann.session.connected;
  result.bad_chat = await codeOf(client("ann").connect("no-such-chat"));
  ann.disconnect();
  bob.disconnect();
  result.disconnected = ann.session.connected;
  return result;
}

async function reconnect() {
  const result = {};
  const counter = { count: 0 };
  const ann = client("ann", counter);
  const bob = client("bob");
  await ann.connect(config.chat_id);
  await bob.connect(config.chat_id);
  const received = [];
  ann.on("message", (m) => received.push(m.id));
  const arrived = until(ann, "message", (m) => m.content === "before the drop");
  await sendAndWaitForReply(bob, "before the drop");
  await arrived;

  const dropped = until(ann, "disconnected");
  const back = until(ann, "connected", () => true, 20000);
  ann._socket.io.engine.close();  // the network drops under the client
  result.disconnect_reason = await dropped;
  const sent = [];
  for (const text of ["one", "two", "three"]) {
    sent.push((await sendAndWaitForReply(bob, text)).id);
  }
  await back;
  await until(ann, "message", () => sent.every((id) => received.includes(id)), 15000)
    .catch(() => null);
  result.missed_replayed = sent.every((id) => received.includes(id));
  result.no_duplicates = new Set(received).size === received.length;
  result.in_order = received.every((id, i) => i === 0 || compareIds(received[i - 1], id) < 0);
  result.fresh_strings = counter.count;
  result.send_after_reconnect = (await ann.send("back again")).content;
  ann.disconnect();
  bob.disconnect();
  return result;
}

// The backend that hands out connection strings is down for a while during a reconnection:
// the client keeps trying, and is back once the backend is.
async function backendDown() {
  const result = { errors: [] };
  let failures = 0;
  const ann = new ChatClient(config.url, {
    transports: ["websocket"],
    getConnectionString: async (chatId) => {
      if (failures > 0) {
        failures -= 1;
        throw new Error("backend unavailable");
      }
      return connectionStringFor("ann", chatId);
    },
  });
  ann.on("error", (err) => result.errors.push(err.code));
  await ann.connect(config.chat_id);
  const back = until(ann, "connected", () => true, 30000);
  failures = 2;
  ann._socket.io.engine.close();
  await back;
  result.reconnected = ann.session.connected;
  result.failures_left = failures;
  result.sent = (await ann.send("after the outage")).content;
  ann.disconnect();
  return result;
}

const scenarios = { basics, reconnect, backendDown };
try {
  const result = await scenarios[config.scenario]();
  console.log(JSON.stringify(result));
  clearTimeout(guard);
  process.exit(0);
} catch (err) {
  console.log(JSON.stringify({ fatal: String(err && err.stack || err) }));
  process.exit(1);
}
