import pytest
import torch

from detector.loader import ResumableDataLoader, ResumableSampler


def test_order_is_a_pure_function_of_seed_and_epoch():
    torch.manual_seed(123)
    a = ResumableSampler(50, seed=7)
    torch.manual_seed(999)
    b = ResumableSampler(50, seed=7)
    a.set_epoch(2)
    b.set_epoch(2)
    assert list(a) == list(b)
    b.set_epoch(3)
    assert list(a) != list(b)
    assert sorted(a) == list(range(50))


def test_skip_resumes_after_consumed_samples_once():
    sampler = ResumableSampler(50, seed=1)
    sampler.set_epoch(1)
    full = list(sampler)
    sampler.skip(1, 24)
    assert list(sampler) == full[24:]
    assert list(sampler) == full  # the skip applies to one iteration only
    sampler.skip(0, 24)  # a skip for another epoch does nothing to this one
    assert list(sampler) == full


def test_ranks_partition_the_epoch():
    shards = [list(ResumableSampler(10, seed=0, rank=r, world_size=2)) for r in range(2)]
    assert sorted(shards[0] + shards[1]) == list(range(10))
    uneven = [list(ResumableSampler(11, seed=0, rank=r, world_size=2)) for r in range(2)]
    assert len(uneven[0]) == len(uneven[1]) == 6  # padded by wrapping around
    assert set(uneven[0] + uneven[1]) == set(range(11))


def test_weighted_sampling_balances_classes():
    labels = torch.tensor([0] * 10 + [1] * 90)
    weights = (1.0 / torch.bincount(labels).double())[labels]
    drawn = torch.tensor(list(ResumableSampler(100, seed=0, weights=weights.tolist())))
    assert 35 <= int((labels[drawn] == 0).sum()) <= 65


def test_lightning_sets_the_epoch_through_the_loader_sampler():
    from lightning.fabric.utilities.data import _set_sampler_epoch

    loader = ResumableDataLoader(list(range(8)), ResumableSampler(8, seed=0), 2, collate_fn=list)
    _set_sampler_epoch(loader, 5)
    assert loader.resumable_sampler.epoch == 5


def test_loader_state_round_trip_continues_mid_epoch():
    data = list(range(20))
    loader = ResumableDataLoader(data, ResumableSampler(20, seed=5), 4, collate_fn=list)
    loader.resumable_sampler.set_epoch(1)
    straight = list(loader)
    it = iter(loader)
    next(it), next(it)
    state = loader.state_dict()
    assert state == {"epoch": 1, "batches_consumed": 2, "seed": 5, "batch_size": 4, "world_size": 1}
    fresh = ResumableDataLoader(data, ResumableSampler(20, seed=5), 4, collate_fn=list)
    fresh.load_state_dict(state)
    fresh.resumable_sampler.set_epoch(1)
    assert list(fresh) == straight[2:]
    assert fresh.state_dict()["batches_consumed"] == 5


def test_loader_refuses_state_from_another_seed():
    loader = ResumableDataLoader(list(range(4)), ResumableSampler(4, seed=1), 2, collate_fn=list)
    with pytest.raises(ValueError, match="seed 2"):
        loader.load_state_dict({"epoch": 0, "batches_consumed": 1, "seed": 2})
