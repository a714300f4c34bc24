"""C3PO: routing override, kernel regression, neighbourhood gradient descent."""

import math

import pytest
import torch

from moe_core.blocks import find_moe_blocks
from moe_core.inference.c3po import (
    collect_pathways,
    critical_blocks,
    kernel_regression,
    neighbourhood_gd,
    remix,
    remixed_logits,
)
from moe_core.inference.override import RoutingOverride, last_token_index


def _block_outputs(model, ids):
    outs = []
    hooks = [
        r.block.register_forward_hook(
            lambda m, i, o: outs.append(o if isinstance(o, torch.Tensor) else o.output)
        )
        for r in find_moe_blocks(model)
    ]
    with torch.no_grad():
        logits = model(ids)
    for h in hooks:
        h.remove()
    return (logits if isinstance(logits, torch.Tensor) else logits.logits), outs


@pytest.mark.parametrize("kind", ["moekit", "olmoe", "mixtral"])
def test_override_with_own_routing_changes_nothing(tiny_lm, hf_moe, kind):
    model = tiny_lm() if kind == "moekit" else hf_moe(kind, 2)
    ids = torch.randint(0, 31, (3, 8))
    blocks = critical_blocks(len(find_moe_blocks(model)), 2)
    own = collect_pathways(model, ids, blocks=blocks)  # (B, L, E)
    want, _ = _block_outputs(model, ids)
    with torch.no_grad():
        got = remixed_logits(model, ids, own, blocks=blocks)
    assert torch.equal(got, want)


def test_untouched_layers_and_positions_are_bit_identical(tiny_lm):
    model = tiny_lm()
    ids = torch.randint(0, 31, (2, 6))
    want_logits, want = _block_outputs(model, ids)
    e = find_moe_blocks(model)[-1].router.num_experts
    omega = torch.softmax(torch.randn(2, e) * 3, -1)
    with RoutingOverride(model, omegas={-1: omega}, token_index=last_token_index(2, 6)):
        got_logits, got = _block_outputs(model, ids)
    for a, b in zip(got[:-1], want[:-1]):
        assert torch.equal(a, b)  # earlier layers
    # other positions of the overridden layer keep their routing; their values can differ in the last ulp only
    # because an expert's matmul then sees a different number of rows (BLAS blocking), hence allclose here
    torch.testing.assert_close(got[-1][:, :-1], want[-1][:, :-1], rtol=1e-6, atol=1e-7)
    assert not torch.allclose(got[-1][:, -1], want[-1][:, -1], atol=1e-4)  # the override did something
    torch.testing.assert_close(got_logits[:, :-1], want_logits[:, :-1], rtol=1e-6, atol=1e-7)
    with pytest.raises(ValueError, match="omega"):
        with RoutingOverride(model, omegas={0: omega[:1]}, token_index=last_token_index(2, 6)):
            model(ids)


def _kernel_regression_loop(query, refs, paths, k, kernel, bandwidth=1.0):
    """Oracle: one query at a time, plain Python over the references, float64.

    C3PO (tianyi-lab/C3PO olmoe_optimizer.py): the k references nearest the query (largest cosine similarity,
    or smallest Euclidean distance for the Gaussian kernel), weights ``K_i / sum_j K_j`` with
    ``K = max(cos, 1e-6)`` or ``exp(-d^2 / (2 h^2))``, pathway ``sum_i weight_i * pathway_i``.
    """
    out = []
    for q in query.double():
        scored = []
        for i, r in enumerate(refs.double()):
            if kernel == "cosine":
                cos = float(q @ r) / (math.sqrt(float(q @ q)) * math.sqrt(float(r @ r)))
                scored.append((-cos, i, max(cos, 1e-6)))  # sort key: most similar first
            else:
                d = math.sqrt(float(((q - r) ** 2).sum()))
                scored.append((d, i, math.exp(-(d**2) / (2 * bandwidth**2))))
        nearest = sorted(scored)[:k]
        total = sum(w for _, _, w in nearest)
        mixed = sum((w / total) * paths[i].double() for _, i, w in nearest)  # (L, E)
        out.append(mixed / mixed.sum(-1, keepdim=True))
    return torch.stack(out)  # (Q, L, E)


@pytest.mark.parametrize("kernel,bandwidth", [("cosine", 1.0), ("gaussian", 1.0), ("gaussian", 3.0)])
@pytest.mark.parametrize("k", [2, 3, 7])
def test_kernel_regression_matches_loop_oracle(kernel, bandwidth, k):
    """Top-k > 1: the weighted average over the right neighbours with the right kernel weights. k = 7 = S
    takes every reference, so references with negative cosine similarity enter with the 1e-6 floor."""
    g = torch.Generator().manual_seed(11)
    refs = torch.randn(7, 5, generator=g)
    paths = torch.softmax(2 * torch.randn(7, 3, 4, generator=g), -1)
    query = torch.cat([refs[[1, 4]] + 0.3 * torch.randn(2, 5, generator=g), torch.randn(3, 5, generator=g)])
    got = kernel_regression(query, refs, paths, k=k, kernel=kernel, bandwidth=bandwidth)
    want = _kernel_regression_loop(query, refs, paths, k, kernel, bandwidth)
    assert got.shape == (5, 3, 4)
    torch.testing.assert_close(got.double(), want, rtol=1e-5, atol=1e-6)
    if k < 7:  # the comparison can see the neighbour set: one neighbour fewer gives a different answer
        fewer = _kernel_regression_loop(query, refs, paths, k - 1, kernel, bandwidth)
        assert not torch.allclose(got.double(), fewer, atol=1e-3)


def test_kernel_regression_k1_returns_the_neighbour_and_stays_on_the_simplex():
    torch.manual_seed(0)
    refs, paths = torch.randn(7, 5), torch.softmax(torch.randn(7, 3, 4), -1)
    q = refs[[2, 5]] + 0.01 * torch.randn(2, 5)
    torch.testing.assert_close(kernel_regression(q, refs, paths, k=1), paths[[2, 5]])
    for kernel in ("cosine", "gaussian"):
        out = kernel_regression(q, refs, paths, k=3, kernel=kernel)
        assert (out >= 0).all()
        torch.testing.assert_close(out.sum(-1), torch.ones(2, 3))
    with pytest.raises(ValueError, match="kernel"):
        kernel_regression(q, refs, paths, kernel="rbf")
    with pytest.raises(ValueError, match="k must"):
        kernel_regression(q, refs, paths, k=8)


def test_remix_alpha_one_is_identity_and_core_experts_keep_other_entries():
    torch.manual_seed(0)
    w, w_hat = torch.softmax(torch.randn(4, 6), -1), torch.softmax(torch.randn(4, 6), -1)
    assert torch.equal(remix(w, w_hat, alpha=1.0), w)
    out = remix(w, w_hat, alpha=0.0, core_experts=2)
    core = torch.zeros_like(w, dtype=torch.bool).scatter(-1, w_hat.topk(2, -1).indices, True)
    assert torch.equal(out[~core], w[~core])
    torch.testing.assert_close(out.sum(-1), w.sum(-1))


def test_neighbourhood_gd_decreases_the_neighbours_loss(tiny_lm):
    model = tiny_lm()
    ids = torch.randint(0, 31, (1, 8))
    target = torch.tensor([3])
    blocks = critical_blocks(len(find_moe_blocks(model)), 2)
    omega0 = collect_pathways(model, ids, blocks=blocks)[0]
    params = [p.detach().clone() for p in model.parameters()]
    omega, losses = neighbourhood_gd(model, omega0, ids, target, blocks=blocks, steps=5, lr=0.5)
    assert losses[-1] < losses[0]
    torch.testing.assert_close(omega.sum(-1), torch.ones(len(blocks)))
    assert all(torch.equal(a, b) for a, b in zip(params, model.parameters()))  # model frozen
    assert all(p.requires_grad for p in model.parameters())  # and restored


# ---- mode finding and generation with the re-mixed routing at every step


def test_mode_finding_nearest_reference_and_simplex():
    from moe_core.inference.c3po import mode_finding

    g = torch.Generator().manual_seed(0)
    refs = torch.randn(5, 2, 4, generator=g).mul(3).softmax(-1)
    omega = refs[3] + 0.01 * torch.rand(2, 4, generator=g)
    omega = (omega / omega.sum(-1, keepdim=True))[None]  # (1, 2, 4) close to reference 3
    near = mode_finding(omega, refs, k=1, alpha=0.0, steps=1)
    assert torch.allclose(near[0], refs[3])
    multi = mode_finding(omega, refs, k=3, alpha=0.5, steps=3)
    assert torch.allclose(multi.sum(-1), torch.ones(1, 2))
    # alpha = 1 keeps the pathway
    assert torch.allclose(mode_finding(omega, refs, k=3, alpha=1.0, steps=2), omega)


def test_mode_finding_converges_to_a_cluster_mean():
    from moe_core.inference.c3po import mode_finding

    g = torch.Generator().manual_seed(1)
    centre = torch.tensor([[0.7, 0.1, 0.1, 0.1]])
    cluster = (centre + 0.02 * torch.randn(6, 1, 4, generator=g)).clamp_min(0.01)
    cluster = cluster / cluster.sum(-1, keepdim=True)
    far = torch.tensor([[[0.05, 0.05, 0.05, 0.85]]]).expand(6, 1, 4)
    refs = torch.cat([cluster, far])  # (12, 1, 4)
    start = torch.tensor([[[0.5, 0.2, 0.2, 0.1]]])
    out = mode_finding(start, refs, k=6, alpha=0.0, steps=5, kernel="gaussian", bandwidth=0.3)
    assert torch.allclose(out[0], cluster.mean(0), atol=1e-4)


def _step_oracle(model, ids, pathways, blocks, positions, prompt_len=None):
    """One greedy step with the override rows built by hand."""
    b, t = ids.shape
    first = {"all": 0, "last": t - 1, "generated": (prompt_len or t) - 1}[positions]
    cols = list(range(first, t))
    rows = torch.tensor([i * t + c for i in range(b) for c in cols])
    omegas = {blk: pathways[:, i].repeat_interleave(len(cols), dim=0) for i, blk in enumerate(blocks)}
    with torch.no_grad(), RoutingOverride(model, omegas=omegas, token_index=rows):
        out = model(ids)
    return out if isinstance(out, torch.Tensor) else out.logits


@pytest.mark.parametrize("positions", ["generated", "all", "last"])
def test_c3po_generate_applies_the_pathway_at_every_step(tiny_lm, positions):
    from moe_core.inference.c3po import c3po_generate

    model = tiny_lm()
    ids = torch.randint(0, 31, (2, 5))
    blocks = critical_blocks(len(find_moe_blocks(model)), 2)
    e = find_moe_blocks(model)[-1].router.num_experts
    path = torch.randn(2, len(blocks), e, generator=torch.Generator().manual_seed(3)).mul(3).softmax(-1)
    out = c3po_generate(model, ids, path, blocks=blocks, max_new_tokens=4, positions=positions)
    cur = ids
    for _ in range(4):  # oracle: re-apply the override on the re-run window at each step
        logits = _step_oracle(model, cur, path, blocks, positions, prompt_len=5)
        cur = torch.cat([cur, logits[:, -1].argmax(-1, keepdim=True)], 1)
    assert torch.equal(out, cur)


def test_generated_positions_differ_from_all_and_last(tiny_lm):
    model = tiny_lm()
    ids = torch.randint(0, 31, (2, 8))
    blocks = critical_blocks(len(find_moe_blocks(model)), 2)
    e = find_moe_blocks(model)[-1].router.num_experts
    path = torch.randn(2, len(blocks), e, generator=torch.Generator().manual_seed(4)).mul(3).softmax(-1)
    # a window of 8 whose prompt was 5 tokens: "generated" overrides positions 4..7
    gen = _step_oracle(model, ids, path, blocks, "generated", prompt_len=5)[:, -1]
    assert not torch.allclose(gen, _step_oracle(model, ids, path, blocks, "all")[:, -1])
    assert not torch.allclose(gen, _step_oracle(model, ids, path, blocks, "last")[:, -1])


def test_lm_app_generate_with_own_pathway_equals_plain_greedy():
    from apps.lm.generate import generate
    from apps.lm.model import LMConfig, TransformerLM

    class CharTok:
        def encode(self, s):
            return [ord(c) % 29 for c in s]

        def decode(self, ids):
            return "".join(chr(97 + i % 26) for i in ids)

    torch.manual_seed(0)
    cfg = LMConfig(
        vocab_size=29, context_len=24, dim=16, n_layers=3, n_heads=2, ffn_hidden=32, ffn="moe",
        num_experts=6, top_k=2, expert_backend="loop",
    )  # fmt: skip
    model = TransformerLM(config=cfg).eval()
    with torch.no_grad():
        for ref in find_moe_blocks(model):
            ref.router.gate.weight.normal_(0, 1.0)
            for p in ref.experts.parameters():
                p.mul_(30)  # make the experts matter for the logits of this untrained model
    tok = CharTok()
    plain = generate(model, tok, "hello", max_new_tokens=6, greedy=True)
    e = cfg.num_experts
    other = torch.zeros(3, e)
    other[:, 4] = 0.5
    other[:, 5] = 0.5  # force experts 4 and 5 in every block for every token
    forced = generate(model, tok, "hello", max_new_tokens=6, greedy=True, routing_pathway=other)
    ids = torch.tensor([tok.encode("hello")])
    from moe_core.inference.c3po import c3po_generate
    from moe_core.inference.scmoe import greedy_generate

    c3po_ids = c3po_generate(model, ids, other[None], blocks=[0, 1, 2], max_new_tokens=6)
    assert forced == tok.decode(c3po_ids[0].tolist())
    assert plain == tok.decode(greedy_generate(model, ids, max_new_tokens=6)[0].tolist())
    assert forced != plain  # the forced routing changed the text
    # a prompt that slides out of the 24-token window: the override keeps following the prompt's end
    long_prompt = "abcdefghijklmnopqrst"  # 20 tokens, 10 new -> the window drops the first 6
    got = generate(model, tok, long_prompt, max_new_tokens=10, greedy=True, routing_pathway=other)
    cur = torch.tensor([tok.encode(long_prompt)])
    for _ in range(10):
        window = cur[:, -24:]
        offset = cur.shape[1] - window.shape[1]
        logits = _step_oracle(model, window, other[None], [0, 1, 2], "generated", prompt_len=20 - offset)
        cur = torch.cat([cur, logits[:, -1].argmax(-1, keepdim=True)], 1)
    assert got == tok.decode(cur[0].tolist())
