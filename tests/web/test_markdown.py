"""The Markdown renderer (markdown.js) in a real browser: what it makes of answers, and that
HTML in them stays text."""

from __future__ import annotations

from playwright.sync_api import Page
from tests.web.conftest import WebGateway

RENDER = """async (cases) => {
  const { renderMarkdown } = await import("/static/markdown.js");
  return cases.map((markdown) => {
    const box = document.createElement("div");
    renderMarkdown(markdown, box);
    return box.innerHTML;
  });
}"""

LINK = 'rel="noopener noreferrer nofollow" target="_blank"'
CASES = [
    (
        "# Title\n\nSome *em*, **strong**, ~~old~~ and `co*de`.",
        "<h1>Title</h1><p>Some <em>em</em>, <strong>strong</strong>, <del>old</del> and <code>co*de</code>.</p>",
    ),
    ("one\ntwo\n\nthree", "<p>one<br>two</p><p>three</p>"),
    (
        "- a\n- b\n  - c\n\n1. x\n2. y",
        "<ul><li>a</li><li>b<ul><li>c</li></ul></li></ul><ol><li>x</li><li>y</li></ol>",
    ),
    ("3. three\n4. four", '<ol start="3"><li>three</li><li>four</li></ol>'),
    (
        "```html\n<b>x</b> & y\n```\nafter",
        '<pre><code class="language-html">&lt;b&gt;x&lt;/b&gt; &amp; y</code></pre><p>after</p>',
    ),
    ("```\nstill streaming", "<pre><code>still streaming</code></pre>"),
    ("    indented\n    code", "<pre><code>indented\ncode</code></pre>"),
    (
        "> quoted **text**\n> more",
        "<blockquote><p>quoted <strong>text</strong><br>more</p></blockquote>",
    ),
    ("a\n\n---\n\nb", "<p>a</p><hr><p>b</p>"),
    (
        "[ok](https://example.com/a_(b)) and [bad](javascript:alert(1)) and [rel](/x)",
        f'<p><a href="https://example.com/a_(b)" {LINK}>ok</a> and bad and rel</p>',
    ),
    (
        "see <https://a.example/c> and http://x.example/z.",
        f'<p>see <a href="https://a.example/c" {LINK}>https://a.example/c</a> and <a href="http://x.example/z" {LINK}>http://x.example/z</a>.</p>',
    ),
    (
        "![a cat](https://img.example/cat.png) ![x](javascript:1)",
        f'<p><a href="https://img.example/cat.png" {LINK}>image: a cat</a> [image: x]</p>',
    ),
    ("\\*not em\\* snake_case_name 2*3*4", "<p>*not em* snake_case_name 2<em>3</em>4</p>"),
    (
        "| a | b |\n|---|:-:|\n| 1 | `\\|` |\n| 2 |",
        '<div class="table-scroll"><table class="md-table"><thead><tr><th scope="col">a</th><th class="align-center" scope="col">b</th></tr></thead><tbody><tr><td>1</td><td class="align-center"><code>|</code></td></tr><tr><td>2</td><td class="align-center"></td></tr></tbody></table></div>',
    ),
    (
        "<img src=x onerror=alert(1)><script>alert(2)</script>",
        "<p>&lt;img src=x onerror=alert(1)&gt;&lt;script&gt;alert(2)&lt;/script&gt;</p>",
    ),
    (
        '**<a href="javascript:alert(1)">x</a>**',
        '<p><strong>&lt;a href="javascript:alert(1)"&gt;x&lt;/a&gt;</strong></p>',
    ),
    ("", ""),
]


def test_markdown_renders_to_safe_elements(web: WebGateway, page: Page) -> None:
    """Each construct becomes the expected elements; raw HTML and unsafe URLs stay text."""
    page.goto(web.base_url + "/usage")
    rendered = page.evaluate(RENDER, [markdown for markdown, _ in CASES])
    wrong = {
        markdown: got for (markdown, html), got in zip(CASES, rendered, strict=True) if got != html
    }
    assert wrong == {}


PREFIXES = """async (text) => {
  const { renderMarkdown } = await import("/static/markdown.js");
  const bad = [];
  for (let end = 0; end <= text.length; end++) {
    const box = document.createElement("div");
    renderMarkdown(text.slice(0, end), box);
    for (const node of box.querySelectorAll("*")) {
      const allowed = ["P", "BR", "H1", "H2", "H3", "H4", "H5", "H6", "EM", "STRONG", "DEL", "CODE", "PRE", "UL", "OL", "LI", "BLOCKQUOTE", "HR", "A", "DIV", "TABLE", "THEAD", "TBODY", "TR", "TH", "TD"];
      if (!allowed.includes(node.tagName)) bad.push(`${end}: <${node.tagName}>`);
      for (const attribute of node.attributes) {
        if (!["href", "rel", "target", "class", "scope", "start"].includes(attribute.name)) bad.push(`${end}: ${attribute.name}`);
      }
      if (node.tagName === "A" && !/^(https?:|mailto:)/.test(node.getAttribute("href"))) bad.push(`${end}: href ${node.getAttribute("href")}`);
    }
  }
  return bad;
}"""


def test_every_prefix_of_a_streaming_answer_renders_safely(web: WebGateway, page: Page) -> None:
    """Rendering each prefix of a mixed, hostile answer (as it streams in) makes only allowed elements, attributes and links."""
    page.goto(web.base_url + "/usage")
    text = (
        "\n\n".join(markdown for markdown, _ in CASES)
        + "\n[x](javascript:alert(1)) <a href=javascript:1 onclick=alert(1)>y</a>"
    )
    assert page.evaluate(PREFIXES, text) == []
