"""What both engine models' step plans share: the batch and its aggregates for the
timing model, and the run bookkeeping the cluster reads (``end_s``, ``num_steps``,
``ends``, ``committed``)."""

from __future__ import annotations

from typing import Any

from ..request import Request


class PlanBase:
    """One step, or one fast-forward run of identical decode steps."""

    __slots__ = ("committed", "ctx_d", "ends", "first_step", "k_done", "num_d", "num_p",
                 "num_steps", "preempted", "requests", "scheduled", "seqs_p", "start_s",
                 "used", "waiting_len", "work_p")

    def __init__(self, start_s: float) -> None:
        self.scheduled: list[tuple[Request, int]] = []
        self.preempted: list[Request] = []  # preempted / retracted before this step
        self.num_steps = 1
        self.committed = 0
        self.first_step = 0
        self.start_s = start_s
        self.waiting_len = 0
        self.ends: Any = ()  # step end times: a list for one step, an array for a run
        self.used: Any = ()  # KV in use, in the engine's unit
        # batch aggregates for the timing model
        self.num_p = 0  # prefill tokens
        self.work_p = 0.0  # prefill attention work, sum of n * (c + (n + 1) / 2)
        self.seqs_p = 0  # prefill chunks
        self.num_d = 0  # decoding sequences
        self.ctx_d = 0  # their context tokens, new token included
        # a fast-forward run only: its requests; steps until the first of them finishes
        self.requests: list[Request] = []
        self.k_done = 0

    @property
    def end_s(self) -> float:
        return float(self.ends[self.num_steps - 1])

    def add(self, req: Request, n: int) -> None:
        """Schedule ``n`` tokens of ``req``: a decode when it is the one token left."""
        self.scheduled.append((req, n))
        c = req.num_computed
        if n == 1 and c == req.num_tokens - 1:
            self.num_d += 1
            self.ctx_d += c + 1
        else:
            self.num_p += n
            self.work_p += n * (c + (n + 1) / 2)
            self.seqs_p += 1
