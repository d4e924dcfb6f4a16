"""Router variants against hand-written references."""
import math

import pytest
import torch

from composer.layers.router import Router, route


def test_softmax_topk_renormalize_by_hand():
    logits = torch.tensor([[1.0, 3.0, 2.0, 0.0]])
    w, ids = route(logits, 2, "softmax", renormalize=True)
    assert ids.tolist() == [[1, 2]] and ids.dtype == torch.int32 and w.dtype == torch.float32
    e = [math.exp(v) for v in (1.0, 3.0, 2.0, 0.0)]
    assert w.tolist()[0] == pytest.approx([e[1] / (e[1] + e[2]), e[2] / (e[1] + e[2])], rel=1e-6)
    w2, _ = route(logits, 2, "softmax", renormalize=False)
    assert w2.tolist()[0] == pytest.approx([e[1] / sum(e), e[2] / sum(e)], rel=1e-6)


def test_sigmoid_with_bias_selects_by_biased_score_but_weights_unbiased():
    logits = torch.tensor([[0.0, 1.0, 2.0, -1.0]])
    bias = torch.tensor([5.0, 0.0, 0.0, 0.0])
    w, ids = route(logits, 2, "sigmoid", renormalize=False, correction_bias=bias, routed_scaling_factor=2.5)
    assert ids.tolist() == [[0, 2]]
    s = lambda v: 1 / (1 + math.exp(-v))  # noqa: E731
    assert w.tolist()[0] == pytest.approx([2.5 * s(0.0), 2.5 * s(2.0)], rel=1e-6)


def test_grouped_topk_deepseek_by_hand():
    # 8 experts in 4 groups of 2; keep the 2 best groups (by sum of each group's top-2 biased scores).
    logits = torch.tensor([[4.0, -4.0, 0.5, 0.4, 3.0, 2.9, -1.0, -2.0]])
    bias = torch.zeros(8)
    w, ids = route(logits, 2, "sigmoid", renormalize=True, num_expert_group=4, topk_group=2, correction_bias=bias)
    # group sums: g0 = s(4)+s(-4) = 1.0, g1 = s(.5)+s(.4) ~ 1.22, g2 = s(3)+s(2.9) ~ 1.9, g3 small
    # -> groups 2 and 1 are kept; expert 0 (the single best score) is excluded.
    assert sorted(ids.tolist()[0]) == [4, 5]
    assert w.sum().item() == pytest.approx(1.0)


def test_grouped_without_bias_uses_group_max():
    logits = torch.tensor([[4.0, -4.0, 0.5, 0.4, 3.0, 2.9, -1.0, -2.0]])
    _, ids = route(logits, 2, "softmax", renormalize=True, num_expert_group=4, topk_group=2)
    assert sorted(ids.tolist()[0]) == [0, 4]


def test_top_k_equals_num_experts_and_empty_batch():
    logits = torch.randn(5, 6)
    w, ids = route(logits, 6, "softmax", renormalize=True)
    assert sorted(ids[0].tolist()) == list(range(6))
    torch.testing.assert_close(w.sum(-1), torch.ones(5))
    w0, ids0 = route(torch.randn(0, 6), 2)
    assert w0.shape == (0, 2) and ids0.shape == (0, 2)


def test_router_module_matches_function_and_owns_bias():
    r = Router(16, 4, "sigmoid", True, 4, 2, True, 2.5)
    torch.nn.init.normal_(r.e_score_correction_bias)
    logits = torch.randn(7, 16)
    w, ids = r(logits)
    w_ref, ids_ref = route(logits, 4, "sigmoid", True, 4, 2, r.e_score_correction_bias, 2.5)
    assert torch.equal(ids, ids_ref) and torch.equal(w, w_ref)
    assert torch.allclose(w.sum(-1), torch.full((7,), 2.5))
