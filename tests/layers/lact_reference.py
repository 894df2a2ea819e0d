"""An independent LaCT reference for the tests, written from the equations of the spec sheet
(``shared/reference/lact.md`` §1.3-1.5) and the released ``lact_swiglu`` code, float64, explicit loops.

It shares no code with ``zoo``: it reads a state dict with the *reference's* key names, computes the inner-loop
gradient with autograd of the loss ``-sum_t lr_t <v_t, f_W(k_t)>`` (not with the zoo's hand-written backward),
and walks every (row, head) and chunk in Python. Only for one unpadded sequence per row (positions 0..T-1).
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F

NS = [(4.0848, -6.8946, 2.9270), (3.9505, -6.3029, 2.6377), (3.7418, -5.5913, 2.3037), (2.8769, -3.1427, 1.2046),
      (2.8366, -3.0525, 1.2012)]


def rms(x, w, eps):
    return x / torch.sqrt(x.pow(2).mean(-1, keepdim=True) + eps) * w


def rope(x, theta):
    """``x [B, T, n, hd]`` rotate-half RoPE at positions ``0..T-1``; angles, cos and sin in fp32 as fla's
    ``RotaryEmbedding`` computes them (then cast to the input dtype)."""
    T, hd = x.shape[1], x.shape[-1]
    inv = 1.0 / theta ** (torch.arange(0, hd, 2, dtype=torch.float32) / hd)
    ang = torch.arange(T, dtype=torch.float32)[:, None] * inv
    cos = torch.cat([ang, ang], -1).cos().to(x.dtype)[None, :, None]
    sin = torch.cat([ang, ang], -1).sin().to(x.dtype)[None, :, None]
    x1, x2 = x[..., : hd // 2], x[..., hd // 2:]
    return x * cos + torch.cat([-x2, x1], -1) * sin


def ns5(G):
    X = G.T if G.shape[0] > G.shape[1] else G
    X = X / (X.norm() + 1e-7)
    for a, b, c in NS:
        A = X @ X.T
        X = a * X + (b * A + c * A @ A) @ X
    return X.T if G.shape[0] > G.shape[1] else X


def f(W, x):
    """SwiGLU fast weight of one head: ``W = (w0 [dH, dh], w1 [dh, dH], w2 [dH, dh])``, ``x [dh]``."""
    return W[1] @ (F.silu(W[0] @ x) * (W[2] @ x))


def ttt_one_head(W, q, k, v, lr, m, C, use_muon, prenorm=False, joint_muon=False):
    """One (row, head): ``q, k, v [T, dh]``, ``lr [T, 3]``, ``m [T]`` or None. Apply then update per chunk of C;
    updates after every *full* chunk. Returns outputs ``[T, dh]``, final weights and momenta."""
    T = q.shape[0]
    n = [w.norm(dim=1, keepdim=True) for w in W]  # per output row
    W, main = list(W), list(W)
    M = [torch.zeros_like(w) for w in W]
    out = torch.zeros_like(q)
    for s in range(0, T, C):
        e = min(s + C, T)
        for t in range(s, e):
            out[t] = f(W, q[t])
        if e - s < C:
            break
        dW = []
        for i in range(3):
            Wi = [w.detach().clone().requires_grad_(j == i) for j, w in enumerate(W)]
            loss = -sum(lr[t, i] * torch.dot(v[t], f(Wi, k[t])) for t in range(s, e))
            dW.append(-torch.autograd.grad(loss, Wi[i])[0])
        if m is not None:
            mbar = m[s:e].mean()
            dW = [d + mbar * Mi for d, Mi in zip(dW, M)]
            M = dW
        if use_muon:
            if joint_muon:
                dH = dW[0].shape[0]
                j = ns5(torch.cat([dW[0], dW[2]], 0))
                dW = [j[:dH], ns5(dW[1]), j[dH:]]
            else:
                dW = [ns5(d) for d in dW]
        base = main if prenorm else W
        main = [b + d for b, d in zip(base, dW)]
        W = [s_ / (s_.norm(dim=1, keepdim=True) + 1e-5) * ni for s_, ni in zip(main, n)]
    return out, W, M


def lact_layer(sd, cfg, x):
    """The ``LaCTSWIGLULayer`` forward of ``x [B, T, d]`` from a reference-named state dict ``sd`` and the layer
    arguments ``cfg`` (reference names). Returns ``y [B, T, d]`` and per (row, head) the final fast weights."""
    sd = {k: v.double() for k, v in sd.items()}
    x = x.double()
    B, T, d = x.shape
    H, nh, C = cfg["num_attn_heads"], cfg["num_lact_heads"], cfg["lact_chunk_size"]
    hd, dh = d // H, d // nh
    theta, window = cfg["rope_theta"], cfg["window_size"]
    qkv = x @ sd["qkv.weight"].T + (sd["qkv.bias"] if "qkv.bias" in sd else 0)
    q, k, v = qkv.chunk(3, -1)
    if cfg.get("attn_qk_norm", False):
        q, k = rms(q, sd["q_norm.weight"], 1e-5), rms(k, sd["k_norm.weight"], 1e-5)
    fq = q * sd["qk_scale"][:, 0] + sd["qk_offset"][:, 0]
    fk = k * sd["qk_scale"][:, 1] + sd["qk_offset"][:, 1]
    fv = v
    # sliding-window attention: j visible to i iff i - window < j <= i
    qa, ka, va = rope(q.view(B, T, H, hd), theta), rope(k.view(B, T, H, hd), theta), v.view(B, T, H, hd)
    s = torch.einsum("bihd,bjhd->bhij", qa, ka) / math.sqrt(hd)
    i, j = torch.arange(T)[:, None], torch.arange(T)[None, :]
    s = s.masked_fill(~((j <= i) & (i - j < window)), float("-inf"))
    o = torch.einsum("bhij,bjhd->bihd", s.softmax(-1), va).reshape(B, T, d)
    # fast-weight branch
    if cfg.get("qkv_silu", True):
        fq, fk = F.silu(fq), F.silu(fk)
        if not cfg.get("no_v_silu", False):
            fv = F.silu(fv)
    fq, fk = fq.view(B, T, nh, dh), fk.view(B, T, nh, dh)
    fq, fk = fq / (fq.norm(dim=-1, keepdim=True) + 1e-5), fk / (fk.norm(dim=-1, keepdim=True) + 1e-5)
    if not cfg.get("ttt_nope", False):
        fq, fk = rope(fq.reshape(B, T, H, hd), theta), rope(fk.reshape(B, T, H, hd), theta)
    fq, fk, fv = fq.reshape(B, T, nh, dh), fk.reshape(B, T, nh, dh), fv.reshape(B, T, nh, dh)
    dH = int(dh * cfg.get("inter_multi", 1))
    if cfg.get("w0_w2_low_rank", -1) > 0:
        eye = 0.5 * torch.eye(dH, dh, dtype=torch.float64)
        w0 = sd["w0.w_left"] @ sd["w0.w_right"] + eye
        w2 = sd["w2.w_left"] @ sd["w2.w_right"] + eye
    else:
        w0, w2 = sd["w0"], sd["w2"]
    w1 = sd["w1"]
    lr = F.softplus(x @ sd["lr_proj.weight"].T + sd["lr_proj.bias"] + (1e-3 + math.log(-math.expm1(-1e-3))))
    lr = lr.view(B, T, nh, 3)
    mom = None
    if cfg.get("use_momentum", False):
        mom = torch.sigmoid(x @ sd["momentum_proj.0.weight"].T + sd["momentum_proj.0.bias"])  # [B, T, nh]
    ys, finals = torch.zeros(B, T, nh, dh, dtype=torch.float64), {}
    for b in range(B):
        for h in range(nh):
            out, W, M = ttt_one_head((w0[h], w1[h], w2[h]), fq[b, :, h], fk[b, :, h], fv[b, :, h], lr[b, :, h],
                                     None if mom is None else mom[b, :, h], C, cfg.get("use_muon", False),
                                     cfg.get("ttt_prenorm", False), cfg.get("use_fused_kernel", False))
            ys[b, :, h] = rms(out, sd["ttt_norm.weight"], 1e-5)
            finals[b, h] = (W, M)
    if cfg.get("learnable_ttt_scale", False):
        ys = ys * F.silu(x @ sd["ttt_scale_proj.weight"].T + sd["ttt_scale_proj.bias"])[..., None]
    return (o + ys.reshape(B, T, d)) @ sd["o_proj.weight"].T, finals


def lact_lm(sd, cfg, ids):
    """``LaCTForCausalLM`` logits from a reference-format state dict (``model.layers.{i}.attn.*``, ...)."""
    eps = cfg["norm_eps"]
    h = sd["model.embeddings.weight"].double()[ids]
    for i in range(cfg["num_hidden_layers"]):
        p = f"model.layers.{i}."
        attn = {k[len(p) + 5:]: v for k, v in sd.items() if k.startswith(p + "attn.")}
        h = h + lact_layer(attn, cfg, rms(h, sd[p + "attn_norm.weight"].double(), eps))[0]
        z = rms(h, sd[p + "mlp_norm.weight"].double(), eps)
        g, u = z @ sd[p + "mlp.gate_proj.weight"].double().T, z @ sd[p + "mlp.up_proj.weight"].double().T
        h = h + (F.silu(g) * u) @ sd[p + "mlp.down_proj.weight"].double().T
    return rms(h, sd["model.norm.weight"].double(), eps) @ sd["lm_head.weight"].double().T
