"""python -m convcompiler.bench SUITE [options]; python -m convcompiler.bench gpu --out DIR"""

from __future__ import annotations

import argparse
import contextlib
import io
import sys

from . import compile_cache, layers, networks, traffic, transfer, window_attention

SUITES = {
    "compile-cache": compile_cache,
    "im2win-layers": layers,
    "traffic": traffic,
    "transfer-learning": transfer,
    "window-attention": window_attention,
}
SUITES.update({name: networks for name in networks.SUITES})


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="python -m convcompiler.bench")
    parser.add_argument("suite", choices=sorted(SUITES) + ["gpu"])
    parser.add_argument("--model", help="a torchvision model name")
    parser.add_argument("--input", help="input shape, comma separated")
    parser.add_argument("--options", default="{}", help="backend options as JSON")
    parser.add_argument("--json", help="also write the results to this JSON file")
    parser.add_argument("--dtype", choices=("float32", "float16", "bfloat16"))
    parser.add_argument("--batch", type=int, help="override the suite's batch size")
    parser.add_argument("--target", help="the GPU to plan for on a machine without one")
    parser.add_argument("--table", help="also write the printed table to this file")
    parser.add_argument(
        "--fusion",
        choices=("gpu", "cpu"),
        default="gpu",
        help="traffic: Inductor's kernels as it fuses for a GPU (planned without one) or this CPU",
    )
    return parser


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if argv[:1] == ["gpu"]:  # the prepared GPU check has its own options (bench/gpu.py)
        from . import gpu

        return gpu.main(argv[1:])
    parser = build_parser()
    args = parser.parse_args(argv)
    given = {a[2:].split("=")[0] for a in argv if a.startswith("--")} - {"table"}
    ignored = sorted(given - SUITES[args.suite].FLAGS)
    if ignored:
        reads = ", ".join(f"--{f}" for f in sorted(SUITES[args.suite].FLAGS))
        parser.error(
            f"{', '.join('--' + f for f in ignored)} has no effect on suite {args.suite!r} "
            f"(it reads {reads}, and --table)"
        )
    args.input_given = args.input is not None
    args.input = args.input or "1,3,64,64"
    args.model_given = args.model is not None
    args.model = args.model or "resnet18"
    args.dtype_given = args.dtype is not None
    args.dtype = args.dtype or "float32"
    if not args.table:
        return SUITES[args.suite].main(args)
    printed = io.StringIO()
    with contextlib.redirect_stdout(_Tee(sys.stdout, printed)):
        status = SUITES[args.suite].main(args)
    with open(args.table, "w") as f:
        f.write(printed.getvalue())
    return status


class _Tee(io.TextIOBase):
    def __init__(self, *streams) -> None:
        self.streams = streams

    def write(self, text: str) -> int:
        for stream in self.streams:
            stream.write(text)
        return len(text)


if __name__ == "__main__":
    sys.exit(main())
