"""place(): spread, demand, capacity, cordons and pins."""

from __future__ import annotations

import pytest

from services.controlplane.placement import ClusterSlot, Placement, place


def test_spread_gives_every_open_cluster_one_first() -> None:
    slots = [ClusterSlot("a", room=4), ClusterSlot("b", room=4)]
    assert place(2, slots) == Placement({"a": 1, "b": 1})


def test_fewer_replicas_than_clusters_go_where_demand_is() -> None:
    slots = [ClusterSlot("a", room=4, demand=1), ClusterSlot("b", room=4, demand=5)]
    assert place(1, slots) == Placement({"a": 0, "b": 1})


def test_the_rest_follows_demand() -> None:
    slots = [ClusterSlot("a", room=8, demand=3), ClusterSlot("b", room=8, demand=9)]
    assert place(4, slots) == Placement({"a": 1, "b": 3})


def test_without_demand_the_rest_follows_free_capacity() -> None:
    slots = [ClusterSlot("a", room=2), ClusterSlot("b", room=6)]
    assert place(4, slots) == Placement({"a": 1, "b": 3})


def test_ties_keep_replicas_where_they_are() -> None:
    slots = [ClusterSlot("a", room=4, current=1), ClusterSlot("b", room=4, current=2)]
    assert place(3, slots) == Placement({"a": 1, "b": 2})
    slots = [ClusterSlot("a", room=4, current=2), ClusterSlot("b", room=4, current=1)]
    assert place(3, slots) == Placement({"a": 2, "b": 1})


def test_cordoned_or_unhealthy_clusters_get_none() -> None:
    slots = [ClusterSlot("a", room=4, open=False, current=2), ClusterSlot("b", room=4)]
    assert place(2, slots) == Placement({"a": 0, "b": 2})


def test_room_caps_a_cluster_and_the_excess_is_unplaced() -> None:
    slots = [ClusterSlot("a", room=1), ClusterSlot("b", room=2)]
    assert place(5, slots) == Placement({"a": 1, "b": 2}, unplaced=2)
    assert place(1, [ClusterSlot("a", room=0)]) == Placement({"a": 0}, unplaced=1)


def test_pins_are_kept_and_count_toward_the_total() -> None:
    slots = [ClusterSlot("a", room=4, pinned=3), ClusterSlot("b", room=4)]
    assert place(4, slots) == Placement({"a": 3, "b": 1})
    assert place(2, slots) == Placement({"a": 3, "b": 0})  # a pin beyond the total holds


def test_zero_places_nothing_and_a_negative_total_is_refused() -> None:
    assert place(0, [ClusterSlot("a", room=4, current=3)]) == Placement({"a": 0})
    with pytest.raises(ValueError, match="negative"):
        place(-1, [])
