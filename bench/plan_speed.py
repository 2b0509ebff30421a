"""How fast the LPU compiler plans: compile + verify + timing for Llama 3 8B / 70B / 405B on lpu-v1.

Each model runs in its own process so the peak resident memory (ru_maxrss) is its own. Writes
bench/results/plan_speed.md and .json. Usage: python bench/plan_speed.py [--repeat N]
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import platform
import resource
import subprocess
import sys
import time
from pathlib import Path

# (model, chips): None = as few as fit; 576 = Groq's 70B deployment; 8192 chips for 405B: TP 16 x 512
# stages, every MLP cut in four (its 128k-vocabulary head needs TP 16)
MODELS = (("llama-3.1-8b", None), ("llama-3.3-70b", None), ("llama-3.3-70b", 576), ("llama-3.1-405b", None),
          ("llama-3.1-405b", 8192))
RESULTS = Path(__file__).parent / "results"
WORKLOAD = dict(context_length=4096, prompt_len=512, users=1)
TARGET_S = 2.0  # OpenLPU issue 3: a 70B plan on the full chip count in under 2 s


def measure(model: str, chips: int | None, repeat: int) -> dict:
    """Runs in the child: best-of-`repeat` wall time of each step."""
    from openlpu.compiler import Workload, compile_program, verify
    from openlpu.hardware.lpu import load_system
    from openlpu.models.spec import load_preset
    from openlpu.sim.timing import timing

    spec, system, workload = load_preset(model), load_system("lpu-v1"), Workload(**WORKLOAD)
    best = {"compile_s": float("inf"), "verify_s": float("inf"), "timing_s": float("inf")}
    for _ in range(repeat):
        t0 = time.perf_counter()
        program = compile_program(spec, system, workload, chips)
        t1 = time.perf_counter()
        violations = verify(program)
        t2 = time.perf_counter()
        t = timing(program)
        t3 = time.perf_counter()
        for key, dt in (("compile_s", t1 - t0), ("verify_s", t2 - t1), ("timing_s", t3 - t2)):
            best[key] = min(best[key], dt)
    return {"model": model, **best, "total_s": sum(best.values()), "chips": t.chips, "stages": t.stages,
            "tp": t.tp, "ops": len(program.decode.ops) + len(program.prefill.ops),
            "transfers": len(program.decode.transfers) + len(program.prefill.transfers),
            "shards": len(program.placement.shards), "program_bytes": len(program_bytes(program)),
            "violations": len(violations), "peak_rss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024}


def program_bytes(program) -> bytes:
    from openlpu.compiler.program import encode

    return encode(program)


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--repeat", type=int, default=3)
    ap.add_argument("--child", help=argparse.SUPPRESS)
    ap.add_argument("--chips", type=int, default=None, help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.child:
        print(json.dumps(measure(args.child, args.chips, args.repeat)))
        return
    from openlpu.models.spec import preset_names

    rows = []
    for model, chips in MODELS:
        if model not in preset_names():
            print(f"skipping {model}: no preset", file=sys.stderr)
            continue
        extra = ["--chips", str(chips)] if chips else []
        out = subprocess.run([sys.executable, __file__, "--child", model, "--repeat", str(args.repeat), *extra],
                             capture_output=True, text=True, check=True)
        rows.append(json.loads(out.stdout))
        print(rows[-1])
    machine = f"{platform.platform()}, {os.cpu_count()} CPUs, Python {platform.python_version()}"
    date, load = datetime.date.today().isoformat(), os.getloadavg()[0]  # other jobs on the CPUs slow the run
    RESULTS.mkdir(exist_ok=True)
    (RESULTS / "plan_speed.json").write_text(json.dumps({"machine": machine, "date": date, "load_average_1min": load,
                                                         "workload": WORKLOAD, "rows": rows}, indent=1) + "\n")
    lines = [
        "# LPU plan speed (compile + verify + timing)", "",
        f"Command: `python bench/plan_speed.py --repeat {args.repeat}` (best of {args.repeat}; each model in its "
        f"own process; peak RSS includes the Python interpreter and imports).",
        f"Machine: {machine}; run {date}, load average {load:.1f} when it ended. System lpu-v1, int8, context "
        f"{WORKLOAD['context_length']}, prompt {WORKLOAD['prompt_len']}, {WORKLOAD['users']} user; as few chips as "
        f"fit unless a chip count is given.", "",
        "| model | chips | stages x TP | ops | transfers | shards | program file | compile s | verify s | "
        "timing s | total s | peak RSS MB | violations |",
        "|---|---|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for r in rows:
        lines.append(f"| {r['model']} | {r['chips']} | {r['stages']} x {r['tp']} | {r['ops']} | {r['transfers']} | "
                     f"{r['shards']} | {r['program_bytes'] / 1e3:.0f} kB | {r['compile_s']:.2f} | {r['verify_s']:.2f} | "
                     f"{r['timing_s']:.3f} | {r['total_s']:.2f} | {r['peak_rss_mb']:.0f} | {r['violations']} |")
    worst_70b = max(r["total_s"] for r in rows if r["model"] == "llama-3.3-70b")
    lines += ["", f"Plan-speed target: a 70B plan in under {TARGET_S:.0f} s: "
                  f"{'met' if worst_70b < TARGET_S else 'NOT met'} (slowest 70B row {worst_70b:.2f} s)."]
    (RESULTS / "plan_speed.md").write_text("\n".join(lines) + "\n")


if __name__ == "__main__":
    main()
