"""The README documents every command, suite and flag the CLIs have, and names none they lack
(issue 14): adding a flag without docs, or docs without the flag, fails here."""

from __future__ import annotations

import argparse
import re
from pathlib import Path

from convcompiler.bench import __main__ as bench_cli
from convcompiler.bench import gpu
from convcompiler.inspection import cli

README = (Path(__file__).resolve().parents[1] / "README.md").read_text()


def _flags(parser: argparse.ArgumentParser) -> set[str]:
    flags = set()
    for action in parser._actions:
        if isinstance(action, argparse._SubParsersAction):
            for sub in action.choices.values():
                flags |= _flags(sub)
        flags |= {o for o in action.option_strings if o.startswith("--") and o != "--help"}
    return flags


def _subcommands(parser: argparse.ArgumentParser) -> dict[str, argparse.ArgumentParser]:
    (sub,) = [a for a in parser._actions if isinstance(a, argparse._SubParsersAction)]
    return dict(sub.choices)


def _choices(parser: argparse.ArgumentParser, dest: str) -> list[str]:
    return [c for a in parser._actions if a.dest == dest for c in (a.choices or ())]


PARSERS = (cli.build_parser(), bench_cli.build_parser(), gpu.build_parser())


def _mentioned(flag: str) -> bool:
    return re.search(rf"(?<![\w-]){re.escape(flag)}(?![\w-])", README) is not None


def test_every_flag_is_documented() -> None:
    missing = sorted(f for p in PARSERS for f in _flags(p) if not _mentioned(f))
    assert not missing, f"flags the README does not mention: {missing}"


def test_every_documented_flag_exists() -> None:
    known = set().union(*(_flags(p) for p in PARSERS))
    # flags written in the README's command lines and tables (`--x`), not other tools' flags
    documented = set(re.findall(r"(?<![\w-])(--[a-z][a-z-]+)", README))
    # pip's, aot's (checked through cli), pytest-randomly's and pytest-xdist's
    others = {"--no-deps", "--arch", "--help", "--randomly-seed", "--dist"}
    unknown = sorted(documented - known - others)
    assert not unknown, f"the README names flags no command has: {unknown}"


def test_every_command_and_action_is_documented() -> None:
    for name, sub in _subcommands(cli.build_parser()).items():
        assert f"convcompiler {name}" in README, name
        for action in _choices(sub, "action"):
            assert re.search(rf"convcompiler {name} .*\b{action}\b", README), (name, action)


def test_bench_suites_match_the_table() -> None:
    suites = set(_choices(bench_cli.build_parser(), "suite"))
    table = README[README.index("## Benchmarks") :]
    table = table[: table.index("\n\n", table.index("| suite |"))]
    rows = [line.split("|")[1] for line in table.splitlines()[2:] if line.startswith("|")]
    documented = {name for row in rows for name in re.findall(r"`([\w-]+)`", row)}
    assert suites == documented, (sorted(suites - documented), sorted(documented - suites))


def test_readme_sample_report_has_a_fresh_runs_shape() -> None:
    """The sample in "Reading the report" against a fresh compile of the same model and input
    (planned, not run: the columns, names and kinds do not depend on it)."""
    import torch
    import torchvision

    import convcompiler

    section = README[README.index("resnet18 on a 2x3x64x64 input") :]
    block = section[section.index("```\n") + 4 :]
    sample = block[: block.index("```")].splitlines()
    torch.manual_seed(0)
    model = torchvision.models.resnet18().eval()
    with torch.no_grad():
        torch.compile(model, backend="im2win", options={"cpu": "plan"})(torch.randn(2, 3, 64, 64))
    fresh = str(convcompiler.last_report()).splitlines()
    assert sample[0].split(";")[0].startswith("convcompiler compile ")
    assert sample[1].split() == fresh[1].split()  # the column names
    for doc, run in zip(sample[2:], fresh[2:]):
        if doc == "...":
            break
        # name, kind, stage and the epilogue; the kernel file name differs only in "..."
        assert doc.split()[:3] == run.split()[:3], (doc, run)
        assert doc.split(" im2win")[0].split()[-1] == run.split(" im2win")[0].split()[-1]


def test_ci_runs_exactly_the_readme_test_command() -> None:
    """The README keeps two set-up commands; .ci/run runs the second one as written."""
    commands = re.findall(r"```bash\n(pip install [^\n]*)\n```", README)
    assert len(commands) == 2 and "pytest" in commands[1], commands
    ci = (Path(__file__).resolve().parents[1] / ".ci" / "run").read_text().splitlines()
    assert commands[1] in ci, (commands[1], ci)
