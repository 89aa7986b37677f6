"""The optional compiled engine (sim/_native.py): used only while it matches its sources,
and byte-identical in its outputs to the pure-Python engine."""

from __future__ import annotations

import gzip
import json
import os
import subprocess
import sys
import warnings
from pathlib import Path

import pytest

from servetwin.native_cmd import clean
from sim import _native as native

ROOT = Path(__file__).resolve().parents[2]
SUFFIX = ".cpython-311-x86_64-linux-gnu.so"


def fake_tree(tmp_path: Path, built: bool = True) -> Path:
    """Sources of every compiled module, and (built) empty extensions + a true manifest."""
    for m in (*native.MODULES, *native.C_MODULES):
        src = native.source_path(m, tmp_path)
        src.parent.mkdir(parents=True, exist_ok=True)
        src.write_text(f"# {m}\n")
    if built:
        for p in native.extension_paths(tmp_path, SUFFIX):
            p.write_bytes(b"")
        (tmp_path / "sim" / "_native.json").write_text(json.dumps({
            "ext_suffix": SUFFIX,
            "modules": {m: native.sha256(native.source_path(m, tmp_path))
                        for m in (*native.MODULES, *native.C_MODULES)}}))
    return tmp_path


def test_a_matching_build_is_used(tmp_path: Path) -> None:
    assert native.decide(fake_tree(tmp_path), {}, SUFFIX) == (
        True, f"mypyc, {len(native.MODULES)} modules + C block-pool loops", True)


def test_nothing_built_is_pure_python_without_a_warning(tmp_path: Path) -> None:
    ok, why, built = native.decide(fake_tree(tmp_path, built=False), {}, SUFFIX)
    assert (ok, built) == (False, False) and "servetwin native build" in why


@pytest.mark.parametrize("module, shown", [("sim.kv", "sim/kv.py"),
                                           ("sim._kvcore", "sim/_kvcore.c")])
def test_an_edited_source_turns_the_build_off_and_says_which(tmp_path: Path, module: str,
                                                             shown: str) -> None:
    root = fake_tree(tmp_path)
    native.source_path(module, root).write_text("// edited\n")
    ok, why, built = native.decide(root, {}, SUFFIX)
    assert (ok, built) == (False, True)
    assert why == f"{shown} changed since the build"


@pytest.mark.parametrize("breakage, expected", [
    ("partial", "partial build: vllm" + SUFFIX + " missing"),
    ("manifest", "compiled modules without a readable _native.json"),
    ("other-python", "built for .cpython-312-x86_64-linux-gnu.so, this interpreter is "
                     + SUFFIX),
])
def test_a_broken_build_is_not_used(tmp_path: Path, breakage: str, expected: str) -> None:
    root = fake_tree(tmp_path)
    manifest = root / "sim" / "_native.json"
    if breakage == "partial":
        (root / "sim" / "engines" / ("vllm" + SUFFIX)).unlink()
    elif breakage == "manifest":
        manifest.write_text("{not json")
    else:
        doc = json.loads(manifest.read_text())
        manifest.write_text(json.dumps({**doc, "ext_suffix": ".cpython-312-x86_64-linux-gnu.so"}))
    assert native.decide(root, {}, SUFFIX) == (False, expected, True)


def test_the_environment_switch_forces_pure_python(tmp_path: Path) -> None:
    root = fake_tree(tmp_path)
    assert native.decide(root, {native.ENV_PURE: "1"}, SUFFIX)[:2] == (
        False, f"{native.ENV_PURE} is set")
    assert native.decide(root, {native.ENV_PURE: "0"}, SUFFIX)[0] is True


def test_the_finder_loads_compiled_modules_from_their_sources(tmp_path: Path) -> None:
    root = fake_tree(tmp_path)
    finder = native._FromSource(root)
    spec = finder.find_spec("sim.engines.vllm", None)
    assert spec is not None and spec.origin == str(root / "sim" / "engines" / "vllm.py")
    assert finder.find_spec("sim.metrics", None) is None  # never compiled: not its business


def test_the_finder_warns_once_when_the_engine_is_first_imported(tmp_path: Path) -> None:
    finder = native._FromSource(fake_tree(tmp_path), "servetwin: compiled engine not used (x)")
    assert finder.find_spec("sim.metrics", None) is None
    with pytest.warns(RuntimeWarning, match=r"not used \(x\)"):
        finder.find_spec("sim.kv", None)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        finder.find_spec("sim.cluster", None)  # said once is enough


def test_clean_removes_the_build_and_only_it(tmp_path: Path) -> None:
    root = fake_tree(tmp_path)
    gone = clean(root)
    # shims, C modules, shared library, manifest
    assert len(gone) == len(native.MODULES) + len(native.C_MODULES) + 2
    assert all(native.source_path(m, root).exists()
               for m in (*native.MODULES, *native.C_MODULES))
    assert native.decide(root, {}, SUFFIX)[2] is False


# ---------------------------------------------------------------- the real build
BUILT = native.decide()[0]
SCENARIOS = ["default", "sglang_conversation", "disagg_conversation", "offload_conversation",
             "kv_aware_conversation", "planner_bursty"]


def run(scenario: str, out: Path, pure: bool) -> str:
    env = {k: v for k, v in os.environ.items() if k != native.ENV_PURE}
    if pure:
        env[native.ENV_PURE] = "1"
    p = subprocess.run(
        [sys.executable, "-m", "servetwin", "simulate",
         str(ROOT / "scenarios" / f"{scenario}.yaml"), "--set", "workload.max_requests=2500",
         "--out", str(out)],
        capture_output=True, text=True, env=env, cwd=ROOT, timeout=300)
    assert p.returncode == 0, p.stderr[-2000:]
    return p.stdout


def content(path: Path) -> bytes:
    data = path.read_bytes()
    return gzip.decompress(data) if path.suffix == ".gz" else data  # gzip stamps a time


@pytest.mark.skipif(not BUILT, reason="compiled engine not built (servetwin native build); "
                    ".ci/run builds it")
@pytest.mark.parametrize("scenario", SCENARIOS)
def test_compiled_and_pure_engines_write_identical_runs(tmp_path: Path, scenario: str) -> None:
    said = {mode: run(scenario, tmp_path / mode, mode == "pure") for mode in ("native", "pure")}
    assert "; compiled engine (mypyc" in said["native"]
    assert "; pure-Python engine (SERVETWIN_PURE_PYTHON is set)" in said["pure"]
    files = sorted(p.name for p in (tmp_path / "native").iterdir())
    assert files == sorted(p.name for p in (tmp_path / "pure").iterdir())
    assert {"records.parquet", "steps.parquet", "summary.json"} <= set(files)
    for name in files:
        assert content(tmp_path / "native" / name) == content(tmp_path / "pure" / name), name
