"""gpt-oss (OpenAI's open-weight MoE, served on GroqCloud): its ModelSpec from each source, its op rows,
its compiled Program and the weights the runtime reads (its numerics: tests/test_families.py, against
transformers, and tests/test_executor.py, on every placement)."""

import json
import re
import subprocess
import sys

import numpy as np
import pytest
import torch
from fixtures.tiny_models.hf_tiny import build, save
from safetensors.torch import load_file, save_file
from test_gguf import arch_metadata, write_gguf

from openlpu.compiler import Workload, compile_program, verify
from openlpu.errors import OpenLPUError
from openlpu.graph.lower import lower
from openlpu.hardware.gpu import load_gpu
from openlpu.hardware.lpu import load_system
from openlpu.models.gguf import load_weights, spec_from_gguf
from openlpu.models.hf import load_safetensors, mxfp4_to_float, spec_from_hf_config
from openlpu.models.spec import PRESETS_DIR, load_preset
from openlpu.runtime.model import Model
from openlpu.sim.gpu import KERNEL_OVERHEAD_S, step_s
from openlpu.sim.timing import timing

SYSTEM = load_system("lpu-v1")


def _fields(spec) -> dict:
    d = spec.to_dict()
    for f in ("name", "source", "extra"):
        d.pop(f)
    return d


@pytest.mark.parametrize("name, layers, experts", [("gpt-oss-120b", None, None), ("gpt-oss-20b", 24, 32)])
def test_transformers_config_class_gives_the_preset(name, layers, experts):
    """transformers' GptOssConfig (its defaults are gpt-oss-120b; the 20b differs in layers and experts),
    as it writes config.json, makes the same ModelSpec as the preset: a second source for the shapes."""
    from transformers import GptOssConfig

    sizes = {} if layers is None else {"num_hidden_layers": layers, "num_local_experts": experts}
    cfg = GptOssConfig(**sizes).to_dict()
    assert _fields(spec_from_hf_config(cfg)) == _fields(load_preset(name))


def _gguf(tmp_path):
    """A metadata-only gpt-oss-20b GGUF: the keys llama.cpp's converter writes for it
    (GptOssModel.set_gguf_parameters: the common ones, the sliding window, the expert sizes, yarn)."""
    meta = arch_metadata("gpt-oss", d_model=2880, n_layers=24, d_ff=2880, n_heads=64, n_kv_heads=8, head_dim=64,
                         context_length=131072, norm_eps=1e-5, rope_base=150000.0, sliding_window=128,
                         n_experts=32, n_experts_per_token=4, vocab_size=201088)
    meta.update({"gpt-oss.expert_feed_forward_length": 2880, "gpt-oss.rope.scaling.type": "yarn",
                 "gpt-oss.rope.scaling.factor": 32.0, "gpt-oss.rope.scaling.original_context_length": 4096})
    return write_gguf(tmp_path / "oss.gguf", "gpt-oss", meta, {"output.weight": np.zeros((1, 1), np.float32)})


def test_gguf_metadata_gives_the_preset(tmp_path):
    assert _fields(spec_from_gguf(_gguf(tmp_path))) == _fields(load_preset("gpt-oss-20b"))


@pytest.mark.parametrize("change, says", [
    ({"swiglu_limit": 5.0}, "'swiglu_limit' = 5.0 is not supported for gpt_oss"),
    ({"attention_bias": False}, "'attention_bias' = False is not supported"),
    ({"rope_scaling": {"rope_type": "yarn", "factor": 32.0}}, "lacks 'original_max_position_embeddings'"),
    ({"rope_scaling": {"rope_type": "yarn", "factor": "x", "original_max_position_embeddings": 4096}},
     "'rope_scaling.factor' must be a positive number, got 'x'"),
    ({"rope_scaling": {"rope_type": "dynamic", "factor": 2.0}}, "supported: llama3, yarn, linear, none"),
    ({"rope_scaling": {"rope_type": "yarn", "factor": 32.0, "original_max_position_embeddings": 4096,
                       "truncate": "no"}}, "'rope_scaling.truncate' must be true or false, got 'no'"),
])
def test_bad_configs_say_which_field(change, says):
    cfg = json.loads((PRESETS_DIR / "gpt-oss-20b.json").read_text())["$source_notes"]["hf_config"]
    with pytest.raises(OpenLPUError, match=re.escape(says)):
        spec_from_hf_config({**cfg, **change})


def test_a_long_prefill_reads_every_weight_bias_and_sink():
    """A prefill long enough to touch every expert reads every parameter once but the embedding table (a
    row per token): the biases and sinks are in the rows. Second method: ModelSpec.param_count."""
    spec = load_preset("gpt-oss-20b")
    tokens = 4096
    ops = lower(spec, "prefill", tokens, 1, "int8")
    read = sum(o.weight_bytes for o in ops) - tokens * spec.d_model  # minus the gathered rows
    assert read == pytest.approx(spec.param_count() - spec.vocab_size * spec.d_model, rel=1e-6)
    sinks = [o for o in ops if o.kind == "sink"]
    assert len(sinks) == spec.n_layers and all(o.weight_bytes == spec.n_heads for o in sinks)


@pytest.fixture(scope="module")
def split_attention():
    """gpt-oss-20b with 16 users of 131,072 tokens: its global layers' K and V do not fit a stage, so each
    is split along its slots (context parallelism)."""
    return compile_program(load_preset("gpt-oss-20b"), SYSTEM, Workload(context_length=131072, users=16))


def test_a_split_attention_applies_the_sinks_once_to_the_merged_result(split_attention):
    p = split_attention
    assert verify(p) == []
    stage_of_chip = {c: s.index for s in p.placement.stages for c in s.chips}
    ops = {o.name: o for o in p.decode.ops}
    split_layers = 0
    for layer in range(load_preset("gpt-oss-20b").n_layers):
        parts = [o for o in p.decode.ops if o.name.startswith(f"blk.{layer}.attention")]
        sinks = [o for o in p.decode.ops if o.name.startswith(f"blk.{layer}.attn_sinks")]
        assert len(sinks) == 1  # once per layer, however many parts attend
        held = {stage_of_chip[sh.chip] for sh in p.placement.shards if sh.tensor == f"blk.{layer}.attn_sinks.weight"}
        assert held == {sinks[0].stage}
        if len(parts) > 1:
            split_layers += 1
            last_merge = max((o for o in p.decode.ops if o.name.startswith(f"blk.{layer}.attn_merge")),
                             key=lambda o: o.end_cycle)
            assert sinks[0].stage == max(o.stage for o in parts)
            assert any(i.startswith(last_merge.name) for i in sinks[0].inputs)
            assert sinks[0].start_cycle >= last_merge.end_cycle
        assert ops[f"blk.{layer}.attn_output"].stage == sinks[0].stage
    assert split_layers > 0


def test_each_expert_bias_is_placed_with_its_weight_rows():
    """On 52 stages of TP 2 (more stages than the 50 halves, so every MLP is cut between two stages), the
    gate and up biases split along d_ff exactly like their expert matrices, and the down bias, added once
    to the summed parts, is whole and only on each MLP's last part."""
    spec = load_preset("gpt-oss-20b")
    p = compile_program(spec, SYSTEM, Workload(context_length=4096), chips=104, tp=2)
    assert verify(p) == []
    stage_of_chip = {c: s.index for s in p.placement.stages for c in s.chips}
    shards = {(sh.tensor, sh.chip): sh for sh in p.placement.shards}
    for layer in range(spec.n_layers):
        b = f"blk.{layer}."
        parts = sorted({stage_of_chip[sh.chip] for sh in p.placement.shards if sh.tensor == b + "ffn_up_exps.weight"})
        assert len(parts) == 2
        for sh in p.placement.shards:
            if sh.tensor in (b + "ffn_gate_exps.bias", b + "ffn_up_exps.bias"):
                w = shards[(sh.tensor.replace(".bias", ".weight"), sh.chip)]
                assert (sh.axis, sh.start, sh.stop) == (1, w.start, w.stop)
        down = [sh for sh in p.placement.shards if sh.tensor == b + "ffn_down_exps.bias"]
        assert {stage_of_chip[sh.chip] for sh in down} == {parts[-1]}
        assert all((sh.start, sh.stop) == (0, spec.n_experts) for sh in down)
        # it is added by one op on that part, to the summed parts, with that part's own routing
        (add,) = [o for o in p.decode.ops if o.name.startswith(b + "ffn_exps_bias")]
        assert add.stage == parts[-1]
        assert set(add.inputs) == {b + "ffn_sum@1", b + "ffn_gate_inp@1"}


def test_a_gguf_is_planned_but_not_run(tmp_path):
    """The runtime executes gpt-oss (tests/test_families.py and test_executor.py check it against
    transformers and across placements) from Hugging Face weights; a GGUF (MXFP4 experts, llama.cpp's
    names) is refused in one line, saying what to use."""
    gguf = _gguf(tmp_path)
    with pytest.raises(OpenLPUError, match="cannot run gpt-oss weights from GGUF: its experts are MXFP4"):
        load_weights(gguf, spec_from_gguf(gguf))
    r = subprocess.run([sys.executable, "-m", "openlpu.cli", "run", "Hello", "--model", str(gguf)],
                       capture_output=True, text=True, timeout=300, check=False)
    assert r.returncode == 2 and "Traceback" not in r.stderr and "its experts are MXFP4" in r.stderr


def test_mxfp4_blocks_decode_as_transformers_decodes_them():
    """Second method: transformers' own MXFP4 converter (integrations.mxfp4), on random codes and scales."""
    from transformers.integrations.mxfp4 import convert_moe_packed_tensors

    g = torch.Generator().manual_seed(0)
    blocks = torch.randint(0, 256, (3, 5, 4, 16), dtype=torch.uint8, generator=g)
    scales = torch.randint(110, 140, (3, 5, 4), dtype=torch.uint8, generator=g)
    assert torch.equal(mxfp4_to_float(blocks, scales).transpose(1, 2),
                       convert_moe_packed_tensors(blocks, scales, dtype=torch.float32))


def test_a_checkpoint_with_mxfp4_experts_runs_like_transformers(tmp_path):
    """The released checkpoints store the experts as MXFP4 blocks and scales: a tiny gpt-oss saved so
    loads and runs to transformers' logits (its experts set to the codes' values by transformers'
    converter)."""
    from transformers.integrations.mxfp4 import convert_moe_packed_tensors

    hf = build("gpt-oss")
    g, stored = torch.Generator().manual_seed(2), {}
    with torch.no_grad():
        for name, param in hf.named_parameters():
            if name.endswith(("experts.gate_up_proj", "experts.down_proj")):
                experts, inputs, outputs = param.shape  # blocks of 32 run along the input, per output row
                blocks = torch.randint(0, 256, (experts, outputs, inputs // 32, 16), dtype=torch.uint8, generator=g)
                scales = torch.randint(122, 126, (experts, outputs, inputs // 32), dtype=torch.uint8, generator=g)
                param.copy_(convert_moe_packed_tensors(blocks, scales, dtype=torch.float32))
                stored[name] = blocks, scales
    folder = save(hf, tmp_path / "oss")
    tensors = load_file(folder / "model.safetensors")
    for name, (blocks, scales) in stored.items():
        del tensors[name]
        tensors[f"{name}_blocks"], tensors[f"{name}_scales"] = blocks, scales
    save_file(tensors, folder / "model.safetensors")
    spec = spec_from_hf_config(folder)
    ids = list(range(1, 24))
    with torch.no_grad():
        expected = hf(torch.tensor([ids])).logits[0]
    assert len(stored) == 2 * spec.n_layers and expected.std() > 0.5
    torch.testing.assert_close(Model(spec, load_safetensors(folder, spec)).logits(ids), expected,
                               rtol=1e-4, atol=1e-4)


def test_a_gpu_runs_the_sinks_inside_its_attention_kernel():
    """Serving stacks apply gpt-oss's sinks in the attention kernel: on the GPU model the sink rows add
    their few bytes, not a kernel launch each."""
    spec = load_preset("gpt-oss-20b")
    ops = lower(spec, "decode", 4096, 1, "fp8")
    gpu = load_gpu("h100-sxm")
    without_sinks = [o for o in ops if o.kind != "sink"]
    added = step_s(spec, ops, gpu, "fp8", 1, 1, 1) - step_s(spec, without_sinks, gpu, "fp8", 1, 1, 1)
    assert 0 < added < 0.01 * spec.n_layers * KERNEL_OVERHEAD_S


def test_widths_spanning_nodes_tie_to_the_wider():
    """gpt-oss-120b at its full window fits no TP group inside a node; TP 16 and TP 32 both take 608 chips
    (76 nodes), and the compiler takes the wider, as it does inside a node: the same hosts, a faster step."""
    spec = load_preset("gpt-oss-120b")
    workload = Workload(context_length=131072)
    wide = compile_program(spec, SYSTEM, workload)
    narrow = compile_program(spec, SYSTEM, workload, chips=608, tp=16)
    assert (wide.placement.tp, len(wide.placement.chips), len(narrow.placement.chips)) == (32, 608, 608)
    assert timing(wide).tokens_per_s_per_user > timing(narrow).tokens_per_s_per_user
