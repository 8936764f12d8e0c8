import torch

from app.batching import BatchEntry, collate, count_items, max_batch_size_from_memory, split_rows
from app.requests import ModelInput


def test_count_items_counts_multi_item_requests_fully():
    entries = [BatchEntry(ModelInput(texts=["a", "b", "c"]), 0.0), BatchEntry(ModelInput(token_ids=[[1], [2]]), 0.0)]
    assert count_items(entries) == 5


def test_count_items_never_raises():
    assert count_items([BatchEntry(None, 0.0)]) == 1  # type: ignore[arg-type]


def test_collate_pads_right_with_mask():
    ids, mask = collate([[5, 6, 7], [8]], pad_id=0)
    assert ids.tolist() == [[5, 6, 7], [8, 0, 0]]
    assert mask.tolist() == [[1, 1, 1], [1, 0, 0]]
    assert ids.dtype == torch.long


def test_collate_equals_row_by_row_padding():
    import random

    rng = random.Random(0)
    for equal in (False, True):
        for _ in range(50):
            n = rng.randint(1, 9)
            lengths = [5] * n if equal else [rng.randint(1, 12) for _ in range(n)]
            rows = [[rng.randint(1, 30000) for _ in range(k)] for k in lengths]
            ids, mask = collate(rows, pad_id=7)
            longest = max(lengths)
            assert ids.tolist() == [r + [7] * (longest - len(r)) for r in rows]
            assert mask.tolist() == [[1] * len(r) + [0] * (longest - len(r)) for r in rows]
            assert ids.dtype == mask.dtype == torch.long


def test_split_rows_checks_count():
    parts = split_rows(torch.arange(10).reshape(5, 2), [2, 3])
    assert [p.shape[0] for p in parts] == [2, 3]
    try:
        split_rows(torch.zeros(4, 2), [2, 3])
    except RuntimeError as e:
        assert "4 rows for 5 items" in str(e)
    else:
        raise AssertionError("mismatch not detected")


def test_memory_formula():
    # floor(10 GiB * 0.8 / 100 MiB) = 81
    assert max_batch_size_from_memory(10 * 2**30, 100 * 2**20, cap=512) == 81
    assert max_batch_size_from_memory(10 * 2**30, 100 * 2**20, cap=64) == 64
    assert max_batch_size_from_memory(1, 100 * 2**20, cap=64) == 1


def test_token_budget_groups_keep_order_and_budget():
    import random

    from app.batching import token_budget_groups

    rng = random.Random(0)
    for _ in range(200):
        rows = [[7] * rng.randint(1, 40) for _ in range(rng.randint(1, 30))]
        budget = rng.randint(1, 200)
        groups = token_budget_groups(rows, budget)
        assert [r for g in groups for r in g] == rows
        for g in groups:
            assert len(g) == 1 or len(g) * max(len(r) for r in g) <= budget
