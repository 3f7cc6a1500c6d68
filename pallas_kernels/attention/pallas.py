"""The attention op on Pallas kernels: "gpu" (Triton) and "tpu" (Mosaic), forward and backward.

    out = attention(q, k, v, segment_ids=seg, positions=pos, implementation="gpu")

Same function as reference.py (the contract is api.py's): causal by position, optional window,
packed documents, GQA, soft-cap, sinks, sigmoid scores, Dv != D, self-attention and KV caches.

Design. No second set of flash kernels: these run the block-sparse op's kernels
(pallas_kernels/block_sparse_attention/gpu.py and tpu.py, FlashAttention-2 over a block list,
custom_vjp with dq and dkv kernels), which already hold every score option, over a layout that
lists every block where a key can be visible, and with the op's own mask applied inside the
kernel: same nonzero segment and 0 <= pos_q - pos_k < window, by *position* (the kernels'
`positions=` option). So the result is the reference's function exactly, not an index
approximation of it, and one set of kernels is tuned and moved (Mosaic GPU is Triton's
successor) for both ops.

Layouts (built on the host, cached per shape):
* self-attention (no kv ids): causal, or sliding-window W, by token index. The op's contract
  (within a document, index distance <= position distance: contiguous documents with
  strictly increasing positions) makes it a superset of the visible keys, so a key the
  positions allow is in a listed block; blocks above the diagonal or left of the window are
  never visited.
* KV cache (kv ids given): slots in any order (ring buffers), so every block is listed and the
  positions alone decide; decode attends over the whole cache anyway.
Blocks: the op's block_q / block_k (hints), at most the sequence, rounded up to what the
kernels tile (powers of two >= 16 for Triton, multiples of 128 for Mosaic); the kernels pad
the sequence to whole blocks.

Compiled, not yet run, for an H100: the Triton IR of forward + backward at B2 x T2048, bf16,
blocks 128 (pallas_kernels/lowering.py write_triton_kernels, then its __main__ with the triton
3.9 wheel for sm_90a; 2026-12-07), registers per thread fwd / dq / dkv, no spills in any:
  D=128, 16 q / 8 kv heads, window 512 + soft-cap + sinks   255 / 246 / 247
  D=128, sigmoid scores                                   208 / 246 / 242
  D=64, causal + sinks                                    155 / 169 / 254
  D=64, Dv=128, sinks                                     233 / 169 / 239
(gpu.py's docstring has 228 / 208 / 239 for its kernels without the position mask, causal
GQA at D=128, measured the same way; shared memory here 57-140 KB of the 227 KB a block may
have).

Refusals (NotImplementedError before any kernel runs; only the cached host-side layout is
built first, so `dispatch` falls back to xla when no implementation was named): the
block-sparse kernels' own (platform unless interpret=True, head dims, block sizes, VMEM /
SMEM budgets), see their module docstrings.
"""
from __future__ import annotations

import functools
import importlib

from pallas_kernels import pallas_wrappers as pw
from pallas_kernels.block_sparse_attention import masks


def kernels(backend: str):
    """The block-sparse kernels module of `backend` ("gpu" or "tpu"); ImportError when this
    installation's Pallas lacks it."""
    return importlib.import_module(f"pallas_kernels.block_sparse_attention.{backend}")


def head_dims_refusal(backend: str, d: int, dv: int) -> str | None:
    """Why `backend`'s kernels refuse head dims D = d, Dv = dv, or None (their own rules)."""
    if backend == "gpu":
        return pw.triton_head_dims_refusal(d, dv, kernels("gpu").HEAD_DIMS)
    return kernels("tpu").head_dims_refusal(d, dv)


def _block(block: int, length: int, backend: str) -> int:
    """The kernels' block for the op's `block` hint over `length` tokens: at most the sequence
    (a decode step's one query does not pay for a 128-row block), rounded up to what the
    kernels tile: a power of two >= 16 for Triton, a multiple of 128 for Mosaic."""
    n = min(block, length)
    if backend == "gpu":
        return max(16, 1 << (n - 1).bit_length())
    return -(-n // 128) * 128


@functools.lru_cache(maxsize=64)
def _layout(index_causal: bool, window: int | None, tq: int, tk: int, bq: int, bk: int):
    if index_causal:
        mask = masks.Causal() if window is None else masks.SlidingWindow(window)
    else:
        mask = masks.Full()
    return masks.build_layout(mask, tq, tk, bq, bk)


def _attention(backend: str, q, k, v, q_segment_ids, q_positions, kv_segment_ids,
               kv_positions, *, window, logit_softcap, scale, index_causal, block_q, block_k,
               sinks=None, score="softmax", sigmoid_bias=0.0, interpret=False):
    """The op (arguments as in xla.attention) through backend "gpu" or "tpu"."""
    tq, tk = q.shape[1], k.shape[1]
    layout = _layout(bool(index_causal), window, tq, tk, _block(int(block_q), tq, backend),
                     _block(int(block_k), tk, backend))
    o, _ = kernels(backend).block_sparse_attention(
        q, k, v, layout, q_segment_ids, kv_segment_ids, sinks, score=score,
        sigmoid_bias=sigmoid_bias, logit_softcap=logit_softcap, scale=scale,
        positions=(q_positions, kv_positions), window=window, interpret=interpret)
    return o


def implementation(backend: str):
    """The op's implementation on `backend` ("gpu" / "tpu"); ImportError when its kernels
    cannot be imported here."""
    kernels(backend)
    return functools.partial(_attention, backend)
