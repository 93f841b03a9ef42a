"""Benchmarks behind ``clvr bench``: each returns a dict of figures and ratios measured side by side.

Timings on shared machines are noisy, so every figure that matters is a ratio of two things
measured in the same process, interleaved, over ``repeat`` rounds (the median is reported).
"""

from __future__ import annotations

import math
import statistics
import tempfile
import time
import uuid
from pathlib import Path
from typing import Callable

from clvr_agent.state import ClvrContext, Settings

LOOP_PROMPT = "a photo of a red circle left of a blue square"


def _bench_pipeline(distilled: bool, seed: int = 0):
    from clvr_agent.tools.tiny import BENCH_SIZE, build_tiny_flux2_klein

    return build_tiny_flux2_klein(distilled=distilled, seed=seed, **BENCH_SIZE)


def _two_iteration_loop(executor, *, checkpointer=None, artifact_dir: str, steps=None, guidance=None):
    """plan, generate, verify, correct, edit, verify, stop — with a scripted controller."""
    from clvr_agent.app.api import create_clvr
    from clvr_agent.tools.scripted import ScriptedController

    ctx = ClvrContext(
        executor=executor, controller=ScriptedController(scores=(0.5, 1.0)),
        settings=Settings(artifact_dir=artifact_dir, steps=steps, guidance=guidance, height=64, width=64),
    )
    return create_clvr(context=ctx, checkpointer=checkpointer), ctx


def _timed_invoke(runnable, ctx, config=None, **kw) -> tuple[float, dict, float]:
    """Wall time of one run, and the seconds its own model calls took (from its trajectory)."""
    ctx.get_controller().reset()
    t0 = time.perf_counter()
    out = runnable.invoke({"prompt": LOOP_PROMPT, "seed": 0}, config, **kw)
    wall = time.perf_counter() - t0
    return wall, out, sum(c["seconds"] for c in out["trajectory"]["model_calls"])


def bench_loop_speed(repeat: int = 3) -> dict:
    """Base (28 steps, CFG) vs distilled (4 steps) on the same bench-size weights."""
    from clvr_agent.tools.flux2_klein import Flux2KleinExecutor

    base_pipe = _bench_pipeline(distilled=False)
    dist_pipe = _bench_pipeline(distilled=True)  # same seed, same weights; only the config differs
    runs = {}
    with tempfile.TemporaryDirectory() as tmp:
        for name, pipe, steps, guidance in [("base", base_pipe, 28, 4.0), ("distilled", dist_pipe, 4, 1.0)]:
            runs[name] = _two_iteration_loop(Flux2KleinExecutor.from_pipeline(pipe), artifact_dir=tmp,
                                             steps=steps, guidance=guidance)
        _timed_invoke(*runs["distilled"])  # warm-up: allocator, first-call caches
        walls: dict[str, list[float]] = {"base": [], "distilled": []}
        nfe = {}
        for _ in range(repeat):
            for name in ("base", "distilled"):
                wall, out, _ = _timed_invoke(*runs[name])
                assert out["status"] == "satisfied" and out["iterations"] == 2, out["status"]
                walls[name].append(wall)
                nfe[name] = sum(s["nfe"] for s in out["trajectory"]["steps"])
    base_s, dist_s = statistics.median(walls["base"]), statistics.median(walls["distilled"])
    speedup = base_s / dist_s
    nfe_ratio = nfe["base"] / nfe["distilled"]
    return {
        "bench": "loop-speed", "repeat": repeat,
        "base_wall_s": base_s, "distilled_wall_s": dist_s,
        "base_nfe": nfe["base"], "distilled_nfe": nfe["distilled"],
        "speedup": speedup, "nfe_ratio": nfe_ratio, "speedup_over_nfe_ratio": speedup / nfe_ratio,
        "target_speedup_over_nfe_ratio": 0.85,
    }


def bench_overhead(repeat: int = 3) -> dict:
    """Fraction of the distilled loop's wall time spent outside model calls, checkpointer on and off."""
    from clvr_agent.app.runs import open_checkpointer
    from clvr_agent.tools.flux2_klein import Flux2KleinExecutor

    executor = Flux2KleinExecutor.from_pipeline(_bench_pipeline(distilled=True))
    result = {"bench": "overhead", "repeat": repeat}
    with tempfile.TemporaryDirectory() as tmp:
        plain = _two_iteration_loop(executor, artifact_dir=tmp)
        durable = _two_iteration_loop(executor, artifact_dir=tmp, checkpointer=open_checkpointer(Path(tmp)))
        _timed_invoke(*plain)
        fractions: dict[str, list[float]] = {"off": [], "on": []}
        for i in range(repeat):
            for key, (runnable, ctx) in (("off", plain), ("on", durable)):
                # "on" runs as the CLI does: SQLite checkpoints written synchronously after every node
                kw = {"durability": "sync"} if key == "on" else {}
                cfg = {"configurable": {"thread_id": f"bench-{i}"}} if key == "on" else None
                wall, _, model_s = _timed_invoke(runnable, ctx, cfg, **kw)
                fractions[key].append((wall - model_s) / wall)
    result["overhead_fraction_checkpointer_off"] = statistics.median(fractions["off"])
    result["overhead_fraction"] = statistics.median(fractions["on"])
    result["durability"] = "sync"
    result["target_overhead_fraction"] = 0.02
    return result


def bench_loads(n: int = 5) -> dict:
    """N invokes through the registry in one process: how many times each model was built."""
    from clvr_agent.app.api import create_clvr
    from clvr_agent.tools import registry

    registry.clear_cache()
    with tempfile.TemporaryDirectory() as tmp:
        model_dir = Path(tmp) / "klein"
        _bench_pipeline(distilled=True).save_pretrained(model_dir)
        statuses = []
        for i in range(n):
            runnable = create_clvr(
                "flux2-klein", controller="shapeworld", artifact_dir=str(Path(tmp) / "art"), max_iterations=2,
                executor_options={"model": str(model_dir), "torch_dtype": "float32", "device": "cpu"},
                height=64, width=64,
            )
            statuses.append(runnable.invoke({"prompt": LOOP_PROMPT, "seed": i})["status"])
    loads = dict(registry.LOAD_COUNTS)
    return {"bench": "loads", "invokes": n, "loads": loads, "statuses": statuses,
            "max_loads_per_model": max(loads.values()), "target_max_loads_per_model": 1}


def bench_kv_refs(repeat: int = 3) -> dict:
    """Plain vs KV pipeline editing with 0–3 reference canvases: seconds per call and their ratio."""
    from diffusers import Flux2KleinKVPipeline
    from PIL import Image

    from clvr_agent.tools.flux2_klein import Flux2KleinExecutor
    from clvr_agent.types import ExecutorRequest

    plain_pipe = _bench_pipeline(distilled=True)
    # Its own copy of the same weights: building a KV pipeline swaps the transformer's attention processors.
    kv_pipe = Flux2KleinKVPipeline(**_bench_pipeline(distilled=True).components)
    executors = {"plain": Flux2KleinExecutor.from_pipeline(plain_pipe), "kv": Flux2KleinExecutor.from_pipeline(kv_pipe)}
    rows = []
    for n_refs in range(4):
        refs = [Image.new("RGB", (64, 64), (40 * i, 90, 150)) for i in range(n_refs)]
        req = ExecutorRequest(mode="edit" if n_refs else "generate", instruction="add a red circle",
                              accumulated_prompt="add a red circle", seed=0, steps=4, height=64, width=64)
        times: dict[str, list[float]] = {"plain": [], "kv": []}
        for _ in range(repeat + 1):  # first round is warm-up
            for name, ex in executors.items():
                t0 = time.perf_counter()
                ex.generate(req, refs)
                times[name].append(time.perf_counter() - t0)
        plain_s, kv_s = statistics.median(times["plain"][1:]), statistics.median(times["kv"][1:])
        rows.append({"references": n_refs, "plain_s": plain_s, "kv_s": kv_s, "plain_over_kv": plain_s / kv_s})
    return {"bench": "kv-refs", "repeat": repeat, "rows": rows}


def bench_eval_throughput(n: int = 60) -> dict:
    """ShapeWorld GenEval-style prompts per second, single step and closed loop."""
    from clvr_agent.eval.shapeworld import eval_shapeworld

    result = {"bench": "eval-throughput", "prompts": n}
    with tempfile.TemporaryDirectory() as tmp:
        for mode in ("single", "loop"):
            t0 = time.perf_counter()
            summary = eval_shapeworld(mode=mode, n=n, seed=0, out_dir=Path(tmp) / mode, progress=False)
            result[f"{mode}_prompts_per_s"] = n / (time.perf_counter() - t0)
            result[f"{mode}_overall"] = summary["overall"]
    return result


def bench_gpu() -> dict:
    """Full-size klein-4B and Qwen3-VL-8B architectures at 1024² (random weights): needs an accelerator."""
    import torch

    if not torch.cuda.is_available():
        return {"bench": "gpu", "skipped": "no CUDA device"}
    from clvr_agent.eval.bench_gpu import run

    return run()


def bench_merge_entry(repeat: int = 1) -> dict:
    from clvr_agent.eval.bench_merge import bench_merge

    return bench_merge(repeat=repeat)


BENCHES: dict[str, Callable[..., dict]] = {
    "loop-speed": bench_loop_speed,
    "overhead": bench_overhead,
    "loads": lambda repeat=5: bench_loads(n=repeat),
    "kv-refs": bench_kv_refs,
    "merge": bench_merge_entry,
    "eval-throughput": lambda repeat=60: bench_eval_throughput(n=repeat),
    "gpu": lambda repeat=1: bench_gpu(),
}


def bench_concurrency(url: str, levels: tuple[int, ...] = (1, 4, 16, 64), latency_s: float = 0.5,
                      rounds: int = 2) -> dict:
    """Concurrent durable runs through one PostgreSQL checkpointer, as one LangGraph worker holds them.

    Each level starts ``n`` runs at once (threads; a connection pool of ``n``), ``rounds`` times.
    The executor is ShapeWorld with ``latency_s`` per call (a sleep standing in for a GPU draw), so
    what saturates is the orchestration, the checkpoint writes and the controller's CPU work, not a
    model. A level is "held" when no run fails and its p95 run time stays within 1.5x of one run alone.
    """
    from concurrent.futures import ThreadPoolExecutor

    from langgraph.checkpoint.postgres import PostgresSaver
    from psycopg.rows import dict_row
    from psycopg_pool import ConnectionPool

    from clvr_agent.app.api import create_clvr
    from clvr_agent.state import checkpoint_serde

    rows = []
    with tempfile.TemporaryDirectory() as tmp, ConnectionPool(
            url, min_size=1, max_size=max(levels) + 1, open=True,
            kwargs={"autocommit": True, "prepare_threshold": 0, "row_factory": dict_row}) as pool:
        saver = PostgresSaver(pool, serde=checkpoint_serde())
        saver.setup()
        runnable = create_clvr("shapeworld", checkpointer=saver, artifact_dir=tmp,
                               executor_options={"latency_s": latency_s, "denoise_steps": 4})

        def one(seed: int) -> tuple[str, float, int]:
            t0 = time.perf_counter()
            cfg = {"configurable": {"thread_id": f"bench-{uuid.uuid4()}"}}
            try:
                out = runnable.invoke({"prompt": LOOP_PROMPT, "seed": seed}, cfg, durability="sync")
                return out["status"], time.perf_counter() - t0, len(out["trajectory"]["steps"])
            except Exception as exc:  # counted, not hidden: a failed run makes the level not held
                return f"error: {type(exc).__name__}", time.perf_counter() - t0, 0

        one(10**6)  # warm-up: models built, pool connected, tables cached
        for n in levels:
            results = []
            t0 = time.perf_counter()
            with ThreadPoolExecutor(n) as workers:
                for r in range(max(rounds, -(-8 // n))):  # at least 8 runs per level
                    results += list(workers.map(one, range(r * n, (r + 1) * n)))
            wall = time.perf_counter() - t0
            per_call = [s / max(k, 1) for _, s, k in results]  # seconds per executor call, run by run
            rows.append({"concurrent": n, "runs": len(results),
                         "failed": sum(not st.startswith(("satisfied", "budget", "no_progress")) for st, _, _ in results),
                         "wall_s": wall, "runs_per_s": len(results) / wall,
                         "median_s_per_step": statistics.median(per_call),
                         "p95_s_per_step": sorted(per_call)[math.ceil(0.95 * len(per_call)) - 1]})
    alone = rows[0]["median_s_per_step"]
    for row in rows:
        row["p95_over_alone"] = row["p95_s_per_step"] / alone
        row["held"] = row["failed"] == 0 and row["p95_over_alone"] <= 1.5
    held = [r["concurrent"] for r in rows if r["held"]]
    return {"bench": "concurrency", "checkpointer": "postgres", "latency_s": latency_s, "rounds": rounds,
            "rows": rows, "max_concurrent_held": max(held) if held else 0}
