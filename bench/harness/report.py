"""The one report: Markdown tables and plots from a results JSON.

Two JSON shapes come in: the suite's (``rnf-fast bench``, :func:`harness.measure.run_suite`)
and pytest-benchmark's (``pytest bench/ --benchmark-json=...``). :func:`as_rows` turns the
second into the first (one row per log det case, the single-op backend comparisons apart), so
:func:`markdown` and :func:`plots` read one shape: one table per problem (time per training
step with its 20th–80th percentiles, speed-ups over the autodiff Jacobians, peak memory,
matvecs and CG iterations, errors against the float64 truth; skipped cells with their
estimated time), the exact-vs-CG study over d with its crossovers, and the ops table.
"""

from __future__ import annotations

import os
from pathlib import Path

from .contenders import JACFWD, JACREV
from .measure import percentile
from .problems import PROBLEMS

__all__ = ["as_rows", "markdown", "plots"]

_OP_BACKENDS = {"torch", "cpp", "triton"}


def as_rows(results: dict) -> dict:
    """A results JSON in the suite's shape.

    Arguments:
        results: a suite JSON (returned as it is) or a pytest-benchmark JSON, whose
            benchmarks carry ``extra_info`` with ``problem``, ``contender`` and the errors and
            peak bytes of the case.

    Returns:
        ``{"machine_info", "rows", "ops", ...}``: ``rows`` as :func:`harness.measure.run_case`
        writes them (status ok, median and percentiles in seconds); ``ops``: problem name to
        {backend: median seconds} for the single-op comparisons (contenders named after
        backends).
    """
    if "benchmarks" not in results:
        return results
    by_problem: dict[str, list[dict]] = {}
    for b in results["benchmarks"]:
        extra = b.get("extra_info", {})
        times = b["stats"].get("data") or [b["stats"]["median"]]
        row = {
            **{k: v for k, v in extra.items() if k not in ("problem", "contender")},
            "problem": extra.get("problem", "?"),
            "contender": extra.get("contender", b["name"]),
            "status": "ok",
            "median_s": b["stats"]["median"],
            "p20_s": percentile(times, 0.2),
            "p80_s": percentile(times, 0.8),
            "rounds": len(times),
        }
        by_problem.setdefault(row["problem"], []).append(row)
    rows, ops = [], {}
    for name, group in by_problem.items():
        if {r["contender"] for r in group} <= _OP_BACKENDS:
            ops[name] = {r["contender"]: r["median_s"] for r in group}
        else:
            rows += group
    return {"machine_info": results.get("machine_info", {}), "rows": rows, "ops": ops}


def _ops_table(ops: dict[str, dict[str, float]]) -> list[str]:
    """One row per (op, size, dtype) group of backend contenders, with speed-ups over torch."""
    backends = sorted({b for times in ops.values() for b in times if b != "torch"})
    lines = [
        "| op, systems, d, dtype | torch ms | "
        + " | ".join(f"{b} ms | {b} speed-up" for b in backends)
        + " |",
        "|---|---:|" + "---:|---:|" * len(backends),
    ]
    for name, times in ops.items():
        torch_ms = times["torch"] * 1e3 if "torch" in times else float("nan")
        cells = []
        for b in backends:
            ms = times[b] * 1e3 if b in times else float("nan")
            cells.append(f"{ms:.2f} | {torch_ms / ms:.2f}×")
        lines.append(f"| {name} | {torch_ms:.2f} | " + " | ".join(cells) + " |")
    return lines


def _fmt(x: float | None, spec: str) -> str:
    return "–" if x is None else format(x, spec)


def _bound(row: dict) -> str:
    """ "≤ " for an estimate scaled from one sample: with a step time affine in the batch,
    t(B) = a + c·B ≤ B·t(1), it is an upper bound; "" for the two-size affine fit."""
    return "≤ " if row.get("estimate_from_batch") == 1 and row["B"] > 1 else ""


def _suite_table(rows: list[dict]) -> list[str]:
    ok = {r["contender"]: r for r in rows if r["status"] == "ok"}
    rev = ok.get(JACREV, {}).get("median_s")
    fwd = ok.get(JACFWD, {}).get("median_s")
    # A skipped reference still gives a ratio, from its estimate, marked "~".
    est = {r["contender"]: r.get("estimate_s") for r in rows if r["status"] == "skipped"}
    rev_mark, fwd_mark = "", ""
    if rev is None and est.get(JACREV):
        rev, rev_mark = est[JACREV], "~"
    if fwd is None and est.get(JACFWD):
        fwd, fwd_mark = est[JACFWD], "~"
    lines = [
        "| contender | method, backend | median ms | p20–p80 ms | vs reverse-mode "
        "| vs forward-mode | peak MB | matvecs | CG iters | value rel. err | grad rel. err |",
        "|---|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for r in rows:
        name = r["contender"]
        how = ", ".join(str(r[k]) for k in ("method", "backend") if r.get(k))
        if r["status"] == "skipped":
            est = (
                f"skipped: est. {_bound(r)}{r['estimate_s'] * 1e3:.0f} ms/step "
                f"(from B={r['estimate_from_batch']})"
            )
            lines.append(f"| {name} | {how or '–'} | {est} | | | | | | | | |")
            continue
        med = r["median_s"]
        lines.append(
            f"| {name} | {how or '–'} | {med * 1e3:.2f} | "
            f"{r['p20_s'] * 1e3:.2f}–{r['p80_s'] * 1e3:.2f} | "
            + (f"{rev_mark}{rev / med:.1f}× | " if rev else "– | ")
            + (f"{fwd_mark}{fwd / med:.2f}× | " if fwd else "– | ")
            + (f"{r['peak_bytes'] / 2**20:.1f} | " if "peak_bytes" in r else "– | ")
            + f"{_fmt(r.get('matvecs'), 'd')} | {_fmt(r.get('cg_iterations'), '.1f')} | "
            f"{_fmt(r.get('value_rel_err'), '.1e')} | {_fmt(r.get('grad_rel_err'), '.1e')} |"
        )
    return lines


def _study_table(study: dict) -> list[str]:
    rows = study["rows"]
    names = list(dict.fromkeys(r["contender"] for r in rows))
    cell = {(r["contender"], r["d"]): r for r in rows}
    lines = [
        "| d | " + " | ".join(f"{n} ms (MB)" for n in names) + " |",
        "|---:|" + "---:|" * len(names),
    ]
    for d in study["ds"]:
        cells = []
        for n in names:
            r = cell.get((n, d))
            if r is None:
                cells.append("–")
            elif r["status"] == "skipped":
                cells.append(f"skipped (est. {_bound(r)}{r['estimate_s'] * 1e3:.0f})")
            else:
                mb = f" ({r['peak_bytes'] / 2**20:.1f})" if "peak_bytes" in r else ""
                cells.append(f"{r['median_s'] * 1e3:.2f}{mb}")
        lines.append(f"| {d} | " + " | ".join(cells) + " |")
    return lines


def _title(name: str) -> str:
    spec = PROBLEMS.get(name)
    if spec is None:
        return f"**{name}, float32**"
    return f"**{name}: {spec.about}; d={spec.d}, D={spec.D}, B={spec.B}, float32**"


def markdown(results: dict) -> str:
    """Markdown of a results JSON (suite or pytest-benchmark, see :func:`as_rows`): the
    machine, one table per problem (time per training step with its 20th–80th percentiles,
    speed-ups over the autodiff Jacobians (marked ~ when that reference was skipped and its
    estimate is used), peak memory, matvecs and CG iterations, errors against the float64
    truth; skipped cells with their estimated time), the exact-vs-CG study over d with its
    crossovers, and the backends of the single ops with their speed-ups over torch."""
    results = as_rows(results)
    info = results.get("machine_info", {})
    line = (
        f"Machine: {info.get('cpu', '?')}, {info.get('threads', '?')} threads, "
        f"GPU: {info.get('gpu') or 'none'}, torch {info.get('torch', '?')}, "
        f"triton {info.get('triton') or 'none'}, extension "
        f"{'built' if info.get('extension') else 'absent'}, backends "
        f"{info.get('backends', '?')}; commit {info.get('commit', '?')}."
    )
    if "size" in results:
        line += (
            f" Suite {results.get('size')} on {results.get('device')}, "
            f"{results.get('elapsed_s', 0):.0f} s."
        )
    lines = [line]
    if results.get("size") == "quick":
        lines.append("Quick mode: each cell verified and run once; times are single steps.")
    by_problem: dict[str, list[dict]] = {}
    for r in results["rows"]:
        by_problem.setdefault(r["problem"], []).append(r)
    for pname, rows in by_problem.items():
        lines += ["", _title(pname), "", *_suite_table(rows)]
    study = results.get("study_d")
    if study and study["rows"]:
        spec = PROBLEMS[study["problem"]]
        cross = ", ".join(
            f"{k}: {v if v is not None else 'none'}" for k, v in study["crossover"].items()
        )
        lines += [
            "",
            f"**Exact vs CG as d grows: MLP d -> {spec.hidden} -> D={spec.D}, B={spec.B}; "
            f"time per step, ms (peak MB)**",
            "",
            *_study_table(study),
            "",
            f"Crossover: {cross}.",
        ]
    if results.get("ops"):
        lines += ["", "**Backends of the small ops (and one log-det training step)**", ""]
        lines += _ops_table(results["ops"])
    return "\n".join(lines) + "\n"


def plots(results: dict, out_dir: str | os.PathLike, *, prefix: str = "bench") -> list[Path]:
    """Draw the plots of a results JSON (suite or pytest-benchmark, see :func:`as_rows`) with
    matplotlib, log scales, into ``out_dir``: ``{prefix}_time.png`` and ``{prefix}_memory.png``
    (one panel per problem, a dot per contender, skipped cells as open red dots at their
    estimated time) and ``{prefix}_d_time.png``, ``{prefix}_d_memory.png`` (one line per
    contender against d, the CG/exact crossovers marked). A figure with no data (memory in
    quick mode) is not written.

    Returns:
        The files written.
    """
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    results = as_rows(results)
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    written = []
    by_problem: dict[str, list[dict]] = {}
    for r in results["rows"]:
        by_problem.setdefault(r["problem"], []).append(r)
    for key, label, scale in (
        ("median_s", "time per step (ms)", 1e3),
        ("peak_bytes", "peak memory (MB)", 2**-20),
    ):
        if not any(r.get(key) for r in results["rows"]):
            continue  # quick mode measures no memory
        fig, axes = plt.subplots(
            len(by_problem), 1, figsize=(8, 2.2 + 0.3 * 12 * len(by_problem) / 2), squeeze=False
        )
        for ax, (pname, rows) in zip(axes[:, 0], by_problem.items()):
            names = [r["contender"] for r in rows]
            vals = [r[key] * scale if r.get(key) else float("nan") for r in rows]
            est = [
                r["estimate_s"] * 1e3
                if key == "median_s" and r["status"] == "skipped"
                else float("nan")
                for r in rows
            ]
            ys = range(len(names))
            ax.scatter(vals, list(ys), color="tab:blue", zorder=3, label="measured")
            if any(e == e for e in est):  # not all NaN
                ax.scatter(
                    est,
                    list(ys),
                    facecolors="none",
                    edgecolors="tab:red",
                    zorder=3,
                    label="skipped: estimate",
                )
            ax.grid(axis="x", which="both", alpha=0.3)
            ax.set_yticks(list(ys), names, fontsize=7)
            ax.invert_yaxis()
            if not any(v == v for v in vals + est):  # every cell skipped or unmeasured
                ax.text(0.5, 0.5, "no measurement", transform=ax.transAxes, ha="center")
            else:
                ax.legend(fontsize=7, loc="lower right")
                ax.set_xscale("log")
            ax.set_title(pname, fontsize=9)
            ax.set_xlabel(label, fontsize=8)
        fig.tight_layout()
        path = out / f"{prefix}_{'time' if key == 'median_s' else 'memory'}.png"
        fig.savefig(path, dpi=110)
        plt.close(fig)
        written.append(path)
    study = results.get("study_d")
    if study and study["rows"]:
        for key, label, scale, suffix in (
            ("median_s", "time per step (ms)", 1e3, "time"),
            ("peak_bytes", "peak memory (MB)", 2**-20, "memory"),
        ):
            fig, ax = plt.subplots(figsize=(6, 4))
            names = list(dict.fromkeys(r["contender"] for r in study["rows"]))
            for n in names:
                pts = sorted(
                    (r["d"], r[key] * scale)
                    for r in study["rows"]
                    if r["contender"] == n and r["status"] == "ok" and r.get(key)
                )
                if pts:
                    ax.plot(*zip(*pts), marker="o", label=n)
            if not ax.lines:
                plt.close(fig)
                continue
            for (what, d), style in zip(study["crossover"].items(), ("--", ":")):
                if d is not None:
                    ax.axvline(
                        d,
                        color="gray",
                        linestyle=style,
                        label=what.replace(" from d", f" from d={d}"),
                    )
            ax.set_xscale("log", base=2)
            ax.set_yscale("log")
            ax.set_xlabel("latent dimension d")
            ax.set_ylabel(label)
            spec = PROBLEMS[study["problem"]]
            ax.set_title(f"MLP decoder d -> {spec.hidden} -> {spec.D}, B={spec.B}", fontsize=9)
            ax.legend(fontsize=7)
            fig.tight_layout()
            path = out / f"{prefix}_d_{suffix}.png"
            fig.savefig(path, dpi=110)
            plt.close(fig)
            written.append(path)
    return written
