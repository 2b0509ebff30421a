"""The `openlpu` command. Each command is a thin shell over a library function."""

from __future__ import annotations

import sys

import typer
from rich.console import Console
from rich.table import Table

from openlpu.errors import OpenLPUError

app = typer.Typer(add_completion=False, no_args_is_help=True,
                  help="OpenLPU: compile models for SRAM-only LPU systems, simulate and run them.")
console = Console()


@app.callback()
def _root():
    """OpenLPU: compile models for SRAM-only LPU systems, simulate and run them."""


@app.command()
def models():
    """List the model architectures OpenLPU knows (presets) with their parameter counts."""
    from openlpu.models.spec import load_preset, preset_names

    table = Table(title="Model presets (configs only; weights not needed to plan)")
    for col in ("name", "family", "layers", "d_model", "experts", "params (B)", "active (B)"):
        table.add_column(col, justify="right" if col != "name" else "left", no_wrap=col == "name")
    for name in preset_names():
        s = load_preset(name)
        table.add_row(name, s.family, str(s.n_layers), str(s.d_model),
                      f"{s.n_experts_per_token}/{s.n_experts}" if s.is_moe else "-",
                      f"{s.param_count() / 1e9:.3f}", f"{s.active_param_count() / 1e9:.3f}")
    console.print(table)


@app.command()
def serve(
    host: str = typer.Option("127.0.0.1", help="address to listen on"),
    port: int = typer.Option(8000, help="TCP port"),
    model: str = typer.Option(None, "--model", help="GGUF file; default: the embedded Gemma 3 270M"),
    api_key: list[str] = typer.Option(None, "--api-key", help="accepted API key (repeatable)"),
    keys_file: str = typer.Option(None, "--keys-file",
                                  help="text file, one `KEY [rpm=N] [tpm=N]` per line"),
    max_batch: int = typer.Option(8, help="sequences decoded together (continuous batching)"),
    max_queue: int = typer.Option(64, help="requests waiting for a slot before new ones get 503"),
    rpm: int = typer.Option(1000, help="requests per minute per API key"),
    tpm: int = typer.Option(1_000_000, help="tokens per minute per API key"),
):
    """A GroqCloud-compatible API (/openai/v1/...) and a chat playground at /."""
    from openlpu.serve.app import ServeSettings, create_app
    from openlpu.serve.ratelimit import KeyLimits, load_keys_file

    import uvicorn

    if max_batch < 1 or max_queue < 0:
        raise OpenLPUError("--max-batch must be at least 1 and --max-queue at least 0")
    keys = {k: KeyLimits() for k in api_key or ()} | (load_keys_file(keys_file) if keys_file else {})
    settings = ServeSettings(api_keys=keys, requests_per_minute=rpm, tokens_per_minute=tpm,
                             max_queue=max_queue)
    from openlpu.runtime.engine import Engine

    with console.status("loading the model"):
        engine = Engine.load(model_path=model, max_batch=max_batch)
    access = (f"{len(keys)} API key(s) accepted" if keys else
              "[bold yellow]no API keys: the server is open to anyone who can reach it[/]")
    console.print(f"serving [bold]{engine.model_name}[/] at http://{host}:{port}  ({access})\n"
                  f"  API: http://{host}:{port}/openai/v1   playground: http://{host}:{port}/")
    uvicorn.run(create_app(engine, settings), host=host, port=port, log_level="warning")


@app.command()
def plan(
    model: str = typer.Argument(..., help="model preset (see `openlpu models`)"),
    system: str = typer.Option("lpu-v1", "--system", help="LPU system preset"),
    compare: list[str] = typer.Option(["h100-sxm"], "--compare", help="GPU to compare (repeatable)"),
    precision: str = typer.Option("int8", "--precision", help="weight precision: fp16, bf16, fp8, int8, int4"),
    context: int = typer.Option(4096, "--context", help="tokens of context per user"),
    users: int = typer.Option(1, "--users", help="concurrent users (streams)"),
    json_out: bool = typer.Option(False, "--json", help="print the rows as JSON"),
    plot_file: str = typer.Option(None, "--plot", help="write a PNG chart of the rows to this file"),
):
    """Chips, memory, tokens/s per user, TTFT, throughput, power, J/token, capex and $/Mtok: LPU vs GPUs."""
    import json

    from openlpu.sim.plan import plan as make_plan
    from openlpu.sim.plan import plot

    rows = make_plan(model, system=system, compare=tuple(compare), precision=precision, context=context,
                     users=users)
    if plot_file:
        plot(rows, plot_file, f"{model}, {precision}, {users} user(s) x {context} tokens")
    if json_out:
        print(json.dumps([r.to_dict() for r in rows], indent=1))
        return
    table = Table(title=f"{model} at {precision}, {users} user(s) x {context} tokens of context")
    columns = ("system", "chips", "memory", "tok/s/user", "TTFT ms", "tok/s", "kW", "J/tok", "capex $M",
               "$/Mtok")
    for col in columns:
        table.add_column(col, justify="left" if col == "system" else "right")
    for r in rows:
        table.add_row(r.system, f"{r.chips:,}", f"{r.memory_used_fraction:.0%} {r.memory}",
                      f"{r.tokens_per_s_per_user:,.0f}", f"{r.ttft_s * 1e3:,.0f}",
                      f"{r.throughput_tokens_per_s:,.0f}", f"{r.power_w / 1e3:,.1f}",
                      f"{r.energy_per_token_j:,.2f}", f"{r.capex_usd / 1e6:,.2f}",
                      f"{r.usd_per_million_tokens:,.2f}")
    console.print(table)
    if plot_file:
        console.print(f"chart written to {plot_file}")


def main() -> None:
    """Entry point: user errors become one line on stderr and exit status 2, never a traceback."""
    try:
        app()  # click itself turns usage errors into a message and exit status 2
    except OpenLPUError as e:
        Console(stderr=True).print(f"[bold red]error:[/] {e}", highlight=False, soft_wrap=True)
        sys.exit(2)


if __name__ == "__main__":
    main()
