"""Compile every kernel for a GPU on a machine without one:  python -m kernels.aot [--arch 90]

Triton ships ptxas, so the launches our launchers make on the U-Nets' shapes can be recorded (not run) on CPU
tensors and compiled for sm_90 (H100/H200) anywhere. Prints registers, spills and shared memory per kernel variant
and exits non-zero if a variant fails to compile, spills registers or needs more shared memory than the arch has:
the failures that would otherwise first show up on the GPU. tests/test_kernels.py runs it in CI. It checks that the
kernels build and fit, not that they are right (the interpreter tests) or fast (kernels.bench).
"""
import argparse, os, re, subprocess, sys, tempfile

import torch

# (C, H * W) of every GroupNorm in ddpm.py's cifar10 and mnist U-Nets (32 groups), plus 64x64 for the two-pass path
GN_SHAPES = [(128, 1024), (256, 256), (256, 64), (256, 16), (384, 1024), (512, 256), (128, 784), (192, 196),
             (64, 196), (128, 49), (256, 49), (512, 4096)]
ATTN_SHAPES = [(1, 256, 256), (1, 16, 256), (1, 196, 128), (1, 49, 128), (4, 256, 64)]  # (heads, N, D)
SMEM = {80: 163 << 10, 86: 99 << 10, 89: 99 << 10, 90: 227 << 10}  # max shared memory per block (bytes)
TYPES = {torch.float32: 'fp32', torch.bfloat16: 'bf16', torch.float16: 'fp16'}


def capture():
    """(JITFunction, args, kwargs) of every launch of the launchers on the shapes above, recorded instead of run."""
    from triton.runtime.jit import JITFunction
    from . import attn, norm, sampler_step

    launches = []  # from here on this process records launches and can run no kernel: a CLI / subprocess only
    JITFunction.run = lambda self, *args, grid, warmup, **kw: launches.append((self, args, kw))
    for dtype in TYPES:
        for C, HW in GN_SHAPES:
            x, w, b = torch.empty(2, C, HW, 1, dtype=dtype), torch.empty(C), torch.empty(C)
            for silu in (True, False):
                y, mean, rstd = norm._fwd(x, w, b, 32, 1e-6, silu)
                norm._bwd(y, x, w, b, mean, rstd, silu)
        for H, N, D in ATTN_SHAPES if dtype != torch.float32 else []:  # fp32 attention uses the reference
            q, k, v = torch.empty(2, 3, H, D, N, dtype=dtype).transpose(-1, -2).unbind(1)  # the U-Net's views
            o, lse = attn._fwd(q, k, v)
            attn._bwd(torch.empty_like(o), q, k, v, o, lse)
        x = torch.empty(2, 3, 32, 32)
        for z in (None, x):
            sampler_step._step(x, torch.empty_like(x, dtype=dtype), z, 1.0, 0.1, 0.9, 0.1, 0.0 if z is None else 0.1,
                               True)
    return launches


def compile_args(fn, args, kw):
    """The signature, constexprs and divisibility attributes Triton's launcher would derive from these arguments."""
    values = list(args) + [kw[p.name] for p in fn.params[len(args):]]
    sig, consts, attrs = {}, {}, {}
    for i, (p, a) in enumerate(zip(fn.params, values)):
        if p.is_constexpr or a is None or (type(a) is int and a == 1):  # Triton specialises ints equal to 1
            sig[p.name], consts[p.name] = 'constexpr', a
            continue
        if isinstance(a, torch.Tensor):
            sig[p.name], aligned = '*' + TYPES.get(a.dtype, 'fp32'), a.data_ptr() % 16 == 0
        elif isinstance(a, bool):
            sig[p.name], aligned = 'i1', False
        elif isinstance(a, int):
            sig[p.name], aligned = 'i32' if -2**31 <= a < 2**31 else 'i64', a % 16 == 0
        else:
            sig[p.name], aligned = 'fp32', False
        if aligned:
            attrs[(i,)] = [['tt.divisibility', 16]]
    return sig, consts, attrs


def ptxas_info(ptx, arch):
    """(registers, spilled bytes) per thread from ptxas -v on the kernel's PTX."""
    from triton.backends.nvidia import compiler  # the ptxas Triton itself uses for this arch

    ptxas = compiler.get_ptxas(arch).path if hasattr(compiler, 'get_ptxas') else compiler.knobs.nvidia.ptxas.path
    with tempfile.NamedTemporaryFile('w', suffix='.ptx') as f:
        f.write(ptx)
        f.flush()
        gpu = f'sm_{arch}a' if arch >= 90 else f'sm_{arch}'  # 'a': the arch-specific features Triton uses (wgmma)
        log = subprocess.run([ptxas, '-v', f'--gpu-name={gpu}', '-o', os.devnull, f.name],
                             capture_output=True, text=True, check=True).stderr
    regs = int(re.search(r'Used (\d+) registers', log).group(1))
    return regs, sum(int(n) for n in re.findall(r'(\d+) bytes spill (?:stores|loads)', log))


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument('--arch', type=int, default=90, choices=sorted(SMEM), help='compute capability x 10 (90: H100)')
    arch = p.parse_args(argv).arch
    if os.environ.get('TRITON_INTERPRET') == '1':
        sys.exit('kernels.aot compiles for the GPU: unset TRITON_INTERPRET')
    import triton
    from triton.backends.compiler import GPUTarget

    variants = {}
    for fn, args, kw in capture():
        sig, consts, attrs = compile_args(fn, args, kw)
        options = {k: kw[k] for k in ('num_warps', 'num_stages') if k in kw}
        key = (fn.__name__, str(sig), str(consts), str(attrs), str(options))
        variants.setdefault(key, (fn, sig, consts, attrs, options))
    print(f'| kernel | pointer types | meta-parameters | regs | spilled bytes | shared KiB |\n|{" --- |" * 6}')
    failed = []
    for fn, sig, consts, attrs, options in variants.values():
        ptrs = ','.join(sorted({t[1:] for t in sig.values() if t.startswith('*')}))
        meta = ' '.join(f'{k}={v}' for k, v in {**consts, **options}.items() if v is not None)
        try:
            k = triton.compile(triton.compiler.ASTSource(fn, sig, consts, attrs), target=GPUTarget('cuda', arch, 32),
                               options=options)
            regs, spill = ptxas_info(k.asm['ptx'], arch)
            shared = k.metadata.shared
        except Exception as e:  # a compile error: report it with the variant, keep going
            failed.append(f'{fn.__name__} {meta}: {type(e).__name__}: {str(e).strip().splitlines()[-1][:300]}')
            continue
        print(f'| {fn.__name__} | {ptrs} | {meta} | {regs} | {spill} | {shared / 1024:.1f} |')
        if spill or shared > SMEM[arch]:
            failed.append(f'{fn.__name__} {meta}: {spill} bytes spilled, {shared} bytes of shared memory')
    print(f'\n{len(variants)} variants compiled for sm_{arch} with triton {triton.__version__}')
    if failed:
        sys.exit('failed:\n' + '\n'.join(failed))


if __name__ == '__main__':
    main()
