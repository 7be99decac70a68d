"""Benchmarks, one command per script: training throughput (ms/step, img/s), FLOPs per step (matmul and conv, forward
+ backward, torch's counter) and peak memory of each model at the script's own flags and presets, and eval_fid.py's
feature throughput and the time of a 50k-sample FID. Speed is measured here, never in a test.

    python bench.py ddpm --dataset cifar10 --compile 1        # img/s, GFLOP/step, MFU; KERNELS=triton: the kernels
    python bench.py vae --dataset mnist                       # and --arch ae --dataset cifar10
    python bench.py gan --dataset mnist                       # the real gan.py loop for 30 steps, in a temp folder
    python bench.py flows --dataset cifar10
    python bench.py ldm --out runs/ldm-mnist                  # a trained run: GFLOP/step and ms per decoded sample
    python bench.py fid 50000                                 # features img/s and the time of a 50k FID

Random data of the model's shape (real MNIST for gan), so no dataset is needed. Quote the figures with the GPU name,
the torch version and the commit, and compare ratios only within one run (README "Results").
"""
import sys, tempfile, time
from contextlib import nullcontext
from pathlib import Path

import torch
from torch.utils.flop_counter import FlopCounterMode

import common

PEAK_BF16_FLOPS = {'H100 PCIe': 756e12, 'H100': 989e12, 'H200': 989e12, 'A100': 312e12}  # dense, NVIDIA's sheets


def measure(what, model, opt, loss, batch, device, steps=50, bf16=False):
    """A training step is loss(eager) (eager: the uncompiled model), backward, opt.step(); its FLOPs are counted once
    (eager), then `steps` of them are timed after 3 warm-up steps (compilation, cuDNN autotuning). Prints one line."""
    cuda = 'cuda' in device

    def step(eager=False):
        opt.zero_grad(set_to_none=True)
        loss(eager).backward()
        opt.step()
    with FlopCounterMode(display=False) as counter:
        step(eager=True)
    steps = steps if cuda else 3
    for _ in range(3 if cuda else 1):
        step()
    if cuda:
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
    t0 = time.perf_counter()
    for _ in range(steps):
        step()
    if cuda:
        torch.cuda.synchronize()
    dt, flops = (time.perf_counter() - t0) / steps, counter.get_total_flops()
    name = torch.cuda.get_device_name() if cuda else 'cpu'
    peak = next((v for k, v in PEAK_BF16_FLOPS.items() if k in name), None) if cuda and bf16 else None
    print(f'{name} | torch {torch.__version__} | {what} | batch {batch} | '
          f'{sum(p.numel() for p in model.parameters()) / 1e6:.2f}M params\n{flops / 1e9:.2f} GFLOP/step | '
          f'{1000 * dt:.1f} ms/step | {batch / dt:.0f} img/s | peak memory '
          f'{torch.cuda.max_memory_allocated() / 2 ** 30 if cuda else float("nan"):.2f} GiB | '
          f'{flops / dt / 1e12:.2f} TFLOP/s' +
          (f' | MFU {100 * flops / dt / peak:.1f}% of {peak / 1e12:.0f}' if peak else ''))


def ddpm_bench(argv):
    import ddpm
    cfg = common.parse_config(ddpm.Config, ddpm.PRESETS, None, argv)
    device = common.setup(cfg.device)[0]
    cuda, (C, H, _) = 'cuda' in device, common.image_shape(cfg)
    model = ddpm.make_model(cfg, C, H).to(device, memory_format=torch.channels_last if cuda else torch.preserve_format)
    torch.backends.cudnn.benchmark = True  # as ddpm.train runs it: NHWC, fused AdamW, cuDNN autotuning
    opt = torch.optim.AdamW(model.parameters(), lr=cfg.lr, fused=cuda or None)
    net = torch.compile(model) if cfg.compile and cuda else model
    amp = torch.autocast('cuda', torch.bfloat16) if cfg.bf16 and cuda else nullcontext()
    ab, x0 = ddpm.make_alpha_bar(cfg.schedule, cfg.T).float().to(device), torch.rand(cfg.batch_size, C, H, H,
                                                                                    device=device)

    def loss(eager):
        with amp:
            return ddpm.loss_fn(model if eager else net, x0 * 2 - 1, None, ab, cfg.objective)
    measure(f'ddpm {cfg.dataset} (preset {cfg.preset}) compile {int(cfg.compile and cuda)}', model, opt, loss,
            cfg.batch_size, device, bf16=cfg.bf16)


def vae_bench(argv):
    import vae
    cfg = common.parse_config(vae.Config, vae.PRESETS, vae.pick, argv)
    device, (C, H, _) = common.setup(cfg.device)[0], common.image_shape(cfg)
    model = vae.VAE(cfg, C, H).to(device)
    opt = torch.optim.Adam(model.parameters(), lr=cfg.lr)
    xb = vae.to_model(torch.randint(0, 256, (cfg.batch_size, C, H, H), dtype=torch.uint8, device=device),
                      cfg.likelihood)

    def loss(eager):
        rec, kl = model(xb)
        return (kl - rec).mean()  # -ELBO
    measure(f'vae {cfg.arch} {cfg.dataset} (preset {cfg.preset})', model, opt, loss, cfg.batch_size, device, steps=20)


def gan_bench(argv):
    """The real gan.py loop (each G step with its n_critic D steps) for 30 steps; ms/step and img/s of the last 10."""
    import dataclasses, gan
    from exercises.curves import read_log
    cfg = common.parse_config(gan.Config, gan.PRESETS, gan.pick, argv)
    cuda = 'cuda' in common.resolve_device(cfg.device)
    with tempfile.TemporaryDirectory() as tmp:
        gan.train(dataclasses.replace(cfg, out=tmp, steps=30, log_every=10, ckpt_every=30, sample_every=0, fid_every=0,
                                      resume=False, epochs=0))
        log = read_log(Path(tmp) / 'log.txt')
    print(f'{torch.cuda.get_device_name() if cuda else "cpu"} | torch {torch.__version__} | gan {cfg.loss}, n_critic '
          f'{cfg.n_critic}, batch {cfg.batch_size}, ch {cfg.ch} | {log["ms/step"][1][-1]:.1f} ms/step | '
          f'{log["img/s"][1][-1]:.0f} img/s | peak memory ' +
          (f'{torch.cuda.max_memory_allocated() / 2**30:.2f} GiB (with the uint8 dataset)' if cuda else 'n/a on CPU'))


def flows_bench(argv):
    import flows
    cfg = common.parse_config(flows.Config, flows.PRESETS, None, argv)
    device, shape = common.setup(cfg.device)[0], common.image_shape(cfg)
    flow = flows.make_flow(cfg, shape).to(device)
    opt = torch.optim.Adam(flow.parameters(), lr=cfg.lr)
    net = torch.compile(flow) if cfg.compile and 'cuda' in device else flow
    x = torch.rand(cfg.batch_size, *shape, device=device) * 256
    loss = lambda eager: flows.nll(flow if eager else net, x, cfg.alpha).mean()
    measure(f'flows {cfg.dataset} (preset {cfg.preset})', flow, opt, loss, cfg.batch_size, device, steps=20)


def ldm_bench(argv):
    """A trained ldm.py run's U-Net: a training step on random latents, and ms per decoded sample (--sample-steps)."""
    import ldm, ddpm
    cfg = common.parse_config(ldm.Config, ldm.PRESETS, None, argv)
    model, ae, scale, zshape, cfg = ldm.load(cfg)
    device = str(next(model.parameters()).device)
    model.train().requires_grad_(True)
    opt = torch.optim.AdamW(model.parameters(), lr=cfg.lr)
    ab = ddpm.make_alpha_bar(cfg.schedule, cfg.T).float().to(device)
    z = torch.randn(cfg.batch_size, *zshape, device=device)
    y = ddpm.labels(cfg.cond == 'class', -1, 0, cfg.batch_size, device)
    loss = lambda eager: ddpm.loss_fn(model, z, y, ab, cfg.objective)
    measure(f'ldm latents {zshape}', model, opt, loss, cfg.batch_size, device, steps=10)
    sync = torch.cuda.synchronize if 'cuda' in device else (lambda: None)
    sync()
    t0 = time.perf_counter()
    ldm.sample(model.eval(), ae, scale, zshape, cfg, 0, cfg.sample_batch, torch.Generator(device).manual_seed(0))
    sync()
    print(f'sampling {1000 * (time.perf_counter() - t0) / cfg.sample_batch:.2f} ms/image ({cfg.sampler}, '
          f'{cfg.sample_steps} steps, batch {cfg.sample_batch}, decode included)')


def fid_bench(argv):
    """eval_fid.py: img/s of features from uint8 32x32 tensors and from a PNG folder, the time of an n-sample FID."""
    from PIL import Image
    import eval_fid
    n, batch = int(argv[0]) if argv else 50000, 200
    model = eval_fid.load_inception(device='cuda' if torch.cuda.is_available() else 'cpu')
    device = next(model.parameters()).device
    x = torch.randint(0, 256, (n, 3, 32, 32), dtype=torch.uint8, generator=torch.Generator().manual_seed(0))

    def timed(fn):
        torch.cuda.synchronize() if device.type == 'cuda' else None
        t0, out = time.perf_counter(), fn()
        torch.cuda.synchronize() if device.type == 'cuda' else None
        return time.perf_counter() - t0, out

    with tempfile.TemporaryDirectory() as folder:
        n_png = min(n, 10000)
        for i, a in enumerate(x[:n_png].permute(0, 2, 3, 1).numpy()):
            Image.fromarray(a).save(f'{folder}/{i:05d}.png')
        eval_fid.compute_features(x[:batch], model=model, batch_size=batch)  # warm-up: cuDNN picks its algorithms
        for mode in eval_fid.MODES:
            t, _ = timed(lambda m=mode: eval_fid.compute_features(x, m, model=model, batch_size=batch))
            print(f'eval_fid {mode:11s}: {n / t:7.0f} img/s from in-memory uint8 32x32 on {device}')
        t, _ = timed(lambda: eval_fid.input_features(folder, model=model, batch_size=batch))
        print(f'eval_fid pytorch-fid: {n_png / t:7.0f} img/s from a folder of {n_png} PNGs')
        t, ref = timed(lambda: eval_fid.stats_of(eval_fid.compute_features(x, model=model)))
        t_fd, _ = timed(lambda: eval_fid.frechet_distance(*ref, *ref))
        print(f'eval_fid pytorch-fid: FID of {n} in-memory samples in {t + t_fd:.1f} s ({t_fd:.1f} s the distance)')


BENCHES = dict(ddpm=ddpm_bench, vae=vae_bench, gan=gan_bench, flows=flows_bench, ldm=ldm_bench, fid=fid_bench)


def main(argv=None):
    argv = list(sys.argv[1:] if argv is None else argv)
    if not argv or argv[0] in ('-h', '--help'):
        return print(__doc__)
    if argv[0] not in BENCHES:
        common.fail(f'unknown benchmark {argv[0]!r}: python bench.py {"|".join(BENCHES)} [that script\'s flags]')
    with common.script_guard():
        BENCHES[argv[0]](argv[1:])


if __name__ == '__main__':
    main()
