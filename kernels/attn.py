"""Attention softmax(q k^T / sqrt(D)) v with an online softmax (flash-attention style), forward and backward.

Forward: one program per (BLOCK_M queries, batch*head) walks the keys in BLOCK_N tiles, keeping the running row
max m, the running denominator l and the unnormalized output in fp32; it stores o and the row log-sum-exp
(base 2) so the backward can rebuild p = softmax(s) tile by tile without the (N, N) matrix.
Backward (ds = p * (dp - delta), delta_i = sum_d o_id * do_id): the dq kernel runs first, one program per
query tile, and also writes delta; then the dk/dv kernel, one program per key tile, walks the queries. No atomics.
Head dims up to 256, any N (masked), bf16/fp16 on the tensor cores; fp32 also works (TF32 dots on a GPU).
"""
import os
import torch
import torch.nn.functional as F

try:
    import triton
    import triton.language as tl
except ImportError:
    triton = None

LOG2E = 1.4426950408889634
# head-dim bucket -> (BLOCK_M, BLOCK_N, num_warps, num_stages) for forward, backward. Not yet timed on a GPU
# (kernels.bench sweep), but none spills registers on sm_90 (python -m kernels.aot; 64x64 tiles did at D = 128)
FWD_CFG = {64: (128, 64, 4, 3), 128: (128, 64, 8, 3), 256: (64, 32, 8, 2)}
BWD_CFG = {64: (64, 64, 4, 2), 128: (32, 32, 8, 2), 256: (32, 32, 8, 1)}


def attention_ref(q, k, v):  # the spec: (B, H, N, D) x3 -> (B, H, N, D)
    # PyTorch's fused attention: fp32 accumulation under autocast too, and flash / memory-efficient kernels on CUDA
    # that never materialise the (N, N) scores (a plain q @ k^T would round them to bf16 under autocast)
    return F.scaled_dot_product_attention(q, k, v)


# -----------------------------------------------------------------------------
# Triton kernels. Tiles of q, k, v, do are (rows, BLOCK_D); rows past N and columns past D load as 0.

if triton is not None:

    @triton.jit
    def _attn_fwd(Q, K, V, O, LSE,  # pointers; LSE (B, H, N) fp32 contiguous
                  sqb, sqh, sqn, sqd, skb, skh, skn, skd, svb, svh, svn, svd, sob, soh, son, sod,  # strides
                  H, N, D, qk_scale,  # heads, tokens, head dim, D**-0.5 * log2(e)
                  BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr):
        bh = tl.program_id(1)
        b, h = bh // H, bh % H
        rm = tl.program_id(0) * BLOCK_M + tl.arange(0, BLOCK_M)
        rn = tl.arange(0, BLOCK_N)
        rd = tl.arange(0, BLOCK_D)
        Q += b.to(tl.int64) * sqb + h.to(tl.int64) * sqh
        K += b.to(tl.int64) * skb + h.to(tl.int64) * skh
        V += b.to(tl.int64) * svb + h.to(tl.int64) * svh
        qmask = (rm[:, None] < N) & (rd[None, :] < D)
        q = tl.load(Q + rm[:, None] * sqn + rd[None, :] * sqd, mask=qmask, other=0.0)
        m = tl.full([BLOCK_M], float('-inf'), dtype=tl.float32)
        l = tl.zeros([BLOCK_M], dtype=tl.float32)
        acc = tl.zeros([BLOCK_M, BLOCK_D], dtype=tl.float32)
        for n0 in range(0, N, BLOCK_N):
            kv = n0 + rn
            kt = tl.load(K + kv[None, :] * skn + rd[:, None] * skd, mask=(kv[None, :] < N) & (rd[:, None] < D),
                         other=0.0)  # k transposed: (BLOCK_D, BLOCK_N)
            s = tl.dot(q, kt) * qk_scale  # (BLOCK_M, BLOCK_N), log2 domain
            s = tl.where(kv[None, :] < N, s, float('-inf'))
            m_new = tl.maximum(m, tl.max(s, axis=1))  # finite: every tile has at least one real key
            p = tl.exp2(s - m_new[:, None])
            alpha = tl.exp2(m - m_new)  # rescales what was accumulated under the old max
            l = l * alpha + tl.sum(p, axis=1)
            v = tl.load(V + kv[:, None] * svn + rd[None, :] * svd, mask=(kv[:, None] < N) & (rd[None, :] < D),
                        other=0.0)
            acc = acc * alpha[:, None] + tl.dot(p.to(v.dtype), v)
            m = m_new
        O += b.to(tl.int64) * sob + h.to(tl.int64) * soh
        tl.store(O + rm[:, None] * son + rd[None, :] * sod, (acc / l[:, None]).to(O.dtype.element_ty), mask=qmask)
        tl.store(LSE + bh.to(tl.int64) * N + rm, m + tl.log2(l), mask=rm < N)

    @triton.jit
    def _attn_bwd_dq(Q, K, V, O, DO, LSE, DELTA, DQ,  # O, DO, DQ share o's strides; LSE, DELTA (B, H, N)
                     sqb, sqh, sqn, sqd, skb, skh, skn, skd, svb, svh, svn, svd, sob, soh, son, sod,
                     H, N, D, qk_scale, sm_scale,
                     BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr):
        bh = tl.program_id(1)
        b, h = bh // H, bh % H
        rm = tl.program_id(0) * BLOCK_M + tl.arange(0, BLOCK_M)
        rn = tl.arange(0, BLOCK_N)
        rd = tl.arange(0, BLOCK_D)
        Q += b.to(tl.int64) * sqb + h.to(tl.int64) * sqh
        K += b.to(tl.int64) * skb + h.to(tl.int64) * skh
        V += b.to(tl.int64) * svb + h.to(tl.int64) * svh
        qmask = (rm[:, None] < N) & (rd[None, :] < D)
        q = tl.load(Q + rm[:, None] * sqn + rd[None, :] * sqd, mask=qmask, other=0.0)
        orow = b.to(tl.int64) * sob + h.to(tl.int64) * soh + rm[:, None] * son + rd[None, :] * sod
        do = tl.load(DO + orow, mask=qmask, other=0.0)
        delta = tl.sum(tl.load(O + orow, mask=qmask, other=0.0).to(tl.float32) * do.to(tl.float32), axis=1)
        tl.store(DELTA + bh.to(tl.int64) * N + rm, delta, mask=rm < N)
        lse = tl.load(LSE + bh.to(tl.int64) * N + rm, mask=rm < N, other=0.0)
        dq = tl.zeros([BLOCK_M, BLOCK_D], dtype=tl.float32)
        for n0 in range(0, N, BLOCK_N):
            kv = n0 + rn
            kvmask = (kv[None, :] < N) & (rd[:, None] < D)
            kt = tl.load(K + kv[None, :] * skn + rd[:, None] * skd, mask=kvmask, other=0.0)  # (BLOCK_D, BLOCK_N)
            vt = tl.load(V + kv[None, :] * svn + rd[:, None] * svd, mask=kvmask, other=0.0)
            p = tl.exp2(tl.dot(q, kt) * qk_scale - lse[:, None])  # keys past N: k = v = 0 so they add 0 to dq
            ds = p * (tl.dot(do, vt) - delta[:, None])  # gradient w.r.t. the scaled scores
            dq += tl.dot(ds.to(kt.dtype), tl.trans(kt))
        tl.store(DQ + orow, (dq * sm_scale).to(DQ.dtype.element_ty), mask=qmask)

    @triton.jit
    def _attn_bwd_dkdv(Q, K, V, DO, LSE, DELTA, DK, DV,  # DO, DK, DV share o's strides
                       sqb, sqh, sqn, sqd, skb, skh, skn, skd, svb, svh, svn, svd, sob, soh, son, sod,
                       H, N, D, qk_scale, sm_scale,
                       BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr):
        bh = tl.program_id(1)
        b, h = bh // H, bh % H
        rn = tl.program_id(0) * BLOCK_N + tl.arange(0, BLOCK_N)
        rm = tl.arange(0, BLOCK_M)
        rd = tl.arange(0, BLOCK_D)
        Q += b.to(tl.int64) * sqb + h.to(tl.int64) * sqh
        K += b.to(tl.int64) * skb + h.to(tl.int64) * skh
        V += b.to(tl.int64) * svb + h.to(tl.int64) * svh
        DO += b.to(tl.int64) * sob + h.to(tl.int64) * soh
        kmask = (rn[:, None] < N) & (rd[None, :] < D)
        k = tl.load(K + rn[:, None] * skn + rd[None, :] * skd, mask=kmask, other=0.0)  # (BLOCK_N, BLOCK_D)
        v = tl.load(V + rn[:, None] * svn + rd[None, :] * svd, mask=kmask, other=0.0)
        dk = tl.zeros([BLOCK_N, BLOCK_D], dtype=tl.float32)
        dv = tl.zeros([BLOCK_N, BLOCK_D], dtype=tl.float32)
        for m0 in range(0, N, BLOCK_M):
            qr = m0 + rm
            qtmask = (qr[None, :] < N) & (rd[:, None] < D)
            qt = tl.load(Q + qr[None, :] * sqn + rd[:, None] * sqd, mask=qtmask, other=0.0)  # (BLOCK_D, BLOCK_M)
            do_t = tl.load(DO + qr[None, :] * son + rd[:, None] * sod, mask=qtmask, other=0.0)
            lse = tl.load(LSE + bh.to(tl.int64) * N + qr, mask=qr < N, other=0.0)
            delta = tl.load(DELTA + bh.to(tl.int64) * N + qr, mask=qr < N, other=0.0)
            pt = tl.exp2(tl.dot(k, qt) * qk_scale - lse[None, :])  # p^T (BLOCK_N, BLOCK_M); queries past N: do = 0
            dv += tl.dot(pt.to(do_t.dtype), tl.trans(do_t))
            dst = pt * (tl.dot(v, do_t) - delta[None, :])
            dk += tl.dot(dst.to(qt.dtype), tl.trans(qt))
        out = b.to(tl.int64) * sob + h.to(tl.int64) * soh + rn[:, None] * son + rd[None, :] * sod
        tl.store(DK + out, (dk * sm_scale).to(DK.dtype.element_ty), mask=kmask)
        tl.store(DV + out, dv.to(DV.dtype.element_ty), mask=kmask)


# -----------------------------------------------------------------------------
# Launchers (torch custom ops: one opaque node each under torch.compile)


def _out_like(q):  # o, do, dq, dk, dv share one layout: q's (B, H, N, D) if D is contiguous in q, else (B, H, D, N)
    B, H, N, D = q.shape  # the U-Net's q is a transposed view of its qkv conv output: then o.transpose(-1, -2)
    if q.stride(-1) == 1:  # reshapes back to (B, C, H, W) for free
        return torch.empty(B, H, N, D, device=q.device, dtype=q.dtype)
    return torch.empty(B, H, D, N, device=q.device, dtype=q.dtype).transpose(-1, -2)


def _launch_args(q, k, v, o):  # strides of q, k, v, o, and the tile sizes for this head dim
    B, H, N, D = q.shape
    assert k.shape == v.shape == q.shape and D <= 256, 'self-attention with head dim <= 256'
    bucket = 64 if D <= 64 else 128 if D <= 128 else 256
    return [s for t in (q, k, v, o) for s in t.stride()], max(16, triton.next_power_of_2(D)), bucket


def _blocks(cfg, N):  # shrink the tiles for short sequences (tl.dot needs >= 16)
    bm, bn, warps, stages = cfg
    n = max(16, triton.next_power_of_2(N))
    return min(bm, n), min(bn, n), dict(num_warps=warps, num_stages=stages)


if triton is not None:

    @torch.library.custom_op('kernels::attention_fwd', mutates_args=())
    def _fwd(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        B, H, N, D = q.shape
        o = _out_like(q)
        lse = torch.empty(B, H, N, device=q.device, dtype=torch.float32)
        strides, block_d, bucket = _launch_args(q, k, v, o)
        bm, bn, launch = _blocks(FWD_CFG[bucket], N)
        _attn_fwd[(triton.cdiv(N, bm), B * H)](q, k, v, o, lse, *strides, H, N, D, D**-0.5 * LOG2E,
                                                BLOCK_M=bm, BLOCK_N=bn, BLOCK_D=block_d, **launch)
        return o, lse

    @_fwd.register_fake
    def _(q, k, v):
        return _out_like(q), q.new_empty(q.shape[:3], dtype=torch.float32)

    @torch.library.custom_op('kernels::attention_bwd', mutates_args=())
    def _bwd(do: torch.Tensor, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, o: torch.Tensor,
             lse: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        B, H, N, D = q.shape
        if any(a != b and n > 1 for a, b, n in zip(do.stride(), o.stride(), o.shape)):
            do = _out_like(q).copy_(do)  # the kernels index do with o's strides
        dq, dk, dv = _out_like(q), _out_like(q), _out_like(q)
        delta = torch.empty_like(lse)
        strides, block_d, bucket = _launch_args(q, k, v, o)
        bm, bn, launch = _blocks(BWD_CFG[bucket], N)
        args = (*strides, H, N, D, D**-0.5 * LOG2E, D**-0.5)
        _attn_bwd_dq[(triton.cdiv(N, bm), B * H)](q, k, v, o, do, lse, delta, dq, *args,
                                                   BLOCK_M=bm, BLOCK_N=bn, BLOCK_D=block_d, **launch)
        _attn_bwd_dkdv[(triton.cdiv(N, bn), B * H)](q, k, v, do, lse, delta, dk, dv, *args,
                                                     BLOCK_M=bm, BLOCK_N=bn, BLOCK_D=block_d, **launch)
        return dq, dk, dv

    @_bwd.register_fake
    def _(do, q, k, v, o, lse):
        return _out_like(q), _out_like(q), _out_like(q)

    def _setup_context(ctx, inputs, output):
        ctx.save_for_backward(*inputs, *output)

    def _backward(ctx, do, dlse):
        q, k, v, o, lse = ctx.saved_tensors
        return _bwd(do, q, k, v, o, lse)

    _fwd.register_autograd(_backward, setup_context=_setup_context)


def attention_triton(q, k, v):  # (B, H, N, D) x3 -> (B, H, N, D), scale D**-0.5; autograd-capable
    return _fwd(q, k, v)[0]


def attention(q, k, v):  # the dispatcher the model calls
    if (triton is None or not q.is_cuda or q.dtype == torch.float32 or q.shape[-1] > 256
            or os.environ.get('KERNELS') != 'triton'):
        return attention_ref(q, k, v)
    return attention_triton(q, k, v)
