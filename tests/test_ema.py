"""Tests for the Trainer-free EMA core: schedule, update maths, dtypes, buffers, swap, state, shards."""

from __future__ import annotations

import os
import socket

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from torch import nn
from torch.optim.swa_utils import AveragedModel, get_ema_multi_avg_fn

from detector import ema as ema_core
from detector.ema import EMASchedule, ExponentialMovingAverage


class TwoParams(nn.Module):
    def __init__(self, dtype: torch.dtype = torch.float32) -> None:
        super().__init__()
        self.a = nn.Parameter(torch.tensor([1.0, 2.0], dtype=dtype))
        self.b = nn.Parameter(torch.tensor([4.0], dtype=dtype))


class WithBuffers(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.w = nn.Parameter(torch.tensor([2.0]))
        self.register_buffer("running", torch.tensor([8.0]))
        self.register_buffer("count", torch.tensor(3, dtype=torch.int64))
        self.register_buffer("mask", torch.tensor([True, False]))
        self.register_buffer("scratch", torch.zeros(2), persistent=False)


def _set(module: nn.Module, **values: list[float]) -> None:
    with torch.no_grad():
        for name, value in values.items():
            getattr(module, name).copy_(torch.tensor(value))


def _equal_states(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> bool:
    return a.keys() == b.keys() and all(a[k].dtype == b[k].dtype and torch.equal(a[k], b[k]) for k in a)


def test_update_matches_hand_computed_values_on_two_parameters() -> None:
    model = TwoParams()
    ema = ExponentialMovingAverage(model)
    schedule = EMASchedule(decay=0.5)
    _set(model, a=[3.0, 4.0], b=[0.0])
    ema.update(schedule.decay_at(ema.num_updates))  # first update copies
    assert ema.state_dict()["a"].tolist() == [3.0, 4.0] and ema.state_dict()["b"].tolist() == [0.0]
    _set(model, a=[5.0, 0.0], b=[8.0])
    ema.update(schedule.decay_at(ema.num_updates))  # 0.5 * old + 0.5 * new
    assert ema.state_dict()["a"].tolist() == [4.0, 2.0] and ema.state_dict()["b"].tolist() == [4.0]
    _set(model, a=[8.0, 6.0], b=[0.0])
    ema.update(0.75)  # 0.75 * [4, 2] + 0.25 * [8, 6]; 0.75 * 4 + 0.25 * 0
    assert ema.state_dict()["a"].tolist() == [5.0, 3.0] and ema.state_dict()["b"].tolist() == [3.0]
    assert ema.num_updates == 3


def test_update_equals_torch_swa_utils_ema_bit_for_bit() -> None:
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(6, 5), nn.LayerNorm(5), nn.Linear(5, 2))
    reference = AveragedModel(model, multi_avg_fn=get_ema_multi_avg_fn(0.9), use_buffers=True)
    ema = ExponentialMovingAverage(model)
    schedule = EMASchedule(decay=0.9)
    optimizer = torch.optim.AdamW(model.parameters(), lr=0.1)
    for _ in range(6):
        model(torch.randn(4, 6)).square().mean().backward()
        optimizer.step()
        optimizer.zero_grad()
        reference.update_parameters(model)
        ema.update(schedule.decay_at(ema.num_updates))
    expected = {k.removeprefix("module."): v for k, v in reference.state_dict().items() if k != "n_averaged"}
    got = ema.state_dict()
    assert got.keys() == expected.keys()
    assert all(torch.equal(got[k], expected[k]) for k in got)


def test_warmup_follows_timm_schedule_and_is_capped_at_decay() -> None:
    schedule = EMASchedule(decay=0.999, warmup=True)  # gamma 1, power 3/4
    assert schedule.decay_at(0) == 0.0
    assert schedule.decay_at(1) == pytest.approx(1 - 2**-0.75) == pytest.approx(0.40539644)
    assert schedule.decay_at(9) == pytest.approx(1 - 10**-0.75) == pytest.approx(0.82217206)
    assert schedule.decay_at(999) == pytest.approx(1 - 1000**-0.75) == pytest.approx(0.99437659)
    assert schedule.decay_at(10_001) == 0.999
    slow = EMASchedule(decay=0.9999, warmup=True, warmup_gamma=2.0, warmup_power=2 / 3)
    assert slow.decay_at(2) == pytest.approx(1 - 2 ** (-2 / 3)) == pytest.approx(0.37003948)
    assert slow.decay_at(14) == pytest.approx(1 - 8 ** (-2 / 3)) == pytest.approx(0.75)


def test_without_warmup_first_update_copies_then_decay_is_constant() -> None:
    schedule = EMASchedule(decay=0.99)
    assert [schedule.decay_at(n) for n in (0, 1, 2, 500)] == [0.0, 0.99, 0.99, 0.99]


def test_updates_every_n_steps_after_start_step_and_epoch() -> None:
    every_three = EMASchedule(every_n_steps=3, start_step=4)
    assert [s for s in range(1, 13) if every_three.should_update(s, epoch=0)] == [6, 9, 12]
    every_step = EMASchedule()
    assert [s for s in range(1, 5) if every_step.should_update(s, epoch=0)] == [1, 2, 3, 4]
    from_epoch_one = EMASchedule(start_epoch=1)
    assert not from_epoch_one.should_update(7, epoch=0)
    assert from_epoch_one.should_update(8, epoch=1)


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"decay": 1.0}, "decay must be in"),
        ({"decay": -0.1}, "decay must be in"),
        ({"warmup_gamma": 0.0}, "warmup_gamma must be > 0"),
        ({"warmup_power": -1.0}, "warmup_power must be > 0"),
        ({"every_n_steps": 0}, "every_n_steps must be >= 1"),
        ({"start_step": -1}, "start_step must be >= 0"),
        ({"start_epoch": -2}, "start_epoch must be >= 0"),
    ],
)
def test_schedule_rejects_bad_settings(kwargs: dict, message: str) -> None:
    with pytest.raises(ValueError, match=message):
        EMASchedule(**kwargs)


def test_master_copy_is_float32_for_a_bf16_module_and_keeps_small_updates() -> None:
    model = TwoParams(torch.bfloat16)
    ema = ExponentialMovingAverage(model)
    ema.update(0.0)
    _set(model, a=[1.0 + 2**-7, 2.0], b=[4.0])  # representable in bf16
    ema.update(0.99)
    a = ema.state_dict()["a"]
    assert a.dtype == torch.float32 and model.a.dtype == torch.bfloat16
    # 1 + 0.01 * 2**-7 rounds to 1.0 in bf16; the float32 master keeps it.
    expected = torch.lerp(torch.tensor([1.0, 2.0]), model.a.float(), 1.0 - 0.99)
    assert torch.equal(a, expected) and a[0].item() != 1.0


def test_casting_in_chunks_gives_the_same_averages(monkeypatch: pytest.MonkeyPatch) -> None:
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(4, 3), nn.Linear(3, 5), nn.Linear(5, 2)).to(torch.bfloat16)
    whole = ExponentialMovingAverage(model)
    monkeypatch.setattr(ema_core, "_CAST_CHUNK_NUMEL", 10)
    chunked = ExponentialMovingAverage(model)
    assert len(chunked._groups) == 4 and len(whole._groups) == 1  # sizes 12 | 3, 15 | 5, 10 | 2
    for decay in (0.0, 0.9, 0.9):
        with torch.no_grad():
            for p in model.parameters():
                p.add_(torch.randn_like(p))
        whole.update(decay)
        chunked.update(decay)
    assert _equal_states(chunked.state_dict(), whole.state_dict())


def test_float_buffers_are_averaged_and_other_buffers_copied() -> None:
    model = WithBuffers()
    ema = ExponentialMovingAverage(model)
    ema.update(0.0)
    _set(model, w=[4.0], running=[0.0], count=7, mask=[False, True])
    ema.update(0.5)
    state = ema.state_dict()
    assert set(state) == {"w", "running", "count", "mask"}  # non-persistent buffers are not tracked
    assert state["w"].tolist() == [3.0] and state["running"].tolist() == [4.0]
    assert state["count"].dtype == torch.int64 and state["count"].item() == 7
    assert state["mask"].tolist() == [False, True]


def test_swap_in_loads_ema_and_swap_out_restores_training_weights_bit_for_bit() -> None:
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(4, 3), nn.Linear(3, 2)).to(torch.bfloat16)
    model.register_buffer("steps", torch.tensor(5))
    ema = ExponentialMovingAverage(model)
    ema.update(0.0)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(torch.randn_like(p))
    model.steps.fill_(6)
    ema.update(0.9)
    params = list(model.parameters())
    raw = {k: v.clone() for k, v in model.state_dict().items()}
    ema.swap_in()
    assert ema.swapped
    for name, value in model.state_dict().items():
        assert torch.equal(value, ema.state_dict()[name].to(value.dtype))
    ema.swap_out()
    assert not ema.swapped and all(a is b for a, b in zip(params, model.parameters(), strict=True))
    for name, value in model.state_dict().items():
        assert value.dtype == raw[name].dtype and torch.equal(value, raw[name])


def test_update_refuses_while_swapped_in() -> None:
    ema = ExponentialMovingAverage(TwoParams())
    ema.swap_in()
    with pytest.raises(RuntimeError, match="swapped"):
        ema.update(0.5)


def test_tied_tensor_is_averaged_once_under_every_name() -> None:
    model = TwoParams()
    model.c = model.a  # the same Parameter under a second name
    ema = ExponentialMovingAverage(model)
    ema.update(0.0)
    _set(model, a=[3.0, 6.0])
    ema.update(0.5)
    state = ema.state_dict()
    assert list(state) == list(model.state_dict()) == ["a", "b", "c"]
    assert state["a"].tolist() == state["c"].tolist() == [2.0, 4.0]


def test_state_round_trip_and_mismatched_state_is_rejected() -> None:
    model = TwoParams()
    ema = ExponentialMovingAverage(model)
    _set(model, a=[0.0, 0.0])
    ema.update(0.5)
    saved = {k: v.clone() for k, v in ema.state_dict().items()}
    other = ExponentialMovingAverage(TwoParams())
    other.load_state_dict(saved)
    assert all(torch.equal(other.state_dict()[k], saved[k]) for k in saved)
    with pytest.raises(ValueError, match=r"missing \['b'\], extra \['z'\]"):
        other.load_state_dict({"a": saved["a"], "z": saved["b"]})
    with pytest.raises(ValueError, match=r"'b' has shape \(2,\), expected \(1,\)"):
        other.load_state_dict({"a": saved["a"], "b": saved["a"]})


def test_reset_restarts_from_current_weights() -> None:
    model = TwoParams()
    ema = ExponentialMovingAverage(model, device="cpu")
    ema.update(0.0)
    _set(model, a=[9.0, 9.0])
    ema.reset()
    assert ema.num_updates == 0 and ema.state_dict()["a"].tolist() == [9.0, 9.0]


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _sharded_worker(rank: int, port: int, out: str) -> None:
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import fully_shard

    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    dist.init_process_group("gloo", rank=rank, world_size=2)
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(5, 3), nn.Linear(3, 1))  # uneven shards, one empty on rank 1
    fully_shard(model, mesh=init_device_mesh("cpu", (2,)))
    ema, schedule = ExponentialMovingAverage(model), EMASchedule(decay=0.8, warmup=True)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
    for step in range(4):
        model(torch.arange(10.0).reshape(2, 5) / (step + 1)).square().mean().backward()
        optimizer.step()
        optimizer.zero_grad()
        ema.update(schedule.decay_at(ema.num_updates))
    raw = [p.to_local().clone() for p in model.parameters()]
    ema.swap_in()
    swapped_in = [p.full_tensor() for p in model.parameters()]
    ema.swap_out()
    restored = all(torch.equal(p.to_local(), r) for p, r in zip(model.parameters(), raw, strict=True))
    state = ema.state_dict()
    shards = ema.state_dict(sharded=True)  # this rank's shards as DTensors, no gathering
    sharded_match = all(torch.equal(shards[k].full_tensor(), v) for k, v in state.items())
    ema.load_state_dict({k: v * 2 for k, v in state.items()})
    doubled = ema.state_dict()
    result = {"state": state, "swapped_in": swapped_in, "restored": restored, "doubled": doubled}
    result["sharded_match"] = torch.tensor(sharded_match)
    torch.save(result, f"{out}{rank}")
    dist.destroy_process_group()


@pytest.mark.slow
def test_sharded_ema_under_fsdp2_equals_single_process(tmp_path) -> None:
    out = str(tmp_path / "rank")
    mp.start_processes(_sharded_worker, args=(_free_port(), out), nprocs=2, start_method="spawn")
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(5, 3), nn.Linear(3, 1))
    ema, schedule = ExponentialMovingAverage(model), EMASchedule(decay=0.8, warmup=True)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
    for step in range(4):
        model(torch.arange(10.0).reshape(2, 5) / (step + 1)).square().mean().backward()
        optimizer.step()
        optimizer.zero_grad()
        ema.update(schedule.decay_at(ema.num_updates))
    expected = ema.state_dict()
    for rank in range(2):
        got = torch.load(f"{out}{rank}", weights_only=True)
        assert got["restored"] and bool(got["sharded_match"])
        for name, value in expected.items():
            torch.testing.assert_close(got["state"][name], value, rtol=0, atol=1e-6)
            torch.testing.assert_close(got["doubled"][name], 2 * got["state"][name], rtol=0, atol=0)
        for swapped, value in zip(got["swapped_in"], expected.values(), strict=True):
            torch.testing.assert_close(swapped, value, rtol=0, atol=1e-6)
