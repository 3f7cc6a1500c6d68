"""Blocked (flash-attention style) softmax attention in pure JAX, for any XLA backend.

(candidate: blocks sliced from [B, T, H, D] inside the loops)
"""
from __future__ import annotations

import functools
from typing import NamedTuple

import jax
import jax.numpy as jnp
from jax import lax

from pallas_kernels.attention import masking

_F32 = jnp.float32
_M_FLOOR = -1e30
_SUPPORTED = (jnp.dtype(jnp.float32), jnp.dtype(jnp.bfloat16), jnp.dtype(jnp.float16))


class _Static(NamedTuple):
    block_q: int
    block_k: int
    groups: int
    index_causal: bool
    window: int | None
    logit_softcap: float | None
    scale: float


def attention(q, k, v, q_segment_ids, q_positions, kv_segment_ids, kv_positions, *,
              window, logit_softcap, scale, index_causal, block_q, block_k):
    dtype = jnp.result_type(q.dtype, k.dtype, v.dtype)
    if dtype not in _SUPPORTED:
        raise NotImplementedError(f"dtype {dtype} (supported: float32, bfloat16, float16)")
    b, tq, h, d = q.shape
    tk, kv_heads = k.shape[1], k.shape[2]
    bq, bk = min(block_q, tq), min(block_k, tk)
    cfg = _Static(bq, bk, h // kv_heads, bool(index_causal), window, logit_softcap, float(scale))
    q = _pad_time(q.astype(dtype), bq)
    k, v = _pad_time(k.astype(dtype), bk), _pad_time(v.astype(dtype), bk)
    qs, qp = _id_blocks(q_segment_ids, bq), _id_blocks(q_positions, bq)
    ks, kp = _id_blocks(kv_segment_ids, bk), _id_blocks(kv_positions, bk)
    out = _flash(cfg, q, k, v, qs, qp, ks, kp)
    return out[:, :tq].astype(q.dtype)


def _round_up(n: int, m: int) -> int:
    return -(-n // m) * m


def _pad_time(x, block):
    pad = _round_up(x.shape[1], block) - x.shape[1]
    if pad == 0:
        return x
    return jnp.pad(x, [(0, 0), (0, pad)] + [(0, 0)] * (x.ndim - 2))


def _id_blocks(x, block):
    x = _pad_time(x.astype(jnp.int32), block)
    b, t = x.shape
    return x.reshape(b, t // block, block).transpose(1, 0, 2)


def _q_block(cfg, x, i):
    """Query block i of x [B, Tq, H, D] as matmul rows: [B, K, G*bq, D], rows ordered (g, t)."""
    b, _, h, d = x.shape
    g, bq = cfg.groups, cfg.block_q
    blk = lax.dynamic_slice_in_dim(x, i * bq, bq, axis=1).reshape(b, bq, h // g, g, d)
    return blk.transpose(0, 2, 3, 1, 4).reshape(b, h // g, g * bq, d)


def _q_unblock(cfg, blk):
    """[B, K, G*bq, D] -> [B, bq, H, D] (inverse of `_q_block`)."""
    b, kv_heads, r, d = blk.shape
    g, bq = cfg.groups, cfg.block_q
    return blk.reshape(b, kv_heads, g, bq, d).transpose(0, 3, 1, 2, 4).reshape(b, bq, kv_heads * g, d)


def _kv_block(cfg, x, j):
    """KV block j of x [B, Tk, K, D] as [B, K, bk, D]."""
    return lax.dynamic_slice_in_dim(x, j * cfg.block_k, cfg.block_k, axis=1).transpose(0, 2, 1, 3)


def _dot(a, b, contract):
    dims = (((contract[0],), (contract[1],)), ((0, 1), (0, 1)))
    return lax.dot_general(a, b, dims, preferred_element_type=_F32)


def _logits(cfg, s, mask):
    s = s * cfg.scale
    t = None
    if cfg.logit_softcap is not None:
        t = jnp.tanh(s / cfg.logit_softcap)
        s = cfg.logit_softcap * t
    return jnp.where(mask, s, -jnp.inf), t


def _mask(cfg, seg_q, pos_q, seg_k, pos_k):
    m = masking.visible(seg_q[:, :, None], pos_q[:, :, None],
                        seg_k[:, None, :], pos_k[:, None, :], cfg.window)
    return m[:, None, None]


def _mask_t(cfg, seg_q, pos_q, seg_k, pos_k):
    m = masking.visible(seg_q[:, None, :], pos_q[:, None, :],
                        seg_k[:, :, None], pos_k[:, :, None], cfg.window)
    return m[:, None, :, None]


def _kv_range(cfg, i, nk):
    if not cfg.index_causal:
        return 0, nk
    hi = jnp.minimum(nk, ((i + 1) * cfg.block_q - 1) // cfg.block_k + 1)
    lo = 0
    if cfg.window is not None:
        lo = jnp.maximum(0, i * cfg.block_q - cfg.window + 1) // cfg.block_k
    return lo, hi


def _q_range(cfg, j, nq):
    if not cfg.index_causal:
        return 0, nq
    lo = (j * cfg.block_k) // cfg.block_q
    hi = nq
    if cfg.window is not None:
        hi = jnp.minimum(nq, ((j + 1) * cfg.block_k - 1 + cfg.window - 1) // cfg.block_q + 1)
    return lo, hi


def _forward(cfg, q, k, v, qs, qp, ks, kp):
    b, tq, h, d = q.shape
    g, bq, bk = cfg.groups, cfg.block_q, cfg.block_k
    kv_heads, r = h // g, g * bq
    nq, nk = qs.shape[0], ks.shape[0]

    def q_block(i, carry):
        out, lse = carry
        q_i, seg_i, pos_i = _q_block(cfg, q, i), qs[i], qp[i]
        lo, hi = _kv_range(cfg, i, nk)

        def step(j, carry):
            m, l, acc = carry
            mask = _mask(cfg, seg_i, pos_i, ks[j], kp[j])
            s = _dot(q_i, _kv_block(cfg, k, j), (3, 3)).reshape(b, kv_heads, g, bq, bk)
            s, _ = _logits(cfg, s, mask)
            m_new = jnp.maximum(m, s.max(axis=-1))
            p = jnp.exp(s - m_new[..., None])
            alpha = jnp.exp(m - m_new)
            l = alpha * l + p.sum(axis=-1)
            pv = _dot(p.reshape(b, kv_heads, r, bk).astype(v.dtype), _kv_block(cfg, v, j), (3, 2))
            acc = acc * alpha.reshape(b, kv_heads, r, 1) + pv
            return m_new, l, acc

        init = (jnp.full((b, kv_heads, g, bq), _M_FLOOR, _F32),
                jnp.zeros((b, kv_heads, g, bq), _F32),
                jnp.zeros((b, kv_heads, r, d), _F32))
        m, l, acc = lax.fori_loop(lo, hi, step, init)
        seen = l > 0
        inv = jnp.where(seen, 1.0 / jnp.where(seen, l, 1.0), 0.0)
        o_i = (acc * inv.reshape(b, kv_heads, r, 1)).astype(q.dtype)
        out = lax.dynamic_update_slice_in_dim(out, _q_unblock(cfg, o_i), i * bq, axis=1)
        lse_i = jnp.where(seen, m + jnp.log(jnp.where(seen, l, 1.0)), 0.0)
        return out, lse.at[i].set(lse_i)

    init = (jnp.zeros(q.shape, q.dtype), jnp.zeros((nq, b, kv_heads, g, bq), _F32))
    return lax.fori_loop(0, nq, q_block, init)


def _backward(cfg, q, k, v, qs, qp, ks, kp, do, lse, delta):
    b, tq, h, d = q.shape
    g, bq, bk = cfg.groups, cfg.block_q, cfg.block_k
    kv_heads, r = h // g, g * bq
    nq, nk = qs.shape[0], ks.shape[0]

    def kv_block(j, carry):
        dq, dk, dv = carry
        k_j, v_j, seg_j, pos_j = _kv_block(cfg, k, j), _kv_block(cfg, v, j), ks[j], kp[j]
        lo, hi = _q_range(cfg, j, nq)

        def step(i, carry):
            dq, dk_j, dv_j = carry
            q_i, do_i = _q_block(cfg, q, i), _q_block(cfg, do, i)
            mask = _mask_t(cfg, qs[i], qp[i], seg_j, pos_j)
            s = _dot(k_j, q_i, (3, 3)).reshape(b, kv_heads, bk, g, bq)
            s, t = _logits(cfg, s, mask)
            p = jnp.exp(s - lse[i][:, :, None])
            dv_j = dv_j + _dot(p.reshape(b, kv_heads, bk, r).astype(do.dtype), do_i, (3, 2))
            dp = _dot(v_j, do_i, (3, 3)).reshape(b, kv_heads, bk, g, bq)
            ds = p * (dp - delta[i][:, :, None])
            if t is not None:
                ds = ds * (1.0 - t * t)
            ds = (ds * cfg.scale).reshape(b, kv_heads, bk, r)
            dk_j = dk_j + _dot(ds.astype(q.dtype), q_i, (3, 2))
            dq_i = _q_unblock(cfg, _dot(ds.astype(k.dtype), k_j, (2, 2)))
            start = i * bq
            dq = lax.dynamic_update_slice_in_dim(
                dq, lax.dynamic_slice_in_dim(dq, start, bq, axis=1) + dq_i, start, axis=1)
            return dq, dk_j, dv_j

        zeros = jnp.zeros((b, kv_heads, bk, d), _F32)
        dq, dk_j, dv_j = lax.fori_loop(lo, hi, step, (dq, zeros, zeros))
        dk = lax.dynamic_update_slice_in_dim(dk, dk_j.transpose(0, 2, 1, 3).astype(k.dtype), j * bk, axis=1)
        dv = lax.dynamic_update_slice_in_dim(dv, dv_j.transpose(0, 2, 1, 3).astype(v.dtype), j * bk, axis=1)
        return dq, dk, dv

    init = (jnp.zeros(q.shape, _F32), jnp.zeros(k.shape, k.dtype), jnp.zeros(v.shape, v.dtype))
    dq, dk, dv = lax.fori_loop(0, nk, kv_block, init)
    return dq.astype(q.dtype), dk, dv


@functools.partial(jax.custom_vjp, nondiff_argnums=(0,))
def _flash(cfg, q, k, v, qs, qp, ks, kp):
    return _forward(cfg, q, k, v, qs, qp, ks, kp)[0]


def _flash_fwd(cfg, q, k, v, qs, qp, ks, kp):
    out, lse = _forward(cfg, q, k, v, qs, qp, ks, kp)
    return out, (q, k, v, qs, qp, ks, kp, out, lse)


def _flash_bwd(cfg, res, dout):
    q, k, v, qs, qp, ks, kp, out, lse = res
    b, tq, h, d = q.shape
    g, bq = cfg.groups, cfg.block_q
    delta = (dout.astype(_F32) * out.astype(_F32)).sum(-1)  # [B, Tq, H]
    delta = delta.reshape(b, tq // bq, bq, h // g, g).transpose(1, 0, 3, 4, 2)
    dq, dk, dv = _backward(cfg, q, k, v, qs, qp, ks, kp, dout.astype(q.dtype), lse, delta)
    return dq, dk, dv, None, None, None, None


_flash.defvjp(_flash_fwd, _flash_bwd)
