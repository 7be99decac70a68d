"""DDIM (Song et al. 2021, arXiv:2010.02502) and DPM-Solver++(2M) (Lu et al. 2022, arXiv:2211.01095): fast samplers for
any ddpm.py checkpoint, no retraining. The trained eps/x0/v network fixes q(x_t | x_0); DDIM picks a non-Markovian
reverse process with the same marginals (eq. 12) that can skip steps, and is deterministic at eta = 0.

    python ddim.py --out runs/ddpm-cifar10 --steps 50                  # samples_ddim-S50-eta0.npz for eval_fid.py
    python ddim.py --out runs/ddpm-cifar10 --mode sweep                # one x_T, S in 1000,100,50,20,10: sweep.png
    torchrun --standalone --nproc_per_node=8 ddim.py --out runs/ddpm-cifar10 --mode fid --fid-samples 50000
    python ddim.py --out runs/ddpm-cifar10 --mode invert | interp | sdedit | inpaint
    python ddim.py --init-from google-ddpm-cifar10-32/ --mode sweep    # Ho et al.'s own weights (diffusers layout)
    python ddim.py --mode speedrun                                     # 300 s of ddpm.py on Fashion-MNIST, then FID-10k

Defaults: DDIM, eta 0, S = 50, uniform spacing t_i = round(i (T-1) / (S-1)), which hits t = T-1 and t = 0;
--spacing quadratic: t_i = i + round((T - S) (i / (S-1))^2), denser near t = 0 (Song et al. App. D.2 define both).
On the Gaussian test (tests/test_ddim.py) few-step samplers, DPM-Solver++ most of all, do better with quadratic.
Result (README "ddim.py"): FID-2k of the 8-minute CPU MNIST model at S = 10 / 20 / 50: DDIM eta 0 100.9 / 84.0 /
59.1, eta 1 25.5 / 16.2 / 14.8, DPM-Solver++(2M) 77.1 / 72.4 / 58.2 (uniform spacing), on 2 CPU cores.
"""
import dataclasses, json, math, shlex, time
from functools import partial
from contextlib import nullcontext
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from PIL import Image
from tqdm import tqdm

import common
import ddpm
import kernels


@dataclass
class Config:
    mode: str = 'sample'  # sample | sweep | fid | invert | interp | sdedit | inpaint | speedrun
    out: str = ''  # run folder of a ddpm.py checkpoint (reads ckpt.pt; results are written here)
    ckpt: str = ''  # checkpoint file, if not <out>/ckpt.pt
    init_from: str = ''  # a diffusers UNet2DModel folder (config.json + weights), e.g. google/ddpm-cifar10-32
    device: str = 'auto'  # auto | cuda | cpu | mps
    seed: int = 0
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
    grid_steps: str = '1000,100,50,20,10'  # sweep and fid: the S values
    fid_samples: int = 10000  # fid: samples per (sampler, S), scored with eval_fid.py against --fid-ref
    fid_ref: str = ''  # fid: reference, a dataset:split or a stats .npz (default: the checkpoint's dataset:train)
    image: str = ''  # invert / sdedit / inpaint: an image file of the model's size (default: the test split)
    data_dir: str = ''  # folder with the dataset archives (default $GENMODELS_DATA, else ./data)
    mask: str = 'center'  # inpaint: the unknown region, center (a square of half the side) | right (right half)
    bf16: bool = True  # bf16 autocast for the network on CUDA
    train: str = ''  # speedrun: ddpm.py flags added to (and overriding) the SPEEDRUN recipe, e.g. "--objective v"


# --mode speedrun (quality per GPU-minute): train ddpm.py with these flags, then score fid_samples samples drawn with
# the fast sampler below. README "Speedrun" gives the measurement behind each choice.
SPEEDRUN = ('--dataset fashion-mnist --time-budget 300 --steps 100000000 --batch-size 128 --lr 2e-4 --warmup 500 '
            '--ema 0.999 --compile 0 --sample-every 0 --ckpt-every 2000')
SPEEDRUN_SAMPLING = dict(out='runs/speedrun', sampler='ddim', eta=1.0, steps=50, sample_batch=1000)


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
    """One step of eq. (12): x_prev = sqrt(ab_prev) x0 + sqrt(1 - ab_prev - sigma^2) eps + sigma z. Scalars are python
    floats (ab_prev = 1 at the last step); kernels.ddim_step is the fused version of exactly this."""
    ab = torch.tensor(ab_t, dtype=torch.float64)
    x0 = ddpm.predict_x0(x, out.float(), ab, objective)
    if clip:
        x0 = x0.clamp(-1, 1)
    eps = ddpm.predict_eps(x, x0, ab)  # re-derived from the (clipped) x0, so the step stays on the x0 it points at
    x = ab_prev ** 0.5 * x0 + max(1 - ab_prev - sigma ** 2, 0.0) ** 0.5 * eps
    return x if z is None else x + sigma * z


def net(model, x, t, cfg, y):  # the network output at the integer timestep t, under bf16 autocast on CUDA
    with torch.autocast('cuda', torch.bfloat16) if cfg.bf16 and x.is_cuda else nullcontext():
        return ddpm.guided(model, x, torch.full((len(x),), t, device=x.device), y, cfg.guidance)


@torch.no_grad()
def ddim_sample(model, x, ts, ab, eta, cfg, y=None, generator=None, snapshots=None, known=None):
    """x = x_{ts[-1]} -> x_0 by eq. (12) through the timesteps ts. known = (x0, keep): inpainting by replacement."""
    step = kernels.ddim_step if kernels.available(x) else ddim_step
    for i in reversed(range(len(ts))):
        if snapshots is not None:
            snapshots.append(x.clone())
        ab_t, ab_prev = ab[ts[i]].item(), (ab[ts[i - 1]].item() if i > 0 else 1.0)
        sigma = ddim_sigma(ab_t, ab_prev, eta)  # 0 at the last step, where ab_prev = 1
        z = torch.randn(x.shape, device=x.device, generator=generator) if sigma > 0 else None
        x = step(x, net(model, x, ts[i], cfg, y), z, ab_t, ab_prev, sigma, cfg.objective, cfg.clip)
        if known is not None:  # the known pixels, noised afresh to this step's level with q(x_prev | x_0), eq. (4)
            x0, keep = known
            noise = torch.randn(x.shape, device=x.device, generator=generator)
            x = torch.where(keep, ddpm.q_sample(x0, torch.tensor(ab_prev, dtype=torch.float64), noise).float(), x)
    if snapshots is not None:
        snapshots.append(x.clone())
    return x.clamp(-1, 1)


@torch.no_grad()
def ddim_invert(model, x, ts, ab, cfg, y=None):
    """Deterministic encoding x_0 -> x_{ts[-1]}: eq. (12) at eta = 0 with t and t_prev swapped (Euler steps of the
    probability-flow ODE forwards in time). x_0 stands in for x_{ts[0]}, as ab[ts[0]] ~ 1. No clipping: it would not
    invert."""
    step = kernels.ddim_step if kernels.available(x) else ddim_step
    for i in range(len(ts) - 1):
        ab_t, ab_next = ab[ts[i]].item(), ab[ts[i + 1]].item()
        x = step(x, net(model, x, ts[i], cfg, y), None, ab_t, ab_next, 0.0, cfg.objective, False)
    return x


@torch.no_grad()
def dpm_solver_2m(model, x, ts, ab, cfg, y=None):
    """DPM-Solver++(2M), Lu et al. 2022 Alg. 2: multistep 2nd order in the data prediction x0_theta, stepping in
    lambda = log(alpha / sigma), alpha = sqrt(ab), sigma = sqrt(1 - ab). First order at the first and last step."""
    x0_prev = h_prev = None
    for i in reversed(range(len(ts))):
        ab_t = ab[ts[i]].item()
        out = net(model, x, ts[i], cfg, y).float()
        x0 = ddpm.predict_x0(x, out, torch.tensor(ab_t, dtype=torch.float64), cfg.objective)
        if cfg.clip:
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


def sample(model, n, shape, mcfg, y, generator, cfg):
    """n images in [-1, 1] from x_T ~ N(0, I) drawn first from generator (the same x_T for every sampler).
    mcfg: the checkpoint's ddpm.Config; cfg: this script's sampler settings."""
    if cfg.sampler == 'ddpm':
        return ddpm.sample(model, n, shape, mcfg, y, generator)
    x = torch.randn(n, *shape, device=next(model.parameters()).device, generator=generator)
    ts, ab = timesteps(mcfg.T, cfg.steps, cfg.spacing), ddpm.make_alpha_bar(mcfg.schedule, mcfg.T)
    if cfg.sampler == 'dpm++2m':
        return dpm_solver_2m(model, x, ts, ab, mcfg, y)
    return ddim_sample(model, x, ts, ab, cfg.eta, mcfg, y, generator)


def slerp(z0, z1, a):  # spherical interpolation: Gaussian noises keep their norm ~ sqrt(d) along the path
    theta = torch.acos((z0 * z1).sum() / (z0.norm() * z1.norm()))
    return (torch.sin((1 - a) * theta) * z0 + torch.sin(a * theta) * z1) / torch.sin(theta)


# -----------------------------------------------------------------------------
# Ho et al.'s released model, in diffusers' UNet2DModel layout (google/ddpm-cifar10-32), mapped onto ddpm.UNet


def from_diffusers(sd, levels, num_res_blocks):
    """diffusers UNet2DModel state dict -> ddpm.UNet state dict (same module order: resnet, then its attention)."""
    new = {}

    def put(ours, theirs, reshape=False):
        for p in ('weight', 'bias'):
            w = sd.pop(f'{theirs}.{p}')
            new[f'{ours}.{p}'] = w[..., None, None] if reshape and p == 'weight' else w  # Linear -> 1x1 conv

    def block(ours, theirs, attn=None):
        for a, b in (('norm1', 'norm1'), ('conv1', 'conv1'), ('temb', 'time_emb_proj'), ('norm2', 'norm2'),
                     ('conv2', 'conv2'), ('skip', 'conv_shortcut')):
            if f'{theirs}.{b}.weight' in sd:
                put(f'{ours}.{a}', f'{theirs}.{b}')
        if attn and f'{attn}.to_q.weight' in sd:  # our qkv is one 1x1 conv with 3C outputs: [q; k; v]
            put(f'{ours}.attn.norm', f'{attn}.group_norm')
            for p in ('weight', 'bias'):
                w = torch.cat([sd.pop(f'{attn}.to_{c}.{p}') for c in 'qkv'])
                new[f'{ours}.attn.qkv.{p}'] = w[..., None, None] if p == 'weight' else w
            put(f'{ours}.attn.proj', f'{attn}.to_out.0', reshape=True)

    put('conv_in', 'conv_in'), put('temb.0', 'time_embedding.linear_1'), put('temb.2', 'time_embedding.linear_2')
    for side, per in (('down', num_res_blocks), ('up', num_res_blocks + 1)):
        k = 0
        for i in range(levels):
            for j in range(per):
                block(f'{side}.{k}', f'{side}_blocks.{i}.resnets.{j}', f'{side}_blocks.{i}.attentions.{j}')
                k += 1
            if i < levels - 1:
                put(f'{side}.{k}.conv', f'{side}_blocks.{i}.{side}samplers.0.conv')
                k += 1
    block('mid.0', 'mid_block.resnets.0', 'mid_block.attentions.0'), block('mid.1', 'mid_block.resnets.1')
    put('norm_out', 'conv_norm_out'), put('conv_out', 'conv_out')
    if sd:
        common.fail(f'diffusers weights with no place in ddpm.UNet: {", ".join(list(sd)[:5])}')
    return new


def load_diffusers(folder):
    """(ddpm.UNet, ddpm.Config) from a folder with config.json + diffusion_pytorch_model.safetensors (or .bin)."""
    folder = Path(folder)
    if not (folder / 'config.json').exists():
        common.fail(f'--init-from {folder}: no config.json there (expected a diffusers UNet2DModel folder)')
    try:
        c = json.loads((folder / 'config.json').read_text())
        boc, downs, ch = c['block_out_channels'], c['down_block_types'], c['block_out_channels'][0]
        size, cin, _, _ = c['sample_size'], c['in_channels'], c['up_block_types'], c['layers_per_block']
    except (ValueError, KeyError, IndexError, TypeError) as e:
        common.fail(f'{folder}/config.json is not a diffusers UNet2DModel config ({type(e).__name__}: {e})')
    same = dict(flip_sin_to_cos=False, freq_shift=1, downsample_padding=0, norm_eps=1e-6, attention_head_dim=None,
                norm_num_groups=32, act_fn='silu', time_embedding_type='positional', class_embed_type=None,
                resnet_time_scale_shift='default', mid_block_scale_factor=1, out_channels=c['in_channels'])
    bad = [f'{k}={c[k]!r} (need {v!r})' for k, v in same.items() if k in c and c[k] != v]
    bad += [f'block_out_channels={boc} (ddpm.GroupNorm has 32 groups from 128 channels on)'] * (min(boc) < 128)
    ups = [d.replace('Down', 'Up') for d in reversed(downs)]
    if bad or set(downs) - {'DownBlock2D', 'AttnDownBlock2D'} or c['up_block_types'] != ups:
        common.fail(f'--init-from {folder}: not the DDPM U-Net layout ddpm.UNet implements: {", ".join(bad) or downs}')
    sched = folder / 'scheduler_config.json'
    s = json.loads(sched.read_text()) if sched.exists() else {}
    if (s.get('beta_schedule', 'linear'), s.get('beta_start', 1e-4), s.get('beta_end', 0.02)) != ('linear', 1e-4, 0.02):
        common.fail(f'{sched}: only the linear 1e-4 -> 0.02 schedule of Ho et al. is supported')
    dataset = next((k for k, v in common.DATASETS.items() if (v['channels'], v['size']) == (cin, size)), '')
    mcfg = ddpm.Config(dataset=dataset, image_size=size, ch=ch, ch_mult=','.join(str(b // ch) for b in boc),
                       num_res_blocks=c['layers_per_block'], dropout=0.0, T=s.get('num_train_timesteps', 1000),
                       attn_res=','.join(str(size >> i) for i, d in enumerate(downs) if d.startswith('Attn')),
                       var='large' if s.get('variance_type', 'fixed_large') == 'fixed_large' else 'small')
    st, pt = folder / 'diffusion_pytorch_model.safetensors', folder / 'diffusion_pytorch_model.bin'
    if st.exists():
        try:
            from safetensors.torch import load_file
        except ImportError:
            common.fail(f'{st} needs the safetensors package: pip install safetensors (or provide the .bin)')
        sd = load_file(st)
    elif pt.exists():
        try:
            sd = torch.load(pt, map_location='cpu', weights_only=True)
        except Exception as e:  # e.g. a pickle that would run code: refused by weights_only, with torch's reason
            common.fail(f'{pt} is not a plain weights file ({type(e).__name__}: {" ".join(str(e).split())[:600]})')
    else:
        common.fail(f'--init-from {folder}: no diffusion_pytorch_model.safetensors or .bin')
    model = ddpm.make_model(mcfg, cin, size)
    model.load_state_dict(from_diffusers(dict(sd), len(boc), mcfg.num_res_blocks))
    return model, mcfg


# -----------------------------------------------------------------------------
# Modes


def sweep_runs(cfg, T):  # (label, cfg) per (S, sampler); eta = 1 at S = T is ddpm.sample, DDPM's Alg. 2
    try:
        S = [int(s) for s in cfg.grid_steps.split(',')]
    except ValueError:
        common.fail(f'--grid-steps {cfg.grid_steps!r} must be comma-separated integers, e.g. 1000,100,50,20,10')
    check_steps(S, T)
    return [(f'{"ddpm" if s == T and e == 1 else sm}-S{s}-eta{e:g}', dataclasses.replace(
        cfg, sampler='ddpm' if s == T and e == 1 else sm, steps=s, eta=e)) for s in S
        for sm, e in (('ddim', 0.0), ('ddim', 1.0), ('dpm++2m', 0.0))]


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
        x = common.load_dataset(mcfg.dataset, 'test', cfg.data_dir or None, mcfg.image_size)[0][:n]
    return x.float() / 127.5 - 1


def run_mode(cfg, model, mcfg, shape, device, rank, world, out):
    ab, n = ddpm.make_alpha_bar(mcfg.schedule, mcfg.T), min(cfg.n_samples, 8)  # figures: at most 8 rows
    y = ddpm.sample_labels(mcfg, n, device)
    gen = lambda: torch.Generator(device).manual_seed(cfg.seed)  # the same x_T and noises for every variant
    ts = timesteps(mcfg.T, cfg.steps, cfg.spacing)
    tag = f'{cfg.sampler}-S{mcfg.T if cfg.sampler == "ddpm" else cfg.steps}-eta{cfg.eta:g}'
    if cfg.mode == 'sample':
        x = ddpm.sample_many(model, cfg.n_samples, shape, mcfg, rank, world, sampler=partial(sample, cfg=cfg))
        if rank != 0:
            return
        common.write_samples(x, out, f'samples_{tag}', cfg.save)
        print(f'{cfg.n_samples} samples ({tag}) -> {out}/samples_{tag}.npz, samples_{tag}/, samples_{tag}.png')
    elif cfg.mode == 'fid':
        import eval_fid  # only this mode needs the Inception network

        scorer = eval_fid.Scorer(cfg.fid_ref or f'{mcfg.dataset}:train', device) if rank == 0 else None  # loaded once
        rows = []
        for label, c in sweep_runs(cfg, mcfg.T):
            x = ddpm.sample_many(model, cfg.fid_samples, shape, mcfg, rank, world, label, partial(sample, cfg=c))
            if rank == 0:
                rows.append((label, scorer(x)))
                print(f'{label:24s} FID-{cfg.fid_samples} {rows[-1][1]:.2f}', flush=True)
        if rank == 0:
            (out / 'fid_steps.csv').write_text('run,fid\n' + ''.join(f'{r},{f:.4f}\n' for r, f in rows))
    elif rank != 0:
        return  # the figures are small: rank 0 draws them
    elif cfg.mode == 'sweep':  # rows: S; columns: n images for each of DDIM eta 0 | eta 1 | DPM-Solver++(2M)
        x = torch.cat([sample(model, n, shape, mcfg, y, gen(), c) for _, c in tqdm(sweep_runs(cfg, mcfg.T), 'sweep')])
        common.save_grid(common.to_uint8(x), out / 'sweep.png', nrow=3 * n)
        print(f'{out}/sweep.png: rows S = {cfg.grid_steps}; columns {n} x (DDIM eta 0 | eta 1 | DPM-Solver++(2M))')
    elif cfg.mode == 'interp':  # decoded deterministically: --sampler dpm++2m, else DDIM at eta = 0
        z = torch.randn(2 * n, *shape, device=device, generator=gen())
        x = torch.stack([slerp(z[2 * i], z[2 * i + 1], a) for i in range(n) for a in torch.linspace(0, 1, 10).tolist()])
        y = y.repeat_interleave(10) if y is not None else None
        if cfg.sampler == 'dpm++2m':
            x = dpm_solver_2m(model, x, ts, ab, mcfg, y)
        else:
            x = ddim_sample(model, x, ts, ab, 0.0, mcfg, y)
        common.save_grid(common.to_uint8(x), out / 'interp.png', nrow=10)
        print(f'{out}/interp.png: {n} rows of slerp(z0, z1, a), a = 0 .. 1')
    else:
        x0 = real_images(cfg, mcfg, shape, n).to(device)
        image_modes[cfg.mode](cfg, model, mcfg, x0, y[:len(x0)] if y is not None else None, ab, ts, gen, tag, out)


def speedrun(cfg, model, mcfg, shape, device, rank, world, out, tcfg, steps, clock):
    """Time cfg.fid_samples samples from the fast sampler, score them, and print the run's figures last."""
    import eval_fid

    sync = torch.cuda.synchronize if 'cuda' in device else lambda: None
    sync()
    t0 = time.perf_counter()
    x = ddpm.sample_many(model, cfg.fid_samples, shape, mcfg, rank, world, 'samples', partial(sample, cfg=cfg))
    sync()
    seconds = time.perf_counter() - t0
    if rank != 0:
        return
    ref = cfg.fid_ref or f'{mcfg.dataset}:train'
    score = eval_fid.Scorer(ref, device)(x)
    common.save_grid(x[:100], out / 'speedrun.png', nrow=10)
    print(f'grid: {out}/speedrun.png')
    print(f'budget {tcfg.time_budget:g} s | {steps} steps in {clock:.1f} s of training | '
          f'{steps * tcfg.batch_size / clock:.0f} img/s (batch {tcfg.batch_size}, {device})')
    print(f'sampling {cfg.fid_samples} images with {cfg.sampler}, S = {cfg.steps}, eta = {cfg.eta:g}: {seconds:.1f} s')
    print(f'FID-{cfg.fid_samples} against {ref} (pytorch-fid mode): {score:.2f}')


def invert(cfg, model, mcfg, x0, y, ab, ts, gen, tag, out):
    xT = ddim_invert(model, x0, ts, ab, mcfg, y)
    rec = ddim_sample(model, xT, ts, ab, 0.0, dataclasses.replace(mcfg, clip=False), y)  # unclipped, as the inversion
    err = (rec - x0).pow(2).mean().sqrt().item() * 127.5
    common.save_grid(common.to_uint8(torch.cat([x0, (xT / 3).clamp(-1, 1), rec])), out / 'invert.png', nrow=len(x0))
    print(f'DDIM inversion, S = {cfg.steps}: x_T std {xT.std().item():.3f} | reconstruction RMSE {err:.2f} / 255 '
          f'-> {out}/invert.png (rows: input, x_T / 3, decoded)')


def sdedit(cfg, model, mcfg, x0, y, ab, ts, gen, tag, out):
    """SDEdit (Meng et al. 2022): noise to t0 with eq. (4), denoise with DDPM (all t0 steps) and DDIM (S steps)."""
    noise, cols, snaps = torch.randn(x0.shape, device=x0.device, generator=gen()), [x0], []
    for f in (0.25, 0.5, 0.75, 1.0):
        t0 = round(f * mcfg.T) - 1
        xt = ddpm.q_sample(x0, ab[t0].to(x0.device), noise).float()
        ddpm_x = ddim_sample(model, xt, list(range(t0 + 1)), ab, 1.0, mcfg, y, gen())  # eta = 1, S = t0: Alg. 2
        ts0 = timesteps(t0 + 1, min(cfg.steps, t0 + 1), cfg.spacing)
        ddim_x = ddim_sample(model, xt, ts0, ab, cfg.eta, mcfg, y, gen(), snaps if f == 0.5 else None)
        cols += [xt.clamp(-1, 1), ddpm_x, ddim_x]
    common.save_grid(common.to_uint8(torch.stack(cols, 1).flatten(0, 1)), out / 'sdedit.png', nrow=len(cols))
    snaps = torch.stack(snaps, 1)[:, torch.linspace(0, len(snaps) - 1, 6).round().long()]
    common.save_grid(common.to_uint8(snaps.flatten(0, 1).clamp(-1, 1)), out / 'sdedit_steps.png', nrow=6)
    print(f'{out}/sdedit.png: columns original, then (x_t0, DDPM, DDIM S={cfg.steps}) for t0 = T/4, T/2, 3T/4, T; '
          f'{out}/sdedit_steps.png: DDIM from t0 = T/2')


def inpaint(cfg, model, mcfg, x0, y, ab, ts, gen, tag, out):
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
    x = ddim_sample(model, xT, ts, ab, eta, mcfg, y, gen(), known=(x0, keep))
    common.save_grid(common.to_uint8(torch.cat([x0, torch.where(keep, x0, 0.0), x])), out / 'inpaint.png', nrow=len(x0))
    print(f'{out}/inpaint.png: rows original, masked ({cfg.mask}), inpainted ({tag})')


image_modes = dict(invert=invert, sdedit=sdedit, inpaint=inpaint)


def train_for_budget(cfg):
    """speedrun: ddpm.py with SPEEDRUN + --train flags into --out; resumed if killed, skipped once the budget is spent.
    Returns (training Config, steps, seconds of training)."""
    argv = shlex.split(SPEEDRUN) + ['--out', cfg.out, '--device', cfg.device, '--seed', str(cfg.seed)]
    tcfg = common.parse_config(ddpm.Config, ddpm.presets, argv + shlex.split(cfg.train))
    path = Path(tcfg.out) / 'ckpt.pt'
    ckpt = common.load_ckpt(path, 'ddpm') if path.exists() else None
    if ckpt is not None:  # never score (or continue) a run trained with other settings under this variant's name
        changed = [k for k, v in dataclasses.asdict(tcfg).items()
                   if k not in ('out', 'device', 'data_dir', 'resume') and ckpt['config'].get(k) != v]
        if changed:
            common.fail(f'{path} was trained with other {", ".join(changed)} '
                        f'({", ".join(str(ckpt["config"].get(k)) for k in changed)}): give this variant its own --out')
    if ckpt is None or ckpt['step'] < tcfg.steps and ckpt['clock'] < tcfg.time_budget:
        ddpm.train(dataclasses.replace(tcfg, resume=ckpt is not None))
        ckpt = common.load_ckpt(path, 'ddpm')
    return tcfg, ckpt['step'], ckpt['clock']


def check_steps(S, T):
    for s in S:
        if not 1 <= s <= T:
            common.fail(f'--steps {s}: S must be between 1 and the checkpoint\'s T = {T}')


def main(argv=None):
    cfg = common.parse_config(Config, lambda v: SPEEDRUN_SAMPLING if v['mode'] == 'speedrun' else {}, argv)
    modes = ('sample', 'sweep', 'fid', 'invert', 'interp', 'sdedit', 'inpaint', 'speedrun')
    for k, allowed in dict(mode=modes, sampler=('ddim', 'dpm++2m', 'ddpm'), spacing=('uniform', 'quadratic'),
                           mask=('center', 'right')).items():
        if getattr(cfg, k) not in allowed:
            common.fail(f'--{k} {getattr(cfg, k)!r} is not one of: {", ".join(allowed)}')
    if not 0 <= cfg.eta <= 1:  # eq. (16): eta > 1 asks for more noise than 1 - ab_prev leaves room for
        common.fail(f'--eta {cfg.eta} must be in [0, 1] (0: deterministic DDIM, 1: the DDPM posterior variance)')
    common.check_ranges(cfg, positive=('steps', 'n_samples', 'sample_batch', 'fid_samples'), nonnegative=('guidance',))
    if not -1 <= cfg.label < ddpm.NUM_CLASSES:
        common.fail(f'--label {cfg.label}: a class 0..{ddpm.NUM_CLASSES - 1}, or -1 to cycle through them')
    if cfg.mode == 'inpaint' and cfg.sampler == 'dpm++2m':
        common.fail('--mode inpaint replaces the known pixels after every step, which a multistep solver cannot '
                    'absorb: use --sampler ddim or ddpm')
    if cfg.mode == 'speedrun' and (cfg.ckpt or cfg.init_from):
        common.fail('--mode speedrun trains its own model into --out: drop --ckpt / --init-from')
    if not (cfg.out or cfg.ckpt or cfg.init_from):
        common.fail('give --out (a ddpm.py run folder), --ckpt or --init-from')
    device, rank, world = common.setup(cfg.device)
    with common.script_guard():
        if cfg.mode == 'speedrun':
            trained = train_for_budget(cfg)
        if cfg.init_from:
            model, mcfg = load_diffusers(cfg.init_from)
            out = Path(cfg.out or f'runs/ddim-{Path(cfg.init_from).resolve().name}')
        else:
            model, mcfg = ddpm.load_model(cfg.ckpt or Path(cfg.out) / 'ckpt.pt')
            out = Path(cfg.out or Path(cfg.ckpt).parent)
        check_steps([cfg.steps], mcfg.T)
        if not mcfg.class_cond and (cfg.label >= 0 or cfg.guidance != 1):
            common.fail('--label / --guidance: this checkpoint is unconditional (trained without --class-cond 1)')
        mcfg = dataclasses.replace(mcfg, clip=cfg.clip, guidance=cfg.guidance, label=cfg.label, bf16=cfg.bf16,
                                   seed=cfg.seed, sample_batch=cfg.sample_batch)
        model = model.to(device).eval()
        size = common.DATASETS.get(mcfg.dataset, {}).get('size', mcfg.image_size)
        shape = (model.conv_in.in_channels, size, size)
        if rank == 0:
            common.claim(out)
        if cfg.mode == 'speedrun':
            speedrun(cfg, model, mcfg, shape, device, rank, world, out, *trained)
        else:
            run_mode(cfg, model, mcfg, shape, device, rank, world, out)


if __name__ == '__main__':
    main()
