"""Gated PixelCNN (van den Oord et al. 2016, "Conditional Image Generation with PixelCNN Decoders", arXiv:1606.05328):
an autoregressive model p(x) = prod_i p(x_i | x_<i) over the pixels in raster order, each conditional computed in one
pass by masked convolutions, with vertical and horizontal stacks so that the receptive field has no blind spot. The
likelihood is exact and discrete: no bound, no dequantisation.

    python pixelcnn.py --dataset mnist                  # binarised MNIST: test NLL in nats (beside vae.py's IWAE)
    python pixelcnn.py --dataset mnist --data 8bit      # 256-way softmax per pixel: test NLL in bits/dim
    python pixelcnn.py --dataset mnist --class-cond 1   # p(x | class): samples of a chosen digit
    python pixelcnn.py --mode sample --out runs/pixelcnn-binary-mnist --n-samples 2000   # PNGs + .npz
    python pixelcnn.py --mode eval --out runs/pixelcnn-binary-mnist                      # test NLL -> nll.json

Measured (2 CPU cores, torch 2.13.0+cpu): binarised MNIST, preset mnist-cpu, 1,500 steps: test NLL 89.14 nats (exact,
all 10,000 test images; vae.py's IWAE bound on the same images: 90.60) in 14 min end to end.
Sampling is sequential: H x W network evaluations per image (784 for MNIST), the price of the exact likelihood.
One channel (grayscale) only: colour needs masks between the R, G and B of a pixel (the paper's sec. 2.1).
"""
import dataclasses, json, math, time
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn as nn
import torch.nn.functional as F
from tqdm import tqdm

import common


@dataclass
class Config:
    mode: str = 'train'  # train (then test NLL and samples) | sample | eval (the last two read --out/ckpt.pt)
    preset: str = ''  # named settings below the flags given (listed at the end of --help); '': from the device
    dataset: str = 'mnist'  # mnist | fashion-mnist | an .npz of grayscale uint8 images (N, H, W, 1)
    data_dir: str = ''  # folder with the official archives (default $GENMODELS_DATA, else ./data; fetched if missing)
    data: str = 'binary'  # binary (pixels ~ Bernoulli(value / 255), NLL in nats) | 8bit (256-way softmax, bits/dim)
    out: str = ''  # run folder (default runs/pixelcnn-<data>-<dataset>)
    device: str = 'auto'  # auto | cuda | cpu | mps
    seed: int = 0  # all training randomness is a function of (seed, rank, step)
    # model
    ch: int = 64  # channels of both stacks
    layers: int = 12  # gated layers (the first one masked 'A': it cannot see the pixel it predicts)
    kernel: int = 5  # odd width k of the masked convolutions; the first layer is 2k + 1 wide (k 3: the 7x7 of PixelCNN)
    class_cond: bool = False  # p(x | label): a per-class bias in every gate (the paper's h, sec. 2.3)
    # training
    steps: int = 20000  # optimizer steps
    batch_size: int = 64  # global batch, split evenly across ranks
    lr: float = 1e-3  # Adam learning rate, decayed exponentially (PixelCNN++)
    lr_decay: float = 0.9999  # per-step factor: lr at step s is lr * lr_decay^s
    grad_clip: float = 1.0  # max global gradient norm
    resume: bool = False  # continue from --out/ckpt.pt
    log_every: int = 100  # steps between log lines
    ckpt_every: int = 2000  # steps between checkpoints (also at the end and on Ctrl-C / SIGTERM)
    sample_every: int = 0  # steps between test NLLs and sample grids (0: only at the end)
    eval_images: int = 0  # test images per evaluation (0: the whole test split)
    # sampling
    n_samples: int = 64  # --mode sample: number of images (labels 0, 1, ..., 9, 0, ... with --class-cond)
    label: int = -1  # --mode sample with --class-cond: every sample of this class (-1: cycle through the classes)
    sample_batch: int = 500  # images per sampling / evaluation batch
    save: str = 'png,npz'  # --mode sample: png (a folder of PNGs) and/or npz (uint8 (N, H, W, C))


PRESETS = {'mnist': {}, 'mnist-cpu': dict(ch=32, layers=8, kernel=3, steps=1500, lr=2e-3, lr_decay=0.999,
                                          ckpt_every=500)}  # 14 minutes on 2 cores (README)
MODEL_KEYS = ('dataset', 'data', 'ch', 'layers', 'kernel', 'class_cond')
RECIPE_KEYS = ('seed', 'batch_size', 'lr', 'lr_decay', 'grad_clip')
UNIT = {'binary': 'nats', '8bit': 'bits/dim'}  # of the test NLL

# -----------------------------------------------------------------------------
# The model: a gated layer of two stacks. The vertical stack at row i sees the rows <= i, all columns in reach; shifted
# down one row, the rows < i, which is what the horizontal stack may see of them. The horizontal stack at (i, j) sees
# row i up to column j (after the first layer: up to j - 1). Together: every pixel before (i, j) in raster order.


def down(v):  # row i <- row i - 1 (zeros in row 0)
    return F.pad(v, (0, 0, 1, 0))[:, :, :-1]


def right(h):  # column j <- column j - 1 (zeros in column 0)
    return F.pad(h, (1, 0))[..., :-1]


def gate(a):  # eq. 2: tanh of one half of the channels times sigmoid of the other
    f, g = a.chunk(2, 1)
    return torch.tanh(f) * torch.sigmoid(g)


class GatedLayer(nn.Module):
    """y = tanh(W_f * x) * sigmoid(W_g * x) (eq. 2) in both stacks; the vertical stack's features, shifted down, enter
    the horizontal one through a 1x1 convolution; the horizontal stack is residual after the first layer (fig. 2)."""

    def __init__(self, cin, ch, k, first, n_classes):
        super().__init__()
        self.k, self.first = k, first
        self.v = nn.Conv2d(cin, 2 * ch, (k // 2 + 1, k))  # rows i - k//2 .. i, columns j - k//2 .. j + k//2
        self.h = nn.Conv2d(cin, 2 * ch, (1, k // 2 + 1))  # row i, columns j - k//2 .. j
        self.v_to_h, self.h_out = nn.Conv2d(2 * ch, 2 * ch, 1), nn.Conv2d(ch, ch, 1)
        self.label = nn.Embedding(n_classes, 4 * ch) if n_classes else None

    def forward(self, v, h, y=None):
        p = self.k // 2
        v_pre = self.v(F.pad(v, (p, p, p, 0)))
        h_pre = self.h(F.pad(right(h) if self.first else h, (p, 0, 0, 0))) + self.v_to_h(down(v_pre))
        if self.label is not None:
            bv, bh = self.label(y)[:, :, None, None].chunk(2, 1)
            v_pre, h_pre = v_pre + bv, h_pre + bh
        h_new = self.h_out(gate(h_pre))
        return gate(v_pre), h_new if self.first else h + h_new


class PixelCNN(nn.Module):
    """x (B, 1, H, W) in [-1, 1] -> logits (B, K, H, W) of p(x_ij | x_<ij): K = 1 (Bernoulli) or 256 (softmax)."""

    def __init__(self, ch, layers, k, out, n_classes=0):
        super().__init__()
        self.layers = nn.ModuleList(GatedLayer(1 if i == 0 else ch, ch, 2 * k + 1 if i == 0 else k, i == 0, n_classes)
                                    for i in range(layers))
        self.head = nn.Sequential(nn.ReLU(), nn.Conv2d(ch, 4 * ch, 1), nn.ReLU(), nn.Conv2d(4 * ch, out, 1))

    def forward(self, x, y=None):
        v = h = x
        for layer in self.layers:
            v, h = layer(v, h, y)
        return self.head(h)


def binarise(x, generator=None):  # uint8 -> {0, 1}: 1 with probability value / 255, vae.py's (dynamic) binarisation
    return torch.bernoulli(x.float() / 255, generator=generator).to(torch.uint8)


def to_input(x, data):  # pixel values (binary 0/1 or 0..255) as the network reads them, in [-1, 1]
    return x.float() * 2 - 1 if data == 'binary' else x.float() / 127.5 - 1


def nll(model, x, y, data):
    """-log p(x) per image, exact: nats for binary x in {0, 1}; bits/dim for 8-bit x in {0 .. 255} (the cross-entropy
    of the 256-way softmax; it equals the density of x + U[0, 1) on [0, 256)^D, as flows.py's figure is taken)."""
    logits = model(to_input(x, data), y)
    if data == 'binary':
        return F.binary_cross_entropy_with_logits(logits, x.float(), reduction='none').flatten(1).sum(1)
    return F.cross_entropy(logits, x[:, 0].long(), reduction='none').flatten(1).mean(1) / math.log(2)


@torch.no_grad()
def sample(model, shape, data, label, n_classes, start, n, generator):
    """Ancestral sampling in raster order: one network evaluation per pixel, each pixel drawn from its conditional
    given the ones before (no caching; rows below i do not affect row i, so they are cut off). uint8 (n, 1, H, W);
    binary pixels are 0 or 255."""
    device = next(model.parameters()).device
    y = ((torch.arange(start, start + n, device=device) % n_classes if label < 0 else torch.full((n,), label,
         device=device)) if n_classes else None)
    x = torch.zeros(n, *shape, device=device)
    for i, j in tqdm([(i, j) for i in range(shape[1]) for j in range(shape[2])], desc='pixels', leave=False):
        logits = model(to_input(x[:, :, :i + 1], data), y)[:, :, i, j]
        if data == 'binary':
            x[:, 0, i, j] = torch.bernoulli(torch.sigmoid(logits[:, 0]), generator=generator)
        else:
            x[:, 0, i, j] = torch.multinomial(logits.softmax(1), 1, generator=generator)[:, 0].float()
    return (x * 255 if data == 'binary' else x).to(torch.uint8)


# -----------------------------------------------------------------------------
# Data and evaluation


def load(cfg, split):
    """(x, y or None without --class-cond) of a split as the model sees it: binary data are drawn when used; the test
    split once, with seed 0, the same images as vae.py's (tested). An .npz of your own images holds out its last 10%."""
    x, y = common.load_dataset(cfg.dataset, split if cfg.dataset in common.DATASETS else 'train', cfg.data_dir or None)
    if cfg.dataset not in common.DATASETS:
        cut = len(x) - max(1, len(x) // 10)
        x = x[:cut] if split == 'train' else x[cut:]
    if split == 'test':
        x, y = x[:cfg.eval_images or len(x)], None if y is None else y[:cfg.eval_images or len(x)]
        if cfg.data == 'binary':
            x = binarise(x, torch.Generator().manual_seed(0))
    return x, y if cfg.class_cond else None


@torch.no_grad()
def test_nll(model, x, y, data, batch, rank=0, world=1):
    """Mean exact test NLL: nats per image (binary) or bits/dim (8bit)."""
    total = torch.zeros((), dtype=torch.float64, device=x.device)
    starts = range(0, len(x), batch)
    for i in tqdm(starts[rank::world], desc='test NLL', disable=rank != 0 or len(starts) < 4, leave=False):
        total += nll(model, x[i:i + batch], None if y is None else y[i:i + batch], data).double().sum()
    if world > 1:
        torch.distributed.all_reduce(total)
    return total.item() / len(x)


def check(cfg, world=1):
    common.check(cfg, dict(mode=('train', 'sample', 'eval'), data=('binary', '8bit')),
                 positive=('ch', 'layers', 'kernel', 'steps', 'batch_size', 'lr', 'lr_decay', 'grad_clip', 'log_every',
                           'ckpt_every', 'n_samples', 'sample_batch'), nonnegative=('sample_every', 'eval_images'))
    if cfg.kernel % 2 == 0:
        common.fail(f'--kernel {cfg.kernel} must be odd')
    if (C := common.image_shape(cfg)[0]) != 1:
        common.fail(f'{cfg.dataset} has {C} channels: pixelcnn.py models grayscale images (use mnist, fashion-mnist)')
    if cfg.class_cond and cfg.dataset not in common.DATASETS:
        common.fail(f'--class-cond 1 needs labels, which {cfg.dataset} does not have: use --class-cond 0')
    if cfg.batch_size % world:
        common.fail(f'--batch-size {cfg.batch_size} must be divisible by the {world} processes')


def make_model(cfg):
    return PixelCNN(cfg.ch, cfg.layers, cfg.kernel, 1 if cfg.data == 'binary' else 256, 10 * cfg.class_cond)


# -----------------------------------------------------------------------------
# Training


def train(cfg):
    device, rank, world = common.setup(cfg.device)
    check(cfg, world)
    out, cuda = Path(cfg.out), 'cuda' in device
    (x, y), (x_test, y_test) = [[t if t is None else t.to(device) for t in load(cfg, s)] for s in ('train', 'test')]
    torch.manual_seed(cfg.seed)
    model = make_model(cfg).to(device)
    opt = torch.optim.Adam(model.parameters(), lr=cfg.lr)
    if rank == 0:
        common.claim(out)
    if ckpt := common.resume(out, 'pixelcnn', cfg, MODEL_KEYS, RECIPE_KEYS):
        model.load_state_dict(ckpt['model']), common.load_opt(opt, ckpt['opt'])
    common.print0(f'{cfg.dataset} ({cfg.data}) {tuple(x.shape)} on {device} x{world} | PixelCNN '
                  f'{sum(p.numel() for p in model.parameters()) / 1e6:.2f}M parameters | steps '
                  f'{ckpt["step"] if ckpt else 0} -> {cfg.steps}')
    net = nn.parallel.DistributedDataParallel(model, device_ids=[device] if cuda else None) if world > 1 else model

    def save(step, clock):  # the loop calls it every --ckpt-every steps, at the end, before outputs, on Ctrl-C
        common.save_ckpt(out / 'ckpt.pt', dict(script='pixelcnn', model=model.state_dict(), opt=opt.state_dict(),
                                               step=step, config=dataclasses.asdict(cfg)))

    with common.Loop(cfg, out, save, ckpt['step'] if ckpt else 0, sample=cfg.sample_every) as loop:
        for step in loop:
            for group in opt.param_groups:
                group['lr'] = cfg.lr * cfg.lr_decay ** step
            idx = torch.randint(len(x), (cfg.batch_size // world,), device=device)
            xb = binarise(x[idx]) if cfg.data == 'binary' else x[idx]
            loss = nll(net, xb, None if y is None else y[idx], cfg.data).mean()
            opt.zero_grad(set_to_none=True)
            loss.backward()
            gnorm = nn.utils.clip_grad_norm_(model.parameters(), cfg.grad_clip)
            opt.step()
            loop.log(loss=loss, **{'grad norm': gnorm})
            if loop.due('sample'):  # the exact test NLL (every rank) and a grid (rank 0)
                test = test_nll(model, x_test, y_test, cfg.data, cfg.sample_batch, rank, world)
                loop.write(f'test NLL {test:.4f} {UNIT[cfg.data]} ({len(x_test)} test images)')
                if rank == 0:
                    draw = lambda *a: sample(model, tuple(x.shape[1:]), cfg.data, -1, 10 * cfg.class_cond, *a)
                    grid = common.sample_many(draw, 64, 64, cfg.seed, device)
                    common.save_grid(grid, out / f'samples{"" if loop.final else f"_{loop.done:07d}"}.png')
    return model, loop.last.get('loss')


# -----------------------------------------------------------------------------
# Sampling and evaluation of a checkpoint


def from_checkpoint(cfg):
    device, rank, world = common.setup(cfg.device)
    ckpt = common.load_ckpt(Path(cfg.out) / 'ckpt.pt', 'pixelcnn')
    mcfg = dataclasses.replace(cfg, **{k: ckpt['config'][k] for k in MODEL_KEYS})  # the checkpoint's model settings
    model = make_model(mcfg).to(device).eval()
    model.load_state_dict(ckpt['model'])
    if cfg.label >= 10 or (cfg.label >= 0 and not mcfg.class_cond):
        common.fail(f'--label {cfg.label}: ' + ('labels are 0 .. 9' if mcfg.class_cond else
                                                'this model has no class condition (trained with --class-cond 0)'))
    if cfg.mode == 'eval':
        x, y = [t if t is None else t.to(device) for t in load(mcfg, 'test')]
        test = test_nll(model, x, y, mcfg.data, cfg.sample_batch, rank, world)
        if rank == 0:
            result = dict(nll=test, unit=UNIT[mcfg.data], n_images=len(x), step=ckpt['step'], data=mcfg.data)
            common.atomic_write(Path(cfg.out) / 'nll.json', lambda f: f.write(json.dumps(result, indent=1).encode()))
            print(f'test NLL {test:.4f} {UNIT[mcfg.data]} ({len(x)} {mcfg.dataset} test images, exact)')
    elif rank == 0:  # under torchrun the other ranks have nothing to do
        common.claim(cfg.out)
        shape, tag, drawn = common.image_shape(mcfg), 'samples' + (f'_label{cfg.label}' if cfg.label >= 0 else ''), []

        def draw(start, n, generator):  # counts the images drawn now, not the batches that an interrupted run kept
            drawn.append(n)
            return sample(model, shape, mcfg.data, cfg.label, 10 * mcfg.class_cond, start, n, generator)
        t0 = time.perf_counter()
        x = common.sample_many(draw, cfg.n_samples, cfg.sample_batch, cfg.seed, device,
                               keep=common.keep_dir(cfg.out, tag, cfg, Path(cfg.out) / 'ckpt.pt'))
        ms = 1000 * (time.perf_counter() - t0) / sum(drawn) if drawn else math.nan  # nan: all kept, nothing timed
        print(f'{shape[1] * shape[2]} evaluations per image, {ms:.1f} ms/image on {device} (batch {cfg.sample_batch})')
        common.write_samples(x, cfg.out, tag, cfg.save)


def main(argv=None):
    cfg = common.parse_config(Config, PRESETS, lambda v: 'mnist', argv=argv)
    cfg = dataclasses.replace(cfg, out=cfg.out or f'runs/pixelcnn-{cfg.data}-{Path(cfg.dataset).name}')
    with common.script_guard():
        check(cfg)
        return dict(train=train, sample=from_checkpoint, eval=from_checkpoint)[cfg.mode](cfg)


if __name__ == '__main__':
    main()
