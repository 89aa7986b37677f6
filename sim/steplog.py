"""Per-engine log of forward passes, one row per step.

Step-by-step mode appends one step at a time; a fast-forward run appends whole
arrays. Only what changes from step to step is stored per step (end time, KV
blocks in use); the rest is stored once per segment (a single step or a run)
and expanded on demand, so a long trace's millions of steps stay small.
"""

from __future__ import annotations

import numpy as np

COLUMNS = ("start_s", "end_s", "kv_used_blocks", "num_running", "num_waiting",
           "num_prefill_tokens", "num_decode_seqs")
_PER_SEGMENT = ("num_running", "num_waiting", "num_prefill_tokens", "num_decode_seqs")


class StepLog:
    def __init__(self) -> None:
        self._ends: list[np.ndarray] = []
        self._used: list[np.ndarray] = []
        self._pend_ends: list[float] = []
        self._pend_used: list[int] = []
        # one entry per segment
        self._seg_len: list[int] = []
        self._seg_start: list[float] = []
        self._seg_vals: dict[str, list[int]] = {k: [] for k in _PER_SEGMENT}
        self.num_steps = 0

    def append(self, start_s: float, end_s: float, kv_used_blocks: int, num_running: int,
               num_waiting: int, num_prefill_tokens: int, num_decode_seqs: int) -> None:
        self._pend_ends.append(end_s)
        self._pend_used.append(kv_used_blocks)
        self._segment(1, start_s, num_running, num_waiting, num_prefill_tokens, num_decode_seqs)

    def extend(self, start_s: float, end_s: np.ndarray, kv_used_blocks: np.ndarray,
               num_running: int, num_waiting: int, num_prefill_tokens: int,
               num_decode_seqs: int) -> None:
        n = int(end_s.size)
        if n == 0:
            return
        self._flush()
        self._ends.append(end_s)
        self._used.append(kv_used_blocks)
        self._segment(n, start_s, num_running, num_waiting, num_prefill_tokens, num_decode_seqs)

    def _segment(self, n: int, start_s: float, *vals: int) -> None:
        self._seg_len.append(n)
        self._seg_start.append(start_s)
        for k, v in zip(_PER_SEGMENT, vals, strict=True):
            self._seg_vals[k].append(v)
        self.num_steps += n

    def _flush(self) -> None:
        if self._pend_ends:
            self._ends.append(np.asarray(self._pend_ends, dtype=np.float64))
            self._used.append(np.asarray(self._pend_used, dtype=np.int64))
            self._pend_ends = []
            self._pend_used = []

    def _joined(self, chunks: list[np.ndarray], dtype: type) -> np.ndarray:
        self._flush()
        if not chunks:
            return np.empty(0, dtype=dtype)
        if len(chunks) > 1:
            chunks[:] = [np.concatenate(chunks)]
        return chunks[0]

    def column(self, name: str) -> np.ndarray:
        if name == "end_s":
            return self._joined(self._ends, np.float64)
        if name == "kv_used_blocks":
            return self._joined(self._used, np.int64)
        lens = np.asarray(self._seg_len, dtype=np.int64)
        if name == "start_s":
            ends = self.column("end_s")
            starts = np.empty_like(ends)
            starts[1:] = ends[:-1]
            first = np.cumsum(lens) - lens
            starts[first] = self._seg_start
            return starts
        if name in self._seg_vals:
            return np.repeat(np.asarray(self._seg_vals[name], dtype=np.int64), lens)
        raise KeyError(name)

    def columns(self) -> dict[str, np.ndarray]:
        return {name: self.column(name) for name in COLUMNS}
