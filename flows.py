"""RealNVP (Dinh, Sohl-Dickstein & Bengio 2017, arXiv:1605.08803): an invertible network f made of affine coupling
layers, trained by exact maximum likelihood through the change of variables log p(x) = log p_Z(f(x)) + log|det df/dx|
(eq. 3), and sampled by running f^-1 on Gaussian noise. exercises/moons.py builds a 2-D flow from the same pieces.

    python flows.py --dataset mnist                     # multi-scale RealNVP: test bits/dim, grids at T = 1.0 and 0.7
    python flows.py --dataset mnist --device cpu        # the CPU run of the README (preset mnist-cpu, ~16 min)
    torchrun --standalone --nproc_per_node=8 flows.py --dataset cifar10 --fid-every 50000
    python flows.py --mode sample --out runs/flows-mnist --n-samples 10000 --temperature 0.7   # PNGs + .npz

Measured (2 CPU cores, x86-64 VM, torch 2.13.0+cpu): MNIST, preset mnist-cpu, 4000 steps: test 1.181 bits/dim (all
10,000 test images) in 16 min (README: alpha = 1e-6 instead of RealNVP's 0.05 is what got there). Bits/dim are of
the dequantised pixels x = k + u in [0, 256)^D, u ~ U[0, 1)^D, one noise draw per test image (see bits_per_dim).
Act-norm (Glow) stands in for the paper's batch norm: it is exact under --resume and its log-det is a closed form.
"""
import dataclasses, math
from dataclasses import dataclass
from functools import partial
from pathlib import Path

import torch
import torch.nn as nn
from tqdm import tqdm

import common


@dataclass
class Config:
    mode: str = 'train'  # train (then test NLL, samples) | sample (from the checkpoint in --out)
    preset: str = ''  # named settings below the flags given (listed at the end of --help); '': from --dataset, device
    dataset: str = 'mnist'  # mnist | fashion-mnist | cifar10 | cifar10-subset | an .npz of uint8 images (N, H, W, C)
    data_dir: str = ''  # folder with the official archives (default $GENMODELS_DATA, else ./data; fetched if missing)
    out: str = ''  # run folder for checkpoint, grids and logs (default runs/flows-<dataset>)
    device: str = 'auto'  # auto | cuda | cpu | mps
    seed: int = 0  # all training randomness is a function of (seed, rank, step)
    # model
    ch: int = 64  # channels of each s/t ResNet
    blocks: int = 8  # residual blocks per s/t ResNet
    scales: int = 3  # each scale but the last is 3 checkerboard couplings, squeeze, 3 channel-wise, split
    alpha: float = 0.05  # logit pre-processing y = logit(alpha + (1 - 2 alpha) x / 256), RealNVP sec. 4.1; MNIST: 1e-6
    # training
    steps: int = 100000  # optimizer steps
    batch_size: int = 64  # global batch, split evenly across ranks
    lr: float = 1e-3  # Adam learning rate
    warmup: int = 1000  # linear learning-rate warm-up steps, then a cosine decay to 0 at --steps
    grad_clip: float = 100.0  # max global gradient norm
    flip: bool = False  # random horizontal flips
    compile: bool = True  # torch.compile the flow for training (CUDA only)
    resume: bool = False  # continue from --out/ckpt.pt
    log_every: int = 100  # steps between log lines
    ckpt_every: int = 5000  # steps between checkpoints (also at the end and on Ctrl-C / SIGTERM)
    sample_every: int = 10000  # steps between test NLLs and sample grids (0: only at the end)
    eval_images: int = 0  # test images per evaluation (0: the whole test split)
    fid_every: int = 0  # steps between FIDs of --fid-samples samples at T = 1 vs the training set (0: off)
    fid_samples: int = 10000  # samples per FID
    # sampling
    temperature: float = 1.0  # --mode sample: z ~ N(0, T^2 I); T < 1 trades diversity for quality (Glow sec. 5)
    n_samples: int = 64  # --mode sample: number of images
    sample_batch: int = 500  # images per sampling / evaluation batch
    save: str = 'png,npz'  # --mode sample: png (a folder of PNGs) and/or npz (uint8 (N, H, W, C))


PRESETS = {'mnist': dict(alpha=1e-6),  # MNIST's saturated pixels want a small alpha (MAF's 1e-6), see README
           'cifar10': dict(flip=True)}  # and your own images
PRESETS.update({f'{k}-cpu': dict(p, ch=32, blocks=2, steps=4000, lr=2e-3, warmup=200, ckpt_every=1000, sample_every=0,
                                 compile=False) for k, p in list(PRESETS.items())})


MODEL_KEYS = ('dataset', 'ch', 'blocks', 'scales', 'alpha')
RECIPE_KEYS = ('seed', 'batch_size', 'lr', 'warmup', 'grad_clip', 'flip')

# -----------------------------------------------------------------------------
# The likelihood: the change of variables, dequantisation, logit pre-processing, bits/dim


def log_prob(flow, y):
    """log p(y) in nats per example by the change of variables (eq. 3): log p_Y(y) = log p_Z(f(y)) + log|det df/dy|,
    with p_Z = N(0, I) over every factored-out z."""
    zs, logdet = flow(y)
    return sum(-0.5 * (z ** 2 + math.log(2 * math.pi)).flatten(1).sum(1) for z in zs) + logdet


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


def nll(flow, x, alpha):
    """-log p(x) in bits/dim of dequantised images x (B, C, H, W) in [0, 256): the training loss per example."""
    y, logdet = logit_preprocess(x.contiguous(memory_format=torch.channels_last), alpha)
    return -(log_prob(flow, y) + logdet) / (x[0].numel() * math.log(2))


# bits/dim: with k in {0..255}^D and x = k + u, Jensen gives log P(k) >= E_u log p(k + u), so -log p(x) / (D ln 2)
# over dequantised test images upper-bounds the discrete code length. p is the density of x on [0, 256)^D, so the
# 1/256 of the pixel scaling sits inside log|det dy/dx| (logit_preprocess); a density of x/256 on [0, 1)^D would
# read exactly 8 bits/dim lower, and nats per image are D ln 2 times larger (784 ln 2 = 543 for MNIST).
@torch.no_grad()
def bits_per_dim(flow, x, alpha, batch, seed=0, rank=0, world=1):
    """Mean test NLL of uint8 images x in bits/dim, each batch dequantised with noise seeded by (seed, batch)."""
    total = torch.zeros((), dtype=torch.float64, device=x.device)
    starts = range(0, len(x), batch)
    for i in tqdm(starts[rank::world], desc='test NLL', disable=rank != 0 or len(starts) < 4, leave=False):
        xb = dequantise(x[i:i + batch], torch.Generator(x.device).manual_seed(seed * 1_000_003 + i))
        total += nll(flow, xb, alpha).double().sum()
    if world > 1:
        torch.distributed.all_reduce(total)
    return total.item() / len(x)


# -----------------------------------------------------------------------------
# The flow: act-norm, affine coupling, squeeze, and the multi-scale stack. Each layer maps data -> latent in forward,
# returning (y, log|det dy/dx| per example), and back in inverse. Inputs are (B, C) or (B, C, H, W).


class ActNorm(nn.Module):
    """Glow's act-norm (Kingma & Dhariwal 2018, sec. 3.1): y = x exp(logs) + b per channel; log|det| = HW sum logs."""

    def __init__(self, C):
        super().__init__()
        self.logs, self.b = nn.Parameter(torch.zeros(C)), nn.Parameter(torch.zeros(C))
        self.init = False  # set by data_init: the next forward sets logs, b so its outputs have zero mean, unit var

    def forward(self, x):
        view = (1, -1) + (1,) * (x.dim() - 2)  # per channel
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
    log|det dy/dx| = sum_j (1 - b)_j s_j(b x) (eq. 7). s = scale * tanh(.) is bounded, which keeps exp(s) tame. The
    net sees x_a and the mask (one channel of it), so it knows which zeros are masked."""

    def __init__(self, mask, net, C):
        super().__init__()
        self.register_buffer('mask', mask)  # (1, 1, H, W) checkerboard | (1, C, 1, 1) channel-wise | (1, C) for points
        self.net = net
        self.scale = nn.Parameter(torch.ones((1, C) + (1,) * (mask.dim() - 2)))  # per channel

    def st(self, x):
        s, t = self.net(torch.cat([x * self.mask, self.mask.expand_as(x)[:, :1]], 1)).chunk(2, 1)
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
    """RealNVP's multi-scale stack (sec. 3.6) for (C, H, W) images, act-norm before every coupling; the last scale is
    4 checkerboard couplings."""
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
def data_init(flow, y):
    """Act-norm's data-dependent init (Glow sec. 3.1): each act-norm's outputs start standardised on the batch y."""
    for m in flow.modules():
        if isinstance(m, ActNorm):
            m.init = True
    flow(y)


@torch.no_grad()
def sample(flow, shape, alpha, temperature, start, n, generator):
    """x = f^-1(z), z ~ N(0, T^2 I) at every scale, as uint8 pixels floor(x) (common.sample_many's batches)."""
    device = next(flow.parameters()).device
    zs = [temperature * torch.randn(n, *z.shape[1:], generator=generator, device=device)
          for z in flow(torch.zeros(1, *shape, device=device))[0]]
    pixels = (torch.sigmoid(flow.inverse(zs)) - alpha) / (1 - 2 * alpha) * 256  # logit_preprocess undone
    return pixels.nan_to_num().floor().clamp(0, 255).to(torch.uint8)


# -----------------------------------------------------------------------------
# Training


def lr_at(step, lr, warmup, steps):  # a linear warm-up, then a cosine decay to 0 at the last step
    return lr * min(1.0, (step + 1) / warmup) * (1 + math.cos(math.pi * step / steps)) / 2


def check(cfg, world=1):
    common.check(cfg, dict(mode=('train', 'sample')),
                 positive=('ch', 'blocks', 'scales', 'steps', 'batch_size', 'lr', 'warmup', 'grad_clip', 'log_every',
                           'ckpt_every', 'temperature', 'n_samples', 'sample_batch', 'fid_samples'),
                 nonnegative=('sample_every', 'eval_images', 'fid_every'))
    if not 0 < cfg.alpha < 0.5:
        common.fail(f'--alpha {cfg.alpha} must be in (0, 0.5)')
    if (size := common.image_shape(cfg)[1]) % 2 ** (cfg.scales - 1):
        common.fail(f'{size}x{size} images cannot be squeezed {cfg.scales - 1} times: lower --scales')
    if cfg.batch_size % world:
        common.fail(f'--batch-size {cfg.batch_size} must be divisible by the {world} processes')


def load(cfg, split):
    """uint8 (N, C, H, W) of a split; an .npz of your own images has no test split: its last 10% are held out."""
    x = common.load_dataset(cfg.dataset, split if cfg.dataset in common.DATASETS else 'train', cfg.data_dir or None)[0]
    cut = len(x) - max(1, len(x) // 10)
    return x if cfg.dataset in common.DATASETS else x[:cut] if split == 'train' else x[cut:]


def train(cfg):
    device, rank, world = common.setup(cfg.device)
    check(cfg, world)
    out, cuda = Path(cfg.out), 'cuda' in device
    x, x_test = load(cfg, 'train').to(device), load(cfg, 'test').to(device)
    x_test, shape = x_test[:cfg.eval_images or len(x_test)], tuple(x.shape[1:])
    torch.manual_seed(cfg.seed)  # the same initial weights and act-norm batch on every rank and every run
    flow = make_flow(cfg, shape).to(device)
    opt = torch.optim.Adam(flow.parameters(), lr=cfg.lr)
    if rank == 0:
        common.claim(out)
    if ckpt := common.resume(out, 'flows', cfg, MODEL_KEYS, RECIPE_KEYS):
        flow.load_state_dict(ckpt['model']), common.load_opt(opt, ckpt['opt'])
    else:
        data_init(flow, logit_preprocess(dequantise(x[torch.randint(len(x), (512,), device=device)]), cfg.alpha)[0])
    common.print0(f'{cfg.dataset} {tuple(x.shape)} on {device} x{world} | flow '
                  f'{sum(p.numel() for p in flow.parameters()) / 1e6:.2f}M parameters | steps '
                  f'{ckpt["step"] if ckpt else 0} -> {cfg.steps}')
    net = torch.compile(flow) if cfg.compile and cuda else flow
    if world > 1:
        net = nn.parallel.DistributedDataParallel(net, device_ids=[device] if cuda else None)
    if cfg.fid_every and rank == 0:
        import eval_fid  # only runs that ask for FID pay for the Inception network
        scorer = eval_fid.run_scorer('', cfg.dataset, x.cpu(), device)

    def save(step, clock):  # the loop calls it every --ckpt-every steps, at the end, before outputs, on Ctrl-C
        common.save_ckpt(out / 'ckpt.pt', dict(script='flows', model=flow.state_dict(), opt=opt.state_dict(),
                                               step=step, config=dataclasses.asdict(cfg)))

    with common.Loop(cfg, out, save, ckpt['step'] if ckpt else 0, sample=cfg.sample_every, fid=cfg.fid_every) as loop:
        for step in loop:
            for group in opt.param_groups:
                group['lr'] = lr_at(step, cfg.lr, cfg.warmup, cfg.steps)
            xb = dequantise(x[torch.randint(len(x), (cfg.batch_size // world,), device=device)])
            if cfg.flip:
                xb = torch.where(torch.rand(len(xb), 1, 1, 1, device=device) < 0.5, xb.flip(3), xb)
            loss = nll(net, xb, cfg.alpha).mean()
            opt.zero_grad(set_to_none=True)
            loss.backward()
            gnorm = nn.utils.clip_grad_norm_(flow.parameters(), cfg.grad_clip)
            opt.step()
            loop.log(loss=loss, **{'grad norm': gnorm})
            if loop.due('sample') or (cfg.fid_every and loop.due('fid')):  # test NLL (every rank), grids, FID
                test = bits_per_dim(flow, x_test, cfg.alpha, cfg.sample_batch, cfg.seed, rank, world)
                line = f'test bits/dim {test:.4f} ({len(x_test)} test images)'
                draw = partial(sample, flow, shape, cfg.alpha)
                if rank == 0 and loop.due('sample'):  # the same z every time (scaled by T): grids compare
                    for T in (1.0, 0.7):
                        grid = common.sample_many(partial(draw, T), 64, 64, cfg.seed, device)
                        common.save_grid(grid, out / f'samples{"" if loop.final else f"_{loop.done:07d}"}_T{T}.png')
                if rank == 0 and cfg.fid_every and loop.due('fid'):
                    x_fid = common.sample_many(partial(draw, 1.0), cfg.fid_samples, cfg.sample_batch, cfg.seed + 1,
                                               device, desc='FID samples')
                    line += f' | fid{cfg.fid_samples} {scorer(x_fid):.4f}'
                loop.write(line)
    return flow, loop.last.get('loss')


# -----------------------------------------------------------------------------
# Sampling from a checkpoint


def sample_from_checkpoint(cfg):
    device, rank, _ = common.setup(cfg.device)
    ckpt = common.load_ckpt(Path(cfg.out) / 'ckpt.pt', 'flows')
    mcfg = dataclasses.replace(cfg, **{k: ckpt['config'][k] for k in MODEL_KEYS})  # the checkpoint's model settings
    shape = common.image_shape(mcfg)
    flow = make_flow(mcfg, shape).to(device)
    flow.load_state_dict(ckpt['model'])
    if rank == 0:  # under torchrun the other ranks have nothing to do
        common.claim(cfg.out)  # not into a folder that a training run is writing
        x = common.sample_many(partial(sample, flow, shape, mcfg.alpha, cfg.temperature), cfg.n_samples,
                               cfg.sample_batch, cfg.seed, device)
        common.write_samples(x, cfg.out, f'samples_T{cfg.temperature}', cfg.save)


def main(argv=None):
    cfg = common.parse_config(Config, PRESETS, argv=argv)
    cfg = dataclasses.replace(cfg, out=cfg.out or f'runs/flows-{Path(cfg.dataset).name}')
    with common.script_guard():  # (check first: a bad --dataset is one clear line too)
        check(cfg)
        return dict(train=train, sample=sample_from_checkpoint)[cfg.mode](cfg)


if __name__ == '__main__':
    main()
