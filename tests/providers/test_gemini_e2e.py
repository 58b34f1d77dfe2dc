"""Gemini end to end: the openai SDK streams text and a forced tool call through a real gateway
whose ``gemini`` provider is the fake Gemini API, with usage, finish reasons, the system
instruction and the API key as the fake received them.
"""

from __future__ import annotations

from pathlib import Path

import openai
from tests.providers.gemini_common import MODEL, TOOLS, reply

from tokenwire.testing import GatewayServer
from tokenwire.testing_upstreams.gemini_fake import THOUGHT_TOKENS, GeminiFakeThread


def test_gateway_streams_gemini_through_the_openai_sdk(tmp_path: Path) -> None:
    """The openai SDK streams gemini-2.5-flash through the gateway from the fake Gemini API."""
    with GeminiFakeThread(api_key="k") as upstream:
        overrides = (
            "[providers.gemini]\n"
            'kind = "gemini"\n'
            f'base_url = "{upstream.base_url}"\n'
            'api_key_env = "GEMINI_API_KEY"\n'
        )
        with GatewayServer(tmp_path, overrides=overrides, env={"GEMINI_API_KEY": "k"}) as gateway:
            client = openai.OpenAI(
                base_url=gateway.base_url + "/v1",
                api_key=gateway.api_key,
                max_retries=0,
                timeout=10,
            )
            with client:
                stream = client.chat.completions.create(
                    model=MODEL,
                    messages=[
                        {"role": "system", "content": "Be brief."},
                        {"role": "user", "content": "Hi"},
                    ],
                    max_tokens=6,
                    stream=True,
                    stream_options={"include_usage": True},
                )
                chunks = list(stream)
                text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
                finish = [
                    c.choices[0].finish_reason
                    for c in chunks
                    if c.choices and c.choices[0].finish_reason
                ]
                usage = chunks[-1].usage
                tool_stream = client.chat.completions.create(  # type: ignore[call-overload]
                    model=MODEL,
                    messages=[{"role": "user", "content": "Look it up"}],
                    tools=TOOLS,
                    tool_choice="required",
                    stream=True,
                )
                tool_chunks = list(tool_stream)
        requests = list(upstream.fake.requests)
    assert text == reply(6) and finish == ["length"]
    assert usage is not None and usage.prompt_tokens == 3
    assert usage.completion_tokens == 6 + THOUGHT_TOKENS
    calls = [tc for c in tool_chunks if c.choices for tc in c.choices[0].delta.tool_calls or ()]
    assert [c.function.name for c in calls if c.function] == ["lookup"]
    assert tool_chunks[-1].choices[0].finish_reason == "tool_calls"
    assert requests[0].body["systemInstruction"] == {"parts": [{"text": "Be brief."}]}
    assert requests[0].headers["x-goog-api-key"] == "k"
