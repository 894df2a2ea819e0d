"""zoo.train: schedule, optimizer groups, packed batches with seq_idx, gradient accumulation, the loop and its hook."""

import dataclasses
import math

import pytest
import torch

import zoo
from zoo.train import (
    Batch,
    TrainConfig,
    Trainer,
    causal_lm_loss,
    concat_batches,
    lr_factor,
    make_optimizer,
    packed_batches,
)

pytestmark = pytest.mark.usefixtures("single_thread")


def tiny(mixers="attention"):
    torch.manual_seed(0)
    return zoo.create_model(zoo.ZooConfig.from_dict({
        "vocab_size": 32, "d_model": 16, "n_layers": 2, "mixers": mixers, "mlp": {"intermediate_size": 32},
        "mixer_defaults": {"attention": {"num_heads": 2}}}))


def test_schedule_warms_up_then_follows_the_cosine():
    cfg = TrainConfig(steps=110, warmup_steps=10, min_lr_ratio=0.1)
    assert [lr_factor(s, cfg) for s in range(3)] == pytest.approx([0.1, 0.2, 0.3])
    assert lr_factor(9, cfg) == 1.0 and lr_factor(10, cfg) == 1.0
    assert math.isclose(lr_factor(60, cfg), 0.1 + 0.9 * 0.5)  # half way through the cosine
    assert math.isclose(lr_factor(110, cfg), 0.1) and math.isclose(lr_factor(500, cfg), 0.1)
    with pytest.raises(ValueError, match="steps must be a positive int"):
        TrainConfig(steps=0)


def test_optimizer_groups_skip_frozen_and_do_not_decay_vectors():
    model = tiny()
    zoo.swap_layers(model, "1: attention", trainable="swapped_blocks")
    opt = make_optimizer(model, TrainConfig(weight_decay=0.3))
    decay, no_decay = opt.param_groups
    assert decay["weight_decay"] == 0.3 and no_decay["weight_decay"] == 0.0
    ids = {id(p) for g in opt.param_groups for p in g["params"]}
    assert ids == {id(p) for p in model.layers[1].parameters()}
    assert {id(p) for p in no_decay["params"]} == {id(model.layers[1].norm.weight), id(model.layers[1].mlp_norm.weight)}
    assert all(p.dim() >= 2 for p in decay["params"])


def test_packed_batches_mark_document_boundaries():
    stream = torch.arange(100)
    doc_ids = torch.repeat_interleave(torch.arange(4), torch.tensor([10, 40, 30, 20]))
    g = torch.Generator().manual_seed(0)
    b = next(packed_batches(stream, doc_ids, 32, 8, generator=g))
    for ids, seq, lab in zip(b.input_ids, b.seq_idx, b.labels):
        assert (ids[1:] - ids[:-1] == 1).all()
        docs = doc_ids[ids]
        assert torch.equal(seq, docs - docs[0])
        starts = torch.nonzero(docs[1:] != docs[:-1]).flatten() + 1
        assert (lab[starts] == -100).all() and (lab != -100).sum() == 32 - len(starts)
    mixed = next(concat_batches(packed_batches(stream, doc_ids, 16, 2, generator=g),
                                packed_batches(stream, None, 16, 3, generator=g)))
    assert mixed.input_ids.shape == (5, 16) and (mixed.seq_idx[2:] == 0).all()
    assert torch.equal(mixed.labels[2:], mixed.input_ids[2:])


def test_gradient_accumulation_equals_the_full_batch():
    a, b = tiny(), tiny()
    ids = torch.randint(0, 32, (4, 12), generator=torch.Generator().manual_seed(1))
    cfg = TrainConfig(steps=1, lr=1e-2, warmup_steps=0, grad_clip=None)
    Trainer(a, config=cfg).step([Batch(ids)])
    Trainer(b, config=dataclasses.replace(cfg, grad_accum=2)).step([Batch(ids[:2]), Batch(ids[2:])])
    for pa, pb in zip(a.parameters(), b.parameters()):
        torch.testing.assert_close(pa, pb, atol=1e-6, rtol=0)


def test_loss_weights_and_ignored_labels():
    model = tiny()
    ids = torch.randint(0, 32, (2, 10))
    plain = causal_lm_loss(model, Batch(ids))
    assert torch.isclose(plain, model(ids, labels=ids).loss)
    w = torch.ones(2, 10)
    w[:, 5:] = 0.0
    labels = ids.clone()
    labels[:, 5:] = -100
    assert torch.isclose(causal_lm_loss(model, Batch(ids, loss_weight=w)), causal_lm_loss(model, Batch(ids, labels)))


def test_fit_learns_and_calls_the_eval_hook():
    model = tiny("mamba2(d_state=8, headdim=8, chunk_size=8)")
    seq = torch.randint(0, 32, (1, 24), generator=torch.Generator().manual_seed(2))
    calls = []

    def evaluate(m, step):
        assert not m.training and not torch.is_grad_enabled()
        calls.append(step)
        return {"loss": float(causal_lm_loss(m, Batch(seq)))}

    data = iter(lambda: Batch(seq.expand(2, -1), seq_idx=torch.zeros(2, 24, dtype=torch.long)), None)
    res = Trainer(model, config=TrainConfig(steps=40, lr=1e-2, warmup_steps=5, eval_every=15)).fit(
        data, eval_fn=evaluate, progress=False)
    assert calls == [15, 30, 40] and [e["step"] for e in res.evals] == calls
    assert res.evals[-1]["loss"] < 0.5 * res.losses[0]
    assert res.tokens == 40 * 2 * 24 and not model.training


def test_fit_with_zero_steps_trains_nothing_and_negative_steps_are_refused():
    model = tiny()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    seq = torch.randint(0, 32, (2, 16), generator=torch.Generator().manual_seed(3))
    trainer = Trainer(model, config=TrainConfig(steps=5, lr=1e-2))
    res = trainer.fit(iter(lambda: Batch(seq), None), steps=0, progress=False)
    assert res.losses == [] and all(torch.equal(before[k], v) for k, v in model.state_dict().items())
    with pytest.raises(ValueError, match="steps"):
        trainer.fit(iter(lambda: Batch(seq), None), steps=-1, progress=False)
