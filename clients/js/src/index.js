// workspace-chat-client: the JavaScript client of Workspace Chat (browsers and Node >= 18).
//
// It follows the client rules of the contract (CONTRACT.md section 8): a browser never holds
// an API key, it asks its own backend for a connection string (`getConnectionString`); every
// message is sent with a single-use message string (the one from the last ack, or a fresh one
// from `get_message_string`); while the agent's reply to this client's last message streams,
// `send` refuses with `reply_pending`; after a drop the client reconnects by itself with a
// fresh connection string and `last_message_id`, and is replayed what it missed. `queue` is
// an outbox on top of `send`: what is queued while the connection is down (or while a reply
// streams in the chat) waits, and goes out in order under its own client_message_id, so a
// message whose first try was cut off is still stored once.
import { io } from "socket.io-client";

const NAMESPACE = "/chat";
const STRING_ERRORS = new Set(["invalid_message_string", "message_string_expired",
  "message_string_reused"]);
// Refusals after which reconnecting cannot help: the client stops and says why.
const FINAL_ERRORS = new Set(["forbidden", "chat_not_found", "invalid_api_key",
  "invalid_connection_string", "validation_error"]);
// Error events that end this client's access to the chat (section 9, revocation).
const REVOKED = new Set(["forbidden", "invalid_api_key"]);
const EVENTS = ["message", "streamStart", "token", "streamEnd", "typing", "error", "connected",
  "disconnected", "reconnecting", "chatDeleted", "outbox"];
// Outbox failures that only mean "not now": the message stays queued and is tried again.
const TRY_LATER = new Set(["not_connected", "timeout", "reply_pending", "chat_busy"]);
// How long a queued message waits after a chat_busy whose stream this client cannot see.
const BUSY_RETRY_MS = 1000;

/** An error with a contract error code (`not_connected`, `reply_pending`, or the server's). */
export class ChatError extends Error {
  constructor(code, message, details = {}) {
    super(message || code);
    this.name = "ChatError";
    this.code = code;
    this.details = details || {};
  }

  static from(body) {
    const error = (body && body.error) || body || {};
    return new ChatError(error.code || "internal_error", error.message || "The server refused.",
      error.details || {});
  }
}

/** Compare two message ids (decimal strings of 64-bit integers) without losing precision. */
export function compareIds(a, b) {
  const x = String(a);
  const y = String(b);
  if (x.length !== y.length) return x.length < y.length ? -1 : 1;
  return x < y ? -1 : x > y ? 1 : 0;
}

function newClientMessageId() {
  const c = globalThis.crypto;
  if (c && typeof c.randomUUID === "function") return c.randomUUID();
  return `${Date.now().toString(36)}-${Math.random().toString(36).slice(2, 14)}`;
}

function expired(isoTime, marginMs = 2000) {
  if (!isoTime) return false;
  const at = Date.parse(isoTime);
  return Number.isFinite(at) && at - marginMs <= Date.now();
}

export class ChatClient {
  /**
   * @param {string} url  the server's base URL, e.g. "https://chat.example.com"
   * @param {object} options  {getConnectionString(chatId), transports?, reconnect?,
   *   ackTimeout?, path?, reconnectDelayMax?}
   */
  constructor(url, options = {}) {
    if (typeof options.getConnectionString !== "function") {
      throw new TypeError("ChatClient needs options.getConnectionString(chatId)");
    }
    this.url = String(url).replace(/\/+$/, "");
    this.options = {
      transports: ["websocket", "polling"], reconnect: true, ackTimeout: 10000,
      reconnectDelayMax: 5000, ...options,
    };
    this.session = { chatId: null, userId: null, sid: null, connected: false };
    this.lastMessageId = null;
    this._socket = null;
    this._listeners = new Map(EVENTS.map((name) => [name, new Set()]));
    this._messageString = null;   // {value, expiresAt}
    this._pendingReplyTo = null;  // id of this client's message whose reply is awaited
    this._replyId = null;         // id of that reply once its stream started
    this._replyTimer = undefined;
    this._replies = new Map();    // reply_to -> {id, ended}
    this._credentialsMissing = false;  // this attempt went without a connection string
    this._closed = true;
    this._attempt = 0;
    this._retryTimer = null;
    this._outbox = [];            // [{content, chatId, clientMessageId, resolve, reject}]
    this._flushing = false;
    this._streams = new Set();    // ids of the replies streaming in the chat, as seen here
    this._busyTimer = null;
  }

  // --- events --------------------------------------------------------------------------------

  /** Listen to `message`, `streamStart`, `token`, `streamEnd`, `typing`, `error`,
   * `connected`, `disconnected`, `reconnecting` or `chatDeleted`; returns an unsubscribe. */
  on(event, fn) {
    const listeners = this._listeners.get(event);
    if (!listeners) throw new TypeError(`unknown event ${JSON.stringify(event)}`);
    listeners.add(fn);
    return () => listeners.delete(fn);
  }

  off(event, fn) {
    const listeners = this._listeners.get(event);
    if (listeners) listeners.delete(fn);
  }

  _fire(event, data) {
    for (const fn of [...this._listeners.get(event)]) {
      try {
        fn(data);
      } catch (err) {
        // a listener's bug must not break the client's own bookkeeping
        setTimeout(() => { throw err; });
      }
    }
  }

  /** What waits in the outbox, oldest first: `[{content, chatId, clientMessageId}]`. */
  get outbox() {
    return this._outbox.map(({ content, chatId, clientMessageId }) =>
      ({ content, chatId, clientMessageId }));
  }

  /** Whether the reply to this client's last message is still awaited. */
  get replyPending() {
    return this._pendingReplyTo !== null;
  }

  // --- connecting ----------------------------------------------------------------------------

  /** Join a chat (leaving the current one first); resolves with `connection_established`. */
  async connect(chatId, { lastMessageId } = {}) {
    if (typeof chatId !== "string" || !chatId) throw new TypeError("connect needs a chat id");
    this.disconnect();
    this._closed = false;
    this.session = { chatId, userId: null, sid: null, connected: false };
    this.lastMessageId = lastMessageId != null ? String(lastMessageId) : null;
    this._clearPending();
    this._attempt = 0;
    // The first string is fetched here, so that a backend that refuses it rejects connect().
    let firstAuth = await this._auth(chatId);
    if (this._closed || this.session.chatId !== chatId) {
      throw new ChatError("not_connected", "connect() was superseded.");
    }
    const socket = io(this.url + NAMESPACE, {
      path: this.options.path,
      transports: this.options.transports,
      // Reconnection is ours: each attempt needs a fresh connection string, and a server-side
      // disconnect (a restart, a slow-client drop) must be retried too.
      reconnection: false,
      timeout: this.options.ackTimeout,
      auth: (cb) => {
        if (firstAuth !== null) {
          cb(firstAuth);
          firstAuth = null;
          return;
        }
        this._auth(chatId).then(cb, (err) => this._authFailed(err, cb));
      },
    });
    this._socket = socket;
    this._wire(socket);
    return new Promise((resolve, reject) => {
      const offOk = this.on("connected", (data) => { cleanup(); resolve(data); });
      const onRefused = (err) => {
        if (this._socket !== socket || this.session.connected) return;
        cleanup();
        this.disconnect();
        reject(err instanceof ChatError ? err : new ChatError(
          (err && err.data && err.data.code) || "not_connected",
          (err && err.message) || "Could not connect."));
      };
      const cleanup = () => { offOk(); socket.off("connect_error", onRefused); };
      socket.once("connect_error", onRefused);
    });
  }

  async _auth(chatId) {
    let connectionString;
    try {
      connectionString = await this.options.getConnectionString(chatId);
    } catch (err) {
      if (err instanceof ChatError) throw err;
      throw new ChatError("not_connected",
        `Could not get a connection string: ${err && err.message ? err.message : err}`);
    }
    const auth = { chat_id: chatId, connection_string: connectionString };
    if (this.lastMessageId !== null) auth.last_message_id = this.lastMessageId;
    return auth;
  }

  _authFailed(err, cb) {
    // getConnectionString failed during a reconnection. Socket.IO needs an answer, so the
    // attempt goes on without credentials (the server refuses it): a refusal of the backend's
    // that a retry cannot cure ends the client; anything else (the backend is down) is
    // retried like a dropped connection, not taken for the server's final validation_error.
    this._fire("error", err);
    if (err instanceof ChatError && FINAL_ERRORS.has(err.code)) {
      this.disconnect();
    } else {
      this._credentialsMissing = true;
    }
    cb({ chat_id: this.session.chatId });
  }

  _wire(socket) {
    const mine = (fn) => (...args) => { if (this._socket === socket) fn(...args); };
    socket.on("connection_established", mine((data) => {
      this.session = { chatId: data.chat_id, userId: data.user_id, sid: data.sid,
        connected: true };
      this._messageString = { value: data.message_string,
        expiresAt: data.message_string_expires_at };
      this._attempt = 0;
      this._streams.clear();  // the replay and content_so_far say what streams now
      this._fire("connected", data);
      this._flushSoon();
    }));
    socket.on("message_received", mine((message) => {
      this._seen(message.id);
      this._fire("message", message);
    }));
    socket.on("message_stream_started", mine((data) => {
      this._streams.add(data.message_id);
      this._noteReply(data.reply_to, { id: data.message_id, ended: false });
      if (this._pendingReplyTo !== null && data.reply_to === this._pendingReplyTo) {
        this._replyId = data.message_id;
      }
      this._fire("streamStart", data);
    }));
    socket.on("message_stream_token", mine((data) => this._fire("token", data)));
    socket.on("message_stream_ended", mine((data) => {
      this._seen(data.message_id);
      for (const reply of this._replies.values()) {
        if (reply.id === data.message_id) reply.ended = true;
      }
      this._streams.delete(data.message_id);
      if (data.message_id === this._replyId) this._clearPending();
      this._fire("streamEnd", data);
      this._flushSoon();
    }));
    socket.on("typing", mine((data) => this._fire("typing", data)));
    socket.on("error", mine((body) => {
      const error = ChatError.from(body);
      this._fire("error", error);
      // access revoked (section 9): the server disconnects; reconnecting would be refused
      if (REVOKED.has(error.code)) this.disconnect();
    }));
    socket.on("chat_deleted", mine((data) => {
      this._fire("chatDeleted", data);
      this.disconnect();
    }));
    socket.on("connect_error", mine((err) => {
      const code = err && err.data && err.data.code;
      if (this._credentialsMissing) {
        this._credentialsMissing = false;
        this._scheduleReconnect();
        return;
      }
      if (!this.session.connected && this._attempt === 0 && code) return;  // connect() rejects
      if (code && FINAL_ERRORS.has(code)) {
        this._fire("error", new ChatError(code, err.message));
        this.disconnect();
        return;
      }
      this._scheduleReconnect();
    }));
    socket.on("disconnect", mine((reason) => {
      const wasConnected = this.session.connected;
      this.session = { ...this.session, connected: false };
      this._streams.clear();
      if (wasConnected) this._fire("disconnected", reason);
      if (reason !== "io client disconnect") this._scheduleReconnect();
    }));
  }

  _seen(id) {
    if (id == null) return;
    if (this.lastMessageId === null || compareIds(id, this.lastMessageId) > 0) {
      this.lastMessageId = String(id);
    }
  }

  _scheduleReconnect() {
    if (this._closed || !this.options.reconnect || this._retryTimer !== null) return;
    const socket = this._socket;
    if (!socket) return;
    this._attempt += 1;
    const base = Math.min(this.options.reconnectDelayMax, 250 * 2 ** (this._attempt - 1));
    const delay = base / 2 + Math.random() * base / 2;
    this._fire("reconnecting", { attempt: this._attempt, delayMs: Math.round(delay) });
    this._retryTimer = setTimeout(() => {
      this._retryTimer = null;
      if (this._closed || this._socket !== socket) return;
      this._messageString = null;  // bound to the old connection
      this._clearPending();        // its end may have been missed; the replay tells
      socket.connect();
    }, delay);
  }

  // The replies seen recently, by the message they answer: an ack and its reply's stream
  // events may arrive in one read, so the stream can be known before the ack is handled.
  _noteReply(replyTo, reply) {
    this._replies.set(replyTo, reply);
    if (this._replies.size > 32) this._replies.delete(this._replies.keys().next().value);
  }

  _expectReply(messageId) {
    const known = this._replies.get(messageId);
    if (known && known.ended) return;
    this._pendingReplyTo = messageId;
    this._replyId = known ? known.id : null;
    // A reply that never starts (its agent vanished) must not block this client for ever.
    clearTimeout(this._replyTimer);
    this._replyTimer = setTimeout(() => {
      if (this._pendingReplyTo === messageId && this._replyId === null) {
        this._clearPending();
        this._flushSoon();
      }
    }, this.options.ackTimeout);
  }

  _clearPending() {
    clearTimeout(this._replyTimer);
    this._pendingReplyTo = null;
    this._replyId = null;
  }

  /** Leave the chat; no reconnection follows, and what waits in the outbox is rejected with
   * `not_connected`. */
  disconnect() {
    this._closed = true;
    this._streams.clear();
    clearTimeout(this._busyTimer);
    this._busyTimer = null;
    const dropped = this._outbox.splice(0);
    if (this._retryTimer !== null) {
      clearTimeout(this._retryTimer);
      this._retryTimer = null;
    }
    const socket = this._socket;
    this._socket = null;
    const wasConnected = this.session.connected;
    this.session = { ...this.session, connected: false };
    this._messageString = null;
    this._clearPending();
    if (socket) {
      socket.removeAllListeners();
      socket.disconnect();
      if (wasConnected) this._fire("disconnected", "io client disconnect");
    }
    if (dropped.length) {
      for (const item of dropped) {
        item.reject(new ChatError("not_connected", "The client left the chat before this " +
          "message could be sent.", { client_message_id: item.clientMessageId }));
      }
      this._fire("outbox", this.outbox);
    }
  }

  // --- sending -------------------------------------------------------------------------------

  _requireConnection() {
    if (!this._socket || !this.session.connected) {
      throw new ChatError("not_connected", "Not connected to a chat.");
    }
    return this._socket;
  }

  async _emit(event, payload) {
    const socket = this._requireConnection();
    try {
      return await socket.timeout(this.options.ackTimeout).emitWithAck(event, payload);
    } catch (err) {
      throw new ChatError("timeout", `No answer to ${event} within ${this.options.ackTimeout} ms.`);
    }
  }

  async _takeMessageString() {
    const kept = this._messageString;
    this._messageString = null;
    if (kept && kept.value && !expired(kept.expiresAt)) return kept.value;
    const answer = await this._emit("get_message_string", {});
    if (!answer || answer.ok === false || !answer.message_string) throw ChatError.from(answer);
    return answer.message_string;
  }

  /** Send a message; resolves with the stored message object. */
  async send(content, { chatId, clientMessageId } = {}) {
    this._requireConnection();
    if (this._pendingReplyTo !== null) {
      throw new ChatError("reply_pending", "The reply to your last message is still streaming.",
        { reply_to: this._pendingReplyTo });
    }
    const payload = { content, chat_id: chatId || this.session.chatId,
      client_message_id: clientMessageId || newClientMessageId() };
    for (let attempt = 0; ; attempt++) {
      payload.message_string = await this._takeMessageString();
      const ack = await this._emit("message", payload);
      if (ack && ack.ok) {
        this._messageString = { value: ack.next_message_string,
          expiresAt: ack.next_message_string_expires_at };
        this._seen(ack.message.id);
        if (ack.reply_expected) this._expectReply(ack.message.id);
        return ack.message;
      }
      const error = ChatError.from(ack);
      // A string refused for its own sake: one more try with a fresh one (same client id, so
      // the message is stored once whatever happened to the first try).
      if (!STRING_ERRORS.has(error.code) || attempt >= 1) throw error;
    }
  }

  /**
   * Send a message now if that is possible, else keep it in the outbox and send it as soon as
   * it is (after the next `connected`, or once the reply streaming in the chat has ended);
   * resolves with the stored message. Queued messages go out one at a time, in order, each
   * under its client_message_id (made here unless given), so a message is stored once even if
   * a try was cut off. Rejects with the server's code when the server refuses the message
   * itself, and with `not_connected` when `disconnect()` or `connect()` drops the outbox.
   */
  queue(content, { chatId, clientMessageId } = {}) {
    const item = { content, chatId: chatId || null,
      clientMessageId: clientMessageId || newClientMessageId() };
    const promise = new Promise((resolve, reject) => {
      item.resolve = resolve;
      item.reject = reject;
    });
    this._outbox.push(item);
    this._fire("outbox", this.outbox);
    this._flush();
    return promise;
  }

  _flushSoon() {
    if (this._outbox.length) Promise.resolve().then(() => this._flush());
  }

  async _flush() {
    if (this._flushing) return;
    this._flushing = true;
    try {
      while (this._outbox.length && this._socket && this.session.connected &&
             this._pendingReplyTo === null && this._streams.size === 0 &&
             this._busyTimer === null) {
        const item = this._outbox[0];
        let message;
        try {
          message = await this.send(item.content, { chatId: item.chatId || undefined,
            clientMessageId: item.clientMessageId });
        } catch (err) {
          if (this._outbox[0] !== item) continue;  // dropped meanwhile (disconnect)
          if (err instanceof ChatError && TRY_LATER.has(err.code)) {
            if (err.code === "chat_busy") {
              // someone else's reply streams (its start may not have reached us yet)
              this._busyTimer = setTimeout(() => {
                this._busyTimer = null;
                this._flush();
              }, BUSY_RETRY_MS);
            }
            break;  // kept; a connected, streamEnd or the timer tries again
          }
          this._outbox.shift();
          this._fire("outbox", this.outbox);
          item.reject(err);
          continue;
        }
        if (this._outbox[0] === item) {
          this._outbox.shift();
          this._fire("outbox", this.outbox);
        }
        item.resolve(message);
      }
    } finally {
      this._flushing = false;
    }
  }

  /** Ask the reply streaming in the chat to stop; resolves with whether one was. */
  async stopGeneration() {
    const ack = await this._emit("stop_generation", {});
    if (!ack || ack.ok === false) throw ChatError.from(ack);
    return Boolean(ack.stopped);
  }

  /** Tell the others in the chat that this user is (or stopped) typing. */
  typing(isTyping = true) {
    const socket = this._requireConnection();
    socket.emit("typing", { is_typing: Boolean(isTyping) });
  }
}

export default ChatClient;
