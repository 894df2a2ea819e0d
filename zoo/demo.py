"""The README's main job (``zoo demo``): offline, CPU, well under two minutes.

Builds a small hybrid model from the registry (every sequence mixer available, interleaved), trains it
for a few seconds on an embedded text with the byte tokenizer, saves and reloads it (logits identical),
generates with cached per-layer states, then swaps layers and reports what changed.
"""

from __future__ import annotations

import tempfile
import time
from collections.abc import Callable
from pathlib import Path

import torch
from tqdm.auto import tqdm

import zoo
from zoo.tokenizers import ByteTokenizer

TEXT = (
    "A long context model reads the whole book before it answers. Attention looks back at every token; "
    "a sliding window looks back at the last few hundred; a state space model carries a fixed-size state "
    "forward and forgets slowly. A hybrid mixes them, layer by layer, and the zoo lets you swap one for "
    "another and measure what changes. "
) * 4



def demo_mixers() -> list[tuple[str, dict]]:
    """Every registered mixer that declares ``demo_args``, in registry order (a mixer registered from outside the
    package joins the demo too)."""
    return [(name, dict(zoo.get_mixer(name).demo_args)) for name in zoo.list_mixers()
            if zoo.get_mixer(name).demo_args is not None]


def demo_config() -> zoo.ZooConfig:
    """Two rounds of the demo mixers, each block with an MLP, d_model 64 (the mixers' own head defaults)."""
    mixers = demo_mixers()
    layers = [{"mixer": name, "mixer_args": args, "mlp": {"intermediate_size": 192}} for name, args in mixers * 2]
    tok = ByteTokenizer()
    return zoo.ZooConfig(
        vocab_size=tok.vocab_size, d_model=64, n_layers=len(layers), layers=layers, tie_embeddings=True,
        bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id, pad_token_id=tok.pad_token_id,
        max_position_embeddings=1024, name="zoo-demo-hybrid",
    )


def demo_swap(config: zoo.ZooConfig) -> dict[str, dict]:
    """Swap the layers of one demo mixer for another of the same argument group (its weights then carry over
    unchanged, e.g. full attention -> a sliding window), or else for the next demo mixer."""
    mixers = demo_mixers()
    groups = {name: set(zoo.get_mixer(name).arg_groups) for name, _ in mixers}
    pairs = [(a, b) for a, _ in mixers for b, _ in mixers if a != b and groups[a] & groups[b]]
    src, dst = pairs[0] if pairs else (mixers[0][0], mixers[1 % len(mixers)][0])
    layers = [i for i, ls in enumerate(config.layers) if ls.mixer == src]
    return {",".join(map(str, layers)): {"mixer": dst, "mixer_args": dict(zoo.get_mixer(dst).demo_args)}}


def train(model: zoo.ZooForCausalLM, ids: torch.Tensor, steps: int, seq_len: int = 96, lr: float = 3e-3,
          progress: bool = True) -> list[float]:
    opt = torch.optim.AdamW(model.parameters(), lr=lr)
    g = torch.Generator().manual_seed(0)
    losses = []
    model.train()
    bar = tqdm(range(steps), desc="training", unit="step", disable=not progress, leave=False)
    for _ in bar:
        starts = torch.randint(0, ids.numel() - seq_len - 1, (8,), generator=g)
        batch = torch.stack([ids[s:s + seq_len] for s in starts.tolist()])
        loss = model(batch, labels=batch).loss
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(loss.item())
        bar.set_postfix(loss=f"{losses[-1]:.3f}", refresh=False)
    return losses


def run_demo(steps: int = 150, out_dir: str | None = None, print_fn: Callable[[str], None] = print,
             threads: int = 1, progress: bool = True) -> dict:
    """``threads``: intra-op threads while the demo runs. The demo's tensors are tiny, so one thread is the
    fastest choice and keeps the run time independent of other load on the machine (with two or more threads,
    OpenMP barriers stall whenever another process holds a core: 25 s idle became 280 s on a busy 2-core box)."""
    previous = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        return _run_demo(steps, out_dir, print_fn, progress)
    finally:
        torch.set_num_threads(previous)


def _run_demo(steps: int, out_dir: str | None, print_fn: Callable[[str], None], progress: bool) -> dict:
    t0 = time.perf_counter()
    torch.manual_seed(0)
    tok = ByteTokenizer()
    config = demo_config()
    model = zoo.create_model(config)
    print_fn(f"zoo {zoo.__version__} | mixers registered: {', '.join(zoo.list_mixers())}")
    print_fn(f"demo model: {config.n_layers} layers, {model.num_parameters():,} parameters")
    for i, layer in enumerate(config.layers):
        print_fn(f"  layer {i}: {layer.spec_string}")

    ids = torch.tensor(tok.encode(TEXT, add_bos=False))
    losses = train(model, ids, steps, progress=progress)
    print_fn(f"trained {steps} steps on the embedded text: loss {losses[0]:.3f} -> {losses[-1]:.3f}")
    model.eval()

    probe = torch.tensor([tok.encode(TEXT[:160], add_bos=False)])  # longer than the demo windows
    with torch.no_grad():
        ref_logits = model(probe).logits
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(out_dir or tmp) / "zoo-demo-hybrid"
        model.save_pretrained(path)
        reloaded = zoo.from_pretrained(path)
        with torch.no_grad():
            same = torch.equal(reloaded(probe).logits, ref_logits)
        print_fn(f"saved to {path.name}/ ({', '.join(sorted(p.name for p in path.iterdir()))}); "
                 f"reloaded logits identical: {same}")

    prompts = tok(["A hybrid mixes", "Attention looks back at"], add_bos=False)  # trained without <bos>
    out = reloaded.generate(prompts["input_ids"], attention_mask=prompts["attention_mask"], max_new_tokens=40)
    samples = [tok.decode(row[prompts["input_ids"].shape[1]:]) for row in out]
    for p, s in zip(["A hybrid mixes", "Attention looks back at"], samples):
        print_fn(f"generate: {p!r} -> {s!r}")

    states = reloaded.init_states(1)
    with torch.no_grad():
        reloaded(probe, states=states)
    bytes_before = states.nbytes
    swap = demo_swap(reloaded.config)
    before = {k: v.clone() for k, v in reloaded.state_dict().items()}
    zoo.swap_layers(reloaded, swap)
    after = reloaded.state_dict()
    reused = sum(1 for k, v in after.items() if k in before and before[k].shape == v.shape
                 and torch.equal(before[k], v))
    states = reloaded.init_states(1)
    with torch.no_grad():
        new_logits = reloaded(probe, states=states).logits
    shown = {sel: zoo.LayerSpec(**spec).spec_string for sel, spec in swap.items()}
    print_fn(f"swap_layers({shown}): {reused}/{len(after)} tensors reused unchanged; "
             f"max |logit change| {(new_logits - ref_logits).abs().max():.3f}; "
             f"state bytes for {probe.shape[1]} tokens: {bytes_before} -> {states.nbytes}")
    elapsed = time.perf_counter() - t0
    print_fn(f"demo finished in {elapsed:.1f} s")
    return {"losses": losses, "reload_identical": same, "samples": samples, "swap": swap, "reused": reused,
            "elapsed": elapsed}
