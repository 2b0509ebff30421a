"""GGUF files: a fast header reader, ModelSpec from metadata, and dequantized weights.

The header parse is our own (one sequential pass with struct / np.frombuffer): gguf.GGUFReader
builds a numpy view per vocabulary string and takes ~28 s on a 262k-token vocabulary. Format
constants and dequantisation come from the `gguf` package (the llama.cpp project's own).
Format reference: https://github.com/ggml-org/ggml/blob/master/docs/gguf.md
"""

from __future__ import annotations

import re
import struct
from dataclasses import dataclass, field, replace
from pathlib import Path

import numpy as np
from gguf import (
    GGML_QUANT_SIZES,
    GGUF_DEFAULT_ALIGNMENT,
    GGUF_MAGIC,
    GGMLQuantizationType,
    GGUFValueType,
)
from gguf.quants import dequantize

from openlpu.errors import OpenLPUError
from openlpu.models.spec import (
    LAYER_KINDS,
    MAX_LAYERS,
    MAX_SIZE,
    ModelSpec,
    RopeScaling,
    preset_names,
    spec_or_refusal,
)

# ---- format tables --------------------------------------------------------------------------
# Scalar value types: little-endian struct format of one value.
SCALAR_FORMATS: dict[GGUFValueType, str] = {
    GGUFValueType.UINT8: "<B", GGUFValueType.INT8: "<b",
    GGUFValueType.UINT16: "<H", GGUFValueType.INT16: "<h",
    GGUFValueType.UINT32: "<I", GGUFValueType.INT32: "<i",
    GGUFValueType.UINT64: "<Q", GGUFValueType.INT64: "<q",
    GGUFValueType.FLOAT32: "<f", GGUFValueType.FLOAT64: "<d",
    GGUFValueType.BOOL: "<?",
}
# Numeric arrays are read in one np.frombuffer call with this dtype.
ARRAY_DTYPES: dict[GGUFValueType, str] = {
    GGUFValueType.UINT8: "<u1", GGUFValueType.INT8: "<i1",
    GGUFValueType.UINT16: "<u2", GGUFValueType.INT16: "<i2",
    GGUFValueType.UINT32: "<u4", GGUFValueType.INT32: "<i4",
    GGUFValueType.UINT64: "<u8", GGUFValueType.INT64: "<i8",
    GGUFValueType.FLOAT32: "<f4", GGUFValueType.FLOAT64: "<f8",
    GGUFValueType.BOOL: "?",
}
# Tensor types we dequantize to float32 (gguf.quants.dequantize supports each).
SUPPORTED_TENSOR_TYPES = ("F32", "F16", "BF16", "Q8_0", "Q4_0", "Q4_1", "Q5_0", "Q5_1",
                          "Q2_K", "Q3_K", "Q4_K", "Q5_K", "Q6_K")
SUPPORTED_VERSIONS = (2, 3)  # version 1 used 32-bit counts and is long obsolete
MAGIC_BYTES = struct.pack("<I", GGUF_MAGIC)  # b"GGUF"


@dataclass(frozen=True)
class TensorInfo:
    name: str
    ggml_type: str  # GGMLQuantizationType name, e.g. "Q4_K"
    shape: tuple[int, ...]  # torch order (outermost first); GGUF stores innermost first
    offset_bytes: int  # absolute, from the start of the file
    nbytes: int


@dataclass(frozen=True)
class GGUFHeader:
    path: Path
    version: int
    metadata: dict
    tensors: dict[str, TensorInfo]
    file_size_bytes: int

    @property
    def architecture(self) -> str:
        return str(self.metadata.get("general.architecture", ""))


class _Cursor:
    """Sequential little-endian reader over the file's bytes; running off the end is corruption."""

    def __init__(self, buf: memoryview, path: Path):
        self.buf, self.pos, self.path = buf, 0, path

    def take(self, n: int) -> memoryview:
        if n < 0 or self.pos + n > len(self.buf):
            raise OpenLPUError(f"{self.path}: GGUF file is truncated or corrupt (needs byte "
                               f"{self.pos + n:,} of {len(self.buf):,}); download it again")
        out = self.buf[self.pos:self.pos + n]
        self.pos += n
        return out

    def scalar(self, fmt: str):
        return struct.unpack(fmt, self.take(struct.calcsize(fmt)))[0]

    def string(self) -> str:
        return bytes(self.take(self.scalar("<Q"))).decode("utf-8", errors="replace")

    def strings(self, count: int) -> list[str]:
        """A string array in one tight loop (vocabularies hold ~10^5 entries)."""
        buf, pos, end, unpack = self.buf, self.pos, len(self.buf), struct.Struct("<Q").unpack_from
        out = []
        for _ in range(count):
            if pos + 8 > end:
                self.pos = pos
                self.take(8)  # raises the truncation error
            n = unpack(buf, pos)[0]
            pos += 8
            out.append(str(buf[pos:pos + n], "utf-8", "replace"))
            pos += n
        self.pos = pos
        if pos > end:
            self.pos = end
            self.take(pos - end)
        return out

    def value(self, vtype: int, depth: int = 0):
        vtype = self.value_type(vtype)
        if depth > MAX_ARRAY_NESTING:
            raise OpenLPUError(f"{self.path}: GGUF file is corrupt (arrays nested over {MAX_ARRAY_NESTING} deep at "
                               f"byte {self.pos:,}); download it again")
        if vtype == GGUFValueType.STRING:
            return self.string()
        if vtype == GGUFValueType.ARRAY:
            item_type, count = self.value_type(self.scalar("<I")), self.scalar("<Q")
            if item_type in ARRAY_DTYPES:
                dtype = np.dtype(ARRAY_DTYPES[item_type])
                return np.frombuffer(self.take(count * dtype.itemsize), dtype=dtype).tolist()
            if item_type == GGUFValueType.STRING:
                return self.strings(count)
            return [self.value(item_type, depth + 1) for _ in range(count)]
        return self.scalar(SCALAR_FORMATS[vtype])

    def value_type(self, code: int) -> GGUFValueType:
        try:
            return GGUFValueType(code)
        except ValueError:
            raise OpenLPUError(f"{self.path}: GGUF file is corrupt (unknown value type {code} at "
                               f"byte {self.pos:,}); download it again") from None


MAX_ARRAY_NESTING = 16  # arrays of arrays: llama.cpp writes one level at most; deeper is a broken file


def _open_bytes(path: Path) -> np.memmap:
    if not path.exists():
        if str(path) in preset_names():  # `openlpu run hi --model llama-3-8b`
            raise OpenLPUError(f"{str(path)!r} is a preset (a model's shapes, no weights): `openlpu run` and `serve` "
                               "need a .gguf file with weights; presets are for `openlpu plan` and `compile`")
        raise OpenLPUError(f"model file not found: {path}; check the path")
    if not path.is_file():
        raise OpenLPUError(f"{path} is not a file; give the path of a .gguf model file")
    if path.stat().st_size < len(MAGIC_BYTES):
        raise OpenLPUError(f"{path} is not a GGUF file (too short); give a .gguf model file")
    return np.memmap(path, dtype=np.uint8, mode="r")


def read_header(path: str | Path) -> GGUFHeader:
    """Metadata and tensor directory of a GGUF file, without touching the tensor data."""
    path = Path(path)
    data = _open_bytes(path)
    if bytes(data[:4]) != MAGIC_BYTES:
        raise OpenLPUError(f"{path} is not a GGUF file (bad magic {bytes(data[:4])!r}); "
                           "give a .gguf model file")
    cur = _Cursor(memoryview(data), path)
    cur.take(4)
    version = cur.scalar("<I")
    if version not in SUPPORTED_VERSIONS:
        raise OpenLPUError(f"{path}: GGUF version {version} not supported (supported: "
                           f"{SUPPORTED_VERSIONS}); re-convert the model with a current llama.cpp")
    n_tensors, n_kv = cur.scalar("<Q"), cur.scalar("<Q")
    metadata = {}
    for _ in range(n_kv):
        key = cur.string()
        metadata[key] = cur.value(cur.scalar("<I"))
    raw = []
    for _ in range(n_tensors):
        name = cur.string()
        dims = [cur.scalar("<Q") for _ in range(cur.scalar("<I"))]
        raw.append((name, dims, cur.scalar("<I"), cur.scalar("<Q")))
    alignment = _number(metadata, "general.alignment", path, GGUF_DEFAULT_ALIGNMENT, integer=True)
    if alignment < 1 or alignment & (alignment - 1):  # the format's rule: a power of two
        raise OpenLPUError(f"{path}: GGUF metadata general.alignment = {alignment} is not a power of two; the file "
                           "is broken, re-convert it with a current llama.cpp")
    data_start = -(-cur.pos // alignment) * alignment
    tensors = {}
    for name, dims, type_code, rel_offset in raw:
        try:
            qtype = GGMLQuantizationType(type_code)
        except ValueError:
            raise OpenLPUError(f"{path}: tensor {name!r} has unknown ggml type {type_code}; "
                               "the file is corrupt or newer than this gguf package") from None
        block_elems, block_bytes = GGML_QUANT_SIZES[qtype]
        n_elems = int(np.prod(dims, dtype=np.int64))
        info = TensorInfo(name, qtype.name, tuple(reversed(dims)), data_start + rel_offset,
                          n_elems // block_elems * block_bytes)
        if info.offset_bytes + info.nbytes > len(data):
            raise OpenLPUError(f"{path}: GGUF file is truncated (tensor {name!r} ends at byte "
                               f"{info.offset_bytes + info.nbytes:,}, file has {len(data):,}); "
                               "download it again")
        tensors[name] = info
    return GGUFHeader(path, version, metadata, tensors, len(data))


def _header(header_or_path: GGUFHeader | str | Path) -> GGUFHeader:
    return header_or_path if isinstance(header_or_path, GGUFHeader) else read_header(header_or_path)


# ---- ModelSpec from metadata ----------------------------------------------------------------
@dataclass(frozen=True)
class ArchDefaults:
    """What llama.cpp fills in per architecture when the GGUF metadata does not carry it.

    Source for every entry: llama.cpp src/llama-model.cpp (llama_model::load_hparams, the case of
    each LLM_ARCH_*) and convert_hf_to_gguf.py (the model class of the same architecture).
    """

    family: str
    family_if_moe: str | None = None  # Mixtral is arch "llama" with expert_count > 0
    activation: str = "silu"
    swa_period: int = 0  # llama.cpp set_swa_pattern(n): layer il is local iff il % n < n - 1
    sliding_window_default: int | None = None
    sliding_window_required: bool = False  # llama.cpp's load_hparams reads attention.sliding_window as required
    rope_base_local: float | None = None  # rope_freq_base_train_swa
    # llama.cpp's rope_freq_scale_train_swa = 1: the file's rope scaling scales only the layers without a sliding
    # window (or chunks), ModelSpec's "global" ones; by default the sliding layers take it too
    swa_rope_unscaled: bool = False
    query_scale_from_d_model_layers: int = 0  # this layer count (the 27B) scales by d_model/n_heads
    embed_scale_sqrt_d_model: bool = False
    norm_weight_offset: float = 0.0
    stored_norm_shift: float = 0.0  # convert_hf_to_gguf adds this to every *norm.weight
    post_norms: bool = False
    qk_norm: bool = False
    qkv_bias: bool = False
    attn_output_bias: bool = False
    attn_sinks: bool = False
    moe_bias: bool = False
    explicit_query_scale: bool = False  # llama.cpp sets f_attention_scale for this arch
    yarn_truncate: bool = True  # the model's yarn rounds its band to whole dimensions (GGUF has no key)
    weights_unreadable: str = ""  # why the runtime cannot read this architecture's tensors, if it cannot
    softcap_defaults: tuple[float, float] | None = None  # (attention, final) logit softcaps where the keys are absent
    d_ff_key: str = "feed_forward_length"  # the key of the MLP's (or each expert's) hidden width
    router: str = "softmax"
    shared_expert: bool = False
    # chunked layers: layer il is global and without rope iff (il + 1) % chunk_period == 0, else chunked (in chunks
    # of attention_chunk) with rope; 0: no chunked layers
    chunk_period: int = 0
    attention_chunk: int | None = None
    attn_temperature_floor: int = 0  # NoPE layers' attention temperature (ModelSpec's fields of the same names)
    attn_temperature_scale: float = 0.0
    qk_l2_norm: bool = False
    no_qk_l2_norm_experts: int = 0  # ... except for models of this many experts
    # metadata whose value ModelSpec fixes: key suffix -> (the value it must have, the value llama.cpp takes when
    # the key is absent (None: llama.cpp requires the key), why, for the refusal)
    fixed_metadata: dict = field(default_factory=dict)
    # the required key of the MoE layers' step (ModelSpec.moe_layer_step), the others dense MLPs of
    # feed_forward_length; "": every layer of an MoE model has experts
    moe_step_key: str = ""


ARCHITECTURES: dict[str, ArchDefaults] = {
    "llama": ArchDefaults(family="llama", family_if_moe="mixtral"),
    # gemma (Gemma 1): GemmaModel adds 1 to norms; the embeddings scaled by sqrt(n_embd); queries by
    # 1/sqrt(n_embd_head_k), llama.cpp's default; no sliding window, no softcaps
    "gemma": ArchDefaults(family="gemma", activation="gelu_tanh", embed_scale_sqrt_d_model=True, norm_weight_offset=1.0,
                          stored_norm_shift=1.0),
    "qwen2": ArchDefaults(family="qwen2", qkv_bias=True),
    "qwen3": ArchDefaults(family="qwen3", qk_norm=True),
    # qwen3moe: feed_forward_length is the (unused) dense width; each expert's is expert_feed_forward_length
    "qwen3moe": ArchDefaults(family="qwen3-moe", qk_norm=True, d_ff_key="expert_feed_forward_length"),
    # gemma2: n_swa default 4096, set_swa_pattern(2); f_attention_scale 1/sqrt(n_embd/n_head)
    # for LLM_TYPE_27B (46 layers), else 1/sqrt(n_embd_head_k). GemmaModel adds 1 to norms. Its softcaps are
    # optional keys, llama_hparams' f_attn_logit_softcapping 50 and f_final_logit_softcapping 30 where absent.
    "gemma2": ArchDefaults(family="gemma2", activation="gelu_tanh", swa_period=2, softcap_defaults=(50.0, 30.0),
                           sliding_window_default=4096, query_scale_from_d_model_layers=46,
                           embed_scale_sqrt_d_model=True, norm_weight_offset=1.0,
                           stored_norm_shift=1.0, post_norms=True, explicit_query_scale=True),
    # gemma3: set_swa_pattern(6) (5 local : 1 global), rope_freq_base_train_swa = 10000 and
    # rope_freq_scale_train_swa = 1 (the 4B, 12B and 27B's linear rope scaling, which convert_hf_to_gguf.py's
    # Gemma3Model writes as rope.scaling.type and .factor, scales the global layers only), f_attention_scale as
    # gemma2 (27B = 62 layers); Gemma3Model.norm_shift = 1.0.
    "gemma3": ArchDefaults(family="gemma3", activation="gelu_tanh", swa_period=6, sliding_window_required=True,
                           rope_base_local=10000.0, swa_rope_unscaled=True, query_scale_from_d_model_layers=62,
                           embed_scale_sqrt_d_model=True, norm_weight_offset=1.0,
                           stored_norm_shift=1.0, post_norms=True, qk_norm=True,
                           explicit_query_scale=True),
    # gpt-oss: set_swa_pattern(2) (layer 0 local), attention.sliding_window required; biased q, k, v, output,
    # router and experts; sinks; yarn without truncation (its config.json: "truncate": false)
    "gpt-oss": ArchDefaults(family="gpt-oss", activation="swiglu_clamped", swa_period=2, sliding_window_required=True,
                            qkv_bias=True, attn_output_bias=True, attn_sinks=True, moe_bias=True, yarn_truncate=False,
                            weights_unreadable="its experts are MXFP4, which this reader does not dequantize, and "
                            "llama.cpp names its tensors its own way, so `openlpu run` and `serve` cannot run it; "
                            "`openlpu plan` and `compile` read this file's metadata"),
    # llama4 (src/models/llama4.cpp llama_model_llama4::load_arch_hparams; earlier src/llama-model.cpp case
    # LLM_ARCH_LLAMA4): expert_feed_forward_length and interleave_moe_layer_step are required (feed_forward_length is
    # intermediate_size_mlp, the dense layers' width: convert_hf_to_gguf.py Llama4Model); a layer is MoE iff
    # (il + 1) % interleave_moe_layer_step == 0. Unless attention.sliding_window is present and 0 (then no chunks
    # and rope everywhere: MobileLLM-R1), swa_type CHUNKED with n_swa hard-coded to 8192 (whatever the key says),
    # set_swa_pattern(attention.sliding_window_pattern, default 4) (3 chunked : 1 full), attention temperature
    # floor 8192, scale 0.1, offset 1.0 (so floor((pos + 1) / 8192)); the graph skips rope and scales queries by
    # that temperature iff (il + 1) % n_no_rope_layer_step == 0, whose default 4 (src/llama-hparams.h) no key
    # sets; use_kq_norm (a weightless rms_norm of q and k after rope, rope layers only) unless the 128-expert
    # model (LLM_TYPE_17B_128E, Maverick); experts gated by LLAMA_EXPERT_GATING_FUNC_TYPE_SIGMOID, weighting
    # the experts' input (llama-graph.cpp build_moe_ffn: weight_before_ffn for LLM_ARCH_LLAMA4), plus ffn_*_shexp
    # of the experts' width; rope type NORM (adjacent pairs), on q/k rows the converter leaves unpermuted
    # (undo_permute = False), already in that order
    "llama4": ArchDefaults(family="llama4", d_ff_key="expert_feed_forward_length", router="sigmoid_input",
                           shared_expert=True, chunk_period=4, attention_chunk=8192, attn_temperature_floor=8192,
                           attn_temperature_scale=0.1, qk_l2_norm=True, no_qk_l2_norm_experts=128,
                           moe_step_key="interleave_moe_layer_step",
                           fixed_metadata={
                               "attention.sliding_window_pattern": (
                                   4, 4, ("ModelSpec's llama4 ropes exactly its chunked layers, and llama.cpp skips "
                                          "rope on every 4th layer; use a file without the key"))}),
}

# ModelSpec field -> GGUF key suffix ("{arch}." prefix), read when present (llama.cpp LLM_KV names).
METADATA_KEYS: dict[str, str] = {
    "context_length": "context_length",
    "d_model": "embedding_length",
    "n_layers": "block_count",
    "d_ff": "feed_forward_length",
    "n_heads": "attention.head_count",
    "n_kv_heads": "attention.head_count_kv",
    "head_dim": "attention.key_length",
    "norm_eps": "attention.layer_norm_rms_epsilon",
    "rope_base": "rope.freq_base",
    "sliding_window": "attention.sliding_window",
    "attn_logit_softcap": "attn_logit_softcapping",
    "final_logit_softcap": "final_logit_softcapping",
    "n_experts": "expert_count",
    "n_experts_per_token": "expert_used_count",
    "vocab_size": "vocab_size",
}
REQUIRED_FIELDS = ("context_length", "d_model", "n_layers", "d_ff", "n_heads", "norm_eps")  # llama.cpp's too
# Keys llama.cpp reads as one value or one per layer (llama_model_loader::get_key_or_arr in load_hparams; an array
# must hold block_count values). ModelSpec has one value for every layer.
PER_LAYER_KEYS = ("attention.head_count", "attention.head_count_kv", "feed_forward_length")
ROPE_FREQS = "rope_freqs.weight"  # a tensor of the ModelSpec (its rope scaling), not a weight
LLAMA_CPP_ROPE_BASE_DEFAULT = 10000.0  # llama-model.cpp: rope_freq_base_train when the key is absent


def _number(meta: dict, key: str, path: Path, default=None, integer: bool = False):
    """A numeric metadata value (`default` where absent): a string, an array or a bool where a number belongs
    is a broken file, said in one line."""
    value = meta.get(key, default)
    kinds = (int,) if integer else (int, float)
    if value is not None and (isinstance(value, bool) or not isinstance(value, kinds)):
        raise OpenLPUError(f"{path}: GGUF metadata {key} = {value!r} is not {'an integer' if integer else 'a number'}; "
                           "the file is broken, re-convert it with a current llama.cpp")
    return value


def _per_layer_values(meta: dict, arch: str, path: Path) -> dict:
    """`meta` with each per-layer array (PER_LAYER_KEYS) replaced by its value, the same in every layer."""
    meta, layers = dict(meta), meta.get(f"{arch}.block_count")
    for key in (f"{arch}.{suffix}" for suffix in PER_LAYER_KEYS):
        values = meta.get(key)
        if not isinstance(values, list):
            continue
        broken = "the file is broken, re-convert it with a current llama.cpp"
        if not all(type(v) is int for v in values):
            raise OpenLPUError(f"{path}: GGUF metadata {key} holds values that are not whole numbers; {broken}")
        if not values or layers is not None and len(values) != layers:  # a missing block_count is reported below
            raise OpenLPUError(f"{path}: GGUF metadata {key} holds {len(values)} values for {layers} layers; {broken}")
        if len(set(values)) > 1:
            raise OpenLPUError(f"{path}: GGUF metadata {key} differs between layers ({values}): per-layer values are "
                               "not supported (OpenLPU's models have one for every layer); use another model")
        meta[key] = values[0]
    return meta


GGUF_ROPE_SCALINGS = ("linear", "yarn")  # rope.scaling.type values read (Llama 3.1's comes as a rope_freqs tensor)


def _rope_scaling(meta: dict, arch: str, path: Path, defaults: ArchDefaults) -> RopeScaling | None:
    kind = meta.get(f"{arch}.rope.scaling.type", "none")
    factor = float(_number(meta, f"{arch}.rope.scaling.factor", path, 1.0))
    if kind == "none" or factor == 1.0:
        return None
    if kind not in GGUF_ROPE_SCALINGS:
        raise OpenLPUError(f"{path}: GGUF metadata {arch}.rope.scaling.type = {kind!r} (factor {factor}) is not "
                           f"supported (supported: {', '.join(GGUF_ROPE_SCALINGS)}, none); use a model without it")
    layer_kinds = ("global",) if defaults.swa_rope_unscaled else LAYER_KINDS
    if kind == "linear":
        return RopeScaling(factor=factor, kind="linear", layer_kinds=layer_kinds)
    key = f"{arch}.rope.scaling.original_context_length"
    if key not in meta:
        raise OpenLPUError(f"{path}: GGUF metadata lacks {key} for its yarn rope scaling; re-convert the "
                           "model with a current llama.cpp")
    # beta defaults 32 and 1: llama.cpp's yarn_beta_fast / yarn_beta_slow, as transformers' yarn rope
    return RopeScaling(factor=factor, original_context_length=_number(meta, key, path, integer=True), kind="yarn",
                       beta_fast=float(_number(meta, f"{arch}.rope.scaling.yarn_beta_fast", path, 32.0)),
                       beta_slow=float(_number(meta, f"{arch}.rope.scaling.yarn_beta_slow", path, 1.0)),
                       truncate=defaults.yarn_truncate, layer_kinds=layer_kinds)


def _rope_factors(header: GGUFHeader, scaling: RopeScaling | None) -> RopeScaling:
    """llama.cpp's rope_freqs tensor: the divisor of each rotated pair's frequency, which its converter
    computes from Llama 3.1's rope scaling (a file holds it instead of that scaling's parameters)."""
    if scaling is not None:
        raise OpenLPUError(f"{header.path}: holds both {scaling.kind} rope scaling metadata and a rope_freqs tensor; "
                           "re-convert the model with a current llama.cpp")
    stored = header.tensors[ROPE_FREQS].ggml_type
    if stored not in ("F32", "F16"):  # llama.cpp's converter writes F32: a quantized one is a broken file
        raise OpenLPUError(f"{header.path}: tensor {ROPE_FREQS} is {stored}, not F32 or F16; re-convert the model "
                           "with a current llama.cpp")
    factors = load_tensor(header, ROPE_FREQS).reshape(-1)
    return RopeScaling(factor=float(factors.max(initial=0.0)), original_context_length=0, kind="factors",
                       factors=tuple(float(f) for f in factors))


def _fixed_metadata(meta: dict, arch: str, defaults: ArchDefaults, path: Path) -> None:
    """Refuse metadata whose value ModelSpec cannot express for this architecture (ArchDefaults.fixed_metadata)."""
    for suffix, (value, absent, why) in defaults.fixed_metadata.items():
        key = f"{arch}.{suffix}"
        if key not in meta and absent is None:
            raise OpenLPUError(f"{path}: GGUF metadata lacks {key}; the file is incomplete, re-convert it with a "
                               "current llama.cpp")
        if meta.get(key, absent) != value:
            raise OpenLPUError(f"{path}: GGUF metadata {key} = {meta.get(key, absent)} is not supported for "
                               f"{arch} (only {value}): {why}")


def _moe_layers(meta: dict, arch: str, defaults: ArchDefaults, path: Path) -> dict:
    """ModelSpec's moe_layer_step and dense_d_ff where the architecture interleaves MoE and dense layers."""
    if not defaults.moe_step_key:
        return {}
    key = f"{arch}.{defaults.moe_step_key}"
    dense_key = f"{arch}.feed_forward_length"
    step = _number(meta, key, path, integer=True)
    if step is None or (step > 1 and dense_key not in meta):
        raise OpenLPUError(f"{path}: GGUF metadata lacks {key if step is None else dense_key}; the file is "
                           "incomplete, re-convert it with a current llama.cpp")
    if step < 1:
        raise OpenLPUError(f"{path}: GGUF metadata {key} = {step}; it must be a positive integer")
    return {"moe_layer_step": step, "dense_d_ff": _number(meta, dense_key, path, integer=True) if step > 1 else 0}


def _chunked_layers(meta: dict, arch: str, defaults: ArchDefaults, values: dict, path: Path) -> dict:
    """ModelSpec fields of an architecture with chunked and NoPE global layers (ArchDefaults.chunk_period)."""
    if not defaults.chunk_period:
        return {}
    _fixed_metadata(meta, arch, defaults, path)
    if meta.get(f"{arch}.attention.sliding_window") == 0:
        raise OpenLPUError(f"{path}: GGUF metadata {arch}.attention.sliding_window = 0 (no chunked attention, rope on "
                           f"every layer: MobileLLM-R1) is not supported for {arch}; use a model with chunked layers")
    if values.get("n_experts", 0) == 0:
        raise OpenLPUError(f"{path}: GGUF metadata {arch}.expert_count is 0 or absent; llama.cpp's {arch} needs "
                           "experts (a dense model, e.g. MobileLLM-R1, is not supported)")
    swa_base = _number(meta, f"{arch}.rope.freq_base_swa", path)
    if swa_base is not None and float(swa_base) != float(values["rope_base"]):
        raise OpenLPUError(f"{path}: GGUF metadata {arch}.rope.freq_base_swa = {swa_base} differs from "
                           f"{arch}.rope.freq_base; ModelSpec's chunked layers use the one rope base")
    period = defaults.chunk_period
    return {"layer_kinds": tuple("global" if (i + 1) % period == 0 else "chunked" for i in range(values["n_layers"])),
            "attention_chunk": defaults.attention_chunk, "nope_global": True,
            "attn_temperature_floor": defaults.attn_temperature_floor,
            "attn_temperature_scale": defaults.attn_temperature_scale}


SPLIT_NAME = re.compile(r"^(?P<stem>.+)-(?P<no>\d{5})-of-(?P<count>\d{5})\.gguf$", re.IGNORECASE)  # llama.cpp's


def _shards(header: GGUFHeader) -> list[GGUFHeader]:
    """The headers of a model split over several files (llama.cpp's gguf-split: split.count shards named
    NAME-0000k-of-0000N.gguf, each listing its own tensors), given the first; [header] for a whole file."""
    count = _number(header.metadata, "split.count", header.path, 1, integer=True)
    if count <= 1:
        return [header]
    number = _number(header.metadata, "split.no", header.path, 0, integer=True)
    named = SPLIT_NAME.match(header.path.name)
    if number != 0 or named is None:
        first = f"{named['stem']}-00001-of-{named['count']}{header.path.suffix}" if named else "its first shard"
        raise OpenLPUError(f"{header.path} is shard {number + 1} of {count} of a split GGUF model; give {first}")
    out = [header]
    for k in range(2, count + 1):
        sibling = header.path.with_name(f"{named['stem']}-{k:05d}-of-{named['count']}{header.path.suffix}")
        if not sibling.is_file():
            raise OpenLPUError(f"{header.path} is shard 1 of {count} of a split GGUF model, but {sibling.name} is not "
                               f"beside it; put every shard in one folder")
        out.append(read_header(sibling))
    return out


def spec_from_gguf(path: str | Path) -> ModelSpec:
    """The ModelSpec of a GGUF model from its metadata (no weight is read; a rope_freqs tensor, llama.cpp's
    form of Llama 3.1's rope scaling, is part of the spec)."""
    header = _header(path)
    tensors = {name: shard for shard in _shards(header) for name in shard.tensors}  # -> the shard holding it
    meta, arch = header.metadata, header.architecture
    if not arch:
        raise OpenLPUError(f"{header.path}: GGUF metadata lacks general.architecture; the file is incomplete, "
                           f"re-convert it with a current llama.cpp")
    if arch not in ARCHITECTURES:
        raise OpenLPUError(f"{header.path}: architecture {arch!r} is not supported; supported: "
                           f"{', '.join(ARCHITECTURES)}")
    defaults = ARCHITECTURES[arch]
    meta = _per_layer_values(meta, arch, header.path)
    keys = METADATA_KEYS | {"d_ff": defaults.d_ff_key}
    values = {f: _number(meta, f"{arch}.{k}", header.path) for f, k in keys.items() if f"{arch}.{k}" in meta}
    missing = [f"{arch}.{keys[f]}" for f in REQUIRED_FIELDS if f not in values]

    if missing:
        raise OpenLPUError(f"{header.path}: GGUF metadata lacks {', '.join(missing)}; "
                           "the file is incomplete, re-convert it with a current llama.cpp")
    # the defaults and the query scale below divide by them and count layers with them
    for f in (f for f in ("d_model", "n_heads", "n_layers", "head_dim") if f in values):
        v, most = values[f], MAX_LAYERS if f == "n_layers" else MAX_SIZE
        if isinstance(v, bool) or not isinstance(v, int) or not 0 < v <= most:
            raise OpenLPUError(f"{header.path}: GGUF metadata {arch}.{keys[f]} = {v!r} is not a positive integer of "
                               f"at most {most:,}; the file is broken, re-convert it with a current llama.cpp")
    if "vocab_size" not in values:  # llama.cpp: the token list's length
        if not meta.get("tokenizer.ggml.tokens"):
            raise OpenLPUError(f"{header.path}: the file carries no vocabulary (no tokenizer.ggml.tokens, no "
                               f"{arch}.vocab_size); give a GGUF file with its tokenizer, as llama.cpp's converter "
                               "writes it")
        values["vocab_size"] = len(meta["tokenizer.ggml.tokens"])
    if defaults.sliding_window_required and f"{arch}.{METADATA_KEYS['sliding_window']}" not in meta:
        raise OpenLPUError(f"{header.path}: GGUF metadata lacks {arch}.{METADATA_KEYS['sliding_window']}, which "
                           f"llama.cpp requires for {arch}; the file is incomplete, re-convert it with a current "
                           "llama.cpp")
    values.setdefault("n_kv_heads", values["n_heads"])
    values.setdefault("head_dim", values["d_model"] // values["n_heads"])
    value_length = _number(meta, f"{arch}.attention.value_length", header.path)
    if value_length is not None and value_length != values["head_dim"]:
        raise OpenLPUError(f"{header.path}: GGUF metadata {arch}.attention.value_length = {value_length} differs from "
                           f"its key_length {values['head_dim']}; ModelSpec's values are as wide as its keys")
    values.setdefault("rope_base", LLAMA_CPP_ROPE_BASE_DEFAULT)
    values.setdefault("sliding_window", defaults.sliding_window_default)
    if defaults.softcap_defaults:
        values.setdefault("attn_logit_softcap", defaults.softcap_defaults[0])
        values.setdefault("final_logit_softcap", defaults.softcap_defaults[1])
    n_layers, moe = values["n_layers"], values.get("n_experts", 0) > 0
    if defaults.swa_period and values["sliding_window"]:
        values["layer_kinds"] = tuple("local" if i % defaults.swa_period < defaults.swa_period - 1
                                      else "global" for i in range(n_layers))
    else:
        values["sliding_window"] = None
    values |= _chunked_layers(meta, arch, defaults, values, header.path)
    values |= _moe_layers(meta, arch, defaults, header.path)
    if defaults.explicit_query_scale:
        per_head = (values["d_model"] // values["n_heads"]
                    if n_layers == defaults.query_scale_from_d_model_layers else values["head_dim"])
        values["query_scale"] = 1.0 / per_head ** 0.5
    for f in ("norm_eps", "rope_base", "attn_logit_softcap", "final_logit_softcap"):
        if f in values:  # float32 in the file; round to what the writer meant (1e-06, not 9.99e-07)
            values[f] = float(f"{values[f]:.7g}")
    name = str(meta.get("general.name") or header.path.stem).strip().lower().replace(" ", "-")
    rope_scaling = _rope_scaling(meta, arch, header.path, defaults)
    if ROPE_FREQS in tensors:
        rope_scaling = _rope_factors(tensors[ROPE_FREQS], rope_scaling)
    fields = dict(
        name=name,
        family=(defaults.family_if_moe if moe and defaults.family_if_moe else defaults.family),
        activation=defaults.activation,
        rope_base_local=defaults.rope_base_local,
        rope_scaling=rope_scaling,
        norm_weight_offset=defaults.norm_weight_offset,
        post_norms=defaults.post_norms,
        qk_norm=defaults.qk_norm,
        qkv_bias=defaults.qkv_bias,
        attn_output_bias=defaults.attn_output_bias,
        attn_sinks=defaults.attn_sinks,
        moe_bias=defaults.moe_bias,
        router=defaults.router,
        shared_expert=defaults.shared_expert,
        qk_l2_norm=defaults.qk_l2_norm and values.get("n_experts") != defaults.no_qk_l2_norm_experts,
        embed_scale=values["d_model"] ** 0.5 if defaults.embed_scale_sqrt_d_model else 1.0,
        tie_embeddings="output.weight" not in tensors,
        source=f"GGUF metadata of {header.path.name} (arch {arch}); llama.cpp per-architecture "
               "defaults (src/llama-model.cpp) for what the metadata does not carry",
        extra={"gguf_file_type": meta.get("general.file_type"), "gguf_path": str(header.path)},
        **values,
    )
    spec = spec_or_refusal(fields, f"{header.path}: ", {f: f"{arch}.{k}" for f, k in keys.items()},
                           "the file is broken, re-convert it with a current llama.cpp")
    if spec.rope_scaling is None:  # else the window its config.json gives (yarn: original x factor), once checked
        return spec
    return replace(spec, context_length=spec.rope_scaling.served_context(spec.context_length))


# ---- tensor data ----------------------------------------------------------------------------
def raw_tensor(header_or_path: GGUFHeader | str | Path, name: str) -> tuple[str, np.ndarray]:
    """(ggml type name, the tensor's bytes as uint8 rows of quant blocks), read-only, zero-copy.

    Rows are the innermost GGUF dimension (torch's last); each row is a whole number of blocks
    of GGML_QUANT_SIZES[type] = (elements per block, bytes per block). Gemma norm weights are
    stored with llama.cpp's +1 shift (load_weights removes it; this does not).
    """
    header = _header(header_or_path)
    info = header.tensors.get(name)
    if info is None:
        raise OpenLPUError(f"{header.path}: no tensor named {name!r}")
    data = np.memmap(header.path, dtype=np.uint8, mode="r", offset=info.offset_bytes,
                     shape=(info.nbytes,))
    rows = int(np.prod(info.shape[:-1], dtype=np.int64))
    return info.ggml_type, data.reshape(rows, info.nbytes // max(rows, 1))


def load_tensor(header_or_path: GGUFHeader | str | Path, name: str) -> np.ndarray:
    """One tensor dequantized to float32, in torch shape, exactly as stored in the file."""
    header = _header(header_or_path)
    ggml_type, blocks = raw_tensor(header, name)
    if ggml_type not in SUPPORTED_TENSOR_TYPES:
        raise OpenLPUError(f"{header.path}: tensor {name!r} has type {ggml_type}, which OpenLPU "
                           f"cannot dequantize (supported: {', '.join(SUPPORTED_TENSOR_TYPES)})")
    values = dequantize(np.asarray(blocks), GGMLQuantizationType[ggml_type])
    if not values.flags.writeable:  # F32 comes back as a view of the read-only file map
        values = values.copy()
    return values.astype(np.float32, copy=False).reshape(header.tensors[name].shape)


# ---- group codes ------------------------------------------------------------------------------
# Block types whose values are code * scale + min per group of 32 inputs, with 4- or 5-bit
# unsigned codes: the runtime's CPU kernels multiply them as stored. Layouts as ggml defines them
# (ggml-common.h): fp16 d (and m or dmin) first; `qs` nibbles, byte j holding inputs j and j + 16
# of a 32-group (Q4_0/1, Q5_0/1), or inputs l and l + 32 of a 64-chunk (K types); `qh` fifth bits.
def _fp16(blocks: np.ndarray, at: int) -> np.ndarray:
    return blocks[:, at:at + 2].copy().view(np.float16)[:, 0].astype(np.float32)


def _split_nibbles(qs: np.ndarray) -> np.ndarray:
    """[B, 16] bytes -> [B, 32] codes: low nibbles first, then high."""
    return np.concatenate([qs & 15, qs >> 4], 1)


def _bits_little(qh: np.ndarray) -> np.ndarray:
    """[B, n] bytes -> [B, 8n] bits, bit j of the little-endian word first."""
    return np.unpackbits(qh, axis=1, bitorder="little")


def _k_scales(packed: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Q4_K/Q5_K: 12 bytes -> 8 six-bit scales and 8 six-bit mins per 256-block."""
    scale, low = np.empty((len(packed), 8), np.float32), np.empty((len(packed), 8), np.float32)
    scale[:, :4], low[:, :4] = packed[:, 0:4] & 63, packed[:, 4:8] & 63
    scale[:, 4:] = (packed[:, 8:12] & 15) | (packed[:, 0:4] >> 6) << 4
    low[:, 4:] = (packed[:, 8:12] >> 4) | (packed[:, 4:8] >> 6) << 4
    return scale, low


def _k_codes(qs: np.ndarray, fifth: np.ndarray | None) -> np.ndarray:
    """K types: [B, 128] nibble bytes (+ [B, 32] qh) -> [B, 256] codes in input order."""
    chunks = qs.reshape(-1, 4, 1, 32)
    codes = np.concatenate([chunks & 15, chunks >> 4], 2)  # [B, chunk, low or high, l]
    if fifth is not None:  # bit 2i of qh[l] belongs to chunk i's low half, 2i + 1 to its high
        bits = np.unpackbits(fifth[:, :, None], axis=2, bitorder="little")  # [B, l, bit]
        codes = codes | bits.transpose(0, 2, 1).reshape(-1, 4, 2, 32) << 4
    return codes.reshape(-1, 256)


def _q4_0(b):
    d = _fp16(b, 0)
    return 4, _split_nibbles(b[:, 2:18]), d[:, None], -8 * d[:, None]


def _q4_1(b):
    return 4, _split_nibbles(b[:, 4:20]), _fp16(b, 0)[:, None], _fp16(b, 2)[:, None]


def _q5_0(b):
    d = _fp16(b, 0)
    return 5, _split_nibbles(b[:, 6:22]) | _bits_little(b[:, 2:6]) << 4, d[:, None], -16 * d[:, None]


def _q5_1(b):
    return 5, _split_nibbles(b[:, 8:24]) | _bits_little(b[:, 4:8]) << 4, _fp16(b, 0)[:, None], _fp16(b, 2)[:, None]


def _q4_k(b):
    scale, low = _k_scales(b[:, 4:16])
    return 4, _k_codes(b[:, 16:144], None), _fp16(b, 0)[:, None] * scale, -_fp16(b, 2)[:, None] * low


def _q5_k(b):
    scale, low = _k_scales(b[:, 4:16])
    return 5, _k_codes(b[:, 48:176], b[:, 16:48]), _fp16(b, 0)[:, None] * scale, -_fp16(b, 2)[:, None] * low


GROUP_CODE_TYPES = {"Q4_0": _q4_0, "Q4_1": _q4_1, "Q5_0": _q5_0, "Q5_1": _q5_1, "Q4_K": _q4_k, "Q5_K": _q5_k}


def group_codes(header_or_path: GGUFHeader | str | Path, name: str):
    """(bits, uint8 codes [rows, K], float32 scale and min [rows, K/32]) with value = code * scale
    + min, exactly the stored values; None for a type that is not group codes (Q6_K, Q8_0, F32...)."""
    header = _header(header_or_path)
    ggml_type, blocks = raw_tensor(header, name)
    if ggml_type not in GROUP_CODE_TYPES:
        return None
    rows, k = blocks.shape[0], header.tensors[name].shape[-1]
    _, block_bytes = GGML_QUANT_SIZES[GGMLQuantizationType[ggml_type]]
    bits, codes, scale, low = GROUP_CODE_TYPES[ggml_type](np.asarray(blocks).reshape(-1, block_bytes))
    return bits, codes.astype(np.uint8).reshape(rows, k), scale.reshape(rows, -1), low.reshape(rows, -1)


def check_weights_readable(header: GGUFHeader) -> None:
    """Refuse, saying why, a file whose architecture's tensors the runtime cannot read, or a model split over
    several files (the runtime reads one)."""
    if (count := header.metadata.get("split.count", 1)) != 1:
        raise OpenLPUError(f"{header.path} is one of {count} shards of a split GGUF model; `openlpu run` and `serve` "
                           f"read a whole file: merge them with llama.cpp's `llama-gguf-split --merge FIRST-SHARD "
                           f"OUT.gguf` (`plan` and `compile` read the shards as they are)")
    arch = ARCHITECTURES.get(header.architecture)
    if arch and arch.weights_unreadable:
        raise OpenLPUError(f"{header.path}: cannot run {header.architecture} weights from GGUF: "
                           f"{arch.weights_unreadable}")


def check_tensors(header: GGUFHeader, spec: ModelSpec) -> None:
    """Refuse a file whose tensors are not exactly spec.tensor_shapes() (and perhaps rope_freqs, which the spec holds
    as its rope scaling), or whose architecture's tensors the runtime cannot read. A tensor the spec has no place
    for (llama.cpp's optional biases, say) is another model's, which running without it would misrepresent."""
    check_weights_readable(header)
    expected = spec.tensor_shapes()
    problems = [f"missing {n}" for n in expected if n not in header.tensors]
    problems += [f"unexpected {n}" for n in header.tensors if n not in expected and n != ROPE_FREQS]
    problems += [f"{n} has shape {header.tensors[n].shape}, expected {s}"
                 for n, s in expected.items()
                 if n in header.tensors and header.tensors[n].shape != tuple(s)]
    if problems:
        more = f" (+{len(problems) - 3} more)" if len(problems) > 3 else ""
        raise OpenLPUError(f"{header.path} does not match model {spec.name!r}: "
                           f"{'; '.join(problems[:3])}{more}")


def load_weights(path: str | Path, spec: ModelSpec) -> dict[str, "torch.Tensor"]:
    """Every weight of `spec` as float32 torch tensors, in the spec's conventions.

    The file must hold exactly spec.tensor_shapes() (and may hold rope_freqs, which the spec holds as its
    rope scaling); llama.cpp's +1 on Gemma norm weights is removed so that norms compute
    x * (spec.norm_weight_offset + w) as in the reference model.
    """
    import torch

    header = _header(path)
    check_tensors(header, spec)
    expected = spec.tensor_shapes()
    shift = ARCHITECTURES.get(header.architecture, ArchDefaults(family="")).stored_norm_shift
    weights = {}
    for name in expected:
        array = load_tensor(header, name)
        if shift and name.endswith("norm.weight"):
            array -= shift
        weights[name] = torch.from_numpy(array)
    return weights
