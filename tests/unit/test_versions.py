"""Version splits: exact weighted turns, stable sticky keys, pinned versions checked."""

import pytest

from app.errors import ModelNotFound
from app.versions import VersionSplit


def test_a_90_10_split_lands_exactly_on_every_ten_requests():
    split = VersionSplit("m", {"1": 90, "2": 10})
    picks = [split.pick() for _ in range(2000)]
    assert picks.count("2") == 200
    assert all(picks[i : i + 10].count("2") == 1 for i in range(0, 2000, 10))


def test_a_zero_weight_version_gets_no_unpinned_traffic_but_can_be_pinned():
    split = VersionSplit("m", {"1": 100, "2": 0})
    assert {split.pick() for _ in range(50)} == {"1"}
    assert {split.pick(f"user-{i}") for i in range(200)} == {"1"}
    assert split.check("2") == "2"


def test_sticky_keys_keep_their_version_and_follow_the_weights():
    split = VersionSplit("m", {"1": 90, "2": 10})
    first = {f"user-{i}": split.pick(f"user-{i}") for i in range(5000)}
    assert all(split.pick(k) == v for k, v in first.items())
    share = sum(v == "2" for v in first.values()) / len(first)
    assert 0.08 < share < 0.12


def test_a_key_moves_only_toward_a_version_that_grew():
    before = VersionSplit("m", {"1": 90, "2": 10})
    after = VersionSplit("m", {"1": 50, "2": 50})
    for i in range(2000):
        if before.pick(f"k{i}") == "2":
            assert after.pick(f"k{i}") == "2"


def test_unknown_version_is_a_404_naming_the_versions():
    with pytest.raises(ModelNotFound, match=r"no version '3'; versions: \['1', '2'\]"):
        VersionSplit("m", {"1": 1, "2": 1}).check("3")


@pytest.mark.parametrize("weights", [{}, {"1": 0}, {"1": -1, "2": 5}])
def test_bad_splits_are_refused(weights):
    with pytest.raises(ValueError):
        VersionSplit("m", weights)
