// The server panel: what /health says about the server, and its load from /metrics, about once a second.
// When the server stops answering, or answers that its engine is dead or restarting, the panel says so at once,
// and goes back to "healthy" by itself when the server does.
import { fmt, headers } from "./api.js";

const $ = (id) => document.getElementById(id);
const POLL_MS = 1000;
const TIMEOUT_MS = 3000;
// "Generating" is vLLM's generation-token counter over the last RATE_WINDOW_MS of polls. The counter grows once
// per engine step, for every running request at once; on a loaded CPU a step can take longer than a poll, and a
// one-poll window then reads 0 beside a full batch, then twice the rate.
const RATE_WINDOW_MS = 5000;
// `name{label="value",...} value`: label values may hold spaces and braces inside their quotes.
const SAMPLE = /^([A-Za-z_:][\w:]*)(?:\{(?:[^"}]|"(?:[^"\\]|\\.)*")*\})?\s+(\S+)/;

// Prometheus text -> {metric name: sum over its label sets}.
export function parseMetrics(text) {
  const sums = {};
  for (const line of text.split("\n")) {
    const match = !line.startsWith("#") && SAMPLE.exec(line);
    if (match) sums[match[1]] = (sums[match[1]] ?? 0) + Number(match[2]);
  }
  return sums;
}

// Tokens/s from `samples` ({at: ms, tokens: counter}, oldest first, over the window) with `running` requests:
// 0 when none runs, null ("–") when some run but the window holds no step yet.
export function generationRate(samples, running) {
  if (!running) return 0;
  const first = samples[0], last = samples[samples.length - 1];
  if (!first || last.at <= first.at || last.tokens <= first.tokens) return null;
  return (last.tokens - first.tokens) / ((last.at - first.at) / 1000);
}

// `samples` with the counter read at `now` added, and those older than the window dropped (one is kept from
// before it, so that the window is full).
export function addSample(samples, now, tokens) {
  const kept = samples.length && tokens < samples[samples.length - 1].tokens ? [] : [...samples];  // a new engine's
  kept.push({ at: now, tokens });
  while (kept.length > 2 && kept[1].at <= now - RATE_WINDOW_MS) kept.shift();
  return kept;
}

async function get(path) {
  return fetch(path, { headers: headers(), signal: AbortSignal.timeout(TIMEOUT_MS), cache: "no-store" });
}

export function setupPanel(onHealthy) {
  const status = $("status"), problem = $("s-problem"), server = $("server");
  let samples = [];  // the generation-token counter, {at, tokens}, over the last RATE_WINDOW_MS: the rate

  function setState(state, label, detail = "") {
    status.dataset.state = state;
    status.textContent = label;
    server.dataset.state = state;
    problem.hidden = !detail;
    problem.textContent = detail;  // text, never HTML
  }

  async function readHealth() {
    let response;
    try {
      response = await get("health");
    } catch {
      setState("unreachable", "server unreachable",
               "The server does not answer. The figures below are the last ones seen; retrying every second.");
      return false;
    }
    const text = await response.text();
    let body = {};
    try { body = JSON.parse(text); } catch { /* plain vLLM's /health has an empty body */ }
    if (body.status === "restarting") {  // a new engine is starting in the same server: no reload needed
      setState("restarting", "engine restarting",
               `${body.error ?? "The server's engine is restarting."} This page carries on by itself.`);
    } else if (!response.ok) {
      const dead = response.status === 503;
      setState("dead", dead ? "engine dead" : `health: HTTP ${response.status}`,
               dead ? `The engine has stopped: ${body.error ?? "no details"}. Restart the server.` : text.slice(0, 200));
    } else {
      setState("healthy", "healthy");
    }
    $("s-model").textContent = body.model ?? "–";
    $("s-device").textContent = body.device ?? "–";
    $("s-version").textContent = body.vllm_version ?? "–";
    $("s-context").textContent = body.max_model_len ? `${fmt(body.max_model_len)} tokens` : "–";
    return response.ok;
  }

  async function readMetrics() {
    try {
      const response = await get("metrics");
      if (!response.ok) throw new Error(`HTTP ${response.status}`);
      const m = parseMetrics(await response.text());
      const now = performance.now(), generated = m["vllm:generation_tokens_total"];
      $("s-running").textContent = fmt(m["vllm:num_requests_running"]);
      $("s-waiting").textContent = fmt(m["vllm:num_requests_waiting"]);
      $("s-kv").textContent = m["vllm:kv_cache_usage_perc"] === undefined ? "–" : `${fmt(100 * m["vllm:kv_cache_usage_perc"], 1)} %`;
      samples = generated === undefined ? [] : addSample(samples, now, generated);
      const rate = generated === undefined ? null : generationRate(samples, m["vllm:num_requests_running"]);
      $("s-gen").textContent = rate === null ? "–" : `${fmt(rate, 1)} tok/s`;
    } catch {
      samples = [];
      for (const id of ["s-running", "s-waiting", "s-kv", "s-gen"]) $(id).textContent = "–";
    }
  }

  async function poll() {
    const started = performance.now();
    const healthy = await readHealth();
    if (status.dataset.state !== "unreachable") await readMetrics();
    if (healthy) onHealthy();
    setTimeout(poll, Math.max(0, POLL_MS - (performance.now() - started)));
  }
  poll();
}
