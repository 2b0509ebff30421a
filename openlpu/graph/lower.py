"""Lowering a ModelSpec to op rows: one prefill pass or one decode step, for any supported family.

Counts follow the shapes: a matmul (M, N, K) does 2*M*N*K flops and reads N*K weights. Decode
attends to the cached tokens (capped by the sliding window on local layers, its own chunk's on chunked
ones); prefill is causal, so query i attends to min(i + 1, window) keys (i mod chunk + 1 when chunked).
MoE reads the router plus the experts the tokens pick (expected distinct experts over M tokens choosing
top-k uniformly), and a shared expert (Llama 4) like a dense MLP; its down projection's partial sum goes
into the experts' down projection, so the MLP ends in one all-reduce.
"""

from __future__ import annotations

import difflib
from dataclasses import dataclass

from openlpu.errors import OpenLPUError, check_count
from openlpu.graph.ops import Op
from openlpu.models.spec import ModelSpec

PHASES = ("prefill", "decode")


@dataclass(frozen=True)
class Precision:
    name: str
    bytes_per_element: float


# fp4 is NVIDIA's NVFP4: 4-bit E2M1 values with an FP8 (E4M3) scale per block of 16, so 4.5 bits per element
# (NVIDIA technical blog "Introducing NVFP4 for Efficient and Accurate Low-Precision Inference", Jun 2025).
# int4 counts its 4 bits alone: the scales of a group-wise format (AWQ's fp16 one per 128 weights: 3% more;
# GGUF's Q4_K: 12.5%) are left out.
PRECISIONS = {p.name: p for p in (
    Precision("fp32", 4), Precision("fp16", 2), Precision("bf16", 2),
    Precision("fp8", 1), Precision("int8", 1), Precision("int4", 0.5), Precision("fp4", 4.5 / 8))}

# flops per element of the vector ops (order of magnitude of the real arithmetic; they are small)
NORM_FLOPS_PER_ELEMENT = 4  # square, sum, scale, multiply by weight
ROPE_FLOPS_PER_ELEMENT = 3
SOFTMAX_FLOPS_PER_ELEMENT = 5  # max, subtract, exp, sum, divide
GATED_ACT_FLOPS_PER_ELEMENT = 8  # gelu-tanh / silu plus the multiply by "up"
SOFTCAP_FLOPS_PER_ELEMENT = 3  # divide, tanh, multiply
SINK_FLOPS_PER_ELEMENT = 2  # the per-head factor (an exp and a reciprocal, shared by the head) and a multiply


def serving_precision(weights: Precision | str) -> str:
    """The precision of the KV cache and the activations beside weights in `weights`: theirs, but never below
    8 bits (int8 beside integer weights, else fp8). No serving stack keeps a 4-bit KV cache by default:
    NVIDIA's NVFP4 checkpoints keep it in FP8 (TensorRT-LLM docs, "Quantization": an NVFP4 KV cache needs its
    own offline ModelOpt pass), and weight-only int4 (AWQ, GPTQ) leaves it and the activations at 16 bits, or
    8 with a KV option."""
    w = as_precision(weights)
    if w.bytes_per_element >= 1:
        return w.name
    return "int8" if w.name.startswith("int") else "fp8"


def as_precision(p: Precision | str) -> Precision:
    if isinstance(p, Precision):
        return p
    if p not in PRECISIONS:
        close = difflib.get_close_matches(str(p).lower(), PRECISIONS, n=1)
        hint = f"; did you mean {close[0]!r}?" if close else ""
        raise OpenLPUError(f"unknown precision {p!r}{hint} (supported: {', '.join(PRECISIONS)})")
    return PRECISIONS[p]


def expected_distinct_experts(n_experts: int, top_k: int, tokens: int) -> float:
    """Experts touched by `tokens` tokens each choosing top_k of n_experts uniformly at random."""
    return n_experts * (1.0 - (1.0 - top_k / n_experts) ** tokens)


def _causal_pairs(n: int, window: int | None) -> float:
    """(query, key) pairs of positions 0..n-1 attending causally, each to at most `window` keys."""
    w = min(window or n, n)
    return w * (w + 1) / 2 + (n - w) * w


def _chunked_pairs(n: int, chunk: int) -> float:
    """(query, key) pairs of positions 0..n-1, each query seeing the positions of its own chunk up to itself."""
    whole, rest = divmod(n, chunk)
    return whole * chunk * (chunk + 1) / 2 + rest * (rest + 1) / 2


def attended_keys(seq_len: int, window: int | None, phase: str, past_len: int = 0, chunk: int | None = None) -> float:
    """Total (query, key) pairs per sequence for one layer: a decode token sees seq_len cached keys (those
    of its own chunk on a chunked layer); prefill queries at positions past_len.. past_len+seq_len-1 see
    the keys before them."""
    if chunk:
        if phase == "decode":
            return float((seq_len - 1) % chunk + 1)
        return _chunked_pairs(past_len + seq_len, chunk) - _chunked_pairs(past_len, chunk)
    if phase == "decode":
        return float(min(seq_len, window) if window else seq_len)
    return _causal_pairs(past_len + seq_len, window) - _causal_pairs(past_len, window)


def keys_in_slots(phase: str, past_len: int, tokens: int, ring: int, lo: int, hi: int,
                  chunked: bool = False) -> tuple[float, float, float]:
    """(query-key pairs, cached keys read, new keys written) of one sequence whose keys lie in slots
    [lo, hi) of a layer's KV ring of `ring` slots (position p in slot p mod ring; ring = the context, the
    sliding window if shorter, or a `chunked` layer's attention chunk). Prefill: `tokens` queries after
    `past_len` cached positions, query q seeing slots 0..q until the ring is full, then every slot (on a
    chunked layer, slots 0..q mod ring: its chunk so far, the cached keys read those of its chunk before the
    prompt's). Decode: a query attending `past_len` keys (attended_keys), which fill the ring from slot 0
    (a chunked layer's chunk starts there), and writing one key, which lands in any of their slots."""
    width = hi - lo
    if phase == "decode":
        filled = min(past_len, ring)
        seen = min(max(filled - lo, 0), width)
        return float(seen), float(seen), seen / filled

    def seen(x: int) -> float:  # sum over queries with 1..x visible positions of the keys they see in range
        if x <= lo:
            return 0.0
        if x <= hi:
            return (x - lo) * (x - lo + 1) / 2
        return width * (width + 1) / 2 + (x - hi) * width

    def hits(x: int) -> int:  # positions 0..x-1 whose slot is in range
        return x // ring * width + min(max(x % ring - lo, 0), width)

    kept_from = past_len + tokens - min(tokens, ring)  # a long prefill into a ring keeps its last ring keys
    written = float(hits(past_len + tokens) - hits(kept_from))
    if chunked:  # query q sees q mod ring + 1 slots
        def chunked_seen(x: int) -> float:  # over queries 0..x-1
            return x // ring * seen(ring) + seen(x % ring)
        pairs = chunked_seen(past_len + tokens) - chunked_seen(past_len)
        return pairs, float(hits(past_len) - hits(past_len - past_len % ring)), written
    full_ring_queries = max(0, past_len + tokens - max(past_len, ring))  # each sees every slot
    pairs = seen(min(past_len + tokens, ring)) - seen(min(past_len, ring)) + full_ring_queries * width
    cached = hits(past_len) - hits(max(0, past_len - ring))
    return pairs, float(cached), written


class _Builder:
    """Appends op rows; bytes in the phase's precisions."""

    def __init__(self, wb: float, ab: float, kb: float, name_prefix: str = ""):
        self.wb, self.ab, self.kb, self.name_prefix = wb, ab, kb, name_prefix
        self.ops: list[Op] = []

    def add(self, name, kind, layer, unit, shape, flops, *, weight=None, weight_elems=0.0, act_in=0.0,
            act_out=0.0, kv_read=0.0, kv_write=0.0, inputs=()) -> str:
        name = self.name_prefix + name  # inputs are names add() returned, prefixed already
        self.ops.append(Op(name=name, kind=kind, layer=layer, unit=unit, shape=tuple(int(s) for s in shape),
                           flops=float(flops), weight_bytes=weight_elems * self.wb,
                           kv_read_bytes=kv_read * self.kb, kv_write_bytes=kv_write * self.kb,
                           act_read_bytes=act_in * self.ab, act_write_bytes=act_out * self.ab,
                           weight=weight, inputs=tuple(inputs)))
        return name

    def matmul(self, name, layer, m, n, k, weight, inputs, kind="matmul", weight_rows=None, extra_weight=0,
               act_out=None):
        """y = x W^T for M tokens; reads weight_rows (default n) rows of K plus extra_weight elements and
        writes act_out elements (default M x N)."""
        rows = n if weight_rows is None else weight_rows
        return self.add(name, kind, layer, "matrix", (m, n, k), 2 * m * n * k, weight=weight,
                        weight_elems=rows * k + extra_weight, act_in=m * k,
                        act_out=m * n if act_out is None else act_out, inputs=inputs)

    def vector(self, name, kind, layer, elems, flops_per_elem, inputs, weight=None, weight_elems=0, reads=1):
        return self.add(name, kind, layer, "vector", (elems,), elems * flops_per_elem, weight=weight,
                        weight_elems=weight_elems, act_in=reads * elems, act_out=elems, inputs=inputs)


def _attention_block(b: _Builder, spec: ModelSpec, i: int, x: str, m: int, batch: int, seq_len: int,
                     phase: str, past_len: int, queries: int) -> str:
    p, d = f"blk.{i}.", spec.d_model
    norm = b.vector(p + "attn_norm", "norm", i, m * d, NORM_FLOPS_PER_ELEMENT, (x,),
                    weight=p + "attn_norm.weight", weight_elems=d)
    bias = spec.qkv_bias
    q = b.matmul(p + "attn_q", i, m, spec.q_dim, d, p + "attn_q.weight", (norm,), extra_weight=spec.q_dim * bias)
    k = b.matmul(p + "attn_k", i, m, spec.kv_dim, d, p + "attn_k.weight", (norm,), extra_weight=spec.kv_dim * bias)
    v = b.matmul(p + "attn_v", i, m, spec.kv_dim, d, p + "attn_v.weight", (norm,), extra_weight=spec.kv_dim * bias)
    if spec.qk_norm:
        q = b.vector(p + "attn_q_norm", "norm", i, m * spec.q_dim, NORM_FLOPS_PER_ELEMENT, (q,),
                     weight=p + "attn_q_norm.weight", weight_elems=spec.head_dim)
        k = b.vector(p + "attn_k_norm", "norm", i, m * spec.kv_dim, NORM_FLOPS_PER_ELEMENT, (k,),
                     weight=p + "attn_k_norm.weight", weight_elems=spec.head_dim)
    qk_elems = m * (spec.q_dim + spec.kv_dim)
    if spec.layer_uses_rope(i):
        rope = b.vector(p + "rope", "rope", i, qk_elems, ROPE_FLOPS_PER_ELEMENT, (q, k))
        if spec.qk_l2_norm:
            rope = b.vector(p + "attn_qk_l2_norm", "norm", i, qk_elems, NORM_FLOPS_PER_ELEMENT, (rope,))
    else:  # NoPE: no rotation; the queries scaled by their position's temperature (if tuned)
        rope = b.add(p + "attn_temperature", "rope", i, "vector", (m * spec.q_dim,),
                     m * spec.q_dim * bool(spec.attn_temperature_scale), act_in=qk_elems, act_out=qk_elems,
                     inputs=(q, k))
    window, chunk = spec.layer_window(i), spec.layer_chunk(i)
    # keys read back from the KV cache: a decode step's whole ring (its schedule serves every position up to
    # seq_len), a prompt chunk's past, or, on a chunked layer, the past inside its own attention chunk
    cached = batch * (past_len % chunk if chunk and phase == "prefill" else
                      spec.layer_positions(i, seq_len if phase == "decode" else past_len))
    # (query, key) pairs, all sequences; a decode step's queries all stream past the same cached keys: on a
    # chunked layer, its whole ring, as they are read (sim.gpu.gpu_decode_ops counts a GPU's at the position)
    keys = cached / batch if chunk and phase == "decode" else attended_keys(seq_len, window, phase, past_len, chunk)
    pairs = batch * queries * keys
    scores = pairs * spec.n_heads
    att_inputs = (rope, v)
    if spec.attn_logit_softcap:  # it caps the scores inside attention, which never leave it: q and k pass through
        cap = b.add(p + "attn_softcap", "softcap", i, "vector", (scores,), scores * SOFTCAP_FLOPS_PER_ELEMENT,
                    act_in=qk_elems, act_out=qk_elems, inputs=(rope,))
        att_inputs = (cap, v)
    att = b.add(p + "attention", "attention", i, "matrix", (m, spec.n_heads, spec.head_dim),
                4 * pairs * spec.q_dim + SOFTMAX_FLOPS_PER_ELEMENT * scores,
                act_in=m * (spec.q_dim + 2 * spec.kv_dim), act_out=m * spec.q_dim,
                kv_read=2 * cached * spec.kv_dim, kv_write=2 * m * spec.kv_dim, inputs=att_inputs)
    if spec.attn_sinks:  # each head's output shrinks by the sink's share: o / (1 + exp(sink - log-sum-exp))
        att = b.vector(p + "attn_sinks", "sink", i, m * spec.q_dim, SINK_FLOPS_PER_ELEMENT, (att,),
                       weight=p + "attn_sinks.weight", weight_elems=spec.n_heads)
    out = b.matmul(p + "attn_output", i, m, d, spec.q_dim, p + "attn_output.weight", (att,))
    if spec.attn_output_bias:  # added once to the summed (all-reduced) projection
        out = b.vector(p + "attn_output_bias", "bias", i, m * d, 1, (out,), weight=p + "attn_output.bias",
                       weight_elems=d)
    if spec.post_norms:
        out = b.vector(p + "post_attention_norm", "norm", i, m * d, NORM_FLOPS_PER_ELEMENT, (out,),
                       weight=p + "post_attention_norm.weight", weight_elems=d)
    return b.vector(p + "attn_residual", "residual", i, m * d, 1, (x, out), reads=2)


def _mlp_block(b: _Builder, spec: ModelSpec, i: int, x: str, m: int) -> str:
    p, d, ff = f"blk.{i}.", spec.d_model, spec.layer_d_ff(i)
    norm = b.vector(p + "ffn_norm", "norm", i, m * d, NORM_FLOPS_PER_ELEMENT, (x,),
                    weight=p + "ffn_norm.weight", weight_elems=d)
    if spec.is_moe_layer(i):
        e, k = spec.n_experts, spec.n_experts_per_token
        bias = spec.moe_bias
        router = b.matmul(p + "ffn_gate_inp", i, m, e, d, p + "ffn_gate_inp.weight", (norm,), kind="moe_router",
                          extra_weight=e * bias)
        rows = expected_distinct_experts(e, k, m) * ff  # weight rows read, over the experts touched
        gate = b.matmul(p + "ffn_gate_exps", i, m * k, ff, d, p + "ffn_gate_exps.weight", (norm, router),
                        weight_rows=rows, extra_weight=rows * bias)
        up = b.matmul(p + "ffn_up_exps", i, m * k, ff, d, p + "ffn_up_exps.weight", (norm, router),
                      weight_rows=rows, extra_weight=rows * bias)
        act = b.vector(p + "ffn_act", "activation", i, m * k * ff, GATED_ACT_FLOPS_PER_ELEMENT, (gate, up), reads=2)
        # each token's k expert outputs are weighted and summed as they leave the matrix unit, so the
        # result (and the TP all-reduce after it) is one d-vector per token, not k
        routed_in = (act,)
        if spec.shared_expert:  # its partial sum joins the experts' before the one all-reduce of the MLP
            s_gate = b.matmul(p + "ffn_gate_shexp", i, m, ff, d, p + "ffn_gate_shexp.weight", (norm,))
            s_up = b.matmul(p + "ffn_up_shexp", i, m, ff, d, p + "ffn_up_shexp.weight", (norm,))
            s_act = b.vector(p + "ffn_act_shexp", "activation", i, m * ff, GATED_ACT_FLOPS_PER_ELEMENT, (s_gate, s_up),
                             reads=2)
            routed_in += (b.matmul(p + "ffn_down_shexp", i, m, d, ff, p + "ffn_down_shexp.weight", (s_act,)),)
        down = b.matmul(p + "ffn_down_exps", i, m * k, d, ff, p + "ffn_down_exps.weight", routed_in,
                        weight_rows=rows * d / ff, act_out=m * d)
        if bias:  # each token's k down biases, weighted like their experts, added once to the summed result
            down = b.vector(p + "ffn_exps_bias", "bias", i, m * d, 2 * k, (down, router),
                            weight=p + "ffn_down_exps.bias", weight_elems=rows * d / ff)
    else:
        gate = b.matmul(p + "ffn_gate", i, m, ff, d, p + "ffn_gate.weight", (norm,))
        up = b.matmul(p + "ffn_up", i, m, ff, d, p + "ffn_up.weight", (norm,))
        act = b.vector(p + "ffn_act", "activation", i, m * ff, GATED_ACT_FLOPS_PER_ELEMENT, (gate, up), reads=2)
        down = b.matmul(p + "ffn_down", i, m, d, ff, p + "ffn_down.weight", (act,))
    if spec.post_norms:
        down = b.vector(p + "post_ffw_norm", "norm", i, m * d, NORM_FLOPS_PER_ELEMENT, (down,),
                        weight=p + "post_ffw_norm.weight", weight_elems=d)
    return b.vector(p + "ffn_residual", "residual", i, m * d, 1, (x, down), reads=2)


def lower(spec: ModelSpec, phase: str, seq_len: int, batch: int = 1, precision: Precision | str = "fp16",
          *, kv_precision: Precision | str | None = None, act_precision: Precision | str | None = None,
          past_len: int = 0, queries: int = 1, name_prefix: str = "") -> list[Op]:
    """Op rows of one prefill pass (batch sequences of seq_len tokens, after past_len tokens already
    in the KV cache: a chunk of a longer prompt) or one decode step (batch sequences attending to
    seq_len cached tokens, each with `queries` new tokens: one, or, when a draft model speculates, the
    last accepted token and the drafts that the step verifies, each needing its logits). Weights in
    `precision`; the KV cache and activations in their own precisions (default: the same). Every op's
    name starts with `name_prefix` (a prompt chunk's, "c1/")."""
    if phase not in PHASES:
        raise OpenLPUError(f"unknown phase {phase!r}; use one of {', '.join(PHASES)}")
    for what, v in (("seq_len", seq_len), ("batch", batch), ("queries", queries)):
        check_count(v, what)
    if check_count(past_len, "past_len", least=0) and phase == "decode":
        raise OpenLPUError(f"past_len is for prefill only; got {past_len!r} for a decode step")
    if queries > 1 and phase != "decode":
        raise OpenLPUError(f"queries is for decode steps only; got {queries} for a {phase}")
    w = as_precision(precision)
    kv = as_precision(kv_precision) if kv_precision is not None else w
    act = as_precision(act_precision) if act_precision is not None else w
    b = _Builder(w.bytes_per_element, act.bytes_per_element, kv.bytes_per_element, name_prefix)
    m = batch * seq_len if phase == "prefill" else batch * queries  # tokens computed this pass
    d = spec.d_model
    x = b.add("token_embd", "embed", -1, "memory", (m, d), m * d, weight="token_embd.weight",
              weight_elems=m * d, act_out=m * d)  # a row gather (and the embedding scale)
    for i in range(spec.n_layers):
        x = _attention_block(b, spec, i, x, m, batch, seq_len, phase, past_len, queries)
        x = _mlp_block(b, spec, i, x, m)
    # a prefill needs logits only at each sequence's last position; a decode step at every new token
    rows = batch * (queries if phase == "decode" else 1)
    norm = b.vector("output_norm", "norm", -1, rows * d, NORM_FLOPS_PER_ELEMENT, (x,),
                    weight="output_norm.weight", weight_elems=d)
    head_w = "token_embd.weight" if spec.tie_embeddings else "output.weight"
    logits = b.matmul("output", -1, rows, spec.vocab_size, d, head_w, (norm,), kind="lm_head")
    if spec.final_logit_softcap:
        logits = b.vector("final_softcap", "softcap", -1, rows * spec.vocab_size, SOFTCAP_FLOPS_PER_ELEMENT,
                          (logits,))
    b.vector("sample", "sample", -1, rows * spec.vocab_size, 1, (logits,))
    return b.ops
