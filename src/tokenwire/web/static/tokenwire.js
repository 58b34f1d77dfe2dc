/**
 * tokenwire.js: a browser client for the tokenwire gateway. An ES module with no dependencies.
 *
 *   import { Tokenwire } from "/static/tokenwire.js";
 *   const tw = new Tokenwire({ apiKey: "tw-..." });
 *   const stream = tw.chatStream({ model: "sim", messages: [{ role: "user", content: "Hi" }] },
 *                                { transport: "ws", resumable: true });
 *   for await (const chunk of stream) console.log(chunk.choices[0]?.delta?.content ?? "");
 *   console.log(stream.finishReason, stream.usage);
 *
 * - SSE over fetch (POST /v1/chat/completions); a resumable stream whose connection drops is
 *   continued from GET /v1/chat/completions/{id}/stream with Last-Event-ID.
 * - WebSocket envelope mode on /v1/ws/chat, authenticated with a single-use ticket
 *   (POST /v1/ws/tickets), many requests on one socket; a dropped socket is reopened and a
 *   resumable stream continued with chat.completion.resume.
 * - cancel() stops the upstream generation on either transport.
 * - Errors are typed (TokenwireError and its subclasses), with the gateway's status, type,
 *   code and param.
 * The key is sent only in the Authorization header (never a cookie, never a URL).
 * Reference: docs/web.md.
 */

/** Any error from the gateway or on the way to it. */
export class TokenwireError extends Error {
  constructor(message, { status = null, type = null, code = null, param = null, retryAfterMs = null, cause } = {}) {
    super(message, cause === undefined ? undefined : { cause });
    this.name = new.target.name;
    /** HTTP status (or the status an in-band error carries); null for a network failure. */
    this.status = status;
    /** OpenAI error type, e.g. "invalid_request_error". */
    this.type = type;
    /** Machine-readable code, e.g. "model_not_found"; for a closed socket, its close code. */
    this.code = code;
    /** The request field at fault, when one is. */
    this.param = param;
    /** How long to wait before retrying (429 and some 503), in ms. */
    this.retryAfterMs = retryAfterMs;
  }
}
/** The gateway could not be reached, or a connection dropped mid-stream. */
export class APIConnectionError extends TokenwireError {}
/** 400 or 413: the request is invalid (see param). */
export class BadRequestError extends TokenwireError {}
/** 401, or a WebSocket closed with 3000: missing, wrong, revoked or expired key. */
export class AuthenticationError extends TokenwireError {}
/** 402: the key's credit does not cover the request. */
export class InsufficientQuotaError extends TokenwireError {}
/** 403: the key may not do this (an admin endpoint, a model outside its list). */
export class PermissionDeniedError extends TokenwireError {}
/** 404: no such model, key or stream (or not this key's). */
export class NotFoundError extends TokenwireError {}
/** 409: e.g. an Idempotency-Key reused with another body, or still in use. */
export class ConflictError extends TokenwireError {}
/** 410: a stream that ended and is no longer kept, or a cursor past what is kept. */
export class StreamGoneError extends TokenwireError {}
/** 429: a rate limit; retryAfterMs says when to retry. */
export class RateLimitError extends TokenwireError {}
/** 5xx: the gateway or an upstream failed. */
export class ServerError extends TokenwireError {}

const BY_STATUS = {
  400: BadRequestError,
  401: AuthenticationError,
  402: InsufficientQuotaError,
  403: PermissionDeniedError,
  404: NotFoundError,
  409: ConflictError,
  410: StreamGoneError,
  413: BadRequestError,
  429: RateLimitError,
};

/** The typed error for an HTTP status and an OpenAI-style body ({error: {...}}). */
export function errorFrom(status, body, headers = null) {
  const detail = body && typeof body === "object" && body.error && typeof body.error === "object" ? body.error : {};
  const Kind = BY_STATUS[status] ?? (status >= 500 ? ServerError : TokenwireError);
  let retryAfterMs = Number.isFinite(detail.retry_after_ms) ? detail.retry_after_ms : null;
  const header = headers?.get?.("retry-after");
  if (retryAfterMs === null && header && /^\d+$/.test(header)) retryAfterMs = Number(header) * 1000;
  const message = typeof detail.message === "string" ? detail.message : `The gateway answered HTTP ${status}.`;
  return new Kind(message, {
    status,
    type: detail.type ?? null,
    code: detail.code ?? null,
    param: detail.param ?? null,
    retryAfterMs,
  });
}

async function errorFromResponse(response) {
  let body = null;
  try {
    body = await response.json();
  } catch {
    body = null; // not JSON (a proxy's error page): the status says enough
  }
  return errorFrom(response.status, body, response.headers);
}

/** The error a WebSocket close event means for the requests it was carrying. */
export function closeError(code, reason) {
  const why = reason ? `: ${reason}` : "";
  if (code === 3000) return new AuthenticationError(`The WebSocket was refused${why}`, { status: 401, code: "3000" });
  if (code === 3003) return new PermissionDeniedError(`The WebSocket was refused${why}`, { status: 403, code: "3003" });
  if (code === 1008) return new PermissionDeniedError(`The WebSocket was closed by policy${why}`, { code: "1008" });
  return new APIConnectionError(`The WebSocket closed (${code})${why}`, { code: String(code) });
}

const sleep = (ms) => new Promise((resolve) => setTimeout(resolve, ms));

/** The text a chunk adds to the answer ("" for role, finish and usage chunks). */
export function deltaText(chunk) {
  const content = chunk?.choices?.[0]?.delta?.content;
  return typeof content === "string" ? content : "";
}

/**
 * A server-sent-events parser (the WHATWG rules): feed it text, get back complete events.
 * Events are {data, id} (id null when the event had none); "retry:" sets .retry.
 */
export class SSEParser {
  constructor() {
    this.buffer = "";
    this.data = [];
    this.id = null;
    this.retry = null;
  }

  /** Parse more text; returns the events it completed. */
  push(text) {
    const events = [];
    const buffer = this.buffer + text;
    let start = 0;
    for (let i = 0; i < buffer.length; i++) {
      const c = buffer[i];
      if (c !== "\n" && c !== "\r") continue;
      if (c === "\r" && i + 1 === buffer.length) break; // a "\n" may follow in the next text
      const line = buffer.slice(start, i);
      if (c === "\r" && buffer[i + 1] === "\n") i++;
      start = i + 1;
      const event = this.#line(line);
      if (event) events.push(event);
    }
    this.buffer = buffer.slice(start);
    return events;
  }

  #line(line) {
    if (line === "") {
      if (this.data.length === 0) {
        this.id = null;
        return null;
      }
      const event = { data: this.data.join("\n"), id: this.id };
      this.data = [];
      this.id = null;
      return event;
    }
    if (line.startsWith(":")) return null; // a comment (": ping")
    const colon = line.indexOf(":");
    const field = colon < 0 ? line : line.slice(0, colon);
    let value = colon < 0 ? "" : line.slice(colon + 1);
    if (value.startsWith(" ")) value = value.slice(1);
    if (field === "data") this.data.push(value);
    else if (field === "id" && !value.includes("\0")) this.id = value;
    else if (field === "retry" && /^\d+$/.test(value)) this.retry = Number(value);
    return null;
  }
}

/** Messages for one consumer, handed over as they come (an async iterator). */
class Inbox {
  #items = [];
  #waiter = null;
  #error = null;

  push(item) {
    if (this.#waiter) {
      const { resolve } = this.#waiter;
      this.#waiter = null;
      resolve({ value: item, done: false });
    } else {
      this.#items.push(item);
    }
  }

  fail(error) {
    if (this.#error) return;
    this.#error = error;
    if (this.#waiter) {
      const { reject } = this.#waiter;
      this.#waiter = null;
      reject(error);
    }
  }

  next() {
    if (this.#items.length) return Promise.resolve({ value: this.#items.shift(), done: false });
    if (this.#error) return Promise.reject(this.#error);
    return new Promise((resolve, reject) => {
      this.#waiter = { resolve, reject };
    });
  }

  [Symbol.asyncIterator]() {
    return this;
  }
}

let requestCounter = 0;
const newRequestId = () => `r${Date.now().toString(36)}-${(++requestCounter).toString(36)}`;

/**
 * One WebSocket to /v1/ws/chat in envelope mode, opened with a ticket. Requests run
 * concurrently on it; a closed socket is reopened (with a new ticket) by the next request.
 */
export class TokenwireSocket {
  #client;
  #ws = null;
  #opening = null;
  #inboxes = new Map();

  constructor(client) {
    this.#client = client;
  }

  /** True while the socket is open. */
  get open() {
    return this.#ws !== null && this.#ws.readyState === 1;
  }

  /** Open the socket if it is not open: a ticket, then the upgrade. */
  connect() {
    if (this.open) return Promise.resolve();
    if (!this.#opening) {
      this.#opening = this.#connect().finally(() => {
        this.#opening = null;
      });
    }
    return this.#opening;
  }

  async #connect() {
    const ticket = await this.#client.request("POST", "/v1/ws/tickets");
    const url = new URL("/v1/ws/chat", this.#client.baseURL);
    url.protocol = url.protocol === "https:" ? "wss:" : "ws:";
    const ws = new this.#client.WebSocket(url.href, ticket.subprotocols);
    await new Promise((resolve, reject) => {
      ws.onopen = resolve;
      ws.onclose = (event) => reject(closeError(event.code, event.reason));
    });
    ws.onmessage = (event) => this.#dispatch(event.data);
    ws.onclose = (event) => this.#closed(ws, closeError(event.code, event.reason));
    this.#ws = ws;
  }

  #dispatch(text) {
    let message;
    try {
      message = JSON.parse(text);
    } catch {
      return; // "[DONE]" belongs to compatible mode, which this client does not use
    }
    if (!message || typeof message !== "object") return;
    const inbox = typeof message.request_id === "string" ? this.#inboxes.get(message.request_id) : null;
    if (inbox) inbox.push(message);
    else if (message.type === "error" && message.request_id === undefined) {
      const error = errorFrom(message.error?.status ?? 400, message);
      for (const box of this.#inboxes.values()) box.fail(error);
    }
  }

  #closed(ws, error) {
    if (this.#ws === ws) this.#ws = null;
    for (const inbox of this.#inboxes.values()) inbox.fail(error);
  }

  /** Send one envelope message (the socket must be open). */
  send(message) {
    if (!this.open) throw new APIConnectionError("The WebSocket is not open.");
    this.#ws.send(JSON.stringify(message));
  }

  /** Register a request id; its messages arrive in the returned inbox until release(). */
  receive(requestId) {
    const inbox = new Inbox();
    this.#inboxes.set(requestId, inbox);
    return inbox;
  }

  release(requestId) {
    this.#inboxes.delete(requestId);
  }

  /** Close the socket; running requests fail with APIConnectionError. */
  close(code = 1000, reason = "") {
    if (this.#ws) this.#ws.close(code, reason);
  }
}

/**
 * One streamed chat completion, over SSE or WebSocket. Iterate it (once) for OpenAI
 * chat.completion.chunk objects; the request is sent when iteration starts. Afterwards (and
 * during) read id, text, finishReason, usage and lastEventId.
 */
export class ChatStream {
  /** @param {object} options see Tokenwire.chatStream */
  constructor(client, options) {
    this.transport = options.transport ?? "sse";
    if (this.transport !== "sse" && this.transport !== "ws") {
      throw new TypeError(`transport must be "sse" or "ws", not ${JSON.stringify(this.transport)}`);
    }
    /** The stream id (chatcmpl-...), once known. */
    this.id = options.resumeId ?? null;
    /** The number of the last event received (the resume cursor). */
    this.lastEventId = options.after ?? 0;
    /** Text received so far. */
    this.text = "";
    this.finishReason = null;
    this.usage = null;
    /** Whether the stream survives a dropped connection (resumable or an Idempotency-Key). */
    this.resumable = Boolean(options.resumable || options.idempotencyKey || options.resumeId);
    /** How many times a dropped connection was resumed. */
    this.reconnects = 0;
    this.cancelRequested = false;
    this._client = client;
    this._options = options;
    this._abort = new AbortController();
    this._iterating = false;
    this._socketRequest = null; // [socket, requestId] while a WebSocket request runs
    this._idWaiters = [];
    if (options.signal) {
      if (options.signal.aborted) this.cancelRequested = true;
      else options.signal.addEventListener("abort", () => this.cancel(), { once: true });
    }
  }

  [Symbol.asyncIterator]() {
    if (this._iterating) throw new Error("A ChatStream can be iterated only once.");
    this._iterating = true;
    return this.transport === "ws" ? this.#webSocketChunks() : this.#sseChunks();
  }

  /** Read the stream to its end; resolves with the stream (text, finishReason, usage...). */
  async done() {
    for await (const _chunk of this) {
      // the state is kept on the stream itself
    }
    return this;
  }

  /**
   * Stop the generation. Over WebSocket a chat.completion.cancel; over SSE, a resumable
   * stream is cancelled with POST /v1/chat/completions/{id}/cancel (closing the connection
   * would leave it running for its grace period) and a plain one by closing the connection.
   * Either way the iteration ends (with finishReason "cancelled" when the gateway says so).
   */
  async cancel() {
    if (this.cancelRequested) return;
    this.cancelRequested = true;
    if (this.transport === "ws") {
      if (this._socketRequest) {
        const [socket, requestId] = this._socketRequest;
        try {
          socket.send({ type: "chat.completion.cancel", request_id: requestId });
        } catch {
          // the socket is gone; the server cancels a request whose socket closed
        }
      }
      return;
    }
    if (!this.resumable) {
      this._abort.abort();
      return;
    }
    try {
      const id = await this.#streamId();
      await this._client.request("POST", `/v1/chat/completions/${encodeURIComponent(id)}/cancel`);
    } catch {
      this._abort.abort(); // could not ask: closing at least ends our side
    }
  }

  #streamId() {
    if (this.id) return Promise.resolve(this.id);
    return new Promise((resolve, reject) => this._idWaiters.push({ resolve, reject }));
  }

  #learnId(id) {
    if (!id || this.id) return;
    this.id = id;
    for (const waiter of this._idWaiters.splice(0)) waiter.resolve(id);
  }

  #absorb(chunk, sequence) {
    if (typeof chunk.id === "string") this.#learnId(chunk.id);
    if (Number.isSafeInteger(sequence)) this.lastEventId = sequence;
    const choice = chunk.choices?.[0];
    if (choice) {
      this.text += deltaText(chunk);
      if (choice.finish_reason) this.finishReason = choice.finish_reason;
    }
    if (chunk.usage) this.usage = chunk.usage;
  }

  #finish() {
    for (const waiter of this._idWaiters.splice(0)) waiter.reject(new Error("the stream ended"));
    if (this.cancelRequested && !this.finishReason) this.finishReason = "cancelled";
  }

  #canResume(error) {
    const options = this._options;
    return (
      error instanceof APIConnectionError &&
      this.resumable &&
      this.id !== null &&
      !this.cancelRequested &&
      this.reconnects < (options.maxReconnects ?? 5)
    );
  }

  async *#sseChunks() {
    let retryMs = 1000;
    let attempt = 0;
    try {
      if (this.cancelRequested) return;
      let response = this.id === null ? await this.#post() : await this.#resumeSSE();
      for (;;) {
        try {
          const parser = new SSEParser();
          const reader = response.body.pipeThrough(new TextDecoderStream()).getReader();
          let ended = false;
          try {
            while (!ended) {
              let read;
              try {
                read = await reader.read();
              } catch (error) {
                throw this.#networkError(error, "The stream was cut");
              }
              if (read.done) break;
              for (const event of parser.push(read.value)) {
                if (event.data === "[DONE]") {
                  ended = true;
                  break;
                }
                const chunk = JSON.parse(event.data);
                if (chunk.error) throw errorFrom(chunk.error.status ?? 500, chunk);
                this.#absorb(chunk, event.id ? Number(event.id) : null);
                attempt = 0;
                yield chunk;
              }
              if (parser.retry !== null) retryMs = parser.retry;
            }
          } finally {
            reader.cancel().catch(() => {});
          }
          if (ended) return;
          throw new APIConnectionError("The stream ended before [DONE].");
        } catch (error) {
          if (this.cancelRequested && !(error instanceof TokenwireError && error.status)) return;
          if (!this.#canResume(error)) throw error;
          attempt++;
          this.reconnects++;
          await sleep(retryMs * attempt);
          response = await this.#resumeSSE();
        }
      }
    } catch (error) {
      if (this.cancelRequested && (error?.name === "AbortError" || error instanceof APIConnectionError)) return;
      throw error;
    } finally {
      this.#finish();
    }
  }

  #networkError(error, what) {
    if (error?.name === "AbortError") return error;
    return new APIConnectionError(`${what}: ${error?.message ?? error}`, { cause: error });
  }

  async #fetch(method, path, headers, body) {
    const client = this._client;
    let response;
    try {
      response = await client.fetch(new URL(path, client.baseURL), {
        method,
        headers: { ...client.headers(), ...headers },
        body,
        signal: this._abort.signal,
        credentials: "omit",
        cache: "no-store",
        referrerPolicy: "no-referrer",
      });
    } catch (error) {
      throw this.#networkError(error, "Cannot reach the gateway");
    }
    if (!response.ok) throw await errorFromResponse(response);
    this.#learnId(response.headers.get("x-stream-id"));
    return response;
  }

  async #post() {
    const options = this._options;
    const headers = { "Content-Type": "application/json", Accept: "text/event-stream" };
    if (options.resumable) headers["X-Tokenwire-Resumable"] = "true";
    if (options.idempotencyKey) headers["Idempotency-Key"] = options.idempotencyKey;
    const body = JSON.stringify({ ...options.body, stream: true });
    for (let attempt = 0; ; attempt++) {
      try {
        return await this.#fetch("POST", "/v1/chat/completions", headers, body);
      } catch (error) {
        // With an Idempotency-Key a retried POST attaches to the first one: safe to repeat.
        const retry = error instanceof APIConnectionError && options.idempotencyKey && attempt < (options.maxReconnects ?? 5);
        if (!retry || this.cancelRequested) throw error;
        this.reconnects++;
        await sleep(1000 * (attempt + 1));
      }
    }
  }

  #resumeSSE() {
    const path = `/v1/chat/completions/${encodeURIComponent(this.id)}/stream`;
    return this.#fetch("GET", path, { Accept: "text/event-stream", "Last-Event-ID": String(this.lastEventId) });
  }

  async *#webSocketChunks() {
    const options = this._options;
    const socket = this._client.socket();
    let sent = false;
    let attempt = 0;
    try {
      for (;;) {
        if (this.cancelRequested && !sent) return;
        const requestId = newRequestId();
        const inbox = socket.receive(requestId);
        try {
          await socket.connect();
          if (this.id === null) {
            // (again, after a drop before the first chunk: only when it never left, or with
            // an Idempotency-Key, which attaches the repeat to the first)
            const message = { type: "chat.completion.create", request_id: requestId, body: options.body };
            if (options.resumable) message.resumable = true;
            if (options.idempotencyKey) message.idempotency_key = options.idempotencyKey;
            socket.send(message);
          } else {
            socket.send({
              type: "chat.completion.resume",
              request_id: requestId,
              stream_id: this.id,
              starting_after: this.lastEventId,
            });
          }
          sent = true;
          this._socketRequest = [socket, requestId];
          if (this.cancelRequested) socket.send({ type: "chat.completion.cancel", request_id: requestId });
          for await (const message of inbox) {
            if (message.type === "chat.completion.chunk") {
              const { type: _type, request_id: _requestId, sequence_number: sequence, ...chunk } = message;
              this.#absorb(chunk, sequence);
              attempt = 0;
              yield chunk;
            } else if (message.type === "chat.completion.done") {
              this.#learnId(message.stream_id);
              if (Number.isSafeInteger(message.sequence_number)) this.lastEventId = message.sequence_number;
              this.finishReason = message.finish_reason ?? this.finishReason;
              this.usage = message.usage ?? this.usage;
              return;
            } else if (message.type === "error") {
              throw errorFrom(message.error?.status ?? 500, message);
            }
          }
        } catch (error) {
          const repeatable =
            error instanceof APIConnectionError &&
            this.id === null &&
            (!sent || options.idempotencyKey) &&
            !this.cancelRequested &&
            attempt < (options.maxReconnects ?? 5);
          if (!repeatable && !this.#canResume(error)) throw error;
          attempt++;
          this.reconnects++;
          await sleep(1000 * attempt);
        } finally {
          this._socketRequest = null;
          socket.release(requestId);
        }
      }
    } finally {
      this.#finish();
    }
  }
}

/** A client for one gateway and one key. */
export class Tokenwire {
  /**
   * @param {object} options
   * @param {string} options.apiKey the key, sent as "Authorization: Bearer ..."
   * @param {string} [options.baseURL] the gateway's origin (default: this page's)
   */
  constructor({ apiKey, baseURL = globalThis.location?.origin, fetch = globalThis.fetch, WebSocket = globalThis.WebSocket } = {}) {
    if (!apiKey) throw new TypeError("apiKey is required");
    this.apiKey = apiKey;
    this.baseURL = baseURL;
    this.fetch = fetch.bind(globalThis);
    this.WebSocket = WebSocket;
    this._socket = null;
  }

  /** The headers every call carries. */
  headers() {
    return { Authorization: `Bearer ${this.apiKey}` };
  }

  /**
   * Call an endpoint; resolves with the parsed JSON (or the text with {text: true}), throws a
   * TokenwireError subclass for an error status.
   */
  async request(method, path, { body, query, headers = {}, signal, text = false } = {}) {
    const url = new URL(path, this.baseURL);
    for (const [name, value] of Object.entries(query ?? {})) {
      if (value !== undefined && value !== null && value !== "") url.searchParams.set(name, String(value));
    }
    const sent = { ...this.headers(), ...headers };
    if (body !== undefined) sent["Content-Type"] = "application/json";
    let response;
    try {
      response = await this.fetch(url, {
        method,
        headers: sent,
        body: body === undefined ? undefined : JSON.stringify(body),
        signal,
        credentials: "omit",
        cache: "no-store",
        referrerPolicy: "no-referrer",
      });
    } catch (error) {
      if (error?.name === "AbortError") throw error;
      throw new APIConnectionError(`Cannot reach the gateway: ${error?.message ?? error}`, { cause: error });
    }
    if (!response.ok) throw await errorFromResponse(response);
    if (text) return response.text();
    const raw = await response.text();
    return raw ? JSON.parse(raw) : null;
  }

  /** GET /v1/models: the catalog, each with pricing and availability. */
  async models() {
    return (await this.request("GET", "/v1/models")).data;
  }

  /** GET /v1/key: this key's name, limits, models, expiry and balance. */
  key() {
    return this.request("GET", "/v1/key");
  }

  /** GET /v1/usage: this key's ledger rows, totals and balance (query: start, end, model, limit, group_by). */
  usage(query = {}) {
    return this.request("GET", "/v1/usage", { query });
  }

  /**
   * A streamed chat completion. options:
   *   transport       "sse" (default) or "ws"
   *   resumable       keep the stream on the gateway so a dropped connection resumes it
   *   idempotencyKey  a retried request attaches to the first (and is billed once)
   *   maxReconnects   resume attempts after a drop (default 5)
   *   signal          an AbortSignal that cancels the stream
   */
  chatStream(body, options = {}) {
    return new ChatStream(this, { ...options, body });
  }

  /** Continue a resumable stream after event number `after` (0: from the start). */
  resumeStream(streamId, { after = 0, transport = "sse", maxReconnects, signal } = {}) {
    return new ChatStream(this, { transport, resumeId: streamId, after, maxReconnects, signal });
  }

  /** The client's WebSocket (one, shared by its "ws" streams; opened on first use). */
  socket() {
    this._socket ??= new TokenwireSocket(this);
    return this._socket;
  }

  /** Close the WebSocket, if one is open. */
  close() {
    this._socket?.close();
  }
}
