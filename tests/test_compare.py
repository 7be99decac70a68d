"""exercises/compare.py (issue 25, exercise 10): the budget ends training, a rerun skips what is measured and continues
an interrupted training with the seconds it had left, and the stability column aggregates the seeds."""
import json

import pytest

import common, eval_fid
from exercises import compare

GAN = '--ch 8 --z-dim 8 --batch-size 8 --log-every 10'


def run(out, minutes=0.2):
    compare.main(['--out', str(out), '--device', 'cpu', '--families', 'gan', '--minutes', str(minutes),
                  '--fid-samples', '8', '--sample-batch', '4', '--gan', GAN])
    return json.loads((out / 'rows' / 'gan-s0.json').read_text())


@pytest.fixture
def small_reference(monkeypatch):  # 8 real images as the FID reference keep the Inception on CPU cheap
    monkeypatch.setenv('FID_WEIGHTS', str(common.data_dir() / 'weights' / 'pt_inception-2015-12-05-nofc.pth'))
    real = common.load_dataset('mnist', 'test')[0][:8]
    monkeypatch.setattr(eval_fid, 'reference_stats', lambda spec, model: eval_fid.stats_of(
        eval_fid.compute_features(real, model=model)))


def test_the_budget_ends_training_and_a_rerun_continues(tmp_path, small_reference):
    row = run(tmp_path)
    assert row['trained'] and row['rc'] == 130  # stopped by SIGTERM at the budget, saved
    assert 12 <= row['used'] < 25 and row['step'] > 0 and not row['diverged']
    assert row['fid'] > 0 and 0 <= row['precision'] <= 1 and 0 <= row['recall'] <= 1 and row['bpd'] is None
    assert '| gan | gan.py' in (tmp_path / 'compare.md').read_text() and (tmp_path / 'compare.png').exists()
    log = (tmp_path / 'gan-s0.log').read_text()
    assert run(tmp_path) == row and (tmp_path / 'gan-s0.log').read_text() == log  # measured: nothing redone

    # an interrupted training that had used 2 s of its 12 goes on from its checkpoint for the 10 s left only
    (tmp_path / 'rows' / 'gan-s0.json').write_text(json.dumps({'used': 2.0}))
    again = run(tmp_path)
    assert again['step'] > row['step'] and 12 <= again['used'] < 13.5


def test_the_table_shows_the_spread_over_seeds_and_divergence():
    rows = {'gan': [dict(fid=f, precision=0.5, recall=0.25, bpd=None, bpd_how='none', ms=1.0, nfe=1, step=10,
                         minutes=10, diverged=d) for f, d in ((10, False), (20, True), (30, False))],
            'vae': [dict(fid=5.0)]}  # not measured yet: no row
    text = compare.table(compare.Config(families='gan,vae'), rows)
    gan = next(line for line in text.splitlines() if line.startswith('| gan'))
    assert '| 20.0 |' in gan and '± 10.0 (sample std) over 3' in gan and 'diverged 1 of 3' in gan
    assert '| vae' not in text


def test_bad_families_are_one_clear_error(tmp_path):
    with pytest.raises(SystemExit, match='--families: gans not among gan, vae'):
        compare.main(['--out', str(tmp_path), '--families', 'gan,gans'])
