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


def mostly(good: st.SearchStrategy[Any], other: st.SearchStrategy[Any]) -> st.SearchStrategy[Any]:
    """``good`` three times in four, ``other`` otherwise."""
    return st.integers(0, 3).flatmap(lambda pick: other if pick == 0 else good)


def shaped_like(fields: dict[str, st.SearchStrategy[Any]]) -> st.SearchStrategy[dict[str, Any]]:
    """Objects with some of ``fields``: mostly plausible values, sometimes any JSON; and now
    and then an object of other keys."""
    values = {name: mostly(s, json_values(5)) for name, s in fields.items()}
    other = st.dictionaries(
        st.sampled_from(sorted(fields)) | st.text(max_size=8), json_values(8), max_size=5
    )
    return mostly(st.fixed_dictionaries({}, optional=values), other)
