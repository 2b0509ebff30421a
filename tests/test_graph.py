"""Lowering: op rows checked against parameter counts, attention arithmetic and MoE routing."""

import dataclasses
import itertools
import math

import pytest
import torch

from openlpu.errors import OpenLPUError
from openlpu.graph.lower import (
    PRECISIONS,
    attended_keys,
    expected_distinct_experts,
    keys_in_slots,
    lower,
)
from openlpu.models.spec import load_preset
from openlpu.runtime.model import visible_keys


def _weight_elements(ops, bytes_per_element):
    return sum(o.weight_bytes for o in ops) / bytes_per_element


@pytest.mark.parametrize("name", ["llama-3.1-8b", "qwen2.5-7b", "qwen3-8b", "gemma-2-9b", "gemma-3-270m"])
def test_decode_reads_every_weight_once(name):
    """One decode token reads every parameter once, except the embedding table (one row gathered);
    a tied table is read in full again by the lm_head. Second method: ModelSpec.param_count."""
    spec = load_preset(name)
    ops = lower(spec, "decode", 1024, 1, "fp16")
    table = spec.vocab_size * spec.d_model
    expected = spec.param_count() - table + spec.d_model + (table if spec.tie_embeddings else 0)
    assert _weight_elements(ops, 2) == expected


def test_bytes_per_element_table():
    spec = load_preset("llama-3.1-8b")
    by_precision = {p: sum(o.weight_bytes for o in lower(spec, "decode", 16, 1, p)) for p in PRECISIONS}
    assert by_precision["fp16"] == by_precision["bf16"] == 2 * by_precision["int8"] == 2 * by_precision["fp8"]
    assert by_precision["int4"] == by_precision["int8"] / 2
    assert by_precision["fp4"] == pytest.approx(by_precision["int8"] * 4.5 / 8)  # NVFP4: a scale byte per 16


def test_matmul_flops_are_two_per_weight_per_token():
    spec = load_preset("llama-3.1-8b")
    for tokens in (1, 7):
        ops = lower(spec, "decode", 512, tokens, "int8")
        matmuls = [o for o in ops if o.kind in ("matmul", "lm_head")]
        assert sum(o.flops for o in matmuls) == 2 * tokens * sum(o.weight_bytes for o in matmuls)


def test_decode_attention_reads_the_cache_and_the_window_caps_it():
    spec = load_preset("gemma-3-270m")  # local layers: sliding window 512
    ops = {o.name: o for o in lower(spec, "decode", 8192, 2, "fp16", kv_precision="int8")}
    per_token = 2 * spec.kv_dim  # K and V, int8
    assert spec.layer_kinds[0] == "local" and spec.layer_kinds[5] == "global"
    assert ops["blk.0.attention"].kv_read_bytes == 2 * 512 * per_token
    assert ops["blk.5.attention"].kv_read_bytes == 2 * 8192 * per_token
    assert ops["blk.5.attention"].kv_write_bytes == 2 * per_token


@pytest.mark.parametrize("chunk, past, tokens", [(8, 0, 32), (8, 5, 11), (8, 16, 1), (64, 100, 300), (64, 0, 64)])
def test_chunked_attention_counts_the_pairs_the_runtimes_mask_lets_through(chunk, past, tokens):
    """A chunked layer's (query, key) pairs, prefill and decode, and the cached keys a prompt chunk reads back,
    against a second method: the mask the runtime attends with (model.visible_keys), summed. A prompt chunk reads
    only its attention chunk's past (it read the whole ring, every cached key of the layer's chunk size)."""
    keys = torch.arange(past + tokens)
    mask = visible_keys(torch.arange(past, past + tokens), keys, None, chunk)
    assert attended_keys(tokens, None, "prefill", past, chunk) == int(mask.sum())
    spec = dataclasses.replace(load_preset("llama-4-scout"), attention_chunk=chunk)
    attention = next(o for o in lower(spec, "prefill", tokens, 1, "int8", past_len=past) if o.name == "blk.0.attention")
    assert attention.kv_read_bytes == int(mask[:, :past].any(dim=0).sum()) * 2 * spec.kv_dim  # int8 K and V
    last = visible_keys(torch.tensor([past + tokens - 1]), keys, None, chunk)
    assert attended_keys(past + tokens, None, "decode", chunk=chunk) == int(last.sum())


@pytest.mark.parametrize("context", [8192, 8193, 12000])
def test_a_chunked_decode_attends_the_keys_it_reads(context):
    """A decode step on a chunked layer (Llama 4 Scout, chunks of 8,192) reads its whole ring from the cache (the
    LPU's static step serves every position up to the context); its operations counted the current chunk's keys
    alone (1 at 8,193), the bytes 8,192 (a review found it). Both now take the ring; a GPU step (gpu_decode_ops)
    takes both at the position, the keys the runtime's mask lets through."""
    from openlpu.sim.gpu import gpu_decode_ops

    spec = load_preset("llama-4-scout")
    lpu = next(o for o in lower(spec, "decode", context, 2, "int8") if o.name == "blk.0.attention")
    ring = min(context, spec.attention_chunk)
    per_key = 4 * spec.q_dim + 5 * spec.n_heads  # QK and PV, and the softmax, per key and query
    assert lpu.flops == 2 * ring * per_key and lpu.kv_read_bytes == 2 * ring * 2 * spec.kv_dim
    keys = int(visible_keys(torch.tensor([context - 1]), torch.arange(context), None, spec.attention_chunk).sum())
    gpu = next(o for o in gpu_decode_ops(spec, context, 2, "int8") if o.name == "blk.0.attention")
    assert gpu.flops == 2 * keys * per_key and gpu.kv_read_bytes == pytest.approx(2 * keys * 2 * spec.kv_dim)


def test_llama4_layers_become_ops():
    """Llama 4 Scout: chunked rope layers normalise q and k after rope; every fourth layer is global, with no
    rope and temperature-scaled queries; each MLP's shared expert feeds its partial sum into the experts'
    down projection; one decode token reads the active parameters (second method: active_param_count)."""
    spec = load_preset("llama-4-scout")
    ops = {o.name: o for o in lower(spec, "decode", 131072, 1, "int8")}
    assert spec.layer_kinds[:4] == ("chunked", "chunked", "chunked", "global") and spec.attention_chunk == 8192
    assert {"blk.0.rope", "blk.0.attn_qk_l2_norm"} <= set(ops) and "blk.0.attn_temperature" not in ops
    assert "blk.3.rope" not in ops and "blk.3.attn_qk_l2_norm" not in ops
    assert ops["blk.3.attention"].inputs[0] == "blk.3.attn_temperature"
    per_token = 2 * spec.kv_dim  # int8 K and V
    assert ops["blk.0.attention"].kv_read_bytes == 8192 * per_token  # its chunk of the 131,072 positions
    assert ops["blk.3.attention"].kv_read_bytes == 131072 * per_token
    assert ops["blk.0.ffn_down_exps"].inputs == ("blk.0.ffn_act", "blk.0.ffn_down_shexp")
    table = spec.vocab_size * spec.d_model
    assert _weight_elements(ops.values(), 1) == pytest.approx(spec.active_param_count() - table + spec.d_model)


def test_llama4_maverick_interleaves_dense_and_moe_mlps():
    """Llama 4 Maverick: even layers a dense MLP of 16,384 rows, odd ones 128 experts of 8,192 and a shared expert;
    one decode token reads the active parameters (second method: active_param_count)."""
    spec = load_preset("llama-4-maverick")
    ops = {o.name: o for o in lower(spec, "decode", 8192, 1, "int8")}
    assert ops["blk.0.ffn_gate"].weight_bytes == 16384 * spec.d_model and "blk.0.ffn_gate_exps" not in ops
    assert ops["blk.1.ffn_gate_exps"].weight_bytes == 8192 * spec.d_model and "blk.1.ffn_gate" not in ops
    assert "blk.1.ffn_down_shexp" in ops and "blk.0.ffn_down_shexp" not in ops
    table = spec.vocab_size * spec.d_model
    assert _weight_elements(ops.values(), 1) == pytest.approx(spec.active_param_count() - table + spec.d_model)


def test_prefill_is_causal_and_chunks_add_up():
    spec = load_preset("llama-3.1-8b")
    whole = {o.name: o for o in lower(spec, "prefill", 300, 1, "fp16")}
    n = 300
    pairs = n * (n + 1) / 2  # query i attends to i + 1 keys
    expected = 4 * pairs * spec.q_dim + 5 * pairs * spec.n_heads
    assert whole["blk.0.attention"].flops == pytest.approx(expected)
    first = {o.name: o for o in lower(spec, "prefill", 100, 1, "fp16")}
    rest = {o.name: o for o in lower(spec, "prefill", 200, 1, "fp16", past_len=100)}
    assert first["blk.0.attention"].flops + rest["blk.0.attention"].flops == pytest.approx(expected)
    assert rest["blk.0.attention"].kv_read_bytes == 100 * 2 * spec.kv_dim * 2  # the first chunk's K and V


def test_moe_reads_router_and_the_experts_tokens_pick():
    spec = load_preset("mixtral-8x7b")
    expert = spec.d_ff * spec.d_model
    one = {o.name: o for o in lower(spec, "decode", 4096, 1, "int8")}
    assert one["blk.0.ffn_gate_inp"].kind == "moe_router"
    assert one["blk.0.ffn_gate_exps"].weight_bytes == pytest.approx(2 * expert)  # top-2 of 8
    many = {o.name: o for o in lower(spec, "prefill", 512, 1, "int8")}
    assert many["blk.0.ffn_up_exps"].weight_bytes == pytest.approx(8 * expert)  # all experts touched
    # decode reads the active parameters (second method: ModelSpec.active_param_count)
    table = spec.vocab_size * spec.d_model
    assert _weight_elements(one.values(), 1) == pytest.approx(spec.active_param_count() - table + spec.d_model)
    # expected distinct experts: exact for 1 token, and a Monte-Carlo-free check at 2 tokens
    assert expected_distinct_experts(8, 2, 1) == pytest.approx(2)
    assert expected_distinct_experts(8, 2, 2) == pytest.approx(2 + 2 * 6 / 8)


def test_family_features_become_ops():
    qwen2 = {o.name: o for o in lower(load_preset("qwen2.5-7b"), "decode", 64, 1, "fp16")}
    spec = load_preset("qwen2.5-7b")
    assert qwen2["blk.0.attn_q"].weight_bytes == 2 * (spec.q_dim * spec.d_model + spec.q_dim)  # with its bias
    qwen3 = {o.name for o in lower(load_preset("qwen3-8b"), "decode", 64, 1, "fp16")}
    assert {"blk.0.attn_q_norm", "blk.0.attn_k_norm"} <= qwen3
    gemma2 = {o.name for o in lower(load_preset("gemma-2-9b"), "decode", 64, 1, "fp16")}
    assert {"blk.0.attn_softcap", "final_softcap", "blk.0.post_ffw_norm"} <= gemma2
    llama = {o.name for o in lower(load_preset("llama-3.1-8b"), "decode", 64, 1, "fp16")}
    assert not any("softcap" in n or "q_norm" in n for n in llama)


def test_ops_are_topologically_ordered_with_unique_names():
    for name in ("mixtral-8x7b", "gemma-3-270m"):
        ops = lower(load_preset(name), "prefill", 33, 2, "int4")
        seen = set()
        for op in ops:
            assert op.name not in seen and set(op.inputs) <= seen
            seen.add(op.name)
            assert all(math.isfinite(v) and v >= 0 for v in (op.flops, op.bytes_total))


@pytest.mark.parametrize("kwargs, message", [
    (dict(phase="decoding", seq_len=8), "unknown phase 'decoding'"),
    (dict(phase="decode", seq_len=0), "seq_len must be a positive integer"),
    (dict(phase="decode", seq_len=8, batch=-1), "batch must be a positive integer"),
    (dict(phase="decode", seq_len=8, precision="int3"), r"unknown precision 'int3'; did you mean 'int[48]'"),
    (dict(phase="decode", seq_len=8, past_len=4), "past_len"),
])
def test_bad_lowering_inputs(kwargs, message):
    with pytest.raises(OpenLPUError, match=message):
        lower(load_preset("gemma-3-270m"), **kwargs)


@pytest.mark.parametrize("past, tokens", [(0, 300), (8092, 256), (8192, 256), (6144, 4096), (20000, 700)])
def test_keys_in_slot_ranges_of_a_chunked_layer(past, tokens):
    """On a chunked layer (Llama 4's 8,192-token attention chunks) query q sees its own chunk so far, slots 0..q
    mod 8,192: each range's pairs and cached keys, counted query by query (a second method), and the ranges
    adding up to the layer's attended_keys. They had been counted as a sliding window's, every query past a
    chunk's end seeing every slot: a range of high slots took a third of the work of queries that see none."""
    ring, bounds = 8192, [0, 1000, 4096, 5525, 8192]
    parts = [keys_in_slots("prefill", past, tokens, ring, lo, hi, chunked=True)
             for lo, hi in itertools.pairwise(bounds)]
    assert sum(p[0] for p in parts) == attended_keys(tokens, None, "prefill", past, chunk=ring)
    for (lo, hi), (pairs, cached, _) in zip(itertools.pairwise(bounds), parts):
        assert pairs == sum(max(0, min(q % ring + 1, hi) - lo) for q in range(past, past + tokens))
        assert cached == sum(1 for j in range(past - past % ring, past) if lo <= j % ring < hi)


@pytest.mark.parametrize("window, context", [(None, 4096), (512, 4096), (4096, 1000)])
@pytest.mark.parametrize("past, tokens", [(0, 300), (256, 256), (3000, 256), (100, 900)])
def test_keys_in_slot_ranges_add_up_to_the_layers_attention(window, context, past, tokens):
    """Ranges of a layer's KV ring (context, or the window if shorter) split its prefill work exactly: the
    parts' pairs sum to attended_keys, their cached keys to what lowering reads back, and the pairs of
    a part are counted query by query (a second method)."""
    if past + tokens > context:
        pytest.skip("beyond the context")
    ring = min(context, window or context)
    bounds = [0, ring // 5, ring // 2, ring - 7, ring]
    parts = [keys_in_slots("prefill", past, tokens, ring, lo, hi) for lo, hi in itertools.pairwise(bounds)]
    assert sum(p[0] for p in parts) == attended_keys(tokens, window, "prefill", past)
    assert sum(p[1] for p in parts) == min(past, window or past)
    assert sum(p[2] for p in parts) == min(tokens, ring)
    lo, hi = bounds[1], bounds[2]
    by_query = sum(len({p % ring for p in range(max(0, q + 1 - (window or q + 1)), q + 1)} & set(range(lo, hi)))
                   for q in range(past, past + tokens))
    assert parts[1][0] == by_query
    for attended in (ring, ring // 3, context):  # a decode step over the whole ring, and over fewer keys
        decode = [keys_in_slots("decode", attended, 1, ring, lo, hi) for lo, hi in itertools.pairwise(bounds)]
        assert [d[0] for d in decode] == [len({p % ring for p in range(attended)} & set(range(lo, hi)))
                                          for lo, hi in itertools.pairwise(bounds)]
        assert [d[1] for d in decode] == [d[0] for d in decode]
        assert sum(d[2] for d in decode) == pytest.approx(1.0)  # its one new key lands in one of the parts
