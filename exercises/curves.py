"""Training curves of runs from their log.txt, one panel per logged quantity (the exercises' loss curves: vae.py's
reconstruction and KL apart, ldm.py's denoiser loss, gan.py's losses, D outputs, gradient norms and FID).
    python exercises/curves.py runs/vae-mlp-mnist          # -> runs/vae-mlp-mnist/curves.png
"""
import argparse, os, re, sys
from pathlib import Path

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))  # the scripts, one folder up
GROUPS = [('GAN losses', ['loss D', 'loss G', 'mse'], 'linear'), ('D output', ['D(x)', 'D(G(z))', 'W'], 'linear'),
          ('gradient norm', ['|grad D|', '|grad G|', 'grad norm'], 'log')]
NOT_PLOTTED = ('ms/step', 'img/s', 'lr')


def pyplot():
    """matplotlib.pyplot drawing to files (no display needed)."""
    import matplotlib
    matplotlib.use('Agg')
    import matplotlib.pyplot as plt
    plt.rcParams.update({'figure.dpi': 110, 'axes.grid': True, 'grid.alpha': 0.3,
                         'figure.constrained_layout.use': True})
    return plt


def read_log(path):
    """{key: (steps, values)} from a log.txt of common.Loop's 'step N | key value | ...' lines; fid<N> is 'FID'."""
    series = {}
    for line in Path(path).read_text().splitlines():
        step, *fields = line.split(' | ')
        for key, value in (f.rsplit(' ', 1) for f in fields if ' ' in f):
            try:
                value = float(value)
            except ValueError:
                continue  # not 'key number', e.g. '(10000 test images)'
            s = series.setdefault('FID' if re.fullmatch(r'fid\d+', key) else key, ([], []))
            s[0].append(int(step.split()[1]))
            s[1].append(value)
    return series


def plot_logs(runs, path, panels=None, title=''):
    """One panel per (name, keys, yscale) (default: GROUPS, then a panel per other key), each run (label -> folder)
    in its own colour."""
    plt, logs = pyplot(), {label: read_log(Path(folder) / 'log.txt') for label, folder in runs.items()}
    if panels is None:
        keys = [k for k in dict.fromkeys(k for log in logs.values() for k in log) if k not in NOT_PLOTTED]
        panels = [g for g in GROUPS if set(g[1]) & set(keys)]
        panels += [(k, [k], 'log' if k in ('loss', 'FID') else 'linear') for k in keys if all(k not in g[1]
                                                                                              for g in panels)]
    panels = [p for p in panels if any(k in log for log in logs.values() for k in p[1])]
    fig, axes = plt.subplots(1, len(panels), figsize=(4.5 * len(panels), 3.6), squeeze=False)
    for ax, (name, keys, scale) in zip(axes[0], panels):
        for i, (label, log) in enumerate(logs.items()):
            for j, k in enumerate(k for k in keys if k in log):
                ax.plot(*log[k], f'C{i}', ls=['-', ':', '--'][j], marker='o' * (k == 'FID'), label=f'{label} {k}')
        ax.set(title=f'{title}{name}', xlabel='step', ylabel=name, yscale=scale)
        ax.legend(fontsize=7)
    fig.savefig(path)
    plt.close(fig)


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument('runs', nargs='+', help='run folders with a log.txt')
    p.add_argument('--out', help='figure path (default: <first run>/curves.png)')
    args = p.parse_args(argv)
    import common
    if missing := [r for r in args.runs if not (Path(r) / 'log.txt').exists()]:
        common.fail(f'no log.txt in {", ".join(missing)}: give run folders that a script trained into')
    out = args.out or str(Path(args.runs[0]) / 'curves.png')
    plot_logs({Path(r).name: r for r in args.runs}, out)
    print(f'wrote {out}')


if __name__ == '__main__':
    main()
