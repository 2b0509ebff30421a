"""Embedding and head split along the vocabulary between stages when they do not fit one TP group."""

import dataclasses
import math

import pytest

from openlpu.compiler import Workload, compile_program, load_program, verify
from openlpu.compiler.program import MAGIC
from openlpu.errors import OpenLPUError
from openlpu.hardware.lpu import load_system
from openlpu.models.spec import load_preset

SYSTEM = load_system("lpu-v1")
WORKLOAD = Workload(context_length=2048, prompt_len=128)
BYTES = 1  # int8 weights
BIG_CHIPS = 2048


@pytest.fixture(scope="module")
def big():
    """Given 2,048 chips in node-wide TP groups the compiler arranges equal ranges (its fewest chips cut
    pieces where stages fill instead: tests/test_compiler.py)."""
    return compile_program(load_preset("llama-3.1-405b"), SYSTEM, WORKLOAD, chips=BIG_CHIPS, tp=8)


def _ranges(program, part):
    return [(s.index, lo, hi) for s in program.placement.stages for _, p, lo, hi in s.pieces if p == part]


def test_405b_fits_a_node_wide_group_by_splitting_vocabulary_and_mlps(big):
    """The arithmetic at TP 8 (one node): an attention half fits a chip; a whole MLP, a whole embedding
    table and a whole lm_head do not, so MLPs are cut along d_ff and the tables split into the fewest
    equal vocabulary ranges whose per-chip rows fit (the rest of a head part is one norm vector and
    activation buffers of a few MB, far below what is left)."""
    spec, cap, t = load_preset("llama-3.1-405b"), SYSTEM.chip.sram_bytes, SYSTEM.node.chips
    d, vocab = spec.d_model, spec.vocab_size
    kv = WORKLOAD.context_length * 2 * spec.head_dim * max(1, spec.n_kv_heads // t) * BYTES
    assert (2 * spec.q_dim * d + 2 * spec.kv_dim * d) * BYTES / t + kv < cap
    assert 3 * d * spec.d_ff * BYTES / t > cap
    table_per_chip = math.ceil(vocab / t) * d * BYTES
    assert table_per_chip > cap
    parts = next(v for v in range(1, 64) if math.ceil(vocab / (v * t)) * d * BYTES < 0.9 * cap)
    expected = [(j * vocab // parts, (j + 1) * vocab // parts) for j in range(parts)]

    assert big.placement.tp == t and not verify(big)
    for part in ("embed", "head"):
        held = _ranges(big, part)
        assert [(lo, hi) for _, lo, hi in held] == expected, part
        assert len({stage for stage, _, _ in held}) == parts  # one part per stage
    head_stages = [stage for stage, _, _ in _ranges(big, "head")]
    assert head_stages == list(range(len(big.placement.stages) - parts, len(big.placement.stages)))
    # the head's rows are held once over all parts' chips, each chip within its SRAM
    rows = [sh for sh in big.placement.shards if sh.tensor == "output.weight"]
    assert not any(sh.replicated for sh in rows) and sum(sh.stop - sh.start for sh in rows) == vocab
    assert max(sh.nbytes for sh in rows) == math.ceil(vocab / (parts * t)) * d * BYTES
    ffn = [(lo, hi) for _, lo, hi in _ranges(big, "ffn")]
    assert len(ffn) > spec.n_layers and all(hi - lo < spec.d_ff for lo, hi in ffn)


def test_split_head_combines_the_parts_maxima_and_returns_the_token_to_each_embedding_part(big):
    parts = len(_ranges(big, "head"))
    stage_of = {o.name: o.stage for o in big.decode.ops}
    heads = [stage for stage, _, _ in _ranges(big, "head")]
    for j in range(1, parts):
        assert stage_of[f"sample@{j}"] == stage_of[f"sample_max@{j}"] == heads[j]
    # each part keeps the larger of its own (value, index) and the running one: 8 bytes between parts
    combine = {o.name: o.inputs for o in big.decode.ops if o.name.startswith("sample_max@")}
    for j in range(1, parts):
        running, own = combine[f"sample_max@{j}"]
        assert own == f"sample@{j}.allreduce"
        assert running.split(">")[0] == ("sample.allreduce" if j == 1 else f"sample_max@{j - 1}")
    sends = [t for t in big.decode.transfers if t.kind == "p2p" and t.name.startswith("sample")]
    assert len(sends) == parts - 1 and all(t.payload_bytes == 8 for t in sends)
    returns = sorted(t.stage for t in big.decode.transfers if t.kind == "p2p" and t.name.startswith("token_return"))
    assert returns == [stage for stage, _, _ in _ranges(big, "embed")]
    # and over each embedding stage's chips, each looking the token up in its share of the table
    spread = {t.stage: set(t.chips) for t in big.decode.transfers if t.name.startswith("token_return") and
              t.kind == "broadcast"}
    assert spread and spread == {s.index: set(s.chips) for s in big.placement.stages
                                 if s.index in returns and len(s.chips) > 1}
    sums = [o for o in big.decode.ops if o.name.startswith("embed_sum@")]
    assert len(sums) == len(_ranges(big, "embed")) - 1
    assert any("embed_sum@" in i for o in big.decode.ops if o.name == "blk.0.attn_norm" for i in o.inputs)


def _with_stages(program, change):
    stages = tuple(change(s) for s in program.placement.stages)
    return dataclasses.replace(program, placement=dataclasses.replace(program.placement, stages=stages))


def _moved_head_start(program, delta):
    """The last head part starting `delta` rows later (a gap) or earlier (an overlap)."""
    last = program.placement.stages[-1]

    def change(s):
        if s.index != last.index:
            return s
        pieces = tuple((i, p, lo + delta, hi) if p == "head" else (i, p, lo, hi) for i, p, lo, hi in s.pieces)
        return dataclasses.replace(s, pieces=pieces)
    return _with_stages(program, change)


@pytest.mark.parametrize("delta", [1000, -1000])
def test_verifier_catches_a_gap_or_overlap_between_vocabulary_parts(big, delta):
    found = verify(_moved_head_start(big, delta))
    assert found[0].invariant == "structure" and "head" in found[0].message
    # after a gap, the first chip of the last part holds rows its stage's range no longer has; after an
    # overlap, the last part's stage runs rows its chips do not hold
    assert [v.message.split(" ")[0] for v in found[1:]] == (["output.weight"] if delta > 0 else ["stage"])


def test_verifier_catches_vocabulary_rows_placed_nowhere_or_twice(big):
    shards = list(big.placement.shards)
    i = next(k for k, sh in enumerate(shards) if sh.tensor == "output.weight")
    missing = shards[:i] + shards[i + 1:]
    other = big.placement.stages[0].chips[0]
    twice = shards + [dataclasses.replace(shards[i], chip=other)]
    for bad in (missing, twice):
        broken = dataclasses.replace(big, placement=dataclasses.replace(big.placement, shards=tuple(bad)))
        messages = [v.message for v in verify(broken) if v.invariant == "weight_placement"]
        assert messages and all("output.weight" in m for m in messages)


def test_split_programs_are_byte_identical_and_versioned(big, tmp_path):
    again = compile_program(load_preset("llama-3.1-405b"), SYSTEM, WORKLOAD, chips=BIG_CHIPS, tp=8)
    assert again.sha256() == big.sha256()
    path = tmp_path / "big.prog"
    big.save(path)
    assert load_program(path) == big
    older = bytearray(path.read_bytes())
    older[len(MAGIC)] = big.version - 1  # a program written before embedding and head could split
    (tmp_path / "old.prog").write_bytes(bytes(older))
    with pytest.raises(OpenLPUError, match=f"version {big.version - 1}"):
        load_program(tmp_path / "old.prog")


@pytest.mark.parametrize("name, chips", [("gemma-3-270m", None), ("gemma-3-270m", 2), ("llama-3.3-70b", None),
                                         ("mixtral-8x7b", 576), ("gemma-2-9b", 768)])
def test_tables_that_fit_are_never_split(name, chips):
    """Only a table too large for its stage is split: placements that fit keep one embedding and one
    head piece."""
    spec = load_preset(name)
    p = compile_program(spec, SYSTEM, Workload(context_length=1024, prompt_len=256, users=2), chips)
    for part in ("embed", "head"):
        assert [(lo, hi) for _, lo, hi in _ranges(p, part)] == [(0, spec.vocab_size)]
    assert not any(o.name.startswith(("embed_sum", "sample_max")) for o in p.decode.ops)
