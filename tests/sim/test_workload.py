"""Tests of sim/workload: loaders, Trace operations, synthetic generators."""

from __future__ import annotations

import gzip
import itertools
import json
import math
import os
import re
import time
from datetime import datetime, timedelta
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from hypothesis import HealthCheck, assume, given, settings
from hypothesis import strategies as st

from sim.errors import TraceError
from sim.workload import (
    ClosedLoop,
    FixedLength,
    LognormalLength,
    PrefixGroups,
    Sessions,
    SyntheticSpec,
    Trace,
    UniformLength,
    gamma_arrivals,
    load_azure,
    load_mooncake,
    load_trace,
    poisson_arrivals,
    synthesize,
)

TRACES = Path(__file__).resolve().parents[2] / "scenarios" / "traces"
MOONCAKE = TRACES / "mooncake_conversation.jsonl.gz"
AZURE_HEAD = TRACES / "azure_conv_head.csv"
AZURE_HEADER = "TIMESTAMP,ContextTokens,GeneratedTokens"


def make_trace(
    arrival_s: list[float],
    outputs: list[int] | None = None,
    hashes: list[list[int]] | None = None,
    sessions: list[int] | None = None,
    block_tokens: int = 16,
) -> Trace:
    """Rows with input i*10+10 tokens (so any <= ceil(input/16) hash ids fit)."""
    n = len(arrival_s)
    hashes = hashes if hashes is not None else [[] for _ in range(n)]
    return Trace.checked(
        arrival_s=arrival_s,
        input_tokens=[10 * (i + 1) for i in range(n)],
        output_tokens=outputs or [i + 1 for i in range(n)],
        hash_offsets=np.cumsum([0] + [len(h) for h in hashes]),
        hash_ids=[x for h in hashes for x in h],
        hash_block_tokens=block_tokens,
        session_ids=sessions,
        source="hand",
    )


def write(path: Path, content: str | bytes) -> Path:
    path.write_bytes(content.encode() if isinstance(content, str) else content)
    return path


def blocks(trace: Trace) -> list[list[int]]:
    return [trace.hash_ids_of(i).tolist() for i in range(len(trace))]


# ------------------------------------------------------------------ bundled traces


def test_bundled_mooncake_conversation_trace() -> None:
    trace = load_mooncake(MOONCAKE)
    assert len(trace) == 12_031
    assert trace.arrival_s[-1] - trace.arrival_s[0] == pytest.approx(3536.999, abs=1e-9)
    assert trace.hash_ids_of(0)[0] == 0
    assert trace.hash_ids_of(0).tolist() == list(range(14))  # input 6758 -> 14 blocks
    assert (np.diff(trace.hash_offsets) == -(-trace.input_tokens // 512)).all()
    assert trace.input_tokens.mean() == pytest.approx(12_035.06, abs=0.01)
    assert trace.output_tokens.mean() == pytest.approx(342.62, abs=0.01)
    assert trace.hash_block_tokens == 512
    assert (trace.session_ids == -1).all()
    assert trace.notes == ()
    assert trace.source == str(MOONCAKE)


def test_bundled_azure_head() -> None:
    trace = load_azure(AZURE_HEAD)
    assert len(trace) == 2000
    # 18:15:46.6805900, 18:15:50.9951690, 18:15:51.2224670
    assert trace.arrival_s[:3].tolist() == [0.0, 4.314579, 4.541877]
    assert trace.input_tokens[:3].tolist() == [374, 396, 879]
    assert trace.output_tokens[:3].tolist() == [44, 109, 55]
    assert trace.hash_block_tokens == 0 and trace.hash_ids.size == 0
    assert trace.hash_offsets.tolist() == [0] * 2001
    assert trace.notes == ()


def test_load_trace_chooses_the_format(tmp_path: Path) -> None:
    assert len(load_trace(MOONCAKE)) == 12_031
    assert len(load_trace(AZURE_HEAD)) == 2000
    line = '{"timestamp": 5, "input_length": 3, "output_length": 2}\n'
    assert load_trace(write(tmp_path / "a.txt", line)).arrival_s.tolist() == [0.005]
    csv = f"{AZURE_HEADER}\n2023-11-16 18:15:46.5,3,2"
    assert load_trace(write(tmp_path / "b.log", csv)).input_tokens.tolist() == [3]
    gz = write(tmp_path / "c.csv.gz", gzip.compress(csv.encode()))
    assert load_trace(gz).output_tokens.tolist() == [2]
    with pytest.raises(TraceError, match=r"b\.log:1: not valid JSON: Expecting value"):
        load_trace(tmp_path / "b.log", format="mooncake")
    with pytest.raises(TraceError, match=r"format cannot be told.*format='mooncake'"):
        load_trace(write(tmp_path / "d.dat", "hello"))
    with pytest.raises(TraceError, match='format = "parquet": must be one of auto, azure, '):
        load_trace(MOONCAKE, format="parquet")


# ----------------------------------------------------------------- Mooncake loader

GOOD = {"timestamp": 0, "input_length": 600, "output_length": 7, "hash_ids": [0, 1]}


def mooncake_lines(n: int) -> list[dict[str, Any]]:
    return [dict(GOOD, timestamp=1000 * i, hash_ids=[0, i + 1]) for i in range(n)]


def test_mooncake_fields_blank_lines_and_extras(tmp_path: Path) -> None:
    rows = mooncake_lines(3)
    rows[1] = {
        "timestamp": 1500.5,
        "input_length": 1,
        "output_length": 1,
        "extra": "x",
        "session_id": 4,
    }
    text = "\n".join(json.dumps(r) for r in rows[:2]) + "\n\n  \n" + json.dumps(rows[2]) + "\n\n"
    trace = load_mooncake(write(tmp_path / "t.jsonl", text))
    assert trace.arrival_s.tolist() == [0.0, 1.5005, 2.0]
    assert blocks(trace) == [[0, 1], [], [0, 3]]
    assert trace.session_ids.tolist() == [-1, 4, -1]
    assert trace.hash_block_tokens == 512


def test_mooncake_error_names_file_line_field_value_and_fix(tmp_path: Path) -> None:
    rows = [json.dumps(r) for r in mooncake_lines(20)]
    rows[16] = rows[16].replace('"input_length": 600', '"input_length": -3')
    path = write(tmp_path / "conv.jsonl", "\n".join(rows))
    with pytest.raises(TraceError) as caught:
        load_mooncake(path)
    assert str(caught.value) == (
        f"{path}:17: field 'input_length' = -3: must be an integer in "
        "[1, 10000000]. Fix: correct or remove the line"
    )


@pytest.mark.parametrize(
    ("line", "message"),
    [
        (
            '{"timestamp": 0, "input_length": true, "output_length": 1}',
            "field 'input_length' = true: must be an integer",
        ),
        ('{"timestamp": 0, "input_length": 5}', "field 'output_length' is missing"),
        (
            '{"timestamp": NaN, "input_length": 5, "output_length": 1}',
            "field 'timestamp' = NaN: must be milliseconds in",
        ),
        (
            '{"timestamp": 0, "input_length": 10000001, "output_length": 1}',
            "field 'input_length' = 10000001: must be",
        ),
        (
            '{"timestamp": 0, "input_length": 5, "output_length": 1, "hash_ids": [0, 1]}',
            "field 'hash_ids' has 2 ids but input_length 5 fills only 1 blocks of 512 tokens",
        ),
        (
            '{"timestamp": 0, "input_length": 5, "output_length": 1, "hash_ids": [false]}',
            r"field 'hash_ids'\[0\] = false: must be an integer",
        ),
        ("[1, 2]", "the line is a JSON list, not an object"),
        ('{"timestamp": 0, "input_length": 5,', "not valid JSON: Expecting property name"),
    ],
)
def test_mooncake_bad_second_line(tmp_path: Path, line: str, message: str) -> None:
    path = write(tmp_path / "x.jsonl", json.dumps(GOOD) + "\n" + line + "\n")
    with pytest.raises(TraceError, match=re.escape(f"{path}:2: ") + message):
        load_mooncake(path)


def test_mooncake_unsorted_names_both_lines_and_values(tmp_path: Path) -> None:
    rows = mooncake_lines(3)
    rows[2]["timestamp"] = 999
    path = write(tmp_path / "u.jsonl", "\n".join(json.dumps(r) for r in rows))
    with pytest.raises(TraceError) as caught:
        load_mooncake(path)
    assert str(caught.value) == (
        f"{path}:3: field 'timestamp' = 999 is earlier than 1000 on line 2: a trace must be "
        "sorted by timestamp. Fix: sort the lines by timestamp"
    )


def test_unreadable_files(tmp_path: Path) -> None:
    with pytest.raises(TraceError, match=r"nope\.jsonl: cannot be read"):
        load_mooncake(tmp_path / "nope.jsonl")
    broken = write(tmp_path / "b.jsonl.gz", gzip.compress(b'{"a": 1}\n' * 50)[:-9])
    with pytest.raises(TraceError, match="is not a readable gzip file"):
        load_mooncake(broken)
    with pytest.raises(TraceError, match=r"e\.jsonl: the file is empty"):
        load_mooncake(write(tmp_path / "e.jsonl", "\n \n"))
    with pytest.raises(TraceError, match=r"latin\.jsonl:2: byte 0xe9 is not UTF-8"):
        load_mooncake(write(tmp_path / "latin.jsonl", b'{"a": 1}\n{"caf\xe9": 1}'))


# -------------------------------------------------------------------- Azure loader


def test_azure_zero_output_is_counted_not_silent(tmp_path: Path) -> None:
    text = (
        f"{AZURE_HEADER}\r\n2023-11-16 18:15:46.6805900,374,0\r\n"
        "2023-11-16 18:15:47,10,3\r\n2023-11-16 18:15:47.5,10,0"
    )
    trace = load_azure(write(tmp_path / "z.csv", text))
    assert trace.arrival_s.tolist() == [0.0, 0.3194100, 0.8194100]
    assert trace.output_tokens.tolist() == [1, 3, 1]
    assert trace.notes == (
        f"{tmp_path / 'z.csv'}: 2 request(s) with GeneratedTokens = 0 "
        "(first on line 2) are simulated with 1 output token",
    )


def test_azure_columns_in_any_order(tmp_path: Path) -> None:
    text = "GeneratedTokens,x,TIMESTAMP,ContextTokens\n5,a,2023-11-16 18:00:00.0000000,9\n"
    trace = load_azure(write(tmp_path / "o.csv", text))
    assert (trace.input_tokens.tolist(), trace.output_tokens.tolist()) == ([9], [5])


@pytest.mark.parametrize(
    ("rows", "message"),
    [
        (
            ["2023-11-16 18:15:47.0,5,1", "2023-11-16 18:15:46.0,5,1"],
            "3: field 'TIMESTAMP' = 2023-11-16 18:15:46.0 is earlier than 2023-11-16 18:15:47.0 on "
            "line 2: a trace must be sorted by time",
        ),
        (
            ["2023-02-30 18:15:47.0,5,1"],
            "2: field 'TIMESTAMP' = \"2023-02-30 18:15:47.0\": must be",
        ),
        (["2023-11-16 18:15:47.0,0,1"], "2: field 'ContextTokens' = \"0\": must be an integer in"),
        (["2023-11-16 18:15:47.0,5,-1"], "2: field 'GeneratedTokens' = \"-1\": must be"),
        (["2023-11-16 18:15:47.0,5"], "2: the row has 2 fields, the header 3"),
    ],
)
def test_azure_bad_rows(tmp_path: Path, rows: list[str], message: str) -> None:
    path = write(tmp_path / "a.csv", "\n".join([AZURE_HEADER, *rows]))
    with pytest.raises(TraceError, match=re.escape(f"{path}:{message}")):
        load_azure(path)


def test_azure_bad_header_and_header_only(tmp_path: Path) -> None:
    with pytest.raises(TraceError, match=r"h\.csv:1: header \"TIMESTAMP,Context\" lacks column"):
        load_azure(write(tmp_path / "h.csv", "TIMESTAMP,Context\n2023-11-16 18:15:47,1,1"))
    with pytest.raises(
        TraceError,
        match=r"only\.csv:1: the header is followed by no request "
        "rows: the trace is empty",
    ):
        load_azure(write(tmp_path / "only.csv", AZURE_HEADER + "\n"))


# ---------------------------------------------------------------- Trace operations


def test_checked_rejects_bad_columns() -> None:
    with pytest.raises(TraceError, match=r"arrival_s\[2\] = 1.0: must be not before"):
        make_trace([0.0, 2.0, 1.0])
    with pytest.raises(TraceError, match="output_tokens must be a 1-D array of kind 'iu'"):
        make_trace([0.0], outputs=[1.5])  # type: ignore[list-item]
    with pytest.raises(TraceError, match=r"number of hash ids of request\[0\] = 2: must be"):
        make_trace([0.0], hashes=[[0, 1]])  # 10 tokens fill one block of 16
    trace = make_trace([0.0, 1.0])
    with pytest.raises(ValueError, match="read-only"):
        trace.arrival_s[0] = 5.0


def test_scaled() -> None:
    trace = make_trace([0.0, 1.0, 3.0], hashes=[[0], [1], [2]]).scaled(0.5)
    assert trace.arrival_s.tolist() == [0.0, 0.5, 1.5]
    assert blocks(trace) == [[0], [1], [2]]
    with pytest.raises(TraceError, match="time_scale = 0: must be a finite number > 0"):
        trace.scaled(0)


def test_sliced() -> None:
    trace = make_trace([0.0, 1.0, 2.0, 3.0, 4.0], hashes=[[0], [0, 1], [2], [], [3, 4]])
    window = trace.sliced(start_s=1.5, end_s=4.0)  # rows 2, 3; offsets from 1.5 kept
    assert window.arrival_s.tolist() == [0.5, 1.5]
    assert window.input_tokens.tolist() == [30, 40]
    assert blocks(window) == [[2], []]
    by_index = trace.sliced(start_index=1, max_requests=2)  # rows 1, 2; first arrives at 0
    assert by_index.arrival_s.tolist() == [0.0, 1.0]
    assert blocks(by_index) == [[0, 1], [2]]
    both = trace.sliced(start_s=1.0, start_index=1, max_requests=1)  # row 2, 1 s after start_s
    assert (both.arrival_s.tolist(), blocks(both)) == ([1.0], [[2]])
    head = trace.sliced(max_requests=2)
    assert head.arrival_s.tolist() == [0.0, 1.0]
    with pytest.raises(TraceError, match="keeps no requests"):
        trace.sliced(start_s=10.0)
    with pytest.raises(TraceError, match=re.escape("end_s = 1.0: must be > start_s = 2.0")):
        trace.sliced(start_s=2.0, end_s=1.0)


def test_with_output_scale_rounds_half_up_and_keeps_one() -> None:
    trace = make_trace([0.0] * 5, outputs=[1, 2, 3, 4, 5])
    assert trace.with_output_scale(1.5).output_tokens.tolist() == [2, 3, 5, 6, 8]
    assert trace.with_output_scale(0.1).output_tokens.tolist() == [1, 1, 1, 1, 1]
    with pytest.raises(TraceError, match="factor = -1: must be"):
        trace.with_output_scale(-1)


def test_with_input_scale_keeps_prefix_structure() -> None:
    # inputs 10, 20, 30 tokens; 16-token blocks -> x0.5 gives 8-token blocks
    trace = make_trace([0.0] * 3, hashes=[[0], [0, 1], [0, 1]])
    half = trace.with_input_scale(0.5)
    assert half.hash_block_tokens == 8
    assert half.input_tokens.tolist() == [5, 10, 15]
    assert half.hash_ids.tolist() == trace.hash_ids.tolist()
    assert not half.notes
    # x0.125: 2-token blocks; row 1 (20 -> 3 tokens) keeps 2 blocks, row 0 (10 -> 1)
    small = trace.with_input_scale(0.125)
    assert small.input_tokens.tolist() == [1, 3, 4]
    # a 17-token prompt with 2 blocks scaled by 1/16 rounds to 1 token: raised to 2
    two = Trace.checked(arrival_s=[0.0], input_tokens=[17], output_tokens=[1],
                        hash_offsets=[0, 2], hash_ids=[0, 1], hash_block_tokens=16)
    raised = two.with_input_scale(1 / 16)
    assert raised.input_tokens.tolist() == [2]
    assert raised.notes and "1 prompts raised" in raised.notes[0]
    with pytest.raises(TraceError, match="whole number of tokens"):
        trace.with_input_scale(0.3)


def test_merged_shifts_ids_and_sessions_and_is_stable() -> None:
    a = make_trace([0.0, 2.0], hashes=[[0], [1]], sessions=[0, -1])
    b = make_trace([0.0, 1.0], outputs=[7, 8], hashes=[[0], [5]], sessions=[0, 3])
    merged = a.merged(b)
    assert merged.arrival_s.tolist() == [0.0, 0.0, 1.0, 2.0]
    assert merged.output_tokens.tolist() == [1, 7, 8, 2]  # a's row first on the tie
    assert blocks(merged) == [[0], [2], [7], [1]]  # b shifted by max(a) + 1 = 2
    assert merged.session_ids.tolist() == [0, 1, 4, -1]
    assert merged.source == "hand + hand"
    assert blocks(a.merged(b, hash_id_shift=0)) == [[0], [0], [5], [1]]
    with pytest.raises(TraceError, match="cannot be merged"):
        a.merged(make_trace([0.0], hashes=[[0]], block_tokens=8))


def test_to_frame() -> None:
    frame = make_trace([0.0, 1.0], hashes=[[0], []]).to_frame()
    assert list(frame.columns) == [
        "arrival_s",
        "input_tokens",
        "output_tokens",
        "num_hash_blocks",
        "session_id",
    ]
    assert frame["num_hash_blocks"].tolist() == [1, 0]


# --------------------------------------------------------------- synthetic workloads


def spec(**changes: Any) -> SyntheticSpec:
    values: dict[str, Any] = {
        "rate_per_s": 10.0,
        "num_requests": 200,
        "input_tokens": UniformLength(100, 2000),
        "output_tokens": LognormalLength(200, 0.8, 1, 1000),
    }
    return SyntheticSpec(**(values | changes))


def columns(trace: Trace) -> list[np.ndarray]:
    return [
        trace.arrival_s,
        trace.input_tokens,
        trace.output_tokens,
        trace.hash_offsets,
        trace.hash_ids,
        trace.session_ids,
    ]


def test_same_seed_same_arrays_other_seed_differs() -> None:
    sessions = Sessions(20, 3, UniformLength(5, 50), 2.0, "exponential")
    for s in (
        spec(),
        spec(prefix=PrefixGroups(4, 1000, "zipf"), num_requests=None, sessions=sessions),
    ):
        a, b = synthesize(s, np.random.default_rng(7)), synthesize(s, np.random.default_rng(7))
        c = synthesize(s, np.random.default_rng(8))
        assert all(np.array_equal(x, y) for x, y in zip(columns(a), columns(b), strict=True))
        assert not np.array_equal(a.arrival_s, c.arrival_s)
        assert not np.array_equal(a.input_tokens, c.input_tokens)


def test_poisson_rate_and_gamma_burstiness() -> None:
    n, rate = 20_000, 5.0
    poisson = poisson_arrivals(np.random.default_rng(1), n, rate)
    assert n / poisson[-1] == pytest.approx(rate, rel=0.025)
    cv = [
        float(np.std(np.diff(a)) / np.mean(np.diff(a)))
        for a in (poisson, gamma_arrivals(np.random.default_rng(1), n, rate, 0.25))
    ]
    assert cv[0] == pytest.approx(1.0, abs=0.05)
    assert cv[1] > 1.5  # CV = 1/sqrt(burstiness) = 2
    rescaled = gamma_arrivals(np.random.default_rng(1), 100, rate, 0.5, rescale_to_rate=True)
    assert rescaled[-1] == pytest.approx(100 / rate, rel=1e-12)
    with pytest.raises(TraceError, match="rate_per_s = 0: must be a finite number > 0"):
        poisson_arrivals(np.random.default_rng(1), 5, 0)


def test_length_laws() -> None:
    rng = np.random.default_rng(3)
    assert FixedLength(7).sample(rng, 3).tolist() == [7, 7, 7]
    uniform = UniformLength(2, 4).sample(rng, 1000)
    assert set(uniform.tolist()) == {2, 3, 4}
    lognormal = LognormalLength(500, 0.5).sample(rng, 20_000)
    assert lognormal.mean() == pytest.approx(500, rel=0.03)
    assert LognormalLength(500, 2.0, 10, 600).sample(rng, 1000).max() == 600


def test_prefix_groups_share_exactly_the_full_prefix_blocks() -> None:
    trace = synthesize(
        spec(hash_block_tokens=512, prefix=PrefixGroups(3, 1500)), np.random.default_rng(0)
    )  # 1500 tokens: 2 full blocks shared
    by_first_block: dict[int, list[list[int]]] = {}
    for ids in blocks(trace):
        by_first_block.setdefault(ids[0], []).append(ids)
    assert len(by_first_block) == 3
    for group in by_first_block.values():
        assert all(ids[:2] == group[0][:2] for ids in group)
        assert len({ids[2] for ids in group}) == len(group)  # block 2 mixes in the suffix
    assert (np.diff(trace.hash_offsets) == -(-trace.input_tokens // 512)).all()
    assert blocks(trace)[0][:2] == [0, 1]  # ids numbered by first use, as in Mooncake


def test_prefix_hash_ids_by_hand() -> None:
    s = spec(
        num_requests=3,
        input_tokens=FixedLength(2),
        output_tokens=FixedLength(1),
        hash_block_tokens=4,
        prefix=PrefixGroups(1, 8),
    )
    assert blocks(synthesize(s, np.random.default_rng(0))) == [[0, 1, 2], [0, 1, 3], [0, 1, 4]]


def test_sessions_by_hand() -> None:
    s = spec(
        num_requests=None,
        input_tokens=FixedLength(5),
        output_tokens=FixedLength(2),
        hash_block_tokens=4,
        sessions=Sessions(1, 3, FixedLength(3), think_time_s=1.5),
    )
    trace = synthesize(s, np.random.default_rng(0))
    assert trace.input_tokens.tolist() == [5, 10, 15]  # prompt + output 2 + user 3 per turn
    assert blocks(trace) == [[0, 1], [0, 2, 3], [0, 2, 4, 5]]
    assert np.diff(trace.arrival_s).tolist() == pytest.approx([1.5, 1.5])
    assert trace.session_ids.tolist() == [0, 0, 0]


def test_session_turns_extend_the_previous_turn() -> None:
    s = spec(
        num_requests=None,
        prefix=PrefixGroups(2, 700),
        sessions=Sessions(
            30, 4, UniformLength(1, 600), think_time_s=3.0, think_time_kind="exponential"
        ),
    )
    trace = synthesize(s, np.random.default_rng(5))
    assert len(trace) == 120
    assert sorted(np.bincount(trace.session_ids).tolist()) == [4] * 30
    for session in range(30):
        rows = np.flatnonzero(trace.session_ids == session)  # in arrival order = turn order
        for prev, cur in itertools.pairwise(rows):
            full = int(trace.input_tokens[prev]) // 512
            assert trace.input_tokens[cur] > trace.input_tokens[prev] + trace.output_tokens[prev]
            assert trace.hash_ids_of(cur)[:full].tolist() == trace.hash_ids_of(prev)[:full].tolist()
            if trace.input_tokens[prev] % 512:  # the partial last block is never shared
                assert trace.hash_ids_of(cur)[full] != trace.hash_ids_of(prev)[full]


def test_zipf_prefers_the_first_group() -> None:
    s = spec(num_requests=3000, prefix=PrefixGroups(5, 512, "zipf", 1.2))
    trace = synthesize(s, np.random.default_rng(2))
    _, counts = np.unique(trace.hash_ids[trace.hash_offsets[:-1]], return_counts=True)
    assert len(counts) == 5  # the first block names the group
    assert counts.max() > 0.4 * 3000  # P(group 0) = 1 / sum(k ** -1.2, k=1..5) = 0.49


def test_synthetic_spec_from_mapping_and_errors() -> None:
    mapping: dict[str, Any] = {
        "rate_per_s": 2,
        "num_requests": 10,
        "arrival": "gamma",
        "burstiness": 0.5,
        "input_tokens": {"kind": "lognormal", "mean_tokens": 300, "sigma": 1.0},
        "output_tokens": 64,
        "prefix": {"num_groups": 2, "prefix_tokens": 600},
    }
    trace = synthesize(mapping, np.random.default_rng(0))
    assert len(trace) == 10 and set(trace.output_tokens.tolist()) == {64}
    cases: list[tuple[dict[str, Any], str]] = [
        ({"rate_per_s": -1}, "workload.synthetic.rate_per_s = -1: must be a finite number > 0"),
        (
            {"burstiness": 0.5, "arrival": "poisson"},
            "workload.synthetic.burstiness = 0.5: applies only to arrival: gamma",
        ),
        ({"colour": 1}, "workload.synthetic.colour: unknown key. Fix: valid keys are rate_per_s"),
        (
            {"output_tokens": {"kind": "uniform", "min_tokens": 9, "max_tokens": 3}},
            r"workload.synthetic.output_tokens.max_tokens = 3: must be an integer in \[9, ",
        ),
        ({"output_tokens": True}, "workload.synthetic.output_tokens = true: must be an integer"),
        ({"prefix": {"num_groups": 2}}, "workload.synthetic.prefix.prefix_tokens is missing"),
        (
            {"sessions": {"num_sessions": 2, "turns_per_session": 2, "user_tokens": 5}},
            "workload.synthetic.num_requests = 10: is set by sessions",
        ),
    ]
    for change, message in cases:
        with pytest.raises(TraceError, match=message):
            synthesize(mapping | change, np.random.default_rng(0))


def test_closed_loop() -> None:
    assert ClosedLoop(4) == ClosedLoop.from_mapping({"concurrency": 4})
    with pytest.raises(TraceError, match=r"workload\.closed_loop\.concurrency = 0: must be"):
        ClosedLoop(0)
    with pytest.raises(TraceError, match="num_requests = 0"):
        ClosedLoop(2, num_requests=0)


# ------------------------------------------------- malformed files (property tests)

BAD_LENGTHS: list[Any] = [
    0,
    -1,
    -3,
    10_000_001,
    10**30,
    1.5,
    2.0,
    True,
    False,
    None,
    "12",
    [],
    {},
    math.nan,
    math.inf,
]
BAD_STAMPS: list[Any] = [
    -1,
    -0.5,
    math.nan,
    math.inf,
    -math.inf,
    True,
    None,
    "0",
    [],
    {},
    1e16,
    10**400,
]
BAD_HASHES: list[Any] = [
    None,
    5,
    "0,1",
    {},
    True,
    [True],
    [-1],
    [1.0],
    ["1"],
    [None],
    [2**63],
    list(range(100)),
]
NOT_OBJECTS: list[Any] = [[], [1], 1, "x", None, True, 1.5]


@st.composite
def garbage_line(draw: st.DrawFn) -> bytes:
    raw = draw(st.binary(min_size=1, max_size=30))
    assume(raw.strip(b" \t\r\n"))  # an all-blank line is skipped, so it is not malformed
    return raw


@st.composite
def malformed_mooncake(draw: st.DrawFn) -> bytes:
    n = draw(st.integers(1, 5))
    gaps = draw(st.lists(st.integers(0, 5000), min_size=n, max_size=n))
    records: list[dict[str, Any]] = []
    next_id = 0
    for stamp, size in zip(
        np.cumsum(gaps).tolist(),
        draw(st.lists(st.integers(1, 5000), min_size=n, max_size=n)),
        strict=True,
    ):
        count = -(-size // 512)
        records.append(
            {
                "timestamp": stamp,
                "input_length": size,
                "output_length": draw(st.integers(1, 500)),
                "hash_ids": list(range(next_id, next_id + count)),
            }
        )
        next_id += count
    lines = [json.dumps(r).encode() for r in records]
    at = draw(st.integers(0, n - 1))
    kind = draw(
        st.sampled_from(
            ["truncate", "value", "missing", "not_object", "unsorted", "garbage", "empty"]
        )
    )
    if kind == "empty":
        return draw(st.sampled_from([b"", b"\n", b" \n\t\r\n\n"]))
    if kind == "truncate":
        lines[at] = lines[at][: draw(st.integers(1, len(lines[at]) - 1))]
    elif kind == "value":
        field = draw(st.sampled_from(["timestamp", "input_length", "output_length", "hash_ids"]))
        pool = {"timestamp": BAD_STAMPS, "hash_ids": BAD_HASHES}.get(field, BAD_LENGTHS)
        extra = (
            st.integers(max_value=-1)
            if field == "timestamp"
            else st.integers(min_value=10_000_001)
            if field != "hash_ids"
            else st.just([-5])
        )
        records[at][field] = draw(st.one_of(st.sampled_from(pool), extra))
        lines[at] = json.dumps(records[at]).encode()
    elif kind == "missing":
        del records[at][draw(st.sampled_from(["timestamp", "input_length", "output_length"]))]
        lines[at] = json.dumps(records[at]).encode()
    elif kind == "not_object":
        lines[at] = json.dumps(draw(st.sampled_from(NOT_OBJECTS))).encode()
    elif kind == "unsorted":
        lines.append(
            json.dumps(
                dict(records[-1], timestamp=records[-1]["timestamp"] - draw(st.integers(1, 10**6)))
            ).encode()
        )
    else:
        lines.insert(at, draw(garbage_line()))
    blank = draw(st.sampled_from([b"\n", b"\r\n", b"\n\n"]))
    content = blank.join(lines) + draw(st.sampled_from([b"", b"\n"]))
    assume(not content.startswith(b"\x1f\x8b"))  # would be read as (broken) gzip
    return content


def _stamp(start: datetime, offset_us: int) -> str:
    moment = start + timedelta(microseconds=offset_us)
    return f"{moment:%Y-%m-%d %H:%M:%S}.{moment.microsecond:06d}0"


BAD_STAMP_TEXT = [
    "",
    "2023-11-16",
    "2023-13-01 00:00:00.0",
    "2023-02-30 10:00:00.0",
    "yesterday",
    "2023-11-16T18:15:46.6805900",
    "NaT",
    "1600-01-01 00:00:00.0",
    "2023-11-16 25:00:00.0",
    "2023-11-16 18:15:46.1234567890",
    "9999-01-01 00:00:00",
]
BAD_COUNTS = [
    "-1",
    "-3",
    "1.5",
    "abc",
    "",
    "True",
    "nan",
    "inf",
    "99999999999",
    "10000001",
    "1e3",
    "+5",
    "0x10",
    "\u0661\u0662",
    "5 5",
]


@st.composite
def malformed_azure(draw: st.DrawFn) -> bytes:
    n = draw(st.integers(1, 5))
    offsets = np.cumsum(draw(st.lists(st.integers(0, 10**8), min_size=n, max_size=n))).tolist()
    start = datetime(2023, 11, 16, 18, 15, 46)
    rows = [
        [_stamp(start, off), str(draw(st.integers(1, 8000))), str(draw(st.integers(0, 900)))]
        for off in offsets
    ]
    at = draw(st.integers(0, n - 1))
    kind = draw(
        st.sampled_from(
            [
                "stamp",
                "count",
                "width",
                "unsorted",
                "header",
                "header_only",
                "garbage",
                "empty",
                "truncate",
            ]
        )
    )
    header = AZURE_HEADER
    if kind == "empty":
        return draw(st.sampled_from([b"", b"\n", b"\r\n \n"]))
    if kind == "stamp":
        rows[at][0] = draw(st.sampled_from(BAD_STAMP_TEXT))
    elif kind == "count":
        column = draw(st.sampled_from([1, 2]))
        pool = BAD_COUNTS + (["0"] if column == 1 else [])
        rows[at][column] = draw(
            st.one_of(st.sampled_from(pool), st.integers(max_value=-1).map(str))
        )
    elif kind == "width":
        rows[at] = rows[at][:2] if draw(st.booleans()) else [*rows[at], "7"]
    elif kind == "unsorted":
        rows.append([_stamp(start, offsets[-1] - draw(st.integers(1, 10**6))), "5", "5"])
    elif kind == "header":
        header = draw(
            st.sampled_from(
                [
                    "",
                    "time,in,out",
                    "TIMESTAMP,ContextTokens",
                    "timestamp,contexttokens,generatedtokens",
                ]
            )
        )
    elif kind == "header_only":
        rows = []
    elif kind == "truncate":  # cut before the last comma: a shorter number would still be one
        cut = ",".join(rows[at])
        rows[at] = [cut[: draw(st.integers(1, cut.rindex(",")))]]
    lines = [header.encode()] + [",".join(r).encode() for r in rows]
    if kind == "garbage":
        lines.insert(draw(st.integers(1, len(lines))), draw(garbage_line()))
    content = draw(st.sampled_from([b"\n", b"\r\n"])).join(lines)
    return content + draw(st.sampled_from([b"", b"\n"]))


@pytest.fixture(scope="module")
def scratch(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tmp_path_factory.mktemp("malformed")


def assert_located(error: TraceError, path: Path) -> None:
    text = str(error)
    assert re.search(re.escape(str(path)) + r":\d+: ", text) or (
        str(path) in text and "empty" in text
    ), text


PROPERTY = settings(
    max_examples=600,
    deadline=None,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.filter_too_much],
)


@PROPERTY
@given(content=malformed_mooncake(), auto=st.booleans())
def test_malformed_mooncake_always_located_trace_error(
    scratch: Path, content: bytes, auto: bool
) -> None:
    path = write(scratch / "bad trace.jsonl", content)
    with pytest.raises(TraceError) as caught:
        (load_trace if auto else load_mooncake)(path)
    assert_located(caught.value, path)


@PROPERTY
@given(content=malformed_azure(), auto=st.booleans())
def test_malformed_azure_always_located_trace_error(
    scratch: Path, content: bytes, auto: bool
) -> None:
    path = write(scratch / "bad trace.csv", content)
    with pytest.raises(TraceError) as caught:
        (load_trace if auto else load_azure)(path)
    assert_located(caught.value, path)


@settings(max_examples=100, deadline=None)
@given(n=st.integers(1, 6), data=st.data())
def test_wellformed_generated_files_load(scratch: Path, n: int, data: st.DataObject) -> None:
    """The generators above corrupt valid files: check the valid ones really are."""
    offsets = np.cumsum(data.draw(st.lists(st.integers(0, 10**8), min_size=n, max_size=n)))
    start = datetime(2023, 11, 16, 18, 15, 46)
    rows = [f"{_stamp(start, int(off))},{i + 1},{i}" for i, off in enumerate(offsets)]
    trace = load_azure(write(scratch / "ok.csv", "\n".join([AZURE_HEADER, *rows])))
    assert trace.arrival_s.tolist() == pytest.approx(((offsets - offsets[0]) / 1e6).tolist())
    stamps = np.cumsum(data.draw(st.lists(st.integers(0, 5000), min_size=n, max_size=n)))
    lines = [
        json.dumps(
            {"timestamp": int(t), "input_length": 600, "output_length": 1, "hash_ids": [0, i + 1]}
        )
        for i, t in enumerate(stamps)
    ]
    assert len(load_mooncake(write(scratch / "ok.jsonl", "\n".join(lines)))) == n


# ---------------------------------------------------------------------- benchmark


@pytest.mark.bench
def test_bench_load_bundled_trace() -> None:
    best_s = min(_timed(lambda: load_mooncake(MOONCAKE)) for _ in range(5))
    print(f"load_mooncake({MOONCAKE.name}): {best_s * 1000:.0f} ms (budget 300 ms)")
    assert best_s < 0.3


def _timed(action: Any) -> float:
    start = time.perf_counter()
    action()
    return time.perf_counter() - start


def test_rate_schedule_follows_the_piecewise_rate() -> None:
    from sim.workload import synthesize

    spec = {"rate_per_s": 2.0, "num_requests": 6000, "input_tokens": 100,
            "output_tokens": 10, "rate_schedule": [[0, 1.0], [600, 5.0], [900, 0.5]]}
    trace = synthesize(spec, np.random.default_rng(0))
    t = trace.arrival_s
    assert (np.diff(t) >= 0).all()
    # expected counts: 2/s x 600 s = 1200, then 10/s x 300 s = 3000, then 1/s after 900 s
    n1 = int(np.count_nonzero(t < 600))
    n2 = int(np.count_nonzero((t >= 600) & (t < 900)))
    assert abs(n1 - 1200) < 4 * 1200**0.5 and abs(n2 - 3000) < 4 * 3000**0.5
    rest = t[t >= 900]
    assert rest.size == 6000 - n1 - n2
    assert abs((rest[-1] - 900) - rest.size / 1.0) < 4 * rest.size**0.5


@pytest.mark.parametrize("schedule", [[[5, 1.0]], [[0, 1.0], [0, 2.0]], [[0, 0.0]],
                                      [[0, 1.0, 3]], "fast"])
def test_rate_schedule_errors_name_the_entry(schedule) -> None:
    from sim.errors import TraceError
    from sim.workload import synthesize

    spec = {"rate_per_s": 2.0, "num_requests": 10, "input_tokens": 100, "output_tokens": 10,
            "rate_schedule": schedule}
    with pytest.raises(TraceError) as e:
        synthesize(spec, np.random.default_rng(0))
    assert "rate_schedule" in str(e.value) and "Fix:" in str(e.value)


def test_a_trace_loaded_again_unchanged_is_not_parsed_again(tmp_path: Path) -> None:
    from sim.workload import loaders

    path = tmp_path / "t.jsonl"
    rows = [{"timestamp": 0, "input_length": 10, "output_length": 2, "hash_ids": [1]},
            {"timestamp": 5, "input_length": 600, "output_length": 3, "hash_ids": [1, 2]}]
    path.write_text("\n".join(json.dumps(r) for r in rows) + "\n")
    first = loaders.load_trace(path)
    assert loaders.load_trace(path) is first  # one parse per process for a screen's configs
    with pytest.raises(ValueError, match="read-only"):
        first.input_tokens[0] = 99  # shared, so nobody may change it
    rows[1]["input_length"] = 601
    path.write_text("\n".join(json.dumps(r) for r in rows) + "\n")
    t = time.time() + 5
    os.utime(path, (t, t))  # an edit within the clock's resolution still shows
    again = loaders.load_trace(path)
    assert again is not first and again.input_tokens.tolist() == [10, 601]
    assert loaders.load_trace(str(path)) is again
    other = loaders.load_trace(f"{tmp_path}/./t.jsonl")  # another spelling: its own name
    assert other is not again and other.source.endswith("/./t.jsonl")
