"""The project's passes on Inductor's documented hooks, and the decompositions they need.

    compile_fx(gm, inputs, decompositions=anchored_decompositions(), config_patches={
        "pre_grad_custom_pass":      PreGradHook(session),     # Tune fold, facts
        "custom_partitioner_fn":     PartitionerHook(session), # recompute tags, then min-cut
        "post_grad_custom_pre_pass": PostGradHook(session),    # regions -> im2win.* ops
    })

Inductor decomposes batch norm, the activations, softmax and the vector norm before any
post-grad pass runs, so the matchers would never see them. `anchored_decompositions()` is
Inductor's own table without those ops (ANCHORS); after the regions are lowered, whatever
anchor is left is decomposed again through Inductor's table (`redecompose`), so Inductor
fuses it exactly as it would have.

Each hook's `uuid()` is the session's: Inductor's FX-graph and AOT-autograd caches key on
it, so they never serve a graph built for another package version, Config, tuning decision
or precision setting (see session.py).
"""

from __future__ import annotations

import functools
import logging
import os
import weakref
from pathlib import Path
from typing import Any

import torch
import torch.fx
from torch._functorch.partitioners import min_cut_rematerialization_partition
from torch._inductor.custom_graph_pass import CustomGraphPass, CustomPartitionerFn

from ..files import dir_problem

log = logging.getLogger(__name__)
aten = torch.ops.aten

# Ops the matchers read, kept whole until the post-grad pass has taken what it can.
ANCHORS = (
    aten._native_batch_norm_legit_no_training.default,
    aten.gelu.default,
    aten.silu.default,
    aten.hardswish.default,
    aten.hardsigmoid.default,
    aten.hardtanh.default,
    aten.leaky_relu.default,
    aten.clamp.default,
    aten._softmax.default,
    aten._safe_softmax.default,
    aten.linalg_vector_norm.default,
    # a conv's padding_mode (F.pad reflect / replicate): the conv kernels read the border
    aten.reflection_pad1d.default,
    aten.reflection_pad2d.default,
    aten.replication_pad1d.default,
    aten.replication_pad2d.default,
    aten.reflection_pad3d.default,
    aten.replication_pad3d.default,
)


class AnchoredDecompositions(dict):
    """Inductor's decomposition table minus ANCHORS. Pickled by reference (Inductor's caches
    hash their compile arguments, and some table entries cannot be pickled)."""

    def __reduce__(self):
        return (anchored_decompositions, ())


@functools.lru_cache(maxsize=1)
def _anchored() -> AnchoredDecompositions:
    from torch._inductor.decomposition import select_decomp_table

    table = AnchoredDecompositions(select_decomp_table())
    for op in ANCHORS:
        table.pop(op, None)
    return table


def anchored_decompositions() -> AnchoredDecompositions:
    return _anchored()


@functools.lru_cache(maxsize=1)
def aten_host_decompositions() -> dict:
    """For host="aten" (aot_autograd alone): the LayerNorm, and dtype conversions as
    prims.convert_element_type, as Inductor's post-grad graph has them (the matchers that
    take a norm into a kernel read that form)."""
    aten = torch.ops.aten
    return torch._decomp.get_decompositions([aten.native_layer_norm, aten._to_copy])


@functools.lru_cache(maxsize=1)
def _redecompose_pass():
    from torch._inductor.pattern_matcher import (
        CallFunctionVarArgs,
        PatternMatcherPass,
        register_graph_pattern,
    )

    patterns = PatternMatcherPass(pass_name="im2win_redecompose")

    def handler_for(op):
        def handler(match, *args, **kwargs):
            match.replace_by_example(functools.partial(op, **kwargs), args)

        return handler

    for op in ANCHORS:
        register_graph_pattern(CallFunctionVarArgs(op), pass_dict=patterns)(handler_for(op))

    def circular(match, x, pad):  # a circular pad no conv region took: F.pad's own ops
        match.replace_by_example(
            lambda t: torch.nn.functional.pad(t, list(pad), mode="circular"), [x])

    register_graph_pattern(
        CallFunctionVarArgs(torch.ops.im2win.pad_circular.default), pass_dict=patterns
    )(circular)
    return patterns


def redecompose(graph: torch.fx.Graph) -> int:
    """Decompose every anchor left in `graph` through Inductor's table; returns how many."""
    return _redecompose_pass().apply(graph)


_LIVE: "weakref.WeakValueDictionary[tuple[str, str], _SessionHook]" = weakref.WeakValueDictionary()


class _SessionHook:
    """Shares its session by reference: Inductor deep-copies config patches, and pickles the
    config to hash it, so a hook pickles as (its class, the session uuid) and nothing more."""

    def __init__(self, session: Any) -> None:
        self.session = session
        _LIVE[(type(self).__name__, session.uuid)] = self

    def __deepcopy__(self, memo: dict) -> "_SessionHook":
        return self

    def __reduce__(self):
        return (_live_hook, (type(self).__name__, self.session.uuid))

    def uuid(self) -> str:
        return self.session.uuid


class PreGradHook(_SessionHook, CustomGraphPass):
    """On the Dynamo graph, before autograd: the session's pre-grad passes."""

    def __call__(self, graph: torch.fx.Graph) -> None:
        self.session.pre_grad(graph.owning_module)


class PostGradHook(_SessionHook, CustomGraphPass):
    """On each forward, backward or inference graph: find regions and lower them to ops."""

    def __call__(self, graph: torch.fx.Graph) -> None:
        self.session.post_grad(graph.owning_module, redecompose=redecompose)


class PartitionerHook(_SessionHook, CustomPartitionerFn):
    """Tag what the backward recomputes (joint graph), then Inductor's min-cut partition."""

    def __call__(self, gm: torch.fx.GraphModule, joint_inputs, **kwargs):
        self.session.tag_recompute(gm, kwargs["num_fwd_outputs"])
        return min_cut_rematerialization_partition(gm, joint_inputs, **kwargs)


def _live_hook(kind: str, uuid: str) -> _SessionHook:
    """The hook a pickled reference names, while its compile is alive."""
    return _LIVE[(kind, uuid)]


def graph_caches_off(session: Any) -> bool:
    """Option cache=False, or a debug dump (which needs the passes to run), compile afresh;
    so does a compile whose Inductor cache folder is not this user's alone."""
    return not session.config.cache or session.dump_dir is not None or not inductor_dir_private()


_warned_dirs: set[str] = set()


def inductor_dir_private() -> bool:
    """Whether Inductor's cache folder (TORCHINDUCTOR_CACHE_DIR, default
    /tmp/torchinductor_$USER) is owned by this user and not writable by group or others.
    Inductor runs the compiled graphs it finds there (pickles and Python code) on trust, so
    its graph caches are used only when nobody else can write them (one warning if not)."""
    from torch._inductor.runtime.cache_dir_utils import default_cache_dir

    folder = os.environ.get("TORCHINDUCTOR_CACHE_DIR") or default_cache_dir()
    problem = dir_problem(Path(folder))
    if problem is not None and folder not in _warned_dirs:
        _warned_dirs.add(folder)
        log.warning(
            "convcompiler: Inductor's cache folder %s %s; Inductor's graph caches stay off for "
            "convcompiler's compiles. Set TORCHINDUCTOR_CACHE_DIR to a folder only you can write.",
            folder,
            problem,
        )
    return problem is None


def config_patches(session: Any, mode: str | None) -> dict[str, Any]:
    """Inductor config for one compile: the hooks, plus what `mode` means to Inductor."""
    patches: dict[str, Any] = {}
    if mode not in (None, "default"):
        patches.update(torch._inductor.list_mode_options(mode))
    patches.update(
        pre_grad_custom_pass=PreGradHook(session),
        custom_partitioner_fn=PartitionerHook(session),
        post_grad_custom_pre_pass=PostGradHook(session),
    )
    if graph_caches_off(session):
        # Inductor's FX-graph cache must not serve this compile (its AOT-autograd cache is
        # switched off around compile_fx: frontend/backend.py); its kernel caches still do.
        patches["fx_graph_cache"] = False
    if session.dump_dir is not None:
        # The debug dump also holds Inductor's output code (<dump>/torchinductor/*/
        # output_code.py) and its post-grad graph, nothing heavier.
        patches.update(
            {
                "trace.enabled": True,
                "trace.debug_dir": str(session.dump_dir),
                "trace.output_code": True,
                "trace.fx_graph": False,
                "trace.fx_graph_transformed": True,
                "trace.ir_pre_fusion": False,
                "trace.ir_post_fusion": False,
                "trace.graph_diagram": False,
                "trace.draw_orig_fx_graph": False,
            }
        )
    return patches
