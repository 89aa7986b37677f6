"""Arrival laws (Poisson, Gamma) and length laws (fixed, uniform, lognormal) of synthetic
workloads."""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

import numpy as np

from ._validate import (
    MAX_SYNTHETIC_REQUESTS,
    MAX_TOKENS,
    _bad,
    _build,
    _is_real,
    _need_int,
    _need_number,
)

# --------------------------------------------------------------------- arrival laws


def poisson_arrivals(
    rng: np.random.Generator, n: int, rate_per_s: float, *, rescale_to_rate: bool = False
) -> np.ndarray:
    """n arrival times (s) of a Poisson process: `gamma_arrivals` with burstiness 1."""
    return gamma_arrivals(rng, n, rate_per_s, 1.0, rescale_to_rate=rescale_to_rate)


def gamma_arrivals(
    rng: np.random.Generator,
    n: int,
    rate_per_s: float,
    burstiness: float,
    *,
    rescale_to_rate: bool = False,
) -> np.ndarray:
    """n arrival times (s) with Gamma gaps: mean 1/rate, CV 1/sqrt(burstiness)."""
    _need_int("n", n, 1, MAX_SYNTHETIC_REQUESTS)
    _need_number("rate_per_s", rate_per_s, 0, lo_open=True)
    _need_number("burstiness", burstiness, 0, lo_open=True)
    # The `vllm bench serve` law (vllm-project/vllm:vllm/benchmarks/serve.py @ v0.33.0,
    # get_request): gap ~ Gamma(shape=burstiness, scale=1/(rate*burstiness)), one gap before
    # every request including the first. vLLM then rescales so the last arrival is exactly
    # n/rate, which hides the run-to-run spread of offered load; here that is opt-in.
    gaps_s = rng.gamma(shape=burstiness, scale=1.0 / (rate_per_s * burstiness), size=n)
    arrival_s = np.cumsum(gaps_s)
    if rescale_to_rate and arrival_s[-1] > 0:
        arrival_s *= (n / rate_per_s) / arrival_s[-1]
    return arrival_s


# ---------------------------------------------------------------------- length laws


@dataclass(frozen=True)
class FixedLength:
    tokens: int

    def check(self, path: str) -> None:
        _need_int(f"{path}.tokens", self.tokens, 1, MAX_TOKENS)

    def sample(self, rng: np.random.Generator, n: int) -> np.ndarray:
        return np.full(n, self.tokens, dtype=np.int64)


@dataclass(frozen=True)
class UniformLength:
    min_tokens: int
    max_tokens: int  # inclusive

    def check(self, path: str) -> None:
        _need_int(f"{path}.min_tokens", self.min_tokens, 1, MAX_TOKENS)
        _need_int(f"{path}.max_tokens", self.max_tokens, int(self.min_tokens), MAX_TOKENS)

    def sample(self, rng: np.random.Generator, n: int) -> np.ndarray:
        return rng.integers(self.min_tokens, self.max_tokens + 1, size=n, dtype=np.int64)


@dataclass(frozen=True)
class LognormalLength:
    mean_tokens: float  # mean before clipping: mu = ln(mean) - sigma^2 / 2
    sigma: float  # of the underlying normal
    min_tokens: int = 1
    max_tokens: int = MAX_TOKENS

    def check(self, path: str) -> None:
        _need_int(f"{path}.min_tokens", self.min_tokens, 1, MAX_TOKENS)
        _need_int(f"{path}.max_tokens", self.max_tokens, int(self.min_tokens), MAX_TOKENS)
        _need_number(f"{path}.mean_tokens", self.mean_tokens, self.min_tokens)
        if self.mean_tokens > self.max_tokens:
            raise _bad(
                f"{path}.mean_tokens",
                self.mean_tokens,
                "must be <= max_tokens",
                "raise max_tokens or lower mean_tokens",
            )
        if not (_is_real(self.sigma) and 0 <= self.sigma <= 10):
            raise _bad(
                f"{path}.sigma",
                self.sigma,
                "must be a number in [0, 10]",
                "typical request-length sigmas are 0.5-1.5",
            )

    def sample(self, rng: np.random.Generator, n: int) -> np.ndarray:
        mu = math.log(self.mean_tokens) - self.sigma**2 / 2
        tokens = np.floor(rng.lognormal(mu, self.sigma, size=n) + 0.5)
        return np.clip(tokens, self.min_tokens, self.max_tokens).astype(np.int64)


LengthSpec = FixedLength | UniformLength | LognormalLength
LENGTH_KINDS: dict[str, type[LengthSpec]] = {
    "fixed": FixedLength,
    "uniform": UniformLength,
    "lognormal": LognormalLength,
}


def length_spec(value: Any, path: str) -> LengthSpec:
    """A length law from a spec, a bare int (fixed) or a mapping {kind: ..., ...}."""
    if isinstance(value, (FixedLength, UniformLength, LognormalLength)):
        spec: LengthSpec = value
    elif isinstance(value, (int, np.integer)) and not isinstance(value, bool):
        spec = FixedLength(int(value))
    elif isinstance(value, Mapping) and value.get("kind") in tuple(LENGTH_KINDS):
        rest = {k: v for k, v in value.items() if k != "kind"}
        spec = _build(LENGTH_KINDS[value["kind"]], rest, path)
    else:
        raise _bad(
            path,
            value,
            f"must be an integer or {{kind: {'|'.join(LENGTH_KINDS)}, ...}}",
            "e.g. {kind: lognormal, mean_tokens: 500, sigma: 1.0}",
        )
    spec.check(path)
    return spec
