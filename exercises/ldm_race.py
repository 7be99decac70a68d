"""Exercise: latent against pixel diffusion at equal training wall-clock (README "The race"). ldm.py trains both stages
(the autoencoder into <out>/ae, the latent U-Net into <out>/ldm); ddpm.py then trains the same recipe on pixels (cosine
schedule, v-prediction, batch, lr, EMA, attention at the lowest level) for the LDM's stage-2 seconds (<out>/pixel-s2,
the autoencoder counted out) and for both stages' seconds (<out>/pixel-all, counted in). Every model samples
--fid-samples images with DDIM eta 0 and eta 1 (the pixel model's best sampler) at --sample-steps, scored against
--fid-ref; FLOPs per training image are counted for each side, and for the LDM's own U-Net run on pixels.
    python exercises/ldm_race.py --device cpu          # README: about an hour on 2 cores
A run folder that is there already is continued, or only sampled if finished.
"""
import dataclasses, math, os, shlex, sys, time
from dataclasses import dataclass
from functools import partial
from pathlib import Path

import torch
from torch.utils.flop_counter import FlopCounterMode

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))  # the scripts, one folder up
import common, ddim, ddpm, ldm

PIXEL = ('--dataset mnist --steps 100000000 --schedule cosine --objective v --batch-size 128 --lr 1e-3 --warmup 200 '
         '--ema 0.995 --attn-res 7 --sample-every 0')  # the LDM's CPU recipe; attention at 7x7, the lowest level


@dataclass
class Config:
    out: str = 'runs/race'  # a folder per side inside
    device: str = 'auto'  # auto | cuda | cpu | mps
    seed: int = 0  # seeds both runs
    ldm: str = ''  # extra ldm.py flags for the latent side, e.g. "--steps 8000"
    pixel: str = ''  # extra ddpm.py flags for the pixel side, added to PIXEL
    sample_steps: int = 50  # network evaluations per sample
    fid_samples: int = 2000  # samples per (model, sampler)
    fid_ref: str = 'mnist:test'  # FID reference: a dataset:split or a stats .npz
    sample_batch: int = 250  # images per sampling batch


def train_once(script, cfg):
    """script.train(cfg) (continued if cfg.out holds a checkpoint) unless that run is finished; its checkpoint."""
    path = Path(cfg.out) / 'ckpt.pt'
    ckpt = common.load_ckpt(path, script.__name__) if path.exists() else None
    if ckpt is None or ckpt['step'] < cfg.steps and ckpt['clock'] < (getattr(cfg, 'time_budget', 0) or math.inf):
        script.train(dataclasses.replace(cfg, resume=ckpt is not None))
    return common.load_ckpt(path, script.__name__)


def flops_per_image(net, x, objective='v'):
    """Training FLOPs per image (forward + backward of the loss; torch's counter: matmuls and convolutions)."""
    with FlopCounterMode(display=False) as counter:
        ddpm.loss_fn(net, x, None, ddpm.make_alpha_bar('cosine', 1000).float(), objective).backward()
    return counter.get_total_flops() / len(x)


def main(argv=None):
    cfg = common.parse_config(Config, argv=argv)
    common.check(cfg, positive=('sample_steps', 'fid_samples', 'sample_batch'))
    out, device = Path(cfg.out), common.resolve_device(cfg.device)
    lcfg = common.parse_config(ldm.Config, ldm.PRESETS, None, shlex.split(cfg.ldm) + [
        '--dataset', 'mnist', '--device', device, '--seed', str(cfg.seed), '--out', str(out / 'ldm'),
        '--vae', str(out / 'ae' / 'ckpt.pt'), '--sample-steps', str(cfg.sample_steps), '--sample-every', '0'])
    ldm.check(lcfg)
    with common.script_guard():
        import eval_fid  # the reference statistics first: a bad --fid-ref fails before any training
        scorer = eval_fid.Scorer(cfg.fid_ref, device)
        lck = train_once(ldm, lcfg)
        t_ae, t_s2 = common.load_ckpt(out / 'ae' / 'ckpt.pt', 'vae')['clock'], lck['clock']
        pixel = {}
        for name, budget in (('pixel-s2', t_s2), ('pixel-all', t_ae + t_s2)):
            pcfg = common.parse_config(ddpm.Config, ddpm.PRESETS, None, shlex.split(PIXEL) + shlex.split(cfg.pixel) + [
                '--device', device, '--seed', str(cfg.seed), '--out', str(out / name),
                '--time-budget', str(max(budget, 1e-3))])  # (a budget of 0 would mean none)
            ddpm.check(pcfg)
            pixel[name] = train_once(ddpm, pcfg)
        model, ae, scale, zshape, lcfg = ldm.load(lcfg)
        rows, grids = [], []
        for name in ['ldm'] + list(pixel):
            if name == 'ldm':  # eta 1: ldm.py's 'ddpm' sampler, the posterior of each respaced step
                draws = [partial(ldm.sample, model, ae, scale, zshape, lcfg, steps=cfg.sample_steps, sampler=s)
                         for s in ('ddim', 'ddpm')]
                trained = f'{t_ae:.0f} s + {t_s2:.0f} s | {lck["step"]} x {lcfg.batch_size}'
            else:
                net, mcfg, shape, _ = ddim.load(ddim.Config(out=str(out / name), steps=cfg.sample_steps), device)
                draws = [partial(ddim.draw, net, mcfg, ddim.Config(steps=cfg.sample_steps, eta=e), shape)
                         for e in (0, 1)]
                trained = f'{pixel[name]["clock"]:.0f} s | {pixel[name]["step"]} x {mcfg.batch_size}'
            cells = []
            for eta, draw in enumerate(draws):
                t0 = time.perf_counter()
                x = common.sample_many(draw, cfg.fid_samples, cfg.sample_batch, cfg.seed, device,
                                       desc=f'{name}, DDIM eta {eta}')
                ms = 1000 * (time.perf_counter() - t0) / len(x)  # before the FID: its Inception time is not sampling
                cells.append(f'{scorer(x):.1f} ({ms:.0f} ms/image)')
            grids.append(x[:16])  # eta 1
            rows.append(f'| {name} | {trained} | ' + ' | '.join(cells) + ' |')
        latent_net = ldm.LatentUNet(lcfg, zshape).to(device)
        pixel_net = ddpm.make_model(pcfg, 1, 28).to(device)
        same = ddpm.make_model(dataclasses.replace(lcfg, attn_res='14'), 1, 28).to(device)  # the LDM's U-Net on pixels
        z, x = torch.randn(8, *zshape, device=device), torch.rand(8, 1, 28, 28, device=device) * 2 - 1
        gflops = [flops_per_image(n, v) / 1e9 for n, v in ((latent_net, z), (pixel_net, x), (same, x))]
        table = [f'| side | training | steps x batch | FID-{cfg.fid_samples}, DDIM eta 0 | FID, DDIM eta 1 |',
                 '|---|---|---|---|---|'] + rows
        table.append(f'\ntraining GFLOP per image (forward + backward): LDM U-Net on 7x7x4 latents {gflops[0]:.3f}, '
                     f'the pixel U-Net {gflops[1]:.3f}, the LDM\'s U-Net on 28x28 pixels {gflops[2]:.3f}')
        (out / 'race.md').write_text('\n'.join(table) + '\n')
        common.save_grid(torch.cat(grids), out / 'race.png', nrow=16)
        print('\n'.join(table) + f'\nwrote {out}/race.md, race.png (rows: LDM, pixel-s2, pixel-all; DDIM eta 1)')


if __name__ == '__main__':
    main()
