"""Speedrun: the best Fashion-MNIST model in 5 GPU-minutes. ddpm.py with the RECIPE flags for --time-budget 300 s of
training (the clock lives in the checkpoint: a killed run resumes with the time it has left, a finished one samples),
then --fid-samples EMA samples with the fast sampler below, scored against the training set (pytorch-fid, fp32).
    python exercises/speedrun.py                                  # budget, steps, img/s, sampling time, FID-10k
    python exercises/speedrun.py --train "--objective v" --out runs/speedrun-v   # an ablation: any ddpm.py flag
"""
import dataclasses, os, shlex, sys, time
from dataclasses import dataclass
from functools import partial
from pathlib import Path

import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))  # the scripts, one folder up
import common, ddim, ddpm

RECIPE = ('--dataset fashion-mnist --time-budget 300 --steps 100000000 --batch-size 128 --lr 2e-4 --warmup 500 '
          '--ema 0.999 --compile 0 --sample-every 0 --ckpt-every 2000')  # README "Speedrun": why each


@dataclass
class Config:
    out: str = 'runs/speedrun'  # run folder (one per variant: a variant never reuses another's run)
    device: str = 'auto'  # auto | cuda | cpu | mps
    seed: int = 0  # seeds the training run and the samples
    train: str = ''  # ddpm.py flags added to (and overriding) RECIPE, e.g. "--objective v"
    sampler: str = 'ddim'  # ddim | dpm++2m | ddpm
    steps: int = 50  # sampling steps S
    eta: float = 1.0  # DDIM eta (1: the best sampler on the CPU-trained model, README "ddim.py")
    spacing: str = 'uniform'  # uniform | quadratic
    fid_samples: int = 10000  # samples scored
    fid_ref: str = ''  # FID reference (default: the training set)
    sample_batch: int = 1000  # images per sampling batch


def train_for_budget(cfg):
    """ddpm.py with RECIPE + --train into --out: resumed if killed, skipped once the budget is spent. Returns (the
    training Config, steps, seconds of training)."""
    argv = shlex.split(RECIPE) + ['--out', cfg.out, '--device', cfg.device, '--seed', str(cfg.seed)]
    tcfg = common.parse_config(ddpm.Config, ddpm.PRESETS, None, argv + shlex.split(cfg.train))
    path = Path(tcfg.out) / 'ckpt.pt'
    ckpt = common.load_ckpt(path, 'ddpm') if path.exists() else None
    if ckpt is not None:  # never score (or continue) a run trained with other settings under this variant's name
        changed = [k for k, v in dataclasses.asdict(tcfg).items()
                   if k not in ('out', 'device', 'data_dir', 'resume') and ckpt['config'].get(k) != v]
        if changed:
            common.fail(f'{path} was trained with other {", ".join(changed)} '
                        f'({", ".join(str(ckpt["config"].get(k)) for k in changed)}): give this variant its own --out')
    if ckpt is None or ckpt['step'] < tcfg.steps and ckpt['clock'] < tcfg.time_budget:
        ddpm.train(dataclasses.replace(tcfg, resume=ckpt is not None))
        ckpt = common.load_ckpt(path, 'ddpm')
    return tcfg, ckpt['step'], ckpt['clock']


def main(argv=None):
    cfg = common.parse_config(Config, argv=argv)
    common.check(cfg, dict(sampler=('ddim', 'dpm++2m', 'ddpm'), spacing=('uniform', 'quadratic')),
                 positive=('steps', 'fid_samples', 'sample_batch'), unit=('eta',))
    device, rank, world = common.setup(cfg.device)
    with common.script_guard():
        tcfg, steps, clock = train_for_budget(cfg)
        sampling = ddim.Config(out=cfg.out, seed=cfg.seed, sampler=cfg.sampler, steps=cfg.steps, eta=cfg.eta,
                               spacing=cfg.spacing, sample_batch=cfg.sample_batch)
        model, mcfg, shape, out = ddim.load(sampling, device)
        sync = torch.cuda.synchronize if 'cuda' in device else lambda: None
        sync()
        t0 = time.perf_counter()
        x = common.sample_many(partial(ddim.draw, model, mcfg, sampling, shape), cfg.fid_samples, cfg.sample_batch,
                               cfg.seed, device, rank, world, desc='samples')
        sync()
        seconds = time.perf_counter() - t0
        if rank != 0:
            return
        import eval_fid
        ref = cfg.fid_ref or f'{mcfg.dataset}:train'
        score = eval_fid.Scorer(ref, device)(x)
        common.save_grid(x[:100], out / 'speedrun.png', nrow=10)
        print(f'grid: {out}/speedrun.png')
        print(f'budget {tcfg.time_budget:g} s | {steps} steps in {clock:.1f} s of training | '
              f'{steps * tcfg.batch_size / clock:.0f} img/s (batch {tcfg.batch_size}, {device})')
        print(f'sampling {cfg.fid_samples} images with {cfg.sampler}, S = {cfg.steps}, eta = {cfg.eta:g}: '
              f'{seconds:.1f} s')
        print(f'FID-{cfg.fid_samples} against {ref} (pytorch-fid mode): {score:.2f}')


if __name__ == '__main__':
    main()
