"""The Perfetto / Chrome trace export of a small real run, read back and checked."""

import gzip
import json
from collections import Counter

import pytest

from sim.engines.vllm import VllmConfig
from sim.planner import Decision, Fleet
from sim.timeline import Timeline, worker_pid
from tests.sim.factories import LinearTiming, make_trace, run_cluster

TIMING = LinearTiming(base=1.0, per_prefill_token=0.25, per_decode_seq=0.5, per_context=0.0)
CFG = VllmConfig(max_num_seqs=8, max_num_batched_tokens=64, num_gpu_blocks=64, block_size=4,
                 max_model_len=200)
REQUIRED = {"X": {"name", "ph", "ts", "dur", "pid", "tid"}, "i": {"name", "ph", "ts", "pid", "tid"},
            "C": {"name", "ph", "ts", "pid", "args"}, "M": {"name", "ph", "pid", "args"}}


@pytest.fixture(scope="module")
def outcome():
    # 2 workers, round robin; long decodes so fast-forward runs of many steps occur
    trace = make_trace([0.0, 0.0, 3.0, 4.0, 30.0], [4, 8, 2, 6, 4], [20, 12, 9, 15, 3])
    out, _ = run_cluster(trace, CFG, 2, True, TIMING)
    return out


def load(path):
    opener = gzip.open if str(path).endswith(".gz") else open
    with opener(path, "rt", encoding="utf-8") as f:
        doc = json.load(f)
    assert doc["displayTimeUnit"] == "ms"
    return doc["traceEvents"]


def check_schema(events) -> None:
    for ev in events:
        assert REQUIRED[ev["ph"]] <= ev.keys(), ev
        if ev["ph"] != "M":
            assert ev["ts"] >= 0, ev
        if ev["ph"] == "X":
            assert ev["dur"] >= 0, ev
        if ev["ph"] == "i":
            assert ev["s"] in ("t", "p", "g")
        if ev["ph"] == "C":
            assert all(isinstance(v, int | float) for v in ev["args"].values()), ev


def steps_of(events, wid):
    return [e for e in events if e["ph"] == "X" and e["pid"] == worker_pid(wid)
            and e["tid"] == 1]


def test_export_has_one_x_per_step_at_the_steplog_times(outcome, tmp_path) -> None:
    path = tmp_path / "run.json"
    n = Timeline.from_outcome(outcome).write(path)
    events = load(path)
    assert n == len(events)
    check_schema(events)
    for wid, engine in enumerate(outcome.engines):
        log = engine.steps
        xs = steps_of(events, wid)
        assert len(xs) == log.num_steps > 0
        start, end = log.column("start_s"), log.column("end_s")
        assert [e["ts"] for e in xs] == (start * 1e6).tolist()
        assert [e["dur"] for e in xs] == (end * 1e6 - start * 1e6).tolist()
        for col in ("num_prefill_tokens", "num_decode_seqs", "num_running", "num_waiting",
                    "kv_used_blocks"):
            assert [e["args"][col] for e in xs] == log.column(col).tolist()
        assert all("steps" not in e["args"] for e in xs)


def test_one_arrival_per_request_and_names(outcome, tmp_path) -> None:
    path = tmp_path / "run.json"
    Timeline.from_outcome(outcome).write(path)
    events = load(path)
    arrivals = [e for e in events if e["name"] == "arrival"]
    assert sorted(e["args"]["request_id"] for e in arrivals) == [0, 1, 2, 3, 4]
    for e in arrivals:
        req = outcome.requests[e["args"]["request_id"]]
        assert e["ts"] == req.arrival_s * 1e6 and e["pid"] == worker_pid(req.worker_id)
    assert Counter(e["name"] for e in events)["finish"] == 5
    names = {(e["name"], e["pid"], e["tid"]): e["args"] for e in events if e["ph"] == "M"}
    assert names[("process_name", 0, 0)] == {"name": "cluster"}
    for wid in (0, 1):
        assert names[("process_name", wid + 1, 0)] == {"name": f"worker {wid}"}
        assert names[("thread_name", wid + 1, 1)] == {"name": "steps"}
        assert names[("thread_name", wid + 1, 2)] == {"name": "requests"}
    assert names[("thread_name", 0, 2)] == {"name": "planner"}


def test_merged_decode_steps_sum_to_the_step_count(outcome, tmp_path) -> None:
    path = tmp_path / "run.json.gz"
    Timeline.from_outcome(outcome, max_steps_per_worker=1).write(path)
    with open(path, "rb") as f:
        assert f.read(2) == b"\x1f\x8b"  # gzip magic
    events = load(path)
    check_schema(events)
    merged_any = False
    for wid, engine in enumerate(outcome.engines):
        log = engine.steps
        xs = steps_of(events, wid)
        counts = [e["args"].get("steps", 1) for e in xs]
        assert sum(counts) == log.num_steps
        merged_any |= len(xs) < log.num_steps
        # each event begins at its first step's start and ends at its last step's end
        start, end = log.column("start_s"), log.column("end_s")
        first = 0
        for e, k in zip(xs, counts, strict=True):
            assert e["ts"] == start[first] * 1e6 and e["args"]["step"] == first
            assert e["ts"] + e["dur"] == pytest.approx(end[first + k - 1] * 1e6)
            if k > 1:
                assert e["name"] == "decode" and e["args"]["num_prefill_tokens"] == 0
                assert e["args"]["merged"] == "identical decode steps"
                seg = slice(first, first + k)
                assert len(set(log.column("num_decode_seqs")[seg].tolist())) == 1
            first += k
    assert merged_any


def test_cluster_side_events(outcome, tmp_path) -> None:
    fleet = Fleet(gpus_per_worker=2)
    fleet.add_ready(0.0)
    fleet.start(10.0, "up: kv")
    fleet.mark_ready(1, 40.0)
    fleet.drain(1, 70.0, "down")
    fleet.stop(1, 80.0)
    tl = Timeline.from_outcome(outcome)
    tl.add_fleet(fleet, until_s=100.0)
    tl.add_decision(Decision(10.0, 2, "up: kv", {"mean_kv_usage": 0.95, "isl": float("nan")}))
    tl.add_handoff(0, 1, 5.0, 5.5, request_id=3, num_blocks=4)
    tl.add_offload(1, 6.0, 6.25, "cpu", num_blocks=2)
    tl.add_preemption(0, 7.0, request_id=2, kind="retract")
    path = tmp_path / "run.json"
    tl.write(path)
    events = load(path)
    check_schema(events)
    by_name = Counter(e["name"] for e in events)
    assert by_name["planner decision"] == 1 and by_name["kv handoff"] == 1
    assert by_name["offload cpu"] == 1 and by_name["retract"] == 1
    decision = next(e for e in events if e["name"] == "planner decision")
    assert decision["args"] == {"num_workers": 2, "reason": "up: kv", "mean_kv_usage": 0.95,
                                "isl": None}
    handoff = next(e for e in events if e["name"] == "kv handoff")
    assert (handoff["pid"], handoff["ts"], handoff["dur"]) == (0, 5e6, 0.5e6)
    link = next(e for e in events if e["ph"] == "M" and e["tid"] == handoff["tid"]
                and e["pid"] == 0)
    assert link["args"] == {"name": "link w0->w1"}
    spans = {(e["name"], e["pid"]): (e["ts"], e["dur"]) for e in events
             if e["ph"] == "X" and e["tid"] == 4}
    assert spans[("starting", 2)] == (10e6, 30e6)
    assert spans[("draining", 2)] == (70e6, 10e6)
    assert spans[("starting", 1)] == (0.0, 0.0)
    life = [(e["name"], e["ts"]) for e in events if e["ph"] == "i" and e["pid"] == 2
            and e["tid"] == 4]
    assert life == [("start", 10e6), ("ready", 40e6), ("drain", 70e6), ("stop", 80e6)]
    workers = [(e["ts"], e["args"]) for e in events if e["name"] == "workers"]
    assert workers[-1] == (80e6, {"starting": 0, "ready": 1, "draining": 0})
    assert workers[2] == (10e6, {"starting": 1, "ready": 1, "draining": 0})


def test_empty_timeline_is_valid_json(tmp_path) -> None:
    path = tmp_path / "empty.json"
    assert Timeline().write(path) == 4  # the cluster process and its three threads
    check_schema(load(path))


def test_streaming_over_several_chunks(tmp_path) -> None:
    tl = Timeline()
    for i in range(10_000):  # more than one write chunk
        tl.add_preemption(i % 3, i * 0.001, request_id=i)
    path = tmp_path / "many.json"
    n = tl.write(path)
    events = load(path)
    assert n == len(events) == 10_000 + 4 + 3 * 7
    assert sorted(e["args"]["request_id"] for e in events if e["name"] == "preempt") == list(
        range(10_000))
