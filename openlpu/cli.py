"""The `openlpu` command. Each command is a thin shell over a library function."""

from __future__ import annotations

import sys
from pathlib import Path

import typer
from rich.console import Console
from rich.markup import escape
from rich.table import Table

from openlpu.errors import OpenLPUError, check_count
from openlpu.words import counted, significant

app = typer.Typer(add_completion=False, no_args_is_help=True,
                  help="OpenLPU: compile models for SRAM-only LPU systems, simulate and run them.")
console = Console()
MODEL_HELP = "model preset (see `openlpu models`), a .gguf file, or a Hugging Face config.json or its folder"
DECODE_CONTEXT_HELP = ("tokens each decode step attends: the length the requests served reach (default: all of "
                       "--context, which sizes the KV cache each user holds)")
CHIPS_HELP = ("chips to use, or fewer where wider TP groups on them decode faster or the model's pieces take fewer "
              "(default: the fewest that hold it in the compiler's TP groups with its prefill chunk's buffers, "
              "where a smaller --prefill-chunk can fit fewer; inside one node, the fewest stages)")
PREFILL_CHUNK_HELP = ("prompt tokens per pipeline wave of the LPU's prefill (default: 256, or 128 or 64 where their "
                      "smaller activation buffers let wider TP groups, or fewer of a given --tp, fit on no more "
                      "chips, with a step no slower): smaller chunks fill the pipeline sooner, but make more "
                      "waves to schedule, so the compile takes longer")


def _counts(values: list[str] | None, flag: str, words: tuple[str, ...] = ()) -> tuple[int, ...] | str | None:
    """A count flag given once, several times, or as several values separated by commas (a column each);
    None when not given. `words`: names the flag takes instead of counts (`--tp all`)."""
    if not values:
        return None
    parts = [part.strip() for value in values for part in value.split(",")]  # an empty one is a typo: refused
    if len(parts) == 1 and parts[0].lower() in words:
        return parts[0].lower()
    try:
        return tuple(int(part) for part in parts)
    except ValueError:
        also = "".join(f", or {word}" for word in words)
        raise OpenLPUError(f"{flag} takes whole numbers, one or several separated by commas (e.g. {flag} 8,16){also}; "
                           f"got {', '.join(values)!r}") from None


def _compiling(model: str, system: str, prompt: int, chunk: int | None):
    """A spinner on stderr while a Program is compiled, verified and timed (a long prompt's prefill, scheduled
    chunk by chunk, can take a minute); Rich shows it only on a terminal, so pipes and --json stay clean.
    Nothing to show without an LPU system (`plan --system ""`: GPUs only). `chunk`: the smallest given (None:
    the compiler chooses)."""
    from contextlib import nullcontext

    if not system:
        return nullcontext()
    # a chunk below 1 is refused by the command, after this
    waves = (" in chunks the compiler chooses" if chunk is None
             else f" in {counted(-(-prompt // max(chunk, 1)), 'chunk')}")
    return Console(stderr=True).status(f"compiling {escape(str(model))} for {escape(str(system))}: placement, one "
                                       f"decode step and a {prompt:,}-token prefill{waves}")


@app.callback()
def _root():
    """OpenLPU: compile models for SRAM-only LPU systems, simulate and run them."""


@app.command()
def models():
    """List the model architectures OpenLPU knows (presets) with their parameter counts."""
    from openlpu.models.spec import load_preset, preset_names

    table = Table(title="Model presets (configs only; weights not needed to plan)", pad_edge=False)  # 80 columns
    for col in ("name", "family", "layers", "d_model", "experts", "params (B)", "active (B)"):
        table.add_column(col, justify="right" if col != "name" else "left", no_wrap=col in ("name", "family"))
    for name in preset_names():
        s = load_preset(name)
        table.add_row(name, s.family, str(s.n_layers), str(s.d_model),
                      f"{s.n_experts_per_token}/{s.n_experts}" if s.is_moe else "-",
                      f"{s.param_count() / 1e9:.3f}", f"{s.active_param_count() / 1e9:.3f}")
    table.caption = ("active: what one token's pass uses (its top-k experts), the embedding table counted whole, as "
                     "Mistral's 12.9B for Mixtral counts it (OpenAI's 5.1B for gpt-oss-120b leaves it out)")
    console.print(table)


@app.command()
def serve(
    host: str = typer.Option("127.0.0.1", help="address to listen on"),
    port: int = typer.Option(8000, help="TCP port"),
    model: str = typer.Option(None, "--model", help="GGUF file; default: the embedded Gemma 3 270M"),
    api_key: list[str] = typer.Option(None, "--api-key", help="accepted API key (repeatable)"),
    keys_file: str = typer.Option(None, "--keys-file",
                                  help=escape("text file, one `KEY [rpm=N] [tpm=N] [rpd=N]` per line")),
    max_batch: int = typer.Option(8, help="sequences decoded together (continuous batching)"),
    max_queue: int = typer.Option(64, help="requests waiting for a slot before new ones get 503"),
    rpm: int = typer.Option(1000, help="requests per minute per API key"),
    tpm: int = typer.Option(1_000_000, help="tokens per minute per API key"),
    rpd: int = typer.Option(None, help="requests per day per API key, which the x-ratelimit-*-requests headers "
                                       "report, as GroqCloud's do (default: a day of --rpm)"),
    system: str = typer.Option("lpu-v1", "--system",
                               help="LPU system the served Program is compiled for (its simulated figures "
                                    "are in x_openlpu)"),
):
    """A GroqCloud-compatible API (/openai/v1/...) and a chat playground at /."""
    from openlpu.serve.app import (
        ServeSettings,
        bound_socket,
        create_app,
        uvicorn_server,
    )
    from openlpu.serve.lpu import program_hook
    from openlpu.serve.ratelimit import KeyLimits, RateLimiter, load_keys_file

    if max_batch < 1 or max_queue < 0:
        raise OpenLPUError("--max-batch must be at least 1 and --max-queue at least 0")
    if any(k.split() != [k] for k in api_key or ()):
        raise OpenLPUError("--api-key must be a key of one or more characters without spaces (an empty one "
                           "would let in any client sending 'Authorization: Bearer ' with nothing after it)")
    keys = {k: KeyLimits() for k in api_key or ()} | (load_keys_file(keys_file) if keys_file else {})
    RateLimiter(rpm, tpm, keys, requests_per_day=rpd)  # its limits refused before the model loads, not after
    sock = bound_socket(host, port)  # the port too
    port = sock.getsockname()[1]  # --port 0: the one the system chose
    from openlpu.runtime.engine import Engine

    with console.status(f"compiling for {escape(str(system))} and loading the model"):
        engine = Engine.load(model_path=model, max_batch=max_batch, system=system)
    program = engine.program
    console.print(f"compiled for {escape(program.system.name)}: {counted(program.chips, 'chip')}, verified; the "
                  f"server runs this Program (simulated figures in x_openlpu)")
    settings = ServeSettings(api_keys=keys, requests_per_minute=rpm, tokens_per_minute=tpm, requests_per_day=rpd,
                             max_queue=max_queue, simulated_lpu=program_hook(program))
    access = (f"{counted(len(keys), 'API key')} accepted" if keys else
              "[bold yellow]no API keys: the server is open to anyone who can reach it[/]")
    console.print(f"serving [bold]{escape(engine.model_name)}[/] at http://{host}:{port}  ({access})\n"
                  f"  API: http://{host}:{port}/openai/v1   playground: http://{host}:{port}/")
    uvicorn_server(create_app(engine, settings)).run(sockets=[sock])


@app.command()
def plan(
    model: str = typer.Argument(..., help=MODEL_HELP),
    system: str = typer.Option("lpu-v1", "--system", help="LPU system preset or hardware JSON file ('': GPUs only)"),
    compare: list[str] = typer.Option(["h100-sxm"], "--compare",
                                      help="GPU preset or GPU JSON file to compare (repeatable, or several separated by "
                                           "commas; '': the LPU only)"),
    precision: str = typer.Option("int8", "--precision",
                                  help="weight precision: fp16, bf16, fp8, int8, int4, fp4 (NVFP4)"),
    context: int = typer.Option(4096, "--context", help="tokens of context per user"),
    users: list[str] = typer.Option(None, "--users", help="concurrent users (streams) (default 1); several: a "
                                                           "column each"),
    prompt: int = typer.Option(None, "--prompt", help="prompt tokens whose prefill sets TTFT (default: 512, "
                                                      "or the context if shorter)"),
    decode_context: int = typer.Option(None, "--decode-context", help=DECODE_CONTEXT_HELP),
    prefill_chunk: list[str] = typer.Option(None, "--prefill-chunk", help=f"{PREFILL_CHUNK_HELP}; several: a "
                                                                           "column each"),
    chips: list[str] = typer.Option(None, "--chips", help=f"LPU {CHIPS_HELP}; with --draft, the target's: the "
                                                           "draft gets its own; several (8,16 or the flag again): "
                                                           "a column each"),
    tp: list[str] = typer.Option(None, "--tp", help="LPU chips per tensor-parallel group (default: the width that "
                                                     "takes the fewest nodes, or inside one node the fewest "
                                                     "stages); several: a column each, with each --chips; all: "
                                                     "a column for every width that places the model, each on "
                                                     "its fewest chips"),
    gpus: list[str] = typer.Option(None, "--gpus", help="GPUs of each kind to use (default: as few as fit); "
                                                         "several: a column each"),
    years: float = typer.Option(None, "--years", help="years the capex is spread over (default 3)"),
    usd_per_kwh: float = typer.Option(None, "--usd-per-kwh", help="electricity price (default 0.10)"),
    utilisation: float = typer.Option(None, "--utilisation", help="fraction of the hours spent serving at the "
                                                                  "modelled throughput (default 0.5)"),
    pue: float = typer.Option(None, "--pue", help="power usage effectiveness: wall power / IT power (default 1.3)"),
    draft: str = typer.Option(None, "--draft", help="decode speculatively with this draft model (same kinds as "
                                                     "MODEL; it must share MODEL's tokenizer)"),
    draft_tokens: int = typer.Option(None, "--draft-tokens", help="tokens the draft proposes per round (default 4)"),
    acceptance: float = typer.Option(None, "--acceptance", help="chance the target accepts each draft token "
                                                                "(needed with --draft)"),
    gpu_software: str = typer.Option(None, "--gpu-software",
                                     help="the GPUs' serving software: gqa-kernels (the default: each KV head "
                                          "read once per group, as current engines do), tensorrt-llm-1.0 (the "
                                          "same, and a "
                                          "host loop over the requests in flight at each step) or "
                                          "tensorrt-llm-0.5 (once per query head)"),
    json_out: bool = typer.Option(False, "--json", help="print the rows as JSON"),
    plot_file: str = typer.Option(None, "--plot", help="write a PNG chart of the rows to this file"),
):
    """Chips, memory, tokens/s per user, TTFT, throughput, power, J/token, capex and $/Mtok: LPU vs GPUs."""
    import dataclasses
    import json

    from openlpu.compiler import Workload
    from openlpu.compiler.schedule import matrix_mode_note
    from openlpu.graph.lower import serving_precision
    from openlpu.hardware.lpu import load_system
    from openlpu.models.spec import load_spec
    from openlpu.sim.cost import CostAssumptions
    from openlpu.sim.figures import png_path
    from openlpu.sim.gpu import DEFAULT_SOFTWARE, SOFTWARE
    from openlpu.sim.plan import DRAFT_TOKENS, plot
    from openlpu.sim.plan import plan as make_plan

    if plot_file is not None:
        png_path(plot_file, "plot")
    given = {"years": years, "usd_per_kwh": usd_per_kwh, "utilisation": utilisation, "pue": pue}
    assumptions = CostAssumptions(**{k: v for k, v in given.items() if v is not None})
    spec = load_spec(model)
    prompt = Workload.default_prompt_len(context) if prompt is None else prompt
    # `--compare h100-sxm,b200` names two GPUs, as the flag given twice does; `--compare ''` leaves the default out
    compare = [part for name in compare for part in ([name] if Path(name).is_file() else name.split(",")) if part]
    chips, tp, gpus = _counts(chips, "--chips"), _counts(tp, "--tp", ("all",)), _counts(gpus, "--gpus")
    users = _counts(users, "--users") or (1,)
    prefill_chunk = _counts(prefill_chunk, "--prefill-chunk")
    with _compiling(spec.name, system, prompt, min(prefill_chunk) if prefill_chunk else None):
        rows = make_plan(spec, system=system, compare=tuple(compare), precision=precision, context=context,
                         users=users, chips=chips, tp=tp, gpus=gpus, prompt=prompt, assumptions=assumptions,
                         draft=draft, draft_tokens=draft_tokens, acceptance=acceptance, gpu_software=gpu_software,
                         decode_context=decode_context, prefill_chunk=prefill_chunk)
    gpu_software = (gpu_software or DEFAULT_SOFTWARE) if compare else None  # what the GPU rows were planned with
    if plot_file is not None:
        a = assumptions
        drafting = f"; draft {draft}, {draft_tokens or DRAFT_TOKENS} tokens at {acceptance:g}" if draft else ""
        plot(rows, plot_file, f"{spec.name}, {precision}, {_users(users)} x {context:,} tokens (decode steps attend "
                              f"{decode_context or context:,}; TTFT: a {prompt:,}-token prompt{drafting})\n"
                              f"${a.usd_per_kwh:g}/kWh at PUE {a.pue:g}, {a.years:g} years, serving "
                              f"{significant(a.utilisation * 100, 2)}% of the hours"
                              + (f"; GPU software {gpu_software}" if gpu_software else ""))
    if json_out:  # each row with what it was planned for, so that a saved file still says
        planned = {"model": spec.name, "precision": precision, "context": context,
                   "decode_context": decode_context or context, "prompt": prompt, "gpu_software": gpu_software,
                   "draft": draft, "draft_tokens": draft and (draft_tokens or DRAFT_TOKENS),
                   "acceptance": draft and acceptance, **dataclasses.asdict(assumptions)}
        print(json.dumps([{**planned, **r.to_dict()} for r in rows], indent=1))
        for line in rows.left_out:  # stdout stays the rows' JSON
            Console(stderr=True).print(f"not planned: {escape(line)}", highlight=False)
        return
    # one column per system, one row per figure: side by side at any terminal width
    a = assumptions
    speculating = "" if draft is None else (
        f" Speculative: {draft_tokens or DRAFT_TOKENS} draft tokens per round, each accepted with chance "
        f"{acceptance:g}; the LPU runs the draft on chips of its own, a GPU between the target's steps.")
    kernels = f" GPU decode attention: {SOFTWARE[gpu_software].name}." if compare else ""
    several_chunks = bool(prefill_chunk) and len(set(prefill_chunk)) > 1  # a chunk given twice is one column
    chunks_differ = len({r.prefill_chunk for r in rows if r.kind == "lpu"}) > 1  # given, or chosen per width
    sizes = [f"{c:,}" for c in dict.fromkeys(r.prefill_chunk for r in rows if r.kind == "lpu")]
    sizes = f"{', '.join(sizes[:-1])} or {sizes[-1]}" if len(sizes) > 1 else "".join(sizes)
    chosen = ("a column each" if several_chunks else "as given" if prefill_chunk
              else "the compiler's choice: --prefill-chunk")
    waves = f" (the LPU's in chunks of {sizes} tokens, {chosen})" if sizes else ""
    if compare and spec.is_moe:  # TensorRT-LLM 1.0's long outputs of Qwen3-30B-A3B ran slower than this
        kernels += (" GPU experts: a roofline of their work plus a routing cost per token fitted on one B200 row; "
                    "long outputs can run faster than measured (bench/results/fidelity.md).")
    kv = serving_precision(precision)
    formats = precision if kv == precision else f"{precision} (activations and KV cache {kv})"
    if system and (note := matrix_mode_note(load_system(system), precision, kv)):
        kernels += f" {note}."
    # the fewest chips can decode several times slower than a few more in wider groups (70B: 336 and 448)
    chunk = "" if prefill_chunk else " and chunk"
    widths = (f" The LPU on the fewest chips that hold the workload at the compiler's width{chunk} (--tp all: "
              "every TP width, each on its fewest)."
              if system and chips is None and tp is None else "")
    idle = dict.fromkeys(_idle_note(r.chips_asked, r.chips_asked - r.chips_idle) for r in rows if r.chips_idle)
    title = f"{escape(spec.name)} at {formats}, {_users(users)} x {counted(context, 'token')} of context"
    caption = (f"tok/s: {_attending(context, decode_context)}.{speculating}{kernels} TTFT: the prefill of a "
               f"{prompt:,}-token prompt{waves}. IT power: chips and their hosts (servers), before PUE. TCO: capex "
               f"plus {a.years:g} years of power at ${a.usd_per_kwh:g}/kWh at the wall (PUE {a.pue:g}); $ per M "
               f"tokens: TCO over the tokens of {a.years:g} years serving {significant(a.utilisation * 100, 2)}% of "
               f"the hours at the throughput shown.{widths}{''.join(' ' + note for note in idle)}")
    figures = {
        "chips / GPUs": lambda r: f"{r.chips:,}",
        **({"idle of --chips": lambda r: f"{r.chips_idle:,} of {r.chips_asked:,}" if r.chips_asked else "-"}
           if any(r.chips_idle for r in rows) else {}),
        "stages x TP": lambda r: r.layout.replace(" x TP ", " x "),
        **({"users": lambda r: f"{r.users:,}"} if len(set(users)) > 1 else {}),
        "users per step": lambda r: f"{r.users_per_step:,}",
        "memory used": lambda r: f"{significant(r.memory_used_fraction * 100, 2)}% of {r.memory}",
        "tok/s per user": lambda r: significant(r.tokens_per_s_per_user),
        "TTFT (ms)": lambda r: significant(r.ttft_s * 1e3),
        **({"prefill chunk": lambda r: f"{r.prefill_chunk:,}" if r.prefill_chunk else "-"}
           if chunks_differ else {}),
        "throughput (tok/s)": lambda r: significant(r.throughput_tokens_per_s),
        "IT power (kW)": lambda r: f"{r.power_w / 1e3:,.1f}",
        "energy (J/token)": lambda r: significant(r.energy_per_token_j),
        "compute used (MFU)": lambda r: f"{significant(r.compute_used_fraction * 100, 2)}%",
        "capex ($M)": lambda r: significant(r.capex_usd / 1e6),
        f"TCO, {a.years:g} years ($M)": lambda r: significant(r.tco_usd / 1e6),
        "$ per M tokens": lambda r: significant(r.usd_per_million_tokens),
    }
    _print_columns(title, caption, [f"{escape(r.system)} ({r.kind})" for r in rows],
                   [(label, [cell(r) for r in rows]) for label, cell in figures.items()])
    for line in rows.left_out:
        console.print(f"[bold]not planned:[/] {escape(line)}", highlight=False)
    if plot_file is not None:
        console.print(f"chart written to {escape(str(plot_file))}")


def _print_columns(title: str, caption: str, headers: list[str], rows: list[tuple[str, list[str]]]) -> None:
    """A table of labelled rows with a column per header, printed as several tables, each with the labels,
    where one would be wider than the terminal: rich would cut its figures to fit ('1,0…' for 1,022)."""
    def width(texts) -> int:  # a column's content, its padding and its border
        return max(map(len, texts)) + 3

    room = console.width - width([label for label, _ in rows]) - 1
    parts, part, used = [], [], 0
    for i, header in enumerate(headers):
        need = width([*header.split(), *(cells[i] for _, cells in rows)])
        if part and used + need > room:
            parts, part, used = [*parts, part], [], 0
        part, used = [*part, i], used + need
    parts.append(part)
    for k, part in enumerate(parts):
        of = f" ({k + 1} of {len(parts)})" if len(parts) > 1 else ""
        table = Table(title=title + of, caption=caption if k == len(parts) - 1 else None)
        table.add_column("", no_wrap=True)
        for i in part:
            table.add_column(headers[i], justify="right")
        for label, cells in rows:
            table.add_row(label, *(cells[i] for i in part))
        console.print(table)


def _users(counts: tuple[int, ...]) -> str:
    """'1 user', or '1, 8 or 64 users' for several (a column each)."""
    counts = tuple(dict.fromkeys(counts))
    if len(counts) == 1:
        return counted(counts[0], "user")
    return f"{', '.join(f'{n:,}' for n in counts[:-1])} or {counts[-1]:,} users"


def _attending(context: int, decode_context: int | None) -> str:
    if decode_context is None or decode_context == context:
        return (f"decode steps attending the whole context, {counted(context, 'token')} (--decode-context N: "
                f"requests of N tokens)")
    return (f"decode steps attending {decode_context:,} of the {context:,} tokens each user holds (a static "
            f"schedule attends a fixed length: longer requests need a Program of their own)")


def _idle_note(asked: int, used: int) -> str:
    return (f"{asked - used:,} of the {asked:,} LPU chips asked for stay idle, left out of power and cost: on "
            f"{used:,}, the TP groups decode fastest of the widths tried, each on the most of the {asked:,} it "
            f"divides (or the model's pieces take) and on the fewest that hold the model.")


@app.command("compile")
def compile_cmd(
    model: str = typer.Argument(..., help=MODEL_HELP),
    output: str = typer.Option(..., "-o", "--output", help="where to write the compiled Program"),
    system: str = typer.Option("lpu-v1", "--system", help="LPU system preset or hardware JSON file"),
    precision: str = typer.Option("int8", "--precision",
                                  help="weights: fp16, bf16, fp8, int8, int4, fp4 (NVFP4); activations as "
                                       "the weights, never below 8 bits"),
    kv_precision: str = typer.Option(None, "--kv-precision",
                                     help="KV cache (default: as the weights, never below 8 bits, as `plan` "
                                          "and serving stacks keep it)"),
    context: int = typer.Option(4096, "--context", help="tokens of KV cache per user"),
    users: int = typer.Option(1, "--users", help="users in flight in the pipeline"),
    prompt: int = typer.Option(None, "--prompt", help="prompt tokens whose prefill sets the time to first token "
                                                      "(default: 512, or the context if shorter)"),
    decode_context: int = typer.Option(None, "--decode-context", help=DECODE_CONTEXT_HELP),
    prefill_chunk: int = typer.Option(None, "--prefill-chunk", help=PREFILL_CHUNK_HELP),
    chips: int = typer.Option(None, "--chips", help=CHIPS_HELP),
    tp: int = typer.Option(None, "--tp", help="chips per tensor-parallel group (default: the width that takes "
                                               "the fewest nodes, or inside one node the fewest stages)"),
    draft_tokens: int = typer.Option(0, "--draft-tokens", help="draft tokens each decode step verifies per user "
                                                                "(speculative decoding)"),
):
    """Compile a model for an LPU system: placement + static schedule, verified, written to a file."""
    from openlpu.compiler import Workload, compile_program, verify
    from openlpu.compiler.schedule import matrix_mode_note
    from openlpu.graph.lower import as_precision, serving_precision
    from openlpu.hardware.lpu import load_system
    from openlpu.models.spec import load_spec
    from openlpu.paths import output_path
    from openlpu.sim.plan import check_workload_flags
    from openlpu.sim.timing import timing

    output_path(output, "Program")  # before compiling: a large model takes seconds
    for flag, count in (("--chips", chips), ("--tp", tp)):
        if count is not None:  # named as the user wrote it (the Workload names its fields)
            check_count(count, flag)
    check_count(draft_tokens, "--draft-tokens", least=0)
    spec = load_spec(model)
    kv = as_precision(kv_precision).name if kv_precision is not None else serving_precision(precision)
    prompt = Workload.default_prompt_len(context) if prompt is None else prompt
    check_workload_flags(spec, context, (users,), prompt, context if decode_context is None else decode_context,
                         () if prefill_chunk is None else (prefill_chunk,))
    workload = Workload(weights=precision, activations=serving_precision(precision), kv=kv,
                        context_length=context, users=users, prompt_len=prompt, draft_tokens=draft_tokens,
                        decode_context=decode_context, prefill_chunk=prefill_chunk)
    with _compiling(spec.name, system, workload.prompt_len, workload.prefill_chunk):
        program = compile_program(spec, load_system(system), workload, chips, tp)
        violations, t = verify(program), timing(program)
        digest = program.save(output) if not violations else None  # a file already there is kept
    console.print(f"[bold]{escape(spec.name)}[/] on {escape(program.system.name)}: {counted(t.chips, 'chip')} = "
                  f"{counted(t.stages, 'pipeline stage')} x TP {t.tp}; weights {precision}, activations "
                  f"{workload.activations}, KV cache {kv}; SRAM {t.sram_used_bytes / 1e9:.2f} GB "
                  f"({t.sram_used_fraction:.0%} of the chips used)")
    if note := matrix_mode_note(program.system, precision, workload.activations):
        console.print(escape(note))
    if chips is not None and t.chips < chips:
        console.print(_idle_note(chips, t.chips))
    rate = "tok/s" if not draft_tokens else "steps/s"  # a verifying step yields 1 to draft_tokens + 1 tokens
    console.print(f"decode step attending {workload.attended_context:,} tokens: makespan "
                  f"{program.decode.makespan_cycles:,} cycles = {t.decode_latency_s * 1e6:,.1f} us; each user's next "
                  f"{'token' if not draft_tokens else 'step'} every {1e6 / t.tokens_per_s_per_user:,.1f} us "
                  f"({t.tokens_per_s_per_user:,.0f} {rate} per user, "
                  f"{t.throughput_tokens_per_s:,.0f} {rate} with {counted(users, 'user')}, {t.micro_batch} per step); "
                  f"prefill of {workload.prompt_len:,} tokens in chunks of "
                  f"{program.workload.prefill_chunk:,}{'' if prefill_chunk else ' (the compiler chose)'}: "
                  f"{t.ttft_s * 1e3:,.2f} ms")
    if violations:  # the compiler's fault, not the user's
        console.print(f"verify: [red]{counted(len(violations), 'violation')}[/]: {escape(violations[0].message)}; "
                      f"not written (please report it, with this command)")
        raise typer.Exit(1)
    console.print(f"verify: [green]passed[/]; written to {escape(str(output))} (sha256 {digest[:16]})")


@app.command("inspect")
def inspect_cmd(
    program_file: str = typer.Argument(..., help="a Program written by `openlpu compile`"),
    gantt: str = typer.Option(None, "--gantt", help="draw one decode step's schedule to this PNG"),
    stages: int = typer.Option(12, "--stages", help="stages to list in the placement table"),
):
    """Show a compiled Program: placement per stage, timing, verification; optionally a Gantt chart."""
    from openlpu.compiler import load_program, verify
    from openlpu.sim.figures import png_path
    from openlpu.sim.timing import draw_gantt, placement_rows, timing

    if stages < 0:
        raise OpenLPUError(f"--stages must be 0 or more (the stages to list), got {stages}")
    if gantt is not None:
        png_path(gantt, "Gantt chart")  # before loading: a large Program takes seconds
    program = load_program(program_file)
    try:
        violations = verify(program)
    except (ArithmeticError, LookupError, RecursionError, TypeError, ValueError) as e:  # what a record the
        # loader's checks let through breaks in the verifier: the file's fault, said in one line
        raise OpenLPUError(f"{program_file} does not hold together ({type(e).__name__}: {e}); recompile it with "
                           f"`openlpu compile`") from None
    if broken := [v.message for v in violations if v.invariant == "structure"]:  # no figures can be read off it
        raise OpenLPUError(f"{program_file} does not hold together: {broken[0]}; recompile it with `openlpu compile`")
    t = timing(program)
    table = Table(title=f"{escape(program.model)} on {escape(program.system.name)}: {counted(t.chips, 'chip')}, "
                        f"{counted(t.stages, 'stage')} x TP {t.tp} "
                        f"(SRAM per chip; busy = stage time per decode token: a cut MLP's parts on neighbouring "
                        f"stages run side by side, so the stages' busy times can add up past the step)")
    for col in ("stage", "chips", "holds", "weights MB", "KV MB", "act MB", "busy us"):  # piped: 80 columns, folded
        table.add_column(col, justify="left" if col in ("holds", "chips") else "right", overflow="fold")
    rows = placement_rows(program)
    for r in rows[:stages]:
        table.add_row(str(r["stage"]), r["chips"], escape(r["holds"]), f"{r['weights_bytes_per_chip'] / 1e6:.1f}",
                      f"{r['kv_bytes_per_chip'] / 1e6:.1f}", f"{r['activation_bytes_per_chip'] / 1e6:.1f}",
                      f"{r['busy_s'] * 1e6:.2f}")
    if len(rows) > stages:
        table.add_row("...", counted(len(rows) - stages, "more stage"), "", "", "", "", "")
    console.print(table)
    drafts = program.workload.draft_tokens
    step, rate = ("token", "tok/s") if not drafts else (f"step verifying {drafts} draft tokens", "steps/s")
    console.print(f"decode {t.decode_latency_s * 1e6:,.1f} us/{step} attending {program.workload.attended_context:,} of "
                  f"{program.workload.context_length:,} tokens, each user's next {step.split()[0]} every "
                  f"{1e6 / t.tokens_per_s_per_user:,.1f} us ({t.tokens_per_s_per_user:,.0f} {rate} per user), "
                  f"TTFT {t.ttft_s * 1e3:,.2f} ms ({program.workload.prompt_len:,}-token prompt in chunks of "
                  f"{program.workload.prefill_chunk:,}), {t.throughput_tokens_per_s:,.0f} {rate} with "
                  f"{counted(t.users, 'user')} "
                  f"({t.micro_batch} per step), "
                  f"{t.power_w / 1e3:,.1f} kW, {significant(t.energy_per_token_j)} J/{step.split()[0]}")
    units = ", ".join(f"{u} {f:.1%}" for u, f in t.unit_utilisation.items())
    links = ", ".join(f"{k} {f:.2%} of {counted(t.links_used[k], 'link')}"
                      for k, f in t.link_utilisation.items()) or "none used"
    console.print(f"busy in steady state with {counted(t.users, 'user')}: units (all chips; a matrix unit installing "
                  f"weights is busy, which plan's MFU, operations over peak, does not count) {units}; links {links}, "
                  f"the busiest {t.busiest_link_utilisation:.2%}")
    console.print("verify: " + ("[green]passed[/]" if not violations else
                                f"[red]{counted(len(violations), 'violation')}[/]: {escape(violations[0].message)}"))
    if gantt is not None:
        draw_gantt(program, gantt)
        console.print(f"Gantt chart of one decode step written to {escape(gantt)}")
    if violations:  # as compile does: `openlpu inspect prog && deploy` deploys only what verifies
        raise typer.Exit(1)


@app.command()
def run(
    prompt: str = typer.Argument(..., help="text to continue"),
    model: str = typer.Option(None, "--model", help="GGUF file; default: the embedded Gemma 3 270M"),
    max_tokens: int = typer.Option(128, "--max-tokens", help="tokens to generate at most"),
    temperature: float = typer.Option(0.0, help="0 = greedy; up to 2"),
    top_p: float = typer.Option(1.0, "--top-p", help="nucleus sampling mass, 0 to 1 (0: the top token only)"),
    top_k: int = typer.Option(0, "--top-k", help="sample among the k most likely (0 = off)"),
    seed: int = typer.Option(None, help="random seed for sampling"),
    stop: list[str] = typer.Option(None, "--stop", help="stop string (repeatable, up to 4)"),
    precision: str = typer.Option("int4", help="host weights: float32 | bf16 | int8 | int4 | gguf (the file's own "
                                               "4- and 5-bit codes, as int4 runs them, with an 8-bit head)"),
    threads: int = typer.Option(None, help="CPU threads (default: torch's)"),
    system: str = typer.Option("lpu-v1", "--system", help="LPU system the Program is compiled for"),
    mode: str = typer.Option("fused", "--mode", help="fused: the Program's blocks on merged shards, "
                             "the fast path; sharded: every virtual chip runs its own shards and transfers"),
    compare: str = typer.Option("h100-sxm", "--compare", help="GPU preset or GPU JSON file modelled for comparison"),
):
    """Compile for an LPU system, generate text here (streamed), compare this host's, the LPU's, a GPU's speed."""
    import resource

    from openlpu.compiler import Workload, compile_program, verify_or_raise
    from openlpu.hardware.gpu import load_gpu
    from openlpu.hardware.lpu import load_system
    from openlpu.models.embedded import default_model_path
    from openlpu.models.gguf import check_weights_readable, read_header, spec_from_gguf
    from openlpu.runtime.engine import DEFAULT_CONTEXT_LENGTH, Engine, check_fits
    from openlpu.runtime.executor import load_executor
    from openlpu.runtime.model import PRECISIONS as HOST_PRECISIONS
    from openlpu.runtime.sampling import SamplingParams
    from openlpu.runtime.tokenizer import Tokenizer
    from openlpu.sim.gpu import gpu_timing
    from openlpu.sim.timing import timing

    params = SamplingParams(max_tokens=max_tokens, temperature=temperature, top_p=top_p,
                            top_k=top_k, seed=seed, stop=tuple(stop or ()))
    if not prompt.strip():
        raise OpenLPUError("the prompt is empty; give some text to continue")
    if mode not in ("fused", "sharded"):
        raise OpenLPUError(f"unknown --mode {mode!r}; use fused or sharded")
    if precision not in HOST_PRECISIONS:  # before the compile, which takes seconds
        raise OpenLPUError(f"unknown --precision {precision!r}; use one of {', '.join(HOST_PRECISIONS)}")
    if mode == "sharded" and (not params.greedy or stop):
        raise OpenLPUError("sharded mode runs the Program's own greedy sampler: use --temperature 0 "
                           "and no --stop, or --mode fused")
    if threads is not None:
        if threads < 1:
            raise OpenLPUError("--threads must be at least 1")
        import torch

        torch.set_num_threads(threads)
    lpu, gpu = load_system(system), load_gpu(compare)
    model_path = default_model_path() if model is None else model
    header = read_header(model_path)
    check_weights_readable(header)
    spec = spec_from_gguf(header)
    tokenizer = Tokenizer.from_gguf(model_path)
    ids = tokenizer.encode(prompt)
    context = min(DEFAULT_CONTEXT_LENGTH, spec.context_length)
    check_fits(len(ids), max_tokens, context)
    workload = Workload(context_length=len(ids) + max_tokens, prompt_len=len(ids), users=1)
    program = compile_program(spec, lpu, workload)
    verify_or_raise(program)
    err = Console(stderr=True, highlight=False)
    err.print(f"[dim]compiled for {escape(lpu.name)}: {counted(program.chips, 'chip')}, "
              f"{counted(len(program.placement.stages), 'stage')} x TP {program.placement.tp}; verified[/]")

    if mode == "fused":
        engine = Engine(load_executor(program, model_path, "fused", precision, max_positions=context, spec=spec),
                        tokenizer, 1, context)
        seq = engine.new_sequence(ids, params)
        while not seq.finished:
            for event in engine.step([seq]):
                _emit(event.text)
        t_start, t_first, t_end, n_out = seq.t_start, seq.t_first_token, seq.t_end, len(seq.output_ids)
        finish = seq.finish_reason
    else:
        t_start, t_first, t_end, n_out, finish = _run_sharded(program, tokenizer, model_path, ids, max_tokens)
    _emit("\n")

    sim, gpu_t = timing(program), gpu_timing(spec, gpu, workload.weights, workload.context_length,
                                            prompt_tokens=len(ids))
    decoded, decode_s = n_out - 1, t_end - t_first  # the first token comes from the prefill
    host_tps = decoded / decode_s if decoded and decode_s > 0 else float("nan")
    table = Table(title=f"{escape(spec.name)}: prompt {len(ids)} tokens, generated {n_out} ({finish})")
    for col in ("", "what it is", "TTFT (s)", "tok/s per user"):
        table.add_column(col, justify="left" if col in ("", "what it is") else "right")
    host_weights = precision if mode == "fused" else "float32"
    table.add_row(f"this host ({mode}, {host_weights})", "measured", f"{t_first - t_start:.3f}", f"{host_tps:.1f}")
    table.add_row(f"{escape(lpu.name)} x {counted(sim.chips, 'chip')}, {workload.weights}",
                  "simulated from the Program", f"{sim.ttft_s:.5f}", f"{sim.tokens_per_s_per_user:,.0f}")
    table.add_row(f"{escape(gpu.name)} x {gpu_t.gpus}, {workload.weights}", "modelled (roofline)",
                  f"{gpu_t.ttft_s:.5f}", f"{gpu_t.tokens_per_s_per_user:,.0f}")
    err.print(table)
    err.print(f"[dim]peak RSS {resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024:.0f} MB[/]")


def _emit(text: str) -> None:
    """Generated text to stdout as the model wrote it (a rich Console would expand its tabs, drop its control
    characters and turn ':smile:' into an emoji), at once."""
    sys.stdout.write(text)
    sys.stdout.flush()


def _run_sharded(program, tokenizer, model_path, ids, max_tokens):
    """Greedy text from the Program executed chip by chip (shards and explicit transfers)."""
    import time

    from openlpu.runtime.executor import load_executor
    from openlpu.runtime.model import Span

    executor = load_executor(program, model_path, "sharded")
    cache = executor.new_cache(1, len(ids) + max_tokens)
    slot, stream, outputs = cache.allocate(), tokenizer.stream(), []
    t_start = time.perf_counter()
    t_first, finish, pos, feed = None, "length", 0, list(ids)
    while len(outputs) < max_tokens:
        _, token = executor.step(feed, [Span(slot, pos, len(feed))], cache)
        pos += len(feed)
        token = int(token[-1])
        t_first = t_first or time.perf_counter()
        outputs.append(token)
        if token in tokenizer.eos_ids:
            finish = "stop"
            break
        _emit(stream.push(token))
        feed = [token]
    _emit(stream.flush())
    return t_start, t_first, time.perf_counter(), len(outputs), finish


def main() -> None:
    """Entry point: user errors become one line on stderr and exit status 2, never a traceback."""
    try:
        app()  # click itself turns usage errors into a message and exit status 2
    except OpenLPUError as e:
        Console(stderr=True).print(f"[bold red]error:[/] {escape(str(e))}", highlight=False, soft_wrap=True)
        sys.exit(2)
    except OSError as e:  # a path named on the command line the file system refuses (too long, not a folder, ...)
        where = f"cannot use {e.filename!r}: " if e.filename else ""
        Console(stderr=True).print(f"[bold red]error:[/] {escape(f'{where}{e.strerror or e}')}; check the path",
                                   highlight=False,
                                   soft_wrap=True)
        sys.exit(2)


if __name__ == "__main__":
    main()
