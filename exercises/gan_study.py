"""Exercises: two gan.py runs, every flag equal but one. --study beta1 (Adam beta1 0.5, DCGAN's, against 0.9) or versus
(BCE against WGAN-GP after the same --epochs: D sees every image as often in both). Each run trains into <out>/<label>
(continued, or only read if finished) with FID at least at its end; <study>.txt and <study>.png compare them.
    python exercises/gan_study.py --study versus --epochs 5 --dataset mnist --device cpu  # README: 12 min
"""
import argparse, dataclasses, os, sys
from pathlib import Path

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))  # the scripts, one folder up
import common, gan
from exercises.curves import plot_logs, read_log

STUDIES = {'beta1': [('beta1-0.5', ['--beta1', '0.5']), ('beta1-0.9', ['--beta1', '0.9'])],
           'versus': [('bce', ['--loss', 'bce']), ('wgan-gp', ['--loss', 'wgan-gp'])]}
PANELS = [('loss', ['loss D', 'loss G'], 'linear'), ('D output', ['D(x)', 'D(G(z))', 'W'], 'linear'),
          ('gradient norm', ['|grad D|', '|grad G|'], 'log'), ('FID', ['FID'], 'log')]


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter,
                                epilog='every other flag is a gan.py flag (python gan.py --help)')
    p.add_argument('--study', default='beta1', choices=STUDIES, help='what to compare (default: beta1)')
    args, rest = p.parse_known_args(argv)
    base = common.parse_config(gan.Config, gan.PRESETS, gan.pick, rest)
    out = Path(base.out or f'runs/gan-{Path(base.dataset).name}-{args.study}')
    runs = {}
    for label, flags in STUDIES[args.study]:  # parsed and checked before the first one trains
        sub = common.parse_config(gan.Config, gan.PRESETS, gan.pick, rest + flags + [
            '--out', str(out / label), '--fid-every', str(base.fid_every or 10 ** 9)])  # FID at least at the end
        gan.check(sub)
        runs[label] = sub
    with common.script_guard():
        for sub in runs.values():  # each run decides for itself: continue (or just read) what is there, else start
            gan.train(dataclasses.replace(sub, resume=(Path(sub.out) / 'ckpt.pt').exists()))
    plot_logs({label: sub.out for label, sub in runs.items()}, out / f'{args.study}.png', PANELS, f'{args.study}: ')
    rows = []
    for label, sub in runs.items():
        steps, fids = read_log(Path(sub.out) / 'log.txt')['FID']
        rows.append(f'{label:10s} | steps {steps[-1]} | FID-{sub.fid_samples} {fids[-1]:.2f}')
    (out / f'{args.study}.txt').write_text('\n'.join(rows) + '\n')
    print('\n'.join(rows) + f'\nwrote {out}/{args.study}.txt, {args.study}.png, a folder per run')


if __name__ == '__main__':
    main()
