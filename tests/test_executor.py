"""The executor runs compiled Programs: sharded (one virtual chip per Program chip, activations only
over the Program's transfers) must agree with fused (the same ops on whole tensors), fused must agree
with model.py's plain forward, every transfer must move the bytes the schedule prices its links by, and
broken Programs must fail loudly or visibly.

Placements cover tensor parallel (lpu-v1: TP groups inside an 8-chip node), TP + pipeline (8 chips),
pure pipeline (the same system with 1-chip nodes, so no TP group can form), and more stages than the
model has halves, which cuts every MLP between stages (weight tiles of 8 rows, so the tiny models'
96 d_ff rows can be cut).
"""

import dataclasses
import random
import sys
from collections import Counter
from pathlib import Path

import pytest
import torch

from fixtures.tiny_models.hf_tiny import TINY_FAMILIES, build, save
from openlpu.compiler import Workload, compile_program, partition, verify
from openlpu.compiler.partition import EXPERT_ROWS
from openlpu.compiler.schedule import ARGMAX_BYTES, TOKEN_ID_BYTES
from openlpu.errors import OpenLPUError
from openlpu.graph.lower import as_precision
from openlpu.hardware.lpu import load_system
from openlpu.models.hf import load_safetensors, spec_from_hf_config
from openlpu.runtime import executor as executor_module
from openlpu.runtime.executor import Executor, simulated_figures
from openlpu.runtime.kv_cache import KVCache
from openlpu.runtime.model import Model, Partial, Span
from test_families import runtime_weights

TOL = dict(rtol=1e-4, atol=1e-4)  # float32; sums of partials in another order differ by ~1e-6
LPU = load_system("lpu-v1")
# one chip per node: 8 global links join a rack's 9 nodes pairwise, 16 more its 144 links to other racks
PIPELINE_ONLY = dataclasses.replace(LPU, node=dataclasses.replace(LPU.node, chips=1, global_links_per_chip=24))
SMALL_TILES = dataclasses.replace(LPU, chip=dataclasses.replace(LPU.chip, matrix_tile_rows=8))
# chips of 30 kB: a tiny MoE MLP fits none whole, and its 96 rows are fewer than a 320-row weight tile
EXPERT_CUT = dataclasses.replace(LPU, chip=dataclasses.replace(LPU.chip, sram_bytes=30_000))
# chips of 20 kB with 32-row tiles: rows still place nothing (a chip would keep 32 rows of all 4 experts), and
# expert rows are cut a tile at a time, inside experts
EXPERT_ROWS_CUT = dataclasses.replace(LPU, chip=dataclasses.replace(LPU.chip, sram_bytes=20_000, matrix_tile_rows=32))
# (system, chips) -> (TP degree, pipeline stages) the compiler is expected to choose
PLACEMENTS = {("lpu", 1): (1, 1), ("lpu", 2): (2, 1), ("lpu", 4): (4, 1), ("lpu", 8): (4, 2),
              ("pipe", 2): (1, 2), ("pipe", 4): (1, 4),
              ("cut", 8): (1, 8), ("cut", 12): (1, 12), ("cut-tp", 32): (4, 8)}
SYSTEMS = {"lpu": LPU, "pipe": PIPELINE_ONLY,
           "cut": dataclasses.replace(PIPELINE_ONLY, chip=SMALL_TILES.chip), "cut-tp": SMALL_TILES}
# chips of 12 kB in nodes of 2: a 1,024-row table of 64 int8 bytes per row fits no TP group of 2,
# so the embedding and the head split along the vocabulary (the layers fit, MLPs cut where needed).
# nodes of 2 chips: 4 global links per chip join a rack's 9 nodes pairwise, 8 more its 144 links to other racks
VOCAB_SPLIT = dataclasses.replace(LPU, node=dataclasses.replace(LPU.node, chips=2, global_links_per_chip=12),
                                  chip=dataclasses.replace(SMALL_TILES.chip, sram_bytes=12_000))


@pytest.fixture(scope="module", autouse=True)
def one_thread():
    """The 2 cores are shared: small per-chip products run far faster on one thread under load."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


# ---- tiny models of every family ----------------------------------------------------------------
@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    root = tmp_path_factory.mktemp("executor")
    made = {}

    def get(family, vocab_size=96):
        if (family, vocab_size) not in made:
            folder = save(build(family, vocab_size=vocab_size), Path(root) / f"{family}-{vocab_size}")
            spec = spec_from_hf_config(folder)
            weights = runtime_weights(spec, load_safetensors(folder, spec))
            made[family, vocab_size] = spec, weights, Model(spec, weights)
        return made[family, vocab_size]
    return get


PROMPT = torch.randint(0, 96, (11,), generator=torch.Generator().manual_seed(3)).tolist()
WORKLOAD = Workload(context_length=32, prompt_len=len(PROMPT), prefill_chunk=4)  # 3 chunks, windows of 8


def plain_greedy(model: Model, prompt: list[int], n_new: int) -> list[int]:
    cache = KVCache(model.spec, 1, 32)
    slot = cache.allocate()
    out = [int(model.forward(prompt, [Span(slot, 0, len(prompt))], cache, [len(prompt) - 1])[-1].argmax())]
    while len(out) < n_new:
        out.append(int(model.forward([out[-1]], [Span(slot, len(prompt) + len(out) - 1, 1)], cache)[-1].argmax()))
    return out


def run_steps(ex: Executor, prompt: list[int], n_decode: int) -> list[torch.Tensor]:
    """Logits of the prefill and of n_decode greedy steps, fed the executor's own tokens."""
    cache = ex.new_cache(1, 32)
    slot = cache.allocate()
    logits, token = ex.step(prompt, [Span(slot, 0, len(prompt))], cache)
    out = [logits]
    for k in range(n_decode):
        logits, token = ex.step([int(token[-1])], [Span(slot, len(prompt) + k, 1)], cache)
        out.append(logits)
    return out


@pytest.mark.parametrize("family", sorted(TINY_FAMILIES))
def test_fused_matches_plain_model(tiny, family):
    spec, weights, model = tiny(family)
    fused = Executor(compile_program(spec, LPU, WORKLOAD, 1), spec, weights, "fused")
    expected = model.forward(PROMPT, [Span(0, 0, len(PROMPT))], logit_rows=list(range(len(PROMPT))))
    got = fused.forward(PROMPT, [Span(0, 0, len(PROMPT))], logit_rows=list(range(len(PROMPT))))
    assert expected.std() > 0.5
    torch.testing.assert_close(got, expected, **TOL)
    assert fused.generate(PROMPT, 6) == plain_greedy(model, PROMPT, 6)


@pytest.mark.parametrize("family", sorted(TINY_FAMILIES))
def test_sharded_matches_fused_on_every_placement(tiny, family):
    spec, weights, model = tiny(family)
    fused = Executor(compile_program(spec, LPU, WORKLOAD, 1), spec, weights, "fused")
    expected = run_steps(fused, PROMPT, 3)
    expected_ids = plain_greedy(model, PROMPT, 5)
    for (system, chips), (tp, stages) in PLACEMENTS.items():
        program = compile_program(spec, SYSTEMS[system], WORKLOAD, chips, tp)
        assert (program.placement.tp, len(program.placement.stages)) == (tp, stages)
        cut = any(piece[1] == "ffn" and piece[2:] != (0, spec.layer_d_ff(piece[0])) for s in program.placement.stages
                  for piece in s.pieces)
        assert cut == system.startswith("cut"), (system, chips)
        # fused mode on the same Program: whole blocks, and the ops of a cut MLP alone on its part's rows
        for mode in ("sharded", "fused"):
            ex = Executor(program, spec, weights, mode)
            for got, want in zip(run_steps(ex, PROMPT, 3), expected):
                torch.testing.assert_close(got, want, **TOL)
            assert ex.generate(PROMPT, 5) == expected_ids, (system, chips, mode)


@pytest.mark.parametrize("family", ["llama", "gemma2", "mixtral"])  # untied; tied with a final softcap; MoE
def test_sharded_runs_embedding_and_head_split_along_the_vocabulary(tiny, family):
    """Each embedding part gathers its rows and the partial rows are summed down the pipeline; each head
    part computes its rows' logits and the parts' (max, id) are combined: the logits (read part by part)
    and the greedy tokens equal the unsplit Program's, in sharded and in fused mode, and the Program
    verifies."""
    spec, weights, model = tiny(family, vocab_size=1024)
    program = compile_program(spec, VOCAB_SPLIT, WORKLOAD)
    parts = {part: [pc[2:] for s in program.placement.stages for pc in s.pieces if pc[1] == part]
             for part in ("embed", "head")}
    assert len(parts["embed"]) >= 2 and len(parts["head"]) >= 2 and program.placement.tp == 2
    assert verify(program) == []
    whole = run_steps(Executor(compile_program(spec, LPU, WORKLOAD, 1), spec, weights, "fused"), PROMPT, 3)
    for mode in ("sharded", "fused"):
        split = Executor(program, spec, weights, mode)
        for got, want in zip(run_steps(split, PROMPT, 3), whole):
            assert got.shape == (1, 1024)
            torch.testing.assert_close(got, want, **TOL)
        assert split.generate(PROMPT, 5) == plain_greedy(model, PROMPT, 5), mode


@pytest.mark.parametrize("family", ["gpt-oss", "llama4", "mixtral", "qwen3-moe"])
def test_moe_mlps_cut_by_expert_rows_run_like_the_whole(tiny, family):
    """On chips of 30 kB with GroqChip 1's 320-row weight tiles, no tiny MoE MLP (4 experts of 96 rows) fits a
    stage whole, and its rows cannot be cut (fewer than a tile), so partition cuts it by expert rows, in
    whole experts (each narrower than a tile): in TP groups of 1 one expert per part, of 2 two experts per
    part and one per chip (Llama 4's shared expert cut in proportion; its dense MLP of 128 rows stays
    whole). On chips of 20 kB with 32-row tiles, TP 2, the cuts fall inside experts: a chip holds the end of
    one expert and the start of the next. The compiler may arrange the stages otherwise where that decodes
    faster (even stages cut inside experts too); in the Program it makes each chip holds only its expert
    rows, and the parts' partial sums, including the tokens routed to experts held elsewhere, add up to the
    unsplit Program's logits and to model.py's greedy tokens, in sharded and in fused mode, and the Program
    verifies."""
    spec, weights, model = tiny(family)
    whole = run_steps(Executor(compile_program(spec, LPU, WORKLOAD, 1), spec, weights, "fused"), PROMPT, 3)
    expected_ids = plain_greedy(model, PROMPT, 5)
    moe = [i for i in range(spec.n_layers) if spec.is_moe_layer(i)]
    ff = spec.layer_d_ff(moe[0])

    def expert_rows(placement):
        return [(sh.axis, sh.start, sh.stop) for sh in placement.shards
                if sh.tensor in {f"blk.{i}.ffn_down_exps.weight" for i in moe}]

    for system, tp in ((EXPERT_CUT, 1), (EXPERT_CUT, 2), (EXPERT_ROWS_CUT, 2)):
        placement = partition(spec, system, WORKLOAD, tp=tp)
        rows = expert_rows(placement)
        assert placement.experts and {axis for axis, _, _ in rows} == {EXPERT_ROWS}
        for i in range(spec.n_layers):
            held = [pc[2:] for s in placement.stages for pc in s.pieces if pc[:2] == (i, "ffn")]
            if system is EXPERT_CUT and spec.is_moe_layer(i):
                assert held == [(e * ff, (e + tp) * ff) for e in range(0, spec.n_experts, tp)], (i, held)
            elif system is EXPERT_CUT:
                assert held == [(0, spec.layer_d_ff(i))]
        whole_experts = all(start % ff == 0 and stop - start == ff for _, start, stop in rows)
        assert whole_experts == (system is EXPERT_CUT), rows
        program = compile_program(spec, system, WORKLOAD, tp=tp)
        assert program.placement.experts and program.placement.tp == tp and verify(program) == []
        assert {axis for axis, _, _ in expert_rows(program.placement)} == {EXPERT_ROWS}
        for mode in ("sharded", "fused"):
            cut = Executor(program, spec, weights, mode)
            for got, want in zip(run_steps(cut, PROMPT, 3), whole):
                torch.testing.assert_close(got, want, **TOL)
            assert cut.generate(PROMPT, 5) == expected_ids, (tp, mode)


@pytest.mark.parametrize("family, vocab_size", [(f, 96) for f in sorted(TINY_FAMILIES)] + [("llama", 1024)])
def test_attention_split_along_its_kv_slots_runs_like_the_whole(tiny, family, vocab_size):
    """20 users of 32 tokens on the 12 kB chips: no layer's K and V fit a chip whole, so every attention
    is split into ranges of its KV slots on consecutive stages (a sliding-window layer's ring of 8 slots
    too, which the 11-token prompt wraps). Each part's chips keep only their slots; the parts' partial
    attentions (outputs and log-sum-exps, moved rank to rank) merge to the unsplit Program's logits and
    to model.py's greedy tokens, in sharded and in fused mode, and the Program verifies. With 1,024
    tokens the embedding is split into vocabulary ranges too: layer 0's attention parts each read the
    summed embedding, not one part's rows."""
    spec, weights, model = tiny(family, vocab_size=vocab_size)
    program = compile_program(spec, VOCAB_SPLIT, dataclasses.replace(WORKLOAD, users=20))
    embed_parts = sum(pc[1] == "embed" for s in program.placement.stages for pc in s.pieces)
    assert (embed_parts > 1) == (vocab_size == 1024)
    parts = {}
    for s in program.placement.stages:
        for item, part, lo, hi in s.pieces:
            if part == "attn":
                parts.setdefault(item, []).append((lo, hi))
    for i, held in parts.items():
        ring = spec.layer_positions(i, WORKLOAD.context_length)
        assert len(held) >= 2 and held[0][0] == 0 and held[-1][1] == ring, (i, held)
    assert verify(program) == []
    assert any(t.kind == "rank_p2p" for t in program.decode.transfers)
    whole = run_steps(Executor(compile_program(spec, LPU, WORKLOAD, 1), spec, weights, "fused"), PROMPT, 3)
    for mode in ("sharded", "fused"):
        split = Executor(program, spec, weights, mode)
        for got, want in zip(run_steps(split, PROMPT, 3), whole):
            torch.testing.assert_close(got, want, **TOL)
        assert split.generate(PROMPT, 5) == plain_greedy(model, PROMPT, 5), mode
    sharded = Executor(program, spec, weights, "sharded")
    cache = sharded.new_cache(1, 32)
    first = program.placement.stages[next(s.index for s in program.placement.stages
                                          if any(pc[1] == "attn" for pc in s.pieces))]
    (item, _, lo, hi), = [pc for pc in first.pieces if pc[1] == "attn"]
    assert cache.per_chip[first.chips[0]].k[item].shape[2] == hi - lo  # storage for its slots only


def test_attention_parts_that_miss_slots_are_refused(tiny):
    spec, weights, _ = tiny("llama")
    program = compile_program(spec, VOCAB_SPLIT, dataclasses.replace(WORKLOAD, users=20))
    last = next(s for s in reversed(program.placement.stages) if any(pc[1] == "attn" for pc in s.pieces))
    short = tuple((i, p, lo, hi - 1) if p == "attn" else (i, p, lo, hi) for i, p, lo, hi in last.pieces)
    broken = dataclasses.replace(program, placement=dataclasses.replace(program.placement, stages=tuple(
        dataclasses.replace(s, pieces=short) if s is last else s for s in program.placement.stages)))
    with pytest.raises(OpenLPUError, match=r"attention parts hold only its KV slots 0\.\.30; recompile"):
        Executor(broken, spec, weights, "sharded")


def random_case(seed: int) -> tuple:
    """A family, vocabulary, system and workload drawn from `seed`: nodes of 1-8 chips, chips of 8 kB to
    230 MB with 8- to 320-row weight tiles, up to 20 users, prompts of 1-11 tokens in chunks of 1-16,
    and the compiler's or a given TP width and chip count."""
    rng = random.Random(seed)
    family, vocab_size = rng.choice(sorted(TINY_FAMILIES)), rng.choice([96, 96, 1024])
    node = rng.choice([1, 2, 4, 8])
    system = dataclasses.replace(
        LPU, node=dataclasses.replace(LPU.node, chips=node, local_links_per_chip=node - 1, global_links_per_chip=300),
        chip=dataclasses.replace(LPU.chip, sram_bytes=rng.choice([8_000, 12_000, 30_000, 60_000, 200_000, 230_000_000]),
                                 matrix_tile_rows=rng.choice([8, 16, 320])))
    prompt = PROMPT[:rng.choice([1, 5, 11])]
    workload = dataclasses.replace(WORKLOAD, prompt_len=len(prompt), prefill_chunk=rng.choice([1, 4, 16]),
                                   users=rng.choice([1, 1, 3, 20]))
    return family, vocab_size, system, workload, prompt, rng.choice([None, None, 1, 2, 4]), rng.choice(
        [None, None, 8, 12, 32])


RANDOM_SEEDS = range(70)


def compile_random_case(tiny, seed: int):
    """random_case(seed) compiled: (its spec, weights, prompt, workload and Program), or None when the
    compiler refuses it, which it must do with one clear line."""
    family, vocab_size, system, workload, prompt, tp, chips = random_case(seed)
    spec, weights, _ = tiny(family, vocab_size=vocab_size)
    try:
        return spec, weights, prompt, workload, compile_program(spec, system, workload, chips, tp)
    except OpenLPUError as e:
        assert str(e) and "\n" not in str(e)
        return None


@pytest.mark.parametrize("seed", RANDOM_SEEDS)
def test_random_systems_run_like_the_whole(tiny, seed):
    """A drawn system and workload (random_case) is refused with one clear line, or compiled into a Program
    that verifies and computes, sharded and fused, what the same model compiled whole on one chip does."""
    if (compiled := compile_random_case(tiny, seed)) is None:
        return
    spec, weights, prompt, workload, program = compiled
    assert verify(program) == []
    whole = compile_program(spec, LPU, dataclasses.replace(workload, users=1), 1)
    steps = workload.context_length - len(prompt)  # to the last KV slot: every slot range of a split attention
    expected = run_steps(Executor(whole, spec, weights, "fused"), prompt, steps)
    for mode in ("sharded", "fused"):
        for got, want in zip(run_steps(Executor(program, spec, weights, mode), prompt, steps), expected):
            torch.testing.assert_close(got, want, **TOL)


def test_most_random_systems_compile(tiny):
    """The draws exercise the compiler, not only its refusals: most of them compile."""
    assert sum(compile_random_case(tiny, seed) is not None for seed in RANDOM_SEEDS) >= len(RANDOM_SEEDS) // 2


@pytest.mark.parametrize("family", ["llama", "gemma2", "mixtral"])
def test_fused_runs_split_pieces_in_the_engines_formats(tiny, family, monkeypatch):
    """The ops fused mode runs alone (here: layers whose pieces span stages, and the embedding and head
    split along the vocabulary) build their matrices in the engine's formats, as model.py's blocks do,
    not in float32 (the MoE router stays float32, as in model.py); a low-bit head part recomputes its
    top candidates from exact rows, so the greedy tokens equal model.py's in the same precision."""
    spec, weights, _ = tiny(family, vocab_size=1024)
    built = []
    monkeypatch.setattr(executor_module.Linear, "build", _recording(executor_module.Linear.build, built, "matrix"))
    monkeypatch.setattr(executor_module, "Head", _recording(executor_module.Head, built, "head"))
    fused = Executor(compile_program(spec, VOCAB_SPLIT, WORKLOAD), spec, weights, "fused", "int8")
    lone = [(what, fmt) for what, fmt, caller in built if caller == "executor"]
    assert ("head", "int8") in lone and ("matrix", "int8") in lone
    assert {entry for entry in lone if entry[1] != "int8"} == ({("matrix", "float32")} if spec.is_moe else set())
    model = Model(spec, weights, "int8")
    assert fused.generate(PROMPT, 5) == plain_greedy(model, PROMPT, 5)
    torch.testing.assert_close(fused.forward(PROMPT, [Span(0, 0, len(PROMPT))]),
                               model.forward(PROMPT, [Span(0, 0, len(PROMPT))], logit_rows=[len(PROMPT) - 1]),
                               rtol=0, atol=0.1)


def _recording(build, log: list, what: str):
    """`build` that logs (what, weight format, 'executor' or 'model') for each matrix it makes."""
    def record(*args, **kwargs):
        fmt = args[1] if len(args) > 1 else kwargs["fmt"]
        caller = "executor" if sys._getframe(1).f_globals["__name__"] == executor_module.__name__ else "model"
        log.append((what, fmt, caller))
        return build(*args, **kwargs)
    return record


def test_a_stage_holding_two_separate_ranges_of_a_table_is_refused(tiny):
    spec, weights, _ = tiny("llama", vocab_size=1024)
    program = compile_program(spec, VOCAB_SPLIT, WORKLOAD)
    head = [sh for sh in program.placement.shards if sh.tensor == "output.weight"]
    first_stage = next(s for s in program.placement.stages if head[0].chip in s.chips)
    far = next(sh for sh in head if sh.chip not in first_stage.chips and sh.start > head[1].stop)
    extra = dataclasses.replace(far, chip=head[0].chip, replicated=True)
    broken = dataclasses.replace(program, placement=dataclasses.replace(
        program.placement, shards=program.placement.shards + (extra,)))
    with pytest.raises(OpenLPUError, match=rf"stage {first_stage.index} holds two separate row ranges of output"):
        Executor(broken, spec, weights, "fused")


@pytest.mark.parametrize("system, vocab_size", [(LPU, 96), (VOCAB_SPLIT, 1024)])
def test_fused_batches_like_the_model_for_the_engine(tiny, system, vocab_size):
    """Several sequences in one flattened batch, as the Engine steps them, with the KV cache; on the
    small chips the embedding and head are split between stages and their ops run alone."""
    spec, weights, model = tiny("gemma2", vocab_size=vocab_size)
    fused = Executor(compile_program(spec, system, WORKLOAD), spec, weights, "fused")
    ours, theirs = fused.new_cache(2, 32), KVCache(spec, 2, 32)
    a, b = PROMPT[:9], PROMPT[2:7]
    for cache in (ours, theirs):
        cache.allocate(), cache.allocate()
    spans = [Span(0, 0, len(a)), Span(1, 0, len(b))]
    rows = [len(a) - 1, len(a) + len(b) - 1]
    torch.testing.assert_close(fused.forward(a + b, spans, ours, rows), model.forward(a + b, spans, theirs, rows), **TOL)
    spans = [Span(0, len(a), 1), Span(1, len(b), 1)]
    torch.testing.assert_close(fused.forward([5, 6], spans, ours), model.forward([5, 6], spans, theirs), **TOL)


# ---- broken Programs ----------------------------------------------------------------------------
def _ops(phase, change):
    """The phase with change(op) for each op (None drops it)."""
    return dataclasses.replace(phase, ops=tuple(o for o in map(change, phase.ops) if o is not None))


def test_fused_mode_runs_a_dropped_op_as_missing(tiny):
    spec, weights, _ = tiny("llama")
    program = compile_program(spec, LPU, WORKLOAD, 1)
    broken = dataclasses.replace(program, decode=_ops(program.decode,
                                                      lambda o: None if o.name == "blk.1.ffn_up" else o))
    ex = Executor(broken, spec, weights, "fused")
    assert [sg.kind for sg in ex.segments].count("layer") == spec.n_layers - 1  # layer 1 runs op by op
    with pytest.raises(OpenLPUError, match=r"blk\.1\.ffn_up"):
        ex.forward(PROMPT, [Span(0, 0, len(PROMPT))])


def test_fused_mode_computes_what_a_rewired_program_says(tiny):
    """A residual wired past the post-FFN norm: fused mode runs that layer as written, not as intended."""
    spec, weights, model = tiny("gemma2")
    program = compile_program(spec, LPU, WORKLOAD, 1)
    rewired = dataclasses.replace(program, decode=_ops(program.decode, lambda o: dataclasses.replace(
        o, inputs=("blk.0.attn_residual", "blk.0.ffn_down")) if o.name == "blk.0.ffn_residual" else o))
    good = Executor(program, spec, weights, "fused").forward(PROMPT, [Span(0, 0, len(PROMPT))])
    bad = Executor(rewired, spec, weights, "fused").forward(PROMPT, [Span(0, 0, len(PROMPT))])
    torch.testing.assert_close(good, model.forward(PROMPT, [Span(0, 0, len(PROMPT))], logit_rows=[len(PROMPT) - 1]),
                               **TOL)
    assert (bad - good).abs().max() > 0.1


def test_fused_mode_refuses_an_unplaced_tensor(tiny):
    spec, weights, program = _tp2(tiny)
    broken = _shards(program, lambda s: None if (s.tensor, s.chip) == ("blk.1.ffn_up.weight", 1) else s)
    with pytest.raises(OpenLPUError, match=r"blk\.1\.ffn_up\.weight is not placed on any chip from element"):
        Executor(broken, spec, weights, "fused")


def _tp2(tiny, family="llama"):
    spec, weights, _ = tiny(family)
    return spec, weights, compile_program(spec, LPU, WORKLOAD, 2)


def _without_transfer(phase, name):
    assert any(t.name == name for t in phase.transfers)
    return dataclasses.replace(phase, transfers=tuple(t for t in phase.transfers if t.name != name))


def test_missing_all_reduce_is_an_error_naming_it(tiny):
    spec, weights, program = _tp2(tiny)
    broken = dataclasses.replace(program, decode=_without_transfer(program.decode, "blk.1.ffn_down.allreduce"))
    ex = Executor(broken, spec, weights, "sharded")
    cache = ex.new_cache(1, 32)
    slot = cache.allocate()
    ex.step(PROMPT, [Span(slot, 0, len(PROMPT))], cache)  # the prefill schedule is intact
    with pytest.raises(OpenLPUError, match=r"blk\.1\.ffn_down\.allreduce"):
        ex.step([1], [Span(slot, len(PROMPT), 1)], cache)


def test_missing_pipeline_send_is_an_error_naming_it(tiny):
    spec, weights, _ = tiny("qwen3")
    program = compile_program(spec, PIPELINE_ONLY, WORKLOAD, 2)
    sends = [t.name for t in program.prefill.transfers if t.kind == "p2p" and t.name.startswith("c1/")]
    broken = dataclasses.replace(program, prefill=_without_transfer(program.prefill, sends[0]))
    with pytest.raises(OpenLPUError, match=sends[0].split("/", 1)[1].split(">")[0]):
        Executor(broken, spec, weights, "sharded").forward(PROMPT, [Span(0, 0, len(PROMPT))])


def test_op_scheduled_before_its_input_arrives_is_an_error(tiny):
    spec, weights, program = _tp2(tiny)
    early = tuple(dataclasses.replace(o, start_cycle=0) if o.name == "blk.0.attn_residual" else o
                  for o in program.decode.ops)
    broken = dataclasses.replace(program, decode=dataclasses.replace(program.decode, ops=early))
    with pytest.raises(OpenLPUError, match="blk.0.attn_residual"):
        Executor(broken, spec, weights, "sharded").generate(PROMPT, 2)


def test_cut_mlp_without_its_partial_sum_send_is_an_error(tiny):
    """An MLP cut over two stages: the second part must receive the first part's partial sum."""
    spec, weights, _ = tiny("mixtral")
    program = compile_program(spec, SYSTEMS["cut"], WORKLOAD, 8)
    send = next(t.name for t in program.decode.transfers
                if t.kind == "p2p" and t.name.startswith("blk.1.ffn_down_exps>"))
    broken = dataclasses.replace(program, decode=_without_transfer(program.decode, send))
    with pytest.raises(OpenLPUError, match=r"blk\.1\.ffn_sum@1 .*needs blk\.1\.ffn_down_exps"):
        Executor(broken, spec, weights, "sharded").generate(PROMPT, 2)


def _shards(program, keep):
    placement = dataclasses.replace(program.placement, shards=tuple(keep(s) for s in program.placement.shards
                                                                    if keep(s) is not None))
    return dataclasses.replace(program, placement=placement)


def test_dropped_shard_is_an_error_naming_tensor_and_chip(tiny):
    spec, weights, program = _tp2(tiny)
    broken = _shards(program, lambda s: None if (s.tensor, s.chip) == ("blk.1.ffn_up.weight", 1) else s)
    with pytest.raises(OpenLPUError, match=r"blk\.1\.ffn_up\.weight.*chip 1"):
        Executor(broken, spec, weights, "sharded")


def test_shard_on_the_wrong_chip_is_an_error(tiny):
    spec, weights, program = _tp2(tiny)
    moved = _shards(program, lambda s: dataclasses.replace(s, chip=0) if s.tensor == "blk.0.attn_output.weight" else s)
    with pytest.raises(OpenLPUError, match=r"chip 0 holds two shards of blk\.0\.attn_output\.weight"):
        Executor(moved, spec, weights, "sharded")
    swapped_q = _shards(program, lambda s: dataclasses.replace(s, chip=1 - s.chip) if s.tensor == "blk.0.attn_q.weight" else s)
    with pytest.raises(OpenLPUError, match="query heads"):
        Executor(swapped_q, spec, weights, "sharded")


def test_swapped_mlp_shards_change_the_output(tiny):
    """Gate slices on the wrong chips pair each gate row with another row's up: wrong numbers, not luck."""
    spec, weights, program = _tp2(tiny)
    good = Executor(program, spec, weights, "sharded").forward(PROMPT, [Span(0, 0, len(PROMPT))])
    swapped = _shards(program, lambda s: dataclasses.replace(s, chip=1 - s.chip) if s.tensor.endswith("ffn_gate.weight") else s)
    bad = Executor(swapped, spec, weights, "sharded").forward(PROMPT, [Span(0, 0, len(PROMPT))])
    assert (bad - good).abs().max() > 0.1


def test_sharded_chip_holds_only_its_shards(tiny):
    spec, weights, program = _tp2(tiny)
    ex = Executor(program, spec, weights, "sharded")
    for chip in ex.chips.values():
        placed = {s.tensor: s for s in program.placement.shards if s.chip == chip.id}
        assert set(chip.shards) == set(placed)
        for name, (axis, start, stop, local) in chip.shards.items():
            assert local.shape[axis] == stop - start
            assert local.untyped_storage().data_ptr() != weights[name].untyped_storage().data_ptr()


def test_bad_inputs(tiny):
    spec, weights, program = _tp2(tiny)
    with pytest.raises(OpenLPUError, match="execution mode"):
        Executor(program, spec, weights, "turbo")
    other_spec, other_weights, _ = tiny("qwen2")
    with pytest.raises(OpenLPUError, match="compiled for"):
        Executor(program, other_spec, other_weights, "fused")
    ex = Executor(program, spec, weights, "sharded")
    with pytest.raises(OpenLPUError, match="token ids"):
        ex.forward([0, 999], [Span(0, 0, 2)])
    with pytest.raises(OpenLPUError, match="one sequence"):
        ex.forward([1, 2, 3, 4], [Span(0, 0, 2), Span(1, 0, 2)])
    with pytest.raises(OpenLPUError, match="non-empty prompt"):
        ex.generate([], 3)


def test_simulated_figures_are_timings_of_the_program(tiny):
    from openlpu.sim.timing import timing

    spec, weights, program = _tp2(tiny)
    figures, t = simulated_figures(program), timing(program)
    assert figures["label"] == "simulated"
    assert (figures["chips"], figures["ttft_s"], figures["tokens_per_s_per_user"]) == \
        (2, t.ttft_s, t.tokens_per_s_per_user)


def _bytes_sent(transfer, value, bytes_per_activation: float) -> float:
    """What one chip puts on the links for a transfer, in the Program's units: activations at the
    Program's activation precision, a partial attention with its log-sum-exps, the sampler's (value,
    index) pairs, and token ids (a token return carries only the index)."""
    if isinstance(value, tuple):
        per_row = TOKEN_ID_BYTES if transfer.name.startswith("token_return") else ARGMAX_BYTES
        return value[1].numel() * per_row
    if isinstance(value, Partial):
        return (value.out.numel() + value.lse.numel()) * bytes_per_activation
    return value.numel() * (bytes_per_activation if value.is_floating_point() else TOKEN_ID_BYTES)


def _transfers_against_their_payloads(program, spec, weights, monkeypatch) -> tuple[Counter, list]:
    """Runs a prefill and two decode steps sharded: (transfers checked per kind, (name, bytes sent,
    payload) of each whose source sends other than its payload says)."""
    per_activation = as_precision(program.workload.activations).bytes_per_element
    decode = {id(t) for t in program.decode.transfers}
    checked, wrong, run_transfer = Counter(), [], Executor._transfer

    def priced(self, ev, values):
        t = ev.transfer
        first_group = t.chips[:len(t.chips) // 2]
        senders = {"rank_p2p": first_group, "stripe": first_group, "all_gather": t.chips}.get(t.kind, t.chips[:1])
        sent = sum(_bytes_sent(t, values[c][ev.inputs[0]], per_activation) for c in senders)
        sent /= len(senders) if t.kind == "stripe" else 1  # each sends its share of the vector it holds
        payload = t.payload_bytes / (program.decode.tokens if id(t) in decode else 1)
        checked[t.kind] += 1
        if sent != pytest.approx(payload, rel=1e-9):
            wrong.append((t.name, sent, payload))
        return run_transfer(self, ev, values)

    with monkeypatch.context() as patch:
        patch.setattr(Executor, "_transfer", priced)
        run_steps(Executor(program, spec, weights, "sharded"), PROMPT, 2)
    return checked, wrong


@pytest.mark.parametrize("family, vocab_size", [("llama", 1024), ("mixtral", 96), ("gemma2", 96), ("qwen3", 96),
                                                 ("gpt-oss", 96)])
def test_every_transfer_moves_the_bytes_the_program_prices(tiny, family, vocab_size, monkeypatch):
    """The schedule prices every link by the payload the compiler works out from the op rows; the sharded
    executor moves real tensors. Over a prefill and two decode steps, each transfer's source sends what
    its payload says (a decode step's payload over the users it carries, the executor running one): an
    all-reduce one full vector from each chip, a rank-to-rank move each rank's heads and log-sum-exps, a
    stripe each rank's share of a vector every chip holds, and the all-gather after it each chip's share.
    On TP + pipeline, on cut MLPs, and on vocabulary- and KV-split pieces with 20 users."""
    spec, weights, _ = tiny(family, vocab_size=vocab_size)
    # the tiny llama's fewest chips of 12 kB (32) leave no room for micro-batches of users; 40 do
    split_chips = 40 if family == "llama" else None
    for system, chips, workload in ((LPU, 8, WORKLOAD), (SYSTEMS["cut-tp"], 32, WORKLOAD),
                                    (VOCAB_SPLIT, split_chips, dataclasses.replace(WORKLOAD, users=20))):
        program = compile_program(spec, system, workload, chips)
        checked, wrong = _transfers_against_their_payloads(program, spec, weights, monkeypatch)
        assert wrong == [], (program.placement.tp, len(program.placement.stages), wrong[:3])
        assert all(checked[kind] for kind in ("all_reduce", "p2p", "stripe", "all_gather")), checked
    assert checked["rank_p2p"] and program.decode.tokens > 1  # the KV-split Program, users sharing its steps


@pytest.mark.parametrize("family", ["llama", "mixtral", "gemma3", "gpt-oss"])
def test_a_speculative_programs_decode_step_verifies_the_drafts(tiny, family, monkeypatch):
    """A Program compiled with 3 draft tokens: after the prompt, the last token and 3 drafts run through
    its compiled decode step (not the prefill), on TP + pipeline, cut MLPs and KV-split attention, and
    every row's logits equal model.py's for the same 4 tokens; a one-token step still agrees too."""
    spec, weights, model = tiny(family)
    drafts = [5, 17, 42, 8]
    cache = KVCache(spec, 1, 32)
    slot = cache.allocate()
    model.forward(PROMPT, [Span(slot, 0, len(PROMPT))], cache, [len(PROMPT) - 1])
    want = model.forward(drafts, [Span(slot, len(PROMPT), 4)], cache, list(range(4)))
    want_next = model.forward([3], [Span(slot, len(PROMPT) + 4, 1)], cache)
    for system, chips, users in ((LPU, 8, 1), (SYSTEMS["cut-tp"], 32, 1), (VOCAB_SPLIT, None, 20)):
        workload = dataclasses.replace(WORKLOAD, users=users, draft_tokens=3)
        program = compile_program(spec, system, workload, chips)
        assert verify(program) == []
        sharded = Executor(program, spec, weights, "sharded")
        own = sharded.new_cache(1, 32)
        own_slot = own.allocate()
        sharded.step(PROMPT, [Span(own_slot, 0, len(PROMPT))], own)
        with monkeypatch.context() as patch:
            patch.setattr(sharded, "_prefill", lambda *a: pytest.fail("a verifying step ran as a prefill"))
            got, _ = sharded.step(drafts, [Span(own_slot, len(PROMPT), 4)], own, list(range(4)))
            torch.testing.assert_close(got, want, **TOL)
            one, _ = sharded.step([3], [Span(own_slot, len(PROMPT) + 4, 1)], own)
        torch.testing.assert_close(one, want_next, **TOL)


# ---- the embedded Gemma 3 270M ------------------------------------------------------------------
@pytest.fixture(scope="module")
def gemma(gemma_path):
    from openlpu.models.gguf import load_weights, spec_from_gguf

    spec = spec_from_gguf(gemma_path)
    weights = load_weights(gemma_path, spec)
    return spec, weights, Model(spec, weights)


# (system, chips) -> (TP, stages, head parts). ("pipe", 4): stages cut where they fill, the tied table's
# embedding and head among them; ("pipe", 40): more stages than the 38 halves, every MLP cut in 3 or 4 slices,
# one per stage; ("40MB", 8): chips of 40 MB in nodes of 2, so the tied 262,144-row table (84 MB in int4)
# splits in two along the vocabulary, for the embedding and for the head; ("pipe", 16): the compiler's own
# choice there, groups of 4 one-chip nodes, two to a rack of 9 (chip 8 left out)
SYSTEMS["40MB"] = dataclasses.replace(VOCAB_SPLIT, chip=dataclasses.replace(LPU.chip, sram_bytes=40_000_000))
GEMMA_PLACEMENTS = {("lpu", 1): (1, 1, 1), ("lpu", 2): (2, 1, 1), ("lpu", 8): (4, 2, 1), ("pipe", 4): (1, 4, 2),
                    ("pipe", 40): (1, 40, 1), ("40MB", 8): (2, 4, 2), ("pipe", 16): (4, 4, 2)}


def test_gemma_sharded_matches_fused_and_llamacpp(gemma, llamacpp_reference):
    """The prompt in 2 chunks, 3 greedy tokens: the same as fused, as model.py and as llama.cpp."""
    spec, weights, model = gemma
    prompt = llamacpp_reference["prompt_token_ids"]
    expected_ids = llamacpp_reference["greedy_32_ids"][:3]  # an independent engine's greedy tokens
    workload = Workload(weights="int4", context_length=64, prompt_len=len(prompt), prefill_chunk=4)
    fused = Executor(compile_program(spec, LPU, workload, 1), spec, weights, "fused")
    plain = model.forward(prompt, [Span(0, 0, len(prompt))], logit_rows=[len(prompt) - 1])
    torch.testing.assert_close(fused.forward(prompt, [Span(0, 0, len(prompt))]), plain, **TOL)
    want = run_steps(fused, prompt, 2)
    for (system, chips), shape in GEMMA_PLACEMENTS.items():
        program = compile_program(spec, SYSTEMS[system], workload, chips, tp=shape[0])
        heads = [pc for s in program.placement.stages for pc in s.pieces if pc[1] == "head"]
        assert (program.placement.tp, len(program.placement.stages), len(heads)) == shape, (system, chips)
        sharded = Executor(program, spec, weights, "sharded")
        for got, ref in zip(run_steps(sharded, prompt, 2), want):
            torch.testing.assert_close(got, ref, rtol=1e-4, atol=2e-4)
        assert sharded.generate(prompt, 3) == expected_ids, (system, chips)


def test_engine_program_runs_fused_in_the_engines_precision(gemma_path):
    """Engine.load's executor: every block of its Program fused, and the same logits as model.py
    in the same precision (the fused path is model.py's blocks, in the Program's order)."""
    from openlpu.runtime.engine import Engine
    from openlpu.runtime.model import load_model

    engine = Engine.load(str(gemma_path), max_batch=2, context_length=64)
    ex = engine.model
    assert ex.program is engine.program and ex.mode == "fused" and ex.model.precision == "int4"
    assert [sg.kind for sg in ex.segments] == ["embed"] + ["layer"] * ex.spec.n_layers + ["head"]
    plain = load_model(gemma_path, "int4", max_positions=64)
    prompt = [2, 818, 5279, 529, 7001, 563]
    torch.testing.assert_close(ex.forward(prompt, [Span(0, 0, len(prompt))]),
                               plain.forward(prompt, [Span(0, 0, len(prompt))], logit_rows=[len(prompt) - 1]),
                               rtol=0, atol=1e-5)


def test_engine_runs_on_the_fused_path(gemma, gemma_path, llamacpp_reference):
    """The Engine drives the fused executor like a Model: greedy text = llama.cpp's greedy tokens."""
    from openlpu.runtime.engine import Engine
    from openlpu.runtime.sampling import SamplingParams
    from openlpu.runtime.tokenizer import Tokenizer

    spec, weights, _ = gemma
    program = compile_program(spec, LPU, Workload(weights="int4", context_length=64, prompt_len=6), 1)
    engine = Engine(Executor(program, spec, weights, "fused"), Tokenizer.from_gguf(gemma_path), 1, 32)
    events = list(engine.generate(llamacpp_reference["prompt"], SamplingParams(max_tokens=4, temperature=0.0)))
    assert [e.token_id for e in events] == llamacpp_reference["greedy_32_ids"][:4]
