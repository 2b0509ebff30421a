"""The LPU compiler: placement, static schedule and the Program they make; the verifier checks it."""

from __future__ import annotations

import dataclasses
import functools
import math
from collections.abc import Callable

from openlpu.compiler.partition import (
    PieceSizes,
    arrangement,
    check_chips,
    check_fits_some_system,
    fewest_chips,
    fewest_chips_any_cut,
    installs_per_step,
    kv_slots,
    most_chips,
    partition,
    piece_homes,
    place,
    size_table,
    tp_candidates,
    tp_widths,
)
from openlpu.compiler.program import (
    FORMAT_VERSION,
    PREFILL_CHUNKS,
    PhaseSchedule,
    Placement,
    Program,
    Workload,
    gc_paused,
    load_program,
)
from openlpu.compiler.schedule import (
    balanced_rows,
    decode_figures,
    decode_rows,
    period_cycles,
    predicted_rows,
    schedule_phase,
    schedule_prefill,
)
from openlpu.compiler.verify import Violation, verify, verify_or_raise
from openlpu.errors import OpenLPUError
from openlpu.hardware.lpu import SystemSpec
from openlpu.models.spec import ModelSpec

MICRO_BATCH_ASKS = 6  # decode steps scheduled at most, past one user's, in search of the users a micro-batch takes


@gc_paused
def compile_program(spec: ModelSpec, system: SystemSpec, workload: Workload, chips: int | None = None,
                    tp: int | None = None) -> Program:
    """Place the model on `chips` chips (None: as few as fit) in TP groups of `tp` chips (None: the
    compiler's choice, below) and schedule one decode step (one micro-batch of users) and one prefill: the
    stages arranged for the shortest step, with MLP slices fitted to full stages or only equal ones
    (partition's `fit`), or each piece cut once (`single_cuts`), or as even as can be (`balance`), or, for
    a mixture of experts whose rows that placement could not cut, spread by expert rows (`experts`),
    whichever gives each user tokens sooner.
    The compiler's TP width is partition's (the widest inside a node that arranges), or a wider one where
    that decodes faster (_wider_groups): spanning nodes on the same chips, or, given a chip count, on the
    most of them it divides or the model's pieces take in such groups, or on the fewest that hold the model
    in them. A mixture of experts on the fewest chips may take those that hold it with its MLPs cut by expert
    rows (_by_expert_rows). Without a prefill chunk, the compiler takes the largest of PREFILL_CHUNKS, or a
    smaller one whose smaller activation buffers place the model better (_chunked). Same inputs, byte-identical
    Program."""
    workload.check_window(spec)
    templates = {}  # collective routes, shared by every schedule
    if chips is not None:  # a bad count is refused as such, not placed on fewer
        check_chips(system, chips)
    check_fits_some_system(spec, system, workload)
    if workload.prefill_chunk is not None:  # a chunk longer than the prompt is the prompt: one wave either way
        workload = dataclasses.replace(workload, prefill_chunk=min(workload.prefill_chunk, workload.prompt_len))
        workload.check_prefill_waves()
    if workload.prefill_chunk is None:
        workload, (placement, decode, _) = _chunked(spec, system, workload, chips, tp, templates)
    else:
        placement, decode, _ = _placed(spec, system, workload, chips, tp, templates)
    prefill = schedule_prefill(spec, system, workload, placement, templates)
    return Program(version=FORMAT_VERSION, spec=spec, system=system, workload=workload,
                   kv_slots=tuple(kv_slots(spec, workload.context_length, i) for i in range(spec.n_layers)),
                   placement=placement, decode=decode, prefill=prefill)


def _placed(spec: ModelSpec, system: SystemSpec, workload: Workload, chips: int | None, tp: int | None,
            templates: dict) -> tuple[Placement, PhaseSchedule, float]:
    """The placement compile_program makes for a workload with its prefill chunk, its decode step and period."""
    try:
        best = _arranged(spec, system, workload, chips, tp, templates)
    except OpenLPUError as error:
        if chips is None or tp is not None:
            raise
        best, refusal = None, error  # all the chips arrange in no width: fewer may
    if tp is None:
        best = _wider_groups(spec, system, workload, chips or len(best[0].chips), best, templates,
                             idle=chips is not None)
    if best is None:
        raise refusal
    if chips is None and spec.n_experts:
        best = _by_expert_rows(spec, system, workload, tp, best, templates)
    return best


def _by_expert_rows(spec: ModelSpec, system: SystemSpec, workload: Workload, tp: int | None,
                    best: tuple[Placement, PhaseSchedule, float],
                    templates: dict) -> tuple[Placement, PhaseSchedule, float]:
    """`best` (a mixture of experts placed on the fewest chips fewest_chips finds, with its MLPs cut by d_ff rows
    where they place it), or the placement on the fewest chips that hold it cut by expert rows, where those are
    fewer and a token costs no more chip time on them (chips x the period between a user's tokens).
    Rows come first (every chip of a stage gets the same share of a layer's work whatever the routing), and the
    chips they take can arrange in wider groups: Mixtral 8x7B on 224 chips in groups of 32 decodes 3x as fast as
    on the 216 that hold it by expert rows, in groups of 8, so a token costs a third of the chip time. But where
    expert rows take fewer chips in groups as fast, rows cost chips for nothing (gpt-oss-20b: 96 in 3 groups of
    32 against 104 in 13 of 8, 3x slower); and a few percent slower on a fifth fewer chips is cheaper per token
    (Llama 4 Scout in groups of 40: 520 chips at 608 tok/s per user, against 640 at 645)."""
    found = fewest_chips(spec, system, workload, widths=tp_widths(spec, system, tp), cuts=(True,))
    if found is None or found[0] * found[1] >= len(best[0].chips):
        return best
    other = _placed(spec, system, workload, found[0] * found[1], tp, templates)
    fewer = len(other[0].chips) < len(best[0].chips)
    return other if fewer and len(other[0].chips) * other[2] <= len(best[0].chips) * best[2] else best


def _chunked(spec: ModelSpec, system: SystemSpec, workload: Workload, chips: int | None, tp: int | None,
             templates: dict) -> tuple[Workload, tuple[Placement, PhaseSchedule, float]]:
    """The workload at the prefill chunk the compiler chooses, and _placed's placement for it. A chunk's
    activation buffers take SRAM beside the weights, so where SRAM is tight a smaller chunk can let wider
    groups fit on as many chips (Llama 3.3 70B's fewest chips, 336, hold 42 groups of 8 at 256-token chunks
    and 21 of 16 at 128, which decode 1.5x as fast); but it makes more waves to schedule. So the largest of
    PREFILL_CHUNKS is kept unless a smaller one places the model better: on the same chips with a shorter
    step, or on fewer at no more chip time a token (_places_better); a smaller one is placed only where its
    buffers let wider groups fit, or, given the width, fewer groups (_may_place_better)."""
    chosen, best, too_many_waves, no_room = None, None, None, None
    for chunk in dict.fromkeys(min(c, workload.prompt_len) for c in PREFILL_CHUNKS):  # a prompt's length at most
        option = dataclasses.replace(workload, prefill_chunk=chunk)
        try:
            option.check_prefill_waves()
        except OpenLPUError as error:  # a smaller chunk can make more waves than a compile schedules
            too_many_waves = too_many_waves or error
            continue
        if best is not None and not _may_place_better(spec, system, chosen, option, chips, tp, best[0]):
            continue
        try:
            placed = _placed(spec, system, option, chips, tp, templates)
        except OpenLPUError as error:  # a larger chunk's buffers can leave a piece no room
            no_room = error  # the smallest chunk's: its buffers leave the most room, so it names the fewest chips
            continue
        if best is None or _places_better(placed, best, given=chips is not None):
            chosen, best = option, placed
    if best is None:
        raise no_room or too_many_waves
    return chosen, best


def _may_place_better(spec: ModelSpec, system: SystemSpec, kept: Workload, option: Workload, chips: int | None,
                      tp: int | None, placed: Placement) -> bool:
    """Whether `option`'s smaller buffers let a width wider than `placed`'s (made for the `kept` workload) fit
    chips it did not fit at `kept`'s, where the compiler would try it: the chips given, or in groups dividing
    the chips `placed` takes or the fewest that hold the model at `option`'s buffers. Where the compiler
    chooses the width, only wider groups are sought: they decode faster; a few chips fewer in the same groups
    are not worth the search (a long prompt is scheduled in twice the waves at half the chunk). Given the
    width, fewer groups of it are what a smaller chunk can give (Llama 3.3 70B in groups of 64: 6 at 64
    tokens, 7 at 256)."""
    if chips is not None and tp is not None:  # the placement is fixed
        return False
    widths = tp_widths(spec, system, tp)

    def fewest(workload: Workload, ts: list[int]) -> float:
        found = fewest_chips(spec, system, workload, widths=ts)
        return found[0] * found[1] if found else math.inf

    if tp is not None:  # the width is given: fewer groups of it are the only gain
        return fewest(option, widths) < len(placed.chips)
    counts = {chips} if chips is not None else {len(placed.chips), fewest(option, widths)} - {math.inf}
    return any(fewest(option, [t]) <= n < fewest(kept, [t]) for n in counts for t in widths
               if t > placed.tp and (chips is not None or n % t == 0))  # _wider_groups' widths


def _places_better(placed: tuple[Placement, PhaseSchedule, float], best: tuple[Placement, PhaseSchedule, float],
                   given: bool) -> bool:
    """Whether a smaller chunk's placement beats the one kept: on the same chips, a shorter step; on fewer, no more
    chip time a token (chips x the period between a user's tokens, as _by_expert_rows weighs them: Qwen3 32B at
    131,072 tokens in groups of 8 takes 224 chips at 64-token chunks, 232 at 256, whose step is 0.2% shorter);
    given the chips, a shorter step."""
    (new, _, period), (old, _, old_period) = placed, best
    if given or len(new.chips) == len(old.chips):
        return period < old_period
    return len(new.chips) < len(old.chips) and len(new.chips) * period <= len(old.chips) * old_period


def _arranged(spec: ModelSpec, system: SystemSpec, workload: Workload, chips: int | None, tp: int | None,
              templates: dict) -> tuple[Placement, PhaseSchedule, float]:
    """partition's placement and its decode step in the arrangement of its stages that decodes fastest, with
    that step's period (decode_period_cycles)."""
    tried = [arrangement(spec, system, workload, chips, tp)]
    spread = place(spec, system, workload, *tried[0])
    best = _decode_schedule(spec, system, workload, spread, {}, templates)
    # fewer cuts in equal slices can be faster than slices squeezed beside full stages; even stages can
    # be faster too: with users in flight the busiest stage may bound the step, and the balanced
    # arrangement cuts pieces where stages fill, which can suit a model whose MLPs cannot be cut; each piece
    # cut once, inside attentions too, can be faster where a stage holds about a layer; and a mixture of
    # experts whose d_ff rows were too few to cut can spread its experts over the stages
    uncut = spec.n_experts and not spread.experts and _moe_layers_whole(spec, spread)
    for option in ({"fit": False}, {"balance": True}, {"single_cuts": True}, *([{"experts": True}] if uncut else [])):
        if (other := arrangement(spec, system, workload, chips, tp, **option)) in tried:
            continue
        # scheduled only if it installs fewer bytes a step than every arrangement tried (a schedule costs more)
        if "single_cuts" in option and (_installs(spec, workload, other)
                                        >= min(_installs(spec, workload, o) for o in tried)):
            continue
        tried.append(other)
        candidate = _decode_schedule(spec, system, workload, place(spec, system, workload, *other), option, templates)
        if candidate[2] < best[2]:
            best = candidate
    return best


def _installs(spec: ModelSpec, workload: Workload, arranged: tuple[int, PieceSizes, list[tuple[int, int]]]) -> float:
    """installs_per_step of an arrangement (TP width, piece sizes, stage ranges) made, as _arranged makes them, for
    one user a step (the size table's arguments as arrangement passes them: one cache entry)."""
    t, sizes, _ = arranged
    return installs_per_step(size_table(spec, workload, t, 1, sizes.experts), sizes)


def _wider_groups(spec: ModelSpec, system: SystemSpec, workload: Workload, chips: int,
                  best: tuple[Placement, PhaseSchedule, float] | None, templates: dict,
                  idle: bool) -> tuple[Placement, PhaseSchedule, float] | None:
    """`best` (_arranged's placement on `chips` chips, its decode step and period; None: they arrange in no
    width), or one in wider TP groups where that decodes faster: on the same chips, the widths that divide
    them, or, with `idle`, each width on the most of the chips it divides (or on as many as the model's
    pieces take in such groups, where those are fewer); and each width on the fewest chips that hold the
    model in such groups, where those are fewer (Llama 4 Scout's fewest chips, 592, hold 74 groups of 8; 520
    hold 13 groups of 40 by expert rows, 3x as fast). A wider group installs each matrix over more chips, and
    installs bound a decode step, at the cost of all-reduces, over global links where the group spans nodes,
    which grow with the users a step carries; a few idle chips cost less than narrow groups on all of them
    (Llama 3.3 70B on 577 chips, a prime, arranges only as 577 stages of one chip, and decodes 14x faster on
    576 in groups of 64). The widths are tried from the widest down while each decodes faster than the one
    before (the step is shortest where the all-reduces cost about what the wider installs save), each in its
    fastest arrangement."""
    widths = [t for t in tp_candidates(spec, system) if best is None or t > best[0].tp]
    # most_chips (0.05-0.6 s) only at the first width whose groups the chips outnumber the pieces for
    most = functools.cache(lambda: most_chips(spec, system, workload, 1, tp_candidates(spec, system))) if idle else None
    previous = None
    for t in sorted(widths, reverse=True):
        candidate = (_arranged_within(spec, system, workload, chips, t, templates, most) if idle or chips % t == 0
                     else None)
        if candidate is not None:
            if previous is not None and candidate[2] >= previous:
                break
            best, previous = _faster(best, candidate), candidate[2]
        # the fewest chips that hold the model in such groups may decode faster still
        than = len(candidate[0].chips) if candidate else (chips - chips % t if idle else chips)
        best = _faster(best, _on_fewest(spec, system, workload, t, than, templates))
    return best


def _arranged_within(spec: ModelSpec, system: SystemSpec, workload: Workload, chips: int, t: int, templates: dict,
                     most: Callable[[], dict[int, int]] | None) -> tuple[Placement, PhaseSchedule, float] | None:
    """_arranged in groups of t on the most of `chips` they divide, or, with `most` (giving most_chips), on as
    many as the model's pieces take in such groups where those are fewer; None where neither arranges."""
    count = chips - chips % t
    placed = _arranged_on(spec, system, workload, count, t, templates)
    if placed is None and most is not None and 0 < most().get(t, 0) < count:  # the pieces are too few for them
        placed = _arranged_on(spec, system, workload, most()[t], t, templates)
    return placed


def _on_fewest(spec: ModelSpec, system: SystemSpec, workload: Workload, t: int, than: int,
               templates: dict) -> tuple[Placement, PhaseSchedule, float] | None:
    """_arranged on the fewest chips that hold the model in groups of t (fewest_chips, its MLPs cut by d_ff rows
    or, for a mixture of experts, by expert rows, whichever takes fewer), where those are fewer than `than`;
    else None. A step can be shortest there: in groups wide enough, a stage more adds a hop and saves little
    (Llama 2 70B in groups of 64: 1,034 tok/s on 7 stages, 1,032 on 9, 1,027 on 15)."""
    found = fewest_chips_any_cut(spec, system, workload, widths=[t])
    if found is None or found[0] * found[1] >= than:
        return None
    return _arranged_on(spec, system, workload, found[0] * found[1], t, templates)


def _arranged_on(spec: ModelSpec, system: SystemSpec, workload: Workload, chips: int, t: int,
                 templates: dict) -> tuple[Placement, PhaseSchedule, float] | None:
    """_arranged on `chips` chips in groups of t, or None where they do not arrange so."""
    try:
        return _arranged(spec, system, workload, chips, t, templates)
    except OpenLPUError:  # the pieces do not fit that few chips in groups this wide, or are too few for them
        return None


def _faster(placed: tuple[Placement, PhaseSchedule, float] | None,
            other: tuple[Placement, PhaseSchedule, float] | None) -> tuple[Placement, PhaseSchedule, float] | None:
    """Of two (placement, decode step, period), the one whose period is shorter; `placed` on ties."""
    return other if placed is None or (other is not None and other[2] < placed[2]) else placed


def _moe_layers_whole(spec: ModelSpec, placement: Placement) -> bool:
    """Whether every MoE layer's MLP sits whole on one stage."""
    homes = piece_homes(placement)
    return all(len(homes[(i, "ffn")]) == 1 for i in range(spec.n_layers) if spec.is_moe_layer(i))


def _decode_schedule(spec: ModelSpec, system: SystemSpec, workload: Workload, placement: Placement, option: dict,
                     templates: dict) -> tuple[Placement, PhaseSchedule, float]:
    """The decode step of a placement made with partition's `option`s, or of one like it on the same chips with
    buffers for micro-batches of several users where that serves each of them sooner, and its period. The users
    a micro-batch takes: first those decode_rows reads off one user's step; then, as a micro-batch's step lasts
    longer than one user's, those predicted_rows finds from the steps scheduled so far, until it names one
    scheduled (Llama 3.2 1B with 300 users on 24 chips at TP 1: one user's step asks 75 a step; with 75's step,
    38 look best, and serve each user 1.4x as fast as 75; with 38's, 38 still do). Placing their larger buffers
    on more chips would undo the fewest chips (Llama 3.2 1B with 16,384 users of 32 tokens: 96 chips, not 48,
    and slower); the most users a micro-batch can take on the same chips, up to those asked, keeps them."""
    users = workload.users
    step = schedule_phase(spec, system, workload, placement, "decode", templates)
    steps = {1: decode_figures(system, step)}  # users per micro-batch -> what their step's period reads

    def period(rows: int) -> float:
        makespan, turn = steps[rows]
        return period_cycles(makespan, -(-users // rows), turn)

    best = (placement, step, period(1))
    placed = {1: placement}  # users per micro-batch -> partition's placement on the same chips with buffers for them
    too_many = users + 1  # the fewest users per micro-batch found whose buffers do not fit

    def fits(rows: int) -> bool:
        nonlocal too_many
        if rows >= too_many:
            return False
        if rows not in placed:
            try:
                placed[rows] = partition(spec, system, workload, len(placement.chips), placement.tp, rows, **option)
            except OpenLPUError:
                too_many = rows
                return False
        return True

    def fitting(rows: int) -> int | None:
        """`rows`, or where their buffers do not fit, the most users whose buffers do, spread evenly."""
        if fits(rows):
            return rows
        low, high = max(r for r in placed if r < too_many), too_many - 1
        while low < high:
            middle = (low + high + 1) // 2
            low, high = (middle, high) if fits(middle) else (low, middle - 1)
        rows = balanced_rows(users, low)
        return rows if fits(rows) else None

    ask = decode_rows(users, *steps[1])
    for _ in range(MICRO_BATCH_ASKS):
        rows = fitting(ask)
        if rows is None or rows in steps:
            break
        step = schedule_phase(spec, system, workload, placed[rows], "decode", templates, rows)
        steps[rows] = decode_figures(system, step)
        # kept only if it serves every user sooner: a micro-batch's longer step can cost more than the turns
        if period(rows) < best[2]:
            best = (placed[rows], step, period(rows))
        ask = predicted_rows(users, steps, too_many - 1)
    return best


__all__ = ["Program", "Violation", "Workload", "compile_program", "load_program", "verify", "verify_or_raise"]
