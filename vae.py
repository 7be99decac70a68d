"""VAE (Kingma & Welling 2014, arXiv:1312.6114) and beta-VAE (Higgins et al. 2017): encoder q(z|x) = N(mu, diag
sigma^2), reparameterisation z = mu + sigma eps, prior N(0, I), decoder p(x|z); trained on E_q[log p(x|z)] - beta
KL(q || p) and evaluated on the test split with the IWAE bound on log p(x) (Burda et al. 2016, arXiv:1509.00519).
--arch ae is the KL-regularised autoencoder with spatial latents that ldm.py builds on (Rombach et al. 2022, KL-f4):
vae.load_autoencoder(path) -> (model, cfg), model.encode(x) -> z, model.decode(z) -> x.

    python vae.py --dataset mnist                        # MLP VAE, Bernoulli on dynamically binarised MNIST, nats
    python vae.py --dataset cifar10                      # conv VAE, discretised logistic likelihood, bits/dim
    python vae.py --dataset mnist --arch ae              # f=4, c=4 autoencoder for ldm.py: 28x28 -> 7x7x4
    torchrun --standalone --nproc_per_node=8 vae.py --dataset cifar10
    python vae.py --mode eval --out runs/vae-mlp-mnist   # -ELBO, IWAE (k=1000), recon, KL, MSE, PSNR on the test set
    python vae.py --mode sample --out runs/vae-mlp-mnist --n-samples 10000   # samples.npz + PNGs for eval_fid.py
    python vae.py --mode interp --out runs/vae-mlp-mnist # interpolation between test images in latent space

Measured on 2 CPU cores (torch 2.13.0+cpu): `python vae.py --dataset mnist --device cpu` (preset mnist-cpu: MLP
784-512-512-32, 60 epochs) takes 7 min end to end: test -log p(x) <= 90.60 nats (IWAE, k = 1000, all 10,000 test
images), -ELBO 96.75. The f=4, c=4 autoencoder: test PSNR 29.7 dB on MNIST, 26.2 dB on cifar10-subset. README: how.
"""
import dataclasses, json, math
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn as nn
import torch.nn.functional as F
from tqdm import tqdm

import common


@dataclass
class Config:
    mode: str = 'train'  # train | eval | sample | interp (the last three read --out/ckpt.pt)
    preset: str = ''  # named settings below the flags given (listed at the end of --help); '': from the flags, device
    dataset: str = 'mnist'  # mnist | fashion-mnist | cifar10 | cifar10-subset | an .npz of uint8 images (N, H, W, C)
    data_dir: str = ''  # folder with the official archives (default $GENMODELS_DATA, else ./data)
    out: str = ''  # run folder (default runs/vae-<arch>-<dataset>)
    device: str = 'auto'  # auto | cuda | cpu | mps
    seed: int = 0  # all training randomness is a function of (seed, rank, step)
    arch: str = 'mlp'  # mlp (Kingma & Welling's MLP) | conv (convolutional, vector z) | ae (spatial z, for ldm.py)
    likelihood: str = 'bernoulli'  # p(x|z): bernoulli (binarised data) | logistic (discretised, 256 bins) | l1|l2 (ae)
    latent: int = 20  # latent dimension (mlp, conv) or latent channels c (ae)
    hidden: int = 400  # units of the MLP's hidden layers and of the conv model's linear layer
    depth: int = 1  # hidden layers in the MLP encoder and in the MLP decoder
    ch: int = 32  # base channels (conv, ae)
    f: int = 4  # ae: downsampling factor, 2 or 4 (H x W -> H/f x W/f x c)
    beta: float = 1.0  # weight of the KL term (1: the ELBO)
    beta_warmup: int = 0  # steps of linear KL warm-up from 0 to --beta (0: off)
    steps: int = 0  # optimizer steps (0: --epochs passes over the training set)
    epochs: int = 10  # passes over the training set when --steps is 0
    batch_size: int = 128  # global batch, split evenly across ranks
    lr: float = 1e-3  # Adam learning rate
    resume: bool = False  # continue from --out/ckpt.pt
    log_every: int = 100  # steps between log lines
    ckpt_every: int = 2000  # steps between checkpoints (also every epoch, at the end and on Ctrl-C / SIGTERM)
    fid_every: int = 0  # steps between FIDs of prior samples against the training set, and one at the end (0: off)
    fid_samples: int = 10000  # samples per FID
    rfid: int = 0  # evaluation: FID of the reconstructions of the first n test images against those images (0: off)
    eval_k: int = 1000  # importance samples per test image for the IWAE bound
    eval_n: int = 10000  # test images evaluated (the first n)
    n_samples: int = 100  # --mode sample: number of prior samples (samples.npz and a folder of PNGs)


MLP_CPU = dict(hidden=512, depth=2, latent=32, epochs=60)  # the 7-minute MNIST recipe (README)
AE = dict(arch='ae', likelihood='l1', beta=1e-6, latent=4, ch=64, epochs=20)  # LDM's KL-f4: kl_weight 1e-6
PRESETS = {'mnist': {}, 'mnist-cpu': MLP_CPU,  # Kingma & Welling's MLP 784-400-20; bigger and longer on a CPU
           'fashion-mnist': dict(likelihood='logistic'), 'fashion-mnist-cpu': dict(MLP_CPU, likelihood='logistic'),
           'rgb': dict(arch='conv', likelihood='logistic', latent=128, hidden=256, ch=64),  # cifar10, folders
           'ae': AE, 'ae-cpu': dict(AE, ch=16, steps=1500)}  # ae-cpu: 190k images, 3 epochs of MNIST


def pick(v):  # the preset when --preset is not given: the autoencoder, else by the data (and -cpu on a CPU)
    return 'ae' if v['arch'] == 'ae' else v['dataset'] if v['dataset'] in ('mnist', 'fashion-mnist') else 'rgb'



MODEL_KEYS = ('dataset', 'arch', 'likelihood', 'latent', 'hidden', 'depth', 'ch', 'f')
RECIPE_KEYS = ('seed', 'batch_size', 'lr', 'beta', 'beta_warmup')

# -----------------------------------------------------------------------------
# Maths: the KL term, the discretised logistic likelihood, the ELBO and IWAE bounds

LOG2PI = math.log(2 * math.pi)


def kl_normal(mu, logvar):
    """KL(N(mu, diag e^logvar) || N(0, I)) per example in closed form (Kingma & Welling 2014, App. B):
    -KL = 1/2 sum_j (1 + log sigma_j^2 - mu_j^2 - sigma_j^2)."""
    return 0.5 * (mu ** 2 + logvar.exp() - 1 - logvar).flatten(1).sum(1)


def discretised_logistic(x, mu, log_s):
    """log P(x) per pixel, x in {-1, -1 + 2/255, ..., 1} (8-bit k as 2k/255 - 1): the mass of a logistic(mu, s) on
    [x - 1/255, x + 1/255], the edge bins extended to -inf and +inf (Salimans et al. 2017, PixelCNN++ sec. 2.1).
    log(sigmoid(a) - sigmoid(b)) = logsigmoid(a) - softplus(b) + log(1 - e^(b - a)): exact and stable."""
    inv_s = torch.exp(-log_s.clamp(min=-7))
    a = torch.where(x > 0.999, torch.inf, (x - mu + 1 / 255) * inv_s)
    b = torch.where(x < -0.999, -torch.inf, (x - mu - 1 / 255) * inv_s)
    return F.logsigmoid(a) - F.softplus(b) + torch.log(-torch.expm1(b - a))


def bounds(model, x, k, chunk=20000, generator=None):
    """Per example, float64: E_q[log p(x|z)] (mean over k draws), KL(q(z|x) || p(z)) (closed form), and the IWAE bound
    log 1/k sum_i p(x, z_i) / q(z_i|x) <= log p(x), z_i ~ q(z|x) (Burda et al. eq. 8). ELBO = first - second.
    model has posterior(x) -> (mu, logvar) and log_px(x, z) -> (B,); z is decoded chunk // B draws at a time."""
    mu, logvar = model.posterior(x)
    std, n = (0.5 * logvar).exp(), max(1, chunk // len(x))
    log_w, log_px = [], []
    for i in range(0, k, n):
        eps = torch.randn((min(n, k - i), *mu.shape), device=mu.device, generator=generator)
        z = mu + std * eps  # (n, B, ...)
        log_q = -0.5 * (eps ** 2 + logvar + LOG2PI).flatten(2).sum(2)  # log q(z|x), (n, B)
        log_p = -0.5 * (z ** 2 + LOG2PI).flatten(2).sum(2)  # log p(z)
        lp = model.log_px(x.expand(len(z), *x.shape).flatten(0, 1), z.flatten(0, 1)).view(len(z), -1)
        log_w.append(lp + log_p - log_q)
        log_px.append(lp)
    log_w, log_px = torch.cat(log_w).double(), torch.cat(log_px).double()  # (k, B); the log-sum-exp in float64
    return log_px.mean(0), kl_normal(mu, logvar).double(), torch.logsumexp(log_w, 0) - math.log(k)


# -----------------------------------------------------------------------------
# Model: encoder x -> (mu, logvar), decoder z -> the parameters of p(x|z)


def mlp(sizes):
    return nn.Sequential(*[m for a, b in zip(sizes, sizes[1:]) for m in (nn.Linear(a, b), nn.ReLU())][:-1])


class Res(nn.Module):
    def __init__(self, ch):
        super().__init__()
        conv = [nn.Conv2d(ch, ch, 3, padding=1) for _ in range(2)]
        self.body = nn.Sequential(nn.SiLU(), conv[0], nn.SiLU(), conv[1])

    def forward(self, x):
        return x + self.body(x)


class VAE(nn.Module):
    def __init__(self, cfg, C, H):
        super().__init__()
        self.shape, self.likelihood, self.dataset = (C, H, H), cfg.likelihood, cfg.dataset
        out, L, h, ch = C * (2 if cfg.likelihood == 'logistic' else 1), cfg.latent, cfg.hidden, cfg.ch  # mu, log s
        if cfg.arch == 'mlp':  # Kingma & Welling App. C, with ReLU for tanh
            self.zshape = (L,)
            self.enc = nn.Sequential(nn.Flatten(), mlp([C * H * H] + [h] * cfg.depth + [2 * L]))
            self.dec = nn.Sequential(mlp([L] + [h] * cfg.depth + [out * H * H]), nn.Unflatten(1, (out, H, H)))
        elif cfg.arch == 'conv':  # two stride-2 convolutions each way: 28 -> 14 -> 7, 32 -> 16 -> 8
            s, self.zshape = H // 4, (L,)
            self.enc = nn.Sequential(nn.Conv2d(C, ch, 4, 2, 1), nn.ReLU(), nn.Conv2d(ch, 2 * ch, 4, 2, 1), nn.ReLU(),
                                     nn.Flatten(), mlp([2 * ch * s * s, h, 2 * L]))
            self.dec = nn.Sequential(mlp([L, h, 2 * ch * s * s]), nn.ReLU(), nn.Unflatten(1, (2 * ch, s, s)),
                                     nn.ConvTranspose2d(2 * ch, ch, 4, 2, 1), nn.ReLU(),
                                     nn.ConvTranspose2d(ch, out, 4, 2, 1))
        else:  # ae: residual conv stacks with log2(f) stride-2 stages; z is c x H/f x W/f
            n = int(math.log2(cfg.f))
            chs = [ch * 2 ** i for i in range(n + 1)]
            self.zshape = (L, H // cfg.f, H // cfg.f)
            down = [m for i in range(n) for m in (Res(chs[i]), nn.Conv2d(chs[i], chs[i + 1], 4, 2, 1))]
            up = [m for i in reversed(range(n)) for m in (nn.ConvTranspose2d(chs[i + 1], chs[i], 4, 2, 1), Res(chs[i]))]
            self.enc = nn.Sequential(nn.Conv2d(C, ch, 3, padding=1), *down, Res(chs[-1]), nn.SiLU(),
                                     nn.Conv2d(chs[-1], 2 * L, 3, padding=1))
            self.dec = nn.Sequential(nn.Conv2d(L, chs[-1], 3, padding=1), Res(chs[-1]), *up, nn.SiLU(),
                                     nn.Conv2d(ch, out, 3, padding=1))

    def posterior(self, x):  # x (B, C, H, W) in [-1, 1] -> mu, logvar, each (B, *zshape)
        if tuple(x.shape[1:]) != self.shape:
            common.fail(f'this model takes {"x".join(map(str, self.shape))} images ({self.dataset}); got '
                        f'{"x".join(map(str, x.shape[1:]))}')
        return self.enc(x).chunk(2, 1)

    def log_px(self, x, z):  # log p(x|z) per example, nats; for l1 / l2 minus the summed error, not a likelihood
        out = self.dec(z)
        if self.likelihood == 'bernoulli':  # x in {-1, 1}
            return -F.binary_cross_entropy_with_logits(out, (x + 1) / 2, reduction='none').flatten(1).sum(1)
        if self.likelihood == 'logistic':
            return discretised_logistic(x, *out.chunk(2, 1)).flatten(1).sum(1)
        return -((out - x).abs() if self.likelihood == 'l1' else (out - x) ** 2).flatten(1).sum(1)

    def forward(self, x):  # the ELBO's two terms with one reparameterised draw (Kingma & Welling eq. 10)
        mu, logvar = self.posterior(x)
        z = mu + (0.5 * logvar).exp() * torch.randn_like(mu)
        return self.log_px(x, z), kl_normal(mu, logvar)

    def encode(self, x):  # x in [-1, 1] -> z, the posterior mean (ldm.py's latents)
        return self.posterior(x)[0]

    def decode(self, z):  # z -> the mean image in [-1, 1] (Bernoulli: 2p - 1)
        out = self.dec(z)
        return torch.sigmoid(out) * 2 - 1 if self.likelihood == 'bernoulli' else out[:, :self.shape[0]].clamp(-1, 1)


def load_autoencoder(path):
    """The model of a finished vae.py run (eval mode, CPU) and its Config: model.encode(x) -> z, model.decode(z)."""
    ckpt = common.load_ckpt(path, 'vae')
    if ckpt['step'] < ckpt.get('steps', 0):
        common.fail(f'{path} is a run stopped at step {ckpt["step"]} of {ckpt["steps"]}: finish it first (vae.py '
                    f'--out {Path(path).parent} --resume 1 with its flags), or give a finished one')
    cfg = Config(**{k: v for k, v in ckpt['config'].items() if k in Config.__dataclass_fields__})
    model = VAE(cfg, *common.image_shape(cfg)[:2])
    model.load_state_dict(ckpt['model'])
    return model.eval(), cfg


# -----------------------------------------------------------------------------
# Data, sampling and evaluation


def to_model(x, likelihood, generator=None):
    """uint8 -> [-1, 1]; for the Bernoulli likelihood binarised, 1 with probability value / 255 (dynamic binarisation:
    a fresh draw every time a training image is used)."""
    x = x.float() / 255
    return (torch.bernoulli(x, generator=generator) if likelihood == 'bernoulli' else x) * 2 - 1


def test_set(cfg, device):  # the first --eval-n test images as the model sees them; binarised once, with seed 0
    x, _ = common.load_dataset(cfg.dataset, 'test', cfg.data_dir or None)
    return to_model(x[:cfg.eval_n], cfg.likelihood, torch.Generator().manual_seed(0)).to(device)


@torch.no_grad()
def sample(model, n, seed):  # n prior draws z ~ N(0, I) decoded to the mean image; the same seed, the same z
    z = torch.randn((n, *model.zshape), generator=torch.Generator().manual_seed(seed))
    return torch.cat([model.decode(zb.to(next(model.parameters()).device)) for zb in z.split(1000)])


@torch.no_grad()
def evaluate(model, test, cfg):
    """Test-set means: -ELBO = recon + KL and the IWAE bound on -log p(x), in nats per image for binarised data, else
    bits/dim = nats / (D ln 2) (P of the 8-bit values = the density of x + U[0, 1) on [0, 256)^D); MSE (pixels in
    [0, 1]) and PSNR (dB, per image, then the mean) of the 8-bit mean reconstruction; active units (Cov_x E_q[z] >
    0.01, Burda et al.); diversity: mean RMS distance between prior samples (pixels in [0, 1])."""
    model.eval()
    lik, D = cfg.likelihood in ('bernoulli', 'logistic'), test[0].numel()
    k = cfg.eval_k if lik else 1
    unit, name = dict(bernoulli=(1, 'nats'), logistic=(1 / (D * math.log(2)), 'bits/dim')).get(cfg.likelihood,
                                                                                                (1 / D, 'per dim'))
    g, sums, mus, recons = torch.Generator(test.device).manual_seed(cfg.seed), {}, [], []
    for x in tqdm(test.split(max(1, 20000 // k)), desc=f'evaluating (k={k})'):
        rec, kl, iwae = bounds(model, x, k, generator=g)
        mus.append(model.encode(x))
        recons.append(common.to_uint8(model.decode(mus[-1])))
        mse = ((recons[-1].float() - common.to_uint8(x).float()) / 255).pow(2).flatten(1).mean(1)
        for key, v in dict(recon=-rec * unit, kl=kl * unit, nelbo=(kl - rec) * unit, iwae=-iwae * unit, mse=mse,
                           psnr=-10 * mse.clamp(min=1e-10).log10()).items():
            sums[key] = sums.get(key, 0) + v.sum().item()
    m = {key: v / len(test) for key, v in sums.items() if lik or key not in ('nelbo', 'iwae')}
    m.update(unit=name, k=k, n=len(test), au=int((torch.cat(mus).flatten(1).var(0) > 0.01).sum()))
    s = sample(model, min(1000, len(test)), cfg.seed).flatten(1)
    m['diversity'] = (torch.pdist(s) / (2 * D ** 0.5)).mean().item()
    if cfg.rfid:
        import eval_fid  # only runs that ask for FID pay for the Inception network
        ref = common.to_uint8(test[:cfg.rfid])
        m['rfid'] = eval_fid.Scorer(None, test.device, images=ref)(torch.cat(recons)[:cfg.rfid])
    common.print0('test: ' + ' | '.join(f'{k} {v:.4f}' if isinstance(v, float) else f'{k} {v}' for k, v in m.items()))
    (Path(cfg.out) / 'eval.json').write_text(json.dumps(m, indent=1))
    return m


def recon_grid(model, x, path):  # row 1: test images, row 2: their mean reconstructions
    with torch.no_grad():
        common.save_grid(common.to_uint8(torch.cat([x, model.eval().decode(model.encode(x))])), path, nrow=len(x))
    model.train()


# -----------------------------------------------------------------------------
# Training


def check(cfg, world=1):
    common.check(cfg, dict(mode=('train', 'eval', 'sample', 'interp'), arch=('mlp', 'conv', 'ae'),
                           likelihood=('bernoulli', 'logistic', 'l1', 'l2')),
                 positive=('latent', 'hidden', 'depth', 'ch', 'epochs', 'batch_size', 'lr', 'log_every',
                           'ckpt_every', 'eval_k', 'eval_n', 'n_samples'),
                 nonnegative=('beta', 'beta_warmup', 'steps', 'fid_every', 'fid_samples', 'rfid'))
    down = cfg.f if cfg.arch == 'ae' else 4 if cfg.arch == 'conv' else 1
    if cfg.arch == 'ae' and cfg.f not in (2, 4):
        common.fail(f'--f {cfg.f}: the autoencoder downsamples by 2 or 4')
    if (size := common.image_shape(cfg)[1]) % down:
        common.fail(f'{size}x{size} images cannot be downsampled by {down}')
    if cfg.arch != 'ae' and cfg.likelihood in ('l1', 'l2'):
        common.fail(f'--likelihood {cfg.likelihood} is a reconstruction loss, not a likelihood: only for --arch ae')
    if cfg.batch_size % world:
        common.fail(f'--batch-size {cfg.batch_size} must be divisible by the {world} processes')


def train(cfg):
    device, rank, world = common.setup(cfg.device)
    check(cfg, world)
    out = Path(cfg.out)
    if rank == 0:
        common.claim(out)
    x = common.load_dataset(cfg.dataset, 'train', cfg.data_dir or None)[0].to(device)
    test, per_epoch = test_set(cfg, device), max(1, len(x) // cfg.batch_size)
    steps = cfg.steps or cfg.epochs * per_epoch
    torch.manual_seed(cfg.seed)  # the same initial weights on every rank and every run
    model = VAE(cfg, *x.shape[1:3]).to(device)
    opt = torch.optim.Adam(model.parameters(), lr=cfg.lr)
    if ckpt := common.resume(out, 'vae', cfg, MODEL_KEYS, RECIPE_KEYS):
        model.load_state_dict(ckpt['model']), common.load_opt(opt, ckpt['opt'])
    common.print0(f'{cfg.dataset} {tuple(x.shape)} on {device} x{world} | {cfg.arch} VAE, {cfg.likelihood}, '
                  f'{sum(p.numel() for p in model.parameters()) / 1e6:.3f}M parameters | steps '
                  f'{ckpt["step"] if ckpt else 0} -> {steps}')
    net = nn.parallel.DistributedDataParallel(model, [device] if 'cuda' in device else None) if world > 1 else model
    if cfg.fid_every and rank == 0:
        import eval_fid  # only runs that ask for FID pay for the Inception network
        scorer = eval_fid.run_scorer('', cfg.dataset, x, device)

    def save(step, clock):  # the loop calls it every --ckpt-every steps and epoch, at the end and on Ctrl-C
        common.save_ckpt(out / 'ckpt.pt', dict(script='vae', model=model.state_dict(), opt=opt.state_dict(),
                                               step=step, steps=steps, clock=clock, config=dataclasses.asdict(cfg)))

    with common.Loop(cfg, out, save, ckpt['step'] if ckpt else 0, steps, ckpt.get('clock', 0.0) if ckpt else 0.0,
                     epoch=per_epoch, fid=cfg.fid_every) as loop:
        for step in loop:
            beta = cfg.beta * min(1.0, (step + 1) / cfg.beta_warmup) if cfg.beta_warmup else cfg.beta
            xb = to_model(x[torch.randint(len(x), (cfg.batch_size // world,), device=device)], cfg.likelihood)
            rec, kl = net(xb)
            loss = (beta * kl - rec).mean()  # -ELBO per image when beta = 1
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            loop.log(recon=-rec.mean(), kl=kl.mean(), loss=loss, beta=beta)
            epoch = loop.done // per_epoch
            if loop.due('epoch') and rank == 0 and (epoch in (1, 2, 5) or epoch % 10 == 0):
                recon_grid(model, test[:10], out / f'recon_epoch{epoch:03d}.png')
            if cfg.fid_every and loop.due('fid') and rank == 0:
                x_fid = common.to_uint8(sample(model.eval(), cfg.fid_samples, cfg.seed))
                loop.write(f'fid{cfg.fid_samples} {scorer(x_fid):.4f}')
                model.train()
    if rank != 0:
        return model, None
    recon_grid(model, test[:10], out / 'recon.png')
    common.save_grid(common.to_uint8(sample(model, 100, cfg.seed)), out / 'prior.png', nrow=10)
    print(f'step {loop.done} -> {out}/ckpt.pt, prior.png (10x10 prior samples), recon.png, eval.json; training curves: '
          f'python exercises/curves.py {out}')
    return model, evaluate(model, test, cfg)


# -----------------------------------------------------------------------------
# Modes that read a checkpoint: evaluation, prior samples, interpolation


@torch.no_grad()
def from_checkpoint(cfg):
    device, out = common.setup(cfg.device)[0], Path(cfg.out)
    model, trained = load_autoencoder(out / 'ckpt.pt')
    common.claim(out)  # not into a folder that a training run is writing
    model, cfg = model.to(device), dataclasses.replace(cfg, **{k: getattr(trained, k) for k in MODEL_KEYS})
    if cfg.mode == 'eval':
        return evaluate(model, test_set(cfg, device), cfg)
    if cfg.mode == 'sample':
        common.write_samples(common.to_uint8(sample(model, cfg.n_samples, cfg.seed)), out, 'samples')
        return common.save_grid(common.to_uint8(sample(model, 100, cfg.seed)), out / 'prior.png', nrow=10)
    x = test_set(dataclasses.replace(cfg, eval_n=16), device)  # interp: z = (1 - t) mu_a + t mu_b for 8 pairs
    mu, t = model.encode(x), torch.linspace(0, 1, 10, device=device).view(1, 10, *[1] * len(model.zshape))
    z = (1 - t) * mu[0::2, None] + t * mu[1::2, None]  # (8, 10, *zshape)
    rows = torch.cat([x[0::2, None], model.decode(z.flatten(0, 1)).view(8, 10, *x.shape[1:]), x[1::2, None]], 1)
    common.save_grid(common.to_uint8(rows.flatten(0, 1)), out / 'interp.png', nrow=12)
    print(f'wrote {out}/interp.png (each row: test image a, 10 decoded points from mu_a to mu_b, test image b)')


def main(argv=None):
    cfg = common.parse_config(Config, PRESETS, pick, argv)
    cfg = dataclasses.replace(cfg, out=cfg.out or f'runs/vae-{cfg.arch}-{Path(cfg.dataset).name}')
    with common.script_guard():  # (check first: a bad --dataset is one clear line too)
        check(cfg)
        return (train if cfg.mode == 'train' else from_checkpoint)(cfg)


if __name__ == '__main__':
    main()
