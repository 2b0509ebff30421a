"""The same op rows the LPU compiler sees (graph.lower), timed on an HBM GPU server.

Per op: a roofline, max(flops / (peak * COMPUTE_EFFICIENCY), bytes / (hbm_bw * MEMORY_EFFICIENCY))
(FP4 math on FP4 units: FP4_COMPUTE_EFFICIENCY), plus KERNEL_OVERHEAD_S for its kernel. What the
serving software's kernels add to the bytes is a row of SOFTWARE: decode attention on a grouped-query
model (Llama-2-70B: 64 query heads share 8 KV heads) reads each KV head once for its whole group with a
GQA kernel, but once per query head with TensorRT-LLM 0.5's masked multi-head attention kernel, which
runs one thread block per query head (TensorRT-LLM docs, "gpt_attention": the generation phase "uses a
single CUDA thread-block per head"; its XQA kernel for MQA/GQA, TensorRT-LLM 0.8, Jan 2024, "reduces
data loading" and gave Llama-70B 2.4x the throughput at 128 in / 2,048 out on one H200). The factor is
the model's query heads per KV head, not a fitted number. The first two fits ran TensorRT-LLM 0.5 and
use its row; `openlpu plan` compares against current engines (the default row). That row is optimistic: against TensorRT-LLM v0.7a's GQA kernels
(Llama-2-70B, 1 x H200, FP8, 128 in; TensorRT-LLM blog "Falcon-180B on a single H200", Dec 2023) it
predicts 2,048-token outputs at batch 192 65% faster than measured, 4,096-token outputs at batch 96
38% faster. TensorRT-LLM 1.0 (2025; its own row, `tensorrt-llm-1.0`, adds its host loop) comes closer:
its throughput table for Llama 3.1 8B and 3.3 70B on one or two H100s or H200s sits around the model's
figures; Llama 3.1 405B, on 8 Hopper GPUs or 4 B200s, with the all-reduces' bandwidth fitted on one of its
rows, runs its long outputs up to ~25% slower than predicted; and a mixture of experts (Qwen3-30B-A3B and
Llama 4 Scout on one B200) runs slower than the roofline of its experts by a cost per token and MoE layer
(MOE_S_PER_TOKEN), fitted on one row, that leaves its long outputs up to ~30% faster than measured
(bench/results/fidelity.md).

Tensor parallelism over NVLink divides the sharded ops and adds two all-reduces per layer
(Megatron-style: after attention and after the MLP); servers beyond one NVLink domain form pipeline
stages, and so do groups inside a server when a wider TP group would not hold whole attention heads
(3 GPUs for Llama's 64 query and 8 KV heads: 3 stages of 1). The users of a pipeline are split into a
micro-batch per stage, each stage working on one while the others work on theirs (micro_batches). A group
wider than the KV heads copies each head, its projections and its cache onto tp / n_kv_heads GPUs, each
reading its copy, so the TP width is the widest whose copies leave room for the KV cache (layout). The KV cache
that `users` x `context` needs must fit in the HBM the weights leave free: that caps the batch. The KV
cache is held in the weight precision, but never below 8 bits (graph.lower.serving_precision), and
attention does its math in the KV cache's precision. Below 16 bits the embedding table and the head stay bf16,
as quantized checkpoints keep them (KEPT_16_BIT).

Constants and the published points they were fitted on / checked against (bench/fidelity.py):
- MEMORY_EFFICIENCY 0.80: achieved fraction of HBM peak when streaming weights. Not fitted:
  the usual STREAM-like figure for H100/A100 (NVIDIA's own bandwidth tests reach ~80-90%).
- COMPUTE_EFFICIENCY 0.664: achieved fraction of dense tensor peak over a whole prefill (GEMMs,
  attention, norms). FITTED on one point: TensorRT-LLM 0.5 "H200 launch" blog table (Nov 2023):
  1 x H200, FP8, Llama-2-70B, batch 32, 2,048 in / 128 out: 303 output tok/s (with that version's
  per-query-head KV reads). The other rows of that table and of TensorRT-LLM 0.5's own H100 and A100
  tables are held out (bench/results/fidelity.md). One constant misses batch-1 first-token latency:
  alone, those rows would need 0.46 to 0.53 on H100 at FP8 and about 0.72 on A100 at FP16.
- KERNEL_OVERHEAD_S: launch + tail per kernel. FITTED on one point: NVIDIA, "Achieving Top
  Inference Performance with the NVIDIA H100 Tensor Core GPU and NVIDIA TensorRT-LLM" (Dec 2023):
  DGX H100 (8 GPUs, FP8, TensorRT-LLM 0.5), Llama-2-70B, 2,048 in / 128 out, batch 1: 1.7 s.
- ALLREDUCE_BANDWIDTH_EFFICIENCY 0.710: the bus bandwidth a tensor-parallel all-reduce reaches, as a
  fraction of NVLink's one-way rate, at the tens to hundreds of MB a batched step reduces. FITTED on
  one point: TensorRT-LLM 1.0 perf-overview (2025), Llama 3.1 405B, 8 x H200, FP8, 128 in / 128 out
  under unbounded load: 3,814 output tok/s: of the table's rows on 8 GPUs, the one with the most
  requests in flight (4,096), so the largest all-reduces, about a quarter of its time. Its other 39
  rows on 2 to 8 GPUs (29 on Hopper) are held out (bench/results/fidelity.md).
  (These three fits are solved jointly; bench/fidelity.py repeats the fit and prints them.)
- FP4_COMPUTE_EFFICIENCY 0.420: the fraction of the FP4 peak that NVFP4 GEMMs reach, on GPUs with FP4 units
  (B200). FITTED on one point, with the three above: TensorRT-LLM 1.0 perf-overview (2025), Llama 3.3 70B,
  1 x B200, NVFP4 weights and FP8 KV cache, 2,048 in / 128 out under unbounded load: 1,339 output tok/s.
  Its other 19 B200 rows (70B on 1 GPU, 405B on 4) are held out (bench/results/fidelity.md). It sits below the FP8
  fraction: NVFP4 math ran at 1.3x the FP8 rate, not the datasheet's 2x.
- HOST_S_PER_REQUEST 24.3 us: what an engine whose loop runs on the host (TensorRT-LLM 1.0's PyTorch
  backend: the `tensorrt-llm-1.0` software row) spends on each request in flight at each step: scheduling
  it, preparing its inputs, taking its token. The loop prepares the next step while the GPU runs this one
  (TensorRT-LLM's overlap scheduler), so a decode step lasts the longer of the two, and at thousands of
  requests of short steps the host sets the pace. FITTED on one point: TensorRT-LLM 1.0 perf-overview
  (2025), Llama 3.1 8B, 1 x H200, FP8, 128 in / 128 out under unbounded load: 27,911 output tok/s (4,096
  requests in flight). The same table bears on the host: at 128 / 128 the GB200 (Grace CPU) serves
  Qwen3-30B-A3B and Llama 4 Scout 39% and 21% slower than the B200 (x86 host) beside it, while at 128 /
  4,096, where the GPU sets the pace, the GB200 is faster on both; for Llama 3.3 70B and 3.1 405B it is
  faster at both lengths (bench/fidelity.py HOST_EVIDENCE).
- MOE_S_PER_TOKEN 125 ns: what serving a mixture of experts costs per token and MoE layer beyond the roofline
  of its experts: routing, sorting the tokens by expert, moving them there and back, grouped GEMMs of few
  tokens each. Every GPU of a TP group pays it for every token, as each routes them all. FITTED on one point:
  TensorRT-LLM 1.0 perf-overview (2025), Qwen3-30B-A3B (128 experts, 8 per token), 1 x B200, NVFP4, 2,048 in /
  128 out under unbounded load: 6,251 output tok/s, where the roofline alone predicts 2.7x that. Its other 9
  rows and Llama 4 Scout's 10 (16 experts, 1 per token) are held out; Scout's row at the same lengths alone
  needs about the same (bench/results/fidelity.md): the cost follows tokens, not routed copies, FLOPs or bytes.
- ALLREDUCE_LATENCY_S 10 us: fixed cost of a small NCCL all-reduce inside an NVLink/NVSwitch
  node (nccl-tests small-message latency is ~8-15 us on DGX H100); not fitted.
- PIPELINE_HOP_S 10 us: pipeline hand-off between stages, over InfiniBand between servers (inside a server,
  over NVLink, an upper bound); not fitted.
- HBM_USABLE_FRACTION 0.90: HBM left after the CUDA context, activations and allocator slack
  (vLLM's default gpu_memory_utilization is 0.9).
- LOAD_POWER_FRACTION 0.75: server draw while serving, as a fraction of its maximum (DGX H100:
  typical 6.5-8.5 kW of a 10.2 kW maximum, NVIDIA user guide via supercluster.blog), at any batch: no public
  figure per batch was gathered, so a GPU serving one user is charged this draw, where the LPU's power
  follows its chips' busy cycles (sim.timing).
"""

from __future__ import annotations

import dataclasses
import difflib
import math
from collections.abc import Callable
from dataclasses import dataclass

from openlpu.errors import OpenLPUError, check_count
from openlpu.graph.lower import as_precision, attended_keys, lower, serving_precision
from openlpu.hardware.gpu import GpuSpec
from openlpu.models.spec import ModelSpec
from openlpu.sim.cost import gpu_servers
from openlpu.words import counted

MEMORY_EFFICIENCY = 0.80
COMPUTE_EFFICIENCY = 0.664  # fitted: see the module docstring
FP4_COMPUTE_EFFICIENCY = 0.420  # fitted: see the module docstring and bench/fidelity.py
KERNEL_OVERHEAD_S = 6.98e-6  # fitted: see the module docstring and bench/fidelity.py
HOST_S_PER_REQUEST = 24.3e-6  # fitted: see the module docstring and bench/fidelity.py
MOE_S_PER_TOKEN = 125e-9  # fitted: see the module docstring and bench/fidelity.py
ALLREDUCE_LATENCY_S = 10e-6
ALLREDUCE_BANDWIDTH_EFFICIENCY = 0.710  # fitted: see the module docstring and bench/fidelity.py
PIPELINE_HOP_S = 10e-6
HBM_USABLE_FRACTION = 0.90
LOAD_POWER_FRACTION = 0.75
ACTIVATION_BYTES = 2  # bf16 activations cross NVLink in every precision mode
ALLREDUCES_PER_LAYER = 2


@dataclass(frozen=True)
class Software:
    """What a serving stack's kernels do that the op rows cannot tell."""
    name: str
    gqa_shared_kv_reads: bool  # decode attention reads a KV head once per group (else once per query head)
    host_loop: bool = False  # its loop tends each request in flight on the host at every step (HOST_S_PER_REQUEST)


SOFTWARE = {
    "tensorrt-llm-0.5": Software("TensorRT-LLM 0.5 (Oct 2023): masked MHA, one thread block per query head", False),
    "gqa-kernels": Software("GQA decode kernels (TensorRT-LLM XQA from 0.8, Jan 2024; vLLM, SGLang)", True),
    "tensorrt-llm-1.0": Software("TensorRT-LLM 1.0 (2025), PyTorch backend: GQA decode kernels, and a host loop "
                                 "over the requests in flight at every step, beside the GPU's", True, True),
}
DEFAULT_SOFTWARE = "gqa-kernels"

# Op kinds whose work tensor parallelism splits across the GPUs of a server; the rest (norms,
# residual adds, the embedding gather, sampling) run replicated on every GPU.
TP_SHARDED_KINDS = frozenset({"matmul", "attention", "activation", "rope", "lm_head", "softcap",
                              "moe_router", "sink"})
# Op kinds that serving kernels fold into the kernel before them, so they launch none of their own:
# gpt-oss's attention sinks run inside the attention kernel (vLLM's FlashAttention 3 path, TensorRT-LLM),
# and a bias add in the epilogue of the matrix product (or MoE kernel) it follows.
FUSED_KINDS = frozenset({"sink", "bias"})
# Ops the attention kernel computes on scores it keeps on chip, so they move no bytes through HBM either:
# Gemma 2's score softcap (TensorRT-LLM's GPT attention plugin takes it as qk_tanh_scale; FlashAttention as
# softcap)
IN_ATTENTION_KERNEL = ("attn_softcap",)


@dataclass(frozen=True)
class GpuTiming:
    gpu: str
    gpus: int
    tensor_parallel: int
    pipeline_stages: int
    users: int
    context: int
    weight_bytes_per_gpu: float
    kv_bytes_per_gpu: float
    hbm_used_fraction: float
    max_users: int  # at this context, the most users whose KV cache fits beside the weights
    micro_batch: int  # users per decode step: a pipeline's users split into a micro-batch per stage
    ttft_s: float
    decode_step_s: float  # between a user's tokens: one micro-batch's pass through every stage
    tokens_per_s_per_user: float
    throughput_tokens_per_s: float
    power_w: float
    energy_per_token_j: float


def software_named(name: str) -> Software:
    """The SOFTWARE row called `name`, or one clear error naming the rows there are."""
    if name not in SOFTWARE:
        close = difflib.get_close_matches(str(name).lower(), SOFTWARE, n=1, cutoff=0.4)
        hint = f"did you mean {close[0]}? " if close else ""
        raise OpenLPUError(f"unknown GPU software {name!r}; {hint}choose one of: "
                           + "; ".join(f"{k} ({v.name})" for k, v in SOFTWARE.items()))
    return SOFTWARE[name]


def kv_reads_per_kv_head(spec: ModelSpec, software: str) -> int:
    """How many times decode attention reads each cached KV head under `software`."""
    return 1 if software_named(software).gqa_shared_kv_reads else spec.n_heads // spec.n_kv_heads


def achieved_flops_per_s(gpu: GpuSpec, precision: str) -> float:
    """Dense tensor throughput reached on math in `precision`: the fitted fraction of the peak of the
    units that run it (FP4 units have their own fraction; formats without units run in bf16)."""
    efficiency = FP4_COMPUTE_EFFICIENCY if precision == "fp4" and "fp4" in gpu.dense_flops_per_s \
        else COMPUTE_EFFICIENCY
    return gpu.compute_flops_per_s(precision) * efficiency


def op_time_s(op, gpu: GpuSpec, precision: str, shards: int, kv_reads: int = 1, kv_copies: int = 1) -> float:
    """Roofline time of one op on one GPU holding 1/shards of it, plus its kernel overhead; attention
    reads its KV cache kv_reads times and does its math in the KV cache's precision; a K or V projection is
    read by each of the kv_copies GPUs holding a copy (kv_head_copies); the embedding and head stay bf16
    below 16 bits (KEPT_16_BIT), their math too."""
    split = shards if op.kind in TP_SHARDED_KINDS else 1
    bytes_per_element = as_precision(precision).bytes_per_element
    kept = op.weight in KEPT_16_BIT and bytes_per_element < 2
    operands = serving_precision(precision) if op.kind == "attention" else "bf16" if kept else precision
    compute_s = op.flops / split / achieved_flops_per_s(gpu, operands)
    copied = (kv_copies - 1) * op.weight_bytes if op.weight and op.weight.endswith(KV_PROJECTIONS) else 0.0
    widened = op.weight_bytes * (2 / bytes_per_element - 1) if kept else 0.0
    if op.name.endswith(IN_ATTENTION_KERNEL):
        return compute_s
    moved = op.bytes_total + (kv_reads - 1) * op.kv_read_bytes + copied + widened
    memory_s = moved / split / (gpu.hbm_bandwidth_bytes_per_s * MEMORY_EFFICIENCY)
    return max(compute_s, memory_s) + (0.0 if op.kind in FUSED_KINDS else KERNEL_OVERHEAD_S)


def served_ops(spec: ModelSpec, phase: str, seq_len: int, batch: int, precision: str, queries: int = 1) -> list:
    """graph.lower's ops as a serving stack keeps its formats: weights at `precision`, the KV cache and
    activations at serving_precision (never below 8 bits, as the LPU keeps them)."""
    served = serving_precision(precision)
    return lower(spec, phase, seq_len=seq_len, batch=batch, precision=precision, kv_precision=served,
                 act_precision=served, queries=queries)


def gpu_decode_ops(spec: ModelSpec, seq_len: int, batch: int, precision: str, queries: int = 1) -> list:
    """One decode step's ops at `seq_len` as a GPU runs them (served_ops): on a chunked layer (Llama 4) attention
    reads and attends the keys of the current chunk alone, where the lowering takes the layer's whole ring (the
    LPU's static schedule serves every position up to seq_len with one step)."""
    out = []
    for op in served_ops(spec, "decode", seq_len, batch, precision, queries):
        chunk = spec.layer_chunk(op.layer) if op.kind == "attention" and op.layer >= 0 else None
        ring = spec.layer_positions(op.layer, seq_len) if chunk else 0
        if chunk and ring > (keys := attended_keys(seq_len, None, "decode", chunk=chunk)):
            op = dataclasses.replace(op, kv_read_bytes=op.kv_read_bytes * keys / ring, flops=op.flops * keys / ring)
        out.append(op)
    return out


def paced_decode_s(gpu_step_s: float, requests: int, software: str) -> float:
    """A decode step's wall time: the GPU's, or the host loop's over the `requests` in flight when the
    software has one (Software.host_loop) and it takes longer; it prepares the next step meanwhile."""
    return max(gpu_step_s, requests * HOST_S_PER_REQUEST) if software_named(software).host_loop else gpu_step_s


def allreduce_s(n_bytes: float, gpu: GpuSpec, ranks: int) -> float:
    """Ring all-reduce: each rank sends and receives 2 (n-1)/n of the buffer over NVLink, at the bus
    bandwidth all-reduces reach (ALLREDUCE_BANDWIDTH_EFFICIENCY of the links' one-way rate)."""
    if ranks == 1:
        return 0.0
    bus_bytes_per_s = gpu.nvlink_bandwidth_bytes_per_s * ALLREDUCE_BANDWIDTH_EFFICIENCY
    return ALLREDUCE_LATENCY_S + 2 * (ranks - 1) / ranks * n_bytes / bus_bytes_per_s


def step_s(spec: ModelSpec, ops, gpu: GpuSpec, precision: str, tp: int, stages: int,
           tokens: int, software: str = DEFAULT_SOFTWARE) -> float:
    """Wall time of one pass over `ops` (one decode step, or one prefill) on tp x stages GPUs. A KV head
    copied onto several GPUs of the group (kv_head_copies) is read by each of them, its projections too."""
    copies = kv_head_copies(spec, tp)
    kv_reads = max(kv_reads_per_kv_head(spec, software), copies)
    compute = sum(op_time_s(op, gpu, precision, tp, kv_reads, copies) for op in ops)
    comms = spec.n_layers * ALLREDUCES_PER_LAYER * allreduce_s(tokens * spec.d_model * ACTIVATION_BYTES,
                                                               gpu, tp)
    return compute + comms + moe_dispatch_s(spec, tokens) + (stages - 1) * PIPELINE_HOP_S


def micro_batches(sequences: int, stages: int) -> tuple[int, int]:
    """(micro-batches, sequences in each) of `sequences` in a pipeline of `stages`: one per stage (fewer with fewer
    sequences), each stage working on one while the others work on theirs (vLLM's virtual engines, TensorRT-LLM's
    pipeline micro-batches). A sequence's next token waits for its micro-batch to pass every stage, so a decode
    step's period is one micro-batch's pass, and a pipeline adds throughput as a replica would."""
    count = min(sequences, stages)
    return count, -(-sequences // count)


def pipelined_s(step: float, count: int, stages: int) -> float:
    """Wall time for `count` micro-batches to pass once through `stages` even stages, each micro-batch's pass
    taking `step`: the last enters after count - 1 stage times, then passes."""
    return step * (count + stages - 1) / stages


def moe_dispatch_s(spec: ModelSpec, tokens: int) -> float:
    """What serving a pass of `tokens` through the MoE layers costs beyond their experts' roofline:
    MOE_S_PER_TOKEN per token and MoE layer, on every GPU of a TP group, as each routes all the tokens."""
    return tokens * sum(map(spec.is_moe_layer, range(spec.n_layers))) * MOE_S_PER_TOKEN


# The embedding table and the head stay bf16 in quantized checkpoints: TensorRT-LLM's quantize_and_export
# leaves the head unquantized by default (quantize_lm_head=False, nvidia.github.io/TensorRT-LLM/python-api/
# tensorrt_llm.quantization.html), and an embedding is no Linear layer for the quantizers to replace.
KEPT_16_BIT = ("token_embd.weight", "output.weight")


def weight_bytes(spec: ModelSpec, precision: str) -> float:
    """Every weight held once across the GPUs (all experts of an MoE model); below 16 bits, the embedding
    and head in bf16 (KEPT_16_BIT)."""
    bytes_per_element = as_precision(precision).bytes_per_element
    shapes = spec.tensor_shapes() if bytes_per_element < 2 else {}
    kept = sum(math.prod(shapes[name]) for name in KEPT_16_BIT if name in shapes)
    return (spec.param_count() - kept) * bytes_per_element + kept * 2


KV_PROJECTIONS = ("attn_k.weight", "attn_v.weight")  # what a TP group wider than the KV heads holds in copies


def kv_head_copies(spec: ModelSpec, tp: int) -> int:
    """GPUs of a TP group holding each KV head: a group wider than the model's KV heads gives each GPU one
    head, copied onto tp / n_kv_heads of them with its K/V projections and its share of the cache (vLLM:
    QKVParallelLinear's num_kv_head_replicas, vllm/model_executor/layers/linear.py), as the LPU's groups
    copy it (ModelSpec.splits_heads)."""
    return max(1, tp // spec.n_kv_heads)


def held_bytes(spec: ModelSpec, precision: str, context: int, users: int, tp: int) -> tuple[float, float]:
    """(weights, KV cache of `users` sequences) that GPUs in TP groups of `tp` hold in all: each byte once, but
    the KV heads and their projections as many times as kv_head_copies."""
    copies, weights = kv_head_copies(spec, tp), weight_bytes(spec, precision)
    if copies > 1:  # the tensors walked only where some are copied (gpus_needed asks at every count it tries)
        projections = sum(math.prod(shape) for name, shape in spec.tensor_shapes().items()
                          if name.endswith(KV_PROJECTIONS))
        weights += (copies - 1) * projections * as_precision(precision).bytes_per_element
    return weights, copies * kv_bytes(spec, precision, context, users)


def kv_bytes(spec: ModelSpec, precision: str, context: int, users: int) -> float:
    """KV cache for `users` sequences of `context` tokens, in serving_precision(precision). A sliding-window
    or chunked layer keeps its window or chunk only, as TensorRT-LLM (a list of per-layer attention windows,
    KvCacheConfig.max_attention_window) and vLLM (its hybrid KV cache manager) keep them."""
    return spec.kv_values(context) * as_precision(serving_precision(precision)).bytes_per_element * users


def tp_choices(spec: ModelSpec, gpus: int, gpu: GpuSpec) -> list[int]:
    """TP widths `gpus` GPUs can take, widest first: inside one NVLink server (a group never straddles two),
    dividing the GPUs, splitting the attention heads (ModelSpec.splits_heads), in no more pipeline stages than
    the model has layers (a stage holds one at least); the widest of them where none is."""
    per_server = gpu.gpus_per_server
    widths = [t for t in range(min(gpus, per_server), 0, -1)
              if gpus % t == 0 and (gpus <= per_server or per_server % t == 0) and spec.splits_heads(t)]
    return [t for t in widths if gpus // t <= spec.n_layers] or widths[:1]


def layout(spec: ModelSpec, gpus: int, gpu: GpuSpec, holds: Callable[[int], bool] | None = None) -> tuple[int, int]:
    """(tensor parallel, pipeline stages): TP as wide as tp_choices allows, or, given `holds` (whether groups of a
    width hold what they must), the widest that holds it; its groups in a pipeline. A group wider than the KV
    heads holds copies of them and their cache (kv_head_copies), so a narrower one can hold more users on the
    same GPUs."""
    widths = tp_choices(spec, gpus, gpu)
    tp = next((t for t in widths if holds(t)), widths[0]) if holds else widths[0]
    return tp, gpus // tp


def _check_sizes(**sizes: int) -> None:
    for what, v in sizes.items():
        check_count(v, what)


def check_gpu_count(gpu: GpuSpec, gpus: int) -> None:
    """Refuse a GPU count that is not a positive integer, or that fills servers in part beyond the first."""
    per_server = gpu.gpus_per_server
    check_count(gpus, "the GPU count")
    if gpus > per_server and gpus % per_server:
        raise OpenLPUError(f"{gpus} {gpu.name} GPUs do not fill whole servers of {per_server}; use at most "
                           f"{per_server}, or a multiple of {per_server}")


def _checked_count(spec: ModelSpec, gpu: GpuSpec, precision: str, gpus: int) -> int:
    """A GPU count a layout can use whole, whose HBM holds the weights."""
    check_gpu_count(gpu, gpus)
    per_gpu = gpu.hbm_bytes * HBM_USABLE_FRACTION
    tp, stages = layout(spec, gpus, gpu, lambda t: held_bytes(spec, precision, 1, 0, t)[0] <= gpus * per_gpu)
    if stages > spec.n_layers:  # a pipeline stage holds at least one layer
        raise OpenLPUError(f"{gpus:,} {gpu.name} GPUs make {stages:,} pipeline stages of TP {tp}, more than "
                           f"{spec.name}'s {spec.n_layers} layers; use at most {spec.n_layers * tp:,}")
    weights, _ = held_bytes(spec, precision, 1, 0, tp)
    if weights > gpus * per_gpu:
        raise OpenLPUError(f"{gpus} x {gpu.name} cannot hold {spec.name}'s {weights / 1e9:.1f} GB of {precision} "
                           f"weights; it needs at least {gpus_needed(spec, gpu, precision, 1, 1)} GPUs")
    return gpus


def _draft_bytes(draft: ModelSpec | None, gpu: GpuSpec, precision: str, context: int, users: int, gpus: int) -> float:
    """What a draft sharing `gpus` GPUs holds there, in its widest groups (none without a draft)."""
    return sum(held_bytes(draft, precision, context, users, layout(draft, gpus, gpu)[0])) if draft else 0.0


def gpus_needed(spec: ModelSpec, gpu: GpuSpec, precision: str, context: int, users: int,
                max_gpus: int = 1024, beside: ModelSpec | None = None) -> int:
    """Fewest GPUs (1, 2, 4 ... up to a server's, then whole servers) whose HBM holds the weights and the KV
    cache in TP groups of some width they can take (held_bytes), and those of `beside` (a draft sharing the
    GPUs, in its widest groups); at most `max_gpus`, in no more pipeline stages than the model has layers."""
    def need(n: int) -> float:  # in the TP groups that hold the least
        return _draft_bytes(beside, gpu, precision, context, users, n) + min(
            sum(held_bytes(spec, precision, context, users, t)) for t in tp_choices(spec, n, gpu))

    per_gpu = gpu.hbm_bytes * HBM_USABLE_FRACTION
    n = 1
    while n * per_gpu < need(n):
        n = min(2 * n, gpu.gpus_per_server) if n < gpu.gpus_per_server else n + gpu.gpus_per_server
        if n > max_gpus or layout(spec, n, gpu)[1] > spec.n_layers:
            raise OpenLPUError(
                f"{spec.name} at {precision} with {counted(users, 'user')} x {context} tokens needs "
                f"{need(n) / 1e9:,.0f} GB: "
                f"more than {gpu.name} GPUs hold, at most {max_gpus} of them in at most {spec.n_layers} pipeline "
                f"stages (a layer each); lower --context or --users")
    return n


def gpu_timing(spec: ModelSpec, gpu: GpuSpec, precision: str, context: int, users: int = 1,
               gpus: int | None = None, prompt_tokens: int | None = None,
               software: str = DEFAULT_SOFTWARE, queries: int = 1, decode_context: int | None = None,
               beside: ModelSpec | None = None) -> GpuTiming:
    """Serve `users` concurrent streams of `context` tokens on `gpus` GPUs (default: fewest that fit).
    Each decode step brings `queries` new tokens per user (more than one: a speculating step verifying
    drafts; its token rates then count steps, which sim.speculative turns into tokens) and attends
    `decode_context` of the `context` tokens each user holds (None: all of them). The TP width leaves room for
    `beside` (a draft sharing the GPUs, in its widest groups), which the caller times and checks."""
    prompt_tokens = context if prompt_tokens is None else prompt_tokens
    decode_context = context if decode_context is None else decode_context
    _check_sizes(context=context, users=users, prompt_tokens=prompt_tokens, decode_context=decode_context)
    if decode_context > context:
        raise OpenLPUError(f"decode context {decode_context} is longer than the context {context}: a decode step "
                           f"attends at most the tokens each user holds; lower it or raise the context")
    gpus = gpus_needed(spec, gpu, precision, context, users) if gpus is None else _checked_count(
        spec, gpu, precision, gpus)
    per_gpu = gpu.hbm_bytes * HBM_USABLE_FRACTION
    draft = _draft_bytes(beside, gpu, precision, context, users, gpus)

    def most_users(t: int, room: float) -> int:  # whose KV cache `room` bytes hold beside the weights, in groups of t
        weights, kv_per_user = held_bytes(spec, precision, context, 1, t)
        return max(0, int((room - weights) // kv_per_user))

    tp, stages = layout(spec, gpus, gpu, lambda t: most_users(t, gpus * per_gpu - draft) >= users)
    weights, kv_per_user = held_bytes(spec, precision, context, 1, tp)
    w_bytes, kv = weights / gpus, kv_per_user / gpus
    max_users = most_users(tp, gpus * per_gpu)
    if users > max_users:
        most = max(most_users(t, gpus * per_gpu) for t in tp_choices(spec, gpus, gpu))  # in any width
        raise OpenLPUError(
            f"{gpus} x {gpu.name} hold the KV cache of at most {counted(most, 'user')} at context "
            f"{context}, not {users}; add GPUs or lower --users / --context")

    _, batch = micro_batches(users, stages)
    decode_ops = gpu_decode_ops(spec, decode_context, batch, precision, queries)
    prefill_ops = served_ops(spec, "prefill", prompt_tokens, 1, precision)
    decode = paced_decode_s(step_s(spec, decode_ops, gpu, precision, tp, stages, batch * queries, software), users,
                            software)
    ttft = step_s(spec, prefill_ops, gpu, precision, tp, stages, prompt_tokens, software)
    power = gpu_servers(gpu, gpus) * gpu.server_power_w * LOAD_POWER_FRACTION
    throughput = users / decode
    return GpuTiming(
        gpu=gpu.name, gpus=gpus, tensor_parallel=tp, pipeline_stages=stages, users=users,
        context=context, weight_bytes_per_gpu=w_bytes, kv_bytes_per_gpu=kv * users,
        hbm_used_fraction=(w_bytes + kv * users) / gpu.hbm_bytes, max_users=max_users, micro_batch=batch,
        ttft_s=ttft, decode_step_s=decode, tokens_per_s_per_user=1 / decode,
        throughput_tokens_per_s=throughput, power_w=power, energy_per_token_j=power / throughput)


def offline_steps_s(spec: ModelSpec, gpu: GpuSpec, precision: str, gpus: int, batch: int, input_tokens: int,
                    output_tokens: int, software: str = DEFAULT_SOFTWARE) -> tuple[float, float]:
    """(prefill of `batch` prompts, one decode step on the GPU alone, attending input + output/2 cached
    tokens on average) of offline_run_s's static batch, in micro-batches through a pipeline's stages."""
    _check_sizes(input_tokens=input_tokens, batch=batch, output_tokens=output_tokens)
    tp, stages = layout(spec, _checked_count(spec, gpu, precision, gpus), gpu)
    count, each = micro_batches(batch, stages)
    prefill = served_ops(spec, "prefill", input_tokens, each, precision)
    decode = gpu_decode_ops(spec, input_tokens + output_tokens // 2, each, precision)
    return (pipelined_s(step_s(spec, prefill, gpu, precision, tp, stages, each * input_tokens, software), count, stages),
            step_s(spec, decode, gpu, precision, tp, stages, each, software))


def offline_run_s(spec: ModelSpec, gpu: GpuSpec, precision: str, gpus: int, batch: int,
                  input_tokens: int, output_tokens: int, software: str = DEFAULT_SOFTWARE) -> float:
    """Wall time of one static batch: prefill `batch` prompts, then `output_tokens` decode steps, each
    paced by the GPU or the software's host loop (paced_decode_s): the offline throughput benchmark of
    TensorRT-LLM's published tables."""
    prefill, decode = offline_steps_s(spec, gpu, precision, gpus, batch, input_tokens, output_tokens, software)
    return prefill + output_tokens * paced_decode_s(decode, batch, software)
