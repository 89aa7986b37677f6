"""Processor-sharing links, completion times computed by hand (exact in binary floats
where the numbers allow; otherwise compared with pytest.approx)."""

import pytest

from sim.links import Link, Topology

GB = 1e9


def drain(link: Link) -> dict[str, float]:
    """Follow next_completion like a simpy process would; tag -> delivery time."""
    out: dict[str, float] = {}
    while (nxt := link.next_completion()) is not None:
        for tr in link.advance(nxt[0]):
            out[tr.tag] = tr.finish_s
    return out


def test_two_transfers_share_one_link() -> None:
    # 10 GB/s; A = 10 GB at t=0, B = 5 GB at t=0.5.
    # 0-0.5: A alone at 10 GB/s sends 5 GB (5 GB left).
    # from 0.5: two share, 5 GB/s each. B: 5 GB / 5 GB/s = 1.0 s -> 1.5.
    # A: 5 GB left / 5 GB/s = 1.0 s -> 1.5 too.
    link = Link(10 * GB)
    a = link.start(0.0, 10 * GB, "A")
    assert link.next_completion() == (1.0, a)  # alone, A would end at 1.0
    b = link.start(0.5, 5 * GB, "B")
    t, first = link.next_completion()  # type: ignore[misc]
    assert t == 1.5 and first in (a, b)
    done = link.advance(1.5)
    assert sorted(tr.tag for tr in done) == ["A", "B"]
    assert all(tr.finish_s == 1.5 for tr in done)
    assert link.next_completion() is None


def test_a_short_transfer_leaves_and_the_long_one_speeds_up() -> None:
    # 10 GB/s; A = 10 GB at 0, B = 2 GB at 0.5.
    # 0-0.5: A sends 5 GB. From 0.5 each gets 5 GB/s: B done after 2/5 = 0.4 s -> 0.9;
    # A sent 2 GB more (3 GB left), then alone at 10 GB/s: 0.3 s -> 1.2.
    link = Link(10 * GB)
    link.start(0.0, 10 * GB, "A")
    link.start(0.5, 2 * GB, "B")
    assert drain(link) == pytest.approx({"B": 0.9, "A": 1.2}, abs=1e-12)


def test_three_way_sharing() -> None:
    # 3 GB/s; A = 3 GB, B = 6 GB, C = 9 GB, all at 0: 1 GB/s each.
    # A done at 3 (B, C sent 3 GB each); then 1.5 GB/s each: B's 3 GB left -> +2 = 5;
    # C sent 3 + 3 = 6 GB by 5, 3 GB left alone at 3 GB/s -> 6.
    link = Link(3 * GB)
    for tag, n in (("A", 3), ("B", 6), ("C", 9)):
        link.start(0.0, n * GB, tag)
    assert drain(link) == {"A": 3.0, "B": 5.0, "C": 6.0}


def test_latency_delays_delivery_but_not_the_share() -> None:
    # 1 GB/s, latency 0.25. A = 1 GB at 0: sent by 1.0, delivered 1.25.
    # B = 1 GB at 1.0 starts on an idle link (A stopped sending at 1.0): sent by 2.0,
    # delivered 2.25. An empty transfer at 3.0 is delivered at 3.25.
    link = Link(1 * GB, latency_s=0.25)
    link.start(0.0, 1 * GB, "A")
    link.start(1.0, 1 * GB, "B")
    link.start(3.0, 0, "empty")
    assert drain(link) == {"A": 1.25, "B": 2.25, "empty": 3.25}


def test_deliveries_passed_by_a_start_are_handed_over_later() -> None:
    link = Link(1.0)
    link.start(0.0, 1.0, "A")  # delivered at 1.0
    link.start(5.0, 1.0, "B")  # the clock passes A's delivery
    assert [tr.tag for tr in link.advance(5.0)] == ["A"]
    assert link.next_completion() == (6.0, 1)


def test_utilisation_counts_busy_time_and_bytes() -> None:
    # 2 B/s. A = 2 B at 0 -> sent by 1; idle 1-3; B = 4 B at 3 -> sent by 5.
    link = Link(2.0)
    link.start(0.0, 2.0, "A")
    link.start(3.0, 4.0, "B")
    link.advance(4.0)  # B half sent
    u = link.utilisation(0.0, 4.0)
    assert u.busy_fraction == 0.5 and u.bytes_moved == 4.0  # busy 0-1 and 3-4
    link.advance(10.0)
    u = link.utilisation(0.0, 10.0)
    assert u.busy_fraction == 0.3 and u.bytes_moved == 6.0  # busy 0-1, 3-5
    assert link.utilisation(0.5, 3.5).bytes_moved == 2.0  # 0.5-1 and 3-3.5
    with pytest.raises(ValueError):
        link.utilisation(0.0, 11.0)


def test_time_cannot_go_backwards() -> None:
    link = Link(1.0)
    link.advance(2.0)
    with pytest.raises(ValueError):
        link.start(1.0, 1.0)


def test_topology_shared_fabric_vs_per_pair() -> None:
    # Two prefill->decode copies of 1 GB at 0 over 1 GB/s: a shared fabric finishes
    # both at 2.0, separate pair links at 1.0.
    fabric = Topology.shared_fabric(["p0", "p1"], ["d0"], 1 * GB)
    pairs = Topology.per_pair(["p0", "p1"], ["d0"], 1 * GB)
    for topo, want in ((fabric, 2.0), (pairs, 1.0)):
        topo.start(0.0, "p0", "d0", 1 * GB, "x")
        topo.start(0.0, "p1", "d0", 1 * GB, "y")
        nxt = topo.next_completion()
        assert nxt is not None and nxt[0] == want
        done = topo.advance(want)
        assert sorted(tr.tag for _, tr in done) == ["x", "y"]
        assert topo.next_completion() is None
