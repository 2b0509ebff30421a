"""Hugging Face checkpoints: ModelSpec from config.json, weights from safetensors by GGUF name.

Two tables drive everything: FAMILY_RULES says how each HF `model_type` maps onto ModelSpec,
and the tensor-name tables say which HF tensor becomes which GGUF tensor.

Weight layout convention: tensors keep Hugging Face's layout. In particular q/k projections are
NOT permuted the way llama.cpp's converter permutes them for llama-family GGUF files: HF rotates
the two halves of each head (rotate_half, "NeoX" pairing: i with i + head_dim/2), while llama.cpp's
GGUF weights expect adjacent pairs (2i, 2i+1). A runtime consuming these weights must apply rope
in the half-split pairing (or permute q/k rows itself); `HF_ROPE_LAYOUT` names the convention.
The families in `HF_ADJACENT_ROPE_FAMILIES` are the exception: their HF code already rotates adjacent
pairs (Llama 4: transformers apply_rotary_emb views each head as head_dim/2 complex numbers, (2i, 2i+1)),
so their q/k rows are already in the layout an adjacent-pair ("interleaved") rope expects, and are
what llama.cpp's converter writes unpermuted (convert_hf_to_gguf.py Llama4Model: undo_permute = False).
"""

from __future__ import annotations

import json
import math
import os
from collections.abc import Callable
from dataclasses import dataclass, field, replace
from pathlib import Path

from openlpu.errors import OpenLPUError
from openlpu.models.spec import (
    MAX_LAYERS,
    MAX_SIZE,
    ModelSpec,
    RopeScaling,
    spec_or_refusal,
)

HF_ROPE_LAYOUT = "half-split"  # q/k rows as HF stores them: rope pairs dim i with i + head_dim/2
# ... except in these families, whose HF rope pairs dims 2i and 2i + 1: their q/k rows need no permutation
# for an adjacent-pair rope (llama.cpp's order)
HF_ADJACENT_ROPE_FAMILIES = frozenset({"llama4"})

# HF activation names -> ModelSpec activation. Gemma's legacy "gelu" means the tanh approximation
# (transformers itself rewrites it to gelu_pytorch_tanh for Gemma); see GEMMA_ACTIVATIONS.
ACTIVATIONS = {"silu": "silu", "swish": "silu", "gelu_pytorch_tanh": "gelu_tanh"}
GEMMA_ACTIVATIONS = {**ACTIVATIONS, "gelu": "gelu_tanh"}

# rope_scaling fields per rope_type, with transformers' default where it has one (None: required)
ROPE_SCALING_FIELDS = {
    "llama3": {"factor": None, "low_freq_factor": None, "high_freq_factor": None,
               "original_max_position_embeddings": None},
    "yarn": {"factor": None, "original_max_position_embeddings": None, "beta_fast": 32.0, "beta_slow": 1.0,
             "truncate": True},
    "linear": {"factor": None},
}
ROPE_SCALING_NAMES = {"original_max_position_embeddings": "original_context_length"}  # -> RopeScaling field

# HF layer_types entries -> ModelSpec layer kinds.
LAYER_TYPES = {"full_attention": "global", "sliding_attention": "local", "chunked_attention": "chunked"}

# What transformers takes for a field a config.json leaves out, by model_type: the default of its configuration
# class (transformers/models/<model>/configuration_<model>.py, named per entry). Real configs leave them out (Llama
# 2's have no rope_theta). Of the shapes, only head_dim where the class fixes it (where it computes it, as
# hidden_size / num_attention_heads, so does OpenLPU): a config without another shape is incomplete. Gemma 3 also
# defaults its local layers' base (rope_local_base_freq).
HF_DEFAULTS: dict[str, dict] = {
    "llama": {"rope_theta": 10000.0, "rms_norm_eps": 1e-6, "hidden_act": "silu",  # LlamaConfig
              "max_position_embeddings": 2048},
    "mistral": {"rope_theta": 10000.0, "rms_norm_eps": 1e-6, "hidden_act": "silu",  # MistralConfig
                "max_position_embeddings": 131072, "sliding_window": 4096},
    "mixtral": {"rope_theta": 1e6, "rms_norm_eps": 1e-5, "hidden_act": "silu",  # MixtralConfig
                "max_position_embeddings": 131072, "num_experts_per_tok": 2},
    "qwen2": {"rope_theta": 10000.0, "rms_norm_eps": 1e-6, "hidden_act": "silu",  # Qwen2Config
              "max_position_embeddings": 32768, "max_window_layers": 28},
    "qwen3": {"rope_theta": 10000.0, "rms_norm_eps": 1e-6, "hidden_act": "silu",  # Qwen3Config
              "max_position_embeddings": 32768, "head_dim": 128, "max_window_layers": 28},
    "qwen3_moe": {"rope_theta": 10000.0, "rms_norm_eps": 1e-6, "hidden_act": "silu",  # Qwen3MoeConfig
                  "max_position_embeddings": 32768, "num_experts_per_tok": 8},
    "gemma": {"rope_theta": 10000.0, "rms_norm_eps": 1e-6, "hidden_act": "gelu_pytorch_tanh",  # GemmaConfig
              "max_position_embeddings": 8192, "tie_word_embeddings": True, "head_dim": 256},
    "gemma2": {"rope_theta": 10000.0, "rms_norm_eps": 1e-6, "hidden_activation": "gelu_pytorch_tanh",  # Gemma2Config
               "max_position_embeddings": 8192, "sliding_window": 4096, "query_pre_attn_scalar": 256,
               "attn_logit_softcapping": 50.0, "final_logit_softcapping": 30.0, "tie_word_embeddings": True,
               "head_dim": 256},
    "gemma3_text": {"rope_theta": 1e6, "rope_local_base_freq": 10000.0, "rms_norm_eps": 1e-6,  # Gemma3TextConfig
                    "hidden_activation": "gelu_pytorch_tanh", "max_position_embeddings": 131072,
                    "sliding_window": 4096, "query_pre_attn_scalar": 256, "tie_word_embeddings": True,
                    "head_dim": 256},
    "gpt_oss": {"rope_theta": 150000.0, "rms_norm_eps": 1e-5, "hidden_act": "silu",  # GptOssConfig
                "max_position_embeddings": 131072, "sliding_window": 128, "num_experts_per_tok": 4, "head_dim": 64},
    "llama4_text": {"rope_theta": 500000.0, "rms_norm_eps": 1e-5, "hidden_act": "silu",  # Llama4TextConfig
                    "max_position_embeddings": 131072, "num_experts_per_tok": 1, "head_dim": 128},
}

# Multimodal configs whose text model OpenLPU reads: model_type -> (the architecture config["architectures"]
# must name, the key of the nested text config, its model_type). The vision part is ignored.
NESTED_TEXT_CONFIGS = {"llama4": ("Llama4ForConditionalGeneration", "text_config", "llama4_text"),
                       "gemma3": ("Gemma3ForConditionalGeneration", "text_config", "gemma3_text")}
# Shape fields a nested text config may leave out, by its model_type, with transformers' default (its text
# configuration class, as HF_DEFAULTS). Published multimodal configs rely on them (google/gemma-3-4b-it's
# text_config gives no vocab_size, num_attention_heads, num_key_value_heads nor head_dim, which HF_DEFAULTS has);
# a text model's own config.json without its shapes stays incomplete.
NESTED_TEXT_DEFAULTS: dict[str, dict] = {
    "gemma3_text": {"vocab_size": 262_208, "num_attention_heads": 8, "num_key_value_heads": 4},  # Gemma3TextConfig
}


# ---- how each family's default layer kinds are laid out when config.json has no layer_types --
def _all_global(f: _Fields, n: int) -> list[str]:
    return ["global"] * n


def _all_local_if_window(f: _Fields, n: int) -> list[str]:
    # Mistral / Mixtral: every layer slides when sliding_window is set
    return ["local" if f.get("sliding_window") else "global"] * n


def _qwen_window_after_max_window_layers(f: _Fields, n: int) -> list[str]:
    # Qwen 2/3: the first max_window_layers layers are full, later ones slide (if enabled at all, with a window:
    # one left out is the family's default, FamilyRule.sliding_window_default); Qwen3-MoE, which has no such
    # field in transformers, slides on every layer
    if not f.get("use_sliding_window") or f.cfg.get("sliding_window", True) is None:
        return ["global"] * n
    first_full = f.number("max_window_layers", default=0, kind=int, least=0)
    return ["local" if i >= first_full else "global" for i in range(n)]


def _alternating(f: _Fields, n: int) -> list[str]:
    return ["local" if (i + 1) % 2 else "global" for i in range(n)]  # layer 0 slides (Gemma 2, gpt-oss)


def _gemma3_pattern(f: _Fields, n: int) -> list[str]:
    key = "sliding_window_pattern" if "sliding_window_pattern" in f.cfg else "_sliding_window_pattern"
    period = f.number(key, default=6, kind=int)
    # every period-th layer is global
    return ["local" if (i + 1) % period else "global" for i in range(n)]


# Llama 4: transformers Llama4TextConfig's defaults for the fields a config.json may leave out.
LLAMA4_DEFAULTS = {"head_dim": 128, "no_rope_layer_interval": 4, "attention_chunk_size": 8192, "use_qk_norm": True,
                   "attn_temperature_tuning": True, "floor_scale": 8192, "attn_scale": 0.1,
                   "interleave_moe_layer_step": 1}


def _llama4_rope_layers(cfg: dict, n: int) -> list[bool] | None:
    """Whether each layer uses rope: no_rope_layers (1: rope, 0: NoPE), or when it is empty, every
    no_rope_layer_interval-th layer is NoPE (transformers Llama4TextConfig.__post_init__); None when those
    fields are malformed (_llama4_fields says how)."""
    flags = cfg.get("no_rope_layers")
    if not flags:
        interval = cfg.get("no_rope_layer_interval", LLAMA4_DEFAULTS["no_rope_layer_interval"])
        if isinstance(interval, bool) or not isinstance(interval, int) or interval <= 0:
            return None
        return [(i + 1) % interval != 0 for i in range(n)]
    if not isinstance(flags, list) or len(flags) < n or any(flag not in (0, 1) for flag in flags):
        return None
    return [bool(flag) for flag in flags[:n]]


def _llama4_pattern(f: _Fields, n: int) -> list[str]:
    # rope layers attend within their chunk, NoPE layers to everything (transformers derives layer_types so)
    chunk = f.cfg.get("attention_chunk_size", LLAMA4_DEFAULTS["attention_chunk_size"])
    rope = _llama4_rope_layers(f.cfg, n) or [False] * n  # malformed: _llama4_fields refuses it
    return ["chunked" if uses and chunk is not None else "global" for uses in rope]


def _llama4_fields(f: _Fields, kinds: list[str]) -> dict:
    """Llama 4's MoE layers (every one, Scout; every second, Maverick, whose others are dense MLPs of
    intermediate_size_mlp), chunk, attention temperature and q/k norm; refuses MoE layers in another pattern and
    rope / attention patterns ModelSpec's llama4 cannot hold (rope exactly on chunked layers)."""
    cfg, n = f.cfg, len(kinds)
    step = f.number("interleave_moe_layer_step", LLAMA4_DEFAULTS["interleave_moe_layer_step"], kind=int)
    if step < 1:
        raise f.error(f"field 'interleave_moe_layer_step' must be a positive integer, got {step}")
    moe_layers = cfg.get("moe_layers")  # transformers: it overrides interleave_moe_layer_step when set
    if moe_layers is not None:  # ModelSpec holds it as a step: every step-th layer, counting from 1
        steps = [s for s in range(1, n + 1) if isinstance(moe_layers, list) and moe_layers == list(range(s - 1, n, s))]
        if not steps:
            raise f.error(f"field 'moe_layers' = {moe_layers} is not supported for llama4: ModelSpec's MoE layers are "
                          "every k-th layer (layers k-1, 2k-1, ...); use a config whose moe_layers follow "
                          "interleave_moe_layer_step")
        step = steps[0]
    rope_layers = _llama4_rope_layers(cfg, n)
    if rope_layers is None:
        raise f.error(f"field 'no_rope_layers' must list 0 (NoPE) or 1 (rope) for each of the {n} layers, or be "
                      f"empty with a positive 'no_rope_layer_interval'; got {cfg.get('no_rope_layers')!r} and "
                      f"{cfg.get('no_rope_layer_interval')!r}")
    for i, (rope, kind) in enumerate(zip(rope_layers, kinds)):
        if rope != (kind == "chunked"):
            raise f.error(f"layer {i} {'uses' if rope else 'skips'} rope (field 'no_rope_layers') but its attention "
                          f"is {kind} (fields 'layer_types', 'attention_chunk_size'); ModelSpec's llama4 ropes exactly "
                          "its chunked layers: use a config where they agree")
    chunk = cfg.get("attention_chunk_size", LLAMA4_DEFAULTS["attention_chunk_size"])
    tuning = cfg.get("attn_temperature_tuning", LLAMA4_DEFAULTS["attn_temperature_tuning"])  # Scout says 4: truthy
    floor = f.number("floor_scale", LLAMA4_DEFAULTS["floor_scale"], kind=int) if tuning else 0
    scale = f.number("attn_scale", LLAMA4_DEFAULTS["attn_scale"]) if tuning else 0.0
    if tuning and floor <= 0:
        raise f.error(f"field 'floor_scale' must be a positive integer with attn_temperature_tuning on, got {floor}")
    return {"moe_layer_step": step, "dense_d_ff": f.number("intermediate_size_mlp", kind=int) if step > 1 else 0,
            "head_dim": f.number("head_dim", LLAMA4_DEFAULTS["head_dim"], kind=int),  # not d_model / n_heads
            "attention_chunk": f.number("attention_chunk_size", chunk, kind=int) if "chunked" in kinds else None,
            "attn_temperature_floor": floor if scale else 0,
            "attn_temperature_scale": scale,
            "qk_l2_norm": f.flag("use_qk_norm", LLAMA4_DEFAULTS["use_qk_norm"])}


@dataclass(frozen=True)
class FamilyRule:
    family: str
    architecture: str  # the HF class that config["architectures"] must name
    default_layer_kinds: Callable[[_Fields, int], list[str]]  # when config.json has no layer_types
    fixed: dict = field(default_factory=dict)  # ModelSpec fields every model of the family has
    gemma: bool = False  # sqrt(d_model) embedding scale, (1 + w) norms, query_pre_attn_scalar
    moe: bool = False
    # MoE: the config fields that may count the experts, in order (Qwen3-MoE's Hub files say num_experts,
    # transformers 5 writes num_local_experts)
    experts_keys: tuple[str, ...] = ("num_local_experts",)
    d_ff_key: str = "intermediate_size"  # the config field of the MLP's (or each expert's) hidden width
    unsupported_true: tuple[str, ...] = ()  # flags ModelSpec cannot express when true
    required: dict = field(default_factory=dict)  # config fields whose value the family's ModelSpec fixes
    # the family's own ModelSpec fields from its config fields (refusing what ModelSpec cannot express),
    # given the fields reader and the layer kinds
    own_fields: Callable[[_Fields, list[str]], dict] | None = None
    # sliding layers keep a rope of their own: rope_local_base_freq (transformers 5: rope_parameters.sliding_attention),
    # which a transformers-4 rope_scaling leaves unscaled (Gemma 3: transformers 4's Gemma3TextModel.rotary_emb_local
    # takes the default rope; llama.cpp: rope_freq_scale_train_swa = 1 for gemma3)
    local_rope: bool = False
    sliding_window_default: int | None = None  # the window of sliding layers whose config.json gives none


_GEMMA_FIXED = {"norm_weight_offset": 1.0}
FAMILY_RULES: dict[str, FamilyRule] = {
    "llama": FamilyRule("llama", "LlamaForCausalLM", _all_global,
                        unsupported_true=("attention_bias", "mlp_bias")),
    "mistral": FamilyRule("mistral", "MistralForCausalLM", _all_local_if_window),
    "mixtral": FamilyRule("mixtral", "MixtralForCausalLM", _all_local_if_window, moe=True),
    # Qwen2Config, Qwen3Config and Qwen3MoeConfig take sliding_window=4096, kept only with use_sliding_window
    "qwen2": FamilyRule("qwen2", "Qwen2ForCausalLM", _qwen_window_after_max_window_layers,
                        fixed={"qkv_bias": True}, sliding_window_default=4096),
    "qwen3": FamilyRule("qwen3", "Qwen3ForCausalLM", _qwen_window_after_max_window_layers,
                        fixed={"qk_norm": True}, unsupported_true=("attention_bias",), sliding_window_default=4096),
    # Qwen3's attention with an MoE MLP on every layer; its router takes the top-k of a softmax over all
    # experts and renormalizes them (norm_topk_prob), which is Mixtral's softmax over the top-k logits
    "qwen3_moe": FamilyRule("qwen3-moe", "Qwen3MoeForCausalLM", _qwen_window_after_max_window_layers,
                            fixed={"qk_norm": True}, moe=True, experts_keys=("num_experts", "num_local_experts"),
                            d_ff_key="moe_intermediate_size", unsupported_true=("attention_bias",),
                            sliding_window_default=4096,
                            required={"norm_topk_prob": True, "decoder_sparse_step": 1, "mlp_only_layers": []}),
    "gemma": FamilyRule("gemma", "GemmaForCausalLM", _all_global, fixed=_GEMMA_FIXED, gemma=True,
                        unsupported_true=("attention_bias",)),
    "gemma2": FamilyRule("gemma2", "Gemma2ForCausalLM", _alternating,
                         fixed={**_GEMMA_FIXED, "post_norms": True}, gemma=True,
                         unsupported_true=("attention_bias",)),
    "gemma3_text": FamilyRule("gemma3", "Gemma3ForCausalLM", _gemma3_pattern,
                              fixed={**_GEMMA_FIXED, "post_norms": True, "qk_norm": True}, gemma=True,
                              unsupported_true=("attention_bias",), local_rope=True),
    # config.json says hidden_act "silu", but the experts apply their clamped SwiGLU (swiglu_limit 7,
    # alpha 1.702: transformers GptOssExperts), which the activation name fixes
    "gpt_oss": FamilyRule("gpt-oss", "GptOssForCausalLM", _alternating, moe=True,
                          fixed={"activation": "swiglu_clamped", "qkv_bias": True, "attn_output_bias": True,
                                 "attn_sinks": True, "moe_bias": True},
                          required={"attention_bias": True, "swiglu_limit": 7.0, "swiglu_alpha": 1.702}),
    # Llama 4 (text): every layer MoE with a sigmoid router scaling the chosen experts' input and a shared
    # expert (transformers Llama4TextMoe); rope + chunked attention, or NoPE + global attention with
    # attention temperature tuning; weightless q/k RMS norm after rope (see _llama4_fields)
    "llama4_text": FamilyRule("llama4", "Llama4ForCausalLM", _llama4_pattern, moe=True,
                              fixed={"router": "sigmoid_input", "shared_expert": True, "nope_global": True},
                              unsupported_true=("attention_bias",), own_fields=_llama4_fields),
}


# ---- config.json -> ModelSpec ----------------------------------------------------------------
def read_config(config: dict | str | Path) -> tuple[dict, str]:
    """The config dict and where it came from; a path may be config.json or its folder."""
    if isinstance(config, dict):
        return config, "HF config"
    path = Path(config)
    if path.is_dir():
        path = path / "config.json"
    if not path.is_file():
        raise OpenLPUError(f"HF config not found: {path}; give a config.json or the folder "
                           "holding it")
    try:
        data = json.loads(path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise OpenLPUError(f"{path}: not valid JSON ({e}); give the model's config.json") from None
    except RecursionError:
        raise OpenLPUError(f"{path}: JSON nested deeper than any config.json is; give the model's config.json") from None
    if not isinstance(data, dict):
        raise OpenLPUError(f"{path}: expected a JSON object; give the model's config.json")
    return data, str(path)


class _Fields:
    """Reads config fields, naming the field (and the file) in every error; a field left out is transformers'
    default (`defaults`, the model type's HF_DEFAULTS), one given as null stays null, as transformers reads them."""

    def __init__(self, cfg: dict, origin: str, defaults: dict | None = None):
        self.cfg, self.origin, self.defaults = cfg, origin, defaults or {}

    def get(self, key: str):
        return self.cfg[key] if key in self.cfg else self.defaults.get(key)

    def error(self, what: str) -> OpenLPUError:
        return OpenLPUError(f"{self.origin}: {what}")

    def need(self, key: str):
        if self.get(key) is None:
            raise self.error(f"missing field {key!r}; the config.json is incomplete")
        return self.get(key)

    def text(self, key: str) -> str:
        value = self.need(key)
        if not isinstance(value, str):
            raise self.error(f"field {key!r} must be a string, got {value!r}")
        return value

    def object(self, key: str, value) -> dict:
        if not isinstance(value, dict):
            raise self.error(f"field {key!r} must be a JSON object, got {value!r}")
        return value

    def flag(self, key: str, default: bool) -> bool:
        value = self.get(key)
        value = default if value is None else value  # null, as number() reads it: not given
        if not isinstance(value, bool):
            raise self.error(f"field {key!r} must be true or false, got {value!r}")
        return value

    def number(self, key: str, default=None, kind=float, least: int = 1, most: int = MAX_SIZE):
        value = self.get(key)
        if value is None:
            if default is None:
                raise self.error(f"missing field {key!r}; the config.json is incomplete")
            return default
        return self.checked(key, value, kind, least, most)

    def checked(self, key: str, value, kind=float, least: int = 1, most: int = MAX_SIZE):
        """Field `key`'s `value` as a positive number, or (kind int) a whole number from `least` to `most`."""
        number = not isinstance(value, bool) and isinstance(value, (int, float)) and math.isfinite(value)
        if kind is int and not (number and value == int(value) and least <= value <= most):
            what = "positive" if least == 1 else "non-negative"
            raise self.error(f"field {key!r} must be a {what} integer of at most {most:,}, got {value!r}")
        if kind is float and not (number and value > 0):
            raise self.error(f"field {key!r} must be a positive number, got {value!r}")
        return kind(value)


def _rope(f: _Fields, local_rope: bool) -> tuple[float, float | None, RopeScaling | None]:
    """(global rope base, local rope base, scaling) from old-style or transformers-5 fields (FamilyRule.local_rope:
    the sliding layers' rope is their own)."""
    params = f.object("rope_parameters", f.cfg.get("rope_parameters") or {})
    if local_rope and "full_attention" in params:
        global_params = f.object("rope_parameters.full_attention", params["full_attention"])
        local_params = f.object("rope_parameters.sliding_attention", params.get("sliding_attention", {}))
    else:
        global_params, local_params = params, {}
    # transformers 5 keeps the bases in rope_parameters: the defaults apply where neither place has one
    theta = f.cfg.get("rope_theta", global_params.get("rope_theta", f.defaults.get("rope_theta")))
    if theta is None:
        raise f.error("missing field 'rope_theta'; the config.json is incomplete")
    theta = f.checked("rope_theta", theta)
    if global_params.get("rope_theta") not in (None, theta):
        raise f.error(f"contradictory fields 'rope_theta' ({theta}) and "
                      f"'rope_parameters.rope_theta' ({global_params['rope_theta']}); fix one")
    local_default = f.defaults.get("rope_local_base_freq")
    local = f.cfg.get("rope_local_base_freq", local_params.get("rope_theta", local_default)) if local_rope else None
    local = None if local is None else f.checked("rope_local_base_freq", local)

    given = f.cfg.get("rope_scaling")
    scaling = _scaling(f, "rope_scaling", f.object("rope_scaling", _without_base(global_params)
                                                   if given is None else given))
    if not local_rope:
        return float(theta), local, scaling  # every layer's
    local_scaling = _scaling(f, "rope_parameters.sliding_attention", _without_base(local_params))
    return float(theta), local, _one_scaling(f, {"global": scaling, "local": local_scaling})


def _without_base(params: dict) -> dict:
    return {k: v for k, v in params.items() if k != "rope_theta"}


def _scaling(f: _Fields, key: str, scaling: dict) -> RopeScaling | None:
    """The RopeScaling a config field `key` describes (ROPE_SCALING_FIELDS); None for the default rope."""
    kind = scaling.get("rope_type", scaling.get("type", "default"))
    if not isinstance(kind, str):
        raise f.error(f"field '{key}.rope_type' must be a string, got {kind!r}")
    if kind == "default":
        return None
    if kind not in ROPE_SCALING_FIELDS:
        raise f.error(f"field '{key}' of type {kind!r} is not supported (supported: "
                      f"{', '.join(ROPE_SCALING_FIELDS)}, none); use a model without it")
    values = {}
    for name, default in ROPE_SCALING_FIELDS[kind].items():
        if scaling.get(name, default) is None:
            raise f.error(f"field '{key}' lacks {name!r} for rope_type {kind}")
        field_name, value = ROPE_SCALING_NAMES.get(name, name), scaling.get(name, default)
        if isinstance(default, bool):
            if not isinstance(value, bool):
                raise f.error(f"field '{key}.{name}' must be true or false, got {value!r}")
            values[field_name] = value
            continue
        values[field_name] = f.checked(f"{key}.{name}", value, int if field_name == "original_context_length"
                                       else float)
    return RopeScaling(kind=kind, **values)


def _one_scaling(f: _Fields, by_kind: dict[str, RopeScaling | None]) -> RopeScaling | None:
    """The scaling of the layer kinds that have one, scaling only those (`by_kind` in LAYER_KINDS' order): ModelSpec
    holds one rope scaling."""
    scalings = {scaling for scaling in by_kind.values() if scaling is not None}
    if len(scalings) > 1:
        raise f.error("fields 'rope_parameters.full_attention' and 'rope_parameters.sliding_attention' scale rope in "
                      "different ways, and ModelSpec holds one rope scaling; use a model whose layers share it")
    if not scalings:
        return None
    scaling = scalings.pop()
    return replace(scaling, layer_kinds=tuple(kind for kind, its in by_kind.items() if its == scaling))


def _context_length(f: _Fields, scaling: RopeScaling | None) -> int:
    """The tokens the model serves: max_position_embeddings, or what its rope scaling serves (served_context)."""
    given = f.number("max_position_embeddings", kind=int)
    return scaling.served_context(given) if scaling else given


def _check_architecture(f: _Fields, architecture: str, model_type: str) -> None:
    """config["architectures"], when it names any, must name first the class `model_type` means."""
    archs = f.cfg.get("architectures")
    archs = [architecture] if archs is None or archs == [] else archs
    if not isinstance(archs, list) or not all(isinstance(a, str) for a in archs):
        raise f.error(f"field 'architectures' must be a list of class names, got {archs!r}")
    if archs[0] != architecture:
        raise f.error(f"contradictory fields: 'architectures' says {archs[0]!r} but 'model_type' "
                      f"{model_type!r} means {architecture!r}")


def _layer_kinds(f: _Fields, rule: FamilyRule, n_layers: int) -> list[str]:
    types = f.cfg.get("layer_types")
    if types is None:
        return rule.default_layer_kinds(f, n_layers)
    if not isinstance(types, list) or not all(isinstance(t, str) for t in types):
        raise f.error(f"field 'layer_types' must be a list of layer type names, got {types!r}")
    unknown = sorted(set(types) - set(LAYER_TYPES))
    if unknown:
        raise f.error(f"field 'layer_types' has unsupported entries {unknown}; "
                      f"supported: {sorted(LAYER_TYPES)}")
    if len(types) != n_layers:
        raise f.error(f"contradictory fields: 'layer_types' lists {len(types)} layers but "
                      f"'num_hidden_layers' is {n_layers}")
    return [LAYER_TYPES[t] for t in types]


def _text_config(cfg: dict, origin: str) -> tuple[dict, str]:
    """The text model's config of a multimodal config.json (NESTED_TEXT_CONFIGS), else the config itself."""
    model_type = cfg.get("model_type")
    if not isinstance(model_type, str) or model_type not in NESTED_TEXT_CONFIGS:
        return cfg, origin  # a model_type that is no string is refused with the text model's fields
    f = _Fields(cfg, origin)
    architecture, key, text_type = NESTED_TEXT_CONFIGS[model_type]
    _check_architecture(f, architecture, model_type)
    text = f.need(key)
    if not isinstance(text, dict):
        raise f.error(f"field {key!r} must be a JSON object (the text model's config), got {text!r}")
    if text.get("model_type", text_type) != text_type:
        raise f.error(f"contradictory fields: '{key}.model_type' says {text['model_type']!r} but 'model_type' "
                      f"{model_type!r} means {text_type!r}")
    inherited = {k: cfg[k] for k in ("_name_or_path",) if k in cfg and k not in text}
    return {**inherited, "model_type": text_type, **text}, f"{origin} ({key})"


def _folder_name(origin: str) -> str:
    """A name for the model a config file was given for: in a Hugging Face hub cache (models--ORG--NAME/snapshots/
    HASH/config.json) its NAME, else the folder a config.json is in (links not followed: a hub cache's config.json
    links into its blobs folder), or the file's own stem where it is named otherwise (qwen2.5-7b.json); empty for
    a config given as a dict."""
    if origin == "HF config":
        return ""
    path = Path(os.path.abspath(origin))
    if path.name.lower() != "config.json":
        return path.stem
    hub = next((folder.name for folder in path.parents if folder.name.startswith("models--")), None)
    return hub.split("--")[-1] if hub else path.parent.name


def spec_from_hf_config(config: dict | str | Path, name: str | None = None) -> ModelSpec:
    """A ModelSpec from a Hugging Face config.json (dict, file, or model folder); of a multimodal model
    (NESTED_TEXT_CONFIGS), its text model's."""
    cfg, origin = read_config(config)
    outer_origin = origin
    cfg, origin = _text_config(cfg, origin)
    model_type = _Fields(cfg, origin).text("model_type")
    defaults = HF_DEFAULTS.get(model_type, {})
    if origin != outer_origin:  # a multimodal config's text model, which may leave out its shapes too
        defaults = defaults | NESTED_TEXT_DEFAULTS.get(model_type, {})
    f = _Fields(cfg, origin, defaults)
    rule = FAMILY_RULES.get(model_type)
    if rule is None:
        raise f.error(f"unknown architecture model_type {model_type!r}; supported: "
                      f"{', '.join(FAMILY_RULES)}")
    _check_architecture(f, rule.architecture, model_type)
    for flag in rule.unsupported_true:
        if cfg.get(flag):
            raise f.error(f"field {flag!r} = {json.dumps(cfg[flag])} is not supported for {model_type} (only "
                          "false); use a checkpoint without those biases")
    for key, value in rule.required.items():
        if cfg.get(key, value) != value:
            raise f.error(f"field {key!r} = {cfg[key]!r} is not supported for {model_type} (only {value!r}); "
                          "use a checkpoint with the family's standard value")

    d_model = f.number("hidden_size", kind=int)
    n_heads = f.number("num_attention_heads", kind=int)
    n_layers = f.number("num_hidden_layers", kind=int, most=MAX_LAYERS)
    head_dim = f.number("head_dim", default=d_model // n_heads, kind=int)
    act_name = f.text("hidden_activation" if f.get("hidden_activation") else "hidden_act")
    act_table = GEMMA_ACTIVATIONS if rule.gemma else ACTIVATIONS
    if act_name not in act_table:
        raise f.error(f"activation {act_name!r} not supported for {model_type}; "
                      f"supported: {', '.join(act_table)}")
    rope_base, rope_local, rope_scaling = _rope(f, rule.local_rope)
    kinds = _layer_kinds(f, rule, n_layers)
    window = f.number("sliding_window", kind=int, default=rule.sliding_window_default) if "local" in kinds else None

    fields = {
        "name": name or cfg.get("_name_or_path") or _folder_name(outer_origin) or model_type,
        "family": rule.family,
        "vocab_size": f.number("vocab_size", kind=int),
        "d_model": d_model,
        "n_layers": n_layers,
        "n_heads": n_heads,
        "n_kv_heads": f.number("num_key_value_heads", default=n_heads, kind=int),
        "head_dim": head_dim,
        "d_ff": f.number(rule.d_ff_key, kind=int),
        "context_length": _context_length(f, rope_scaling),
        "norm_eps": f.number("rms_norm_eps"),
        "rope_base": rope_base,
        "rope_base_local": rope_local,
        "rope_scaling": rope_scaling,
        "activation": act_table[act_name],
        "sliding_window": window,
        "layer_kinds": tuple(kinds),
        "tie_embeddings": f.flag("tie_word_embeddings", False),
        "source": f"Hugging Face config.json ({origin})" if outer_origin != "HF config"
        else "Hugging Face config",
    } | rule.fixed  # the family's fixed fields win (gpt-oss: its activation)
    if rule.own_fields:
        fields |= rule.own_fields(f, kinds)
    if rule.gemma:
        fields["embed_scale"] = math.sqrt(d_model)
        if model_type != "gemma":  # Gemma 1 scales queries by 1/sqrt(head_dim), the default
            fields["query_scale"] = f.number("query_pre_attn_scalar") ** -0.5
            for key, field_name in (("attn_logit_softcapping", "attn_logit_softcap"),
                                    ("final_logit_softcapping", "final_logit_softcap")):
                fields[field_name] = None if f.get(key) is None else f.checked(key, f.get(key))
    if rule.moe:
        key = next((k for k in rule.experts_keys if k in cfg), rule.experts_keys[0])
        fields["n_experts"] = f.number(key, kind=int)
        fields["n_experts_per_token"] = f.number("num_experts_per_tok", kind=int)
    keys = {"n_heads": "num_attention_heads", "n_kv_heads": "num_key_value_heads", "d_model": "hidden_size",
            "n_layers": "num_hidden_layers", "d_ff": rule.d_ff_key, "head_dim": "head_dim", "vocab_size": "vocab_size",
            "context_length": "max_position_embeddings", "norm_eps": "rms_norm_eps",
            "n_experts_per_token": "num_experts_per_tok", "n_experts": rule.experts_keys[0] if rule.moe else ""}
    return spec_or_refusal(fields, f"{origin}: ", keys, "fix the config.json")


# ---- safetensors -> weights by GGUF name ------------------------------------------------------
# Per-layer tensors: HF suffix after "model.layers.{i}." -> GGUF suffix after "blk.{i}.".
LAYER_NAMES = {
    "input_layernorm.weight": "attn_norm.weight",
    "self_attn.q_proj.weight": "attn_q.weight",
    "self_attn.k_proj.weight": "attn_k.weight",
    "self_attn.v_proj.weight": "attn_v.weight",
    "self_attn.q_proj.bias": "attn_q.bias",
    "self_attn.k_proj.bias": "attn_k.bias",
    "self_attn.v_proj.bias": "attn_v.bias",
    "self_attn.q_norm.weight": "attn_q_norm.weight",
    "self_attn.k_norm.weight": "attn_k_norm.weight",
    "self_attn.o_proj.weight": "attn_output.weight",
    "self_attn.o_proj.bias": "attn_output.bias",
    "self_attn.sinks": "attn_sinks.weight",
    "mlp.gate_proj.weight": "ffn_gate.weight",
    "mlp.up_proj.weight": "ffn_up.weight",
    "mlp.down_proj.weight": "ffn_down.weight",
}
# The dense MLP's module, by family where it is not "mlp" (transformers Llama4TextDecoderLayer.feed_forward):
# LAYER_NAMES' "mlp." names are read under it.
MLP_MODULES = {"llama4": "feed_forward."}
# The MoE router's names, by family.
ROUTER_NAMES = {"mixtral": {"block_sparse_moe.gate.weight": "ffn_gate_inp.weight"},
                "qwen3-moe": {"mlp.gate.weight": "ffn_gate_inp.weight"},
                "gpt-oss": {"mlp.router.weight": "ffn_gate_inp.weight", "mlp.router.bias": "ffn_gate_inp.bias"},
                "llama4": {"feed_forward.router.weight": "ffn_gate_inp.weight"}}
# The shared expert's names, by family (llama.cpp's GGUF names: convert_hf_to_gguf / gguf tensor_mapping).
SHARED_EXPERT_NAMES = {"llama4": {"feed_forward.shared_expert.gate_proj.weight": "ffn_gate_shexp.weight",
                                  "feed_forward.shared_expert.up_proj.weight": "ffn_up_shexp.weight",
                                  "feed_forward.shared_expert.down_proj.weight": "ffn_down_shexp.weight"}}
# post_attention_layernorm is the pre-MLP norm in Llama-style blocks, but a true post-attention
# norm in Gemma 2/3 (whose pre-MLP norm is pre_feedforward_layernorm).
PRE_NORM_NAMES = {"post_attention_layernorm.weight": "ffn_norm.weight"}
POST_NORM_NAMES = {
    "post_attention_layernorm.weight": "post_attention_norm.weight",
    "pre_feedforward_layernorm.weight": "ffn_norm.weight",
    "post_feedforward_layernorm.weight": "post_ffw_norm.weight",
}
GLOBAL_NAMES = {
    "model.embed_tokens.weight": "token_embd.weight",
    "model.norm.weight": "output_norm.weight",
    "lm_head.weight": "output.weight",
}
# Multimodal checkpoints, by family: (the prefix of the text model's tensors, which is dropped; prefixes of
# the other modalities' tensors, which are skipped). Llama 4's released checkpoints
# (Llama4ForConditionalGeneration) hold "language_model.model.layers...", "vision_model..." and
# "multi_modal_projector...".
MULTIMODAL_PREFIXES = {"llama4": ("language_model.", ("vision_model.", "multi_modal_projector."))}
# One tensor per expert, by family: (HF prefix after "model.layers.{i}.", {HF suffix after "{prefix}.{j}."
# -> the stacked GGUF tensor}).
EXPERT_NAMES = {
    "mixtral": ("block_sparse_moe.experts", {"w1.weight": "ffn_gate_exps.weight", "w3.weight": "ffn_up_exps.weight",
                                             "w2.weight": "ffn_down_exps.weight"}),
    "qwen3-moe": ("mlp.experts", {"gate_proj.weight": "ffn_gate_exps.weight", "up_proj.weight": "ffn_up_exps.weight",
                                  "down_proj.weight": "ffn_down_exps.weight"}),
}
# One tensor per projection for all experts, (expert, in, out) as x @ W uses it, by family: HF suffix after
# "model.layers.{i}." -> (GGUF suffix, HF tensor -> GGUF layout) for each part. gpt-oss interleaves the gate
# and up projections along out (transformers GptOssExperts: gate_up[..., ::2] is the gate); Llama 4
# concatenates them, gate first (transformers Llama4TextExperts: gate, up = gate_up.chunk(2, dim=-1)).
PACKED_EXPERT_NAMES = {
    "gpt-oss": {
        "mlp.experts.gate_up_proj": (("ffn_gate_exps.weight", lambda t: t[..., ::2].transpose(1, 2)),
                                     ("ffn_up_exps.weight", lambda t: t[..., 1::2].transpose(1, 2))),
        "mlp.experts.gate_up_proj_bias": (("ffn_gate_exps.bias", lambda t: t[..., ::2]),
                                          ("ffn_up_exps.bias", lambda t: t[..., 1::2])),
        "mlp.experts.down_proj": (("ffn_down_exps.weight", lambda t: t.transpose(1, 2)),),
        "mlp.experts.down_proj_bias": (("ffn_down_exps.bias", lambda t: t),),
    },
    "llama4": {
        "feed_forward.experts.gate_up_proj": (("ffn_gate_exps.weight", lambda t: t.chunk(2, -1)[0].transpose(1, 2)),
                                              ("ffn_up_exps.weight", lambda t: t.chunk(2, -1)[1].transpose(1, 2))),
        "feed_forward.experts.down_proj": (("ffn_down_exps.weight", lambda t: t.transpose(1, 2)),),
    },
}
# MXFP4 (OCP Microscaling Formats v1.0): blocks of 32 FP4 (E2M1) codes, two per byte, low nibble first,
# sharing one E8M0 scale byte, 2^(byte - 127). The released gpt-oss checkpoints store their experts so,
# as "<name>_blocks" (..., blocks, 16 bytes) and "<name>_scales" (..., blocks), rows along the output.
FP4_E2M1_VALUES = (0.0, 0.5, 1.0, 1.5, 2.0, 3.0, 4.0, 6.0, -0.0, -0.5, -1.0, -1.5, -2.0, -3.0, -4.0, -6.0)
MXFP4_SCALE_BIAS = 127


def hf_to_gguf_names(spec: ModelSpec) -> dict[str, str]:
    """Every non-expert HF tensor name this spec expects -> its GGUF name."""
    mlp = MLP_MODULES.get(spec.family, "mlp.")
    layer_names = {mlp + hf.removeprefix("mlp.") if hf.startswith("mlp.") else hf: gguf
                   for hf, gguf in LAYER_NAMES.items()}
    per_layer = {**layer_names, **(POST_NORM_NAMES if spec.post_norms else PRE_NORM_NAMES),
                 **ROUTER_NAMES.get(spec.family, {}), **SHARED_EXPERT_NAMES.get(spec.family, {})}
    wanted = spec.tensor_shapes()
    names = {hf: gguf for hf, gguf in GLOBAL_NAMES.items() if gguf in wanted}
    for i in range(spec.n_layers):
        for hf, gguf in per_layer.items():
            if f"blk.{i}.{gguf}" in wanted:
                names[f"model.layers.{i}.{hf}"] = f"blk.{i}.{gguf}"
    return names


def expert_names(spec: ModelSpec) -> dict[str, tuple[str, int]]:
    """HF expert tensor name -> (stacked GGUF name, expert index), for one tensor per expert (Mixtral,
    Qwen3-MoE)."""
    if spec.family not in EXPERT_NAMES:
        return {}
    prefix, suffixes = EXPERT_NAMES[spec.family]
    return {f"model.layers.{i}.{prefix}.{j}.{hf}": (f"blk.{i}.{gguf}", j)
            for i in range(spec.n_layers) if spec.is_moe_layer(i) for j in range(spec.n_experts)
            for hf, gguf in suffixes.items()}


def packed_expert_names(spec: ModelSpec) -> dict[str, list]:
    """HF name of a tensor packing every expert -> [(GGUF name, layout change)] (gpt-oss, Llama 4)."""
    return {f"model.layers.{i}.{hf}": [(f"blk.{i}.{gguf}", to_gguf) for gguf, to_gguf in parts]
            for i in range(spec.n_layers) if spec.is_moe_layer(i)
            for hf, parts in PACKED_EXPERT_NAMES.get(spec.family, {}).items()}


def text_model_name(name: str, spec: ModelSpec) -> str | None:
    """A checkpoint tensor's name as the text model's (MULTIMODAL_PREFIXES); None for another modality's."""
    if spec.family not in MULTIMODAL_PREFIXES:
        return name
    text, others = MULTIMODAL_PREFIXES[spec.family]
    if name.startswith(others):
        return None
    return name.removeprefix(text)


def mxfp4_to_float(blocks, scales):
    """float32 values of MXFP4 blocks (..., n, 16) uint8 with scales (..., n) uint8 -> (..., n * 32)."""
    import torch

    codes = torch.stack([blocks & 0x0F, blocks >> 4], -1).long()  # (..., n, 16, 2): low nibble first
    values = torch.tensor(FP4_E2M1_VALUES)[codes].flatten(-3, -1).unflatten(-1, (blocks.shape[-2], 32))
    return torch.ldexp(values, scales.long()[..., None] - MXFP4_SCALE_BIAS).flatten(-2)


def _unquantize_experts(raw: dict, packed: dict) -> None:
    """Replace each packed expert tensor stored in MXFP4 by its values, in the (expert, in, out) layout
    the unquantized tensor has (the blocks run along the input, per output row)."""
    for name in packed:
        blocks, scales = raw.pop(f"{name}_blocks", None), raw.pop(f"{name}_scales", None)
        if blocks is not None and scales is not None:
            raw[name] = mxfp4_to_float(blocks, scales).transpose(1, 2)


def safetensors_files(path: str | Path) -> list[Path]:
    """The .safetensors file(s) of a checkpoint: a file, or a folder (sharded or not)."""
    path = Path(path)
    if path.is_file():
        return [path]
    if not path.is_dir():
        raise OpenLPUError(f"weights not found: {path}; give a .safetensors file or its folder")
    index = path / "model.safetensors.index.json"
    if index.is_file():
        shards = sorted(set(json.loads(index.read_text()).get("weight_map", {}).values()))
        missing = [s for s in shards if not (path / s).is_file()]
        if missing:
            raise OpenLPUError(f"{index} names shard(s) not in the folder: {', '.join(missing)}; "
                               "download them")
        return [path / s for s in shards]
    files = sorted(path.glob("*.safetensors"))
    if not files:
        raise OpenLPUError(f"no .safetensors files in {path}; download the model's weights")
    return files


def load_safetensors(path_or_dir: str | Path, spec: ModelSpec,
                     dtype: "torch.dtype | None" = None) -> dict:
    """Weights by GGUF name in HF's layout (see HF_ROPE_LAYOUT), as float32 unless dtype given.

    Mixtral's per-expert w1/w3/w2 are stacked into ffn_gate_exps/ffn_up_exps/ffn_down_exps
    (expert, out, in); gpt-oss's and Llama 4's packed experts are split and transposed the same way (gpt-oss's
    from MXFP4 blocks and scales where the checkpoint stores them so). A multimodal checkpoint's text model is
    read, its other modalities skipped (MULTIMODAL_PREFIXES). Every tensor the spec needs must be present with
    the right shape, and nothing else may be (a tied lm_head identical to the embedding is tolerated).
    """
    import torch
    from safetensors import SafetensorError, safe_open

    dtype = dtype or torch.float32
    raw: dict[str, torch.Tensor] = {}
    for file in safetensors_files(path_or_dir):
        try:
            with safe_open(str(file), framework="pt") as fh:
                for key in fh.keys():
                    name = text_model_name(key, spec)
                    if name is not None:  # other modalities' tensors are not read
                        raw[name] = fh.get_tensor(key)
        except SafetensorError as e:
            raise OpenLPUError(f"{file}: not a readable safetensors file ({e}); "
                               "download it again") from None

    names, experts, packed = hf_to_gguf_names(spec), expert_names(spec), packed_expert_names(spec)
    _unquantize_experts(raw, packed)
    if spec.tie_embeddings and "lm_head.weight" in raw and "model.embed_tokens.weight" in raw:
        if torch.equal(raw["lm_head.weight"], raw["model.embed_tokens.weight"]):
            del raw["lm_head.weight"]  # a tied head saved twice
    extra = sorted(set(raw) - set(names) - set(experts) - set(packed))
    missing = sorted(set(names) - set(raw)) + sorted(set(experts) - set(raw)) + sorted(set(packed) - set(raw))
    if missing or extra:
        parts = []
        if missing:
            parts.append(f"missing {len(missing)} tensor(s) the config needs, e.g. {missing[:3]}")
        if extra:
            parts.append(f"{len(extra)} tensor(s) the config does not use, e.g. {extra[:3]}")
        raise OpenLPUError(f"{path_or_dir}: weights do not match the config for {spec.name!r} ("
                           f"{'; '.join(parts)}); give the config.json that belongs to these "
                           "weights")

    shapes = spec.tensor_shapes()
    out: dict[str, torch.Tensor] = {}

    def check(hf_name: str, tensor, expected: tuple[int, ...]):
        if tuple(tensor.shape) != expected:
            raise OpenLPUError(f"{path_or_dir}: tensor {hf_name!r} has shape "
                               f"{tuple(tensor.shape)}, "
                               f"the config says {expected}; give the matching config.json")

    for hf, gguf in names.items():
        check(hf, raw[hf], shapes[gguf])
        out[gguf] = raw[hf].to(dtype)
    stacks: dict[str, list] = {}
    for hf, (gguf, j) in experts.items():
        check(hf, raw[hf], shapes[gguf][1:])
        stacks.setdefault(gguf, [None] * spec.n_experts)[j] = raw[hf]
    for gguf, parts in stacks.items():
        out[gguf] = torch.stack(parts).to(dtype)
    for hf, parts in packed.items():
        for gguf, to_gguf in parts:
            tensor = to_gguf(raw[hf])
            check(hf, tensor, shapes[gguf])
            out[gguf] = tensor.to(dtype).contiguous()
    return {name: out[name] for name in shapes}  # the spec's fixed order
