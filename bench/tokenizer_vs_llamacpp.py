"""OpenLPU's tokenizers vs llama.cpp's on this machine: load, encode and decode speed, and the ids compared.

Two vocabularies: the embedded Gemma 3 270M's SentencePiece one and SmolLM2-135M-Instruct's byte-level BPE one
(tests/fixtures/models.py fetches it). The text: this repository's README, DESIGN and Python sources, about
0.7 MB of prose and code. Each tokenizer loads the GGUF's vocabulary (OpenLPU: once from the file, once from
its cache where it keeps one; llama.cpp: Llama(vocab_only=True)), encodes the text in lines (as a server meets
prompts: many short texts, special tokens not parsed) and decodes the ids back, the two taking turns, ROUNDS
times; reported are the medians and the median of the per-round ratios. llama.cpp is called through
llama-cpp-python, as a Python server calls it, its binding's cost per call included. The ids of every line must be
llama.cpp's, else the benchmark stops.

    pip install -e '.[reference]'   # llama-cpp-python, the peer
    python bench/tokenizer_vs_llamacpp.py [--rounds 5]

Writes bench/results/tokenizer_vs_llamacpp.{json,md}.
"""

from __future__ import annotations

import argparse
import ctypes
import datetime
import json
import os
import platform
import statistics
import sys
import time
from pathlib import Path

ROOT = Path(__file__).parent.parent
RESULTS = Path(__file__).parent / "results"


def corpus() -> list[str]:
    files = [ROOT / "README.md", ROOT / "DESIGN.md", *sorted((ROOT / "openlpu").rglob("*.py"))]
    return [line for f in files for line in f.read_text().splitlines(keepends=True)]


def seconds(fn) -> tuple[float, object]:
    start = time.perf_counter()
    out = fn()
    return time.perf_counter() - start, out


def llamacpp_text(llm, ids: list[int]) -> str:
    """llama.cpp's llama_token_to_piece per id (special=False), joined: what OpenLPU's decode gives."""
    import llama_cpp

    buffer = (ctypes.c_char * 256)()
    return b"".join(bytes(buffer[:llama_cpp.llama_token_to_piece(llm._model.vocab, t, buffer, 256, 0, False)])
                    for t in ids).decode("utf-8", errors="replace")


def measure(name: str, path: Path, lines: list[str], rounds: int) -> dict:
    import llama_cpp

    from openlpu.runtime.tokenizer import Tokenizer

    build_s, _ = seconds(lambda: Tokenizer.from_gguf(path, cache=False))
    Tokenizer.from_gguf(path)  # the cache, where the kind keeps one
    load_s, ours = seconds(lambda: Tokenizer.from_gguf(path))
    peer_load_s, llm = seconds(lambda: llama_cpp.Llama(model_path=str(path), vocab_only=True, verbose=False))
    add_bos = ours.facts.add_bos

    def encode_ours(tokenizer=ours):
        return [tokenizer.encode(line, add_bos=False) for line in lines]

    def encode_peer():
        return [llm.tokenize(line.encode(), add_bos=False, special=False) for line in lines]

    ids = encode_ours()
    if (wrong := next((i for i, (a, b) in enumerate(zip(ids, encode_peer())) if a != b), None)) is not None:
        sys.exit(f"{name}: line {wrong} {lines[wrong]!r} encodes to other ids than llama.cpp's")
    tokens = sum(map(len, ids))
    flat = [t for line in ids for t in line]
    rows = []
    for _ in range(rounds):
        fresh = Tokenizer.from_gguf(path)  # no piece met before: a byte-level tokenizer keeps the ids of those
        ours_s, _ = seconds(lambda tokenizer=fresh: encode_ours(tokenizer))
        peer_s, _ = seconds(encode_peer)
        ours_decode_s, text = seconds(lambda: ours.decode(flat))
        peer_decode_s, peer_text = seconds(lambda: llamacpp_text(llm, flat))
        if text != peer_text:
            sys.exit(f"{name}: the decoded text differs from llama.cpp's")
        rows.append((tokens / ours_s, tokens / peer_s, tokens / ours_decode_s, tokens / peer_decode_s))
    median = [statistics.median(column) for column in zip(*rows)]
    return {"model": name, "file": path.name, "lines": len(lines), "tokens": tokens, "add_bos": add_bos,
            "openlpu_build_s": build_s, "openlpu_load_s": load_s, "llamacpp_load_s": peer_load_s,
            "openlpu_encode_tok_s": median[0], "llamacpp_encode_tok_s": median[1],
            "encode_ratio": statistics.median(a / b for a, b, _, _ in rows),
            "openlpu_decode_tok_s": median[2], "llamacpp_decode_tok_s": median[3],
            "decode_ratio": statistics.median(c / d for _, _, c, d in rows)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=5, help="measured rounds, the two taking turns (default 5)")
    args = parser.parse_args()
    import llama_cpp

    sys.path.insert(0, str(ROOT / "tests" / "fixtures"))
    from models import smollm2_path

    from openlpu.models.embedded import default_model_path

    lines = corpus()
    results = [measure("gemma-3-270m (SentencePiece)", default_model_path(), lines, args.rounds),
               measure("smollm2-135m-instruct (byte-level BPE)", smollm2_path(), lines, args.rounds)]
    machine = f"{platform.node()} ({platform.machine()}, {os.cpu_count()} CPUs, Python {platform.python_version()})"
    report = {"command": f"python bench/tokenizer_vs_llamacpp.py --rounds {args.rounds}", "machine": machine,
              "date": datetime.date.today().isoformat(), "llama_cpp_python": llama_cpp.__version__,
              "results": results}
    RESULTS.mkdir(exist_ok=True)
    (RESULTS / "tokenizer_vs_llamacpp.json").write_text(json.dumps(report, indent=1) + "\n")
    table = [("| vocabulary | tokens | OpenLPU encode tok/s | llama.cpp encode tok/s | ratio | OpenLPU decode tok/s "
              "| llama.cpp decode tok/s | ratio | OpenLPU load s (cold / cached) | llama.cpp load s |"),
             "|---|---|---|---|---|---|---|---|---|---|"]
    for r in results:
        table.append(f"| {r['model']} | {r['tokens']:,} | {r['openlpu_encode_tok_s']:,.0f} | "
                     f"{r['llamacpp_encode_tok_s']:,.0f} | {r['encode_ratio']:.2f} | "
                     f"{r['openlpu_decode_tok_s']:,.0f} | {r['llamacpp_decode_tok_s']:,.0f} | {r['decode_ratio']:.2f} | "
                     f"{r['openlpu_build_s']:.2f} / {r['openlpu_load_s']:.2f} | {r['llamacpp_load_s']:.2f} |")
    description = (
        f"Generated by `{report['command']}` on {machine}, {report['date']}, against llama-cpp-python "
        f"{llama_cpp.__version__}. The text: this repository's README, DESIGN and Python sources, "
        f"{len(lines):,} lines encoded one by one (no BOS, special tokens not parsed), every line's ids equal to "
        f"llama.cpp's and the decoded text too; medians of {args.rounds} rounds, the two taking turns, each "
        "round's OpenLPU tokenizer new (a byte-level one keeps the ids of pieces it has met); ratio = OpenLPU / "
        "llama.cpp (median of the rounds' ratios). llama.cpp is called as a Python server calls it, through "
        "llama-cpp-python (Llama.tokenize per line, llama_token_to_piece per id): its binding's cost per call "
        "is in its figures. Load: OpenLPU reads the vocabulary from the GGUF (cold; SentencePiece ones it then "
        "caches) and llama.cpp with vocab_only.")
    text = "\n".join(["# Tokenizers: OpenLPU vs llama.cpp", "", description, "", *table, ""])
    (RESULTS / "tokenizer_vs_llamacpp.md").write_text(text)
    print(text)


if __name__ == "__main__":
    main()
