"""Speed, utilisation and power read off a Program's static schedule (no separate formula).

- per-token latency for one user = makespan of one decode step (token back at the embedding stage);
- several users in flight travel in micro-batches (the decode step's tokens: one per stage, more users
  sharing one); each micro-batch occupies one stage at a time, and each link carries every
  micro-batch's bytes, so a new token per user comes every max(makespan, micro-batches x busiest
  stage's occupancy, micro-batches x busiest link's time) cycles;
- a Program compiled with draft tokens verifies them in each decode step: its rates count steps, each
  yielding 1 to draft_tokens + 1 tokens (sim.speculative adds the draft's Program and the acceptance);
- TTFT = makespan of the prefill program, which ends by sampling the first token;
- power per chip = idle + (busy - idle) x the fraction of cycles its functional units are busy.
"""

from __future__ import annotations

from collections import defaultdict
from dataclasses import dataclass

from openlpu.compiler.partition import (
    expert_rows,
    ffn_units,
    piece_name,
    vocab_rows,
)
from openlpu.compiler.program import Program
from openlpu.compiler.schedule import (
    link_cycles,
    period_cycles,
    stage_occupancy_cycles,
    turn_cycles,
)
from openlpu.graph.ops import UNITS
from openlpu.hardware.lpu import LINK_KINDS
from openlpu.sim.cost import lpu_nodes_held
from openlpu.sim.figures import save_png
from openlpu.words import counted


@dataclass(frozen=True)
class LpuTiming:
    chips: int
    stages: int
    tp: int
    users: int
    ttft_s: float
    decode_latency_s: float  # one token step of one micro-batch
    micro_batch: int  # users per decode step
    tokens_per_s_per_user: float  # with `users` in flight
    throughput_tokens_per_s: float  # all users together
    unit_utilisation: dict[str, float]  # busy fraction per unit class, over all chips, in steady state
    link_utilisation: dict[str, float]  # per link kind the step uses: bytes carried / (bandwidth x time)
    links_used: dict[str, int]  # per link kind: directed links that carry bytes in a decode step
    busiest_link_utilisation: float
    nodes: int  # nodes the chips occupy (each with its host)
    racks: int  # racks those nodes stand in (groups spanning nodes stay inside one)
    idle_power_w: float  # chips and hosts with every unit idle: power_w less the part the steps add
    power_w: float  # chips plus node hosts, in steady state
    energy_per_token_j: float
    sram_used_bytes: int  # weights + KV + reserved activations, all chips
    sram_used_fraction: float  # of the SRAM of the chips used
    stage_occupancy_s: float  # the busiest stage's time per token


def timing(program: Program) -> LpuTiming:
    decode, clock = program.decode, program.system.chip.clock_hz
    users, chips = program.workload.users, program.chips
    batches = -(-users // decode.tokens)  # micro-batches in flight
    occupancy = stage_occupancy_cycles(decode)
    busy_links = link_cycles(program.system, decode)
    kind_of = {link: program.system.link_kind(*link) for link in busy_links}
    period = period_cycles(decode.makespan_cycles, batches, turn_cycles(occupancy, busy_links))  # between tokens
    busy = defaultdict(float)
    for op in decode.ops:
        busy[op.unit] += (op.end_cycle - op.start_cycle) * len(program.placement.stages[op.stage].chips)
    # in steady state every micro-batch's step runs once per period
    unit_utilisation = {u: batches * busy[u] / (chips * period) for u in UNITS}
    spans = defaultdict(list)
    for op in decode.ops:
        spans[op.stage].append((op.start_cycle, op.end_cycle))
    chip_busy = defaultdict(float)
    for stage in program.placement.stages:
        covered, reach = 0, -1
        for s, e in sorted(spans[stage.index]):  # cycles with at least one unit busy
            covered += max(0, e - max(s, reach))
            reach = max(reach, e)
        chip_busy[stage.index] = min(1.0, batches * covered / period)
    chip = program.system.chip
    nodes = len({program.system.node_of(c) for c in program.placement.chips})
    racks = len({program.system.rack_of(c) for c in program.placement.chips})
    hosts = lpu_nodes_held(program.system, chips, nodes)
    idle_power = chips * chip.idle_power_w + hosts * program.system.node.host_power_w
    power = idle_power + (chip.busy_power_w - chip.idle_power_w) * sum(chip_busy[s.index] * len(s.chips)
                                                                        for s in program.placement.stages)
    links_used = {k: n for k in LINK_KINDS if (n := sum(1 for kind in kind_of.values() if kind == k))}
    link_utilisation = {k: batches * sum(c for link, c in busy_links.items() if kind_of[link] == k) / (n * period)
                        for k, n in links_used.items()}
    sram = sum(sh.nbytes for sh in program.placement.shards) + sum(
        (s.kv_bytes_per_chip + s.activation_bytes_per_chip) * len(s.chips) for s in program.placement.stages)
    throughput = users * clock / period
    return LpuTiming(
        chips=chips, stages=len(program.placement.stages), tp=program.placement.tp, users=users,
        ttft_s=program.prefill.makespan_cycles / clock, decode_latency_s=decode.makespan_cycles / clock,
        micro_batch=decode.tokens,
        tokens_per_s_per_user=clock / period, throughput_tokens_per_s=throughput,
        unit_utilisation=unit_utilisation, link_utilisation=link_utilisation, links_used=links_used,
        busiest_link_utilisation=batches * max(busy_links.values(), default=0) / period,
        nodes=nodes, racks=racks, idle_power_w=idle_power,
        power_w=power, energy_per_token_j=power / throughput, sram_used_bytes=sram,
        sram_used_fraction=sram / (chips * chip.sram_bytes), stage_occupancy_s=max(occupancy.values()) / clock)


# ---- views for `openlpu inspect` ---------------------------------------------------------------
def _holds(pieces: tuple[tuple[int, str, int, int], ...], units: dict[int, int], vocab: int,
           by_expert: dict[int, int]) -> str:
    """A stage's first and last piece: "L3.ffn[0:7168]..L4.attn"; a layer's two whole halves read "L3"."""
    names: list[str] = []
    for piece in pieces:
        name = piece_name(piece, units, vocab, by_expert)
        if names and name == names[-1].replace(".attn", ".ffn"):
            names[-1] = name.removesuffix(".ffn")
        else:
            names.append(name)
    return names[0] if len(names) == 1 else f"{names[0]}..{names[-1]}"


def _runs(chips: tuple[int, ...]) -> str:
    """Chip numbers as runs: "0-31,40-71" (a group spanning nodes may leave the middle of a rack out)."""
    runs: list[list[int]] = []
    for c in sorted(chips):
        if runs and c == runs[-1][1] + 1:
            runs[-1][1] = c
        else:
            runs.append([c, c])
    return ",".join(f"{a}-{b}" if b > a else str(a) for a, b in runs)


def placement_rows(program: Program) -> list[dict]:
    """Per stage: chips, what it holds, per-chip SRAM by kind, and its busy time per decode token."""
    units, vocab = ffn_units(program.tensors, program.placement.experts), vocab_rows(program.tensors)
    by_expert = expert_rows(program.tensors, program.placement.experts)
    weights = defaultdict(int)
    for sh in program.placement.shards:
        weights[sh.chip] += sh.nbytes
    occupancy = stage_occupancy_cycles(program.decode)
    return [{"stage": s.index, "chips": _runs(s.chips),
             "holds": _holds(s.pieces, units, vocab, by_expert),
             "weights_bytes_per_chip": max(weights[c] for c in s.chips),
             "kv_bytes_per_chip": s.kv_bytes_per_chip, "activation_bytes_per_chip": s.activation_bytes_per_chip,
             "busy_s": occupancy.get(s.index, 0) / program.system.chip.clock_hz}
            for s in program.placement.stages]


KIND_COLOURS = {"matmul": "tab:blue", "lm_head": "tab:cyan", "moe_router": "tab:olive", "attention": "tab:orange",
                "norm": "tab:green", "rope": "tab:pink", "activation": "tab:purple", "residual": "tab:gray",
                "softcap": "tab:brown", "sink": "teal", "bias": "khaki", "embed": "gold", "sample": "black",
                "merge": "darkgoldenrod"}  # one per graph.ops.OP_KINDS
TRANSFER_COLOURS = {"all_reduce": "tab:red", "p2p": "darkred", "broadcast": "salmon", "rank_p2p": "firebrick",
                    "stripe": "indianred", "all_gather": "lightcoral"}
LANES = ("matrix", "vector", "memory", "links")


def gantt_title(program: Program) -> str:
    """What the Gantt chart shows: the decode step of one micro-batch, which holds some of the users in flight
    where they take turns (the others' steps follow it through the pipeline)."""
    decode, users = program.decode, program.workload.users
    batch = counted(users, "user") if decode.tokens == users else f"{decode.tokens} of the {users} users"
    drafts = f", each verifying {program.workload.draft_tokens} draft tokens" if program.workload.draft_tokens else ""
    return (f"{program.model} on {program.system.name}: one decode step ({batch}{drafts}), {program.chips} chips, "
            f"{counted(len(program.placement.stages), 'stage')} x TP {program.placement.tp}, "
            f"{decode.makespan_cycles * 1e6 / program.system.chip.clock_hz:,.1f} us")


def draw_gantt(program: Program, path, max_stages: int = 24) -> None:
    """One decode step: per stage, a lane per functional unit and one for its links, in microseconds.
    Long pipelines show their first and last stages."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib.patches import Patch

    decode, us = program.decode, 1e6 / program.system.chip.clock_hz
    n = len(program.placement.stages)
    shown = list(range(n)) if n <= max_stages else list(range(max_stages // 2)) + list(range(n - max_stages // 2, n))
    row = {s: k for k, s in enumerate(shown)}
    height_in = 2.0 + 0.4 * len(shown)
    fig, ax = plt.subplots(figsize=(14, height_in))
    lane_h = 1.0 / len(LANES)
    least = decode.makespan_cycles * us / 1000  # about a pixel: an op or a transfer far shorter still shows

    def bar(stage, lane, start, end, colour):
        y = row[stage] + LANES.index(lane) * lane_h
        ax.broken_barh([(start * us, max((end - start) * us, least))], (y, lane_h * 0.9), facecolors=colour,
                       linewidth=0)

    for op in decode.ops:
        if op.stage in row:
            bar(op.stage, op.unit if op.unit in LANES else "memory", op.start_cycle, op.end_cycle,
                KIND_COLOURS[op.kind])
    for t in decode.transfers:
        if t.stage in row:
            for start, arrival, _ in t.phases:
                bar(t.stage, "links", start, arrival, TRANSFER_COLOURS[t.kind])
    for k in range(1, len(shown)):
        ax.axhline(k - 0.05, color="lightgray", linewidth=0.6)
    ax.set_yticks([k + 0.5 for k in range(len(shown))])
    ax.set_yticklabels([f"stage {s}" for s in shown], fontsize=8)
    ax.set_ylim(len(shown), 0)
    ax.set_xlabel("time (us)   lanes per stage, top to bottom: matrix, vector, memory, links")
    ax.set_xlim(-decode.makespan_cycles * us * 0.01, decode.makespan_cycles * us * 1.01)  # cycle 0's bars off the axis
    skipped = f" ({n - len(shown)} middle stages not shown)" if len(shown) < n else ""
    ax.set_title(gantt_title(program) + skipped)
    kinds = sorted({op.kind for op in decode.ops}) + sorted({t.kind for t in decode.transfers})
    rows_fit = max(4, int(height_in / 0.25))  # legend rows beside the chart, right of it (below, it hid the axis label)
    ax.legend(handles=[Patch(color={**KIND_COLOURS, **TRANSFER_COLOURS}[k], label=k) for k in kinds],
              loc="upper left", bbox_to_anchor=(1.01, 1.0), ncol=-(-len(kinds) // rows_fit), fontsize=8)
    ax.grid(axis="x", alpha=0.3)
    fig.tight_layout()
    save_png(fig, path, "Gantt chart")
