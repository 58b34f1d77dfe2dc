"""Reading what clients send: whole numbers and JSON bodies, with limits (sans-I/O).

Two traps make a 500 out of bad input if each caller parses on its own:

* ``str.isdigit`` is true for ``"²"`` (which ``int`` refuses) and for Arabic-Indic digits;
  and ``int`` refuses more than 4300 digits. :func:`parse_count` takes ASCII digits only, at
  most ``max_digits`` of them.
* JSON nested about a thousand deep makes ``msgspec`` raise ``RecursionError`` (the stdlib
  ``json`` recurses too), and a value nested a few hundred deep can still overflow the stack
  later (re-encoding it for an upstream, sorting it for a digest). :func:`decode_json` and
  :func:`decode_json_value` refuse any body nested deeper than :data:`MAX_JSON_DEPTH` with a
  400 naming where it happened.

Everything here raises :class:`~tokenwire.errors.InvalidRequest` (400) with ``param`` set
where one can be named, or returns ``None`` for the caller to word its own 400.
"""

from __future__ import annotations

import re
from typing import Any, TypeVar

import msgspec

from tokenwire.errors import InvalidRequest

S = TypeVar("S")

MAX_JSON_DEPTH = 100
"""The deepest nesting of arrays and objects accepted in a JSON body or message.

Far beyond any real request (OpenAI limits a structured-output schema to a few levels), far
below the ~1000 at which the interpreter's recursion limit is reached.
"""

_UNKNOWN_FIELD = re.compile(r"unknown field `([^`]*)`")
_PATH = re.compile(r"at `\$\.?([^`]*)`")
_MISSING = re.compile(r"missing required field `([^`]*)`")


def parse_count(text: str, *, max_digits: int = 18) -> int | None:
    """``text`` as a whole number if it is 1 to ``max_digits`` ASCII digits, else ``None``.

    No sign, no spaces, no ``"²"`` or other Unicode digits; 18 digits always fit in 63 bits.
    """
    if 0 < len(text) <= max_digits and text.isascii() and text.isdigit():
        return int(text)
    return None


def param_from_message(message: str) -> str | None:
    """OpenAI's ``param`` from a msgspec error: ``at `$.messages[0].role``` becomes
    ``messages[0].role``; a missing or unknown field is named too."""
    match = _PATH.search(message)
    path = match.group(1) if match is not None else ""
    field = _UNKNOWN_FIELD.search(message) or _MISSING.search(message)
    if field is not None:
        return f"{path}.{field.group(1)}" if path else field.group(1)
    return path or None


def too_deep_path(value: object, limit: int = MAX_JSON_DEPTH) -> str | None:
    """Whether ``value`` (decoded JSON) nests deeper than ``limit``: ``None`` if not, else the
    top-level field that does (``"tools"``), or ``""`` when that is not a field of an object.

    Iterative, so it cannot overflow the stack itself; stops at the first spot too deep.
    """
    stack: list[tuple[object, int, str]] = [(value, 1, "")]
    while stack:
        item, depth, field = stack.pop()
        if isinstance(item, dict):
            children: list[tuple[str, object]] = [
                (field or (str(k) if depth == 1 else ""), v) for k, v in item.items()
            ]
        elif isinstance(item, list):
            children = [(field, v) for v in item]
        else:
            continue
        if depth > limit:
            return field
        stack.extend((child, depth + 1, child_field) for child_field, child in children)
    return None


def may_be_too_deep(body: bytes | str, limit: int = MAX_JSON_DEPTH) -> bool:
    """Cheap pre-check: nesting deeper than ``limit`` needs more than ``limit`` brackets."""
    if isinstance(body, str):
        return body.count("[") + body.count("{") > limit
    return body.count(b"[") + body.count(b"{") > limit


def _too_deep(param: str | None, what: str) -> InvalidRequest:
    return InvalidRequest(
        f"The {what} nests arrays and objects more than {MAX_JSON_DEPTH} levels deep.",
        param=param,
        code="json_too_deep",
    )


def decode_json_value(body: bytes | str, *, what: str = "JSON body") -> Any:
    """Any JSON value, nested at most :data:`MAX_JSON_DEPTH` deep, or ``InvalidRequest``."""
    if not body.strip():
        raise InvalidRequest(f"The {what} is empty; send a JSON object.", code="invalid_json")
    try:
        value = msgspec.json.decode(body)
    except msgspec.DecodeError as exc:
        raise InvalidRequest(
            f"We could not parse the {what} ({exc}).", code="invalid_json"
        ) from None
    except RecursionError:
        raise _too_deep(None, what) from None
    except UnicodeDecodeError:
        raise InvalidRequest(f"The {what} is not valid UTF-8.", code="invalid_encoding") from None
    if may_be_too_deep(body, MAX_JSON_DEPTH):
        path = too_deep_path(value)
        if path is not None:
            raise _too_deep(path or None, what)
    return value


def integral_floats_as_ints(value: Any) -> Any:
    """``value`` with every float that has no fraction (``5.0``, ``1e3``) as an int.

    JSON has one number type, and JSON Schema calls ``5.0`` an integer; msgspec's typed
    decoders refuse it for an ``int`` field. Recursion is bounded: values come from
    :func:`decode_json_value`, nested at most :data:`MAX_JSON_DEPTH` deep.
    """
    if isinstance(value, float):
        return int(value) if value.is_integer() else value
    if isinstance(value, dict):
        return {k: integral_floats_as_ints(v) for k, v in value.items()}
    if isinstance(value, list):
        return [integral_floats_as_ints(v) for v in value]
    return value


def request_object(body: Any, whole_numbers: tuple[str, ...] = ()) -> dict[str, Any]:
    """A copy of a decoded request body, which must be a JSON object (else a 400), in which the
    top-level fields ``whole_numbers`` take a float without fraction (``5.0``) as an int."""
    if not isinstance(body, dict):
        raise InvalidRequest("The request body must be a JSON object.", code="invalid_json")
    values = dict(body)
    for name in whole_numbers:
        value = values.get(name)
        if isinstance(value, float) and value.is_integer():
            values[name] = int(value)
    return values


def decode_json(body: bytes, kind: type[S], *, what: str = "JSON body") -> S:
    """Decode and validate a JSON body as ``kind``, or 400 naming the offending field.

    The body is read as plain JSON first (nesting at most :data:`MAX_JSON_DEPTH`, so a deep
    value under an ``Any`` field is refused too), whole floats become ints, then the result
    is validated as ``kind``. For the small bodies of the admin and webhook routes.
    """
    value = integral_floats_as_ints(decode_json_value(body, what=what))
    try:
        return msgspec.convert(value, kind)
    except msgspec.ValidationError as exc:
        text = str(exc)
        raise InvalidRequest(
            f"Invalid request: {text}", param=param_from_message(text), code="invalid_value"
        ) from None
