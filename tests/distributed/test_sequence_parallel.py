"""Sequence parallelism (gloo, CPU): every registered mixer that declares it gives, on R ranks holding T/R tokens
each, the outputs and gradients (input and parameters) of the one-rank parallel forward, to fp64 rounding; the
others refuse with ValueError. Registry-driven: no mixer is named except the ones the acceptance requires."""

from __future__ import annotations

import pytest
import torch
import torch.distributed as dist

from zoo.config import LayerSpec, ZooConfig
from zoo.distributed import SequenceComm, enable_sequence_parallel, run_local, shard_sequence
from zoo.layers.base import document_positions
from zoo.models.lm import build_mixer, init_weights, token_positions
from zoo.registry import get_mixer, list_mixers
from zoo.testing import GROUP_DEFAULTS

D_MODEL, B, T = 32, 3, 24


def _mixer(name: str, args: dict) -> torch.nn.Module:
    cls = get_mixer(name)
    defaults = {g: a for g, a in GROUP_DEFAULTS.items() if g in cls.arg_groups}
    config = ZooConfig(vocab_size=64, d_model=D_MODEL, n_layers=1, layers=[LayerSpec(name, args, None)],
                       mixer_defaults=defaults)
    torch.manual_seed(0)
    mixer = build_mixer(config, 0)
    mixer.apply(lambda m: init_weights(m, 0.2))  # larger weights than a model's: outputs far from zero
    return mixer.double()


def _inputs(kind: str) -> dict:
    """``kind``: "plain", "packed" (document starts at a rank boundary, inside a segment, and a document spanning
    segments) or "padded" (left padding)."""
    out: dict = {"seq_idx": None, "attention_mask": None}
    if kind == "packed":
        seq = torch.zeros(B, T, dtype=torch.long)
        seq[0, 7:], seq[0, 12:], seq[1, 13:], seq[2, 18:] = 1, 2, 1, 1
        out["seq_idx"] = seq
        out["positions"] = document_positions(seq)
    elif kind == "padded":
        mask = torch.ones(B, T, dtype=torch.long)
        mask[1, :5], mask[2, :13] = 0, 0
        out["attention_mask"] = mask
        out["positions"] = token_positions(B, T, mask)
    else:
        out["positions"] = torch.arange(T).expand(B, T)
    return out


def _cases() -> list[tuple[str, dict, str]]:
    cases = []
    for name in list_mixers():
        cls = get_mixer(name)
        for args in cls.example_args:
            cases.append((name, args, "plain"))
            cases.append((name, args, "padded"))
            if cls.packing_supported(args):
                cases.append((name, args, "packed"))
    return cases


def _worker(rank: int, world: int, cases: list) -> list:
    comm = SequenceComm()
    results = []
    for name, args, kind in cases:
        mixer = _mixer(name, args)
        try:
            mixer.check_sequence_parallel(world)
        except ValueError as e:
            results.append(("refused", str(e)))
            continue
        g = torch.Generator().manual_seed(1)
        x = torch.randn(B, T, D_MODEL, generator=g, dtype=torch.float64)
        dy = torch.randn(B, T, D_MODEL, generator=g, dtype=torch.float64)
        inp = _inputs(kind)
        x_full = x.clone().requires_grad_()
        y, _ = mixer(x_full, **inp)
        (y * dy).sum().backward()
        ref = {k: p.grad.clone() for k, p in mixer.named_parameters()}
        mixer.zero_grad()
        n = T // world
        cols = slice(rank * n, (rank + 1) * n)
        local = {k: None if v is None else v[:, cols] for k, v in inp.items()}
        x_loc = x[:, cols].clone().requires_grad_()
        y_loc = mixer.forward_sequence_parallel(x_loc, comm=comm, **local)
        (y_loc * dy[:, cols]).sum().backward()
        scale = y.abs().max().item()
        err = {"y": (y_loc - y[:, cols]).abs().max().item() / scale,
               "dx": (x_loc.grad - x_full.grad[:, cols]).abs().max().item() / x_full.grad.abs().max().item()}
        for k, p in mixer.named_parameters():  # each rank holds the gradient of its tokens: sum them
            grad = p.grad.clone()
            dist.all_reduce(grad)
            err[k] = (grad - ref[k]).abs().max().item() / max(ref[k].abs().max().item(), 1e-12)
        results.append(("ran", err))
    return results


@pytest.mark.parametrize("world", [2, 4])
def test_declared_mixers_match_one_rank_forward_and_backward(world: int) -> None:
    cases = _cases()
    per_rank = run_local(_worker, world, cases)
    declared = {name for name in list_mixers() if get_mixer(name).__dict__.get("sequence_parallel", False)}
    assert {"attention", "sliding_window", "mamba2"} <= declared
    ran = set()
    for i, (name, args, kind) in enumerate(cases):
        outcome = [r[i] for r in per_rank]
        status = {o[0] for o in outcome}
        assert len(status) == 1, (name, args, kind, outcome)
        if outcome[0][0] == "refused":  # undeclared, or declared but not with these arguments (its own reason)
            assert ("does not implement sequence parallelism" in outcome[0][1]) == (name not in declared), \
                (name, args, outcome[0][1])
            continue
        ran.add(name)
        for rank, (_, err) in enumerate(outcome):
            worst = max(err, key=err.get)
            assert err[worst] < 1e-10, f"{name}({args}) {kind}, rank {rank}/{world}: {worst} off by {err[worst]:.2e}"
    if world == 2:  # every declared mixer ran with at least one of its example arguments (4 ranks: some have
        assert ran == declared  # too few heads, e.g. infllmv2 with 2 KV-head groups, and refuse)


def _refuse_worker(rank: int, world: int) -> list[str]:
    import zoo

    msgs = []
    model = zoo.create_model({"vocab_size": 64, "d_model": 32, "n_layers": 2,
                              "mixers": {"0": "attention", "1": "mamba2(d_state=8, headdim=8, state_window=4)"},
                              "mixer_defaults": {"attention": {"num_heads": 4, "num_kv_heads": 2}}})
    with pytest.raises(ValueError, match="layer 1: mamba2: sequence parallelism") as e:
        enable_sequence_parallel(model)
    msgs.append(str(e.value))
    model = zoo.create_model({"vocab_size": 64, "d_model": 30, "n_layers": 1, "mixers": "attention",
                              "mixer_defaults": {"attention": {"num_heads": 3, "num_kv_heads": 1}}})
    with pytest.raises(ValueError, match="num_heads=3 divisible by 2"):
        enable_sequence_parallel(model)
    model = zoo.create_model({"vocab_size": 64, "d_model": 32, "n_layers": 1, "mixers": "mamba2(d_state=8, headdim=8)"})
    enable_sequence_parallel(model)
    ids = torch.randint(0, 64, (1, 8))
    with pytest.raises(ValueError, match="needs the global positions"):
        model.layers[0].mixer(torch.zeros(1, 8, 32))
    with pytest.raises(ValueError, match="parallel .training. forward only"):
        model(ids, states=model.init_states(1))
    with pytest.raises(ValueError, match="not divisible by the 2 sequence-parallel ranks"):
        shard_sequence(SequenceComm(), torch.zeros(1, 7, dtype=torch.long))
    shard = shard_sequence(SequenceComm(), torch.zeros(1, 4, dtype=torch.long))
    with pytest.raises(ValueError, match="shorter than the conv window"):
        model(shard.input_ids, positions=shard.positions)

    from zoo.distributed import parallelize, setup_parallelism

    with pytest.raises(ValueError, match="positive divisor of the world size 2"):
        setup_parallelism(3)
    par = setup_parallelism(2)
    with pytest.raises(ValueError, match="strategy='none' on 2 processes"):
        parallelize(zoo.create_model({"vocab_size": 64, "d_model": 32, "n_layers": 1}), "none", par)
    with pytest.raises(ValueError, match="strategy='zero3' is not one of"):
        parallelize(zoo.create_model({"vocab_size": 64, "d_model": 32, "n_layers": 1}), "zero3", par)
    return msgs


def test_refusals_name_the_layer_and_the_reason() -> None:
    msgs = run_local(_refuse_worker, 2)
    assert "cannot run this model sequence-parallel over 2 ranks" in msgs[0][0]
