"""eval_fid.py against the real pytorch-fid 0.3.0 and clean-fid 0.1.35 (fid_ref/reference.json), plus its maths and
its errors. Default run: the probe features and the cifarsub pair in pytorch-fid mode; pytest -m slow: the rest."""
import json, os, shutil
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

import eval_fid

DATA = Path(os.environ.get('GENMODELS_DATA') or Path(__file__).parents[1] / '..' / 'shared' / 'data')
REF, WEIGHTS = DATA / 'fid_ref', DATA / 'weights' / 'pt_inception-2015-12-05-nofc.pth'
needs_data = pytest.mark.skipif(not WEIGHTS.exists() or not REF.exists(), reason=f'no FID weights/references in {DATA}')


@pytest.fixture(scope='module')
def model():
    if not WEIGHTS.exists():
        pytest.skip(f'no FID weights at {WEIGHTS}')
    return eval_fid.load_inception(WEIGHTS)


@pytest.fixture(scope='module')
def features(model):  # features(folder, mode), each computed once per module (Inception on CPU: ~20 img/s)
    cache = {}

    def get(name, mode):
        if (name, mode) not in cache:
            cache[name, mode] = eval_fid.input_features(REF / name, mode, model=model, batch_size=50)
        return cache[name, mode]
    return get


@needs_data
def test_probe_features_match_pytorch_fid(features):
    ref = np.load(REF / 'probe_features_pytorch_fid.npy')  # cifarsub_train/00000..00007.png
    got = features('cifarsub_train', 'pytorch-fid')[:8]
    assert np.abs(got - ref).max() <= 1e-4 * np.abs(ref).max()


@needs_data
@pytest.mark.parametrize('pair, mode', [
    ('cifarsub', 'pytorch-fid'),
    pytest.param('cifarsub', 'clean', marks=pytest.mark.slow),
    pytest.param('mnist', 'pytorch-fid', marks=pytest.mark.slow),
    pytest.param('mnist', 'clean', marks=pytest.mark.slow)])
def test_fid_matches_reference_tools(features, pair, mode):
    tool = {'pytorch-fid': 'pytorch_fid', 'clean': 'clean_fid'}[mode]
    ref = json.loads((REF / 'reference.json').read_text())[tool][f'{pair}_train~{pair}_test']
    fid = eval_fid.frechet_distance(*eval_fid.stats_of(features(f'{pair}_train', mode)),
                                    *eval_fid.stats_of(features(f'{pair}_test', mode)))
    print(f"{pair} {mode}: FID {fid:.6f}, reference {ref:.6f}, difference {fid - ref:+.2e}")
    assert abs(fid - ref) <= 1e-4, (fid, ref)


@needs_data
def test_singular_stats_exact(features):  # 500 samples: covariances of rank 499 in 2048 dims
    f1, f2 = features('cifarsub_train', 'pytorch-fid'), features('cifarsub_test', 'pytorch-fid')
    (mu1, s1), (mu2, s2) = eval_fid.stats_of(f1), eval_fid.stats_of(f2)
    assert eval_fid.frechet_distance(mu1, s1, mu1, s1) < 1e-6
    # low rank: tr (S1 S2)^1/2 = nuclear norm of X1 X2^T / sqrt((N1 - 1)(N2 - 1)), X centred features (N, 2048)
    X1, X2 = f1 - mu1, f2 - mu2
    tr_covmean = np.linalg.svd(X1 @ X2.T, compute_uv=False).sum() / np.sqrt((len(f1) - 1) * (len(f2) - 1))
    want = ((mu1 - mu2) ** 2).sum() + np.trace(s1) + np.trace(s2) - 2 * tr_covmean
    assert abs(eval_fid.frechet_distance(mu1, s1, mu2, s2) - want) < 1e-8


def test_frechet_distance_closed_forms():
    rng = np.random.default_rng(0)
    mu1, mu2, a, b = rng.normal(size=5), rng.normal(size=5), rng.uniform(0.1, 3, 5), rng.uniform(0.1, 3, 5)
    Q = np.linalg.qr(rng.normal(size=(5, 5)))[0]  # commuting covariances: (S1 S2)^1/2 = Q diag(sqrt(a b)) Q^T
    want = ((mu1 - mu2) ** 2).sum() + ((np.sqrt(a) - np.sqrt(b)) ** 2).sum()
    assert np.isclose(eval_fid.frechet_distance(mu1, (Q * a) @ Q.T, mu2, (Q * b) @ Q.T), want, rtol=1e-12)
    A, B = rng.normal(size=(2, 2, 2))
    S1, S2 = A @ A.T, B @ B.T  # 2x2: tr M^1/2 = sqrt(tr M + 2 sqrt(det M)) for M with real eigenvalues >= 0
    tr_sqrt = np.sqrt(np.trace(S1 @ S2) + 2 * np.sqrt(np.linalg.det(S1) * np.linalg.det(S2)))
    assert np.isclose(eval_fid.frechet_distance(np.zeros(2), S1, np.zeros(2), S2), np.trace(S1 + S2) - 2 * tr_sqrt)


def test_frechet_distance_singular_and_bad_stats():
    rng = np.random.default_rng(1)
    f1, f2 = rng.normal(size=(5, 64)), rng.normal(size=(7, 64)) + 0.5  # rank 4 and 6 covariances in 64 dims
    fid = eval_fid.frechet_distance(*eval_fid.stats_of(f1), *eval_fid.stats_of(f2))
    assert np.isfinite(fid) and fid > 0
    assert eval_fid.frechet_distance(np.ones(3), np.zeros((3, 3)), np.zeros(3), np.zeros((3, 3))) == pytest.approx(3)
    with pytest.raises(ValueError, match='NaN'):
        eval_fid.frechet_distance(np.full(3, np.nan), np.eye(3), np.zeros(3), np.eye(3))
    with pytest.raises(ValueError, match='do not match'):
        eval_fid.frechet_distance(np.zeros(3), np.eye(3), np.zeros(4), np.eye(4))


def test_kid_is_the_unbiased_mmd():
    rng = np.random.default_rng(2)
    x, y = rng.normal(size=(6, 3)), rng.normal(size=(6, 3)) + 1

    def k(a, b):
        return (a @ b / 3 + 1) ** 3
    mmd = sum(k(x[i], x[j]) + k(y[i], y[j]) for i in range(6) for j in range(6) if i != j) / 30 - 2 * np.mean(
        [k(x[i], y[j]) for i in range(6) for j in range(6)])  # subsets of all 6: each subset is the full set
    assert np.isclose(eval_fid.kernel_distance(x, y, num_subsets=3), mmd)


def test_precision_recall_known_answers():
    line = lambda *v: np.array(v, dtype=np.float64)[:, None] * [1.0, 0.0]  # points on a line in 2-D
    real = line(*range(10))  # k = 3 radii: 3 at the ends 0 and 9, 2 inside
    assert eval_fid.precision_recall(real, real) == (1.0, 1.0)
    # -2.5 and 11.5 fall inside the end balls (radius 3), 20 outside all; the fake radii (>= 14) cover every real point
    assert eval_fid.precision_recall(real, line(-2.5, 4.5, 11.5, 20)) == (0.75, 1.0)
    # a fake cluster (radii 0.2-0.3) lies inside the real manifold but covers only the real point 0
    assert eval_fid.precision_recall(real, line(0, 0.1, 0.2, 0.3)) == (1.0, 0.1)
    with pytest.raises(ValueError, match='more than 3 images'):
        eval_fid.precision_recall(real, real[:3])


def test_inception_score():
    assert eval_fid.inception_score(np.zeros((20, 1008)), splits=2)[0] == pytest.approx(1)
    confident = np.where(np.arange(1000)[:, None] % 10 == np.arange(1008), 50.0, 0.0)  # 10 classes, balanced
    assert eval_fid.inception_score(confident, splits=10)[0] == pytest.approx(10, rel=1e-3)


@pytest.mark.parametrize('size', [(32, 32), (28, 28), (400, 350), (17, 300)])
def test_clean_resize_is_pils_bicubic(size):
    a = np.random.default_rng(3).integers(0, 256, (*size, 3), dtype=np.uint8)
    ref = np.stack([np.asarray(Image.fromarray(a[:, :, c].astype(np.float32)).resize((299, 299), Image.BICUBIC))
                    for c in range(3)]).clip(0, 255)
    got = eval_fid.preprocess(torch.from_numpy(a).permute(2, 0, 1)[None], 'clean')[0].numpy() * 128 + 128
    assert np.abs(got - ref).max() < 1e-3


# -----------------------------------------------------------------------------
# The command line and bad input


@pytest.fixture(autouse=True)
def fid_weights(monkeypatch):
    monkeypatch.setenv('FID_WEIGHTS', str(WEIGHTS))


def cli(*args, capsys=None):  # -> the lines it printed
    eval_fid.main([str(a) for a in args] + ['--batch-size', '8'])
    return capsys.readouterr().out.strip().splitlines() if capsys else None


def error_of(*args):
    with pytest.raises(SystemExit) as e:
        cli(*args)
    return str(e.value.code)


@needs_data
def test_folder_against_its_stats_file_is_zero(tmp_path, capsys):
    for i in range(3):
        shutil.copy(REF / 'cifarsub_train' / f'{i:05d}.png', tmp_path / f'{i}.png')
    cli(tmp_path, '--save-stats', tmp_path / 'stats.npz', capsys=capsys)
    with np.load(tmp_path / 'stats.npz') as f:
        assert f['mu'].shape == (2048,) and f['sigma'].shape == (2048, 2048)
    line = cli(tmp_path, tmp_path / 'stats.npz', capsys=capsys)[-1]
    assert line.startswith('FID: ') and abs(float(line.split()[1])) < 1e-6
    with pytest.raises(ValueError, match='computed in --mode pytorch-fid, not clean'):  # never a silently wrong number
        eval_fid.reference_stats(tmp_path / 'stats.npz', mode='clean')


@needs_data
def test_cli_kid_bench_and_help(tmp_path, capsys):
    for name in ('cifarsub_train', 'cifarsub_test'):
        (tmp_path / name).mkdir()
        for i in range(4):
            shutil.copy(REF / name / f'{i:05d}.png', tmp_path / name)
    *lines, last = cli(tmp_path / 'cifarsub_train', tmp_path / 'cifarsub_test', '--kid', '--pr', capsys=capsys)
    fid, kid = float(last.removeprefix('FID: ')), float(lines[0].removeprefix('KID: '))
    assert fid > 0 and np.isfinite(kid), (fid, kid)
    precision, recall = (float(w.strip(',')) for w in lines[1].split()[1:4:2])
    assert 0 <= precision <= 1 and 0 <= recall <= 1, lines[1]
    import bench
    bench.main(['fid', '4'])  # the GPU benchmark, tiny, on CPU
    bench = capsys.readouterr().out.splitlines()
    assert sum(float(line.split(': ')[1].split()[0]) > 0 for line in bench if 'img/s' in line) == 3
    assert any('FID of 4 in-memory samples' in line for line in bench)
    with pytest.raises(SystemExit):
        eval_fid.main(['--help'])
    help_text = capsys.readouterr().out
    assert all(w in help_text for w in ('pytorch-fid', 'clean', 'DDPM', 'EDM', 'bench.py fid', 'exact fp32'))


@needs_data
def test_mixed_sizes_grayscale_rgba_are_converted_like_pil(tmp_path, model):
    rng = np.random.default_rng(4)
    Image.fromarray(rng.integers(0, 256, (32, 32, 3), dtype=np.uint8)).save(tmp_path / 'a.png')
    Image.fromarray(rng.integers(0, 256, (28, 28), dtype=np.uint8)).save(tmp_path / 'b.png')  # L
    (tmp_path / 'sub').mkdir()
    Image.fromarray(rng.integers(0, 256, (30, 40, 4), dtype=np.uint8)).save(tmp_path / 'sub' / 'c.png')  # RGBA
    got = eval_fid.input_features(tmp_path, model=model)
    files = (tmp_path / 'a.png', tmp_path / 'b.png', tmp_path / 'sub' / 'c.png')
    want = [eval_fid.compute_features(torch.from_numpy(np.array(Image.open(f).convert('RGB'))).permute(2, 0, 1)[None],
                                      model=model) for f in files]
    assert np.allclose(got, np.concatenate(want), rtol=1e-5, atol=1e-5)


@needs_data
def test_dataset_stats_are_cached_and_download_errors_are_clear(monkeypatch, model, tmp_path):
    calls = []

    def load_dataset(name, split):
        calls.append(name)
        return torch.randint(0, 256, (4, 1, 28, 28), dtype=torch.uint8), None

    def download(url, dest, checksum):
        raise OSError('offline')
    monkeypatch.setattr(eval_fid.common, 'load_dataset', load_dataset)
    monkeypatch.setattr(eval_fid.common, 'cache_dir', lambda: tmp_path)
    mu, sigma = eval_fid.reference_stats('mnist:test', model=model)
    mu2, sigma2 = eval_fid.reference_stats('mnist:test', model=model)  # from the cache: no second load
    assert calls == ['mnist'] and np.array_equal(mu, mu2) and np.array_equal(sigma, sigma2) and mu.shape == (2048,)
    # the cache is keyed by the Inception weights, so other weights never reuse these statistics
    assert (tmp_path / f'fid-stats-mnist-test-pytorch-fid-{model.weights_id}.npz').exists()
    monkeypatch.delenv('FID_WEIGHTS')  # no weights given: a download, here failing
    monkeypatch.setattr(eval_fid.common, 'download', download)
    message = error_of('mnist:test', 'mnist:train')
    assert 'offline' in message and '--weights' in message


def test_nan_features_are_an_error():
    class NaNNet(torch.nn.Linear):
        def forward(self, x):
            return torch.full((len(x), 2048), float('nan'))
    with pytest.raises(ValueError, match='NaN'):
        eval_fid.compute_features(torch.zeros(2, 3, 8, 8, dtype=torch.uint8), model=NaNNet(1, 1))


@needs_data
def test_bad_inputs_give_one_clear_error(tmp_path):
    empty, one, bad = tmp_path / 'empty', tmp_path / 'one', tmp_path / 'bad'
    for d in (empty, one, bad):
        d.mkdir()
    a = np.random.default_rng(5).integers(0, 256, (8, 8, 3), dtype=np.uint8)
    for f in (one / 'a.png', bad / 'a.png'):
        Image.fromarray(a).save(f)
    (bad / 'broken.png').write_bytes(b'not a png')
    np.savez(tmp_path / 'float.npz', np.zeros((4, 8, 8, 3), np.float32))
    np.savez(tmp_path / 'flat.npz', np.zeros((4, 8, 8), np.uint8))
    np.savez(tmp_path / 'nostats.npz', mean=np.zeros(2048), cov=np.eye(2048))
    assert '0 images' in error_of(empty, one)
    assert 'at least 2' in error_of(one, empty)
    assert 'broken.png' in error_of(bad, one)
    assert 'uint8' in error_of(tmp_path / 'float.npz', one) and 'float32' in error_of(tmp_path / 'float.npz', one)
    assert '(4, 8, 8)' in error_of(tmp_path / 'flat.npz', one)
    assert 'mu, sigma' in error_of(tmp_path / 'nostats.npz', one)
    assert 'not a folder' in error_of(tmp_path / 'missing', one)
    assert 'two inputs' in error_of(one)
    assert 'fc layer' in error_of(one, bad, '--is')
    assert 'weights file' in error_of(one, bad, '--weights', tmp_path / 'missing.pth')
