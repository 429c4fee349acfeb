"""Sizes a matcher can compare without adding guards.

A dynamic size in an aten graph is a SymInt; comparing two with `==` asks the ShapeEnv to
decide, which records a guard (and can specialize a dimension the user marked dynamic).
Matchers compare sizes all the time, so they read them as `Dim`s instead:

    Dim(expr, env) == other   True when the ShapeEnv proves it from what it already knows
                              (its replacements, value ranges and the guards Dynamo
                              recorded while tracing), False otherwise; never a new guard

Arithmetic gives Dims again; a static size stays an int. Ordering compares the hints (only
used to phrase messages and pick heuristics, never to decide a match). A Dim hashes as its
hint, so equal Dims hash alike.
"""

from __future__ import annotations

from typing import Any

import sympy
import torch


class Dim:
    __slots__ = ("expr", "env")

    def __init__(self, expr: sympy.Expr, env: Any) -> None:
        self.expr = expr
        self.env = env

    # ---- building ---------------------------------------------------------------------------
    @classmethod
    def of(cls, value: int | torch.SymInt) -> "int | Dim":
        if isinstance(value, torch.SymInt):
            expr = value.node.expr
            if expr.is_number:
                return int(expr)
            return cls(expr, value.node.shape_env)
        return int(value)

    def _wrap(self, expr: sympy.Expr) -> "int | Dim":
        expr = sympy.sympify(expr)
        return int(expr) if expr.is_Integer else Dim(expr, self.env)

    @staticmethod
    def _expr(other: object) -> sympy.Expr | None:
        if isinstance(other, Dim):
            return other.expr
        if isinstance(other, (int, sympy.Expr)) and not isinstance(other, bool):
            return sympy.sympify(other)
        return None

    # ---- comparing --------------------------------------------------------------------------
    def __eq__(self, other: object) -> bool:
        rhs = self._expr(other)
        if rhs is None:
            return False
        if self.expr == rhs:
            return True
        try:
            proved = self.env._maybe_evaluate_static(sympy.Eq(self.expr, rhs))
        except Exception:  # a ShapeEnv that cannot decide decides nothing
            return False
        return bool(proved is not None and proved == sympy.true)

    def __ne__(self, other: object) -> bool:
        return not self.__eq__(other)

    def __hash__(self) -> int:
        return hash(self.hint)

    @property
    def hint(self) -> int:

        values = {s: self.env.var_to_val.get(s) for s in self.expr.free_symbols}
        if any(v is None for v in values.values()):
            return 0
        value = self.expr.xreplace(values)
        return int(value) if value.is_number else 0

    def __int__(self) -> int:
        """The size's value, when the ShapeEnv proves it is a constant (it equals its hint
        for every value of the symbols); TypeError for a size that varies."""
        if self == self.hint:
            return self.hint
        raise TypeError(f"dynamic size {self.expr} has no single value")

    __index__ = __int__

    def __lt__(self, other: object) -> bool:
        return self.hint < _hint(other)

    def __le__(self, other: object) -> bool:
        return self.hint <= _hint(other)

    def __gt__(self, other: object) -> bool:
        return self.hint > _hint(other)

    def __ge__(self, other: object) -> bool:
        return self.hint >= _hint(other)

    # ---- arithmetic -------------------------------------------------------------------------
    def _op(self, other: object, fn) -> "int | Dim":
        rhs = self._expr(other)
        if rhs is None:
            return NotImplemented
        return self._wrap(fn(self.expr, rhs))

    def __mul__(self, other):
        return self._op(other, lambda a, b: a * b)

    __rmul__ = __mul__

    def __add__(self, other):
        return self._op(other, lambda a, b: a + b)

    __radd__ = __add__

    def __sub__(self, other):
        return self._op(other, lambda a, b: a - b)

    def __rsub__(self, other):
        return self._op(other, lambda a, b: b - a)

    def __floordiv__(self, other):
        from torch.utils._sympy.functions import FloorDiv

        return self._op(other, FloorDiv)

    def __mod__(self, other):
        from torch.utils._sympy.functions import Mod

        return self._op(other, Mod)

    def __rmod__(self, other):
        from torch.utils._sympy.functions import Mod

        return self._op(other, lambda a, b: Mod(b, a))

    def __str__(self) -> str:
        return str(self.expr)

    __repr__ = __str__


def _hint(value: object) -> int:
    return value.hint if isinstance(value, Dim) else int(value)


def dims(t: torch.Tensor) -> tuple["int | Dim", ...]:
    """The sizes of a (fake) tensor as ints and Dims."""
    return tuple(Dim.of(s) for s in t.shape)
