"""What a run leaves behind: results.json, a per-sequence CSV and a plot of ΔĤ(η).

`write_report` turns the "estimates" artifact (entropy_core.stages.estimate) into three files in the
run's output_dir, results.json LAST and atomically, so results.json exists only for a run that finished:

    results.json       entropy {H_base, H_base_se, tokens, sequences, ...}
                       true    [{eta, delta_h, se, ess, logw_min, logw_median, logw_max, H_eta, clip_fraction,
                                 pred_linear, pred_quadratic}, ...]           SNIS ΔĤ(η), DESIGN §1.2
                       linear  {slope_exact, slope_exact_se, slope_fd, slope_fd_se, slope_vr, slope_vr_se,
                                fd_step}                                      DESIGN §1.3, §1.4 (null if off)
                       quadratic {curvature, curvature_se, curvature_fd, curvature_fd_se} (null if off)
                       update  {norm, num_tensors, loss, grad_norm, clip_scale, lr, ...}
                       artifacts {E, U, update_vector, theta, eta: {η: path}, linear, estimates, per_sequence_csv,
                                  plot}; config (every default filled in); run (resolved paths, runner);
                       versions; timing {stages: {name: {seconds, state}}, total_seconds}
    per_sequence.csv   one row per E sequence: index, prompt_index, T, S, H, logw at each η, response
    delta_h.png        ΔĤ(η) ± 1.96 se against η·slope and η·slope + η²·curvature/2
    attribution.csv    (estimator.attribution) one row per U sequence: c_i ± se, vr column, advantage,
                       reward, length, mean/min token log-prob, entropy, covariance proxy, response
    attribution.png    c_i against advantage and mean log-prob; cumulative share of the top-k sequences

`summary_markdown`, `eta_table` and `plot_png` give the same content for a UI (the Prefect flow
publishes them as artifacts); matplotlib is imported only to draw, with the Agg backend.
"""
from __future__ import annotations

import csv
import importlib.metadata
import io
import os
import platform
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from .artifacts import ArtifactRef, load_artifact, write_bytes_atomic, write_json_atomic

__all__ = ["RESULTS_NAME", "CSV_NAME", "PLOT_NAME", "ATTR_CSV_NAME", "ATTR_PLOT_NAME", "write_report",
           "build_results", "write_per_sequence_csv", "plot_png", "summary_markdown", "eta_table", "versions",
           "write_attribution", "attribution_png", "attribution_markdown", "figure_png"]

RESULTS_NAME, CSV_NAME, PLOT_NAME = "results.json", "per_sequence.csv", "delta_h.png"
ATTR_CSV_NAME, ATTR_PLOT_NAME = "attribution.csv", "attribution.png"
_Z95 = 1.96          # two-sided 95% normal quantile for the error bars


def versions() -> dict[str, str | None]:
    """Python and package versions (read from metadata; nothing is imported)."""
    out: dict[str, str | None] = {"python": platform.python_version()}
    for dist in ("entropy-core", "torch", "transformers", "peft", "safetensors", "pydantic", "prefect"):
        try:
            out[dist.replace("-", "_")] = importlib.metadata.version(dist)
        except importlib.metadata.PackageNotFoundError:
            out[dist.replace("-", "_")] = None
    return out


def build_results(body: Mapping[str, Any], *, config: Mapping, timing: Mapping, artifacts: Mapping,
                  run: Mapping | None = None) -> dict:
    """The results.json document from the estimates' body (entropy, true, linear, quadratic, update,
    and attribution when that stage ran)."""
    return {"entropy": body["entropy"], "true": body["true"], "linear": body["linear"],
            "quadratic": body["quadratic"], "update": body["update"], "attribution": body.get("attribution"),
            "artifacts": dict(artifacts),
            "config": dict(config), "run": dict(run or {}), "versions": versions(), "timing": dict(timing)}


def write_per_sequence_csv(path: str | os.PathLike, tensors: Mapping, meta: Mapping) -> Path:
    """One row per E sequence: index, prompt_index, T, S, H (sums over its tokens), logw at each η,
    dS, dH when the linear stage ran, and the response text."""
    etas = meta["etas"]
    cols = ["index", "prompt_index", "T", "S", "H"] + [f"logw[eta={eta:g}]" for eta in etas]
    extra = [k for k in ("dS", "dH") if k in tensors]
    cols += extra + ["response"]
    f = io.StringIO(newline="")
    w = csv.writer(f)
    w.writerow(cols)
    for i, text in enumerate(meta["texts"]):
        row = [i, int(tensors["prompt_index"][i]), int(tensors["T"][i]), repr(float(tensors["S"][i])),
               repr(float(tensors["H"][i]))]
        row += [repr(float(tensors["logw"][i, j])) for j in range(len(etas))]
        row += [repr(float(tensors[k][i])) for k in extra]
        w.writerow(row + [text])
    return write_bytes_atomic(path, f.getvalue().encode("utf-8"))   # unique temp name: concurrent runs are safe


def figure_png(fig) -> bytes:
    """A laid-out matplotlib figure as PNG bytes (the caller closes it)."""
    fig.tight_layout()
    buf = io.BytesIO()
    fig.savefig(buf, format="png")
    return buf.getvalue()


def plot_png(results: Mapping, *, width: float = 5.0, height: float = 3.2, dpi: int = 100) -> bytes:
    """PNG of ΔĤ(η) with ±1.96 se bars, and the linear and quadratic predictions when present."""
    import matplotlib
    matplotlib.use("Agg")                       # no display; safe in worker threads and on servers
    import matplotlib.pyplot as plt

    pts = sorted(results["true"], key=lambda p: p["eta"])
    etas = [p["eta"] for p in pts]
    fig, ax = plt.subplots(figsize=(width, height), dpi=dpi)
    try:
        ax.errorbar(etas, [p["delta_h"] for p in pts], yerr=[_Z95 * p["se"] for p in pts], fmt="o", color="k",
                    capsize=3, label="SNIS ΔĤ(η) ± 1.96 se")
        lo, hi = min(0.0, *etas), max(0.0, *etas)
        grid = [lo + (hi - lo) * k / 100 for k in range(101)]
        lin, quad = results.get("linear"), results.get("quadratic")
        slope = (lin or {}).get("slope_exact")
        if slope is not None:
            ax.plot(grid, [x * slope for x in grid], "-", color="C0", label="η · ΔĤ'(0)")
        if quad is not None and slope is not None:
            c = quad["curvature"]
            ax.plot(grid, [x * slope + x * x * c / 2 for x in grid], "--", color="C1", label="+ η² ΔĤ''(0) / 2")
        ax.axhline(0.0, color="0.7", lw=0.8)
        ax.set_xlabel("η (θ' = θ + η v)")
        ax.set_ylabel("ΔĤ (nats / token)")
        ax.ticklabel_format(axis="both", style="sci", scilimits=(-3, 3))
        ax.legend(fontsize=7)
        return figure_png(fig)
    finally:
        plt.close(fig)


def eta_table(results: Mapping) -> list[dict]:
    """One row per η: the SNIS estimate, its diagnostics and the predictions (for a table view)."""
    keys = ("eta", "delta_h", "se", "ess", "logw_min", "logw_median", "logw_max", "pred_linear", "pred_quadratic")
    return [{k: p.get(k) for k in keys} for p in results["true"]]


def summary_markdown(results: Mapping) -> str:
    """A short markdown summary: Ĥ(θ), the slope and curvature, the update, ΔĤ per η."""
    e, lin, quad, u = results["entropy"], results.get("linear"), results.get("quadratic"), results["update"]
    lines = ["# Entropy change of one Dr.GRPO + AdamW step", "",
             f"- Ĥ(θ) = {e['H_base']:.6g} ± {e['H_base_se']:.2g} nats/token "
             f"({e['sequences']} sequences, {e['tokens']} tokens)",
             f"- update: ‖v‖ = {u['norm']:.4g}, {u['num_tensors']} tensors, RL loss {u['loss']:.4g}"]
    if lin:
        lines.append(f"- ΔĤ'(0): exact {lin['slope_exact']:.6g} ± {lin['slope_exact_se']:.2g}, finite difference "
                     f"{lin['slope_fd']:.6g} (h = {lin['fd_step']:.3g})"
                     + (f", variance-reduced {lin['slope_vr']:.6g} ± {lin['slope_vr_se']:.2g}"
                        if lin.get("slope_vr") is not None else ""))
    if quad:
        lines.append(f"- ΔĤ''(0): exact {quad['curvature']:.6g} ± {quad['curvature_se']:.2g}, finite difference "
                     f"{quad['curvature_fd']:.6g}")
    lines += ["", "| η | ΔĤ(η) | se | ESS | η·slope |", "|---|---|---|---|---|"]
    for p in results["true"]:
        pred = p.get("pred_linear")
        lines.append(f"| {p['eta']:.3g} | {p['delta_h']:.6g} | {p['se']:.2g} | {p['ess']:.1f} | "
                     f"{'' if pred is None else f'{pred:.6g}'} |")
    return "\n".join(lines) + "\n"


def _write_atomic(path: Path, data: bytes) -> None:
    write_bytes_atomic(path, data)      # a unique temp name per writer: two runs of one output_dir never collide


def write_attribution(attr_ref: ArtifactRef, output_dir: str | os.PathLike) -> dict:
    """attribution.csv and attribution.png from the "attribution" artifact; returns the results.json
    section: base, slope, Σc, Spearman ρ(proxy, c), the top sequences by |c| and the file paths."""
    out = Path(output_dir)
    cols, meta = load_artifact(attr_ref)
    names = ["c", "c_se"] + [k for k in ("c_vr", "c_vr_se") if k in cols] + \
        ["advantage", "reward", "T", "logp_mean", "logp_min", "entropy_mean", "proxy", "prompt_index", "group"]
    lines = io.StringIO()
    w = csv.writer(lines)
    w.writerow(["index"] + names + ["response"])
    for i, text in enumerate(meta["texts"]):
        w.writerow([i] + [repr(float(cols[k][i])) for k in names] + [text])
    _write_atomic(out / ATTR_CSV_NAME, lines.getvalue().encode("utf-8"))
    _write_atomic(out / ATTR_PLOT_NAME, attribution_png(cols))
    c = cols["c"]
    top = c.abs().argsort(descending=True)[:5].tolist()
    return {**meta["summary"], "top": [{"index": i, "c": float(c[i]), "c_se": float(cols["c_se"][i]),
                                        "advantage": float(cols["advantage"][i]), "response": meta["texts"][i][:200]}
                                       for i in top],
            "csv": str(out / ATTR_CSV_NAME), "plot": str(out / ATTR_PLOT_NAME), "artifact": attr_ref.path}


def attribution_png(cols: Mapping, *, dpi: int = 100) -> bytes:
    """Three panels: c_i vs advantage, c_i vs mean token log-prob, cumulative share of Σc by the top-k |c_i|."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    c = cols["c"].double()
    fig, axes = plt.subplots(1, 3, figsize=(11, 3.2), dpi=dpi)
    try:
        for ax, key, label in ((axes[0], "advantage", "advantage A_i"), (axes[1], "logp_mean", "mean token log-prob")):
            ax.errorbar(cols[key].double().tolist(), c.tolist(), yerr=(_Z95 * cols["c_se"].double()).tolist(),
                        fmt="o", ms=3, color="k", ecolor="0.6", capsize=2)
            ax.axhline(0.0, color="0.7", lw=0.8)
            ax.set_xlabel(label)
            ax.set_ylabel("c_i = ⟨∇Ĥ, v_i⟩")
        order = c.abs().argsort(descending=True)
        share = (c[order].cumsum(0) / c.sum()).tolist()
        axes[2].plot(range(1, len(share) + 1), share, "-o", ms=2)
        axes[2].axhline(1.0, color="0.7", lw=0.8)
        axes[2].set_xlabel("top-k sequences by |c_i|")
        axes[2].set_ylabel("cumulative share of Σ c_i")
        for ax in axes:
            ax.ticklabel_format(axis="y", style="sci", scilimits=(-3, 3))
        return figure_png(fig)
    finally:
        plt.close(fig)


def attribution_markdown(attr: Mapping) -> str:
    """Σ c_i + base = slope, the proxy's rank correlation, and the top sequences by |c_i|."""
    lines = [f"- slope = Σ c_i + base = {attr['sum_c']:.6g} + {attr['base']:.6g} = {attr['slope']:.6g}",
             f"- Spearman ρ(covariance proxy, c_i) = {attr['spearman_proxy_c']:.3f}", "",
             "| U seq | c_i | se | advantage | response |", "|---|---|---|---|---|"]
    for r in attr["top"]:
        text = r["response"].replace("|", "\\|").replace("\n", " ")[:80]
        lines.append(f"| {r['index']} | {r['c']:.4g} | {r['c_se']:.2g} | {r['advantage']:.3g} | {text} |")
    return "\n".join(lines) + "\n"


def write_report(estimates_ref: ArtifactRef, *, output_dir: str | os.PathLike, config: Mapping, timing: Mapping,
                 artifacts: Mapping, run: Mapping | None = None, attribution_ref: ArtifactRef | None = None) -> Path:
    """Write per_sequence.csv, delta_h.png (and the attribution table and plot) and then results.json
    (atomically, last) into output_dir.

    Returns: the path of results.json.
    Raises: ValueError (nothing written to results.json) if any value cannot be stored as strict JSON.
    """
    out = Path(output_dir)
    tensors, meta = load_artifact(estimates_ref)
    body = {k: meta[k] for k in ("entropy", "true", "linear", "quadratic", "update")}
    if attribution_ref is not None:
        body["attribution"] = write_attribution(attribution_ref, out)
    csv_path = write_per_sequence_csv(out / CSV_NAME, tensors, meta)
    arts = {**artifacts, "estimates": estimates_ref.path, "per_sequence_csv": str(csv_path),
            "plot": str(out / PLOT_NAME)}
    results = build_results(body, config=config, timing=timing, artifacts=arts, run=run)
    _write_atomic(out / PLOT_NAME, plot_png(results))
    return write_json_atomic(out / RESULTS_NAME, results)
