"""Latent diffusion (Rombach et al. 2022, arXiv:2112.10752): stage 1 is vae.py's KL-regularised autoencoder (28x28 ->
7x7x4 on MNIST); stage 2 trains ddpm.py's U-Net on its latents, scaled to unit variance, with v-prediction (Salimans &
Ho 2022, arXiv:2202.00512) and the cosine schedule, and samples them with ddim.py's sampler; --cond class adds
cross-attention to class-label context tokens.

    python ldm.py --dataset mnist                          # both stages (reuses runs/vae-ae-mnist if it is there)
    python ldm.py --dataset mnist --vae runs/vae-ae-mnist/ckpt.pt --cond class --out runs/ldm-mnist-class
    python ldm.py --mode sample --n-samples 10000 --sampler ddim --sample-steps 50   # samples.npz for eval_fid.py
    python ldm.py --mode sample --label 7 --guidance 3 --out runs/ldm-mnist-class    # classifier-free guidance
    python ldm.py --mode reimagine                         # test latents noised to T/4 .. T, denoised, decoded

Measured on 2 CPU cores: both stages in one command in 7-8 minutes (preset mnist-cpu); recognisable digits.
"""
import copy, dataclasses, hashlib, time
from contextlib import nullcontext
from dataclasses import dataclass
from functools import partial
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
    mode: str = 'train'  # train | sample | reimagine (the last two read --out/ckpt.pt)
    preset: str = ''  # named settings below the flags given (listed at the end of --help); '': from the device
    dataset: str = 'mnist'  # mnist | fashion-mnist | cifar10 | cifar10-subset
    data_dir: str = ''  # folder with the official archives (default $GENMODELS_DATA, else ./data)
    out: str = ''  # run folder (default runs/ldm-<dataset>)
    device: str = 'auto'  # auto | cuda | cpu | mps
    seed: int = 0  # all training randomness is a function of (seed, rank, step); sampling noise of seed
    vae: str = ''  # vae.py --arch ae checkpoint (default runs/vae-ae-<dataset>/ckpt.pt; trained or finished if not)
    vae_args: str = ''  # extra vae.py flags when stage 1 is trained here, e.g. "--steps 3000"
    cond: str = 'none'  # none | class (cross-attention to class tokens, label dropout for guidance)
    p_uncond: float = 0.1  # --cond class: label dropout probability
    # U-Net (ddpm.UNet) on the latents; padded to a multiple of 2^(levels-1), e.g. 7x7 -> 8x8
    ch: int = 64  # base channels
    ch_mult: str = '1,2'  # channel multiplier per resolution level
    num_res_blocks: int = 2  # residual blocks per level
    attn_res: str = '4'  # (padded) latent resolutions with self- and, for --cond class, cross-attention
    dropout: float = 0.1  # dropout in the residual blocks
    # diffusion
    T: int = 1000  # diffusion steps
    schedule: str = 'cosine'  # cosine (Nichol & Dhariwal) | linear (Ho et al.) | sigmoid
    objective: str = 'v'  # network output: v (Salimans & Ho) | eps | x0
    # training
    steps: int = 30000  # optimizer steps
    batch_size: int = 128  # global batch, split evenly across ranks
    lr: float = 2e-4  # AdamW learning rate
    warmup: int = 1000  # linear learning-rate warm-up steps
    grad_clip: float = 1.0  # max global gradient norm
    ema: float = 0.999  # EMA decay of the weights used for sampling
    bf16: bool = True  # bf16 autocast for the network on CUDA
    resume: bool = False  # continue from --out/ckpt.pt
    log_every: int = 100  # steps between log lines
    sample_every: int = 5000  # steps between decoded EMA sample grids (0: only at the end)
    ckpt_every: int = 2000  # steps between checkpoints (also at the end and on Ctrl-C / SIGTERM)
    fid_every: int = 0  # steps between FIDs of decoded EMA samples, and one at the end (0: off)
    fid_samples: int = 10000  # samples per FID (eval_fid.py, pytorch-fid mode)
    fid_ref: str = ''  # FID reference: train | test (of --dataset), a dataset:split or stats .npz (default: train)
    # sampling
    sampler: str = 'ddim'  # ddim (eq. 12, eta 0) | ddpm (ancestral, Alg. 2; respaced when --sample-steps < T)
    sample_steps: int = 50  # network evaluations per sample
    clip_limit: float = 0  # clamp the predicted z0 to [-c, c] at every step (0: off; the sheet suggests 1-3)
    guidance: float = 1.0  # classifier-free guidance w (--cond class): 0 unconditional, 1 conditional, > 1 stronger
    label: int = -1  # --cond class: class to sample (-1: cycle through the classes)
    n_samples: int = 64  # --mode sample: number of decoded samples
    sample_batch: int = 500  # latents per sampling batch
    save: str = 'png,npz'  # --mode sample: png (a folder of PNGs) and/or npz (uint8 (N, H, W, C))


CPU = dict(ch=32, num_res_blocks=1, dropout=0.0, steps=4000, lr=1e-3, warmup=200, ema=0.995, log_every=50,
           sample_every=0, ckpt_every=1000, fid_samples=1000)
PRESETS = {'mnist': {}, 'cifar10': {}, 'mnist-cpu': CPU, 'cifar10-cpu': CPU}  # the defaults for any data; on a CPU
MODEL_KEYS = ('dataset', 'cond', 'ch', 'ch_mult', 'num_res_blocks', 'attn_res', 'T', 'schedule', 'objective')
RECIPE_KEYS = ('seed', 'batch_size', 'lr', 'warmup', 'grad_clip', 'ema', 'dropout', 'p_uncond')
N_TOKENS = 4  # context tokens per class label

# -----------------------------------------------------------------------------
# v-prediction in latent space. With z_t = sqrt(ab) z0 + sqrt(1 - ab) eps (eq. 4) and v = sqrt(ab) eps - sqrt(1 - ab)
# z0 (Salimans & Ho, sec. 4), the pair (z_t, v) is (z0, eps) rotated by the angle phi, cos phi = sqrt(ab): [z_t; v] =
# R [z0; eps] with R orthonormal, so R^T inverts it: z0 = sqrt(ab) z_t - sqrt(1 - ab) v, eps = sqrt(1 - ab) z_t +
# sqrt(ab) v. ddpm.predict_x0 computes that z0 (and predict_eps the eps from it), which ddpm.loss_fn trains and
# ddim.py's DDIM and respaced-DDPM steps use: sampling in latent space is ddim.ddim_sample on the latents.


class LatentUNet(nn.Module):
    """ddpm.UNet on latents zero-padded to a multiple of 2^(levels - 1) (ddpm's Downsample pads then halves: 7 -> 4 ->
    8 would not meet its skip of 7); --cond class: each label becomes N_TOKENS context tokens for cross-attention."""

    def __init__(self, cfg, zshape):
        super().__init__()
        self.size = zshape[1]
        self.pad = -self.size % 2 ** (len(cfg.ch_mult.split(',')) - 1)
        dim = 4 * cfg.ch if cfg.cond == 'class' else 0
        self.unet = ddpm.make_model(cfg, zshape[0], self.size + self.pad, context_dim=dim)
        self.tokens = nn.Embedding(ddpm.NUM_CLASSES + 1, N_TOKENS * dim) if dim else None  # last row: the null label

    def forward(self, z, t, y=None):
        context = None
        if self.tokens is not None:
            y = torch.full_like(t, ddpm.NUM_CLASSES) if y is None else y
            context = self.tokens(y).view(len(y), N_TOKENS, -1)  # (B, L, D)
        out = self.unet(F.pad(z, (0, self.pad, 0, self.pad)), t, context=context)  # zero rows/columns bottom, right
        return out[:, :, :self.size, :self.size]


# -----------------------------------------------------------------------------
# Stage 1: the autoencoder, and the latents of the training set, cached once per autoencoder


def file_hash(path):
    return hashlib.sha256(Path(path).read_bytes()).hexdigest()[:16]


def autoencoder(cfg, device, world):
    """(model, path): --vae; trained with vae.py's defaults for --arch ae when the file does not exist, and finished
    (vae.py --resume 1) when it is a run that stopped before its last step."""
    path = Path(cfg.vae or f'runs/vae-ae-{cfg.dataset}/ckpt.pt')
    if path.name != 'ckpt.pt':
        common.fail(f'--vae {path}: vae.py writes its run folder\'s ckpt.pt; give <run folder>/ckpt.pt')
    ckpt = common.load_ckpt(path, 'vae') if path.exists() else None
    if ckpt is None or ckpt['step'] < ckpt.get('steps', 0):
        argv = ['--dataset', cfg.dataset, '--arch', 'ae', '--device', cfg.device, '--out', str(path.parent)]
        vcfg = common.parse_config(vae_py.Config, vae_py.PRESETS, vae_py.pick, argv + cfg.vae_args.split())
        if ckpt is not None:  # finish it with the flags it was started with
            known = {k: v for k, v in ckpt['config'].items() if k in vae_py.Config.__dataclass_fields__}
            vcfg = dataclasses.replace(vae_py.Config(**known), resume=True, device=cfg.device)
        common.print0(f'stage 1: {"finishing" if ckpt else "training"} the autoencoder {path} (vae.py --arch ae)')
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
    d = common.torch_load(cache, 'readable latent cache: delete it to encode again')
    return d['z'].to(device), d['y'].to(device)


def decode(ae, z, scale, batch=500):
    return torch.cat([ae.decode(zb / scale) for zb in z.split(batch)]).clamp(-1, 1)


@torch.no_grad()
def reverse(model, z, ts, cfg, sampler, y=None, generator=None, snapshots=None):
    """z_{ts[-1]} -> z_0 through the timesteps ts: DDIM (eta 0) or DDPM (eta 1: the posterior of each respaced step)."""
    ab = ddpm.make_alpha_bar(cfg.schedule, cfg.T)
    with torch.autocast('cuda', torch.bfloat16) if cfg.bf16 and z.is_cuda else nullcontext():
        return ddim.ddim_sample(model, z, ts, ab, 1.0 if sampler == 'ddpm' else 0.0, cfg.objective, cfg.clip_limit,
                                y, cfg.guidance, generator, snapshots)


def sample(model, ae, scale, zshape, cfg, start, n, generator, steps=None, sampler=None):
    """Decoded samples start .. start + n - 1, uint8: z_T ~ N(0, I) from generator, the reverse process, decode."""
    z = torch.randn(n, *zshape, device=next(model.parameters()).device, generator=generator)
    ts = ddim.timesteps(cfg.T, steps or cfg.sample_steps, 'uniform')
    y = ddpm.labels(cfg.cond == 'class', cfg.label, start, n, z.device)
    z = reverse(model, z, ts, cfg, sampler or cfg.sampler, y, generator)
    return common.to_uint8(decode(ae, z, scale))


# -----------------------------------------------------------------------------
# Stage 2: training


def check(cfg, world=1, model_known=True):  # model_known: T and cond are this run's (not a checkpoint's yet)
    common.check(cfg, dict(mode=('train', 'sample', 'reimagine'), cond=('none', 'class'), sampler=('ddim', 'ddpm'),
                           schedule=('linear', 'cosine', 'sigmoid'), objective=('v', 'eps', 'x0'),
                           dataset=tuple(common.DATASETS)),
                 positive=('ch', 'num_res_blocks', 'steps', 'batch_size', 'lr', 'warmup', 'log_every', 'ckpt_every',
                           'sample_steps', 'n_samples', 'sample_batch'),
                 nonnegative=('grad_clip', 'sample_every', 'fid_every', 'clip_limit', 'guidance'),
                 unit=('p_uncond', 'dropout', 'ema'))
    mult, attn = common.ints(cfg, 'ch_mult'), common.ints(cfg, 'attn_res')
    if min(mult) < 1 or cfg.T < 2 or cfg.ch % 4:
        common.fail(f'--ch-mult {cfg.ch_mult} needs multipliers >= 1, --T {cfg.T} >= 2, --ch {cfg.ch} a multiple of 4')
    size = common.DATASETS[cfg.dataset]['size'] // 4  # the f = 4 latents, padded as LatentUNet pads them
    sizes = [(size + -size % 2 ** (len(mult) - 1)) >> i for i in range(len(mult))]
    if bad := [r for r in attn if r not in sizes]:
        common.fail(f'--attn-res {bad[0]}: the U-Net\'s latent resolutions are {", ".join(map(str, sizes))}')
    if model_known and cfg.sample_steps > cfg.T:
        common.fail(f'--sample-steps {cfg.sample_steps} must be at most T = {cfg.T}')
    unconditional = model_known and cfg.cond == 'none'
    if not -1 <= cfg.label < ddpm.NUM_CLASSES or (unconditional and (cfg.label >= 0 or cfg.guidance != 1)):
        common.fail(f'--label {cfg.label} / --guidance {cfg.guidance}: need --cond class and a class 0..9 (or -1)')
    if cfg.batch_size % world or (cfg.fid_every and cfg.fid_samples < 2):
        common.fail(f'--batch-size {cfg.batch_size} must divide by {world} processes, --fid-samples be >= 2')


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
    zshape = tuple(z.shape[1:])
    if cfg.fid_every and rank == 0:
        import eval_fid  # only runs that ask for FID pay for the Inception network
        scorer = eval_fid.run_scorer(cfg.fid_ref, cfg.dataset, None, device)
    torch.manual_seed(cfg.seed)
    model = LatentUNet(cfg, zshape).to(device)
    ema = copy.deepcopy(model).requires_grad_(False).eval()
    opt = torch.optim.AdamW(model.parameters(), lr=cfg.lr, weight_decay=0.0)
    if ckpt := common.resume(out, 'ldm', cfg, MODEL_KEYS, RECIPE_KEYS):
        if ckpt['vae_hash'] != vae_hash:
            common.fail(f'--resume: {vae_path} is not the autoencoder this run was trained on ({ckpt["vae"]})')
        model.load_state_dict(ckpt['model']), ema.load_state_dict(ckpt['ema']), common.load_opt(opt, ckpt['opt'])
        scale = ckpt['scale']
    z = z * scale
    common.print0(f'stage 1: {stage1:.0f} s | latents {tuple(z.shape)} of {vae_path} | scale factor 1/std = {scale:.5f}'
                  f'\nstage 2: U-Net {sum(p.numel() for p in model.parameters()) / 1e6:.2f}M on {device} x{world} | '
                  f'steps {ckpt["step"] if ckpt else 0} -> {cfg.steps}')
    ab = ddpm.make_alpha_bar(cfg.schedule, cfg.T).float().to(device)
    net = nn.parallel.DistributedDataParallel(model, [device] if 'cuda' in device else None) if world > 1 else model
    amp = torch.autocast('cuda', torch.bfloat16) if cfg.bf16 and 'cuda' in device else nullcontext()
    params, ema_params = list(model.parameters()), list(ema.parameters())
    draw = partial(sample, ema, ae, scale, zshape, cfg)  # draw(start, n, generator): common.sample_many's batches

    def save(step, clock):  # the loop calls it every --ckpt-every steps, at the end, before outputs, on Ctrl-C
        common.save_ckpt(out / 'ckpt.pt', dict(script='ldm', model=model.state_dict(), ema=ema.state_dict(),
                                               opt=opt.state_dict(), step=step, clock=clock, scale=scale,
                                               vae=str(vae_path), vae_hash=vae_hash, config=dataclasses.asdict(cfg)))

    with common.Loop(cfg, out, save, ckpt['step'] if ckpt else 0, clock=ckpt['clock'] if ckpt else 0.0,
                     sample=cfg.sample_every, fid=cfg.fid_every) as loop:
        for step in loop:
            for group in opt.param_groups:
                group['lr'] = cfg.lr * min(1.0, (step + 1) / cfg.warmup)
            idx = torch.randint(len(z), (cfg.batch_size // world,), device=device)
            with amp:
                loss = ddpm.loss_fn(net, z[idx], y[idx] if cfg.cond == 'class' else None, ab, cfg.objective, 'mse',
                                    cfg.p_uncond)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            nn.utils.clip_grad_norm_(params, cfg.grad_clip)
            opt.step()
            with torch.no_grad():  # EMA with a warm-up, as ddpm.py
                torch._foreach_lerp_(ema_params, params, 1 - min(cfg.ema, (1 + step) / (10 + step)))
            loop.log(loss=loss)
            if loop.due('sample') and rank == 0:  # the same noise every time: grids compare across training
                n = 100 if cfg.cond == 'class' else 64
                grid = draw(0, n, torch.Generator(device).manual_seed(cfg.seed))
                common.save_grid(grid, out / f'samples_{loop.done:07d}.png', nrow=10 if cfg.cond == 'class' else 8)
            if cfg.fid_every and loop.due('fid') and rank == 0:
                x_fid = common.sample_many(draw, cfg.fid_samples, cfg.sample_batch, cfg.seed, device)
                loop.write(f'fid{cfg.fid_samples} {scorer(x_fid):.4f}')
    common.print0(f'stage 2: {loop.clock - (ckpt["clock"] if ckpt else 0.0):.0f} s of training (no grids, FID) -> '
                  f'{out}/ckpt.pt; loss curve: python exercises/curves.py {out}')
    return model, loop.last.get('loss')


# -----------------------------------------------------------------------------
# Modes that read --out/ckpt.pt: samples, reimagining


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
    common.claim(cfg.out)  # not into a folder that a training run is writing
    return model.to(device).eval(), ae, ckpt['scale'], ae.zshape, cfg


def sample_mode(cfg):
    """--n-samples decoded samples (npz + PNGs + grid); samplers.png: 25 samples from one z_T by DDPM (T steps) and
    DDIM (10..100 steps); reverse.png: one DDPM chain, z_t decoded at ten t from T to 0."""
    model, ae, scale, zshape, cfg = load(cfg)
    out, device = Path(cfg.out), next(model.parameters()).device
    draw = partial(sample, model, ae, scale, zshape, cfg)
    x = common.sample_many(draw, cfg.n_samples, cfg.sample_batch, cfg.seed, device)
    common.write_samples(x, out, 'samples', cfg.save)
    runs = [('ddpm', cfg.T)] + [('ddim', s) for s in (10, 20, 50, 100) if s <= cfg.T]
    grids = [draw(0, 25, torch.Generator(device).manual_seed(cfg.seed), n, s) for s, n in runs]  # the same z_T
    common.save_grid(torch.cat(grids), out / 'samplers.png', nrow=25)
    snaps, g, y = [], torch.Generator(device).manual_seed(cfg.seed), ddpm.labels(cfg.cond == 'class', cfg.label, 0, 1,
                                                                                  device)
    reverse(model, torch.randn(1, *zshape, device=device, generator=g), list(range(cfg.T)), cfg, 'ddpm', y, g, snaps)
    keep = [round(i * cfg.T / 9) for i in range(10)]  # snapshot k holds z_{T-k}; the last is z_0
    common.save_grid(common.to_uint8(decode(ae, torch.cat([snaps[k] for k in keep]), scale)), out / 'reverse.png', 10)
    print(f'samplers.png: rows {", ".join(f"{s} {n}" for s, n in runs)} steps from the same 25 z_T; reverse.png')


def test_images(cfg, n, device):
    """The first n test images in [-1, 1] and, for --cond class, their labels (or --label), both on device."""
    x, y = common.load_dataset(cfg.dataset, 'test', cfg.data_dir or None)
    y = None if cfg.cond == 'none' else y[:n] if cfg.label < 0 else torch.full((n,), cfg.label)
    return x[:n].to(device).float() / 127.5 - 1, y if y is None else y.to(device)


@torch.no_grad()
def reimagine(cfg):
    """Exercise: test latents noised to t = T/4 .. T, denoised by DDPM (every step) and DDIM (10 .. 100 steps)."""
    model, ae, scale, zshape, cfg = load(cfg)
    out, device = Path(cfg.out), next(model.parameters()).device
    x, y = test_images(cfg, 4, device)
    z0, ab, rows = ae.encode(x) * scale, ddpm.make_alpha_bar(cfg.schedule, cfg.T), []
    for t0 in [round(f * cfg.T) - 1 for f in (0.25, 0.5, 0.75, 1.0)]:
        g = torch.Generator(device).manual_seed(cfg.seed)
        zt = ddpm.q_sample(z0, ab[t0].float(), torch.randn(z0.shape, device=device, generator=g))
        snaps = [] if t0 == round(0.5 * cfg.T) - 1 else None  # the DDPM path from T/2, decoded at 10 points
        cols = [x, decode(ae, zt, scale), decode(ae, reverse(model, zt, list(range(t0 + 1)), cfg, 'ddpm', y, g, snaps),
                                                 scale)]
        cols += [decode(ae, reverse(model, zt, ddim.timesteps(t0 + 1, min(S, t0 + 1), 'uniform'), cfg, 'ddim', y),
                        scale) for S in (10, 20, 50, 100)]  # S steps from t0 down to 0
        rows.append(torch.stack(cols, 1))  # (4, 7, C, H, W)
        if snaps is not None:
            keep = [round(i * (t0 + 1) / 9) for i in range(10)]
            common.save_grid(common.to_uint8(decode(ae, torch.cat([snaps[k][:1] for k in keep]), scale)),
                             out / 'reimagine_path.png', 10)
    common.save_grid(common.to_uint8(torch.stack(rows, 1).flatten(0, 2)), out / 'reimagine.png', 7)  # image-major
    print(f'wrote {out}/reimagine.png (rows: 4 test images x t = T/4 .. T; columns: input, decoded z_t, DDPM, DDIM 10, '
          f'20, 50, 100 steps), reimagine_path.png (DDPM from T/2)')


def main(argv=None):
    cfg = common.parse_config(Config, PRESETS, argv=argv)
    cfg = dataclasses.replace(cfg, out=cfg.out or f'runs/ldm-{cfg.dataset}')
    check(cfg, model_known=cfg.mode == 'train')
    with common.script_guard():
        return dict(train=train, sample=sample_mode, reimagine=reimagine)[cfg.mode](cfg)


if __name__ == '__main__':
    main()
