"""The prepared GPU command without a GPU: its budget logic on a fake clock, its cases, the
GPU code paths of its parts run through Triton's interpreter, the report's schema and
documentation, and (slow) the whole --dry-run as CI runs it."""

from __future__ import annotations

import dataclasses
import json
import re
import subprocess
import sys
import time
from pathlib import Path

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from convcompiler.bench import (
    gpu,
    gpu_autocast,
    gpu_blocks,
    gpu_cases,
    gpu_native,
    gpu_report,
    gpu_speed,
)
from convcompiler.bench.budget import Budget, PartBudget
from convcompiler.devices import DEVICES

ROOT = Path(__file__).resolve().parents[1]
README = (ROOT / "README.md").read_text()


class FakeClock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now

    def advance(self, seconds: float) -> None:
        self.now += seconds


# ---- budget ----------------------------------------------------------------------------------
def test_part_deadline_is_its_allotment_or_the_runs_end_less_the_reserve() -> None:
    clock = FakeClock()
    budget = Budget(100, {"a": 40, "b": 40}, reserve_s=15, grace_s=5, clock=clock)
    a = budget.start("a")
    assert a.deadline == clock.now + 40
    clock.advance(50)  # a overran its allotment (killed in real life)
    budget.finish(a)
    b = budget.start("b")
    assert b.deadline == budget.deadline - 15  # 35 s left, not 40
    clock.advance(35)
    assert not b.admits() and "cut short after 0 step(s)" in b.cut
    assert budget.kill_after_s(b) == 5


def test_a_step_is_admitted_only_when_its_estimate_fits() -> None:
    clock = FakeClock()
    part = PartBudget.for_seconds("x", 10, clock)
    assert part.admits()  # the first step always gets a try
    clock.advance(4)
    assert part.step_done() == 4
    assert part.admits()  # 6 s left, slowest step 4 s
    clock.advance(4)
    part.step_done()
    assert not part.admits()  # 2 s left < 4 s
    assert "after 2 step(s)" in part.cut and "~4.0 s" in part.cut
    assert not part.admits(0.1)  # a cut part stays cut
    other = PartBudget.for_seconds("y", 10, clock)
    assert not other.admits(estimate_s=11)


def test_a_part_starting_after_the_runs_time_is_skipped() -> None:
    clock = FakeClock()
    budget = Budget(60, {"a": 20, "b": 20}, reserve_s=10, grace_s=3, clock=clock)
    clock.advance(55)
    part = budget.start("b")
    assert part.cut.startswith("skipped") and part.remaining() == 0 and not part.admits()


def test_budgets_that_cannot_fit_are_refused() -> None:
    with pytest.raises(ValueError, match="exceed the limit"):
        Budget(100, {"a": 60, "b": 40}, reserve_s=10, grace_s=3)
    with pytest.raises(ValueError, match="grace"):
        Budget(100, {"a": 10}, reserve_s=5, grace_s=5)


def test_the_commands_budgets_fit_their_limits() -> None:
    for mode in ("gpu", "dry-run"):
        for wanted in (None, 60.0, 300.0, 900.0, 1234.5):
            limit, reserve, grace, budgets = gpu.scaled_budgets(mode, wanted)
            Budget(limit, budgets, reserve_s=reserve, grace_s=grace)  # raises when they do not
            assert list(budgets) == list(gpu.ORDER) and limit == (wanted or gpu.LIMITS[mode][0])
    assert gpu.LIMITS["gpu"][0] <= 8 * 60 and gpu.LIMITS["dry-run"][0] < 5 * 60


@settings(max_examples=200, deadline=None)
@given(
    allotments=st.lists(st.floats(1, 120), min_size=1, max_size=6),
    steps=st.lists(st.floats(0, 200), min_size=1, max_size=40),
)
def test_no_part_can_push_the_run_past_its_limit(allotments, steps) -> None:
    """Parts run steps of arbitrary length (a step may hang far past its estimate); the
    command kills a part's process at kill_after_s. The run always ends, report included,
    within its limit."""
    clock = FakeClock()
    reserve, grace, report_s = 20.0, 8.0, 11.0  # writing the report: < reserve - grace
    limit = sum(allotments) + reserve + 1
    budget = Budget(limit, {str(i): a for i, a in enumerate(allotments)},
                    reserve_s=reserve, grace_s=grace, clock=clock)  # fmt: skip
    durations = iter(steps * 10)
    for name in budget.parts:
        part = budget.start(name)
        kill_at = clock.now + budget.kill_after_s(part)
        while part.admits():
            clock.now = min(clock.now + next(durations, 1.0), kill_at)
            part.step_done()
            if clock.now >= kill_at:
                break  # killed
        assert clock.now <= budget.deadline - reserve + grace
        budget.finish(part)
    clock.advance(report_s)
    assert budget.elapsed_s() <= limit


# ---- cases -------------------------------------------------------------------------------------
def test_correctness_cases_cover_every_family_dtype_and_layout() -> None:
    cases = gpu_cases.correctness_cases()
    random_cases = [c for c in cases if c.id.startswith("a")]
    assert len(random_cases) >= 150
    combos = {tuple(re.sub(r"\[\w+\]", "", c.id).split()[1:4]) for c in random_cases}
    for family in gpu_cases.FAMILIES:
        for dtype in gpu_cases.DTYPES:
            for layout in ("nchw", "nhwc"):
                assert (family, dtype, layout) in combos
    # the gradient kernels also with a ReLU's mask fused in, each op in some variants, and
    # the forward kernels that read a padding mode in both modes
    assert {c.op for c in random_cases if getattr(c, "masked", False)} == {
        "conv_transpose", "conv_wgrad"}
    modes = {(c.family, c.padding_mode) for c in random_cases if hasattr(c, "padding_mode")}
    for family in ("im2win_implicit:tap", "direct_depthwise"):
        assert {(family, "reflect"), (family, "replicate")} <= modes, modes
    # 3-D convs (im2win_implicit's depth taps) in every dtype and layout, every padding mode
    clips = [c for c in random_cases if c.id.split()[1].startswith("conv3d[")]
    assert all(len(c.size) == 3 and c.family == "im2win_implicit:tap" for c in clips)
    assert {tuple(c.id.split()[2:4]) for c in clips} == {
        (d, lay) for d in gpu_cases.DTYPES for lay in ("nchw", "nhwc")}
    assert {c.padding_mode for c in clips} == {"zeros", "reflect", "replicate", "circular"}
    # ... and their gradients' kernels: each op in three of the dtype-layout pairs, masked
    # and not, with the depth taps (and a transposed conv's output padding)
    grads = [c for c in random_cases if c.id.split()[1].startswith(("conv3dT", "conv3dWgrad"))]
    assert {(c.op, c.family) for c in grads} == {
        ("conv_transpose", "transposed_phase"), ("conv_wgrad", "wgrad_splitk")}
    assert len({tuple(c.id.split()[2:4]) for c in grads}) == 6 and len(grads) == 24
    assert {c.masked for c in grads} == {True, False} and all(len(c.size) == 3 for c in grads)
    for dtype in gpu_cases.DTYPES:
        assert ("window_attention", dtype, "bnc") in combos
        assert ("window_attention", dtype, "bhnd") in combos
    layers = [c for c in cases if c.id.startswith("conv")]
    assert len(layers) == 12 * 3
    assert len({c.id for c in cases}) == len(cases)
    assert gpu_cases.correctness_cases() == cases  # deterministic: the dry run checks these


def test_layer_cases_are_the_im2win_layers_and_resnet50s_distinct_convs() -> None:
    shapes = gpu_cases.resnet50_conv_shapes()
    assert len(shapes) == 23 and shapes[0] == dict(C=3, H=224, W=224, K=64, kernel=7,
                                                  stride=2, padding=3)  # fmt: skip
    cases = gpu_cases.layer_cases()
    forward = [c for c in cases if c.op == "conv" and not c.id.startswith("r3d.")]
    assert len(forward) == (12 + 23) * 2 * 2
    assert {c.batch for c in forward} == {1, 32} and {c.dtype for c in forward} == {
        "float16",
        "float32",
    }
    # the gradients of ResNet-50's convs, batch 32 float16: every grad_weight, and every
    # grad_input but the stem's (the image needs none)
    wgrad = [c for c in cases if c.op == "conv_wgrad" and not c.id.startswith("r3d.")]
    dgrad = [c for c in cases if c.op == "conv_transpose" and not c.id.startswith("r3d.")]
    assert len(wgrad) == 23 and len(dgrad) == 22
    assert {(c.batch, c.dtype) for c in wgrad + dgrad} == {(32, "float16")}
    for case in dgrad:  # dgrad's output is the forward's input, exactly
        fwd = next(f for f in forward if f.id.startswith(case.id.split(" dgrad")[0] + " "))
        assert gpu_cases.out_size(case) == fwd.size and case.out_channels == fwd.in_channels
    assert gpu_speed.autotune_cases() == [c for c in forward if (c.batch, c.dtype) == (32, "float16")]
    # r3d_18's distinct 3-D convs on 8 clips of 16 x 112 x 112, float16 (part b only), and
    # their gradients: every grad_weight, every grad_input but the stem's
    clips = [c for c in cases if c.id.startswith("r3d.")]
    assert [len([c for c in clips if c.op == op]) for op in ("conv", "conv_wgrad",
                                                             "conv_transpose")] == [11, 11, 10]
    assert {(c.batch, c.dtype, len(c.size)) for c in clips} == {(8, "float16", 3)}
    assert clips[0].size == (16, 112, 112) and clips[0].kernel == (3, 7, 7)
    for case in (c for c in clips if c.op == "conv_transpose"):  # back to the forward's input
        fwd = next(f for f in clips if f.op == "conv" and f.variant == case.variant[:-6])
        assert gpu_cases.out_size(case) == fwd.size and case.out_channels == fwd.in_channels


def test_family_cases_run_their_family() -> None:
    h200 = DEVICES["h200"]
    cases = gpu_cases.correctness_cases()
    for case in cases[:60]:
        spec, [schedule] = gpu_cases.plan(case, h200)
        family = case.id.split()[1]
        if family == "window_attention":
            assert schedule.name == "window_attention"
            continue
        expected = gpu_cases.conv_case_spec(case)
        assert spec == expected
        if family != "conv_bn":
            family, _, tag = family.partition("[")
            assert spec.input_mask == (tag == "masked]")
            modes = ("reflect]", "replicate]", "circular]")
            assert spec.padding_mode == (tag[:-1] if tag in modes else "zeros")
            name, _, reduction = family.partition(":")
            assert schedule.name == name and (not reduction or schedule["REDUCTION"] == reduction)
        else:
            assert spec.epilogue.bn is not None


# ---- part a's GPU code path, through Triton's interpreter ------------------------------------
def _tiny(case):
    import dataclasses

    if isinstance(case, gpu_cases.AttentionCase):
        return dataclasses.replace(case, images=1)
    need = [(k - 1) * d + 1 - 2 * p for k, d, p in zip(case.kernel, case.dilation, case.padding)]
    size = tuple(max(min(s, 12), n, p + 1) for s, n, p in zip(case.size, need, case.padding))
    return dataclasses.replace(case, batch=1, size=size)  # the window (and a reflection) fits


def test_correctness_check_runs_each_family_through_the_interpreter() -> None:
    seen = {}
    for case in gpu_cases.correctness_cases():
        family = case.id.split()[1]
        if family not in seen and "bfloat16" not in case.id:
            seen[family] = case
    h200 = DEVICES["h200"]
    for family, case in seen.items():
        row = gpu_native.check_case(_tiny(case), h200)
        assert row["status"] == "ok", (family, row)
        assert row["rel_err"] <= row["tolerance"] and row["layout_matches_eager"]


def test_block_cases_cover_every_block_family_dtype_and_layout() -> None:
    cases = gpu_blocks.block_cases()
    combos = {tuple(c.id.split()[1:4]) for c in cases}
    for family in gpu_blocks.FAMILIES:
        layouts = {"mlp_block": gpu_blocks.MLP_LAYOUTS, "se_pool": ("nchw",),
                   "swin_windows": gpu_blocks.WINDOW_LAYOUTS}.get(family, ("nchw", "nhwc"))
        for dtype in gpu_cases.DTYPES:
            assert all((family, dtype, layout) in combos for layout in layouts), family
    assert len({c.id for c in cases}) == len(cases) and gpu_blocks.block_cases() == cases
    h200 = DEVICES["h200"]
    for case in cases[::4]:  # each variant's kernel is the family's
        spec, [schedule] = gpu_native.plan(case, h200)
        family = case.id.split()[1]
        expected = {"se_pool": "direct_depthwise", "mlp_block": "mlp_block",
                    "se_scale": "gemm_1x1", "layer_scale": "gemm_1x1",
                    "dw_prologue": "dw_gemm", "swin_windows": "gemm_1x1"}  # fmt: skip
        if case.id.endswith("convnext"):  # ConvNeXt's whole block
            expected["mlp_block"] = "dw_mlp_block"
        assert schedule.name == expected.get(family, schedule.name), (case.id, schedule)
        if family in ("bn_prologue", "ln_prologue"):  # kxk convs: the tap order
            assert spec.prologue.name() and schedule.name == (
                "gemm_1x1" if spec.kernel == (1, 1) else "im2win_implicit")
        if family == "late_bn":
            assert spec.epilogue.bn_after_act


def test_block_cases_run_each_family_through_the_interpreter() -> None:
    seen = {}
    for case in gpu_blocks.block_cases():
        family = case.id.split()[1]
        if family in ("bn_prologue", "ln_prologue") and case.kernel != (1, 1):
            family += " kxk"  # im2win_implicit's prologue, besides gemm_1x1's
        if family == "swin_windows":
            family += " " + case.layout  # the input's window rows, and the output's
        if family not in seen and "float32" in case.id:
            seen[family] = case
    h200 = DEVICES["h200"]
    for family, case in seen.items():
        tiny = (dataclasses.replace(case, tokens=7) if family == "mlp_block"
                else case if family.startswith("swin_windows")  # (whole windows)
                else dataclasses.replace(_tiny(case), size=(9, 7)))  # fmt: skip
        row = gpu_native.check_case(tiny, h200)
        assert row["status"] == "ok", (family, row)
        assert row["rel_err"] <= row["tolerance"]
        if family == "se_pool":
            assert row["pool_rel_err"] <= row["tolerance"]


def test_correctness_check_reports_a_wrong_kernel_as_a_mismatch(monkeypatch) -> None:
    case = _tiny(next(c for c in gpu_cases.correctness_cases() if "gemm_1x1 float32" in c.id))
    real = gpu_native.load_kernel

    def off_by_one_percent(spec, schedule):
        launch = real(spec, schedule)
        return lambda *args: launch(*args) * 1.01

    monkeypatch.setattr(gpu_native, "load_kernel", off_by_one_percent)
    row = gpu_native.check_case(case, DEVICES["h200"])
    assert row["status"] == "mismatch" and row["rel_err"] > row["tolerance"]


def test_autocast_cases_run_through_the_backend() -> None:
    """Part a's autocast nets: compiled under float16 autocast (here the CPU's, with the
    interpreter), checked against float64 within twice eager autocast's error."""
    h200 = DEVICES["h200"]
    case = next(c for c in gpu_autocast.autocast_cases() if c.net == "standardized")
    row = gpu_native.check_case(case, h200)
    assert row["status"] == "ok" and row["kernel_launches"] == 2, row
    assert row["rel_err"] <= row["tolerance"] == max(2 * row["eager_rel_err"], 1e-3)


def test_flexattention_score_mod_adds_the_same_bias_and_mask() -> None:
    from convcompiler.bench.gpu_models import attention_inputs, flex_variant
    from convcompiler.runtime.reference import run_attention

    case = gpu_cases.AttentionCase("t", "t", 2, 4, 3, 49, 16, "float32", True, True, "bhnd")
    spec = gpu_cases.attention_case_spec(case)
    q, k, v, bias, mask = attention_inputs(case, "cpu")
    flex = flex_variant(spec, bias, mask, compiled=False)
    with pytest.warns(UserWarning, match="without torch.compile"):
        out = flex(q, k, v)
    ref = run_attention(spec, q, k, v, bias, mask)
    assert (out - ref).abs().max().item() < 1e-5


def test_a_hung_worker_is_killed_at_the_deadline(tmp_path) -> None:
    proc = gpu._spawn([sys.executable, "-c", "import time; time.sleep(60)"], tmp_path / "log",
                      gpu._worker_env())  # fmt: skip
    start = time.monotonic()
    assert gpu._wait([proc], time.monotonic() + 1.0) == [0]
    assert time.monotonic() - start < 10 and proc.returncode is not None


# ---- the report: schema and documentation ------------------------------------------------------
def test_validator_finds_what_breaks_the_schema() -> None:
    schema = json.loads(gpu_report.SCHEMA.read_text())
    assert gpu_report.validate({}, schema)  # everything missing
    bad = {"format": "other", "limit_s": -1, "parts": [{"name": "x", "rows": [{}]}]}
    errors = " ".join(gpu_report.validate(bad, schema))
    assert "'other' is not one of" in errors and "-1 < 0" in errors
    assert (
        "$.parts[0]: missing 'title'" in errors and "$.parts[0].rows[0]: missing 'case'" in errors
    )
    assert "is not one of" in errors


def _readme_gpu_section() -> str:
    start = README.index("## The GPU command")
    end = README.index("\n## ", start + 5)
    return README[start:end]


def test_readme_documents_the_report_format() -> None:
    section = _readme_gpu_section()
    assert "python -m convcompiler.bench gpu --out" in section and "--dry-run" in section
    schema = json.loads(gpu_report.SCHEMA.read_text())
    part = schema["properties"]["parts"]["items"]
    row = part["properties"]["rows"]["items"]
    for name in schema["required"] + part["required"] + row["required"]:
        assert f"`{name}`" in section, f"README's GPU section does not document {name!r}"
    for status in part["properties"]["status"]["enum"] + row["properties"]["status"]["enum"]:
        assert f"`{status}`" in section, f"README does not say what status {status!r} means"
    documented = re.findall(r"^ *#+ (.+?) {2,}", section, flags=re.M)
    assert tuple(documented) == ("convcompiler GPU report",) + gpu_report.MARKDOWN_SECTIONS
    for name, seconds in gpu.GPU_BUDGETS.items():
        assert re.search(rf"`{name}`.*\b{seconds} s", section), f"budget of {name} not in README"


# ---- the dry run, as CI runs it ------------------------------------------------------------------
# The dry run's own limit is 290 s, and it takes about half that alone on this 2-core machine.
# In the suite it shares the cores with the other tests (and the second stack's dry run), so
# the tests give it a longer limit: a slow CI machine must not turn into a cut, i.e. a failure.
SUITE_LIMIT = ["--limit", "900"]


def check_report(
    out: Path, seconds: float, names: list[str], limit: float = 900
) -> tuple[dict, dict]:
    """A finished dry run of the parts `names` (run with --limit `limit`): a valid, complete
    report without problems, its markdown with their sections. Returns (report, parts by
    name)."""
    report = json.loads((out / "gpu_report.json").read_text())
    assert gpu_report.validate(report) == []
    assert report["mode"] == "dry-run" and report["complete"], report["problems"]
    assert report["problems"] == [] and seconds < limit
    parts = {p["name"]: p for p in report["parts"]}
    assert list(parts) == names
    assert all(p["status"] == "complete" for p in parts.values())
    md = (out / "gpu_report.md").read_text()
    for title in ("Machine", "Summary", *(gpu_report.TITLES[name] for name in names)):
        assert f"\n## {title}\n" in md, title
    return report, parts


def check_dry_run(out: Path, seconds: float, limit: float) -> dict:
    """Assertions on a finished whole dry run's directory (the second-stack test's)."""
    report, parts = check_report(out, seconds, list(gpu.ORDER), limit)
    autocast = gpu_autocast.autocast_cases()
    blocks = gpu_blocks.block_cases()
    assert parts["correctness"]["done"] == (
        len(gpu_cases.correctness_cases()) + len(blocks) + len(autocast))
    assert len(gpu_cases.correctness_cases()) >= 186
    rows = {r["case"]: r for r in parts["correctness"]["rows"]}
    for case in autocast:  # planned through the backend under autocast, kernels compiled
        assert rows[case.id]["status"] == "planned" and rows[case.id]["kernels"], rows[case.id]
    assert parts["layer_speed"]["done"] == len(gpu_cases.layer_cases())
    assert parts["window_attention"]["done"] == 7 and parts["end_to_end"]["done"] == 3
    assert parts["gpu_tests"]["done"] >= 5
    kernels = [k for p in parts.values() for r in p["rows"] for k in r.get("kernels", ())]
    assert sum(k["compiled"] for k in kernels) >= 150
    assert all(k["spill_bytes"] == 0 and not k["problems"] for k in kernels)
    md = (out / "gpu_report.md").read_text()
    for section in gpu_report.MARKDOWN_SECTIONS:
        assert f"\n## {section}\n" in md
    return report


@pytest.mark.slow
def test_dry_run_of_two_parts_on_this_stack(tmp_path) -> None:
    """The command itself on torch 2.14 (parts chosen with --parts; a report of those parts
    only). The whole dry run, every part, is the second stack's test (test_gpu_stack.py):
    that is the GPU machine's stack, where the command runs; once is enough for a 2-core CI."""
    start = time.monotonic()
    done = subprocess.run(
        [sys.executable, "-m", "convcompiler.bench", "gpu", "--dry-run", "--out", str(tmp_path),
         "--parts", "window_attention,gpu_tests"] + SUITE_LIMIT,
        cwd=ROOT, capture_output=True, text=True, timeout=600,
    )  # fmt: skip
    seconds = time.monotonic() - start
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    _, parts = check_report(tmp_path, seconds, ["window_attention", "gpu_tests"])
    assert parts["window_attention"]["done"] == 7 and parts["gpu_tests"]["done"] >= 5
    kernels = [k for r in parts["window_attention"]["rows"] for k in r.get("kernels", ())]
    assert kernels and all(k["compiled"] and k["spill_bytes"] == 0 for k in kernels), kernels


def test_a_dry_run_case_that_raises_is_an_error_row_and_the_worker_goes_on(monkeypatch) -> None:
    """A kernel that Triton cannot compile for sm_90 is reported as that case's error (a
    problem of the report), not a dead worker whose other cases go missing."""
    from convcompiler.bench import gpu_native, gpu_worker

    def broken(case, *args, **kwargs):
        raise AssertionError("initial value for `smc` is of type constexpr[1]")

    monkeypatch.setattr(gpu_native, "dry_run_case", broken)
    case = gpu_cases.correctness_cases()[0]
    row = gpu_worker.plan_step("correctness")(case)
    assert row["case"] == case.id and row["status"] == "error" and "smc" in row["error"]
    part = {"name": "correctness", "status": "complete", "notes": [], "rows": [row]}
    assert gpu_report.problems_of(part) and case.id in gpu_report.problems_of(part)[0]
