/* Workspace Chat demo page: join with a name, then talk on the Socket.IO namespace /chat.
 *
 * The protocol is docs/realtime.md: connect with {chat_id, connection_string, last_message_id},
 * send with single-use message strings, show streamed replies as they grow, and catch up on
 * reconnect by passing the newest message id this page has.
 */
(function () {
  "use strict";

  var ACK_TIMEOUT_MS = 10000;
  var STRING_ERRORS = ["invalid_message_string", "message_string_expired", "message_string_reused"];

  // Words a person understands, for the contract's error codes.
  var SEND_ERRORS = {
    chat_busy: "The echo bot is still answering. Wait for it to finish (or press Stop), then send again.",
    rate_limited: "You are sending messages too quickly. Wait a moment, then try again.",
    validation_error: "Your message is empty or too long (at most 4000 characters).",
    message_string_expired: "Your message could not be sent because the page waited too long. Please send it again.",
    message_string_reused: "Your message could not be sent. Please send it again.",
    invalid_message_string: "Your message could not be sent. Please send it again.",
    chat_mismatch: "Your message went to the wrong chat and was not sent. Reload the page and try again.",
    chat_not_found: "This chat no longer exists. Choose “Change name” and join again.",
    internal_error: "Something went wrong on the server. Please try again."
  };
  var CONNECT_ERRORS = {
    invalid_connection_string: "Your session is no longer valid. Getting a new one…",
    connection_string_expired: "Your session expired. Getting a new one…",
    chat_not_found: "This chat no longer exists. Choose “Change name” and join again.",
    forbidden: "You are not allowed in this chat any more. Choose “Change name” and join again.",
    too_many_connections: "The demo is full right now. We will try again in a little while.",
    validation_error: "The page could not connect (its request was incomplete). Please reload the page.",
    invalid_api_key: "The demo is not set up correctly on the server."
  };
  var STATUS_TEXT = {
    idle: "Not connected",
    connecting: "Connecting…",
    connected: "Connected",
    reconnecting: "Connection lost. Reconnecting…",
    failed: "Not connected"
  };

  function $(id) { return document.getElementById(id); }

  var ui = {
    status: $("status"),
    join: $("join"), joinForm: $("join-form"), name: $("name"), joinButton: $("join-button"),
    joinError: $("join-error"),
    chat: $("chat"), who: $("who"), leave: $("leave-button"), log: $("log"), alert: $("alert"),
    messageForm: $("message-form"), message: $("message"), send: $("send-button"),
    stop: $("stop-button")
  };
  var joinUrl = document.body.getAttribute("data-join-url") || "/demo/join";

  var session = null;  // {name, userId, chatId, connectionString, socket, messageString, ...}

  // --- small helpers ------------------------------------------------------------------------

  function setStatus(state, text) {
    ui.status.setAttribute("data-state", state);
    ui.status.textContent = text || STATUS_TEXT[state];
  }

  function showAlert(text) { ui.alert.textContent = text || ""; }

  function newId() {
    if (window.crypto && typeof window.crypto.randomUUID === "function") {
      return window.crypto.randomUUID();
    }
    return Date.now().toString(36) + "-" + Math.random().toString(36).slice(2, 12);
  }

  function requestSeat(name) {
    return fetch(joinUrl, {
      method: "POST",
      headers: { "Content-Type": "application/json", "Accept": "application/json" },
      credentials: "same-origin",
      body: JSON.stringify({ name: name })
    }).then(function (response) {
      return response.json().catch(function () { return null; }).then(function (body) {
        if (!response.ok || !body || !body.chat_id) {
          var error = (body && body.error) || {};
          var err = new Error(error.message || "The server answered " + response.status + ".");
          err.code = error.code || "http_" + response.status;
          throw err;
        }
        return body;
      });
    });
  }

  function joinErrorText(err) {
    if (err && err.code === "validation_error") return err.message || "Please type your name.";
    if (err && err.code && err.code.indexOf("http_") !== 0 && err.message) {
      return "Could not join: " + err.message;
    }
    if (err && err.code) return "The server could not let you join right now. Please try again.";
    return "Could not reach the server. Check your connection and try again.";
  }

  // --- the conversation ---------------------------------------------------------------------

  function nearBottom() {
    return ui.log.scrollHeight - ui.log.scrollTop - ui.log.clientHeight < 80;
  }

  function keepScrolled(wasNearBottom) {
    if (wasNearBottom) ui.log.scrollTop = ui.log.scrollHeight;
  }

  function speaker(role, userId) {
    if (role === "agent") return "Echo bot";
    if (role === "system") return "System";
    if (session && userId === session.userId) return "You";
    return userId || "Someone";
  }

  function bubble(id, role, userId) {
    var node = session.nodes[id];
    if (node) return node;
    node = document.createElement("div");
    node.className = "msg " + role + (role === "user" && userId === session.userId ? " mine" : "");
    node.setAttribute("data-message-id", id);
    var who = document.createElement("span");
    who.className = "who";
    who.textContent = speaker(role, userId) + ": ";
    var text = document.createElement("span");
    text.className = "text";
    node.appendChild(who);
    node.appendChild(text);
    session.nodes[id] = node;
    // Keep the log in id order even if a replayed message arrives after a newer one.
    var before = null;
    var children = ui.log.children;
    for (var i = children.length - 1; i >= 0; i--) {
      var other = children[i].getAttribute("data-message-id");
      if (other && Number(other) > Number(id)) before = children[i];
      else if (other) break;
    }
    ui.log.insertBefore(node, before);
    return node;
  }

  function setText(node, text) { node.querySelector(".text").textContent = text; }

  function note(node, text) {
    var el = node.querySelector(".note");
    if (!el) {
      el = document.createElement("span");
      el.className = "note";
      node.appendChild(el);
    }
    el.textContent = text;
  }

  function systemLine(text) {
    var was = nearBottom();
    var line = document.createElement("p");
    line.className = "sys";
    line.textContent = text;
    ui.log.appendChild(line);
    keepScrolled(was);
  }

  function seen(id) {
    var n = Number(id);
    if (n > session.lastMessageId) session.lastMessageId = n;
  }

  function showMessage(message) {
    var was = nearBottom();
    var node = bubble(message.id, message.role, message.user_id);
    setText(node, message.content);
    node.removeAttribute("aria-busy");
    delete session.streams[message.id];
    seen(message.id);
    updateStop();
    keepScrolled(was);
  }

  function streamStarted(data) {
    var was = nearBottom();
    var node = bubble(data.message_id, "agent", null);
    node.setAttribute("aria-busy", "true");  // screen readers read it once, when it is done
    // A client that joins mid-stream gets content_so_far, then the tokens after it.
    setText(node, data.content_so_far || "");
    session.streams[data.message_id] = { node: node, next: data.content_so_far ? null : 0 };
    updateStop();
    keepScrolled(was);
  }

  function streamToken(data) {
    var stream = session.streams[data.message_id];
    if (!stream) return;  // a stream that started before we joined and was not resumed
    if (stream.next !== null && data.index < stream.next) return;  // already shown
    var was = nearBottom();
    stream.node.querySelector(".text").textContent += data.token;
    stream.next = data.index + 1;
    keepScrolled(was);
  }

  function streamEnded(data) {
    var was = nearBottom();
    var node = bubble(data.message_id, "agent", null);
    setText(node, data.content);
    node.removeAttribute("aria-busy");
    if (data.finish_reason === "cancelled") note(node, "(stopped)");
    else if (data.finish_reason === "error") note(node, "(the echo bot ran into a problem)");
    else if (data.finish_reason === "timeout") note(node, "(the echo bot took too long)");
    delete session.streams[data.message_id];
    seen(data.message_id);
    updateStop();
    keepScrolled(was);
  }

  function updateStop() {
    var streaming = session && Object.keys(session.streams).length > 0;
    if (!streaming && document.activeElement === ui.stop) ui.message.focus();
    ui.stop.hidden = !streaming;
  }

  // --- the connection -----------------------------------------------------------------------

  function connect() {
    var own = session;
    var first = true;
    // Events of a socket whose session was left behind ("Change name") are ignored.
    function current(handler) {
      return function (data) { if (session === own) handler(data); };
    }
    var socket = window.io("/chat", {
      // Called on every (re)connect: the connection string lives 300 s, so a reconnect asks
      // for a fresh one, and last_message_id makes the server replay what we missed.
      auth: function (cb) {
        function send() {
          cb({ chat_id: own.chatId, connection_string: own.connectionString,
               last_message_id: String(own.lastMessageId) });
        }
        if (first) { first = false; send(); return; }
        requestSeat(own.name).then(function (seat) {
          if (session === own && seat.chat_id !== own.chatId) resetConversation(seat.chat_id);
          own.connectionString = seat.connection_string;
        }).catch(function () { /* try with what we have; the server will say if it is stale */ })
          .then(send);
      },
      reconnectionDelay: 500,
      reconnectionDelayMax: 4000
    });
    own.socket = socket;
    setStatus("connecting");

    socket.on("connection_established", current(function (data) {
      own.messageString = data.message_string;
      own.refusals = 0;
      setStatus("connected");
      if (data.history_truncated) systemLine("Older messages are not shown.");
      if (ui.alert.getAttribute("data-kind") === "connection") {
        showAlert("");
        ui.alert.removeAttribute("data-kind");
      }
    }));
    socket.on("message_received", current(showMessage));
    socket.on("message_stream_started", current(streamStarted));
    socket.on("message_stream_token", current(streamToken));
    socket.on("message_stream_ended", current(streamEnded));
    socket.on("error", current(function (error) {
      // Failures of our own messages are answered on the ack; this is for the chat's agent.
      if (error && error.code === "agent_error") {
        showAlert("The echo bot could not finish its reply. You can send another message.");
      }
    }));
    socket.on("chat_deleted", current(function () {
      own.deleted = true;
      showAlert("This chat was deleted. Choose “Change name” and join again to start a new one.");
    }));
    socket.on("disconnect", current(function (reason) {
      own.messageString = null;
      own.streams = {};  // a stream cut off here is resumed (content_so_far) or replayed
      updateStop();
      if (own.deleted) {
        setStatus("failed", "Disconnected");
      } else if (reason === "io server disconnect") {
        // The server closed us (it may be restarting): socket.io does not retry this by itself.
        setStatus("reconnecting");
        setTimeout(function () { if (session === own && !socket.connected) socket.connect(); },
                   2000);
      } else {
        setStatus("reconnecting");
      }
    }));
    socket.on("connect_error", current(function (err) {
      if (socket.active) {  // a network failure: socket.io keeps trying by itself
        setStatus("reconnecting", "Cannot reach the server. Retrying…");
        return;
      }
      // The server refused us: socket.io does not retry, we decide.
      var code = err && err.data && err.data.code;
      own.refusals += 1;
      ui.alert.setAttribute("data-kind", "connection");
      showAlert(CONNECT_ERRORS[code] ||
                "Could not connect: " + ((err && err.message) || "unknown error") + ".");
      var retryable = code === "connection_string_expired" || code === "invalid_connection_string" ||
        code === "too_many_connections";
      if (retryable && own.refusals <= 5) {
        setStatus("reconnecting");
        setTimeout(function () { if (session === own) socket.connect(); },
                   code === "too_many_connections" ? 15000 : 1000);
      } else {
        setStatus("failed");
      }
    }));
  }

  function resetConversation(chatId) {
    session.chatId = chatId;
    session.lastMessageId = 0;
    session.nodes = {};
    session.streams = {};
    ui.log.textContent = "";
    updateStop();
  }

  // --- sending ------------------------------------------------------------------------------

  function emitWithTimeout(own, event, payload) {
    return new Promise(function (resolve, reject) {
      own.socket.timeout(ACK_TIMEOUT_MS).emit(event, payload, function (err, ack) {
        if (err) reject(err); else resolve(ack);
      });
    });
  }

  function freshMessageString(own) {
    return emitWithTimeout(own, "get_message_string", {}).then(function (answer) {
      own.messageString = answer && answer.message_string;
    });
  }

  function sendMessage(own, content, clientMessageId) {
    return emitWithTimeout(own, "message", { content: content, message_string: own.messageString,
                                             client_message_id: clientMessageId });
  }

  function onSend(event) {
    event.preventDefault();
    var own = session;
    if (!own || own.sending) return;
    var content = ui.message.value.trim();
    if (!content) {
      showAlert("Type a message first.");
      ui.message.focus();
      return;
    }
    if (content.length > 4000) {
      showAlert("Your message is too long (at most 4000 characters).");
      return;
    }
    if (!own.socket || !own.socket.connected || !own.messageString) {
      showAlert("Not connected right now; the page reconnects by itself. Your message is " +
                "still in the box: send it again once it says Connected.");
      return;
    }
    own.sending = true;
    ui.send.disabled = true;
    showAlert("");
    var clientMessageId = newId();  // a retry with the same id can never be stored twice
    sendMessage(own, content, clientMessageId).then(function (ack) {
      if (ack && !ack.ok && STRING_ERRORS.indexOf(ack.error && ack.error.code) >= 0) {
        // The string was stale (the page sat idle for a minute, say): get one and retry once.
        return freshMessageString(own).then(function () {
          return sendMessage(own, content, clientMessageId);
        });
      }
      return ack;
    }).then(function (ack) {
      if (session !== own) return;
      if (ack && ack.ok) {
        own.messageString = ack.next_message_string;
        if (ui.message.value.trim() === content) ui.message.value = "";
        showMessage(ack.message);
        return;
      }
      var error = (ack && ack.error) || {};
      var text = SEND_ERRORS[error.code] || ("Your message was not sent: " +
                                             (error.message || "unknown error") + ".");
      if (error.code === "rate_limited" && error.details && error.details.retry_after) {
        text += " (about " + Math.max(1, Math.ceil(error.details.retry_after)) + " s)";
      }
      showAlert(text);
      // A refused message may still have used up its string: always fetch a fresh one.
      return freshMessageString(own).catch(function () { /* a reconnect brings a new one */ });
    }).catch(function () {
      if (session !== own) return;
      showAlert("The server did not answer in time. If your message is not in the " +
                "conversation, send it again.");
    }).then(function () {
      own.sending = false;
      if (session !== own) return;
      ui.send.disabled = false;
      ui.message.focus();
    });
  }

  // --- joining and leaving ------------------------------------------------------------------

  function onJoin(event) {
    event.preventDefault();
    var name = ui.name.value.trim();
    ui.joinError.textContent = "";
    if (!name) {
      ui.joinError.textContent = "Please type your name.";
      ui.name.focus();
      return;
    }
    if (typeof window.io !== "function") {
      ui.joinError.textContent = "The chat library did not load, so the demo cannot connect. " +
        "Reload the page; if it keeps happening, the server is missing its socket.io client.";
      return;
    }
    ui.joinButton.disabled = true;
    setStatus("connecting", "Joining…");
    requestSeat(name).then(function (seat) {
      session = {
        name: seat.name, userId: seat.user_id, chatId: seat.chat_id,
        connectionString: seat.connection_string, socket: null, messageString: null,
        lastMessageId: 0,  // 0: the server replays this chat's history on connect
        nodes: {}, streams: {}, sending: false, refusals: 0, deleted: false
      };
      ui.log.textContent = "";
      showAlert("");
      ui.who.textContent = seat.name;
      ui.join.hidden = true;
      ui.chat.hidden = false;
      ui.send.disabled = false;
      ui.message.focus();
      connect();
    }).catch(function (err) {
      setStatus("idle");
      ui.joinError.textContent = joinErrorText(err);
      ui.name.focus();
    }).then(function () {
      ui.joinButton.disabled = false;
    });
  }

  function onLeave() {
    if (session && session.socket) session.socket.disconnect();
    session = null;
    ui.log.textContent = "";
    showAlert("");
    ui.send.disabled = false;
    ui.stop.hidden = true;
    ui.chat.hidden = true;
    ui.join.hidden = false;
    setStatus("idle");
    ui.name.focus();
    ui.name.select();
  }

  function onStop() {
    if (!session || !session.socket || !session.socket.connected) return;
    emitWithTimeout(session, "stop_generation", {}).catch(function () { /* the stream ends anyway */ });
    ui.message.focus();
  }

  ui.joinForm.addEventListener("submit", onJoin);
  ui.messageForm.addEventListener("submit", onSend);
  ui.leave.addEventListener("click", onLeave);
  ui.stop.addEventListener("click", onStop);
  if (typeof window.io !== "function") {
    ui.joinError.textContent = "The chat library did not load, so the demo cannot connect. " +
      "Reload the page; if it keeps happening, the server is missing its socket.io client.";
  }
  // Tests and curious people can look at the connection from the console.
  window.workspaceChatDemo = { get socket() { return session && session.socket; },
                               get session() { return session; } };
})();
