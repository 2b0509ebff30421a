"""`openlpu run` as an LPU run: it compiles and verifies a Program, can execute it chip by chip,
and labels the host's measured speed apart from the LPU's simulated and the GPU's modelled one;
`openlpu serve` compiles its Program before it listens."""

import json
import subprocess
import sys
from pathlib import Path

import pytest

import openlpu as openlpu_package
from openlpu.runtime.tokenizer import Tokenizer


def openlpu(*args, timeout=300):
    return subprocess.run([sys.executable, "-m", "openlpu.cli", *args], capture_output=True,
                          text=True, timeout=timeout)


def small_sram_system(folder: Path) -> Path:
    """lpu-v1 with 40 MB chips: the Gemma 3 270M table (262,144 rows) then fits no TP group of a node."""
    preset = json.loads((Path(openlpu_package.__file__).parent / "hardware" / "presets" / "lpu-v1.json").read_text())
    preset["name"] = "lpu-40mb"
    preset["chip"]["sram_bytes"].update(value=40_000_000, source="a test chip: lpu-v1 with less SRAM")
    path = folder / "lpu-40mb.json"
    path.write_text(json.dumps(preset))
    return path


def test_run_a_byte_level_bpe_model(smollm2_path, smollm2_reference):
    """`openlpu run` on a GGUF with a byte-level BPE vocabulary (SmolLM2-135M-Instruct): llama.cpp's greedy text as
    far as its tokens agree (5: the sixth is a near tie), in both modes."""
    for mode in ("fused", "sharded"):
        result = openlpu("run", smollm2_reference["prompt"], "--max-tokens", "5", "--model", str(smollm2_path),
                         "--mode", mode)
        assert result.returncode == 0, result.stderr
        assert result.stdout.rstrip("\n") == Tokenizer.from_gguf(smollm2_path).decode(
            smollm2_reference["greedy_32_ids"][:5]).rstrip("\n")


@pytest.mark.parametrize("system", ["lpu-v1", "lpu-40mb"])
def test_sharded_run_gives_llamacpp_greedy_text(gemma_path, llamacpp_reference, system, tmp_path):
    """On lpu-v1 the Program keeps the embedding and head whole; on 40 MB chips it splits both along
    the vocabulary. Either way the text is llama.cpp's."""
    from openlpu.compiler import Workload, compile_program
    from openlpu.hardware.lpu import load_system
    from openlpu.models.gguf import spec_from_gguf

    system_arg = str(small_sram_system(tmp_path)) if system == "lpu-40mb" else system
    program = compile_program(spec_from_gguf(gemma_path), load_system(system_arg),
                               Workload(context_length=64, prompt_len=16))
    heads = [pc for s in program.placement.stages for pc in s.pieces if pc[1] == "head"]
    assert (len(heads) > 1) == (system == "lpu-40mb")
    result = openlpu("run", llamacpp_reference["prompt"], "--max-tokens", "8", "--mode", "sharded",
                     "--model", str(gemma_path), "--system", system_arg)
    assert result.returncode == 0, result.stderr
    # the text comes from virtual chips holding only their shards, joined by the Program's transfers
    assert llamacpp_reference["greedy_32_text"].startswith(result.stdout.rstrip("\n"))
    assert len(result.stdout.strip()) > 10
    assert "verified" in result.stderr
    for label in ("measured", "simulated from the", "modelled (roofline)"):
        assert label in result.stderr


def test_run_summary_labels_each_figure(gemma_path):
    result = openlpu("run", "Hello", "--max-tokens", "4", "--model", str(gemma_path),
                     "--system", "lpu-v1", "--compare", "a100-80gb")
    assert result.returncode == 0, result.stderr
    assert "lpu-v1 x" in result.stderr and "a100-80gb x" in result.stderr


def test_run_bad_lpu_options_are_one_line(gemma_path):
    for args, message in [(["--mode", "bogus"], "--mode"),
                          (["--mode", "sharded", "--temperature", "0.7"], "greedy"),
                          (["--system", "lpu-v9"], "lpu-v9"),
                          (["--compare", "h1000"], "h1000")]:
        result = openlpu("run", "hi", "--model", str(gemma_path), *args)
        assert result.returncode == 2, (args, result.stderr)
        assert message in result.stderr and "Traceback" not in result.stderr
        assert len(result.stderr.strip().splitlines()) == 1


def test_fused_run_of_a_vocabulary_split_program_gives_llamacpp_greedy_text(gemma_path, llamacpp_reference,
                                                                          tmp_path):
    """Fused mode (the default, and the server's engine) runs the layers as whole blocks in the engine's
    precision and the split embedding and head part by part, on the rows each stage holds."""
    result = openlpu("run", llamacpp_reference["prompt"], "--max-tokens", "4", "--model", str(gemma_path),
                     "--system", str(small_sram_system(tmp_path)))
    assert result.returncode == 0, result.stderr
    assert llamacpp_reference["greedy_32_text"].startswith(result.stdout.rstrip("\n"))
    assert len(result.stdout.strip()) > 5 and "lpu-40mb x" in result.stderr


def test_a_prompt_longer_than_a_chunk_runs_on_a_vocabulary_split_head(gemma_path, tmp_path):
    """Fed in chunks, a prompt's chunks before its last sample nothing: the split head's parts, run one by one,
    met no rows and raised in `run` and `serve` (a review). The tokens are those of the whole head on lpu-v1."""
    from openlpu.runtime.engine import Engine
    from openlpu.runtime.sampling import SamplingParams

    def greedy(system):
        engine = Engine.load(str(gemma_path), system=system, max_batch=1, context_length=512)
        ids = engine.tokenizer.encode("hello " * 300)
        seq = engine.new_sequence(ids, SamplingParams(max_tokens=3, temperature=0))
        while not seq.finished:
            engine.step([seq])
        return len(ids) > engine.prefill_chunk, seq.output_ids
    split, whole = greedy(str(small_sram_system(tmp_path))), greedy("lpu-v1")
    assert split == whole and whole[0]  # the same tokens, from a prompt of several chunks


def test_serve_bad_system_is_one_line(gemma_path):
    """The server runs the Program compiled for --system, so an unknown system stops it at start."""
    result = openlpu("serve", "--model", str(gemma_path), "--system", "lpu-v9", "--port", "0")
    assert result.returncode == 2 and "lpu-v9" in result.stderr and "Traceback" not in result.stderr
    assert len(result.stderr.strip().splitlines()) == 1


@pytest.mark.parametrize("flags, says", [
    (["--rpm", "0"], "--rpm 0: --rpm, --tpm and --rpd must be at least 1"),
    (["--rpd", "-1", "--tpm", "0"], "--tpm 0, --rpd -1: --rpm, --tpm and --rpd must be at least 1"),
    (["--max-batch", "0"], "--max-batch must be at least 1"),
    # an empty key let in any client sending 'Authorization: Bearer ' with nothing after it (a review)
    (["--api-key", ""], "--api-key must be a key of one or more characters without spaces"),
    (["--api-key", "good", "--api-key", "two words"], "--api-key must be a key of one or more characters"),
])
def test_serve_bad_limits_are_one_line_before_the_model_loads(flags, says):
    """A limit the rate limiter would refuse stopped the server only once it had loaded the model, with a
    traceback from uvicorn's startup."""
    result = openlpu("serve", "--port", "0", *flags)
    assert result.returncode == 2 and says in result.stderr and "Traceback" not in result.stderr
    assert len(result.stderr.strip().splitlines()) == 1


def test_serve_a_port_it_cannot_listen_on_is_one_line_before_the_model_loads():
    """A port in use was said by uvicorn after the model had loaded (75 s) and a line saying the server served
    there; one out of range was a traceback after it (a review found both)."""
    import socket

    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        for flags, says in ((["--port", str(port)], f"cannot listen on 127.0.0.1:{port}: Address already in use"),
                            (["--port", "70000"], "--port must be 0 to 65535 (0: any free port), got 70000"),
                            (["--host", "no.such.host.invalid"], "--host 'no.such.host.invalid' is no address"),
                            (["--host", "192.0.2.1"], "Cannot assign requested address; give --host an address")):
            result = openlpu("serve", *flags)
            assert result.returncode == 2 and says in result.stderr and "Traceback" not in result.stderr
            assert len(result.stderr.strip().splitlines()) == 1 and "compiled" not in result.stdout
    # a second server taking the first's port while the first still loads its model: bound alike, two sockets
    # clash only once they listen, so each listens at once (a review found both passed the check)
    from openlpu.errors import OpenLPUError
    from openlpu.serve.app import bound_socket

    with bound_socket("127.0.0.1", 0) as first, pytest.raises(OpenLPUError, match="Address already in use; choose"):
        bound_socket("127.0.0.1", first.getsockname()[1])
