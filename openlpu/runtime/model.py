"""One decoder-only transformer for every family ModelSpec describes, driven by the spec's flags.

Llama / Mistral (SwiGLU, llama3 rope scaling), Mixtral (top-k MoE), Qwen 2 (qkv bias), Qwen 3
(q/k norm), Gemma 2 (post norms, attention and final logit softcaps, sliding window on alternate
layers) and Gemma 3 (q/k norm, 5 local : 1 global layers with their own rope base, linear rope
scaling on the global layers only, scaled embedding, tied head), gpt-oss (attention sinks, biased
projections and experts, a clamped SwiGLU, yarn rope scaling) and Llama 4 (chunked attention, NoPE
global layers with temperature-scaled queries, weightless q/k norm after rope, a sigmoid router
scaling the experts' inputs, a shared expert) are all the same code path; the spec's flags pick each
difference.

Weights dict layout (what `Model(spec, weights)` expects, keyed by llama.cpp GGUF tensor names,
torch (out, in) shapes, as openlpu.models.gguf.load_weights returns them):
  - norm weights in the Hugging Face convention: the norm multiplies by
    (spec.norm_weight_offset + w), i.e. (1 + w) for Gemma (load_weights removes the +1 that
    llama.cpp's converter bakes into Gemma GGUF files);
  - attn_q / attn_k rows in the GGUF order. For the llama-family rope (ROPE_STYLE "interleaved")
    llama.cpp's converter permutes Hugging Face's rows so that rope rotates adjacent pairs; use
    `hf_qk_to_gguf` to bring HF q/k weights into this layout. NEOX-style families (Gemma, Qwen)
    rotate the two halves of each head and are stored unpermuted.

Two weight paths: precision "float32" is the reference; "bf16", "int8" and "int4" store the
matrices in low precision (kernels.Linear) and stay within the tolerance stated in
tests/test_model.py of the reference.

The forward pass takes a flattened batch: the new tokens of several sequences back to back,
each run described by a Span. Matrix products run once over all tokens; attention runs per span
against that sequence's slot of the KV cache (or only within the span when no cache is given).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Mapping

import numpy as np
import torch
import torch.nn.functional as F

from openlpu.errors import OpenLPUError
from openlpu.models.spec import ModelSpec, RopeScaling
from openlpu.runtime.kernels import CODE_BITS, GroupCodes, Linear
from openlpu.runtime.kv_cache import KVCache, ring_positions

# How rope pairs the features of a head: "neox" rotates x[i] with x[i + head_dim/2];
# "interleaved" rotates x[2i] with x[2i+1] (llama.cpp's LLAMA_ROPE_TYPE_NORM on permuted rows).
ROPE_STYLE = {"llama": "interleaved", "mistral": "interleaved", "mixtral": "interleaved",
              "qwen2": "neox", "qwen3": "neox", "qwen3-moe": "neox", "gemma": "neox", "gemma2": "neox", "gemma3": "neox",
              "gpt-oss": "neox", "llama4": "interleaved"}

SWIGLU_LIMIT, SWIGLU_ALPHA = 7.0, 1.702  # gpt-oss's clamped SwiGLU (transformers GptOssExperts)


def _clamped_swiglu(gate: torch.Tensor, up: torch.Tensor) -> torch.Tensor:
    gate, up = gate.clamp(max=SWIGLU_LIMIT), up.clamp(-SWIGLU_LIMIT, SWIGLU_LIMIT)
    return gate * torch.sigmoid(SWIGLU_ALPHA * gate) * (up + 1)


# activation -> the gated MLP's elementwise step, (gate, up) -> hidden
GLUS = {"silu": lambda gate, up: F.silu(gate) * up,
        "gelu_tanh": lambda gate, up: F.gelu(gate, approximate="tanh") * up,
        "swiglu_clamped": _clamped_swiglu}

# precision -> (format of the transformer-block matrices, format of the output head)
PRECISIONS = {
    "float32": ("float32", "float32"),
    "bf16": ("bf16", "bf16"),
    "int8": ("int8", "int8"),
    # The file's own 4- and 5-bit codes (int8 for other types), and a 4-bit head: the 262k-row
    # head is most of the bytes per token.
    "int4": ("codes", "int4"),
    # The file's own codes with an 8-bit head, as near as these kernels come to running the file as written
    # (the embedded Gemma's head is Q8_0): what llama.cpp reads, for a like-for-like comparison.
    "gguf": ("codes", "int8"),
}
RESCORE_CANDIDATES = 64  # low-bit head: top logits recomputed in float32 (see Head)


def hf_qk_to_gguf(weight: torch.Tensor, n_heads: int) -> torch.Tensor:
    """Hugging Face q/k projection rows -> GGUF order for interleaved rope (llama.cpp's permute).

    For k pass n_kv_heads. Inside each head, HF's halves [a0..a(n-1), b0..b(n-1)] become pairs
    [a0, b0, a1, b1, ...] so that rotating adjacent pairs equals HF's rotate-half rope.
    """
    rows = weight.shape[0]
    return (weight.reshape(n_heads, 2, rows // n_heads // 2, *weight.shape[1:])
            .transpose(1, 2).reshape(weight.shape))


def rope_inverse_frequencies(head_dim: int, base: float, scaling: RopeScaling | None = None) -> torch.Tensor:
    """Angle per position of each rotated pair, float32 [head_dim / 2], with `scaling` applied (yarn's attention
    factor is in ModelSpec.attn_scale)."""
    inv = 1.0 / base ** (torch.arange(0, head_dim, 2, dtype=torch.float64) / head_dim)
    if scaling is not None:
        inv = ROPE_SCALERS[scaling.kind](inv, scaling, head_dim, base)
    return inv.float()


def _per_pair_factors(inv: torch.Tensor, rs: RopeScaling, dim: int, base: float) -> torch.Tensor:
    """llama.cpp's rope_freqs: each pair's frequency divided by its factor."""
    return inv / torch.tensor(rs.factors, dtype=torch.float64)


def _linear(inv: torch.Tensor, rs: RopeScaling, dim: int, base: float) -> torch.Tensor:
    """Positions divided by the factor: every pair turns factor times slower."""
    return inv / rs.factor


def _yarn(inv: torch.Tensor, rs: RopeScaling, dim: int, base: float) -> torch.Tensor:
    """YaRN: interpolate the pairs that turn fewer than beta_slow times over the original context, keep those
    turning more than beta_fast times, ramp between."""

    def pair_turning(turns: float) -> float:  # the pair index that turns `turns` times
        return dim * math.log(rs.original_context_length / (turns * 2 * math.pi)) / (2 * math.log(base))

    low, high = pair_turning(rs.beta_fast), pair_turning(rs.beta_slow)
    if rs.truncate:
        low, high = math.floor(low), math.ceil(high)
    low, high = max(low, 0), min(high, dim - 1)
    ramp = ((torch.arange(dim // 2, dtype=torch.float64) - low) / max(high - low, 1e-3)).clamp(0, 1)
    return inv / rs.factor * ramp + inv * (1 - ramp)


def _llama3(inv: torch.Tensor, rs: RopeScaling, dim: int, base: float) -> torch.Tensor:
    """Llama 3.1: slow down low frequencies, keep high ones, blend between."""
    wavelen = 2 * math.pi / inv
    low_wavelen = rs.original_context_length / rs.low_freq_factor
    high_wavelen = rs.original_context_length / rs.high_freq_factor
    smooth = ((rs.original_context_length / wavelen - rs.low_freq_factor)
              / (rs.high_freq_factor - rs.low_freq_factor)).clamp(0, 1)
    blended = (1 - smooth) * inv / rs.factor + smooth * inv
    return torch.where(wavelen < high_wavelen, inv, torch.where(wavelen > low_wavelen, inv / rs.factor, blended))


# RopeScaling kind -> (float64 inverse frequencies, scaling, head_dim, base) -> the scaled ones
ROPE_SCALERS = {"factors": _per_pair_factors, "linear": _linear, "yarn": _yarn, "llama3": _llama3}


def layer_rope_frequencies(spec: ModelSpec) -> dict[tuple[float, RopeScaling | None], torch.Tensor]:
    """rope_inverse_frequencies of each rope the model's layers turn with (ModelSpec.layer_rope; NoPE layers none),
    once for the layers that share it."""
    ropes = {spec.layer_rope(i) for i in range(spec.n_layers) if spec.layer_uses_rope(i)}
    return {rope: rope_inverse_frequencies(spec.head_dim, *rope) for rope in ropes}


# ---- the math every runner shares (Model here, the Program executor's per-op kernels) --------
def rope_tables(positions: torch.Tensor, inv_freq: torch.Tensor, style: str):
    """(cos, signed sin) [tokens, 1, head_dim], laid out like the features they rotate, so that
    rope(x) = x * cos + rope_partner(x) * sin."""
    angles = positions[:, None].float() * inv_freq
    half = inv_freq.numel()
    if style == "neox":
        angles = torch.cat([angles, angles], -1)
        sign = torch.cat([-torch.ones(half), torch.ones(half)])
    else:
        angles = angles.repeat_interleave(2, -1)
        sign = torch.tensor([-1.0, 1.0]).repeat(half)
    return angles.cos()[:, None], (angles.sin() * sign.to(angles.device))[:, None]


def rope_partner(x: torch.Tensor, style: str) -> torch.Tensor:
    """The feature each feature rotates with: x[i + hd/2] for "neox", its neighbour for
    "interleaved" (the sign of the rotation is in rope_tables' sin)."""
    if style == "neox":
        return x.roll(x.shape[-1] // 2, -1)
    return x.unflatten(-1, (-1, 2)).flip(-1).flatten(-2)


def apply_rope(x: torch.Tensor, tables, style: str) -> torch.Tensor:
    cos, sin = tables
    return torch.addcmul(x * cos, rope_partner(x, style), sin)


@dataclass(frozen=True)
class Span:
    """The new tokens of one sequence inside a flattened batch."""

    slot: int  # KV cache slot (unused without a cache)
    start_pos: int  # position of the first new token = tokens already cached for the slot
    n_tokens: int


@dataclass
class AttentionPlan:
    """Where one span reads and writes one kind of layer's cache (shared by those layers)."""

    rows: slice  # the span's rows in the flattened batch
    slot: int
    write_first: bool  # write new K/V into the cache, then attend over the cache slice
    n_keys: int  # cache entries attended (write_first) or old entries kept before the new ones
    write_index: torch.Tensor | None  # cache indices receiving the last len() new tokens
    mask: torch.Tensor | None  # bool [n, keys]; None: every key visible


def visible_keys(q_pos: torch.Tensor, k_pos: torch.Tensor, window: int | None, chunk: int | None) -> torch.Tensor:
    """bool [queries, keys]: a query at q sees a written key at p <= q, within its window (q - p < window)
    or its own chunk (p // chunk == q // chunk)."""
    visible = (k_pos >= 0) & (k_pos <= q_pos[:, None])
    if window is not None:
        visible &= q_pos[:, None] - k_pos < window
    if chunk is not None:
        visible &= k_pos // chunk == q_pos[:, None] // chunk
    return visible


def cache_group(spec: ModelSpec, layer: int, capacity: int) -> tuple[int, int | None, int | None]:
    """(positions kept, window, chunk) of a layer in a cache of `capacity` positions: layers with the same
    share attention plans."""
    return spec.layer_positions(layer, capacity), spec.layer_window(layer), spec.layer_chunk(layer)


def attention_plans(spans: list[Span], lengths: list[int] | None, capacity: int, window: int | None,
                    chunk: int | None = None, device=None) -> list[AttentionPlan]:
    """Per span, for layers keeping `capacity` positions: what to write, what to attend.

    `lengths`: the cache's tokens per slot (None: no cache, each span attends only to itself).
    A span's queries may see keys at positions p with p <= q, within the window or the chunk. The ring
    of a sliding-window layer holds the last `capacity` positions; new keys are written
    before attending unless writing them would evict keys an earlier query of the same span
    still needs (a long prefill into a ring), in which case old and new keys are joined.
    """
    plans, row = [], 0
    for sp in spans:
        n, start = sp.n_tokens, sp.start_pos
        write_index = None
        if lengths is None:
            write_first, n_keys = False, 0
            k_pos = torch.arange(start, start + n, device=device)
        else:
            if lengths[sp.slot] != start:
                raise ValueError(f"span starts at {start} but slot {sp.slot} holds "
                                 f"{lengths[sp.slot]} positions")
            write_first = n == 1 or start + n <= capacity
            keep = min(n, capacity)
            write_index = torch.arange(start + n - keep, start + n, device=device) % capacity
            if write_first:
                # one new token of a chunked layer sees its chunk's keys: ring slots 0 .. start mod chunk
                n_keys = start % chunk + 1 if chunk and n == 1 else min(start + n, capacity)
                k_pos = None if n == 1 else ring_positions(start + n, capacity, device)[:n_keys]
            else:
                n_keys = min(start, capacity)
                k_pos = torch.cat([ring_positions(start, capacity, device)[:n_keys],
                                   torch.arange(start, start + n, device=device)])
        mask = None
        if n > 1:  # one new token sees every key it is given: the ring holds only its window (or chunk)
            visible = visible_keys(torch.arange(start, start + n, device=device), k_pos, window, chunk)
            mask = None if bool(visible.all()) else visible
        plans.append(AttentionPlan(slice(row, row + n), sp.slot, write_first, n_keys, write_index, mask))
        row += n
    return plans


@dataclass(frozen=True)
class Partial:
    """Attention over some of the keys: the softmax-weighted values over those keys [n, heads * hd] and
    each query head's log-sum-exp of its scores [n, heads] (-inf where it saw none of them)."""
    out: torch.Tensor
    lse: torch.Tensor


def attend(spec: ModelSpec, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, plan: AttentionPlan,
           k_cache: torch.Tensor | None = None, v_cache: torch.Tensor | None = None,
           with_lse: bool = False) -> torch.Tensor | Partial:
    """One span's attention: queries [n, heads, hd] over its visible keys -> [n, heads * hd] (with_lse:
    a Partial that also holds each head's log-sum-exp, for attention sinks).

    k, v: the span's new keys and values [n, kv heads, hd]; k_cache, v_cache: its slot of this
    layer's cache [kv heads, capacity, hd] (None: no cache). Heads are spec's (a chip's share)."""
    n = q.shape[0]
    if k_cache is not None and n == 1 and not spec.attn_logit_softcap and not with_lse:  # decode: views
        k_cache.index_copy_(1, plan.write_index, k.transpose(0, 1))
        v_cache.index_copy_(1, plan.write_index, v.transpose(0, 1))
        keys, values = k_cache[:, :plan.n_keys].unsqueeze(0), v_cache[:, :plan.n_keys].unsqueeze(0)
        out = F.scaled_dot_product_attention(q.view(1, -1, 1, q.shape[-1]), keys, values,
                                             scale=spec.attn_scale, enable_gqa=True)
        return out.view(1, -1)
    k, v = k.transpose(0, 1), v.transpose(0, 1)  # [kv heads, n, hd]
    if k_cache is not None:
        if not plan.write_first:  # join before writing: the write evicts keys still needed
            k = torch.cat([k_cache[:, :plan.n_keys], k], 1)
            v = torch.cat([v_cache[:, :plan.n_keys], v], 1)
        keep = plan.write_index.numel()
        k_cache.index_copy_(1, plan.write_index, k[:, -keep:])
        v_cache.index_copy_(1, plan.write_index, v[:, -keep:])
        if plan.write_first:
            k, v = k_cache[:, :plan.n_keys], v_cache[:, :plan.n_keys]
    q, k, v = q.transpose(0, 1)[None], k[None], v[None]  # [1, heads, n or keys, hd]
    lse = None
    if spec.attn_logit_softcap or with_lse:
        group = spec.n_heads // spec.n_kv_heads
        k, v = k.repeat_interleave(group, 1), v.repeat_interleave(group, 1)
        scores = (q @ k.transpose(-1, -2)) * spec.attn_scale
        if spec.attn_logit_softcap:
            scores = torch.tanh(scores / spec.attn_logit_softcap) * spec.attn_logit_softcap
        if plan.mask is not None:
            scores = scores.masked_fill(~plan.mask, float("-inf"))
        if with_lse:
            lse = torch.logsumexp(scores, -1)  # every query sees at least its own key
            out = torch.exp(scores - lse[..., None]) @ v
        else:
            out = scores.softmax(-1) @ v
    else:
        out = F.scaled_dot_product_attention(q, k, v, attn_mask=plan.mask, scale=spec.attn_scale,
                                             enable_gqa=True)
    out = out[0].transpose(0, 1).reshape(n, -1)
    return out if lse is None else Partial(out, lse[0].transpose(0, 1))


def apply_sinks(attention: Partial, sinks: torch.Tensor) -> torch.Tensor:
    """gpt-oss: each head's sink logit joins its softmax with no value, so the head's output shrinks to
    Z / (Z + e^sink) of itself, Z = e^lse: a factor sigmoid(lse - sink). sinks: [heads] (a chip's)."""
    n, heads = attention.lse.shape
    factor = torch.sigmoid(attention.lse - sinks).nan_to_num(0.0)  # a head that saw no key keeps 0
    return (attention.out.view(n, heads, -1) * factor[..., None]).reshape(n, -1)


def attend_slots(spec: ModelSpec, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, start: int, ring: int,
                 lo: int, hi: int, k_own: torch.Tensor, v_own: torch.Tensor, window: int | None,
                 chunk: int | None = None) -> Partial:
    """One span's attention over the keys in slots [lo, hi) of a ring of `ring` slots (position p in slot
    p mod ring): the slots' cached keys (k_own, v_own [kv heads, hi - lo, hd], written before `start`)
    and the span's new keys that land there, which it then writes. Queries [n, heads, hd] at positions
    start.. see keys at positions p <= q within the window or chunk. Parts over all slots merge (merge_partials)
    to attend()'s result."""
    n = q.shape[0]
    new_pos = torch.arange(start, start + n)
    mine = (new_pos % ring >= lo) & (new_pos % ring < hi)
    old_pos = ring_positions(start, ring)[lo:hi]
    written = old_pos >= 0  # slots never written are never read
    keys = torch.cat([k_own[:, written], k[mine].transpose(0, 1)], 1)  # [kv heads, keys, hd]
    values = torch.cat([v_own[:, written], v[mine].transpose(0, 1)], 1)
    key_pos = torch.cat([old_pos[written], new_pos[mine]])
    visible = visible_keys(new_pos, key_pos, window, chunk)
    group = spec.n_heads // spec.n_kv_heads
    keys, values = keys.repeat_interleave(group, 0), values.repeat_interleave(group, 0)
    scores = (q.transpose(0, 1) @ keys.transpose(-1, -2)) * spec.attn_scale  # [heads, n, keys]
    if spec.attn_logit_softcap:
        scores = torch.tanh(scores / spec.attn_logit_softcap) * spec.attn_logit_softcap
    scores = scores.masked_fill(~visible, float("-inf"))
    lse = torch.logsumexp(scores, -1)
    out = (torch.exp(scores - lse[..., None]).nan_to_num(0.0) @ values).transpose(0, 1).reshape(n, -1)
    kept = new_pos[-min(n, ring):]  # a span longer than the ring leaves only its last ring keys
    kept = kept[(kept % ring >= lo) & (kept % ring < hi)]
    k_own.index_copy_(1, kept % ring - lo, k[kept - start].transpose(0, 1))
    v_own.index_copy_(1, kept % ring - lo, v[kept - start].transpose(0, 1))
    return Partial(out, lse.transpose(0, 1))


def merge_partials(a: Partial, b: Partial) -> Partial:
    """Attention over the keys of both: each side's values reweighted by its share of the softmax mass."""
    lse = torch.logaddexp(a.lse, b.lse)
    n, heads = lse.shape
    wa, wb = (torch.exp(x.lse - lse).nan_to_num(0.0)[..., None] for x in (a, b))  # 0 where neither saw a key
    out = a.out.view(n, heads, -1) * wa + b.out.view(n, heads, -1) * wb
    return Partial(out.reshape(n, -1), lse)


def query_temperature(spec: ModelSpec, positions: torch.Tensor) -> torch.Tensor:
    """Llama 4's NoPE layers scale the query at position p by 1 + scale * ln(1 + floor((p + 1) / floor))
    (attention temperature tuning: transformers Llama4TextAttention)."""
    return 1.0 + spec.attn_temperature_scale * torch.log1p(((positions + 1) // spec.attn_temperature_floor).float())


@dataclass
class RMSNorm:
    """x * w / sqrt(mean(x^2) + eps) over the last axis of a float32 x. Written as
    x / hypot(|x|, sqrt(d * eps)) * (w * sqrt(d)): three CPU kernels where F.rms_norm runs six
    (5 vs 9 us per call at decode size on this 2-core machine), the same value to float32 rounding."""

    scaled_weight: torch.Tensor  # w * sqrt(d)
    floor: torch.Tensor  # sqrt(d * eps), 0-dim

    @classmethod
    def build(cls, weight: torch.Tensor, eps: float) -> "RMSNorm":
        d = weight.shape[-1]
        return cls(weight * math.sqrt(d), torch.tensor(math.sqrt(d * eps), device=weight.device))

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        return self._unit(x).mul_(self.scaled_weight)

    def add_to(self, residual: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
        """residual + norm(x), one kernel fewer than the two apart."""
        return torch.addcmul(residual, self._unit(x), self.scaled_weight)

    def _unit(self, x: torch.Tensor) -> torch.Tensor:
        return torch.div(x, torch.hypot(torch.linalg.vector_norm(x, dim=-1, keepdim=True), self.floor))


def weightless_norm(spec: ModelSpec, device=None) -> RMSNorm:
    """Llama 4's q/k norm: RMS over each head, no weight (transformers Llama4TextWeightlessRMSNorm)."""
    return RMSNorm.build(torch.ones(spec.head_dim, device=device), spec.norm_eps)


def top_candidates(logits: torch.Tensor, k: int, block: int = 128) -> torch.Tensor:
    """Indices [rows, k] of each row's k largest logits, in no order. Exact: the k largest lie in
    the k blocks with the largest maxima, so one pass of block maxima and two small top-k's
    replace a top-k over the whole vocabulary (4x cheaper over 262k entries)."""
    rows, vocab = logits.shape
    if vocab % block or vocab // block <= k:
        return logits.topk(min(k, vocab), -1, sorted=False).indices
    blocks = logits.view(rows, -1, block).amax(-1).topk(k, -1, sorted=False).indices
    candidates = (blocks[:, :, None] * block + torch.arange(block, device=logits.device)).view(rows, -1)
    best = logits.gather(1, candidates).topk(k, -1, sorted=False).indices
    return candidates.gather(1, best)


@dataclass
class _Block:
    attn_norm: RMSNorm
    qkv: Linear  # q, k and v projections fused: one product per layer
    qk_norm: RMSNorm | None  # per head, weight [n_heads + n_kv_heads, head_dim]: q's, then k's
    attn_output: Linear
    sinks: torch.Tensor | None  # gpt-oss: a logit per query head that joins each softmax
    post_attention_norm: RMSNorm | None
    ffn_norm: RMSNorm
    gate_up: Linear | None  # dense: gate and up fused
    down: Linear | None
    router: Linear | None  # MoE
    experts: list[tuple[Linear, Linear]] | None  # MoE: (gate_up, down) per expert
    shared_expert: tuple[Linear, Linear] | None  # Llama 4: (gate_up, down) every token goes through
    post_ffw_norm: RMSNorm | None
    rope: tuple[float, RopeScaling | None] | None  # ModelSpec.layer_rope; None: a NoPE layer (Llama 4's global ones)
    qk_l2_norm: RMSNorm | None  # Llama 4: a weightless norm on each q and k head after rope
    cache_group: tuple[int, int | None, int | None]  # (cache capacity, window, chunk): layers sharing masks
    decode: object | None = None  # the whole block for one cached token in C++ (see _decode_layer)


@dataclass
class Pass:
    """What every layer of one forward pass shares: positions, rope tables per layer rope, plans per cache group."""

    spans: list[Span]
    positions: torch.Tensor
    rope: dict[tuple[float, RopeScaling | None], tuple[torch.Tensor, torch.Tensor]]
    plans: dict[tuple[int, int | None, int | None], list[AttentionPlan]]


class Head:
    """Logits x @ rows.T in `fmt`. A low-bit head recomputes each row's top candidates in float32 from
    the exact rows, so greedy choices and top-k/top-p sets match the reference; the tail keeps the
    format's error. `rows`: a float tensor or a row source (GGUFRows)."""

    def __init__(self, rows, fmt: str, device: torch.device | None = None):
        self.linear = Linear.build(rows, fmt, device=device)
        self.exact_rows = None if self.linear.fmt == "float32" else rows

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        # on OpenLPU's kernels whatever the rows (the sequences sampling): dense, it would be dequantized whole for
        # the call (Gemma 3's: 671 MB in float32)
        logits = self.linear(x, dense_from_rows=math.inf).float()
        if self.exact_rows is not None and len(x):  # no rows: a batch of prompt chunks, none sampling yet
            candidates = top_candidates(logits, RESCORE_CANDIDATES)
            rows = self.exact_rows[candidates.flatten().cpu()].to(x.device)
            exact = (rows.view(*candidates.shape, -1) @ x[:, :, None]).squeeze(-1)
            logits.scatter_(1, candidates, exact)
        return logits


class Model:
    def __init__(self, spec: ModelSpec, weights: Mapping[str, torch.Tensor],
                 precision: str = "float32", device: str | torch.device | None = None,
                 max_positions: int | None = None):
        if precision not in PRECISIONS:
            raise OpenLPUError(f"unknown precision {precision!r}; use one of {', '.join(PRECISIONS)}")
        self.spec, self.precision = spec, precision
        self.device = torch.device(device or "cpu")
        self.max_positions = max_positions or spec.context_length
        self.rope_style = ROPE_STYLE[spec.family]
        self.glu = GLUS[spec.activation]
        block_fmt, head_fmt = PRECISIONS[precision]
        s, dev = spec, self.device

        def w(name: str) -> torch.Tensor:
            return weights[name].to(dev, torch.float32)

        def norm(name: str) -> RMSNorm:
            return RMSNorm.build(w(name) + s.norm_weight_offset, s.norm_eps)

        codes_of = getattr(weights, "codes", lambda name: None)

        shapes = s.tensor_shapes()

        def linear(names: list[str], fmt: str = block_fmt) -> Linear:
            biases = [n.replace(".weight", ".bias") for n in names]
            bias = torch.cat([w(n) for n in biases]) if biases[0] in shapes else None
            if fmt == "codes":
                parts = [codes_of(n) for n in names]
                if all(parts):
                    return Linear.build(GroupCodes.cat(parts), fmt, bias, dev)
                fmt = "int8"  # some part is not stored as group codes
            return Linear.build(torch.cat([w(n) for n in names]), fmt, bias)

        self.blocks: list[_Block] = []
        for i in range(s.n_layers):
            b = f"blk.{i}."
            qk_norm = RMSNorm.build(torch.cat([w(b + "attn_q_norm.weight").expand(s.n_heads, -1),
                                               w(b + "attn_k_norm.weight").expand(s.n_kv_heads, -1)])
                                    + s.norm_weight_offset, s.norm_eps) if s.qk_norm else None
            experts = shared = None
            if s.shared_expert and s.is_moe_layer(i):
                shared = (linear([b + "ffn_gate_shexp.weight", b + "ffn_up_shexp.weight"]),
                          linear([b + "ffn_down_shexp.weight"]))
            if s.is_moe_layer(i):
                gates, ups, downs = (w(b + f"ffn_{p}_exps.weight") for p in ("gate", "up", "down"))
                gate_b, up_b, down_b = ((w(b + f"ffn_{p}_exps.bias") if s.moe_bias else [None] * s.n_experts)
                                        for p in ("gate", "up", "down"))
                expert_fmt = "int8" if block_fmt == "codes" else block_fmt  # experts come as floats
                experts = [(Linear.build(torch.cat([gates[e], ups[e]]), expert_fmt,
                                         None if gate_b[e] is None else torch.cat([gate_b[e], up_b[e]])),
                            Linear.build(downs[e], expert_fmt, down_b[e])) for e in range(s.n_experts)]
            self.blocks.append(_Block(
                attn_norm=norm(b + "attn_norm.weight"),
                qkv=linear([b + "attn_q.weight", b + "attn_k.weight", b + "attn_v.weight"]),
                qk_norm=qk_norm,
                attn_output=linear([b + "attn_output.weight"]),
                sinks=w(b + "attn_sinks.weight") if s.attn_sinks else None,
                post_attention_norm=norm(b + "post_attention_norm.weight") if s.post_norms else None,
                ffn_norm=norm(b + "ffn_norm.weight"),
                gate_up=None if s.is_moe_layer(i) else linear([b + "ffn_gate.weight", b + "ffn_up.weight"]),
                down=None if s.is_moe_layer(i) else linear([b + "ffn_down.weight"]),
                router=linear([b + "ffn_gate_inp.weight"], "float32") if s.is_moe_layer(i) else None,
                experts=experts,
                shared_expert=shared,
                post_ffw_norm=norm(b + "post_ffw_norm.weight") if s.post_norms else None,
                rope=s.layer_rope(i) if s.layer_uses_rope(i) else None,
                qk_l2_norm=weightless_norm(s, dev) if s.qk_l2_norm and s.layer_uses_rope(i) else None,
                cache_group=cache_group(s, i, self.max_positions),
            ))
        self.output_norm = norm("output_norm.weight")
        # Embedding and head matrices come as row sources: float32 tensors, or GGUFRows that
        # dequantize rows from the memory-mapped file on demand (exact, and no resident copy).
        rows_of = getattr(weights, "rows", w)
        self.embedding = rows_of("token_embd.weight")
        head_rows = self.embedding if s.tie_embeddings else rows_of("output.weight")
        self.head = Head(head_rows, head_fmt, dev)
        if self.head.linear.fmt == "float32":
            self.embedding = self.head.linear.weight if s.tie_embeddings else self.embedding[0:s.vocab_size]
        self.inv_freq = {rope: inv.to(dev) for rope, inv in layer_rope_frequencies(s).items()}
        for blk in self.blocks:
            blk.decode = self._decode_layer(blk)

    # ---- the forward pass, top to bottom ----------------------------------------------------
    @torch.inference_mode()
    def forward(self, tokens: torch.Tensor | list[int], spans: list[Span],
                cache: KVCache | None = None,
                logit_rows: torch.Tensor | list[int] | None = None) -> torch.Tensor:
        """float32 logits [rows, vocab] for `logit_rows` of the flattened batch (default: all).

        With a cache, each span's start_pos must equal its slot's cached length; the new keys and
        values are written and the slot's length advances. Without one, each span attends only to
        itself (an uncached forward of a whole sequence).
        """
        tokens = torch.as_tensor(tokens, dtype=torch.long, device=self.device)
        ctx = self.prepare(tokens, spans, cache)
        x = self.embed(tokens)
        for layer in range(self.spec.n_layers):
            x = self.layer(layer, x, ctx, cache)
        if cache is not None:
            for sp in spans:
                cache.lengths[sp.slot] += sp.n_tokens
        return self.head_logits(x, logit_rows)

    def prepare(self, tokens: torch.Tensor, spans: list[Span], cache: KVCache | None) -> Pass:
        """Check the spans against the tokens and the cache; rope tables and attention plans."""
        if sum(sp.n_tokens for sp in spans) != tokens.numel() or not spans:
            raise ValueError("spans must cover the tokens exactly")
        for sp in spans:
            if sp.start_pos + sp.n_tokens > self.max_positions:
                raise OpenLPUError(f"sequence needs {sp.start_pos + sp.n_tokens} positions; this "
                                   f"model was loaded for {self.max_positions}")
        positions = torch.cat([torch.arange(sp.start_pos, sp.start_pos + sp.n_tokens)
                               for sp in spans]).to(self.device)
        lengths = None if cache is None else cache.lengths
        return Pass(spans, positions,
                    {rope: rope_tables(positions, inv, self.rope_style) for rope, inv in self.inv_freq.items()},
                    {group: attention_plans(spans, lengths, *group, self.device)
                     for group in {blk.cache_group for blk in self.blocks}})

    def embed(self, tokens: torch.Tensor) -> torch.Tensor:
        x = self.embedding[tokens if isinstance(self.embedding, torch.Tensor) else tokens.cpu()]
        x = x.to(self.device)
        return x * self.spec.embed_scale if self.spec.embed_scale != 1.0 else x

    def layer(self, i: int, x: torch.Tensor, ctx: Pass, cache: KVCache | None) -> torch.Tensor:
        """Transformer block i on the flattened batch x [tokens, d_model] float32."""
        blk = self.blocks[i]
        if blk.decode is not None and cache is not None and x.shape[0] == 1:  # one token, one call
            plan = ctx.plans[blk.cache_group][0]
            return blk.decode(x.contiguous(), *ctx.rope[blk.rope], *cache.slot(i, plan.slot),
                              int(plan.write_index), plan.n_keys)
        h = self._attention(i, blk, blk.attn_norm(x), ctx, cache)
        x = x + h if blk.post_attention_norm is None else blk.post_attention_norm.add_to(x, h.float())
        h = self._mlp(blk, blk.ffn_norm(x))
        return x + h if blk.post_ffw_norm is None else blk.post_ffw_norm.add_to(x, h.float())

    def head_logits(self, x: torch.Tensor, logit_rows=None) -> torch.Tensor:
        """The head: float32 logits for `logit_rows` of x (default: all rows)."""
        s = self.spec
        if logit_rows is not None:
            x = x[torch.as_tensor(logit_rows, dtype=torch.long, device=self.device)]
        logits = self.head(self.output_norm(x))
        if s.final_logit_softcap:
            logits = torch.tanh(logits / s.final_logit_softcap) * s.final_logit_softcap
        return logits

    def _attention(self, layer: int, blk: _Block, h: torch.Tensor, ctx: Pass, cache: KVCache | None):
        s = self.spec
        n_q, n_kv, hd = s.n_heads, s.n_kv_heads, s.head_dim
        qkv = blk.qkv(h).float().view(h.shape[0], n_q + 2 * n_kv, hd)
        qk, v = qkv[:, :n_q + n_kv], qkv[:, n_q + n_kv:]
        if blk.qk_norm is not None:
            qk = blk.qk_norm(qk)
        if blk.rope is not None:
            qk = apply_rope(qk, ctx.rope[blk.rope], self.rope_style)
            if blk.qk_l2_norm is not None:
                qk = blk.qk_l2_norm(qk)
        q, k = qk[:, :n_q], qk[:, n_q:]
        if blk.rope is None and s.attn_temperature_scale:
            q = q * query_temperature(s, ctx.positions)[:, None, None]
        plans = ctx.plans[blk.cache_group]

        def span(rows: slice, plan: AttentionPlan) -> torch.Tensor:
            out = attend(s, q[rows], k[rows], v[rows], plan, *self._slot_cache(cache, layer, plan.slot),
                         with_lse=blk.sinks is not None)
            return out if blk.sinks is None else apply_sinks(out, blk.sinks)
        if len(plans) == 1:  # one sequence: its rows are all the rows
            return blk.attn_output(span(slice(None), plans[0]))
        return blk.attn_output(torch.cat([span(p.rows, p) for p in plans]))

    def _decode_layer(self, blk: _Block):
        """The block in C++ (cpu_kernels.cpp's DecodeLayer), where OpenLPU's CPU kernels run all four of
        its matrices and the family needs nothing it leaves out (biases, experts, softcaps, Llama 4's NoPE layers
        and its q/k norm after rope)."""
        s, matrices = self.spec, [blk.qkv, blk.attn_output, blk.gate_up, blk.down]
        if (blk.experts is not None or s.attn_logit_softcap or s.activation not in ("gelu_tanh", "silu")
                or blk.rope is None or blk.qk_l2_norm is not None
                or any(m.kernels is None or m.bias is not None for m in matrices)):
            return None
        kernels, none = matrices[0].kernels, torch.empty(0)

        def matrix(lin: Linear):
            return kernels.Matrix(lin.weight, lin.scale if lin.fmt == "int8" else none, CODE_BITS.get(lin.fmt, 8),
                                  lin.padding)

        def norm(n: RMSNorm | None):
            return kernels.Norm(none, 0.0) if n is None else kernels.Norm(n.scaled_weight, float(n.floor) ** 2)

        return kernels.DecodeLayer(s.n_heads, s.n_kv_heads, s.head_dim, s.attn_scale, self.rope_style == "neox",
                                   s.activation == "gelu_tanh", [matrix(m) for m in matrices],
                                   [norm(n) for n in (blk.attn_norm, blk.post_attention_norm, blk.ffn_norm,
                                                      blk.post_ffw_norm, blk.qk_norm)],
                                   blk.qk_norm is not None, blk.post_attention_norm is not None)

    @staticmethod
    def _slot_cache(cache: KVCache | None, layer: int, slot: int):
        return (None, None) if cache is None else cache.slot(layer, slot)

    def _glu_mlp(self, gate_up: Linear, down: Linear, h: torch.Tensor) -> torch.Tensor:
        gate, up = gate_up(h).chunk(2, -1)
        return down(self.glu(gate, up)).float()

    def _mlp(self, blk: _Block, h: torch.Tensor) -> torch.Tensor:
        if blk.experts is None:
            return self._glu_mlp(blk.gate_up, blk.down, h)
        # each token goes to its top-k experts, weighted by the router (ROUTERS in spec.py)
        top_logits, top_experts = blk.router(h).topk(self.spec.n_experts_per_token, -1)
        scales_input = self.spec.router == "sigmoid_input"
        top_weights = top_logits.sigmoid() if scales_input else top_logits.softmax(-1)
        out = torch.zeros_like(h) if blk.shared_expert is None else self._glu_mlp(*blk.shared_expert, h)
        for e in top_experts.unique().tolist():
            rows, rank = (top_experts == e).nonzero(as_tuple=True)
            weight = top_weights[rows, rank, None]
            if scales_input:
                out.index_add_(0, rows, self._glu_mlp(*blk.experts[e], h[rows] * weight))
            else:
                out.index_add_(0, rows, self._glu_mlp(*blk.experts[e], h[rows]) * weight)
        return out

    # ---- conveniences -----------------------------------------------------------------------
    def logits(self, token_ids: list[int]) -> torch.Tensor:
        """Uncached logits at every position of one sequence: [len, vocab]."""
        return self.forward(token_ids, [Span(0, 0, len(token_ids))])

    def nbytes(self) -> int:
        """Bytes of weights held in memory (a GGUF-backed embedding stays in the file map)."""
        linears = [self.head.linear] + [lin for blk in self.blocks for lin in
                                 [blk.qkv, blk.attn_output, blk.gate_up, blk.down, blk.router]
                                 + [m for pair in (blk.experts or []) + [blk.shared_expert or ()] for m in pair]
                                 if lin]
        total = sum(lin.nbytes() for lin in linears)
        if isinstance(self.embedding, torch.Tensor) and self.embedding is not self.head.linear.weight:
            total += self.embedding.numel() * self.embedding.element_size()
        return total


class GGUFRows:
    """Rows of one GGUF matrix as float32, dequantized from the memory-mapped file on access."""

    def __init__(self, header, name: str):
        from openlpu.models import gguf

        self.ggml_type, self.blocks = gguf.raw_tensor(header, name)
        self.qtype = gguf.GGMLQuantizationType[self.ggml_type]
        self.shape = header.tensors[name].shape
        self._dequantize = gguf.dequantize

    def __getitem__(self, index) -> torch.Tensor:
        if isinstance(index, torch.Tensor):
            index = index.numpy()
        values = self._dequantize(np.asarray(self.blocks[index]), self.qtype)
        return torch.from_numpy(np.array(values, dtype=np.float32).reshape(-1, self.shape[-1]))


class GGUFWeights(Mapping):
    """The weights of a GGUF file in Model's layout, dequantized one tensor at a time on access.

    Model converts each tensor as it reads it, so a low-precision model never holds every
    float32 tensor at once (peak memory ~ the largest tensor, the embedding, not the sum).
    """

    def __init__(self, path, spec: ModelSpec):
        from openlpu.models import gguf

        self._gguf, self.spec = gguf, spec
        self.header = gguf.read_header(path)
        gguf.check_tensors(self.header, spec)  # at load, all of them: a tensor nothing reads is refused too
        self.shapes = spec.tensor_shapes()
        arch = gguf.ARCHITECTURES.get(self.header.architecture)
        self.norm_shift = arch.stored_norm_shift if arch else 0.0

    def _check(self, name: str) -> None:
        if name not in self.shapes:
            raise OpenLPUError(f"model {self.spec.name!r} has no tensor {name}")

    def __getitem__(self, name: str) -> torch.Tensor:
        self._check(name)
        array = self._gguf.load_tensor(self.header, name)
        if self.norm_shift and name.endswith("norm.weight"):
            array -= self.norm_shift  # back to the HF convention Model expects
        return torch.from_numpy(array)

    def rows(self, name: str) -> GGUFRows:
        self._check(name)
        return GGUFRows(self.header, name)

    def codes(self, name: str) -> GroupCodes | None:
        """The tensor's stored 4- or 5-bit codes, or None if its type is not group codes."""
        self._check(name)
        found = self._gguf.group_codes(self.header, name)
        return None if found is None else GroupCodes(found[0], *map(torch.from_numpy, found[1:]))

    def __iter__(self):
        return iter(self.shapes)

    def __len__(self) -> int:
        return len(self.shapes)


def load_model(path, precision: str = "int8", device=None, max_positions: int | None = None,
               spec: ModelSpec | None = None) -> Model:
    """A Model from a GGUF file (spec read from its metadata unless given)."""
    from openlpu.models.gguf import spec_from_gguf

    spec = spec or spec_from_gguf(path)
    return Model(spec, GGUFWeights(path, spec), precision, device, max_positions)
