"""Executor overhead on the embedded Gemma 3 270M, one user decoding with the KV cache: the fused
path (what the Engine and the server run) against model.py's plain forward in the engine's
precision, and the sharded path (float32) per chip count against the fused path in float32.

    python bench/executor_overhead.py [--steps 16] [--repeats 5] [--threads N] [--precision int4]

Writes bench/results/executor_overhead.md and .json. Plain and fused alternate within each repeat
(the machine's 2 cores are shared, so load changes between runs); the figure kept per engine is the
median over repeats of the median decode step, and the speed ratio is the median of the per-repeat
ratios (each pair ran back to back, under the same load). Target: fused speed / plain speed >= 0.95.
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import platform
import statistics
import sys
import time
from pathlib import Path

import torch

from openlpu.compiler import Workload, compile_program
from openlpu.hardware.lpu import load_system
from openlpu.models.embedded import default_model_path
from openlpu.models.gguf import load_weights, spec_from_gguf
from openlpu.runtime.engine import DEFAULT_PRECISION
from openlpu.runtime.executor import Executor
from openlpu.runtime.kv_cache import KVCache
from openlpu.runtime.model import GGUFWeights, Model, Span

RESULTS = Path(__file__).parent / "results"
PROMPT = [2, 818, 5279, 529, 7001, 563]  # "The capital of France is" (tests/fixtures/gemma-3-270m-llamacpp.json)
TARGET_RATIO = 0.95
SHARDED_CHIPS = (1, 2, 4, 8)


def decode_step_s(engine, cache, steps: int) -> float:
    """Median seconds of one greedy decode step after a prefill of PROMPT."""
    slot = cache.allocate()
    token = int(engine.forward(PROMPT, [Span(slot, 0, len(PROMPT))], cache, [len(PROMPT) - 1])[-1].argmax())
    times = []
    for k in range(steps):
        t = time.perf_counter()
        token = int(engine.forward([token], [Span(slot, len(PROMPT) + k, 1)], cache)[-1].argmax())
        times.append(time.perf_counter() - t)
    cache.release(slot)
    return statistics.median(times)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--steps", type=int, default=16)
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--threads", type=int, default=torch.get_num_threads(),
                    help="torch threads (1 is steadier while other work shares the cores)")
    ap.add_argument("--precision", default=DEFAULT_PRECISION, help="plain and fused weights (the engine's)")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    load_before = os.getloadavg()
    path = default_model_path()
    spec = spec_from_gguf(path)
    capacity = len(PROMPT) + args.steps + 1
    lpu = load_system("lpu-v1")
    workload = Workload(weights="int4", context_length=64, prompt_len=len(PROMPT), prefill_chunk=len(PROMPT))
    program = compile_program(spec, lpu, workload, 1)

    lazy = GGUFWeights(path, spec)  # the engine's loading: one tensor at a time
    plain = Model(spec, lazy, args.precision, max_positions=capacity)
    fused = Executor(program, spec, lazy, "fused", args.precision, max_positions=capacity)
    runs = {"plain": [], "fused": []}
    for _ in range(args.repeats):  # alternate, so both see the same load
        runs["plain"].append(decode_step_s(plain, KVCache(spec, 1, capacity), args.steps))
        runs["fused"].append(decode_step_s(fused, fused.new_cache(1, capacity), args.steps))
    del plain, fused
    weights = load_weights(path, spec)
    reference = Executor(program, spec, weights, "fused")  # float32, the sharded path's numbers
    reference_s = statistics.median(decode_step_s(reference, reference.new_cache(1, capacity), args.steps)
                                    for _ in range(max(1, args.repeats // 2)))
    del reference
    sharded = {}
    for chips in SHARDED_CHIPS:
        program = compile_program(spec, lpu, workload, chips)
        ex = Executor(program, spec, weights, "sharded")
        times = [decode_step_s(ex, ex.new_cache(1, capacity), args.steps) for _ in range(max(1, args.repeats // 2))]
        sharded[chips] = {"tp": program.placement.tp, "stages": len(program.placement.stages),
                          "step_s": statistics.median(times), "runs_s": times}
        del ex
    load_after = os.getloadavg()

    plain_s, fused_s = statistics.median(runs["plain"]), statistics.median(runs["fused"])
    ratio = statistics.median(p / f for p, f in zip(runs["plain"], runs["fused"]))  # paired: same load
    result = {
        "command": "python bench/executor_overhead.py " + " ".join(sys.argv[1:]),
        "date_utc": datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d %H:%M UTC"),
        "machine": f"{platform.processor() or platform.machine()}, {os.cpu_count()} cores, torch "
                   f"{torch.__version__} ({torch.get_num_threads()} threads), Python {platform.python_version()}",
        "load_average_before_after": [round(load_before[0], 2), round(load_after[0], 2)],
        "model": spec.name, "precision": args.precision, "prompt_tokens": len(PROMPT), "decode_steps": args.steps,
        "repeats": args.repeats,
        "plain_step_s": plain_s, "fused_step_s": fused_s, "plain_runs_s": runs["plain"],
        "fused_runs_s": runs["fused"], "fused_speed_ratio": ratio, "target_ratio": TARGET_RATIO,
        "fused_float32_step_s": reference_s, "sharded": {str(k): v for k, v in sharded.items()},
    }
    RESULTS.mkdir(exist_ok=True)
    (RESULTS / "executor_overhead.json").write_text(json.dumps(result, indent=2) + "\n")
    (RESULTS / "executor_overhead.md").write_text(report(result))
    print(report(result))


def report(r: dict) -> str:
    ms = lambda s: f"{s * 1e3:.1f}"  # noqa: E731
    verdict = "meets" if r["fused_speed_ratio"] >= r["target_ratio"] else "misses"
    lines = [
        "# Executor overhead",
        "",
        f"Generated by `{r['command'].strip()}` on {r['date_utc']}.",
        f"Machine: {r['machine']}. Load average (1 min) before / after: "
        f"{r['load_average_before_after'][0]} / {r['load_average_before_after'][1]} (the 2 cores are shared "
        "with other work, so absolute times move between runs; plain and fused alternate within each repeat).",
        "",
        f"{r['model']}, one user: a {r['prompt_tokens']}-token prefill, then the median of "
        f"{r['decode_steps']} greedy decode steps; median over {r['repeats']} repeats.",
        "",
        f"## Fused path vs model.py's plain forward ({r['precision']} weights, the engine's)",
        "",
        "| engine | decode step (ms) | runs (ms) |",
        "|---|---|---|",
        f"| model.py Model.forward | {ms(r['plain_step_s'])} | {', '.join(ms(x) for x in r['plain_runs_s'])} |",
        f"| executor, fused | {ms(r['fused_step_s'])} | {', '.join(ms(x) for x in r['fused_runs_s'])} |",
        "",
        f"Fused speed / plain speed, median of the per-repeat ratios = **{r['fused_speed_ratio']:.3f}** "
        f"(target >= {r['target_ratio']}: "
        f"{verdict} it).",
        "",
        "## Sharded path, float32 (virtual chips run one after another on this host)",
        "",
        f"Against the fused path in float32: {ms(r['fused_float32_step_s'])} ms per decode step.",
        "",
        "| chips | TP x stages | decode step (ms) | step / fused float32 step | per chip (ms) |",
        "|---|---|---|---|---|",
    ]
    for chips, v in r["sharded"].items():
        lines.append(f"| {chips} | {v['tp']} x {v['stages']} | {ms(v['step_s'])} | "
                     f"{v['step_s'] / r['fused_float32_step_s']:.2f}x | {ms(v['step_s'] / int(chips))} |")
    lines += ["", "The sharded path is a correctness tool, not a speed path: every chip's shard runs in turn "
              "on the same cores, and each all-reduce and send is a host copy.", ""]
    return "\n".join(lines)


if __name__ == "__main__":
    main()
