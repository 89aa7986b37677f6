"""Forward-pass samples: one table, whatever the source.

Every importer (op tables, engine step logs, per-pass telemetry, a profiling driver)
produces rows of this one schema: the batch aggregates the timing model reads
(sim.timing.TimingModel.step_time), the measured seconds of that forward pass, and where
the number came from. Fits, k-folds and drift reports read nothing else.

    num_prefill_tokens   int    tokens computed for requests still in prefill (chunks)
    prefill_attn_work    float  Σ over chunks of n · (c + (n + 1) / 2): (query, key) pairs
                                of causal attention, n new tokens after c cached/computed
    num_prefill_seqs     int    prefill chunks in the pass
    num_decode_seqs      int    sequences decoding one token
    decode_context_tokens int   Σ of their context lengths, the new token included
    tp, pp               int    tensor / pipeline parallel size of the engine instance
    measured_s           float  the pass's time, seconds (> 0)
    gpu, engine, engine_version, model, dtype, date, source    str   provenance
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from sim.errors import InputError

from .schema import AGGREGATES, COLUMNS, PARALLEL, PROVENANCE
from .schema import INTS as _INTS

__all__ = ["AGGREGATES", "COLUMNS", "PARALLEL", "PROVENANCE", "check", "frame", "read",
           "regime", "write"]


def frame(rows: Iterable[Mapping[str, Any]], where: str = "measurements") -> pd.DataFrame:
    """Rows (dicts) as a checked measurement table."""
    df = pd.DataFrame(list(rows))
    return check(df, where)


def check(df: pd.DataFrame, where: str = "measurements") -> pd.DataFrame:
    """Columns present, types coerced, values in range; the first bad row is named."""
    missing = [c for c in COLUMNS if c not in df.columns]
    if missing:
        raise InputError(where, f"missing column(s) {', '.join(missing)}",
                         f"a measurement table has columns {', '.join(COLUMNS)}")
    out = df.loc[:, list(COLUMNS)].copy()
    for c in (*AGGREGATES, *PARALLEL, "measured_s"):
        values = pd.to_numeric(out[c], errors="coerce")
        bad = values.isna() | ~np.isfinite(values.to_numpy(dtype=float, na_value=np.nan))
        if bad.any():
            i = int(np.flatnonzero(bad.to_numpy())[0])
            raise InputError(f"{where}: row {i + 1}", f"{c} = {df[c].iloc[i]!r}: not a number",
                             "give numbers for every aggregate and measured_s")
        out[c] = values.astype(np.int64 if c in _INTS else np.float64)
    for c, lo in (("measured_s", 0.0), ("tp", 1), ("pp", 1)):
        bad = out[c] <= lo if c == "measured_s" else out[c] < lo
        if bad.any():
            i = int(np.flatnonzero(bad.to_numpy())[0])
            raise InputError(f"{where}: row {i + 1}", f"{c} = {out[c].iloc[i]}: must be "
                             f"{'> 0' if c == 'measured_s' else '>= 1'}",
                             "drop or fix the row")
    for c in AGGREGATES:
        bad = out[c] < 0
        if bad.any():
            i = int(np.flatnonzero(bad.to_numpy())[0])
            raise InputError(f"{where}: row {i + 1}", f"{c} = {out[c].iloc[i]}: must be >= 0",
                             "drop or fix the row")
    empty = (out["num_prefill_tokens"] == 0) & (out["num_decode_seqs"] == 0)
    if empty.any():
        i = int(np.flatnonzero(empty.to_numpy())[0])
        raise InputError(f"{where}: row {i + 1}", "a forward pass with no tokens",
                         "drop the row")
    for c in PROVENANCE:
        # an empty CSV column reads back as float NaN: blank, as text
        out[c] = [("" if v is None or (isinstance(v, float) and np.isnan(v)) else str(v))
                  for v in out[c].tolist()]
    return out.reset_index(drop=True)


def regime(df: pd.DataFrame) -> pd.Series:
    """prefill (no decode), decode (no prefill) or mixed, per row."""
    p = df["num_prefill_tokens"] > 0
    d = df["num_decode_seqs"] > 0
    return pd.Series(np.where(p & d, "mixed", np.where(p, "prefill", "decode")),
                     index=df.index, name="regime")


def write(df: pd.DataFrame, path: str | Path) -> Path:
    """CSV or parquet by suffix, after checking."""
    path = Path(path)
    df = check(df, str(path))
    if path.suffix == ".parquet":
        df.to_parquet(path, index=False)
    else:
        df.to_csv(path, index=False)
    return path


def read(path: str | Path) -> pd.DataFrame:
    path = Path(path)
    try:
        df = pd.read_parquet(path) if path.suffix == ".parquet" else pd.read_csv(path)
    except FileNotFoundError:
        raise InputError(str(path), "file not found", "check the path") from None
    except (OSError, ValueError) as e:
        raise InputError(str(path), f"cannot read a measurement table ({e})",
                         "give a CSV or parquet file written by calibrate") from None
    return check(df, str(path))
