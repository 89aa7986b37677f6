"""Every bundled scenario runs against a stored golden summary, and the full
conversation trace gives the same summary with and without fast-forward.

Regenerate the goldens after an intended behaviour change with
``SERVETWIN_UPDATE_GOLDEN=1 python -m pytest tests/sim/test_bundled_scenarios.py``
and say why in the commit.
"""

from __future__ import annotations

import json
import math
import os
from pathlib import Path
from typing import Any

import pytest

from servetwin.output import _clean
from sim.scenario import load_scenario
from sim.simulate import resolve, simulate

ROOT = Path(__file__).resolve().parents[2]
GOLDEN = ROOT / "tests" / "golden"
SCENARIOS = sorted(p for p in (ROOT / "scenarios").glob("*.yaml"))


def run(path: Path, fast_forward: bool | None = None) -> dict[str, Any]:
    result = simulate(resolve(load_scenario(path)), fast_forward=fast_forward)
    out: dict[str, Any] = _clean(result.summary)
    return out


def assert_close(got: Any, want: Any, path: str = "") -> None:
    if isinstance(want, dict):
        assert sorted(got) == sorted(want), path
        for k in want:
            assert_close(got[k], want[k], f"{path}.{k}")
    elif isinstance(want, list):
        assert len(got) == len(want), path
        for i, (g, w) in enumerate(zip(got, want, strict=True)):
            assert_close(g, w, f"{path}[{i}]")
    elif isinstance(want, float):
        assert math.isclose(got, want, rel_tol=1e-9, abs_tol=1e-12), f"{path}: {got} != {want}"
    else:
        assert got == want, f"{path}: {got} != {want}"


@pytest.mark.slow
@pytest.mark.parametrize("scenario", SCENARIOS, ids=[p.stem for p in SCENARIOS])
def test_bundled_scenario_matches_golden_summary(scenario: Path) -> None:
    summary = run(scenario)
    golden = GOLDEN / f"{scenario.stem}.summary.json"
    if os.environ.get("SERVETWIN_UPDATE_GOLDEN"):
        golden.write_text(json.dumps(summary, indent=2, sort_keys=True) + "\n")
    assert golden.exists(), f"no golden summary for {scenario.name}: generate it (module doc)"
    assert_close(summary, json.loads(golden.read_text()))


@pytest.mark.slow
def test_full_trace_same_summary_in_both_modes() -> None:
    scenario = ROOT / "scenarios" / "dynamo_comparable.yaml"
    ff = run(scenario, fast_forward=True)
    step = run(scenario, fast_forward=False)
    # fast-forward exists to cut Python-level events; everything else must agree
    assert ff["engine"].pop("num_events") < step["engine"].pop("num_events") / 20
    assert_close(ff, step)
