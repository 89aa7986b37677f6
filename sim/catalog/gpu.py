"""GPUs as spec records, bundled in ``sim/data/gpus.yaml`` or given as a YAML file of the same
fields."""

from __future__ import annotations

import contextlib
import copy
import math
import re
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import yaml

from ..errors import CatalogError
from .model import dtype_bytes

GPUS_FILE = Path(__file__).parents[1] / "data" / "gpus.yaml"


@dataclass(frozen=True)
class GpuSpec:
    """Dense (no-sparsity) tensor-core peaks; bandwidths in bytes/s, one direction."""

    name: str
    bf16_flops_per_s: float
    fp8_flops_per_s: float  # GPUs without FP8 tensor cores repeat the bf16 figure
    hbm_bytes_per_s: float
    hbm_capacity_bytes: int
    nvlink_bytes_per_s: float | None  # per GPU, one direction; None: no NVLink
    pcie_bytes_per_s: float
    notes: str = ""
    source: str = ""
    # the largest efficiency a timing profile may have on this device: 1 where the peaks
    # above are ceilings (a datasheet's), above 1 where they are nominal rates measured on
    # one host (the CPU entry), which a faster host exceeds
    efficiency_ceiling: float = 1.0

    @property
    def tp_link_bytes_per_s(self) -> float:
        """The link a TP all-reduce runs over: NVLink where present, else PCIe."""
        return self.nvlink_bytes_per_s or self.pcie_bytes_per_s

    def flops_per_s(self, dtype: str) -> float:
        dtype_bytes(dtype)
        return self.fp8_flops_per_s if dtype == "fp8" else self.bf16_flops_per_s


_GPU_NUMBERS = (
    "bf16_flops_per_s",
    "fp8_flops_per_s",
    "hbm_bytes_per_s",
    "hbm_capacity_bytes",
    "nvlink_bytes_per_s",
    "pcie_bytes_per_s",
)
_GPU_TEXT = ("notes", "source")
# efficiency_ceiling: optional, >= 1 (GpuSpec)
MAX_EFFICIENCY_CEILING = 16.0


def _positive_number(value: Any, where: str, field: str) -> float:
    # PyYAML (YAML 1.1) reads 3.35e12 without a '+' in the exponent as a string; accept it.
    if isinstance(value, str):
        with contextlib.suppress(ValueError):
            value = float(value)
    if (
        isinstance(value, bool)
        or not isinstance(value, int | float)
        or not (math.isfinite(value) and value > 0)
    ):
        raise CatalogError(
            where,
            f"field '{field}' = {value!r}: must be a positive number",
            "give it in base units (FLOP/s, bytes/s, bytes)",
        )
    return float(value)


def gpu_from_dict(data: Any, name: str, where: str) -> GpuSpec:
    if not isinstance(data, Mapping):
        raise CatalogError(
            where, "a GPU spec must be a mapping of fields", f"give {', '.join(_GPU_NUMBERS)}"
        )
    unknown = sorted(set(data) - set(_GPU_NUMBERS) - set(_GPU_TEXT)
                     - {"name", "aliases", "efficiency_ceiling"})
    if unknown:
        raise CatalogError(
            where,
            f"unknown field(s) {', '.join(map(str, unknown))}",
            f"valid fields: name, aliases, {', '.join(_GPU_NUMBERS + _GPU_TEXT)}, "
            "efficiency_ceiling",
        )
    values: dict[str, Any] = {}
    for field in _GPU_NUMBERS:
        if field not in data:
            raise CatalogError(
                where, f"missing field '{field}'", "null is allowed for nvlink_bytes_per_s only"
            )
        if field == "nvlink_bytes_per_s" and not data[field]:
            values[field] = None
        else:
            values[field] = _positive_number(data[field], where, field)
    values["hbm_capacity_bytes"] = int(values["hbm_capacity_bytes"])
    for field in _GPU_TEXT:
        text = data.get(field, "")
        if not isinstance(text, str):
            raise CatalogError(where, f"field '{field}' must be text", "quote it")
        values[field] = text.strip()
    if "efficiency_ceiling" in data:
        ceiling = _positive_number(data["efficiency_ceiling"], where, "efficiency_ceiling")
        if not 1.0 <= ceiling <= MAX_EFFICIENCY_CEILING:
            raise CatalogError(
                where,
                f"field 'efficiency_ceiling' = {data['efficiency_ceiling']!r}: must be in "
                f"[1, {MAX_EFFICIENCY_CEILING:g}]",
                "1 where the peaks are datasheet ceilings; more only where they are nominal "
                "rates a faster host can exceed",
            )
        values["efficiency_ceiling"] = ceiling
    return GpuSpec(name=str(data.get("name", name)), **values)


def _gpu_key(name: str) -> str:
    return re.sub(r"[\s_]+", "-", name.strip().lower())


def _read_yaml(path: Path) -> Any:
    try:
        return yaml.safe_load(path.read_text(encoding="utf-8"))
    except yaml.YAMLError as e:
        mark = getattr(e, "problem_mark", None)
        where = f"{path}:{mark.line + 1}" if mark is not None else str(path)
        raise CatalogError(where, f"not valid YAML ({e})", "fix the file") from None
    except OSError as e:
        raise CatalogError(str(path), f"cannot read ({e.strerror})", "check the path") from None


# the bundled catalog as parsed, by the file's mtime: a screening worker resolves a GPU
# per config, and parsing the YAML each time cost ~0.04 s of a ~1.7 s config
_BUNDLED: dict[int, dict[str, Any]] = {}


def bundled_gpus() -> dict[str, Any]:
    """The bundled GPU entries (a fresh copy: callers may change it)."""
    mtime = GPUS_FILE.stat().st_mtime_ns
    if mtime not in _BUNDLED:
        _BUNDLED.clear()
        _BUNDLED[mtime] = dict(_read_yaml(GPUS_FILE)["gpus"])
    return copy.deepcopy(_BUNDLED[mtime])


def load_gpu(name_or_path: str | Path) -> GpuSpec:
    path = Path(name_or_path).expanduser()
    if path.is_file():
        return gpu_from_dict(_read_yaml(path), path.stem, str(path))
    text = str(name_or_path)
    gpus = bundled_gpus()
    key = _gpu_key(text)
    for gpu_name, entry in gpus.items():
        names = [gpu_name, *entry.get("aliases", [])]
        if key in {_gpu_key(n) for n in names}:
            return gpu_from_dict(entry, gpu_name, f"{GPUS_FILE}: gpus.{gpu_name}")
    raise CatalogError(
        f"gpu {text!r}",
        "not a bundled GPU and no such file",
        f"use one of {', '.join(gpus)}, or the path of a GPU YAML file",
    )
