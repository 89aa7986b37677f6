"""The measurement table's columns (calibrate.measurements documents them), importable
without pandas: the GPU probe writes rows on hosts that only have PyTorch."""

AGGREGATES = ("num_prefill_tokens", "prefill_attn_work", "num_prefill_seqs",
              "num_decode_seqs", "decode_context_tokens")
PARALLEL = ("tp", "pp")
PROVENANCE = ("gpu", "engine", "engine_version", "model", "dtype", "date", "source")
COLUMNS = (*AGGREGATES, *PARALLEL, "measured_s", *PROVENANCE)
INTS = ("num_prefill_tokens", "num_prefill_seqs", "num_decode_seqs", "decode_context_tokens",
        "tp", "pp")
