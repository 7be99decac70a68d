"""Fused sampler steps: one DDPM ancestral (Ho et al. eq. 7) or DDIM (Song et al. eq. 12) update in one pass.

Both updates are linear in (x_t, x0, z) once x0 is known, and x0 is linear in (x_t, out) before the clamp:
    x0 = a * x + b * out        (clamped to [-1, 1] if clip)
    x_prev = c0 * x0 + cx * x + sigma * z
so the kernel reads x, out (and z) once and writes x_prev once; the per-step scalars are computed on the host in
float64. The plain-torch references are ddpm.ddpm_step and ddim.ddim_step (the tests compare against them).
"""
import math
from typing import Optional
import torch

try:
    import triton
    import triton.language as tl
except ImportError:
    triton = None


def x0_coefs(ab_t, objective):  # x0 = a * x + b * out for each parameterization of the network output
    if objective == 'eps':  # x_t = sqrt(ab) x0 + sqrt(1 - ab) eps, eq. (4)
        return 1 / math.sqrt(ab_t), -math.sqrt(1 - ab_t) / math.sqrt(ab_t)
    if objective == 'x0':
        return 0.0, 1.0
    if objective == 'v':  # v = sqrt(ab) eps - sqrt(1 - ab) x0  =>  x0 = sqrt(ab) x_t - sqrt(1 - ab) v
        return math.sqrt(ab_t), -math.sqrt(1 - ab_t)
    raise ValueError(f'unknown objective {objective!r}')


def ddpm_coefs(ab_t, ab_prev, sigma):  # posterior mean, eq. (7): c0 * x0 + cx * x_t
    alpha = ab_t / ab_prev
    beta = 1 - alpha
    return math.sqrt(ab_prev) * beta / (1 - ab_t), math.sqrt(alpha) * (1 - ab_prev) / (1 - ab_t)


def ddim_coefs(ab_t, ab_prev, sigma):  # eq. (12) with eps = (x_t - sqrt(ab_t) x0) / sqrt(1 - ab_t) substituted
    k = math.sqrt(max(1 - ab_prev - sigma**2, 0.0))  # "direction pointing to x_t"
    return math.sqrt(ab_prev) - k * math.sqrt(ab_t) / math.sqrt(1 - ab_t), k / math.sqrt(1 - ab_t)


# -----------------------------------------------------------------------------
# Triton kernel

if triton is not None:

    @triton.jit
    def _sampler_step(X, Out, Z, Y,  # pointers: x_t (fp32), model output, noise (or a dummy), x_prev (fp32)
                      n, a, b, c0, cx, sigma,  # numel and the per-step scalars above
                      HAS_Z: tl.constexpr, CLIP: tl.constexpr, BLOCK: tl.constexpr):
        offs = tl.program_id(0).to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
        mask = offs < n
        x = tl.load(X + offs, mask=mask, other=0.0).to(tl.float32)
        x0 = a * x + b * tl.load(Out + offs, mask=mask, other=0.0).to(tl.float32)
        if CLIP:
            x0 = tl.minimum(tl.maximum(x0, -1.0), 1.0)
        y = c0 * x0 + cx * x
        if HAS_Z:
            y += sigma * tl.load(Z + offs, mask=mask, other=0.0).to(tl.float32)
        tl.store(Y + offs, y, mask=mask)

    @torch.library.custom_op('kernels::sampler_step', mutates_args=())
    def _step(x: torch.Tensor, out: torch.Tensor, z: Optional[torch.Tensor], a: float, b: float, c0: float,
              cx: float, sigma: float, clip: bool) -> torch.Tensor:
        x, out = x.contiguous(), out.contiguous()
        z = z.contiguous() if z is not None else None
        y = torch.empty(x.shape, device=x.device, dtype=torch.float32)
        n, block = x.numel(), 2048
        _sampler_step[(triton.cdiv(n, block),)](x, out, z if z is not None else x, y, n, a, b, c0, cx, sigma,
                                                HAS_Z=z is not None, CLIP=clip, BLOCK=block, num_warps=8)
        return y

    @_step.register_fake
    def _(x, out, z, a, b, c0, cx, sigma, clip):
        return torch.empty(x.shape, device=x.device, dtype=torch.float32)


def _launch(coefs, x, out, z, ab_t, ab_prev, sigma, objective, clip):
    assert x.shape == out.shape and (z is None or z.shape == x.shape)
    # z = None adds no noise whatever sigma is, as in the references (ddpm.sample's last step under --var large)
    a, b = x0_coefs(ab_t, objective)
    c0, cx = coefs(ab_t, ab_prev, sigma)
    return _step(x, out, z, a, b, c0, cx, float(sigma), bool(clip))


def ddpm_step_triton(x, out, z, ab_t, ab_prev, sigma, objective, clip):  # x_t -> x_{t-1}, fp32, no autograd
    return _launch(ddpm_coefs, x, out, z, ab_t, ab_prev, sigma, objective, clip)


def ddim_step_triton(x, out, z, ab_t, ab_prev, sigma, objective, clip):  # x_t -> x_prev, fp32, no autograd
    return _launch(ddim_coefs, x, out, z, ab_t, ab_prev, sigma, objective, clip)

