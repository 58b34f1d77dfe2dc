"""Which price list charges a key: its own plan, or the configured default plan.

Plans come from the configuration (``[plans.NAME]``, resolved into
:class:`~tokenwire.config.Plan`); a key stores only a plan's name, or none. A key without a
plan follows ``accounting.default_plan``, so changing the default moves every such key.
A key whose plan is no longer configured gets 503 ``plan_unavailable`` rather than being
charged by another list.
"""

from __future__ import annotations

from collections.abc import Mapping

from tokenwire.config import Plan, Settings
from tokenwire.errors import PlanUnavailable

AT_COST = "at-cost"


class PlanBook:
    """The configured plans and the default one."""

    def __init__(self, plans: Mapping[str, Plan], default: str) -> None:
        if default not in plans:
            raise ValueError(f"the default plan {default!r} is not among the plans")
        self._plans = dict(plans)
        self.default = default

    @classmethod
    def from_settings(cls, settings: Settings) -> PlanBook:
        """The plans of ``settings`` (load_settings has checked the default exists)."""
        return cls(settings.plans, settings.accounting.default_plan)

    @classmethod
    def at_cost(cls) -> PlanBook:
        """One plan that charges every model what it costs (for tests and tools)."""
        return cls({AT_COST: Plan(AT_COST, "Every model at cost")}, AT_COST)

    @property
    def names(self) -> tuple[str, ...]:
        """The configured plan names."""
        return tuple(self._plans)

    def __contains__(self, name: object) -> bool:
        return name in self._plans

    def plan(self, name: str | None) -> Plan:
        """The plan called ``name``, or the default plan for None; ``PlanUnavailable`` (503)."""
        plan = self._plans.get(self.default if name is None else name)
        if plan is None:
            raise PlanUnavailable(
                f"This API key's plan {name!r} is not configured on this gateway; the operator "
                "must configure it or move the key to another plan."
            )
        return plan
