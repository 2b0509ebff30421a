"""The verifier passes sound Programs and catches each invariant broken on purpose."""

import dataclasses
import gzip
import hashlib
import itertools
import json
import math
import re
from collections import Counter, defaultdict
from fractions import Fraction

import pytest

from openlpu.compiler import Workload, compile_program, verify, verify_or_raise
from openlpu.compiler.program import HEADER_BYTES, MAGIC, Transfer, encode, load_program
from openlpu.errors import OpenLPUError
from openlpu.hardware.lpu import load_system
from openlpu.models.spec import load_preset

SYSTEM = load_system("lpu-v1")


@pytest.fixture(scope="module")
def program():
    return compile_program(load_preset("gemma-3-270m"), SYSTEM,
                           Workload(context_length=2048, prompt_len=200, prefill_chunk=128), chips=8)


@pytest.fixture(scope="module")
def cut():
    """More stages than Gemma 3 270M has halves: every MLP is cut between two stages."""
    # one chip per node: 8 global links join a rack's 9 nodes pairwise, 16 more its 144 links to other racks
    pipeline_only = dataclasses.replace(SYSTEM, node=dataclasses.replace(SYSTEM.node, chips=1,
                                                                         global_links_per_chip=24))
    return compile_program(load_preset("gemma-3-270m"), pipeline_only,
                           Workload(context_length=512, prompt_len=64, prefill_chunk=64), chips=40, tp=1)


def _invariants(program):
    return {v.invariant for v in verify(program)}


@pytest.mark.parametrize("name, chips", [("gemma-3-270m", None), ("gemma-3-270m", 8), ("qwen3-8b", None),
                                         ("mixtral-8x7b", None), ("gemma-2-9b", 64), ("mixtral-8x7b", 576),
                                         ("gemma-2-9b", 768)])
def test_sound_programs_pass(name, chips):
    p = compile_program(load_preset(name), SYSTEM, Workload(context_length=1024, prompt_len=300, users=2), chips)
    assert verify(p) == []
    verify_or_raise(p)


def _with_decode(program, ops=None, transfers=None):
    d = program.decode
    return dataclasses.replace(program, decode=dataclasses.replace(
        d, ops=tuple(ops if ops is not None else d.ops), transfers=tuple(transfers if transfers is not None else d.transfers)))


@pytest.mark.parametrize("name, precision, context, users", [
    ("mistral-7b", "int4", 512, 1), ("llama-2-7b", "int4", 512, 4), ("gemma-2-9b", "int8", 512, 4),
    ("llama-3.1-405b", "int8", 8192, 4), ("qwen3-30b-a3b", "fp16", 40960, 4)])
def test_prefill_stays_within_the_activations_reserved(name, precision, context, users):
    """Found by running `plan` over every preset, precision, context and 1 or 4 users: these placed with
    too little SRAM for their prefill, because a stage started the next prompt chunk while it still held
    the last one's buffers, and the verifier counted the order between two chunks' attentions (the KV
    the first wrote) as a live buffer, or a partial attention sent rank to rank as if each rank held
    every head's (Qwen3 30B-A3B, whose 32 heads of 128 are twice its model width)."""
    workload = Workload(weights=precision, activations=precision, kv=precision, context_length=context,
                        users=users, prompt_len=512)
    assert verify(compile_program(load_preset(name), SYSTEM, workload)) == []


def test_a_partial_sent_rank_to_rank_lands_on_each_receiving_rank():
    """A rank_p2p transfer leaves each rank of the receiving group its share of the heads: a share over
    a chip's SRAM is caught on those chips, never on the sending group's."""
    workload = Workload(weights="fp16", activations="fp16", kv="fp16", context_length=40960, users=4, prompt_len=512)
    p = compile_program(load_preset("qwen3-8b"), SYSTEM, workload)  # attention split along its KV slots
    sends = [t for t in p.prefill.transfers if t.kind == "rank_p2p"]
    assert sends and verify(p) == []
    group = sends[0].chips[len(sends[0].chips) // 2:]
    huge = dataclasses.replace(sends[0], payload_bytes=len(group) * SYSTEM.chip.sram_bytes)
    transfers = [huge if t is sends[0] else t for t in p.prefill.transfers]
    bad = dataclasses.replace(p, prefill=dataclasses.replace(p.prefill, transfers=tuple(transfers)))
    over = [v.message for v in verify(bad) if v.invariant == "sram_capacity"]
    assert sorted(int(m.split("chip ")[1].split()[0]) for m in over) == sorted(group)


def test_a_gathered_vector_is_one_copy_on_each_chip():
    """An all-gather lays the other ranks' shares beside the one a stripe left on each chip (the compiler
    chooses every address), so the gathered vector is one copy, as the partition reserves it. Gemma 7B at
    TP 2, 33 users and a 4,096-token prompt fills its second-to-last stage (part of the head) to within a
    prompt chunk's residual, which the verifier counted one and a half times (a random sweep found it). A
    gather's bytes still count: one too large for its chips is caught on them."""
    workload = Workload(context_length=4096, users=33, prompt_len=4096)
    p = compile_program(load_preset("gemma-7b"), SYSTEM, workload, tp=2)
    assert verify(p) == []
    gather = next(t for t in p.prefill.transfers if t.kind == "all_gather")
    huge = dataclasses.replace(gather, payload_bytes=2 * len(gather.chips) * SYSTEM.chip.sram_bytes)
    bad = dataclasses.replace(p, prefill=dataclasses.replace(
        p.prefill, transfers=tuple(huge if t is gather else t for t in p.prefill.transfers)))
    over = [v.message for v in verify(bad) if v.invariant == "sram_capacity"]
    assert sorted(int(m.split("chip ")[1].split()[0]) for m in over) == sorted(gather.chips)


def test_unit_running_two_ops_at_once(program):
    ops = list(program.decode.ops)
    # the second matrix op of stage 0 moved to start while the first still runs
    first, second = [i for i, o in enumerate(ops) if o.stage == 0 and o.unit == "matrix"][:2]
    start = ops[first].start_cycle
    ops[second] = dataclasses.replace(ops[second], start_cycle=start,
                                      end_cycle=start + ops[second].end_cycle - ops[second].start_cycle)
    assert "unit_overlap" in _invariants(_with_decode(program, ops=ops))


def test_unit_and_input_checks_hold_to_the_cycle(program):
    """At the boundary (a review found an off-by-one in either check passed every test): ops run back to back on
    a unit, and an op starts on the cycle its input is ready, in the sound Program; one cycle earlier is caught."""
    assert verify(program) == []
    ops = list(program.decode.ops)
    ready = {op.name: op.end_cycle for op in ops} | {t.name: t.arrival_cycle for t in program.decode.transfers}

    def earlier(k):
        return [dataclasses.replace(op, start_cycle=op.start_cycle - 1, end_cycle=op.end_cycle - 1) if i == k else op
                for i, op in enumerate(ops)]
    by_unit = defaultdict(list)
    for k, op in enumerate(ops):
        by_unit[(op.stage, op.unit)].append(k)
    # an op starting as the op before it on its unit ends, and one waiting on its input no longer than it must
    back_to_back = next(b for ks in by_unit.values() for a, b in itertools.pairwise(ks)
                        if ops[b].start_cycle == ops[a].end_cycle)
    on_time = next(k for k, op in enumerate(ops) if op.inputs and op.start_cycle == max(ready[i] for i in op.inputs))
    assert {v.invariant for v in verify(_with_decode(program, ops=earlier(back_to_back)))} >= {"unit_overlap"}
    assert {v.invariant for v in verify(_with_decode(program, ops=earlier(on_time)))} >= {"input_not_ready"}


def test_op_before_its_input_arrives(program):
    ops = list(program.decode.ops)
    i = next(k for k, o in enumerate(ops) if o.name == "blk.0.attn_q")
    ops[i] = dataclasses.replace(ops[i], start_cycle=0, end_cycle=ops[i].end_cycle - ops[i].start_cycle)
    assert "input_not_ready" in _invariants(_with_decode(program, ops=ops))


def test_op_on_a_stage_its_input_never_reached(program):
    ops = list(program.decode.ops)
    i = next(k for k, o in enumerate(ops) if o.stage == 1)
    # point it at the stage-0 result directly, skipping the send between the stages
    ops[i] = dataclasses.replace(ops[i], inputs=("blk.0.attn_norm",))
    messages = [v.message for v in verify(_with_decode(program, ops=ops))]
    assert any("never sent there" in m for m in messages)


def test_transfer_before_its_input_is_ready(program):
    transfers = list(program.decode.transfers)
    i = next(k for k, t in enumerate(transfers) if t.kind == "all_reduce")
    t = transfers[i]
    transfers[i] = dataclasses.replace(t, start_cycle=0, arrival_cycle=t.arrival_cycle - t.start_cycle)
    assert "input_not_ready" in _invariants(_with_decode(program, transfers=transfers))


def test_a_collective_phase_before_the_one_it_follows(program):
    transfers = list(program.decode.transfers)
    i = next(k for k, t in enumerate(transfers) if t.kind == "all_reduce" and len(t.phases) > 1)
    t = transfers[i]
    (s0, e0, first), (_, e1, second) = t.phases[:2]
    early = ((s0, e0, first), (s0, e1, second)) + t.phases[2:]  # the second step starts with the first
    transfers[i] = dataclasses.replace(t, phases=early)
    found = verify(_with_decode(program, transfers=transfers))  # on the links the first still sends on, too
    assert "phase 1" in next(v.message for v in found if v.invariant == "input_not_ready")
    # a record whose cycles its phases do not span
    transfers[i] = dataclasses.replace(t, arrival_cycle=t.arrival_cycle - 1)
    assert any("do not span" in v.message for v in verify(_with_decode(program, transfers=transfers)))


def test_sram_over_capacity(program):
    small = dataclasses.replace(program.system, chip=dataclasses.replace(program.system.chip, sram_bytes=50_000_000))
    found = verify(dataclasses.replace(program, system=small))
    assert any(v.invariant == "sram_capacity" for v in found)
    # the live-activation part alone: an op output larger than what is left
    ops = list(program.decode.ops)
    ops[3] = dataclasses.replace(ops[3], output_bytes_per_chip=SYSTEM.chip.sram_bytes)
    assert "sram_capacity" in _invariants(_with_decode(program, ops=ops))


def test_activation_buffers_reserved_beyond_the_chip(program):
    """What a stage reserves for activation buffers is reported as its SRAM in use, so it must fit beside its
    chips' weights and KV cache, even where the live activations the schedule makes are far fewer."""
    stages = list(program.placement.stages)
    stages[1] = dataclasses.replace(stages[1], activation_bytes_per_chip=10**12)
    found = verify(dataclasses.replace(program, placement=dataclasses.replace(program.placement, stages=tuple(stages))))
    assert [v.invariant for v in found] == ["sram_capacity"]
    assert found[0].message.startswith("stage 1 reserves 1000000.00 MB of activation buffers per chip beside chip ")


def test_a_workload_claiming_lengths_its_phases_were_not_scheduled_for(program):
    """Timing reads the tokens a decode step attends and the prompt's length off the workload: a file claiming a
    shorter decode context, or the schedule relabelled with a longer prompt, is refused."""
    shorter = dataclasses.replace(program, workload=dataclasses.replace(program.workload, decode_context=100))
    assert [v.message for v in verify(shorter)] == [
        "the decode phase is scheduled for 2,048 tokens, not the 100 tokens its workload attends"]
    longer = dataclasses.replace(program, prefill=dataclasses.replace(program.prefill, seq_len=400))
    assert [v.message for v in verify(longer)] == [
        "the prefill phase is scheduled for 400 tokens, not the 200 tokens of its workload's prompt"]


def test_kv_cache_reserved_for_every_user_and_slot(program):
    """The verifier derives each stage's KV from the Program's shards (K and V rows per chip), its
    workload and its slots per layer, apart from what the partition reserved."""
    assert verify(program) == []
    stages = list(program.placement.stages)
    k = next(i for i, s in enumerate(stages) if s.attention_layers)
    short = stages[:k] + [dataclasses.replace(stages[k], kv_bytes_per_chip=stages[k].kv_bytes_per_chip - 1)]
    found = verify(dataclasses.replace(program, placement=dataclasses.replace(
        program.placement, stages=tuple(short + stages[k + 1:]))))
    assert [v.invariant for v in found] == ["sram_capacity"]
    assert found[0].message.startswith(f"stage {k} reserves ")
    # twice the users in the same SRAM
    more_users = dataclasses.replace(program, workload=dataclasses.replace(program.workload, users=2))
    assert "sram_capacity" in {v.invariant for v in verify(more_users)}
    # every layer keeping the whole context: a sliding-window layer of Gemma 3 270M keeping more positions than
    # it attends (its window, from the model's spec, not the compiler)
    context, local = program.workload.context_length, program.spec.layer_kinds.index("local")
    assert program.spec.sliding_window < context
    no_windows = dataclasses.replace(program, kv_slots=(context,) * len(program.kv_slots))
    assert [v.message for v in verify(no_windows)] == [
        (f"layer {local} keeps {context} KV slots per user; it attends {program.spec.sliding_window} (the context "
         f"{context}, or its window or chunk where shorter)")]
    missing = dataclasses.replace(program, kv_slots=program.kv_slots[1:])
    assert [v.invariant for v in verify(missing)] == ["structure"]


def test_a_schedule_naming_what_no_program_has(program):
    """What the other invariants are read off: each op and transfer on a stage the placement has, an op
    on a unit a chip has, a transfer of a kind there is, a chunk named by number. A Program breaking any is
    reported for that alone (the other checks could not read it)."""
    op, t = program.decode.ops[0], program.decode.transfers[0]
    stages = len(program.placement.stages)
    cases = [(_with_decode(program, ops=[dataclasses.replace(op, stage=stages)] + list(program.decode.ops[1:])),
              f"decode: op {op.name} is on stage {stages}, but the placement has stages 0 to {stages - 1}"),
             (_with_decode(program, ops=[dataclasses.replace(op, unit="tensor")] + list(program.decode.ops[1:])),
              f"decode: op {op.name} has unit 'tensor', not one of matrix, vector, switch, memory"),
             (_with_decode(program, transfers=[dataclasses.replace(t, kind="multicast")]
                           + list(program.decode.transfers[1:])),
              f"decode: transfer {t.name} has kind 'multicast', not one of p2p, broadcast, all_reduce"),
             (_with_decode(program, ops=[dataclasses.replace(op, name="x/" + op.name)] + list(program.decode.ops[1:])),
              f"decode: op x/{op.name} names no prompt chunk (c<chunk>/...)"),
             # a digit Python's isdigit takes but int() does not (what reads chunks by number)
             (_with_decode(program, ops=[dataclasses.replace(op, name="c\u00b2/" + op.name)]
                           + list(program.decode.ops[1:])), f"decode: op c\u00b2/{op.name} names no prompt chunk"),
             (_with_decode(program, ops=[dataclasses.replace(op, start_cycle=op.start_cycle - 5)]
                           + list(program.decode.ops)), f"decode: two ops are named {op.name}"),
             (_with_decode(program, transfers=[dataclasses.replace(t, kind="p2p", chips=t.chips[:1])]
                           + list(program.decode.transfers[1:])),
              f"decode: transfer {t.name} (p2p) over chips [{t.chips[0]}] has no sender or no receiver")]
    for bad, says in cases:
        found = verify(bad)
        assert {v.invariant for v in found} == {"structure"} and says in found[0].message, found


def test_attention_split_along_its_slots_must_cover_them_all():
    """Gemma 3 270M with 64 users at 32,768 tokens: each global layer's K and V are split between stages."""
    p = compile_program(load_preset("gemma-3-270m"), SYSTEM, Workload(context_length=32768, users=64))
    assert verify(p) == []
    stages = list(p.placement.stages)
    k, j = max((k, j) for k, s in enumerate(stages) for j, (_, part, lo, hi) in enumerate(s.pieces)
               if part == "attn" and hi > lo)  # the last range of the last split layer
    item, _, lo, hi = stages[k].pieces[j]
    assert hi == p.kv_slots[item] == 32768
    pieces = list(stages[k].pieces)
    pieces[j] = (item, "attn", lo, hi - 1)
    stages[k] = dataclasses.replace(stages[k], pieces=tuple(pieces))
    found = verify(dataclasses.replace(p, placement=dataclasses.replace(p.placement, stages=tuple(stages))))
    assert found[0].invariant == "structure"
    assert f"is ({item}, 'attn', 0, {hi - 1}), expected ({item}, 'attn', 0, {hi})" in found[0].message


def test_a_decode_micro_batch_holds_one_to_all_users():
    """16 users on Gemma 3 270M's few stages share micro-batches; the Program verifies (its activations
    included), and a step claiming no users, or more than are in flight, is a structure violation."""
    p = compile_program(load_preset("gemma-3-270m"), SYSTEM, Workload(context_length=2048, prompt_len=200, users=16))
    assert p.decode.tokens > 1 and verify(p) == []
    for tokens in (0, 17):
        found = verify(dataclasses.replace(p, decode=dataclasses.replace(p.decode, tokens=tokens)))
        assert [v.invariant for v in found] == ["structure"]
        assert f"carries {tokens} users' tokens; a micro-batch holds 1 to the 16 users in flight" in found[0].message


def test_stages_that_miss_or_repeat_a_piece(program):
    stages = list(program.placement.stages)
    last = stages[-1]
    dropped = dataclasses.replace(last, pieces=last.pieces[1:])  # its first piece held nowhere
    repeated = dataclasses.replace(last, pieces=stages[0].pieces[-1:] + last.pieces)
    for bad in (dropped, repeated):
        broken = dataclasses.replace(program, placement=dataclasses.replace(
            program.placement, stages=tuple(stages[:-1]) + (bad,)))
        found = [v.invariant for v in verify(broken)]
        # the dropped piece's shards are then on a stage that does not hold it, and a repeated piece's K and V
        # (here a range of an attention's KV slots) need more than its stage reserved: reported as well
        assert found[0] == "structure" and set(found) <= {"structure", "weight_placement", "sram_capacity"}


def test_weight_missing_duplicated_or_replicated_on_purpose(program):
    shards = list(program.placement.shards)
    i = next(k for k, s in enumerate(shards) if s.tensor == "blk.3.ffn_up.weight")
    missing = dataclasses.replace(program, placement=dataclasses.replace(
        program.placement, shards=tuple(shards[:i] + shards[i + 1:])))
    stage = next(st for st in program.placement.stages if shards[i].chip in st.chips)
    rows = next((lo, hi) for item, part, lo, hi in stage.pieces if (item, part) == (3, "ffn"))
    d_ff = program.spec.d_ff
    share = f"rows [{Fraction(shards[i].start, d_ff)}, {Fraction(shards[i].stop, d_ff)})"  # of the chip's down proj.
    assert [v.message for v in verify(missing)] == [
        f"blk.3.ffn_up.weight elements [{shards[i].start}, {shards[i].stop}) along axis are placed nowhere",
        (f"stage {stage.index} runs blk.3.ffn_up.weight's ffn piece, but its chips do not hold rows "
         f"[{rows[0]}, {rows[1]}) of it"),
        (f"chip {shards[i].chip} holds {share} of blk.3.ffn_down.weight but no rows of blk.3.ffn_up.weight, which "
         f"it multiplies with them")]
    spare_chip = next(c for c in stage.chips if c != shards[i].chip)  # another chip of the stage that runs it
    twice = dataclasses.replace(shards[i], chip=spare_chip)
    dup = dataclasses.replace(program, placement=dataclasses.replace(program.placement, shards=tuple(shards + [twice])))
    found = [v.message for v in verify(dup)]
    assert found[0] == (f"blk.3.ffn_up.weight elements [{shards[i].start}, {shards[i].stop}) are placed 2 times "
                        f"(chips {sorted([shards[i].chip, spare_chip])}) without being flagged as replicated")
    assert len(found) == 2 and found[1].startswith(f"chip {spare_chip} holds rows ") and found[1].endswith(
        " of blk.3.ffn_up.weight, which it multiplies with them")  # more rows of it than of its down projection
    # the spare chip holding the same rows of all the MLP's tensors again, flagged: replicated on purpose
    copies = [dataclasses.replace(sh, chip=spare_chip, replicated=True) for sh in shards
              if sh.chip == shards[i].chip and sh.tensor.startswith("blk.3.ffn_")]
    ok = dataclasses.replace(program, placement=dataclasses.replace(program.placement, shards=tuple(shards + copies)))
    assert "weight_placement" not in _invariants(ok)


def test_shard_on_a_stage_that_does_not_run_it(program):
    """Each element still placed once, but on a chip of another stage, or as rows of another MLP part."""
    shards = list(program.placement.shards)
    i = next(k for k, s in enumerate(shards) if s.tensor == "blk.0.attn_q.weight")
    far = next(st for st in program.placement.stages if shards[i].chip not in st.chips).chips[0]
    moved = shards[:i] + [dataclasses.replace(shards[i], chip=far)] + shards[i + 1:]
    broken = dataclasses.replace(program, placement=dataclasses.replace(program.placement, shards=tuple(moved)))
    assert [v.message for v in verify(broken)] == [
        f"blk.0.attn_q.weight is on chip {far}, but its attn piece is held by stage 0",
        "stage 0 runs blk.0.attn_q.weight's attn piece, but its chips do not hold all of it",
        (f"chip {shards[i].chip} holds rows [0, 1/4) of blk.0.attn_output.weight but no rows of blk.0.attn_q.weight, "
         f"which it multiplies with them")]


def test_cut_mlp_rows_on_the_other_part(cut):
    """Two parts of a cut MLP swap their chips' rows: coverage is intact, each part holds the other's rows."""
    homes = [(s.index, lo, hi) for s in cut.placement.stages for it, part, lo, hi in s.pieces if (it, part) == (0, "ffn")]
    (a, a_lo, a_hi), (b, _, _) = homes[:2]
    chips = {s.index: s.chips for s in cut.placement.stages}
    swap = dict(zip(chips[a], chips[b])) | dict(zip(chips[b], chips[a]))
    shards = tuple(dataclasses.replace(sh, chip=swap.get(sh.chip, sh.chip)) if sh.tensor == "blk.0.ffn_up.weight"
                   else sh for sh in cut.placement.shards)
    found = verify(dataclasses.replace(cut, placement=dataclasses.replace(cut.placement, shards=shards)))
    assert found and all(v.invariant == "weight_placement" and "blk.0.ffn_up.weight" in v.message for v in found)
    assert any(f"rows [{a_lo}, {a_hi})" in v.message and v.message.startswith("blk.0") for v in found)
    # and each part lacks its own rows
    assert f"stage {a} runs blk.0.ffn_up.weight's ffn piece, but its chips do not hold rows [{a_lo}, {a_hi}) of it" \
        in [v.message for v in found]


def test_experts_on_the_other_part_or_read_as_rows():
    """Llama 4 Maverick on lpu-v1, its MoE MLPs cut by expert rows: two parts of layer 1 of the same size swap
    their chips' expert rows of one tensor (and their shares of the shared expert's rows): coverage is intact,
    each part holds the other's. Read as a Program that cuts by rows, its pieces no longer cover the layers'
    d_ff rows."""
    maverick = compile_program(load_preset("llama-4-maverick"), SYSTEM, Workload(context_length=2048, prompt_len=64),
                               tp=8)
    assert maverick.placement.experts and verify(maverick) == []
    homes = [(s.index, lo, hi) for s in maverick.placement.stages for it, part, lo, hi in s.pieces
             if (it, part) == (1, "ffn")]
    (a, a_lo, a_hi), (b, b_lo, b_hi) = homes[1:3]
    assert a_hi - a_lo == b_hi - b_lo
    chips = {s.index: s.chips for s in maverick.placement.stages}
    swap = dict(zip(chips[a], chips[b])) | dict(zip(chips[b], chips[a]))
    for tensor, held in (("blk.1.ffn_up_exps.weight", (a_lo, a_hi)),
                         ("blk.1.ffn_up_shexp.weight", (a_lo // 128, a_hi // 128))):  # 1/128 of the expert rows
        shards = tuple(dataclasses.replace(sh, chip=swap.get(sh.chip, sh.chip)) if sh.tensor == tensor else sh
                       for sh in maverick.placement.shards)
        found = verify(dataclasses.replace(maverick, placement=dataclasses.replace(maverick.placement, shards=shards)))
        assert found and all(v.invariant == "weight_placement" and tensor in v.message for v in found), found
        assert any(f"stage {a} rows [{held[0]}, {held[1]})" in v.message for v in found), tensor
        assert any(v.message.startswith(f"stage {a} runs {tensor}'s ffn piece") for v in found), tensor
    as_rows = dataclasses.replace(maverick, placement=dataclasses.replace(maverick.placement, experts=False))
    assert any(v.invariant == "structure" and "expected (1, 'ffn', 0, 8192)" in v.message for v in verify(as_rows))


def test_a_stage_must_hold_the_weights_its_pieces_run_on(program):
    """A layer's attention (layer 5's) is split between stages 0 and 1 along its KV slots: both run its K and V
    projections. Without stage 1's copies of the K projection, each element is still placed (stage 0's copies),
    but stage 1 would attend with no K weights and reserve no KV for them."""
    layer = next(item for item, part, lo, hi in program.placement.stages[1].pieces if part == "attn" and hi > lo)
    tensor = f"blk.{layer}.attn_k.weight"
    holders = {s.chip for s in program.placement.shards if s.tensor == tensor}
    stage1 = set(program.placement.stages[1].chips)
    assert holders & stage1 and holders - stage1 and verify(program) == []
    shards = tuple(s for s in program.placement.shards if not (s.tensor == tensor and s.chip in stage1))
    found = verify(dataclasses.replace(program, placement=dataclasses.replace(program.placement, shards=shards)))
    assert f"stage 1 runs {tensor}'s attn piece, but its chips do not hold all of it" in [v.message for v in found]


def test_an_op_runs_on_a_stage_that_holds_its_piece(program):
    """Read off its name: layer 0's MLP op moved to stage 1, which holds no part of layer 0, is caught (there it
    would run without its weights)."""
    ops = list(program.decode.ops)
    k = next(k for k, o in enumerate(ops) if o.name == "blk.0.ffn_up")
    ops[k] = dataclasses.replace(ops[k], stage=1)
    assert "decode: blk.0.ffn_up runs on stage 1, which holds no part of piece (0, 'ffn')" in [
        v.message for v in verify(_with_decode(program, ops=ops))]


def test_shards_count_their_elements_bytes_along_the_axis_their_ops_split(program):
    """A shard's bytes are its elements' at the weights' precision (SRAM is summed from them), and a tensor is
    divided along the axis its ops split (a column-split projection's rows, not its columns)."""
    shards = list(program.placement.shards)
    i = next(k for k, s in enumerate(shards) if s.tensor == "blk.2.attn_q.weight")
    light = shards[:i] + [dataclasses.replace(shards[i], nbytes=1)] + shards[i + 1:]
    found = verify(dataclasses.replace(program, placement=dataclasses.replace(program.placement, shards=tuple(light))))
    assert [(v.invariant, v.message) for v in found] == [(
        "sram_capacity", (f"blk.2.attn_q.weight [{shards[i].start}, {shards[i].stop}) on chip {shards[i].chip} counts 1 "
                          f"bytes; its elements take {shards[i].nbytes} at int8"))]
    q = [s for s in shards if s.tensor == "blk.2.attn_q.weight"]
    columns = program.tensors["blk.2.attn_q.weight"][1]
    across = [dataclasses.replace(s, axis=1, start=r * columns // len(q), stop=(r + 1) * columns // len(q))
              for r, s in enumerate(q)]
    turned = [s for s in shards if s.tensor != "blk.2.attn_q.weight"] + across
    found = verify(dataclasses.replace(program, placement=dataclasses.replace(program.placement, shards=tuple(turned))))
    assert ("weight_placement", ("blk.2.attn_q.weight is divided along axis 1, but it is split along axis 0 where its "
                                 "ops run (SPLIT_RULES)")) in [(v.invariant, v.message) for v in found]


def test_sizes_that_would_cancel_or_shorten_what_is_read_off(program):
    """A negative size would cancel another in the SRAM sums or on a link; a makespan short of the last op
    would shorten the latency timing reads off it; slots beyond the context would reserve KV it cannot use."""
    ops = list(program.decode.ops)
    ops[2] = dataclasses.replace(ops[2], output_bytes_per_chip=-1.0)
    assert [v.message for v in verify(_with_decode(program, ops=ops))] == [
        f"decode op {ops[2].name}'s output_bytes_per_chip is negative"]
    transfers = list(program.decode.transfers)
    t = transfers[0]
    transfers[0] = dataclasses.replace(t, phases=tuple((a, e, tuple((x, y, -n) for x, y, n in links))
                                                       for a, e, links in t.phases))
    assert any("bytes on link" in v.message and v.invariant == "link_bandwidth"
               for v in verify(_with_decode(program, transfers=transfers)))
    short = dataclasses.replace(program, decode=dataclasses.replace(program.decode,
                                                                     makespan_cycles=program.decode.makespan_cycles - 1))
    assert [v.message for v in verify(short)] == [
        (f"decode: makespan {program.decode.makespan_cycles - 1} cycles, but its last op or transfer ends at "
         f"{program.decode.makespan_cycles}")]
    beyond = dataclasses.replace(program, kv_slots=(program.workload.context_length + 1,) * len(program.kv_slots))
    assert [v.invariant for v in verify(beyond)] == ["structure"]


def test_transfers_deliver_to_the_stage_that_takes_them_from_chips_that_hold_their_inputs(program):
    """Layer 8's result goes from stage 0 to stage 1 as one share per rank (a stripe), then gathered there. Sent
    to the wrong chips, or from chips that never computed it, or gathered on chips the ops reading it are not on,
    it is caught though every cycle holds."""
    transfers = list(program.decode.transfers)
    k = next(k for k, t in enumerate(transfers) if t.kind == "stripe")
    stripe = transfers[k]
    half = len(stripe.chips) // 2

    def moved(chips):
        fresh = dict(zip(stripe.chips, chips))
        phases = tuple((a, e, tuple((fresh[x], fresh[y], n) for x, y, n in links)) for a, e, links in stripe.phases)
        return _with_decode(program, transfers=transfers[:k] + [dataclasses.replace(stripe, chips=chips, phases=phases)]
                            + transfers[k + 1:])
    inward = stripe.chips[:half] + stripe.chips[:half][::-1]  # "to" stage 0's own chips
    assert any("not all of stage 1's" in v.message for v in verify(moved(inward)))
    outward = stripe.chips[half:][::-1] + stripe.chips[half:]  # "from" stage 1's, which never computed it
    assert any("do not all hold its inputs" in v.message for v in verify(moved(outward)))
    gather = next(t for t in transfers if t.kind == "all_gather")
    narrow = dataclasses.replace(gather, chips=gather.chips[:2],
                                 phases=tuple((a, e, tuple(x for x in links if set(x[:2]) <= set(gather.chips[:2])))
                                              for a, e, links in gather.phases))
    found = verify(_with_decode(program, transfers=[narrow if t is gather else t for t in transfers]))
    assert any(f"but its input {gather.name} reaches only chips" in v.message for v in found)


def test_a_stage_is_one_tp_group_and_each_phase_schedules_ops(program):
    """Every op's share per chip is read at the placement's TP width: a stage short of a chip is caught, as is a
    phase with nothing scheduled (timing reads its latency off its ops)."""
    stages = list(program.placement.stages)
    stages[1] = dataclasses.replace(stages[1], chips=stages[1].chips[:-1])
    narrow = dataclasses.replace(program, placement=dataclasses.replace(program.placement, stages=tuple(stages)))
    assert (f"stage 1 has {program.placement.tp - 1} chips, not the placement's TP width {program.placement.tp} "
            f"(at least 1)" in [v.message for v in verify(narrow)])
    idle = dataclasses.replace(program, decode=dataclasses.replace(program.decode, ops=(), transfers=(),
                                                                   makespan_cycles=0))
    assert "the decode phase schedules no ops" in [v.message for v in verify(idle)]


def test_a_transfer_whose_links_do_not_carry_its_payload(program):
    """Declared on its links at a thousandth of its bytes, an all-reduce would pass the bandwidth check
    on bytes it never moved: each chip of an all-reduce sends and receives at least its payload."""
    transfers = list(program.decode.transfers)
    k = next(k for k, t in enumerate(transfers) if t.kind == "all_reduce")
    t = transfers[k]
    light = dataclasses.replace(t, phases=tuple((a, e, tuple((x, y, n / 1000) for x, y, n in links))
                                                for a, e, links in t.phases))
    found = verify(_with_decode(program, transfers=transfers[:k] + [light] + transfers[k + 1:]))
    assert [v.invariant for v in found] == ["link_bandwidth"] and "less than the" in found[0].message


def test_a_later_chunk_reading_an_earlier_chunks_buffer_keeps_it_alive(program):
    """Only attention orders on an earlier chunk's attention (the KV it wrote) without reading its output: any
    other read of an earlier chunk's result keeps that buffer in SRAM until it is read."""
    pre = program.prefill
    ops = list(pre.ops)
    first = next(k for k, o in enumerate(ops) if o.name == "c0/blk.0.ffn_norm")
    later = next(k for k, o in enumerate(ops) if o.name == "c1/blk.0.ffn_up")
    room = SYSTEM.chip.sram_bytes - max(
        sum(s.nbytes for s in program.placement.shards if s.chip == c) + program.placement.stages[0].kv_bytes_per_chip
        for c in program.placement.stages[0].chips)
    ops[first] = dataclasses.replace(ops[first], output_bytes_per_chip=0.55 * room)
    ops[later] = dataclasses.replace(ops[later], output_bytes_per_chip=0.55 * room)
    apart = dataclasses.replace(program, prefill=dataclasses.replace(pre, ops=tuple(ops)))
    assert "sram_capacity" not in _invariants(apart)  # each buffer alone fits
    ops[later] = dataclasses.replace(ops[later], inputs=ops[later].inputs + (ops[first].name,))
    held = dataclasses.replace(program, prefill=dataclasses.replace(pre, ops=tuple(ops)))
    assert "sram_capacity" in _invariants(held)


def test_link_over_its_bandwidth(program):
    transfers = list(program.decode.transfers)
    i = next(k for k, t in enumerate(transfers) if t.kind == "stripe")
    t = transfers[i]
    # a hundred times the bytes in the same cycles
    transfers[i] = dataclasses.replace(t, phases=tuple((s, e, tuple((a, b, n * 100) for a, b, n in links))
                                                       for s, e, links in t.phases))
    assert "link_bandwidth" in _invariants(_with_decode(program, transfers=transfers))
    # a collective's first step with 15 times its bytes, its other steps as they were: over the
    # bandwidth in that step, though not over the collective's whole span
    transfers = list(program.decode.transfers)
    i = next(k for k, t in enumerate(transfers) if t.kind == "all_reduce" and len(t.phases) > 1)
    t = transfers[i]
    (s, e, links), *rest = t.phases
    transfers[i] = dataclasses.replace(t, phases=((s, e, tuple((a, b, n * 15) for a, b, n in links)), *rest))
    found = verify(_with_decode(program, transfers=transfers))
    assert {v.invariant for v in found} == {"link_bandwidth"} and t.name in found[0].message
    # two copies of the prefill's busiest send on the same link at the same time
    pre = program.prefill

    def rate(t):
        return max(n / (e - s) for s, e, links in t.phases for _, _, n in links)
    busiest = max(pre.transfers, key=rate)
    assert rate(busiest) * SYSTEM.chip.clock_hz > 0.5 * SYSTEM.links["local"].bandwidth_bytes_per_s
    clash = dataclasses.replace(busiest, name="clash")  # the same result again
    doubled = dataclasses.replace(program, prefill=dataclasses.replace(pre, transfers=pre.transfers + (clash,)))
    assert "link_bandwidth" in _invariants(doubled)


def test_links_are_checked_as_a_sweep_over_each_link_would():
    """The verifier sweeps each distinct collective load once and bounds a link's peak by its loads' peaks;
    a second method, one sweep per link over every transfer on it, finds the same links over their
    bandwidth: Llama 2 70B on 576 chips in groups of 64 (all-reduces over hundreds of links), its links
    slowed 5x so that some phases overfill them and others do not."""
    system = dataclasses.replace(SYSTEM, links={kind: dataclasses.replace(link, bandwidth_bytes_per_s=(
        link.bandwidth_bytes_per_s / 5)) for kind, link in SYSTEM.links.items()})
    program = compile_program(load_preset("llama-2-70b"), SYSTEM, Workload(context_length=1024, prompt_len=128),
                              chips=576, tp=64)
    slowed = dataclasses.replace(program, system=system)
    clock, expected = system.chip.clock_hz, set()
    for phase in (slowed.decode, slowed.prefill):
        spans = defaultdict(list)
        for t in phase.transfers:
            for start, arrival, links in t.phases:
                for a, b, nbytes in links:  # its bytes leave before the hop's latency, which they spend in flight
                    sent = arrival - system.links[system.link_kind(a, b)].latency_s * clock
                    spans[(a, b)].append((start, 1, nbytes * clock / (sent - start)))
                    spans[(a, b)].append((sent, 0, nbytes * clock / (sent - start)))
        for (a, b), events in spans.items():
            bandwidth, rate = system.links[system.link_kind(a, b)].bandwidth_bytes_per_s, 0.0
            for _, starting, r in sorted(events):
                rate += r if starting else -r
                if rate > bandwidth * (1 + 1e-9):  # the verifier's tolerance for rounding
                    expected.add(f"{phase.phase}: link {a}->{b}")
                    break
    found = {re.match(r"\w+: link \d+->\d+", v.message)[0] for v in verify(slowed) if v.invariant == "link_bandwidth"}
    assert expected and found == expected
    carrying = {f"{phase.phase}: link {a}->{b}" for phase in (slowed.decode, slowed.prefill) for t in phase.transfers
                for _, _, links in t.phases for a, b, _ in links}
    assert len(expected) < len(carrying)


def test_transfers_keep_to_the_cables_and_the_programs_own_chips():
    """A hop between nodes takes a global link at each end: lpu-v1's chips have 4, each cabled to one chip.
    Llama 3.1 70B on 576 chips (72 nodes) routes over the cabled links only (each stage hands on to the next
    through one); a send re-routed from one chip straight to one chip in each of 5 other nodes, which its
    cables do not join, is caught on each of those hops, as is a hop on a cable to a chip the Program
    does not hold."""
    p = compile_program(load_preset("llama-3.1-70b"), SYSTEM, Workload(context_length=1024, prompt_len=128),
                        chips=576, tp=8)
    assert verify(p) == []
    n, src = SYSTEM.node.chips, 3
    hops = {(a, b) for phase in (p.decode, p.prefill) for t in phase.transfers for _, _, links in t.phases
            for a, b, _ in links}
    assert all(b in SYSTEM.linked_chips(a) for a, b in hops)
    t = next(t for t in p.decode.transfers if t.kind == "p2p")
    fan = tuple((src, src + k * n, 1.0) for k in range(1, SYSTEM.node.global_links_per_chip + 2))
    fanned = dataclasses.replace(t, phases=((t.start_cycle, t.arrival_cycle, fan),))
    bad = _with_decode(p, transfers=[fanned if x is t else x for x in p.decode.transfers])
    short = (f"decode: transfer {t.name} ({t.kind}, {t.payload_bytes:,.0f} bytes) sends 0 bytes on chip "
             f"{t.chips[0]}'s links, less than the {t.payload_bytes:,.0f} it must")  # its bytes leave chip 3
    assert [v.message for v in verify(bad)] == [short] + [f"decode: no link from chip {src} to chip {src + k * n}"
                                                          for k in range(1, 6)]
    last = p.placement.chips[-1]
    outside = next(c for c in SYSTEM.linked_chips(last) if c >= 576)
    stray = dataclasses.replace(t, phases=((t.start_cycle, t.arrival_cycle, ((last, outside, 1.0),)),))
    bad = _with_decode(p, transfers=[stray if x is t else x for x in p.decode.transfers])
    assert [v.message for v in verify(bad)] == [short, (f"decode: link {last}->{outside} runs through chip {outside}, "
                                                        f"which the Program does not hold")]


def test_a_result_sent_to_many_nodes_keeps_to_the_cables():
    """Gemma 3 270M with 2,048 users at 32,768 tokens spreads each global layer's K and V over hundreds of
    stages, so one result is read in more nodes than a chip's 4 global links could reach directly. It
    spreads along a binomial tree (no holder sends it more than log2 of the stages reading it + 1 times),
    its routes run over the rack's and the racks' cables, and the Program verifies (every chip talks to
    at most 4 chips outside its node)."""
    p = compile_program(load_preset("gemma-3-270m"), SYSTEM, Workload(context_length=32768, users=2048))
    sends: dict[str, list] = {}
    for t in p.decode.transfers:  # a send from one stage to another: its source chips, then its targets
        if t.kind in ("p2p", "stripe", "rank_p2p") and ">s" in t.name:
            sends.setdefault(t.name.split(">s")[0], []).append(t)
    spread = max(sends.values(), key=len)
    assert len({SYSTEM.node_of(t.chips[len(t.chips) // 2]) for t in spread}) > 2 * SYSTEM.node.global_links_per_chip
    per_holder = Counter(t.chips[0] for t in spread)
    assert max(per_holder.values()) <= math.log2(len(spread)) + 1
    assert verify(p) == []


def test_verify_or_raise_is_one_clear_error(program):
    small = dataclasses.replace(program.system, chip=dataclasses.replace(program.system.chip, sram_bytes=1_000_000))
    with pytest.raises(OpenLPUError, match=r"program fails verification: .*SRAM.*\(and \d+ more\)"):
        verify_or_raise(dataclasses.replace(program, system=small))


def _without(phase, name: str):
    """The phase with op `name` dropped and what read it reading its first input instead: every cycle, unit and
    link still holds, but the model is not computed."""
    dropped = next(op for op in phase.ops if op.name == name)

    def rewired(inputs):
        return tuple(dropped.inputs[0] if i == name else i for i in inputs)

    return dataclasses.replace(phase, ops=tuple(dataclasses.replace(op, inputs=rewired(op.inputs)) for op in phase.ops
                                                if op.name != name),
                               transfers=tuple(dataclasses.replace(t, inputs=rewired(t.inputs))
                                               for t in phase.transfers))


def test_every_op_of_the_models_graph_runs_on_what_it_reads(program):
    """The schedule is checked against the model's graph, lowered from the spec the Program carries (graph.lower,
    not the compiler): an op left out, an op reading another's result, an op no model has. Each of these holds
    every other invariant. Layer 3 runs whole on one stage (layer 5's attention is split)."""
    assert {(item, part, lo, hi) for s in program.placement.stages for item, part, lo, hi in s.pieces if item == 3} == {
        (3, "attn", 0, 0), (3, "ffn", 0, program.spec.d_ff)}
    for name in ("blk.3.rope", "blk.3.attn_norm", "blk.3.ffn_act"):
        found = verify(dataclasses.replace(program, decode=_without(program.decode, name)))
        assert {v.invariant for v in found} == {"structure"}
        assert f"decode: the model's {name} never runs" in [v.message for v in found]
    # blk.3's query projection reading the layer's input, not its norm
    ops = [dataclasses.replace(op, inputs=("blk.2.ffn_residual",)) if op.name == "blk.3.attn_q" else op
           for op in program.decode.ops]
    assert [v.message for v in verify(_with_decode(program, ops=ops))] == [
        "decode: blk.3.attn_q reads blk.2.ffn_residual; the model's blk.3.attn_q reads blk.3.attn_norm"]
    # an op of another kind, which nothing else reads (it passed with a kind no op has)
    ops = [dataclasses.replace(op, kind="tensor_magic") if op.name == "blk.3.ffn_act" else op
           for op in program.decode.ops]
    assert [v.message for v in verify(_with_decode(program, ops=ops))] == [
        ("decode: blk.3.ffn_act runs as tensor_magic on the vector unit; the model's blk.3.ffn_act is activation on "
         "vector")]
    # an op of a layer the model does not have, and logits in a prompt chunk before the last
    layers = program.spec.n_layers
    ops = [dataclasses.replace(op, name=f"blk.{layers}.attn_norm") if op.name == "blk.3.attn_norm" else op
           for op in program.decode.ops]
    assert f"decode: blk.{layers}.attn_norm is not an op of the model's graph as the placement holds its piece" in [
        v.message for v in verify(_with_decode(program, ops=ops))]
    last = max(int(op.name[1:op.name.index("/")]) for op in program.prefill.ops)
    assert last > 0
    ops = [dataclasses.replace(op, name=op.name.replace(f"c{last}/", f"c{last - 1}/"))
           if op.name == f"c{last}/sample" else op for op in program.prefill.ops]
    found = verify(dataclasses.replace(program, prefill=dataclasses.replace(program.prefill, ops=tuple(ops))))
    assert (f"prefill: c{last - 1}/sample is not an op of the model's graph as the placement holds its piece"
            in [v.message for v in found])
    assert f"prefill: the model's c{last}/sample never runs" in [v.message for v in found]


def test_a_combination_adds_the_parts_of_one_op(cut):
    """Each MLP is cut between stages, whose partial down projections a tree of two-input ops sums: summing a
    part of another layer's, leaving a part out, adding a partial sum twice, or reading one part or a partial
    sum where the whole sum is read, is caught. Each of these holds every other invariant (a review found the
    last four passed)."""
    assert verify(cut) == []
    ops = list(cut.decode.ops)
    sums = [op for op in ops if op.name.startswith("blk.3.ffn_sum@")]
    reader = next(op for op in ops if op.name == "blk.3.post_ffw_norm")
    (root,) = reader.inputs
    assert len(sums) >= 2 and root == sums[-1].name  # the tree's last op completes the sum

    def structure(changed):
        program = _with_decode(cut, ops=[changed.get(op.name, op) for op in ops])
        return [v.message for v in verify(program) if v.invariant == "structure"]

    k = next(op for op in sums if any(i.startswith("blk.3.ffn_down") for i in op.inputs))
    other = next(op.name for op in ops if op.name.startswith("blk.2.ffn_down@"))
    assert structure({k.name: dataclasses.replace(k, inputs=(k.inputs[0], other))}) == [
        f"decode: blk.3.ffn_down's parts are combined with {other}, which is not one of them"]
    assert structure({k.name: dataclasses.replace(k, inputs=k.inputs[:1])}) == [
        f"decode: {k.name} combines 1 result; a combination reads two"]
    partial = next(op.name for op in sums if op.name != root)
    twice = dataclasses.replace(sums[-1], inputs=(partial, partial))
    assert structure({root: twice})[0].startswith(f"decode: blk.3.ffn_down's {len(sums) + 1} parts are not combined "
                                                  f"once each")
    for read in ("blk.3.ffn_down@1", partial):
        assert structure({reader.name: dataclasses.replace(reader, inputs=(read,))}) == [
            f"decode: blk.3.post_ffw_norm reads {read}; the model's blk.3.post_ffw_norm reads {root}"]


def test_each_op_is_named_and_staged_as_its_piece_is_held(program, cut):
    """An op of a piece held whole runs once under its own name; of a cut piece, once per part, on that part's
    stage (whose rows it holds). A review found that a copy of an uncut op named as a part ('@1'), doing no work,
    could stand in for the op (the real one run after the token, read by nothing), and that a part could run on
    another part's stage."""
    ops = list(program.decode.ops)
    real = next(op for op in ops if op.name == "blk.3.attn_q")
    end, span = program.decode.makespan_cycles, real.end_cycle - real.start_cycle
    stand_in = dataclasses.replace(real, name="blk.3.attn_q@1", flops_per_chip=0.0, sram_bytes_per_chip=0.0)
    late = dataclasses.replace(real, start_cycle=end, end_cycle=end + span)
    swapped = [w for op in ops for w in ([stand_in, late] if op is real else [dataclasses.replace(
        op, inputs=tuple("blk.3.attn_q@1" if i == real.name else i for i in op.inputs))])]
    bad = dataclasses.replace(program, decode=dataclasses.replace(program.decode, ops=tuple(swapped),
                                                                  makespan_cycles=end + span))
    messages = [v.message for v in verify(bad)]
    assert "decode: blk.3.attn_q@1 is not an op of the model's graph as the placement holds its piece" in messages
    assert "decode: blk.3.attn_q_norm reads blk.3.attn_q@1; the model's blk.3.attn_q_norm reads blk.3.attn_q" in (
        messages)
    # the two parts of a cut MLP's gate projection on each other's stages
    ops = list(cut.decode.ops)
    first, second = (next(k for k, op in enumerate(ops) if op.name == name)
                     for name in ("blk.3.ffn_gate", "blk.3.ffn_gate@1"))
    assert ops[first].stage != ops[second].stage
    ops[first], ops[second] = (dataclasses.replace(ops[first], stage=ops[second].stage),
                               dataclasses.replace(ops[second], stage=ops[first].stage))
    assert (f"decode: blk.3.ffn_gate runs on stage {ops[first].stage}; the stage holding its part of the piece is "
            f"{ops[second].stage}" in [v.message for v in verify(_with_decode(cut, ops=ops))])


def _shifted(phase, by: int):
    """The phase with every op, transfer and phase of a transfer `by` cycles later."""
    ops = [dataclasses.replace(o, start_cycle=o.start_cycle + by, end_cycle=o.end_cycle + by) for o in phase.ops]
    transfers = [dataclasses.replace(t, start_cycle=t.start_cycle + by, arrival_cycle=t.arrival_cycle + by,
                                     phases=tuple((s + by, e + by, links) for s, e, links in t.phases))
                 for t in phase.transfers]
    return dataclasses.replace(phase, ops=tuple(ops), transfers=tuple(transfers),
                               makespan_cycles=phase.makespan_cycles + by)


def test_nothing_runs_before_the_phase_starts(program):
    """Timing reads a step's latency off its makespan: a schedule moved to negative cycles (ending at cycle 1)
    would read as a step of one cycle."""
    early = dataclasses.replace(program, decode=_shifted(program.decode, 1 - program.decode.makespan_cycles))
    found = verify(early)
    assert {v.invariant for v in found} == {"structure"} and "before the phase does (cycle 0)" in found[0].message


def test_an_op_ending_before_it_starts_is_caught(program):
    """Timing reads busy cycles off each op's span, so an op whose end comes before its start would be read
    as negative time (a vector unit busy -1,112,446% of the step): the Program does not hold together."""
    ops = list(program.decode.ops)
    k = next(i for i, op in enumerate(ops) if op.end_cycle > op.start_cycle + 1)
    ops[k] = dataclasses.replace(ops[k], start_cycle=ops[k].end_cycle, end_cycle=ops[k].start_cycle)
    found = [v.message for v in verify(_with_decode(program, ops=ops)) if v.invariant == "structure"]
    assert found == [f"decode: {ops[k].name} ends before it starts"]


def _squeezed(t, cycles_of=lambda k, links: 1):
    """Transfer `t` with each phase taking cycles_of(k, links) cycles, one after the other from its start."""
    phases, at = [], t.start_cycle
    for k, (_, _, links) in enumerate(t.phases):
        phases.append((at, at + cycles_of(k, links), links))
        at = phases[-1][1]
    return dataclasses.replace(t, phases=tuple(phases), arrival_cycle=at)


def test_a_phase_of_no_length_is_caught_and_hides_no_overfilled_link(program):
    """Every all-reduce phase squeezed to one cycle overfills its links. A first phase of no length, which
    arrives as it starts, is caught itself, and its infinite rate no longer turns the sweep of its links into
    NaN, which had hidden the overfilled ones."""
    squeezed = [_squeezed(t) if t.kind == "all_reduce" else t for t in program.decode.transfers]
    assert "link_bandwidth" in _invariants(_with_decode(program, transfers=squeezed))
    for i, t in enumerate(squeezed):
        if t.kind == "all_reduce":
            (start, _, links), *rest = t.phases
            squeezed[i] = dataclasses.replace(t, phases=((start, start, links), *rest))
    found = verify(_with_decode(program, transfers=squeezed))
    assert {"link_bandwidth", "input_not_ready"} <= {v.invariant for v in found}
    assert any("phase 0 runs cycles" in v.message for v in found)


def test_a_transfer_faster_than_its_hops_latency(program):
    """Each all-reduce phase given only the cycles its bytes take at the links' bandwidth, none for the hop's
    latency (100 ns on a chip's local links): within the bandwidth, yet arriving before it can."""
    clock, local = SYSTEM.chip.clock_hz, SYSTEM.links["local"]

    def bytes_only(k, links):
        return math.ceil(max(n for _, _, n in links) / local.bandwidth_bytes_per_s * clock)
    fast = [_squeezed(t, bytes_only) if t.kind == "all_reduce" else t for t in program.decode.transfers]
    found = verify(_with_decode(program, transfers=fast))
    assert {v.invariant for v in found} >= {"input_not_ready"} and "link_bandwidth" not in {v.invariant for v in found}
    assert any("the latency of the hops to" in v.message for v in found)


@pytest.fixture(scope="module")
def relayed():
    """Gemma 3 270M on 16 one-chip stages: the sampled token goes back from chip 15 to the first stages through
    other chips (15 -> 8 -> 7 -> 0: a local hop, the link between the two nodes, a local hop)."""
    p = compile_program(load_preset("gemma-3-270m"), SYSTEM,
                        Workload(context_length=512, prompt_len=64, prefill_chunk=64), chips=16, tp=1)
    assert verify(p) == []
    return p


def test_a_send_over_several_hops_takes_their_latencies_in_turn(relayed):
    """The token sent back to chip 0 given only its slowest hop's latency and its bytes: each link alone is within
    its latency and bandwidth, but the token cannot cross the last before crossing those before it."""
    clock, transfers = SYSTEM.chip.clock_hz, list(relayed.decode.transfers)
    i = next(k for k, t in enumerate(transfers) if t.name == "token_return")
    (_, _, links), = transfers[i].phases
    assert sorted((a, b) for a, b, _ in links) == [(7, 0), (8, 7), (15, 8)]
    one_hop = max((n / SYSTEM.links[SYSTEM.link_kind(a, b)].bandwidth_bytes_per_s
                   + SYSTEM.links[SYSTEM.link_kind(a, b)].latency_s) * clock for a, b, n in links)
    transfers[i] = _squeezed(transfers[i], lambda k, links: math.ceil(one_hop))
    found = verify(_with_decode(relayed, transfers=transfers))
    assert [v.invariant for v in found] == ["input_not_ready"]
    assert "token_return crosses link 7->0" in found[0].message and "the latency of the hops to 0" in found[0].message


def test_a_chip_that_relays_a_send_passes_on_what_it_receives(relayed):
    """A relayed hop carrying an eighth of the bytes (the rest lost on the way, or conjured after it) leaves the
    sender's and the receiver's totals whole, and is caught at the chips that relay it."""
    p = relayed
    transfers = list(p.decode.transfers)
    i = next(k for k, t in enumerate(transfers) if t.name == "token_return")
    t = transfers[i]
    (start, arrival, links), = t.phases
    relayed = next(k for k, (a, b, _) in enumerate(links) if a not in t.chips and b not in t.chips)
    links = tuple((a, b, n / 8 if k == relayed else n) for k, (a, b, n) in enumerate(links))
    transfers[i] = dataclasses.replace(t, phases=((start, arrival, links),))
    found = verify(_with_decode(p, transfers=transfers))
    assert [v.invariant for v in found] == ["link_bandwidth"] and "which only relays it" in found[0].message


def test_a_partial_result_is_read_through_its_all_reduce(program):
    """On a stage of 8 chips a row-split projection leaves each chip partial sums: an op reading them
    directly, not their all-reduce, reads the wrong vector, though it is the graph's input by name."""
    ops = list(program.decode.ops)
    i = next(k for k, o in enumerate(ops) if any(x.endswith(".allreduce") for x in o.inputs))
    ops[i] = dataclasses.replace(ops[i], inputs=tuple(x.removesuffix(".allreduce") for x in ops[i].inputs))
    found = verify(_with_decode(program, ops=ops))
    assert [v.invariant for v in found] == ["input_not_ready"] and "partial result, not its all-reduce" in \
        found[0].message


def test_an_op_faster_than_its_unit_and_sram_allow(program):
    """Each op's recorded work bounds its cycles from below, at its unit's fastest rate and the SRAM's
    bandwidth: the first matrix op made to run in one cycle is caught."""
    ops = list(program.decode.ops)
    i = next(k for k, o in enumerate(ops) if o.unit == "matrix" and o.end_cycle - o.start_cycle > 1)
    ops[i] = dataclasses.replace(ops[i], end_cycle=ops[i].start_cycle + 1)
    found = verify(_with_decode(program, ops=ops))
    assert {v.invariant for v in found} == {"unit_overlap"}
    assert any(v.message.endswith("on its matrix unit at the most") for v in found)


def _install_bound(program, op):
    """Cycles the op's recorded work takes at its unit's fastest rate and the SRAM's bandwidth, the most a chip
    can run it in but for installing its weights."""
    chip = program.system.chip
    rate = chip.matrix_macs_per_cycle[max(chip.matrix_macs_per_cycle, key=chip.matrix_macs_per_cycle.get)] * 2
    return max(1, math.ceil(max(op.flops_per_chip / rate, op.sram_bytes_per_chip / chip.sram_bytes_per_cycle)))


def test_a_matrix_op_faster_than_its_weights_install(program):
    """Decode is bound by installing weights into the matrix unit, not by its operations or the SRAM's bandwidth:
    every matrix op cut to the cycles its recorded operations and SRAM bytes take (so _unit_overlap's bound
    holds) is caught by the cycles its chips need to install the model's weights at the chip's rate."""
    ops = [dataclasses.replace(o, end_cycle=o.start_cycle + _install_bound(program, o)) if o.unit == "matrix" else o
           for o in program.decode.ops]
    found = verify(_with_decode(program, ops=ops))
    assert found and {v.invariant for v in found} == {"unit_overlap"}
    spec, install_rate = program.spec, program.system.chip.matrix_install_bytes_per_cycle
    q_bytes = spec.d_model * spec.n_heads * spec.head_dim  # int8: one byte a weight
    q = next(o for o in ops if o.name == "blk.0.attn_q")
    chip_cycles = (q.end_cycle - q.start_cycle) * len(program.placement.stages[q.stage].chips)
    assert (f"decode: blk.0.attn_q records {chip_cycles} install cycles over its parts' chips; the model's "
            f"blk.0.attn_q takes {q_bytes / install_rate:,.0f} at the least") in [v.message for v in found]


def test_a_kv_head_shared_by_chips_is_installed_whole_on_each(program):
    """Gemma 3 270M has one KV head, so each of the 4 chips of its groups holds the head's keys and values whole
    and installs them all, as it does the whole attn_k and attn_v weights. Those ops cut to a quarter of that
    (what the group would take were the head split over its chips), and no shorter than their recorded
    operations and SRAM bytes take, are caught (but in the layer whose attention two stages split, whose parts
    each compute k and v, from copies)."""
    spec, rate, t = program.spec, program.system.chip.matrix_install_bytes_per_cycle, program.placement.tp
    assert spec.n_kv_heads == 1 and t == 4
    kv_head = {"attn_k": spec.d_model * spec.head_dim, "attn_v": spec.d_model * spec.head_dim}  # int8 bytes

    def quartered(op):
        layer, kind = layer_of[op.name], op.name.split(".")[2]
        installed = kv_head[kind] if kind in kv_head else 2 * program.kv_slots[layer] * spec.head_dim
        return dataclasses.replace(op, end_cycle=op.start_cycle + max(_install_bound(program, op),
                                                                      math.ceil(installed / t / rate)))
    layer_of = {o.name: int(m[1]) for o in program.decode.ops if (m := re.match(r"blk\.(\d+)\.", o.name))}
    split = {layer_of[o.name] for o in program.decode.ops if "@" in o.name and o.name in layer_of}
    shared = [o for o in program.decode.ops if o.name in layer_of and layer_of[o.name] not in split
              and (o.kind == "attention" or o.name.split(".")[-1] in kv_head)]
    ops = [quartered(o) if o in shared else o for o in program.decode.ops]
    assert sum(o.end_cycle - o.start_cycle for o in ops) < sum(o.end_cycle - o.start_cycle for o in program.decode.ops)
    found = verify(_with_decode(program, ops=ops))
    assert {v.invariant for v in found} == {"unit_overlap"}
    # caught over the group's chips, and on each chip: every one installs the head whole
    assert {m.split(" records ")[0].removeprefix("decode: ") for m in (v.message for v in found)
            if " records " in m} == {o.name for o in shared}
    assert {m.split(" runs ")[0].removeprefix("decode: ") for m in (v.message for v in found)
            if " records " not in m} == {o.name for o in shared if o.kind != "attention"}


@pytest.mark.parametrize("phase", ["decode", "prefill"])
def test_an_op_recording_less_work_than_the_models(program, phase):
    """An op's recorded work bounds its cycles, so it is itself bounded by the model's: the operations and SRAM
    bytes of the graph's op, over its parts and their chips. One op's record cut to a hundredth is caught."""
    ops = list(getattr(program, phase).ops)
    i = next(k for k, o in enumerate(ops) if o.name.endswith("blk.2.ffn_up"))
    ops[i] = dataclasses.replace(ops[i], flops_per_chip=ops[i].flops_per_chip / 100,
                                 sram_bytes_per_chip=ops[i].sram_bytes_per_chip / 100)
    tampered = dataclasses.replace(program, **{phase: dataclasses.replace(getattr(program, phase), ops=tuple(ops))})
    found = verify(tampered)
    said = [(v.invariant, v.message.split(" records ")[0]) for v in found]
    assert said == [("structure", f"{phase}: {ops[i].name}")] * 2
    assert "operations over its parts' chips; the model's blk.2.ffn_up takes" in found[0].message
    assert "SRAM bytes over its parts' chips" in found[1].message


def test_a_transfer_reading_itself_is_reported_not_recursed(program):
    transfers = list(program.decode.transfers)
    transfers[0] = dataclasses.replace(transfers[0], inputs=(transfers[0].name,))
    found = verify(_with_decode(program, transfers=transfers))
    assert any(f"{transfers[0].name} starts at cycle" in v.message for v in found)


def test_a_decode_step_claiming_more_users_than_its_ops_work_for():
    """Throughput is read off the users a decode step carries, so its ops must do their work: a micro-batch of 2
    of 4 users relabelled as all 4, its ops unchanged, is caught by the model's work for 4 rows, and by the keys
    and values of 4 users its attention would install."""
    program = compile_program(load_preset("gemma-3-270m"), SYSTEM,
                              Workload(context_length=2048, prompt_len=200, prefill_chunk=128, users=4), chips=16)
    assert program.decode.tokens == 2 and verify(program) == []
    claimed = dataclasses.replace(program, decode=dataclasses.replace(program.decode, tokens=4))
    found = verify(claimed)
    assert found and {v.invariant for v in found} == {"structure", "unit_overlap"}
    assert any(v.message.startswith("decode: blk.0.ffn_up records ") and " operations over" in v.message for v in found)
    assert any(v.message.startswith("decode: blk.0.attention records ") and " install cycles" in v.message
               for v in found)


def test_a_transfer_carries_what_it_names_and_shares_no_name(program):
    """A transfer is read as the result it carries: one carrying nothing, named like the op it claims to be (or
    like a part of it), arriving before that op has even started, fed a reader early (a reviewer's find); named
    exactly like the op, it took the op's place among the results."""
    ops = list(program.decode.ops)
    k = next(k for k, o in enumerate(ops) if o.name == "blk.0.attn_q_norm")
    for name, says in (("blk.0.attn_q@7", "decode: transfer blk.0.attn_q@7 carries nothing (it has no inputs)"),
                       ("blk.0.attn_q", "decode: op and transfer are both named blk.0.attn_q")):
        phantom = Transfer(name=name, kind="all_reduce", stage=0, chips=program.placement.stages[0].chips, path=(),
                           payload_bytes=0.0, phases=((99, 100, ()),), start_cycle=99, arrival_cycle=100, inputs=())
        early = dataclasses.replace(ops[k], inputs=(name,))
        found = verify(_with_decode(program, ops=ops[:k] + [early] + ops[k + 1:],
                                    transfers=list(program.decode.transfers) + [phantom]))
        assert {v.invariant for v in found} == {"structure"} and any(v.message.startswith(says) for v in found)


def test_a_stage_fed_by_transfers_carrying_nothing(program):
    """Stage 0's results reach stage 1 through a stripe, its gather and a rank-to-rank send: each replaced by a
    transfer carrying nothing, of no bytes, named like the op whose result it stands for, let stage 1 start at
    once (a reviewer's find: timing then read a faster step)."""
    d, stage0 = program.decode, {o.name for o in program.decode.ops if o.stage == 0}
    hand_offs = {t.name: t for t in d.transfers if t.stage == 1 and set(t.inputs) & stage0}
    hand_offs |= {t.name: t for t in d.transfers if set(t.inputs) & set(hand_offs)}
    stands_for = {name: name.split(">")[0] + "@x" for name in hand_offs}
    phantoms = [Transfer(name=n, kind="broadcast", stage=1, chips=program.placement.stages[1].chips, path=(),
                         payload_bytes=0.0, phases=((0, 1, ()),), start_cycle=0, arrival_cycle=1, inputs=())
                for n in sorted(set(stands_for.values()))]
    ops = [dataclasses.replace(o, inputs=tuple(stands_for.get(i, i) for i in o.inputs)) for o in d.ops]
    found = verify(_with_decode(program, ops=ops, transfers=[t for t in d.transfers if t.name not in hand_offs]
                                + phantoms))
    assert found and {v.invariant for v in found} == {"structure"}
    assert all("carries nothing" in v.message for v in found), found


def test_outputs_and_payloads_are_at_least_the_models(program):
    """With SRAM cut to the weights and KV cache, the Program fails for its activations; every op's output, every
    transfer's payload and its links' bytes claimed 0, it passed (a reviewer's find). Each op holds at least its
    graph op's output over its parts' chips, and each transfer carries at least the result it carries."""
    from openlpu.compiler.verify import static_sram_bytes

    tight = dataclasses.replace(program, system=dataclasses.replace(program.system, chip=dataclasses.replace(
        program.system.chip, sram_bytes=int(max(static_sram_bytes(program).values())) + 1000)))
    assert "sram_capacity" in _invariants(tight)

    def claimed_empty(phase):
        ops = tuple(dataclasses.replace(o, output_bytes_per_chip=0.0) for o in phase.ops)
        transfers = tuple(dataclasses.replace(t, payload_bytes=0.0, phases=tuple(
            (s, a, tuple((x, y, 0.0) for x, y, _ in links)) for s, a, links in t.phases)) for t in phase.transfers)
        return dataclasses.replace(phase, ops=ops, transfers=transfers)
    found = verify(dataclasses.replace(tight, decode=claimed_empty(tight.decode), prefill=claimed_empty(tight.prefill)))
    messages = [v.message for v in found if v.invariant == "structure"]
    d = program.decode
    assert (f"decode: blk.0.attn_q records 0 output bytes over its parts' chips; the model's blk.0.attn_q takes "
            f"{d.ops[[o.name for o in d.ops].index('blk.0.attn_q')].output_bytes_per_chip * 4:,.0f} at the least"
            in messages)
    stripe = next(t for t in d.transfers if t.kind == "stripe")
    assert any(m.startswith(f"decode: transfer {stripe.name} carries 0 bytes; ") for m in messages)
    assert any(m.startswith("prefill: transfer c1/sample.allreduce carries 0 bytes; ") for m in messages)


def test_the_sampled_token_is_reduced_and_returned(program):
    """A decode step ends with the token back on every chip of the embedding's stage (timing reads a token's
    latency off the makespan): without its return, or also without the all-reduce that picks it from the chips'
    shares of the vocabulary, and the makespan cut to what is left, the step passed as shorter (a reviewer's
    find). A prefill's first token is picked the same way."""
    d = program.decode

    def without(phase, names):
        transfers = [t for t in phase.transfers if t.name not in names]
        last = max([o.end_cycle for o in phase.ops] + [t.arrival_cycle for t in transfers])
        return dataclasses.replace(phase, transfers=tuple(transfers), makespan_cycles=last)
    found = verify(dataclasses.replace(program, decode=without(d, {"token_return", "token_return.bcast"})))
    assert [v.message for v in found] == [("decode: the sampled token (sample.allreduce) never reaches chips [0, 1, 2, "
                                           "3] of stage 0, whose embedding the next step reads there")]
    # each chip of the stage looks the token up in its share of the table: it reached the first alone (a review)
    found = verify(dataclasses.replace(program, decode=without(d, {"token_return.bcast"})))
    assert [v.message for v in found] == [("decode: the sampled token (sample.allreduce) never reaches chips [1, 2, 3] "
                                           "of stage 0, whose embedding the next step reads there")]
    found = verify(dataclasses.replace(program, decode=without(d, {"token_return", "token_return.bcast",
                                                                   "sample.allreduce"})))
    assert [v.message for v in found] == [
        ("decode: sample leaves each of stage 1's 4 chips its share of the vocabulary's (value, index); no all-reduce "
         "over them picks the token")]
    found = verify(dataclasses.replace(program, prefill=without(program.prefill, {"c1/sample.allreduce"})))
    assert [v.invariant for v in found] == ["input_not_ready"] and "c1/sample leaves each" in found[0].message


def test_a_program_file_claiming_a_workload_no_compile_makes_is_refused(program, tmp_path):
    """A Program file whose workload says a 2,000,000-token context and prompt in chunks of one token (a reviewer's
    edit of a compiled one) made `openlpu inspect` allocate gigabytes; longer than the model's context window, it
    is refused as it loads, in one line, as compiling refuses it."""
    data = encode(program)
    body = json.loads(gzip.decompress(data[HEADER_BYTES:]))
    body["workload"].update(context_length=2_000_000, prompt_len=2_000_000, prefill_chunk=1)
    payload = gzip.compress(json.dumps(body).encode(), mtime=0)
    path = tmp_path / "edited.prog"
    path.write_bytes(MAGIC + data[len(MAGIC):len(MAGIC) + 4] + hashlib.sha256(payload).digest() + payload)
    with pytest.raises(OpenLPUError, match="edited.prog is corrupt \\(its workload: context 2000000 is longer than "
                                           "gemma-3-270m's context window \\(32768 tokens\\)") as refused:
        load_program(path)
    assert "\n" not in str(refused.value)


def test_a_workload_claiming_waves_the_prefill_does_not_hold_is_not_lowered(program):
    """Within the context window, a workload claiming a prompt of 2,048 one-token chunks (the most a compile
    schedules) over a prefill holding 2 is a structure fault, found before the model's graph is lowered for each
    chunk claimed; so is any other structure fault (layers keeping other KV slots than the workload's context)."""
    w = program.workload
    claimed = dataclasses.replace(w, prompt_len=w.context_length, prefill_chunk=1)
    found = verify(dataclasses.replace(program, workload=claimed))
    assert [v.message for v in found] == [
        "the prefill schedules 2 prompt chunks; its workload's 2,048-token prompt in chunks of 1 makes 2,048",
        "the prefill phase is scheduled for 200 tokens, not the 2,048 tokens of its workload's prompt"]
    longer = dataclasses.replace(w, context_length=32768, prompt_len=32768, prefill_chunk=16)
    found = verify(dataclasses.replace(program, workload=longer))
    assert {v.invariant for v in found} == {"structure"} and "KV slots per user" in found[0].message
    assert not any("never runs" in v.message or " records " in v.message for v in found)
