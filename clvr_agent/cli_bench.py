"""``clvr bench NAME``: a readable table on stderr-free stdout, and the same figures as JSON."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Optional

import typer
from rich.console import Console
from rich.table import Table

bench_app = typer.Typer(help="Benchmarks: loop-speed, overhead, loads, kv-refs, merge, eval-throughput, gpu.")

_NAMES = ("loop-speed", "overhead", "loads", "kv-refs", "merge", "eval-throughput", "gpu")


def _table(result: dict) -> Table:
    table = Table(title=f"clvr bench {result.get('bench')}")
    table.add_column("figure")
    table.add_column("value", justify="right")
    for key, value in result.items():
        if key == "rows":
            for row in value:
                table.add_row(f"refs={row['references']}", "  ".join(f"{k} {v:.4g}" for k, v in row.items() if k != "references"))
        elif isinstance(value, float):
            table.add_row(key, f"{value:.4g}")
        else:
            table.add_row(key, str(value))
    return table


def _command(name: str):
    def run(
        json_out: Optional[Path] = typer.Option(None, "--json", help="Write the figures to this JSON file."),
        repeat: Optional[int] = typer.Option(None, "--repeat", min=1, help="Rounds (or invokes / prompts)."),
    ) -> None:
        from clvr_agent.bench import BENCHES

        fn = BENCHES[name]
        result = fn(repeat=repeat) if repeat is not None else fn()
        Console().print(_table(result))
        if json_out:
            json_out.parent.mkdir(parents=True, exist_ok=True)
            json_out.write_text(json.dumps(result, indent=2))

    run.__doc__ = f"Run the {name} benchmark."
    return run


for _name in _NAMES:
    bench_app.command(_name)(_command(_name))
