"""Scenario files: typed, validated at the boundary, frozen after load.

A scenario is YAML with the sections below; every unknown key and out-of-range
value is an error that names file:line, the dotted field, the value and the fix::

    scenarios/x.yaml:14: engine.max_num_seqs = 0: must be >= 1. Fix: ...

``--set engine.max_num_seqs=64`` overrides apply before validation (their errors
name ``--set``). Fields that vLLM resolves at start-up take ``auto`` (or null).
"""

from __future__ import annotations

import copy
from pathlib import Path
from typing import Annotated, Any, Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator

from .errors import ScenarioError

Auto = Annotated[int, Field(ge=1)] | None


def _auto(v: Any) -> Any:
    return None if v == "auto" else v


class _Model(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True, strict=False)


class ClosedLoopSpec(_Model):
    concurrency: int = Field(ge=1, le=1_000_000)
    num_requests: int | None = Field(default=None, ge=1)


class WorkloadSpec(_Model):
    trace: str | None = None
    format: Literal["auto", "mooncake", "azure"] = "auto"
    synthetic: dict[str, Any] | None = None
    time_scale: float = Field(default=1.0, gt=0, le=1e6)
    output_scale: float = Field(default=1.0, gt=0, le=1e4)
    start_s: float | None = Field(default=None, ge=0)
    end_s: float | None = Field(default=None, gt=0)
    max_requests: int | None = Field(default=None, ge=1)
    closed_loop: ClosedLoopSpec | None = None


class VllmEngineSpec(_Model):
    kind: Literal["vllm"] = "vllm"
    tensor_parallel_size: int = Field(default=1, ge=1, le=64)
    max_num_seqs: Auto = None
    max_num_batched_tokens: Auto = None
    enable_chunked_prefill: bool = True
    enable_prefix_caching: bool = True
    block_size: int = Field(default=16, ge=1, le=4096)
    gpu_memory_utilization: float = Field(default=0.92, gt=0, le=1)
    num_gpu_blocks_override: int | None = Field(default=None, ge=2)
    long_prefill_token_threshold: int = Field(default=0, ge=0)
    scheduler_reserve_full_isl: bool = True
    watermark: float = Field(default=0.0, ge=0, lt=1)
    max_model_len: Auto = None

    _auto_fields = field_validator("max_num_seqs", "max_num_batched_tokens", "max_model_len",
                                   mode="before")(_auto)


class TimingSpec(_Model):
    kind: Literal["roofline"] = "roofline"
    profile: dict[str, float] = Field(default_factory=dict)


class RouterSpec(_Model):
    model_config = ConfigDict(extra="allow", frozen=True)
    kind: str = "round_robin"

    def params(self) -> dict[str, Any]:
        return dict(self.model_extra or {})


class ClusterSpec(_Model):
    num_workers: int = Field(default=1, ge=1, le=4096)
    router: RouterSpec = Field(default_factory=RouterSpec)


class SimulationSpec(_Model):
    fast_forward: bool = True


class Scenario(_Model):
    name: str = "scenario"
    seed: int = Field(default=0, ge=0, le=2**63 - 1)
    workload: WorkloadSpec
    model: str
    gpu: str
    dtype: Literal["bf16", "fp16", "fp8"] = "bf16"
    engine: VllmEngineSpec = Field(default_factory=VllmEngineSpec)
    timing: TimingSpec = Field(default_factory=TimingSpec)
    cluster: ClusterSpec = Field(default_factory=ClusterSpec)
    simulation: SimulationSpec = Field(default_factory=SimulationSpec)


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
def _compose(text: str, name: str) -> tuple[Any, dict[tuple[str, ...], int]]:
    """Parse YAML and remember the line of every mapping key."""
    try:
        node = yaml.compose(text, Loader=yaml.SafeLoader)
        data = yaml.safe_load(text)
    except yaml.YAMLError as e:
        mark = getattr(e, "problem_mark", None)
        line = f":{mark.line + 1}" if mark is not None else ""
        problem = getattr(e, "problem", None) or str(e).splitlines()[0]
        raise ScenarioError(f"{name}{line}", f"not valid YAML ({problem})",
                            "fix the YAML syntax at that line") from None
    lines: dict[tuple[str, ...], int] = {}

    def walk(n: Any, path: tuple[str, ...]) -> None:
        if isinstance(n, yaml.MappingNode):
            for k, v in n.value:
                key = (*path, str(k.value))
                lines[key] = k.start_mark.line + 1
                walk(v, key)
        elif isinstance(n, yaml.SequenceNode):
            for i, v in enumerate(n.value):
                key = (*path, str(i))
                lines[key] = v.start_mark.line + 1
                walk(v, key)

    if node is not None:
        walk(node, ())
    return data, lines


def apply_overrides(raw: dict[str, Any], overrides: list[str]) -> dict[str, Any]:
    """``key.sub=value`` strings; the value is parsed as YAML (``64``, ``true``, ``[1, 2]``)."""
    out = copy.deepcopy(raw)
    for item in overrides:
        key, sep, text = item.partition("=")
        if not sep or not key.strip():
            raise ScenarioError("--set", f"{item!r} is not key=value",
                                "write e.g. --set engine.max_num_seqs=64")
        try:
            value = yaml.safe_load(text)
        except yaml.YAMLError:
            value = text
        parts = key.strip().split(".")
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


def validate_scenario(data: Any, lines: dict[tuple[str, ...], int], path: Path | None,
                      overrides: list[str]) -> LoadedScenario:
    name = str(path) if path is not None else "<scenario>"
    if not isinstance(data, dict):
        raise ScenarioError(name, f"top level is {type(data).__name__}, not a mapping",
                            "write the scenario as key: value sections (workload, model, gpu, ...)")
    raw = apply_overrides(data, overrides) if overrides else data
    try:
        sc = Scenario.model_validate(raw)
    except ValidationError as e:
        raise _explain(e, name, lines, set(_override_keys(overrides))) from None
    if sc.workload.trace is None and sc.workload.synthetic is None:
        raise ScenarioError(f"{name}", "workload: neither trace nor synthetic is given",
                            "set workload.trace to a trace file or workload.synthetic to a spec")
    if sc.workload.trace is not None and sc.workload.synthetic is not None:
        raise ScenarioError(f"{name}:{lines.get(('workload', 'synthetic'), '')}".rstrip(":"),
                            "workload: both trace and synthetic are given",
                            "keep one of them")
    return LoadedScenario(sc, path, raw, lines)


def _override_keys(overrides: list[str]) -> list[tuple[str, ...]]:
    return [tuple(o.partition("=")[0].strip().split(".")) for o in overrides]


def _explain(e: ValidationError, name: str, lines: dict[tuple[str, ...], int],
             overridden: set[tuple[str, ...]]) -> ScenarioError:
    err = e.errors()[0]
    loc = tuple(str(x) for x in err["loc"] if not str(x).startswith("function-"))
    # pydantic adds the union member tried (e.g. 'int') to the location
    noise = ("int", "none", "float", "str", "bool", "constrained-int")
    loc = tuple(x for x in loc if x not in noise)
    field = ".".join(loc)
    if any(loc[: len(k)] == k for k in overridden):
        where = "--set"
    else:
        line = None
        for i in range(len(loc), 0, -1):
            line = lines.get(loc[:i])
            if line:
                break
        where = f"{name}:{line}" if line else name
    kind = err["type"]
    value = err.get("input")
    shown = repr(value) if not isinstance(value, dict) else "{...}"
    if len(shown) > 60:
        shown = shown[:57] + "..."
    if kind == "extra_forbidden":
        return ScenarioError(where, f"unknown key {field!r}",
                             f"remove it or use one of: {', '.join(_valid_keys(loc[:-1]))}")
    if kind == "missing":
        return ScenarioError(where, f"{field} is missing", f"add {field}")
    msg = err["msg"]
    if msg.startswith("Input should be "):
        msg = "must be " + msg[len("Input should be "):]
    return ScenarioError(where, f"{field} = {shown}: {msg}",
                         f"set {field} to a valid value" if field else "fix the scenario")


def _valid_keys(loc: tuple[str, ...]) -> list[str]:
    model: Any = Scenario
    for part in loc:
        f = model.model_fields.get(part)
        if f is None:
            return []
        ann = f.annotation
        args = getattr(ann, "__args__", ()) or (ann,)
        sub = [a for a in args if isinstance(a, type) and issubclass(a, BaseModel)]
        if not sub:
            return []
        model = sub[0]
    return sorted(model.model_fields)


def scenario_to_dict(sc: Scenario) -> dict[str, Any]:
    out: dict[str, Any] = sc.model_dump(mode="json")
    return out
