"""Exercise: samplers against the number of steps on one ddpm.py checkpoint. The same x_T through S in --grid-steps with
DDIM eta = 0, eta = 1 (DDPM's Algorithm 2 at S = T) and DPM-Solver++(2M) (sweep.png); with --fid-samples N, the FID
of N samples per (sampler, S) against --fid-ref (fid_steps.csv; torchrun shards the samples).
    python exercises/ddim_steps.py --out runs/ddpm-mnist --grid-steps 10,20,50 --fid-samples 2000 --fid-ref mnist:test
"""
import os, sys
from dataclasses import dataclass, replace
from functools import partial
from pathlib import Path

import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))  # the scripts, one folder up
import common, ddim


@dataclass
class Config:
    out: str = ''  # run folder of a ddpm.py checkpoint (sweep.png and fid_steps.csv are written there)
    device: str = 'auto'  # auto | cuda | cpu | mps
    seed: int = 0  # seeds the noise: every sampler starts from the same x_T
    grid_steps: str = '1000,100,50,20,10'  # the S values
    spacing: str = 'uniform'  # uniform | quadratic timesteps
    n_samples: int = 8  # images per sampler in each row of sweep.png
    fid_samples: int = 0  # samples per (sampler, S) for FID (0: only the figure)
    fid_ref: str = ''  # FID reference, a dataset:split or a stats .npz (default: the checkpoint's dataset:train)
    sample_batch: int = 256  # images per sampling batch


def runs(cfg, T):
    """(label, ddim.Config) per (S, sampler): DDIM eta 0, DDIM eta 1 (DDPM itself at S = T), DPM-Solver++(2M)."""
    try:
        S = [int(s) for s in cfg.grid_steps.split(',')]
    except ValueError:
        common.fail(f'--grid-steps {cfg.grid_steps!r} must be comma-separated integers, e.g. 1000,100,50,20,10')
    if bad := [s for s in S if not 1 <= s <= T]:
        common.fail(f'--grid-steps {bad[0]}: S must be between 1 and the checkpoint\'s T = {T}')
    base = ddim.Config(out=cfg.out, seed=cfg.seed, spacing=cfg.spacing, sample_batch=cfg.sample_batch)
    return [(f'{"ddpm" if s == T and e == 1 else sm}-S{s}-eta{e:g}',
             replace(base, sampler='ddpm' if s == T and e == 1 else sm, steps=s, eta=e))
            for s in S for sm, e in (('ddim', 0.0), ('ddim', 1.0), ('dpm++2m', 0.0))]


def main(argv=None):
    cfg = common.parse_config(Config, argv=argv)
    common.check(cfg, dict(spacing=('uniform', 'quadratic')), positive=('n_samples', 'sample_batch'),
                 nonnegative=('fid_samples',))
    if not cfg.out:
        common.fail('give --out, a ddpm.py run folder')
    device, rank, world = common.setup(cfg.device)
    with common.script_guard():
        model, mcfg, shape, out = ddim.load(ddim.Config(out=cfg.out, steps=1), device)
        grid = runs(cfg, mcfg.T)
        if rank == 0:
            common.claim(out)
            n = min(cfg.n_samples, 8)
            x = torch.cat([ddim.draw(model, mcfg, c, shape, 0, n, torch.Generator(device).manual_seed(cfg.seed))
                           for _, c in grid])  # the same x_T for every sampler
            common.save_grid(x, out / 'sweep.png', nrow=3 * n)
            print(f'{out}/sweep.png: rows S = {cfg.grid_steps}; columns {n} x (DDIM eta 0 | eta 1 | DPM-Solver++(2M))')
        if not cfg.fid_samples:
            return
        import eval_fid  # only the FID table needs the Inception network
        scorer = eval_fid.Scorer(cfg.fid_ref or f'{mcfg.dataset}:train', device) if rank == 0 else None
        rows = []
        for label, c in grid:
            x = common.sample_many(partial(ddim.draw, model, mcfg, c, shape), cfg.fid_samples, cfg.sample_batch,
                                   cfg.seed, device, rank, world, desc=label)
            if rank == 0:
                rows.append((label, scorer(x)))
                print(f'{label:24s} FID-{cfg.fid_samples} {rows[-1][1]:.2f}', flush=True)
        if rank == 0:
            (Path(out) / 'fid_steps.csv').write_text('run,fid\n' + ''.join(f'{r},{f:.4f}\n' for r, f in rows))
            print(f'wrote {out}/fid_steps.csv')


if __name__ == '__main__':
    main()
