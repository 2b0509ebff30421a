"""Placement: which chip holds which weight shard, KV region and activation buffer.

A model is a chain of items (the embedding, each layer, the head = final norm + lm_head). Pipeline
stages take contiguous runs of items; inside a stage a tensor-parallel (TP) group of t chips splits
every layer: attention by heads, the MLP by d_ff (column split of gate/up, row split of down), the
vocabulary of the embedding and lm_head by rows. Small vectors (norms, the MoE router) are
replicated on purpose. A TP group stays inside one node (full mesh) when the layers fit; only when
one layer cannot fit on a node does the group span whole nodes of one rack.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

from openlpu.compiler.program import Placement, Shard, Stage, Workload
from openlpu.errors import OpenLPUError
from openlpu.graph.lower import as_precision, lower
from openlpu.graph.ops import Op
from openlpu.hardware.lpu import SystemSpec
from openlpu.models.spec import ModelSpec

EMBED = -1  # item index of the embedding; the head is item n_layers


# ---- how each tensor splits -------------------------------------------------------------------
# suffix -> (axis split across the TP group, what one split unit is: "head", "kv_head", "row")
SPLIT_RULES = {
    "attn_q.weight": (0, "head"), "attn_q.bias": (0, "head"),
    "attn_k.weight": (0, "kv_head"), "attn_k.bias": (0, "kv_head"),
    "attn_v.weight": (0, "kv_head"), "attn_v.bias": (0, "kv_head"),
    "attn_output.weight": (1, "head"),
    "ffn_gate.weight": (0, "row"), "ffn_up.weight": (0, "row"), "ffn_down.weight": (1, "row"),
    "ffn_gate_exps.weight": (1, "row"), "ffn_up_exps.weight": (1, "row"), "ffn_down_exps.weight": (2, "row"),
    "token_embd.weight": (0, "row"), "output.weight": (0, "row"),
}


def item_of_tensor(name: str, n_layers: int) -> int:
    if name.startswith("blk."):
        return int(name.split(".")[1])
    return EMBED if name == "token_embd.weight" else n_layers


def split_ranges(spec: ModelSpec, tensor: str, shape: tuple[int, ...], t: int) -> list[tuple[int, int, int, bool]]:
    """Per TP rank: (axis, start, stop, replicated). Units split as evenly as they go."""
    rule = SPLIT_RULES.get(tensor.split(".", 2)[-1] if tensor.startswith("blk.") else tensor)
    if rule is None or t == 1:
        return [(0, 0, shape[0], t > 1)] * t
    axis, unit = rule
    size = {"head": spec.head_dim, "kv_head": spec.head_dim, "row": 1}[unit]
    units = shape[axis] // size
    if unit == "kv_head" and t > units:  # fewer KV heads than chips: t/units chips share each head
        group = t // units
        return [(axis, (r // group) * size, (r // group + 1) * size, True) for r in range(t)]
    bounds = [r * units // t for r in range(t + 1)]
    return [(axis, bounds[r] * size, bounds[r + 1] * size, False) for r in range(t)]


def tp_candidates(spec: ModelSpec, system: SystemSpec) -> list[int]:
    """TP degrees in order of preference: inside a node (largest first), then whole nodes of a rack."""
    def heads_ok(t):
        return spec.n_heads % t == 0 and (spec.n_kv_heads % t == 0 or t % spec.n_kv_heads == 0)
    node = system.node.chips
    local = [t for t in range(node, 0, -1) if node % t == 0 and heads_ok(t)]
    spanning = [t for t in range(2 * node, system.chips_per_rack + 1, node) if heads_ok(t)]
    return local + spanning


# ---- how each op's work divides over a TP group (by the op name's last part) ----------------
#   col: output columns split with its weight; row: input split, partial sums all-reduced after;
#   heads / kv_heads: attention heads split; split: elementwise on a split tensor;
#   gather: vocabulary-split embedding rows, all-reduced after; replicated: every chip does it all.
OP_SPLIT = {
    "attn_q": "col", "attn_k": "col", "attn_v": "col", "ffn_gate": "col", "ffn_up": "col",
    "ffn_gate_exps": "col", "ffn_up_exps": "col", "output": "col",
    "attn_output": "row", "ffn_down": "row", "ffn_down_exps": "row",
    "attn_q_norm": "heads", "rope": "heads", "attention": "heads", "attn_softcap": "heads",
    "attn_k_norm": "kv_heads",
    "ffn_act": "split", "final_softcap": "split", "sample": "split",
    "token_embd": "gather",
}


def op_role(op: Op) -> str:
    return OP_SPLIT.get(op.name.rsplit("/", 1)[-1].split(".")[-1], "replicated")  # "c1/blk.3.attn_q" -> attn_q


def op_item(op: Op, n_layers: int) -> int:
    if op.layer >= 0:
        return op.layer
    return EMBED if op.kind == "embed" else n_layers


def kv_heads_per_chip(spec: ModelSpec, t: int) -> int:
    return max(1, spec.n_kv_heads // t)


def op_fractions(spec: ModelSpec, op: Op, t: int, weight_fraction: float) -> tuple[float, float, float, float]:
    """Per-chip shares of (compute, activations read, activations written, KV) of one op."""
    f_heads = 1.0 / t
    f_kv = kv_heads_per_chip(spec, t) / spec.n_kv_heads
    f_w = weight_fraction
    compute, f_in, f_out = {
        "col": (f_w, 1.0, f_w), "row": (f_w, f_w, 1.0), "heads": (f_heads, f_heads, f_heads),
        "kv_heads": (f_kv, f_kv, f_kv), "split": (f_heads, f_heads, f_heads),
        "gather": (f_heads, 1.0, 1.0), "replicated": (1.0, 1.0, 1.0)}[op_role(op)]
    return compute, f_in, f_out, f_kv


def weight_fraction(spec: ModelSpec, shapes: dict, tensor: str | None, t: int) -> float:
    """The largest share of `tensor` one chip of a TP group of t holds."""
    if tensor is None:
        return 1.0
    shape = shapes[tensor]
    return max((stop - start) / shape[axis] for axis, start, stop, _ in split_ranges(spec, tensor, shape, t))


# ---- sizes ------------------------------------------------------------------------------------
@dataclass(frozen=True)
class ItemSizes:
    """Per-chip bytes of each item at one TP degree."""
    weights: tuple[int, ...]  # index 0 = embedding, 1..L = layers, L+1 = head
    kv: tuple[int, ...]
    activations: tuple[int, ...]
    tied_table: int  # per-chip bytes of a tied embedding table, counted in both embedding and head


def lowered_passes(spec: ModelSpec, workload: Workload) -> list[list[Op]]:
    """The passes a stage's activation buffers must serve: one decode token, one prefill chunk."""
    chunk = min(workload.prompt_len, workload.prefill_chunk)
    kw = dict(kv_precision=workload.kv, act_precision=workload.activations)
    return [lower(spec, "decode", workload.context_length, 1, workload.weights, **kw),
            lower(spec, "prefill", chunk, 1, workload.weights, **kw)]


def activation_peaks(spec: ModelSpec, passes: list[list[Op]], t: int) -> list[float]:
    """Per item slot, the most activation bytes one chip holds at once: outputs live from their op's
    start to their last consumer (ops in graph order), the item's input held throughout, plus one
    output of slack for an op on another unit starting early."""
    n, shapes = spec.n_layers, spec.tensor_shapes()
    peaks = [0.0] * (n + 2)
    for ops in passes:
        by_name = {op.name: op for op in ops}
        last_user: dict[str, str] = {}
        for op in ops:
            for i in op.inputs:
                last_user[i] = op.name
        live: dict[int, float] = {}
        largest: dict[int, float] = {}
        held: dict[int, dict[str, float]] = {}
        for op in ops:
            slot = op_item(op, n) + 1
            out = op.act_write_bytes * op_fractions(spec, op, t, weight_fraction(spec, shapes, op.weight, t))[2]
            bufs = held.setdefault(slot, {})
            for i in op.inputs:  # inputs from another item arrive as a full copy
                if op_item(by_name[i], n) + 1 != slot:
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


def item_sizes(spec: ModelSpec, workload: Workload, t: int, passes: list[list[Op]] | None = None) -> ItemSizes:
    wb = as_precision(workload.weights).bytes_per_element
    kb = as_precision(workload.kv).bytes_per_element
    n = spec.n_layers
    weights, tied_table = [0.0] * (n + 2), 0.0
    for name, shape in spec.tensor_shapes().items():
        largest = max((stop - start) * math.prod(shape) // shape[axis]
                      for axis, start, stop, _ in split_ranges(spec, name, shape, t))
        weights[item_of_tensor(name, n) + 1] += largest * wb
        if name == "token_embd.weight" and spec.tie_embeddings:
            weights[n + 1] += largest * wb  # the head reads it too (shared only when on the same stage)
            tied_table = largest * wb
    kv = [0.0] * (n + 2)
    for i in range(n):
        tokens = min(workload.context_length, spec.layer_window(i) or workload.context_length)
        kv[i + 1] = workload.users * tokens * 2 * kv_heads_per_chip(spec, t) * spec.head_dim * kb
    acts = activation_peaks(spec, passes if passes is not None else lowered_passes(spec, workload), t)
    return ItemSizes(tuple(math.ceil(w) for w in weights), tuple(math.ceil(k) for k in kv),
                     tuple(math.ceil(a) for a in acts), math.ceil(tied_table))


def stage_bytes(sizes: ItemSizes, lo: int, hi: int) -> int:
    """Per-chip SRAM of a stage holding item slots lo..hi-1 (slot = item + 1)."""
    shared = sizes.tied_table if lo == 0 and hi == len(sizes.weights) else 0  # one tied table, not two
    return sum(sizes.weights[lo:hi]) - shared + sum(sizes.kv[lo:hi]) + max(sizes.activations[lo:hi])


def greedy_stages(sizes: ItemSizes, capacity: int) -> list[tuple[int, int]] | None:
    """Fewest contiguous stages each within capacity (None if one item alone does not fit)."""
    slots, out, lo = len(sizes.weights), [], 0
    while lo < slots:
        hi = lo + 1
        if stage_bytes(sizes, lo, hi) > capacity:
            return None
        while hi < slots and stage_bytes(sizes, lo, hi + 1) <= capacity:
            hi += 1
        out.append((lo, hi))
        lo = hi
    return out


def balanced_stages(sizes: ItemSizes, p: int, capacity: int) -> list[tuple[int, int]] | None:
    """Exactly p contiguous stages minimising the largest stage (binary search on the bound)."""
    slots = len(sizes.weights)
    if p > slots:
        return None
    lo_b, hi_b = 1, capacity
    fewest = greedy_stages(sizes, capacity)
    if fewest is None or len(fewest) > p:
        return None
    while lo_b < hi_b:
        mid = (lo_b + hi_b) // 2
        g = greedy_stages(sizes, mid)
        if g is not None and len(g) <= p:
            hi_b = mid
        else:
            lo_b = mid + 1
    stages = greedy_stages(sizes, lo_b)
    while len(stages) < p:  # split the widest multi-item stage in two
        k = max((i for i, (a, b) in enumerate(stages) if b - a > 1), key=lambda i: stages[i][1] - stages[i][0])
        a, b = stages[k]
        stages[k:k + 1] = [(a, (a + b) // 2), ((a + b) // 2, b)]
    return stages


# ---- chip numbering ---------------------------------------------------------------------------
def group_chips(system: SystemSpec, t: int, p: int) -> list[tuple[int, ...]] | None:
    """Chip ids of p TP groups of t chips; a group never straddles a node (t <= node) or a rack."""
    per_rack = system.chips_per_rack // t
    groups = [tuple(range((g // per_rack) * system.chips_per_rack + (g % per_rack) * t,
                          (g // per_rack) * system.chips_per_rack + (g % per_rack) * t + t)) for g in range(p)]
    if groups and groups[-1][-1] >= system.max_chips:
        return None
    return groups


# ---- the placement ----------------------------------------------------------------------------
def _describe(spec: ModelSpec, lo: int, hi: int) -> str:
    names = ["embedding" if s == 0 else "head" if s == spec.n_layers + 1 else f"layer {s - 1}" for s in (lo, hi - 1)]
    return names[0] if lo == hi - 1 else f"{names[0]} to {names[1]}"


def fewest_chips(spec: ModelSpec, system: SystemSpec, workload: Workload,
                 passes: list[list[Op]] | None = None) -> tuple[int, int] | None:
    """(t, p) using the fewest chips, with TP groups inside a node whenever any such placement fits;
    ties go to the earlier (preferred) TP degree."""
    best = None
    node = system.node.chips
    passes = passes if passes is not None else lowered_passes(spec, workload)
    for t in tp_candidates(spec, system):
        if best is not None and best[0] <= node < t:
            break  # a node-local placement exists: never span nodes for a few chips less
        g = greedy_stages(item_sizes(spec, workload, t, passes), system.chip.sram_bytes)
        if g is None or group_chips(system, t, len(g)) is None:
            continue
        if best is None or t * len(g) < best[0] * best[1]:
            best = (t, len(g))
    return best


def _no_fit(spec: ModelSpec, system: SystemSpec, workload: Workload, chips: int | None, passes) -> OpenLPUError:
    cap = system.chip.sram_bytes
    best = fewest_chips(spec, system, workload, passes)
    if best is None:
        t = tp_candidates(spec, system)[-1]
        sizes = item_sizes(spec, workload, t, passes)
        worst = max(range(len(sizes.weights)), key=lambda s: stage_bytes(sizes, s, s + 1))
        need = stage_bytes(sizes, worst, worst + 1)
        return OpenLPUError(
            f"{spec.name} does not fit on any {system.name} system: {_describe(spec, worst, worst + 1)} alone needs "
            f"{need / 1e6:.1f} MB per chip even split {t} ways (a chip holds {cap / 1e6:.0f} MB; the largest system "
            f"has {system.max_chips} chips); lower --context ({workload.context_length}) or --users "
            f"({workload.users}), or use a smaller precision")
    need = best[0] * best[1]
    what = (f"{spec.name} ({workload.weights} weights, context {workload.context_length}, "
            f"{workload.users} user(s))")
    if chips is None:
        return OpenLPUError(f"{what} needs {need} chips")
    if chips < need:
        sizes = item_sizes(spec, workload, best[0], passes)
        held = (sum(sizes.weights) + sum(sizes.kv)) * best[0] / 1e9
        return OpenLPUError(f"{what} does not fit on {chips} {system.name} chips of {cap / 1e6:.0f} MB SRAM "
                            f"({chips * cap / 1e9:.1f} GB for {held:.1f} GB of weights and KV cache plus activation "
                            f"buffers); it needs at least {need} chips (--chips {need})")
    return OpenLPUError(f"{chips} chips cannot be arranged as pipeline stages of equal TP groups for {what} "
                        f"(TP degrees {tp_candidates(spec, system)}, at most {spec.n_layers + 2} stages); "
                        f"it fits on {need} chips (--chips {need})")


def partition(spec: ModelSpec, system: SystemSpec, workload: Workload, chips: int | None = None) -> Placement:
    """Place the model on exactly `chips` chips, or on as few as fit (None)."""
    if chips is not None and (isinstance(chips, bool) or not isinstance(chips, int) or chips <= 0):
        raise OpenLPUError(f"chips must be a positive integer, got {chips!r}")
    if chips is not None and chips > system.max_chips:
        raise OpenLPUError(f"{chips} chips is more than the largest {system.name} system ({system.max_chips})")
    cap, passes = system.chip.sram_bytes, lowered_passes(spec, workload)
    if chips is None:
        best = fewest_chips(spec, system, workload, passes)
        if best is not None:
            t, p = best
            sizes = item_sizes(spec, workload, t, passes)
            return _place(spec, system, workload, t, sizes, balanced_stages(sizes, p, cap))
    else:
        for t in tp_candidates(spec, system):
            if chips % t or group_chips(system, t, chips // t) is None:
                continue
            sizes = item_sizes(spec, workload, t, passes)
            ranges = balanced_stages(sizes, chips // t, cap)
            if ranges is not None:
                return _place(spec, system, workload, t, sizes, ranges)
    raise _no_fit(spec, system, workload, chips, passes)


def _place(spec: ModelSpec, system: SystemSpec, workload: Workload, t: int, sizes: ItemSizes,
           ranges: list[tuple[int, int]]) -> Placement:
    groups = group_chips(system, t, len(ranges))
    n = spec.n_layers
    slot_stage = {s: k for k, (lo, hi) in enumerate(ranges) for s in range(lo, hi)}
    wb = as_precision(workload.weights).bytes_per_element
    stages = tuple(Stage(index=k, chips=groups[k], items=tuple(s - 1 for s in range(lo, hi)),
                         kv_bytes_per_chip=sum(sizes.kv[lo:hi]), activation_bytes_per_chip=max(sizes.activations[lo:hi]))
                   for k, (lo, hi) in enumerate(ranges))
    shards = []
    for name, shape in spec.tensor_shapes().items():
        homes = [slot_stage[item_of_tensor(name, n) + 1]]
        if name == "token_embd.weight" and spec.tie_embeddings and slot_stage[n + 1] != homes[0]:
            homes.append(slot_stage[n + 1])  # the head's copy of a tied table: replicated on purpose
        for copy, k in enumerate(homes):
            for chip, (axis, start, stop, rep) in zip(groups[k], split_ranges(spec, name, shape, t)):
                nbytes = math.ceil((stop - start) * math.prod(shape) // shape[axis] * wb)
                shards.append(Shard(name, chip, axis, start, stop, nbytes, rep or copy > 0))
    return Placement(tp=t, stages=stages, shards=tuple(shards))
