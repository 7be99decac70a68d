"""GAN (Goodfellow et al. 2014, arXiv:1406.2661): a generator G(z) learns to fool a discriminator D trained to tell real
images from G's. DCGAN networks (Radford et al. 2016, arXiv:1511.06434) with the non-saturating loss (--loss bce) or
WGAN-GP (Gulrajani et al. 2017, arXiv:1704.00028, --loss wgan-gp).

    python gan.py --dataset mnist --device cpu             # CPU quick start (preset mnist-cpu; README "gan.py")
    python gan.py --dataset fashion-mnist --loss wgan-gp   # WGAN-GP, Alg. 1: n_critic 5, lambda 10, Adam(1e-4, 0, 0.9)
    torchrun --standalone --nproc_per_node=8 gan.py --dataset cifar10   # gradients averaged over the ranks
    python gan.py --mode sample --out runs/gan-mnist --n-samples 10000  # z ~ N(0, I), no truncation: PNGs + .npz

Measured: the CPU quick start trains in 3 min 29 s on 2 CPU cores (6,000 steps, ch 32, 0.35M + 0.04M parameters);
FID 30.3 of 2,000 samples of the raw G against the 10,000 MNIST test images (eval_fid.py, pytorch-fid mode).
"""
import copy, dataclasses
from dataclasses import dataclass
from functools import partial
from pathlib import Path

import torch
import torch.distributed as dist
import torch.nn as nn
import torch.nn.functional as F

import common


@dataclass
class Config:
    mode: str = 'train'  # train | sample (from the checkpoint in --out)
    preset: str = ''  # named settings below the flags given (listed at the end of --help); '': from the flags, device
    dataset: str = 'mnist'  # mnist | fashion-mnist | cifar10 | cifar10-subset (not CIFAR-10) | an .npz of uint8 images
    data_dir: str = ''  # folder with the official archives (default $GENMODELS_DATA, else ./data; fetched if missing)
    out: str = ''  # run folder (default runs/gan-<dataset>)
    device: str = 'auto'  # auto | cuda | cpu | mps
    seed: int = 0  # all training randomness is a function of (seed, rank, step)
    loss: str = 'bce'  # bce (non-saturating GAN) | wgan-gp
    z_dim: int = 100  # size of the latent z ~ N(0, I)
    ch: int = 64  # base channels of G and D (doubled at every halving of the resolution)
    gp_lambda: float = 10.0  # WGAN-GP penalty weight lambda
    n_critic: int = 1  # D steps per G step (the wgan-gp presets: 5)
    steps: int = 30000  # generator steps
    epochs: float = 0  # if > 0, replaces --steps: D sees every training image this many times
    batch_size: int = 64  # global batch, split evenly across ranks
    lr: float = 2e-4  # Adam learning rate of G and D
    beta1: float = 0.5  # Adam beta1 (DCGAN: 0.5)
    beta2: float = 0.999  # Adam beta2
    ema: float = 0.999  # EMA decay of G's weights, used for sampling and FID (0: off, the raw G)
    flip: bool = False  # random horizontal flips of the real images
    resume: bool = False  # continue from --out/ckpt.pt
    log_every: int = 100  # steps between log lines
    sample_every: int = 1000  # steps between grids from the same fixed noise (0: only at the end)
    ckpt_every: int = 2000  # steps between checkpoints (also at the end and on Ctrl-C / SIGTERM)
    fid_every: int = 0  # steps between FID evaluations, and one at the end (0: off)
    fid_samples: int = 10000  # samples per FID evaluation
    fid_ref: str = ''  # FID reference: train | test (of --dataset), a dataset:split or stats .npz (default: train)
    n_samples: int = 64  # --mode sample: number of images
    sample_batch: int = 500  # images per sampling batch
    save: str = 'png,npz'  # --mode sample: png (a folder of PNGs) and/or npz (uint8 (N, H, W, C))


WGAN_GP = dict(loss='wgan-gp', lr=1e-4, beta1=0.0, beta2=0.9, n_critic=5)  # Gulrajani et al. Alg. 1
PRESETS = {'mnist': {}, 'cifar10': dict(steps=100000, flip=True)}  # mnist: 28x28 data; cifar10: 32x32 and 64x64
PRESETS.update({f'{k}-wgan-gp': dict(p, **WGAN_GP) for k, p in list(PRESETS.items())})
PRESETS.update({f'{k}-cpu': dict(p, ch=32, steps=6000, ckpt_every=1000, fid_samples=2000, fid_ref='test', ema=0.0)
                for k, p in list(PRESETS.items())})  # FID against the 10k test images: 1/6 of the Inception time


def pick(v):  # the preset when --preset is not given: by the data's size and --loss (and -cpu on a CPU)
    name = 'mnist' if v['dataset'] in ('mnist', 'fashion-mnist') else 'cifar10'
    return name + '-wgan-gp' * (v['loss'] == 'wgan-gp')


MODEL_KEYS = ('dataset', 'loss', 'z_dim', 'ch')
RECIPE_KEYS = ('seed', 'batch_size', 'lr', 'beta1', 'beta2', 'n_critic', 'gp_lambda', 'ema', 'flip')

# -----------------------------------------------------------------------------
# Objectives: D's loss on a real and a fake batch, G's loss on D's output for its fakes


def d_loss_fn(D, x_real, x_fake, loss='bce', gp_lambda=10.0):
    """Loss of D, and the mean D(x), D(G(z)) for the log (probabilities for bce, critic values for wgan-gp)."""
    d_real, d_fake = D(x_real).flatten(), D(x_fake).flatten()  # logits (bce) or critic values (wgan-gp), (B,)
    if loss == 'bce':  # Goodfellow eq. 1: D ascends log D(x) + log(1 - D(G(z))), D = sigmoid(logit)
        loss = F.softplus(-d_real).mean() + F.softplus(d_fake).mean()  # -log sigmoid(l) = softplus(-l)
        return loss, torch.sigmoid(d_real).mean(), torch.sigmoid(d_fake).mean()
    # Gulrajani Alg. 1 line 7: L = D(x~) - D(x) + lambda (||grad D(x^)||_2 - 1)^2
    loss = d_fake.mean() - d_real.mean() + gp_lambda * gradient_penalty(D, x_real, x_fake)
    return loss, d_real.mean(), d_fake.mean()


def gradient_penalty(D, x_real, x_fake):
    """E (||grad D(x^)||_2 - 1)^2 at x^ = eps x + (1 - eps) x~ with ONE eps ~ U[0, 1] per example (Alg. 1 lines 4-6):
    x^ lies on the straight line between a real and a fake image. An eps per pixel would leave those lines."""
    eps = torch.rand(x_real.shape[0], *[1] * (x_real.dim() - 1), device=x_real.device)  # (B, 1, 1, 1)
    x_hat = (eps * x_real + (1 - eps) * x_fake).requires_grad_(True)
    grad, = torch.autograd.grad(D(x_hat).sum(), x_hat, create_graph=True)  # create_graph: the penalty is trained
    return (grad.flatten(1).norm(dim=1) - 1).pow(2).mean()


def g_loss_fn(d_fake, loss='bce'):
    if loss == 'bce':  # sec. 3: maximise log D(G(z)) rather than minimise log(1 - D(G(z))), which saturates early
        return F.softplus(-d_fake.flatten()).mean()
    return -d_fake.mean()  # Alg. 1 line 11


# -----------------------------------------------------------------------------
# DCGAN networks (Radford et al. sec. 3): strided (transposed) convolutions, no pooling or hidden dense layers, batch
# norm in G (and in D for bce; never in a WGAN-GP critic, whose penalty is per example), ReLU/tanh in G, LeakyReLU in D


LEVELS = {28: 2, 32: 3, 64: 4}  # resolution halvings from the image down to 7x7 (28) or 4x4 (32, 64)


def generator(z_dim, ch, C, H):
    n, c = LEVELS[H], ch * 2 ** (LEVELS[H] - 1)
    layers = [nn.ConvTranspose2d(z_dim, c, H >> n, bias=False), nn.BatchNorm2d(c), nn.ReLU()]  # z -> (c, 7|4, 7|4)
    for _ in range(n - 1):
        layers += [nn.ConvTranspose2d(c, c // 2, 4, 2, 1, bias=False), nn.BatchNorm2d(c // 2), nn.ReLU()]
        c //= 2
    return init(nn.Sequential(*layers, nn.ConvTranspose2d(c, C, 4, 2, 1), nn.Tanh()))  # (B, C, H, W) in [-1, 1]


def discriminator(ch, C, H, batch_norm=True):
    layers, c = [nn.Conv2d(C, ch, 4, 2, 1), nn.LeakyReLU(0.2)], ch  # no norm on D's input layer (sec. 3)
    for _ in range(LEVELS[H] - 1):
        layers += [nn.Conv2d(c, 2 * c, 4, 2, 1), nn.BatchNorm2d(2 * c) if batch_norm else nn.Identity(),
                   nn.LeakyReLU(0.2)]
        c *= 2
    return init(nn.Sequential(*layers, nn.Conv2d(c, 1, H >> LEVELS[H])))  # (B, 1, 1, 1): a logit or critic value


def init(net):  # sec. 4: "all weights were initialized from a zero-centered Normal distribution with standard
    for m in net.modules():  # deviation 0.02"
        if isinstance(m, (nn.Conv2d, nn.ConvTranspose2d)):
            nn.init.normal_(m.weight, 0, 0.02)
    return net


@torch.no_grad()
def standing_stats(G, z_dim, batches=8, batch=256, seed=0):
    """Batch-norm statistics of an EMA generator from its own activations (BigGAN's "standing statistics"): the EMA
    weights' activations differ from the raw G's, so G's running statistics would normalise them wrongly."""
    for m in G.modules():
        if isinstance(m, nn.BatchNorm2d):
            m.reset_running_stats()
            m.momentum = None  # a plain average over the batches below
    g, device = torch.Generator(next(G.parameters()).device).manual_seed(seed), next(G.parameters()).device
    G.train()
    for _ in range(batches):
        G(torch.randn(batch, z_dim, 1, 1, device=device, generator=g))
    G.eval()


def draw(G, z_dim, start, n, generator):  # common.sample_many's batches: z ~ N(0, I), no truncation; G in eval mode
    return common.to_uint8(G.eval()(torch.randn(n, z_dim, 1, 1, device=generator.device, generator=generator)))


# -----------------------------------------------------------------------------
# Training


def check(cfg, world=1):
    common.check(cfg, dict(mode=('train', 'sample'), loss=('bce', 'wgan-gp')),
                 positive=('z_dim', 'ch', 'steps', 'batch_size', 'lr', 'n_critic', 'log_every', 'ckpt_every',
                           'fid_samples', 'n_samples', 'sample_batch'),
                 nonnegative=('gp_lambda', 'epochs', 'sample_every', 'fid_every'), unit=('beta1', 'beta2', 'ema'))
    if common.image_shape(cfg)[1] not in LEVELS or cfg.batch_size % world:
        common.fail(f'--image-size must be 28, 32 or 64 and --batch-size divisible by the {world} processes')
    if cfg.ema >= 1 or cfg.fid_samples < 2:
        common.fail('--ema must be < 1 and --fid-samples >= 2')


def backward_step(loss, net, opt, world):
    """Backward, gradients averaged over the ranks by hand (DDP's reducer wants one backward per forward, but a GAN
    step runs D several times and the gradient penalty differentiates it twice), step; returns the gradient norm."""
    opt.zero_grad(set_to_none=True)
    loss.backward()
    grads = [p.grad for p in net.parameters() if p.grad is not None]
    if world > 1:
        average(grads, world)
    opt.step()
    return nn.utils.get_total_norm(grads)


def average(tensors, world):  # in place, over the ranks: one all-reduce of all of them
    flat = torch.cat([t.flatten() for t in tensors])
    dist.all_reduce(flat)
    for t, f in zip(tensors, (flat / world).split([t.numel() for t in tensors])):
        t.copy_(f.view_as(t))


def collapsed(v):
    """A dead GAN despite finite losses (--lr 1e3: weights of 1e19, D's loss 0, no gradient, a constant image)."""
    if v['|grad D|'] == 0 or v['|grad G|'] == 0 or max(v['|w G|'], v['|w D|']) > 1e6:
        return 'the GAN collapsed (no gradient left, or exploded weights)'


def train(cfg):
    device, rank, world = common.setup(cfg.device)
    check(cfg, world)
    out = Path(cfg.out)
    x = common.load_dataset(cfg.dataset, 'train', cfg.data_dir or None)[0].to(device)  # all of it
    C, H, B = x.shape[1], x.shape[2], cfg.batch_size // world
    if cfg.epochs:  # an epoch: D's real batches cover the training set once
        cfg = dataclasses.replace(cfg, steps=max(1, round(cfg.epochs * len(x) / (cfg.batch_size * cfg.n_critic))))
    torch.manual_seed(cfg.seed)  # the same initial weights on every rank and in every run
    G, D = generator(cfg.z_dim, cfg.ch, C, H).to(device), discriminator(cfg.ch, C, H, cfg.loss == 'bce').to(device)
    ema = copy.deepcopy(G).requires_grad_(False) if cfg.ema else G
    opt_g, opt_d = (torch.optim.Adam(n.parameters(), cfg.lr, betas=(cfg.beta1, cfg.beta2)) for n in (G, D))
    if rank == 0:
        common.claim(out)
    if ckpt := common.resume(out, 'gan', cfg, MODEL_KEYS, RECIPE_KEYS):
        G.load_state_dict(ckpt['G']), D.load_state_dict(ckpt['D']), ema.load_state_dict(ckpt['ema'])
        common.load_opt(opt_g, ckpt['opt_g']), common.load_opt(opt_d, ckpt['opt_d'])
    size = lambda net: f'{sum(p.numel() for p in net.parameters()) / 1e6:.2f}M'
    common.print0(f'{cfg.dataset} {tuple(x.shape)} on {device} x{world} | G {size(G)}, D {size(D)} parameters | '
                  f'{cfg.loss} | steps {ckpt["step"] if ckpt else 0} -> {cfg.steps}')
    if cfg.fid_every and rank == 0:
        import eval_fid  # only runs that ask for FID pay for the Inception network
        scorer = eval_fid.run_scorer(cfg.fid_ref, cfg.dataset, x, device)

    def save(step, clock):  # the loop calls it every --ckpt-every steps, at the end, before outputs, on Ctrl-C
        if cfg.ema:
            standing_stats(ema, cfg.z_dim, seed=cfg.seed)
        common.save_ckpt(out / 'ckpt.pt', dict(script='gan', G=G.state_dict(), D=D.state_dict(), ema=ema.state_dict(),
                                               opt_g=opt_g.state_dict(), opt_d=opt_d.state_dict(), step=step,
                                               config=dataclasses.asdict(cfg)))

    params = list(G.parameters()), list(D.parameters())
    with common.Loop(cfg, out, save, ckpt['step'] if ckpt else 0, check=collapsed, sample=cfg.sample_every,
                     fid=cfg.fid_every) as loop:
        for step in loop:
            for _ in range(cfg.n_critic):  # Gulrajani Alg. 1 lines 2-9 (n_critic = 1: the DCGAN step)
                xb = common.random_batch(x, None, B, cfg.flip)[0]
                with torch.no_grad():
                    fake = G(torch.randn(B, cfg.z_dim, 1, 1, device=device))
                loss_d, d_real, d_fake = d_loss_fn(D, xb, fake, cfg.loss, cfg.gp_lambda)
                gnorm_d = backward_step(loss_d, D, opt_d, world)
            D.requires_grad_(False)  # G's step needs gradients through D, not for D's weights
            loss_g = g_loss_fn(D(G(torch.randn(B, cfg.z_dim, 1, 1, device=device))), cfg.loss)
            D.requires_grad_(True)
            gnorm_g = backward_step(loss_g, G, opt_g, world)
            if world > 1:  # batch-norm statistics too: every rank then holds the same networks
                average([b for b in G.buffers() if b.is_floating_point()] + [b for b in D.buffers()
                                                                              if b.is_floating_point()], world)
            if cfg.ema:
                with torch.no_grad():  # EMA with a warm-up, so short runs are not dominated by the random init
                    torch._foreach_lerp_(list(ema.parameters()), params[0], 1 - min(cfg.ema, (1 + step) / (10 + step)))
            w_g, w_d = (torch.linalg.vector_norm(torch.stack(torch._foreach_norm(p))) for p in params)
            loop.log(**{'loss D': loss_d, 'loss G': loss_g, 'D(x)': d_real, 'D(G(z))': d_fake, '|grad D|': gnorm_d,
                        '|grad G|': gnorm_g, '|w G|': w_g, '|w D|': w_d},
                     **({'W': d_real - d_fake} if cfg.loss == 'wgan-gp' else {}))  # W: the Wasserstein estimate
            if loop.due('sample') and rank == 0:  # the same 64 z every time, so mode collapse shows
                g = torch.Generator(device).manual_seed(cfg.seed * 1_000_003)
                common.save_grid(draw(ema, cfg.z_dim, 0, 64, g), out / f'samples_{loop.done:07d}.png', 8)
            if cfg.fid_every and loop.due('fid') and rank == 0:
                x_fid = common.sample_many(partial(draw, ema, cfg.z_dim), cfg.fid_samples, cfg.sample_batch, cfg.seed,
                                           device, desc='FID samples')
                loop.write(f'fid{cfg.fid_samples} {scorer(x_fid):.4f}')
            G.train()  # drawing samples put it in eval mode (ema is G itself with --ema 0)
    common.print0(f'{out}/ckpt.pt, samples_{loop.done:07d}.png, log.txt; curves: python exercises/curves.py {out}')
    return G, D, loop.last


# -----------------------------------------------------------------------------
# Sampling from a checkpoint


def load_generator(out, device):
    """The EMA generator of a gan.py run (the raw G when trained with --ema 0), in eval mode, and its Config."""
    ckpt = common.load_ckpt(Path(out) / 'ckpt.pt', 'gan')
    cfg = Config(**{k: v for k, v in ckpt['config'].items() if k in Config.__dataclass_fields__})
    G = generator(cfg.z_dim, cfg.ch, *common.image_shape(cfg)[:2])
    G.load_state_dict(ckpt['ema'])
    return G.to(device).eval(), cfg


def sample(cfg):
    device = common.resolve_device(cfg.device)
    G, trained = load_generator(cfg.out, device)
    common.claim(cfg.out)  # not into a folder that a training run is writing
    x = common.sample_many(partial(draw, G, trained.z_dim), cfg.n_samples, cfg.sample_batch, cfg.seed, device)
    common.write_samples(x, cfg.out, 'samples', cfg.save)


def main(argv=None):
    cfg = common.parse_config(Config, PRESETS, pick, argv)
    cfg = dataclasses.replace(cfg, out=cfg.out or f'runs/gan-{Path(cfg.dataset).name}')
    with common.script_guard():  # (check first: a bad --dataset is one clear line too)
        check(cfg)
        return dict(train=train, sample=sample)[cfg.mode](cfg)


if __name__ == '__main__':
    main()
