// The race: N chat requests at once, each in its own lane, and a chart of tokens against time per lane.
// vLLM batches them continuously, so every lane grows at once; the total tokens/s shows what batching buys.
//
// A browser opens at most 6 connections to one server, so the N requests are not N fetches: the page sends
// them in one request to `page/race`, and the server makes each one through the API and relays its
// status and raw SSE text, tagged with its lane (streaming_tutorial/server/page.py).
import { Answer, chatBody, describe, DONE, failure, fmt, numberFrom, post, sse, SSEParser } from "./api.js";

const $ = (id) => document.getElementById(id);
const SVG = "http://www.w3.org/2000/svg";
const MAX_LANES = 16;
const CHART_INTERVAL_MS = 200;  // the chart redraws 5 times a second: the CPU is the model's
const RATE_WINDOW_MS = 2000;  // tokens arrive in bursts: a shorter window makes a jumpy total rate
export const COLORS = ["#1f77b4", "#d62728", "#2ca02c", "#9467bd", "#ff7f0e", "#17becf", "#8c564b", "#e377c2",
  "#7f7f7f", "#bcbd22", "#003f5c", "#a05195", "#2f4b7c", "#f95d6a", "#665191", "#006d2c"];
const EXAMPLES = ["Write a short poem about the sea.", "Name three colors.", "What is the capital of France?",
  "Explain what a CPU does.", "Give me a recipe for pancakes.", "Why is the sky blue?",
  "Tell me a joke about computers.", "Describe a cat in two sentences.", "What is 12 times 12?",
  "List four planets.", "How do birds fly?", "Write a haiku about autumn.", "What is machine learning?",
  "Suggest a name for a dog.", "How does rain form?", "Say hello in three languages."];

class Lane {
  constructor(index, list, start) {
    Object.assign(this, { index, status: null, retryAfter: null, errorText: "", parser: new SSEParser() });
    this.answer = new Answer(start);
    this.points = [[0, 0]];  // [seconds since start, tokens]
    this.item = document.createElement("li");
    this.item.className = "lane";
    this.item.dataset.state = "waiting";
    this.item.style.setProperty("--lane-color", COLORS[index % COLORS.length]);
    const head = this.item.appendChild(document.createElement("p"));
    head.className = "lane-head";
    head.appendChild(document.createElement("b")).textContent = `Lane ${index + 1}`;
    this.figures = head.appendChild(document.createElement("span"));
    this.figures.textContent = "waiting";
    this.body = this.item.appendChild(document.createElement("div"));
    this.body.className = "text";
    this.text = this.body.appendChild(document.createTextNode(""));
    list.append(this.item);
  }

  // One relayed event of this lane: its response's status, a piece of its body, or its end.
  take(event, now) {
    if ("status" in event) {
      Object.assign(this, { status: event.status, retryAfter: event.retry_after });
      this.item.dataset.state = event.status === 200 ? "streaming" : "refused";
    }
    if (event.text && this.status !== 200) this.errorText += event.text;
    if (event.text && this.status === 200 && this.item.dataset.state === "streaming") {
      try {
        for (const chunk of this.parser.push(event.text)) {
          if (chunk === DONE) { this.item.dataset.state = "done"; continue; }
          const delta = this.answer.add(chunk, now);
          if (delta) this.text.appendData(delta);
          if (chunk.usage) this.points.push([(now - this.answer.start) / 1000, this.answer.count]);
        }
      } catch (error) {
        this.fail(failure(error));
      }
    }
    if (event.end) {
      if (this.status !== 200) this.fail(describe(this.status ?? 0, this.errorText, this.retryAfter));
      else if (this.item.dataset.state === "streaming") this.fail("The stream ended without [DONE].");
    }
  }

  fail(message) {
    const refused = this.status !== null && this.status !== 200;
    this.item.dataset.state = message === "stopped" ? "stopped" : refused ? "refused" : "error";
    const line = this.item.appendChild(document.createElement("p"));
    line.className = "error";
    line.textContent = message;  // text, never HTML
  }

  show() {
    const a = this.answer;
    if (a.first !== null) {
      this.figures.textContent = `${fmt(a.count)} tok · ${fmt(a.rate, 1)} tok/s` + (a.finish ? ` · ${a.finish}` : "");
      this.figures.title = `first token after ${fmt(a.ttft)} ms`;
    } else if (this.item.dataset.state !== "waiting") {
      this.figures.textContent = this.item.dataset.state;
    }
    this.body.scrollTop = this.body.scrollHeight;
  }
}

// A round axis maximum at or above `value`: 1, 1.5, 2, 3, 4, 5, 6 or 8 times a power of ten.
function niceMax(value) {
  const power = 10 ** Math.floor(Math.log10(Math.max(value, 1)));
  return [1, 1.5, 2, 3, 4, 5, 6, 8, 10].map((m) => m * power).find((m) => m >= value);
}

function element(name, attributes, parent) {
  const node = document.createElementNS(SVG, name);
  for (const [key, value] of Object.entries(attributes)) node.setAttribute(key, value);
  return parent.appendChild(node);
}

// Tokens against time, one line per lane (left axis), and the total tokens/s, dashed (right axis).
function drawChart(svg, lanes, rates, seconds) {
  const width = svg.clientWidth || 400, height = svg.clientHeight || 250;
  const left = 52, right = 52, top = 30, bottom = 34;
  const maxX = niceMax(Math.max(seconds, 1));
  const maxY = niceMax(Math.max(10, ...lanes.map((lane) => lane.answer.count)));
  const maxR = niceMax(Math.max(10, ...rates.map(([, r]) => r)));
  const x = (s) => left + (s / maxX) * (width - left - right);
  const y = (value, max) => height - bottom - (value / max) * (height - top - bottom);
  const line = (points, max) => points.map(([s, v]) => `${x(s).toFixed(1)},${y(v, max).toFixed(1)}`).join(" ");
  svg.setAttribute("viewBox", `0 0 ${width} ${height}`);
  svg.replaceChildren();
  const axes = element("g", { class: "axes" }, svg);
  for (const f of [0, 0.5, 1]) {
    element("line", { x1: x(0), x2: x(maxX), y1: y(f, 1), y2: y(f, 1) }, axes);
    element("text", { x: left - 6, y: y(f, 1) + 5, "text-anchor": "end" }, axes).textContent = fmt(f * maxY);
    element("text", { x: width - right + 6, y: y(f, 1) + 5 }, axes).textContent = fmt(f * maxR);
    element("text", { x: x(f * maxX), y: height - bottom + 22, "text-anchor": "middle" }, axes)
      .textContent = `${fmt(f * maxX, maxX < 2 ? 1 : 0)} s`;
  }
  element("text", { x: 4, y: 18 }, axes).textContent = "tokens per lane";
  element("text", { x: width - 4, y: 18, "text-anchor": "end" }, axes).textContent = "total tokens/s - - -";
  // The longest first, so that every shorter line ends visibly on top of it (in a batch, they overlap).
  for (const lane of [...lanes].sort((a, b) => b.answer.count - a.answer.count)) {
    element("polyline", { class: "series", "data-lane": lane.index + 1, stroke: COLORS[lane.index % COLORS.length],
                          points: line(lane.points, maxY) }, svg);
  }
  element("polyline", { class: "total", points: line(rates, maxR) }, svg);
}

export function setupRace(currentModel) {
  const startButton = $("race-start"), stopButton = $("race-stop"), list = $("lanes"), chart = $("race-chart");
  const message = $("race-message"), rate = $("race-rate"), done = $("race-done");
  let controller = null;

  async function run(event) {
    event.preventDefault();
    if (controller) return;
    const n = Math.min(MAX_LANES, Math.max(1, Math.round(numberFrom($("race-n")) || 1)));
    const prompts = $("race-prompts").value.split("\n").map((line) => line.trim()).filter(Boolean);
    if (!prompts.length) prompts.push(EXAMPLES[0]);
    const temperature = numberFrom($("race-temperature")), maxTokens = numberFrom($("race-max-tokens"));
    const system = $("system").value.trim();
    const requests = Array.from({ length: n }, (_, i) => chatBody(currentModel(), [
      ...(system ? [{ role: "system", content: system }] : []), { role: "user", content: prompts[i % prompts.length] },
    ], temperature, maxTokens));

    const start = performance.now();
    list.replaceChildren();
    list.dataset.state = "running";
    const lanes = requests.map((_, i) => new Lane(i, list, start));
    message.hidden = true;
    controller = new AbortController();
    startButton.disabled = true;
    stopButton.disabled = false;
    const totals = [[start, 0]];  // [time, total tokens]: the live rate is over the last RATE_WINDOW_MS
    const rates = [];  // [seconds since start, total tokens/s] for the chart
    let lastChart = 0, pending = false;
    const total = () => lanes.reduce((sum, lane) => sum + (lane.answer.count || 0), 0);
    const refresh = (final = false) => {
      pending = false;
      const now = performance.now();
      lanes.forEach((lane) => lane.show());
      const finished = lanes.filter((lane) => lane.item.dataset.state !== "streaming"
        && lane.item.dataset.state !== "waiting").length;
      done.textContent = `${finished} of ${n}`;
      const tokens = total();
      totals.push([now, tokens]);
      while (totals.length > 2 && totals[1][0] < now - RATE_WINDOW_MS) totals.shift();
      const last = Math.max(...lanes.map((lane) => lane.answer.last ?? 0));
      const live = (tokens - totals[0][1]) / Math.max((now - totals[0][0]) / 1000, 0.001);
      rate.textContent = fmt(final ? (last > start ? tokens / ((last - start) / 1000) : null) : live, 1);
      if (final || now - lastChart > CHART_INTERVAL_MS) {
        lastChart = now;
        if (!final) rates.push([(now - start) / 1000, live]);
        drawChart(chart, lanes, rates, ((final ? last : now) - start) / 1000);
      }
    };
    refresh();
    try {
      const response = await post("page/race", { requests }, controller.signal);
      for await (const event of sse(response)) {
        if (event === DONE) break;
        lanes[event.lane].take(event, performance.now());
        if (!pending) { pending = true; requestAnimationFrame(() => refresh()); }
      }
    } catch (error) {
      const text = failure(error);
      lanes.filter((lane) => ["waiting", "streaming"].includes(lane.item.dataset.state))
        .forEach((lane) => lane.fail(text));
      if (text !== "stopped") { message.textContent = text; message.hidden = false; }
    } finally {
      controller = null;
      startButton.disabled = false;
      stopButton.disabled = true;
      refresh(true);
      list.dataset.state = "finished";
    }
  }

  $("race-form").addEventListener("submit", run);
  stopButton.addEventListener("click", () => controller?.abort());
  $("race-examples").addEventListener("click", () => { $("race-prompts").value = EXAMPLES.join("\n"); });
  new ResizeObserver(() => { if (!controller && list.children.length === 0) drawChart(chart, [], [], 10); }).observe(chart);
}
