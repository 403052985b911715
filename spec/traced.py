"""Traced expressions: an action body run over these instead of values writes out its guards and effects as source.

One operator set for every target language: `compiled.Expr` renders Python (the compiled
search and the runtime's fast path), `verify.promela.PExpr` renders Promela (SPIN). A
subclass says how a constant is written (`literal`) and what else a node carries (`_node`).
"""
from __future__ import annotations

from typing import Any


class TracedExpr:
    """A node of a traced expression: its source text; arithmetic and comparisons build new nodes."""

    __slots__ = ("src",)

    def __init__(self, src: str) -> None:
        self.src = src

    @classmethod
    def literal(cls, v: Any) -> str:
        """Source text of a constant (a plain value met in an expression)."""
        raise NotImplementedError(f"{cls.__name__} does not say how constants are written")

    @classmethod
    def text(cls, v: Any) -> str:
        """Source text of a traced expression or a constant."""
        return v.src if isinstance(v, TracedExpr) else cls.literal(v)

    def _node(self, src: str, *operands: Any) -> "TracedExpr":
        """A new node of this kind over `operands` (self is one of them)."""
        return type(self)(src)

    def _bin(self, op: str, other: Any, rev: bool = False) -> "TracedExpr":
        a, b = (self.text(other), self.src) if rev else (self.src, self.text(other))
        return self._node(f"({a} {op} {b})", other)

    def __eq__(self, o: Any) -> "TracedExpr":  # type: ignore[override]
        return self._bin("==", o)

    def __ne__(self, o: Any) -> "TracedExpr":  # type: ignore[override]
        return self._bin("!=", o)

    def __lt__(self, o: Any) -> "TracedExpr":
        return self._bin("<", o)

    def __le__(self, o: Any) -> "TracedExpr":
        return self._bin("<=", o)

    def __gt__(self, o: Any) -> "TracedExpr":
        return self._bin(">", o)

    def __ge__(self, o: Any) -> "TracedExpr":
        return self._bin(">=", o)

    def __add__(self, o: Any) -> "TracedExpr":
        return self._bin("+", o)

    def __radd__(self, o: Any) -> "TracedExpr":
        return self._bin("+", o, rev=True)

    def __sub__(self, o: Any) -> "TracedExpr":
        return self._bin("-", o)

    def __rsub__(self, o: Any) -> "TracedExpr":
        return self._bin("-", o, rev=True)

    def __mul__(self, o: Any) -> "TracedExpr":
        return self._bin("*", o)

    def __rmul__(self, o: Any) -> "TracedExpr":
        return self._bin("*", o, rev=True)

    def __neg__(self) -> "TracedExpr":
        return self._node(f"(-{self.src})")

    __hash__ = None  # type: ignore[assignment]

    def __bool__(self) -> bool:
        raise TypeError("state values cannot be used in Python 'if'/'and'/'or'/'not' inside an "
                        "action; use m.ite / m.all / m.any / m.not_")
