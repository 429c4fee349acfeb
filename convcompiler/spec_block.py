"""Block specs: several layers that one generated kernel runs, their intermediates on chip.

    MlpSpec   the transformer MLP on channels-last tokens,

                  y = [r +] [gamma *] (act(n(x) @ W1^T [+ b1]) @ W2^T [+ b2])

              x [M, C] (any leading token dims, flattened), W1 [H, C], W2 [CO, H], gamma
              [CO] (ConvNeXt's layer scale), r [M, CO] (the residual); n is the identity or
              a LayerNorm over C (`norm`: its row statistics computed in the kernel, with or
              without its weight and bias). The hidden act(n(x) @ W1^T + b1), [M, H], and the
              normalised tokens are never written to memory. A gated MLP (`gated`: SwiGLU,
              LLaMA's MLP) multiplies the hidden by a second projection of the same tokens,
              act(n(x) @ W1^T + b1) * (n(x) @ W3^T + b3), W3 [H, C], before the second linear.

              ConvNeXt's whole block (`dw_kernel`): x is an [N, C, H, W] image (`image`:
              (H, W)) and the tokens are a depthwise conv of it, stride 1, zero padding
              `dw_padding`, [+ its bias], seen channels last; the residual, if any, is x:

                  y = [x +] [gamma *] mlp(n(permute(dwconv(x), [0, 2, 3, 1])))

              The conv's output never goes to memory either.

A spec is frozen and hashable like the conv and attention specs (spec.py), with the same
key(), geometry(), describe() and JSON form.
"""

from __future__ import annotations

from dataclasses import dataclass, replace

from .spec import (
    ACTIVATIONS,
    Activation,
    Size,
    SizeHints,
    SpecError,
    _activation_from_json,
    _bool,
    _check,
    _float,
    _int,
    _size_from_json,
)

NORMS = (None, "plain", "affine")


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
    norm: str | None = None  # a LayerNorm prologue: None, "plain" or "affine" (weight and bias)
    norm_eps: float = 1e-5
    # the output (and the residual) are the tokens' [N, *spatial, CO] permuted to
    # [N, CO, *spatial] (ConvNeXt's block, which permutes back after its second linear)
    channels_first: bool = False
    gated: bool = False  # the hidden is act(x W1^T + b1) * (x W3^T + b3) (see the docstring)
    # ConvNeXt's depthwise conv before the norm (see the docstring); () when there is none
    dw_kernel: tuple[int, ...] = ()
    dw_padding: tuple[int, ...] = ()
    dw_bias: bool = False
    image: tuple[int, ...] = ()  # (H, W) of the conv's input

    def __post_init__(self) -> None:
        if self.norm not in NORMS:
            raise SpecError(f"norm={self.norm!r} is not one of {NORMS}")
        if self.dw_kernel and not (
            len(self.dw_kernel) == len(self.dw_padding) == len(self.image) == 2
            and self.channels_first and self.in_features == self.out_features
            and not self.gated
        ):  # fmt: skip
            raise SpecError(
                "a depthwise conv needs a 2-D kernel, padding and image, C = CO, "
                "channels-first output and no gate"
            )

    @property
    def depthwise(self) -> bool:
        return bool(self.dw_kernel)

    def without_depthwise(self) -> "MlpSpec":
        """The same MLP on the conv's output tokens (the block partly fused)."""
        return replace(self, dw_kernel=(), dw_padding=(), dw_bias=False, image=())

    def terms(self) -> str:
        """What follows the second linear, e.g. "scale+add"."""
        return "+".join((["scale"] if self.scale else []) + (["add"] if self.residual else []))

    def geometry(self) -> str:
        terms = self.terms().replace("+", "_")
        return (
            ("ln_" if self.norm else "")
            + f"mlp_block_c{self.in_features}_h{self.hidden}_o{self.out_features}_{self.act}"
            f"_{self.dtype}" + (f"_{terms}" if terms else "")
            + ("_nchw" if self.channels_first else "")
            + ("_gated" if self.gated else "")
            + (self._dw_geometry() if self.dw_kernel else "")
        )

    def _dw_geometry(self) -> str:
        (kh, kw), (ph, pw), (h, w) = self.dw_kernel, self.dw_padding, self.image
        return f"_dw{kh}x{kw}p{ph}x{pw}{'b' if self.dw_bias else ''}_{h}x{w}"


    def describe(self) -> str:
        """e.g. "mlp [M=60] 13 -> 37 gelu -> 13 +scale+add float32 (hidden on chip)"."""
        terms = f" +{self.terms()}" if self.terms() else ""
        norm = "layer_norm -> " if self.norm else ""
        if self.dw_kernel:
            kh, kw = self.dw_kernel
            norm = f"dwconv {kh}x{kw} -> {norm}"
        act = f"{self.act}*up" if self.gated else str(self.act)
        return (
            f"mlp [M={self.tokens}] {norm}{self.in_features} -> {self.hidden} {act} -> "
            f"{self.out_features}{terms} {self.dtype}"
            + (" nchw" if self.channels_first else "")
            + " (hidden on chip)"
        )

    def flops(self) -> int:
        m = self.hint(self.tokens)
        dw = 0
        if self.dw_kernel:  # the depthwise conv's taps
            dw = 2 * m * self.in_features * self.dw_kernel[0] * self.dw_kernel[1]
        return dw + 2 * m * self.hidden * ((1 + self.gated) * self.in_features + self.out_features)


def _ints(value: object, name: str, low: int) -> tuple[int, ...]:
    if not isinstance(value, list) or len(value) not in (0, 2):
        raise SpecError(f"{name} is a list of 0 or 2 ints")
    return tuple(_int(v, name, low) for v in value)


def mlp_from_json(data: dict, common: dict) -> MlpSpec:
    """The MlpSpec `spec_to_json` wrote (spec.py checks the type, fields and `common`)."""
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
        norm=_check(data["norm"], NORMS, "norm"),
        norm_eps=_float(data["norm_eps"], "norm_eps"),
        channels_first=_bool(data["channels_first"], "channels_first"),
        gated=_bool(data["gated"], "gated"),
        dw_kernel=_ints(data["dw_kernel"], "dw_kernel", 1),
        dw_padding=_ints(data["dw_padding"], "dw_padding", 0),
        dw_bias=_bool(data["dw_bias"], "dw_bias"),
        image=_ints(data["image"], "image", 1),
        **common,
    )
