"""DDPM (Ho et al. 2020, arXiv:2006.11239): train eps_theta(x_t, t) to predict the noise added by q(x_t | x_0),
then sample by running the learned reverse chain (Algorithm 2) from pure noise.

    python ddpm.py --dataset cifar10                                   # the paper's CIFAR-10 model (35.7M params)
    torchrun --standalone --nproc_per_node=8 ddpm.py --dataset cifar10 # same, 8 GPUs (batch split across ranks)
    python ddpm.py --dataset mnist --device cpu                        # CPU quick start (preset mnist-cpu)
    python ddpm.py --mode sample --out runs/ddpm-cifar10 --n-samples 50000   # PNGs + samples.npz for eval_fid.py

The Config defaults are the paper's CIFAR-10 model and recipe; named presets (end of --help) shrink it for 28x28 data
and a CPU. Measured (README "Results"): the CPU quick start gives recognisable digits in 8 minutes on 2 CPU cores.
"""
import copy, dataclasses, math, os
from contextlib import nullcontext
from dataclasses import dataclass
from functools import partial
from pathlib import Path

import torch
import torch.nn as nn
import torch.nn.functional as F
from tqdm import tqdm

import common
import kernels


@dataclass
class Config:
    mode: str = 'train'  # train | sample (from the checkpoint in --out)
    preset: str = ''  # named settings below the flags given (listed at the end of --help); '': from --dataset, device
    dataset: str = 'cifar10'  # mnist | fashion-mnist | cifar10 | cifar10-subset | an .npz of uint8 images (N, H, W, C)
    data_dir: str = ''  # folder with the official archives (default $GENMODELS_DATA, else ./data; fetched if missing)
    out: str = ''  # run folder for checkpoint, grids and logs (default runs/ddpm-<dataset>)
    device: str = 'auto'  # auto | cuda | cpu | mps
    seed: int = 0  # all training randomness is a function of (seed, rank, step)
    # U-Net, Ho et al. App. B
    ch: int = 128  # base channels
    ch_mult: str = '1,2,2,2'  # channel multiplier per resolution level (one downsampling between levels)
    num_res_blocks: int = 2  # residual blocks per level
    attn_res: str = '16'  # resolutions (comma-separated) with self-attention
    dropout: float = 0.1  # dropout in the residual blocks (Ho et al.: 0.1 on CIFAR-10)
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
    weight_decay: float = 0.0  # AdamW's decoupled weight decay
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


CPU = dict(ch=32, ch_mult='1,2,2', num_res_blocks=1, attn_res='', dropout=0.0, batch_size=64, lr=1e-3, warmup=100,
           ema=0.995, steps=1500, log_every=50, sample_every=0, ckpt_every=500, compile=False)  # 1.06M params on 28x28
PRESETS = {'cifar10': {}, 'mnist': dict(ch=64, ch_mult='1,2,2', attn_res='14', ema=0.999, flip=False, steps=20000,
                                        warmup=1000)}  # cifar10: Ho et al.'s; mnist: 28x28 data, 6.5M params
PRESETS.update({f'{k}-cpu': dict(p, **CPU) for k, p in list(PRESETS.items())})


MODEL_KEYS = ('dataset', 'ch', 'ch_mult', 'num_res_blocks', 'attn_res', 'class_cond', 'T', 'schedule',
              'objective')
RECIPE_KEYS = ('seed', 'batch_size', 'lr', 'warmup', 'dropout', 'flip', 'p_uncond', 'loss')  # same: an exact resume
NUM_CLASSES = 10  # every labelled dataset here has ten classes; index 10 is the null label of guidance

# -----------------------------------------------------------------------------
# Noise schedules, built in float64: beta_t for t = 0..T-1 (the paper's t = 1..T)


def make_beta(schedule, T):
    t = torch.arange(T + 1, dtype=torch.float64) / T
    if schedule == 'linear':  # Ho et al. sec. 4
        return torch.linspace(1e-4, 0.02, T, dtype=torch.float64)
    if schedule == 'cosine':  # Nichol & Dhariwal eq. 17, s = 0.008
        f = torch.cos((t + 0.008) / 1.008 * math.pi / 2) ** 2
    else:  # sigmoid, Jabri et al. 2022 (RIN): alpha_bar follows a sigmoid, start -3, end 3, tau 1
        s0, s1 = torch.sigmoid(torch.tensor([-3.0, 3.0], dtype=torch.float64))
        f = (s1 - torch.sigmoid(t * 6 - 3)) / (s1 - s0)
    return (1 - f[1:] / f[:-1]).clamp(max=0.999)  # beta_t = 1 - alpha_bar_t / alpha_bar_{t-1}, clipped as in the paper


def make_alpha_bar(schedule, T):
    return torch.cumprod(1 - make_beta(schedule, T), 0)  # float64 (T,)


# -----------------------------------------------------------------------------
# Forward process q(x_t | x_0), eq. (4), the three parameterisations of the network output, and the loss


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


def loss_fn(net, x0, y, ab, objective='eps', loss='mse', p_uncond=0.1):
    """L_simple (eq. 14) generalised to the eps / x0 / v targets: t ~ U{0..T-1}, eps ~ N(0, I), x_t by eq. (4)."""
    B = x0.shape[0]
    t = torch.randint(0, len(ab), (B,), device=x0.device)
    eps = torch.randn_like(x0)
    abt = ab[t].view(B, 1, 1, 1)
    xt = q_sample(x0, abt, eps)
    if y is not None:  # label dropout: the "null" class index NUM_CLASSES trains the unconditional model too
        y = torch.where(torch.rand(B, device=y.device) < p_uncond, torch.full_like(y, NUM_CLASSES), y)
    target = {'eps': eps, 'x0': x0, 'v': abt.sqrt() * eps - (1 - abt).sqrt() * x0}[objective]
    err = net(xt, t, y).float() - target
    return err.abs().mean() if loss == 'l1' else err.pow(2).mean()


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
    def __init__(self, cin, cout, tdim, dropout, attn, context_dim=0):
        super().__init__()
        self.norm1, self.conv1 = GroupNorm(cin), nn.Conv2d(cin, cout, 3, padding=1)
        self.temb = nn.Linear(tdim, cout)
        self.norm2, self.dropout, self.conv2 = GroupNorm(cout), nn.Dropout(dropout), nn.Conv2d(cout, cout, 3, padding=1)
        self.skip = nn.Conv2d(cin, cout, 1) if cin != cout else nn.Identity()
        self.attn = Attention(cout) if attn else None
        self.xattn = CrossAttention(cout, context_dim) if attn and context_dim else None

    def forward(self, x, temb, context=None):
        h = self.conv1(self.norm1(x))  # (B, cout, H, W)
        h = h + self.temb(F.silu(temb))[:, :, None, None]
        h = self.skip(x) + self.conv2(self.dropout(self.norm2(h)))
        h = self.attn(h) if self.attn is not None else h
        return self.xattn(h, context) if self.xattn is not None else h


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


class CrossAttention(nn.Module):
    """Queries from the feature map (B, C, H, W), keys and values from a context sequence (B, L, D), residual
    (Rombach et al. 2022, sec. 3.3); ldm.py's conditioning on class tokens."""

    def __init__(self, ch, dim):
        super().__init__()
        self.norm, self.q, self.kv, self.proj = GroupNorm(ch, silu=False), nn.Linear(ch, ch), nn.Linear(dim, 2 * ch), \
            nn.Linear(ch, ch)

    def forward(self, h, context):
        B, C, H, W = h.shape
        q = self.q(self.norm(h).flatten(2).transpose(1, 2))  # (B, HW, C)
        k, v = self.kv(context).chunk(2, -1)  # 2 x (B, L, C)
        a = F.scaled_dot_product_attention(q, k, v)  # softmax(q k^T / sqrt(C)) v, (B, HW, C)
        return h + self.proj(a).transpose(1, 2).reshape(B, C, H, W)


def timestep_embedding(t, dim):
    """Transformer sinusoidal embedding of the (float) timestep, [sin, cos] halves as in the paper's code."""
    freqs = torch.exp(-math.log(10000) * torch.arange(dim // 2, device=t.device) / (dim // 2 - 1))
    args = t.float()[:, None] * freqs[None]
    return torch.cat([args.sin(), args.cos()], 1)  # (B, dim)


class UNet(nn.Module):
    def __init__(self, in_ch=3, ch=128, ch_mult=(1, 2, 2, 2), num_res_blocks=2, attn_res=(16,), dropout=0.1,
                 resolution=32, num_classes=0, context_dim=0):  # context_dim > 0: cross-attention beside self-attention
        super().__init__()
        self.ch, tdim = ch, 4 * ch
        self.temb = nn.Sequential(nn.Linear(ch, tdim), nn.SiLU(), nn.Linear(tdim, tdim))
        self.label_emb = nn.Embedding(num_classes + 1, tdim) if num_classes else None  # last row: "no label"
        self.conv_in = nn.Conv2d(in_ch, ch, 3, padding=1)
        self.down, chans, c, res = nn.ModuleList(), [ch], ch, resolution
        for i, m in enumerate(ch_mult):
            for _ in range(num_res_blocks):
                self.down.append(ResBlock(c, ch * m, tdim, dropout, res in attn_res, context_dim))
                c = ch * m
                chans.append(c)
            if i < len(ch_mult) - 1:
                self.down.append(nn.Sequential(nn.ZeroPad2d((0, 1, 0, 1)), nn.Conv2d(c, c, 3, stride=2)))  # TF SAME
                chans.append(c)
                res //= 2
        self.mid = nn.ModuleList([ResBlock(c, c, tdim, dropout, True, context_dim),
                                  ResBlock(c, c, tdim, dropout, False)])
        self.up = nn.ModuleList()
        for i, m in reversed(list(enumerate(ch_mult))):
            for _ in range(num_res_blocks + 1):  # one more block per level, to consume the downsampler's skip too
                self.up.append(ResBlock(c + chans.pop(), ch * m, tdim, dropout, res in attn_res, context_dim))
                c = ch * m
            if i > 0:
                self.up.append(nn.Sequential(nn.Upsample(scale_factor=2.0), nn.Conv2d(c, c, 3, padding=1)))  # nearest
                res *= 2
        self.norm_out, self.conv_out = GroupNorm(c), nn.Conv2d(c, in_ch, 3, padding=1)
        for mod in self.modules():  # the paper's init: Xavier-uniform weights, zero biases ...
            if isinstance(mod, (nn.Conv2d, nn.Linear)):
                nn.init.xavier_uniform_(mod.weight)
                nn.init.zeros_(mod.bias)
        for mod in self.modules():  # ... and layers that end a residual branch start at zero: blocks start as identity
            for last in ([mod.conv2] if isinstance(mod, ResBlock) else [mod.proj] if hasattr(mod, 'proj') else []):
                nn.init.zeros_(last.weight)  # (its bias is zero already)
        nn.init.zeros_(self.conv_out.weight)

    def forward(self, x, t, y=None, context=None):
        temb = self.temb(timestep_embedding(t, self.ch))  # (B, 4ch)
        if self.label_emb is not None:
            temb = temb + self.label_emb(y if y is not None else torch.full_like(t, self.label_emb.num_embeddings - 1))
        hs = [self.conv_in(x)]
        for block in self.down:
            hs.append(block(hs[-1], temb, context) if isinstance(block, ResBlock) else block(hs[-1]))
        h = hs[-1]
        for block in self.mid:
            h = block(h, temb, context)
        for block in self.up:
            h = block(torch.cat([h, hs.pop()], 1), temb, context) if isinstance(block, ResBlock) else block(h)
        return self.conv_out(self.norm_out(h))


def make_model(cfg, in_ch, resolution, context_dim=0):
    return UNet(in_ch, cfg.ch, common.ints(cfg, 'ch_mult'), cfg.num_res_blocks, common.ints(cfg, 'attn_res'),
                cfg.dropout, resolution, NUM_CLASSES if getattr(cfg, 'class_cond', False) else 0, context_dim)


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


def ddpm_step(x, out, z, ab_t, ab_prev, sigma, objective, clip):
    """One step of Algorithm 2 at a shared t: x_{t-1} = mu~(x_t, x0_hat) + sigma z, x0_hat clamped to [-clip, clip]
    (clip 0 or False: off). Scalars are python floats; kernels.ddpm_step is the fused version of exactly this."""
    ab = torch.tensor(ab_t, dtype=torch.float64)
    x0 = predict_x0(x, out.float(), ab, objective)
    if clip:
        x0 = x0.clamp(-clip, clip)
    mean, _ = q_posterior(x0, x, ab_t, ab_prev)
    return mean if z is None else mean + sigma * z


@torch.no_grad()
def sample(model, x, ab, objective='eps', var='small', clip=True, y=None, w=1.0, generator=None, snapshots=None):
    """Algorithm 2: x = x_T ~ N(0, I) down to x_0, in [-1, 1]. sigma_t^2 is the posterior's beta tilde (var small) or
    beta_t (large); snapshots (a list) receives x_t at 100/75/50/25/0% of the way from T."""
    step = kernels.ddpm_step if kernels.available(x) and clip in (0, 1) else ddpm_step
    T, keep = len(ab), {round(f * (len(ab) - 1)) for f in (1, 0.75, 0.5, 0.25)}
    for i in tqdm(reversed(range(T)), 'steps', T, leave=False, disable=T < 100 or os.environ.get('RANK', '0') != '0'):
        if snapshots is not None and i in keep:
            snapshots.append(x.clone())
        out = guided(model, x, torch.full((len(x),), i, device=x.device), y, w)
        ab_t, ab_prev = ab[i].item(), (ab[i - 1].item() if i > 0 else 1.0)
        beta = 1 - ab_t / ab_prev
        sigma = (beta if var == 'large' else (1 - ab_prev) / (1 - ab_t) * beta) ** 0.5
        z = torch.randn(x.shape, device=x.device, generator=generator) if i > 0 else None  # no noise at the last step
        x = step(x, out, z, ab_t, ab_prev, sigma, objective, clip)
    if snapshots is not None:
        snapshots.append(x.clone())
    return x.clamp(-1, 1)


def labels(conditional, label, start, n, device):
    """Class labels of samples start .. start + n - 1: --label, or cycling through the classes (None: unconditional)."""
    if not conditional:
        return None
    cycle = torch.arange(start, start + n, device=device) % NUM_CLASSES
    return torch.full((n,), label, device=device) if label >= 0 else cycle


def draw(model, cfg, shape, start, n, generator, snapshots=None):
    """Samples start .. start + n - 1 of a run's model (common.sample_many's batches), uint8: x_T from generator."""
    x = torch.randn(n, *shape, device=next(model.parameters()).device, generator=generator)
    with torch.autocast('cuda', torch.bfloat16) if cfg.bf16 and x.is_cuda else nullcontext():
        x = sample(model, x, make_alpha_bar(cfg.schedule, cfg.T), cfg.objective, cfg.var, cfg.clip,
                   labels(cfg.class_cond, cfg.label, start, n, x.device), cfg.guidance, generator, snapshots)
    return common.to_uint8(x)


# -----------------------------------------------------------------------------
# Training


def check(cfg, world=1):
    common.check(cfg, dict(mode=('train', 'sample'), schedule=('linear', 'cosine', 'sigmoid'),
                           objective=('eps', 'x0', 'v'), loss=('mse', 'l1'), var=('small', 'large')),
                 positive=('steps', 'batch_size', 'warmup', 'log_every', 'ckpt_every', 'ch', 'num_res_blocks',
                           'n_samples', 'sample_batch', 'lr'),
                 nonnegative=('time_budget', 'sample_every', 'fid_every', 'weight_decay', 'grad_clip', 'guidance'),
                 unit=('dropout', 'p_uncond', 'ema'))
    common.ints(cfg, 'attn_res')  # one clear error if it is not a list of integers
    levels, size = len(common.ints(cfg, 'ch_mult')), common.image_shape(cfg)[1]
    if size % 2 ** (levels - 1):
        common.fail(f'{size}x{size} images cannot be halved {levels - 1} times: shorten --ch-mult')
    if cfg.batch_size % world:
        common.fail(f'--batch-size {cfg.batch_size} must be divisible by the {world} processes')
    if cfg.class_cond and cfg.dataset not in common.DATASETS:
        common.fail('--class-cond 1 needs a labelled dataset (mnist, fashion-mnist, cifar10): an .npz has no labels')
    if cfg.T < 2 or cfg.ch % 4 or (cfg.fid_every and cfg.fid_samples < 2):
        common.fail(f'--T {cfg.T} must be >= 2, --ch {cfg.ch} a multiple of 4 and --fid-samples at least 2')
    if not -1 <= cfg.label < NUM_CLASSES:
        common.fail(f'--label {cfg.label}: a class 0..{NUM_CLASSES - 1}, or -1 to cycle through them')


def train(cfg):
    device, rank, world = common.setup(cfg.device)
    check(cfg, world)
    out, cuda = Path(cfg.out), 'cuda' in device
    if rank == 0:
        common.claim(out)  # one run per folder: a second one gets a clear error, not a mixed-up checkpoint
    x, y = common.load_dataset(cfg.dataset, 'train', cfg.data_dir or None)
    if cfg.fid_every and rank == 0:  # the Inception network and the reference statistics up front: errors come first
        import eval_fid
        scorer = eval_fid.run_scorer(cfg.fid_ref, cfg.dataset, x, device)
    x, y = x.to(device), (y.to(device) if cfg.class_cond else None)  # the whole uint8 dataset lives on the device
    shape = tuple(x.shape[1:])
    torch.manual_seed(cfg.seed)  # the same initial weights on every rank and every run
    model = make_model(cfg, shape[0], shape[1]).to(device, memory_format=torch.channels_last if cuda else
                                                   torch.preserve_format)  # NHWC: faster convolutions on tensor cores
    ema = copy.deepcopy(model).requires_grad_(False).eval()  # eval: sampling never uses dropout, on any rank
    opt = torch.optim.AdamW(model.parameters(), lr=cfg.lr, weight_decay=cfg.weight_decay, fused=cuda or None)
    if ckpt := common.resume(out, 'ddpm', cfg, MODEL_KEYS, RECIPE_KEYS):
        model.load_state_dict(ckpt['model']), ema.load_state_dict(ckpt['ema']), common.load_opt(opt, ckpt['opt'])
    n = sum(p.numel() for p in model.parameters())
    common.print0(f'{cfg.dataset} {tuple(x.shape)} on {device} x{world} | U-Net {n:,} parameters | steps '
                  f'{ckpt["step"] if ckpt else 0} -> {cfg.steps}')
    ab = make_alpha_bar(cfg.schedule, cfg.T).float().to(device)
    torch.backends.cudnn.benchmark = True  # fixed shapes: let cuDNN pick its fastest convolutions once
    net = torch.compile(model) if cfg.compile and cuda else model
    ema_net = torch.compile(ema) if cfg.compile and cuda else ema  # sampling runs the EMA network T times per image
    if world > 1:
        net = nn.parallel.DistributedDataParallel(net, device_ids=[device] if cuda else None)
    amp = torch.autocast('cuda', torch.bfloat16) if cfg.bf16 and cuda else nullcontext()
    params, ema_params = list(model.parameters()), list(ema.parameters())

    def save(step, clock):  # the loop calls it every --ckpt-every steps, at the end, before outputs, on Ctrl-C
        common.save_ckpt(out / 'ckpt.pt', dict(script='ddpm', model=model.state_dict(), ema=ema.state_dict(), step=step,
                                               opt=opt.state_dict(), clock=clock, config=dataclasses.asdict(cfg)))

    start, clock = (ckpt['step'], ckpt.get('clock', 0.0)) if ckpt else (0, 0.0)
    with common.Loop(cfg, out, save, start, clock=clock, sample=cfg.sample_every, fid=cfg.fid_every) as loop:
        for step in loop:
            for group in opt.param_groups:
                group['lr'] = cfg.lr * min(1.0, (step + 1) / cfg.warmup)
            x0, yb = common.random_batch(x, y, cfg.batch_size // world, cfg.flip)
            with amp:
                loss = loss_fn(net, x0, yb, ab, cfg.objective, cfg.loss, cfg.p_uncond)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            nn.utils.clip_grad_norm_(params, cfg.grad_clip)
            opt.step()
            with torch.no_grad():  # EMA with a warm-up, so short runs are not dominated by the random init
                torch._foreach_lerp_(ema_params, params, 1 - min(cfg.ema, (1 + step) / (10 + step)))
            loop.log(loss=loss)
            if loop.due('sample') and rank == 0:  # the same x_T every time, so grids compare across training
                n = 100 if cfg.class_cond else 64
                grid = draw(ema_net, cfg, shape, 0, n, torch.Generator(device).manual_seed(cfg.seed))
                common.save_grid(grid, out / f'samples_{loop.done:07d}.png', nrow=10 if cfg.class_cond else 8)
            if cfg.fid_every and loop.due('fid'):
                x_fid = common.sample_many(partial(draw, ema_net, cfg, shape), cfg.fid_samples, cfg.sample_batch,
                                           cfg.seed, device, rank, world, desc='FID samples')
                if rank == 0:
                    loop.write(f'fid{cfg.fid_samples} {scorer(x_fid):.4f}')
    return model, loop.last.get('loss')


# -----------------------------------------------------------------------------
# Sampling from a checkpoint


def sample_from_checkpoint(cfg):
    device, rank, world = common.setup(cfg.device)
    out = Path(cfg.out)
    model, trained = load_model(out / 'ckpt.pt')
    if not trained.class_cond and (cfg.label >= 0 or cfg.guidance != 1):
        common.fail(f'--label / --guidance: {out}/ckpt.pt is unconditional (trained without --class-cond 1)')
    if rank == 0:
        common.claim(out)  # not into a folder that a training run (or another sampler) is writing
    model = model.to(device)
    mcfg = dataclasses.replace(cfg, **{k: getattr(trained, k) for k in MODEL_KEYS})  # the model's own settings
    shape = common.image_shape(mcfg)
    x = common.sample_many(partial(draw, model, mcfg, shape), cfg.n_samples, cfg.sample_batch, cfg.seed, device, rank,
                           world, keep=common.keep_dir(out, 'samples', cfg, out / 'ckpt.pt'))
    if rank == 0:
        common.write_samples(x, out, 'samples', cfg.save)
        snaps = []  # the reverse process of 8 samples at 0/25/50/75/100% of the steps
        draw(model, mcfg, shape, 0, 8, torch.Generator(device).manual_seed(cfg.seed), snaps)
        common.save_grid(common.to_uint8(torch.stack(snaps, 1).flatten(0, 1).clamp(-1, 1)), out / 'reverse.png', 5)
        print(f'reverse process: {out}/reverse.png (rows: 8 samples; columns: x_t at t = T, 3T/4, T/2, T/4, 0)')


def main(argv=None):
    cfg = common.parse_config(Config, PRESETS, argv=argv)
    cfg = dataclasses.replace(cfg, out=cfg.out or f'runs/ddpm-{Path(cfg.dataset).name}')
    with common.script_guard():  # (check first: a bad --dataset is one clear line too)
        check(cfg)
        return dict(train=train, sample=sample_from_checkpoint)[cfg.mode](cfg)


if __name__ == '__main__':
    main()
