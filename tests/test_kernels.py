"""Every Triton kernel against its plain-PyTorch reference, forward and backward, plus the dispatchers.
GPU: pytest tests/test_kernels.py (fp32/bf16/fp16, U-Net shapes). CPU: the Triton interpreter, fp32, tiny shapes."""
import os, subprocess, sys
import torch

if not torch.cuda.is_available():  # must precede the first import of triton kernels (conftest.py does it too)
    os.environ.setdefault('TRITON_INTERPRET', '1')
import pytest

import ddim
import ddpm
import kernels
from kernels import attn, norm, sampler_step

DEVICE = 'cuda' if torch.cuda.is_available() else 'cpu'
CUDA = DEVICE == 'cuda'
TOL = {torch.float32: dict(atol=1e-4, rtol=1e-4), torch.bfloat16: dict(atol=3e-2, rtol=3e-2),
       torch.float16: dict(atol=1e-2, rtol=1e-2)}
pytestmark = pytest.mark.skipif(norm.triton is None, reason='triton is not installed')


def randn(*shape, dtype=torch.float32, seed=0):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(*shape, generator=g).to(DEVICE, dtype)


def check_grads(fn, ref, inputs, dtype, **kw):  # fn on inputs vs ref on fp32 copies: outputs and all gradients
    xs = [t.detach().requires_grad_() for t in inputs]
    xr = [t.detach().float().requires_grad_() for t in inputs]
    y, yr = fn(*xs, **kw), ref(*xr, **kw)
    assert y.dtype == dtype and y.shape == yr.shape
    torch.testing.assert_close(y, yr.to(dtype), **TOL[dtype])
    dy = randn(*y.shape, dtype=dtype, seed=1)
    grads = torch.autograd.grad(y, xs, dy)
    grads_ref = torch.autograd.grad(yr, xr, dy.float())
    for i, (g, gr, t) in enumerate(zip(grads, grads_ref, inputs)):
        assert g.dtype == t.dtype and g.shape == t.shape, i
        torch.testing.assert_close(g, gr.to(g.dtype), **TOL[dtype], msg=lambda m: f'grad of input {i}: {m}')
    return y, xs


def test_interpreter_is_on():  # on CPU the kernels only run if TRITON_INTERPRET=1 was set before they were defined
    assert CUDA or 'Interpret' in type(norm._gn_fwd).__name__, \
        'set TRITON_INTERPRET=1 at the top of tests/conftest.py (kernels was imported before this file)'


# -----------------------------------------------------------------------------
# GroupNorm (+ SiLU)

GN_SHAPES = [(2, 6, 5, 7, 3), (3, 8, 4, 4, 4), (1, 12, 3, 9, 2), (2, 4, 4, 4, 4), (1, 4, 64, 64, 1)]  # (B, C, H, W, G)
GN_SHAPES += [(4, 128, 32, 32, 32), (2, 256, 8, 8, 32), (2, 64, 64, 64, 32), (2, 512, 16, 16, 8)] if CUDA else []


@pytest.mark.parametrize('dtype', [torch.float32] + ([torch.bfloat16, torch.float16] if CUDA else []))
@pytest.mark.parametrize('silu', [True, False])
@pytest.mark.parametrize('layout', ['nchw', 'channels_last', 'strided'])
@pytest.mark.parametrize('shape', GN_SHAPES)
def test_group_norm_silu(shape, layout, silu, dtype):
    B, C, H, W, G = shape
    x = randn(B, C, H, W + 1, dtype=dtype)[..., 1:] * 2 + 0.5  # a non-dense view; copied to NCHW by the op
    x = {'nchw': x.contiguous(), 'channels_last': x.contiguous(memory_format=torch.channels_last), 'strided': x}[layout]
    w, b = 1 + randn(C, seed=2), randn(C, seed=3)
    y, _ = check_grads(norm.group_norm_silu_triton, norm.group_norm_silu_ref, (x, w, b), dtype, groups=G, silu=silu)
    assert y.is_contiguous(memory_format=torch.channels_last if layout == 'channels_last' else torch.contiguous_format)


@pytest.mark.parametrize('channels_last', [False, True])
def test_group_norm_silu_two_pass(monkeypatch, channels_last):  # groups too big for registers: looped statistics
    monkeypatch.setattr(norm, 'MAX_SINGLE', 16)
    x = randn(2, 6, 5, 7) * 3 + 10  # a large mean tests the shifted sums
    x = x.to(memory_format=torch.channels_last) if channels_last else x
    check_grads(norm.group_norm_silu_triton, norm.group_norm_silu_ref, (x, randn(6, seed=2), randn(6, seed=3)),
                torch.float32, groups=3)


def test_group_norm_silu_odd_layouts():
    """Size-1 dimensions with strides torch ignores when it calls a tensor contiguous, and weight/bias that are
    strided views: both must be read where they really are."""
    x = randn(2, 6, 1, 9).transpose(2, 3)  # (2, 6, 9, 1), strides (54, 9, 1, 9): "contiguous", pixel stride 1
    assert x.is_contiguous() and x.stride(3) != 1
    w, b = (1 + randn(12, seed=4))[::2], randn(12, seed=5)[1::2]  # views with stride 2
    assert w.stride() == (2,) and b.stride() == (2,)
    check_grads(norm.group_norm_silu_triton, norm.group_norm_silu_ref, (x, w, b), torch.float32, groups=3)
    xc = randn(2, 6, 1, 9).to(memory_format=torch.channels_last).transpose(2, 3)  # channels_last-like, H = 9, W = 1
    check_grads(norm.group_norm_silu_triton, norm.group_norm_silu_ref, (xc, w, b), torch.float32, groups=2)


# -----------------------------------------------------------------------------
# Attention

ATTN_SHAPES = [(1, 2, 35, 32), (2, 1, 5, 48), (1, 1, 40, 64), (1, 2, 24, 128), (1, 1, 20, 256)]  # (B, heads, N, D)
ATTN_SHAPES += [(4, 1, 256, 256), (2, 4, 256, 64), (2, 2, 100, 128), (1, 3, 1024, 64)] if CUDA else []


@pytest.mark.parametrize('dtype', [torch.bfloat16, torch.float16] if CUDA else [torch.float32])
@pytest.mark.parametrize('layout', ['contiguous', 'unet'])
@pytest.mark.parametrize('shape', ATTN_SHAPES)
def test_attention(shape, layout, dtype):
    B, H, N, D = shape
    if layout == 'unet':  # q, k, v as views of a 1x1-conv output (B, 3 * H * D, N), as the U-Net makes them
        q, k, v = randn(B, 3, H, D, N, dtype=dtype).transpose(-1, -2).unbind(1)
    else:
        q, k, v = randn(3, B, H, N, D, dtype=dtype).unbind(0)
    check_grads(attn.attention_triton, attn.attention_ref, (q, k, v), dtype)


# -----------------------------------------------------------------------------
# Sampler steps: the fused kernels against the scripts' own functions

ABS = [(0.5, 0.7), (0.02, 0.03), (0.999, 1.0), (4e-5, 6e-5)]  # (ab_t, ab_prev): mid, late, last step, first step


@pytest.mark.parametrize('noise', [False, True])
@pytest.mark.parametrize('clip', [False, True])
@pytest.mark.parametrize('objective', ['eps', 'x0', 'v'])
@pytest.mark.parametrize('sampler', ['ddpm', 'ddim'])
def test_sampler_step(sampler, objective, clip, noise):
    fused, ref = {'ddpm': (sampler_step.ddpm_step_triton, ddpm.ddpm_step),
                  'ddim': (sampler_step.ddim_step_triton, ddim.ddim_step)}[sampler]
    x, z = randn(2, 3, 5, 7), randn(2, 3, 5, 7, seed=1)
    for i, (ab_t, ab_prev) in enumerate(ABS):
        out = randn(2, 3, 5, 7, seed=2, dtype=torch.bfloat16 if i == 0 else torch.float32)  # the net's output
        eta = 1.0 if sampler == 'ddpm' else 0.5
        sigma = eta * ((1 - ab_prev) / (1 - ab_t) * (1 - ab_t / ab_prev)) ** 0.5 if noise else 0.0
        args = (x, out, z if noise else None, ab_t, ab_prev, sigma, objective, clip)
        y = fused(*args)
        assert y.dtype == torch.float32
        torch.testing.assert_close(y, ref(*args), atol=1e-5, rtol=1e-5, msg=lambda m: f'ab_t={ab_t}: {m}')


def test_sampler_step_ignores_sigma_without_noise():
    """ddpm.sample passes z = None at the last step with the --var large sigma = sqrt(beta_0) > 0; the reference then
    adds nothing, and so must the fused step (it used to assert)."""
    x, out = randn(2, 3, 5, 7), randn(2, 3, 5, 7, seed=2)
    for fused, ref in ((sampler_step.ddpm_step_triton, ddpm.ddpm_step), (sampler_step.ddim_step_triton, ddim.ddim_step)):
        args = (x, out, None, 0.9999, 1.0, 0.01, 'eps', True)
        torch.testing.assert_close(fused(*args), ref(*args), atol=1e-5, rtol=1e-5)


# -----------------------------------------------------------------------------
# Dispatchers and torch.compile


def test_dispatch(monkeypatch):  # CPU tensors, CUDA without KERNELS=triton, and fp32 attention take the reference
    calls = []
    monkeypatch.setenv('KERNELS', 'triton')
    monkeypatch.setattr(norm, 'group_norm_silu_triton', lambda *args, **kw: calls.append('norm'))
    monkeypatch.setattr(attn, 'attention_triton', lambda *args: calls.append('attn'))
    x, w, b, q = randn(2, 8, 4, 4).cpu(), randn(8).cpu(), randn(8).cpu(), randn(1, 1, 16, 32).cpu()
    assert not kernels.available(x)
    exact = dict(atol=0, rtol=0)
    torch.testing.assert_close(kernels.group_norm_silu(x, w, b, 4), norm.group_norm_silu_ref(x, w, b, 4), **exact)
    torch.testing.assert_close(kernels.attention(q, q, q), attn.attention_ref(q, q, q), **exact)
    assert calls == []
    if CUDA:
        x, w, b, q = x.cuda(), w.cuda(), b.cuda(), q.cuda()
        assert kernels.available(x)
        kernels.group_norm_silu(x, w, b, 4), kernels.attention(q.bfloat16(), q.bfloat16(), q.bfloat16())
        kernels.attention(q, q, q)  # fp32 attention stays on the reference
        assert calls == ['norm', 'attn']
        monkeypatch.setenv('KERNELS', 'torch')
        assert not kernels.available(x)
        torch.testing.assert_close(kernels.group_norm_silu(x, w, b, 4), norm.group_norm_silu_ref(x, w, b, 4), **exact)
        assert calls == ['norm', 'attn']


def test_compile():  # the custom ops trace into one graph (fullgraph) with the same values and gradients as eager
    def f(x, w, b, q, k, v):
        return norm.group_norm_silu_triton(x, w, b, 3).square().sum() + attn.attention_triton(q, k, v).square().sum()
    inputs = [randn(2, 6, 5, 7), randn(6, seed=1), randn(6, seed=2), *randn(3, 1, 2, 35, 32, seed=3).unbind(0)]
    inputs = [t.requires_grad_() for t in inputs]
    compiled = torch.compile(f, backend='aot_eager' if not CUDA else 'inductor', fullgraph=True)
    loss, loss_ref = compiled(*inputs), f(*inputs)
    torch.testing.assert_close(loss, loss_ref)
    for g, gr in zip(torch.autograd.grad(loss, inputs), torch.autograd.grad(loss_ref, inputs)):
        torch.testing.assert_close(g, gr)


def test_every_kernel_compiles_for_sm90_without_spills(tmp_path):
    """The launches on the U-Nets' shapes, compiled for the H100 with Triton's own ptxas (python -m kernels.aot)."""
    pytest.importorskip('triton.backends.nvidia.compiler')
    env = {k: v for k, v in os.environ.items() if k != 'TRITON_INTERPRET'}
    env.update(TRITON_CACHE_DIR=str(tmp_path), TRITON_DEFAULT_FP_FUSION='1')
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    p = subprocess.run([sys.executable, '-m', 'kernels.aot', '--arch', '90'], cwd=root, env=env, capture_output=True,
                       text=True)
    assert p.returncode == 0, p.stdout[-3000:] + p.stderr[-3000:]
    assert 'variants compiled for sm_90' in p.stdout and '_attn_bwd_dkdv | bf16' in p.stdout
