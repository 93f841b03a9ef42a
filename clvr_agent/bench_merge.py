"""`clvr bench merge`: peak anonymous memory and throughput of the streamed DSWM merge.

Builds synthetic bf16 safetensors checkpoints (a sharded base folder, aligned and distilled single files)
in a temp dir and runs the merge in a child process while sampling its RssAnon from /proc/<pid>/status;
memory-mapped checkpoint pages are page cache (RssFile) and do not count. The idle footprint is a child
with the same imports, measured the same way. Pass: peak above idle ≤ 2 × largest tensor + 200 MiB.
"""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

MIB = 1 << 20
_CHILD = """
import json, sys, time
import torch, safetensors
from clvr_agent.training.merge import MergeConfig, merge_checkpoints
if sys.argv[1] == "idle":
    time.sleep(1.0)
else:
    if int(sys.argv[6]) > 0:
        torch.set_num_threads(int(sys.argv[6]))
    t = time.perf_counter()
    merge_checkpoints(MergeConfig(*sys.argv[1:5], method=sys.argv[5]))
    print(json.dumps({"seconds": time.perf_counter() - t}))
"""


def bench_merge(
    size_mb: float = 300, out_json: str | Path | None = None, repeat: int = 1, method: str = "sum", threads: int = 1
) -> dict:
    """Merge three synthetic checkpoints of about `size_mb` MiB each `repeat` times; print a table, return
    (and write to `out_json`) peak RssAnon above idle, the largest tensor, throughput vs one plain read.

    `threads` sets torch's intra-op threads in the merge child (0 keeps torch's default): the merge is
    memory-bound elementwise work, and on a shared CPU OpenMP spinning made 2 threads ~6× slower than 1.
    """
    if size_mb < 8 or repeat < 1:
        raise ValueError("size_mb must be ≥ 8 and repeat ≥ 1")
    with tempfile.TemporaryDirectory(prefix="clvr-bench-merge-") as tmp:
        root = Path(tmp)
        largest, n_tensors = _write_checkpoints(root, size_mb)
        inputs = [root / "base", root / "aligned.safetensors", root / "distilled.safetensors"]
        files = [*sorted((root / "base").glob("*.safetensors")), *inputs[1:]]
        input_mb = sum(f.stat().st_size for f in files) / MIB
        idle_mb = max(_run_child(["idle"])[0] for _ in range(2))
        runs = []
        for i in range(repeat):
            read_s = _read_once(files)
            peak_mb, stdout = _run_child([*map(str, inputs), str(root / f"out{i}"), method, str(threads)])
            runs.append((peak_mb, json.loads(stdout.splitlines()[-1])["seconds"], read_s))
            shutil.rmtree(root / f"out{i}")
    peak_mb = max(r[0] for r in runs)
    merge_s, read_s = min(r[1] for r in runs), min(r[2] for r in runs)
    above = peak_mb - idle_mb
    largest_mb = largest / MIB
    budget = 2 * largest_mb + 200
    result = {
        "method": method, "threads": threads, "size_mb": size_mb, "repeat": repeat, "n_tensors": n_tensors, "units": "MiB",
        "input_mb": input_mb, "largest_tensor_mb": largest_mb, "idle_rss_mb": idle_mb, "peak_rss_mb": peak_mb,
        "peak_rss_above_idle_mb": above, "budget_mb": budget, "pass": above <= budget,
        "merge_s": merge_s, "read_once_s": read_s, "throughput_mb_s": input_mb / merge_s,
        "read_mb_s": input_mb / read_s, "throughput_vs_read": read_s / merge_s,
    }
    _print_table(result)
    if out_json is not None:
        Path(out_json).write_text(json.dumps(result, indent=2))
    return result


def _write_checkpoints(root: Path, size_mb: float) -> tuple[int, int]:
    """bf16 tensors shaped like a DiT: one wide weight of size/6, square blocks of ~size/40, norms."""
    import torch
    from safetensors.torch import save_file

    total = int(size_mb * MIB) // 2  # bf16 elements per checkpoint
    cols = 1024
    shapes = {"wide.weight": (total // 6 // cols, cols)}
    block_rows = max(total // 40 // cols, 1)
    used, i = shapes["wide.weight"][0] * cols, 0
    while used + (block_rows + 1) * cols <= total:
        shapes[f"blocks.{i}.weight"] = (block_rows, cols)
        shapes[f"blocks.{i}.norm"] = (cols,)
        used, i = used + (block_rows + 1) * cols, i + 1
    g = torch.Generator().manual_seed(0)
    base = {k: torch.randn(s, generator=g, dtype=torch.bfloat16) for k, s in shapes.items()}
    names = sorted(base)
    (root / "base").mkdir()
    weight_map = {}
    for j in range(2):  # a two-shard base folder with its index
        fname = f"model-{j + 1:05d}-of-00002.safetensors"
        save_file({k: base[k] for k in names[j::2]}, root / "base" / fname)
        weight_map.update({k: fname for k in names[j::2]})
    (root / "base" / "model.safetensors.index.json").write_text(json.dumps({"metadata": {}, "weight_map": weight_map}))
    for name in ("aligned", "distilled"):
        other = {k: v + 0.01 * torch.randn(v.shape, generator=g, dtype=v.dtype) for k, v in base.items()}
        save_file(other, root / f"{name}.safetensors")
        del other
    return max(v.nbytes for v in base.values()), len(base)


def _run_child(args: list[str]) -> tuple[float, str]:
    """Run the child script, sampling RssAnon every millisecond; return (peak MiB, stdout)."""
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


def _print_table(r: dict) -> None:
    from rich.console import Console
    from rich.table import Table

    t = Table(title=f"DSWM merge ({r['method']}, 3 × {r['size_mb']:.0f} MiB bf16, {r['n_tensors']} tensors)")
    t.add_column("metric")
    t.add_column("value", justify="right")
    rows = [
        ("largest tensor", f"{r['largest_tensor_mb']:.1f} MiB"),
        ("idle child RssAnon (python+torch+safetensors)", f"{r['idle_rss_mb']:.1f} MiB"),
        ("peak merge RssAnon", f"{r['peak_rss_mb']:.1f} MiB"),
        ("peak above idle", f"{r['peak_rss_above_idle_mb']:.1f} MiB"),
        ("budget 2 × largest + 200", f"{r['budget_mb']:.1f} MiB"),
        ("pass", "yes" if r["pass"] else "NO"),
        ("merge time", f"{r['merge_s']:.2f} s"),
        ("read inputs once", f"{r['read_once_s']:.2f} s"),
        ("throughput (input MiB / merge s)", f"{r['throughput_mb_s']:.0f} MiB/s"),
        ("plain read", f"{r['read_mb_s']:.0f} MiB/s"),
        ("merge speed / read speed", f"{r['throughput_vs_read']:.3f}"),
    ]
    for k, v in rows:
        t.add_row(k, v)
    Console().print(t)
