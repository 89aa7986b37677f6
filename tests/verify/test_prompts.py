"""verify.prompts: exact lengths, exactly the shared prefixes a trace names, stable ids."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from sim.errors import InputError
from sim.workload import Trace
from verify.loadgen import plan_from_trace
from verify.prompts import FixedPrompt, PromptBuilder

ROOT = Path(__file__).resolve().parents[2]


def common_prefix(a: list[int], b: list[int]) -> int:
    n = 0
    for x, y in zip(a, b, strict=False):
        if x != y:
            break
        n += 1
    return n


@pytest.mark.parametrize("length", [1, 5, 16, 17, 32, 33, 100])
def test_prompts_have_the_exact_length(length):
    b = PromptBuilder(seed=3, block_tokens=16)
    for hash_ids in ([], [0], [0, 1], [0, 1, 2, 3, 4, 5, 6]):
        ids = b.token_ids(9, hash_ids, length)
        assert len(ids) == length
        assert b.json_items(9, hash_ids, length) == ",".join(map(str, ids))


def test_requests_share_exactly_the_blocks_the_trace_says():
    b = PromptBuilder(seed=3, block_tokens=16)
    a = b.token_ids(0, [0, 1, 2], 48)
    c = b.token_ids(1, [0, 1, 3], 48)
    assert a[:32] == c[:32] and a[32] != c[32]
    assert common_prefix(a, c) == 32
    # the same ids, a shorter prompt: a prefix of the longer one
    short = b.token_ids(2, [0, 1, 2], 40)
    assert short == a[:40]
    # past the hashed blocks every request has its own tokens
    d = b.token_ids(3, [0], 40)
    e = b.token_ids(4, [0], 40)
    assert d[:16] == e[:16] and common_prefix(d, e) == 16
    # no hash ids: nothing shared
    assert common_prefix(b.token_ids(5, [], 30), b.token_ids(6, [], 30)) == 0


def test_tokens_stay_in_the_vocabulary_and_the_seed_matters():
    b = PromptBuilder(seed=1, block_tokens=8, vocab_low=100, vocab_high=110)
    ids = b.token_ids(0, [0, 1], 100)
    assert min(ids) >= 100 and max(ids) < 110
    assert len(set(ids)) == 10  # 100 draws from 10 values
    assert PromptBuilder(2, 8).token_ids(0, [0], 8) != PromptBuilder(1, 8).token_ids(0, [0], 8)
    assert b.block(1).tolist() == ids[8:16]


def test_the_same_seed_gives_the_same_tokens_in_another_process():
    cases = [(0, [0, 1], 40), (7, [5, 9, 2], 47), (123456, [], 20)]
    script = (
        "import json, sys\n"
        "from verify.prompts import PromptBuilder\n"
        "b = PromptBuilder(seed=11, block_tokens=16, vocab_low=5, vocab_high=32000)\n"
        f"print(json.dumps([b.token_ids(r, h, n) for r, h, n in {cases!r}]))\n"
    )
    env = {"PYTHONPATH": str(ROOT), "PYTHONHASHSEED": "random", "PATH": "/usr/bin:/bin"}
    out = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True,
                         check=True, cwd=ROOT, env=env).stdout
    b = PromptBuilder(seed=11, block_tokens=16, vocab_low=5, vocab_high=32000)
    assert json.loads(out) == [b.token_ids(r, h, n) for r, h, n in cases]


def test_builder_checks_its_arguments():
    with pytest.raises(ValueError, match="block_tokens"):
        PromptBuilder(0, 0)
    with pytest.raises(ValueError, match="vocab"):
        PromptBuilder(0, 16, vocab_low=10, vocab_high=10)
    with pytest.raises(ValueError, match="must be >= 0"):
        PromptBuilder(0, 16).token_ids(-1, [], 3)


def make_trace(block: int = 16) -> Trace:
    return Trace.checked(arrival_s=[0.0, 0.5, 1.0], input_tokens=[40, 40, 10],
                         output_tokens=[3, 4, 5], hash_offsets=[0, 3, 6, 6],
                         hash_ids=[0, 1, 2, 0, 1, 3], hash_block_tokens=block, source="t")


def test_plan_from_trace_follows_the_trace():
    b = PromptBuilder(seed=5, block_tokens=16)
    plan = plan_from_trace(make_trace(), b, scale=2.0)
    assert [p.request_id for p in plan] == [0, 1, 2]
    assert [p.intended_s for p in plan] == [0.0, 1.0, 2.0]
    assert [p.num_prompt_tokens for p in plan] == [40, 40, 10]
    assert [p.max_tokens for p in plan] == [3, 4, 5]
    p0, p1, p2 = (p.prompt.token_ids() for p in plan)
    assert common_prefix(p0, p1) == 32 and len(p2) == 10
    assert [int(h) for h in plan[1].hash_ids] == [0, 1, 3]


def test_plan_from_trace_refuses_a_block_size_mismatch():
    with pytest.raises(InputError, match="hash blocks of 16 tokens but the prompt builder "
                       "makes blocks of 32"):
        plan_from_trace(make_trace(16), PromptBuilder(0, 32))
    with pytest.raises(InputError, match="scale"):
        plan_from_trace(make_trace(), PromptBuilder(0, 16), scale=0)


def test_fixed_prompt():
    p = FixedPrompt(np.array([3, 1, 2]))
    assert len(p) == 3 and p.token_ids() == [3, 1, 2] and p.json_items() == "3,1,2"
