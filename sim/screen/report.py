"""The files of a screening run, under ``reports/<run-id>/``::

    results.parquet   one row per config: every knob, every summary figure, the verdicts
    pareto.csv        the frontier, best first
    shortlist.yaml    the ranked configs as full scenarios (what verify loads)
    pareto.png        throughput/GPU against the latency objective
    report.html       one self-contained page: SLOs, counts, plot, shortlist, sortable
                      table, the scenario; no network (the PNG is a data: URI)

matplotlib is an extra: without it the first three files are written and a
ServetwinError says how to get the other two.
"""

from __future__ import annotations

import base64
import html
import io
import json
import math
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import yaml

from ..errors import ServetwinError
from .analysis import KNOB, finite_or_none, knob_fields, knob_label, latency_name, slo_columns
from .space import SearchSpec, apply

# (column, header, kind): kind "s" is shown in ms, "n0"/"n2" numbers with 0/2 decimals
_METRIC_COLUMNS = (
    ("num_gpus", "GPUs", "n0"),
    ("throughput_per_gpu", "tok/s per GPU", "n0"),
    ("output_throughput_tokens_per_s", "output tok/s", "n0"),
    ("goodput_per_s", "goodput req/s", "n2"),
    ("cost_per_m_output_tokens", "$ per M out tok", "n2"),
    ("ttft_s.p50", "TTFT p50 ms", "s"),
    ("ttft_s.p90", "TTFT p90 ms", "s"),
    ("ttft_s.p99", "TTFT p99 ms", "s"),
    ("tpot_s.p90", "TPOT p90 ms", "s"),
    ("itl_s.p90", "ITL p90 ms", "s"),
    ("e2e_s.p90", "E2E p90 ms", "s"),
    ("num_preemptions", "preemptions", "n0"),
    ("num_gpu_blocks", "KV blocks", "n0"),
    ("kv_usage_max", "peak KV use", "pct"),
)


def write_outputs(out_dir: Path, df: pd.DataFrame, spec: SearchSpec,
                  shortlist_entries: list[dict[str, Any]], scenario_text: str,
                  base_dir: Path | None = None) -> dict[str, Path]:
    """Write the five files; returns them by file name.

    ``base_dir`` is the folder of the screening scenario: a relative
    ``workload.trace`` is made absolute so that shortlist.yaml loads from its own
    folder."""
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    paths = {name: out_dir / name for name in
             ("results.parquet", "pareto.csv", "shortlist.yaml", "pareto.png", "report.html")}
    _parquet_safe(df).to_parquet(paths["results.parquet"], engine="pyarrow", index=False)
    frontier(df, spec).to_csv(paths["pareto.csv"], index=False)
    paths["shortlist.yaml"].write_text(shortlist_yaml(spec, shortlist_entries, base_dir),
                                       encoding="utf-8")
    png = pareto_png(df, spec, out_dir)
    paths["pareto.png"].write_bytes(png)
    paths["report.html"].write_text(report_html(df, spec, shortlist_entries, scenario_text, png),
                                    encoding="utf-8")
    return paths


def frontier(df: pd.DataFrame, spec: SearchSpec) -> pd.DataFrame:
    front = df[df["pareto"].to_numpy(dtype=bool)]
    order = np.lexsort((pd.to_numeric(front[spec.objective]).to_numpy(),
                        -front["throughput_per_gpu"].to_numpy(dtype=float)))
    return front.iloc[order]


def _parquet_safe(df: pd.DataFrame) -> pd.DataFrame:
    """Arrow wants one type per column: a knob whose values mix types (a list and a
    number) is stored as JSON text rather than failing the write."""
    out = df.copy()
    for col in out.columns:
        if out[col].dtype != object:
            continue
        kinds = {type(v) for v in out[col] if v is not None and not _isnan(v)}
        if len(kinds) > 1 or (kinds and not kinds <= {str, bool}):
            out[col] = [None if v is None or _isnan(v) else json.dumps(v, default=str)
                        for v in out[col]]
    return out


# -------------------------------------------------------------- shortlist
def shortlist_yaml(spec: SearchSpec, entries: list[dict[str, Any]],
                   base_dir: Path | None = None) -> str:
    configs = []
    for e in entries:
        scenario = apply(spec.base, e["knobs"])
        trace = scenario.get("workload", {}).get("trace")
        if base_dir is not None and isinstance(trace, str) and \
                not Path(trace).expanduser().is_absolute():
            scenario["workload"]["trace"] = str((Path(base_dir) / trace).resolve())
        configs.append({"rank": e["rank"], "config_id": e["config_id"], "why": list(e["why"]),
                        "scenario": scenario})
    head = ("# servetwin screen: the shortlisted configs, best first. Each `scenario` is a\n"
            "# complete scenario (no search section): verify loads it as is.\n")
    return head + yaml.safe_dump({"configs": configs}, sort_keys=False, allow_unicode=True,
                                 width=1000)


# ------------------------------------------------------------------- plot
def pareto_png(df: pd.DataFrame, spec: SearchSpec, out_dir: Path) -> bytes:
    try:
        from matplotlib.figure import Figure
    except ImportError:
        raise ServetwinError(
            f"pareto.png and report.html need matplotlib: pip install matplotlib (the plot "
            f"extra). results.parquet, pareto.csv and shortlist.yaml are written in {out_dir}"
        ) from None
    # a bare Figure draws with Agg and leaves pyplot's global backend and figures alone
    fig = Figure(figsize=(8, 5), dpi=110)
    _draw(fig, fig.subplots(), df, spec)
    buf = io.BytesIO()
    fig.savefig(buf, format="png", metadata={"Software": None})
    return buf.getvalue()


def _draw(fig: Any, ax: Any, df: pd.DataFrame, spec: SearchSpec) -> None:
    ok = df[df["status"] == "ok"]
    front = frontier(df, spec).sort_values(spec.objective, kind="mergesort")
    for part, colour, label in ((ok[~ok["slo_ok"]], "0.6", "misses an SLO"),
                                (ok[ok["slo_ok"]], "tab:blue", "meets the SLOs")):
        ax.scatter(part[spec.objective] * 1e3, part["throughput_per_gpu"], s=22,
                   c=colour, label=f"{label} ({len(part)})", zorder=2)
    ax.plot(front[spec.objective] * 1e3, front["throughput_per_gpu"], "-o", c="tab:red",
            ms=5, lw=1.6, label=f"Pareto frontier ({len(front)})", zorder=3)
    for _, r in front[front["rank"].notna()].iterrows():
        ax.annotate(f"#{int(r['rank'])}", (r[spec.objective] * 1e3, r["throughput_per_gpu"]),
                    textcoords="offset points", xytext=(5, 5), fontsize=8, color="tab:red")
    metric, _, pct = spec.objective.partition(".")
    bound = spec.slo.get(metric, {}).get(pct)
    if bound is not None:
        ax.axvline(bound * 1e3, ls="--", c="0.3", lw=1,
                   label=f"SLO {spec.objective} ≤ {bound * 1e3:g} ms")
    lat = ok[spec.objective].to_numpy(dtype=float) * 1e3
    lat = lat[np.isfinite(lat) & (lat > 0)]
    if len(lat) and lat.max() / lat.min() > 50:
        ax.set_xscale("log")
    ax.set_xlabel(f"{latency_name(spec.objective)} latency (ms)")
    ax.set_ylabel("output throughput per GPU (tok/s)")
    ax.set_title("Throughput per GPU against latency")
    ax.grid(True, alpha=0.3)
    ax.legend(fontsize=8, loc="best")
    counts = df["status"].value_counts()
    fig.text(0.01, 0.01, f"{len(ok)} configs ran; not shown: {counts.get('infeasible', 0)} "
             f"infeasible, {counts.get('error', 0)} error", fontsize=8, color="0.3")
    fig.tight_layout(rect=(0, 0.03, 1, 1))


# ------------------------------------------------------------------- html
def report_html(df: pd.DataFrame, spec: SearchSpec, entries: list[dict[str, Any]],
                scenario_text: str, png: bytes) -> str:
    e = html.escape
    name = str(spec.base.get("name", "scenario"))
    img = base64.b64encode(png).decode("ascii")
    body = [
        f"<h1>Screening report: {e(name)}</h1>",
        _summary(df, spec),
        '<h2>Pareto frontier</h2><figure>'
        f'<img id="pareto-plot" alt="throughput per GPU against {e(spec.objective)}" '
        f'src="data:image/png;base64,{img}">'
        f"<figcaption>Grey: ran but misses an SLO; blue: meets every SLO; red: the frontier "
        f"of throughput/GPU (higher is better) against {e(spec.objective)} (lower is "
        f"better) among SLO-feasible configs; #n: shortlist rank.</figcaption></figure>",
        _shortlist_section(entries, spec),
        _table(df, spec),
        f'<h2>Scenario</h2><pre id="scenario-yaml">{e(scenario_text)}</pre>',
    ]
    return (f'<!DOCTYPE html>\n<html lang="en"><head><meta charset="utf-8">'
            f"<title>servetwin screen: {e(name)}</title><style>{_CSS}</style></head>"
            f"<body>{''.join(body)}<script>{_JS}</script></body></html>\n")


def _summary(df: pd.DataFrame, spec: SearchSpec) -> str:
    e = html.escape
    counts = df["status"].value_counts()
    items = [("configs", len(df)), ("ok", counts.get("ok", 0)),
             ("infeasible", counts.get("infeasible", 0)), ("error", counts.get("error", 0)),
             ("SLO-feasible", int(df["slo_ok"].sum())), ("frontier", int(df["pareto"].sum()))]
    count_html = "".join(f'<li><b id="count-{e(k.lower())}">{int(v)}</b> {e(k)}</li>'
                         for k, v in items)
    slos = "".join(f"<li>{e(latency_name(f'{m}.{p}'))} ≤ {b * 1e3:,g} ms "
                   f"(<code>{e(m)}.{e(p)}</code>)</li>"
                   for m, bounds in spec.slo.items() for p, b in bounds.items())
    slos = slos or "<li>none: every config that runs is feasible</li>"
    gpus = sorted({str(g) for g in df["gpu"].dropna()})
    prices = ", ".join(f"{e(g)} ${spec.cost_per_gpu_hour[g]:g}/GPU-h" if g in
                       spec.cost_per_gpu_hour else f"{e(g)}: no price" for g in gpus)
    space = "".join(f"<li>{e(f)}: {e(', '.join(map(str, v)))}</li>"
                    for f, v in spec.space.items())
    budget = f"{spec.budget_gpus} GPUs" if spec.budget_gpus else "none"
    return (f'<section id="summary"><ul class="counts">{count_html}</ul>'
            f'<div class="cols"><div><h3>SLOs</h3><ul id="slos">{slos}</ul></div>'
            f"<div><h3>Objective</h3><p>maximise output throughput per GPU, minimise "
            f"<code>{e(spec.objective)}</code>; shortlist of {spec.shortlist}</p>"
            f"<p>GPU budget: {e(budget)}; cost: {prices or 'n/a'}</p></div>"
            f'<div><h3>Search space ({e(spec.strategy)})</h3><ul>{space}</ul></div></div>'
            "</section>")


def _shortlist_section(entries: list[dict[str, Any]], spec: SearchSpec) -> str:
    e = html.escape
    if not entries:
        return ('<h2>Shortlist</h2><div id="shortlist"><p>No config meets the SLOs: '
                "relax them or widen the space.</p></div>")
    items = []
    for en in entries:
        knobs = ", ".join(knob_label(f, v) for f, v in en["knobs"].items())
        m = en["metrics"]
        figs = [f"{_fmt(m.get('throughput_per_gpu'), 'n0')} tok/s per GPU",
                f"{e(spec.objective)} {_fmt(m.get(spec.objective), 's')} ms",
                f"goodput {_fmt(m.get('goodput_per_s'), 'n2')} req/s",
                f"${_fmt(m.get('cost_per_m_output_tokens'), 'n2')} per M output tokens",
                f"{_fmt(m.get('num_gpus'), 'n0')} × {e(str(m.get('gpu')))}"]
        why = "".join(f"<li>{e(w)}</li>" for w in en["why"]) or \
            "<li>no one-knob neighbour was evaluated</li>"
        items.append(f'<li data-config-id="{e(en["config_id"])}"><b>#{en["rank"]} '
                     f"<code>{e(en['config_id'])}</code></b> {e(knobs)}"
                     f'<div class="figs">{" · ".join(figs)}</div><ul class="why">{why}</ul>'
                     "</li>")
    return f'<h2>Shortlist</h2><ol id="shortlist">{"".join(items)}</ol>'


def _table(df: pd.DataFrame, spec: SearchSpec) -> str:
    e = html.escape
    knobs = knob_fields(df, spec)
    metric_cols = list(_METRIC_COLUMNS)
    for col in (spec.objective, *slo_columns(spec)):
        if col not in {c for c, _, _ in metric_cols}:
            metric, _, pct = col.partition(".")
            metric_cols.append((col, f"{metric.removesuffix('_s').upper()} {pct} ms", "s"))
    head = [("config", "t"), *((f, "t") for f in knobs), ("status", "t"), ("SLO", "t"),
            ("frontier", "t"), ("rank", "n"), *((h, "n") for _, h, _ in metric_cols),
            ("reason / SLO miss", "t")]
    ths = "".join(f'<th data-type="{k}" title="click to sort">{e(h)}</th>' for h, k in head)
    rows = []
    for r in df.to_dict("records"):
        cells = [_td(r["config_id"], f"<code>{e(str(r['config_id']))}</code>")]
        cells += [_td(r.get(KNOB + f), e(_plain(r.get(KNOB + f)))) for f in knobs]
        status = str(r.get("status"))
        cells.append(_td(status, f'<span class="st-{e(status)}">{e(status)}</span>'))
        slo = "yes" if r["slo_ok"] else ("no" if status == "ok" else "")
        cells.append(_td(slo, slo))
        cells.append(_td("yes" if r["pareto"] else "", "★" if r["pareto"] else ""))
        cells.append(_num_td(r.get("rank"), "n0"))
        cells += [_num_td(r.get(c), kind) for c, _, kind in metric_cols]
        text = str(r.get("reason") or "") or (str(r.get("slo_violation") or "")
                                              if status == "ok" else "")
        note = str(r.get("note") or "")
        text = "; ".join(t for t in (text, note) if t)
        cells.append(_td(text, e(text)))
        cls = ' class="front"' if r["pareto"] else ""
        rows.append(f'<tr data-config-id="{e(str(r["config_id"]))}"{cls}>{"".join(cells)}</tr>')
    return (f"<h2>All configs ({len(df)})</h2><p class='hint'>Click a header to sort; "
            f"latencies in ms, throughputs in tok/s.</p><div class='scroll'>"
            f'<table id="configs-table"><thead><tr>{ths}</tr></thead>'
            f'<tbody>{"".join(rows)}</tbody></table></div>')


def _td(sort_key: Any, inner: str) -> str:
    return f'<td data-sort="{html.escape(_plain(sort_key))}">{inner}</td>'


def _num_td(v: Any, kind: str) -> str:
    x = finite_or_none(v)
    if x is None:
        return '<td data-sort=""></td>'
    shown = x * 1e3 if kind == "s" else x
    return f'<td data-sort="{shown!r}">{_fmt(x, kind)}</td>'


def _fmt(v: Any, kind: str) -> str:
    x = finite_or_none(v)
    if x is None:
        return "–"
    if kind == "s":
        ms = x * 1e3
        return f"{ms:,.0f}" if ms >= 100 else f"{ms:.3g}"
    if kind == "pct":
        return f"{x:.1%}"
    return f"{x:,.0f}" if kind == "n0" else f"{x:,.2f}"


def _plain(v: Any) -> str:
    if isinstance(v, np.generic):
        v = v.item()
    if v is None or _isnan(v):
        return ""
    if isinstance(v, float) and v.is_integer():
        return str(int(v))
    return json.dumps(v) if isinstance(v, list | dict) else str(v)


def _isnan(v: Any) -> bool:
    return isinstance(v, float) and math.isnan(v)


_CSS = """
body{font:14px/1.45 system-ui,-apple-system,Segoe UI,Roboto,sans-serif;margin:24px;color:#222}
h1{font-size:22px;margin:0 0 12px}h2{font-size:17px;margin:22px 0 8px}
h3{font-size:14px;margin:0 0 4px}
.counts{list-style:none;padding:0;display:flex;gap:18px;flex-wrap:wrap}
.counts b{font-size:18px}.cols{display:flex;gap:36px;flex-wrap:wrap}
.cols ul{margin:0;padding-left:18px}
figure{margin:0}figcaption{color:#555;font-size:12px;max-width:880px}
#pareto-plot{max-width:100%;border:1px solid #ddd}
#shortlist>li{margin-bottom:10px}.figs{color:#333;margin:2px 0}.why{color:#444;margin:2px 0}
.scroll{overflow-x:auto}table{border-collapse:collapse;font-size:12px}
th,td{border:1px solid #ddd;padding:3px 6px;text-align:right;white-space:nowrap}
td:first-child,td:last-child{text-align:left}td:last-child{white-space:normal;min-width:220px}
th{background:#f3f3f3;cursor:pointer;user-select:none;position:sticky;top:0}
th.asc::after{content:" \\25B2"}th.desc::after{content:" \\25BC"}
tr.front{background:#fff3f0}.st-infeasible{color:#a60}.st-error{color:#c00}
pre{background:#f7f7f7;border:1px solid #ddd;padding:10px;overflow-x:auto}
.hint{color:#666;font-size:12px}
"""

# sort by a header click: numbers numerically (blanks last), text alphabetically; a
# second click on the same header reverses
_JS = """
(function(){
  var table=document.getElementById('configs-table');
  var heads=table.tHead.rows[0].cells;
  for(var i=0;i<heads.length;i++){(function(col,th){th.addEventListener('click',function(){
    var desc=th.classList.contains('asc');
    for(var j=0;j<heads.length;j++){heads[j].classList.remove('asc','desc');}
    th.classList.add(desc?'desc':'asc');
    var num=th.getAttribute('data-type')==='n';
    var body=table.tBodies[0];var rows=Array.prototype.slice.call(body.rows);
    rows.sort(function(a,b){
      var x=a.cells[col].getAttribute('data-sort'),y=b.cells[col].getAttribute('data-sort');
      if(x===''&&y==='')return 0;if(x==='')return 1;if(y==='')return -1;
      var c=num?parseFloat(x)-parseFloat(y):x.localeCompare(y,undefined,{numeric:true});
      return desc?-c:c;});
    rows.forEach(function(r){body.appendChild(r);});
  });})(i,heads[i]);}
})();
"""
