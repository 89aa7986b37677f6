"""Importers of other people's timing data (calibrate/importers.py): exact samples from
small fixtures (tests/calibrate/data/importers/README.md), errors, sniffing, a fit."""

from __future__ import annotations

import gzip
import shutil
import warnings
from pathlib import Path

import numpy as np
import pandas as pd
import pytest

from calibrate.fit import fit, kfold
from calibrate.importers import (
    DroppedRowsWarning,
    llama_timings,
    load_any,
    sglang_log,
    sglang_metrics,
    sniff,
    splitwise,
    vidur,
)
from calibrate.measurements import COLUMNS, write
from calibrate.vllm_log import UnknownVersionWarning
from sim.catalog import load_gpu, load_model
from sim.errors import InputError

DATA = Path(__file__).parent / "data" / "importers"
SPLITWISE = DATA / "splitwise-perf_model-excerpt.csv"
VIDUR = DATA / "vidur"
SHARED = Path(__file__).resolve().parents[3] / "shared" / "data" / "timing"
AGG = ["num_prefill_tokens", "prefill_attn_work", "num_prefill_seqs", "num_decode_seqs",
       "decode_context_tokens"]


def rows(df: pd.DataFrame) -> list[tuple[float, ...]]:
    return [tuple(r) for r in df[AGG].itertuples(index=False)]


# --------------------------------------------------------------------------- Splitwise
def test_splitwise_rows_exact() -> None:
    df = splitwise(SPLITWISE)
    assert list(df.columns) == list(COLUMNS) and len(df) == 2 * 19
    # line 2: 1 prompt of 512, 128 out; e2e says round((3842.52 - 59.56) / 29.76) = 127 steps
    assert rows(df.iloc[:2]) == [(512, 512 * 513 / 2, 1, 0, 0), (0, 0.0, 0, 1, 512 + 64)]
    assert df["measured_s"].iloc[0] == pytest.approx(59.55572199309245e-3, rel=1e-12)
    assert df["measured_s"].iloc[1] == pytest.approx(29.762305037895818e-3, rel=1e-12)
    first = df.iloc[0]
    assert (first["gpu"], first["model"], first["tp"], first["engine"], first["source"]) == (
        "H100-SXM", "meta-llama/Llama-2-70b-hf", 4, "splitwise", SPLITWISE.name + ":2")
    # line 3: 2 prompts → 1024 tokens, 2 chunks; decode of 2 at 576 each
    assert rows(df.iloc[2:4]) == [(1024, 2 * 512 * 513 / 2, 2, 0, 0), (0, 0.0, 0, 2, 1152)]
    # line 20: token_size 8192 but only 231 decode steps ran (Llama-2's 4,096 positions)
    assert rows(df.iloc[36:38])[1] == (0, 0.0, 0, 1, 512 + 116)
    assert "fewer decode iterations" in df.attrs["notes"][0]


def test_splitwise_filters_and_names() -> None:
    assert len(splitwise(SPLITWISE, model="meta-llama/Llama-2-70b-hf", hardware="H100-SXM",
                         tp=4)) == 38
    with pytest.raises(InputError, match=r"model 'llama3' is not in the data.*llama2-70b"):
        splitwise(SPLITWISE, model="llama3")
    with pytest.raises(InputError, match=r"no rows for .*tp=8.*llama2-70b/h100-80gb/tp4"):
        splitwise(SPLITWISE, tp=8)


@pytest.mark.parametrize(("old", "new", "match"), [
    (",59.55572199309245,", ",fast,", r":2: prompt_time = 'fast'"),
    (",59.55572199309245,", ",0,", r":2: prompt_time = 0(\.0)?: must be a positive"),
    ("llama2-70b,h100-80gb,512,2,", "gpt-9,h100-80gb,512,2,", r":3: model = 'gpt-9'"),
])
def test_splitwise_bad_rows_named(tmp_path: Path, old: str, new: str, match: str) -> None:
    p = tmp_path / "perf_model.csv"
    p.write_text(SPLITWISE.read_text().replace(old, new, 1))
    with pytest.raises(InputError, match=match):
        splitwise(p)


def test_splitwise_fit_has_finite_held_out_error() -> None:
    real = SHARED / "splitwise" / "perf_model.csv"
    df = splitwise(real if real.is_file() else SPLITWISE, model="llama2-70b",
                   hardware="h100-80gb", tp=4)
    model = load_model(DATA / "llama-2-70b-hf_config.json")
    gpu = load_gpu("H100-SXM")
    result = fit(df, model, gpu, 4)
    assert result.success and np.isfinite(result.log_residuals).all()
    folds = kfold(df, model, gpu, 4, k=5, seed=0)
    ape = folds.by_regime["all"]["median_ape"]
    assert np.isfinite(ape) and ape < 0.2  # 1.8 % on the real file, 210 samples


def test_splitwise_real_file() -> None:
    real = SHARED / "splitwise" / "perf_model.csv"
    if not real.is_file():
        pytest.skip("shared data not here (CI clones the repo only)")
    df = splitwise(real)
    assert len(df) == 2 * 1260
    assert set(df["model"]) == {"meta-llama/Llama-2-70b-hf", "bigscience/bloom"}
    assert set(df["gpu"]) == {"A100-SXM-80GB", "H100-SXM", "H100-SXM-pcap"}


# --------------------------------------------------------------------------- Vidur
def _median(path: Path, **where: object) -> pd.DataFrame:
    df = pd.read_csv(path)
    for k, v in where.items():
        df = df[df[k] == v]
    return df


def test_vidur_prefill_pass_by_hand() -> None:
    df = vidur("meta-llama/Llama-2-70b-hf", "a100", 2, root=VIDUR)
    assert len(df) == 8 and (df["tp"] == 2).all() and (df["gpu"] == "A100-SXM-80GB").all()
    # 128 new tokens, nothing cached: every op on a grid point, all-reduce of 128·8192·2 bytes
    mlp = _median(VIDUR / "compute/a100/meta-llama/Llama-2-70b-hf/mlp.csv.gz", num_tokens=128)
    ops = ["input_layernorm", "attn_pre_proj", "attn_rope", "attn_post_proj",
           "post_attention_layernorm", "mlp_up_proj", "mlp_act", "mlp_down_proj", "add", "add"]
    layer = sum(mlp[f"time_stats.{op}.median"].median() for op in ops)
    attn = _median(VIDUR / "legacy/a100_attention_llama2-70b-shape_tp2.csv.gz",
                   is_prefill=True, prefill_chunk_size=128, kv_cache_size=0)
    layer += sum(attn[f"time_stats.{op}.median"].median()
                 for op in ("attn_prefill", "attn_input_reshape", "attn_output_reshape"))
    ar = _median(VIDUR / "network/a100_dgx/all_reduce.csv.gz", size=128 * 8192 * 2)
    layer += 2 * ar["time_stats.all_reduce.median"].median()
    expected_s = (80 * layer + mlp["time_stats.emb.median"].median()) / 1e3
    row = df[(df["num_prefill_tokens"] == 128) & (df["prefill_attn_work"] == 128 * 129 / 2)]
    assert len(row) == 1 and row["measured_s"].iloc[0] == pytest.approx(expected_s, rel=1e-12)
    # 1024 after 1024 cached; decode of 8 at KV 1024 → context 8 · 1025
    assert (1024, 1024 * (1024 + 1025 / 2), 1, 0, 0) in rows(df)
    assert (0, 0.0, 0, 8, 8 * 1025) in rows(df)


def test_vidur_uncovered_is_an_error() -> None:
    with pytest.raises(InputError, match=r"no mlp table for model 'x/y'.*Llama-2-70b-hf"):
        vidur("x/y", "a100", 2, root=VIDUR)
    with pytest.raises(InputError, match=r"gpu 'b200' is not in the data"):
        vidur("meta-llama/Llama-2-70b-hf", "b200", 2, root=VIDUR)
    with pytest.raises(InputError, match=r"no rows at tp = 4"):
        vidur("meta-llama/Llama-2-70b-hf", "a100", 4, root=VIDUR)


def test_vidur_real_tables() -> None:
    if not (SHARED / "vidur").is_dir():
        pytest.skip("shared data not here (CI clones the repo only)")
    df = vidur("meta-llama/Llama-2-70b-hf", "A100-SXM-80GB", 2, root=SHARED / "vidur")
    assert len(df) == 14318  # 14,658 rows, repeated points merged
    one = df[(df["num_decode_seqs"] == 1) & (df["decode_context_tokens"] == 33)]
    assert 0.04 < one["measured_s"].iloc[0] < 0.07  # Splitwise measured 55 ms at TP 2, A100
    with pytest.raises(InputError, match=r"no Vidur attention table"):
        vidur("meta-llama/Llama-2-7b-hf", "h100", 1, root=SHARED / "vidur")


# --------------------------------------------------------------------------- SGLang
def test_sglang_metrics_exact() -> None:
    with pytest.warns(DroppedRowsWarning, match="1 idle heartbeats"):
        df = sglang_metrics(DATA / "sglang-fpm.jsonl", engine_version="0.5.23",
                            gpu="H100-SXM", model="Qwen/Qwen3-8B")
    # 2 prompts of 400 and 600 (mean 500, variance 400 · ... ): 1000 · (0 + 501 / 2) + 2 · 400 / 2
    assert rows(df) == [(512, 512 * 513 / 2, 1, 0, 0), (0, 0.0, 0, 4, 2100),
                        (1000, 1000 * 501 / 2 + 400, 2, 3, 900)]
    assert df["measured_s"].tolist() == [0.0412, 0.0125, 0.0733]
    assert df["source"].tolist() == ["sglang-fpm.jsonl:1", "sglang-fpm.jsonl:2",
                                     "sglang-fpm.jsonl:3"]
    assert (df["engine"] == "sglang").all() and "dropped 1" in df.attrs["notes"][-1]


def test_sglang_metrics_bad_line_and_version(tmp_path: Path) -> None:
    p = tmp_path / "fpm.jsonl"
    good = (DATA / "sglang-fpm.jsonl").read_text().splitlines()[0]
    p.write_text(good + "\n" + good.replace('"sum_prefill_tokens": 512', '"sum_prefill_tokens": -5')
                 + "\n")
    with pytest.raises(InputError, match=r"fpm\.jsonl:2: sum_prefill_tokens = -5"):
        sglang_metrics(p, engine_version="0.5.23")
    p.write_text(good + "\n" + good[:60] + "\n")
    with pytest.raises(InputError, match=r"fpm\.jsonl:2: not valid JSON"):
        sglang_metrics(p, engine_version="0.5.23")
    p.write_text(good + "\n")
    with pytest.warns(UnknownVersionWarning, match="no sglang version"):
        sglang_metrics(p)


def test_sglang_log_decode_windows() -> None:
    with pytest.warns(DroppedRowsWarning) as got:
        df = sglang_log(DATA / "sglang-server.log", engine_version="0.5.23")
    assert "1 Prefill batch lines" in str(got[0].message)
    assert rows(df) == [(0, 0.0, 0, 4, 2100), (0, 0.0, 0, 8, 4096)]
    assert df["measured_s"].tolist() == pytest.approx([4 / 320, 8 / 500], rel=1e-12)
    assert df["source"].tolist() == ["sglang-server.log:3", "sglang-server.log:4"]


def test_sglang_log_malformed_line(tmp_path: Path) -> None:
    p = tmp_path / "s.log"
    p.write_text("x\n[TP0] Decode batch, #running-req: 4, #token: 2100, token usage: 0.01, "
                 "cuda graph: True, gen thro\n")
    with pytest.raises(InputError, match=r"s\.log:2: malformed SGLang decode line"):
        sglang_log(p, engine_version="0.5.23")


# --------------------------------------------------------------------------- llama-server
def test_llama_timings_exact() -> None:
    with pytest.warns(DroppedRowsWarning, match="1 requests with no decode time"):
        df = llama_timings(DATA / "llama-timings.jsonl", engine_version="b11434")
    # 100-token prompt, 20 tokens at 2 ms each at mean context 100 + 21 / 2 = 110.5 → 110
    # (round half to even); a stream chunk: 32 new after 32 cached
    assert rows(df) == [(100, 100 * 101 / 2, 1, 0, 0), (0, 0.0, 0, 1, 110),
                        (32, 32 * (32 + 33 / 2), 1, 0, 0)]
    assert df["measured_s"].tolist() == pytest.approx([0.050, 0.002, 0.0125], rel=1e-12)


def test_llama_timings_bad_record(tmp_path: Path) -> None:
    p = tmp_path / "t.jsonl"
    p.write_text('{"prompt_n": 3, "prompt_ms": 1.0, "predicted_n": 1, "predicted_ms": 1}\n'
                 '{"usage": {}}\n')
    with pytest.raises(InputError, match=r"t\.jsonl:2: no timings object"):
        llama_timings(p, engine_version="b11434")
    p.write_text('{"prompt_n": 2.5, "prompt_ms": 1.0, "predicted_n": 1, "predicted_ms": 1}\n')
    with pytest.raises(InputError, match=r"t\.jsonl:1: prompt_n = 2.5: must be a non-negative "
                                         "integer"):
        llama_timings(p, engine_version="b11434")


# --------------------------------------------------------------------------- load_any
def test_sniff_each_format(tmp_path: Path) -> None:
    meas = tmp_path / "m.csv"
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        write(llama_timings(DATA / "llama-timings.jsonl"), meas)
    expected = {SPLITWISE: "splitwise", VIDUR: "vidur",
                VIDUR / "compute/a100/meta-llama/Llama-2-70b-hf/mlp.csv.gz": "vidur",
                DATA / "sglang-fpm.jsonl": "sglang-metrics",
                DATA / "sglang-server.log": "sglang-log",
                DATA / "llama-timings.jsonl": "llama-timings", meas: "measurements",
                Path(__file__).parent / "data" / "vllm-0.32.0-iterations.log": "vllm-log"}
    assert {p: sniff(p) for p in expected} == expected
    other = tmp_path / "notes.txt"
    other.write_text("hello\n")
    with pytest.raises(InputError, match=r"cannot tell the format.*sglang-metrics"):
        load_any(other)


def test_load_any_dispatches(tmp_path: Path) -> None:
    assert len(load_any(SPLITWISE, gpu="h100-80gb")) == 38
    df = load_any(VIDUR / "compute/a100/meta-llama/Llama-2-70b-hf/mlp.csv.gz", tp=2)
    assert len(df) == 8 and (df["model"] == "meta-llama/Llama-2-70b-hf").all()
    with pytest.raises(InputError, match="need a model, a gpu and tp"):
        load_any(VIDUR)
    meas = tmp_path / "m.csv"
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        write(llama_timings(DATA / "llama-timings.jsonl"), meas)
        df = load_any(meas, gpu="CPU")
        assert (df["gpu"] == "CPU").all() and len(df) == 3
        assert len(load_any(DATA / "sglang-fpm.jsonl", "sglang-metrics", tp=2)) == 3
    with pytest.raises(InputError, match="'nope' is not a format"):
        load_any(SPLITWISE, "nope")


def test_load_any_vllm_log_needs_the_requests(tmp_path: Path) -> None:
    from calibrate.profiling import Sent

    log = Path(__file__).parent / "data" / "vllm-0.32.0-iterations.log"
    with pytest.raises(InputError, match=r"counts only .*pass sent="):
        load_any(log)
    # the fixture: a 40-token prompt with 3 outputs, then 256 + 44 of one 300-token prompt
    # in two chunks with 3 outputs; the log holds the two phases one after the other
    # only the first phase's request is given: the second phase's steps are dropped, counted
    with pytest.warns(DroppedRowsWarning, match="3 after a step that did not fit"):
        first = load_any(log, sent=[Sent(40, 3)], gpu="CPU-1core-AVX512")
    assert len(first) == 3
    assert rows(first)[:3] == [(40, 40 * 41 / 2, 1, 0, 0), (0, 0.0, 0, 1, 41),
                               (0, 0.0, 0, 1, 42)]
    assert first["engine_version"].iloc[0] == "0.32.0"


def test_gzip_sniff_reads_compressed_header(tmp_path: Path) -> None:
    p = tmp_path / "perf_model.csv.gz"
    with gzip.open(p, "wt") as f:
        f.write(SPLITWISE.read_text())
    assert sniff(p) == "splitwise"
    copy = tmp_path / "x.csv"
    shutil.copy(SPLITWISE, copy)
    assert len(load_any(copy, tp=4)) == 38


def test_calibrate_command_reads_a_splitwise_file(tmp_path, capsys) -> None:
    """`servetwin calibrate perf_model.csv` tells the format from the header and fits."""
    import yaml

    from servetwin.cli import main

    data = Path(__file__).parent / "data" / "importers"
    out = tmp_path / "p.yaml"
    code = main(["calibrate", str(data / "splitwise-perf_model-excerpt.csv"), "--model",
                 str(data / "llama-2-70b-hf_config.json"), "--gpu", "H100-SXM", "--tp", "4",
                 "--k", "3", "--out", str(out)])
    assert code == 0
    doc = yaml.safe_load(out.read_text())
    assert doc["provenance"]["num_samples"] == 38  # 19 rows: a prefill and a decode each
    assert doc["provenance"]["engine"] == "splitwise"
    assert "38 samples" in capsys.readouterr().out
