"""What passes produce and share: frozen `Region`s and an explicit `PassContext`."""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Mapping

from ..config import Config
from ..spec import ConvSpec


@dataclass(frozen=True)
class Region:
    """A matched subgraph: which nodes, what it computes, and whether we can run it.

    `fallback_reason` is None when a generated kernel can run the region; otherwise it says
    why the nodes stay ATen.
    """

    name: str  # unique within one compile, e.g. "conv_3"
    # "conv", "conv_bn", "conv_wgrad", "linear", "window_attention", "mlp_block", "batch_norm"
    kind: str
    rule: str  # the equation of the pattern that matched
    stage: str  # the graph it was found in: "forward", "inference" or "backward"
    nodes: tuple[str, ...]  # FX node names; nodes[-1] produces the region's output
    summary: str  # readable shapes and parameters, for reports
    spec: ConvSpec | Any | None  # a ConvSpec, AttentionSpec or block spec
    fallback_reason: str | None = None
    roles: tuple[tuple[str, str], ...] = ()  # (role, node name) along a conv epilogue chain
    # conv_bn: "deploy", "tune" or "train"; backward convs: "grad_input" or "grad_weight"
    mode: str | None = None
    # what the matcher tried first and why it settled for this region (a ConvNeXt block that
    # does not run whole); the report adds it to the region's "why"
    note: str | None = None


@dataclass
class PassContext:
    """Passed explicitly to every pass of one compile.

    `facts` is shared by every stage of one compile, so a pre-grad pass can leave what it
    learned (keyed by Dynamo node name) for the post-grad matchers.
    """

    config: Config
    stage: str  # "pre_grad", "forward", "inference" or "backward"
    facts: dict[str, Any] = field(default_factory=dict)
    regions: list[Region] = field(default_factory=list)
    dump_dir: Path | None = None  # the compile's debug dump directory, if any
    host: str = "inductor"  # what compiles the rest of the graph: "inductor" fuses it, "aten"
    # plan_block(spec) -> None when a block region runs as one kernel, else why it runs per
    # layer: the backend's cost model (passes never import selection)
    plan_block: Callable[[Any], str | None] | None = None
    # plan_fusion(fused, parts) -> (None when the conv spec `fused` runs as one kernel, else
    # why its layers' specs `parts` run apart; a note comparing the two): the same for a conv
    # that would compute its input from another conv's output (spec.prologue.dw)
    plan_fusion: Callable[[Any, tuple], tuple[str | None, str]] | None = None
    # the placeholders that are a module's parameters or buffers, by name, with their values
    # now (the real tensors Dynamo passed): what passes/constants.py computes from
    constants: Mapping[str, Any] = field(default_factory=dict)

    def new_region_name(self, kind: str) -> str:
        taken = self.facts.setdefault("region_names", {})
        index = taken.get(kind, 0)
        taken[kind] = index + 1
        return f"{kind}_{index}"
