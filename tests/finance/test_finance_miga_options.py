"""MIGA options of issue 18: the ``lstm`` encoder (against a hand-written LSTM recurrence), ``router_noise``
(noisy top-k: stochastic in training only, equal to the plain top-k router on the clean logits in eval) and
``market_context`` (zero context map = the context-free model; scores permutation-equivariant, and a stock's
score depends on the rest of the day only through the context)."""

from __future__ import annotations

import pytest
import torch

from apps.finance.model import MIGA, Encoder


def lstm_by_hand(x: torch.Tensor, lstm: torch.nn.LSTM) -> torch.Tensor:
    """Last hidden state of a 1-layer LSTM, gates in PyTorch's (i, f, g, o) order. x: (N, T, F)."""
    w_ih, w_hh, b = lstm.weight_ih_l0, lstm.weight_hh_l0, lstm.bias_ih_l0 + lstm.bias_hh_l0
    n, H = x.shape[0], lstm.hidden_size
    h, c = torch.zeros(n, H), torch.zeros(n, H)
    for t in range(x.shape[1]):
        z = x[:, t] @ w_ih.T + h @ w_hh.T + b  # (N, 4H)
        i, f, g, o = z.split(H, dim=1)
        c = torch.sigmoid(f) * c + torch.sigmoid(i) * torch.tanh(g)
        h = torch.sigmoid(o) * torch.tanh(c)
    return h


def test_lstm_encoder_is_the_last_hidden_state():
    torch.manual_seed(0)
    enc = Encoder(kind="lstm", num_features=6, step_len=5, hidden_dim=8)
    x = torch.randn(7, 5, 6)
    torch.testing.assert_close(enc(x), lstm_by_hand(x, enc.net), rtol=1e-5, atol=1e-6)
    m = MIGA(num_features=6, step_len=5, encoder="lstm", hidden_dim=8, expert_dim=4).eval()
    perm = torch.randperm(7)
    with torch.no_grad():
        torch.testing.assert_close(m(x[perm]).score, m(x).score[perm])
    with pytest.raises(ValueError, match="lstm"):
        Encoder(kind="rnn", num_features=6, step_len=5, hidden_dim=8)  # type: ignore[arg-type]


def test_router_noise_stochastic_in_training_clean_in_eval():
    torch.manual_seed(0)
    kw = dict(
        num_features=6, step_len=1, hidden_dim=8, num_groups=2, experts_per_group=2, top_k=2, expert_dim=4
    )
    noisy = MIGA(router_noise="noisy_topk", **kw)
    with torch.no_grad():
        noisy.router.gate.weight.normal_()
    plain = MIGA(**kw)
    state = {k: v for k, v in noisy.state_dict().items() if not k.startswith("router.noise")}
    plain.load_state_dict(state)
    x = torch.randn(30, 1, 6)
    noisy.eval(), plain.eval()
    with torch.no_grad():
        torch.testing.assert_close(noisy(x).score, plain(x).score)  # eval: the clean top-k decision
        noisy.train()
        a, b = noisy(x), noisy(x)
    assert not torch.equal(a.routing.logits, b.routing.logits)  # training: fresh noise each pass
    assert "load_probs" in a.routing.aux
    with pytest.raises(ValueError, match="router_noise"):
        MIGA(router_noise="gumbel", **kw)  # type: ignore[arg-type]


def test_market_context():
    torch.manual_seed(0)
    kw = dict(
        num_features=6, step_len=2, hidden_dim=8, num_groups=2, experts_per_group=2, top_k=1, expert_dim=4
    )
    ctx = MIGA(market_context="cross_section", **kw).eval()
    base = MIGA(**kw).eval()
    base.load_state_dict({k: v for k, v in ctx.state_dict().items() if not k.startswith("context")})
    x = torch.randn(20, 2, 6)
    with torch.no_grad():
        torch.testing.assert_close(ctx(x).score, base(x).score)  # U = 0 at init: no context effect
        ctx.context.weight.normal_(std=3.0)
        s = ctx(x).score
        perm = torch.randperm(20)
        torch.testing.assert_close(ctx(x[perm]).score, s[perm])  # permutation-equivariant
        # stock 0's own inputs unchanged, the rest of the day shifted: its score moves only with context
        y = x.clone()
        y[1:] += 2.0
        assert not torch.allclose(ctx(y).score[0], s[0])
        torch.testing.assert_close(base(y).score[0], base(x).score[0])
