"""Load a model named on the command line, and make its input.

    torchvision:resnet18        torchvision.models.get_model("resnet18", weights=None)
    timm:swin_tiny_patch4_window7_224   timm.create_model(..., pretrained=False)
    path/to/file.py:factory     factory() from that file

Weights are random: nothing is downloaded.
"""

from __future__ import annotations

import importlib.util
from pathlib import Path

import torch


def load_model(name: str) -> torch.nn.Module:
    """torchvision:NAME, timm:NAME or path.py:factory; a bare NAME is torchvision's."""
    if ":" not in name and not name.endswith(".py"):
        name = f"torchvision:{name}"
    kind, sep, rest = name.partition(":")
    if not sep or not rest:
        raise ValueError(f"model {name!r}: use torchvision:NAME, timm:NAME or path.py:factory")
    if kind == "torchvision":
        import torchvision

        if rest not in torchvision.models.list_models():
            raise ValueError(
                f"model {name!r}: torchvision has no model {rest!r} "
                "(torchvision.models.list_models() names them)"
            )
        return torchvision.models.get_model(rest, weights=None).eval()
    if kind == "timm":
        try:
            import timm
        except ImportError as err:
            raise ValueError("timm models need `pip install timm`") from err
        return timm.create_model(rest, pretrained=False).eval()
    path, factory = Path(kind), rest
    if path.suffix != ".py" or not path.exists():
        raise ValueError(
            f"model {name!r}: {path} is not a Python file "
            "(models are torchvision:NAME, timm:NAME or path.py:factory)"
        )
    spec = importlib.util.spec_from_file_location(path.stem, path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    if not hasattr(module, factory):
        raise ValueError(f"{path} has no {factory!r}")
    return getattr(module, factory)().eval()


def make_input(shape: str, dtype: str = "float32", seed: int = 0) -> torch.Tensor:
    try:
        sizes = [int(s) for s in shape.split(",")]
    except ValueError as err:
        raise ValueError(f"input shape {shape!r}: comma-separated ints, e.g. 1,3,64,64") from err
    gen = torch.Generator().manual_seed(seed)
    return torch.randn(*sizes, generator=gen).to(getattr(torch, dtype))
