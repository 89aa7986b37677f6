"""Workload: the requests a simulation replays, held as columns.

A `Trace` is one flat record per request stored column-wise in read-only numpy arrays
(never a list of request objects), so a 12k-request production trace loads in ~0.1 s and
slicing, scaling and merging are array operations.

Prefix-block ids follow Mooncake's semantics (kvcache-ai/Mooncake:FAST25-release/traces,
FAST'25 §5.2.1): a prompt is cut into blocks of `hash_block_tokens` tokens and block k gets
an id naming the *whole prefix* up to the end of block k, so two requests share id k exactly
when they share every token up to there. The last block may be partial; Mooncake traces have
len(hash_ids) == ceil(input_length / 512).

    request A  |  0  |  1  |  2  |  3 |      [system prompt ....][question A ......]
    request B  |  0  |  1  |  7  |           [system prompt ....][question B]
                 ^^^^^^^^^^^ same ids: the KV of these blocks can be reused

Sources: `load_mooncake` (JSONL, .gz ok), `load_azure` (Azure LLM inference 2023 CSV),
`load_trace` (either, by name or content) and `synthesize` (seeded generators).

    trace.py      Trace (columns, slicing, scaling, merging) and ClosedLoop
    loaders.py    Mooncake JSONL, Azure CSV, load_trace
    laws.py       arrival laws and length laws
    synthetic.py  SyntheticSpec (prefix groups, sessions) and synthesize
    _validate.py  limits and the checks behind the error messages
"""

from ._validate import MAX_SYNTHETIC_REQUESTS, MAX_TOKENS
from .laws import (
    LENGTH_KINDS,
    FixedLength,
    LengthSpec,
    LognormalLength,
    UniformLength,
    gamma_arrivals,
    length_spec,
    poisson_arrivals,
)
from .loaders import load_azure, load_mooncake, load_trace
from .synthetic import PrefixGroups, Sessions, SyntheticSpec, synthesize
from .trace import MOONCAKE_BLOCK_TOKENS, ClosedLoop, Trace

__all__ = [
    "LENGTH_KINDS",
    "MAX_SYNTHETIC_REQUESTS",
    "MAX_TOKENS",
    "MOONCAKE_BLOCK_TOKENS",
    "ClosedLoop",
    "FixedLength",
    "LengthSpec",
    "LognormalLength",
    "PrefixGroups",
    "Sessions",
    "SyntheticSpec",
    "Trace",
    "UniformLength",
    "gamma_arrivals",
    "length_spec",
    "load_azure",
    "load_mooncake",
    "load_trace",
    "poisson_arrivals",
    "synthesize",
]
