"""The spec layer: typed finite state, actions with named guards, invariants.

A protocol is a subclass of `Protocol` that declares its index sets, state
variables, message channels, actions and invariants. Action bodies are written
once in a restricted style (no Python `and`/`or`/`not`/`if` on state values;
use `m.all`, `m.any`, `m.not_`, `m.ite`) so the same code evaluates three ways:
concretely (the runtime), symbolically (Z3 terms, supplied by verify/), and
enumeratively (successor generation for explicit-state search).

Branching on the *variant* (a plain Python string) is allowed anywhere: it is
fixed per instance, never part of the state.
"""
from __future__ import annotations

import enum
import inspect
import itertools
import sys
import warnings
from dataclasses import dataclass, field
from typing import Any, Callable, ClassVar, Iterator

# Variants renamed since release: the old name is still accepted (deprecated). "prefix" (the pre-fix
# variant) collided with prefix caching in the same modules.
RENAMED_VARIANTS: dict[str, str] = {"prefix": "unfixed"}


def variant_name(variant: str) -> str:
    """The current name of `variant`: a renamed one maps to its new name, with a DeprecationWarning."""
    new = RENAMED_VARIANTS.get(variant)
    if new is None:
        return variant
    warnings.warn(f"variant {variant!r} is deprecated; use {new!r}", DeprecationWarning, stacklevel=3)
    return new


def variant_arg(value: str) -> str:
    """argparse `type=` for a variant: a renamed one is accepted with a deprecation message on stderr."""
    new = RENAMED_VARIANTS.get(value)
    if new is None:
        return value
    print(f"kvproof: variant {value!r} is deprecated; use {new!r}", file=sys.stderr)
    return new


class ProtocolViolation(Exception):
    """A disabled action was fired: names the action, its parameters and the failing guard."""

    def __init__(self, protocol: str, action: str, params: dict[str, Any], guard: str,
                 detail: str = "") -> None:
        self.protocol, self.action, self.params, self.guard = protocol, action, params, guard
        ps = ", ".join(f"{k}={v}" for k, v in params.items())
        msg = f"{protocol}: action {action}({ps}) is disabled: guard '{guard}' is false"
        super().__init__(msg + (f" ({detail})" if detail else ""))


class SpecError(Exception):
    """A protocol definition or instance parameter is malformed."""


class OwnershipError(SpecError):
    """An action reads or writes state its actor cannot see (raised when the class is defined)."""

    def __init__(self, protocol: str, problems: list[str]) -> None:
        self.protocol, self.problems = protocol, problems
        more = f" (+{len(problems) - 1} more: " + "; ".join(problems[1:4]) + ")" if len(problems) > 1 else ""
        super().__init__(f"ownership violation: {problems[0]}{more}")


# ---------------------------------------------------------------- value types


@dataclass(frozen=True)
class Bool:
    """A boolean variable."""

    def default(self) -> bool:
        """Initial value when none is given."""
        return False


@dataclass(frozen=True)
class Nat:
    """A natural number; `bound` names the instance parameter that caps it in explicit search."""

    bound: str | None = None

    def default(self) -> int:
        """Initial value when none is given."""
        return 0


@dataclass(frozen=True)
class EnumT:
    """A value of an IntEnum (encoded as its integer in Z3)."""

    enum: type[enum.IntEnum]

    def default(self) -> int:
        """Initial value when none is given: the first member."""
        return next(iter(self.enum))


ValueType = Bool | Nat | EnumT

# The type property every checker adds: a Nat never goes negative. The runtime rejects such a
# write (Instance.fire), so the verifier checks it like a property instead of assuming it.
NAT_PROPERTY = "nat_nonnegative"


@dataclass(frozen=True)
class Var:
    """A state variable, optionally a family over index sets, owned by one actor."""

    type: ValueType
    index: tuple[str, ...] = ()
    owner: str = "ghost"          # actor name, "net" (environment) or "ghost" (history)
    init: Any = None
    doc: str = ""

    def initial(self) -> Any:
        """The variable's initial value."""
        return self.type.default() if self.init is None else self.init


@dataclass(frozen=True)
class Channel:
    """A message channel between actors; each message carries one epoch.

    Semantics (for verification): messages are delayed arbitrarily, delivered
    any number of times (duplicates), and an older message may arrive after a
    newer one. Receivers must therefore check epochs; the verifier proves they do.
    """

    src: str
    dst: str
    index: tuple[str, ...]
    doc: str = ""


@dataclass(frozen=True)
class Param:
    """An action parameter: an index (over an index set) or a data value (an epoch)."""

    name: str
    index: str | None = None       # index set name, or None for a data parameter
    bound: str | None = None       # for data: instance parameter capping it in explicit search


@dataclass(frozen=True)
class ActionDef:
    """An action: actor, parameters, optional channel it receives from, and its body."""

    name: str
    actor: str
    params: tuple[Param, ...]
    body: Callable[..., None]
    receives: str | None = None
    doc: str = ""
    tags: frozenset[str] = frozenset()   # roles the runtime selects actions by (Protocol.tagged)


@dataclass(frozen=True)
class InvariantDef:
    """A named safety property, quantified over the index parameters of its function."""

    name: str
    params: tuple[Param, ...]
    body: Callable[..., Any]
    strengthening: bool = False    # True: an auxiliary inductive invariant, not a user property
    doc: str = ""


@dataclass(frozen=True)
class LivenessDef:
    """A named 'leads-to' goal: from any state where `pending` holds, `done` eventually holds."""

    name: str
    params: tuple[Param, ...]
    pending: Callable[..., Any]
    done: Callable[..., Any]
    doc: str = ""


def action(actor: str, receives: str | None = None, *, tags: tuple[str, ...] = (), **params: str) -> Callable:
    """Declare an action; keyword params map a parameter name to an index set or 'data:BOUND'.

    `tags` name roles the runtime selects actions by (`Protocol.tagged`), so that it never keeps
    its own list of a protocol's action names."""
    if isinstance(tags, str) or not all(isinstance(t, str) for t in tags):
        raise SpecError(f"action tags={tags!r}; expected a tuple of role names (strings)")

    def wrap(fn: Callable) -> Callable:
        fn.__kv_action__ = (actor, receives, params, frozenset(tags))
        return fn

    return wrap


def invariant(fn: Callable | None = None, *, strengthening: bool = False, **params: str) -> Callable:
    """Declare a safety property, quantified over index parameters: @invariant(s="slot")."""

    def wrap(f: Callable) -> Callable:
        f.__kv_invariant__ = (strengthening, params)
        return f

    return wrap(fn) if fn is not None else wrap


def liveness(pending: str, done: str, **params: str) -> Callable:
    """Declare a leads-to goal over two named predicate methods."""

    def wrap(fn: Callable) -> Callable:
        fn.__kv_liveness__ = (pending, done, params)
        return fn

    return wrap


def _parse_params(spec: dict[str, str]) -> tuple[Param, ...]:
    out = []
    for name, kind in spec.items():
        if kind.startswith("data"):
            bound = kind.split(":", 1)[1] if ":" in kind else None
            out.append(Param(name, None, bound))
        else:
            out.append(Param(name, kind, None))
    return tuple(out)


class Protocol:
    """Base class of a protocol: subclasses declare the class attributes below."""

    name: ClassVar[str] = ""
    variants: ClassVar[tuple[str, ...]] = ()
    indices: ClassVar[dict[str, str]] = {}      # index set -> size parameter name
    bounds: ClassVar[dict[str, int]] = {}       # default instance parameters (sizes, search caps)
    search_bounds: ClassVar[dict[str, int]] = {}  # `kvproof explore`'s defaults over `bounds`: small enough to finish
    vars: ClassVar[dict[str, Var]] = {}
    channels: ClassVar[dict[str, Channel]] = {}
    actors: ClassVar[tuple[str, ...]] = ()
    # filled by __init_subclass__
    actions: ClassVar[dict[str, ActionDef]]
    invariants: ClassVar[dict[str, InvariantDef]]
    goals: ClassVar[dict[str, LivenessDef]]

    def __init_subclass__(cls, **kw: Any) -> None:
        super().__init_subclass__(**kw)
        # Inheritance composes: start from the parents' actions, properties and goals, then let
        # this class add to them or override one by name (most-derived class wins).
        cls.actions, cls.invariants, cls.goals = {}, {}, {}
        for base in reversed(cls.__mro__[1:]):
            if issubclass(base, Protocol) and base is not Protocol:
                cls.actions.update(vars(base).get("actions", {}))
                cls.invariants.update(vars(base).get("invariants", {}))
                cls.goals.update(vars(base).get("goals", {}))
        inherited = set(cls.actions) | set(cls.invariants) | set(cls.goals)
        if "name" not in vars(cls) and any(getattr(b, "name", "") for b in cls.__bases__):
            cls.name = cls.__name__     # a derived protocol is a different protocol: own name, own checks
        for attr, fn in list(vars(cls).items()):
            if hasattr(fn, "__kv_action__"):
                actor, receives, ps, tags = fn.__kv_action__
                if actor not in cls.actors and actor != "net":
                    raise SpecError(f"{cls.__name__}.{attr}: unknown actor {actor!r}")
                if receives is not None and receives not in cls.channels:
                    raise SpecError(f"{cls.__name__}.{attr}: unknown channel {receives!r}")
                cls.actions[attr] = ActionDef(attr, actor, _parse_params(ps), fn, receives,
                                              (fn.__doc__ or "").strip(), tags)
            elif hasattr(fn, "__kv_invariant__"):
                strengthening, ps = fn.__kv_invariant__
                names = list(inspect.signature(fn).parameters)[2:]      # skip (P, m)
                if sorted(names) != sorted(ps):
                    raise SpecError(f"{cls.__name__}.{attr}: parameters {names} need index sets in "
                                    f"the decorator, e.g. @invariant({names[0] if names else 's'}=\"slot\")")
                cls.invariants[attr] = InvariantDef(attr, _parse_params({n: ps[n] for n in names}), fn,
                                                    strengthening, (fn.__doc__ or "").strip())
            elif hasattr(fn, "__kv_liveness__"):
                pending, done, ps = fn.__kv_liveness__
                cls.goals[attr] = LivenessDef(attr, _parse_params(ps), getattr(cls, pending),
                                              getattr(cls, done), (fn.__doc__ or "").strip())
            elif attr in inherited:
                raise SpecError(f"{cls.__name__}.{attr} overrides the inherited action or property "
                                f"{attr!r} without @action/@invariant/@liveness; redeclare it with its "
                                f"decorator (overriding by name keeps the protocol's shape explicit)")
        for a in cls.actions.values():       # inherited actions must still fit this class's declarations
            if a.actor not in cls.actors and a.actor != "net":
                raise SpecError(f"{cls.__name__}.{a.name}: unknown actor {a.actor!r}")
        from kvproof.spec.ownership import check_ownership
        problems = check_ownership(cls)
        if problems:
            raise OwnershipError(cls.__name__, problems)

    @classmethod
    def tagged(cls, tag: str) -> tuple[str, ...]:
        """The actions declared with role `tag`, in declaration order (a SpecError when none is)."""
        out = tuple(a for a, d in cls.actions.items() if tag in d.tags)
        if not out:
            known = sorted({t for d in cls.actions.values() for t in d.tags})
            raise SpecError(f"{cls.name}: no action is tagged {tag!r}; expected one of {known}")
        return out

    @classmethod
    def quiescent(cls, m: Any) -> Any:
        """States where having nothing left to do is fine (not a deadlock); default: none."""
        return False

    # ------------------------------------------------------------ layout

    @classmethod
    def all_vars(cls) -> dict[str, Var]:
        """Declared variables plus the three generated per channel (has / latest epoch / older)."""
        out = dict(cls.vars)
        for c, ch in cls.channels.items():
            out[f"{c}.has"] = Var(Bool(), ch.index, "net", doc=f"a '{c}' message was sent")
            out[f"{c}.lat"] = Var(Nat(), ch.index, "net", doc=f"epoch of the newest '{c}' message")
            out[f"{c}.old"] = Var(Bool(), ch.index, "net", doc=f"an older '{c}' message may still arrive")
        return out


@dataclass(frozen=True)
class Layout:
    """Where each (variable, index tuple) lives in a flat state vector, for one parameter set."""

    protocol: type[Protocol]
    sizes: dict[str, int]
    slots: dict[tuple[str, tuple[int, ...]], int] = field(default_factory=dict)
    names: list[tuple[str, tuple[int, ...]]] = field(default_factory=list)
    vars: dict[str, Var] = field(default_factory=dict)

    @staticmethod
    def build(protocol: type[Protocol], params: dict[str, int]) -> "Layout":
        """Lay out every variable of `protocol` for index-set sizes taken from `params`."""
        sizes = {}
        for ix, pname in protocol.indices.items():
            if pname not in params:
                raise SpecError(f"{protocol.name}: missing instance parameter {pname!r}")
            n = params[pname]
            if not isinstance(n, int) or n < 1:
                raise SpecError(f"{protocol.name}: parameter {pname}={n!r}; expected an int >= 1")
            sizes[ix] = n
        lay = Layout(protocol, sizes, vars=protocol.all_vars())
        for vname, var in lay.vars.items():
            for idx in itertools.product(*(range(sizes[i]) for i in var.index)):
                lay.slots[(vname, idx)] = len(lay.names)
                lay.names.append((vname, idx))
        return lay

    def __len__(self) -> int:
        return len(self.names)

    def nat_positions(self) -> list[int]:
        """Positions of Nat-typed values (the ones NAT_PROPERTY constrains)."""
        return [p for p, (v, _) in enumerate(self.names) if isinstance(self.vars[v].type, Nat)]

    def negative_nats(self, state: Any) -> list[str]:
        """Labels of Nat positions holding a negative value in a concrete state."""
        return [self.label(p) for p in self.nat_positions() if state[p] < 0]

    def initial(self) -> tuple:
        """The initial state vector."""
        allv = self.protocol.all_vars()
        return tuple(allv[v].initial() for v, _ in self.names)

    def label(self, pos: int) -> str:
        """Readable name of a state position, e.g. 'd_state[1]'."""
        v, idx = self.names[pos]
        return v + ("[" + ",".join(map(str, idx)) + "]" if idx else "")

    def range(self, index: str) -> range:
        """The values of one index set."""
        return range(self.sizes[index])

    def instances(self, params: tuple[Param, ...], data: dict[str, Iterator[int]] | None = None
                  ) -> Iterator[dict[str, int]]:
        """Every assignment of index parameters (data parameters from `data`, if given)."""
        doms = []
        for p in params:
            if p.index is not None:
                doms.append(list(self.range(p.index)))
            else:
                doms.append(list(data[p.name]) if data else [None])
        for combo in itertools.product(*doms):
            yield {p.name: v for p, v in zip(params, combo)}
