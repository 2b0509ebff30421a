"""HF config.json -> ModelSpec and safetensors -> GGUF-named weights, checked against transformers."""

import json
import re

import pytest
import torch
from safetensors.torch import load_file, save_file

from fixtures.tiny_models.hf_tiny import TINY_FAMILIES, build, save
from openlpu.errors import OpenLPUError
from openlpu.models.hf import load_safetensors, spec_from_hf_config
from openlpu.models.spec import PRESETS_DIR


@pytest.fixture(scope="module")
def saved(tmp_path_factory):
    """family -> (transformers model, folder with config.json + model.safetensors)."""
    out = {}
    for family in TINY_FAMILIES:
        model = build(family)
        out[family] = (model, save(model, tmp_path_factory.mktemp(family)))
    return out


@pytest.mark.parametrize("family", sorted(TINY_FAMILIES))
def test_spec_counts_the_same_parameters_as_transformers(saved, family):
    model, folder = saved[family]
    spec = spec_from_hf_config(folder)
    assert spec.family == family
    assert spec.param_count() == sum(p.numel() for p in model.parameters())


@pytest.mark.parametrize("family", sorted(TINY_FAMILIES))
def test_layer_kinds_follow_transformers_masks(saved, family):
    model, folder = saved[family]
    spec = spec_from_hf_config(folder)
    hf_sliding = [t == "sliding_attention" for t in getattr(model.config, "layer_types", [])] or \
        [getattr(model.config, "sliding_window", None) is not None] * model.config.num_hidden_layers
    assert [k == "local" for k in spec.layer_kinds] == hf_sliding
    if any(hf_sliding):
        assert spec.sliding_window == getattr(model.config, "sliding_window")


def test_gemma_specific_fields(saved):
    g2 = spec_from_hf_config(saved["gemma2"][1])
    assert g2.query_scale == pytest.approx(24 ** -0.5)  # query_pre_attn_scalar, not head_dim
    assert (g2.attn_logit_softcap, g2.final_logit_softcap) == (5.0, 3.0)
    assert g2.norm_weight_offset == 1.0 and g2.embed_scale == pytest.approx(8.0) and g2.post_norms
    g3 = spec_from_hf_config(saved["gemma3"][1])
    assert (g3.rope_base, g3.rope_base_local) == (1e6, 10000.0) and g3.qk_norm


def test_llama3_rope_scaling_is_read(saved):
    rs = spec_from_hf_config(saved["llama"][1]).rope_scaling
    assert (rs.factor, rs.low_freq_factor, rs.high_freq_factor, rs.original_context_length) == \
        (8.0, 1.0, 4.0, 16)


def test_hub_style_config_fields():
    """Configs on the Hub predate transformers 5: rope_theta, rope_local_base_freq, sliding_window_pattern."""
    cfg = {"architectures": ["Gemma3ForCausalLM"], "model_type": "gemma3_text", "vocab_size": 96,
           "hidden_size": 64, "num_hidden_layers": 12, "num_attention_heads": 4, "num_key_value_heads": 1,
           "head_dim": 16, "intermediate_size": 96, "max_position_embeddings": 128, "rms_norm_eps": 1e-6,
           "rope_theta": 1e6, "rope_local_base_freq": 1e4, "hidden_activation": "gelu_pytorch_tanh",
           "query_pre_attn_scalar": 16, "sliding_window": 8, "sliding_window_pattern": 6}
    import transformers

    hf = transformers.Gemma3TextConfig(**cfg)  # transformers' reading of the same fields
    spec = spec_from_hf_config(cfg)
    assert [k == "local" for k in spec.layer_kinds] == [t == "sliding_attention" for t in hf.layer_types]
    assert spec.rope_base_local == hf.rope_parameters["sliding_attention"]["rope_theta"]


@pytest.mark.parametrize("family", sorted(TINY_FAMILIES))
def test_weights_map_to_gguf_names(saved, family):
    model, folder = saved[family]
    spec = spec_from_hf_config(folder)
    w = load_safetensors(folder, spec)
    assert list(w) == list(spec.tensor_shapes())
    assert all(t.dtype == torch.float32 for t in w.values())
    layer = model.model.layers[1]
    assert torch.equal(w["token_embd.weight"], model.model.embed_tokens.weight)
    assert torch.equal(w["blk.1.attn_q.weight"], layer.self_attn.q_proj.weight)  # HF layout, no permutation
    assert torch.equal(w["blk.1.attn_output.weight"], layer.self_attn.o_proj.weight)
    assert torch.equal(w["output_norm.weight"], model.model.norm.weight)
    if family in ("gemma2", "gemma3"):  # true post-attention norms; Gemma 1 is Llama-like
        assert torch.equal(w["blk.1.post_attention_norm.weight"], layer.post_attention_layernorm.weight)
        assert torch.equal(w["blk.1.ffn_norm.weight"], layer.pre_feedforward_layernorm.weight)
        assert torch.equal(w["blk.1.post_ffw_norm.weight"], layer.post_feedforward_layernorm.weight)
    else:
        assert torch.equal(w["blk.1.ffn_norm.weight"], layer.post_attention_layernorm.weight)
    if family == "qwen2":
        assert torch.equal(w["blk.1.attn_k.bias"], layer.self_attn.k_proj.bias)
    if family == "qwen3":
        assert torch.equal(w["blk.1.attn_k_norm.weight"], layer.self_attn.k_norm.weight)


def test_mixtral_experts_are_stacked_in_expert_order(saved):
    _, folder = saved["mixtral"]
    spec = spec_from_hf_config(folder)
    w = load_safetensors(folder, spec)
    raw = load_file(folder / "model.safetensors")
    for j in range(spec.n_experts):
        prefix = f"model.layers.1.block_sparse_moe.experts.{j}."
        assert torch.equal(w["blk.1.ffn_gate_exps.weight"][j], raw[prefix + "w1.weight"])
        assert torch.equal(w["blk.1.ffn_up_exps.weight"][j], raw[prefix + "w3.weight"])
        assert torch.equal(w["blk.1.ffn_down_exps.weight"][j], raw[prefix + "w2.weight"])
    assert torch.equal(w["blk.1.ffn_gate_inp.weight"], raw["model.layers.1.block_sparse_moe.gate.weight"])


def test_sharded_checkpoint_folder(saved, tmp_path):
    _, folder = saved["llama"]
    raw = load_file(folder / "model.safetensors")
    names = sorted(raw)
    shards = {"a.safetensors": names[::2], "b.safetensors": names[1::2]}
    for shard, keys in shards.items():
        save_file({k: raw[k] for k in keys}, tmp_path / shard)
    (tmp_path / "model.safetensors.index.json").write_text(json.dumps(
        {"weight_map": {k: shard for shard, keys in shards.items() for k in keys}}))
    spec = spec_from_hf_config(folder)
    whole, sharded = load_safetensors(folder, spec), load_safetensors(tmp_path, spec)
    assert all(torch.equal(whole[k], sharded[k]) for k in whole)


# ---- bad input: one clear OpenLPUError each ---------------------------------------------------
def _config(saved, family="llama") -> dict:
    return json.loads((saved[family][1] / "config.json").read_text())


def test_unknown_architecture(saved):
    cfg = {**_config(saved), "model_type": "gpt2", "architectures": ["GPT2LMHeadModel"]}
    with pytest.raises(OpenLPUError, match="unknown architecture model_type 'gpt2'"):
        spec_from_hf_config(cfg)


def test_missing_field_is_named(saved):
    cfg = _config(saved)
    del cfg["intermediate_size"]
    with pytest.raises(OpenLPUError, match="missing field 'intermediate_size'"):
        spec_from_hf_config(cfg)


def test_contradictory_architecture(saved):
    cfg = {**_config(saved), "architectures": ["MistralForCausalLM"]}
    with pytest.raises(OpenLPUError, match="contradictory fields: 'architectures'"):
        spec_from_hf_config(cfg)


def test_contradictory_layer_types(saved):
    cfg = _config(saved, "gemma3")
    cfg["layer_types"] = ["sliding_attention"] * 3
    with pytest.raises(OpenLPUError, match="'layer_types' lists 3 layers but 'num_hidden_layers' is 2"):
        spec_from_hf_config(cfg)


def test_contradictory_rope_theta(saved):
    cfg = {**_config(saved, "mistral"), "rope_theta": 123.0}
    with pytest.raises(OpenLPUError, match="contradictory fields 'rope_theta'"):
        spec_from_hf_config(cfg)


def test_unsupported_rope_scaling(saved):
    cfg = _config(saved, "mistral")
    cfg["rope_parameters"] = {"rope_type": "linear", "factor": 8.0, "rope_theta": 10000.0}
    with pytest.raises(OpenLPUError, match="rope_scaling' of type 'linear' is not supported"):
        spec_from_hf_config(cfg)


def test_unsupported_bias_flag(saved):
    with pytest.raises(OpenLPUError, match="'attention_bias' = true is not supported"):
        spec_from_hf_config({**_config(saved), "attention_bias": True})


@pytest.mark.parametrize("change, says", [
    ({"norm_topk_prob": False}, "'norm_topk_prob' = False is not supported for qwen3_moe"),
    ({"mlp_only_layers": [0]}, "'mlp_only_layers' = [0] is not supported"),
    ({"decoder_sparse_step": 2}, "'decoder_sparse_step' = 2 is not supported"),
    ({"num_experts": None}, "missing field 'num_experts'"),
])
def test_qwen3_moe_configs_it_cannot_express_are_refused(change, says):
    """Qwen3-MoE as ModelSpec holds it: every layer sparse, top-k weights renormalized."""
    cfg = json.loads((PRESETS_DIR / "qwen3-30b-a3b.json").read_text())["$source_notes"]["hf_config"]
    with pytest.raises(OpenLPUError, match=re.escape(says)):
        spec_from_hf_config({**cfg, **change})


def test_config_not_found(tmp_path):
    with pytest.raises(OpenLPUError, match="HF config not found"):
        spec_from_hf_config(tmp_path)


def test_missing_tensor_is_named(saved, tmp_path):
    _, folder = saved["llama"]
    raw = load_file(folder / "model.safetensors")
    del raw["model.layers.1.mlp.up_proj.weight"]
    save_file(raw, tmp_path / "model.safetensors")
    with pytest.raises(OpenLPUError, match=r"missing 1 tensor.*model\.layers\.1\.mlp\.up_proj\.weight"):
        load_safetensors(tmp_path, spec_from_hf_config(folder))


def test_extra_tensor_is_named(saved, tmp_path):
    _, folder = saved["llama"]
    raw = load_file(folder / "model.safetensors")
    raw["model.layers.0.self_attn.rotary_emb.inv_freq"] = torch.zeros(8)
    save_file(raw, tmp_path / "model.safetensors")
    with pytest.raises(OpenLPUError, match=r"1 tensor\(s\) the config does not use.*rotary_emb"):
        load_safetensors(tmp_path, spec_from_hf_config(folder))


def test_shape_mismatch_names_tensor_and_shapes(saved):
    _, folder = saved["llama"]
    cfg = {**_config(saved), "intermediate_size": 80}
    with pytest.raises(OpenLPUError, match=r"'model\.layers\.0\.mlp\.gate_proj\.weight' has shape "
                                           r"\(96, 64\), the config says \(80, 64\)"):
        load_safetensors(folder, spec_from_hf_config(cfg))


def test_no_weights_in_folder(saved, tmp_path):
    with pytest.raises(OpenLPUError, match="no .safetensors files"):
        load_safetensors(tmp_path, spec_from_hf_config(saved["llama"][1]))


def test_corrupt_weights_file(saved, tmp_path):
    (tmp_path / "model.safetensors").write_bytes(b"not a safetensors file")
    with pytest.raises(OpenLPUError, match="not a readable safetensors file"):
        load_safetensors(tmp_path, spec_from_hf_config(saved["llama"][1]))
