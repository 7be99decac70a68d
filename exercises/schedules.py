"""Exercise: beta_t, alpha_bar_t and SNR(t) = alpha_bar_t / (1 - alpha_bar_t) of ddpm.py's three schedules, and the t
at which SNR falls through 1 (the signal stops dominating the noise).

    python exercises/schedules.py                 # T = 1000 -> runs/schedules/schedules.png, schedules.csv
    python exercises/schedules.py --T 10          # the latent-diffusion exercise's T
"""
import csv, os, sys
from dataclasses import dataclass
from pathlib import Path

import numpy as np

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))  # the scripts, one folder up
import common, ddpm
from exercises.curves import pyplot

NAMES = ('linear', 'cosine', 'sigmoid')


@dataclass
class Config:
    T: int = 1000  # diffusion steps
    out: str = 'runs/schedules'  # folder for schedules.png and schedules.csv


def figures(T, out):
    """schedules.csv (t, then beta, alpha_bar, SNR per schedule), schedules.png (three panels), SNR = 1 printed."""
    out, t = Path(out), np.arange(1, T + 1)  # the paper's t = 1..T
    out.mkdir(parents=True, exist_ok=True)
    beta = {n: ddpm.make_beta(n, T).numpy() for n in NAMES}
    ab = {n: ddpm.make_alpha_bar(n, T).numpy() for n in NAMES}
    snr = {n: ab[n] / (1 - ab[n]) for n in NAMES}
    with open(out / 'schedules.csv', 'w', newline='') as f:
        w = csv.writer(f)
        w.writerow(['t'] + [f'{q}_{n}' for n in NAMES for q in ('beta', 'alpha_bar', 'snr')])
        for i in range(T):
            w.writerow([t[i]] + [f'{v[n][i]:.6g}' for n in NAMES for v in (beta, ab, snr)])
    plt = pyplot()
    fig, axes = plt.subplots(1, 3, figsize=(13, 3.8))
    panels = ((beta, r'$\beta_t$ (log scale)', 'log'), (ab, r'$\bar\alpha_t$', 'linear'),
              (snr, r'SNR(t) = $\bar\alpha_t / (1 - \bar\alpha_t)$', 'log'))
    for ax, (v, title, yscale) in zip(axes, panels):
        for n in NAMES:
            ax.plot(t, v[n], label=n)
        ax.set(title=title, xlabel='diffusion step t', yscale=yscale)
        ax.legend()
    axes[2].axhline(1, color='gray', lw=0.8, ls='--')
    fig.savefig(out / 'schedules.png')
    for n in NAMES:
        cross = t[np.argmax(snr[n] < 1)] if (snr[n] < 1).any() else 'never (SNR > 1 throughout)'
        print(f'{n:8s} SNR(t) = 1 at t = {cross} | alpha_bar_T = {ab[n][-1]:.2e}')
    print(f'wrote {out}/schedules.csv and {out}/schedules.png')


def main(argv=None):
    cfg = common.parse_config(Config, argv=argv)
    common.check(cfg, positive=('T',))
    figures(cfg.T, cfg.out)


if __name__ == '__main__':
    main()
