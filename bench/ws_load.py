"""Many concurrent streams over WebSocket and SSE through the gateway, and idle-socket memory.

Run: ``python bench/ws_load.py [--streams 1000] [--tokens 100] [--itl-ms 100] [--idle 1000]``.

It starts ``tokenwire sim-upstream`` and ``tokenwire serve`` (separate processes, as
``proxy_speed.py`` does) and then:

1. **streams**: ``--streams`` clients at once, each streaming one completion of ``--tokens``
   tokens at ``1000 / --itl-ms`` tokens/s from model ``proxied-sim``: once over WebSocket
   (envelope mode, one socket per client) and once over SSE (keep-alive). Every text is checked
   against the simulator's; errors and wrong outputs are counted; TTFT and the gateway's peak
   RSS and CPU seconds are reported.
2. **idle** (run first, on the fresh gateway): opens ``--idle`` authenticated WebSocket
   connections that send nothing and reports the gateway's RSS growth per connection.

Exit 0 when every stream completed correctly, 1 otherwise.
"""

from __future__ import annotations

import argparse
import asyncio
import gc
import json
import shutil
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import aiohttp
import msgspec
import psutil
from proxy_speed import (
    GATEWAY_MODEL,
    ServerProcess,
    install_signal_exit,
    start_gateway,
    start_upstream,
)
from websockets.asyncio.client import connect

from tokenwire.providers.sim import plan
from tokenwire.wire.schema import decode_chat_request


@dataclass
class Outcome:
    """What one client saw."""

    text: str = ""
    ttft_s: float | None = None
    error: str | None = None


@dataclass
class RunReport:
    """One transport's run."""

    transport: str
    streams: int
    ok: int = 0
    errors: int = 0
    wrong: int = 0
    wall_s: float = 0.0
    tokens_per_s: float = 0.0
    ttft_p50_ms: float = 0.0
    ttft_p99_ms: float = 0.0
    gateway_peak_rss_mib: float = 0.0
    gateway_cpu_s_per_1k_tokens: float = 0.0
    first_errors: list[str] = field(default_factory=list)


def body_for(index: int, tokens: int) -> dict[str, Any]:
    return {
        "model": GATEWAY_MODEL,
        "messages": [{"role": "user", "content": f"ws load client {index}"}],
        "stream": True,
        "max_tokens": tokens,
    }


def expected_text(body: dict[str, Any]) -> str:
    return plan(decode_chat_request(msgspec.json.encode(body))).text


async def ws_client(url: str, key: str, index: int, tokens: int, start: asyncio.Event) -> Outcome:
    """One WebSocket client: envelope create, collect chunks until done."""
    outcome = Outcome()
    body = body_for(index, tokens)
    try:
        async with connect(
            url,
            additional_headers={"Authorization": f"Bearer {key}"},
            compression=None,
            open_timeout=60,
            max_queue=None,
        ) as ws:
            await start.wait()
            sent = time.perf_counter()
            message = {"type": "chat.completion.create", "request_id": "r", "body": body}
            await ws.send(json.dumps(message))
            pieces: list[str] = []
            async for raw in ws:
                data = json.loads(raw)
                kind = data.get("type")
                if kind == "chat.completion.chunk":
                    content = (data["choices"] or [{}])[0].get("delta", {}).get("content")
                    if content:
                        if outcome.ttft_s is None:
                            outcome.ttft_s = time.perf_counter() - sent
                        pieces.append(content)
                elif kind == "chat.completion.done":
                    break
                elif kind == "error":
                    outcome.error = str(data["error"].get("code"))
                    break
            outcome.text = "".join(pieces)
    except Exception as exc:  # noqa: BLE001 - counted, reported
        outcome.error = f"{type(exc).__name__}: {exc}"
    return outcome


async def sse_client(
    session: aiohttp.ClientSession, base: str, key: str, index: int, tokens: int, start: asyncio.Event
) -> Outcome:
    """One SSE client on a shared keep-alive pool."""
    outcome = Outcome()
    body = body_for(index, tokens)
    await start.wait()
    sent = time.perf_counter()
    try:
        async with session.post(
            base + "/v1/chat/completions",
            json=body,
            headers={"Authorization": f"Bearer {key}"},
        ) as response:
            if response.status != 200:
                outcome.error = f"HTTP {response.status}"
                return outcome
            pieces: list[str] = []
            async for line in response.content:
                if not line.startswith(b"data: {"):
                    continue
                data = json.loads(line[6:])
                if "error" in data:
                    outcome.error = str(data["error"].get("code"))
                    break
                content = (data["choices"] or [{}])[0].get("delta", {}).get("content")
                if content:
                    if outcome.ttft_s is None:
                        outcome.ttft_s = time.perf_counter() - sent
                    pieces.append(content)
            outcome.text = "".join(pieces)
    except Exception as exc:  # noqa: BLE001 - counted, reported
        outcome.error = f"{type(exc).__name__}: {exc}"
    return outcome


def percentile(values: list[float], q: float) -> float:
    if not values:
        return 0.0
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(q * len(ordered)))]


async def sample_rss(process: psutil.Process, stop: asyncio.Event, peak: list[float]) -> None:
    while not stop.is_set():
        peak[0] = max(peak[0], process.memory_info().rss / 2**20)
        await asyncio.sleep(0.1)


async def run_streams(transport: str, opts: argparse.Namespace, base: str, key: str, gw: psutil.Process) -> RunReport:
    report = RunReport(transport=transport, streams=opts.streams)
    start = asyncio.Event()
    ws_url = base.replace("http://", "ws://") + "/v1/ws/chat"
    connector = aiohttp.TCPConnector(limit=0)
    async with aiohttp.ClientSession(connector=connector, timeout=aiohttp.ClientTimeout(total=None)) as session:
        if transport == "ws":
            tasks = [
                asyncio.create_task(ws_client(ws_url, key, i, opts.tokens, start))
                for i in range(opts.streams)
            ]
            await asyncio.sleep(0)  # let the sockets connect before the clock starts
            while sum(1 for c in gw.net_connections() if c.status == "ESTABLISHED") < opts.streams:
                await asyncio.sleep(0.05)
        else:
            tasks = [
                asyncio.create_task(sse_client(session, base, key, i, opts.tokens, start))
                for i in range(opts.streams)
            ]
        gc.collect()
        cpu_before = sum(gw.cpu_times()[:2])
        peak = [gw.memory_info().rss / 2**20]
        stop = asyncio.Event()
        sampler = asyncio.create_task(sample_rss(gw, stop, peak))
        began = time.perf_counter()
        start.set()
        outcomes = await asyncio.gather(*tasks)
        report.wall_s = time.perf_counter() - began
        stop.set()
        await sampler
        cpu_s = sum(gw.cpu_times()[:2]) - cpu_before
    ttfts = []
    for index, outcome in enumerate(outcomes):
        if outcome.error is not None:
            report.errors += 1
            if len(report.first_errors) < 5:
                report.first_errors.append(outcome.error)
        elif outcome.text != expected_text(body_for(index, opts.tokens)):
            report.wrong += 1
        else:
            report.ok += 1
            if outcome.ttft_s is not None:
                ttfts.append(outcome.ttft_s)
    tokens = report.ok * opts.tokens
    report.tokens_per_s = tokens / report.wall_s if report.wall_s else 0.0
    report.ttft_p50_ms = percentile(ttfts, 0.5) * 1000
    report.ttft_p99_ms = percentile(ttfts, 0.99) * 1000
    report.gateway_peak_rss_mib = peak[0]
    report.gateway_cpu_s_per_1k_tokens = cpu_s / tokens * 1000 if tokens else 0.0
    return report


async def idle_sockets(count: int, base: str, key: str, gw: psutil.Process) -> dict[str, float]:
    """Open ``count`` authenticated idle sockets; RSS growth per socket."""
    url = base.replace("http://", "ws://") + "/v1/ws/chat"
    await asyncio.sleep(1.0)
    before = gw.memory_info().rss
    sockets = []
    for batch in range(0, count, 100):
        sockets += await asyncio.gather(
            *(
                connect(url, additional_headers={"Authorization": f"Bearer {key}"}, compression=None)
                for _ in range(min(100, count - batch))
            )
        )
    for _ in range(50):  # let the gateway finish every handshake
        if sum(1 for c in gw.net_connections() if c.status == "ESTABLISHED") >= count:
            break
        await asyncio.sleep(0.1)
    after = gw.memory_info().rss
    await asyncio.gather(*(ws.close() for ws in sockets))
    return {
        "idle_sockets": float(count),
        "rss_before_mib": before / 2**20,
        "rss_after_mib": after / 2**20,
        "kib_per_socket": (after - before) / count / 1024,
    }


async def main_async(opts: argparse.Namespace, base: str, key: str, gw: psutil.Process) -> dict[str, Any]:
    results: dict[str, Any] = {"options": vars(opts), "runs": []}
    if opts.idle:  # first, on a fresh gateway, so free lists from earlier runs do not hide it
        idle = await idle_sockets(opts.idle, base, key, gw)
        results["idle"] = idle
        print(
            f"idle: {opts.idle} WebSocket connections: gateway RSS {idle['rss_before_mib']:.1f} → "
            f"{idle['rss_after_mib']:.1f} MiB, {idle['kib_per_socket']:.1f} KiB per connection"
        )
    for transport in opts.transports.split(","):
        report = await run_streams(transport, opts, base, key, gw)
        results["runs"].append(report.__dict__)
        print(
            f"{transport:>3}: {report.streams} streams x {opts.tokens} tokens: ok {report.ok}, "
            f"errors {report.errors}, wrong {report.wrong}; {report.tokens_per_s:,.0f} tok/s; "
            f"TTFT p50 {report.ttft_p50_ms:.1f} ms p99 {report.ttft_p99_ms:.1f} ms; "
            f"gateway peak RSS {report.gateway_peak_rss_mib:.0f} MiB, "
            f"{report.gateway_cpu_s_per_1k_tokens:.3f} CPU s/1k tokens"
            + (f"; first errors {report.first_errors}" if report.first_errors else "")
        )
    return results


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--streams", type=int, default=1000)
    parser.add_argument("--tokens", type=int, default=100)
    parser.add_argument("--itl-ms", type=float, default=100.0)
    parser.add_argument("--ttft-ms", type=float, default=100.0)
    parser.add_argument("--transports", default="ws,sse", help="comma list of ws, sse")
    parser.add_argument("--idle", type=int, default=1000, help="idle sockets to open (0: skip)")
    parser.add_argument("--json", type=Path, help="write the results here")
    opts = parser.parse_args()
    install_signal_exit()
    workdir = Path(tempfile.mkdtemp(prefix="tokenwire-wsload-"))
    servers: list[ServerProcess] = []
    try:
        upstream = start_upstream(
            SimpleNamespace(ttft_ms=opts.ttft_ms, itl_ms=opts.itl_ms),  # type: ignore[arg-type]
            workdir,
            servers,
        )
        gateway, base, key = start_gateway(upstream[1], workdir, servers)
        gw = psutil.Process(gateway.pid)
        results = asyncio.run(main_async(opts, base, key, gw))
        if opts.json:
            opts.json.write_text(json.dumps(results, indent=2, default=str))
        failed = any(r["errors"] or r["wrong"] for r in results["runs"])
        return 1 if failed else 0
    finally:
        for server in reversed(servers):
            server.stop()
        shutil.rmtree(workdir, ignore_errors=True)


if __name__ == "__main__":
    sys.exit(main())
