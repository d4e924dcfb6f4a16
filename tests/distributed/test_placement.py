"""Which rank owns which expert: the map every rank's FusedMoE routes with and loads checkpoints by."""
import pytest
import torch

from composer.distributed.placement import expert_map, local_experts


@pytest.mark.parametrize("placement", ["linear", "round_robin"])
@pytest.mark.parametrize("E,ws", [(1, 1), (6, 1), (6, 2), (6, 3), (6, 6), (12, 4)])
def test_every_expert_has_one_owner(E, ws, placement):
    owners = torch.full((E,), -1)
    for rank in range(ws):
        mine = list(local_experts(E, ws, rank, placement))
        assert len(mine) == E // ws
        m = expert_map(E, ws, rank, placement)
        assert m.dtype == torch.int32 and m.shape == (E,)
        for local, g in enumerate(mine):
            assert m[g] == local and owners[g] == -1
            owners[g] = rank
        assert int((m >= 0).sum()) == len(mine)  # -1 everywhere else
    assert bool((owners >= 0).all())
    if placement == "round_robin":
        assert owners.tolist() == [g % ws for g in range(E)]
    else:
        assert owners.tolist() == [g // (E // ws) for g in range(E)]


def test_many_experts_take_no_per_expert_python_work():
    """task=show model.num_experts=100000000 builds on the meta device: the map is one vectorized fill."""
    m = expert_map(10**8, 4, 1, "round_robin")
    assert m[1] == 0 and m[5] == 1 and m[2] == -1 and m[10**8 - 3] == 10**8 // 4 - 1
    r = local_experts(10**8, 4, 3, "linear")
    assert 10**8 - 1 in r and r.index(10**8 - 1) == 10**8 // 4 - 1 and 0 not in r


@pytest.mark.parametrize("E,ws,rank,placement,msg", [(6, 4, 0, "linear", "must divide"),
                                                     (6, 2, 2, "linear", "must be in"),
                                                     (6, 2, 0, "blocked", "unknown placement")])
def test_bad_placement_is_refused(E, ws, rank, placement, msg):
    with pytest.raises(ValueError, match=msg):
        expert_map(E, ws, rank, placement)
