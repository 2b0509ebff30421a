"""Placement: which chip holds which weight shard, KV region and activation buffer.

A model is a chain of pieces: the embedding, each layer's attention half and MLP half, the head (final
norm + lm_head). Pipeline stages take contiguous runs of pieces, so a stage boundary may fall inside a
layer, between its attention and its MLP (one residual vector crosses it, as between two layers). When
stages are spread for the shortest decode step, when more stages are asked for than there are halves, or
when an MLP does not fit a stage whole, MLPs are cut along d_ff into slices on consecutive stages (k
equal slices each, or where stages fill: below): each
slice computes its rows' share of the down projection and the partial sums are added up (in a tree,
schedule.py) on the last slice, which adds the experts' down biases (gpt-oss) and the residual. Each
slice recomputes the MLP norm (and the MoE router) from replicated copies; an MoE slice holds its d_ff
rows of every expert (and of their gate and up biases), which costs the same as whole experts per stage
because the static schedule installs all experts anyway. Cuts fall between weight tiles of the matrix unit
(320 rows on GroqChip 1), and no slice leaves a chip less than one tile of rows but the last of an MLP cut
where stages fill, which keeps the rows left.

A mixture of experts whose MLPs cannot be placed by rows (cut by rows, a layer of many wide experts,
Llama 4 Maverick's 128 of 8,192 rows, keeps a tile of rows of every expert on each chip: 670 MB in a TP
group of 8) is cut by expert rows instead (expert parallelism; Placement.experts): its routed experts'
d_ff rows are laid end to end, expert after expert, and that axis is cut between stages and split over
each TP group like d_ff rows (Shard.axis EXPERT_ROWS), so a chip holds a run of experts, the first and
last of them possibly in part (a Maverick chip at int8 holds about 1.75 experts' rows, where whole
experts left it one), and a piece's range counts expert rows; a shared expert goes with them, each
part holding its share of its rows. No chip holds fewer expert rows than a weight tile, or one expert
narrower than a tile. The dataflow is the row cut's: each part sums its experts' weighted outputs for
the tokens routed to them (zero for the rest), and the parts' partial sums meet as before. Rows come
first because they give every chip the same share of a layer's work whatever the routing, which a static
schedule needs; by expert, a chip's matrix work (not its weight installs, which cover all its experts)
varies with the routing, so the schedule reserves the most it can be: every token's choices on the
chip's experts.

An embedding table or lm_head too large for one stage is split the same way along the vocabulary, into
the fewest equal row ranges that fit (or where stages fill): each embedding part gathers the token's
row if it holds it (zeros otherwise) and the partial vectors are summed; each head
part recomputes the final norm, computes the logits of its rows and their (value, index) maximum, and
the maxima are combined, the last part holding the sampled token. A tied table's
embedding and head pieces share a stage only when it holds the whole model (else a chip would hold two
ranges).

An attention half whose K and V (context x users) do not fit a stage is split along its layer's KV
slots (positions, or a sliding window's ring) into the fewest equal ranges that fit (or where stages
fill), on consecutive stages: context parallelism. Each part holds its slots for every user, copies of
the norm and the q, k, v projections (recomputed from the residual it is sent), and attends its slots;
the last part alone holds the attention sinks, the output projection and the post-norm, applied to the
merged result.

Inside a stage a tensor-parallel (TP) group of t chips splits every piece: attention by heads, the
MLP by d_ff (column split of gate/up, row split of down), the vocabulary of the embedding and lm_head
by rows. Small vectors (norms, the MoE router, attention sinks, the biases added after a row split) are
replicated on purpose.

Fewest chips: at each TP degree inside a node, the fewer stages of two packings: whole pieces, or pieces cut
where stages fill (each stage takes whole pieces while they fit, then as much of the next piece as fits what
it has left, cut as above at a weight-tile or KV-slot boundary, the rest opening the next stage; each cut
part pays for its copies and buffers). Degrees are compared, for a deployment inside one node, by the stages
they take, then the chips (a token costs a stage's chip time whatever the width); beyond one node, by the
nodes they take, ties to the wider degree: the same hosts, a faster step. A group spans whole nodes of one
rack only when no degree inside a node fits (fewest_chips). A given chip count takes the first TP degree in
order of preference that arranges. On those chips the compiler then tries wider groups spanning nodes too
(compile_program).

Those stages are arranged one of three ways (arrange; the compiler keeps the one whose decode step serves
each user sooner):
- spread (spread_over_stages): stage boundaries inside MLPs, as many as its search finds room for,
  the MLPs cut into equal slices, one per stage, which install their weights side by side, so each cut
  takes a share of an MLP off the step (spread_slices shares the cuts out as mlp_slices does); where a
  stage between two cuts would overfill (an uncut layer, the embedding, the head), the slices beside it
  are made smaller, as little as it needs (fitted_slices);
- single cuts (single_cut_stages): each piece, attentions too, cut at most once, the boundaries placed by a
  dynamic program where they take the most installs off the step: between the fewest stages and about one
  a layer, where a stage cannot hold two attentions with the MLP between and the spread's boundaries must
  fall between pieces;
- balanced: whole pieces, cut where stages fill instead when that arranges (filled_to), or MLPs cut into
  equal slices when it needs more stages than pieces or a whole MLP does not fit (the largest MLP into as
  many slices as asked or as it can be cut into, MLPs of other sizes, Maverick's dense ones beside its
  MoE ones, in proportion to the square root of their bytes: mlp_slices; splitting the vocabulary only
  when the embedding or head does not fit), or, for fewer stages than those need, pieces cut where
  stages fill. Finer slices only add copies and buffers, so the search stops at the first whose floor on
  SRAM (least_sram) passes what the stages hold. The fewest chips keep fewest_stages' packing when
  neither arranges.
"""

from __future__ import annotations

import functools
import heapq
import math
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass

from openlpu.compiler.program import Placement, Shard, Stage, Workload
from openlpu.errors import OpenLPUError, check_count
from openlpu.graph.lower import as_precision, lower
from openlpu.graph.ops import Op
from openlpu.hardware.lpu import SystemSpec
from openlpu.models.spec import ModelSpec
from openlpu.words import counted, significant

EMBED = -1  # item index of the embedding; the head is item n_layers
VOCAB_PARTS = ("embed", "head")  # pieces whose tensors split along the vocabulary when too large
HALF_OFFSET = {"attn": 0, "ffn": 1}  # a layer's halves, after the embedding: layer i's at 1 + 2i + offset
FFN_NAMES = ("ffn_", "post_ffw_norm")  # a layer's tensors and ops with these names form its MLP half
CUT_SEPARATOR = "@"  # "blk.3.ffn_gate@2": the op of part 2 of a cut MLP (part 0 keeps the plain name)
EXPERT_ROWS = -1  # Shard.axis of an expert tensor cut by expert rows: its experts' d_ff rows end to end
# tensors of a cut attention or MLP that only its last part holds: they act on the combined result
APPLIED_BY_LAST_PART = ("attn_sinks.weight", "attn_output.weight", "attn_output.bias", "post_attention_norm.weight",
                        "ffn_down_exps.bias", "post_ffw_norm.weight")


# ---- how each tensor splits -------------------------------------------------------------------
# suffix -> (axis split across the TP group, what one split unit is: "head", "kv_head", "row")
SPLIT_RULES = {
    "attn_q.weight": (0, "head"), "attn_q.bias": (0, "head"),
    "attn_k.weight": (0, "kv_head"), "attn_k.bias": (0, "kv_head"),
    "attn_v.weight": (0, "kv_head"), "attn_v.bias": (0, "kv_head"),
    "attn_output.weight": (1, "head"),
    "ffn_gate.weight": (0, "row"), "ffn_up.weight": (0, "row"), "ffn_down.weight": (1, "row"),
    "ffn_gate_exps.weight": (1, "row"), "ffn_up_exps.weight": (1, "row"), "ffn_down_exps.weight": (2, "row"),
    "ffn_gate_exps.bias": (1, "row"), "ffn_up_exps.bias": (1, "row"),
    "ffn_gate_shexp.weight": (0, "row"), "ffn_up_shexp.weight": (0, "row"), "ffn_down_shexp.weight": (1, "row"),
    "token_embd.weight": (0, "row"), "output.weight": (0, "row"),
}


def split_rule(tensor: str) -> tuple[int, str] | None:
    """A tensor's SPLIT_RULES entry (None: it is not split, as a norm is not)."""
    return SPLIT_RULES.get(tensor.split(".", 2)[-1] if tensor.startswith("blk.") else tensor)


def split_axis(tensor: str) -> int:
    """The axis along which a tensor's split unit runs (an MLP tensor's d_ff rows, a table's vocabulary)."""
    return split_rule(tensor)[0]


def item_of_tensor(name: str, n_layers: int) -> int:
    if name.startswith("blk."):
        return int(name.split(".")[1])
    return EMBED if name == "token_embd.weight" else n_layers


def _part(item: int, suffix: str, n_layers: int) -> str:
    if item == EMBED:
        return "embed"
    if item == n_layers:
        return "head"
    return "ffn" if suffix.startswith(FFN_NAMES) else "attn"


def tensor_piece(name: str, n_layers: int) -> tuple[int, str]:
    """(item, part) of the piece a weight tensor belongs to."""
    item = item_of_tensor(name, n_layers)
    return item, _part(item, name.split(".", 2)[-1], n_layers)


def is_cut_along_ffn(tensor: str) -> bool:
    """An MLP tensor split by d_ff rows (gate, up, down, experts): a cut MLP divides it between stages."""
    rule = split_rule(tensor)
    return rule is not None and rule[1] == "row" and tensor.split(".", 2)[-1].startswith("ffn_")


def is_cut_along_vocab(tensor: str) -> bool:
    """The embedding table or lm_head: a split embedding or head divides it by vocabulary rows."""
    return tensor in ("token_embd.weight", "output.weight")


def vocab_rows(tensors: dict[str, tuple[int, ...]]) -> int:
    return tensors["token_embd.weight"][0]


def is_expert_tensor(tensor: str) -> bool:
    """A tensor stacking one slice per routed expert along its first axis."""
    return "_exps." in tensor


def axis_length(tensor: str, shape: tuple[int, ...], axis: int) -> int:
    """A tensor's elements along a shard axis: for EXPERT_ROWS, its experts' d_ff rows end to end."""
    return shape[0] * shape[split_axis(tensor)] if axis == EXPERT_ROWS else shape[axis]


def expert_spans(start: int, stop: int, rows: int) -> list[tuple[int, int, int]]:
    """(expert, start, stop) for each expert that expert rows [start, stop) reach, its experts `rows` wide:
    the part of the range that is its rows (all of them, or, for the first and last, possibly some)."""
    return [(e, max(start, e * rows), min(stop, (e + 1) * rows)) for e in range(start // rows, -(-stop // rows))]


def expert_rows(tensors: dict[str, tuple[int, ...]], experts: bool) -> dict[int, int]:
    """The layers whose MLP is cut by expert rows (with `experts`, those with routed experts), each with
    its experts' d_ff rows (one expert's)."""
    return {item_of_tensor(name, -1): shape[1] for name, shape in tensors.items()
            if experts and name.endswith(".ffn_gate_exps.weight")}


def ffn_units(tensors: dict[str, tuple[int, ...]], experts: bool = False) -> dict[int, int]:
    """Each layer's MLP in the units its cuts and TP splits count, read off the tensor shapes: d_ff
    rows, or, cut by expert, the rows of all its routed experts end to end."""
    units = {item_of_tensor(name, -1): shape[split_axis(name)] for name, shape in tensors.items()
             if is_cut_along_ffn(name)}
    return units | {i: tensors[f"blk.{i}.ffn_gate_exps.weight"][0] * rows
                    for i, rows in expert_rows(tensors, experts).items()}


def cut_range(tensor: str, shape: tuple[int, ...], lo: int, hi: int, units: int,
              experts: bool) -> tuple[int, int, int]:
    """(axis, start, stop) of an MLP tensor that the MLP's `units` [lo, hi) hold: its d_ff rows; cut by
    expert, an expert tensor's expert rows [lo, hi), and a shared expert's rows in proportion (each part
    runs its share of the shared expert beside its experts)."""
    axis = split_axis(tensor)
    if experts and is_expert_tensor(tensor):
        return EXPERT_ROWS, lo, hi
    if experts and "_shexp." in tensor:
        return axis, lo * shape[axis] // units, hi * shape[axis] // units
    return axis, lo, hi


def split_ranges(spec: ModelSpec, tensor: str, shape: tuple[int, ...], t: int,
                 rows: tuple[int, int] | None = None, experts: bool = False) -> list[tuple[int, int, int, bool]]:
    """Per TP rank: (axis, start, stop, replicated). Units split as evenly as they go; `rows` limits a
    d_ff- or vocabulary-split tensor to the units [start, stop) of one piece of a cut MLP, embedding or
    head; `experts`: an MoE MLP is split by expert rows (expert parallelism), not by d_ff rows."""
    rule = split_rule(tensor)
    if rule is None or (t == 1 and rows is None):
        return [(0, 0, shape[0], t > 1)] * t
    axis, unit = rule
    if rows is not None and is_cut_along_ffn(tensor):
        layer = item_of_tensor(tensor, -1)
        axis, lo, hi = cut_range(tensor, shape, *rows, spec.n_experts * spec.layer_d_ff(layer), experts)
    else:
        axis = EXPERT_ROWS if experts and is_expert_tensor(tensor) else axis
        lo, hi = rows if rows is not None else (0, axis_length(tensor, shape, axis))
    size = {"head": spec.head_dim, "kv_head": spec.head_dim, "row": 1}[unit]
    units = (hi - lo) // size
    if unit == "kv_head" and t > units:  # fewer KV heads than chips: t/units chips share each head
        group = t // units
        return [(axis, (r // group) * size, (r // group + 1) * size, True) for r in range(t)]
    bounds = [r * units // t for r in range(t + 1)]
    return [(axis, lo + bounds[r] * size, lo + bounds[r + 1] * size, False) for r in range(t)]


def tp_candidates(spec: ModelSpec, system: SystemSpec) -> list[int]:
    """TP degrees in order of preference: inside a node (largest first), then whole nodes of a rack; each
    splitting the heads and giving every chip a row of the vocabulary (a toy model's may be shorter)."""
    node = system.node.chips
    local = [t for t in range(node, 0, -1) if node % t == 0 and spec.splits_heads(t)]
    spanning = [t for t in range(2 * node, system.chips_per_rack + 1, node) if spec.splits_heads(t)]
    return [t for t in local + spanning if t <= spec.vocab_size]


# ---- how each op's work divides over a TP group (by the op name's last part) ----------------
#   col: output columns split with its weight; row: input split, partial sums all-reduced after;
#   partial: input split, its partial sum added on the chip into the MLP's row op (a shared expert's);
#   heads / kv_heads: attention heads split; split: elementwise on a split tensor;
#   gather: vocabulary-split embedding rows, all-reduced after; argmax: the sampler's maximum over a
#   vocabulary-split row, reduced after; replicated: every chip does it all.
OP_SPLIT = {
    "attn_q": "col", "attn_k": "col", "attn_v": "col", "ffn_gate": "col", "ffn_up": "col",
    "ffn_gate_exps": "col", "ffn_up_exps": "col", "ffn_gate_shexp": "col", "ffn_up_shexp": "col", "output": "col",
    "attn_output": "row", "ffn_down": "row", "ffn_down_exps": "row", "ffn_down_shexp": "partial",
    "attn_q_norm": "heads", "rope": "heads", "attention": "heads", "attn_softcap": "heads", "attn_merge": "heads",
    "attn_sinks": "heads", "attn_qk_l2_norm": "heads", "attn_temperature": "heads",
    "attn_k_norm": "kv_heads",
    "ffn_act": "split", "ffn_act_shexp": "split", "final_softcap": "split", "sample": "argmax",
    "token_embd": "gather",
}


def op_suffix(name: str) -> str:
    """'c1/blk.3.ffn_gate@2' -> 'ffn_gate'; 'output' -> 'output'."""
    return _suffix(name.rsplit("/", 1)[-1])


@functools.cache  # a compile asks of each op's name many times; without its prompt chunk, a model has few
def _suffix(name: str) -> str:
    return name.split(CUT_SEPARATOR)[0].split(".")[-1]


def op_role(op: Op) -> str:
    return suffix_role(op_suffix(op.name))


def suffix_role(suffix: str) -> str:
    """The role (OP_SPLIT) of an op named with this suffix."""
    return OP_SPLIT.get(suffix, "replicated")


def op_item(op: Op, n_layers: int) -> int:
    if op.layer >= 0:
        return op.layer
    return EMBED if op.kind == "embed" else n_layers


def op_piece(op: Op, n_layers: int) -> tuple[int, str]:
    item = op_item(op, n_layers)
    return item, _part(item, op_suffix(op.name), n_layers)


def kv_heads_per_chip(spec: ModelSpec, t: int) -> int:
    return max(1, spec.n_kv_heads // t)


def op_fractions(spec: ModelSpec, role: str, t: int, weight_fraction: float) -> tuple[float, float, float, float]:
    """Per-chip shares of (compute, activations read, activations written, KV) of one op in `role` (op_role)."""
    f_heads = 1.0 / t
    f_kv = kv_heads_per_chip(spec, t) / spec.n_kv_heads
    f_w = weight_fraction
    compute, f_in, f_out = {
        "col": (f_w, 1.0, f_w), "row": (f_w, f_w, 1.0), "partial": (f_w, f_w, 1.0),
        "heads": (f_heads, f_heads, f_heads),
        "kv_heads": (f_kv, f_kv, f_kv), "split": (f_heads, f_heads, f_heads), "argmax": (f_heads, f_heads, f_heads),
        "gather": (f_heads, 1.0, 1.0), "replicated": (1.0, 1.0, 1.0)}[role]
    return compute, f_in, f_out, f_kv


def weight_fraction(spec: ModelSpec, shapes: dict, tensor: str | None, t: int) -> float:
    """The largest share of `tensor` one chip of a TP group of t holds."""
    if tensor is None:
        return 1.0
    shape = shapes[tensor]
    return max((stop - start) / axis_length(tensor, shape, axis)
               for axis, start, stop, _ in split_ranges(spec, tensor, shape, t))


# ---- pieces -----------------------------------------------------------------------------------
def _row_ranges(rows: int, k: int) -> list[tuple[int, int]]:
    return [(j * rows // k, (j + 1) * rows // k) for j in range(k)]


def kv_slots(spec: ModelSpec, context_length: int, layer: int) -> int:
    """Positions layer `layer` keeps per user: the context, or its sliding window or chunk (a ring) if shorter."""
    return spec.layer_positions(layer, context_length)


def _attention_pieces(i: int, parts: int, slots: int) -> list[tuple[int, str, int, int]]:
    return [(i, "attn", 0, 0)] if parts == 1 else [(i, "attn", lo, hi) for lo, hi in _row_ranges(slots, parts)]


def pieces(spec: ModelSpec, k: int | tuple[int, ...], vocab: tuple[int, int] = (1, 1), attn: tuple[int, ...] = (),
           slots: tuple[int, ...] = (), units: tuple[int, ...] = ()) -> tuple[tuple[int, str, int, int], ...]:
    """The pipeline's pieces in order, layer i's MLP cut into k[i] slices (k: one count for every layer) of
    its units[i] (default: d_ff rows), the embedding and the head into vocab[0] and vocab[1] ranges of
    vocabulary rows, layer i's attention into attn[i] ranges of its slots[i] KV slots (default: whole)
    (Stage.pieces' format)."""
    v, n = spec.vocab_size, spec.n_layers
    attn, k = attn or (1,) * n, k if isinstance(k, tuple) else (k,) * n
    units = units or tuple(map(spec.layer_d_ff, range(n)))
    layers = [p for i in range(n)
              for p in _attention_pieces(i, attn[i], slots[i] if slots else 0)
              + [(i, "ffn", lo, hi) for lo, hi in _row_ranges(units[i], k[i])]]
    return (*[(EMBED, "embed", lo, hi) for lo, hi in _row_ranges(v, vocab[0])], *layers,
            *[(spec.n_layers, "head", lo, hi) for lo, hi in _row_ranges(v, vocab[1])])


def half_index(item: int, part: str, n_layers: int) -> int:
    """Position of an uncut piece: embedding 0, layer i's attention 1 + 2i and MLP 2 + 2i, head 2n + 1."""
    if part in HALF_OFFSET:
        return 1 + 2 * item + HALF_OFFSET[part]
    return 0 if part == "embed" else 2 * n_layers + 1


# ---- sizes ------------------------------------------------------------------------------------
@dataclass(frozen=True)
class SizeTable:
    """Per-chip bytes at one TP degree, by half (half_index), with what cutting an MLP needs."""
    t: int
    experts: bool  # MoE MLPs cut and split by expert rows (expert parallelism), not by d_ff rows
    # MLP halves, embedding, head: their uncut tensors (norm, router); an MLP's also the rows its parts may round to
    weights: tuple[float, ...]
    last_part_weights: tuple[float, ...]  # of those, what only a cut piece's last part holds (APPLIED_BY_LAST_PART)
    ffn_units: tuple[int, ...]  # per layer: the units its MLP is cut in (d_ff rows, or expert rows)
    ffn_unit_bytes: tuple[float, ...]  # per layer: bytes of one such unit over its cut tensors
    ffn_expert_rows: tuple[int, ...]  # per layer cut by expert rows: one expert's d_ff rows (else 0)
    vocab_row_bytes: tuple[float, float]  # bytes of one vocabulary row of the embedding, of the head
    kv: tuple[int, ...]
    kv_slots: tuple[int, ...]  # per layer: positions of KV cache per user (its window if shorter)
    kv_slot_bytes: float  # bytes of one such position of a layer, all users, per chip
    kv_read_fractions: tuple[float, ...]  # per layer: the share of its KV a decode step reads (its users, attended)
    activations: tuple[int, ...]
    cut_activation_bytes: int  # a cut MLP's slice (an embedding part) also holds the partial sum it receives and the one it makes
    merge_activation_bytes: int  # an attention part holds the partial it receives and the one it makes
    tied_table: int  # per-chip bytes of a tied embedding table, counted in both embedding and head

    def ffn_tile(self, layer: int, tile_rows: int) -> int:
        """The fewest units of a layer's MLP a chip holds of a cut part: a weight tile of rows, or one
        whole expert narrower than a tile."""
        return min(tile_rows, self.ffn_expert_rows[layer] or tile_rows)


@dataclass(frozen=True)
class PieceSizes:
    """Per-chip bytes of each piece at one TP degree."""
    pieces: tuple[tuple[int, str, int, int], ...]
    weights: tuple[int, ...]
    kv: tuple[int, ...]
    activations: tuple[int, ...]
    tied_table: int
    experts: bool  # as SizeTable.experts


def lowered_decode(spec: ModelSpec, workload: Workload, rows: int = 1) -> list[Op]:
    """One decode step of a micro-batch of `rows` users, each attending workload.attended_context tokens with
    its draft_tokens + 1 new tokens (the drafts a speculating user's step verifies)."""
    return lower(spec, "decode", workload.attended_context, rows, workload.weights, kv_precision=workload.kv,
                 act_precision=workload.activations, queries=workload.draft_tokens + 1)


def prefill_chunks(workload: Workload) -> list[tuple[int, int]]:
    """(tokens before it, its tokens) of each chunk of workload.chunk_tokens tokens of the prompt."""
    step = workload.chunk_tokens
    return [(past, min(step, workload.prompt_len - past)) for past in range(0, workload.prompt_len, step)]


@functools.lru_cache(maxsize=16)
def lowered_passes(spec: ModelSpec, workload: Workload, decode_rows: int = 1) -> tuple[list[Op], ...]:
    """The passes a stage's activation buffers must serve: one decode micro-batch of `decode_rows`
    users' tokens, and the first prompt chunk, the longest (a chunk's buffers grow with its tokens, not with
    the keys before it: attention, a softcap's scores too, keeps those inside it)."""
    _, tokens = prefill_chunks(workload)[0]
    return (lowered_decode(spec, workload, decode_rows),
            lower(spec, "prefill", tokens, 1, workload.weights, kv_precision=workload.kv,
                  act_precision=workload.activations))


def activation_peaks(spec: ModelSpec, passes: tuple[list[Op], ...], t: int) -> list[float]:
    """Per half, the most activation bytes one chip holds at once: outputs live from their op's start
    to their last consumer (ops in graph order), the half's input held throughout, plus one output of
    slack for an op on another unit starting early."""
    n, shapes = spec.n_layers, spec.tensor_shapes()
    peaks = [0.0] * (2 * n + 2)
    written: dict[tuple, float] = {}  # (role, weight's split rule and shape) -> the share of its output a chip writes

    def share(op: Op) -> float:
        key = (op_role(op), op.weight and (split_rule(op.weight), shapes[op.weight]))  # alike in every layer
        if key not in written:
            written[key] = op_fractions(spec, key[0], t, weight_fraction(spec, shapes, op.weight, t))[2]
        return written[key]

    for ops in passes:
        by_name = {op.name: op for op in ops}
        slot_of = {op.name: half_index(*op_piece(op, n), n) for op in ops}
        last_user: dict[str, str] = {}
        for op in ops:
            for i in op.inputs:
                last_user[i] = op.name
        live: dict[int, float] = {}
        largest: dict[int, float] = {}
        held: dict[int, dict[str, float]] = {}
        for op in ops:
            slot = slot_of[op.name]
            out = op.act_write_bytes * share(op)
            bufs = held.setdefault(slot, {})
            for i in op.inputs:  # inputs from another half arrive as a full copy
                if slot_of[i] != slot:
                    bufs.setdefault("in:" + i, by_name[i].act_write_bytes)
            bufs[op.name] = out
            largest[slot] = max(largest.get(slot, 0.0), out)
            live[slot] = max(live.get(slot, 0.0), sum(bufs.values()))
            for i in op.inputs:
                if last_user.get(i) == op.name:
                    bufs.pop(i, None)
                    bufs.pop("in:" + i, None)
        for slot, v in live.items():
            peaks[slot] = max(peaks[slot], v + largest[slot])
    return peaks


@functools.lru_cache(maxsize=64)  # a compile sizes the same degrees for each placement it tries
def size_table(spec: ModelSpec, workload: Workload, t: int, decode_rows: int = 1, experts: bool = False) -> SizeTable:
    wb = as_precision(workload.weights).bytes_per_element
    kb = as_precision(workload.kv).bytes_per_element
    n, shapes = spec.n_layers, spec.tensor_shapes()
    units = ffn_units(shapes, experts)
    weights, last_part, unit_bytes, tied_table = [0.0] * (2 * n + 2), [0.0] * (2 * n + 2), [0.0] * n, 0.0
    vocab_row = {"embed": 0.0, "head": 0.0}
    for name, shape in shapes.items():
        item, part = tensor_piece(name, n)
        if is_cut_along_ffn(name):
            unit_bytes[item] += math.prod(shape) * wb / units[item]
            if shape[split_axis(name)] != units[item] and not (experts and is_expert_tensor(name)):
                # rows cut in proportion to the units (a shared expert beside experts cut by expert rows): a
                # part's share rounds to up to 2 rows on a chip beyond its units' share (cut_range, split_ranges)
                weights[half_index(item, part, n)] += 2 * math.prod(shape) // shape[split_axis(name)] * wb
            continue
        if is_cut_along_vocab(name):
            vocab_row[part] += shape[1] * wb
            if spec.tie_embeddings:  # the head reads it too (shared only when on the same stage)
                vocab_row["head"] += shape[1] * wb
                tied_table = -(-shape[0] // t) * shape[1] * wb
            continue
        largest = max((stop - start) * math.prod(shape) // shape[axis]
                      for axis, start, stop, _ in split_ranges(spec, name, shape, t))
        weights[half_index(item, part, n)] += largest * wb
        if name.endswith(APPLIED_BY_LAST_PART):
            last_part[half_index(item, part, n)] += largest * wb
    kv = [0] * (2 * n + 2)
    slots = tuple(kv_slots(spec, workload.context_length, i) for i in range(n))
    reads = tuple(min(decode_rows, workload.users) / workload.users
                  * kv_slots(spec, workload.attended_context, i) / slots[i] for i in range(n))
    slot_bytes = workload.users * 2 * kv_heads_per_chip(spec, t) * spec.head_dim * kb
    for i in range(n):
        kv[half_index(i, "attn", n)] = math.ceil(slots[i] * slot_bytes)
    acts = activation_peaks(spec, lowered_passes(spec, workload, decode_rows), t)
    tokens = max(1, min(workload.prompt_len, workload.chunk_tokens))
    ab = as_precision(workload.activations).bytes_per_element
    cut = 2 * tokens * spec.d_model * ab
    # a partial attention result: each query head's output and its log-sum-exp, this chip's heads
    merge = 2 * tokens * -(-spec.n_heads // t) * (spec.head_dim + 1) * ab
    by_expert = expert_rows(shapes, experts)
    return SizeTable(t, experts, tuple(weights), tuple(last_part), tuple(units[i] for i in range(n)), tuple(unit_bytes),
                     tuple(by_expert.get(i, 0) for i in range(n)),
                     (vocab_row["embed"], vocab_row["head"]), tuple(kv), slots,
                     slot_bytes, reads, tuple(math.ceil(a) for a in acts), math.ceil(cut), math.ceil(merge),
                     math.ceil(tied_table))


def piece_bytes(table: SizeTable, n_layers: int, piece: tuple[int, str, int, int], split: bool) -> tuple[int, int, int]:
    """Per-chip (weights, KV, activations) of one piece; split: one part of a piece cut between stages,
    which also holds the partial result it receives and the one it passes on."""
    item, part, lo, hi = piece
    h = half_index(item, part, n_layers)
    w = table.weights[h] - (table.last_part_weights[h] if split and not _is_last_part(table, piece) else 0)
    # units split over the group as split_ranges does: at most ceil(units / t) per chip
    if part == "ffn":
        w += -(-(hi - lo) // table.t) * table.ffn_unit_bytes[item]
    elif part in VOCAB_PARTS:
        w += -(-(hi - lo) // table.t) * table.vocab_row_bytes[VOCAB_PARTS.index(part)]
    kv = math.ceil((hi - lo) * table.kv_slot_bytes) if part == "attn" and hi > lo else table.kv[h]
    extra = {"ffn": table.cut_activation_bytes, "embed": table.cut_activation_bytes,
             "attn": table.merge_activation_bytes}.get(part, 0) if split else 0
    return math.ceil(w), kv, table.activations[h] + extra


def _is_last_part(table: SizeTable, piece: tuple[int, str, int, int]) -> bool:
    """Whether a part of a cut attention or MLP is its last, which holds what acts on the combined result
    (place: APPLIED_BY_LAST_PART); an embedding's or head's parts hold none such."""
    item, part, _, hi = piece
    return part not in ("attn", "ffn") or hi == (table.kv_slots if part == "attn" else table.ffn_units)[item]


def is_part(spec: ModelSpec, table: SizeTable, piece: tuple[int, str, int, int]) -> bool:
    """Whether a piece is one part of a piece cut between stages (piece_bytes' `split`)."""
    item, part, lo, hi = piece
    if part == "attn":
        return hi > lo
    return (lo, hi) != (0, table.ffn_units[item] if part == "ffn" else spec.vocab_size)


def _sizes(table: SizeTable, n_layers: int, cut: list[tuple[tuple[int, str, int, int], bool]]) -> PieceSizes:
    known: dict[tuple, tuple[int, int, int]] = {}  # a piece's bytes follow from its length and whether it is last

    def sized(piece, split):
        key = (piece[0], piece[1], piece[3] - piece[2], split, _is_last_part(table, piece))
        if key not in known:
            known[key] = piece_bytes(table, n_layers, piece, split)
        return known[key]

    weights, kv, activations = zip(*(sized(piece, split) for piece, split in cut))
    return PieceSizes(tuple(piece for piece, _ in cut), weights, kv, activations, table.tied_table, table.experts)


def sizes_of(spec: ModelSpec, table: SizeTable, cut: list[tuple[int, str, int, int]]) -> PieceSizes:
    """Per-chip bytes of the pieces `cut`, each a part of a piece cut between stages or whole (is_part)."""
    return _sizes(table, spec.n_layers, [(piece, is_part(spec, table, piece)) for piece in cut])


def piece_sizes(spec: ModelSpec, table: SizeTable, k: int | tuple[int, ...] = 1, vocab: tuple[int, int] = (1, 1),
                attn: tuple[int, ...] = ()) -> PieceSizes:
    """Per-chip bytes of each piece, layer i's MLP cut into k[i] slices (k: one count for every layer), the
    embedding and head into vocab parts, layer i's attention into attn[i] parts of its KV slots (each part
    holds the attention's weights)."""
    k = k if isinstance(k, tuple) else (k,) * spec.n_layers
    parts = {"embed": vocab[0], "head": vocab[1]}
    cut = [(piece, (piece[1] == "attn" and piece[3] > piece[2]) or
            (k[piece[0]] if piece[1] == "ffn" else parts.get(piece[1], 1)) > 1)
           for piece in pieces(spec, k, vocab, attn, table.kv_slots, table.ffn_units)]
    return _sizes(table, spec.n_layers, cut)


def last_holding(holds: Callable[[int], bool], a: int, b: int, guess: int) -> int:
    """The largest x in [a, b] where holds(x), for `holds` true up to some x and false past it (a - 1 if false at
    a): from `guess`, steps doubling outward bracket it, then a bisection finds it (a guess off by one costs two or
    three calls)."""
    x, step = max(a, min(b, guess)), 1
    if holds(x):
        lo, hi = x, b
        while lo < hi:
            probe = min(hi, lo + step)
            if not holds(probe):
                hi = probe - 1
                break
            lo, step = probe, 2 * step
    else:
        hi = x - 1
        while not holds(probe := max(a, x - step)):
            if probe == a:
                return a - 1
            x, hi, step = probe, probe - 1, 2 * step
        lo = probe
    while lo < hi:
        middle = (lo + hi + 1) // 2
        lo, hi = (middle, hi) if holds(middle) else (lo, middle - 1)
    return lo


def cut_step(spec: ModelSpec, table: SizeTable, piece: tuple[int, str, int, int], tile_rows: int) -> tuple[int, int]:
    """(extent, step) of a whole piece: the length of the axis it is cut along (KV slots, d_ff or expert rows,
    vocabulary rows) and the spacing of the places a cut may fall: between slots, or between weight tiles of
    the group's chips."""
    item, part = piece[:2]
    if part == "attn":
        return table.kv_slots[item], 1
    if part == "ffn":
        return table.ffn_units[item], table.t * table.ffn_tile(item, tile_rows)
    return spec.vocab_size, table.t * tile_rows


@functools.lru_cache(maxsize=64)  # a compile asks for the fewest chips once per arrangement it tries
def filled_sizes(spec: ModelSpec, table: SizeTable, capacity: int, tile_rows: int) -> PieceSizes | None:
    """The pieces cut where stages fill: in pipeline order each stage takes whole pieces while they fit,
    then as much of the next as fits what is left (an MLP's d_ff rows, the embedding's or head's
    vocabulary rows, an attention's KV slots), the rest going on to the next stage. Each part pays for
    its copies and its partial-result buffers. Rows are cut between weight tiles (each chip's share of
    a part is whole tiles of the matrix unit, but for a table's or d_ff's last rows), KV slots anywhere.
    None if some piece cannot be cut to fit an empty stage."""
    n = spec.n_layers
    out: list[tuple[tuple[int, str, int, int], bool]] = []
    held = peak = 0  # the open stage's weights and KV, its largest activation buffers
    first = 0  # index in `out` of the open stage's first piece

    def fits(piece, split: bool) -> bool:
        w, kv, a = piece_bytes(table, n, piece, split)
        whole_model = first == 0 and piece[1] == "head" and not split and not any(sp for _, sp in out)
        if table.tied_table and piece[1] == "head" and not whole_model and out[first:] and out[first][0][1] == "embed":
            return False  # see _splits_a_tied_table
        return held + w + kv + max(peak, a) - (table.tied_table if whole_model else 0) <= capacity

    def add(piece, split: bool) -> None:
        nonlocal held, peak
        w, kv, a = piece_bytes(table, n, piece, split)
        held, peak = held + w + kv, max(peak, a)
        out.append((piece, split))

    def close() -> None:
        nonlocal held, peak, first
        held, peak, first = 0, 0, len(out)

    for whole in pieces(spec, 1, units=table.ffn_units):
        item, part = whole[:2]
        extent, step = cut_step(spec, table, whole, tile_rows)
        lo = 0
        while True:
            rest = (item, part, lo, extent) if lo else whole
            if fits(rest, lo > 0):
                add(rest, lo > 0)
                break
            # the most of [lo, extent) that fits what the stage has left, in steps, leaving a step for later
            a, b = lo // step + 1, (extent - 1) // step
            if a <= b and fits((item, part, lo, a * step), True):
                # each step adds about as many bytes to the part: the search starts where they would fill the room
                # the stage has left (a bisection over 131,072 KV slots took 17 tries a cut; this, two or three)
                (w, kv, act), (w_next, kv_next, _) = (piece_bytes(table, n, (item, part, lo, k * step), True)
                                                      for k in (a, min(a + 1, b)))
                room, per_step = capacity - held - max(peak, act) - w - kv, w_next + kv_next - w - kv
                x = last_holding(lambda k, begun=(item, part, lo), step=step: fits((*begun, k * step), True), a, b,
                                 a + room // per_step if per_step > 0 else b)
                add((item, part, lo, x * step), True)
                lo = x * step
            elif len(out) == first:
                return None  # even an empty stage holds no part of it
            close()
    return _sizes(table, n, out)


def stage_bytes(sizes: PieceSizes, lo: int, hi: int) -> int:
    """Per-chip SRAM of a stage holding pieces lo..hi-1."""
    shared = sizes.tied_table if lo == 0 and hi == len(sizes.weights) else 0  # one tied table, not two
    return sum(sizes.weights[lo:hi]) - shared + sum(sizes.kv[lo:hi]) + max(sizes.activations[lo:hi])


def _splits_a_tied_table(sizes: PieceSizes, lo: int, hi: int) -> bool:
    """A stage holding pieces lo..hi would hold an embedding piece and a head piece of a tied table
    without holding the whole model: two shards of one tensor on a chip, which one table per chip
    cannot be."""
    return bool(sizes.tied_table) and sizes.pieces[lo][1] == "embed" and sizes.pieces[hi][1] == "head" \
        and not (lo == 0 and hi == len(sizes.pieces) - 1)


def greedy_stages(sizes: PieceSizes, capacity: int, breaks: frozenset[int] = frozenset(),
                  ) -> list[tuple[int, int]] | None:
    """Fewest contiguous stages each within capacity, a stage beginning at each piece index in `breaks`
    (None if one piece alone does not fit)."""
    n, out, lo = len(sizes.weights), [], 0
    while lo < n:
        held, peak, hi = 0, 0, lo
        while hi < n and not (hi > lo and hi in breaks):
            more, top = held + sizes.weights[hi] + sizes.kv[hi], max(peak, sizes.activations[hi])
            shared = sizes.tied_table if lo == 0 and hi == n - 1 else 0
            if more + top - shared > capacity or _splits_a_tied_table(sizes, lo, hi):
                break
            held, peak, hi = more, top, hi + 1
        if hi == lo:
            return None
        out.append((lo, hi))
        lo = hi
    return out


def balanced_stages(sizes: PieceSizes, p: int, capacity: int, breaks: frozenset[int] = frozenset(),
                    ) -> list[tuple[int, int]] | None:
    """Exactly p contiguous stages minimising the largest stage (binary search on the bound), a stage
    beginning at each piece index in `breaks`."""
    if p > len(sizes.weights):
        return None
    fewest = greedy_stages(sizes, capacity, breaks)
    if fewest is None or len(fewest) > p:
        return None
    lo_b, hi_b = 1, capacity
    while lo_b < hi_b:
        mid = (lo_b + hi_b) // 2
        g = greedy_stages(sizes, mid, breaks)
        if g is not None and len(g) <= p:
            hi_b = mid
        else:
            lo_b = mid + 1
    stages = [(a - b, a, b) for a, b in greedy_stages(sizes, lo_b, breaks)]
    heapq.heapify(stages)
    for _ in range(p - len(stages)):  # split the stage of most pieces (the first of those) in two
        _, a, b = heapq.heappop(stages)
        for lo, hi in ((a, (a + b) // 2), ((a + b) // 2, b)):
            heapq.heappush(stages, (lo - hi, lo, hi))
    return sorted((a, b) for _, a, b in stages)


def attention_parts(spec: ModelSpec, table: SizeTable, capacity: int) -> tuple[int, ...] | None:
    """Per layer, the fewest parts of its KV slots with which its attention fits a stage alone (1: whole);
    None if its weights and buffers alone leave no room for one slot."""
    n, out = spec.n_layers, []
    for i in range(n):
        h = half_index(i, "attn", n)
        if table.weights[h] + table.kv[h] + table.activations[h] <= capacity:
            out.append(1)
            continue
        room = capacity - table.weights[h] - table.activations[h] - table.merge_activation_bytes
        slots = int(room // table.kv_slot_bytes) if room > 0 else 0
        if slots < 1:
            return None
        out.append(-(-table.kv_slots[i] // slots))
    return tuple(out)


def most_slices(table: SizeTable, tile_rows: int) -> tuple[int, ...]:
    """Per layer, the most slices its MLP is cut into: each leaves a chip a weight tile of rows (or one
    expert narrower than a tile); an MLP with fewer stays whole."""
    return tuple(max(1, u // (table.t * table.ffn_tile(i, tile_rows))) for i, u in enumerate(table.ffn_units))


def mlp_bytes(table: SizeTable) -> list[float]:
    """Per layer, the bytes of its MLP's cut tensors on one chip of the TP group."""
    return [u * b for u, b in zip(table.ffn_units, table.ffn_unit_bytes)]


def mlp_slices(table: SizeTable, tile_rows: int, slices: int) -> tuple[int, ...]:
    """Per layer, the slices its MLP is cut into when the largest MLP is cut into `slices`: in proportion
    to the square root of its bytes, at least one and at most most_slices. A cut MLP's parts install their
    weights side by side, so a step spends on each MLP its bytes over its slices, a sum that a given total
    of slices makes least so (MLPs of one size: each in `slices`; Maverick's experts, 64 times its dense
    MLPs' bytes, in 8 times their slices)."""
    bytes_per_mlp = mlp_bytes(table)
    largest = max(bytes_per_mlp)
    return tuple(min(most, max(1, round(slices * math.sqrt(b / largest))))
                 for b, most in zip(bytes_per_mlp, most_slices(table, tile_rows)))


def spread_slices(table: SizeTable, tile_rows: int, least: tuple[int, ...], cuts: int) -> tuple[int, ...]:
    """Per layer, MLP slices making at most `cuts` cuts in all, as many as it can: each layer's share of
    the slices in proportion to the square root of its MLP's bytes (as mlp_slices), rounded along the
    pipeline so that the layers given one more fall evenly among the rest; at least least[i] and at most
    most_slices. Needs sum(least) - len(least) <= cuts."""
    most, roots = most_slices(table, tile_rows), [math.sqrt(b) for b in mlp_bytes(table)]
    total = sum(roots)
    shares = [root / total for root in roots]

    def slices(total: int) -> tuple[int, ...]:
        out, share, before = [], 0.0, 0
        for part, fewest, finest in zip(shares, least, most):
            share += part
            upto = round(total * share)
            out.append(min(finest, max(fewest, upto - before)))
            before = upto
        return tuple(out)

    lo, hi = 0, len(roots) + cuts  # the most slices in all whose cuts stay within `cuts`
    while lo < hi:
        mid = (lo + hi + 1) // 2
        lo, hi = (mid, hi) if sum(slices(mid)) - len(roots) <= cuts else (lo, mid - 1)
    return slices(lo)


def fitting_cuts(spec: ModelSpec, table: SizeTable, capacity: int, tile_rows: int,
                 slices: int | tuple[int, ...] = 1,
                 ) -> tuple[tuple[int, ...], tuple[int, int], tuple[int, ...], PieceSizes] | None:
    """(MLP slices per layer, (embedding parts, head parts), attention parts per layer, their piece sizes):
    the largest MLP in `slices` slices or as many as it can be cut into, the others in proportion
    (mlp_slices), or layer i's in slices[i] (a tuple), and each in more where fewer do not fit a stage
    alone; the fewest embedding, head and attention parts that fit; None if none does (an attention part
    cannot hold one KV slot, or a piece does not fit however finely it is cut)."""
    n, t = spec.n_layers, table.t

    def fit(sizes: PieceSizes, part: str) -> bool:  # each piece of the part alone on a stage (stage_bytes)
        return all(w + kv + a <= capacity for (_, kind, _, _), w, kv, a in zip(sizes.pieces, sizes.weights, sizes.kv,
                                                                                sizes.activations) if kind == part)

    def rows_that_fit(h: int, row_bytes: float, summed: bool) -> int:
        """Rows (units) per chip that fit beside the piece's other bytes (and the partial sums it passes on)."""
        room = capacity - table.weights[h] - table.kv[h] - table.activations[h]
        return int((room - (table.cut_activation_bytes if summed else 0)) // row_bytes)

    attn = attention_parts(spec, table, capacity)
    if attn is None:
        return None
    most = most_slices(table, tile_rows)
    ks = given_ks = slices if isinstance(slices, tuple) else mlp_slices(table, tile_rows, slices)
    given = piece_sizes(spec, table, ks)
    if not fit(given, "ffn"):
        rows = [rows_that_fit(half_index(i, "ffn", n), table.ffn_unit_bytes[i], True) for i in range(n)]
        if min(rows) < 1:
            return None
        ks = tuple(max(k, -(-table.ffn_units[i] // (rows[i] * t))) for i, k in enumerate(ks))
        if any(k > m for k, m in zip(ks, most)):
            return None
    vocab = []
    for k, part in enumerate(VOCAB_PARTS):
        if fit(given, part):
            vocab.append(1)
            continue
        rows = rows_that_fit(half_index(n if part == "head" else EMBED, part, n), table.vocab_row_bytes[k],
                             part == "embed")
        if rows < 1:
            return None
        vocab.append(-(-spec.vocab_size // (rows * t)))
    uncut = ks == given_ks and vocab == [1, 1] and set(attn) == {1}  # the pieces sized as `given`
    sizes = given if uncut else piece_sizes(spec, table, ks, tuple(vocab), attn)
    if not all(fit(sizes, part) for part in ("attn", "ffn", *VOCAB_PARTS)):
        return None
    return ks, (vocab[0], vocab[1]), attn, sizes


def cut_options(spec: ModelSpec, table: SizeTable, capacity: int, tile_rows: int, slices: int = 1):
    """Piece sizes with every piece fitting a stage alone, from the fewest MLP slices (the largest MLP in
    at least `slices` where it can be cut so, the others in proportion: mlp_slices) to the most that leave
    each chip a weight tile of rows: finer slices can pack stages tighter."""
    most, last = most_slices(table, tile_rows), None
    while (cuts := fitting_cuts(spec, table, capacity, tile_rows, slices)) is not None:
        if cuts[:3] != last:
            yield cuts[3]
            last = cuts[:3]
        if all(k >= m for k, m in zip(cuts[0], most)):
            return
        slices = max(slices, max(cuts[0])) + 1


def least_sram(spec: ModelSpec, table: SizeTable, p: int, capacity: int, slices: dict[int, int] | None = None,
               ) -> float:
    """A floor under the SRAM, summed over p stages, that any placement of the table takes with layer i's MLP in
    slices[i] slices or more (default 1): each slice holds a copy of its MLP's uncut tensors (norm, router;
    those acting on the summed result only the last) and at least its share of the rows, every other piece at
    least its share of the vocabulary rows or KV slots, and each stage the activation buffers of one of its
    pieces, those of an MLP slice in the stages the MLPs need (infinite if more than p)."""
    n, t, slices = len(table.ffn_units), table.t, slices or {}
    ffn_halves = [half_index(i, "ffn", n) for i in range(n)]
    ffn = sum(slices.get(i, 1) * table.weights[h] - (slices.get(i, 1) - 1) * table.last_part_weights[h]
              + table.ffn_units[i] * table.ffn_unit_bytes[i] / t for i, h in enumerate(ffn_halves))
    others = (sum(table.weights) - sum(table.weights[h] for h in ffn_halves) - table.tied_table
              + spec.vocab_size * sum(table.vocab_row_bytes) / t + sum(table.kv_slots) * table.kv_slot_bytes)
    ffn_buffers = min(table.activations[h] + (table.cut_activation_bytes if slices.get(i, 1) > 1 else 0)
                      for i, h in enumerate(ffn_halves))
    if ffn_buffers >= capacity:
        return math.inf
    ffn_stages = math.ceil(ffn / (capacity - ffn_buffers))
    if ffn_stages > p:
        return math.inf
    return ffn + others + ffn_stages * ffn_buffers + (p - ffn_stages) * min(table.activations)


def arrange(spec: ModelSpec, table: SizeTable, p: int, capacity: int, tile_rows: int,
            balance: bool = False, fit: bool = True,
            single_cuts: bool = False) -> tuple[PieceSizes, list[tuple[int, int]]] | None:
    """p stages of the TP degree of `table`, for the shortest decode step (spread_over_stages, its slices
    fitted to full stages as `fit` says, or, with `single_cuts`, single_cut_stages where it finds stages,
    whatever `balance` says), or, with `balance` or where those do not fit, for the most even stages: whole
    pieces when they suffice (cut where stages fill instead if that arranges: filled_to), else the fewest MLP
    slices that give at least p pieces and arrange (the embedding and head split only if they do not fit
    whole), else, for fewer stages than those need, pieces cut where stages fill."""
    if least_sram(spec, table, p, capacity) > p * capacity:
        return None
    if single_cuts and (cut_once := single_cut_stages(spec, table, p, capacity, tile_rows)):
        return cut_once
    spread = None if balance else spread_over_stages(spec, table, p, capacity, tile_rows, fit)
    if spread is not None:
        return spread
    cuts = fitting_cuts(spec, table, capacity, tile_rows)
    if cuts is not None:
        slices = max(*cuts[0], -(-(p - sum(cuts[1]) - sum(cuts[2])) // spec.n_layers))  # p pieces, if uncapped
        for sizes in cut_options(spec, table, capacity, tile_rows, slices):
            parts = Counter(item for item, part, _, _ in sizes.pieces if part == "ffn")
            if least_sram(spec, table, p, capacity, parts) > p * capacity:
                break  # the options after this one cut MLPs as finely or finer: none fits p stages either
            ranges = balanced_stages(sizes, p, capacity)
            if ranges is not None and max(parts.values()) > 1:
                return sizes, ranges
            if ranges is not None:  # whole MLPs: cut them where stages fill instead, if that arranges
                return filled_to(spec, table, p, capacity, tile_rows) or (sizes, ranges)
    filled = filled_sizes(spec, table, capacity, tile_rows)
    ranges = balanced_stages(filled, p, capacity) if filled is not None else None
    return (filled, ranges) if ranges is not None else None


def spread_over_stages(spec: ModelSpec, table: SizeTable, p: int, capacity: int, tile_rows: int,
                       fit: bool = True) -> tuple[PieceSizes, list[tuple[int, int]]] | None:
    """p stages whose boundaries fall inside MLPs, as many as fit: MLPs cut into equal slices
    (spread_slices), one slice per stage, the other boundaries between pieces. A cut MLP's slices run
    side by side, so each boundary inside one takes a share of it off the decode step, the most when the
    slices are equal. Where the stage between two cuts cannot hold the whole layers between them, fewer
    cuts leave boundaries to place between pieces (as many cuts as the searches below find arranging), and,
    with `fit`, the slices beside it may move off equal to make room (fitted_slices): more cuts, but a
    slice squeezed beside a full stage leaves the rest of its MLP larger, so a step can be longer than
    with fewer cuts in equal slices (the compiler schedules both). The stages are as even as the cuts
    leave them, so a workload bound by its busiest stage (many users in flight) may do better balanced
    (arrange). None if the searches find no count of cuts that arranges."""
    fewest = fitting_cuts(spec, table, capacity, tile_rows)
    if fewest is None:
        return None
    least, vocab, attn, _ = fewest
    lo, hi = sum(least) - spec.n_layers, p - 1 - (sum(vocab) - 2) - (sum(attn) - spec.n_layers)

    if lo > hi:
        return None
    # Whether a count arranges is not monotone in it: each cut begins a stage, so a few cuts can take more
    # stages than none or all (Llama 3.3 70B at 32,768 tokens for 8 users on 85 stages arranges with 0 to 4 and
    # 77 to 83 cuts), or only a band in the middle arranges (Qwen3 32B at fp16, 32,768 tokens, 8 users, 118
    # stages: 12 to 52). Two searches of about log2(hi) tries each, and the more cuts they find: one bisects
    # the whole range, starting from all the cuts; one steps down from all of them in doubling steps to a count
    # that arranges, then bisects up to where the next does not.
    tried: dict[int, tuple[PieceSizes, list[tuple[int, int]]] | None] = {}

    def arranges(cuts: int) -> bool:
        if cuts not in tried:
            tried[cuts] = spread_with_cuts(spec, table, p, capacity, tile_rows, least, cuts, fit)
        return tried[cuts] is not None

    found, low, high, cuts = [], lo, hi, hi
    while low <= high:  # bisecting
        if arranges(cuts):
            found, low = [cuts], cuts + 1
        else:
            high = cuts - 1
        cuts = (low + high) // 2
    if (cuts := last_holding(arranges, lo, hi, hi)) >= lo:  # stepping down from all the cuts, bisecting up
        found.append(cuts)
    return tried[max(found)] if found else None


def spread_with_cuts(spec: ModelSpec, table: SizeTable, p: int, capacity: int, tile_rows: int, least: tuple[int, ...],
                     cuts: int, fit: bool = True) -> tuple[PieceSizes, list[tuple[int, int]]] | None:
    """spread_over_stages' p stages with `cuts` MLP cuts, shared out by spread_slices (each layer's MLP in at least
    least[i] slices), a stage beginning at each; None where they do not arrange so."""
    found = fitting_cuts(spec, table, capacity, tile_rows, spread_slices(table, tile_rows, least, cuts))
    if found is None:
        return None
    sizes = found[3]
    breaks = cut_starts(sizes)
    if len(breaks) >= p:
        return None
    starts = frozenset(breaks)  # a stage begins at each
    ranges = balanced_stages(sizes, p, capacity, starts)
    if ranges is None and fit and (fitted := fitted_slices(spec, table, sizes, breaks, capacity, tile_rows)):
        sizes, ranges = fitted, balanced_stages(fitted, p, capacity, starts)
    return (sizes, ranges) if ranges is not None else None


def cut_starts(sizes: PieceSizes) -> list[int]:
    """The indices of the pieces that continue the piece before them (its next part): where cuts fall."""
    return [j for j in range(1, len(sizes.pieces)) if sizes.pieces[j][:2] == sizes.pieces[j - 1][:2]]


def fitted_slices(spec: ModelSpec, table: SizeTable, sizes: PieceSizes, breaks: list[int], capacity: int,
                  tile_rows: int) -> PieceSizes | None:
    """`sizes` with the boundaries between its pieces' parts (pieces[j - 1] | pieces[j], j in `breaks`)
    that fall inside MLPs moved so that each run of pieces between two boundaries fits a stage, each as
    little off its place as that allows, in pipeline order: equal slices install fastest, but a run
    holding an uncut layer, the embedding or the head may need its neighbours' slices smaller. A run too
    large for one stage with any places is left to take more (balanced_stages splits it between pieces).
    A moved boundary falls between weight tiles, as filled_sizes cuts. None if no such places fit."""
    n, cut = spec.n_layers, list(sizes.pieces)
    starts = [0, *breaks, len(cut)]
    # per boundary, the places it may take, in order: tiles of its MLP's units, or where it is
    places = [range(cut[j][2], cut[j][2] + 1) if cut[j][1] != "ffn" else
              range(step := table.t * table.ffn_tile(cut[j][0], tile_rows), table.ffn_units[cut[j][0]], step)
              for j in breaks]

    def load(r: int, begin: int | None, end: int | None) -> int:
        """Per-chip SRAM of run r, its first piece starting at `begin`, its last ending at `end`."""
        run = cut[starts[r]:starts[r + 1]]
        if begin is not None:
            run[0] = (*run[0][:2], begin, run[0][3])
        if end is not None:
            run[-1] = (*run[-1][:3], end)
        held = [piece_bytes(table, n, piece, is_part(spec, table, piece)) for piece in run]
        return sum(w + kv for w, kv, _ in held) + max(a for _, _, a in held)  # stage_bytes: never the whole model

    def first(b: int, holds) -> int:  # index of the first of boundary b's places where `holds` (it holds after)
        lo, hi = 0, len(places[b])
        while lo < hi:
            mid = (lo + hi) // 2
            lo, hi = (lo, mid) if holds(places[b][mid]) else (mid + 1, hi)
        return lo

    # per run, what it may hold: a stage, or anything if it fits none however small its slices are
    room = [capacity if load(r, places[r - 1][-1] if r else None, places[r][0] if r < len(breaks) else None)
            <= capacity else math.inf for r in range(len(starts) - 1)]
    least = [0] * len(breaks)  # per boundary, the earliest place from which the runs after it fit
    for b in reversed(range(len(breaks))):
        after = least[b + 1] if b + 1 < len(breaks) else None
        at = first(b, lambda x, b=b, after=after: load(b + 1, x, after) <= room[b + 1])
        if at == len(places[b]):
            return None
        least[b] = places[b][at]
    placed: list[int] = []
    for b, j in enumerate(breaks):
        low = max(least[b], placed[-1] + 1 if b and breaks[b - 1] == j - 1 else 0)  # a middle slice is not empty
        full = first(b, lambda x, b=b: load(b, placed[-1] if b else None, x) > room[b])
        if full == 0 or low > places[b][full - 1]:
            return None
        placed.append(min(max(cut[j][2], low), places[b][full - 1]))
    for j, x in zip(breaks, placed):
        cut[j - 1], cut[j] = (*cut[j - 1][:3], x), (*cut[j][:2], x, cut[j][3])
    return sizes_of(spec, table, cut)


def filled_to(spec: ModelSpec, table: SizeTable, p: int, capacity: int,
              tile_rows: int) -> tuple[PieceSizes, list[tuple[int, int]]] | None:
    """p stages of pieces cut where stages fill (filled_sizes) to the least budget that gives at most p
    of them, so that stage boundaries fall inside pieces (whose parts run side by side) rather than
    between them, split to exactly p if fewer (balanced_stages)."""
    lo, hi, best = 1, capacity, None
    while lo < hi:
        budget = (lo + hi) // 2
        sizes = filled_sizes(spec, table, budget, tile_rows)
        stages = greedy_stages(sizes, budget) if sizes is not None else None
        if stages is not None and len(stages) <= p:
            hi, best = budget, sizes
        else:
            lo = budget + 1
    best = best or filled_sizes(spec, table, capacity, tile_rows)
    ranges = balanced_stages(best, p, capacity) if best is not None else None
    return (best, ranges) if ranges is not None else None


CUT_PLACES = 32  # single_cut_stages cuts a piece at one of 31 places evenly spread along it (or each tile, if fewer)


def installed_bytes(table: SizeTable, piece: tuple[int, str, int, int], weights: int, kv: int) -> float:
    """Per-chip bytes a piece (or part) installs in its matrix units each decode step: its weights and the keys and
    values its step's users attend (of those it holds for every user); an embedding gathers its rows instead."""
    item, part = piece[:2]
    if part == "embed":
        return 0
    return weights + (kv * table.kv_read_fractions[item] if part == "attn" else 0)


def installs_per_step(table: SizeTable, sizes: PieceSizes) -> float:
    """Per-chip bytes installed along one decode step: each piece's largest part, as a cut piece's parts install
    side by side (a model of the step's length that needs no schedule)."""
    largest: dict[tuple[int, str], float] = {}
    for piece, w, kv in zip(sizes.pieces, sizes.weights, sizes.kv):
        largest[piece[:2]] = max(largest.get(piece[:2], 0), installed_bytes(table, piece, w, kv))
    return sum(largest.values())


def single_cut_stages(spec: ModelSpec, table: SizeTable, p: int, capacity: int,
                      tile_rows: int) -> tuple[PieceSizes, list[tuple[int, int]]] | None:
    """p stages whose boundaries fall where they take the most off the decode step, each piece (attention, MLP,
    embedding, head) cut at most once: a cut piece's two parts install side by side, so a boundary inside it
    saves its installs less the larger part's (installs_per_step), a boundary between pieces nothing. The
    spread's boundaries fall inside MLPs only, which, where a stage cannot hold two attentions with the MLP
    between (Llama 3.3 70B at 32,768 tokens for 8 users: 260 MB of 230), leaves the stages between the fewest
    and about one a layer no faster than the fewest; here a boundary may fall inside an attention too (its
    parts attend their shares of the KV slots). A dynamic program over the places a boundary may take
    (CUT_PLACES a piece) finds the p stages, each within capacity, of the most savings: for each count of
    stages, the best first stages ending at each place, from those ending within a stage's reach before it
    (a range maximum). None for fewer than 2 or more stages than whole pieces (the spread cuts MLPs into
    more slices there), or where no such stages fit."""
    import numpy as np  # here, not at the top: a compile that never arranges so need not load it

    wholes = pieces(spec, 1, units=table.ffn_units)
    if not 2 <= p <= len(wholes):
        return None
    n = spec.n_layers
    # per place: (piece index, cut: 0 before the piece), the bytes before it a stage beginning there does not
    # hold, those up to it a stage ending there holds, the activation buffers of the parts after and before
    # it, and what a boundary there saves
    rows, held, buffers = [], 0, []
    for j, whole in enumerate(wholes):
        item, part = whole[:2]
        w, kv, act = piece_bytes(table, n, whole, False)
        rows.append(((j, 0), held, held, 0, 0, 0))
        extent, step = cut_step(spec, table, whole, tile_rows)
        steps = (extent - 1) // step
        for k in sorted({max(1, round(steps * q / CUT_PLACES)) for q in range(1, CUT_PLACES)} if steps >= CUT_PLACES
                        else range(1, steps + 1)):
            (hw, hkv, hact), (tw, tkv, tact) = (piece_bytes(table, n, (item, part, lo, hi), True)
                                                for lo, hi in ((0, k * step), (k * step, extent)))
            saved = installed_bytes(table, whole, w, kv) - max(installed_bytes(table, whole, hw, hkv),
                                                               installed_bytes(table, whole, tw, tkv))
            rows.append(((j, k * step), held + w + kv - tw - tkv, held + hw + hkv, tact, hact, round(saved)))
        held += w + kv
        buffers.append(act)
    rows.append(((len(wholes), 0), held, held, 0, 0, 0))
    places, opened, closed, after, before, saves = zip(*rows)

    def load(a: int, b: int) -> int:  # stage_bytes of a stage from place a to place b
        (ja, ca), jb = places[a], places[b][0]
        return closed[b] - opened[a] + max(after[a], before[b], *buffers[ja + (ca > 0):jb])

    # per place b: the places [reach[b], last[b]] a stage ending at b may begin at (not inside b's own piece: a
    # piece is cut once); a stage holds less the later it begins, so the earliest rises with b (but see the
    # check at the end). A stage holding a part of the head does not hold the embedding too where they share a
    # tied table (_splits_a_tied_table).
    count, head = len(places), len(wholes) - 1
    after_embedding = places.index((1, 0))
    reach, last = np.zeros(count, dtype=np.int64), np.full(count, -1, dtype=np.int64)
    earliest = 0
    for b in range(1, count):
        j, c = places[b]
        end = b - 1
        while c and places[end][1]:
            end -= 1
        while earliest < end and load(earliest, b) > capacity:
            earliest += 1
        begin = max(earliest, after_embedding) if table.tied_table and (j, c) > (head, 0) else earliest
        if begin <= end and load(begin, b) <= capacity:
            reach[b], last[b] = begin, end
    unreached = np.iinfo(np.int64).min // 2
    gains = np.array(saves, dtype=np.int64)
    best = np.full(count, unreached, dtype=np.int64)
    best[0] = 0
    came_from = np.zeros((p, count), dtype=np.int64)
    for k in range(p):
        top, where = range_maxima(best, reach, last, unreached)
        best = np.where(top > unreached, top + gains, unreached)
        best[0] = unreached
        came_from[k] = where
    if best[-1] <= unreached:
        return None
    bounds = [count - 1]
    for k in reversed(range(p)):
        bounds.append(int(came_from[k][bounds[-1]]))
    cut, ranges = [], []
    for start, stop in zip(bounds[::-1], bounds[-2::-1]):
        (ja, ca), (jb, cb) = places[start], places[stop]
        first = len(cut)
        if ca:
            cut.append((*wholes[ja][:2], ca, cut_step(spec, table, wholes[ja], tile_rows)[0]))
        cut.extend(wholes[ja + (ca > 0):jb])
        if cb:
            cut.append((*wholes[jb][:2], 0, cb))
        ranges.append((first, len(cut)))
    sizes = sizes_of(spec, table, cut)
    # a stage beginning just inside a piece can hold more than one beginning before it (its part's partial-result
    # buffers outweighing the few KV slots it leaves out), so a reach can hold a start that does not fit: checked
    return (sizes, ranges) if all(stage_bytes(sizes, a, b) <= capacity for a, b in ranges) else None


def range_maxima(values, lo, hi, empty: int):
    """Per range i (numpy arrays lo and hi), the largest of values[lo[i]..hi[i]] and its index (the first of
    equals); `empty` and 0 where hi[i] < lo[i]. A sparse table: the maxima of runs of 1, 2, 4... values, two of
    which cover any range."""
    import numpy as np

    count = len(values)
    tops, wheres = [values], [np.arange(count)]
    while 2 ** len(tops) <= count:
        span, top, where = 2 ** (len(tops) - 1), tops[-1], wheres[-1]
        right = np.concatenate([top[span:], np.full(span, empty)])
        right_where = np.concatenate([where[span:], where[-span:]])
        tops.append(np.maximum(top, right))
        wheres.append(np.where(right > top, right_where, where))
    valid = hi >= lo
    level = np.zeros(len(lo), dtype=np.int64)
    level[valid] = np.log2(hi[valid] - lo[valid] + 1).astype(np.int64)
    out, at = np.full(len(lo), empty), np.zeros(len(lo), dtype=np.int64)
    for k in range(len(tops)):
        rows = valid & (level == k)
        left, right = lo[rows], hi[rows] - 2 ** k + 1
        take_right = tops[k][right] > tops[k][left]
        out[rows] = np.where(take_right, tops[k][right], tops[k][left])
        at[rows] = np.where(take_right, wheres[k][right], wheres[k][left])
    return out, at


# ---- chip numbering ---------------------------------------------------------------------------
def group_chips(system: SystemSpec, t: int, p: int) -> list[tuple[int, ...]] | None:
    """Chip ids of p TP groups of t chips; a group never straddles a node (t <= node) or a rack. Groups
    spanning nodes may leave nodes of a rack empty: those in its middle, so that the chips at either end of
    it, which hold its links to the other racks (SystemSpec's cabling), are the deployment's own and no
    route passes through a chip it lacks."""
    node, nodes = system.node.chips, system.rack.nodes
    empty = nodes - system.chips_per_rack // t * t // node if t > node else 0
    middle = range((nodes - empty) // 2, (nodes - empty) // 2 + empty)
    slots = [n * node + c for n in range(nodes) if n not in middle for c in range(node)]  # chips of a rack
    per_rack = len(slots) // t
    groups = [tuple(g // per_rack * system.chips_per_rack + c for c in slots[g % per_rack * t:(g % per_rack + 1) * t])
              for g in range(p)]
    if groups and groups[-1][-1] >= system.max_chips:
        return None
    return groups


# ---- the placement ----------------------------------------------------------------------------
def piece_name(piece: tuple[int, str, int, int], units: dict[int, int], vocab: int,
               by_expert: dict[int, int] | None = None) -> str:
    """'L3.ffn[0:4096]' for part of a layer's MLP (units: each layer's, as ffn_units gives), 'L3.ffn[experts
    8:16]' or '[experts 8:13.5]' for part of an MLP cut by expert rows (a layer of by_expert, as expert_rows
    gives: its range in experts), 'embed' when whole."""
    item, part, lo, hi = piece
    whole = {"embed": (0, vocab), "head": (0, vocab), "ffn": (0, units.get(item)), "attn": (0, 0)}[part]
    if (lo, hi) == whole:
        rows = ""
    elif part == "ffn" and item in (by_expert or {}):
        rows = f"[experts {lo / by_expert[item]:.4g}:{hi / by_expert[item]:.4g}]"
    else:
        rows = f"[{lo}:{hi}]"
    return (part if part in VOCAB_PARTS else f"L{item}.{part}") + rows


def fewest_stages(spec: ModelSpec, system: SystemSpec, table: SizeTable) -> tuple[int, PieceSizes] | None:
    """The fewest pipeline stages at the TP degree of `table`, with their piece sizes: whole pieces, or
    (fewer stages) pieces cut where stages fill. None if neither fits."""
    return _fewest_stages(spec, table, system.chip.sram_bytes, system.chip.matrix_tile_rows)


@functools.lru_cache(maxsize=64)  # as filled_sizes
def _fewest_stages(spec: ModelSpec, table: SizeTable, cap: int, tile_rows: int) -> tuple[int, PieceSizes] | None:
    best = None
    for sizes in (piece_sizes(spec, table), filled_sizes(spec, table, cap, tile_rows)):
        g = greedy_stages(sizes, cap) if sizes is not None else None
        if g is not None and (best is None or len(g) < best[0]):
            best = (len(g), sizes)
    return best


def mlp_cuts(spec: ModelSpec) -> tuple[bool, ...]:
    """How MLPs are cut and split over TP groups, in order of preference (the `experts` flag of
    size_table): by d_ff rows, which gives each chip the same share of a layer's work whatever the
    routing, as a static schedule needs; then, for a mixture of experts that rows cannot place (a chip
    keeps at least a weight tile of rows of every expert), by expert rows (expert parallelism)."""
    return (False, True) if spec.n_experts else (False,)


def fewest_chips(spec: ModelSpec, system: SystemSpec, workload: Workload,
                 decode_rows: int = 1, widths: list[int] | None = None, cuts: tuple[bool, ...] | None = None,
                 ) -> tuple[int, int, PieceSizes] | None:
    """(t, p, piece sizes): fewest_stages at the TP degree inside a node that places the model best, or,
    only when none fits, at the degree spanning whole nodes chosen by the same rule; with MLPs cut by
    rows, or, only when that places nothing, by expert (mlp_cuts). Best: within one node, the fewest
    stages, then the fewest chips (decode installs every weight once a token whatever the width, so what a
    token costs, chips x step time, goes with the stages: 7 stages x TP 1 take 7 times the chip time of
    1 x TP 8, for one chip less); beyond one node, the fewest nodes, then the wider degree (the same hosts,
    a faster step). `widths` limits the TP degrees tried (default: all of tp_candidates, in its order), `cuts`
    the ways of cutting MLPs (default: mlp_cuts)."""
    for experts in cuts or mlp_cuts(spec):
        best, best_key, node = None, None, system.node.chips
        for t in widths or tp_candidates(spec, system):
            if best is not None and best[0] <= node < t:
                break  # a node-local placement exists: never span nodes for a few chips less
            found = fewest_stages(spec, system, size_table(spec, workload, t, decode_rows, experts))
            if found is None or group_chips(system, t, found[0]) is None:
                continue
            used = t * found[0]
            key = (0, found[0], used) if used <= node else (1, math.ceil(used / node), -t)
            if best is None or key < best_key:
                best, best_key = (t, *found), key
        if best is not None:
            return best
    return None


def fewest_chips_any_cut(spec: ModelSpec, system: SystemSpec, workload: Workload, decode_rows: int = 1,
                         widths: list[int] | None = None) -> tuple[int, int, PieceSizes] | None:
    """fewest_chips with MLPs cut by d_ff rows, or by expert rows where a mixture of experts takes fewer chips so."""
    found = [f for cut in mlp_cuts(spec) if (f := fewest_chips(spec, system, workload, decode_rows, widths, (cut,)))]
    return min(found, key=lambda f: f[0] * f[1], default=None)


def least_chips(spec: ModelSpec, system: SystemSpec, workload: Workload, decode_rows: int, widths: list[int],
                beyond_largest: bool = False) -> int | None:
    """The fewest chips the pieces need at any of the TP degrees `widths` and MLP cuts, in groups the system's
    racks hold or, `beyond_largest`, were the system large enough (None if some piece fits a stage at none of
    them): what a chip count short of them is told it needs, where fewest_chips, choosing a placement, prefers
    fewer stages to a few chips less."""
    counts = [t * found[0] for experts in mlp_cuts(spec) for t in widths
              if (found := fewest_stages(spec, system, size_table(spec, workload, t, decode_rows, experts)))
              and (beyond_largest or group_chips(system, t, found[0]) is not None)]
    return min(counts, default=None)


def most_chips(spec: ModelSpec, system: SystemSpec, workload: Workload, decode_rows: int,
               widths: list[int]) -> dict[int, int]:
    """The most chips each TP degree of `widths` spreads the pieces over: one piece per stage, each MLP in
    the most slices it can be cut into (arrange places no more stages than pieces); degrees where no piece
    fits are left out."""
    cap, tile, most = system.chip.sram_bytes, system.chip.matrix_tile_rows, {}
    for experts in mlp_cuts(spec):
        for t in widths:
            table = size_table(spec, workload, t, decode_rows, experts)
            cuts = fitting_cuts(spec, table, cap, tile, max(most_slices(table, tile)))
            if cuts is None:
                continue
            p = len(cuts[3].pieces)
            while p and group_chips(system, t, p) is None:  # the groups the system's racks hold
                p = min(p - 1, system.max_chips // t)
            if p:
                most[t] = max(most.get(t, 0), t * p)
    return most


def tp_widths(spec: ModelSpec, system: SystemSpec, tp: int | None) -> list[int]:
    """The TP degrees a placement may use: the one asked for, which must be a candidate, or all."""
    candidates = tp_candidates(spec, system)
    if tp is None:
        return candidates
    check_count(tp, "TP width")
    if tp not in candidates:
        raise OpenLPUError(
            f"TP {tp} is not a width {spec.name} can be split over on {system.name}: it must divide the "
            f"{spec.n_heads} query heads, divide or be a multiple of the {spec.n_kv_heads} KV heads, be at most the "
            f"{spec.vocab_size:,}-token vocabulary, and fit a node "
            f"({system.node.chips} chips) or whole nodes of a rack ({system.chips_per_rack}); use one of "
            f"{', '.join(map(str, sorted(candidates)))}")
    return [tp]


def _megabytes(nbytes: float) -> str:
    """A chip's SRAM in whole MB, or to 3 figures below one (a hardware file's toy chip)."""
    return significant(round(nbytes / 1e6)) if nbytes >= 1e6 else significant(nbytes / 1e6)


def _no_fit(spec: ModelSpec, system: SystemSpec, workload: Workload, chips: int | None, decode_rows: int,
            widths: list[int]) -> OpenLPUError:
    cap = system.chip.sram_bytes
    best = fewest_chips_any_cut(spec, system, workload, decode_rows, widths)
    what = (f"{spec.name} ({workload.weights} weights, context {workload.context_length}, "
            f"{counted(workload.users, 'user')}{'' if len(widths) > 1 else f', TP {widths[0]}'})")
    if best is None and (beyond := least_chips(spec, system, workload, decode_rows, widths, True)) is not None:
        return OpenLPUError(
            f"{what} does not fit on any {system.name} system: it needs {beyond} chips, more than the largest "
            f"system ({system.max_chips}); lower --context or --users, or use a smaller precision")
    if best is None:
        return _no_piece_fits(spec, system, workload, decode_rows, widths)
    need = least_chips(spec, system, workload, decode_rows, widths)
    if chips is None:
        return OpenLPUError(f"{what} needs {need} chips")
    if chips < need:
        t, stages, sizes = best  # a tied table is held twice only when embedding and head are on different stages
        if len(widths) == 1 and chips < widths[0]:
            return OpenLPUError(f"{what}: a TP group of {widths[0]} chips is wider than the {chips} chips given; "
                                f"give at least {need} chips (--chips {need}) or a narrower --tp")
        held = (sum(sizes.weights) + sum(sizes.kv) - (sizes.tied_table if stages == 1 else 0)) * t / 1e9
        return OpenLPUError(f"{what} does not fit on {chips} {system.name} chips of {_megabytes(cap)} MB SRAM "
                            f"({chips * cap / 1e9:.2f} GB for {held:.2f} GB of weights and KV cache, and on each "
                            f"stage its activation buffers and the room whole pieces leave unfilled); it needs at "
                            f"least {need} chips (--chips {need})")
    degrees = f"TP degrees {', '.join(map(str, widths))}; " if len(widths) > 1 else ""
    unit = f"one {system.chip.matrix_tile_rows}-row weight tile" + (" (or one narrower expert)" if spec.n_experts
                                                                   else "")
    most = most_chips(spec, system, workload, decode_rows, widths)
    spread = ", ".join(f"{n} at TP {t}" for t, n in sorted(most.items()))
    return OpenLPUError(f"{chips} chips cannot be arranged as pipeline stages of equal TP groups for {what} "
                        f"({degrees}an MLP is cut between stages only into slices that leave each chip at least "
                        f"{unit}); it fits on {need} chips (--chips {need}) and on at most {spread}, in a multiple "
                        f"of the TP degree{'' if degrees else '; or leave out --tp, and some chips may be left idle'}")


def _finest_pieces(spec: ModelSpec, table: SizeTable, tile_rows: int) -> list[tuple[tuple[int, str, int, int], int]]:
    """Each piece cut as finely as the compiler cuts any, with the bytes it needs alone on a chip: an attention
    whole or holding one KV slot, whichever is less (its weights are never cut between stages), an MLP in
    its most slices (most_slices), the embedding and head at one vocabulary row per chip; of a cut attention
    or MLP, its last part, which also holds what acts on the combined result."""
    def alone(piece, split: bool) -> int:
        return sum(piece_bytes(table, spec.n_layers, piece, split))

    out = []
    for piece in pieces(spec, 1, slots=table.kv_slots, units=table.ffn_units):
        item, part, _, hi = piece
        if part == "attn":
            slots = table.kv_slots[item]
            out.append((piece, min(alone(piece, False), alone((item, part, slots - 1, slots), True))))
        elif part == "ffn":
            slices = most_slices(table, tile_rows)[item]
            last = -(-hi // slices)  # the last slice's rows
            out.append((piece, alone((item, part, hi - last, hi), slices > 1)))
        else:
            out.append((piece, alone((item, part, 0, min(hi, table.t)), hi > table.t)))
    return out


def _no_piece_fits(spec: ModelSpec, system: SystemSpec, workload: Workload, decode_rows: int,
                   widths: list[int]) -> OpenLPUError:
    """The refusal where some piece fits a chip at none of `widths`: the piece that fits least, cut as finely
    as it can be (_finest_pieces), at the widest of them, and the way out: the widths that place the model,
    where they were not tried, or else fewer users (where an attention's one KV slot of them all is part of
    what does not fit), fewer bytes per weight or a larger chip."""
    cap, t = system.chip.sram_bytes, widths[-1]
    table = size_table(spec, workload, t, decode_rows)
    (item, part, lo, hi), need = max(_finest_pieces(spec, table, system.chip.matrix_tile_rows), key=lambda x: x[1])
    shapes = spec.tensor_shapes()
    what = piece_name((item, part, lo, hi), ffn_units(shapes), spec.vocab_size)
    finest = {"attn": " (its weights and buffers, with one token's K and V)",
              "ffn": f" in its finest slice ({system.chip.matrix_tile_rows} rows a chip)",
              "embed": " at one vocabulary row a chip", "head": " at one vocabulary row a chip"}[part]
    if part == "ffn" and most_slices(table, system.chip.matrix_tile_rows)[item] == 1:
        finest = ""  # too few rows to cut
    others = [w for w in tp_candidates(spec, system) if w not in widths
              and fewest_chips(spec, system, workload, decode_rows, [w]) is not None]
    needs = f"{what} alone needs {need / 1e6:,.0f} MB per chip{finest}"
    if others:
        return OpenLPUError(f"{spec.name} does not fit in TP groups of {t}: {needs} at that width, and a chip holds "
                            f"{_megabytes(cap)} MB; it places in TP groups of {', '.join(map(str, sorted(others)))}: "
                            f"use one of those with --tp, or leave out --tp")
    needs += f" even at TP {t}"
    if part == "ffn" and spec.is_moe_layer(item):  # the finest cut by expert rows: a tile of them on a chip
        rows = size_table(spec, workload, 1, decode_rows, experts=True)
        tile = rows.ffn_tile(item, system.chip.matrix_tile_rows)
        needs += (f", and {tile} rows of its experts, the finest cut, hold "
                  f"{tile * rows.ffn_unit_bytes[item] / 1e6:,.0f} MB of weights")
    # an attention part holds one position of every user's K and V; the rest shrinks only with fewer bytes
    # per weight or a larger chip
    fewer = f"lower --users ({workload.users}), " if part == "attn" and workload.users > 1 else ""
    return OpenLPUError(f"{spec.name} does not fit on any {system.name} system: {needs} (a chip holds "
                        f"{_megabytes(cap)} MB; the largest system has {system.max_chips} chips); {fewer}use a "
                        f"smaller precision, or a system whose chips hold more SRAM (--system)")


def partition(spec: ModelSpec, system: SystemSpec, workload: Workload, chips: int | None = None,
              tp: int | None = None, decode_rows: int = 1, balance: bool = False, fit: bool = True,
              experts: bool | None = None, single_cuts: bool = False) -> Placement:
    """Place the model on exactly `chips` chips, or on as few as fit (None), in TP groups of `tp` chips
    (None: the widest inside a node that arranges, spanning nodes only where none does), with activation
    buffers for decode micro-batches of `decode_rows`, its stages arranged for the shortest decode step
    (MLP slices fitted to full stages as `fit` says, or each piece cut once with `single_cuts`) or, with
    `balance`, as even as can be (arrange), its MoE MLPs cut by rows or by expert rows as `experts` says (None:
    mlp_cuts' order; the fewest chips are counted in that order either way)."""
    return place(spec, system, workload,
                 *arrangement(spec, system, workload, chips, tp, decode_rows, balance, fit, experts, single_cuts))


def check_fits_some_system(spec: ModelSpec, system: SystemSpec, workload: Workload) -> None:
    """Refuse at once a workload whose KV cache, beside the weights (each weight once, each user's cache, no
    activation buffer), takes the SRAM of more chips than the largest system has: placing it would search for
    minutes before saying so. Weights too large alone are left to the placement, which names the piece."""
    weights = spec.param_count() * as_precision(workload.weights).bytes_per_element
    kv = spec.kv_values(workload.context_length) * as_precision(workload.kv).bytes_per_element * workload.users
    least = math.ceil((weights + kv) / system.chip.sram_bytes)
    if least > system.max_chips and weights <= system.max_chips * system.chip.sram_bytes:
        raise OpenLPUError(
            f"{spec.name} ({workload.weights} weights, context {workload.context_length}, "
            f"{counted(workload.users, 'user')}) does not fit on any {system.name} system: its weights and KV cache "
            f"alone take {(weights + kv) / 1e9:,.0f} GB, the SRAM of {least:,} chips, more than the largest system "
            f"({system.max_chips:,}); lower --context or --users, or use a smaller precision")


def check_chips(system: SystemSpec, chips: int) -> None:
    """Refuse a chip count that is not a positive integer or is more than the system has."""
    check_count(chips, "chips")
    if chips > system.max_chips:
        raise OpenLPUError(f"{chips} chips is more than the largest {system.name} system ({system.max_chips})")


def arrangement(spec: ModelSpec, system: SystemSpec, workload: Workload, chips: int | None = None,
                tp: int | None = None, decode_rows: int = 1, balance: bool = False, fit: bool = True,
                experts: bool | None = None,
                single_cuts: bool = False) -> tuple[int, PieceSizes, list[tuple[int, int]]]:
    """partition's choices before its shards are made: (TP width, piece sizes, each stage's range of
    pieces). Arrangements compare cheaply where Placements, with a shard per tensor and chip, do not."""
    if chips is not None:
        check_chips(system, chips)
    widths = tp_widths(spec, system, tp)
    cap = system.chip.sram_bytes
    if chips is None:
        best = fewest_chips(spec, system, workload, decode_rows, widths)
        if best is not None:  # those chips arranged as if asked for, else as fewest_stages packed them
            t, p, sizes = best
            table = size_table(spec, workload, t, decode_rows, sizes.experts if experts is None else experts)
            arranged = arrange(spec, table, p, cap, system.chip.matrix_tile_rows, balance, fit, single_cuts)
            return (t, *(arranged or (sizes, balanced_stages(sizes, p, cap))))
    else:
        for by_expert in mlp_cuts(spec) if experts is None else (experts,):
            for t in widths:
                if chips % t or group_chips(system, t, chips // t) is None:
                    continue
                arranged = arrange(spec, size_table(spec, workload, t, decode_rows, by_expert), chips // t, cap,
                                   system.chip.matrix_tile_rows, balance, fit, single_cuts)
                if arranged is not None:
                    return (t, *arranged)
    raise _no_fit(spec, system, workload, chips, decode_rows, widths)


def merged_pieces(run: tuple[tuple[int, str, int, int], ...]) -> tuple[tuple[int, str, int, int], ...]:
    """Pieces in order with adjacent ranges of one MLP, embedding, head or attention's KV slots joined
    into one range (a gap or an overlap leaves two entries)."""
    out: list[tuple[int, str, int, int]] = []
    for piece in run:
        if out and piece[2] < piece[3] and out[-1][:2] == piece[:2] and out[-1][3] == piece[2]:
            out[-1] = (*piece[:2], out[-1][2], piece[3])
        else:
            out.append(piece)
    return tuple(out)


def piece_homes(placement: Placement) -> dict[tuple[int, str], list[tuple[int, int, int]]]:
    """(item, part) -> [(stage, start, stop)] in pipeline order: one entry, or the parts of a cut MLP,
    embedding or head."""
    homes: dict[tuple[int, str], list[tuple[int, int, int]]] = {}
    for s in placement.stages:
        for item, part, lo, hi in s.pieces:
            homes.setdefault((item, part), []).append((s.index, lo, hi))
    return homes


def place(spec: ModelSpec, system: SystemSpec, workload: Workload, t: int, sizes: PieceSizes,
          ranges: list[tuple[int, int]]) -> Placement:
    """The Placement of an arrangement: its stages on their chip groups and every tensor's shards."""
    groups = group_chips(system, t, len(ranges))
    n = spec.n_layers
    stages = tuple(Stage(index=k, chips=groups[k], pieces=merged_pieces(sizes.pieces[lo:hi]),
                         kv_bytes_per_chip=sum(sizes.kv[lo:hi]), activation_bytes_per_chip=max(sizes.activations[lo:hi]))
                   for k, (lo, hi) in enumerate(ranges))
    placement = Placement(tp=t, stages=stages, shards=(), experts=sizes.experts)
    homes = piece_homes(placement)
    wb = as_precision(workload.weights).bytes_per_element
    shards = []
    for name, shape in spec.tensor_shapes().items():
        parts = homes[tensor_piece(name, n)]
        if is_cut_along_ffn(name) or is_cut_along_vocab(name):  # each part holds its rows
            copies = [(k, (lo, hi), False) for k, lo, hi in parts]
            if name == "token_embd.weight" and spec.tie_embeddings and len(placement.stages) > 1:
                # the head's copy of a tied table (its parts' rows): replicated on purpose
                copies += [(k, (lo, hi), True) for k, lo, hi in homes[(n, "head")]]
        elif name.endswith(APPLIED_BY_LAST_PART):  # applied once, by the last part of a cut piece
            copies = [(parts[-1][0], None, False)]
        else:  # every part of a cut piece recomputes its norm (router, attention inputs): copies on purpose
            copies = [(k, None, j > 0) for j, (k, _, _) in enumerate(parts)]
        elements = math.prod(shape)
        for k, rows, copy in copies:
            ranges = split_ranges(spec, name, shape, t, rows, sizes.experts)
            per_unit = elements // axis_length(name, shape, ranges[0][0])  # the same axis on every chip
            for chip, (axis, start, stop, rep) in zip(groups[k], ranges):
                shards.append(Shard(name, chip, axis, start, stop, math.ceil((stop - start) * per_unit * wb),
                                    rep or copy))
    return Placement(tp=t, stages=stages, shards=tuple(shards), experts=sizes.experts)


def clear_caches() -> None:
    """Empty this module's caches, so that the next compile runs as the first in a process does (what
    bench/plan_speed.py times)."""
    for cached in (lowered_passes, size_table, filled_sizes, _fewest_stages):
        cached.cache_clear()
