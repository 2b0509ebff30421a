"""OpenLPU's engine vs llama.cpp on this machine: same GGUF, same 128-token prompt, same threads.

Each engine lives in its own subprocess (a clean peak RSS each), loads once and warms up; then the
driver asks them in turn, ROUNDS times, for one measured run: prefill (the 128-token prompt, up to
the first token) and greedy decode (128 more tokens, one at a time). Only one engine runs at a
time, and the two runs of a round are back to back, so a round's ratio compares them under the
same load (this machine's memory bandwidth is shared with other tenants and moves by tens of
percent within minutes). Reported: each engine's median speeds and the median of the per-round
ratios. Both decode greedily with an argmax over the full logits. OpenLPU runs as `openlpu serve`
does: Engine.load compiles the model for lpu-v1 and executes the Program's fused blocks, in each of the
given precisions: by default int4 (the served one: the file's 4- and 5-bit codes and a 4-bit head) and gguf
(the same codes with an 8-bit head, as llama.cpp reads the embedded file's Q8_0 head), each its own engine.

    python bench/engine_vs_llamacpp.py [--model PATH] [--threads 2] [--precision int4,gguf] [--rounds 7]

Writes bench/results/engine_vs_llamacpp.{json,md}; given another --model, engine_vs_llamacpp-MODEL.{json,md} (its
file name's stem, lower case), beside the embedded model's.
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import platform
import resource
import statistics
import subprocess
import sys
import time
from pathlib import Path

PROMPT_TOKENS = 128
DECODE_TOKENS = 128
RESULTS = Path(__file__).parent / "results"
# A fixed English paragraph; its first 128 token ids (with <bos>) are the prompt for both.
TEXT = ("The history of astronomy spans thousands of years, from the first people who tracked "
        "the motion of the Sun, the Moon and the planets across the sky, to the great "
        "observatories of today that measure the light of galaxies billions of light years "
        "away. Early civilisations in Mesopotamia, Egypt, China and Central America kept "
        "careful records of eclipses and of the rising and setting of bright stars, and used "
        "them to build calendars for farming and religious festivals. Greek philosophers "
        "asked why the heavens moved as they did and proposed models with the Earth at the "
        "centre of nested spheres. Centuries later, Copernicus placed the Sun at the centre, "
        "Kepler found that planets move on ellipses, and Galileo turned a telescope to the "
        "sky and saw the moons of Jupiter, the phases of Venus and countless faint stars.")


def prompt_ids(model_path: str) -> list[int]:
    from openlpu.runtime.tokenizer import Tokenizer

    ids = Tokenizer.from_gguf(model_path).encode(TEXT)
    if len(ids) < PROMPT_TOKENS:
        sys.exit(f"the benchmark text gives only {len(ids)} tokens; need {PROMPT_TOKENS}")
    return ids[:PROMPT_TOKENS]


# ---- workers (one engine per process) -------------------------------------------------------
def openlpu_runner(model_path: str, threads: int, precision: str):
    import torch

    from openlpu.runtime.engine import Engine, SamplingParams

    torch.set_num_threads(threads)
    engine = Engine.load(model_path, precision=precision, max_batch=1,
                         context_length=PROMPT_TOKENS + DECODE_TOKENS + 8)

    def once(prompt, n):
        seq = engine.new_sequence(prompt, SamplingParams(max_tokens=n + 1, temperature=0))
        while not seq.output_ids:  # the prompt, in the Program's prefill chunks
            engine.step([seq])
        t_first = time.perf_counter()
        while not seq.finished:
            engine.step([seq])
        return t_first - seq.t_start, time.perf_counter() - t_first, seq.output_ids
    return once


def llamacpp_runner(model_path: str, threads: int, precision: str):
    import llama_cpp
    import numpy as np
    from llama_cpp import Llama

    llm = Llama(model_path, n_threads=threads, n_threads_batch=threads, n_batch=512,
                n_ctx=PROMPT_TOKENS + DECODE_TOKENS + 8, verbose=False)
    n_vocab = llm.n_vocab()

    def argmax_last() -> int:  # the last position's logits, straight from llama.cpp's buffer
        logits = llama_cpp.llama_get_logits_ith(llm.ctx, -1)
        return int(np.argmax(np.ctypeslib.as_array(logits, shape=(n_vocab,))))

    def once(prompt, n):
        llm.reset()
        t0 = time.perf_counter()
        llm.eval(prompt)
        out = [argmax_last()]
        t_first = time.perf_counter()
        for _ in range(n):
            llm.eval([out[-1]])
            out.append(argmax_last())
        return t_first - t0, time.perf_counter() - t_first, out
    return once


RUNNERS = {"openlpu": openlpu_runner, "llama.cpp": llamacpp_runner}
PRECISION_WORDS = {  # openlpu.runtime.model.PRECISIONS, for the report
    "int4": "the file's 4- and 5-bit codes and a 4-bit head (the served default)",
    "gguf": "the same codes with an 8-bit head, as llama.cpp reads the embedded file's Q8_0 head (the head is most "
            "of a token's bytes)",
    "int8": "int8 blocks and head", "bf16": "bf16 throughout", "float32": "float32 throughout (the reference)"}
PEER = "llama.cpp"


def worker(name: str, model_path: str, threads: int, precision: str) -> None:
    """Load, warm up, then one measured run per line read from stdin, each answered with a JSON line."""
    once = RUNNERS[name](model_path, threads, precision)
    once(list(range(2, 18)), 8)  # warm-up
    ready = {"ready": True}
    if name == "openlpu":
        from openlpu.runtime.kernels import cpu_kernels, kernel_isa

        ready["cpu_kernels"] = f"OpenLPU's {kernel_isa()} kernels" if cpu_kernels() else "torch's weight-only kernels"
    else:
        from importlib.metadata import version

        ready["version"] = f"llama-cpp-python {version('llama_cpp_python')}"
    print(json.dumps(ready), flush=True)
    for line in sys.stdin:
        prefill_s, decode_s, ids = once(json.loads(line), DECODE_TOKENS)
        print(json.dumps({"prefill_s": prefill_s, "decode_s": decode_s, "greedy_ids": ids,
                          "peak_rss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024}),
              flush=True)


# ---- driver ---------------------------------------------------------------------------------
def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default=None, help="GGUF file (default: the embedded model)")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--precision", default="int4,gguf", help="OpenLPU weight precisions, an engine each")
    parser.add_argument("--rounds", type=int, default=7, help="measured runs per engine, interleaved")
    parser.add_argument("--worker", choices=list(RUNNERS), help=argparse.SUPPRESS)
    args = parser.parse_args()
    from openlpu.models.embedded import default_model_path

    embedded = args.model is None or Path(args.model).resolve() == default_model_path().resolve()
    if args.model is None:
        args.model = str(default_model_path())
    if args.worker:
        return worker(args.worker, args.model, args.threads, args.precision)

    ids = prompt_ids(args.model)
    load_before = os.getloadavg()[0]
    engines = {f"openlpu {p}": ("openlpu", p) for p in args.precision.split(",")} | {PEER: (PEER, "")}
    procs, ready = {}, {}
    for name, (runner, precision) in engines.items():  # loaded one after another: never during a measurement
        procs[name] = subprocess.Popen([sys.executable, __file__, "--worker", runner, "--model", args.model,
                                        "--threads", str(args.threads), "--precision", precision],
                                       stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
        ready[name] = json.loads(procs[name].stdout.readline())
    runs = {name: [] for name in engines}
    for _ in range(args.rounds):
        for name, proc in procs.items():
            proc.stdin.write(json.dumps(ids) + "\n")
            proc.stdin.flush()
            runs[name].append(json.loads(proc.stdout.readline()))
    for proc in procs.values():
        proc.stdin.close()
        proc.wait()
    load_after = os.getloadavg()[0]

    results = {}
    for name, rs in runs.items():
        results[name] = {
            "prefill_tok_per_s": PROMPT_TOKENS / statistics.median(r["prefill_s"] for r in rs),
            "decode_tok_per_s": DECODE_TOKENS / statistics.median(r["decode_s"] for r in rs),
            "prefill_s_runs": [r["prefill_s"] for r in rs],
            "decode_s_runs": [r["decode_s"] for r in rs],
            "peak_rss_mb": max(r["peak_rss_mb"] for r in rs),
            "greedy_ids": rs[0]["greedy_ids"][:DECODE_TOKENS + 1],
        }
        print(f"{name:10s} prefill {results[name]['prefill_tok_per_s']:7.1f} tok/s   decode "
              f"{results[name]['decode_tok_per_s']:6.1f} tok/s   peak RSS "
              f"{results[name]['peak_rss_mb']:6.0f} MB", flush=True)
    theirs, peer_ids = runs[PEER], results[PEER]["greedy_ids"]
    ratios = {}
    for name, ours in runs.items():
        if name == PEER:
            continue
        ids_ours = results[name]["greedy_ids"]
        ratios[name] = {
            "prefill": statistics.median(t["prefill_s"] / o["prefill_s"] for o, t in zip(ours, theirs)),
            "decode": statistics.median(t["decode_s"] / o["decode_s"] for o, t in zip(ours, theirs)),
            "decode_per_round": [t["decode_s"] / o["decode_s"] for o, t in zip(ours, theirs)],
            "greedy_tokens_equal_before_first_difference": next(
                (i for i, (x, y) in enumerate(zip(ids_ours, peer_ids)) if x != y), min(len(ids_ours), len(peer_ids)))}
        print(f"ratios {name} / {PEER} (median of {args.rounds} paired rounds): prefill "
              f"{ratios[name]['prefill']:.2f}, decode {ratios[name]['decode']:.2f}")
    from openlpu.runtime.kernels import cpu_name

    summary = {
        "command": " ".join([Path(sys.executable).name, *sys.argv]),
        "date_utc": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "machine": f"{cpu_name()}, {os.cpu_count()} cores "
                   f"(shared with other tenants), Linux {platform.release()}",
        "model": Path(args.model).name,
        "threads": args.threads,
        "openlpu_cpu_kernels": next(r["cpu_kernels"] for name, r in ready.items() if name != PEER),
        "openlpu_precisions": {p: PRECISION_WORDS.get(p, p) for p in args.precision.split(",")},
        "peer": ready[PEER]["version"],
        "prompt_tokens": PROMPT_TOKENS,
        "decode_tokens": DECODE_TOKENS,
        "rounds": args.rounds,
        "load_average_1min_before_after": [load_before, load_after],
        "ratios_over_llamacpp": ratios,
        "results": results,
    }
    RESULTS.mkdir(exist_ok=True)
    stem = "engine_vs_llamacpp" + ("" if embedded else f"-{Path(args.model).stem.lower()}")
    (RESULTS / f"{stem}.json").write_text(json.dumps(summary, indent=1) + "\n")
    (RESULTS / f"{stem}.md").write_text(markdown(summary))


def markdown(s: dict) -> str:
    rows = "\n".join(
        f"| {name} | {r['prefill_tok_per_s']:.1f} | {r['decode_tok_per_s']:.1f} | "
        f"{r['peak_rss_mb']:.0f} | {', '.join(f'{DECODE_TOKENS / x:.0f}' for x in r['decode_s_runs'])} |"
        for name, r in s["results"].items())
    ratios = "\n".join(
        f"| {name} | {r['prefill']:.2f}x | {r['decode']:.2f}x | {', '.join(f'{x:.2f}' for x in r['decode_per_round'])} "
        f"| {r['greedy_tokens_equal_before_first_difference']} of {s['decode_tokens'] + 1} |"
        for name, r in s["ratios_over_llamacpp"].items())
    before, after = s["load_average_1min_before_after"]
    return "\n".join([
        "# OpenLPU engine vs llama.cpp (CPU)", "",
        f"- command: `{s['command']}`",
        f"- date (UTC): {s['date_utc']}",
        f"- machine: {s['machine']}",
        f"- model: {s['model']}; threads: {s['threads']} each; OpenLPU on {s['openlpu_cpu_kernels']}; "
        f"peer: {s['peer']}",
        "- OpenLPU's precisions: " + "; ".join(f"{p}: {words}" for p, words in s["openlpu_precisions"].items())
        + " (a head below 16 bits rescores its top 64 logits in float32)",
        f"- prompt: {s['prompt_tokens']} tokens; decode: {s['decode_tokens']} greedy tokens; each engine in its own "
        f"process, warmed up, then {s['rounds']} rounds of one run each, the engines taking turns",
        f"- load average (1 min) before / after: {before:.2f} / {after:.2f}", "",
        "| engine | prefill tok/s (median) | decode tok/s (median) | peak RSS MB | decode tok/s per round |",
        "| --- | --- | --- | --- | --- |", rows, "",
        "OpenLPU / llama.cpp, the median of the per-round ratios:", "",
        "| OpenLPU engine | prefill | decode | decode per round | greedy tokens equal to llama.cpp's before the "
        "first difference |", "| --- | --- | --- | --- | --- |", ratios, ""])


if __name__ == "__main__":
    main()
