"""Exercises: one vae.py model per value of --sweep beta (beta-VAE), latent (its size) or arch (MLP against conv), every
other vae.py flag equal; each in <out>/<flag>-<value> (continued, or only evaluated if finished). Writes sweep.csv
(recon, KL, -ELBO, IWAE, MSE, PSNR, active units, diversity), sweep.png and sweep_grids.png.
    python exercises/vae_sweep.py --sweep beta --device cpu --epochs 10 --eval-n 2000   # README's table, 5 min
"""
import argparse, dataclasses, os, sys
from pathlib import Path

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))  # the scripts, one folder up
import common, vae
from exercises.curves import pyplot

SWEEPS = dict(beta='0.1,1,5,20', latent='2,5,10,20,50', arch='mlp,conv')


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter,
                                epilog='every other flag is a vae.py flag (python vae.py --help)')
    p.add_argument('--sweep', default='beta', choices=SWEEPS, help='the vae.py flag to vary (default: beta)')
    p.add_argument('--values', default='', help='its values, comma-separated (default: ' +
                   '; '.join(f'{k} {v}' for k, v in SWEEPS.items()) + ')')
    args, rest = p.parse_known_args(argv)
    values = (args.values or SWEEPS[args.sweep]).split(',')
    runs = [common.parse_config(vae.Config, vae.PRESETS, vae.pick, rest + [f'--{args.sweep}', v]) for v in values]
    out = Path(runs[0].out or f'runs/vae-{runs[0].arch}-{Path(runs[0].dataset).name}')  # every value parsed first
    runs = [dataclasses.replace(c, mode='train', out=str(out / f'{args.sweep}-{v}')) for v, c in zip(values, runs)]
    for c in runs:
        vae.check(c)
    with common.script_guard():  # a finished sub-run is evaluated again, an interrupted one continued
        rows = [dict({args.sweep: v}, **vae.train(dataclasses.replace(c, resume=(Path(c.out) / 'ckpt.pt').exists()))[1])
                for v, c in zip(values, runs)]
    sweep = args.sweep
    table = [list(rows[0])] + [[f'{v:.4g}' if isinstance(v, float) else str(v) for v in r.values()] for r in rows]
    (out / 'sweep.csv').write_text(''.join(','.join(r) + '\n' for r in table))
    print('\n'.join(' | '.join(r) for r in table))
    plt = pyplot()
    xs = values if sweep == 'arch' else [float(v) for v in values]
    fig, axes = plt.subplots(1, 2, figsize=(9, 3.2))
    for key in [k for k in ('recon', 'kl', 'nelbo') if k in rows[0]]:
        axes[0].plot(xs, [r[key] for r in rows], 'o-', label={'nelbo': '-ELBO'}.get(key, key))
    axes[0].set(title=f'test ELBO terms vs {sweep}', xlabel=sweep, ylabel=rows[0]['unit'])
    axes[1].plot(xs, [r['psnr'] for r in rows], 'o-')
    axes[1].set(title=f'reconstruction PSNR vs {sweep}', xlabel=sweep, ylabel='PSNR (dB)')
    for ax in axes if sweep != 'arch' else ():
        ax.set_xscale('log')
    axes[0].legend()
    fig.savefig(out / 'sweep.png')
    fig, axes = plt.subplots(2, len(values), figsize=(3 * len(values), 5.4), squeeze=False)
    for j, v in enumerate(values):
        for i, (png, what) in enumerate((('recon.png', 'test / reconstruction'), ('prior.png', 'prior samples'))):
            axes[i, j].imshow(plt.imread(out / f'{sweep}-{v}' / png), cmap='gray')
            axes[i, j].set(title=f'{sweep} = {v}: {what}', xticks=[], yticks=[])
    fig.savefig(out / 'sweep_grids.png')
    print(f'wrote {out}/sweep.csv, sweep.png, sweep_grids.png')


if __name__ == '__main__':
    main()
