/**
 * The usage page (/usage): the key's balance and limits (GET /v1/key), its usage over a
 * period by day and model (GET /v1/usage?group_by=day,model) and its latest completions.
 */

import { byId, el, formatInt, formatLimit, formatMs, formatTime, formatUSD, setupKeyBar, showError } from "./common.js";
import { lastDays, renderCards, renderChart, renderTotals } from "./usageview.js";

const errorBox = byId("usage-error");
const panels = ["key-panel", "usage-panel", "latest-panel"].map(byId);
const LATEST = 25;

let client = null;
let answer = null; // the last usage answer (charts redraw from it when the measure changes)
let period = null;

function showPanels(visible) {
  for (const panel of panels) panel.hidden = !visible;
  byId("usage-intro").hidden = visible;
}

function renderKey(info) {
  renderCards(byId("key-cards"), [
    ["balance", "Balance", formatUSD(info.balance_micro)],
    ["rpm", "Requests/min", formatLimit(info.rpm)],
    ["tpm", "Tokens/min", formatLimit(info.tpm)],
    ["streams", "Concurrent streams", formatLimit(info.max_concurrent_streams)],
    ["models", "Models", info.models ? info.models.join(", ") : "all"],
    ["expires", "Expires", info.expires_at ? formatTime(info.expires_at, { seconds: true }) : "never"],
    ["status", "Status", info.status],
  ]);
}

function renderCharts() {
  if (!answer) return;
  const measure = byId("measure").value;
  renderChart(byId("by-day"), answer.groups, "day", measure, { days: period.days });
  renderChart(byId("by-model"), answer.groups, "model", measure);
}

function renderLatest(rows) {
  const body = byId("latest").tBodies[0];
  if (!rows.length) {
    body.replaceChildren(el("tr", {}, el("td", { colspan: 9, class: "hint" }, "No completions in this period.")));
    return;
  }
  body.replaceChildren(
    ...rows.map((row) =>
      el(
        "tr",
        { "data-completion": row.completion_id },
        el("td", {}, formatTime(row.created_at)),
        el("td", {}, row.model),
        el("td", {}, row.transport),
        el("td", {}, row.status),
        el("td", { class: "num" }, formatInt(row.prompt_tokens)),
        el("td", { class: "num" }, formatInt(row.completion_tokens) + (row.usage_estimated ? "*" : "")),
        el("td", { class: "num" }, formatMs(row.ttft_ms)),
        el("td", { class: "num" }, formatMs(row.duration_ms)),
        el("td", { class: "num" }, formatUSD(row.cost_micro)),
      ),
    ),
  );
}

async function load() {
  if (!client) return;
  showError(errorBox, null);
  period = lastDays(Number(byId("range").value));
  try {
    const [info, usage] = await Promise.all([client.key(), client.usage({ start: period.start, group_by: "day,model", limit: LATEST })]);
    answer = usage;
    renderKey(info);
    renderTotals(byId("totals"), usage.total);
    renderCharts();
    renderLatest(usage.data);
    showPanels(true);
  } catch (error) {
    showError(errorBox, error);
  }
}

byId("range").addEventListener("change", load);
byId("refresh").addEventListener("click", load);
byId("measure").addEventListener("change", renderCharts);

setupKeyBar({
  onKey: (newClient) => {
    client = newClient;
    return load();
  },
  onForget: () => {
    client = null;
    answer = null;
    showPanels(false);
  },
});
