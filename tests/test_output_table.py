"""records.parquet's table, built from buffers, equals pyarrow's own conversion."""

import numpy as np
import pyarrow as pa

from servetwin.output import records_table
from sim.metrics import RECORD_COLUMNS, Records


def test_records_table_equals_pyarrow_conversion() -> None:
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
