"""TimingProfile.finish_s: the host's time to end a finished request, paid by the engine's
next step (less any idle time between them), the same in both engines and in both modes."""

from __future__ import annotations

import numpy as np
import pytest

from sim.catalog import load_gpu, load_model
from sim.engines.sglang import SglangConfig
from sim.engines.vllm import VllmConfig
from sim.timing import RooflineTiming, TimingProfile
from tests.sim.factories import (
    LinearTiming,
    assert_same_records,
    drive,
    make_engine,
    make_request,
    make_trace,
    run_cluster,
)
from tests.sim.test_sglang_ff import assert_same, run_sglang


def _ends(finish_s: float, arrivals=(0.0, 0.0)) -> list[float]:
    timing = LinearTiming(base=1.0, per_prefill_token=0.0, per_decode_seq=0.0,
                          finish_s=finish_s)
    eng = make_engine(num_blocks=40, max_num_batched_tokens=64, timing=timing)
    reqs = [make_request(0, 4, 1, arrivals[0]), make_request(1, 4, 3, arrivals[1])]
    return [plan.end_s for _, plan in drive(eng, reqs)]


def test_the_step_after_a_finish_pays_it() -> None:
    # step 1 prefills both; request 0 ends with its first token, so step 2 (request 1's
    # second token) runs 0.25 s longer; step 3 pays nothing
    assert _ends(0.0) == [1.0, 2.0, 3.0]
    assert _ends(0.25) == [1.0, 2.25, 3.25]


def test_an_idle_engine_absorbs_it() -> None:
    timing = LinearTiming(base=1.0, per_prefill_token=0.0, per_decode_seq=0.0, finish_s=0.5)
    for gap, pays in ((3.0, 0.0), (0.2, 0.3)):
        eng = make_engine(num_blocks=40, max_num_batched_tokens=64, timing=timing)
        reqs = [make_request(0, 4, 1, 0.0), make_request(1, 4, 1, 1.0 + gap)]
        ends = [plan.end_s for _, plan in drive(eng, reqs)]
        assert ends == pytest.approx([1.0, 1.0 + gap + 1.0 + pays])


def test_roofline_carries_the_profiles_finish_s() -> None:
    t = RooflineTiming(load_model("llama-3.1-8b"), load_gpu("h100-sxm"), 1, "bf16",
                       TimingProfile(finish_s=2e-3))
    assert t.finish_s == 2e-3
    assert RooflineTiming(load_model("llama-3.1-8b"), load_gpu("h100-sxm"), 1).finish_s == 0.0


def _trace(seed: int):
    rng = np.random.default_rng(seed)
    n = 40
    return make_trace(np.sort(rng.uniform(0, 30, n)).tolist(),
                      rng.integers(8, 200, n).tolist(), rng.integers(1, 60, n).tolist())


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_vllm_fast_forward_equals_step_by_step_with_it(seed: int) -> None:
    cfg = VllmConfig(max_num_seqs=6, max_num_batched_tokens=256, num_gpu_blocks=400,
                     block_size=16, max_model_len=10_000)
    timing = LinearTiming(base=0.02, per_prefill_token=1e-4, per_decode_seq=1e-3,
                          per_context=1e-6, finish_s=7e-3)
    _, step = run_cluster(_trace(seed), cfg, 2, False, timing)
    _, ff = run_cluster(_trace(seed), cfg, 2, True, timing)
    assert_same_records(step, ff)
    _, none = run_cluster(_trace(seed), cfg, 2, True, LinearTiming(
        base=0.02, per_prefill_token=1e-4, per_decode_seq=1e-3, per_context=1e-6))
    # and it is paid: requests end later than without it
    delay = ff.columns["finish_s"] - none.columns["finish_s"]
    assert delay.sum() > 0 and delay.max() >= 7e-3 - 1e-12


@pytest.mark.parametrize("seed", [0, 1])
def test_sglang_fast_forward_equals_step_by_step_with_it(seed: int) -> None:
    cfg = SglangConfig(max_running_requests=6, chunked_prefill_size=256, max_total_tokens=6400,
                       page_size=16, max_model_len=10_000)
    timing = LinearTiming(base=0.02, per_prefill_token=1e-4, per_decode_seq=1e-3,
                          per_context=1e-6, finish_s=7e-3)
    step = run_sglang(_trace(seed), cfg, 2, False, timing)
    assert_same(step, run_sglang(_trace(seed), cfg, 2, True, timing))
    none = run_sglang(_trace(seed), cfg, 2, False, LinearTiming(
        base=0.02, per_prefill_token=1e-4, per_decode_seq=1e-3, per_context=1e-6))
    assert (step[1].columns["finish_s"] - none[1].columns["finish_s"]).sum() > 0
