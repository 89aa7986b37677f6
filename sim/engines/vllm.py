"""vLLM V1 engine model: one scheduler + KV block pool + timing model.

Behaviour follows vllm-project/vllm:vllm/v1/core/sched/scheduler.py @ v0.33.0
(``Scheduler.schedule``) and vllm/v1/core/kv_cache_manager.py (``allocate_slots``,
``get_computed_blocks``). A step is a pipeline of named phases:

1. ``_schedule_running``: the RUNNING list in order; each request gets
   min(tokens to catch up, ``long_prefill_token_threshold`` if set, budget).
   When its blocks cannot be allocated, the *last* running request is preempted
   by recompute (blocks freed, computed tokens reset, prepended to WAITING),
   repeatedly, until the allocation fits or the request preempted itself.
2. ``_schedule_waiting`` (only if step 1 preempted nothing): WAITING in FCFS
   order while budget remains and running < ``max_num_seqs``: prefix-cache
   lookup (whole blocks, at most ``num_tokens - 1`` tokens), chunk to the budget
   (without chunked prefill a prompt that does not fit stops admission),
   admission only if the blocks fit — for the whole prompt when
   ``scheduler_reserve_full_isl`` — keeping ``watermark`` of the pool free.
3. ``_time``: the step's duration from its aggregates and, when the batch is a
   pure decode batch that nothing can change, a fast-forward run (below).

Fast-forward. After a pure-decode step where every running request was
scheduled and admission refused (or nothing waits), the following steps are
identical except that each context grows by one token: no request joins
(a refusal stays a refusal: free blocks only fall, the running set is fixed),
none leaves before the first completion. The plan then covers k steps at once,
k = min(steps to the first completion, steps until the pool runs out of blocks
for the growing contexts). Blocks for steps 1..k-1 are taken lazily, in the
same (step, running order) sequence step-by-step mode takes them, when steps
are committed; a run can be cut short at any step boundary (a new arrival),
and then only the committed steps have happened.

The decode cohort. A running request that is decoding (one token to catch up,
past its hashed prompt) joins the engine's cohort: its counters are kept as of the
engine tick at which it joined (``Request.dtick``) and it advances one token per
tick without being visited. A step costs what changes in it, not the batch size:
the cohort members that need a block this step (a bucket keyed by context length
mod block size), the requests still prefilling (``_explicit``), completions (a heap
of finish ticks), preemptions. Its per-token step indices come from the engine's
tick -> step map when it leaves (finish, preemption) or is read (``sync_requests``).
When the token budget could bind inside the cohort the step falls back to the full
ordered loop over RUNNING, the cohort dissolved; results are the same either way.
"""

from __future__ import annotations

from bisect import bisect_left, bisect_right, insort
from collections import deque
from dataclasses import dataclass
from heapq import heappop, heappush

import numpy as np

from ..kv import FEW_BLOCKS, BlockPool, PrefixLayout
from ..request import Request
from ..steplog import StepLog
from ..timing import TimingModel
from .plan import PlanBase


@dataclass(frozen=True)
class VllmConfig:
    """Resolved vLLM scheduler/cache knobs (no 'auto' left)."""

    max_num_seqs: int
    max_num_batched_tokens: int
    num_gpu_blocks: int
    block_size: int = 16
    enable_chunked_prefill: bool = True
    enable_prefix_caching: bool = True
    long_prefill_token_threshold: int = 0
    scheduler_reserve_full_isl: bool = True
    watermark: float = 0.0
    max_model_len: int = 131072


_NO_LEVELS = np.empty(0, dtype=np.int8)


def cdiv(a: int, b: int) -> int:
    return -(-a // b)


def _block_range(req: Request, lo: int, hi: int) -> np.ndarray:
    """Block ids [lo, hi) of the request (``Request.block_arrays`` then ``blocks``)."""
    n = req.arrays_len
    if lo >= n:
        return np.asarray(req.blocks[lo - n:hi - n], dtype=np.int64)
    parts = req.block_arrays
    head = parts[0] if len(parts) == 1 else np.concatenate(parts)
    if hi <= n:
        return head[lo:hi]
    return np.concatenate((head[lo:], np.asarray(req.blocks[:hi - n], dtype=np.int64)))


def _take_blocks(req: Request) -> np.ndarray:
    """The request's block ids as one int64 array, in order; its blocks are emptied."""
    blocks, parts = req.blocks, req.block_arrays
    if blocks:
        parts.append(np.asarray(blocks, dtype=np.int64))
    out = (parts[0] if len(parts) == 1 else np.concatenate(parts) if parts
           else np.empty(0, dtype=np.int64))
    req.blocks = []
    req.block_arrays = []
    req.arrays_len = 0
    return out


def _by_seq(req: Request) -> int:
    return req.seq


class StepPlan(PlanBase):
    """What one step (or one fast-forward run of identical decode steps) does."""

    __slots__ = ("cohort", "ev_steps", "first_tokens", "handed", "is_run", "load_s",
                 "n_running", "tick0", "wait_bumps")

    def __init__(self, start_s: float) -> None:
        super().__init__(start_s)
        self.handed = 1  # run steps [0, handed) have their blocks (step 0's at schedule)
        self.load_s = 0.0  # KV loaded back from offload tiers during this step
        self.cohort = 0  # cohort members scheduled (each decodes one token)
        self.first_tokens: list[Request] = []  # members whose first token is step 0's
        # a run: the engine tick at its first step, the running count, and its block
        # events (step index within the run, one entry per block, in allocation order;
        # a step's blocks go to its cohort bucket's members in running order)
        self.is_run = False
        self.tick0 = 0
        self.n_running = 0
        self.ev_steps: list[int] = []
        # run steps from which one more request waits (arrivals the run absorbed)
        self.wait_bumps: list[int] = []


class VllmEngine:
    def __init__(self, config: VllmConfig, timing: TimingModel, hash_block_tokens: int,
                 num_hash_ids: int, fast_forward: bool = True, cohort: bool = True) -> None:
        """``num_hash_ids``: requests' hash ids are dense in [0, num_hash_ids).
        ``cohort=False`` (step-by-step only) visits every running request in every
        step, vLLM's loop as written: the reference the cohort is tested against."""
        if not cohort and fast_forward:
            raise ValueError("fast-forward runs rest on the decode cohort")
        self.config = config
        self.timing = timing
        # host time per finished request, paid by the next step (TimingProfile.finish_s);
        # _host_until: when the host's work for the requests finished so far ends
        self._finish_s = float(getattr(timing, "finish_s", 0.0))
        self._host_until = 0.0
        self.fast_forward = fast_forward
        self._use_cohort = cohort
        self.pool = BlockPool(config.num_gpu_blocks, config.block_size, hash_block_tokens,
                              num_hash_ids, enable_caching=config.enable_prefix_caching)
        self.hash_block_tokens = hash_block_tokens
        self.waiting: deque[Request] = deque()
        self.running: list[Request] = []
        self.steps = StepLog()
        self.num_preemptions = 0
        self.num_prefix_hit_tokens = 0
        self.num_prefix_query_tokens = 0
        self.num_offload_hit_tokens = 0  # prompt tokens loaded back from offload tiers
        self._fragile_refusal = False
        self.preemption_log: list[tuple[float, int]] = []  # (time, request id), for timelines
        self._rejected: list[Request] = []
        self._held: dict[int, np.ndarray] = {}  # rid -> blocks kept for a KV handoff
        self._watermark_blocks = int(config.watermark * self.pool.num_usable)
        # the decode cohort (module docstring)
        self.tick = 0
        self._seq = 0  # next running-order number
        self._explicit: list[Request] = []  # running requests outside the cohort, in order
        self._n_c = 0  # cohort size
        self._cbase = 0  # sum over the cohort of (num_computed - dtick)
        self._cmax_seq = -1  # >= the largest seq that joined the cohort since it dissolved
        self._buckets: list[list[Request]] = [[] for _ in range(config.block_size)]
        self._bsize = np.zeros(config.block_size, dtype=np.int64)  # their sizes
        self._j1 = np.arange(1, config.block_size + 1, dtype=np.int64)
        self._fheap: list[tuple[int, int, Request]] = []  # (finish tick, join id, request)
        self._cj = 0
        self._tk_t: list[int] = []  # tick -> step map: segments starting at these ticks
        self._tk_off: list[int] = []  # ... with step = tick + offset
        self._synced = -1  # tick at which every member was last synced

    # ---------------------------------------------------------------- intake
    def add_request(self, req: Request) -> bool:
        """Queue a request; False (and ``reject_reason`` set) if vLLM would refuse it."""
        if req.prompt_tokens + req.max_output_tokens > self.config.max_model_len:
            # vLLM's OpenAI server answers 400 when prompt + max_tokens exceeds
            # max_model_len (vllm/entrypoints/openai/serving_engine.py @ v0.33.0)
            req.reject_reason = (f"prompt {req.prompt_tokens} + output {req.max_output_tokens} "
                                 f"tokens > max_model_len {self.config.max_model_len}")
            return False
        self.waiting.append(req)
        return True

    def take_rejected(self) -> list[Request]:
        out, self._rejected = self._rejected, []
        return out

    @property
    def has_work(self) -> bool:
        return bool(self.running or self.waiting)

    # -------------------------------------------------------------- schedule
    def schedule(self, now: float) -> StepPlan | None:
        plan = StepPlan(now)
        self.pool.clock = now  # stamps the pool's KV events (a lagged router view)
        budget = self._schedule_running(plan, self.config.max_num_batched_tokens)
        refused = True
        if not plan.preempted:
            refused = self._schedule_waiting(plan, budget)
        else:
            self.preemption_log.extend((now, r.rid) for r in plan.preempted)
        if not plan.scheduled and not plan.cohort:
            return None
        self._time(plan, now, refused)
        return plan

    def batch(self, plan: StepPlan) -> list[tuple[Request, int]]:
        """The step's whole batch in running order, (request, tokens): the cohort's
        members (one token each) with the requests visited one by one. Valid between
        ``schedule`` and ``commit`` (for tests and inspection)."""
        out = [(r, 1) for r in self.running if r.dtick >= 0] if plan.cohort else []
        out.extend(plan.scheduled)
        out.sort(key=lambda x: x[0].seq)
        return out

    def _schedule_running(self, plan: StepPlan, budget: int) -> int:
        explicit = self._explicit
        n_c = self._n_c
        if n_c and (n_c >= budget or (explicit and explicit[0].seq < self._cmax_seq)):
            # the budget could run out inside the cohort, or a request still
            # prefilling sits before a cohort member: walk RUNNING in order
            self._dissolve()
            return self._schedule_in_order(plan, budget, self.running)
        if not n_c:
            return self._schedule_in_order(plan, budget, explicit)
        # the cohort comes first in running order and fits the budget: each member
        # takes one token; only those entering a new block are visited
        pool = self.pool
        bs = self.config.block_size
        tick = self.tick
        running = self.running
        needing = self._buckets[-tick % bs]
        for req in list(needing) if needing else ():
            if req.dtick < 0:
                continue  # preempted above
            c = req.num_computed + tick - req.dtick
            need = cdiv(c + 1, bs) - req.arrays_len - len(req.blocks)
            while need > pool.num_free:
                victim = running.pop()
                self._preempt(victim)
                plan.preempted.append(victim)
                if victim is req:
                    # everything after it is gone too
                    self._count_cohort(plan)
                    return budget - plan.cohort
            if need > 0:
                req.blocks.extend(pool.allocate(need))
        self._count_cohort(plan)
        return self._schedule_in_order(plan, budget - plan.cohort, explicit)

    def _count_cohort(self, plan: StepPlan) -> None:
        n = plan.cohort = self._n_c
        plan.num_d += n
        plan.ctx_d += self._cbase + n * (self.tick + 1)

    def _schedule_in_order(self, plan: StepPlan, budget: int, reqs: list[Request]) -> int:
        """vLLM's loop over RUNNING for ``reqs`` (running requests outside the cohort, in
        running order): each gets min(tokens to catch up, threshold, budget); when its
        blocks cannot be allocated the *last* running request is preempted, repeatedly,
        until they fit or the request preempted itself."""
        cfg = self.config
        pool = self.pool
        bs = cfg.block_size
        thr = cfg.long_prefill_token_threshold
        running = self.running
        sched = plan.scheduled
        num_d = ctx_d = 0
        i = 0
        while i < len(reqs) and budget > 0:
            req = reqs[i]
            c = req.num_computed
            n = req.num_tokens - c
            if n == 1 and c % bs and c >= req.hashed_end:
                # fast path: a decode inside its last block allocates and caches nothing
                sched.append((req, 1))
                num_d += 1
                ctx_d += c + 1
                budget -= 1
                i += 1
                continue
            if 0 < thr < n:
                n = thr
            n = min(n, budget)
            need = cdiv(c + n, bs) - req.arrays_len - len(req.blocks)
            preempted_self = False
            while need > pool.num_free:
                victim = running.pop()
                self._preempt(victim)
                plan.preempted.append(victim)
                if victim is req:
                    preempted_self = True
                    break
            if preempted_self:
                break
            plan.add(req, n)
            self._grow(req, n, need)
            budget -= n
            i += 1
        plan.num_d += num_d
        plan.ctx_d += ctx_d
        return budget

    # ---------------------------------------------------------------- cohort
    def _join(self, req: Request) -> None:
        """``req`` just sampled a token and decodes from now on: into the cohort."""
        tick = self.tick
        req.dtick = tick
        base = req.num_computed - tick
        req.ftick = f = tick + req.stop_at - req.num_output
        self._cj += 1
        req.cj = self._cj
        heappush(self._fheap, (f, self._cj, req))
        r = base % self.config.block_size
        bucket = self._buckets[r]
        self._bsize[r] += 1
        if bucket and bucket[-1].seq > req.seq:
            insort(bucket, req, key=_by_seq)
        else:
            bucket.append(req)
        self._n_c += 1
        self._cbase += base
        if req.seq > self._cmax_seq:
            self._cmax_seq = req.seq

    def _leave(self, req: Request) -> None:
        """Out of the cohort, counters and token steps brought up to date."""
        self._sync(req)
        base = req.num_computed - req.dtick
        r = base % self.config.block_size
        self._buckets[r].remove(req)
        self._bsize[r] -= 1
        self._n_c -= 1
        self._cbase -= base
        req.dtick = -1
        req.cj = -1

    def _sync(self, req: Request) -> None:
        """Bring a member's counters and token steps up to the engine's tick."""
        a = req.dtick
        b = self.tick
        if a == b:
            return
        d = b - a
        req.num_computed += d
        req.num_output += d
        req.num_tokens += d
        req.dtick = b
        tk_t = self._tk_t
        tk_off = self._tk_off
        i = bisect_right(tk_t, a) - 1
        last = len(tk_t) - 1
        ts = req.token_steps
        while a < b:
            e = b if i == last else min(b, tk_t[i + 1])
            off = tk_off[i]
            s0 = a + off
            if ts and ts[-1] == s0:
                ts[-1] = e + off
            else:
                ts.append(s0)
                ts.append(e + off)
            a = e
            i += 1

    def _advance(self, first_step: int, m: int) -> None:
        """The cohort took ``m`` tokens in steps [first_step, first_step + m)."""
        off = first_step - self.tick
        if not self._tk_off or self._tk_off[-1] != off:
            self._tk_t.append(self.tick)
            self._tk_off.append(off)
        self.tick += m

    def _dissolve(self) -> None:
        """Every member back to explicit counters (the in-order loop visits them)."""
        for req in self.running:
            if req.dtick >= 0:
                self._sync(req)
                req.dtick = -1
                req.cj = -1
        self._explicit = list(self.running)
        for b in self._buckets:
            b.clear()
        self._bsize[:] = 0
        self._fheap.clear()
        self._n_c = 0
        self._cbase = 0
        self._cmax_seq = -1

    def sync_requests(self) -> None:
        """Bring every running request's counters up to date (for readers outside)."""
        if self._synced == self.tick or not self._n_c:
            return
        self._synced = self.tick
        for req in self.running:
            if req.dtick >= 0:
                self._sync(req)

    def _schedule_waiting(self, plan: StepPlan, budget: int) -> bool:
        """Admit from WAITING; True if admission stopped on a refusal (or nothing waits)."""
        cfg = self.config
        pool = self.pool
        bs = cfg.block_size
        self._fragile_refusal = False
        while self.waiting and budget > 0:
            if len(self.running) >= cfg.max_num_seqs:
                return True
            req = self.waiting[0]
            hit = self._lookup(req)
            computed = int(hit.size) * bs
            low = _NO_LEVELS  # tiers of the blocks found below the GPU (offload)
            if req.remote_kv_tokens > computed:
                # disaggregated decode: the prompt's KV arrived from a prefill worker
                # (blocks this worker lacked were transferred); only the first
                # sampled token's KV is left to compute
                computed = req.remote_kv_tokens
            elif pool.lower is not None and pool.enable_caching:
                low = self._lower_hits(req, int(hit.size))
                computed += len(low) * bs
            n = req.num_tokens - computed
            if 0 < cfg.long_prefill_token_threshold < n:
                n = cfg.long_prefill_token_threshold
            if not cfg.enable_chunked_prefill and n > budget:
                return True
            n = min(n, budget)
            evictable = int(np.count_nonzero(pool.ref[hit] == 0)) if hit.size else 0
            check_tokens = req.num_tokens if cfg.scheduler_reserve_full_isl else computed + n
            need_check = cdiv(check_tokens, bs) - int(hit.size) + evictable
            # the watermark holds back waiting requests only while something runs
            # (vllm/v1/core/kv_cache_manager.py @ v0.33.0, allocate_slots)
            watermark = self._watermark_blocks if self.running else 0
            if need_check > pool.num_free - watermark:
                if not self.running:
                    # can never fit, even with an empty engine: refuse instead of hanging
                    self.waiting.popleft()
                    req.reject_reason = (f"needs {need_check} KV blocks, pool has "
                                         f"{pool.num_usable} usable")
                    self._rejected.append(req)
                    continue
                # a refusal that a decode run's block allocations can overturn: they
                # may evict this request's free cached blocks, which lowers its need
                # when only the scheduled chunk is reserved (with the full prompt
                # reserved the need is the prompt's blocks less the hit blocks in use,
                # which evictions never lower), or, with offload tiers, put blocks it
                # lacks into a tier
                self._fragile_refusal = ((evictable > 0 and not cfg.scheduler_reserve_full_isl)
                                         or pool.lower is not None)
                return True
            self.waiting.popleft()
            pool.touch(hit)
            req.blocks = []
            req.block_arrays = [hit] if hit.size else []
            req.arrays_len = int(hit.size)
            req.num_computed = computed
            if req.num_cached_tokens < 0:
                req.num_cached_tokens = computed
                self.num_prefix_hit_tokens += computed
                self.num_prefix_query_tokens += req.num_tokens
                self.num_offload_hit_tokens += len(low) * bs
            plan.add(req, n)
            if low.size:  # read the tiers' copies before this admission's own evictions
                assert pool.lower is not None
                low_keys = self._layout(req).keys[hit.size:hit.size + len(low)]
                plan.load_s += pool.lower.load(low_keys, low)
            self._grow(req, n, cdiv(computed + n, bs) - int(hit.size))
            if req.remote_kv_tokens:
                self._cache_transferred(req, int(hit.size))
            if low.size:  # the loaded blocks are indexed on the GPU again
                pool.cache(_block_range(req, int(hit.size), int(hit.size) + len(low)),
                           low_keys)
            req.seq = self._seq
            self._seq += 1
            self.running.append(req)
            self._explicit.append(req)
            budget -= n
        return True

    def _lower_hits(self, req: Request, num_hit: int) -> np.ndarray:
        """Tiers of the prompt blocks after the GPU hit that an offload tier holds."""
        assert self.pool.lower is not None
        layout = self._layout(req)
        limit = min(layout.num_hashed, (req.num_tokens - 1) // self.config.block_size)
        if num_hit >= limit:
            return _NO_LEVELS
        return self.pool.lower.match(layout.keys[num_hit:limit])

    def _cache_transferred(self, req: Request, num_hit: int) -> None:
        """Index the full prompt blocks that came with a KV handoff (as vLLM caches
        a remote prefill's blocks once loaded); later requests may hit them."""
        layout = self._layout(req)
        hi = min(layout.num_hashed, req.remote_kv_tokens // self.config.block_size)
        if hi > num_hit:
            self.pool.cache(_block_range(req, num_hit, hi), layout.keys[num_hit:hi])
        req.remote_kv_tokens = 0

    def lacking_tokens(self, req: Request) -> int:
        """Prompt tokens whose KV this worker would need sent: the prompt less its
        cached prefix here (whole blocks)."""
        if not self.pool.enable_caching:
            return req.prompt_tokens
        layout = self._layout(req)
        hit = self.pool.lookup(layout.keys[: min(layout.num_hashed,
                                                  req.prompt_tokens // self.config.block_size)])
        return req.prompt_tokens - int(hit.size) * self.config.block_size

    def _lookup(self, req: Request) -> np.ndarray:
        """Block ids of the request's cached prefix (vLLM get_computed_blocks)."""
        pool = self.pool
        if not pool.enable_caching:
            return np.empty(0, dtype=np.int64)
        bs = self.config.block_size
        layout = self._layout(req)
        # at least one token is recomputed to produce logits
        max_blocks = (req.num_tokens - 1) // bs
        hit = pool.lookup(layout.keys[: min(layout.num_hashed, max_blocks)])
        prev = req.prev_blocks
        if prev is not None and hit.size == layout.num_hashed and prev.size > hit.size:
            # own blocks past the hashed prompt, still untouched since the preemption
            tail = prev[hit.size:max_blocks]
            assert req.prev_stamps is not None
            ok = pool.free_stamp[tail] == req.prev_stamps[hit.size:hit.size + tail.size]
            bad = np.flatnonzero(~ok)
            keep = tail if bad.size == 0 else tail[: bad[0]]
            if keep.size:
                hit = np.concatenate([hit, keep])
        return hit

    def _layout(self, req: Request) -> PrefixLayout:
        layout = req.layout
        if layout is None:
            layout = req.layout = PrefixLayout(req.hash_ids, req.prompt_tokens,
                                               self.config.block_size, self.hash_block_tokens)
            req.hashed_end = layout.num_hashed * self.config.block_size
        return layout

    def _grow(self, req: Request, n: int, need: int) -> None:
        """Allocate ``need`` blocks for ``n`` new tokens and cache prompt blocks they fill."""
        pool = self.pool
        bs = self.config.block_size
        first_new = req.arrays_len + len(req.blocks)
        new = None
        if need > FEW_BLOCKS:  # a prompt chunk: kept as the array it came as
            new = pool.allocate_array(need)
            if req.blocks:  # blocks taken one by one before it go into the arrays first
                req.block_arrays.append(np.asarray(req.blocks, dtype=np.int64))
                req.blocks = []
            req.block_arrays.append(new)
            req.arrays_len = first_new + need
        elif need > 0:
            req.blocks.extend(pool.allocate(need))
        if req.num_computed < req.hashed_end:
            layout = self._layout(req)
            lo = min(req.num_computed // bs, layout.num_hashed)
            hi = min((req.num_computed + n) // bs, layout.num_hashed)
            if hi > lo:
                # vLLM caches blocks at allocation, before the step computes them;
                # a request admitted later in the same step may hit them
                if new is not None and lo >= first_new:
                    ids = new[lo - first_new:hi - first_new]
                else:
                    ids = _block_range(req, lo, hi)
                pool.cache(ids, layout.keys[lo:hi])

    def _preempt(self, req: Request) -> None:
        if req.dtick >= 0:
            self._leave(req)
        else:
            self._explicit.remove(req)
        bs = self.config.block_size
        blocks = _take_blocks(req)
        self.pool.free(blocks)
        # remember the full blocks and their free-queue stamps: while a stamp is
        # unchanged the block was not reallocated, so its content is still there
        full = blocks[: req.num_computed // bs]
        req.prev_blocks = full
        req.prev_stamps = self.pool.free_stamp[full].copy()
        req.num_computed = 0
        req.num_preemptions += 1
        self.num_preemptions += 1
        self.waiting.appendleft(req)

    # ------------------------------------------------------------------ time
    def _time(self, plan: StepPlan, now: float, refused: bool) -> None:
        plan.first_step = self.steps.num_steps
        # what is left at ``now`` of the host's work for requests that finished: the
        # step shares the host with it (none if the engine idled through it)
        host = self._host_until - now if self._host_until > now else 0.0
        self._host_until = 0.0
        plan.waiting_len = len(self.waiting)
        used0 = self.pool.num_used
        if (self.fast_forward and plan.num_p == 0 and not plan.preempted and refused
                and not plan.load_s and len(plan.scheduled) == len(self._explicit)):
            if plan.scheduled:
                # decodes outside the cohort (a prompt whose last chunk was one token,
                # a dissolved cohort): into it, so that the run covers them too
                for req, _ in plan.scheduled:
                    self._join(req)
                    if req.num_output == 0:
                        plan.first_tokens.append(req)
                plan.cohort += len(plan.scheduled)
                plan.scheduled = []
                self._explicit = []
            k = self._plan_run(plan)
            if k > 1:
                dts = self.timing.decode_run_times(plan.num_d, plan.ctx_d, k)
                dts[0] += host
                dts[0] += now  # a running sum from now, added in step-by-step order
                plan.ends = np.cumsum(dts)
                plan.used = [used0]
                return
            plan.is_run = False
            plan.num_steps = 1
        dt = self.timing.step_time(plan.num_p, plan.work_p, plan.seqs_p, plan.num_d, plan.ctx_d)
        dt += host
        dt += plan.load_s
        plan.ends = [now + dt]
        plan.used = [used0]

    def _first_finish(self) -> int:
        heap = self._fheap
        while heap[0][2].cj != heap[0][1]:
            heappop(heap)  # left the cohort (preempted) since it was pushed
        return heap[0][0]

    def _plan_run(self, plan: StepPlan) -> int:
        """Length k of the decode run starting with this step (every running request
        is a cohort member); sets its block events.

        Step j >= 1 of the run needs a new block for a member with c computed tokens
        at the start iff (c + j) % block_size == 0: the members of one bucket at once,
        every block_size steps. Events are listed in the order step-by-step mode
        allocates them: by step, then running order.
        """
        tick = self.tick
        k_done = self._first_finish() - tick
        if k_done <= 1:
            return 1
        bs = self.config.block_size
        n_c = self._n_c
        free = self.pool.num_free
        ev_steps: list[int] = []
        if n_c * 4 <= bs:
            # few members: one entry each (running == the cohort here), plain Python;
            # firsts: the first step >= 1 at which each member takes a block
            firsts = sorted((-(r.num_computed - r.dtick + tick)) % bs or bs
                            for r in self.running)
            # the first event that cannot get a block ends the run before its step
            q, r = divmod(free, n_c)
            k = min(k_done, q * bs + firsts[r])
            if self._fragile_refusal:
                k = min(k, firsts[0])  # decide again once the run has taken a block
            base = 0
            while base + 1 < k:
                for j0 in firsts:
                    j = base + j0
                    if j >= k:
                        break
                    ev_steps.append(j)
                base += bs
        else:
            # the buckets' sizes in the order of their first step 1 .. bs: bucket r
            # takes blocks at steps j with (r + tick + j) % bs == 0
            sizes = self._bsize[(-tick - self._j1) % bs]
            cum = np.cumsum(sizes)
            q, r = divmod(free, n_c)
            k = min(k_done, q * bs + int(np.searchsorted(cum, r, side="right")) + 1)
            if self._fragile_refusal:
                k = min(k, int(np.flatnonzero(sizes)[0]) + 1)
            if k > 1:
                js = np.arange(1, k, dtype=np.int64)
                ev_steps = np.repeat(js, sizes[(js - 1) % bs]).tolist()
        plan.is_run = True
        plan.tick0 = tick
        plan.n_running = len(self.running)
        plan.k_done = k_done
        plan.ev_steps = ev_steps
        plan.num_steps = k
        return k

    # ---------------------------------------------------------------- commit
    def truncate(self, plan: StepPlan, num_steps: int) -> None:
        """Cut a run to its first ``num_steps`` steps (>= the committed ones)."""
        plan.num_steps = max(num_steps, plan.committed, 1)

    def commit(self, plan: StepPlan, upto: int) -> list[Request]:
        """Apply the plan's steps [committed, upto); return requests that finished."""
        lo = plan.committed
        if upto <= lo:
            return []
        plan.committed = upto
        if plan.is_run:
            return self._commit_run(plan, lo, upto)
        end = plan.ends[0]
        idx = plan.first_step
        self.steps.append(plan.start_s, end, plan.used[0], len(self.running),
                          plan.waiting_len, plan.num_p, plan.num_d)
        if plan.cohort:
            self._advance(idx, 1)
            for req in plan.first_tokens:
                req.first_token_s = end
        done = self._finishing()
        if plan.scheduled:
            joined = False
            for req, n in plan.scheduled:
                c = req.num_computed = req.num_computed + n
                if c == req.num_tokens:
                    req.sample(idx, end)
                    if req.num_output >= req.stop_at:
                        done.append(req)
                    elif self._use_cohort:
                        self._join(req)
                        joined = True
            if joined:
                self._explicit = [r for r in self._explicit if r.dtick < 0]
        return self._finish(end, done)

    def _finishing(self) -> list[Request]:
        """Cohort members whose last token came with the current tick (they leave)."""
        heap = self._fheap
        tick = self.tick
        done: list[Request] = []
        while heap and heap[0][0] <= tick:
            f, cj, req = heappop(heap)
            if req.cj == cj:
                assert f == tick, "a cohort member ran past its last token"
                self._leave(req)
                done.append(req)
        return done

    def absorbs_arrival(self, plan: StepPlan, now: float) -> bool:
        """A request that arrived at ``now`` (already queued) during a run: True if it
        cannot change the run. It cannot when the run's admission refused a waiting
        request: it queues behind it, and nothing the refusal rests on (running
        count, free blocks, budget) eases before the run ends (a fragile refusal
        ends the run at its first block). The steps that start from ``now`` on
        count one more waiting request."""
        if not plan.is_run or plan.waiting_len == 0:
            return False
        j = bisect_left(plan.ends, now) + 1  # the first step that starts at or after now
        if j < plan.num_steps:
            plan.wait_bumps.append(j)
        return True

    def _commit_run(self, plan: StepPlan, lo: int, hi: int) -> list[Request]:
        bumps = plan.wait_bumps
        if bumps and bumps[0] < hi:
            # one step-log segment per waiting count
            cuts = sorted({b for b in bumps if lo < b < hi})
            for x, y in zip([lo, *cuts], [*cuts, hi], strict=True):
                self._log_run(plan, x, y, plan.waiting_len + bisect_right(bumps, x))
        else:
            self._log_run(plan, lo, hi, plan.waiting_len)
        self._advance(plan.first_step + lo, hi - lo)
        if lo == 0:
            for req in plan.first_tokens:
                req.first_token_s = float(plan.ends[0])
        self._hand_out_blocks(plan, hi)
        if hi < plan.k_done:
            return []  # a run ends its requests only in step k_done - 1
        return self._finish(float(plan.ends[hi - 1]), self._finishing())

    def _log_run(self, plan: StepPlan, lo: int, hi: int, waiting: int) -> None:
        start = plan.start_s if lo == 0 else float(plan.ends[lo - 1])
        ev = plan.ev_steps
        a = bisect_right(ev, lo)  # blocks taken in steps up to lo are in use at lo
        b = bisect_left(ev, hi)
        n = plan.n_running
        self.steps.extend(start, plan.ends[lo:hi], plan.used[0] + a, ev[a:b], n, waiting, 0, n,
                          block_offset=-lo)

    def _hand_out_blocks(self, plan: StepPlan, hi: int) -> None:
        """Allocate the blocks of run steps [handed, hi), in the planned event order."""
        a = plan.handed
        if hi <= a:
            return
        plan.handed = hi
        steps = plan.ev_steps
        lo_ev = bisect_left(steps, a)
        hi_ev = bisect_left(steps, hi)
        if hi_ev == lo_ev:
            return
        pool = self.pool
        if pool._plog is not None:
            # a lagged router view reads each eviction's time: take the blocks step by
            # step, stamped with the step's start, as step-by-step mode does
            ids = []
            i = lo_ev
            while i < hi_ev:
                j = bisect_right(steps, steps[i], i, hi_ev)
                st = steps[i]
                pool.clock = plan.start_s if st == 0 else float(plan.ends[st - 1])
                ids.extend(pool.allocate(j - i) if pool.lower is None
                           else [pool.allocate(1)[0] for _ in range(j - i)])
                i = j
        elif pool.lower is None:
            ids = pool.allocate(hi_ev - lo_ev)
        else:
            # one block at a time, as step-by-step mode takes them: what each eviction
            # writes to the offload tiers then happens in the same order and grouping
            ids = [pool.allocate(1)[0] for _ in range(hi_ev - lo_ev)]
        # a step's blocks go to the members of its bucket, in running order (the
        # cohort cannot change during a run); every member takes one block each
        # block_size steps, so from the first event on the recipients repeat with a
        # period of one block_size of steps: built once, repeated as a list
        buckets = self._buckets
        bs = self.config.block_size
        t0 = plan.tick0
        first = steps[lo_ev]
        period: list[Request] = []
        for j in range(first, first + bs):
            period.extend(buckets[-(t0 + j) % bs])
        assert period and buckets[-(t0 + first) % bs], "a run's block events and buckets disagree"
        n = hi_ev - lo_ev
        reps = -(-n // len(period))
        recipients = period * reps if reps > 1 else period
        assert recipients[n - 1] in buckets[-(t0 + steps[hi_ev - 1]) % bs], \
            "a run's block events and its cohort buckets disagree"
        for req, b in zip(recipients, ids, strict=False):  # ids: the first n
            req.blocks.append(b)

    def start_step(self, plan: StepPlan, j: int) -> None:
        """Run step ``j`` has started (its predecessors are committed): take its blocks
        now, as step-by-step mode does when it schedules the step, so that anything
        reading the pool mid-run (a KV-aware router, a planner) sees the same state."""
        if plan.is_run:
            self._hand_out_blocks(plan, j + 1)

    def _finish(self, end: float, done: list[Request]) -> list[Request]:
        if not done:
            return done
        if len(done) > 1:
            done.sort(key=_by_seq)  # running order
        gone = {r.rid for r in done}
        self.running = [r for r in self.running if r.rid not in gone]
        if self._explicit:
            self._explicit = [r for r in self._explicit if r.rid not in gone]
        for req in done:
            if req.hold_kv:
                # a prefill worker keeps the KV until the decode side has read it
                # (vLLM's NixlConnector frees after the transfer: request_finished
                # returns delay_free_blocks; vllm-project/vllm:
                # vllm/distributed/kv_transfer/kv_connector/v1/nixl_connector.py @ v0.33.0)
                self._held[req.rid] = _take_blocks(req)
            else:
                req.finish_s = end
                self.pool.free(_take_blocks(req))
                if self._finish_s:
                    # the host ends the response while the engine runs on
                    self._host_until = max(self._host_until, end) + self._finish_s
        return done

    def release(self, req: Request) -> None:
        """Free the blocks a finished prefill held for its KV handoff."""
        self.pool.free(self._held.pop(req.rid))

    @property
    def num_held_blocks(self) -> int:
        return sum(int(b.size) for b in self._held.values())
