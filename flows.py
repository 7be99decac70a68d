"""RealNVP (Dinh, Sohl-Dickstein & Bengio 2017, arXiv:1605.08803): an invertible network f made of affine coupling
layers, trained by exact maximum likelihood through the change of variables log p(x) = log p_Z(f(x)) + log|det df/dx|
(eq. 3), and sampled by running f^-1 on Gaussian noise.

    python flows.py --dataset moons                     # two moons: data, learned density p(x), samples; held-out NLL
    python flows.py --dataset mnist                     # multi-scale RealNVP: test bits/dim, grids at T = 1.0 and 0.7
    python flows.py --dataset mnist --device cpu        # the CPU run of the README (test bits/dim, ~16 min)
    torchrun --standalone --nproc_per_node=8 flows.py --dataset cifar10 --fid-every 50000
    python flows.py --mode sample --out runs/flows-mnist --n-samples 10000 --temperature 0.7   # PNGs + .npz
    python flows.py --mode bench --dataset cifar10      # training img/s and peak memory

Measured (2 CPU cores, x86-64 VM, torch 2.13.0+cpu): moons held-out NLL 0.307 nats/point, 0.12% of the mass off the
moons, in 77 s; MNIST CPU preset, 4000 steps: test 1.181 bits/dim (all 10,000 test images) in 16 min (README: the
target is <= 1.5; alpha = 1e-6 instead of RealNVP's 0.05 is what got there). Bits/dim are of the dequantised pixels
x = k + u in [0, 256)^D, u ~ U[0, 1)^D, one noise draw per test image (see bits_per_dim). Act-norm (Glow) stands in
for the paper's batch norm: it is exact under --resume and its log-det is a closed form. Defaults follow the paper's
structure; on a CPU the nets shrink (PRESETS). Flags beat presets.
"""
import dataclasses, json, math, resource, time
from contextlib import nullcontext
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn as nn
from tqdm import tqdm

import common


@dataclass
class Config:
    mode: str = 'train'  # train (then test NLL, samples) | sample (from the checkpoint in --out) | bench
    dataset: str = 'mnist'  # moons | mnist | fashion-mnist | cifar10 | cifar10-subset | path of an image folder
    data_dir: str = ''  # folder with the official archives (default $GENMODELS_DATA, else ./data; fetched if missing)
    image_size: int = 32  # image folders only: shorter side resized to this, then centre-cropped
    out: str = ''  # run folder for checkpoint, grids and logs (default runs/flows-<dataset>)
    device: str = 'auto'  # auto | cuda | cpu | mps
    seed: int = 0  # all training randomness is a function of (seed, rank, step)
    # model
    ch: int = 64  # channels of each s/t ResNet (hidden units of each s/t MLP for moons)
    blocks: int = 8  # residual blocks per s/t ResNet (hidden layers per s/t MLP for moons)
    scales: int = 3  # images: each scale but the last is 3 checkerboard couplings, squeeze, 3 channel-wise, split
    couplings: int = 16  # moons: affine couplings with alternating masks
    alpha: float = 0.05  # logit pre-processing y = logit(alpha + (1 - 2 alpha) x / 256), RealNVP sec. 4.1; MNIST: 1e-6
    # training
    steps: int = 100000  # optimizer steps
    batch_size: int = 64  # global batch, split evenly across ranks
    lr: float = 1e-3  # Adam learning rate
    warmup: int = 1000  # linear learning-rate warm-up steps, then a cosine decay to 0 at --steps
    grad_clip: float = 100.0  # max global gradient norm
    flip: bool = False  # random horizontal flips
    compile: bool = True  # torch.compile the flow for training (CUDA only)
    resume: bool = False  # continue from --out/ckpt.pt (a finished run just evaluates and samples again)
    log_every: int = 100  # steps between log lines
    ckpt_every: int = 5000  # steps between checkpoints (also at the end and on Ctrl-C / SIGTERM)
    sample_every: int = 10000  # steps between test NLLs and sample grids (0: only at the end)
    eval_images: int = 0  # test images (points for moons) per evaluation (0: the whole test split)
    fid_every: int = 0  # steps between FIDs of --fid-samples samples at T = 1 vs the training set (0: off)
    fid_samples: int = 10000
    # sampling
    temperature: float = 1.0  # --mode sample: z ~ N(0, T^2 I); T < 1 trades diversity for quality (Glow sec. 5)
    n_samples: int = 64  # --mode sample: number of images
    sample_batch: int = 500  # images per sampling / evaluation batch
    save: str = 'png,npz'  # --mode sample: png (a folder of PNGs) and/or npz (uint8 (N, H, W, C))


PRESETS = {  # applied below explicit flags; keyed by dataset, then 'cpu' on top for image datasets on a CPU
    'moons': dict(ch=128, blocks=2, steps=5000, batch_size=256, warmup=100, log_every=500, ckpt_every=5000,
                  sample_every=0, sample_batch=5000),
    'mnist': dict(scales=3, alpha=1e-6),  # MNIST's saturated pixels want a small alpha (MAF's 1e-6), see README
    'cifar10': dict(scales=3, flip=True),
    'cpu': dict(ch=32, blocks=2, steps=4000, batch_size=64, lr=2e-3, warmup=200, log_every=100, ckpt_every=1000,
                sample_every=0, compile=False),
}
PRESETS['fashion-mnist'], PRESETS['cifar10-subset'] = PRESETS['mnist'], PRESETS['cifar10']
MODEL_KEYS = ('dataset', 'image_size', 'ch', 'blocks', 'scales', 'couplings', 'alpha')


def presets(values):
    p = dict(PRESETS.get(values['dataset'], {}))
    if values['dataset'] != 'moons' and common.resolve_device(values['device']) == 'cpu':
        p.update(PRESETS['cpu'])
    return p


# -----------------------------------------------------------------------------
# Data and the likelihood: two moons, dequantisation, logit pre-processing, bits/dim


def two_moons(n, generator, noise=0.05):
    """n points on two interleaved half circles plus Gaussian noise (what scikit-learn's make_moons draws)."""
    theta = math.pi * torch.rand(n, generator=generator)
    upper = torch.rand(n, generator=generator) < 0.5
    x1 = torch.where(upper, theta.cos(), 1 - theta.cos())
    x2 = torch.where(upper, theta.sin(), 0.5 - theta.sin())
    return torch.stack([x1, x2], 1) + noise * torch.randn(n, 2, generator=generator)


def load(cfg, split):
    """moons: float (N, 2), 20k train / 5k held-out points fixed by --seed; images: uint8 (N, C, H, W)."""
    if cfg.dataset == 'moons':
        g = torch.Generator().manual_seed(2 * cfg.seed + (split == 'test'))
        return two_moons(20000 if split == 'train' else 5000, g)
    x = common.load_dataset(cfg.dataset, split, cfg.data_dir or None, cfg.image_size)[0]
    if cfg.dataset not in common.DATASETS:  # an image folder has no test split: hold out its last 10%
        cut = len(x) - max(1, len(x) // 10)
        x = x[:cut] if split == 'train' else x[cut:]
    return x


def dequantise(x, generator=None):
    """uint8 pixels k -> x = k + u, u ~ U[0, 1)^D: a continuous density on [0, 256)^D (Theis et al. 2016)."""
    return x.float() + torch.rand(x.shape, generator=generator, device=x.device)


def logit_preprocess(x, alpha):
    """x in [0, 256)^D -> y = logit(p), p = alpha + (1 - 2 alpha) x / 256, and log|det dy/dx| per image.
    RealNVP sec. 4.1 writes alpha + (1 - alpha) x; the symmetric form keeps both ends away from 0 and 1."""
    p = alpha + (1 - 2 * alpha) * x / 256
    q = alpha + (1 - 2 * alpha) * (256 - x) / 256  # = 1 - p without fp32's cancellation near p = 1 (alpha = 1e-6)
    y = p.log() - q.log()
    # dy/dx = (1 - 2 alpha) / (256 p (1 - p)) per pixel; its 1/256 is what makes this a density of x in [0, 256)^D
    # rather than of x / 256 in [0, 1)^D: log p(x) = log p(x / 256) - D log 256, i.e. 8 bits/dim
    logdet = (math.log((1 - 2 * alpha) / 256) - p.log() - q.log()).flatten(1).sum(1)
    return y, logdet


def log_prob(flow, x, alpha):
    """log p(x) in nats per example: moons points (B, 2) or dequantised images (B, C, H, W) in [0, 256)."""
    logdet = 0
    if x.dim() == 4:
        x, logdet = logit_preprocess(x.contiguous(memory_format=torch.channels_last), alpha)
    zs, ld = flow(x)
    # change of variables (eq. 3): log p_X(x) = log p_Z(f(x)) + log|det df/dx|, p_Z = N(0, I) over every factored z
    log_pz = sum(-0.5 * (z ** 2 + math.log(2 * math.pi)).flatten(1).sum(1) for z in zs)
    return log_pz + ld + logdet


def nll(flow, x, alpha):
    """The training loss per example: nats for moons; bits/dim for images (see bits_per_dim)."""
    return -log_prob(flow, x, alpha) / (1 if x.dim() == 2 else x[0].numel() * math.log(2))


# bits/dim: with k in {0..255}^D and x = k + u, Jensen gives log P(k) >= E_u log p(k + u), so -log p(x) / (D ln 2)
# over dequantised test images upper-bounds the discrete code length. p is the density of x on [0, 256)^D, so the
# 1/256 of the pixel scaling sits inside log|det dy/dx| (logit_preprocess); a density of x/256 on [0, 1)^D would
# read exactly 8 bits/dim lower, and nats per image are D ln 2 times larger (784 ln 2 = 543 for MNIST).
@torch.no_grad()
def bits_per_dim(flow, x, cfg, rank=0, world=1):
    """Mean test NLL over x: bits/dim of dequantised images (noise seeded per batch) or nats per moons point."""
    total = torch.zeros((), dtype=torch.float64, device=x.device)
    starts = range(0, len(x), cfg.sample_batch)
    for i in tqdm(starts[rank::world], desc='test NLL', disable=rank != 0 or len(starts) < 4, leave=False):
        xb = x[i:i + cfg.sample_batch]
        if xb.dim() == 4:
            xb = dequantise(xb, torch.Generator(x.device).manual_seed(cfg.seed * 1_000_003 + i))
        total += nll(flow, xb, cfg.alpha).double().sum()
    if world > 1:
        torch.distributed.all_reduce(total)
    return total.item() / len(x)


# -----------------------------------------------------------------------------
# The flow: act-norm, affine coupling, squeeze, and the multi-scale stack. Each layer maps data -> latent in forward,
# returning (y, log|det dy/dx| per example), and back in inverse.


class ActNorm(nn.Module):
    """Glow's act-norm (Kingma & Dhariwal 2018, sec. 3.1): y = x exp(logs) + b per channel; log|det| = HW sum logs."""

    def __init__(self, C):
        super().__init__()
        self.logs, self.b = nn.Parameter(torch.zeros(C)), nn.Parameter(torch.zeros(C))
        self.init = False  # set by data_init: the next forward sets logs, b so its outputs have zero mean, unit var

    def forward(self, x):
        view = (1, -1) + (1,) * (x.dim() - 2)  # per channel, for (B, C) and (B, C, H, W)
        if self.init:
            dims = [0] + list(range(2, x.dim()))
            self.logs.data = -x.std(dims).clamp(min=1e-3).log()
            self.b.data = -x.mean(dims) * self.logs.exp()
            self.init = False
        return x * self.logs.exp().view(view) + self.b.view(view), (self.logs.sum() * x[0, 0].numel()).expand(len(x))

    def inverse(self, y):
        view = (1, -1) + (1,) * (y.dim() - 2)
        return (y - self.b.view(view)) * (-self.logs).exp().view(view)


class Coupling(nn.Module):
    """Affine coupling with a binary mask b (eq. 9): y = b x + (1 - b) (x exp(s(b x)) + t(b x)). Positions with b = 1
    (x_a) pass unchanged and feed s, t; the rest (x_b) are scaled and shifted. The Jacobian is triangular (eq. 6), so
    log|det dy/dx| = sum_j (1 - b)_j s_j(b x) (eq. 7). s = scale * tanh(.) is bounded, which keeps exp(s) tame."""

    def __init__(self, mask, net, C):
        super().__init__()
        self.register_buffer('mask', mask)  # (1, 2) | (1, 1, H, W) checkerboard | (1, C, 1, 1) channel-wise
        self.net = net
        self.scale = nn.Parameter(torch.ones((1, C) + (1, 1) * (mask.dim() == 4)))  # per channel

    def st(self, x):
        xa = x * self.mask  # (B, C, H, W); for images the mask itself is an extra input channel
        h = self.net(xa if x.dim() == 2 else torch.cat([xa, self.mask.expand_as(x)[:, :1]], 1))
        s, t = h.chunk(2, 1)
        return (1 - self.mask) * self.scale * torch.tanh(s), (1 - self.mask) * t

    def forward(self, x):
        s, t = self.st(x)
        return x * s.exp() + t, s.flatten(1).sum(1)  # eq. 7: log|det J| = sum s over the transformed half

    def inverse(self, y):
        s, t = self.st(y)  # y_a = x_a, so s and t are recomputed exactly from y (eq. 8)
        return (y - t) * (-s).exp()


class Squeeze(nn.Module):
    """(B, C, H, W) -> (B, 4C, H/2, W/2), each 2x2 block of pixels becoming 4 channels (sec. 3.6, fig. 3)."""

    def forward(self, x):
        B, C, H, W = x.shape
        y = x.view(B, C, H // 2, 2, W // 2, 2).permute(0, 1, 3, 5, 2, 4).reshape(B, 4 * C, H // 2, W // 2)
        return y, x.new_zeros(B)  # a permutation: log|det| = 0

    def inverse(self, y):
        B, C, H, W = y.shape
        return y.view(B, C // 4, 2, 2, H, W).permute(0, 1, 4, 2, 5, 3).reshape(B, C // 4, 2 * H, 2 * W)


class ResNet(nn.Module):
    """The s/t network of an image coupling: 3x3 conv in, residual blocks, 3x3 conv out to (s, t). The last convs start
    at zero, so every block starts as the identity and every coupling as y = x."""

    def __init__(self, cin, ch, cout, blocks):
        super().__init__()
        self.conv_in, self.conv_out = nn.Conv2d(cin, ch, 3, padding=1), nn.Conv2d(ch, cout, 3, padding=1)
        self.blocks = nn.ModuleList(nn.Sequential(nn.ReLU(), nn.Conv2d(ch, ch, 3, padding=1), nn.ReLU(),
                                                  nn.Conv2d(ch, ch, 1)) for _ in range(blocks))
        for conv in [self.conv_out] + [b[3] for b in self.blocks]:
            nn.init.zeros_(conv.weight)
            nn.init.zeros_(conv.bias)

    def forward(self, x):
        h = self.conv_in(x)
        for block in self.blocks:
            h = h + block(h)
        return self.conv_out(torch.relu(h))


def mlp(ch, layers):
    """The s/t network of a moons coupling: 2 -> ch (x layers) -> (s, t); zero last layer, so y = x at first."""
    net = nn.Sequential(nn.Linear(2, ch), *[m for _ in range(layers - 1) for m in (nn.ReLU(), nn.Linear(ch, ch))],
                        nn.ReLU(), nn.Linear(ch, 4))
    nn.init.zeros_(net[-1].weight)
    nn.init.zeros_(net[-1].bias)
    return net


class Flow(nn.Module):
    """Layers grouped by scale; after each scale but the last, half the channels leave as z (sec. 3.6)."""

    def __init__(self, scales):
        super().__init__()
        self.scales = nn.ModuleList(nn.ModuleList(layers) for layers in scales)

    def forward(self, x):  # x -> ([z per scale], log|det df/dx| per example)
        zs, logdet = [], 0
        for i, scale in enumerate(self.scales):
            for layer in scale:
                x, ld = layer(x)
                logdet = logdet + ld
            if i < len(self.scales) - 1:
                z, x = x.chunk(2, 1)
                zs.append(z)
        return zs + [x], logdet

    def inverse(self, zs):
        x = zs[-1]
        for i in reversed(range(len(self.scales))):
            if i < len(self.scales) - 1:
                x = torch.cat([zs[i], x], 1)
            for layer in reversed(self.scales[i]):
                x = layer.inverse(x)
        return x


def make_flow(cfg, shape):
    """moons: act-norm + coupling pairs, masks alternating. Images: RealNVP's multi-scale stack (sec. 3.6), act-norm
    before every coupling; the last scale is 4 checkerboard couplings."""
    if len(shape) == 1:
        masks = torch.tensor([[1.0, 0.0]]), torch.tensor([[0.0, 1.0]])
        return Flow([[m for k in range(cfg.couplings)
                      for m in (ActNorm(2), Coupling(masks[k % 2], mlp(cfg.ch, cfg.blocks), 2))]])
    C, H, W = shape
    step = lambda mask, C: [ActNorm(C), Coupling(mask, ResNet(C + 1, cfg.ch, 2 * C, cfg.blocks), C)]
    checker = lambda H, W, k: ((torch.arange(H)[:, None] + torch.arange(W) + k) % 2).float().view(1, 1, H, W)
    scales = []
    for i in range(cfg.scales):
        last = i == cfg.scales - 1
        layers = [m for k in range(4 if last else 3) for m in step(checker(H, W, k), C)]
        if not last:
            layers.append(Squeeze())
            C, H, W = 4 * C, H // 2, W // 2
            half = lambda k: (torch.arange(C) % 2 == k).float().view(1, C, 1, 1)  # left / right column of each block
            layers += [m for k in range(3) for m in step(half(k % 2), C)]
            C //= 2  # the other half is factored out
        scales.append(layers)
    return Flow(scales).to(memory_format=torch.channels_last)  # NHWC convolutions: 1.1-1.4x the img/s of NCHW on a CPU


@torch.no_grad()
def data_init(flow, x, alpha):
    """Act-norm's data-dependent init (Glow sec. 3.1): each act-norm's outputs start standardised on batch x."""
    for m in flow.modules():
        if isinstance(m, ActNorm):
            m.init = True
    log_prob(flow, x, alpha)


def image_shape(cfg):
    if cfg.dataset == 'moons':
        return (2,)
    return common.image_shape(cfg)


# -----------------------------------------------------------------------------
# Sampling and figures


@torch.no_grad()
def sample(flow, n, shape, cfg, temperature, generator):
    """x = f^-1(z), z ~ N(0, T^2 I) at every scale; moons points as floats, images as uint8 pixels floor(x)."""
    device = next(flow.parameters()).device
    zs = [temperature * torch.randn(n, *z.shape[1:], generator=generator, device=device)
          for z in flow(torch.zeros(1, *shape, device=device))[0]]
    x = flow.inverse(zs)
    if len(shape) == 1:
        return x
    pixels = (torch.sigmoid(x) - cfg.alpha) / (1 - 2 * cfg.alpha) * 256  # logit_preprocess undone
    return pixels.nan_to_num().floor().clamp(0, 255).to(torch.uint8)


def grid_points(lim, n):
    """The n x n points of a grid over lim = (x_lo, x_hi, y_lo, y_hi), (n * n, 2) row by row along y; a cell's area."""
    xs, ys = torch.linspace(lim[0], lim[1], n), torch.linspace(lim[2], lim[3], n)
    points = torch.stack(torch.meshgrid(xs, ys, indexing='xy'), -1).view(-1, 2)
    return points, ((xs[1] - xs[0]) * (ys[1] - ys[0])).item()


@torch.no_grad()
def density_grid(flow, lim, n):
    """p(x) on grid_points(lim, n): (p (n, n), rows along y; the area of one cell)."""
    points, area = grid_points(lim, n)
    return log_prob(flow, points.to(next(flow.parameters()).device), 0).exp().view(n, n).cpu(), area


def moons_distance(x):
    """Distance of points (N, 2) to the nearer of the two noiseless half circles two_moons draws from."""
    def arc(q, upper):  # distance to the unit half circle above (upper) or below the x axis of q's frame
        on_side = q[:, 1] >= 0 if upper else q[:, 1] <= 0
        ends = torch.stack([(q - torch.tensor([e, 0.0])).norm(dim=1) for e in (-1.0, 1.0)]).amin(0)
        return torch.where(on_side, (q.norm(dim=1) - 1).abs(), ends)
    return torch.minimum(arc(x, True), arc(x - torch.tensor([1.0, 0.5]), False))


def moons_figure(flow, x_test, test_nll, cfg, path):
    """The figure, and the model's probability mass off the moons: farther than 0.25 (5 noise sigmas) from both arcs,
    where the data has none (a Gaussian puts 4e-6 of its mass beyond 5 sigma)."""
    plt = common.pyplot()
    lim = (-1.5, 2.5, -1.0, 1.5)
    p, area = density_grid(flow, lim, 300)
    off = (p.view(-1) * (moons_distance(grid_points(lim, 300)[0]) > 0.25)).sum().item() * area
    xs = sample(flow, 2000, (2,), cfg, 1.0, torch.Generator(x_test.device).manual_seed(cfg.seed)).cpu()
    fig, ax = plt.subplots(1, 3, figsize=(13, 3.6))
    ax[0].scatter(*x_test[:2000].cpu().numpy().T, s=2, label='held-out points')
    im = ax[1].imshow(p.numpy(), extent=lim, origin='lower', aspect='auto', cmap='magma')
    fig.colorbar(im, ax=ax[1], label='p(x)')
    ax[2].scatter(*xs.numpy().T, s=2, color='C1', label='x = f^-1(z), z ~ N(0, I)')
    titles = ('data (held-out)', f'learned density (sum p dA = {p.sum() * area:.3f}; held-out NLL {test_nll:.3f} nats;'
              f'\n{100 * off:.2f}% of the mass > 0.25 from both moons)', 'samples')
    for a, title in zip(ax, titles):
        a.set(title=title, xlabel='x1 (data units)', ylabel='x2 (data units)', xlim=lim[:2], ylim=lim[2:])
    ax[0].legend(loc='lower left', markerscale=4)
    ax[2].legend(loc='lower left', markerscale=4)
    fig.savefig(path)
    plt.close(fig)
    return off


def sample_many(flow, n, shape, cfg, temperature, seed, desc='sampling'):
    """n images in batches of --sample-batch, from one generator seeded with seed."""
    g = torch.Generator(next(flow.parameters()).device).manual_seed(seed)
    return torch.cat([sample(flow, min(cfg.sample_batch, n - i), shape, cfg, temperature, g)
                      for i in tqdm(range(0, n, cfg.sample_batch), desc=desc, disable=n <= cfg.sample_batch)])


def grids(flow, shape, cfg, out, tag=''):
    """64 samples at T = 1.0 and 0.7 from the same fixed z (scaled), comparable across training."""
    for T in (1.0, 0.7):
        common.save_grid(sample_many(flow, 64, shape, cfg, T, cfg.seed), out / f'samples{tag}_T{T}.png', nrow=8)


# -----------------------------------------------------------------------------
# Training


def check(cfg, world=1):
    if cfg.mode not in ('train', 'sample', 'bench'):
        common.fail(f'--mode {cfg.mode!r} is not one of: train, sample, bench')
    common.check_ranges(cfg, positive=('ch', 'blocks', 'scales', 'couplings', 'steps', 'batch_size', 'lr', 'warmup',
                                       'grad_clip', 'log_every', 'ckpt_every', 'temperature', 'n_samples',
                                       'sample_batch', 'fid_samples'),
                        nonnegative=('sample_every', 'eval_images', 'fid_every'))
    if not 0 < cfg.alpha < 0.5:
        common.fail(f'--alpha {cfg.alpha} must be in (0, 0.5)')
    size = common.DATASETS.get(cfg.dataset, {}).get('size', cfg.image_size)
    if cfg.dataset != 'moons' and size % 2 ** (cfg.scales - 1):
        common.fail(f'{size}x{size} images cannot be squeezed {cfg.scales - 1} times: lower --scales')
    if cfg.batch_size % world:
        common.fail(f'--batch-size {cfg.batch_size} must be divisible by the {world} processes')
    if cfg.dataset == 'moons' and cfg.fid_every:
        common.fail('--fid-every needs an image dataset')


def train(cfg):
    device, rank, world = common.setup(cfg.device)
    check(cfg, world)
    out = Path(cfg.out)
    x, x_test = load(cfg, 'train').to(device), load(cfg, 'test').to(device)
    x_test = x_test[:cfg.eval_images or len(x_test)]
    shape = tuple(x.shape[1:])
    torch.manual_seed(cfg.seed)  # the same initial weights and act-norm batch on every rank and every run
    flow = make_flow(cfg, shape).to(device)
    opt = torch.optim.Adam(flow.parameters(), lr=cfg.lr)
    if rank == 0:
        common.claim(out)
    start = 0
    if cfg.resume:
        ckpt = common.load_ckpt(out / 'ckpt.pt', 'flows')
        common.check_resume(ckpt, cfg, MODEL_KEYS)
        flow.load_state_dict(ckpt['model'])
        opt.load_state_dict(ckpt['opt'])
        start = ckpt['step']
        if start >= cfg.steps:
            common.print0(f'{out}/ckpt.pt is at step {start} >= --steps {cfg.steps}: evaluating and sampling only')
    elif (out / 'ckpt.pt').exists():
        common.fail(f'{out}/ckpt.pt exists: pass --resume 1 to continue it, or another --out')
    else:
        data_init(flow, x[torch.randint(len(x), (512,), device=device)] if x.dim() == 2 else
                  dequantise(x[torch.randint(len(x), (512,), device=device)]), cfg.alpha)
    common.print0(f'{cfg.dataset} {tuple(x.shape)} on {device} x{world} | flow '
                  f'{sum(p.numel() for p in flow.parameters()) / 1e6:.2f}M parameters | steps {start} -> {cfg.steps}')
    if rank == 0:
        (out / 'config.json').write_text(json.dumps(dataclasses.asdict(cfg), indent=1))
    cuda = 'cuda' in device
    net = torch.compile(flow) if cfg.compile and cuda else flow
    if world > 1:
        net = nn.parallel.DistributedDataParallel(net, device_ids=[device] if cuda else None)
    scorer = None
    if cfg.fid_every and rank == 0:
        import eval_fid  # only runs that ask for FID pay for the Inception network
        scorer = eval_fid.Scorer(f'{cfg.dataset}:train', device,  # an image folder: its training images, in memory
                                 images=None if cfg.dataset in common.DATASETS else x.cpu())
    unit = 'nats' if x.dim() == 2 else 'bits/dim'

    def save(step):
        if rank == 0:
            common.save_ckpt(out / 'ckpt.pt', dict(script='flows', model=flow.state_dict(), opt=opt.state_dict(),
                                                   step=step, config=dataclasses.asdict(cfg)))

    def stopped(step):
        save(step)
        common.print0(f'\nstopped at step {step}; checkpoint saved to {out}/ckpt.pt (continue with --resume 1)')
        raise SystemExit(130)

    def report(step, final=False):  # test NLL, then grids (or the moons figure) and FID
        test = bits_per_dim(flow, x_test, cfg, rank, world)
        line = f'step {step} | test {unit} {test:.4f} ({len(x_test)} test {"points" if x.dim() == 2 else "images"})'
        if rank == 0:
            if x.dim() == 2 and final:
                line += f' | mass off the moons {100 * moons_figure(flow, x_test, test, cfg, out / "moons.png"):.2f}%'
            elif x.dim() == 4 and (final or (cfg.sample_every and step % cfg.sample_every == 0)):
                grids(flow, shape, cfg, out, '' if final else f'_{step:07d}')
            if scorer and (final or step % cfg.fid_every == 0):
                x_fid = sample_many(flow, cfg.fid_samples, shape, cfg, 1.0, cfg.seed + 1, 'FID samples')
                line += f' | fid{cfg.fid_samples} {scorer(x_fid):.4f}'
            print(line, file=log, flush=True)
        common.print0('\n' + line)

    with common.stop_requested() as stop, open(out / 'log.txt', 'a') if rank == 0 else nullcontext() as log:
        t0, last, done = time.perf_counter(), start, start
        pbar = tqdm(total=cfg.steps, initial=start, disable=rank != 0, dynamic_ncols=True)
        for step in range(start, cfg.steps):
            torch.manual_seed((cfg.seed * 1000 + rank) * 10 ** 9 + step)  # batch and dequantisation: exact on resume
            for group in opt.param_groups:
                decay = (1 + math.cos(math.pi * step / cfg.steps)) / 2
                group['lr'] = cfg.lr * min(1.0, (step + 1) / cfg.warmup) * decay
            xb = x[torch.randint(len(x), (cfg.batch_size // world,), device=device)]
            if x.dim() == 4:
                xb = dequantise(xb)
                if cfg.flip:
                    xb = torch.where(torch.rand(len(xb), 1, 1, 1, device=device) < 0.5, xb.flip(3), xb)
            loss = nll(net, xb, cfg.alpha).mean()
            opt.zero_grad(set_to_none=True)
            loss.backward()
            gnorm = nn.utils.clip_grad_norm_(flow.parameters(), cfg.grad_clip)
            opt.step()
            pbar.update()
            done = step + 1
            logged = done % cfg.log_every == 0 or done == cfg.steps
            if world > 1 and logged:  # ranks agree on stopping at log steps, so none waits in a collective forever
                flag = torch.tensor(float(bool(stop)), device=device)
                torch.distributed.all_reduce(flag, torch.distributed.ReduceOp.MAX)
                stop[:] = [1] * bool(flag)
            halt = bool(stop) and (world == 1 or logged)
            if logged or halt or done % cfg.ckpt_every == 0:
                lossf = loss.item()
                if not math.isfinite(lossf):
                    common.fail(f'loss is {lossf} at step {done}: the last good checkpoint {out}/ckpt.pt is kept; '
                                f'lower --lr or --grad-clip, or check the data')
            if logged:
                dt = time.perf_counter() - t0
                ips = (done - last) * cfg.batch_size / dt
                pbar.set_postfix(loss=f'{lossf:.4f}', img_s=f'{ips:.0f}')
                if log:
                    print(f'step {done} | loss {lossf:.4f} {unit} | grad norm {gnorm.item():.3g} | '
                          f'{1000 * dt / (done - last):.1f} ms/step | {ips:.0f} img/s', file=log, flush=True)
                t0, last = time.perf_counter(), done
            if halt or done % cfg.ckpt_every == 0 or done == cfg.steps:
                save(done)
            if halt:
                stopped(done)
            if done < cfg.steps and any(e and done % e == 0 for e in (cfg.sample_every, cfg.fid_every)):
                try:
                    with stop.now():  # a signal while evaluating or sampling stops at once, with a checkpoint
                        report(done)
                except KeyboardInterrupt:
                    stopped(done)
                t0 = time.perf_counter()
        pbar.close()
        with stop.now():  # the checkpoint of the last step is saved: a signal here just ends the run
            report(done, final=True)
    return flow, lossf if start < cfg.steps else None


# -----------------------------------------------------------------------------
# Modes


def sample_from_checkpoint(cfg):
    device, rank, _ = common.setup(cfg.device)
    ckpt = common.load_ckpt(Path(cfg.out) / 'ckpt.pt', 'flows')
    mcfg = dataclasses.replace(cfg, **{k: ckpt['config'][k] for k in MODEL_KEYS})  # the checkpoint's model settings
    if mcfg.dataset == 'moons':
        common.fail(f'{cfg.out} holds a moons flow: its samples are in {cfg.out}/moons.png')
    shape = image_shape(mcfg)
    flow = make_flow(mcfg, shape).to(device)
    flow.load_state_dict(ckpt['model'])
    if rank == 0:  # under torchrun the other ranks have nothing to do
        x = sample_many(flow, cfg.n_samples, shape, mcfg, cfg.temperature, cfg.seed)
        common.write_samples(x, cfg.out, f'samples_T{cfg.temperature}', cfg.save)
        print(f'{cfg.n_samples} samples at T = {cfg.temperature} -> {cfg.out}/samples_T{cfg.temperature}.npz, .png')


def bench(cfg, steps=20):
    """Training steps at --batch-size on random pixels (points for moons): img/s and peak memory."""
    device, _, _ = common.setup(cfg.device)
    cuda, shape = 'cuda' in device, image_shape(cfg)
    flow = make_flow(cfg, shape).to(device)
    opt = torch.optim.Adam(flow.parameters(), lr=cfg.lr)
    net = torch.compile(flow) if cfg.compile and cuda else flow
    x = torch.rand(cfg.batch_size, *shape, device=device) * (256 if len(shape) == 3 else 1)
    sync = torch.cuda.synchronize if cuda else (lambda: None)
    steps = steps if cuda else 5
    for i in range(3 + steps):  # 3 warm-up steps (compilation, cuDNN autotuning), then the timed ones
        if i == 3:
            sync()
            torch.cuda.reset_peak_memory_stats() if cuda else None
            t0 = time.perf_counter()
        loss = nll(net, x, cfg.alpha).mean()
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
    sync()
    dt = (time.perf_counter() - t0) / steps
    peak = f'peak GPU memory {torch.cuda.max_memory_allocated() / 2**30:.2f} GiB' if cuda else \
        f'peak RSS {resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20:.2f} GiB (process)'
    print(f'{torch.cuda.get_device_name() if cuda else "cpu"} | torch {torch.__version__} | batch {cfg.batch_size} | '
          f'{sum(p.numel() for p in flow.parameters()) / 1e6:.2f}M params | {1000 * dt:.1f} ms/step | '
          f'{cfg.batch_size / dt:.0f} img/s | {peak}')


def main(argv=None):
    cfg = common.parse_config(Config, presets, argv)
    cfg = dataclasses.replace(cfg, out=cfg.out or f'runs/flows-{Path(cfg.dataset).name}')
    check(cfg)
    with common.script_guard():
        return dict(train=train, sample=sample_from_checkpoint, bench=bench)[cfg.mode](cfg)


if __name__ == '__main__':
    main()
