"""Builds one provider per configured entry and resolves a model id to its provider.

A provider whose configuration cannot work here (its API-key variable unset, its kind not
built yet, ``llama-cpp-python`` not installed) is kept as *unavailable* with a reason that
tells the operator what to do; requests for its models get that reason as a 503.
"""

from __future__ import annotations

import importlib.util
import time
from collections.abc import Mapping
from typing import Any

from tokenwire.config import ModelEntry, ProviderConfig, Settings
from tokenwire.errors import ModelNotFound
from tokenwire.providers.anthropic import AnthropicProvider
from tokenwire.providers.base import Provider
from tokenwire.providers.gemini import GeminiProvider
from tokenwire.providers.openai_compat import OpenAICompatProvider
from tokenwire.providers.router import DeploymentState, circuit_state, route
from tokenwire.providers.sim import SimProvider

# Upstreams spoken to over HTTP, one module each; all take the same constructor arguments.
_HTTP_KINDS: dict[str, type[AnthropicProvider | GeminiProvider | OpenAICompatProvider]] = {
    "openai": OpenAICompatProvider,
    "anthropic": AnthropicProvider,
    "gemini": GeminiProvider,
}


def build_provider(name: str, config: ProviderConfig, env: Mapping[str, str]) -> Provider | str:
    """The provider for ``config``, or a reason it is unavailable."""
    if config.kind == "sim":
        return SimProvider(name, ttft_ms=config.ttft_ms, itl_ms=config.itl_ms)
    http_provider = _HTTP_KINDS.get(config.kind)
    if http_provider is not None:
        api_key = env.get(config.api_key_env) if config.api_key_env else None
        if config.api_key_env and not api_key:
            return f"provider {name!r} is not configured: set {config.api_key_env}"
        if not config.base_url:
            return f"provider {name!r} is not configured: set base_url in the config file"
        options: dict[str, Any] = {
            "base_url": config.base_url,
            "api_key": api_key,
            "connect_timeout_s": config.connect_timeout_s,
            "first_token_timeout_s": config.first_token_timeout_s,
            "idle_timeout_s": config.idle_timeout_s,
            "max_connections": config.max_connections,
            "keepalive_timeout_s": config.keepalive_timeout_s,
        }
        if config.kind == "openai":
            options["output_limit_field"] = config.output_limit_field
        return http_provider(name, **options)
    if config.kind == "local":
        if importlib.util.find_spec("llama_cpp") is None:
            return f"provider {name!r} needs llama-cpp-python: pip install 'tokenwire[local]'"
        from tokenwire.providers.local import LocalProvider

        return LocalProvider(
            name,
            model_path=config.model_path,
            max_queue=config.max_queue,
            n_ctx=config.n_ctx,
            n_threads=config.n_threads,
        )
    return f"provider kind {config.kind!r} ({name!r}) is not supported"


class ProviderRegistry:
    """The configured providers and the model catalog."""

    def __init__(self, settings: Settings, env: Mapping[str, str]) -> None:
        self.models: dict[str, ModelEntry] = dict(settings.models)
        self._routing = settings.routing
        self._providers: dict[str, Provider] = {}
        self._unavailable: dict[str, str] = {}
        self._deployment_states: dict[tuple[str, str], DeploymentState] = {}
        self._routed: dict[str, Provider] = {}
        for name, config in settings.providers.items():
            built = build_provider(name, config, env)
            if isinstance(built, str):
                self._unavailable[name] = built
            else:
                self._providers[name] = built

    def add(self, name: str, provider: Provider) -> None:
        """Add (or replace) the provider called ``name``: a custom upstream adapter, or a test
        double. Models whose deployments name it use it from their next request on."""
        self._providers[name] = provider
        self._unavailable.pop(name, None)
        self._routed.clear()
        self._deployment_states = {
            key: state for key, state in self._deployment_states.items() if key[0] != name
        }

    def unavailable_reason(self, entry: ModelEntry) -> str | None:
        """Why no deployment of the model can serve it, or None if one can."""
        names = [d.provider for d in entry.all_deployments()]
        if any(name in self._providers for name in names):
            return None
        return "; ".join(self._unavailable.get(name, f"{name} missing") for name in names)

    def resolve(self, model_id: str) -> tuple[Provider, ModelEntry]:
        """The provider and catalog entry for ``model_id``."""
        entry = self.models.get(model_id)
        if entry is None:
            raise ModelNotFound(
                f"The model {model_id!r} does not exist; GET /v1/models lists the available ones.",
                param="model",
            )
        provider = self._routed.get(model_id)
        if provider is None:
            provider = route(
                entry, self._providers, self._unavailable, self._deployment_states, self._routing
            )
            self._routed[model_id] = provider
        return provider, entry

    def circuits(self) -> dict[str, int]:
        """Each deployment used so far and its circuit now (``router.circuit_state``)."""
        now = time.monotonic()
        return {
            state.entry.name: circuit_state(state, self._routing, now)
            for state in self._deployment_states.values()
        }

    async def aclose(self) -> None:
        """Close every provider."""
        for provider in self._providers.values():
            await provider.aclose()
