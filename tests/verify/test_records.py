"""verify.records: the measured record on disk and its way into sim.metrics."""

from __future__ import annotations

import json
import math

import numpy as np
import pytest

from sim.errors import InputError
from sim.metrics import summarize
from verify.records import (
    RECORD_KEYS,
    RecordWriter,
    encode_record,
    read_records,
    to_sim_records,
    write_meta,
)


def make_row(rid: int, *, send: float = 1.0, times: tuple[float, ...] = (1.1, 1.2, 1.4),
             status: str = "ok", usage_out: int | None = 3, cached: int | None = 16,
             error: str | None = None) -> dict:
    return {
        "request_id": rid, "endpoint": "http://127.0.0.1:1", "worker_id": rid % 2,
        "intended_s": send - 0.01, "send_s": send,
        "first_token_s": times[0] if times else None, "finish_s": (times or (send,))[-1],
        "event_times_s": list(times), "num_events": len(times),
        "expected_prompt_tokens": 40, "expected_output_tokens": 3,
        "num_prompt_tokens": 40 if usage_out is not None else None,
        "num_output_tokens": usage_out, "num_cached_tokens": cached,
        "finish_reason": "length" if status == "ok" else None,
        "http_status": 200, "status": status, "error": error,
    }


def test_writer_flushes_each_line_at_once(tmp_path):
    path = tmp_path / "records.jsonl"
    w = RecordWriter(path)
    w.write(make_row(0))
    # readable before close: a killed client keeps every finished record
    assert [r["request_id"] for r in read_records(path)] == [0]
    w.write(make_row(1))
    assert len(path.read_text().splitlines()) == 2
    w.close()
    assert w.num_written == 2


def test_encode_record_is_json_with_microsecond_times():
    row = make_row(7, times=(1.23456789, 2.0))
    row["send_s"] = 0.1 + 0.2
    text = encode_record(row)
    back = json.loads(text)
    assert list(back) == list(RECORD_KEYS)
    assert back["event_times_s"] == [1.234568, 2.0]
    assert back["send_s"] == 0.3
    assert back["error"] is None and back["num_cached_tokens"] == 16
    assert json.loads(encode_record({"x": math.nan, "e": 'say "hi"'})) == {"x": None,
                                                                            "e": 'say "hi"'}


def test_encode_record_formats_runs_of_equal_times_like_single_ones():
    # times of one socket read repeat; each run is formatted once, NaN is null
    times = [0.5] * 3 + [1.0000004] * 2 + [math.nan, math.nan, 2.25, 2.25]
    back = json.loads(encode_record({"event_times_s": times, "e": "é", "e2": "é"}))
    assert back["event_times_s"] == [0.5] * 3 + [1.0] * 2 + [None, None, 2.25, 2.25]
    assert back["e"] == back["e2"] == "é"


def test_read_records_skips_a_truncated_last_line_and_says_so(tmp_path):
    path = tmp_path / "records.jsonl"
    lines = [encode_record(make_row(i)) for i in range(2)]
    path.write_text(lines[0] + "\n" + lines[1] + "\n" + lines[1][:25])
    warnings: list[str] = []
    rows = read_records(path, warnings)
    assert [r["request_id"] for r in rows] == [0, 1]
    assert len(warnings) == 1 and "records.jsonl:3: truncated last line ignored" in warnings[0]


def test_read_records_refuses_a_bad_line_in_the_middle(tmp_path):
    path = tmp_path / "records.jsonl"
    path.write_text(encode_record(make_row(0)) + "\n{oops\n" + encode_record(make_row(1)) + "\n")
    with pytest.raises(InputError, match=r"records.jsonl:2: not a JSON record"):
        read_records(path)


def test_to_sim_records_maps_rows_to_the_simulator_columns():
    rows = [
        make_row(2, send=2.0, times=(2.1, 2.3)),
        make_row(0, send=1.0, times=(1.1, 1.2, 1.4), usage_out=None, cached=None),
        make_row(1, send=1.5, times=(1.6,), status="error", error="timeout: no event for 1 s"),
    ]
    rec = to_sim_records(rows)
    c = rec.columns
    assert c["request_id"].tolist() == [0, 1, 2]
    assert c["arrival_s"].tolist() == [1.0, 1.5, 2.0]
    assert c["first_token_s"].tolist() == [1.1, 1.6, 2.1]
    assert c["finish_s"].tolist() == [1.4, 1.6, 2.3]
    # no usage: output tokens are the events, prompt tokens the expected ones, cached 0
    assert c["num_output_tokens"].tolist() == [3, 3, 3]
    assert c["num_prompt_tokens"].tolist() == [40, 40, 40]
    assert c["num_cached_tokens"].tolist() == [0, 16, 16]
    assert c["worker_id"].tolist() == [0, 1, 0]
    assert c["num_preemptions"].tolist() == [0, 0, 0]
    assert c["status"].tolist() == ["ok", "error", "ok"]
    assert rec.token_offsets.tolist() == [0, 3, 4, 6]
    assert rec.token_times_s.tolist() == [1.1, 1.2, 1.4, 1.6, 2.1, 2.3]
    assert rec.reject_reasons == {1: "timeout: no event for 1 s"}
    s = summarize(rec)
    assert (s["num_completed"], s["num_rejected"]) == (2, 1)
    assert s["ttft_s"]["mean"] == pytest.approx(0.1)  # (0.1 + 0.1) / 2, error row excluded
    assert s["itl_s"]["mean"] == pytest.approx((0.1 + 0.2 + 0.2) / 3)


def test_to_sim_records_intended_arrival_counts_client_lag():
    rec = to_sim_records([make_row(0, send=1.0)], arrival="intended")
    assert rec.columns["arrival_s"].tolist() == [pytest.approx(0.99)]
    with pytest.raises(ValueError, match="arrival"):
        to_sim_records([], arrival="finish")


def test_to_sim_records_of_nothing():
    rec = to_sim_records([])
    assert len(rec) == 0 and rec.token_offsets.tolist() == [0]
    assert rec.token_times_s.dtype == np.float64


def test_write_meta_replaces_the_file_whole(tmp_path):
    path = tmp_path / "meta.json"
    write_meta(path, {"seed": 1})
    write_meta(path, {"seed": 2, "endpoints": ["http://x"]})
    assert json.loads(path.read_text()) == {"seed": 2, "endpoints": ["http://x"]}
    assert not list(tmp_path.glob("*.tmp"))
