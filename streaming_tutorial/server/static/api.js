// Talking to the server: relative URLs (so --root-path and proxies work), the API key as a bearer token,
// Server-Sent Events read as they arrive, and every failure turned into one line of plain text.

const KEY_ITEM = "vllm-tutorial:api-key";
export const DONE = "[DONE]";

// sessionStorage: the key lives as long as this tab, and the page itself never contains it.
export const apiKey = {
  get: () => sessionStorage.getItem(KEY_ITEM) || "",
  set: (key) => (key ? sessionStorage.setItem(KEY_ITEM, key) : sessionStorage.removeItem(KEY_ITEM)),
};

export function headers() {
  const key = apiKey.get();
  return { "Content-Type": "application/json", ...(key && { Authorization: `Bearer ${key}` }) };
}

export class ApiError extends Error {}

// vLLM's {"error": {"message"}} (or any other body) as one short line of text.
function messageOf(text) {
  let message = text;
  try {
    const body = JSON.parse(text);
    message = body.error?.message ?? body.detail ?? body.message ?? text;
  } catch { /* not JSON: the text itself */ }
  return String(message).replace(/\s+/g, " ").trim().slice(0, 300) || "no details";
}

// One line for a non-200 answer, with when to retry for 429 and 503.
export function describe(status, text, retryAfter) {
  if (status === 401) {
    window.dispatchEvent(new Event("api-key-needed"));
    return apiKey.get() ? "The server did not accept this API key." : "This server needs an API key: paste it above.";
  }
  const retry = retryAfter && (status === 429 || status === 503) ? ` Retry after ${retryAfter} s.` : "";
  return `HTTP ${status}: ${messageOf(text)}${retry}`;
}

// The message for a fetch that threw: the user's Stop, or no answer from the server at all.
export function failure(error) {
  if (error.name === "AbortError") return "stopped";
  return error instanceof ApiError ? error.message : `Server unreachable (${error.message}).`;
}

async function call(path, options) {
  const response = await fetch(path, { ...options, headers: headers() });
  if (!response.ok) {
    throw new ApiError(describe(response.status, await response.text(), response.headers.get("Retry-After")));
  }
  return response;
}

export const getJSON = async (path, signal) => (await call(path, { signal })).json();
export const post = (path, body, signal) => call(path, { method: "POST", body: JSON.stringify(body), signal });

// Server-Sent Events as vLLM sends them: `data: <json>` lines, a blank line after each event, `data: [DONE]`.
// Fed any pieces of text, returns the payloads they complete.
export class SSEParser {
  #buffer = "";
  #data = [];

  push(text) {
    const payloads = [];
    const lines = (this.#buffer + text).split("\n");
    this.#buffer = lines.pop();
    for (const raw of lines) {
      const line = raw.endsWith("\r") ? raw.slice(0, -1) : raw;
      if (line === "" && this.#data.length) {
        const payload = this.#data.join("\n");
        this.#data = [];
        payloads.push(payload.trim() === DONE ? DONE : JSON.parse(payload));
      } else if (line.startsWith("data:")) {
        this.#data.push(line.slice(5).replace(/^ /, ""));
      } // `event:` and `id:` lines are not used by chat completions; `:` lines are keep-alive comments
    }
    return payloads;
  }
}

// Each event's payload, as soon as its bytes arrive.
export async function* sse(response) {
  const parser = new SSEParser(), decoder = new TextDecoder();
  const reader = response.body.getReader();
  for (;;) {
    const { value, done } = await reader.read();
    if (done) break;
    yield* parser.push(decoder.decode(value, { stream: true }));
  }
  yield* parser.push(decoder.decode() + "\n\n");
}

// One streamed chat completion: its text so far, its timings (performance.now() ms) and its figures.
// Token counts come from `usage` (sent on every chunk with continuous_usage_stats): a chunk may carry
// several tokens, or a token no text yet.
export class Answer {
  constructor(start) {
    Object.assign(this, { start, first: null, last: null, chunks: 0, tokens: null, finish: null, text: "" });
  }

  // The text a chunk adds; throws the error a stream may end with after its 200.
  add(chunk, now = performance.now()) {
    if (chunk.error) throw new ApiError(`Error during the stream: ${messageOf(JSON.stringify(chunk))}`);
    if (chunk.usage) this.tokens = chunk.usage.completion_tokens;
    const choice = chunk.choices?.[0];
    if (choice?.finish_reason) this.finish = choice.finish_reason;
    const delta = choice?.delta?.content ?? choice?.text ?? "";
    if (delta) {
      this.first ??= now;
      this.last = now;
      this.chunks += 1;
      this.text += delta;
    }
    return delta;
  }

  get count() { return this.tokens ?? this.chunks; }
  get ttft() { return this.first === null ? null : this.first - this.start; }
  // Decoding speed after the first token, as vLLM's benchmark computes it: 1 / time per output token.
  get rate() {
    return this.count > 1 && this.last > this.first ? (this.count - 1) / ((this.last - this.first) / 1000) : null;
  }
}

export const fmt = (value, digits = 0) => (value === null || value === undefined || Number.isNaN(value))
  ? "–" : value.toLocaleString("en-US", { maximumFractionDigits: digits, minimumFractionDigits: digits });

// A number from an <input>, or undefined (the server's default) when the box is empty.
export const numberFrom = (input) => (input.value.trim() === "" ? undefined : Number(input.value));

// Request body shared by the chat and the race.
export function chatBody(model, messages, temperature, maxTokens) {
  return {
    ...(model && { model }), messages, temperature, max_tokens: maxTokens, stream: true,
    stream_options: { include_usage: true, continuous_usage_stats: true },
  };
}
