// Type declarations of workspace-chat-client (see README.md and CONTRACT.md section 8).

/** The contract's message object (ids are decimal strings of 64-bit integers). */
export interface ChatMessage {
  id: string;
  chat_id: string;
  role: "user" | "agent" | "system";
  user_id: string | null;
  content: string;
  client_message_id: string | null;
  reply_to: string | null;
  created_at: string;
}

export interface ConnectionEstablished {
  chat_id: string;
  user_id: string;
  sid: string;
  message_string: string;
  message_string_expires_at: string;
  server_time: string;
  history_truncated?: boolean;
  disconnect_reason?: string;
}

export interface StreamStart { message_id: string; chat_id: string; reply_to: string; content_so_far?: string }
export interface StreamToken { message_id: string; chat_id: string; token: string; index: number }
export interface StreamEnd {
  message_id: string;
  chat_id: string;
  content: string;
  finish_reason: "stop" | "cancelled" | "error" | "timeout";
}
export interface Typing { user_id: string; is_typing: boolean }

export interface Session { chatId: string | null; userId: string | null; sid: string | null; connected: boolean }

export interface ChatClientOptions {
  /** Returns (a promise of) a connection string for the chat: ask your own backend, which holds the API key. */
  getConnectionString(chatId: string): string | Promise<string>;
  /** socket.io-client transports; default ["websocket", "polling"]. */
  transports?: ("websocket" | "polling")[];
  /** Reconnect by itself after a drop (default true). */
  reconnect?: boolean;
  /** Milliseconds to wait for an ack (default 10000). */
  ackTimeout?: number;
  /** Socket.IO path (default "/socket.io/"). */
  path?: string;
  /** Longest wait between reconnection attempts, in ms (default 5000). */
  reconnectDelayMax?: number;
}

export interface ChatEvents {
  message: ChatMessage;
  streamStart: StreamStart;
  token: StreamToken;
  streamEnd: StreamEnd;
  typing: Typing;
  error: ChatError;
  connected: ConnectionEstablished;
  disconnected: string;
  reconnecting: { attempt: number; delayMs: number };
  chatDeleted: { chat_id: string };
  /** The outbox changed (a message queued, sent, refused or dropped). */
  outbox: OutboxEntry[];
}

/** A message waiting in the outbox. */
export interface OutboxEntry { content: string; chatId: string | null; clientMessageId: string }

/** A refusal: `not_connected`, `reply_pending`, `timeout`, or the server's contract code. */
export class ChatError extends Error {
  constructor(code: string, message?: string, details?: Record<string, unknown>);
  code: string;
  details: Record<string, unknown>;
  static from(body: unknown): ChatError;
}

/** Compare two message ids without losing precision: -1, 0 or 1. */
export function compareIds(a: string, b: string): -1 | 0 | 1;

export class ChatClient {
  constructor(url: string, options: ChatClientOptions);
  readonly url: string;
  session: Session;
  /** The newest message id this client has seen (sent on reconnection as last_message_id). */
  lastMessageId: string | null;
  /** Whether the agent's reply to this client's last message is still awaited. */
  readonly replyPending: boolean;
  connect(chatId: string, options?: { lastMessageId?: string }): Promise<ConnectionEstablished>;
  send(content: string, options?: { chatId?: string; clientMessageId?: string }): Promise<ChatMessage>;
  /** Send now if possible, else wait in the outbox (offline, or while a reply streams in the
   * chat) and go out in order under the same client_message_id; resolves with the stored
   * message. Rejects with the server's code if it refuses the message itself, or with
   * `not_connected` if disconnect() drops the outbox. */
  queue(content: string, options?: { chatId?: string; clientMessageId?: string }): Promise<ChatMessage>;
  /** What waits in the outbox, oldest first. */
  readonly outbox: OutboxEntry[];
  stopGeneration(): Promise<boolean>;
  typing(isTyping?: boolean): void;
  disconnect(): void;
  on<E extends keyof ChatEvents>(event: E, fn: (data: ChatEvents[E]) => void): () => void;
  off<E extends keyof ChatEvents>(event: E, fn: (data: ChatEvents[E]) => void): void;
}

export default ChatClient;
