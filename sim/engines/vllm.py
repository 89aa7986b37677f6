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
"""

from __future__ import annotations

from bisect import bisect_left, bisect_right
from collections import deque
from dataclasses import dataclass

import numpy as np

from ..kv import BlockPool, PrefixLayout
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


class StepPlan(PlanBase):
    """What one step (or one fast-forward run of identical decode steps) does."""

    __slots__ = ("ev_owner", "ev_steps", "handed", "load_s")

    def __init__(self, start_s: float) -> None:
        super().__init__(start_s)
        self.handed = 1  # run steps [0, handed) have their blocks (step 0's at schedule)
        self.load_s = 0.0  # KV loaded back from offload tiers during this step
        # a run's block events: (step index within the run, index of the request), in
        # allocation order
        self.ev_steps: list[int] = []
        self.ev_owner: list[int] = []


class VllmEngine:
    def __init__(self, config: VllmConfig, timing: TimingModel, hash_block_tokens: int,
                 num_hash_ids: int, fast_forward: bool = True) -> None:
        """``num_hash_ids``: requests' hash ids are dense in [0, num_hash_ids)."""
        self.config = config
        self.timing = timing
        self.fast_forward = fast_forward
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
        self._held: dict[int, list[int]] = {}  # rid -> blocks kept for a KV handoff
        self._watermark_blocks = int(config.watermark * self.pool.num_usable)

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
        if not plan.scheduled:
            return None
        self._time(plan, now, refused)
        return plan

    def _schedule_running(self, plan: StepPlan, budget: int) -> int:
        cfg = self.config
        pool = self.pool
        bs = cfg.block_size
        thr = cfg.long_prefill_token_threshold
        running = self.running
        sched = plan.scheduled
        num_d = ctx_d = 0
        i = 0
        while i < len(running) and budget > 0:
            req = running[i]
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
            need = cdiv(c + n, bs) - len(req.blocks)
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
            req.blocks = hit.tolist()
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
                pool.cache(np.asarray(req.blocks[hit.size:hit.size + len(low)],
                                      dtype=np.int64), low_keys)
            self.running.append(req)
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
            self.pool.cache(np.asarray(req.blocks[num_hit:hi], dtype=np.int64),
                            layout.keys[num_hit:hi])
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
        if need > 0:
            req.blocks.extend(pool.allocate(need))
        if req.num_computed < req.hashed_end:
            layout = self._layout(req)
            lo = min(req.num_computed // bs, layout.num_hashed)
            hi = min((req.num_computed + n) // bs, layout.num_hashed)
            if hi > lo:
                # vLLM caches blocks at allocation, before the step computes them;
                # a request admitted later in the same step may hit them
                ids = np.asarray(req.blocks[lo:hi], dtype=np.int64)
                pool.cache(ids, layout.keys[lo:hi])

    def _preempt(self, req: Request) -> None:
        bs = self.config.block_size
        blocks = np.asarray(req.blocks, dtype=np.int64)
        self.pool.free(blocks)
        # remember the full blocks and their free-queue stamps: while a stamp is
        # unchanged the block was not reallocated, so its content is still there
        full = blocks[: req.num_computed // bs]
        req.prev_blocks = full
        req.prev_stamps = self.pool.free_stamp[full].copy()
        req.blocks = []
        req.num_computed = 0
        req.num_preemptions += 1
        self.num_preemptions += 1
        self.waiting.appendleft(req)

    # ------------------------------------------------------------------ time
    def _time(self, plan: StepPlan, now: float, refused: bool) -> None:
        plan.first_step = self.steps.num_steps
        plan.waiting_len = len(self.waiting)
        used0 = self.pool.num_used
        if (self.fast_forward and plan.num_p == 0 and not plan.preempted and refused
                and len(plan.scheduled) == len(self.running) and not plan.load_s):
            k = self._plan_run(plan)
            if k <= 1:
                plan.num_steps = 1
                plan.requests = []
            else:
                dts = self.timing.decode_run_times(plan.num_d, plan.ctx_d, k)
                dts[0] += now  # a running sum from now, added in step-by-step order
                plan.ends = np.cumsum(dts)
                plan.used = [used0]
                return
        dt = self.timing.step_time(plan.num_p, plan.work_p, plan.seqs_p, plan.num_d, plan.ctx_d)
        dt += plan.load_s
        plan.ends = [now + dt]
        plan.used = [used0]

    def _plan_run(self, plan: StepPlan) -> int:
        """Length k of the decode run starting with this step; sets its block events.

        Step j >= 1 of the run needs a new block for a request with c computed
        tokens at the start iff (c + j) % block_size == 0: first at j0 in
        [1, block_size], then every block_size steps. Events are listed in the
        order step-by-step mode allocates them: by step, then running order.
        Batches are small (a handful to a few hundred requests), so this is
        plain Python: numpy's per-call cost would dominate.
        """
        reqs = self.running
        bs = self.config.block_size
        k_done = min(r.stop_at - r.num_output for r in reqs)
        if k_done <= 1:
            return 1
        by_first = sorted(((bs - r.num_computed % bs, i) for i, r in enumerate(reqs)))
        ev_steps: list[int] = []
        ev_owner: list[int] = []
        base = 0
        while base + 1 < k_done:
            for j0, i in by_first:
                j = base + j0
                if j >= k_done:
                    break
                ev_steps.append(j)
                ev_owner.append(i)
            base += bs
        free = self.pool.num_free
        # the first event that cannot get a block ends the run before its step
        k = k_done if len(ev_steps) <= free else ev_steps[free]
        if self._fragile_refusal and ev_steps:
            k = min(k, ev_steps[0])  # decide again once the run has taken a block
        plan.requests = list(reqs)
        plan.k_done = k_done
        plan.ev_steps = ev_steps
        plan.ev_owner = ev_owner
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
        if plan.requests:
            return self._commit_run(plan, lo, upto)
        end = plan.ends[0]
        idx = plan.first_step
        self.steps.append(plan.start_s, end, plan.used[0], len(self.running),
                          plan.waiting_len, plan.num_p, plan.num_d)
        for req, n in plan.scheduled:
            c = req.num_computed = req.num_computed + n
            if c == req.num_tokens:
                req.num_output += 1
                req.num_tokens += 1
                req.add_token_steps(idx, 1)
                if req.num_output == 1:
                    req.first_token_s = end
        return self._finish(end)

    def _commit_run(self, plan: StepPlan, lo: int, hi: int) -> list[Request]:
        m = hi - lo
        reqs = plan.requests
        first_idx = plan.first_step + lo
        start = plan.start_s if lo == 0 else float(plan.ends[lo - 1])
        ev = plan.ev_steps
        a = bisect_right(ev, lo)  # blocks taken in steps up to lo are in use at lo
        b = bisect_left(ev, hi)
        self.steps.extend(start, plan.ends[lo:hi], plan.used[0] + a, [e - lo for e in ev[a:b]],
                          len(reqs), plan.waiting_len, 0, len(reqs))
        if lo == 0:
            for req in reqs:
                if req.num_output == 0:
                    # a prompt whose last chunk was one token joins a decode run
                    req.first_token_s = float(plan.ends[0])
        last = first_idx + m
        for req in reqs:
            req.num_computed += m
            req.num_output += m
            req.num_tokens += m
            ts = req.token_steps  # Request.add_token_steps, inlined: this loop is hot
            if ts and ts[-1] == first_idx:
                ts[-1] = last
            else:
                ts.append(first_idx)
                ts.append(last)
        self._hand_out_blocks(plan, hi)
        if hi < plan.k_done:
            return []  # a run ends its requests only in step k_done - 1
        return self._finish(float(plan.ends[hi - 1]))

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
        reqs = plan.requests
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
        for owner, b in zip(plan.ev_owner[lo_ev:hi_ev], ids, strict=True):
            reqs[owner].blocks.append(b)

    def start_step(self, plan: StepPlan, j: int) -> None:
        """Run step ``j`` has started (its predecessors are committed): take its blocks
        now, as step-by-step mode does when it schedules the step, so that anything
        reading the pool mid-run (a KV-aware router, a planner) sees the same state."""
        if plan.requests:
            self._hand_out_blocks(plan, j + 1)

    def _finish(self, end: float) -> list[Request]:
        done = [r for r in self.running if r.num_output >= r.stop_at]
        if not done:
            return done
        self.running = [r for r in self.running if r.num_output < r.stop_at]
        for req in done:
            if req.hold_kv:
                # a prefill worker keeps the KV until the decode side has read it
                # (vLLM's NixlConnector frees after the transfer: request_finished
                # returns delay_free_blocks; vllm-project/vllm:
                # vllm/distributed/kv_transfer/kv_connector/v1/nixl_connector.py @ v0.33.0)
                self._held[req.rid] = req.blocks
            else:
                req.finish_s = end
                self.pool.free(np.asarray(req.blocks, dtype=np.int64))
            req.blocks = []
        return done

    def release(self, req: Request) -> None:
        """Free the blocks a finished prefill held for its KV handoff."""
        self.pool.free(np.asarray(self._held.pop(req.rid), dtype=np.int64))

    @property
    def num_held_blocks(self) -> int:
        return sum(len(b) for b in self._held.values())
