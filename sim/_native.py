"""The optional compiled engine: the simulator's hot modules built with mypyc, used only
while the build matches their sources.

``servetwin native build`` compiles MODULES — our own Python, unchanged — with mypyc into
extension modules beside the sources (one shared library, ``sim/_native__mypyc.*.so``,
plus one small shim per module), compiles C_MODULES (our own C: the block pool's
per-block loops, which the compiled ``sim.kv`` calls instead of its numpy code) and
writes MANIFEST: the interpreter's extension suffix and each source's sha256. Python
prefers an extension module to the ``.py`` of the same name, so ``import sim`` (this
module's ``install``) decides whether the build may be used:

- ``SERVETWIN_PURE_PYTHON=1`` in the environment: no (for comparisons and debugging);
- no extension module present: nothing to decide (pure Python, "not built");
- the manifest present, for this interpreter, every module's extension present and every
  source's hash equal to the manifest's: yes;
- otherwise (a source edited after the build, a partial build, another interpreter): no,
  with one warning naming the first mismatch and the rebuild command.

The compiled modules share native classes (a compiled engine reads a compiled pool's
fields directly), so they are used all together or not at all: when the build may not be
used, a finder placed ahead of the standard ones loads each of them from its ``.py``.
``STATE`` says which way it went; ``servetwin simulate`` prints it beside the wall time.
Outputs are byte-identical either way (tests/sim/test_native.py, on bundled scenarios).
"""

from __future__ import annotations

import hashlib
import importlib.abc
import importlib.machinery
import importlib.util
import json
import os
import sys
import warnings
from collections.abc import Mapping, Sequence
from pathlib import Path
from types import ModuleType
from typing import Any

# The event loop's hot path and what it calls per step; classes that others subclass are
# compiled with their subclasses (an interpreted class cannot inherit a compiled one).
MODULES = (
    "sim.request", "sim.steplog", "sim.kv", "sim.radix", "sim.offload", "sim.links",
    "sim.timing", "sim.engines.plan", "sim.engines.vllm", "sim.engines.sglang",
    "sim.cluster", "sim.disagg",
)
# hand-written C extension modules built beside them (their source is NAME.c): the block
# pool's per-block loops, which sim/kv.py calls only when the build is used
C_MODULES = ("sim._kvcore",)
GROUP = "sim._native"  # mypyc group: the shared library is sim/_native__mypyc<suffix>
ROOT = Path(__file__).resolve().parent.parent  # the folder holding the `sim` package
MANIFEST = ROOT / "sim" / "_native.json"
ENV_PURE = "SERVETWIN_PURE_PYTHON"
REBUILD = "servetwin native build"

STATE: dict[str, Any] = {"compiled": False, "reason": "not decided"}


def ext_suffix() -> str:
    return importlib.machinery.EXTENSION_SUFFIXES[0]


def source_path(module: str, root: Path = ROOT) -> Path:
    return root.joinpath(*module.split(".")).with_suffix(".c" if module in C_MODULES
                                                        else ".py")


def extension_paths(root: Path = ROOT, suffix: str | None = None) -> list[Path]:
    """Every file a build puts beside the sources (shims + the shared library)."""
    suffix = suffix or ext_suffix()
    names = (*MODULES, *C_MODULES, GROUP + "__mypyc")
    return [root.joinpath(*m.split(".")).with_name(m.split(".")[-1] + suffix) for m in names]


def sha256(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def decide(root: Path = ROOT, env: Mapping[str, str] = os.environ,
           suffix: str | None = None) -> tuple[bool, str, bool]:
    """(use the build?, why not / what, is anything built at all?)"""
    suffix = suffix or ext_suffix()
    paths = extension_paths(root, suffix)
    present = [p for p in paths if p.exists()]
    if env.get(ENV_PURE, "") not in ("", "0"):
        return False, f"{ENV_PURE} is set", bool(present)
    if not present:
        return False, f"not built: `{REBUILD}` compiles it", False
    manifest = root / "sim" / "_native.json"
    try:
        doc = json.loads(manifest.read_text(encoding="utf-8"))
        hashes = dict(doc["modules"])
        built_for = str(doc["ext_suffix"])
    except (OSError, ValueError, KeyError, TypeError):
        return False, f"compiled modules without a readable {manifest.name}", True
    if built_for != suffix:
        return False, f"built for {built_for}, this interpreter is {suffix}", True
    missing = [p.name for p in paths if p not in present]
    if missing:
        return False, f"partial build: {missing[0]} missing", True
    for m in (*MODULES, *C_MODULES):
        src = source_path(m, root)
        if hashes.get(m) != (sha256(src) if src.exists() else None):
            return False, f"{src.relative_to(root)} changed since the build", True
    return True, f"mypyc, {len(MODULES)} modules + C block-pool loops", True


class _FromSource(importlib.abc.MetaPathFinder):
    """Loads the compiled modules from their .py files, ahead of their extensions; warns
    once, when the first of them is imported (a command that never imports the engine,
    such as `servetwin native build`, says nothing)."""

    def __init__(self, root: Path, warning: str | None = None) -> None:
        self.root = root
        self.warning = warning

    def find_spec(self, fullname: str, path: Sequence[str] | None,
                  target: ModuleType | None = None) -> importlib.machinery.ModuleSpec | None:
        if fullname not in MODULES:
            return None
        if self.warning:
            warnings.warn(self.warning, RuntimeWarning, stacklevel=2)
            self.warning = None
        return importlib.util.spec_from_file_location(fullname,
                                                      source_path(fullname, self.root))


def install() -> None:
    """Decide once, at ``import sim``, before any compiled module is imported."""
    compiled, why, built = decide()
    STATE.update(compiled=compiled, reason=why)
    if compiled or not built:
        return
    warning = (None if why.startswith(ENV_PURE) else
               f"servetwin: compiled engine not used ({why}); running pure Python. "
               f"Fix: `{REBUILD}`")
    if not any(isinstance(f, _FromSource) for f in sys.meta_path):
        sys.meta_path.insert(0, _FromSource(ROOT, warning))


def describe() -> str:
    """'compiled engine (mypyc, 12 modules)' or 'pure-Python engine (why)'."""
    kind = "compiled" if STATE["compiled"] else "pure-Python"
    return f"{kind} engine ({STATE['reason']})"
