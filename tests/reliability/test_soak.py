"""The shortened decode soak (CI): 5k tokens of ``generate`` through every bounded-state mixer (from the registry).
``scripts/soak.py`` runs the 100k-token version and writes ``reports/soak/``."""

from __future__ import annotations

import pytest

from zoo.experiments.soak import bounded_mixers, held, soak

pytestmark = [pytest.mark.reliability("decode soak tokens"), pytest.mark.usefixtures("single_thread")]

TOKENS = 5000


def test_decode_soak(cases):
    """One model with a layer of each bounded-state mixer (one 5k-token run keeps CI short)."""
    r = soak(bounded_mixers(), TOKENS, sample_every=500)
    cases.add(TOKENS)
    assert r.state_constant, [s["state_bytes"] for s in r.samples]
    assert r.finite
    # resident memory after the first 20%: at most the output ids (8 bytes per token) + 1 MB of allocator noise
    # (before the fix, generate kept a tensor per token: ~1.25 MB per 1k tokens)
    assert held(r), f"RSS grew {r.rss_growth() / 1e6:.2f} MB over {r.samples[-1]['tokens'] - r.samples[1]['tokens']} " \
                    f"tokens: {[s['rss'] // 1024 for s in r.samples]} KB"
