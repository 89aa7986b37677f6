"""vLLM's per-step log (``--enable-logging-iteration-details``) as a table of steps.

One INFO line per engine step, written by the API server's logger
(vllm-project/vllm:vllm/v1/metrics/loggers.py ``_log_iteration_details`` @ v0.32.0):

    ... Engine 000: Iteration(3): 1 context requests, 256 context tokens, 0 generation
    requests, 0 generation tokens, iteration elapsed time: 99.08 ms, CPU KV cache usage: 0.2%

"context" requests are those with no output token yet (every chunk of a chunked prefill
counts), "generation" the rest (vllm/v1/utils.py ``compute_iteration_details``). The line
does not say which requests, nor their KV lengths: calibrate.profiling joins it with known
request shapes. The elapsed time is the engine core's wait on the executor; it is the
forward pass only with ``--no-async-scheduling`` (shared/reference/loadgen_and_engines.md §B.5).
"""

from __future__ import annotations

import re
import warnings
from dataclasses import dataclass
from pathlib import Path

import pandas as pd

from sim.errors import InputError

# versions whose line format was read off a real log (tests/calibrate/data/)
KNOWN_VERSIONS = ("0.32.0",)
STEP_COLUMNS = ("iteration", "engine", "num_context_requests", "num_context_tokens",
                "num_generation_requests", "num_generation_tokens", "elapsed_s",
                "kv_cache_usage", "is_dummy", "line")

_MARK = re.compile(r"Engine \d+: Iteration\(")  # a step record starts here
_STEP = re.compile(
    r"Engine (?P<engine>\d+): Iteration\((?P<iteration>\d+)\): "
    r"(?P<ctx_reqs>\d+) context requests, (?P<ctx_tokens>\d+) context tokens, "
    r"(?P<gen_reqs>\d+) generation requests, (?P<gen_tokens>\d+) generation tokens, "
    r"iteration elapsed time: (?P<ms>\d+(?:\.\d+)?) ms(?P<dummy> \(dummy\))?, "
    r"\w+ KV cache usage: (?P<kv>\d+(?:\.\d+)?)%"
    r"(?:, encoder inputs: \d+, encoder output embeddings: \d+)?\s*$")
# the start-up banner ("version 0.32.0") or the engine's "Initializing a V1 LLM engine (v0.32.0)"
_VERSION = (re.compile(r"\bversion (\d+\.\d+\.\d+\S*)\s*$"),
            re.compile(r"Initializing a V1 LLM engine \(v(\d+\.\d+\.\d+[^)\s]*)\)"))


class UnknownVersionWarning(UserWarning):
    """The log is from a vLLM version whose step-line format was not checked."""


@dataclass(frozen=True)
class StepLog:
    path: Path
    version: str | None  # None: the log does not say
    steps: pd.DataFrame  # STEP_COLUMNS, one row per logged step, in file order


def parse_lines(lines: list[str], where: str, first_line: int = 1) -> pd.DataFrame:
    """Step lines as a table; ``where`` names the file in errors. Lines of other kinds are
    skipped; a line that starts a step record but does not parse is an error."""
    rows = []
    for no, text in enumerate(lines, start=first_line):
        if "Iteration(" not in text or not _MARK.search(text):  # cheap test first
            continue
        m = _STEP.search(text)
        if m is None:
            raise InputError(f"{where}:{no}", f"malformed vLLM iteration line {_short(text)!r}",
                             "expected 'Engine N: Iteration(i): a context requests, b context "
                             "tokens, c generation requests, d generation tokens, iteration "
                             "elapsed time: X ms, ... KV cache usage: u%' (a truncated log? "
                             "cut the partial line)")
        rows.append({"iteration": int(m["iteration"]), "engine": int(m["engine"]),
                     "num_context_requests": int(m["ctx_reqs"]),
                     "num_context_tokens": int(m["ctx_tokens"]),
                     "num_generation_requests": int(m["gen_reqs"]),
                     "num_generation_tokens": int(m["gen_tokens"]),
                     "elapsed_s": float(m["ms"]) / 1e3, "kv_cache_usage": float(m["kv"]) / 100,
                     "is_dummy": m["dummy"] is not None, "line": no})
    return pd.DataFrame(rows, columns=list(STEP_COLUMNS))


def find_version(lines: list[str]) -> str | None:
    for text in lines:
        for pattern in _VERSION:
            m = pattern.search(text)
            if m:
                return m.group(1)
    return None


def read_step_log(path: str | Path, first_line: int = 1) -> StepLog:
    """The steps of a vLLM server log from line ``first_line`` on (1-based). The version is
    read from the whole log; an unknown or missing one is warned about, never guessed."""
    path = Path(path)
    lines = log_lines(path)
    version = find_version(lines)
    if version is None:
        warnings.warn(f"{path}: no vLLM version line found; the step format of vLLM "
                      f"{', '.join(KNOWN_VERSIONS)} is assumed to apply. Fix: keep the log "
                      "from the server's start", UnknownVersionWarning, stacklevel=2)
    elif version not in KNOWN_VERSIONS:
        warnings.warn(f"{path}: vLLM {version}: its iteration-line format was not checked "
                      f"(known: {', '.join(KNOWN_VERSIONS)}); lines that do not parse are "
                      "errors", UnknownVersionWarning, stacklevel=2)
    steps = parse_lines(lines[first_line - 1:], str(path), first_line)
    return StepLog(path, version, steps)


def log_lines(path: str | Path) -> list[str]:
    """The file's lines as count_lines and an editor number them: split at '\\n' only. A
    server log holds progress bars that redraw with a lone '\\r'; text mode's universal
    newlines (and str.splitlines) would count each as a line, and a line number taken
    with count_lines while the server ran would then point a few lines early."""
    try:
        data = Path(path).read_bytes()
    except OSError as e:
        raise InputError(str(path), f"cannot read ({e.strerror or e})", "check the path") from None
    lines = data.decode("utf-8", errors="replace").split("\n")
    if lines and lines[-1] == "":
        lines.pop()
    return lines


def count_lines(path: str | Path) -> int:
    """Lines in a file now (0 if it does not exist): where a later read should start."""
    try:
        with open(path, "rb") as f:
            return sum(1 for _ in f)
    except FileNotFoundError:
        return 0


def _short(text: str, n: int = 160) -> str:
    text = text.strip()
    return text if len(text) <= n else text[:n] + "..."
