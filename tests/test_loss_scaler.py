import pytest
import torch

from lowbit.train.loss_scaler import EnhancedLossScaler


def _setup():
    p = torch.nn.Parameter(torch.ones(3))
    opt = torch.optim.SGD([p], lr=0.1)
    return p, opt


def _step(scaler, p, opt, grad):
    opt.zero_grad()
    loss = (p * torch.tensor(grad)).sum()
    scaler.scale(loss).backward()
    stepped = scaler.step(opt)
    scaler.update()
    return stepped


def test_clean_step_unscales_and_steps():
    p, opt = _setup()
    s = EnhancedLossScaler(init_scale=8.0, growth_interval=100)
    assert _step(s, p, opt, [1.0, 2.0, 3.0])
    # gradient after unscaling is the true gradient: p -= 0.1 * g
    assert torch.allclose(p.detach(), torch.tensor([0.9, 0.8, 0.7]))
    assert s.loss_scale == 8.0


def test_overflow_skips_step_and_backs_off():
    p, opt = _setup()
    s = EnhancedLossScaler(init_scale=1024.0, min_scale=1.0, floor_interval=0)
    before = p.detach().clone()
    assert not _step(s, p, opt, [float("inf"), 1.0, 1.0])
    assert torch.equal(p.detach(), before)
    assert s.loss_scale == 512.0 and s.skipped_steps == 1
    assert not _step(s, p, opt, [float("nan"), 1.0, 1.0])
    assert s.loss_scale == 256.0 and s.skipped_steps == 2


def test_grows_after_clean_run():
    p, opt = _setup()
    s = EnhancedLossScaler(init_scale=4.0, growth_interval=3, floor_interval=0)
    for _ in range(2):
        _step(s, p, opt, [1e-3, 1e-3, 1e-3])
    assert s.loss_scale == 4.0
    _step(s, p, opt, [1e-3, 1e-3, 1e-3])
    assert s.loss_scale == 8.0


def test_never_below_rising_floor():
    p, opt = _setup()
    s = EnhancedLossScaler(
        init_scale=64.0, min_scale=4.0, floor_growth=2.0, floor_interval=5, max_floor=32.0,
        growth_interval=10**6,
    )
    floors, scales = [], []
    for i in range(40):
        _step(s, p, opt, [float("inf") if i % 2 == 0 else 1.0, 1.0, 1.0])
        floors.append(s.floor)
        scales.append(s.loss_scale)
        assert s.loss_scale >= s.floor
    # the floor rose in steps of 2 every 5 steps and stopped at max_floor
    assert floors[0] == 4.0 and floors[4] == 8.0 and floors[9] == 16.0 and floors[-1] == 32.0
    assert floors == sorted(floors)
    # repeated overflows pinned the scale to the floor rather than collapsing it
    assert scales[-1] == 32.0


def test_disabled_is_pass_through():
    p, opt = _setup()
    s = EnhancedLossScaler(enabled=False)
    assert _step(s, p, opt, [1.0, 1.0, 1.0]) and s.loss_scale == 1.0


def test_state_dict_round_trip():
    p, opt = _setup()
    s = EnhancedLossScaler(init_scale=16.0, growth_interval=2)
    for _ in range(3):
        _step(s, p, opt, [1.0, 1.0, 1.0])
    t = EnhancedLossScaler()
    t.load_state_dict(s.state_dict())
    assert t.state_dict() == s.state_dict()
    with pytest.raises(ValueError, match="missing keys"):
        t.load_state_dict({"scale": 1.0})


@pytest.mark.parametrize(
    "kwargs, match",
    [
        ({"init_scale": 0.0}, "init_scale"),
        ({"backoff_factor": 1.5}, "backoff_factor"),
        ({"growth_interval": 0}, "growth_interval"),
        ({"min_scale": 8.0, "init_scale": 4.0}, "min_scale <= init_scale"),
    ],
)
def test_bad_arguments(kwargs, match):
    with pytest.raises(ValueError, match=match):
        EnhancedLossScaler(**kwargs)


def test_double_unscale_is_an_error():
    p, opt = _setup()
    s = EnhancedLossScaler()
    s.scale((p * 1.0).sum()).backward()
    s.unscale_(opt)
    with pytest.raises(RuntimeError, match="already called"):
        s.unscale_(opt)
