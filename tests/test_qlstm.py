"""QLSTM: equal to nn.LSTM without quantization, k-bit grids with it, convert(), PTB training."""

from __future__ import annotations

import contextlib
import copy
import io
import math
import warnings

import pytest
import torch
from torch import nn

from lowbit.nn import convert, weight_spec
from lowbit.nn.modules import QLinear
from lowbit.nn.qlstm import QLSTM
from lowbit.quant import fake_quantize

CONFIGS = [
    dict(),
    dict(num_layers=2),
    dict(num_layers=2, bidirectional=True),
    dict(batch_first=True),
    dict(bias=False, num_layers=2),
]


@contextlib.contextmanager
def _native_lstm():
    """ATen's own LSTM loop (oneDNN off): QLSTM must equal it bit for bit."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # oneDNN's TF32 note when the flags are set
        with torch.backends.mkldnn.flags(enabled=False):
            yield


def _pair(cfg: dict, seed: int = 0) -> tuple[nn.LSTM, QLSTM]:
    torch.manual_seed(seed)
    ref = nn.LSTM(5, 7, **cfg)
    return ref, QLSTM.from_float(copy.deepcopy(ref))


def _inputs(ref: nn.LSTM, seed: int = 1, t: int = 6, b: int = 3):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn((b, t, 5) if ref.batch_first else (t, b, 5), generator=g)
    n = ref.num_layers * (2 if ref.bidirectional else 1)
    h = torch.randn(n, b, 7, generator=g)
    c = torch.randn(n, b, 7, generator=g)
    return x, (h, c)


@pytest.mark.parametrize("cfg", CONFIGS, ids=lambda c: ",".join(c) or "default")
def test_unquantized_equals_nn_lstm_bit_for_bit(cfg):
    ref, q = _pair(cfg)
    x, (h, c) = _inputs(ref)
    xs = [x.clone().requires_grad_(True) for _ in range(2)]
    with _native_lstm():
        out_r, (h_r, c_r) = ref(xs[0], (h, c))
        out_q, (h_q, c_q) = q(xs[1], (h, c))
    assert torch.equal(out_r, out_q) and torch.equal(h_r, h_q) and torch.equal(c_r, c_q)
    g = torch.randn_like(out_r)
    (out_r * g).sum().backward()
    (out_q * g).sum().backward()
    assert torch.equal(xs[0].grad, xs[1].grad)
    for (name, p_r), (_, p_q) in zip(ref.named_parameters(), q.named_parameters()):
        assert torch.equal(p_r.grad, p_q.grad), name


def test_unquantized_matches_default_lstm_to_float_tolerance():
    """With torch's default CPU path (oneDNN when available) the sums differ in order only."""
    ref, q = _pair(dict(num_layers=2, bidirectional=True, batch_first=True))
    x, state = _inputs(ref, t=12)
    out_r, (h_r, c_r) = ref(x, state)
    out_q, (h_q, c_q) = q(x, state)
    for a, b in ((out_r, out_q), (h_r, h_q), (c_r, c_q)):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6)


def test_unbatched_and_default_state():
    ref, q = _pair(dict(num_layers=2))
    x = torch.randn(4, 5)
    with _native_lstm():
        out_r, (h_r, c_r) = ref(x)
        out_q, (h_q, c_q) = q(x)
    assert out_q.shape == (4, 7) and h_q.shape == (2, 7)
    assert torch.equal(out_r, out_q) and torch.equal(h_r, h_q) and torch.equal(c_r, c_q)


def test_quantized_weights_equal_lstm_on_fake_quantized_weights():
    """Weights only (int4 per gate row): an nn.LSTM holding fake_quantize(W) gives the same."""
    ref, _ = _pair(dict(num_layers=2))
    q = QLSTM.from_float(ref, weight=weight_spec("int4"))  # per channel, max |w|
    fq = copy.deepcopy(ref)
    with torch.no_grad():
        for name, p in fq.named_parameters():
            if name.startswith("weight_"):
                p.copy_(fake_quantize(p, "int4", axis=0))
    x, state = _inputs(ref)
    with _native_lstm():
        assert torch.equal(fq(x, state)[0], q(x, state)[0])
    assert q.weight_format == "int4" and q.act_format == "fp32"


@pytest.mark.parametrize("act,levels", [("uint2", 1), ("uint4", 7), ("int3", 3)])
def test_hidden_state_and_outputs_on_the_k_bit_grid(act, levels):
    """h = j / (2^(k-1) - 1): at most 2^k - 1 values in [-1, 1], for every time step."""
    ref, _ = _pair(dict(num_layers=2))
    q = QLSTM.from_float(ref, weight="int4", act=act)
    x, state = _inputs(ref, t=10)
    out, (h, c) = q(x, state)
    for t in (out.detach(), h.detach()):
        assert torch.equal(t, _grid(t, levels))
    assert not torch.equal(c.detach(), _grid(c.detach(), levels))  # the cell state stays float
    assert float(out.detach().abs().max()) <= 1.0
    assert torch.unique(out).numel() <= 2 * levels + 1


def _grid(t: torch.Tensor, levels: int) -> torch.Tensor:
    """Nearest point of the grid j * float32(1 / levels)."""
    step = torch.tensor(1 / levels, dtype=torch.float32)
    return torch.round(t / step) * step


def test_gate_grids_and_straight_through_gradient():
    """Gates: [0, 1] onto j / (2^k - 1), [-1, 1] onto j / (2^(k-1) - 1), identity STE."""
    q = QLSTM(3, 4, act="uint3")
    u = torch.linspace(0, 1, 101, requires_grad=True)
    s = torch.linspace(-1, 1, 101, requires_grad=True)
    yu, ys = q._unit(u), q._signed(s)
    assert torch.equal(yu, _grid(u.detach(), 7))
    assert torch.equal(ys, _grid(s.detach(), 3))
    (yu.sum() + ys.sum()).backward()
    assert torch.equal(u.grad, torch.ones_like(u)) and torch.equal(s.grad, torch.ones_like(s))
    b = QLSTM(3, 4, act="binary")
    assert set(b._unit(u.detach()).tolist()) == {0.0, 1.0}
    assert set(b._signed(s.detach()).tolist()) == {-1.0, 1.0}
    f = QLSTM(3, 4, act="e4m3")
    assert torch.equal(f._unit(u.detach()), u.detach().to(torch.float8_e4m3fn).float())
    assert QLSTM(3, 4, act="uint3", quantize_gates=False)._unit(u) is u


def test_gradient_quantizer_changes_backward_only():
    ref, _ = _pair(dict())
    plain = QLSTM.from_float(copy.deepcopy(ref), weight="int4")
    g6 = QLSTM.from_float(copy.deepcopy(ref), weight="int4", grad="int6")
    x, state = _inputs(ref)
    outs = [m(x, state)[0] for m in (plain, g6)]
    assert torch.equal(outs[0], outs[1])
    for o in outs:
        o.square().sum().backward()
    assert not torch.equal(plain.weight_hh_l0.grad, g6.weight_hh_l0.grad)
    assert "grad=int6" in repr(g6)


def test_from_float_shares_parameters_and_state_dict_keys():
    ref = nn.LSTM(5, 7, 2)
    q = QLSTM.from_float(ref, weight="int2", act="uint2")
    for name, p in ref.named_parameters():
        assert getattr(q, name) is p
    assert set(ref.state_dict()) <= set(q.state_dict())
    q.train()
    q(torch.randn(3, 2, 5))  # observers see a batch
    buf = io.BytesIO()
    torch.save(q, buf)
    buf.seek(0)
    again = torch.load(buf, weights_only=False).eval()
    x = torch.randn(3, 2, 5)
    assert torch.equal(again(x)[0], copy.deepcopy(q).eval()(x)[0])


def test_convert_swaps_lstm_and_keeps_first_last_rule_for_linear():
    from lowbit.models import create

    torch.manual_seed(0)
    model = create("lstm_lm", num_classes=50, hidden=16, layers=2)
    q = convert(model, "w3a3")
    assert type(q.rnn) is QLSTM and q.rnn.weight_format == "int3"
    assert q.rnn.act_format == "uint3"
    assert isinstance(q.decoder, QLinear) and q.decoder.weight_quant.fmt.name == "int8"
    assert type(model.rnn) is nn.LSTM  # not in place
    same = convert(model, "w4a4", first_last="same")
    assert same.decoder.weight_quant.fmt.name == "int4"
    tokens = torch.randint(0, 50, (6, 2))
    logits, (h, c) = q(tokens)
    assert logits.shape == (6, 2, 50) and h.shape == (2, 2, 16)


@pytest.mark.parametrize("scheme,wfmt,afmt,bits", [("w2a2", "int2", "uint2", 2),
                                                   ("w4a4", "int4", "uint4", 4),
                                                   ("w1a1", "binary", "binary", 1)])
def test_summary_shows_qlstm_formats_and_memory(scheme, wfmt, afmt, bits):
    from lowbit.nn import QLSTM as exported
    from lowbit.nn import summary

    assert exported is QLSTM
    torch.manual_seed(0)
    lstm = nn.LSTM(5, 7, 2, bidirectional=True)
    q = convert(nn.ModuleDict({"rnn": lstm}), scheme)["rnn"]
    lines: list[str] = []
    (row,) = summary(q, print_fn=lines.append)
    weights = sum(p.numel() for n, p in lstm.named_parameters() if n.startswith("weight_"))
    biases = sum(p.numel() for n, p in lstm.named_parameters() if n.startswith("bias_"))
    assert weights == 2 * (4 * 7 * 5 + 4 * 7 * 7 + 4 * 7 * 14 + 4 * 7 * 7) and biases == 8 * 4 * 7
    assert (row["type"], row["weight_format"], row["act_format"]) == ("QLSTM", wfmt, afmt)
    assert row["params"] == weights + biases and row["weight_bits"] == bits
    assert row["memory_bytes"] == (weights * bits + biases * 32) / 8
    assert row["fp32_bytes"] == (weights + biases) * 4
    assert wfmt in lines[0] and afmt in lines[0]
    (plain,) = summary(lstm, print_fn=None)  # the float LSTM: everything at 32 bits
    assert plain["memory_bytes"] == plain["fp32_bytes"] and plain["weight_bits"] == 32


def test_errors_name_the_argument():
    with pytest.raises(ValueError, match="proj_size"):
        QLSTM.from_float(nn.LSTM(4, 6, proj_size=3))
    with pytest.raises(TypeError, match="nn.LSTM"):
        QLSTM.from_float(nn.GRU(4, 6))
    with pytest.raises(ValueError, match="gemm"):
        QLSTM.from_float(nn.LSTM(4, 6), gemm="other")
    with pytest.raises(TypeError, match="quantize_gates"):
        QLSTM(4, 6, quantize_gates=1)
    q = QLSTM(4, 6)
    with pytest.raises(ValueError, match="features"):
        q(torch.randn(3, 2, 5))
    with pytest.raises(ValueError, match="hx"):
        q(torch.randn(3, 2, 4), (torch.zeros(1, 3, 6), torch.zeros(1, 3, 6)))
    with pytest.raises(ValueError, match="2-D"):
        q(torch.randn(4))
    packed = nn.utils.rnn.pack_padded_sequence(torch.randn(3, 2, 4), [3, 2])
    with pytest.raises(TypeError, match="PackedSequence"):
        q(packed)


def _train_lm(tokens: torch.Tensor, vocab: int, scheme: str) -> list[float]:
    """Three passes of Adam over ``tokens`` (batch 20, bptt 30); the training losses."""
    from lowbit.data import lm_batches
    from lowbit.models import create

    torch.manual_seed(0)
    model = convert(create("lstm_lm", num_classes=vocab, hidden=64, layers=1, dropout=0.0),
                    scheme, first_last="fp32")
    assert (type(model.rnn) is QLSTM) == (scheme != "fp32")
    opt = torch.optim.Adam(model.parameters(), lr=1e-2)
    losses = []
    for _ in range(3):
        state = None
        for x, y in lm_batches(tokens, 20, 30):
            if state is not None:
                state = tuple(s.detach() for s in state)
            logits, state = model(x, state)
            loss = nn.functional.cross_entropy(logits.reshape(-1, vocab), y.reshape(-1))
            opt.zero_grad()
            loss.backward()
            opt.step()
            losses.append(float(loss.detach()))
    return losses


def test_w4a4_lstm_lm_trains_on_a_ptb_slice(shared_datasets):
    """A 4-bit LSTM language model on 6,000 real PTB tokens (90 steps): the training loss
    falls from ln(vocab) = 8.7 by more than 2.5 nats and ends within 0.2 nats of its FP32
    twin (measured: 5.98 vs 5.96)."""
    from lowbit.data import get_dataset

    if not (shared_datasets / "ptb" / "ptb.valid.txt").is_file():
        pytest.skip("PTB text not in the shared datasets")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # the valid split stands in for the missing train
        corpus = get_dataset("ptb", root=shared_datasets)
    tokens, vocab = corpus.train[:6000], len(corpus.vocab)
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        q = _train_lm(tokens, vocab, "w4a4")
        fp = _train_lm(tokens, vocab, "fp32")
    finally:
        torch.set_num_threads(threads)
    last_q, last_fp = sum(q[-10:]) / 10, sum(fp[-10:]) / 10
    assert q[0] == pytest.approx(math.log(vocab), abs=0.1)
    assert last_q < q[0] - 2.5
    assert last_q - last_fp < 0.2, (last_q, last_fp)
