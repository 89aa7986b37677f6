"""SGLang engine section of a scenario: validation errors and a short simulate()."""

from __future__ import annotations

from pathlib import Path

import pytest
import yaml

from sim.engines.sglang import SglangConfig
from sim.errors import ScenarioError
from sim.scenario import load_scenario
from sim.simulate import resolve, simulate

ROOT = Path(__file__).resolve().parents[2]
SCENARIO = ROOT / "scenarios" / "sglang_conversation.yaml"


def write(tmp_path: Path, engine: dict) -> Path:
    raw = yaml.safe_load(SCENARIO.read_text())
    raw["workload"]["trace"] = str(ROOT / "scenarios" / raw["workload"]["trace"])
    raw["engine"] = engine
    p = tmp_path / "s.yaml"
    p.write_text(yaml.safe_dump(raw, sort_keys=False))
    return p


@pytest.mark.parametrize(("engine", "needles"), [
    ({"kind": "sglang", "schedule_policy": "sjf"},
     ["engine.schedule_policy = 'sjf'", "one of fcfs, lpm"]),
    ({"kind": "sglang", "chunked_prefill_size": 0},
     ["engine.chunked_prefill_size = 0", "-1 to disable"]),
    ({"kind": "sglang", "max_running_requests": 0},
     ["engine.max_running_requests = 0", "must be >= 1", "or auto"]),
    ({"kind": "sglang", "schedule_conservativeness": -1},
     ["engine.schedule_conservativeness = -1", "must be > 0"]),
    ({"kind": "sglang", "max_num_seqs": 8},
     ["unknown key 'engine.max_num_seqs'", "max_running_requests"]),
    ({"kind": "tgi"}, ["engine.kind = 'tgi'", "vllm, sglang"]),
])
def test_bad_sglang_values_name_field_value_and_fix(tmp_path: Path, engine: dict,
                                                    needles: list[str]) -> None:
    with pytest.raises(ScenarioError) as e:
        load_scenario(write(tmp_path, engine))
    text = str(e.value)
    assert "s.yaml:" in text
    for needle in needles:
        assert needle in text, text


def test_engine_kind_defaults_to_vllm(tmp_path: Path) -> None:
    loaded = load_scenario(write(tmp_path, {"max_num_seqs": 8}))
    assert loaded.scenario.engine.kind == "vllm"


def test_bundled_sglang_scenario_resolves_and_simulates_a_head_slice() -> None:
    loaded = load_scenario(SCENARIO, ["workload.max_requests=60", "cluster.num_workers=2",
                                      "engine.schedule_policy=lpm"])
    resolved = resolve(loaded)
    cfg = resolved.engine
    assert isinstance(cfg, SglangConfig)
    assert cfg.chunked_prefill_size == 8192  # H100: 80 GB
    assert cfg.max_total_tokens > 100_000
    assert "mem_fraction_static" in resolved.kv_capacity_note
    result = simulate(resolved)
    s = result.summary
    assert s["num_completed"] == 60 and s["num_rejected"] == 0
    assert s["engine"]["sglang"]["schedule_policy_effective"] == "lpm"
    assert s["engine"]["sglang"]["num_lpm_fallbacks"] == 0
    assert s["engine"]["num_forward_passes"] > 0
