"""`openlpu plan`: one model, one LPU system and some GPUs, side by side in the same rows.

The LPU row comes from the compiled Program (compiler -> sim.timing); each GPU row from the same
op rows on the GPU roofline model (sim.gpu); both are priced by sim.cost with the same assumptions.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from pathlib import Path

from openlpu.errors import OpenLPUError
from openlpu.graph.lower import as_precision
from openlpu.hardware.gpu import gpu_names, load_gpu
from openlpu.hardware.lpu import load_system
from openlpu.models.spec import ModelSpec, load_spec
from openlpu.sim.cost import CostAssumptions, cost, gpu_capex, lpu_capex
from openlpu.sim.figures import save_png


@dataclass(frozen=True)
class PlanRow:
    system: str
    kind: str  # "lpu" or "gpu"
    chips: int  # LPU chips or GPUs
    layout: str  # pipeline stages x tensor-parallel width
    users_per_step: int  # users whose tokens one decode step computes together (LPU: a micro-batch)
    memory: str  # "SRAM" or "HBM"
    memory_used_fraction: float  # of the capacity of the chips used
    tokens_per_s_per_user: float
    ttft_s: float
    throughput_tokens_per_s: float
    power_w: float  # IT power while serving (no PUE)
    energy_per_token_j: float
    compute_used_fraction: float  # matrix FLOPs done / the peak of the chips used, in steady state (MFU)
    capex_usd: float
    usd_per_million_tokens: float

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)


def prompt_tokens(context: int) -> int:
    """The prompt whose prefill sets TTFT: the compiler's default Workload.prompt_len, within context."""
    from openlpu.compiler import Workload

    return min(Workload().prompt_len, context)


def matrix_flops_per_token(spec: ModelSpec, precision: str, context: int) -> float:
    """The matmul and attention FLOPs of one user's decode step at `context` tokens: the work both
    systems do per token, whatever their layout."""
    from openlpu.graph.lower import lower

    return sum(op.flops for op in lower(spec, "decode", context, 1, precision) if op.unit == "matrix")


def _check_workload(spec: ModelSpec, context: int, users: int, prompt: int) -> None:
    for what, v in (("context", context), ("users", users), ("prompt", prompt)):
        if isinstance(v, bool) or not isinstance(v, int) or v <= 0:
            raise OpenLPUError(f"--{what} must be a positive integer, got {v!r}")
    if context > spec.context_length:
        raise OpenLPUError(f"--context {context} is longer than {spec.name}'s context window "
                           f"({spec.context_length} tokens); use at most {spec.context_length}")
    if prompt > context:
        raise OpenLPUError(f"--prompt {prompt} is longer than --context {context}; use at most {context}")


def lpu_row(spec: ModelSpec, system_name: str, precision: str, context: int, users: int, prompt: int,
            flops_per_token: float, assumptions: CostAssumptions, chips: int | None = None,
            tp: int | None = None) -> PlanRow:
    from openlpu.compiler import Workload, compile_program, verify_or_raise
    from openlpu.compiler.schedule import matrix_macs_per_cycle
    from openlpu.sim.timing import timing

    system = load_system(system_name)
    workload = Workload(weights=precision, activations=precision, kv=precision, context_length=context,
                        users=users, prompt_len=prompt)
    program = compile_program(spec, system, workload, chips=chips, tp=tp)
    verify_or_raise(program)  # figures are read off a schedule only if it holds every invariant
    t = timing(program)
    c = cost(lpu_capex(system, t.chips), t.power_w, t.throughput_tokens_per_s, assumptions)
    peak_flops_per_s = 2 * matrix_macs_per_cycle(system, precision, precision) * system.chip.clock_hz * t.chips
    used = flops_per_token * t.throughput_tokens_per_s / peak_flops_per_s
    return PlanRow(system=system.name, kind="lpu", chips=t.chips, layout=f"{t.stages} x TP {t.tp}",
                   users_per_step=t.micro_batch, memory="SRAM",
                   memory_used_fraction=t.sram_used_fraction, tokens_per_s_per_user=t.tokens_per_s_per_user,
                   ttft_s=t.ttft_s, throughput_tokens_per_s=t.throughput_tokens_per_s, power_w=t.power_w,
                   energy_per_token_j=t.energy_per_token_j, compute_used_fraction=used,
                   capex_usd=c.capex.total_usd, usd_per_million_tokens=c.usd_per_million_tokens)


def gpu_row(spec: ModelSpec, gpu_name: str, precision: str, context: int, users: int, prompt: int,
            flops_per_token: float, assumptions: CostAssumptions, gpus: int | None = None) -> PlanRow:
    from openlpu.sim.gpu import gpu_timing

    gpu = load_gpu(gpu_name)
    t = gpu_timing(spec, gpu, precision, context, users, gpus=gpus, prompt_tokens=prompt)
    c = cost(gpu_capex(gpu, t.gpus), t.power_w, t.throughput_tokens_per_s, assumptions)
    peak_flops_per_s = gpu.compute_flops_per_s(precision) * t.gpus
    used = flops_per_token * t.throughput_tokens_per_s / peak_flops_per_s
    return PlanRow(system=gpu.name, kind="gpu", chips=t.gpus,
                   layout=f"{t.pipeline_stages} x TP {t.tensor_parallel}", users_per_step=users, memory="HBM",
                   memory_used_fraction=t.hbm_used_fraction, tokens_per_s_per_user=t.tokens_per_s_per_user,
                   ttft_s=t.ttft_s, throughput_tokens_per_s=t.throughput_tokens_per_s, power_w=t.power_w,
                   energy_per_token_j=t.energy_per_token_j, compute_used_fraction=used,
                   capex_usd=c.capex.total_usd, usd_per_million_tokens=c.usd_per_million_tokens)


def plan(model: str | ModelSpec, system: str = "lpu-v1", compare: tuple[str, ...] = ("h100-sxm",),
         precision: str = "int8", context: int = 4096, users: int = 1,
         assumptions: CostAssumptions = CostAssumptions(), chips: int | None = None,
         gpus: int | None = None, prompt: int | None = None, tp: int | None = None) -> list[PlanRow]:
    """The LPU system first, then each GPU, for `users` concurrent streams of `context` tokens, on
    `chips` LPU chips in TP groups of `tp` and `gpus` GPUs of each kind (None: the fewest that hold the
    workload, the compiler's TP); TTFT is the prefill of `prompt` tokens (None: prompt_tokens(context)).
    `model`: a ModelSpec, or what load_spec takes (a preset name, a .gguf file, a config.json)."""
    spec = model if isinstance(model, ModelSpec) else load_spec(model)
    as_precision(precision)
    prompt = prompt_tokens(context) if prompt is None else prompt
    _check_workload(spec, context, users, prompt)
    if system:
        load_system(system)  # unknown names fail before any compile work
    for name in compare:
        load_gpu(name)
    if not compare and not system:
        raise OpenLPUError(f"nothing to plan: give --system and/or --compare ({', '.join(gpu_names())})")
    flops = matrix_flops_per_token(spec, precision, context)  # the same work per token on every system
    rows = [lpu_row(spec, system, precision, context, users, prompt, flops, assumptions, chips, tp)] if system else []
    return rows + [gpu_row(spec, name, precision, context, users, prompt, flops, assumptions, gpus)
                   for name in compare]


PLOT_METRICS = (("tokens_per_s_per_user", "tokens/s per user"), ("throughput_tokens_per_s", "tokens/s (system)"),
                ("energy_per_token_j", "J per token"), ("usd_per_million_tokens", "$ per million tokens"),
                ("capex_usd", "capex ($)"), ("chips", "chips / GPUs"))


def plot(rows: list[PlanRow], path: str | Path, title: str) -> Path:
    """A PNG of the rows: one panel per metric, one bar per system, log scales."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(2, 3, figsize=(13, 7))
    names = [r.system for r in rows]
    colours = ["#d2691e" if r.kind == "lpu" else "#4c8c2b" for r in rows]
    for ax, (field, label) in zip(axes.flat, PLOT_METRICS):
        values = [getattr(r, field) for r in rows]
        bars = ax.bar(names, values, color=colours)
        ax.set_yscale("log")
        ax.set_title(label)
        ax.bar_label(bars, labels=[f"{v:,.3g}" for v in values], fontsize=8)
        ax.margins(y=0.3)
    fig.suptitle(title)
    fig.tight_layout()
    return save_png(fig, path, "plot")
