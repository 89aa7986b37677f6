"""`servetwin validate`: the row reader, model / profile resolution, scoring, end to end."""

from __future__ import annotations

import csv
import json
import math
from pathlib import Path

import pytest

from calibrate import validate as val
from calibrate.bundle import PROFILE_DIR, profile_name
from servetwin.cli import main
from sim.errors import InputError

HEADER = ",".join(val.COLUMNS)


def line(id_: str, *, model: str = "Qwen/Qwen3-32B", precision: str = "", mode: str = "agg",
         isl: str = "1024", osl: str = "128", c: str = "8.0", tp: str = "2.0",
         pp: str = "1.0", version: str = "0.12.0", system: str = "h100_sxm",
         ttft: str = "154.2", tpot: str = "18.0") -> str:
    return (f"{id_},vllm,{version},{model},{system},{precision},{mode},{isl},{osl},{precision},"
            f"{c},{tp},{pp},{ttft},{tpot}")


def write_rows(tmp_path: Path, *lines: str) -> Path:
    p = tmp_path / "rows.csv"
    p.write_text("\n".join([HEADER, *lines]) + "\n")
    return p


def row(**kw: str) -> val.Row:
    return val.read_rows(write_rows(Path(kw.pop("tmp")), line("r", **kw)))[0]


def test_reads_rows_with_float_counts(tmp_path: Path) -> None:
    (r,) = val.read_rows(write_rows(tmp_path, line("a", precision="fp8")))
    assert (r.isl, r.osl, r.batch_size, r.tp, r.pp) == (1024, 128, 8, 2, 1)
    assert r.dtype == "fp8" and r.where == f"{tmp_path / 'rows.csv'}:2"


def test_bad_row_names_file_and_line(tmp_path: Path) -> None:
    p = write_rows(tmp_path, line("a"), line("b", isl="ten"))
    with pytest.raises(InputError) as e:
        val.read_rows(p)
    assert str(e.value).startswith(f"{p}:3: isl = 'ten': not a number")
    p = write_rows(tmp_path, line("a", c="2.5"))
    with pytest.raises(InputError, match=r"rows.csv:2: batch_size = '2.5': must be a positive"):
        val.read_rows(p)


def test_missing_column_is_named(tmp_path: Path) -> None:
    p = tmp_path / "rows.csv"
    p.write_text(HEADER.replace(",silicon_tpot_ms", "") + "\n")
    with pytest.raises(InputError, match=r"rows\.csv:1: missing column\(s\) silicon_tpot_ms"):
        val.read_rows(p)


def test_variants_resolve_to_the_base_model(tmp_path: Path) -> None:
    profiles = val.bundled_profiles()
    r = row(tmp=str(tmp_path), model="Qwen/Qwen3-32B-FP8", precision="fp8", mode="disagg")
    p = val.predict_row(r, profiles)  # disagg: resolved, then refused before simulating
    assert p.skipped.startswith("mode = 'disagg'")
    r = row(tmp=str(tmp_path), model="Qwen/Qwen3-32B-FP8", precision="fp8", c="1", osl="4")
    p = val.predict_row(r, profiles, num_requests=2)
    assert not p.skipped
    assert "model Qwen/Qwen3-32B-FP8 simulated as Qwen/Qwen3-32B" in p.notes
    assert p.profile == "h100_sxm-vllm-qwen--qwen3-32b-fp8-tp2.yaml"


@pytest.mark.parametrize(("kw", "reason"), [
    ({"model": "acme/Unknown-7B"}, "model_path = 'acme/Unknown-7B': not a bundled model"),
    ({"pp": "2"}, "pp_size = 2: the timing model covers one pipeline stage"),
    ({"system": "tpu_v5"}, "system = 'tpu_v5': unknown"),
])
def test_unsimulatable_rows_say_why(tmp_path: Path, kw: dict[str, str], reason: str) -> None:
    p = val.predict_row(row(tmp=str(tmp_path), **kw), val.bundled_profiles())
    assert p.skipped.startswith(reason)
    (out,) = val.prediction_rows([p])
    assert out["pred_tpot_ms"] == "" and out["notes"].startswith("not simulated: ")
    assert val.summarize([p])["skipped"][0]["reason"] == p.skipped


def test_nearest_profile_is_noted() -> None:
    profiles = val.bundled_profiles()
    best, notes = val.pick_profile(profiles, "h100_sxm", "vllm", "Qwen/Qwen3-32B", 16)
    assert best is not None and best.tp == 8 and notes == ["no TP 16 profile: used TP 8's"]
    best, notes = val.pick_profile(profiles, "h100_sxm", "vllm", "Qwen/Qwen3-8B", 2)
    assert best is not None and best.tp == 2 and notes[0].startswith("no Qwen/Qwen3-8B profile")
    best, notes = val.pick_profile(profiles, "h100_sxm", "sglang", "Qwen/Qwen3-32B", 2)
    assert best is not None and (best.backend, best.tp) == ("sglang", 2) and notes == []
    assert val.pick_profile(profiles, "b200_sxm", "vllm", "Qwen/Qwen3-32B", 2) == (None, [])
    bf16 = [p for p in profiles if p.dtype == "bf16"]
    best, notes = val.pick_profile(bf16, "h100_sxm", "vllm", "Qwen/Qwen3-32B", 2, "fp8")
    assert best is not None and notes == ["no fp8 profile: used a bf16-fitted one"]


def test_bundled_profiles_exist_for_every_tp() -> None:
    for tp in (1, 2, 4, 8):
        for dtype in ("bf16", "fp8"):
            name = profile_name("h100_sxm", "vllm", "Qwen/Qwen3-32B", tp, dtype)
            assert (PROFILE_DIR / name).is_file()


def made(tmp_path: Path, id_: str, tp: int, c: int, pred: tuple[float, float],
         silicon: tuple[float, float]) -> val.Prediction:
    r = row(tmp=str(tmp_path), tp=str(tp), c=str(c), ttft=str(silicon[0]),
            tpot=str(silicon[1]))
    return val.Prediction(r, pred_ttft_ms=pred[0], pred_tpot_ms=pred[1])


def test_summary_on_hand_made_predictions(tmp_path: Path) -> None:
    preds = [
        made(tmp_path, "a", 2, 8, (110.0, 20.0), (100.0, 20.0)),  # APE ttft 0.1, tpot 0
        made(tmp_path, "b", 4, 8, (80.0, 9.0), (100.0, 10.0)),    # 0.2, 0.1
        made(tmp_path, "c", 8, 8, (50.0, 6.0), (50.0, 5.0)),      # 0, 0.2
        made(tmp_path, "d", 2, 16, (300.0, 40.0), (200.0, 30.0)),  # 0.5, 1/3
    ]
    s = val.summarize(preds)
    assert s["ttft"]["median_ape"] == pytest.approx(0.15)
    assert s["ttft"]["mean_ape"] == pytest.approx(0.2)
    assert s["tpot"]["median_ape"] == pytest.approx(0.15)
    sp = s["spearman"]["h100_sxm / vllm / Qwen/Qwen3-32B"]
    # silicon ttft 100, 100, 50, 200 vs pred 110, 80, 50, 300: tie averaged
    assert sp["tpot"] == pytest.approx(1.0)
    assert sp["ttft"] == pytest.approx(0.9486832980505138)
    b = s["best_tp_by_tpot"]  # only c 8 has several TPs: best TP 8 both ways
    assert (b["num_workloads"], b["num_matches"]) == (1, 1)
    # tokens per GPU-ms = c·osl / ((ttft + 127·tpot)·tp), c 8: measured tp2 1024 / 5080 >
    # tp4 = tp8 1024 / 5480; predicted tp4 1024 / 4892 > tp2 1024 / 5300 > tp8 1024 / 6496
    g = s["best_tp_by_tokens_per_gpu"]
    assert (g["num_workloads"], g["num_matches"]) == (1, 0)
    assert g["misses"] == [{"workload": "Qwen/Qwen3-32B isl 1024 osl 128 c 8",
                            "measured_best_tp": 2, "predicted_best_tp": 4}]


def test_spearman_needs_three_rows(tmp_path: Path) -> None:
    s = val.summarize([made(tmp_path, "a", 2, 8, (1.0, 1.0), (1.0, 1.0))])
    assert s["spearman"]["h100_sxm / vllm / Qwen/Qwen3-32B"]["ttft"] is None


def test_cli_end_to_end(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    p = write_rows(tmp_path, line("a", osl="16", c="4", tp="4"),
                   line("b", osl="16", c="4", tp="8", version=""),
                   line("c", model="acme/Unknown-7B"))
    out = tmp_path / "out"
    assert main(["validate", str(p), "--out", str(out)]) == 0
    text = capsys.readouterr().out
    assert "rows 3, simulated 2" in text and "not simulated:" in text
    with (out / "predictions.csv").open() as f:
        rows = list(csv.DictReader(f))
    assert [r["id"] for r in rows] == ["a", "b", "c"]
    assert rows[0]["profile"] == "h100_sxm-vllm-qwen--qwen3-32b-tp4.yaml"
    assert float(rows[0]["pred_tpot_ms"]) > float(rows[1]["pred_tpot_ms"]) > 0
    assert "backend_version unknown" in rows[1]["notes"]
    s = json.loads((out / "summary.json").read_text())
    assert s["num_simulated"] == 2 and len(s["skipped"]) == 1
    assert math.isclose(s["tpot"]["num_rows"], 2)


def test_cli_bad_file_is_one_line(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["validate", str(tmp_path / "no.csv"), "--out", str(tmp_path / "o")]) == 2
    assert "cannot read" in capsys.readouterr().err


def test_loop_protocol_options_change_what_is_simulated(tmp_path: Path) -> None:
    """The benchmark protocol upstream does not document, each knob set on its own: a wave
    of 8 x 4,096 tokens takes four 8,192-token steps on an idle engine, later prompts arrive
    staggered, so counting the first wave changes the mean TTFT; so does a 2,048-token
    budget."""
    r = row(tmp=str(tmp_path), isl="4096", osl="32", c="8")
    prof = val.pick_profile(val.bundled_profiles(), r.system, r.backend, "Qwen/Qwen3-32B",
                            r.tp, r.dtype)[0]
    assert prof is not None

    def ttft(**kw: object) -> float:
        return val.simulate_closed_loop(r, "Qwen/Qwen3-32B", prof.path,
                                        protocol=val.LoopProtocol(**kw))[0]  # type: ignore[arg-type]
    base = ttft()
    assert ttft(count_first_wave=True) != pytest.approx(base, rel=1e-3)
    assert ttft(max_num_batched_tokens=2048) != pytest.approx(base, rel=1e-3)
    assert ttft(range_ratio=0.8) != pytest.approx(base, rel=1e-3)
    assert val.LoopProtocol(requests_per_client=10).requests(8) == 80
    assert val.LoopProtocol().requests(8) == 64
    assert val.LoopProtocol(num_requests=7).requests(8) == 7


def test_range_ratio_draws_lengths_in_the_lower_bound_form(monkeypatch: pytest.MonkeyPatch,
                                                            tmp_path: Path) -> None:
    """--range-ratio 0.8 on isl 100 / osl 10: every simulated request's lengths lie in
    [80, 100] and [8, 10] (both ends drawn), and TPOT divides each request's decode time
    by its own output length minus one."""
    import sim.simulate

    r = row(tmp=str(tmp_path), isl="100", osl="10", c="4")
    prof = val.pick_profile(val.bundled_profiles(), r.system, r.backend, "Qwen/Qwen3-32B",
                            r.tp, r.dtype)[0]
    assert prof is not None
    seen = {}
    real = sim.simulate.simulate

    def spy(resolved: object) -> object:
        result = real(resolved)  # type: ignore[arg-type]
        seen["c"] = result.records.columns
        return result

    monkeypatch.setattr(sim.simulate, "simulate", spy)
    proto = val.LoopProtocol(num_requests=400, count_first_wave=True, range_ratio=0.8)
    _ttft, tpot = val.simulate_closed_loop(r, "Qwen/Qwen3-32B", prof.path, protocol=proto)
    c = seen["c"]
    assert set(c["num_prompt_tokens"].tolist()) == set(range(80, 101))
    assert set(c["num_output_tokens"].tolist()) == set(range(8, 11))
    own = (c["finish_s"] - c["first_token_s"]) / (c["num_output_tokens"] - 1)
    assert tpot == pytest.approx(float(own.mean()), rel=1e-12)
    assert "isl and osl uniform in [0.8 L, L]" in proto.describe()


def test_cli_protocol_is_recorded_and_checked(tmp_path: Path,
                                              capsys: pytest.CaptureFixture[str]) -> None:
    p = write_rows(tmp_path, line("a", osl="16", c="4", tp="4"))
    out = tmp_path / "out"
    assert main(["validate", str(p), "--out", str(out), "--requests-per-client", "20",
                 "--count-first-wave", "--max-num-batched-tokens", "2048"]) == 0
    s = json.loads((out / "summary.json").read_text())
    assert s["statistic"] == ("mean over every request; max(20 x concurrency, 64) requests, "
                              "max_num_batched_tokens 2048")
    capsys.readouterr()
    assert main(["validate", str(p), "--out", str(out), "--requests-per-client", "0"]) == 2
    assert "--requests-per-client: 0: must be at least 1" in capsys.readouterr().err
    assert main(["validate", str(p), "--out", str(out), "--range-ratio", "1.5"]) == 2
    assert "--range-ratio: 1.5: must be in (0, 1]" in capsys.readouterr().err
