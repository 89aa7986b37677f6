"""Parsing /metrics exposition text, counter deltas, and the sampling thread."""

from __future__ import annotations

import http.server
import threading
import time
from pathlib import Path

from verify.scrape import Scraper, counter_deltas, engine_info, parse, read_series

VLLM_TEXT = """\
# HELP vllm:num_requests_running Number of requests in model execution batches.
# TYPE vllm:num_requests_running gauge
vllm:num_requests_running{{engine="0",model_name="tiny"}} {running}
# TYPE vllm:kv_cache_usage_perc gauge
vllm:kv_cache_usage_perc{{engine="0",model_name="tiny"}} 0.25
# TYPE vllm:prompt_tokens counter
vllm:prompt_tokens_total{{engine="0",model_name="tiny"}} {prompt}
vllm:prompt_tokens_created{{engine="0",model_name="tiny"}} 1.7e+09
# TYPE vllm:request_success counter
vllm:request_success_total{{engine="0",finished_reason="length",model_name="tiny"}} {ok}
vllm:request_success_total{{engine="0",finished_reason="stop",model_name="tiny"}} 1.0
# TYPE vllm:cache_config_info gauge
vllm:cache_config_info{{block_size="16",engine="0",num_gpu_blocks="8192"}} 1.0
# TYPE vllm:iteration_tokens_total histogram
vllm:iteration_tokens_total_bucket{{engine="0",le="1.0",model_name="tiny"}} 3.0
vllm:iteration_tokens_total_count{{engine="0",model_name="tiny"}} {steps}
vllm:iteration_tokens_total_sum{{engine="0",model_name="tiny"}} 100.0
"""


def text(running: int = 0, prompt: float = 0, ok: float = 0, steps: float = 0) -> str:
    return VLLM_TEXT.format(running=running, prompt=prompt, ok=ok, steps=steps)


def test_parse_sums_label_sets_and_skips_created() -> None:
    snap = parse(text(running=3, prompt=120, ok=4, steps=9))
    c = snap.canonical("vllm")
    assert c == {"prompt_tokens": 120.0, "requests_finished": 5.0, "num_steps": 9.0,
                 "num_requests_running": 3.0, "kv_cache_usage_perc": 0.25}
    assert "vllm:prompt_tokens_created" not in snap.samples


def test_counter_deltas_exclude_gauges() -> None:
    before = parse(text(running=1, prompt=100, ok=1, steps=10))
    after = parse(text(running=0, prompt=350, ok=6, steps=40))
    assert counter_deltas(before, after, "vllm") == {"prompt_tokens": 250.0,
                                                     "requests_finished": 5.0, "num_steps": 30.0}


def test_engine_info_reads_the_resolved_cache_config() -> None:
    info = engine_info(parse(text()))
    assert info["num_gpu_blocks"] == "8192" and info["block_size"] == "16"


def test_scraper_samples_a_live_endpoint_into_jsonl(tmp_path: Path) -> None:
    state = {"n": 0}

    class H(http.server.BaseHTTPRequestHandler):
        def do_GET(self) -> None:
            state["n"] += 1
            body = text(running=state["n"], prompt=10 * state["n"]).encode()
            self.send_response(200)
            self.send_header("Content-Type", "text/plain")
            self.end_headers()
            self.wfile.write(body)

        def log_message(self, *a: object) -> None:
            pass

    srv = http.server.ThreadingHTTPServer(("127.0.0.1", 0), H)
    threading.Thread(target=srv.serve_forever, daemon=True).start()
    try:
        url = f"http://127.0.0.1:{srv.server_address[1]}/metrics"
        s = Scraper(url, "vllm", tmp_path / "m.jsonl", interval_s=0.05, t0=time.perf_counter())
        s.start()
        time.sleep(0.5)
        s.stop()
    finally:
        srv.shutdown()
    df = read_series(tmp_path / "m.jsonl")
    running = df[df.metric == "num_requests_running"]
    assert s.num_samples >= 4 and len(running) == s.num_samples
    assert running.value.tolist() == sorted(running.value.tolist())  # rising, as served
    assert (running.time_s.diff().dropna() > 0.03).all()  # about every 50 ms
    assert s.errors == []


def test_scraper_records_errors_instead_of_dying(tmp_path: Path) -> None:
    s = Scraper("http://127.0.0.1:9/metrics", "vllm", tmp_path / "m.jsonl", interval_s=0.05)
    s.start()
    time.sleep(0.2)
    s.stop()
    assert s.num_samples == 0 and s.errors and "127.0.0.1:9" in s.errors[0]


def test_llamacpp_prompt_tokens_add_evaluated_and_cached() -> None:
    # measured on llama-server: a 200-token prompt, then the same plus 2 tokens
    snap = parse("llamacpp:prompt_tokens_total 202\nllamacpp:prompt_tokens_cached_total 200\n"
                 "llamacpp:tokens_predicted_total 6\nllamacpp:requests_processing 0\n")
    c = snap.canonical("llamacpp")
    assert c["prompt_tokens"] == 402 and c["prefix_cache_hits"] == 200
    assert c["prefix_cache_queries"] == 402 and c["generation_tokens"] == 6


def test_quick_samples_agree_with_the_full_parser() -> None:
    from verify.scrape import CANONICAL, Snapshot, quick_samples

    body = text(running=3, prompt=120, ok=4, steps=9)
    names = {n for v in CANONICAL["vllm"].values() for n in ((v,) if isinstance(v, str) else v)}
    assert Snapshot(0.0, quick_samples(body, names)).canonical("vllm") == \
        parse(body).canonical("vllm")
