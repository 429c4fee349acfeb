"""Block specs: several layers that one generated kernel runs, their intermediates on chip.

    MlpSpec   the transformer MLP on channels-last tokens,

                  y = [r +] [gamma *] (act(x @ W1^T [+ b1]) @ W2^T [+ b2])

              x [M, C] (any leading token dims, flattened), W1 [H, C], W2 [CO, H], gamma
              [CO] (ConvNeXt's layer scale), r [M, CO] (the residual). The hidden
              act(x @ W1^T + b1), [M, H], is never written to memory.

A spec is frozen and hashable like the conv and attention specs (spec.py), with the same
key(), geometry(), describe() and JSON form.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass, fields

from .spec import Activation, Size, SizeHints, _fmt


@dataclass(frozen=True)
class MlpSpec(SizeHints):
    """One transformer MLP block (see the module docstring); `tokens` is M, the rows of x."""

    tokens: Size
    in_features: int  # C
    hidden: int  # H
    out_features: int  # CO
    act: Activation
    has_bias1: bool
    has_bias2: bool
    scale: bool  # a [CO] layer-scale vector multiplies the second linear's output
    residual: bool  # an [*L, CO] tensor is added last
    dtype: str
    device: str
    precision: str  # how a float32 tl.dot runs on a GPU (torch's matmul precision)
    hints: tuple[tuple[str, int], ...] = ()

    def terms(self) -> str:
        """What follows the second linear, e.g. "scale+add"."""
        return "+".join((["scale"] if self.scale else []) + (["add"] if self.residual else []))

    def geometry(self) -> str:
        terms = self.terms().replace("+", "_")
        return (
            f"mlp_block_c{self.in_features}_h{self.hidden}_o{self.out_features}_{self.act}"
            f"_{self.dtype}" + (f"_{terms}" if terms else "")
        )

    def key(self) -> str:
        parts = [f"{f.name}={_fmt(getattr(self, f.name))}" for f in fields(self)]
        return "MlpSpec(" + ",".join(parts) + ")"

    def digest(self) -> str:
        return hashlib.sha256(self.key().encode()).hexdigest()[:16]

    def describe(self) -> str:
        """e.g. "mlp [M=60] 13 -> 37 gelu -> 13 +scale+add float32 (hidden on chip)"."""
        terms = f" +{self.terms()}" if self.terms() else ""
        return (
            f"mlp [M={self.tokens}] {self.in_features} -> {self.hidden} {self.act} -> "
            f"{self.out_features}{terms} {self.dtype} (hidden on chip)"
        )

    def flops(self) -> int:
        m = self.hint(self.tokens)
        return 2 * m * self.hidden * (self.in_features + self.out_features)


def mlp_from_json(data: dict, common: dict) -> MlpSpec:
    """The MlpSpec `spec_to_json` wrote (spec.py checks the type, fields and `common`)."""
    from .spec import ACTIVATIONS, SpecError, _activation_from_json, _bool, _int, _size_from_json

    act = _activation_from_json(data["act"])
    if act is None or act.name not in ACTIVATIONS:
        raise SpecError("an MLP block needs its activation")
    return MlpSpec(
        tokens=_size_from_json(data["tokens"]),
        in_features=_int(data["in_features"], "in_features", 1),
        hidden=_int(data["hidden"], "hidden", 1),
        out_features=_int(data["out_features"], "out_features", 1),
        act=act,
        has_bias1=_bool(data["has_bias1"], "has_bias1"),
        has_bias2=_bool(data["has_bias2"], "has_bias2"),
        scale=_bool(data["scale"], "scale"),
        residual=_bool(data["residual"], "residual"),
        **common,
    )
