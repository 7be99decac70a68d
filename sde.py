"""DDPM as a variance-preserving SDE (Song et al. 2021, arXiv:2011.13456). A ddpm.py network trained on the discrete
chain is the score of the forward SDE
    dx = -1/2 beta(t) x dt + sqrt(beta(t)) dw,  t in [0, 1]                                            (eq. 11)
through s(x, t) = grad log p_t(x) = -eps(x, t) / sqrt(1 - alpha_bar(t)): the score of q(x_t | x_0) is
-(x_t - sqrt(ab) x_0) / (1 - ab) = -eps / sqrt(1 - ab). Samplers of the reverse SDE (eq. 6) and of the
probability-flow ODE (eq. 13), and two likelihoods in bits/dim: the DDPM variational bound (Ho et al. 2020, eq. 5)
and the exact NLL of the ODE (Song et al. App. D).

    python sde.py --out runs/ddpm-mnist --sampler pc --n-samples 2000      # samples_pc-N1000.npz for eval_fid.py
    python sde.py --out runs/ddpm-mnist --sampler rk45                      # adaptive Dormand-Prince, NFE printed
    python sde.py --out runs/ddpm-mnist --mode nll --n-images 200           # ELBO and PF-ODE bits/dim, MNIST test
    python sde.py --out runs/ddpm-mnist --mode compare                      # PF-ODE Euler against DDIM, one x_T

Measured (2 CPU cores, the CPU quick-start model, README "sde.py"): ELBO <= 1.818 and PF-ODE 1.686 bits/dim on the
first 200 MNIST test images; FID-2000 of the PF-ODE with RK45 92.6 at 433 evaluations per image.
"""
import json, math, time
from dataclasses import dataclass
from functools import partial
from pathlib import Path

import torch
from torch.special import log_ndtr
from tqdm import tqdm

import common
import ddim
import ddpm


@dataclass
class Config:
    mode: str = 'sample'  # sample | nll | compare (each reads a ddpm.py checkpoint)
    out: str = ''  # ddpm.py run folder (reads ckpt.pt; results are written here)
    ckpt: str = ''  # checkpoint file, if not <out>/ckpt.pt
    device: str = 'auto'  # auto | cuda | cpu | mps
    seed: int = 0  # seeds x_T and the noise, per batch: the same samples on any number of GPUs
    sampler: str = 'pc'  # em (Euler-Maruyama) | rd (reverse diffusion) | pc (rd + Langevin) | heun | rk45 (PF-ODE)
    steps: int = 1000  # N: time steps from t = 1 to --eps (heun: 2 network evaluations each)
    spacing: str = 'uniform'  # heun's time grid: uniform in t | quadratic (t - eps ~ (i / N)^2: denser near t = eps)
    snr: float = 0.16  # pc: the Langevin corrector's signal-to-noise ratio r (Song et al. App. G)
    eps: float = 1e-3  # sampling stops at t = eps, then takes the noise-free E[x_0 | x_eps]
    rtol: float = 1e-5  # rk45 tolerances (sampling and the likelihood ODE)
    atol: float = 1e-5  # a step is accepted when its error per pixel is within atol + rtol |x| (RMS)
    n_samples: int = 64  # sample: number of images
    sample_batch: int = 250  # images per batch (sampling and likelihoods)
    save: str = 'png,npz'  # sample: png (a folder of PNGs) and/or npz (uint8 (N, H, W, C))
    n_images: int = 200  # nll: the first n test images
    probes: int = 1  # nll: Rademacher probes K of the Hutchinson divergence (0: the exact trace, D backward passes)
    nll_eps: float = 1e-5  # nll: the ODE starts at t = eps
    data_dir: str = ''  # folder with the dataset archives (default $GENMODELS_DATA, else ./data)


# -----------------------------------------------------------------------------
# The VP-SDE of a ddpm.py schedule: beta(t) and alpha_bar(t) = exp(-int_0^t beta(s) ds); the network's label is t (T-1)


class VPSDE:
    """Linear schedule: Song et al.'s beta(t) = beta_min + t (beta_max - beta_min), with beta_min, beta_max = T times
    Ho's 1e-4 and 0.02 (0.1 and 20 at T = 1000), so the discrete chain is its discretisation at t_i = i / (T - 1) and
    log alpha_bar(t) = -beta_min t - (beta_max - beta_min) t^2 / 2. Cosine and sigmoid: log alpha_bar(t) interpolates
    the discrete values linearly between the t_i, so beta(t) = -d log alpha_bar / dt is piecewise constant."""

    def __init__(self, schedule, T):
        self.schedule, self.T = schedule, T
        self.log_ab = ddpm.make_alpha_bar(schedule, T).log().tolist()
        self.b0, self.b1 = 1e-4 * T, 0.02 * T

    def _cell(self, t):  # (i, fraction) of t between t_i and t_{i+1}
        u = min(max(t, 0.0), 1.0) * (self.T - 1)
        i = min(int(u), self.T - 2)
        return i, u - i

    def log_alpha_bar(self, t):
        if self.schedule == 'linear':
            return -self.b0 * t - 0.5 * (self.b1 - self.b0) * t * t
        i, f = self._cell(t)
        return (1 - f) * self.log_ab[i] + f * self.log_ab[i + 1]

    def alpha_bar(self, t):
        return math.exp(self.log_alpha_bar(t))

    def beta(self, t):
        if self.schedule == 'linear':
            return self.b0 + t * (self.b1 - self.b0)
        i, _ = self._cell(t)
        return (self.log_ab[i] - self.log_ab[i + 1]) * (self.T - 1)


def eps_hat(model, x, t, sde, objective):
    """The network's noise prediction at continuous time t (its label t (T - 1) need not be an integer), from any of
    ddpm.py's objectives (x0 and v are converted through alpha_bar(t))."""
    out = model(x, torch.full((len(x),), t * (sde.T - 1), device=x.device)).float()
    if objective == 'eps':
        return out
    ab = torch.tensor(sde.alpha_bar(t), dtype=torch.float64)
    return ddpm.predict_eps(x, ddpm.predict_x0(x, out, ab, objective), ab).float()


def score(model, x, t, sde, objective):  # s(x, t) = -eps / sqrt(1 - alpha_bar(t))
    return -eps_hat(model, x, t, sde, objective) / math.sqrt(1 - sde.alpha_bar(t))


def ode_drift(model, x, t, sde, objective):  # eq. 13: dx/dt = f - g^2 s / 2 = -beta(t) / 2 (x + s(x, t))
    return -0.5 * sde.beta(t) * (x + score(model, x, t, sde, objective))


def denoise(model, x, t, sde, objective):  # E[x_0 | x_t] (Tweedie), the noise-free last step of every sampler
    return (x - math.sqrt(1 - sde.alpha_bar(t)) * eps_hat(model, x, t, sde, objective)) / math.sqrt(sde.alpha_bar(t))


# -----------------------------------------------------------------------------
# Samplers: x_1 ~ N(0, I) -> x_eps, then E[x_0 | x_eps]. Each returns (x_0, network evaluations per image)


@torch.no_grad()
def reverse_sde(model, x, sde, objective, sampler, N, eps, snr=0.16, generator=None):
    """The reverse SDE dx = [f(x, t) - g(t)^2 s(x, t)] dt + g(t) dw (eq. 6) from t = 1 to eps in N steps:
    em:  Euler-Maruyama, x <- x + (beta x / 2 + beta s) |dt| + sqrt(beta |dt|) z;
    rd:  the reverse-diffusion predictor (App. E): the forward step x_t = sqrt(1 - b) x_t' + sqrt(b) z from the next
         time t' < t (b = 1 - ab(t) / ab(t')) reversed, x <- (2 - sqrt(1 - b)) x + b s + sqrt(b) z;
    pc:  rd, then one Langevin corrector step (App. G, Alg. 5) at the new time t', which is where x now lives."""
    ts = torch.linspace(1, eps, N + 1, dtype=torch.float64).tolist()
    noise = lambda: torch.randn(x.shape, device=x.device, generator=generator)
    for t, t_next in tqdm(list(zip(ts, ts[1:])), desc=sampler, leave=False, disable=N < 100):
        s = score(model, x, t, sde, objective)
        if sampler == 'em':
            beta, dt = sde.beta(t), t - t_next
            x = x + (0.5 * beta * x + beta * s) * dt + math.sqrt(beta * dt) * noise()
        else:
            b = 1 - sde.alpha_bar(t) / sde.alpha_bar(t_next)
            x = (2 - math.sqrt(1 - b)) * x + b * s + math.sqrt(b) * noise()
            if sampler == 'pc':
                x = langevin(x, score(model, x, t_next, sde, objective), noise(), snr, 1 - b)
    return denoise(model, x, eps, sde, objective), N * (2 if sampler == 'pc' else 1) + 1


def langevin(x, s, z, snr, alpha):
    """One Langevin step x <- x + e s + sqrt(2 e) z with e = 2 alpha (r |z| / |s|)^2 per image (Alg. 5): the step is
    sized so that the noise is r times the score step."""
    e = 2 * alpha * (snr * z.flatten(1).norm(dim=1) / s.flatten(1).norm(dim=1)) ** 2
    e = e.view(-1, *[1] * (x.dim() - 1))
    return x + e * s + (2 * e).sqrt() * z


@torch.no_grad()
def heun(f, x, ts):
    """Heun's method (the explicit trapezoid rule) for dx/dt = f(x, t) through the times ts; 2 evaluations a step."""
    for t, t_next in tqdm(list(zip(ts, ts[1:])), desc='heun', leave=False, disable=len(ts) < 100):
        d = f(x, t)
        x = x + (t_next - t) / 2 * (d + f(x + (t_next - t) * d, t_next))
    return x


DP_C = [0, 1 / 5, 3 / 10, 4 / 5, 8 / 9, 1]  # Dormand & Prince 1980: nodes, stages, 5th-order weights (= stage 7)
DP_A = [[], [1 / 5], [3 / 40, 9 / 40], [44 / 45, -56 / 15, 32 / 9],
        [19372 / 6561, -25360 / 2187, 64448 / 6561, -212 / 729],
        [9017 / 3168, -355 / 33, 46732 / 5247, 49 / 176, -5103 / 18656],
        [35 / 384, 0, 500 / 1113, 125 / 192, -2187 / 6784, 11 / 84]]
DP_E = [71 / 57600, 0, -71 / 16695, 71 / 1920, -17253 / 339200, 22 / 525, -1 / 40]  # 5th minus embedded 4th order


def rk45(f, x, t0, t1, rtol, atol):
    """Dormand-Prince 5(4) with step-size control (Hairer, Norsett & Wanner, II.4): the 5th-order solution is kept, the
    embedded 4th-order one estimates the error, a step is accepted when its RMS of err / (atol + rtol |x|) is <= 1, and
    the next step is scaled by 0.9 err^(-1/5) within [0.2, 10]. Its last stage is the next step's first (FSAL).
    Returns (x(t1), evaluations of f). One step size for the whole batch, as scipy's solve_ivp on the flat batch."""
    t, h, k1, nfe = t0, (t1 - t0) / 100, f(x, t0), 1
    bar = tqdm(total=1.0, desc='rk45', leave=False, bar_format='{l_bar}{bar}| [{elapsed}{postfix}]')
    while (t1 - t) * (t1 - t0) > 1e-12 * (t1 - t0) ** 2:
        h = math.copysign(min(abs(h), abs(t1 - t)), t1 - t0)
        ks = [k1]
        for c, a in zip(DP_C[1:], DP_A[1:-1]):
            ks.append(f(x + h * sum(aj * k for aj, k in zip(a, ks)), t + c * h))
        x5 = x + h * sum(b * k for b, k in zip(DP_A[-1], ks))
        ks.append(f(x5, t + h))
        nfe += 6
        err = h * sum(e * k for e, k in zip(DP_E, ks))
        r = (err / (atol + rtol * torch.maximum(x.abs(), x5.abs()))).pow(2).mean().sqrt().item()
        if r <= 1:
            t, x, k1 = t + h, x5, ks[-1]
            bar.update(h / (t1 - t0))
            bar.set_postfix_str(f't {t:.4f}, {nfe} evaluations')
        h *= min(10.0, max(0.2, 0.9 * r ** -0.2)) if r > 0 else 10.0
    bar.close()
    return x, nfe


def sample(model, x, sde, objective, cfg, generator=None):
    """x_1 -> x_0 in [-1, 1] with cfg's sampler: (images, network evaluations per image)."""
    if cfg.sampler in ('em', 'rd', 'pc'):
        x, nfe = reverse_sde(model, x, sde, objective, cfg.sampler, cfg.steps, cfg.eps, cfg.snr, generator)
        return x.clamp(-1, 1), nfe
    f = partial(ode_drift, model, sde=sde, objective=objective)
    with torch.no_grad():
        if cfg.sampler == 'heun':
            u = torch.linspace(1, 0, cfg.steps + 1, dtype=torch.float64) ** (2 if cfg.spacing == 'quadratic' else 1)
            x, nfe = heun(f, x, (cfg.eps + (1 - cfg.eps) * u).tolist()), 2 * cfg.steps
        else:
            x, nfe = rk45(f, x, 1.0, cfg.eps, cfg.rtol, cfg.atol)
        return denoise(model, x, cfg.eps, sde, objective).clamp(-1, 1), nfe + 1


# -----------------------------------------------------------------------------
# Likelihoods in bits/dim of 8-bit images


def bits_per_dim(log_p_y, D):
    """-log2 p(x) / D for x = k + u on [0, 256)^D from log p(y) of y = x / 128 - 1 on [-1, 1]^D: p(x) = p(y) / 128^D,
    so the offset is log2(256 / 2) = 7 bits (8 for data on [0, 1]). Jensen: an upper bound on -log2 P(k) / D."""
    return -log_p_y / (D * math.log(2)) + 7


def ode_log_p(model, y, sde, objective, probes, eps, rtol, atol, generator=None):
    """log p(y) in nats per image by the probability-flow ODE (App. D), integrated from t = eps to 1 with
    d log p / dt = -div f~: log p_0(y) = log N(x(1); 0, I) + int div f~ dt. The divergence is Hutchinson's
    v^T (df~/dx) v with K Rademacher v fixed along each path (probes 0: the exact trace). Returns (log p, NFE)."""
    B, D = len(y), y[0].numel()
    if probes:
        v = torch.randint(0, 2, (probes, *y.shape), device=y.device, generator=generator).float() * 2 - 1
    else:
        v = torch.eye(D, device=y.device).view(D, 1, *y.shape[1:]).expand(D, *y.shape)

    def f(state, t):  # state: (B, D + 1), x and the integrated divergence
        with torch.enable_grad():
            x = state[:, :D].reshape(y.shape).detach().requires_grad_(True)
            drift = ode_drift(model, x, t, sde, objective)
            div = sum((torch.autograd.grad(drift, x, vk, retain_graph=True)[0] * vk).flatten(1).sum(1) for vk in v)
        return torch.cat([drift.detach().flatten(1), div[:, None] / (len(v) if probes else 1)], 1)

    state, nfe = rk45(f, torch.cat([y.flatten(1), y.new_zeros(B, 1)], 1), eps, 1.0, rtol, atol)
    z, delta = state[:, :D], state[:, D]
    return -0.5 * (z ** 2).sum(1) - 0.5 * D * math.log(2 * math.pi) + delta, nfe


def discretised_gaussian(x, mu, sigma):
    """log P(x) per pixel under Ho et al.'s decoder (eq. 13): the N(mu, sigma^2) mass of x's bin [x - 1/255,
    x + 1/255], the edge bins extended to -inf and +inf. log(Phi(b) - Phi(a)) is taken in the lower tail, where
    log_ndtr is accurate: for a > 0, Phi(b) - Phi(a) = Phi(-a) - Phi(-b)."""
    a = torch.where(x < -0.999, -torch.inf, (x - 1 / 255 - mu) / sigma)
    b = torch.where(x > 0.999, torch.inf, (x + 1 / 255 - mu) / sigma)
    lo, hi = torch.where(a > 0, -b, a), torch.where(a > 0, -a, b)
    return log_ndtr(hi) + torch.log1p(-torch.exp(log_ndtr(lo) - log_ndtr(hi)))


def gauss_kl(mu1, var1, mu2, var2):  # KL(N(mu1, var1) || N(mu2, var2)) summed over the pixels of each image
    return 0.5 * (math.log(var2 / var1) + (var1 + (mu1 - mu2) ** 2) / var2 - 1).flatten(1).sum(1)


@torch.no_grad()
def elbo_nats(model, x0, ab, objective, var, generator=None):
    """Ho et al.'s bound (eq. 5) on -log p(x_0) in nats per image, x_0 the 8-bit images on [-1, 1], every term
    computed: L_T = KL(q(x_T | x_0) || N(0, I)); L_{t-1} = KL(q(x_{t-1} | x_t, x_0) || p(x_{t-1} | x_t)) for t > 1,
    at one x_t ~ q(x_t | x_0) each; L_0 = -log p(x_0 | x_1), the discretised Gaussian decoder (T evaluations).
    Indices here are the paper's t - 1. p's variance: beta tilde (--var small) or beta (large); at t = 1 both use
    beta tilde of t = 2, as Ho et al.'s code does (beta tilde_1 = 0)."""
    ab, T = ab.tolist(), len(ab)
    total = gauss_kl(math.sqrt(ab[-1]) * x0.double(), 1 - ab[-1], 0.0, 1.0)
    for i in tqdm(reversed(range(T)), total=T, desc='ELBO terms', leave=False):
        ab_prev = ab[i - 1] if i > 0 else 1.0
        xt = ddpm.q_sample(x0, torch.tensor(ab[i]), torch.randn(x0.shape, device=x0.device, generator=generator))
        out = model(xt, torch.full((len(x0),), i, device=x0.device)).float()
        x0_hat = ddpm.predict_x0(xt, out, torch.tensor(ab[i], dtype=torch.float64), objective)
        mean, post_var = ddpm.q_posterior(x0_hat.double(), xt.double(), ab[i], ab_prev)  # p's mean: x0_hat in eq. 7
        if i == 0:  # mean = x0_hat
            total -= discretised_gaussian(x0.double(), mean, math.sqrt((1 - ab[0]) / (1 - ab[1]) * (1 - ab[1] / ab[0]))
                                          ).flatten(1).sum(1)
        else:
            true_mean, _ = ddpm.q_posterior(x0.double(), xt.double(), ab[i], ab_prev)
            total += gauss_kl(true_mean, post_var, mean, post_var if var == 'small' else 1 - ab[i] / ab_prev)
    return total


# -----------------------------------------------------------------------------
# Modes


def load(cfg, device):
    model, mcfg = ddpm.load_model(cfg.ckpt or Path(cfg.out) / 'ckpt.pt')  # refuses other scripts' checkpoints
    return model.to(device).eval(), mcfg, VPSDE(mcfg.schedule, mcfg.T), Path(cfg.out or Path(cfg.ckpt).parent)


def sample_mode(cfg, device):
    model, mcfg, sde, out = load(cfg, device)
    shape, nfe = common.image_shape(mcfg), []

    def draw(start, n, generator):
        x, k = sample(model, torch.randn(n, *shape, device=device, generator=generator), sde, mcfg.objective, cfg,
                      generator)
        nfe.append((k, n))
        return common.to_uint8(x)
    common.claim(out)
    tag = f'samples_{cfg.sampler}-' + (f'tol{cfg.rtol:g}' if cfg.sampler == 'rk45' else f'N{cfg.steps}') + \
        '-quadratic' * (cfg.sampler == 'heun' and cfg.spacing == 'quadratic')
    t0 = time.perf_counter()
    x = common.sample_many(draw, cfg.n_samples, cfg.sample_batch, cfg.seed, device,
                           keep=common.keep_dir(out, tag, cfg, cfg.ckpt or out / 'ckpt.pt'))
    seconds, drawn = time.perf_counter() - t0, sum(n for _, n in nfe)  # not the batches an earlier run kept
    common.write_samples(x, out, tag, cfg.save)
    if nfe:
        print(f'{cfg.sampler}: {sum(k for k, _ in nfe) / len(nfe):.0f} network evaluations per image (mean over '
              f'{len(nfe)} batches), {1000 * seconds / drawn:.1f} ms/image on {device}')


def nll_mode(cfg, device):
    """ELBO and PF-ODE bits/dim of the first --n-images test images, each batch's noise seeded by (seed, batch)."""
    model, mcfg, sde, out = load(cfg, device)
    x = common.load_dataset(mcfg.dataset, 'test', cfg.data_dir or None)[0][:cfg.n_images].to(device)
    D, ab, elbo, ode, nfe = x[0].numel(), ddpm.make_alpha_bar(mcfg.schedule, mcfg.T), [], [], []
    common.claim(out)
    for i in tqdm(range(0, len(x), cfg.sample_batch), desc='batches'):
        g = torch.Generator(device).manual_seed(cfg.seed * 1_000_003 + i)
        xb = x[i:i + cfg.sample_batch]
        elbo.append(elbo_nats(model, xb.float() / 127.5 - 1, ab, mcfg.objective, mcfg.var, g) / (D * math.log(2)))
        y = (xb.float() + torch.rand(xb.shape, device=device, generator=g)) / 128 - 1  # dequantised, on [-1, 1]
        log_p, k = ode_log_p(model, y, sde, mcfg.objective, cfg.probes, cfg.nll_eps, cfg.rtol, cfg.atol, g)
        ode.append(bits_per_dim(log_p, D))
        nfe.append(k)
    r = {k: (torch.cat(v).mean().item(), torch.cat(v).std().item() / len(x) ** 0.5) for k, v in
         (('elbo', elbo), ('ode', ode))}
    r.update(n_images=len(x), probes=cfg.probes, rtol=cfg.rtol, atol=cfg.atol, eps=cfg.nll_eps, var=mcfg.var,
             ode_nfe=sum(nfe) / len(nfe), dequantisation='x = k + u, u ~ U[0, 1), one draw per image; y = x / 128 - 1')
    (out / 'nll.json').write_text(json.dumps(r, indent=1))
    print(f'{mcfg.dataset} test, first {len(x)} images: ELBO <= {r["elbo"][0]:.4f} +- {r["elbo"][1]:.4f} bits/dim '
          f'(every term, --var {mcfg.var}); PF-ODE {r["ode"][0]:.4f} +- {r["ode"][1]:.4f} bits/dim (dequantised, '
          f'K = {cfg.probes}, rtol = atol = {cfg.rtol:g}, t from {cfg.nll_eps:g}, {r["ode_nfe"]:.0f} evaluations) '
          f'-> {out}/nll.json')


@torch.no_grad()
def same_noise_distance(model, x, sde, objective, N, eps):
    """Mean |x_ode - x_ddim| per pixel ([-1, 1] units) after N Euler steps of the PF-ODE and N DDIM (eta 0) steps
    through the same times from the same x_1, both ended by E[x_0 | x_eps]: two first-order discretisations of one
    ODE, so the distance falls as N grows."""
    ts = torch.linspace(1, eps, N + 1, dtype=torch.float64).tolist()
    a = b = x
    for t, t_next in zip(ts, ts[1:]):
        a = a + (t_next - t) * ode_drift(model, a, t, sde, objective)
        out = model(b, torch.full((len(b),), t * (sde.T - 1), device=b.device))
        b = ddim.ddim_step(b, out, None, sde.alpha_bar(t), sde.alpha_bar(t_next), 0.0, objective, False)
    a, b = (denoise(model, v, eps, sde, objective).clamp(-1, 1) for v in (a, b))
    return (a - b).abs().mean().item()


def compare_mode(cfg, device):
    model, mcfg, sde, out = load(cfg, device)
    x = torch.randn(min(cfg.n_samples, cfg.sample_batch), *common.image_shape(mcfg), device=device,
                    generator=torch.Generator(device).manual_seed(cfg.seed))
    for N in (10, 100, 1000):
        d = same_noise_distance(model, x, sde, mcfg.objective, N, cfg.eps)
        print(f'N = {N:4d}: mean |PF-ODE Euler - DDIM| = {d:.5f} per pixel ([-1, 1]), {127.5 * d:.3f} / 255')


def main(argv=None):
    cfg = common.parse_config(Config, argv=argv)
    common.check(cfg, dict(mode=('sample', 'nll', 'compare'), sampler=('em', 'rd', 'pc', 'heun', 'rk45'),
                                 spacing=('uniform', 'quadratic')),
                 positive=('steps', 'n_samples', 'sample_batch', 'n_images', 'rtol', 'atol'),
                 nonnegative=('snr', 'probes'))
    if not (cfg.out or cfg.ckpt):
        common.fail('give --out (a ddpm.py run folder) or --ckpt')
    if not 0 < cfg.eps < 1 or not 0 < cfg.nll_eps < 1:
        common.fail(f'--eps {cfg.eps} and --nll-eps {cfg.nll_eps} must be in (0, 1): the score diverges at t = 0')
    device = common.setup(cfg.device)[0]
    with common.script_guard():
        return dict(sample=sample_mode, nll=nll_mode, compare=compare_mode)[cfg.mode](cfg, device)


if __name__ == '__main__':
    main()
