"""The devices the cost model plans for.

Peaks are vendor figures for dense math (no sparsity), in TFLOP/s, and memory bandwidth in
GB/s. `fp32` is CUDA-core FMA throughput (what a float32 `tl.dot` with
input_precision="ieee" gets); `tf32`, `fp16` and `bf16` are tensor-core rates with fp32
accumulation.

    device_for(config, tensor_device) -> Device

picks, in order: the `target` option, the GPU the tensors live on (matched by name, else
built from `torch.cuda.get_device_properties`), and on CPU the default planning target.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

DEFAULT_PLANNING_TARGET = "h100"


@dataclass(frozen=True)
class Device:
    name: str  # table key, e.g. "h100"
    full_name: str
    capability: tuple[int, int]
    sms: int
    peak_tflops: tuple[tuple[str, float], ...]  # (math kind, TFLOP/s)
    bandwidth_gbs: float
    l2_bytes: int
    smem_per_block: int  # bytes one CTA may use
    launch_us: float = 5.0  # host + device cost of one kernel launch

    def peak(self, kind: str) -> float:
        """FLOP/s for a math kind: "fp32", "tf32", "fp16" or "bf16"."""
        return dict(self.peak_tflops)[kind] * 1e12

    @property
    def bandwidth(self) -> float:
        return self.bandwidth_gbs * 1e9

    @property
    def arch(self) -> str:
        return f"sm_{self.capability[0]}{self.capability[1]}"

    def flops_per_byte(self, kind: str) -> float:
        return self.peak(kind) / self.bandwidth


def _peaks(fp32: float, tf32: float, fp16: float) -> tuple[tuple[str, float], ...]:
    return (("fp32", fp32), ("tf32", tf32), ("fp16", fp16), ("bf16", fp16))


DEVICES: dict[str, Device] = {
    d.name: d
    for d in (
        Device(
            "h100",
            "NVIDIA H100 SXM",
            (9, 0),
            132,
            _peaks(67.0, 494.7, 989.4),
            3350.0,
            50 * 2**20,
            227 * 1024,
        ),
        Device(
            "h200",
            "NVIDIA H200 SXM",
            (9, 0),
            132,
            _peaks(67.0, 494.7, 989.4),
            4800.0,
            50 * 2**20,
            227 * 1024,
        ),
        Device(
            "a100",
            "NVIDIA A100 SXM 80GB",
            (8, 0),
            108,
            _peaks(19.5, 156.0, 312.0),
            2039.0,
            40 * 2**20,
            163 * 1024,
        ),
        Device(
            "l4", "NVIDIA L4", (8, 9), 58, _peaks(30.3, 60.0, 121.0), 300.0, 48 * 2**20, 99 * 1024
        ),
        Device(
            "rtx4090",
            "NVIDIA GeForce RTX 4090",
            (8, 9),
            128,
            _peaks(82.6, 82.6, 165.2),
            1008.0,
            72 * 2**20,
            99 * 1024,
        ),
    )
}

_NAME_HINTS = (
    ("H200", "h200"),
    ("H100", "h100"),
    ("A100", "a100"),
    ("L4", "l4"),
    ("4090", "rtx4090"),
)


def lookup(name: str) -> Device:
    key = name.lower().replace(" ", "").replace("-", "")
    if key not in DEVICES:
        raise ValueError(f"unknown target {name!r}; known targets are {sorted(DEVICES)}")
    return DEVICES[key]


def from_cuda(index: int = 0) -> Device:
    """The table entry for a present GPU, or one built from its properties."""
    props = torch.cuda.get_device_properties(index)
    for hint, key in _NAME_HINTS:
        if hint in props.name:
            return DEVICES[key]
    # Not in the table: scale a same-generation entry by SM count.
    base = DEVICES["h100" if props.major >= 9 else "a100"]
    scale = props.multi_processor_count / base.sms
    peaks = tuple((k, v * scale) for k, v in base.peak_tflops)
    return Device(
        props.name.lower(),
        props.name,
        (props.major, props.minor),
        props.multi_processor_count,
        peaks,
        base.bandwidth_gbs * scale,
        base.l2_bytes,
        base.smem_per_block,
    )


def device_for(target: str | None, tensor_device: str) -> tuple[Device, str]:
    """The planning device and how it was chosen (for the report)."""
    if target is not None:
        return lookup(target), f"target={target!r}"
    if tensor_device == "cuda" and torch.cuda.is_available():
        return from_cuda(torch.cuda.current_device()), "the GPU in use"
    return DEVICES[DEFAULT_PLANNING_TARGET], (
        f"default planning target {DEFAULT_PLANNING_TARGET!r} (no GPU; set options target=...)"
    )
