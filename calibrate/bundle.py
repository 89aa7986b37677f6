"""Bundled timing profiles, composed from AIConfigurator op tables (calibrate.aiconfigurator).

    python -m calibrate.bundle            regenerate sim/data/profiles/*.yaml

One profile per (system, backend, model, tp), named
`<system>-<backend>-<model slug>-tp<N>.yaml` (slug: the repo id lower-cased, `/` → `--`).

Two-stage fit. At TP > 1 one fit trades GEMM efficiency against all-reduce efficiency (both
scale with tokens; seen: gemm_compute_eff pinned at 1.0 with comm_eff 0.25), so:

  1. TP 1 samples (no all-reduce) fit the compute coefficients: GEMM compute / memory,
     prefill / decode attention efficiencies, and the overheads.
  2. At each TP > 1 those four efficiencies are held at the TP-1 values (calibrate.fit
     `held=`); the fit moves only comm_eff and the overheads.

Where TP 1 is not in the tables (or the model's weights do not fit one GPU) stage 1 fits the
smallest TP available, all coefficients at once, and the provenance says so.

vLLM profiles then add the engine's host (CPU) work per step, which no op table holds, to
the fitted step and per-sequence overheads (calibrate.host_overhead: Vidur's measured vLLM
CPU overheads); the provenance keeps both parts (`kernel_overheads`, `host_overhead`).
SGLang profiles do not: its overlap scheduler hides that work behind the GPU.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import pandas as pd

from sim.catalog import load_gpu, load_model
from sim.errors import ServetwinError
from sim.profiles import PROFILES_DIR
from sim.timing import TimingProfile

from . import aiconfigurator as aic
from . import host_overhead as ho
from .fit import fit, kfold
from .profile import profile_doc, write_profile

PROFILE_DIR = PROFILES_DIR  # bundled with the simulator: scenarios select them by name
COMPUTE = ("gemm_compute_eff", "gemm_mem_eff", "attn_prefill_eff", "attn_decode_eff")
SYSTEM_GPU = {"h100_sxm": "H100-SXM", "h200_sxm": "H200-SXM", "b200_sxm": "B200",
              "a100_sxm": "A100-SXM-80GB"}


@dataclass(frozen=True)
class BundleSpec:
    system: str
    backend: str
    model: str
    tps: tuple[int, ...]
    dtype: str = "bf16"
    max_tokens: int = 16384  # largest batch (tokens) composed: the GEMM table's reach


# Every system x backend the op tables hold, for the dense models the tables' shapes
# reach: Llama-3.1-8B at TP 1-2, Qwen3-32B at TP 1-8, Llama-3.1-70B at TP 2-8 (its bf16
# weights, 141 GB, do not fit one 80 GB GPU); plus fp8 Qwen3-32B on H100 vLLM.
BUNDLE = (
    *(BundleSpec(system, backend, model, tps,
                 # A100 vLLM 0.14.0's GEMM table stops at m = 8192
                 max_tokens=8192 if (system, backend) == ("a100_sxm", "vllm") else 16384)
      for system in ("h100_sxm", "h200_sxm", "a100_sxm")
      for backend in ("vllm", "sglang")
      for model, tps in (("meta-llama/Llama-3.1-8B", (1, 2)),
                         ("Qwen/Qwen3-32B", (1, 2, 4, 8)),
                         ("meta-llama/Llama-3.1-70B", (2, 4, 8)))),
    BundleSpec("h100_sxm", "vllm", "Qwen/Qwen3-32B", (1, 2, 4, 8), "fp8"),
)


def slug(model: str) -> str:
    return model.lower().replace("/", "--")


def profile_name(system: str, backend: str, model: str, tp: int, dtype: str = "bf16") -> str:
    """fp8 profiles are named after the FP8 checkpoint: ...-qwen--qwen3-32b-fp8-tp2.yaml"""
    suffix = "" if dtype == "bf16" else f"-{dtype}"
    return f"{system}-{backend}-{slug(model)}{suffix}-tp{tp}.yaml"


def build(spec: BundleSpec, out_dir: Path = PROFILE_DIR, k: int = 5,
          date: str | None = None,
          host: dict[int, ho.HostOverhead] | None = None) -> list[Path]:
    """`host`: the host-overhead lines added to a vLLM profile (module doc); read from
    shared data when None."""
    if spec.backend == "vllm" and host is None:
        host = ho.fit(ho.read())
    model, gpu = load_model(spec.model), load_gpu(SYSTEM_GPU[spec.system])
    frames: dict[int, pd.DataFrame] = {}
    for tp in spec.tps:
        try:
            frames[tp] = aic.samples(model, gpu, tp, spec.system, spec.backend, spec.dtype,
                                     max_tokens=spec.max_tokens)
        except ServetwinError as e:  # shape not in the tables: say so, build the rest
            print(f"  skip TP {tp}: {e}")
    if not frames:
        return []
    base_tp = min(frames)
    base = fit(frames[base_tp], model, gpu, base_tp, spec.dtype)
    compute = TimingProfile(**{**TimingProfile().to_dict(),
                               **{c: getattr(base.profile, c) for c in COMPUTE}})
    out_dir.mkdir(parents=True, exist_ok=True)
    written = []
    for tp, df in sorted(frames.items()):
        held = () if tp == base_tp else COMPUTE
        prior = None if tp == base_tp else compute
        result = base if tp == base_tp else fit(df, model, gpu, tp, spec.dtype, prior,
                                                held=held)
        folds = kfold(df, model, gpu, tp, spec.dtype, prior, k=k, held=held)
        doc = profile_doc(result, gpu=spec.system, engine=spec.backend,
                          engine_version=str(df["engine_version"].iloc[0]), model=model.name,
                          dtype=spec.dtype, tp=tp, sources=aic.sources(df), kfold=folds,
                          date=date)
        doc["provenance"]["method"] = (
            f"stage 1: all coefficients fitted to TP {base_tp} op-table samples"
            if tp == base_tp else
            f"stage 2: {', '.join(COMPUTE)} held at the TP {base_tp} fit; comm and "
            "overheads fitted to this TP's samples")
        doc["provenance"]["held"] = list(held)
        doc["provenance"]["system"] = spec.system
        if spec.backend == "vllm" and host is not None:
            add_host_overhead(doc, ho.for_tp(host, tp), tp)
        name = profile_name(spec.system, spec.backend, model.name, tp, spec.dtype)
        written.append(write_profile(out_dir / name, doc))
    return written


def add_host_overhead(doc: dict, h: ho.HostOverhead, tp: int) -> None:
    """Fitted (kernel) overheads + the host line, both parts kept in the provenance."""
    coeffs = doc["timing"]["profile"]
    doc["provenance"]["kernel_overheads"] = {
        k: coeffs[k] for k in ("step_overhead_s", "per_seq_overhead_s")}
    coeffs["step_overhead_s"] += h.step_s
    coeffs["per_seq_overhead_s"] += h.per_seq_s
    doc["provenance"]["host_overhead"] = h.provenance(tp)


def main(argv: list[str] | None = None) -> int:
    import argparse

    p = argparse.ArgumentParser(prog="python -m calibrate.bundle",
                                description="regenerate the bundled timing profiles")
    p.add_argument("--only", nargs="*", default=[], metavar="WORD",
                   help="only the specs whose 'system backend model dtype' contains every WORD")
    args = p.parse_args(argv)
    host = ho.fit(ho.read())
    for spec in BUNDLE:
        label = f"{spec.system} {spec.backend} {spec.model} {spec.dtype}"
        if not all(w.lower() in label.lower() for w in args.only):
            continue
        print(f"calibrate.bundle: {spec.system} {spec.backend} {spec.model} {spec.dtype} "
              f"TP {spec.tps}")
        for path in build(spec, host=host):
            print(f"  wrote {path}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
