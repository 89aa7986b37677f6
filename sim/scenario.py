"""Scenario files: typed, validated at the boundary, frozen after load.

A scenario is YAML with the sections below; every unknown key and out-of-range
value is an error that names file:line, the dotted field, the value and the fix::

    scenarios/x.yaml:14: engine.max_num_seqs = 0: must be >= 1. Fix: ...

``--set engine.max_num_seqs=64`` overrides apply before validation (their errors
name ``--set``). Fields that vLLM resolves at start-up take ``auto`` (or null).
"""

from __future__ import annotations

import copy
import inspect
import re
import reprlib
from collections.abc import Callable
from pathlib import Path
from types import UnionType
from typing import Annotated, Any, Literal, get_args

import yaml
from pydantic import (
    BaseModel,
    ConfigDict,
    Discriminator,
    Field,
    StrictBool,
    Tag,
    ValidationError,
    ValidationInfo,
    field_validator,
)

from .catalog import load_gpu, load_model
from .errors import InputError, ScenarioError
from .router import ROUTERS
from .timing import TimingProfile
from .workload import SyntheticSpec

AUTO_FIELDS = ("max_num_seqs", "max_num_batched_tokens", "max_model_len")
SGLANG_AUTO_FIELDS = ("max_running_requests", "max_total_tokens", "chunked_prefill_size",
                      "mem_fraction_static", "max_model_len")


def _auto(v: Any) -> Any:
    return None if v == "auto" else v


class _Model(BaseModel):
    # Lax so that YAML 1.1's string "1e-3" still reads as a float; but never
    # true/false for a number (lax pydantic would read `max_num_seqs: true` as 1),
    # and never nan/inf.
    model_config = ConfigDict(extra="forbid", frozen=True, strict=False, allow_inf_nan=False)

    @field_validator("*", mode="before")
    @classmethod
    def _no_bool_numbers(cls, v: Any, info: ValidationInfo) -> Any:
        if isinstance(v, bool) and info.field_name is not None:
            ann = cls.model_fields[info.field_name].annotation
            types = set(get_args(ann)) if isinstance(ann, UnionType) else {ann}
            if types & {int, float}:
                raise ValueError("must be a number, not true/false")
        return v


class ClosedLoopSpec(_Model):
    concurrency: int = Field(ge=1, le=1_000_000)
    num_requests: int | None = Field(default=None, ge=1, le=2**63 - 1)


class WorkloadSpec(_Model):
    trace: str | None = Field(default=None, min_length=1)
    format: Literal["auto", "mooncake", "azure"] = "auto"
    synthetic: dict[str, Any] | None = None
    time_scale: float = Field(default=1.0, gt=0, le=1e6)
    output_scale: float = Field(default=1.0, gt=0, le=1e4)
    # prompts and hash blocks times this (1/16: Mooncake's 512-token blocks become 32):
    # a production trace's prefix structure on a small engine
    input_scale: float = Field(default=1.0, gt=0, le=1e4)
    start_s: float | None = Field(default=None, ge=0, le=1e12)
    end_s: float | None = Field(default=None, gt=0, le=1e12)
    max_requests: int | None = Field(default=None, ge=1, le=2**63 - 1)
    # interleave n copies of the selected trace (each copy's prefix ids shifted, so
    # copies share no cache): the same traffic shape at n times the load
    copies: int = Field(default=1, ge=1, le=64)
    closed_loop: ClosedLoopSpec | None = None


class VllmEngineSpec(_Model):
    kind: Literal["vllm"] = "vllm"
    tensor_parallel_size: int = Field(default=1, ge=1, le=64)
    max_num_seqs: int | None = Field(default=None, ge=1)  # None: auto
    max_num_batched_tokens: int | None = Field(default=None, ge=1)  # None: auto
    enable_chunked_prefill: StrictBool = True
    enable_prefix_caching: StrictBool = True
    block_size: int = Field(default=16, ge=1, le=4096)
    gpu_memory_utilization: float = Field(default=0.92, gt=0, le=1)
    # A real engine logs 10^3-10^6 blocks (block_size 1 of the smallest bundled model
    # on a B200 is ~4 * 10^6); the pool holds ~40 bytes per block, so a typo like
    # 1e12 would exhaust host memory instead of failing here.
    num_gpu_blocks_override: int | None = Field(default=None, ge=2, le=10_000_000)
    long_prefill_token_threshold: int = Field(default=0, ge=0)
    scheduler_reserve_full_isl: StrictBool = True
    watermark: float = Field(default=0.0, ge=0, lt=1)
    max_model_len: int | None = Field(default=None, ge=1)  # None: auto

    _auto_fields = field_validator(*AUTO_FIELDS, mode="before")(_auto)


class SglangEngineSpec(_Model):
    """`python -m sglang.launch_server` knobs (reference §B.6, v0.5.x); None: auto."""

    kind: Literal["sglang"] = "sglang"
    tensor_parallel_size: int = Field(default=1, ge=1, le=64)
    max_running_requests: int | None = Field(default=None, ge=1, le=1_000_000)
    max_total_tokens: int | None = Field(default=None, ge=2, le=100_000_000)
    # -1 disables chunked prefill, as SGLang's flag does
    chunked_prefill_size: int | None = Field(default=None, ge=-1, le=1_000_000)
    max_prefill_tokens: int = Field(default=16384, ge=1, le=10_000_000)
    schedule_policy: Literal["fcfs", "lpm"] = "fcfs"
    enable_mixed_chunk: StrictBool = False
    schedule_conservativeness: float = Field(default=1.0, gt=0, le=100)
    disable_radix_cache: StrictBool = False
    radix_eviction_policy: Literal["lru", "lfu", "fifo"] = "lru"
    page_size: int = Field(default=1, ge=1, le=4096)
    mem_fraction_static: float | None = Field(default=None, gt=0, le=1)
    max_model_len: int | None = Field(default=None, ge=1)  # --context-length
    ignore_eos: StrictBool = True

    _auto_fields = field_validator(*SGLANG_AUTO_FIELDS, mode="before")(_auto)

    @field_validator("chunked_prefill_size")
    @classmethod
    def _chunk_not_zero(cls, v: int | None) -> int | None:
        if v == 0:
            raise ValueError("must be >= 1, or -1 to disable chunked prefill")
        return v


def _engine_kind(v: Any) -> str:
    # `kind` may be left out: vllm, as before SGLang was added
    if isinstance(v, dict):
        return str(v.get("kind", "vllm"))
    return str(getattr(v, "kind", "vllm"))


ENGINE_SPECS: dict[str, type[BaseModel]] = {"vllm": VllmEngineSpec, "sglang": SglangEngineSpec}
EngineSpec = Annotated[Annotated[VllmEngineSpec, Tag("vllm")]
                       | Annotated[SglangEngineSpec, Tag("sglang")],
                       Discriminator(_engine_kind)]


class TimingSpec(_Model):
    kind: Literal["roofline"] = "roofline"
    # a fitted profile: a bundled name (sim/data/profiles) or a profile YAML's path
    profile_name: str | None = Field(default=None, min_length=1)
    # single coefficients, over the named profile (or over the analytic prior)
    profile: dict[str, float] = Field(default_factory=dict)


class RouterSpec(_Model):
    model_config = ConfigDict(extra="allow", frozen=True)
    kind: str = "round_robin"

    def params(self) -> dict[str, Any]:
        return dict(self.model_extra or {})


class TierSpec(_Model):
    capacity_gib: float = Field(gt=0, le=1e7)
    bandwidth_gb_s: float = Field(gt=0, le=1e5)  # GB/s (10^9 bytes) to load blocks back


class OffloadSpec(_Model):
    """KV offload below each worker's GPU pool (sim.offload): host memory, then disk."""

    host: TierSpec
    disk: TierSpec | None = None


class PlannerSpec(_Model):
    """Autoscaling (sim.planner, sim.autoscale); cluster.num_workers is the initial fleet."""

    policy: dict[str, Any] = Field(default_factory=lambda: {"kind": "load"})
    interval_s: float = Field(default=30.0, gt=0, le=1e6)
    startup: dict[str, Any] = Field(default_factory=lambda: {"kind": "fixed", "delay_s": 60.0})
    min_workers: int = Field(default=1, ge=1, le=4096)
    max_workers: int | None = Field(default=None, ge=1, le=4096)
    max_gpus: int | None = Field(default=None, ge=1, le=1_000_000)
    scale_up_cooldown_s: float = Field(default=0.0, ge=0)
    scale_down_cooldown_s: float = Field(default=0.0, ge=0)


class ClusterSpec(_Model):
    num_workers: int = Field(default=1, ge=1, le=4096)
    router: RouterSpec = Field(default_factory=RouterSpec)
    offload: OffloadSpec | None = None
    planner: PlannerSpec | None = None


class PoolSpec(_Model):
    num_workers: int = Field(default=1, ge=1, le=4096)
    # fields of the top-level engine section that differ for this pool (e.g. TP)
    engine: dict[str, Any] = Field(default_factory=dict)
    router: RouterSpec = Field(default_factory=RouterSpec)


class LinkSpecModel(_Model):
    bandwidth_gb_s: float = Field(gt=0, le=1e5)  # GB/s (10^9 bytes) per link
    latency_us: float = Field(default=0.0, ge=0, le=1e9)
    topology: Literal["per_prefill", "per_decode", "per_pair", "shared"] = "per_prefill"


class DisaggregationSpec(_Model):
    """Prefill and decode pools with KV handoff over links (sim.disagg); replaces
    cluster.num_workers and cluster.router."""

    prefill: PoolSpec
    decode: PoolSpec
    link: LinkSpecModel


class SimulationSpec(_Model):
    fast_forward: StrictBool = True
    # write timeline.json.gz (Chrome/Perfetto trace events) into the run folder
    timeline: StrictBool = False
    # merge identical consecutive decode steps beyond this many per worker (None: never)
    timeline_max_steps_per_worker: int | None = Field(default=200_000, ge=1)
    # carry the timing profile's 90 % prediction intervals into the latencies: two more
    # runs, every pass at its interval's fast / slow end (sim.uncertainty)
    intervals: StrictBool = False


class Scenario(_Model):
    name: str = "scenario"
    seed: int = Field(default=0, ge=0, le=2**63 - 1)
    workload: WorkloadSpec
    model: str = Field(min_length=1)
    gpu: str = Field(min_length=1)
    dtype: Literal["bf16", "fp16", "fp8"] = "bf16"
    engine: EngineSpec = Field(default_factory=VllmEngineSpec)
    timing: TimingSpec = Field(default_factory=TimingSpec)
    cluster: ClusterSpec = Field(default_factory=ClusterSpec)
    simulation: SimulationSpec = Field(default_factory=SimulationSpec)
    disaggregation: DisaggregationSpec | None = None
    # a screening scenario's search space: validated by `servetwin screen`
    # (sim.screen.space), ignored by `servetwin simulate`
    search: dict[str, Any] | None = None


class LoadedScenario:
    """A validated scenario plus where it came from (for relative paths and errors)."""

    def __init__(self, scenario: Scenario, path: Path | None, raw: dict[str, Any],
                 lines: dict[tuple[str, ...], int]) -> None:
        self.scenario = scenario
        self.path = path
        self.raw = raw
        self.lines = lines

    @property
    def base_dir(self) -> Path:
        return self.path.parent if self.path is not None else Path.cwd()

    def where(self, *field: str) -> str:
        name = str(self.path) if self.path is not None else "<scenario>"
        line = self.lines.get(tuple(field))
        return f"{name}:{line}" if line else name

    def resolve_path(self, value: str) -> Path:
        p = Path(value).expanduser()
        return p if p.is_absolute() else self.base_dir / p


# ------------------------------------------------------------------- loading
Lines = dict[tuple[str, ...], int]


def _compose(text: str, name: str) -> tuple[Any, Lines]:
    """Parse YAML and remember the line of every mapping key."""
    try:
        node = yaml.compose(text, Loader=yaml.SafeLoader)
        lines = _key_lines(node, name)
        data = yaml.safe_load(text)
    except yaml.YAMLError as e:
        mark = getattr(e, "problem_mark", None)
        line = f":{mark.line + 1}" if mark is not None else ""
        problem = getattr(e, "problem", None) or str(e).splitlines()[0]
        raise ScenarioError(f"{name}{line}", f"not valid YAML ({problem})",
                            "fix the YAML syntax" + (" at that line" if line else "")) from None
    except RecursionError:
        raise ScenarioError(name, "nested too deeply to be a scenario",
                            "write sections a few levels deep") from None
    return data, lines


def _key_lines(root: yaml.Node | None, name: str) -> Lines:
    """Line of every key path; duplicate keys and self-containing aliases are errors
    (PyYAML keeps the last duplicate silently, and a cycle cannot be validated)."""
    lines: Lines = {}
    done: set[int] = set()  # an alias repeats a node: walk it once (no billion laughs)

    def walk(n: yaml.Node, path: tuple[str, ...], stack: frozenset[int]) -> None:
        if id(n) in stack:
            raise ScenarioError(f"{name}:{n.start_mark.line + 1}",
                                f"{'.'.join(path)}: an alias refers to itself",
                                "remove the recursive alias")
        if id(n) in done:
            return
        done.add(id(n))
        inner = stack | {id(n)}
        if isinstance(n, yaml.MappingNode):
            seen: dict[str, int] = {}
            for k, v in n.value:
                key, line = str(k.value), k.start_mark.line + 1
                if key in seen and key != "<<":
                    raise ScenarioError(f"{name}:{line}",
                                        f"duplicate key {'.'.join((*path, key))!r} (first at "
                                        f"line {seen[key]})", "keep one of them")
                seen[key] = line
                lines[(*path, key)] = line
                walk(v, (*path, key), inner)
        elif isinstance(n, yaml.SequenceNode):
            for i, v in enumerate(n.value):
                lines[(*path, str(i))] = v.start_mark.line + 1
                walk(v, (*path, str(i)), inner)

    if root is not None:
        walk(root, (), frozenset())
    return lines


def apply_overrides(raw: dict[str, Any], overrides: list[str]) -> dict[str, Any]:
    """``key.sub=value`` strings; the value is parsed as YAML (``64``, ``true``, ``[1, 2]``)."""
    out = copy.deepcopy(raw)
    for item in overrides:
        key, sep, text = item.partition("=")
        parts = key.strip().split(".")
        if not sep or not all(parts):
            raise ScenarioError("--set", f"{item!r} is not key=value",
                                "write e.g. --set engine.max_num_seqs=64")
        try:
            value = yaml.safe_load(text)
        except yaml.YAMLError:
            value = text
        node = out
        for p in parts[:-1]:
            nxt = node.get(p)
            if nxt is None:
                nxt = node[p] = {}
            if not isinstance(nxt, dict):
                raise ScenarioError("--set", f"{key}: {p} is not a section",
                                    "override a field inside a section, e.g. engine.block_size")
            node = nxt
        node[parts[-1]] = value
    return out


def load_scenario(path: str | Path, overrides: list[str] | None = None) -> LoadedScenario:
    p = Path(path)
    try:
        text = p.read_text(encoding="utf-8")
    except FileNotFoundError:
        raise ScenarioError(str(p), "file not found", "check the path") from None
    except (OSError, UnicodeDecodeError) as e:
        raise ScenarioError(str(p), f"cannot read ({e.__class__.__name__})",
                            "give a UTF-8 YAML file") from None
    data, lines = _compose(text, str(p))
    return validate_scenario(data, lines, p, overrides or [])


def validate_scenario(data: Any, lines: Lines, path: Path | None,
                      overrides: list[str]) -> LoadedScenario:
    name = str(path) if path is not None else "<scenario>"
    if not isinstance(data, dict):
        raise ScenarioError(name, f"top level is {type(data).__name__}, not a mapping",
                            "write the scenario as key: value sections (workload, model, gpu, ...)")
    raw = apply_overrides(data, overrides) if overrides else data
    overridden = set(_override_keys(overrides))
    try:
        sc = Scenario.model_validate(raw)
    except ValidationError as e:
        raise _explain(e, name, lines, overridden) from None
    except RecursionError:  # a self-containing value given with --set
        raise ScenarioError("--set" if overridden else name, "a value contains itself",
                            "give plain values") from None
    _check_references(sc, lambda *loc: _where(loc, name, lines, overridden))
    return LoadedScenario(sc, path, raw, lines)


def one_line(text: str) -> str:
    """Control characters escaped: a key read from the file may hold a newline, and an
    error message is one line."""
    return re.sub(r"[\x00-\x1f\x7f]", lambda m: repr(m.group(0))[1:-1], text)


def _check_references(sc: Scenario, where: Callable[..., str]) -> None:
    """What the field types cannot say: one workload source, an ordered window, and a
    synthetic spec, model, GPU, timing profile and router that exist. Checked here so
    that the error names the line rather than surfacing from resolve without one."""
    w = sc.workload
    if w.trace is None and w.synthetic is None:
        raise ScenarioError(where("workload"), "workload: neither trace nor synthetic is given",
                            "set workload.trace to a trace file or workload.synthetic to a spec")
    if w.trace is not None and w.synthetic is not None:
        raise ScenarioError(where("workload", "synthetic"),
                            "workload: both trace and synthetic are given", "keep one of them")
    if w.start_s is not None and w.end_s is not None and not w.end_s > w.start_s:
        raise ScenarioError(where("workload", "end_s"),
                            f"workload.end_s = {w.end_s:g}: must be > workload.start_s = "
                            f"{w.start_s:g}", "widen the window")
    if w.synthetic is not None:
        try:
            SyntheticSpec.from_mapping(w.synthetic, "workload.synthetic")
        except InputError as e:
            # the workload module names the dotted field first: workload.synthetic.x.y ...
            m = re.match(r"[\w.]+", e.message)
            loc = tuple(m.group(0).split(".")) if m else ("workload", "synthetic")
            raise ScenarioError(where(*loc), one_line(e.message), one_line(e.fix)) from None
    for field, load in (("model", load_model), ("gpu", load_gpu)):
        value = getattr(sc, field)
        try:
            load(value)
        except InputError as e:
            # a bundled-name miss says `model 'x'`; a bad file says which file and line
            source = "" if e.where == f"{field} {value!r}" else f"{e.where}: "
            raise ScenarioError(where(field), one_line(f"{field} = {value!r}: {source}"
                                                      f"{e.message}"), one_line(e.fix)) from None
    try:
        TimingProfile.from_dict(sc.timing.profile)
    except InputError as e:
        raise ScenarioError(where("timing", "profile"), one_line(f"timing.profile: {e.message}"),
                            one_line(e.fix)) from None
    _check_router(sc.cluster.router, ("cluster", "router"), where)
    _check_topology(sc, where)


def _check_router(router: RouterSpec, loc: tuple[str, ...], where: Callable[..., str]) -> None:
    dotted = ".".join(loc)
    try:
        cls = ROUTERS.get(router.kind)
    except ScenarioError as e:
        raise ScenarioError(where(*loc, "kind"),
                            f"{dotted}.kind = {router.kind!r}: {e.message}", e.fix) from None
    try:
        inspect.signature(cls).bind(1, None, **router.params())
    except TypeError as e:
        raise ScenarioError(where(*loc), f"{dotted} ({router.kind}): {e}",
                            "check the router's parameters") from None


def _check_topology(sc: Scenario, where: Callable[..., str]) -> None:
    """Offload, planner and disaggregation: their sub-specs and what combines."""
    from .planner import PLANNER_POLICIES, STARTUP_DELAYS, make_startup_delay

    cl = sc.cluster
    engine_kind = getattr(sc.engine, "kind", "vllm")
    if cl.offload is not None and engine_kind != "vllm":
        raise ScenarioError(where("cluster", "offload"),
                            f"cluster.offload with engine.kind = {engine_kind!r}: offload tiers "
                            "are modelled below vLLM's block pool only",
                            "remove cluster.offload or use engine.kind: vllm")
    p = cl.planner
    if p is not None:
        kind = str(p.policy.get("kind", ""))
        if kind not in PLANNER_POLICIES.kinds():
            raise ScenarioError(where("cluster", "planner", "policy", "kind"),
                                f"cluster.planner.policy.kind = {kind!r}: unknown",
                                f"use one of: {', '.join(PLANNER_POLICIES.kinds())}")
        skind = str(p.startup.get("kind", ""))
        if skind not in STARTUP_DELAYS.kinds():
            raise ScenarioError(where("cluster", "planner", "startup", "kind"),
                                f"cluster.planner.startup.kind = {skind!r}: unknown",
                                f"use one of: {', '.join(STARTUP_DELAYS.kinds())}")
        try:
            make_startup_delay(p.startup, "cluster.planner.startup")
        except (InputError, ScenarioError) as e:
            what = (f"cluster.planner.{e.where} = {e.message}"
                    if e.where.startswith("startup") else
                    f"cluster.planner.startup: {e.where}: {e.message}")
            raise ScenarioError(where("cluster", "planner", "startup"), one_line(what),
                                one_line(e.fix)) from None
        if p.max_workers is None and p.max_gpus is None:
            raise ScenarioError(where("cluster", "planner"),
                                "cluster.planner: neither max_workers nor max_gpus is given",
                                "bound the fleet: set max_workers or max_gpus")
        if p.max_workers is not None and p.max_workers < max(p.min_workers, 1):
            raise ScenarioError(where("cluster", "planner", "max_workers"),
                                f"cluster.planner.max_workers = {p.max_workers}: must be >= "
                                f"min_workers {p.min_workers}", "raise max_workers")
    d = sc.disaggregation
    if d is None:
        return
    if engine_kind != "vllm":
        raise ScenarioError(where("disaggregation"),
                            f"disaggregation with engine.kind = {engine_kind!r}: the KV handoff "
                            "is modelled for vLLM engines only", "use engine.kind: vllm")
    if p is not None or cl.offload is not None:
        which = "cluster.planner" if p is not None else "cluster.offload"
        raise ScenarioError(where("disaggregation"),
                            f"disaggregation with {which}: not modelled together",
                            f"remove {which} or disaggregation")
    for pool in ("prefill", "decode"):
        spec: PoolSpec = getattr(d, pool)
        _check_router(spec.router, ("disaggregation", pool, "router"), where)
        merged = {**sc.engine.model_dump(), **spec.engine}
        try:
            VllmEngineSpec.model_validate(merged)
        except ValidationError as e:
            err = e.errors()[0]
            key = ".".join(str(x) for x in err["loc"])
            raise ScenarioError(where("disaggregation", pool, "engine", *map(str, err["loc"])),
                                f"disaggregation.{pool}.engine.{key} = "
                                f"{_SHOW.repr(err.get('input'))}: {err['msg']}",
                                "give a valid vLLM engine field (see engine:)") from None


def _override_keys(overrides: list[str]) -> list[tuple[str, ...]]:
    return [tuple(o.partition("=")[0].strip().split(".")) for o in overrides]


def _where(loc: tuple[str, ...], name: str, lines: Lines,
           overridden: set[tuple[str, ...]]) -> str:
    """``--set`` if an override wrote the field, a section above it or a key below it;
    else the file and the line of the deepest key that the file has."""
    if loc and any(loc[: len(k)] == k or k[: len(loc)] == loc for k in overridden):
        return "--set"
    for i in range(len(loc), 0, -1):
        line = lines.get(loc[:i])
        if line:
            return f"{name}:{line}"
    return name


_SHOW = reprlib.Repr()
_SHOW.maxstring = _SHOW.maxother = 60
_SHOW.maxlist = _SHOW.maxtuple = 4
_SHOW.maxdict = 3
_SHOW.maxlevel = 2


def _explain(e: ValidationError, name: str, lines: Lines,
             overridden: set[tuple[str, ...]]) -> ScenarioError:
    errors = e.errors()
    # a misspelt key also makes its real name "missing": report the cause
    err = next((x for x in errors if x["type"] == "extra_forbidden"), errors[0])
    loc = tuple(str(x) for x in err["loc"])
    tag = None
    if len(loc) >= 2 and loc[0] == "engine" and loc[1] in ENGINE_SPECS:
        tag = loc[1]  # the discriminated union's tag: not a key of the file
        loc = loc[:1] + loc[2:]
    kind = err["type"]
    if kind == "union_tag_invalid":
        loc = (*loc, "kind")
        field = one_line(".".join(loc))
        return ScenarioError(_where(loc, name, lines, overridden),
                             f"{field} = {_SHOW.repr(err.get('ctx', {}).get('tag'))}: must be one "
                             f"of {', '.join(ENGINE_SPECS)}",
                             f"set {field} to one of {', '.join(ENGINE_SPECS)}")
    field = one_line(".".join(loc))
    where = _where(loc, name, lines, overridden)
    if kind == "extra_forbidden":
        return ScenarioError(where, f"unknown key {field!r}",
                             f"remove it or use one of: {', '.join(_valid_keys(loc[:-1], tag))}")
    if kind == "missing":
        return ScenarioError(where, f"{field} is missing", f"add {field}")
    shown = _SHOW.repr(err.get("input"))
    if kind in ("model_type", "dict_type"):
        keys = _valid_keys(loc, tag)
        return ScenarioError(where, f"{field} = {shown}: must be a section of keys",
                             f"write {field}: as key: value lines"
                             + (f" ({', '.join(keys)})" if keys else ""))
    # pydantic's "Input should be ...", "String should have ...": say "must ..."
    msg = re.sub(r"^(Input|String|List|Dict) should ", "must ",
                 err["msg"].removeprefix("Value error, "))
    if kind in _BOUNDS:
        op, key = _BOUNDS[kind]
        msg = f"must be {op} {_num(err.get('ctx', {}).get(key))}"
    allowed = _allowed(loc, tag) or "a valid value"
    return ScenarioError(where, f"{field} = {shown}: {msg}", f"set {field} to {allowed}")


_BOUNDS = {"greater_than_equal": (">=", "ge"), "greater_than": (">", "gt"),
           "less_than_equal": ("<=", "le"), "less_than": ("<", "lt")}


def _num(x: Any) -> str:
    return str(int(x)) if isinstance(x, float) and x.is_integer() else str(x)


def _field(loc: tuple[str, ...], tag: str | None = None) -> Any:
    """The FieldInfo at a dotted location, or None where loc leaves the models."""
    model: type[BaseModel] | None = Scenario
    f = None
    for part in loc:
        f = model.model_fields.get(part) if model is not None else None
        if f is None:
            return None
        model = _section(f.annotation, tag)
    return f


def _section(annotation: Any, tag: str | None = None) -> type[BaseModel] | None:
    """The section model of a field; for the engine union, the one ``tag`` names."""
    if annotation == get_args(EngineSpec)[0]:
        return ENGINE_SPECS[tag or "vllm"]
    for a in getattr(annotation, "__args__", ()) or (annotation,):
        if isinstance(a, type) and issubclass(a, BaseModel):
            return a
    return None


def _valid_keys(loc: tuple[str, ...], tag: str | None = None) -> list[str]:
    model: type[BaseModel] | None = Scenario
    if loc:
        f = _field(loc, tag)
        model = _section(f.annotation, tag) if f is not None else None
    return sorted(model.model_fields) if model is not None else []


def _allowed(loc: tuple[str, ...], tag: str | None = None) -> str:
    """What a field accepts, from its declaration: 'an integer >= 1 and <= 64, or auto'."""
    f = _field(loc, tag)
    if f is None:
        return ""
    args = set(getattr(f.annotation, "__args__", ()) or (f.annotation,))
    if getattr(f.annotation, "__origin__", None) is Literal:
        return "one of " + ", ".join(map(str, f.annotation.__args__))
    what = ("true or false" if args & {bool} else "an integer" if int in args
            else "a number" if float in args else "text" if str in args else "")
    bounds = [f"{op} {_num(getattr(m, key))}" for m in f.metadata
              for op, key in _BOUNDS.values() if hasattr(m, key)]
    text = " ".join(x for x in (what, " and ".join(bounds)) if x)
    if loc[-1] in (SGLANG_AUTO_FIELDS if tag == "sglang" else AUTO_FIELDS):
        text += ", or auto"
    return text


def scenario_to_dict(sc: Scenario) -> dict[str, Any]:
    out: dict[str, Any] = sc.model_dump(mode="json")
    return out
