"""vLLM V1 engine model: hand-computed step sequences."""

import pytest

from tests.sim.factories import drive, make_engine, make_request


def scheduled(log):
    return [[(r.rid, n) for r, n in plan.scheduled] for _, plan in log]


def test_chunked_prefill_budget_and_decode_order() -> None:
    # blocks of 4, budget 8 tokens per step; A: 10-token prompt, 3 out; B: 6-token prompt, 2 out
    eng = make_engine(num_blocks=11, block_size=4, max_num_batched_tokens=8)
    a, b = make_request(0, 10, 3), make_request(1, 6, 2)
    log = drive(eng, [a, b])
    assert scheduled(log) == [
        [(0, 8)],            # A's first chunk uses the whole budget; B must wait
        [(0, 2), (1, 6)],    # running first (A's last chunk), then B admitted whole
        [(0, 1), (1, 1)],    # both decode
        [(0, 1)],            # B finished after its 2nd token
    ]
    # step times: 1 + 0.1 P + 0.5 D
    t = [0.0]
    for dt in (1.8, 1.8, 2.0, 1.5):
        t.append(t[-1] + dt)
    assert a.first_token_s == t[2] and b.first_token_s == t[2]
    assert b.finish_s == t[3] and a.finish_s == t[4]
    assert a.token_steps == [1, 4] and b.token_steps == [1, 3]
    # blocks: A got 1 2 (step 0) then 3; B got 4 5; B freed tail-first, then A
    assert eng.pool.free_queue_order() == [6, 7, 8, 9, 10, 5, 4, 3, 2, 1]


def test_preemption_of_the_newest_and_recompute() -> None:
    # 4 usable blocks of 4 tokens; A: 4 prompt + 7 output tokens, B: 4 + 6
    eng = make_engine(num_blocks=5, block_size=4, max_num_batched_tokens=16,
                      scheduler_reserve_full_isl=False)
    a, b = make_request(0, 4, 7), make_request(1, 4, 6)
    log = drive(eng, [a, b])
    steps = scheduled(log)
    # steps 0-4: both run; step 1 takes blocks 3 and 4 for tokens 5..8
    assert steps[:5] == [[(0, 4), (1, 4)]] + [[(0, 1), (1, 1)]] * 4
    assert a.blocks == [] and b.blocks == []
    # step 5: A's 9th token needs a 3rd block, none free: B (last running) is
    # preempted by recompute; its blocks 2 and 4 return tail first, A takes 4
    assert steps[5] == [(0, 1)]
    assert [r.rid for r in log[5][1].preempted] == [1]
    # step 6: B must recompute 4 prompt + 5 generated = 9 tokens (3 blocks), 1 free: refused
    assert steps[6] == [(0, 1)]
    # step 7: A finished and freed 1 3 4. B's first block (2) was never reallocated,
    # so its prefix-cache entry survives: B recomputes 9 - 4 = 5 tokens, samples its 6th
    assert steps[7] == [(1, 5)]
    assert len(steps) == 8
    assert b.num_preemptions == 1 and a.num_preemptions == 0
    assert b.num_output == 6 and a.num_output == 7
    assert b.token_steps == [0, 5, 7, 8]
    assert eng.num_preemptions == 1
    assert eng.pool.free_queue_order() == [1, 3, 4, 2]


def test_prefix_hit_shortens_prefill() -> None:
    eng = make_engine(num_blocks=21, block_size=4, max_num_batched_tokens=32, hash_block_tokens=4)
    a = make_request(0, 10, 2, arrival_s=0.0, hash_ids=[7, 8, 9])
    b = make_request(1, 12, 1, arrival_s=100.0, hash_ids=[7, 8, 5])
    log = drive(eng, [a, b])
    assert scheduled(log) == [[(0, 10)], [(0, 1)], [(1, 4)]]
    assert a.num_cached_tokens == 0
    assert b.num_cached_tokens == 8  # blocks of ids 7 and 8 reused
    assert log[2][1].num_p == 4
    # B touched blocks 1 2 (A's), took 4 from the head; freed tail first
    assert eng.pool.free_queue_order()[-4:] == [3, 4, 2, 1]
    assert eng.num_prefix_hit_tokens == 8
    assert eng.num_prefix_query_tokens == 22


def test_hit_never_covers_the_last_token() -> None:
    eng = make_engine(num_blocks=21, block_size=4, max_num_batched_tokens=32, hash_block_tokens=4)
    a = make_request(0, 8, 1, arrival_s=0.0, hash_ids=[7, 8])
    b = make_request(1, 8, 1, arrival_s=50.0, hash_ids=[7, 8])
    drive(eng, [a, b])
    # both blocks are cached but one token must be recomputed: only the first block hits
    assert b.num_cached_tokens == 4


def test_max_num_seqs_caps_admission() -> None:
    eng = make_engine(num_blocks=40, block_size=4, max_num_batched_tokens=64, max_num_seqs=2)
    reqs = [make_request(i, 4, 2) for i in range(3)]
    log = drive(eng, reqs)
    assert scheduled(log)[0] == [(0, 4), (1, 4)]
    assert scheduled(log)[2] == [(2, 4)]


def test_no_chunked_prefill_waits_for_a_whole_prompt() -> None:
    eng = make_engine(num_blocks=40, block_size=4, max_num_batched_tokens=12,
                      enable_chunked_prefill=False)
    a, b = make_request(0, 4, 3), make_request(1, 10, 1)
    log = drive(eng, [a, b])
    # B's 10 tokens do not fit the 8 left after A's prompt: it waits
    assert scheduled(log)[0] == [(0, 4)]
    assert scheduled(log)[1] == [(0, 1), (1, 10)]


def test_long_prefill_threshold_caps_chunks() -> None:
    eng = make_engine(num_blocks=40, block_size=4, max_num_batched_tokens=64,
                      long_prefill_token_threshold=5)
    a = make_request(0, 12, 1)
    log = drive(eng, [a])
    assert scheduled(log) == [[(0, 5)], [(0, 5)], [(0, 2)]]


def test_request_longer_than_max_model_len_is_rejected() -> None:
    eng = make_engine(max_model_len=16)
    r = make_request(0, 12, 8)
    assert not eng.add_request(r)
    assert "max_model_len" in r.reject_reason


def test_watermark_holds_back_admission() -> None:
    eng = make_engine(num_blocks=11, block_size=4, max_num_batched_tokens=64, watermark=0.5)
    a, b = make_request(0, 16, 2), make_request(1, 8, 2)  # A: 4 blocks; B: 2 blocks
    log = drive(eng, [a, b])
    # 10 usable, 5 held back: A leaves 6 free, B would leave 4 < 5
    assert scheduled(log)[0] == [(0, 16)]
    assert (1, 8) in scheduled(log)[2]


@pytest.mark.parametrize("ff", [False, True])
def test_fast_forward_covers_a_decode_run(ff: bool) -> None:
    eng = make_engine(num_blocks=100, block_size=4, max_num_batched_tokens=64, fast_forward=ff)
    a, b = make_request(0, 4, 20), make_request(1, 6, 9)
    log = drive(eng, [a, b])
    steps = [p.num_steps for _, p in log]
    if ff:
        assert steps == [1, 8, 11]  # prefill, run until B's last token, run until A's
    else:
        assert steps == [1] * 20
    assert eng.steps.num_steps == 20
    assert a.finish_s == pytest.approx(1.0 + 1.0 + 8 * 2.0 + 11 * 1.5)
