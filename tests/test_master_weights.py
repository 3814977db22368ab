import pytest
import torch

from lowbit.train.master_weights import MasterWeights, round_to_master


def test_nearest_drops_small_updates_but_stochastic_keeps_them_on_average():
    # a weight of 1.0 and an update of a quarter of an fp16 ulp (ulp(1) = 2^-10)
    n = 20000
    upd = 2.0**-12
    w = torch.ones(n)
    nearest = round_to_master(w + upd, "fp16", rounding="nearest")
    assert torch.equal(nearest, w)  # lost every time
    g = torch.Generator().manual_seed(0)
    sr = round_to_master(w + upd, "fp16", rounding="stochastic", generator=g)
    # only the two neighbours 1 and 1 + 2^-10 occur
    assert set(sr.unique().tolist()) <= {1.0, 1.0 + 2.0**-10}
    # unbiased: mean increment is upd; the std of the mean is 2^-10 * sqrt(p(1-p)/n)
    p = 0.25
    se = 2.0**-10 * (p * (1 - p) / n) ** 0.5
    assert abs((sr - w).mean().item() - upd) < 5 * se


def test_values_are_representable_and_packed_is_bit_identical():
    torch.manual_seed(0)
    model = torch.nn.Linear(16, 8)
    opt = MasterWeights(torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9), "fp16", seed=3)
    for _ in range(3):
        opt.zero_grad()
        model(torch.randn(4, 16)).pow(2).mean().backward()
        opt.step()
    for p, packed in zip(model.parameters(), opt.packed()):
        assert packed.dtype == torch.float16
        assert torch.equal(packed.float(), p.detach())


@pytest.mark.parametrize("dtype", ["fp16", "bf16"])
def test_reproducible_from_seed_and_resume(dtype):
    def run(steps, state=None, init=None):
        torch.manual_seed(0)
        model = torch.nn.Linear(8, 4)
        if init is not None:
            model.load_state_dict(init)
        opt = MasterWeights(torch.optim.Adam(model.parameters(), lr=1e-3), dtype, seed=7)
        if state is not None:
            opt.load_state_dict(state)
        gen = torch.Generator().manual_seed(1)
        for _ in range(steps):
            x = torch.randn(5, 8, generator=gen)
            opt.zero_grad()
            model(x).pow(2).mean().backward()
            opt.step()
        return model, opt

    a, _ = run(6)
    b, _ = run(6)
    assert all(torch.equal(p, q) for p, q in zip(a.state_dict().values(), b.state_dict().values()))
    # an interrupted run resumed from its state ends where the uninterrupted one does
    m1, o1 = run(3)
    torch.manual_seed(0)
    m2 = torch.nn.Linear(8, 4)
    m2.load_state_dict(m1.state_dict())
    o2 = MasterWeights(torch.optim.Adam(m2.parameters(), lr=1e-3), dtype, seed=123)
    o2.load_state_dict(o1.state_dict())
    gen = torch.Generator().manual_seed(1)
    for _ in range(3):
        torch.randn(5, 8, generator=gen)
    for _ in range(3):
        x = torch.randn(5, 8, generator=gen)
        o2.zero_grad()
        m2(x).pow(2).mean().backward()
        o2.step()
    assert all(torch.equal(p, q) for p, q in zip(a.state_dict().values(), m2.state_dict().values()))


def test_bad_arguments():
    opt = torch.optim.SGD([torch.nn.Parameter(torch.zeros(2))], lr=0.1)
    with pytest.raises(ValueError, match="master dtype"):
        MasterWeights(opt, "fp8")
    with pytest.raises(ValueError, match="rounding"):
        MasterWeights(opt, "fp16", rounding="up")
