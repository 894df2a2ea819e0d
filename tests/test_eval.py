"""Evaluations on cases with known answers: an oracle scores 100% on passkey and MQAR, a uniform model has loss
log(vocab), chance-level models score ~0; the data generators produce what they document."""

import math
from types import SimpleNamespace

import torch
from torch import nn

import zoo
from zoo.eval.corpus import load_corpus, pack_documents
from zoo.eval.efficiency import measure_efficiency
from zoo.eval.loss import eval_windows, loss_by_position
from zoo.eval.mqar import MQARSetup, mqar_accuracy, mqar_batch, run_mqar
from zoo.eval.passkey import SyntheticPasskey, TextPasskey, evaluate_passkey, passkey_batches


class Stub(nn.Module):
    """A model whose logits come from a function of the input ids (it sees only the past: logits[t] from ids[:t+1])."""

    def __init__(self, vocab_size: int, fn) -> None:
        super().__init__()
        self.config = SimpleNamespace(vocab_size=vocab_size)
        self.fn = fn
        self.anchor = nn.Parameter(torch.zeros(()))

    @property
    def device(self):
        return self.anchor.device

    def forward(self, ids):
        return SimpleNamespace(logits=self.fn(ids))


def uniform(V):
    return Stub(V, lambda ids: torch.zeros(*ids.shape, V))


def copy_first_occurrence(V, offset=1):
    """Predicts, at each position, the token that followed the first earlier occurrence of the current token (a
    perfect associative recall: MQAR's oracle)."""

    def fn(ids):
        out = torch.zeros(*ids.shape, V)
        for b, row in enumerate(ids.tolist()):
            first = {}
            for t, tok in enumerate(row):
                if tok in first and first[tok] + offset < t:
                    out[b, t, row[first[tok] + offset]] = 1.0
                first.setdefault(tok, t)
        return out

    return Stub(V, fn)


def passkey_oracle(task, V):
    """Reads the key after the needle's first piece in the past and spells it after the question."""
    needle_head = task.needle(torch.full((task.n_digits,), -1))[: list(task.needle(torch.full((task.n_digits,),
                                                                                                  -1))).index(-1)]
    q = task.question().tolist()

    def fn(ids):
        out = torch.zeros(*ids.shape, V)
        head = needle_head.tolist()
        for b, row in enumerate(ids.tolist()):
            key = None
            for t in range(len(row)):
                if key is None and row[max(0, t - len(head) + 1):t + 1] == head:
                    key = row[t + 1:t + 1 + task.n_digits]  # future tokens are only read once they are past
                if row[max(0, t - len(q) + 1):t + 1] == q and key is not None:
                    for j in range(task.n_digits):
                        if t + j < len(row):
                            out[b, t + j, key[j]] = 1.0
        return out

    return Stub(V, fn)


# ---------------------------------------------------------------------------------------------- loss
def test_uniform_model_has_loss_log_vocab_everywhere():
    windows = torch.randint(0, 259, (3, 40))
    res = loss_by_position(uniform(259), windows, train_length=10, bucket=8, progress=False)
    assert all(abs(r["loss"] - math.log(259)) < 1e-5 for r in res.rows)  # fp32 log-softmax
    assert abs(res.summary["in_distribution"] - math.log(259)) < 1e-5
    assert abs(res.summary["ppl_extrapolated"] - 259) < 1e-3
    assert [(r["position"], r["position_end"]) for r in res.rows] == [(0, 8), (8, 16), (16, 24), (24, 32), (32, 39)]


def test_perfect_predictor_has_zero_loss_and_windows_come_from_long_documents():
    docs = [torch.arange(5), torch.arange(100, 160), torch.arange(200, 290)]
    win = eval_windows(docs, 50, 4)
    assert win.shape == (4, 50)
    assert all(int(w[0]) in range(100, 111) or int(w[0]) in range(200, 241) for w in win)  # inside a long doc
    assert (win[:, 1:] - win[:, :-1] == 1).all()
    stream, ids = pack_documents(docs, eos_token_id=999)
    assert stream.numel() == 5 + 60 + 90 + 3 and int(ids[-1]) == 2
    peek = Stub(1000, lambda x: torch.nn.functional.one_hot(torch.roll(x, -1, 1), 1000).float() * 100)
    res = loss_by_position(peek, win, progress=False)
    assert res.summary["loss"] < 1e-6


def test_default_corpus_is_the_stdlib_split_by_file():
    held = load_corpus("stdlib", "heldout", max_chars=200_000)
    train = load_corpus(None, "train", max_chars=200_000)
    assert held.documents and train.documents
    assert not set(held.documents) & set(train.documents)
    assert "def " in held.documents[0] + train.documents[0]


def test_a_text_file_is_split_by_position(tmp_path):
    f = tmp_path / "t.txt"
    f.write_text("a" * 90 + "b" * 10)
    assert load_corpus(f, "train").documents == ["a" * 90]
    assert load_corpus(f, "heldout").documents == ["b" * 10]


# ---------------------------------------------------------------------------------------------- passkey
def test_passkey_samples_follow_the_protocol():
    task = TextPasskey()
    g = torch.Generator().manual_seed(0)
    ids, ans = task.sample(300, 0.5, g)
    text = bytes(ids.tolist()).decode()
    key = text[-5:]
    assert len(ids) == 300 and key.isdigit() and ans.tolist() == list(range(295, 300))
    assert f"The pass key is {key}. Remember it. {key} is the pass key. " in text
    assert text.endswith(f"What is the pass key? The pass key is {key}")
    at = text.index("The pass key")
    assert text[:at].endswith(". ") and abs(at - 0.5 * (300 - 63 - 38 - 5)) < 50  # at a sentence start near 50%
    batch = next(passkey_batches(task, 256, 3, generator=g, answer_weight=7.0))
    assert batch.input_ids.shape == (3, 256) and (batch.loss_weight[:, -5:] == 7.0).all()
    assert (batch.loss_weight[:, :-5] == 1.0).all()


def test_oracle_scores_100_and_uniform_0_on_passkey():
    for task, V, L in ((TextPasskey(), 259, 128), (SyntheticPasskey(vocab_size=40, n_digits=3), 40, 32)):
        kw = dict(lengths=[L, 2 * L], depths=[0.0, 0.5, 1.0], samples=3, train_length=L, progress=False)
        res = evaluate_passkey(passkey_oracle(task, V), task, **kw)
        assert all(r["accuracy"] == 1.0 for r in res.rows) and res.summary["in_distribution"] == 1.0
        assert res.summary["extrapolated"] == 1.0
        res = evaluate_passkey(uniform(V), task, **kw)  # argmax of a flat distribution: token 0, never a digit
        assert res.summary["in_distribution"] == 0.0


# ---------------------------------------------------------------------------------------------- MQAR
def test_mqar_rows_and_oracle():
    g = torch.Generator().manual_seed(0)
    ids, labels = mqar_batch(16, 64, 8, 128, g)
    for row, lab in zip(ids.tolist(), labels.tolist()):
        keys, values = row[0:16:2], row[1:16:2]
        assert len(set(keys)) == 8 and all(1 <= k < 64 for k in keys) and all(64 <= v < 128 for v in values)
        targets = [(t, v) for t, v in enumerate(lab) if v != -100]
        assert len(targets) == 8 and all(t >= 17 and t % 2 == 1 for t, _ in targets)
        assert sorted(row[t - 1] for t, _ in targets) == sorted(keys)  # every key asked once
        assert all(values[keys.index(row[t - 1])] == v for t, v in targets)
    assert mqar_accuracy(copy_first_occurrence(128), ids, labels) == 1.0
    assert mqar_accuracy(uniform(128), ids, labels) == 0.0


def test_run_mqar_trains_and_reports_each_length(single_thread):
    setup = MQARSetup(vocab_size=32, n_pairs=2, d_models=(16,), train_lengths=(16,), eval_lengths=(16, 32), steps=3,
                      batch_size=4, eval_samples=8)
    out = run_mqar({"attention": None, "window": "all: sliding_window(window=4)"}, setup, progress=False)
    rows = out["rows"]
    assert [(r["variant"], r["length"], r["in_distribution"]) for r in rows] == [
        ("attention", 16, True), ("attention", 32, False), ("window", 16, True), ("window", 32, False)]
    assert rows[1]["state_bytes"] > rows[0]["state_bytes"]  # a KV cache grows
    assert rows[3]["state_bytes"] == rows[2]["state_bytes"]  # a window does not
    assert set(out["summary"]) >= {"in_distribution", "extrapolated"}


def test_efficiency_rows(single_thread):
    model = zoo.create_model(zoo.ZooConfig.from_dict({
        "vocab_size": 32, "d_model": 16, "n_layers": 1, "mixers": "sliding_window(window=8)",
        "mixer_defaults": {"attention": {"num_heads": 2}}}))
    res = measure_efficiency(model, [16, 64], decode_tokens=2, repeats=1, progress=False)
    assert [r["length"] for r in res["rows"]] == [16, 64]
    assert res["rows"][0]["state_bytes"] == res["rows"][1]["state_bytes"] > 0
    assert all(r["forward_tokens_per_s"] > 0 and r["decode_ms_per_token"] > 0 for r in res["rows"])
