"""GAN (Goodfellow et al. 2014, arXiv:1406.2661): a generator G(z) learns to fool a discriminator D trained to tell real
images from G's. DCGAN networks (Radford et al. 2016, arXiv:1511.06434) with the non-saturating loss (--loss bce) or
WGAN-GP (Gulrajani et al. 2017, arXiv:1704.00028, --loss wgan-gp), and the exercises' inpainting GAN.

    python gan.py --dataset mnist --device cpu             # CPU quick start (time and FID: README, gan.py section)
    python gan.py --dataset fashion-mnist --loss wgan-gp   # WGAN-GP, Alg. 1: n_critic 5, lambda 10, Adam(1e-4, 0, 0.9)
    torchrun --standalone --nproc_per_node=8 gan.py --dataset cifar10   # gradients averaged over the ranks
    python gan.py --mode sample --out runs/gan-mnist --n-samples 10000  # z ~ N(0, I), no truncation: PNGs + .npz
    python gan.py --mode beta1 --dataset mnist             # exercise: Adam beta1 0.5 vs 0.9 (trains both, compares)
    python gan.py --mode versus --epochs 5                 # exercise: BCE vs WGAN-GP after the same number of epochs
    python gan.py --mode inpaint                           # exercise: inpainting, masked MSE alone vs + adversarial
    python gan.py --mode bench --dataset cifar10           # img/s and peak memory of G+D training steps

Measured: the CPU quick start trains in 3 min 29 s on 2 CPU cores (6,000 steps, ch 32, 0.35M + 0.04M parameters);
FID 30.3 of 2,000 samples against the 10,000 MNIST test images (eval_fid.py, pytorch-fid mode). GPU: not yet run.
"""
import copy, dataclasses, json, math, re, sys, time
from contextlib import nullcontext
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.distributed as dist
import torch.nn as nn
import torch.nn.functional as F
from tqdm import tqdm

import common
import ddpm  # its U-Net is the inpainting generator


@dataclass
class Config:
    mode: str = 'train'  # train | sample | bench | beta1 | versus | inpaint (the last three: exercise studies)
    dataset: str = 'mnist'  # mnist | fashion-mnist | cifar10 | cifar10-subset (NOT CIFAR-10) | path of an image folder
    data_dir: str = ''  # folder with the official archives (default $GENMODELS_DATA, else ./data; fetched if missing)
    image_size: int = 32  # image folders only: 28, 32 or 64
    out: str = ''  # run folder (default runs/gan-<dataset>)
    device: str = 'auto'  # auto | cuda | cpu | mps
    seed: int = 0  # all training randomness is a function of (seed, rank, step)
    loss: str = 'bce'  # bce (non-saturating GAN) | wgan-gp
    z_dim: int = 100  # size of the latent z ~ N(0, I)
    ch: int = 64  # base channels of G and D (doubled at every halving of the resolution)
    gp_lambda: float = 10.0  # WGAN-GP penalty weight lambda
    n_critic: int = 1  # D steps per G step (the wgan-gp preset: 5)
    steps: int = 30000  # generator steps
    epochs: float = 0  # if > 0, replaces --steps: D sees every training image this many times
    batch_size: int = 64  # global batch, split evenly across ranks
    lr: float = 2e-4  # Adam learning rate of G and D
    beta1: float = 0.5  # Adam beta1 (DCGAN: 0.5)
    beta2: float = 0.999  # Adam beta2
    ema: float = 0.999  # EMA decay of G's weights, used for sampling and FID (0: off, the raw G)
    flip: bool = False  # random horizontal flips of the real images
    inpaint: bool = False  # train the inpainting U-Net g(x (1 - m), m) instead of G(z) (set by --mode inpaint)
    adv_weight: float = 0.01  # inpainting: weight of the adversarial term added to the masked MSE (0: MSE alone)
    resume: bool = False  # continue from --out/ckpt.pt
    log_every: int = 100  # steps between log lines
    sample_every: int = 1000  # steps between grids from the same fixed noise (0: only at the end)
    ckpt_every: int = 2000  # steps between checkpoints (also at the end and on Ctrl-C / SIGTERM)
    fid_every: int = 0  # steps between FID evaluations, and one at the end (0: off)
    fid_samples: int = 10000  # samples per FID evaluation
    fid_ref: str = ''  # FID reference (default <dataset>:train; eval_fid.py inputs: dataset:split, stats .npz)
    n_samples: int = 64  # --mode sample: number of images
    sample_batch: int = 500  # images per sampling batch
    save: str = 'png,npz'  # --mode sample: png (a folder of PNGs) and/or npz (uint8 (N, H, W, C))


PRESETS = {  # applied below explicit flags: by dataset, then loss, then 'cpu' on top when running on a CPU
    'cifar10': dict(steps=100000, flip=True),
    'wgan-gp': dict(lr=1e-4, beta1=0.0, beta2=0.9, n_critic=5),  # Gulrajani et al. Alg. 1 defaults
    'cpu': dict(ch=32, steps=6000, log_every=100, sample_every=1000, ckpt_every=1000, fid_samples=2000, ema=0.0),
}
MODEL_KEYS = ('dataset', 'image_size', 'loss', 'z_dim', 'ch', 'inpaint')
STUDIES = {  # exercise -> runs (label, flags); each run gets every other flag of the command
    'beta1': [('beta1-0.5', ['--beta1', '0.5']), ('beta1-0.9', ['--beta1', '0.9'])],
    'versus': [('bce', ['--loss', 'bce']), ('wgan-gp', ['--loss', 'wgan-gp'])],
    'inpaint': [('mse', ['--inpaint', '1', '--adv-weight', '0']), ('mse+adv', ['--inpaint', '1'])],
}


def presets(values):
    p = dict(PRESETS.get(values['dataset'], {}), **PRESETS.get(values['loss'], {}))
    if common.resolve_device(values['device']) == 'cpu':  # FID against the 10k test images: 1/6 of the Inception time
        p.update(PRESETS['cpu'], fid_ref=f"{values['dataset']}:test" if values['dataset'] in common.DATASETS else '')
    return p


# -----------------------------------------------------------------------------
# Objectives: D's loss on a real and a fake batch, G's loss on D's output for its fakes


def d_loss_fn(D, x_real, x_fake, cfg):
    """Loss of D, and the mean D(x), D(G(z)) for the log (probabilities for bce, critic values for wgan-gp)."""
    d_real, d_fake = D(x_real).flatten(), D(x_fake).flatten()  # logits (bce) or critic values (wgan-gp), (B,)
    if cfg.loss == 'bce':  # Goodfellow eq. 1: D ascends log D(x) + log(1 - D(G(z))), D = sigmoid(logit)
        loss = F.softplus(-d_real).mean() + F.softplus(d_fake).mean()  # -log sigmoid(l) = softplus(-l)
        return loss, torch.sigmoid(d_real).mean(), torch.sigmoid(d_fake).mean()
    # Gulrajani Alg. 1 line 7: L = D(x~) - D(x) + lambda (||grad D(x^)||_2 - 1)^2
    loss = d_fake.mean() - d_real.mean() + cfg.gp_lambda * gradient_penalty(D, x_real, x_fake)
    return loss, d_real.mean(), d_fake.mean()


def gradient_penalty(D, x_real, x_fake):
    """E (||grad D(x^)||_2 - 1)^2 at x^ = eps x + (1 - eps) x~ with ONE eps ~ U[0, 1] per example (Alg. 1 lines 4-6):
    x^ lies on the straight line between a real and a fake image. An eps per pixel would leave those lines."""
    eps = torch.rand(x_real.shape[0], *[1] * (x_real.dim() - 1), device=x_real.device)  # (B, 1, 1, 1)
    x_hat = (eps * x_real + (1 - eps) * x_fake).requires_grad_(True)
    grad, = torch.autograd.grad(D(x_hat).sum(), x_hat, create_graph=True)  # create_graph: the penalty is trained
    return (grad.flatten(1).norm(dim=1) - 1).pow(2).mean()


def g_loss_fn(d_fake, cfg):
    if cfg.loss == 'bce':  # sec. 3: maximise log D(G(z)) rather than minimise log(1 - D(G(z))), which saturates early
        return F.softplus(-d_fake.flatten()).mean()
    return -d_fake.mean()  # Alg. 1 line 11


def random_masks(n, size, device, generator=None):
    """m = 1 on a (size/2)^2 square at a random place in each image (the pixels to fill in): (n, 1, size, size)."""
    k, r = size // 2, torch.arange(size, device=device)
    top, left = torch.randint(0, size - k + 1, (2, n, 1, 1), device=device, generator=generator)
    return ((r[:, None] >= top) & (r[:, None] < top + k) & (r >= left) & (r < left + k)).float()[:, None]


def inpaint(g, x, m):
    """x' = (1 - m) x + m g(x (1 - m), m): g never sees a masked pixel, and the known pixels pass through unchanged."""
    t = torch.zeros(len(x), device=x.device)  # ddpm's U-Net takes a timestep; a constant one carries nothing
    return (1 - m) * x + m * g(torch.cat([x * (1 - m), m], 1), t)[:, :x.shape[1]]  # it outputs C + 1 channels: drop 1


# -----------------------------------------------------------------------------
# DCGAN networks (Radford et al. sec. 3): strided (transposed) convolutions, no pooling or hidden dense layers, batch
# norm in G (and in D for bce; never in a WGAN-GP critic, whose penalty is per example), ReLU/tanh in G, LeakyReLU in D


LEVELS = {28: 2, 32: 3, 64: 4}  # resolution halvings from the image down to 7x7 (28) or 4x4 (32, 64)


def generator(cfg, C, H):
    n, c = LEVELS[H], cfg.ch * 2 ** (LEVELS[H] - 1)
    layers = [nn.ConvTranspose2d(cfg.z_dim, c, H >> n, bias=False), nn.BatchNorm2d(c), nn.ReLU()]  # z -> (c, 7|4, ..)
    for _ in range(n - 1):
        layers += [nn.ConvTranspose2d(c, c // 2, 4, 2, 1, bias=False), nn.BatchNorm2d(c // 2), nn.ReLU()]
        c //= 2
    return init(nn.Sequential(*layers, nn.ConvTranspose2d(c, C, 4, 2, 1), nn.Tanh()))  # (B, C, H, W) in [-1, 1]


def discriminator(cfg, C, H):
    norm = nn.BatchNorm2d if cfg.loss == 'bce' else lambda c: nn.Identity()
    layers, c = [nn.Conv2d(C, cfg.ch, 4, 2, 1), nn.LeakyReLU(0.2)], cfg.ch  # no norm on D's input layer (sec. 3)
    for _ in range(LEVELS[H] - 1):
        layers += [nn.Conv2d(c, 2 * c, 4, 2, 1), norm(2 * c), nn.LeakyReLU(0.2)]
        c *= 2
    return init(nn.Sequential(*layers, nn.Conv2d(c, 1, H >> LEVELS[H])))  # (B, 1, 1, 1): a logit or critic value


def init(net):  # sec. 4: "all weights were initialized from a zero-centered Normal distribution with standard
    for m in net.modules():  # deviation 0.02"
        if isinstance(m, (nn.Conv2d, nn.ConvTranspose2d)):
            nn.init.normal_(m.weight, 0, 0.02)
    return net


def make_models(cfg, C, H):  # the inpainting G: a small ddpm U-Net on (masked image, mask), halving 2 or 3 times
    G = ddpm.UNet(C + 1, cfg.ch, (1, 2, 2) if H == 28 else (1, 2, 2, 2), 1, (), 0.0, H) if cfg.inpaint else None
    return G or generator(cfg, C, H), discriminator(cfg, C, H)


# -----------------------------------------------------------------------------
# Sampling: z ~ N(0, I) with no truncation, batch i from seed (seed, i); inpainting fills test images in fixed masks


@torch.no_grad()
def generate(G, n, cfg, device, x=None):
    """n images as uint8 (N, C, H, W), G in eval mode (batch norm: running statistics); x: uint8 images to in-fill."""
    G.eval()
    out = []
    for i in range(0, n, cfg.sample_batch):
        g, b = torch.Generator(device).manual_seed(cfg.seed * 1_000_003 + i), min(cfg.sample_batch, n - i)
        if x is None:
            out.append(common.to_uint8(G(torch.randn(b, cfg.z_dim, 1, 1, device=device, generator=g))))
        else:
            xb = x[i:i + b].to(device).float() / 127.5 - 1
            out.append(common.to_uint8(inpaint(G, xb, random_masks(b, xb.shape[-1], device, g))))
    G.train()
    return torch.cat(out)


def inpaint_rows(Gs, cfg, device, x_test, n=16):
    """Rows of n test images (uint8): masked input, each model's in-filling, the original."""
    x = x_test[:n].to(device)
    cfg, n = dataclasses.replace(cfg, sample_batch=len(x)), len(x)  # one batch: its masks are the ones drawn here
    m = random_masks(n, x.shape[-1], device, torch.Generator(device).manual_seed(cfg.seed * 1_000_003))
    return torch.cat([common.to_uint8((x / 127.5 - 1) * (1 - m)), *[generate(G, n, cfg, device, x) for G in Gs], x])


# -----------------------------------------------------------------------------
# Training


def check(cfg, world=1):
    choices = dict(mode=('train', 'sample', 'bench', *STUDIES), loss=('bce', 'wgan-gp'))
    for k, allowed in choices.items():
        if getattr(cfg, k) not in allowed:
            common.fail(f'--{k} {getattr(cfg, k)!r} is not one of: {", ".join(allowed)}')
    common.check_ranges(cfg, positive=('z_dim', 'ch', 'steps', 'batch_size', 'lr', 'n_critic', 'log_every',
                                       'ckpt_every', 'fid_samples', 'n_samples', 'sample_batch'),
                        nonnegative=('gp_lambda', 'epochs', 'sample_every', 'fid_every', 'adv_weight'),
                        unit=('beta1', 'beta2', 'ema'))
    if common.image_shape(cfg)[1] not in LEVELS or cfg.batch_size % world:
        common.fail(f'--image-size must be 28, 32 or 64 and --batch-size divisible by the {world} processes')
    if (cfg.inpaint or cfg.mode == 'inpaint') and (cfg.dataset not in common.DATASETS or cfg.ch % 4 or
                                                   cfg.loss != 'bce'):
        common.fail('inpainting needs a dataset with a test split (mnist, fashion-mnist, cifar10), --ch a multiple '
                    'of 4 and --loss bce')
    if cfg.ema >= 1 or cfg.fid_samples < 2:
        common.fail('--ema must be < 1 and --fid-samples >= 2')


def backward_step(loss, net, opt, world):
    """Backward, gradients averaged over the ranks by hand (DDP's reducer wants one backward per forward, but a GAN
    step runs D several times and the gradient penalty differentiates it twice), step; returns the gradient norm."""
    opt.zero_grad(set_to_none=True)
    loss.backward()
    grads = [p.grad for p in net.parameters() if p.grad is not None]
    if world > 1:
        flat = torch.cat([g.flatten() for g in grads])
        dist.all_reduce(flat)
        for g, f in zip(grads, (flat / world).split([g.numel() for g in grads])):
            g.copy_(f.view_as(g))
    opt.step()
    return nn.utils.get_total_norm(grads)


def train(cfg):
    device, rank, world = common.setup(cfg.device)
    check(cfg, world)
    out = Path(cfg.out)
    x = common.load_dataset(cfg.dataset, 'train', cfg.data_dir or None, cfg.image_size)[0].to(device)  # all of it
    x_test = common.load_dataset(cfg.dataset, 'test', cfg.data_dir or None)[0] if cfg.inpaint else None
    C, H, B = x.shape[1], x.shape[2], cfg.batch_size // world
    if cfg.epochs:  # an epoch: D's real batches cover the training set once
        cfg = dataclasses.replace(cfg, steps=max(1, round(cfg.epochs * len(x) / (cfg.batch_size * cfg.n_critic))))
    torch.manual_seed(cfg.seed)  # the same initial weights on every rank and in every run
    G, D = (net.to(device) for net in make_models(cfg, C, H))
    ema = copy.deepcopy(G).requires_grad_(False) if cfg.ema else G
    opt_g, opt_d = (torch.optim.Adam(n.parameters(), cfg.lr, betas=(cfg.beta1, cfg.beta2)) for n in (G, D))
    if rank == 0:
        common.claim(out)
    start = 0
    if cfg.resume:
        ckpt = common.load_ckpt(out / 'ckpt.pt', 'gan')
        common.check_resume(ckpt, cfg, MODEL_KEYS)
        for obj, key in ((G, 'G'), (D, 'D'), (ema, 'ema'), (opt_g, 'opt_g'), (opt_d, 'opt_d')):
            obj.load_state_dict(ckpt[key])
        start = ckpt['step']
    elif (out / 'ckpt.pt').exists():
        common.fail(f'{out}/ckpt.pt exists: pass --resume 1 to continue it, or another --out')
    size = lambda net: f'{sum(p.numel() for p in net.parameters()) / 1e6:.2f}M'
    common.print0(f'{cfg.dataset} {tuple(x.shape)} on {device} x{world} | {"U-Net" if cfg.inpaint else "G"} {size(G)}, '
                  f'D {size(D)} parameters | {cfg.loss} | steps {start} -> {cfg.steps}')
    if start >= cfg.steps:
        common.print0(f'{out}/ckpt.pt already reached step {start}: nothing to train (raise --steps to go on)')
        return G, D, None
    if rank == 0:
        (out / 'config.json').write_text(json.dumps(dataclasses.asdict(cfg), indent=1))
    if cfg.fid_every and rank == 0:
        import eval_fid  # only runs that ask for FID pay for the Inception network
        scorer = eval_fid.Scorer(cfg.fid_ref or f'{cfg.dataset}:train', device,  # a folder: its images in memory
                                 images=None if cfg.fid_ref or cfg.dataset in common.DATASETS else x)

    def fakes(xb):  # G's images for a real batch: G(z), or xb in-filled in random masks (then also the masks)
        if not cfg.inpaint:
            return G(torch.randn(B, cfg.z_dim, 1, 1, device=device)), None
        m = random_masks(B, H, device)
        return inpaint(G, xb, m), m

    def save(step):
        if rank == 0:
            common.save_ckpt(out / 'ckpt.pt', dict(script='gan', G=G.state_dict(), D=D.state_dict(), step=step,
                                                   ema=ema.state_dict(), opt_g=opt_g.state_dict(),
                                                   opt_d=opt_d.state_dict(), config=dataclasses.asdict(cfg)))

    with common.stop_requested() as stop, open(out / 'log.txt', 'a') if rank == 0 else nullcontext() as log:
        t0, last = time.perf_counter(), start
        pbar = tqdm(total=cfg.steps, initial=start, disable=rank != 0, dynamic_ncols=True)
        try:
            for step in range(start, cfg.steps):
                torch.manual_seed((cfg.seed * 1000 + rank) * 10 ** 9 + step)  # batches, z, masks, eps: exact on resume
                for _ in range(cfg.n_critic):  # Gulrajani Alg. 1 lines 2-9 (n_critic = 1: the DCGAN step)
                    xb = common.random_batch(x, None, B, cfg.flip)[0]
                    with torch.no_grad():
                        fake = fakes(xb)[0]
                    loss_d, d_real, d_fake = d_loss_fn(D, xb, fake, cfg)
                    gnorm_d = backward_step(loss_d, D, opt_d, world)
                xb = common.random_batch(x, None, B, cfg.flip)[0]
                fake, m = fakes(xb)
                D.requires_grad_(False)  # G's step needs gradients through D, not for D's weights
                loss_g = g_loss_fn(D(fake), cfg)
                D.requires_grad_(True)
                if cfg.inpaint:  # masked squared error (mean over the masked pixels) + the weighted adversarial loss
                    mse = ((fake - xb) ** 2 * m).sum() / (m.sum() * C)  # (--adv-weight 0: D still trains, as a monitor)
                    loss_g = mse + cfg.adv_weight * loss_g
                gnorm_g = backward_step(loss_g, G, opt_g, world)
                if cfg.ema:
                    with torch.no_grad():  # EMA with a warm-up, so short runs are not dominated by the random init
                        torch._foreach_lerp_(list(ema.parameters()), list(G.parameters()),
                                             1 - min(cfg.ema, (1 + step) / (10 + step)))
                        torch._foreach_copy_(list(ema.buffers()), list(G.buffers()))  # batch-norm statistics: G's own
                pbar.update()
                done = step + 1
                if world > 1 and done % cfg.log_every == 0:  # ranks agree on stopping: none waits in a collective
                    flag = torch.tensor([float(bool(stop))], device=device)
                    dist.all_reduce(flag, dist.ReduceOp.MAX)
                    stop[:] = [1] * bool(flag)
                halt = bool(stop) and (world == 1 or done % cfg.log_every == 0)
                final, do_ckpt = done == cfg.steps, halt or done % cfg.ckpt_every == 0 or done == cfg.steps
                if done % cfg.log_every == 0 or do_ckpt:
                    stats = {'loss D': loss_d, 'loss G': loss_g, 'D(x)': d_real, 'D(G(z))': d_fake, '|grad D|': gnorm_d,
                             '|grad G|': gnorm_g, **({'W': d_real - d_fake} if cfg.loss == 'wgan-gp' else {}),
                             **({'mse': mse} if cfg.inpaint else {})}  # W: the critic's Wasserstein estimate
                    stats = {k: v.item() for k, v in stats.items()}  # the only host sync of the loop
                    if not all(map(math.isfinite, stats.values())):
                        common.fail(f'non-finite loss at step {done} ({stats}): lower --lr, or check the data')
                    dt = (time.perf_counter() - t0) / (done - last)
                    pbar.set_postfix({k: f'{v:.3g}' for k, v in list(stats.items())[:4]})
                    if log:
                        print(f'step {done} | ' + ' | '.join(f'{k} {v:.4g}' for k, v in stats.items()) +
                              f' | ms/step {1000 * dt:.1f} | img/s {cfg.batch_size / dt:.0f}', file=log, flush=True)
                if halt:
                    raise KeyboardInterrupt  # -> save and exit 130, below
                if do_ckpt:
                    save(done)
                do_grid = (cfg.sample_every and done % cfg.sample_every == 0) or final
                if rank == 0 and (do_grid or (cfg.fid_every and (done % cfg.fid_every == 0 or final))):
                    with stop.now():  # a signal during sampling or FID stops at once; the state is consistent: save it
                        if do_grid:  # the same 64 z every time, so mode collapse shows
                            g = (inpaint_rows([ema], cfg, device, x_test) if cfg.inpaint else
                                 generate(ema, 64, cfg, device))
                            common.save_grid(g, out / f'samples_{done:07d}.png', 16 if cfg.inpaint else 8)
                        if cfg.fid_every and (done % cfg.fid_every == 0 or final):
                            score = scorer(generate(ema, cfg.fid_samples, cfg, device, x_test))
                            common.print0(f'\nstep {done} | FID-{cfg.fid_samples} {score:.2f}')
                            print(f'step {done} | fid{cfg.fid_samples} {score:.4f}', file=log, flush=True)
                            plot_logs({cfg.loss: out}, out / 'curves.png', out.name)
                if done % cfg.log_every == 0 or do_ckpt:
                    t0, last = time.perf_counter(), done  # timings exclude checkpoints, grids and FID
        except KeyboardInterrupt:  # Ctrl-C / SIGTERM: at a step boundary, or at once during sampling and FID
            save(done)
            common.print0(f'\nstopped at step {done}; checkpoint saved to {out}/ckpt.pt (continue with --resume 1)')
            raise SystemExit(130) from None
        pbar.close()
    if rank == 0:
        plot_logs({cfg.loss: out}, out / 'curves.png', out.name)
    common.print0(f'done: step {done} -> {out}/ckpt.pt, samples_{done:07d}.png, log.txt, curves.png')
    return G, D, stats


# -----------------------------------------------------------------------------
# Modes: sample, the exercise studies, bench


def load_generator(out, device):
    ckpt = common.load_ckpt(Path(out) / 'ckpt.pt', 'gan')
    cfg = Config(**{k: v for k, v in ckpt['config'].items() if k in Config.__dataclass_fields__})
    G = make_models(cfg, *common.image_shape(cfg)[:2])[0]
    G.load_state_dict(ckpt['ema'])
    return G.to(device), cfg


def sample(cfg):
    device = common.resolve_device(cfg.device)
    G, trained = load_generator(cfg.out, device)
    x_test = common.load_dataset(trained.dataset, 'test', cfg.data_dir or None)[0] if trained.inpaint else None
    x = generate(G, cfg.n_samples, dataclasses.replace(trained, seed=cfg.seed, sample_batch=cfg.sample_batch), device,
                 x_test)
    common.write_samples(x, cfg.out, 'samples', cfg.save)
    print(f'{len(x)} samples -> {cfg.out}/samples.npz, {cfg.out}/samples/, grid {cfg.out}/samples.png')


def read_log(path):
    """{series: (steps, values)} from a log.txt; the fid<N> lines are 'FID'."""
    series = {}
    for line in Path(path).read_text().splitlines():
        step, *fields = line.split(' | ')
        for key, value in (f.rsplit(' ', 1) for f in fields):
            s = series.setdefault('FID' if re.fullmatch(r'fid\d+', key) else key, ([], []))
            s[0].append(int(step.split()[1]))
            s[1].append(float(value))
    return series


def plot_logs(runs, path, title):
    """Losses, D outputs, gradient norms and FID (if logged) against steps for each run (label -> folder)."""
    plt, logs = common.pyplot(), {label: read_log(Path(folder) / 'log.txt') for label, folder in runs.items()}
    panels = [('loss', ['loss D', 'loss G', 'mse'], 'linear'), ('D output', ['D(x)', 'D(G(z))', 'W'], 'linear'),
              ('gradient norm', ['|grad D|', '|grad G|'], 'log'), ('FID', ['FID'], 'log')]
    panels = [p for p in panels if any(k in log for log in logs.values() for k in p[1])]
    fig, axes = plt.subplots(1, len(panels), figsize=(4.5 * len(panels), 4))
    for ax, (name, keys, scale) in zip(axes, panels):
        for i, (label, log) in enumerate(logs.items()):
            for j, k in enumerate(k for k in keys if k in log):
                ax.plot(*log[k], f'C{i}', ls=['-', ':', '--'][j], marker='o' * (k == 'FID'), label=f'{label}: {k}')
        ax.set(title=f'{title}: {name}', xlabel='generator step', ylabel=name, yscale=scale)
        ax.legend(fontsize=7)
    fig.savefig(path)
    plt.close(fig)


def study(cfg, argv):
    """Train each run of STUDIES[cfg.mode] into out/<label> with all other flags equal, then compare them."""
    out, runs = Path(cfg.out), {}
    for label, flags in STUDIES[cfg.mode]:  # FID at least at the end of each run
        sub = common.parse_config(Config, presets, argv + flags + ['--mode', 'train', '--out', str(out / label),
                                                                   '--fid-every', str(cfg.fid_every or 10 ** 9)])
        check(sub)
        train(sub)
        runs[label] = sub.out
    plot_logs(runs, out / f'{cfg.mode}.png', cfg.mode)
    rows = [(lambda fid: f'{label:10s} | steps {fid[0][-1]} | FID-{cfg.fid_samples} {fid[1][-1]:.2f}')(
        read_log(Path(folder) / 'log.txt')['FID']) for label, folder in runs.items()]
    if cfg.mode == 'inpaint':  # masked-region MSE of in-filled test images (FID above: the same images)
        device = common.resolve_device(cfg.device)
        x_test = common.load_dataset(cfg.dataset, 'test', cfg.data_dir or None)[0][:cfg.fid_samples]
        Gs = [load_generator(folder, device)[0] for folder in runs.values()]
        for i, G in enumerate(Gs):  # the error is 0 on the known pixels, a quarter of them is masked
            err = (generate(G, len(x_test), cfg, device, x_test).cpu().float() - x_test.float()) / 127.5
            rows[i] += f' | masked MSE {err.pow(2).sum() / (err.numel() / 4):.4f} ([-1, 1], {len(x_test)} test images)'
        common.save_grid(inpaint_rows(Gs, cfg, device, x_test), out / 'inpaint_test.png', 16)
    (out / f'{cfg.mode}.txt').write_text('\n'.join(rows) + '\n')
    print('\n'.join(rows) + f'\nwrote {out}/{cfg.mode}.txt, {cfg.mode}.png, a folder per run' +
          ', inpaint_test.png' * (cfg.mode == 'inpaint'))


def bench(cfg, steps=30):
    """img/s (G's images per second; each G step with its n_critic D steps) and peak memory: train() on the real data
    in a temporary folder, timed over the last third of the steps."""
    import tempfile
    cuda = 'cuda' in common.resolve_device(cfg.device)
    torch.cuda.reset_peak_memory_stats() if cuda else None
    with tempfile.TemporaryDirectory() as tmp:
        train(dataclasses.replace(cfg, mode='train', out=tmp, steps=steps, log_every=steps // 3, ckpt_every=steps,
                                  sample_every=0, fid_every=0, resume=False, epochs=0))
        log = read_log(Path(tmp) / 'log.txt')
    print(f'{torch.cuda.get_device_name() if cuda else "cpu"} | torch {torch.__version__} | {cfg.loss}, n_critic '
          f'{cfg.n_critic}, batch {cfg.batch_size}, ch {cfg.ch} | {log["ms/step"][1][-1]:.1f} ms/step | '
          f'{log["img/s"][1][-1]:.0f} img/s | peak memory ' +
          (f'{torch.cuda.max_memory_allocated() / 2**30:.2f} GiB (with the uint8 dataset)' if cuda else 'n/a on CPU'))


def main(argv=None):
    argv = sys.argv[1:] if argv is None else list(argv)
    cfg = common.parse_config(Config, presets, argv)
    default_out = f'runs/gan-{Path(cfg.dataset).name}' + f'-{cfg.mode}' * (cfg.mode in STUDIES)
    cfg = dataclasses.replace(cfg, out=cfg.out or default_out)
    check(cfg)
    with common.script_guard():
        if cfg.mode in STUDIES:
            return study(cfg, argv + ['--out', cfg.out])
        return dict(train=train, sample=sample, bench=bench)[cfg.mode](cfg)


if __name__ == '__main__':
    main()
