"""The LaCT benchmark runs end to end on tiny sizes and writes its report (no timing is asserted)."""

import csv

import pytest

from zoo.experiments.lact_bench import Setup, muon_flops, run
from zoo.kernels.lact import newton_schulz5


def test_bench_writes_its_report(tmp_path):
    s = Setup(d_model=32, num_attn_heads=4, num_lact_heads=2, w0_w2_low_rank=4, window_size=16, chunk_size=16,
              chunk_sizes=[16, 32], forward_lengths=[16, 40], decode_contexts=[8, 20], decode_tokens=2,
              prefill_piece=12, repeats=1, gemm_n=64, threads=1)
    out = run(s, tmp_path / "lact")
    for name in ("results.md", "utilisation.csv", "forward.csv", "decode.csv", "lact.png"):
        assert (out / name).is_file(), name
    rows = list(csv.DictReader(open(out / "utilisation.csv")))
    assert [(int(r["chunk_size"]), r["use_muon"]) for r in rows] == [(16, "False"), (16, "True"), (32, "False"),
                                                                    (32, "True")]
    assert all(float(r["update_utilisation"]) > 0 and r["load_avg"] for r in rows)
    dec = list(csv.DictReader(open(out / "decode.csv")))
    # the boundary step ran at a chunk boundary: the context before it is one short of a multiple of the chunk
    assert [int(r["boundary_context"]) % 16 for r in dec] == [15, 15]
    assert len({r["state_bytes"] for r in dec}) == 1  # constant state
    text = (out / "results.md").read_text()
    assert "FLOP utilisation" in text and "Decode time per token" in text


def test_bench_with_one_part_writes_its_report(tmp_path):
    s = Setup(d_model=32, num_attn_heads=4, num_lact_heads=2, w0_w2_low_rank=4, window_size=16, chunk_size=16,
              chunk_sizes=[16], repeats=1, gemm_n=64, threads=1)
    out = run(s, tmp_path / "lact", parts=("utilisation",))  # the empty forward/decode panels once broke the plot
    assert (out / "lact.png").is_file() and "FLOP utilisation" in (out / "results.md").read_text()


@pytest.mark.parametrize("m,n", [(6, 6), (4, 9), (9, 4)])
def test_muon_flop_count_matches_the_iteration(m, n):
    """Count the multiply-adds of newton_schulz5 with a FLOP-counting mode, against the formula."""
    import torch
    from torch.utils.flop_counter import FlopCounterMode

    with FlopCounterMode(display=False) as fc:
        newton_schulz5(torch.randn(3, m, n))
    assert fc.get_total_flops() == muon_flops(m, n)
