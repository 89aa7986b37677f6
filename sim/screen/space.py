"""The search space of a screening scenario, validated up front.

A screening scenario is a normal scenario plus a ``search`` section::

    search:
      strategy: grid            # or optuna (multi-objective, needs the extra)
      trials: 200               # optuna only
      seed: 0
      budget_gpus: 8            # total GPUs of a config (workers x TP) may not exceed it
      space:                    # any scenario field, by dotted path
        cluster.num_workers: [1, 2, 4, 8]
        engine.tensor_parallel_size: [1, 2, 4]
        engine.max_num_seqs: {log_range: [32, 1024], num: 6}
        engine.max_num_batched_tokens: {range: [2048, 16384, 2048]}
      slo:                      # percentile bounds, seconds
        ttft_s: {p90: 2.0}
        tpot_s: {p90: 0.05}
      objective: ttft_s.p90     # latency axis of the Pareto frontier
      cost_per_gpu_hour: {H100-SXM: 2.5}
      shortlist: 5

Every error names the field (``search.space.engine.max_num_seq``) and the fix.
"""

from __future__ import annotations

import copy
import difflib
import hashlib
import itertools
import json
import math
from dataclasses import dataclass, field
from typing import Any, get_args

from pydantic import BaseModel

from ..catalog import load_model
from ..errors import InputError, ScenarioError
from ..scenario import ENGINE_SPECS, EngineSpec, Scenario, validate_scenario

LATENCY_METRICS = ("ttft_s", "tpot_s", "itl_s", "e2e_s")
PERCENTILE_KEYS = ("mean", "p50", "p90", "p99")
STRATEGIES = ("grid", "optuna")
MAX_GRID = 1_000_000
# $/GPU-hour defaults: typical 2026 on-demand cloud list prices; a judgement, set your own
DEFAULT_COST_PER_GPU_HOUR = {"H100-SXM": 2.99, "H200-SXM": 3.79, "A100-SXM-80GB": 1.79,
                             "B200": 5.99, "L40S": 1.19}


@dataclass(frozen=True)
class SearchSpec:
    strategy: str
    space: dict[str, tuple[Any, ...]]  # dotted field -> candidate values, in order
    budget_gpus: int | None
    slo: dict[str, dict[str, float]]  # metric -> {percentile: bound_s}
    objective: str  # e.g. "ttft_s.p90"
    cost_per_gpu_hour: dict[str, float]
    shortlist: int
    trials: int
    seed: int
    base: dict[str, Any] = field(repr=False)  # the scenario without `search`

    @property
    def grid_size(self) -> int:
        return math.prod(len(v) for v in self.space.values())

    def grid(self) -> list[dict[str, Any]]:
        """Every combination, first field slowest (the order of the YAML)."""
        keys = list(self.space)
        return [dict(zip(keys, combo, strict=True))
                for combo in itertools.product(*(self.space[k] for k in keys))]


def config_id(overrides: dict[str, Any]) -> str:
    """A stable name for a point of the space (same knobs -> same id, any run)."""
    text = json.dumps(overrides, sort_keys=True, separators=(",", ":"))
    return hashlib.sha1(text.encode()).hexdigest()[:12]


def apply(base: dict[str, Any], overrides: dict[str, Any]) -> dict[str, Any]:
    out = copy.deepcopy(base)
    for key, value in overrides.items():
        node = out
        parts = key.split(".")
        for p in parts[:-1]:
            nxt = node.get(p)
            if not isinstance(nxt, dict):
                nxt = node[p] = {}
            node = nxt
        node[parts[-1]] = value
    return out


# ----------------------------------------------------------------- parsing
def parse_search(raw: dict[str, Any], where: str) -> SearchSpec:
    """``raw`` is the whole scenario mapping; ``where`` names the file."""
    search = raw.get("search")
    if not isinstance(search, dict):
        raise ScenarioError(where, "search: missing or not a mapping",
                            "add a `search:` section with at least `space:` (see docs)")
    allowed = {"strategy", "trials", "seed", "budget_gpus", "space", "slo", "objective",
               "cost_per_gpu_hour", "shortlist"}
    for key in search:
        if key not in allowed:
            raise ScenarioError(where, f"search.{key}: unknown key",
                                f"use one of: {', '.join(sorted(allowed))}")
    base = {k: v for k, v in raw.items() if k != "search"}
    strategy = search.get("strategy", "grid")
    if strategy not in STRATEGIES:
        raise ScenarioError(where, f"search.strategy = {strategy!r}: unknown",
                            f"use one of: {', '.join(STRATEGIES)}")
    space = _parse_space(search.get("space"), base, where)
    spec = SearchSpec(
        strategy=strategy,
        space=space,
        budget_gpus=_opt_int(search, "budget_gpus", where, 1),
        slo=_parse_slo(search.get("slo", {}), where),
        objective=_parse_objective(search.get("objective", "ttft_s.p90"), where),
        cost_per_gpu_hour=_parse_cost(search.get("cost_per_gpu_hour", {}), where),
        shortlist=_opt_int(search, "shortlist", where, 1) or 5,
        trials=_opt_int(search, "trials", where, 1) or 100,
        seed=_opt_int(search, "seed", where, 0) or 0,
        base=base,
    )
    if strategy == "grid" and spec.grid_size > MAX_GRID:
        raise ScenarioError(where, f"search.space: the grid has {spec.grid_size:,} configs",
                            f"narrow the space below {MAX_GRID:,} or use strategy: optuna")
    _check_points(spec, where)
    return spec


def _opt_int(search: dict[str, Any], key: str, where: str, lo: int) -> int | None:
    v = search.get(key)
    if v is None:
        return None
    if isinstance(v, bool) or not isinstance(v, int) or v < lo:
        raise ScenarioError(where, f"search.{key} = {v!r}: must be an integer >= {lo}",
                            f"set search.{key} to a whole number")
    return v


def _parse_space(space: Any, base: dict[str, Any], where: str) -> dict[str, tuple[Any, ...]]:
    if not isinstance(space, dict) or not space:
        raise ScenarioError(where, "search.space: missing or empty",
                            "map at least one scenario field to its candidate values")
    out: dict[str, tuple[Any, ...]] = {}
    for key, spec in space.items():
        name = f"search.space.{key}"
        if not isinstance(key, str) or not _field_exists(key):
            raise ScenarioError(where, f"{name}: no such scenario field",
                                _field_fix(str(key)))
        values = _values(spec, name, where)
        if len(set(map(_hashable, values))) != len(values):
            raise ScenarioError(where, f"{name}: repeated values {list(values)!r}",
                                "list each candidate once")
        out[key] = values
    return out


def _hashable(v: Any) -> Any:
    return json.dumps(v, sort_keys=True)


def _values(spec: Any, name: str, where: str) -> tuple[Any, ...]:
    if isinstance(spec, list):
        if not spec:
            raise ScenarioError(where, f"{name}: empty list", "give at least one value")
        return tuple(spec)
    if isinstance(spec, dict) and len(spec) in (1, 2):
        if "range" in spec and set(spec) == {"range"}:
            r = spec["range"]
            if (not isinstance(r, list) or len(r) != 3
                    or not all(isinstance(x, int) and not isinstance(x, bool) for x in r)
                    or r[2] <= 0 or r[1] < r[0]):
                raise ScenarioError(where, f"{name}.range = {r!r}: must be [start, stop, step] "
                                    "integers with step > 0 and stop >= start",
                                    "e.g. {range: [2048, 16384, 2048]} (stop included)")
            return tuple(range(r[0], r[1] + 1, r[2]))
        if "log_range" in spec and set(spec) <= {"log_range", "num"}:
            r, num = spec["log_range"], spec.get("num", 5)
            if (not isinstance(r, list) or len(r) != 2
                    or not all(isinstance(x, int) and not isinstance(x, bool) and x >= 1
                               for x in r) or r[1] < r[0]
                    or isinstance(num, bool) or not isinstance(num, int) or num < 1):
                raise ScenarioError(where, f"{name}: log_range {r!r}, num {num!r}: want two "
                                    "integers 1 <= lo <= hi and num >= 1",
                                    "e.g. {log_range: [32, 1024], num: 6}")
            if num == 1:
                return (r[0],)
            vals = sorted({round(r[0] * (r[1] / r[0]) ** (i / (num - 1))) for i in range(num)})
            return tuple(vals)
    raise ScenarioError(where, f"{name} = {spec!r}: not a list, range or log_range",
                        "write [a, b, c], {range: [start, stop, step]} or "
                        "{log_range: [lo, hi], num: n}")


def _models(annotation: Any) -> list[Any]:
    """The section models a field may hold (both engine specs for the engine union)."""
    if annotation == get_args(EngineSpec)[0]:
        return list(ENGINE_SPECS.values())
    return [a for a in getattr(annotation, "__args__", (annotation,))
            if isinstance(a, type) and issubclass(a, BaseModel)]


def _field_exists(dotted: str, model: Any = Scenario) -> bool:
    part, _, rest = dotted.partition(".")
    fields = model.model_fields
    if part not in fields:
        # the router takes its own parameters (extra keys)
        return bool(model.__name__ == "RouterSpec" and not rest)
    if not rest:
        return True
    ann = fields[part].annotation
    sub = _models(ann)
    if not sub:
        # a free-form mapping (timing.profile, workload.synthetic) takes any key
        return ann is not None and "dict" in str(ann)
    return any(_field_exists(rest, m) for m in sub)


def _field_fix(dotted: str) -> str:
    """The nearest valid name and the fields of the section where ``dotted`` went off
    the scenario: 'did you mean engine.max_num_seqs? engine's fields: ...'."""
    model: Any = Scenario
    prefix = ""
    for part in dotted.split(".")[:-1]:
        sub = _sub_model(model, part)
        if sub is None:
            break
        model, prefix = sub, f"{prefix}{part}."
    names = sorted(n for n in model.model_fields if n != "search")
    near = difflib.get_close_matches(dotted, _dotted_fields(Scenario, ""), n=1)
    section = f"{prefix[:-1]}'s fields" if prefix else "the scenario's sections and fields"
    return (f"did you mean {near[0]}? " if near else "use a dotted scenario field; ") + \
        f"{section}: {', '.join(names)}"


def _sub_model(model: Any, part: str) -> Any:
    f = model.model_fields.get(part)
    if f is None:
        return None
    sub = _models(f.annotation)
    return sub[0] if sub else None


def _dotted_fields(model: Any, prefix: str) -> list[str]:
    """Every leaf field, dotted: the names a space can sweep."""
    out: list[str] = []
    for name in model.model_fields:
        if name != "search":
            sub = _sub_model(model, name)
            out += _dotted_fields(sub, f"{prefix}{name}.") if sub else [prefix + name]
    return out


def _parse_slo(slo: Any, where: str) -> dict[str, dict[str, float]]:
    if not isinstance(slo, dict):
        raise ScenarioError(where, "search.slo: not a mapping",
                            "write e.g. slo: {ttft_s: {p90: 2.0}}")
    out: dict[str, dict[str, float]] = {}
    for metric, bounds in slo.items():
        if metric not in LATENCY_METRICS:
            raise ScenarioError(where, f"search.slo.{metric}: unknown metric",
                                f"use one of: {', '.join(LATENCY_METRICS)}")
        if not isinstance(bounds, dict) or not bounds:
            raise ScenarioError(where, f"search.slo.{metric} = {bounds!r}: not a mapping",
                                "write percentile: seconds, e.g. {p90: 2.0}")
        for pct, bound in bounds.items():
            if pct not in PERCENTILE_KEYS:
                raise ScenarioError(where, f"search.slo.{metric}.{pct}: unknown percentile",
                                    f"use one of: {', '.join(PERCENTILE_KEYS)}")
            if isinstance(bound, bool) or not isinstance(bound, int | float) or bound <= 0:
                raise ScenarioError(where, f"search.slo.{metric}.{pct} = {bound!r}: must be "
                                    "seconds > 0", "give the bound in seconds")
        out[metric] = {p: float(b) for p, b in bounds.items()}
    return out


def _parse_objective(obj: Any, where: str) -> str:
    ok = [f"{m}.{p}" for m in LATENCY_METRICS for p in PERCENTILE_KEYS]
    if obj not in ok:
        raise ScenarioError(where, f"search.objective = {obj!r}: unknown latency metric",
                            f"use one of: {', '.join(ok)}")
    return str(obj)


def _parse_cost(cost: Any, where: str) -> dict[str, float]:
    if not isinstance(cost, dict):
        raise ScenarioError(where, "search.cost_per_gpu_hour: not a mapping",
                            "write GPU name: dollars per hour")
    out = dict(DEFAULT_COST_PER_GPU_HOUR)
    for gpu, price in cost.items():
        if isinstance(price, bool) or not isinstance(price, int | float) or price < 0:
            raise ScenarioError(where, f"search.cost_per_gpu_hour.{gpu} = {price!r}: must be "
                                "a number >= 0", "give dollars per GPU-hour")
        out[str(gpu)] = float(price)
    return out


def _check_points(spec: SearchSpec, where: str) -> None:
    """Validate the space's values as the scenario would: each candidate value of
    each field on the base scenario, and TP against the model's heads."""
    for key, values in spec.space.items():
        for v in values:
            try:
                validate_scenario(apply(spec.base, {key: v}), {}, None, [])
            except InputError as e:
                raise ScenarioError(where, f"search.space.{key}: value {v!r}: {e.message}",
                                    e.fix) from None
    tps = spec.space.get("engine.tensor_parallel_size")
    models = spec.space.get("model", (spec.base.get("model"),))
    if tps:
        for m in models:
            model = load_model(str(m))
            for tp in tps:
                try:
                    model.check_tp(int(tp))
                except Exception as e:  # ConfigError: a message for the user
                    raise ScenarioError(where, f"search.space.engine.tensor_parallel_size: "
                                        f"value {tp}: {e}",
                                        f"use TP sizes that divide {model.name}'s "
                                        f"{model.num_attention_heads} heads") from None
