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


class PlanGate:
    """`checked_plan` for a runtime that issues a few plan shapes again and again: each shape's
    verdicts are computed once (plans carry no page data); `checked` and `hits` count both paths."""

    def __init__(self) -> None:
        self._verdicts: dict[str, tuple[Plan, tuple[Violation, ...]]] = {}
        self.checked = 0
        self.hits = 0

    def races(self, plan: Plan) -> tuple[Violation, ...]:
        """The plan's races (spec.streams.check_plan), checked once per plan shape."""
        hit = self._verdicts.get(plan.name)
        # plan builders return one shared object per shape, so `is` keeps hashing off the hot path
        if hit is not None and (hit[0] is plan or hit[0] == plan):
            self.hits += 1
            return hit[1]
        self._verdicts[plan.name] = (plan, tuple(check_plan(plan)))
        self.checked += 1
        return self._verdicts[plan.name][1]

    def __call__(self, plan: Plan, allow_races: bool = False) -> Plan:
        """`plan` when it has no race (or `allow_races`), else PlanRaceError (see checked_plan)."""
        return checked_plan(plan, self.races(plan), allow_races)
