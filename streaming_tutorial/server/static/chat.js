// The chat: multi-turn history, each answer painted token by token as its chunks arrive, and its figures.
import { Answer, chatBody, DONE, failure, fmt, numberFrom, post, sse } from "./api.js";

const $ = (id) => document.getElementById(id);

export function setupChat(currentModel) {
  const form = $("chat-form"), prompt = $("prompt"), send = $("send"), stop = $("stop"), list = $("messages");
  let history = [];  // the turns sent with the next request: {role, content}
  let controller = null;

  function addTurn(role, text) {
    const item = document.createElement("li");
    item.className = `turn ${role}`;
    const body = document.createElement("div");
    body.className = "text";
    body.append(document.createTextNode(text));  // text, never HTML
    item.append(body);
    list.append(item);
    item.scrollIntoView({ block: "end" });
    return item;
  }

  function showFigures(item, answer, finish) {
    const figures = item.querySelector(".figures") ?? item.appendChild(document.createElement("p"));
    figures.className = "figures";
    figures.textContent = `first token ${fmt(answer.ttft)} ms · ${fmt(answer.rate, 1)} tokens/s · `
      + `${fmt(answer.count)} tokens · finish: ${finish ?? answer.finish ?? "…"}`;
    Object.assign(item.dataset, { ttftMs: answer.ttft ?? "", tokens: answer.count, finish: finish ?? answer.finish ?? "" });
  }

  async function ask(event) {
    event.preventDefault();
    const start = event.timeStamp;  // when Send was pressed, in performance.now()'s time base
    const question = prompt.value.trim();
    if (!question || controller) return;
    prompt.value = "";
    const turns = history;  // "New conversation" during this answer starts a new array
    turns.push({ role: "user", content: question });
    const system = $("system").value.trim();
    const messages = [...(system ? [{ role: "system", content: system }] : []), ...turns];
    controller = new AbortController();
    // The request goes out first; the page's own work happens while the server works.
    const request = post("v1/chat/completions", chatBody(currentModel(), messages,
      numberFrom($("chat-temperature")), numberFrom($("chat-max-tokens"))), controller.signal);
    const asked = addTurn("user", question);
    const item = addTurn("assistant", "");
    item.dataset.state = "waiting";
    const text = item.querySelector(".text").firstChild;
    const answer = new Answer(start);
    send.disabled = true;
    stop.disabled = false;
    let pending = false;  // figures and scrolling at most once per frame; the text itself at once
    const refresh = () => {
      pending = false;
      if (item.dataset.state !== "streaming") return;  // the end has shown the final figures
      showFigures(item, answer);
      item.scrollIntoView({ block: "end" });
    };
    try {
      const response = await request;
      item.dataset.state = "streaming";
      for await (const chunk of sse(response)) {
        if (chunk === DONE) break;
        const delta = answer.add(chunk);
        if (!delta && !chunk.usage) continue;
        if (delta) text.appendData(delta);
        if (delta && answer.chunks === 1) requestAnimationFrame(() => { item.dataset.paintedMs = performance.now() - start; });
        if (!pending) { pending = true; requestAnimationFrame(refresh); }
      }
      item.dataset.state = "done";
      showFigures(item, answer);
    } catch (error) {
      const message = failure(error);
      item.dataset.state = message === "stopped" ? "stopped" : "error";
      if (message === "stopped") {
        showFigures(item, answer, "stopped by you");
      } else {
        const line = item.appendChild(document.createElement("p"));
        line.className = "error";
        line.textContent = message;
      }
    } finally {
      controller = null;
      send.disabled = false;
      stop.disabled = true;
      if (answer.text) {
        turns.push({ role: "assistant", content: answer.text });
      } else {  // nothing came back: this question is not part of the conversation
        turns.pop();
        asked.classList.add("unsent");
      }
      item.scrollIntoView({ block: "end" });
    }
  }

  form.addEventListener("submit", ask);
  prompt.addEventListener("keydown", (event) => {
    if (event.key === "Enter" && !event.shiftKey && !event.isComposing) {
      event.preventDefault();
      form.requestSubmit();
    }
  });
  stop.addEventListener("click", () => controller?.abort());
  $("chat-new").addEventListener("click", () => {
    controller?.abort();
    history = [];
    list.replaceChildren();
    prompt.focus();
  });
}
