"""python -m verify.testbed [all|vllm|llamacpp|models] [--cache DIR]

Builds what is asked (progress on stderr), then prints one JSON object with the paths.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

from sim.errors import ServetwinError
from verify import testbed


def build(target: str, cache: Path | None) -> dict[str, object]:
    start = time.monotonic()

    def progress(message: str) -> None:
        print(f"[testbed +{time.monotonic() - start:.0f}s] {message}", file=sys.stderr, flush=True)

    result: dict[str, object] = {"cache": str(testbed.cache_dir(cache))}
    vllm = None
    if target in ("all", "vllm", "models"):
        vllm = testbed.ensure_vllm(cache, progress)
        result["vllm"] = {"python": str(vllm.python), "version": vllm.version, "env": vllm.env}
    if target in ("all", "llamacpp"):
        result["llama_server"] = str(testbed.ensure_llamacpp(cache, progress).server)
    if target in ("all", "models"):
        result["tiny_hf"] = str(testbed.ensure_tiny_hf(cache, progress, vllm=vllm))
        result["tiny_gguf"] = str(testbed.ensure_tiny_gguf(cache, progress))
    progress("all requested artifacts ready")
    return result


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m verify.testbed",
        description="Build (or find cached) the real CPU engines and tiny models for verify tests.",
    )
    parser.add_argument(
        "target", nargs="?", default="all", choices=["all", "vllm", "llamacpp", "models"]
    )
    parser.add_argument(
        "--cache",
        type=Path,
        default=None,
        help="cache root (default: $SERVETWIN_CACHE or ~/.cache/servetwin)",
    )
    args = parser.parse_args(argv)
    try:
        result = build(args.target, args.cache)
    except ServetwinError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    except OSError as exc:
        print(
            f"error: testbed: {exc}. Fix: check disk space and permissions of the cache "
            f"({testbed.cache_dir(args.cache)})",
            file=sys.stderr,
        )
        return 2
    except KeyboardInterrupt:
        print(
            "error: testbed: interrupted; unfinished artifacts carry no stamp and are "
            "rebuilt next time",
            file=sys.stderr,
        )
        return 2
    print(json.dumps(result, indent=2))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
