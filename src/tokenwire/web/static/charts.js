/**
 * Small SVG charts built with createElementNS (no library, no inline style): bar charts for
 * usage and a live plot of token arrival times for the race view. Colours come from CSS
 * classes, so light and dark themes apply; each chart has an accessible name, and each bar a
 * <title> (its tooltip) and data-value (its exact figure).
 */

const SVG = "http://www.w3.org/2000/svg";

/** An SVG element with attributes and children (strings become text nodes). */
export function svg(tag, attributes = {}, children = []) {
  const node = document.createElementNS(SVG, tag);
  for (const [name, value] of Object.entries(attributes)) {
    if (value !== null && value !== undefined) node.setAttribute(name, String(value));
  }
  for (const child of children) node.append(child);
  return node;
}

/** A "nice" upper bound for an axis: 1, 1.5, 2, 2.5, 3, 4, 5, 6 or 8 times a power of ten. */
export function niceMax(max) {
  if (!(max > 0)) return 1;
  const power = 10 ** Math.floor(Math.log10(max));
  for (const step of [1, 1.5, 2, 2.5, 3, 4, 5, 6, 8, 10]) if (step * power >= max) return step * power;
  return 10 * power;
}

/**
 * A vertical bar chart (one bar per item, e.g. per day).
 * items: [{label, value, title?}]; format(value) writes axis and tooltip figures.
 */
export function columnChart(items, { label, format = String, height = 180 } = {}) {
  const width = Math.max(320, items.length * 18 + 60);
  const left = 56;
  const bottom = 26;
  const top = 10;
  const plotHeight = height - top - bottom;
  const max = niceMax(Math.max(0, ...items.map((item) => item.value)));
  const chart = svg("svg", { viewBox: `0 0 ${width} ${height}`, class: "chart", role: "img", "aria-label": label });
  for (const fraction of [0, 0.5, 1]) {
    const y = top + plotHeight * (1 - fraction);
    chart.append(svg("line", { x1: left, x2: width - 4, y1: y, y2: y, class: "grid" }));
    chart.append(svg("text", { x: left - 6, y: y + 4, class: "axis", "text-anchor": "end" }, [format(max * fraction)]));
  }
  const slot = (width - left - 4) / Math.max(1, items.length);
  const labelEvery = Math.ceil(items.length / Math.max(1, Math.floor((width - left) / 64)));
  items.forEach((item, index) => {
    const barHeight = (item.value / max) * plotHeight;
    const x = left + index * slot + slot * 0.15;
    const bar = svg(
      "rect",
      { x, y: top + plotHeight - barHeight, width: slot * 0.7, height: Math.max(barHeight, 0), class: "bar", "data-value": item.value, "data-label": item.label },
      [svg("title", {}, [item.title ?? `${item.label}: ${format(item.value)}`])],
    );
    chart.append(bar);
    if (index % labelEvery === 0) {
      chart.append(svg("text", { x: x + slot * 0.35, y: height - 8, class: "axis", "text-anchor": "middle" }, [item.label]));
    }
  });
  return chart;
}

/** A horizontal bar chart (one row per item, e.g. per model or key), labels on the left. */
export function barChart(items, { label, format = String } = {}) {
  const row = 24;
  const left = 140;
  const width = 480;
  const valueWidth = 90;
  const height = Math.max(1, items.length) * row + 8;
  const max = Math.max(0, ...items.map((item) => item.value)) || 1;
  const chart = svg("svg", { viewBox: `0 0 ${width} ${height}`, class: "chart", role: "img", "aria-label": label });
  items.forEach((item, index) => {
    const y = 4 + index * row;
    const barWidth = (item.value / max) * (width - left - valueWidth);
    chart.append(svg("text", { x: left - 8, y: y + 15, class: "axis", "text-anchor": "end" }, [clip(item.label, 20)]));
    chart.append(
      svg("rect", { x: left, y: y + 3, width: Math.max(barWidth, 0), height: row - 8, class: "bar", "data-value": item.value, "data-label": item.label }, [
        svg("title", {}, [item.title ?? `${item.label}: ${format(item.value)}`]),
      ]),
    );
    chart.append(svg("text", { x: left + barWidth + 6, y: y + 15, class: "axis" }, [format(item.value)]));
  });
  return chart;
}

function clip(text, length) {
  return text.length > length ? `${text.slice(0, length - 1)}…` : text;
}

/**
 * A live plot of token arrival times: for each series (a transport), one step line of the
 * number of chunks received against milliseconds since the request was sent.
 */
export class ArrivalPlot {
  /** @param {{name: string, className: string}[]} series */
  constructor(series, { label = "Token arrival times" } = {}) {
    this.width = 640;
    this.height = 240;
    this.margin = { left: 48, right: 24, top: 12, bottom: 34 };
    this.series = series.map((s) => ({ ...s, points: [] }));
    this.element = svg("svg", { viewBox: `0 0 ${this.width} ${this.height}`, class: "chart arrival-plot", role: "img", "aria-label": label });
    this.axes = svg("g");
    this.lines = this.series.map((s) => svg("polyline", { class: `line ${s.className}`, fill: "none", "data-series": s.name, "data-points": 0 }));
    this.element.append(this.axes, ...this.lines);
    this.render();
  }

  /** Record one chunk of `series` (its index) arriving `ms` after the request was sent. */
  add(index, ms) {
    this.series[index].points.push(ms);
  }

  /** Forget every point (a new race). */
  clear() {
    for (const s of this.series) s.points = [];
    this.render();
  }

  render() {
    const { left, right, top, bottom } = this.margin;
    const plotWidth = this.width - left - right;
    const plotHeight = this.height - top - bottom;
    const maxMs = niceMax(Math.max(1, ...this.series.flatMap((s) => s.points)));
    const maxCount = niceMax(Math.max(1, ...this.series.map((s) => s.points.length)));
    const x = (ms) => left + (ms / maxMs) * plotWidth;
    const y = (count) => top + plotHeight * (1 - count / maxCount);
    const axes = [];
    for (const fraction of [0, 0.25, 0.5, 0.75, 1]) {
      axes.push(svg("line", { x1: x(maxMs * fraction), x2: x(maxMs * fraction), y1: top, y2: top + plotHeight, class: "grid" }));
      axes.push(svg("text", { x: x(maxMs * fraction), y: this.height - 18, class: "axis", "text-anchor": "middle" }, [`${Math.round(maxMs * fraction)}`]));
    }
    for (const fraction of [0, 0.5, 1]) {
      axes.push(svg("line", { x1: left, x2: left + plotWidth, y1: y(maxCount * fraction), y2: y(maxCount * fraction), class: "grid" }));
      axes.push(svg("text", { x: left - 6, y: y(maxCount * fraction) + 4, class: "axis", "text-anchor": "end" }, [`${Math.round(maxCount * fraction)}`]));
    }
    axes.push(svg("text", { x: left + plotWidth / 2, y: this.height - 2, class: "axis", "text-anchor": "middle" }, ["ms since sent"]));
    axes.push(svg("text", { x: 12, y: top + plotHeight / 2, class: "axis", "text-anchor": "middle", transform: `rotate(-90 12 ${top + plotHeight / 2})` }, ["chunks"]));
    this.axes.replaceChildren(...axes);
    this.series.forEach((s, index) => {
      const coordinates = [`${x(0)},${y(0)}`];
      s.points.forEach((ms, count) => {
        coordinates.push(`${x(ms)},${y(count)}`, `${x(ms)},${y(count + 1)}`);
      });
      this.lines[index].setAttribute("points", coordinates.join(" "));
      this.lines[index].setAttribute("data-points", String(s.points.length));
    });
  }
}
