"""The files of a comparison, under one folder::

    comparison.json      everything compare() found (NaN and inf written as null)
    comparison.csv       one row per config × metric × stat (Comparison.table())
    scatter.png          predicted against measured, every metric × stat, one point per config
    cdf_<config>.png     per config: TTFT and TPOT distributions, predicted and measured
    series_<config>.png  per config: running, waiting and KV usage over the replay, measured
                         (solid) with the predicted series (dashed) when given
    report.html          one self-contained page (the PNGs inlined as data: URIs)

matplotlib is the ``plot`` extra: without it the JSON and CSV are written and a
ServetwinError says how to get the rest.
"""

from __future__ import annotations

import base64
import html
import io
import json
import math
import re
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from sim.errors import ServetwinError

from .compare import (
    LATENCY_METRICS,
    RANK_THROUGHPUT,
    SCALAR_STAT,
    Check,
    Comparison,
    ConfigComparison,
    json_safe,
)

SERIES_PANELS = (("num_requests_running", "running requests"),
                 ("num_requests_waiting", "waiting requests"),
                 ("kv_cache_usage_perc", "KV cache usage (%)"))
_SCATTER_EXTRAS = (RANK_THROUGHPUT, "prefix_cache_hit_rate")
_NAMES = {"ttft_s": "TTFT", "tpot_s": "TPOT", "itl_s": "ITL", "e2e_s": "E2E",
          "request_throughput_per_s": "request throughput",
          "output_throughput_tokens_per_s": "output throughput",
          "total_throughput_tokens_per_s": "total throughput",
          "prefix_cache_hit_rate": "prefix-cache hit rate", "num_preemptions": "preemptions"}
_UNITS = {"request_throughput_per_s": "req/s", "output_throughput_tokens_per_s": "tok/s",
          "total_throughput_tokens_per_s": "tok/s"}


def write_report(comparison: Comparison, out_dir: Path, title: str,
                 meta: dict[str, Any]) -> dict[str, Path]:
    """Write every file; returns them by file name (JSON, CSV, PNGs, then the HTML)."""
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    paths = {name: out_dir / name for name in ("comparison.json", "comparison.csv")}
    doc = {"title": title, "meta": json_safe(meta), **comparison.to_dict()}
    paths["comparison.json"].write_text(json.dumps(doc, indent=1, allow_nan=False) + "\n",
                                        encoding="utf-8")
    comparison.table().to_csv(paths["comparison.csv"], index=False)
    pngs = plots(comparison, out_dir)
    for name, png in pngs.items():
        paths[name] = out_dir / name
        paths[name].write_bytes(png)
    paths["report.html"] = out_dir / "report.html"
    paths["report.html"].write_text(report_html(comparison, title, meta, pngs),
                                    encoding="utf-8")
    return paths


def png_name(kind: str, config_id: str) -> str:
    return f"{kind}_{re.sub(r'[^A-Za-z0-9_.-]', '_', config_id)}.png"


# ------------------------------------------------------------------- plots
def plots(comparison: Comparison, out_dir: Path) -> dict[str, bytes]:
    fig_cls = _figure_class(out_dir)
    out: dict[str, bytes] = {}
    if comparison.configs:
        out["scatter.png"] = _png(_scatter(fig_cls, comparison))
    for c in comparison.configs:
        out[png_name("cdf", c.config_id)] = _png(_cdfs(fig_cls, c))
        if c.run.series is not None or c.run.predicted_series is not None:
            out[png_name("series", c.config_id)] = _png(_series(fig_cls, c))
    return out


def _figure_class(out_dir: Path) -> Any:
    try:
        from matplotlib.figure import Figure
    except ImportError:
        raise ServetwinError(
            f"the comparison's plots and report.html need matplotlib: pip install "
            f"'servetwin[plot]' (the plot extra). comparison.json and comparison.csv are "
            f"written in {out_dir}") from None
    return Figure


def _png(fig: Any) -> bytes:
    buf = io.BytesIO()
    fig.savefig(buf, format="png", metadata={"Software": None})
    return buf.getvalue()


def _scatter(fig_cls: Any, comparison: Comparison) -> Any:
    panels = [(m, s) for m in comparison.metrics for s in comparison.stats]
    panels += [(m, SCALAR_STAT) for m in _SCATTER_EXTRAS]
    ncols = min(3, len(panels))
    nrows = math.ceil(len(panels) / ncols)
    # a bare Figure draws with Agg and leaves pyplot's global backend and figures alone
    fig = fig_cls(figsize=(4.0 * ncols, 3.4 * nrows), dpi=90)
    axes = np.atleast_1d(fig.subplots(nrows, ncols)).ravel()
    for ax, (metric, stat) in zip(axes, panels, strict=False):
        scale = _scale(metric)
        values = [(c.config_id, c.value(metric, stat)) for c in comparison.configs]
        pts = [(cid, v.predicted * scale, v.measured * scale) for cid, v in values
               if math.isfinite(v.predicted) and math.isfinite(v.measured)]
        ax.set_title(_axis_name(metric, stat), fontsize=10)
        ax.set_xlabel("predicted", fontsize=8)
        ax.set_ylabel("measured", fontsize=8)
        ax.tick_params(labelsize=7)
        ax.grid(True, alpha=0.3)
        if not pts:
            ax.text(0.5, 0.5, "no config with both values", ha="center", va="center",
                    transform=ax.transAxes, fontsize=8, color="0.4")
            continue
        xs = np.array([p[1] for p in pts])
        ys = np.array([p[2] for p in pts])
        lo, hi = float(min(xs.min(), ys.min())), float(max(xs.max(), ys.max()))
        log = lo > 0 and hi / lo > 50
        pad = (hi - lo) * 0.08 or abs(hi) * 0.1 or 1.0
        line = (lo / 1.3, hi * 1.3) if log else (lo - pad, hi + pad)
        ax.plot(line, line, ls="--", c="0.5", lw=1, label="y = x")
        ax.set_xlim(line)
        ax.set_ylim(line)
        ax.scatter(xs, ys, s=24, c="tab:blue", zorder=3)
        for cid, x, y in pts:
            ax.annotate(cid[:10], (x, y), textcoords="offset points", xytext=(4, 3), fontsize=7)
        if log:
            ax.set_xscale("log")
            ax.set_yscale("log")
    for ax in axes[len(panels):]:
        ax.set_visible(False)
    fig.suptitle("Predicted against measured, one point per config (on the dashed line: "
                 "exact)", fontsize=11)
    # fixed margins: tight_layout would draw the whole grid once more just to measure it
    fig.subplots_adjust(left=0.07, right=0.98, bottom=0.06, top=1 - 0.55 / nrows / 1.5,
                        wspace=0.28, hspace=0.5)
    return fig


def _cdfs(fig_cls: Any, c: ConfigComparison) -> Any:
    fig = fig_cls(figsize=(10, 3.6), dpi=90)
    axes = fig.subplots(1, 2)
    for ax, metric in zip(axes, ("ttft_s", "tpot_s"), strict=True):
        ax.set_title(f"{_NAMES[metric]} per request", fontsize=10)
        ax.set_xlabel(f"{_NAMES[metric]} (ms)", fontsize=9)
        ax.set_ylabel("fraction of requests", fontsize=9)
        ax.grid(True, alpha=0.3)
        drawn = False
        for side, style, label in (("pred", "--", "predicted"), ("meas", "-", "measured")):
            x = c.per_request[f"{metric}_{side}"].to_numpy(dtype=np.float64)
            x = np.sort(x[np.isfinite(x)]) * 1e3
            if x.size:
                ax.step(x, np.arange(1, x.size + 1) / x.size, where="post", ls=style,
                        label=f"{label} (n={x.size})")
                drawn = True
        if drawn:
            ax.legend(fontsize=8, loc="lower right")
        else:
            ax.text(0.5, 0.5, "no compared request", ha="center", va="center",
                    transform=ax.transAxes, fontsize=9, color="0.4")
    fig.suptitle(f"{c.config_id}: {c.label}", fontsize=10)
    fig.tight_layout(rect=(0, 0, 1, 0.95))
    return fig


def _series(fig_cls: Any, c: ConfigComparison) -> Any:
    fig = fig_cls(figsize=(12, 3.4), dpi=90)
    axes = fig.subplots(1, len(SERIES_PANELS))
    for ax, (metric, name) in zip(axes, SERIES_PANELS, strict=True):
        ax.set_title(name, fontsize=10)
        ax.set_xlabel("time (s)", fontsize=9)
        ax.grid(True, alpha=0.3)
        drawn = False
        scale = 100.0 if metric == "kv_cache_usage_perc" else 1.0
        for df, style, label in ((c.run.series, "-", "measured"),
                                 (c.run.predicted_series, "--", "predicted")):
            for suffix, part in _one_series(df, metric):
                ax.plot(part["time_s"], part["value"] * scale, ls=style, lw=1.2,
                        drawstyle="steps-post", label=label + suffix)
                drawn = True
        if drawn:
            ax.legend(fontsize=8, loc="best")
        else:
            ax.text(0.5, 0.5, "not scraped", ha="center", va="center",
                    transform=ax.transAxes, fontsize=9, color="0.4")
    fig.suptitle(f"{c.config_id}: engine state over the replay", fontsize=10)
    fig.tight_layout(rect=(0, 0, 1, 0.93))
    return fig


def _one_series(df: pd.DataFrame | None, metric: str) -> list[tuple[str, pd.DataFrame]]:
    """The samples of one metric, a line per worker when the frame has a worker_id."""
    if df is None or df.empty:
        return []
    part = df[df["metric"] == metric].sort_values("time_s", kind="mergesort")
    if not len(part):
        return []
    if "worker_id" not in part.columns or part["worker_id"].nunique() < 2:
        return [("", part)]
    return [(f" (worker {w})", g) for w, g in part.groupby("worker_id", sort=True)]


# -------------------------------------------------------------------- html
def report_html(comparison: Comparison, title: str, meta: dict[str, Any],
                pngs: dict[str, bytes]) -> str:
    e = html.escape
    body = [f"<h1>{e(title)}</h1>", _meta(meta), _what(comparison), _overview(comparison),
            _ranks(comparison), _img(pngs, "scatter.png", "predicted against measured")]
    body += [_config_section(c, pngs) for c in comparison.configs]
    return (f'<!DOCTYPE html>\n<html lang="en"><head><meta charset="utf-8">'
            f"<title>{e(title)}</title><style>{_CSS}</style></head>"
            f"<body>{''.join(body)}</body></html>\n")


def _meta(meta: dict[str, Any]) -> str:
    if not meta:
        return ""
    rows = "".join(f"<tr><th>{html.escape(str(k))}</th><td>{html.escape(_plain(v))}</td></tr>"
                   for k, v in meta.items())
    return f'<table id="meta" class="kv">{rows}</table>'


def _what(comparison: Comparison) -> str:
    names = ", ".join(_NAMES.get(m, m) for m in comparison.metrics)
    stats = ", ".join(comparison.stats)
    return ('<section id="what"><h2>What was compared</h2><p>Each config replayed the same '
            "trace on the real engine (measured) and in the simulator (predicted). Only the "
            "requests that completed ok on <b>both</b> sides are summarised, each side by the "
            "same function (<code>sim.metrics.summarize</code>); every other request is "
            f"counted below with its cause. Latencies: {e_(names)} at {e_(stats)}, in "
            "milliseconds; throughputs over the compared requests; preemptions over the "
            "whole replay (measured: the engine's counter). Relative error = (predicted − "
            "measured) / measured: positive means the twin predicts more than was measured. "
            "Paired error: the median over requests of |predicted − measured| / measured. "
            "Accounting: the measured records against the engine's own /metrics counter "
            "deltas over the replay.</p></section>")


def _overview(comparison: Comparison) -> str:
    if not comparison.configs:
        return '<h2>Configs</h2><p id="overview">No config was compared.</p>'
    head = ("<tr><th>config</th><th>knobs</th><th>engine</th><th>requests</th>"
            "<th>compared</th><th>excluded</th><th>accounting</th>"
            "<th>TTFT median APE</th><th>E2E median APE</th></tr>")
    rows = []
    for c in comparison.configs:
        rows.append(
            f'<tr data-config-id="{e_(c.config_id)}"><td><a href="#config-{e_(c.config_id)}">'
            f"<code>{e_(c.config_id)}</code></a></td><td>{e_(c.label)}</td>"
            f"<td>{e_(c.engine)}</td><td>{c.num_requests}</td><td>{c.num_compared}</td>"
            f"<td>{c.num_excluded}</td><td>{_checks_short(c.checks)}</td>"
            f"<td>{_pct(c.paired['ttft_s']['median_ape'])}</td>"
            f"<td>{_pct(c.paired['e2e_s']['median_ape'])}</td></tr>")
    return (f'<h2>Configs ({len(comparison.configs)})</h2><table id="overview">{head}'
            f'{"".join(rows)}</table>')


def _ranks(comparison: Comparison) -> str:
    if not comparison.ranks:
        return (f'<h2>Rank agreement</h2><p id="rank-agreement">'
                f"{e_(comparison.rank_note)}</p>")
    head = ("<tr><th>figure</th><th>better</th><th>configs</th><th>Spearman ρ</th>"
            "<th>Kendall τ</th><th>predicted best</th><th>measured best</th>"
            "<th>best agrees</th><th>regret</th><th>note</th></tr>")
    rows = []
    for r in comparison.ranks:
        agree = {True: '<span class="pass">yes</span>', False: '<span class="fail">no</span>',
                 None: "–"}[r.best_agrees]
        rows.append(
            f"<tr><td>{e_(_axis_name(r.metric, r.stat))}</td>"
            f"<td>{'higher' if r.higher_is_better else 'lower'}</td><td>{r.num_configs}</td>"
            f"<td>{_fixed(r.spearman_rho)}</td><td>{_fixed(r.kendall_tau)}</td>"
            f"<td>{_ids(r.predicted_best)}</td><td>{_ids(r.measured_best)}</td>"
            f"<td>{agree}</td><td>{_pct(r.regret)}</td><td>{e_(r.reason)}</td></tr>")
    return ('<h2>Rank agreement across configs</h2><p class="hint">Did the simulator order '
            "the configs as the engine did? ρ and τ near 1: same order. Regret: how much "
            "worse, measured, the predicted best config is than the measured best.</p>"
            f'<table id="rank-agreement">{head}{"".join(rows)}</table>')


def _config_section(c: ConfigComparison, pngs: dict[str, bytes]) -> str:
    cid = e_(c.config_id)
    excl = "".join(f"<li>{e_(x.cause)}: {e_(x.reason)} — {x.count}</li>"
                   for x in c.exclusions) or "<li>none</li>"
    head = ("<tr><th>figure</th><th>predicted</th><th>measured</th>"
            "<th>relative error</th></tr>")
    rows = "".join(f"<tr><td>{e_(_axis_name(v.metric, v.stat))}</td>"
                   f"<td>{_value(v.metric, v.predicted)}</td>"
                   f"<td>{_value(v.metric, v.measured)}</td>"
                   f"<td>{_signed_pct(v.rel_error)}</td></tr>" for v in c.values)
    paired = "".join(f"<li>{_NAMES[m]}: median APE {_pct(p['median_ape'])} over "
                     f"{p['num_requests']} requests</li>" for m, p in c.paired.items())
    checks = "".join(f'<li>{_verdict(k)} {e_(k.name)}: {e_(k.detail)}</li>' for k in c.checks)
    notes = "".join(f"<li>{e_(n)}</li>" for n in c.notes) or "<li>none</li>"
    series = (_img(pngs, png_name("series", c.config_id), f"engine state of {c.config_id}")
              or "<p class='hint'>No time series was scraped for this config.</p>")
    return (f'<section class="config" id="config-{cid}"><h2>Config <code>{cid}</code></h2>'
            f"<p>{e_(c.label)} · engine {e_(c.engine)} · {c.num_requests} requests, "
            f"<b>{c.num_compared}</b> compared, {c.num_excluded} excluded</p>"
            f"<div class='cols'><div><h3>Excluded requests</h3><ul>{excl}</ul>"
            f"<h3>Paired per request</h3><ul>{paired}</ul>"
            f"<h3>Accounting</h3><ul class='checks'>{checks}</ul>"
            f"<h3>Notes</h3><ul>{notes}</ul></div>"
            f"<div><table class='figures'>{head}{rows}</table></div></div>"
            f"{_img(pngs, png_name('cdf', c.config_id), f'TTFT and TPOT of {c.config_id}')}"
            f"{series}</section>")


def _img(pngs: dict[str, bytes], name: str, alt: str) -> str:
    if name not in pngs:
        return ""
    data = base64.b64encode(pngs[name]).decode("ascii")
    return (f'<figure><img alt="{e_(alt)}" data-file="{e_(name)}" '
            f'src="data:image/png;base64,{data}"></figure>')


# -------------------------------------------------------------- formatting
def e_(s: Any) -> str:
    return html.escape(str(s))


def _scale(metric: str) -> float:
    return 1e3 if metric in LATENCY_METRICS else 100.0 if metric == "prefix_cache_hit_rate" \
        else 1.0


def _axis_name(metric: str, stat: str) -> str:
    name = _NAMES.get(metric, metric)
    if metric in LATENCY_METRICS:
        return f"{name} {stat} (ms)"
    if metric == "prefix_cache_hit_rate":
        return f"{name} (%)"
    unit = _UNITS.get(metric)
    return f"{name} ({unit})" if unit else name


def _finite(x: Any) -> float | None:
    try:
        v = float(x)
    except (TypeError, ValueError):
        return None
    return v if math.isfinite(v) else None


def _value(metric: str, x: float) -> str:
    v = _finite(x)
    if v is None:
        return "–"
    if metric in LATENCY_METRICS:
        ms = v * 1e3
        return f"{ms:,.1f}" if ms >= 100 else f"{ms:.3g}"
    if metric == "prefix_cache_hit_rate":
        return f"{v:.1%}"
    if metric == "num_preemptions":
        return f"{v:,.0f}"
    return f"{v:,.2f}"


def _pct(x: Any) -> str:
    v = _finite(x)
    return "–" if v is None else f"{v:.1%}"


def _signed_pct(x: Any) -> str:
    v = _finite(x)
    return "–" if v is None else f"{v:+.1%}"


def _fixed(x: Any) -> str:
    v = _finite(x)
    return "–" if v is None else f"{v:.3f}"


def _ids(ids: list[str]) -> str:
    return ", ".join(f"<code>{e_(i)}</code>" for i in ids) or "–"


def _verdict(k: Check) -> str:
    return {True: '<span class="pass">PASS</span>', False: '<span class="fail">FAIL</span>',
            None: '<span class="skip">not checked</span>'}[k.passed]


def _checks_short(checks: list[Check]) -> str:
    failed = [k.name for k in checks if k.passed is False]
    passed = sum(k.passed is True for k in checks)
    skipped = sum(k.passed is None for k in checks)
    text = f"{passed} pass"
    if failed:
        text = f'<span class="fail">FAIL: {e_(", ".join(failed))}</span>; ' + text
    return text + (f", {skipped} not checked" if skipped else "")


def _plain(v: Any) -> str:
    v = json_safe(v)
    if v is None:
        return "–"
    return v if isinstance(v, str) else json.dumps(v)


_CSS = """
body{font:14px/1.45 system-ui,-apple-system,Segoe UI,Roboto,sans-serif;margin:24px;color:#222}
h1{font-size:22px;margin:0 0 12px}h2{font-size:17px;margin:24px 0 8px}
h3{font-size:14px;margin:10px 0 4px}
table{border-collapse:collapse;font-size:12px;margin:6px 0}
th,td{border:1px solid #ddd;padding:3px 6px;text-align:right;white-space:nowrap}
th{background:#f3f3f3}td:first-child,th:first-child{text-align:left}
table.kv th{text-align:left}table.kv td{text-align:left}
#overview td:nth-child(2),#rank-agreement td:last-child{text-align:left;white-space:normal}
.cols{display:flex;gap:36px;flex-wrap:wrap}.cols ul{margin:0;padding-left:18px}
.checks li{margin-bottom:3px}
.pass{color:#070;font-weight:600}.fail{color:#c00;font-weight:600}.skip{color:#888}
figure{margin:10px 0}figure img{max-width:100%;border:1px solid #ddd}
section.config{border-top:1px solid #ccc;margin-top:20px}
.hint{color:#666;font-size:12px}
"""
