/**
 * A small Markdown renderer for model answers that never interprets HTML.
 *
 * Every node is made with createElement and every piece of text set with textContent (text
 * nodes), so an answer holding "<img src=x onerror=...>" or "<script>" shows those characters
 * and runs nothing. Links are kept only for http:, https: and mailto: URLs (a "javascript:"
 * link is plain text); images become links (nothing is loaded from elsewhere).
 *
 * Supported: paragraphs (a single newline is a line break), ATX headings, fenced and indented
 * code, block quotes, ordered and unordered lists (nested by indentation), GFM tables,
 * thematic breaks; inline code, **strong**, *emphasis*, ~~strike~~, [links](url), <autolinks>
 * and bare http(s) URLs, backslash escapes. An unclosed fence (an answer still streaming)
 * renders as code up to the end.
 */

const SAFE_URL = /^(https?:\/\/|mailto:)/i;
const FENCE = /^ {0,3}(`{3,}|~{3,})\s*([^`\s]*)[^`]*$/;
const HEADING = /^ {0,3}(#{1,6})(?:[ \t]+(.*?))?(?:[ \t]+#+)?[ \t]*$/;
const RULE = /^ {0,3}([-*_])(?:[ \t]*\1){2,}[ \t]*$/;
const QUOTE = /^ {0,3}> ?(.*)$/;
const ITEM = /^( {0,12})([-*+]|\d{1,9}[.)])[ \t]+(.*)$/;
const TABLE_RULE = /^ {0,3}\|?[ \t]*:?-+:?[ \t]*(\|[ \t]*:?-+:?[ \t]*)*\|?[ \t]*$/;
const BARE_URL = /^https?:\/\/[^\s<>"]*[^\s<>".,;:!?')\]]/;
const PUNCTUATION = /^[!-/:-@[-`{-~]/;

/** Create an element with a class and children (strings become text nodes). */
function make(tag, className, children = []) {
  const node = document.createElement(tag);
  if (className) node.className = className;
  for (const child of children) node.append(child);
  return node;
}

/** Replace the content of `container` with `markdown` rendered safely. */
export function renderMarkdown(markdown, container) {
  const fragment = document.createDocumentFragment();
  renderBlocks(markdown.replace(/\r\n?/g, "\n").split("\n"), fragment);
  container.replaceChildren(fragment);
}

function isBlockStart(line) {
  return FENCE.test(line) || HEADING.test(line) || RULE.test(line) || QUOTE.test(line) || ITEM.test(line);
}

/** Render block lines; `tight` (a list item's content) leaves paragraphs unwrapped. */
function renderBlocks(lines, parent, tight = false) {
  let i = 0;
  while (i < lines.length) {
    const line = lines[i];
    if (line.trim() === "") {
      i++;
      continue;
    }
    let match;
    if ((match = FENCE.exec(line))) {
      const fence = match[1];
      const body = [];
      i++;
      while (i < lines.length && !lines[i].trim().startsWith(fence)) body.push(lines[i++]);
      i++; // the closing fence (or past the end)
      const code = make("code", match[2] ? `language-${match[2].replace(/[^\w-]/g, "")}` : "", [body.join("\n")]);
      parent.append(make("pre", "", [code]));
      continue;
    }
    if ((match = HEADING.exec(line))) {
      const heading = document.createElement(`h${match[1].length}`);
      renderInline(match[2] ?? "", heading);
      parent.append(heading);
      i++;
      continue;
    }
    if (RULE.test(line)) {
      parent.append(document.createElement("hr"));
      i++;
      continue;
    }
    if (QUOTE.test(line)) {
      const inner = [];
      while (i < lines.length && (match = QUOTE.exec(lines[i]))) {
        inner.push(match[1]);
        i++;
      }
      const quote = document.createElement("blockquote");
      renderBlocks(inner, quote);
      parent.append(quote);
      continue;
    }
    if (ITEM.test(line)) {
      i = renderList(lines, i, parent);
      continue;
    }
    if (/^( {4}|\t)/.test(line)) {
      const body = [];
      while (i < lines.length && (/^( {4}|\t)/.test(lines[i]) || lines[i].trim() === "")) {
        body.push(lines[i++].replace(/^( {4}|\t)/, ""));
      }
      while (body.length && body[body.length - 1].trim() === "") body.pop();
      parent.append(make("pre", "", [make("code", "", [body.join("\n")])]));
      continue;
    }
    if (line.includes("|") && i + 1 < lines.length && TABLE_RULE.test(lines[i + 1]) && lines[i + 1].includes("-")) {
      i = renderTable(lines, i, parent);
      continue;
    }
    const paragraph = [];
    while (i < lines.length && lines[i].trim() !== "" && (paragraph.length === 0 || !isBlockStart(lines[i]))) {
      paragraph.push(lines[i++].trim());
    }
    const p = tight ? document.createDocumentFragment() : document.createElement("p");
    paragraph.forEach((text, index) => {
      if (index) p.append(document.createElement("br"));
      renderInline(text, p);
    });
    parent.append(p);
  }
}

function renderList(lines, start, parent) {
  const first = ITEM.exec(lines[start]);
  const indent = first[1].length;
  const ordered = /\d/.test(first[2]);
  const list = document.createElement(ordered ? "ol" : "ul");
  if (ordered) {
    const number = parseInt(first[2], 10);
    if (number !== 1) list.setAttribute("start", String(number));
  }
  let i = start;
  while (i < lines.length) {
    const match = ITEM.exec(lines[i]);
    if (!match || match[1].length !== indent || /\d/.test(match[2]) !== ordered) break;
    const content = [match[3]];
    i++;
    // the item's own lines: deeper-indented ones (nested blocks) and lazy continuations
    while (i < lines.length) {
      const line = lines[i];
      if (line.trim() === "") {
        const next = lines[i + 1];
        if (next !== undefined && next.trim() !== "" && leading(next) > indent) {
          content.push("");
          i++;
          continue;
        }
        break;
      }
      const item = ITEM.exec(line);
      if (item && item[1].length <= indent) break;
      if (!item && leading(line) <= indent && isBlockStart(line)) break;
      content.push(line.slice(Math.min(leading(line), indent + 2)));
      i++;
    }
    const li = document.createElement("li");
    renderBlocks(content, li, !content.includes(""));
    list.append(li);
    while (i < lines.length && lines[i].trim() === "" && lines[i + 1] !== undefined && ITEM.test(lines[i + 1])) {
      const next = ITEM.exec(lines[i + 1]);
      if (next[1].length !== indent) break;
      i++;
    }
  }
  parent.append(list);
  return i;
}

function leading(line) {
  return line.length - line.trimStart().length;
}

function cells(line) {
  let text = line.trim();
  if (text.startsWith("|")) text = text.slice(1);
  if (text.endsWith("|") && !text.endsWith("\\|")) text = text.slice(0, -1);
  const out = [];
  let cell = "";
  for (let i = 0; i < text.length; i++) {
    if (text[i] === "\\" && text[i + 1] === "|") {
      cell += "|";
      i++;
    } else if (text[i] === "|") {
      out.push(cell.trim());
      cell = "";
    } else {
      cell += text[i];
    }
  }
  out.push(cell.trim());
  return out;
}

function renderTable(lines, start, parent) {
  const head = cells(lines[start]);
  const aligns = cells(lines[start + 1]).map((rule) =>
    rule.startsWith(":") && rule.endsWith(":") ? "center" : rule.endsWith(":") ? "right" : rule.startsWith(":") ? "left" : "",
  );
  const table = make("table", "md-table");
  const headRow = document.createElement("tr");
  head.forEach((text, column) => {
    const th = make("th", aligns[column] ? `align-${aligns[column]}` : "");
    th.setAttribute("scope", "col");
    renderInline(text, th);
    headRow.append(th);
  });
  table.append(make("thead", "", [headRow]));
  const body = document.createElement("tbody");
  let i = start + 2;
  while (i < lines.length && lines[i].trim() !== "" && lines[i].includes("|")) {
    const row = document.createElement("tr");
    const values = cells(lines[i]);
    for (let column = 0; column < head.length; column++) {
      const td = make("td", aligns[column] ? `align-${aligns[column]}` : "");
      renderInline(values[column] ?? "", td);
      row.append(td);
    }
    body.append(row);
    i++;
  }
  table.append(body);
  parent.append(make("div", "table-scroll", [table]));
  return i;
}

function link(href, children) {
  const a = document.createElement("a");
  a.setAttribute("href", href);
  a.setAttribute("rel", "noopener noreferrer nofollow");
  a.setAttribute("target", "_blank");
  for (const child of children) a.append(child);
  return a;
}

/** The closing bracket matching the "[" at `open`, or -1. */
function closingBracket(text, open) {
  let depth = 0;
  for (let i = open; i < text.length; i++) {
    if (text[i] === "\\") i++;
    else if (text[i] === "[") depth++;
    else if (text[i] === "]" && --depth === 0) return i;
  }
  return -1;
}

/** "(url)" or "(url "title")" at `open`: [url, index after ")"], or null. */
function destination(text, open) {
  if (text[open] !== "(") return null;
  const match = /^\(\s*<?([^\s<>()]*(?:\([^\s()]*\)[^\s<>()]*)*)>?(?:\s+"[^"]*")?\s*\)/.exec(text.slice(open));
  return match ? [match[1], open + match[0].length] : null;
}

/** Append the inline content of `text` to `parent`. */
export function renderInline(text, parent) {
  let plain = "";
  const flush = () => {
    if (plain) parent.append(plain);
    plain = "";
  };
  let i = 0;
  while (i < text.length) {
    const c = text[i];
    const rest = text.slice(i);
    if (c === "\\" && PUNCTUATION.test(text.slice(i + 1))) {
      plain += text[i + 1];
      i += 2;
      continue;
    }
    if (c === "`") {
      const run = /^`+/.exec(rest)[0];
      const close = text.indexOf(run, i + run.length);
      if (close > 0) {
        flush();
        let code = text.slice(i + run.length, close);
        if (/^ .* $/.test(code)) code = code.slice(1, -1);
        parent.append(make("code", "", [code]));
        i = close + run.length;
        continue;
      }
      plain += run;
      i += run.length;
      continue;
    }
    if (c === "!" && text[i + 1] === "[") {
      const close = closingBracket(text, i + 1);
      const target = close > 0 ? destination(text, close + 1) : null;
      if (target) {
        flush();
        const alt = `image: ${text.slice(i + 2, close) || target[0]}`;
        parent.append(SAFE_URL.test(target[0]) ? link(target[0], [alt]) : `[${alt}]`);
        i = target[1];
        continue;
      }
    }
    if (c === "[") {
      const close = closingBracket(text, i);
      const target = close > 0 ? destination(text, close + 1) : null;
      if (target) {
        flush();
        const label = document.createDocumentFragment();
        renderInline(text.slice(i + 1, close), label);
        if (SAFE_URL.test(target[0])) parent.append(link(target[0], [label]));
        else parent.append(label); // an unsafe or relative link keeps only its text
        i = target[1];
        continue;
      }
    }
    if (c === "<") {
      const auto = /^<((?:https?:\/\/|mailto:)[^\s<>]+)>/i.exec(rest);
      if (auto) {
        flush();
        parent.append(link(auto[1], [auto[1]]));
        i += auto[0].length;
        continue;
      }
    }
    if ((c === "h" || c === "H") && (i === 0 || /[\s(]/.test(text[i - 1]))) {
      const bare = BARE_URL.exec(rest);
      if (bare) {
        flush();
        parent.append(link(bare[0], [bare[0]]));
        i += bare[0].length;
        continue;
      }
    }
    if (c === "*" || c === "_" || c === "~") {
      const run = c === "~" ? (rest.startsWith("~~") ? "~~" : "") : rest.startsWith(c + c) ? c + c : c;
      const intraword = c === "_" && i > 0 && /\w/.test(text[i - 1]);
      if (run && !intraword && text[i + run.length] && !/\s/.test(text[i + run.length])) {
        const close = closingDelimiter(text, i + run.length, run);
        if (close > 0) {
          flush();
          const tag = c === "~" ? "del" : run.length === 2 ? "strong" : "em";
          const node = document.createElement(tag);
          renderInline(text.slice(i + run.length, close), node);
          parent.append(node);
          i = close + run.length;
          continue;
        }
      }
      plain += run || c;
      i += (run || c).length;
      continue;
    }
    plain += c;
    i++;
  }
  flush();
}

function closingDelimiter(text, from, run) {
  for (let i = from; i < text.length; i++) {
    if (text[i] === "\\") {
      i++;
      continue;
    }
    if (text[i] === "`") {
      const tick = /^`+/.exec(text.slice(i))[0];
      const close = text.indexOf(tick, i + tick.length);
      if (close > 0) i = close + tick.length - 1;
      continue;
    }
    if (text.startsWith(run, i) && !/\s/.test(text[i - 1])) {
      const after = text[i + run.length];
      const single = run.length === 1 && text[i + 1] === run; // "**" is not the end of "*"
      const intraword = run[0] === "_" && after !== undefined && /\w/.test(after);
      if (!single && !intraword) return i;
      if (single) i++;
    }
  }
  return -1;
}
