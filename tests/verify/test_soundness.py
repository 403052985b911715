"""The verifier refuses what cannot be built or argued: ownership, inheritance, vacuity, parametric claims, types."""
import enum

import pytest

from kvproof.spec import (Bool, Channel, EnumT, Instance, Nat, OwnershipError, Protocol, ProtocolViolation,
                          SpecError, Var, action, invariant)
from kvproof.spec.kv_slot import DState, KVSlot, PState
from kvproof.verify import asymmetry, bmc, check, explore, induction, sanity, slot_locality
from kvproof.verify.guards import necessity
from kvproof.verify.verdict import Status


class S(enum.IntEnum):
    FREE = 0
    BUSY = 1


# ---------------------------------------------------------------- 1. ownership

def test_peeking_protocol_is_rejected_when_the_class_is_defined():
    """Decode's reclaim reading prefill's private state instead of waiting for 'safe'."""
    with pytest.raises(OwnershipError) as e:
        class Peek(KVSlot):
            @action("decode", s="slot")
            def reclaim(P, m, s):
                m.require(m.d_state[s] == DState.ABORTING, "aborting")
                m.require(m.all(m.any([m.p_epoch[s, w] != m.epoch[s], m.p_state[s, w] == PState.ABORTED])
                                for w in m.range("writer")), "ranks_quiet")
                m.d_state[s] = DState.FREE
    msg = str(e.value)
    assert "Peek.reclaim" in msg and "'p_epoch'" in msg and "owned by 'prefill'" in msg
    assert "actor 'decode'" in msg and "send a message" in msg


def _proto(body, owner="decode", channels=None, actors=("decode", "prefill")):
    ns = {"name": "t", "variants": ("v",), "actors": actors, "indices": {}, "bounds": {},
          "vars": {"a": Var(Nat(), (), "decode"), "b": Var(Nat(), (), "prefill"),
                   "h": Var(Bool(), (), "ghost"), "n": Var(Nat(), (), "net")},
          "channels": channels or {}, "go": action(owner)(body)}
    return type("T", (Protocol,), ns)


@pytest.mark.parametrize("body, words", [
    (lambda P, m: m.require(m.h[()], "g"), ["guard 'g' reads 'h'", "ghost"]),
    (lambda P, m: m.require(m.n[()] > 0, "g"), ["guard 'g' reads 'n'", "m.env"]),
    (lambda P, m: m.a.__setitem__((), m.b[()]), ["value written to 'a' reads 'b'", "'prefill'"]),
    (lambda P, m: m.b.__setitem__((), 1), ["writes 'b', owned by 'prefill'"]),
])
def test_each_ownership_rule_names_action_variable_and_owner(body, words):
    with pytest.raises(OwnershipError) as e:
        _proto(body)
    for w in words:
        assert w in str(e.value)


def test_env_facts_may_read_net_state_and_ghosts_take_anything():
    def body(P, m):
        m.env(m.n[()] > 0, "delivered")
        m.h[()] = m.b[()] > 0          # history: anything may flow into a ghost
        m.a[()] = m.a[()] + 1
    assert "go" in _proto(body).actions


def test_sending_on_another_actors_channel_is_rejected():
    chans = {"c": Channel("prefill", "decode", ())}
    with pytest.raises(OwnershipError, match="sends on channel 'c', whose source is 'prefill'"):
        _proto(lambda P, m: m.send("c", (), 1), channels=chans)


def test_net_actions_read_anything_but_write_only_net_and_ghosts():
    def land(P, m):
        m.env(m.a[()] > m.b[()], "x")
        m.n[()] = m.n[()] + m.a[()]
    assert "go" in _proto(land, owner="net").actions
    with pytest.raises(OwnershipError, match="the network writes only"):
        _proto(lambda P, m: m.a.__setitem__((), 0), owner="net")


def test_the_shipped_protocols_pass_ownership():
    from kvproof.spec.ownership import check_ownership
    from kvproof.spec.specdec_monitor import AcceptMonitor
    assert check_ownership(KVSlot) == [] and check_ownership(AcceptMonitor) == []


# ---------------------------------------------------------------- 2. inheritance

def test_empty_subclass_inherits_everything_and_gets_its_own_name():
    class Same(KVSlot):
        pass
    assert set(Same.actions) == set(KVSlot.actions) and set(Same.invariants) == set(KVSlot.invariants)
    assert Same.name == "Same" and Same.goals.keys() == KVSlot.goals.keys()
    assert induction(Same, "fixed", {"slots": 1, "writers": 1}, list(Same.invariants)).proven


def test_subclass_overrides_an_action_by_name():
    class NoTimeout(KVSlot):
        @action("decode", s="slot")
        def timeout(P, m, s):
            """Never times out."""
            m.require(False, "never")
    assert NoTimeout.actions["timeout"].doc == "Never times out." and len(NoTimeout.actions) == len(KVSlot.actions)
    inst = Instance(NoTimeout, "fixed", {"slots": 1, "writers": 1})
    inst.fire("alloc", s=0)
    assert inst.why_disabled("timeout", s=0) == "never" and KVSlot.actions["timeout"].doc != "Never times out."


def test_overriding_an_inherited_action_without_its_decorator_is_an_error():
    with pytest.raises(SpecError, match="overrides the inherited action or property 'reclaim'"):
        class Broken(KVSlot):
            def reclaim(P, m, s):
                pass


# ---------------------------------------------------------------- 3. vacuity and sanity

class Empty(Protocol):
    name = "empty"
    variants = ("v",)
    actors = ("decode",)
    vars = {"x": Var(Bool(), (), "decode")}

    @invariant
    def holds(P, m):
        return m.not_(m.x[()])


class Vacuous(Protocol):
    name = "vacuous"
    variants = ("v",)
    actors = ("decode",)
    bounds = {"cap": 2}
    vars = {"st": Var(EnumT(S), (), "decode"), "n": Var(Nat("cap"), (), "decode")}

    @action("decode")
    def tick(P, m):
        m.require(m.st[()] == S.FREE, "free")
        m.n[()] = m.n[()] + 1

    @action("decode")
    def never(P, m):
        m.require(m.n[()] > 5, "beyond_the_cap")
        m.st[()] = S.BUSY

    @invariant
    def busy_means_counted(P, m):
        return m.implies(m.st[()] == S.BUSY, m.n[()] > 0)

    @invariant
    def small(P, m):
        return m.implies(m.st[()] == S.FREE, m.n[()] >= 0)


def test_empty_protocol_is_never_proven():
    r = induction(Empty, "v", {}, ["holds"])
    assert not r.proven and "no actions" in r.failed
    s = sanity(Empty, "v")
    assert s.empty == "the protocol has no actions"
    v = check(Empty, "holds", "v").run()
    assert v.status != Status.PROVEN


def test_dead_actions_and_vacuous_properties_are_reported():
    s = sanity(Vacuous, "v")
    assert s.dead_actions == ["never"] and s.empty is None
    assert list(s.vacuous) == ["busy_means_counted"]
    assert any(ln.startswith("DEAD") and "never" in ln for ln in s.lines())


def test_prove_withdraws_a_vacuous_proof_and_prints_the_findings(tmp_path):
    from tests.verify.test_cli import kvproof
    mod = tmp_path / "vac.py"
    mod.write_text("from tests.verify.test_soundness import Vacuous\nfrom kvproof.verify import check\n"
                   "CHECKS = [check(Vacuous, 'busy_means_counted', 'v'), check(Vacuous, 'small', 'v')]\n")
    r = kvproof("prove", str(mod), "--json")
    import json
    doc = json.loads(r.stdout)
    got = {v["property"]: v for v in doc["verdicts"]}
    assert got["busy_means_counted"]["status"] == "unknown" and "withdrawn" in got["busy_means_counted"]["detail"]
    assert got["small"]["status"] == "proven"
    assert doc["sanity"][0]["dead_actions"] == ["never"] and r.returncode == 1
    assert "DEAD" in kvproof("prove", str(mod)).stdout


# ---------------------------------------------------------------- 4. parametric claims

class GenSlots(Protocol):
    """A slot-indexed alloc bumping one generation counter shared by every slot."""

    name = "gen_slots"
    variants = ("v",)
    actors = ("decode",)
    indices = {"slot": "slots"}
    bounds = {"slots": 1, "max_gen": 3}
    vars = {"st": Var(EnumT(S), ("slot",), "decode"), "gen": Var(Nat("max_gen"), (), "decode"),
            "mine": Var(Nat(), ("slot",), "decode")}

    @action("decode", s="slot")
    def alloc(P, m, s):
        m.require(m.st[s] == S.FREE, "free")
        m.st[s] = S.BUSY
        m.gen[()] = m.gen[()] + 1
        m.mine[s] = m.gen[()] + 1

    @action("decode", s="slot")
    def free(P, m, s):
        m.require(m.st[s] == S.BUSY, "busy")
        m.st[s] = S.FREE

    @invariant(s="slot")
    def mine_current(P, m, s):
        return m.implies(m.st[s] == S.BUSY, m.mine[s] == m.gen[()])


def test_shared_write_is_not_slot_local_and_the_any_slots_claim_is_withdrawn():
    assert induction(GenSlots, "v", {"slots": 1}, ["mine_current"]).proven       # 1 slot: holds
    assert len(bmc(GenSlots, "v", {"slots": 2}, ["mine_current"], 4).steps) == 2  # 2 slots: refuted
    problems = slot_locality(GenSlots, "v", {})
    assert problems and "writes gen, which is not indexed by 'slot'" in problems[0]
    v = check(GenSlots, "mine_current", "v", any_size_of="slot").run()
    assert v.status == Status.UNKNOWN and "claim for every slot count withdrawn" in v.detail


def test_kv_slot_writer_count_is_stated_not_generalised():
    from kvproof.verify.checks_kv_slot import writer_claim
    text = writer_claim("fixed")
    assert "Writer counts proven: 2, 3 only" in text and "all_ranks_done" in text


class Asym(Protocol):
    name = "asym"
    variants = ("v",)
    actors = ("decode",)
    indices = {"slot": "slots"}
    bounds = {"slots": 2}
    vars = {"st": Var(EnumT(S), ("slot",), "decode"), "broken": Var(Bool(), ("slot",), "ghost")}

    @action("decode", s="slot")
    def alloc(P, m, s):
        m.require(m.all(m.st[t] == S.FREE for t in m.range("slot")), "all_free")
        m.st[s] = S.BUSY

    @action("decode", s="slot")
    def poke(P, m, s):
        m.require(m.st[s] == S.BUSY, "busy")
        m.broken[s] = s == 0             # slot 0 is special
        m.st[s] = S.FREE

    @invariant(s="slot")
    def never_broken(P, m, s):
        return m.not_(m.broken[s])


def test_symmetry_reduction_is_refused_for_an_asymmetric_index():
    assert asymmetry(KVSlot, "fixed", {"slots": 2, "writers": 1}, "slot") is None
    why = asymmetry(Asym, "v", {"slots": 2}, "slot")
    assert why and "poke(s=0)" in why
    ex = explore(Asym, "v", {"slots": 2}, symmetry="slot")
    assert "never_broken" in ex.violations and not ex.symmetric and "NOT used" in ex.symmetry_note


def test_explore_cli_says_it_searched_without_symmetry(tmp_path):
    from tests.verify.test_cli import kvproof
    mod = tmp_path / "asym_mod.py"
    mod.write_text("from tests.verify.test_soundness import Asym\n")
    r = kvproof("explore", "--protocol", str(mod))
    assert r.returncode == 1 and "symmetry reduction NOT used" in r.stdout and "never_broken" in r.stdout


# ---------------------------------------------------------------- 5. types agree with the runtime

def test_runtime_rejects_a_negative_nat_and_the_guards_that_prevent_it_are_needed():
    inst = Instance(KVSlot, "fixed", {"slots": 1, "writers": 1})
    with pytest.raises(ProtocolViolation, match="land.*completion|write_in_flight"):
        inst.fire("land", s=0, w=0, e=0)
    res = {r.guard: r for r in necessity(KVSlot, "fixed", {"slots": 1, "writers": 1}, depth=4,
                                         only=["write_in_flight", "completion_available"])}
    for g in ("write_in_flight", "completion_available"):
        assert res[g].needed and res[g].broken == "nat_nonnegative", g
    local = Instance(KVSlot, "fixed", {"slots": 1, "writers": 1}, actor="prefill")
    local.fire("p_on_alloc", s=0, w=0, e=1)
    local.fire("p_post", s=0, w=0)
    local.fire("p_complete", s=0, w=0, e=1)     # an actor's instance keeps no net counters


def test_nat_write_below_zero_is_a_named_violation():
    class Dec(Protocol):
        name = "dec"
        variants = ("v",)
        actors = ("decode",)
        vars = {"n": Var(Nat(), (), "decode")}

        @action("decode")
        def down(P, m):
            m.n[()] = m.n[()] - 1

        @invariant
        def anything(P, m):
            return True
    with pytest.raises(ProtocolViolation, match="nat_nonnegative.*n would become negative"):
        Instance(Dec, "v", {}).fire("down")
    assert bmc(Dec, "v", {}, ["anything"], 3).property == "nat_nonnegative"
    assert "nat_nonnegative" in explore(Dec, "v", {}).violations
