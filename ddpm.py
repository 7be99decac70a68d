"""DDPM (Ho et al. 2020, arXiv:2006.11239): train eps_theta(x_t, t) to predict the noise added by q(x_t | x_0),
then sample by running the learned reverse chain (Algorithm 2) from pure noise.

    python ddpm.py --dataset cifar10                                   # the paper's CIFAR-10 model (35.7M params)
    torchrun --standalone --nproc_per_node=8 ddpm.py --dataset cifar10 # same, 8 GPUs (batch split across ranks)
    python ddpm.py --dataset mnist --device cpu                        # CPU quick start: digits in < 10 min
    python ddpm.py --mode sample --out runs/ddpm-cifar10 --n-samples 50000   # PNGs + samples.npz for eval_fid.py
    python ddpm.py --mode forward --dataset cifar10                    # forward-process grid, histograms, MSE
    python ddpm.py --mode schedules                                    # beta_t, alpha_bar_t, SNR(t) table + plot
    python ddpm.py --mode bench --dataset cifar10                      # training img/s, peak memory, MFU

Defaults follow the paper for cifar10 (and image folders); mnist/fashion-mnist use a smaller U-Net, and on a CPU
the model shrinks further (see PRESETS). Every flag given on the command line wins over a preset.
"""
import copy, csv, dataclasses, json, math, time
from contextlib import nullcontext
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F
from tqdm import tqdm

import common
import kernels


@dataclass
class Config:
    mode: str = 'train'  # train | sample (from the checkpoint in --out) | forward | schedules | bench
    dataset: str = 'cifar10'  # mnist | fashion-mnist | cifar10 | path of an image folder
    data_dir: str = ''  # folder with the official archives (default $GENMODELS_DATA, else ./data; fetched if missing)
    image_size: int = 32  # image folders only: shorter side resized to this, then centre-cropped
    out: str = ''  # run folder for checkpoint, grids and logs (default runs/ddpm-<dataset>)
    device: str = 'auto'  # auto | cuda | cpu | mps
    seed: int = 0  # all training randomness is a function of (seed, rank, step)
    # U-Net, Ho et al. App. B
    ch: int = 128  # base channels
    ch_mult: str = '1,2,2,2'  # channel multiplier per resolution level (one downsampling between levels)
    num_res_blocks: int = 2  # residual blocks per level
    attn_res: str = '16'  # resolutions (comma-separated) with self-attention
    dropout: float = 0.1
    class_cond: bool = False  # condition on class labels, with label dropout for classifier-free guidance
    p_uncond: float = 0.1  # label dropout probability when --class-cond 1
    # diffusion
    T: int = 1000  # number of diffusion steps
    schedule: str = 'linear'  # linear (1e-4 -> 0.02) | cosine (Nichol & Dhariwal) | sigmoid (Jabri et al.)
    objective: str = 'eps'  # what the network predicts: eps | x0 | v (Salimans & Ho)
    loss: str = 'mse'  # mse (L_simple) | l1
    # training
    steps: int = 800000  # optimizer steps
    time_budget: float = 0  # stop after this many seconds of training (not counting start-up, checkpoints, FID); 0: off
    batch_size: int = 128  # global batch, split evenly across ranks
    lr: float = 2e-4  # AdamW learning rate
    warmup: int = 5000  # linear learning-rate warm-up steps
    weight_decay: float = 0.0
    grad_clip: float = 1.0  # max global gradient norm
    ema: float = 0.9999  # EMA decay of the weights used for sampling
    flip: bool = True  # random horizontal flips
    bf16: bool = True  # bf16 autocast for the network on CUDA
    compile: bool = True  # torch.compile the network (CUDA only)
    resume: bool = False  # continue from --out/ckpt.pt
    log_every: int = 100  # steps between log lines
    sample_every: int = 10000  # steps between EMA sample grids (0: only at the end)
    ckpt_every: int = 5000  # steps between checkpoints (also written at the end and on Ctrl-C / SIGTERM)
    fid_every: int = 0  # steps between FID evaluations of EMA samples, and one at the end (0: off)
    fid_samples: int = 10000  # samples per FID evaluation (eval_fid.py, pytorch-fid mode)
    fid_ref: str = ''  # FID reference: dataset:split or stats .npz (default: the training set; folders: its images)
    # sampling
    var: str = 'small'  # reverse-process variance: small (beta tilde, posterior) | large (beta)
    clip: bool = True  # clip the predicted x0 to [-1, 1] at every step
    guidance: float = 1.0  # classifier-free guidance w: 0 unconditional, 1 conditional, > 1 stronger
    label: int = -1  # class to sample with --class-cond models (-1: cycle through the classes)
    n_samples: int = 64  # --mode sample: number of images
    sample_batch: int = 256  # images per sampling batch
    save: str = 'png,npz'  # --mode sample: png (a folder of PNGs) and/or npz (uint8 (N, H, W, C))


PRESETS = {  # applied below explicit flags; keyed by dataset, then 'cpu' on top when running on a CPU
    'cifar10': {},
    'mnist': dict(ch=64, ch_mult='1,2,2', attn_res='14', ema=0.999, flip=False, steps=20000, warmup=1000),
    'cpu': dict(ch=32, ch_mult='1,2,2', num_res_blocks=1, attn_res='', dropout=0.0, batch_size=64, lr=1e-3, warmup=100,
                ema=0.995, steps=1500, log_every=50, sample_every=0, ckpt_every=500, compile=False),
}
PRESETS['fashion-mnist'] = PRESETS['mnist']
MODEL_KEYS = ('dataset', 'image_size', 'ch', 'ch_mult', 'num_res_blocks', 'attn_res', 'class_cond', 'T', 'schedule',
              'objective')


def presets(values):
    p = dict(PRESETS.get(values['dataset'], {}))
    if common.resolve_device(values['device']) == 'cpu':
        p.update(PRESETS['cpu'])
    return p


# -----------------------------------------------------------------------------
# Noise schedules, built in float64: beta_t for t = 0..T-1 (the paper's t = 1..T)


def make_beta(schedule, T):
    t = torch.arange(T + 1, dtype=torch.float64) / T
    if schedule == 'linear':  # Ho et al. sec. 4
        return torch.linspace(1e-4, 0.02, T, dtype=torch.float64)
    if schedule == 'cosine':  # Nichol & Dhariwal eq. 17, s = 0.008
        f = torch.cos((t + 0.008) / 1.008 * math.pi / 2) ** 2
    elif schedule == 'sigmoid':  # Jabri et al. 2022 (RIN): alpha_bar follows a sigmoid, start -3, end 3, tau 1
        s0, s1 = torch.sigmoid(torch.tensor([-3.0, 3.0], dtype=torch.float64))
        f = (s1 - torch.sigmoid(t * 6 - 3)) / (s1 - s0)
    else:
        common.fail(f'unknown --schedule {schedule!r}: use linear, cosine or sigmoid')
    return (1 - f[1:] / f[:-1]).clamp(max=0.999)  # beta_t = 1 - alpha_bar_t / alpha_bar_{t-1}, clipped as in the paper


def make_alpha_bar(schedule, T):
    return torch.cumprod(1 - make_beta(schedule, T), 0)  # float64 (T,)


# -----------------------------------------------------------------------------
# Forward process q(x_t | x_0), eq. (4), and the three parameterisations of the network output


def q_sample(x0, ab, eps):  # x_t = sqrt(ab_t) x_0 + sqrt(1 - ab_t) eps; ab broadcastable to x0
    return ab.sqrt() * x0 + (1 - ab).sqrt() * eps


def predict_x0(xt, out, ab, objective):
    if objective == 'eps':  # invert eq. (4)
        return (xt - (1 - ab).sqrt() * out) / ab.sqrt()
    if objective == 'v':  # v = sqrt(ab) eps - sqrt(1 - ab) x0 (Salimans & Ho, sec. 4)
        return ab.sqrt() * xt - (1 - ab).sqrt() * out
    return out


def predict_eps(xt, x0, ab):
    return (xt - ab.sqrt() * x0) / (1 - ab).sqrt()


def q_posterior(x0, xt, ab_t, ab_prev):
    """Mean and variance of q(x_{t-1} | x_t, x_0), eq. (6)-(7)."""
    alpha_t = ab_t / ab_prev
    beta_t = 1 - alpha_t
    mean = ab_prev ** 0.5 * beta_t / (1 - ab_t) * x0 + alpha_t ** 0.5 * (1 - ab_prev) / (1 - ab_t) * xt
    return mean, (1 - ab_prev) / (1 - ab_t) * beta_t


def ddpm_step(x, out, z, ab_t, ab_prev, sigma, objective, clip):
    """One step of Algorithm 2 at a shared t: x_{t-1} = mu~(x_t, x0_hat) + sigma z. Scalars are python floats;
    kernels.ddpm_step is the fused version of exactly this."""
    ab = torch.tensor(ab_t, dtype=torch.float64)
    x0 = predict_x0(x, out.float(), ab, objective)
    if clip:
        x0 = x0.clamp(-1, 1)
    mean, _ = q_posterior(x0, x, ab_t, ab_prev)
    return mean if z is None else mean + sigma * z


def loss_fn(net, x0, y, ab, cfg, amp):
    """L_simple (eq. 14) generalised to the eps / x0 / v targets."""
    B = x0.shape[0]
    t = torch.randint(0, cfg.T, (B,), device=x0.device)
    eps = torch.randn_like(x0)
    abt = ab[t].view(B, 1, 1, 1)
    xt = q_sample(x0, abt, eps)
    if y is not None:  # label dropout: the "null" class index num_classes trains the unconditional model too
        y = torch.where(torch.rand(B, device=y.device) < cfg.p_uncond, torch.full_like(y, NUM_CLASSES), y)
    with amp:
        out = net(xt, t, y)
    target = {'eps': eps, 'x0': x0, 'v': abt.sqrt() * eps - (1 - abt).sqrt() * x0}[cfg.objective]
    err = out.float() - target
    return err.abs().mean() if cfg.loss == 'l1' else err.pow(2).mean()


NUM_CLASSES = 10  # every labelled dataset here has ten classes; index 10 is the null label of guidance


# -----------------------------------------------------------------------------
# U-Net eps_theta(x_t, t), Ho et al. App. B (the PixelCNN++ backbone with GroupNorm and self-attention at 16x16)


class GroupNorm(nn.GroupNorm):
    """GroupNorm, with the SiLU that follows it fused in (through kernels: Triton on CUDA, PyTorch elsewhere)."""

    def __init__(self, ch, silu=True):
        super().__init__(min(32, ch // 4), ch, eps=1e-6)  # the paper's 32 groups; fewer for the small CPU models
        self.silu = silu

    def forward(self, x):
        return kernels.group_norm_silu(x, self.weight, self.bias, self.num_groups, self.eps, self.silu)


class ResBlock(nn.Module):
    def __init__(self, cin, cout, tdim, dropout, attn):
        super().__init__()
        self.norm1, self.conv1 = GroupNorm(cin), nn.Conv2d(cin, cout, 3, padding=1)
        self.temb = nn.Linear(tdim, cout)
        self.norm2, self.dropout, self.conv2 = GroupNorm(cout), nn.Dropout(dropout), nn.Conv2d(cout, cout, 3, padding=1)
        self.skip = nn.Conv2d(cin, cout, 1) if cin != cout else nn.Identity()
        self.attn = Attention(cout) if attn else None

    def forward(self, x, temb):
        h = self.conv1(self.norm1(x))  # (B, cout, H, W)
        h = h + self.temb(F.silu(temb))[:, :, None, None]
        h = self.skip(x) + self.conv2(self.dropout(self.norm2(h)))
        return self.attn(h) if self.attn is not None else h


class Attention(nn.Module):
    """Single-head self-attention over the H*W positions, with a residual connection."""

    def __init__(self, ch):
        super().__init__()
        self.norm, self.qkv, self.proj = GroupNorm(ch, silu=False), nn.Conv2d(ch, 3 * ch, 1), nn.Conv2d(ch, ch, 1)

    def forward(self, x):
        B, C, H, W = x.shape
        q, k, v = self.qkv(self.norm(x)).reshape(B, 3, 1, C, H * W).transpose(-1, -2).unbind(1)  # 3 x (B, 1, HW, C)
        h = kernels.attention(q, k, v)  # (B, 1, HW, C)
        return x + self.proj(h.transpose(-1, -2).reshape(B, C, H, W))


class Downsample(nn.Module):
    def __init__(self, ch):
        super().__init__()
        self.conv = nn.Conv2d(ch, ch, 3, stride=2)

    def forward(self, x, temb):
        return self.conv(F.pad(x, (0, 1, 0, 1)))  # TensorFlow's 'SAME' padding for a stride-2 conv, as in the paper


class Upsample(nn.Module):
    def __init__(self, ch):
        super().__init__()
        self.conv = nn.Conv2d(ch, ch, 3, padding=1)

    def forward(self, x, temb):
        return self.conv(F.interpolate(x, scale_factor=2.0, mode='nearest'))


def timestep_embedding(t, dim):
    """Transformer sinusoidal embedding of the (float) timestep, [sin, cos] halves as in the paper's code."""
    freqs = torch.exp(-math.log(10000) * torch.arange(dim // 2, device=t.device) / (dim // 2 - 1))
    args = t.float()[:, None] * freqs[None]
    return torch.cat([args.sin(), args.cos()], 1)  # (B, dim)


class UNet(nn.Module):
    def __init__(self, in_ch=3, ch=128, ch_mult=(1, 2, 2, 2), num_res_blocks=2, attn_res=(16,), dropout=0.1,
                 resolution=32, num_classes=0):
        super().__init__()
        self.ch, tdim = ch, 4 * ch
        self.temb = nn.Sequential(nn.Linear(ch, tdim), nn.SiLU(), nn.Linear(tdim, tdim))
        self.label_emb = nn.Embedding(num_classes + 1, tdim) if num_classes else None  # last row: "no label"
        self.conv_in = nn.Conv2d(in_ch, ch, 3, padding=1)
        self.down, chans, c, res = nn.ModuleList(), [ch], ch, resolution
        for i, m in enumerate(ch_mult):
            for _ in range(num_res_blocks):
                self.down.append(ResBlock(c, ch * m, tdim, dropout, res in attn_res))
                c = ch * m
                chans.append(c)
            if i < len(ch_mult) - 1:
                self.down.append(Downsample(c))
                chans.append(c)
                res //= 2
        self.mid = nn.ModuleList([ResBlock(c, c, tdim, dropout, True), ResBlock(c, c, tdim, dropout, False)])
        self.up = nn.ModuleList()
        for i, m in reversed(list(enumerate(ch_mult))):
            for _ in range(num_res_blocks + 1):  # one more block per level, to consume the downsampler's skip too
                self.up.append(ResBlock(c + chans.pop(), ch * m, tdim, dropout, res in attn_res))
                c = ch * m
            if i > 0:
                self.up.append(Upsample(c))
                res *= 2
        self.norm_out, self.conv_out = GroupNorm(c), nn.Conv2d(c, in_ch, 3, padding=1)
        for mod in self.modules():  # the paper's init: Xavier-uniform weights, zero biases ...
            if isinstance(mod, (nn.Conv2d, nn.Linear)):
                nn.init.xavier_uniform_(mod.weight)
                nn.init.zeros_(mod.bias)
        for mod in self.modules():  # ... and layers that end a residual branch start at zero: blocks start as identity
            if isinstance(mod, ResBlock):
                nn.init.zeros_(mod.conv2.weight)
            if isinstance(mod, Attention):
                nn.init.zeros_(mod.proj.weight)
        nn.init.zeros_(self.conv_out.weight)

    def forward(self, x, t, y=None):
        temb = self.temb(timestep_embedding(t, self.ch))  # (B, 4ch)
        if self.label_emb is not None:
            temb = temb + self.label_emb(y if y is not None else torch.full_like(t, self.label_emb.num_embeddings - 1))
        hs = [self.conv_in(x)]
        for block in self.down:
            hs.append(block(hs[-1], temb))
        h = hs[-1]
        for block in self.mid:
            h = block(h, temb)
        for block in self.up:
            h = block(h, temb) if isinstance(block, Upsample) else block(torch.cat([h, hs.pop()], 1), temb)
        return self.conv_out(self.norm_out(h))


def load_model(path):
    """The EMA U-Net of a ddpm.py checkpoint (eval mode, CPU) and the Config it was trained with."""
    ckpt = common.load_ckpt(path, 'ddpm')
    if not isinstance(ckpt.get('ema'), dict) or not isinstance(ckpt.get('config'), dict):
        common.fail(f'{path} has no EMA weights or config: not a complete ddpm.py checkpoint')
    cfg = Config(**{k: v for k, v in ckpt['config'].items() if k in Config.__dataclass_fields__})
    model = make_model(cfg, *common.image_shape(cfg)[:2])
    try:
        model.load_state_dict(ckpt['ema'])
    except RuntimeError as e:
        common.fail(f'{path}: its weights do not fit the U-Net its config describes ({str(e).splitlines()[0]}...)')
    return model.eval(), cfg


def make_model(cfg, in_ch, resolution):
    ch_mult = tuple(int(m) for m in cfg.ch_mult.split(','))
    attn_res = tuple(int(r) for r in cfg.attn_res.split(',') if r)
    return UNet(in_ch, cfg.ch, ch_mult, cfg.num_res_blocks, attn_res, cfg.dropout, resolution,
                NUM_CLASSES if cfg.class_cond else 0)


# -----------------------------------------------------------------------------
# Sampling, Algorithm 2, with classifier-free guidance (Ho & Salimans 2021)


def guided(model, x, t, y, w):
    """out_u + w (out_c - out_u): w = 1 is the conditional model, w = 0 the unconditional one."""
    if y is None or w == 1:
        return model(x, t, y)
    null = torch.full_like(y, NUM_CLASSES)
    if w == 0:
        return model(x, t, null)
    out_c, out_u = model(torch.cat([x, x]), torch.cat([t, t]), torch.cat([y, null])).float().chunk(2)
    return out_u + w * (out_c - out_u)


@torch.no_grad()
def sample(model, n, shape, cfg, y=None, generator=None, snapshots=None):
    """Draw n images in [-1, 1] with the ancestral sampler. snapshots: list that receives x_t at 0/25/50/75/100%."""
    device = next(model.parameters()).device
    ab, beta = make_alpha_bar(cfg.schedule, cfg.T), make_beta(cfg.schedule, cfg.T)
    x = torch.randn(n, *shape, device=device, generator=generator)
    amp = torch.autocast('cuda', torch.bfloat16) if cfg.bf16 and x.is_cuda else nullcontext()
    step = kernels.ddpm_step if kernels.available(x) else ddpm_step
    keep = {round(f * (cfg.T - 1)) for f in (1, 0.75, 0.5, 0.25)}
    for i in reversed(range(cfg.T)):
        if snapshots is not None and i in keep:
            snapshots.append(x.clone())
        with amp:
            out = guided(model, x, torch.full((n,), i, device=device), y, cfg.guidance)
        ab_t, ab_prev = ab[i].item(), (ab[i - 1].item() if i > 0 else 1.0)
        sigma = (beta[i].item() if cfg.var == 'large' else (1 - ab_prev) / (1 - ab_t) * beta[i].item()) ** 0.5
        z = torch.randn(x.shape, device=device, generator=generator) if i > 0 else None  # no noise at the last step
        x = step(x, out, z, ab_t, ab_prev, sigma, cfg.objective, cfg.clip)
    if snapshots is not None:
        snapshots.append(x.clone())
    return x.clamp(-1, 1)


def sample_labels(cfg, n, device):
    if not cfg.class_cond:
        return None
    if cfg.label >= 0:
        return torch.full((n,), cfg.label, device=device)
    return torch.arange(n, device=device) % NUM_CLASSES


def sample_many(model, n, shape, cfg, rank=0, world=1, desc='sampling', sampler=None):
    """n samples as uint8 on rank 0 (None elsewhere); batch i uses seed (seed, i), so results do not depend on world.
    sampler(model, n, shape, cfg, y, generator) defaults to Algorithm 2; ddim.py passes its own."""
    batches = [(i, min(cfg.sample_batch, n - i)) for i in range(0, n, cfg.sample_batch)]
    device = next(model.parameters()).device
    mine = []
    for k, (start, size) in enumerate(tqdm(batches[rank::world], desc=desc, disable=rank != 0)):
        g = torch.Generator(device).manual_seed(cfg.seed * 1_000_003 + start)
        y = sample_labels(cfg, start + size, device)[start:] if cfg.class_cond else None
        mine.append(common.to_uint8((sampler or sample)(model, size, shape, cfg, y, g)))
    if world > 1:  # collect every rank's batches on rank 0, back in batch order
        parts = [None] * world
        torch.distributed.all_gather_object(parts, [b.cpu() for b in mine])
        mine = [parts[k % world][k // world] for k in range(len(batches))]
    return torch.cat(mine) if rank == 0 else None


# -----------------------------------------------------------------------------
# Training


def check(cfg, world=1):
    choices = dict(mode=('train', 'sample', 'forward', 'schedules', 'bench'), schedule=('linear', 'cosine', 'sigmoid'),
                   objective=('eps', 'x0', 'v'), loss=('mse', 'l1'), var=('small', 'large'))
    for k, allowed in choices.items():
        if getattr(cfg, k) not in allowed:
            common.fail(f'--{k} {getattr(cfg, k)!r} is not one of: {", ".join(allowed)}')
    common.check_ranges(cfg, positive=('steps', 'batch_size', 'warmup', 'log_every', 'ckpt_every', 'ch',
                                       'num_res_blocks', 'n_samples', 'sample_batch', 'image_size', 'lr'),
                        nonnegative=('time_budget', 'sample_every', 'fid_every', 'weight_decay', 'grad_clip',
                                     'guidance'),
                        unit=('dropout', 'p_uncond', 'ema'))
    try:
        levels = [int(m) for m in cfg.ch_mult.split(',')]
        [int(r) for r in cfg.attn_res.split(',') if r]
    except ValueError:
        common.fail(f'--ch-mult {cfg.ch_mult!r} / --attn-res {cfg.attn_res!r} must be comma-separated integers, '
                    f'e.g. 1,2,2,2')
    size = common.DATASETS.get(cfg.dataset, {}).get('size', cfg.image_size)
    if size % 2 ** (len(levels) - 1):
        common.fail(f'{size}x{size} images cannot be halved {len(levels) - 1} times: shorten --ch-mult')
    if cfg.batch_size % world:
        common.fail(f'--batch-size {cfg.batch_size} must be divisible by the {world} processes')
    if cfg.class_cond and cfg.dataset not in common.DATASETS:
        common.fail('--class-cond 1 needs a labelled dataset (mnist, fashion-mnist, cifar10); image folders have none')
    if cfg.T < 2 or cfg.ch % 4:
        common.fail(f'--T {cfg.T} must be >= 2 and --ch {cfg.ch} a multiple of 4')
    if not -1 <= cfg.label < NUM_CLASSES:
        common.fail(f'--label {cfg.label}: a class 0..{NUM_CLASSES - 1}, or -1 to cycle through them')
    if cfg.fid_every and cfg.fid_samples < 2:
        common.fail(f'--fid-samples {cfg.fid_samples}: FID needs at least 2 samples (and thousands to mean much)')


def fid_scorer(cfg, x, device):
    """eval_fid.Scorer against --fid-ref, else the training set (a folder's images, x, straight from memory)."""
    import eval_fid  # only runs that ask for FID pay for the Inception network

    if cfg.fid_ref or cfg.dataset in common.DATASETS:
        return eval_fid.Scorer(cfg.fid_ref or f'{cfg.dataset}:train', device)
    return eval_fid.Scorer(None, device, images=x)


def train(cfg):
    device, rank, world = common.setup(cfg.device)
    check(cfg, world)
    out = Path(cfg.out)
    if rank == 0:
        common.claim(out)  # one run per folder: a second one gets a clear error, not a mixed-up checkpoint
    x, y = common.load_dataset(cfg.dataset, 'train', cfg.data_dir or None, cfg.image_size)
    scorer = fid_scorer(cfg, x, device) if cfg.fid_every and rank == 0 else None  # Inception + reference, up front
    cuda = 'cuda' in device
    x, y = x.to(device), (y.to(device) if cfg.class_cond else None)  # the whole uint8 dataset lives on the device
    shape = tuple(x.shape[1:])
    torch.manual_seed(cfg.seed)  # the same initial weights on every rank and every run
    model = make_model(cfg, shape[0], shape[1]).to(device)
    if cuda:
        model = model.to(memory_format=torch.channels_last)  # NHWC convolutions run faster on tensor cores
    ema = copy.deepcopy(model).requires_grad_(False).eval()  # eval: sampling never uses dropout, on any rank
    opt = torch.optim.AdamW(model.parameters(), lr=cfg.lr, weight_decay=cfg.weight_decay, fused=cuda or None)
    start, clock = 0, 0.0  # clock: seconds spent training, kept across resumes for --time-budget
    if cfg.resume:
        ckpt = common.load_ckpt(out / 'ckpt.pt', 'ddpm')
        common.check_resume(ckpt, cfg, MODEL_KEYS)
        inexact = [k for k in ('seed', 'batch_size', 'lr', 'warmup', 'dropout', 'flip', 'p_uncond', 'loss')
                   if ckpt['config'].get(k) != getattr(cfg, k)]
        if inexact:
            common.print0(f'warning: --resume with a different {", ".join(inexact)} than the checkpoint\'s: training '
                          f'continues, but no longer as the uninterrupted run would have')
        model.load_state_dict(ckpt['model'])
        ema.load_state_dict(ckpt['ema'])
        opt.load_state_dict(ckpt['opt'])
        start, clock = ckpt['step'], ckpt.get('clock', 0.0)
        if start >= cfg.steps:
            common.print0(f'{out}/ckpt.pt is already at step {start} (--steps {cfg.steps}): nothing to train. '
                          f'Raise --steps to continue it, or sample with --mode sample')
            return model, None
    elif (out / 'ckpt.pt').exists():
        common.fail(f'{out}/ckpt.pt exists: pass --resume 1 to continue it, or another --out')
    nparams = sum(p.numel() for p in model.parameters())
    common.print0(f'{cfg.dataset} {tuple(x.shape)} on {device} x{world} | U-Net {nparams / 1e6:.2f}M parameters | '
                  f'steps {start} -> {cfg.steps}')
    if rank == 0:
        (out / 'config.json').write_text(json.dumps(dataclasses.asdict(cfg), indent=1))

    ab = make_alpha_bar(cfg.schedule, cfg.T).float().to(device)
    torch.backends.cudnn.benchmark = True  # fixed shapes: let cuDNN pick its fastest convolutions once
    net = torch.compile(model) if cfg.compile and cuda else model
    ema_net = torch.compile(ema) if cfg.compile and cuda else ema  # sampling runs the EMA network T times per image
    if world > 1:
        net = nn.parallel.DistributedDataParallel(net, device_ids=[device] if cuda else None)
    amp = torch.autocast('cuda', torch.bfloat16) if cfg.bf16 and cuda else nullcontext()
    params, ema_params = list(model.parameters()), list(ema.parameters())

    def save(step):
        if rank == 0:
            common.save_ckpt(out / 'ckpt.pt', dict(script='ddpm', model=model.state_dict(), ema=ema.state_dict(),
                                                   opt=opt.state_dict(), step=step, clock=clock,
                                                   config=dataclasses.asdict(cfg)))

    def grid(step):
        if rank == 0:
            n = 100 if cfg.class_cond else 64
            g = torch.Generator(device).manual_seed(cfg.seed)
            imgs = sample(ema_net, n, shape, cfg, sample_labels(cfg, n, device), g)
            common.save_grid(common.to_uint8(imgs), out / f'samples_{step:07d}.png', nrow=10 if cfg.class_cond else 8)

    # Ctrl-C / SIGTERM only set `stop`: the loop finishes its step, saves and exits, so nothing is lost; while it
    # samples or evaluates (stop.now()), the signal interrupts at once, and the step's checkpoint is written
    with common.stop_requested() as stop, open(out / 'log.txt', 'a') if rank == 0 else nullcontext() as log:
        t0 = tick = time.perf_counter()  # t0: last log line; tick: start of the current stretch of pure training
        last, clock0 = start, clock
        pbar = tqdm(total=None if cfg.time_budget else cfg.steps, initial=start, disable=rank != 0, dynamic_ncols=True)
        for step in range(start, cfg.steps):
            torch.manual_seed((cfg.seed * 1000 + rank) * 10 ** 9 + step)  # batch, t, noise, dropout: exact on resume
            for group in opt.param_groups:
                group['lr'] = cfg.lr * min(1.0, (step + 1) / cfg.warmup)
            x0, yb = common.random_batch(x, y, cfg.batch_size // world, cfg.flip)
            loss = loss_fn(net, x0, yb, ab, cfg, amp)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            nn.utils.clip_grad_norm_(params, cfg.grad_clip)
            opt.step()
            with torch.no_grad():  # EMA with a warm-up, so short runs are not dominated by the random init
                torch._foreach_lerp_(ema_params, params, 1 - min(cfg.ema, (1 + step) / (10 + step)))
            pbar.update()
            done = step + 1
            over = bool(cfg.time_budget) and clock + time.perf_counter() - tick >= cfg.time_budget
            if world > 1:  # ranks agree on stopping every log_every steps, so none waits in a collective forever
                if done % cfg.log_every == 0:
                    flags = torch.tensor([float(bool(stop)), float(over)], device=device)
                    torch.distributed.all_reduce(flags, torch.distributed.ReduceOp.MAX)
                    stop[:], over = [1] * bool(flags[0]), bool(flags[1])
                else:
                    over = False
            final = done == cfg.steps or over
            halt = bool(stop) and (world == 1 or done % cfg.log_every == 0)
            do_ckpt = halt or done % cfg.ckpt_every == 0 or final
            if done % cfg.log_every == 0 or do_ckpt:
                lossf = loss.item()  # the only host sync of the loop; always before a checkpoint is written
                if not math.isfinite(lossf):
                    common.fail(f'loss is {lossf} at step {done}: lower --lr or check the data (the last good '
                                f'checkpoint, if any, is kept)')
            if done % cfg.log_every == 0 or final:
                dt = time.perf_counter() - t0
                ips = (done - last) * cfg.batch_size / dt
                pbar.set_postfix(loss=f'{lossf:.4f}', img_s=f'{ips:.0f}')
                if log:
                    print(f'step {done} | loss {lossf:.4f} | {1000 * dt / (done - last):.1f} ms/step | {ips:.0f} img/s',
                          file=log, flush=True)
                t0, last = time.perf_counter(), done
            do_grid = (cfg.sample_every and done % cfg.sample_every == 0) or final
            do_fid = cfg.fid_every and (done % cfg.fid_every == 0 or final)
            if not (do_ckpt or do_grid or do_fid):
                continue
            if cuda:
                torch.cuda.synchronize()  # the queued steps belong to the training clock
            pause = time.perf_counter()
            clock += pause - tick
            if do_ckpt:
                save(done)
            if halt:
                common.print0(f'\nstopped at step {done}; checkpoint saved to {out}/ckpt.pt (continue with --resume 1)')
                raise SystemExit(130)
            try:
                with stop.now():
                    if do_grid:
                        grid(done)
                    if do_fid:
                        x_fid = sample_many(ema_net, cfg.fid_samples, shape, cfg, rank, world, desc='FID samples')
                        if rank == 0:
                            score = scorer(x_fid)
                            common.print0(f'\nstep {done} | FID-{cfg.fid_samples} {score:.2f}')
                            print(f'step {done} | fid{cfg.fid_samples} {score:.4f}', file=log, flush=True)
            except KeyboardInterrupt:
                if not do_ckpt:
                    save(done)
                common.print0(f'\nstopped at step {done}; checkpoint saved to {out}/ckpt.pt (continue with --resume 1)')
                raise SystemExit(130) from None
            tick = time.perf_counter()
            t0 += tick - pause  # timings exclude checkpoints, sampling and evaluation
            if over:
                break
        pbar.close()
    ips = (done - start) * cfg.batch_size / max(clock - clock0, 1e-9)
    common.print0(f'done: step {done}, {clock:.1f} s of training ({ips:.0f} img/s) -> {out}/ckpt.pt, '
                  f'{out}/samples_{done:07d}.png')
    return model, lossf


# -----------------------------------------------------------------------------
# Sampling from a checkpoint, and the exercise figures


def sample_from_checkpoint(cfg):
    device, rank, world = common.setup(cfg.device)
    out = Path(cfg.out)
    model, trained = load_model(out / 'ckpt.pt')
    if not trained.class_cond and (cfg.label >= 0 or cfg.guidance != 1):
        common.fail(f'--label / --guidance: {out}/ckpt.pt is unconditional (trained without --class-cond 1)')
    if rank == 0:
        common.claim(out)
    model = model.to(device)
    mcfg = dataclasses.replace(cfg, **{k: getattr(trained, k) for k in MODEL_KEYS})  # the model's own settings
    shape = common.image_shape(mcfg)
    x = sample_many(model, cfg.n_samples, shape, mcfg, rank, world)
    if rank != 0:
        return
    common.write_samples(x, out, 'samples', cfg.save)
    snaps, g = [], torch.Generator(device).manual_seed(cfg.seed)  # the reverse process at 0/25/50/75/100% of steps
    sample(model, 8, shape, mcfg, sample_labels(mcfg, 8, device), g, snaps)
    common.save_grid(common.to_uint8(torch.stack(snaps, 1).flatten(0, 1).clamp(-1, 1)), out / 'reverse.png', nrow=5)
    print(f'{cfg.n_samples} samples -> {out}/samples.npz, {out}/samples/; grid {out}/samples.png; '
          f'reverse process {out}/reverse.png')


def forward_figures(cfg):
    """Exercise: x_t at t = 0, 100, 250, 500, 750, 999, per-t pixel histograms, and MSE(x_t, x_0)."""
    out = Path(cfg.out)
    out.mkdir(parents=True, exist_ok=True)
    x, _ = common.load_dataset(cfg.dataset, 'train', cfg.data_dir or None, cfg.image_size)
    g = torch.Generator().manual_seed(cfg.seed)
    x0 = x[torch.randperm(len(x), generator=g)[:512]].float() / 127.5 - 1
    ab = torch.cat([torch.ones(1), make_alpha_bar(cfg.schedule, cfg.T).float()])  # ab[t] for the paper's t; ab[0] = 1
    ts = [t for t in (0, 100, 250, 500, 750, 999) if t <= cfg.T]
    eps = torch.randn(x0.shape, generator=g)
    xts = [q_sample(x0, ab[t], eps) for t in ts]
    plt = common.pyplot()
    fig, axes = plt.subplots(2, len(ts), figsize=(2.2 * len(ts), 4.6), height_ratios=(3, 2))
    for i, (t, xt) in enumerate(zip(ts, xts)):
        grid = common.grid_image(common.to_uint8(xt[:16].clamp(-1, 1)), nrow=4)
        axes[0, i].imshow(grid, cmap='gray' if grid.mode == 'L' else None)
        axes[0, i].set(title=f't = {t}\n$\\bar\\alpha_t$ = {ab[t]:.3g}', xticks=[], yticks=[])
        axes[0, i].grid(False)
        axes[1, i].hist(xt.flatten().numpy(), bins=np.linspace(-4, 4, 81), density=True)
        axes[1, i].set(xlabel='pixel value of $x_t$', ylabel='density' if i == 0 else None, xlim=(-4, 4))
    fig.suptitle(f'forward process q(x_t | x_0), {cfg.schedule} schedule, T = {cfg.T}: samples and pixel histograms')
    fig.savefig(out / 'forward.png')
    with open(out / 'forward.csv', 'w', newline='') as f:
        w = csv.writer(f)
        w.writerow(['t', 'alpha_bar', 'mse_to_x0', 'mean', 'std'])
        for t, xt in zip(ts, xts):
            row = [t, ab[t].item(), F.mse_loss(xt, x0).item(), xt.mean().item(), xt.std().item()]
            w.writerow(row)
            print('t {:4d} | alpha_bar {:.4f} | MSE to x0 {:.4f} | mean {:+.3f} | std {:.3f}'.format(*row))
    print(f'wrote {out}/forward.png (columns: t; top: 16 images, bottom: pixel histogram) and forward.csv')


def schedule_figures(cfg):
    """Exercise: beta_t, alpha_bar_t and SNR(t) = alpha_bar / (1 - alpha_bar) for the three schedules."""
    out = Path(cfg.out)
    out.mkdir(parents=True, exist_ok=True)
    names, t = ('linear', 'cosine', 'sigmoid'), np.arange(1, cfg.T + 1)  # the paper's t = 1..T
    beta = {n: make_beta(n, cfg.T).numpy() for n in names}
    ab = {n: make_alpha_bar(n, cfg.T).numpy() for n in names}
    snr = {n: ab[n] / (1 - ab[n]) for n in names}
    with open(out / 'schedules.csv', 'w', newline='') as f:
        w = csv.writer(f)
        w.writerow(['t'] + [f'{q}_{n}' for n in names for q in ('beta', 'alpha_bar', 'snr')])
        for i in range(cfg.T):
            w.writerow([t[i]] + [f'{v[n][i]:.6g}' for n in names for v in (beta, ab, snr)])
    plt = common.pyplot()
    fig, axes = plt.subplots(1, 3, figsize=(13, 3.8))
    panels = ((beta, r'$\beta_t$ (log scale)', 'log'),
              (ab, r'$\bar\alpha_t$', 'linear'), (snr, r'SNR(t) = $\bar\alpha_t / (1 - \bar\alpha_t)$', 'log'))
    for ax, (v, title, yscale) in zip(axes, panels):
        for n in names:
            ax.plot(t, v[n], label=n)
        ax.set(title=title, xlabel='diffusion step t', yscale=yscale)
        ax.legend()
    axes[2].axhline(1, color='gray', lw=0.8, ls='--')
    fig.savefig(out / 'schedules.png')
    for n in names:
        cross = t[np.argmax(snr[n] < 1)] if (snr[n] < 1).any() else 'never (SNR > 1 throughout)'
        print(f'{n:8s} SNR(t) = 1 at t = {cross} | alpha_bar_T = {ab[n][-1]:.2e}')
    print(f'wrote {out}/schedules.csv and {out}/schedules.png')


PEAK_BF16_FLOPS = {'H100 PCIe': 756e12, 'H100': 989e12, 'H200': 989e12, 'A100': 312e12}  # dense, from NVIDIA's sheets


def bench(cfg, steps=50):
    """Training throughput of this config at --batch-size on random data: img/s, peak memory, model FLOP utilisation."""
    device, _, _ = common.setup(cfg.device)
    cuda = 'cuda' in device
    C, H, W = common.image_shape(cfg)
    torch.manual_seed(cfg.seed)
    model = make_model(cfg, C, H).to(device)
    if cuda:  # as train() runs it: NHWC, fused AdamW, cuDNN autotuning
        model = model.to(memory_format=torch.channels_last)
        torch.backends.cudnn.benchmark = True
    opt = torch.optim.AdamW(model.parameters(), lr=cfg.lr, fused=cuda or None)
    net = torch.compile(model) if cfg.compile and cuda else model
    amp = torch.autocast('cuda', torch.bfloat16) if cfg.bf16 and cuda else nullcontext()
    ab = make_alpha_bar(cfg.schedule, cfg.T).float().to(device)
    x0 = torch.rand(cfg.batch_size, C, H, W, device=device) * 2 - 1

    def step():
        loss = loss_fn(net, x0, None, ab, cfg, amp)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()

    from torch.utils.flop_counter import FlopCounterMode
    with FlopCounterMode(display=False) as counter:  # matmul/conv FLOPs of one forward + backward, eager
        loss_fn(model, x0, None, ab, cfg, amp).backward()
    steps = steps if cuda else 3
    for _ in range(3 if cuda else 1):  # warm-up (compilation, cuDNN autotuning)
        step()
    sync = torch.cuda.synchronize if cuda else (lambda: None)
    if cuda:
        torch.cuda.reset_peak_memory_stats()
    sync()
    t0 = time.perf_counter()
    for _ in range(steps):
        step()
    sync()
    dt = (time.perf_counter() - t0) / steps
    name = torch.cuda.get_device_name() if cuda else 'cpu'
    step_flops = counter.get_total_flops()
    flops = step_flops / dt
    peak = next((v for k, v in PEAK_BF16_FLOPS.items() if k in name), None) if cuda and cfg.bf16 else None
    print(f'{name} | torch {torch.__version__} | batch {cfg.batch_size} | compile {int(cfg.compile and cuda)} | '
          f'{sum(p.numel() for p in model.parameters()) / 1e6:.2f}M params')
    print(f'{step_flops / 1e9:.2f} GFLOP/step (forward + backward) | {1000 * dt:.1f} ms/step | '
          f'{cfg.batch_size / dt:.0f} img/s | '
          f'peak memory {torch.cuda.max_memory_allocated() / 2**30 if cuda else float("nan"):.2f} GiB | '
          f'{flops / 1e12:.1f} TFLOP/s' + (f' | MFU {100 * flops / peak:.1f}% of {peak / 1e12:.0f}' if peak else ''))


def main(argv=None):
    cfg = common.parse_config(Config, presets, argv)
    cfg = dataclasses.replace(cfg, out=cfg.out or f'runs/ddpm-{Path(cfg.dataset).name}')
    check(cfg)
    modes = dict(train=train, sample=sample_from_checkpoint, forward=forward_figures, schedules=schedule_figures,
                 bench=bench)
    with common.script_guard():
        return modes[cfg.mode](cfg)


if __name__ == '__main__':
    main()
