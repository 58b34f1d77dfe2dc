/**
 * Usage figures as the usage and admin pages show them: totals as cards, and grouped totals
 * ({day?, model?, key_id?, requests, prompt_tokens, completion_tokens, cost_micro, and on the
 * admin report charge_micro and margin_micro}) as charts by day, model or key. Each chart's
 * figure carries data-total, the sum of its bars. A key's own usage has cost_micro only (what
 * it was charged); the admin report has the operator's cost, the charge and the margin.
 */

import { barChart, columnChart } from "./charts.js";
import { el, formatInt, formatUSD } from "./common.js";

export const MEASURES = {
  cost: { name: "cost", value: (row) => row.cost_micro, format: formatUSD },
  charge: { name: "charge", value: (row) => row.charge_micro, format: formatUSD },
  margin: { name: "margin", value: (row) => row.margin_micro, format: formatUSD },
  tokens: { name: "tokens", value: (row) => row.prompt_tokens + row.completion_tokens, format: formatInt },
  requests: { name: "requests", value: (row) => row.requests, format: formatInt },
};

const DAY_MS = 86400000;

/** The last `count` UTC days, oldest first ("YYYY-MM-DD"), and the first one's start (ISO). */
export function lastDays(count, now = Date.now()) {
  const today = Math.floor(now / DAY_MS) * DAY_MS;
  const days = [];
  for (let i = count - 1; i >= 0; i--) days.push(new Date(today - i * DAY_MS).toISOString().slice(0, 10));
  return { days, start: `${days[0]}T00:00:00Z` };
}

const SUMMED = ["requests", "prompt_tokens", "completion_tokens", "cost_micro", "charge_micro", "margin_micro"];

/** Zero of every figure. */
function emptyTotals() {
  return Object.fromEntries(SUMMED.map((name) => [name, 0]));
}

/** Grouped rows summed by one of their fields: Map(value → totals), in first-seen order. */
export function totalsBy(rows, field) {
  const totals = new Map();
  for (const row of rows) {
    const key = row[field];
    const sum = totals.get(key) ?? emptyTotals();
    for (const name of SUMMED) sum[name] += row[name] ?? 0;
    totals.set(key, sum);
  }
  return totals;
}

/** A <dl> of cards: [[key, label, value], ...]. */
export function renderCards(list, cards) {
  list.replaceChildren(...cards.map(([key, label, value]) => el("div", { class: "card", "data-card": key }, el("dt", {}, label), el("dd", {}, value))));
}

/** The overall totals of a usage answer as cards (the admin report's with charge and margin). */
export function renderTotals(list, total) {
  const cards = [
    ["requests", "Requests", formatInt(total.requests)],
    ["prompt_tokens", "Prompt tokens", formatInt(total.prompt_tokens)],
    ["completion_tokens", "Completion tokens", formatInt(total.completion_tokens)],
  ];
  if (total.margin_micro === undefined) {
    cards.push(["cost", "Cost", formatUSD(total.cost_micro)]);
  } else {
    cards.push(
      ["cost", "Cost (upstream)", formatUSD(total.cost_micro)],
      ["charge", "Charged", formatUSD(total.charge_micro)],
      ["margin", "Margin", formatUSD(total.margin_micro)],
    );
  }
  renderCards(list, cards);
}

/**
 * Draw `rows` (grouped totals) summed by `field` into `figure` (.chart-total and .chart-box):
 * per day as columns (every day of `days`, zeros included), otherwise as bars, largest
 * first; `name(key)` labels a bar.
 */
export function renderChart(figure, rows, field, measureName, { days = null, name = String } = {}) {
  const measure = MEASURES[measureName];
  const totals = totalsBy(rows, field);
  let items;
  if (days) {
    items = days.map((day) => ({ label: day, value: measure.value(totals.get(day) ?? emptyTotals()) }));
  } else {
    items = [...totals].map(([key, sum]) => ({ label: name(key), value: measure.value(sum) })).sort((a, b) => b.value - a.value);
  }
  items = items.map((item) => ({ ...item, label: item.label, title: `${item.label}: ${measure.format(item.value)} ${measure.name}` }));
  const total = items.reduce((sum, item) => sum + item.value, 0);
  figure.dataset.total = String(total);
  figure.querySelector(".chart-total").textContent = `total ${measure.format(total)} ${measure.name === "cost" ? "" : measure.name}`.trim();
  const box = figure.querySelector(".chart-box");
  const label = `${figure.querySelector("figcaption").textContent}`;
  if (!items.length) {
    box.replaceChildren(el("p", { class: "hint" }, "No usage in this period."));
    return;
  }
  const chart = days
    ? columnChart(items.map((item) => ({ ...item, label: item.label.slice(5) })), { label, format: measure.format })
    : barChart(items, { label, format: measure.format });
  box.replaceChildren(chart);
}
