"""Speculative decoding: the expected tokens per round against simulated rounds, the verifying step's op
rows and schedule against the one-token step, and the plan's rows against the two Programs' timings."""

import random

import pytest

from openlpu.compiler import Workload, compile_program, load_program, verify
from openlpu.errors import OpenLPUError
from openlpu.graph.lower import lower
from openlpu.hardware.gpu import load_gpu
from openlpu.hardware.lpu import load_system
from openlpu.models.spec import load_preset
from openlpu.sim.gpu import gpu_timing
from openlpu.sim.plan import plan
from openlpu.sim.speculative import expected_tokens
from openlpu.sim.timing import timing

SYSTEM = load_system("lpu-v1")
TARGET, DRAFT = load_preset("llama-3.1-8b"), load_preset("llama-3.2-1b")
CONTEXT = 2048


@pytest.mark.parametrize("draft_tokens", [1, 4, 8])
@pytest.mark.parametrize("acceptance", [0.0, 0.5, 0.8, 1.0])
def test_expected_tokens_per_round_match_simulated_rounds(draft_tokens, acceptance):
    """Rounds played out: drafts accepted one by one with the given chance until the first rejection,
    then the target's own token. The mean of 100,000 rounds is within 1% of the formula."""
    rng = random.Random(7)
    rounds, total = 100_000, 0
    for _ in range(rounds):
        accepted = 0
        while accepted < draft_tokens and rng.random() < acceptance:
            accepted += 1
        total += accepted + 1
    assert total / rounds == pytest.approx(expected_tokens(draft_tokens, acceptance), rel=0.01)


def test_a_verifying_step_reads_the_weights_and_the_cache_once_for_all_its_tokens():
    """k + 1 queries per user: every matmul and the attention do k + 1 times the arithmetic and write
    k + 1 times the keys, but read each weight and each cached key once; the head gives logits for every
    query (a one-token step's rows are the same as before)."""
    one = lower(TARGET, "decode", CONTEXT, 2, "int8")
    assert one == lower(TARGET, "decode", CONTEXT, 2, "int8", queries=1)
    five = {op.name: op for op in lower(TARGET, "decode", CONTEXT, 2, "int8", queries=5)}
    assert [op.name for op in one] == list(five)
    for op in one:
        other = five[op.name]
        if op.kind in ("matmul", "attention", "lm_head"):
            assert other.flops == pytest.approx(5 * op.flops)
            assert (other.weight_bytes, other.kv_read_bytes) == (op.weight_bytes, op.kv_read_bytes)
            assert other.kv_write_bytes == 5 * op.kv_write_bytes
    assert five["output"].shape[0] == 2 * 5
    with pytest.raises(OpenLPUError, match="queries is for decode steps only"):
        lower(TARGET, "prefill", 16, 1, "int8", queries=2)
    with pytest.raises(OpenLPUError, match="queries must be a positive integer"):
        lower(TARGET, "decode", 16, 1, "int8", queries=0)


def test_the_lpu_verifies_four_drafts_in_little_more_than_one_tokens_step(tmp_path):
    """Decode is bound by installing weights, and the five tokens stream through one install, so the
    verifying step takes far less than five steps (more than one: its vectors and link bytes grow).
    Every transfer carries five tokens' bytes; the Program verifies and keeps its draft tokens on disk."""
    workload = Workload(context_length=CONTEXT)
    plain = compile_program(TARGET, SYSTEM, workload)
    verifying = compile_program(TARGET, SYSTEM, Workload(context_length=CONTEXT, draft_tokens=4))
    assert verify(verifying) == []
    ratio = verifying.decode.makespan_cycles / plain.decode.makespan_cycles
    assert 1.0 < ratio < 1.25, ratio
    assert sum(t.payload_bytes for t in verifying.decode.transfers) == \
        5 * sum(t.payload_bytes for t in plain.decode.transfers)
    verifying.save(tmp_path / "v.prog")
    assert load_program(tmp_path / "v.prog").workload.draft_tokens == 4
    with pytest.raises(OpenLPUError, match="draft tokens must be a non-negative integer"):
        Workload(draft_tokens=-1)


@pytest.mark.parametrize("users", [1, 64])
def test_plan_rows_are_rounds_of_the_two_programs(users):
    """The LPU row: a user's round is k draft steps, the verifying step and the hops between them, or,
    with many users, as long as the busier pipeline needs; it yields (k + 1) tokens when every draft is
    accepted and one when none is. The GPU row: k draft steps and one verifying step on the same GPUs."""
    k = 4
    workload = Workload(context_length=CONTEXT, users=users)
    t = timing(compile_program(TARGET, SYSTEM, Workload(context_length=CONTEXT, users=users, draft_tokens=k)))
    d = timing(compile_program(DRAFT, SYSTEM, workload))
    alone = k * d.decode_latency_s + t.decode_latency_s
    period = max(alone, k / d.tokens_per_s_per_user, 1 / t.tokens_per_s_per_user)
    gpu = load_gpu("h100-sxm")
    for acceptance, tokens in ((0.0, 1), (1.0, k + 1)):
        lpu, h100 = plan(TARGET, compare=("h100-sxm",), context=CONTEXT, users=users, draft=DRAFT,
                         draft_tokens=k, acceptance=acceptance)
        # the hops between the two pipelines add at most a few microseconds per round
        assert tokens / lpu.tokens_per_s_per_user == pytest.approx(period, abs=5e-6)
        assert lpu.throughput_tokens_per_s == pytest.approx(users * lpu.tokens_per_s_per_user)
        assert lpu.chips == t.chips + d.chips and lpu.layout.endswith(f"+ draft {d.stages} x TP {d.tp}")
        gt = gpu_timing(TARGET, gpu, "int8", CONTEXT, users, gpus=h100.chips, queries=k + 1)
        gd = gpu_timing(DRAFT, gpu, "int8", CONTEXT, users, gpus=h100.chips)
        assert h100.tokens_per_s_per_user == pytest.approx(tokens / (k * gd.decode_step_s + gt.decode_step_s))
    if users == 1:  # nothing waits on other users: the round is the two latencies and the hops
        assert period == alone
    plain, = plan(TARGET, compare=(), context=CONTEXT, users=users)
    assert lpu.tokens_per_s_per_user < (k + 1) * plain.tokens_per_s_per_user


def test_the_draft_must_share_the_tokenizer_and_fit():
    with pytest.raises(OpenLPUError, match="a draft must share the target's tokenizer"):
        plan(TARGET, draft="gemma-3-1b", acceptance=0.5)
    # Gemma 3 27B's table holds 64 rows more than 1B's, whose tokenizer it shares: within llama.cpp's slack of 128
    assert load_preset("gemma-3-27b").vocab_size - load_preset("gemma-3-1b").vocab_size == 64
    (row,) = plan("gemma-3-27b", system="", context=CONTEXT, draft="gemma-3-1b", acceptance=0.5)
    assert row.tokens_per_s_per_user > 0
    with pytest.raises(OpenLPUError, match="needs --acceptance"):
        plan(TARGET, draft=DRAFT)
    with pytest.raises(OpenLPUError, match="give the draft model with --draft"):
        plan(TARGET, acceptance=0.5)
    with pytest.raises(OpenLPUError, match="cannot hold llama-3.1-70b and the draft llama-3.1-8b"):
        plan("llama-3.1-70b", system="", gpus=1, context=CONTEXT, draft="llama-3.1-8b", acceptance=0.5)


def test_a_draft_beside_its_target_powers_the_hosts_its_capex_pays_for():
    """Gemma 3 1B fills a node and its 270M draft sits on two chips of the next: capex pays for both nodes'
    hosts (whole nodes beyond one), so power counts both hosts, and what is left lies between every chip
    idle and every chip busy."""
    from openlpu.sim.cost import lpu_capex

    context = 1024
    t = timing(compile_program(load_preset("gemma-3-1b"), SYSTEM, Workload(context_length=context, draft_tokens=4)))
    d = timing(compile_program(load_preset("gemma-3-270m"), SYSTEM, Workload(context_length=context)))
    lpu, = plan("gemma-3-1b", compare=(), context=context, draft="gemma-3-270m", acceptance=0.7)
    hosts = lpu_capex(SYSTEM, lpu.chips, t.nodes + d.nodes).hosts_usd / SYSTEM.node.host_price_usd
    assert (t.nodes, d.nodes, hosts) == (1, 1, 2)
    chips_w = lpu.power_w - hosts * SYSTEM.node.host_power_w
    assert lpu.chips * SYSTEM.chip.idle_power_w < chips_w < lpu.chips * SYSTEM.chip.busy_power_w


def test_a_draft_uses_the_most_of_the_targets_gpus_it_can_be_laid_out_over():
    """136 H100s hold Llama 3.3 70B in 17 stages of 8; its 16-layer 1B draft cannot take a stage each of 17, so it
    runs on 128 of them (it was refused, as if 136 were too many for the target). The round on 136 is the target's
    step there and the draft's on 128."""
    from openlpu.sim.speculative import gpu_round

    h100 = load_gpu("h100-sxm")
    (row,) = plan("llama-3.3-70b", system="", gpus=136, context=CONTEXT, draft=DRAFT, acceptance=0.8)
    target = gpu_timing(load_preset("llama-3.3-70b"), h100, "int8", CONTEXT, 1, gpus=136, queries=5, beside=DRAFT)
    draft = gpu_timing(DRAFT, h100, "int8", CONTEXT, 1, gpus=128)
    assert (draft.tensor_parallel, draft.pipeline_stages) == (8, 16)
    assert row.chips == 136 and row.tokens_per_s_per_user == pytest.approx(
        gpu_round(target, draft, 4, 0.8).tokens_per_s_per_user)
    with pytest.raises(OpenLPUError, match="more than llama-3.2-1b's 16 layers"):
        gpu_timing(DRAFT, h100, "int8", CONTEXT, 1, gpus=136)


def test_chart_labels_count_a_drafts_chips_beside_those_asked_for():
    """Given 40 chips, the target takes them all and its draft 8 more: the chart says 48 chips, not '48 of 40'
    (which read as idle chips); with 45 given, 5 of them idle, it says so beside the 48, as the table does."""
    from openlpu.sim.plan import _bar_labels

    rows = plan(TARGET, compare=(), context=CONTEXT, chips=(40, 45), draft=DRAFT, acceptance=0.8)
    assert [(r.chips, r.chips_asked, r.chips_idle) for r in rows] == [(48, 40, 0), (48, 45, 5)]
    assert [label.split("\n")[1] for label in _bar_labels(rows)] == ["48 chips", "48 chips (5 of 45 idle)"]
