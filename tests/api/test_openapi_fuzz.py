"""Schemathesis over our own ``/openapi.json``, against a real gateway on loopback.

Every HTTP operation of the document is exercised with requests generated from it, positive
(valid by the schema) and negative (violating it), through the examples, coverage and fuzzing
phases. Each response must pass:

* ``not_a_server_error``: no 5xx (the webhook gets its signature, so no 503 either);
* ``status_code_conformance``, ``content_type_conformance``, ``response_schema_conformance``:
  the answer is one the document describes;
* ``negative_data_rejection``: a request the schema forbids is refused (4xx);
* ``positive_data_acceptance``: a request the schema allows is not refused with 400/422,
  except for the three refusals a JSON Schema cannot express, each with its own error code
  (:data:`SEMANTIC_REFUSALS`).

Admin operations use the admin key, the others the API key; the webhook is signed with the
test secret.

Budget: 25 fuzzing cases per operation (x ``TOKENWIRE_FUZZ_SCALE``), plus schemathesis's
examples and coverage phases, over the 18 operations: about 1,100 requests, under 10 s;
derandomized, no example database.
"""

from __future__ import annotations

import json
import time
from collections.abc import Iterator
from typing import Any

import jsonschema
import pytest
import requests
import schemathesis
from hypothesis import HealthCheck, settings
from schemathesis.checks import CheckContext, not_a_server_error
from schemathesis.core import NotSet
from schemathesis.specs.openapi.checks import (
    content_type_conformance,
    negative_data_rejection,
    positive_data_acceptance,
    response_schema_conformance,
    status_code_conformance,
)

from tokenwire.api.webhooks import signature_header
from tokenwire.testing import GatewayServer
from tokenwire.testing_fuzz import SCALE

SECRET = "whsec_schemathesis"
EXAMPLES = 25 * SCALE

SEMANTIC_REFUSALS = {
    # time-dependent: a key's expiry must be later than the server's clock
    "expiry_not_in_future",
    # across two parameters: /v1/usage and /v1/admin/usage need end > start
    "empty_time_range",
    # a JSON number with more than 6 decimals: multipleOf on binary floats is inexact
    "amount_too_precise",
}


# The models this gateway serves are simulated and instant, with a small output limit, so the
# fuzzer spends its time on the gateway rather than on generating answers; "local" (a real
# CPU model) is served by the simulator here too. Sign-up is on and two currencies are
# configured, so the fuzzer reaches what they add (keys made, payments converted).
FUZZ_CATALOG = """
[providers.sim]
kind = "sim"
ttft_ms = 0.0
itl_ms = 0.0

[[models]]
id = "sim"
provider = "sim"
max_output_tokens = 256

[[models]]
id = "local"
provider = "sim"
max_output_tokens = 256

[signup]
enabled = true
grant_usd = "0.25"
max_per_day = 1000

[currencies]
CNY = "1.0"
JPY = "0.0067"
"""


@pytest.fixture(scope="module")
def gw(tmp_path_factory: pytest.TempPathFactory) -> Iterator[GatewayServer]:
    """A gateway with the webhook secret set, so the webhook is testable."""
    env = {"TOKENWIRE_WEBHOOK_SECRET": SECRET}
    with GatewayServer(
        tmp_path_factory.mktemp("openapi-fuzz"), env=env, overrides=FUZZ_CATALOG
    ) as server:
        yield server


@pytest.fixture(scope="module")
def api_schema(gw: GatewayServer) -> Any:
    """Our document, loaded from the running gateway, with a deterministic budget."""
    config = schemathesis.Config.from_dict(
        {
            "generation": {
                "max-examples": EXAMPLES,
                "deterministic": SCALE == 1,
                "database": "none",
                "with-security-parameters": False,
            },
        }
    )
    return schemathesis.openapi.from_url(gw.base_url + "/openapi.json", config=config)


schema = schemathesis.pytest.from_fixture("api_schema")


# Anthropic's error shape has no code: the Messages API's one cross-field refusal (a
# tool_choice naming a tool that is not in tools) is told by the field its message names.
SEMANTIC_MESSAGE_PREFIXES = ("tool_choice.name: ",)


def positive_data_acceptance_but_semantic(ctx: CheckContext, response: Any, case: Any) -> Any:
    """``positive_data_acceptance``, except a 400 with one of :data:`SEMANTIC_REFUSALS`."""
    if response.status_code == 400:
        try:
            error = json.loads(response.content)["error"]
            code, message = error.get("code"), error["message"]
        except (ValueError, KeyError, TypeError, AttributeError):
            code, message = None, ""
        if code in SEMANTIC_REFUSALS or message.startswith(SEMANTIC_MESSAGE_PREFIXES):
            return None
    return positive_data_acceptance(ctx, response, case)


CHECKS = [
    not_a_server_error,
    status_code_conformance,
    content_type_conformance,
    response_schema_conformance,
    negative_data_rejection,
    positive_data_acceptance_but_semantic,
]


def credentials(gw: GatewayServer, case: Any) -> tuple[dict[str, str], dict[str, Any]]:
    """Headers (and a raw body, for the signed webhook) for one generated case."""
    if case.path == "/v1/billing/webhook":
        sent = case.as_transport_kwargs(base_url=gw.base_url)
        if "json" in sent:
            body = json.dumps(sent["json"]).encode()
        elif isinstance(case.body, NotSet):
            body = b""
        else:
            body = sent.get("data") or b""
        signature = signature_header(SECRET, body, int(time.time()))
        return {"Tokenwire-Signature": signature}, {"data": body}
    key = gw.admin_key if case.path.startswith("/v1/admin/") else gw.api_key
    return {"Authorization": f"Bearer {key}"}, {}


@schema.parametrize()
def test_every_operation_agrees_with_the_document(case: Any, gw: GatewayServer) -> None:
    """Generated requests (valid and invalid by the schema) get no 5xx and the answer the document promises."""
    headers, extra = credentials(gw, case)
    case.call_and_validate(headers=headers, checks=CHECKS, timeout=10, **extra)


def test_sequences_of_key_operations_agree_with_the_document(
    api_schema: Any, gw: GatewayServer
) -> None:
    """Stateful: a key is created, then got, updated, topped up, rotated and revoked through
    the document's links, in generated sequences; every answer passes the same checks. Only
    keys the sequence created are touched (the list, which would lead to the test's own keys,
    is left out)."""
    key_operations = api_schema.include(
        operation_id=[
            "adminCreateKey",
            "adminGetKey",
            "adminUpdateKey",
            "adminTopupKey",
            "adminRotateKey",
            "adminRevokeKey",
        ]
    )

    class KeyLifecycle(key_operations.as_state_machine()):  # type: ignore[misc]
        def get_call_kwargs(self, case: Any) -> dict[str, Any]:
            headers, extra = credentials(gw, case)
            return {"headers": headers, "timeout": 10, **extra}

        def validate_response(self, response: Any, case: Any, **kwargs: Any) -> None:
            case.validate_response(response, checks=CHECKS)

    KeyLifecycle.run(
        settings=settings(
            max_examples=10 * SCALE,
            stateful_step_count=8,
            derandomize=SCALE == 1,
            database=None,
            deadline=None,
            suppress_health_check=list(HealthCheck),
        )
    )


def test_gateway_still_serves_after_the_fuzzing(gw: GatewayServer) -> None:
    """After the generated traffic the API key still completes a chat request."""
    response = requests.post(
        gw.base_url + "/v1/chat/completions",
        headers={"Authorization": f"Bearer {gw.api_key}"},
        json={"model": "sim", "messages": [{"role": "user", "content": "hi"}]},
        timeout=10,
    )
    assert response.status_code == 200, response.text


def component_validator(gw: GatewayServer, name: str) -> jsonschema.Draft202012Validator:
    document = requests.get(gw.base_url + "/openapi.json", timeout=10).json()
    root = {"$ref": f"#/components/schemas/{name}", "components": document["components"]}
    return jsonschema.Draft202012Validator(root)


@pytest.mark.parametrize(
    "body",
    [
        {"name": "x", "models": []},
        {"name": "x", "models": ["no-such-model"]},
        {"name": "x", "expires_at": ""},
        {"name": "x", "expires_at": "yesterday"},
        {"name": "x", "expires_at": "2025-02-30"},
        {"name": "   "},
        {"name": "x", "credits_usd": "ten"},
        {"name": "x", "credits_usd": "1.0000001"},
        {"name": "x", "credits_usd": "2000000000"},
    ],
)
def test_the_document_refuses_what_the_gateway_refuses(
    gw: GatewayServer, body: dict[str, Any]
) -> None:
    """Key bodies the gateway answers 400 for its syntax are invalid by /openapi.json too."""
    assert not component_validator(gw, "CreateKeyRequest").is_valid(body)
    response = requests.post(
        gw.base_url + "/v1/admin/keys",
        json=body,
        headers={"Authorization": f"Bearer {gw.admin_key}"},
        timeout=10,
    )
    assert response.status_code == 400, response.text


def test_whole_numbers_written_as_floats_are_integers(gw: GatewayServer) -> None:
    """rpm 5.0 is the integer 5 for JSON Schema, and for the gateway too."""
    body = {"name": "floaty", "rpm": 5.0, "credits_usd": 2.0, "models": ["sim"]}
    assert component_validator(gw, "CreateKeyRequest").is_valid(body)
    response = requests.post(
        gw.base_url + "/v1/admin/keys",
        json=body,
        headers={"Authorization": f"Bearer {gw.admin_key}"},
        timeout=10,
    )
    assert response.status_code == 201, response.text
    assert response.json()["rpm"] == 5


@pytest.mark.parametrize(
    ("method", "path", "body", "code"),
    [
        ("POST", "/v1/admin/keys", {"name": "x", "expires_at": 1}, "expiry_not_in_future"),
        ("POST", "/v1/admin/keys", {"name": "x", "credits_usd": 5e-324}, "amount_too_precise"),
        ("GET", "/v1/admin/usage?start=2025-02-01&end=2025-01-01", None, "empty_time_range"),
    ],
)
def test_semantic_refusals_carry_their_codes(
    gw: GatewayServer, method: str, path: str, body: Any, code: str
) -> None:
    """The refusals a JSON Schema cannot express are 400s with their own error codes."""
    response = requests.request(
        method,
        gw.base_url + path,
        json=body,
        headers={"Authorization": f"Bearer {gw.admin_key}"},
        timeout=10,
    )
    assert response.status_code == 400
    assert response.json()["error"]["code"] == code


@pytest.mark.parametrize(
    ("component", "body"),
    [
        ("PaymentSucceeded", {"key_id": "k", "payment_id": "p"}),
        ("PaymentSucceeded", {"key_id": "k", "payment_id": "p", "amount": "1"}),
        ("PaymentSucceeded", {"key_id": "k", "payment_id": "p", "currency": "CNY"}),
        ("PaymentSucceeded", {"key_id": "k", "payment_id": "p", "amount": "1", "currency": "GBP"}),
        ("PaymentSucceeded", {"key_id": "k", "payment_id": "p", "amount": "1", "currency": "Cny"}),
        (
            "PaymentSucceeded",
            {"key_id": "k", "payment_id": "p", "amount_usd": "1", "amount": "1", "currency": "CNY"},
        ),
        ("SignupRequest", {"email": "ann@localhost"}),
        ("CreateKeyRequest", {"name": "x", "plan": "gold"}),
    ],
)
def test_the_document_refuses_payments_sign_ups_and_plans_the_gateway_refuses(
    gw: GatewayServer, component: str, body: dict[str, Any]
) -> None:
    """A payment without exactly one of amount_usd and amount + currency, an unconfigured
    currency, a sign-up that is not an address, an unknown plan: invalid by /openapi.json
    too; and the forms it allows are valid."""
    assert not component_validator(gw, component).is_valid(body)
    valid = [
        ("PaymentSucceeded", {"key_id": "k", "payment_id": "p", "amount_usd": "1"}),
        ("PaymentSucceeded", {"key_id": "k", "payment_id": "p", "amount": 7, "currency": "cny"}),
        ("SignupRequest", {"email": "ann+x@example.com", "invite_code": "c"}),
        ("CreateKeyRequest", {"name": "x", "plan": "at-cost"}),
    ]
    for name, good in valid:
        assert component_validator(gw, name).is_valid(good), (name, good)
