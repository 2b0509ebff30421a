"""Presets: parameter counts against published figures, and each preset against its HF config."""

import json
import os
import re
import subprocess
import sys

import pytest

from openlpu.errors import OpenLPUError
from openlpu.models.hf import spec_from_hf_config
from openlpu.models.spec import PRESETS_DIR, load_preset, preset_names

HUB = "Hugging Face Hub parameter count (safetensors metadata) shown on {}"
GEMMA3_TABLE_1 = ("Gemma 3 technical report (arXiv:2503.19786) Table 1: {} = {:,}M embedding + {:,}M non-embedding "
                  "(its 417M vision encoder left out, as the text-only preset does)")
# Gemma 3 technical report (arXiv:2503.19786) Table 1: name -> (embedding, non-embedding parameters), in millions
GEMMA3_PARAMETERS_M = {"gemma-3-4b": (675, 3_209), "gemma-3-12b": (1_012, 10_759), "gemma-3-27b": (1_416, 25_600)}
GPT_OSS_CARD = ("OpenAI, 'gpt-oss-120b & gpt-oss-20b Model Card' (arXiv:2508.10925, Aug 2025), parameter counts: "
                "120b 116.83B total, 5.13B active; 20b 20.91B total, 3.61B active")
LLAMA4_CARD = ("Llama 4 model card (meta-llama/llama-models, models/llama4/MODEL_CARD.md): Llama 4 Scout (17Bx16E), "
               "17B (Activated), 109B (Total); Llama 4 Maverick (17Bx128E), 17B (Activated), 400B (Total)")
# Scout's 109B counts its vision encoder and projector, which the text-only preset leaves out: 850,960,896 +
# 20,971,520 parameters (transformers Llama4VisionModel and Llama4MultiModalProjector with the vision_config of
# meta-llama/Llama-4-Scout-17B-16E-Instruct's config.json; test_llama4_scout_vision_parameters counts them again).
SCOUT_VISION_CONFIG = {"hidden_size": 1408, "image_size": 336, "intermediate_size": 5632, "num_attention_heads": 16,
                       "num_hidden_layers": 34, "patch_size": 14, "pixel_shuffle_ratio": 0.5,
                       "projector_input_dim": 4096, "projector_output_dim": 4096, "vision_output_dim": 4096,
                       "multi_modal_projector_bias": False}
SCOUT_VISION_PARAMETERS = 850_960_896 + 20_971_520
# name -> (published total parameters, source). Checked within 1%.
PUBLISHED_TOTALS = {
    "llama-2-7b": (6.74e9, HUB.format("meta-llama/Llama-2-7b-hf")),
    "llama-2-13b": (13.0e9, HUB.format("meta-llama/Llama-2-13b-hf")),
    "llama-2-70b": (69.0e9, HUB.format("meta-llama/Llama-2-70b-hf")),
    "llama-3-8b": (8.03e9, HUB.format("meta-llama/Meta-Llama-3-8B")),
    "llama-3-70b": (70.6e9, HUB.format("meta-llama/Meta-Llama-3-70B")),
    "llama-3.1-8b": (8.03e9, HUB.format("meta-llama/Llama-3.1-8B")),
    "llama-3.1-70b": (70.6e9, HUB.format("meta-llama/Llama-3.1-70B")),
    "llama-3.1-405b": (405e9, "The Llama 3 Herd of Models (arXiv:2407.21783), Table 3: 405B"),
    "llama-3.2-1b": (1.23e9, "Llama 3.2 model card (meta-llama/llama-models), Params column: 1.23B"),
    "llama-3.2-3b": (3.21e9, "Llama 3.2 model card (meta-llama/llama-models), Params column: 3.21B"),
    "llama-3.3-70b": (70.6e9, HUB.format("meta-llama/Llama-3.3-70B-Instruct")),
    "mixtral-8x7b": (46.7e9, "Mistral AI, 'Mixtral of experts' (mistral.ai/news/mixtral-of-experts): "
                             "46.7B total parameters"),
    "mistral-7b": (7.24e9, HUB.format("mistralai/Mistral-7B-v0.1")),
    "gemma-7b": (786_825_216 + 7_751_248_896, "Gemma (arXiv:2403.08295) Table 2: embedding + "
                                              "non-embedding parameters, 7B"),
    "gemma-2-9b": (917_962_752 + 8_324_201_984, "Gemma 2 (arXiv:2408.00118) Table 2: embedding + "
                                                "non-embedding parameters, 9B"),
    "gemma-3-1b": (302e6 + 698e6, "Gemma 3 technical report (arXiv:2503.19786) Table 1: 1B = 302M "
                                  "embedding + 698M non-embedding"),
    **{name: ((embedding + rest) * 1e6, GEMMA3_TABLE_1.format(name.removeprefix("gemma-3-").upper(), embedding, rest))
       for name, (embedding, rest) in GEMMA3_PARAMETERS_M.items()},
    "gemma-3-270m": (270e6, "Google Developers Blog, 'Introducing Gemma 3 270M': 170M embedding + "
                            "100M transformer-block parameters"),
    "qwen2.5-7b": (7.61e9, "Qwen/Qwen2.5-7B-Instruct model card: Number of Parameters 7.61B"),
    "qwen2.5-72b": (72.7e9, "Qwen/Qwen2.5-72B-Instruct model card: Number of Parameters 72.7B"),
    "qwen3-8b": (8.2e9, "Qwen/Qwen3-8B model card: Number of Parameters 8.2B"),
    "qwen3-32b": (32.8e9, "Qwen/Qwen3-32B model card: Number of Parameters 32.8B"),
    "qwen3-30b-a3b": (30.5e9, "Qwen/Qwen3-30B-A3B model card: Number of Parameters 30.5B in total"),
    "qwen3-235b-a22b": (235e9, "Qwen/Qwen3-235B-A22B model card: Number of Parameters 235B in total"),
    "gpt-oss-20b": (20.91e9, GPT_OSS_CARD),
    "gpt-oss-120b": (116.83e9, GPT_OSS_CARD),
    "llama-4-scout": (109e9 - SCOUT_VISION_PARAMETERS, LLAMA4_CARD + ", less its vision encoder and projector"),
    # the text model counts 400.7B; with a vision encoder and projector of Scout's size (0.87B) it stays within 1%
    "llama-4-maverick": (400e9, LLAMA4_CARD),
}

# Exact non-embedding counts where the papers publish them (the embedding rows differ only by
# padding of the vocabulary: Gemma's papers count 256,128 rows, the HF config has 256,000).
PUBLISHED_NON_EMBEDDING = {
    "gemma-7b": (7_751_248_896, "Gemma (arXiv:2403.08295) Table 2"),
    "gemma-2-9b": (8_324_201_984, "Gemma 2 (arXiv:2408.00118) Table 2"),
}

# Non-embedding counts the Qwen model cards publish (embedding and untied LM head excluded).
QWEN_NON_EMBEDDING = {
    "qwen2.5-7b": (6.53e9, "Qwen/Qwen2.5-7B-Instruct model card: Non-Embedding 6.53B"),
    "qwen2.5-72b": (70.0e9, "Qwen/Qwen2.5-72B-Instruct model card: Non-Embedding 70.0B"),
    "qwen3-8b": (6.95e9, "Qwen/Qwen3-8B model card: Non-Embedding 6.95B"),
    "qwen3-32b": (31.2e9, "Qwen/Qwen3-32B model card: Non-Embedding 31.2B"),
    "qwen3-30b-a3b": (29.9e9, "Qwen/Qwen3-30B-A3B model card: Non-Embedding 29.9B"),
    "qwen3-235b-a22b": (234e9, "Qwen/Qwen3-235B-A22B model card: Non-Embedding 234B"),
}


def test_every_preset_has_a_published_count():
    assert set(PUBLISHED_TOTALS) == set(preset_names())


@pytest.mark.parametrize("name", sorted(PUBLISHED_TOTALS))
def test_param_count_matches_published_total(name):
    published, source = PUBLISHED_TOTALS[name]
    counted = load_preset(name).param_count()
    assert counted == pytest.approx(published, rel=0.01), source


@pytest.mark.parametrize("name", sorted(PUBLISHED_NON_EMBEDDING))
def test_gemma_non_embedding_count_is_exact(name):
    published, source = PUBLISHED_NON_EMBEDDING[name]
    s = load_preset(name)
    assert s.param_count() - s.vocab_size * s.d_model == published, source


@pytest.mark.parametrize("name", sorted(GEMMA3_PARAMETERS_M))
def test_gemma3_non_embedding_count_to_the_million(name):
    """Table 1 rounds to the million; its embedding counts 256k rows, the checkpoints' config 262,208."""
    s = load_preset(name)
    assert round((s.param_count() - s.vocab_size * s.d_model) / 1e6) == GEMMA3_PARAMETERS_M[name][1]


@pytest.mark.parametrize("name", sorted(QWEN_NON_EMBEDDING))
def test_qwen_non_embedding_count(name):
    published, source = QWEN_NON_EMBEDDING[name]
    s = load_preset(name)
    assert s.param_count() - 2 * s.vocab_size * s.d_model == pytest.approx(published, rel=0.005), source


@pytest.mark.parametrize("name, total, active", [("qwen3-30b-a3b", 30.5e9, 3.3e9), ("qwen3-235b-a22b", 235e9, 22e9)])
def test_qwen3_moe_active_parameters(name, total, active):
    """Qwen's model cards: 30.5B in total, 3.3B activated; 235B in total, 22B activated."""
    s = load_preset(name)
    assert s.active_param_count() == pytest.approx(active, rel=0.02)
    assert s.param_count() == pytest.approx(total, rel=0.01)


def test_mixtral_active_parameters():
    # "Mixtral has 46.7B total parameters but only uses 12.9B parameters per token"
    # (Mistral AI, 'Mixtral of experts', mistral.ai/news/mixtral-of-experts)
    s = load_preset("mixtral-8x7b")
    assert s.active_param_count() == pytest.approx(12.9e9, rel=0.01)
    assert s.param_count() == pytest.approx(46.7e9, rel=0.01)


@pytest.mark.parametrize("name, active", [("gpt-oss-20b", 3.61e9), ("gpt-oss-120b", 5.13e9)])
def test_gpt_oss_active_parameters(name, active):
    """The model card counts a token's active parameters without the embedding table (a row gather),
    with the attention, the router, 4 experts (their biases too) and the unembedding."""
    s = load_preset(name)
    assert s.active_param_count() - s.vocab_size * s.d_model == pytest.approx(active, rel=0.005), GPT_OSS_CARD


@pytest.mark.parametrize("name", ["llama-4-scout", "llama-4-maverick"])
def test_llama4_active_parameters(name):
    """Meta's model card: 17B activated (a token's attention, router, shared expert and one expert, or Maverick's
    dense MLP on every other layer, with the embedding and unembedding tables)."""
    assert load_preset(name).active_param_count() == pytest.approx(17e9, rel=0.02), LLAMA4_CARD


def test_llama4_scout_vision_parameters():
    """What SCOUT_VISION_PARAMETERS says: transformers' vision encoder and projector for Scout's vision_config."""
    import torch
    import transformers
    from transformers.models.llama4 import modeling_llama4

    config = transformers.Llama4Config(vision_config=SCOUT_VISION_CONFIG,
                                       text_config={"hidden_size": load_preset("llama-4-scout").d_model})
    with torch.device("meta"):
        parts = (modeling_llama4.Llama4VisionModel(config.vision_config),
                 modeling_llama4.Llama4MultiModalProjector(config))
    assert sum(p.numel() for part in parts for p in part.parameters()) == SCOUT_VISION_PARAMETERS


def _raw(name: str) -> dict:
    return json.loads((PRESETS_DIR / f"{name}.json").read_text())


@pytest.mark.parametrize("name", [n for n in sorted(PUBLISHED_TOTALS)
                                  if "hf_config" in _raw(n).get("$source_notes", {})])
def test_preset_equals_its_hf_config(name):
    """Each preset is what spec_from_hf_config makes of the HF config.json fields it quotes, except the fields
    its $source_notes.overrides name and explain (each of which does differ)."""
    notes = _raw(name)["$source_notes"]
    from_hf = spec_from_hf_config(notes["hf_config"], name=name).to_dict()
    preset = load_preset(name).to_dict()
    for d in (from_hf, preset):
        d.pop("source")
    overrides = notes.get("overrides", {})
    assert all(from_hf[field] != preset[field] for field in overrides)  # no stale override
    assert {**from_hf, **{field: preset[field] for field in overrides}} == preset


def test_family_specific_facts():
    # Mistral 7B v0.1: every layer uses a 4096-token sliding window (arXiv:2310.06825, Table 1)
    m = load_preset("mistral-7b")
    assert m.sliding_window == 4096 and set(m.layer_kinds) == {"local"}
    # Gemma 2: local and global attention alternate, local first; softcaps 50 / 30 (arXiv:2408.00118 §2)
    g = load_preset("gemma-2-9b")
    assert g.layer_kinds[:4] == ("local", "global", "local", "global")
    assert (g.attn_logit_softcap, g.final_logit_softcap) == (50.0, 30.0)
    # Gemma 3: five local layers for each global one (arXiv:2503.19786 §2.1)
    g3 = load_preset("gemma-3-1b")
    assert [i for i, k in enumerate(g3.layer_kinds) if k == "global"] == [5, 11, 17, 23]
    # Gemma 3 4B and up: 128K tokens by a linear rope scaling of 8 on the global layers, whose base is 1M; the local
    # layers keep a base of 10k unscaled (arXiv:2503.19786 §2, "Long context")
    for name in ("gemma-3-4b", "gemma-3-12b", "gemma-3-27b"):
        g3 = load_preset(name)
        assert (g3.context_length, g3.rope_scaling.kind, g3.rope_scaling.factor) == (131072, "linear", 8.0)
        assert {g3.layer_rope(i) for i, kind in enumerate(g3.layer_kinds) if kind == "local"} == {(10000.0, None)}
        assert {g3.layer_rope(i) for i, kind in enumerate(g3.layer_kinds) if kind == "global"} == \
            {(1e6, g3.rope_scaling)}
    # Llama 3.1 extends the context to 128K with its rope scaling; Llama 3 did not
    assert load_preset("llama-3.1-8b").rope_scaling.factor == 8.0
    assert load_preset("llama-3-8b").rope_scaling is None
    # Llama 4 Scout: every 4th layer is NoPE and global, the others use rope in 8192-token chunks (transformers
    # Llama4TextConfig with no_rope_layers [] and attention_chunk_size 8192)
    s = load_preset("llama-4-scout")
    assert [i for i, k in enumerate(s.layer_kinds) if k == "global"] == list(range(3, 48, 4))
    assert [i for i in range(s.n_layers) if not s.layer_uses_rope(i)] == list(range(3, 48, 4))
    assert s.layer_chunk(0) == 8192 and s.layer_chunk(3) is None
    # Llama 4 Maverick: layers 1, 3, ... have 128 experts, the others a dense MLP of 16,384 (interleave_moe_layer_step
    # 2, intermediate_size_mlp); no q/k norm (use_qk_norm false)
    m = load_preset("llama-4-maverick")
    assert [i for i in range(m.n_layers) if m.is_moe_layer(i)] == list(range(1, 48, 2)) and not m.qk_l2_norm
    assert (m.layer_d_ff(0), m.layer_d_ff(1), m.n_experts) == (16384, 8192, 128)


@pytest.mark.parametrize("name", sorted(GEMMA3_PARAMETERS_M))
def test_gemma3_multimodal_models_plan(name):
    """`openlpu plan` places and prices the text model of each (before their presets, no route could)."""
    out = subprocess.run([sys.executable, "-m", "openlpu.cli", "plan", name, "--compare", "", "--json"],
                         capture_output=True, text=True, check=True).stdout
    (row,) = json.loads(out)
    assert row["model"] == name and row["kind"] == "lpu" and row["chips"] > 0 and row["tokens_per_s_per_user"] > 0


def test_models_lists_every_preset_whole_on_an_80_column_terminal():
    """`openlpu models`: one row per preset with its name and family unshortened (rich would otherwise cut
    "qwen3-moe" to fit 80 columns) and the parameter counts of its spec."""
    env = {**os.environ, "COLUMNS": "80"}
    out = subprocess.run([sys.executable, "-m", "openlpu.cli", "models"], capture_output=True, text=True,
                         env=env, check=True).stdout
    rows = {cells[0]: cells for line in out.splitlines()
            if len(cells := [c.strip() for c in line.strip("│ ").split("│")]) == 7}
    assert set(preset_names()) <= set(rows)
    for name in preset_names():
        s = load_preset(name)
        assert rows[name][1] == s.family
        assert rows[name][5:] == [f"{s.param_count() / 1e9:.3f}", f"{s.active_param_count() / 1e9:.3f}"]


@pytest.mark.parametrize("field, value, says", [
    ("qkv_bias", "yes", "qkv_bias must be true or false, got 'yes'"),
    ("n_heads", 8.0, "n_heads must be an integer, got 8.0"),
    ("embed_scale", float("nan"), "embed_scale must be a finite number, got nan"),
    ("sliding_window", 0, "sliding_window must be a positive integer of at most 2,147,483,647 or none, got 0"),
    ("query_scale", "0.1", "query_scale must be a finite number or none"),
    ("activation", None, "activation must be a string, got None"),
    ("head_dim", 255, "head_dim must be even (rope turns a head's values in pairs), got 255"),
])
def test_a_spec_field_of_the_wrong_type_is_named(field, value, says):
    """What a preset, a config.json or a Program file gives is checked against each field's declared type where
    it is read, not where a compile or a run trips over it."""
    import dataclasses

    with pytest.raises(OpenLPUError, match=re.escape(says)):
        dataclasses.replace(load_preset("gemma-3-270m"), **{field: value})


@pytest.mark.parametrize("change, says", [
    ({"layer_kinds": 5}, "layer_kinds must be a list of ('global', 'local', 'chunked'), one per layer, got 5"),
    ({"n_experts": -1, "n_experts_per_token": -1}, "n_experts must be 0 or more, got -1"),
    ({"dense_d_ff": -5}, "dense_d_ff must be 0 or more, got -5"),
    ({"rope_scaling": {"factor": 8.0, "low_freq_factor": 0.0, "high_freq_factor": 4.0,
                       "original_context_length": 8192}}, "llama3 rope scaling needs 0 < low_freq_factor"),
])
def test_a_preset_format_file_is_checked_and_named(tmp_path, change, says):
    """A file in the presets' format whose values no model has: a traceback's words ('int' object is not
    iterable), or accepted (negative expert counts, a llama3 rope scaling the runtime divides by 0 with)."""
    from openlpu.models.spec import load_spec

    path = tmp_path / "mine.json"
    path.write_text(json.dumps({**_raw("llama-3.1-8b"), **change}))
    with pytest.raises(OpenLPUError, match=re.escape(f"{path}: model 'llama-3.1-8b': {says}")):
        load_spec(str(path))


def test_a_model_file_is_known_by_its_contents_and_a_path_is_not_a_preset(tmp_path, gemma_path):
    """Suffixes in capitals (Qwen2.5-7B.Q4_K_M.GGUF, CONFIG.JSON) and a GGUF without one (a hub blob) were refused
    as neither; './llama-3.1-8b', a path to nothing, read as the preset."""
    from openlpu.models.spec import load_spec

    (tmp_path / "CONFIG.JSON").write_text(json.dumps(_raw("llama-3.2-1b")["$source_notes"]["hf_config"]))
    assert load_spec(tmp_path / "CONFIG.JSON").to_dict() | {"name": "", "source": ""} == load_preset(
        "llama-3.2-1b").to_dict() | {"name": "", "source": ""}
    for name in ("GEMMA.GGUF", "blob"):
        (tmp_path / name).symlink_to(gemma_path)
        assert load_spec(tmp_path / name) == load_preset("gemma-3-270m")
    with pytest.raises(OpenLPUError, match=re.escape("'./llama-3.1-8b' not found")):
        load_spec("./llama-3.1-8b")


def test_a_preset_file_given_as_model_is_read_as_a_preset(tmp_path):
    """A copy of a preset (ModelSpec fields, not a config.json) given as MODEL is that preset."""
    from openlpu.models.spec import load_spec

    copy = tmp_path / "my-model.json"
    copy.write_text((PRESETS_DIR / "llama-3-8b.json").read_text())
    spec = load_spec(str(copy))
    assert spec == load_preset("llama-3-8b")
    assert spec.param_count() == pytest.approx(PUBLISHED_TOTALS["llama-3-8b"][0], rel=0.01)
