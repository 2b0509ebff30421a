"""Fidelity: OpenLPU's predicted speeds against published measurements, with the error per point.

    python bench/fidelity.py            # writes bench/results/fidelity.md and fidelity.json

LPU side: Groq's public service (GroqCloud) at the chip count of the published deployment where one
was published, else the compiler's fewest chips. GPU side: NVIDIA's own TensorRT-LLM figures for
H100/H200. Each point is either FIT (a constant the public record leaves open was fitted on it) or
CHECK (held out). The fits are repeated here from scratch and printed next to the constants the
package ships, so a drift between them shows.
"""

from __future__ import annotations

import dataclasses
import json
import sys
from dataclasses import dataclass
from pathlib import Path

from openlpu.hardware.gpu import load_gpu
from openlpu.hardware.lpu import load_system
from openlpu.models.spec import load_preset
from openlpu.sim import gpu as G

RESULTS = Path(__file__).parent / "results"
TARGET_ERROR = 0.15


@dataclass(frozen=True)
class Point:
    system: str  # "lpu-v1" or a GPU preset
    model: str
    chips: int | None  # the published deployment's chip/GPU count; None: not published
    precision: str
    metric: str  # see METRICS
    published: float
    source: str
    date: str
    role: str  # "FIT: <constant>" or "CHECK"
    setting: dict = dataclasses.field(default_factory=dict)  # metric parameters (tokens, batch)


METRICS = {
    "decode_tok_s_per_user": "tokens/s per user while generating (1 / inter-token latency)",
    "llmperf_tok_s_per_request": "LLMPerf: output tokens / end-to-end request latency (TTFT included)",
    "e2e_latency_s": "end-to-end latency of one request, s",
    "offline_tok_s": "offline batch throughput, output tokens/s",
}

GROQ_LLMPERF = ("ray-project/llmperf-leaderboard raw data (Groq, 550 in / 150 out, 5 concurrent "
                "requests), median")
LPU_POINTS = [
    Point("lpu-v1", "llama-2-70b", 576, "int8", "decode_tok_s_per_user", 300,
          "Groq press, 'Llama 2 70B at 300 tokens/s per user, 4k context' (TechPowerUp news, Feb 2024)",
          "2024-02", "FIT: per-hop link latency", {"context": 4096}),
    Point("lpu-v1", "llama-2-70b", 576, "int8", "llmperf_tok_s_per_request", 185, GROQ_LLMPERF,
          "2024-01-10", "CHECK", {"input": 550, "output": 150}),
    Point("lpu-v1", "mixtral-8x7b", 576, "int8", "decode_tok_s_per_user", 480,
          "Groq, 'Mixtral 8x7B at 480 tokens/s' (TechPowerUp news, Feb 2024); Artificial Analysis measured ~430",
          "2024-02", "CHECK", {"context": 4096}),
    Point("lpu-v1", "llama-2-7b", None, "int8", "decode_tok_s_per_user", 750,
          "Groq, 'Llama 2 7B at 750 tokens/s, 2k context' (TechPowerUp news, Feb 2024)",
          "2024-02", "CHECK", {"context": 2048}),
    Point("lpu-v1", "llama-3.1-8b", None, "int8", "decode_tok_s_per_user", 750,
          "neuraplus-ai.github.io 'Groq LPU vs GPU latency test' (50-run average; undated, 2025) [L]",
          "2025", "CHECK", {"context": 4096}),
    Point("lpu-v1", "llama-3.3-70b", None, "int8", "decode_tok_s_per_user", 270,
          "neuraplus-ai.github.io 'Groq LPU vs GPU latency test' (undated, 2025) [L]; kickllm.com lists 330 (Apr 2026)",
          "2025", "CHECK", {"context": 4096}),
]

# Deployments whose chip count Groq did not publish: predicted both at the compiler's fewest chips and
# at 576, the size of the two deployments Groq did publish (Llama-2-70B, Mixtral, Feb 2024).
PUBLISHED_SYSTEM_CHIPS = 576
LPU_POINTS += [dataclasses.replace(p, chips=PUBLISHED_SYSTEM_CHIPS, role="CHECK (576 chips assumed)")
               for p in LPU_POINTS if p.chips is None]

NVIDIA_DGX = ("NVIDIA technical blog 'Achieving Top Inference Performance with the NVIDIA H100 Tensor Core "
              "GPU and NVIDIA TensorRT-LLM' (DGX H100, FP8, TensorRT-LLM 0.5, batch 1)")
TRT_H200 = "TensorRT-LLM 0.5 docs/source/blogs/H200launch.md, 'H200 FP8 Max throughput' table (TensorRT-LLM 0.5)"
GPU_POINTS = [
    Point("h100-sxm", "llama-2-70b", 8, "fp8", "e2e_latency_s", 1.7, NVIDIA_DGX, "2023-12",
          "FIT: KERNEL_OVERHEAD_S", {"input": 2048, "output": 128}),
    Point("h200", "llama-2-70b", 1, "fp8", "offline_tok_s", 303, TRT_H200, "2023-11",
          "FIT: COMPUTE_EFFICIENCY", {"batch": 32, "input": 2048, "output": 128}),
    Point("h200", "llama-2-70b", 2, "fp8", "offline_tok_s", 682, TRT_H200, "2023-11", "CHECK",
          {"batch": 64, "input": 2048, "output": 128}),
    Point("h200", "llama-2-70b", 1, "fp8", "offline_tok_s", 3014, TRT_H200, "2023-11", "CHECK",
          {"batch": 512, "input": 128, "output": 128}),
    Point("h200", "llama-2-70b", 4, "fp8", "offline_tok_s", 6616, TRT_H200, "2023-11", "CHECK",
          {"batch": 512, "input": 128, "output": 2048}),
]


# ---- predictions --------------------------------------------------------------------------------
def predict_gpu(p: Point) -> float:
    spec, gpu = load_preset(p.model), load_gpu(p.system)
    s = p.setting
    if p.metric == "e2e_latency_s":
        t = G.gpu_timing(spec, gpu, p.precision, context=s["input"] + s["output"], gpus=p.chips,
                         prompt_tokens=s["input"])
        return t.ttft_s + (s["output"] - 1) * t.decode_step_s
    if p.metric == "offline_tok_s":
        run = G.offline_run_s(spec, gpu, p.precision, p.chips, s["batch"], s["input"], s["output"])
        return s["batch"] * s["output"] / run
    raise ValueError(p.metric)


def lpu_timing(p: Point, system, context: int, prompt: int):
    from openlpu.compiler import Workload, compile_program
    from openlpu.sim.timing import timing

    workload = Workload(weights=p.precision, activations=p.precision, kv=p.precision,
                        context_length=context, users=1, prompt_len=prompt)
    return timing(compile_program(load_preset(p.model), system, workload, chips=p.chips))


def predict_lpu(p: Point, system) -> tuple[float, int]:
    s = p.setting
    if p.metric == "decode_tok_s_per_user":
        t = lpu_timing(p, system, s["context"], min(512, s["context"]))
        return t.tokens_per_s_per_user, t.chips
    if p.metric == "llmperf_tok_s_per_request":
        t = lpu_timing(p, system, s["input"] + s["output"], s["input"])
        return s["output"] / (t.ttft_s + (s["output"] - 1) * t.decode_latency_s), t.chips
    raise ValueError(p.metric)


# ---- fits ---------------------------------------------------------------------------------------
def bisect(f, target: float, lo: float, hi: float, rising: bool, steps: int = 40) -> float:
    for _ in range(steps):
        mid = (lo + hi) / 2
        lo, hi = (mid, hi) if (f(mid) < target) == rising else (lo, mid)
    return (lo + hi) / 2


def fit_gpu() -> dict:
    """Jointly fit KERNEL_OVERHEAD_S (on the DGX H100 latency) and COMPUTE_EFFICIENCY (on the H200
    batch-32 throughput); returns the fitted values and restores the shipped constants."""
    shipped = G.KERNEL_OVERHEAD_S, G.COMPUTE_EFFICIENCY
    latency_point, throughput_point = GPU_POINTS[0], GPU_POINTS[1]
    try:
        for _ in range(4):
            G.KERNEL_OVERHEAD_S = bisect(lambda k: _with(G, "KERNEL_OVERHEAD_S", k, latency_point),
                                         latency_point.published, 0.0, 30e-6, rising=True)
            G.COMPUTE_EFFICIENCY = bisect(lambda c: _with(G, "COMPUTE_EFFICIENCY", c, throughput_point),
                                          throughput_point.published, 0.05, 1.0, rising=True)
        return {"KERNEL_OVERHEAD_S": G.KERNEL_OVERHEAD_S, "COMPUTE_EFFICIENCY": G.COMPUTE_EFFICIENCY}
    finally:
        G.KERNEL_OVERHEAD_S, G.COMPUTE_EFFICIENCY = shipped


def _with(module, name: str, value: float, p: Point) -> float:
    setattr(module, name, value)
    return predict_gpu(p)


def with_hop_latency(system, latency_s: float):
    links = {k: dataclasses.replace(v, latency_s=latency_s * (v.latency_s / system.links["local"].latency_s))
             for k, v in system.links.items()}
    return dataclasses.replace(system, links=links)


def fit_lpu_hop(system) -> float:
    """The per-hop latency (scaling all link kinds by the same factor, keeping the preset's ratios
    between in-node, in-rack and cross-rack hops) that reproduces the FIT point."""
    point = LPU_POINTS[0]
    return bisect(lambda h: predict_lpu(point, with_hop_latency(system, h))[0], point.published,
                  1e-9, 5e-6, rising=False)


# ---- report -------------------------------------------------------------------------------------
def rows(points, predict) -> list[dict]:
    out = []
    for p in points:
        predicted, chips = predict(p)
        out.append({**dataclasses.asdict(p), "chips_modelled": chips, "predicted": predicted,
                    "error": predicted / p.published - 1})
    return out


def markdown(lpu_rows, gpu_rows, gpu_fit, hop_fit, shipped_hop) -> str:
    def table(rs):
        lines = ["| system | model | chips (published / modelled) | metric | published | predicted | error | "
                 "role | source, date |", "|---|---|---|---|---|---|---|---|---|"]
        for r in rs:
            published = "not published" if r["chips"] is None or "assumed" in r["role"] else r["chips"]
            chips = f"{published} / {r['chips_modelled']}"
            flag = "" if abs(r["error"]) <= TARGET_ERROR or "CHECK" not in r["role"] else " **(>15%)**"
            lines.append(f"| {r['system']} | {r['model']} ({r['precision']}) | {chips} | {r['metric']} "
                         f"{_setting(r['setting'])} | {r['published']:,} | {r['predicted']:,.3g} | "
                         f"{r['error']:+.0%}{flag} | {r['role']} | {r['source']}, {r['date']} |")
        return "\n".join(lines)

    checks = [r for r in lpu_rows + gpu_rows if "CHECK" in r["role"]]
    within = sum(abs(r["error"]) <= TARGET_ERROR for r in checks)
    return f"""# Fidelity: predictions vs published measurements

Generated by `python bench/fidelity.py`. Error = predicted / published - 1. Target: within
{TARGET_ERROR:.0%} on held-out (CHECK) points: **{within} of {len(checks)} are**.

Metrics: {"; ".join(f"`{k}` = {v}" for k, v in METRICS.items())}.

## LPU (lpu-v1 preset) vs Groq's public service

Open constant: the per-hop chip-to-chip latency (not published; the preset ships
{shipped_hop * 1e9:.0f} ns for an in-node hop, other link kinds in proportion). Rows below use the
value fitted on the FIT row: **{hop_fit * 1e9:.0f} ns** per in-node hop.

{table(lpu_rows)}

## GPU model vs NVIDIA's published TensorRT-LLM figures

Open constants, fitted jointly here (shipped values in `openlpu/sim/gpu.py` in brackets):
KERNEL_OVERHEAD_S = {gpu_fit['KERNEL_OVERHEAD_S'] * 1e6:.2f} us [{G.KERNEL_OVERHEAD_S * 1e6:.2f} us],
COMPUTE_EFFICIENCY = {gpu_fit['COMPUTE_EFFICIENCY']:.3f} [{G.COMPUTE_EFFICIENCY:.3f}].

{table(gpu_rows)}

## Reading the errors

- The fitted hop latency is far above the unverified "< 100 ns" note: it stands for every fixed cost
  a token pays per pipeline stage that the schedule does not model (link deskew and alignment,
  host-side sampling), so it is a calibration, not a measurement of a wire.
- Groq published chip counts only for Llama-2-70B and Mixtral (576 chips). For the other models the
  table gives both the compiler's fewest chips and the 576-chip assumption: the gap between the two
  rows is how much the unknown deployment size alone moves the prediction (a longer pipeline adds
  hops per token).
- Mixtral: the model spreads expert reads evenly over the chips; routing imbalance and the MoE
  all-to-all are not modelled, hence the over-prediction.
- LLMPerf counts TTFT measured over the internet (median 0.22 s, including queueing); the model's
  TTFT has no network or queue.
- GPU, batch 512 with 2,048 output tokens: TensorRT-LLM 0.5's grouped-query decode attention was
  slow (NVIDIA later reported up to 2.4x on Llama-70B from improved GQA kernels); the roofline
  assumes attention streams the KV cache at the same efficiency as weights.
"""


def _setting(s: dict) -> str:
    return "(" + ", ".join(f"{k} {v}" for k, v in s.items()) + ")"


def main() -> int:
    gpu_fit = fit_gpu()
    gpu_rows = rows(GPU_POINTS, lambda p: (predict_gpu(p), p.chips))
    system = load_system("lpu-v1")
    shipped_hop = system.links["local"].latency_s
    hop = fit_lpu_hop(system)
    fitted_system = with_hop_latency(system, hop)
    lpu_rows = rows(LPU_POINTS, lambda p: predict_lpu(p, fitted_system))
    RESULTS.mkdir(exist_ok=True)
    (RESULTS / "fidelity.json").write_text(json.dumps(
        {"gpu_fit": gpu_fit, "lpu_hop_latency_fit_s": hop, "lpu": lpu_rows, "gpu": gpu_rows}, indent=1) + "\n")
    text = markdown(lpu_rows, gpu_rows, gpu_fit, hop, shipped_hop)
    (RESULTS / "fidelity.md").write_text(text)
    print(text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
