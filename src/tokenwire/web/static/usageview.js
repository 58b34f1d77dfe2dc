/**
 * Usage figures as the usage and admin pages show them: totals as cards, and grouped totals
 * ({day?, model?, key_id?, requests, prompt_tokens, completion_tokens, cost_micro}) as charts
 * by day, model or key. Each chart's figure carries data-total, the sum of its bars.
 */

import { barChart, columnChart } from "./charts.js";
import { el, formatInt, formatUSD } from "./common.js";

export const MEASURES = {
  cost: { name: "cost", value: (row) => row.cost_micro, format: formatUSD },
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

/** Grouped rows summed by one of their fields: Map(value → totals), in first-seen order. */
export function totalsBy(rows, field) {
  const totals = new Map();
  for (const row of rows) {
    const key = row[field];
    const sum = totals.get(key) ?? { requests: 0, prompt_tokens: 0, completion_tokens: 0, cost_micro: 0 };
    sum.requests += row.requests;
    sum.prompt_tokens += row.prompt_tokens;
    sum.completion_tokens += row.completion_tokens;
    sum.cost_micro += row.cost_micro;
    totals.set(key, sum);
  }
  return totals;
}

/** A <dl> of cards: [[key, label, value], ...]. */
export function renderCards(list, cards) {
  list.replaceChildren(...cards.map(([key, label, value]) => el("div", { class: "card", "data-card": key }, el("dt", {}, label), el("dd", {}, value))));
}

/** The overall totals of a usage answer as cards. */
export function renderTotals(list, total) {
  renderCards(list, [
    ["requests", "Requests", formatInt(total.requests)],
    ["prompt_tokens", "Prompt tokens", formatInt(total.prompt_tokens)],
    ["completion_tokens", "Completion tokens", formatInt(total.completion_tokens)],
    ["cost", "Cost", formatUSD(total.cost_micro)],
  ]);
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
    items = days.map((day) => ({ label: day, value: measure.value(totals.get(day) ?? { requests: 0, prompt_tokens: 0, completion_tokens: 0, cost_micro: 0 }) }));
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
