"""The `convcompiler` command (also `python -m convcompiler`).

    convcompiler explain MODEL --input 1,3,64,64 [--json FILE] [--explain] [--run]
    convcompiler kernels list | show [NAME]
    convcompiler cache stats | list | verify | clear | export FILE | import FILE
    convcompiler aot --arch sm_90,sm_80 MODEL --input 1,3,64,64
    convcompiler roofline MODEL --input 1,3,64,64 [--target h100] [--out roofline.png]

MODEL is torchvision:NAME, timm:NAME or path.py:factory (random weights). Without --run,
models are compiled with cpu="plan": kernels are planned and written for the target GPU and
ATen runs the CPU forward, so nothing waits on Triton's interpreter.

`--help`, `cache` (but `verify`) and `kernels` (but `show` of a kernel that has no file) never
import torch (it alone takes seconds to import); the commands that compile models, and
those that render kernels again, import it when they run.
"""

from __future__ import annotations

import argparse
import collections
import json
import sys
from pathlib import Path
from typing import TYPE_CHECKING

from ..config import Config
from ..selection.cache import open_cache

if TYPE_CHECKING:
    from .aot import KernelStats
    from .report import Report

ARCH_TARGETS = {"sm_90": "h100", "sm_80": "a100", "sm_89": "l4", "sm_86": "l4"}


class CliError(Exception):
    """A user error: printed as one line and a hint, exit code 2, no traceback."""

    def __init__(self, message: str, hint: str) -> None:
        super().__init__(message)
        self.hint = hint


def _read_json(text: str, what: str, hint: str):
    try:
        return json.loads(text)
    except json.JSONDecodeError as err:
        raise CliError(f"{what} is not valid JSON: {err}", hint) from None


def compile_model(model: str, shape: str, dtype: str, options: dict) -> list[Report]:
    """Compile and run `model` once under no_grad; the reports of every graph compiled."""
    import torch

    from .models import load_model, make_input
    from .report import next_compile_id, reports_since

    module = load_model(model).to(getattr(torch, dtype))
    x = make_input(shape, dtype)
    torch._dynamo.reset()
    first = next_compile_id()
    with torch.no_grad():
        torch.compile(module, backend="im2win", options=options)(x)
    return reports_since(first)


def _options(args: argparse.Namespace, **extra) -> dict:
    options = {}
    if args.options:
        hint = """pass a JSON object, e.g. --options '{"verify": false}'"""
        options = _read_json(args.options, "--options", hint)
        if not isinstance(options, dict):
            raise CliError("--options must be a JSON object", hint)
    # --run runs the generated kernels (Triton's interpreter on CPU); otherwise plan only
    options.setdefault("cpu", "interpret" if getattr(args, "run", False) else "plan")
    if getattr(args, "target", None):
        options["target"] = args.target
    options.update(extra)
    Config.from_options(options)  # unknown or bad options fail here, clearly
    return options


# ---- explain -------------------------------------------------------------------------------
def cmd_explain(args: argparse.Namespace) -> int:
    reports = compile_model(args.model, args.input, args.dtype, _options(args))
    for report in reports:
        print(report)
        if args.explain:
            print(report.explain())
    if args.json:
        data = [json.loads(r.to_json()) for r in reports]
        Path(args.json).write_text(json.dumps(data, indent=2))
        print(f"wrote {args.json}")
    return 0


# ---- kernels -------------------------------------------------------------------------------
def _kernel_files(config: Config) -> list[Path]:
    directory = config.kernel_path
    return (
        sorted(directory.glob("*.py"), key=lambda p: p.stat().st_mtime)
        if directory.exists()
        else []
    )


def _cached_kernels() -> dict[str, tuple[str, dict]]:
    """Kernels the tuning cache's decisions name, by file name -> (key, record). The cache
    stores no source: `kernels show` renders one again from its decision."""
    found = {}
    for key, value, _ in open_cache().records():
        if value["source"] is not None:
            name = f"{value['source']['name']}_{value['source']['sha256'][:16]}.py"
            found[name] = (key, value)
    return found


def cmd_kernels(args: argparse.Namespace) -> int:
    config = Config(kernel_dir=args.dir)
    files = _kernel_files(config)
    on_disk = {p.name for p in files}
    cached = _cached_kernels() if args.dir is None else {}
    if args.action == "list":
        for path in files:
            print(f"{path.stat().st_size:8d}  {path.name}")
        for name in sorted(set(cached) - on_disk):
            print(f"{'cache':>8}  {name}")
        print(
            f"{len(files)} kernel files in {config.kernel_path}, "
            f"{len(cached)} kernels named by tuning-cache decisions"
        )
        return 0
    names = [p.name for p in files] + sorted(set(cached) - on_disk)
    if not names:
        raise CliError(
            f"no kernels in {config.kernel_path} or the tuning cache",
            "compile a model first, e.g. `convcompiler explain torchvision:resnet18 --input "
            "1,3,64,64`",
        )
    if args.name is None:
        chosen = [files[-1].name] if files else names[-1:]  # the newest file
    else:
        chosen = [n for n in names if n == args.name] or [n for n in names if args.name in n]
    if len(chosen) != 1:
        shown = ", ".join(chosen[:3]) + (", ..." if len(chosen) > 3 else "")
        raise CliError(
            f"{args.name!r} matches {len(chosen)} kernels" + (f": {shown}" if chosen else ""),
            "give more of the name; `convcompiler kernels list` lists them",
        )
    if chosen[0] in on_disk:  # a listed file, never a stored name turned into a path
        path = config.kernel_path / chosen[0]
        print(f"# {path}")
        print(path.read_text(), end="")
        return 0
    from ..selection.cache_verify import regenerate

    key, value = cached[chosen[0]]
    source = regenerate(value)
    if source is None or source.sha256 != value["source"]["sha256"]:
        print(f"{chosen[0]}: the installed templates do not render this kernel", file=sys.stderr)
        return 1
    print(f"# {chosen[0]} (rendered again from tuning-cache decision {key[:12]})")
    print(source.text, end="")
    return 0


# ---- cache ---------------------------------------------------------------------------------
def cmd_cache(args: argparse.Namespace) -> int:
    cache = open_cache()
    if args.action == "stats":
        for key, value in cache.stats().items():
            print(f"{key:12} {value}")
    elif args.action == "list":
        _list_records(cache)
    elif args.action == "verify":
        return _verify(cache)
    elif args.action == "clear":
        cache.clear()
        kernels = Config.from_options(None).kernel_path
        files = sorted(kernels.glob("*.py")) if kernels.is_dir() else []
        for path in files:  # generated kernel sources; they are regenerated when needed
            path.unlink(missing_ok=True)
        print(f"cleared {cache.path} and {len(files)} kernel files in {kernels}")
    elif args.action == "export":
        print(f"exported {cache.export_json(Path(args.file))} records to {args.file}")
    elif args.action == "import":
        path = Path(args.file)
        hint = "a file written by `convcompiler cache export FILE`"
        if not path.is_file():
            raise CliError(f"cache import: {path}: no such file", hint)
        payload = _read_json(path.read_text(errors="replace"), f"cache import: {path}", hint)
        if not isinstance(payload, dict):
            raise CliError(f"cache import: {path} is not a convcompiler export", hint)
        try:
            imported = cache.import_json(path)
        except ValueError as err:
            raise CliError(f"cache import: {err}", hint) from None
        print(f"imported {imported} records from {args.file}")
    return 0


def _list_records(cache) -> None:
    """One line per stored decision, oldest first (torch is not imported)."""
    records = cache.records()
    print(f"{'key':12}  {'origin':6}  {'kind':16}  {'device':8}  {'cpu':9}  schedule / kernel")
    for key, value, _ in records:
        parts = value["key_parts"]
        schedule = value["schedule"]
        params = " ".join(f"{k}={v}" for k, v in schedule["params"])
        kernel = value["source"]["name"] if value["source"] else "ATen"
        print(
            f"{key[:12]:12}  {value['origin']:6}  {parts['kind']:16}  {parts['device']:8}  "
            f"{str(parts['config'].get('cpu')):9}  {schedule['name']}({params}) {kernel}"
        )
    print(f"{len(records)} decisions in {cache.path}")


def _verify(cache) -> int:
    """The file's integrity and every decision regenerated; 1 on any problem."""
    from ..selection.cache_verify import MALFORMED, MISMATCH, verify

    integrity, findings = verify(cache)
    for finding in findings:
        if finding.status != "ok":
            print(f"{finding.table:8} {finding.key:20} {finding.status}: {finding.detail}")
    counts = collections.Counter((f.table, f.status) for f in findings)
    for table in ("records", "reports"):
        shown = [f"{n} {status}" for (t, status), n in sorted(counts.items()) if t == table]
        print(f"{table}: {', '.join(shown) or 'none'}")
    print(f"integrity: {'; '.join(integrity)}")
    bad = any(f.status in (MALFORMED, MISMATCH) for f in findings) or integrity != ["ok"]
    return 1 if bad else 0


# ---- aot -----------------------------------------------------------------------------------
def static_table(
    model: str, shape: str, dtype: str, archs: list[str], options: dict
) -> list[KernelStats]:
    """Plan the model for each architecture's device and compile every kernel for it."""
    from .aot import static_report

    stats = []
    for arch in archs:
        target = options.get("target") or ARCH_TARGETS[arch]
        reports = compile_model(model, shape, dtype, {**options, "cpu": "plan", "target": target})
        seen = set()
        for report in reports:
            for source, spec in report.generated:
                if source.sha256 not in seen:
                    seen.add(source.sha256)
                    stats.extend(static_report(source, spec, (arch,)))
    return stats


def print_static(stats: list[KernelStats]) -> int:
    """One row per compiled kernel; returns 1 if any kernel spills or overflows shared memory."""
    print(
        f"{'arch':6} {'kernel':24} {'REG':>4} {'spill B':>7} {'smem B':>7} "
        f"{'wgmma':>5} {'mma':>4}  status  file"
    )
    bad = 0
    for st in stats:
        problems = st.problems()
        bad += bool(problems)
        status = "ok" if not problems else "FAIL: " + "; ".join(problems)
        print(
            f"{st.arch:6} {st.kernel:24} {st.registers:4d} {st.spill_bytes:7d} "
            f"{st.shared_bytes:7d} {st.wgmma:5d} {st.mma:4d}  {status}  {st.source}"
        )
    print(f"{len(stats)} kernels, {bad} with problems")
    return 1 if bad else 0


def cmd_aot(args: argparse.Namespace) -> int:
    from .aot import ARCHS

    archs = [a.strip() for a in args.arch.split(",") if a.strip()]
    unknown = [a for a in archs if a not in ARCHS]
    if unknown:
        raise CliError(f"unknown arch {', '.join(unknown)}", f"known: {', '.join(sorted(ARCHS))}")
    stats = static_table(args.model, args.input, args.dtype, archs, _options(args))
    if args.json:
        Path(args.json).write_text(json.dumps([st.__dict__ for st in stats], indent=2))
    return print_static(stats)


# ---- roofline ------------------------------------------------------------------------------
def cmd_roofline(args: argparse.Namespace) -> int:
    from ..devices import lookup
    from .report import Report
    from .roofline import plot_roofline

    options = _options(args)
    device = lookup(options.get("target") or "h100")
    reports = compile_model(args.model, args.input, args.dtype, options)
    merged = Report(compile_id=reports[-1].compile_id, config=reports[-1].config)
    for report in reports:
        merged.regions.extend(report.regions)
    math = {"float32": "tf32", "float16": "fp16", "bfloat16": "bf16"}[args.dtype]
    print(f"wrote {plot_roofline(merged, device, math, Path(args.out))}")
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="convcompiler", description=__doc__.split("\n")[0])
    sub = parser.add_subparsers(dest="command", required=True)

    def model_args(p: argparse.ArgumentParser) -> None:
        p.add_argument("model", help="torchvision:NAME, timm:NAME or path.py:factory")
        p.add_argument("--input", required=True, help="input shape, e.g. 1,3,64,64")
        p.add_argument("--dtype", default="float32", choices=("float32", "float16", "bfloat16"))
        p.add_argument("--options", help="backend options as JSON")
        p.add_argument("--target", help="the GPU to plan for (h100, h200, a100, l4, rtx4090)")

    p = sub.add_parser("explain", help="compile a model and print its region table")
    model_args(p)
    p.add_argument(
        "--run", action="store_true", help="run the kernels (Triton's interpreter on CPU)"
    )
    p.add_argument("--explain", action="store_true", help="also print every region's candidates")
    p.add_argument("--json", help="write the table as JSON to this file")
    p.set_defaults(func=cmd_explain)

    p = sub.add_parser("kernels", help="list or print generated kernels")
    p.add_argument("action", choices=("list", "show"))
    p.add_argument("name", nargs="?", help="a kernel file name, or part of one (show)")
    p.add_argument("--dir", help="the kernel directory (default: the cache's)")
    p.set_defaults(func=cmd_kernels)

    p = sub.add_parser("cache", help="manage the tuning cache")
    p.add_argument("action", choices=("stats", "list", "verify", "clear", "export", "import"))
    p.add_argument("file", nargs="?", help="the JSON file (export, import)")
    p.set_defaults(func=cmd_cache)

    p = sub.add_parser(
        "aot", help="compile every kernel for GPUs you do not have; report resources"
    )
    p.add_argument("--arch", required=True, help="comma-separated: sm_90,sm_80,sm_89,sm_86")
    model_args(p)
    p.add_argument("--json", help="also write the table as JSON")
    p.set_defaults(func=cmd_aot)

    p = sub.add_parser("roofline", help="plot the regions on the target's roofline (PNG)")
    model_args(p)
    p.add_argument("--out", default="roofline.png")
    p.set_defaults(func=cmd_roofline)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    if args.command == "cache" and args.action in ("export", "import") and not args.file:
        _error(f"cache {args.action} needs a FILE", f"convcompiler cache {args.action} FILE")
        return 2
    try:
        return args.func(args)
    except CliError as err:
        _error(str(err), err.hint)
    except (ValueError, OSError) as err:  # bad model names, shapes, options; unreadable files
        message = str(err).splitlines()[0] if str(err) else type(err).__name__
        _error(message, f"see `convcompiler {args.command} --help`")
    return 2


def _error(message: str, hint: str) -> None:
    print(f"convcompiler: error: {message}", file=sys.stderr)
    print(f"  hint: {hint}", file=sys.stderr)


if __name__ == "__main__":
    sys.exit(main())
