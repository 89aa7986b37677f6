"""Writing results: records, summary and the resolved scenario of one run."""

from __future__ import annotations

import json
import math
import os
from pathlib import Path
from typing import Any

import numpy as np
import yaml

from sim.metrics import RECORD_COLUMNS, Records


def _clean(x: Any) -> Any:
    if isinstance(x, dict):
        return {k: _clean(v) for k, v in x.items()}
    if isinstance(x, list | tuple):
        return [_clean(v) for v in x]
    if isinstance(x, float) and not math.isfinite(x):
        return None
    if isinstance(x, np.integer):
        return int(x)
    if isinstance(x, np.floating):
        return _clean(float(x))
    return x


def _atomic_write(path: Path, data: bytes) -> None:
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_bytes(data)
    os.replace(tmp, path)


def write_summary(path: Path, summary: dict[str, Any]) -> None:
    text = json.dumps(_clean(summary), indent=2, sort_keys=True) + "\n"
    _atomic_write(path, text.encode())


def write_yaml(path: Path, data: dict[str, Any]) -> None:
    _atomic_write(path, yaml.safe_dump(_clean(data), sort_keys=False).encode())


def _column(values: np.ndarray | list[str]) -> Any:
    """A pyarrow array built from buffers: ``pa.array`` would import pandas (a
    quarter of a second, a tenth of a whole default run) to inspect its input."""
    import pyarrow as pa

    if isinstance(values, list) or values.dtype == object:
        data = [str(v).encode() for v in values]
        offsets = np.zeros(len(data) + 1, dtype=np.int64)
        np.cumsum([len(b) for b in data], out=offsets[1:])
        big = offsets[-1] >= 2**31
        return pa.Array.from_buffers(
            pa.large_string() if big else pa.string(), len(data),
            [None, pa.py_buffer(offsets if big else offsets.astype(np.int32)),
             pa.py_buffer(b"".join(data))])
    kinds = {"i": (np.int64, pa.int64()), "u": (np.int64, pa.int64()),
             "f": (np.float64, pa.float64())}
    dtype, pa_type = kinds[values.dtype.kind]  # records hold ints, floats and strings
    buf = np.ascontiguousarray(values, dtype=dtype)
    return pa.Array.from_buffers(pa_type, int(buf.size), [None, pa.py_buffer(buf)])


def records_table(records: Records) -> Any:
    import pyarrow as pa

    cols = {name: records.columns[name] for name in RECORD_COLUMNS}
    arrays = {k: _column(v) for k, v in cols.items()}
    off = records.token_offsets
    times = np.ascontiguousarray(records.token_times_s, dtype=np.float64)
    values = pa.Array.from_buffers(pa.float64(), int(times.size), [None, pa.py_buffer(times)])
    if off[-1] < 2**31:
        offs = np.ascontiguousarray(off, dtype=np.int32)
        arrays["token_times_s"] = pa.ListArray.from_buffers(
            pa.list_(pa.float64()), int(offs.size - 1), [None, pa.py_buffer(offs)],
            children=[values])
    else:
        offs = np.ascontiguousarray(off, dtype=np.int64)
        arrays["token_times_s"] = pa.LargeListArray.from_buffers(
            pa.large_list(pa.float64()), int(offs.size - 1), [None, pa.py_buffer(offs)],
            children=[values])
    arrays["reject_reason"] = _column([records.reject_reasons.get(int(i), "")
                                       for i in cols["request_id"]])
    return pa.Table.from_arrays(list(arrays.values()), names=list(arrays))


def write_records(path: Path, records: Records) -> Path:
    """Parquet with one row per request; ``.csv`` gets the flat columns only."""
    if path.suffix == ".csv":
        import pandas as pd

        df = pd.DataFrame({k: records.columns[k] for k in RECORD_COLUMNS})
        df["reject_reason"] = [records.reject_reasons.get(int(i), "") for i in df["request_id"]]
        tmp = path.with_name(path.name + ".tmp")
        df.to_csv(tmp, index=False)
        os.replace(tmp, path)
        return path
    import pyarrow.parquet as pq

    tmp = path.with_name(path.name + ".tmp")
    # token times: byte-stream-split makes float columns compress (20 MB, not 32 MB,
    # for the Mooncake trace) at a fraction of plain zstd's time
    # (zstd level 1: the same size here as the default level, 15 % faster)
    pq.write_table(records_table(records), tmp, compression="zstd", compression_level=1,
                   use_dictionary=["status", "reject_reason"],
                   column_encoding={"token_times_s": "BYTE_STREAM_SPLIT"})
    os.replace(tmp, path)
    return path


def format_summary(summary: dict[str, Any]) -> str:
    lines = []
    s = summary

    def row(label: str, value: str) -> None:
        lines.append(f"  {label:<34}{value}")

    lines.append("Requests")
    row("completed / total", f"{s['num_completed']:,} / {s['num_requests']:,}"
        + (f"  ({s['num_rejected']:,} rejected)" if s["num_rejected"] else ""))
    row("duration (simulated)", f"{s['duration_s']:,.2f} s")
    row("request throughput", f"{s['request_throughput_per_s']:.3f} req/s")
    row("output token throughput", f"{s['output_throughput_tokens_per_s']:,.1f} tok/s")
    row("total token throughput", f"{s['total_throughput_tokens_per_s']:,.1f} tok/s")
    row("prefix cache hit rate", f"{100 * s['prefix_cache_hit_rate']:.2f} %")
    row("preemptions", f"{s['num_preemptions']:,}")
    eng = s.get("engine")
    if eng:
        row("KV usage mean / max", f"{100 * eng['kv_usage_mean']:.1f} % / "
            f"{100 * eng['kv_usage_max']:.1f} %")
        row("forward passes", f"{eng['num_forward_passes']:,}")
    dis = s.get("disaggregation")
    if dis:
        row("KV handoffs", f"{dis['num_handoffs']:,}, {dis['handoff_bytes'] / 1e9:,.1f} GB, "
            f"mean {1e3 * dis['handoff_s_mean']:.2f} ms")
        busy = [v["busy_fraction"] for v in dis["links"].values()]
        if busy:
            row("link busy mean / max", f"{100 * sum(busy) / len(busy):.1f} % / "
                f"{100 * max(busy):.1f} % ({len(busy)} links)")
    off = s.get("offload")
    if off:
        tiers = ", ".join(f"{k} {100 * v['hit_rate']:.2f} %" for k, v in off["tiers"].items())
        row("prefix hits by tier", f"GPU {100 * off['gpu_hit_rate']:.2f} %, {tiers}")
    plan = s.get("planner")
    if plan:
        row("planner", f"{plan['num_scale_ups']} up, {plan['num_scale_downs']} down, "
            f"at most {plan['max_workers_booked']} workers")
        row("GPU-seconds", f"{plan['gpu_seconds']:,.0f}")
    lines.append("")
    stats = ("mean", "p50", "p90", "p99")
    table = {label: [f"{1000 * s[key][k]:,.2f}" for k in stats]
             for key, label in (("ttft_s", "TTFT"), ("tpot_s", "TPOT"), ("itl_s", "ITL"),
                                ("e2e_s", "E2E"))}
    w = max(10, 2 + max(len(v) for vals in table.values() for v in vals))  # columns apart
    lines.append(f"  {'latency (ms)':<14}" + "".join(f"{k:>{w}}" for k in stats))
    for label, vals in table.items():
        lines.append(f"  {label:<14}" + "".join(f"{v:>{w}}" for v in vals))
    unc = s.get("uncertainty")
    if unc:
        lines.append("")
        lines.append(f"  90 % band from {unc['source']}'s intervals (every pass at its "
                     "interval's fast / slow end)")
        for key, label in (("ttft_s", "TTFT"), ("tpot_s", "TPOT"), ("e2e_s", "E2E")):
            if key in unc:
                cells = "".join(f"{p} {1e3 * b['low']:,.1f}-{1e3 * b['high']:,.1f}  "
                                for p, b in unc[key].items())
                lines.append(f"  {label:<6}{cells.rstrip()} ms")
    return "\n".join(lines)
