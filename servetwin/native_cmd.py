"""`servetwin native build | status | clean`: the optional compiled engine (sim/_native.py).

build: compile sim._native.MODULES with mypyc (our sources, unchanged) and
sim._native.C_MODULES (our C) in a scratch folder, copy the extension modules beside the
sources, write the manifest, then check in a fresh interpreter that ``import sim`` takes
the build. Needs mypyc (the `mypy` package: ``pip
install -e ".[native]"``) and a C compiler. ~1 min on one core. A failed build leaves no
partial build behind (the pure-Python engine keeps working).
"""

from __future__ import annotations

import argparse
import json
import os
import shlex
import shutil
import subprocess
import sys
import sysconfig
import tempfile
import time
from pathlib import Path
from typing import Any

from sim import _native as native
from sim.errors import ServetwinError

SETUP = """\
import sys
from setuptools import Extension, setup
from mypyc.build import mypycify
paths, group = sys.argv[1].split(",") + ["--ignore-missing-imports"], sys.argv[2]
c_exts = [Extension(name, [src]) for name, src in
          (item.split("=") for item in sys.argv[3].split(",") if item)]
sys.argv = [sys.argv[0], "build_ext", "--build-lib", "lib", "--build-temp", "tmp"]
setup(name="servetwin-native",
      ext_modules=mypycify(paths, group_name=group, opt_level="3") + c_exts)
"""


# a fresh interpreter imports the engine and says whether it got the extension modules
CHECK = """\
import importlib, sim._native as n
files = {m: str(importlib.import_module(m).__file__) for m in n.MODULES}
source = [f for f in files.values() if not f.endswith(n.ext_suffix())]
print(n.describe() if not source else f"{source[0]} imported instead of its extension")
"""


class NativeBuildError(ServetwinError):
    pass


def add_parser(sub: Any) -> None:
    n = sub.add_parser("native", help="build, inspect or remove the optional compiled engine "
                       "(mypyc; same results, ~1.5x faster replays)")
    n.add_argument("action", choices=("build", "status", "clean"))
    n.set_defaults(func=cmd_native)


def cmd_native(args: argparse.Namespace) -> int:
    if args.action == "status":
        print(f"servetwin native: {native.describe()}")
        return 0
    if args.action == "clean":
        removed = clean()
        print(f"servetwin native: removed {len(removed)} file(s); the engine runs pure Python")
        return 0
    build()
    return 0


def clean(root: Path = native.ROOT) -> list[Path]:
    gone = []
    for p in (*native.extension_paths(root), root / "sim" / "_native.json"):
        if p.exists():
            p.unlink()
            gone.append(p)
    return gone


def _check_tools() -> None:
    try:
        import mypyc.build  # noqa: F401
        import setuptools  # noqa: F401
    except ImportError as e:
        raise NativeBuildError("servetwin native build", f"{e.name} is not installed",
                               "pip install -e \".[native]\" (mypy, which ships mypyc, and "
                               "setuptools)") from None
    cc = shlex.split(sysconfig.get_config_var("CC") or "cc")[:1]
    if not cc or shutil.which(cc[0]) is None:
        raise NativeBuildError("servetwin native build", f"no C compiler ({' '.join(cc)!r} "
                               "not found)", "install one (Debian: apt-get install gcc)")


def build(root: Path = native.ROOT) -> list[Path]:
    _check_tools()
    clean(root)
    sources = {m: native.source_path(m, root) for m in native.MODULES}
    c_sources = {m: native.source_path(m, root) for m in native.C_MODULES}
    hashes = {m: native.sha256(p) for m, p in {**sources, **c_sources}.items()}  # as compiled
    print(f"servetwin native: compiling {len(sources)} modules with mypyc and "
          f"{len(c_sources)} C module(s) (about a minute)...", flush=True)
    t0 = time.perf_counter()
    with tempfile.TemporaryDirectory(prefix="servetwin-native-") as tmp:
        work = Path(tmp)
        (work / "setup_native.py").write_text(SETUP, encoding="utf-8")
        log = work / "build.log"
        with log.open("w") as fh:
            rc = subprocess.run(
                [sys.executable, "setup_native.py", ",".join(map(str, sources.values())),
                 native.GROUP, ",".join(f"{m}={p}" for m, p in c_sources.items())],
                cwd=work, stdout=fh, stderr=subprocess.STDOUT,
                env={**_env(), "PYTHONPATH": str(root), "CFLAGS": _cflags()}).returncode
        if rc != 0:
            tail = "\n".join(log.read_text(errors="replace").splitlines()[-15:])
            raise NativeBuildError("servetwin native build", f"mypyc failed (exit {rc}):\n"
                                   f"{tail}", "fix the error above; the engine stays pure "
                                   "Python meanwhile")
        wanted = native.extension_paths(root)
        missing = [p.name for p in wanted if not (work / "lib" / p.relative_to(root)).exists()]
        if missing:
            raise NativeBuildError("servetwin native build", f"the build made no "
                                   f"{missing[0]}", "report this; the engine stays pure Python")
        for dest in wanted:
            rel = dest.relative_to(root)
            shutil.copyfile(work / "lib" / rel, dest)
    (root / "sim" / "_native.json").write_text(json.dumps({
        "ext_suffix": native.ext_suffix(), "modules": hashes,
        "built": time.strftime("%Y-%m-%d %H:%M:%S"), "python": sys.version.split()[0],
    }, indent=1) + "\n", encoding="utf-8")
    check = subprocess.run([sys.executable, "-c", CHECK], capture_output=True, text=True,
                           cwd=root, env=_env())
    said = (check.stdout or check.stderr).strip()
    if check.returncode != 0 or not said.startswith("compiled"):
        clean(root)
        raise NativeBuildError("servetwin native build", f"built, but a fresh interpreter "
                               f"does not take it: {said}", "report this; removed the build")
    print(f"servetwin native: {said}, built in {time.perf_counter() - t0:.0f} s")
    return wanted


def _cflags() -> str:
    """No fused multiply-add: the compiled step_time must round as Python and numpy do
    (fast-forward's decode_run_times is bitwise equal to repeated step_time calls), and
    GCC contracts a + b * c into one FMA wherever the target has it (aarch64, x86-64-v3)."""
    return " ".join([os.environ.get("CFLAGS", ""), "-ffp-contract=off"]).strip()


def _env() -> dict[str, str]:
    return {k: v for k, v in os.environ.items() if k != native.ENV_PURE}
