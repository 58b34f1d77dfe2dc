/**
 * The playground (/): pick a model, send a prompt over SSE or WebSocket (or race both), watch
 * the answer stream in, stop it, and get it back after a reload.
 *
 * Single answers are resumable and carry an Idempotency-Key; what is needed to pick one up
 * again (stream id, last event number, text so far, or the request and its key while the id
 * is not known yet) is kept in sessionStorage, so reloading the page mid-answer resumes it.
 */

import { AnswerView } from "./answer.js";
import { ArrivalPlot } from "./charts.js";
import { byId, describeError, el, formatPrice, setupKeyBar, showError } from "./common.js";

const PENDING_ITEM = "tokenwire.pending";
const MODEL_ITEM = "tokenwire.model";
const SAVE_EVERY_MS = 150;

const form = byId("chat-form");
const modelSelect = byId("model");
const modelInfo = byId("model-info");
const sendButton = byId("send");
const stopButton = byId("stop");
const errorBox = byId("chat-error");
const single = new AnswerView(byId("single"));
const racePanel = byId("race");
const raceViews = [new AnswerView(byId("race-sse")), new AnswerView(byId("race-ws"))];
const verdict = byId("race-verdict");
const plot = new ArrivalPlot([
  { name: "sse", className: "s-sse" },
  { name: "ws", className: "s-ws" },
]);
byId("race-plot").append(plot.element);

let client = null;
let models = new Map();
let running = []; // the streams of the answer in progress
let pending = null; // what is saved for a resume after a reload
let savedAt = 0;

function transportChoice() {
  return form.querySelector('input[name="transport"]:checked').value;
}

function showMode(mode) {
  racePanel.hidden = mode !== "race";
  byId("single").hidden = mode === "race";
}

function setBusy(busy) {
  sendButton.disabled = busy || !client || !modelSelect.value;
  stopButton.disabled = !busy;
}

function numberField(id, parse) {
  const raw = byId(id).value.trim();
  if (raw === "") return undefined;
  const value = parse(raw);
  return Number.isFinite(value) ? value : undefined;
}

/** The chat-completions body from the form. */
function requestBody() {
  const messages = [];
  const system = byId("system").value;
  if (system.trim()) messages.push({ role: "system", content: system });
  messages.push({ role: "user", content: byId("prompt").value });
  const body = { model: modelSelect.value, messages, stream: true, stream_options: { include_usage: true } };
  const parameters = {
    temperature: numberField("temperature", Number),
    top_p: numberField("top-p", Number),
    max_tokens: numberField("max-tokens", (raw) => parseInt(raw, 10)),
    seed: numberField("seed", (raw) => parseInt(raw, 10)),
  };
  for (const [name, value] of Object.entries(parameters)) if (value !== undefined) body[name] = value;
  return body;
}

/** A model's price on the caller's plan: one figure when the plan's price is flat. */
function shortPrice(pricing) {
  const input = formatPrice(pricing.input_usd_per_mtok);
  return pricing.flat ? input : `${input}/${formatPrice(pricing.output_usd_per_mtok)}`;
}

function describeModel(model) {
  const pricing = model.pricing;
  const price = pricing.flat
    ? `${formatPrice(pricing.input_usd_per_mtok)} per 1M tokens`
    : `${formatPrice(pricing.input_usd_per_mtok)} in / ${formatPrice(pricing.output_usd_per_mtok)} out per 1M tokens`;
  return model.available ? `${model.owned_by} · ${price}` : `Unavailable: ${model.unavailable_reason ?? "its provider is not configured"}`;
}

async function loadModels() {
  const list = await client.models();
  models = new Map(list.map((model) => [model.id, model]));
  const wanted = sessionStorage.getItem(MODEL_ITEM);
  modelSelect.replaceChildren(
    ...list.map((model) => {
      const label = `${model.id} · ${shortPrice(model.pricing)}${model.available ? "" : " (unavailable)"}`;
      return el("option", { value: model.id, disabled: !model.available }, label);
    }),
  );
  const first = list.find((model) => model.id === wanted && model.available) ?? list.find((model) => model.available);
  modelSelect.value = first ? first.id : "";
  modelSelect.disabled = false;
  updateModelInfo();
}

function updateModelInfo() {
  const model = models.get(modelSelect.value);
  modelInfo.textContent = model ? describeModel(model) : "";
  if (model) sessionStorage.setItem(MODEL_ITEM, model.id);
  setBusy(running.length > 0);
}

// -- keeping a single answer for a resume after a reload ---------------------------------

function savePending(force = false) {
  if (!pending) return;
  const now = performance.now();
  if (!force && now - savedAt < SAVE_EVERY_MS) return;
  savedAt = now;
  sessionStorage.setItem(PENDING_ITEM, JSON.stringify(pending));
}

function dropPending() {
  pending = null;
  sessionStorage.removeItem(PENDING_ITEM);
}

addEventListener("pagehide", () => savePending(true));

// -- one answer --------------------------------------------------------------------------

/** Read `stream` into `view`; `onChunk(stream, hadText)` after each chunk. */
async function consume(stream, view, model, onChunk = () => {}) {
  try {
    for await (const chunk of stream) onChunk(stream, view.chunk(chunk, stream));
    view.end(stream, model);
  } catch (error) {
    view.fail(error);
    throw error;
  }
}

async function runSingle(transport, body, resume = null) {
  showMode(transport);
  const model = models.get(body.model);
  const base = resume?.text ?? "";
  let stream;
  if (resume?.streamId) {
    stream = client.resumeStream(resume.streamId, { after: resume.lastEventId, transport });
  } else {
    // a resume before the stream id was known repeats the request with its Idempotency-Key:
    // the gateway attaches it to the first (same answer, billed once) and replays from the start
    const idempotencyKey = resume?.idempotencyKey ?? crypto.randomUUID();
    stream = client.chatStream(body, { transport, resumable: true, idempotencyKey });
    pending = { transport, body, idempotencyKey, streamId: null, lastEventId: 0, text: "", ttftMs: null };
  }
  pending = { ...pending, ...resume, transport, body };
  running = [stream];
  setBusy(true);
  single.start(transport, { base: resume?.streamId ? base : "", ttftMs: resume?.ttftMs ?? null, resumed: Boolean(resume) });
  savePending(true);
  try {
    await consume(stream, single, model, (current) => {
      pending.streamId = current.id;
      pending.lastEventId = current.lastEventId;
      pending.text = single.text;
      pending.ttftMs = single.ttftMs;
      savePending();
    });
  } catch {
    // shown in the answer panel
  } finally {
    dropPending();
    running = [];
    setBusy(false);
  }
}

async function runRace(body) {
  showMode("race");
  const model = models.get(body.model);
  verdict.textContent = "Opening the WebSocket…";
  plot.clear();
  running = [];
  setBusy(true);
  try {
    await client.socket().connect();
  } catch (error) {
    verdict.textContent = "";
    showError(errorBox, error);
    setBusy(false);
    return;
  }
  verdict.textContent = "Racing…";
  const streams = ["sse", "ws"].map((transport) => client.chatStream(body, { transport }));
  running = streams;
  let frame = null;
  const results = await Promise.allSettled(
    streams.map((stream, index) => {
      raceViews[index].start(stream.transport);
      return consume(stream, raceViews[index], model, (_stream, hadText) => {
        if (!hadText) return;
        plot.add(index, performance.now() - raceViews[index].sentAt);
        frame ??= requestAnimationFrame(() => {
          frame = null;
          plot.render();
        });
      });
    }),
  );
  if (frame !== null) cancelAnimationFrame(frame);
  plot.render();
  running = [];
  setBusy(false);
  verdict.textContent = raceVerdict(results);
}

function raceVerdict(results) {
  if (results.some((result) => result.status === "rejected")) return "The race did not finish: see the failed side.";
  const [sse, ws] = raceViews;
  if (sse.ttftMs === null || ws.ttftMs === null) return "Finished.";
  const gap = Math.abs(sse.ttftMs - ws.ttftMs);
  const faster = sse.ttftMs < ws.ttftMs ? "SSE" : "WebSocket";
  return gap < 0.5 ? "Both first tokens arrived within half a millisecond." : `${faster}'s first token arrived ${gap.toFixed(1)} ms sooner.`;
}

// -- events ------------------------------------------------------------------------------

function send() {
  showError(errorBox, null);
  if (!client || running.length) return;
  if (!modelSelect.value) {
    showError(errorBox, "Choose a model.");
    modelSelect.focus();
    return;
  }
  if (!byId("prompt").value.trim()) {
    showError(errorBox, "Write a prompt.");
    byId("prompt").focus();
    return;
  }
  const body = requestBody();
  const transport = transportChoice();
  if (transport === "race") runRace(body);
  else runSingle(transport, body);
}

function stop() {
  for (const stream of running) {
    stream.cancel().catch((error) => showError(errorBox, `Could not stop: ${describeError(error)}`));
  }
  for (const view of [single, ...raceViews]) {
    if (view.panel.dataset.state === "streaming") view.status.textContent = "Stopping…";
  }
}

form.addEventListener("submit", (event) => {
  event.preventDefault();
  send();
});
form.addEventListener("keydown", (event) => {
  if (event.key === "Enter" && (event.ctrlKey || event.metaKey)) {
    event.preventDefault();
    send();
  }
});
addEventListener("keydown", (event) => {
  if (event.key === "Escape" && running.length) stop();
});
stopButton.addEventListener("click", stop);
modelSelect.addEventListener("change", updateModelInfo);
for (const radio of form.querySelectorAll('input[name="transport"]')) {
  radio.addEventListener("change", () => showMode(transportChoice()));
}

/** After a reload: pick up the answer that was streaming, if there was one. */
function resumePending() {
  const saved = sessionStorage.getItem(PENDING_ITEM);
  if (!saved) return;
  let resume;
  try {
    resume = JSON.parse(saved);
  } catch {
    dropPending();
    return;
  }
  if (!resume?.body || (resume.transport !== "sse" && resume.transport !== "ws")) {
    dropPending();
    return;
  }
  form.querySelector(`input[name="transport"][value="${resume.transport}"]`).checked = true;
  byId("prompt").value = resume.body.messages.at(-1)?.content ?? "";
  const system = resume.body.messages.find((message) => message.role === "system");
  byId("system").value = system?.content ?? "";
  if (models.has(resume.body.model)) modelSelect.value = resume.body.model;
  updateModelInfo();
  runSingle(resume.transport, resume.body, resume);
}

setupKeyBar({
  onKey: async (newClient) => {
    client?.close();
    client = newClient;
    showError(errorBox, null);
    try {
      await loadModels();
    } catch (error) {
      showError(errorBox, error);
      return;
    }
    if (!running.length) resumePending();
  },
  onForget: () => {
    for (const stream of running) stream.cancel();
    client?.close();
    client = null;
    dropPending();
    modelSelect.replaceChildren(el("option", { value: "" }, "Paste a key to load the models"));
    modelSelect.disabled = true;
    modelInfo.textContent = "";
    setBusy(false);
  },
});
showMode(transportChoice());
