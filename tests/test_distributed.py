
import pytest
import torch

from dist_seg import distributed as D
from tests.dist_utils import run_distributed


@pytest.mark.parametrize("n", range(2, 65))
def test_derangement_is_fixed_point_free_permutation(n):
    for trial in range(5):
        p = D.derangement(n, D.seeded_generator(0, n, trial))
        assert sorted(p.tolist()) == list(range(n)), f"not a permutation for n={n}"
        assert not bool((p == torch.arange(n)).any()), f"fixed point for n={n}: {p.tolist()}"


def test_derangement_is_uniform_for_n4():
    # D(4) = 9 derangements; each must be drawn about 1/9 of the time.
    gen = torch.Generator().manual_seed(0)
    counts: dict[tuple, int] = {}
    draws = 9000
    for _ in range(draws):
        key = tuple(D.derangement(4, gen).tolist())
        counts[key] = counts.get(key, 0) + 1
    assert len(counts) == 9, f"expected all 9 derangements of 4, saw {len(counts)}"
    expected = draws / 9
    chi2 = sum((c - expected) ** 2 / expected for c in counts.values())
    assert chi2 < 26.1, f"derangement draws look non-uniform (chi2={chi2:.1f}, 8 dof, p<0.001 bound 26.1)"


def test_derangement_rejects_tiny_n():
    with pytest.raises(ValueError):
        D.derangement(1)


def test_single_process_helpers_are_identity():
    t = torch.randn(3, 4, requires_grad=True)
    assert D.get_rank() == 0 and D.get_world_size() == 1 and D.is_main_process()
    assert D.all_gather(t) is t and D.all_gather_with_grad(t) is t and D.all_gather_variable(t) is t
    assert D.broadcast_object({"a": 1}) == {"a": 1}
    D.barrier()


def _gather_worker(rank, world):
    torch.manual_seed(100 + rank)
    x = torch.randn(2 + 0 * rank, 3, requires_grad=True)
    gathered = D.all_gather_with_grad(x)
    # Loss weights each gathered row differently, so each rank's gradient tells which rows it owns.
    weights = torch.arange(1, gathered.shape[0] + 1, dtype=torch.float32)[:, None]
    loss = (gathered * weights).sum() * (rank + 1)
    loss.backward()
    plain = D.all_gather(x.detach())
    var = D.all_gather_variable(torch.full((rank + 1, 2), float(rank)))
    perm = D.derangement(16, D.seeded_generator(7, 3, "neg"))
    return {"x": x.detach(), "grad": x.grad, "gathered": gathered.detach(), "plain": plain, "var": var, "perm": perm}


def test_two_rank_gather_and_derangement():
    results = run_distributed(_gather_worker, 2)
    r0, r1 = results
    full = torch.cat([r0["x"], r1["x"]])
    for r in results:
        assert torch.equal(r["gathered"], full) and torch.equal(r["plain"], full), (
            "all_gather must concatenate in rank order"
        )
    # d/dx of sum_s (s+1) * sum_i w_i g_i  for rows owned by rank r = (1 + 2) * w_i
    weights = torch.arange(1, 5, dtype=torch.float32)[:, None].expand(4, 3)
    assert torch.allclose(r0["grad"], 3 * weights[:2]), f"rank 0 grad {r0['grad']}"
    assert torch.allclose(r1["grad"], 3 * weights[2:]), f"rank 1 grad {r1['grad']}"
    expected_var = torch.tensor([[0.0, 0.0], [1.0, 1.0], [1.0, 1.0]])
    assert torch.equal(r0["var"], expected_var) and torch.equal(r1["var"], expected_var)
    assert torch.equal(r0["perm"], r1["perm"]), "same seed and step must give the same derangement on every rank"
    assert not bool((r0["perm"] == torch.arange(16)).any())
