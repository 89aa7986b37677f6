import json
import math

import numpy as np
import pandas as pd
import pytest

from sim.errors import InputError
from sim.metrics import RECORD_COLUMNS, Records, summarize
from verify.compare import ConfigRun, compare, rel_error, subset

# one measured request: (request_id, ttft_s, e2e_s); every request arrives at 0 with 100
# prompt tokens, 10 of them cached, and 5 output tokens spread evenly from first to last
BASE = ((0, 0.1, 1.0), (1, 0.2, 2.0), (2, 0.4, 4.0))
PROMPT, CACHED, OUT = 100, 10, 5


def make_records(rows, reasons=None):
    """rows: (request_id, arrival_s, ttft_s, e2e_s, prompt, cached, output, status)."""
    n = len(rows)
    cols = {c: np.empty(n, dtype=np.float64 if c.endswith("_s") else np.int64)
            for c in RECORD_COLUMNS if c != "status"}
    cols["status"] = np.array([r[7] for r in rows], dtype=object)
    times, counts = [], []
    for i, (rid, arr, ttft, e2e, prompt, cached, out, _) in enumerate(rows):
        vals = (rid, arr, arr + ttft, arr + e2e, prompt, cached, out, 0, 0)
        for c, v in zip(RECORD_COLUMNS[:-1], vals, strict=True):
            cols[c][i] = v
        t = np.linspace(arr + ttft, arr + e2e, out) if out else np.empty(0)
        times.append(t)
        counts.append(t.size)
    offsets = np.concatenate(([0], np.cumsum(counts))).astype(np.int64)
    token_times = np.concatenate(times) if times else np.empty(0)
    return Records(cols, offsets, token_times, dict(reasons or {}))


def rows_of(base, level=1.0, status="ok"):
    return [(rid, 0.0, ttft * level, e2e * level, PROMPT, CACHED, OUT, status)
            for rid, ttft, e2e in base]


def make_run(config_id="a", level=1.0, scale=1.25, extra_meas=(), extra_pred=(),
             meas_reasons=None, pred_reasons=None, counters=None, **kw):
    """Measured latencies = BASE × level; predicted = measured × scale."""
    meas = make_records(rows_of(BASE, level) + list(extra_meas), meas_reasons)
    pred = make_records(rows_of(BASE, level * scale) + list(extra_pred), pred_reasons)
    if counters is None:
        counters = {"prompt_tokens": 3 * PROMPT, "generation_tokens": 3 * OUT,
                    "prefix_cache_queries": 3 * PROMPT, "prefix_cache_hits": 3 * CACHED,
                    "num_preemptions": 0}
    return ConfigRun(config_id, f"knob={config_id}", "vllm", pred, meas, counters, **kw)


def check(cc, name):
    return next(k for k in cc.checks if k.name == name)


# ------------------------------------------------------------ per config
def test_relative_errors_are_exact_over_every_metric_and_stat():
    comp = compare([make_run()], stats=("mean", "p50", "p90", "p99"))
    (cc,) = comp.configs
    assert cc.num_requests == cc.num_compared == 3 and cc.exclusions == []
    latency = [v for v in cc.values if v.stat != "value"]
    assert len(latency) == 16
    for v in latency:
        assert v.rel_error == pytest.approx(0.25, abs=1e-12), (v.metric, v.stat)
    ttft = cc.value("ttft_s", "p50")
    assert (ttft.predicted, ttft.measured) == (pytest.approx(0.25), pytest.approx(0.2))
    # TPOT of request 2 = (4.0 - 0.4) / 4; the ITL gaps are the same
    assert cc.value("tpot_s", "p99").measured == pytest.approx(
        float(np.percentile([0.9 / 4, 1.8 / 4, 3.6 / 4], 99)))
    # duration 5.0 s predicted, 4.0 s measured; 15 output tokens
    out = cc.value("output_throughput_tokens_per_s")
    assert (out.predicted, out.measured) == (pytest.approx(3.0), pytest.approx(3.75))
    assert out.rel_error == pytest.approx(-0.2)
    assert cc.value("request_throughput_per_s").measured == pytest.approx(0.75)
    assert cc.value("total_throughput_tokens_per_s").measured == pytest.approx(315 / 4)
    hit = cc.value("prefix_cache_hit_rate")
    assert (hit.predicted, hit.measured, hit.rel_error) == (0.1, 0.1, 0.0)
    pre = cc.value("num_preemptions")
    assert (pre.predicted, pre.measured, pre.rel_error) == (0.0, 0.0, 0.0)
    assert cc.paired["ttft_s"] == {"median_ape": pytest.approx(0.25), "num_requests": 3}
    assert cc.paired["e2e_s"]["median_ape"] == pytest.approx(0.25)


def test_errors_and_unmatched_requests_are_excluded_and_counted():
    slow = (3, 0.0, 50.0, 90.0, PROMPT, 0, OUT, "error")   # would wreck every percentile
    run = make_run(
        extra_meas=[slow, (4, 0.0, 0.1, 0.2, PROMPT, 0, OUT, "ok"),
                    (5, 0.0, 9.0, 9.5, PROMPT, 0, OUT, "error"),
                    (7, 0.0, 0.1, 0.2, PROMPT, 0, OUT, "ok")],
        extra_pred=[(3, 0.0, 0.1, 1.0, PROMPT, 0, OUT, "ok"),
                    (4, 0.0, 0.0, 0.0, PROMPT, 0, 0, "rejected"),
                    (5, 0.0, 0.0, 0.0, PROMPT, 0, 0, "rejected"),
                    (6, 0.0, 0.1, 1.0, PROMPT, 0, OUT, "ok")],
        meas_reasons={3: "HTTP 500: engine died", 5: "HTTP 500: engine died"},
        pred_reasons={4: "prompt longer than max_model_len", 5: "prompt longer than max_model_len"})
    (cc,) = compare([run]).configs
    assert (cc.num_requests, cc.num_compared, cc.num_excluded) == (8, 3, 5)
    # request 5 failed on both sides: it appears under both causes
    assert cc.excluded_by_cause() == {"measured error": 2, "predicted rejected": 2,
                                      "not measured": 1, "not predicted": 1}
    assert [(x.cause, x.reason, x.count) for x in cc.exclusions] == [
        ("measured error", "HTTP 500: engine died", 2),
        ("predicted rejected", "prompt longer than max_model_len", 2),
        ("not measured", "predicted, but no measured record", 1),
        ("not predicted", "measured, but the simulator has no record", 1)]
    for v in cc.values:
        if v.stat != "value":
            assert v.rel_error == pytest.approx(0.25, abs=1e-12)
    assert cc.per_request["request_id"].tolist() == [0, 1, 2]


def test_an_error_without_a_reason_names_its_status():
    run = make_run(extra_meas=[(3, 0.0, 1.0, 2.0, PROMPT, 0, OUT, "timeout")],
                   extra_pred=[(3, 0.0, 1.0, 2.0, PROMPT, 0, OUT, "ok")])
    (cc,) = compare([run]).configs
    assert [(x.cause, x.reason, x.count) for x in cc.exclusions] == [
        ("measured error", "status timeout", 1)]


def test_zero_ok_requests_reports_nothing_to_compare():
    meas = make_records(rows_of(BASE, status="error"), {0: "connection refused"})
    run = make_run()
    run.measured = meas
    (cc,) = compare([run]).configs
    assert cc.num_compared == 0 and cc.num_excluded == 3
    assert cc.excluded_by_cause() == {"measured error": 3}
    assert "nothing to compare" in cc.notes[0]
    assert all(math.isnan(v.measured) for v in cc.values if v.metric != "num_preemptions")
    assert cc.paired["ttft_s"] == {"median_ape": pytest.approx(float("nan"), nan_ok=True),
                                   "num_requests": 0}
    assert check(cc, "request lengths").passed is None
    assert check(cc, "prefix-cache hit rate").passed is None
    # the engine served the errored requests in full: the counters match all of them
    assert check(cc, "prompt tokens").passed is True
    json.dumps(compare([run]).to_dict(), allow_nan=False)


# ------------------------------------------------------------ accounting
def test_accounting_passes_on_exact_counters_and_flags_a_mismatch():
    run = make_run(counters={"prompt_tokens": 300, "generation_tokens": 17,
                             "prefix_cache_queries": 300, "prefix_cache_hits": 30})
    (cc,) = compare([run]).configs
    prompt, out = check(cc, "prompt tokens"), check(cc, "output tokens")
    assert (prompt.passed, prompt.expected, prompt.actual) == (True, 300, 300)
    assert (out.passed, out.expected, out.actual) == (False, 15, 17)
    assert "off by 2" in out.detail
    hit = check(cc, "prefix-cache hit rate")
    assert (hit.passed, hit.expected, hit.actual) == (True, 0.1, 0.1)
    assert check(cc, "request lengths").passed is True


def test_accounting_counts_errored_requests_the_engine_served():
    run = make_run(extra_meas=[(3, 0.0, 1.0, 2.0, 40, 0, 2, "error")],
                   extra_pred=[(3, 0.0, 1.0, 2.0, 40, 0, 2, "ok")],
                   counters={"prompt_tokens": 340, "generation_tokens": 15})
    (cc,) = compare([run]).configs
    prompt, out = check(cc, "prompt tokens"), check(cc, "output tokens")
    assert (prompt.passed, prompt.expected, prompt.actual) == (True, 340, 340)
    assert "errored ones included" in prompt.detail
    assert (out.passed, out.expected) == (True, 15)


def test_missing_counters_are_not_checked():
    (cc,) = compare([make_run(counters={})]).configs
    assert [k.passed for k in cc.checks] == [None, None, True, None]
    assert "not scraped" in check(cc, "prompt tokens").detail
    assert "no prefix-cache counters" in check(cc, "prefix-cache hit rate").detail
    assert math.isnan(cc.value("num_preemptions").measured)


def test_sglang_hit_rate_is_over_prompt_tokens():
    run = make_run(counters={"prompt_tokens": 300, "generation_tokens": 15,
                             "prefix_cache_hits": 30})
    hit = check(compare([run]).configs[0], "prefix-cache hit rate")
    assert (hit.passed, hit.actual) == (True, 0.1)
    assert "prefix_cache_hits/prompt_tokens 30/300" in hit.detail


def test_hit_rate_disagreement_and_length_mismatch_are_flagged():
    run = make_run(counters={"prefix_cache_queries": 300, "prefix_cache_hits": 150})
    run.predicted.columns["num_output_tokens"][1] = 6
    (cc,) = compare([run]).configs
    hit = check(cc, "prefix-cache hit rate")
    assert (hit.passed, hit.actual) == (False, 0.5)
    lengths = check(cc, "request lengths")
    assert (lengths.passed, lengths.actual) == (False, 1)
    assert "first: request 1" in lengths.detail


# --------------------------------------------------------- across configs
def three_configs():
    # measured TTFT p50: a 0.2, b 0.4, c 0.6; predicted: a 0.25, b 0.6, c 0.54
    return [make_run("a", 1.0, 1.25), make_run("b", 2.0, 1.5), make_run("c", 3.0, 0.9)]


def test_rank_agreement_spearman_kendall_and_best():
    comp = compare(three_configs())
    assert len(comp.ranks) == 4 * 3 + 1 and comp.rank_note == ""
    r = next(r for r in comp.ranks if (r.metric, r.stat) == ("ttft_s", "p50"))
    # predicted order a < c < b, measured a < b < c: one discordant pair of three
    assert r.num_configs == 3 and not r.higher_is_better
    assert r.spearman_rho == pytest.approx(0.5) and r.kendall_tau == pytest.approx(1 / 3)
    assert (r.predicted_best, r.measured_best, r.best_agrees, r.regret) == (["a"], ["a"],
                                                                           True, 0.0)
    tp = comp.ranks[-1]
    assert (tp.metric, tp.stat, tp.higher_is_better) == ("output_throughput_tokens_per_s",
                                                         "value", True)
    # predicted 3, 1.25, 1.39 tok/s; measured 3.75, 1.875, 1.25
    assert tp.spearman_rho == pytest.approx(0.5) and tp.kendall_tau == pytest.approx(1 / 3)
    assert (tp.predicted_best, tp.measured_best, tp.best_agrees) == (["a"], ["a"], True)


def test_two_configs_give_best_and_regret_but_no_correlation():
    comp = compare([make_run("a", 1.0, 1.0), make_run("b", 1.2, 0.5)])
    r = next(r for r in comp.ranks if (r.metric, r.stat) == ("e2e_s", "p90"))
    assert math.isnan(r.spearman_rho) and math.isnan(r.kendall_tau)
    assert r.reason == "needs at least 3 configs with values, has 2"
    assert (r.predicted_best, r.measured_best, r.best_agrees) == (["b"], ["a"], False)
    assert r.regret == pytest.approx(0.2)


def test_constant_values_and_configs_without_values_give_reasons():
    runs = [make_run("a", 1.0, 1.0), make_run("b", 2.0, 0.5), make_run("c", 4.0, 0.25),
            make_run("d", 1.0, 1.0)]
    runs[3].measured = make_records(rows_of(BASE, status="error"))
    comp = compare(runs)
    r = next(r for r in comp.ranks if (r.metric, r.stat) == ("ttft_s", "p50"))
    assert r.num_configs == 3 and math.isnan(r.spearman_rho)
    assert r.reason == ("the predicted values are all equal (3 configs); 1 config(s) without "
                        "a value on both sides left out")
    assert r.predicted_best == ["a", "b", "c"] and r.best_agrees is True


def test_a_single_config_has_no_rank_agreement():
    comp = compare([make_run()])
    assert comp.ranks == [] and "needs at least 2" in comp.rank_note
    assert compare([]).configs == []


# ------------------------------------------------------------ outputs
def test_to_dict_is_json_safe_and_table_has_one_row_per_figure():
    comp = compare([*three_configs(), make_run("d", counters={})])
    d = comp.to_dict()
    assert json.loads(json.dumps(d, allow_nan=False)) == d
    a = d["configs"][0]
    assert a["latency"]["ttft_s"]["p50"]["rel_error"] == pytest.approx(0.25)
    assert d["configs"][3]["scalars"]["num_preemptions"]["measured"] is None
    assert d["rank_agreement"][0]["predicted_best"] == ["a", "d"]
    table = comp.table()
    assert isinstance(table, pd.DataFrame)
    assert len(table) == 4 * (4 * 3 + 5)
    row = table[(table.config_id == "b") & (table.metric == "e2e_s") & (table.stat == "p90")]
    assert row["rel_error"].item() == pytest.approx(0.5)


def test_bad_choices_and_duplicates_are_rejected():
    with pytest.raises(InputError, match="'p95' is not one of"):
        compare([make_run()], stats=("p95",))
    with pytest.raises(InputError, match="'goodput' is not one of"):
        compare([make_run()], metrics=("goodput",))
    with pytest.raises(InputError, match="config_id 'a' appears more than once"):
        compare([make_run("a"), make_run("a")])
    run = make_run()
    run.measured = make_records(rows_of(BASE) + rows_of(BASE[:1]))
    with pytest.raises(InputError, match="request_id 0 appears 2 times"):
        compare([run])


def test_subset_keeps_each_requests_token_times_and_summaries():
    rec = make_records([*rows_of(BASE), (9, 0.0, 0.5, 0.5, 10, 0, 1, "ok")])
    sub = subset(rec, np.array([3, 1]))
    assert sub.columns["request_id"].tolist() == [9, 1]
    assert sub.token_offsets.tolist() == [0, 1, 6]
    assert sub.token_times_s.tolist() == [0.5, *np.linspace(0.2, 2.0, 5).tolist()]
    assert summarize(subset(rec, np.arange(4)))["itl_s"] == summarize(rec)["itl_s"]


def test_rel_error_edges():
    assert rel_error(1.0, 0.0) == math.inf and rel_error(0.0, 0.0) == 0.0
    assert math.isnan(rel_error(float("nan"), 1.0))
