"""verify.testbed: the GGUF writer, the build cache (stamp, lock, rename), and the real builds.

The real builds (vLLM venv ~3 min, llama-server ~4 min on 2 cores) are `slow`; the rest runs
in seconds with a fake builder.
"""

from __future__ import annotations

import hashlib
import json
import os
import subprocess
import sys
import threading
from pathlib import Path

import numpy as np
import pytest

from verify import testbed
from verify.testbed import TestbedError, _Artifact, _Build, _ensure
from verify.testbed import __main__ as cli
from verify.testbed.gguf_model import write_tiny_gguf

try:
    import gguf
except ImportError:  # the `test` extra installs it; without it only the GGUF tests skip
    gguf = None
needs_gguf = pytest.mark.skipif(gguf is None, reason="needs the gguf package (testbed extra)")


def quiet(message: str) -> None:
    pass


# ---------------------------------------------------------------------------------------------
# GGUF writer


@pytest.fixture(scope="module")
def tiny_gguf(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return write_tiny_gguf(tmp_path_factory.mktemp("gguf") / "tiny.gguf", seed=0, num_layers=1)


@needs_gguf
def test_gguf_header_reads_back(tiny_gguf: Path) -> None:
    reader = gguf.GGUFReader(tiny_gguf)

    def field(key: str) -> object:
        return reader.get_field(key).contents()

    assert field("general.architecture") == "llama"
    assert field("llama.block_count") == 1
    assert field("llama.embedding_length") == 512
    assert field("llama.feed_forward_length") == 1408
    assert field("llama.attention.head_count") == 8
    assert field("llama.attention.head_count_kv") == 8
    assert field("llama.context_length") == 4096
    assert field("llama.rope.dimension_count") == 64
    assert field("llama.vocab_size") == 32000
    assert field("tokenizer.ggml.model") == "llama"
    assert field("tokenizer.ggml.add_bos_token") is False
    assert (field("tokenizer.ggml.bos_token_id"), field("tokenizer.ggml.eos_token_id")) == (1, 2)


@needs_gguf
def test_gguf_vocab_layout(tiny_gguf: Path) -> None:
    reader = gguf.GGUFReader(tiny_gguf)
    tokens = reader.get_field("tokenizer.ggml.tokens").contents()
    types = reader.get_field("tokenizer.ggml.token_type").contents()
    assert len(tokens) == len(types) == 32000
    assert tokens[:4] == ["<unk>", "<s>", "</s>", "<0x00>"]
    assert tokens[258:261] == ["<0xFF>", "▁", "▁!"]
    assert tokens[353:355] == ["▁~", "▁w0"]
    assert tokens[-1] == "▁w31645"
    assert len(set(tokens)) == 32000
    kind = gguf.TokenType
    assert types[:4] == [kind.UNKNOWN, kind.CONTROL, kind.CONTROL, kind.BYTE]
    assert types[258:260] == [kind.BYTE, kind.NORMAL]


@needs_gguf
def test_gguf_tensors_dtypes_and_zeroed_output_rows(tiny_gguf: Path) -> None:
    tensors = {t.name: t for t in gguf.GGUFReader(tiny_gguf).tensors}
    assert tensors["blk.0.attn_norm.weight"].tensor_type == gguf.GGMLQuantizationType.F32
    assert tensors["blk.0.ffn_gate.weight"].tensor_type == gguf.GGMLQuantizationType.F16
    output = np.asarray(tensors["output.weight"].data, dtype=np.float32)
    assert output.shape == (32000, 512)
    assert not output[:259].any()  # control and byte tokens never win
    assert output[259:].std() == pytest.approx(3 / np.sqrt(512), rel=0.01)


@needs_gguf
def test_gguf_same_seed_same_bytes(tiny_gguf: Path, tmp_path: Path) -> None:
    again = write_tiny_gguf(tmp_path / "again.gguf", seed=0, num_layers=1)
    digest = [hashlib.sha256(p.read_bytes()).hexdigest() for p in (tiny_gguf, again)]
    assert digest[0] == digest[1]


# ---------------------------------------------------------------------------------------------
# Cache: stamp, rebuild, lock


def make_builder(calls: list[str], content: str = "built"):
    def build(dest: Path, b: _Build) -> dict[str, str]:
        calls.append(dest.name)
        dest.mkdir()
        (dest / "payload").write_text(content)
        return {"content": content}

    return build


def make_artifact(tmp_path: Path, recipe: str = "r1") -> _Artifact:
    return _Artifact("fake", recipe, tmp_path / "testbed" / "fake")


def test_cache_builds_once_then_hits(tmp_path: Path) -> None:
    calls: list[str] = []
    art = make_artifact(tmp_path)
    info = _ensure(art, make_builder(calls), tmp_path / "testbed", quiet)
    again = _ensure(art, make_builder(calls), tmp_path / "testbed", quiet)
    assert info == again == {"content": "built"}
    assert calls == ["fake"]  # built in tmp/fake, then renamed into place
    assert (art.path / "payload").read_text() == "built"
    stamp = json.loads((tmp_path / "testbed" / "stamps" / "fake.json").read_text())
    assert (stamp["recipe"], stamp["path"]) == ("r1", str(art.path))
    assert not (tmp_path / "testbed" / "tmp" / "fake").exists()


def test_cache_without_stamp_is_rebuilt(tmp_path: Path) -> None:
    art = make_artifact(tmp_path)
    art.path.mkdir(parents=True)  # what a killed build could leave behind
    (art.path / "payload").write_text("half")
    calls: list[str] = []
    _ensure(art, make_builder(calls), tmp_path / "testbed", quiet)
    assert calls == ["fake"]
    assert (art.path / "payload").read_text() == "built"


def test_cache_other_recipe_is_rebuilt(tmp_path: Path) -> None:
    calls: list[str] = []
    _ensure(make_artifact(tmp_path, "r1"), make_builder(calls, "v1"), tmp_path / "testbed", quiet)
    art2 = make_artifact(tmp_path, "r2")
    info = _ensure(art2, make_builder(calls, "v2"), tmp_path / "testbed", quiet)
    assert calls == ["fake", "fake"]
    assert info == {"content": "v2"}
    assert (art2.path / "payload").read_text() == "v2"


def test_cache_deleted_artifact_is_rebuilt(tmp_path: Path) -> None:
    calls: list[str] = []
    art = make_artifact(tmp_path)
    _ensure(art, make_builder(calls), tmp_path / "testbed", quiet)
    testbed._remove(art.path)
    _ensure(art, make_builder(calls), tmp_path / "testbed", quiet)
    assert len(calls) == 2


def test_cache_failed_build_leaves_no_stamp_and_no_artifact(tmp_path: Path) -> None:
    art = make_artifact(tmp_path)

    def broken(dest: Path, b: _Build) -> dict[str, str]:
        dest.mkdir()
        (b.scratch / "junk").write_text("x")
        raise KeyboardInterrupt  # like Ctrl-C in the middle of a build

    with pytest.raises(KeyboardInterrupt):
        _ensure(art, broken, tmp_path / "testbed", quiet)
    assert not art.path.exists()
    assert not (tmp_path / "testbed" / "stamps" / "fake.json").exists()
    assert list((tmp_path / "testbed" / "tmp").iterdir()) == []
    calls: list[str] = []
    _ensure(art, make_builder(calls), tmp_path / "testbed", quiet)
    assert calls == ["fake"]


def test_cache_in_place_artifact_is_built_where_it_lives(tmp_path: Path) -> None:
    art = _Artifact("venv", "r1", tmp_path / "venv", in_place=True)
    calls: list[str] = []
    _ensure(art, make_builder(calls), tmp_path / "testbed", quiet)
    assert calls == ["venv"]
    assert (art.path / "payload").read_text() == "built"


def test_cache_lock_two_concurrent_callers_build_once(tmp_path: Path) -> None:
    # The first caller builds; inside its build the second caller starts, finds the lock held
    # and waits; the build finishes only once that wait has been announced.
    art = make_artifact(tmp_path)
    calls: list[str] = []
    results: list[dict[str, str]] = []
    second_waits = threading.Event()

    def second_progress(message: str) -> None:
        if "another process is building it" in message:
            second_waits.set()

    def second_caller() -> None:
        results.append(_ensure(art, make_builder(calls), tmp_path / "testbed", second_progress))

    second = threading.Thread(target=second_caller)

    def first_build(dest: Path, b: _Build) -> dict[str, str]:
        second.start()
        assert second_waits.wait(timeout=30)
        return make_builder(calls)(dest, b)

    results.append(_ensure(art, first_build, tmp_path / "testbed", quiet))
    second.join(timeout=30)
    assert calls == ["fake"]
    assert results == [{"content": "built"}] * 2


# ---------------------------------------------------------------------------------------------
# Steps, errors, cache_dir, CLI


def test_failed_step_names_step_log_tail_and_fix(tmp_path: Path) -> None:
    log = tmp_path / "x.log"
    log.write_text("")
    b = _Build("fake", log, tmp_path, quiet)
    script = "print('compiling'); print('fatal: no compiler'); raise SystemExit(3)"
    with pytest.raises(TestbedError) as info:
        b.run("compile", [sys.executable, "-c", script], fix="install g++")
    text = str(info.value)
    assert text.startswith("testbed: fake: compile: exit code 3 (log: ")
    assert "fatal: no compiler" in text
    assert text.endswith("Fix: install g++")


def test_step_returns_its_own_output(tmp_path: Path) -> None:
    log = tmp_path / "x.log"
    log.write_text("earlier output\n")
    b = _Build("fake", log, tmp_path, quiet)
    assert b.run("one", [sys.executable, "-c", "print('hello')"], fix="") == "hello\n"
    with pytest.raises(TestbedError, match="cannot start"):
        b.run("two", [str(tmp_path / "no-such-tool")], fix="install it")


def test_cache_dir(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("SERVETWIN_CACHE", raising=False)
    assert testbed.cache_dir() == Path.home() / ".cache" / "servetwin" / "testbed"
    monkeypatch.setenv("SERVETWIN_CACHE", str(tmp_path / "env"))
    assert testbed.cache_dir() == tmp_path / "env" / "testbed"
    assert testbed.cache_dir(tmp_path / "arg") == tmp_path / "arg" / "testbed"


def test_cli_error_is_one_message_exit_2(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    def fail(cache: object, progress: object) -> None:
        raise TestbedError("llama-server: cmake build", "exit code 2", "install g++")

    monkeypatch.setattr(testbed, "ensure_llamacpp", fail)
    assert cli.main(["llamacpp", "--cache", str(tmp_path)]) == 2
    out, err = capsys.readouterr()
    assert out == ""
    assert "Traceback" not in err
    assert "error: testbed: llama-server: cmake build: exit code 2\nFix: install g++" in err


def test_cli_prints_paths_as_json(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    server = tmp_path / "llama-server"
    monkeypatch.setattr(
        testbed, "ensure_llamacpp", lambda cache, progress: testbed.LlamaCppTestbed(server=server)
    )
    assert cli.main(["llamacpp", "--cache", str(tmp_path)]) == 0
    result = json.loads(capsys.readouterr().out)
    assert result == {"cache": str(tmp_path / "testbed"), "llama_server": str(server)}


# ---------------------------------------------------------------------------------------------
# Real builds (first run on a machine: ~7 min; cached: seconds)


@pytest.mark.slow
@needs_gguf
def test_real_testbed_builds_and_runs() -> None:
    vllm = testbed.ensure_vllm()
    probe = subprocess.run(
        [str(vllm.python), "-c", "import vllm; print(vllm.__version__)"],
        env={**os.environ, **vllm.env},
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert probe.returncode == 0, probe.stderr[-2000:]
    assert probe.stdout.strip().splitlines()[-1] == vllm.version == "0.32.0"
    assert vllm.env["VLLM_TARGET_DEVICE"] == "cpu"

    server = testbed.ensure_llamacpp().server
    version = subprocess.run([str(server), "--version"], capture_output=True, timeout=60)
    assert version.returncode == 0, version.stderr[-2000:]

    model = testbed.ensure_tiny_hf(vllm=vllm)
    for name in ("config.json", "model.safetensors", "tokenizer.json"):
        assert (model / name).is_file(), name
    config = json.loads((model / "config.json").read_text())
    assert (config["vocab_size"], config["hidden_size"], config["num_hidden_layers"]) == (
        32000,
        512,
        4,
    )

    path = testbed.ensure_tiny_gguf()
    assert gguf.GGUFReader(path).get_field("llama.block_count").contents() == 4
