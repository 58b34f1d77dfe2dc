/**
 * What every page shares: the API key bar (the key lives in sessionStorage only, is sent
 * only to this gateway, in the Authorization header), DOM helpers that set text and never
 * HTML, number and money formatting, and error messages.
 */

import { AuthenticationError, Tokenwire, TokenwireError } from "./tokenwire.js";

const KEY_ITEM = "tokenwire.apiKey";

/**
 * An element: `attributes` are set with setAttribute (event-handler attributes refused),
 * children are nodes or strings (text nodes). The only way these pages build markup.
 */
export function el(tag, attributes = {}, ...children) {
  const node = document.createElement(tag);
  for (const [name, value] of Object.entries(attributes)) {
    if (/^on/i.test(name)) throw new Error(`refusing the attribute ${name}`);
    if (value === null || value === undefined || value === false) continue;
    if (name === "class") node.className = value;
    else node.setAttribute(name, value === true ? "" : String(value));
  }
  for (const child of children.flat()) {
    if (child !== null && child !== undefined && child !== false) node.append(child);
  }
  return node;
}

/** The element with this id (an Error if the page lacks it: a page/module mismatch). */
export function byId(id) {
  const node = document.getElementById(id);
  if (!node) throw new Error(`no element #${id}`);
  return node;
}

/** Micro-dollars as exact USD: "$12.50", "$0.001234" (at least 2 decimals, at most 6). */
export function formatUSD(micro) {
  const value = BigInt(Math.trunc(Number(micro)));
  const negative = value < 0n;
  const abs = negative ? -value : value;
  const whole = (abs / 1000000n).toLocaleString("en-US");
  const fraction = (abs % 1000000n).toString().padStart(6, "0").replace(/0{1,4}$/, "");
  return `${negative ? "-" : ""}$${whole}.${fraction.padEnd(2, "0")}`;
}

/** USD per 1M tokens ("$3.00", "$0.28"). */
export function formatPrice(usdPerMillion) {
  return `$${Number(usdPerMillion).toFixed(usdPerMillion < 0.1 && usdPerMillion > 0 ? 3 : 2)}`;
}

export function formatInt(value) {
  return Number(value).toLocaleString("en-US");
}

export function formatMs(ms) {
  if (ms === null || ms === undefined || Number.isNaN(ms)) return "–";
  return ms >= 10000 ? `${(ms / 1000).toFixed(1)} s` : `${Math.round(ms)} ms`;
}

/** Unix ms (or s with `seconds`) as a local date and time. */
export function formatTime(value, { seconds = false } = {}) {
  if (value === null || value === undefined) return "–";
  const date = new Date(seconds ? value * 1000 : value);
  return date.toLocaleString("en-GB", { dateStyle: "short", timeStyle: "medium" });
}

/** A limit: the number, or "unlimited" for null. */
export function formatLimit(value) {
  return value === null || value === undefined ? "unlimited" : formatInt(value);
}

/** A readable message for any error (typed gateway errors keep their code and param). */
export function describeError(error) {
  if (error instanceof TokenwireError) {
    const parts = [error.status ? `${error.status}` : null, error.code].filter(Boolean).join(" ");
    const param = error.param ? ` (${error.param})` : "";
    return parts ? `${parts}: ${error.message}${param}` : `${error.message}${param}`;
  }
  return String(error?.message ?? error);
}

/** Show `error` (or a message) in a role="alert" box; null clears it. */
export function showError(box, error) {
  if (error === null || error === undefined) {
    box.hidden = true;
    box.replaceChildren();
    return;
  }
  box.hidden = false;
  box.replaceChildren(typeof error === "string" ? error : describeError(error));
}

export function storedKey() {
  return sessionStorage.getItem(KEY_ITEM);
}

/**
 * Wire up the key bar: paste a key, "Use key" checks it (GET /v1/key) and keeps it for this
 * tab's session; "Forget" drops it. `onKey(client, keyInfo)` runs once a key is accepted
 * (also on load, for a key kept from before); `onForget()` when it is dropped or refused.
 */
export function setupKeyBar({ onKey, onForget = () => {} }) {
  const form = byId("key-form");
  const input = byId("key-input");
  const status = byId("key-status");
  const forget = byId("key-forget");

  const accept = async (key) => {
    const client = new Tokenwire({ apiKey: key });
    status.textContent = "Checking the key…";
    try {
      const info = await client.key();
      sessionStorage.setItem(KEY_ITEM, key);
      input.value = "";
      input.placeholder = "Paste another API key";
      status.textContent = `Key ${info.prefix}… (${info.name}${info.admin ? ", admin" : ""})`;
      forget.hidden = false;
      await onKey(client, info);
    } catch (error) {
      if (error instanceof AuthenticationError) {
        sessionStorage.removeItem(KEY_ITEM);
        forget.hidden = true;
        onForget();
      }
      status.textContent = `Key not accepted: ${describeError(error)}`;
    }
  };

  form.addEventListener("submit", (event) => {
    event.preventDefault();
    const key = input.value.trim();
    if (key) accept(key);
    else input.focus();
  });
  forget.addEventListener("click", () => {
    sessionStorage.removeItem(KEY_ITEM);
    status.textContent = "No key: paste one to start.";
    forget.hidden = true;
    onForget();
    input.focus();
  });
  const kept = storedKey();
  if (kept) accept(kept);
  else status.textContent = "No key: paste one to start.";
}

/** Run `tick` now and every `ms` while the page is visible; returns a stop function. */
export function every(ms, tick) {
  let timer = null;
  let stopped = false;
  const run = async () => {
    timer = null;
    if (stopped) return;
    if (document.visibilityState === "visible") {
      try {
        await tick();
      } catch {
        // tick shows its own errors; polling goes on
      }
    }
    if (!stopped) timer = setTimeout(run, ms);
  };
  run();
  return () => {
    stopped = true;
    if (timer !== null) clearTimeout(timer);
  };
}
