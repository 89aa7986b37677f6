"""Synthetic workloads: `SyntheticSpec` (rate, arrival and length laws, shared prefixes,
multi-turn sessions) and `synthesize`, which turns one into a seeded `Trace`."""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any, NamedTuple

import numpy as np

from sim.errors import TraceError

from ._validate import (
    MAX_SYNTHETIC_REQUESTS,
    MAX_TOKENS,
    _bad,
    _build,
    _need_choice,
    _need_int,
    _need_number,
)
from .laws import gamma_arrivals, length_spec
from .trace import MOONCAKE_BLOCK_TOKENS, Trace, _gather_blocks

# ------------------------------------------------------------------- synthetic spec


@dataclass(frozen=True)
class PrefixGroups:
    """Requests share one of `num_groups` prefixes (e.g. system prompts) of `prefix_tokens`."""

    num_groups: int
    prefix_tokens: int  # only its full hash blocks are shared
    distribution: str = "uniform"  # uniform | zipf (P(group g) ~ 1 / (g + 1) ** exponent)
    zipf_exponent: float | None = None  # zipf only; default 1.0

    def check(self, path: str) -> None:
        _need_int(f"{path}.num_groups", self.num_groups, 1, 1_000_000)
        _need_int(f"{path}.prefix_tokens", self.prefix_tokens, 1, MAX_TOKENS)
        _need_choice(f"{path}.distribution", self.distribution, ("uniform", "zipf"))
        if self.zipf_exponent is not None:
            if self.distribution != "zipf":
                raise _bad(
                    f"{path}.zipf_exponent",
                    self.zipf_exponent,
                    "applies only to distribution: zipf",
                    "remove it or use zipf",
                )
            _need_number(f"{path}.zipf_exponent", self.zipf_exponent, 0)

    def pick(self, rng: np.random.Generator, n: int) -> np.ndarray:
        if self.distribution == "uniform":
            return rng.integers(0, self.num_groups, size=n, dtype=np.int64)
        weights = (np.arange(self.num_groups) + 1.0) ** -(self.zipf_exponent or 1.0)
        return rng.choice(self.num_groups, size=n, p=weights / weights.sum()).astype(np.int64)


@dataclass(frozen=True)
class Sessions:
    """Multi-turn chats. Turn 0's prompt is the (group prefix +) `input_tokens` draw; turn t's
    is turn t-1's prompt + its output + `user_tokens` new tokens. Turn t+1 arrives
    `think_time_s` after turn t *arrives* (not after it finishes: a trace is open-loop)."""

    num_sessions: int
    turns_per_session: int
    user_tokens: Any  # a length spec (FixedLength, ..., int or mapping)
    think_time_s: float = 0.0
    think_time_kind: str = "fixed"  # fixed | exponential (mean think_time_s)

    def check(self, path: str) -> None:
        _need_int(f"{path}.num_sessions", self.num_sessions, 1, MAX_SYNTHETIC_REQUESTS)
        _need_int(
            f"{path}.turns_per_session",
            self.turns_per_session,
            1,
            MAX_SYNTHETIC_REQUESTS // int(self.num_sessions),
        )
        length_spec(self.user_tokens, f"{path}.user_tokens")
        _need_number(f"{path}.think_time_s", self.think_time_s, 0)
        _need_choice(f"{path}.think_time_kind", self.think_time_kind, ("fixed", "exponential"))


@dataclass(frozen=True)
class SyntheticSpec:
    """A generated workload: `num_requests` requests (or, with `sessions`, sessions starting)
    at `rate_per_s` by the arrival law, lengths drawn from the length laws."""

    rate_per_s: float
    input_tokens: Any  # length spec; with `prefix`, the tokens after the shared prefix
    output_tokens: Any  # length spec
    num_requests: int | None = None  # required without sessions; forbidden with them
    arrival: str = "poisson"  # poisson | gamma
    burstiness: float = 1.0  # gamma only: < 1 burstier than Poisson, > 1 smoother
    rescale_to_rate: bool = False  # vLLM's rescale: last arrival exactly at n / rate
    prefix: PrefixGroups | None = None
    sessions: Sessions | None = None
    hash_block_tokens: int = MOONCAKE_BLOCK_TOKENS  # one block size for replayed and made-up
    # piecewise-constant load: [[start_s, multiplier], ...] from 0, each multiplying rate_per_s
    # until the next start (the last holds); bursts and lulls for a planner to follow
    rate_schedule: Any = None

    @classmethod
    def from_mapping(cls, mapping: Any, path: str = "workload.synthetic") -> SyntheticSpec:
        spec = _build(
            cls,
            mapping,
            path,
            {
                "input_tokens": length_spec,
                "output_tokens": length_spec,
                "prefix": lambda v, p: _build(PrefixGroups, v, p),
                "sessions": lambda v, p: _build(Sessions, v, p, {"user_tokens": length_spec}),
            },
        )
        spec.check(path)
        return spec

    def check(self, path: str = "workload.synthetic") -> None:
        _need_number(f"{path}.rate_per_s", self.rate_per_s, 0, lo_open=True)
        length_spec(self.input_tokens, f"{path}.input_tokens")
        length_spec(self.output_tokens, f"{path}.output_tokens")
        _need_choice(f"{path}.arrival", self.arrival, ("poisson", "gamma"))
        _need_number(f"{path}.burstiness", self.burstiness, 0, lo_open=True)
        if self.arrival == "poisson" and self.burstiness != 1:
            raise _bad(
                f"{path}.burstiness",
                self.burstiness,
                "applies only to arrival: gamma",
                "set arrival: gamma or remove burstiness",
            )
        if not isinstance(self.rescale_to_rate, bool):
            raise _bad(
                f"{path}.rescale_to_rate",
                self.rescale_to_rate,
                "must be true or false",
                "write true or false",
            )
        _need_int(f"{path}.hash_block_tokens", self.hash_block_tokens, 1, MAX_TOKENS)
        if self.rate_schedule is not None:
            _check_schedule(self.rate_schedule, f"{path}.rate_schedule")
        if self.sessions is None:
            _need_int(f"{path}.num_requests", self.num_requests, 1, MAX_SYNTHETIC_REQUESTS)
        elif self.num_requests is not None:
            raise _bad(
                f"{path}.num_requests",
                self.num_requests,
                "is set by sessions (num_sessions x turns_per_session)",
                "remove num_requests",
            )
        for key, spec in (("prefix", self.prefix), ("sessions", self.sessions)):
            kind = PrefixGroups if key == "prefix" else Sessions
            if spec is not None and not isinstance(spec, kind):
                raise _bad(f"{path}.{key}", spec, f"must be a {kind.__name__}", "build it so")
            if spec is not None:
                spec.check(f"{path}.{key}")


# ----------------------------------------------------------------------- synthesize


class _Rows(NamedTuple):
    arrival_s: np.ndarray
    input_tokens: np.ndarray
    output_tokens: np.ndarray
    conversation: np.ndarray  # rows of one conversation: each prompt extends the previous
    group: np.ndarray  # prefix group, -1 for none
    session_ids: np.ndarray


def synthesize(spec: SyntheticSpec | Mapping[str, Any], rng: np.random.Generator) -> Trace:
    """A seeded synthetic trace: same spec and generator state, same arrays."""
    if not isinstance(spec, SyntheticSpec):
        spec = SyntheticSpec.from_mapping(spec)
    spec.check()
    rows = _session_rows(spec, rng) if spec.sessions else _independent_rows(spec, rng)
    if rows.input_tokens.max() > MAX_TOKENS:
        raise TraceError(
            "",
            f"workload.synthetic: prompts reach {rows.input_tokens.max()} tokens,"
            f" over {MAX_TOKENS}",
            "use fewer turns or shorter lengths",
        )
    shared_blocks = spec.prefix.prefix_tokens // spec.hash_block_tokens if spec.prefix else 0
    offsets, ids = _chained_hash_ids(rows, shared_blocks, spec.hash_block_tokens)
    order = np.argsort(rows.arrival_s, kind="stable")  # ties keep session, then turn order
    offsets, ids = _gather_blocks(offsets, ids, order)
    return Trace.checked(
        arrival_s=rows.arrival_s[order],
        input_tokens=rows.input_tokens[order],
        output_tokens=rows.output_tokens[order],
        hash_offsets=offsets,
        hash_ids=_renumbered_by_first_use(ids),
        hash_block_tokens=spec.hash_block_tokens,
        session_ids=rows.session_ids[order],
        source=f"synthesize({spec})",
    )


def _arrivals(spec: SyntheticSpec, rng: np.random.Generator, n: int) -> np.ndarray:
    if spec.rate_schedule is None:
        return gamma_arrivals(
            rng, n, spec.rate_per_s, spec.burstiness, rescale_to_rate=spec.rescale_to_rate
        )
    # time change: a unit-rate process u_i mapped through the inverse of the cumulative
    # rate Lambda(t) = rate_per_s * integral of the multiplier (piecewise linear)
    u = gamma_arrivals(rng, n, 1.0, spec.burstiness)
    starts = np.array([float(s) for s, _ in spec.rate_schedule])
    rates = spec.rate_per_s * np.array([float(m) for _, m in spec.rate_schedule])
    cum = np.concatenate(([0.0], np.cumsum(rates[:-1] * np.diff(starts))))
    k = np.searchsorted(cum, u, side="right") - 1
    return starts[k] + (u - cum[k]) / rates[k]


def _check_schedule(schedule: Any, path: str) -> None:
    fix = "write [[0, 1.0], [600, 4.0], ...]: start seconds from 0, increasing, multipliers > 0"
    if not isinstance(schedule, list | tuple) or not schedule:
        raise _bad(path, schedule, "must be a non-empty list of [start_s, multiplier]", fix)
    prev = -1.0
    for i, entry in enumerate(schedule):
        ok = (isinstance(entry, list | tuple) and len(entry) == 2
              and all(isinstance(x, int | float) and not isinstance(x, bool) for x in entry))
        if not ok:
            raise _bad(f"{path}[{i}]", entry, "must be [start_s, multiplier]", fix)
        start, mult = float(entry[0]), float(entry[1])
        if (i == 0 and start != 0) or start <= prev or not mult > 0 or not np.isfinite(mult):
            raise _bad(f"{path}[{i}]", entry, "starts from 0 and increases; multiplier > 0",
                       fix)
        prev = start


def _groups_and_prefix(
    spec: SyntheticSpec, rng: np.random.Generator, n: int
) -> tuple[np.ndarray, int]:
    if spec.prefix is None:
        return np.full(n, -1, np.int64), 0
    return spec.prefix.pick(rng, n), spec.prefix.prefix_tokens


def _independent_rows(spec: SyntheticSpec, rng: np.random.Generator) -> _Rows:
    n = int(spec.num_requests or 0)
    arrival_s = _arrivals(spec, rng, n)
    group, prefix_tokens = _groups_and_prefix(spec, rng, n)
    inputs = prefix_tokens + length_spec(spec.input_tokens, "input_tokens").sample(rng, n)
    outputs = length_spec(spec.output_tokens, "output_tokens").sample(rng, n)
    return _Rows(arrival_s, inputs, outputs, np.arange(n), group, np.full(n, -1, np.int64))


def _session_rows(spec: SyntheticSpec, rng: np.random.Generator) -> _Rows:
    sessions = spec.sessions
    assert sessions is not None
    num, turns = int(sessions.num_sessions), int(sessions.turns_per_session)
    start_s = _arrivals(spec, rng, num)
    if sessions.think_time_kind == "fixed":
        think_s = np.full((num, turns - 1), float(sessions.think_time_s))
    else:
        think_s = rng.exponential(sessions.think_time_s, size=(num, turns - 1))
    group, prefix_tokens = _groups_and_prefix(spec, rng, num)
    first = prefix_tokens + length_spec(spec.input_tokens, "input_tokens").sample(rng, num)
    user = length_spec(sessions.user_tokens, "user_tokens").sample(rng, num * (turns - 1))
    outputs = length_spec(spec.output_tokens, "output_tokens").sample(rng, num * turns)
    outputs = outputs.reshape(num, turns)
    # prompt[t] = prompt[t-1] + output[t-1] + user[t]: the chat history is resent every turn.
    inputs = first[:, None] + _cumsum_from_zero(outputs[:, :-1] + user.reshape(num, turns - 1))
    arrival_s = start_s[:, None] + _cumsum_from_zero(think_s)
    session = np.repeat(np.arange(num, dtype=np.int64), turns)
    return _Rows(
        arrival_s.ravel(),
        inputs.ravel(),
        outputs.ravel(),
        session,
        np.repeat(group, turns),
        session,
    )


def _cumsum_from_zero(steps: np.ndarray) -> np.ndarray:
    """Per row: 0, s0, s0+s1, ... (one more column than `steps`)."""
    return np.concatenate(
        [np.zeros((steps.shape[0], 1), steps.dtype), np.cumsum(steps, axis=1)], axis=1
    )


def _chained_hash_ids(
    rows: _Rows, shared_blocks: int, block_tokens: int
) -> tuple[np.ndarray, np.ndarray]:
    """Prefix-chained block ids. A conversation only grows, so every row holding block k in
    full holds the same tokens up to its end; likewise rows of one prefix group for
    k < shared_blocks. A partial last block is unique to its row.

        block_tokens=4, 2 shared:   turn 0  |g0 g1|c0 c1|p0 .|        g: group prefix blocks
                                    turn 1  |g0 g1|c0 c1|c2 c3|p1 |   c: conversation blocks
                                                                      p: per-row partial block
    """
    inputs, conversation, group = rows.input_tokens, rows.conversation, rows.group
    num_blocks = -(-inputs // block_tokens)
    full = inputs // block_tokens
    offsets = np.concatenate([[0], np.cumsum(num_blocks)]).astype(np.int64)
    row = np.repeat(np.arange(inputs.size), num_blocks)
    k = np.arange(offsets[-1]) - offsets[:-1][row]
    shared = np.where(group >= 0, shared_blocks, 0)
    slots = np.zeros(int(conversation.max()) + 1, np.int64)
    np.maximum.at(slots, conversation, full - shared)
    group_ids = (int(group.max()) + 1) * shared_blocks
    conversation_base = group_ids + np.concatenate([[0], np.cumsum(slots)[:-1]])
    partial_base = group_ids + int(slots.sum())
    ids = np.where(
        k < shared[row],
        group[row] * shared_blocks + k,
        np.where(
            k < full[row],
            conversation_base[conversation[row]] + k - shared[row],
            partial_base + row,
        ),
    )
    return offsets, ids.astype(np.int64)


def _renumbered_by_first_use(ids: np.ndarray) -> np.ndarray:
    """Ids 0, 1, 2, ... in order of first appearance, as in Mooncake's files."""
    unique, first, inverse = np.unique(ids, return_index=True, return_inverse=True)
    rank = np.empty(unique.size, np.int64)
    rank[np.argsort(first, kind="stable")] = np.arange(unique.size)
    return rank[inverse.ravel()]
