"""PyTorch eager peer of Chimera's attention LM, for benchmarks/train_step.py. No jax here.

    .venv-torch/bin/python benchmarks/torch_peer.py --d-model 256 --layers 4 --heads 4 \
        --kv-heads 2 --windows 64,64,64,0 --batch 8 --seq-len 256 --steps 10
    .venv-torch/bin/python benchmarks/torch_peer.py --spec '{"d_model": 512, "layers": 8, ...}'

(`--spec` takes a JSON object or a path to one; its keys are the flag names with underscores and
override the flags.) Prints one JSON object: tokens/s (median and best of the timed steps after
the warm-up steps), the loss of every step, the parameter count, the SDPA masking used per layer.

The model is Chimera's `models.LM` with softmax-attention mixers, written again in plain torch:
tied embedding (N(0, init_std)), pre-norm blocks x + attn(norm(x)), x + swiglu(norm(x)), RMSNorm
with float32 statistics, RoPE rotate-half on positions 0..T-1, GQA (query head h reads kv head
h // (H / K)), SwiGLU down(silu(gate(x)) * up(x)), no biases, final RMSNorm, logits x @ E^T in
float32, mean cross-entropy. Projections into the residual stream (o, down) start with std
init_std / sqrt(2 * layers), as in Chimera. Params are float32; with --dtype bfloat16 every
matmul casts its input and weight to bf16 (as Chimera's Dense does), norms and RoPE compute in
float32, and the residual stream is bf16 -- no autocast.

Attention is `F.scaled_dot_product_attention`: `is_causal=True` for a full layer. A sliding-window
layer (window W) runs as chunked local attention, so that it skips the key blocks the window
leaves out, as Chimera's blocked attention does: queries in blocks of P = max(W, 64) tokens, each
block attending to its own key block and the previous one (2P keys) under a boolean mask (key j
visible to query i iff i - W < j <= i), one SDPA call over all blocks. Credited the same FLOPs as
Chimera (the W keys a query sees), neither side is credited work it does not skip.

Optimizer: AdamW(lr, betas (b1, b2), eps, weight_decay) with decay on matrices only (as
Chimera's optimizer mask), after global-norm clipping at --grad-clip (0 disables). Data: one
fixed batch of random bytes, numpy default_rng(seed).integers(0, vocab, (B, T + 1)), the same
as train_step.py feeds Chimera. --init-npz loads Chimera's initial weights (key names in
`load_npz`) so that the two loss trajectories can be compared step by step.
"""
from __future__ import annotations

import argparse
import json
import math
import os
import statistics
import sys
import time

import numpy as np


def _tune_host_allocator() -> str:
    """The host allocator settings of Chimera's side (train/hardware.py `tune_host_allocator`:
    one glibc arena, no mmap, 2 GiB trim threshold), so that neither side page-faults its freed
    buffers anew each step while the other reuses them. Before torch starts its threads."""
    if os.environ.get("CHIMERA_HOST_ALLOCATOR", "") == "default":
        return "system default"
    try:
        import ctypes
        libc = ctypes.CDLL("libc.so.6")
        ok = all(libc.mallopt(p, v) == 1 for p, v in ((-8, 1), (-4, 0), (-1, 2 ** 31 - 1)))
    except (OSError, AttributeError):
        ok = False
    return "glibc tuned (as Chimera's)" if ok else "system default (not glibc)"


HOST_ALLOCATOR = _tune_host_allocator()

import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402
from torch import nn  # noqa: E402

DEFAULTS = dict(vocab=256, d_model=256, layers=4, heads=4, kv_heads=None, head_dim=None, hidden=None,
                windows="0", norm_eps=1e-6, rope_theta=1e4, init_std=0.02, batch=8, seq_len=256,
                steps=10, warmup=2, seed=0, lr=3e-4, b1=0.9, b2=0.95, eps=1e-8, weight_decay=0.1,
                grad_clip=1.0, dtype="float32", gqa="native", init_npz=None, threads=None,
                force_bf16=False, serve=False)


class RMSNorm(nn.Module):
    def __init__(self, d: int, eps: float):
        super().__init__()
        self.scale = nn.Parameter(torch.ones(d))
        self.eps = eps

    def forward(self, x):
        return F.rms_norm(x.float(), (x.shape[-1],), self.scale, self.eps).to(x.dtype)


class Linear(nn.Module):
    """y = x @ W^T with W [d_out, d_in] float32, computed in `dtype` (Chimera's Dense)."""

    def __init__(self, d_in: int, d_out: int, std: float, dtype):
        super().__init__()
        self.weight = nn.Parameter(torch.randn(d_out, d_in) * std)
        self.dtype = dtype

    def forward(self, x):
        return F.linear(x.to(self.dtype), self.weight.to(self.dtype))


def rope(x, cos, sin):
    """x [B, T, H, D]; cos, sin [T, 1, D/2] float32 -> rotated x (rotate-half), in x.dtype."""
    d = x.shape[-1]
    xf = x.float()
    x1, x2 = xf[..., : d // 2], xf[..., d // 2:]
    return torch.cat([x1 * cos - x2 * sin, x2 * cos + x1 * sin], dim=-1).to(x.dtype)


class Attention(nn.Module):
    def __init__(self, d, heads, kv_heads, head_dim, window, std, out_std, dtype, gqa):
        super().__init__()
        self.h, self.k, self.hd, self.window, self.gqa = heads, kv_heads, head_dim, window, gqa
        self.q = Linear(d, heads * head_dim, std, dtype)
        self.k_proj = Linear(d, kv_heads * head_dim, std, dtype)
        self.v = Linear(d, kv_heads * head_dim, std, dtype)
        self.o = Linear(heads * head_dim, d, out_std, dtype)

    def forward(self, x, cos, sin):
        b, t, _ = x.shape
        q = rope(self.q(x).view(b, t, self.h, self.hd), cos, sin).transpose(1, 2)
        k = rope(self.k_proj(x).view(b, t, self.k, self.hd), cos, sin).transpose(1, 2)
        v = self.v(x).view(b, t, self.k, self.hd).transpose(1, 2)
        kw = {}
        if self.k != self.h:
            if self.gqa == "native":
                kw["enable_gqa"] = True
            else:  # query head h reads kv head h // G: repeat each kv head G times in a row
                g = self.h // self.k
                k, v = k.repeat_interleave(g, dim=1), v.repeat_interleave(g, dim=1)
        if self.window:
            o = local_attention(q, k, v, self.window, **kw)
        else:
            o = F.scaled_dot_product_attention(q, k, v, is_causal=True, **kw)
        return self.o(o.transpose(1, 2).reshape(b, t, self.h * self.hd))


def local_attention(q, k, v, window: int, **kw):
    """Causal sliding-window attention that skips the blocks outside the window.

    q [B, H, T, D], k / v [B, K, T, D] -> [B, H, T, D]. Queries in blocks of P >= window tokens;
    block n attends to key blocks n - 1 and n (zero-padded in front), key j visible to query i
    iff i - window < j <= i. One SDPA call with the blocks as a batch dimension before heads."""
    b, h, t, d = q.shape
    p = max(window, 64)
    n = -(-t // p)
    pad = n * p - t

    def blocks(x, front):  # [B, X, T, D] -> [B, n(+1), X, P, D]
        x = F.pad(x, (0, 0, front, pad))
        return x.view(x.shape[0], x.shape[1], -1, p, d).transpose(1, 2)

    qb = blocks(q, 0)
    kb, vb = blocks(k, p), blocks(v, p)  # one zero block in front
    kb = torch.cat([kb[:, :-1], kb[:, 1:]], dim=3)  # [B, n, K, 2P, D]: previous + own block
    vb = torch.cat([vb[:, :-1], vb[:, 1:]], dim=3)
    qi = torch.arange(n)[:, None, None] * p + torch.arange(p)[None, :, None]       # [n, P, 1]
    kj = torch.arange(n)[:, None, None] * p - p + torch.arange(2 * p)[None, None, :]  # [n, 1, 2P]
    mask = ((kj <= qi) & (qi - kj < window) & (kj >= 0))[:, None]  # [n, 1, P, 2P]
    o = F.scaled_dot_product_attention(qb, kb, vb, attn_mask=mask, **kw)  # [B, n, H, P, D]
    return o.transpose(1, 2).reshape(b, h, n * p, d)[:, :, :t]


class SwiGLU(nn.Module):
    def __init__(self, d, hidden, std, out_std, dtype):
        super().__init__()
        self.gate = Linear(d, hidden, std, dtype)
        self.up = Linear(d, hidden, std, dtype)
        self.down = Linear(hidden, d, out_std, dtype)

    def forward(self, x):
        return self.down(F.silu(self.gate(x)) * self.up(x))


class Block(nn.Module):
    def __init__(self, cfg, window, dtype):
        super().__init__()
        d, std = cfg["d_model"], cfg["init_std"]
        out_std = std / math.sqrt(2 * cfg["layers"])
        self.window = window
        self.mixer_norm = RMSNorm(d, cfg["norm_eps"])
        self.mixer = Attention(d, cfg["heads"], cfg["kv_heads"], cfg["head_dim"], window, std, out_std,
                               dtype, cfg["gqa"])
        self.mlp_norm = RMSNorm(d, cfg["norm_eps"])
        self.mlp = SwiGLU(d, cfg["hidden"], std, out_std, dtype)

    def forward(self, x, cos, sin):
        x = x + self.mixer(self.mixer_norm(x), cos, sin).to(x.dtype)
        return x + self.mlp(self.mlp_norm(x)).to(x.dtype)


class LM(nn.Module):
    def __init__(self, cfg, dtype):
        super().__init__()
        self.cfg, self.dtype = cfg, dtype
        self.embedding = nn.Parameter(torch.randn(cfg["vocab"], cfg["d_model"]) * cfg["init_std"])
        self.blocks = nn.ModuleList([Block(cfg, w, dtype) for w in cfg["window_per_layer"]])
        self.final_norm = RMSNorm(cfg["d_model"], cfg["norm_eps"])
        self._rope_cache = {}

    def _tables(self, t: int):
        """cos/sin [T, 1, D/2] for positions 0..T-1."""
        if t not in self._rope_cache:
            hd, theta = self.cfg["head_dim"], self.cfg["rope_theta"]
            inv = theta ** (-torch.arange(0, hd, 2, dtype=torch.float32) / hd)
            ang = torch.arange(t, dtype=torch.float32)[:, None] * inv
            self._rope_cache[t] = (ang.cos()[:, None, :], ang.sin()[:, None, :])
        return self._rope_cache[t]

    def forward(self, tokens):
        cos, sin = self._tables(tokens.shape[1])
        x = F.embedding(tokens, self.embedding).to(self.dtype)
        for blk in self.blocks:
            x = blk(x, cos, sin)
        x = self.final_norm(x)
        return F.linear(x.to(self.dtype), self.embedding.to(self.dtype)).float()


def load_npz(model: LM, path: str) -> None:
    """Chimera's initial weights: kernels are [d_in, d_out] (transposed here to torch's [out, in])."""
    z = np.load(path)
    t = lambda a: torch.from_numpy(np.ascontiguousarray(a))
    with torch.no_grad():
        model.embedding.copy_(t(z["embed"]))
        model.final_norm.scale.copy_(t(z["final_norm"]))
        for i, blk in enumerate(model.blocks):
            p = f"layers.{i}."
            blk.mixer_norm.scale.copy_(t(z[p + "mixer_norm"]))
            blk.mlp_norm.scale.copy_(t(z[p + "mlp_norm"]))
            for name, lin in (("q", blk.mixer.q), ("k", blk.mixer.k_proj), ("v", blk.mixer.v),
                              ("o", blk.mixer.o), ("gate", blk.mlp.gate), ("up", blk.mlp.up),
                              ("down", blk.mlp.down)):
                lin.weight.copy_(t(z[p + name].T))


def resolve(cfg: dict) -> dict:
    cfg = dict(cfg)
    cfg["kv_heads"] = cfg["kv_heads"] or cfg["heads"]
    cfg["head_dim"] = cfg["head_dim"] or cfg["d_model"] // cfg["heads"]
    # Chimera's default SwiGLU width: 8/3 d rounded up to a multiple of 64.
    cfg["hidden"] = cfg["hidden"] or -(-(8 * cfg["d_model"] // 3) // 64) * 64
    w = [int(x) for x in str(cfg["windows"]).split(",") if x != ""]
    cfg["window_per_layer"] = [w[i % len(w)] or None for i in range(cfg["layers"])]
    # A window covering the whole sequence is plain causal attention.
    cfg["window_per_layer"] = [None if x and x >= cfg["seq_len"] else x for x in cfg["window_per_layer"]]
    return cfg


def native_bf16() -> tuple[bool, str]:
    """Whether this CPU gives torch fast bf16 matmuls (oneDNN: AVX512-BF16 / AMX), and its ISA."""
    cap = torch.backends.cpu.get_cpu_capability()
    try:
        return bool(torch.ops.mkldnn._is_mkldnn_bf16_supported()), cap
    except (AttributeError, RuntimeError):
        return "AVX512" in cap, cap


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    for key, val in DEFAULTS.items():
        if isinstance(val, bool):
            ap.add_argument("--" + key.replace("_", "-"), action="store_true")
            continue
        kind = type(val) if val is not None else None
        if key in ("kv_heads", "head_dim", "hidden", "threads"):
            kind = int
        ap.add_argument("--" + key.replace("_", "-"), type=kind or str, default=val)
    ap.add_argument("--spec", help="JSON object or path to one; keys as the flags with underscores")
    args = ap.parse_args()
    cfg = vars(args)
    spec = cfg.pop("spec")
    if spec:
        extra = json.loads(open(spec).read() if os.path.exists(spec) else spec)
        unknown = set(extra) - set(DEFAULTS)
        if unknown:
            sys.exit(f"unknown spec keys {sorted(unknown)}; accepted: {sorted(DEFAULTS)}")
        cfg.update(extra)
    cfg = resolve(cfg)
    if cfg["threads"]:
        torch.set_num_threads(cfg["threads"])
    dtype = {"float32": torch.float32, "bfloat16": torch.bfloat16}[cfg["dtype"]]
    fast, cap = native_bf16()
    if dtype == torch.bfloat16 and not fast and not cfg["force_bf16"]:
        # Without AVX512-BF16/AMX, torch's CPU bf16 matmul falls back to a path that is orders of
        # magnitude slower than fp32 (a step of a small model takes minutes): not a useful peer.
        print(json.dumps({"skipped": f"torch has no fast bf16 matmul on this CPU (capability {cap}, "
                                     "oneDNN bf16 unsupported); --force-bf16 runs it anyway"}))
        return

    torch.manual_seed(cfg["seed"])
    model = LM(cfg, dtype)
    if cfg["init_npz"]:
        load_npz(model, cfg["init_npz"])
    params = list(model.parameters())
    n_params = sum(p.numel() for p in params)
    decay = [p for p in params if p.ndim >= 2]
    no_decay = [p for p in params if p.ndim < 2]
    opt = torch.optim.AdamW([{"params": decay, "weight_decay": cfg["weight_decay"]},
                             {"params": no_decay, "weight_decay": 0.0}],
                            lr=cfg["lr"], betas=(cfg["b1"], cfg["b2"]), eps=cfg["eps"])

    b, t, v = cfg["batch"], cfg["seq_len"], cfg["vocab"]
    data = np.random.default_rng(cfg["seed"]).integers(0, v, (b, t + 1))
    inputs = torch.from_numpy(data[:, :-1].astype(np.int64))
    targets = torch.from_numpy(data[:, 1:].astype(np.int64))

    def step() -> float:
        opt.zero_grad(set_to_none=True)
        logits = model(inputs)
        loss = F.cross_entropy(logits.view(-1, v), targets.reshape(-1))
        loss.backward()
        if cfg["grad_clip"]:
            torch.nn.utils.clip_grad_norm_(params, cfg["grad_clip"])
        opt.step()
        return loss.item()  # CPU torch is synchronous anyway

    def run(n: int) -> tuple[list[float], list[float]]:
        losses, times = [], []
        for _ in range(n):
            t0 = time.perf_counter()
            losses.append(step())
            times.append(time.perf_counter() - t0)
        return losses, times

    tokens = b * t
    masking = ["causal (is_causal=True)" if w is None else f"window {w}: chunked local attention, blocks of {max(w, 64)}"
               for w in cfg["window_per_layer"]]
    out = {
        "framework": f"torch {torch.__version__} eager", "threads": torch.get_num_threads(),
        "cpu_capability": cap, "native_bf16": fast,
        "python": sys.version.split()[0], "dtype": cfg["dtype"], "params": n_params,
        "batch": b, "seq_len": t, "tokens_per_step": tokens,
        "attention": "F.scaled_dot_product_attention", "masking": masking,
        "gqa": (cfg["gqa"] if cfg["kv_heads"] != cfg["heads"] else "none (MHA)"),
        "init": "chimera npz" if cfg["init_npz"] else "torch RNG",
        "omp_wait_policy": os.environ.get("OMP_WAIT_POLICY", "default"), "host_allocator": HOST_ALLOCATOR,
        "optimizer": (f"AdamW lr={cfg['lr']} betas=({cfg['b1']}, {cfg['b2']}) eps={cfg['eps']} "
                      f"wd={cfg['weight_decay']} (matrices only), clip={cfg['grad_clip'] or 'off'}"),
    }
    if cfg["serve"]:
        print(json.dumps(out), flush=True)
        for line in sys.stdin:
            losses, times = run(int(json.loads(line)["steps"]))
            print(json.dumps({"step_s": times, "losses": losses}), flush=True)
        return
    losses, times = run(cfg["warmup"] + cfg["steps"])
    timed = times[cfg["warmup"]:]
    out.update({"tokens_per_s": tokens / statistics.median(timed), "tokens_per_s_best": tokens / min(timed),
                "step_s_median": statistics.median(timed), "step_s": timed, "first_step_s": times[0],
                "warmup": cfg["warmup"], "steps": cfg["steps"], "losses": losses})
    print(json.dumps(out))


if __name__ == "__main__":
    main()
