"""Timing read off the schedule, checked against bounds computed a second way from the placement."""

import dataclasses
import math
from collections import defaultdict

import pytest

from openlpu.compiler import Workload, compile_program, verify
from openlpu.compiler.partition import tensor_piece
from openlpu.compiler.schedule import (
    matrix_macs_per_cycle,
    schedule_phase,
    stage_occupancy_cycles,
)
from openlpu.graph.lower import lower
from openlpu.hardware.lpu import load_system
from openlpu.models.spec import load_preset
from openlpu.sim.timing import draw_gantt, gantt_title, placement_rows, timing

SYSTEM = load_system("lpu-v1")
W = Workload(context_length=2048, prompt_len=256, users=1)


def _compile(name, chips=None, workload=W, tp=None):
    return compile_program(load_preset(name), SYSTEM, workload, chips, tp)


@pytest.fixture(scope="module")
def qwen():
    return _compile("qwen3-8b")


def _matrix_shards(p):
    """The shards the matrix unit installs (embedding rows and norms are not matmuls)."""
    return [sh for sh in p.placement.shards if sh.tensor != "token_embd.weight" and not sh.tensor.endswith("norm.weight")]


def _matrix_weight_bytes_per_stage(p):
    """Per stage, the most matrix-weight bytes one chip holds."""
    per_chip = defaultdict(int)
    for sh in _matrix_shards(p):
        per_chip[sh.chip] += sh.nbytes
    return [max(per_chip[c] for c in s.chips) for s in p.placement.stages]


def _matrix_weight_bytes_on_the_path(p):
    """Per piece (a layer's attention or MLP, the head), the most matrix-weight bytes one chip holds of
    it. Pieces follow one another, and the parts of a piece cut between stages install side by side, so
    one user's step installs at least the sum of these on its critical path."""
    n_layers, stage_of = load_preset(p.model).n_layers, {c: s.index for s in p.placement.stages for c in s.chips}
    held = defaultdict(int)
    for sh in _matrix_shards(p):
        held[tensor_piece(sh.tensor, n_layers), stage_of[sh.chip], sh.chip] += sh.nbytes
    most = defaultdict(int)
    for (piece, _, _), nbytes in held.items():
        most[piece] = max(most[piece], nbytes)
    return sum(most.values())


@pytest.mark.parametrize("tp", [None, 4, 2, 1])
def test_decode_is_bound_by_installing_the_weights(tp):
    """Batch-1 decode on a weight-stationary MXM: every chip installs each weight it holds once per token,
    and one user's pieces run one after another, so the step takes at least the sum over pieces of
    (weights per chip / install rate), far above the SRAM-bandwidth bound; links add only a little.
    The same holds at any TP width inside a node: at TP 4, 2 and 1 the fewest chips cut MLPs between
    stages."""
    p = compile_program(load_preset("qwen3-8b"), SYSTEM, W, tp=tp)
    t = timing(p)
    assert tp is None or p.placement.tp == tp
    install = SYSTEM.chip.matrix_install_bytes_per_cycle * SYSTEM.chip.clock_hz
    on_path = _matrix_weight_bytes_on_the_path(p)
    bound = on_path / install
    assert t.decode_latency_s >= bound
    assert t.decode_latency_s < 1.3 * bound
    assert bound > 5 * on_path / SYSTEM.chip.sram_bandwidth_bytes_per_s


@pytest.mark.parametrize("tp", [None, 1])
def test_each_matmul_of_a_decode_step_lasts_its_install(tp):
    """At batch 1 each dense matmul lasts what its chips take to install their share of its weight, read here off
    the placement's shards (the largest one chip of its stage holds) at the preset's install rate, to within the
    cycle a byte's rounding makes. A review found a matmul's install lengthened a fifth passed every test: the
    step's bound above is loose by up to 8%."""
    p = compile_program(load_preset("qwen3-8b"), SYSTEM, W, tp=tp)
    rate = SYSTEM.chip.matrix_install_bytes_per_cycle
    stage_of = {c: s.index for s in p.placement.stages for c in s.chips}
    largest = defaultdict(int)
    for sh in p.placement.shards:
        largest[(sh.tensor, stage_of[sh.chip])] = max(largest[(sh.tensor, stage_of[sh.chip])], sh.nbytes)
    weight_of = {op.name: op.weight for op in lower(p.spec, "decode", W.context_length, 1, W.weights)}
    matmuls = [op for op in p.decode.ops if op.kind == "matmul"]
    assert len(matmuls) >= 7 * p.spec.n_layers
    for op in matmuls:
        shard = largest[(weight_of[op.name.split("@")[0]], op.stage)]
        assert abs(op.end_cycle - op.start_cycle - math.ceil(shard / rate)) <= 1, op.name


def test_moe_schedule_reserves_every_expert():
    """Routing is data dependent and the schedule static: each expert matmul lasts as long as installing
    the chip's share of ALL experts (read off the placement's shards), not just the top-k."""
    p = _compile("mixtral-8x7b", 272, Workload(context_length=1024, prompt_len=128))
    rate = SYSTEM.chip.matrix_install_bytes_per_cycle
    held = {}
    for sh in p.placement.shards:
        held[(sh.tensor, sh.chip)] = sh.nbytes
    stage_chips = {s.index: s.chips for s in p.placement.stages}
    expert_ops = [o for o in p.decode.ops if o.name.endswith("_exps")]
    assert len(expert_ops) == 3 * 32
    for op in expert_ops:
        tensor = op.name + ".weight"
        shard = max(held[(tensor, c)] for c in stage_chips[op.stage])
        assert op.end_cycle - op.start_cycle >= shard / rate
        assert op.end_cycle - op.start_cycle <= shard / rate + 2


def test_parts_of_a_cut_mlp_install_at_the_same_time():
    """Mixtral on 576 chips (72 stages of TP 8 for 32 layers) cuts each MLP into 3 or 4 equal slices, one
    per stage. Nothing orders the slices (each needs only the residual; their sums meet after), so the
    static schedule installs them at once: the step takes about the attention plus one slice per layer
    (the bytes on the critical path, read a second way from the shards, and at most a quarter more for
    the hops and sums), under half the sum over stages of their install times (MLPs are 97% of a Mixtral
    layer's bytes), not all of it as an uncut pipeline does."""
    p = _compile("mixtral-8x7b", 576, Workload(context_length=4096, prompt_len=512), tp=8)
    slices = [sum(pc[:2] == (i, "ffn") for s in p.placement.stages for pc in s.pieces) for i in range(32)]
    assert set(slices) == {3, 4}
    install = SYSTEM.chip.matrix_install_bytes_per_cycle * SYSTEM.chip.clock_hz
    sequential = sum(_matrix_weight_bytes_per_stage(p)) / install
    on_path = _matrix_weight_bytes_on_the_path(p) / install
    assert on_path <= timing(p).decode_latency_s <= min(1.25 * on_path, 0.5 * sequential)


@pytest.mark.parametrize("model, workload, chips", [
    ("llama-3.3-70b", Workload(context_length=8192, prompt_len=512, users=8), (384, 576, 768)),
    ("mixtral-8x7b", Workload(context_length=2048, prompt_len=512, users=8), (224, 336, 448)),
    ("llama-3-8b", Workload(context_length=8192, prompt_len=512), (40, 64, 80, 160)),
    ("qwen3-30b-a3b", Workload(context_length=512, prompt_len=512), (192, 288, 576)),
    ("gpt-oss-20b", Workload(context_length=8192, prompt_len=512), (104, 160, 216))])
def test_more_stages_decode_no_slower(model, workload, chips):
    """From the fewest chips up, more TP groups of the same width give more stage boundaries to fall
    inside MLPs, whose slices install side by side, so decode per user never slows as stages are added.
    (With whole halves on the extra stages, run one after another, Mixtral's 336 chips were 18% slower
    than its 224.) Each Program holds every invariant."""
    speeds = []
    for n in chips:
        program = compile_program(load_preset(model), SYSTEM, workload, n, tp=8)
        assert program.chips == n and verify(program) == []
        speeds.append(timing(program).tokens_per_s_per_user)
    assert speeds == sorted(speeds), speeds


# the presets up to 120B when the property below was established (2026-11), named so that presets added later do
# not change its draws (drawn with Gemma 3 4B to 27B added, they found a counterexample, which
# test_the_spread_finds_the_most_cuts_that_arrange keeps)
RANDOM_REQUEST_MODELS = [
    "gemma-2-9b", "gemma-3-1b", "gemma-3-270m", "gemma-7b", "gpt-oss-120b", "gpt-oss-20b", "llama-2-13b",
    "llama-2-70b", "llama-2-7b", "llama-3-70b", "llama-3-8b", "llama-3.1-70b", "llama-3.1-8b", "llama-3.2-1b",
    "llama-3.2-3b", "llama-3.3-70b", "llama-4-scout", "mistral-7b", "mixtral-8x7b", "qwen2.5-72b", "qwen2.5-7b",
    "qwen3-30b-a3b", "qwen3-32b", "qwen3-8b"]


@pytest.mark.slow  # about 40 s: 80 Programs
def test_random_requests_decode_no_slower_on_more_stages():
    """The property behind the test above, over 40 seeded random requests (model presets up to 120B,
    int8 / fp16 / int4, 512 to 32,768 tokens, 1 to 8 users): each compiled at its fewest chips and again at
    1.25x to 3x the stages at the same TP width, both Programs verify, and from 3 stages up the more
    stages decode at least 99% as fast per user (before the spread arrangement, at 7014d2e, 18 of them
    did not). Below 3 stages there may be no cut that pays for the hop (Gemma 3 270M decodes 26% slower
    on 2 stages than on 1), so those are only verified."""
    import random

    names = RANDOM_REQUEST_MODELS  # named, so that a preset added later does not change the draws
    slower = []
    for seed in range(40):
        pick = random.Random(seed)
        spec = load_preset(pick.choice(names))
        precision = pick.choice(["int8", "int8", "fp16", "int4"])
        context, users = pick.choice([512, 2048, 8192, 32768]), pick.choice([1, 1, 4, 8])
        workload = Workload(weights=precision, activations=precision, kv=precision,
                            context_length=min(context, spec.context_length), users=users, prompt_len=min(512, context))
        fewest = compile_program(spec, SYSTEM, workload)
        stages, tp = len(fewest.placement.stages), fewest.placement.tp
        more_stages = max(stages + 1, round(stages * pick.choice([1.25, 1.5, 2, 3])))
        more = compile_program(spec, SYSTEM, workload, more_stages * tp, tp=tp)
        assert verify(fewest) == [] and verify(more) == [], (seed, spec.name)
        speeds = timing(fewest).tokens_per_s_per_user, timing(more).tokens_per_s_per_user
        if stages >= 3 and speeds[1] < 0.99 * speeds[0]:
            slower.append((seed, spec.name, stages, len(more.placement.stages), speeds))
    assert slower == []


@pytest.mark.parametrize("model, precision, stages, band", [
    ("llama-3.3-70b", "int8", 85, (77, 83)), ("qwen3-32b", "fp16", 118, (12, 52))])
def test_the_spread_finds_the_most_cuts_that_arrange(model, precision, stages, band):
    """Which counts of MLP cuts arrange is not monotone: each cut begins a stage, so a few cuts can take more stages
    than none or all, or only a band in the middle arranges. Llama 3.3 70B (80 layers) at 32,768 tokens for 8 users
    on 85 stages of TP 8 (a stage holds about one layer: 8 users' K/V take 67 MB a chip beside 107 MB of weights)
    arranges with 0 to 4 and 77 to 83 cuts, and a bisection found 4 (188 tok/s per user, slower than its fewest 65
    stages' 201; the random-request property above found it); Qwen3 32B at fp16 on 118 stages arranges with 12 to
    52, which stepping down from all the cuts misses (the review of that fix: 234 tok/s against 256). The second
    method, a scan of every count: the spread takes the most that arrange, and the Programs verify."""
    from openlpu.compiler.partition import (
        cut_starts,
        fitting_cuts,
        size_table,
        spread_over_stages,
        spread_with_cuts,
    )

    spec = load_preset(model)
    workload = Workload(context_length=32768, users=8, prompt_len=512, weights=precision, activations=precision,
                        kv=precision, prefill_chunk=256)
    table, capacity, tile = size_table(spec, workload, 8), SYSTEM.chip.sram_bytes, SYSTEM.chip.matrix_tile_rows
    least = fitting_cuts(spec, table, capacity, tile)[0]
    scan = [c for c in range(stages) if spread_with_cuts(spec, table, stages, capacity, tile, least, c)]
    assert max(scan) == band[1] and min(c for c in scan if c > 5) == band[0]  # the shapes the docstring gives
    assert len(cut_starts(spread_over_stages(spec, table, stages, capacity, tile)[0])) == max(scan)
    program = compile_program(spec, SYSTEM, workload, stages * 8, tp=8)
    assert verify(program) == []
    if model == "llama-3.3-70b":  # every MLP cut, and faster than the fewest stages
        fewest = compile_program(spec, SYSTEM, dataclasses.replace(workload, prefill_chunk=None), tp=8)
        assert timing(program).tokens_per_s_per_user > timing(fewest).tokens_per_s_per_user


def test_stages_between_the_fewest_and_one_a_layer_decode_faster():
    """Llama 3.3 70B at 32,768 tokens for 8 users in groups of 8: a stage holds about one layer (67 MB of K/V a
    chip beside 107 MB of weights) and cannot hold two attentions with the MLP between, so on fewer stages than
    the layers some boundaries must fall inside attentions or between pieces. With boundaries inside MLPs only
    (the spread) 65 to 80 stages decoded at the fewest's 201 tok/s per user; cutting each piece once where a
    dynamic program places the boundaries (single_cut_stages), more stages decode faster: the speeds read off
    the schedules rise with the stages, 80 at least 1.25x the fewest, and the Programs verify."""
    spec = load_preset("llama-3.3-70b")
    workload = Workload(context_length=32768, users=8, prompt_len=512, prefill_chunk=256)
    fewest = compile_program(spec, SYSTEM, workload, tp=8)
    programs = [fewest] + [compile_program(spec, SYSTEM, workload, stages * 8, tp=8) for stages in (72, 76, 80)]
    assert [len(p.placement.stages) for p in programs[1:]] == [72, 76, 80] and len(fewest.placement.stages) < 72
    speeds = [timing(p).tokens_per_s_per_user for p in programs]
    assert speeds == sorted(speeds) and speeds[-1] > 1.25 * speeds[0], speeds
    assert all(verify(p) == [] for p in programs[1:])

def test_a_moe_whose_rows_cannot_be_cut_spreads_its_experts():
    """Qwen3-30B-A3B's experts have 768 rows of d_ff, 96 a chip at TP 8: fewer than a 320-row weight tile, so
    rows cannot cut its MoE layers between stages, and the extra stages of 576 chips only add hops. Cut by
    expert rows instead, each stage holds and installs a run of a layer's experts beside the other runs:
    more than 1.5x the speed of the placement by rows, read off both schedules."""
    from openlpu.compiler.partition import partition, piece_homes

    spec, workload = load_preset("qwen3-30b-a3b"), Workload(context_length=512, prompt_len=512)
    program = compile_program(spec, SYSTEM, workload, 576)
    rows = partition(spec, SYSTEM, workload, 576, experts=False)
    assert program.placement.experts and not rows.experts and verify(program) == []
    assert all(len(homes) == 1 for (_, part), homes in piece_homes(rows).items() if part == "ffn")
    assert max(len(homes) for (_, part), homes in piece_homes(program.placement).items() if part == "ffn") > 1
    by_rows = schedule_phase(spec, SYSTEM, workload, rows, "decode")
    assert program.decode.makespan_cycles < by_rows.makespan_cycles / 1.5


def test_a_longer_context_costs_decode_its_kv_installs_not_its_mlp_cuts():
    """Llama 3 70B on 576 chips (72 stages x TP 8) at 4,096 and 8,192 tokens: both arrangements place all
    71 stage boundaries inside MLPs, at 8,192 with the slices next to over-full stages moved off equal
    (partition.fitted_slices), so the longer context slows the step by about the installs of its extra K
    and V: at most twice them, the rest being the moved slices. (In equal slices only 35 boundaries fit
    at 8,192 tokens, and the step was 26% longer than at 4,096.)"""
    from openlpu.compiler.partition import piece_homes

    spec, steps = load_preset("llama-3-70b"), {}
    for context in (4096, 8192):
        program = compile_program(spec, SYSTEM, Workload(context_length=context, prompt_len=512), 576, tp=8)
        homes = piece_homes(program.placement)
        assert sum(len(homes[(i, "ffn")]) - 1 for i in range(spec.n_layers)) == 71 and verify(program) == []
        steps[context] = timing(program).decode_latency_s
    # the extra 4,096 positions' K and V (int8) on one chip of each stage, summed along the pipeline
    kv_bytes = spec.n_layers * 4096 * 2 * spec.n_kv_heads // 8 * spec.head_dim
    installs_s = kv_bytes / (SYSTEM.chip.matrix_install_bytes_per_cycle * SYSTEM.chip.clock_hz)
    assert 0 < steps[8192] - steps[4096] <= 2 * installs_s, (steps, installs_s)


def test_ttft_no_faster_than_peak_compute(qwen):
    t = timing(qwen)
    spec = load_preset("qwen3-8b")
    flops = 2 * W.prompt_len * (spec.param_count() - spec.vocab_size * spec.d_model)  # matmuls alone
    peak = qwen.chips * 2 * SYSTEM.chip.matrix_macs_per_cycle["int8"] * SYSTEM.chip.clock_hz
    assert t.ttft_s >= flops / peak


def test_tiny_model_is_bound_by_link_latency():
    """gemma-3-270m on 8 chips: every all-reduce costs at least two local hops (reduce-scatter and
    all-gather), and they sit on the critical path one after another."""
    p = _compile("gemma-3-270m", 8)
    spec = load_preset("gemma-3-270m")
    all_reduces = 2 * spec.n_layers + 2
    assert timing(p).decode_latency_s >= all_reduces * 2 * SYSTEM.links["local"].latency_s


def test_a_tp_group_of_one_chip_nodes_all_reduces_over_the_links_between_them():
    """Nodes of one chip: a TP group of 2 spans two nodes, so its all-reduces have no step inside a node,
    only the two steps between the nodes (reduce-scatter and all-gather), each over a link that joins them."""
    pipeline_only = dataclasses.replace(SYSTEM, node=dataclasses.replace(SYSTEM.node, chips=1, global_links_per_chip=24))
    p = compile_program(load_preset("gemma-3-270m"), pipeline_only,
                        Workload(context_length=512, prompt_len=64, prefill_chunk=64), tp=2)
    assert p.placement.tp == 2 and verify(p) == []
    all_reduces = [t for t in p.decode.transfers if t.kind == "all_reduce"]
    assert all_reduces and all(len(t.phases) == 2 for t in all_reduces)
    assert all({(a, b) for _, _, links in t.phases for a, b, _ in links} == {t.chips, t.chips[::-1]}
               for t in all_reduces)


def test_wider_tp_is_faster_per_token_until_links_dominate():
    narrow, wide = _compile("qwen3-8b", 44, tp=4), _compile("qwen3-8b", 88, tp=8)
    assert (narrow.placement.tp, wide.placement.tp) == (4, 8)
    assert len(narrow.placement.stages) == len(wide.placement.stages)
    ratio = timing(wide).decode_latency_s / timing(narrow).decode_latency_s
    # twice the chips per layer: faster, by about the bytes a chip installs on the critical path (under half,
    # as a stage twice the size has room to cut more MLPs between stages), the links taking a little back
    assert _matrix_weight_bytes_on_the_path(wide) / _matrix_weight_bytes_on_the_path(narrow) <= ratio < 1.0
    # the same TP, twice the stages: more hops, but every stage boundary now cuts an MLP into slices that
    # install side by side, which saves more
    deeper = _compile("qwen3-8b", 176, tp=8)
    assert deeper.placement.tp == 8 and timing(deeper).decode_latency_s < timing(wide).decode_latency_s


def test_users_in_flight_fill_the_pipeline():
    """The same Program (placed for 4 users' KV) timed with 1 and with 4 users in flight."""
    w4 = Workload(context_length=2048, prompt_len=256, users=4)
    program = _compile("llama-3.1-8b", workload=w4)
    four = timing(program)
    one = timing(dataclasses.replace(program, workload=dataclasses.replace(w4, users=1)))
    assert four.stages >= 4
    assert one.throughput_tokens_per_s < four.throughput_tokens_per_s <= 4 * one.throughput_tokens_per_s * 1.001
    assert four.tokens_per_s_per_user <= one.tokens_per_s_per_user * 1.001


def test_users_beyond_the_stages_share_micro_batches():
    """20 users on a 5-stage pipeline. Scheduled one user per step, each user waits for the 19 others'
    turns at the busiest stage. The compiler groups them into micro-batches of r users, the fewest that
    let all 20/r turns pass that stage within one step. Each weight is installed once per micro-batch,
    so a matmul lasts as long as for one user, while an attention installs each user's own keys and
    values: r times as long."""
    w = Workload(context_length=512, prompt_len=128, users=20)
    spec, program = load_preset("qwen3-8b"), _compile("qwen3-8b", workload=w)
    single = schedule_phase(spec, SYSTEM, w, program.placement, "decode")
    r, busiest = program.decode.tokens, max(stage_occupancy_cycles(single).values())
    assert len(program.placement.stages) == 5 and single.tokens == 1 and r > 1
    assert 20 / r * busiest <= single.makespan_cycles < 20 / (r - 1) * busiest
    one = {op.name: op.end_cycle - op.start_cycle for op in single.ops}
    for op in program.decode.ops:
        if op.kind == "matmul":
            assert op.end_cycle - op.start_cycle == one[op.name]
        elif op.kind == "attention":
            assert r * one[op.name] - r <= op.end_cycle - op.start_cycle <= r * one[op.name]
    batched, in_turns = timing(program), timing(dataclasses.replace(program, decode=single))
    assert batched.micro_batch == r and in_turns.micro_batch == 1
    assert in_turns.tokens_per_s_per_user == pytest.approx(SYSTEM.chip.clock_hz / (20 * busiest))
    assert 3 * in_turns.throughput_tokens_per_s < batched.throughput_tokens_per_s <= 20 / batched.decode_latency_s


def test_users_share_a_micro_batch_only_when_it_serves_them_sooner():
    """Qwen3 8B at fp16 for 16 users of 16,384 tokens on 304 chips. On the balanced stages, 16 turns at
    the busiest stage outlast one user's step, so decode_rows asks for 2 users per micro-batch; but that
    step, which installs each user's keys and values in turn, outlasts the 16 turns, and is rejected.
    On the stages spread for the shortest step, 2 users per step serve each user sooner. The Program has
    the shortest of the periods kept (timing's, recomputed here from the candidates' schedules), and a
    context half as long on the same chips is no slower."""
    from openlpu.compiler.partition import partition
    from openlpu.compiler.schedule import decode_figures, decode_period_cycles, decode_rows

    spec = load_preset("qwen3-8b")
    w = Workload(weights="fp16", activations="fp16", kv="fp16", context_length=16384, users=16, prompt_len=512)
    kept = {}
    for balance in (False, True):
        single = schedule_phase(spec, SYSTEM, w, partition(spec, SYSTEM, w, 304, balance=balance), "decode")
        asked = decode_rows(16, *decode_figures(SYSTEM, single))
        batched = schedule_phase(spec, SYSTEM, w, partition(spec, SYSTEM, w, 304, decode_rows=asked, balance=balance),
                                 "decode", rows=asked)
        periods = [decode_period_cycles(SYSTEM, phase, 16) for phase in (single, batched)]
        assert asked == 2 == batched.tokens and (periods[1] < periods[0]) == (not balance)
        kept[balance] = min(periods)
    program = compile_program(spec, SYSTEM, w, chips=304)
    period = decode_period_cycles(SYSTEM, program.decode, 16)
    assert period == min(kept.values()) and program.decode.tokens == 2
    assert timing(program).tokens_per_s_per_user == pytest.approx(SYSTEM.chip.clock_hz / period)
    shorter = compile_program(spec, SYSTEM, dataclasses.replace(w, context_length=8192), chips=304)
    assert timing(shorter).tokens_per_s_per_user >= timing(program).tokens_per_s_per_user


def test_busy_fractions_count_every_micro_batch():
    """With 20 users in micro-batches, each unit and link works once per micro-batch between a user's tokens: the
    busy fractions, summed here from the Program's ops and transfers, count them all (a review found them read
    for one micro-batch passed every test). The matrix units are busy at least the time their operations take
    at the unit's peak (plan's MFU: installs are busy time too)."""
    program = _compile("qwen3-8b", workload=Workload(context_length=512, prompt_len=128, users=20))
    t = timing(program)
    batches = -(-t.users // t.micro_batch)
    assert batches > 1
    period_s = 1 / t.tokens_per_s_per_user
    chips = {s.index: len(s.chips) for s in program.placement.stages}
    busy = defaultdict(float)
    for op in program.decode.ops:
        busy[op.unit] += (op.end_cycle - op.start_cycle) / SYSTEM.chip.clock_hz * chips[op.stage]
    for unit, seconds in busy.items():
        assert t.unit_utilisation[unit] == pytest.approx(batches * seconds / (t.chips * period_s), rel=1e-6)
    carried = defaultdict(float)
    for transfer in program.decode.transfers:
        for a, b, nbytes in transfer.link_loads():
            kind = SYSTEM.link_kind(a, b)
            carried[kind] += nbytes / SYSTEM.links[kind].bandwidth_bytes_per_s
    assert set(carried) == set(t.link_utilisation)
    for kind, seconds in carried.items():
        assert t.link_utilisation[kind] == pytest.approx(batches * seconds / (t.links_used[kind] * period_s), rel=1e-6)
    flops = sum(op.flops_per_chip * chips[op.stage] for op in program.decode.ops if op.unit == "matrix")
    peak = 2 * matrix_macs_per_cycle(SYSTEM, "int8", "int8") * SYSTEM.chip.clock_hz
    assert batches * flops / (t.chips * period_s * peak) <= t.unit_utilisation["matrix"] <= 1


def test_ttft_is_the_prefill_read_off_the_program(qwen):
    """Time to first token is when the prefill's last op or transfer ends (its makespan), at the preset's clock:
    a review found TTFT scaled by 0.7 passed every test, which compared it with itself or a bound 18x lower."""
    assert timing(qwen).ttft_s == qwen.prefill.makespan_cycles / SYSTEM.chip.clock_hz
    assert qwen.prefill.makespan_cycles == max(
        [op.end_cycle for op in qwen.prefill.ops] + [t.arrival_cycle for t in qwen.prefill.transfers])


def test_power_utilisation_and_energy_are_consistent(qwen):
    t = timing(qwen)
    nodes = -(-t.chips // SYSTEM.node.chips)
    assert nodes > 1  # whole nodes: their hosts' power
    hosts = nodes * SYSTEM.node.host_power_w
    assert t.chips * SYSTEM.chip.idle_power_w + hosts <= t.power_w <= t.chips * SYSTEM.chip.busy_power_w + hosts
    assert t.energy_per_token_j == pytest.approx(t.power_w / t.throughput_tokens_per_s)
    assert all(0 <= u <= 1 for u in t.unit_utilisation.values())
    assert set(t.link_utilisation) == set(t.links_used) and all(0 < u <= 1 for u in t.link_utilisation.values())
    assert max(t.link_utilisation.values()) <= t.busiest_link_utilisation <= 1
    assert t.unit_utilisation["matrix"] > t.unit_utilisation["switch"] == 0
    assert 0 < t.sram_used_fraction <= 1


def test_inspect_views(qwen, tmp_path):
    rows = placement_rows(qwen)
    assert len(rows) == len(qwen.placement.stages)
    assert sum(r["weights_bytes_per_chip"] for r in rows) * qwen.placement.tp >= sum(
        sh.nbytes for sh in qwen.placement.shards if not sh.replicated)
    draw_gantt(qwen, tmp_path / "g.png")
    assert (tmp_path / "g.png").stat().st_size > 10_000
    # every kind of op and transfer in a colour of its own (a merge drew in the residuals' grey)
    from openlpu.graph.ops import OP_KINDS
    from openlpu.sim.timing import KIND_COLOURS, TRANSFER_COLOURS

    colours = {**KIND_COLOURS, **TRANSFER_COLOURS}
    assert set(OP_KINDS) <= set(KIND_COLOURS) and len(set(colours.values())) == len(colours)


def test_gantt_title_names_the_micro_batch_it_shows():
    """With users taking turns in micro-batches, the chart shows one micro-batch's step: its title says how many of
    the users in flight that step carries (it read "(2 users)" for 8 users in micro-batches of 2)."""
    program = _compile("qwen3-8b", workload=Workload(context_length=2048, prompt_len=256, users=8))
    assert 1 < program.decode.tokens < 8
    assert f"one decode step ({program.decode.tokens} of the 8 users)" in gantt_title(program)
    assert "one decode step (1 user), " in gantt_title(_compile("qwen3-8b"))


def test_a_stage_lists_the_chips_it_holds():
    """A TP group spanning nodes can leave the middle of a rack out: its chips read as the runs they are, not as
    one range (Llama 3.3 70B's stage 0 in groups of 64 holds chips 0-31 and 40-71, which read as 0-71)."""
    program = compile_program(load_preset("llama-3.3-70b"), SYSTEM, Workload(context_length=4096), tp=64)
    rows = placement_rows(program)
    for row, stage in zip(rows, program.placement.stages):
        runs = [[int(c) for c in run.split("-")] for run in row["chips"].split(",")]
        assert [c for a, *b in runs for c in range(a, (b or [a])[0] + 1)] == sorted(stage.chips)
    assert any("," in row["chips"] for row in rows)


def test_slow_links_set_the_token_period_with_users_in_flight():
    """Every micro-batch's bytes cross each link once per token, so with slow links between nodes and
    enough users the busiest link, not a stage, sets the period: that link is busy 100% of the time, and
    the period is micro-batches x its time, summed here from the Program's transfers."""
    slow = dataclasses.replace(SYSTEM, links={k: dataclasses.replace(link, bandwidth_bytes_per_s=2e7)
                                              if k != "local" else link for k, link in SYSTEM.links.items()})
    program = compile_program(load_preset("qwen3-8b"), slow, Workload(context_length=256, prompt_len=64, users=20))
    t = timing(program)
    carried = defaultdict(float)
    for transfer in program.decode.transfers:
        for a, b, nbytes in transfer.link_loads():
            carried[(a, b)] += nbytes
    busiest_s = max(nbytes / slow.links[slow.link_kind(*link)].bandwidth_bytes_per_s for link, nbytes in carried.items())
    batches = -(-t.users // t.micro_batch)
    assert batches * busiest_s > max(t.decode_latency_s, batches * t.stage_occupancy_s)
    assert t.tokens_per_s_per_user == pytest.approx(1 / (batches * busiest_s), rel=1e-6)
    assert t.busiest_link_utilisation == pytest.approx(1.0)
    assert all(0 < u <= 1 for u in t.link_utilisation.values())


def test_decode_attention_installs_the_kv_cache_it_attends():
    """With one query row per head group, the cached keys and values are the matrices the queries
    stream through, so a decode attention lasts at least its chip's K and V (from the model's shapes)
    over the install rate, and a longer context slows every token by about that much per layer."""
    spec, rate = load_preset("llama-3.1-8b"), SYSTEM.chip.matrix_install_bytes_per_cycle
    programs = {n: _compile("llama-3.1-8b", 80, Workload(context_length=n, prompt_len=256), tp=8) for n in (4096, 65536)}
    tp = {p.placement.tp for p in programs.values()}.pop()
    assert {len(p.placement.stages) for p in programs.values()} == {80 // tp}  # one layout, two contexts
    kv_cycles = {n: 2 * n * spec.n_kv_heads // tp * spec.head_dim / rate for n in programs}  # int8: 1 byte
    for n, p in programs.items():
        attention = [o for o in p.decode.ops if o.kind == "attention"]
        assert len(attention) == spec.n_layers
        assert all(kv_cycles[n] <= o.end_cycle - o.start_cycle <= kv_cycles[n] * 1.01 + 2 for o in attention)
    extra_s = spec.n_layers * (kv_cycles[65536] - kv_cycles[4096]) / SYSTEM.chip.clock_hz
    slower_s = timing(programs[65536]).decode_latency_s - timing(programs[4096]).decode_latency_s
    assert slower_s == pytest.approx(extra_s, rel=0.02)
