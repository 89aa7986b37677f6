"""Evaluate configs of a search space: one full-trace simulation each, in parallel,
checkpointed row by row so that a killed sweep resumes where it stopped.

A row is one flat dict per config: ``config_id``, ``knob.<field>`` for every swept
field, ``status`` (ok / infeasible / error) with ``reason``, ``num_gpus``, ``gpu``,
the summary's figures flattened (``ttft_s.p90``, ``output_throughput_tokens_per_s``,
...), ``goodput_per_s`` and ``wall_s``.
"""

from __future__ import annotations

import json
import os
import sys
import time
from collections.abc import Callable, Iterable
from concurrent.futures import FIRST_COMPLETED, ProcessPoolExecutor, wait
from pathlib import Path
from typing import Any

import numpy as np

from ..errors import ConfigError, InputError, ServetwinError
from ..metrics import Records
from ..scenario import validate_scenario
from ..simulate import resolve, simulate
from .space import SearchSpec, apply, config_id

Row = dict[str, Any]


# ------------------------------------------------------------- one config
def evaluate(base: dict[str, Any], base_path: str | None, overrides: dict[str, Any],
             budget_gpus: int | None, slo: dict[str, dict[str, float]]) -> Row:
    """Simulate one point of the space; infeasible configs get a reason, not a crash."""
    t0 = time.perf_counter()
    row: Row = {"config_id": config_id(overrides)}
    row.update({f"knob.{k}": v for k, v in overrides.items()})
    try:
        loaded = validate_scenario(apply(base, overrides), {},
                                   Path(base_path) if base_path else None, [])
        sc = loaded.scenario
        tp = sc.engine.tensor_parallel_size
        row["num_gpus"] = sc.cluster.num_workers * tp
        row["gpu"] = sc.gpu
        if budget_gpus is not None and row["num_gpus"] > budget_gpus:
            return _done(row, "infeasible", f"{sc.cluster.num_workers} workers x TP {tp} = "
                         f"{row['num_gpus']} GPUs > budget {budget_gpus}", t0)
        resolved = resolve(loaded)
        row["gpu"] = resolved.gpu.name
        need = resolved.trace.input_tokens + resolved.trace.output_tokens
        longest = int(need.max())
        if longest > resolved.engine.max_model_len:
            return _done(row, "infeasible", f"the KV cache holds {resolved.engine.max_model_len:,}"
                         f" tokens per request; the trace's longest request needs {longest:,} "
                         f"({int((need > resolved.engine.max_model_len).sum())} requests would "
                         "be refused)", t0)
        result = simulate(resolved)
    except ConfigError as e:
        return _done(row, "infeasible", str(e), t0)
    except InputError as e:
        return _done(row, "error", str(e), t0)
    _flatten(result.summary, "", row)
    row["num_gpu_blocks"] = resolved.engine.num_gpu_blocks
    row["goodput_per_s"] = goodput(result.records, slo, result.summary["duration_s"])
    return _done(row, "ok", "", t0)


def _done(row: Row, status: str, reason: str, t0: float) -> Row:
    row["status"] = status
    row["reason"] = reason
    row["wall_s"] = time.perf_counter() - t0
    return row


def _flatten(d: dict[str, Any], prefix: str, out: Row) -> None:
    for k, v in d.items():
        if k == "workers":
            continue
        if k == "engine" and isinstance(v, dict):
            _flatten(v, "", out)
        elif isinstance(v, dict):
            _flatten(v, f"{prefix}{k}.", out)
        else:
            out[f"{prefix}{k}"] = v


def goodput(records: Records, slo: dict[str, dict[str, float]], duration_s: float) -> float:
    """Requests meeting every per-request SLO per second (``vllm bench serve
    --goodput``: each bound is applied to each request's own TTFT, TPOT, E2E;
    an ITL bound, which has no per-request value, is not part of goodput)."""
    c = records.columns
    ok = c["status"] == "ok"
    ttft = c["first_token_s"] - c["arrival_s"]
    e2e = c["finish_s"] - c["arrival_s"]
    out = c["num_output_tokens"]
    with np.errstate(invalid="ignore", divide="ignore"):
        tpot = np.where(out > 1, (e2e - ttft) / np.maximum(out - 1, 1), 0.0)
    per_req = {"ttft_s": ttft, "tpot_s": tpot, "e2e_s": e2e}
    good = ok.copy()
    for metric, bounds in slo.items():
        if metric in per_req:
            good &= per_req[metric] <= min(bounds.values())
    return float(good.sum() / duration_s) if duration_s > 0 else 0.0


# -------------------------------------------------------------- checkpoint
class Checkpoint:
    """``results.jsonl``: one row per finished config, appended and flushed as it
    arrives. A torn last line (the process was killed mid-write) is ignored."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self.rows: dict[str, Row] = {}
        # a torn tail has no newline: the next row starts a new line, or it would be
        # glued to the tail and lost to the next resume
        self.torn = False
        if path.exists():
            data = path.read_bytes()
            self.torn = not data.endswith(b"\n") and len(data) > 0
            for line in data.decode("utf-8", errors="replace").splitlines():
                try:
                    row = json.loads(line)
                except json.JSONDecodeError:
                    continue
                if isinstance(row, dict) and "config_id" in row:
                    self.rows[row["config_id"]] = row

    def add(self, row: Row) -> None:
        line = json.dumps(row, sort_keys=True, default=_json_default)
        # keep the row as a resumed run reads it back (key order, plain types), so that
        # a resumed sweep's tables equal an uninterrupted one's, columns included
        self.rows[row["config_id"]] = json.loads(line)
        with self.path.open("a", encoding="utf-8") as f:
            f.write(("\n" if self.torn else "") + line + "\n")
            f.flush()
            os.fsync(f.fileno())
        self.torn = False


def _json_default(x: Any) -> Any:
    if isinstance(x, np.integer):
        return int(x)
    if isinstance(x, np.floating):
        return float(x)
    raise TypeError(f"not JSON serialisable: {type(x).__name__}")


# ---------------------------------------------------------------- progress
class Progress:
    def __init__(self, total: int, done: int, stream: Any = sys.stderr) -> None:
        self.total = total
        self.skipped = done
        self.done = 0
        self.t0 = time.monotonic()
        self.stream = stream

    def tick(self, row: Row) -> None:
        self.done += 1
        elapsed = time.monotonic() - self.t0
        rate = self.done / elapsed if elapsed > 0 else 0.0
        left = self.total - self.skipped - self.done
        eta = left / rate if rate > 0 else float("inf")
        status = row["status"] if row["status"] == "ok" else f"{row['status']}"
        self.stream.write(f"\r  {self.skipped + self.done}/{self.total} configs "
                          f"({rate * 60:.1f}/min, ETA {_hms(eta)}) last: {row['config_id']} "
                          f"{status}   ")
        self.stream.flush()

    def close(self) -> None:
        self.stream.write("\n")
        self.stream.flush()


def _hms(s: float) -> str:
    if not np.isfinite(s):
        return "--:--"
    s = int(s)
    return f"{s // 3600}:{s % 3600 // 60:02d}:{s % 60:02d}" if s >= 3600 else \
        f"{s // 60}:{s % 60:02d}"


# ---------------------------------------------------------------- executors
Evaluate = Callable[[dict[str, Any]], Row]


class LocalExecutor:
    """A process pool on this machine (default: one process per core)."""

    def __init__(self, max_workers: int | None = None) -> None:
        self.max_workers = max_workers or os.cpu_count() or 1

    def map_unordered(self, spec: SearchSpec, base_path: str | None,
                      points: list[dict[str, Any]]) -> Iterable[Row]:
        if self.max_workers == 1 or len(points) <= 1:
            for p in points:
                yield evaluate(spec.base, base_path, p, spec.budget_gpus, spec.slo)
            return
        pool = ProcessPoolExecutor(max_workers=self.max_workers)
        try:
            pending = {pool.submit(evaluate, spec.base, base_path, p, spec.budget_gpus,
                                   spec.slo) for p in points}
            while pending:
                done, pending = wait(pending, return_when=FIRST_COMPLETED)
                for fut in done:
                    yield fut.result()
        finally:
            # A stopped sweep (SIGTERM, Ctrl-C, an error) drops the configs not yet
            # started: the pool's default shutdown would run every one of them first,
            # for results nobody checkpoints.
            pool.shutdown(wait=True, cancel_futures=True)


class RayExecutor:
    """Ray tasks on a cluster (``address``) or a local Ray instance."""

    def __init__(self, address: str | None = None) -> None:
        try:
            import ray
        except ImportError:
            raise ServetwinError("the Ray executor needs Ray: pip install 'servetwin[ray]' "
                                 "(or pip install ray)") from None
        self.ray = ray
        if not ray.is_initialized():
            ray.init(address=address, include_dashboard=False, log_to_driver=False,
                     ignore_reinit_error=True)

    def map_unordered(self, spec: SearchSpec, base_path: str | None,
                      points: list[dict[str, Any]]) -> Iterable[Row]:
        ray = self.ray
        task = ray.remote(evaluate)
        pending = [task.remote(spec.base, base_path, p, spec.budget_gpus, spec.slo)
                   for p in points]
        try:
            while pending:
                done, pending = ray.wait(pending, num_returns=1)
                for ref in done:
                    yield ray.get(ref)
        finally:
            for ref in pending:  # a stopped sweep leaves no tasks running on the cluster
                ray.cancel(ref)


def make_executor(kind: str, address: str | None = None,
                  max_workers: int | None = None) -> LocalExecutor | RayExecutor:
    if kind == "local":
        return LocalExecutor(max_workers)
    if kind == "ray":
        return RayExecutor(address)
    raise ServetwinError(f"--executor {kind!r}: unknown. Fix: use local or ray")


def run_points(spec: SearchSpec, base_path: str | None, points: list[dict[str, Any]],
               executor: LocalExecutor | RayExecutor, checkpoint: Checkpoint,
               progress: bool = True) -> list[Row]:
    """Evaluate ``points`` not yet in the checkpoint; rows in the order of ``points``."""
    todo = [p for p in points if config_id(p) not in checkpoint.rows]
    bar = Progress(len(points), len(points) - len(todo)) if progress else None
    for row in executor.map_unordered(spec, base_path, todo):
        checkpoint.add(row)
        if bar:
            bar.tick(row)
    if bar:
        bar.close()
    return [checkpoint.rows[config_id(p)] for p in points]
