"""Exact KNN: equal to a float64 brute force (ties to the lower index), cross-rank, table files, CLI."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from dist_seg import knn as K
from dist_seg import knn_table as KT
from dist_seg.knn import distributed_knn, knn
from dist_seg.knn_table import KnnTableError, load_knn_table, save_knn_table
from tests.dist_utils import run_distributed


def brute_force(queries: np.ndarray, keys: np.ndarray, k: int, *, exclude_self=False, offset=0):
    """float64 cosine, elementwise products (duplicates tie exactly), sort by (-sim, index)."""
    q = queries.astype(np.float64)
    x = keys.astype(np.float64)
    q = q / np.linalg.norm(q, axis=1, keepdims=True)
    x = x / np.linalg.norm(x, axis=1, keepdims=True)
    sims = (q[:, None, :] * x[None, :, :]).sum(-1)
    if exclude_self:
        sims[np.arange(len(q)), np.arange(len(q)) + offset] = -np.inf
    order = np.lexsort((np.broadcast_to(np.arange(x.shape[0]), sims.shape), -sims), axis=1)[:, :k]
    return np.take_along_axis(sims, order, axis=1), order


def data_with_ties(n: int, d: int, seed: int, dtype=torch.float32) -> torch.Tensor:
    gen = torch.Generator().manual_seed(seed)
    x = torch.randn(n, d, generator=gen)
    x[20:45] = x[3]  # a block of 26 identical rows: ties beyond any small k
    x[60:63] = x[61 % n]
    x[n - 5 :] = x[7]  # duplicates far from the original, in another key block
    return x.to(dtype)


def check_equal(sims, index, ref_s, ref_i, what):
    assert index.dtype == torch.int64 and sims.dtype == torch.float32, what
    mismatch = np.nonzero((index.numpy() != ref_i).any(axis=1))[0]
    if mismatch.size:
        row = mismatch[0]
        raise AssertionError(f"{what}: rows {mismatch[:5].tolist()} differ from the brute force, e.g. row {row}: "
                             f"{index[row].tolist()} vs {ref_i[row].tolist()}")
    err = np.abs(sims.numpy() - ref_s).max()
    assert np.allclose(sims.numpy(), ref_s, atol=1e-6), f"{what}: similarities off by {err}"


@pytest.mark.parametrize("backend", ["torch", "faiss"])
@pytest.mark.parametrize("n,d,k,dtype", [(300, 16, 5, torch.float32), (1000, 48, 30, torch.float16),
                                         (64, 8, 63, torch.float32), (500, 32, 1, torch.float64)])
@pytest.mark.parametrize("exclude_self", [False, True])
def test_equals_float64_brute_force(backend, n, d, k, dtype, exclude_self):
    x = data_with_ties(n, d, seed=n + d, dtype=dtype)
    k = min(k, n - 1) if exclude_self else k
    sims, index = knn(x, x, k, exclude_self=exclude_self, backend=backend)
    ref_s, ref_i = brute_force(x.numpy(), x.numpy(), k, exclude_self=exclude_self)
    check_equal(sims, index, ref_s, ref_i, f"{backend} n={n} k={k} {dtype} exclude_self={exclude_self}")


@pytest.mark.parametrize("backend", ["torch", "faiss"])
def test_blocks_preselection_and_query_offset(backend):
    """Many query chunks and key blocks (ragged ones too) with the group pre-selection active."""
    x = data_with_ties(20000, 12, seed=5)
    rows = slice(15, 215)  # includes the tied block 20..44; query i is key 15 + i
    # 16 rows x 8100 columns per block: 2 full blocks (126 groups of 64 + a 36-column tail) and a ragged one.
    sims, index, stats = knn(x[rows], x, 5, exclude_self=True, query_offset=15, backend=backend, chunk_size=16,
                             memory_budget=16 * 8100 * 4, return_stats=True)
    ref_s, ref_i = brute_force(x[rows].numpy(), x.numpy(), 5, exclude_self=True, offset=15)
    check_equal(sims, index, ref_s, ref_i, f"{backend} blocked")
    # Only the 25 queries of the 26-row tied block (more ties than k + margin = 21 candidates) need brute force.
    assert stats["brute_force_rows"] == 25, f"unexpected number of uncertified rows: {stats}"


@pytest.mark.parametrize("exclude_self", [True, False])
def test_symmetric_blocks_equal_brute_force(exclude_self):
    """Queries = keys: only blocks on and above the diagonal are multiplied, each serving both sides."""
    x = data_with_ties(1100, 16, seed=9)  # 200-row blocks: 6 of them, the last one ragged
    sims, index, stats = knn(x, x, 7, exclude_self=exclude_self, memory_budget=4 * 200 * 200, return_stats=True)
    assert stats["symmetric"], "the same tensor as queries and keys must take the symmetric path"
    ref_s, ref_i = brute_force(x.numpy(), x.numpy(), 7, exclude_self=exclude_self)
    check_equal(sims, index, ref_s, ref_i, f"symmetric exclude_self={exclude_self}")
    other = knn(x, x.clone(), 7, exclude_self=exclude_self, chunk_size=100)
    assert torch.equal(other[1], index), "the general blocked path must give the same table"


def test_heavy_ties_fall_back_to_brute_force():
    x = data_with_ties(400, 8, seed=3)
    sims, index, stats = knn(x, x, 4, exclude_self=True, margin=2, backend="torch", return_stats=True)
    assert stats["brute_force_rows"] >= 26, f"26 identical rows cannot be certified with margin 2: {stats}"
    ref_s, ref_i = brute_force(x.numpy(), x.numpy(), 4, exclude_self=True)
    check_equal(sims, index, ref_s, ref_i, "tie fallback")
    assert index[20].tolist() == [3, 21, 22, 23], "ties must go to the lowest indices, self excluded"


def test_block_topk_bounds_every_dropped_entry():
    gen = torch.Generator().manual_seed(0)
    scores = torch.randn(7, 64 * 40 + 13, generator=gen).round(decimals=1)  # many exact ties
    values, cols = K._block_topk(scores, 9)
    expected = scores.topk(9, dim=1).values
    assert torch.equal(values, expected), "pre-selected top values must equal a full topk"
    assert torch.equal(scores.gather(1, cols), values), "columns must point at their values"


def test_errors_name_the_problem():
    x = torch.randn(10, 4)
    with pytest.raises(ValueError, match="k=10"):
        knn(x, x, 10, exclude_self=True)
    with pytest.raises(ValueError, match="must share d"):
        knn(x, torch.randn(10, 5), 2)
    bad = x.clone()
    bad[3, 1] = float("nan")
    with pytest.raises(ValueError, match="NaN"):
        knn(bad, x, 2)
    with pytest.raises(ValueError, match="backend"):
        knn(x, x, 2, backend="annoy")
    if not K._has_faiss_gpu():
        with pytest.raises(ValueError, match="faiss-gpu"):
            knn(x, x, 2, backend="faiss-gpu")
    empty_s, empty_i = knn(x[:0], x, 3)
    assert empty_s.shape == (0, 3) and empty_i.shape == (0, 3)


# ------------------------------------------------------------------------------------ backend choice
# The environment facts (installed distributions, what `import faiss` gives, the GPU's compute capability) are
# given as values; the choice and its message are what is tested. Faiss's search itself is not involved.
HOPPER, AMPERE = (9, 0), (8, 0)
CU12_RANGE = ((7, 0), (8, 9))  # what faiss-gpu-cu12 1.14.1.post1 declares (docs/decisions.md, issue 19)


def gpu_env(capability, declared=CU12_RANGE, **changes):
    facts = dict(distributions={"faiss-gpu-cu12": "1.14.1.post1"}, importable=True, gpu_api=True, num_gpus=1,
                 declared={"faiss-gpu-cu12": declared}, capability=capability)
    facts.update(changes)
    return K.FaissEnvironment(**facts)


def test_backend_without_faiss_is_torch_everywhere():
    env = K.FaissEnvironment()
    assert K.choose_backend("auto", "cpu", env) == ("torch", "exact torch search")
    backend, why = K.choose_backend("auto", "cuda", env)
    assert backend == "torch" and "no GPU build of faiss is installed" in why
    with pytest.raises(ValueError, match="needs faiss: pip install 'dist_seg\\[cpu\\]'"):
        K.choose_backend("faiss", "cpu", env)
    with pytest.raises(ValueError, match="no GPU build of faiss"):
        K.choose_backend("faiss-gpu", "cuda", env)


def test_backend_with_cpu_faiss_only():
    env = K.FaissEnvironment(distributions={"faiss-cpu": "1.15.1"}, importable=True)
    assert K.choose_backend("auto", "cpu", env)[0] == "torch"
    assert K.choose_backend("faiss", "cpu", env) == ("faiss", "faiss (asked for)")
    backend, why = K.choose_backend("auto", "cuda", env)
    assert backend == "torch" and why.endswith("no GPU build of faiss is installed (only faiss-cpu 1.15.1)")


def test_backend_gpu_faiss_that_supports_the_device():
    backend, why = K.choose_backend("auto", "cuda", gpu_env(AMPERE))
    assert backend == "faiss-gpu" and why == "faiss-gpu: faiss-gpu-cu12 1.14.1.post1 supports this GPU (8.0)"
    assert K.choose_backend("faiss-gpu", "cuda", gpu_env(AMPERE))[0] == "faiss-gpu"
    assert K.choose_backend("auto", "cpu", gpu_env(None))[0] == "torch"  # CPU tensors: torch
    assert K.choose_backend("auto", "cuda", gpu_env(None))[0] == "torch"  # capability unknown: never blindly


def test_backend_gpu_faiss_without_kernels_for_the_device():
    backend, why = K.choose_backend("auto", "cuda", gpu_env(HOPPER))
    assert backend == "torch"
    assert "faiss-gpu-cu12 1.14.1.post1 declares compute capability 7.0-8.9, but this GPU is 9.0" in why
    with pytest.raises(ValueError, match="cannot run here: .*this GPU is 9.0"):
        K.choose_backend("faiss-gpu", "cuda", gpu_env(HOPPER))
    # No declared range: never chosen blindly by auto; an explicit request is honoured with a warning.
    backend, why = K.choose_backend("auto", "cuda", gpu_env(HOPPER, declared=None))
    assert backend == "torch" and "declares no compute-capability range" in why
    backend, why = K.choose_backend("faiss-gpu", "cuda", gpu_env(HOPPER, declared=None))
    assert backend == "faiss-gpu" and "warning" in why


def test_backend_cpu_build_shadowing_a_gpu_one_is_named_with_the_fix():
    env = gpu_env(AMPERE, distributions={"faiss-cpu": "1.15.1", "faiss-gpu-cu12": "1.14.1.post1"}, gpu_api=False,
                  num_gpus=0)
    backend, why = K.choose_backend("auto", "cuda", env)
    assert backend == "torch"
    assert "faiss-cpu 1.15.1 shadows faiss-gpu-cu12" in why
    assert "fix: pip uninstall -y faiss-cpu faiss-gpu-cu12 && pip install faiss-gpu-cu12" in why
    with pytest.raises(ValueError, match="shadows faiss-gpu-cu12"):
        K.choose_backend("faiss-gpu", "cuda", env)


def test_declared_capability_range_from_wheel_metadata():
    newer = "Supports Volta to Ada Lovelace architecture GPUs (Compute Capability 7.0\u20138.9)"
    older = "Support Pascal~Hopper architecture GPU (Compute Capability 6.0~9.0)."
    assert K.declared_capability_range(newer) == ((7, 0), (8, 9))
    assert K.declared_capability_range(older) == ((6, 0), (9, 0))
    assert K.declared_capability_range("A library for efficient similarity search") is None
    # On this machine: the real environment reader runs and agrees with what `import faiss` gives.
    env = K.faiss_environment()
    assert env.capability is None
    try:
        import faiss
    except ImportError:
        assert not env.importable and not env.gpu_api
    else:
        assert env.importable and env.gpu_api == hasattr(faiss, "StandardGpuResources")
        assert env.distributions, "the distribution that installed `faiss` is found"


# ------------------------------------------------------------------------------------------ files
def test_table_round_trip_and_mismatch(tmp_path):
    x = torch.randn(50, 8)
    sims, index = knn(x, x, KT.DEFAULT_K, exclude_self=True)
    provenance = {"backbone": "dino_vits8", "weights_id": "abc", "res": 224, "split": "train", "crop": "five"}
    path = save_knn_table(tmp_path / "t" / "knn.npz", sims, index, provenance=provenance)
    s2, i2, meta = load_knn_table(path, expect={"backbone": "dino_vits8", "res": 224, "num_samples": 50})
    assert torch.equal(s2, sims) and torch.equal(i2, index)
    assert meta["k"] == 30 and meta["num_samples"] == 50 and meta["weights_id"] == "abc"
    with pytest.raises(KnnTableError, match=r"res: table has 224, expected 320.*dist-seg knn"):
        load_knn_table(path, expect={"res": 320})
    with pytest.raises(KnnTableError, match="no KNN table.*dist-seg knn"):
        load_knn_table(tmp_path / "missing.npz")
    (tmp_path / "junk.npz").write_bytes(b"not a table")
    with pytest.raises(KnnTableError, match="dist-seg knn"):
        load_knn_table(tmp_path / "junk.npz")


def test_compute_descriptors_orders_by_index():
    from dist_seg.backbones import load_backbone

    gen = torch.Generator().manual_seed(0)
    gaps = torch.randn(6, 5, generator=gen)
    batches = [{"index": torch.tensor([4, 0, 5]), "gap": gaps[[4, 0, 5]]},
               {"index": torch.tensor([2, 1, 3]), "gap": gaps[[2, 1, 3]]}]
    desc = KT.compute_descriptors(batches, num_samples=6)
    assert torch.allclose(desc, torch.nn.functional.normalize(gaps, dim=1), atol=1e-6)
    with pytest.raises(ValueError, match="missing for 1 of 7"):
        KT.compute_descriptors(batches, num_samples=7)

    backbone = load_backbone("toy")
    images = torch.randint(0, 256, (3, 3, 32, 32), dtype=torch.uint8, generator=gen)
    desc = KT.compute_descriptors([{"index": torch.tensor([2, 0, 1]), "image": images}], num_samples=3,
                                 backbone=backbone)
    assert torch.allclose(desc[[2, 0, 1]], backbone.global_descriptor(images), atol=1e-6)


# --------------------------------------------------------------------------------- runs and the CLI
@pytest.fixture(scope="module")
def toy_root(tmp_path_factory):
    from dist_seg.data.toy import generate_toy

    root = tmp_path_factory.mktemp("toy")
    generate_toy(root, num_classes=3, num_train=40, num_val=0, size=32, seed=0, samples_per_shard=8)
    return root


def _toy_overrides(root):
    return [f"data.root={root}", "data.res=32", "data.batch_size=8", "data.num_workers=0"]


def test_cli_builds_exact_table_and_ensure_reuses_it(toy_root, tmp_path, capsys):
    from dist_seg import cli
    from dist_seg.backbones import load_backbone
    from dist_seg.data.shards import make_loader
    from dist_seg.runtime import load_recipe, resolve_config

    out = tmp_path / "table.npz"
    assert cli.main(["knn", "stego_toy", *_toy_overrides(toy_root), "--out", str(out), "--k", "7"]) == 0
    assert "40 samples x 7 neighbours" in capsys.readouterr().out
    sims, index, meta = load_knn_table(out)
    assert meta["backbone"] == "toy" and meta["weights_id"] == "random-init-seed0" and meta["res"] == 32
    assert meta["num_samples"] == 40 and meta["split"] == "train" and meta["dataset"] == "toy"

    loader, _ = make_loader(toy_root, "train", batch_size=8, res=32, num_workers=0, shuffle=False, infinite=False)
    desc = KT.compute_descriptors(loader, num_samples=40, backbone=load_backbone("toy"))
    ref_s, ref_i = brute_force(desc.numpy(), desc.numpy(), 7, exclude_self=True)
    check_equal(sims, index, ref_s, ref_i, "dist-seg knn table")

    cfg = resolve_config(load_recipe("stego_toy")(), [*_toy_overrides(toy_root), f"data.knn_table={out}"])
    indices = KT.ensure_knn_table(cfg)
    assert torch.equal(indices, index), "ensure_knn_table must load the existing table"
    stale = resolve_config(load_recipe("stego_toy")(), [*_toy_overrides(toy_root), f"data.knn_table={out}",
                                                        "data.res=40"])
    with pytest.raises(KnnTableError, match=r"res: table has 32, expected 40.*dist-seg knn"):
        KT.ensure_knn_table(stale)

    # The same table from the feature cache's stored descriptors (`dist-seg extract` output).
    from dist_seg.features import extract

    cache = extract(cfg, cache=str(tmp_path / "cache"))
    out2 = tmp_path / "from_cache.npz"
    assert cli.main(["knn", "stego_toy", *_toy_overrides(toy_root), f"data.feature_cache={cache}",
                     "--features", "--out", str(out2), "--k", "7"]) == 0
    cache_sims, cache_index, cache_meta = load_knn_table(out2)
    assert cache_meta["source"] == "feature cache" and cache_meta["weights_id"] == meta["weights_id"]
    assert torch.equal(cache_index, index), "descriptors from the feature cache must give the same table"

    fresh = resolve_config(load_recipe("stego_toy")(), [*_toy_overrides(toy_root),
                                                        f"data.knn_table={tmp_path / 'new.npz'}"])
    built = KT.ensure_knn_table(fresh, k=7)
    assert torch.equal(built, index) and (tmp_path / "new.npz").is_file(), "a missing table must be built and saved"


def _two_rank_worker(rank, world, sizes, root):
    from dist_seg.runtime import load_recipe, resolve_config

    x = data_with_ties(sum(sizes), 24, seed=11)
    lo = sum(sizes[:rank])
    sims, index = distributed_knn(x[lo : lo + sizes[rank]], 6, exclude_self=True, backend="torch")
    given_sims, given_index = distributed_knn(x[lo : lo + sizes[rank]], 6, exclude_self=True, backend="torch",
                                              keys=x)
    cfg = resolve_config(load_recipe("stego_toy")(), _toy_overrides(root))
    # Count the gathers of descriptor matrices during a table build (C14: gathered once, reused as the keys).
    from dist_seg import distributed as D

    real, widths = D.all_gather_variable, []

    def counting(tensor):
        widths.append(tensor.shape[1] if tensor.ndim == 2 and tensor.is_floating_point() else None)
        return real(tensor)

    D.all_gather_variable = counting
    try:
        built_sims, built_index, provenance = KT.build_knn_table(cfg, k=5)
    finally:
        D.all_gather_variable = real
    return {"sims": sims, "index": index, "built_sims": built_sims, "built_index": built_index,
            "world": provenance["world_size"], "given_equal": torch.equal(given_index, index)
            and torch.equal(given_sims, sims), "descriptor_gathers": sum(1 for w in widths if w not in (None, 5))}


def test_two_ranks_equal_one_process(toy_root):
    """distributed_knn with unequal slices, and a whole table build (each rank reads its own shards)."""
    from dist_seg.runtime import load_recipe, resolve_config

    sizes = (70, 131)
    results = run_distributed(_two_rank_worker, 2, sizes, str(toy_root))
    x = data_with_ties(sum(sizes), 24, seed=11)
    sims, index = knn(x, x, 6, exclude_self=True)
    cfg = resolve_config(load_recipe("stego_toy")(), _toy_overrides(toy_root))
    built_sims, built_index, _ = KT.build_knn_table(cfg, k=5)
    for rank, result in enumerate(results):
        assert torch.equal(result["index"], index), f"rank {rank}: the gathered table differs from one process"
        assert torch.equal(result["sims"], sims), f"rank {rank}: similarities differ from one process"
        assert result["world"] == 2
        assert result["given_equal"], f"rank {rank}: keys passed in must give the same table as keys gathered"
        assert result["descriptor_gathers"] == 1, f"rank {rank}: descriptors gathered {result['descriptor_gathers']}x"
        assert torch.equal(result["built_index"], built_index), f"rank {rank}: 2-rank build differs from 1 process"
        assert torch.allclose(result["built_sims"], built_sims, atol=1e-6)


def test_cli_reports_missing_dataset(tmp_path, capsys):
    from dist_seg import cli

    code = cli.main(["knn", "stego_toy", f"data.root={tmp_path / 'none'}", "data.num_workers=0"])
    assert code == 2 and "dist-seg prepare" in capsys.readouterr().err
