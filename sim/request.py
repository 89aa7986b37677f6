"""The state of one request inside an engine.

The vLLM V1 idea: a request has ``num_computed`` tokens (KV written) and
``num_tokens`` = prompt + generated tokens known so far. Each step gives it
some tokens to catch up; when it has caught up, the step samples one new token.
There is no separate prefill mode, so chunked prefill, prefix hits and recompute
after preemption all fall out of the same two counters.

Token times are not stored per token: a request records the ranges of its
worker's step indices in which it produced a token (``token_steps``, a flat
list ``[a0, b0, a1, b1, ...]`` of half-open ranges). The worker's step log holds
each step's end time, so token i's time is a lookup. A decode run of k steps
extends the last range by k in O(1).
"""

from __future__ import annotations

import numpy as np

from .kv import PrefixLayout


class Request:
    __slots__ = (
        "arrays_len",
        "arrival_s",
        "block_arrays",
        "blocks",
        "cj",
        "dtick",
        "finish_s",
        "first_token_s",
        "ftick",
        "hash_ids",
        "hashed_end",
        "hold_kv",
        "layout",
        "max_output_tokens",
        "num_cached_tokens",
        "num_computed",
        "num_output",
        "num_preemptions",
        "num_tokens",
        "pre_token_times",
        "prev_blocks",
        "prev_stamps",
        "prompt_tokens",
        "reject_reason",
        "remote_kv_tokens",
        "rid",
        "seq",
        "session_id",
        "stop_at",
        "token_steps",
        "worker_id",
    )

    def __init__(self, rid: int, arrival_s: float, prompt_tokens: int, max_output_tokens: int,
                 hash_ids: np.ndarray) -> None:
        self.rid = rid
        self.arrival_s = arrival_s
        self.prompt_tokens = prompt_tokens
        self.max_output_tokens = max_output_tokens
        self.hash_ids = hash_ids
        self.layout: PrefixLayout | None = None
        # tokens covered by the prompt's hashed full blocks (set at first lookup)
        self.hashed_end = 0
        self.num_computed = 0
        self.num_output = 0
        self.num_tokens = prompt_tokens  # prompt + generated so far
        # the request's KV block ids, in order, in two parts: int64 arrays for the first
        # ``arrays_len`` (the prompt's hit and allocated chunks, as the pool handed them
        # out), then ``blocks``, the few taken one by one since (decode steps). Prompt
        # blocks never become Python ints: hundreds per request, made and freed again
        self.block_arrays: list[np.ndarray] = []
        self.arrays_len = 0
        self.blocks: list[int] = []
        # blocks held before the last preemption and their allocation stamps:
        # a recompute can find its own uncached blocks again if not reallocated
        self.prev_blocks: np.ndarray | None = None
        self.prev_stamps: np.ndarray | None = None
        self.num_cached_tokens = -1  # set at first admission
        self.num_preemptions = 0
        self.first_token_s = float("nan")
        self.finish_s = float("nan")
        self.worker_id = -1
        self.token_steps: list[int] = []
        self.reject_reason = ""
        # disaggregated prefill/decode: the engine stops the request once it has
        # ``stop_at`` output tokens (1 on a prefill worker); ``hold_kv`` keeps its
        # blocks after that until the KV handoff ends; ``remote_kv_tokens`` prompt
        # tokens arrive with KV computed elsewhere; ``pre_token_times`` are the
        # times of tokens produced on an earlier worker (no step index here)
        self.stop_at = max_output_tokens
        self.session_id: int | None = None  # the trace's session (multi-turn chat), if any
        self.hold_kv = False
        self.remote_kv_tokens = 0
        self.pre_token_times: list[float] = []
        # vLLM engine bookkeeping: ``seq`` orders the running list; a member of the
        # engine's decode cohort (``dtick`` >= 0) has its counters valid as of engine
        # tick ``dtick`` and advances one token per tick without being visited
        # (sim/engines/vllm.py); ``ftick`` is the tick it finishes at, ``cj`` its join id
        self.seq = -1
        self.dtick = -1
        self.ftick = -1
        self.cj = -1

    def add_token_steps(self, first_step: int, num_steps: int) -> None:
        """Record that steps [first_step, first_step + num_steps) each produced a token."""
        ts = self.token_steps
        if ts and ts[-1] == first_step:
            ts[-1] = first_step + num_steps
        else:
            ts.append(first_step)
            ts.append(first_step + num_steps)

    def sample(self, step: int, end_s: float) -> None:
        """The step ``step`` (ending at ``end_s``) caught the request up: one more
        token, the first one setting the time to first token."""
        self.num_output += 1
        self.num_tokens += 1
        self.add_token_steps(step, 1)
        if self.num_output == 1:
            self.first_token_s = end_s

    def __repr__(self) -> str:
        return (f"Request({self.rid}, computed={self.num_computed}/{self.num_tokens}, "
                f"out={self.num_output}/{self.max_output_tokens})")
