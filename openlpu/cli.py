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
        table.add_column(col, justify="right" if col != "name" else "left")
    for name in preset_names():
        s = load_preset(name)
        table.add_row(name, s.family, str(s.n_layers), str(s.d_model),
                      f"{s.n_experts_per_token}/{s.n_experts}" if s.is_moe else "-",
                      f"{s.param_count() / 1e9:.3f}", f"{s.active_param_count() / 1e9:.3f}")
    console.print(table)


def main() -> None:
    """Entry point: user errors become one line on stderr and exit status 2, never a traceback."""
    try:
        app()  # click itself turns usage errors into a message and exit status 2
    except OpenLPUError as e:
        Console(stderr=True).print(f"[bold red]error:[/] {e}", highlight=False, soft_wrap=True)
        sys.exit(2)


if __name__ == "__main__":
    main()
