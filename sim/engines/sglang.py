"""SGLang engine model: prefill-first scheduler + radix-cached token pool + timing model.

Behaviour follows sgl-project/sglang:python/sglang/srt/managers/scheduler.py
(``get_next_batch_to_run``, ``get_new_batch_prefill``, ``update_running_batch``),
schedule_policy.py (``SchedulePolicy``, ``PrefillAdder``) and schedule_batch.py
(``retract_decode``) @ v0.5.x; see reference/loadgen_and_engines.md §B.6, §B.11.
A step is a pipeline of named phases:

1. ``_prefill``: if an extend batch can be formed it runs, instead of decode
   (prefill-first). The chunked request continues first; WAITING is then
   ordered by the policy (fcfs, or lpm: longest cached prefix first, which
   falls back to fcfs when more than 128 requests wait — counted in
   ``num_lpm_fallbacks``) and admitted by the PrefillAdder budgets. With
   ``enable_mixed_chunk`` the running decodes join the extend batch.
2. ``_decode`` (no extend batch): one token for every running request; when
   the pool (free + evictable) cannot hold them, ``_retract``.
3. ``_time``: the step's duration from its aggregates, as vllm.py does.

Requests live in: WAITING -> (``chunked``, while its prompt is cut) -> RUNNING.
A request's KV: a locked cached prefix in the radix tree (``_Seq.prefix``
tokens, ending at ``_Seq.node``) plus private slots for the rest. Computed
prompt chunks are inserted into the tree after each extend step
(``cache_unfinished_req``); the whole sequence at finish (``cache_finished_req``).

Fast-forward. After a pure-decode step (no extend batch formed, nothing
retracted, no chunked request) the following decode steps differ only in what
grows: contexts by one token a step, the pool's use, the ratio's decay. The
plan then covers k steps (``_plan_run``), k the least of:

* steps to the first completion (the run ends with that step);
* the first step whose decode tokens the *free* slots cannot hold: that step
  evicts cache or retracts, and is decided normally;
* the first step at which the head of WAITING would be admitted: its admission
  test (``_admit``) as a function of the step index j, with the pool's free
  slots, the running requests' offsets (their outputs grow) and the decayed
  ratio at j; the tree does not change in a run, so the head, its matched prefix
  and its lock stay the same.

Each decision of a run step repeats step 0's side effects on the tree: the
lpm/fcfs matches touch the same nodes (replayed in closed form by
``RadixCache.replay_matches``, LRU stamps and LFU counts exact) and an lpm
fallback is counted again. Slots, ratio decays, touches and counters of steps
[started, j] are applied lazily (``_start_steps``) when a step is committed or
started, so a run cut at any step boundary leaves exactly the state of the
steps that happened.
"""

from __future__ import annotations

from collections import deque
from dataclasses import dataclass
from typing import Any

import numpy as np

from ..radix import EVICTION_POLICIES, Node, RadixCache, Segments, request_segments
from ..request import Request
from ..steplog import StepLog
from ..timing import TimingModel
from .plan import PlanBase

# sgl-project/sglang:python/sglang/srt/managers/schedule_policy.py @ v0.5.x
LPM_FALLBACK_QUEUE_LEN = 128  # _determine_active_policy: lpm -> fcfs above this
SCHEDULE_POLICIES = ("fcfs", "lpm")


def new_token_ratio_defaults(schedule_conservativeness: float = 1.0
                             ) -> tuple[float, float, float]:
    """(init, min, decay per decode step) as SGLang derives them.

    sgl-project/sglang:python/sglang/srt/environ.py and
    managers/scheduler_components/new_token_ratio_tracker.py @ v0.5.x:
    init = min(0.7 x conservativeness, 1); min = init x 0.14
    (SGLANG_MIN_NEW_TOKEN_RATIO_FACTOR); decay = (init - min) / 600
    (SGLANG_NEW_TOKEN_RATIO_DECAY_STEPS)."""
    init = min(0.7 * schedule_conservativeness, 1.0)
    low = min(init * 0.14, 1.0)
    return init, low, (init - low) / 600


_INIT, _MIN, _DECAY = new_token_ratio_defaults()


@dataclass(frozen=True)
class SglangConfig:
    """Resolved SGLang scheduler/cache knobs (no 'auto' left)."""

    max_running_requests: int
    max_total_tokens: int  # KV pool in tokens
    chunked_prefill_size: int = 8192  # -1: chunked prefill off
    max_prefill_tokens: int = 16384
    schedule_policy: str = "fcfs"
    enable_mixed_chunk: bool = False
    schedule_conservativeness: float = 1.0
    init_new_token_ratio: float = _INIT
    new_token_ratio_decay: float = _DECAY
    min_new_token_ratio: float = _MIN
    enable_prefix_caching: bool = True  # False: --disable-radix-cache
    radix_eviction_policy: str = "lru"
    page_size: int = 1
    max_model_len: int = 131072
    ignore_eos: bool = True  # fixed-length replay: admission counts ratio 1.0
    clip_max_new_tokens: int = 4096  # SGLANG_CLIP_MAX_NEW_TOKENS_ESTIMATION
    retract_decode_steps: int = 20  # SGLANG_RETRACT_DECODE_STEPS

    def __post_init__(self) -> None:
        checks = (
            ("max_running_requests", self.max_running_requests >= 1, ">= 1"),
            ("max_total_tokens", self.max_total_tokens >= 1, ">= 1"),
            ("chunked_prefill_size", self.chunked_prefill_size == -1
             or self.chunked_prefill_size >= 1, ">= 1, or -1 (off)"),
            ("max_prefill_tokens", self.max_prefill_tokens >= 1, ">= 1"),
            ("schedule_policy", self.schedule_policy in SCHEDULE_POLICIES,
             f"one of {', '.join(SCHEDULE_POLICIES)}"),
            ("radix_eviction_policy", self.radix_eviction_policy in EVICTION_POLICIES,
             f"one of {', '.join(EVICTION_POLICIES)}"),
            ("page_size", self.page_size >= 1, ">= 1"),
            ("min_new_token_ratio", 0 <= self.min_new_token_ratio <= self.init_new_token_ratio,
             "in [0, init_new_token_ratio]"),
            ("new_token_ratio_decay", self.new_token_ratio_decay >= 0, ">= 0"),
        )
        for name, ok, rule in checks:
            if not ok:
                raise ValueError(f"SglangConfig.{name} = {getattr(self, name)!r}: must be {rule}")

    # screen/runner.py reads these off a resolved engine config
    @property
    def num_gpu_blocks(self) -> int:
        return self.max_total_tokens // self.page_size


class _Seq:
    """Engine-side KV state of one admitted request."""

    __slots__ = ("node", "prefix", "segs")

    def __init__(self, segs: Segments, prefix: int, node: Node) -> None:
        self.segs = segs
        self.prefix = prefix  # tokens held through the tree (locked path to ``node``)
        self.node = node


class SglangPlan(PlanBase):
    """What one step, or one fast-forward run of decode steps, does."""

    __slots__ = ("cum_need", "lpm_fallback", "paths", "ratios", "started")

    def __init__(self, start_s: float) -> None:
        super().__init__(start_s)
        self.ends = []
        self.used = 0  # pool slots in use in step 0
        # a fast-forward run only: decisions applied for steps [0, started), slots taken
        # by steps 1..j (cum_need[j]), the ratio after j decisions (ratios[j]), the match
        # paths one decision touches, lpm fallback
        self.started = 1
        self.cum_need: Any = ()
        self.ratios: Any = ()
        self.paths: list[list[Node]] = []
        self.lpm_fallback = False


class _Budget:
    """PrefillAdder's budgets for one extend batch (schedule_policy.py @ v0.5.x)."""

    __slots__ = ("offset", "rem_chunk", "rem_input")

    def __init__(self, rem_input: int, rem_chunk: int | None, offset: float) -> None:
        self.rem_input = rem_input
        self.rem_chunk = rem_chunk  # None: chunked prefill off
        self.offset = offset  # tokens promised to running and admitted requests


class SglangEngine:
    def __init__(self, config: SglangConfig, timing: TimingModel, hash_block_tokens: int,
                 num_hash_ids: int = 0, fast_forward: bool = False) -> None:
        # off by default: hand-computed tests inspect one plan per step; the
        # cluster's caller passes the scenario's simulation.fast_forward
        self.config = config
        self.fast_forward = fast_forward
        self.timing = timing
        # host time per finished request, paid by the next step (TimingProfile.finish_s);
        # _host_until: when the host's work for the requests finished so far ends
        self._finish_s = float(getattr(timing, "finish_s", 0.0))
        self._host_until = 0.0
        self.hash_block_tokens = hash_block_tokens
        self.pool = RadixCache(config.max_total_tokens, config.page_size,
                               config.radix_eviction_policy, config.enable_prefix_caching)
        self.waiting: deque[Request] = deque()
        self.running: list[Request] = []
        self.chunked: Request | None = None
        self.steps = StepLog()
        self.new_token_ratio = config.init_new_token_ratio
        self.num_preemptions = 0  # retractions
        self.num_prefix_hit_tokens = 0
        self.num_prefix_query_tokens = 0
        self.num_lpm_fallbacks = 0  # scheduling rounds where lpm ran as fcfs
        # lpm needs the radix cache; SGLang quietly uses fcfs without it
        # (SchedulePolicy._validate_and_adjust_policy): we say so in summary()
        self.schedule_policy = (config.schedule_policy if config.enable_prefix_caching
                                else "fcfs")
        self._seqs: dict[int, _Seq] = {}
        self._rejected: list[Request] = []

    def summary(self) -> dict[str, Any]:
        return {"num_retractions": self.num_preemptions,
                "num_lpm_fallbacks": self.num_lpm_fallbacks,
                "schedule_policy": self.config.schedule_policy,
                "schedule_policy_effective": self.schedule_policy,
                "new_token_ratio": self.new_token_ratio}

    # ---------------------------------------------------------------- intake
    def add_request(self, req: Request) -> bool:
        if req.prompt_tokens + req.max_output_tokens > self.config.max_model_len:
            # the tokenizer manager refuses prompt + max_new_tokens over the context
            # length (sglang/srt/managers/tokenizer_manager.py @ v0.5.x, _validate_...)
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
        return bool(self.running or self.waiting or self.chunked is not None)

    # -------------------------------------------------------------- schedule
    def schedule(self, now: float) -> SglangPlan | None:
        plan = SglangPlan(now)
        decode = not self._prefill(plan) and bool(self.running)
        if decode:
            self._decode(plan)
        if not plan.scheduled:
            if not self.running and self.chunked is None:
                # an idle scheduler re-inits the ratio (scheduler.py @ v0.5.x,
                # event_loop_normal: batch is None -> self_check_during_idle)
                self.new_token_ratio = self.config.init_new_token_ratio
            return None
        self._time(plan, now, decode)
        return plan

    def _running_offset(self, req: Request) -> float:
        """Tokens a running request may still take: remaining output x ratio, clipped
        (PrefillAdder._get_running_request_total_token_offset); ignore_eos
        requests at ratio 1.0 (reference §B.11)."""
        ratio = 1.0 if self.config.ignore_eos else self.new_token_ratio
        rest = min(req.max_output_tokens - req.num_output, self.config.clip_max_new_tokens)
        return rest * ratio

    def _rem_total(self, budget: _Budget) -> float:
        pool = self.pool
        return pool.num_free + pool.num_evictable_tokens - budget.offset

    def _prefill(self, plan: SglangPlan) -> bool:
        """Form an extend batch (get_new_batch_prefill); False if none forms."""
        cfg = self.config
        if self.chunked is None and (not self.waiting
                                     or len(self.running) >= cfg.max_running_requests):
            return False
        mixed = list(self.running) if cfg.enable_mixed_chunk else []
        rem_chunk = (cfg.chunked_prefill_size - len(mixed)
                     if cfg.chunked_prefill_size > 0 else None)
        budget = _Budget(cfg.max_prefill_tokens - len(mixed), rem_chunk,
                         len(mixed) + sum((self._running_offset(r) for r in self.running), 0.0))
        if self.chunked is not None:
            self._continue_chunk(plan, budget)
        if self.waiting:
            self._order_waiting()
            self._admit(plan, budget)
        if not plan.scheduled:
            return False
        if mixed and self._take(self._decode_tokens(mixed)):
            # --enable-mixed-chunk: the decodes ride in the extend batch
            # (ScheduleBatch.mix_with_running)
            for req in mixed:
                plan.add(req, 1)
        return True

    def _continue_chunk(self, plan: SglangPlan, budget: _Budget) -> None:
        """PrefillAdder.add_chunked_req: the cut request goes first."""
        req = self.chunked
        assert req is not None
        ext = req.num_tokens - req.num_computed
        cap = int(self._rem_total(budget))
        if budget.rem_chunk is not None:
            cap = min(cap, budget.rem_chunk)
        n = min(ext, cap)
        truncated = n < ext
        if truncated:
            n -= n % self.config.page_size
        if n <= 0 or not self._take(self._slots(req.num_computed, req.num_computed + n)):
            return
        budget.offset += n + (0 if truncated else self._max_new(req))
        self._charge(budget, n)
        plan.add(req, n)
        if not truncated:
            self.chunked = None
            self.running.append(req)

    def _order_waiting(self) -> None:
        """SchedulePolicy.calc_priority: fcfs keeps queue order; lpm sorts by cached prefix."""
        if self.schedule_policy != "lpm":
            return
        if len(self.waiting) > LPM_FALLBACK_QUEUE_LEN:
            self.num_lpm_fallbacks += 1  # modelled, and counted: never silent
            return
        pool = self.pool
        keyed = [(-pool.match(self._segs(r), r.num_tokens - 1)[0], i, r)
                 for i, r in enumerate(self.waiting)]
        keyed.sort(key=lambda x: (x[0], x[1]))
        self.waiting = deque(r for _, _, r in keyed)

    def _admit(self, plan: SglangPlan, budget: _Budget) -> None:
        """PrefillAdder.add_one_req over WAITING until a budget stops it."""
        cfg = self.config
        pool = self.pool
        page = cfg.page_size
        admitted: list[Request] = []
        while self.waiting:
            if len(self.running) >= cfg.max_running_requests:
                break
            req = self.waiting[0]
            segs = self._segs(req)
            # at least one token is recomputed (Req.init_next_round_input: input_len - 1)
            prefix, node = pool.match(segs, req.num_tokens - 1)
            ext = req.num_tokens - prefix
            total = ext + self._max_new(req)
            # one page is kept back for the first decode token
            if total + page > self._rem_total(budget):
                idle = not self.running and self.chunked is None and not admitted
                # idle, the whole pool is free or evictable, but the matched prefix
                # becomes locked: prefix + total is what the request needs
                if idle and prefix + total + page > pool.capacity_tokens:
                    # can never fit, even with an empty engine: refuse instead of hanging
                    self.waiting.popleft()
                    req.reject_reason = (f"needs {prefix + total + page} KV tokens (prompt + "
                                         f"output + 1 page), pool has {pool.capacity_tokens}")
                    self._rejected.append(req)
                    continue
                break
            input_tokens = -(-ext // page) * page
            if input_tokens > budget.rem_input and admitted:
                break
            pool.lock(node)  # the matched prefix is no longer evictable: check again
            if total + page > self._rem_total(budget):
                pool.unlock(node)
                break
            chunk = budget.rem_chunk is not None and input_tokens > budget.rem_chunk
            if chunk and self.chunked is not None:
                pool.unlock(node)  # one chunked request at a time
                break
            n = ext
            if chunk:
                assert budget.rem_chunk is not None
                n = budget.rem_chunk - budget.rem_chunk % page
            if n <= 0 or not pool.allocate(self._slots(prefix, prefix + n)):
                pool.unlock(node)
                break
            self.waiting.popleft()
            self._seqs[req.rid] = _Seq(segs, prefix, node)
            req.num_computed = prefix
            if req.num_cached_tokens < 0:
                req.num_cached_tokens = prefix
                self.num_prefix_hit_tokens += prefix
                self.num_prefix_query_tokens += req.num_tokens
            budget.offset += n + (0 if chunk else self._max_new(req))
            self._charge(budget, n)
            plan.add(req, n)
            admitted.append(req)
            if chunk:
                self.chunked = req  # at most one: it used the whole chunk budget
                break
            self.running.append(req)
            if (self._rem_total(budget) <= 0 or budget.rem_input <= 0
                    or (budget.rem_chunk is not None and budget.rem_chunk <= 0)):
                break  # PrefillAdder.budget_state

    def _max_new(self, req: Request) -> int:
        # outputs still to come, then clipped (add_one_req: remaining-then-clip)
        rest = max(req.max_output_tokens - req.num_output, 0)
        return min(rest, self.config.clip_max_new_tokens)

    @staticmethod
    def _charge(budget: _Budget, n: int) -> None:
        budget.rem_input -= n
        if budget.rem_chunk is not None:
            budget.rem_chunk -= n

    def _segs(self, req: Request) -> Segments:
        seq = self._seqs.get(req.rid)
        if seq is not None:
            return seq.segs
        return request_segments(req.hash_ids, req.prompt_tokens, self.hash_block_tokens,
                                req.rid)

    def _take(self, n: int) -> bool:
        return self.pool.allocate(n)

    def _slots(self, lo: int, hi: int) -> int:
        """Pool slots a request takes to grow its KV from ``lo`` to ``hi`` tokens: whole
        pages (a request holds ceil(tokens / page) pages; its cached prefix is
        page-aligned, as matches and inserts floor to pages), so pages are taken,
        passed to the tree and released in the same unit."""
        page = self.config.page_size
        if page == 1:
            return hi - lo
        return -(-hi // page) * page - -(-lo // page) * page

    # ---------------------------------------------------------------- decode
    def _decode(self, plan: SglangPlan) -> None:
        """update_running_batch: decode memory check, retraction or ratio decay."""
        cfg = self.config
        need = self._decode_tokens(self.running)
        if self.pool.allocate(need):
            self.pool.release(need)  # taken below, one request at a time
            self.new_token_ratio = max(self.new_token_ratio - cfg.new_token_ratio_decay,
                                       cfg.min_new_token_ratio)
        else:
            self._retract(plan)
        for req in self.running:
            if self._take(self._decode_tokens([req])):
                plan.add(req, 1)

    def _decode_tokens(self, reqs: list[Request]) -> int:
        page = self.config.page_size
        # a new page is needed only by a request whose KV fills its last page
        return sum(page for r in reqs if r.num_computed % page == 0)

    def _retract(self, plan: SglangPlan) -> None:
        """ScheduleBatch.retract_decode (schedule_batch.py @ v0.5.x).

        Victims in order of fewest generated tokens, then longest input; at least
        one, then more until free + evictable covers ``retract_decode_steps``
        tokens for each request left. The ratio is then re-estimated from the
        requests that stay: (decoded + steps x n) / (max_new_tokens + 1), <= 1."""
        cfg = self.config
        pool = self.pool
        order = sorted(self.running, key=lambda r: (r.num_output, -r.prompt_tokens),
                       reverse=True)
        first = True
        while order and (first or pool.num_free + pool.num_evictable_tokens
                         < len(order) * cfg.retract_decode_steps):
            if len(order) == 1 and not first and (
                    pool.num_free + pool.num_evictable_tokens >= self._decode_tokens(order)):
                break  # the last request stays if its next token fits
            first = False
            victim = order.pop()
            self._release(victim, retract=True)
            plan.preempted.append(victim)
        self.running = [r for r in self.running if r not in plan.preempted]
        decoded = sum(r.num_output for r in self.running)
        max_new = sum(r.max_output_tokens for r in self.running)
        self.new_token_ratio = min(
            1.0, (decoded + cfg.retract_decode_steps * len(self.running)) / (max_new + 1))

    def _release(self, req: Request, retract: bool) -> None:
        seq = self._seqs.pop(req.rid)
        self.pool.release(self._slots(seq.prefix, req.num_computed))
        self.pool.unlock(seq.node)
        if retract:
            # Req.reset_for_retract: KV dropped, the cached prefix stays in the tree;
            # back to the end of WAITING (Scheduler._extend_requests_to_queue)
            req.num_computed = 0
            req.num_preemptions += 1
            self.num_preemptions += 1
            self.waiting.append(req)

    # ------------------------------------------------------------------ time
    def _time(self, plan: SglangPlan, now: float, decode: bool) -> None:
        plan.first_step = self.steps.num_steps
        # what is left at ``now`` of the host's work for requests that finished
        # (VllmEngine._time)
        host = self._host_until - now if self._host_until > now else 0.0
        self._host_until = 0.0
        plan.waiting_len = len(self.waiting)
        plan.used = self.pool.num_used
        # a run starts from a decode batch (no extend batch formed: a one-token
        # extend also counts as a decode in the aggregates) that retracted nobody
        if (self.fast_forward and decode and not plan.preempted and self.chunked is None
                and len(plan.scheduled) == len(self.running)):
            k = self._plan_run(plan)
            if k > 1:
                dts = self.timing.decode_run_times(plan.num_d, plan.ctx_d, k)
                dts[0] += host
                dts[0] += now  # a running sum from now, added in step-by-step order
                plan.ends = np.cumsum(dts)
                return
            plan.requests = []
            plan.num_steps = 1
        dt = self.timing.step_time(plan.num_p, plan.work_p, plan.seqs_p, plan.num_d, plan.ctx_d)
        dt += host
        plan.ends = [now + dt]

    def _plan_run(self, plan: SglangPlan) -> int:
        """Length k of the decode run starting with this (decided) step 0."""
        cfg = self.config
        reqs = self.running
        k = min(r.max_output_tokens - r.num_output for r in reqs)  # first completion
        if k <= 1:
            return 1
        page = cfg.page_size
        steps = np.arange(k, dtype=np.int64)
        # slots step j >= 1 takes: a page for each request whose KV fills its last page
        need = np.zeros(k, dtype=np.int64)
        for r in reqs:
            need += ((r.num_computed + steps) % page == 0)
        need *= page
        need[0] = 0  # step 0's were taken when it was decided
        cum = np.cumsum(need)
        free = self.pool.num_free
        if cum[-1] > free:
            # the first step that would evict or retract is decided normally
            k = int(np.searchsorted(cum, free, side="right"))
            if k <= 1:
                return 1
            cum = cum[:k]
        ratios = self._ratios(k)
        paths: list[list[Node]] = []
        fallback = False
        if self.waiting and len(reqs) < cfg.max_running_requests:
            got = self._decision_paths()
            if got is None:
                return 1
            paths, fallback, head = got
            k = self._admit_horizon(k, cum, ratios, paths[-1], head)
            if k <= 1:
                return 1
        plan.requests = list(reqs)
        plan.k_done = min(r.max_output_tokens - r.num_output for r in reqs)
        plan.num_steps = k
        plan.cum_need = cum[:k]
        plan.ratios = ratios
        plan.paths = paths
        plan.lpm_fallback = fallback
        return k

    def _ratios(self, k: int) -> np.ndarray:
        """ratios[j - 1]: new_token_ratio after the decisions of steps 0..j-1, as
        ``_decode`` computes it one step at a time (step 0's decay is done).

        r_{j+1} = max(r_j - decay, min): np.subtract.accumulate subtracts in the
        same order, so the values are bitwise those of step-by-step mode."""
        cfg = self.config
        seq = np.full(k, cfg.new_token_ratio_decay, dtype=np.float64)
        seq[0] = self.new_token_ratio
        seq = np.subtract.accumulate(seq)
        out = np.maximum(seq, cfg.min_new_token_ratio)
        out[0] = self.new_token_ratio  # (a retraction can leave it below the minimum)
        return out

    def _decision_paths(self) -> tuple[list[list[Node]], bool, Request] | None:
        """What one more decision of a run step does to the tree: the paths its
        matches touch (``_order_waiting``'s, then the head's in ``_admit``), whether it
        counts an lpm fallback, and the request at the head of WAITING then. With lpm
        that is the first of the longest matches on the tree as it is now, not the
        queue's head: the last decision sorted the queue before its own decode step
        evicted, so the next one may sort it otherwise. None if a match would split a
        node."""
        pool = self.pool
        paths: list[list[Node]] = []
        fallback = False
        head = self.waiting[0]
        if self.schedule_policy == "lpm":
            if len(self.waiting) > LPM_FALLBACK_QUEUE_LEN:
                fallback = True
            else:
                longest = -1
                for r in self.waiting:
                    path = pool.match_path(self._segs(r), r.num_tokens - 1)
                    if path is None:
                        return None
                    paths.append(path)
                    matched = path[-1].end if path else 0
                    if matched > longest:  # the first of the longest: the stable sort's
                        longest, head = matched, r
        path = pool.match_path(self._segs(head), head.num_tokens - 1)
        if path is None:
            return None
        paths.append(path)
        return paths, fallback, head

    def _admit_horizon(self, k: int, cum: np.ndarray, ratios: np.ndarray,
                       path: list[Node], head: Request) -> int:
        """First step j in [1, k) whose decision admits ``head``, the head of WAITING at
        those decisions (k if none).

        ``_admit``'s test at step j: the head's match (``path``) and its lock are
        fixed; free slots are those left after steps 1..j-1; each running request's
        offset counts its outputs after j steps at ratios[j - 1]. Sums run in the
        order ``_prefill`` adds them, so the floats are step-by-step's."""
        cfg = self.config
        page = cfg.page_size
        prefix = path[-1].end if path else 0
        ext = head.num_tokens - prefix
        total = ext + self._max_new(head)
        num_mixed = len(self.running) if cfg.enable_mixed_chunk else 0
        if cfg.chunked_prefill_size > 0:
            rem_chunk = cfg.chunked_prefill_size - num_mixed
            input_tokens = -(-ext // page) * page
            n = ext if input_tokens <= rem_chunk else rem_chunk - rem_chunk % page
            if n <= 0:
                return k  # never admitted while nothing changes
        pool = self.pool
        # the head's lock makes its matched path unevictable (the second test)
        evictable = pool.num_evictable_tokens - sum(nd.num_tokens for nd in path
                                                    if nd.lock_ref == 0)
        j = np.arange(1, k, dtype=np.int64)
        ratio = np.ones(k - 1) if cfg.ignore_eos else ratios[:k - 1]
        offset = np.zeros(k - 1)
        for r in self.running:
            rest = np.minimum(r.max_output_tokens - (r.num_output + j), cfg.clip_max_new_tokens)
            offset = offset + rest * ratio
        offset = num_mixed + offset
        free = pool.num_free - cum[:k - 1]  # at step j's decision: after steps 1..j-1
        rem = (free + evictable) - offset
        hit = np.flatnonzero(total + page <= rem)
        return int(hit[0]) + 1 if hit.size else k

    # ---------------------------------------------------------------- commit
    def absorbs_arrival(self, plan: SglangPlan, now: float) -> bool:
        """Every arrival cuts an SGLang run (its admission is re-decided at once)."""
        return False

    def truncate(self, plan: SglangPlan, num_steps: int) -> None:
        """Cut a run to its first ``num_steps`` steps (>= the committed ones)."""
        plan.num_steps = max(num_steps, plan.committed, 1)

    def commit(self, plan: SglangPlan, upto: int) -> list[Request]:
        """Apply the plan's steps [committed, upto); return requests that finished."""
        lo = plan.committed
        if upto <= lo:
            return []
        plan.committed = upto
        if plan.requests:
            return self._commit_run(plan, lo, upto)
        end = plan.ends[0]
        idx = plan.first_step
        self.steps.append(plan.start_s, end, plan.used, len(self.running), plan.waiting_len,
                          plan.num_p, plan.num_d)
        for req, n in plan.scheduled:
            c = req.num_computed = req.num_computed + n
            if n > 1 or c < req.num_tokens or req.num_output == 0:
                self._cache_computed(req)  # cache_unfinished_req after an extend
            if c == req.num_tokens:
                req.sample(idx, end)
        return self._finish(end)

    def _finish(self, end: float) -> list[Request]:
        done = [r for r in self.running if r.num_output >= r.max_output_tokens]
        if done:
            self.running = [r for r in self.running if r.num_output < r.max_output_tokens]
            for req in done:
                req.finish_s = end
                self._cache_computed(req)  # cache_finished_req
                self._release(req, retract=False)
                if self._finish_s:
                    self._host_until = max(self._host_until, end) + self._finish_s
        return done

    def _commit_run(self, plan: SglangPlan, lo: int, hi: int) -> list[Request]:
        self._start_steps(plan, hi)
        m = hi - lo
        reqs = plan.requests
        cum = plan.cum_need
        start = plan.start_s if lo == 0 else float(plan.ends[lo - 1])
        # one slot more in use from step j for each of the cum[j] - cum[j - 1] it took
        extra = np.repeat(np.arange(1, m, dtype=np.int64),
                          np.diff(cum[lo:hi]).astype(np.int64, copy=False))
        self.steps.extend(start, plan.ends[lo:hi], plan.used + int(cum[lo]), extra, len(reqs),
                          plan.waiting_len, 0, len(reqs))
        first = plan.first_step + lo
        for req in reqs:
            req.num_computed += m
            req.num_output += m
            req.num_tokens += m
            req.add_token_steps(first, m)
        if hi < plan.k_done:
            return []  # a run ends its requests only in step k_done - 1
        return self._finish(float(plan.ends[hi - 1]))

    def _start_steps(self, plan: SglangPlan, hi: int) -> None:
        """Apply the decisions of run steps [started, hi): their decode slots, ratio
        decays, tree touches and lpm fallbacks, as ``schedule`` would have."""
        a = plan.started
        if hi <= a:
            return
        plan.started = hi
        taken = int(plan.cum_need[hi - 1] - plan.cum_need[a - 1])
        if taken:
            ok = self.pool.allocate(taken)
            assert ok, "a run's decode slots are free when planned"
        self.new_token_ratio = float(plan.ratios[hi - 1])
        self.pool.replay_matches(plan.paths, hi - a)
        if plan.lpm_fallback:
            self.num_lpm_fallbacks += hi - a

    def start_step(self, plan: SglangPlan, j: int) -> None:
        """Run step ``j`` has started (its predecessors are committed): decide it now,
        as step-by-step mode does, so that a mid-run reader sees the same state."""
        if plan.requests:
            self._start_steps(plan, j + 1)

    def _cache_computed(self, req: Request) -> None:
        """Insert the request's computed tokens; its private slots for them pass to
        the tree (duplicates of cached content are freed), and its lock moves down."""
        if not self.config.enable_prefix_caching:
            return
        seq = self._seqs[req.rid]
        pool = self.pool
        _, node = pool.insert(seq.segs, req.num_computed)
        end = node.end if node is not pool.root else 0
        if end <= seq.prefix:
            return
        pool.lock(node)
        pool.unlock(seq.node)
        pool.release(end - seq.prefix)
        seq.prefix = end
        seq.node = node
