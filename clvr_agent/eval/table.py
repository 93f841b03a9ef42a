"""The results table in one command: named model folders (rows), each measured on the same prompts ×
seeds, with bootstrap 95 % intervals for the differences the recipe claims → JSON + Markdown + PNG.

Per row, under ``OUT/<row>/``: single step and the loop on ``n`` GenEval-style ShapeWorld prompts for
each seed (:func:`~clvr_agent.eval.shapeworld.eval_shapeworld`: overall, strict, per tag, mean
iterations, seconds per loop), single-object colour+shape (:mod:`~clvr_agent.eval.colour_shape`, klein
rows), edit success per op (:func:`~clvr_agent.eval.edits.eval_edits`, each seed), and the complexity
probe for the rows the spec names. The loop's region draws are off unless the table or a row turns them
on, so a learned row gains only by its own edits and redraws.

Resumable: each part is a folder with ``part.json`` (its settings and results). A part whose settings
match is read back; one measured with other settings (another model, n, seed…) is an error; a part
without ``part.json`` (a killed run) is measured again. The table is rebuilt from the parts every time.
"""

from __future__ import annotations

import hashlib
import json
import re
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Callable, Optional

import numpy as np

from clvr_agent.eval.rules import TAGS
from clvr_agent.eval.stats import RESAMPLES, independent_bootstrap, paired_bootstrap, paired_units

KLEIN_BACKENDS = ("clvr-mini", "flux2-klein")
CANVAS = 256  # the side of the canvases the ShapeWorld detector is calibrated on


@dataclass
class Row:
    """One row: a backend, optionally pointed at a model folder, drawn with optional steps/guidance."""

    name: str
    model: Optional[str] = None  # a klein pipeline folder; None: the backend's own weights
    backend: str = "clvr-mini"
    steps: Optional[int] = None  # None: the checkpoint's (28 base, 4 distilled)
    guidance: Optional[float] = None  # None: the checkpoint's; 1 turns CFG off
    region_draws: Optional[bool] = None  # None: the table's setting

    def __post_init__(self) -> None:
        if not re.fullmatch(r"[A-Za-z0-9][A-Za-z0-9_.+@-]*", self.name):
            raise ValueError(f"row name {self.name!r}: use letters, digits and _ . + @ - (it names a folder)")
        if self.model is not None and self.backend not in KLEIN_BACKENDS:
            raise ValueError(f"row {self.name}: model is only read by the {' and '.join(KLEIN_BACKENDS)} backends")


def _row(data: dict) -> Row:
    unknown = set(data) - set(Row.__dataclass_fields__)
    if unknown or "name" not in data:
        raise ValueError(f"row {data.get('name', data)}: unknown keys {sorted(unknown)} or no name; "
                         f"a row has {', '.join(Row.__dataclass_fields__)}")
    return Row(**data)


@dataclass
class Spec:
    """The rows, the differences to report (``[a, b]`` reports b − a; default: each row against the
    one before it) and the rows whose probe curve is drawn."""

    rows: list[Row]
    compare: list[tuple[str, str]] = field(default_factory=list)
    probe: list[str] = field(default_factory=list)

    def __post_init__(self) -> None:
        self.rows = [r if isinstance(r, Row) else _row(r) for r in self.rows]
        names = [r.name for r in self.rows]
        if not names or len(set(names)) != len(names):
            raise ValueError(f"the spec needs rows with distinct names, got {names}")
        self.compare = [tuple(c) for c in self.compare] or list(zip(names, names[1:]))
        for pair in self.compare:
            if len(pair) != 2 or not set(pair) <= set(names):
                raise ValueError(f"compare {list(pair)}: expected [row, row] among {names}")
        unknown = set(self.probe) - set(names)
        if unknown:
            raise ValueError(f"probe rows {sorted(unknown)} are not rows of the spec ({names})")

    @classmethod
    def load(cls, path: str | Path) -> "Spec":
        """A JSON file: ``{"rows": [{"name": …, "model": …}, …], "compare": [[a, b], …], "probe": [names]}``."""
        data = json.loads(Path(path).read_text())
        unknown = set(data) - {"rows", "compare", "probe"}
        if unknown:
            raise ValueError(f"{path}: unknown keys {sorted(unknown)}; expected rows, compare, probe")
        return cls(rows=data["rows"], compare=data.get("compare", []), probe=data.get("probe", []))


@dataclass
class TableConfig:
    """How every row is measured (the same for all rows, so the differences are paired)."""

    n: int = 120  # prompts per seed
    seeds: tuple[int, ...] = (1, 2)
    max_iterations: int = 6
    region_draws: bool = False  # the loop's region draws, unless a row says otherwise
    colour_shape_seeds: int = 2  # 0 skips colour+shape
    edits: int = 120  # edits asked per seed; 0 skips edit success
    probe_tiers: tuple[int, ...] = (1, 2, 3, 4, 5, 6)
    per_tier: int = 5
    device: str = "cpu"
    resamples: int = RESAMPLES
    progress: bool = False

    def __post_init__(self) -> None:
        self.seeds, self.probe_tiers = tuple(self.seeds), tuple(self.probe_tiers)
        if self.n < 1 or not self.seeds or len(set(self.seeds)) != len(self.seeds):
            raise ValueError(f"need n ≥ 1 and distinct seeds, got n={self.n}, seeds={self.seeds}")
        if self.edits < 0 or self.colour_shape_seeds < 0 or self.per_tier < 1:
            raise ValueError("edits and colour_shape_seeds must be ≥ 0 (0 skips), per_tier ≥ 1")


def model_fingerprint(model: Optional[str]) -> Optional[str]:
    """Size and first/last MiB of every transformer weight file: a retrained folder is not read back as the old one."""
    if model is None:
        return None
    h = hashlib.sha256()
    for f in sorted((Path(model) / "transformer").glob("*.safetensors")):
        size = f.stat().st_size
        h.update(f"{f.name}:{size}".encode())
        with f.open("rb") as fh:
            h.update(fh.read(1 << 20))
            fh.seek(max(0, size - (1 << 20)))
            h.update(fh.read(1 << 20))
    return h.hexdigest()[:16]


def executor_options(row: Row, device: str) -> dict:
    """Registry options of the row's executor. A klein folder without ``clvr_canvas.json`` (a recipe
    stage) draws at its VAE's native size and hands the loop 256 px canvases, as the shipped folder does."""
    if row.backend not in KLEIN_BACKENDS:
        return {}
    from clvr_agent.tools.flux2_klein import canvas_config, clvr_mini_path

    model = Path(row.model) if row.model else clvr_mini_path()
    if not (model / "model_index.json").is_file():
        raise FileNotFoundError(f"row {row.name}: {model} is not a diffusers pipeline folder (no model_index.json)")
    own = canvas_config(model)
    native = json.loads((model / "vae" / "config.json").read_text())["sample_size"]
    return {"model": str(model), "torch_dtype": "float32", "device": device,
            "draw_size": own.get("draw_size", native), "canvas_size": own.get("canvas_size", CANVAS)}


class _Part:
    """One measurement of one row in ``folder``: read back when ``part.json`` has the same settings."""

    def __init__(self, folder: Path, settings: dict) -> None:
        self.folder, self.settings = folder, json.loads(json.dumps(settings))

    def get(self, measure: Callable[[Path], dict]) -> dict:
        record = self.folder / "part.json"
        if record.is_file():
            saved = json.loads(record.read_text())
            if saved["settings"] != self.settings:
                changed = sorted(k for k in set(saved["settings"]) | set(self.settings)
                                 if saved["settings"].get(k) != self.settings.get(k))
                raise ValueError(f"{self.folder} was measured with other settings ({', '.join(changed)}); "
                                 "use another --out, or remove that folder to measure it again")
            return saved["result"]
        self.folder.mkdir(parents=True, exist_ok=True)
        result = measure(self.folder)
        record.write_text(json.dumps({"settings": self.settings, "result": result}) + "\n")
        return result


def _strict(folder: Path, rows: list[dict]) -> list[bool]:
    """GenEval's pass *and* exactly as many detections (score > 0.3) as the prompt names, per prompt
    (the detector reads blobs in noise as shapes, so "at least one X" passes noisy canvases)."""
    from PIL import Image

    from clvr_agent.eval.rules import THRESHOLD
    from clvr_agent.tools.shapeworld.detect import detect

    out = []
    for r in rows:
        sample = folder / f"{r['index']:05d}" / "samples" / "0000.png"
        if not sample.is_file():  # a run that drew nothing
            out.append(False)
            continue
        line = json.loads((folder / f"{r['index']:05d}" / "metadata.jsonl").read_text().splitlines()[0])
        with Image.open(sample) as im:
            found = sum(d.score > THRESHOLD for d in detect(im.convert("RGB")))
        out.append(bool(r["passed"]) and found == sum(c["count"] for c in line["include"]))
    return out


class _RowRun:
    """Measures one row part by part; the executor loads only when a part is not read back."""

    def __init__(self, row: Row, out: Path, cfg: TableConfig) -> None:
        self.row, self.out, self.cfg = row, out / row.name, cfg
        self.region_draws = cfg.region_draws if row.region_draws is None else row.region_draws
        self.ex_opts = executor_options(row, cfg.device)
        self.request = {k: v for k, v in (("steps", row.steps), ("guidance", row.guidance)) if v is not None}
        self.identity = {"backend": row.backend, "model": self.ex_opts.get("model"),
                         "fingerprint": model_fingerprint(self.ex_opts.get("model")), **self.request}

    def executor(self):
        from clvr_agent.tools.registry import get_executor

        return get_executor(self.row.backend, **self.ex_opts)

    def part(self, name: str, **settings) -> _Part:
        return _Part(self.out / name, {**self.identity, **settings})

    def nfe(self) -> dict:
        def measure(_folder: Path) -> dict:
            from clvr_agent.types import ExecutorRequest

            prompt = "a photo of a red circle"
            out = self.executor().generate(ExecutorRequest(mode="generate", instruction=prompt, accumulated_prompt=prompt,
                                                           seed=0, **self.request), [])
            return {"nfe": out.nfe, "steps": out.info.get("steps", self.row.steps), "cfg": out.info.get("cfg"),
                    "guidance": out.info.get("guidance", self.row.guidance)}

        return self.part("nfe").get(measure)

    def sampled(self, mode: str, seed: int) -> dict:
        from clvr_agent.eval.shapeworld import eval_shapeworld

        ctl = {} if mode == "single" or self.region_draws else {"region_draws": False}

        def measure(folder: Path) -> dict:
            t0 = time.perf_counter()
            summary = eval_shapeworld(mode=mode, n=self.cfg.n, seed=seed, out_dir=str(folder), backend=self.row.backend,
                                      progress=self.cfg.progress, max_iterations=self.cfg.max_iterations,
                                      executor_options=self.ex_opts, controller_options=ctl, request=self.request)
            seconds = time.perf_counter() - t0
            rows = [json.loads(ln) for ln in (folder / "results.jsonl").read_text().splitlines() if ln.strip()]
            strict = _strict(folder, rows)
            units = [{"unit": f"s{seed}/{r['index']}", "tag": r["tag"], "passed": r["passed"], "strict": s,
                      "iterations": r["iterations"]} for r, s in zip(rows, strict)]
            return {"overall": summary["overall"], "units": units, "seconds_per_prompt": seconds / self.cfg.n}

        settings = dict(mode=mode, n=self.cfg.n, seed=seed, max_iterations=self.cfg.max_iterations)
        if mode == "loop":
            settings["region_draws"] = self.region_draws
        return self.part(f"{mode}-s{seed}", **settings).get(measure)

    def colour_shape(self) -> Optional[dict]:
        if not self.cfg.colour_shape_seeds or self.row.backend not in KLEIN_BACKENDS:
            return None

        def measure(_folder: Path) -> dict:
            from clvr_agent.eval.colour_shape import measure as colour_shape

            ex = self.executor()
            steps, guidance = ex.defaults()  # as the executor draws, unless the row says otherwise
            return colour_shape(ex.pipe, seeds=self.cfg.colour_shape_seeds, size=ex.native_side,
                                steps=self.row.steps or steps,
                                guidance=guidance if self.row.guidance is None else self.row.guidance, units=True)

        return self.part("colour-shape", seeds=self.cfg.colour_shape_seeds).get(measure)

    def edits(self, seed: int) -> Optional[dict]:
        if not self.cfg.edits:
            return None

        def measure(folder: Path) -> dict:
            from clvr_agent.eval.edits import eval_edits
            from clvr_agent.state import ClvrContext

            summary = eval_edits(self.executor(), n=self.cfg.edits, seed=seed, out_dir=folder,
                                 context=ClvrContext(**self.request), label=self.row.name, progress=self.cfg.progress)
            rows = [json.loads(ln) for ln in (folder / "results.jsonl").read_text().splitlines() if ln.strip()]
            return {"summary": summary, "rows": [{k: r[k] for k in ("ops", "op_executed", "executed", "satisfied_after")}
                                                 for r in rows]}

        return self.part(f"edits-s{seed}", n=self.cfg.edits, seed=seed).get(measure)

    def probe(self) -> dict:
        from clvr_agent.eval.shapeworld import probe

        seed = self.cfg.seeds[0]

        def measure(folder: Path) -> dict:
            s = probe(self.cfg.probe_tiers, per_tier=self.cfg.per_tier, seed=seed, out_dir=str(folder),
                      backend=self.row.backend, progress=self.cfg.progress, max_iterations=self.cfg.max_iterations,
                      executor_options=self.ex_opts, request=self.request,
                      controller_options={} if self.region_draws else {"region_draws": False})
            return {"tiers": s["tiers"], "single": s["single"], "loop": s["loop"]}

        return self.part("probe", tiers=list(self.cfg.probe_tiers), per_tier=self.cfg.per_tier, seed=seed,
                         max_iterations=self.cfg.max_iterations, region_draws=self.region_draws).get(measure)


def measure_row(row: Row, out: Path, cfg: TableConfig, probe: bool = False, parts: tuple[str, ...] = (
        "single", "loop", "colour_shape", "edits")) -> dict:
    """Every part of one row (read back where measured) → ``OUT/<row>/row.json``; returns it."""
    run = _RowRun(row, Path(out), cfg)
    result: dict = {"row": asdict(row), "region_draws": run.region_draws, **run.nfe()}
    for mode in ("single", "loop"):
        if mode in parts:
            result[mode] = _pool([run.sampled(mode, s) for s in cfg.seeds])
    if "colour_shape" in parts and (cs := run.colour_shape()) is not None:
        result["colour_shape"] = cs
    if "edits" in parts and cfg.edits:
        from clvr_agent.eval.edits import summarize_edits

        rows = [r for s in cfg.seeds for r in run.edits(s)["rows"]]
        result["edits"] = {**summarize_edits(rows), "units": [r["executed"] for r in rows]}
    if probe:
        result["probe"] = run.probe()
    (run.out / "row.json").write_text(json.dumps(result, indent=1) + "\n")
    return result


def _pool(per_seed: list[dict]) -> dict:
    """One mode's results over every seed: overall, strict, per tag, mean iterations, the units."""
    units = [u for p in per_seed for u in p["units"]]
    per_tag = {t: float(np.mean([u["passed"] for u in units if u["tag"] == t]))
               for t in TAGS if any(u["tag"] == t for u in units)}
    return {"overall": float(np.mean([u["passed"] for u in units])),
            "strict": float(np.mean([u["strict"] for u in units])), "per_tag": per_tag,
            "mean_iterations": float(np.mean([u["iterations"] for u in units])),
            "seconds_per_prompt": float(np.mean([p["seconds_per_prompt"] for p in per_seed])),
            "n": len(units), "units": units}


def _by_unit(mode_result: dict) -> dict:
    return {u["unit"]: float(u["passed"]) for u in mode_result["units"]}


def compare_rows(a: dict, b: dict, cfg: TableConfig) -> dict:
    """b − a per metric: single and loop paired by prompt × seed, colour+shape paired by canvas, edit
    success independent (each model's own canvases decide which edits are asked)."""
    out = {}
    for mode in ("single", "loop"):
        if mode in a and mode in b:
            out[mode] = paired_bootstrap(*paired_units(_by_unit(a[mode]), _by_unit(b[mode])), resamples=cfg.resamples)
    if "colour_shape" in a and "colour_shape" in b:
        key = lambda r: {f"s{u['seed']}/{u['colour']}/{u['shape']}": float(u["passed"])  # noqa: E731
                         for u in r["colour_shape"]["units"]}
        out["colour_shape"] = paired_bootstrap(*paired_units(key(a), key(b)), resamples=cfg.resamples)
    if a.get("edits", {}).get("units") and b.get("edits", {}).get("units"):
        out["edits"] = independent_bootstrap(a["edits"]["units"], b["edits"]["units"], resamples=cfg.resamples)
    return out


def build_table(spec: Spec, out: str | Path, cfg: TableConfig, log: Callable[[str], None] = print) -> dict:
    """Measure (or read back) every row, then write ``table.json``, ``table.md``, ``table.png`` (and
    ``probe.png`` when the spec names probe rows) to ``out``; returns the table."""
    from clvr_agent.eval.table_report import markdown, plot_probe, plot_table

    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    rows = {}
    for row in spec.rows:
        log(f"row {row.name}")
        rows[row.name] = measure_row(row, out, cfg, probe=row.name in spec.probe)
    gains = {}
    for name, r in rows.items():
        if "single" in r and "loop" in r:
            gains[name] = paired_bootstrap(*paired_units(_by_unit(r["single"]), _by_unit(r["loop"])),
                                           resamples=cfg.resamples)
    table = {"config": asdict(cfg), "spec": {"rows": [asdict(r) for r in spec.rows], "compare": spec.compare,
                                             "probe": spec.probe},
             "rows": rows, "loop_minus_single": gains,
             "compare": [{"from": a, "to": b, **compare_rows(rows[a], rows[b], cfg)} for a, b in spec.compare]}
    (out / "table.json").write_text(json.dumps(table, indent=1) + "\n")
    (out / "table.md").write_text(markdown(table))
    plot_table(table, out / "table.png")
    if spec.probe:
        plot_probe(table, out / "probe.png")
    return table
