"""Static schedule: the cycle each op starts and ends on its TP group, and every transfer on the links.

List scheduling in graph order (the lowered ops are topologically sorted): an op starts when its
unit is free and all its inputs are on its chips; it lasts as long as the slowest of its arithmetic
(flops over the unit's per-cycle throughput), its SRAM traffic (bytes over SRAM bytes per cycle) and,
for a matrix op with weights, installing those weights into the weight-stationary matrix unit (bytes
over the install rate): at batch 1 every installed weight serves one vector, so installs bound decode.
Attention installs the keys and values it attends the same way (its queries are the vectors).
MoE expert matmuls install every expert the chip holds: routing is data dependent and the schedule is
fixed at compile time, so it reserves the slots of all experts (their shares of the expert tensors); an
MLP cut by expert rows reserves, too, the matrix work of every token choosing the chip's experts.
Row-split matmuls and the vocabulary-split embedding and sampler end in an all-reduce over the
group's links. Every chip of a stage holds its activations after the all-reduce, so each sends its
share (1/t) to the same rank of the next stage over its own links ("stripe"), and that group gathers the
shares ("all_gather": the all-reduce's second half); the sampler's (value, index) pair, which does not
split, goes to the next stage's first chip, which broadcasts it.
A collective is scheduled step by step (_collective_flows): each step is a phase on its own links,
starting once the step before it has arrived and those links are free for as long as it lasts (a gap
that transfers placed earlier left will do). Routes keep to the deployment's chips (_route); flows
between two nodes of a rack may also spread over its other nodes (_routings), each step taking the
routing that arrives first.
An MLP cut between stages runs once per part on that part's d_ff rows, or its expert rows when cut by
expert (and its share of a shared expert's rows) (ops "name@j" for part j >= 1;
part 0 keeps the plain names): each part recomputes the norm (and router) from the residual it is
sent, the parts' down projections are summed ("ffn_sum@n"), and the last part adds the experts' down
biases (gpt-oss, with its own routing), applies the post-norm and the residual add. A vocabulary-split
embedding runs the same way, its parts' gathered rows summed ("embed_sum@n"); each part of a split head
recomputes the final norm, computes its rows' logits and their maximum, and the larger (value, index)
wins ("sample_max@n"); the last part holds the sampled token. An attention split along its KV slots
runs its norm, projections, rope and attention once per part, each part's attention on its share of
the keys (keys_in_slots); the partials merge ("attn_merge@n": per head, the outputs reweighted by their
log-sum-exps), and the last part applies the sinks (gpt-oss), the output projection and its bias, the
post-norm and the residual add. Each of these combinations is associative, so K parts combine in a
binary tree toward the last part: each half first, then the two halves, on the stage of the right
half's last part (K - 1 ops numbered n = 1..K-1, the last the root), in ceil(log2 K) rounds rather than
K - 1 hops down the pipeline; a combining op's remote input leaves once its stage's previous
combination has ended, so at most one waits there (the partition gives a part room for two partials).
A result that several stages read (the residual every attention part and MLP part recomputes its norm
from) spreads to them along a binomial tree (_spread), each stage that has it passing it on, so it does
not queue on the links near its source. A partial is split by heads over the group, so it moves rank r
to rank r of the next group ("rank_p2p"). A decode step carries one micro-batch of users, whose rows
stream through one install of each weight (each row still attends its own user's keys and values): as
many as serve each user soonest, which the compiler finds from steps scheduled at a few sizes (decode_rows,
predicted_rows), so one user per step while the users fit the pipeline. In a prefill, a stage starts prompt
chunk c only once its last op of chunk c-1 has ended and every result
of chunk c-1 it sends has arrived, and chunk c's results land on it only once its ops of chunk c-1
have ended: like a user's token in decode, a chunk holds a stage's activation buffers alone, which is
what the partition reserves (a prompt's token ids are all known at once, so without this rule every
chunk's embedding gather would start at once and wait in SRAM; a result whose sends queue on busy links
would still be held when the next chunk's ops begin; and a stage faster than the one after it would
pile its chunks up there).
"""

from __future__ import annotations

import bisect
import dataclasses
import itertools
import math
import operator

from openlpu.compiler.partition import (CUT_SEPARATOR, EMBED, EXPERT_ROWS, axis_length, expert_spans, ffn_units,
                                        item_of_tensor, kv_slots, lowered_decode, op_fractions, op_item, op_piece,
                                        op_role, op_suffix, piece_homes, prefill_chunks, suffix_role)
from openlpu.compiler.program import PhaseSchedule, Placement, ScheduledOp, Transfer, Workload, transfer_ends
from openlpu.errors import OpenLPUError
from openlpu.graph.lower import PRECISIONS, as_precision, attended_keys, keys_in_slots, lower
from openlpu.graph.ops import Op
from openlpu.hardware.lpu import ChipSpec, SystemSpec
from openlpu.models.spec import ModelSpec

TOKEN_ID_BYTES = 4  # the sampled token going back to the embedding stage
ARGMAX_BYTES = 8  # (value, index) each chip contributes to the sampler's all-reduce
NEEDS_ALL_REDUCE = ("row", "gather", "argmax")
# the op combining a split piece's parts
CHAINED = {"ffn": "ffn_sum", "embed": "embed_sum", "head": "sample_max", "attn": "attn_merge"}
ONCE_ON_LAST_PART = ("attn_sinks", "attn_output", "attn_output_bias", "post_attention_norm", "attn_residual",
                     "ffn_exps_bias", "post_ffw_norm", "ffn_residual")
MERGE_FLOPS_PER_ELEMENT = 3  # rescale the running and the own partial by exp(lse - new lse), add
FLOAT_PRECISIONS = ("fp32", "fp16", "bf16", "fp8", "fp4")


def matrix_macs_per_cycle(system: SystemSpec, *precisions: str) -> float:
    """MACs per cycle for operands in these precisions, in the matrix unit's matrix_mode for them."""
    return system.chip.matrix_macs_per_cycle[matrix_mode(system, *precisions)]


def _widest(precisions: tuple[str, ...]):
    """The widest of these operand precisions (graph.lower's Precision), whose mode the matrix unit needs."""
    return max((as_precision(p) for p in precisions), key=lambda p: p.bytes_per_element)


def matrix_mode(system: SystemSpec, *precisions: str) -> str:
    """The matrix unit's mode for operands in these precisions: the chip's narrowest that holds the widest
    operand (integers may run on a float mode, floats never on an integer mode), of the operand's own kind
    where two are as narrow (int8 operands on int8, not fp8)."""
    need = _widest(precisions)
    is_float = need.name in FLOAT_PRECISIONS
    modes = [(PRECISIONS[m].bytes_per_element, (m in FLOAT_PRECISIONS) != is_float, m)
             for m in system.chip.matrix_macs_per_cycle
             if m in PRECISIONS and PRECISIONS[m].bytes_per_element >= need.bytes_per_element
             and (m in FLOAT_PRECISIONS or not is_float)]
    if not modes:
        raise OpenLPUError(f"{system.name}'s matrix unit has no mode for {need.name} operands (it has "
                           f"{', '.join(system.chip.matrix_macs_per_cycle)}); choose another --precision (weights and "
                           f"activations; `compile` also takes --kv-precision) or another --system")
    return min(modes)[-1]


def matrix_mode_note(system: SystemSpec, *precisions: str) -> str:
    """What `plan` and `compile` say where the matrix unit has no mode for the widest of these operands: the mode
    its matmuls run in instead ('' where it has one)."""
    need = _widest(precisions).name
    mode = matrix_mode(system, *precisions)
    return "" if mode == need else f"{system.name}'s matrix unit has no {need} mode: its matmuls run in its {mode} mode"


def unit_rates(chip: ChipSpec, matrix_macs: float) -> dict[str, float]:
    """Work per cycle of each functional unit of `chip`, its matrix unit doing
    `matrix_macs` MACs a cycle; memory moves bytes at the SRAM's rate alone."""
    return {"matrix": 2 * matrix_macs, "vector": chip.vector_ops_per_cycle, "switch": chip.switch_bytes_per_cycle,
            "memory": math.inf}


# ---- collectives ------------------------------------------------------------------------------
def _collective_flows(system: SystemSpec, group: tuple[int, ...], kind: str) -> list[list[tuple[int, int, float]]]:
    """Phases of (src, dst, fraction of the payload). All-reduce: direct reduce-scatter then
    all-gather inside each node (full mesh); across nodes the same again between same-rank chips.
    All-gather: the all-reduce's gathering half, from each chip holding its share."""
    nodes: dict[int, list[int]] = {}
    for c in group:
        nodes.setdefault(system.node_of(c), []).append(c)
    members = list(nodes.values())
    if kind == "all_gather":
        phases = _collective_flows(system, group, "all_reduce")
        return phases[len(phases) // 2:]
    if kind == "broadcast":  # to one chip of every other node and the source's own node, then inside them
        first = [(group[0], c, 1.0) for c in members[0][1:]] + [(group[0], m[0], 1.0) for m in members[1:]]
        fan_out = [(m[0], c, 1.0) for m in members[1:] for c in m[1:]]
        return [first, fan_out] if fan_out else [first]
    per_node = len(members[0])
    local = [(a, b, 1.0 / per_node) for m in members for a in m for b in m if a != b]
    phases = [local]
    if len(members) > 1:
        share = 1.0 / (per_node * len(members))
        across = [(m1[r], m2[r], share) for r in range(per_node) for m1 in members for m2 in members if m1 is not m2]
        phases += [across, across]
    return [p for p in phases + [local] if p]  # nodes of one chip each have no steps inside a node


def _phase_routing(system: SystemSpec, flows: list[tuple[int, int, float]], route) -> tuple:
    """(latency s, worst payload fraction / bandwidth over its links, its links' (from chips, to chips, payload
    fractions they carry), in link order) of one phase's flows (src, dst, payload fraction), each along
    route(src, dst)."""
    load: dict[tuple[int, int], float] = {}
    latency = 0.0
    for src, dst, frac in flows:
        path = route(src, dst)
        latency = max(latency, system.route_latency_s(path))
        for a, b in zip(path, path[1:]):
            load[(a, b)] = load.get((a, b), 0.0) + frac
    worst = max(frac / system.links[system.link_kind(*link)].bandwidth_bytes_per_s for link, frac in load.items())
    links = sorted(load.items())
    return latency, worst, (tuple(a for (a, _), _ in links), tuple(b for (_, b), _ in links),
                            tuple(f for _, f in links))


def _routings(system: SystemSpec, flows: list[tuple[int, int, float]], transit: tuple[int, ...], route) -> tuple:
    """The routings a phase's flows may take (_phase_routing's rows): along route(src, dst) and, where flows
    run between two of `transit`, nodes of a rack the deployment holds whole, one spreading them over the
    others too. Two nodes of a rack share a single link, and the software-scheduled network may send a
    flow through a third node instead (a non-minimal Dragonfly path; ISCA 2022), so each flow between two
    nodes takes the direct link or a route through one of the other transit nodes, in turn by its sender's
    rank: longer routes, but fewer bytes on each link. Each step takes whichever arrives first."""
    def vias(src: int, dst: int) -> list[int]:
        a, b = system.node_of(src), system.node_of(dst)
        if a == b or a not in transit or b not in transit:
            return []
        return [n for n in transit if n not in (a, b)]

    def spread(src: int, dst: int) -> tuple[int, ...]:
        choices = [None] + vias(src, dst)
        via = choices[(src % system.node.chips + system.node_of(src) + system.node_of(dst)) % len(choices)]
        return route(src, dst) if via is None else system.route_via(src, dst, via)

    along = _phase_routing(system, flows, route)
    if len(flows) < 2 or not any(vias(src, dst) for src, dst, _ in flows):  # one flow has nothing to share out
        return (along,)
    return along, _phase_routing(system, flows, spread)


def _collective_template(system: SystemSpec, group: tuple[int, ...], kind: str, transit: tuple[int, ...]) -> tuple:
    """Per step of a collective on `group`, its routings (_routings)."""
    return tuple(_routings(system, flows, transit, system.route) for flows in _collective_flows(system, group, kind))


def _at(base: int, chips: tuple[tuple[int, ...], ...]) -> tuple:
    """Columns of a template's chips, placed at chip `base` (map, not a loop: templates carry thousands)."""
    return chips if base == 0 else tuple(map(operator.add, column, itertools.repeat(base)) for column in chips)


def _shifted(routings: tuple, by: int) -> tuple:
    """_routings' rows with every chip moved by `by`."""
    return tuple((latency, worst, (*map(tuple, _at(by, loads[:2])), loads[2])) for latency, worst, loads in routings)


@dataclasses.dataclass
class _Routing:
    """One way a transfer's step can go, at one place and payload."""
    cycles: int
    link_set: int  # _Scheduler._link_set's index of the links it loads
    loads: tuple  # (from chips, to chips, payload fractions) of its links as the template has them, before its base
    links: tuple | None = None  # ((from chip, to chip, bytes), ...), made once the step first goes this way


class _Scheduler:
    def __init__(self, spec: ModelSpec, system: SystemSpec, workload: Workload, placement: Placement,
                 templates: dict, staged: _Staged, via_other_nodes: bool):
        self.spec, self.system, self.workload, self.placement = spec, system, workload, placement
        self.clock = system.chip.clock_hz
        self.unit_free: dict[tuple[int, str], int] = {}
        self.combined: dict[int, int] = {}  # stage -> the end of the last combining op placed there
        # sets of directed links that steps load (_link_set): per set, the (starts, ends) of the steps reserving
        # it, in order (they never overlap, so the last end is the latest); the sets sharing a link with each
        self.link_set_index: dict[tuple[tuple[int, int], ...], int] = {}
        self.link_set_busy: list[tuple[list[int], list[int]]] = []
        self.clashes: list[list[int]] = []
        self.link_sets_on: dict[tuple[int, int], list[int]] = {}
        self.placed_link_sets: dict[tuple, int] = {}  # (template key, base, step, routing) -> its link set
        self.ready: dict[str, tuple[int, int]] = {}  # result name -> (stage, cycle it is there)
        # (stage, prompt chunk) -> when its last op there ends and its last result sent from there arrives:
        # a stage's activation buffers hold one chunk, so the next starts only then
        self.chunk_end: dict[tuple[int, int], int] = {}
        self.chunk_ops_end: dict[tuple[int, int], int] = {}  # the same, its ops only: the next chunk may land
        self.provider: dict[str, str] = {}  # op name -> the name holding its full result (op or all-reduce)
        self.alias: dict[str, str] = {}  # a send -> the all-gather (or broadcast) that completes it on the group
        self.staged = staged
        # routings per (group shape, kind, transit nodes) of a collective, or ("send", chips, kind, transit
        # nodes, turn) of a send with the chips its routes touch, all from the first chip of a rack (the
        # base), shared by the schedules of a compilation
        self.templates = templates
        self.sends: dict[tuple, tuple] = {}  # (template key, base) -> a send's routings on this deployment's chips
        self.went_via = False  # whether a step took routes through other nodes
        self.routed_steps: dict[tuple, list] = {}  # a template at one place and payload: every layer's alike
        # per rack, its nodes the deployment holds whole: flows between two others may cross them (if allowed)
        self.transit_nodes: dict[int, tuple[int, ...]] = {}
        self.held, self.detours = frozenset(placement.chips), {}
        for node in sorted({system.node_of(c) for c in self.held} if via_other_nodes else ()):
            if self.held.issuperset(range(node * system.node.chips, (node + 1) * system.node.chips)):
                rack = node // system.rack.nodes
                self.transit_nodes[rack] = self.transit_nodes.get(rack, ()) + (node,)
        self.ops: list[ScheduledOp] = []
        self.transfers: list[Transfer] = []

    def cycles(self, seconds: float) -> int:
        return max(1, math.ceil(seconds * self.clock))

    # ---- transfers ----
    def _route(self, src: int, dst: int) -> tuple[int, ...]:
        """The system's route, or where it would pass a chip the deployment lacks, one over its own chips."""
        path = self.system.route(src, dst)
        if self.held.issuperset(path):
            return path
        if (src, dst) not in self.detours:
            self.detours[(src, dst)] = self.system.route_within(src, dst, self.held)
            if self.detours[(src, dst)] is None:
                raise OpenLPUError(f"no route from chip {src} to chip {dst} over the deployment's own chips")
        return self.detours[(src, dst)]

    def _link_set(self, links: tuple[tuple[int, int], ...]) -> int:
        """An index for a set of links a step loads; every layer's like step loads the same set, so links
        are reserved a set at a time, and a set is checked against the sets sharing a link with it."""
        if links not in self.link_set_index:
            new = len(self.link_set_busy)
            self.link_set_index[links] = new
            self.link_set_busy.append(([], []))
            clashing = {other for link in links for other in self.link_sets_on.get(link, ())}
            self.clashes.append(sorted(clashing) + [new])
            for other in clashing:
                self.clashes[other].append(new)
            for link in links:
                self.link_sets_on.setdefault(link, []).append(new)
        return self.link_set_index[links]

    def _placed_links(self, key: tuple, base: int, step: int, routing: int, loads: tuple) -> int:
        """The link set of a template's routing of one step, placed at chip `base`."""
        if (key, base, step, routing) not in self.placed_link_sets:
            self.placed_link_sets[(key, base, step, routing)] = self._link_set(tuple(zip(*_at(base, loads[:2]))))
        return self.placed_link_sets[(key, base, step, routing)]

    def _links_free(self, link_set: int, ready: int, cycles: int) -> int:
        """The first cycle from `ready` at which every link of `link_set` is free for `cycles`: a transfer may
        take a gap that transfers placed before it left on its links."""
        busy, clashes = self.link_set_busy, self.clashes[link_set]
        if all(not ends or ends[-1] <= ready for _, ends in (busy[other] for other in clashes)):
            return ready
        start, settled = ready, False
        while not settled:
            settled = True
            for other in clashes:
                starts, ends = busy[other]
                i = bisect.bisect_right(ends, start)  # the first reservation ending after `start`
                if i < len(starts) and starts[i] < start + cycles:
                    start, settled = ends[i], False
        return start

    def _reserve(self, link_set: int, start: int, end: int) -> None:
        starts, ends = self.link_set_busy[link_set]
        i = bisect.bisect_right(starts, start)
        starts.insert(i, start)
        ends.insert(i, end)

    def _send(self, name: str, kind: str, stage: int, chips: tuple[int, ...], payload: float, ready: int,
              inputs: tuple[str, ...]) -> int:
        chunk = split_chunk(name)[0]
        if chunk:  # lands on its stage once the ops of the chunk before are done (see the module doc)
            ready = max(ready, self.chunk_ops_end.get((stage, chunk - 1), 0))
        period = self.system.chips_per_rack
        if kind in ("p2p", "rank_p2p", "stripe"):  # rank_p2p, stripe: rank r of one group to rank r of the next
            pairs = list(zip(*transfer_ends(kind, chips)))
            flows = [(src, dst, 1 / len(pairs)) for src, dst in pairs]
            transit = self.transit_nodes.get(self.system.rack_of(pairs[0][0]), ())
            # every rack is cabled alike, so a send's routes, moved by whole racks, serve its like there (with
            # the same nodes held whole); a flow through another node takes its turn by the sum of its nodes'
            # numbers (_routings), kept in the key modulo the choices it has
            base = min(chips) // period * period
            first_node = self.system.node_of(base)
            key = ("send", tuple(c - base for c in chips), kind, tuple(n - first_node for n in transit),
                   2 * first_node % max(1, len(transit) - 1))
            if key not in self.templates:  # along the network's routes: shared by every deployment they keep to
                routings = _shifted(_routings(self.system, flows, transit, self.system.route), -base)
                self.templates[key] = ((routings,), frozenset(itertools.chain(*(r[2][0] + r[2][1] for r in routings))))
            if (key, base) not in self.sends:
                template, touched = self.templates[key]
                if not self.held.issuperset(c + base for c in touched):  # around chips this deployment lacks
                    template = (_shifted(_routings(self.system, flows, transit, self._route), -base),)
                self.sends[(key, base)] = template
            template = self.sends[(key, base)]
            path = self._route(*pairs[0]) if kind == "p2p" else ()
        else:
            path = ()
            # a group's routes stay inside its rack and on its own chips and the nodes held whole there, and
            # every rack is cabled alike: its templates serve every group of its shape and every schedule
            base = chips[0] // period * period
            first_node = self.system.node_of(base)
            transit = tuple(n - first_node for n in self.transit_nodes.get(base // period, ()))
            key = (tuple(c - base for c in chips), kind, transit)
            if key not in self.templates:
                self.templates[key] = _collective_template(self.system, key[0], kind, transit)
            template = self.templates[key]
        steps = self.routed_steps.get((key, base, payload))
        if steps is None:
            steps = self.routed_steps[(key, base, payload)] = [
                [_Routing(self.cycles(latency + worst * payload), self._placed_links(key, base, j, i, loads), loads)
                 for i, (latency, worst, loads) in enumerate(step)]
                for j, step in enumerate(template)]
        phases, arrival = [], ready
        for routings in steps:
            # each step waits for the one before it and for its own links; of its routings, the first to arrive
            # (on ties the shortest routes)
            start, routing = min(((self._links_free(r.link_set, arrival, r.cycles), r) for r in routings),
                                 key=lambda option: option[0] + option[1].cycles)
            self.went_via |= routing is not routings[0]
            if routing.links is None:
                froms, tos, fractions = routing.loads
                nbytes = map(operator.mul, fractions, itertools.repeat(payload))
                routing.links = tuple(zip(*_at(base, (froms, tos)), nbytes))
            arrival = start + routing.cycles
            self._reserve(routing.link_set, start, arrival)
            phases.append((start, arrival, routing.links))
        self.transfers.append(Transfer(name, kind, stage, chips, path, payload, tuple(phases), phases[0][0], arrival,
                                       inputs))
        self.ready[name] = (stage, arrival)
        if chunk is not None:  # its input is held where it is until it has arrived
            source = (self.ready[inputs[0]][0], chunk)
            self.chunk_end[source] = max(arrival, self.chunk_end.get(source, 0))
        return arrival

    def _input_on(self, src: str, stage: int, payload: float, not_before: int = 0) -> str:
        """The name under which `src`'s result is available on `stage` (sending it there if needed, not
        before cycle `not_before`)."""
        name = self.provider.get(src, src)
        src_stage, cycle = self.ready[name]
        cycle = max(cycle, not_before)
        if src_stage == stage:
            return name
        key = f"{name}>s{stage}"
        if key not in self.ready:
            group = self.placement.stages[stage].chips
            if name in self.staged.by_rank and len(group) > 1:
                self._send(key, "rank_p2p", stage, self.placement.stages[src_stage].chips + group, payload, cycle,
                           (name,))
                return key
            targets = sorted(t for t in self.staged.readers[src] if t != src_stage)  # in pipeline order
            self._spread(name, src_stage, name, cycle, targets, payload)
        return self.alias.get(key, key)

    def _spread(self, name: str, holder: int, held_as: str, ready: int, targets: list[int], payload: float,
                shares: bool = False) -> None:
        """Send `name` from stage `holder` to every stage in `targets` along a binomial tree: the holder hands
        the far half of the targets to the first of them, which passes it on as the holder goes on with the
        near half, so a result that many stages read reaches them all in log2 rounds instead of queueing on
        the links near its source. Each chip of a group sends its share to the same rank of the target
        group, which gathers the shares; a stage passing it on sends the shares it received (`shares`)."""
        while targets:
            mid = len(targets) // 2
            target, farther = targets[mid], targets[mid + 1:]
            group, sources = self.placement.stages[target].chips, self.placement.stages[holder].chips
            key = f"{name}>s{target}"
            split = len(group) > 1 and name not in self.staged.pairs  # a (value, index) pair goes whole
            if split:
                arrival = self._send(key, "rank_p2p" if shares else "stripe", target, sources + group, payload,
                                     ready, (held_as,))
                self._send(key + ".gather", "all_gather", target, group, payload, arrival, (key,))
                self.alias[key] = key + ".gather"
            else:  # one chip sends it, and broadcasts it over its group
                arrival = self._send(key, "p2p", target, (sources[0], group[0]), payload, ready, (held_as,))
                if len(group) > 1:
                    self._send(key + ".bcast", "broadcast", target, group, payload, arrival, (key,))
                    self.alias[key] = key + ".bcast"
            self._spread(name, target, key, arrival, farther, payload, split)
            targets = targets[:mid]

    # ---- ops ----
    def place_op(self, op: Op, stage: int, cost: _OpCost) -> None:
        # a combining op's remote input leaves once the stage's previous combination has ended, so
        # partials do not pile up at the last part of a tree (the partition gives a part room for two)
        not_before = self.combined.get(stage, 0) if cost.combining else 0
        inputs = tuple(self._input_on(i, stage, self.staged.payloads[i], not_before) for i in op.inputs)
        chunk = cost.chunk
        previous_chunk_done = self.chunk_end.get((stage, chunk - 1), 0) if chunk else 0  # one chunk per stage
        start = max([self.unit_free.get((stage, op.unit), 0), previous_chunk_done] + [self.ready[i][1] for i in inputs])
        end = start + cost.cycles
        self.unit_free[(stage, op.unit)] = end
        if cost.combining:
            self.combined[stage] = end
        if chunk is not None:
            self.chunk_end[(stage, chunk)] = max(end, self.chunk_end.get((stage, chunk), 0))
            self.chunk_ops_end[(stage, chunk)] = max(end, self.chunk_ops_end.get((stage, chunk), 0))
        self.ops.append(ScheduledOp(op.name, op.kind, op.unit, stage, start, end, cost.flops, cost.sram_bytes,
                                    cost.out_bytes, inputs))
        self.ready[op.name] = (stage, end)
        if cost.all_reduce:
            name = op.name + ".allreduce"
            self._send(name, "all_reduce", stage, self.placement.stages[stage].chips, self.staged.payloads[op.name],
                       end, (op.name,))
            self.provider[op.name] = name


@dataclasses.dataclass(frozen=True, slots=True)  # one per op of a phase
class _OpCost:
    """What an op costs on each chip of its stage, however it is scheduled (_op_costs)."""
    cycles: int
    flops: float
    sram_bytes: float  # read and written
    out_bytes: float  # its result
    combining: bool  # it combines the parts of a piece cut between stages (CHAINED)
    all_reduce: bool  # its group all-reduces its result after it (its payload, _Staged.payloads)
    chunk: int | None  # its prompt chunk (None in decode)


def _weight_fractions(spec: ModelSpec, placement: Placement, stage_of_chip: dict[int, int]) -> dict:
    """Per (tensor, stage): the largest share of the tensor one chip of the stage holds."""
    shapes = spec.tensor_shapes()
    frac: dict[tuple[str, int], float] = {}
    lengths: dict[tuple[str, int], int] = {}  # (tensor, axis) -> its length along the axis
    for sh in placement.shards:
        key, along = (sh.tensor, stage_of_chip[sh.chip]), (sh.tensor, sh.axis)
        if along not in lengths:
            lengths[along] = axis_length(sh.tensor, shapes[sh.tensor], sh.axis)
        frac[key] = max(frac.get(key, 0.0), (sh.stop - sh.start) / lengths[along])
    return frac


def _routed_shares(spec: ModelSpec, placement: Placement, stage_of_chip: dict[int, int]) -> dict:
    """Per (expert tensor cut by expert rows, stage): the most of its op's routed work one chip of the
    stage can get, every token's k choices falling on the experts it holds, the widest of them first."""
    k, share = spec.n_experts_per_token, {}
    for sh in placement.shards:
        if sh.axis != EXPERT_ROWS:
            continue
        ff = spec.layer_d_ff(item_of_tensor(sh.tensor, -1))
        rows = sorted((stop - start for _, start, stop in expert_spans(sh.start, sh.stop, ff)), reverse=True)
        key = (sh.tensor, stage_of_chip[sh.chip])
        share[key] = max(share.get(key, 0.0), sum(rows[:k]) / (k * ff))
    return share


def _op_costs(spec: ModelSpec, system: SystemSpec, workload: Workload, placement: Placement,
              ops: list[tuple[Op, int]]) -> list[_OpCost]:
    """Each staged op's cost on its stage (see the module doc): it depends on the placement, not on when the
    op runs, so the schedules with and without routes through other nodes share it."""
    stage_of_chip = {c: s.index for s in placement.stages for c in s.chips}
    weight_fraction = _weight_fractions(spec, placement, stage_of_chip)
    routed_share = _routed_shares(spec, placement, stage_of_chip)
    tensor_elements = {name: math.prod(shape) for name, shape in spec.tensor_shapes().items()}
    weight_bytes_per_element = as_precision(workload.weights).bytes_per_element
    chip = system.chip
    unit_flops_per_cycle = unit_rates(chip, matrix_macs_per_cycle(system, workload.weights, workload.activations))
    attention_flops_per_cycle = 2 * matrix_macs_per_cycle(system, workload.kv, workload.activations)

    def cost(op: Op, stage: int) -> tuple:
        """_OpCost's fields but the chunk."""
        t = len(placement.stages[stage].chips)
        suffix = op_suffix(op.name)
        role = suffix_role(suffix)
        f_w = weight_fraction.get((op.weight, stage), 1.0) if op.weight else 1.0
        compute, f_in, f_out, f_kv = op_fractions(spec, role, t, f_w)
        if op.weight and (op.weight, stage) in routed_share:
            # cut by expert, a chip's share of the routed work depends on the routing, which a static schedule
            # cannot: it reserves the most there can be, every token's choices falling on the experts it holds
            compute = routed_share[(op.weight, stage)]
        weights = op.weight_bytes * f_w
        installed = 0.0
        if op.unit == "matrix" and op.weight:  # the chip's whole share of the tensor, all experts for MoE
            installed = max(weights, tensor_elements[op.weight] * f_w * weight_bytes_per_element)
            weights = installed
        elif op.kind == "attention":  # the keys and values attended are the matrices its queries stream through
            installed = (op.kv_read_bytes + op.kv_write_bytes) * f_kv
        reads = weights + op.kv_read_bytes * f_kv + op.act_read_bytes * f_in
        writes = op.act_write_bytes * f_out + op.kv_write_bytes * f_kv
        rate = attention_flops_per_cycle if op.kind == "attention" else unit_flops_per_cycle[op.unit]
        cycles = max(1, math.ceil(op.flops * compute / rate), math.ceil((reads + writes) / chip.sram_bytes_per_cycle),
                     math.ceil(installed / chip.matrix_install_bytes_per_cycle))
        return (cycles, op.flops * compute, reads + writes, op.act_write_bytes * f_out, suffix in CHAINED.values(),
                t > 1 and role in NEEDS_ALL_REDUCE)

    costs, known = [], {}
    for op, stage in ops:
        # a prompt chunk's ops repeat those of the chunk before (but for the past its attention reads): an op's
        # name past its chunk, its stage and its sizes give its cost
        chunk, base = split_chunk(op.name)
        key = (stage, base, op.flops, op.weight_bytes, op.kv_read_bytes, op.kv_write_bytes, op.act_read_bytes,
               op.act_write_bytes)
        if key not in known:
            known[key] = cost(op, stage)
        costs.append(_OpCost(*known[key], chunk))
    return costs


def result_bytes(spec: ModelSpec, op: Op) -> float:
    """What crosses a link when `op`'s result does: the sampler's (value, index) per row, else its output."""
    return ARGMAX_BYTES * op.shape[0] / spec.vocab_size if op_role(op) == "argmax" else op.act_write_bytes


def _prefill_chunks(spec: ModelSpec, workload: Workload) -> list[Op]:
    """The prompt in chunks of workload.chunk_tokens tokens, each attending to the chunks before it;
    only the last chunk computes logits. Op names get a "c<chunk>/" prefix."""
    chunks = prefill_chunks(workload)
    out: list[Op] = []
    for c, (past, length) in enumerate(chunks):
        for op in lower(spec, "prefill", length, 1, workload.weights, kv_precision=workload.kv,
                        act_precision=workload.activations, past_len=past, name_prefix=chunk_name(c, "")):
            if c < len(chunks) - 1 and op_item(op, spec.n_layers) == spec.n_layers:
                continue  # logits only for the prompt's last token
            if op.kind == "attention" and c > 0:  # reads the KV the previous chunk wrote
                op = dataclasses.replace(op, inputs=op.inputs + (chunk_name(c - 1, split_chunk(op.name)[1]),))
            out.append(op)
    return out


def chunk_name(c: int, name: str) -> str:
    """A prefill op's name in prompt chunk c: 'c1/blk.3.attn_q'."""
    return f"c{c}/{name}"


def split_chunk(name: str) -> tuple[int | None, str]:
    """'c1/blk.3.attn_q' -> (1, 'blk.3.attn_q'); a name without a chunk prefix -> (None, name)."""
    prefix, sep, base = name.partition("/")
    return (int(prefix[1:]), base) if sep else (None, name)


def _scaled(op: Op, fraction: float) -> Op:
    return dataclasses.replace(op, flops=op.flops * fraction, act_read_bytes=op.act_read_bytes * fraction,
                               act_write_bytes=op.act_write_bytes * fraction)


def chained_name(name: str, suffix: str, j: int) -> str:
    """'c1/blk.3.ffn_down' -> 'c1/blk.3.ffn_sum@2'; 'token_embd' -> 'embed_sum@2'."""
    prefix, _, last = name.rpartition("/")
    stem = last.rsplit(".", 1)[0] + "." if "." in last else ""
    return f"{prefix}/" * bool(prefix) + f"{stem}{suffix}{CUT_SEPARATOR}{j}"


def combines_parts(op: Op, part: str) -> bool:
    """The op whose per-part results are combined (see the module doc): an MLP's down projection, the
    embedding's gather, the head's sampler, the attention over each part's KV slots."""
    return {"ffn": op_role(op) == "row", "embed": op.kind == "embed", "head": op.kind == "sample",
            "attn": op.kind == "attention"}.get(part, False)


def _attention_part(spec: ModelSpec, workload: Workload, op: Op, lo: int, hi: int) -> Op:
    """An attention op (or its score softcap) over KV slots [lo, hi) of its layer: its share of the
    pairs, the cached keys and the new ones; the attention also leaves each head's log-sum-exp."""
    chunk, _ = split_chunk(op.name)
    ring = kv_slots(spec, workload.context_length, op.layer)
    if chunk is None:
        phase, tokens, past = "decode", 1, attended_keys(workload.attended_context, spec.layer_window(op.layer),
                                                         "decode", chunk=spec.layer_chunk(op.layer))
    else:
        phase, tokens, past = "prefill", op.shape[0], chunk * workload.chunk_tokens
    chunked = spec.layer_chunk(op.layer) is not None
    part, whole = (keys_in_slots(phase, past, tokens, ring, a, b, chunked) for a, b in ((lo, hi), (0, ring)))
    pairs, cached, written = (p / w if w else 0.0 for p, w in zip(part, whole))
    if op.kind != "attention":  # a score softcap: its share of the scores; the q and k it passes on whole
        return dataclasses.replace(op, flops=op.flops * pairs)
    lse = op.act_write_bytes * spec.n_heads / spec.q_dim
    return dataclasses.replace(op, flops=op.flops * pairs, kv_read_bytes=op.kv_read_bytes * cached,
                               kv_write_bytes=op.kv_write_bytes * written, act_write_bytes=op.act_write_bytes + lse)


def _combining_op(spec: ModelSpec, op: Op, part: str, like: Op | None, name: str, inputs: tuple[str, str]) -> Op:
    """An op combining two parts' results (each one part's own or already combined): a sum of partial vectors
    (shaped like the MLP's input, or the gathered row), the larger (value, index) of the sampler, or the
    merge of two partial attentions (each head's output and log-sum-exp)."""
    if part == "head":
        kind, unit_bytes, shape, flops = "sample", result_bytes(spec, op), (op.shape[0] // spec.vocab_size,), None
    elif part == "attn":
        elements = op.shape[0] * (spec.q_dim + spec.n_heads)
        kind, unit_bytes, shape = "merge", op.act_write_bytes, (op.shape[0], spec.n_heads, spec.head_dim)
        flops = MERGE_FLOPS_PER_ELEMENT * elements
    else:
        like = like if part == "ffn" else op
        kind, unit_bytes, shape, flops = "residual", like.act_write_bytes, like.shape, None
    return Op(name=name, kind=kind, layer=op.layer, unit="vector", shape=shape,
              flops=math.prod(shape) if flops is None else flops, weight_bytes=0.0, kv_read_bytes=0.0,
              kv_write_bytes=0.0, act_read_bytes=2 * unit_bytes, act_write_bytes=unit_bytes, inputs=inputs)


def _combine_parts(spec: ModelSpec, combined: Op, name: str, part: str, like: Op | None, names: list[str],
                   stages: list[int], out: list[tuple[Op, int]]) -> str:
    """Append to `out` the ops combining the parts' results `names` (on `stages`) and return the last one's
    name: a binary tree toward the last part, its ops numbered 1..K-1 as they are made, the root last."""
    count = itertools.count(1)

    def combine(lo: int, hi: int) -> str:
        """Parts lo..hi-1 combined, on the stage of part hi - 1: each half first (the left one the larger
        when they differ: the stages on the right then receive fewer partials), then the two halves, so K
        parts take ceil(log2 K) rounds (the combinations are associative)."""
        if hi - lo == 1:
            return names[lo]
        mid = (lo + hi + 1) // 2
        halves = combine(lo, mid), combine(mid, hi)
        combination = chained_name(name, CHAINED[part], next(count))
        out.append((_combining_op(spec, combined, part, like, combination, halves), stages[hi - 1]))
        return combination

    return combine(0, len(names))


def staged_ops(spec: ModelSpec, workload: Workload, ops: list[Op], placement: Placement) -> list[tuple[Op, int]]:
    """Each op with the stage that runs it, the ops of a cut piece once per part, and the ops combining
    the parts' results (see the module doc)."""
    n, homes = spec.n_layers, piece_homes(placement)
    units = ffn_units(spec.tensor_shapes(), placement.experts)
    out: list[tuple[Op, int]] = []
    per_part: dict[str, list[str]] = {}  # an op of a split piece -> its name in each part of that piece
    total: dict[str, str] = {}  # a combined op -> the last combining op, which completes it
    mlp_input: dict[int, Op] = {}  # per layer, its MLP norm: the shape of the partial sums
    by_name = {op.name: op for op in ops}
    for op in ops:
        item, part = op_piece(op, n)
        parts = homes[(item, part)]
        suffix = op_suffix(op.name)
        if len(parts) == 1 or suffix in ONCE_ON_LAST_PART:  # once, on the last part, on the combined result
            # (or the last part's own copy of a value every part computes: the MoE routing)
            inputs = tuple(total.get(i, per_part[i][-1] if i in per_part and op_piece(by_name[i], n) == (item, part)
                                     else i) for i in op.inputs)
            if inputs != op.inputs:
                op = dataclasses.replace(op, inputs=inputs)
            out.append((op, parts[-1][0]))
            continue
        if suffix == "ffn_norm":
            mlp_input[op.layer] = op
        extent = units[item] if part == "ffn" else spec.vocab_size
        names, part_ops = [], []
        for j, (stage, lo, hi) in enumerate(parts):
            name = op.name if j == 0 else f"{op.name}{CUT_SEPARATOR}{j}"
            # a part reads its own part's results of its piece's ops (an attention: the KV its previous
            # chunk wrote); another piece's split result only once combined
            inputs = tuple(per_part[i][j] if i in per_part and op_piece(by_name[i], n) == (item, part)
                           else total.get(i, i) for i in op.inputs)
            part_op = op
            if part == "attn" and op.kind in ("attention", "softcap"):
                part_op = _attention_part(spec, workload, op, lo, hi)
            elif op_role(op) in ("split", "argmax"):
                part_op = _scaled(op, (hi - lo) / extent)
            part_op = dataclasses.replace(part_op, name=name, inputs=inputs)
            out.append((part_op, stage))
            names.append(name)
            part_ops.append(part_op)
        per_part[op.name] = names
        if not combines_parts(op, part):
            continue
        combined = part_ops[0] if part == "attn" else op  # an attention part's result carries its log-sum-exp
        total[op.name] = _combine_parts(spec, combined, op.name, part, mlp_input.get(op.layer), names,
                                        [stage for stage, _, _ in parts], out)
    return out


def stage_occupancy_cycles(phase: PhaseSchedule) -> dict[int, int]:
    """Cycles each stage holds one micro-batch: from its first op to its last (its links work beside
    its units, so sends do not hold the stage)."""
    first, last = {}, {}
    for op in phase.ops:
        first[op.stage] = min(first.get(op.stage, op.start_cycle), op.start_cycle)
        last[op.stage] = max(last.get(op.stage, 0), op.end_cycle)
    return {s: last[s] - first[s] for s in first}


def link_cycles(system: SystemSpec, phase: PhaseSchedule) -> dict[tuple[int, int], float]:
    """Cycles each directed link is busy in one step of the phase: the bytes it carries over its rate."""
    # every layer's collective on a group loads its links alike, with one tuple of link loads: each
    # distinct tuple is added once, times the phases that carry it
    carried_by: dict[int, list] = {}
    for t in phase.transfers:
        for _, _, links in t.phases:
            carried_by.setdefault(id(links), [links, 0])[1] += 1
    carried: dict[tuple[int, int], float] = {}
    for links, phases in carried_by.values():
        for a, b, nbytes in links:
            carried[(a, b)] = carried.get((a, b), 0.0) + nbytes * phases
    rate, clock = {kind: spec.bandwidth_bytes_per_s for kind, spec in system.links.items()}, system.chip.clock_hz
    return {link: nbytes / rate[system.link_kind(*link)] * clock for link, nbytes in carried.items()}


def turn_cycles(occupancy: dict[int, int], links: dict[tuple[int, int], float]) -> float:
    """Cycles a micro-batch holds the busiest stage (stage_occupancy_cycles) or link (link_cycles) of a step,
    which the next micro-batch waits for."""
    return max(max(occupancy.values()), max(links.values(), default=0))


def period_cycles(makespan: float, batches: int, turn: float) -> float:
    """Cycles between a user's tokens with `batches` micro-batches in flight: a step's makespan, or, when
    the micro-batches queue, their turns (turn_cycles)."""
    return max(makespan, batches * turn)


def decode_figures(system: SystemSpec, decode: PhaseSchedule) -> tuple[int, float]:
    """A decode step's makespan and turn_cycles: what its period reads, for any number of users."""
    return decode.makespan_cycles, turn_cycles(stage_occupancy_cycles(decode), link_cycles(system, decode))


def decode_period_cycles(system: SystemSpec, decode: PhaseSchedule, users: int) -> float:
    """period_cycles for `users` in micro-batches of decode.tokens, read off the decode schedule."""
    makespan, turn = decode_figures(system, decode)
    return period_cycles(makespan, -(-users // decode.tokens), turn)


def decode_rows(users: int, makespan: float, turn: float) -> int:
    """Users per micro-batch of a decode step, read off a step scheduled for some number of them (its
    decode_figures): the fewest that let every micro-batch take its turn at the busiest stage and link within
    that step, so that no user waits on the others (one when the users pass them in a step anyway), spread
    evenly over the micro-batches (balanced_rows)."""
    batches = max(1, int(makespan // turn))  # turns that fit the step
    return balanced_rows(users, -(-users // batches))


def predicted_rows(users: int, steps: dict[int, tuple[float, float]], most: int) -> int:
    """Users per micro-batch, at most `most`, whose period looks shortest from decode steps scheduled for two or
    more sizes (users per micro-batch -> their decode_figures): the makespan and the turn both grow with the
    rows (a step installs each user's keys and values in turn), so each is drawn as a line between the sizes on
    either side, or through the two nearest beyond them, and every even split of the users weighed as
    period_cycles weighs it (the fewer users a step on ties)."""
    sizes = sorted(steps)

    def line(r: int, k: int) -> float:  # figure k at r users a step, between the nearest sizes scheduled
        i = min(max(bisect.bisect_left(sizes, r), 1), len(sizes) - 1)
        (r0, y0), (r1, y1) = (sizes[i - 1], steps[sizes[i - 1]][k]), (sizes[i], steps[sizes[i]][k])
        return y0 + (y1 - y0) * (r - r0) / (r1 - r0)

    def period(r: int) -> float:
        return period_cycles(line(r, 0), -(-users // r), line(r, 1))

    return min((r for r in even_splits(users) if r <= most), key=lambda r: (period(r), r))


def even_splits(users: int) -> list[int]:
    """Each number of users a micro-batch takes when `users` are spread evenly over some number of them
    (balanced_rows of every count: about 2 sqrt(users) of them)."""
    sizes, batches = [], 1
    while batches <= users:
        rows = -(-users // batches)
        sizes.append(rows)
        batches = -(-users // (rows - 1)) if rows > 1 else users + 1  # the fewest micro-batches of fewer users
    return sizes


def balanced_rows(users: int, rows: int) -> int:
    """Users per micro-batch when `users` take as many micro-batches as at most `rows` each make, spread
    evenly: 16 users at up to 12 a step take 2 steps of 8, not 12 and 4 (the step is as long as its
    fullest micro-batch)."""
    return -(-users // -(-users // rows))


def schedule_phase(spec: ModelSpec, system: SystemSpec, workload: Workload, placement: Placement,
                   phase: str, templates: dict | None = None, rows: int = 1,
                   via_other_nodes: bool = True) -> PhaseSchedule:
    """One decode step of a micro-batch of `rows` users (each attending its workload.attended_context; with draft
    tokens, verifying them) or the prefill of one prompt; flows between two nodes of a rack may pass through
    the deployment's other nodes there where that arrives sooner (_routings), unless `via_other_nodes` is
    False."""
    staged = _staged(spec, system, workload, placement, phase, rows)
    return _schedule(spec, system, workload, placement, phase, staged, templates, rows, via_other_nodes)[0]


def schedule_prefill(spec: ModelSpec, system: SystemSpec, workload: Workload, placement: Placement,
                     templates: dict | None = None) -> PhaseSchedule:
    """The prefill, of the two schedules with and without routes through other nodes the shorter: a long
    prompt keeps every stage's links busy at once, where such routes can delay more than they save (the
    second is needed only where the first took one)."""
    staged = _staged(spec, system, workload, placement, "prefill")
    prefill, went_via = _schedule(spec, system, workload, placement, "prefill", staged, templates)
    if not went_via:
        return prefill
    direct = _schedule(spec, system, workload, placement, "prefill", staged, templates, via_other_nodes=False)[0]
    return min((prefill, direct), key=lambda phase: phase.makespan_cycles)


@dataclasses.dataclass(frozen=True)
class _Staged:
    """A phase's ops, each with the stage that runs it (staged_ops) and its cost there (_op_costs), and what
    scheduling them reads of each result; made once for a phase's schedules with and without routes through
    other nodes."""
    ops: list[tuple[Op, int]]
    readers: dict[str, set[int]]  # result name -> the stages whose ops read it
    by_rank: set[str]  # results split by heads over a group: they move rank to rank
    pairs: set[str]  # the sampler's (value, index) results, and their all-reduces: sent whole
    payloads: dict[str, float]  # result name -> bytes crossing a link when it does (result_bytes)
    costs: list[_OpCost]  # per op of `ops`


def _staged(spec: ModelSpec, system: SystemSpec, workload: Workload, placement: Placement, phase: str,
            rows: int = 1) -> _Staged:
    ops = lowered_decode(spec, workload, rows) if phase == "decode" else _prefill_chunks(spec, workload)
    staged = staged_ops(spec, workload, ops, placement)
    readers: dict[str, set[int]] = {}
    for op, stage in staged:
        for i in op.inputs:
            readers.setdefault(i, set()).add(stage)
    pairs = {op.name for op, _ in staged if op_suffix(op.name) in ("sample", CHAINED["head"])}
    return _Staged(staged, readers,
                   {op.name for op, _ in staged if op.kind in ("attention", "merge")},
                   pairs | {name + ".allreduce" for name in pairs},
                   {op.name: result_bytes(spec, op) for op, _ in staged},
                   _op_costs(spec, system, workload, placement, staged))


def _schedule(spec: ModelSpec, system: SystemSpec, workload: Workload, placement: Placement, phase: str,
              staged: _Staged, templates: dict | None = None, rows: int = 1,
              via_other_nodes: bool = True) -> tuple[PhaseSchedule, bool]:
    """schedule_phase's schedule of the `staged` ops, and whether any of its steps went through other nodes."""
    s = _Scheduler(spec, system, workload, placement, {} if templates is None else templates, staged,
                   via_other_nodes)
    for (op, stage), cost in zip(staged.ops, staged.costs):
        s.place_op(op, stage, cost)
    last = staged.ops[-1][0]
    if phase == "decode" and len(placement.stages) > 1:  # the token goes back to each embedding stage
        src_name = s.provider.get(last.name, last.name)
        src_chip = placement.stages[s.ready[src_name][0]].chips[0]
        payload = TOKEN_ID_BYTES * rows * (workload.draft_tokens + 1)
        for j, (stage, _, _) in enumerate(piece_homes(placement)[(EMBED, "embed")]):
            name, group = "token_return" + (f"{CUT_SEPARATOR}{j}" if j else ""), placement.stages[stage].chips
            arrival = s._send(name, "p2p", stage, (src_chip, group[0]), payload, s.ready[src_name][1], (src_name,))
            if len(group) > 1:  # every chip of the group looks the token up in its share of the table
                s._send(name + ".bcast", "broadcast", stage, group, payload, arrival, (name,))
    makespan = max([o.end_cycle for o in s.ops] + [t.arrival_cycle for t in s.transfers])
    seq_len = workload.attended_context if phase == "decode" else workload.prompt_len
    return PhaseSchedule(phase, seq_len, rows if phase == "decode" else seq_len, tuple(s.ops), tuple(s.transfers),
                         makespan), s.went_via
