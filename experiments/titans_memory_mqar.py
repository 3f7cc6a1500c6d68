"""Titans' long-term memory (LMM) on MQAR: its decay and momentum ablated, and against plain
linear attention and Gated DeltaNet at equal recurrent state (formerly benchmarks/memory_recall.py).

    .venv/bin/python -m train.sweep experiments/titans_memory_mqar.py --out docs/reproductions/titans_memory_mqar

Every model is the same 2-layer LM (d_model 64, both layers the mixer under test, SwiGLU MLPs,
tied embedding) on MQAR at vocab 256, 8 kv pairs, 64 tokens, batch 16, AdamW 3e-3 with cosine
decay, 1500 steps (recall sets in late for the memory mixers), the same seed and data order.

Recurrent state per layer (floats per sequence; the short conv's 3-token history, the same for
all, left out):
  memory  one 64 x 64 linear memory = 4096 (+ 4096 momentum floats with gd_momentum: optimizer
          state of the inner loop, not memory)
  linear  one head, 64 x (64 + 1): the sum of phi(k) v^T and the normaliser sum of phi(k) = 4160
  gdn     one head, 64 x 64 = 4096

The LMM (LMM_LINEAR): l2 attentional bias, per-token decay, plain GD, gradient anchor b = 1
(chunk_size 1), max_lr 1 (a full delta-rule step at theta = 1) and W0 ~ 0 (w0_std 1e-4: the
memory starts empty, as GDN's state does); every mixer gets the width-4 short conv on q/k/v, so
the comparison is the write rule, not the token shift. benchmarks/README.md ("MQAR: the LMM
against linear attention at equal state") tells how these settings were found.
"""
import json

LMM_LINEAR = {"kind": "memory", "num_heads": 1, "head_dim": 64, "arch": "linear", "chunk_size": 1,
              "max_lr": 1.0, "algorithm": "gd", "conv_size": 4, "w0_std": 1e-4}
MODELS = {
    "lmm": LMM_LINEAR,
    "lmm-no-decay": {**LMM_LINEAR, "retention": "none"},
    "lmm-momentum": {**LMM_LINEAR, "algorithm": "gd_momentum"},
    "linear": {"kind": "linear", "num_heads": 1, "expand_k": 1.0, "expand_v": 1.0, "conv_size": 4},
    "gdn": {"kind": "gdn", "num_heads": 1, "expand_k": 1.0, "expand_v": 1.0},
}

SWEEP = {
    "name": "titans_memory_mqar",
    "base": "mqar",
    "overrides": [
        "model.num_layers=2", "model.d_model=64",
        "data.mqar.vocab_size=256", "data.mqar.num_kv_pairs=8", "data.seq_len=64", "data.batch_size=16",
        "data.mqar.num_eval_examples=256", "train.eval_batches=16",
        "optimizer.lr=3e-3", "optimizer.warmup_steps=50", "optimizer.weight_decay=0.1",
        "train.steps=1500", "train.eval_every=0", "train.checkpoint_every=250", "train.log_every=25",
    ],
    "evals": ["mqar"],
    "axis": [{"name": "mixer",
              "values": {name: [f"model.mixers.mix={json.dumps(cfg)}", "model.pattern=mix"]
                         for name, cfg in MODELS.items()}}],
}
