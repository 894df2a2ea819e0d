"""Shared test utilities: random-weight reference checkpoints built with transformers, and comparisons."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from zoo.kernels import native

# tests of the native CPU kernels: the same compiler lookup as zoo.kernels.native.library
needs_compiler = pytest.mark.skipif(native.find_compiler() is None,
                                    reason="no C++ compiler on this machine: the native kernels cannot be built")


def make_hf_llama(path: Path, *, vocab_size: int = 1001, tie: bool = False, seed: int = 0, **overrides):
    """A random-weight transformers LlamaForCausalLM (fp32, eager) saved with save_pretrained into ``path``."""
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(seed)
    kwargs = dict(
        vocab_size=vocab_size, hidden_size=64, intermediate_size=112, num_hidden_layers=3,
        num_attention_heads=8, num_key_value_heads=2, rope_theta=500000.0, max_position_embeddings=512,
        tie_word_embeddings=tie, rms_norm_eps=1e-5, attn_implementation="eager",
    )
    cfg = LlamaConfig(**{**kwargs, **overrides})
    model = LlamaForCausalLM(cfg).eval()
    with torch.no_grad():  # move norms off 1.0 so a swapped/missing norm cannot pass unnoticed
        for name, p in model.named_parameters():
            if "norm" in name:
                p.add_(torch.randn_like(p) * 0.1)
    model.save_pretrained(path)
    return model


def max_abs(a: torch.Tensor, b: torch.Tensor) -> float:
    return (a.float() - b.float()).abs().max().item()


def run_sm90_compile(script: str) -> None:
    """Run ``script`` (Triton AOT compiles to sm_90) in a fresh interpreter without TRITON_INTERPRET, so kernels
    are lowered for a real GPU with Triton's bundled ptxas; skips when this Triton has no ptxas."""
    import triton

    if not list((Path(triton.__file__).parent / "backends" / "nvidia" / "bin").glob("ptxas*")):
        pytest.skip("no bundled ptxas in this triton install")
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    root = Path(__file__).resolve().parents[1]
    env["PYTHONPATH"] = f"{root}{os.pathsep}{env.get('PYTHONPATH', '')}"
    out = subprocess.run([sys.executable, "-c", script], env=env, cwd=root, capture_output=True, text=True,
                         timeout=900)
    assert out.returncode == 0, out.stderr[-4000:]


def make_hf_generator(path: Path, *, seed: int = 0, hidden: int = 32, layers: int = 2, custom_class: bool = True):
    """A GENERator-shaped checkpoint: transformers LlamaForCausalLM (random weights, small dims, vocab 4128) saved
    with ``config.json`` naming the newer hub revisions' custom class (``GENERatorForCausalLM`` + ``auto_map``;
    the remote code itself is not written, nothing runs it), and the tokenizer files next to the weights."""
    import json

    from transformers import LlamaConfig, LlamaForCausalLM

    from zoo.tokenizers import DNAKmerTokenizer

    torch.manual_seed(seed)
    cfg = LlamaConfig(vocab_size=4128, hidden_size=hidden, intermediate_size=2 * hidden, num_hidden_layers=layers,
                      num_attention_heads=4, num_key_value_heads=2, rope_theta=500000.0, max_position_embeddings=16384,
                      rms_norm_eps=1e-5, tie_word_embeddings=False, bos_token_id=1, eos_token_id=2,
                      attn_implementation="eager")
    model = LlamaForCausalLM(cfg).eval()
    with torch.no_grad():  # norms off 1.0, as make_hf_llama
        for name, p in model.named_parameters():
            if "norm" in name:
                p.add_(torch.randn_like(p) * 0.1)
    model.save_pretrained(path)
    if custom_class:
        cfg = json.loads((path / "config.json").read_text())
        cfg["architectures"] = ["GENERatorForCausalLM"]
        cfg["auto_map"] = {"AutoModelForCausalLM": "modeling_generator.GENERatorForCausalLM"}
        (path / "config.json").write_text(json.dumps(cfg, indent=2))
    DNAKmerTokenizer().save_pretrained(path)
    return model


class FakeHfApi:
    """Stands in for the Hub (``huggingface_hub.HfApi``): ``upload_folder`` writes the folder into the local HF cache
    layout (``$HF_HUB_CACHE/models--org--name/snapshots/<sha>`` + ``refs/<revision>``), so that an offline
    ``from_pretrained`` (``HF_HUB_OFFLINE=1``) finds it. Every call is recorded in ``FakeHfApi.calls``."""

    calls: list = []
    SHA = "0123456789abcdef0123456789abcdef01234567"

    def __init__(self, token=None):
        pass

    def create_repo(self, repo_id, private=None, exist_ok=False, repo_type="model"):
        FakeHfApi.calls.append(("create_repo", repo_id, private))

    def create_branch(self, repo_id, branch, exist_ok=False, repo_type="model"):
        FakeHfApi.calls.append(("create_branch", repo_id, branch))

    def upload_folder(self, repo_id, folder_path, commit_message="", repo_type="model", revision=None):
        import shutil

        root = Path(os.environ["HF_HUB_CACHE"]) / f"models--{repo_id.replace('/', '--')}"
        snap = root / "snapshots" / FakeHfApi.SHA
        if snap.exists():
            shutil.rmtree(snap)
        shutil.copytree(folder_path, snap)
        (root / "refs").mkdir(parents=True, exist_ok=True)
        (root / "refs" / (revision or "main")).write_text(FakeHfApi.SHA)
        FakeHfApi.calls.append(("upload_folder", repo_id, commit_message, revision))
        return f"https://hub.invalid/{repo_id}/commit/{FakeHfApi.SHA}"


def make_word_tokenizer(path: Path, words: str = "the a cat dog sat on mat and ran fast slow big"):
    """A tiny word-level transformers tokenizer (no download) saved into ``path``; ids 0..2 are specials."""
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    vocab = {"<unk>": 0, "<s>": 1, "</s>": 2, **{w: i + 3 for i, w in enumerate(words.split())}}
    tk = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    tk.pre_tokenizer = pre_tokenizers.Whitespace()
    tok = PreTrainedTokenizerFast(tokenizer_object=tk, unk_token="<unk>", bos_token="<s>", eos_token="</s>")
    tok.save_pretrained(path)
    return tok
