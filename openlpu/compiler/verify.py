"""Invariants every Program must hold; each check reads the Program alone (with the model's spec it carries),
never the compiler.

0. structure: first, what every other check reads (a Program failing it is reported for that alone): the
   stages numbered in order, every op and transfer on one of them, on a unit a chip has or of a kind there
   is, its prompt chunk named by number, no two of a phase's records named alike (ops and transfers), every
   transfer carrying something (it is read as the result it carries); then each layer keeps the KV slots it
   attends (the context, or its window or chunk), and the prefill schedules the prompt chunks its workload
   makes; every chip in at most one stage, inside the system, each stage one TP group; the
   stages' pieces, in pipeline order, hold all vocabulary rows of the embedding, each layer's attention
   (whole, or ranges of all its KV slots) and all d_ff rows of its MLP, and all vocabulary rows of the head,
   once, each split piece's ranges in order without a gap or an overlap; a decode step carries a
   micro-batch of 1 to all of the users in flight, attending the tokens its workload attends, and the prefill
   is scheduled for its workload's prompt; no size is negative; a phase's makespan is when its last
   op or transfer ends (timing reads latency off it); the phase computes the model: every op of the graph
   lowered from the spec runs, whole or by each part of a cut piece (on that part's stage), reading what the
   graph says it reads through transfers (within a cut piece, its own part's result), each cut piece's parts
   combined by a tree reading each part once, and no other op runs; each op records, over its parts and
   their chips, at least the work and the output of the graph's op for the users its step carries, and each
   transfer carries at least the bytes of the result it carries (the graph is lowered only for a Program whose
   structure and sizes hold: a file's workload may claim any);
1. no functional unit runs two ops at once, nor an op in fewer cycles than its recorded work takes at the
   unit's and the SRAM's rates, or than its chips take to install its weights (or the keys and values its
   queries stream through) at the matrix unit's install rate, over the group and on each chip;
2. nothing starts before its inputs are on its chips (ops and transfers, and each phase of a transfer
   after the phase before it): a transfer sends from chips that hold its inputs to the stage whose ops
   take it, and reaches every chip of that stage; a phase ends with its sampled token picked whole (an
   all-reduce over the chips holding shares of the vocabulary), and a decode step with the token back at
   the stages holding the embedding, which the next step reads (timing reads latency off the makespan);
3. SRAM in use (weights + KV + live activations, and weights + KV + the activation buffers its stage reserves)
   never exceeds a chip's capacity, each shard counting its elements' bytes, and each stage reserves the KV
   its attention pieces keep: users x slots x the K and V rows its chips' shards of the layer's K and V
   projections make;
4. every weight element is placed exactly once: at most one unflagged shard holds it, any further
   copies are flagged replicated (on purpose), divided along the axis its ops split; each shard sits on
   a chip of a stage that holds its tensor's piece (the rows of a cut MLP, embedding or head inside that
   stage's range; a tied table's head copy on a head stage), and each stage's chips hold all of every
   tensor its pieces run on (their rows of a cut one); each chip holds matching rows of the tensors it
   multiplies one after the other (an MLP's gate, up and down; an attention's heads and the KV heads they read);
5. every hop of a transfer is a link the system cables (so no chip talks directly to more chips in other
   nodes than it has global links), between two chips the Program holds; a transfer's links carry its
   payload; no link carries more than its bandwidth at any time, each phase's bytes leaving in its span less
   the hop's latency, which they spend in flight.
"""

from __future__ import annotations

import collections
import fractions
import functools
import heapq
import itertools
import math
from collections import defaultdict
from collections.abc import Callable
from dataclasses import dataclass

from openlpu.compiler.partition import (
    APPLIED_BY_LAST_PART,
    CUT_SEPARATOR,
    EMBED,
    EXPERT_ROWS,
    FFN_NAMES,
    SPLIT_RULES,
    axis_length,
    cut_range,
    ffn_units,
    is_cut_along_ffn,
    is_cut_along_vocab,
    is_expert_tensor,
    merged_pieces,
    op_suffix,
    piece_homes,
    prefill_chunks,
    split_rule,
    suffix_role,
    tensor_piece,
)
from openlpu.compiler.program import (
    TRANSFER_ENDS,
    PhaseSchedule,
    Program,
    Transfer,
    gc_paused,
    transfer_ends,
)
from openlpu.compiler.schedule import (
    CHAINED,
    NEEDS_ALL_REDUCE,
    ONCE_ON_LAST_PART,
    TOKEN_ID_BYTES,
    chained_name,
    chunk_name,
    combines_parts,
    split_chunk,
    unit_rates,
)
from openlpu.errors import OpenLPUError
from openlpu.graph.lower import as_precision, lower
from openlpu.graph.ops import UNITS
from openlpu.hardware.lpu import SystemSpec
from openlpu.words import counted

RATE_TOLERANCE = 1e-9


@dataclass(frozen=True)
class Violation:
    invariant: str  # "structure" | "unit_overlap" | "input_not_ready" | "sram_capacity" | "weight_placement" | "link_bandwidth"
    message: str


def _kv_slots_model(program: Program) -> tuple[int, ...]:
    """The KV positions each of the model's layers keeps per user: the context, or its window or chunk."""
    return tuple(program.spec.layer_positions(i, program.workload.context_length)
                 for i in range(program.spec.n_layers))


def _attention_slots(program: Program, item: int, lo: int, hi: int) -> tuple[int, int]:
    """An attention piece's KV slot range: a whole attention, (0, 0), holds all its layer's slots."""
    return (lo, hi) if hi > lo or not 0 <= item < len(program.kv_slots) else (0, program.kv_slots[item])


def _pieces_in_order(program: Program) -> list[tuple[int, str, int, int]]:
    """The stages' pieces in pipeline order, adjacent ranges of one MLP, embedding, head or attention
    joined (a gap or an overlap leaves two entries, a missing range a short one)."""
    held = tuple((item, part, *_attention_slots(program, item, lo, hi)) if part == "attn" else (item, part, lo, hi)
                 for stage in program.placement.stages for item, part, lo, hi in stage.pieces)
    return list(merged_pieces(held))


def _model_pieces(program: Program) -> list[tuple[int, str, int, int]]:
    """What the stages must hold, from the model's tensors: each layer's d_ff rows of the tensors a cut MLP
    divides (or its experts, cut by expert), the vocabulary the rows of the embedding table; the KV slots
    are the Program's per layer."""
    n = program.spec.n_layers
    units = ffn_units(program.tensors, program.placement.experts)
    vocab = program.tensors["token_embd.weight"][0]
    layers = [p for i in range(n) for p in ((i, "attn", 0, program.kv_slots[i]), (i, "ffn", 0, units[i]))]
    return [(-1, "embed", 0, vocab), *layers, (n, "head", 0, vocab)]


def _structure(program: Program) -> list[Violation]:
    recorded, attended = program.kv_slots, _kv_slots_model(program)
    if len(recorded) != len(attended):
        return [Violation("structure", f"the Program records KV slots for {len(recorded)} layers; the model has "
                                       f"{len(attended)}")]
    if wrong := [i for i, (a, b) in enumerate(zip(recorded, attended)) if a != b]:
        return [Violation("structure", f"layer {wrong[0]} keeps {recorded[wrong[0]]} KV slots per user; it attends "
                                       f"{attended[wrong[0]]} (the context {program.workload.context_length}, or its "
                                       f"window or chunk where shorter)")]
    out, seen = [], {}
    held, model = _pieces_in_order(program), _model_pieces(program)
    if held != model:
        k = next((k for k, (a, b) in enumerate(zip(held, model)) if a != b), min(len(held), len(model)))
        found, expected = (held[k] if k < len(held) else "nothing"), (model[k] if k < len(model) else "nothing")
        out.append(Violation("structure", f"the stages do not hold the model's pieces once each in order: "
                                          f"piece {k} is {found}, expected {expected}"))
    for stage in program.placement.stages:
        if len(stage.chips) != program.placement.tp or not stage.chips:  # each op's share per chip is read at it
            out.append(Violation("structure", f"stage {stage.index} has {len(stage.chips)} chips, not the "
                                              f"placement's TP width {program.placement.tp} (at least 1)"))
        for chip in stage.chips:
            if not 0 <= chip < program.system.max_chips:
                out.append(Violation("structure", f"stage {stage.index} uses chip {chip}, outside the system"))
            if chip in seen:
                out.append(Violation("structure", f"chip {chip} is in stages {seen[chip]} and {stage.index}"))
            seen[chip] = stage.index
    out += [Violation("structure", f"the {phase.phase} phase schedules no ops") for phase in (program.decode,
                                                                                           program.prefill)
            if not phase.ops]
    out += _waves_held(program)
    if not 1 <= program.decode.tokens <= program.workload.users:
        out.append(Violation("structure", f"the decode step carries {program.decode.tokens} users' tokens; a "
                                          f"micro-batch holds 1 to the {program.workload.users} users in flight"))
    w = program.workload  # timing reads the lengths off the workload: the phases must be scheduled for them
    for phase, length, what in ((program.decode, w.attended_context, "tokens its workload attends"),
                                (program.prefill, w.prompt_len, "tokens of its workload's prompt")):
        if phase.seq_len != length:
            out.append(Violation("structure", f"the {phase.phase} phase is scheduled for {phase.seq_len:,} tokens, "
                                              f"not the {length:,} {what}"))
    return out


def _waves_held(program: Program) -> list[Violation]:
    """The prefill schedules each prompt chunk its workload makes, and no more: the model's graph is lowered for
    each it claims (a file's workload may claim millions; a compile schedules MAX_PREFILL_WAVES at most)."""
    w = program.workload
    waves = len(range(0, w.prompt_len, w.chunk_tokens))
    held = 1 + max((split_chunk(op.name)[0] for op in program.prefill.ops if "/" in op.name), default=-1)
    if held == waves:
        return []
    return [Violation("structure", f"the prefill schedules {counted(held, 'prompt chunk')}; its workload's "
                                   f"{w.prompt_len:,}-token prompt in chunks of {w.chunk_tokens:,} makes {waves:,}")]


def _names(program: Program) -> list[Violation]:
    """What the records name, which every other invariant reads: the stages numbered in order, each op and
    transfer on one of them, an op on a unit of a chip, a transfer of a kind there is, a prompt chunk by
    its number (c<chunk>/...)."""
    stages = len(program.placement.stages)
    out = []
    if [s.index for s in program.placement.stages] != list(range(stages)):
        out.append(Violation("structure", "the stages are not numbered 0, 1, 2, ... in pipeline order"))
    for phase in (program.decode, program.prefill):
        out += _named_once(phase)
        out += [Violation("structure", f"{phase.phase}: transfer {t.name} carries nothing (it has no inputs)")
                for t in phase.transfers if not t.inputs]  # a transfer is read as the result it carries
        for what, records, field, known in (("op", phase.ops, "unit", UNITS),
                                            ("transfer", phase.transfers, "kind", tuple(TRANSFER_ENDS))):
            for r in records:
                prefix, chunked, _ = r.name.partition("/")
                if not 0 <= r.stage < stages:
                    out.append(Violation("structure", f"{phase.phase}: {what} {r.name} is on stage {r.stage}, but "
                                                      f"the placement has stages 0 to {stages - 1}"))
                if getattr(r, field) not in known:
                    out.append(Violation("structure", f"{phase.phase}: {what} {r.name} has {field} "
                                                      f"{getattr(r, field)!r}, not one of {', '.join(known)}"))
                if what == "transfer" and r.kind in TRANSFER_ENDS and not all(transfer_ends(r.kind, r.chips)):
                    out.append(Violation("structure", f"{phase.phase}: transfer {r.name} ({r.kind}) over chips "
                                                      f"{list(r.chips)} has no sender or no receiver"))
                if chunked and not (prefix[:1] == "c" and prefix[1:].isascii() and prefix[1:].isdecimal()):
                    out.append(Violation("structure", f"{phase.phase}: {what} {r.name} names no prompt chunk "
                                                      f"(c<chunk>/...)"))
    return out


def _named_once(phase: PhaseSchedule) -> list[Violation]:
    """No two records of a phase share a name, ops and transfers alike: inputs name what they read."""
    counts = collections.Counter(r.name for r in itertools.chain(phase.ops, phase.transfers))
    if len(counts) == len(phase.ops) + len(phase.transfers):
        return []
    twice = next(n for n, k in counts.items() if k > 1)
    kinds = sorted({what for what, records in (("op", phase.ops), ("transfer", phase.transfers))
                    for r in records if r.name == twice})
    named = f"two {kinds[0]}s are" if len(kinds) == 1 else "op and transfer are both"
    return [Violation("structure", f"{phase.phase}: {named} named {twice} (inputs name what they read)")]


def _sizes(program: Program) -> list[Violation]:
    """What SRAM and the links add up: no size negative (it would cancel another; a link's bytes:
    _payload_carried), and each shard's bytes those of its elements at the weights' precision."""
    out = []
    negative = [f"stage {s.index}'s {what}" for s in program.placement.stages
                for what in ("kv_bytes_per_chip", "activation_bytes_per_chip") if getattr(s, what) < 0]
    for phase in (program.decode, program.prefill):
        negative += [f"{phase.phase} op {op.name}'s {what}" for op in phase.ops
                     for what in ("flops_per_chip", "sram_bytes_per_chip", "output_bytes_per_chip")
                     if getattr(op, what) < 0]
        negative += [f"{phase.phase} transfer {t.name}'s payload" for t in phase.transfers if t.payload_bytes < 0]
    if negative:
        out.append(Violation("structure", f"{negative[0]} is negative" + (f" (and {len(negative) - 1} more sizes)"
                                                                          if len(negative) > 1 else "")))
    bytes_per_element = as_precision(program.workload.weights).bytes_per_element
    per_unit = {}  # (tensor, axis) -> its elements per unit along that axis (None: no axis of a tensor it has)
    for sh in program.placement.shards:
        if (key := (sh.tensor, sh.axis)) not in per_unit:
            shape = program.tensors.get(sh.tensor)
            per_unit[key] = (math.prod(shape) // axis_length(sh.tensor, shape, sh.axis)
                             if shape is not None and _on_an_axis(sh.tensor, shape, sh.axis) else None)
        if per_unit[key] is None or not 0 <= sh.start <= sh.stop:
            continue  # reported by _weights
        expected = math.ceil((sh.stop - sh.start) * per_unit[key] * bytes_per_element)
        if sh.nbytes != expected:
            out.append(Violation("sram_capacity", f"{sh.tensor} [{sh.start}, {sh.stop}) on chip {sh.chip} counts "
                                                  f"{sh.nbytes} bytes; its elements take {expected} at "
                                                  f"{program.workload.weights}"))
    return out


def _on_an_axis(name: str, shape: tuple[int, ...], axis: int) -> bool:
    """Whether a shard's axis is one of its tensor's (or, for an expert tensor, its experts' rows end to end)."""
    return 0 <= axis < len(shape) or axis == EXPERT_ROWS and is_expert_tensor(name)


def _makespan(phase: PhaseSchedule) -> list[Violation]:
    """A phase starts at cycle 0 and lasts until its last op ends or its last transfer arrives (timing reads its
    latency off it, so nothing may run before 0)."""
    out = []
    last = max([op.end_cycle for op in phase.ops] + [t.arrival_cycle for t in phase.transfers], default=0)
    if phase.makespan_cycles != last:
        out.append(Violation("structure", f"{phase.phase}: makespan {phase.makespan_cycles} cycles, but its last op or "
                                          f"transfer ends at {last}"))
    first = min([(op.start_cycle, op.name) for op in phase.ops]
                + [(start, t.name) for t in phase.transfers for start, _, _ in t.phases], default=(0, ""))
    if first[0] < 0:
        out.append(Violation("structure", f"{phase.phase}: {first[1]} starts at cycle {first[0]}, before the phase "
                                          f"does (cycle 0)"))
    # timing reads busy cycles off each op's span: one that ends before it starts would count as negative time
    backwards = [op.name for op in phase.ops if op.end_cycle < op.start_cycle]
    backwards += [t.name for t in phase.transfers if any(end < start for start, end, _ in t.phases)]
    if backwards:
        out.append(Violation("structure", f"{phase.phase}: {backwards[0]} ends before it starts"
                                          + (f" (and {len(backwards) - 1} more)" if len(backwards) > 1 else "")))
    return out


def _unit_overlap(program: Program, phase: PhaseSchedule) -> list[Violation]:
    """No unit runs two ops at once, nor an op in fewer cycles than the work it records takes at its unit's
    fastest rate (the matrix unit's in its fastest mode) and at the SRAM's bandwidth."""
    chip, out = program.system.chip, []
    per_cycle = unit_rates(chip, max(chip.matrix_macs_per_cycle.values()))
    by_unit = defaultdict(list)
    for op in phase.ops:
        least = max(op.flops_per_chip / per_cycle[op.unit], op.sram_bytes_per_chip / chip.sram_bytes_per_cycle)
        if op.end_cycle <= op.start_cycle:
            out.append(Violation("unit_overlap", f"{phase.phase}: {op.name} ends at {op.end_cycle}, not after its "
                                                 f"start {op.start_cycle}"))
        elif op.end_cycle - op.start_cycle < least * (1 - RATE_TOLERANCE):
            out.append(Violation("unit_overlap", f"{phase.phase}: {op.name} runs {op.end_cycle - op.start_cycle} "
                                                 f"cycles; its {op.flops_per_chip:,.0f} operations and "
                                                 f"{op.sram_bytes_per_chip:,.0f} SRAM bytes take {least:,.1f} on "
                                                 f"its {op.unit} unit at the most"))
        by_unit[(op.stage, op.unit)].append(op)
    for (stage, unit), ops in sorted(by_unit.items()):
        ops.sort(key=lambda o: (o.start_cycle, o.end_cycle))
        for a, b in zip(ops, ops[1:]):
            if b.start_cycle < a.end_cycle:
                out.append(Violation("unit_overlap", f"{phase.phase}: stage {stage} {unit} unit runs {a.name} "
                                                     f"(cycles {a.start_cycle}-{a.end_cycle}) and {b.name} (from "
                                                     f"{b.start_cycle}) at once"))
    return out


def _inputs_ready(program: Program, phase: PhaseSchedule) -> list[Violation]:
    out = []
    done = {op.name: (op.stage, op.end_cycle) for op in phase.ops}
    done.update({t.name: (t.stage, t.arrival_cycle) for t in phase.transfers})
    stage_chips = {s.index: set(s.chips) for s in program.placement.stages}
    for t in phase.transfers:
        if t.arrival_cycle <= t.start_cycle:
            out.append(Violation("input_not_ready", f"{phase.phase}: transfer {t.name} arrives at {t.arrival_cycle}, "
                                                    f"not after it starts at {t.start_cycle}"))
        if not t.phases or (t.phases[0][0], t.phases[-1][1]) != (t.start_cycle, t.arrival_cycle):
            out.append(Violation("input_not_ready", f"{phase.phase}: transfer {t.name} runs cycles {t.start_cycle}-"
                                                    f"{t.arrival_cycle}, but its phases do not span them"))
        for k, (start, arrival, _) in enumerate(t.phases):
            if arrival <= start:
                out.append(Violation("input_not_ready", f"{phase.phase}: transfer {t.name} phase {k} runs cycles "
                                                        f"{start}-{arrival}: it arrives no later than it starts"))
            elif k and start < t.phases[k - 1][1]:
                out.append(Violation("input_not_ready", f"{phase.phase}: transfer {t.name} phase {k} runs cycles "
                                                        f"{start}-{arrival}, but the phase before it arrives at "
                                                        f"{t.phases[k - 1][1]}"))
    records = [(op.name, op.stage, op.start_cycle, op.inputs, True) for op in phase.ops]
    records += [(t.name, t.stage, t.start_cycle, t.inputs, False) for t in phase.transfers]
    for name, stage, start, inputs, is_op in records:
        for i in inputs:
            if i not in done:
                out.append(Violation("input_not_ready", f"{phase.phase}: {name} needs {i}, which nothing produces"))
                continue
            where, cycle = done[i]
            if cycle > start:
                out.append(Violation("input_not_ready", f"{phase.phase}: {name} starts at cycle {start} but its input "
                                                        f"{i} is only ready at {cycle}"))
            if is_op and where != stage:
                out.append(Violation("input_not_ready", f"{phase.phase}: {name} runs on stage {stage} but its input {i} "
                                                        f"is on stage {where} and was never sent there"))
    placed = set().union(*stage_chips.values())
    for t in phase.transfers:
        if not set(t.chips) <= placed:
            out.append(Violation("input_not_ready", f"{phase.phase}: transfer {t.name} uses chips outside the placement"))
    # and on the right chips: a transfer delivers to the stage whose ops take it, from chips that hold its
    # inputs (an op's on its stage's chips, a transfer's on the chips it involves), and an op's transfers
    # reach every chip of its stage
    sent = {t.name: set(t.chips) for t in phase.transfers}
    holders = sent | {op.name: stage_chips.get(op.stage, set()) for op in phase.ops}
    for t in phase.transfers:
        if not set(t.receivers) <= stage_chips.get(t.stage, set()):
            out.append(Violation("input_not_ready", f"{phase.phase}: transfer {t.name} delivers to chips "
                                                    f"{sorted(set(t.receivers))}, not all of stage {t.stage}'s, whose "
                                                    f"ops take it"))
        if not set(t.senders) <= set().union(*(holders[i] for i in t.inputs if i in holders)):
            out.append(Violation("input_not_ready", f"{phase.phase}: transfer {t.name} sends from chips "
                                                    f"{sorted(set(t.senders))}, which do not all hold its inputs"))
    for op in phase.ops:
        for i in op.inputs:
            if i in sent and not stage_chips.get(op.stage, set()) <= sent[i]:
                out.append(Violation("input_not_ready", f"{phase.phase}: {op.name} runs on stage {op.stage}'s chips, "
                                                        f"but its input {i} reaches only chips {sorted(sent[i])}"))
    return out


def _partials_reduced(program: Program, phase: PhaseSchedule) -> list[Violation]:
    """On a stage of more than one chip, an op splitting its work so that each chip holds a partial result
    (partial sums of a row split, a share of the vocabulary's gather or argmax: NEEDS_ALL_REDUCE) is read only
    by its all-reduce: what reads the whole result reads that."""
    wide = {s.index for s in program.placement.stages if len(s.chips) > 1}
    partial = {op.name for op in phase.ops if op.stage in wide and suffix_role(op_suffix(op.name)) in NEEDS_ALL_REDUCE}
    readers = [(op.name, op.inputs) for op in phase.ops]
    readers += [(t.name, t.inputs) for t in phase.transfers if t.kind != "all_reduce"]
    return [Violation("input_not_ready", f"{phase.phase}: {name} reads {i}, each chip's partial result, not its "
                                         f"all-reduce")
            for name, inputs in readers for i in inputs if i in partial]


SAMPLERS = ("sample", CHAINED["head"])  # the suffixes of the ops picking a token: the sampler, a cut head's parts'


def _token_delivered(program: Program, phase: PhaseSchedule) -> list[Violation]:
    """The phase ends with the sampled token picked whole: the sampler's result that nothing reads (a cut head's
    parts combined into one), where each chip of its stage holds its share of the vocabulary's (value, index),
    picked by an all-reduce over them; and a decode step sends the token back to every stage holding part of the
    embedding, which the next step reads. Timing reads a token's latency off the makespan: all of it inside."""
    carried = {t.name: t.inputs for t in phase.transfers}
    read, reading = set(), [i for op in phase.ops for i in op.inputs]
    while reading:  # what ops read, directly or through transfers
        name = reading.pop()
        if name not in read:
            read.add(name)
            reading.extend(carried.get(name, ()))
    picked = [op for op in phase.ops if op_suffix(op.name) in SAMPLERS and op.name not in read]
    if len(picked) != 1:  # none: _graph reports the sampler missing
        return [Violation("input_not_ready", f"{phase.phase}: the sampler's parts {', '.join(op.name for op in picked)}"
                                             f" are never combined into one token")] if picked else []
    token, stages = picked[0], {s.index: s.chips for s in program.placement.stages}
    holder, chips = token.name, set(stages[token.stage])
    if len(chips) > 1 and suffix_role(op_suffix(token.name)) in NEEDS_ALL_REDUCE:
        holder = next((t.name for t in phase.transfers if t.kind == "all_reduce" and token.name in t.inputs
                       and set(t.chips) == chips), None)
        if holder is None:
            return [Violation("input_not_ready", f"{phase.phase}: {token.name} leaves each of stage {token.stage}'s "
                                                 f"{len(chips)} chips its share of the vocabulary's (value, index); no "
                                                 f"all-reduce over them picks the token")]
    if phase.phase != "decode":
        return []
    readers = defaultdict(list)
    for t in phase.transfers:
        for i in t.inputs:
            readers[i].append(t)
    sent, sending = set(), [holder]
    while sending:  # the chips the token reaches, through transfers of it and of those
        for t in readers[sending.pop()]:
            if t.name not in sent:
                sent.add(t.name)
                chips.update(t.receivers)
                sending.append(t.name)
    embedding = [s.index for s in program.placement.stages if any(part == "embed" for _, part, _, _ in s.pieces)]
    return [Violation("input_not_ready", f"{phase.phase}: the sampled token ({holder}) never reaches chips "
                                         f"{sorted(set(stages[k]) - chips)} of stage {k}, whose embedding the next "
                                         f"step reads there")
            for k in embedding if not set(stages[k]) <= chips]


def _received(t: Transfer) -> tuple[tuple[int, ...], float]:
    """The chips a transfer leaves new bytes on and how many each holds (TRANSFER_ENDS): the payload, a
    rank's share of it, the other ranks' shares (an all-gather, beside the chip's own), or none where it
    works in place (an all-reduce, in its input's buffer)."""
    held = TRANSFER_ENDS[t.kind][2]
    if held == "none":
        return (), 0.0
    receivers = t.receivers
    share = t.payload_bytes / len(receivers)
    return receivers, {"whole": t.payload_bytes, "share": share, "others' shares": t.payload_bytes - share}[held]


def static_sram_bytes(program: Program) -> dict[int, float]:
    """What each chip holds for the whole run: its weight shards and its stage's KV cache."""
    static = defaultdict(float)
    for sh in program.placement.shards:
        static[sh.chip] += sh.nbytes
    for s in program.placement.stages:
        for c in s.chips:
            static[c] += s.kv_bytes_per_chip
    return static


def _sram(program: Program, phase: PhaseSchedule, static: dict[int, float]) -> list[Violation]:
    capacity = program.system.chip.sram_bytes
    # live activations: a result is held from its producer's start until its last consumer ends
    last_use: dict[str, int] = {}
    attention = {op.name for op in phase.ops if op.kind == "attention"}
    for op in phase.ops:
        chunk, end = split_chunk(op.name)[0], op.end_cycle
        for i in op.inputs:
            if op.name in attention and i in attention and split_chunk(i)[0] not in (chunk, None):
                continue  # an earlier prompt chunk's attention: this one orders on the KV it wrote, not its output
            if last_use.get(i, -1) < end:
                last_use[i] = end
    for t in phase.transfers:
        for i in t.inputs:
            last_use[i] = max(last_use.get(i, 0), t.arrival_cycle)
    # an all-reduce works in place, and an all-gather around each chip's share: its result keeps its input alive
    for t in reversed(phase.transfers):
        if TRANSFER_ENDS[t.kind][2] in ("none", "others' shares"):
            for i in t.inputs:
                last_use[i] = max(last_use[i], last_use.get(t.name, t.arrival_cycle))
    stage_events = defaultdict(list)  # ops run on every chip of their stage: (cycle, +/- bytes)
    for op in phase.ops:
        end = max(op.end_cycle, last_use.get(op.name, op.end_cycle))
        stage_events[op.stage] += [(op.start_cycle, op.output_bytes_per_chip), (end, -op.output_bytes_per_chip)]
    chip_events = defaultdict(list)  # what transfers deliver to particular chips
    for t in phase.transfers:
        receivers, held = _received(t)
        end = max(t.arrival_cycle, last_use.get(t.name, t.arrival_cycle))
        for c in receivers:
            chip_events[c] += [(t.start_cycle, held), (end, -held)]

    def peak(events) -> float:  # at the same cycle, frees (negative) come first
        return max(0.0, max(itertools.accumulate(delta for _, delta in sorted(events)), default=0.0))

    for events in stage_events.values():  # sorted once: each chip's merge with its own events is then linear
        events.sort()
    stage_peak: dict[tuple, float] = {}  # (stage, a chip's own events) -> the peak of the two together
    out = []
    for stage in program.placement.stages:
        for chip in stage.chips:
            # the chips of a group mostly receive alike (collectives, stripes): each mix of events is swept once
            key = (stage.index, tuple(sorted(chip_events.get(chip, ()))))
            if key not in stage_peak:
                stage_peak[key] = peak(stage_events[stage.index] + list(key[1]))
            live = stage_peak[key]
            if static[chip] + live > capacity:
                out.append(Violation("sram_capacity", f"{phase.phase}: chip {chip} needs "
                                                      f"{(static[chip] + live) / 1e6:.2f} MB of SRAM "
                                                      f"({static[chip] / 1e6:.2f} MB weights and KV, {live / 1e6:.2f} "
                                                      f"MB activations) but holds {capacity / 1e6:.2f} MB"))
    return out


def _reserved(program: Program, static: dict[int, float]) -> list[Violation]:
    """Each chip's weights and KV cache (`static`: static_sram_bytes), and the activation buffers its stage
    reserves (what timing reports as its SRAM in use), fit the chip."""
    capacity, out = program.system.chip.sram_bytes, []
    for stage in program.placement.stages:
        fullest = max(stage.chips, key=static.__getitem__, default=None)  # none: reported by _structure
        if fullest is not None and static[fullest] + stage.activation_bytes_per_chip > capacity:
            out.append(Violation("sram_capacity", f"stage {stage.index} reserves "
                                                  f"{stage.activation_bytes_per_chip / 1e6:.2f} MB of activation "
                                                  f"buffers per chip beside chip {fullest}'s "
                                                  f"{static[fullest] / 1e6:.2f} MB of weights and KV, but a chip's "
                                                  f"SRAM holds {capacity / 1e6:.2f} MB"))
    return out


def _kv_reserved(program: Program) -> list[Violation]:
    """Each stage reserves, per chip, the KV cache its attention pieces keep: for every user and slot,
    the K and V rows that chip's shards of the layer's K and V projections produce."""
    if program.kv_slots != _kv_slots_model(program):
        return []  # reported by _structure
    rows: dict[tuple[int, str], int] = defaultdict(int)  # (chip, tensor) -> output rows it holds
    for sh in program.placement.shards:
        rows[(sh.chip, sh.tensor)] += sh.stop - sh.start
    per_slot = program.workload.users * as_precision(program.workload.kv).bytes_per_element
    out = []
    for stage in program.placement.stages:
        ranges = [(item, *_attention_slots(program, item, lo, hi)) for item, part, lo, hi in stage.pieces
                  if part == "attn"]
        for chip in stage.chips:
            need = sum(math.ceil(per_slot * (hi - lo) * (rows[(chip, f"blk.{item}.attn_k.weight")]
                                                          + rows[(chip, f"blk.{item}.attn_v.weight")]))
                       for item, lo, hi in ranges)
            if need > stage.kv_bytes_per_chip:
                out.append(Violation("sram_capacity", f"stage {stage.index} reserves "
                                                      f"{stage.kv_bytes_per_chip / 1e6:.2f} MB of KV cache per chip, "
                                                      f"but chip {chip}'s K and V rows of layers "
                                                      f"{list(stage.attention_layers)} need {need / 1e6:.2f} MB for "
                                                      f"{counted(program.workload.users, 'user')} and their slots"))
                break
    return out


def _weights(program: Program) -> list[Violation]:
    out = []
    chips = set(program.placement.chips)
    by_tensor = defaultdict(list)
    for sh in program.placement.shards:
        by_tensor[sh.tensor].append(sh)
    for name in sorted(set(by_tensor) - set(program.tensors)):
        out.append(Violation("weight_placement", f"shards of {name}, which the model does not have"))
    for name, shape in program.tensors.items():
        shards = by_tensor.get(name, [])
        if not shards:
            out.append(Violation("weight_placement", f"{name} is not placed on any chip"))
            continue
        axes = {sh.axis for sh in shards}
        axis = min(axes)
        if len(axes) != 1 or not _on_an_axis(name, shape, axis):
            out.append(Violation("weight_placement", f"{name} is split along inconsistent axes {sorted(axes)}"))
            continue
        dim = axis_length(name, shape, axis)
        split = EXPERT_ROWS if program.placement.experts and is_expert_tensor(name) else (split_rule(name) or (None,))[0]
        if axis != split and any(sh.stop - sh.start < dim for sh in shards):  # a whole tensor's axis is moot
            along = "is not split" if split is None else f"is split along axis {split}"
            out.append(Violation("weight_placement", f"{name} is divided along axis {axis}, but it {along} where "
                                                     f"its ops run (SPLIT_RULES)"))
            continue
        for sh in shards:
            if sh.chip not in chips:
                out.append(Violation("weight_placement", f"{name} has a shard on chip {sh.chip}, outside the placement"))
            if not 0 <= sh.start < sh.stop <= dim:
                out.append(Violation("weight_placement", f"{name} shard [{sh.start}, {sh.stop}) on chip {sh.chip} is "
                                                         f"outside [0, {dim})"))
        # sweep: coverage of [0, dim) and copies, counting unflagged and flagged shards apart; the shards
        # covering [a, b), between two of the points, are those opened at or before a and not yet closed
        points = sorted({0, dim} | {sh.start for sh in shards} | {sh.stop for sh in shards})
        opening = sorted((sh for sh in shards if sh.start < sh.stop), key=lambda sh: sh.start)
        closing = sorted(opening, key=lambda sh: sh.stop)
        inside = plain = opened = closed = 0
        for a, b in zip(points, points[1:]):
            while opened < len(opening) and opening[opened].start <= a:
                inside, plain = inside + 1, plain + (not opening[opened].replicated)
                opened += 1
            while closed < len(closing) and closing[closed].stop <= a:
                inside, plain = inside - 1, plain - (not closing[closed].replicated)
                closed += 1
            if not inside:
                out.append(Violation("weight_placement", f"{name} elements [{a}, {b}) along axis are placed nowhere"))
            elif plain > 1:
                chips_of = sorted(sh.chip for sh in opening if sh.start <= a and b <= sh.stop)
                out.append(Violation("weight_placement", f"{name} elements [{a}, {b}) are placed {inside} times "
                                                         f"(chips {chips_of}) without being flagged as replicated"))
    return out


def _shards_on_their_stages(program: Program) -> list[Violation]:
    """A shard is useful only on a stage that runs its tensor's ops: the one holding its piece, and for
    a cut tensor the part whose rows it holds (tensor names say the piece; the stages say where it is)."""
    n = program.spec.n_layers
    homes, out = piece_homes(program.placement), []
    chips_of = {s.index: s.chips for s in program.placement.stages}
    by_expert = program.placement.experts
    units = ffn_units(program.tensors, by_expert)

    def places_of(tensor: str, head_copy: bool):
        """The tensor's piece, the stages holding it with the rows each holds, those rows per chip, and whether
        its shards hold rows of a cut piece (else every chip of the stages holds its share)."""
        item, part = tensor_piece(tensor, n)
        places = list(homes.get((item, part), ()))
        if head_copy:  # a tied table's copy for the head
            places += homes.get((n, "head"), [])
        if is_cut_along_ffn(tensor):  # a piece's units as this tensor's rows (or expert rows)
            places = [(k, *cut_range(tensor, program.tensors[tensor], lo, hi, units[item], by_expert)[1:])
                      for k, lo, hi in places]
        on_chip = defaultdict(list)
        for k, lo, hi in places:
            for chip in chips_of[k]:
                on_chip[chip].append((lo, hi))
        return part, places, on_chip, is_cut_along_ffn(tensor) or is_cut_along_vocab(tensor)

    known = {}  # one lookup per tensor, not per shard: a finely cut MLP has a part on thousands of stages
    for sh in program.placement.shards:
        if sh.tensor not in program.tensors:
            continue  # reported by _weights
        key = (sh.tensor, sh.tensor == "token_embd.weight" and sh.replicated)
        if key not in known:
            known[key] = places_of(*key)
        part, places, on_chip, cut = known[key]
        if sh.chip in on_chip and (not cut or any(lo <= sh.start and sh.stop <= hi for lo, hi in on_chip[sh.chip])):
            continue
        rows = f" rows [{sh.start}, {sh.stop})" if cut else ""
        held = ", ".join(f"stage {k}" + (f" rows [{lo}, {hi})" if cut else "") for k, lo, hi in places) or "no stage"
        out.append(Violation("weight_placement", f"{sh.tensor}{rows} is on chip {sh.chip}, but its {part} piece "
                                                 f"is held by {held}"))
    # and each stage holds what its pieces run on: its chips' shards of each of their tensors cover the piece's
    # rows of a cut tensor and all of any other (one applied after a cut piece's parts: on the last part's
    # stage; a tied table's head rows: on the head's stages)
    stage_of = {c: k for k, chips in chips_of.items() for c in chips}
    covered, axis_of = defaultdict(list), {}  # (tensor, stage) -> the [start, stop) its chips hold; tensor -> axis
    for sh in program.placement.shards:
        if sh.chip in stage_of:
            covered[(sh.tensor, stage_of[sh.chip])].append((sh.start, sh.stop))
            axis_of[sh.tensor] = sh.axis
    tied = "output.weight" not in program.tensors
    for name, shape in program.tensors.items():
        if name not in axis_of or not _on_an_axis(name, shape, axis_of[name]):
            continue  # placed nowhere or on no axis: reported by _weights
        part, places, _, cut = known.get((name, False)) or places_of(name, False)
        places = places[-1:] if name.endswith(APPLIED_BY_LAST_PART) else places
        if tied and name == "token_embd.weight":
            places = places + homes.get((n, "head"), [])
        whole = (0, axis_length(name, shape, axis_of[name]))
        for k, lo, hi in places:
            want = (lo, hi) if cut else whole
            if not _covers(covered[(name, k)], *want):
                what = f"rows [{lo}, {hi}) of" if cut else "all of"
                out.append(Violation("weight_placement", f"stage {k} runs {name}'s {part} piece, but its chips do "
                                                         f"not hold {what} it"))
    return out


# suffix -> what a chip's rows of a split tensor must match on the chip (_shards_line_up): an MLP's gate and up
# make the d_ff rows its down projection sums (per kind of MLP: plain, experts, shared); an attention's query rows
# are the heads whose outputs its output projection takes; its K and V rows, the KV heads those heads read
MATCHED_ROWS = {suffix: "ffn" + next((kind for kind in ("_exps", "_shexp") if kind in suffix), "")
                if suffix.startswith("ffn_") else f"{unit}s" for suffix, (_, unit) in SPLIT_RULES.items()
                if suffix.startswith(("ffn_", "attn_"))}


def _shards_line_up(program: Program) -> list[Violation]:
    """Each chip holds matching rows of the tensors it multiplies one after the other (MATCHED_ROWS): its MLP's
    gate, up and down projections the same d_ff rows, its attention's query and output projections the same
    heads, its keys and values the same KV heads, those its query heads read. Coverage per stage
    (_shards_on_their_stages) does not see two chips' shards of one tensor swapped; the sharded executor then
    computes other numbers (a review found it)."""
    spec, stage_of = program.spec, {c: s.index for s in program.placement.stages for c in s.chips}
    matched = {}  # (tensor, axis) -> (layer, what must match, the axis's length), or None: no such rows to match
    # (stage, layer, what must match) -> tensor -> chip -> the [start, stop) of its shards, as fractions of their
    # axis (a division rounds alike the fractions that are equal, so they compare as floats)
    held = defaultdict(lambda: defaultdict(lambda: defaultdict(list)))
    for sh in program.placement.shards:
        if (key := (sh.tensor, sh.axis)) not in matched:
            what = MATCHED_ROWS.get(sh.tensor.split(".", 2)[-1]) if sh.tensor.startswith("blk.") else None
            shape = program.tensors.get(sh.tensor)
            matched[key] = ((sh.tensor.split(".")[1], what, axis_length(sh.tensor, shape, sh.axis))
                            if what and shape and _on_an_axis(sh.tensor, shape, sh.axis) else None)  # a whole
            # tensor's shards may lie on any axis; others are reported by _weights
        if (found := matched[key]) is not None and (stage := stage_of.get(sh.chip)) is not None:
            layer, what, length = found
            held[(stage, layer, what)][sh.tensor][sh.chip].append((sh.start / length, sh.stop / length))
    out, chips_of = [], {s.index: s.chips for s in program.placement.stages}
    for (stage, layer, what), by_tensor in sorted(held.items()):
        first, *others = sorted(by_tensor)
        for chip in chips_of[stage]:
            rows = _merged(by_tensor[first].get(chip, []))  # a copy flagged replicated adds no rows
            if wrong := next((t for t in others if _merged(by_tensor[t].get(chip, [])) != rows), None):
                out.append(Violation("weight_placement", f"chip {chip} holds {_spans(rows)} of {first} but "
                                                         f"{_spans(_merged(by_tensor[wrong].get(chip, [])))} of "
                                                         f"{wrong}, which it multiplies with them"))
                break
        if what != "kv_heads" or (stage, layer, "heads") not in held:
            continue
        q, k = held[(stage, layer, "heads")][f"blk.{layer}.attn_q.weight"], by_tensor[f"blk.{layer}.attn_k.weight"]
        group, tolerance = spec.n_heads // spec.n_kv_heads, 1e-9  # the float fractions of whole heads
        for chip in chips_of[stage]:
            read = {h // group for start, stop in q.get(chip, [])
                    for h in range(math.floor(start * spec.n_heads + tolerance),
                                   math.ceil(stop * spec.n_heads - tolerance))}
            kept = {h for start, stop in k.get(chip, [])
                    for h in range(math.ceil(start * spec.n_kv_heads - tolerance),
                                   math.floor(stop * spec.n_kv_heads + tolerance))}
            if not read <= kept:
                out.append(Violation("weight_placement", f"chip {chip}'s query heads read KV heads "
                                                         f"{sorted(read - kept)} of layer {layer}, whose keys and "
                                                         f"values it does not hold"))
                break
    return out


def _merged(spans: list[tuple]) -> list[tuple]:
    """[start, stop) spans with those that touch or overlap joined, in order."""
    if len(spans) < 2:  # most chips hold one shard of a tensor
        return spans
    out = []
    for start, stop in sorted(spans):
        if out and start <= out[-1][1]:
            out[-1] = (out[-1][0], max(out[-1][1], stop))
        else:
            out.append((start, stop))
    return out


def _spans(spans: list[tuple[float, float]]) -> str:
    """Shards' spans as fractions of their axis: 'rows [1/2, 1)', or 'no rows'."""
    def fraction(x: float) -> fractions.Fraction:
        return fractions.Fraction(x).limit_denominator(1 << 24)  # an axis is shorter
    return ", ".join(f"rows [{fraction(a)}, {fraction(b)})" for a, b in spans) or "no rows"


@functools.lru_cache(maxsize=8)
def _lowered(spec, workload, phase: str, tokens: int, rows: int) -> dict:
    """The model's graph (graph.lower) for a decode step of `rows` users, each with its drafts, attending
    `tokens` (the context), or a prompt chunk of `tokens` with none before it: op name -> op. _graph and _work
    read the same ones."""
    queries = workload.draft_tokens + 1 if phase == "decode" else 1
    return {op.name: op for op in lower(spec, phase, tokens, rows, workload.weights, kv_precision=workload.kv,
                                        act_precision=workload.activations, queries=queries)}


def _graph(program: Program, phase: PhaseSchedule) -> list[Violation]:
    """The phase computes the model: each op is an op of its graph (graph.lower, from the Program's spec; in a
    prompt chunk, the chunk's graph; the head only in the last chunk: logits only for the prompt's last token), of
    its kind and on its unit, named as the placement holds its piece: once under its own name where the piece is
    whole or the op is applied once, on the last part (ONCE_ON_LAST_PART); else once per part, part j
    '<name>@j' (the plain name for part 0) on part j's stage. Each reads, through transfers, what the graph says
    it reads: within a cut piece, its own part's result; otherwise the whole result (`read`). The parts of the
    op a cut piece combines are combined by a tree of two-input ops reading each part and each combination but
    the last once (_combinations). No other op runs. A prompt chunk's attention may also read the chunk
    before's (whose KV it reads)."""
    spec, w, n = program.spec, program.workload, program.spec.n_layers
    if phase.phase == "decode":  # its ops are named and wired alike for any micro-batch
        graph = dict(_lowered(spec, w, "decode", w.attended_context, 1))
    else:  # every chunk's ops are named and wired alike, but for their prefix
        lowered = _lowered(spec, w, "prefill", min(w.chunk_tokens, w.prompt_len), 1).values()
        last = -(-w.prompt_len // w.chunk_tokens) - 1
        graph = {chunk_name(c, op.name): op for c in range(last + 1) for op in lowered
                 if c == last or _op_piece(op.name, n) != (n, "head")}
    homes = piece_homes(program.placement)
    piece = {name: _op_piece(split_chunk(name)[1], n) for name in graph}
    parts = {name: len(homes.get(piece[name], ())) for name in graph}
    per_part = {name: parts[name] > 1 and op_suffix(name) not in ONCE_ON_LAST_PART for name in graph}
    expected = {}  # record name -> (graph op, part (None: run once), stage it runs on (None: any of the piece's))
    combined = {}  # a cut piece's combined op -> the names of the ops combining its parts
    for name, op in graph.items():
        places = homes.get(piece[name], [])
        if not per_part[name]:
            expected[name] = (name, None, places[-1][0] if places else None)
            continue
        expected |= {_part_name(name, j): (name, j, stage) for j, (stage, _, _) in enumerate(places)}
        if combines_parts(op, piece[name][1]):
            combined[name] = [chained_name(name, CHAINED[piece[name][1]], m) for m in range(1, len(places))]
            expected |= {c: (name, None, None) for c in combined[name]}
    roots = {}  # a combined op -> the op completing its parts' combination

    def read(name: str, reader: str, part: int | None) -> str | None:
        """The record whose result an op (graph op `reader`, its piece's part `part`, or None: run once) reads for
        graph op `name`: part `part`'s own where both run per part of one piece; a cut piece's combined result;
        a once-run op of the piece, the last part's (the MoE routing every part computes); where the result is
        whole, the op's own. None: a part of a result no op combines, which only its piece's parts can read."""
        if not per_part.get(name):
            return name
        same = piece[name] == piece[reader]
        if same and part is not None:
            return _part_name(name, part)
        if name in roots:
            return roots[name]
        return _part_name(name, parts[name] - 1) if same else None

    carried = {t.name: t.inputs[0] for t in phase.transfers if t.inputs}

    def source(name: str) -> str:
        """The op whose result a record is or carries (through transfers)."""
        seen = set()
        while name in carried and name not in seen:  # a loop is _inputs_ready's to report
            seen.add(name)
            name = carried[name]
        return name

    out, ran, by_name = [], set(), {op.name: op for op in phase.ops}
    for name, combining in combined.items():
        root, wrong = _combinations(name, len(combining) + 1, [by_name[c] for c in combining if c in by_name], source)
        roots[name] = root or combining[-1]  # its readers read the last (the tree's fault is reported once)
        out += [Violation("structure", f"{phase.phase}: {message}") for message in wrong]
    for op in phase.ops:
        if op.name not in expected:
            out.append(Violation("structure", f"{phase.phase}: {op.name} is not an op of the model's graph as the "
                                              f"placement holds its piece"))
            continue
        ran.add(op.name)
        name, part, stage = expected[op.name]
        if part is None and name in combined:
            continue  # a combining op: _combinations
        if stage is not None and op.stage != stage:
            out.append(Violation("weight_placement", f"{phase.phase}: {op.name} runs on stage {op.stage}; the stage "
                                                     f"holding its part of the piece is {stage}"))
        prefix, base = split_chunk(name)
        if (op.kind, op.unit) != (graph[name].kind, graph[name].unit):
            out.append(Violation("structure", f"{phase.phase}: {op.name} runs as {op.kind} on the {op.unit} unit; the "
                                              f"model's {base} is {graph[name].kind} on {graph[name].unit}"))
        reads = [chunk_name(prefix, i) if prefix is not None else i for i in graph[name].inputs]
        want = {read(i, name, part) for i in reads}
        got = {source(i) for i in op.inputs}
        if prefix and graph[name].kind == "attention":  # it may read the KV the chunk before wrote
            got.discard(read(chunk_name(prefix - 1, base), name, part))
        if got != want:
            wanted = ", ".join(sorted(map(str, want))) or "nothing"
            out.append(Violation("structure", f"{phase.phase}: {op.name} reads {', '.join(sorted(got)) or 'nothing'}; "
                                              f"the model's {base} reads {wanted}"))
    if missing := sorted(set(expected) - ran):
        out.append(Violation("structure", f"{phase.phase}: the model's {missing[0]} never runs"
                                          + (f" (and {len(missing) - 1} more ops)" if len(missing) > 1 else "")))
    return out


def _part_name(name: str, j: int) -> str:
    """Part j's op of a graph op of a cut piece: 'blk.3.ffn_gate@2' (part 0 keeps the plain name)."""
    return name if j == 0 else f"{name}{CUT_SEPARATOR}{j}"


def _combinations(name: str, parts: int, ops: list, source: Callable[[str], str]) -> tuple[str | None, list[str]]:
    """The op completing the combination of graph op `name`'s `parts` parts (None where they are not combined
    so), and what is wrong: the combining ops (`ops`, those of the phase) each read two results, the parts' and
    the combinations', and each part and each combination but the last is read once."""
    leaves = [_part_name(name, j) for j in range(parts)]
    read = collections.Counter(source(i) for op in ops for i in op.inputs)
    wrong = [f"{op.name} combines {counted(len(op.inputs), 'result')}; a combination reads two" for op in ops
             if len(op.inputs) != 2]
    if stray := sorted(set(read) - set(leaves) - {op.name for op in ops}):
        wrong.append(f"{name}'s parts are combined with {stray[0]}, which is not one of them")
    unread = [op.name for op in ops if not read[op.name]]
    if len(unread) == 1 and not wrong and read == collections.Counter(leaves + [op.name for op in ops
                                                                                  if op.name != unread[0]]):
        return unread[0], []
    return None, wrong or [(f"{name}'s {parts} parts are not combined once each: the combining ops read "
                            f"{', '.join(f'{k} x{v}' for k, v in sorted(read.items()))}")]


COMBINING = frozenset(CHAINED.values())  # the last part of a combining op's name ('blk.3.ffn_sum@2')


def _combines(base: str) -> bool:
    """Whether an op of this name (_graph_name's base) combines a cut piece's parts' results ('blk.3.ffn_sum')."""
    return base.rsplit(".", 1)[-1] in COMBINING


def _origins(phase: PhaseSchedule) -> Callable[[str], str]:
    """A function naming the graph op whose result a record of the phase is (an op: its own name's), carries (a
    transfer: its first input's) or combines (a combining op: its parts'). A record carrying nothing, or a chain
    of records coming back on itself (which _names and _inputs_ready report), is no op's result."""
    sources = {t.name: t.inputs for t in phase.transfers}
    sources |= {op.name: op.inputs for op in phase.ops if _combines(_graph_name(op.name)[1])}
    origins = {}

    def origin(name: str) -> str:
        chain = []
        while name in sources and name not in origins and name not in chain and sources[name]:
            chain.append(name)
            name = sources[name][0]
        if name in origins:
            found = origins[name]
        elif name in sources:
            found = f"no op's result ({name})"
        else:
            found = name.split(CUT_SEPARATOR)[0]
        origins.update(dict.fromkeys(chain, found))
        return found

    return origin


def _largest_shards(program: Program) -> dict[tuple[int, str], int]:
    """(stage, tensor) -> the bytes of the tensor's largest shard on one chip of the stage: what that chip
    installs for an op multiplying by it."""
    stage_of = {c: s.index for s in program.placement.stages for c in s.chips}
    largest = {}
    for sh in program.placement.shards:
        if sh.chip in stage_of and sh.nbytes > largest.get(key := (stage_of[sh.chip], sh.tensor), 0):
            largest[key] = sh.nbytes
    return largest


def _work(program: Program, phase: PhaseSchedule, origin: Callable[[str], str],
          largest: dict[tuple[int, str], int]) -> list[Violation]:
    """No op records less work than the model's op it runs. Over its parts, each counted on every chip of its
    TP group, it has at least the graph's operations and SRAM bytes (its weights and the keys and values it
    reads), and at least the cycles its chips take to install its weights (a matrix op) or the keys and values
    its queries stream through (attention) at the chip's install rate, where a KV head, split no further,
    counts once for the chips sharing it (each installs it whole): the weight-stationary matrix unit's bound,
    which sets a decode step's time; a matrix op, too, at least the cycles one chip of its stage takes to install
    its shard of the weight (`largest`: _largest_shards), on a chip holding more than its share; and it holds at
    least the graph op's output (what SRAM is checked for).
    A decode step's graph is lowered for the users its micro-batch carries (so it cannot claim more than
    its ops work for), a prompt chunk's with no tokens before it (those only add keys to read). No transfer
    carries less than the result it carries (_payloads; `origin`: _origins')."""
    spec, w, chip = program.spec, program.workload, program.system.chip
    if phase.phase == "decode":
        rows = phase.tokens if 1 <= phase.tokens <= w.users else 1  # one outside that: reported by _structure
        graphs = {"": _lowered(spec, w, "decode", w.attended_context, rows)}
    else:
        graphs = {chunk_name(c, ""): _lowered(spec, w, "prefill", length, 1)
                  for c, (_, length) in enumerate(prefill_chunks(w))}
    widths = {s.index: len(s.chips) for s in program.placement.stages}
    # prefixed graph op -> operations, SRAM bytes, install cycles, output bytes
    recorded = defaultdict(lambda: [0.0, 0.0, 0, 0.0])
    out = []
    for op in phase.ops:
        prefix, base = _graph_name(op.name)
        if base not in graphs.get(prefix, ()) or op.stage not in widths:
            continue  # a combining op, or one _graph or _structure reports
        t, sums, g = widths[op.stage], recorded[prefix + base], graphs[prefix][base]
        shard = largest.get((op.stage, g.weight), 0) if g.unit == "matrix" and g.weight else 0
        if (op.end_cycle - op.start_cycle) * chip.matrix_install_bytes_per_cycle + 1 < shard:  # a byte: rounding
            out.append(Violation("unit_overlap", f"{phase.phase}: {op.name} runs {op.end_cycle - op.start_cycle:,} "
                                                 f"cycles; a chip of stage {op.stage} installs {shard:,} bytes of "
                                                 f"{g.weight} in it, which take "
                                                 f"{math.ceil(shard / chip.matrix_install_bytes_per_cycle):,}"))
        sums[0] += op.flops_per_chip * t
        sums[1] += op.sram_bytes_per_chip * t
        rule = split_rule(g.weight) if g.weight else None
        by_kv_head = g.kind == "attention" or rule is not None and rule[1] == "kv_head"
        sums[2] += (op.end_cycle - op.start_cycle) * (min(t, spec.n_kv_heads) if by_kv_head else t)
        sums[3] += op.output_bytes_per_chip * t
    for name, (flops, sram_bytes, cycles, output) in recorded.items():
        prefix, base = _graph_name(name)
        g = graphs[prefix][base]
        installed = (g.weight_bytes if g.unit == "matrix" and g.weight
                     else g.kv_read_bytes if g.kind == "attention" else 0)
        least = {"operations": (flops, g.flops), "SRAM bytes": (sram_bytes, g.weight_bytes + g.kv_read_bytes),
                 "install cycles": (cycles, installed / chip.matrix_install_bytes_per_cycle),
                 "output bytes": (output, g.act_write_bytes)}
        for what, (got, want) in least.items():
            if got < want * (1 - RATE_TOLERANCE):
                out.append(Violation("structure" if what != "install cycles" else "unit_overlap",
                                     f"{phase.phase}: {name} records {got:,.0f} {what} over its parts' chips; the "
                                     f"model's {base} takes {want:,.0f} at the least"))
    return out + _payloads(program, phase, graphs, origin)


def _payloads(program: Program, phase: PhaseSchedule, graphs: dict,
              origin: Callable[[str], str]) -> list[Violation]:
    """No transfer carries fewer bytes than the result it carries (what its links are checked for): its graph
    op's output (`graphs`, per prompt chunk prefix), or a sampler's, its tokens' ids (a cut head's parts send
    their (value, index) pairs, twice that; the token goes back to the embedding alone)."""
    out = []
    for t in phase.transfers:
        prefix, base = _graph_name(origin(t.name))
        g = graphs.get(prefix, {}).get(base)
        if g is None:
            continue  # no op's result: reported by _graph
        argmax = suffix_role(op_suffix(base)) == "argmax"
        least = TOKEN_ID_BYTES * g.shape[0] / program.spec.vocab_size if argmax else g.act_write_bytes
        if t.payload_bytes < least * (1 - RATE_TOLERANCE):
            out.append(Violation("structure", f"{phase.phase}: transfer {t.name} carries {t.payload_bytes:,.0f} "
                                              f"bytes; the model's {base}, whose result it carries, makes "
                                              f"{least:,.0f} at the least"))
    return out


def _graph_name(name: str) -> tuple[str, str]:
    """'c1/blk.3.ffn_gate@2' -> ('c1/', 'blk.3.ffn_gate'): an op's prompt chunk prefix and the graph op it runs."""
    prefix, sep, rest = name.partition("/")
    return (prefix + sep, rest.split(CUT_SEPARATOR, 1)[0]) if sep else ("", prefix.split(CUT_SEPARATOR, 1)[0])


def _ops_on_their_pieces(program: Program, phase: PhaseSchedule) -> list[Violation]:
    """Each op runs on a stage that holds its piece (read off its name: a layer's op its attention or MLP half,
    token_embd and the sum of a split embedding's parts the embedding, the rest the head), so on the chips
    that hold the piece's weights."""
    n, out = program.spec.n_layers, []
    held = {s.index: {(item, part) for item, part, _, _ in s.pieces} for s in program.placement.stages}
    for op in phase.ops:
        piece = _op_piece(split_chunk(op.name)[1], n)
        if piece not in held.get(op.stage, ()):
            out.append(Violation("weight_placement", f"{phase.phase}: {op.name} runs on stage {op.stage}, which holds "
                                                     f"no part of piece {piece}"))
    return out


@functools.cache
def _op_piece(name: str, n_layers: int) -> tuple[int, str] | None:
    """(item, part) of the piece an op (its name without a chunk) works for: 'blk.3.ffn_gate@2' -> (3, 'ffn');
    None for a layer's op that names no layer."""
    base = name.split(CUT_SEPARATOR)[0]
    if not base.startswith("blk."):
        return (EMBED, "embed") if base in ("token_embd", CHAINED["embed"]) else (n_layers, "head")
    _, layer, suffix = (base.split(".", 2) + [""])[:3]
    return (int(layer), "ffn" if suffix.startswith(FFN_NAMES) else "attn") if layer.isdigit() else None


def _covers(spans: list[tuple[int, int]], lo: int, hi: int) -> bool:
    """Whether the [start, stop) spans together cover [lo, hi)."""
    reach = lo
    for start, stop in sorted(spans):
        if start > reach:
            break
        reach = max(reach, stop)
    return reach >= hi


# What each sender of a transfer of each kind puts on its links and each receiver takes off them, at least, to
# deliver its payload (a chip relaying others' bytes counts them too): all of it, one rank's share, or the other
# ranks' shares. Every chip of an all-reduce must send its own value of each element and receive one it lacks.
LEAST_CARRIED = {"p2p": ("whole", "whole"), "broadcast": ("whole", "whole"), "all_reduce": ("whole", "whole"),
                 "all_gather": ("share", "others' shares"), "rank_p2p": ("share", "share"),
                 "stripe": ("share", "share")}


def _payload_carried(phase: PhaseSchedule) -> list[Violation]:
    """Each transfer's links carry its payload (LEAST_CARRIED), so that the bandwidth the links are checked
    for is the bandwidth the payload takes; transfers alike (every layer's, every chunk's) are read once:
    a compiled Program's share their phases' links (ids of objects the Program keeps alive)."""
    out, short = [], {}
    for t in phase.transfers:
        key = (t.kind, t.chips, t.payload_bytes, tuple(id(links) for _, _, links in t.phases))
        if key not in short:
            short[key] = _short_of_payload(t)
        if short[key]:
            out.append(Violation("link_bandwidth", f"{phase.phase}: transfer {t.name} {short[key]}"))
    return out


def _short_of_payload(t: Transfer) -> str | None:
    """How a transfer's links fall short of carrying its payload (None: they carry it)."""
    sent, taken = defaultdict(float), defaultdict(float)
    for a, b, nbytes in t.link_loads():
        if nbytes < 0:
            return f"puts {nbytes:,.0f} bytes on link {a}->{b}"
        sent[a] += nbytes
        taken[b] += nbytes
    if len(set(t.chips)) < 2:
        return None  # nothing to move
    share = t.payload_bytes / len(t.receivers)
    amount = {"whole": t.payload_bytes, "share": share, "others' shares": t.payload_bytes - share}
    least_sent, least_taken = (amount[held] for held in LEAST_CARRIED[t.kind])
    for chips, moved, least, verb in ((t.senders, sent, least_sent, "sends"), (t.receivers, taken, least_taken,
                                                                              "receives")):
        for c in chips:
            if moved[c] < least * (1 - RATE_TOLERANCE):
                return (f"({t.kind}, {t.payload_bytes:,.0f} bytes) {verb} {moved[c]:,.0f} bytes on chip {c}'s links, "
                        f"less than the {least:,.0f} it must")
    members = set(t.chips)
    for k, (_, _, links) in enumerate(t.phases):  # a chip it only passes through sends on what it receives
        through = defaultdict(float)
        for a, b, nbytes in links:
            through[a] -= nbytes
            through[b] += nbytes
        for c, kept in through.items():
            if c not in members and abs(kept) > RATE_TOLERANCE * t.payload_bytes + 1e-9:
                verb = "leaves" if kept > 0 else "takes"  # more bytes in than out, or out than in
                return f"phase {k} {verb} {abs(kept):,.0f} bytes at chip {c}, which only relays it"
    return None


def _links(program: Program, phase: PhaseSchedule, figures: dict) -> list[Violation]:
    """Each link within its bandwidth, and each phase of a transfer no shorter than its links' hop latency
    and bytes allow; `figures`: each link's (_link_figures), filled as links are met."""
    clock, system = program.system.chip.clock_hz, program.system
    # a collective's phases load hundreds of links alike and every layer's repeats them: each distinct
    # load is swept once, for the most transfers in flight at once (the sum of 1 / seconds), and a link
    # is within its bandwidth if its bytes in each load at that load's peak are, summed (a bound on the
    # peak of their sum); only a link that bound does not clear is swept transfer by transfer
    spans_of = defaultdict(list)  # (a phase's link loads, its transfer's chips) -> the (start, arrival, transfer)
    for t in phase.transfers:  # spans carrying them
        members = frozenset(t.chips)
        for start, arrival, links in t.phases:
            spans_of[(links, members)].append((start, arrival, t.name))
    spans, peaks, out, held = list(spans_of.values()), [], [], set(program.placement.chips)
    carried = defaultdict(list)  # directed link -> (bytes, index in spans) of each load it is part of
    for load, ((links, members), spans_here) in enumerate(spans_of.items()):
        usable = []  # (link, bytes, bandwidth, hop latency in cycles) of the links the Program may use
        for a, b, nbytes in links:
            carried[(a, b)].append((nbytes, load))
            if (a, b) not in figures:
                figures[(a, b)] = _link_figures(system, held, a, b)
            if not isinstance(figures[(a, b)], str):
                usable.append(((a, b), nbytes, figures[(a, b)][0], figures[(a, b)][1] * clock))
        # a link sends its bytes in a phase's span less its hop's latency, which they spend in flight (_sending):
        # the load's longest hop taken off every span bounds each link's rate from above, where every span is
        # longer than it (else its links are swept one by one)
        longest = max((hop for *_, hop in usable), default=0.0)
        inverse = [clock / (arrival - longest - start) if arrival - longest > start else 0.0
                   for start, arrival, _ in spans_here]
        events = sorted([(s, 1, r) for (s, _, _), r in zip(spans_here, inverse)] +
                        [(e, 0, r) for (_, e, _), r in zip(spans_here, inverse)])
        level = peak = 0.0
        for _, starting, r in events:  # ends (0) sort before starts (1) at the same cycle
            level += r if starting else -r
            peak = max(peak, level)
        peaks.append(math.inf if any(start < arrival <= start + longest for start, arrival, _ in spans_here) else peak)
        # the load's phases take at least, for each link, the latency of the hops to its far end plus its bytes at
        # the link's bandwidth (one too short for the bytes alone is over the bandwidth, reported below)
        relayed = any(a not in members for (a, _), *_ in usable)  # else each link's latency is its own hop's
        reached = _hop_latencies({link: hop for link, _, _, hop in usable}, members) if relayed else None
        least, slowest, bytes_alone = 0.0, None, 0.0
        for link, nbytes, bandwidth, hop in usable:
            moving = nbytes / bandwidth * clock
            if (taken := (reached[link] if relayed else hop) + moving) > least:
                least, slowest = taken, link
            bytes_alone = max(bytes_alone, moving)
        short = next(((start, arrival, name) for start, arrival, name in spans_here
                      if bytes_alone * (1 - RATE_TOLERANCE) <= arrival - start < least * (1 - RATE_TOLERANCE)), None)
        if short:
            out.append((slowest, Violation("input_not_ready", f"{phase.phase}: transfer {short[2]} crosses link "
                                                              f"{slowest[0]}->{slowest[1]} in {short[1] - short[0]} "
                                                              f"cycles; the latency of the hops to {slowest[1]} "
                                                              f"and its bytes take {least:.1f}")))
    swept = {}
    for (a, b), loads in carried.items():
        if isinstance(figures[(a, b)], str):
            out.append(((a, b), Violation("link_bandwidth", f"{phase.phase}: {figures[(a, b)]}")))
            continue
        bandwidth, hop = figures[(a, b)][0], figures[(a, b)][1] * clock
        if sum(nbytes * peaks[load] for nbytes, load in loads) <= bandwidth * (1 + RATE_TOLERANCE):
            continue
        same = (tuple(loads), bandwidth, hop)  # the links of a group, loaded alike, are swept once
        if same not in swept:
            swept[same] = _over_bandwidth([(start, start + window, nbytes / (window / clock), name)
                                           for nbytes, load in loads for start, arrival, name in spans[load]
                                           if (window := _sending(start, arrival, hop))], bandwidth)
        if swept[same]:
            out.append(((a, b), Violation("link_bandwidth", f"{phase.phase}: link {a}->{b} carries {swept[same]}")))
    return [violation for _, violation in sorted(out, key=lambda found: found[0])]  # by link


def _hop_latencies(hops: dict[tuple[int, int], float], members: frozenset[int]) -> dict[tuple[int, int], float]:
    """Per link of a phase (its hop latency in `hops`), the least latency from a chip of the transfer (`members`)
    to the link's far end: a chip that only relays sends on what reached it over the phase's links into it (one
    nothing reaches is reported by _short_of_payload; its link counts its own hop). A member relaying others'
    shares as well as sending its own (a stripe's, between nodes) is bounded by its own hop alone: which bytes
    it relays is not recorded."""
    out_of = defaultdict(list)
    for a, b in hops:
        out_of[a].append((a, b))
    frontier = [(cycles, link) for link, cycles in hops.items() if link[0] in members]
    heapq.heapify(frontier)
    reached = {}
    while frontier:  # Dijkstra over links: the hop latencies are positive
        cycles, link = heapq.heappop(frontier)
        if link in reached:
            continue
        reached[link] = cycles
        if link[1] not in members:
            for onward in out_of[link[1]]:
                if onward not in reached:
                    heapq.heappush(frontier, (cycles + hops[onward], onward))
    return {link: reached.get(link, cycles) for link, cycles in hops.items()}


def _link_figures(system: SystemSpec, held: set[int], a: int, b: int) -> tuple[float, float] | str:
    """(bandwidth bytes/s, hop latency s) of the link from chip a to chip b, or why a Program holding the chips
    `held` cannot use it."""
    if a == b or not (0 <= a < system.max_chips and 0 <= b < system.max_chips) or system.route(a, b) != (a, b):
        return f"no link from chip {a} to chip {b}"
    if a not in held or b not in held:
        return f"link {a}->{b} runs through chip {min({a, b} - held)}, which the Program does not hold"
    link = system.links[system.link_kind(a, b)]
    return link.bandwidth_bytes_per_s, link.latency_s


def _sending(start: int, arrival: int, hop: float) -> float:
    """Cycles a link has to send a phase's bytes: its span less the hop's latency, which the last byte spends in
    flight. A span no longer than the latency is the latency check's to report (_links): its bytes are counted
    over the span, so one too short for its bytes alone is over the bandwidth. 0: a span of no length."""
    return arrival - start - hop if arrival - start > hop else max(0, arrival - start)


def _over_bandwidth(spans: list[tuple[int, int, float, str]], bandwidth: float) -> str | None:
    """What one link carries at the first moment its transfers, (start, arrival, bytes per second, name)
    each, exceed its bandwidth together (None if they never do)."""
    if len(spans) == 1:  # nothing shares the link: its own rate is all there is
        if spans[0][2] > bandwidth * (1 + RATE_TOLERANCE):
            return f"{spans[0][2] / 1e9:.2f} GB/s ({spans[0][3]}), over its {bandwidth / 1e9:.2f} GB/s"
        return None
    events = sorted([(s, 1, r, n) for s, _, r, n in spans] + [(e, 0, r, n) for _, e, r, n in spans])
    rate = 0.0
    for cycle, starting, r, name in events:  # ends (0) sort before starts (1) at the same cycle
        rate += r if starting else -r
        if starting and rate > bandwidth * (1 + RATE_TOLERANCE):
            return f"{rate / 1e9:.2f} GB/s at cycle {cycle} ({name}), over its {bandwidth / 1e9:.2f} GB/s"
    return None


@gc_paused
def verify(program: Program) -> list[Violation]:
    """Every invariant violated, in a fixed order (an empty list means the Program is sound)."""
    if unreadable := _names(program):  # what the other invariants are read off
        return unreadable
    shaped = _structure(program) + _sizes(program)
    static = static_sram_bytes(program)  # what each chip holds throughout, read by both SRAM checks
    out = shaped + _reserved(program, static) + _kv_reserved(program) + _weights(program)
    out += _shards_on_their_stages(program) + _shards_line_up(program)
    link_figures = {}  # the phases load mostly the same links
    largest = _largest_shards(program) if not shaped else {}
    for phase in (program.decode, program.prefill):
        out += _makespan(phase) + _ops_on_their_pieces(program, phase)
        if not shaped:  # else its workload may be any (a file's): the model's graph is not lowered for it
            out += _graph(program, phase) + _work(program, phase, _origins(phase), largest)
        out += (_unit_overlap(program, phase) + _inputs_ready(program, phase) + _partials_reduced(program, phase)
                + _token_delivered(program, phase)
                + _sram(program, phase, static) + _payload_carried(phase) + _links(program, phase, link_figures))
    return out


def verify_or_raise(program: Program) -> None:
    violations = verify(program)
    if violations:
        more = f" (and {len(violations) - 1} more)" if len(violations) > 1 else ""
        raise OpenLPUError(f"program fails verification: {violations[0].message}{more}")
