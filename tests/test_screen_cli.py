"""`servetwin screen` end to end: a sweep killed midway (SIGTERM, SIGKILL) resumes without
recomputing a finished config and ends equal to an uninterrupted run; Ray gives the local
results; the bundled screen runs, makes physical sense and its report renders in Chromium."""

from __future__ import annotations

import contextlib
import io
import itertools
import json
import os
import re
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pandas as pd
import pytest
import yaml

from servetwin.cli import main
from sim.scenario import validate_scenario
from sim.screen.runner import Checkpoint
from sim.screen.space import config_id, parse_search
from tests.sim.screen.test_report import CHROMIUM, render

REPO = Path(__file__).resolve().parents[1]
AZURE_HEAD = REPO / "scenarios" / "traces" / "azure_conv_head.csv"
# 24 configs of 0.1-0.5 s each (600 requests of the Azure head), 4 of them over the
# budget: slow enough to be killed midway, fast enough to run whole three times
SMALL_SCREEN = {
    "name": "small-screen",
    "seed": 0,
    "workload": {"trace": str(AZURE_HEAD), "max_requests": 2000},
    "model": "meta-llama/Llama-3.1-8B",
    "gpu": "H100-SXM",
    "search": {
        "budget_gpus": 4,
        "space": {"cluster.num_workers": [1, 2, 4],
                  "engine.tensor_parallel_size": [1, 2],
                  "engine.max_num_seqs": [8, 32, 128, 512]},
        "slo": {"ttft_s": {"p90": 0.5}},
        "shortlist": 3,
    },
}
NUM_CONFIGS = 24


# ------------------------------------------------------------ processes
def live_in_session(sid: int) -> list[int]:
    """Processes of session ``sid`` still running (zombies are dead: not counted)."""
    pids = []
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            stat = (entry / "stat").read_text()
        except OSError:
            continue
        state, _ppid, _pgrp, session = stat[stat.rindex(")") + 2:].split()[:4]
        if state != "Z" and int(session) == sid:
            pids.append(int(entry.name))
    return pids


def assert_session_ends(sid: int, timeout_s: float = 20.0) -> None:
    deadline = time.monotonic() + timeout_s
    while (left := live_in_session(sid)) and time.monotonic() < deadline:
        time.sleep(0.05)
    assert left == [], f"processes left behind by the sweep: {left}"


@contextlib.contextmanager
def screen_process(path: Path, out: Path, *extra: str) -> Iterator[subprocess.Popen[str]]:
    """`python -m servetwin screen` in its own session; whatever is left of the session
    afterwards is killed, so a failing test leaves no process behind either."""
    cmd = [sys.executable, "-m", "servetwin", "screen", str(path), "--out", str(out),
           "--quiet", *extra]
    proc = subprocess.Popen(cmd, cwd=REPO, start_new_session=True, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True)
    try:
        yield proc
    finally:
        if proc.poll() is None or live_in_session(proc.pid):
            with contextlib.suppress(ProcessLookupError):
                os.killpg(proc.pid, signal.SIGKILL)
        proc.communicate()


def run_screen(path: Path, out: Path, *extra: str, timeout_s: float = 300) -> None:
    """A whole sweep, to the end."""
    with screen_process(path, out, *extra) as proc:
        stdout, stderr = proc.communicate(timeout=timeout_s)
        assert proc.returncode == 0, stderr[-3000:]
        assert f"{NUM_CONFIGS} configs (" in stdout
        assert_session_ends(proc.pid)


# ------------------------------------------------------------ the files
def checkpoint_ids(out: Path) -> list[str]:
    """The config ids of results.jsonl, complete lines only, in file order."""
    path = out / "results.jsonl"
    if not path.exists():
        return []
    ids = []
    for line in path.read_bytes().split(b"\n")[:-1]:
        with contextlib.suppress(ValueError):
            ids.append(json.loads(line)["config_id"])
    return ids


def wall_s(out: Path) -> dict[str, float]:
    rows = [json.loads(line) for line in (out / "results.jsonl").read_text().splitlines()]
    return {r["config_id"]: r["wall_s"] for r in rows}


def results(out: Path) -> pd.DataFrame:
    """results.parquet without the wall clock, one row per config in config-id order."""
    df = pd.read_parquet(out / "results.parquet").drop(columns="wall_s")
    return df.sort_values("config_id", kind="mergesort").reset_index(drop=True)


def assert_same_results(a: Path, b: Path) -> None:
    ra, rb = results(a), results(b)
    assert list(ra.columns) == list(rb.columns)
    pd.testing.assert_frame_equal(ra, rb, check_exact=True)
    assert len(ra) == NUM_CONFIGS


@pytest.fixture(scope="module")
def uninterrupted(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    """The small screen's file, and one sweep of it run straight through."""
    root = tmp_path_factory.mktemp("screen")
    path = root / "small.yaml"
    path.write_text(yaml.safe_dump(SMALL_SCREEN, sort_keys=False), encoding="utf-8")
    out = root / "uninterrupted"
    run_screen(path, out, "--workers", "2")
    assert len(checkpoint_ids(out)) == NUM_CONFIGS
    return path, out


# ---------------------------------------------------------- kill, resume
@pytest.mark.parametrize(("sig", "whole_group"), [(signal.SIGTERM, False),
                                                  (signal.SIGKILL, True)],
                         ids=["sigterm", "sigkill-process-group"])
def test_a_killed_sweep_resumes_without_recomputing(tmp_path, uninterrupted, sig, whole_group):
    path, fresh = uninterrupted
    grid_ids = {config_id(p) for p in parse_search(SMALL_SCREEN, "small.yaml").grid()}
    out = tmp_path / "run"

    with screen_process(path, out, "--workers", "2") as proc:
        deadline = time.monotonic() + 120
        while len(checkpoint_ids(out)) < 3:
            assert proc.poll() is None, proc.communicate()[1][-3000:]
            assert time.monotonic() < deadline, "no config finished in 120 s"
            time.sleep(0.005)
        killed_at = time.monotonic()
        if whole_group:
            os.killpg(proc.pid, sig)
        else:  # the main process only: it must stop its own workers
            os.kill(proc.pid, sig)
        _, stderr = proc.communicate(timeout=60)
        stopped_s = time.monotonic() - killed_at
        assert_session_ends(proc.pid)
    done = checkpoint_ids(out)
    assert 3 <= len(done) < NUM_CONFIGS, "the sweep was not caught midway: make configs slower"
    if sig == signal.SIGTERM:
        assert (proc.returncode, stderr.splitlines()[-1]) == (130, "servetwin: interrupted")
        # it drops the configs not yet started rather than computing them for nothing:
        # it stops in less than half the time the rest of the sweep takes on 2 workers
        rest_s = sum(w for cid, w in wall_s(fresh).items() if cid not in done) / 2
        assert stopped_s < rest_s / 2, (stopped_s, rest_s)
    else:
        assert proc.returncode == -signal.SIGKILL
    assert len(set(done)) == len(done) and set(done) <= grid_ids
    assert not (out / "results.parquet").exists()
    before = (out / "results.jsonl").read_bytes()

    run_screen(path, out, "--workers", "2")
    after = checkpoint_ids(out)
    # the finished rows are kept as they were; the rerun appended only the missing configs,
    # each once
    assert (out / "results.jsonl").read_bytes().startswith(before)
    assert after[: len(done)] == done
    assert sorted(after) == sorted(grid_ids) and len(after) == NUM_CONFIGS
    assert_same_results(out, fresh)

    # a third run finds everything done: it evaluates nothing and writes the same tables
    run_screen(path, out, "--workers", "2")
    assert checkpoint_ids(out) == after
    assert_same_results(out, fresh)


def test_a_torn_last_line_is_ignored_and_not_glued_to_the_next_row(tmp_path):
    path = tmp_path / "results.jsonl"
    path.write_text('{"config_id": "a", "status": "ok"}\n{"config_id": "b", "sta',
                    encoding="utf-8")
    first = Checkpoint(path)
    assert list(first.rows) == ["a"]
    first.add({"config_id": "b", "status": "ok", "wall_s": 1.5})
    first.add({"config_id": "c", "status": "infeasible", "wall_s": 0.5})
    again = Checkpoint(path)
    assert list(again.rows) == ["a", "b", "c"]
    assert again.rows["b"] == first.rows["b"] == {"config_id": "b", "status": "ok",
                                                  "wall_s": 1.5}


# ------------------------------------------------------------------ Ray
@pytest.mark.slow
def test_ray_gives_the_local_results(tmp_path, uninterrupted, monkeypatch):
    pytest.importorskip("ray")
    # a local Ray instance in its own process: its daemons go with the session, and the
    # test process keeps no Ray state (ray.shutdown runs as the command exits)
    monkeypatch.setenv("RAY_AUTH_MODE", "disabled")
    path, fresh = uninterrupted
    out = tmp_path / "ray"
    run_screen(path, out, "--executor", "ray", timeout_s=420)
    assert sorted(checkpoint_ids(out)) == sorted(checkpoint_ids(fresh))
    assert_same_results(out, fresh)
    frontiers = [pd.read_csv(d / "pareto.csv").drop(columns="wall_s") for d in (out, fresh)]
    pd.testing.assert_frame_equal(*frontiers, check_exact=True)
    assert (out / "shortlist.yaml").read_text() == (fresh / "shortlist.yaml").read_text()


# ------------------------------------------------------- the bundled screen
BUNDLED = "scenarios/screen/llama8b_h100x8.yaml"
KV_REASON = re.compile(r"the KV cache holds ([\d,]+) tokens per request; the trace's longest "
                       r"request needs ([\d,]+) \((\d+) requests would be refused\)")


def knobs(df: pd.DataFrame, **values: Any) -> pd.DataFrame:
    """The rows whose knobs have these values: knobs(df, num_workers=1, ...)."""
    names = {"num_workers": "knob.cluster.num_workers",
             "tp": "knob.engine.tensor_parallel_size",
             "mem": "knob.engine.gpu_memory_utilization",
             "tokens": "knob.engine.max_num_batched_tokens"}
    keep = pd.Series(True, index=df.index)
    for k, v in values.items():
        keep &= df[names[k]] == v
    return df[keep]


@pytest.mark.slow
def test_the_bundled_screen_makes_physical_sense_and_renders(tmp_path, monkeypatch):
    monkeypatch.chdir(REPO)  # as from a clean clone: the path as the README gives it
    out = tmp_path / "bundled"
    stdout, stderr = io.StringIO(), io.StringIO()
    with contextlib.redirect_stdout(stdout), contextlib.redirect_stderr(stderr):
        code = main(["screen", BUNDLED, "--out", str(out), "--quiet"])
    assert code == 0, stderr.getvalue()[-3000:]
    df = pd.read_parquet(out / "results.parquet")
    assert len(df) == 48 and df["config_id"].is_unique
    assert set(df["status"]) == {"ok", "infeasible"}

    # more workers -> lower TTFT under load (TP 1, the whole memory, 8192-token steps)
    by_workers = knobs(df, tp=1, mem=0.92, tokens=8192).set_index("knob.cluster.num_workers")
    assert (by_workers["status"] == "ok").all()
    ttft = by_workers.loc[[1, 2, 4, 8], "ttft_s.p90"].tolist()
    assert all(a > b for a, b in itertools.pairwise(ttft)), ttft

    # TP 1 at 0.3 of the memory cannot hold the trace's 128k-token prompts; TP 2 can
    small_kv = knobs(df, tp=1, mem=0.3)
    assert len(small_kv) == 8 and (small_kv["status"] == "infeasible").all()
    for reason in small_kv["reason"]:
        m = KV_REASON.fullmatch(reason)
        assert m, reason
        held, needed, refused = (int(g.replace(",", "")) for g in m.groups())
        assert held < needed and needed > 100_000 and refused > 0
    assert (knobs(df, tp=2, mem=0.3).query("num_gpus <= 8")["status"] == "ok").all()

    # over the budget of 8 GPUs: infeasible, and the reason says so
    gpus = df["knob.cluster.num_workers"] * df["knob.engine.tensor_parallel_size"]
    over = df[gpus > 8]
    assert len(over) == 12 and (over["status"] == "infeasible").all()
    for _, r in over.iterrows():
        w, tp = r["knob.cluster.num_workers"], r["knob.engine.tensor_parallel_size"]
        assert r["reason"] == f"{w} workers x TP {tp} = {w * tp} GPUs > budget 8"
    assert not df.loc[gpus <= 8, "reason"].str.contains("budget").any()

    # something meets the SLOs, and the frontier is made of such configs
    assert df["slo_ok"].any() and df["pareto"].any()
    front = df[df["pareto"]]
    assert (front["status"] == "ok").all() and front["slo_ok"].all()
    assert len(pd.read_csv(out / "pareto.csv")) == len(front)

    # the shortlist holds whole scenarios that load, one per ranked config
    configs = yaml.safe_load((out / "shortlist.yaml").read_text(encoding="utf-8"))["configs"]
    assert [c["rank"] for c in configs] == list(range(1, min(5, len(front)) + 1))
    spec = parse_search(yaml.safe_load((REPO / BUNDLED).read_text()), BUNDLED)
    for c in configs:
        sc = validate_scenario(c["scenario"], {}, None, []).scenario
        assert Path(sc.workload.trace).is_absolute() and Path(sc.workload.trace).exists()
        point = {f: _get(c["scenario"], f) for f in spec.space}
        assert config_id(point) == c["config_id"]
        assert c["config_id"] in set(front["config_id"])

    if CHROMIUM is None:
        pytest.skip("chromium is not installed: the report was not rendered")
    _check_report_renders(tmp_path, out / "report.html", df)


def _get(doc: dict[str, Any], dotted: str) -> Any:
    for part in dotted.split("."):
        doc = doc[part]
    return doc


def _check_report_renders(tmp_path: Path, html_path: Path, df: pd.DataFrame) -> None:
    import matplotlib.image

    shot, probe, dom = render(tmp_path, html_path)

    # the table: one row per config, every one of them
    assert dom.count("<tr data-config-id=") == len(df) == 48
    assert sorted(probe["sorted"]) == sorted(df["config_id"])
    assert "the KV cache holds" in dom and "GPUs &gt; budget 8" in dom

    # the plot: decoded, on screen, not blank, with the frontier (red) and feasible (blue)
    assert probe["src"] == "data:image/png;base64,"
    assert probe["width"] > 400 and probe["height"] > 300
    img = matplotlib.image.imread(shot)[..., :3]
    left, top, width, height = (round(v) for v in probe["rect"])
    assert width > 400 and height > 300 and top + height <= img.shape[0]
    plot = img[top:top + height, left:left + width]
    assert (plot < 0.9).any(axis=2).mean() > 0.02, "the plot region is blank"
    red = (plot[..., 0] > 0.7) & (plot[..., 1] < 0.35) & (plot[..., 2] < 0.35)
    blue = (plot[..., 2] > 0.6) & (plot[..., 0] < 0.3)
    assert red.sum() > 50 and blue.sum() > 50, "no frontier (red) or feasible (blue) marks"
