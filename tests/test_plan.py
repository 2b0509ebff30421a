"""`openlpu plan`: the LPU and GPU rows side by side, their JSON and plot, and every bad input as one
line with exit status 2."""

import dataclasses
import json
import subprocess
import sys
from pathlib import Path

import pytest

import openlpu
from openlpu.errors import OpenLPUError
from openlpu.hardware.gpu import load_gpu
from openlpu.models.spec import load_preset
from openlpu.sim.cost import CostAssumptions, cost, gpu_capex
from openlpu.sim.gpu import gpus_needed
from openlpu.sim.plan import plan
from openlpu.words import significant


def run_cli(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "openlpu.cli", "plan", *args], capture_output=True,
                          text=True, timeout=300)


PLANNED = ("model", "precision", "context", "decode_context", "prompt", "gpu_software", "draft", "draft_tokens",
           "acceptance", "years", "usd_per_kwh", "pue", "utilisation")


def plan_rows(stdout: str) -> list[dict]:
    """`plan --json`'s rows without what each says it was planned for (the same in every row)."""
    return [{k: v for k, v in row.items() if k not in PLANNED} for row in json.loads(stdout)]


def table_and_rows(*args: str) -> tuple[str, list[dict]]:
    """`openlpu plan ARGS` as a table (its whitespace collapsed) and as JSON rows, both having succeeded."""
    text, as_json = (run_cli(*args, *extra) for extra in ((), ("--json",)))
    assert text.returncode == as_json.returncode == 0, text.stderr + as_json.stderr
    return " ".join(text.stdout.split()), json.loads(as_json.stdout)


@pytest.fixture(scope="module")
def llama70_rows():
    return plan("llama-2-70b", compare=("h100-sxm",), precision="int8", context=4096, users=1)


def test_lpu_is_faster_per_user_than_h100_as_published(llama70_rows):
    """LLMPerf leaderboard (Jan 2024), Llama-2-70B: Groq 185 tok/s per request against 40-66 for the
    GPU providers: the LPU row must be several times faster per user than the H100 row."""
    lpu, h100 = llama70_rows
    assert (lpu.kind, h100.kind) == ("lpu", "gpu")
    assert lpu.tokens_per_s_per_user > 2.5 * h100.tokens_per_s_per_user
    assert lpu.chips > 300  # 70 GB of int8 weights in 230 MB chips: hundreds of chips
    assert lpu.capex_usd > 10 * h100.capex_usd  # the critiques' point: tens of times the hardware


def test_rows_are_self_consistent(llama70_rows):
    for r in llama70_rows:
        assert r.energy_per_token_j == pytest.approx(r.power_w / r.throughput_tokens_per_s)
        assert 0 < r.memory_used_fraction <= 1
    h100 = llama70_rows[1]
    spec, gpu = load_preset("llama-2-70b"), load_gpu("h100-sxm")
    assert h100.chips == gpus_needed(spec, gpu, "int8", 4096, 1)
    expected = cost(gpu_capex(gpu, h100.chips), h100.power_w, h100.throughput_tokens_per_s, CostAssumptions())
    assert h100.usd_per_million_tokens == pytest.approx(expected.usd_per_million_tokens)


def test_chip_and_gpu_counts_are_the_deployment_planned():
    """--chips / --gpus: the rows are those of the Program compiled for that many chips (which leaves the
    chips idle that its groups of 64 decode faster without) and of the GPU model on that many GPUs, read a
    second way here; more GPUs than the fewest speed a user up."""
    from openlpu.compiler import Workload, compile_program
    from openlpu.hardware.lpu import load_system
    from openlpu.sim.gpu import gpu_timing
    from openlpu.sim.timing import timing

    lpu, h100 = plan("llama-2-70b", compare=("h100-sxm",), context=4096, chips=576, gpus=8)
    spec = load_preset("llama-2-70b")
    program = compile_program(spec, load_system("lpu-v1"), Workload(context_length=4096, prompt_len=512), chips=576)
    assert (lpu.chips, lpu.layout) == (program.chips, f"{len(program.placement.stages)} x TP {program.placement.tp}")
    assert lpu.chips_idle == 576 - program.chips > 0
    assert lpu.tokens_per_s_per_user == pytest.approx(timing(program).tokens_per_s_per_user)
    assert (lpu.users_per_step, h100.users_per_step) == (program.decode.tokens, 1)
    direct = gpu_timing(spec, load_gpu("h100-sxm"), "int8", 4096, gpus=8, prompt_tokens=512)
    assert (h100.chips, h100.layout) == (8, "1 x TP 8")
    assert h100.tokens_per_s_per_user == pytest.approx(direct.tokens_per_s_per_user)
    fewest, = plan("llama-2-70b", system="", compare=("h100-sxm",), context=4096)
    assert fewest.chips < 8 and fewest.tokens_per_s_per_user < h100.tokens_per_s_per_user


def test_a_tp_width_is_the_one_planned():
    """--tp: the LPU row is the Program compiled at that width, read a second way here; a narrower group
    installs more weight bytes per chip, so a user gets fewer tokens per second."""
    from openlpu.compiler import Workload, compile_program
    from openlpu.hardware.lpu import load_system
    from openlpu.sim.timing import timing

    default, = plan("llama-3-8b", compare=(), context=8192)
    narrow, = plan("llama-3-8b", compare=(), context=8192, tp=4)
    program = compile_program(load_preset("llama-3-8b"), load_system("lpu-v1"),
                              Workload(context_length=8192, prompt_len=512), tp=4)
    assert (narrow.chips, narrow.layout) == (program.chips, f"{len(program.placement.stages)} x TP 4")
    assert narrow.tokens_per_s_per_user == pytest.approx(timing(program).tokens_per_s_per_user)
    assert default.layout.endswith("x TP 8") and narrow.tokens_per_s_per_user < default.tokens_per_s_per_user


def test_prompt_and_cost_assumptions_reach_the_rows():
    """--prompt sets the prefill behind TTFT on both sides (read a second way here); serving twice the
    hours halves $ per M tokens, since the cost over the years is the same and the tokens double."""
    from openlpu.compiler import Workload, compile_program
    from openlpu.hardware.lpu import load_system
    from openlpu.sim.gpu import gpu_timing
    from openlpu.sim.timing import timing

    spec = load_preset("llama-3-8b")
    lpu, h100 = plan("llama-3-8b", context=4096, prompt=2048)
    program = compile_program(spec, load_system("lpu-v1"), Workload(context_length=4096, prompt_len=2048))
    assert lpu.ttft_s == pytest.approx(timing(program).ttft_s)
    assert h100.ttft_s == pytest.approx(gpu_timing(spec, load_gpu("h100-sxm"), "int8", 4096, prompt_tokens=2048).ttft_s)
    short = plan("llama-3-8b", context=4096, prompt=128)
    assert all(s.ttft_s < r.ttft_s for s, r in zip(short, (lpu, h100)))
    busy = plan("llama-3-8b", context=4096, prompt=2048, assumptions=CostAssumptions(utilisation=1.0))
    for half, full in zip((lpu, h100), busy):
        assert full.usd_per_million_tokens == pytest.approx(half.usd_per_million_tokens / 2)


def test_a_decode_context_times_steps_over_fewer_tokens_than_the_window_held():
    """--decode-context: both sides hold each user's whole --context (the LPU on as many chips, the same K/V
    bytes as a Program whose steps attend it all, its stages arranged for the steps it runs; the GPUs with as much
    KV cache), while each decode step attends the shorter length, read a second way on each side; a shorter step
    is faster, the prefill the same (the LPU's: as scheduled on its placement for steps attending it all), and the
    caption says what the steps attend."""
    from openlpu.compiler import Workload, compile_program
    from openlpu.compiler.schedule import schedule_prefill
    from openlpu.hardware.lpu import load_system
    from openlpu.sim.gpu import gpu_timing
    from openlpu.sim.timing import timing

    spec = load_preset("llama-3.1-8b")
    whole = plan(spec, context=32768, users=4)
    lpu, h100 = plan(spec, context=32768, users=4, decode_context=2048)
    program, attending_all = (compile_program(spec, load_system("lpu-v1"), Workload(context_length=32768, users=4,
                                                                                    decode_context=steps))
                              for steps in (2048, None))
    assert lpu.chips == whole[0].chips == attending_all.chips

    def kv_held(program):
        return sum(stage.kv_bytes_per_chip * len(stage.chips) for stage in program.placement.stages)
    assert kv_held(program) == pytest.approx(kv_held(attending_all), rel=1e-6)
    assert lpu.tokens_per_s_per_user == pytest.approx(timing(program).tokens_per_s_per_user)
    gpu = gpu_timing(spec, load_gpu("h100-sxm"), "int8", context=2048, users=4, gpus=h100.chips, prompt_tokens=512)
    assert h100.tokens_per_s_per_user == pytest.approx(gpu.tokens_per_s_per_user)
    assert h100.memory_used_fraction == whole[1].memory_used_fraction > gpu.hbm_used_fraction
    for short, full in zip((lpu, h100), whole):
        assert short.tokens_per_s_per_user > full.tokens_per_s_per_user
    assert h100.ttft_s == whole[1].ttft_s
    attending_all_prefill = schedule_prefill(spec, program.system, attending_all.workload, program.placement)
    assert program.prefill == attending_all_prefill
    r = run_cli("llama-3.1-8b", "--context", "32768", "--decode-context", "2048")
    assert r.returncode == 0, r.stderr
    assert "decode steps attending 2,048 of the 32,768 tokens each user holds" in " ".join(r.stdout.split())
    r = run_cli("llama-3.1-8b", "--context", "32768")
    assert "decode steps attending the whole context, 32,768 tokens (--decode-context N" in " ".join(r.stdout.split())


def test_a_precision_the_matrix_unit_has_no_mode_for_is_named(tmp_path):
    """lpu-v1's matrix unit has int8 and fp16 modes: fp8 weights and activations run in the fp16 mode, at a quarter
    of int8's MACs, which plan's table and compile's summary say; int4 weights beside int8 activations run in the
    int8 mode their widest operand asks for, and nothing is said."""
    from openlpu.compiler.schedule import matrix_macs_per_cycle, matrix_mode
    from openlpu.hardware.lpu import load_system

    system = load_system("lpu-v1")
    assert matrix_macs_per_cycle(system, "fp8") == system.chip.matrix_macs_per_cycle["fp16"] == \
        system.chip.matrix_macs_per_cycle["int8"] / 4
    fp8 = run_cli("llama-3.2-1b", "--precision", "fp8", "--compare", "")
    assert "lpu-v1's matrix unit has no fp8 mode: its matmuls run in its fp16 mode." in " ".join(
        fp8.stdout.split())
    int4 = run_cli("llama-3.2-1b", "--precision", "int4", "--compare", "")
    assert int4.returncode == 0 and "matrix unit has no" not in " ".join(int4.stdout.split())
    projected = load_system("lpu-v3-projected")  # fp8 and int8 modes as narrow: int8 operands take int8's
    assert matrix_mode(projected, "int8") == matrix_mode(projected, "int4", "int8") == "int8"
    assert matrix_mode(projected, "fp8") == "fp8" and matrix_mode(system, "fp8") == "fp16"
    compiled = {precision: subprocess.run([sys.executable, "-m", "openlpu.cli", "compile", "llama-3.2-1b", "-o",
                                           str(tmp_path / "p.prog"), "--precision", precision], capture_output=True,
                                          text=True, check=False)
                for precision in ("fp8", "int4")}
    assert "lpu-v1's matrix unit has no fp8 mode: its matmuls run in its fp16 mode" in " ".join(
        compiled["fp8"].stdout.split())
    assert compiled["int4"].returncode == 0 and "matrix unit has no" not in compiled["int4"].stdout


def test_smaller_prefill_chunks_let_wider_groups_fit_and_fill_the_pipeline_sooner():
    """--prefill-chunk: Llama 3.3 70B's fewest chips, 336, hold 42 stages of TP 8 with the activation buffers of
    256-token chunks; with 128-token chunks' buffers 21 stages of TP 16 fit them too, and the wider groups decode
    faster, so without the flag the compiler takes 128. On the same 42 stages of TP 8, smaller chunks fill the
    pipeline sooner: a 4,096-token prompt's first token comes earlier. The row is the Program compiled so (a
    second way), and the caption says the chunk and who chose it."""
    from openlpu.compiler import Workload, compile_program
    from openlpu.hardware.lpu import load_system
    from openlpu.sim.timing import timing

    spec, system = load_preset("llama-3.3-70b"), load_system("lpu-v1")
    wide, = plan(spec, compare=(), prefill_chunk=128)
    narrow, = plan(spec, compare=(), prefill_chunk=256)
    assert wide.chips == narrow.chips == 336 and (wide.layout, narrow.layout) == ("21 x TP 16", "42 x TP 8")
    assert wide.tokens_per_s_per_user > 1.3 * narrow.tokens_per_s_per_user
    assert plan(spec, compare=()) == [wide]
    program = compile_program(spec, system, Workload(prefill_chunk=128))
    assert wide.tokens_per_s_per_user == pytest.approx(timing(program).tokens_per_s_per_user)
    long_prompt = [timing(compile_program(spec, system, Workload(prompt_len=4096, prefill_chunk=c), tp=8)).ttft_s
                   for c in (128, 256)]
    assert long_prompt[0] < long_prompt[1]
    given, chosen = (" ".join(run_cli("llama-3.3-70b", "--compare", "", *flag).stdout.split())
                     for flag in (("--prefill-chunk", "128"), ()))
    assert "(the LPU's in chunks of 128 tokens, as given)" in given
    assert "(the LPU's in chunks of 128 tokens, the compiler's choice: --prefill-chunk)" in chosen
    # the chips are the compiler's either way; the chunk is only where it chose it
    assert "fewest chips that hold the workload at the compiler's width (--tp all" in given
    assert "fewest chips that hold the workload at the compiler's width and chunk (--tp all" in chosen


@pytest.mark.parametrize("precision, kv", [("int4", "int8"), ("fp4", "fp8")])
def test_four_bit_weights_plan_an_eight_bit_kv_cache_on_both_sides(precision, kv):
    """At 4-bit weights both sides hold the KV cache and the activations at 8 bits, as GPU serving stacks do:
    the LPU row is the Program compiled with an 8-bit KV cache and activations (a second way), whose chips
    differ from a 4-bit cache's at this KV-heavy size, and the GPU row holds the same KV bytes; the table's
    title says so."""
    from openlpu.compiler import Workload, compile_program
    from openlpu.hardware.lpu import load_system
    from openlpu.sim.gpu import gpu_timing
    from openlpu.sim.timing import timing

    spec, system = load_preset("llama-3.1-8b"), load_system("lpu-v1")
    lpu, h100 = plan("llama-3.1-8b", precision=precision, context=32768, users=4)

    def compiled(kv_precision):
        return compile_program(spec, system, Workload(weights=precision, activations=kv, kv=kv_precision,
                                                      context_length=32768, users=4))
    eight_bit = compiled(kv)
    assert lpu.chips == eight_bit.chips != compiled(precision).chips
    assert lpu.tokens_per_s_per_user == pytest.approx(timing(eight_bit).tokens_per_s_per_user)
    gpu = gpu_timing(spec, load_gpu("h100-sxm"), precision, context=32768, users=4)
    assert gpu.kv_bytes_per_gpu * gpu.gpus == spec.kv_bytes_per_token(1) * 32768 * 4
    assert h100.chips == gpu.gpus
    title = " ".join(run_cli("llama-3.1-8b", "--precision", precision).stdout.split())
    assert f"at {precision} (activations and KV cache {kv})" in title


def test_the_table_counts_in_words_and_keeps_small_fractions():
    """One user is '1 user', not '1 user(s)'; Gemma 3 270M's 0.5% of an H100's memory is not rounded to 0%
    (the row's own fraction, a second reading)."""
    from openlpu.words import counted, significant

    assert [counted(n, "user") for n in (1, 2, 16384)] == ["1 user", "2 users", "16,384 users"]
    assert [significant(v) for v in (1807.4, 0.01, 0.0115, 29.84, 40)] == ["1,807", "0.0100", "0.0115", "29.8", "40"]
    r = run_cli("gemma-3-270m")
    assert r.returncode == 0, r.stderr
    said = " ".join(r.stdout.split())
    assert "gemma-3-270m at int8, 1 user x 4,096 tokens of context" in said and "(s)" not in said
    gpu = plan("gemma-3-270m")[1]
    assert gpu.memory_used_fraction < 0.01 and f"{gpu.memory_used_fraction:.2%} of HBM" in said


def test_cli_table_states_the_prompt_and_the_cost_assumptions():
    r = run_cli("llama-3-8b", "--context", "2048", "--prompt", "1024", "--utilisation", "0.8", "--years", "4",
                "--usd-per-kwh", "0.07", "--pue", "1.1")
    assert r.returncode == 0, r.stderr
    text = " ".join(r.stdout.split())
    assert "prefill of a 1,024-token prompt" in text and "TCO: capex plus 4 years of power" in text
    assert "$0.07/kWh at the wall (PUE 1.1)" in text and "serving 80% of the hours" in text
    assert "IT power: chips and their hosts (servers), before PUE" in text and "TCO, 4 years ($M)" in text
    # prices and shares written as given, not rounded away (a price of $0.004/kWh read "$0.00/kWh")
    text = " ".join(run_cli("gemma-3-270m", "--usd-per-kwh", "0.004", "--utilisation", "0.004").stdout.split())
    assert "$0.004/kWh" in text and "serving 0.40% of the hours" in text
    assert "The LPU on the fewest chips that hold the workload at the compiler's width and chunk (--tp all: every TP " \
        "width" in text


def test_several_widths_chip_counts_and_gpu_counts_are_a_row_each():
    """--tp 2,8 / --chips / --gpus 1,2: a row for each value (every chip count with every width), each the
    row planned with that value alone."""
    def alone(**given):
        row, = plan("llama-3.2-1b", context=2048, **given)
        return row

    rows = plan("llama-3.2-1b", context=2048, tp=(2, 8), gpus=(1, 2))
    assert rows == [alone(tp=2, compare=()), alone(tp=8, compare=()), alone(system="", gpus=1),
                    alone(system="", gpus=2)]
    assert [(r.chips, r.layout) for r in rows] == [(r.chips, r.layout) for r in rows[:2]] + [(1, "1 x TP 1"),
                                                                                              (2, "1 x TP 2")]
    chunked = plan("llama-3.2-1b", context=2048, compare=(), prefill_chunk=(256, 64))
    assert chunked == [alone(compare=(), prefill_chunk=c) for c in (256, 64)]
    # a value given twice is one row
    twice = plan("llama-3.2-1b", context=2048, tp=(2, 8, 2), compare=("h100-sxm", "h100-sxm"), gpus=(1, 1))
    assert twice == [*rows[:2], alone(system="", gpus=1)]
    assert [r.prefill_chunk for r in chunked + rows[2:]] == [256, 64, None, None]  # a GPU prefills in one pass
    for empty in ("chips", "tp", "gpus", "prefill_chunk"):  # an empty list of values is not a plan without the system
        with pytest.raises(OpenLPUError, match=f"{empty}: give at least one value"):
            plan("llama-3.2-1b", context=2048, **{empty: ()})
    counts = plan("llama-3.2-1b", context=2048, compare=(), chips=(8, 16), tp=(4, 8))
    assert counts == [alone(compare=(), chips=n, tp=t) for n in (8, 16) for t in (4, 8)]
    assert [(r.chips + r.chips_idle, r.layout.split(" x ")[1]) for r in counts] == [
        (8, "TP 4"), (8, "TP 8"), (16, "TP 4"), (16, "TP 8")]


def test_several_user_counts_are_a_column_each():
    """--users 1,16: the LPU's rows for each count, then each GPU's, each the row planned with that count alone; the
    table says which column serves how many, its title all of them, and its JSON rows carry them."""
    def alone(**given):
        return plan("llama-3.2-1b", context=2048, **given)

    rows = plan("llama-3.2-1b", context=2048, users=(1, 16, 1))  # a count given twice is one column
    lpu1, gpu1 = alone(users=1)
    lpu16, gpu16 = alone(users=16)
    assert rows == [lpu1, lpu16, gpu1, gpu16] and [r.users for r in rows] == [1, 16, 1, 16]
    assert lpu16.users_per_step > 1 and lpu16.throughput_tokens_per_s > lpu1.throughput_tokens_per_s
    with pytest.raises(OpenLPUError, match="users: give at least one value"):
        plan("llama-3.2-1b", context=2048, users=())
    said, json_rows = table_and_rows("llama-3.2-1b", "--context", "2048", "--users", "1,16")
    assert "llama-3.2-1b at int8, 1 or 16 users x 2,048 tokens of context" in said
    assert "│ users │ 1 │ 16 │ 1 │ 16 │" in said
    assert [row["users"] for row in json_rows] == [1, 16, 1, 16]
    for users, says in (("0,4", "--users must be a positive integer, got 0"),
                        ("4,x", "--users takes whole numbers, one or several separated by commas")):
        bad = run_cli("llama-3.2-1b", "--users", users)
        assert bad.returncode == 2 and says in bad.stderr and len(bad.stderr.strip().splitlines()) == 1


def test_a_table_wider_than_the_terminal_is_split_not_cut():
    """At 80 columns `--tp all` on a 70B makes 8 columns: printed as tables of a few columns each, every one
    with the figures' labels, rather than one whose figures rich cuts to fit ('1,0…' for 1,022); the prefill
    chunk the compiler chose for each width has its row, as the chunks differ."""
    import os

    result = subprocess.run([sys.executable, "-m", "openlpu.cli", "plan", "llama-3.3-70b", "--tp", "all"],
                            capture_output=True, text=True, timeout=300, env={**os.environ, "COLUMNS": "80"},
                            check=False)
    assert result.returncode == 0, result.stderr
    lines = result.stdout.splitlines()
    assert "…" not in result.stdout and max(map(len, lines)) <= 80
    assert "(1 of 2)" in result.stdout and "(2 of 2)" in result.stdout
    rows = json.loads(run_cli("llama-3.3-70b", "--tp", "all", "--json").stdout)
    tok_s = [cell for line in lines if line.startswith("│ tok/s per user") for cell in line.split("│")[2:-1]]
    assert [c.strip() for c in tok_s] == [significant(r["tokens_per_s_per_user"]) for r in rows]
    chunks = [c.strip() for line in lines if line.startswith("│ prefill chunk") for c in line.split("│")[2:-1]]
    assert chunks == [f"{r['prefill_chunk']:,}" if r["prefill_chunk"] else "-" for r in rows]


def test_tp_all_is_every_width_that_places_the_model_each_on_its_fewest_chips():
    """--tp all: a row per TP width the model can be split over, narrowest first, each the row of that width
    alone (on its fewest chips); on chips too small for the narrow widths' attention, exactly the widths
    the compiler refuses are left out, and its refusal names the ones it places in."""
    import dataclasses

    from openlpu.compiler import compile_program, verify
    from openlpu.compiler.partition import tp_candidates
    from openlpu.hardware.lpu import load_system
    from openlpu.sim.plan import lpu_workload, placeable_widths

    every = plan("llama-3.2-1b", context=2048, compare=(), tp="all")
    system, spec = load_system("lpu-v1"), load_preset("llama-3.2-1b")
    assert [int(r.layout.split("TP ")[1]) for r in every] == sorted(tp_candidates(spec, system)) == [1, 2, 4, 8, 16, 32]
    assert every == [plan("llama-3.2-1b", context=2048, compare=(), tp=t)[0] for t in (1, 2, 4, 8, 16, 32)]
    small = dataclasses.replace(system, chip=dataclasses.replace(system.chip, sram_bytes=6_000_000))
    workload = lpu_workload("int8", 2048, 1, 512, 256)
    widths = placeable_widths(spec, small, workload)
    assert widths == [4, 8, 16, 32]
    for t in tp_candidates(spec, small):
        if t in widths:
            assert verify(compile_program(spec, small, workload, tp=t)) == []
            continue
        with pytest.raises(OpenLPUError, match=rf"does not fit in TP groups of {t}: L0.attn alone needs \d+ MB per "
                                               r"chip \(its weights and buffers, with one token's K and V\) at that "
                                               r"width, and a chip holds 6 MB; it places in TP groups of 4, 8, 16, "
                                               r"32: use one of those with --tp"):
            compile_program(spec, small, workload, tp=t)


def test_cli_columns_for_several_values(tmp_path):
    """On the command line the values come comma-separated or with the flag again, as --compare's names do; the
    JSON rows are the API's, and the plot draws them all (a system's several rows apart)."""
    png = tmp_path / "plan.png"
    given, repeated = (run_cli("llama-3.2-1b", "--context", "2048", "--json", *flags) for flags in (
        ("--tp", "2,8", "--gpus", "1,2", "--prefill-chunk", "256,64", "--plot", str(png)),
        ("--tp", "2", "--tp", "8", "--gpus", "1", "--gpus", "2", "--prefill-chunk", "256", "--prefill-chunk", "64")))
    assert given.returncode == repeated.returncode == 0, given.stderr + repeated.stderr
    assert json.loads(given.stdout) == json.loads(repeated.stdout)
    assert plan_rows(given.stdout) == [
        r.to_dict() for r in plan("llama-3.2-1b", context=2048, tp=(2, 8), gpus=(1, 2), prefill_chunk=(256, 64))]
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    text = run_cli("llama-3.2-1b", "--context", "2048", "--prefill-chunk", "256,64", "--compare", "")
    said = " ".join(text.stdout.split())
    assert text.returncode == 0 and "the LPU's in chunks of 256 or 64 tokens, a column each" in said, text.stderr
    assert "│ prefill chunk │ 256 │ 64 │" in said


def test_compute_used_reads_the_programs_flops_and_the_presets_peaks():
    """MFU a second way: the FLOPs the Program's matrix units run per token (per-chip FLOPs x chips of
    each stage) at the row's throughput, over the peak the presets give for the chips used; under the
    schedule's matrix busy fraction (an op lasts at least its FLOPs over the rate) and, on the GPU,
    under COMPUTE_EFFICIENCY (the roofline). Users in flight fill the LPU pipeline and raise it. The
    further parts of an MLP cut between stages recompute its router: copies, not the model's FLOPs."""
    from openlpu.compiler import Workload, compile_program
    from openlpu.compiler.partition import CUT_SEPARATOR, fewest_chips, op_role
    from openlpu.hardware.lpu import load_system
    from openlpu.sim.gpu import COMPUTE_EFFICIENCY
    from openlpu.sim.timing import timing

    spec, system, h100_spec = load_preset("mixtral-8x7b"), load_system("lpu-v1"), load_gpu("h100-sxm")
    for users in (1, 8):
        # on the fewest chips that hold it in groups of 8 with its MLPs cut by d_ff rows, every chip gets its share
        # of the routed work; cut by expert rows, a chip's ops reserve the most the routing can send it instead
        workload = Workload(context_length=2048, prompt_len=512, users=users)
        t, stages, _ = fewest_chips(spec, system, dataclasses.replace(workload, prefill_chunk=256), widths=[8],
                                    cuts=(False,))
        lpu, h100 = plan("mixtral-8x7b", context=2048, users=users, gpus=4, tp=8, chips=t * stages)
        program = compile_program(spec, system, workload, tp=8, chips=t * stages)
        assert not program.placement.experts
        width = {s.index: len(s.chips) for s in program.placement.stages}
        copies = [o for o in program.decode.ops if CUT_SEPARATOR in o.name and op_role(o) == "replicated"]
        assert any(o.unit == "matrix" for o in copies)
        flops = sum(o.flops_per_chip * width[o.stage] for o in program.decode.ops
                    if o.unit == "matrix" and o not in copies)
        peak = 2 * system.chip.matrix_macs_per_cycle["int8"] * system.chip.clock_hz * program.chips
        assert lpu.compute_used_fraction == pytest.approx(flops * lpu.throughput_tokens_per_s / peak, rel=1e-3)
        assert lpu.compute_used_fraction <= timing(program).unit_utilisation["matrix"]
        gpu_peak = 4 * h100_spec.dense_flops_per_s["int8"]
        assert h100.compute_used_fraction == pytest.approx(flops * h100.throughput_tokens_per_s / gpu_peak, rel=1e-3)
        assert h100.compute_used_fraction < COMPUTE_EFFICIENCY
    assert lpu.compute_used_fraction > 4 * plan("mixtral-8x7b", context=2048, gpus=4, tp=8)[0].compute_used_fraction


def test_more_users_raise_throughput_on_the_gpu():
    one, = plan("llama-3-8b", system="", compare=("h100-sxm",), context=2048, users=1)
    many, = plan("llama-3-8b", system="", compare=("h100-sxm",), context=2048, users=16)
    assert many.throughput_tokens_per_s > 8 * one.throughput_tokens_per_s  # decode is bandwidth-bound
    assert many.tokens_per_s_per_user < one.tokens_per_s_per_user


def test_gpu_software_moves_only_grouped_query_attention_on_the_gpu():
    """Once per query head, decode attention reads each KV head of Llama 3 70B (64 query heads share 8 KV
    heads) 8 times: more bytes per step, never fewer. The LPU row and a model without grouped KV heads
    (Llama 2 7B, 32 KV heads for 32 query heads) do not move; the CLI's caption names the kernels."""
    grouped, per_query_head = (plan("llama-3-70b", gpu_software=s, context=8192, users=32)
                               for s in ("gqa-kernels", "tensorrt-llm-0.5"))
    assert grouped[0] == per_query_head[0]
    assert per_query_head[1].throughput_tokens_per_s < 0.7 * grouped[1].throughput_tokens_per_s
    assert per_query_head[1].usd_per_million_tokens > grouped[1].usd_per_million_tokens
    mha = [plan("llama-2-7b", system="", gpu_software=s, context=4096, users=32)
           for s in ("gqa-kernels", "tensorrt-llm-0.5")]
    assert mha[0] == mha[1]
    text = " ".join(run_cli("llama-3-8b", "--gpu-software", "tensorrt-llm-0.5").stdout.split())
    assert "GPU decode attention: TensorRT-LLM 0.5" in text and "GPU experts" not in text


def test_the_caption_warns_that_gpu_experts_run_faster_than_measured():
    """A mixture of experts on the GPU is timed as its experts' roofline plus a routing cost per token fitted on
    one row (long outputs of Qwen3-30B-A3B on a B200 ran up to 29% slower than that, bench/results/fidelity.md):
    the caption says so (and for a dense model does not: the test above)."""
    moe = " ".join(run_cli("mixtral-8x7b", "--context", "4096").stdout.split())
    assert "GPU experts: a roofline of their work plus a routing cost per token" in moe


def test_cli_json_and_plot(tmp_path):
    png = tmp_path / "plan.png"
    r = run_cli("llama-3-8b", "--system", "", "--compare", "h100-sxm", "--compare", "a100-80gb",
                "--context", "2048", "--json", "--plot", str(png))
    assert r.returncode == 0, r.stderr
    rows = json.loads(r.stdout)
    assert [x["system"] for x in rows] == ["h100-sxm", "a100-80gb"]
    assert rows[0]["tokens_per_s_per_user"] > rows[1]["tokens_per_s_per_user"]  # 3.35 vs 2.04 TB/s
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    both = run_cli("llama-3-8b", "--system", "", "--compare", "h100-sxm,a100-80gb", "--context", "2048", "--json")
    assert json.loads(both.stdout) == rows  # the flag given twice, or once with the names separated by commas


def test_an_empty_compare_plans_the_lpu_alone():
    """`--compare ''` leaves the default GPU out: the one row is the LPU's, as the API gives it with no GPUs."""
    r = run_cli("llama-3-8b", "--compare", "", "--context", "2048", "--json")
    assert r.returncode == 0, r.stderr
    assert plan_rows(r.stdout) == [row.to_dict() for row in plan("llama-3-8b", compare=(), context=2048)]
    # each row says what it was planned for, so that a saved file still does (no GPU software without GPUs)
    assert {k: json.loads(r.stdout)[0][k] for k in PLANNED} == {
        "model": "llama-3-8b", "precision": "int8", "context": 2048, "decode_context": 2048, "prompt": 512,
        "gpu_software": None, "draft": None, "draft_tokens": None, "acceptance": None,
        "years": 3.0, "usd_per_kwh": 0.10, "pue": 1.3, "utilisation": 0.5}


def test_a_terminal_sees_what_is_compiling_and_a_pipe_does_not():
    """While plan compiles (a long prompt's prefill takes a minute), a terminal's stderr says what is being
    compiled; piped, stderr stays empty and --json's stdout is the rows alone."""
    import os
    import pty

    primary, secondary = pty.openpty()
    args = [sys.executable, "-m", "openlpu.cli", "plan", "gemma-3-270m", "--prompt", "1000", "--json"]
    shown = subprocess.Popen(args, stdout=subprocess.PIPE, stderr=secondary, env={**os.environ, "TERM": "xterm"})
    os.close(secondary)
    seen = b""
    while True:  # read as it comes, so the spinner's frames never fill the terminal's buffer
        try:
            chunk = os.read(primary, 4096)
        except OSError:  # the child closed the terminal: everything written has been read
            break
        if not chunk:
            break
        seen += chunk
    os.close(primary)
    stdout, _ = shown.communicate(timeout=300)
    assert shown.returncode == 0 and json.loads(stdout)
    assert b"compiling gemma-3-270m for lpu-v1" in seen and b"1,000-token prefill in chunks the compiler" in seen, seen
    piped = run_cli("gemma-3-270m", "--prompt", "1000", "--json")
    assert piped.returncode == 0 and piped.stderr == "" and json.loads(piped.stdout)


@pytest.mark.slow  # about 4 minutes: 680 plans
def test_every_preset_plans_or_says_what_does_not_fit():
    """Every model preset at every precision, three contexts and 1 or 4 users: each plan compiles a
    Program that holds every invariant (lpu_row verifies it), or is refused because a piece does not
    fit any system; never a Program that fails verification, never another error."""
    from openlpu.models.spec import preset_names

    for name in preset_names():
        window = load_preset(name).context_length
        for precision in ("int8", "fp16", "int4", "fp8", "fp4"):
            for context in sorted({512, min(8192, window), window}):
                for users in (1, 4):
                    try:
                        rows = plan(name, compare=("h100-sxm",), precision=precision, context=context, users=users)
                    except OpenLPUError as e:
                        assert "does not fit on any" in str(e), (name, precision, context, users, str(e))
                        continue
                    assert all(r.tokens_per_s_per_user > 0 and 0 < r.memory_used_fraction <= 1 for r in rows)


@pytest.mark.slow  # about a minute: 50 plans of up to 10,024 chips
def test_many_users_at_the_full_window_plan_or_say_what_does_not_fit():
    """Every model preset at its own context window with 64 and 256 users: their K and V spread over
    hundreds to thousands of chips, so results fan out across many nodes and racks; each plan holds every
    invariant (the global links included) or is refused because no system is large enough."""
    from openlpu.models.spec import preset_names

    for name in preset_names():
        for users in (64, 256):
            try:
                rows = plan(name, compare=(), context=load_preset(name).context_length, users=users)
            except OpenLPUError as e:
                assert "does not fit on any" in str(e), (name, users, str(e))
                continue
            assert rows[0].chips > 16 and rows[0].tokens_per_s_per_user > 0


def test_plan_says_which_chips_asked_for_stay_idle():
    """On 41 chips Llama 3.1 8B decodes fastest in groups of 8 on 40 of them: the table says so (a row of
    idle chips, and why in the caption), and its JSON row counts the idle chip beside the 40 in use (their
    capex, power and SRAM figures)."""
    said, (row,) = table_and_rows("llama-3.1-8b", "--chips", "41", "--compare", "")
    assert "1 of the 41 LPU chips asked for stay idle, left out of power and cost: on 40, the TP groups" in said
    assert "│ idle of --chips │ 1 of 41 │" in said
    assert (row["chips"], row["chips_asked"], row["chips_idle"], row["layout"]) == (40, 41, 1, "5 x TP 8")
    # with a draft on chips of its own, the row counts them too, and the note still the target's (it said "1 of
    # the 49 LPU chips asked for stay idle: on 48")
    drafted = run_cli("llama-3.1-8b", "--chips", "41", "--compare", "", "--draft", "llama-3.2-1b", "--acceptance",
                      "0.7")
    assert drafted.returncode == 0, drafted.stderr
    said = " ".join(drafted.stdout.split())
    assert "1 of the 41 LPU chips asked for stay idle, left out of power and cost: on 40, the TP groups" in said


def test_a_gguf_file_plans_as_its_preset(gemma_path):
    """`openlpu plan` reads a GGUF file's metadata (not its weights): the embedded Gemma 3 270M plans to
    the same rows as its preset."""
    r = run_cli(str(gemma_path), "--json")
    assert r.returncode == 0, r.stderr
    assert plan_rows(r.stdout) == [row.to_dict() for row in plan("gemma-3-270m")]


@pytest.mark.parametrize("args, says", [
    (["llama-2-7"], "did you mean llama-2-7b"),
    ([__file__], "is neither a .gguf file nor a config.json"),
    (["/no/such/checkpoint/"], "'/no/such/checkpoint/' not found"),
    (["70b"], "did you mean llama-2-70b, llama-3-70b, llama-3.1-70b, llama-3.3-70b?"),  # held in the names
    (["llama-3-8b", "--chips", "8", "--tp", "16", "--compare", ""],
     "a TP group of 16 chips is wider than the 8 chips given; give at least 48 chips (--chips 48) or a narrower --tp"),
    (["llama-2-70b", "--system", "lpu-v2x"], "unknown LPU system"),
    (["llama-2-70b", "--compare", "h100"], "did you mean"),
    (["llama-2-70b", "--system", "h100-sxm"], "'h100-sxm' is a GPU, not an LPU system: give it with --compare"),
    (["llama-2-70b", "--compare", "lpu-v1"], "'lpu-v1' is an LPU system, not a GPU: give it with --system"),
    (["llama-2-70b", "--compare", "", "--precision", "fp32"],
     "choose another --precision (weights and activations; `compile` also takes --kv-precision) or another --system"),
    (["llama-2-70b", "--precision", "fp5"], "unknown precision"),
    (["llama-2-70b", "--system", "", "--precision", "fp32"], "h100-sxm gives no tensor throughput for fp32 math"),
    (["llama-2-70b", "--context", "100000"], "context window"),
    (["llama-2-70b", "--context", "0"], "positive"),
    (["llama-2-70b", "--users", "-3"], "positive"),
    (["llama-2-70b", "--system", "", "--users", "10000000"], "GPUs hold"),
    (["llama-2-70b", "--system", "", "--compare", ""], "nothing to plan"),
    (["llama-2-70b", "--plot", "plan.svg"], "give a file name ending in .png"),
    (["llama-2-70b", "--plot", "/no/such/folder/plan.png"], "cannot write the plot"),
    # a column that does not fit, with no other: one error (beside another, it is named below the table)
    (["llama-2-70b", "--chips", "10", "--compare", ""], "needs at least 322 chips"),  # in 64-token chunks
    (["llama-2-70b", "--chips", "0"], "positive"),
    (["llama-2-70b", "--tp", "3"], "TP 3 is not a width llama-2-70b can be split over"),
    (["llama-2-70b", "--tp", "0"], "positive"),
    (["llama-2-70b", "--tp", "eight"], ("--tp takes whole numbers, one or several separated by commas (e.g. --tp 8,16), "
                                        "or all; got 'eight'")),
    (["llama-2-70b", "--tp", "8,all"], "--tp takes whole numbers"),
    (["llama-2-70b", "--tp", "all", "--chips", "576"], "--tp all places each width on its fewest chips"),
    (["llama-2-70b", "--gpus", "1,x"], "--gpus takes whole numbers, one or several separated by commas"),
    (["llama-2-70b", "--chips", "336 448"], "--chips takes whole numbers"),
    (["llama-2-70b", "--tp", ","], "--tp takes whole numbers"),  # not a plan without the LPU
    (["llama-2-70b", "--gpus", " "], "--gpus takes whole numbers"),
    (["llama-2-70b", "--users", "1,,2"], "--users takes whole numbers, one or several separated by commas (e.g. "
                                         "--users 8,16); got '1,,2'"),
    (["llama-2-70b", "--chips", "576,"], "--chips takes whole numbers"),
    (["llama-2-70b", "--prefill-chunk", "128,0"], "--prefill-chunk must be a positive integer, got 0"),
    (["llama-2-70b", "--prefill-chunk", "big"], "--prefill-chunk takes whole numbers"),
    (["llama-3.1-405b", "--tp", "1", "--compare", ""], ("does not fit in TP groups of 1: L0.attn alone needs 577 "
                                                         "MB per chip (its weights and buffers, with one token's K "
                                                         "and V) at that width, and a chip holds 230 MB; it places "
                                                         "in TP groups of 4, 8, 16, 32, 64")),
    (["llama-2-70b", "--tp", "4", "--chips", "334", "--compare", ""], "it fits on 324 chips"),
    (["llama-2-70b", "--gpus", "12"], "whole servers of 8"),
    (["llama-2-70b", "--gpus", "0"], "positive"),
    (["llama-2-70b", "--precision", "fp16", "--gpus", "1", "--system", ""], "cannot hold llama-2-70b's 138.0 GB"),
    (["llama-2-70b", "--prompt", "5000"], "--prompt 5000 is longer than --context 4096"),
    (["llama-2-70b", "--prompt", "0"], "--prompt must be a positive integer"),
    (["llama-2-70b", "--decode-context", "5000"], "--decode-context 5000 is longer than --context 4096"),
    (["llama-2-70b", "--decode-context", "0"], "--decode-context must be a positive integer"),
    (["llama-2-70b", "--prefill-chunk", "-8"], "--prefill-chunk must be a positive integer"),
    (["llama-2-70b", "--prefill-chunk", "0"], "--prefill-chunk must be a positive integer, got 0"),
    (["llama-2-70b", "--utilisation", "1.5"], "utilisation (--utilisation) must be at most 1"),
    (["llama-2-70b", "--pue", "0.9"], "pue (--pue) must be at least 1 (wall power / IT power;"),
    (["llama-2-70b", "--utilisation", "0"], "utilisation (--utilisation) must be a positive, finite number"),
    (["llama-2-70b", "--years", "-1"], "years (--years) must be a positive, finite number"),
    (["llama-2-70b", "--years", "inf"], "years (--years) must be a positive, finite number, got inf"),
    (["llama-2-70b", "--usd-per-kwh", "0"], "usd_per_kwh (--usd-per-kwh) must be a positive, finite number"),
    (["llama-2-70b", "--usd-per-kwh", "inf"], "usd_per_kwh (--usd-per-kwh) must be a positive, finite number, got inf"),
    (["llama-3.1-70b", "--draft", "llama-3.2-1b"], "--draft needs --acceptance"),
    (["llama-3.1-70b", "--acceptance", "0.7"], "give the draft model with --draft"),
    (["llama-3.1-70b", "--draft", "gemma-3-1b", "--acceptance", "0.7"], "a draft must share the target's tokenizer"),
    (["llama-3.1-70b", "--draft", "llama-3.2-1b", "--acceptance", "1.5"], "--acceptance must be between 0 and 1"),
    (["llama-3.1-8b", "--draft", "llama-3.1-70b", "--acceptance", "0.7"], "a draft must be smaller than the target"),
    (["llama-3.1-70b", "--draft", "llama-3.2-1b", "--acceptance", "0.7", "--draft-tokens", "0"],
     "--draft-tokens must be a positive integer"),
    (["llama-3.1-70b", "--draft", "llama-3.2-1", "--acceptance", "0.7"], "did you mean llama-3.2-1b"),
    (["llama-2-70b", "--gpu-software", "xqa"], "unknown GPU software 'xqa'; choose one of: tensorrt-llm-0.5"),
    (["llama-2-70b", "--gpu-software", "gqa"], "did you mean gqa-kernels?"),
    (["llama-2-70b", "--system", "", "--chips", "8", "--tp", "all"],
     "--chips, --tp describe a system this plan leaves out (--system '')"),
    (["llama-2-70b", "--compare", "", "--gpus", "2"], "--gpus describes a system this plan leaves out (--compare '')"),
    (["llama-2-70b", "--compare", "", "--gpu-software", "tensorrt-llm-1.0"],
     "--gpu-software describes a system this plan leaves out (--compare '')"),
    (["llama-3.1-8b", "--draft", "nosuch", "--acceptance", "0.7"], "--draft: unknown model 'nosuch'"),
    (["llama-3.1-70b", "--draft", "llama-3.2-1b", "--acceptance", "0.7", "--draft-tokens", "5000", "--context", "100"],
     "--draft-tokens 5000: a round's drafts and the token before them must fit the --context 100"),
    (["llama-2-70b", "--prefill-chunk", "8192"], "--prefill-chunk 8192 is longer than --context 4096"),
    (["llama-2-70b", "--users", "8" + "0" * 400], "--users must be a positive integer of at most 2**53"),
    (["llama-2-70b", "--system", "", "--gpus", "100000"], "more than llama-2-70b's 80 layers; use at most 640"),
    (["gemma-3-270m", "--system", "", "--users", "300000", "--context", "32768"],
     "at most 1024 of them in at most 18 pipeline stages (a layer each)"),  # 228 stages of 4 before
    (["llama-2-70b", "--years", "1e-320"], "years (--years) must be at least 0.00274 (a day to a century)"),
    (["llama-2-70b", "--pue", "1e306"], "pue (--pue) must be at most 3"),
    (["llama-2-70b", "--utilisation", "1e-320"],  # the assumptions named, as given
     "the cost assumptions (years 3.0, usd_per_kwh 0.1, pue 1.3, utilisation 1e-320) price no finite cost per token"),
    (["llama-2-70b", "--plot", ""], "give a file name ending in .png"),
    (["llama-2-70b", "--plot", "chart.png/"], "give a file name ending in .png"),
    ([""], "no model given"),
    (["LLAMA-3.2-1B"], "did you mean llama-3.2-1b"),  # names are lower case: a typo in case is still close
    (["llama-3.2-1b", "--precision", "INT8"], "did you mean 'int8'"),
    (["llama-3.2-1b", "--context", "131072", "--users", "100000"], "its weights and KV cache alone take"),  # at once
    (["a" * 300], "File name too long"),  # the file system's words
    (["llama-2-70b", "--system", "b" * 300 + ".json"], "cannot read hardware file"),
])
def test_bad_input_is_one_line_and_exit_2(args, says):
    r = run_cli(*args)
    assert r.returncode == 2
    assert says in r.stderr and "Traceback" not in r.stderr
    assert len(r.stderr.strip().splitlines()) == 1


def test_names_from_files_are_printed_as_written(tmp_path):
    """A model's and a system's names come from files: rich markup in them ('[/]', which closes no tag) is
    printed as written, in tables, titles and errors alike (it raised MarkupError, a traceback)."""
    config = {"_name_or_path": "[/]tiny[bold]", "model_type": "llama", "architectures": ["LlamaForCausalLM"],
              "vocab_size": 32000, "hidden_size": 2048, "num_hidden_layers": 4, "num_attention_heads": 16,
              "num_key_value_heads": 4, "intermediate_size": 8192, "max_position_embeddings": 4096,
              "rms_norm_eps": 1e-5, "rope_theta": 10000.0, "hidden_act": "silu", "tie_word_embeddings": False}
    (tmp_path / "config.json").write_text(json.dumps(config))
    system = json.loads((Path(openlpu.__file__).parent / "hardware" / "presets" / "lpu-v1.json").read_text())
    (tmp_path / "chip.json").write_text(json.dumps({**system, "name": "[/]chip"}))
    r = run_cli(str(tmp_path / "config.json"), "--system", str(tmp_path / "chip.json"), "--compare", "")
    assert r.returncode == 0 and "[/]tiny[bold] at int8" in r.stdout and "[/]chip (lpu)" in r.stdout, r.stderr
    r = run_cli("[/]x")
    assert r.returncode == 2 and "'[/]x' not found" in r.stderr and "Traceback" not in r.stderr


def test_groups_spanning_nodes_stand_in_the_racks_they_fill():
    """Llama 2 70B on 576 chips: in node-wide groups its 72 nodes fill 8 racks of 9; in its faster groups of
    64 chips (8 nodes, inside one rack) the same 72 nodes stand in 9 racks. The plan prices the racks the
    Program's chips stand in: one rack more, the chips, hosts and cables alike. A draft's chips start after
    the target's last node, so the two never share a chip."""
    from openlpu.compiler import Workload, compile_program
    from openlpu.hardware.lpu import load_system
    from openlpu.sim.cost import RACK_USD
    from openlpu.sim.plan import draft_offset

    (wide,), (node_wide,) = (plan("llama-2-70b", compare=(), chips=576, tp=tp) for tp in (64, 8))
    assert (wide.layout, node_wide.layout) == ("9 x TP 64", "72 x TP 8")
    assert wide.capex_usd - node_wide.capex_usd == pytest.approx(RACK_USD)
    system, workload = load_system("lpu-v1"), Workload(context_length=4096, prompt_len=512)
    target = compile_program(load_preset("llama-2-70b"), system, workload, chips=576, tp=64)
    draft = compile_program(load_preset("llama-3.2-1b"), system, workload)
    offset = draft_offset(system, target, draft)
    assert max(target.placement.chips) >= 576 and offset == max(target.placement.chips) + 1
    assert not set(target.placement.chips) & {offset + c for c in draft.placement.chips}


def test_a_sweep_shows_the_columns_that_fit_and_says_why_the_others_are_left_out():
    """One column of a sweep that cannot be planned (8 users of 131,072 tokens on one H100; TP 16 on 40 chips)
    ended the whole command with its error, losing the columns that fit (a review). Now those are planned as
    each would be alone, and the rest named with the reason; a plan none of whose columns can be planned is
    still one error, as a count no workload could use on its system."""
    gpus = plan("llama-3.1-8b", system="", users=(1, 8), gpus=(1, 8), context=131072)
    assert [(r.users, r.chips) for r in gpus] == [(1, 1), (1, 8), (8, 8)]
    assert gpus == [plan("llama-3.1-8b", system="", users=u, gpus=n, context=131072)[0] for u, n in
                    ((1, 1), (1, 8), (8, 8))]
    assert gpus.left_out == (("h100-sxm --users 8 --gpus 1: 1 x h100-sxm hold the KV cache of at most 7 users at "
                              "context 131072, not 8; add GPUs or lower --users / --context"),)
    lpu = plan("llama-3.1-8b", compare=(), chips=(40, 64), tp=(8, 16))
    assert [(r.chips, r.layout) for r in lpu] == [(40, "5 x TP 8"), (64, "8 x TP 8"), (64, "4 x TP 16")]
    assert len(lpu.left_out) == 1 and lpu.left_out[0].startswith("lpu-v1 --chips 40 --tp 16: ")
    assert "needs at least 48 chips" in lpu.left_out[0]
    r = run_cli("llama-3.1-8b", "--system", "", "--users", "1,8", "--gpus", "1,8", "--context", "131072")
    text = " ".join(r.stdout.split())
    assert r.returncode == 0 and "not planned: h100-sxm --users 8 --gpus 1: 1 x h100-sxm hold the KV cache" in text
    r = run_cli("llama-3.1-8b", "--system", "", "--users", "1,8", "--gpus", "1,8", "--context", "131072", "--json")
    assert r.returncode == 0 and len(json.loads(r.stdout)) == 3 and "not planned: h100-sxm --users 8" in r.stderr
    # a system none of whose columns can be planned beside one that can: named below the other's table
    r = run_cli("llama-3.1-70b", "--precision", "fp16", "--compare", "h100-sxm,b200", "--gpus", "1", "--system", "")
    text = " ".join(r.stdout.split())
    assert r.returncode == 0 and "b200 (gpu)" in text and "h100-sxm (gpu)" not in text
    assert "not planned: h100-sxm --gpus 1: 1 x h100-sxm cannot hold llama-3.1-70b's 141.1 GB" in text
    for args, says in ((("--chips", "20", "--compare", ""), "needs at least"),
                       (("--chips", "0,40"), "--chips must be a positive"),  # bad input: never a column
                       (("--tp", "8,3"), "TP 3 is not a width"), (("--gpus", "1,12"), "whole servers of 8"),
                       (("--users", "4096,8192", "--context", "131072", "--compare", ""), "does not fit")):
        r = run_cli("llama-3.1-8b", *args)
        assert r.returncode == 2 and says in r.stderr and len(r.stderr.strip().splitlines()) == 1, r.stderr


def test_a_plot_of_many_columns_stays_a_page_wide(tmp_path):
    """Twelve columns drew a plot 46 inches wide (3.8 inches a bar in each of 4 panels across): where 4 panels
    across would be wider than PLOT_WIDE_IN they go 2 across, or 1 (30 bars), each bar keeping BAR_IN for its
    label. The PNG's width in pixels, read from its header, is the grid's at savefig's 110 dpi (bbox_inches='tight'
    trims the margins: within 15%)."""
    import struct

    from openlpu.sim.plan import BAR_IN, PLOT_WIDE_IN, plot, plot_grid

    assert plot_grid(4) == (2, 4, 17, 7.5)  # a few bars: as before
    for bars, layout in ((12, (4, 2)), (30, (8, 1))):
        down, across, width_in, _ = plot_grid(bars)
        assert (down, across) == layout and width_in <= PLOT_WIDE_IN and width_in / across >= bars * BAR_IN
    width_in = plot_grid(12)[2]
    rows = plan("llama-3.2-1b", context=2048, users=(1, 2, 4, 8, 16, 32), compare=("h100-sxm",))
    assert len(rows) == 12
    width_px = struct.unpack(">I", plot(rows, tmp_path / "p.png", "twelve").read_bytes()[16:20])[0]
    assert 0.85 * width_in * 110 <= width_px <= 1.15 * width_in * 110


def test_every_bar_of_a_plot_is_told_apart():
    """`--chips 64,100 --prefill-chunk 256,128` drew four bars each labelled 'lpu-v1 / 64 chips / 2 x TP 32'
    (a review): a bar names what tells it apart from the others of its system."""
    from openlpu.sim.plan import _bar_labels

    rows = plan("llama-3.1-8b", chips=(64, 100), prefill_chunk=(256, 128), compare=("h100-sxm", "b200"))
    labels = _bar_labels(rows)
    assert len(set(labels)) == len(rows) == 6
    # given 100 chips the compiler takes 96 of them, 3 x TP 32, so the layout tells the counts apart too
    assert labels[:2] == ["lpu-v1\n64 chips\n2 x TP 32\nchunk 256", "lpu-v1\n64 chips\n2 x TP 32\nchunk 128"]
    assert labels[2].startswith("lpu-v1\n96 chips (4 of 100 idle)\n3 x TP 32") and labels[4:] == ["h100-sxm", "b200"]
