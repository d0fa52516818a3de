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
const RATE_WINDOW_MS = 3000;  // the live total rate spans at least this much, from burst to burst
const BURST_MS = 100;  // a burst's tokens may reach the page over a few frames: one burst still
export const COLORS = ["#1f77b4", "#d62728", "#2ca02c", "#9467bd", "#ff7f0e", "#17becf", "#8c564b", "#e377c2",
  "#7f7f7f", "#bcbd22", "#003f5c", "#a05195", "#2f4b7c", "#f95d6a", "#665191", "#006d2c"];
const EXAMPLES = ["Write a short poem about the sea.", "Name three colors.", "What is the capital of France?",
  "Explain what a CPU does.", "Give me a recipe for pancakes.", "Why is the sky blue?",
  "Tell me a joke about computers.", "Describe a cat in two sentences.", "What is 12 times 12?",
  "List four planets.", "How do birds fly?", "Write a haiku about autumn.", "What is machine learning?",
  "Suggest a name for a dog.", "How does rain form?", "Say hello in three languages."];

class Lane {
  constructor(index, list, start) {
    Object.assign(this, { index, status: null, retryAfter: null, errorText: "", ended: null, parser: new SSEParser() });
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
    this.finish = head.appendChild(document.createElement("span"));
    this.finish.className = "finish";
    this.clip = this.item.appendChild(document.createElement("div"));
    this.clip.className = "clip";
    this.body = this.clip.appendChild(document.createElement("div"));
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
          if (chunk === DONE) { this.item.dataset.state = "done"; this.ended ??= now; continue; }
          const delta = this.answer.add(chunk, now);
          if (delta) this.text.appendData(delta);
          if (chunk.usage) this.points.push([(now - this.answer.start) / 1000, this.answer.count]);
        }
      } catch (error) {
        this.fail(failure(error), now);
      }
    }
    if (event.end) {
      this.ended ??= now;
      if (this.status !== 200) this.fail(describe(this.status ?? 0, this.errorText, this.retryAfter), now);
      else if (this.item.dataset.state === "streaming") this.fail("The stream ended without [DONE].", now);
    }
  }

  fail(message, now = performance.now()) {
    this.ended ??= now;
    const refused = this.status !== null && this.status !== 200;
    this.item.dataset.state = message === "stopped" ? "stopped" : refused ? "refused" : "error";
    const line = this.item.appendChild(document.createElement("p"));
    line.className = "error";
    line.textContent = message;  // text, never HTML
  }

  show() {
    const a = this.answer;
    if (a.first !== null) {
      this.figures.textContent = `${fmt(a.count)} tok · ${fmt(a.rate, 1)}/s`;
      this.figures.title = `first token after ${fmt(a.ttft)} ms`;
      this.item.dataset.tokens = a.count;
    } else if (this.item.dataset.state !== "waiting") {
      this.figures.textContent = this.item.dataset.state;
    }
    this.finish.textContent = a.finish ?? "";
    // A whole number of lines, scrolled to the end: the latest lines show whole, none cut in half at the top.
    const line = parseFloat(getComputedStyle(this.body).lineHeight);
    const lines = Math.max(1, Math.floor(this.clip.clientHeight / line + 0.01));
    this.body.style.height = `${lines * line}px`;
    this.body.scrollTop = this.body.scrollHeight;
  }
}

// Total tokens/s over about the last `windowMs`, from one burst of tokens to another. `samples` are
// [ms, total tokens], one each time the total grew, after the race's [start, 0]. Tokens come in bursts (one
// engine step gives every running lane its next token), so a rate over a fixed window jumps with how many
// bursts fall in it: a saw when the steps are slow. From burst to burst it counts whole steps.
export function burstRate(samples, windowMs) {
  if (samples.length < 2) return null;
  const [last, tokens] = samples[samples.length - 1];
  let base = samples[0];
  for (const sample of samples) {
    if (sample[0] > last - windowMs) break;
    base = sample;
  }
  return last > base[0] ? (tokens - base[1]) / ((last - base[0]) / 1000) : null;
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

// Tokens against time, one thin line per lane (left axis), and the total tokens/s, thick and dark (right axis).
// In a batch the lanes grow alike and their lines overlap: each ends in a dot of its colour, and lanes 9 to 16
// are dashed, so that the colours of overlapping lines alternate along them.
function drawChart(svg, lanes, rates, seconds) {
  const rem = parseFloat(getComputedStyle(document.documentElement).fontSize) || 18;
  const width = svg.clientWidth || 400, height = svg.clientHeight || 250;
  const left = 3 * rem, right = 3 * rem, top = 1.7 * rem, bottom = 1.9 * rem;
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
    element("text", { x: left - 0.35 * rem, y: y(f, 1) + 0.3 * rem, "text-anchor": "end" }, axes).textContent = fmt(f * maxY);
    element("text", { x: width - right + 0.35 * rem, y: y(f, 1) + 0.3 * rem }, axes).textContent = fmt(f * maxR);
    element("text", { x: x(f * maxX), y: height - bottom + 1.25 * rem, "text-anchor": "middle" }, axes)
      .textContent = `${fmt(f * maxX, maxX < 2 ? 1 : 0)} s`;
  }
  element("text", { x: 0.25 * rem, y: 1.05 * rem }, axes).textContent = "tokens per lane";
  element("text", { x: width - 0.25 * rem, y: 1.05 * rem, "text-anchor": "end" }, axes).textContent = "total tokens/s ━";
  // The longest first, so that every shorter line ends visibly on top of it (in a batch, they overlap).
  const order = [...lanes].sort((a, b) => b.answer.count - a.answer.count);
  for (const lane of order) {
    element("polyline", { class: lane.index >= 8 ? "series dashed" : "series", "data-lane": lane.index + 1,
                          stroke: COLORS[lane.index % COLORS.length], points: line(lane.points, maxY) }, svg);
  }
  element("polyline", { class: "total", points: line(rates, maxR) }, svg);
  const ends = element("g", { class: "ends" }, svg);
  for (const lane of order.filter((lane) => lane.points.length > 1)) {
    const [s, v] = lane.points[lane.points.length - 1];
    element("circle", { cx: x(s), cy: y(v, maxY), r: 0.22 * rem, fill: COLORS[lane.index % COLORS.length] }, ends);
  }
}

// Adds the race's total at `now` to `bursts` if it grew; a burst whose tokens reach the page over a few frames
// counts once, at its first.
export function addBurst(bursts, now, tokens) {
  const last = bursts[bursts.length - 1];
  if (tokens <= last[1]) return false;
  if (bursts.length > 1 && now - last[0] < BURST_MS) last[1] = tokens;
  else bursts.push([now, tokens]);
  return true;
}

export function setupRace(currentModel) {
  const startButton = $("race-start"), stopButton = $("race-stop"), list = $("lanes"), chart = $("race-chart");
  const message = $("race-message"), rate = $("race-rate"), done = $("race-done"), sum = $("race-sum");
  let controller = null, shown = [];

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

    list.replaceChildren();
    list.dataset.state = "running";
    message.hidden = true;
    controller = new AbortController();
    startButton.disabled = true;
    stopButton.disabled = false;
    const start = performance.now();  // the race's wall time runs from here to its last lane's end
    const lanes = requests.map((_, i) => new Lane(i, list, start));
    shown = lanes;
    const bursts = [[start, 0]];  // [time, total tokens], each time the total grew: see burstRate
    const rates = [];  // [seconds since start, total tokens/s] for the chart
    let lastChart = 0, pending = false, over = false;
    const total = () => lanes.reduce((all, lane) => all + (lane.answer.count || 0), 0);
    const refresh = (final = false) => {
      pending = false;
      if (over) return;  // a frame asked for before the end: the final figures stay
      over = final;
      const now = performance.now();
      lanes.forEach((lane) => lane.show());
      const finished = lanes.filter((lane) => lane.item.dataset.state !== "streaming"
        && lane.item.dataset.state !== "waiting").length;
      done.textContent = `${finished} of ${n}`;
      const tokens = total();
      if (addBurst(bursts, now, tokens)) {
        const point = [(bursts[bursts.length - 1][0] - start) / 1000, burstRate(bursts, RATE_WINDOW_MS)];
        if (rates.length && rates[rates.length - 1][0] === point[0]) rates[rates.length - 1] = point;
        else rates.push(point);
      }
      // The final total: every lane's tokens over the race's wall time, from sending it to its last lane's end.
      const end = final ? Math.max(...lanes.map((lane) => lane.ended ?? now)) : now;
      const seconds = (end - start) / 1000;
      rate.textContent = fmt(final ? tokens / seconds : burstRate(bursts, RATE_WINDOW_MS), 1);
      sum.textContent = ` · ${fmt(tokens)} tokens in ${fmt(seconds, 1)} s`;
      Object.assign(rate.dataset, { tokens, seconds });
      if (final || now - lastChart > CHART_INTERVAL_MS) {
        lastChart = now;
        drawChart(chart, lanes, rates, seconds);
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
  new ResizeObserver(() => shown.forEach((lane) => lane.show())).observe(list);  // whole lines at any size
}
