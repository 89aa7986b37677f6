"""The engine's host (CPU) work per step, from Vidur's measured vLLM CPU overheads.

Op tables (calibrate.aiconfigurator) time GPU kernels only. A vLLM step also spends CPU
time around them — scheduling, preparing the model's inputs, sampling, processing the
outputs — and without async scheduling that time is serial to the GPU: the engine core's
step schedules, executes the model and updates from its output in turn
(vllm-project/vllm:vllm/v1/engine/core.py @ v0.12.0, EngineCore.step). No op table holds
it, so a profile composed from op tables alone predicts decode steps too short by about
a millisecond plus some tens of microseconds per sequence.

The one measurement of that work we have is Vidur's profiling of vLLM (shared
data/timing/vidur/legacy/a100_cpu_overheads.csv.gz, SOURCES.md §1, MIT; upstream
microsoft/vidur:data/profiling/a100/cpu_overheads.csv @ 7f14d6ab): per-iteration medians
in ms of `schedule`, `sampler_e2e`, `prepare_inputs_e2e` and `process_model_outputs` for
batch sizes 8-128, at TP 1 (Llama-2-7B, phi-2), 2 (CodeLlama-34B, InternLM-20B) and 4
(Llama-2-70B, Qwen-72B). Per TP their sum is fitted by least squares as

    host(b) = step_s + per_seq_s · b            (b = sequences in the batch)

— the same form as the timing model's step and per-sequence overheads, to which it is
added. A profile for TP t takes the line of the largest measured TP <= t (TP > 1 costs
more: the driver hands every step's inputs to t workers). `ray_comm_time` is left out
(V1 does not use Ray for one node), and so is `model_execution`, which is GPU time.

Caveats, stated in every profile that carries it: the measurements are vLLM V0 on A100
hosts (2024), with Llama-2's 32k vocabulary (sampling over Qwen3's 152k costs more); V1
with async scheduling hides much of this work. SGLang profiles get none: its overlap
scheduler runs the CPU work of step n + 1 while the GPU runs step n.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from sim.errors import InputError

from .importers import _numbers, vidur_root

FILE = "legacy/a100_cpu_overheads.csv.gz"
SOURCE = "microsoft/vidur:data/profiling/a100/cpu_overheads.csv @ 7f14d6ab"
COMPONENTS = ("schedule_median", "sampler_e2e_median", "prepare_inputs_e2e_median",
              "process_model_outputs_median")
KEYS = ("model_name", "batch_size", "tensor_parallel_degree")


@dataclass(frozen=True)
class HostOverhead:
    """host(b) = step_s + per_seq_s · b, fitted to the rows measured at TP `tp`."""

    tp: int
    step_s: float
    per_seq_s: float
    num_rows: int
    models: tuple[str, ...]
    max_rel_residual: float  # largest |fit / measured - 1| over the rows

    def provenance(self, for_tp: int) -> dict[str, Any]:
        return {
            "step_s": self.step_s, "per_seq_s": self.per_seq_s,
            "source": f"{SOURCE}: sum of {', '.join(COMPONENTS)}, least squares in batch size",
            "measured_tp": self.tp, "for_tp": int(for_tp), "rows": self.num_rows,
            "models": list(self.models),
            "max_rel_residual": self.max_rel_residual,
            "caveat": ("vLLM V0 on A100 hosts with a 32k vocabulary; V1's async "
                       "scheduling hides much of this work"),
        }


def default_path() -> Path:
    return vidur_root() / FILE


def read(path: str | Path | None = None) -> pd.DataFrame:
    """The CPU-overhead table, checked: the columns used, numbers, batch sizes >= 1."""
    path = Path(path) if path else default_path()
    try:
        df = pd.read_csv(path)
    except FileNotFoundError:
        raise InputError(str(path), "file not found",
                         "give Vidur's cpu_overheads.csv (shared data/timing/vidur/legacy)"
                         ) from None
    except (OSError, ValueError, UnicodeDecodeError, EOFError) as e:
        raise InputError(str(path), f"not a readable CSV ({type(e).__name__})",
                         "give Vidur's cpu_overheads.csv, gzipped or not") from None
    if "model_name" not in df.columns:
        raise InputError(str(path), "missing column(s) model_name",
                         "give Vidur's cpu_overheads.csv, which has them")
    _numbers(df, KEYS[1:], path, positive=True)
    _numbers(df, COMPONENTS, path, positive=False)
    return df


def fit(df: pd.DataFrame) -> dict[int, HostOverhead]:
    """One line per measured TP (module doc); needs two batch sizes at least."""
    out = {}
    for _, rows in df.groupby("tensor_parallel_degree"):
        tp = int(rows["tensor_parallel_degree"].iloc[0])
        b = rows["batch_size"].to_numpy(float)
        ms = rows[list(COMPONENTS)].to_numpy(float).sum(axis=1)
        if len(np.unique(b)) < 2:
            continue
        (a, s), *_ = np.linalg.lstsq(np.column_stack([np.ones_like(b), b]), ms, rcond=None)
        a, s = max(float(a), 0.0), max(float(s), 0.0)
        resid = float(np.max(np.abs((a + s * b) / ms - 1)))
        out[tp] = HostOverhead(tp, a / 1e3, s / 1e3, len(rows),
                                    tuple(sorted(map(str, rows["model_name"].unique()))),
                                    resid)
    return out


def for_tp(lines: dict[int, HostOverhead], tp: int) -> HostOverhead:
    """The line of the largest measured TP <= tp (the smallest if none is)."""
    if not lines:
        raise InputError("host overhead", "no TP has two batch sizes measured",
                         "give a cpu_overheads table with several batch sizes per TP")
    below = [t for t in lines if t <= tp]
    return lines[max(below) if below else min(lines)]
