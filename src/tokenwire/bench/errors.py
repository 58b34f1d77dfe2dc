"""Errors of ``tokenwire bench``, in the project's exception tree (:mod:`tokenwire.errors`).

Invalid options are reported as :class:`tokenwire.errors.InvalidRequest` with ``param`` naming
the option. The classes here map to the command's exit codes (see :mod:`.runner`).
"""

from __future__ import annotations

from tokenwire.errors import GatewayError, ProviderUnavailable


class MissingDependency(ProviderUnavailable):
    """An optional package the benchmark needs is not installed."""

    default_code = "bench_missing_dependency"


class ServerStartFailed(ProviderUnavailable):
    """A server the benchmark starts did not come up (exit code 2)."""

    default_code = "bench_server_start_failed"


class WorkerFailed(GatewayError):
    """A load-generator process died or broke the protocol (exit code 1)."""

    default_code = "bench_worker_failed"
