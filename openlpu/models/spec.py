"""ModelSpec: the shape of a decoder-only transformer, enough to count, plan, compile and run it.

Every loader (GGUF metadata, Hugging Face config.json, preset JSON) produces a ModelSpec; nothing
downstream looks at the source format again. Tensor names are llama.cpp's GGUF names (the
de-facto standard); shapes are torch's (out_features, in_features).
"""

from __future__ import annotations

import dataclasses
import functools
import json
import math
import re
from dataclasses import dataclass, field
from pathlib import Path

from openlpu.errors import OpenLPUError

FAMILIES = ("llama", "mistral", "mixtral", "qwen2", "qwen3", "qwen3-moe", "gemma", "gemma2", "gemma3", "gpt-oss",
            "llama4")
# gated-MLP activations; "swiglu_clamped" is gpt-oss's: gate clamped to <= 7, up to [-7, 7], then
# gate * sigmoid(1.702 gate) * (up + 1) (transformers GptOssExperts, swiglu_limit / swiglu_alpha)
ACTIVATIONS = ("silu", "gelu_tanh", "swiglu_clamped")
# local: sliding-window attention (a query sees the last sliding_window positions); chunked: a query sees
# only the positions of its own chunk of attention_chunk (Llama 4)
LAYER_KINDS = ("global", "local", "chunked")
ROPE_SCALINGS = ("llama3", "yarn", "factors", "linear")
# the kinds that stretch a trained context from its original length (the others hold none: 0)
ROPE_SCALINGS_WITH_ORIGINAL_LENGTH = ("llama3", "yarn")
# how an MoE router weights a token's top-k experts: "softmax" over their logits, applied to the experts'
# outputs (Mixtral, Qwen3-MoE, gpt-oss); "sigmoid_input": each chosen logit's sigmoid scales the expert's
# input (Llama 4: transformers Llama4Router and Llama4TextMoe)
ROUTERS = ("softmax", "sigmoid_input")

PRESETS_DIR = Path(__file__).parent / "presets"
# the most a model file may claim, beyond which it is broken: any size or count (the op arithmetic stays finite),
# and layers (the deepest public models have a few hundred; a plan holds rows for each)
MAX_SIZE = 2**31 - 1
MAX_LAYERS = 10_000


@dataclass(frozen=True)
class RopeScaling:
    """Rope scaling that stretches a model's trained context: Llama 3.1's frequency-dependent rescale
    (kind "llama3", with its low and high frequency factors), YaRN (kind "yarn", gpt-oss, with its
    beta_fast and beta_slow), a divisor of each rotated pair's frequency as given (kind "factors": the
    rope_freqs tensor in which llama.cpp's converter stores Llama 3.1's rescale; `factor` is the largest), or
    positions divided by `factor` (kind "linear", every pair's frequency divided by it: Gemma 3 4B and up).

    It scales the rope of the layers whose kind `layer_kinds` lists: every layer, unless the model's other layers
    keep a rope of their own (Gemma 3's local layers: their own base, unscaled)."""

    factor: float
    original_context_length: int = 0  # kinds ROPE_SCALINGS_WITH_ORIGINAL_LENGTH: the context trained on
    kind: str = "llama3"  # one of ROPE_SCALINGS
    low_freq_factor: float = 0.0
    high_freq_factor: float = 0.0
    beta_fast: float = 0.0
    beta_slow: float = 0.0
    truncate: bool = True  # yarn: round the blended band out to whole dimensions (gpt-oss does not)
    factors: tuple[float, ...] = ()  # kind "factors": one per rotated pair (head_dim / 2)
    layer_kinds: tuple[str, ...] = LAYER_KINDS  # the kinds of layer whose rope it scales

    def __post_init__(self):
        for name in ("factors", "layer_kinds"):  # a JSON list compares as a tuple
            object.__setattr__(self, name, tuple(getattr(self, name)))

    def served_context(self, given: int) -> int:
        """The tokens a model with this scaling serves, its config or file giving `given`: with yarn the original
        context times the factor (Qwen's YaRN setup leaves max_position_embeddings, and llama.cpp's converter the
        GGUF's context_length, at the pre-yarn length; vLLM serves original x factor, _get_and_verify_max_len, and
        transformers calls the factor post- over pre-yarn length); with the others, `given`."""
        return int(self.original_context_length * self.factor) if self.kind == "yarn" else given

    @property
    def attention_factor(self) -> float:
        """YaRN scales cos and sin, so queries and keys, by 0.1 ln(factor) + 1 (YaRN, arXiv:2309.00071,
        eq. 22 with sqrt(1/t) = 0.1 ln(s) + 1); llama3 scaling does not."""
        return 0.1 * math.log(self.factor) + 1.0 if self.kind == "yarn" and self.factor > 1 else 1.0


@dataclass(frozen=True)
class ModelSpec:
    name: str
    family: str  # one of FAMILIES
    vocab_size: int
    d_model: int
    n_layers: int
    n_heads: int
    n_kv_heads: int
    head_dim: int
    d_ff: int  # per expert for MoE models
    context_length: int
    norm_eps: float
    rope_base: float  # global-attention layers
    activation: str = "silu"  # gate activation of the gated MLP (SwiGLU / GeGLU)
    rope_base_local: float | None = None  # sliding-window layers, when it differs (Gemma 3)
    rope_scaling: RopeScaling | None = None
    sliding_window: int | None = None
    layer_kinds: tuple[str, ...] = ()  # per layer; empty means all "global"
    norm_weight_offset: float = 0.0  # Gemma's RMSNorm multiplies by (1 + w)
    post_norms: bool = False  # Gemma 2/3: norms after attention and after the MLP too
    qk_norm: bool = False  # Qwen 3, Gemma 3: RMSNorm on each query and key head
    qkv_bias: bool = False  # Qwen 2, gpt-oss
    attn_output_bias: bool = False  # gpt-oss: the output projection has a bias too
    attn_sinks: bool = False  # gpt-oss: a learned logit per head joins each softmax (and takes its share)
    moe_bias: bool = False  # gpt-oss: the router and every expert's projections have biases
    query_scale: float | None = None  # None: 1/sqrt(head_dim)
    attn_logit_softcap: float | None = None  # Gemma 2
    final_logit_softcap: float | None = None  # Gemma 2
    embed_scale: float = 1.0  # Gemma: sqrt(d_model)
    tie_embeddings: bool = False
    n_experts: int = 0  # 0 = dense MLP
    n_experts_per_token: int = 0
    # MoE models: layer i has experts iff (i + 1) % moe_layer_step == 0, the others a dense MLP of dense_d_ff
    # (Llama 4 Maverick: every second layer; transformers Llama4TextConfig.moe_layers)
    moe_layer_step: int = 1
    dense_d_ff: int = 0
    router: str = "softmax"  # one of ROUTERS
    shared_expert: bool = False  # Llama 4: every token also goes through a dense MLP of d_ff beside its experts
    attention_chunk: int | None = None  # "chunked" layers' chunk of positions (Llama 4: 8192)
    nope_global: bool = False  # Llama 4: "global" layers take no rope (NoPE) ...
    # ... and scale their queries at position p by 1 + scale * ln(1 + floor((p + 1) / floor)) (Llama 4's
    # attention temperature tuning, transformers Llama4TextAttention; 0: off)
    attn_temperature_floor: int = 0
    attn_temperature_scale: float = 0.0
    qk_l2_norm: bool = False  # Llama 4: a weightless RMS norm on each query and key head after rope (rope layers)
    source: str = field(default="", compare=False)  # where the configuration comes from: informational only
    extra: dict = field(default_factory=dict, compare=False)  # informational only

    def __post_init__(self):
        if not isinstance(self.layer_kinds, (list, tuple)):  # a file's
            raise OpenLPUError(f"model {self.name!r}: layer_kinds must be a list of {LAYER_KINDS}, one per layer, got "
                               f"{self.layer_kinds!r}")
        if not self.layer_kinds and isinstance(self.n_layers, int) and 0 < self.n_layers <= MAX_LAYERS:
            object.__setattr__(self, "layer_kinds", ("global",) * self.n_layers)
        object.__setattr__(self, "layer_kinds", tuple(self.layer_kinds))
        self.validate()

    # ---- validation -------------------------------------------------------------------------
    def validate(self) -> None:
        def bad(what: str) -> OpenLPUError:
            return OpenLPUError(f"model {self.name!r}: {what}")

        for name, (kinds, optional) in _scalar_fields().items():
            v = getattr(self, name)
            if not (v is None and optional) and (not isinstance(v, kinds) or isinstance(v, bool) != (bool in kinds)
                                                 or isinstance(v, float) and not math.isfinite(v)):
                raise bad(f"{name} must be {_KIND_WORDS[kinds]}{' or none' if optional else ''}, got {v!r}")
        if self.family not in FAMILIES:
            raise bad(f"unknown family {self.family!r}; supported: {', '.join(FAMILIES)}")
        for f in ("vocab_size", "d_model", "n_layers", "n_heads", "n_kv_heads", "head_dim", "d_ff",
                  "context_length"):
            v, most = getattr(self, f), MAX_LAYERS if f == "n_layers" else MAX_SIZE
            if not isinstance(v, int) or isinstance(v, bool) or not 0 < v <= most:
                raise bad(f"{f} must be a positive integer of at most {most:,}, got {v!r}")
        if self.head_dim % 2:
            raise bad(f"head_dim must be even (rope turns a head's values in pairs), got {self.head_dim}")
        if self.n_heads % self.n_kv_heads:
            raise bad(f"n_heads ({self.n_heads}) must be a multiple of n_kv_heads ({self.n_kv_heads})")
        if self.activation not in ACTIVATIONS:
            raise bad(f"activation {self.activation!r} not supported; use one of {ACTIVATIONS}")
        if len(self.layer_kinds) != self.n_layers or set(self.layer_kinds) - set(LAYER_KINDS):
            raise bad(f"layer_kinds must list {self.n_layers} entries of {LAYER_KINDS}")
        for f in ("sliding_window", "attention_chunk"):
            if getattr(self, f) is not None and not 0 < getattr(self, f) <= MAX_SIZE:
                raise bad(f"{f} must be a positive integer of at most {MAX_SIZE:,} or none, got {getattr(self, f)!r}")
        if "local" in self.layer_kinds and not self.sliding_window:
            raise bad("layers of kind 'local' need sliding_window")
        if "chunked" in self.layer_kinds and not self.attention_chunk:
            raise bad("layers of kind 'chunked' need attention_chunk")
        if isinstance(self.moe_layer_step, bool) or not isinstance(self.moe_layer_step, int) or self.moe_layer_step < 1:
            raise bad(f"moe_layer_step must be a positive integer, got {self.moe_layer_step!r}")
        if self.moe_layer_step > 1 and not (self.is_moe and self.dense_d_ff > 0):
            raise bad("moe_layer_step above 1 needs experts and dense_d_ff (the dense layers' MLP width)")
        if self.router not in ROUTERS:
            raise bad(f"router {self.router!r} not supported; use one of {ROUTERS}")
        if (self.shared_expert or self.router != "softmax") and not self.is_moe:
            raise bad("shared_expert and a router other than softmax need experts (n_experts > 0)")
        if self.attn_temperature_floor < 0 or (self.attn_temperature_scale != 0) != (self.attn_temperature_floor > 0):
            raise bad("attn_temperature_floor (a positive integer) and attn_temperature_scale go together")
        for f in ("n_experts", "n_experts_per_token", "dense_d_ff"):
            if getattr(self, f) < 0:
                raise bad(f"{f} must be 0 or more, got {getattr(self, f)!r}")
        if (self.n_experts == 0) != (self.n_experts_per_token == 0) or \
                self.n_experts_per_token > self.n_experts:
            raise bad(f"n_experts_per_token ({self.n_experts_per_token}) must be between 1 and "
                      f"n_experts ({self.n_experts}) for MoE models, and both 0 for dense ones")
        if not all(isinstance(x, (int, float)) and 0 < x < math.inf for x in (self.norm_eps, self.rope_base)):
            raise bad(f"norm_eps and rope_base must be positive numbers, got {self.norm_eps!r} and {self.rope_base!r}")
        for cap in ("attn_logit_softcap", "final_logit_softcap"):
            value = getattr(self, cap)
            if value is not None and not (isinstance(value, (int, float)) and 0 < value < math.inf):
                raise bad(f"{cap} must be a positive number or none, got {value!r}")
        if self.rope_scaling is not None:
            rs = self.rope_scaling
            figures = (rs.factor, rs.low_freq_factor, rs.high_freq_factor, rs.beta_fast, rs.beta_slow)
            if not all(isinstance(x, (int, float)) and not isinstance(x, bool) and math.isfinite(x) for x in figures) \
                    or not rs.factor > 0:
                raise bad(f"rope scaling factor must be a positive, finite number and its other figures finite "
                          f"numbers, got factor {rs.factor!r}")
            least = 1 if rs.kind in ROPE_SCALINGS_WITH_ORIGINAL_LENGTH else 0
            if isinstance(rs.original_context_length, bool) or not isinstance(rs.original_context_length, int) \
                    or not least <= rs.original_context_length <= MAX_SIZE:
                raise bad(f"rope scaling original_context_length must be an integer from {least} to {MAX_SIZE:,}, "
                          f"got {rs.original_context_length!r}")
            if not isinstance(rs.truncate, bool):
                raise bad(f"rope scaling truncate must be true or false, got {rs.truncate!r}")
        if self.rope_scaling is not None and self.rope_scaling.kind not in ROPE_SCALINGS:
            raise bad(f"rope scaling {self.rope_scaling.kind!r} not supported; use one of {ROPE_SCALINGS}")
        if self.rope_scaling is not None:
            rs, pairs = self.rope_scaling, self.head_dim // 2
            wanted = pairs if rs.kind == "factors" else 0  # kind "factors" takes one per rotated pair, others none
            if len(rs.factors) != wanted or not all(isinstance(f, (int, float)) and not isinstance(f, bool)
                                                    and 0 < f < math.inf for f in rs.factors):
                raise bad(f"rope scaling factors: {len(rs.factors)} given, with kind {rs.kind!r}; kind 'factors' "
                          f"takes one positive factor per rotated pair ({pairs}), the other kinds none")
            if rs.kind == "llama3" and not 0 < rs.low_freq_factor <= rs.high_freq_factor:  # wavelengths divide by
                # them (Llama 4's are equal: no band between the kept and the slowed frequencies)
                raise bad(f"llama3 rope scaling needs 0 < low_freq_factor <= high_freq_factor, got "
                          f"{rs.low_freq_factor!r} and {rs.high_freq_factor!r}")
            if not rs.layer_kinds or not all(kind in LAYER_KINDS for kind in rs.layer_kinds):
                raise bad(f"rope scaling layer_kinds must list some of {LAYER_KINDS}, got {rs.layer_kinds}")
            if rs.kind == "yarn" and set(rs.layer_kinds) != set(LAYER_KINDS):
                raise bad("yarn rope scaling must scale every kind of layer: its attention factor scales every "
                          "layer's attention (attn_scale)")
        if self.moe_bias and not self.is_moe:
            raise bad("moe_bias needs experts (n_experts > 0)")

    # ---- derived quantities -----------------------------------------------------------------
    @property
    def q_dim(self) -> int:
        return self.n_heads * self.head_dim

    @property
    def kv_dim(self) -> int:
        return self.n_kv_heads * self.head_dim

    @property
    def is_moe(self) -> bool:
        return self.n_experts > 0

    def is_moe_layer(self, layer: int) -> bool:
        return self.is_moe and (layer + 1) % self.moe_layer_step == 0

    def layer_d_ff(self, layer: int) -> int:
        """The MLP width of a layer: each expert's on an MoE layer, the dense MLP's otherwise."""
        return self.dense_d_ff if self.is_moe and not self.is_moe_layer(layer) else self.d_ff

    def splits_heads(self, tp: int) -> bool:
        """Whether tensor parallelism over `tp` devices can split attention by heads: each takes whole
        query heads, and either whole KV heads or a copy of one KV head shared by tp / n_kv_heads devices."""
        return self.n_heads % tp == 0 and (self.n_kv_heads % tp == 0 or tp % self.n_kv_heads == 0)

    @property
    def attn_scale(self) -> float:
        """What q.k is multiplied by: the query scale, and yarn's factor once for q and once for k."""
        scale = self.query_scale if self.query_scale is not None else 1.0 / math.sqrt(self.head_dim)
        return scale * (self.rope_scaling.attention_factor ** 2 if self.rope_scaling else 1.0)

    def layer_rope_base(self, layer: int) -> float:
        if self.layer_kinds[layer] == "local" and self.rope_base_local is not None:
            return self.rope_base_local
        return self.rope_base

    def layer_rope_scaling(self, layer: int) -> RopeScaling | None:
        rs = self.rope_scaling
        return rs if rs is not None and self.layer_kinds[layer] in rs.layer_kinds else None

    def layer_rope(self, layer: int) -> tuple[float, RopeScaling | None]:
        """(base, scaling) of the rope that turns a layer's queries and keys: layers with the same one share
        its tables."""
        return self.layer_rope_base(layer), self.layer_rope_scaling(layer)

    def layer_window(self, layer: int) -> int | None:
        return self.sliding_window if self.layer_kinds[layer] == "local" else None

    def layer_chunk(self, layer: int) -> int | None:
        return self.attention_chunk if self.layer_kinds[layer] == "chunked" else None

    def layer_positions(self, layer: int, context: int) -> int:
        """Positions of a `context` a layer keeps per sequence: all of them, or a ring of its window or chunk."""
        return min(context, self.layer_window(layer) or self.layer_chunk(layer) or context)

    def kv_values(self, context: int) -> int:
        """Keys and values one sequence of `context` tokens keeps over all layers (layer_positions each)."""
        return 2 * self.kv_dim * sum(self.layer_positions(i, context) for i in range(self.n_layers))

    def layer_uses_rope(self, layer: int) -> bool:
        return not (self.nope_global and self.layer_kinds[layer] == "global")

    def tensor_shapes(self) -> dict[str, tuple[int, ...]]:
        """Every weight tensor, by GGUF name, with its torch shape, in a fixed order."""
        d, q, kv, e = self.d_model, self.q_dim, self.kv_dim, self.n_experts
        shapes: dict[str, tuple[int, ...]] = {"token_embd.weight": (self.vocab_size, d)}
        for i in range(self.n_layers):
            b = f"blk.{i}."
            shapes[b + "attn_norm.weight"] = (d,)
            shapes[b + "attn_q.weight"] = (q, d)
            shapes[b + "attn_k.weight"] = (kv, d)
            shapes[b + "attn_v.weight"] = (kv, d)
            if self.qkv_bias:
                shapes[b + "attn_q.bias"] = (q,)
                shapes[b + "attn_k.bias"] = (kv,)
                shapes[b + "attn_v.bias"] = (kv,)
            if self.qk_norm:
                shapes[b + "attn_q_norm.weight"] = (self.head_dim,)
                shapes[b + "attn_k_norm.weight"] = (self.head_dim,)
            if self.attn_sinks:
                shapes[b + "attn_sinks.weight"] = (self.n_heads,)
            shapes[b + "attn_output.weight"] = (d, q)
            if self.attn_output_bias:
                shapes[b + "attn_output.bias"] = (d,)
            if self.post_norms:
                shapes[b + "post_attention_norm.weight"] = (d,)
            shapes[b + "ffn_norm.weight"] = (d,)
            ff = self.layer_d_ff(i)
            if self.is_moe_layer(i):
                shapes[b + "ffn_gate_inp.weight"] = (e, d)
                shapes[b + "ffn_gate_exps.weight"] = (e, ff, d)
                shapes[b + "ffn_up_exps.weight"] = (e, ff, d)
                shapes[b + "ffn_down_exps.weight"] = (e, d, ff)
                if self.shared_expert:
                    shapes[b + "ffn_gate_shexp.weight"] = (ff, d)
                    shapes[b + "ffn_up_shexp.weight"] = (ff, d)
                    shapes[b + "ffn_down_shexp.weight"] = (d, ff)
                if self.moe_bias:
                    shapes[b + "ffn_gate_inp.bias"] = (e,)
                    shapes[b + "ffn_gate_exps.bias"] = (e, ff)
                    shapes[b + "ffn_up_exps.bias"] = (e, ff)
                    shapes[b + "ffn_down_exps.bias"] = (e, d)
            else:
                shapes[b + "ffn_gate.weight"] = (ff, d)
                shapes[b + "ffn_up.weight"] = (ff, d)
                shapes[b + "ffn_down.weight"] = (d, ff)
            if self.post_norms:
                shapes[b + "post_ffw_norm.weight"] = (d,)
        shapes["output_norm.weight"] = (d,)
        if not self.tie_embeddings:
            shapes["output.weight"] = (self.vocab_size, d)
        return shapes

    def param_count(self) -> int:
        return sum(math.prod(s) for s in self.tensor_shapes().values())

    def active_param_count(self) -> int:
        """Parameters one token's pass uses: MoE models use only top-k experts. The embedding table counts whole,
        as Mistral's 12.9B for Mixtral 8x7B counts it (OpenAI's 5.1B for gpt-oss-120b leaves it out)."""
        if not self.is_moe:
            return self.param_count()
        idle = self.n_experts - self.n_experts_per_token
        # expert tensors ("blk.N.ffn_*_exps.*") stack one slice per expert along their first axis
        return self.param_count() - sum(math.prod(shape) // self.n_experts * idle
                                        for name, shape in self.tensor_shapes().items() if "_exps." in name)

    def kv_bytes_per_token(self, bytes_per_element: float) -> float:
        """KV cache bytes one token adds across all layers (sliding-window and chunked layers included)."""
        return 2 * self.n_layers * self.kv_dim * bytes_per_element

    # ---- (de)serialisation ------------------------------------------------------------------
    def to_dict(self) -> dict:
        d = dataclasses.asdict(self)
        d["layer_kinds"] = list(self.layer_kinds)
        return d

    @classmethod
    def from_dict(cls, data: dict, origin: str = "model config") -> "ModelSpec":
        if not isinstance(data, dict):
            raise OpenLPUError(f"{origin}: expected a JSON object of ModelSpec fields")
        fields = {f.name: f for f in dataclasses.fields(cls)}
        unknown = sorted(set(data) - set(fields))
        if unknown:
            raise OpenLPUError(f"{origin}: unknown field(s) {', '.join(unknown)}; "
                               f"valid fields: {', '.join(fields)}")
        required = [n for n, f in fields.items()
                    if f.default is dataclasses.MISSING and f.default_factory is dataclasses.MISSING]
        missing = [n for n in required if n not in data]
        if missing:
            raise OpenLPUError(f"{origin}: missing required field(s) {', '.join(missing)}")
        data = dict(data)
        if data.get("rope_scaling") is not None:
            try:
                data["rope_scaling"] = RopeScaling(**data["rope_scaling"])
            except TypeError as e:
                raise OpenLPUError(f"{origin}: bad rope_scaling ({e})") from None
        try:
            return cls(**data)
        except (TypeError, OpenLPUError) as e:  # the file named with what it holds wrong
            raise OpenLPUError(f"{origin}: {e}") from None


def spec_or_refusal(fields: dict, where: str, keys: dict[str, str], remedy: str) -> ModelSpec:
    """ModelSpec(**fields) of a model read from a file: a value it refuses is said with the file (`where`), the
    file's own key of each field the refusal names (`keys`: field -> key) and what to do (`remedy`)."""
    try:
        return ModelSpec(**fields)
    except OpenLPUError as e:
        named = [f"{field}: {key}" for field, key in keys.items() if key and re.search(rf"\b{field}\b", str(e))]
        given = f" ({'; '.join(named)})" if named else ""
        raise OpenLPUError(f"{where}{e}{given}; {remedy}") from None


_SCALARS = {"bool": (bool,), "int": (int,), "float": (int, float), "str": (str,)}
_KIND_WORDS = {(bool,): "true or false", (int,): "an integer", (int, float): "a finite number", (str,): "a string"}


@functools.cache
def _scalar_fields() -> dict[str, tuple[tuple[type, ...], bool]]:
    """ModelSpec's fields of one scalar type (or none): name -> (the types a value may have, whether none is
    allowed), read off the annotations, so a file's "qkv_bias": "x" is refused where it is read."""
    out = {}
    for f in dataclasses.fields(ModelSpec):
        kind, _, none = f.type.partition(" | ")
        if kind in _SCALARS and none in ("", "None"):
            out[f.name] = (_SCALARS[kind], none == "None")
    return out


def preset_names() -> list[str]:
    return sorted(p.stem for p in PRESETS_DIR.glob("*.json"))


def load_preset(name: str) -> ModelSpec:
    """A public architecture by name (configs only; see presets/*.json for each source)."""
    path = PRESETS_DIR / f"{name}.json"
    if not path.exists():
        import difflib

        names = preset_names()  # spelt nearly so, else holding what was given ("70b")
        holding = [n for n in names if len(name) > 2 and name.lower() in n]
        close = difflib.get_close_matches(name.lower(), names, n=3) or holding[:5]
        hint = f"; did you mean {', '.join(close)}?" if close else ""
        raise OpenLPUError(f"unknown model {name!r}{hint} (`openlpu models` lists them; or give a .gguf file "
                           "or a Hugging Face config.json)")
    return _from_preset_format(json.loads(path.read_text()), str(path))


def _from_preset_format(data: dict, origin: str) -> ModelSpec:
    """A ModelSpec from a preset's JSON: its fields, and $source_notes saying where they come from."""
    return ModelSpec.from_dict({k: v for k, v in data.items() if k != "$source_notes"}, origin=origin)


def _starts_like_gguf(path: Path) -> bool:
    from openlpu.models.gguf import MAGIC_BYTES  # here: the loaders import this module

    try:
        with open(path, "rb") as f:
            return f.read(len(MAGIC_BYTES)) == MAGIC_BYTES
    except OSError:
        return False


def load_spec(model: str | Path) -> ModelSpec:
    """A model's shape from a preset name, a .gguf file's metadata (no tensor data is read), a Hugging
    Face config.json (the file, or the checkpoint folder holding it) or a JSON file in the presets' format."""
    if not str(model):
        raise OpenLPUError("no model given; give a preset name (`openlpu models` lists them), a .gguf file, or a "
                           "config.json or the folder holding it")
    path = Path(model)
    if path.suffix.lower() == ".gguf" or path.is_file() and path.suffix.lower() != ".json" and _starts_like_gguf(
            path):  # a hub blob has no suffix
        if not path.is_file():
            what = "is a folder, not a .gguf file" if path.is_dir() else "not found"
            raise OpenLPUError(f"GGUF file {str(model)!r} {what}; give the path of a .gguf file")
        # imported here: the loaders import this module (and gguf loads numpy only when needed)
        from openlpu.models.gguf import spec_from_gguf

        return spec_from_gguf(path)
    if path.suffix.lower() == ".json" or path.is_dir():
        from openlpu.models.hf import read_config, spec_from_hf_config

        data, origin = read_config(path)
        if "family" in data and "model_type" not in data:  # ModelSpec's fields, as presets/*.json hold them
            return _from_preset_format(data, origin)
        return spec_from_hf_config(path)
    if len(path.parts) > 1 or str(model).startswith(".") or path.is_file() and str(model) not in preset_names():
        # a path ('./llama-3.1-8b' too), not to a model file
        what = "is neither a .gguf file nor a config.json" if path.exists() else "not found"
        raise OpenLPUError(f"{str(model)!r} {what}; give a .gguf file, a config.json or the folder holding it, or "
                           "a preset name (`openlpu models` lists them)")
    return load_preset(str(model))
