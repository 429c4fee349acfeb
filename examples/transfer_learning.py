"""Transfer learning with frozen BatchNorm under backend="im2win" (ConvBN "Tune mode").

    python examples/transfer_learning.py

The usual fine-tuning recipe keeps BatchNorm in eval mode (running statistics frozen) and
trains the weights. The im2win backend folds each BN into its conv before autograd:

    conv(x, W * c, beta + c * (b - mean)),   c = gamma / sqrt(running_var + eps)

so the backward no longer needs the conv outputs BN would have saved, and the folded
weight is recomputed in backward rather than stored, and so is the cheap 7x7 stem (conv,
relu, max-pool), whose outputs are the largest activations. Gradients equal eager's in eval
mode.
This script prints the bytes saved for backward (eager against im2win) and a loss going down.
"""

import copy
import time

import torch
import torch.nn.functional as F
import torchvision
from torch.autograd.graph import saved_tensors_hooks


def saved_bytes(step) -> int:
    """Bytes saved for backward by one step, by unique storage, parameters included."""
    seen = {}

    def pack(t):
        seen[t.untyped_storage().data_ptr()] = t.untyped_storage().nbytes()
        return t

    with saved_tensors_hooks(pack, lambda t: t):
        step()
    return sum(seen.values())


def toy_batch(gen: torch.Generator, n: int = 8):
    """Two classes the net can learn: bright images with a vertical bar, or dark ones."""
    y = torch.randint(0, 2, (n,), generator=gen)
    x = torch.randn(n, 3, 32, 32, generator=gen) * 0.5
    x[y == 1, :, :, 12:20] += 1.5
    return x, y


def main() -> None:
    torch.manual_seed(0)
    model = torchvision.models.resnet18(num_classes=2)
    model.eval()  # frozen BN: eval-mode statistics, weights still require grad
    eager = copy.deepcopy(model)
    compiled = torch.compile(model, backend="im2win")

    gen = torch.Generator().manual_seed(0)
    x, y = toy_batch(gen)
    eager_bytes = saved_bytes(lambda: F.cross_entropy(eager(x), y).backward())
    ours_bytes = saved_bytes(lambda: F.cross_entropy(compiled(x), y).backward())
    print(
        f"bytes saved for backward: eager {eager_bytes / 2**20:.1f} MiB, "
        f"im2win {ours_bytes / 2**20:.1f} MiB ({ours_bytes / eager_bytes:.2f}x)"
    )

    import convcompiler  # only to read what the backend did

    report = convcompiler.last_report()
    modes = {r.mode for r in report}
    print(
        f"{len(report)} conv regions, modes {sorted(m for m in modes if m)}; "
        f"e.g. {report[1].name}: {report[1].spec} -> {report[1].schedule}"
    )

    optimizer = torch.optim.SGD(model.parameters(), lr=0.02, momentum=0.9)
    start = time.perf_counter()
    for step in range(8):
        x, y = toy_batch(gen)
        optimizer.zero_grad()
        loss = F.cross_entropy(compiled(x), y)
        loss.backward()
        optimizer.step()
        print(f"step {step}: loss {loss.item():.4f}")
    print(
        f"8 steps in {time.perf_counter() - start:.1f} s "
        f"({convcompiler.counters['launch.conv_bn']} generated conv kernel launches)"
    )


if __name__ == "__main__":
    main()
