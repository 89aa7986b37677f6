import html
import json
import re
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import yaml

from sim.errors import ServetwinError
from sim.scenario import validate_scenario
from sim.screen.analysis import analyze, shortlist
from sim.screen.report import write_outputs
from sim.screen.runner import Checkpoint, LocalExecutor, run_points
from sim.screen.space import apply, parse_search
from tests.sim.screen.factories import BASE, make_row, make_rows, make_spec

REPO = Path(__file__).resolve().parents[3]
SCENARIOS = REPO / "scenarios"
FILES = ["results.parquet", "pareto.csv", "shortlist.yaml", "pareto.png", "report.html"]


def write(tmp_path, rows=None, spec=None, scenario_text="name: tiny\n"):
    spec = spec or make_spec()
    df = analyze(make_rows() if rows is None else rows, spec)
    entries = shortlist(df, spec)
    out = write_outputs(tmp_path / "run", df, spec, entries, scenario_text, base_dir=SCENARIOS)
    return df, entries, out


def ids_of(rows, *knobs):
    by_knobs = {(r["knob.cluster.num_workers"], r["knob.engine.tensor_parallel_size"]):
                r["config_id"] for r in rows}
    return [by_knobs[k] for k in knobs]


# ---------------------------------------------------------------- files
def test_write_outputs_writes_every_file(tmp_path):
    df, _, out = write(tmp_path)
    assert list(out) == FILES
    assert all(p.parent == tmp_path / "run" and p.stat().st_size > 0 for p in out.values())

    back = pd.read_parquet(out["results.parquet"])
    assert list(back.columns) == list(df.columns) and len(back) == 6
    assert back["knob.cluster.num_workers"].tolist() == [1, 1, 2, 2, 4, 4]
    assert back["slo_ok"].dtype == bool

    front = pd.read_csv(out["pareto.csv"])
    assert front["config_id"].tolist() == ids_of(make_rows(), (1, 2), (2, 1), (4, 1))
    assert front["rank"].fillna(0).tolist() == [1, 2, 0]
    assert out["pareto.png"].read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_shortlist_yaml_holds_scenarios_verify_can_load(tmp_path):
    _, entries, out = write(tmp_path)
    configs = yaml.safe_load(out["shortlist.yaml"].read_text(encoding="utf-8"))["configs"]
    assert [c["rank"] for c in configs] == [1, 2]
    assert [c["config_id"] for c in configs] == ids_of(make_rows(), (1, 2), (2, 1))
    for c, e in zip(configs, entries, strict=True):
        assert list(c) == ["rank", "config_id", "why", "scenario"]
        assert c["why"] == e["why"]
        sc = c["scenario"]
        assert "search" not in sc
        # the relative trace now names the file from anywhere
        trace = Path(sc["workload"]["trace"])
        assert trace.is_absolute() and trace == SCENARIOS / BASE["workload"]["trace"]
        assert trace.exists()
        assert sc == apply({**BASE, "workload": {**BASE["workload"], "trace": str(trace)}},
                           e["knobs"])
        loaded = validate_scenario(sc, {}, None, [])
        assert loaded.scenario.cluster.num_workers == e["knobs"]["cluster.num_workers"]
        assert loaded.scenario.engine.tensor_parallel_size == \
            e["knobs"]["engine.tensor_parallel_size"]


def test_without_matplotlib_the_data_files_are_still_written(tmp_path, monkeypatch):
    for name in ["matplotlib", *(m for m in sys.modules if m.startswith("matplotlib."))]:
        monkeypatch.setitem(sys.modules, name, None)  # import matplotlib... -> ImportError
    with pytest.raises(ServetwinError, match=r"need matplotlib: pip install matplotlib"):
        write(tmp_path)
    made = sorted(p.name for p in (tmp_path / "run").iterdir())
    assert made == ["pareto.csv", "results.parquet", "shortlist.yaml"]


def test_nothing_feasible_still_reports(tmp_path):
    rows = [make_row(1, 1, 3.0), make_row(1, 2, status="error", reason="bad trace")]
    _, entries, out = write(tmp_path, rows)
    assert entries == []
    assert yaml.safe_load(out["shortlist.yaml"].read_text())["configs"] == []
    assert "No config meets the SLOs" in out["report.html"].read_text()
    assert len(pd.read_csv(out["pareto.csv"])) == 0


# ----------------------------------------------------------------- html
def test_report_html_is_self_contained_and_escaped(tmp_path):
    rows = make_rows()
    rows[5]["reason"] = "<script>alert('x')</script> & more"
    df, entries, out = write(tmp_path, rows, scenario_text="name: <b>tiny</b>\n")
    text = out["report.html"].read_text(encoding="utf-8")
    no_image = re.sub(r'src="data:image/png;base64,[A-Za-z0-9+/=]+"', 'src=""', text)
    assert "http://" not in no_image and "https://" not in no_image
    assert "<link" not in no_image and no_image.count("src=") == 1
    assert text.count("<script") == 1  # ours: the table sorter
    assert "&lt;script&gt;alert(&#x27;x&#x27;)&lt;/script&gt; &amp; more" in text
    assert '<pre id="scenario-yaml">name: &lt;b&gt;tiny&lt;/b&gt;\n</pre>' in text
    for element_id in ("pareto-plot", "configs-table", "shortlist", "slos", "summary"):
        assert f'id="{element_id}"' in text
    assert text.count("<tr data-config-id=") == len(df)
    counts = dict(re.findall(r'id="count-([a-z-]+)">(\d+)<', text))
    assert counts == {"configs": "6", "ok": "5", "infeasible": "1", "error": "0",
                      "slo-feasible": "4", "frontier": "3"}
    assert "TTFT p90 ≤ 2,000 ms" in text
    for sentence in entries[0]["why"]:
        assert html.escape(sentence) in text


# ------------------------------------------------------------- real run
def test_a_real_sweep_end_to_end(tmp_path):
    raw = {**BASE, "workload": {"trace": str(SCENARIOS / "traces/azure_conv_head.csv"),
                                "max_requests": 60},
           "search": {"budget_gpus": 2,
                      "space": {"cluster.num_workers": [1, 2],
                                "engine.tensor_parallel_size": [1, 2]},
                      "slo": {"ttft_s": {"p90": 1.0}}, "shortlist": 3}}
    path = tmp_path / "screen.yaml"
    path.write_text(yaml.safe_dump(raw), encoding="utf-8")
    spec = parse_search(raw, str(path))
    rows = run_points(spec, str(path), spec.grid(), LocalExecutor(1),
                      Checkpoint(tmp_path / "results.jsonl"), progress=False)
    df = analyze(rows, spec)
    assert df["status"].tolist() == ["ok", "ok", "ok", "infeasible"]
    assert df["pareto"].any()
    entries = shortlist(df, spec)
    out = write_outputs(tmp_path / "run", df, spec, entries, path.read_text(), path.parent)
    back = pd.read_parquet(out["results.parquet"])
    for col in ("ttft_s.p99", "tpot_s.p50", "num_gpu_blocks", "goodput_per_s", "kv_usage_max",
                "throughput_per_gpu", "cost_per_m_output_tokens", "slo_ok", "pareto", "rank"):
        assert col in back.columns
    for c in yaml.safe_load(out["shortlist.yaml"].read_text())["configs"]:
        validate_scenario(c["scenario"], {}, None, [])
    assert "infeasible (2 workers x TP 2 = 4 GPUs > budget 2)" in " ".join(
        w for e in entries for w in e["why"])


# -------------------------------------------------------------- browser
CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser")
# after load: the plot's decoded size and place, then a click on the throughput/GPU
# header, and what the table shows; written into the DOM for --dump-dom to carry out
PROBE = """<script>
window.addEventListener('load', function () {
  var img = document.getElementById('pareto-plot'), r = img.getBoundingClientRect();
  var heads = document.querySelectorAll('#configs-table thead th'), col = -1;
  heads.forEach(function (th, i) { if (th.textContent === 'tok/s per GPU') col = i; });
  heads[col].click();
  var ids = [].map.call(document.querySelectorAll('#configs-table tbody tr'),
                        function (tr) { return tr.getAttribute('data-config-id'); });
  var pre = document.createElement('pre'); pre.id = 'probe';
  pre.textContent = JSON.stringify({width: img.naturalWidth, height: img.naturalHeight,
    src: img.src.slice(0, 22), rect: [r.left, r.top, r.width, r.height], sorted: ids});
  document.body.appendChild(pre);
});
</script>"""


def chromium(tmp_path, *args):
    flags = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
             "--disable-background-networking", "--disable-component-update", "--disable-sync",
             f"--user-data-dir={tmp_path / 'profile'}", "--window-size=1400,2000",
             "--hide-scrollbars", "--force-device-scale-factor=1"]
    assert CHROMIUM is not None
    done = subprocess.run([CHROMIUM, *flags, *args], capture_output=True, text=True,
                          timeout=120, check=False)
    assert done.returncode == 0, done.stderr[-2000:]
    return done.stdout


def render(tmp_path, html_path):
    """Screenshot the report, then load it with PROBE and dump the DOM:
    (screenshot path, the probe's findings, the DOM text)."""
    shot = tmp_path / "shot.png"
    chromium(tmp_path, f"--screenshot={shot}", html_path.as_uri())
    probe_html = tmp_path / "probe.html"
    probe_html.write_text(html_path.read_text(encoding="utf-8").replace(
        "</body>", PROBE + "</body>"), encoding="utf-8")
    dom = chromium(tmp_path, "--virtual-time-budget=2000", "--dump-dom", probe_html.as_uri())
    m = re.search(r'<pre id="probe">(.*?)</pre>', dom)
    assert m, dom[-2000:]
    probe = json.loads(m.group(1).replace("&quot;", '"').replace("&amp;", "&"))
    return shot, probe, dom


@pytest.mark.skipif(CHROMIUM is None, reason="chromium is not installed: apt-get install -y "
                    "chromium (CI installs it)")
def test_report_renders_in_headless_chromium(tmp_path):
    import matplotlib.image

    rows = make_rows()
    df, _, out = write(tmp_path, rows)
    html_path = out["report.html"]

    shot, probe, dom = render(tmp_path, html_path)
    assert probe["src"] == "data:image/png;base64,"
    assert probe["width"] > 400 and probe["height"] > 300  # the PNG decoded
    assert dom.count("<tr data-config-id=") == len(df) == 6
    # ascending by throughput/GPU (1000 is the SLO miss), the infeasible row last
    assert probe["sorted"] == ids_of(rows, (2, 2), (4, 1), (2, 1), (1, 2), (1, 1), (4, 2))

    img = matplotlib.image.imread(shot)[..., :3]
    assert img.shape[:2] == (2000, 1400)
    left, top, width, height = (round(v) for v in probe["rect"])
    assert top + height <= 2000
    plot = img[top:top + height, left:left + width]
    ink = (plot < 0.9).any(axis=2)
    assert ink.mean() > 0.02, "the plot region is blank"
    red = (plot[..., 0] > 0.7) & (plot[..., 1] < 0.35) & (plot[..., 2] < 0.35)
    blue = (plot[..., 2] > 0.6) & (plot[..., 0] < 0.3)
    assert red.sum() > 50 and blue.sum() > 50, "no frontier (red) or feasible (blue) marks"
    page = (img < 0.9).any(axis=2)
    assert page[top + height:].mean() > 0.005, "nothing drawn below the plot"
    assert np.isfinite(img).all()
