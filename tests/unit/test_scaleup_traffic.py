"""The scale-up benchmark's bookkeeping: which replica is new and when it first answered."""

import math

from bench.scaleup import Traffic


def test_first_new_replica_is_the_first_answer_from_another_replica():
    t = Traffic(served_by=[(0.1, "a", "n1"), (0.5, "a", "n1"), (7.5, "b", "n2"), (8.0, "c", "n2"), (9.0, "b", "n2")])
    assert t.first_new_replica_s() == 7.5
    assert t.replicas() == {"a", "b", "c"}


def test_no_new_replica_yet_is_nan():
    assert math.isnan(Traffic(served_by=[(0.1, "a", "n1")]).first_new_replica_s())
    assert math.isnan(Traffic().first_new_replica_s())
