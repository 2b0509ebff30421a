"""HF config.json -> ModelSpec and safetensors -> GGUF-named weights, checked against transformers."""

import dataclasses
import json
import re
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

from fixtures.tiny_models.hf_tiny import TINY_FAMILIES, build, family_of, save
from openlpu.errors import OpenLPUError
from openlpu.models.hf import (FAMILY_RULES, HF_DEFAULTS, NESTED_TEXT_DEFAULTS, load_safetensors,
                               spec_from_hf_config)
from openlpu.models.spec import PRESETS_DIR, RopeScaling
from openlpu.runtime.model import rope_inverse_frequencies


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
    assert spec.family == family_of(family)
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
    hf_chunked = [t == "chunked_attention" for t in getattr(model.config, "layer_types", [])]
    assert [k == "chunked" for k in spec.layer_kinds] == (hf_chunked or [False] * spec.n_layers)
    if any(hf_chunked):
        assert spec.attention_chunk == model.config.attention_chunk_size


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


def test_gemma3_linear_rope_scaling_turns_as_transformers(saved):
    """transformers 5's rope_parameters per layer type: linear scaling on full attention, none on sliding; each
    layer's rope turns at the frequencies of the transformers rotary embedding of its layer type."""
    model, folder = saved["gemma3-linear-rope"]
    spec = spec_from_hf_config(folder)
    assert spec.rope_scaling == RopeScaling(factor=8.0, kind="linear", layer_kinds=("global",))
    rotary = model.model.rotary_emb
    for i, layer_type in enumerate(model.config.layer_types):
        torch.testing.assert_close(rope_inverse_frequencies(spec.head_dim, *spec.layer_rope(i)),
                                   getattr(rotary, f"{layer_type}_inv_freq"), rtol=1e-6, atol=0)


@pytest.mark.parametrize("sliding, kinds", [({"rope_type": "linear", "factor": 8.0}, ("global", "local")),
                                            ({}, ("global",))])
def test_gemma3_rope_scaling_per_layer_type(saved, sliding, kinds):
    cfg = _config(saved, "gemma3-linear-rope")
    cfg["rope_parameters"]["sliding_attention"].update(sliding)
    assert spec_from_hf_config(cfg).rope_scaling.layer_kinds == kinds


def test_gemma3_sliding_only_rope_scaling(saved):
    cfg = _config(saved, "gemma3-linear-rope")
    params = cfg["rope_parameters"]
    params["full_attention"], params["sliding_attention"] = params["sliding_attention"], params["full_attention"]
    assert spec_from_hf_config(cfg).rope_scaling.layer_kinds == ("local",)


@pytest.mark.parametrize("sliding, says", [
    ({"rope_type": "linear", "factor": 4.0}, "and 'rope_parameters.sliding_attention' scale rope in different ways"),
    ({"rope_type": "dynamic", "factor": 4.0}, "'rope_parameters.sliding_attention' of type 'dynamic' is not supported"),
    ({"rope_type": "linear"}, "field 'rope_parameters.sliding_attention' lacks 'factor' for rope_type linear"),
])
def test_gemma3_rope_scalings_it_cannot_express_are_refused(saved, sliding, says):
    cfg = _config(saved, "gemma3-linear-rope")
    cfg["rope_parameters"]["sliding_attention"].update(sliding)
    with pytest.raises(OpenLPUError, match=re.escape(says)):
        spec_from_hf_config(cfg)


def test_yarn_on_gemma3_global_layers_only_is_refused(saved):
    """yarn's attention factor scales every layer's attention in ModelSpec, but transformers' Gemma 3 would scale
    only the layers it ropes with yarn."""
    cfg = _config(saved, "gemma3-linear-rope")
    cfg["rope_parameters"]["full_attention"] = {"rope_type": "yarn", "factor": 8.0, "rope_theta": 10000.0,
                                                "original_max_position_embeddings": 16}
    with pytest.raises(OpenLPUError, match="yarn rope scaling must scale every kind of layer"):
        spec_from_hf_config(cfg)


def test_llama4_specific_fields(saved):
    """The tiny Llama 4: rope + chunks of 8 and a dense MLP on layer 0, NoPE + global with temperature tuning
    and experts on layer 1, q/k norms where transformers has them, a sigmoid router over 4 experts (top 2) and
    a shared expert."""
    model, folder = saved["llama4"]
    spec = spec_from_hf_config(folder)
    assert spec.layer_kinds == ("chunked", "global") and spec.attention_chunk == 8 and spec.nope_global
    hf_rope = [bool(layer.self_attn.use_rope) for layer in model.model.layers]
    assert [spec.layer_uses_rope(i) for i in range(spec.n_layers)] == hf_rope == [True, False]
    assert (spec.attn_temperature_floor, spec.attn_temperature_scale) == (4, 0.1)
    assert spec.qk_l2_norm and hasattr(model.model.layers[0].self_attn, "qk_norm")
    assert (spec.router, spec.shared_expert, spec.n_experts, spec.n_experts_per_token, spec.d_ff) == \
        ("sigmoid_input", True, 4, 2, 96)
    hf_moe = [layer.is_moe_layer for layer in model.model.layers]
    assert [spec.is_moe_layer(i) for i in range(spec.n_layers)] == hf_moe == [False, True]
    assert (spec.moe_layer_step, spec.dense_d_ff, spec.layer_d_ff(0), spec.layer_d_ff(1)) == (2, 128, 128, 96)
    rs = spec.rope_scaling
    assert (rs.kind, rs.factor, rs.low_freq_factor, rs.high_freq_factor, rs.original_context_length) == \
        ("llama3", 8.0, 1.0, 4.0, 16)


# The released multimodal checkpoints' config.json: model_type -> (architecture, top-level fields, vision_config)
MULTIMODAL = {
    "llama4": ("Llama4ForConditionalGeneration", {"tie_word_embeddings": False},
               {"model_type": "llama4_vision_model", "hidden_size": 1408, "num_hidden_layers": 34}),
    "gemma3": ("Gemma3ForConditionalGeneration", {}, {"model_type": "siglip_vision_model"}),
}


def _multimodal(model_type: str, text_config: dict) -> dict:
    """The released checkpoints' config.json shape: the text model under text_config, beside a vision model."""
    architecture, fields, vision = MULTIMODAL[model_type]
    return {"architectures": [architecture], "model_type": model_type, **fields,
            "text_config": {k: v for k, v in text_config.items() if k != "architectures"}, "vision_config": vision}


@pytest.mark.parametrize("model_type, family, other_type, causal_lm", [
    ("llama4", "llama4", "llama", "Llama4ForCausalLM"), ("gemma3", "gemma3-linear-rope", "gemma2", None)])
def test_a_multimodal_config_reads_its_text_config(saved, model_type, family, other_type, causal_lm):
    cfg = _config(saved, family)
    nested = spec_from_hf_config(_multimodal(model_type, cfg))
    flat = spec_from_hf_config(cfg)
    assert dataclasses.replace(nested, source=flat.source) == flat
    if causal_lm:
        with pytest.raises(OpenLPUError, match=f"contradictory fields: 'architectures' says '{causal_lm}'"):
            spec_from_hf_config({**_multimodal(model_type, cfg), "architectures": [causal_lm]})
    with pytest.raises(OpenLPUError, match=f"contradictory fields: 'text_config.model_type' says '{other_type}'"):
        spec_from_hf_config(_multimodal(model_type, {**cfg, "model_type": other_type}))


# google/gemma-3-27b-it's config.json, its vision_config cut to its model type: the text model nested under
# text_config, which leaves out what transformers' Gemma3TextConfig defaults (vocab_size, rope_theta...) and keeps
# transformers 4's rope_scaling, which Gemma 3 applies to its global layers only
GEMMA3_27B = json.loads((PRESETS_DIR / "gemma-3-27b.json").read_text())["$source_notes"]["hf_config"]


def test_gemma3_published_multimodal_config_reads_as_transformers():
    """The fields the published text_config leaves out are transformers' defaults, shapes included, and its
    rope_scaling is the global layers' (transformers' reading of the same config.json, independent of ours)."""
    import transformers

    spec = spec_from_hf_config(GEMMA3_27B)
    hf = transformers.Gemma3Config(**{k: v for k, v in GEMMA3_27B.items() if k != "architectures"}).text_config
    assert (spec.vocab_size, spec.d_model, spec.n_layers, spec.n_heads, spec.n_kv_heads, spec.head_dim, spec.d_ff) \
        == (hf.vocab_size, hf.hidden_size, hf.num_hidden_layers, hf.num_attention_heads, hf.num_key_value_heads,
            hf.head_dim, hf.intermediate_size)
    assert [k == "local" for k in spec.layer_kinds] == [t == "sliding_attention" for t in hf.layer_types]
    assert (spec.context_length, spec.sliding_window, spec.query_scale) == \
        (hf.max_position_embeddings, hf.sliding_window, hf.query_pre_attn_scalar ** -0.5)
    rope = hf.rope_parameters
    assert (rope["full_attention"]["rope_type"], rope["full_attention"]["factor"]) == ("linear", 8.0)
    assert rope["sliding_attention"]["rope_type"] == "default"
    assert spec.rope_scaling == RopeScaling(factor=8.0, kind="linear", layer_kinds=("global",))
    assert (spec.rope_base, spec.rope_base_local) == \
        (rope["full_attention"]["rope_theta"], rope["sliding_attention"]["rope_theta"])


def test_a_gemma3_text_config_of_its_own_still_needs_its_shapes():
    text = {**GEMMA3_27B["text_config"], "architectures": ["Gemma3ForCausalLM"]}
    assert spec_from_hf_config(_multimodal("gemma3", text)).vocab_size == 262_208
    with pytest.raises(OpenLPUError, match="missing field 'vocab_size'"):
        spec_from_hf_config(text)


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


def test_a_config_is_named_after_its_folder_when_given_from_inside_it(tmp_path, monkeypatch):
    """`openlpu plan config.json` (or `.`) in a checkpoint folder names the model after the folder, as the path
    from outside does; the name titles plan's table and is saved in the Program."""
    folder = tmp_path / "my-llama"
    folder.mkdir()
    quoted = json.loads((PRESETS_DIR / "llama-3.2-1b.json").read_text())["$source_notes"]["hf_config"]
    (folder / "config.json").write_text(json.dumps(quoted))
    monkeypatch.chdir(folder)
    assert {spec_from_hf_config(Path(given)).name for given in ("config.json", ".", str(folder))} == {"my-llama"}
    # a hub cache's snapshot folder, whose config.json links into its blobs folder: named after the snapshot's
    blobs, snapshot = tmp_path / "blobs", tmp_path / "snapshots" / "my-snapshot"
    blobs.mkdir()
    snapshot.mkdir(parents=True)
    (blobs / "3a7c").write_text(json.dumps(quoted))
    (snapshot / "config.json").symlink_to(blobs / "3a7c")
    assert spec_from_hf_config(snapshot / "config.json").name == spec_from_hf_config(snapshot).name == "my-snapshot"


def test_a_config_in_a_hub_cache_or_named_otherwise_is_named_for_its_model(tmp_path):
    """A hub cache's snapshot folder is a commit hash (models--ORG--NAME/snapshots/HASH/config.json): the model is
    NAME; a config file named other than config.json is named by its stem (both were named by their folder)."""
    quoted = json.loads((PRESETS_DIR / "llama-3.2-1b.json").read_text())["$source_notes"]["hf_config"]
    snapshot = tmp_path / "models--meta-llama--Llama-3.2-1B" / "snapshots" / "4e20de362430cd3b72f300e6b0f18e50e7166e08"
    snapshot.mkdir(parents=True)
    (snapshot / "config.json").write_text(json.dumps(quoted))
    (tmp_path / "qwen-like.json").write_text(json.dumps(quoted))
    assert spec_from_hf_config(snapshot).name == "Llama-3.2-1B"
    assert spec_from_hf_config(tmp_path / "qwen-like.json").name == "qwen-like"


@pytest.mark.parametrize("model_type, config", [("qwen2", "Qwen2Config"), ("qwen3", "Qwen3Config")])
def test_qwen_sliding_layers_as_transformers_lays_them(model_type, config):
    """use_sliding_window with no window or first sliding layer given: transformers slides from layer 28 with a
    window of 4,096 (its arguments' defaults); the loader read no sliding layer at all (a review found it)."""
    import transformers

    cfg = {"architectures": [FAMILY_RULES[model_type].architecture], "model_type": model_type, "vocab_size": 96,
           "hidden_size": 64, "num_hidden_layers": 36, "num_attention_heads": 4, "num_key_value_heads": 2,
           "head_dim": 16, "intermediate_size": 96, "max_position_embeddings": 8192, "use_sliding_window": True}
    hf = getattr(transformers, config)(**cfg)
    spec = spec_from_hf_config(cfg)
    assert [k == "local" for k in spec.layer_kinds] == [t == "sliding_attention" for t in hf.layer_types]
    assert spec.sliding_window == hf.sliding_window == 4096 and "local" in spec.layer_kinds


def test_qwen3_moe_slides_on_every_layer_where_sliding_is_on():
    """transformers' Qwen3-MoE has no max_window_layers: with use_sliding_window, its attention slides on every
    layer (modeling_qwen3_moe reads config.sliding_window, which its config keeps, 4,096 by default, only then)."""
    import transformers

    cfg = {"architectures": ["Qwen3MoeForCausalLM"], "model_type": "qwen3_moe", "vocab_size": 96, "hidden_size": 64,
           "num_hidden_layers": 4, "num_attention_heads": 4, "num_key_value_heads": 2, "head_dim": 16,
           "moe_intermediate_size": 32, "num_experts": 4, "num_experts_per_tok": 2, "max_position_embeddings": 8192,
           "use_sliding_window": True}
    spec = spec_from_hf_config(cfg)
    assert spec.layer_kinds == ("local",) * 4 and spec.sliding_window == transformers.Qwen3MoeConfig(
        **cfg).sliding_window == 4096


def test_a_value_the_model_cannot_have_names_the_file_and_its_field(tmp_path):
    """ModelSpec's own checks named the model and its field, not the file or the file's key, nor what to do."""
    quoted = json.loads((PRESETS_DIR / "llama-3.2-1b.json").read_text())["$source_notes"]["hf_config"]
    (tmp_path / "config.json").write_text(json.dumps({**quoted, "num_key_value_heads": 7}))
    with pytest.raises(OpenLPUError, match=re.escape(f"{tmp_path / 'config.json'}: model ")) as refused:
        spec_from_hf_config(tmp_path)
    assert str(refused.value).endswith("(n_heads: num_attention_heads; n_kv_heads: num_key_value_heads); fix the "
                                       "config.json")


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
    if family_of(family) in ("gemma2", "gemma3"):  # true post-attention norms; Gemma 1 is Llama-like
        assert torch.equal(w["blk.1.post_attention_norm.weight"], layer.post_attention_layernorm.weight)
        assert torch.equal(w["blk.1.ffn_norm.weight"], layer.pre_feedforward_layernorm.weight)
        assert torch.equal(w["blk.1.post_ffw_norm.weight"], layer.post_feedforward_layernorm.weight)
    else:
        assert torch.equal(w["blk.1.ffn_norm.weight"], layer.post_attention_layernorm.weight)
    if family == "qwen2":
        assert torch.equal(w["blk.1.attn_k.bias"], layer.self_attn.k_proj.bias)
    if family == "qwen3":
        assert torch.equal(w["blk.1.attn_k_norm.weight"], layer.self_attn.k_norm.weight)


def test_llama4_packed_experts_split_gate_first(saved):
    """gate_up_proj (expert, d_model, 2 d_ff) is used as x @ W with the gate in its first d_ff columns
    (transformers Llama4TextExperts); GGUF's experts are (expert, out, in)."""
    model, folder = saved["llama4"]
    spec = spec_from_hf_config(folder)
    w = load_safetensors(folder, spec)
    assert {n: tuple(t.shape) for n, t in w.items()} == spec.tensor_shapes()
    for i, layer in enumerate(model.model.layers):
        moe, b = layer.feed_forward, f"blk.{i}."
        if not spec.is_moe_layer(i):  # a dense MLP, under feed_forward
            for part in ("gate", "up", "down"):
                assert torch.equal(w[b + f"ffn_{part}.weight"], getattr(moe, f"{part}_proj").weight)
            continue
        gate_up = moe.experts.gate_up_proj
        for j in range(spec.n_experts):
            assert torch.equal(w[b + "ffn_gate_exps.weight"][j], gate_up[j, :, :spec.d_ff].T)
            assert torch.equal(w[b + "ffn_up_exps.weight"][j], gate_up[j, :, spec.d_ff:].T)
            assert torch.equal(w[b + "ffn_down_exps.weight"][j], moe.experts.down_proj[j].T)
        assert torch.equal(w[b + "ffn_gate_inp.weight"], moe.router.weight)
        for part in ("gate", "up", "down"):
            assert torch.equal(w[b + f"ffn_{part}_shexp.weight"], getattr(moe.shared_expert, f"{part}_proj").weight)
    x = torch.randn(5, spec.d_model)  # the split computes what transformers' experts compute
    expected = model.model.layers[1].feed_forward.experts(x.repeat(spec.n_experts, 1)).view(spec.n_experts, 5, -1)
    gate = torch.einsum("td,efd->etf", x, w["blk.1.ffn_gate_exps.weight"])
    up = torch.einsum("td,efd->etf", x, w["blk.1.ffn_up_exps.weight"])
    ours = torch.einsum("etf,edf->etd", torch.nn.functional.silu(gate) * up, w["blk.1.ffn_down_exps.weight"])
    torch.testing.assert_close(ours, expected.detach())


def test_llama4_multimodal_checkpoint_reads_the_text_model(saved, tmp_path):
    """The released checkpoints prefix the text model's tensors with "language_model." and hold the vision
    encoder's and projector's, which are skipped; any other unknown tensor is still reported."""
    _, folder = saved["llama4"]
    raw = {f"language_model.{k}": v for k, v in load_file(folder / "model.safetensors").items()}
    raw["vision_model.patch_embedding.linear.weight"] = torch.zeros(8, 4)
    raw["multi_modal_projector.linear_1.weight"] = torch.zeros(8, 4)
    save_file(raw, tmp_path / "model.safetensors")
    (tmp_path / "config.json").write_text(json.dumps(_multimodal("llama4", _config(saved, "llama4"))))
    spec = spec_from_hf_config(tmp_path)
    whole, text_only = load_safetensors(tmp_path, spec), load_safetensors(folder, spec)
    assert list(whole) == list(text_only) and all(torch.equal(whole[k], text_only[k]) for k in whole)
    raw["language_model.model.layers.0.feed_forward.mystery"] = torch.zeros(2)
    save_file(raw, tmp_path / "model.safetensors")
    with pytest.raises(OpenLPUError, match=r"1 tensor\(s\) the config does not use.*feed_forward\.mystery"):
        load_safetensors(tmp_path, spec)


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
    cfg["rope_parameters"] = {"rope_type": "dynamic", "factor": 8.0, "rope_theta": 10000.0}
    with pytest.raises(OpenLPUError, match="rope_scaling' of type 'dynamic' is not supported"):
        spec_from_hf_config(cfg)


def test_linear_rope_scaling_scales_every_layer_of_other_families(saved):
    cfg = _config(saved, "mistral")
    cfg["rope_parameters"] = {"rope_type": "linear", "factor": 8.0, "rope_theta": 10000.0}
    assert spec_from_hf_config(cfg).rope_scaling == RopeScaling(factor=8.0, kind="linear")


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


@pytest.mark.parametrize("change, says", [
    # ModelSpec's MoE layers are every k-th layer (Maverick: every second)
    ({"moe_layers": [0]}, "field 'moe_layers' = [0] is not supported for llama4"),
    ({"interleave_moe_layer_step": 0, "moe_layers": None}, "'interleave_moe_layer_step' must be a positive integer"),
    ({"attention_bias": True}, "field 'attention_bias' = true is not supported for llama4_text"),
    ({"layer_types": ["full_attention", "full_attention"]},
     "layer 0 uses rope (field 'no_rope_layers') but its attention is global"),
    ({"attention_chunk_size": None, "layer_types": None},
     "layer 0 uses rope (field 'no_rope_layers') but its attention is global"),
    ({"no_rope_layers": [1]}, "field 'no_rope_layers' must list 0 (NoPE) or 1 (rope) for each of the 2 layers"),
    ({"hidden_act": "gelu"}, "activation 'gelu' not supported for llama4_text"),
])
def test_llama4_configs_it_cannot_express_are_refused(saved, change, says):
    cfg = {**_config(saved, "llama4"), **change}
    with pytest.raises(OpenLPUError, match=re.escape(says)):
        spec_from_hf_config(cfg)
    with pytest.raises(OpenLPUError, match=re.escape(says)):  # the multimodal form too
        spec_from_hf_config(_multimodal("llama4", cfg))


def test_llama4_configs_it_can_express():
    """Scout's own config.json fields (attn_temperature_tuning 4 is truthy; no_rope_layers [] means every 4th
    layer is NoPE), and a config without temperature tuning or q/k norms (as Maverick's use_qk_norm false)."""
    cfg = json.loads((PRESETS_DIR / "llama-4-scout.json").read_text())["$source_notes"]["hf_config"]
    text = cfg["text_config"]
    spec = spec_from_hf_config(cfg)
    assert spec.layer_kinds[:4] == ("chunked", "chunked", "chunked", "global")
    assert (spec.attn_temperature_floor, spec.attn_temperature_scale, spec.qk_l2_norm) == (8192, 0.1, True)
    plain = spec_from_hf_config({**text, "attn_temperature_tuning": False, "use_qk_norm": False,
                                 "no_rope_layers": [1, 1, 0] * 16})
    assert (plain.attn_temperature_floor, plain.attn_temperature_scale, plain.qk_l2_norm) == (0, 0.0, False)
    assert [i for i in range(plain.n_layers) if not plain.layer_uses_rope(i)] == list(range(2, 48, 3))


@pytest.mark.parametrize("change, says", [
    ({"tie_word_embeddings": "false"}, "field 'tie_word_embeddings' must be true or false, got 'false'"),  # truthy
    ({"rope_scaling": 0}, "field 'rope_scaling' must be a JSON object, got 0"),  # read as absent
    ({"architectures": 0}, "field 'architectures' must be a list of class names, got 0"),
])
def test_values_a_falsy_or_truthy_reading_let_through_are_refused(saved, change, says):
    with pytest.raises(OpenLPUError, match=re.escape(says)):
        spec_from_hf_config({**_config(saved), **change})


def test_config_nested_deeper_than_the_parser_recurses(tmp_path):
    (tmp_path / "config.json").write_text('{"x":' + "[" * 100_000 + "]" * 100_000 + "}")
    with pytest.raises(OpenLPUError, match="JSON nested deeper than any config.json is"):
        spec_from_hf_config(tmp_path)


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


@pytest.mark.parametrize("preset, change, says", [
    # each found by mutating the presets' configs at random, where a field of the wrong type or size
    # crashed the loader or exhausted memory instead of naming the field
    ("llama-3.1-405b", {"rope_scaling": 1}, "field 'rope_scaling' must be a JSON object, got 1"),
    ("llama-3.1-405b", {"rope_scaling": {"rope_type": []}}, "field 'rope_scaling.rope_type' must be a string, got []"),
    ("mistral-7b", {"num_attention_heads": 0},
     "field 'num_attention_heads' must be a positive integer of at most 2,147,483,647, got 0"),
    ("qwen2.5-72b", {"num_hidden_layers": 10**9},
     "field 'num_hidden_layers' must be a positive integer of at most 10,000, got 1000000000"),
    ("qwen3-32b", {"vocab_size": 1e308}, "field 'vocab_size' must be a positive integer of at most 2,147,483,647"),
    ("qwen3-8b", {"hidden_size": float("nan")}, "field 'hidden_size' must be a positive integer"),
    ("llama-3.1-8b", {"model_type": []}, "field 'model_type' must be a string, got []"),
    ("gemma-7b", {"architectures": 0.5}, "field 'architectures' must be a list of class names, got 0.5"),
    ("llama-3.1-70b", {"hidden_act": {}}, "field 'hidden_act' must be a string, got {}"),
    ("mixtral-8x7b", {"rope_theta": []}, "field 'rope_theta' must be a positive number, got []"),
    ("llama-3.1-8b", {"mlp_bias": "x"}, "field 'mlp_bias' = \"x\" is not supported for llama (only false)"),
    ("gemma-2-9b", {"attn_logit_softcapping": "x"}, "field 'attn_logit_softcapping' must be a positive number"),
    ("gemma-2-9b", {"layer_types": 3}, "field 'layer_types' must be a list of layer type names, got 3"),
    ("gemma-3-1b", {"sliding_window_pattern": 0}, "field 'sliding_window_pattern' must be a positive integer"),
    ("qwen2.5-7b", {"use_sliding_window": True, "max_window_layers": "x"},
     "field 'max_window_layers' must be a non-negative integer"),
])
def test_malformed_fields_are_named(preset, change, says):
    cfg = json.loads((PRESETS_DIR / f"{preset}.json").read_text())["$source_notes"]["hf_config"]
    with pytest.raises(OpenLPUError, match=re.escape(says)):
        spec_from_hf_config({**cfg, **change})


# ---- fields a config.json may leave out: transformers' defaults ---------------------------------
def _transformers_default(model_type: str, key: str):
    """What transformers takes for `key` when a config.json of `model_type` leaves it out (transformers 5 keeps
    the rope bases in rope_parameters, per layer type for Gemma 3)."""
    import transformers

    config = transformers.AutoConfig.for_model(model_type)
    rope = config.rope_parameters
    if key == "rope_theta":
        return rope.get("full_attention", rope)["rope_theta"]
    if key == "rope_local_base_freq":
        return rope["sliding_attention"]["rope_theta"]
    return getattr(config, key)


@pytest.mark.parametrize("model_type", sorted(HF_DEFAULTS))
def test_defaults_are_the_transformers_configuration_classes(model_type):
    assert set(HF_DEFAULTS) == set(FAMILY_RULES)
    defaults = HF_DEFAULTS[model_type] | NESTED_TEXT_DEFAULTS.get(model_type, {})
    assert {k: _transformers_default(model_type, k) for k in defaults} == defaults


def test_llama_2_config_without_rope_theta_reads_transformers_default():
    """meta-llama/Llama-2-7b-hf's config.json (transformers 4.31) has no rope_theta, attention_bias nor mlp_bias."""
    import transformers

    cfg = {"_name_or_path": "meta-llama/Llama-2-7b-hf", "architectures": ["LlamaForCausalLM"], "bos_token_id": 1,
           "eos_token_id": 2, "hidden_act": "silu", "hidden_size": 4096, "initializer_range": 0.02,
           "intermediate_size": 11008, "max_position_embeddings": 4096, "model_type": "llama",
           "num_attention_heads": 32, "num_hidden_layers": 32, "num_key_value_heads": 32, "pretraining_tp": 1,
           "rms_norm_eps": 1e-05, "rope_scaling": None, "tie_word_embeddings": False, "torch_dtype": "float16",
           "transformers_version": "4.31.0.dev0", "use_cache": True, "vocab_size": 32000}
    spec = spec_from_hf_config(cfg)
    assert spec.rope_base == transformers.LlamaConfig(**cfg).rope_parameters["rope_theta"] == 10000.0
    assert spec.param_count() == pytest.approx(6.74e9, rel=0.01)  # the Hub's count for Llama-2-7b-hf


def test_gemma3_local_rope_base_defaults_as_transformers():
    cfg = json.loads((PRESETS_DIR / "gemma-3-1b.json").read_text())["$source_notes"]["hf_config"]
    cfg = {k: v for k, v in cfg.items() if k != "rope_local_base_freq"}
    assert spec_from_hf_config(cfg).rope_base_local == _transformers_default("gemma3_text", "rope_local_base_freq")


@pytest.mark.parametrize("preset", ["qwen3-8b", "qwen2.5-7b"])
def test_yarn_extends_the_context_to_original_times_factor(preset):
    """Qwen's model cards enable 131,072 tokens by adding rope_scaling {yarn, factor 4, original 32768} and leave
    max_position_embeddings as it was (40960, 32768); vLLM serves original x factor (_get_and_verify_max_len) and
    transformers calls factor the ratio of the post-yarn to the pre-yarn context."""
    cfg = json.loads((PRESETS_DIR / f"{preset}.json").read_text())["$source_notes"]["hf_config"]
    yarn = {"rope_type": "yarn", "factor": 4.0, "original_max_position_embeddings": 32768}
    assert spec_from_hf_config({**cfg, "rope_scaling": yarn}).context_length == 131072
    assert spec_from_hf_config(cfg).context_length == cfg["max_position_embeddings"]


@pytest.mark.parametrize("preset", ["gemma-7b", "gemma-2-9b", "gemma-3-1b", "qwen3-8b", "gpt-oss-20b"])
def test_a_config_without_head_dim_takes_transformers_head_dim(preset):
    """transformers fixes head_dim for these families where a config.json leaves it out (Gemma: 256, not
    d_model / n_heads: 288 for Gemma 3 1B, 224 for Gemma 2 9B); OpenLPU read the quotient (a review)."""
    import transformers

    cfg = json.loads((PRESETS_DIR / f"{preset}.json").read_text())["$source_notes"]["hf_config"]
    cfg = {k: v for k, v in cfg.items() if k != "head_dim"}
    theirs = transformers.AutoConfig.for_model(**cfg)
    assert spec_from_hf_config(cfg).head_dim == theirs.head_dim
