"""Token-granular KV pool with a radix-tree prefix cache (SGLang's RadixAttention).

Modelled on sgl-project/sglang:python/sglang/srt/mem_cache/radix_cache.py and
evict_policy.py @ v0.5.x:

* The pool holds ``capacity_tokens`` KV slots. A slot belongs either to the tree
  (cached content, shared) or privately to one running request (tokens not yet
  inserted: a chunk in flight, decoded tokens). ``free = capacity - tree - private``.
* Tree nodes are edges of token runs; a running request locks the path from its
  last matched node to the root (``lock_ref``). Unlocked nodes are *evictable*.
* Eviction removes unlocked leaves in the order of a policy's key function (LRU
  by default); a parent whose last child went becomes a candidate in turn.
* Match returns the longest cached prefix, splitting a node so the match ends
  exactly at a node boundary (SGLang's ``_split_node`` on a partial match).

Content without tokens. A trace names a prompt by hash ids of T-token blocks,
chained (id k names the whole prefix through block k). The token at position p
is identified by its *label*: the hash id of block p // T while p is inside the
hashed prompt, else a label unique to the request (``-(rid + 1)``: its own
generated tokens, equal only to themselves). A sequence is a short list of
segments ``(label, end_pos)``; nodes store the same. Matching and inserting walk
segments, never tokens::

    request A  [ h7 : 0..512 | h8 : 512..900 | -1 : 900.. ]
    request B  [ h7 : 0..512 | h9 : 512..1024 | -2 : 1024.. ]
    tree       root -> (0..512: h7) -> (512..900: h8, -1...)   A's branch
                                    -> (512..1024: h9)         B's branch

With ``page_size`` > 1 matches and inserts are floored to whole pages.
"""

from __future__ import annotations

import heapq
from collections.abc import Callable, Iterator
from typing import Any

# a request's unique segment runs to "infinity"
END = 1 << 62

Segments = list[tuple[int, int]]  # (label, end position), ascending ends


class Node:
    __slots__ = ("children", "created", "end", "hit_count", "last_access", "lock_ref",
                 "parent", "segs", "start")

    def __init__(self, parent: Node | None, start: int, end: int, segs: Segments,
                 stamp: int) -> None:
        self.parent = parent
        self.start = start
        self.end = end
        self.segs = segs
        # keyed by the first page's labels (RadixCache.key): with pages of one token
        # the first token's label
        self.children: dict[Any, Node] = {}
        self.lock_ref = 0
        self.last_access = stamp
        self.created = stamp
        self.hit_count = 0

    @property
    def num_tokens(self) -> int:
        return self.end - self.start

    def __repr__(self) -> str:
        return f"Node({self.start}..{self.end}, lock={self.lock_ref})"


# Eviction policies are key functions: the smallest key is evicted first
# (sgl-project/sglang:python/sglang/srt/mem_cache/evict_policy.py @ v0.5.x).
EVICTION_POLICIES: dict[str, Callable[[Node], Any]] = {
    "lru": lambda n: (n.last_access, n.created),
    "lfu": lambda n: (n.hit_count, n.last_access, n.created),
    "fifo": lambda n: (n.created, n.last_access),
}


def request_segments(hash_ids: Any, prompt_tokens: int, hash_block_tokens: int,
                     rid: int) -> Segments:
    """Labels of a request's tokens: one segment per hashed prompt block, then its own."""
    segs: Segments = []
    t = hash_block_tokens
    if t > 0:
        for b, h in enumerate(hash_ids):
            end = min((b + 1) * t, prompt_tokens)
            if end <= b * t:
                break
            segs.append((int(h), end))
    segs.append((-(rid + 1), END))
    return segs


def _label_at(segs: Segments, pos: int) -> int:
    for label, end in segs:
        if end > pos:
            return label
    raise IndexError(pos)


def _page_key(segs: Segments, pos: int, page: int) -> Any:
    """The labels of tokens [pos, pos + page) as (label, run length) pairs: SGLang keys
    a node's children by their first page (RadixCache.get_child_key with page_size > 1,
    sgl-project/sglang:python/sglang/srt/mem_cache/radix_cache.py @ v0.5.x), so two
    sequences that differ inside the first page are siblings, not one child."""
    out = []
    hi = pos + page
    for label, end in segs:
        if end <= pos:
            continue
        out.append((label, min(end, hi) - pos))
        pos = min(end, hi)
        if pos >= hi:
            break
    return tuple(out)


def _common(node: Node, segs: Segments, hi: int) -> int:
    """First position in [node.start, hi) where node and sequence differ (hi if none)."""
    p = node.start
    i = j = 0
    ns = node.segs
    while p < hi:
        while segs[i][1] <= p:
            i += 1
        while ns[j][1] <= p:
            j += 1
        if segs[i][0] != ns[j][0]:
            return p
        p = min(segs[i][1], ns[j][1], hi)
    return hi


def _clip(segs: Segments, lo: int, hi: int) -> Segments:
    out: Segments = []
    for label, end in segs:
        if end <= lo:
            continue
        out.append((label, min(end, hi)))
        if end >= hi:
            break
    return out


class RadixCache:
    def __init__(self, capacity_tokens: int, page_size: int = 1, policy: str = "lru",
                 enable: bool = True) -> None:
        if policy not in EVICTION_POLICIES:
            raise ValueError(f"eviction policy {policy!r}: use one of "
                             f"{', '.join(EVICTION_POLICIES)}")
        self.capacity_tokens = capacity_tokens
        self.page_size = page_size
        self.enable = enable
        self.key = EVICTION_POLICIES[policy]
        self._clock = 0
        self.root = Node(None, 0, 0, [], 0)
        self.root.lock_ref = 1  # never evicted
        self.num_tree_tokens = 0
        self.num_evictable_tokens = 0
        self.num_private_tokens = 0
        self.num_nodes = 0
        # the nodes without children, root aside: eviction's candidates, kept as the tree
        # changes (collecting them by a walk of the whole tree at every eviction, as
        # SGLang does, was an eighth of the SGLang scenario's run)
        self._leaf_set: set[Node] = set()

    # metrics.py reads pool.num_usable / num_blocks: here the unit is one token
    @property
    def num_usable(self) -> int:
        return self.capacity_tokens

    @property
    def num_blocks(self) -> int:
        return self.capacity_tokens

    @property
    def num_free(self) -> int:
        return self.capacity_tokens - self.num_tree_tokens - self.num_private_tokens

    @property
    def num_used(self) -> int:
        """Slots in use, evictable cache excluded (SGLang's token usage)."""
        return self.capacity_tokens - self.num_free - self.num_evictable_tokens

    def key_at(self, segs: Segments, pos: int) -> Any:
        """A child's key for a sequence at ``pos`` (a node's: its segs at its start)."""
        if self.page_size == 1:
            return _label_at(segs, pos)
        return _page_key(segs, pos, self.page_size)

    def _tick(self) -> int:
        self._clock += 1
        return self._clock

    # ------------------------------------------------------------- match
    def match(self, segs: Segments, limit: int) -> tuple[int, Node]:
        """Longest cached prefix of at most ``limit`` tokens: (length, last node)."""
        node = self.root
        if not self.enable:
            return 0, node
        limit -= limit % self.page_size
        pos = 0
        stamp = self._tick()
        while pos < limit:
            child = node.children.get(self.key_at(segs, pos))
            if child is None:
                break
            m = _common(child, segs, min(child.end, limit))
            m -= (m - child.start) % self.page_size
            if m <= child.start:
                break
            if m < child.end:
                child = self._split(child, m)
            child.last_access = stamp
            child.hit_count += 1
            node = child
            pos = m
        return pos, node

    def _split(self, child: Node, p: int) -> Node:
        """Cut ``child`` at p; the new upper node [start, p) is returned."""
        parent = child.parent
        assert parent is not None
        mid = Node(parent, child.start, p, _clip(child.segs, child.start, p), child.created)
        mid.lock_ref = child.lock_ref
        mid.last_access = child.last_access
        mid.hit_count = child.hit_count
        parent.children[self.key_at(child.segs, child.start)] = mid
        child.segs = _clip(child.segs, p, child.end)
        child.start = p
        child.parent = mid
        mid.children[self.key_at(child.segs, child.start)] = child
        self.num_nodes += 1
        return mid

    # ------------------------------------------------------------ insert
    def insert(self, segs: Segments, length: int) -> tuple[int, Node]:
        """Cache the sequence's first ``length`` tokens (floored to pages).

        Returns (tokens that were already cached, node ending at the inserted
        length). The caller's private slots for the rest pass to the tree."""
        length -= length % self.page_size
        pos, node = self.match(segs, length)
        if pos < length:
            leaf = Node(node, pos, length, _clip(segs, pos, length), self._tick())
            node.children[self.key_at(leaf.segs, leaf.start)] = leaf
            self._leaf_set.discard(node)
            self._leaf_set.add(leaf)
            self.num_nodes += 1
            n = length - pos
            self.num_tree_tokens += n
            self.num_evictable_tokens += n  # unlocked until a request locks it
            node = leaf
        return pos, node

    # ------------------------------------------------------------- locks
    def lock(self, node: Node) -> None:
        n: Node | None = node
        while n is not None and n is not self.root:
            if n.lock_ref == 0:
                self.num_evictable_tokens -= n.num_tokens
            n.lock_ref += 1
            n = n.parent

    def unlock(self, node: Node) -> None:
        n: Node | None = node
        while n is not None and n is not self.root:
            n.lock_ref -= 1
            assert n.lock_ref >= 0
            if n.lock_ref == 0:
                self.num_evictable_tokens += n.num_tokens
            n = n.parent

    # ---------------------------------------------------------- eviction
    def evict(self, num_tokens: int) -> int:
        """Remove unlocked leaves in policy order until ``num_tokens`` are freed."""
        if num_tokens <= 0 or self.num_evictable_tokens == 0:
            return 0
        key = self.key
        heap = [(key(n), id(n), n) for n in self._leaf_set if n.lock_ref == 0]
        heapq.heapify(heap)
        freed = 0
        while freed < num_tokens and heap:
            _, _, node = heapq.heappop(heap)
            parent = node.parent
            assert parent is not None
            del parent.children[self.key_at(node.segs, node.start)]
            self._leaf_set.discard(node)
            if parent is not self.root and not parent.children:
                self._leaf_set.add(parent)
            freed += node.num_tokens
            self.num_tree_tokens -= node.num_tokens
            self.num_evictable_tokens -= node.num_tokens
            self.num_nodes -= 1
            if parent is not self.root and not parent.children and parent.lock_ref == 0:
                heapq.heappush(heap, (key(parent), id(parent), parent))
        return freed

    def _leaves(self) -> list[Node]:
        """The leaves by a walk of the tree (``_leaf_set`` as it must be; for tests)."""
        out: list[Node] = []
        stack = [self.root]
        while stack:
            n = stack.pop()
            if n.children:
                stack.extend(n.children.values())
            elif n is not self.root:
                out.append(n)
        return out

    # ------------------------------------------------------ private slots
    def allocate(self, num_tokens: int) -> bool:
        """Take private slots, evicting cache if needed; False if they cannot be had."""
        short = num_tokens - self.num_free
        if short > 0:
            self.evict(short)
            if num_tokens > self.num_free:
                return False
        self.num_private_tokens += num_tokens
        return True

    def release(self, num_tokens: int) -> None:
        self.num_private_tokens -= num_tokens
        assert self.num_private_tokens >= 0

    def _walk(self, segs: Segments, limit: int) -> Iterator[tuple[Node, int]]:
        """The nodes ``match`` would pass, read only: (node, matched end in it), the
        last one possibly matched part-way (``match`` would split it there)."""
        if not self.enable:
            return
        page = self.page_size
        limit -= limit % page
        node = self.root
        pos = 0
        while pos < limit:
            child = node.children.get(self.key_at(segs, pos))
            if child is None:
                return
            m = _common(child, segs, min(child.end, limit))
            m -= (m - child.start) % page
            if m <= child.start:
                return
            yield child, m
            if m < child.end:
                return
            node, pos = child, m

    def peek(self, segs: Segments, limit: int) -> int:
        """``match``'s length without its effects (no access stamps or hit counts, no
        split): what a router reading this cache sees."""
        ends = [m for _, m in self._walk(segs, limit)]
        return ends[-1] if ends else 0

    # ------------------------------------------------- fast-forward replay
    def match_path(self, segs: Segments, limit: int) -> list[Node] | None:
        """The nodes ``match`` would touch, without touching them; None if ``match``
        would split a node (the tree would change: no replay then)."""
        path: list[Node] = []
        for child, m in self._walk(segs, limit):
            if m < child.end:
                return None
            path.append(child)
        return path

    def replay_matches(self, paths: list[list[Node]], rounds: int) -> None:
        """The effect of calling ``match`` ``rounds`` times over the same sequence of
        calls whose touched paths are ``paths`` (an unchanged tree): each call ticks
        the clock once and stamps and counts its path. A node ends with the stamp of
        its last touch in the last round."""
        if not self.enable or rounds <= 0 or not paths:
            return
        per_round = len(paths)
        count: dict[Node, int] = {}
        last: dict[Node, int] = {}
        for i, path in enumerate(paths):
            for n in path:
                count[n] = count.get(n, 0) + 1
                last[n] = i
        base = self._clock + (rounds - 1) * per_round + 1
        for n, c in count.items():
            n.hit_count += rounds * c
            n.last_access = base + last[n]
        self._clock += rounds * per_round
