"""`openlpu plan`: one model, one LPU system and some GPUs, side by side in the same rows.

The LPU row comes from the compiled Program (compiler -> sim.timing); each GPU row from the same
op rows on the GPU roofline model (sim.gpu); both are priced by sim.cost with the same assumptions.
"""

from __future__ import annotations

import dataclasses
import functools
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

from openlpu.errors import OpenLPUError, check_count
from openlpu.graph.lower import as_precision, serving_precision
from openlpu.hardware.gpu import GpuSpec, gpu_names, load_gpu
from openlpu.hardware.lpu import SystemSpec, load_system
from openlpu.models.spec import ModelSpec, load_spec
from openlpu.sim.cost import (
    Cost,
    CostAssumptions,
    cost,
    gpu_capex,
    lpu_capex,
    lpu_nodes_held,
)
from openlpu.sim.figures import save_png
from openlpu.sim.gpu import DEFAULT_SOFTWARE, layout, software_named
from openlpu.words import counted, significant

if TYPE_CHECKING:
    from openlpu.compiler import Workload


def _cost_fields(c: Cost) -> dict:
    """A PlanRow's cost fields, from sim.cost."""
    return dict(wall_power_w=c.wall_power_w, capex_usd=c.capex.total_usd,
                capex_accelerators_usd=c.capex.accelerators_usd, capex_hosts_usd=c.capex.hosts_usd,
                capex_racks_usd=c.capex.racks_usd, capex_network_usd=c.capex.network_usd,
                energy_usd_per_year=c.energy_usd_per_year, tco_usd=c.tco_usd,
                usd_per_million_tokens=c.usd_per_million_tokens)


@dataclass(frozen=True)
class PlanRow:
    system: str
    kind: str  # "lpu" or "gpu"
    chips: int  # LPU chips or GPUs
    chips_asked: int | None  # LPU chips given (--chips; with a draft, the target's), None: the fewest that hold it
    chips_idle: int  # of those, left idle and out of power and cost (wider TP groups on fewer decode faster, or
    # the model's pieces take fewer)
    layout: str  # pipeline stages x tensor-parallel width
    users: int  # concurrent users (streams) served
    users_per_step: int  # users whose tokens one decode step computes together (LPU: a micro-batch)
    memory: str  # "SRAM" or "HBM"
    memory_used_fraction: float  # of the capacity of the chips used
    tokens_per_s_per_user: float
    ttft_s: float
    throughput_tokens_per_s: float
    power_w: float  # IT power while serving (no PUE)
    wall_power_w: float  # power_w x PUE
    energy_per_token_j: float  # of IT power
    compute_used_fraction: float  # matrix FLOPs done / the peak of the chips used, in steady state (MFU)
    capex_usd: float  # the four parts below
    capex_accelerators_usd: float  # LPU cards, or GPU servers
    capex_hosts_usd: float  # LPU host servers (a GPU server's price includes its host)
    capex_racks_usd: float
    capex_network_usd: float
    energy_usd_per_year: float  # at the wall, round the clock
    tco_usd: float  # capex + energy over the assumptions' years
    usd_per_million_tokens: float
    prefill_chunk: int | None  # LPU: prompt tokens per wave of its prefill; GPU: None (one pass)

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)


DRAFT_TOKENS = 4  # drafts per round when not given: a setting, not a published figure
# A draft shares the target's tokenizer where their vocabularies differ by at most this many rows, the first check
# llama.cpp makes of a draft (SPEC_VOCAB_MAX_SIZE_DIFFERENCE, common/speculative.cpp): tables are padded past the
# tokens (Gemma 3 4B and up hold 64 rows more than 1B and 270M, whose tokenizer they share). A spec carries no
# tokens, so llama.cpp's second check, the tokens themselves, is left to the acceptance rate the user states.
DRAFT_VOCAB_SLACK = 128


@dataclass(frozen=True)
class Draft:
    """Speculative decoding: the draft model, the tokens it proposes per round and the chance the
    target accepts each (sim.speculative)."""
    spec: ModelSpec
    tokens: int
    acceptance: float


def matrix_flops_per_token(spec: ModelSpec, precision: str, context: int, draft: Draft | None = None) -> float:
    """The matmul and attention FLOPs per token generated for one user at `context` tokens, the same on
    every system whatever its layout: one decode step, or a speculative round (the draft's steps and the
    target's verifying step) over the tokens it yields."""
    from openlpu.graph.lower import lower
    from openlpu.sim.speculative import expected_tokens

    def step(model: ModelSpec, queries: int = 1) -> float:
        return sum(op.flops for op in lower(model, "decode", context, 1, precision, queries=queries)
                   if op.unit == "matrix")
    if draft is None:
        return step(spec)
    return (step(spec, draft.tokens + 1) + draft.tokens * step(draft.spec)) / expected_tokens(draft.tokens,
                                                                                              draft.acceptance)


def check_workload_flags(spec: ModelSpec, context: int, users: tuple[int, ...], prompt: int, decode_context: int,
                         prefill_chunks: tuple[int, ...]) -> None:
    """The workload's sizes as `plan` and `compile` take them, each checked and named by its flag: positive
    counts, the context inside the model's window, and no length longer than the context."""
    for what, v in (("context", context), *(("users", n) for n in users), ("prompt", prompt),
                    ("decode-context", decode_context), *(("prefill-chunk", chunk) for chunk in prefill_chunks)):
        check_count(v, f"--{what}")
    if context > spec.context_length:
        raise OpenLPUError(f"--context {context} is longer than {spec.name}'s context window "
                           f"({spec.context_length} tokens); use at most {spec.context_length}")
    for what, v in (("prompt", prompt), ("decode-context", decode_context),
                    *(("prefill-chunk", chunk) for chunk in prefill_chunks)):
        if v > context:
            raise OpenLPUError(f"--{what} {v} is longer than --context {context}; use at most {context}")


def _check_counts(spec: ModelSpec, lpu: SystemSpec | None, chip_counts: tuple, widths: tuple | str,
                  gpu_specs: list, gpu_counts: tuple) -> None:
    """Refuse at once a count no workload could use on its system (not a positive integer, more chips than the
    system has, a TP width the model cannot be split over, GPUs filling servers in part): bad input, not a
    column that does not fit."""
    from openlpu.compiler.partition import check_chips, tp_widths
    from openlpu.sim.gpu import check_gpu_count

    chips = [n for n in chip_counts if n is not None]
    tps = [] if widths == "all" else [t for t in widths if t is not None]
    gpus = [n for n in gpu_counts if n is not None]
    for flag, counts in (("--chips", chips), ("--tp", tps), ("--gpus", gpus)):
        for n in counts:
            check_count(n, flag)
    if lpu is not None:
        for n in chips:
            check_chips(lpu, n)
        for t in tps:
            tp_widths(spec, lpu, t)
    for gpu in gpu_specs:
        for n in gpus:
            check_gpu_count(gpu, n)


def _check_draft(spec: ModelSpec, draft: Draft, context: int) -> None:
    from openlpu.sim.speculative import check

    check(draft.tokens, draft.acceptance)
    if draft.tokens >= context:
        raise OpenLPUError(f"--draft-tokens {draft.tokens}: a round's drafts and the token before them must fit the "
                           f"--context {context}; propose fewer")
    if abs(draft.spec.vocab_size - spec.vocab_size) > DRAFT_VOCAB_SLACK:
        raise OpenLPUError(f"the draft {draft.spec.name} has a vocabulary of {draft.spec.vocab_size:,} tokens and "
                           f"{spec.name} one of {spec.vocab_size:,}: a draft must share the target's tokenizer")
    if draft.spec.param_count() >= spec.param_count():
        raise OpenLPUError(f"the draft {draft.spec.name} ({draft.spec.param_count() / 1e9:.1f}B parameters) is not "
                           f"smaller than {spec.name} ({spec.param_count() / 1e9:.1f}B): a draft must be smaller "
                           f"than the target, to propose tokens faster than the target makes them")
    if context > draft.spec.context_length:
        raise OpenLPUError(f"--context {context} is longer than the draft {draft.spec.name}'s context window "
                           f"({draft.spec.context_length} tokens)")


def _power_at_duty(t, duty: float) -> float:
    """A Program's power when its steps come `duty` times as often as its own pipeline allows: the busy
    part above idle scales (sim.timing counts busy cycles per period)."""
    return t.idle_power_w + (t.power_w - t.idle_power_w) * duty


@dataclass(frozen=True)
class _LpuFigures:
    """What an LPU row reports, from one Program or from a target's and a draft's together."""
    chips: int
    nodes: int
    racks: int
    layout: str
    tokens_per_s_per_user: float
    throughput_tokens_per_s: float
    power_w: float
    sram_used_bytes: float
    ttft_s: float


def draft_offset(system, target, draft) -> int:
    """Where the draft's chips start: at the node after the target's last chip (TP groups spanning nodes
    leave the nodes of a rack they do not fill empty, so a target's chips may not run from 0 without
    gaps), or at the next rack where the draft's own groups span nodes, as no group straddles racks."""
    after = (max(target.placement.chips) // system.node.chips + 1) * system.node.chips
    if draft.placement.tp > system.node.chips:
        after = -(-after // system.chips_per_rack) * system.chips_per_rack
    return after


def _with_draft(system, program, t, draft: Draft, workload) -> _LpuFigures:
    """The target's verifying Program beside the draft's own, whose chips (numbered from 0 in its Program)
    sit from the node after the target's: a user's round goes through both (sim.speculative), with the
    hops between them read at that offset, and each pipeline works only its share of the round."""
    from openlpu.compiler import compile_program, verify_or_raise
    from openlpu.sim.speculative import lpu_round
    from openlpu.sim.timing import timing

    draft_program = compile_program(draft.spec, system, dataclasses.replace(workload, draft_tokens=0))
    verify_or_raise(draft_program)
    d = timing(draft_program)
    offset = draft_offset(system, program, draft_program)
    if offset + max(draft_program.placement.chips) >= system.max_chips:
        raise OpenLPUError(f"{program.model} on {t.chips} chips and the draft {draft.spec.name} on {d.chips} more "
                           f"need more than {system.name}'s {system.max_chips:,} chips")
    target_first, target_last = (program.placement.stages[i].chips[0] for i in (0, -1))
    draft_first, draft_last = (offset + draft_program.placement.stages[i].chips[0] for i in (0, -1))
    handoff = (system.route_latency_s(system.route(target_last, draft_first))
               + system.route_latency_s(system.route(draft_last, target_first)))
    r = lpu_round(t, d, handoff, draft.tokens, draft.acceptance)
    # per round the target steps once and the draft k times, not as often as each could alone
    power = (_power_at_duty(t, 1 / (t.tokens_per_s_per_user * r.round_period_s))
             + _power_at_duty(d, draft.tokens / (d.tokens_per_s_per_user * r.round_period_s)))
    # each timing powered its own share of a node's host; the pair holds the hosts lpu_capex prices for both
    power += system.node.host_power_w * (lpu_nodes_held(system, t.chips + d.chips, t.nodes + d.nodes)
                                         - lpu_nodes_held(system, t.chips, t.nodes)
                                         - lpu_nodes_held(system, d.chips, d.nodes))
    racks = {system.rack_of(c) for c in program.placement.chips} | {system.rack_of(offset + c)
                                                                    for c in draft_program.placement.chips}
    return _LpuFigures(t.chips + d.chips, t.nodes + d.nodes, len(racks),
                       f"{t.stages} x TP {t.tp} + draft {d.stages} x TP {d.tp}", r.tokens_per_s_per_user,
                       r.throughput_tokens_per_s, power, t.sram_used_bytes + d.sram_used_bytes,
                       max(t.ttft_s, d.ttft_s))  # both prefill the prompt, side by side


def lpu_workload(precision: str, context: int, users: int, prompt: int, prefill_chunk: int | None,
                 draft: Draft | None = None, decode_context: int | None = None) -> Workload:
    """What the LPU compiles for: the KV cache and activations as a GPU serving stack keeps them beside these
    weights (serving_precision), so both sides hold and move the same bytes."""
    from openlpu.compiler import Workload

    return Workload(weights=precision, activations=serving_precision(precision), kv=serving_precision(precision),
                    context_length=context, users=users, prompt_len=prompt,
                    draft_tokens=draft.tokens if draft else 0, decode_context=decode_context,
                    prefill_chunk=prefill_chunk)


def placeable_widths(spec: ModelSpec, system: SystemSpec, workload: Workload) -> list[int]:
    """The TP widths, narrowest first, in whose groups the compiler can place the model on some number of
    the system's chips (`--tp all`), at the workload's prefill chunk or, where it leaves the choice to the
    compiler, at the smallest it chooses from (whose buffers leave the most room)."""
    from openlpu.compiler.partition import fewest_chips, tp_candidates
    from openlpu.compiler.program import PREFILL_CHUNKS

    if workload.prefill_chunk is None:
        workload = dataclasses.replace(workload, prefill_chunk=PREFILL_CHUNKS[-1])
    return [t for t in sorted(tp_candidates(spec, system)) if fewest_chips(spec, system, workload, widths=[t])]


def lpu_row(spec: ModelSpec, system: SystemSpec, workload: Workload, flops_per_token: float,
            assumptions: CostAssumptions, chips: int | None = None, tp: int | None = None,
            draft: Draft | None = None) -> PlanRow:
    from openlpu.compiler import compile_program, verify_or_raise
    from openlpu.compiler.schedule import matrix_macs_per_cycle
    from openlpu.sim.timing import timing

    program = compile_program(spec, system, workload, chips=chips, tp=tp)
    verify_or_raise(program)  # figures are read off a schedule only if it holds every invariant
    t = timing(program)
    f = _with_draft(system, program, t, draft, workload) if draft else _LpuFigures(
        t.chips, t.nodes, t.racks, f"{t.stages} x TP {t.tp}", t.tokens_per_s_per_user,
        t.throughput_tokens_per_s, t.power_w, t.sram_used_bytes, t.ttft_s)
    c = cost(lpu_capex(system, f.chips, f.nodes, f.racks), f.power_w, f.throughput_tokens_per_s, assumptions)
    peak_flops_per_s = (2 * matrix_macs_per_cycle(system, workload.weights, workload.activations)
                        * system.chip.clock_hz * f.chips)
    return PlanRow(system=system.name, kind="lpu", chips=f.chips, chips_asked=chips,
                   chips_idle=0 if chips is None else chips - t.chips, layout=f.layout, users=workload.users,
                   users_per_step=t.micro_batch,
                   memory="SRAM", memory_used_fraction=f.sram_used_bytes / (f.chips * system.chip.sram_bytes),
                   tokens_per_s_per_user=f.tokens_per_s_per_user, ttft_s=f.ttft_s,
                   throughput_tokens_per_s=f.throughput_tokens_per_s, power_w=f.power_w,
                   energy_per_token_j=f.power_w / f.throughput_tokens_per_s,
                   compute_used_fraction=flops_per_token * f.throughput_tokens_per_s / peak_flops_per_s,
                   prefill_chunk=program.workload.prefill_chunk, **_cost_fields(c))


def gpu_row(spec: ModelSpec, gpu_name: str, precision: str, context: int, users: int, prompt: int,
            flops_per_token: float, assumptions: CostAssumptions, gpus: int | None = None,
            draft: Draft | None = None, software: str = DEFAULT_SOFTWARE,
            decode_context: int | None = None) -> PlanRow:
    from openlpu.sim import gpu as gpu_model
    from openlpu.sim.gpu import gpu_timing
    from openlpu.sim.speculative import gpu_round

    gpu = load_gpu(gpu_name)
    if draft is not None and gpus is None:  # the fewest that hold the draft too
        gpus = gpu_model.gpus_needed(spec, gpu, precision, context, users, beside=draft.spec)
    t = gpu_timing(spec, gpu, precision, context, users, gpus=gpus, prompt_tokens=prompt,
                   queries=draft.tokens + 1 if draft else 1, software=software, decode_context=decode_context,
                   beside=draft.spec if draft else None)
    per_user, throughput, memory, ttft = t.tokens_per_s_per_user, t.throughput_tokens_per_s, t.hbm_used_fraction, \
        t.ttft_s
    if draft is not None:  # the draft shares the target's GPUs (as many as it is laid out over), HBM and time
        d = gpu_timing(draft.spec, gpu, precision, context, users, gpus=_draft_gpus(draft.spec, gpu, t.gpus),
                       prompt_tokens=prompt, software=software, decode_context=decode_context)
        memory += d.hbm_used_fraction
        if memory > gpu_model.HBM_USABLE_FRACTION:
            raise OpenLPUError(f"{t.gpus} x {gpu.name} cannot hold {spec.name} and the draft {draft.spec.name} with "
                               f"{counted(users, 'user')} x {context} tokens; give more GPUs with --gpus")
        r = gpu_round(t, d, draft.tokens, draft.acceptance)
        per_user, throughput, ttft = r.tokens_per_s_per_user, r.throughput_tokens_per_s, t.ttft_s + d.ttft_s
    c = cost(gpu_capex(gpu, t.gpus), t.power_w, throughput, assumptions)
    peak_flops_per_s = gpu.compute_flops_per_s(precision) * t.gpus
    return PlanRow(system=gpu.name, kind="gpu", chips=t.gpus, chips_asked=None, chips_idle=0,
                   layout=f"{t.pipeline_stages} x TP {t.tensor_parallel}", users=users, users_per_step=t.micro_batch,
                   memory="HBM",
                   memory_used_fraction=memory, tokens_per_s_per_user=per_user,
                   ttft_s=ttft, throughput_tokens_per_s=throughput, power_w=t.power_w,
                   energy_per_token_j=t.power_w / throughput,
                   compute_used_fraction=flops_per_token * throughput / peak_flops_per_s, prefill_chunk=None,
                   **_cost_fields(c))


def _draft_gpus(draft: ModelSpec, gpu: GpuSpec, gpus: int) -> int:
    """The most of the target's `gpus` a draft can be laid out over, in whole servers: no more pipeline stages
    than it has layers (136 H100s hold Llama 3.3 70B in 17 stages of 8; its 16-layer 1B draft runs on 128)."""
    while gpus > gpu.gpus_per_server and layout(draft, gpus, gpu)[1] > draft.n_layers:
        gpus -= gpu.gpus_per_server
    return gpus


Counts = int | tuple[int, ...] | None  # one value, several (a row each), or None: the default


class Plan(list):
    """A plan's rows, a PlanRow each, and the columns asked for that could not be planned (`left_out`: a
    line each, naming the column and saying why), as where one of several user counts does not fit."""

    def __init__(self, rows: list[PlanRow], left_out: list[str]):
        super().__init__(rows)
        self.left_out = tuple(left_out)


def _column(system: str, **given) -> str:
    """How a column was asked for: its system and the flags given for it, as the user wrote them."""
    flags = " ".join(f"--{flag.replace('_', '-')} {value}" for flag, value in given.items() if value is not None)
    return f"{system} {flags}".strip()


def _each(value: Counts, name: str) -> tuple:
    """A row per value, each once, in the order given."""
    values = (value,) if value is None or isinstance(value, (int, str)) else tuple(dict.fromkeys(value))
    if not values:
        raise OpenLPUError(f"{name}: give at least one value, or none for the default")
    return values


def plan(model: str | ModelSpec, system: str = "lpu-v1", compare: tuple[str, ...] = ("h100-sxm",),
         precision: str = "int8", context: int = 4096, users: Counts = 1,
         assumptions: CostAssumptions = CostAssumptions(), chips: Counts = None,
         gpus: Counts = None, prompt: int | None = None, tp: Counts | str = None,
         draft: str | ModelSpec | None = None, draft_tokens: int | None = None,
         acceptance: float | None = None, gpu_software: str | None = None,
         decode_context: int | None = None, prefill_chunk: Counts = None) -> Plan:
    """The LPU system first, then each GPU, for `users` concurrent streams of `context` tokens, on
    `chips` LPU chips in TP groups of `tp` and `gpus` GPUs of each kind (None: the fewest that hold the
    workload, the compiler's TP; `tp="all"`: every width that places the model, each on its fewest chips);
    TTFT is the prefill of `prompt` tokens (None: Workload.default_prompt_len); each decode step attends
    `decode_context` of the `context` tokens a user holds (None: all of them); the LPU prefills in chunks of
    `prefill_chunk` tokens (None: the compiler's choice). Several user counts, chip counts, widths, chunks or
    GPU counts give a row each: every user count, with every chip count, with every chunk, with every width;
    those that cannot be planned (too many users to fit, a width wider than the chips given) are left out
    with the reason (Plan.left_out), unless none can, when the first reason is raised.
    `model`, `draft`: a ModelSpec, or what load_spec takes (a preset name, a .gguf file, a config.json).
    With a draft, every system decodes speculatively: `draft_tokens` (default DRAFT_TOKENS) per round,
    each accepted with probability `acceptance`, which must be given. `gpu_software`: the GPUs' serving
    kernels, a key of sim.gpu.SOFTWARE (None: DEFAULT_SOFTWARE)."""
    from openlpu.compiler import Workload

    spec = model if isinstance(model, ModelSpec) else load_spec(model)
    as_precision(precision)
    prompt = Workload.default_prompt_len(context) if prompt is None else prompt
    attended = context if decode_context is None else decode_context
    chunks = _each(prefill_chunk, "prefill_chunk")  # (None,): the compiler's choice
    user_counts = _each(users, "users")
    check_workload_flags(spec, context, user_counts, prompt, attended, tuple(c for c in chunks if c is not None))
    speculation = None
    if draft is not None:
        if acceptance is None:
            raise OpenLPUError("--draft needs --acceptance: the chance the target accepts a draft token, which "
                               "depends on the two models and the text (measure it on your own prompts)")
        try:
            draft_spec = draft if isinstance(draft, ModelSpec) else load_spec(draft)
        except OpenLPUError as error:  # said of the draft, not of MODEL
            raise OpenLPUError(f"--draft: {error}") from None
        speculation = Draft(draft_spec, DRAFT_TOKENS if draft_tokens is None else draft_tokens, acceptance)
        _check_draft(spec, speculation, context)
    elif draft_tokens is not None or acceptance is not None:
        raise OpenLPUError("--draft-tokens and --acceptance describe speculative decoding: give the draft model "
                           "with --draft")
    lpu = load_system(system) if system else None  # unknown names fail before any compile work
    compare = tuple(dict.fromkeys(compare))  # a GPU named twice is one column
    gpu_specs = {name: load_gpu(name) for name in compare}  # unknown names fail here too
    if gpu_software is not None:
        software_named(gpu_software)
    if not compare and not system:
        raise OpenLPUError(f"nothing to plan: give --system and/or --compare ({', '.join(gpu_names())})")
    for side, left_out, flags in ((system, "--system", {"--chips": chips, "--tp": tp, "--prefill-chunk": prefill_chunk}),
                                  (compare, "--compare", {"--gpus": gpus, "--gpu-software": gpu_software})):
        if not side and (unused := [flag for flag, value in flags.items() if value is not None]):
            one = len(unused) == 1
            raise OpenLPUError(f"{', '.join(unused)} describe{'s' if one else ''} a system this plan leaves out "
                               f"({left_out} ''); drop {'it' if one else 'them'} or name the system")
    if tp == "all" and chips is not None:
        raise OpenLPUError("--tp all places each width on its fewest chips; to place widths on --chips, name "
                           "them (--tp 8,16)")
    gpu_software = DEFAULT_SOFTWARE if gpu_software is None else gpu_software
    chip_counts, widths, gpu_counts = _each(chips, "chips"), tp if tp == "all" else _each(tp, "tp"), _each(gpus, "gpus")
    _check_counts(spec, lpu, chip_counts, widths, list(gpu_specs.values()), gpu_counts)
    flops = matrix_flops_per_token(spec, precision, attended, speculation)  # the same work per token everywhere
    several_users = user_counts if len(user_counts) > 1 else (None,)
    columns = []  # (how the column was asked for, what makes its row)
    if lpu is not None:
        for n_users, shown_users in zip(user_counts, several_users):
            workloads = [lpu_workload(precision, context, n_users, prompt, c, speculation, decode_context)
                         for c in chunks]
            # "all": None where no width places the model, and the compiler says what does not fit
            width_sets = [(placeable_widths(spec, lpu, w) or (None,)) if widths == "all" else widths
                          for w in workloads]
            columns += [(_column(lpu.name, users=shown_users, chips=n, tp=t, prefill_chunk=workload.prefill_chunk),
                         functools.partial(lpu_row, spec, lpu, workload, flops, assumptions, n, t, speculation))
                        for n in chip_counts for workload, each in zip(workloads, width_sets) for t in each]
    columns += [(_column(gpu_specs[name].name, users=shown_users, gpus=n),
                 functools.partial(gpu_row, spec, name, precision, context, n_users, prompt, flops, assumptions, n,
                                   speculation, gpu_software, decode_context))
                for name in compare for n_users, shown_users in zip(user_counts, several_users) for n in gpu_counts]
    rows, left_out, refusal = [], [], None
    for asked, make_row in columns:
        try:
            rows.append(make_row())
        except OpenLPUError as e:
            refusal = refusal or e
            left_out.append(f"{asked}: {e}")
    if not rows:
        raise refusal
    return Plan(rows, left_out)


PLOT_METRICS = (("tokens_per_s_per_user", "tokens/s per user"), ("throughput_tokens_per_s", "tokens/s (system)"),
                ("ttft_s", "TTFT (s)"), ("chips", "chips / GPUs"), ("power_w", "IT power (W)"),
                ("energy_per_token_j", "J per token"), ("capex_usd", "capex ($)"),
                ("usd_per_million_tokens", "$ per million tokens"))
LPU_COLOUR, GPU_COLOURS = "#d2691e", ("#4c8c2b", "#2b6c8c", "#8c2b7a", "#7a7a2b")


def _bar_labels(rows: list[PlanRow]) -> list[str]:
    """Each bar's system, and what tells it apart from the others of its system: the chips (and those asked
    for), the layout, the users and the prefill chunk, where they differ."""
    def parts(r: PlanRow) -> list[str]:
        unit = "chip" if r.kind == "lpu" else "GPU"
        used = counted(r.chips, unit) + (f" ({r.chips_idle:,} of {r.chips_asked:,} idle)" if r.chips_idle else "")
        return [used, r.layout, counted(r.users, "user"),
                f"chunk {r.prefill_chunk:,}" if r.prefill_chunk else ""]
    labels = []
    for r in rows:
        same = [parts(o) for o in rows if o.system == r.system]
        differ = [part for i, part in enumerate(parts(r)) if part and len({p[i] for p in same}) > 1]
        labels.append("\n".join([r.system, *differ]))
    return labels


BAR_IN, PANEL_MIN_IN, PANEL_HEIGHT_IN, PLOT_WIDE_IN = 0.75, 4.25, 3.75, 24  # a bar with its label; page sizes


def plot_grid(bars: int) -> tuple[int, int, float, float]:
    """(panels down, panels across, width, height in inches) of a plot of `bars` bars a panel: the 8 panels 4
    across, or 2 or 1 where more would be wider than PLOT_WIDE_IN (12 bars a panel: 2 across, 18 inches, not 36;
    30: 1 across, 22.5), wider only where one panel's bars need it (over 32)."""
    panel_in = max(PANEL_MIN_IN, BAR_IN * bars)
    across = next((a for a in (4, 2) if a * panel_in <= PLOT_WIDE_IN), 1)
    down = len(PLOT_METRICS) // across
    return down, across, across * panel_in, down * PANEL_HEIGHT_IN


def plot(rows: list[PlanRow], path: str | Path, title: str) -> Path:
    """A PNG of the rows: one panel per metric, one bar per row (a colour per system), log scales."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    down, across, width_in, height_in = plot_grid(len(rows))
    fig, axes = plt.subplots(down, across, figsize=(width_in, height_in))
    names = _bar_labels(rows)
    gpus = list(dict.fromkeys(r.system for r in rows if r.kind == "gpu"))
    colours = [LPU_COLOUR if r.kind == "lpu" else GPU_COLOURS[gpus.index(r.system) % len(GPU_COLOURS)]
               for r in rows]
    small = any("\n" in name for name in names)
    for ax, (field, label) in zip(axes.flat, PLOT_METRICS):
        values = [getattr(r, field) for r in rows]
        bars = ax.bar(range(len(rows)), values, color=colours, tick_label=names)
        ax.tick_params(axis="x", labelsize=7 if small else 10)
        ax.set_yscale("log")
        ax.set_title(label)
        ax.bar_label(bars, labels=[significant(v) for v in values], fontsize=8)
        ax.margins(y=0.3)
    fig.suptitle(title)
    fig.tight_layout()
    return save_png(fig, path, "plot")
