"""`clvr bench merge`: peak anonymous memory and throughput of the streamed DSWM merge, per input dtype.

For each dtype (fp32, bf16, fp16 by default) it writes three synthetic safetensors checkpoints of
`n_tensors` × `shape` weights plus a norm vector each (a two-shard base folder with its index, aligned and
distilled single files; 10 × 2048×4096 in fp32 is 320 MiB per file) in a temp dir and runs the merge in
a child process while sampling its RssAnon from /proc/<pid>/status. Memory-mapped checkpoint pages are
page cache (RssFile) and do not count — unless the merge writes into them, which turns them anonymous.
The idle footprint is a child with the same imports, measured the same way.
Pass: peak above idle ≤ 2 × largest tensor + 200 MiB, for every dtype.
"""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Sequence

MIB = 1 << 20
DTYPES = ("float32", "bfloat16", "float16")
SLACK_MIB = 200  # the bound's fixed part: interpreter growth, chunk buffers, allocator slack
_CHILD = """
import json, sys, time
import torch, safetensors
from clvr_agent.training import merge_io
from clvr_agent.training.merge import MergeConfig, merge_checkpoints
if sys.argv[1] == "idle":
    time.sleep(1.0)
else:
    base, aligned, distilled, out, method, threads, chunk_elems = sys.argv[1:8]
    if int(threads) > 0:
        torch.set_num_threads(int(threads))
    if int(chunk_elems) > 0:
        merge_io.CHUNK_ELEMS = int(chunk_elems)
    t = time.perf_counter()
    merge_checkpoints(MergeConfig(base, aligned, distilled, out, method=method))
    print(json.dumps({"seconds": time.perf_counter() - t}))
"""


def bench_merge(
    n_tensors: int = 10,
    shape: Sequence[int] = (2048, 4096),
    dtypes: Sequence[str] = DTYPES,
    out_json: str | Path | None = None,
    repeat: int = 1,
    method: str = "sum",
    threads: int = 1,
) -> dict:
    """Merge three synthetic checkpoints per dtype `repeat` times; return (and write to `out_json`) one
    row per dtype: peak RssAnon above idle, the bound, the largest tensor, throughput vs one plain read.

    `threads` sets torch's intra-op threads in the merge child (0 keeps torch's default): the merge is
    memory-bound elementwise work, and on a shared CPU OpenMP spinning made 2 threads ~6× slower than 1.
    """
    if n_tensors < 1 or repeat < 1 or len(shape) != 2 or min(shape) < 1:
        raise ValueError("n_tensors and repeat must be ≥ 1 and shape two positive sides (rows, cols)")
    unknown = [d for d in dtypes if d not in DTYPES]
    if unknown or not dtypes:
        raise ValueError(f"unknown dtype(s) {unknown}; choose from {', '.join(DTYPES)}")
    idle_mb = max(run_child(["idle"])[0] for _ in range(2))
    rows = [
        _bench_dtype(dtype, n_tensors, tuple(shape), idle_mb, repeat=repeat, method=method, threads=threads)
        for dtype in dtypes
    ]
    result = {
        "bench": "merge", "method": method, "threads": threads, "repeat": repeat, "n_tensors": n_tensors,
        "shape": list(shape), "units": "MiB", "idle_rss_mb": idle_mb, "rows": rows, "pass": all(r["pass"] for r in rows),
    }
    if out_json is not None:
        Path(out_json).write_text(json.dumps(result, indent=2))
    return result


def _bench_dtype(dtype: str, n_tensors: int, shape: tuple[int, int], idle_mb: float, *, repeat: int, method: str,
                 threads: int) -> dict:
    with tempfile.TemporaryDirectory(prefix="clvr-bench-merge-") as tmp:
        root = Path(tmp)
        largest = write_checkpoints(root, dtype, n_tensors, shape)
        inputs = [root / "base", root / "aligned.safetensors", root / "distilled.safetensors"]
        files = [*sorted((root / "base").glob("*.safetensors")), *inputs[1:]]
        file_mb = max(f.stat().st_size for f in inputs[1:]) / MIB
        input_mb = sum(f.stat().st_size for f in files) / MIB
        runs = []
        for i in range(repeat):
            read_s = _read_once(files)
            peak_mb, stdout = run_child([*map(str, inputs), str(root / f"out{i}"), method, str(threads), "0"])
            runs.append((peak_mb, json.loads(stdout.splitlines()[-1])["seconds"], read_s))
            shutil.rmtree(root / f"out{i}")
    peak_mb = max(r[0] for r in runs)
    merge_s, read_s = min(r[1] for r in runs), min(r[2] for r in runs)
    largest_mb = largest / MIB
    budget = 2 * largest_mb + SLACK_MIB
    return {
        "dtype": dtype, "file_mb": file_mb, "input_mb": input_mb, "largest_tensor_mb": largest_mb,
        "peak_rss_mb": peak_mb, "peak_rss_above_idle_mb": peak_mb - idle_mb, "budget_mb": budget,
        "pass": peak_mb - idle_mb <= budget, "merge_s": merge_s, "read_once_s": read_s,
        "throughput_mb_s": input_mb / merge_s, "read_mb_s": input_mb / read_s, "throughput_vs_read": read_s / merge_s,
    }


def write_checkpoints(root: Path, dtype: str, n_tensors: int, shape: tuple[int, int]) -> int:
    """base/ (two shards + index), aligned.safetensors, distilled.safetensors: `n_tensors` weights of
    `shape` and a norm vector each, in `dtype`; returns the largest tensor's bytes."""
    import torch
    from safetensors.torch import save_file

    dt = getattr(torch, dtype)
    g = torch.Generator().manual_seed(0)
    shapes = {f"blocks.{i}.weight": shape for i in range(n_tensors)}
    shapes.update({f"blocks.{i}.norm": (shape[1],) for i in range(n_tensors)})
    names = sorted(shapes)
    (root / "base").mkdir()
    weight_map = {}
    for j in range(2):  # a two-shard base folder with its index
        fname = f"model-{j + 1:05d}-of-00002.safetensors"
        save_file({k: _randn(shapes[k], g, dt) for k in names[j::2]}, root / "base" / fname)
        weight_map.update({k: fname for k in names[j::2]})
    (root / "base" / "model.safetensors.index.json").write_text(json.dumps({"metadata": {}, "weight_map": weight_map}))
    for name in ("aligned", "distilled"):  # independent random tensors: the merge's cost does not depend on Δ
        save_file({k: _randn(shapes[k], g, dt) for k in names}, root / f"{name}.safetensors")
    return shape[0] * shape[1] * dt.itemsize


def _randn(shape, g, dtype):
    import torch

    return torch.randn(shape, generator=g).to(dtype)


def run_child(args: list[str]) -> tuple[float, str]:
    """Run the child script, sampling RssAnon every millisecond; return (peak MiB, stdout).

    args: ["idle"], or [base, aligned, distilled, out, method, threads, chunk_elems (0: the default)]."""
    with tempfile.TemporaryFile() as out, tempfile.TemporaryFile() as err:
        proc = subprocess.Popen([sys.executable, "-c", _CHILD, *args], stdout=out, stderr=err)
        status, peak_kb = Path(f"/proc/{proc.pid}/status"), 0
        while proc.poll() is None:
            try:
                for line in status.read_text().splitlines():
                    if line.startswith("RssAnon:"):
                        peak_kb = max(peak_kb, int(line.split()[1]))
            except (FileNotFoundError, ProcessLookupError):  # exited between poll and read
                break
            time.sleep(0.001)
        proc.wait()
        out.seek(0)
        err.seek(0)
        if proc.returncode != 0:
            raise RuntimeError(f"merge child failed ({proc.returncode}):\n{err.read().decode()[-4000:]}")
        return peak_kb / 1024, out.read().decode()


def _read_once(files: list[Path]) -> float:
    """Seconds to read every input byte once, sequentially, into one reused buffer."""
    buf = bytearray(16 * MIB)
    t = time.perf_counter()
    for f in files:
        with open(f, "rb", buffering=0) as fh:
            while fh.readinto(buf):
                pass
    return time.perf_counter() - t


def print_table(r: dict) -> None:
    from rich.console import Console
    from rich.table import Table

    rows, cols = r["shape"]
    t = Table(title=f"DSWM merge ({r['method']}), 3 checkpoints of {r['n_tensors']} × {rows}×{cols}; MiB; above = peak RssAnon "
                    f"idle child RssAnon {r['idle_rss_mb']:.0f}; bound = 2 × largest + {SLACK_MIB}")
    for name in ("dtype", "file", "largest", "above", "bound", "pass", "merge s", "MiB/s", "/read"):
        t.add_column(name, justify="left" if name == "dtype" else "right")
    for x in r["rows"]:
        t.add_row(
            x["dtype"], f"{x['file_mb']:.0f}", f"{x['largest_tensor_mb']:.0f}", f"{x['peak_rss_above_idle_mb']:.1f}",
            f"{x['budget_mb']:.0f}", "yes" if x["pass"] else "NO", f"{x['merge_s']:.2f}",
            f"{x['throughput_mb_s']:.0f}", f"{x['throughput_vs_read']:.3f}",
        )
    Console().print(t)
