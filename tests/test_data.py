"""Data layer: official archives (real bytes from ../shared/data), the CIFAR-10 parser, .npz datasets, bad input."""
import hashlib, io, os, pickle, shutil, tarfile

import numpy as np
import pytest
import torch

import common

DATA = common.data_dir()


def test_mnist_from_official_archives():
    x, y = common.load_dataset('mnist', 'train')
    assert x.shape == (60000, 1, 28, 28) and x.dtype == torch.uint8
    assert y.shape == (60000,) and set(y.unique().tolist()) == set(range(10))
    assert y[:5].tolist() == [5, 0, 4, 1, 9]  # the well-known first MNIST labels
    xt, _ = common.load_dataset('mnist', 'test')
    assert xt.shape == (10000, 1, 28, 28)
    x2, _ = common.load_dataset('mnist', 'train')  # second call: from the decoded cache
    assert torch.equal(x, x2) and (common.cache_dir() / 'mnist-train-x.npy').exists()


def cifar_fixture(folder):
    """The 5,438-image CIFAR-10 subset written in the official cifar-10-python.tar.gz layout (NOT CIFAR-10)."""
    d = np.load(DATA / 'cifar10-subset' / 'cifar10_prefix_subset.npz')
    path = folder / 'cifar-10-python.tar.gz'
    with tarfile.open(path, 'w:gz') as tar:
        def add(name, obj):
            b = pickle.dumps(obj, protocol=2)
            info = tarfile.TarInfo(f'cifar-10-batches-py/{name}')
            info.size = len(b)
            tar.addfile(info, io.BytesIO(b))
        for k in range(1, 6):
            sel = d['src_train'][:, 0] == k
            add(f'data_batch_{k}', {b'batch_label': f'training batch {k} of 5'.encode(), b'data': d['x_train'][sel],
                                    b'labels': d['y_train'][sel].tolist(), b'filenames': [b'x.png'] * int(sel.sum())})
        add('test_batch', {b'batch_label': b'testing batch 1 of 1', b'data': d['x_test'],
                           b'labels': d['y_test'].tolist(), b'filenames': [b'x.png'] * len(d['y_test'])})
        tar.add(DATA / 'cifar10-subset' / 'batches.meta', 'cifar-10-batches-py/batches.meta')
    return path, d


def test_cifar10_parser_on_official_layout(tmp_path):
    path, d = cifar_fixture(tmp_path)
    arrays = common.read_cifar10(path)
    x, y = arrays['train']
    assert x.shape == (5438, 3, 32, 32) and x.dtype == np.uint8
    np.testing.assert_array_equal(x.reshape(5438, -1), d['x_train'])  # channel planes R, G, B in row-major order
    np.testing.assert_array_equal(y, d['y_train'])
    assert arrays['test'][0].shape == (1017, 3, 32, 32)
    # official first training image is a frog (label 6) whose top-left pixel is (59, 62, 63)
    assert y[0] == 6 and x[0, :, 0, 0].tolist() == [59, 62, 63]


def test_cifar10_subset_fixture_is_refused_as_cifar10(tmp_path):
    cifar_fixture(tmp_path)
    with pytest.raises(common.DataError, match='cifar-10-python.tar.gz: md5 is .* expected c58f3010'):
        common.load_dataset('cifar10', root=tmp_path)


@pytest.mark.parametrize('damage', ['flip', 'truncate'])
def test_corrupt_archive_raises_checksum_error(tmp_path, damage):
    (tmp_path / 'mnist').mkdir()
    for f in os.listdir(DATA / 'mnist'):
        shutil.copy(DATA / 'mnist' / f, tmp_path / 'mnist' / f)
    bad = tmp_path / 'mnist' / 't10k-labels-idx1-ubyte.gz'
    b = bytearray(bad.read_bytes())
    if damage == 'flip':
        b[100] ^= 0xFF
    else:
        b = b[:1000]
    bad.write_bytes(bytes(b))
    os.environ['GENMODELS_CACHE'], cache = str(tmp_path / 'cache'), os.environ['GENMODELS_CACHE']
    try:
        with pytest.raises(common.DataError, match='t10k-labels-idx1-ubyte.gz: sha256 is .* expected f7ae60f9'):
            common.load_dataset('mnist', 'test', root=tmp_path)
    finally:
        os.environ['GENMODELS_CACHE'] = cache


def test_truncated_idx_is_a_clear_error(tmp_path):
    path = tmp_path / 'x.gz'
    path.write_bytes((DATA / 'mnist' / 't10k-images-idx3-ubyte.gz').read_bytes()[:5000])
    with pytest.raises(common.DataError, match='x.gz: cannot read this idx archive'):
        common.read_idx(path)


def test_failed_download_leaves_no_partial_file(tmp_path):
    src = tmp_path / 'src.bin'
    src.write_bytes(b'not the archive')
    dest = tmp_path / 'dl' / 'train-images-idx3-ubyte.gz'
    with pytest.raises(common.DataError, match='sha256'):
        common.download(src.as_uri(), dest, 'sha256:' + '0' * 64)
    assert not list(tmp_path.glob('dl/*'))  # nothing written, not even a temp file
    common.download(src.as_uri(), dest, 'md5:' + hashlib.md5(b'not the archive').hexdigest())
    assert dest.read_bytes() == b'not the archive'


def test_unknown_dataset_and_bad_npz(tmp_path):
    with pytest.raises(common.DataError, match="unknown dataset 'cifar100': use one of mnist, fashion-mnist, cifar10"):
        common.load_dataset('cifar100')
    with pytest.raises(common.DataError, match='missing.npz: not an .npz of uint8 images'):
        common.load_dataset(str(tmp_path / 'missing.npz'))
    np.savez(tmp_path / 'floats.npz', np.zeros((2, 8, 8, 3)))
    with pytest.raises(common.DataError, match='floats.npz: not an .npz of uint8 images'):
        common.load_dataset(str(tmp_path / 'floats.npz'))


def test_npz_of_your_own_images_is_a_dataset(tmp_path):
    x = np.random.default_rng(0).integers(0, 256, (5, 8, 6, 3), dtype=np.uint8)  # (N, H, W, C), as --mode sample writes
    np.savez(tmp_path / 'mine.npz', x)
    got, y = common.load_dataset(str(tmp_path / 'mine.npz'))
    assert y is None and got.shape == (5, 3, 8, 6) and torch.equal(got, torch.from_numpy(x).permute(0, 3, 1, 2))


def test_random_batch_range_and_flips():
    x = torch.arange(4 * 4, dtype=torch.uint8).view(1, 1, 4, 4).repeat(64, 1, 1, 1) * 10
    torch.manual_seed(0)
    xb, _ = common.random_batch(x, None, 64, flip=True)
    ref = x[0].float() / 127.5 - 1
    flipped = [torch.equal(b, ref.flip(2)) for b in xb]
    assert all(f or torch.equal(b, ref) for f, b in zip(flipped, xb)) and 10 < sum(flipped) < 54
    assert xb.min() >= -1 and xb.max() <= 1


def test_atomic_write_survives_a_concurrent_writer(tmp_path):
    path = tmp_path / 'mnist-train-x.npy'

    def outer(f):  # another process (a second DDP rank filling the cache) writes the same file mid-way through ours
        common.atomic_write(path, lambda g: g.write(b'inner'))
        f.write(b'outer')
    common.atomic_write(path, outer)
    assert path.read_bytes() == b'outer' and list(tmp_path.iterdir()) == [path]  # last writer wins, no temp left
