"""Scenario sections for offload, planner, disaggregation and the timeline: their
errors name the field, the value and the fix; valid ones run end to end."""

from __future__ import annotations

import gzip
import json
from pathlib import Path

import pytest

from sim.scenario import load_scenario
from sim.simulate import build_timeline, resolve, simulate
from tests.sim.test_scenario import BASE, error_of, write

DISAGG = """\
disaggregation:
  prefill: {num_workers: 1, router: {kind: round_robin}}
  decode: {num_workers: 2, engine: {max_num_seqs: 32}}
  link: {bandwidth_gb_s: 10, latency_us: 5, topology: per_pair}
"""

PLANNER = """\
  planner:
    policy: {kind: load}
    interval_s: 5
    startup: {kind: fixed, delay_s: 10}
    max_workers: 3
"""

OFFLOAD = """\
  offload:
    host: {capacity_gib: 1, bandwidth_gb_s: 25}
    disk: {capacity_gib: 10, bandwidth_gb_s: 2}
"""


@pytest.mark.parametrize(("extra", "message"), [
    (PLANNER.replace("kind: load", "kind: magic"),
     "cluster.planner.policy.kind = 'magic': unknown. Fix: use one of: load, sla"),
    (PLANNER.replace("kind: fixed, delay_s: 10", "kind: fixed, delay_s: -1"),
     "cluster.planner.startup.delay_s = -1: must be >= 0. "
     "Fix: give a start-up delay in seconds"),
    (PLANNER.replace("    max_workers: 3\n", ""),
     "cluster.planner: neither max_workers nor max_gpus is given. "
     "Fix: bound the fleet: set max_workers or max_gpus"),
    (OFFLOAD.replace("capacity_gib: 1,", "capacity_gib: 0,"),
     "cluster.offload.host.capacity_gib = 0: must be > 0. "
     "Fix: set cluster.offload.host.capacity_gib to a number > 0 and <= 10000000"),
])
def test_cluster_section_errors(tmp_path: Path, extra: str, message: str) -> None:
    path = write(tmp_path, BASE + extra)
    assert message in str(error_of(path))


def test_disaggregation_errors(tmp_path: Path) -> None:
    bad_pool = DISAGG.replace("max_num_seqs: 32", "max_num_seqs: 0")
    err = str(error_of(write(tmp_path, BASE + bad_pool)))
    assert "disaggregation.decode.engine.max_num_seqs = 0" in err and "Fix:" in err
    sglang = BASE.replace("engine:\n  max_num_seqs: 64", "engine:\n  kind: sglang") + DISAGG
    err = str(error_of(write(tmp_path, sglang)))
    assert "disaggregation with engine.kind = 'sglang'" in err
    both = BASE + PLANNER + DISAGG
    assert "disaggregation with cluster.planner: not modelled together" in str(
        error_of(write(tmp_path, both)))
    bad_link = DISAGG.replace("topology: per_pair", "topology: mesh")
    err = str(error_of(write(tmp_path, BASE + bad_link)))
    assert "disaggregation.link.topology = 'mesh'" in err


def test_offload_needs_vllm(tmp_path: Path) -> None:
    text = BASE.replace("engine:\n  max_num_seqs: 64", "engine:\n  kind: sglang") + OFFLOAD
    assert "cluster.offload with engine.kind = 'sglang'" in str(error_of(
        write(tmp_path, text)))


def test_disaggregated_run_reports_links_and_handoffs(tmp_path: Path) -> None:
    result = simulate(resolve(load_scenario(write(tmp_path, BASE + DISAGG))))
    s = result.summary
    d = s["disaggregation"]
    assert s["num_completed"] == 200
    assert d["num_prefill_workers"] == 1 and d["num_decode_workers"] == 2
    assert d["num_handoffs"] == sum(1 for n in result.records.columns["num_output_tokens"]
                                    if n > 1)
    assert sorted(d["links"]) == ["prefill0->decode0", "prefill0->decode1"]
    assert all(0 < v["busy_fraction"] < 1 for v in d["links"].values())
    # the decode pool's own knob, the prefill pool's default
    pools = result.resolved.pools
    assert pools is not None
    assert pools["decode"][0].max_num_seqs == 32 and pools["prefill"][0].max_num_seqs == 64


def test_planner_and_offload_runs_and_timeline(tmp_path: Path) -> None:
    text = BASE + PLANNER + OFFLOAD + "simulation: {timeline: true}\n"
    text = text.replace("max_requests: 200", "max_requests: 300\n  time_scale: 0.05")
    result = simulate(resolve(load_scenario(write(tmp_path, text))))
    s = result.summary
    assert s["num_completed"] == 300
    assert s["planner"]["num_decisions"] >= 1 and s["planner"]["gpu_seconds"] > 0
    assert set(s["offload"]["tiers"]) == {"host", "disk"}
    out = tmp_path / "timeline.json.gz"
    n = build_timeline(result).write(out)
    with gzip.open(out) as f:
        doc = json.loads(f.read())
    assert len(doc["traceEvents"]) == n
    names = {e["name"] for e in doc["traceEvents"]}
    assert {"arrival", "planner decision"} <= names
