"""The suite's own scheduling (conftest.py): after the shuffle, each xdist worker's first
queue starts with its share of the whole-model tests, and nothing is lost or repeated."""

from __future__ import annotations

import types

import conftest


class _Item:
    def __init__(self, name: str, slow: bool) -> None:
        self.name, self.slow = name, slow

    def get_closest_marker(self, name: str):
        return object() if self.slow and name == "slow" else None


def _items(n: int, every: int) -> list[_Item]:
    return [_Item(f"t{i}", i % every == 0) for i in range(n)]


def _order(items: list[_Item], workers: int) -> list[_Item]:
    config = types.SimpleNamespace(workerinput={"workercount": workers})
    conftest.pytest_collection_modifyitems(config, items)
    return items


def test_slow_tests_lead_each_worker_s_first_queue() -> None:
    items = _items(31, 7)  # slow: t0, t7, t14, t21, t28
    before = list(items)
    ordered = _order(items, 2)
    assert sorted(map(id, ordered)) == sorted(map(id, before))  # a permutation
    first, second = ordered[:15], ordered[15:]  # worksteal's first split: 31 // 2, the rest
    assert [i.name for i in first[:3]] == ["t0", "t14", "t28"]
    assert [i.name for i in second[:2]] == ["t7", "t21"]
    assert not any(i.slow for i in first[3:] + second[2:])
    fast = [i.name for i in ordered if not i.slow]
    assert fast == [i.name for i in before if not i.slow]  # the shuffle's order is kept


def test_one_worker_or_all_slow_keeps_every_test() -> None:
    items = _items(9, 3)
    assert _order(list(items), 1) == items  # no xdist: untouched
    slow = [_Item(f"s{i}", True) for i in range(5)]
    ordered = _order(list(slow), 2)
    assert sorted(i.name for i in ordered) == sorted(i.name for i in slow)
