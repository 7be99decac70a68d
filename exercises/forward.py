"""Exercise: the forward process q(x_t | x_0) of ddpm.py (eq. 4) at t = 0, 100, 250, 500, 750, 999: 16 images per t,
the pixel histogram of x_t (it becomes N(0, 1)), and the MSE of x_t to x_0.

    python exercises/forward.py --dataset cifar10            # -> runs/forward/forward.png, forward.csv
    python exercises/forward.py --dataset mnist --schedule cosine
"""
import csv, os, sys
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))  # the scripts, one folder up
import common, ddpm
from exercises.curves import pyplot


@dataclass
class Config:
    dataset: str = 'cifar10'  # mnist | fashion-mnist | cifar10 | cifar10-subset | an .npz of uint8 images (N, H, W, C)
    data_dir: str = ''  # folder with the official archives (default $GENMODELS_DATA, else ./data)
    schedule: str = 'linear'  # linear | cosine | sigmoid
    T: int = 1000  # diffusion steps
    out: str = 'runs/forward'  # folder for forward.png and forward.csv
    seed: int = 0  # seeds the noise


def main(argv=None):
    cfg = common.parse_config(Config, argv=argv)
    common.check(cfg, dict(schedule=('linear', 'cosine', 'sigmoid')), positive=('T',))
    with common.script_guard():
        x, _ = common.load_dataset(cfg.dataset, 'train', cfg.data_dir or None)
    out, g = Path(cfg.out), torch.Generator().manual_seed(cfg.seed)
    out.mkdir(parents=True, exist_ok=True)
    x0 = x[torch.randperm(len(x), generator=g)[:512]].float() / 127.5 - 1
    ab = torch.cat([torch.ones(1), ddpm.make_alpha_bar(cfg.schedule, cfg.T).float()])  # ab[t], paper's t
    ts = [t for t in (0, 100, 250, 500, 750, 999) if t <= cfg.T]
    eps = torch.randn(x0.shape, generator=g)
    xts = [ddpm.q_sample(x0, ab[t], eps) for t in ts]
    plt = pyplot()
    fig, axes = plt.subplots(2, len(ts), figsize=(2.2 * len(ts), 4.6), height_ratios=(3, 2), squeeze=False)
    for i, (t, xt) in enumerate(zip(ts, xts)):
        grid = common.grid_image(common.to_uint8(xt[:16].clamp(-1, 1)), nrow=4)
        axes[0, i].imshow(grid, cmap='gray' if grid.mode == 'L' else None)
        axes[0, i].set(title=f't = {t}\n$\\bar\\alpha_t$ = {ab[t]:.3g}', xticks=[], yticks=[])
        axes[0, i].grid(False)
        axes[1, i].hist(xt.flatten().numpy(), bins=np.linspace(-4, 4, 81), density=True)
        axes[1, i].set(xlabel='pixel value of $x_t$', ylabel='density' if i == 0 else None, xlim=(-4, 4))
    fig.suptitle(f'forward process q(x_t | x_0), {cfg.schedule} schedule, T = {cfg.T}: samples and pixel histograms')
    fig.savefig(out / 'forward.png')
    with open(out / 'forward.csv', 'w', newline='') as f:
        w = csv.writer(f)
        w.writerow(['t', 'alpha_bar', 'mse_to_x0', 'mean', 'std'])
        for t, xt in zip(ts, xts):
            row = [t, ab[t].item(), (xt - x0).pow(2).mean().item(), xt.mean().item(), xt.std().item()]
            w.writerow(row)
            print('t {:4d} | alpha_bar {:.4f} | MSE to x0 {:.4f} | mean {:+.3f} | std {:.3f}'.format(*row))
    print(f'wrote {out}/forward.png (columns: t; top: 16 images, bottom: pixel histogram) and forward.csv')


if __name__ == '__main__':
    main()
