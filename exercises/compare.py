"""Exercise 10 measured: GAN, VAE, normalizing flow, autoregressive model, diffusion and latent diffusion trained on
MNIST for one equal budget of wall-clock minutes each, then every column measured under one protocol:
- sample quality: FID-2000 against the MNIST test split (eval_fid.py, pytorch-fid mode, cached reference statistics);
- diversity: improved precision and recall (k = 3) of the same 2,000 samples' Inception features against the first
  2,000 test images';
- likelihood: bits/dim of 8-bit MNIST test images on the [0, 256) scale, where the family defines one (dequantised
  x = k + u, u ~ U[0, 1), for the densities, which makes them upper bounds on the discrete code length);
- sampling speed: ms per image and network evaluations per image, timed while the 2,000 samples are drawn (batch 256);
- training stability: the FID spread over --seeds runs, and how many diverged (the loop's non-finite-loss stop);
- controllability: what each script can do, with its command.
Each script trains with its own preset for --device (on a CPU its -cpu preset) and --steps raised so that the budget
ends it: SIGTERM after --minutes of wall-clock from the process start (start-up counted), which every script's loop
answers by saving its checkpoint (flows' cosine decay to 0 at --steps is then flat). The diffusion models sample with
DDIM eta 1 in 50 steps, the sampler the README's tables found best for them.
    python exercises/compare.py --device cpu     # README "Exercises": about 3 hours on 2 cores -> runs/compare/
Each (family, seed) is saved as soon as it is measured (rows/*.json); a rerun skips what is done and continues a
training that was interrupted with the budget it had left.
"""
import dataclasses, json, shlex, signal, subprocess, sys, time
from dataclasses import dataclass
from functools import partial
from pathlib import Path

import numpy as np
import torch
from PIL import Image, ImageDraw

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))  # the scripts, one folder up
import common, ddim, eval_fid, flows, gan, ldm, pixelcnn, sde, vae

BIG = '--steps 100000000'  # the budget, not --steps, ends training
TRAIN = {'gan': f'gan.py {BIG} --sample-every 0', 'vae': f'vae.py --likelihood logistic {BIG}',
         'flows': f'flows.py {BIG} --sample-every 0', 'pixelcnn': f'pixelcnn.py --data 8bit {BIG}',
         'ddpm': f'ddpm.py {BIG} --sample-every 0', 'ldm': f'ldm.py {BIG} --sample-every 0'}
CONTROL = {  # what each script can do besides unconditional samples
    'gan': 'none in gan.py (unconditional); inpainting by a U-Net generator: exercises/gan_inpaint.py',
    'vae': 'encode / decode, latent interpolation: `vae.py --mode interp`',
    'flows': 'exact encode / decode; temperature: `flows.py --mode sample --temperature 0.7`',
    'pixelcnn': 'class condition: `pixelcnn.py --class-cond 1`, then `--mode sample --label 7`',
    'ddpm': 'class condition + guidance: `ddpm.py --class-cond 1`, `ddim.py --label 7 --guidance 3`; inversion, '
            'interpolation, SDEdit, inpainting: `ddim.py --mode invert|interp|sdedit|inpaint`',
    'ldm': 'class condition + guidance: `ldm.py --cond class`, `--mode sample --label 7 --guidance 3`; '
           'reimagining: `ldm.py --mode reimagine`'}


@dataclass
class Config:
    out: str = 'runs/compare'  # a run folder per family and seed inside, rows/*.json, compare.md, compare.png
    device: str = 'auto'  # auto | cuda | cpu | mps
    families: str = 'gan,vae,flows,pixelcnn,ddpm,ldm'  # which to train and measure, in this order
    minutes: float = 10.0  # wall-clock training budget per family and seed
    seeds: int = 1  # training seeds per family (3 for the stability column's spread)
    fid_samples: int = 2000  # samples per model for FID, precision / recall and the speed
    sample_batch: int = 256  # images per sampling batch
    nll_images: int = 0  # test images for the likelihoods (0: all 10,000)
    diffusion_nll_images: int = 100  # sde.py's ELBO and PF-ODE (K = 1, rtol 1e-5) cost ~6 s per image on 2 cores
    gan: str = ''  # extra gan.py training flags, e.g. "--ch 32"
    vae: str = ''  # extra vae.py training flags
    flows: str = ''  # extra flows.py training flags
    pixelcnn: str = ''  # extra pixelcnn.py training flags
    ddpm: str = ''  # extra ddpm.py training flags
    ldm: str = ''  # extra ldm.py training flags


def train(cfg, fam, seed, run, row, save):
    """The script in a child process, stopped by SIGTERM when the budget is spent; a stopped compare.py stops it too
    and keeps the seconds used, so that a rerun continues it (--resume 1) for the rest."""
    used = row.get('used', 0.0) if (run / 'ckpt.pt').exists() else 0.0  # (a failed start saved nothing)
    script, *flags = TRAIN[fam].split()
    args = [sys.executable, str(ROOT / script), *flags, *shlex.split(getattr(cfg, fam)),
            '--dataset', 'mnist', '--device', cfg.device, '--seed', str(seed), '--out', str(run),
            '--resume', str(int(used > 0))] + ['--vae', str(run / 'ae' / 'ckpt.pt')] * (fam == 'ldm')
    print(f'{fam}, seed {seed}: training for {cfg.minutes * 60 - used:.0f} s -> {run} (log: {run}.log)', flush=True)
    with open(f'{run}.log', 'a') as log:
        p, t0 = subprocess.Popen(args, stdout=log, stderr=subprocess.STDOUT), time.perf_counter()
        try:
            p.wait(timeout=max(cfg.minutes * 60 - used, 1))
        except subprocess.TimeoutExpired:
            p.send_signal(signal.SIGTERM)  # the loop finishes its step, saves, exits 130
        finally:  # also on Ctrl-C / SIGTERM of this process: the child saves first
            if p.poll() is None:
                p.send_signal(signal.SIGTERM)
            rc = p.wait()
            row['used'] = used + time.perf_counter() - t0
            save()
    diverged = rc not in (0, 130) and 'the last good checkpoint' in Path(f'{run}.log').read_text()
    if rc not in (0, 130) and not diverged or not (run / 'ckpt.pt').exists():
        common.fail(f'{fam} failed (exit {rc}): see {run}.log' + ' (no checkpoint yet: raise --minutes)' * (rc == 130))
    step = common.torch_load(run / 'ckpt.pt')['step']
    row.update(trained=True, minutes=cfg.minutes, rc=rc, diverged=diverged, step=step)


def restore(module, run, build, device):  # (the model of a run, in eval mode, and its script's Config)
    ckpt = common.load_ckpt(run / 'ckpt.pt', module.__name__)
    c = module.Config(**{k: v for k, v in ckpt['config'].items() if k in module.Config.__dataclass_fields__})
    net = build(c).to(device)
    net.load_state_dict(ckpt['model'])
    return net.eval(), c


def model(cfg, fam, run, device):
    """(draw(start, n, generator) -> uint8 images, network evaluations per image, likelihood() -> (bits/dim, note))."""
    x_test = common.load_dataset('mnist', 'test')[0][:cfg.nll_images or None].to(device)
    n = f'{len(x_test)} test images'
    if fam == 'gan':
        G, c = gan.load_generator(run, device)
        return partial(gan.draw, G, c.z_dim), 1, lambda: (None, 'none: an implicit model')
    if fam == 'vae':
        net, c = restore(vae, run, lambda c: vae.VAE(c, *common.image_shape(c)[:2]), device)  # (stopped runs too)
        c = dataclasses.replace(c, out=str(run), eval_n=len(x_test), seed=0)
        draw = lambda start, n, g: common.to_uint8(net.decode(torch.randn(n, *net.zshape, generator=g, device=device)))
        return draw, 1, lambda: (vae.evaluate(net, vae.test_set(c, device), c)['iwae'],
                                 f'IWAE bound, k = {c.eval_k}, discretised logistic decoder; {n}')
    if fam == 'flows':
        flow, c = restore(flows, run, lambda c: flows.make_flow(c, common.image_shape(c)), device)
        return (partial(flows.sample, flow, common.image_shape(c), c.alpha, 1.0), 1,
                lambda: (flows.bits_per_dim(flow, x_test, c.alpha, 500), f'exact, dequantised; {n}'))
    if fam == 'pixelcnn':
        net, c = restore(pixelcnn, run, pixelcnn.make_model, device)
        return (partial(pixelcnn.sample, net, common.image_shape(c), c.data, -1, 0), 784,
                lambda: (pixelcnn.test_nll(net, x_test, None, c.data, 500), f'exact, discrete; {n}'))
    if fam == 'ddpm':
        net, c, shape, _ = ddim.load(ddim.Config(out=str(run)), device)

        def likelihood():  # sde.py's nll mode writes nll.json
            sde.nll_mode(sde.Config(out=str(run), n_images=cfg.diffusion_nll_images), device)
            r = json.loads((run / 'nll.json').read_text())
            return (r['ode'][0], f'PF-ODE, +- {r["ode"][1]:.3f}; ELBO <= {r["elbo"][0]:.3f} +- {r["elbo"][1]:.3f}; '
                                 f'K = {r["probes"]}, rtol = atol = {r["rtol"]:g}; first {r["n_images"]} test images')
        return partial(ddim.draw, net, c, ddim.Config(steps=50, eta=1.0), shape), 50, likelihood
    net, ae, scale, zshape, c = ldm.load(ldm.Config(out=str(run), device=device))
    return (partial(ldm.sample, net, ae, scale, zshape, c, steps=50, sampler='ddpm'), 51,  # + the decoder
            lambda: (None, 'none: the decoder is deterministic'))


def measure(cfg, fam, run, row, save, real, ref, inception, device):
    if 'fid' in row and 'bpd' in row:
        return  # measured: not even the model is loaded again
    draw, nfe, likelihood = model(cfg, fam, run, device)
    if 'fid' not in row:
        t0 = time.perf_counter()
        with torch.no_grad():
            x = common.sample_many(draw, cfg.fid_samples, cfg.sample_batch, 0, device, desc=f'{fam}: sampling')
        row.update(ms=1000 * (time.perf_counter() - t0) / len(x), nfe=nfe)
        common.write_samples(x, run, 'samples', 'npz')
        fake = eval_fid.compute_features(x, model=inception)
        row['fid'] = eval_fid.frechet_distance(*eval_fid.stats_of(fake), *ref)
        row['precision'], row['recall'] = eval_fid.precision_recall(real, fake)
        save()
    if 'bpd' not in row:
        row['bpd'], row['bpd_how'] = likelihood()
        save()


def table(cfg, rows):
    head = ['family', 'training', f'FID-{cfg.fid_samples} (mean over seeds)', 'precision', 'recall', 'bits/dim',
            'ms/image', 'NFE/image', 'stability: FID spread, diverged', 'controllability']
    lines = ['| ' + ' | '.join(head) + ' |', '|' + '---|' * len(head)]
    for fam in cfg.families.split(','):
        rs = [r for r in rows.get(fam, []) if 'bpd' in r]
        if not rs:
            continue
        fids, r = [r['fid'] for r in rs], rs[0]
        spread = f'± {np.std(fids, ddof=1):.1f} (sample std) over {len(rs)}' if len(rs) > 1 else '1 seed'
        bpd = '—' if r['bpd'] is None else f'{r["bpd"]:.3f}'
        lines.append(f'| {fam} | {TRAIN[fam].split()[0]}, {r["step"]} steps in {r["minutes"]:g} min | '
                     f'{np.mean(fids):.1f} | {r["precision"]:.3f} | {r["recall"]:.3f} | {bpd} ({r["bpd_how"]}) | '
                     f'{r["ms"]:.3g} | {r["nfe"]} | {spread}; diverged {sum(r["diverged"] for r in rs)} of {len(rs)} | '
                     f'{CONTROL[fam]} |')
    return '\n'.join(lines)


def figure(cfg, path):  # an 8x8 grid of the first 64 samples per family (seed 0), labelled, side by side
    grids = [(fam, common.grid_image(torch.from_numpy(np.load(p)['arr_0'][:64]).permute(0, 3, 1, 2), 8))
             for fam in cfg.families.split(',') if (p := Path(cfg.out) / f'{fam}-s0' / 'samples.npz').exists()]
    if grids:
        w, h = grids[0][1].size
        img = Image.new('L', (len(grids) * (w + 8), h + 20), 255)
        for i, (fam, g) in enumerate(grids):
            img.paste(g, (i * (w + 8), 20))
            ImageDraw.Draw(img).text((i * (w + 8) + 4, 4), fam, fill=0)
        img.save(path)


def main(argv=None):
    cfg = common.parse_config(Config, argv=argv)
    common.check(cfg, positive=('minutes', 'seeds', 'fid_samples', 'sample_batch', 'diffusion_nll_images'),
                 nonnegative=('nll_images',))
    if bad := set(cfg.families.split(',')) - set(TRAIN):
        common.fail(f'--families: {", ".join(sorted(bad))} not among {", ".join(TRAIN)}')
    device, out = common.resolve_device(cfg.device), Path(cfg.out)
    cfg = dataclasses.replace(cfg, device=device)
    (out / 'rows').mkdir(parents=True, exist_ok=True)
    with common.script_guard():
        inception = eval_fid.load_inception(device=device)
        ref = eval_fid.reference_stats('mnist:test', model=inception)  # cached after its first computation
        if not (path := out / f'real-features-{cfg.fid_samples}.npy').exists():  # the real set of precision / recall
            common.atomic_write(path, lambda f: np.save(f, eval_fid.compute_features(
                common.load_dataset('mnist', 'test')[0][:cfg.fid_samples], model=inception)))
        real, rows = np.load(path), {}
        for fam in cfg.families.split(','):
            for seed in range(cfg.seeds):
                run, file = out / f'{fam}-s{seed}', out / 'rows' / f'{fam}-s{seed}.json'
                row = json.loads(file.read_text()) if file.exists() else {}
                save = partial(common.atomic_write, file, lambda f, row=row: f.write(json.dumps(row).encode()))
                if not row.get('trained'):
                    train(cfg, fam, seed, run, row, save)
                    save()
                measure(cfg, fam, run, row, save, real, ref, inception, device)
                rows.setdefault(fam, []).append(row)
                print(table(cfg, rows), flush=True)
        text = table(cfg, rows) + f'\n\n(on {device}; the protocol: exercises/compare.py\'s docstring)\n'
        (out / 'compare.md').write_text(text)
        figure(cfg, out / 'compare.png')
        print(f'{text}wrote {out}/compare.md, compare.png')


if __name__ == '__main__':
    main()
