"""Triton kernels for the U-Net's hot ops, each beside its plain-PyTorch reference (see the files).

Triton runs on CUDA tensors when KERNELS=triton is set; otherwise every op uses its reference. The Triton path is
opt-in until tests/test_kernels.py and the benchmarks have passed on a GPU (so far only the CPU interpreter ran them).
Benchmarks: python -m kernels.bench [norm|attn|step]
"""
import os
from .norm import group_norm_silu, triton
from .attn import attention
from .sampler_step import ddpm_step_triton as ddpm_step, ddim_step_triton as ddim_step


def available(x):  # True when the fused Triton kernels can run on x
    return triton is not None and x.is_cuda and os.environ.get('KERNELS') == 'triton'
