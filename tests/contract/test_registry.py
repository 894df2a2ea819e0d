"""The mixer contract over the whole registry: every registered mixer x every argument set it declares.

A mixer registered from outside the package joins this suite when its module is imported before collection.
"""

import pytest
import torch

import zoo
from zoo.layers.base import BenchCase, Mixer
from zoo.testing import check_mixer

pytestmark = pytest.mark.usefixtures("single_thread")  # tiny tensors: one thread, no OpenMP stalls

CASES = [(name, args) for name in zoo.list_mixers() for args in zoo.get_mixer(name).example_args]


@pytest.mark.parametrize("name,args", CASES, ids=[f"{n}-{i}" for i, (n, _) in enumerate(CASES)])
def test_contract(name, args):
    report = check_mixer({"mixer": name, "mixer_args": args})
    assert report.passed == list(zoo.testing.PROPERTIES)


@pytest.mark.parametrize("name", zoo.list_mixers())
def test_mixer_describes_itself(name):
    cls: type[Mixer] = zoo.get_mixer(name)
    assert cls.example_args, f"{name}: declare at least one example argument set"
    assert cls.state_growth in ("constant", "linear")
    assert set(cls.dtypes) <= {"float16", "bfloat16"}
    for args in cls.example_args:
        flops = cls.flops(32, {**zoo.testing.GROUP_DEFAULTS.get("attention", {}), **args}
                          if "attention" in cls.arg_groups else args, T=16)
        assert isinstance(flops, int) and flops > 0
        decode = cls.flops(32, {**zoo.testing.GROUP_DEFAULTS.get("attention", {}), **args}
                           if "attention" in cls.arg_groups else args, T=1, context=15)
        assert 0 < decode < flops
    for case in cls.bench_cases:
        assert isinstance(case, BenchCase) and set(case.args) == {"full", "quick"}
        for size in ("full", "quick"):
            a = dict(case.args[size])
            cls(a.pop("d_model"), 0, **a)  # the declared sizes build
    if cls.demo_args is not None:
        cls(64, 0, **{**({"num_heads": 4} if "attention" in cls.arg_groups else {}), **cls.demo_args})


def test_attention_flops_count_every_causal_pair():
    """Full attention: T (T + 1) / 2 pairs per head from an empty state, context + 1 keys per decode token."""
    a = {"num_heads": 4, "num_kv_heads": 2, "head_dim": 8}
    proj = lambda T: 2 * T * 32 * (2 * 4 * 8 + 2 * 2 * 8)  # noqa: E731
    attn = zoo.get_mixer("attention")
    assert attn.flops(32, a, T=10) == proj(10) + 4 * 8 * 4 * 55
    assert attn.flops(32, a, T=1, context=10) == proj(1) + 4 * 8 * 4 * 11
    assert attn.flops(32, a, T=3, batch=2, context=5) == 2 * (proj(3) + 4 * 8 * 4 * (6 + 7 + 8))
    torch.manual_seed(0)
