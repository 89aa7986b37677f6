"""Timing-profile YAML: fitted coefficients, where they came from, how well they predict.

    timing:                      # paste this block into a scenario as is
      kind: roofline
      profile: {gemm_compute_eff: 0.78, gemm_mem_eff: 0.86, ...}
    provenance: {gpu, engine, engine_version, model, dtype, tp, date, sources, num_samples,
                 not_identified, at_bound, loss}
    fit:
      kfold: {k, seed, regimes: {all|prefill|decode|mixed: {num_samples, median_ape,
              mean_ape, p90_ape, log_q05, log_q95}}}
      intervals: {regime: {log_q05, log_q95}}   # of log(predicted / measured)

The `timing:` block is a valid scenario `timing:` (sim/scenario.py TimingSpec). One-liner to
put a profile into a scenario's timing section:

    python -c "import sys, yaml; d = yaml.safe_load(open(sys.argv[1]));
    print(yaml.safe_dump({'timing': d['timing']}))" PROFILE.yaml >> SCENARIO.yaml

load_profile(path) -> (TimingProfile, meta) reads it back; a malformed file raises
sim.errors.InputError naming the file and the field.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import yaml

from sim.errors import InputError
from sim.profiles import read_profile
from sim.timing import TimingProfile

from .fit import FitResult, KFoldResult


def profile_doc(result: FitResult, *, gpu: str, engine: str, engine_version: str, model: str,
                dtype: str, tp: int, sources: Sequence[str], kfold: KFoldResult | None = None,
                date: str | None = None) -> dict[str, Any]:
    """The YAML document of a fit. Intervals come from the k-fold's held-out residuals when
    there is one (honest), else from the in-sample residuals."""
    intervals = kfold.intervals() if kfold else result.intervals
    doc: dict[str, Any] = {
        "timing": {"kind": "roofline", "profile": result.profile.to_dict()},
        "provenance": {
            "gpu": gpu, "engine": engine, "engine_version": engine_version, "model": model,
            "dtype": dtype, "tp": int(tp),
            "date": date or datetime.now(UTC).strftime("%Y-%m-%d"),
            "sources": list(sources), "num_samples": int(result.num_samples),
            "loss": result.loss, "not_identified": list(result.not_identified),
            "at_bound": list(result.at_bound),
        },
        "fit": {
            "intervals": {g: {"log_q05": q[0], "log_q95": q[1]} for g, q in intervals.items()},
            "intervals_from": "kfold held-out" if kfold else "in-sample",
        },
    }
    if kfold:
        doc["fit"]["kfold"] = {"k": kfold.k, "seed": kfold.seed, "regimes": kfold.by_regime}
    return doc


def write_profile(path: str | Path, doc: Mapping[str, Any]) -> Path:
    path = Path(path)
    try:
        path.write_text(yaml.safe_dump(dict(doc), sort_keys=False))
    except OSError as e:
        raise InputError(str(path), f"cannot write ({e.strerror or e})",
                         "choose a writable --out path") from None
    return path


def load_profile(path: str | Path) -> tuple[TimingProfile, dict[str, Any]]:
    """(profile, meta) where meta = {"provenance": ..., "fit": ...} as written."""
    return read_profile(path)


def one_line(e: Exception) -> str:
    return " ".join(str(e).split())
