"""The InfLLM-v2 benchmark experiment on tiny sizes: it runs, writes its report files, and its correlated inputs are
the AR(1) process it claims (no timings asserted)."""

import pytest
import torch

from zoo.experiments.infllmv2_bench import Setup, make_input, run


def test_correlated_input_is_the_ar1_recurrence():
    rho = 0.9
    x = make_input("correlated", 600, 3, rho, seed=1)
    e = torch.randn(1, 600, 3, generator=torch.Generator().manual_seed(1))
    ref = [e[:, 0]]
    for t in range(1, 600):
        ref.append(rho * ref[-1] + (1 - rho * rho) ** 0.5 * e[:, t])
    torch.testing.assert_close(x, torch.stack(ref, 1), atol=1e-5, rtol=0)


def test_bench_runs_and_writes_reports(tmp_path):
    s = Setup(lengths=[96], inputs=["iid", "correlated"], d_model=32, num_heads=4, num_kv_heads=1, head_dim=8,
              sparse=dict(kernel_size=4, kernel_stride=2, block_size=8, init_blocks=1, window_size=0, topk=3,
                          dense_len=-1))
    rows = run(s, tmp_path)
    assert [r["input"] for r in rows] == ["iid", "correlated"]
    for r in rows:
        assert r["dense_s"] > 0 and r["sparse_s"] > 0 and r["blocks_per_query"] <= 3
        assert 1 <= r["union_per_tile16"] <= 12
    text = (tmp_path / "results.md").read_text()
    assert "| 96 | iid |" in text and (tmp_path / "results.csv").is_file()


@pytest.mark.gpu
def test_gpu_kernel_bench_runs():
    from zoo.experiments.infllmv2_bench import gpu_kernel_bench

    r = gpu_kernel_bench(16384, sparse={"dense_len": -1})
    assert r["ms_sparse"] > 0 and r["ms_flash"] > 0
