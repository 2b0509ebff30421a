"""Tokenizer and GGUF header load times on the embedded model (cold build vs warm cache).

    python bench/tokenizer_load.py
"""

import time

from openlpu.models.embedded import default_model_path
from openlpu.models.gguf import read_header
from openlpu.runtime.tokenizer import Tokenizer


def seconds(fn) -> float:
    start = time.perf_counter()
    fn()
    return time.perf_counter() - start


def main() -> None:
    path = default_model_path()
    print(f"model: {path}")
    print(f"read_header (metadata + tensor directory): {seconds(lambda: read_header(path)):.3f} s")
    print(f"tokenizer cold build (no cache):          "
          f"{seconds(lambda: Tokenizer.from_gguf(path, cache=False)):.3f} s")
    Tokenizer.from_gguf(path)  # make sure the cache exists
    print(f"tokenizer warm load (cached):             {seconds(lambda: Tokenizer.from_gguf(path)):.3f} s")
    tokenizer = Tokenizer.from_gguf(path)
    text = open(__file__).read() * 20
    ids = tokenizer.encode(text)
    took = seconds(lambda: tokenizer.encode(text))
    print(f"encode: {len(ids) / took:,.0f} tokens/s ({len(text):,} chars)")


if __name__ == "__main__":
    main()
