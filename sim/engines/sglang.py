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

Plans cover one step each (no fast-forward runs yet).
"""

from __future__ import annotations

from collections import deque
from dataclasses import dataclass
from typing import Any

from ..radix import EVICTION_POLICIES, Node, RadixCache, Segments, request_segments
from ..request import Request
from ..steplog import StepLog
from ..timing import TimingModel

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


class SglangPlan:
    """What one step does (the cluster reads ``end_s``, ``num_steps``, ``ends``)."""

    __slots__ = ("committed", "ctx_d", "ends", "first_step", "num_d", "num_p", "num_steps",
                 "preempted", "scheduled", "seqs_p", "start_s", "used", "waiting_len", "work_p")

    def __init__(self, start_s: float) -> None:
        self.scheduled: list[tuple[Request, int]] = []
        self.preempted: list[Request] = []  # retracted before this step
        self.num_steps = 1
        self.committed = 0
        self.first_step = 0
        self.start_s = start_s
        self.ends: list[float] = []
        self.used = 0
        self.waiting_len = 0
        self.num_p = 0
        self.work_p = 0.0
        self.seqs_p = 0
        self.num_d = 0
        self.ctx_d = 0

    @property
    def end_s(self) -> float:
        return self.ends[0]

    def add(self, req: Request, n: int) -> None:
        self.scheduled.append((req, n))
        c = req.num_computed
        if n == 1 and c == req.num_tokens - 1:
            self.num_d += 1
            self.ctx_d += c + 1
        else:
            self.num_p += n
            self.work_p += n * (c + (n + 1) / 2)
            self.seqs_p += 1


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
        # fast_forward is accepted for the cluster's interface; plans are single steps
        self.config = config
        self.timing = timing
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
        if not self._prefill(plan) and self.running:
            self._decode(plan)
        if not plan.scheduled:
            if not self.running and self.chunked is None:
                # an idle scheduler re-inits the ratio (scheduler.py @ v0.5.x,
                # event_loop_normal: batch is None -> self_check_during_idle)
                self.new_token_ratio = self.config.init_new_token_ratio
            return None
        self._time(plan, now)
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
                         len(mixed) + sum(self._running_offset(r) for r in self.running))
        if self.chunked is not None:
            self._continue_chunk(plan, budget)
        if self.waiting:
            self._order_waiting()
            self._admit(plan, budget)
        if not plan.scheduled:
            return False
        if mixed and self._take(len(mixed)):
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
        if n <= 0 or not self._take(n):
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
            if n <= 0 or not pool.allocate(n):
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
        self.pool.release(req.num_computed - seq.prefix)
        self.pool.unlock(seq.node)
        if retract:
            # Req.reset_for_retract: KV dropped, the cached prefix stays in the tree;
            # back to the end of WAITING (Scheduler._extend_requests_to_queue)
            req.num_computed = 0
            req.num_preemptions += 1
            self.num_preemptions += 1
            self.waiting.append(req)

    # ------------------------------------------------------------------ time
    def _time(self, plan: SglangPlan, now: float) -> None:
        plan.first_step = self.steps.num_steps
        plan.waiting_len = len(self.waiting)
        plan.used = self.pool.num_used
        dt = self.timing.step_time(plan.num_p, plan.work_p, plan.seqs_p, plan.num_d, plan.ctx_d)
        plan.ends = [now + dt]

    # ---------------------------------------------------------------- commit
    def truncate(self, plan: SglangPlan, num_steps: int) -> None:
        plan.num_steps = max(num_steps, plan.committed, 1)

    def commit(self, plan: SglangPlan, upto: int) -> list[Request]:
        if upto <= plan.committed:
            return []
        plan.committed = upto
        end = plan.ends[0]
        idx = plan.first_step
        self.steps.append(plan.start_s, end, plan.used, len(self.running), plan.waiting_len,
                          plan.num_p, plan.num_d)
        for req, n in plan.scheduled:
            c = req.num_computed = req.num_computed + n
            if n > 1 or c < req.num_tokens or req.num_output == 0:
                self._cache_computed(req)  # cache_unfinished_req after an extend
            if c == req.num_tokens:
                req.num_output += 1
                req.num_tokens += 1
                req.add_token_steps(idx, 1)
                if req.num_output == 1:
                    req.first_token_s = end
        done = [r for r in self.running if r.num_output >= r.max_output_tokens]
        if done:
            self.running = [r for r in self.running if r.num_output < r.max_output_tokens]
            for req in done:
                req.finish_s = end
                self._cache_computed(req)  # cache_finished_req
                self._release(req, retract=False)
        return done

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
