"""records.parquet's table, built from buffers, equals pyarrow's own conversion; the
simulator's token times, written as step ranges + steps.parquet, read back exactly."""

from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from servetwin.output import read_records, records_table, write_records
from sim.errors import InputError
from sim.metrics import RECORD_COLUMNS, Records
from tests.sim.factories import make_trace
from tests.sim.test_disagg import run_pd


def test_records_table_equals_pyarrow_conversion(tmp_path: Path) -> None:
    n = 4
    cols = {name: np.arange(n, dtype=np.int64) for name in RECORD_COLUMNS}
    cols["arrival_s"] = np.array([0.0, 0.5, 1.25, 2.0])
    cols["first_token_s"] = np.array([0.1, np.nan, 1.5, 2.5])
    cols["finish_s"] = np.array([0.9, np.nan, 1.75, 3.0])
    cols["status"] = np.array(["ok", "rejected", "ok", "ok"], dtype=object)
    offsets = np.array([0, 3, 3, 4, 6])
    times = np.array([0.1, 0.5, 0.9, 1.5, 2.5, 3.0])
    reasons = {1: "prompt 9000 + output 10 tokens > max_model_len 8192 — ünïcode"}
    table = records_table(Records(cols, offsets, times, reasons))
    want = {k: pa.array(v.tolist() if v.dtype == object else v) for k, v in cols.items()}
    want["token_times_s"] = pa.ListArray.from_arrays(pa.array(offsets.astype(np.int32)),
                                                     pa.array(times))
    want["reject_reason"] = pa.array(["", reasons[1], "", ""], type=pa.string())
    expected = pa.table(want)
    assert table.schema.equals(expected.schema)
    for name in expected.column_names:
        got, exp = table.column(name), expected.column(name)
        if pa.types.is_floating(exp.type):  # NaN != NaN for equals(): compare as numpy
            np.testing.assert_array_equal(got.to_numpy(), exp.to_numpy())
            assert got.null_count == exp.null_count == 0
        else:
            assert got.equals(exp), name
    table.validate(full=True)
    assert table.column("token_times_s")[1].as_py() == []
    # measured records (no steps) round-trip through the token_times_s column
    (path,) = write_records(tmp_path / "records.parquet", Records(cols, offsets, times, reasons))
    back = read_records(path)
    assert back.token_offsets.tolist() == offsets.tolist()
    assert back.token_times_s.tolist() == times.tolist()
    assert back.reject_reasons == reasons


def _token_times_by_hand(outcome) -> list[list[float]]:
    """Each request's token times from its own token_steps and pre_token_times."""
    out = []
    for r in outcome.requests:
        ends = outcome.engines[r.worker_id].steps.column("end_s")
        t = list(r.pre_token_times)
        for j in range(0, len(r.token_steps), 2):
            t.extend(ends[r.token_steps[j]:r.token_steps[j + 1]].tolist())
        out.append(t)
    return out


@pytest.mark.parametrize("ff", [False, True])
def test_token_steps_round_trip_with_disaggregated_prefill(tmp_path: Path, ff: bool) -> None:
    # P/D: the first token of each request is timed on the prefill worker (pre tokens),
    # the rest on a decode worker; a small KV cache makes some requests preempted, so
    # some have several step ranges
    trace = make_trace([0.0, 0.5, 1.0, 1.5, 2.0, 9.0], [8, 30, 12, 40, 9, 5],
                       [3, 60, 1, 70, 50, 4])
    _, outcome, rec = run_pd(trace, fast_forward=ff)
    want = _token_times_by_hand(outcome)
    assert any(len(r.pre_token_times) for r in outcome.requests)
    assert any(len(r.token_steps) > 2 for r in outcome.requests)  # a preempted request
    off = rec.token_offsets
    assert [rec.token_times_s[off[i]:off[i + 1]].tolist() for i in range(len(rec))] == want
    paths = write_records(tmp_path / "records.parquet", rec)
    assert [p.name for p in paths] == ["records.parquet", "steps.parquet"]
    steps = pq.read_table(tmp_path / "steps.parquet").to_pydict()
    assert steps["worker_id"] == sorted(steps["worker_id"])
    assert len(steps["end_s"]) == sum(e.steps.num_steps for e in outcome.engines)
    back = read_records(paths[0])
    assert back.token_offsets.tolist() == off.tolist()
    assert back.token_times_s.tolist() == rec.token_times_s.tolist()
    for name in RECORD_COLUMNS:
        a, b = rec.columns[name], back.columns[name]
        if a.dtype.kind == "f":
            np.testing.assert_array_equal(a, b)
        else:
            assert a.tolist() == b.tolist(), name


def test_read_records_errors_name_the_file_and_the_fix(tmp_path: Path) -> None:
    trace = make_trace([0.0, 1.0], [8, 8], [3, 3])
    _, _, rec = run_pd(trace)
    write_records(tmp_path / "records.parquet", rec)
    assert read_records(tmp_path).token_times_s.size == 6  # a run folder is accepted too
    (tmp_path / "steps.parquet").unlink()
    with pytest.raises(InputError, match=r"steps\.parquet: cannot read the step times .*Fix: "
                                         r"keep steps\.parquet beside records\.parquet"):
        read_records(tmp_path / "records.parquet")
    (tmp_path / "records.parquet").write_text("not parquet")
    with pytest.raises(InputError, match=r"records\.parquet: cannot read the records .*Fix: give"):
        read_records(tmp_path / "records.parquet")
    pq.write_table(pa.table({"request_id": [1]}), tmp_path / "records.parquet")
    with pytest.raises(InputError, match=r"no column arrival_s, .*Fix: give a records\.parquet"):
        read_records(tmp_path / "records.parquet")
