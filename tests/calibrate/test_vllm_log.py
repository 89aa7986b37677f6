"""vLLM's per-step log line, read off a real vLLM 0.32.0 log (tests/calibrate/data/)."""

from __future__ import annotations

import warnings
from pathlib import Path

import pytest

from calibrate.vllm_log import (
    STEP_COLUMNS,
    UnknownVersionWarning,
    count_lines,
    parse_lines,
    read_step_log,
)
from sim.errors import InputError

FIXTURE = Path(__file__).parent / "data" / "vllm-0.32.0-iterations.log"
GOOD = ("(APIServer pid=11849) INFO 11-26 22:00:40 [loggers.py:199] Engine 000: Iteration(3): "
        "1 context requests, 256 context tokens, 0 generation requests, 0 generation tokens, "
        "iteration elapsed time: 99.08 ms, CPU KV cache usage: 0.2%")


def test_real_lines_exact() -> None:
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        log = read_step_log(FIXTURE)
    assert log.version == "0.32.0"
    s = log.steps
    assert list(s.columns) == list(STEP_COLUMNS)
    rows = [tuple(r) for r in s[["iteration", "num_context_requests", "num_context_tokens",
                                 "num_generation_requests", "num_generation_tokens",
                                 "line"]].itertuples(index=False)]
    assert rows == [(0, 1, 40, 0, 0, 9), (1, 0, 0, 1, 1, 10), (2, 0, 0, 1, 1, 11),
                    (3, 1, 256, 0, 0, 13), (4, 1, 44, 0, 0, 14), (5, 0, 0, 1, 1, 15),
                    (6, 0, 0, 1, 1, 16)]
    assert s["elapsed_s"].tolist() == pytest.approx([0.03778, 0.01107, 0.00742, 0.09908,
                                                     0.02628, 0.00444, 0.00715], abs=1e-12)
    assert s["kv_cache_usage"].tolist() == pytest.approx([0, 0, 0, 0.002, 0.002, 0.002, 0])
    assert not s["is_dummy"].any() and (s["engine"] == 0).all()


def test_read_from_a_line_on() -> None:
    log = read_step_log(FIXTURE, first_line=13)
    assert log.steps["iteration"].tolist() == [3, 4, 5, 6]
    assert count_lines(FIXTURE) == 16


def test_progress_bar_carriage_returns_do_not_shift_line_numbers(tmp_path: Path) -> None:
    # a real server log redraws its progress bars with lone '\r's; a line number taken with
    # count_lines (verify profiles an engine after its replay from the count at that time)
    # must name the same line read_step_log numbers: else the last replay lines are read
    # as the profile's first steps
    log = tmp_path / "engine.log"
    lines = FIXTURE.read_text(encoding="utf-8").split("\n")
    lines.insert(2, "Loading shards:   0% 0/1\rLoading shards: 100% 1/1\r\rdone")
    log.write_text("\n".join(lines), encoding="utf-8")
    n = count_lines(log)
    with log.open("a", encoding="utf-8") as f:
        f.write(GOOD.replace("Iteration(3)", "Iteration(7)") + "\n")
    after = read_step_log(log, first_line=n + 1).steps
    assert after["iteration"].tolist() == [7] and after["line"].tolist() == [n + 1]
    assert read_step_log(log).steps["line"].tolist()[:2] == [10, 11]


def test_gpu_device_dummy_and_encoder_variants() -> None:
    line = ("INFO Engine 001: Iteration(7): 0 context requests, 0 context tokens, 0 generation "
            "requests, 0 generation tokens, iteration elapsed time: 0.00 ms (dummy), GPU KV "
            "cache usage: 12.5%, encoder inputs: 2, encoder output embeddings: 512")
    s = parse_lines([line], "x.log")
    assert s.iloc[0]["is_dummy"] and s.iloc[0]["engine"] == 1
    assert s.iloc[0]["kv_cache_usage"] == 0.125


@pytest.mark.parametrize("bad", [
    GOOD[:-40],  # cut mid-line (a killed engine's last line)
    GOOD.replace("256 context tokens", "x context tokens"),
    GOOD.replace("99.08 ms", "99.08 s"),
])
def test_malformed_line_names_file_and_line(bad: str) -> None:
    with pytest.raises(InputError, match=r"^eng\.log:42: malformed vLLM iteration line"):
        parse_lines(["INFO something else", bad], "eng.log", first_line=41)


def test_other_lines_ignored() -> None:
    s = parse_lines(["INFO:     127.0.0.1:35146 - \"POST /v1/completions HTTP/1.1\" 200 OK",
                     "Iteration count is 3", GOOD], "eng.log")
    assert s["line"].tolist() == [3]


def test_unknown_or_missing_version_warned(tmp_path: Path) -> None:
    p = tmp_path / "v.log"
    p.write_text("(APIServer pid=1) INFO [api_utils.py:347] version 0.99.1\n" + GOOD + "\n")
    with pytest.warns(UnknownVersionWarning, match="vLLM 0.99.1"):
        log = read_step_log(p)
    assert log.version == "0.99.1" and len(log.steps) == 1
    p.write_text(GOOD + "\n")
    with pytest.warns(UnknownVersionWarning, match="no vLLM version line"):
        assert read_step_log(p).version is None


def test_missing_file() -> None:
    with pytest.raises(InputError, match="cannot read"):
        read_step_log("/nonexistent/vllm.log")
