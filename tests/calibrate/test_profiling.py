"""The profiling driver: the join of vLLM's step counts with known request shapes, on
step logs written by a small model of vLLM V1's scheduler, and once against the real vLLM
CPU engine (slow)."""

from __future__ import annotations

import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pandas as pd
import pytest

from calibrate import measurements
from calibrate.profiling import (
    Group,
    Phase,
    ProfilingResult,
    Sent,
    burst_lag,
    decode_gaps,
    default_plan,
    gap_summary,
    host_gap_model,
    join_phase,
    profile_engine,
    serialized_phase,
    served_plan,
    served_steps,
    small_plan,
    split_phases,
    step_walls,
    tiny_vllm_spec,
    within_model_len,
)
from calibrate.vllm_log import parse_lines
from sim.errors import InputError

LINE = ("(APIServer pid=1) INFO 11-26 22:00:40 [loggers.py:199] Engine 000: Iteration({i}): "
        "{a} context requests, {b} context tokens, {c} generation requests, {d} generation "
        "tokens, iteration elapsed time: {ms:.2f} ms, CPU KV cache usage: 0.0%")


@dataclass
class Truth:
    """One step as the model below scheduled it."""

    chunks: list[tuple[int, int]]  # (new tokens n, tokens before c)
    contexts: list[int]  # decode context lengths, the new token included
    emitted: list[int]  # the requests that got a token from it (decoders, finished prompts)
    busy_after: bool = False  # an admitted request is still in flight after the step


def make_log(requests: list[tuple[int, int, int]], max_num_batched_tokens: int,
             first_iteration: int = 0) -> tuple[list[str], list[Truth]]:
    """Step lines for ``requests`` = (prompt, output, arrival step), in arrival order:
    running requests first (a decode takes one token, a prefill continues), then waiting
    ones in order, the last one admitted cut to the budget (vLLM V1's scheduler)."""
    state = [{"p": p, "o": o, "at": at, "done": 0, "gen": 0,
              "admitted": False, "k": k} for k, (p, o, at) in enumerate(requests)]
    running: list[dict] = []
    lines, truths = [], []
    step = 0
    while any(r["gen"] < r["o"] for r in state):
        budget = max_num_batched_tokens
        chunks, decodes = [], []
        for r in running:
            if r["done"] < r["p"]:
                n = min(r["p"] - r["done"], budget)
                if n:
                    chunks.append((r, n))
                    budget -= n
            else:
                decodes.append(r)
                budget -= 1
        for r in state:
            if r["admitted"] or r["at"] > step or budget <= 0:
                continue
            n = min(r["p"], budget)
            r["admitted"] = True
            running.append(r)
            chunks.append((r, n))
            budget -= n
        if not chunks and not decodes:
            step += 1
            continue
        truths.append(Truth([(n, r["done"]) for r, n in chunks],
                            [r["p"] + r["gen"] for r in decodes],
                            [r["k"] for r in decodes]
                            + [r["k"] for r, n in chunks if r["done"] + n == r["p"]]))
        lines.append(LINE.format(i=first_iteration + len(lines), a=len(chunks),
                                 b=sum(n for _, n in chunks), c=len(decodes), d=len(decodes),
                                 ms=1.0 + len(lines)))
        for r in decodes:
            r["gen"] += 1
        for r, n in chunks:
            r["done"] += n
            if r["done"] == r["p"]:
                r["gen"] = 1
        running = [r for r in running if r["gen"] < r["o"]]
        truths[-1].busy_after = bool(running)
        step += 1
    return lines, truths


def work(t: Truth) -> float:
    return sum(n * (c + (n + 1) / 2) for n, c in t.chunks)


def steps_of(lines: list[str]) -> pd.DataFrame:
    return parse_lines(lines, "synthetic.log")


def test_join_chunked_prefill_by_hand() -> None:
    # 300 tokens through a 256-token budget: a chunk of 256, then 44 after them; 3 outputs
    lines, _ = make_log([(300, 3, 0)], 256)
    j = join_phase(steps_of(lines), [Sent(300, 3)])
    assert not j.dropped and not j.notes
    got = [(r["num_prefill_tokens"], r["prefill_attn_work"], r["num_prefill_seqs"],
            r["num_decode_seqs"], r["decode_context_tokens"]) for r in j.rows]
    assert got == [(256, 256 * 257 / 2, 1, 0, 0), (44, 44 * (256 + 45 / 2), 1, 0, 0),
                   (0, 0.0, 0, 1, 301), (0, 0.0, 0, 1, 302)]
    assert [r["measured_s"] for r in j.rows] == [0.001, 0.002, 0.003, 0.004]


@pytest.mark.parametrize("requests, budget", [
    # a decode batch whose members arrive over three steps: mixed steps, then decodes
    ([(32, 20, 0), (32, 20, 0), (32, 20, 1), (32, 20, 3)], 256),
    # decoders with long prefills beside them, chunked by the budget
    ([(32, 60, 0), (32, 60, 0), (32, 60, 0), (700, 1, 5), (300, 1, 6), (64, 1, 30)], 256),
    # more prompt than one step holds among several arrivals at once
    ([(100, 5, 0)] * 6, 128),
])
def test_join_recovers_every_step(requests: list[tuple[int, int, int]], budget: int) -> None:
    lines, truths = make_log(requests, budget)
    j = join_phase(steps_of(lines), [Sent(p, o) for p, o, _ in requests])
    assert not j.dropped and not j.notes
    assert len(j.rows) == len(truths)
    assert j.emitted == [t.emitted for t in truths]
    for row, t in zip(j.rows, truths, strict=True):
        assert row["num_prefill_tokens"] == sum(n for n, _ in t.chunks)
        assert row["prefill_attn_work"] == work(t)
        assert row["num_prefill_seqs"] == len(t.chunks)
        assert row["num_decode_seqs"] == len(t.contexts)
        assert row["decode_context_tokens"] == sum(t.contexts)
    # the requests whose last token each step produced (calibrate.fit.finish_cost)
    tokens = [0] * len(requests)
    for row, t in zip(j.rows, truths, strict=True):
        ends = 0
        for k in t.emitted:
            tokens[k] += 1
            ends += tokens[k] == requests[k][1]
        # counted where the engine runs on: a request still in flight after the step
        assert row["finished"] == (ends if t.busy_after else 0)
    assert sum(r["finished"] for r in j.rows) < len(requests)


def test_client_token_times_give_the_host_time_before_each_decode_step() -> None:
    """The client receives a step's tokens at the step's end; two consecutive steps' walls
    differ by the second's elapsed time plus the host time before it. Here that time is
    0.2 ms + 0.1 ms per decoder, each request's chunk lands up to 0.05 ms late, and one
    request's chunks were merged (fewer events than tokens): it is left out."""
    requests = [(32, 30, 0), (32, 30, 0), (32, 30, 2), (64, 12, 5), (32, 30, 9)]
    lines, truths = make_log(requests, 256)
    steps = steps_of(lines)
    j = join_phase(steps, [Sent(p, o) for p, o, _ in requests])
    rows = pd.DataFrame(j.rows)
    gap = [2e-4 + 1e-4 * len(t.contexts) for t in truths]
    wall, walls = 0.0, []
    for g, ms in zip(gap, steps["elapsed_s"], strict=True):
        wall += g + ms
        walls.append(wall)
    events: list[list[float]] = [[] for _ in requests]
    for w, t in zip(walls, truths, strict=True):
        for k in t.emitted:
            events[k].append(w + 5e-5 * k / len(requests))
    events[3] = events[3][:-2]  # merged chunks: cannot be matched to steps
    assert step_walls(j.emitted, events) == pytest.approx(walls, abs=6e-5)
    gaps, batch = decode_gaps(j.emitted, events, rows)
    decode = [i for i in range(1, len(truths)) if not truths[i].chunks]
    assert len(gaps) == len(decode) > 20
    assert gaps == pytest.approx([gap[i] for i in decode], abs=6e-5)
    assert batch.tolist() == [len(truths[i].contexts) for i in decode]
    med, by_batch = gap_summary(gaps, batch)
    assert by_batch == pytest.approx({n: 2e-4 + 1e-4 * n for n in by_batch}, abs=6e-5)
    assert set(by_batch) == {1, 2, 3, 4, 5} and med is not None
    assert gap_summary(gaps[:0], batch[:0]) == (None, {})


def test_a_group_that_reached_the_engine_one_at_a_time_is_named() -> None:
    phase = Phase("decode-x3", (Group(32, 20, 3),))
    together, _ = make_log([(32, 20, 0)] * 3, 256)
    apart, _ = make_log([(32, 20, 0), (32, 20, 20), (32, 20, 40)], 256)
    rows = {k: join_phase(steps_of(lines), [Sent(32, 20) for _ in range(3)]).rows
            for k, lines in (("together", together), ("apart", apart))}
    assert not serialized_phase(phase, rows["together"])
    assert serialized_phase(phase, rows["apart"])
    # requests sent one after another on purpose are not a symptom
    assert not serialized_phase(Phase("p", (Group(32, 20, 3, sequential=True),)),
                                rows["apart"])


def test_a_burst_says_how_far_apart_the_engine_saw_its_requests() -> None:
    burst = Phase("decode-x8", (Group(32, 20, 8),))
    ms = [0.010, 0.020, 0.005, 0.005]
    # the first alone, the other seven at the next step: the last came within step 1
    # (0 .. 10 ms + 1 ms of host time), taken as its middle, over 7 intervals
    assert burst_lag(burst, [1, 7, 0, 0], ms, 0.001) == pytest.approx(0.011 / 2 / 7)
    # three at step 2, four at step 3: the 8th came between 11 and 32 ms
    assert burst_lag(burst, [1, 3, 4, 0], ms, 0.001) == pytest.approx((0.011 + 0.032) / 2 / 7)
    assert burst_lag(burst, [8, 0, 0, 0], ms, 0.001) == 0.0  # all there at once
    # the join counts admissions per step
    lines, _ = make_log([(32, 20, 0), (32, 20, 1), (32, 20, 1), (32, 20, 1)], 256)
    j = join_phase(steps_of(lines), [Sent(32, 20) for _ in range(4)])
    assert j.admitted[:3] == [1, 3, 0] and sum(j.admitted) == 4
    # not bursts: too few, one after another, long prompts (the budget could split them)
    assert burst_lag(Phase("x2", (Group(32, 20, 2),)), [1, 1], ms, 0.0) is None
    assert burst_lag(Phase("s", (Group(32, 20, 8, sequential=True),)), [1, 7], ms, 0.0) is None
    assert burst_lag(Phase("l", (Group(1024, 20, 8),)), [1, 7], ms, 0.0) is None
    assert burst_lag(burst, [1, 1, 1, 0], ms, 0.0) is None  # fewer than MIN_BURST admitted
    # four seats: the 5th-8th waited for a seat, so the 4th admitted is the last timed
    assert burst_lag(burst, [1, 3, 1, 3], ms, 0.001, [1, 4, 4, 4]) == pytest.approx(
        0.011 / 2 / 3)


def test_join_reads_prefix_hits() -> None:
    # 64 of 100 prompt tokens were a hit: the engine computes 36 after them
    lines = [LINE.format(i=0, a=1, b=36, c=0, d=0, ms=5), LINE.format(i=1, a=0, b=0, c=1, d=1,
                                                                       ms=2)]
    j = join_phase(steps_of(lines), [Sent(100, 2, num_cached_tokens=64)])
    assert [r["prefill_attn_work"] for r in j.rows] == [36 * (64 + 37 / 2), 0.0]
    assert j.rows[1]["decode_context_tokens"] == 101


def test_a_step_that_does_not_fit_drops_the_rest_of_its_phase_counted() -> None:
    lines, truths = make_log([(32, 10, 0), (32, 10, 0)], 256)
    bad = lines[3].replace("2 generation requests", "1 generation requests")
    lines = [*lines[:3], bad, *lines[4:]]
    j = join_phase(steps_of(lines), [Sent(32, 10), Sent(32, 10)])
    assert len(j.rows) == 3
    assert sum(j.dropped.values()) == len(truths) - 3
    assert j.dropped["generation requests differ from the replay"] == 1


def test_split_phases_by_tokens() -> None:
    a, _ = make_log([(300, 1, 0)], 256)
    b, _ = make_log([(16, 4, 0), (16, 4, 0)], 256, first_iteration=len(a))
    phases = [[Sent(300, 1)], [Sent(16, 4), Sent(16, 4)]]
    parts = split_phases(steps_of(a + b), phases)
    assert [len(p) for p in parts] == [len(a), len(b)]
    assert parts[1]["iteration"].tolist() == list(range(len(a), len(a) + len(b)))


def test_served_steps_joins_a_replay_from_its_first_line(tmp_path: Path) -> None:
    # a profiling phase before, the replay (arrivals over 40 steps, chunked prefills, a
    # prefix hit), then another phase after it: only the replay's steps are joined
    before, _ = make_log([(300, 1, 0), (16, 4, 0)], 256)
    replay = [(32, 20, 0), (500, 8, 2), (40, 30, 3), (200, 5, 10), (64, 12, 40)]
    lines, truths = make_log(replay, 256, first_iteration=len(before))
    after, _ = make_log([(16, 50, 0)], 256, first_iteration=len(before) + len(lines))
    log = tmp_path / "engine.log"
    log.write_text("\n".join(["INFO starting vLLM 0.32.0", *before, "INFO replaying",
                              *lines, *after]) + "\n", encoding="utf-8")
    first = len(before) + 3  # the line after "INFO replaying"
    res = served_steps(log, first, [Sent(p, o) for p, o, _ in replay], tmp_path / "s.csv",
                       log_wait_s=0)
    assert res.dropped == {} and res.notes == []
    assert res.num_rows == res.num_steps == len(truths)
    df = measurements.read(res.csv_path)
    assert df["num_decode_seqs"].tolist() == [len(t.contexts) for t in truths]
    assert df["decode_context_tokens"].tolist() == [sum(t.contexts) for t in truths]
    assert df["prefill_attn_work"].tolist() == [work(t) for t in truths]
    assert df["source"].str.endswith("(served)").all()
    # a request the list lacks: the join stops where the log stops fitting, counted
    short = served_steps(log, first, [Sent(p, o) for p, o, _ in replay[:2] + replay[3:]],
                         tmp_path / "t.csv", log_wait_s=0)
    assert 0 < short.num_rows < short.num_steps
    assert sum(short.dropped.values()) == short.num_steps - short.num_rows


def test_served_plan_decodes_batches_as_they_churn() -> None:
    plan = served_plan()
    names = [p.name for p in plan]
    served = [p for p in plan if p.name.startswith("served")]
    assert len(served) == 4 and {"prefill-2048", "decode-x1-r0", "mix-x8-p256"} <= set(names)
    # no lockstep decode batch beyond two sequences: the batches decode as served
    assert not [n for n in names if n.startswith("decode-x") and
                not n.startswith(("decode-x1-", "decode-x2-"))]
    for p in served:
        # one request a group, each at its own time: the order the join needs
        assert all(g.count == 1 for g in p.groups) and len(p.arrival_order()) >= 24
        outputs = [g.num_output_tokens for g in p.arrival_order()]
        assert len(set(outputs)) >= 3  # requests finish at different steps
    contexts = [g.num_prompt_tokens for p in served for g in p.groups]
    assert min(contexts) <= 64 and max(contexts) >= 2048
    assert within_model_len(plan, 1024) and all(
        g.num_prompt_tokens + g.num_output_tokens <= 1024
        for p in within_model_len(plan, 1024) for g in p.groups)


def test_plan_rejects_ambiguous_arrival_order() -> None:
    with pytest.raises(InputError, match="same time"):
        Phase("x", (Group(8, 1), Group(16, 1)))


def test_step_gap_is_the_median_over_long_phases_only() -> None:
    def phase(steps: int, gap_ms: float) -> dict[str, float | int | str]:
        return {"name": "p", "num_steps": steps, "gap_s": gap_ms / 1e3,
                "span_s": 0.0, "busy_s": 0.0}

    res = ProfilingResult(Path("s.csv"), Path("l.log"), 0, 0, 0, {}, [], {}, 0.0, None,
                          [phase(2, 9.0), phase(96, 1.0), phase(193, 1.2), phase(770, 1.6)])
    assert res.step_gap_s == pytest.approx(1.2e-3)  # the 2-step phase's 9 ms is left out
    assert "1.20 ms a step (median of 3 phases)" in res.format()
    short = ProfilingResult(Path("s.csv"), Path("l.log"), 0, 0, 0, {}, [], {}, 0.0, None,
                            [phase(2, 9.0)])
    assert short.step_gap_s is None and "between steps" not in short.format()


def test_host_gap_model_recovers_time_per_step_sequence_and_context_token() -> None:
    """Phases whose gaps follow a known law come back as that law; a phase too short, or
    whose steps were not all joined (no composition), is left out."""
    law = (6e-4, 4e-5, 1.5e-7)  # s a step, a sequence, a context token

    def phase(steps: int, batch: int, context: int, noise: float = 0.0) -> dict:
        seqs, ctx = steps * batch, steps * batch * context
        gap = (law[0] * steps + law[1] * seqs + law[2] * ctx) / steps + noise
        return {"name": f"decode-x{batch}-ctx{context}", "num_steps": steps, "gap_s": gap,
                "span_s": 0.0, "busy_s": 0.0, "seqs": seqs, "context_tokens": ctx}

    phases = [phase(96, b, c) for b, c in ((1, 64), (2, 64), (4, 100), (8, 80), (32, 90),
                                           (1, 2048), (2, 1024), (4, 2048), (8, 512))]
    host = host_gap_model(phases)
    assert host is not None and host.num_phases == 9 and host.rms_s < 1e-9
    assert (host.step_s, host.per_seq_s, host.per_context_token_s) == pytest.approx(law)
    assert host.at(8, 8 * 512) == pytest.approx(law[0] + 8 * law[1] + 8 * 512 * law[2])
    # a 2-step phase's gap (its requests' own costs) and a phase without its composition
    # (read back from steps.phases.csv: NaN) change nothing
    odd = [*phases, phase(2, 1, 16, noise=9e-3),
           {**phase(96, 4, 64, noise=5e-3), "seqs": float("nan")}]
    again = host_gap_model(odd)
    assert again is not None and again.num_phases == 9
    assert again.per_context_token_s == pytest.approx(law[2])
    # noisy phases: the law within the noise, every coefficient >= 0
    rng = np.random.default_rng(0)
    noisy = host_gap_model([phase(96, b, c, noise=float(rng.normal(0, 5e-5)))
                            for b, c in ((1, 64), (2, 64), (4, 100), (8, 80), (32, 90),
                                         (1, 2048), (2, 1024), (4, 2048), (8, 512))])
    assert noisy is not None and min(noisy.step_s, noisy.per_seq_s,
                                     noisy.per_context_token_s) >= 0
    assert noisy.at(8, 4000) == pytest.approx(law[0] + 8 * law[1] + 4000 * law[2], rel=0.1)
    assert host_gap_model(phases[:3]) is None  # too few phases to say
    res = ProfilingResult(Path("s.csv"), Path("l.log"), 0, 0, 0, {}, [], {}, 0.0, None, phases)
    assert res.host_gap == host
    assert "0.60 ms + 40.0 us a sequence + 150.0 us per 1,000 context tokens" in res.format()


def test_default_plan_decodes_over_long_contexts_and_fits_a_model_length() -> None:
    plan = default_plan()
    longest = max(g.num_prompt_tokens for p in plan for g in p.groups if g.num_output_tokens > 1)
    assert longest >= 2048  # a served trace decodes over contexts of thousands of tokens
    short = within_model_len(plan, 1024)
    assert short and all(g.num_prompt_tokens + g.num_output_tokens <= 1024
                         for p in short for g in p.groups)
    assert {p.name for p in plan} - {p.name for p in short} >= {"prefill-2048",
                                                              "decode-x4-ctx2048"}
    assert within_model_len(plan, None) == plan


@pytest.mark.slow
def test_profile_real_vllm_cpu(tmp_path: Path) -> None:
    from verify.deploy import Deployment

    spec = tiny_vllm_spec(18431, max_num_seqs=8, max_num_batched_tokens=256,
                          max_model_len=2048)
    log = tmp_path / "vllm.log"
    plan = small_plan()
    with Deployment(spec, log, ready_timeout_s=400):
        t0 = time.monotonic()
        res = profile_engine(spec.base_url, log, tmp_path / "steps.csv", plan)
        assert time.monotonic() - t0 < 60
    # every phase timed; the host time between steps is small but there
    assert [p["name"] for p in res.phases] == [p.name for p in plan]
    assert res.step_gap_s is not None and 0 < res.step_gap_s < 0.02
    assert (tmp_path / "steps.phases.csv").is_file()
    assert res.engine_version == "0.32.0"
    assert res.num_dropped == 0 and not res.notes, res.format()
    assert res.rows_by_regime.get("prefill", 0) >= 3 and res.rows_by_regime.get("decode", 0) > 20
    assert res.rows_by_regime.get("mixed", 0) >= 1
    df = measurements.read(res.csv_path)
    assert len(df) == res.num_rows == res.num_steps
    assert (df["measured_s"] > 0).all()
    # the engine's logged token counts are the plan's, exactly
    prompt = sum(g.num_prompt_tokens * g.count for p in plan for g in p.groups)
    decode = sum((g.num_output_tokens - 1) * g.count for p in plan for g in p.groups)
    assert int(df["num_prefill_tokens"].sum()) == prompt
    assert int(df["num_decode_seqs"].sum()) == decode
    # the 300-token prompt through a 256-token budget: a chunk of 256, then 44 after them
    pure = df[(df["num_decode_seqs"] == 0)]
    assert {256, 44} <= set(pure["num_prefill_tokens"])
    assert 44 * (256 + 45 / 2) in set(pure["prefill_attn_work"])
