"""Titans MAC, memory as context (Titans sec. 4.1, Eqs 21-25), kind "titans_mac"
(config: models/titans/config.py MACConfig).

Each row is cut into segments of C tokens on the row's grid (the last one padded). For segment
s, with x [C, d] its tokens and M_{s-1} the memory after the previous segments:

    h_i = R(M_{s-1}(q_i), x_i)        retrieval: q_i the memory's query of x_i (its conv +
                                      SiLU + L2 norm), R its read-out (norm, gate, W_o);
                                      W0(q_i) for tokens whose document started inside the
                                      segment (segments.retrieve)
    a   = Attn([p | h | x])           causal over the slots: query i sees every persistent
                                      token p and h_j, x_j for j <= i of its document; RoPE at
                                      the tokens' positions (h_j at x_j's), none on p
    y   = RMSNorm(W_a a)
    M_s, m = write y into M_{s-1}     the neural-memory op (k, v, gates from y; reset to W0
                                      where a document starts), m_i = R(M*_i(q'_i), y_i) its
                                      read at each token (after the token's write, with the
                                      default read "after_write")
    o   = W_o(y * sigmoid(RMSNorm(m)))

Titans writes o_t = y_t (x) M*_t(y_t); the (x) is taken as MAG's normalised gate (parts.NormGate)
so that the three architectures differ only in where the memory sits, and y is normalised once
and used both as the memory's input and as the gated factor. One memory (one set of
projections and gates, one W0) serves retrieval and writing, as the paper's one M with W_Q.
Choices the paper leaves open: one retrieved token per segment token (N_l = C), retrieval from
the memory's own query projection of x, full causal attention inside the segment (no window),
C a multiple of the memory's chunk size so the gradient-anchor grid runs on unbroken.

Sequential over segments: the segment attention needs the memory after the previous segment,
so training runs an outer lax.scan over segments carrying the memory state, the last token's
segment id and the write path's conv history. Everything that depends only on x (retrieval
queries, attention q/k/v of the tokens, the persistent keys) is computed for the whole row
first; the output projection after the scan.

Documents: a packed document equals itself alone when it starts on the segment grid (it then
also starts on the memory's chunk grid). Tokens of a document never see another's tokens or
retrievals; the memory resets to W0 where a document starts.

Decode (`init_cache`, a call with a cache): token by token, exact to the parallel form: the
memory's write cache (layers/memory/decode.py MemoryCache, stepped by decode.step), the
retrieval weights snapshotted at each segment start and whether the current document reaches
back to it, a buffer of the current segment's retrieved and token keys / values (and segment
ids), the two conv histories (retrieval path over x, write path over y). The position in the
segment grid is the write cache's token count.

Shapes: x, o [B, T, d]; positions, segment_ids [B, T] int32.
"""
from __future__ import annotations

import jax
import jax.numpy as jnp
from flax import nnx

from layers.memory import decode
from layers.memory.mixer import NeuralMemory
from layers.registry import LayerContext, register_mixer
from models.titans import attend, segments
from models.titans.parts import NormGate, PrefixAttention, inner_context
from pallas_kernels.neural_memory import common
from pallas_kernels.neural_memory.api import neural_memory
from models.titans.config import MACConfig


def _gate_args(g: dict) -> tuple:
    return g["theta"], g.get("alpha"), g.get("eta"), g.get("delta")


@register_mixer(MACConfig)
class TitansMAC(nnx.Module):
    def __init__(self, cfg: MACConfig, ctx: LayerContext, *, rngs: nnx.Rngs):
        self.cfg = cfg
        inner = inner_context(ctx)
        self.attn = PrefixAttention(cfg, inner, window=None, rngs=rngs)
        self.memory = NeuralMemory(cfg.memory, inner, rngs=rngs)
        self.gate = NormGate(ctx, rngs=rngs)

    # -- shared by training and decode

    def _attend(self, q, seg_q, slot_q, keys: dict, slot_k, pkv):
        """Segment attention: q [B, Tq, H, D] at slots slot_q of segment ids seg_q [B, Tq];
        keys {"kh", "vh", "kx", "vx": [B, C, K, D], "segment_ids": [B, C]} at slots slot_k
        [1, C]; pkv persistent (k, v) [N_p, K, D] or None -> y_normed [B, Tq, d]."""
        b, tq = seg_q.shape
        ks, vs = [keys["kh"], keys["kx"]], [keys["vh"], keys["vx"]]
        n_p = 0
        if pkv is not None:
            n_p = pkv[0].shape[0]
            ks.insert(0, jnp.broadcast_to(pkv[0][None].astype(q.dtype), (b, *pkv[0].shape)))
            vs.insert(0, jnp.broadcast_to(pkv[1][None].astype(q.dtype), (b, *pkv[1].shape)))
        mask = segments.segment_mask(seg_q, slot_q, keys["segment_ids"], slot_k, n_p)
        o, _ = attend.dense_attention(q, jnp.concatenate(ks, 1).astype(q.dtype),
                                      jnp.concatenate(vs, 1).astype(q.dtype), mask)
        return self.gate.y_norm(self.attn.o_proj(o.reshape(b, tq, -1)))

    # -- the parallel form (training, and any call without a cache)

    def _segment(self, w0, start, pkv, carry, xs):
        """One segment: carry (memory state after the previous segments, segment id of the
        token before the segment [B], write-path conv history); xs the segment's slices."""
        state, last_seg, conv = carry
        x, pos, seg, resets, q_r, qa, ka, va = xs
        b, c = seg.shape
        spec = self.memory.spec
        h = self.memory.readout(segments.retrieve(spec, state.weights, w0, q_r, segments.reach(resets)), x)
        kh, vh = self.attn.keys_values(h, pos)
        slots = jnp.arange(c)[None]
        keys = {"kh": kh, "vh": vh, "kx": ka, "vx": va, "segment_ids": seg}
        y = self._attend(qa, seg, jnp.broadcast_to(slots, (b, c)), keys, slots, pkv)
        # The op sees a document start only between two of its tokens: one that starts on the
        # segment's first token is applied here.
        first = (seg[:, 0] != last_seg) & (seg[:, 0] != 0)
        state = jax.tree.map(lambda s0, s: jnp.where(first.reshape((b,) + (1,) * (s.ndim - 1)), s0, s),
                             start, state)
        q, k, v, g, conv = self.memory.features(y, seg, conv)
        o, state = neural_memory(spec, q, k, v, *_gate_args(g), initial_weights=w0, initial_state=state,
                                 segment_ids=seg, implementation=None)
        m = self.memory.readout(o, y)
        return (state, seg[:, -1], conv), self.gate.gate(y, m)

    def _forward(self, x, positions, segment_ids):
        b, t, d = x.shape
        c = self.cfg.segment_size
        n = -(-t // c)
        pad = lambda a: jnp.pad(a, [(0, 0), (0, n * c - t)] + [(0, 0)] * (a.ndim - 2))
        x, positions, segment_ids = pad(x), pad(positions), pad(segment_ids)  # padding: id 0
        q_r = self.memory.features(x, segment_ids, None)[0]
        qa, ka, va = self.attn.project(x, positions)
        resets = common.resets(segment_ids)
        spec, w0 = self.memory.spec, self.memory.initial_weights()
        start = common.start_state(spec, w0, None, b)
        conv = None if self.memory.conv is None else self.memory.conv.init_cache(b, x.dtype)
        pkv = self.attn.persistent_kv()
        by_segment = lambda a: jnp.moveaxis(a.reshape(b, n, c, *a.shape[2:]), 1, 0)
        xs = tuple(map(by_segment, (x, positions, segment_ids, resets, q_r, qa, ka, va)))
        carry = (start, jnp.zeros((b,), jnp.int32), conv)
        _, out = jax.lax.scan(lambda cr, s: self._segment(w0, start, pkv, cr, s), carry, xs)
        out = jnp.moveaxis(out, 0, 1).reshape(b, n * c, d)[:, :t]
        return self.gate.o_proj(out)

    # -- decode

    def _token(self, w0, pkv, carry, xs):
        """One token per row with the decode cache (module docstring)."""
        mem, snap, reach, buf, conv = carry
        # x [B, d]; pos, seg [B]; q_r [B, Hm, K]; qa [B, H, D]; ka, va [B, K, D]
        x, pos, seg, q_r, qa, ka, va = xs
        c = self.cfg.segment_size
        b = seg.shape[0]
        spec = self.memory.spec
        slot = mem.pos % c
        new = slot == 0  # a segment starts: snapshot the memory, empty the buffer
        snap = jax.tree.map(lambda w, s: jnp.where(new.reshape((b,) + (1,) * (w.ndim - 1)), w, s),
                            mem.weights, snap)
        reach = (reach | new) & ~((seg != mem.segment) & (seg != 0))
        h = self.memory.readout(segments.retrieve(spec, snap, w0, q_r[:, None], reach[:, None]), x[:, None])
        kh, vh = self.attn.keys_values(h, pos[:, None])
        at = (jnp.arange(c)[None] == slot[:, None])  # [B, C], the token's slot
        put = lambda old, val: jnp.where(at[:, :, None, None], val.astype(old.dtype), old)
        buf = {"kh": put(buf["kh"], kh), "vh": put(buf["vh"], vh),
               "kx": put(buf["kx"], ka[:, None]), "vx": put(buf["vx"], va[:, None]),
               "segment_ids": jnp.where(at, seg[:, None], jnp.where(new[:, None], 0, buf["segment_ids"]))}
        y = self._attend(qa[:, None], seg[:, None], slot[:, None], buf, jnp.arange(c)[None], pkv)
        q, k, v, g, conv = self.memory.features(y, seg[:, None], conv)
        one = lambda a: None if a is None else a[:, 0]
        o, mem = decode.step(spec, w0, mem, *map(one, (q, k, v, *_gate_args(g))), seg)
        m = self.memory.readout(o[:, None], y)
        return (mem, snap, reach, buf, conv), self.gate.gate(y, m)[:, 0]

    def _decode(self, x, positions, segment_ids, cache):
        q_r, _, _, _, conv_r = self.memory.features(x, segment_ids, cache.get("conv_r"))
        qa, ka, va = self.attn.project(x, positions)
        w0, pkv = self.memory.initial_weights(), self.attn.persistent_kv()
        tm = lambda a: jnp.moveaxis(a, 1, 0)
        carry = (cache["memory"], cache["snapshot"], cache["reach"], cache["buffer"], cache.get("conv_w"))
        carry, out = jax.lax.scan(lambda cr, s: self._token(w0, pkv, cr, s), carry,
                                  tuple(map(tm, (x, positions, segment_ids, q_r, qa, ka, va))))
        mem, snap, reach, buf, conv_w = carry
        new = {"memory": mem, "snapshot": snap, "reach": reach, "buffer": buf}
        if self.memory.conv is not None:
            new.update(conv_r=conv_r, conv_w=conv_w)
        return self.gate.o_proj(tm(out)), new

    # -- the mixer interface

    def __call__(self, x: jax.Array, *, positions: jax.Array, segment_ids: jax.Array, cache=None):
        """x [B, T, d]; positions, segment_ids [B, T] int32 -> (o [B, T, d], cache)."""
        if cache is None:
            return self._forward(x, positions, segment_ids), None
        return self._decode(x, positions, segment_ids, cache)

    def init_cache(self, batch: int, max_len: int, dtype=jnp.float32) -> dict:
        """Fixed size whatever max_len is (module docstring); the memory's leaves float32."""
        del max_len
        mem = decode.init_cache(self.memory.spec, batch, self.memory.heads, self.memory.dk, self.memory.dk)
        kv = jnp.zeros((batch, self.cfg.segment_size, self.attn.kv_heads, self.attn.head_dim), dtype)
        cache = {"memory": mem, "snapshot": mem.weights, "reach": jnp.zeros((batch,), bool),
                 "buffer": {"kh": kv, "vh": kv, "kx": kv, "vx": kv,
                            "segment_ids": jnp.zeros((batch, self.cfg.segment_size), jnp.int32)}}
        if self.memory.conv is not None:
            cache["conv_r"] = self.memory.conv.init_cache(batch, dtype)
            cache["conv_w"] = self.memory.conv.init_cache(batch, dtype)
        return cache

    @staticmethod
    def flops_per_token(cfg: MACConfig, d_model: int, seq_len: int) -> float:
        """Training FLOPs (3x forward): the memory's write path (the memory mixer's count), its
        retrieval path (q/k/v projections and conv of x, one read of the memory, the read-out's
        gate and W_o), the attention's projections (q, k, v of x, k, v of h, W_a), its scores
        over N_p + 2 (i + 1) keys for slot i (mean over a segment), and W_o. Norms left out."""
        mc = cfg.memory
        hm, dm = mc.num_heads, mc.dim_per_head(d_model)
        mem_params = sum(a * b for a, b in common.layer_shapes(mc.spec(), dm, dm))
        retrieval = (2 * d_model * 3 * hm * dm + 2 * mc.conv_size * 3 * hm * dm + 2 * hm * mem_params
                     + 2 * hm * dm * d_model * (2 if mc.output_gate != "none" else 1))
        h, kvh, hd = cfg.num_heads, cfg.kv_heads, cfg.dim_per_head(d_model)
        proj = 2 * d_model * hd * (2 * h + 4 * kvh)
        c = min(cfg.segment_size, seq_len)
        scores = 2 * 2 * h * hd * (cfg.num_persistent + (c + 1))
        return (NeuralMemory.flops_per_token(mc, d_model, seq_len) + 3.0 * (retrieval + proj + scores)
                + NormGate.flops_per_token(d_model))

    def describe(self) -> str:
        c = self.cfg
        return (f"Titans MAC: segments of {c.segment_size}, {self.attn.describe()}, causal over "
                f"[persistent | retrieved | segment] (dense per segment); memory [{self.memory.describe()}] "
                f"retrieval by common.apply, write by the neural_memory op (lax.scan over segments)")
