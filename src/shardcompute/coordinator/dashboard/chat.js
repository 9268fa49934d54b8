// The chat: streams from /v1/chat/completions, keeps the conversation, and shows each reply's
// rate. It sends max_tokens only when the user sets one, so answers run until the model stops.
// Stop aborts the fetch; the coordinator sees the disconnect and frees the request's slot.

import { apiFetch, readEvents, Unauthorized } from "./api.js";
import { el } from "./dom.js";

const $ = (id) => document.getElementById(id);

export class Chat {
  /** `model()` names the served model; `onUnauthorized(message)` asks for the API key. */
  constructor({ model, onUnauthorized }) {
    this.model = model;
    this.onUnauthorized = onUnauthorized;
    this.history = [];
    this.conversation = 0; // grows on "New chat", so a reply still ending joins no other
    this.controller = null;
    $("chat-form").addEventListener("submit", (e) => { e.preventDefault(); this.send(); });
    $("chat-input").addEventListener("keydown", (e) => {
      if (e.key === "Enter" && !e.shiftKey) { e.preventDefault(); this.send(); }
    });
    $("chat-stop").addEventListener("click", () => this.controller?.abort());
    $("chat-reset").addEventListener("click", () => this.reset());
  }

  reset() {
    this.controller?.abort();
    this.conversation += 1;
    this.history = [];
    $("chat-log").replaceChildren();
  }

  /** The request body: the conversation so far plus `text`, and the settings. */
  async body(text) {
    const system = $("chat-system").value.trim();
    const messages = [
      ...(system ? [{ role: "system", content: system }] : []),
      ...this.history,
      { role: "user", content: text },
    ];
    const body = {
      model: await this.model(),
      messages,
      stream: true,
      stream_options: { include_usage: true },
      temperature: Number($("chat-temperature").value || 0),
    };
    const maxTokens = $("chat-max-tokens").value.trim();
    if (maxTokens) body.max_tokens = Number(maxTokens);
    return body;
  }

  async send() {
    const input = $("chat-input");
    const text = input.value.trim();
    if (!text || this.controller) return;
    input.value = "";
    const conversation = this.conversation;
    this.addMessage("user", text);
    const reply = this.addMessage("assistant", "");
    this.setBusy(new AbortController());
    const start = performance.now();
    let outcome;
    try {
      outcome = await this.stream(await this.body(text), reply, start);
    } catch (e) {
      outcome = this.failure(e);
    } finally {
      this.setBusy(null);
    }
    reply.node.dataset.status = outcome.status;
    reply.stats.textContent = outcome.stats;
    // A stopped reply stays in the conversation as far as it got, unless it got nowhere.
    const said = reply.text.textContent;
    if (outcome.keep && conversation === this.conversation && (said || outcome.status === "done")) {
      this.history.push({ role: "user", content: text }, { role: "assistant", content: said });
    }
  }

  /** Read the streamed reply into `reply`; what happened, and the stats line. */
  async stream(body, reply, start) {
    const response = await apiFetch("/v1/chat/completions", {
      method: "POST",
      headers: { "Content-Type": "application/json" },
      body: JSON.stringify(body),
      signal: this.controller.signal,
    });
    let first = null, tokens = null, finish = null;
    for await (const { data } of readEvents(response)) {
      if (data === "[DONE]") break;
      const chunk = JSON.parse(data);
      if (chunk.error) throw new Error(chunk.error.message || "the server failed this request");
      const choice = chunk.choices?.[0];
      const piece = choice?.delta?.content || "";
      if (piece) {
        first ??= performance.now();
        reply.text.textContent += piece;
        this.scroll();
      }
      finish = choice?.finish_reason || finish;
      if (chunk.usage) tokens = chunk.usage.completion_tokens;
    }
    return { status: "done", keep: true, stats: rateLine(tokens, start, first, performance.now(), finish) };
  }

  failure(e) {
    if (e.name === "AbortError") return { status: "stopped", keep: true, stats: "stopped" };
    if (e instanceof Unauthorized) this.onUnauthorized(e.message);
    return { status: "error", keep: false, stats: `error: ${e.message} (not kept in the conversation)` };
  }

  setBusy(controller) {
    this.controller = controller;
    $("chat-stop").disabled = !controller;
    $("chat-send").disabled = !!controller;
  }

  addMessage(role, text) {
    const textNode = el("span", { class: "text", text });
    const stats = el("span", { class: "stats" });
    const status = role === "assistant" ? { status: "streaming" } : {};
    const node = el("div", { class: `message ${role}`, data: status },
      role === "assistant" ? [textNode, stats] : [textNode]);
    $("chat-log").append(node);
    this.scroll();
    return { node, text: textNode, stats };
  }

  scroll() {
    const log = $("chat-log");
    log.scrollTop = log.scrollHeight;
  }
}

/** "N tokens, X tok/s, first token Y s": the decode rate after the first token. */
function rateLine(tokens, start, first, end, finish) {
  const n = tokens ?? 0;
  const decode = first === null ? 0 : (end - first) / 1000;
  const rate = n > 1 && decode > 0 ? (n - 1) / decode : 0;
  const ttft = ((first ?? end) - start) / 1000;
  const cut = finish === "length" ? ", cut at max tokens" : "";
  return `${n} tokens, ${rate.toFixed(1)} tok/s, first token ${ttft.toFixed(2)} s${cut}`;
}
