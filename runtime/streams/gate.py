"""The one gate in front of every stream plan: a plan with a race (or a misrouted layer) is refused."""
from __future__ import annotations

from typing import Sequence

from kvproof.spec.streams import Plan, Violation, check_plan


class PlanRaceError(RuntimeError):
    """A stream plan has a race or misroutes data; it is refused before it runs."""


def checked_plan(plan: Plan, races: Sequence[Violation] | None = None, allow_races: bool = False,
                 misrouted: Sequence[str] = ()) -> Plan:
    """`plan` when check_plan finds no race (pass `races` when already checked) and nothing is misrouted,
    or when `allow_races` (to demonstrate a bug); else PlanRaceError naming the first problem."""
    races = check_plan(plan) if races is None else races
    if (races or misrouted) and not allow_races:
        what = races[0].message if races else misrouted[0]
        raise PlanRaceError(f"refusing plan {plan.name}: {what} ({len(races)} race(s), {len(misrouted)} misrouted); "
                            f"set allow_races only to demonstrate the bug")
    return plan
