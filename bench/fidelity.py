"""Fidelity: OpenLPU's predicted speeds against published measurements, with the error per point.

    python bench/fidelity.py            # writes bench/results/fidelity.md and fidelity.json

LPU side: Groq's public service (GroqCloud) at the chip count of the published deployment where one
was published, else the compiler's fewest chips. GPU side: NVIDIA's own TensorRT-LLM figures: from 2023
for H100, H200 and A100 (throughput and first-token latency; Llama 2 7B, 13B and 70B, and 70B with v0.7a on H200),
and TensorRT-LLM 1.0's throughput table for H100, H200 and B200 (Llama 3.1 8B, 3.3 70B, 3.1 405B; on B200
also Qwen3-30B-A3B and Llama 4 Scout), with its GB200 figures read for the host loop. Each point is FIT
(a constant the public record leaves open was fitted on it), CHECK (held out, counted) or ALT (a figure
already held out, repeated under another deployment; not counted). The
fits are repeated here from scratch and printed next to the constants the package ships, so a drift
between them shows. Each held-out row is also compiled at the install rate that would reproduce it, to
show how far apart the rows are in the one LPU constant. Groq's speculative-decoding endpoint is read,
not counted: the acceptance rate its published speed would need, per candidate draft model.
"""

from __future__ import annotations

import argparse
import dataclasses
import datetime
import json
import math
import platform
import sys
import textwrap
from dataclasses import dataclass
from pathlib import Path

from openlpu.compiler import Workload
from openlpu.hardware.gpu import load_gpu
from openlpu.hardware.lpu import load_system
from openlpu.models.spec import load_preset
from openlpu.sim import gpu as G

RESULTS = Path(__file__).parent / "results"
TARGET_ERROR = 0.15
# the public lower bound on the install rate: one vector per MXM plane per cycle (ISCA 2020 'Think Fast':
# 320-byte vectors, 4 MXM planes of 320 x 320)
VECTOR_BYTES, MXM_PLANES = 320, 4


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
    role: str  # "FIT: <constant>", "CHECK" (held out, counted) or "ALT: <why not counted>"
    setting: dict = dataclasses.field(default_factory=dict)  # metric parameters (tokens, batch)
    chips_published: int | None = None  # when the row models another chip count than the published one
    software: str | None = None  # GPU rows: the serving stack that ran them (a key of openlpu.sim.gpu.SOFTWARE)


METRICS = {
    "decode_tok_s_per_user": "tokens/s per user while generating (1 / inter-token latency)",
    "llmperf_tok_s_per_request": "LLMPerf: output tokens / end-to-end request latency (TTFT included)",
    "llmperf_decode_tok_s": "LLMPerf: (output tokens - 1) / (mean end-to-end latency - mean TTFT), the "
                            "generation speed after the first token",
    "e2e_latency_s": "end-to-end latency of one request, s",
    "offline_tok_s": "offline batch throughput, output tokens/s",
    "ttft_s": "first-token latency of one request (batch 1): its prefill, s",
    "max_load_tok_s": "throughput under unbounded load (`trtllm-bench throughput`), output tokens/s of all GPUs, "
                      "modelled at the most requests whose KV cache of input + output tokens fits beside the "
                      "weights, at most 4,096 (trtllm-bench's cap)",
}

GROQ_LLMPERF = ("ray-project/llmperf-leaderboard raw data (Groq, 550 in / 150 out, 5 concurrent "
                "requests), median")
# ray-project/llmperf-leaderboard raw_data/summary/groq_70b.json (timestamp 1704851704 = 2024-01-10), 150
# requests of 550 in / 150 out. LLMPerf's "inter-token latency" is the whole request time per output
# token (TTFT included: 5.38 ms x 150 = 0.81 s, its mean end-to-end latency), so it is not a decode speed;
# the mean decode time of a request is exactly the mean end-to-end latency minus the mean TTFT.
LLMPERF_GROQ_70B = {"mean_end_to_end_s": 0.8151081097126007, "mean_ttft_s": 0.22786034579078357,
                    "output_tokens": 150, "median_ttft_s": 0.2218883791938424}
LLMPERF_DECODE_TOK_S = (LLMPERF_GROQ_70B["output_tokens"] - 1) / (
    LLMPERF_GROQ_70B["mean_end_to_end_s"] - LLMPERF_GROQ_70B["mean_ttft_s"])
# the service LLMPerf measured, llama2-70b-4096 (its "model" field), at the benchmark's concurrent requests
LLMPERF_SETTING = {"input": 550, "output": 150, "context": 4096, "users": 5}
GROQ_LLMPERF_DECODE = ("ray-project/llmperf-leaderboard raw_data/summary/groq_70b.json (Groq, 550 in / 150 out, "
                       "5 concurrent requests): 149 tokens / (mean end-to-end 0.815 s - mean TTFT 0.228 s)")
# The chip counts Groq's deployments are known by (576 = 8 racks of 72 for Llama-2-70B and Mixtral) come
# from Groq staff on Hacker News and SemiAnalysis, Feb 2024 [M]; none was published for the other models.
# The count is used for every row of those two models: no later count was published.
CHIPS_SOURCE = ("576 chips (8 racks of 72) for Llama-2-70B and for Mixtral 8x7B: Groq staff on Hacker News and "
                "SemiAnalysis, Feb 2024 [M]")
PIPELINE_SOURCE = "SemiAnalysis, Feb 2024: pipeline parallel, a few users in flight [M]"
COUNTED = "CHECK"
# Each service row is modelled at the context window the service offered: the number in the model's id
# (llama2-70b-4096, mixtral-8x7b-32768, llama3-8b-8192) or the catalogue's window, else the press figure's.
# GroqCloud's model catalogue lists a speed per model; undated, but it lists openai/gpt-oss (released
# Aug 2025) beside these, so it is the service of 2025 or later, at whatever load it then carried
GROQ_CATALOGUE = ("GroqCloud documentation, model catalogue: '{}' listed at ~{} tok/s, {} (undated; lists "
                  "gpt-oss, so Aug 2025 or later)")
CATALOGUE_WINDOW = "131,072-token window"
# Groq's price list of Aug 2024 had a "current speed" column; Groq's page is not archived here, a
# third-party copy dated 3 Aug 2024 is: github.com/aisudoapp/ai-model-providers providers/groq/README.md
GROQ_PRICES_2024 = ("Groq's price list, 'current speed' column: '{}' ~{} tok/s (as copied on 3 Aug 2024 in "
                    "aisudoapp/ai-model-providers providers/groq/README.md) [M]")
# thefastest.ai (fixie-ai): races 5 streamed requests of up to 100 tokens and reports, for the first to
# answer, (chunks - 1) / (last chunk time - first chunk time), a generation speed after the first token
THEFASTEST = ("thefastest.ai, fixie-ai/thefastest.ai src/data/currentMetrics.md: 'api.groq.com/{}' TPS {} "
              "((chunks - 1) / streaming time of the fastest of 5 raced requests; its llm_benchmark.py) [M]")
FIT_POINT = Point("lpu-v1", "llama-2-70b", 576, "int8", "decode_tok_s_per_user", 300,
                  ("Groq press: Llama 2 70B served at 300 tokens/s with a 4,096-token context (TechPowerUp "
                   "news, Feb 2024; read here as a speed per user, which the text does not say)"),
                  "2024-02", "FIT: matrix_install_bytes_per_cycle", {"context": 4096})
MIXTRAL_PRESS = Point("lpu-v1", "mixtral-8x7b", 576, "int8", "decode_tok_s_per_user", 480,
                      "Groq: Mixtral 8x7B at 480 tokens/s (TechPowerUp news, Feb 2024); Artificial Analysis "
                      "measured ~430", "2024-02", COUNTED, {"context": 32768})
LLAMA_31_8B = Point("lpu-v1", "llama-3.1-8b", None, "int8", "decode_tok_s_per_user", 560,
                    GROQ_CATALOGUE.format("llama-3.1-8b-instant", 560, CATALOGUE_WINDOW), "2025", COUNTED,
                    {"context": 131072})
LLAMA_33_70B = Point("lpu-v1", "llama-3.3-70b", None, "int8", "decode_tok_s_per_user", 280,
                     GROQ_CATALOGUE.format("llama-3.3-70b-versatile", 280, CATALOGUE_WINDOW), "2025", COUNTED,
                     {"context": 131072})
LLAMA_4_SCOUT = Point("lpu-v1", "llama-4-scout", None, "int8", "decode_tok_s_per_user", 750,
                      GROQ_CATALOGUE.format("meta-llama/llama-4-scout-17b-16e-instruct", 750,
                                            CATALOGUE_WINDOW + ", a preview model"), "2025",
                      COUNTED, {"context": 131072})
QWEN3_32B = Point("lpu-v1", "qwen3-32b", None, "int8", "decode_tok_s_per_user", 400,
                  GROQ_CATALOGUE.format("qwen/qwen3-32b", 400, CATALOGUE_WINDOW + ", a preview model"), "2025",
                  COUNTED, {"context": 131072})
# gpt-oss ships its experts in MXFP4; lpu-v1's matrix unit has no 4-bit mode, so they are planned at 8 bits
GPT_OSS = [Point("lpu-v1", f"gpt-oss-{size}", None, "int8", "decode_tok_s_per_user", tok_s,
                 GROQ_CATALOGUE.format(f"openai/gpt-oss-{size}", f"{tok_s:,}", CATALOGUE_WINDOW), "2025", COUNTED,
                 {"context": 131072})
           for size, tok_s in (("20b", 1000), ("120b", 500))]


def _listed(model: str, service_id: str, tok_s: float, context: int, chips: int | None = None) -> Point:
    return Point("lpu-v1", model, chips, "int8", "decode_tok_s_per_user", tok_s,
                 GROQ_PRICES_2024.format(service_id, f"{tok_s:,}"), "2024-08", COUNTED, {"context": context})


LLAMA_3_8B = _listed("llama-3-8b", "Llama3 8b 8192", 1250, 8192)
LLAMA_3_70B = _listed("llama-3-70b", "Llama3 70b 8192", 330, 8192)
LPU_POINTS = [
    FIT_POINT,
    Point("lpu-v1", "llama-2-70b", 576, "int8", "llmperf_decode_tok_s", round(LLMPERF_DECODE_TOK_S, 1),
          GROQ_LLMPERF_DECODE, "2024-01-10", COUNTED, LLMPERF_SETTING),
    Point("lpu-v1", "llama-2-70b", 576, "int8", "decode_tok_s_per_user", 289,
          THEFASTEST.format("llama2-70b-4096", 289), "2024-04-10", COUNTED, {"context": 4096}),
    MIXTRAL_PRESS,
    Point("lpu-v1", "mixtral-8x7b", 576, "int8", "decode_tok_s_per_user", 519,
          THEFASTEST.format("mixtral-8x7b-32768", 519), "2024-04-10", COUNTED, {"context": 32768}),
    _listed("mixtral-8x7b", "Mixtral 8x7b 32768", 575, 32768, chips=576),
    Point("lpu-v1", "llama-2-7b", None, "int8", "decode_tok_s_per_user", 750,
          "Groq: Llama 2 7B at 750 tokens/s with a 2k context (TechPowerUp news, Feb 2024)",
          "2024-02", COUNTED, {"context": 2048}),
    LLAMA_3_8B,
    LLAMA_3_70B,
    _listed("gemma-7b", "Gemma 7b It", 950, 8192),
    _listed("gemma-2-9b", "Gemma2 9b It", 500, 8192),
    LLAMA_31_8B,
    LLAMA_33_70B,
    QWEN3_32B,
    *GPT_OSS,
    LLAMA_4_SCOUT,
]
# Second-hand figures for services above: shown, not counted (the service's own listing or a
# measurement with its method published is the CHECK row)
SECOND_HAND = [dataclasses.replace(check, published=tok_s, source=source, date=date, role=f"ALT: {why}")
               for check, tok_s, source, date, why in (
    (LLAMA_3_8B, 877, "jupyterlab/jupyter-ai issue 739, a user quoting Groq's speeds (no source given) [L]",
     "2024-04-21", "quoted without a source; Groq's Aug 2024 listing is the CHECK row"),
    (LLAMA_3_8B, 1200, "fixie-ai/ai-benchmarks pull request 121, its author's 'gorq : llama 3 8b : 1200 tps' [L]",
     "2024-09-05", "one remark, no data; Groq's Aug 2024 listing is the CHECK row"),
    (LLAMA_3_70B, 280, "jupyterlab/jupyter-ai issue 739, a user quoting Groq's speeds (no source given) [L]",
     "2024-04-21", "quoted without a source; Groq's Aug 2024 listing is the CHECK row"),
    (LLAMA_31_8B, 750, "neuraplus-ai.github.io 'Groq LPU vs GPU latency test results 2026' (50-run average) [L]",
     "2026-04-09", "a blog's measurement; Groq's own listing is the CHECK row"),
    (LLAMA_33_70B, 270, ("neuraplus-ai.github.io 'Groq LPU vs GPU latency test results 2026' [L]; kickllm.com "
                         "lists 330 (Apr 2026)"), "2026-04-09",
     "a blog's measurement; Groq's own listing is the CHECK row"))]
# Each published figure is counted once, at the deployment the table states for it: the published chip
# count, else the compiler's fewest chips. The rows below repeat figures under another deployment, to
# show what that choice moves; they are not counted, whatever their error.
PUBLISHED_SYSTEM_CHIPS = 576
LPU_POINTS += [dataclasses.replace(p, chips=PUBLISHED_SYSTEM_CHIPS,
                                   role="ALT: 576 chips assumed; not counted (held out at the fewest chips)")
               for p in LPU_POINTS if p.chips is None]
LPU_POINTS += SECOND_HAND + [
               dataclasses.replace(MIXTRAL_PRESS, chips=None, chips_published=576,
                                   role="ALT: fewest chips; not counted (Groq's 576 is the held-out row)"),
               Point("lpu-v1", "llama-2-70b", 576, "int8", "llmperf_tok_s_per_request", 185, GROQ_LLMPERF,
                     "2024-01-10", "ALT: includes TTFT over the internet (median 0.22 s), which the chip "
                     "model has no term for; not counted (its generation part is the LLMPerf CHECK row)",
                     LLMPERF_SETTING)]

NVIDIA_DGX = ("NVIDIA technical blog 'Achieving Top Inference Performance with the NVIDIA H100 Tensor Core "
              "GPU and NVIDIA TensorRT-LLM' (DGX H100, FP8, TensorRT-LLM 0.5, batch 1)")
TRT_H200 = ("TensorRT-LLM 0.5 docs/source/blogs/H200launch.md, 'H200 FP8 Max throughput' table (TensorRT-LLM 0.5; "
            "its throughput is per GPU and its TP column the GPU count)")
# Its 'LLaMA 7B' is Llama 2 7B: the 2,048 in + 2,048 out rows need Llama 2's 4,096-token window, and the
# table's next version names the benchmark 'Llama2-7b'. Its A100s are SXM 80 GB (TensorRT-LLM's
# docs/source/blogs/H100vsA100.md, the same v0.5.0 data: "H100 FP8, A100 FP16, SXM 80GB GPUs").
TRT_PERF = ("TensorRT-LLM release/0.5.0 docs/source/performance.md, '{}' table ({}; output tok/s of all GPUs; "
            "its 'LLaMA 7B' is Llama 2 7B)")
TRT_H100 = TRT_PERF.format("High Throughput, H100 GPUs (FP8)", "FP8 weights and KV cache")
TRT_A100 = TRT_PERF.format("High Throughput, A100 GPUs (FP16)", "FP16 weights and KV cache")
TRT_FIRST_TOKEN = ("TensorRT-LLM release/0.5.0 docs/source/performance.md, 'Low Latency, {}' table (1st token "
                   "latency at batch 1, whole ms; its 'LLaMA 7B' is Llama 2 7B)")
TRT_GQA = ("TensorRT-LLM docs/source/blogs/Falcon180B-H200.md, 'Llama-70B on H200 up to 6.7x A100' table "
           "(TensorRT-LLM v0.7a with its new GQA generation kernels, FP8, 1 x H200; batch sizes from its footnote)")
TRT_V1 = ("TensorRT-LLM docs/source/performance/perf-overview.md, 'Throughput Measurements' (TensorRT-LLM 1.0, "
          "PyTorch backend, `trtllm-bench throughput` under unbounded load; NVIDIA's FP8 checkpoints on H100 and "
          "H200, its FP4 (NVFP4) ones on B200, FP8 KV cache; 'Total Output Throughput')")
# trtllm-bench caps the requests it keeps in flight at 4,096 (tensorrt_llm/bench/build/tuning.py, finetune_setting);
# METRICS["max_load_tok_s"] says so
MAX_LOAD_REQUESTS = 4096
GPU_SOFTWARE = "tensorrt-llm-0.5"  # the software of the GPU rows from 2023 but v0.7a's (openlpu.sim.gpu.SOFTWARE)


def _offline(gpu: str, model: str, gpus: int, precision: str, rows, source: str, date: str,
             software: str = GPU_SOFTWARE) -> list[Point]:
    """Held-out offline-throughput rows: (batch, input, output, published output tok/s of all GPUs)."""
    return [Point(gpu, model, gpus, precision, "offline_tok_s", published, source, date, COUNTED,
                  {"batch": b, "input": i, "output": o}, software=software) for b, i, o, published in rows]


def _first_token(gpu: str, precision: str, source: str, rows) -> list[Point]:
    """Held-out first-token latencies: (model, GPUs, input tokens, published ms)."""
    return [Point(gpu, model, gpus, precision, "ttft_s", ms / 1e3, source, "2023-10", COUNTED, {"input": i},
                  software=GPU_SOFTWARE) for model, gpus, i, ms in rows]


def _max_load(gpu: str, model: str, gpus: int, precision: str, rows: dict) -> list[Point]:
    """Rows of TensorRT-LLM 1.0's throughput table, {(input, output): output tok/s of all GPUs}, each held
    out except the MAX_LOAD_FITS."""
    return [Point(gpu, model, gpus, precision, "max_load_tok_s", published, TRT_V1, "2025",
                  MAX_LOAD_FITS.get((model, gpu, gpus, precision, (i, o)), COUNTED),
                  {"input": i, "output": o}, software="tensorrt-llm-1.0") for (i, o), published in rows.items()]


MAX_LOAD_LENGTHS = ((128, 128), (128, 2048), (128, 4096), (500, 2000), (1000, 1000), (1000, 2000), (2048, 128),
                    (2048, 2048), (5000, 500), (20000, 2000))
MAX_LOAD_TABLE = {  # (model, GPU, GPUs, precision) -> output tok/s at each of MAX_LOAD_LENGTHS, in that order
    ("llama-3.1-8b", "h200", 1, "fp8"): (27911, 26221, 18027, 20770, 17744, 16828, 3538, 12194, 3902, 1804),
    ("llama-3.1-8b", "h100-sxm", 1, "fp8"): (28312, 22714, 14325, 17660, 15220, 13899, 3450, 9305, 3459, 1351),
    ("llama-3.3-70b", "h200", 1, "fp8"): (3803, 4336, 2872, 3666, 2909, 2994, 442, 2003, 566, 283),
    ("llama-3.3-70b", "h100-sxm", 2, "fp8"): (6378, 6651, 4199, 5222, 4205, 4146, 762, 3082, 898, 437),
    ("llama-3.1-405b", "h200", 8, "fp8"): (3814, 5348, 4741, 4724, 3330, 3722, 456, 2948, 650, 505),
    ("llama-3.1-405b", "h100-sxm", 8, "fp8"): (3627, 4340, 3116, 3994, 2919, 2895, 453, 2296, 610, 345),
    ("llama-3.3-70b", "b200", 1, "fp4"): (11147, 9922, 6831, 7762, 7007, 6271, 1339, 4783, 1459, 665),
    ("llama-3.1-405b", "b200", 4, "fp4"): (6281, 8020, 6345, 6244, 5209, 4933, 749, 4212, 1048, 672),
    # a mixture of experts (128, 8 per token) on one GPU; the table's MoE rows on 8 GPUs ran with attention
    # data parallelism and expert parallelism (its MoE recipe), which the GPU model does not represent
    ("qwen3-30b-a3b", "b200", 1, "fp4"): (39827, 37844, 24953, 27817, 25828, 22051, 6251, 17554, 6142, 2944),
    # 16 experts, 1 per token, beside a shared expert; its H200 and H100 rows ran on 4 GPUs with the MoE recipe
    ("llama-4-scout", "b200", 1, "fp4"): (25342, 14699, 8932, 11977, 10591, 9356, 3137, 7152, 2937, 1644),
}
# The one B200 row FP4_COMPUTE_EFFICIENCY is fitted on: the most prefill-bound length (2,048 in, 128 out), whose
# time goes to FP4 GEMMs; of the other 39 B200 rows, all but MOE_FIT's are held out
FP4_FIT = ("llama-3.3-70b", "b200", 1, "fp4", (2048, 128))
FP4_FIT_ROLE = "FIT: FP4_COMPUTE_EFFICIENCY"
# The row ALLREDUCE_BANDWIDTH_EFFICIENCY is fitted on: of the rows on 8 GPUs, the one with the most requests in
# flight (4,096), so the largest all-reduces of the table, a quarter of its time; the other 39 rows on several
# GPUs are held out
ALLREDUCE_FIT = ("llama-3.1-405b", "h200", 8, "fp8", (128, 128))
ALLREDUCE_FIT_ROLE = "FIT: ALLREDUCE_BANDWIDTH_EFFICIENCY"
# The row HOST_S_PER_REQUEST is fitted on: a dense model whose steps the GPU model times well, at the length with
# the most requests in flight (4,096) and the shortest steps; the table's other rows are held out
HOST_FIT = ("llama-3.1-8b", "h200", 1, "fp8", (128, 128))
HOST_FIT_ROLE = "FIT: HOST_S_PER_REQUEST"
# The row MOE_S_PER_TOKEN is fitted on: the mixture of experts with the most routed copies per token (8) at its most
# prefill-bound length, where the GPU and not the host sets the pace; Llama 4 Scout's rows and Qwen3's others are
# held out
MOE_FIT = ("qwen3-30b-a3b", "b200", 1, "fp4", (2048, 128))
MOE_FIT_ROLE = "FIT: MOE_S_PER_TOKEN"
MAX_LOAD_FITS = {FP4_FIT: FP4_FIT_ROLE, ALLREDUCE_FIT: ALLREDUCE_FIT_ROLE, HOST_FIT: HOST_FIT_ROLE,
                 MOE_FIT: MOE_FIT_ROLE}
# The host at work, in the same table: GB200 (one Grace CPU per two GPUs) against B200 (an x86 DGX host), output
# tok/s at 128 / 128, where thousands of requests take short steps, and at 128 / 4,096, where long contexts make
# the GPU's steps long: (model, ISL/OSL) -> (B200, GB200), both at FP4 and TP 1 (405B: TP 4); not fitted on, not
# predicted
HOST_EVIDENCE = {("qwen3-30b-a3b", "128/128"): (39827, 24107), ("qwen3-30b-a3b", "128/4096"): (24953, 26337),
                 ("llama-4-scout", "128/128"): (25342, 19954), ("llama-4-scout", "128/4096"): (8932, 9556),
                 ("llama-3.3-70b", "128/128"): (11147, 12189), ("llama-3.3-70b", "128/4096"): (6831, 7849),
                 ("llama-3.1-405b", "128/128"): (6281, 6740), ("llama-3.1-405b", "128/4096"): (6345, 6608)}

GPU_POINTS = [
    Point("h100-sxm", "llama-2-70b", 8, "fp8", "e2e_latency_s", 1.7, NVIDIA_DGX, "2023-12",
          "FIT: KERNEL_OVERHEAD_S", {"input": 2048, "output": 128}, software=GPU_SOFTWARE),
    Point("h200", "llama-2-70b", 1, "fp8", "offline_tok_s", 303, TRT_H200, "2023-11",
          "FIT: COMPUTE_EFFICIENCY", {"batch": 32, "input": 2048, "output": 128}, software=GPU_SOFTWARE),
    *_offline("h200", "llama-2-70b", 1, "fp8", [(64, 2048, 128, 341), (512, 128, 128, 3014)], TRT_H200,
              "2023-11"),
    *_offline("h200", "llama-2-70b", 2, "fp8", [(512, 128, 2048, 2 * 1654)], TRT_H200, "2023-11"),
    *_offline("h200", "llama-2-13b", 1, "fp8", [(1024, 128, 128, 11819), (128, 128, 2048, 4750),
                                                 (64, 2048, 128, 1349)], TRT_H200, "2023-11"),
    *_offline("h100-sxm", "llama-2-70b", 4, "fp8", [(64, 128, 128, 3317), (64, 128, 2048, 2616),
                                                     (64, 2048, 128, 843), (64, 2048, 2048, 1583)],
              TRT_H100, "2023-10"),
    *_offline("h100-sxm", "llama-2-7b", 1, "fp8", [(64, 128, 128, 9193), (64, 128, 2048, 5367),
                                                    (64, 2048, 128, 2058), (32, 2048, 2048, 2230)],
              TRT_H100, "2023-10"),
    *_offline("a100-80gb", "llama-2-7b", 1, "fp16", [(64, 128, 128, 3486), (32, 128, 2048, 1459),
                                                      (32, 2048, 128, 529), (16, 2048, 2048, 592)],
              TRT_A100, "2023-10"),
    *_offline("a100-80gb", "llama-2-70b", 4, "fp16", [(64, 128, 128, 1237), (64, 128, 2048, 1181),
                                                       (64, 2048, 128, 272), (64, 2048, 2048, 738)],
              TRT_A100, "2023-10"),
    *_first_token("h100-sxm", "fp8", TRT_FIRST_TOKEN.format("H100 GPUs (FP8)"),
                  [("llama-2-7b", 1, 128, 7), ("llama-2-7b", 1, 2048, 36),
                   ("llama-2-70b", 4, 128, 26), ("llama-2-70b", 4, 2048, 109)]),
    *_first_token("a100-80gb", "fp16", TRT_FIRST_TOKEN.format("A100 GPUs (FP16)"),
                  [("llama-2-7b", 1, 128, 16), ("llama-2-7b", 1, 2048, 133),
                   ("llama-2-70b", 4, 128, 47), ("llama-2-70b", 4, 2048, 377)]),
    *_offline("h200", "llama-2-70b", 1, "fp8", [(960, 128, 128, 3803), (192, 128, 2048, 2941),
                                                 (96, 128, 4096, 1946)], TRT_GQA, "2023-12", software="gqa-kernels"),
    *(p for (model, gpu, gpus, precision), tok_s in MAX_LOAD_TABLE.items()
      for p in _max_load(gpu, model, gpus, precision, dict(zip(MAX_LOAD_LENGTHS, tok_s)))),
]


# ---- predictions --------------------------------------------------------------------------------
def predict_gpu(p: Point) -> float:
    spec, gpu = load_preset(p.model), load_gpu(p.system)
    s = p.setting
    if p.metric == "e2e_latency_s":
        t = G.gpu_timing(spec, gpu, p.precision, context=s["input"] + s["output"], gpus=p.chips,
                         prompt_tokens=s["input"], software=p.software)
        return t.ttft_s + (s["output"] - 1) * t.decode_step_s
    if p.metric == "ttft_s":
        return G.gpu_timing(spec, gpu, p.precision, context=s["input"], gpus=p.chips, software=p.software).ttft_s
    if p.metric in ("offline_tok_s", "max_load_tok_s"):
        batch = s["batch"] if p.metric == "offline_tok_s" else max_load_requests(p)
        run = G.offline_run_s(spec, gpu, p.precision, p.chips, batch, s["input"], s["output"], p.software)
        return batch * s["output"] / run
    raise ValueError(p.metric)


def max_load_requests(p: Point) -> int:
    """Requests in flight under unbounded load: as many as the HBM the weights leave holds the KV cache of
    input + output tokens for (trtllm-bench sizes its batch so, tensorrt_llm/bench/build/tuning.py), at most
    MAX_LOAD_REQUESTS."""
    t = G.gpu_timing(load_preset(p.model), load_gpu(p.system), p.precision, context=p.setting["input"] +
                     p.setting["output"], gpus=p.chips, software=p.software)
    return min(t.max_users, MAX_LOAD_REQUESTS)


def groq_program(model: str, system, workload, chips: int | None, tp: int | None = None):
    """A Groq row's Program on `chips` in TP groups of `tp` chips or, by default, of the first width in
    the compiler's order of preference (the widest inside a node, then groups spanning nodes) that the
    row's chips arrange at; on the fewest chips, at the width partition counts them at. Groq's 576-chip
    system was reported as pipeline parallel [M]; left to itself, the compiler would also try wider
    groups spanning nodes (compile_program), a deployment the record does not describe
    (free_choice_reading)."""
    from openlpu.compiler import compile_program
    from openlpu.compiler.partition import partition, tp_candidates
    from openlpu.errors import OpenLPUError

    spec = load_preset(model)
    if tp or chips is None:
        return compile_program(spec, system, workload, chips=chips,
                               tp=tp or partition(spec, system, workload).tp)
    for t in tp_candidates(spec, system):
        try:
            return compile_program(spec, system, workload, chips=chips, tp=t)
        except OpenLPUError as e:  # these chips do not arrange in groups of t: the next width
            failure = e
    raise failure


def point_workload(p: Point, context: int, prompt: int, users: int = 1):
    """The Workload a row is modelled at: its precision throughout."""
    return Workload(weights=p.precision, activations=p.precision, kv=p.precision, context_length=context, users=users,
                    prompt_len=prompt)


def lpu_timing(p: Point, system, context: int, prompt: int, tp: int | None = None, users: int = 1):
    from openlpu.compiler import verify_or_raise
    from openlpu.sim.timing import timing

    program = groq_program(p.model, system, point_workload(p, context, prompt, users), p.chips, tp)
    verify_or_raise(program)
    return timing(program)


def predict_lpu(p: Point, system, tp: int | None = None, users: int = 1):
    """The predicted figure and the LpuTiming it was read off (TP `tp`, None: the compiler's choice;
    `users` in flight; an LLMPerf row, its concurrent requests)."""
    s = p.setting
    if p.metric == "decode_tok_s_per_user":
        t = lpu_timing(p, system, s["context"], Workload.default_prompt_len(s["context"]), tp, users)
        return t.tokens_per_s_per_user, t
    if p.metric in ("llmperf_tok_s_per_request", "llmperf_decode_tok_s"):
        t = lpu_timing(p, system, s["context"], s["input"], tp, s["users"])
        if p.metric == "llmperf_decode_tok_s":
            return t.tokens_per_s_per_user, t
        return s["output"] / (t.ttft_s + (s["output"] - 1) / t.tokens_per_s_per_user), t
    raise ValueError(p.metric)


def _point(r: dict) -> Point:
    return Point(**{k: r[k] for k in Point.__dataclass_fields__})


# ---- fits ---------------------------------------------------------------------------------------
def bisect(f, target: float, lo: float, hi: float, rising: bool, steps: int = 40) -> float:
    for _ in range(steps):
        mid = (lo + hi) / 2
        lo, hi = (mid, hi) if (f(mid) < target) == rising else (lo, mid)
    return (lo + hi) / 2


def fit_gpu() -> dict:
    """Jointly fit KERNEL_OVERHEAD_S (on the DGX H100 latency), COMPUTE_EFFICIENCY (on the H200 batch-32
    throughput) and ALLREDUCE_BANDWIDTH_EFFICIENCY (on the ALLREDUCE_FIT row), then FP4_COMPUTE_EFFICIENCY
    (on the FP4_FIT row of B200), HOST_S_PER_REQUEST (on the HOST_FIT row) and MOE_S_PER_TOKEN (on the MOE_FIT
    row) with those; returns the fitted values and restores the shipped constants."""
    names = ("KERNEL_OVERHEAD_S", "COMPUTE_EFFICIENCY", "ALLREDUCE_BANDWIDTH_EFFICIENCY", "FP4_COMPUTE_EFFICIENCY",
             "HOST_S_PER_REQUEST", "MOE_S_PER_TOKEN")
    shipped = {name: getattr(G, name) for name in names}
    latency_point, throughput_point = GPU_POINTS[0], GPU_POINTS[1]
    fp4_point = next(p for p in GPU_POINTS if p.role == FP4_FIT_ROLE)
    allreduce_point = next(p for p in GPU_POINTS if p.role == ALLREDUCE_FIT_ROLE)
    host_point = next(p for p in GPU_POINTS if p.role == HOST_FIT_ROLE)
    moe_point = next(p for p in GPU_POINTS if p.role == MOE_FIT_ROLE)
    try:
        for _ in range(4):
            G.KERNEL_OVERHEAD_S = bisect(lambda k: _with(G, "KERNEL_OVERHEAD_S", k, latency_point),
                                         latency_point.published, 0.0, 30e-6, rising=True)
            G.COMPUTE_EFFICIENCY = bisect(lambda c: _with(G, "COMPUTE_EFFICIENCY", c, throughput_point),
                                          throughput_point.published, 0.05, 1.0, rising=True)
            G.ALLREDUCE_BANDWIDTH_EFFICIENCY = bisect(
                lambda e: _with(G, "ALLREDUCE_BANDWIDTH_EFFICIENCY", e, allreduce_point),
                allreduce_point.published, 0.05, 1.0, rising=True)
        G.FP4_COMPUTE_EFFICIENCY = bisect(lambda c: _with(G, "FP4_COMPUTE_EFFICIENCY", c, fp4_point),
                                          fp4_point.published, 0.05, 1.0, rising=True)
        G.HOST_S_PER_REQUEST = bisect(lambda h: _with(G, "HOST_S_PER_REQUEST", h, host_point),
                                      host_point.published, 0.0, 200e-6, rising=False)
        G.MOE_S_PER_TOKEN = bisect(lambda m: _with(G, "MOE_S_PER_TOKEN", m, moe_point),
                                   moe_point.published, 0.0, 2e-6, rising=False)
        return {name: getattr(G, name) for name in names}
    finally:
        for name, value in shipped.items():
            setattr(G, name, value)


def _with(module, name: str, value: float, p: Point) -> float:
    setattr(module, name, value)
    return predict_gpu(p)


def _predict_at_kv_reads(p: Point, reads: float) -> float:
    shipped = G.kv_reads_per_kv_head
    G.kv_reads_per_kv_head = lambda spec, software: reads
    try:
        return predict_gpu(p)
    finally:
        G.kv_reads_per_kv_head = shipped


def gpu_readings(gpu_rows) -> dict:
    """What the GPU rows outside the target would need, each found alone (a reading, never used to
    predict): for decode-heavy rows of a grouped-query model (output >= 2,048 tokens), how many times
    decode attention would have to read each KV head (1: once per group; Llama-2-70B's query heads per
    KV head: once per query head); for the first-token rows, the compute efficiency; for the rows on several
    GPUs, allreduce_readings."""
    checks = [r for r in gpu_rows if r["role"] == COUNTED]
    shipped = G.COMPUTE_EFFICIENCY
    kv_reads, efficiency = [], []
    for r in checks:
        p = _point(r)
        spec = load_preset(p.model)
        if p.metric == "offline_tok_s" and p.setting["output"] >= 2048 and spec.n_kv_heads < spec.n_heads:
            kv_reads.append({**r, "implied": bisect(lambda k, p=p: _predict_at_kv_reads(p, k), p.published,
                                                    0.25, 4.0 * spec.n_heads // spec.n_kv_heads, rising=False)})
        if p.metric == "ttft_s":
            try:
                implied = bisect(lambda c, p=p: _with(G, "COMPUTE_EFFICIENCY", c, p), p.published, 0.02, 1.5,
                                 rising=False)
            finally:
                G.COMPUTE_EFFICIENCY = shipped
            efficiency.append({**r, "implied": implied})
    return {"kv_reads": kv_reads, "compute_efficiency": efficiency, "allreduce": allreduce_readings(gpu_rows),
            "host": host_readings(gpu_rows), "moe": moe_readings(gpu_rows)}


def moe_readings(gpu_rows) -> list[dict]:
    """For each row of a mixture of experts: the share of the predicted run its MoE dispatch takes, and the
    MOE_S_PER_TOKEN it alone would need (a reading, never used to predict; None where the row is predicted
    slower than published without any)."""
    shipped = G.MOE_S_PER_TOKEN
    out = []
    try:
        for r in gpu_rows:
            p = _point(r)
            if not load_preset(p.model).is_moe:
                continue
            roofline = _with(G, "MOE_S_PER_TOKEN", 0.0, p)
            implied = bisect(lambda m, p=p: _with(G, "MOE_S_PER_TOKEN", m, p), p.published, 0.0, 2e-6,
                             rising=False, steps=24) if roofline > p.published else None
            out.append({**r, "share": 1 - r["predicted"] / roofline, "implied": implied})
    finally:
        G.MOE_S_PER_TOKEN = shipped
    return out


def host_readings(gpu_rows) -> list[dict]:
    """The held-out rows of TensorRT-LLM 1.0's table whose decode steps the host loop paces (HOST_S_PER_REQUEST
    x requests in flight outlasts the GPU's step), each with its prediction were the GPU alone to set the pace
    (the `gqa-kernels` software row): a reading of what the host term changes."""
    out = []
    for r in gpu_rows:
        if r["metric"] != "max_load_tok_s" or r["role"] != COUNTED:
            continue
        p = _point(r)
        requests = max_load_requests(p)
        _, gpu_step = G.offline_steps_s(load_preset(p.model), load_gpu(p.system), p.precision, p.chips, requests,
                                        p.setting["input"], p.setting["output"], p.software)
        if requests * G.HOST_S_PER_REQUEST > gpu_step:
            gpu_alone = predict_gpu(dataclasses.replace(p, software="gqa-kernels"))
            out.append({**r, "requests": requests, "gpu_alone_error": gpu_alone / r["published"] - 1})
    return out


def allreduce_readings(gpu_rows) -> list[dict]:
    """For each row of TensorRT-LLM 1.0's table on several GPUs: the share of the predicted run its
    all-reduces take at NVLink's full rate, and the ALLREDUCE_BANDWIDTH_EFFICIENCY it alone would need (a
    reading, never used to predict; None where no efficiency up to 5 reaches it)."""
    shipped = G.ALLREDUCE_BANDWIDTH_EFFICIENCY
    out = []
    try:
        for r in gpu_rows:
            if r["metric"] != "max_load_tok_s" or r["chips"] < 2:
                continue
            p = _point(r)
            unbounded = _with(G, "ALLREDUCE_BANDWIDTH_EFFICIENCY", math.inf, p)
            share = 1 - _with(G, "ALLREDUCE_BANDWIDTH_EFFICIENCY", 1.0, p) / unbounded
            reachable = _with(G, "ALLREDUCE_BANDWIDTH_EFFICIENCY", 5.0, p) > p.published
            implied = bisect(lambda e, p=p: _with(G, "ALLREDUCE_BANDWIDTH_EFFICIENCY", e, p), p.published,
                             0.05, 5.0, rising=True, steps=16) if reachable else None
            out.append({**r, "share": share, "implied": implied})
    finally:
        G.ALLREDUCE_BANDWIDTH_EFFICIENCY = shipped
    return out


def with_install_rate(system, bytes_per_cycle: float):
    return dataclasses.replace(system, chip=dataclasses.replace(system.chip, matrix_install_bytes_per_cycle=bytes_per_cycle))


def fit_lpu_install(system) -> float:
    """The matrix unit's weight-install rate (bytes/cycle per chip) that reproduces the FIT point."""
    return bisect(lambda r: predict_lpu(FIT_POINT, with_install_rate(system, r))[0], FIT_POINT.published,
                  100.0, system.chip.sram_bytes_per_cycle, rising=True, steps=30)


def fp16_activation_sensitivity(system) -> dict:
    """The FIT point again with FP16 activations and KV (8-bit weights): what the precision choice moves."""
    from openlpu.sim.timing import timing

    p = FIT_POINT
    workload = Workload(weights="int8", activations="fp16", kv="fp16", context_length=p.setting["context"],
                        prompt_len=512)
    t = timing(groq_program(p.model, system, workload, p.chips))
    return {"tok_s_per_user": t.tokens_per_s_per_user, "stages": t.stages, "tp": t.tp}


def lpu_decomposition(system) -> dict:
    """Where one Llama-2-70B decode step goes at the FIT point: ops by kind and transfers by kind, in
    seconds summed along the step (they are sequential for one user)."""
    workload = Workload(context_length=FIT_POINT.setting["context"], prompt_len=512)
    program = groq_program(FIT_POINT.model, system, workload, FIT_POINT.chips)
    clock, out = system.chip.clock_hz, {}
    for op in program.decode.ops:
        out[op.kind] = out.get(op.kind, 0.0) + (op.end_cycle - op.start_cycle) / clock
    for tr in program.decode.transfers:
        out[tr.kind] = out.get(tr.kind, 0.0) + (tr.arrival_cycle - tr.start_cycle) / clock
    return {"makespan_s": program.decode.makespan_cycles / clock, "stages": len(program.placement.stages),
            "tp": program.placement.tp, "by_kind_s": dict(sorted(out.items(), key=lambda kv: -kv[1]))}


def free_choice_reading(system) -> dict:
    """The FIT row compiled in the compiler's own choice of TP width on its chips, and the install rate at
    which that choice would reproduce the published figure (reproducing_rate; the compiler chooses again
    at each rate)."""
    from openlpu.compiler import compile_program
    from openlpu.sim.timing import timing

    p = FIT_POINT
    spec, workload = load_preset(p.model), point_workload(p, p.setting["context"], 512)

    def tok_s(rated) -> float:
        return timing(compile_program(spec, rated, workload, chips=p.chips)).tokens_per_s_per_user

    t = timing(compile_program(spec, system, workload, chips=p.chips))
    rate, _ = reproducing_rate(tok_s, p.published, system, t.tokens_per_s_per_user)
    return {"chips": t.chips, "stages": t.stages, "tp": t.tp, "tok_s": t.tokens_per_s_per_user, "implied_rate": rate}


def mixtral_cut(system) -> dict:
    """Mixtral on Groq's 576 chips: the placement, and the step if its stages ran one after another."""
    from openlpu.compiler.schedule import stage_occupancy_cycles
    from openlpu.sim.timing import timing

    p = MIXTRAL_PRESS
    program = groq_program(p.model, system, Workload(context_length=p.setting["context"], prompt_len=512), p.chips)
    chained = sum(stage_occupancy_cycles(program.decode).values()) / system.chip.clock_hz
    return {"stages": len(program.placement.stages), "tp": program.placement.tp,
            "mlp_parts": sum(piece[1] == "ffn" for s in program.placement.stages for piece in s.pieces)
            / load_preset(p.model).n_layers,
            "tok_s": timing(program).tokens_per_s_per_user, "chained_tok_s": 1 / chained}


SCOUT_SPREAD = (1, 2, 4)  # Llama 4 Scout read at these multiples of its fewest chips


def scout_spread(system) -> list[dict]:
    """Llama 4 Scout on multiples of its fewest chips: its MLPs cut into more parts, which run side by side; in
    TP groups inside a node, as every row is modelled, and as the compiler places it left to itself (groups
    spanning nodes where they decode faster: a deployment the record does not describe)."""
    from openlpu.compiler import compile_program
    from openlpu.sim.timing import timing

    p, out = LLAMA_4_SCOUT, []
    workload = point_workload(p, p.setting["context"], Workload.default_prompt_len(p.setting["context"]))
    for k in SCOUT_SPREAD:  # first at the held-out row's own placement (k = 1), then on k times its chips
        tok_s, t = predict_lpu(dataclasses.replace(p, chips=k * out[0]["chips"] if out else None), system)
        free = timing(compile_program(load_preset(p.model), system, workload, chips=t.chips))
        idle = f" on {free.chips:,}" if free.chips < t.chips else ""
        out.append({"chips": t.chips, "layout": f"{t.stages} x TP {t.tp}", "tok_s": tok_s,
                    "free_layout": f"{free.stages} x TP {free.tp}{idle}", "free_tok_s": free.tokens_per_s_per_user})
    return out


SHORT_REQUEST = 1024  # tokens a short request's decode steps attend: a bucket LLMPerf's 550-in / 150-out requests fit


def short_request_reading(lpu_rows, system) -> list[dict]:
    """Each row held out at the fewest chips whose window is longer than SHORT_REQUEST, compiled as before (every
    user's whole window held in SRAM) but with decode steps attending SHORT_REQUEST tokens: the speed of a request
    that short, on a deployment keeping a Program per length it serves (Workload.decode_context)."""
    from openlpu.sim.timing import timing

    out = []
    for r in lpu_rows:
        context = r["setting"]["context"]
        if r["role"] != COUNTED or r["chips"] is not None or context <= SHORT_REQUEST:
            continue
        p = _point(r)
        workload = dataclasses.replace(point_workload(p, context, Workload.default_prompt_len(context)),
                                       decode_context=SHORT_REQUEST)
        t = timing(groq_program(p.model, system, workload, p.chips))
        out.append({"model": r["model"], "context": context, "published": r["published"], "chips": t.chips,
                    "whole_window": r["predicted"], "predicted": t.tokens_per_s_per_user,
                    "error": t.tokens_per_s_per_user / r["published"] - 1})
    return out


# Groq's speculative-decoding endpoint: a reading, not a counted row (its draft, drafts per round,
# acceptance and chips are not published)
SPECDEC = {"model": "llama-3.1-70b", "context": 8192, "published": 1665, "plain_published": 250,
           "source": "Groq's announcement of 'llama-3.1-70b-specdec' on GroqCloud (250 -> 1,660 T/s on its 14nm LPU; "
                     "Artificial Analysis measured 1,665 output tok/s), as reported by The AI Observer "
                     "(theaiobserver.com/?p=321); 8,192-token window (colinmcnamara.com, 'speculative decoding') [M]",
           "date": "2024-10"}
SPECDEC_DRAFTS = ("llama-3.2-1b", "llama-3.1-8b")  # Llama 3.1's tokenizer; Groq did not name its draft
SPECDEC_TOKENS = (2, 4, 8, 16)


def speculative_reading() -> dict:
    """The acceptance rate Groq's published speculative speed needs under this model, per candidate draft
    and drafts per round, at the fewest chips and the shipped constants (`openlpu plan --draft`): a round's
    period does not depend on the acceptance, so the tokens per round it needs follow from the speed at
    acceptance 1; above k + 1 it is out of reach."""
    from openlpu.sim.plan import plan
    from openlpu.sim.speculative import expected_tokens

    s = SPECDEC
    plain, = plan(s["model"], compare=(), context=s["context"])
    out = []
    for draft in SPECDEC_DRAFTS:
        for k in SPECDEC_TOKENS:
            row, = plan(s["model"], compare=(), context=s["context"], draft=draft, draft_tokens=k, acceptance=1.0)
            needed = s["published"] / row.tokens_per_s_per_user * (k + 1)  # tokens per round
            acceptance = None if needed > k + 1 else bisect(lambda a, k=k: expected_tokens(k, a), needed, 0.0, 1.0,
                                                            rising=True)
            out.append({"draft": draft, "draft_tokens": k, "chips": row.chips,
                        "at_full_acceptance": row.tokens_per_s_per_user, "tokens_per_round_needed": needed,
                        "acceptance_needed": acceptance})
    return {**s, "plain_predicted": plain.tokens_per_s_per_user, "plain_chips": plain.chips, "rows": out}


WIDTHS = (8, 4, 2)  # TP widths inside a node that the held-out readings compile at
LOADED_USERS = 32  # a loaded pipeline for the held-out readings (GroqCloud's load is not published)


def fewest_chip_readings(lpu_rows, system) -> list[dict]:
    """For each held-out row at the compiler's fewest chips: the chips and the prediction at each TP
    width of WIDTHS (each compiled at its own fewest chips; None where a piece fits no chip at that
    width), the width whose prediction is nearest the published figure (None if none fits), and the
    prediction with LOADED_USERS users in flight (placed with their KV)."""
    from openlpu.errors import OpenLPUError

    out = []
    for r in lpu_rows:
        if r["role"] != COUNTED or r["chips"] is not None:
            continue
        point = _point(r)
        by_tp = {}
        for t in WIDTHS:
            try:
                predicted, timed = predict_lpu(point, system, t)
            except OpenLPUError as e:
                if "does not fit on any" not in str(e):
                    raise
                by_tp[t] = None
                continue
            by_tp[t] = {"chips": timed.chips, "predicted": predicted, "error": predicted / r["published"] - 1}
        fitting = [t for t in WIDTHS if by_tp[t]]
        nearest = min(fitting, key=lambda t: abs(math.log(by_tp[t]["predicted"] / r["published"])), default=None)
        loaded, timed = predict_lpu(point, system, users=LOADED_USERS)
        lpu = r["lpu"]
        half = None  # placed across nodes: the placement at half the compiler's width
        if lpu["tp"] > max(WIDTHS):
            predicted, timed_half = predict_lpu(point, system, lpu["tp"] // 2)
            half = {"tp": timed_half.tp, "chips": timed_half.chips, "predicted": predicted}
        out.append({"model": r["model"], "context": r["setting"]["context"], "published": r["published"],
                    "predicted": r["predicted"], "stages": lpu["stages"], "tp": lpu["tp"], "by_tp": by_tp,
                    "nearest_tp": nearest, "loaded": {"chips": timed.chips, "micro_batch": timed.micro_batch,
                                                      "predicted": loaded}, "half_width": half})
    return out


def reproducing_rate(predict, published: float, system, predicted: float, steps: int = 6) -> tuple[float, float]:
    """The install rate at which `predict` (a figure from a system) gives `published`, starting from
    `system`, where it gives `predicted`, and the figure there. Decode is install-bound, so the
    prediction is nearly proportional to the rate and rate x published / predicted converges in a few
    compiles."""
    rate = system.chip.matrix_install_bytes_per_cycle
    for _ in range(steps):
        if abs(predicted / published - 1) < 0.002:
            break
        rate *= published / predicted
        predicted = predict(with_install_rate(system, rate))
    return rate, predicted


def implied_install_rates(lpu_rows, system) -> list[dict]:
    """For the FIT row and each held-out row: the install rate at which the model reproduces the row's
    published figure, its placement and every other constant unchanged (reproducing_rate). A reading of
    how far apart the published points are, never used to predict."""
    out = []
    for r in lpu_rows:
        if r["role"] != COUNTED and not r["role"].startswith("FIT"):
            continue
        rate, predicted = reproducing_rate(lambda rated, r=r: predict_lpu(_point(r), rated)[0], r["published"], system,
                                           r["predicted"])
        out.append({"model": r["model"], "metric": r["metric"], "date": r["date"], "role": r["role"],
                    "published": r["published"], "predicted": r["predicted"], "implied": rate,
                    "implied_error": predicted / r["published"] - 1})
    return out


def best_single_rate(implied: list[dict], lpu_rows, system) -> dict:
    """The one install rate that brings the most held-out rows within the target, chosen on those rows
    themselves (which the target forbids): a bound on what calibrating this constant could reach. A row
    is within the target for rates within (1 -/+ TARGET_ERROR) x its implied rate (the prediction is
    about proportional to the rate); the count reported is from compiling every held-out row at it."""
    checks = [i for i in implied if i["role"] == COUNTED]
    spans = [((1 - TARGET_ERROR) * i["implied"], (1 + TARGET_ERROR) * i["implied"]) for i in checks]
    covered = max(([s for s in spans if s[0] <= lo <= s[1]] for lo, _ in spans), key=len)
    rate = math.sqrt(max(lo for lo, _ in covered) * min(hi for _, hi in covered))
    rated = with_install_rate(system, rate)
    errors = [predict_lpu(_point(r), rated)[0] / r["published"] - 1 for r in lpu_rows if r["role"] == COUNTED]
    return {"rate": rate, "sharing_a_window": len(covered), "within": sum(abs(e) <= TARGET_ERROR for e in errors),
            "of": len(errors), "errors": errors}


def step_work(model: str, context: int) -> dict:
    """What one user's decode step must get through at one byte per element: weight bytes, layers, and
    the K/V bytes it attends (each layer's slots: the context, or its sliding window)."""
    from openlpu.compiler.partition import kv_slots

    spec = load_preset(model)
    return {"weight_bytes": spec.param_count(), "layers": spec.n_layers,
            "kv_bytes": sum(2 * spec.kv_dim * kv_slots(spec, context, i) for i in range(spec.n_layers))}


def contradictory_pairs(lpu_rows) -> list[dict]:
    """Held-out decode rows (a, b) where b's step has at least a's weight bytes, layers and K/V bytes, at
    the same precision, yet b was published more than (1 + TARGET_ERROR) / (1 - TARGET_ERROR) times as
    fast: a model that never predicts such a step faster cannot put both within the target."""
    sides = [{k: r[k] for k in ("model", "date", "precision", "published", "predicted")}
             | step_work(r["model"], r["setting"]["context"])
             for r in lpu_rows if r["role"] == COUNTED and r["metric"] == "decode_tok_s_per_user"]
    work = ("weight_bytes", "layers", "kv_bytes")
    return [{"slower": a, "faster": b} for a in sides for b in sides
            if a["precision"] == b["precision"] and all(b[k] >= a[k] for k in work)
            and b["published"] > a["published"] * (1 + TARGET_ERROR) / (1 - TARGET_ERROR)]


def per_layer_reading(lpu_rows) -> dict:
    """The FIT and held-out generation speeds read as time per layer, 1 / (tok/s x layers), published and
    predicted; and a model with no chip in it, every layer of every model taking the FIT row's time: how
    many held-out rows it puts within the target. A reading, never used to predict."""
    speeds = [r for r in lpu_rows if (r["role"] == COUNTED or r["role"].startswith("FIT"))
              and r["metric"] in ("decode_tok_s_per_user", "llmperf_decode_tok_s")]
    specs = {model: load_preset(model) for model in {r["model"] for r in speeds}}
    layers = {model: spec.n_layers for model, spec in specs.items()}
    readings = [{"model": r["model"], "date": r["date"], "role": r["role"], "layers": layers[r["model"]],
                 "params": specs[r["model"]].param_count(),
                 "published_us": 1e6 / (r["published"] * layers[r["model"]]),
                 "predicted_us": 1e6 / (r["predicted"] * layers[r["model"]])} for r in speeds]
    fit_us = next(r["published_us"] for r in readings if r["role"].startswith("FIT"))
    # at fit_us per layer a row is predicted 1e6 / (fit_us x layers) tok/s: its error is published_us / fit_us - 1
    errors = [r["published_us"] / fit_us - 1 for r in readings if r["role"] == COUNTED]
    return {"rows": readings, "fit_us_per_layer": fit_us, "errors": errors,
            "within": sum(abs(e) <= TARGET_ERROR for e in errors), "of": len(errors)}


# ---- report -------------------------------------------------------------------------------------
def rows(points, predict) -> list[dict]:
    out = []
    for p in points:
        predicted, t = predict(p)
        lpu = t and {k: getattr(t, k) for k in ("stages", "tp", "stage_occupancy_s")}
        out.append({**dataclasses.asdict(p), "chips_modelled": t.chips if t else p.chips, "lpu": lpu,
                    "predicted": predicted, "error": predicted / p.published - 1})
    return out


def speculative_markdown(r: dict) -> str:
    """The speculative reading as a table of the acceptance needed, per draft and drafts per round."""
    head = "| draft (chips with the target) | " + " | ".join(f"k = {k}" for k in SPECDEC_TOKENS) + " |"
    lines = [head, "|---" * (len(SPECDEC_TOKENS) + 1) + "|"]
    for draft in SPECDEC_DRAFTS:
        cells = [x for x in r["rows"] if x["draft"] == draft]
        lines.append(f"| {draft} ({cells[0]['chips']}) | " + " | ".join(
            f"{x['acceptance_needed']:.2f}" if x["acceptance_needed"] is not None
            else f"out of reach ({x['at_full_acceptance']:,.0f} at 1)" for x in cells) + " |")
    best = min((x for x in r["rows"] if x["acceptance_needed"] is not None), key=lambda x: x["acceptance_needed"],
               default=None)
    lowest = (f"The lowest acceptance that reaches it is {best['acceptance_needed']:.2f} per token, with {best['draft']} "
              f"proposing {best['draft_tokens']} tokens a round." if best else "No candidate reaches it.")
    never = [d for d in SPECDEC_DRAFTS if all(x["acceptance_needed"] is None for x in r["rows"] if x["draft"] == d)]
    if never:
        lowest += f" With {' or '.join(never)} as the draft no acceptance reaches it: its own steps take too long."
    return f"""## Speculative decoding (a reading, not counted)

{r["source"]}, {r["date"]}: {r["published"]:,} tok/s per user for {r["model"]} (plain endpoint: {r["plain_published"]}).
Groq published neither the draft model, the drafts per round, the acceptance rate nor the chips, so
this is not a check. The model gives the plain endpoint {r["plain_predicted"]:,.0f} tok/s at its fewest
chips ({r["plain_chips"]}; {r["plain_predicted"] / r["plain_published"] - 1:+.0%} against {r["plain_published"]}).
With a draft on chips of its own (`openlpu plan --draft`), the acceptance rate each draft token would
need for {r["published"]:,} tok/s, at the fewest chips and {r["context"]:,} tokens:

{chr(10).join(lines)}

A verifying step of k + 1 tokens costs more than a one-token step only in vectors and link bytes (the
weights and the cached K and V are installed once), so longer rounds reach further. {lowest}
"""


def markdown(lpu_rows, gpu_rows, gpu_fit, install_fit, shipped_install, system, decomposition, fp16, mixtral, scout,
             fewest, implied, best, pairs, per_layer, specdec, gpu_read, free, short) -> str:
    def table(rs):
        lines = [("| system | model | chips (published / modelled) | metric | published | predicted | error | "
                  "role | source, date |"), "|---|---|---|---|---|---|---|---|---|"]
        for r in rs:
            published = r["chips_published"] or (
                "not published" if r["chips"] is None or "assumed" in r["role"] else r["chips"])
            placement = f" ({r['lpu']['stages']} x TP {r['lpu']['tp']})" if r["lpu"] else ""
            chips = f"{published} / {r['chips_modelled']}{placement}"
            flag = " **(>15%)**" if abs(r["error"]) > TARGET_ERROR and r["role"] == COUNTED else ""
            lines.append(f"| {r['system']} | {r['model']} ({r['precision']}) | {chips} | {r['metric']} "
                         f"{_setting(r['setting'])} | {r['published']:,} | {r['predicted']:,.3g} | "
                         f"{r['error']:+.0%}{flag} | {r['role']} | {r['source']}, {r['date']} |")
        return "\n".join(lines)

    def count(rs):
        checks = [r for r in rs if r["role"] == COUNTED]
        return f"{sum(abs(r['error']) <= TARGET_ERROR for r in checks)} of {len(checks)}"

    def gpu_count(rs):
        return f"{count(rs)} within {TARGET_ERROR:.0%}"

    def efficiencies(rs, prompt):
        return ", ".join(f"{r['implied']:.2f} ({r['model']}, {r['system']})" for r in rs
                         if r["setting"]["input"] == prompt)

    def kv_range(rs):
        return f"{min(r['implied'] for r in rs):.1f}-{max(r['implied'] for r in rs):.1f}"

    def row(rs, model, role_start, **setting):
        return next(r for r in rs if r["model"] == model and r["role"].startswith(role_start)
                    and all(r["setting"].get(k) == v for k, v in setting.items()))

    clock = system.chip.clock_hz
    hops = ", ".join(f"{k} {v.latency_s * 1e9:.0f} ns" for k, v in system.links.items())
    spanning = ", ".join(sorted({f"{r['model']} (TP {r['lpu']['tp']}, read below)" for r in lpu_rows
                                 if r["role"] == COUNTED and r["lpu"]["tp"] > system.node.chips})) or "none"
    bound = MXM_PLANES * VECTOR_BYTES
    free_side = ("below", ": Groq did not run it so") if free["implied_rate"] < bound else ("above", "")
    steps = ", ".join(f"{k} {v * 1e6:,.0f} us" for k, v in decomposition["by_kind_s"].items() if v >= 1e-6)
    mix_fewest = row(lpu_rows, "mixtral-8x7b", "ALT")
    scout_published = LLAMA_4_SCOUT.published
    mixtral_checks = [r for r in lpu_rows if r["model"] == "mixtral-8x7b" and r["role"] == COUNTED]
    l70_measured = next(r for r in lpu_rows if r["model"] == "llama-2-70b" and r["role"] == COUNTED
                        and r["metric"] == "decode_tok_s_per_user")
    def at_widths(f, key, fmt):
        return " / ".join(format(w[key], fmt) if w else "none fits" for w in f["by_tp"].values())

    def nearest(f):
        t = f["nearest_tp"]
        return f"TP {t} ({f['by_tp'][t]['error']:+.0%})" if t else "none fits"

    widths = " / ".join(map(str, WIDTHS))
    fewest_table = "\n".join(
        [(f"| model (window) | chips at TP {widths} | predicted at TP {widths} | compiler's placement | listed "
          f"| nearest width (its error) | with {LOADED_USERS} users in flight: chips, predicted |"),
         "|---|---|---|---|---|---|---|"]
        + [f"| {f['model']} ({f['context']:,}) | {at_widths(f, 'chips', 'd')} | {at_widths(f, 'predicted', ',.0f')} "
           f"| {f['stages']} x TP {f['tp']} | {f['published']:,} | {nearest(f)} | {f['loaded']['chips']:,}, "
           f"{f['loaded']['predicted']:,.0f} |" for f in fewest])
    # partition spans nodes only when no width inside a node places the MLPs cut by rows; --tp inside a
    # node then cuts them by expert rows (mlp_cuts in openlpu/compiler/partition.py)
    wide_only = [f for f in fewest if f["tp"] > max(WIDTHS)]
    small = [f for f in fewest if f not in wide_only and f["nearest_tp"] and f["nearest_tp"] < f["tp"]]
    big = [f for f in fewest if f["nearest_tp"] == f["tp"]]
    within = [f for f in small if abs(f["by_tp"][f["nearest_tp"]]["error"]) <= TARGET_ERROR]
    within_by_tp = {t: sum(bool(f["by_tp"][t]) and abs(f["by_tp"][t]["error"]) <= TARGET_ERROR for f in small)
                    for t in WIDTHS}
    load_change = [f["loaded"]["predicted"] / f["predicted"] - 1 for f in small]
    loaded_within = sum(abs(f["loaded"]["predicted"] / f["published"] - 1) <= TARGET_ERROR for f in small)
    # how far apart the widths' chip counts are, for the models nearest at a narrower width
    width_spread = max(max(w["chips"] for w in f["by_tp"].values() if w) /
                       min(w["chips"] for w in f["by_tp"].values() if w) for f in small) - 1
    wide_only_text = "".join(
        f" {f['model']} ({f['context']:,}): cut by d_ff rows, no width inside a node holds one layer's MLP (at TP"
        f" {max(WIDTHS)}, {_layer_mlp_bytes(f['model']) / max(WIDTHS) / 1e6:,.0f} MB of int8 experts per chip, and too"
        f" few rows per chip to cut it between stages), so the placement spans nodes at TP {f['tp']} ({f['stages']}"
        f" stages), installing every expert of every layer at each step, as a static schedule must:"
        f" {f['predicted']:,.0f} tok/s, {f['predicted'] / f['published'] - 1:+.0%} from the listing. At TP"
        f" {f['half_width']['tp']} ({f['half_width']['chips']:,} chips) it predicts"
        f" {f['half_width']['predicted']:,.0f} ({f['half_width']['predicted'] / f['published'] - 1:+.0%}). Inside a"
        f" node only MLPs cut by expert rows fit (expert parallelism; the widths of the table above:"
        f" {_errors_at_widths(f)}); the compiler prefers rows, which give each chip the same share of a"
        f" layer's work whatever the routing. The listing lies between these placements, and the public record"
        f" does not say how Groq places it." for f in wide_only)
    by_model = {f["model"]: f for f in fewest}
    same_shape_pairs = "; ".join(
        f"{a} / {b} listed {by_model[a]['published']:,} / {by_model[b]['published']:,} tok/s "
        f"({by_model[a]['published'] / by_model[b]['published']:.1f}x), predicted {by_model[a]['predicted']:,.0f} / "
        f"{by_model[b]['predicted']:,.0f} ({by_model[a]['predicted'] / by_model[b]['predicted']:.1f}x)"
        for a, b in (("llama-3-8b", "llama-3.1-8b"), ("llama-3-70b", "llama-3.3-70b")))
    small_models = {f["model"] for f in small}
    short_text = "; ".join(f"{r['model']} ({r['context']:,}-token window, {r['chips']:,} chips) {r['predicted']:,.0f} "
                           f"tok/s, {r['error']:+.0%} (whole window {r['whole_window']:,.0f})" for r in short)
    spread_576 = [r["predicted"] / r["published"] for r in lpu_rows
                  if "576 chips assumed" in r["role"] and r["model"] in small_models]
    implied_table = "\n".join(
        ["| row | published | predicted | implied install rate, B/cycle | / fitted |", "|---|---|---|---|---|"]
        + [f"| {i['model']} ({i['date']}{', LLMPerf' if i['metric'].startswith('llmperf') else ''}"
           f"{', FIT' if i['role'] != COUNTED else ''}) | {i['published']:,} | {i['predicted']:,.0f} "
           f"| {i['implied']:,.0f} | {i['implied'] / install_fit:.2f} |" for i in implied])
    held_out = [i for i in implied if i["role"] == COUNTED]
    slowest, fastest = (min(held_out, key=lambda i: i["implied"]), max(held_out, key=lambda i: i["implied"]))
    below_bound = [i for i in held_out if i["implied"] < MXM_PLANES * VECTOR_BYTES]

    def work(w):
        return (f"{w['model']} ({w['date']}: {w['weight_bytes'] / 1e9:.2f} GB of int8 weights, {w['layers']} layers, "
                f"{w['kv_bytes'] / 1e6:,.0f} MB of K/V per step) listed at {w['published']:,}")
    pair_lines = "; ".join(
        f"{work(p['slower'])}, and {work(p['faster'])}: both within {TARGET_ERROR:.0%} would need the second "
        f"predicted at least {(1 - TARGET_ERROR) / (1 + TARGET_ERROR) * p['faster']['published'] / p['slower']['published']:.2f}x"
        f" as fast as the first (OpenLPU predicts {p['slower']['predicted']:,.0f} and {p['faster']['predicted']:,.0f})"
        for p in pairs)
    monotone = ("No model of the chip alone meets the target on every held-out row if it never predicts a step "
                "faster when the step has at least as many weight bytes, layers and K/V bytes to get through (one "
                f"user, the same precision and deployment rule): {pair_lines}. What separates such a pair is the "
                "deployment or the software behind each listing, which the public record does not give."
                if pairs else "No two held-out rows contradict a model in which a step with at least as many "
                "weight bytes, layers and K/V bytes is never faster.")
    us_span = {k: (min(r[k] for r in per_layer["rows"]), max(r[k] for r in per_layer["rows"]))
               for k in ("published_us", "predicted_us")}
    per_layer_line = (
        "Read as time per layer, 1 / (tok/s x layers), the published speeds lie closer together than the "
        f"model's: {us_span['published_us'][0]:.0f} to {us_span['published_us'][1]:.0f} us per layer, against "
        f"{us_span['predicted_us'][0]:.0f} to {us_span['predicted_us'][1]:.0f} us predicted, for models of "
        f"{min(r['layers'] for r in per_layer['rows'])} to {max(r['layers'] for r in per_layer['rows'])} layers "
        f"and {min(r['params'] for r in per_layer['rows']) / 1e9:.0f}B to "
        f"{max(r['params'] for r in per_layer['rows']) / 1e9:.0f}B parameters. A model with no chip in it, every layer of every model taking the FIT row's "
        f"{per_layer['fit_us_per_layer']:.1f} us, puts {per_layer['within']} of {per_layer['of']} held-out rows "
        f"within {TARGET_ERROR:.0%} (OpenLPU: {count(lpu_rows)}). Install-bound decode gives that pattern where "
        "the chips working on a layer at once grow with its weight bytes, while at the fewest chips, where these "
        "rows are held out, a step's time grows with the model's bytes. The public record gives no chip counts "
        "to test this. A reading, never used to predict.")
    g_long = row(gpu_rows, "llama-2-70b", COUNTED, batch=512, output=2048)
    gpu_checks = [r for r in gpu_rows if r["role"] == COUNTED]
    offline_05 = [r for r in gpu_checks if r["metric"] == "offline_tok_s" and r["software"] == GPU_SOFTWARE]
    max_load_rows = [r for r in gpu_checks if r["metric"] == "max_load_tok_s"]
    v07_rows = [r for r in gpu_checks if r["software"] != GPU_SOFTWARE and r["metric"] == "offline_tok_s"]
    max_load_groups = {  # the held-out rows of TensorRT-LLM 1.0's table by what sets them apart
        "Hopper (FP8) on 1 or 2 GPUs": [r for r in max_load_rows if r["precision"] == "fp8" and r["chips"] <= 2],
        "Llama 3.1 405B on 8 Hopper GPUs (FP8)": [r for r in max_load_rows if r["precision"] == "fp8"
                                                  and r["chips"] == 8],
        "B200 at FP4, Llama 3.3 70B on 1 GPU": [r for r in max_load_rows if r["system"] == "b200"
                                                and r["model"] == "llama-3.3-70b"],
        "B200 at FP4, Llama 3.1 405B on 4 GPUs": [r for r in max_load_rows if r["system"] == "b200"
                                                  and r["model"] == "llama-3.1-405b"],
        "B200 at FP4, Qwen3-30B-A3B (a mixture of experts) on 1 GPU": [r for r in max_load_rows
                                                                       if r["model"] == "qwen3-30b-a3b"],
        "B200 at FP4, Llama 4 Scout (a mixture of experts) on 1 GPU": [r for r in max_load_rows
                                                                       if r["model"] == "llama-4-scout"]}
    groups_text = "; ".join(f"{name} {count(rs)}, median {_median_error(rs):+.0%}"
                            for name, rs in max_load_groups.items())
    fp4_fit = next(r for r in gpu_rows if r["role"] == FP4_FIT_ROLE)
    host_fit = next(r for r in gpu_rows if r["role"] == HOST_FIT_ROLE)
    moe_fit = next(r for r in gpu_rows if r["role"] == MOE_FIT_ROLE)
    host_paced = gpu_read["host"]
    host_evidence = "; ".join(
        f"{model} at {lengths}: {b200:,} on B200, {gb200:,} on GB200 ({gb200 / b200 - 1:+.0%})"
        for (model, lengths), (b200, gb200) in HOST_EVIDENCE.items())
    allreduce_fit = next(r for r in gpu_rows if r["role"] == ALLREDUCE_FIT_ROLE)
    allreduce_read = gpu_read["allreduce"]
    allreduce_fit_share = next(r["share"] for r in allreduce_read if r["role"] == ALLREDUCE_FIT_ROLE)
    allreduce_shares = [r["share"] for r in allreduce_read]
    allreduce_checks = [r for r in allreduce_read if r["role"] == COUNTED]
    implied_allreduce = [r["implied"] for r in allreduce_checks if r["implied"] is not None]
    beyond_allreduce = [r for r in allreduce_checks if r["implied"] is None]
    moe_read = gpu_read["moe"]
    moe_checks = [r for r in moe_read if r["role"] == COUNTED]
    moe_implied = [r["implied"] for r in moe_checks if r["implied"] is not None]
    moe_beyond = [r for r in moe_checks if r["implied"] is None]
    scout_prefill = row(moe_read, "llama-4-scout", COUNTED, input=2048, output=128)
    moe_decode_heavy = [r for r in moe_checks if r["implied"] is not None and r["setting"]["output"] >= 2000
                        and r["setting"]["input"] <= 1000]
    moe_shares = [r["share"] for r in moe_read]
    scout_spec, qwen3_spec = load_preset("llama-4-scout"), load_preset("qwen3-30b-a3b")
    beyond_text = "" if not moe_beyond else (
        ("One held-out row is" if len(moe_beyond) == 1 else f"{len(moe_beyond)} held-out rows are")
        + " predicted slower than published even with no dispatch cost ("
        + ", ".join(f'{r["model"]} {r["setting"]["input"]:,} / {r["setting"]["output"]:,}: {r["error"]:+.0%}'
                    for r in moe_beyond)
        + "): the host paces its decode, and the model runs each prefill before the decode steps, where in-flight "
          "batching runs prefill on the GPU while the host prepares the next step.\n    ")

    def without_dispatch(model):  # the errors of a model's rows with MOE_S_PER_TOKEN = 0
        errors = [(1 + r["error"]) / (1 - r["share"]) - 1 for r in moe_read if r["model"] == model]
        return f"{min(errors):+.0%} to {max(errors):+.0%}"
    first_token = [r for r in gpu_checks if r["metric"] == "ttft_s"]
    h100_first, a100_first = ([r for r in gpu_read["compute_efficiency"] if r["system"] == g]
                              for g in ("h100-sxm", "a100-80gb"))
    kv_05, kv_gqa = ([r for r in gpu_read["kv_reads"] if (r["software"] == GPU_SOFTWARE) == old]
                     for old in (True, False))
    shared = [predict_gpu(dataclasses.replace(_point(r), software="gqa-kernels")) / r["published"]
              for r in offline_05 if r["setting"]["output"] == 2048 and r["model"] == "llama-2-70b"]
    return f"""# Fidelity: predictions vs published measurements

Generated by `python bench/fidelity.py` on {platform.node() or "?"} ({platform.machine()}, Python
{platform.python_version()}), {datetime.date.today().isoformat()}. Error = predicted / published - 1.
Target: within {TARGET_ERROR:.0%} on held-out (CHECK) points: LPU **{count(lpu_rows)}**, GPU
**{count(gpu_rows)}**. Rows marked ALT repeat a published figure under another deployment, or under a
metric with a part the model has no term for, and are not counted, whatever their error (why: in their
role column).

Metrics: {"; ".join(f"`{k}` = {v}" for k, v in METRICS.items())}.

## LPU (lpu-v1 preset) vs Groq's public service

Model: a matrix op lasts max(MACs / MAC rate, SRAM bytes / SRAM bandwidth, weight bytes / install
rate). The MXM is weight-stationary: a 320 x 320 tile must be installed before vectors stream through
it, and at batch 1 each installed weight serves one vector, so decode is bound by the install rate
and not by the 750 TOPS or the 80 TB/s. MoE expert matmuls install every expert the chip holds (the
static schedule cannot depend on routing). Decode attention obeys the same rule: its one query row per
head streams through the cached K and V, which are installed like weights, and the Program attends the
context it was compiled for (every row: its whole window; a reading below: {SHORT_REQUEST:,} tokens of it), so a
row's window slows each of its tokens by (KV bytes per chip) / install rate per layer. Link latencies are the preset's, not fitted ({hops}).

Deployments: {CHIPS_SOURCE}; used for every row of those two models, as no later count was published.
Each service row is modelled at the context window the service offered (the
number in its model id, e.g. `mixtral-8x7b-32768`, or the catalogue's window), for one user (an LLMPerf
row: its 5 concurrent requests); the
placement column shows stages x TP. A row without a published chip count is held out at the compiler's
fewest chips (the TP width inside a node that takes the fewest nodes, ties to the wider, its MLPs cut by
d_ff rows; where no width inside a node holds them so, the width spanning whole nodes that takes the
fewest nodes: {spanning}; whole attention and MLP halves per stage, or, when that needs fewer stages,
pieces cut where stages fill: MLPs along d_ff, tables along the vocabulary, attention along its KV slots).
Given a chip count, a row is compiled at the widest TP inside a node that arranges. On either count the
compiler arranges the stages three ways and keeps the fastest step: each stage boundary inside an MLP, cut
into equal slices (one per stage) that install side by side, as far as the stages have room; each piece
(attentions too) cut at most once, where a dynamic program finds the boundaries that save the most
installs; or stages as even as can be. Groq's 576-chip deployment was reported as pipeline parallel
({PIPELINE_SOURCE}), so every row keeps its TP groups inside a node where the compiler's partition places
them so (all but {spanning}). Left to itself the
compiler also tries wider groups spanning nodes on the same chips, or on fewer of them, and keeps the faster
decode: given the FIT row's {FIT_POINT.chips} chips it places {free["stages"]} stages x TP {free["tp"]} on
{free["chips"]:,} of them at {free["tok_s"]:,.0f} tok/s per user (at the fitted rate), and would reproduce
the published {FIT_POINT.published:,.0f} only at an install rate of
{free["implied_rate"]:,.0f} B/cycle, {free_side[0]} the public lower bound of {bound:,} B/cycle (below){free_side[1]}.

One open constant: the matrix unit's weight-install rate, `chip.matrix_install_bytes_per_cycle`
(not published as such). Fitted here on the FIT row: **{install_fit:,.0f} B/cycle per chip**
({install_fit * clock / 1e12:.2f} TB/s at {clock / 1e6:.0f} MHz, {install_fit / VECTOR_BYTES:.1f} {VECTOR_BYTES}-byte vectors per cycle);
the preset ships {shipped_install:,.0f}. Bounds from the public record: at least one {VECTOR_BYTES}-byte
stream per MXM plane ({MXM_PLANES} planes: {MXM_PLANES * VECTOR_BYTES:,} B/cycle) and at most the SRAM bandwidth
({system.chip.sram_bytes_per_cycle:,.0f} B/cycle).

Where one Llama-2-70B decode step goes at the FIT point ({decomposition["stages"]} stages x TP
{decomposition["tp"]}, {decomposition["makespan_s"] * 1e3:.2f} ms; summed along the step): {steps}.

{table(lpu_rows)}

## GPU model vs NVIDIA's published TensorRT-LLM figures

The 2023 rows ran TensorRT-LLM 0.5, whose decode attention reads each KV head once per query head
(Llama-2-70B: 8 times), except the last {len(v07_rows)} of the table below, run with v0.7a's GQA generation
kernels, which read a KV head once per group, as do TensorRT-LLM 1.0's (the grid after it). Each row is
predicted with its own software (`openlpu.sim.gpu.SOFTWARE`, with the sources). Open constants, fitted
here on their FIT rows (shipped values in `openlpu/sim/gpu.py` in brackets):
KERNEL_OVERHEAD_S = {gpu_fit['KERNEL_OVERHEAD_S'] * 1e6:.2f} us [{G.KERNEL_OVERHEAD_S * 1e6:.2f} us],
COMPUTE_EFFICIENCY = {gpu_fit['COMPUTE_EFFICIENCY']:.3f} [{G.COMPUTE_EFFICIENCY:.3f}] and
ALLREDUCE_BANDWIDTH_EFFICIENCY = {gpu_fit['ALLREDUCE_BANDWIDTH_EFFICIENCY']:.3f} [{G.ALLREDUCE_BANDWIDTH_EFFICIENCY:.3f}],
the bus bandwidth of a tensor-parallel all-reduce as a fraction of NVLink's one-way rate, jointly, the last on
one cell of the grid below ({allreduce_fit["model"]}, {allreduce_fit["chips"]} x {allreduce_fit["system"].upper()},
{allreduce_fit["setting"]["input"]:,} / {allreduce_fit["setting"]["output"]:,}: of the rows on 8 GPUs the one with
the most requests in flight, so the largest all-reduces, {allreduce_fit_share:.0%} of its time at the links' full
rate); then, with them,
FP4_COMPUTE_EFFICIENCY = {gpu_fit['FP4_COMPUTE_EFFICIENCY']:.3f} [{G.FP4_COMPUTE_EFFICIENCY:.3f}], the fraction of
B200's FP4 peak its NVFP4 GEMMs reach, on one cell of the grid below ({fp4_fit["model"]}, 1 x B200,
{fp4_fit["setting"]["input"]:,} / {fp4_fit["setting"]["output"]:,}: its most prefill-bound length), and
HOST_S_PER_REQUEST = {gpu_fit['HOST_S_PER_REQUEST'] * 1e6:.1f} us [{G.HOST_S_PER_REQUEST * 1e6:.1f} us], what
TensorRT-LLM 1.0's host loop spends on each request in flight at each step, on one more ({host_fit["model"]}, 1 x
{host_fit["system"].upper()}, {host_fit["setting"]["input"]:,} / {host_fit["setting"]["output"]:,}: a dense model at its
shortest steps and most requests in flight), and
MOE_S_PER_TOKEN = {gpu_fit['MOE_S_PER_TOKEN'] * 1e9:.0f} ns [{G.MOE_S_PER_TOKEN * 1e9:.0f} ns], what serving a
mixture of experts costs per token and MoE layer beyond the roofline of its experts, on one more
({moe_fit["model"]}, 1 x {moe_fit["system"].upper()},
{moe_fit["setting"]["input"]:,} / {moe_fit["setting"]["output"]:,}: the model routing each token to the most
experts, at its most prefill-bound length).
How held out the GPU rows are: each constant is fitted on its one FIT row alone, but the terms the last three
stand for (an all-reduce's efficiency, a host loop, a mixture's cost per token) entered the model after the
grid's rows had been scored, each where a regime of them missed, and the host loop's FIT row was chosen among
the rows whose steps the model timed well without it. The held-out count checks the constants' values, not
the choice of the model's terms, which those rows informed.
FP4 weights are NVFP4's 4.5 bits per element; the KV cache stays FP8, as NVIDIA's NVFP4 checkpoints set
it (`kv_cache_quant_algo` FP8 in their hf_quant_config.json), and attention does its math in FP8.

{table([r for r in gpu_rows if r["metric"] != "max_load_tok_s"])}

{max_load_grid([r for r in gpu_rows if r["metric"] == "max_load_tok_s"])}

## Reading the errors

- No value of the open constant meets the target. Compiled again at the install rate that reproduces
  each row's published figure (its placement and every other constant unchanged; a reading, never used
  to predict), the held-out rows need from {slowest["implied"]:,.0f} ({slowest["model"]}) to
  {fastest["implied"]:,.0f} ({fastest["model"]}) B/cycle, {fastest["implied"] / slowest["implied"]:.1f}x apart, and
  {len(below_bound)} ({", ".join(i["model"] for i in below_bound)}) need less than the public lower bound of
  {MXM_PLANES * VECTOR_BYTES:,} B/cycle. Decode is install-bound, so a row is within {TARGET_ERROR:.0%} only at
  rates within {TARGET_ERROR:.0%} of its own, and at most {best["sharing_a_window"]} rows share such a window. The
  rate chosen on the held-out rows themselves to serve the most ({best["rate"]:,.0f} B/cycle; the target
  forbids choosing it so) gets {best["within"]} of {best["of"]} within {TARGET_ERROR:.0%} when they are compiled at
  it, against {count(lpu_rows)} at the fitted {install_fit:,.0f}. What sets the rows apart is not this constant but what
  the model is told about each deployment: the chips, the TP width and the load (below).

{implied_table}

{textwrap.fill("- " + monotone, 104, subsequent_indent="  ")}

{textwrap.fill("- " + per_layer_line, 104, subsequent_indent="  ")}

- Llama-2-70B, LLMPerf (Jan 2024; service llama2-70b-4096, 5 requests at a time, modelled so): its requests
  generated their last 149 tokens at
  {LLMPERF_DECODE_TOK_S:.0f} tok/s ({1e3 / LLMPERF_DECODE_TOK_S:.2f} ms per token), while Groq's Feb 2024
  "300 tok/s per user" (the FIT row) is 3.33 ms per token: the two published figures differ by
  {300 / LLMPERF_DECODE_TOK_S:.2f}x in generation speed. Fitted on the press figure, the model is that much
  above LLMPerf; a rate between the two would bring both within {(300 / LLMPERF_DECODE_TOK_S) ** 0.5 - 1:.0%},
  but only by fitting on both. We fit on the press figure because the held-out Feb 2024 points
  (Mixtral 480, Llama-2-7B 750) were published with it. A third measurement of the same service,
  thefastest.ai's of 10 Apr 2024 ({l70_measured["published"]} tok/s, generation only), is
  {l70_measured["error"]:+.0%} from the prediction. (LLMPerf's own "inter-token latency", 5.38 ms,
  is the whole request time per output token, TTFT included, and is not a generation speed; an earlier
  version of this table read it as one and put the gap at 1.6x.) The leaderboard's headline, output
  tokens over the whole request (185 tok/s, the ALT row), adds a TTFT measured over the internet (median
  {LLMPERF_GROQ_70B["median_ttft_s"]:.2f} s, with queueing) to what the model predicts for the chips
  alone (a prefill of 550 tokens on 576 chips), so it is shown and not counted.
- Mixtral on 576 chips: 32 layers give 66 halves, fewer than the {mixtral["stages"]} stages of TP
  {mixtral["tp"]}, so the compiler cuts every MoE MLP into {mixtral["mlp_parts"]:.0f} parts on consecutive
  stages. Nothing orders the parts (each needs only the residual; their partial sums meet after), so
  the static schedule installs them at the same time: per layer the step costs the attention and one
  part, and the prediction is {mixtral["tok_s"]:,.0f} tok/s. Were the stages chained one after another
  (each starting when the previous one ends), the same placement would give about
  {mixtral["chained_tok_s"]:,.0f} tok/s, and Mixtral at the fewest chips ({mix_fewest["chips_modelled"]}
  chips, TP {mixtral["tp"]}, MLPs cut where stages fill) predicts {mix_fewest["predicted"]:,.0f}. The three
  held-out figures for Groq's Mixtral, {", ".join(f'{r["published"]:,} ({r["date"]})' for r in mixtral_checks)},
  are {", ".join(f'{r["predicted"] / r["published"] - 1:+.0%}' for r in mixtral_checks)} from the 576-chip
  prediction, {", ".join(f'{mixtral["chained_tok_s"] / r["published"] - 1:+.0%}' for r in mixtral_checks)}
  from the same placement chained, and
  {", ".join(f'{mix_fewest["predicted"] / r["published"] - 1:+.0%}' for r in mixtral_checks)} from the
  fewest-chips one. Either Groq's schedule
  did not overlap the parts of a layer, or the 576 chips held two copies of a ~288-chip pipeline; the
  public record does not say which. One unvetted blog (dataku-5px.pages.dev, measurements it dates
  18-19 Feb 2024, no raw data) reports a median of 812 tok/s for Groq's Mixtral; it is not in the
  table [L]. Scheduling every expert (not the top-2) is what puts Mixtral near 480 at TP 8: experts
  are 97% of a Mixtral layer's weight bytes.
- Llama 4 Scout (16 experts a layer, 1 per token, beside a shared expert: 107.8 GB at int8, 17.2 GB of it
  active): the static schedule installs all 16 experts at every step, whatever the routing. On its fewest
  chips ({scout[0]["chips"]:,}, {scout[0]["layout"]}) each layer's MLP is cut into few parts and the prediction is
  {scout[0]["tok_s"]:,.0f} tok/s, {scout[0]["tok_s"] / scout_published - 1:+.0%} from the listing ({scout_published:,}).
  Given more chips, the compiler cuts the MLPs into more parts, which run side by side: {"; ".join(
      f'{r["chips"]:,} chips ({r["layout"]}) {r["tok_s"]:,.0f} ({r["tok_s"] / scout_published - 1:+.0%})'
      for r in scout[1:])}. Left to itself on the same counts (the chips given, no width), the compiler
  chooses the width and the prefill chunk, and on more than the fewest groups chips across nodes, which
  installs each matrix over more of them: {"; ".join(
      f'{r["chips"]:,} chips ({r["free_layout"]}) {r["free_tok_s"]:,.0f} '
      f'({r["free_tok_s"] / scout_published - 1:+.0%})' for r in scout)}. So the listing needs several times the
  fewest chips, in groups spanning nodes (a reading, chosen after seeing the listing, and a deployment
  the record does not describe), or a schedule that installs only the chosen expert, which a static
  schedule cannot; the public record gives neither Groq's chip count nor its schedule.
- Held out at the fewest chips: each row's placement, and the same row compiled at each TP width
  inside a node ({widths}; `openlpu plan --tp`), each at its own fewest chips. The width nearest the
  listing is a reading of what deployment would explain it, chosen after seeing the listing, so it is
  not counted. The last column is the row compiled for {LOADED_USERS} users in flight (their KV placed,
  users sharing micro-batches when the busiest stage would keep them waiting), a load the public
  record does not give.

{fewest_table}

  {_models(big)}: nearest at TP {_widths(big)}, the compiler's and the FIT point's width. {_models(small)}:
  nearest at TP {_widths(small)}, narrower than the compiler's placement; at the nearest width
  {len(within)} of {len(small)} are within {TARGET_ERROR:.0%}, but no one width serves them all: within {TARGET_ERROR:.0%} at
  {", ".join(f"TP {t}: {n} of {len(small)}" for t, n in within_by_tp.items())}. With {LOADED_USERS} users in flight
  their predictions move by {min(load_change):+.0%} to {max(load_change):+.0%} ({loaded_within} of {len(small)} then
  within {TARGET_ERROR:.0%} of the listing): the users share each weight install and add only their own K and
  V, and their caches take more chips, whose stages each have less to install. The chip counts per width show why
  the compiler goes wide: at these sizes the widths need nearly the same chips (within {width_spread:.0%}), and the
  compiler compares widths by the nodes they take, ties to the wider. Groq's deployments of these models are not
  published, and neither is the load behind a listing.{wide_only_text}
  Two pairs have the same layer shapes and differ in window (8,192 tokens in 2024, 131,072 in 2025;
  the 3.1 and 3.3 models also change the RoPE scaling): {same_shape_pairs}. The model tells the two of a
  pair apart only by the window, attended whole at every step, and by the placement it gives.
  These rows test Groq's choice of deployment, and how it serves its load, more than the chip.
- Held out at the fewest chips, with decode steps attending {SHORT_REQUEST:,} tokens (a request that short,
  LLMPerf's 550 in / 150 out among them), each user's whole window still held (`openlpu plan --decode-context`;
  a static schedule attends a fixed length, so such a deployment keeps a Program per length it serves):
  {short_text}. Within {TARGET_ERROR:.0%}: {sum(abs(r["error"]) <= TARGET_ERROR for r in short)} of {len(short)}
  (at the whole window: {sum(abs(r["whole_window"] / r["published"] - 1) <= TARGET_ERROR for r in short)}). A
  reading, not counted: the lengths of the requests behind a listing are not published.
- The 576-chip ALT rows: given more chips than the fewest, the compiler widens to TP 8 and cuts MLPs
  between stages, and the parts run in parallel, so a 7-9B model on 576 chips runs
  {min(spread_576):.1f}-{max(spread_576):.1f}x faster per user than the figures Groq published for it.
  Groq published no chip count for these models.
- Precision: every LPU row uses 8-bit weights, activations and KV. 8-bit (or mixed) weights are
  forced by capacity (576 x 230 MB = 132 GB < 138 GB of FP16 Llama-2-70B weights), and Groq's own
  numerics ("TruePoint", 2024) store weights in reduced precision with higher-precision arithmetic
  (as described by SambaNova's 'Does reduced precision hurt?', June 2024). The install bound depends
  on weight bytes only, and at batch 1 the FP16 MAC rate (1/4 of INT8) is not binding, so FP16
  activations move the prediction mainly through placement: with FP16 activations and KV the FIT
  point places as {fp16["stages"]} stages x TP {fp16["tp"]} and predicts {fp16["tok_s_per_user"]:,.0f} tok/s
  (int8: 300). gpt-oss ships its experts in MXFP4 (4.25 bits per weight, its model card); lpu-v1's
  matrix unit has no 4-bit mode, so its rows are planned at 8 bits too.
- GPU: earlier versions of this table misread two rows of NVIDIA's H200 table, whose throughput is
  per GPU and whose TP column is the GPU count: batch 64 at 2,048 / 128 is one GPU at 341 tok/s (not
  two at 682), and batch 512 at 128 / 2,048 is TP 2 at 1,654 tok/s per GPU (3,308 on two, not 6,616 on
  four). With TensorRT-LLM 0.5's per-query-head KV reads the long-output rows, where decode attention
  over a growing cache dominates, land within the target (batch 512 at 128 / 2,048: {g_long["error"]:+.0%});
  reading each KV head once instead (a GQA kernel, same constants) would predict them
  {min(shared):.1f}-{max(shared):.1f}x too fast. The H100 rows
  of TensorRT-LLM 0.5's own table were added as held-out checks with that change.
- GPU, by regime (held out): offline throughput under TensorRT-LLM 0.5, {gpu_count(offline_05)}; first-token
  latency at batch 1, {gpu_count(first_token)}; offline throughput under v0.7a's GQA kernels,
  {gpu_count(v07_rows)}; throughput under unbounded load with TensorRT-LLM 1.0, {gpu_count(max_load_rows)}
  ({groups_text}).
  Each figure below is what one row would need alone, a reading, never used to predict.
  - First-token latency: the model gives every GEMM one compute efficiency, fitted on a prefill of 32
    prompts x 2,048 tokens ({G.COMPUTE_EFFICIENCY:.3f}). The 2,048-token prompts at batch 1 would need
    {efficiencies(h100_first, 2048)} (FP8) and
    {efficiencies(a100_first, 2048)} (FP16): H100 at FP8 and A100 at FP16 reach
    different fractions of their peaks, which one constant cannot hold. At 128 tokens the model has the
    prefill streaming its weights plus a fixed cost per kernel, and predicts
    {_errors(first_token, 128)}
    against NVIDIA's whole milliseconds: the short prefill has costs the model lacks (a compute-bound
    reading would need {efficiencies(gpu_read["compute_efficiency"], 128)}).
  - Long outputs of Llama-2-70B, whose decode attention over a growing cache dominates: with all of a
    row's error put on attention's KV traffic, the rows would need each KV head read {kv_range(kv_05)} times
    per step under TensorRT-LLM 0.5 (modelled: 8) and {kv_range(kv_gqa)} times under v0.7a's GQA kernels
    (modelled: 1, the least traffic a kernel can have). Either v0.7a's kernel did not reach it or its other
    kernels ran below the model's roofline at these batches; either way the `gqa-kernels` row, `openlpu
    plan`'s default for GPUs, predicts a GPU serving long outputs at large batch faster than TensorRT-LLM
    v0.7a ran it ({_errors(kv_gqa, None)}). TensorRT-LLM 1.0 comes closer: on 1 or 2 GPUs its rows, long
    outputs included, sit around the model's figures. On several GPUs the all-reduces matter: at
    NVLink's full rate they take {min(allreduce_shares):.0%} to {max(allreduce_shares):.0%} of a row's time, and at
    that rate the model had Llama 3.1 405B faster than measured on every row. Fitted on one of them, the
    all-reduces' bus bandwidth is {G.ALLREDUCE_BANDWIDTH_EFFICIENCY:.0%} of the links' rate; alone, the held-out
    rows on 2 to 8 GPUs would need {min(implied_allreduce):.2f} to {max(implied_allreduce):.2f}, and {len(beyond_allreduce)} more,
    predicted slower than published even with all-reduces 5x faster than the links allow, would need
    none. So one constant leaves the long outputs of 405B (128 / 2,048, 500 / 2,000, 1,000 / 2,000) too
    fast, most on 4 B200s. A GPU comparison in `plan` can favour the GPU by these margins (`plan
    --gpu-software tensorrt-llm-0.5` shows the other end: once per query head).
  - The host: TensorRT-LLM 1.0 (PyTorch backend) tends every request in flight in a host loop at each step,
    which prepares the next step while the GPU runs this one, so a step lasts the longer of the two. With
    HOST_S_PER_REQUEST fitted on one row, the host paces {len(host_paced)} held-out rows:
    {_host_errors(host_paced)}. The same table bears on the host, without any fit: {host_evidence}.
    For the two mixtures of experts Grace, the GB200's CPU, falls behind where requests are many and steps
    short, while the GB200 is ahead at long outputs; for the two dense models the GB200 is ahead at every
    length. So the table shows a host pacing mixtures' short steps; for dense models, on whose host loop
    HOST_S_PER_REQUEST was fitted, it shows none (the GB200's other differences may hide it).
  - A mixture of experts, timed as the roofline of the chosen experts' work and the distinct experts' weights
    alone, ran slower than that on one B200: Qwen3-30B-A3B (128 experts, 8 per token) from
    {without_dispatch("qwen3-30b-a3b")}, Llama 4 Scout (16 experts, 1 per token, beside a shared expert) from
    {without_dispatch("llama-4-scout")}. Serving experts adds routing, sorting the tokens by expert, moving them
    there and back and grouped GEMMs of few tokens each; MOE_S_PER_TOKEN
    ({G.MOE_S_PER_TOKEN * 1e9:.0f} ns per token and MoE layer, fitted on one Qwen3 row) stands for all of it and
    takes {min(moe_shares):.0%} to {max(moe_shares):.0%} of these rows' time. Alone, the held-out rows would need
    {min(moe_implied) * 1e9:.0f} to {max(moe_implied) * 1e9:.0f} ns. Scout's {scout_prefill["setting"]["input"]:,} /
    {scout_prefill["setting"]["output"]:,}, the same length as the fit, would need
    {scout_prefill["implied"] * 1e9:.0f} ns, though Scout sends each token to {scout_spec.n_experts_per_token} of its
    experts, not {qwen3_spec.n_experts_per_token}, through tokens {scout_spec.d_model:,} wide, not
    {qwen3_spec.d_model:,}: in these two models the cost follows the tokens, not the routed copies, the FLOPs or the
    bytes. The rows of long outputs from short prompts would need
    more ({", ".join(f'{r["model"]} {r["setting"]["input"]:,} / {r["setting"]["output"]:,}: {r["implied"] * 1e9:.0f} ns'
    for r in moe_decode_heavy)}): per token, their decode steps cost more than the prefill the fit row is made of.
    {beyond_text}`plan` on a mixture of experts (Mixtral, gpt-oss) can favour the
    GPU by the decode-heavy margins, while the LPU side schedules every expert at every step (the opposite bias).

""" + speculative_markdown(specdec)


def _layer_mlp_bytes(model: str) -> int:
    """Elements (int8 bytes) of layer 0's MLP tensors: every expert of an MoE layer."""
    return sum(math.prod(shape) for name, shape in load_preset(model).tensor_shapes().items()
               if name.startswith("blk.0.ffn_") and not name.endswith("norm.weight"))


def _models(readings: list[dict]) -> str:
    return ", ".join(f"{r['model']} ({r['context']:,})" for r in readings)


def _widths(readings: list[dict]) -> str:
    return " and ".join(map(str, sorted({r["nearest_tp"] for r in readings}, reverse=True)))


def _errors_at_widths(f: dict) -> str:
    """'TP 8: 536 chips, -37%; TP 4: ...' for the widths a fewest-chips reading placed."""
    return "; ".join(f"TP {t}: {w['chips']:,} chips, {w['error']:+.0%}" for t, w in f["by_tp"].items() if w)


def _host_errors(rs) -> str:
    """'llama-3.1-8b, 1 x h100-sxm, 128 / 128: -3% (the GPU alone: +17%)' for each host-paced row."""
    return "; ".join(f"{r['model']}, {r['chips']} x {r['system']}, {r['setting']['input']:,} / "
                     f"{r['setting']['output']:,}: {r['error']:+.0%} (the GPU alone: {r['gpu_alone_error']:+.0%})"
                     for r in rs)


def _median_error(rs) -> float:
    errors = sorted(r["error"] for r in rs)
    return (errors[(len(errors) - 1) // 2] + errors[len(errors) // 2]) / 2


def max_load_grid(rs) -> str:
    """TensorRT-LLM 1.0's throughput table beside the model's: one line per model and GPUs, one column per
    input/output length; each cell published / predicted (error), with the requests modelled in flight."""
    head = "| model, GPUs (requests in flight at the first and last lengths) | " + " | ".join(
        f"{i:,} / {o:,}" for i, o in MAX_LOAD_LENGTHS) + " |"
    lines = [head, "|---" * (len(MAX_LOAD_LENGTHS) + 1) + "|"]
    for model, gpu, gpus, precision in MAX_LOAD_TABLE:
        cells = [r for r in rs if (r["model"], r["system"], r["chips"], r["precision"]) ==
                 (model, gpu, gpus, precision)]
        ends = " and ".join(str(max_load_requests(_point(r))) for r in (cells[0], cells[-1]))
        lines.append(f"| {model}, {gpus} x {gpu}, {precision} ({ends}) | " + " | ".join(
            f"{r['published']:,} / {r['predicted']:,.0f} ({r['error']:+.0%}"
            f"{', FIT' if r['role'] != COUNTED else ''})" for r in cells) + " |")
    return (f"TensorRT-LLM 1.0 under unbounded load ({TRT_V1}, 2025), output tok/s, published / predicted "
            f"(error); GQA kernels and the host loop over the requests in flight (the `tensorrt-llm-1.0` software "
            f"row); all held out but the cells marked FIT:\n\n" + "\n".join(lines))


def _errors(rs, prompt: int | None) -> str:
    """The errors of rows (of one prompt length, or all), with their model, GPU and setting."""
    def label(r):
        batch = f", batch {r['setting']['batch']}" if "batch" in r["setting"] else ""
        return f"{r['error']:+.0%} ({r['model']}, {r['system']}{batch})"
    return ", ".join(label(r) for r in rs if prompt is None or r["setting"]["input"] == prompt)


def _setting(s: dict) -> str:
    return "(" + ", ".join(f"{k} {v}" for k, v in s.items()) + ")"


def main() -> int:
    argparse.ArgumentParser(description=__doc__.split("\n\n")[0]).parse_args()  # --help, before minutes of work
    gpu_fit = fit_gpu()
    gpu_rows = rows(GPU_POINTS, lambda p: (predict_gpu(p), None))
    system = load_system("lpu-v1")
    shipped = system.chip.matrix_install_bytes_per_cycle
    install = fit_lpu_install(system)
    fitted_system = with_install_rate(system, install)
    lpu_rows = rows(LPU_POINTS, lambda p: predict_lpu(p, fitted_system))
    decomposition, free = lpu_decomposition(fitted_system), free_choice_reading(fitted_system)
    fp16 = fp16_activation_sensitivity(fitted_system)
    mixtral, fewest = mixtral_cut(fitted_system), fewest_chip_readings(lpu_rows, fitted_system)
    scout, short = scout_spread(fitted_system), short_request_reading(lpu_rows, fitted_system)
    implied = implied_install_rates(lpu_rows, fitted_system)
    best = best_single_rate(implied, lpu_rows, fitted_system)
    pairs = contradictory_pairs(lpu_rows)
    per_layer = per_layer_reading(lpu_rows)
    specdec = speculative_reading()
    gpu_read = gpu_readings(gpu_rows)
    RESULTS.mkdir(exist_ok=True)
    (RESULTS / "fidelity.json").write_text(json.dumps(
        {"command": "python bench/fidelity.py", "date": datetime.date.today().isoformat(),
         "machine": f"{platform.node()} {platform.machine()} Python {platform.python_version()}",
         "gpu_fit": gpu_fit, "lpu_install_bytes_per_cycle_fit": install,
         "lpu_install_bytes_per_cycle_shipped": shipped, "lpu_decode_decomposition": decomposition,
         "fit_row_in_the_compilers_choice": free,
         "lpu_fp16_activation_sensitivity": fp16, "mixtral_576": mixtral, "scout_spread": scout,
         "short_request_reading": short, "fewest_chip_readings": fewest,
         "implied_install_rates": implied, "best_single_install_rate": best, "contradictory_pairs": pairs,
         "per_layer_reading": per_layer,
         "speculative_reading": specdec, "gpu_readings": gpu_read, "lpu": lpu_rows, "gpu": gpu_rows},
        indent=1) + "\n")
    text = markdown(lpu_rows, gpu_rows, gpu_fit, install, shipped, fitted_system, decomposition, fp16, mixtral, scout,
                    fewest, implied, best, pairs, per_layer, specdec, gpu_read, free, short)
    (RESULTS / "fidelity.md").write_text(text)
    print(text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
