"""pipeline.run.isolate: failures in forked children become errors, one item each; an Isolator's
children stay warm across map calls."""

from __future__ import annotations

import os
import signal

import pytest

from pipeline.run.isolate import Isolator, run_isolated


@pytest.mark.parametrize("kind", ["crash", "timeout", "memory"])
def test_isolation_turns_worker_failures_into_errors(kind):
    def work(item):
        if item == "crash":
            os.kill(os.getpid(), 11)
        if item == "timeout":
            import time

            time.sleep(30)
        if item == "memory":
            return bytearray(2 << 30)
        return item

    results = {i: (s, v) for i, s, v in run_isolated(work, [kind, "fine"], 2, 2.0, 256 << 20)}
    assert results[1] == ("ok", "fine")
    status, err = results[0]
    # a crash and a memory blow-up are retried once alone before their verdict (test_oom.py)
    reason = {"crash": "decode_crash", "timeout": "decode_timeout", "memory": "out_of_memory"}
    assert status == "err" and err.reason == reason[kind]


def test_isolation_failure_costs_one_item_of_a_serving_child():
    """One child serves several items in turn; a crash or a hang mid-sequence costs only the
    item in flight, the rest complete in fresh children, each item exactly once."""
    def work(item):
        if item == "crash":
            os.kill(os.getpid(), 11)
        if item == "hang":
            import time

            time.sleep(30)
        return (item, os.getpid())

    items = ["a", "b", "crash", "c", "hang", "d", "e", "f"]
    out = list(run_isolated(work, items, 1, 2.0, 256 << 20, items_per_child=3))
    assert sorted(i for i, _, _ in out) == list(range(len(items)))
    res = {i: (s, v) for i, s, v in out}
    assert res[2][1].reason == "decode_crash" and res[4][1].reason == "decode_timeout"
    ok = {items[i]: v[1] for i, (s, v) in res.items() if s == "ok"}
    assert set(ok) == {"a", "b", "c", "d", "e", "f"}
    assert ok["a"] == ok["b"] != ok["c"]  # a and b share a child; the crash replaced it
    assert ok["d"] == ok["e"] == ok["f"] != ok["c"]  # recycled after 3 items / the hang
    assert os.getpid() not in ok.values()


def test_isolator_keeps_warm_children_across_calls():
    """An Isolator's idle children serve the next map call (a Ray actor's shards); one that
    died while idle is replaced; items travel to the child by value (not inherited)."""
    def work(item):
        return (item * 2, os.getpid())

    with Isolator(work, 1, 5.0, 256 << 20, items_per_child=8) as iso:
        first = {i: v for i, s, v in iso.map([1, 2])}
        second = {i: v for i, s, v in iso.map([10, 20])}  # items made after the fork
        assert [first[0][0], first[1][0], second[0][0], second[1][0]] == [2, 4, 20, 40]
        assert len({first[0][1], first[1][1], second[0][1], second[1][1]}) == 1  # one child
        os.kill(first[0][1], signal.SIGKILL)  # dies while idle
        iso.idle[0].proc.join(5)  # (the kill lands asynchronously)
        third = list(iso.map([5]))
        assert third[0][:2] == (0, "ok") and third[0][2][0] == 10
        assert third[0][2][1] != first[0][1]


def test_children_freeze_inherited_objects_and_parent_collector_stays_on():
    """What a child inherits is out of its collector (gc.freeze), what it allocates is not,
    and receiving results leaves the parent's collector as it was."""
    import gc

    inherited = [["made before the fork"]]  # tracked (lists always are), in the forked heap

    def work(_):
        gc.collect()
        own = [["made in the child"]]
        seen = {id(o) for o in gc.get_objects()}  # the collector's generations, not the frozen
        return id(inherited) in seen, id(own) in seen, gc.isenabled()

    frozen_before = gc.get_freeze_count()
    out = [v for _, s, v in run_isolated(work, [0, 1], 1, 30.0, 0)]
    assert out == [(False, True, True)] * 2
    assert gc.isenabled() and gc.get_freeze_count() == frozen_before
