"""``clvr bench NAME``: a readable table on stderr-free stdout, and the same figures as JSON."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Optional

import typer
from rich.console import Console
from rich.table import Table

bench_app = typer.Typer(help="Benchmarks: loop-speed, overhead, loads, kv-refs, merge, eval-throughput, gpu.")

# merge and gpu take their own options and live below.
_NAMES = {
    "loop-speed": "Two-iteration loop, base klein (28 steps, CFG) vs distilled (4 steps) on bench-size weights: "
                  "speedup and NFE ratio.",
    "overhead": "Fraction of the distilled loop's wall time spent outside model calls, with and without the "
                "SQLite checkpointer.",
    "loads": "N invokes through the registry in one process: how many times each model was built (want 1).",
    "kv-refs": "Plain vs KV klein pipeline editing with 0-3 reference canvases: seconds per call and their ratio.",
    "eval-throughput": "ShapeWorld GenEval-style prompts per second, single step and closed loop.",
}


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
        from clvr_agent.eval.bench import BENCHES

        fn = BENCHES[name]
        result = fn(repeat=repeat) if repeat is not None else fn()
        Console().print(_table(result))
        if json_out:
            json_out.parent.mkdir(parents=True, exist_ok=True)
            json_out.write_text(json.dumps(result, indent=2))

    run.__doc__ = _NAMES[name] + " Prints a table; --json writes the figures."
    return run


for _name in _NAMES:
    bench_app.command(_name)(_command(_name))


def _write_json(json_out: Optional[Path], result: dict) -> None:
    if json_out:
        json_out.parent.mkdir(parents=True, exist_ok=True)
        json_out.write_text(json.dumps(result, indent=2))


@bench_app.command("merge")
def merge(
    dtype: list[str] = typer.Option(
        ["float32", "bfloat16", "float16"], "--dtype", help="Input dtype(s) to measure; repeat the option."
    ),
    tensors: int = typer.Option(10, "--tensors", min=1, help="Weights per checkpoint (plus a norm vector each)."),
    rows: int = typer.Option(2048, "--rows", min=1, help="Rows of each weight."),
    cols: int = typer.Option(4096, "--cols", min=1, help="Columns of each weight (10 × 2048×4096 fp32 = 320 MiB)."),
    method: str = typer.Option("sum", "--method", help="sum | ties | dare"),
    threads: int = typer.Option(1, "--threads", min=0, help="torch threads in the merge child (0: torch's default)."),
    repeat: int = typer.Option(1, "--repeat", min=1, help="Merges per dtype; the peak is the max, the time the min."),
    json_out: Optional[Path] = typer.Option(None, "--json", help="Write the figures to this JSON file."),
) -> None:
    """Peak RssAnon above idle of a streamed DSWM merge per input dtype, against 2 × largest tensor + 200 MiB."""
    from clvr_agent.eval.bench_merge import DTYPES, bench_merge, print_table
    from clvr_agent.cli.common import fail

    unknown = [d for d in dtype if d not in DTYPES]
    if unknown:
        fail(f"--dtype {unknown[0]!r} is not one of {', '.join(DTYPES)}")
    if method not in ("sum", "ties", "dare"):
        fail(f"--method {method!r} is unknown; use sum, ties or dare")
    result = bench_merge(n_tensors=tensors, shape=(rows, cols), dtypes=dtype, repeat=repeat, method=method, threads=threads)
    print_table(result)
    _write_json(json_out, result)
    if not result["pass"]:
        raise typer.Exit(1)


@bench_app.command("concurrency")
def concurrency(
    checkpointer: str = typer.Option(..., help="A postgresql:// URL (the database the runs checkpoint to)."),
    levels: str = typer.Option("1,4,16,64", help="Concurrent runs per level, comma-separated."),
    latency: float = typer.Option(0.5, min=0.0, help="Seconds per executor call (ShapeWorld's simulated draw)."),
    rounds: int = typer.Option(2, min=1, help="Batches of concurrent runs per level."),
    json_out: Optional[Path] = typer.Option(None, "--json", help="Write the figures to this JSON file."),
) -> None:
    """Concurrent durable runs on one PostgreSQL checkpointer: throughput and per-step latency by level."""
    from clvr_agent.eval.bench import bench_concurrency
    from clvr_agent.cli.common import fail

    try:
        counts = tuple(int(x) for x in levels.split(","))
    except ValueError:
        fail(f"--levels must be comma-separated integers, got {levels!r}")
    if not checkpointer.startswith(("postgresql://", "postgres://")) or min(counts) < 1:
        fail("--checkpointer must be a postgresql:// URL and every level >= 1")
    result = bench_concurrency(checkpointer, counts, latency_s=latency, rounds=rounds)
    table = Table(title="clvr bench concurrency (PostgreSQL checkpointer)")
    for col in ("concurrent", "runs", "failed", "runs/s", "median s/step", "p95 s/step", "p95 / alone", "held"):
        table.add_column(col, justify="right")
    for r in result["rows"]:
        table.add_row(str(r["concurrent"]), str(r["runs"]), str(r["failed"]), f"{r['runs_per_s']:.2f}",
                      f"{r['median_s_per_step']:.3f}", f"{r['p95_s_per_step']:.3f}", f"{r['p95_over_alone']:.2f}",
                      "yes" if r["held"] else "no")
    Console().print(table)
    Console().print(f"max concurrent runs held: {result['max_concurrent_held']}")
    _write_json(json_out, result)


@bench_app.command("gpu")
def gpu(
    dry_run: bool = typer.Option(False, "--dry-run", help="Build every model at toy size on CPU and run the plan once."),
    json_out: Optional[Path] = typer.Option(None, "--json", help="JSON path (default: $OUT/gpu_check.json, else ./gpu_check.json)."),
    budget_s: float = typer.Option(540.0, "--budget-s", min=1.0, help="Calls that would start after this many seconds are skipped."),
) -> None:
    """klein-4B (distilled vs base CFG, 0/1/3 refs, plain vs KV), a Qwen3-VL-8B verify call and 10 LoRA-64
    SFT steps at 1024², random weights built from configs: timings and peak memory as one JSON."""
    import os

    import torch

    from clvr_agent.eval.bench_gpu import DRY_RUN, FULL, print_plan, run, write_report

    if not dry_run and not torch.cuda.is_available():
        Console().print_json(json.dumps({"bench": "gpu", "skipped": "no CUDA device (--dry-run checks the plan on CPU)"}))
        return
    print_plan(DRY_RUN if dry_run else FULL)
    report = run(dry_run=dry_run, budget_s=budget_s)
    write_report(report, json_out or Path(os.environ.get("OUT", ".")) / "gpu_check.json")
