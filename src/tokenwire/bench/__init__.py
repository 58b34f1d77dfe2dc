"""``tokenwire bench``: streaming latency, throughput and resources, with method.

The instrument starts what it needs (``tokenwire sim-upstream`` and ``tokenwire serve``, each in
its own process) or targets a running OpenAI-compatible gateway, then drives scenarios
(``direct``, ``sse``, ``sse-new-conn``, ``ws``, ``ws-mux``) over a concurrency sweep from one
load-generator process per scenario. Metric definitions follow vLLM's ``bench serve`` (see
``docs/benchmarks.md``).

Modules, in the order data flows through them:

- :mod:`~tokenwire.bench.options`: the command's options and their validation.
- :mod:`~tokenwire.bench.servers`: server subprocesses (start, health, stop) and py-spy.
- :mod:`~tokenwire.bench.workload`: request bodies, the simulator's expected text, stream state.
- :mod:`~tokenwire.bench.sse` and :mod:`~tokenwire.bench.ws`: one client per transport.
- :mod:`~tokenwire.bench.worker`: the load-generator process; :mod:`~tokenwire.bench.loadgen`
  drives it from the runner over :mod:`~tokenwire.bench.ipc` frames.
- :mod:`~tokenwire.bench.resources`: psutil sampling of CPU seconds and RSS.
- :mod:`~tokenwire.bench.metrics`: per-request records, percentiles, rows, overheads.
- :mod:`~tokenwire.bench.leaks`: the gateway's runtime counts (``GET /v1/admin/runtime``)
  before and after the load, and its RSS growth: leak accounting.
- :mod:`~tokenwire.bench.runner`: the schedule (warm-up, rounds, sweep) and exit codes.
- :mod:`~tokenwire.bench.report` and :mod:`~tokenwire.bench.plots`: JSON, Markdown, tables, PNGs.

Only :mod:`~tokenwire.bench.command` and :mod:`~tokenwire.bench.options` are imported when the
CLI starts; everything else (aiohttp, websockets, psutil, matplotlib) is imported on use.
"""
