"""Exercise: a RealNVP flow on two moons, built from flows.py's ActNorm and Coupling on points in the plane, trained by
exact maximum likelihood. moons.png shows held-out points, p(x) on a 300 x 300 grid (its integral in the title) and
samples; the mass farther than 0.25 (5 noise sigmas) from both arcs measures the bridge a bijection cannot cut.
    python exercises/moons.py                    # 16 couplings, 5,000 steps: README "flows.py"
"""
import math, os, sys
from dataclasses import asdict, dataclass
from pathlib import Path

import torch
import torch.nn as nn

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))  # the scripts, one folder up
import common, flows
from exercises.curves import pyplot


@dataclass
class Config:
    out: str = 'runs/flows-moons'  # run folder
    device: str = 'cpu'  # cpu | cuda | auto
    seed: int = 0  # the data (20k training and 5k held-out points) and all training randomness
    couplings: int = 16  # affine couplings with alternating masks
    ch: int = 128  # hidden units of each s/t MLP
    blocks: int = 2  # hidden layers of each s/t MLP
    steps: int = 5000  # optimizer steps
    batch_size: int = 256  # points per step
    lr: float = 1e-3  # Adam, linear warm-up then cosine decay (as flows.py)
    warmup: int = 100  # linear learning-rate warm-up steps
    grad_clip: float = 100.0  # max global gradient norm
    resume: bool = False  # continue from --out/ckpt.pt
    log_every: int = 500  # steps between log lines
    ckpt_every: int = 5000  # steps between checkpoints


def two_moons(n, generator, noise=0.05):
    """n points on two interleaved half circles plus Gaussian noise (what scikit-learn's make_moons draws)."""
    theta = math.pi * torch.rand(n, generator=generator)
    upper = torch.rand(n, generator=generator) < 0.5
    x1 = torch.where(upper, theta.cos(), 1 - theta.cos())
    x2 = torch.where(upper, theta.sin(), 0.5 - theta.sin())
    return torch.stack([x1, x2], 1) + noise * torch.randn(n, 2, generator=generator)


def moons_distance(x):
    """Distance of points (N, 2) to the nearer of the two noiseless half circles two_moons draws from."""
    def arc(q, upper):  # distance to the unit half circle above (upper) or below the x axis of q's frame
        on_side = q[:, 1] >= 0 if upper else q[:, 1] <= 0
        ends = torch.stack([(q - torch.tensor([e, 0.0])).norm(dim=1) for e in (-1.0, 1.0)]).amin(0)
        return torch.where(on_side, (q.norm(dim=1) - 1).abs(), ends)
    return torch.minimum(arc(x, True), arc(x - torch.tensor([1.0, 0.5]), False))


def mlp(ch, layers):
    """The s/t net of a point coupling: (x_a, mask bit) -> ch (x layers) -> (s, t); zero last layer: y = x at first."""
    net = nn.Sequential(nn.Linear(3, ch), *[m for _ in range(layers - 1) for m in (nn.ReLU(), nn.Linear(ch, ch))],
                        nn.ReLU(), nn.Linear(ch, 4))
    nn.init.zeros_(net[-1].weight)
    nn.init.zeros_(net[-1].bias)
    return net


def make_flow(cfg):
    masks = torch.tensor([[1.0, 0.0]]), torch.tensor([[0.0, 1.0]])
    return flows.Flow([[m for k in range(cfg.couplings)
                        for m in (flows.ActNorm(2), flows.Coupling(masks[k % 2], mlp(cfg.ch, cfg.blocks), 2))]])


def grid_points(lim, n):
    """The n x n points of a grid over lim = (x_lo, x_hi, y_lo, y_hi), (n * n, 2) row by row along y; a cell's area."""
    xs, ys = torch.linspace(lim[0], lim[1], n), torch.linspace(lim[2], lim[3], n)
    points = torch.stack(torch.meshgrid(xs, ys, indexing='xy'), -1).view(-1, 2)
    return points, ((xs[1] - xs[0]) * (ys[1] - ys[0])).item()


@torch.no_grad()
def density_grid(flow, lim, n):
    """p(x) on grid_points(lim, n): (p (n, n), rows along y; the area of one cell)."""
    points, area = grid_points(lim, n)
    return flows.log_prob(flow, points.to(next(flow.parameters()).device)).exp().view(n, n).cpu(), area


@torch.no_grad()
def figure(flow, x_test, test_nll, seed, path):
    """moons.png, and the model's probability mass off the moons: farther than 0.25 (5 noise sigmas) from both arcs,
    where the data has none (a Gaussian puts 4e-6 of its mass beyond 5 sigma)."""
    plt, lim = pyplot(), (-1.5, 2.5, -1.0, 1.5)
    p, area = density_grid(flow, lim, 300)
    off = (p.view(-1) * (moons_distance(grid_points(lim, 300)[0]) > 0.25)).sum().item() * area
    device = next(flow.parameters()).device
    xs = flow.inverse([torch.randn(2000, 2, device=device, generator=torch.Generator(device).manual_seed(seed))]).cpu()
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


def main(argv=None):
    cfg = common.parse_config(Config, argv=argv)
    common.check(cfg, positive=('couplings', 'ch', 'blocks', 'steps', 'batch_size', 'lr', 'warmup', 'grad_clip',
                                'log_every', 'ckpt_every'))
    device, out = common.resolve_device(cfg.device), Path(cfg.out)
    x = two_moons(20000, torch.Generator().manual_seed(2 * cfg.seed)).to(device)
    x_test = two_moons(5000, torch.Generator().manual_seed(2 * cfg.seed + 1)).to(device)
    torch.manual_seed(cfg.seed)
    flow = make_flow(cfg).to(device)
    opt = torch.optim.Adam(flow.parameters(), lr=cfg.lr)
    common.claim(out)
    keys = ('couplings', 'ch', 'blocks')
    if ckpt := common.resume(out, 'moons', cfg, keys, ('seed', 'batch_size', 'lr', 'warmup', 'grad_clip')):
        flow.load_state_dict(ckpt['model']), common.load_opt(opt, ckpt['opt'])
    else:
        flows.data_init(flow, x[torch.randint(len(x), (512,), device=device)])

    def save(step, clock):
        common.save_ckpt(out / 'ckpt.pt', dict(script='moons', model=flow.state_dict(), opt=opt.state_dict(),
                                               step=step, config=asdict(cfg)))

    with common.script_guard(), common.Loop(cfg, out, save, ckpt['step'] if ckpt else 0) as loop:
        for step in loop:
            for group in opt.param_groups:
                group['lr'] = flows.lr_at(step, cfg.lr, cfg.warmup, cfg.steps)
            loss = -flows.log_prob(flow, x[torch.randint(len(x), (cfg.batch_size,), device=device)]).mean()  # nats
            opt.zero_grad(set_to_none=True)
            loss.backward()
            nn.utils.clip_grad_norm_(flow.parameters(), cfg.grad_clip)
            opt.step()
            loop.log(loss=loss)
            if loop.final:
                with torch.no_grad():
                    test = -flows.log_prob(flow, x_test).mean().item()
                off = figure(flow, x_test, test, cfg.seed, out / 'moons.png')
                loop.write(f'test nats {test:.4f} ({len(x_test)} test points) | mass off the moons {100 * off:.2f}%')
    print(f'wrote {out}/moons.png (held-out data, the learned density, samples)')
    return flow


if __name__ == '__main__':
    main()
