"""Load test: N concurrent streaming chat clients against `openlpu serve` and against llama.cpp's
server (llama-cpp-python, `python -m llama_cpp.server`) on the same GGUF with the same threads.

Each server runs alone, one after the other, as a subprocess on a free port. Each client sends
its requests one after another (stream=True) and times every chunk on arrival.
Reports requests/s, output tokens/s, TTFT p50/p99, inter-token latency p50/p99 and errors, each server's
output tokens/s over llama.cpp's, and writes bench/results/serve_load.json and .md.

llama-cpp-python's server answers one request at a time; `openlpu serve` decodes up to --max-batch
together. So OpenLPU also runs with --max-batch 1 ("openlpu-serial"), the like-for-like row; "openlpu"
batches every client (--max-batch = --clients), as it is meant to serve.

    python bench/serve_load.py --clients 8 --requests 2 --max-tokens 32 --threads 2
"""

from __future__ import annotations

import argparse
import concurrent.futures
import datetime
import importlib.metadata
import json
import os
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path

import httpx

RESULTS = Path(__file__).parent / "results"
PROMPTS = ["Explain what a compiler does.", "Write a short poem about rain.", "List five fruits.",
           "Why is the sky blue?", "Describe a cat in two sentences.", "What is a prime number?",
           "Give three tips for learning to cook.", "Summarise the plot of a detective story."]
MODEL_ALIAS = "gemma-3-270m"
STARTUP_TIMEOUT_S = 300
OPENLPU_BATCH = {"openlpu": None, "openlpu-serial": 1}  # its --max-batch (None: the clients)
PEER = "llamacpp"


@dataclass
class RequestTiming:
    ok: bool
    ttft_s: float = 0.0
    total_s: float = 0.0
    output_tokens: int = 0
    gaps_s: list[float] = field(default_factory=list)
    error: str = ""


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def server_command(name: str, port: int, gguf: str, threads: int, clients: int) -> list[str]:
    if name in OPENLPU_BATCH:
        return [sys.executable, "-m", "openlpu.cli", "serve", "--port", str(port), "--model", gguf,
                "--max-batch", str(OPENLPU_BATCH[name] or clients), "--max-queue", str(4 * clients)]
    return [sys.executable, "-m", "llama_cpp.server", "--model", gguf, "--port", str(port),
            "--n_threads", str(threads), "--n_ctx", "4096", "--chat_format", "gemma",
            "--model_alias", MODEL_ALIAS,
            "--interrupt_requests", "False"]  # its default cuts a running stream when the next request comes


def wait_ready(base: str, proc: subprocess.Popen, log) -> str:
    """Waits for the models route; returns the model id the server announces."""
    deadline = time.monotonic() + STARTUP_TIMEOUT_S
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            log.seek(0)
            tail = log.read()[-600:]
            raise RuntimeError(f"server exited with status {proc.returncode}: {tail}")
        try:
            r = httpx.get(base + "/models", timeout=2)
            if r.status_code == 200:
                return r.json()["data"][0]["id"]
        except httpx.HTTPError:
            pass
        time.sleep(0.5)
    raise RuntimeError("server did not start in time")


def one_request(base: str, model: str, prompt: str, max_tokens: int) -> RequestTiming:
    body = {"model": model, "messages": [{"role": "user", "content": prompt}], "stream": True,
            "max_tokens": max_tokens, "temperature": 0}
    t0 = time.perf_counter()
    arrivals = []
    try:
        with httpx.stream("POST", base + "/chat/completions", json=body, timeout=600) as r:
            if r.status_code != 200:
                return RequestTiming(False, error=f"HTTP {r.status_code}")
            for line in r.iter_lines():
                if not line.startswith("data:") or line.endswith("[DONE]"):
                    continue
                chunk = json.loads(line[5:])
                if chunk.get("error"):
                    return RequestTiming(False, error=chunk["error"].get("message", "stream error"))
                choices = chunk.get("choices") or [{}]
                if choices[0].get("delta", {}).get("content"):
                    arrivals.append(time.perf_counter())
    except httpx.HTTPError as e:
        return RequestTiming(False, error=type(e).__name__)
    end = time.perf_counter()
    if not arrivals:
        return RequestTiming(False, error="no tokens")
    return RequestTiming(True, arrivals[0] - t0, end - t0, len(arrivals),
                         [b - a for a, b in zip(arrivals, arrivals[1:])])


def percentile(values: list[float], q: float) -> float:
    if not values:
        return float("nan")
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, round(q / 100 * (len(ordered) - 1)))]


def run_load(name: str, gguf: str, clients: int, requests: int, max_tokens: int, threads: int) -> dict:
    port = free_port()
    env = {**os.environ, "OMP_NUM_THREADS": str(threads), "MKL_NUM_THREADS": str(threads)}
    log = tempfile.TemporaryFile(mode="w+")  # a file, not a pipe: a chatty server never blocks on it
    proc = subprocess.Popen(server_command(name, port, gguf, threads, clients), env=env,
                            stdout=log, stderr=subprocess.STDOUT, text=True)
    base = f"http://127.0.0.1:{port}" + ("/openai/v1" if name in OPENLPU_BATCH else "/v1")
    try:
        model = wait_ready(base, proc, log)
        one_request(base, model, "warm up", 4)

        def client(i: int) -> list[RequestTiming]:
            return [one_request(base, model, PROMPTS[(i + k) % len(PROMPTS)], max_tokens) for k in range(requests)]

        t0 = time.perf_counter()
        with concurrent.futures.ThreadPoolExecutor(clients) as pool:
            timings = [t for batch in pool.map(client, range(clients)) for t in batch]
        wall_s = time.perf_counter() - t0
    finally:
        proc.terminate()
        try:
            proc.wait(timeout=20)
        except subprocess.TimeoutExpired:
            proc.kill()
        log.close()
    good = [t for t in timings if t.ok]
    gaps = [g for t in good for g in t.gaps_s]
    ttfts = [t.ttft_s for t in good]
    return {"server": name, "requests": len(timings), "errors": len(timings) - len(good),
            "error_kinds": sorted({t.error for t in timings if not t.ok}),
            "wall_s": wall_s, "requests_per_s": len(good) / wall_s,
            "output_tokens": sum(t.output_tokens for t in good),
            "output_tokens_per_s": sum(t.output_tokens for t in good) / wall_s,
            "ttft_p50_s": percentile(ttfts, 50), "ttft_p99_s": percentile(ttfts, 99),
            "itl_p50_s": percentile(gaps, 50), "itl_p99_s": percentile(gaps, 99),
            "mean_tokens_per_request": statistics.mean([t.output_tokens for t in good]) if good else 0}


def markdown(report: dict) -> str:
    peer = next((r for r in report["results"] if r["server"] == PEER), None)
    rows = ["| server | max batch | req/s | output tok/s | / llama.cpp's | TTFT p50 | TTFT p99 | ITL p50 | ITL p99 "
            "| errors |", "| --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: |"]
    for r in report["results"]:
        ratio = f"{r['output_tokens_per_s'] / peer['output_tokens_per_s']:.2f}x" if peer else "-"
        batch = OPENLPU_BATCH.get(r["server"], 1) or report["setup"]["clients"]
        rows.append(f"| {r['server']} | {batch} | {r['requests_per_s']:.2f} | {r['output_tokens_per_s']:.1f} | "
                    f"{ratio} | {r['ttft_p50_s'] * 1000:.0f} ms | {r['ttft_p99_s'] * 1000:.0f} ms | "
                    f"{r['itl_p50_s'] * 1000:.1f} ms | {r['itl_p99_s'] * 1000:.1f} ms | "
                    f"{r['errors']}/{r['requests']} |")
    setup = report["setup"]
    return (f"# Serving load: {setup['clients']} concurrent streaming clients\n\n"
            f"{setup['requests_per_client']} requests each, max_tokens {setup['max_tokens']}, temperature 0, "
            f"{setup['threads']} threads, model `{setup['gguf']}`, on {setup['machine']}, {setup['date_utc']}; "
            f"peer: {setup.get('peer', 'llama-cpp-python')}.\n"
            f"Command: `{setup['command']}`\n\n"
            "llama-cpp-python's server (the peer) answers one request at a time: `openlpu-serial` (--max-batch 1) "
            "is the like-for-like row; `openlpu` decodes all the clients together, as it serves by default.\n\n"
            + "\n".join(rows) + "\n")


def peer_version() -> str:
    try:
        return f"llama-cpp-python {importlib.metadata.version('llama_cpp_python')}"
    except importlib.metadata.PackageNotFoundError:
        return "llama-cpp-python not installed"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--clients", type=int, default=8)
    ap.add_argument("--requests", type=int, default=2, help="requests per client, one after another")
    ap.add_argument("--max-tokens", type=int, default=32)
    ap.add_argument("--threads", type=int, default=os.cpu_count())
    ap.add_argument("--servers", default=",".join([*OPENLPU_BATCH, PEER]))
    ap.add_argument("--model", default=None, help="GGUF (default: the embedded Gemma 3 270M)")
    ap.add_argument("--out", default=str(RESULTS / "serve_load"))
    args = ap.parse_args()
    from openlpu.models.embedded import default_model_path

    gguf = args.model or str(default_model_path())
    results = []
    for name in args.servers.split(","):
        print(f"running {name} ...", flush=True)
        results.append(run_load(name, gguf, args.clients, args.requests, args.max_tokens, args.threads))
        print(json.dumps(results[-1], indent=1), flush=True)
    from openlpu.runtime.kernels import cpu_name

    report = {"setup": {"clients": args.clients, "requests_per_client": args.requests,
                        "max_tokens": args.max_tokens, "threads": args.threads, "gguf": Path(gguf).name,
                        "machine": f"{cpu_name()}, {os.cpu_count()} CPUs",
                        "peer": peer_version(),
                        "command": "python " + " ".join(sys.argv),
                        "date_utc": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds")},
              "results": results}
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.with_suffix(".json").write_text(json.dumps(report, indent=1) + "\n")
    out.with_suffix(".md").write_text(markdown(report))
    print(markdown(report))


if __name__ == "__main__":
    main()
