"""Hypothesis settings and strategies for fuzz tests (needs the test extra: hypothesis).

In CI every fuzz test is derandomized (the same cases on every run) with no example database,
and sized to run in seconds; ``TOKENWIRE_FUZZ_SCALE=20`` multiplies every budget for a
longer local run (random then, so each run tries new cases).
"""

from __future__ import annotations

import os
from typing import Any

from hypothesis import HealthCheck, settings
from hypothesis import strategies as st

SCALE = int(os.environ.get("TOKENWIRE_FUZZ_SCALE", "1"))


def fuzz_settings(examples: int) -> settings:
    """``examples`` cases in CI (derandomized), ``examples * SCALE`` random ones locally."""
    return settings(
        max_examples=examples * SCALE,
        derandomize=SCALE == 1,
        database=None,
        deadline=None,
        suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large],
    )


def json_values(max_leaves: int = 20) -> st.SearchStrategy[Any]:
    """Any JSON value: null, booleans, integers of any size, floats, strings, lists, objects."""
    scalars = (
        st.none()
        | st.booleans()
        | st.integers()
        | st.floats(allow_nan=False, allow_infinity=False)
        | st.text(max_size=20)
    )
    return st.recursive(
        scalars,
        lambda children: (
            st.lists(children, max_size=4)
            | st.dictionaries(st.text(max_size=10), children, max_size=4)
        ),
        max_leaves=max_leaves,
    )


def shaped_like(fields: dict[str, st.SearchStrategy[Any]]) -> st.SearchStrategy[dict[str, Any]]:
    """Objects with some of ``fields`` (plausible values, or any JSON) and maybe others."""
    values = {name: strategy | json_values(5) for name, strategy in fields.items()}
    return st.fixed_dictionaries({}, optional=values) | st.dictionaries(
        st.sampled_from(sorted(fields)) | st.text(max_size=8), json_values(8), max_size=5
    )
