/**
 * One answer on screen: its status line, its text rendered as safe Markdown at most once per
 * frame while it streams, and its figures (TTFT, tokens/s, tokens, cost, finish reason).
 * The panel's data-state (idle, streaming, done, cancelled, error) tells tests and styles
 * where it stands.
 */

import { describeError, el, formatInt, formatMs, formatUSD } from "./common.js";
import { deltaText } from "./tokenwire.js";
import { renderMarkdown } from "./markdown.js";

const TRANSPORT_NAMES = { sse: "SSE", ws: "WebSocket" };

/** What a completion costs in micro-dollars, rounded as the gateway's ledger rounds it. */
export function costMicro(model, usage) {
  if (!model?.pricing || !usage) return null;
  const perMillion = (usd) => BigInt(Math.round(Number(usd) * 1e6));
  const scaled =
    BigInt(usage.prompt_tokens ?? 0) * perMillion(model.pricing.input_usd_per_mtok) +
    BigInt(usage.completion_tokens ?? 0) * perMillion(model.pricing.output_usd_per_mtok);
  return Number((scaled + 500000n) / 1000000n);
}

export class AnswerView {
  /** @param {HTMLElement} panel holds .answer-status, .answer and .stats */
  constructor(panel) {
    this.panel = panel;
    this.status = panel.querySelector(".answer-status");
    this.body = panel.querySelector(".answer");
    this.stats = panel.querySelector(".stats");
    this.reset();
  }

  reset() {
    this.base = "";
    this.text = "";
    this.sentAt = null;
    this.firstAt = null;
    this.lastAt = null;
    this.ttftMs = null;
    this.chunks = 0;
    this.frame = null;
  }

  /** A new answer: `base` is text kept from before (a resume after a reload). */
  start(transport, { base = "", ttftMs = null, resumed = false } = {}) {
    this.reset();
    this.resumed = resumed;
    this.base = base;
    this.text = base;
    this.ttftMs = ttftMs;
    this.transport = transport;
    this.sentAt = performance.now();
    this.panel.dataset.state = "streaming";
    this.panel.setAttribute("aria-busy", "true");
    this.status.textContent = resumed ? `Resuming over ${TRANSPORT_NAMES[transport]}…` : `Waiting for the first token over ${TRANSPORT_NAMES[transport]}…`;
    this.stats.replaceChildren();
    this.render();
  }

  /** A chunk arrived (`stream` holds the text so far); returns whether it carried text. */
  chunk(chunk, stream) {
    const now = performance.now();
    const text = deltaText(chunk);
    this.text = this.base + stream.text;
    if (!text) return false;
    this.chunks++;
    if (this.firstAt === null) {
      this.firstAt = now;
      if (this.ttftMs === null) this.ttftMs = now - this.sentAt;
      this.status.textContent = `Streaming over ${TRANSPORT_NAMES[this.transport]}…`;
    }
    this.lastAt = now;
    this.schedule();
    return true;
  }

  schedule() {
    if (this.frame !== null) return;
    this.frame = requestAnimationFrame(() => {
      this.frame = null;
      this.render();
    });
  }

  render() {
    renderMarkdown(this.text, this.body);
  }

  /** The stream ended (normally or cancelled). */
  end(stream, model) {
    if (this.frame !== null) cancelAnimationFrame(this.frame);
    this.frame = null;
    this.text = this.base + stream.text;
    this.render();
    const cancelled = stream.finishReason === "cancelled";
    this.panel.dataset.state = cancelled ? "cancelled" : "done";
    this.panel.removeAttribute("aria-busy");
    this.status.textContent = cancelled ? "Stopped: the generation was cancelled." : `Done (${stream.finishReason ?? "no finish reason"}).`;
    const usage = stream.usage;
    const completion = usage?.completion_tokens ?? null;
    const seconds = this.firstAt !== null && this.lastAt > this.firstAt ? (this.lastAt - this.firstAt) / 1000 : null;
    const rate = completion !== null && seconds && !this.resumed ? (Math.max(completion - 1, 0) / seconds).toFixed(1) : "–";
    const cost = costMicro(model, usage);
    this.figures([
      ["ttft", "TTFT", formatMs(this.ttftMs)],
      ["rate", "Tokens/s", rate],
      ["tokens", "Tokens", usage ? `${formatInt(completion)} out · ${formatInt(usage.prompt_tokens)} in` : "–"],
      ["cost", "Cost", cost === null ? "–" : formatUSD(cost)],
      ["finish", "Finish", stream.finishReason ?? "–"],
      ["transport", "Transport", TRANSPORT_NAMES[stream.transport] + (stream.reconnects ? ` (resumed ${stream.reconnects}×)` : "")],
    ]);
  }

  fail(error) {
    if (this.frame !== null) cancelAnimationFrame(this.frame);
    this.frame = null;
    this.render();
    this.panel.dataset.state = "error";
    this.panel.removeAttribute("aria-busy");
    this.status.textContent = `Failed: ${describeError(error)}`;
  }

  figures(rows) {
    this.stats.replaceChildren(...rows.map(([key, name, value]) => el("div", { "data-stat": key }, el("dt", {}, name), el("dd", {}, value))));
  }
}
