# Run from the repo root: python reports/drift-sglang-h100/direct_check.py
# Direct check: the two versions' composed samples sit on the same grid points (same
# attention rows), so measured_0.5.14 / measured_0.5.6.post2 - 1 per row is the true shift.
import pandas as pd

from calibrate import aiconfigurator as aic
from calibrate.measurements import regime
from sim.catalog import load_gpu, load_model

m, g = load_model("meta-llama/Llama-3.1-8B"), load_gpu("H100-SXM")
old, new = (aic.samples(m, g, 1, "h100_sxm", "sglang", max_tokens=8192, version=v)
            for v in ("0.5.6.post2", "0.5.14"))
keys = ["num_prefill_tokens", "num_prefill_seqs", "num_decode_seqs", "decode_context_tokens"]
assert (old[keys].to_numpy() == new[keys].to_numpy()).all()
shift = new["measured_s"] / old["measured_s"] - 1
for r in ("prefill", "decode"):
    s = shift[regime(old) == r]
    print(f"composed pass, {r}: n {len(s)}, median {100 * s.median():+.2f} %, "
          f"p10 {100 * s.quantile(0.1):+.2f} %, p90 {100 * s.quantile(0.9):+.2f} %")
root = aic.default_root() / "h100_sxm" / "gemm" / "sglang"
t = {v: pd.read_csv(root / v / "gemm_perf.csv.gz").query("gemm_dtype == 'bfloat16'")
     .groupby(["m", "n", "k"])["latency"].min() for v in ("0.5.6.post2", "0.5.14")}
j = pd.concat(t, axis=1, join="inner").dropna()
ratio = j["0.5.14"] / j["0.5.6.post2"] - 1
print(f"bf16 GEMM grid points in both: {len(j)}; latency 0.5.14 / 0.5.6.post2 - 1: "
      f"median {100 * ratio.median():+.2f} %, p10 {100 * ratio.quantile(0.1):+.2f} %, "
      f"p90 {100 * ratio.quantile(0.9):+.2f} %")
for lo, hi in ((1, 16), (17, 256), (257, 2048), (2049, 8192)):
    s = ratio[(j.index.get_level_values("m") >= lo) & (j.index.get_level_values("m") <= hi)]
    print(f"  m {lo}..{hi}: {len(s)} points, median {100 * s.median():+.2f} %")
