"""What an operator sees: Prometheus metrics and structured logs (docs/operations.md).

``records.py`` is what one completion (or refusal) was; ``outcomes.py`` builds it from a
settled generation and its ledger row (once, never per token); ``metrics.py`` turns it into
Prometheus series on the app's own registry; ``logs.py`` into one log line, and configures
logging (JSON or text) for tokenwire and uvicorn alike.
"""
