"""Sample an engine's Prometheus ``/metrics`` during a replay.

A background thread GETs the endpoint every ``interval_s`` (1-3 Hz is enough to see queues
build and drain) and appends what it read to a JSONL file at once, so a crash keeps every
sample taken. Exposition text is parsed with prometheus-client's parser. Counters are
compared as deltas between a snapshot before and after the replay; gauges are kept as a
time series. Names differ per engine; ``CANONICAL`` maps each to one vocabulary:

* vLLM: vllm-project/vllm:vllm/v1/metrics/loggers.py @ v0.33.0
* SGLang: sgl-project/sglang:python/sglang/srt/observability/metrics_collector.py @ v0.5.23
* llama.cpp: ggml-org/llama.cpp:tools/server/server-context.cpp (``llamacpp:`` families)
"""

from __future__ import annotations

import json
import threading
import time
import urllib.error
import urllib.request
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from prometheus_client.parser import text_string_to_metric_families

# canonical name -> the sample name(s) per engine (summed over label sets and names)
CANONICAL: dict[str, dict[str, str | tuple[str, ...]]] = {
    "vllm": {
        "prompt_tokens": "vllm:prompt_tokens_total",
        "generation_tokens": "vllm:generation_tokens_total",
        "prefix_cache_queries": "vllm:prefix_cache_queries_total",
        "prefix_cache_hits": "vllm:prefix_cache_hits_total",
        "num_preemptions": "vllm:num_preemptions_total",
        "requests_finished": "vllm:request_success_total",
        "num_steps": "vllm:iteration_tokens_total_count",
        "num_requests_running": "vllm:num_requests_running",
        "num_requests_waiting": "vllm:num_requests_waiting",
        "kv_cache_usage_perc": "vllm:kv_cache_usage_perc",
    },
    "sglang": {
        "prompt_tokens": "sglang:prompt_tokens_total",
        "generation_tokens": "sglang:generation_tokens_total",
        "prefix_cache_hits": "sglang:cached_tokens_total",
        "num_preemptions": "sglang:num_retracted_requests_total",
        "requests_finished": "sglang:num_requests_total",
        "num_requests_running": "sglang:num_running_reqs",
        "num_requests_waiting": "sglang:num_queue_reqs",
        "kv_cache_usage_perc": "sglang:token_usage",
    },
    "llamacpp": {
        # llama.cpp counts evaluated prompt tokens and slot-cache hits apart: a request's
        # prompt is their sum (measured: 200 + 2 evaluated, 200 cached, usage 200 and 202)
        "prompt_tokens": ("llamacpp:prompt_tokens_total", "llamacpp:prompt_tokens_cached_total"),
        "prefix_cache_queries": ("llamacpp:prompt_tokens_total",
                                 "llamacpp:prompt_tokens_cached_total"),
        "prefix_cache_hits": "llamacpp:prompt_tokens_cached_total",
        "generation_tokens": "llamacpp:tokens_predicted_total",
        "num_steps": "llamacpp:n_decode_total",
        "num_requests_running": "llamacpp:requests_processing",
        "num_requests_waiting": "llamacpp:requests_deferred",
    },
}
GAUGES = ("num_requests_running", "num_requests_waiting", "kv_cache_usage_perc")


class ScrapeError(Exception):
    pass


@dataclass
class Snapshot:
    """All samples of one scrape: sample name -> [(labels, value)]."""

    time_s: float
    samples: dict[str, list[tuple[dict[str, str], float]]] = field(default_factory=dict)

    def total(self, name: str) -> float | None:
        rows = self.samples.get(name)
        return None if rows is None else float(sum(v for _, v in rows))

    def canonical(self, engine: str) -> dict[str, float]:
        out = {}
        for canon, names in CANONICAL.get(engine, {}).items():
            values = [self.total(n) for n in ((names,) if isinstance(names, str) else names)]
            if all(v is not None for v in values):
                out[canon] = float(sum(v for v in values if v is not None))
        return out


def parse(text: str, time_s: float = 0.0) -> Snapshot:
    snap = Snapshot(time_s)
    for family in text_string_to_metric_families(text):
        for s in family.samples:
            if s.name.endswith("_created"):
                continue
            snap.samples.setdefault(s.name, []).append((dict(s.labels), float(s.value)))
    return snap


def quick_samples(text: str, names: set[str]) -> dict[str, list[tuple[dict[str, str], float]]]:
    """The samples named in ``names`` (labels dropped), for periodic sampling; `parse`
    is the full parser, for snapshots."""
    out: dict[str, list[tuple[dict[str, str], float]]] = {}
    for line in text.splitlines():
        if not line or line[0] == "#":
            continue
        cut = line.find("{")
        if cut < 0:
            cut = line.find(" ")
        name = line[:cut]
        if name in names:
            value = line[line.rfind("}") + 1:] if "}" in line else line[cut:]
            out.setdefault(name, []).append(({}, float(value.split()[0])))
    return out


def fetch(url: str, timeout_s: float = 5.0) -> str:
    try:
        with urllib.request.urlopen(url, timeout=timeout_s) as r:
            return str(r.read().decode("utf-8", errors="replace"))
    except (urllib.error.URLError, OSError) as e:
        raise ScrapeError(f"{url}: {getattr(e, 'reason', e)}") from None


def snapshot(url: str, clock: Callable[[], float] = time.perf_counter) -> Snapshot:
    t = clock()
    return parse(fetch(url), t)


def counter_deltas(before: Snapshot, after: Snapshot, engine: str) -> dict[str, float]:
    """Counters' growth over the replay, in canonical names (gauges excluded)."""
    b = before.canonical(engine)
    a = after.canonical(engine)
    return {k: a[k] - b.get(k, 0.0) for k in a if k not in GAUGES}


def engine_info(snap: Snapshot) -> dict[str, str]:
    """vLLM's resolved cache config (block size, GPU blocks, ...) from cache_config_info."""
    rows = snap.samples.get("vllm:cache_config_info")
    return dict(rows[0][0]) if rows else {}


class Scraper:
    """Samples ``url`` every ``interval_s`` in a thread until `stop`; writes JSONL rows
    ``{"time_s", "metric", "value"}`` (canonical gauges and counters) as it goes."""

    def __init__(self, url: str, engine: str, out_path: Path, interval_s: float = 0.5,
                 clock: Callable[[], float] = time.perf_counter, t0: float = 0.0,
                 worker_id: int = 0) -> None:
        self.url = url
        self.engine = engine
        self.out_path = Path(out_path)
        self.interval_s = interval_s
        self.clock = clock
        self.t0 = t0
        self.worker_id = worker_id
        self.num_samples = 0
        self.errors: list[str] = []
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._loop, name=f"scrape-{url}", daemon=True)

    def start(self) -> Scraper:
        self._thread.start()
        return self

    def stop(self) -> None:
        self._stop.set()
        self._thread.join(timeout=10.0)

    def _loop(self) -> None:
        # only the canonical samples are read, with a line filter instead of the full
        # parser: vLLM's exposition is ~1,000 lines of histogram buckets, and parsing it
        # all in this thread held the GIL long enough to delay the load generator's sends
        wanted = {n for v in CANONICAL.get(self.engine, {}).values()
                  for n in ((v,) if isinstance(v, str) else v)}
        with open(self.out_path, "a", encoding="utf-8") as out:
            while not self._stop.is_set():
                t_next = self.clock() + self.interval_s
                try:
                    t_read = self.clock()
                    snap = Snapshot(t_read, quick_samples(fetch(self.url), wanted))
                except (ScrapeError, ValueError) as e:
                    if len(self.errors) < 100:
                        self.errors.append(f"{self.clock() - self.t0:.3f} s: {e}")
                else:
                    t = round(snap.time_s - self.t0, 6)
                    for metric, value in snap.canonical(self.engine).items():
                        out.write(json.dumps({"time_s": t, "worker_id": self.worker_id,
                                              "metric": metric, "value": value}) + "\n")
                    out.flush()
                    self.num_samples += 1
                self._stop.wait(max(0.0, t_next - self.clock()))


def read_series(path: Path) -> Any:
    """The scraped rows as a DataFrame (time_s, worker_id, metric, value)."""
    import pandas as pd

    rows = []
    with open(path, encoding="utf-8") as f:
        for line in f:
            try:
                rows.append(json.loads(line))
            except json.JSONDecodeError:
                break  # a last line cut by a crash
    return pd.DataFrame(rows, columns=["time_s", "worker_id", "metric", "value"])
