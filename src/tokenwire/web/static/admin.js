/**
 * The admin page (/admin), for admin keys only: a key without admin rights gets the gateway's
 * 403 message and nothing else. Keys (create with limits and credits, the secret shown once,
 * edit, top up, rotate, revoke), usage by day, model and key, and live figures: what this
 * process holds (GET /v1/admin/runtime) and, from GET /metrics, open streams and sockets, TTFT
 * percentiles per transport and outcomes (the page says so when the gateway has no metrics).
 */

import { byId, describeError, el, every, formatInt, formatLimit, formatTime, formatUSD, setupKeyBar, showError } from "./common.js";
import { histograms, parsePrometheus, quantile, sumBy } from "./metrics.js";
import { PermissionDeniedError } from "./tokenwire.js";
import { lastDays, renderCards, renderChart, renderTotals } from "./usageview.js";

const LIVE_EVERY_MS = 2000;
const USD = /^\d{1,9}(\.\d{1,6})?$/;

const content = byId("admin-content");
const denied = byId("admin-denied");
const errorBox = byId("admin-error");

let client = null;
let keys = [];
let models = [];
let usage = null;
let period = null;
let stopLive = null;

// -- access ------------------------------------------------------------------------------

function reset() {
  stopLive?.();
  stopLive = null;
  client = null;
  content.hidden = true;
  denied.hidden = true;
  showError(errorBox, null);
  byId("admin-intro").hidden = false;
}

async function start(newClient) {
  reset();
  client = newClient;
  try {
    keys = (await client.request("GET", "/v1/admin/keys")).data;
  } catch (error) {
    if (error instanceof PermissionDeniedError) {
      // a non-admin key: the gateway's answer, and nothing else
      denied.hidden = false;
      denied.replaceChildren(`This page needs an admin key. The gateway answered ${describeError(error)}`);
      byId("admin-intro").hidden = true;
      client = null;
      return;
    }
    showError(errorBox, error);
    return;
  }
  byId("admin-intro").hidden = true;
  content.hidden = false;
  renderKeys();
  try {
    models = await client.models();
  } catch (error) {
    showError(errorBox, error);
  }
  renderModelChoices(byId("create-models"), null);
  stopLive = every(LIVE_EVERY_MS, refreshLive);
  await loadUsage();
}

// -- keys --------------------------------------------------------------------------------

async function reloadKeys() {
  keys = (await client.request("GET", "/v1/admin/keys")).data;
  renderKeys();
}

function action(label, handler, { disabled = false, danger = false, key } = {}) {
  const button = el("button", { type: "button", class: danger ? "link danger" : "link", disabled, "aria-label": `${label} ${key.name}` }, label);
  button.addEventListener("click", () => handler(key));
  return button;
}

function renderKeys() {
  const body = byId("keys-table").tBodies[0];
  body.replaceChildren(
    ...keys.map((key) => {
      const revoked = key.status === "revoked";
      return el(
        "tr",
        { "data-key-id": key.id, "data-status": key.status },
        el("td", {}, key.name, key.admin ? el("span", { class: "hint" }, " (admin)") : null),
        el("td", {}, el("code", {}, `${key.prefix}…`)),
        el("td", { class: `status-${key.status}` }, key.status),
        el("td", { class: "num", "data-balance": key.balance_micro }, formatUSD(key.balance_micro)),
        el("td", { class: "num" }, formatLimit(key.rpm)),
        el("td", { class: "num" }, formatLimit(key.tpm)),
        el("td", { class: "num" }, formatLimit(key.max_concurrent_streams)),
        el("td", {}, key.models ? key.models.join(", ") : "all"),
        el("td", {}, key.expires_at ? formatTime(key.expires_at, { seconds: true }) : "never"),
        el(
          "td",
          {},
          el(
            "div",
            { class: "row-actions" },
            action("Edit", openEdit, { key, disabled: revoked }),
            action("Top up", openTopup, { key, disabled: revoked }),
            action("Rotate", confirmRotate, { key, disabled: revoked }),
            action("Revoke", confirmRevoke, { key, disabled: revoked, danger: true }),
          ),
        ),
      );
    }),
  );
}

function renderModelChoices(container, selected) {
  container.replaceChildren(
    ...models.map((model) => {
      const box = el("input", { type: "checkbox", value: model.id, checked: selected?.includes(model.id) });
      return el("label", { class: "check" }, box, model.id);
    }),
  );
}

function checkedModels(container) {
  const ids = [...container.querySelectorAll("input:checked")].map((box) => box.value);
  return ids.length ? ids : null;
}

function showSecret(title, key) {
  byId("secret-title").textContent = title;
  byId("secret-value").textContent = key;
  byId("secret-box").hidden = false;
  byId("copy-secret").focus();
}

/** The key form fields (partials/key-fields.html) and the key object's names for them. */
const KEY_FIELDS = [
  ["name", "name"],
  ["rpm", "rpm"],
  ["tpm", "tpm"],
  ["max_concurrent_streams", "streams"],
];

/** Name, limits and models from the create (or edit) form, as the admin API takes them. */
function keyFields(prefix) {
  const fields = { models: checkedModels(byId(`${prefix}-models`)) };
  for (const [field, id] of KEY_FIELDS) fields[field] = field === "name" ? byId(`${prefix}-name`).value : limitField(`${prefix}-${id}`);
  return fields;
}

/** An optional whole number field: null when blank. */
function limitField(id) {
  const raw = byId(id).value.trim();
  return raw === "" ? null : Number(raw);
}

/** A datetime-local field as Unix seconds (null when blank). */
function instantField(id) {
  const raw = byId(id).value;
  return raw ? Math.floor(new Date(raw).getTime() / 1000) : null;
}

function localInput(seconds) {
  if (!seconds) return "";
  const date = new Date(seconds * 1000);
  const pad = (n) => String(n).padStart(2, "0");
  return `${date.getFullYear()}-${pad(date.getMonth() + 1)}-${pad(date.getDate())}T${pad(date.getHours())}:${pad(date.getMinutes())}`;
}

byId("create-form").addEventListener("submit", async (event) => {
  event.preventDefault();
  showError(errorBox, null);
  const credits = byId("create-credits").value.trim();
  if (credits && !USD.test(credits)) {
    showError(errorBox, "Credits: a USD amount such as 10 or 12.50 (at most 6 decimals).");
    byId("create-credits").focus();
    return;
  }
  const body = { ...keyFields("create"), expires_at: instantField("create-expires"), admin: byId("create-admin").checked };
  if (credits) body.credits_usd = credits;
  try {
    const created = await client.request("POST", "/v1/admin/keys", { body });
    showSecret(`New key "${created.name}" (${created.id}).`, created.key);
    byId("create-form").reset();
    await reloadKeys();
  } catch (error) {
    showError(errorBox, error);
  }
});

byId("copy-secret").addEventListener("click", async () => {
  try {
    await navigator.clipboard.writeText(byId("secret-value").textContent);
    byId("copy-secret").textContent = "Copied";
  } catch {
    byId("copy-secret").textContent = "Select the key and copy it";
  }
});
byId("dismiss-secret").addEventListener("click", () => {
  byId("secret-value").textContent = "";
  byId("secret-box").hidden = true;
  byId("copy-secret").textContent = "Copy";
});

// -- dialogs -----------------------------------------------------------------------------

let dialogKey = null;
let confirmAction = null;

for (const dialog of document.querySelectorAll("dialog")) {
  for (const button of dialog.querySelectorAll("[data-close]")) button.addEventListener("click", () => dialog.close());
}

function openEdit(key) {
  dialogKey = key;
  byId("edit-title").textContent = `Edit ${key.name}`;
  for (const [field, id] of KEY_FIELDS) byId(`edit-${id}`).value = key[field] ?? "";
  byId("edit-expires").value = localInput(key.expires_at);
  renderModelChoices(byId("edit-models"), key.models);
  showError(byId("edit-error"), null);
  byId("edit-dialog").showModal();
}

byId("edit-form").addEventListener("submit", async (event) => {
  event.preventDefault();
  const key = dialogKey;
  const changes = {};
  for (const [field, value] of Object.entries(keyFields("edit"))) {
    if (JSON.stringify(value) !== JSON.stringify(key[field])) changes[field] = value;
  }
  // the field shows minutes: only a different value in it is a change
  if (byId("edit-expires").value !== localInput(key.expires_at)) changes.expires_at = instantField("edit-expires");
  try {
    await client.request("PATCH", `/v1/admin/keys/${encodeURIComponent(key.id)}`, { body: changes });
    byId("edit-dialog").close();
    await reloadKeys();
  } catch (error) {
    showError(byId("edit-error"), error);
  }
});

function openTopup(key) {
  dialogKey = key;
  byId("topup-title").textContent = `Top up ${key.name}`;
  byId("topup-form").reset();
  showError(byId("topup-error"), null);
  byId("topup-dialog").showModal();
}

byId("topup-form").addEventListener("submit", async (event) => {
  event.preventDefault();
  const amount = byId("topup-amount").value.trim();
  if (!USD.test(amount) || Number(amount) <= 0) {
    showError(byId("topup-error"), "A USD amount above 0, such as 10 or 12.50 (at most 6 decimals).");
    return;
  }
  const note = byId("topup-note").value.trim();
  try {
    await client.request("POST", `/v1/admin/keys/${encodeURIComponent(dialogKey.id)}/topup`, { body: note ? { amount_usd: amount, note } : { amount_usd: amount } });
    byId("topup-dialog").close();
    await reloadKeys();
  } catch (error) {
    showError(byId("topup-error"), error);
  }
});

function confirm(title, text, run) {
  byId("confirm-title").textContent = title;
  byId("confirm-text").textContent = text;
  byId("confirm-ok").textContent = title.split(" ")[0];
  showError(byId("confirm-error"), null);
  confirmAction = run;
  byId("confirm-dialog").showModal();
}

byId("confirm-form").addEventListener("submit", async (event) => {
  event.preventDefault();
  try {
    await confirmAction();
    byId("confirm-dialog").close();
    await reloadKeys();
  } catch (error) {
    showError(byId("confirm-error"), error);
  }
});

function confirmRotate(key) {
  confirm(`Rotate ${key.name}`, `A new secret replaces the current one of "${key.name}" (${key.prefix}…), which stops working at once. Limits and balance stay.`, async () => {
    const rotated = await client.request("POST", `/v1/admin/keys/${encodeURIComponent(key.id)}/rotate`);
    showSecret(`New secret for "${rotated.name}" (${rotated.id}).`, rotated.key);
  });
}

function confirmRevoke(key) {
  confirm(`Revoke ${key.name}`, `Requests with "${key.name}" (${key.prefix}…) get 401 from now on. This cannot be undone.`, () =>
    client.request("POST", `/v1/admin/keys/${encodeURIComponent(key.id)}/revoke`),
  );
}

// -- usage -------------------------------------------------------------------------------

function keyName(id) {
  const key = keys.find((k) => k.id === id);
  return key ? key.name : id;
}

function renderUsageCharts() {
  if (!usage) return;
  const measure = byId("measure").value;
  renderChart(byId("by-day"), usage.data, "day", measure, { days: period.days });
  renderChart(byId("by-model"), usage.data, "model", measure);
  renderChart(byId("by-key"), usage.data, "key_id", measure, { name: keyName });
}

async function loadUsage() {
  if (!client) return;
  period = lastDays(Number(byId("range").value));
  try {
    usage = await client.request("GET", "/v1/admin/usage", { query: { start: period.start, group_by: "day,model,key" } });
    renderTotals(byId("totals"), usage.total);
    renderUsageCharts();
  } catch (error) {
    showError(errorBox, error);
  }
}

// The admin report has the operator's cost, what keys were charged and the margin.
byId("measure").querySelector("option[value=cost]").textContent = "Cost (upstream)";
byId("measure").append(el("option", { value: "charge" }, "Charged"), el("option", { value: "margin" }, "Margin"));

byId("range").addEventListener("change", loadUsage);
byId("measure").addEventListener("change", renderUsageCharts);
byId("refresh").addEventListener("click", async () => {
  await reloadKeys().catch((error) => showError(errorBox, error));
  await loadUsage();
});

// -- live figures ------------------------------------------------------------------------

async function refreshLive() {
  if (!client) return;
  const [runtime, metrics] = await Promise.allSettled([
    client.request("GET", "/v1/admin/runtime"),
    client.request("GET", "/metrics", { text: true }),
  ]);
  if (runtime.status === "fulfilled") {
    const r = runtime.value;
    renderCards(byId("live-cards"), [
      ["live_generations", "Live generations", formatInt(r.live_generations)],
      ["stream_slots_held", "Stream slots held", formatInt(r.stream_slots_held)],
      ["tasks", "Tasks", formatInt(r.tasks)],
      ["open_fds", "Open files", r.open_fds === null ? "–" : formatInt(r.open_fds)],
      ["db_connections", "DB connections", r.db_connections_checked_out === null ? "–" : formatInt(r.db_connections_checked_out)],
      ["ledger_queued", "Ledger rows queued", formatInt(r.ledger_queued)],
    ]);
    byId("live-updated").textContent = `Process ${r.pid}, updated ${new Date().toLocaleTimeString("en-GB")}.`;
  } else {
    byId("live-updated").textContent = `Runtime figures unavailable: ${describeError(runtime.reason)}`;
  }
  if (metrics.status === "fulfilled") {
    byId("metrics-note").textContent = "From GET /metrics, since the gateway started.";
    renderMetrics(parsePrometheus(metrics.value));
  } else {
    const reason = metrics.reason;
    byId("metrics-box").replaceChildren();
    byId("metrics-note").textContent =
      reason?.status === 404
        ? "This gateway serves no metrics (GET /metrics answered 404): open streams, TTFT percentiles and errors appear once it does."
        : `Metrics unavailable: ${describeError(reason)}`;
  }
}

const PERCENTILES = [
  ["p50", 0.5],
  ["p90", 0.9],
  ["p99", 0.99],
];

function table(caption, head, rows, attributes = {}) {
  return el(
    "div",
    { class: "table-scroll" },
    el(
      "table",
      attributes,
      el("caption", { class: "hint" }, caption),
      el("thead", {}, el("tr", {}, ...head.map((name, index) => el("th", { scope: "col", class: index ? "num" : null }, name)))),
      el("tbody", {}, ...rows.map((row) => el("tr", { "data-row": row[0] }, ...row.map((cell, index) => el("td", { class: index ? "num" : null }, cell))))),
    ),
  );
}

/** Seconds as milliseconds for display. */
function ms(seconds) {
  return seconds === null ? "–" : seconds * 1000 >= 100 ? `${Math.round(seconds * 1000)} ms` : `${(seconds * 1000).toFixed(1)} ms`;
}

export function renderMetrics(samples) {
  const box = byId("metrics-box");
  const parts = [];
  const streams = sumBy(samples, "tokenwire_open_streams", "transport");
  const sockets = sumBy(samples, "tokenwire_open_websockets", "mode");
  const open = [...[...streams].map(([transport, value]) => [`streams (${transport})`, value]), ...[...sockets].map(([mode, value]) => [`WebSockets (${mode})`, value])];
  if (open.length) {
    parts.push(table("Open now", ["", "open"], open.map(([name, value]) => [name, formatInt(value)]), { id: "open-table" }));
  }
  const ttft = histograms(samples, "tokenwire_ttft_seconds", "transport");
  if (ttft.size) {
    const rows = [...ttft].map(([transport, buckets]) => [
      transport,
      formatInt(buckets.at(-1)?.count ?? 0),
      ...PERCENTILES.map(([, q]) => ms(quantile(q, buckets))),
    ]);
    parts.push(table("Time to first token per transport", ["transport", "requests", ...PERCENTILES.map(([name]) => name)], rows, { id: "ttft-table" }));
  }
  const outcomes = sumBy(samples, "tokenwire_requests_total", "outcome");
  if (outcomes.size) {
    parts.push(table("Requests by outcome", ["outcome", "requests"], [...outcomes].map(([outcome, value]) => [outcome, formatInt(value)]), { id: "outcome-table" }));
  }
  const refusals = sumBy(samples, "tokenwire_limit_refusals_total", "reason");
  const upstream = sumBy(samples, "tokenwire_upstream_attempts_total", "outcome");
  const errors = [
    ...[...refusals].map(([reason, value]) => [`limit refusals (${reason})`, value]),
    ...[...upstream].filter(([outcome]) => outcome !== "ok" && outcome !== "success").map(([outcome, value]) => [`upstream attempts (${outcome})`, value]),
    ...[...sumBy(samples, "tokenwire_retries_total")].map(([, value]) => ["upstream retries", value]),
    ...[...sumBy(samples, "tokenwire_fallbacks_total")].map(([, value]) => ["fallbacks", value]),
    ...[...sumBy(samples, "tokenwire_ledger_write_failures_total")].map(([, value]) => ["ledger write failures", value]),
  ];
  if (errors.length) parts.push(table("Errors and refusals", ["", "count"], errors.map(([name, value]) => [name, formatInt(value)]), { id: "errors-table" }));
  box.replaceChildren(...parts);
}

setupKeyBar({ onKey: (newClient) => start(newClient), onForget: reset });
