"""Router constructor checks found by the new-user trial: types and the bound each message names."""

import pytest

from moe_core import routers as R

D = 4


def test_top_p_threshold_must_be_a_probability_mass():
    with pytest.raises(ValueError, match=r"threshold must be in \[0, 1\].*got 1.5"):
        R.TopPRouter(dim=D, num_experts=4, threshold=1.5)
    R.TopPRouter(dim=D, num_experts=4, threshold=1.0)  # every expert: still valid


@pytest.mark.parametrize("top_k", [2.0, True, "2"])
@pytest.mark.parametrize(
    "make",
    [
        lambda k: R.TopKRouter(dim=D, num_experts=4, top_k=k),
        lambda k: R.NoisyTopKRouter(dim=D, num_experts=4, top_k=k),
        lambda k: R.NullExpertRouter(dim=D, num_experts=4, num_null=1, top_k=k),
        lambda k: R.GroupedRouter(dim=D, num_experts=4, top_k=k, num_groups=2),
        lambda k: R.SigmoidTopKRouter(dim=D, num_experts=4, top_k=k),
        lambda k: R.DenseToSparseRouter(dim=D, num_experts=4, top_k=k),
    ],
)
def test_top_k_must_be_an_int(make, top_k):
    with pytest.raises(TypeError, match=rf"top_k must be an int, got {top_k!r}"):
        make(top_k)


def test_group_limited_top_k_bound_names_the_allowed_groups():
    with pytest.raises(
        ValueError,
        match=r"top_k must be in \[1, 2: the experts in topk_groups=1 of num_groups=4 groups of 2\], got 3",
    ):
        R.SigmoidTopKRouter(dim=D, num_experts=8, top_k=3, num_groups=4, topk_groups=1)


def test_null_expert_top_k_bound_names_true_plus_null_experts():
    with pytest.raises(
        ValueError, match=r"top_k must be in \[1, num_experts \+ num_null = 8 \+ 1 = 9\], got 10"
    ):
        R.NullExpertRouter(dim=D, num_experts=8, num_null=1, top_k=10)


def test_plain_top_k_bound_is_num_experts():
    with pytest.raises(ValueError, match=r"^top_k must be in \[1, num_experts=4\], got 5$"):
        R.TopKRouter(dim=D, num_experts=4, top_k=5)
