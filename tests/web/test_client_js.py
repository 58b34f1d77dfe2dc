"""tokenwire.js in a real browser: typed errors, cancel, resume after the network drops, and
its SSE parser."""

from __future__ import annotations

import re
from typing import Any

import pytest
from playwright.sync_api import Page, expect
from tests.web.conftest import CuttableProxy, WebGateway, sim_text, wait_until

STREAM = """async ([key, body, options]) => {
  const { Tokenwire } = await import("/static/tokenwire.js");
  const tw = new Tokenwire({ apiKey: key });
  const stream = tw.chatStream(body, options);
  window.__stream = stream;
  window.__result = (async () => {
    let chunks = 0;
    try {
      for await (const _chunk of stream) {
        chunks++;
        document.body.dataset.chunks = String(chunks);
        document.body.dataset.reconnects = String(stream.reconnects);
      }
      return { text: stream.text, finish: stream.finishReason, usage: stream.usage, id: stream.id, reconnects: stream.reconnects, chunks };
    } catch (error) {
      return { error: error.name, status: error.status, code: error.code, param: error.param, message: error.message };
    }
  })();
}"""

FAILURE = """async ([key, transport, body]) => {
  const { Tokenwire, TokenwireError } = await import("/static/tokenwire.js");
  const tw = new Tokenwire({ apiKey: key });
  try {
    if (body === null) await tw.models();
    else await tw.chatStream(body, { transport }).done();
    return null;
  } catch (error) {
    return { name: error.name, typed: error instanceof TokenwireError, status: error.status, code: error.code, param: error.param };
  }
}"""


def chat(model: str, prompt: str, **extra: Any) -> dict[str, Any]:
    return {
        "model": model,
        "messages": [{"role": "user", "content": prompt}],
        "stream_options": {"include_usage": True},
        **extra,
    }


def start_stream(page: Page, key: str, body: dict[str, Any], **options: Any) -> None:
    page.evaluate(STREAM, [key, body, options])


def wait_for_chunks(page: Page, at_least: int) -> None:
    """Wait until the stream started by ``start_stream`` has yielded ``at_least`` (< 10) chunks."""
    expect(page.locator("body")).to_have_attribute(
        "data-chunks", re.compile(rf"^([{at_least}-9]|\d\d+)$")
    )


@pytest.mark.parametrize(
    ("key", "transport", "body", "expected"),
    [
        ("tw-wrong", "sse", None, ("AuthenticationError", 401, "invalid_api_key", None)),
        (
            "tw-wrong",
            "ws",
            {"model": "sim", "messages": [{"role": "user", "content": "x"}]},
            ("AuthenticationError", 401, "invalid_api_key", None),
        ),
        (
            "api",
            "sse",
            {"model": "nope", "messages": [{"role": "user", "content": "x"}]},
            ("NotFoundError", 404, "model_not_found", "model"),
        ),
        (
            "api",
            "ws",
            {"model": "nope", "messages": [{"role": "user", "content": "x"}]},
            ("NotFoundError", 404, "model_not_found", "model"),
        ),
        (
            "api",
            "sse",
            {"model": "sim", "max_tokens": 10**9, "messages": [{"role": "user", "content": "x"}]},
            ("BadRequestError", 400, None, "max_tokens"),
        ),
        ("api", "ws", {"model": "sim", "messages": []}, ("BadRequestError", 400, None, "messages")),
    ],
)
def test_errors_are_typed_on_both_transports(
    web: WebGateway,
    page: Page,
    key: str,
    transport: str,
    body: dict[str, Any] | None,
    expected: tuple[Any, ...],
) -> None:
    """A bad key, an unknown model and an invalid body throw the TokenwireError subclass for their status, with code and param."""
    page.goto(web.base_url + "/usage")
    result = page.evaluate(FAILURE, [web.server.api_key if key == "api" else key, transport, body])
    assert result is not None and result["typed"] is True
    name, status, code, param = expected
    assert (result["name"], result["status"], result["param"]) == (name, status, param)
    if code is not None:
        assert result["code"] == code


@pytest.mark.parametrize("transport", ["sse", "ws"])
def test_a_stream_resumes_after_the_network_drops(
    web: WebGateway, page: Page, transport: str
) -> None:
    """Every connection cut mid-answer: the client reconnects and resumes from the last event; exact text, billed once."""
    _, key = web.new_key(f"cut-{transport}")
    with CuttableProxy(web.server.port) as proxy:
        page.goto(proxy.base_url + "/usage")
        body = chat("paced-sim", f"cut me over {transport}", max_tokens=100)
        start_stream(page, key, body, transport=transport, resumable=True)
        wait_for_chunks(page, 5)
        proxy.cut()
        result = page.evaluate("() => window.__result")
    assert "error" not in result, result
    assert result["reconnects"] >= 1
    assert result["text"] == sim_text(f"cut me over {transport}", max_tokens=100)
    assert result["finish"] == "length" and result["usage"]["completion_tokens"] == 100
    wait_until(lambda: web.usage(key)["total"]["requests"] == 1, "the ledger row")
    assert web.usage(key)["total"]["completion_tokens"] == 100


def test_cancelling_a_plain_sse_stream_closes_the_upstream(web: WebGateway, page: Page) -> None:
    """cancel() on a stream that is not resumable closes the connection: the iteration ends as cancelled and the upstream request is closed."""
    before = web.upstream_stats()["cancelled_streams"]
    page.goto(web.base_url + "/usage")
    start_stream(
        page,
        web.server.api_key,
        chat("upstream-sim", "cancel me", max_tokens=3000),
        transport="sse",
    )
    wait_for_chunks(page, 3)
    page.evaluate("() => window.__stream.cancel()")
    result = page.evaluate("() => window.__result")
    assert result["finish"] == "cancelled" and 3 <= result["chunks"] < 3000
    wait_until(
        lambda: web.upstream_stats()["cancelled_streams"] == before + 1, "the upstream's cancel"
    )


def test_the_sse_parser_follows_the_event_stream_rules(web: WebGateway, page: Page) -> None:
    """Lines split anywhere (CRLF across reads too), comments, multi-line data, id and retry parse as the WHATWG rules say."""
    page.goto(web.base_url + "/usage")
    events = page.evaluate(
        """async () => {
          const { SSEParser } = await import("/static/tokenwire.js");
          const parser = new SSEParser();
          const out = [];
          for (const piece of [": ping\\r", "\\n", "id: 7\\r\\nda", "ta: {\\"a\\":", "1}\\r", "\\n\\r\\n", "data: x\\ndata:y\\n\\n", "retry: 1500\\n", "id\\ndata: last\\n\\n", "data: no end"]) {
            out.push(...parser.push(piece));
          }
          return { events: out, retry: parser.retry };
        }"""
    )
    assert events == {
        "events": [
            {"data": '{"a":1}', "id": "7"},
            {"data": "x\ny", "id": None},
            {"data": "last", "id": ""},
        ],
        "retry": 1500,
    }
