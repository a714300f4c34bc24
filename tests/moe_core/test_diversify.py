"""Invariants of the diversification losses (DivDis arXiv 2202.03418, D-BAT arXiv 2202.04414)."""

from __future__ import annotations

import math

import pytest
import torch

from moe_core.diversify import (
    DiversifiedHeads,
    dbat_agreement_loss,
    disagreement_queries,
    diversification_loss,
    gaussian_mutual_information,
    marginal_kl_loss,
    mutual_information_loss,
    pairwise_mutual_information,
    scores_to_binary_probs,
    select_head,
    select_head_by_metric,
)


def _naive_mi(p1: torch.Tensor, p2: torch.Tensor) -> float:
    """Loop oracle: MI of the batch-averaged joint of two heads' predictions."""
    b, c = p1.shape
    joint = [[sum(float(p1[n, a] * p2[n, d]) for n in range(b)) / b for d in range(c)] for a in range(c)]
    m1 = [sum(joint[a][d] for d in range(c)) for a in range(c)]
    m2 = [sum(joint[a][d] for a in range(c)) for d in range(c)]
    return sum(
        joint[a][d] * math.log(joint[a][d] / (m1[a] * m2[d]))
        for a in range(c)
        for d in range(c)
        if joint[a][d] > 0
    )


def test_mi_matches_loop_oracle_and_is_symmetric_nonnegative():
    g = torch.Generator().manual_seed(0)
    probs = torch.randn(17, 3, 4, generator=g).mul(2).softmax(-1)
    mi = pairwise_mutual_information(probs)
    for i in range(3):
        for j in range(3):
            assert mi[i, j].item() == pytest.approx(_naive_mi(probs[:, i], probs[:, j]), abs=1e-5)
    assert torch.allclose(mi, mi.t(), atol=1e-6)
    assert (mi >= -1e-6).all()
    assert mutual_information_loss(probs).item() == pytest.approx(
        float((mi[0, 1] + mi[0, 2] + mi[1, 2]) / 3), abs=1e-6
    )


def test_mi_zero_for_independent_heads():
    # all four hard-label combinations once each: the two heads' predictions are independent
    a = torch.tensor([0, 0, 1, 1])
    b = torch.tensor([0, 1, 0, 1])
    probs = torch.stack([torch.eye(2)[a], torch.eye(2)[b]], dim=1)  # (4, 2, 2)
    assert mutual_information_loss(probs).item() == pytest.approx(0.0, abs=1e-7)
    # a head that predicts the same distribution for every row carries no information about the other
    const = torch.tensor([0.3, 0.7]).expand(4, 2)
    probs2 = torch.stack([torch.eye(2)[a], const], dim=1)
    assert mutual_information_loss(probs2).item() == pytest.approx(0.0, abs=1e-7)


def test_mi_closed_form_identical_deterministic_heads():
    # two identical hard balanced binary heads: MI = H(Y) = log 2; C balanced classes: log C
    for c in (2, 3, 5):
        y = torch.arange(c).repeat(4)
        p = torch.eye(c)[y]
        probs = torch.stack([p, p], dim=1)
        assert mutual_information_loss(probs).item() == pytest.approx(math.log(c), abs=1e-6)


def test_marginal_kl_zero_at_prior_and_positive_when_collapsed():
    y = torch.tensor([0, 1, 0, 1])
    probs = torch.eye(2)[y].unsqueeze(1)  # (4, 1, 2), balanced
    assert marginal_kl_loss(probs).item() == pytest.approx(0.0, abs=1e-7)
    collapsed = torch.tensor([[0.9, 0.1]]).expand(4, 2).unsqueeze(1)
    expected = 0.9 * math.log(0.9 / 0.5) + 0.1 * math.log(0.1 / 0.5)
    assert marginal_kl_loss(collapsed).item() == pytest.approx(expected, abs=1e-6)
    prior = torch.tensor([0.9, 0.1])
    assert marginal_kl_loss(collapsed, prior).item() == pytest.approx(0.0, abs=1e-6)


def test_dbat_closed_form_and_agree_vs_disagree():
    p1 = torch.tensor([[0.8, 0.2]])
    p2 = torch.tensor([[0.3, 0.7]])
    probs = torch.stack([p1, p2], dim=1)  # (1, 2, 2)
    assert dbat_agreement_loss(probs, eps=0).item() == pytest.approx(
        -math.log(0.8 * 0.7 + 0.2 * 0.3), abs=1e-6
    )
    agree = torch.stack([p1, p1], dim=1)
    disagree = torch.stack([torch.tensor([[0.99, 0.01]]), torch.tensor([[0.01, 0.99]])], dim=1)
    assert dbat_agreement_loss(agree) > dbat_agreement_loss(probs) > dbat_agreement_loss(disagree)
    assert dbat_agreement_loss(disagree).item() < 0.03


def test_dbat_multiclass_uses_first_heads_argmax():
    p1 = torch.tensor([[0.1, 0.6, 0.3]])
    p2 = torch.tensor([[0.5, 0.2, 0.3]])
    probs = torch.stack([p1, p2], dim=1)
    want = -math.log(0.6 * (1 - 0.2) + (1 - 0.6) * 0.2)
    assert dbat_agreement_loss(probs, eps=0).item() == pytest.approx(want, abs=1e-6)


def test_dbat_sequential_gradient_only_reaches_later_head():
    logits = torch.randn(8, 3, 2, requires_grad=True)
    dbat_agreement_loss(logits.softmax(-1)).backward()
    g = logits.grad.abs().sum((0, 2))
    assert g[0] == 0 and g[1] > 0 and g[2] > 0
    logits.grad = None
    dbat_agreement_loss(logits.softmax(-1), detach_earlier=False).backward()
    assert logits.grad[:, 0].abs().sum() > 0


def test_single_head_losses_are_zero_and_method_checked():
    probs = torch.rand(5, 1, 3).softmax(-1)
    assert mutual_information_loss(probs).item() == 0.0
    assert dbat_agreement_loss(probs).item() == 0.0
    with pytest.raises(ValueError, match="method must be one of"):
        diversification_loss(probs, method="nope")  # type: ignore[arg-type]
    with pytest.raises(ValueError, match=r"\(B, H, C\)"):
        mutual_information_loss(torch.rand(5, 3))


def test_gaussian_mi_matches_closed_form():
    g = torch.Generator().manual_seed(1)
    rho = 0.6
    z1, z2 = torch.randn(2, 200_000, generator=g)
    s = torch.stack([z1, rho * z1 + math.sqrt(1 - rho**2) * z2, torch.randn(200_000, generator=g)], dim=1)
    mi = gaussian_mutual_information(s)
    assert mi[0, 1].item() == pytest.approx(-0.5 * math.log(1 - rho**2), abs=0.01)
    assert mi[0, 2].item() == pytest.approx(0.0, abs=0.01)
    assert mi[0, 0].item() == 0.0


def test_scores_to_binary_probs_scale_invariant_and_orders():
    s = torch.tensor([[1.0], [2.0], [3.0], [10.0]])
    p = scores_to_binary_probs(s)
    assert torch.allclose(p.sum(-1), torch.ones(4, 1))
    assert (p[1:, 0, 1] > p[:-1, 0, 1]).all()
    assert torch.allclose(scores_to_binary_probs(5 * s + 7), p, atol=1e-6)


def test_selection_helpers():
    labels = torch.tensor([0, 1, 1, 0, 1])
    good = torch.eye(2)[labels] * 0.8 + 0.1
    bad = torch.eye(2)[1 - labels] * 0.8 + 0.1
    probs = torch.stack([bad, good, bad], dim=1)  # (5, 3, 2)
    assert select_head(probs, labels) == 1
    assert select_head_by_metric(torch.tensor([0.1, float("nan"), 0.3])) == 2
    assert select_head_by_metric(torch.tensor([0.1, 0.05, 0.3]), higher_is_better=False) == 1
    # only row 2 has disagreeing heads
    p = torch.tensor([[0.9, 0.1]]).expand(4, 2).clone()
    probs2 = torch.stack([p, p.clone()], dim=1)
    probs2[2, 1] = torch.tensor([0.1, 0.9])
    assert disagreement_queries(probs2, 1).tolist() == [2]


def _spurious_task(n: int, *, correlated: bool, gen: torch.Generator):
    y = torch.randint(0, 2, (n,), generator=gen)
    sign = 2.0 * y - 1
    core = sign * (0.1 + 0.9 * torch.rand(n, generator=gen))
    s_sign = sign if correlated else 2.0 * torch.randint(0, 2, (n,), generator=gen) - 1
    spur = s_sign * (1.0 + torch.rand(n, generator=gen))  # larger margin: what ERM latches onto
    return torch.stack([core, spur], dim=1), y


@pytest.mark.parametrize(("method", "weight"), [("divdis", 1.0), ("dbat", 0.1)])
def test_diversification_finds_core_cue_where_erm_does_not(method, weight):
    gen = torch.Generator().manual_seed(0)
    x_tr, y_tr = _spurious_task(512, correlated=True, gen=gen)
    x_un, _ = _spurious_task(512, correlated=False, gen=gen)
    x_te, y_te = _spurious_task(1024, correlated=False, gen=gen)
    x_val, y_val = _spurious_task(16, correlated=False, gen=gen)

    def fit(num_heads: int, weight: float) -> DiversifiedHeads:
        torch.manual_seed(0)
        heads = DiversifiedHeads(in_dim=2, num_heads=num_heads, num_classes=2)
        opt = torch.optim.Adam(heads.parameters(), lr=0.05)
        for _ in range(300):
            loss = heads.labelled_loss(heads(x_tr), y_tr)
            if weight:
                loss = loss + weight * diversification_loss(heads(x_un).softmax(-1), method=method)
            opt.zero_grad()
            loss.backward()
            opt.step()
        return heads

    erm, div = fit(1, 0.0), fit(2, weight)
    with torch.no_grad():
        erm_acc = (erm(x_te)[:, 0].argmax(-1) == y_te).float().mean().item()
        best = select_head(div(x_val).softmax(-1), y_val)
        div_acc = (div(x_te)[:, best].argmax(-1) == y_te).float().mean().item()
        train_acc = (div(x_tr).argmax(-1) == y_tr[:, None]).float().mean(0)
    assert erm_acc < 0.75
    assert div_acc > 0.9
    assert (train_acc > 0.95).all()


def test_regression_reading_decorrelates_score_heads_and_finds_the_core_feature():
    """Two score heads (e.g. stock scores), cues identical in training and independent at test: with DivDis
    on the 'above the cross-section mean' reading the heads split, and the head picked by its correlation on
    a few labelled test rows tracks the target."""
    g = torch.Generator().manual_seed(0)

    def data(n: int, correlated: bool):
        a = torch.randn(n, generator=g)
        b = a if correlated else torch.randn(n, generator=g)
        x = torch.stack([a, b, 0.3 * torch.randn(n, generator=g)], dim=1)
        return x, a + 0.1 * torch.randn(n, generator=g)

    x_tr, y_tr = data(512, True)
    x_un, _ = data(512, False)
    x_te, y_te = data(512, False)

    def fit(weight: float) -> torch.nn.Linear:
        torch.manual_seed(0)
        lin = torch.nn.Linear(3, 2)
        opt = torch.optim.Adam(lin.parameters(), lr=0.05)
        for _ in range(300):
            loss = ((lin(x_tr) - y_tr[:, None]) ** 2).mean()
            if weight:
                loss = loss + weight * diversification_loss(
                    scores_to_binary_probs(lin(x_un)), method="divdis"
                )
            opt.zero_grad()
            loss.backward()
            opt.step()
        return lin

    results = {}
    for weight in (0.0, 1.0):
        lin = fit(weight)
        with torch.no_grad():
            s = lin(x_te)  # (n, 2)
            c = torch.corrcoef(torch.cat([s.t(), y_te[None]]))  # heads and target
            val_corr = torch.stack(
                [torch.corrcoef(torch.stack([s[:32, h], y_te[:32]]))[0, 1] for h in range(2)]
            )
            best = select_head_by_metric(val_corr)
            results[weight] = (float(c[0, 1]), float(c[best, 2]))
    assert results[0.0][0] > 0.9 and results[1.0][0] < 0.5  # heads agree without, split with diversification
    assert results[0.0][1] < 0.7 < 0.85 < results[1.0][1]  # the selected head follows the core cue
