import pytest
import torch

from detector.loader import ResumableBatchSampler, ResumableDataLoader


def test_order_is_a_pure_function_of_seed_and_epoch():
    torch.manual_seed(123)
    a = ResumableBatchSampler(50, 8, seed=7)
    torch.manual_seed(999)
    b = ResumableBatchSampler(50, 8, seed=7)
    a.set_epoch(2)
    b.set_epoch(2)
    assert list(a) == list(b)
    b.set_epoch(3)
    assert list(a) != list(b)
    assert sorted(i for batch in a for i in batch) == list(range(50))


def test_skip_resumes_after_consumed_batches_once():
    sampler = ResumableBatchSampler(50, 8, seed=1)
    sampler.set_epoch(1)
    full = list(sampler)
    sampler.skip(1, 3)
    assert list(sampler) == full[3:]
    assert list(sampler) == full  # the skip applies to one iteration only
    sampler.skip(0, 3)  # a skip for another epoch does nothing to this one
    assert list(sampler) == full


def test_ranks_partition_the_epoch():
    shards = [list(ResumableBatchSampler(10, 2, seed=0, rank=r, world_size=2)) for r in range(2)]
    flat = [i for shard in shards for batch in shard for i in batch]
    assert sorted(flat) == list(range(10))
    assert len(ResumableBatchSampler(10, 2, rank=1, world_size=2)) == 3


def test_weighted_sampling_balances_classes():
    labels = torch.tensor([0] * 10 + [1] * 90)
    weights = (1.0 / torch.bincount(labels).double())[labels]
    sampler = ResumableBatchSampler(100, 100, seed=0, weights=weights.tolist())
    drawn = torch.tensor(next(iter(sampler)))
    assert 35 <= int((labels[drawn] == 0).sum()) <= 65


def test_loader_state_round_trip_continues_mid_epoch():
    data = list(range(20))
    loader = ResumableDataLoader(data, ResumableBatchSampler(20, 4, seed=5), collate_fn=list)
    loader.batch_sampler.set_epoch(1)
    straight = list(loader)
    it = iter(loader)
    next(it), next(it)
    state = loader.state_dict()
    assert state == {"epoch": 1, "batches_consumed": 2, "seed": 5}
    fresh = ResumableDataLoader(data, ResumableBatchSampler(20, 4, seed=5), collate_fn=list)
    fresh.load_state_dict(state)
    fresh.batch_sampler.set_epoch(1)
    assert list(fresh) == straight[2:]


def test_loader_refuses_state_from_another_seed():
    loader = ResumableDataLoader(list(range(4)), ResumableBatchSampler(4, 2, seed=1), collate_fn=list)
    with pytest.raises(ValueError, match="seed 2"):
        loader.load_state_dict({"epoch": 0, "batches_consumed": 1, "seed": 2})
