"""Execute a compiled Program: real logits from the partitioned, scheduled model.

Two modes:

- "sharded": one virtual chip per Program chip. A chip holds only the weight shards the placement
  puts on it (sliced and copied at load: nothing else is reachable), runs the ops scheduled on its
  stage in schedule order on its shard (column-split matmuls give a slice, row-split ones partial
  sums), and sees another chip's results only through the Program's transfers (an all-reduce sums
  the group's partials; each rank sends its slice of the features to the same rank of the next stage,
  whose group gathers the slices in rank order; a p2p send and broadcast move the sampler's (value,
  index) pair). An MLP cut
  between stages runs on each part's chips on the rows they hold (ops "name@j"), and the Program's
  "ffn_sum@j" ops add the parts' partial sums. An embedding or head split along the vocabulary runs
  the same way: each embedding part gathers the rows it holds ("embed_sum@j" adds them up), each head
  part computes its rows' logits and their maximum ("sample_max@j" keeps the larger), and the host
  reads the logits part by part. An attention split along its KV slots runs on each part's chips,
  whose caches hold only their slots: each part attends them (model.attend_slots) and the Program's
  "attn_merge@j" ops merge the partials. A Program compiled with draft tokens runs a user's last token
  and its drafts through the compiled decode step together, with logits for each. An op whose input
  was never produced on its chip is an error naming it. Agreement with the fused mode is the proof
  that the compiler's partition and schedule are right.
- "fused": one chip holding whole tensors (tp=1 semantics), transfers reduced to their source op;
  the fast path the Engine and the server run, with Model.forward's signature. A fusion pass walks
  the schedule: a layer (or the head) whose ops and wiring equal what the graph lowering emits for
  it runs as one model.py block in the engine's weight format (int8 blocks, int4 head...); any
  other op runs alone, as in sharded mode, its matrices in the same formats. A Program with a
  dropped or rewired op therefore computes what it says (or fails naming the missing value), never
  the right text by accident. Before running, every weight element must be placed on some chip. The
  ops of an MLP, embedding or head split between stages run alone, each on the rows its stage holds.

The math is model.py's (norms, rope, attention over the KV cache, the blocks) and kernels.py's
Linear; this module only slices weights, routes values and orders the ops.
"""

from __future__ import annotations

import dataclasses
import itertools
from dataclasses import dataclass
from typing import Callable, Mapping

import torch
import torch.nn.functional as F

from openlpu.compiler.partition import (CUT_SEPARATOR, EXPERT_ROWS, axis_length, expert_spans, is_cut_along_ffn,
                                        is_cut_along_vocab, item_of_tensor, kv_slots, split_axis)
from openlpu.compiler.program import PhaseSchedule, Program, ScheduledOp, Transfer
from openlpu.compiler.schedule import CHAINED, split_chunk
from openlpu.errors import OpenLPUError
from openlpu.graph.lower import lower
from openlpu.models.spec import ModelSpec
from openlpu.runtime.kernels import Linear
from openlpu.runtime.kv_cache import KVCache
from openlpu.runtime.model import (GLUS, PRECISIONS, ROPE_STYLE, Head, Model, Partial, RMSNorm, Span, apply_rope,
                                   apply_sinks, attend, attend_slots, attention_plans, cache_group, merge_partials,
                                   layer_rope_frequencies, query_temperature, rope_tables, weightless_norm)

MODES = ("sharded", "fused")
HEAD_OPS = ("output_norm", "output", "final_softcap", "sample")  # the head item's ops


def _is_head_op(name: str) -> bool:
    """An op of the head, or of one part of a head split along the vocabulary ('output@2', 'sample_max@1')."""
    return name.split(CUT_SEPARATOR)[0] in (*HEAD_OPS, CHAINED["head"])


def _part_index(name: str) -> int:
    """'output@2' -> 2; a name without a part (or part 0) -> 0."""
    return int(name.split(CUT_SEPARATOR)[1]) if CUT_SEPARATOR in name else 0


def _suffix(name: str) -> str:
    """'blk.3.attn_q' -> 'attn_q'; 'output' -> 'output'."""
    return name.split(".", 2)[2] if name.startswith("blk.") else name


def _layer(name: str) -> int:
    return int(name.split(".")[1]) if name.startswith("blk.") else -1


@dataclass(frozen=True)
class Routed:
    """Per-token MoE values for its top-k experts, with the routing that produced them."""
    values: torch.Tensor  # [tokens, k, features]
    experts: torch.Tensor  # [tokens, k] expert ids
    weights: torch.Tensor  # [tokens, k] softmax over the chosen experts' router logits


# ---- one virtual chip -------------------------------------------------------------------------
class Chip:
    """A chip's SRAM: its weight shards (copies) and its KV cache; `spec` has only its heads.
    `formats`: the weight formats its block matrices and its head rows run in (model.PRECISIONS)."""

    def __init__(self, chip_id: int, spec: ModelSpec, shards: Mapping[str, tuple[int, int, int, torch.Tensor]],
                 formats: tuple[str, str] = PRECISIONS["float32"]):
        self.id, self.full_spec = chip_id, spec
        self.block_format, self.head_format = formats
        self.shards = shards  # tensor -> (axis, start, stop, local copy)
        self.spec = spec  # narrowed to the chip's heads below, once they are known
        self.heads_set = False
        self.cache: KVCache | None = None
        self.kv_parts: dict[int, tuple[int, int, int]] = {}  # layer -> (lo, hi, ring): its KV slots held here

    def weight(self, tensor: str, op: str) -> torch.Tensor:
        if tensor not in self.shards:
            raise OpenLPUError(f"op {op} on chip {self.id} needs {tensor}, which the placement does not "
                               f"put on chip {self.id}")
        return self.shards[tensor][3]

    def start(self, tensor: str, op: str) -> int:
        self.weight(tensor, op)
        return self.shards[tensor][1]

    def set_heads(self, n_heads: int, n_kv_heads: int) -> None:
        """Narrow the spec to this chip's heads (model.py's attention then runs on them only)."""
        if self.heads_set and (self.spec.n_heads, self.spec.n_kv_heads) != (n_heads, n_kv_heads):
            raise OpenLPUError(f"chip {self.id} holds different head counts in different layers")
        self.spec = dataclasses.replace(self.full_spec, n_heads=n_heads, n_kv_heads=n_kv_heads)
        self.heads_set = True


class WholeTensors(Mapping):
    """The fused mode's chip: every tensor whole, read from the weights the first time an op asks; for
    one stage of a Program that cuts tensors between stages, `rows` gives the (axis, start, stop) that
    stage holds of each of them (a cut MLP's d_ff rows, an embedding or head part's vocabulary rows)."""

    def __init__(self, weights: Mapping[str, torch.Tensor], shapes: dict[str, tuple[int, ...]],
                 rows: dict[str, tuple[int, int, int]] | None = None):
        self.weights, self.shapes, self.rows, self.read = weights, shapes, rows or {}, {}

    def __getitem__(self, tensor: str):
        if tensor not in self.read:
            if tensor in self.rows:  # a copy of the part: a view would keep the whole tensor alive
                axis, start, stop = self.rows[tensor]
                self.read[tensor] = (axis, start, stop, narrowed(tensor, self.weights[tensor], axis, start, stop))
            else:
                self.read[tensor] = (0, 0, self.shapes[tensor][0], self.weights[tensor].float())
        return self.read[tensor]

    def __iter__(self):
        return iter(self.shapes)

    def __len__(self) -> int:
        return len(self.shapes)


# ---- per pass context -------------------------------------------------------------------------
class Pass:
    """What every op of one forward pass shares: token ids, positions, rope tables, attention plans."""

    def __init__(self, inv_freq: dict, rope_style: str, tokens: torch.Tensor, spans: list[Span],
                 logit_rows: torch.Tensor):
        self.tokens, self.spans, self.logit_rows = tokens, spans, logit_rows
        ends = list(itertools.accumulate(sp.n_tokens for sp in spans))
        self.span_rows = [slice(end - sp.n_tokens, end) for sp, end in zip(spans, ends)]
        self.positions = torch.cat([torch.arange(sp.start_pos, sp.start_pos + sp.n_tokens) for sp in spans])
        self.rope = {rope: rope_tables(self.positions, inv, rope_style) for rope, inv in inv_freq.items()}
        self._plans: dict = {}

    def plans(self, chip: Chip, layer: int) -> list:
        """model.py's attention plans for this layer's cache group on this chip's cache."""
        key = (chip.id, *cache_group(chip.spec, layer, chip.cache.capacity))
        if key not in self._plans:
            # lengths as they stand at the start of this pass (chunks of one prompt interleave layers)
            lengths = {sp.slot: sp.start_pos for sp in self.spans}
            self._plans[key] = attention_plans(self.spans, lengths, *key[1:])
        return self._plans[key]


# ---- op kernels: (chip, op name) -> fn(pass, *inputs) -----------------------------------------
def _norm_kernel(chip: Chip, name: str, tensor: str):
    norm = RMSNorm.build(chip.weight(tensor, name) + chip.spec.norm_weight_offset, chip.spec.norm_eps)
    return lambda p, x: norm(x)


def _linear_kernel(chip: Chip, name: str, tensor: str, fmt: str):
    spec, suffix = chip.full_spec, _suffix(name)
    has_bias = ((spec.qkv_bias and suffix in ("attn_q", "attn_k", "attn_v"))
                or (spec.moe_bias and suffix == "ffn_gate_inp"))
    bias = chip.weight(tensor.replace(".weight", ".bias"), name) if has_bias else None
    lin = Linear.build(chip.weight(tensor, name), fmt, bias)
    return lambda p, x: lin(x).float()


def _head_norm_kernel(chip: Chip, name: str, tensor: str):
    norm = RMSNorm.build(chip.weight(tensor, name) + chip.spec.norm_weight_offset, chip.spec.norm_eps)
    hd = chip.spec.head_dim
    return lambda p, x: norm(x.view(x.shape[0], -1, hd)).view(x.shape[0], -1)


def narrowed(tensor: str, weight: torch.Tensor, axis: int, start: int, stop: int) -> torch.Tensor:
    """A float copy of a tensor's elements [start, stop) along a shard axis (a view would keep the whole
    tensor alive); along EXPERT_ROWS, its experts' d_ff rows end to end, each row with what it multiplies."""
    if axis == EXPERT_ROWS:
        weight = weight.movedim(split_axis(tensor), 1).flatten(0, 1)
        axis = 0
    return weight.narrow(axis, start, stop - start).float().clone()


def _expert_blocks(chip: Chip, tensor: str, op: str) -> dict[int, torch.Tensor]:
    """Per expert the chip holds, its block of an expert tensor, laid out as the expert's own slice
    ([rows, d_model] for gate and up, [d_model, rows] for down, [rows] for a bias): every expert's slice of
    rows (a shard along d_ff), or, cut by expert rows, the run of experts it holds, the first and last of
    them possibly in part."""
    chip.weight(tensor, op)
    axis, start, stop, local = chip.shards[tensor]
    if axis != EXPERT_ROWS:  # the whole tensor, or a slice of every expert's rows
        return dict(enumerate(local))
    ff = chip.full_spec.layer_d_ff(item_of_tensor(tensor, -1))
    blocks = {e: local[lo - start:hi - start] for e, lo, hi in expert_spans(start, stop, ff)}
    return {e: b.T for e, b in blocks.items()} if tensor.endswith("ffn_down_exps.weight") else blocks


def _cat_partials(parts: list[Partial]) -> Partial:
    """The spans' partial attentions, row after row, as one."""
    if len(parts) == 1:
        return parts[0]
    return Partial(torch.cat([x.out for x in parts]), torch.cat([x.lse for x in parts]))


def build_kernel(chip: Chip, name: str, kind: str) -> Callable:
    """fn(pass, *inputs) computing op `name` (chunk prefix already removed) on `chip`'s shards."""
    base = name.split(CUT_SEPARATOR)[0]  # part j of a cut MLP runs the op on the rows its chip holds
    spec, suffix, layer = chip.full_spec, _suffix(base), _layer(base)
    weight = f"{base}.weight"
    if suffix == "token_embd":
        table = chip.weight("token_embd.weight", base)
        start, scale = chip.start("token_embd.weight", base), spec.embed_scale

        def embed(p, table=table, start=start):
            ids = p.tokens - start
            hit = (ids >= 0) & (ids < table.shape[0])
            out = torch.zeros(ids.shape[0], table.shape[1])
            out[hit] = table[ids[hit]]  # rows of this chip's vocabulary slice; zeros elsewhere
            return out * scale if scale != 1.0 else out
        return embed
    if suffix in ("attn_q_norm", "attn_k_norm"):
        return _head_norm_kernel(chip, base, weight)
    if suffix == "attn_qk_l2_norm":  # on the rotated (q, k) heads
        norm = weightless_norm(spec)
        return lambda p, qk: tuple(norm(x) for x in qk)
    if suffix == "output_norm":
        norm = _norm_kernel(chip, base, weight)
        return lambda p, x: norm(p, x[p.logit_rows])  # the head runs only on the rows asked for
    if kind == "norm":
        return _norm_kernel(chip, base, weight)
    if suffix == "output":  # this chip's vocabulary rows of the head
        head = Head(chip.weight("token_embd.weight" if spec.tie_embeddings else "output.weight", base),
                    chip.head_format)
        return lambda p, x: head(x)
    if suffix == "attn_output":  # after a split attention, the last merge's Partial holds the result
        linear = _linear_kernel(chip, base, weight, chip.block_format)
        return lambda p, x: linear(p, x.out if isinstance(x, Partial) else x)
    if suffix in ("attn_q", "attn_k", "attn_v", "ffn_gate", "ffn_up", "ffn_down", "ffn_gate_shexp", "ffn_up_shexp",
                  "ffn_down_shexp"):
        return _linear_kernel(chip, base, weight, chip.block_format)
    if suffix == "rope":
        hd, style = spec.head_dim, ROPE_STYLE[spec.family]
        layer_rope = spec.layer_rope(layer)

        def rope(p, q, k):
            tables = p.rope[layer_rope]
            return (apply_rope(q.view(q.shape[0], -1, hd), tables, style),
                    apply_rope(k.view(k.shape[0], -1, hd), tables, style))
        return rope
    if suffix == "attn_temperature":  # a NoPE layer: queries scaled by their position's temperature
        hd = spec.head_dim

        def temperature(p, q, k):
            q = q.view(q.shape[0], -1, hd)
            if spec.attn_temperature_scale:
                q = q * query_temperature(spec, p.positions)[:, None, None]
            return q, k.view(k.shape[0], -1, hd)
        return temperature
    if suffix == "attn_softcap":
        return lambda p, qk: qk  # the cap applies to the scores, inside attention (spec.attn_logit_softcap)
    if suffix == "attention" and layer in chip.kv_parts:  # this part's KV slots of a split attention
        hd, window, chunk = spec.head_dim, spec.layer_window(layer), spec.layer_chunk(layer)

        def partial_attention(p, qk, v):
            q, k = qk
            v = v.view(v.shape[0], -1, hd)
            lo, hi, ring = slot_range(chip.kv_parts[layer], chip.cache.layer_capacity[layer])
            first = chip.cache.first_slot[layer]
            parts = []
            for sp, rows in zip(p.spans, p.span_rows):
                k_own, v_own = (x[:, lo - first:hi - first] for x in chip.cache.slot(layer, sp.slot))
                parts.append(attend_slots(chip.spec, q[rows], k[rows], v[rows], sp.start_pos, ring, lo, hi,
                                          k_own, v_own, window, chunk))
            return _cat_partials(parts)
        return partial_attention
    if suffix == CHAINED["attn"]:
        return lambda p, running, own: merge_partials(running, own)
    if suffix == "attention":
        hd, with_lse = spec.head_dim, spec.attn_sinks  # the sinks op needs each head's log-sum-exp

        def attention(p, qk, v):
            q, k = qk
            v = v.view(v.shape[0], -1, hd)
            outs = [attend(chip.spec, q[pl.rows], k[pl.rows], v[pl.rows], pl, *chip.cache.slot(layer, pl.slot),
                           with_lse=with_lse) for pl in p.plans(chip, layer)]
            return _cat_partials(outs) if with_lse else outs[0] if len(outs) == 1 else torch.cat(outs)
        return attention
    if suffix == "attn_sinks":  # on the attention's Partial (or a split attention's merged one)
        first = chip.start(f"blk.{layer}.attn_q.weight", base) // spec.head_dim  # the chip's first head
        sinks = chip.weight(weight, base)[first:first + chip.spec.n_heads]
        return lambda p, a: apply_sinks(a, sinks)
    if suffix == "attn_output_bias":  # once, on the summed projection
        bias = chip.weight(f"blk.{layer}.attn_output.bias", base)
        return lambda p, x: x + bias
    if suffix == "ffn_exps_bias":  # each token's chosen experts' down biases, weighted like their outputs
        bias = chip.weight(f"blk.{layer}.ffn_down_exps.bias", base)

        def expert_bias(p, x, routing):
            experts, weights = routing
            return x + (bias[experts] * weights[..., None]).sum(1)
        return expert_bias
    if kind == "residual":
        return lambda p, a, b: a + b
    if suffix == "ffn_act_shexp":
        return lambda p, g, u: GLUS[spec.activation](g, u)
    if suffix == "ffn_act":
        glu = GLUS[spec.activation]
        if spec.is_moe_layer(layer):
            return lambda p, g, u: Routed(glu(g.values, u.values), g.experts, g.weights)
        return lambda p, g, u: glu(g, u)
    if suffix == "ffn_gate_inp":
        router, k = _linear_kernel(chip, base, weight, "float32"), spec.n_experts_per_token  # as model.py
        scales_input = spec.router == "sigmoid_input"

        def route(p, x):  # top-k experts, weighted as ROUTERS in spec.py says
            top_logits, top_experts = router(p, x).topk(k, -1)
            return top_experts, top_logits.sigmoid() if scales_input else top_logits.softmax(-1)
        return route
    if suffix in ("ffn_gate_exps", "ffn_up_exps"):
        w = _expert_blocks(chip, weight, base)  # per expert held: [its rows, d_model]
        b = _expert_blocks(chip, f"{base}.bias", base) if spec.moe_bias else dict.fromkeys(w)
        width = max(block.shape[0] for block in w.values())  # an expert held in part fills the first rows
        scales_input = spec.router == "sigmoid_input"

        def experts_in(p, x, routing):  # a token's value for an expert held elsewhere stays 0 (no input)
            experts, weights = routing
            out = torch.zeros(*experts.shape, width)
            for e in sorted(set(experts.unique().tolist()) & w.keys()):
                rows, rank = (experts == e).nonzero(as_tuple=True)
                x_e = x[rows] * weights[rows, rank, None] if scales_input else x[rows]
                out[rows, rank, :w[e].shape[0]] = F.linear(x_e, w[e], b[e])
            # weights already applied to the inputs leave the outputs unweighted
            return Routed(out, experts, torch.ones_like(weights) if scales_input else weights)
        return experts_in
    if suffix == "ffn_down_exps":
        w = _expert_blocks(chip, weight, base)  # per expert held: [d_model, its rows]

        def experts_out(p, a, shared=None):  # shared: the shared expert's partial sum (Llama 4)
            out = torch.zeros(a.values.shape[0], spec.d_model) if shared is None else shared.clone()
            for e in sorted(set(a.experts.unique().tolist()) & w.keys()):
                rows, rank = (a.experts == e).nonzero(as_tuple=True)
                values = a.values[rows, rank, :w[e].shape[1]]
                out.index_add_(0, rows, F.linear(values, w[e]) * a.weights[rows, rank, None])
            return out
        return experts_out
    if suffix == "final_softcap":
        cap = spec.final_logit_softcap
        return lambda p, x: torch.tanh(x / cap) * cap
    if suffix == CHAINED["head"]:  # part j of a split head: the larger of the running and its own maximum
        return lambda p, running, own: reduce_argmax([running, own])
    if suffix == "sample":
        start = chip.start("token_embd.weight" if spec.tie_embeddings else "output.weight", base)

        def local_argmax(p, logits):  # (best value, its id in the whole vocabulary) per row
            values, index = logits.max(-1)
            return values, index + start
        return local_argmax
    raise OpenLPUError(f"the executor has no kernel for op {name!r} (kind {kind}); the Program was "
                       f"lowered by a newer compiler")


def slot_range(part: tuple[int, int, int], capacity: int) -> tuple[int, int, int]:
    """A part's compiled KV slots [lo, hi) of `ring` scaled to a cache layer of `capacity` positions:
    (lo, hi, capacity). The parts of a layer still cover the cache's slots once each."""
    lo, hi, ring = part
    return lo * capacity // ring, hi * capacity // ring, capacity


def reduce_argmax(parts: list[tuple[torch.Tensor, torch.Tensor]]) -> tuple[torch.Tensor, torch.Tensor]:
    """The sampler's all-reduce: the largest value over the chips; ties go to the smaller id, like argmax."""
    values = torch.stack([v for v, _ in parts])
    ids = torch.stack([i for _, i in parts])
    best = values.max(0).values
    ids = torch.where(values == best, ids, torch.iinfo(ids.dtype).max)
    return best, ids.min(0).values


# ---- caches -----------------------------------------------------------------------------------
class ChipCaches:
    """One KV cache per chip, each for that chip's KV heads and only its stage's layers."""

    def __init__(self, chips: dict[int, Chip], layers_of: dict[int, set[int]], n_slots: int, capacity: int):
        self.per_chip = {}
        for cid, chip in chips.items():
            cache = KVCache(chip.spec, n_slots, capacity)
            for i in range(chip.spec.n_layers):
                if i not in layers_of[cid]:  # not this chip's layer: no storage at all
                    cache.k[i] = cache.v[i] = None
                elif i in chip.kv_parts:  # a part of a split attention: storage for its slots only
                    lo, hi, _ = slot_range(chip.kv_parts[i], cache.layer_capacity[i])
                    cache.k[i], cache.v[i] = (x.new_empty((*x.shape[:2], hi - lo, x.shape[3]))
                                              for x in (cache.k[i], cache.v[i]))
                    cache.first_slot[i] = lo
            self.per_chip[cid] = cache
        self.capacity = capacity

    @property
    def lengths(self) -> list[int]:
        return next(iter(self.per_chip.values())).lengths

    def allocate(self) -> int:
        slots = {c.allocate() for c in self.per_chip.values()}
        assert len(slots) == 1
        return slots.pop()

    def release(self, slot: int) -> None:
        for c in self.per_chip.values():
            c.release(slot)

    def advance(self, spans: list[Span]) -> None:
        for c in self.per_chip.values():
            for sp in spans:
                c.lengths[sp.slot] += sp.n_tokens


# ---- the executor -----------------------------------------------------------------------------

@dataclass(frozen=True)
class Event:
    """One op on a stage's chips, or one transfer, in schedule order."""
    name: str  # op or transfer name, chunk prefix removed
    inputs: tuple[str, ...]
    op: ScheduledOp | None
    transfer: Transfer | None
    chips: tuple[int, ...]  # where an op runs


# ---- fused mode: coverage and fusion --------------------------------------------------------------
def _gap_free_reach(shards: list, start: int) -> int:
    """Where the shards (sorted by start, along the first one's axis) stop covering without a gap from `start`."""
    reach = start
    for sh in shards:
        if sh.axis != shards[0].axis or sh.start > reach:
            break
        reach = max(reach, sh.stop)
    return reach


def check_every_element_placed(program: Program) -> None:
    """Fused mode merges the shards back into whole tensors: each must be covered end to end."""
    by_tensor: dict[str, list] = {}
    for sh in program.placement.shards:
        by_tensor.setdefault(sh.tensor, []).append(sh)
    for name, shape in program.tensors.items():
        shards = sorted(by_tensor.get(name, ()), key=lambda sh: (sh.axis, sh.start))
        reach = _gap_free_reach(shards, 0)
        if not shards or reach < axis_length(name, shape, shards[0].axis):
            where = f"from element {reach} on axis {shards[0].axis}" if shards else "at all"
            raise OpenLPUError(f"{name} is not placed on any chip {where}; the Program is incomplete, "
                               f"recompile it")


def stage_rows(program: Program) -> dict[int, dict[str, tuple[int, int, int]]]:
    """Per stage, the rows it holds of each tensor cut between stages, where that is not the whole
    tensor: (axis, start, stop), the union of its chips' shards."""
    stage_of = {c: s.index for s in program.placement.stages for c in s.chips}
    held: dict[tuple[int, str], list] = {}
    for sh in program.placement.shards:
        if is_cut_along_ffn(sh.tensor) or is_cut_along_vocab(sh.tensor):
            held.setdefault((stage_of[sh.chip], sh.tensor), []).append(sh)
    out: dict[int, dict[str, tuple[int, int, int]]] = {}
    for (stage, tensor), shards in sorted(held.items()):
        shards.sort(key=lambda sh: sh.start)
        reach = _gap_free_reach(shards, shards[0].start)
        if reach < max(sh.stop for sh in shards):
            raise OpenLPUError(f"stage {stage} holds two separate row ranges of {tensor} (parts of both the "
                               f"embedding and the head of a tied table), which the runtime cannot run; compile "
                               f"for another chip count or system")
        axis = shards[0].axis
        if (shards[0].start, reach) != (0, axis_length(tensor, program.tensors[tensor], axis)):
            out.setdefault(stage, {})[tensor] = (axis, shards[0].start, reach)
    return out


def kv_slot_parts(program: Program, spec: ModelSpec) -> dict[int, dict[int, tuple[int, int, int]]]:
    """Per stage, the layers whose attention it holds a part of: (lo, hi, ring), its KV slots [lo, hi)
    of the layer's ring; each layer's parts must cover its ring once, in order."""
    out: dict[int, dict[int, tuple[int, int, int]]] = {}
    covered: dict[int, int] = {}
    for stage in program.placement.stages:
        for item, part, lo, hi in stage.pieces:
            if part != "attn" or hi <= lo:
                continue
            ring = kv_slots(spec, program.workload.context_length, item)
            if lo != covered.get(item, 0) or hi > ring:
                raise OpenLPUError(f"layer {item}'s attention parts do not hold its {ring} KV slots once each in "
                                   f"order (a part holds {lo}..{hi - 1}); recompile the Program")
            covered[item] = hi
            out.setdefault(stage.index, {})[item] = (lo, hi, ring)
    for item, hi in covered.items():
        if hi != kv_slots(spec, program.workload.context_length, item):
            raise OpenLPUError(f"layer {item}'s attention parts hold only its KV slots 0..{hi - 1}; recompile "
                               f"the Program")
    return out


def _group(name: str) -> str:
    """Which block an op belongs to: 'embed', 'blk.<i>' or 'head' (parts of a split piece included)."""
    if name.startswith("blk."):
        return "blk." + name.split(".")[1]
    return "head" if _is_head_op(name) else "embed"


def fuse(spec: ModelSpec, events: list[Event]) -> list[Segment]:
    """The fused run of a decode op list (transfers already reduced to their source ops): each block
    whose ops, kinds and inputs are exactly what graph.lower emits for it becomes one Segment run by
    model.py; every op of any other block runs alone, in schedule order."""
    expected: dict[str, set] = {}
    for op in lower(spec, "decode", 1):
        expected.setdefault(_group(op.name), set()).add((op.name, op.kind, op.inputs))
    found: dict[str, set] = {}
    for ev in events:
        found.setdefault(_group(ev.name), set()).add((ev.name, ev.op.kind, ev.inputs))
    segments, emitted = [], set()
    for ev in events:
        group, layer = _group(ev.name), _layer(ev.name)
        if found[group] != expected.get(group):
            segments.append(Segment("op", layer, ev.inputs, ev.name, ev))
            continue
        if group in emitted:
            continue
        emitted.add(group)
        names = {name for name, _, _ in found[group]}
        consumed = {i for _, _, inputs in found[group] for i in inputs}
        inputs = tuple(sorted(consumed - names))
        if group == "head":  # the logits are what the sampler reads
            output = next(inputs for name, _, inputs in found[group] if name == "sample")[0]
        else:
            (output,) = names - consumed
        segments.append(Segment("layer" if layer >= 0 else group, layer, inputs, output))
    return segments


@dataclass(frozen=True)
class Segment:
    """One piece of the fused run: a whole model.py block, or one op alone."""
    kind: str  # "embed" | "layer" | "head" | "op"
    layer: int  # the block's layer (-1 outside the stack)
    inputs: tuple[str, ...]  # values it reads, by producing op
    output: str  # the value it leaves (the head: the logits' op)
    event: Event | None = None  # kind "op": the op to run alone


class Executor:
    def __init__(self, program: Program, spec: ModelSpec, weights: Mapping[str, torch.Tensor], mode: str = "fused",
                 precision: str = "float32", device=None, max_positions: int | None = None):
        """`precision`, `device`, `max_positions`: the fused blocks' weight format and where they run
        (model.py's Model); sharded mode always runs float32 on the CPU."""
        if mode not in MODES:
            raise OpenLPUError(f"unknown execution mode {mode!r}; use one of {', '.join(MODES)}")
        if spec.name != program.model or spec.tensor_shapes() != program.tensors:
            raise OpenLPUError(f"the Program was compiled for {program.model!r}, not for these weights "
                               f"({spec.name!r}); compile it for this model")
        self.program, self.spec, self.mode = program, spec, mode
        self.max_positions = max_positions or spec.context_length
        self.inv_freq = layer_rope_frequencies(spec)
        stages = program.placement.stages
        kv_parts = kv_slot_parts(program, spec)
        if mode == "fused":
            check_every_element_placed(program)
            self.model = Model(spec, weights, precision, device, self.max_positions)
            self.device = self.model.device
            self.stage_chips = {s.index: (0,) for s in stages}
            formats = PRECISIONS[self.model.precision]
            self.chips = {0: Chip(0, spec, WholeTensors(weights, program.tensors), formats)}
            # a stage holding part of a cut MLP, embedding, head or attention runs its ops alone on that
            # part's rows or KV slots
            rows = stage_rows(program)
            self.stage_views = {k: Chip(0, spec, WholeTensors(weights, program.tensors, rows.get(k)), formats)
                                for k in {*rows, *kv_parts}}
            for k, parts in kv_parts.items():
                self.stage_views[k].kv_parts = parts
        else:
            self.device = torch.device("cpu")
            self.stage_views = {}  # every chip already holds only its own rows
            self.stage_chips = {s.index: s.chips for s in stages}
            self.chips = {c: Chip(c, spec, {}) for c in program.placement.chips}
            for k, parts in kv_parts.items():
                for c in self.stage_chips[k]:
                    self.chips[c].kv_parts = parts
            for sh in program.placement.shards:
                if sh.chip not in self.chips:
                    raise OpenLPUError(f"shard of {sh.tensor} is placed on chip {sh.chip}, which no stage uses")
                local = self.chips[sh.chip].shards
                if sh.tensor in local:
                    raise OpenLPUError(f"chip {sh.chip} holds two shards of {sh.tensor}")
                # a copy, so the chip cannot reach the rest of the tensor through a view
                local[sh.tensor] = (sh.axis, sh.start, sh.stop,
                                    narrowed(sh.tensor, weights[sh.tensor], sh.axis, sh.start, sh.stop))
        self.decode_events = self._events(program.decode)
        # where the host reads the logits (part by part of a split head, rank order inside a part's
        # group) and the sampled token (sent back, combined by the last head part, or reduced)
        logits = "final_softcap" if spec.final_logit_softcap else "output"
        parts = sorted((op for op in program.decode.ops if op.name.split(CUT_SEPARATOR)[0] == logits),
                       key=lambda op: _part_index(op.name))
        self.logit_slices = [(op.name, c) for op in parts for c in self.stage_chips[op.stage]]
        last_max = max((op.name for op in program.decode.ops if op.name.startswith(CHAINED["head"])),
                       key=_part_index, default=None)
        self.sampled = tuple(n for n in ("token_return", last_max, "sample.allreduce", "sample") if n)
        self.kernels: dict[tuple[int, str], Callable] = {}
        if mode == "fused":  # chip 0 keeps the full spec: it holds every head
            self.segments = fuse(spec, self.decode_events)
            self._build_kernels([sg.event for sg in self.segments if sg.kind == "op"])
            return
        self.layers_of = {c: {i for s in stages if c in self.stage_chips[s.index] for i in s.attention_layers}
                          for c in self.chips}
        for chip in self.chips.values():
            self._set_heads(chip)
        self.prefill_chunks, self.head_events = self._prefill_templates(program.prefill)
        self._build_kernels(self.decode_events + [e for body in self.prefill_chunks for e in body] + self.head_events)

    def _build_kernels(self, events: list[Event]) -> None:
        for ev in events:
            for c in ev.chips if ev.op is not None else ():
                if (c, ev.name) not in self.kernels:
                    chip = self.stage_views.get(ev.op.stage, self.chips[c])
                    self.kernels[(c, ev.name)] = build_kernel(chip, ev.name, ev.op.kind)

    def _set_heads(self, chip: Chip) -> None:
        """The chip's query and KV heads, from its attn_q / attn_k shards; GQA must stay on the chip."""
        s = self.spec
        layers = sorted(self.layers_of[chip.id])
        if not layers:
            chip.set_heads(s.n_heads, s.n_kv_heads)
            return
        for i in layers:
            q = chip.shards.get(f"blk.{i}.attn_q.weight")
            k = chip.shards.get(f"blk.{i}.attn_k.weight")
            if q is None or k is None:
                missing = f"blk.{i}.attn_q.weight" if q is None else f"blk.{i}.attn_k.weight"
                raise OpenLPUError(f"layer {i} runs on chip {chip.id} but the placement does not put "
                                   f"{missing} there")
            q_heads = range(q[1] // s.head_dim, q[2] // s.head_dim)
            kv_heads = range(k[1] // s.head_dim, k[2] // s.head_dim)
            if {h // (s.n_heads // s.n_kv_heads) for h in q_heads} != set(kv_heads):
                raise OpenLPUError(f"chip {chip.id}, layer {i}: query heads {q_heads.start}..{q_heads.stop - 1} "
                                   f"need other KV heads than the {kv_heads.start}..{kv_heads.stop - 1} placed there")
            chip.set_heads(len(q_heads), len(kv_heads))

    # ---- schedule -> events ----
    def _events(self, phase: PhaseSchedule) -> list[Event]:
        items = [(o.start_cycle, 0, o) for o in phase.ops] + [(t.start_cycle, 1, t) for t in phase.transfers]
        events = []
        for _, is_transfer, x in sorted(items, key=lambda i: (i[0], i[1])):
            if self.mode == "fused" and is_transfer:
                continue  # one chip holds everything: nothing crosses a link
            inputs = tuple(self._fused_name(i) if self.mode == "fused" else i for i in x.inputs)
            if is_transfer:
                events.append(Event(x.name, inputs, None, x, x.chips))
            else:
                events.append(Event(x.name, inputs, x, None, self.stage_chips[x.stage]))
        return events

    @staticmethod
    def _fused_name(name: str) -> str:
        """A transfer's name -> the op whose result it carries ('blk.0.ffn_down.allreduce' -> 'blk.0.ffn_down')."""
        return name.split(">")[0].removesuffix(".allreduce")

    def _prefill_templates(self, phase: PhaseSchedule) -> tuple[list[list[Event]], list[Event]]:
        """Per compiled prompt chunk, its body events (names without the chunk prefix; inputs from
        earlier chunks dropped: those are the KV cache they wrote), and the head events (logits of
        the prompt's last token) of the last chunk."""
        chunks: dict[int, list[Event]] = {}
        for ev in self._events(phase):
            c, name = split_chunk(ev.name)
            inputs = tuple(base for chunk, base in map(split_chunk, ev.inputs) if chunk in (c, None))
            chunks.setdefault(c, []).append(dataclasses.replace(ev, name=name, inputs=inputs))
        last = chunks[max(chunks)]
        consumers: dict[str, list[str]] = {}
        for ev in last:
            for i in ev.inputs:
                consumers.setdefault(i, []).append(ev.name)
        head_names: set[str] = set()
        for ev in reversed(last):  # head ops, and the transfers only they consume
            users = consumers.get(ev.name, [])
            if _is_head_op(ev.name) or (ev.transfer is not None and users and all(u in head_names for u in users)):
                head_names.add(ev.name)
        for ev in last:  # and the transfers that carry their results (the sampler's all-reduce)
            if any(i in head_names for i in ev.inputs):
                head_names.add(ev.name)
        return ([[ev for ev in chunks[c] if ev.name not in head_names] for c in sorted(chunks)],
                [ev for ev in last if ev.name in head_names])

    # ---- running ----
    def new_cache(self, n_slots: int = 1, capacity: int | None = None) -> KVCache | ChipCaches:
        capacity = capacity or self.max_positions
        if self.mode == "fused":
            return KVCache(self.spec, n_slots, capacity, self.device)
        return ChipCaches(self.chips, self.layers_of, n_slots, capacity)

    def _run(self, events: list[Event], ctx: Pass, values: dict[int, dict]) -> None:
        for ev in events:
            if ev.transfer is not None:
                self._transfer(ev, values)
                continue
            for c in ev.chips:
                held = values[c]
                try:
                    args = [held[i] for i in ev.inputs]
                except KeyError as e:
                    raise OpenLPUError(f"op {ev.name} on chip {c} needs {e.args[0]}, which was never delivered "
                                       f"to chip {c} (no transfer in the Program brings it there)") from None
                held[ev.name] = self.kernels[(c, ev.name)](ctx, *args)

    def _transfer(self, ev: Event, values: dict[int, dict]) -> None:
        t, src_name = ev.transfer, ev.inputs[0]
        for c in t.senders:
            if src_name not in values[c]:
                raise OpenLPUError(f"transfer {ev.name} sends {src_name} from chip {c}, which never produced it")
        if t.kind == "all_reduce":
            parts = [values[c][src_name] for c in t.chips]
            total = reduce_argmax(parts) if isinstance(parts[0], tuple) else torch.stack(parts).sum(0)
            for c in t.chips:
                values[c][ev.name] = total
        elif t.kind == "p2p":
            values[t.chips[-1]][ev.name] = values[t.chips[0]][src_name]
        elif t.kind == "rank_p2p":  # each rank's heads to the same rank of the next group
            for src, dst in zip(t.senders, t.receivers):
                values[dst][ev.name] = values[src][src_name]
        elif t.kind == "stripe":  # rank r's share of the features to rank r of the next group
            for r, (src, dst) in enumerate(zip(t.senders, t.receivers)):
                values[dst][ev.name] = torch.tensor_split(values[src][src_name], len(t.senders), dim=-1)[r]
        elif t.kind == "all_gather":  # the group's shares, in rank order
            whole = torch.cat([values[c][src_name] for c in t.chips], dim=-1)
            for c in t.chips:
                values[c][ev.name] = whole
        else:  # broadcast from the group's first chip
            for c in t.chips:
                values[c][ev.name] = values[t.chips[0]][src_name]

    def step(self, tokens, spans: list[Span], cache: KVCache | ChipCaches | None = None,
             logit_rows=None) -> tuple[torch.Tensor, torch.Tensor]:
        """(float32 logits [rows, vocab], the Program's greedy token per row). Default rows: the last
        of each span (the Program computes logits only there)."""
        return self._execute(tokens, spans, cache, logit_rows, want_token=True)

    def forward(self, tokens, spans: list[Span], cache=None, logit_rows=None) -> torch.Tensor:
        """Model.forward's contract (float32 logits for logit_rows; default: each span's last row)."""
        return self._execute(tokens, spans, cache, logit_rows, want_token=False)[0]

    @torch.inference_mode()
    def _execute(self, tokens, spans: list[Span], cache, logit_rows, want_token: bool):
        tokens = torch.as_tensor(tokens, dtype=torch.long).flatten()
        if not spans or sum(sp.n_tokens for sp in spans) != tokens.numel():
            raise OpenLPUError("spans must cover the tokens exactly")
        lowest, highest = torch.aminmax(tokens)
        if lowest < 0 or highest >= self.spec.vocab_size:
            raise OpenLPUError(f"token ids must be in 0..{self.spec.vocab_size - 1}")
        ends = list(itertools.accumulate(sp.n_tokens for sp in spans))
        rows = torch.as_tensor([e - 1 for e in ends] if logit_rows is None else logit_rows, dtype=torch.long).flatten()
        own_cache = cache is None
        if own_cache:  # the chips keep K/V only in their caches: give this one pass a scratch cache
            spans = [Span(k, 0, sp.n_tokens) for k, sp in enumerate(spans)]
            cache = self.new_cache(len(spans), max(sp.n_tokens for sp in spans))
            for _ in spans:
                cache.allocate()
        per_chip = cache.per_chip if isinstance(cache, ChipCaches) else {0: cache}
        if set(per_chip) != set(self.chips):
            raise OpenLPUError("this cache was made for another executor; use executor.new_cache()")
        for sp in spans:
            if cache.lengths[sp.slot] != sp.start_pos:
                raise OpenLPUError(f"span starts at {sp.start_pos} but slot {sp.slot} holds "
                                   f"{cache.lengths[sp.slot]} positions")
            if sp.start_pos + sp.n_tokens > cache.capacity:
                raise OpenLPUError(f"sequence needs {sp.start_pos + sp.n_tokens} positions; the cache holds "
                                   f"{cache.capacity}")
        for c, chip in self.chips.items():
            chip.cache = per_chip[c]
        for view in self.stage_views.values():  # fused mode: views of chip 0
            view.cache = per_chip[0]
        if self.mode == "fused":
            logits, token = self._run_fused(tokens, spans, cache, rows, want_token)
        elif len(spans) == 1 and tokens.numel() <= self.program.workload.draft_tokens + 1:
            # a decode step: one token, or a speculating user's last token and the drafts it verifies
            logits, token = self._pass(self.decode_events, tokens, spans, rows)
        else:
            logits, token = self._prefill(tokens, spans, rows)
        if isinstance(cache, ChipCaches):
            cache.advance(spans)
        else:
            for sp in spans:
                cache.lengths[sp.slot] += sp.n_tokens
        return logits, token

    def _prefill(self, tokens: torch.Tensor, spans: list[Span], rows: torch.Tensor):
        """One prompt, chunk by chunk as the prefill schedule runs it; chunk j follows the compiled
        chunk min(j, last) (all compiled chunks but the last have the same ops), the head runs once."""
        if len(spans) != 1:
            raise OpenLPUError("sharded execution runs one sequence at a time (the Program serves one user "
                               "per pipeline slot); use fused mode for batches")
        span, chunk = spans[0], self.program.workload.chunk_tokens
        n_chunks = -(-span.n_tokens // chunk)
        first_row = (n_chunks - 1) * chunk
        if (rows < first_row).any():
            raise OpenLPUError(f"the Program computes logits only for the prompt's last chunk (rows "
                               f"{first_row}..{span.n_tokens - 1})")
        for j in range(n_chunks):
            body = self.prefill_chunks[min(j, len(self.prefill_chunks) - 1)]
            last = j == n_chunks - 1
            piece = Span(span.slot, span.start_pos + j * chunk, min(chunk, span.n_tokens - j * chunk))
            events = body + self.head_events if last else body
            out = self._pass(events, tokens[j * chunk:j * chunk + piece.n_tokens], [piece],
                             rows - first_row, head=last)
        return out

    def _run_fused(self, tokens: torch.Tensor, spans: list[Span], cache: KVCache, rows: torch.Tensor,
                   want_token: bool):
        """The fused segments in order on one chip: model.py blocks, and any op that runs alone."""
        model, values = self.model, {}
        tokens = tokens.to(self.device)
        ctx, alone = model.prepare(tokens, spans, cache), None
        for sg in self.segments:
            if sg.kind == "op":  # its own kernel, as in sharded mode, with its own pass context
                alone = alone or Pass(self.inv_freq, ROPE_STYLE[self.spec.family], tokens, spans, rows)
                self._run([sg.event], alone, {0: values})
                continue
            try:
                args = [values[i] for i in sg.inputs]
            except KeyError as e:
                raise OpenLPUError(f"{sg.output} needs {e.args[0]}, which no op of the Program produces") from None
            if sg.kind == "embed":
                values[sg.output] = model.embed(tokens)
            elif sg.kind == "layer":
                values[sg.output] = model.layer(sg.layer, *args, ctx, cache)
            else:  # the head's logits; its greedy sampler only when asked (the Engine samples itself)
                values[sg.output] = model.head_logits(*args, rows.to(self.device))
                if want_token:
                    values["sample"] = values[sg.output].max(-1)
        return self._logits({0: values}), self._token({0: values}) if want_token else None

    def _pass(self, events: list[Event], tokens: torch.Tensor, spans: list[Span], rows: torch.Tensor,
              head: bool = True):
        ctx = Pass(self.inv_freq, ROPE_STYLE[self.spec.family], tokens, spans, rows)
        values = {c: {} for c in self.chips}
        self._run(events, ctx, values)
        if not head:
            return None, None
        return self._logits(values), self._token(values)

    def _logits(self, values: dict[int, dict]) -> torch.Tensor:
        """The host reads each head chip's vocabulary slice."""
        slices = [values[c][name] for name, c in self.logit_slices]
        return slices[0] if len(slices) == 1 else torch.cat(slices, -1)

    def _token(self, values: dict[int, dict]) -> torch.Tensor:
        """The sampled token where the Program leaves it."""
        for name in self.sampled:
            for c in self.chips:
                if name in values[c]:
                    token = values[c][name]
                    return token[1] if isinstance(token, tuple) else token
        raise OpenLPUError("the Program never produces a sampled token")

    # ---- greedy generation ----
    def generate(self, prompt_ids: list[int], max_new_tokens: int) -> list[int]:
        """Greedy ids, each one the token the Program's sampler produced (fed back as the next input)."""
        if not prompt_ids or max_new_tokens < 1:
            raise OpenLPUError("give a non-empty prompt and at least one new token")
        cache = self.new_cache(1, min(self.max_positions, len(prompt_ids) + max_new_tokens))
        slot = cache.allocate()
        _, token = self.step(prompt_ids, [Span(slot, 0, len(prompt_ids))], cache)
        out = [int(token[-1])]
        while len(out) < max_new_tokens:
            _, token = self.step([out[-1]], [Span(slot, len(prompt_ids) + len(out) - 1, 1)], cache)
            out.append(int(token[-1]))
        return out


def simulated_figures(program: Program) -> dict:
    """The Program's LPU speed as openlpu.sim.timing reads it off the schedule (simulated, not measured)."""
    from openlpu.sim.timing import timing

    t = timing(program)
    return {"label": "simulated", "system": program.system.name, "chips": t.chips, "stages": t.stages,
            "tp": t.tp, "ttft_s": t.ttft_s, "tokens_per_s_per_user": t.tokens_per_s_per_user,
            "decode_latency_s": t.decode_latency_s}


def load_executor(program: Program, model_path, mode: str = "fused", precision: str = "float32",
                  device=None, max_positions: int | None = None, spec: ModelSpec | None = None) -> Executor:
    """An Executor for a GGUF file's weights. In fused mode it is a drop-in for runtime.model.Model
    in runtime.engine.Engine (same spec, max_positions, device and forward)."""
    from openlpu.models.gguf import load_weights, spec_from_gguf
    from openlpu.runtime.model import GGUFWeights

    spec = spec or spec_from_gguf(model_path)
    # fused: one tensor dequantized at a time as the blocks are built; sharded: every chip slices
    # its shards from the same float32 tensors
    weights = GGUFWeights(model_path, spec) if mode == "fused" else load_weights(model_path, spec)
    return Executor(program, spec, weights, mode, precision, device, max_positions)
