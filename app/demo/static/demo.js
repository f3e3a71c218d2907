/* Workspace Chat demo page: join with a name (and a room, to chat with others), then talk.
 *
 * The connection is the workspace-chat-client package (clients/js, served by the app): it
 * reconnects by itself with a fresh connection string and last_message_id, and its outbox
 * (client.queue) keeps what is sent while offline and sends it, once, when the connection is
 * back. Messages are Markdown, rendered by marked and sanitised by DOMPurify before they touch
 * the page; nothing a message says can run.
 */
import { ChatClient, compareIds } from "workspace-chat-client";
import { marked } from "marked";
import DOMPurify from "dompurify";

const TYPING_EVERY_MS = 2000;  // at most one typing event per this while the composer changes
const TYPING_IDLE_MS = 4000;   // after this without a change, "stopped typing"
const TYPING_SHOWN_MS = 6000;  // someone's "is typing" fades after this without news

// Words a person understands, for the contract's error codes.
const SEND_ERRORS = {
  rate_limited: "You are sending messages too quickly. Wait a moment, then try again.",
  validation_error: "Your message is empty or too long (at most 4000 characters).",
  message_string_expired: "Your message could not be sent. Please send it again.",
  message_string_reused: "Your message could not be sent. Please send it again.",
  invalid_message_string: "Your message could not be sent. Please send it again.",
  chat_mismatch: "Your message went to the wrong chat and was not sent. Reload the page and try again.",
  chat_not_found: "This chat no longer exists. Choose “Leave” and join again.",
  internal_error: "Something went wrong on the server. Please try again.",
};
const CONNECT_ERRORS = {
  invalid_connection_string: "Your session is no longer valid. Choose “Leave” and join again.",
  connection_string_expired: "Your session expired. Choose “Leave” and join again.",
  chat_not_found: "This chat no longer exists. Choose “Leave” and join again.",
  forbidden: "You are not allowed in this chat any more. Choose “Leave” and join again.",
  too_many_connections: "The demo is full right now. Please try again in a little while.",
  validation_error: "The page could not connect (its request was incomplete). Please reload the page.",
  invalid_api_key: "The demo is not set up correctly on the server.",
};
const STATUS_TEXT = {
  idle: "Not connected",
  connecting: "Connecting…",
  connected: "Connected",
  reconnecting: "Offline, reconnecting…",
  failed: "Not connected",
};

// Markdown a chat needs; no images (nothing may load from elsewhere), no raw HTML that acts.
const PURIFY = {
  ALLOWED_TAGS: ["p", "br", "strong", "em", "del", "s", "code", "pre", "blockquote", "ul", "ol",
    "li", "a", "h1", "h2", "h3", "h4", "h5", "h6", "hr", "table", "thead", "tbody", "tr", "th",
    "td", "span"],
  ALLOWED_ATTR: ["href", "title", "class", "start"],
  ALLOW_DATA_ATTR: false,
};
// Raw HTML in a message is shown as the text it is (people paste code); DOMPurify then removes
// whatever else could act, so the DOM never even parses an event handler.
const ESCAPES = { "&": "&amp;", "<": "&lt;", ">": "&gt;", '"': "&quot;", "'": "&#39;" };
const escapeHtml = (text) => String(text).replace(/[&<>"']/g, (c) => ESCAPES[c]);
marked.use({ renderer: { html: (token) => escapeHtml(token.text ?? token.raw ?? "") } });
DOMPurify.addHook("afterSanitizeAttributes", (node) => {
  if (node.tagName === "A") {
    node.setAttribute("target", "_blank");
    node.setAttribute("rel", "noopener noreferrer nofollow");
  }
});

const $ = (id) => document.getElementById(id);
const ui = {
  status: $("status"),
  join: $("join"), joinForm: $("join-form"), name: $("name"), room: $("room"),
  joinButton: $("join-button"), joinError: $("join-error"),
  chat: $("chat"), where: $("where"), who: $("who"), leave: $("leave-button"),
  offline: $("offline"), log: $("log"), typing: $("typing"), alert: $("alert"),
  messageForm: $("message-form"), message: $("message"), send: $("send-button"),
  stop: $("stop-button"),
};
const joinUrl = document.body.getAttribute("data-join-url") || "/demo/join";
const timeFormat = new Intl.DateTimeFormat(undefined, { hour: "2-digit", minute: "2-digit" });

let session = null;  // the person's seat, client and what the log shows

// --- small helpers --------------------------------------------------------------------------

function setStatus(state, text) {
  ui.status.setAttribute("data-state", state);
  ui.status.textContent = text || STATUS_TEXT[state];
}

function showAlert(text) { ui.alert.textContent = text || ""; }

function newId() {
  if (globalThis.crypto && typeof crypto.randomUUID === "function") return crypto.randomUUID();
  return `${Date.now().toString(36)}-${Math.random().toString(36).slice(2, 12)}`;
}

async function requestSeat(name, room) {
  let response;
  try {
    response = await fetch(joinUrl, {
      method: "POST",
      headers: { "Content-Type": "application/json", Accept: "application/json" },
      credentials: "same-origin",
      body: JSON.stringify(room ? { name, room } : { name }),
    });
  } catch (err) {
    throw Object.assign(new Error("Could not reach the server."), { code: null });
  }
  const body = await response.json().catch(() => null);
  if (!response.ok || !body || !body.chat_id) {
    const error = (body && body.error) || {};
    throw Object.assign(new Error(error.message || `The server answered ${response.status}.`),
      { code: error.code || `http_${response.status}` });
  }
  return body;
}

function joinErrorText(err) {
  if (err && err.code === "validation_error") return err.message || "Please type your name.";
  if (err && err.code && !err.code.startsWith("http_") && err.message) {
    return `Could not join: ${err.message}`;
  }
  if (err && err.code) return "The server could not let you join right now. Please try again.";
  return "Could not reach the server. Check your connection and try again.";
}

function renderMarkdown(element, content) {
  element.innerHTML = DOMPurify.sanitize(marked.parse(content || "", { gfm: true, breaks: true,
    async: false }), PURIFY);
}

// --- who is who -----------------------------------------------------------------------------

function nameOf(userId) {
  const known = session.people[userId];
  if (known) return known;
  refreshPeopleSoon();
  // "ann-browser-1a2b3c4d5e" -> "ann browser" until the seat tells the typed name
  return (userId || "someone").replace(/-[0-9a-f]{10}$/, "").replace(/-/g, " ");
}

function speaker(role, userId) {
  if (role === "agent") return "Echo bot";
  if (role === "system") return "System";
  if (userId === session.userId) return "You";
  return nameOf(userId);
}

// Someone new spoke: ask for the seat again, which answers with everyone's typed name.
function refreshPeopleSoon() {
  const own = session;
  if (own.peopleRefresh) return;
  own.peopleRefresh = setTimeout(async () => {
    try {
      const seat = await requestSeat(own.name, own.room);
      if (session !== own || seat.chat_id !== own.chatId) return;
      own.people = seat.people || own.people;
      for (const node of ui.log.querySelectorAll(".msg.other")) {
        node.querySelector(".who").textContent = speaker("user", node.dataset.userId);
      }
      showTyping();
    } catch (err) { /* the fallback names stay */ } finally {
      setTimeout(() => { if (own.peopleRefresh) own.peopleRefresh = null; }, 5000);
    }
  }, 300);
}

// --- the conversation -----------------------------------------------------------------------

function nearBottom() {
  return ui.log.scrollHeight - ui.log.scrollTop - ui.log.clientHeight < 80;
}

function keepScrolled(wasNearBottom) {
  if (wasNearBottom) ui.log.scrollTop = ui.log.scrollHeight;
}

function kindOf(role, userId) {
  if (role !== "user") return role;
  return userId === session.userId ? "user mine" : "user other";
}

function newBubble(role, userId, createdAt) {
  const node = document.createElement("article");
  node.className = `msg ${kindOf(role, userId)}`;
  if (userId) node.dataset.userId = userId;
  const head = document.createElement("header");
  head.className = "meta";
  const who = document.createElement("span");
  who.className = "who";
  who.textContent = speaker(role, userId);
  const when = document.createElement("time");
  const at = createdAt ? new Date(createdAt) : new Date();
  when.dateTime = at.toISOString();
  when.textContent = timeFormat.format(at);
  when.title = at.toLocaleString();
  head.append(who, when);
  const text = document.createElement("div");
  text.className = "text";
  node.append(head, text);
  return node;
}

// Stored messages in id order; pending ones (no id yet) always after them.
function place(node, id) {
  let before = null;
  for (const other of ui.log.children) {
    const otherId = other.dataset.messageId;
    if (other.classList.contains("pending") || (otherId && compareIds(otherId, id) > 0)) {
      before = other;
      break;
    }
  }
  if (node.nextSibling !== before || node.parentNode !== ui.log) ui.log.insertBefore(node, before);
}

function bubble(id, role, userId, createdAt) {
  let node = session.nodes[id];
  if (node) return node;
  node = newBubble(role, userId, createdAt);
  node.dataset.messageId = id;
  session.nodes[id] = node;
  place(node, id);
  return node;
}

function note(node, text) {
  let el = node.querySelector(".note");
  if (!el) {
    el = document.createElement("p");
    el.className = "note";
    node.append(el);
  }
  el.textContent = text;
}

function systemLine(text) {
  const was = nearBottom();
  const line = document.createElement("p");
  line.className = "sys";
  line.textContent = text;
  ui.log.append(line);
  keepScrolled(was);
}

function showMessage(message) {
  const was = nearBottom();
  const pending = message.client_message_id && session.pending[message.client_message_id];
  let node = session.nodes[message.id];
  if (pending && !node) {
    // our own message, queued while offline (or while a reply streamed): now it is stored
    node = pending;
    node.classList.remove("pending");
    node.querySelector(".note")?.remove();
    node.dataset.messageId = message.id;
    const when = node.querySelector("time");
    const at = new Date(message.created_at);
    when.dateTime = at.toISOString();
    when.textContent = timeFormat.format(at);
    session.nodes[message.id] = node;
    place(node, message.id);
  } else if (pending) {
    pending.remove();
  }
  if (message.client_message_id) delete session.pending[message.client_message_id];
  node = bubble(message.id, message.role, message.user_id, message.created_at);
  if (message.role !== "agent" || !session.streams[message.id]) {
    renderMarkdown(node.querySelector(".text"), message.content);
    node.removeAttribute("aria-busy");
    delete session.streams[message.id];
  }
  if (message.role === "user" && message.user_id !== session.userId) stoppedTyping(message.user_id);
  updateStop();
  keepScrolled(was);
}

function showPending(clientMessageId, content) {
  const node = newBubble("user", session.userId, null);
  node.classList.add("pending");
  node.dataset.clientMessageId = clientMessageId;
  renderMarkdown(node.querySelector(".text"), content);
  note(node, "sending…");
  session.pending[clientMessageId] = node;
  ui.log.append(node);
  keepScrolled(true);  // one's own message is always brought into view
}

function streamStarted(data) {
  const was = nearBottom();
  const node = bubble(data.message_id, "agent", null, null);
  node.setAttribute("aria-busy", "true");  // screen readers read it once, when it is done
  // A client that joins mid-stream gets content_so_far, then the tokens after it.
  const stream = { node, text: data.content_so_far || "", tokens: 0,
    next: data.content_so_far ? null : 0 };
  session.streams[data.message_id] = stream;
  renderMarkdown(node.querySelector(".text"), stream.text);
  node.dataset.tokens = "0";
  updateStop();
  keepScrolled(was);
}

function streamToken(data) {
  const stream = session.streams[data.message_id];
  if (!stream) return;  // a stream that started before we joined and was not resumed
  if (stream.next !== null && data.index < stream.next) return;  // already shown
  const was = nearBottom();
  stream.text += data.token;
  stream.tokens += 1;
  stream.next = data.index + 1;
  renderMarkdown(stream.node.querySelector(".text"), stream.text);
  stream.node.dataset.tokens = String(stream.tokens);
  keepScrolled(was);
}

function streamEnded(data) {
  const was = nearBottom();
  const node = bubble(data.message_id, "agent", null, null);
  renderMarkdown(node.querySelector(".text"), data.content);
  node.removeAttribute("aria-busy");
  if (data.finish_reason === "cancelled") note(node, "Stopped");
  else if (data.finish_reason === "error") note(node, "The echo bot ran into a problem");
  else if (data.finish_reason === "timeout") note(node, "The echo bot took too long");
  node.dataset.finish = data.finish_reason;
  delete session.streams[data.message_id];
  updateStop();
  keepScrolled(was);
}

function updateStop() {
  const streaming = Boolean(session) && Object.keys(session.streams).length > 0;
  if (!streaming && document.activeElement === ui.stop) ui.message.focus();
  ui.stop.hidden = !streaming;
}

// --- typing ---------------------------------------------------------------------------------

function showTyping() {
  if (!session) { ui.typing.textContent = ""; return; }
  const names = Object.keys(session.typers).map(nameOf);
  ui.typing.textContent = names.length === 0 ? ""
    : names.length === 1 ? `${names[0]} is typing…`
      : names.length === 2 ? `${names[0]} and ${names[1]} are typing…`
        : "Several people are typing…";
}

function stoppedTyping(userId) {
  if (!session.typers[userId]) return;
  clearTimeout(session.typers[userId]);
  delete session.typers[userId];
  showTyping();
}

function someoneTyping(data) {
  if (!data || data.user_id === session.userId) return;
  if (!data.is_typing) { stoppedTyping(data.user_id); return; }
  clearTimeout(session.typers[data.user_id]);
  const own = session;
  session.typers[data.user_id] = setTimeout(() => {
    if (session === own) stoppedTyping(data.user_id);
  }, TYPING_SHOWN_MS);
  showTyping();
}

function tellTyping(isTyping) {
  const own = session;
  if (!own || !own.client.session.connected) return;
  try { own.client.typing(isTyping); } catch (err) { return; }
  own.typingSentAt = isTyping ? Date.now() : 0;
}

function onComposerInput() {
  const own = session;
  if (!own) return;
  clearTimeout(own.typingIdle);
  if (!ui.message.value.trim()) {
    if (own.typingSentAt) tellTyping(false);
    return;
  }
  if (Date.now() - own.typingSentAt > TYPING_EVERY_MS) tellTyping(true);
  own.typingIdle = setTimeout(() => {
    if (session === own && own.typingSentAt) tellTyping(false);
  }, TYPING_IDLE_MS);
}

// --- the connection -------------------------------------------------------------------------

function setOffline(offline) {
  ui.offline.hidden = !offline;
}

function connect(own, firstSeat) {
  let seat = firstSeat;
  const client = new ChatClient(window.location.origin, {
    // The connection string lives 300 s, so every reconnect asks the server for a fresh one.
    getConnectionString: async () => {
      if (seat) { own.connectionString = seat.connection_string; seat = null; }
      else {
        try {
          const fresh = await requestSeat(own.name, own.room);
          own.people = fresh.people || own.people;
          own.connectionString = fresh.connection_string;
        } catch (err) {
          // The server is not answering yet: try the string we have. If it has expired the
          // server says connection_string_expired and the client tries again; failing here
          // would send no credentials at all, a refusal the client does not retry.
        }
      }
      return own.connectionString;
    },
    reconnectDelayMax: 4000,
  });
  own.client = client;
  const current = (handler) => (data) => { if (session === own) handler(data); };

  client.on("connected", current((data) => {
    own.everConnected = true;
    setStatus("connected");
    setOffline(false);
    ui.send.disabled = false;
    if (data.history_truncated) systemLine("Older messages are not shown.");
    if (ui.alert.dataset.kind === "connection") {
      showAlert("");
      delete ui.alert.dataset.kind;
    }
  }));
  client.on("message", current(showMessage));
  client.on("streamStart", current(streamStarted));
  client.on("token", current(streamToken));
  client.on("streamEnd", current(streamEnded));
  client.on("typing", current(someoneTyping));
  client.on("disconnected", current(() => {
    own.streams = {};  // a stream cut off here is resumed (content_so_far) or replayed
    for (const userId of Object.keys(own.typers)) stoppedTyping(userId);
    updateStop();
    setStatus("reconnecting");
    if (own.everConnected) setOffline(true);
  }));
  client.on("reconnecting", current(() => {
    setStatus("reconnecting");
    if (own.everConnected) setOffline(true);
  }));
  client.on("chatDeleted", current(() => {
    setStatus("failed", "Disconnected");
    setOffline(false);
    showAlert("This chat was deleted. Choose “Leave” and join again to start a new one.");
  }));
  client.on("error", current((error) => {
    if (error.code === "agent_error") {
      showAlert("The echo bot could not finish its reply. You can send another message.");
    } else if (CONNECT_ERRORS[error.code] && !client.session.connected) {
      // a refusal that reconnecting cannot mend: the client has stopped
      ui.alert.dataset.kind = "connection";
      showAlert(CONNECT_ERRORS[error.code]);
      setOffline(false);
      setStatus("failed");
    }
  }));

  setStatus("connecting");
  // lastMessageId 0: the server replays this chat's history on connect
  client.connect(own.chatId, { lastMessageId: "0" }).catch(current((err) => {
    ui.alert.dataset.kind = "connection";
    showAlert(CONNECT_ERRORS[err.code] || `Could not connect: ${err.message || "unknown error"}.`);
    setStatus("failed");
  }));
}

// --- sending --------------------------------------------------------------------------------

function onSend(event) {
  event.preventDefault();
  const own = session;
  if (!own || !own.everConnected) return;  // the button is disabled until first connected
  const content = ui.message.value.trim();
  if (!content) {
    showAlert("Type a message first.");
    ui.message.focus();
    return;
  }
  if (content.length > 4000) {
    showAlert("Your message is too long (at most 4000 characters).");
    return;
  }
  showAlert("");
  clearTimeout(own.typingIdle);
  if (own.typingSentAt) tellTyping(false);
  const clientMessageId = newId();  // the outbox sends it under this id, so it is stored once
  showPending(clientMessageId, content);
  ui.message.value = "";
  ui.message.focus();
  own.client.queue(content, { clientMessageId }).then((message) => {
    if (session === own) showMessage(message);
  }, (err) => {
    if (session !== own) return;
    own.pending[clientMessageId]?.remove();
    delete own.pending[clientMessageId];
    if (!ui.message.value.trim()) ui.message.value = content;  // kept, to send again
    let text = SEND_ERRORS[err.code] || `Your message was not sent: ${err.message || "unknown error"}.`;
    if (err.code === "rate_limited" && err.details && err.details.retry_after) {
      text += ` (about ${Math.max(1, Math.ceil(err.details.retry_after))} s)`;
    }
    showAlert(text);
    ui.message.focus();
  });
}

// --- joining and leaving --------------------------------------------------------------------

async function onJoin(event) {
  event.preventDefault();
  const name = ui.name.value.trim();
  const room = ui.room.value.trim();
  ui.joinError.textContent = "";
  if (!name) {
    ui.joinError.textContent = "Please type your name.";
    ui.name.focus();
    return;
  }
  ui.joinButton.disabled = true;
  setStatus("connecting", "Joining…");
  try {
    const seat = await requestSeat(name, room);
    session = {
      name: seat.name, room: seat.room, userId: seat.user_id, chatId: seat.chat_id,
      people: seat.people || {}, client: null, everConnected: false,
      nodes: {}, pending: {}, streams: {}, typers: {}, typingSentAt: 0, typingIdle: null,
      peopleRefresh: null,
    };
    ui.log.textContent = "";
    ui.typing.textContent = "";
    showAlert("");
    setOffline(false);
    ui.who.textContent = seat.name;
    ui.where.textContent = seat.room ? `Room “${seat.room}”` : "Your chat";
    ui.join.hidden = true;
    ui.chat.hidden = false;
    ui.send.disabled = true;  // until the first connection_established
    ui.message.focus();
    connect(session, seat);
  } catch (err) {
    setStatus("idle");
    ui.joinError.textContent = joinErrorText(err);
    ui.name.focus();
  } finally {
    ui.joinButton.disabled = false;
  }
}

function onLeave() {
  const own = session;
  session = null;
  if (own) {
    for (const timer of Object.values(own.typers)) clearTimeout(timer);
    clearTimeout(own.typingIdle);
    if (own.client) own.client.disconnect();
  }
  ui.log.textContent = "";
  ui.typing.textContent = "";
  showAlert("");
  setOffline(false);
  ui.send.disabled = true;
  ui.stop.hidden = true;
  ui.chat.hidden = true;
  ui.join.hidden = false;
  setStatus("idle");
  ui.name.focus();
  ui.name.select();
}

function onStop() {
  if (!session || !session.client.session.connected) return;
  session.client.stopGeneration().catch(() => { /* the stream ends anyway */ });
  ui.message.focus();
}

// The log stays at its newest message while the person has not scrolled up, also when it
// shrinks (the offline banner appears, the composer grows).
let pinned = true;
ui.log.addEventListener("scroll", () => { pinned = nearBottom(); });
new ResizeObserver(() => { if (pinned) ui.log.scrollTop = ui.log.scrollHeight; }).observe(ui.log);

ui.joinForm.addEventListener("submit", onJoin);
ui.messageForm.addEventListener("submit", onSend);
ui.message.addEventListener("input", onComposerInput);
ui.message.addEventListener("keydown", (event) => {
  // Enter sends, Shift+Enter is a new line (as in the chat apps people know)
  if (event.key === "Enter" && !event.shiftKey && !event.isComposing) {
    event.preventDefault();
    if (!ui.send.disabled) ui.messageForm.requestSubmit();
  }
});
ui.leave.addEventListener("click", onLeave);
ui.stop.addEventListener("click", onStop);
document.body.dataset.ready = "true";
// Tests and curious people can look at the connection from the console.
window.workspaceChatDemo = {
  get client() { return session && session.client; },
  get socket() { return session && session.client && session.client._socket; },
  get session() { return session; },
};
