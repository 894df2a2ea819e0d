"""GENERator's 6-mer tokenizer: ids from the reference sheet's rules (computed here, independently of the
implementation), a per-piece Python oracle of the reference's splitting, batching, errors and the files."""

import hashlib
import json
import re

import numpy as np
import pytest
import torch

from zoo.tokenizers.dna import CURRENT_SPECIAL_TOKENS, EARLY_SPECIAL_TOKENS, DNAKmerTokenizer

DIGIT = {"A": 0, "T": 1, "C": 2, "G": 3}  # the sheet: A, T, C, G order (not ACGT)
# The sheet's special tokens (current revision): ids 0-4, 5-10, then 11-31.
SHEET_SPECIALS = ("<oov> <s> </s> <pad> <mask> <bog> <eog> <bok> <eok> <+> <-> <cds> <pseudo> <tRNA> <rRNA> <ncRNA> "
                  "<miscRNA> <mam> <vrt> <inv> <pln> <fng> <prt> <arc> <bct> <mit> <plt> <plm> <vir> <sp0> <sp1> "
                  "<sp2>").split()
# sha256 of the hub's vocab.txt (48,399 bytes) at the pinned revisions, as a third-party pin file records it
HUB_VOCAB_SHA256 = "068e0d76ca42ac672ade448afb2462ce4bd800a1fc1ad863d0b65992d90cf881"


def kmer_id(kmer: str) -> int:
    """The sheet: id = 32 + sum_p digit(base_p) * 4^(5-p)."""
    assert len(kmer) == 6
    return 32 + sum(DIGIT[b] * 4 ** (5 - p) for p, b in enumerate(kmer))


def oracle_ids(text: str, specials=SHEET_SPECIALS, k: int = 6) -> list[int]:
    """The reference's splitting, written out per piece: special literal, else [A-Z]{k}|[A-Z]+, else one char."""
    vocab = {t: i for i, t in enumerate(specials)}
    special_re = re.compile("|".join(re.escape(t) for t in specials))
    dna_re = re.compile(f"[A-Z]{{{k}}}|[A-Z]+")
    out, pos = [], 0
    while pos < len(text):
        m = special_re.match(text, pos) or dna_re.match(text, pos)
        piece = m.group() if m else text[pos]
        pos += len(piece)
        if piece in vocab:
            out.append(vocab[piece])
        elif len(piece) == k and set(piece) <= set("ACGT"):
            out.append(32 + sum(DIGIT[b] * 4 ** (k - 1 - p) for p, b in enumerate(piece)))
        else:
            out.append(0)
    return out


@pytest.fixture(scope="module")
def tok():
    return DNAKmerTokenizer()


def test_special_tokens_match_the_sheet(tok):
    assert list(CURRENT_SPECIAL_TOKENS) == SHEET_SPECIALS and len(tok) == tok.vocab_size == 4128
    for i, t in enumerate(SHEET_SPECIALS):
        assert tok.encode(t, add_special_tokens=False) == [i]
    named = (tok.unk_token_id, tok.bos_token_id, tok.eos_token_id, tok.pad_token_id, tok.mask_token_id)
    assert named == (0, 1, 2, 3, 4)
    assert tok.special_token_ids == list(range(32))


def test_hand_built_sequences(tok):
    enc = lambda s: tok.encode(s, add_special_tokens=False)  # noqa: E731
    assert enc("AAAAAA") == [32] == [kmer_id("AAAAAA")]
    assert enc("AAAAAT") == [33] and enc("TTTTTT") == [1397] and enc("GGGGGG") == [4127] == [kmer_id("GGGGGG")]
    assert enc("ACGTAC") == [kmer_id("ACGTAC")]
    seq = "GATTACAGGCCTTAACGT"  # 3 whole 6-mers
    assert enc(seq) == [kmer_id(seq[i:i + 6]) for i in (0, 6, 12)]
    # a trailing partial k-mer: one <oov> appended
    assert enc(seq + "TTA") == [kmer_id(seq[i:i + 6]) for i in (0, 6, 12)] + [0]
    assert enc("ACG") == [0]
    # a k-mer holding N (or any other upper-case non-ACGT letter) is <oov>; the others are untouched
    assert enc("AAAAAANAAAAAGGGGGG") == [32, 0, 4127]
    assert enc("AAAAAARAAAAA") == [32, 0]
    # specials inside the DNA; a run is cut into k-mers from its own start
    assert enc("<cds>AAAAAAC<+>TTTTTT</s>") == [11, 32, 0, 9, 1397, 2]
    # the sheet's pinned vectors (add_special_tokens=True prepends <s>: a double BOS with a literal '<s>')
    assert tok.encode("<s>ACGTNACGTNAC") == [1, 1, 0, 0]
    assert tok.encode("<s>AAAAAATTTTTT") == [1, 1, 32, 1397]
    assert tok.encode("AAAAAA") == [1, 32]  # add_bos_token=True, add_eos_token=False


def test_matches_the_per_piece_oracle_on_random_text():
    tok = DNAKmerTokenizer(unknown="oov")  # any text, mapped as the reference does
    rng = np.random.default_rng(0)
    alphabet = list("ACGT") * 6 + list("NRX") + ["<s>", "</s>", "<cds>", "<sp2>", "<", "a", " ", "\n", "é", "<oov>"]
    for _ in range(200):
        text = "".join(rng.choice(alphabet, rng.integers(0, 60)))
        assert tok.encode(text, add_special_tokens=False) == oracle_ids(text), text


def test_decode_inverts_encode_on_clean_dna(tok):
    rng = np.random.default_rng(1)
    for n in (0, 6, 12, 600, 6 * 1001):
        x = "".join(rng.choice(list("ACGT"), n))
        assert tok.decode(tok.encode(x, add_special_tokens=False)) == x
        assert tok.decode(tok.encode(x), skip_special_tokens=True) == x
        assert tok.decode(tok.encode(x)) == "<s>" + x
    assert tok.decode(torch.tensor([1, 32, 11, 0, 4127])) == "<s>AAAAAA<cds><oov>GGGGGG"
    # transformers' special tokens (ids 0-4) are skipped, the annotation tokens are not
    assert tok.decode([1, 32, 11, 0, 3, 4127], skip_special_tokens=True) == "AAAAAA<cds>GGGGGG"
    with pytest.raises(ValueError, match="out of range"):
        tok.decode([4128])


@pytest.mark.parametrize("bad, where", [("acgtac", "'a' at position 0"), ("ACGT ACG", "' ' at position 4"),
                                        ("ACGTAC\n", "'\\n' at position 6"), ("ACGTXA", "'X' at position 4"),
                                        ("AC<x>", "'<' at position 2"), ("ACGTÄ", "'Ä' at position 4")])
def test_non_dna_input_is_rejected(tok, bad, where):
    with pytest.raises(ValueError, match=re.escape(where)):
        tok.encode(bad)
    with pytest.raises(TypeError):
        tok.encode(b"ACGTAC")


def test_batch_padding_truncation_and_masks(tok):
    a, b = "AAAAAATTTTTT", "GGGGGG"
    right = tok([a, b], padding=True, return_tensors="pt")
    assert right["input_ids"].tolist() == [[1, 32, 1397], [1, 4127, 3]]
    assert right["attention_mask"].tolist() == [[1, 1, 1], [1, 1, 0]]
    left = tok(["<s>" + a, "<s>" + b], add_special_tokens=False, padding=True, padding_side="left",
               return_tensors="pt")
    assert left["input_ids"].tolist() == [[1, 32, 1397], [3, 1, 4127]]
    assert left["attention_mask"].tolist() == [[1, 1, 1], [0, 1, 1]]
    full = tok(b, padding="max_length", max_length=4, return_tensors="np")
    assert full["input_ids"].tolist() == [[1, 4127, 3, 3]]
    # truncation keeps room for the BOS; left truncation keeps the end of the sequence
    assert tok.encode(a + b, truncation=True, max_length=3) == [1, 32, 1397]
    assert tok(a + b, truncation=True, max_length=3, truncation_side="left")["input_ids"] == [1, 1397, 4127]
    assert tok([a, b])["input_ids"] == [[1, 32, 1397], [1, 4127]]
    with pytest.raises(ValueError, match="padding"):
        tok([a, b], return_tensors="pt")


def test_files_round_trip_and_match_the_reference(tok, tmp_path):
    left = DNAKmerTokenizer(padding_side="left")
    files = left.save_pretrained(tmp_path)
    assert sorted(f.name for f in files) == ["special_tokens_map.json", "tokenizer_config.json", "vocab.txt"]
    vocab = (tmp_path / "vocab.txt").read_bytes()
    assert len(vocab) == 48399 and hashlib.sha256(vocab).hexdigest() == HUB_VOCAB_SHA256
    cfg = json.loads((tmp_path / "tokenizer_config.json").read_text())
    assert cfg["tokenizer_class"] == "DNAKmerTokenizer" and cfg["k"] == 6
    assert (cfg["add_bos_token"], cfg["add_eos_token"], cfg["unk_token"], cfg["pad_token"]) == (True, False, "<oov>",
                                                                                                  "<pad>")
    assert cfg["auto_map"] == {"AutoTokenizer": ["tokenizer.DNAKmerTokenizer", None]}
    assert json.loads((tmp_path / "special_tokens_map.json").read_text()) == {
        "bos_token": "<s>", "eos_token": "</s>", "mask_token": "<mask>", "pad_token": "<pad>", "unk_token": "<oov>"}
    back = DNAKmerTokenizer.from_pretrained(tmp_path)
    assert back.padding_side == "left" and back.get_vocab() == tok.get_vocab()


def test_early_revision_vocab_is_honoured(tmp_path):
    kmers = [kmer for kmer in DNAKmerTokenizer().kmers]
    (tmp_path / "vocab.txt").write_text("".join(f"{t} {i}\n" for i, t in enumerate(list(EARLY_SPECIAL_TOKENS) + kmers)))
    tok = DNAKmerTokenizer.from_pretrained(tmp_path)
    assert tok.encode("<mam><cds><misc_RNA><sp8>GGGGGG", add_special_tokens=False) == [11, 17, 22, 31, 4127]
    (tmp_path / "vocab.txt").write_text("".join(f"{t} {i}\n" for i, t in enumerate(list(EARLY_SPECIAL_TOKENS) +
                                                                                     sorted(kmers))))
    with pytest.raises(ValueError, match="ATCG"):
        DNAKmerTokenizer.from_pretrained(tmp_path)


def test_first_base_groups(tok):
    groups = tok.first_base_ids()
    assert sorted(np.concatenate(list(groups.values())).tolist()) == list(range(32, 4128))
    for base, ids in groups.items():
        assert len(ids) == 1024 and all(tok.convert_ids_to_tokens(int(i))[0] == base for i in ids[::97])
