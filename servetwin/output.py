"""Writing results: records, summary and the resolved scenario of one run."""

from __future__ import annotations

import json
import math
import os
from pathlib import Path
from typing import Any

import numpy as np
import yaml

from sim.errors import InputError
from sim.metrics import RECORD_COLUMNS, Records

STEPS_FILE = "steps.parquet"


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


def _list_column(offsets: np.ndarray, values: np.ndarray) -> Any:
    """A list<int64|float64> column from a ragged array (offsets len n+1)."""
    import pyarrow as pa

    pa_type = pa.float64() if values.dtype.kind == "f" else pa.int64()
    vals = np.ascontiguousarray(values, dtype=np.float64 if values.dtype.kind == "f"
                                else np.int64)
    child = pa.Array.from_buffers(pa_type, int(vals.size), [None, pa.py_buffer(vals)])
    if offsets[-1] < 2**31:
        offs = np.ascontiguousarray(offsets, dtype=np.int32)
        return pa.ListArray.from_buffers(pa.list_(pa_type), int(offs.size - 1),
                                         [None, pa.py_buffer(offs)], children=[child])
    offs = np.ascontiguousarray(offsets, dtype=np.int64)
    return pa.LargeListArray.from_buffers(pa.large_list(pa_type), int(offs.size - 1),
                                          [None, pa.py_buffer(offs)], children=[child])


def records_table(records: Records) -> Any:
    """One row per request. Simulated records carry their token times as steps
    (``token_steps``: the step ranges [a, b) of the request's worker it produced a
    token in, flat as a, b, a, b...; ``pre_token_times_s``: tokens timed on an earlier
    worker), their times in ``steps_table``; other records carry ``token_times_s``."""
    import pyarrow as pa

    cols = {name: records.columns[name] for name in RECORD_COLUMNS}
    arrays = {k: _column(v) for k, v in cols.items()}
    ts = records.token_steps
    if ts is None:
        arrays["token_times_s"] = _list_column(records.token_offsets, records.token_times_s)
    else:
        arrays["token_steps"] = _list_column(ts.roff, ts.ranges)
        arrays["pre_token_times_s"] = _list_column(ts.pre_off, ts.pre_times)
    arrays["reject_reason"] = _column([records.reject_reasons.get(int(i), "")
                                       for i in cols["request_id"]])
    return pa.Table.from_arrays(list(arrays.values()), names=list(arrays))


def steps_table(records: Records) -> Any:
    """The end time of every forward pass: (worker_id, step, end_s), worker by worker;
    a request's token in step k of worker w came at that row's end_s."""
    import pyarrow as pa

    ts = records.token_steps
    assert ts is not None
    ends = ts.step_ends
    sizes = [int(e.size) for e in ends]
    worker = np.repeat(np.arange(len(ends), dtype=np.int64), sizes)
    step = (np.arange(int(worker.size), dtype=np.int64)
            - np.repeat(np.concatenate(([0], np.cumsum(sizes)[:-1])).astype(np.int64), sizes))
    end = np.concatenate(ends) if ends else np.empty(0)
    return pa.Table.from_arrays([_column(worker), _column(step), _column(end)],
                                names=["worker_id", "step", "end_s"])


def write_records(path: Path, records: Records) -> list[Path]:
    """Parquet with one row per request, and for simulated records ``steps.parquet``
    beside it with the step end times their tokens point to; ``.csv`` gets the flat
    columns only. Returns the files written."""
    if path.suffix == ".csv":
        import pandas as pd

        df = pd.DataFrame({k: records.columns[k] for k in RECORD_COLUMNS})
        df["reject_reason"] = [records.reject_reasons.get(int(i), "") for i in df["request_id"]]
        tmp = path.with_name(path.name + ".tmp")
        df.to_csv(tmp, index=False)
        os.replace(tmp, path)
        return [path]
    import pyarrow.parquet as pq

    written = []
    if records.token_steps is not None:
        steps = path.with_name(STEPS_FILE)
        tmp = steps.with_name(steps.name + ".tmp")
        # byte-stream-split makes float columns compress at a fraction of plain zstd's
        # time (zstd level 1: the same size here as the default level, 15 % faster)
        pq.write_table(steps_table(records), tmp, compression="zstd", compression_level=1,
                       use_dictionary=False, column_encoding={
                           "worker_id": "DELTA_BINARY_PACKED", "step": "DELTA_BINARY_PACKED",
                           "end_s": "BYTE_STREAM_SPLIT"})
        os.replace(tmp, steps)
        written.append(steps)
    tmp = path.with_name(path.name + ".tmp")
    floats = ("pre_token_times_s" if records.token_steps is not None else "token_times_s")
    pq.write_table(records_table(records), tmp, compression="zstd", compression_level=1,
                   use_dictionary=["status", "reject_reason"],
                   column_encoding={floats: "BYTE_STREAM_SPLIT"})
    os.replace(tmp, path)
    return [path, *written]


def _one_line(e: BaseException) -> str:
    return " ".join(str(e).split()) or type(e).__name__


def read_records(path: str | os.PathLike[str]) -> Records:
    """A run's ``records.parquet`` (with its ``steps.parquet``) back as ``Records``,
    token times included: ``read_records(run_dir / "records.parquet").token_times_s``."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    from sim.metrics import TokenSteps

    path = Path(path)
    if path.is_dir():
        path = path / "records.parquet"
    try:
        t = pq.read_table(path)
    except (OSError, pa.ArrowException) as e:
        raise InputError(str(path), f"cannot read the records ({_one_line(e)})",
                         "give a run's records.parquet or its folder") from None
    names = set(t.column_names)
    need = [*RECORD_COLUMNS, "reject_reason"]
    need += ["token_times_s"] if "token_times_s" in names else ["token_steps",
                                                                "pre_token_times_s"]
    missing = [c for c in need if c not in names]
    if missing:
        raise InputError(str(path), f"no column {', '.join(missing)}",
                         "give a records.parquet that `servetwin simulate` wrote")
    cols: dict[str, np.ndarray] = {}
    for name in RECORD_COLUMNS:
        arr = t.column(name).to_numpy()
        cols[name] = arr.astype(object) if name == "status" else arr
    reasons = {int(i): str(r) for i, r in zip(cols["request_id"],
                                              t.column("reject_reason").to_pylist(),
                                              strict=True) if r}

    def ragged(name: str, dtype: type) -> tuple[np.ndarray, np.ndarray]:
        col = t.column(name).combine_chunks()
        off = np.asarray(col.offsets, dtype=np.int64)
        vals: np.ndarray = np.asarray(col.values.to_numpy(zero_copy_only=False), dtype=dtype)
        return off - off[0], vals[off[0]:off[-1]]

    if "token_times_s" in names:
        off, times = ragged("token_times_s", np.float64)
        return Records(cols, off, times, reasons)
    steps_path = path.with_name(STEPS_FILE)
    try:
        steps = pq.read_table(steps_path, columns=["worker_id", "end_s"])
    except (OSError, pa.ArrowException) as e:
        raise InputError(str(steps_path), "cannot read the step times the records' "
                         f"token_steps point to ({_one_line(e)})",
                         "keep steps.parquet beside records.parquet, as the run wrote "
                         "them") from None
    worker = steps.column("worker_id").to_numpy()
    end = steps.column("end_s").to_numpy()
    n_workers = int(max(worker.max(initial=-1), cols["worker_id"].max(initial=-1))) + 1
    bounds = np.searchsorted(worker, np.arange(n_workers + 1))
    ends = [end[bounds[w]:bounds[w + 1]] for w in range(n_workers)]
    roff, ranges = ragged("token_steps", np.int64)
    pre_off, pre = ragged("pre_token_times_s", np.float64)
    ts = TokenSteps(ends, cols["worker_id"], roff, ranges, pre_off, pre)
    return Records(cols, np.concatenate(([0], np.cumsum(ts.counts()))), None, reasons,
                   None, ts)


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
