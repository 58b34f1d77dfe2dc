"""Acceptance: streams through a proxy that cuts every connection mid-answer arrive whole.

200 streamed requests per transport go through :class:`~tokenwire.testing_proxy.CuttingProxy`,
which cuts each connection after 1 to 8 content chunks (plus up to 120 bytes, so often inside
a frame). Every answer has at least 16 tokens, paced 20 ms apart, so each request is cut at
least once after its first token (a resume replays at most the tokens made while the client
reconnected, merged into one chunk over WebSocket); the client resumes it from its last event. Each text must equal the simulator's,
chunks must arrive in strictly increasing event order (nothing repeated), and the ledger must
hold exactly one completed row per request, charged what the client was told.
"""

from __future__ import annotations

import asyncio
import random
from collections.abc import Iterator
from typing import Any

import pytest

from tokenwire.testing import GatewayServer, sim_plan
from tokenwire.testing_proxy import CuttingProxy
from tokenwire_client import AsyncClient, RetryPolicy

MODEL = "priced-sim"  # from conftest: 20 ms per token, priced
REQUESTS = 200
PARALLEL = 30  # under the gateway's 32 requests per WebSocket


@pytest.fixture
def proxy(sdk_gateway: GatewayServer) -> Iterator[CuttingProxy]:
    """A cutting proxy in front of the module's gateway."""
    with CuttingProxy(sdk_gateway.port, marks=(1, 8), extra_bytes=(0, 120), seed=15) as server:
        yield server


def body_for(n: int, rng: random.Random) -> dict[str, Any]:
    return {
        "model": MODEL,
        "messages": [{"role": "user", "content": f"cut me {n} {rng.random()}"}],
        "max_tokens": rng.randint(16, 30),
    }


async def one(client: AsyncClient, body: dict[str, Any]) -> dict[str, Any]:
    """Stream one request to its end; what the caller saw."""
    seqs: list[int] = []
    pieces: list[str] = []
    async with await client.chat.completions.create(**body, stream=True) as stream:
        async for chunk in stream:
            assert chunk.sequence_number is not None
            seqs.append(chunk.sequence_number)
            if chunk.choices and chunk.choices[0].delta.content:
                pieces.append(chunk.choices[0].delta.content)
    return {
        "id": stream.stream_id,
        "seqs": seqs,
        "pieces": pieces,
        "usage": stream.usage,
        "finish": stream.finish_reason,
        "resumes": stream.resumes,
        "retries": stream.retries,
        "expected": sim_plan({**body, "stream": True}).tokens,
    }


@pytest.mark.parametrize("transport", ["sse", "ws"])
async def test_streams_cut_mid_answer_arrive_whole_and_are_billed_once(
    sdk_gateway: GatewayServer, proxy: CuttingProxy, transport: str
) -> None:
    """200 streams, every connection cut after 1-8 content chunks: each resumed at least once mid-answer, exact text, no chunk twice, one completed ledger row each, charged what usage.cost_micro said."""
    _, key = sdk_gateway.create_key(f"cuts-{transport}", credits_usd="100")
    rng = random.Random(transport)
    bodies = [body_for(n, rng) for n in range(REQUESTS)]
    gate = asyncio.Semaphore(PARALLEL)
    policy = RetryPolicy(max_retries=8, initial_backoff_s=0.01, max_backoff_s=0.2)
    async with AsyncClient(
        proxy.base_url, key, transport=transport, timeout=30, retry_policy=policy
    ) as client:

        async def gated(body: dict[str, Any]) -> dict[str, Any]:
            async with gate:
                return await one(client, body)

        results = await asyncio.gather(*(gated(b) for b in bodies))
    assert proxy.cuts > 0
    for result in results:
        assert "".join(result["pieces"]) == "".join(result["expected"]), result["id"]
        assert result["seqs"] == sorted(set(result["seqs"])), result["seqs"]  # nothing twice
        assert result["resumes"] >= 1, (result["seqs"], result["retries"], len(result["pieces"]))
        assert result["finish"] == "length"
        assert result["usage"].completion_tokens == len(result["expected"])
        if transport == "sse":  # SSE never merges: one chunk per token
            assert result["pieces"] == list(result["expected"])
    ids = sorted(r["id"] for r in results)
    assert len(set(ids)) == REQUESTS
    rows = sdk_gateway.usage_rows(key, REQUESTS)
    assert sorted(r["completion_id"] for r in rows) == ids  # exactly one row per request
    assert {r["status"] for r in rows} == {"completed"}
    charged = {r["completion_id"]: r["cost_micro"] for r in rows}
    assert all(charged[r["id"]] == r["usage"].cost_micro > 0 for r in results)
