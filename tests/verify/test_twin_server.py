"""verify.twin_server and `servetwin twin-serve`: a real server process, real HTTP."""

from __future__ import annotations

import http.client
import json
import signal
import time
from urllib.parse import urlsplit

import numpy as np
import pytest
from prometheus_client.parser import text_string_to_metric_families

from verify.twin_server import FixedTiming, TwinProcess, is_faulty

VLLM_FAMILIES = {
    "vllm:num_requests_running": "gauge", "vllm:num_requests_waiting": "gauge",
    "vllm:kv_cache_usage_perc": "gauge", "vllm:prompt_tokens": "counter",
    "vllm:generation_tokens": "counter", "vllm:prefix_cache_queries": "counter",
    "vllm:prefix_cache_hits": "counter", "vllm:num_preemptions": "counter",
    "vllm:request_success": "counter", "vllm:time_to_first_token_seconds": "histogram",
    "vllm:e2e_request_latency_seconds": "histogram",
}


def request(url: str, method: str, path: str, body: object = None,
            headers: dict[str, str] | None = None) -> tuple[int, bytes]:
    u = urlsplit(url)
    conn = http.client.HTTPConnection(u.hostname, u.port, timeout=30)
    try:
        data = None if body is None else json.dumps(body).encode()
        conn.request(method, path, body=data, headers=headers or {})
        resp = conn.getresponse()
        return resp.status, resp.read()
    finally:
        conn.close()


def complete(url: str, prompt: object, max_tokens: int = 5, stream: bool = True,
             **extra: object) -> tuple[int, bytes, float]:
    t = time.perf_counter()
    status, body = request(url, "POST", "/v1/completions",
                           {"model": "m", "prompt": prompt, "max_tokens": max_tokens,
                            "stream": stream, "stream_options": {"include_usage": True},
                            **extra})
    return status, body, time.perf_counter() - t


def sse_payloads(body: bytes) -> list[str]:
    events = body.decode().split("\n\n")
    assert events[-1] == ""
    assert all(e.startswith("data: ") for e in events[:-1])
    return [e[len("data: "):] for e in events[:-1]]


def metrics(url: str) -> dict[str, float]:
    """Sample name (with labels but model_name/engine) -> value, for sums over a run."""
    status, body = request(url, "GET", "/metrics")
    assert status == 200
    out: dict[str, float] = {}
    for fam in text_string_to_metric_families(body.decode()):
        for s in fam.samples:
            extra = {k: v for k, v in s.labels.items() if k not in ("model_name", "engine")}
            out[s.name + (json.dumps(extra, sort_keys=True) if extra else "")] = s.value
    return out


@pytest.fixture(scope="module")
def twin():
    with TwinProcess("--step-ms", "5", "--max-model-len", "4096", "--model", "twin-m") as tw:
        yield tw


def test_health_models_and_banner(twin):
    status, body = request(twin.url, "GET", "/health")
    info = json.loads(body)
    assert status == 200 and info["status"] == "ok"
    assert info["note"] == "a test instrument, not evidence of fidelity"
    assert "fixed: 5 ms per step" in info["timing"]
    status, body = request(twin.url, "GET", "/v1/models")
    assert json.loads(body)["data"][0]["id"] == "twin-m"


def test_stream_has_one_event_per_token_then_usage_and_done(twin):
    status, body, _ = complete(twin.url, list(range(100, 137)), max_tokens=6)
    assert status == 200
    payloads = sse_payloads(body)
    assert payloads[-1] == "[DONE]"
    chunks = [json.loads(p) for p in payloads[:-1]]
    tokens = [c for c in chunks if c["choices"]]
    assert len(tokens) == 6
    assert [c["choices"][0]["finish_reason"] for c in tokens] == [None] * 5 + ["length"]
    assert all(c["model"] == "twin-m" for c in chunks)
    usage = chunks[-1]
    assert usage["choices"] == []
    assert usage["usage"]["prompt_tokens"] == 37
    assert usage["usage"]["completion_tokens"] == 6
    assert usage["usage"]["prompt_tokens_details"] == {"cached_tokens": 0}


def test_no_usage_chunk_unless_asked(twin):
    _status, body = request(twin.url, "POST", "/v1/completions",
                           {"prompt": [1, 2, 3], "max_tokens": 2, "stream": True})
    payloads = sse_payloads(body)
    assert len(payloads) == 3 and payloads[-1] == "[DONE]"


def test_non_streaming_answer(twin):
    status, body, _ = complete(twin.url, [[5, 6, 7, 8]], max_tokens=3, stream=False)
    out = json.loads(body)
    assert status == 200
    assert out["choices"][0]["finish_reason"] == "length"
    assert out["usage"]["completion_tokens"] == 3 and out["usage"]["prompt_tokens"] == 4


@pytest.mark.parametrize(("body", "message"), [
    ({"prompt": "hello", "max_tokens": 3}, "list of token ids"),
    ({"prompt": [1, "a"], "max_tokens": 3}, "integer token ids"),
    ({"prompt": [1, -2], "max_tokens": 3}, "must be >= 0"),
    ({"prompt": [1, 2], "max_tokens": 0}, "max_tokens = 0"),
    ({"prompt": list(range(4090)), "max_tokens": 10}, "maximum context length is 4096"),
    ([1, 2], "JSON object"),
])
def test_bad_requests_get_a_clear_400(twin, body, message):
    status, out = request(twin.url, "POST", "/v1/completions", body)
    assert status == 400
    err = json.loads(out)["error"]
    assert message in err["message"] and err["code"] == 400


def test_repeated_prefix_hits_the_cache_in_full_blocks(twin):
    prompt = list(range(2000, 2040))  # 2 full blocks of 16 and 8 tokens
    before = metrics(twin.url)
    complete(twin.url, prompt, max_tokens=2)
    _status, body, _ = complete(twin.url, [*prompt[:39], 9], max_tokens=2)
    usage = json.loads(sse_payloads(body)[-2])["usage"]
    assert usage["prompt_tokens_details"]["cached_tokens"] == 32
    after = metrics(twin.url)
    assert after["vllm:prefix_cache_hits_total"] - before["vllm:prefix_cache_hits_total"] == 32
    assert (after["vllm:prefix_cache_queries_total"]
            - before["vllm:prefix_cache_queries_total"]) == 80
    assert after["vllm:prompt_tokens_total"] - before["vllm:prompt_tokens_total"] == 80
    assert after["vllm:generation_tokens_total"] - before["vllm:generation_tokens_total"] == 4
    key = 'vllm:request_success_total{"finished_reason": "length"}'
    assert after[key] - before[key] == 2


def test_metrics_carry_vllm_names_and_labels(twin):
    _, body = request(twin.url, "GET", "/metrics")
    fams = {f.name: f for f in text_string_to_metric_families(body.decode())}
    for name, kind in VLLM_FAMILIES.items():
        assert fams[name].type == kind, name
        for s in fams[name].samples:
            assert s.labels["model_name"] == "twin-m"


def test_steps_take_their_simulated_time(twin):
    # 5 ms per step: the prefill step gives token 1, nine decode steps the rest
    _, body, wall = complete(twin.url, list(range(300, 320)), max_tokens=10)
    assert len(sse_payloads(body)) == 12
    assert 0.045 <= wall <= 0.5


def test_an_arrival_cuts_a_decode_run(twin):
    """A short request that arrives during a long decode run joins at the next step,
    not when the run would have ended (sim.cluster's cut)."""
    import threading

    results: dict[str, float] = {}

    def long() -> None:
        results["long"] = complete(twin.url, list(range(400, 420)), max_tokens=150)[2]

    th = threading.Thread(target=long)
    th.start()
    time.sleep(0.25)
    _, body, wall = complete(twin.url, list(range(500, 520)), max_tokens=2)
    th.join()
    assert len(sse_payloads(body)) == 4
    assert wall < 0.25  # two steps of 5 ms and the step in flight; the run had 0.5 s left
    assert results["long"] >= 0.7


def test_time_scale_and_roofline_timing():
    with TwinProcess("--step-ms", "5", "--time-scale", "3") as tw:
        _, _, wall = complete(tw.url, [1, 2, 3], max_tokens=10)
        assert 0.14 <= wall <= 0.6  # 10 steps x 5 ms x 3
    with TwinProcess("--sim-model", "Qwen/Qwen3-8B", "--gpu", "H100") as tw:
        info = json.loads(request(tw.url, "GET", "/health")[1])
        assert info["timing"].startswith("roofline prior: ")
        status, body, _ = complete(tw.url, list(range(64)), max_tokens=4)
        assert status == 200 and len(sse_payloads(body)) == 6


def test_sigterm_stops_the_server_cleanly():
    tw = TwinProcess("--step-ms", "1")
    tw.proc.send_signal(signal.SIGTERM)
    assert tw.proc.wait(10) == 0
    tw.stop()
    with open(tw.log_path) as f:
        assert "servetwin twin-serve: stopped" in f.read()


def test_fault_selection_rule():
    assert [k for k in range(8) if is_faulty(k, 0.5)] == [1, 3, 5, 7]
    assert [k for k in range(6) if is_faulty(k, 1.0)] == list(range(6))
    assert [k for k in range(6) if is_faulty(k, 0.0)] == []
    assert sum(is_faulty(k, 0.25) for k in range(100)) == 25


def test_fixed_timing_runs_equal_single_steps():
    t = FixedTiming(0.002, 1e-5)
    assert t.step_time(10, 0.0, 1, 3, 100) == pytest.approx(0.002 + 13e-5)
    run = t.decode_run_times(4, 50, 5)
    assert np.array_equal(run, np.full(5, t.step_time(0, 0.0, 0, 4, 50)))
    with pytest.raises(ValueError):
        FixedTiming(0.0, 0.0)


def test_block_ids_are_reused_when_they_run_out():
    """Four ids for 2-block prompts: new prompts reuse ids that no cached block holds,
    and a prompt seen a moment ago still hits."""
    with TwinProcess("--step-ms", "1", "--max-hash-ids", "4", "--num-gpu-blocks", "4") as tw:
        for i in range(6):
            assert complete(tw.url, list(range(100 * i, 100 * i + 33)), max_tokens=1)[0] == 200
        _, body, _ = complete(tw.url, list(range(500, 533)), max_tokens=1)
        usage = json.loads(sse_payloads(body)[-2])["usage"]
        assert usage["prompt_tokens_details"]["cached_tokens"] == 32
        info = json.loads(request(tw.url, "GET", "/health")[1])
        assert info["num_hash_ids_exhausted"] == 0
