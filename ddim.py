"""DDIM (Song et al. 2021, arXiv:2010.02502) and DPM-Solver++(2M) (Lu et al. 2022, arXiv:2211.01095): fast samplers for
any ddpm.py checkpoint, no retraining. The trained eps/x0/v network fixes q(x_t | x_0); DDIM picks a non-Markovian
reverse process with the same marginals (eq. 12) that can skip steps, and is deterministic at eta = 0.

    python ddim.py --out runs/ddpm-cifar10 --steps 50                  # samples_ddim-S50-eta0.npz for eval_fid.py
    python ddim.py --out runs/ddpm-cifar10 --sampler dpm++2m --steps 10 --spacing quadratic
    python ddim.py --out runs/ddpm-cifar10 --mode invert | interp | sdedit | inpaint
    python exercises/ho_weights.py google-ddpm-cifar10-32/ --out runs/ho && python ddim.py --out runs/ho  # Ho's weights

Timesteps: --spacing uniform t_i = round(i (T-1) / (S-1)), which hits t = T-1 and t = 0; quadratic t_i = i +
round((T - S) (i / (S-1))^2), denser near t = 0 (Song et al. App. D.2 define both). On the Gaussian test
(tests/test_ddim.py) few-step samplers, DPM-Solver++ most of all, do better with quadratic. Measured (README
"ddim.py", exercises/ddim_steps.py): FID-2k of the 8-minute CPU MNIST model at S = 10 / 20 / 50: DDIM eta 0
100.9 / 84.0 / 59.1, eta 1 25.5 / 16.2 / 14.8, DPM-Solver++(2M) 77.1 / 72.4 / 58.2 (uniform spacing), 2 CPU cores.
"""
import math
from contextlib import nullcontext
from dataclasses import dataclass, replace
from functools import partial
from pathlib import Path

import numpy as np
import torch
from PIL import Image

import common
import ddpm
import kernels


@dataclass
class Config:
    mode: str = 'sample'  # sample | invert | interp | sdedit | inpaint
    out: str = ''  # run folder of a ddpm.py checkpoint (reads ckpt.pt; results are written here)
    ckpt: str = ''  # checkpoint file, if not <out>/ckpt.pt
    device: str = 'auto'  # auto | cuda | cpu | mps
    seed: int = 0  # seeds x_T and the noise, per batch: the same samples on any number of GPUs
    sampler: str = 'ddim'  # ddim (eq. 12) | dpm++2m (DPM-Solver++(2M)) | ddpm (ddpm.py's Alg. 2, all T steps)
    steps: int = 50  # S: timesteps used = model evaluations
    eta: float = 0.0  # DDIM stochasticity: 0 deterministic, 1 the DDPM posterior variance
    spacing: str = 'uniform'  # uniform | quadratic timesteps
    clip: bool = True  # clip the predicted x0 to [-1, 1] (never during inversion)
    guidance: float = 1.0  # classifier-free guidance w for --class-cond checkpoints
    label: int = -1  # class for --class-cond checkpoints (-1: cycle through the classes)
    n_samples: int = 64  # sample: number of images; other modes: images per figure (at most 8 rows)
    sample_batch: int = 256  # images per sampling batch
    save: str = 'png,npz'  # sample: png (a folder) and/or npz (uint8 (N, H, W, C))
    image: str = ''  # invert / sdedit / inpaint: an image file of the model's size (default: the test split)
    data_dir: str = ''  # folder with the dataset archives (default $GENMODELS_DATA, else ./data)
    mask: str = 'center'  # inpaint: the unknown region, center (a square of half the side) | right (right half)
    bf16: bool = True  # bf16 autocast for the network on CUDA


# -----------------------------------------------------------------------------
# The generalised reverse process, Song et al. sec. 4: timesteps tau_1 < ... < tau_S, and sigma(eta), eq. (16)


def timesteps(T, S, spacing):
    """S increasing integer timesteps in [0, T-1], from T-1 down to 0 when S > 1."""
    u = [i / (S - 1) if S > 1 else 1.0 for i in range(S)]
    if spacing == 'quadratic':
        return [i + round((T - S) * v * v) for i, v in enumerate(u)]
    return [round(v * (T - 1)) for v in u]


def ddim_sigma(ab_t, ab_prev, eta):  # eq. (16): eta = 1 is the DDPM posterior std, beta tilde^(1/2)
    return eta * ((1 - ab_prev) / (1 - ab_t) * (1 - ab_t / ab_prev)) ** 0.5


def ddim_step(x, out, z, ab_t, ab_prev, sigma, objective, clip):
    """One step of eq. (12): x_prev = sqrt(ab_prev) x0 + sqrt(1 - ab_prev - sigma^2) eps + sigma z, x0 clamped to
    [-clip, clip] (0 or False: off). Scalars are python floats (ab_prev = 1 at the last step); kernels.ddim_step is
    the fused version of exactly this."""
    ab = torch.tensor(ab_t, dtype=torch.float64)
    x0 = ddpm.predict_x0(x, out.float(), ab, objective)
    if clip:
        x0 = x0.clamp(-clip, clip)
    eps = ddpm.predict_eps(x, x0, ab)  # re-derived from the (clipped) x0, so the step stays on the x0 it points at
    x = ab_prev ** 0.5 * x0 + max(1 - ab_prev - sigma ** 2, 0.0) ** 0.5 * eps
    return x if z is None else x + sigma * z


def at(t, x):  # the integer timestep t for every image of the batch x
    return torch.full((len(x),), t, device=x.device)


@torch.no_grad()
def ddim_sample(model, x, ts, ab, eta, objective, clip=True, y=None, w=1.0, generator=None, snapshots=None,
                known=None):
    """x = x_{ts[-1]} -> x_0 by eq. (12) through the timesteps ts (ab: alpha_bar, float64 on the CPU); classifier-free
    guidance w with labels y. snapshots receives x before every step and the result. known = (x0, keep): inpainting
    by replacement. eta = 1 over ts = 0..T-1 is Algorithm 2; over a shorter ts, DDPM respaced."""
    step = kernels.ddim_step if kernels.available(x) and clip in (0, 1) else ddim_step
    for i in reversed(range(len(ts))):
        if snapshots is not None:
            snapshots.append(x.clone())
        ab_t, ab_prev = ab[ts[i]].item(), (ab[ts[i - 1]].item() if i > 0 else 1.0)
        sigma = ddim_sigma(ab_t, ab_prev, eta)  # 0 at the last step, where ab_prev = 1
        z = torch.randn(x.shape, device=x.device, generator=generator) if sigma > 0 else None
        x = step(x, ddpm.guided(model, x, at(ts[i], x), y, w), z, ab_t, ab_prev, sigma, objective, clip)
        if known is not None:  # the known pixels, noised afresh to this step's level with q(x_prev | x_0), eq. (4)
            x0, keep = known
            noise = torch.randn(x.shape, device=x.device, generator=generator)
            x = torch.where(keep, ddpm.q_sample(x0, torch.tensor(ab_prev, dtype=torch.float64), noise).float(), x)
    if snapshots is not None:
        snapshots.append(x.clone())
    return x  # pixels are clamped to [-1, 1] where they are used (ldm.py's latents are not bounded)


@torch.no_grad()
def ddim_invert(model, x, ts, ab, objective, y=None, w=1.0):
    """Deterministic encoding x_0 -> x_{ts[-1]}: eq. (12) at eta = 0 with t and t_prev swapped (Euler steps of the
    probability-flow ODE forwards in time). x_0 stands in for x_{ts[0]}, as ab[ts[0]] ~ 1. No clipping: it would not
    invert."""
    step = kernels.ddim_step if kernels.available(x) else ddim_step
    for i in range(len(ts) - 1):
        ab_t, ab_next = ab[ts[i]].item(), ab[ts[i + 1]].item()
        x = step(x, ddpm.guided(model, x, at(ts[i], x), y, w), None, ab_t, ab_next, 0.0, objective, False)
    return x


@torch.no_grad()
def dpm_solver_2m(model, x, ts, ab, objective, clip=True, y=None, w=1.0):
    """DPM-Solver++(2M), Lu et al. 2022 Alg. 2: multistep 2nd order in the data prediction x0_theta, stepping in
    lambda = log(alpha / sigma), alpha = sqrt(ab), sigma = sqrt(1 - ab). First order at the first and last step."""
    x0_prev = h_prev = None
    for i in reversed(range(len(ts))):
        ab_t = ab[ts[i]].item()
        x0 = ddpm.predict_x0(x, ddpm.guided(model, x, at(ts[i], x), y, w).float(), torch.tensor(ab_t,
                                                                                                 dtype=torch.float64),
                             objective)
        if clip:
            x0 = x0.clamp(-1, 1)
        if i == 0:  # to ab = 1, sigma = 0, lambda = inf: the update is x0 itself
            return x0.clamp(-1, 1)
        ab_s = ab[ts[i - 1]].item()
        h = 0.5 * math.log(ab_s / (1 - ab_s)) - 0.5 * math.log(ab_t / (1 - ab_t))  # lambda_s - lambda_t > 0
        if x0_prev is None or i == 1:  # first order at the first step, and into ts[0] ~ clean where h is large
            D = x0
        else:  # D = (1 + 1/(2r)) x0_t - 1/(2r) x0_prev, r = h_prev / h
            D = (1 + h / (2 * h_prev)) * x0 - h / (2 * h_prev) * x0_prev
        x = ((1 - ab_s) / (1 - ab_t)) ** 0.5 * x - ab_s ** 0.5 * math.expm1(-h) * D
        x0_prev, h_prev = x0, h


def sample(model, x, mcfg, cfg, y=None, generator=None):
    """x_T -> x_0 in [-1, 1] with cfg's sampler, steps, eta and spacing, for a model trained as mcfg (ddpm.Config: its
    T, schedule, objective; clip and guidance as sampled)."""
    ab = ddpm.make_alpha_bar(mcfg.schedule, mcfg.T)
    with torch.autocast('cuda', torch.bfloat16) if mcfg.bf16 and x.is_cuda else nullcontext():
        if cfg.sampler == 'ddpm':
            return ddpm.sample(model, x, ab, mcfg.objective, mcfg.var, mcfg.clip, y, mcfg.guidance, generator)
        ts = timesteps(mcfg.T, cfg.steps, cfg.spacing)
        if cfg.sampler == 'dpm++2m':
            return dpm_solver_2m(model, x, ts, ab, mcfg.objective, mcfg.clip, y, mcfg.guidance)
        x = ddim_sample(model, x, ts, ab, cfg.eta, mcfg.objective, mcfg.clip, y, mcfg.guidance, generator)
    return x.clamp(-1, 1)


def tag(cfg, T):  # what ran: the sampler, its steps and eta (ancestral: all T steps with eta 1, whatever --eta)
    return f'ddpm-S{T}-eta1' if cfg.sampler == 'ddpm' else f'{cfg.sampler}-S{cfg.steps}-eta{cfg.eta:g}'


def draw(model, mcfg, cfg, shape, start, n, generator):
    """Samples start .. start + n - 1 (common.sample_many's batches), uint8: x_T drawn first from generator, so every
    sampler starts from the same x_T."""
    x = torch.randn(n, *shape, device=next(model.parameters()).device, generator=generator)
    y = ddpm.labels(mcfg.class_cond, mcfg.label, start, n, x.device)
    return common.to_uint8(sample(model, x, mcfg, cfg, y, generator))


def slerp(z0, z1, a):  # spherical interpolation: Gaussian noises keep their norm ~ sqrt(d) along the path
    theta = torch.acos((z0 * z1).sum() / (z0.norm() * z1.norm()))
    return (torch.sin((1 - a) * theta) * z0 + torch.sin(a * theta) * z1) / torch.sin(theta)


# -----------------------------------------------------------------------------
# Operations on real images and noises: inversion, interpolation, SDEdit, inpainting


def real_images(cfg, mcfg, shape, n):
    """n images in [-1, 1]: --image, or the first n of the checkpoint's dataset test split."""
    if cfg.image:
        try:
            im = Image.open(cfg.image).convert('L' if shape[0] == 1 else 'RGB')
        except OSError as e:
            common.fail(f'--image {cfg.image}: cannot read it ({e})')
        if im.size != (shape[2], shape[1]):
            common.fail(f'--image {cfg.image} is {im.width}x{im.height}, but the model makes {shape[2]}x{shape[1]} '
                        f'images: resize or crop it first')
        x = torch.from_numpy(np.array(im)).reshape(shape[1], shape[2], shape[0]).permute(2, 0, 1)[None]
    else:
        x = common.load_dataset(mcfg.dataset, 'test', cfg.data_dir or None)[0][:n]
    return x.float() / 127.5 - 1


def invert(cfg, model, mcfg, x0, y, ab, ts, gen, out):
    xT = ddim_invert(model, x0, ts, ab, mcfg.objective, y, mcfg.guidance)
    rec = ddim_sample(model, xT, ts, ab, 0.0, mcfg.objective, False, y, mcfg.guidance).clamp(-1, 1)  # no x0 clip
    err = (rec - x0).pow(2).mean().sqrt().item() * 127.5
    common.save_grid(common.to_uint8(torch.cat([x0, (xT / 3).clamp(-1, 1), rec])), out / 'invert.png', nrow=len(x0))
    print(f'DDIM inversion, S = {cfg.steps}: x_T std {xT.std().item():.3f} | reconstruction RMSE {err:.2f} / 255 '
          f'-> {out}/invert.png (rows: input, x_T / 3, decoded)')


def interp(cfg, model, mcfg, x0, y, ab, ts, gen, out):
    """Decoded deterministically (--sampler dpm++2m, else DDIM at eta = 0): slerp between pairs of noises."""
    z = torch.randn(2 * len(x0), *x0.shape[1:], device=x0.device, generator=gen())
    x = torch.stack([slerp(z[2 * i], z[2 * i + 1], a) for i in range(len(x0)) for a in torch.linspace(0, 1, 10)])
    y = y.repeat_interleave(10) if y is not None else None
    x = (dpm_solver_2m(model, x, ts, ab, mcfg.objective, mcfg.clip, y, mcfg.guidance) if cfg.sampler == 'dpm++2m'
         else ddim_sample(model, x, ts, ab, 0.0, mcfg.objective, mcfg.clip, y, mcfg.guidance))
    common.save_grid(common.to_uint8(x), out / 'interp.png', nrow=10)
    print(f'{out}/interp.png: {len(x0)} rows of slerp(z0, z1, a), a = 0 .. 1')


def sdedit(cfg, model, mcfg, x0, y, ab, ts, gen, out):
    """SDEdit (Meng et al. 2022): noise to t0 with eq. (4), denoise with DDPM (all t0 steps) and DDIM (S steps)."""
    noise, cols, snaps = torch.randn(x0.shape, device=x0.device, generator=gen()), [x0], []
    for f in (0.25, 0.5, 0.75, 1.0):
        t0 = round(f * mcfg.T) - 1
        xt = ddpm.q_sample(x0, ab[t0].to(x0.device), noise).float()
        run = partial(ddim_sample, model, xt, objective=mcfg.objective, clip=mcfg.clip, y=y, w=mcfg.guidance)
        ddpm_x = run(list(range(t0 + 1)), ab, 1.0, generator=gen())  # eta = 1 through every step: Alg. 2
        ts0 = timesteps(t0 + 1, min(cfg.steps, t0 + 1), cfg.spacing)
        ddim_x = run(ts0, ab, cfg.eta, generator=gen(), snapshots=snaps if f == 0.5 else None)
        cols += [xt.clamp(-1, 1), ddpm_x, ddim_x]
    common.save_grid(common.to_uint8(torch.stack(cols, 1).flatten(0, 1)), out / 'sdedit.png', nrow=len(cols))
    snaps = torch.stack(snaps, 1)[:, torch.linspace(0, len(snaps) - 1, 6).round().long()]
    common.save_grid(common.to_uint8(snaps.flatten(0, 1).clamp(-1, 1)), out / 'sdedit_steps.png', nrow=6)
    print(f'{out}/sdedit.png: columns original, then (x_t0, DDPM, DDIM S={cfg.steps}) for t0 = T/4, T/2, 3T/4, T; '
          f'{out}/sdedit_steps.png: DDIM from t0 = T/2')


def inpaint(cfg, model, mcfg, x0, y, ab, ts, gen, out):
    """The replacement method (Song et al. 2021, ICLR, "Score-based generative modeling through SDEs", App. I.2): at
    every step the known pixels are set to q(x_prev | x_0). Chosen over RePaint's resampling because it costs no extra
    network evaluations; its known weakness is seams, which --sampler ddpm (all T steps, eta = 1) keeps smallest."""
    H, W = x0.shape[2:]
    keep = torch.ones(1, 1, H, W, dtype=torch.bool, device=x0.device)
    if cfg.mask == 'center':
        keep[..., H // 4: H - H // 4, W // 4: W - W // 4] = False
    else:
        keep[..., W // 2:] = False
    ts, eta = (list(range(mcfg.T)), 1.0) if cfg.sampler == 'ddpm' else (ts, cfg.eta)
    xT = torch.randn(x0.shape, device=x0.device, generator=gen())
    x = ddim_sample(model, xT, ts, ab, eta, mcfg.objective, mcfg.clip, y, mcfg.guidance, gen(), known=(x0, keep))
    common.save_grid(common.to_uint8(torch.cat([x0, torch.where(keep, x0, 0.0), x])), out / 'inpaint.png', nrow=len(x0))
    print(f'{out}/inpaint.png: rows original, masked ({cfg.mask}), inpainted ({tag(cfg, mcfg.T)})')


def load(cfg, device):
    """(model in eval mode on device, the checkpoint's ddpm.Config with this run's sampling settings, image shape,
    output folder)."""
    model, mcfg = ddpm.load_model(cfg.ckpt or Path(cfg.out) / 'ckpt.pt')
    out = Path(cfg.out or Path(cfg.ckpt).parent)
    if not 1 <= cfg.steps <= mcfg.T:
        common.fail(f'--steps {cfg.steps}: S must be between 1 and the checkpoint\'s T = {mcfg.T}')
    if not mcfg.class_cond and (cfg.label >= 0 or cfg.guidance != 1):
        common.fail('--label / --guidance: this checkpoint is unconditional (trained without --class-cond 1)')
    mcfg = replace(mcfg, clip=cfg.clip, guidance=cfg.guidance, label=cfg.label, bf16=cfg.bf16)
    return model.to(device).eval(), mcfg, common.image_shape(mcfg), out


def main(argv=None):
    cfg = common.parse_config(Config, argv=argv)
    common.check(cfg, dict(mode=('sample', 'invert', 'interp', 'sdedit', 'inpaint'), spacing=('uniform', 'quadratic'),
                           sampler=('ddim', 'dpm++2m', 'ddpm'), mask=('center', 'right')),
                 positive=('steps', 'n_samples', 'sample_batch'), nonnegative=('guidance',))
    if not 0 <= cfg.eta <= 1:  # eq. (16): eta > 1 asks for more noise than 1 - ab_prev leaves room for
        common.fail(f'--eta {cfg.eta} must be in [0, 1] (0: deterministic DDIM, 1: the DDPM posterior variance)')
    if not -1 <= cfg.label < ddpm.NUM_CLASSES:
        common.fail(f'--label {cfg.label}: a class 0..{ddpm.NUM_CLASSES - 1}, or -1 to cycle through them')
    if cfg.mode == 'inpaint' and cfg.sampler == 'dpm++2m':
        common.fail('--mode inpaint replaces the known pixels after every step, which a multistep solver cannot '
                    'absorb: use --sampler ddim or ddpm')
    if not (cfg.out or cfg.ckpt):
        common.fail('give --out (a ddpm.py run folder) or --ckpt')
    device, rank, world = common.setup(cfg.device)
    with common.script_guard():
        model, mcfg, shape, out = load(cfg, device)
        if rank == 0:
            common.claim(out)
        if cfg.mode == 'sample':
            name, ckpt = f'samples_{tag(cfg, mcfg.T)}', cfg.ckpt or out / 'ckpt.pt'
            x = common.sample_many(partial(draw, model, mcfg, cfg, shape), cfg.n_samples, cfg.sample_batch, cfg.seed,
                                   device, rank, world, keep=common.keep_dir(out, name, cfg, ckpt))
            return common.write_samples(x, out, name, cfg.save) if rank == 0 else None
        if rank == 0:  # the figures are small: rank 0 draws them
            n = min(cfg.n_samples, 8)
            x0 = real_images(cfg, mcfg, shape, n).to(device)
            y = ddpm.labels(mcfg.class_cond, mcfg.label, 0, len(x0), device)
            gen = lambda: torch.Generator(device).manual_seed(cfg.seed)  # the same x_T and noises for every variant
            ab, ts = ddpm.make_alpha_bar(mcfg.schedule, mcfg.T), timesteps(mcfg.T, cfg.steps, cfg.spacing)
            with torch.autocast('cuda', torch.bfloat16) if cfg.bf16 and 'cuda' in device else nullcontext():
                dict(invert=invert, interp=interp, sdedit=sdedit, inpaint=inpaint)[cfg.mode](cfg, model, mcfg, x0, y,
                                                                                              ab, ts, gen, out)


if __name__ == '__main__':
    main()
