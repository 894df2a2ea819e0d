"""Genomic tasks end to end on a GENERator-shaped checkpoint: generation (specials blocked), recovery of a sequence
the model was overfit to, variant scores (against transformers' logits; antisymmetric), embeddings, the CLI."""

import numpy as np
import pytest
import torch

import zoo
from tests.helpers import make_hf_generator, max_abs
from zoo import genomics
from zoo.cli import main
from zoo.tokenizers import DNAKmerTokenizer

DIGIT = {"A": 0, "T": 1, "C": 2, "G": 3}
pytestmark = pytest.mark.usefixtures("single_thread")  # tiny tensors on a shared 2-core box


def rand_dna(rng, n):
    return "".join(rng.choice(list("ACGT"), n))


@pytest.fixture(scope="module")
def ckpt(tmp_path_factory):
    path = tmp_path_factory.mktemp("generator")
    return path, make_hf_generator(path, seed=3)


def test_load_returns_the_saved_tokenizer(ckpt, tmp_path):
    model, tok = genomics.load(ckpt[0])
    assert isinstance(tok, DNAKmerTokenizer) and model.config.family == "generator"
    model.save_pretrained(tmp_path / "zoo", tokenizer=DNAKmerTokenizer(padding_side="left"))
    assert {"vocab.txt", "tokenizer_config.json", "config.json", "model.safetensors"} <= {
        p.name for p in (tmp_path / "zoo").iterdir()}
    _, tok2 = genomics.load(tmp_path / "zoo")
    assert tok2.padding_side == "left"
    wrong = zoo.create_model("zoo-tiny-attention")
    with pytest.raises(ValueError, match="vocabulary"):
        genomics.generate(wrong, tok, ["ACGTAC"])


def test_generation_blocks_special_tokens(ckpt):
    model, tok = genomics.load(ckpt[0])
    with torch.no_grad():  # make special tokens the likeliest by far, so that blocking them is what is tested
        model.lm_head.weight[:32] = model.lm_head.weight[32:64] * 50
    ids = torch.tensor([tok.encode("ACGTACGGATCC")])
    free = model.generate(ids, max_new_tokens=8, do_sample=True, generator=torch.Generator().manual_seed(0),
                          eos_token_id=[])
    assert (free[:, ids.shape[1]:] < 32).any()  # unblocked, the model does emit special tokens
    with pytest.raises(ValueError, match="suppress_tokens"):
        model.generate(ids, max_new_tokens=1, suppress_tokens=[4128])
    with pytest.raises(ValueError, match="whole vocabulary"):
        model.generate(ids, max_new_tokens=1, suppress_tokens=list(range(4128)))
    prompts = ["ACGTACGGATCC", "TTGACCA", ""]  # the 7-bp prompt is left-truncated to one 6-mer; "" = from <s>
    outs = genomics.generate(model, tok, prompts, max_new_tokens=8, seed=0)
    assert [len(o) for o in outs] == [48, 48, 48] and all(set(o) <= set("ACGT") for o in outs)
    assert outs == genomics.generate(model, tok, prompts, max_new_tokens=8, seed=0)  # seeded
    greedy = genomics.generate(model, tok, prompts, max_new_tokens=4, do_sample=False, batch_size=1)
    assert greedy == genomics.generate(model, tok, prompts, max_new_tokens=4, do_sample=False, batch_size=3)
    assert greedy[1] == genomics.generate(model, tok, ["TGACCA"], max_new_tokens=4, do_sample=False)[0]
    assert genomics.generate(model, tok, ["GACCA"], max_new_tokens=4, do_sample=False, align="pad") == \
        genomics.generate(model, tok, ["AGACCA"], max_new_tokens=4, do_sample=False)


def _overfit(model, tok, texts, max_steps=300):
    """Train on the last 5 tokens of each text until their teacher-forced argmax is right."""
    rows = [torch.tensor(tok.encode(t, add_special_tokens=False))[None] for t in texts]
    opt = torch.optim.Adam(model.parameters(), lr=3e-2)
    model.train()
    for _ in range(max_steps):
        logits = [model(r).logits[0, -6:-1] for r in rows]
        if all(bool((lg.argmax(-1) == r[0, -5:]).all()) for lg, r in zip(logits, rows)):
            model.eval()
            return True
        opt.zero_grad()
        sum(torch.nn.functional.cross_entropy(lg, r[0, -5:]) for lg, r in zip(logits, rows)).backward()
        opt.step()
    return False


def test_recovery_of_an_overfit_sequence_is_exact(tmp_path):
    make_hf_generator(tmp_path, seed=4)
    model, tok = genomics.load(tmp_path)
    rng = np.random.default_rng(0)
    seqs = [rand_dna(rng, 48 + 30), rand_dna(rng, 75 + 30)]  # 75: context left-truncated to 72 bp (whole 6-mers)
    texts = ["<s>" + s[:-30][len(s[:-30]) % 6:] + s[-30:] for s in seqs]
    assert _overfit(model, tok, texts)
    res = genomics.recover(model, tok, seqs)
    assert res.accuracy == [1.0, 1.0] and res.mean == 1.0 and res.predictions == [s[-30:] for s in seqs]
    # labels given separately, another context budget: still exact; a wrong label scores per base
    res2 = genomics.recover(model, tok, [s[:-30] for s in seqs], [s[-30:] for s in seqs], context_bp=6144)
    assert res2.accuracy == [1.0, 1.0]
    wrong = seqs[0][-30:-1] + {"A": "C", "C": "G", "G": "T", "T": "A"}[seqs[0][-1]]
    assert genomics.recover(model, tok, [seqs[0][:-30]], [wrong]).accuracy == [29 / 30]
    with pytest.raises(ValueError, match="shorter"):
        genomics.recover(model, tok, ["ACGT"])


def _reference_scores(hf, tok, contexts, refs, alts):
    """The reference computation with transformers' model: '<s>' + N-stripped, whole-6-mer context, unpadded;
    softmax of the last logits; p(b) = mass of the 6-mers whose first base is b (ids 32 + digit(b) * 1024 + ...)."""
    out = []
    for c, r, a in zip(contexts, refs, alts):
        c = c.lstrip("N")
        c = c[len(c) % 6:]
        ids = torch.tensor([[1] + [32 + sum(DIGIT[b] * 4 ** (5 - p) for p, b in enumerate(c[i:i + 6]))
                                   if set(c[i:i + 6]) <= set("ACGT") else 0 for i in range(0, len(c), 6)]])
        with torch.no_grad():
            probs = hf(ids).logits[0, -1].float().softmax(-1)
        p = {b: float(probs[32 + DIGIT[b] * 1024: 32 + (DIGIT[b] + 1) * 1024].sum()) for b in "ACGT"}
        out.append(np.log(p[r] / (p[a] + 1e-10)))
    return np.array(out)


def test_variant_scores_match_the_reference_and_are_antisymmetric(ckpt):
    path, hf = ckpt
    model, tok = genomics.load(path)
    rng = np.random.default_rng(1)
    contexts = ["NNNN" + rand_dna(rng, 40), rand_dna(rng, 13), rand_dna(rng, 66) + "N" + rand_dna(rng, 5), ""]
    refs, alts = ["A", "C", "G", "T"], ["G", "T", "A", "C"]
    res = genomics.score_variants(model, tok, contexts, refs, alts, batch_size=3)
    assert np.abs(res.score - _reference_scores(hf, tok, contexts, refs, alts)).max() < 1e-4
    swapped = genomics.score_variants(model, tok, contexts, alts, refs)
    assert np.abs(res.score + swapped.score).max() < 1e-6
    assert np.allclose(res.p_ref, swapped.p_alt) and (res.p_ref > 0).all()
    probs = genomics.base_probabilities(model, tok, contexts)
    assert np.all(sum(probs[b] for b in "ACGT") <= 1 + 1e-6)  # the specials hold the rest of the mass
    ctx, ref = genomics.variant_context("ACGTACGTAC", 7, context_bp=4)
    assert (ctx, ref) == ("TACG", "T")
    with pytest.raises(ValueError, match="one of A, C, G, T"):
        genomics.score_variants(model, tok, ["ACGTAC"], ["N"], ["A"])
    with pytest.raises(ValueError, match="one of A, C, G, T"):
        genomics.score_variants(model, tok, ["ACGTAC"], ["AC"], ["A"])


def test_embeddings_are_transformers_last_hidden_state(ckpt):
    path, hf = ckpt
    model, tok = genomics.load(path)
    rng = np.random.default_rng(2)
    seqs = [rand_dna(rng, n) for n in (30, 6, 61)]
    emb = genomics.embed(model, tok, seqs, batch_size=2)
    assert emb.shape == (3, 32)
    for s, e in zip(seqs, emb):
        ids = torch.tensor([tok.encode("<s>" + s + "<s>", add_special_tokens=False)])
        with torch.no_grad():
            ref = hf.model(ids).last_hidden_state[0, -1]
        assert max_abs(e, ref) < 1e-4
    short = genomics.embed(model, tok, [seqs[2]], max_tokens=4)  # right-truncated: '<s>' + the first 3 6-mers
    with torch.no_grad():
        ref = hf.model(torch.tensor([tok.encode("<s>" + seqs[2][:18], add_special_tokens=False)])).last_hidden_state
    assert max_abs(short[0], ref[0, -1]) < 1e-4


def test_cli(ckpt, tmp_path, capsys):
    path = str(ckpt[0])
    assert main(["dna", "generate", path, "--sequence", "ACGTACGGATCC", "--max-new-tokens", "3", "--seed", "1"]) == 0
    out = capsys.readouterr().out.split()
    assert out[0] == ">generated_0" and len(out[1]) == 18 and set(out[1]) <= set("ACGT")
    fasta = ">a\nACGTACGGATCCACGTAC\nGGATCCACGTACGGATCCAAAA\n>b\nacgtacggatccacgtacggatccacgtac\n"
    (tmp_path / "seqs.fa").write_text(fasta)
    assert main(["dna", "recover", path, "--input", str(tmp_path / "seqs.fa"), "--gen-tokens", "2"]) == 0
    assert "mean accuracy" in capsys.readouterr().out
    assert main(["dna", "score", path, "--sequence", "ACGTACGGATCCACGTAC", "--position", "12", "--alt", "T"]) == 0
    lines = capsys.readouterr().out.strip().splitlines()
    assert lines[0].startswith("score") and lines[1].endswith("A\tT")
    (tmp_path / "v.tsv").write_text("ACGTACGG\tA\tG\nTTTTTT\tC\tC\n")
    assert main(["dna", "score", path, "--input", str(tmp_path / "v.tsv")]) == 0
    assert float(capsys.readouterr().out.strip().splitlines()[2].split()[0]) == pytest.approx(0.0, abs=1e-6)
    assert main(["dna", "embed", path, "--sequence", "ACGTAC", "--sequence", "GGG", "--output",
                 str(tmp_path / "e.npy")]) == 0
    assert np.load(tmp_path / "e.npy").shape == (2, 32)
    assert main(["dna", "score", path, "--sequence", "ACGT", "--position", "9", "--alt", "T"]) == 2
    assert "outside the sequence" in capsys.readouterr().err
    assert main(["generate", path, "--prompt", "ACGTAC", "--max-new-tokens", "2"]) == 0  # the DNA tokenizer is used


@pytest.mark.parametrize("sub", ["generate", "recover", "score", "embed"])
def test_cli_help(sub, capsys):
    with pytest.raises(SystemExit) as e:
        main(["dna", sub, "-h"])
    assert e.value.code == 0 and "model" in capsys.readouterr().out
