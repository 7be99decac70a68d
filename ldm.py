"""Latent diffusion (Rombach et al. 2022, arXiv:2112.10752): stage 1 is vae.py's KL-regularised autoencoder
(28x28 -> 7x7x4 on MNIST); stage 2 trains ddpm.py's U-Net on its latents, scaled to unit variance, with
v-prediction (Salimans & Ho 2022, arXiv:2202.00512) and the cosine schedule. Samples are drawn in latent space
(DDPM or DDIM from the v output) and decoded; --cond class adds cross-attention to class-label context tokens.

    python ldm.py --dataset mnist                          # both stages (reuses runs/vae-ae-mnist if it is there)
    python ldm.py --dataset mnist --vae runs/vae-ae-mnist/ckpt.pt --cond class   # cross-attention, label dropout
    torchrun --standalone --nproc_per_node=8 ldm.py --dataset cifar10
    python ldm.py --mode sample --n-samples 10000 --sampler ddim --sample-steps 50   # samples.npz for eval_fid.py
    python ldm.py --mode sample --cond class --label 7 --guidance 3                 # (a --cond class run)
    python ldm.py --mode schedules | reimagine | bench     # exercises: T=10 noising, reimagining; FLOPs, ms/image

Measured on 2 CPU cores (torch 2.13.0+cpu): both stages in one command, 7 min 9 s (stage 1 183 s: autoencoder
1,500 steps, its evaluation, encoding; stage 2 4,000 steps 243 s); recognisable digits; FID-500 38.9 (DDIM 50
steps vs the first 500 MNIST test images; 500 real training images score 21.5); 11.4x faster sampling than pixel.
"""
import copy, dataclasses, hashlib, json, math, time
from contextlib import nullcontext
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn as nn
import torch.nn.functional as F
from tqdm import tqdm

import common
import ddim
import ddpm
import vae as vae_py


@dataclass
class Config:
    mode: str = 'train'  # train | sample | schedules | reimagine (these read --out/ckpt.pt) | bench
    dataset: str = 'mnist'  # mnist | fashion-mnist | cifar10 | cifar10-subset
    data_dir: str = ''  # folder with the official archives (default $GENMODELS_DATA, else ./data)
    out: str = ''  # run folder (default runs/ldm-<dataset>)
    device: str = 'auto'  # auto | cuda | cpu | mps
    seed: int = 0  # all training randomness is a function of (seed, rank, step); sampling noise of seed
    vae: str = ''  # vae.py --arch ae checkpoint (default runs/vae-ae-<dataset>/ckpt.pt; trained there if missing)
    vae_args: str = ''  # extra vae.py flags when stage 1 is trained here, e.g. "--steps 3000"
    cond: str = 'none'  # none | class (cross-attention to class tokens, label dropout for guidance)
    p_uncond: float = 0.1  # --cond class: label dropout probability
    # U-Net (ddpm.UNet) on the latents; padded to a multiple of 2^(levels-1), e.g. 7x7 -> 8x8
    ch: int = 64  # base channels
    ch_mult: str = '1,2'  # channel multiplier per resolution level
    num_res_blocks: int = 2  # residual blocks per level
    attn_res: str = '4'  # (padded) latent resolutions with self- and, for --cond class, cross-attention
    dropout: float = 0.1
    # diffusion
    T: int = 1000  # diffusion steps
    schedule: str = 'cosine'  # cosine (Nichol & Dhariwal) | linear (Ho et al.) | sigmoid
    objective: str = 'v'  # network output: v (Salimans & Ho) | eps
    # training
    steps: int = 30000  # optimizer steps
    batch_size: int = 128  # global batch, split evenly across ranks
    lr: float = 2e-4  # AdamW learning rate
    warmup: int = 1000  # linear learning-rate warm-up steps
    grad_clip: float = 1.0  # max global gradient norm
    ema: float = 0.999  # EMA decay of the weights used for sampling
    resume: bool = False  # continue from --out/ckpt.pt
    log_every: int = 100  # steps between log lines
    sample_every: int = 5000  # steps between decoded EMA sample grids (0: only at the end)
    ckpt_every: int = 2000  # steps between checkpoints (also at the end and on Ctrl-C / SIGTERM)
    fid_every: int = 0  # steps between FIDs of decoded EMA samples, and one at the end (0: off)
    fid_samples: int = 10000  # samples per FID (eval_fid.py, pytorch-fid mode)
    fid_ref: str = ''  # FID reference: dataset:split or stats .npz (default: the training set)
    # sampling
    sampler: str = 'ddim'  # ddim (eq. 12, eta 0) | ddpm (ancestral, Alg. 2; respaced when --sample-steps < T)
    sample_steps: int = 50  # network evaluations per sample
    clip_limit: float = 0  # clamp the predicted z0 to [-c, c] at every step (0: off; the sheet suggests 1-3)
    guidance: float = 1.0  # classifier-free guidance w (--cond class): 0 unconditional, 1 conditional, > 1 stronger
    label: int = -1  # --cond class: class to sample (-1: cycle through the classes)
    n_samples: int = 64  # --mode sample: number of decoded samples
    sample_batch: int = 500  # latents per sampling batch
    save: str = 'png,npz'  # --mode sample: png (a folder of PNGs) and/or npz (uint8 (N, H, W, C))
    loss, bf16 = 'mse', True  # not flags: ddpm.loss_fn's L_simple; bf16 autocast on CUDA


PRESETS = {  # below explicit flags; keyed by dataset, then 'cpu' on top on a CPU
    'cpu': dict(ch=32, num_res_blocks=1, dropout=0.0, steps=4000, lr=1e-3, warmup=200, ema=0.995, log_every=50,
                sample_every=0, ckpt_every=1000, sample_steps=50, fid_samples=1000),
}
MODEL_KEYS = ('dataset', 'cond', 'ch', 'ch_mult', 'num_res_blocks', 'attn_res', 'T', 'schedule', 'objective')
N_TOKENS = 4  # context tokens per class label


def presets(v):
    return dict(PRESETS.get(v['dataset'], {}), **PRESETS['cpu'] if common.resolve_device(v['device']) == 'cpu' else {})


# -----------------------------------------------------------------------------
# Maths: z0 and eps from the v output, and one reverse step in latent space
#   v   = sqrt(ab) eps - sqrt(1 - ab) z0                   (Salimans & Ho, sec. 4), with
#   z_t = sqrt(ab) z0  + sqrt(1 - ab) eps                  (eq. 4). The pair (z_t, v) is (z0, eps) rotated by the
#   angle phi, cos phi = sqrt(ab): [z_t; v] = R [z0; eps] with R orthonormal, so R^T inverts it:
#   z0  = sqrt(ab) z_t - sqrt(1 - ab) v,   eps = sqrt(1 - ab) z_t + sqrt(ab) v.


def z0_eps(z, out, ab, objective='v'):
    """(z0, eps) from the network output at alpha_bar ab (a float64 scalar tensor)."""
    z0 = ddpm.predict_x0(z, out, ab, objective)  # for v: sqrt(ab) z_t - sqrt(1 - ab) v
    return z0, ((1 - ab).sqrt() * z + ab.sqrt() * out if objective == 'v' else out)


def step(z, out, noise, ab_t, ab_prev, cfg):
    """z_t -> z_prev. ddpm: mean of q(z_prev | z_t, z0), eq. (6)-(7), plus its std times noise (Alg. 2 when
    prev = t - 1); ddim: eq. (12) at eta = 0. With --clip-limit c, z0 is clamped and eps re-derived from it."""
    ab = torch.tensor(ab_t, dtype=torch.float64)
    z0, eps = z0_eps(z, out.float(), ab, cfg.objective)
    if cfg.clip_limit:
        z0 = z0.clamp(-cfg.clip_limit, cfg.clip_limit)
        eps = ddpm.predict_eps(z, z0, ab)
    if cfg.sampler == 'ddim':
        return ab_prev ** 0.5 * z0 + (1 - ab_prev) ** 0.5 * eps
    mean, var = ddpm.q_posterior(z0, z, ab_t, ab_prev)
    return mean if noise is None else mean + var ** 0.5 * noise


@torch.no_grad()
def reverse(model, z, ts, cfg, y=None, generator=None, snapshots=None):
    """z = z_{ts[-1]} -> z_0 through the increasing timesteps ts; snapshots receives z before every step and z_0."""
    ab = ddpm.make_alpha_bar(cfg.schedule, cfg.T)
    amp = torch.autocast('cuda', torch.bfloat16) if cfg.bf16 and z.is_cuda else nullcontext()
    for i in reversed(range(len(ts))):
        if snapshots is not None:
            snapshots.append(z.clone())
        with amp:
            out = ddpm.guided(model, z, torch.full((len(z),), ts[i], device=z.device), y, cfg.guidance)
        ab_t, ab_prev = ab[ts[i]].item(), (ab[ts[i - 1]].item() if i > 0 else 1.0)
        noise = torch.randn(z.shape, device=z.device, generator=generator) if i > 0 else None
        z = step(z, out, noise, ab_t, ab_prev, cfg)
    if snapshots is not None:
        snapshots.append(z.clone())
    return z


# -----------------------------------------------------------------------------
# Model: ddpm.UNet on padded latents, with cross-attention to context tokens after its self-attention layers


class CrossAttention(nn.Module):
    """Queries from U-Net features (B, C, H, W), keys and values from a context sequence (B, L, D); residual."""

    def __init__(self, ch, dim):
        super().__init__()
        self.norm, self.q, self.kv = ddpm.GroupNorm(ch, silu=False), nn.Linear(ch, ch), nn.Linear(dim, 2 * ch)
        self.proj = nn.Linear(ch, ch)
        nn.init.zeros_(self.proj.weight)  # starts as the identity, like ddpm.UNet's blocks
        self.context = None  # (B, L, D), set by LatentUNet.forward before the U-Net runs

    def forward(self, h):
        B, C, H, W = h.shape
        q = self.q(self.norm(h).flatten(2).transpose(1, 2))  # (B, HW, C)
        k, v = self.kv(self.context).chunk(2, -1)  # 2 x (B, L, C)
        a = F.scaled_dot_product_attention(q, k, v)  # softmax(q k^T / sqrt(C)) v, (B, HW, C)
        return h + self.proj(a).transpose(1, 2).reshape(B, C, H, W)


class LatentUNet(nn.Module):
    def __init__(self, cfg, zshape):
        super().__init__()
        levels = len(cfg.ch_mult.split(','))
        self.size, m = zshape[1], 2 ** (levels - 1)
        self.pad = -self.size % m  # ddpm.Downsample pads then halves: 7 -> 4 -> 8 would not meet its skip (7)
        self.unet = ddpm.make_model(dataclasses.replace(ddpm.Config(), class_cond=False, **{
            k: getattr(cfg, k) for k in ('ch', 'ch_mult', 'num_res_blocks', 'attn_res', 'dropout')}),
            zshape[0], self.size + self.pad)
        self.xattn = []  # the CrossAttention blocks, registered inside the U-Net (a ModuleList would save them twice)
        if cfg.cond == 'class':  # label -> N_TOKENS context tokens; row NUM_CLASSES is the null label of guidance
            self.tokens = nn.Embedding(ddpm.NUM_CLASSES + 1, N_TOKENS * 4 * cfg.ch)
            for block in self.unet.modules():
                if isinstance(block, ddpm.ResBlock) and block.attn is not None:
                    self.xattn.append(CrossAttention(block.conv2.out_channels, 4 * cfg.ch))
                    block.attn = nn.Sequential(block.attn, self.xattn[-1])

    def forward(self, z, t, y=None):
        if self.xattn:
            y = torch.full_like(t, ddpm.NUM_CLASSES) if y is None else y
            context = self.tokens(y).view(len(y), N_TOKENS, -1)  # (B, L, D)
            for m in self.xattn:
                m.context = context
        out = self.unet(F.pad(z, (0, self.pad, 0, self.pad)), t)  # zero rows/columns at the bottom and right
        return out[:, :, :self.size, :self.size]


# -----------------------------------------------------------------------------
# Stage 1: the autoencoder, and the latents of the training set, cached once per autoencoder


def file_hash(path):
    return hashlib.sha256(Path(path).read_bytes()).hexdigest()[:16]


def autoencoder(cfg, device, world):
    """(model, path): --vae, trained with vae.py's defaults for --arch ae when the file does not exist."""
    path = Path(cfg.vae or f'runs/vae-ae-{cfg.dataset}/ckpt.pt')
    if not path.exists():
        common.print0(f'stage 1: no autoencoder at {path}: training one with vae.py --arch ae {cfg.vae_args}')
        argv = ['--dataset', cfg.dataset, '--arch', 'ae', '--device', cfg.device, '--out', str(path.parent)]
        vcfg = common.parse_config(vae_py.Config, vae_py.presets, argv + cfg.vae_args.split())
        vae_py.check(vcfg, world)
        vae_py.train(vcfg)
        if world > 1:
            torch.distributed.barrier()  # rank 0 has written the checkpoint
    model, vcfg = vae_py.load_autoencoder(path)
    if vcfg.arch != 'ae' or vcfg.dataset != cfg.dataset:
        common.fail(f'--vae {path}: a vae.py --arch {vcfg.arch} model of {vcfg.dataset}; ldm.py needs the spatial '
                    f'autoencoder (--arch ae) of {cfg.dataset}')
    return model.to(device).requires_grad_(False), path


@torch.no_grad()
def latents(model, path, cfg, device):
    """(z (N, c, h, w) float32, labels) of the training set: encoded once, cached under the checkpoint's hash."""
    cache = common.cache_dir() / f'ldm-latents-{cfg.dataset}-{file_hash(path)}.pt'
    if not cache.exists():
        x, y = common.load_dataset(cfg.dataset, 'train', cfg.data_dir or None)
        z = torch.cat([model.encode(xb.to(device).float() / 127.5 - 1).cpu()  # every rank: cheap, no waiting
                       for xb in tqdm(x.split(500), desc=f'encoding {len(x)} images')])
        common.atomic_write(cache, lambda f: torch.save(dict(z=z, y=y), f))
    try:
        d = torch.load(cache, map_location='cpu', weights_only=True)
    except Exception as e:
        raise common.DataError(f'{cache}: unreadable cached latents ({type(e).__name__}); delete it to encode again')
    return d['z'].to(device), d['y'].to(device)


def decode(model, z, scale, batch=500):
    return torch.cat([model.decode(zb / scale) for zb in z.split(batch)]).clamp(-1, 1)


def labels(cfg, n, device):
    return None if cfg.cond == 'none' else torch.full((n,), cfg.label, device=device) if cfg.label >= 0 else \
        torch.arange(n, device=device) % ddpm.NUM_CLASSES


def sample(model, ae, scale, n, zshape, cfg, generator, steps=None):
    """n decoded samples in [-1, 1]: z_T ~ N(0, I) from generator, the reverse process, decode(z_0 / scale)."""
    z = torch.randn(n, *zshape, device=next(model.parameters()).device, generator=generator)
    steps = steps or cfg.sample_steps
    z = reverse(model, z, ddim.timesteps(cfg.T, steps, 'uniform'), cfg, labels(cfg, n, z.device), generator)
    return decode(ae, z, scale)


# -----------------------------------------------------------------------------
# Stage 2: training


def check(cfg, world=1, model_known=True):  # model_known: T and cond are this run's (not a checkpoint's yet)
    choices = dict(mode=('train', 'sample', 'schedules', 'reimagine', 'bench'), cond=('none', 'class'),
                   schedule=('linear', 'cosine', 'sigmoid'), objective=('v', 'eps'), sampler=('ddim', 'ddpm'))
    for k, allowed in choices.items():
        if getattr(cfg, k) not in allowed:
            common.fail(f'--{k.replace("_", "-")} {getattr(cfg, k)!r} is not one of: {", ".join(allowed)}')
    if cfg.dataset not in common.DATASETS:
        common.fail(f'--dataset {cfg.dataset!r}: one of {", ".join(common.DATASETS)}')
    common.check_ranges(cfg, positive=('ch', 'num_res_blocks', 'steps', 'batch_size', 'lr', 'warmup', 'log_every',
                                       'ckpt_every', 'sample_steps', 'n_samples', 'sample_batch'),
                        nonnegative=('grad_clip', 'sample_every', 'fid_every', 'clip_limit', 'guidance'),
                        unit=('p_uncond', 'dropout', 'ema'))
    try:
        [int(m) for m in cfg.ch_mult.split(',')] + [int(r) for r in cfg.attn_res.split(',') if r]
    except ValueError:
        common.fail(f'--ch-mult {cfg.ch_mult!r} / --attn-res {cfg.attn_res!r} must be comma-separated integers')
    if cfg.T < 2 or cfg.ch % 4:
        common.fail(f'--T {cfg.T} must be >= 2 and --ch {cfg.ch} a multiple of 4')
    if model_known and cfg.sample_steps > cfg.T:
        common.fail(f'--sample-steps {cfg.sample_steps} must be at most T = {cfg.T}')
    unconditional = model_known and cfg.cond == 'none'
    if not -1 <= cfg.label < ddpm.NUM_CLASSES or (unconditional and (cfg.label >= 0 or cfg.guidance != 1)):
        common.fail(f'--label {cfg.label} / --guidance {cfg.guidance}: need --cond class and a class 0..9 (or -1)')
    if cfg.batch_size % world or (cfg.fid_every and cfg.fid_samples < 2):
        common.fail(f'--batch-size {cfg.batch_size} must divide by {world} processes; --fid-samples must be >= 2')


def train(cfg):
    device, rank, world = common.setup(cfg.device)
    check(cfg, world)
    out = Path(cfg.out)
    if rank == 0:
        common.claim(out)
    tic = time.perf_counter()
    ae, vae_path = autoencoder(cfg, device, world)
    z, y, vae_hash = *latents(ae, vae_path, cfg, device), file_hash(vae_path)
    stage1 = time.perf_counter() - tic  # autoencoder training (if it ran here) and encoding
    scale = 1 / z.std().item()  # SD's 0.18215 is this number for its KL-f8 autoencoder (README)
    z, zshape = z * scale, tuple(z.shape[1:])
    scorer = ddpm.fid_scorer(cfg, None, device) if cfg.fid_every and rank == 0 else None
    torch.manual_seed(cfg.seed)
    model = LatentUNet(cfg, zshape).to(device)
    ema = copy.deepcopy(model).requires_grad_(False).eval()
    opt = torch.optim.AdamW(model.parameters(), lr=cfg.lr, weight_decay=0.0)
    start = 0
    if cfg.resume:
        ckpt = common.load_ckpt(out / 'ckpt.pt', 'ldm')
        common.check_resume(ckpt, cfg, MODEL_KEYS)
        if ckpt['vae_hash'] != vae_hash:
            common.fail(f'--resume: {vae_path} is not the autoencoder this run was trained on ({ckpt["vae"]})')
        model.load_state_dict(ckpt['model'])
        ema.load_state_dict(ckpt['ema'])
        opt.load_state_dict(ckpt['opt'])
        start, scale = ckpt['step'], ckpt['scale']
    elif (out / 'ckpt.pt').exists():
        common.fail(f'{out}/ckpt.pt exists: pass --resume 1 to continue it, or another --out')
    common.print0(f'stage 1: {stage1:.0f} s | latents {tuple(z.shape)} of {vae_path} | scale factor 1/std = {scale:.5f}'
                  f'\nstage 2: U-Net {sum(p.numel() for p in model.parameters()) / 1e6:.2f}M on {device} x{world} | '
                  f'steps {start} -> {cfg.steps}')
    if rank == 0:
        (out / 'config.json').write_text(json.dumps(dataclasses.asdict(cfg), indent=1))
    ab = ddpm.make_alpha_bar(cfg.schedule, cfg.T).float().to(device)
    net = nn.parallel.DistributedDataParallel(model, [device] if 'cuda' in device else None) if world > 1 else model
    amp = torch.autocast('cuda', torch.bfloat16) if cfg.bf16 and 'cuda' in device else nullcontext()
    params, ema_params, lossf = list(model.parameters()), list(ema.parameters()), None

    def save(step):
        if rank == 0:
            common.save_ckpt(out / 'ckpt.pt', dict(script='ldm', model=model.state_dict(), ema=ema.state_dict(),
                                                   opt=opt.state_dict(), step=step, scale=scale, vae=str(vae_path),
                                                   vae_hash=vae_hash, config=dataclasses.asdict(cfg)))

    def outputs(step, fid):  # a grid from the same noise every time (grids compare across training); FID
        if rank != 0:
            return
        g, n = torch.Generator(device).manual_seed(cfg.seed), 100 if cfg.cond == 'class' else 64
        common.save_grid(common.to_uint8(sample(ema, ae, scale, n, zshape, cfg, g)), out / f'samples_{step:07d}.png',
                         nrow=10 if cfg.cond == 'class' else 8)
        if fid:
            x = torch.cat([sample(ema, ae, scale, len(b), zshape, cfg, g) for b in
                           tqdm(torch.arange(cfg.fid_samples).split(cfg.sample_batch), desc='FID samples')])
            score = scorer(common.to_uint8(x))
            common.print0(f'\nstep {step} | FID-{cfg.fid_samples} {score:.2f}')
            print(f'step {step} | fid{cfg.fid_samples} {score:.4f}', file=log, flush=True)

    with common.stop_requested() as stop, open(out / 'log.txt', 'a') if rank == 0 else nullcontext() as log:
        t0, last, tic, paused = time.perf_counter(), start, time.perf_counter(), 0.0
        for step in (pbar := tqdm(range(start, cfg.steps), initial=start, total=cfg.steps, disable=rank != 0)):
            torch.manual_seed((cfg.seed * 1000 + rank) * 10 ** 9 + step)  # batch, t, noise, dropout: exact on resume
            for group in opt.param_groups:
                group['lr'] = cfg.lr * min(1.0, (step + 1) / cfg.warmup)
            idx = torch.randint(len(z), (cfg.batch_size // world,), device=device)
            loss = ddpm.loss_fn(net, z[idx], y[idx] if cfg.cond == 'class' else None, ab, cfg, amp)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            nn.utils.clip_grad_norm_(params, cfg.grad_clip)
            opt.step()
            with torch.no_grad():  # EMA with a warm-up, as ddpm.py
                torch._foreach_lerp_(ema_params, params, 1 - min(cfg.ema, (1 + step) / (10 + step)))
            done = step + 1
            if world > 1 and done % cfg.log_every == 0:  # ranks agree on stopping, so none waits in a collective
                flag = torch.tensor(float(bool(stop)), device=device)
                torch.distributed.all_reduce(flag, torch.distributed.ReduceOp.MAX)
                stop[:] = [1] * bool(flag)
            halt, final = bool(stop) and (world == 1 or done % cfg.log_every == 0), done == cfg.steps
            do_ckpt = halt or final or done % cfg.ckpt_every == 0
            if done % cfg.log_every == 0 or do_ckpt:
                lossf, dt = loss.item(), time.perf_counter() - t0
                if not math.isfinite(lossf):
                    common.fail(f'loss is {lossf} at step {done}: lower --lr (the last good checkpoint is kept)')
                pbar.set_postfix(loss=f'{lossf:.4f}')
                if log and done > last:
                    print(f'step {done} | loss {lossf:.4f} | {1000 * dt / (done - last):.1f} ms/step | '
                          f'{(done - last) * cfg.batch_size / dt:.0f} img/s', file=log, flush=True)
                t0, last = time.perf_counter(), done
            if do_ckpt:
                save(done)
            if halt:
                common.print0(f'\nstopped at step {done}; checkpoint saved to {out}/ckpt.pt (continue with --resume 1)')
                raise SystemExit(130)
            pause = time.perf_counter()
            try:
                with stop.now():
                    fid = cfg.fid_every and (done % cfg.fid_every == 0 or final)
                    if fid or final or (cfg.sample_every and done % cfg.sample_every == 0):
                        outputs(done, fid)
            except KeyboardInterrupt:
                save(done)
                common.print0(f'\nstopped at step {done}; checkpoint saved to {out}/ckpt.pt (continue with --resume 1)')
                raise SystemExit(130) from None
            t0, paused = t0 + time.perf_counter() - pause, paused + time.perf_counter() - pause  # not counted
    if start >= cfg.steps:
        common.print0(f'{out}/ckpt.pt is already at step {start} (--steps {cfg.steps}): nothing to train')
    elif rank == 0:
        loss_curve(out)
        print(f'done: {cfg.steps - start} steps in {time.perf_counter() - tic - paused:.0f} s of stage-2 training (no '
              f'grids, FID) -> {out}/ckpt.pt, samples_{cfg.steps:07d}.png, loss.png')
    return model, lossf


def loss_curve(out):
    rows = [line.split(' | ') for line in open(out / 'log.txt') if '| loss' in line]
    plt = common.pyplot()
    fig, ax = plt.subplots(figsize=(6, 3.5))
    ax.plot([int(r[0].split()[1]) for r in rows], [float(r[1].split()[1]) for r in rows])
    ax.set(title='latent denoiser: training loss', xlabel='step', ylabel='MSE per latent element', yscale='log')
    fig.savefig(out / 'loss.png')
    plt.close(fig)


# -----------------------------------------------------------------------------
# Modes that read --out/ckpt.pt: samples, the exercise figures; and bench


def load(cfg):
    """(ema model, autoencoder, scale, zshape, cfg with the checkpoint's model settings) from --out/ckpt.pt."""
    device, _, world = common.setup(cfg.device)
    ckpt = common.load_ckpt(Path(cfg.out) / 'ckpt.pt', 'ldm')
    cfg = dataclasses.replace(cfg, **{k: ckpt['config'][k] for k in MODEL_KEYS})
    check(cfg)
    if world > 1 or not Path(ckpt['vae']).exists():
        common.fail(f'--mode {cfg.mode} runs in one process (not under torchrun), with the autoencoder the model was '
                    f'trained on: {ckpt["vae"]}' + ('' if Path(ckpt['vae']).exists() else ', which is missing'))
    ae, path = autoencoder(dataclasses.replace(cfg, vae=ckpt['vae']), device, 1)
    if file_hash(path) != ckpt['vae_hash']:
        common.fail(f'{path} changed since this model was trained on its latents (hash {ckpt["vae_hash"]})')
    model = LatentUNet(cfg, ae.zshape)
    model.load_state_dict(ckpt['ema'])
    return model.to(device).eval(), ae, ckpt['scale'], ae.zshape, cfg


def sample_mode(cfg):
    """--n-samples decoded samples (npz + PNGs + grid); samplers.png: 25 samples from one z_T by DDPM (T steps) and
    DDIM (10..100 steps); reverse.png: one DDPM chain, z_t decoded at ten t from T to 0."""
    model, ae, scale, zshape, cfg = load(cfg)
    out, device = Path(cfg.out), next(model.parameters()).device
    common.claim(out)
    x = [sample(model, ae, scale, min(cfg.sample_batch, cfg.n_samples - i), zshape, cfg,
                torch.Generator(device).manual_seed(cfg.seed * 1_000_003 + i))
         for i in tqdm(range(0, cfg.n_samples, cfg.sample_batch), desc='sampling')]
    common.write_samples(common.to_uint8(torch.cat(x)), out, 'samples', cfg.save)
    runs = [('ddpm', cfg.T)] + [('ddim', s) for s in (10, 20, 50, 100) if s <= cfg.T]
    plt = common.pyplot()
    fig, axes = plt.subplots(1, len(runs), figsize=(2.6 * len(runs), 3))
    for ax, (sampler, steps) in zip(axes, runs):
        g = torch.Generator(device).manual_seed(cfg.seed)
        x = sample(model, ae, scale, 25, zshape, dataclasses.replace(cfg, sampler=sampler), g, steps)
        ax.imshow(common.grid_image(common.to_uint8(x), 5), cmap='gray')
        ax.set(title=f'{sampler.upper()}, {steps} steps', xticks=[], yticks=[])
    fig.suptitle('the same 25 z_T, decoded after the reverse process in latent space')
    fig.savefig(out / 'samplers.png')
    snaps, g = [], torch.Generator(device).manual_seed(cfg.seed)
    z = torch.randn(1, *zshape, device=device, generator=g)
    reverse(model, z, list(range(cfg.T)), dataclasses.replace(cfg, sampler='ddpm'), labels(cfg, 1, device), g, snaps)
    keep = [round(i * cfg.T / 9) for i in range(10)]  # snapshot k holds z_{T-k}; the last is z_0
    common.save_grid(common.to_uint8(decode(ae, torch.cat([snaps[k] for k in keep]), scale)), out / 'reverse.png', 10)
    print(f'{cfg.n_samples} samples -> {out}/samples.npz, samples/, samples.png; samplers.png; reverse.png (z_t '
          f'decoded at t = {", ".join(str(cfg.T - k) for k in keep)})')


def test_latents(ae, scale, cfg, n):
    """The first n test images, their scaled latents, and for --cond class their labels (or n times --label)."""
    x, y = common.load_dataset(cfg.dataset, 'test', cfg.data_dir or None)
    x, y = x[:n].float().to(next(ae.parameters()).device) / 127.5 - 1, y[:n].to(x.device)
    y = None if cfg.cond == 'none' else y if cfg.label < 0 else torch.full_like(y, cfg.label)
    return x, ae.encode(x) * scale, y


@torch.no_grad()
def schedules(cfg):
    """Exercise: beta_t, alpha_bar_t (and SNR) at T = 10 by ddpm.py (schedules.csv/png), and one test latent noised
    to t = 1..10 by linear and by cosine (the same eps), decoded: schedules_T10.png."""
    model, ae, scale, zshape, cfg = load(cfg)
    ddpm.schedule_figures(ddpm.Config(T=10, out=cfg.out))
    x, z0, _ = test_latents(ae, scale, cfg, 1)
    eps = torch.randn(z0.shape, device=z0.device, generator=torch.Generator(z0.device).manual_seed(cfg.seed))
    rows = [torch.cat([x] + [decode(ae, ddpm.q_sample(z0, ab.float(), eps), scale)
                             for ab in ddpm.make_alpha_bar(name, 10)]) for name in ('linear', 'cosine')]
    common.save_grid(common.to_uint8(torch.cat(rows)), Path(cfg.out) / 'schedules_T10.png', 11)
    print(f'wrote {cfg.out}/schedules_T10.png (row 1 linear, row 2 cosine: the input, then z_t decoded, t = 1..10)')


@torch.no_grad()
def reimagine(cfg):
    """Exercise (bonus): noise test latents to t = T/4, T/2, 3T/4, T and denoise with DDPM (every step) and DDIM
    (10, 20, 50, 100 steps). Rows: image x level; columns: input, decoded z_t, DDPM, DDIM-10 .. DDIM-100."""
    model, ae, scale, zshape, cfg = load(cfg)
    out, device = Path(cfg.out), next(model.parameters()).device
    x, z0, y = test_latents(ae, scale, cfg, 4)
    ab, rows = ddpm.make_alpha_bar(cfg.schedule, cfg.T), []
    for t0 in [round(f * cfg.T) - 1 for f in (0.25, 0.5, 0.75, 1.0)]:
        g = torch.Generator(device).manual_seed(cfg.seed)
        zt = ddpm.q_sample(z0, ab[t0].float(), torch.randn(z0.shape, device=device, generator=g))
        cols = [x, decode(ae, zt, scale), decode(ae, reverse(model, zt, list(range(t0 + 1)),
                                                            dataclasses.replace(cfg, sampler='ddpm'), y, g), scale)]
        for S in (10, 20, 50, 100):
            ts = ddim.timesteps(t0 + 1, min(S, t0 + 1), 'uniform')  # S steps from t0 down to 0
            cols.append(decode(ae, reverse(model, zt, ts, dataclasses.replace(cfg, sampler='ddim'), y), scale))
        rows.append(torch.stack(cols, 1))  # (4, 7, C, H, W)
        if t0 == round(0.5 * cfg.T) - 1:  # the DDPM path from T/2 for the first image, decoded at 10 points
            snaps = []
            reverse(model, zt[:1], list(range(t0 + 1)), dataclasses.replace(cfg, sampler='ddpm'), y[:1] if
                    y is not None else None, torch.Generator(device).manual_seed(cfg.seed), snaps)
            keep = [round(i * (t0 + 1) / 9) for i in range(10)]
            common.save_grid(common.to_uint8(decode(ae, torch.cat([snaps[k] for k in keep]), scale)),
                             out / 'reimagine_path.png', 10)
    grid = torch.stack(rows, 1).flatten(0, 2)  # image-major: for each image, the four levels
    common.save_grid(common.to_uint8(grid), out / 'reimagine.png', 7)
    print(f'wrote {out}/reimagine.png (rows: 4 test images x t = T/4, T/2, 3T/4, T; columns: input, decoded z_t, '
          f'DDPM, DDIM 10/20/50/100 steps) and reimagine_path.png (DDPM from T/2, decoded at 10 points)')


def bench(cfg, steps=10):
    """Per training step: FLOPs (torch's counter, forward + backward) and ms; per sample: ms with --sample-steps."""
    from torch.utils.flop_counter import FlopCounterMode
    model, ae, scale, zshape, cfg = load(cfg)
    device = next(model.parameters()).device
    model.train().requires_grad_(True)
    opt = torch.optim.AdamW(model.parameters(), lr=cfg.lr)
    ab = ddpm.make_alpha_bar(cfg.schedule, cfg.T).float().to(device)
    z = torch.randn(cfg.batch_size, *zshape, device=device)
    y = labels(dataclasses.replace(cfg, label=-1), cfg.batch_size, device)
    with FlopCounterMode(display=False) as counter:
        ddpm.loss_fn(model, z, y, ab, cfg, nullcontext()).backward()
    sync = torch.cuda.synchronize if device.type == 'cuda' else (lambda: None)
    sync()
    t0 = time.perf_counter()
    for _ in range(steps):
        loss = ddpm.loss_fn(model, z, y, ab, cfg, nullcontext())
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
    sync()
    dt, t1 = (time.perf_counter() - t0) / steps, time.perf_counter()
    sample(model.eval(), ae, scale, cfg.sample_batch, zshape, cfg, torch.Generator(device).manual_seed(0))
    sync()
    per_image = (time.perf_counter() - t1) / cfg.sample_batch
    peak = f'{torch.cuda.max_memory_allocated() / 2 ** 30:.2f} GiB' if device.type == 'cuda' else 'n/a'
    print(f'{device} | torch {torch.__version__} | latents {zshape} | batch {cfg.batch_size} | '
          f'{counter.get_total_flops() / 1e9:.2f} GFLOP per training step | {1000 * dt:.1f} ms/step, '
          f'{cfg.batch_size / dt:.0f} img/s | peak memory {peak} | sampling {1000 * per_image:.2f} ms/image '
          f'({cfg.sampler}, {cfg.sample_steps} steps, batch {cfg.sample_batch}, decode included)')


def main(argv=None):
    cfg = common.parse_config(Config, presets, argv)
    cfg = dataclasses.replace(cfg, out=cfg.out or f'runs/ldm-{cfg.dataset}')
    check(cfg, model_known=cfg.mode == 'train')
    modes = dict(train=train, sample=sample_mode, schedules=schedules, reimagine=reimagine, bench=bench)
    with common.script_guard():
        return modes[cfg.mode](cfg)


if __name__ == '__main__':
    main()
