"""Exercise 16: ddpm.py's sinusoidal timestep embedding and its two-layer MLP (Linear, SiLU, Linear) give nearby
timesteps similar vectors and distant ones different vectors. Cosine-similarity heat maps over t = 0 .. T - 1 of the
raw embedding and of the MLP's output (a trained checkpoint's, or a freshly initialised MLP's), and the mean
similarity at |dt| = 1, 10, 100, 500 printed and written to a CSV.

    python exercises/timestep_embedding.py                             # ch 128, a new MLP -> runs/timestep/
    python exercises/timestep_embedding.py --ckpt runs/ddpm-mnist/ckpt.pt   # the MLP a run trained
"""
import csv, os, sys
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn.functional as F

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))  # the scripts, one folder up
import common, ddpm
from exercises.curves import pyplot

GAPS = (1, 10, 100, 500)


@dataclass
class Config:
    ckpt: str = ''  # a ddpm.py checkpoint whose embedding MLP to use ('': a new U-Net's, initialised with --seed)
    ch: int = 128  # embedding width without --ckpt (ddpm.py's --ch; the MLP maps it to 4 ch)
    T: int = 1000  # timesteps 0 .. T - 1
    out: str = 'runs/timestep'  # folder for timestep_embedding.png and .csv
    seed: int = 0  # seeds the noise


def similarity(e):
    """(T, d) -> (T, T) cosine similarities."""
    e = F.normalize(e.double(), dim=1)
    return e @ e.T


def mean_at_gap(sim, gap):  # mean of sim[t, t + gap] over t
    return sim.diagonal(gap).mean().item()


@torch.no_grad()
def embeddings(cfg):
    """{'sinusoidal': (T, ch), 'MLP': (T, 4 ch)} at t = 0 .. T - 1, and the MLP's origin."""
    if cfg.ckpt:
        model, _ = ddpm.load_model(cfg.ckpt)
        origin = f'trained ({cfg.ckpt})'
    else:
        torch.manual_seed(cfg.seed)
        model, origin = ddpm.UNet(1, cfg.ch, (1,), 1, ()), f'new (seed {cfg.seed})'
    t = torch.arange(cfg.T)
    raw = ddpm.timestep_embedding(t, model.ch)
    return {'sinusoidal': raw, 'MLP': model.temb(raw)}, origin


def main(argv=None):
    cfg = common.parse_config(Config, argv=argv)
    common.check(cfg, positive=('ch', 'T'))
    if cfg.ch % 2 or cfg.ch < 4:
        common.fail(f'--ch {cfg.ch} must be even and >= 4 (sin and cos halves)')
    if cfg.T <= max(GAPS):
        common.fail(f'--T {cfg.T} must exceed the largest gap, {max(GAPS)}')
    with common.script_guard():
        embs, origin = embeddings(cfg)
    out = Path(cfg.out)
    out.mkdir(parents=True, exist_ok=True)
    sims = {name: similarity(e) for name, e in embs.items()}
    rows = [[name] + [f'{mean_at_gap(s, g):.4f}' for g in GAPS] for name, s in sims.items()]
    with open(out / 'timestep_embedding.csv', 'w', newline='') as f:
        csv.writer(f).writerows([['embedding'] + [f'|dt| = {g}' for g in GAPS]] + rows)
    print(f'mean cosine similarity of the embeddings of t and t + |dt| (MLP: {origin})')
    for row in rows:
        print(f'  {row[0]:11s} ' + '  '.join(f'|dt| {g:3d}: {v}' for g, v in zip(GAPS, row[1:])))
    plt = pyplot()
    fig, axes = plt.subplots(1, 2, figsize=(10, 4.4))
    for ax, (name, s) in zip(axes, sims.items()):
        im = ax.imshow(s.numpy(), cmap='viridis', vmin=-1, vmax=1, origin='lower')
        mlp = f', {origin.split(" (")[0]}' if name == 'MLP' else ''  # new | trained
        ax.set(title=f'{name} ({embs[name].shape[1]} dims{mlp})', xlabel='t', ylabel='t')
        fig.colorbar(im, ax=ax, shrink=0.8, label='cosine similarity')
    fig.savefig(out / 'timestep_embedding.png')
    print(f'wrote {out}/timestep_embedding.png and .csv')
    return {name: [mean_at_gap(s, g) for g in GAPS] for name, s in sims.items()}


if __name__ == '__main__':
    main()
