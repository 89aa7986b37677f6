"""Prompts as exact token-id lists that reproduce a trace's shared prefixes.

A trace names a prompt's prefix by hash ids, one per ``block_tokens`` tokens, chained:
two requests share id k exactly when they share every token up to the end of block k
(sim/workload). The builder turns each id into one fixed block of random token ids and
a prompt into its blocks laid end to end, cut to the prompt's length; the tokens past
its hashed blocks are unique to the request::

    request A  [ block 0 ][ block 1 ][ block 2 ][ tail A ... ]
    request B  [ block 0 ][ block 1 ][ block 7 ][ tail B ]
                ^^^^^^^^^^^^^^^^^^^^ the same token ids: an engine's prefix cache hits

Token ids come from a stable hash, SHAKE-128 of ``"servetwin-prompt:{seed}:block:{hash_id}"``
for a block and ``"...:tail:{request_id}"`` for a tail, read as little-endian uint32 and
mapped to [vocab_low, vocab_high) by modulo (the bias is below 1e-5 for any real vocab):
the same seed gives the same token ids in any process and on any platform (vLLM's
timed_trace seeds from Python's salted ``hash()`` of a string and does not). A hash, not a
seeded numpy Generator, because building a Generator per request costs ~20 us and a
load generator at thousands of requests/s cannot spend that. Blocks are cached, with
their JSON text, since a load generator sends the same blocks many times.
"""

from __future__ import annotations

import hashlib
from collections.abc import Sequence
from typing import Protocol, TypeAlias

import numpy as np

HashIds: TypeAlias = Sequence[int] | np.ndarray  # a trace row's ids (a numpy slice)


class Prompt(Protocol):
    """What a planned request sends: a token-id list, also as the JSON text inside
    its brackets (``"12,7,301"``), which the load generator splices into the body."""

    def __len__(self) -> int: ...

    def token_ids(self) -> list[int]: ...

    def json_items(self) -> str: ...


class FixedPrompt:
    """A prompt given as token ids (tests, hand-made plans)."""

    __slots__ = ("_ids",)

    def __init__(self, token_ids: Sequence[int]) -> None:
        self._ids = [int(t) for t in token_ids]

    def __len__(self) -> int:
        return len(self._ids)

    def token_ids(self) -> list[int]:
        return list(self._ids)

    def json_items(self) -> str:
        return ",".join(map(str, self._ids))


class TracePrompt:
    """One request's prompt, built when it is sent (a long trace's prompts would not fit
    in memory at once)."""

    __slots__ = ("builder", "hash_ids", "length", "request_id")

    def __init__(self, builder: PromptBuilder, request_id: int, hash_ids: HashIds,
                 length: int) -> None:
        self.builder = builder
        self.request_id = request_id
        self.hash_ids = hash_ids
        self.length = length

    def __len__(self) -> int:
        return self.length

    def token_ids(self) -> list[int]:
        return self.builder.token_ids(self.request_id, self.hash_ids, self.length)

    def json_items(self) -> str:
        return self.builder.json_items(self.request_id, self.hash_ids, self.length)


class PromptBuilder:
    def __init__(self, seed: int, block_tokens: int, vocab_low: int = 10,
                 vocab_high: int = 30000) -> None:
        if block_tokens < 1:
            raise ValueError(f"block_tokens = {block_tokens}: must be >= 1")
        if not 0 <= vocab_low < vocab_high <= 2**32:
            raise ValueError(f"vocab [{vocab_low}, {vocab_high}): need 0 <= low < high <= 2^32")
        if seed < 0:
            raise ValueError(f"seed = {seed}: must be >= 0")
        self.seed = seed
        self.block_tokens = block_tokens
        self.vocab_low = vocab_low
        self.vocab_high = vocab_high
        self._blocks: dict[int, tuple[np.ndarray, str]] = {}

    def _draw(self, stream: str, key: int, n: int) -> np.ndarray:
        if key < 0:
            raise ValueError(f"{stream} key {key}: must be >= 0")
        raw = hashlib.shake_128(b"servetwin-prompt:%d:%s:%d" % (self.seed, stream.encode(), key))
        words = np.frombuffer(raw.digest(4 * n), dtype="<u4").astype(np.int64)
        return words % (self.vocab_high - self.vocab_low) + self.vocab_low

    def block(self, hash_id: int) -> np.ndarray:
        """The ``block_tokens`` token ids of one hash id."""
        return self._block(int(hash_id))[0]

    def _block(self, hash_id: int) -> tuple[np.ndarray, str]:
        got = self._blocks.get(hash_id)
        if got is None:
            ids = self._draw("block", hash_id, self.block_tokens)
            ids.setflags(write=False)
            got = self._blocks[hash_id] = (ids, ",".join(map(str, ids.tolist())))
        return got

    def prompt(self, request_id: int, hash_ids: HashIds, length: int) -> TracePrompt:
        return TracePrompt(self, request_id, hash_ids, length)

    def _tail(self, request_id: int, n: int) -> np.ndarray:
        return self._draw("tail", int(request_id), n)

    def token_ids(self, request_id: int, hash_ids: HashIds, length: int) -> list[int]:
        out: list[int] = []
        for h in hash_ids:
            if len(out) >= length:
                break
            out.extend(self._block(int(h))[0][: length - len(out)].tolist())
        if len(out) < length:
            out.extend(self._tail(request_id, length - len(out)).tolist())
        return out

    def json_items(self, request_id: int, hash_ids: HashIds, length: int) -> str:
        """``token_ids`` as JSON text without brackets, from cached block texts."""
        bt = self.block_tokens
        parts: list[str] = []
        covered = 0
        for h in hash_ids:
            if covered >= length:
                break
            ids, text = self._block(int(h))
            if covered + bt <= length:
                parts.append(text)
                covered += bt
            else:
                parts.append(",".join(map(str, ids[: length - covered].tolist())))
                covered = length
        if covered < length:
            parts.append(",".join(map(str, self._tail(request_id, length - covered).tolist())))
        return ",".join(parts)
