"""Schedule selection for conv regions: one function, a fixed order.

    1. an explicit override: option cpu="aten" on CPU tensors, then option schedule=...
    2. under torch.distributed (world size > 1): the decision of the rank that reached this
       region first (selection/agreement.py); that rank goes on with 3 to 5 and publishes
       its choice, the others use it ("peer") and neither read their cache nor tune
    3. a cached record for this exact key (see cache.record_key), from the local tuning
       cache, else from the remote one (option remote_cache: Redis, selection/remote.py;
       a hit there fills the local cache): a tuned one always; a
       cost-model one only while autotuning is off and under the same ATen calibration.
       Its schedule is rebuilt through its template's space and its kernel rendered again;
       it is used only if that rendering hashes to the recorded source hash
    4. autotuning, when enabled (option autotune=True or mode="max-autotune") and a
       benchmarker can run: a GPU, or the fake benchmarker in tests
    5. the cost model's pick

A tuned or model pick must also pass the static check (option verify): its kernel is
compiled ahead of time for the planning device and refused if it spills registers or
overflows shared memory; the next candidate is then taken.

Candidates are ATen plus every valid schedule of every template (num_stages pinned to 3
for the model, or free where 3 fits no tile; the tuner also tries 2 and 4 stages for its top-k). When the tensors are on
the CPU and option cpu="interpret", ATen is not a candidate: the interpreter exists to run
this project's kernels, and the chosen schedule's tiles are re-picked for the interpreter
(fewest programs x loop trips). The plan is always made for a GPU: the target option, the
GPU in use, or the default planning target.
"""

from __future__ import annotations

import dataclasses
import logging

from ..codegen import SPACES, TEMPLATES, kind_spaces
from ..config import Config
from ..counters import counters
from ..devices import Device
from ..schedule import ATEN, InvalidSchedule, Schedule
from ..spec import AttentionSpec
from ..spec_block import MlpSpec
from .choice import CandidateRow, Choice, SelectionContext, Spec
from .cost import Prediction, interpreter_steps, predict, rank
from .cost_attention import aten_path, backend_for
from .cost_block import block_note, dw_conv_apart
from .stored import stored_decision
from .tuning import autotune

__all__ = ["CandidateRow", "Choice", "SelectionContext", "select_block", "select_schedule"]

log = logging.getLogger(__name__)

RANGE_GRID = tuple(2**i for i in range(17))


def interpreted(spec: Spec, config: Config) -> bool:
    return spec.device == "cpu" and config.cpu == "interpret"


MODEL_STAGES = 3  # the model does not tell pipeline depths apart; the tuner does


def model_candidates(
    spec: Spec, device: Device, *, include_aten: bool, library: bool | None = None
) -> list[Schedule]:
    """ATen (optionally) and every schedule of every template valid on `device`, with the
    pipeline depth pinned. `library` (default: include_aten) keeps the templates that call a
    library's kernel rather than ours (attention_sdpa: LIBRARY)."""
    found = [ATEN] if include_aten else []
    library = include_aten if library is None else library
    for name, space in kind_spaces(spec).items():
        if getattr(TEMPLATES[name], "LIBRARY", False) and not library:
            continue
        derived = getattr(TEMPLATES[name], "derived", None)
        stages = dict(space.choices).get("num_stages", ())
        pinned = {}
        if stages:
            pinned["num_stages"] = MODEL_STAGES if MODEL_STAGES in stages else max(stages)
        fixed = derived(spec) if derived else {}
        valid = list(space.candidates(spec, device=device, **pinned, **fixed))
        if not valid and pinned:  # the pinned depth does not fit (wide attention heads)
            valid = list(space.candidates(spec, device=device, **fixed))
        found.extend(valid)
    return found


def _rows(preds: list[Prediction], measured: dict[Schedule, float] | None = None) -> tuple:
    measured = measured or {}
    return tuple(
        CandidateRow(p.schedule.describe(), p.at_hint, measured.get(p.schedule)) for p in preds
    )


def _label(schedule: Schedule, spec: Spec, device: Device) -> str:
    """The schedule's name; for an attention's "aten", also what ATen runs (SDPA or not)."""
    if schedule.name == "aten" and isinstance(spec, AttentionSpec):
        return f"aten ({aten_path(spec, device)})"
    if schedule.name == "sdpa":
        return f"sdpa (one call, SDPA's {backend_for(spec, device)} backend)"
    return schedule.name


def key_tiles_note(spec: Spec, schedule: Schedule) -> str:
    """For an attention whose constant mask hides key tiles: the fraction `schedule` visits."""
    if not isinstance(spec, AttentionSpec) or not spec.key_tiles or schedule.name == "aten":
        return ""
    visited = spec.visited(schedule["BLOCK_M"], schedule["BLOCK_N"])
    return f" (a constant mask: {visited:.1%} of the key tiles visited)"


def _why(winner: Prediction, ranked: list[Prediction], spec: Spec, device: Device) -> str:
    text = f"{_label(winner.schedule, spec, device)}: {winner.summary()}"
    text += key_tiles_note(spec, winner.schedule)
    other = next((p for p in ranked if p.schedule.name != winner.schedule.name), None)
    if other is not None:
        ratio = other.at_hint / winner.at_hint if winner.at_hint else float("inf")
        text += (f"; best other schedule {_label(other.schedule, spec, device)} is "
                 f"{ratio:.2f}x slower")  # fmt: skip
    shown = {winner.schedule.name, other.schedule.name if other else None}
    for pred in ranked if isinstance(spec, AttentionSpec) else ():  # ATen's and SDPA's, named
        if pred.schedule.name in ("aten", "sdpa") and pred.schedule.name not in shown:
            shown.add(pred.schedule.name)
            ratio = pred.at_hint / winner.at_hint if winner.at_hint else float("inf")
            text += f"; {_label(pred.schedule, spec, device)} is {ratio:.2f}x slower"
    return text


def valid_range(
    spec: Spec, winner: Schedule, top: list[Schedule], ctx: SelectionContext
) -> str | None:
    """For dynamic sizes: the range of each symbol (others at their hints, powers of two
    plus the hint) over which `winner` stays the model's pick among `top`."""
    if not spec.is_dynamic:
        return None
    ranges = []
    for name, hint in spec.hints:
        values = sorted(set(RANGE_GRID) | {hint})
        wins = []
        for v in values:
            trial = dataclasses.replace(
                spec, hints=tuple((n, v if n == name else h) for n, h in spec.hints)
            )
            try:
                best = rank(trial, top, ctx.device, ctx.calibration)[0].schedule
            except (ZeroDivisionError, ValueError):
                best = None
            wins.append(best == winner)
        i = values.index(hint)
        lo, hi = i, i
        while lo > 0 and wins[lo - 1]:
            lo -= 1
        while hi + 1 < len(values) and wins[hi + 1]:
            hi += 1
        ranges.append(f"{values[lo]} <= {name} <= {values[hi]}")
    return ", ".join(ranges)


def select_schedule(spec: Spec, ctx: SelectionContext) -> Choice:
    """Pick the schedule for one conv region (the order is in the module docstring)."""
    choice = _override(spec, ctx)  # 1
    if choice is not None:
        return _for_cpu(spec, ctx, choice)
    if ctx.agreement is not None:  # 2
        key, _ = ctx.key(spec)
        return ctx.agreement.agree(key, spec, ctx, lambda: _for_cpu(spec, ctx, _search(spec, ctx)))
    return _for_cpu(spec, ctx, _search(spec, ctx))  # 3 to 5


select_conv_schedule = select_schedule  # the name the conv-only callers know


def select_block(spec: MlpSpec, ctx: SelectionContext) -> Choice:
    """select_schedule for a block region, whose "aten" candidate is its layers run one by
    one: the choice's `why` (one kernel) or `fallback_reason` (per layer, the cost model's
    call) compares the two, time and bytes (cost_block.block_note).

    A ConvNeXt block (a depthwise conv before the MLP) has a third way, partly fused: the conv
    as a kernel of its own and the MLP on its output as the MLP's own choice. When that is
    predicted faster than the whole block in one kernel, the choice falls back with a reason
    that starts "partly fused" (the matcher then plans the MLP alone)."""
    if spec.depthwise and not model_candidates(spec, ctx.device, include_aten=False):
        reason = f"partly fused: no whole-block schedule fits {ctx.device.name} (C = " + (
            f"{spec.in_features}: dw_mlp_block keeps every channel of its tile in registers)"
        )
        return Choice(ATEN, "model", reason, fallback_reason=reason)
    choice = _select_block(spec, ctx)
    if not spec.depthwise or choice.fallback_reason is not None or choice.prediction is None:
        return choice
    apart = _select_block(spec.without_depthwise(), ctx)
    if apart.prediction is None:
        return choice
    conv_s, conv_bytes = dw_conv_apart(spec, ctx.device)
    whole, parts = choice.prediction.at_hint, apart.prediction.at_hint + conv_s
    parts_bytes = apart.prediction.bytes + conv_bytes
    note = (
        f"the whole block {whole * 1e6:.1f} us and {choice.prediction.bytes / 2**20:.2f} MiB "
        f"against the conv apart and the MLP {apart.schedule.name} {parts * 1e6:.1f} us and "
        f"{parts_bytes / 2**20:.2f} MiB"
    )
    if parts < whole:
        return dataclasses.replace(choice, fallback_reason=f"partly fused: {note}")
    return dataclasses.replace(choice, why=f"{choice.why}; {note}")


def _select_block(spec: MlpSpec, ctx: SelectionContext) -> Choice:
    choice = select_schedule(spec, ctx)
    fused = choice.schedule
    if fused.name == "aten":
        if choice.origin != "model":
            return choice
        ranked = rank(spec, model_candidates(spec, ctx.device, include_aten=False), ctx.device)
        if not ranked:
            return dataclasses.replace(
                choice, fallback_reason="no block schedule fits the planning GPU"
            )
        fused = ranked[0].schedule
    note = block_note(spec, fused, ctx.device, ctx.calibration)
    if choice.fallback_reason is not None:
        return dataclasses.replace(choice, fallback_reason=note)
    return dataclasses.replace(choice, why=f"{choice.why}; {note}")


def _for_cpu(spec: Spec, ctx: SelectionContext, choice: Choice) -> Choice:
    """Under cpu="interpret", the tiles re-picked for the interpreter (a cached record has
    them already)."""
    if interpreted(spec, ctx.config) and choice.origin != "cache":
        return for_interpreter(spec, choice)
    return choice


def _override(spec: Spec, ctx: SelectionContext) -> Choice | None:
    """1. An explicit override, or None."""
    config = ctx.config
    if spec.device == "cpu" and config.cpu == "aten":
        reason = (
            "cpu='aten' (the default for CPU tensors): the host compiler runs it; "
            "cpu='interpret' runs the generated kernel through Triton's interpreter"
        )
        return Choice(ATEN, "override", reason, fallback_reason=reason)
    if config.schedule == "aten":
        return Choice(
            ATEN, "override", "option schedule='aten'", fallback_reason="option schedule='aten'"
        )
    if config.schedule is not None:
        forced = [
            s
            for s in model_candidates(spec, ctx.device, include_aten=False, library=True)
            if s.name == config.schedule
        ]
        if forced:
            best = rank(spec, forced, ctx.device, ctx.calibration)[0]
            return Choice(
                best.schedule,
                "override",
                f"option schedule={config.schedule!r}",
                prediction=predict(spec, best.schedule, ctx.device, ctx.calibration),
                candidates=_rows([best]),
            )
        log.warning("schedule %r cannot run %s; choosing another", config.schedule, spec.describe())
    return None


def _search(spec: Spec, ctx: SelectionContext) -> Choice:
    """3 to 5: a cached record, else tuning, else the cost model."""
    config = ctx.config
    include_aten = not interpreted(spec, config)
    # 3. a cached record
    tuning = config.autotune and ctx.bench is not None
    key, parts = ctx.key(spec)
    choice = stored_decision(key, parts, spec, ctx, tuning=tuning)
    if choice is not None:
        return choice

    # 4 and 5: rank every candidate with the cost model; tune the top-k when enabled
    ranked = rank(
        spec,
        model_candidates(spec, ctx.device, include_aten=include_aten),
        ctx.device,
        ctx.calibration,
    )
    if not ranked:  # only under cpu="interpret", where ATen is no candidate
        reason = f"no schedule of this project's fits {ctx.device.name}: ATen runs it"
        return Choice(ATEN, "model", reason, fallback_reason=reason)
    top = [p.schedule for p in ranked[: max(8, config.top_k)]]
    if tuning:
        pool = []
        for p in ranked[: config.top_k]:
            pool.append(p)
            for stages in (2, 4):
                if p.schedule.name != "aten":
                    variant = _with_stages(spec, p.schedule, stages, ctx.device)
                    if variant is not None:
                        pool.append(
                            predict(spec, variant, ctx.device, ctx.calibration, symbolic=False)
                        )
        runner = (lambda pred: ctx.make_runner(spec, pred)) if ctx.make_runner else None
        counters["tune.region"] += 1
        measured = autotune(pool, spec.key(), ctx.bench, runner, spec.describe())
        if measured:
            times = {m.prediction.schedule: m.seconds for m in measured}
            best, rejected = _first_verified(spec, [m.prediction for m in measured], ctx)
            why = (
                f"tuned: fastest of {len(measured)} measured that passes the static check, "
                f"{times[best.schedule] * 1e6:.1f} us "
                f"(model predicted {best.at_hint * 1e6:.1f} us)"
            )
            return Choice(
                best.schedule,
                "tuned",
                why,
                fallback_reason="tuned: ATen measured fastest"
                if best.schedule.name == "aten"
                else None,
                prediction=predict(spec, best.schedule, ctx.device, ctx.calibration),
                candidates=_rows([m.prediction for m in measured], times),
                valid_for=valid_range(spec, best.schedule, top, ctx),
                rejected=rejected,
            )
    winner, rejected = _first_verified(spec, ranked, ctx)
    why = _why(winner, ranked, spec, ctx.device)
    if rejected:
        why += f"; {len(rejected)} faster candidate(s) failed the static check"
    if not include_aten:
        aten = predict(spec, ATEN, ctx.device, ctx.calibration, symbolic=False)
        why += (
            f"; {_label(ATEN, spec, ctx.device).replace('aten', 'ATen', 1)} "
            f"({aten.at_hint * 1e6:.1f} us predicted) is not a candidate: "
            "cpu='interpret' runs this project's kernels"
        )
    return Choice(
        winner.schedule,
        "model",
        why,
        fallback_reason=f"cost model: {why}" if winner.schedule.name == "aten" else None,
        prediction=predict(spec, winner.schedule, ctx.device, ctx.calibration),
        candidates=_rows(ranked[: max(8, config.top_k)]),
        valid_for=valid_range(spec, winner.schedule, top, ctx),
        rejected=rejected,
    )


TILE_PARAMS = ("BLOCK_M", "BLOCK_N", "BLOCK_K", "BLOCK_C", "num_warps", "SPLIT", "BLOCK_H")


def for_interpreter(spec: Spec, choice: Choice) -> Choice:
    """Same schedule and variants, tiles re-picked for Triton's interpreter, which pays per
    program and per loop trip rather than per FLOP (the GPU plan's tiles stay in `why`)."""
    schedule = choice.schedule
    if not any(k in TILE_PARAMS for k, _ in schedule.params):  # aten, sdpa: no tiles
        return choice
    fixed = {k: v for k, v in schedule.params if k not in TILE_PARAMS}
    options = list(SPACES[schedule.name].candidates(spec, device=None, **fixed))

    def volume(s: Schedule) -> int:  # numpy work per step: smaller wins a tie in steps
        v = 1
        for k in TILE_PARAMS[:4]:
            v *= int(s.get(k, 1))
        return v

    best = min(options, key=lambda s: (interpreter_steps(spec, s), volume(s), s.key()))
    if best == schedule:
        return choice
    plan = " ".join(f"{k}={v}" for k, v in schedule.params if k in TILE_PARAMS)
    return dataclasses.replace(
        choice,
        schedule=best,
        why=f"{choice.why}; tiles re-picked for Triton's interpreter (GPU plan: {plan})"
        + key_tiles_note(spec, best),
    )


MAX_VERIFIED = 8


def _first_verified(
    spec: Spec, preds: list[Prediction], ctx: SelectionContext
) -> tuple[Prediction, tuple[str, ...]]:
    """The first prediction whose kernel passes the static check (ATen always does)."""
    rejected = []
    for pred in preds[:MAX_VERIFIED]:
        if pred.schedule.name == "aten" or ctx.verify is None:
            return pred, tuple(rejected)
        problems = ctx.verify(spec, pred.schedule)
        if not problems:
            return pred, tuple(rejected)
        rejected.append(f"{pred.schedule.describe()}: {'; '.join(problems)}")
    log.warning(
        "no verified schedule among the best %d for %s; using the model's first",
        MAX_VERIFIED,
        spec.describe(),
    )
    return preds[0], tuple(rejected)


def _with_stages(spec: Spec, schedule: Schedule, stages: int, device: Device) -> Schedule | None:
    params = {**schedule.as_dict(), "num_stages": stages}
    try:
        return SPACES[schedule.name].make(spec, device=device, **params)
    except InvalidSchedule:
        return None
