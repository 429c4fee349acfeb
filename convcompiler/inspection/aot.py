"""Static GPU report with no GPU: compile generated kernels ahead of time for sm_90/sm_80.

For one kernel source and its spec, the launcher is run on meta tensors of the spec's
shapes with every `kernel[grid](...)` call recorded instead of launched. Each recorded call
is specialised the way Triton's JIT would specialise it on a GPU (ints equal to 1 become
constants, 16-divisible ints and aligned pointers get divisibility hints), compiled with
`triton.compile` for the target, and measured:

    registers     per thread (cuobjdump REG)
    spill bytes   cuobjdump STACK + LOCAL: anything but 0 is a defect
    shared bytes  Triton's dynamic shared memory plus the static SHARED
    tensor-core   wgmma (sm_90) and mma.sync instructions in the PTX
"""

from __future__ import annotations

import contextlib
import os
import re
import subprocess
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterator

import torch
import triton
from torch._subclasses.fake_tensor import unset_fake_temporarily
from triton._C.libtriton import native_specialize_impl
from triton.backends.compiler import GPUTarget
from triton.backends.nvidia.compiler import CUDABackend
from triton.compiler import ASTSource

from ..codegen import KernelSource
from ..codegen.template import with_depthwise, with_layer_scale
from ..config import cache_root
from ..files import ENV_VAR, cache_subdir, unusable
from ..runtime.loader import exec_module
from ..runtime.reference import memory_format
from ..spec import AttentionSpec, ConvSpec
from ..spec_block import MlpSpec

ARCHS = {"sm_80": 80, "sm_86": 86, "sm_89": 89, "sm_90": 90}
SHARED_LIMIT = {80: 163 * 1024, 86: 99 * 1024, 89: 99 * 1024, 90: 227 * 1024}
_LAUNCH_OPTIONS = ("num_warps", "num_stages")


@dataclass(frozen=True)
class Launch:
    """One recorded `kernel[grid](...)` call: the kernel and its bound arguments."""

    name: str
    fn: Any  # the compiled-mode JITFunction
    args: tuple[tuple[str, Any], ...]
    options: tuple[tuple[str, int], ...]


@dataclass(frozen=True)
class KernelStats:
    source: str
    kernel: str
    arch: str
    registers: int
    spill_bytes: int
    shared_bytes: int
    wgmma: int
    mma: int
    uses_dot: bool  # tensor-core dots expected (see _expects_tensor_cores)

    @property
    def tensor_core_ops(self) -> int:
        return self.wgmma + self.mma

    def problems(self) -> list[str]:
        found = []
        if self.spill_bytes:
            found.append(f"spills {self.spill_bytes} bytes")
        if self.shared_bytes > SHARED_LIMIT[ARCHS[self.arch]]:
            found.append(f"shared memory {self.shared_bytes} B over the {self.arch} limit")
        if self.uses_dot and not self.tensor_core_ops:
            found.append("tl.dot without tensor-core instructions")
        return found

    @property
    def ok(self) -> bool:
        return not self.problems()


def attention_meta_inputs(spec: AttentionSpec) -> tuple[torch.Tensor | None, ...]:
    """(q, k, v, bias, mask, general, logit_scale, select): q, k, v as views of one qkv projection
    (of a q projection and a kv projection when the keys or v's head dim differ); an operand
    stored transposed is that view's transpose. The backward's: (q, k, v, dout, the terms,
    whether the bias gradient is wanted)."""
    dtype = getattr(torch, spec.dtype)
    b, h, n, d = spec.hint(spec.batch), spec.heads, spec.tokens, spec.head_dim
    nk, dv = spec.keys, spec.value_dim

    def empty(*shape):
        return torch.empty(shape, device="meta", dtype=dtype)

    if (nk, dv) == (n, d):
        q, k, v = empty(b, n, 3, h, d).permute(2, 0, 3, 1, 4)
    else:
        q = empty(b, n, h, d).transpose(1, 2)
        kv = empty(b, nk, h, d + dv).transpose(1, 2)
        k, v = kv[..., :d], kv[..., d:]
    q, k, v = (t.transpose(-2, -1) if name in spec.transposed else t
               for name, t in (("q", q), ("k", k), ("v", v)))  # fmt: skip
    terms = (
        empty(1, h, n, nk) if spec.bias else None,
        empty(spec.windows, n, nk) if spec.mask else None,
        empty(b, h, n, nk) if spec.general else None,
        empty(h, 1, 1) if spec.logit_scale else None,
        torch.empty(1, 1, n, nk, device="meta", dtype=torch.bool) if spec.select else None,
    )
    if spec.grad:  # the backward: the output's gradient as [B, N, H * Dv] gives it; dbias
        return (q, k, v, empty(b, n, h, dv).transpose(1, 2), *terms, spec.bias)
    return (q, k, v, *terms)


def mlp_meta_inputs(spec: MlpSpec) -> tuple[torch.Tensor | None, ...]:
    """(x, w1, b1, w2, b2, scale, residual, norm_weight, norm_bias, w3, b3) of an MLP block,
    the tokens as [M, C]; a ConvNeXt block's x is its [N, C, H, W] image (its residual, x
    itself, not passed), then (dw_weight, dw_bias)."""
    dtype = getattr(torch, spec.dtype)
    m, c, h, co = spec.hint(spec.tokens), spec.in_features, spec.hidden, spec.out_features

    def empty(*shape):
        return torch.empty(shape, device="meta", dtype=dtype)

    x = empty(m, c)
    if spec.depthwise:  # the image; the residual is x itself
        (kh, kw), (ih, iw) = spec.dw_kernel, spec.image
        x = empty(max(1, m // (ih * iw)), c, ih, iw)
    inputs = (
        x,
        empty(h, c),
        empty(h) if spec.has_bias1 else None,
        empty(co, h),
        empty(co) if spec.has_bias2 else None,
        empty(co) if spec.scale else None,
        empty(m, co) if spec.residual and not spec.depthwise else None,
        empty(c) if spec.norm == "affine" else None,
        empty(c) if spec.norm == "affine" else None,
        empty(h, c) if spec.gated else None,
        empty(h) if spec.gated and spec.has_bias1 else None,
    )
    if spec.depthwise:
        inputs += (empty(c, 1, kh, kw), empty(c) if spec.dw_bias else None)
    return inputs


def meta_inputs(spec: ConvSpec | AttentionSpec | MlpSpec) -> tuple[torch.Tensor | None, ...]:
    """Meta tensors for a launcher: (x, weight, bias, bn_weight, bn_bias, bn_mean, bn_var,
    residual) for a conv, with the spec's shapes (at the size hints), layouts and dtype; the
    gradient's bool mask last when the spec has one; a layer scale 15th."""
    if isinstance(spec, AttentionSpec):
        return attention_meta_inputs(spec)
    if isinstance(spec, MlpSpec):
        return mlp_meta_inputs(spec)
    dtype = getattr(torch, spec.dtype)
    n = spec.hint(spec.batch)
    h, w = (spec.hint(s) for s in spec.in_size)
    ho, wo = (spec.hint(s) for s in spec.out_size)
    kh, kw = spec.kernel
    k = spec.out_channels

    def empty(shape, layout="nchw", dt=dtype):
        return torch.empty(shape, device="meta", dtype=dt).to(
            memory_format=memory_format(layout, len(shape)))

    if spec.prologue.dw:  # the kernel reads the depthwise conv's input
        h, w = (spec.hint(s) for s in spec.prologue.dw.image)
    images = n
    if spec.windows:  # an image of the spec's N windows in one row
        images, h, w = 1, spec.windows.size[0], spec.windows.size[1] * n
    x = empty((images, spec.in_channels, h, w), spec.input_layout)
    d = spec.depth  # a 3-D conv: [N, C, D, H, W], [K, C/G, KD, KH, KW], [N, K, DO, HO, WO]
    if spec.op == "conv_wgrad":  # (dy, x, dy's mask?)
        dy = empty((n, k, ho, wo), spec.output_layout)
        if d:
            x = empty((n, spec.in_channels, spec.hint(d.size), h, w), spec.input_layout)
            dy = empty((n, k, spec.hint(d.out), ho, wo), spec.output_layout)
        dy, x = (dy.squeeze(2), x.squeeze(2)) if spec.ndim == 1 else (dy, x)
        return (dy, x, torch.empty_like(dy, dtype=torch.bool)) if spec.input_mask else (dy, x)
    weight = empty((k, spec.in_channels_per_group, kh, kw), spec.weight_layout)
    if spec.transposed:  # [C, K/groups, KH, KW]
        weight = empty((spec.in_channels, spec.out_channels_per_group, kh, kw), spec.weight_layout)
    residual = empty((n, k, ho, wo), spec.output_layout) if spec.epilogue.residual else None
    if spec.out_windows:  # the [B, H, W, K] image of the spec's N windows in one row
        wh, ww = spec.out_windows.size
        residual = empty((1, wh, ww * n, k))
    if spec.ndim == 1:
        x, weight = x.squeeze(2), weight.squeeze(2)
        residual = residual.squeeze(2) if residual is not None else None
    if d:
        x = empty((n, spec.in_channels, spec.hint(d.size), h, w), spec.input_layout)
        weight = empty((k, spec.in_channels_per_group, d.kernel, kh, kw), spec.weight_layout)
        if spec.transposed:  # [C, K/groups, KD, KH, KW]
            weight = empty((spec.in_channels, spec.out_channels_per_group, d.kernel, kh, kw),
                           spec.weight_layout)
        if residual is not None:
            residual = empty((n, k, spec.hint(d.out), ho, wo), spec.output_layout)
    bias = empty((k,)) if spec.has_bias else None
    bn = spec.epilogue.bn
    stats = (empty((k,), dt=torch.float32), empty((k,), dt=torch.float32)) if bn else (None, None)
    affine = (empty((k,), dt=torch.float32),) * 2 if bn == "affine" else (None, None)
    if spec.epilogue.ln == "affine":  # a LayerNorm's weight and bias, of the model's dtype
        affine = (empty((k,)), empty((k,)))
    mask = (torch.empty_like(x, dtype=torch.bool),) if spec.input_mask else ()
    if spec.input_scale:  # after the absent mask: x_scale [N, C, 1, 1]
        mask = (None, empty((n, spec.in_channels, 1, 1)[: x.dim()]))
    p = spec.prologue
    if p.bn or p.ln:  # after the absent mask and scale: the input's norm, [C] each
        c, pre_affine = spec.in_channels, (p.bn or p.ln) == "affine"
        params = [empty((c,), dt=torch.float32) if (pre_affine if i < 2 else p.bn) else None
                  for i in range(4)]  # fmt: skip
        mask = (None, None, *params)
    inputs = (x, weight, bias, *affine, *stats, residual, *mask)
    if spec.epilogue.scale:  # the layer scale: the launcher's 15th operand (gemm_1x1's)
        inputs = with_layer_scale(inputs, empty((k,)))
    dw = spec.prologue.dw
    if dw:  # the depthwise conv's weight and bias, 16th and 17th (dw_gemm's)
        c = spec.in_channels
        inputs = with_depthwise(inputs, empty((c, 1, *dw.kernel)), empty((c,)) if dw.bias else None)
    return inputs


class _Recorder:
    def __init__(self, name: str, fn: Any, launches: list[Launch]) -> None:
        self.name, self.fn, self.launches = name, fn, launches

    def __getitem__(self, grid: Any):
        def record(*args: Any, **kwargs: Any) -> None:
            options = {k: kwargs.pop(k) for k in _LAUNCH_OPTIONS if k in kwargs}
            bound = dict(zip(self.fn.arg_names, args))
            bound.update(kwargs)
            self.launches.append(
                Launch(self.name, self.fn, tuple(bound.items()), tuple(options.items()))
            )

        return record


def capture_launches(source: KernelSource, spec: ConvSpec) -> list[Launch]:
    """Run the source's launcher on meta tensors, recording each kernel call."""
    module = exec_module(source.text, Path(source.filename), interpret=False)
    launches: list[Launch] = []
    for name in source.kernels:
        setattr(module, name, _Recorder(name, getattr(module, name), launches))
    inputs = meta_inputs(spec)
    if getattr(spec, "pool_sums", False):  # the pooled sums, sized by the schedule's tiles
        from ..runtime.ops import pool_shape

        shape = pool_shape(spec, source.schedule, inputs[0])
        inputs = (*inputs, torch.empty(shape, device="meta", dtype=torch.float32))
    getattr(module, source.entry)(*inputs)
    return launches


def _specialise(launch: Launch) -> tuple[dict, dict, dict]:
    """signature, constexprs and attrs as Triton's JIT would build them on a GPU."""
    signature, constexprs, attrs = {}, {}, {}
    bound = dict(launch.args)
    for index, param in enumerate(launch.fn.params):
        value = bound[param.name]
        if param.is_constexpr:
            signature[param.name], constexprs[(index,)] = "constexpr", value
            continue
        ty, attr = native_specialize_impl(CUDABackend, value, False, True, True)
        signature[param.name] = ty
        if ty == "constexpr":
            constexprs[(index,)] = value
        elif attr:
            attrs[(index,)] = CUDABackend.parse_attr(attr)
    return signature, constexprs, attrs


def launch_key(launch: Launch, arch: str, hints: bool = True) -> str:
    """What Triton's compile of `launch` depends on: the kernel's text, its specialisation and
    the launch options (launches with equal keys compile to the same binary). `hints=False`
    leaves out the divisibility hints, keeping the constexprs and argument types."""
    signature, constexprs, attrs = _specialise(launch)
    return repr(
        (
            launch.fn.src,
            arch,
            sorted(signature.items()),
            sorted((k, repr(v)) for k, v in constexprs.items()),
            sorted((k, repr(v)) for k, v in attrs.items()) if hints else None,
            launch.options,
        )
    )


_fallback_cache: list[str] = []


def _private_temp() -> str:
    if not _fallback_cache:
        _fallback_cache.append(tempfile.mkdtemp(prefix="convcompiler-triton-"))
    return _fallback_cache[0]


@contextlib.contextmanager
def triton_cache(temporary: bool = False) -> Iterator[str]:
    """Where Triton caches what these compiles make (yields the folder): `<cache
    root>/triton` when CONVCOMPILER_CACHE_DIR is set and it can be written (unless
    TRITON_CACHE_DIR names Triton's folder explicitly: that choice wins), else Triton's
    own folder if it can be, else (or with `temporary`: it failed) a private temporary
    folder for this process. Files are created 0600 and folders 0700 (umask 077 while
    Triton writes)."""
    folder = _private_temp() if temporary else None
    explicit = bool(os.environ.get("TRITON_CACHE_DIR"))
    if folder is None and os.environ.get(ENV_VAR) and not explicit:
        try:
            folder = str(cache_subdir(cache_root() / "triton"))
        except OSError as err:
            unusable(cache_root(), err.strerror or err, "Triton's cache is kept elsewhere")
        if folder is not None and not _writable(folder):
            folder = None
    if folder is None:
        default = triton.knobs.cache.dir
        folder = default if _writable(default) else _private_temp()
    old_umask = os.umask(0o077)
    try:
        with triton.knobs.cache.scope():
            triton.knobs.cache.dir = folder
            yield folder
    finally:
        os.umask(old_umask)


def _writable(folder: str | None) -> bool:
    if not folder:
        return False
    try:
        os.makedirs(folder, mode=0o700, exist_ok=True)
    except OSError:
        return False
    return os.access(folder, os.W_OK)


def _compile(src: ASTSource, target: GPUTarget, options: dict) -> Any:
    """triton.compile, with Triton's cache as `triton_cache` says; a cache folder that
    fails while Triton writes it (a full disk) is replaced by a private temporary one."""
    with triton_cache() as folder:
        try:
            return triton.compile(src, target=target, options=options)
        except OSError as err:
            failed = (folder, err)
    unusable(
        Path(failed[0]),
        failed[1].strerror or failed[1],
        "Triton's cache moves to a private temporary folder",
    )
    with triton_cache(temporary=True):
        return triton.compile(src, target=target, options=options)


def _cuobjdump(cubin: bytes) -> dict[str, int]:
    tool = Path(triton.__file__).parent / "backends" / "nvidia" / "bin" / "cuobjdump"
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "kernel.cubin"
        path.write_bytes(cubin)
        out = subprocess.run(
            [str(tool), "--dump-resource-usage", str(path)],
            capture_output=True,
            text=True,
            check=True,
        ).stdout
    found = dict(re.findall(r"\b(REG|STACK|SHARED|LOCAL):(\d+)", out))
    return {k: int(v) for k, v in found.items()}


def compile_launch(launch: Launch, arch: str, source_name: str = "") -> KernelStats:
    """Compile one recorded launch for `arch` (e.g. "sm_90") and measure it."""
    cap = ARCHS[arch]
    signature, constexprs, attrs = _specialise(launch)
    compiled = _compile(
        ASTSource(launch.fn, signature, constexprs, attrs),
        GPUTarget("cuda", cap, 32),
        dict(launch.options),
    )
    usage = _cuobjdump(compiled.asm["cubin"])
    ptx = compiled.asm["ptx"]
    return KernelStats(
        source=source_name,
        kernel=launch.name,
        arch=arch,
        registers=usage.get("REG", 0),
        spill_bytes=usage.get("STACK", 0) + usage.get("LOCAL", 0),
        shared_bytes=compiled.metadata.shared + usage.get("SHARED", 0),
        wgmma=len(re.findall(r"\bwgmma\.mma_async", ptx)),
        mma=len(re.findall(r"\bmma\.sync", ptx)),
        uses_dot=_expects_tensor_cores(launch),
    )


def _expects_tensor_cores(launch: Launch) -> bool:
    """Whether the kernel's dots should run on tensor cores: it calls tl.dot (directly, through
    the shared `_mma`, gemm_1x1's `_channel_step` or the attention's `_key_tile`) and is not
    a float32 dot at "ieee" precision (exact fp32 dots run on the FMA units, as torch's
    matmul does without TF32)."""
    src = launch.fn.src
    if not any(call in src for call in ("tl.dot(", "_mma(", "_channel_step(", "_key_tile(")):
        return False
    bound = dict(launch.args)
    first = next((v for _, v in launch.args if isinstance(v, torch.Tensor)), None)
    exact = first is not None and first.dtype == torch.float32
    return not (exact and bound.get("PRECISION") == "ieee")


def static_report(
    source: KernelSource, spec: ConvSpec, archs: tuple[str, ...] = ("sm_90", "sm_80")
) -> list[KernelStats]:
    """Stats of every kernel the source launches for `spec`, for each target arch."""
    with unset_fake_temporarily():  # called from inside a compile: use real meta tensors
        launches = capture_launches(source, spec)
    return [compile_launch(launch, arch, source.filename) for arch in archs for launch in launches]
