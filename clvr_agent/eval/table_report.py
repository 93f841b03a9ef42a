"""``clvr eval table``'s outputs from its ``table.json`` data: the Markdown table and the two charts."""

from __future__ import annotations

from pathlib import Path

from clvr_agent.eval.edits import OPS


def _rate(x) -> str:
    return "—" if x is None else f"{x:.2f}"


def _ci(c: dict) -> str:
    return f"{c['diff']:+.3f} [{c['lo']:+.3f}, {c['hi']:+.3f}]"


def _sampling(r: dict) -> str:
    cfg = f"CFG {r['guidance']:g}" if r.get("cfg") else "no CFG"
    return f"{r['steps']} × {cfg} ({r['nfe']})" if r.get("steps") is not None else f"({r['nfe']})"


def markdown(table: dict) -> str:
    """The rows, the differences with their intervals, per tag, edit success per op, the probe curves."""
    cfg, rows = table["config"], table["rows"]
    seeds = ", ".join(map(str, cfg["seeds"]))
    units = cfg["n"] * len(cfg["seeds"])
    lines = [f"n = {cfg['n']} GenEval-style prompts × seeds {seeds} = {units} per row; loop budget "
             f"{cfg['max_iterations']} iterations; region draws {'on' if cfg['region_draws'] else 'off'} unless the row "
             f"says; intervals: bootstrap 95 %, {cfg['resamples']} resamples, seed 0.", "",
             "| row | model | steps × CFG (NFE/generate) | region draws | single-object colour+shape | edit success "
             "| single-step overall (strict) | loop overall (strict) | loop − single [95 % CI] | mean iterations "
             "| s per loop prompt |", "|---|---|---|---|---|---|---|---|---|---|---|"]
    for name, r in rows.items():
        s, lp = r.get("single"), r.get("loop")
        cs = _rate(r["colour_shape"]["colour_shape"]) if "colour_shape" in r else "—"
        ed = _rate(r["edits"]["overall"]) if "edits" in r else "—"
        fmt = (lambda m: f"{m['overall']:.2f} ({m['strict']:.2f})" if m else "—")  # noqa: E731
        gain = _ci(table["loop_minus_single"][name]) if name in table["loop_minus_single"] else "—"
        its = f"{lp['mean_iterations']:.2f} | {lp['seconds_per_prompt']:.1f}" if lp else "— | —"
        lines.append(f"| {name} | {r['row']['model'] or r['row']['backend']} | {_sampling(r)} | "
                     f"{'on' if r['region_draws'] else 'off'} | {cs} | {ed} | {fmt(s)} | {fmt(lp)} | {gain} | {its} |")
    lines += ["", "Differences (to − from; single step and loop paired by prompt × seed, colour+shape by canvas, "
              "edit success unpaired: each model's canvases decide which edits are asked):", "",
              "| from → to | single-step | loop | colour+shape | edit success |", "|---|---|---|---|---|"]
    for c in table["compare"]:
        cells = [_ci(c[m]) if m in c else "—" for m in ("single", "loop", "colour_shape", "edits")]
        lines.append(f"| {c['from']} → {c['to']} | " + " | ".join(cells) + " |")
    lines += ["", "Per tag (single → loop):", ""]
    for name, r in rows.items():
        if "single" in r and "loop" in r:
            tags = "; ".join(f"{t} {r['single']['per_tag'][t]:.2f}→{r['loop']['per_tag'].get(t, 0):.2f}"
                             for t in r["single"]["per_tag"])
            lines.append(f"* {name}: {tags}")
    edit_rows = {name: r["edits"] for name, r in rows.items() if "edits" in r}
    if edit_rows:
        lines += ["", "Edit success per op (each op judged alone; n in brackets):", "",
                  "| row | " + " | ".join(OPS) + " | all instructions | edited canvas satisfies the prompt |",
                  "|---|" + "---|" * (len(OPS) + 2)]
        for name, e in edit_rows.items():
            ops = " | ".join(f"{_rate(e['by_op'][k]['success'])} ({e['by_op'][k]['n']})" for k in OPS)
            lines.append(f"| {name} | {ops} | {_rate(e['overall'])} ({e['n']}) | {_rate(e['satisfied_after'])} |")
    probes = {name: r["probe"] for name, r in rows.items() if "probe" in r}
    if probes:
        lines += ["", "Complexity probe (pass by tier; AUC = mean × 100):", ""]
        for name, p in probes.items():
            lines.append(f"* {name}, tiers {p['tiers']}: single {[round(x, 2) for x in p['single']['pass_by_tier']]} "
                         f"(AUC {p['single']['auc']:.1f}), loop {[round(x, 2) for x in p['loop']['pass_by_tier']]} "
                         f"(AUC {p['loop']['auc']:.1f})")
    return "\n".join(lines) + "\n"


def _plt():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def plot_table(table: dict, path: Path) -> None:
    """Left: each row's rates; right: each reported difference of the loop (and single step) with its interval."""
    import numpy as np

    plt = _plt()
    rows = table["rows"]
    names = list(rows)
    metrics = [("single", "single step"), ("loop", "loop"), ("colour_shape", "colour+shape"), ("edits", "edit success")]
    fig, (left, right) = plt.subplots(1, 2, figsize=(13, 4.5), gridspec_kw={"width_ratios": [3, 2]})
    width = 0.8 / len(metrics)
    x = np.arange(len(names))
    for i, (key, label) in enumerate(metrics):
        vals = [rows[n][key]["colour_shape" if key == "colour_shape" else "overall"] if key in rows[n] else np.nan
                for n in names]
        vals = [np.nan if v is None else v for v in vals]
        left.bar(x + (i - 1.5) * width, vals, width, label=label)
    left.set_xticks(x, names, rotation=30, ha="right")
    left.set_ylim(0, 1)
    left.set_ylabel("pass rate")
    left.legend(fontsize=8)
    left.set_title(f"rows (n = {table['config']['n']} × {len(table['config']['seeds'])} seeds)")
    comps = table["compare"]
    y = np.arange(len(comps))
    for off, key, style in ((-0.15, "single", "o"), (0.15, "loop", "s")):
        pts = [(j + off, c[key]) for j, c in enumerate(comps) if key in c]
        if pts:
            ys, cs = zip(*pts)
            d = np.array([c["diff"] for c in cs])
            err = np.array([[c["diff"] - c["lo"] for c in cs], [c["hi"] - c["diff"] for c in cs]])
            right.errorbar(d, ys, xerr=err, fmt=style, capsize=3, label=key)
    right.axvline(0, color="grey", lw=0.8)
    right.set_yticks(y, [f"{c['from']} → {c['to']}" for c in comps])
    right.invert_yaxis()
    right.set_xlabel("difference, 95 % CI")
    right.legend(fontsize=8)
    right.set_title("paired differences")
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


def plot_probe(table: dict, path: Path) -> None:
    """Pass rate by tier, single step (dashed) and loop (solid), one colour per probe row."""
    plt = _plt()
    fig, ax = plt.subplots(figsize=(6.5, 4))
    for i, (name, r) in enumerate((n, r) for n, r in table["rows"].items() if "probe" in r):
        p, colour = r["probe"], f"C{i}"
        ax.plot(p["tiers"], p["single"]["pass_by_tier"], "o--", color=colour, label=f"{name} single ({p['single']['auc']:.0f})")
        ax.plot(p["tiers"], p["loop"]["pass_by_tier"], "s-", color=colour, label=f"{name} loop ({p['loop']['auc']:.0f})")
    ax.set_xlabel("tier (atomic constraints)")
    ax.set_ylabel("pass rate")
    ax.set_ylim(0, 1.02)
    ax.legend(fontsize=7)
    ax.set_title("complexity probe (AUC)")
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
