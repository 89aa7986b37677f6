"""Factories for small hand-computable engines and requests."""

from __future__ import annotations

from collections.abc import Iterable, Sequence

import numpy as np
import pytest

from sim.engines.vllm import StepPlan, VllmConfig, VllmEngine
from sim.request import Request


class LinearTiming:
    """Test double: step = base + per_prefill_token*P + per_decode_seq*D + per_context*C."""

    def __init__(self, base: float = 1.0, per_prefill_token: float = 0.1,
                 per_decode_seq: float = 0.5, per_context: float = 0.0,
                 finish_s: float = 0.0) -> None:
        self.finish_s = finish_s  # TimingProfile.finish_s, read by the engines
        self.base = base
        self.p = per_prefill_token
        self.d = per_decode_seq
        self.c = per_context

    def step_time(self, num_prefill_tokens: int, prefill_attn_work: float,
                  num_prefill_seqs: int, num_decode_seqs: int,
                  decode_context_tokens: int) -> float:
        fixed = self.base + self.p * num_prefill_tokens + self.d * num_decode_seqs
        return fixed + self.c * decode_context_tokens

    def decode_run_times(self, num_decode_seqs: int, decode_context_tokens0: int,
                         num_steps: int) -> np.ndarray:
        fixed = self.base + self.p * 0 + self.d * num_decode_seqs
        ctx = decode_context_tokens0 + num_decode_seqs * np.arange(num_steps, dtype=np.int64)
        return fixed + self.c * ctx


def make_engine(num_blocks: int = 11, block_size: int = 4, max_num_batched_tokens: int = 8,
                max_num_seqs: int = 4, hash_block_tokens: int = 0, fast_forward: bool = False,
                timing: LinearTiming | None = None, **knobs: object) -> VllmEngine:
    cfg = VllmConfig(max_num_seqs=max_num_seqs, max_num_batched_tokens=max_num_batched_tokens,
                     num_gpu_blocks=num_blocks, block_size=block_size,
                     max_model_len=knobs.pop("max_model_len", 100_000),  # type: ignore[arg-type]
                     **knobs)  # type: ignore[arg-type]
    # tests use small raw hash ids directly as dense ids
    return VllmEngine(cfg, timing or LinearTiming(), hash_block_tokens, 1000,
                      fast_forward=fast_forward)


def make_request(rid: int, prompt: int, output: int, arrival_s: float = 0.0,
                 hash_ids: Sequence[int] = ()) -> Request:
    return Request(rid, arrival_s, prompt, output, np.asarray(hash_ids, dtype=np.int64))


def drive(engine: VllmEngine, arrivals: Iterable[Request], until_idle: bool = True
          ) -> list[tuple[float, StepPlan]]:
    """Run an engine alone: requests join at their arrival, steps run back to back."""
    pending = sorted(arrivals, key=lambda r: r.arrival_s)
    now = 0.0
    log: list[tuple[float, StepPlan]] = []
    while pending or engine.has_work:
        while pending and pending[0].arrival_s <= now:
            engine.add_request(pending.pop(0))
        plan = engine.schedule(now)
        if plan is None:
            if pending:
                now = max(now, pending[0].arrival_s)
                continue
            if not engine.has_work:
                break
            continue
        # the whole batch: a vLLM engine's decode cohort is not in plan.scheduled
        batch = engine.batch(plan) if isinstance(engine, VllmEngine) else plan.scheduled
        engine.commit(plan, plan.num_steps)
        plan.scheduled = batch  # for the tests' inspection: what the step ran
        log.append((now, plan))
        now = plan.end_s
    return log


def make_trace(arrival_s: Sequence[float], input_tokens: Sequence[int],
               output_tokens: Sequence[int], hash_ids: Sequence[Sequence[int]] | None = None,
               hash_block_tokens: int = 0):  # -> Trace
    from sim.workload import Trace

    if hash_ids is None:
        hash_ids = [[] for _ in arrival_s]
    offsets = np.concatenate(([0], np.cumsum([len(h) for h in hash_ids]))).astype(np.int64)
    flat = np.asarray([x for h in hash_ids for x in h], dtype=np.int64)
    return Trace.checked(arrival_s=np.asarray(arrival_s, dtype=np.float64),
                         input_tokens=np.asarray(input_tokens, dtype=np.int64),
                         output_tokens=np.asarray(output_tokens, dtype=np.int64),
                         hash_offsets=offsets, hash_ids=flat,
                         hash_block_tokens=hash_block_tokens if flat.size else 0,
                         source="test")


def run_cluster(trace, config: VllmConfig, num_workers: int, fast_forward: bool,
                timing=None, closed_loop=None, cohort: bool = True
                ):  # -> (SimOutcome, Records)
    from sim.cluster import Cluster
    from sim.kv import dense_hash_ids
    from sim.metrics import build_records
    from sim.router import make_router

    dense, n_ids = dense_hash_ids(trace.hash_ids)
    engines = [VllmEngine(config, timing or LinearTiming(), trace.hash_block_tokens, n_ids,
                          fast_forward=fast_forward, cohort=cohort)
               for _ in range(num_workers)]
    router = make_router("round_robin", {}, num_workers, np.random.default_rng(0))
    outcome = Cluster(engines, router, trace, dense, closed_loop).run()
    return outcome, build_records(outcome)


def assert_same_records(step, ff) -> None:  # (Records, Records)
    """Step-by-step and fast-forward records equal: every column (floats to 1e-9,
    the rest exactly) and every token time."""
    for name, col in step.columns.items():
        other = ff.columns[name]
        if col.dtype.kind == "f":
            np.testing.assert_allclose(other, col, rtol=1e-9, equal_nan=True, err_msg=name)
        else:
            assert (other == col).all(), name
    np.testing.assert_allclose(ff.token_times_s, step.token_times_s, rtol=1e-9)


def assert_itl_counts_match_gaps(outcome, records) -> None:  # (SimOutcome, Records)
    """The ITL gaps counted by step (sim.metrics._itl_counts) are exactly the gaps of
    the token times (``_itl``), and give the same statistics."""
    from sim.metrics import _itl, _itl_counts, _stats, _weighted_stats

    ends = [e.steps.column("end_s") for e in outcome.engines]
    values, counts = _itl_counts(outcome, ends)
    gaps = _itl(records.token_offsets, records.token_times_s,
                records.columns["status"] == "ok")
    assert np.array_equal(np.sort(np.repeat(values, counts)), np.sort(gaps))
    if gaps.size:
        want, got = _stats(gaps), _weighted_stats(values, counts)
        assert [got[k] for k in ("p50", "p90", "p99")] == [want[k] for k in ("p50", "p90", "p99")]
        assert got["mean"] == pytest.approx(want["mean"], rel=1e-12)
