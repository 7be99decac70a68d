"""Infrastructure shared by the scripts: config/CLI, device and DDP, datasets, checkpoints, image grids, plots.
No paper maths lives here (that belongs in the concept scripts); every function is plain plumbing that
ddpm.py, ddim.py, eval_fid.py, ... would otherwise each write again.
"""
import argparse, dataclasses, gzip, hashlib, inspect, os, pickle, re, signal, sys, tarfile, tempfile, urllib.request
from contextlib import contextmanager
from pathlib import Path

import numpy as np
import torch
import torch.distributed as dist
from PIL import Image

# -----------------------------------------------------------------------------
# Config: a dataclass whose fields become --flags; a field's trailing comment is its --help text


def parse_config(cls, presets=None, argv=None):
    """Build cls from the command line. presets(values) -> dict of overrides applied below explicit flags."""
    helps = dict(re.findall(r'^\s+(\w+)\s*:[^#\n]*#\s*(.*)$', inspect.getsource(cls), re.M))
    doc = sys.modules[cls.__module__].__doc__
    p = argparse.ArgumentParser(description=doc, formatter_class=argparse.RawDescriptionHelpFormatter)
    for f in dataclasses.fields(cls):
        names = dict.fromkeys(['--' + f.name.replace('_', '-'), '--' + f.name])  # --batch-size and --batch_size
        extra = dict(type=_parse_bool, nargs='?', const=True) if f.type is bool else dict(type=f.type)  # bare --flag: 1
        p.add_argument(*names, dest=f.name, default=argparse.SUPPRESS, metavar=f.type.__name__.upper(),
                       help=f'{helps.get(f.name, "")} (default: {f.default})', **extra)
    given = vars(p.parse_args(argv))
    values = {f.name: f.default for f in dataclasses.fields(cls)}
    values.update(presets(dict(values, **given)) if presets else {})
    values.update(given)
    return cls(**values)


def _parse_bool(s):
    if s.lower() in ('1', 'true', 'yes', 'on'): return True
    if s.lower() in ('0', 'false', 'no', 'off'): return False
    raise argparse.ArgumentTypeError(f'expected 1/0 (or true/false), got {s!r}')


def fail(msg):
    """Stop with one clear error line instead of a traceback."""
    raise SystemExit(f'error: {msg}')


def check_ranges(cfg, positive=(), nonnegative=(), unit=()):
    """One clear error for a flag out of range: positive (> 0), nonnegative (>= 0), unit ([0, 1])."""
    for names, ok, want in ((positive, lambda v: v > 0, '> 0'), (nonnegative, lambda v: v >= 0, '>= 0'),
                            (unit, lambda v: 0 <= v <= 1, 'in [0, 1]')):
        for k in names:
            if not ok(getattr(cfg, k)):
                fail(f'--{k.replace("_", "-")} {getattr(cfg, k)} must be {want}')


# -----------------------------------------------------------------------------
# Device and DDP (torchrun sets RANK/WORLD_SIZE/LOCAL_RANK)


def resolve_device(device):
    if device == 'auto':
        return 'cuda' if torch.cuda.is_available() else 'mps' if torch.backends.mps.is_available() else 'cpu'
    kind = device.split(':')[0]
    available = dict(cpu=True, cuda=torch.cuda.is_available(), mps=torch.backends.mps.is_available())
    if not available.get(kind):
        fail(f'--device {device}: ' + ('not available on this machine' if kind in available else 'unknown device') +
             '; use --device auto, cpu' + ''.join(f', {k}' for k, v in available.items() if v and k != 'cpu'))
    return device


def setup(device='auto'):
    """Return (device, rank, world_size); initialises the process group under torchrun."""
    device = resolve_device(device)
    if 'RANK' not in os.environ:
        return device, 0, 1
    rank, world, local = int(os.environ['RANK']), int(os.environ['WORLD_SIZE']), int(os.environ['LOCAL_RANK'])
    if device.startswith('cuda'):
        device = f'cuda:{local}'
        torch.cuda.set_device(device)
    if not dist.is_initialized():  # a script may set up, then call another's train() that sets up again
        dist.init_process_group('nccl' if device.startswith('cuda') else 'gloo')
    return device, rank, world


def print0(*args, **kwargs):
    if not dist.is_initialized() or dist.get_rank() == 0:
        print(*args, **kwargs, flush=True)


@contextmanager
def script_guard():
    """Around a script's work: a data error becomes one clear line, Ctrl-C / SIGTERM outside training end the
    process at once (exit 130) without a traceback; under torchrun the ranks leave together and the process group is
    torn down however the work ends."""
    old = signal.signal(signal.SIGTERM, _interrupt)  # SIGTERM (timeout, schedulers, torchrun) acts like Ctrl-C
    try:
        yield
        if dist.is_initialized():
            dist.barrier()  # leave together: gloo can abort if a peer tears down while rank 0 still writes
    except DataError as e:
        fail(str(e))
    except KeyboardInterrupt:
        print('\ninterrupted', file=sys.stderr, flush=True)
        raise SystemExit(130) from None
    finally:
        signal.signal(signal.SIGTERM, old)
        if dist.is_initialized():
            dist.destroy_process_group()


def _interrupt(*_):
    raise KeyboardInterrupt


class Stop(list):
    """Truthy once Ctrl-C or SIGTERM arrived. Inside `with stop.now():` a signal raises KeyboardInterrupt at once
    instead (for sampling and evaluation between training steps, where the state is consistent and can be saved)."""
    urgent = False

    def __call__(self, *_):
        self.append(1)
        if self.urgent:
            raise KeyboardInterrupt

    @contextmanager
    def now(self):
        if self:
            raise KeyboardInterrupt
        self.urgent = True
        try:
            yield
        finally:
            self.urgent = False


@contextmanager
def stop_requested():
    """Inside the block Ctrl-C and SIGTERM only mark the yielded Stop, so a training loop can finish its step, save
    and exit; the previous handlers are restored afterwards (in-process callers keep a working Ctrl-C)."""
    stop = Stop()
    old = {s: signal.signal(s, stop) for s in (signal.SIGINT, signal.SIGTERM)}
    try:
        yield stop
    finally:
        for s, handler in old.items():
            signal.signal(s, handler)


# -----------------------------------------------------------------------------
# Datasets: official archives, verified, decoded once into cached uint8 .npy files that later runs load directly

MNIST_URLS = ['https://ossci-datasets.s3.amazonaws.com/mnist/', 'http://yann.lecun.com/exdb/mnist/']
FASHION_URLS = ['http://fashion-mnist.s3-website.eu-central-1.amazonaws.com/']
DATASETS = {  # facts about the data, not hyperparameters
    'mnist': dict(size=28, channels=1, classes=10, urls=MNIST_URLS, files={
        'train-images-idx3-ubyte.gz': 'sha256:440fcabf73cc546fa21475e81ea370265605f56be210a4024d2ca8f203523609',
        'train-labels-idx1-ubyte.gz': 'sha256:3552534a0a558bbed6aed32b30c495cca23d567ec52cac8be1a0730e8010255c',
        't10k-images-idx3-ubyte.gz': 'sha256:8d422c7b0a1c1c79245a5bcf07fe86e33eeafee792b84584aec276f5a2dbc4e6',
        't10k-labels-idx1-ubyte.gz': 'sha256:f7ae60f92e00ec6debd23a6088c31dbd2371eca3ffa0defaefb259924204aec6'}),
    'fashion-mnist': dict(size=28, channels=1, classes=10, urls=FASHION_URLS, files={
        'train-images-idx3-ubyte.gz': 'sha256:3aede38d61863908ad78613f6a32ed271626dd12800ba2636569512369268a84',
        'train-labels-idx1-ubyte.gz': 'sha256:a04f17134ac03560a47e3764e11b92fc97de4d1bfaf8ba1a3aa29af54cc90845',
        't10k-images-idx3-ubyte.gz': 'sha256:346e55b948d973a97e58d2351dde16a484bd415d4595297633bb08f03db6a073',
        't10k-labels-idx1-ubyte.gz': 'sha256:67da17c76eaffca5446c3361aaab5c3cd6d1c2608764d35dfb1850b086bf8dd5'}),
    'cifar10': dict(size=32, channels=3, classes=10, urls=['https://www.cs.toronto.edu/~kriz/'], files={
        'cifar-10-python.tar.gz': 'md5:c58f30108f718f92721af3b95e74349a'}),
    # NOT CIFAR-10: 5,438 train / 1,017 test images with CIFAR-10's exact pixels (../shared/data/SOURCES.md), for
    # 32x32 RGB work where the full archive cannot be had; never report results on it as CIFAR-10 results
    'cifar10-subset': dict(size=32, channels=3, classes=10, urls=[], files={
        'cifar10_prefix_subset.npz': 'md5:b3056ae479cf1c6a76659f526b840e91'}),
}


class DataError(ValueError):
    pass


def data_dir(path=None):
    return Path(path or os.environ.get('GENMODELS_DATA') or 'data')


def cache_dir():
    d = Path(os.environ.get('GENMODELS_CACHE') or 'data/cache')
    if d.exists() and not d.is_dir():
        fail(f'the cache folder {d} ($GENMODELS_CACHE, default data/cache) is a file: remove it or point '
             f'$GENMODELS_CACHE elsewhere')
    d.mkdir(parents=True, exist_ok=True)
    return d


def verify(path, checksum):
    """checksum is 'md5:<hex>' or 'sha256:<hex or hex prefix>'; raise DataError naming the file on a mismatch."""
    algo, want = checksum.split(':')
    h = hashlib.new(algo)
    with open(path, 'rb') as f:
        for block in iter(lambda: f.read(1 << 20), b''):
            h.update(block)
    if not h.hexdigest().startswith(want):
        raise DataError(f'{path}: {algo} is {h.hexdigest()}, expected {want}. The file is corrupt, truncated or not '
                        f'the official one: delete it and let the script download it again, or replace it with the '
                        f'official file.')


def download(url, dest, checksum):
    """Download url to dest atomically (temp file + rename) and verify it; a failed download leaves nothing behind."""
    dest = Path(dest)
    dest.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=dest.parent, prefix=dest.name + '.', suffix='.part')
    try:
        with os.fdopen(fd, 'wb') as f, urllib.request.urlopen(url, timeout=60) as r:
            while block := r.read(1 << 20):
                f.write(block)
        verify(tmp, checksum)
        os.replace(tmp, dest)
    finally:
        if os.path.exists(tmp):
            os.remove(tmp)


def archive(name, fname, root=None):
    """Path of a verified official archive file: from the data folder if there, else downloaded into it."""
    info, path = DATASETS[name], data_dir(root) / name / fname
    if not path.exists() and (data_dir(root) / fname).exists():
        path = data_dir(root) / fname  # a flat folder of the archive files is fine too
    if not path.exists():
        print0(f'{fname} not found under {data_dir(root)}; downloading it')
        errors = []
        for url in info['urls']:
            try:
                download(url + fname, path, info['files'][fname])
                break
            except (OSError, DataError) as e:
                errors.append(f'{url + fname}: {e}')
        else:
            raise DataError(f'could not get {fname}: ' + '; '.join(errors) + f'. Put the official file at {path} or '
                            f'point --data-dir (or $GENMODELS_DATA) at a folder that has it.')
    verify(path, info['files'][fname])
    return path


def read_idx(path):
    """MNIST idx format: magic (2 zero bytes, dtype, ndim), big-endian dims, then uint8 data."""
    try:
        with gzip.open(path) as f:
            data = f.read()
        ndim = data[3]
        shape = tuple(int.from_bytes(data[4 + 4 * i: 8 + 4 * i], 'big') for i in range(ndim))
        return np.frombuffer(data, np.uint8, offset=4 + 4 * ndim).reshape(shape)
    except (OSError, EOFError, ValueError) as e:
        raise DataError(f'{path}: cannot read this idx archive ({e}); delete it and download it again') from e


def read_cifar10(path):
    """The official python tarball: 5 pickled training batches + test_batch, rows of 1024 R, 1024 G, 1024 B."""
    out = {'train': ([], []), 'test': ([], [])}
    try:
        with tarfile.open(path) as tar:
            for m in sorted(tar.getmembers(), key=lambda m: m.name):
                split = 'train' if '/data_batch_' in m.name else 'test' if m.name.endswith('/test_batch') else None
                if split:
                    d = pickle.load(tar.extractfile(m), encoding='bytes')
                    out[split][0].append(np.asarray(d[b'data'], np.uint8).reshape(-1, 3, 32, 32))
                    out[split][1].append(np.asarray(d[b'labels'], np.int64))
    except (OSError, EOFError, tarfile.TarError, pickle.UnpicklingError, KeyError) as e:
        raise DataError(f'{path}: cannot read this CIFAR-10 archive ({e}); delete it and download it again') from e
    if not out['train'][0] or not out['test'][0]:
        raise DataError(f'{path}: no data_batch_*/test_batch inside; is this cifar-10-python.tar.gz?')
    return {k: (np.concatenate(x), np.concatenate(y)) for k, (x, y) in out.items()}


def image_shape(cfg):
    """(C, H, W) of the images a run's Config (its .dataset, and .image_size for image folders) trains on."""
    info = DATASETS.get(cfg.dataset, dict(channels=3, size=cfg.image_size))
    return info['channels'], info['size'], info['size']


def load_dataset(name, split='train', root=None, image_size=None):
    """(x uint8 (N, C, H, W), y int64 (N,) or None) for a dataset name or a folder of images."""
    if name not in DATASETS:
        if os.sep in name or os.path.exists(name):
            return load_image_folder(name, image_size), None
        raise DataError(f'unknown dataset {name!r}: use one of {", ".join(DATASETS)} or the path of an image folder')
    if split not in ('train', 'test'):
        raise DataError(f'unknown split {split!r} for {name}: use train or test')
    fx, fy = cache_dir() / f'{name}-{split}-x.npy', cache_dir() / f'{name}-{split}-y.npy'
    if not (fx.exists() and fy.exists()):
        if name == 'cifar10':
            arrays = read_cifar10(archive(name, 'cifar-10-python.tar.gz', root))
        elif name == 'cifar10-subset':
            with np.load(archive(name, 'cifar10_prefix_subset.npz', root)) as d:
                arrays = {s: (d[f'x_{s}'].reshape(-1, 3, 32, 32), d[f'y_{s}'].astype(np.int64)) for s in ('train', 'test')}
        else:
            arrays = {s: (read_idx(archive(name, f'{p}-images-idx3-ubyte.gz', root))[:, None],
                          read_idx(archive(name, f'{p}-labels-idx1-ubyte.gz', root)).astype(np.int64))
                      for s, p in (('train', 'train'), ('test', 't10k'))}
        for s, (x, y) in arrays.items():
            for f, a in ((cache_dir() / f'{name}-{s}-x.npy', x), (cache_dir() / f'{name}-{s}-y.npy', y)):
                atomic_write(f, lambda fh: np.save(fh, a))
    try:
        return torch.from_numpy(np.load(fx)), torch.from_numpy(np.load(fy))
    except (OSError, ValueError, EOFError) as e:
        raise DataError(f'{fx} or {fy}: unreadable cached array ({e}); delete both and run again to rebuild them') from e


def load_image_folder(folder, image_size):
    """Every png/jpg below folder, as RGB, shorter side resized to image_size and centre-cropped."""
    if not os.path.isdir(folder):
        raise DataError(f'{folder}: no such folder (give a dataset name: {", ".join(DATASETS)}, or a folder of images)')
    if not image_size:
        raise DataError(f'{folder}: a folder of images needs --image-size (e.g. 32 or 64)')
    files = sorted(p for p in Path(folder).rglob('*') if p.suffix.lower() in ('.png', '.jpg', '.jpeg'))
    if not files:
        raise DataError(f'{folder}: no .png/.jpg images found (searched recursively)')
    from tqdm import tqdm
    x = np.empty((len(files), 3, image_size, image_size), np.uint8)
    for i, f in enumerate(tqdm(files, desc=f'reading {folder}', disable=len(files) < 1000)):
        try:
            im = read_rgb(f)
        except (OSError, ValueError, Image.DecompressionBombError) as e:
            raise DataError(f'{f}: cannot read this image ({e}); delete or replace it') from e
        if max(im.size) > 4 * min(im.size):  # a centre crop would keep < 1/4 of it, and resizing a strip first is huge
            raise DataError(f'{f}: {im.width}x{im.height} is too far from square for a centre crop; crop it by hand or '
                            f'remove it')
        s = image_size / min(im.size)
        im = im.resize((max(image_size, round(im.width * s)), max(image_size, round(im.height * s))), Image.BICUBIC)
        left, top = (im.width - image_size) // 2, (im.height - image_size) // 2
        x[i] = np.asarray(im.crop((left, top, left + image_size, top + image_size))).transpose(2, 0, 1)
    return torch.from_numpy(x)


def read_rgb(path):
    """An image file as 8-bit RGB; 16-bit grey PNGs are scaled to 8 bits, not saturated as PIL's convert() does."""
    with Image.open(path) as im:
        if im.mode in ('I;16', 'I;16B', 'I;16L', 'I'):
            a = np.asarray(im, np.float64)
            a = a / 257 if im.mode.startswith('I;16') or a.max() > 255 else a
            return Image.fromarray(a.round().clip(0, 255).astype(np.uint8)).convert('RGB')
        return im.convert('RGB')


def random_batch(x, y, batch_size, flip):
    """Draw a batch on x's device (uint8 (N, C, H, W)) scaled to [-1, 1], with random horizontal flips."""
    idx = torch.randint(len(x), (batch_size,), device=x.device)
    xb = x[idx].float() / 127.5 - 1
    if flip:
        xb = torch.where(torch.rand(batch_size, 1, 1, 1, device=x.device) < 0.5, xb.flip(3), xb)
    return xb, (y[idx] if y is not None else None)


# -----------------------------------------------------------------------------
# Checkpoints and caches: written atomically; checkpoints loaded without unpickling code


def atomic_write(path, write):
    """write(file) into a fresh temp file beside path, then rename it over path: a run killed mid-write leaves the
    old file intact, and processes writing the same file at once (DDP ranks filling a cache) never collide."""
    path = Path(path)
    if path.parent.exists() and not path.parent.is_dir():
        fail(f'{path.parent} is a file, not a folder: give another --out (or $GENMODELS_CACHE)')
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=path.name + '.', suffix='.tmp')
    try:
        with os.fdopen(fd, 'wb') as f:
            write(f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except OSError as e:  # disk full, quota, permissions: the previous file is still there
        fail(f'could not write {path} ({e.strerror or e}); the previous version, if any, is intact. Free some space '
             f'or give another --out')
    finally:
        if os.path.exists(tmp):
            os.remove(tmp)


_claimed = {}  # run folder -> open lock file, held for the life of the process


def claim(out):
    """Make this process the one run writing into the folder out (call on rank 0 before writing there): a second
    process gets a clear error instead of interleaving logs and checkpoints. The OS drops the lock when the process
    ends, however it ends. Temp files left by a write that was killed are removed."""
    import fcntl
    out = Path(out)
    if out.exists() and not out.is_dir():
        fail(f'--out {out} is a file, not a folder: give another --out')
    out.mkdir(parents=True, exist_ok=True)
    if str(out.resolve()) in _claimed:
        return
    f = open(out / '.lock', 'a+')
    try:
        fcntl.flock(f, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except OSError:
        f.seek(0)
        fail(f'{out} is in use by another run (pid {f.read().strip() or "?"}); wait for it to finish, stop it, or '
             f'give another --out')
    f.truncate(0)
    f.write(str(os.getpid()))
    f.flush()
    _claimed[str(out.resolve())] = f
    for tmp in out.glob('*.tmp'):
        tmp.unlink()


def nonfinite(state, prefix=''):
    """Names of the floating-point tensors in a (nested) checkpoint dict that hold NaN or inf."""
    if isinstance(state, dict):
        return [n for k, v in state.items() for n in nonfinite(v, f'{prefix}{k}.')]
    if isinstance(state, (list, tuple)):
        return [n for i, v in enumerate(state) for n in nonfinite(v, f'{prefix}{i}.')]
    if torch.is_tensor(state) and state.is_floating_point() and not torch.isfinite(state).all():
        return [prefix[:-1]]
    return []


def save_ckpt(path, state):
    """Atomically; a state with NaN/inf weights never replaces the last good checkpoint."""
    if bad := nonfinite(state):
        fail(f'not saving {path}: {", ".join(bad[:3])} hold NaN/inf (the training diverged); the last good checkpoint '
             f'is kept. Lower --lr, or check the data')
    atomic_write(path, lambda f: torch.save(state, f))


def load_ckpt(path, script):
    if not os.path.exists(path):
        fail(f'no checkpoint at {path}: train first, or point --out at the run folder that has ckpt.pt')
    try:
        ckpt = torch.load(path, map_location='cpu', weights_only=True)
    except Exception as e:  # the refusal of a pickle with code in it says so at its start; keep all of the reason
        fail(f'{path} is not a readable checkpoint ({type(e).__name__}: {" ".join(str(e).split())[:600]})')
    if not isinstance(ckpt, dict) or ckpt.get('script') != script:
        fail(f'{path} was not written by {script} (script: {ckpt.get("script") if isinstance(ckpt, dict) else None})')
    if bad := nonfinite(ckpt):
        fail(f'{path}: {", ".join(bad[:3])} hold NaN/inf; this checkpoint is unusable, train again')
    return ckpt


def check_resume(ckpt, cfg, keys):
    """--resume: one clear error when the flags of cfg give another model than the checkpoint's (its config's keys)."""
    if changed := [k for k in keys if ckpt['config'][k] != getattr(cfg, k)]:
        fail(f'--resume: the checkpoint has different {", ".join(changed)}; pass the same values, e.g. ' +
             ' '.join(f'--{k.replace("_", "-")} {ckpt["config"][k]}' for k in changed))


def write_samples(x, out, tag, save='png,npz'):
    """uint8 (N, C, H, W) samples -> out/tag.npz (uint8 (N, H, W, C), key arr_0, for eval_fid.py), a folder out/tag/
    of PNGs (emptied first, so a later FID never scores stale files) and a grid of the first 64, out/tag.png."""
    out = Path(out)
    if 'npz' in save:
        atomic_write(out / f'{tag}.npz', lambda f: np.savez(f, x.permute(0, 2, 3, 1).cpu().numpy()))
    if 'png' in save:
        folder = out / tag
        if folder.exists():
            for old in folder.glob('*.png'):
                old.unlink()
        folder.mkdir(parents=True, exist_ok=True)
        from tqdm import tqdm
        for i, im in enumerate(tqdm(x.cpu(), desc='writing PNGs', disable=len(x) < 1000)):
            grid_image(im[None], 1, pad=0).save(folder / f'{i:06d}.png')
    save_grid(x[:64], out / f'{tag}.png')


# -----------------------------------------------------------------------------
# Images (PIL) and figures (matplotlib: axes, ticks, legends, log scales and heat maps we would otherwise draw by hand)


def pyplot():
    """matplotlib.pyplot drawing to files (no display needed), imported only by the modes that make figures."""
    import matplotlib
    matplotlib.use('Agg')
    import matplotlib.pyplot as plt
    plt.rcParams.update({'figure.dpi': 110, 'axes.grid': True, 'grid.alpha': 0.3, 'figure.constrained_layout.use': True})
    return plt


def to_uint8(x):
    """[-1, 1] float (N, C, H, W) -> uint8."""
    return ((x.float() + 1) * 127.5).round().clamp(0, 255).to(torch.uint8)


def grid_image(x, nrow=None, pad=2):
    """uint8 (N, C, H, W) -> PIL image of an nrow-wide grid."""
    x = x.cpu()
    n, c, h, w = x.shape
    nrow = nrow or int(np.ceil(np.sqrt(n)))
    ncol = -(-n // nrow)
    g = torch.full((c, ncol * (h + pad) + pad, nrow * (w + pad) + pad), 255, dtype=torch.uint8)
    for i in range(n):
        r, k = divmod(i, nrow)
        g[:, pad + r * (h + pad): pad + r * (h + pad) + h, pad + k * (w + pad): pad + k * (w + pad) + w] = x[i]
    return Image.fromarray(g[0].numpy() if c == 1 else g.permute(1, 2, 0).numpy())


def save_grid(x, path, nrow=None):
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    grid_image(x, nrow).save(path)
