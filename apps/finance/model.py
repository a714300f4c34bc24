"""MIGA (Mixture of Expert with Group Aggregation, arXiv 2410.02241) and MLP/GRU/ALSTM/Transformer baselines.

No official MIGA code exists. From the paper [P]: style experts selected dynamically by a router, experts
organised in groups, **inner group attention** lets the experts of a group share information, "MIGA-Conv"
variant. Everything else is **our reading** (docs/finance.md §12): encoder -> top-k router over G x M experts
(``moe_core.routers.TopKRouter``) -> small expert heads (all computed; only the combine is sparse) -> residual
multi-head attention among the M experts of each group -> per-expert scalar read-out -> router-weighted sum.

Every model maps ``x (N, T, F)`` (one day's cross-section, T days of history) to a :class:`ModelOutput` with a
score per stock (a regression output, not a probability) and, for MIGA, the router decision.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Literal

import torch
from torch import nn

from moe_core.routers import NoisyTopKRouter, TopKRouter
from moe_core.types import RouterOutput

EncoderKind = Literal["linear", "conv1d", "gru", "lstm", "transformer"]


@dataclass
class ModelOutput:
    """score ``(N,)``; routing: the router's decision for the N stocks (MIGA only)."""

    score: torch.Tensor
    routing: RouterOutput | None = None


def _check_x(x: torch.Tensor, num_features: int, step_len: int | None = None) -> None:
    if x.dim() != 3 or x.shape[-1] != num_features:
        raise ValueError(f"x must have shape (N, T, F={num_features}), got {tuple(x.shape)}")
    if step_len is not None and x.shape[1] != step_len:
        raise ValueError(f"x has T={x.shape[1]} days, the model was built for step_len={step_len}")


class Encoder(nn.Module):
    """Per-stock encoder ``(N, T, F) -> (N, H)``.

    ``linear``: flatten the T x F window -> Linear. ``conv1d``: two temporal convolutions (kernel 3, causal
    padding) + last step — our guess at "MIGA-Conv". ``gru`` / ``lstm``: last hidden state (the unofficial
    MIGA code's router runs an RNN over the window). ``transformer``: Linear + learned positions + encoder
    layers, last token.
    """

    def __init__(
        self,
        *,
        kind: EncoderKind,
        num_features: int,
        step_len: int,
        hidden_dim: int,
        num_layers: int = 1,
        num_heads: int = 4,
        dropout: float = 0.0,
    ) -> None:
        super().__init__()
        if kind not in ("linear", "conv1d", "gru", "lstm", "transformer"):
            raise ValueError(f"encoder must be one of linear, conv1d, gru, lstm, transformer; got {kind!r}")
        self.kind, self.step_len = kind, step_len
        if kind == "linear":
            self.net = nn.Sequential(nn.Linear(step_len * num_features, hidden_dim), nn.LeakyReLU())
        elif kind == "conv1d":
            self.conv1 = nn.Conv1d(num_features, hidden_dim, 3, padding=2)
            self.conv2 = nn.Conv1d(hidden_dim, hidden_dim, 3, padding=2)
        elif kind in ("gru", "lstm"):
            self.net = (nn.GRU if kind == "gru" else nn.LSTM)(
                num_features,
                hidden_dim,
                num_layers=num_layers,
                batch_first=True,
                dropout=dropout if num_layers > 1 else 0.0,
            )
        else:
            self.inp = nn.Linear(num_features, hidden_dim)
            self.pos = nn.Parameter(torch.zeros(step_len, hidden_dim))
            layer = nn.TransformerEncoderLayer(
                hidden_dim, num_heads, 2 * hidden_dim, dropout, batch_first=True
            )
            self.net = nn.TransformerEncoder(layer, num_layers, enable_nested_tensor=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        n, t, _ = x.shape
        if self.kind == "linear":
            return self.net(x.reshape(n, -1))  # (N, T*F) -> (N, H)
        if self.kind == "conv1d":
            h = x.transpose(1, 2)  # (N, F, T)
            h = torch.relu(self.conv1(h))[..., :t]  # causal: keep the first T outputs of the padded conv
            h = torch.relu(self.conv2(h))[..., :t]  # (N, H, T)
            return h[..., -1]  # (N, H)
        if self.kind in ("gru", "lstm"):
            out, _ = self.net(x)  # (N, T, H)
            return out[:, -1]
        h = self.inp(x) + self.pos[:t]  # (N, T, H)
        return self.net(h)[:, -1]


class MIGA(nn.Module):
    """MIGA: encoder -> top-k router over ``num_groups x experts_per_group`` experts -> inner-group attention.

    Args:
        num_features: F. step_len: T.
        encoder: encoder kind (``conv1d`` = MIGA-Conv, our reading).
        hidden_dim: encoder width H.
        num_groups: G. experts_per_group: M. top_k: experts kept per stock (``k = G*M`` -> dense mixture).
        expert_dim: width d_e of each expert's output (1 reproduces the scalar form of the unofficial code).
        expert_type: ``linear`` or ``mlp`` expert heads.
        inner_attention: residual MHA among the M experts of each group [P: the mechanism; formula ours].
        attention_scope: ``all`` experts of the group as keys, or ``selected`` only (others masked as keys).
        attention_heads: heads of the inner attention (must divide ``expert_dim``).
        router_jitter: multiplicative input jitter of the router in training.
        router_noise: ``none`` (softmax top-k, ``moe_core.routers.TopKRouter``) or ``noisy_topk`` (Shazeer
            et al. 2017, ``moe_core.routers.NoisyTopKRouter``: learned input-dependent Gaussian noise on the
            logits in training only; clean logits in eval).
        market_context: ``none``, or ``cross_section``: the router also sees the day's market state
            ``m = mean_i x_i[-1]`` (cross-sectional mean of the day's last-step features, ``(F,)``) through
            ``h_i + U m`` with U zero-initialised (so training starts from the context-free router). Our
            reading of docs/finance.md §12's ``market_context`` (MASTER's 63 index features need amount data
            this project's markets lack); the scores then depend on the day's cross-section as a whole,
            still permutation-equivariant over stocks.
        dropout: encoder dropout.
    """

    def __init__(
        self,
        *,
        num_features: int = 157,
        step_len: int = 1,
        encoder: EncoderKind = "linear",
        hidden_dim: int = 64,
        num_groups: int = 2,
        experts_per_group: int = 4,
        top_k: int = 2,
        expert_dim: int = 8,
        expert_type: Literal["linear", "mlp"] = "linear",
        inner_attention: bool = True,
        attention_scope: Literal["all", "selected"] = "all",
        attention_heads: int = 2,
        router_jitter: float = 0.0,
        router_noise: Literal["none", "noisy_topk"] = "none",
        market_context: Literal["none", "cross_section"] = "none",
        encoder_layers: int = 1,
        dropout: float = 0.0,
    ) -> None:
        super().__init__()
        if router_noise not in ("none", "noisy_topk"):
            raise ValueError(f"router_noise must be 'none' or 'noisy_topk', got {router_noise!r}")
        if market_context not in ("none", "cross_section"):
            raise ValueError(f"market_context must be 'none' or 'cross_section', got {market_context!r}")
        if router_noise == "noisy_topk" and router_jitter:
            raise ValueError("router_jitter is for the plain top-k router; set router_noise='none' with it")
        if num_groups < 1 or experts_per_group < 1:
            raise ValueError(
                f"num_groups and experts_per_group must be >= 1, got {num_groups}, {experts_per_group}"
            )
        if expert_type not in ("linear", "mlp"):
            raise ValueError(f"expert_type must be 'linear' or 'mlp', got {expert_type!r}")
        if attention_scope not in ("all", "selected"):
            raise ValueError(f"attention_scope must be 'all' or 'selected', got {attention_scope!r}")
        if inner_attention and expert_dim % attention_heads:
            raise ValueError(f"attention_heads={attention_heads} must divide expert_dim={expert_dim}")
        self.num_features, self.step_len = num_features, step_len
        self.G, self.M = num_groups, experts_per_group
        self.num_experts = num_groups * experts_per_group
        self.expert_dim, self.expert_type = expert_dim, expert_type
        self.inner_attention, self.attention_scope = inner_attention, attention_scope
        self.encoder = Encoder(
            kind=encoder,
            num_features=num_features,
            step_len=step_len,
            hidden_dim=hidden_dim,
            num_layers=encoder_layers,
            num_heads=attention_heads,
            dropout=dropout,
        )
        if router_noise == "noisy_topk":
            self.router = NoisyTopKRouter(dim=hidden_dim, num_experts=self.num_experts, top_k=top_k)
        else:
            self.router = TopKRouter(
                dim=hidden_dim, num_experts=self.num_experts, top_k=top_k, jitter=router_jitter
            )
        self.router_noise, self.market_context = router_noise, market_context
        if market_context == "cross_section":
            self.context = nn.Linear(num_features, hidden_dim, bias=False)  # U
            nn.init.zeros_(self.context.weight)
        E, H, De = self.num_experts, hidden_dim, expert_dim
        bound = 1 / math.sqrt(H)
        if expert_type == "mlp":
            self.w1 = nn.Parameter(torch.empty(E, H, H).uniform_(-bound, bound))
            self.b1 = nn.Parameter(torch.zeros(E, H))
        self.w = nn.Parameter(
            torch.empty(E, H, De).uniform_(-bound, bound)
        )  # stacked expert heads (E, H, De)
        self.b = nn.Parameter(torch.zeros(E, De))
        self.attn = nn.MultiheadAttention(De, attention_heads, batch_first=True) if inner_attention else None
        self.readout = nn.Parameter(torch.empty(E, De).uniform_(-1 / math.sqrt(De), 1 / math.sqrt(De)))  # v_e
        self.readout_bias = nn.Parameter(torch.zeros(E))

    def experts(self, h: torch.Tensor) -> torch.Tensor:
        """All expert outputs ``z (N, E, De)`` from ``h (N, H)`` (dense: the experts are small heads)."""
        if self.expert_type == "mlp":
            h = torch.relu(torch.einsum("nh,ehk->nek", h, self.w1) + self.b1)  # (N, E, H)
            return torch.einsum("neh,ehd->ned", h, self.w) + self.b  # (N, E, De)
        return torch.einsum("nh,ehd->ned", h, self.w) + self.b  # (N, E, De)

    def group_attention(self, z: torch.Tensor, dense_w: torch.Tensor) -> torch.Tensor:
        """``Z'_g = Z_g + MHA(Z_g)`` in each group g. z ``(N, E, De)``; dense_w ``(N, E)`` combine weights."""
        if self.attn is None:
            return z
        n = z.shape[0]
        zg = z.reshape(
            n * self.G, self.M, self.expert_dim
        )  # (N*G, M, De): the M experts of a group are tokens
        key_mask = None
        if self.attention_scope == "selected":
            key_mask = (dense_w <= 0).reshape(n * self.G, self.M)  # True = ignore this expert as a key
            key_mask = key_mask & ~key_mask.all(
                dim=1, keepdim=True
            )  # a group with nothing selected: keep all
        a, _ = self.attn(zg, zg, zg, key_padding_mask=key_mask, need_weights=False)
        return (zg + a).reshape(n, self.num_experts, self.expert_dim)  # (N, E, De)

    def forward(self, x: torch.Tensor) -> ModelOutput:
        """x ``(N, T, F)`` -> score ``(N,)`` and the routing of the N stocks."""
        _check_x(x, self.num_features, self.step_len)
        h = self.encoder(x)  # (N, H)
        r_in = h
        if self.market_context == "cross_section":
            m = x[:, -1].mean(0)  # (F,) the day's market state
            r_in = h + self.context(m)  # (N, H) + (H,)
        routing = self.router(r_in)
        dense_w = routing.dense_weights().to(h.dtype)  # (N, E)
        z = self.group_attention(self.experts(h), dense_w)  # (N, E, De)
        y = (z * self.readout).sum(-1) + self.readout_bias  # (N, E): y_e = v_e^T z'_e
        return ModelOutput(score=(dense_w * y).sum(-1), routing=routing)


class MLP(nn.Module):
    """qlib-style MLP baseline on the last day's features (``x[:, -1]``)."""

    def __init__(
        self,
        *,
        num_features: int = 157,
        step_len: int = 1,
        hidden_dim: int = 64,
        num_layers: int = 2,
        dropout: float = 0.0,
    ) -> None:
        super().__init__()
        self.num_features, layers, d = num_features, [], num_features
        for _ in range(num_layers):
            layers += [nn.Linear(d, hidden_dim), nn.LeakyReLU(), nn.Dropout(dropout)]
            d = hidden_dim
        self.net = nn.Sequential(*layers, nn.Linear(d, 1))

    def forward(self, x: torch.Tensor) -> ModelOutput:
        _check_x(x, self.num_features)
        return ModelOutput(score=self.net(x[:, -1]).squeeze(-1))


class GRU(nn.Module):
    """GRU baseline (qlib ``pytorch_gru.py``): last hidden state -> Linear."""

    def __init__(
        self,
        *,
        num_features: int = 157,
        step_len: int = 1,
        hidden_dim: int = 64,
        num_layers: int = 1,
        dropout: float = 0.0,
    ) -> None:
        super().__init__()
        self.num_features = num_features
        self.rnn = nn.GRU(
            num_features,
            hidden_dim,
            num_layers=num_layers,
            batch_first=True,
            dropout=dropout if num_layers > 1 else 0.0,
        )
        self.fc = nn.Linear(hidden_dim, 1)

    def forward(self, x: torch.Tensor) -> ModelOutput:
        _check_x(x, self.num_features)
        out, _ = self.rnn(x)  # (N, T, H)
        return ModelOutput(score=self.fc(out[:, -1]).squeeze(-1))


class ALSTM(nn.Module):
    """ALSTM baseline (qlib ``pytorch_alstm.py``, arXiv 1704.02971 attention): input net -> GRU -> attention
    pooling over time, concatenated with the last hidden state -> Linear."""

    def __init__(
        self,
        *,
        num_features: int = 157,
        step_len: int = 1,
        hidden_dim: int = 64,
        num_layers: int = 1,
        dropout: float = 0.0,
    ) -> None:
        super().__init__()
        self.num_features = num_features
        self.inp = nn.Sequential(nn.Linear(num_features, hidden_dim), nn.Tanh())
        self.rnn = nn.GRU(
            hidden_dim,
            hidden_dim,
            num_layers=num_layers,
            batch_first=True,
            dropout=dropout if num_layers > 1 else 0.0,
        )
        self.att = nn.Sequential(
            nn.Linear(hidden_dim, hidden_dim // 2), nn.Tanh(), nn.Linear(hidden_dim // 2, 1)
        )
        self.fc = nn.Linear(2 * hidden_dim, 1)

    def forward(self, x: torch.Tensor) -> ModelOutput:
        _check_x(x, self.num_features)
        out, _ = self.rnn(self.inp(x))  # (N, T, H)
        a = torch.softmax(self.att(out), dim=1)  # (N, T, 1)
        pooled = (a * out).sum(1)  # (N, H)
        return ModelOutput(score=self.fc(torch.cat([out[:, -1], pooled], -1)).squeeze(-1))


class Transformer(nn.Module):
    """Transformer baseline (qlib ``pytorch_transformer.py``): Linear -> encoder over time -> last token."""

    def __init__(
        self,
        *,
        num_features: int = 157,
        step_len: int = 1,
        hidden_dim: int = 64,
        num_layers: int = 1,
        num_heads: int = 4,
        dropout: float = 0.0,
    ) -> None:
        super().__init__()
        self.num_features = num_features
        self.enc = Encoder(
            kind="transformer",
            num_features=num_features,
            step_len=step_len,
            hidden_dim=hidden_dim,
            num_layers=num_layers,
            num_heads=num_heads,
            dropout=dropout,
        )
        self.fc = nn.Linear(hidden_dim, 1)

    def forward(self, x: torch.Tensor) -> ModelOutput:
        _check_x(x, self.num_features)
        return ModelOutput(score=self.fc(self.enc(x)).squeeze(-1))
