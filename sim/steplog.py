"""Per-engine log of forward passes, one row per step, stored in numpy chunks.

Step-by-step mode appends one row at a time (kept in Python lists until the
next flush); a fast-forward run appends whole arrays. Both end up in the same
columns, so the two modes are compared column for column.
"""

from __future__ import annotations

import numpy as np

COLUMNS = ("start_s", "end_s", "kv_used_blocks", "num_running", "num_waiting",
           "num_prefill_tokens", "num_decode_seqs")
_DTYPES = (np.float64, np.float64, np.int64, np.int64, np.int64, np.int64, np.int64)


class StepLog:
    def __init__(self) -> None:
        self._chunks: list[list[np.ndarray]] = [[] for _ in COLUMNS]
        self._pending: list[list[float | int]] = [[] for _ in COLUMNS]
        self.num_steps = 0

    def append(self, start_s: float, end_s: float, kv_used_blocks: int, num_running: int,
               num_waiting: int, num_prefill_tokens: int, num_decode_seqs: int) -> None:
        p = self._pending
        p[0].append(start_s)
        p[1].append(end_s)
        p[2].append(kv_used_blocks)
        p[3].append(num_running)
        p[4].append(num_waiting)
        p[5].append(num_prefill_tokens)
        p[6].append(num_decode_seqs)
        self.num_steps += 1

    def extend(self, start_s: np.ndarray, end_s: np.ndarray, kv_used_blocks: np.ndarray,
               num_running: int, num_waiting: int, num_prefill_tokens: int,
               num_decode_seqs: int) -> None:
        n = int(end_s.size)
        if n == 0:
            return
        self._flush()
        cols = (start_s, end_s, kv_used_blocks, np.full(n, num_running), np.full(n, num_waiting),
                np.full(n, num_prefill_tokens), np.full(n, num_decode_seqs))
        for chunks, col, dt in zip(self._chunks, cols, _DTYPES, strict=True):
            chunks.append(np.asarray(col, dtype=dt))
        self.num_steps += n

    def _flush(self) -> None:
        if not self._pending[0]:
            return
        for chunks, pend, dt in zip(self._chunks, self._pending, _DTYPES, strict=True):
            chunks.append(np.asarray(pend, dtype=dt))
            pend.clear()

    def column(self, name: str) -> np.ndarray:
        self._flush()
        i = COLUMNS.index(name)
        chunks = self._chunks[i]
        if not chunks:
            return np.empty(0, dtype=_DTYPES[i])
        if len(chunks) > 1:
            self._chunks[i] = [np.concatenate(chunks)]
        return self._chunks[i][0]

    def columns(self) -> dict[str, np.ndarray]:
        return {name: self.column(name) for name in COLUMNS}
