"""Decode soak: long generations with every bounded-state mixer, watching state bytes, process memory and outputs.

For each registered mixer declaring ``state_growth = "constant"`` (iterated from the registry, never by name), a small
model (two layers of that mixer at its ``demo_args`` or first ``example_args``) samples ``tokens`` new tokens with
``model.generate`` itself. Every ``sample_every`` tokens the harness records:

* the state bytes (``ModelState.nbytes`` of the states ``generate`` built): must stay constant;
* the process's resident memory (``/proc/self/statm``): must stay flat, i.e. grow by no more than the output ids
  (8 bytes per token per row, written into preallocated blocks) plus allocator noise;
* whether every logit so far was finite (a forward hook on the head accumulates ``isfinite`` without a host sync).

:func:`run` writes ``soak.md`` (a table per mixer, with the machine's load average), ``soak.csv`` (every sample) and
``soak.png`` (memory and state bytes over tokens) into a results directory; with ``keep=True`` the runs already in that
directory's ``soak.csv`` for other mixers stay in the report (a newly registered mixer is soaked alone).
``tests/reliability/test_soak.py`` runs a 5k-token version in CI; ``scripts/soak.py`` runs the 100k-token one.
"""

from __future__ import annotations

import csv
import os
import platform
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

import zoo
from zoo.registry import get_mixer, list_mixers

D_MODEL = 64
VOCAB = 256
LOAD_COLUMNS = ("load1", "load5", "load15")  # the machine's load average when the run ended
GROUP_DEFAULTS = {"attention": {"num_heads": 4, "num_kv_heads": 2}}


def bounded_mixers() -> list[str]:
    """Registered mixers whose decode state has a constant size (``state_growth == "constant"``)."""
    return [n for n in list_mixers() if get_mixer(n).state_growth == "constant"]


def soak_model(mixers: str | list[str], *, seed: int = 0, n_layers: int = 2) -> zoo.ZooForCausalLM:
    """A small random model: ``n_layers`` layers of one mixer, or one layer per mixer of a list; each mixer at its
    demo arguments, else its first example."""
    names = [mixers] * n_layers if isinstance(mixers, str) else list(mixers)
    layers, groups = [], {}
    for name in names:
        cls = get_mixer(name)
        args = dict(cls.demo_args if cls.demo_args is not None else (cls.example_args or ({},))[0])
        layers.append(zoo.LayerSpec(name, args, {"intermediate_size": 2 * D_MODEL}))
        groups.update({g: a for g, a in GROUP_DEFAULTS.items() if g in cls.arg_groups})
    torch.manual_seed(seed)
    config = zoo.ZooConfig(vocab_size=VOCAB, d_model=D_MODEL, n_layers=len(layers), mixer_defaults=groups,
                           layers=layers, max_position_embeddings=1 << 30, name="soak")
    return zoo.create_model(config).eval()


def rss_bytes() -> int:
    """Resident set size of this process (Linux); 0 where /proc is unavailable."""
    try:
        with open("/proc/self/statm") as f:
            return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")
    except OSError:
        return 0


@dataclass
class SoakResult:
    mixer: str
    spec: str
    tokens: int
    samples: list[dict[str, Any]] = field(default_factory=list)  # tokens, rss, state_bytes, finite, seconds
    load: tuple[float, float, float] = (0.0, 0.0, 0.0)

    @property
    def state_constant(self) -> bool:
        return len({s["state_bytes"] for s in self.samples}) == 1

    @property
    def finite(self) -> bool:
        return all(s["finite"] for s in self.samples)

    def rss_growth(self, warmup: float = 0.2) -> int:
        """Resident-memory growth (bytes) from the first sample after ``warmup`` (a fraction of the run: the
        allocator's first blocks, lazy imports) to the end."""
        after = [s for s in self.samples if s["tokens"] >= warmup * self.tokens] or self.samples
        return after[-1]["rss"] - after[0]["rss"]

    def output_bytes(self, warmup: float = 0.2) -> int:
        """Bytes of output ids produced over the same span (the growth generate is allowed)."""
        after = [s for s in self.samples if s["tokens"] >= warmup * self.tokens] or self.samples
        return 8 * (after[-1]["tokens"] - after[0]["tokens"])

    @property
    def tokens_per_second(self) -> float:
        return self.samples[-1]["tokens"] / max(self.samples[-1]["seconds"], 1e-9)


class _Recorder:
    """A ``generate`` streamer that samples memory, state bytes and finiteness every ``every`` tokens; it keeps no
    reference to the tokens it is given (so it does not itself grow with the run)."""

    def __init__(self, every: int, states: list, finite: list[torch.Tensor], total: int) -> None:
        self.every, self.states, self.finite, self.total = every, states, finite, total
        self.n, self.t0, self.samples = -1, time.perf_counter(), []
        self.bar = None

    def put(self, value: torch.Tensor) -> None:
        self.n += 1  # the first call is the prompt
        if self.n and (self.n % self.every == 0 or self.n == self.total):
            self.samples.append({"tokens": self.n, "rss": rss_bytes(), "state_bytes": self.states[0].nbytes,
                                 "finite": bool(self.finite[0]), "seconds": time.perf_counter() - self.t0})
            if self.bar is not None:
                self.bar.update(self.every)

    def end(self) -> None:
        pass


def soak(mixer: str | list[str], tokens: int, *, sample_every: int = 500, seed: int = 0, n_layers: int = 2,
         progress: bool = False) -> SoakResult:
    """Sample ``tokens`` new tokens with ``generate`` from a small model of ``mixer`` (``n_layers`` layers), or of
    a list of mixers (one layer each); see the module docstring."""
    model = soak_model(mixer, seed=seed, n_layers=n_layers)
    mixer = mixer if isinstance(mixer, str) else "+".join(mixer)
    states: list = []
    finite = [torch.ones((), dtype=torch.bool)]
    init_states = model.init_states

    def capture(*args: Any, **kwargs: Any):  # the harness keeps the states generate builds, to read their bytes
        st = init_states(*args, **kwargs)
        states.append(st)
        return st

    model.init_states = capture  # type: ignore[method-assign]
    hook = model.lm_head.register_forward_hook(
        lambda mod, inp, out: finite.__setitem__(0, finite[0] & torch.isfinite(out).all()))
    rec = _Recorder(sample_every, states, finite, tokens)
    if progress:
        from tqdm.auto import tqdm

        rec.bar = tqdm(total=tokens, desc=f"soak {mixer}", unit="tok", mininterval=5)
    prompt = torch.randint(0, VOCAB, (1, 16), generator=torch.Generator().manual_seed(seed))
    try:
        out = model.generate(prompt, max_new_tokens=tokens, do_sample=True, eos_token_id=[], streamer=rec,
                             generator=torch.Generator().manual_seed(seed))
    finally:
        hook.remove()
        if rec.bar is not None:
            rec.bar.close()
    if out.shape[1] != prompt.shape[1] + tokens:
        raise RuntimeError(f"soak {mixer}: generate returned {out.shape[1] - prompt.shape[1]} tokens, not {tokens}")
    spec = " + ".join(dict.fromkeys(ls.spec_string for ls in model.config.layers))
    load = os.getloadavg() if hasattr(os, "getloadavg") else (0.0, 0.0, 0.0)
    return SoakResult(mixer, spec, tokens, rec.samples, tuple(round(x, 2) for x in load))  # as the CSV keeps it


# ---------------------------------------------------------------------------------------------- reports
def held(r: SoakResult, slack: int = 1 << 20) -> bool:
    """The soak's verdict: constant state, finite outputs, resident memory within the output ids + ``slack``."""
    return r.state_constant and r.finite and r.rss_growth() <= r.output_bytes() + slack


def write_report(results: list[SoakResult], out: str | os.PathLike) -> Path:
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    with open(out / "soak.csv", "w", newline="") as f:
        w = csv.writer(f)
        w.writerow(["mixer", "spec", "tokens", "rss_bytes", "state_bytes", "finite", "seconds", *LOAD_COLUMNS])
        for r in results:
            for s in r.samples:
                w.writerow([r.mixer, r.spec, s["tokens"], s["rss"], s["state_bytes"], int(s["finite"]),
                            f"{s['seconds']:.2f}", *(f"{x:.2f}" for x in r.load)])
    lines = [
        "# Decode soak",
        "",
        f"`model.generate` (sampling, no EOS) from a 2-layer model (d_model {D_MODEL}, vocab {VOCAB}, batch 1) of each "
        "bounded-state mixer (`state_growth = \"constant\"` in the registry), on the CPU. Written by "
        "`python scripts/soak.py` (`zoo/experiments/soak.py`).",
        "",
        f"Machine: {platform.processor() or platform.machine()}, {os.cpu_count()} cores, torch {torch.__version__}, "
        f"{torch.get_num_threads()} thread(s). Load average when each run ended is in the table (the machine is "
        "shared; tokens/s is indicative only).",
        "",
        "Held = state bytes constant, every logit finite, and resident memory after the first 20% of the run grew by "
        "at most the output ids (8 bytes per token) + 1 MB.",
        "",
        "| mixer | tokens | state bytes (first -> last) | RSS growth after 20% | output ids over that span | "
        "outputs finite | tokens/s | load avg (1/5/15 min) | held |",
        "|---|---:|---|---:|---:|:---:|---:|---|:---:|",
    ]
    for r in results:
        first, last = r.samples[0]["state_bytes"], r.samples[-1]["state_bytes"]
        lines.append(
            f"| `{r.spec}` | {r.tokens:,} | {first:,} -> {last:,} | {r.rss_growth() / 1e6:+.2f} MB | "
            f"{r.output_bytes() / 1e6:.2f} MB | {'yes' if r.finite else 'NO'} | {r.tokens_per_second:.0f} | "
            f"{r.load[0]:.1f} / {r.load[1]:.1f} / {r.load[2]:.1f} | {'yes' if held(r) else 'NO'} |")
    lines += ["", "![memory and state bytes over tokens](soak.png)", ""]
    (out / "soak.md").write_text("\n".join(lines))
    _plot(results, out / "soak.png")
    return out


def read_results(path: str | os.PathLike) -> list[SoakResult]:
    """The runs recorded in a ``soak.csv`` written by :func:`write_report` (the run's total tokens = its last
    sample; the load average, when each run ended, from the ``load*`` columns, zeros in CSVs without them)."""
    results: dict[str, SoakResult] = {}
    with open(path, newline="") as f:
        for row in csv.DictReader(f):
            r = results.get(row["mixer"])
            if r is None:
                load = tuple(float(row.get(c) or 0.0) for c in LOAD_COLUMNS)
                r = results[row["mixer"]] = SoakResult(row["mixer"], row["spec"], 0, load=load)  # type: ignore[arg-type]
            r.samples.append({"tokens": int(row["tokens"]), "rss": int(row["rss_bytes"]),
                              "state_bytes": int(row["state_bytes"]), "finite": row["finite"] == "1",
                              "seconds": float(row["seconds"])})
            r.tokens = r.samples[-1]["tokens"]
    return list(results.values())


def _plot(results: list[SoakResult], file: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (a, b) = plt.subplots(1, 2, figsize=(11, 4))
    for r in results:
        t = [s["tokens"] for s in r.samples]
        a.plot(t, [s["rss"] / 1e6 for s in r.samples], label=r.spec)
        b.plot(t, [s["state_bytes"] / 1e3 for s in r.samples], label=r.spec)
    a.set(xlabel="tokens generated", ylabel="process RSS (MB)", title="resident memory during generate")
    b.set(xlabel="tokens generated", ylabel="state (KB)", title="ModelState.nbytes")
    for ax in (a, b):
        ax.grid(alpha=0.3)
    fig.legend(*a.get_legend_handles_labels(), loc="lower center", ncol=3, fontsize=8)
    fig.tight_layout(rect=(0, 0.1, 1, 1))
    fig.savefig(file, dpi=110)
    plt.close(fig)


def run(tokens: int, out: str | os.PathLike, *, mixers: list[str] | None = None, sample_every: int = 1000,
        seed: int = 0, progress: bool = True, keep: bool = False) -> list[SoakResult]:
    """Soak ``mixers`` (default: every bounded-state one) and write the report into ``out``; with ``keep``, the runs of
    other mixers already recorded in ``out/soak.csv`` stay in the report. Returns the new runs."""
    results = [soak(m, tokens, sample_every=sample_every, seed=seed, progress=progress)
               for m in (mixers or bounded_mixers())]
    old = read_results(Path(out) / "soak.csv") if keep and (Path(out) / "soak.csv").is_file() else []
    new = {r.mixer for r in results}
    write_report(sorted([r for r in old if r.mixer not in new] + results, key=lambda r: r.mixer), out)
    return results
