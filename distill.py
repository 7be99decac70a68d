"""Few-step samplers distilled from a ddpm.py model. Progressive distillation (Salimans & Ho 2022, arXiv:2202.00512)
fits a student's one DDIM step to two of its teacher's and halves the steps stage by stage; consistency distillation
(Song et al. 2023, arXiv:2303.01469) fits f(x_sigma, sigma) = x_0 along the teacher's probability-flow ODE, so one
network evaluation maps noise to an image.

    python distill.py --teacher runs/ddpm-v --method progressive      # 1024 -> 512 -> ... -> 1 steps: stage_K.pt
    python distill.py --teacher runs/ddpm-v --method consistency      # one-step model: ckpt.pt
    python distill.py --mode sample --out runs/distill-progressive --stage 8 --n-samples 2000   # 4 steps, an .npz
    python distill.py --mode sample --out runs/distill-progressive --stage 0 --sample-steps 4   # the teacher's DDIM
    python distill.py --mode sample --out runs/distill-consistency --sample-steps 2

The teacher predicts v or x0 (ddpm.py --objective v): an eps-predicting student is ill-posed at one step, where x_0 =
(x_t - sqrt(1 - ab) eps) / sqrt(ab) divides by sqrt(ab) ~ 0 (Salimans & Ho sec. 4). Time is continuous, t in [0, 1]
as in sde.py (the network's label is t (T - 1), alpha_bar(t) follows the teacher's schedule), and every grid ends at
t = 0, the clean image (alpha_bar = 1). 1000 does not halve down to 1, so the teacher's first grid is t = k / 1024
(--start-steps). Measured on 2 CPU cores (README "distill.py"), FID-2000 of an 8-minute teacher's samplers:
progressive students 102.6 / 95.7 / 81.8 / 65.0 at 1 / 2 / 4 / 8 steps (the teacher's DDIM: 303.1 / 133.3 / 97.1 /
64.2), one-step consistency model 88.7.
"""
import copy, dataclasses, math, time
from contextlib import nullcontext
from dataclasses import dataclass
from functools import lru_cache, partial
from pathlib import Path

import torch
import torch.nn as nn

import common
import ddim
import ddpm
import sde


@dataclass
class Config:
    mode: str = 'train'  # train | sample (from --out)
    method: str = 'progressive'  # progressive (Salimans & Ho) | consistency (Song et al., consistency distillation)
    preset: str = ''  # named settings below the flags given (end of --help); '': the --method's, -cpu on a CPU
    teacher: str = ''  # train: a ddpm.py run folder (its ckpt.pt) or checkpoint file, trained with --objective v or x0
    out: str = ''  # run folder (default runs/distill-<method>)
    data_dir: str = ''  # folder with the teacher's dataset archives (default $GENMODELS_DATA, else ./data)
    device: str = 'auto'  # auto | cuda | cpu | mps
    seed: int = 0  # seeds the batches and the noise of training and of sampling
    # progressive
    start_steps: int = 1024  # the teacher's DDIM grid t = k / start_steps that the first student halves (power of 2)
    final_steps: int = 1  # the last student's steps (a power of 2): log2(start / final) stages
    # consistency: a Karras grid of noise levels sigma = sqrt((1 - ab) / ab), x / sqrt(ab) = x_0 + sigma eps
    N: int = 18  # noise levels sigma_min = s_1 < ... < s_N = sigma_max (rho = 7); the teacher's Euler steps join them
    sigma_min: float = 0.002  # the boundary f(x, sigma_min) = x, through c_skip and c_out
    sigma_max: float = 80.0  # where sampling starts (capped at the schedule's sigma at t = 1)
    mu: float = 0.95  # target network: theta- <- mu theta- + (1 - mu) theta, never a gradient
    distance: str = 'l2'  # l2 | huber (pseudo-Huber, c = 0.00054 sqrt(d), Song & Dhariwal 2023); no LPIPS offline
    sigma_mid: float = 1.0  # two-step sampling: the noise level the first image is noised back to
    # training
    steps: int = 20000  # optimizer steps per halving (progressive) or in all (consistency)
    batch_size: int = 128  # global batch, split evenly across ranks
    lr: float = 1e-4  # Adam learning rate (progressive: annealed linearly to 0 within each stage)
    grad_clip: float = 1.0  # max global gradient norm
    clip: bool = True  # clamp x0 to [-1, 1] in every DDIM step, the targets' and the samplers', as ddim.py does
    bf16: bool = True  # bf16 autocast for the networks on CUDA
    resume: bool = False  # continue from --out/ckpt.pt
    log_every: int = 100  # steps between log lines
    ckpt_every: int = 1000  # steps between checkpoints (also at the end and on Ctrl-C / SIGTERM; stages: stage_K.pt)
    # sampling
    stage: int = -1  # progressive: the stage K to sample (stage_K.pt, start_steps / 2^K steps; 0: the teacher; -1 last)
    sample_steps: int = 0  # steps (0: the stage's own; the teacher takes any; consistency 1 or 2)
    eta: float = 0.0  # the teacher's DDIM eta (stage 0): 0 deterministic, 1 the DDPM posterior variance
    n_samples: int = 64  # images
    sample_batch: int = 256  # images per sampling batch
    save: str = 'png,npz'  # png (a folder of PNGs) and/or npz (uint8 (N, H, W, C))


CPU = dict(batch_size=64, lr=3e-4, log_every=25, ckpt_every=100)  # measured on MNIST: README "distill.py"
PRESETS = {'progressive': {}, 'consistency': {}, 'progressive-cpu': dict(CPU, steps=300),
           'consistency-cpu': dict(CPU, steps=1500)}
MODEL_KEYS = ('method', 'teacher', 'start_steps', 'final_steps', 'steps', 'N', 'sigma_min', 'sigma_max', 'clip')
RECIPE_KEYS = ('seed', 'batch_size', 'lr', 'grad_clip', 'mu', 'distance')

# -----------------------------------------------------------------------------
# Time on the teacher's schedule: t in [0, 1], alpha_bar(0) = 1 (the clean end of every grid)


def alpha_bars(vp, ts):
    return torch.tensor([1.0 if t == 0 else vp.alpha_bar(t) for t in ts], dtype=torch.float64)


def x0_at(model, objective, vp, x, t, ab, clip=False):
    """The network's x0 at times t (B,) with alpha_bar ab (B, 1, 1, 1), clamped to [-1, 1] if clip."""
    x0 = ddpm.predict_x0(x, model(x, t * (vp.T - 1)).float(), ab, objective)
    return x0.clamp(-1, 1) if clip else x0


@torch.no_grad()
def sample_grid(model, x, vp, objective, N, eta=0.0, clip=False, generator=None):
    """x_1 -> x_0 by ddim.py's step (eq. 12) through t = N/N, (N-1)/N, ..., 1/N, 0: the progressive students' grid."""
    ts = [k / N for k in range(N, -1, -1)]
    ab = alpha_bars(vp, ts).tolist()
    for i in range(N):
        sigma = ddim.ddim_sigma(ab[i], ab[i + 1], eta)  # 0 into t = 0
        z = torch.randn(x.shape, device=x.device, generator=generator) if sigma > 0 else None
        out = model(x, torch.full((len(x),), ts[i] * (vp.T - 1), device=x.device))
        x = ddim.ddim_step(x, out, z, ab[i], ab[i + 1], sigma, objective, clip)
    return x.clamp(-1, 1)


# -----------------------------------------------------------------------------
# Progressive distillation, Salimans & Ho Alg. 2: a student of N steps learns two teacher steps per step


def ddim_jump(z, x0, ab_t, ab_s):
    """DDIM at eta = 0 from t to s, per image: z_s = alpha_s x0 + sigma_s (z_t - alpha_t x0) / sigma_t."""
    return ab_s.sqrt() * x0 + ((1 - ab_s) / (1 - ab_t)).sqrt() * (z - ab_t.sqrt() * x0)


def pd_target(teacher, z, k, ab):
    """The x0 that takes a student step from t = k / 2N to t'' = (k - 2) / 2N where two teacher steps take z, through
    the midpoint t' = (k - 1) / 2N first: z_t' and z_t'' by DDIM, then x~ = (z_t'' - (sigma_t'' / sigma_t) z_t) /
    (alpha_t'' - (sigma_t'' / sigma_t) alpha_t). teacher(z, k) is its x0 at grid point k; ab: alpha_bar (2N + 1,)."""
    a = lambda j: ab[j].view(-1, *[1] * (z.dim() - 1))
    z1 = ddim_jump(z, teacher(z, k), a(k), a(k - 1))  # t' = t - 1/2N
    z2 = ddim_jump(z1, teacher(z1, k - 1), a(k - 1), a(k - 2))  # t'' = t - 1/N
    r = ((1 - a(k - 2)) / (1 - a(k))).sqrt()  # sigma_t'' / sigma_t
    return (z2 - r * z) / (a(k - 2).sqrt() - r * a(k).sqrt())


@lru_cache
def pd_grid(vp, N, device):  # alpha_bar at t = k / 2N, k = 0..2N: the teacher's grid, made once per stage
    return alpha_bars(vp, [k / (2 * N) for k in range(2 * N + 1)]).to(device, torch.float32)


def pd_loss(student, teacher, x0, N, vp, objective, clip):
    """Truncated-SNR weighted max(SNR, 1) |x~ - x0_student|^2 at t = i / N, i ~ U{1..N} (their sec. 4 and Alg. 2)."""
    ab = pd_grid(vp, N, x0.device)

    def grid(net, clamp):  # the network's x0 at points k of the grid
        return lambda z, k: x0_at(net, objective, vp, z, k / (2 * N), ab[k].view(-1, 1, 1, 1), clamp)
    k = 2 * torch.randint(1, N + 1, (len(x0),), device=x0.device)
    abt = ab[k].view(-1, 1, 1, 1)
    z = ddpm.q_sample(x0, abt, torch.randn_like(x0))
    with torch.no_grad():
        target = pd_target(grid(teacher, clip), z, k, ab)
    w = (abt / (1 - abt)).clamp(min=1)
    return (w * (grid(student, False)(z, k) - target) ** 2).mean()


# -----------------------------------------------------------------------------
# Consistency distillation, Song et al. Alg. 2, in sigma: x^ = x / sqrt(ab) = x_0 + sigma eps, ab = 1 / (1 + sigma^2)


def karras(N, smin, smax, rho=7.0):  # Karras et al. 2022 eq. 5, ascending: s_1 = smin, s_N = smax
    u = torch.arange(N, dtype=torch.float64) / (N - 1)
    return (smin ** (1 / rho) + u * (smax ** (1 / rho) - smin ** (1 / rho))) ** rho


def time_of(vp, sigma):
    """The t with alpha_bar(t) = 1 / (1 + sigma^2), by bisection (alpha_bar falls with t); 0 below the schedule's
    smallest noise level, 1 above its largest."""
    lo, hi, target = 0.0, 1.0, -math.log1p(sigma ** 2)
    for _ in range(60):
        mid = (lo + hi) / 2
        lo, hi = (mid, hi) if vp.log_alpha_bar(mid) > target else (lo, mid)
    return lo


def c_skip_out(sigma, smin, sd=1.0):
    """Song et al. App. C: c_skip = sd^2 / ((sigma - smin)^2 + sd^2), c_out = sd (sigma - smin) / sqrt(sd^2 +
    sigma^2), so c_skip(smin) = 1, c_out(smin) = 0 and f(x, smin) = x exactly. sd = 1: a v-network is then EDM's F."""
    return sd ** 2 / ((sigma - smin) ** 2 + sd ** 2), sd * (sigma - smin) / (sd ** 2 + sigma ** 2).sqrt()


def levels(vp, sigmas):  # noise levels as (sigma, t) float32 tensors
    return torch.tensor(sigmas, dtype=torch.float32), torch.tensor([time_of(vp, s) for s in sigmas])


def denoised(model, objective, vp, xh, sigma, t):  # the network's x0 from x^ at (sigma, t), each (B,)
    ab = 1 / (1 + sigma.view(-1, *[1] * (xh.dim() - 1)) ** 2)
    return x0_at(model, objective, vp, xh * ab.sqrt(), t, ab)


def consistency(model, objective, vp, xh, sigma, t, smin):
    """f(x^, sigma) = c_skip x^ + c_out F, F = (x0 - ab x^) / (sigma sqrt(ab)) from the network's x0 at x = sqrt(ab)
    x^: for a v-network F = -v exactly, so a copy of the teacher starts as the teacher's denoiser (up to smin)."""
    x0 = denoised(model, objective, vp, xh, sigma, t)
    sigma = sigma.view(-1, *[1] * (xh.dim() - 1))
    ab, (c_skip, c_out) = 1 / (1 + sigma ** 2), c_skip_out(sigma, smin)
    return c_skip * xh + c_out * (x0 - ab * xh) / (sigma * ab.sqrt())


def distance(a, b, kind):
    if kind == 'l2':
        return (a - b).pow(2).flatten(1).mean(1)
    c = 0.00054 * a[0].numel() ** 0.5
    return ((a - b).pow(2).flatten(1).sum(1) + c * c).sqrt() - c


def cd_loss(online, target, teacher, x0, grid, vp, objective, cfg):
    """n ~ U{1..N-1}: x^_{n+1} = x_0 + s_{n+1} eps, one Euler step of the teacher's PF-ODE dx^/dsigma = (x^ - D) / sigma
    (DDIM at eta 0) down to s_n, and d(f_online(x^_{n+1}, s_{n+1}), f_target(x^_n, s_n)) with lambda = 1."""
    sigmas, ts = grid
    n = torch.randint(0, len(sigmas) - 1, (len(x0),), device=x0.device)
    s, t = (sigmas[n], sigmas[n + 1]), (ts[n], ts[n + 1])
    xh = x0 + s[1].view(-1, 1, 1, 1) * torch.randn_like(x0)
    with torch.no_grad():
        d = denoised(teacher, objective, vp, xh, s[1], t[1])
        xh_n = xh + ((s[0] - s[1]) / s[1]).view(-1, 1, 1, 1) * (xh - d)
        goal = consistency(target, objective, vp, xh_n, s[0], t[0], cfg.sigma_min)
    return distance(consistency(online, objective, vp, xh, s[1], t[1], cfg.sigma_min), goal, cfg.distance).mean()


@torch.no_grad()
def cd_sample(model, z, vp, objective, grid, smin, generator=None):
    """Song et al. Alg. 1 through the levels grid = (sigmas, ts), descending: x = f(sigma_1 z, sigma_1), then at each
    later sigma, x = f(x + sqrt(sigma^2 - smin^2) z', sigma)."""
    x = torch.zeros_like(z)
    for i, (s, t) in enumerate(zip(*grid)):
        noise = z if i == 0 else torch.randn(z.shape, device=z.device, generator=generator)
        at = lambda v: torch.full((len(z),), v.item(), device=z.device)
        x = consistency(model, objective, vp, x + math.sqrt(s ** 2 - smin ** 2 * (i > 0)) * noise, at(s), at(t), smin)
    return x.clamp(-1, 1)


# -----------------------------------------------------------------------------
# Training


def stage_model(ck):  # the U-Net of a distill.py checkpoint, and the Config of the ddpm.py model it was distilled from
    mcfg = ddpm.Config(**ck['teacher'])
    model = ddpm.make_model(mcfg, *common.image_shape(mcfg)[:2])
    model.load_state_dict(ck['model'])
    return model.eval(), mcfg


def load_teacher(path, start_steps):
    """A ddpm.py checkpoint, or a progressive stage_K.pt to distil further (with --start-steps its steps)."""
    if not path:
        common.fail('give --teacher: a ddpm.py run folder (or its ckpt.pt) trained with --objective v or x0')
    path = Path(path) / 'ckpt.pt' if Path(path).is_dir() else Path(path)
    if path.is_file() and isinstance(ck := common.torch_load(path), dict) and ck.get('steps') and ck.get('teacher'):
        if ck['steps'] != start_steps:
            common.fail(f'{path} is a {ck["steps"]}-step student: distil it on with --start-steps {ck["steps"]}')
        model, mcfg = stage_model(common.load_ckpt(path, 'distill'))
    else:
        model, mcfg = ddpm.load_model(path)  # refuses a missing file and other scripts' checkpoints
    if mcfg.objective == 'eps':
        common.fail(f'{path} predicts eps: a one-step student cannot (x0 = (x - sqrt(1 - ab) eps) / sqrt(ab) blows up '
                    f'at ab ~ 0); train the teacher with ddpm.py --objective v (or x0)')
    return model.requires_grad_(False), mcfg


def schedule(cfg, mcfg):
    """The stages' student steps (progressive: start/2, ..., final) or the consistency grid of noise levels."""
    vp = sde.VPSDE(mcfg.schedule, mcfg.T)
    if cfg.method == 'progressive':
        return vp, [cfg.start_steps >> k for k in range(1, int(math.log2(cfg.start_steps // cfg.final_steps)) + 1)]
    return vp, levels(vp, karras(cfg.N, cfg.sigma_min, min(cfg.sigma_max, math.sqrt(1 / vp.alpha_bar(1) - 1))).tolist())


def train(cfg):
    device, rank, world = common.setup(cfg.device)
    teacher, mcfg = load_teacher(cfg.teacher, cfg.start_steps)
    out, cuda = Path(cfg.out), 'cuda' in device
    if cfg.batch_size % world:
        common.fail(f'--batch-size {cfg.batch_size} must be divisible by the {world} processes')
    if rank == 0:
        common.claim(out)
    x = common.load_dataset(mcfg.dataset, 'train', cfg.data_dir or None)[0].to(device)
    vp, plan = schedule(cfg, mcfg)
    teacher = teacher.to(device)
    student = copy.deepcopy(teacher).requires_grad_(True).train()  # both methods start from the teacher
    frozen = teacher if cfg.method == 'progressive' else copy.deepcopy(teacher)  # PD's teacher, CD's target network
    opt = torch.optim.Adam(student.parameters(), lr=cfg.lr)
    if ckpt := common.resume(out, 'distill', cfg, MODEL_KEYS, RECIPE_KEYS):
        student.load_state_dict(ckpt['model']), frozen.load_state_dict(ckpt['frozen'])
        common.load_opt(opt, ckpt['opt'])
    elif rank == 0 and cfg.method == 'progressive':  # stage 0 is the teacher itself, sampled like the students
        save_stage(out, 0, teacher, cfg.start_steps, cfg, mcfg)
    stages = len(plan) if cfg.method == 'progressive' else 1
    common.print0(f'teacher {cfg.teacher} ({mcfg.dataset}, {mcfg.objective}, {mcfg.schedule}) on {device} x{world} | '
                  + (f'{stages} stages: {cfg.start_steps} -> {" -> ".join(map(str, plan))} steps, {cfg.steps} '
                     f'optimizer steps each' if cfg.method == 'progressive' else
                     f'consistency over sigma {plan[0][0]:.3g} .. {plan[0][-1]:.3g} (N = {cfg.N}), {cfg.steps} steps'))
    net = nn.parallel.DistributedDataParallel(student, device_ids=[device] if cuda else None) if world > 1 else student
    amp = torch.autocast('cuda', torch.bfloat16) if cfg.bf16 and cuda else nullcontext()
    grid = [v.to(device) for v in plan] if cfg.method == 'consistency' else None
    params, frozen_params = list(student.parameters()), list(frozen.parameters())

    def save(step, clock):
        common.save_ckpt(out / 'ckpt.pt', dict(script='distill', model=student.state_dict(), frozen=frozen.state_dict(),
                                               opt=opt.state_dict(), step=step, clock=clock,
                                               config=dataclasses.asdict(cfg), teacher=dataclasses.asdict(mcfg)))

    start, clock = (ckpt['step'], ckpt['clock']) if ckpt else (0, 0.0)
    with common.Loop(cfg, out, save, start, steps=stages * cfg.steps, clock=clock) as loop:
        for step in loop:
            stage, i = divmod(step, cfg.steps)
            x0 = common.random_batch(x, None, cfg.batch_size // world, mcfg.flip)[0]
            if cfg.method == 'progressive':
                opt.param_groups[0]['lr'] = cfg.lr * (1 - i / cfg.steps)
                with amp:
                    loss = pd_loss(net, frozen, x0, plan[stage], vp, mcfg.objective, cfg.clip)
            else:
                with amp:
                    loss = cd_loss(net, frozen, teacher, x0, grid, vp, mcfg.objective, cfg)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            nn.utils.clip_grad_norm_(params, cfg.grad_clip)
            opt.step()
            if cfg.method == 'consistency':  # the target moves only by this EMA
                with torch.no_grad():
                    torch._foreach_lerp_(frozen_params, params, 1 - cfg.mu)
            elif i == cfg.steps - 1:  # a stage ends: the student is saved and becomes the next stage's teacher
                if rank == 0:
                    save_stage(out, stage + 1, student, plan[stage], cfg, mcfg)
                frozen.load_state_dict(student.state_dict())
                opt.state.clear()  # the next student starts with fresh Adam moments
            loop.log(loss=loss)
            if cfg.method == 'progressive' and i == cfg.steps - 1:
                loop.write(f'stage {stage + 1} ({plan[stage]} steps) -> {out}/stage_{stage + 1}.pt')


def save_stage(out, k, model, steps, cfg, mcfg):
    common.save_ckpt(out / f'stage_{k}.pt', dict(script='distill', model=model.state_dict(), steps=steps,
                                                 config=dataclasses.asdict(cfg), teacher=dataclasses.asdict(mcfg)))


# -----------------------------------------------------------------------------
# Sampling from a run folder


def sample_from_run(cfg):
    device = common.setup(cfg.device)[0]
    out = Path(cfg.out)
    stages = sorted(int(p.stem.split('_')[1]) for p in out.glob('stage_*.pt'))
    if not stages and not (out / 'ckpt.pt').exists():
        common.fail(f'{out} holds no distill.py run (no ckpt.pt or stage_K.pt): train first, or give its --out')
    if not stages:  # consistency
        ck, method = common.load_ckpt(out / 'ckpt.pt', 'distill'), 'consistency'
    else:
        k = stages[-1] if cfg.stage < 0 and stages else cfg.stage
        if k not in stages:
            common.fail(f'{out} has no stage_{k}.pt (stages: {", ".join(map(str, stages)) or "none; train first"})')
        ck, method = common.load_ckpt(out / f'stage_{k}.pt', 'distill'), 'progressive'
    rcfg, (model, mcfg) = Config(**ck['config']), stage_model(ck)
    model, vp, shape = model.to(device), sde.VPSDE(mcfg.schedule, mcfg.T), common.image_shape(mcfg)
    if method == 'progressive':
        S = cfg.sample_steps or ck['steps']
        if k > 0 and (S != ck['steps'] or cfg.eta):
            common.fail(f'stage {k} was distilled for {ck["steps"]} deterministic steps: drop --sample-steps / --eta '
                        f'(the teacher, --stage 0, takes any)')
        run = partial(sample_grid, vp=vp, objective=mcfg.objective, N=S, eta=cfg.eta, clip=rcfg.clip)
        tag = f'samples_stage{k}-N{S}' + f'-eta{cfg.eta:g}' * (cfg.eta > 0)
    else:
        S = cfg.sample_steps or 1
        if S > 2:
            common.fail(f'--sample-steps {S}: consistency sampling here takes 1 or 2 steps')
        top = schedule(rcfg, mcfg)[1][0][-1].item()
        if S == 2 and not cfg.sigma_mid < top:
            common.fail(f"--sigma-mid {cfg.sigma_mid} must be below the first step's sigma {top:.3g}")
        grid = levels(vp, [top, cfg.sigma_mid][:S])
        run = partial(cd_sample, vp=vp, objective=mcfg.objective, grid=grid, smin=rcfg.sigma_min)
        tag = f'samples_cd-N{S}' + f'-mid{cfg.sigma_mid:g}' * (S == 2)

    def draw(start, n, generator):
        z = torch.randn(n, *shape, device=device, generator=generator)
        with torch.autocast('cuda', torch.bfloat16) if cfg.bf16 and 'cuda' in device else nullcontext():
            return common.to_uint8(run(model, z, generator=generator))
    common.claim(out)
    t0 = time.perf_counter()
    x = common.sample_many(draw, cfg.n_samples, cfg.sample_batch, cfg.seed, device)
    ms = 1000 * (time.perf_counter() - t0) / len(x)
    common.write_samples(x, out, tag, cfg.save)
    print(f'{method}: {S} network evaluations per image, {ms:.1f} ms/image on {device} (batch {cfg.sample_batch})')


def check(cfg):
    common.check(cfg, dict(mode=('train', 'sample'), method=('progressive', 'consistency'), distance=('l2', 'huber')),
                 positive=('steps', 'batch_size', 'lr', 'log_every', 'ckpt_every', 'n_samples', 'sample_batch',
                           'sigma_min', 'sigma_mid'),
                 nonnegative=('grad_clip', 'sample_steps'), unit=('mu', 'eta'))
    powers = [s for s in (cfg.start_steps, cfg.final_steps) if s < 1 or s & (s - 1)]
    if powers or cfg.final_steps >= cfg.start_steps:
        common.fail(f'--start-steps {cfg.start_steps} and --final-steps {cfg.final_steps} must be powers of 2 with '
                    f'final < start (every stage halves the steps)')
    if cfg.N < 2 or not cfg.sigma_min < cfg.sigma_mid < cfg.sigma_max:
        common.fail(f'--N {cfg.N} must be >= 2 and --sigma-min < --sigma-mid < --sigma-max')


def main(argv=None):
    cfg = common.parse_config(Config, PRESETS, lambda v: v['method'] if v['method'] in PRESETS else 'progressive',
                              argv)
    cfg = dataclasses.replace(cfg, out=cfg.out or f'runs/distill-{cfg.method}')
    with common.script_guard():
        check(cfg)
        return dict(train=train, sample=sample_from_run)[cfg.mode](cfg)


if __name__ == '__main__':
    main()
