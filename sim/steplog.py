"""Per-engine log of forward passes, one row per step.

Step-by-step mode appends one step at a time; a fast-forward run appends whole
arrays. Only the end time is stored per step; the rest is stored once per
segment (a single step or a run) and expanded on demand: KV blocks in use as
the segment's first value plus the steps at which one more block was taken.
A long trace's millions of steps stay small.
"""

from __future__ import annotations

import numpy as np

COLUMNS = ("start_s", "end_s", "kv_used_blocks", "num_running", "num_waiting",
           "num_prefill_tokens", "num_decode_seqs")
_PER_SEGMENT = ("num_running", "num_waiting", "num_prefill_tokens", "num_decode_seqs")


class StepLog:
    def __init__(self) -> None:
        self._ends: list[np.ndarray] = []
        self._pend_ends: list[float] = []
        # one entry per segment
        self._seg_used: list[int] = []
        # the step of each extra block taken, as given: offsets in its run + the run's
        # shift, one (count, shift) per run; added up on demand (no work per block here)
        self._block_steps: list[int] = []
        self._block_counts: list[int] = []
        self._block_shifts: list[int] = []
        self._seg_len: list[int] = []
        self._seg_start: list[float] = []
        self._seg_vals: dict[str, list[int]] = {k: [] for k in _PER_SEGMENT}
        self.num_steps = 0

    def append(self, start_s: float, end_s: float, kv_used_blocks: int, num_running: int,
               num_waiting: int, num_prefill_tokens: int, num_decode_seqs: int) -> None:
        self._pend_ends.append(end_s)
        self._seg_used.append(kv_used_blocks)
        self._segment(1, start_s, num_running, num_waiting, num_prefill_tokens, num_decode_seqs)

    def extend(self, start_s: float, end_s: np.ndarray, kv_used_blocks: int,
               block_steps: list[int] | np.ndarray, num_running: int, num_waiting: int,
               num_prefill_tokens: int, num_decode_seqs: int, block_offset: int = 0) -> None:
        """A run of steps; ``kv_used_blocks`` in its first step, one more block
        in use from each step ``j + block_offset`` for j in ``block_steps`` (sorted;
        offsets >= 1 into the run)."""
        n = int(end_s.size)
        if n == 0:
            return
        self._flush()
        self._ends.append(end_s)
        self._seg_used.append(kv_used_blocks)
        if len(block_steps):
            self._block_steps.extend(block_steps.tolist() if isinstance(block_steps, np.ndarray)
                                     else block_steps)
            self._block_counts.append(len(block_steps))
            self._block_shifts.append(self.num_steps + block_offset)
        self._segment(n, start_s, num_running, num_waiting, num_prefill_tokens, num_decode_seqs)

    def _segment(self, n: int, start_s: float, num_running: int, num_waiting: int,
                 num_prefill_tokens: int, num_decode_seqs: int) -> None:
        self._seg_len.append(n)
        self._seg_start.append(start_s)
        vals = self._seg_vals
        vals["num_running"].append(num_running)
        vals["num_waiting"].append(num_waiting)
        vals["num_prefill_tokens"].append(num_prefill_tokens)
        vals["num_decode_seqs"].append(num_decode_seqs)
        self.num_steps += n

    def _flush(self) -> None:
        if self._pend_ends:
            self._ends.append(np.asarray(self._pend_ends, dtype=np.float64))
            self._pend_ends = []

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
        lens = np.asarray(self._seg_len, dtype=np.int64)
        if name == "kv_used_blocks":
            used = np.repeat(np.asarray(self._seg_used, dtype=np.int64), lens)
            if self._block_steps:
                extra = np.zeros(self.num_steps, dtype=np.int64)
                at = np.asarray(self._block_steps, dtype=np.int64)
                at += np.repeat(np.asarray(self._block_shifts, dtype=np.int64),
                                np.asarray(self._block_counts, dtype=np.int64))
                np.add.at(extra, at, 1)
                extra = np.cumsum(extra)
                first = np.cumsum(lens) - lens
                before = np.where(first > 0, extra[np.maximum(first - 1, 0)], 0)
                used += extra - np.repeat(before, lens)
            return used
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
