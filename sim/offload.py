"""KV offload tiers below the GPU block pool: host memory, optionally disk.

A full prompt block that the GPU pool evicts (its block is reallocated) is
written down to the first tier; a tier that is full pushes its least recently
used block to the next tier (or drops it from the last). At admission, after
the GPU prefix hit, the request's next blocks are looked up tier by tier
(each block in whichever tier holds it, the run stops at the first block no
tier holds): those blocks are loaded back into fresh GPU blocks and count as
computed. A hit refreshes the block's place in its tier (LRU); the copy stays.

Cost. Loading ``n`` blocks from a tier takes ``n x block_bytes / bandwidth``
and is added to the duration of the step that admits the request: vLLM's KV
connector API loads inside the forward pass (``start_load_kv`` before it,
``wait_for_layer_load`` per layer; vllm-project/vllm:
vllm/distributed/kv_transfer/kv_connector/v1/base.py @ v0.33.0, as LMCache's
connector uses it). Layer-wise overlap with compute is not modelled (the cost
is added, an upper bound). Writes down are asynchronous there and free here.

Keys are the block pool's prefix keys (``sim.kv``), so a tier's content is
exact, block for block. Python dicts in insertion order keep the LRU order.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np


@dataclass(frozen=True)
class TierSpec:
    name: str
    capacity_blocks: int
    bandwidth_bytes_per_s: float

    def __post_init__(self) -> None:
        if self.capacity_blocks < 1:
            raise ValueError(f"offload tier {self.name}: capacity_blocks = "
                             f"{self.capacity_blocks}: must be >= 1")
        if not self.bandwidth_bytes_per_s > 0:
            raise ValueError(f"offload tier {self.name}: bandwidth = "
                             f"{self.bandwidth_bytes_per_s}: must be > 0")


class OffloadTiers:
    def __init__(self, tiers: list[TierSpec], block_bytes: float) -> None:
        self.specs = list(tiers)
        self.block_bytes = float(block_bytes)
        self._held: list[dict[int, None]] = [{} for _ in tiers]
        self.num_stored = [0] * len(tiers)
        self.num_dropped = 0
        self.hit_blocks = [0] * len(tiers)
        self.load_s = 0.0

    def store(self, keys: np.ndarray | list[int]) -> None:
        """Blocks the GPU pool evicted, in eviction order, go to the first tier."""
        for k in (keys.tolist() if isinstance(keys, np.ndarray) else keys):
            self._put(0, k)

    def _put(self, level: int, key: int) -> None:
        while True:
            held = self._held[level]
            if key in held:
                del held[key]  # refreshed: moves to the most recent end
            held[key] = None
            self.num_stored[level] += 1
            if len(held) <= self.specs[level].capacity_blocks:
                return
            key = next(iter(held))  # least recently used
            del held[key]
            level += 1
            if level == len(self._held):
                self.num_dropped += 1
                return

    def match(self, keys: np.ndarray) -> list[int]:
        """The tier of each block in the leading run of ``keys`` that some tier holds
        (no side effects: admission may still be refused)."""
        levels: list[int] = []
        held = self._held
        for k in keys.tolist():
            for level, h in enumerate(held):
                if k in h:
                    levels.append(level)
                    break
            else:
                break
        return levels

    def load(self, keys: np.ndarray, levels: list[int]) -> float:
        """Load matched blocks back up: refresh them, count the hits, return seconds."""
        seconds = 0.0
        for k, level in zip(keys.tolist(), levels, strict=True):
            h = self._held[level]
            del h[k]
            h[k] = None
            self.hit_blocks[level] += 1
            seconds += self.block_bytes / self.specs[level].bandwidth_bytes_per_s
        self.load_s += seconds
        return seconds

    def held_blocks(self, level: int) -> int:
        return len(self._held[level])

    def summary(self, block_size: int) -> list[dict[str, float | int | str]]:
        return [{"tier": s.name, "capacity_blocks": s.capacity_blocks,
                 "blocks_held": len(h), "blocks_stored": st, "hit_blocks": hb,
                 "hit_tokens": hb * block_size}
                for s, h, st, hb in zip(self.specs, self._held, self.num_stored,
                                        self.hit_blocks, strict=True)]
