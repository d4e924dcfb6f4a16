"""The Triton align kernel (pairs sorted by expert, padded to BLOCK_M) on CPU under TRITON_INTERPRET=1."""
from __future__ import annotations


import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

pytest.importorskip("triton")  # composer depends on triton on Linux; absent only on other platforms

from composer.kernels.triton.align import max_blocks, moe_align  # noqa: E402


from ._interpreter import interpreter  # noqa: E402,F401

def routing(T: int, E: int, k: int, drop: float, seed: int) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    ids = torch.stack([torch.randperm(E, generator=g)[:k] for _ in range(T)]) if T else torch.empty(0, k, dtype=torch.long)
    ids = ids.to(torch.int32)
    if T and drop > 0:
        ids[torch.rand(T, k, generator=g) < drop] = -1
    return ids


def check_invariants(ids: torch.Tensor, E: int, bm: int) -> None:
    T, k = ids.shape
    P = T * k
    sorted_ids, expert_ids, ntpp = moe_align(ids, E, bm)
    nb = max_blocks(P, E, bm)
    assert sorted_ids.shape == (nb * bm,) and expert_ids.shape == (nb,) and ntpp.shape == (1,)
    flat = ids.reshape(-1).tolist()
    counts = [sum(1 for e in flat if e == x) for x in range(E)]
    padded = [-(-c // bm) * bm for c in counts]
    total = int(ntpp.item())
    assert total == sum(padded), "num_tokens_post_padded is the sum of per-expert padded counts"
    assert total <= nb * bm
    s = sorted_ids[:total].tolist()
    ex = expert_ids.tolist()
    # every valid (token, slot) pair exactly once; pairs of id -1 never; padding marked with P
    real = [p for p in s if p != P]
    assert sorted(real) == [i for i, e in enumerate(flat) if e >= 0]
    assert all(0 <= p <= P for p in s)
    # per-expert segments in expert order: real pairs first, then padding, each block one expert
    pos = 0
    for e in range(E):
        seg = s[pos:pos + padded[e]]
        assert all(flat[p] == e for p in seg[:counts[e]]), f"expert {e}'s segment holds pairs of other experts"
        assert all(p == P for p in seg[counts[e]:]), f"expert {e}'s padding is not marked"
        for b in range(pos // bm, (pos + padded[e]) // bm):
            assert ex[b] == e
        pos += padded[e]
    assert all(x == -1 for x in ex[total // bm:]), "blocks past the end must be marked -1"


@settings(max_examples=25, deadline=None)
@given(T=st.integers(0, 12), E=st.integers(1, 9), kfrac=st.floats(0, 1), bm=st.sampled_from([16, 32]),
       drop=st.sampled_from([0.0, 0.3]), seed=st.integers(0, 2**16))
def test_align_invariants(T, E, kfrac, bm, drop, seed):
    k = 1 + int(kfrac * (E - 1))
    with interpreter():
        check_invariants(routing(T, E, k, drop, seed), E, bm)


@pytest.mark.parametrize("T,E,k,bm", [(0, 4, 2, 16), (1, 1, 1, 16), (5, 6, 6, 16), (40, 3, 3, 16), (3, 64, 8, 64),
                                      (3, 257, 8, 16), (2, 300, 5, 64), (700, 5, 2, 16)])
def test_align_edge_cases(T, E, k, bm):
    """T=0, one expert, top_k = num_experts, more pairs than a block, many experts without tokens; E = 257 / 300
    (BLOCK_E = 512: the scan's BLOCK_B = 16 branch, its block loop over two passes at E = 257, the padding marked in
    2 / 8 passes of PAD_CHUNK = 8), and P = 1400 > 1024 pairs (count and scatter over two programs, the second one
    partly masked)."""
    with interpreter():
        check_invariants(routing(T, E, k, 0.0, T + E), E, bm)


def test_align_all_dropped():
    ids = torch.full((4, 2), -1, dtype=torch.int32)
    with interpreter():
        sorted_ids, expert_ids, ntpp = moe_align(ids, 5, 16)
    assert int(ntpp.item()) == 0
    assert (expert_ids == -1).all()


def test_align_rejects_bad_block():
    with pytest.raises(ValueError, match="power of two"):
        moe_align(torch.zeros(1, 1, dtype=torch.int32), 2, 24)


def test_max_blocks_bound_is_tight_enough():
    # each non-empty expert wastes at most BLOCK_M - 1 slots, and at most min(E, P) experts are non-empty
    assert max_blocks(8, 256, 16) == 8  # 8 pairs, 8 experts at most: 8 blocks
    assert max_blocks(0, 8, 16) == 0
    assert max_blocks(32768, 256, 64) == (32768 + 256 * 63 + 63) // 64
