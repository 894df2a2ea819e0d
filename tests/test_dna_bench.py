"""The DNA benchmark runs end to end on tiny sizes (no timings asserted) and its naive tokenizer is the reference's
per-piece rule."""

import pytest

from zoo.experiments.dna_bench import Setup, naive_encode, run


def test_naive_encoder_follows_the_rules():
    assert naive_encode("<s>AAAAAATTTTTT") == [1, 32, 1397]
    assert naive_encode("ACGTNACGTNAC") == [0, 0] and naive_encode("GGGGGGA") == [4127, 0]


@pytest.mark.usefixtures("single_thread")
def test_bench_writes_its_report(tmp_path):
    s = Setup(lengths=[600, 6001], naive_repeats=1, fast_repeats=2, gen_d_model=32, gen_layers=1, gen_batches=[2],
              gen_prompt_bp=30, gen_new_tokens=3, gen_repeats=1)
    out = run(s, tmp_path / "dna")
    md = (out / "results.md").read_text()
    assert "6,001 bp, N runs" in md and "| 2 |" in md and "Load average" in md
    assert (out / "tokenizer.csv").read_text().count("\n") == 5 and (out / "dna_bench.png").stat().st_size > 0
