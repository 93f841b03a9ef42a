"""One-shot GPU check: ``python scripts/gpu_check.py [OUT.json] [--dry-run]`` (the same as ``clvr bench gpu``).

The logic lives in :mod:`clvr_agent.eval.bench_gpu`, so it also runs from an installed wheel; see its docstring
for what is timed and where the full-size configs come from.
"""

from clvr_agent.eval.bench_gpu import main, run  # noqa: F401  run: clvr_agent.eval.bench.bench_gpu loads this file by path

if __name__ == "__main__":
    main()
