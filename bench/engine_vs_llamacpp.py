"""OpenLPU's engine vs llama.cpp on this machine: same GGUF, same 128-token prompt, same threads.

Each engine runs in its own subprocess (a clean peak RSS each). Per engine: load, one warm-up,
then REPEATS measured runs of prefill (the 128-token prompt, up to the first token) and greedy
decode (128 more tokens, one at a time); the medians are reported. Both decode greedily with an
argmax over the full logits.

    python bench/engine_vs_llamacpp.py [--model PATH] [--threads 2] [--precision int4]

Writes bench/results/engine_vs_llamacpp.{json,md}.
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
REPEATS = 3
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
def run_openlpu(model_path: str, ids: list[int], threads: int, precision: str):
    import torch

    from openlpu.runtime.engine import Engine, SamplingParams

    torch.set_num_threads(threads)
    engine = Engine.load(model_path, precision=precision, max_batch=1,
                         context_length=PROMPT_TOKENS + DECODE_TOKENS + 8)

    def once(prompt, n):
        seq = engine.new_sequence(prompt, SamplingParams(max_tokens=n + 1, temperature=0))
        engine.step([seq])
        t_first = time.perf_counter()
        while not seq.finished:
            engine.step([seq])
        return t_first - seq.t_start, time.perf_counter() - t_first, seq.output_ids

    once(ids[:16], 8)  # warm-up
    return [once(ids, DECODE_TOKENS) for _ in range(REPEATS)]


def run_llamacpp(model_path: str, ids: list[int], threads: int, precision: str):
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

    once(ids[:16], 8)
    return [once(ids, DECODE_TOKENS) for _ in range(REPEATS)]


WORKERS = {"openlpu": run_openlpu, "llama.cpp": run_llamacpp}


def worker(name: str, model_path: str, threads: int, precision: str) -> None:
    ids = json.loads(sys.stdin.read())
    load_before = os.getloadavg()[0]
    runs = WORKERS[name](model_path, ids, threads, precision)
    prefill_s = statistics.median(r[0] for r in runs)
    decode_s = statistics.median(r[1] for r in runs)
    print(json.dumps({
        "engine": name,
        "prefill_tok_per_s": PROMPT_TOKENS / prefill_s,
        "decode_tok_per_s": DECODE_TOKENS / decode_s,
        "prefill_s_runs": [r[0] for r in runs],
        "decode_s_runs": [r[1] for r in runs],
        "peak_rss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,
        "greedy_ids": runs[0][2][:DECODE_TOKENS + 1],
        "load_average_1min_before_after": [load_before, os.getloadavg()[0]],
    }))


# ---- driver ---------------------------------------------------------------------------------
def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default=None, help="GGUF file (default: the embedded model)")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--precision", default="int4", help="OpenLPU weight precision")
    parser.add_argument("--worker", choices=list(WORKERS), help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.model is None:
        from openlpu.models.embedded import default_model_path

        args.model = str(default_model_path())
    if args.worker:
        return worker(args.worker, args.model, args.threads, args.precision)

    ids = prompt_ids(args.model)
    results = {}
    for name in WORKERS:
        proc = subprocess.run([sys.executable, __file__, "--worker", name, "--model", args.model,
                               "--threads", str(args.threads), "--precision", args.precision],
                              input=json.dumps(ids), capture_output=True, text=True, check=True)
        results[name] = json.loads(proc.stdout.strip().splitlines()[-1])
        print(f"{name:10s} prefill {results[name]['prefill_tok_per_s']:7.1f} tok/s   decode "
              f"{results[name]['decode_tok_per_s']:6.1f} tok/s   peak RSS "
              f"{results[name]['peak_rss_mb']:6.0f} MB", flush=True)
    ours, theirs = results["openlpu"], results["llama.cpp"]
    same = sum(1 for a, b in zip(ours["greedy_ids"], theirs["greedy_ids"]) if a == b)
    first_diff = next((i for i, (a, b) in enumerate(zip(ours["greedy_ids"], theirs["greedy_ids"]))
                       if a != b), None)
    summary = {
        "command": " ".join([Path(sys.executable).name, *sys.argv]),
        "date_utc": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "machine": f"{platform.processor() or platform.machine()}, {os.cpu_count()} cores "
                   f"(shared with other jobs), Linux {platform.release()}",
        "model": Path(args.model).name,
        "threads": args.threads,
        "openlpu_precision": args.precision,
        "prompt_tokens": PROMPT_TOKENS,
        "decode_tokens": DECODE_TOKENS,
        "repeats_median_of": REPEATS,
        "prefill_ratio_openlpu_over_llamacpp": ours["prefill_tok_per_s"] / theirs["prefill_tok_per_s"],
        "decode_ratio_openlpu_over_llamacpp": ours["decode_tok_per_s"] / theirs["decode_tok_per_s"],
        "greedy_tokens_equal_before_first_difference": first_diff if first_diff is not None else same,
        "results": results,
    }
    print(f"ratios OpenLPU / llama.cpp: prefill {summary['prefill_ratio_openlpu_over_llamacpp']:.2f}"
          f", decode {summary['decode_ratio_openlpu_over_llamacpp']:.2f}")
    RESULTS.mkdir(exist_ok=True)
    (RESULTS / "engine_vs_llamacpp.json").write_text(json.dumps(summary, indent=1) + "\n")
    (RESULTS / "engine_vs_llamacpp.md").write_text(markdown(summary))


def markdown(s: dict) -> str:
    rows = "\n".join(
        f"| {name} | {r['prefill_tok_per_s']:.1f} | {r['decode_tok_per_s']:.1f} | "
        f"{r['peak_rss_mb']:.0f} | {r['load_average_1min_before_after'][0]:.2f} / "
        f"{r['load_average_1min_before_after'][1]:.2f} |"
        for name, r in s["results"].items())
    return f"""# OpenLPU engine vs llama.cpp (CPU)

- command: `{s['command']}`
- date (UTC): {s['date_utc']}
- machine: {s['machine']}
- model: {s['model']}; threads: {s['threads']} each; OpenLPU precision: {s['openlpu_precision']}
- prompt: {s['prompt_tokens']} tokens; decode: {s['decode_tokens']} greedy tokens; median of {s['repeats_median_of']} runs after a warm-up; each engine in its own process

| engine | prefill tok/s | decode tok/s | peak RSS MB | load avg before / after |
| --- | --- | --- | --- | --- |
{rows}

**OpenLPU / llama.cpp: prefill {s['prefill_ratio_openlpu_over_llamacpp']:.2f}x, decode {s['decode_ratio_openlpu_over_llamacpp']:.2f}x.**
Greedy tokens equal before the first difference: {s['greedy_tokens_equal_before_first_difference']} of {s['decode_tokens'] + 1}.
"""


if __name__ == "__main__":
    main()
