"""GroupNorm + SiLU fused: y = silu((x - mean_g) * rstd_g * w_c + b_c), forward and backward in Triton.

One program per (sample, group). When the group fits in registers (SINGLE) x is read once and y written once;
otherwise the program walks the group twice (statistics, then normalize). The backward reads x and dy once
(plus a recompute of xhat from the saved mean/rstd) and writes dx; dw/db are per-(sample, channel) partial sums
finished by a tiny torch .sum(0). Statistics are fp32 for every activation dtype. NCHW and channels_last work
through strides: element (b, c, p) sits at b*sb + c*sc + p*sp, p = h*W + w.
"""
import os
import torch
import torch.nn.functional as F

try:
    import triton
    import triton.language as tl
except ImportError:  # e.g. macOS: only the reference path exists
    triton = None

MAX_SINGLE = 8192  # largest padded group (elements) kept in registers; bigger groups take the two-pass path


def group_norm_silu_ref(x, w, b, groups, eps=1e-6, silu=True):  # the spec
    y = F.group_norm(x, groups, w, b, eps)
    return F.silu(y) if silu else y


# -----------------------------------------------------------------------------
# Triton kernels

if triton is not None:

    @triton.jit
    def _gn_act(xhat, w, b, SILU: tl.constexpr):  # h = xhat * w + b, then optional SiLU
        h = xhat * w[:, None] + b[:, None]
        if SILU:
            h = h * tl.sigmoid(h)
        return h

    @triton.jit
    def _gn_dh(xhat, dy, w, b, SILU: tl.constexpr):  # gradient w.r.t. the pre-activation h
        if SILU:
            h = xhat * w[:, None] + b[:, None]
            s = tl.sigmoid(h)
            dy = dy * s * (1 + h * (1 - s))  # d/dh h*sigmoid(h)
        return dy

    @triton.jit
    def _gn_fwd(X, Y, W, Bias, Mean, Rstd,  # pointers: input, output, weight, bias, per-(b, g) stats
                C, HW, G, sb, sc, sp, eps,  # channels, pixels, groups, strides of x (and y), epsilon
                BLOCK_C: tl.constexpr, BLOCK_P: tl.constexpr, SINGLE: tl.constexpr, SILU: tl.constexpr):
        pid = tl.program_id(0)  # b * G + g
        cg = C // G
        c = tl.arange(0, BLOCK_C)
        p = tl.arange(0, BLOCK_P)
        cmask = c < cg
        base = (pid // G).to(tl.int64) * sb + ((pid % G) * cg).to(tl.int64) * sc
        X += base
        Y += base
        w = tl.load(W + (pid % G) * cg + c, mask=cmask, other=0.0).to(tl.float32)
        b = tl.load(Bias + (pid % G) * cg + c, mask=cmask, other=0.0).to(tl.float32)
        n = cg * HW
        if SINGLE:  # whole group in registers: exact two-pass statistics, one read, one write
            mask = cmask[:, None] & (p[None, :] < HW)
            offs = c[:, None] * sc + p[None, :] * sp
            x = tl.load(X + offs, mask=mask, other=0.0).to(tl.float32)
            mean = tl.sum(tl.sum(x, axis=1), axis=0) / n
            d = tl.where(mask, x - mean, 0.0)
            rstd = 1.0 / tl.sqrt(tl.sum(tl.sum(d * d, axis=1), axis=0) / n + eps)
            tl.store(Y + offs, _gn_act(d * rstd, w, b, SILU).to(Y.dtype.element_ty), mask=mask)
        else:  # sums of (x - shift) with shift = first element, which avoids catastrophic cancellation
            shift = tl.load(X).to(tl.float32)
            s1 = tl.zeros([BLOCK_C, BLOCK_P], dtype=tl.float32)
            s2 = tl.zeros([BLOCK_C, BLOCK_P], dtype=tl.float32)
            for p0 in range(0, HW, BLOCK_P):
                mask = cmask[:, None] & (p0 + p[None, :] < HW)
                x = tl.load(X + c[:, None] * sc + (p0 + p[None, :]) * sp, mask=mask, other=0.0).to(tl.float32)
                d = tl.where(mask, x - shift, 0.0)
                s1 += d
                s2 += d * d
            m1 = tl.sum(tl.sum(s1, axis=1), axis=0) / n
            mean = shift + m1
            rstd = 1.0 / tl.sqrt(tl.maximum(tl.sum(tl.sum(s2, axis=1), axis=0) / n - m1 * m1, 0.0) + eps)
            for p0 in range(0, HW, BLOCK_P):
                mask = cmask[:, None] & (p0 + p[None, :] < HW)
                offs = c[:, None] * sc + (p0 + p[None, :]) * sp
                x = tl.load(X + offs, mask=mask, other=0.0).to(tl.float32)
                tl.store(Y + offs, _gn_act((x - mean) * rstd, w, b, SILU).to(Y.dtype.element_ty), mask=mask)
        tl.store(Mean + pid, mean)
        tl.store(Rstd + pid, rstd)

    @triton.jit
    def _gn_bwd(X, DY, DX, W, Bias, Mean, Rstd, DWp, DBp,  # DWp, DBp: (B, C) fp32 partial sums
                C, HW, G, sb, sc, sp,  # strides shared by x, dy and dx
                BLOCK_C: tl.constexpr, BLOCK_P: tl.constexpr, SINGLE: tl.constexpr, SILU: tl.constexpr):
        # dx = rstd * (dxhat - mean(dxhat) - xhat * mean(dxhat * xhat)), dxhat = dh * w, over the group
        pid = tl.program_id(0)
        cg = C // G
        c = tl.arange(0, BLOCK_C)
        p = tl.arange(0, BLOCK_P)
        cmask = c < cg
        base = (pid // G).to(tl.int64) * sb + ((pid % G) * cg).to(tl.int64) * sc
        X += base
        DY += base
        DX += base
        w = tl.load(W + (pid % G) * cg + c, mask=cmask, other=0.0).to(tl.float32)
        b = tl.load(Bias + (pid % G) * cg + c, mask=cmask, other=0.0).to(tl.float32)
        mean = tl.load(Mean + pid)
        rstd = tl.load(Rstd + pid)
        n = cg * HW
        if SINGLE:
            mask = cmask[:, None] & (p[None, :] < HW)
            offs = c[:, None] * sc + p[None, :] * sp
            xhat = (tl.load(X + offs, mask=mask, other=0.0).to(tl.float32) - mean) * rstd
            dh = _gn_dh(xhat, tl.load(DY + offs, mask=mask, other=0.0).to(tl.float32), w, b, SILU)
            dw = tl.sum(dh * xhat, axis=1)  # (BLOCK_C,) this sample's share of dweight
            db = tl.sum(dh, axis=1)
        else:
            dwa = tl.zeros([BLOCK_C, BLOCK_P], dtype=tl.float32)
            dba = tl.zeros([BLOCK_C, BLOCK_P], dtype=tl.float32)
            for p0 in range(0, HW, BLOCK_P):
                mask = cmask[:, None] & (p0 + p[None, :] < HW)
                offs = c[:, None] * sc + (p0 + p[None, :]) * sp
                xhat = (tl.load(X + offs, mask=mask, other=0.0).to(tl.float32) - mean) * rstd
                dh = _gn_dh(xhat, tl.load(DY + offs, mask=mask, other=0.0).to(tl.float32), w, b, SILU)
                dwa += dh * xhat
                dba += dh
            dw = tl.sum(dwa, axis=1)
            db = tl.sum(dba, axis=1)
        ch = (pid // G) * C + (pid % G) * cg + c
        tl.store(DWp + ch, dw, mask=cmask)
        tl.store(DBp + ch, db, mask=cmask)
        c1 = tl.sum(w * db, axis=0) / n  # mean(dxhat)
        c2 = tl.sum(w * dw, axis=0) / n  # mean(dxhat * xhat)
        if SINGLE:
            dx = (dh * w[:, None] - c1 - xhat * c2) * rstd
            tl.store(DX + offs, dx.to(DX.dtype.element_ty), mask=mask)
        else:
            for p0 in range(0, HW, BLOCK_P):
                mask = cmask[:, None] & (p0 + p[None, :] < HW)
                offs = c[:, None] * sc + (p0 + p[None, :]) * sp
                xhat = (tl.load(X + offs, mask=mask, other=0.0).to(tl.float32) - mean) * rstd
                dh = _gn_dh(xhat, tl.load(DY + offs, mask=mask, other=0.0).to(tl.float32), w, b, SILU)
                dx = (dh * w[:, None] - c1 - xhat * c2) * rstd
                tl.store(DX + offs, dx.to(DX.dtype.element_ty), mask=mask)


# -----------------------------------------------------------------------------
# Launchers, wrapped as torch custom ops so torch.compile sees one opaque node (no graph break)


def _dense(x):
    """x laid out exactly as NCHW or channels_last (copied to NCHW otherwise), its memory format, and the strides
    (sb, sc, sp) the kernels index it with. Checked stride by stride: torch calls a tensor contiguous whatever the
    strides of its size-1 dimensions, but the kernel addresses pixel p = h * W + w at p * sp, which needs
    stride(H) == W * sp even when H or W is 1."""
    B, C, H, W = x.shape
    layouts = {torch.contiguous_format: (C * H * W, H * W, W, 1), torch.channels_last: (H * W * C, 1, W * C, C)}
    for fmt, strides in layouts.items():
        if all(s == t or n == 1 for s, t, n in zip(x.stride(), strides, x.shape)):
            break
    else:
        fmt, strides, x = torch.contiguous_format, layouts[torch.contiguous_format], x.contiguous()
    return x, fmt, (strides[0], strides[1], strides[3])


def _layout(x, groups):  # x made dense, its format, the kernel arguments, and the launch meta-parameters
    x, fmt, (sb, sc, sp) = _dense(x)
    B, C, H, W = x.shape
    assert C % groups == 0, f'channels {C} not divisible by groups {groups}'
    block_c = triton.next_power_of_2(C // groups)
    single = block_c * triton.next_power_of_2(H * W) <= MAX_SINGLE
    block_p = triton.next_power_of_2(H * W) if single else max(1, MAX_SINGLE // 4 // block_c)
    warps = min(16, max(4, block_c * block_p // 512))
    meta = dict(BLOCK_C=block_c, BLOCK_P=block_p, SINGLE=single, num_warps=warps)
    return x, fmt, (B, C, H * W, groups, sb, sc, sp), meta


if triton is not None:

    @torch.library.custom_op('kernels::group_norm_silu_fwd', mutates_args=())
    def _fwd(x: torch.Tensor, w: torch.Tensor, b: torch.Tensor, groups: int, eps: float, silu: bool
             ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        x, fmt, (B, C, HW, G, sb, sc, sp), meta = _layout(x, groups)
        w, b = w.contiguous(), b.contiguous()  # the kernels read w[c], b[c] at c
        y = torch.empty(x.shape, device=x.device, dtype=x.dtype, memory_format=fmt)  # the strides the kernel writes
        mean = torch.empty(B, G, device=x.device, dtype=torch.float32)
        rstd = torch.empty_like(mean)
        _gn_fwd[(B * G,)](x, y, w, b, mean, rstd, C, HW, G, sb, sc, sp, eps, SILU=silu, **meta)
        return y, mean, rstd

    @_fwd.register_fake
    def _(x, w, b, groups, eps, silu):
        mean = x.new_empty(x.shape[0], groups, dtype=torch.float32)
        return torch.empty(x.shape, device=x.device, dtype=x.dtype, memory_format=_dense(x)[1]), mean, \
            torch.empty_like(mean)

    @torch.library.custom_op('kernels::group_norm_silu_bwd', mutates_args=())
    def _bwd(dy: torch.Tensor, x: torch.Tensor, w: torch.Tensor, b: torch.Tensor, mean: torch.Tensor,
             rstd: torch.Tensor, silu: bool) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        x, fmt, (B, C, HW, G, sb, sc, sp), meta = _layout(x, mean.shape[1])
        w, b = w.contiguous(), b.contiguous()
        if _dense(dy)[2] != (sb, sc, sp) or dy.stride() != _dense(dy)[0].stride():  # the kernel indexes dy like x
            dy = torch.empty(x.shape, device=x.device, dtype=dy.dtype, memory_format=fmt).copy_(dy)
        dx = torch.empty(x.shape, device=x.device, dtype=x.dtype, memory_format=fmt)
        dwp = torch.empty(B, C, device=x.device, dtype=torch.float32)
        dbp = torch.empty_like(dwp)
        _gn_bwd[(B * G,)](x, dy, dx, w, b, mean, rstd, dwp, dbp, C, HW, G, sb, sc, sp, SILU=silu, **meta)
        return dx, dwp.sum(0).to(w.dtype), dbp.sum(0).to(b.dtype)

    @_bwd.register_fake
    def _(dy, x, w, b, mean, rstd, silu):
        return torch.empty(x.shape, device=x.device, dtype=x.dtype, memory_format=_dense(x)[1]), \
            torch.empty_like(w), torch.empty_like(b)

    def _setup_context(ctx, inputs, output):
        x, w, b, groups, eps, silu = inputs
        ctx.save_for_backward(x, w, b, output[1], output[2])
        ctx.silu = silu

    def _backward(ctx, dy, dmean, drstd):
        x, w, b, mean, rstd = ctx.saved_tensors
        dx, dw, db = _bwd(dy, x, w, b, mean, rstd, ctx.silu)
        return dx, dw, db, None, None, None

    _fwd.register_autograd(_backward, setup_context=_setup_context)


def group_norm_silu_triton(x, w, b, groups, eps=1e-6, silu=True):  # (B, C, H, W) -> same; autograd-capable
    return _fwd(x, w, b, groups, eps, silu)[0]


def group_norm_silu(x, w, b, groups, eps=1e-6, silu=True):  # the dispatcher the model calls
    if triton is None or not x.is_cuda or os.environ.get('KERNELS') != 'triton':
        return group_norm_silu_ref(x, w, b, groups, eps, silu)
    return group_norm_silu_triton(x, w, b, groups, eps, silu)
