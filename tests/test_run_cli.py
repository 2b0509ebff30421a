"""`openlpu run` as a user runs it: a subprocess, its stdout/stderr and exit status."""

import subprocess
import sys

import pytest


def openlpu(*args, timeout=180):
    return subprocess.run([sys.executable, "-m", "openlpu.cli", *args], capture_output=True,
                          text=True, timeout=timeout)


def test_run_streams_llamacpp_greedy_text_and_a_summary(gemma_path, llamacpp_reference):
    result = openlpu("run", llamacpp_reference["prompt"], "--max-tokens", "8", "--model",
                     str(gemma_path))
    assert result.returncode == 0, result.stderr
    want = llamacpp_reference["greedy_32_text"]  # 32 tokens; ours stops after 8
    assert result.stdout.strip() and want.startswith(result.stdout.rstrip("\n"))
    for field in ("prompt 6 tokens", "generated 8", "TTFT", "tok/s", "peak RSS"):
        assert field in result.stderr
    assert "chips, 1 stage x TP" in result.stderr  # counted in words, not '1 stages'


def test_system_and_gpu_names_are_printed_as_written(tmp_path, gemma_path):
    """Names from hardware files with rich markup in them ('[/]' closes no tag) reach the summary table as
    written (it raised MarkupError after the text had streamed)."""
    import json
    from pathlib import Path

    import openlpu as package

    presets = Path(package.__file__).parent / "hardware" / "presets"
    for preset, name in (("lpu-v1", "[/]chip"), ("h100-sxm", "[/]gpu")):
        (tmp_path / f"{preset}.json").write_text(json.dumps({**json.loads((presets / f"{preset}.json").read_text()),
                                                              "name": name}))
    result = openlpu("run", "hi", "--max-tokens", "2", "--model", str(gemma_path), "--system",
                     str(tmp_path / "lpu-v1.json"), "--compare", str(tmp_path / "h100-sxm.json"))
    assert result.returncode == 0, result.stderr
    assert "[/]chip x" in result.stderr and "[/]gpu x" in result.stderr


@pytest.mark.parametrize("args, message", [
    (["run", ""], "prompt is empty"),
    (["run", "hi", "--temperature", "3"], "temperature"),
    (["run", "hi", "--top-p", "1.5"], "top_p"),
    (["run", "hi", "--temperature", "0.5", "--seed", str(2**64)], "seed must be an integer from -2**63"),
    (["run", "hi", "--precision", "int3"], "unknown --precision 'int3'"),
    (["run", "hi", "--model", ""], "is not a file"),
    (["run", "hi", "--top-k", "-2"], "top_k"),
    (["run", "hi", "--max-tokens", "0"], "max_tokens"),
    (["run", "hi", "--stop", "a", "--stop", "b", "--stop", "c", "--stop", "d", "--stop", "e"],
     "stop"),
    (["run", "hi", "--model", "/nonexistent/model.gguf"], "not found"),
    # a byte that is not UTF-8 on the command line reaches Python as a lone surrogate
    (["run", "caf\udce9 au lait"], "the text holds '\\udce9' at character 3, which is no Unicode character"),
])
def test_bad_input_is_one_line_and_exit_2(args, message):
    result = openlpu(*args)
    assert result.returncode == 2
    assert message in result.stderr and "Traceback" not in result.stderr
    assert len(result.stderr.strip().splitlines()) == 1


def test_corrupt_model_and_prompt_past_context(tmp_path, gemma_path):
    corrupt = tmp_path / "corrupt.gguf"
    corrupt.write_bytes(b"GGUF" + bytes(range(256)) * 4)
    result = openlpu("run", "hi", "--model", str(corrupt))
    assert result.returncode == 2 and "Traceback" not in result.stderr
    result = openlpu("run", "word " * 9000, "--model", str(gemma_path))
    assert result.returncode == 2 and "context length" in result.stderr
    assert "Traceback" not in result.stderr


def test_generated_text_reaches_stdout_as_the_model_wrote_it(gemma_path):
    """Generated text is printed as the engine gives it: through a rich Console the tabs of generated Go code
    were expanded to spaces (and control characters dropped, ':smile:' turned into an emoji)."""
    from openlpu.runtime.engine import Engine
    from openlpu.runtime.sampling import SamplingParams

    prompt = 'package main\n\nimport "fmt"\n\nfunc main() {\n\tfmt.Println("one")\n\tfmt.Println("two")\n'
    result = openlpu("run", prompt, "--max-tokens", "16", "--model", str(gemma_path))
    assert result.returncode == 0, result.stderr
    engine = Engine.load(str(gemma_path), max_batch=1, context_length=256)
    text = "".join(e.text for e in engine.generate(prompt, SamplingParams(max_tokens=16, temperature=0)))
    assert "\t" in text and result.stdout == text + "\n"
