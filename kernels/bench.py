"""Benchmark the kernels on the DDPM U-Net's shapes (CUDA only):  python -m kernels.bench [norm] [attn] [step] [sweep]

Prints markdown tables: median time (triton.testing.do_bench), achieved GB/s or TFLOP/s, % of the memory-bandwidth
floor (bytes read + written once, over the copy bandwidth measured in the same run), and the speed-up over eager
PyTorch and over torch.compile of the reference (and over F.scaled_dot_product_attention for attention).
The benchmarks live here rather than in each file's __main__: `python -m kernels.norm` would execute norm.py a
second time (the package import already ran it) and register its torch custom ops twice.
"""
import sys
import torch
import torch.nn.functional as F
from torch.autograd import grad

from . import attn, norm, sampler_step

GN_SHAPES = [(128, 128, 32, 32), (128, 256, 16, 16), (128, 256, 8, 8)]  # (B, C, H, W), 32 groups
ATTN_SHAPES = [(128, 1, 256, 256), (128, 4, 256, 64)]  # (B, heads, N, D)
STEP_SHAPES = [(256, 3, 32, 32), (2048, 3, 32, 32)]
DEVICE = 'cuda'


def ms(fn):
    import triton
    return triton.testing.do_bench(fn, warmup=25, rep=200, return_mode='median')


def copy_bandwidth():  # GB/s of a large device-to-device copy: the practical bandwidth floor
    x = torch.empty(2**28, device=DEVICE, dtype=torch.bfloat16)
    y = torch.empty_like(x)
    return 2 * x.nbytes / ms(lambda: y.copy_(x)) / 1e6


def row(*cells):
    print('| ' + ' | '.join(f'{c:.3f}' if isinstance(c, float) else str(c) for c in cells) + ' |')


def bench_norm(bw):
    print('\n### GroupNorm + SiLU (bf16, 32 groups, weight/bias fp32)\n')
    row('shape', 'format', 'pass', 'triton ms', 'GB/s', '% floor', 'eager ms', 'compile ms', 'x eager', 'x compile')
    row(*['---'] * 10)
    ref_c = torch.compile(norm.group_norm_silu_ref)
    for shape in GN_SHAPES:
        for fmt in (torch.contiguous_format, torch.channels_last):
            x = torch.randn(shape, device=DEVICE, dtype=torch.bfloat16).contiguous(memory_format=fmt)
            w = torch.randn(shape[1], device=DEVICE, requires_grad=True)
            b = torch.randn(shape[1], device=DEVICE, requires_grad=True)
            x.requires_grad_()
            dy = torch.randn_like(x)
            y, mean, rstd = norm._fwd(x, w, b, 32, 1e-6, True)
            name = 'NCHW' if fmt == torch.contiguous_format else 'NHWC'
            # forward reads x and writes y; backward reads x and dy and writes dx (w, b and stats are tiny)
            for label, n_bytes, t, fns in [
                ('fwd', 2 * x.nbytes, ms(lambda: norm._fwd(x, w, b, 32, 1e-6, True)),
                 [lambda f=f: f(x, w, b, 32) for f in (norm.group_norm_silu_ref, ref_c)]),
                ('bwd', 3 * x.nbytes, ms(lambda: norm._bwd(dy, x, w, b, mean, rstd, True)), None),
                ('fwd+bwd', 5 * x.nbytes, ms(lambda: grad(norm.group_norm_silu_triton(x, w, b, 32), (x, w, b), dy)),
                 [lambda f=f: grad(f(x, w, b, 32), (x, w, b), dy) for f in (norm.group_norm_silu_ref, ref_c)]),
            ]:
                gbs = n_bytes / t / 1e6
                te, tc = [ms(f) for f in fns] if fns else ('-', '-')
                speed = [f'{o / t:.2f}' if fns else '-' for o in (te, tc)]
                row(shape, name, label, t, f'{gbs:.0f}', f'{100 * gbs / bw:.0f}', te, tc, *speed)


def bench_attn():
    print('\n### Attention (bf16, scale D**-0.5); TFLOP/s counts 4 B H N^2 D forward, 2.5x that backward\n')
    row('shape', 'layout', 'pass', 'triton ms', 'TFLOP/s', 'sdpa ms', 'eager ms', 'compile ms', 'x sdpa', 'x eager',
        'x compile')
    row(*['---'] * 11)
    def naive(q, k, v):  # the (N, N) scores materialised, softmax in fp32: what SDPA and the kernel avoid
        s = q.float() @ k.float().transpose(-2, -1) * q.shape[-1] ** -0.5
        return (s.softmax(-1) @ v.float()).to(q.dtype)
    ref_c = torch.compile(naive)
    for (B, H, N, D) in ATTN_SHAPES:
        for layout in ('contiguous', 'unet'):
            if layout == 'unet':  # views of the qkv conv output, as the U-Net passes them
                q, k, v = torch.randn(B, 3, H, D, N, device=DEVICE, dtype=torch.bfloat16).transpose(-1, -2).unbind(1)
            else:
                q, k, v = torch.randn(3, B, H, N, D, device=DEVICE, dtype=torch.bfloat16).unbind(0)
            q, k, v = [t.detach().requires_grad_() for t in (q, k, v)]
            do = torch.randn(B, H, N, D, device=DEVICE, dtype=torch.bfloat16)
            fns = [attn.attention_triton, F.scaled_dot_product_attention, naive, ref_c]
            flops = 4 * B * H * N * N * D
            for label, f_flops, wrap in [('fwd', flops, lambda f: lambda: f(q, k, v)),
                                         ('fwd+bwd', 3.5 * flops, lambda f: lambda: grad(f(q, k, v), (q, k, v), do))]:
                t, *others = [ms(wrap(f)) for f in fns]
                speed = [f'{o / t:.2f}' for o in others]
                row((B, H, N, D), layout, label, t, f'{f_flops / t / 1e9:.0f}', *others, *speed)


def sweep_attn():  # try tile configs on the U-Net shapes; copy the winners into attn.FWD_CFG / attn.BWD_CFG
    print('\n### Attention tile sweep (bf16): ms per (BLOCK_M, BLOCK_N, num_warps, num_stages)\n')
    row('shape', 'pass', 'best config', 'best ms', 'current ms')
    row(*['---'] * 5)
    cands = [(bm, bn, w, st) for bm in (32, 64, 128) for bn in (32, 64, 128) for w in (4, 8) for st in (1, 2, 3)]
    for (B, H, N, D) in ATTN_SHAPES:
        q, k, v = torch.randn(B, 3, H, D, N, device=DEVICE, dtype=torch.bfloat16).transpose(-1, -2).unbind(1)
        o, lse = attn._fwd(q, k, v)
        do = torch.randn_like(o)
        bucket = 64 if D <= 64 else 128 if D <= 128 else 256
        for label, table, fn in [('fwd', attn.FWD_CFG, lambda: attn._fwd(q, k, v)),
                                 ('bwd', attn.BWD_CFG, lambda: attn._bwd(do, q, k, v, o, lse))]:
            current, times = table[bucket], {}
            for cfg in cands:
                table[bucket] = cfg
                try:
                    times[cfg] = ms(fn)
                except Exception:  # e.g. out of shared memory or registers for this tile size
                    pass
            table[bucket] = current
            best = min(times, key=times.get)
            row((B, H, N, D), label, best, times[best], times.get(current, '-'))


def step_eager(x, out, z, a, b, c0, cx, sigma, clip):  # the same maths as the fused kernel, one torch op at a time
    x0 = a * x + b * out.float()
    x0 = x0.clamp(-1, 1) if clip else x0
    return c0 * x0 + cx * x + sigma * z


def bench_step(bw):
    print('\n### Sampler step (x, z fp32, model output bf16, clip on); bytes = x + out + z read, x_prev written\n')
    row('shape', 'step', 'triton ms', 'GB/s', '% floor', 'eager ms', 'compile ms', 'x eager', 'x compile')
    row(*['---'] * 9)
    eager_c = torch.compile(step_eager)
    for shape in STEP_SHAPES:
        x, z = torch.randn(shape, device=DEVICE), torch.randn(shape, device=DEVICE)
        out = torch.randn(shape, device=DEVICE, dtype=torch.bfloat16)
        for name, coefs in [('ddpm', sampler_step.ddpm_coefs), ('ddim', sampler_step.ddim_coefs)]:
            a, b = sampler_step.x0_coefs(0.5, 'eps')
            c0, cx = coefs(0.5, 0.6, 0.1)
            args = (x, out, z, a, b, c0, cx, 0.1, True)
            t = ms(lambda: sampler_step._step(*args))
            te, tc = ms(lambda: step_eager(*args)), ms(lambda: eager_c(*args))
            gbs = (3 * x.nbytes + out.nbytes) / t / 1e6
            row(shape, name, t, f'{gbs:.0f}', f'{100 * gbs / bw:.0f}', te, tc, f'{te / t:.2f}', f'{tc / t:.2f}')


def main():
    if not torch.cuda.is_available() or norm.triton is None:
        sys.exit('kernels.bench needs a CUDA GPU and triton (on CPU the kernels only run, slowly, under '
                 'TRITON_INTERPRET=1 for the tests)')
    import triton
    which = sys.argv[1:] or ['norm', 'attn', 'step']
    bw = copy_bandwidth()
    print(f'{torch.cuda.get_device_name()} | torch {torch.__version__} | triton {triton.__version__} | '
          f'copy bandwidth {bw:.0f} GB/s')
    if 'norm' in which:
        bench_norm(bw)
    if 'attn' in which:
        bench_attn()
    if 'step' in which:
        bench_step(bw)
    if 'sweep' in which:  # not in the default set: about a minute per shape
        sweep_attn()


if __name__ == '__main__':
    main()
