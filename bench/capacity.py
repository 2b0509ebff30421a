"""What serving a model takes as its users grow: the LPU system next to GPUs, read off `openlpu plan`.

The capacity critique of SRAM-only chips in numbers: chips, per-user speed, system throughput, power
and $ per million tokens for 1 to 256 users in flight, each row from a compiled, verified Program on
lpu-v1 and the GPU model on H100 and B200 (the fewest of each that hold the workload; int8; the
default cost assumptions of `openlpu plan`). The 8B model is also planned at the 131,072-token window
GroqCloud's documentation lists llama-3.1-8b-instant with (its model catalogue, 2025), where the users'
K and V, not the weights, set the chip count: with decode steps attending the whole window, and attending
2,048 tokens, as requests that short run on a deployment keeping a Program per length (`--decode-context`).
The 70B model is planned decoding speculatively with a 1B
draft, at an acceptance rate assumed, not measured (`openlpu plan --draft`), and gpt-oss-120b, the MoE
GroqCloud serves now, Llama 4 Scout (16 experts, one per token, beside a shared expert), and Llama 4
Maverick (128 experts in every second layer: 401B weights, which lpu-v1 holds only by cutting its MoE layers
by expert rows, a run of experts on each chip), all of whose every expert the LPU's static schedule
installs at each step. The 70B model is also planned at every TP width that places it, each on its fewest
chips (`openlpu plan --tp all`): the fewest chips in all are not the cheapest per token.
A simulation,
not a measurement: how far the two models are from published figures is bench/results/fidelity.md.
Writes bench/results/capacity.md and .json.
Usage: python bench/capacity.py
"""

from __future__ import annotations

import argparse
import datetime
import json
import platform
import sys
from dataclasses import dataclass
from pathlib import Path

from openlpu.errors import OpenLPUError
from openlpu.sim.cost import CostAssumptions
from openlpu.sim.plan import plan

RESULTS = Path(__file__).parent / "results"


@dataclass(frozen=True)
class Case:
    model: str
    context: int  # tokens of context each user holds
    decode_context: int | None = None  # tokens each decode step attends (None: all of them)
    speculation: tuple | None = None  # (draft, draft tokens per round, assumed acceptance)


MODELS = (Case("llama-3.1-8b", 8192), Case("llama-3.1-8b", 131072), Case("llama-3.1-8b", 131072, decode_context=2048),
          Case("llama-3.3-70b", 8192), Case("llama-3.3-70b", 8192, speculation=("llama-3.2-1b", 4, 0.8)),
          Case("gpt-oss-120b", 8192), Case("llama-4-scout", 8192), Case("llama-4-maverick", 8192))
USERS = (1, 4, 16, 64, 256)
GPUS = ("h100-sxm", "b200")
BY_WIDTH = Case("llama-3.3-70b", 8192)  # planned at every TP width, for BY_WIDTH_USERS
BY_WIDTH_USERS = (1, 16, 64, 256)


def measure(case: Case, users: int) -> dict:
    """The plan's rows by system for one workload; a system that cannot hold it gets its error."""
    draft = dict(zip(("draft", "draft_tokens", "acceptance"), case.speculation or ()))
    out = {}
    for system, compare in (("lpu-v1", ()), *(("", (gpu,)) for gpu in GPUS)):
        try:
            row, = plan(case.model, system=system, compare=compare, context=case.context, users=users,
                        decode_context=case.decode_context, **draft)
            out[row.system] = row.to_dict()
        except OpenLPUError as e:
            out[system or compare[0]] = {"error": str(e)}
    return out


def by_width(case: Case, users: int) -> list[dict]:
    """The LPU's rows at every TP width that places the workload, each on its fewest chips."""
    return [row.to_dict() for row in plan(case.model, compare=(), context=case.context, users=users, tp="all")]


def width_lines(rows: list[dict], h100: dict[int, dict]) -> list[str]:
    """A row per user count and TP width; the last column compares its $ per Mtok with the H100's for as many
    users (the table above)."""
    lines = ["| users | chips | stages x TP | users per step | tok/s per user | tok/s | $/Mtok | / H100 $ per Mtok |",
             "|---|---|---|---|---|---|---|---|"]
    for r in rows:
        cheapest = min(w["usd_per_million_tokens"] for w in rows if w["users"] == r["users"])
        usd = f"{r['usd_per_million_tokens']:,.2f}" + (" (least)" if r["usd_per_million_tokens"] == cheapest else "")
        lines.append(f"| {r['users']} | {r['chips']:,} | {r['layout']} | {r['users_per_step']} | "
                     f"{r['tokens_per_s_per_user']:,.0f} | {r['throughput_tokens_per_s']:,.0f} | {usd} | "
                     f"{r['usd_per_million_tokens'] / h100[r['users']]['usd_per_million_tokens']:.1f}x |")
    return lines


def cells(row: dict) -> str:
    if "error" in row:
        return "does not fit | | | |"
    return (f"{row['chips']:,} ({row['layout']}, {row['users_per_step']} per step) | "
            f"{row['tokens_per_s_per_user']:,.0f} | "
            f"{row['throughput_tokens_per_s']:,.0f} | {row['usd_per_million_tokens']:,.2f} |")


def main() -> int:
    argparse.ArgumentParser(description=__doc__.split("\n\n")[0]).parse_args()  # --help, before minutes of work
    results = [{"model": c.model, "context": c.context, "decode_context": c.decode_context, "speculation": c.speculation,
                "users": u, "systems": measure(c, u)} for c in MODELS for u in USERS]
    widths = [{"users": u, **row} for u in BY_WIDTH_USERS for row in by_width(BY_WIDTH, u)]
    a = CostAssumptions()
    RESULTS.mkdir(exist_ok=True)
    date = datetime.date.today().isoformat()
    (RESULTS / "capacity.json").write_text(json.dumps(
        {"command": "python bench/capacity.py", "date": date, "machine": f"{platform.node()} ({platform.machine()}, "
         f"Python {platform.python_version()})", "cost_assumptions": a.__dict__, "rows": results,
         "by_width": {"model": BY_WIDTH.model, "context": BY_WIDTH.context, "rows": widths}},
        indent=1) + "\n")
    systems = ("lpu-v1", *GPUS)
    head = " | ".join(f"{s}: chips (stages x TP, users per step) | tok/s per user | tok/s | $/Mtok" for s in systems)
    about = (f"Generated by `python bench/capacity.py` on {platform.node()} (Python {platform.python_version()}), "
             f"{date}. Every figure is simulated: the LPU's read off a compiled, verified Program, the GPUs' from "
             f"the roofline model with GQA decode kernels, which read each KV head once per group as current "
             f"engines do (bench/results/fidelity.md gives both models' errors against published speeds, "
             f"TensorRT-LLM 1.0's throughput table among them). "
             f"int8 weights, activations and KV; the fewest chips or GPUs that hold the weights and every user's "
             f"KV cache; $ per million tokens: capex over {a.years:g} years plus power at ${a.usd_per_kwh:.2f}/kWh "
             f"(PUE {a.pue:g}), serving {a.utilisation:.0%} of the hours at the throughput shown.")
    lines = ["# Capacity: what serving takes as users grow (LPU vs GPUs)", "", about, ""]
    for case in MODELS:
        sp = case.speculation
        drafting = "" if sp is None else (
            f", decoding speculatively: {sp[0]} drafts {sp[1]} tokens a round, each accepted with "
            f"chance {sp[2]:g} (assumed; the LPU runs the draft on chips of its own)")
        if case.decode_context:
            drafting += (f", decode steps attending {case.decode_context:,} (requests that short, on a deployment "
                         f"keeping a Program per length)")
        lines += [f"## {case.model}, {case.context:,} tokens of context per user{drafting}", "",
                  f"| users | {head} | LPU / H100 $ per Mtok |",
                  "|---|" + "---|---|---|---|" * len(systems) + "---|"]
        for r in (r for r in results if Case(r["model"], r["context"], r["decode_context"], r["speculation"]) == case):
            lpu, h100 = r["systems"]["lpu-v1"], r["systems"]["h100-sxm"]
            ratio = ("-" if "error" in lpu or "error" in h100
                     else f"{lpu['usd_per_million_tokens'] / h100['usd_per_million_tokens']:.1f}x")
            lines.append(f"| {r['users']} | " + " ".join(cells(r["systems"][s]) for s in systems) + f" {ratio} |")
        lines.append("")
    h100 = {r["users"]: r["systems"]["h100-sxm"] for r in results
            if Case(r["model"], r["context"], r["decode_context"], r["speculation"]) == BY_WIDTH}
    lines += [f"## {BY_WIDTH.model}, {BY_WIDTH.context:,} tokens of context per user: the LPU at every TP width", "",
              ("Each width that places the workload, on its fewest chips (`openlpu plan --tp all`), each with the "
               "prefill chunk that places it best; the tables above place each workload on the fewest chips at the "
               "compiler's width and chunk, where a smaller chunk at that width can take a few chips fewer."), "",
              *width_lines(widths, h100), ""]
    (RESULTS / "capacity.md").write_text("\n".join(lines))
    print("\n".join(lines))
    return 0


if __name__ == "__main__":
    sys.exit(main())
