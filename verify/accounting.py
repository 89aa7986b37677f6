"""The measured records against the engine's own accounting over the same replay.

The engine's counter deltas (scraped from /metrics before and after) must equal the sums
over the measured records exactly for prompt and output tokens; the request lengths must
be the ones the simulator was given; the prefix-cache hit rate from the counters must
agree with the one from the records' ``cached_tokens`` (and is shown beside the predicted
one).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import numpy as np

from sim.metrics import Records

if TYPE_CHECKING:
    from .compare import ConfigRun

# counters and records both count prefix hits in tokens, but vLLM counts a re-queried
# request (one that waited or was preempted) again, so their rates agree only roughly
HIT_RATE_TOLERANCE = 0.02


@dataclass
class Check:
    name: str
    passed: bool | None             # None: could not be checked (counter missing)
    expected: float | None          # from the measured records
    actual: float | None            # from the engine's counters
    detail: str


def accounting_checks(run: ConfigRun, predicted_summary: dict[str, Any], pred: Records,
                      meas: Records) -> list[Check]:
    """The measured records against the engine's counter deltas over the same replay.

    Token totals must match exactly: the engine counts every prompt and every generated
    token it processed. An errored request may or may not have reached the engine, so the
    total over ok requests passes, and so does the total over all requests."""
    c = run.measured.columns
    ok = c["status"] == "ok"
    checks = [_token_check(run, "prompt tokens", "prompt_tokens", c["num_prompt_tokens"], ok),
              _token_check(run, "output tokens", "generation_tokens", c["num_output_tokens"],
                           ok)]
    checks.append(_length_check(pred, meas))
    checks.append(_hit_rate_check(run, predicted_summary, c, ok))
    return checks


def _token_check(run: ConfigRun, name: str, key: str, tokens: np.ndarray, ok: np.ndarray
                 ) -> Check:
    ok_sum, all_sum = int(tokens[ok].sum()), int(tokens.sum())
    counter = engine_counter(run, key)
    if counter is None:
        return Check(name, None, ok_sum, None, f"engine counter {key!r} not scraped: "
                     "not checked")
    errored = int((~ok).sum())
    if counter == ok_sum:
        return Check(name, True, ok_sum, counter, f"Σ over {int(ok.sum())} ok requests "
                     f"{ok_sum} = counter {key} {_num(counter)}")
    if errored and counter == all_sum:
        return Check(name, True, all_sum, counter, f"Σ over all {tokens.size} requests "
                     f"(the {errored} errored ones included) {all_sum} = counter {key} "
                     f"{_num(counter)}")
    extra = f" (with the {errored} errored requests: {all_sum})" if errored else ""
    return Check(name, False, ok_sum, counter, f"Σ over {int(ok.sum())} ok requests {ok_sum}"
                 f"{extra} ≠ counter {key} {_num(counter)}: off by {_num(counter - ok_sum)}")


def _length_check(pred: Records, meas: Records) -> Check:
    """The replay must send what the simulator was given: same prompt and output length."""
    bad = (pred.columns["num_prompt_tokens"] != meas.columns["num_prompt_tokens"]) | \
        (pred.columns["num_output_tokens"] != meas.columns["num_output_tokens"])
    n = len(meas)
    if not n:
        return Check("request lengths", None, 0, 0, "no compared request: not checked")
    if not bad.any():
        return Check("request lengths", True, 0, 0, f"all {n} compared requests have the "
                     "predicted prompt and output token counts")
    first = int(meas.columns["request_id"][bad][0])
    return Check("request lengths", False, 0, int(bad.sum()),
                 f"{int(bad.sum())} of {n} compared requests differ from the predicted "
                 f"prompt/output token counts (first: request {first})")


def _hit_rate_check(run: ConfigRun, predicted_summary: dict[str, Any],
                    c: dict[str, np.ndarray], ok: np.ndarray) -> Check:
    prompt = int(c["num_prompt_tokens"][ok].sum())
    records_rate = float(c["num_cached_tokens"][ok].sum() / prompt) if prompt else float("nan")
    predicted = float(predicted_summary["prefix_cache_hit_rate"])
    rates = f"records {_pct(records_rate)}, predicted {_pct(predicted)}"
    hits = engine_counter(run, "prefix_cache_hits")
    queries = engine_counter(run, "prefix_cache_queries")
    source = "prefix_cache_hits/prefix_cache_queries"
    if queries is None and hits is not None:
        # SGLang counts cached tokens but not lookups: its rate is over all prompt tokens
        queries = engine_counter(run, "prompt_tokens")
        source = "prefix_cache_hits/prompt_tokens"
    if not ok.any():
        return Check("prefix-cache hit rate", None, records_rate, None,
                     "no measured request completed ok: not checked")
    if hits is None or queries is None:
        return Check("prefix-cache hit rate", None, records_rate, None,
                     f"engine exposes no prefix-cache counters: not checked; {rates}")
    if not queries:
        return Check("prefix-cache hit rate", None, records_rate, None,
                     f"{source.partition('/')[2]} is 0: not checked; {rates}")
    counter_rate = float(hits / queries)
    passed = math.isfinite(records_rate) and abs(counter_rate - records_rate) <= \
        HIT_RATE_TOLERANCE
    hint = ""
    if records_rate == 0 and counter_rate > 0:
        hint = ("; the records carry no cached tokens: is the server's per-request report "
                "on (vLLM --enable-prompt-tokens-details)?")
    return Check("prefix-cache hit rate", passed, records_rate, counter_rate,
                 f"counters {source} {_num(hits)}/{_num(queries)} = {_pct(counter_rate)}, "
                 f"{rates} (records and counters must agree within "
                 f"{HIT_RATE_TOLERANCE:.0%}){hint}")


def engine_counter(run: ConfigRun, key: str) -> float | None:
    v = run.engine_counters.get(key)
    return float(v) if v is not None and math.isfinite(float(v)) else None


def _num(x: float) -> str:
    return f"{x:,.0f}" if float(x).is_integer() else f"{x:,.3f}"


def _pct(x: float) -> str:
    return f"{x:.1%}" if math.isfinite(x) else "n/a"
