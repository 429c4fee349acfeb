"""python -m convcompiler.bench SUITE [options]"""

from __future__ import annotations

import argparse
import sys

from . import compile_cache

SUITES = {"compile-cache": compile_cache}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m convcompiler.bench")
    parser.add_argument("suite", choices=sorted(SUITES))
    parser.add_argument("--model", default="resnet18", help="a torchvision model name")
    parser.add_argument("--input", default="1,3,64,64", help="input shape, comma separated")
    parser.add_argument("--options", default="{}", help="backend options as JSON")
    parser.add_argument("--json", help="also write the results to this JSON file")
    args = parser.parse_args(argv)
    return SUITES[args.suite].main(args)


if __name__ == "__main__":
    sys.exit(main())
