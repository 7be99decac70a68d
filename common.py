"""Infrastructure shared by the scripts: config and presets, device and DDP, the training-loop driver, datasets,
checkpoints and samples. No paper maths lives here: every function is plumbing each script would otherwise repeat.
"""
import argparse, dataclasses, gzip, hashlib, inspect, json, math, os, pickle, re, shutil, signal, sys, tarfile, tempfile
import time, urllib.request
from contextlib import contextmanager
from pathlib import Path

import numpy as np
import torch
import torch.distributed as dist
from PIL import Image
from tqdm import tqdm

# -----------------------------------------------------------------------------
# Config: a dataclass whose fields become --flags (a field's trailing comment is its --help), and named presets


def parse_config(cls, presets=None, pick=None, argv=None):
    """cls from the command line. presets {name: {field: value}} apply below the flags given: --preset NAME, else
    pick(values) (default: mnist for 28x28 data, else cifar10) plus -cpu on a CPU if there is one; printed."""
    helps = dict(re.findall(r'^\s+(\w+)\s*:[^#\n]*#\s*(.*)$', inspect.getsource(cls), re.M))
    epilog = presets and 'presets (--preset NAME; applied below the flags given):\n' + '\n'.join(
        f'  {k:14s} {" ".join(f"--{f} {v}" for f, v in p.items()) or "(the defaults)"}' for k, p in presets.items())
    p = argparse.ArgumentParser(description=sys.modules[cls.__module__].__doc__, epilog=epilog or None,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    for f in dataclasses.fields(cls):
        extra = dict(type=_parse_bool, nargs='?', const=True) if f.type is bool else dict(type=f.type)  # bare --flag: 1
        p.add_argument(*dict.fromkeys([f'--{f.name.replace("_", "-")}', f'--{f.name}']), dest=f.name,  # both spellings
                       default=argparse.SUPPRESS, metavar=f.type.__name__.upper(),
                       help=f'{helps.get(f.name, "")} (default: {f.default!r})', **extra)
    given = vars(p.parse_args(argv))
    values = {f.name: f.default for f in dataclasses.fields(cls)}
    if presets:
        v = dict(values, **given)
        base = (pick or (lambda v: 'mnist' if v['dataset'] in ('mnist', 'fashion-mnist') else 'cifar10'))(v)
        cpu = resolve_device(v['device']) == 'cpu' and f'{base}-cpu' in presets
        if (name := given.get('preset') or base + '-cpu' * cpu) not in presets:
            fail(f'--preset {name!r} is not one of: {", ".join(presets)}')
        chosen = {k: x for k, x in presets[name].items() if k not in given}
        values.update(chosen, preset=name)
        how = '--preset' if 'preset' in given else 'picked' + f' for --dataset {v.get("dataset")}' * ('dataset' in v)
        how += ' on a CPU' * (cpu and 'preset' not in given)
        print0(f'preset {name} ({how}; --help lists the others): ' +
               (' '.join(f'--{k.replace("_", "-")} {x}' for k, x in chosen.items()) or 'the defaults'))
    return cls(**dict(values, **given))


def _parse_bool(s):
    if s.lower() not in ('1', 'true', 'yes', 'on', '0', 'false', 'no', 'off'):
        raise argparse.ArgumentTypeError(f'expected 1/0 (or true/false), got {s!r}')
    return s.lower() in ('1', 'true', 'yes', 'on')


def fail(msg):
    """Stop with one clear error line instead of a traceback."""
    raise SystemExit(f'error: {msg}')


def check(cfg, choices=None, positive=(), nonnegative=(), unit=()):
    """One clear error for a flag outside its choices (--save: png and/or npz) or range (> 0, >= 0, [0, 1])."""
    choices = dict(choices or {}, **{'save': ('png', 'npz', 'png,npz', 'npz,png')} if 'save' in vars(cfg) else {})
    for k, allowed in choices.items():
        if getattr(cfg, k) not in allowed:
            fail(f'--{k.replace("_", "-")} {getattr(cfg, k)!r} is not one of: {", ".join(allowed)}')
    for names, ok, want in ((positive, lambda v: v > 0, '> 0'), (nonnegative, lambda v: v >= 0, '>= 0'),
                            (unit, lambda v: 0 <= v <= 1, 'in [0, 1]')):
        if bad := next((k for k in names if not ok(getattr(cfg, k))), None):
            fail(f'--{bad.replace("_", "-")} {getattr(cfg, bad)} must be {want}')


def ints(cfg, name):
    """The comma-separated integers of a string flag (e.g. --ch-mult 1,2,2), or one clear error."""
    try:
        return [int(s) for s in getattr(cfg, name).split(',') if s]
    except ValueError:
        fail(f'--{name.replace("_", "-")} {getattr(cfg, name)!r} must be comma-separated integers, e.g. 1,2,2')


# -----------------------------------------------------------------------------
# Device and DDP (torchrun sets RANK, WORLD_SIZE and LOCAL_RANK)


def resolve_device(device):
    if device == 'auto':
        return 'cuda' if torch.cuda.is_available() else 'mps' if torch.backends.mps.is_available() else 'cpu'
    available = dict(cpu=True, cuda=torch.cuda.is_available(), mps=torch.backends.mps.is_available())
    if not available.get(kind := device.split(':')[0]):
        fail(f'--device {device}: ' + ('not available on this machine' if kind in available else 'unknown device') +
             '; use --device auto, cpu' + ''.join(f', {k}' for k, v in available.items() if v and k != 'cpu'))
    return device


def setup(device='auto'):
    """Return (device, rank, world_size); initialises the process group under torchrun."""
    device = resolve_device(device)
    if 'RANK' not in os.environ:
        return device, 0, 1
    if device.startswith('cuda'):
        torch.cuda.set_device(device := f'cuda:{os.environ["LOCAL_RANK"]}')
    if not dist.is_initialized():  # a script may set up, then call another's train() that sets up again
        dist.init_process_group('nccl' if device.startswith('cuda') else 'gloo')
    return device, int(os.environ['RANK']), int(os.environ['WORLD_SIZE'])


def print0(*args, **kwargs):
    if int(os.environ.get('RANK', 0)) == 0:  # torchrun's rank, known before the process group exists
        print(*args, **kwargs, flush=True)


@contextmanager
def script_guard():
    """A data error is one line; Ctrl-C / SIGTERM outside training end at once (130); torchrun ranks leave together."""
    old = signal.signal(signal.SIGTERM, signal.default_int_handler)  # SIGTERM (timeouts, torchrun) acts like Ctrl-C
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


# -----------------------------------------------------------------------------
# The training loop's mechanics, written once so that each script's loop shows only its own maths


class Loop:
    """`for step in loop:` runs steps start .. steps - 1, torch seeded from (seed, rank, step) so --resume 1 is exact.
    loop.log(name=value) ends a step: a log line every --log-every steps (values reach the host only then; a NaN/inf
    or a failed check(values) stops the run before save could write it); save(step, clock) on rank 0 every
    --ckpt-every steps, at the end, before any output (loop.due(name): every `name` steps and at the last) and on a
    stop. Ctrl-C / SIGTERM mark a stop (the step completes, is saved, exit 130), or interrupt at once while outputs
    are made. DDP ranks agree on stopping at log steps. --time-budget counts training seconds only (loop.clock)."""

    def __init__(self, cfg, out, save, start=0, steps=None, clock=0.0, check=None, **every):
        self.cfg, self.out, self.save, self.check, self.clock = cfg, Path(out), save, check, clock
        self.start = self.done = self.saved = start
        self.steps, self.every = steps or cfg.steps, dict(every, ckpt=cfg.ckpt_every)
        self.rank, self.world = (dist.get_rank(), dist.get_world_size()) if dist.is_initialized() else (0, 1)
        self.stop = self.urgent = self.final = False
        self.last = {}  # the values of the last log line, as floats

    def __enter__(self):
        self.old = {s: signal.signal(s, self.signal) for s in (signal.SIGINT, signal.SIGTERM)}
        if self.rank == 0:
            (self.out / 'config.json').write_text(json.dumps(dataclasses.asdict(self.cfg), indent=1))
        self.bar = tqdm(total=self.steps, initial=self.start, disable=self.rank != 0)
        return self

    def signal(self, *_):
        self.stop = True
        if self.urgent:
            raise KeyboardInterrupt

    def __exit__(self, kind, *_):
        self.urgent = False  # a second signal while the checkpoint below is written only marks a stop
        for s, handler in self.old.items():
            signal.signal(s, handler)
        self.bar.close()
        if kind is KeyboardInterrupt:  # while outputs were made, after a complete step: save it (if not yet), stop
            self.stopped()

    def stopped(self):
        if self.saved != self.done and self.rank == 0:
            self.save(self.done, self.clock)
        print0(f'\nstopped at step {self.done}; checkpoint saved to {self.out}/ckpt.pt (continue with --resume 1)')
        raise SystemExit(130)

    def __iter__(self):
        if self.start >= self.steps:
            print0(f'{self.out}/ckpt.pt is already at step {self.start} (--steps {self.steps}): nothing to train; '
                   f'raise --steps to continue it')
        self.n_last, self.t_last, self.tick = self.start, self.clock, time.perf_counter()
        for step in range(self.start, self.steps):
            torch.manual_seed((self.cfg.seed * 1000 + self.rank) * 10 ** 9 + step)  # batch, noise, dropout
            self.urgent, self.tick = False, self.tick or time.perf_counter()  # the training clock runs again
            yield step  # the step's body calls log() once
            if self.final:
                return

    def due(self, name):
        return (self.every[name] > 0 and self.done % self.every[name] == 0) or self.final

    def log(self, **values):
        self.done += 1
        self.bar.update()
        at_log, stop, budget = self.done % self.cfg.log_every == 0, self.stop, getattr(self.cfg, 'time_budget', 0)
        over = bool(budget) and self.clock + time.perf_counter() - self.tick >= budget
        if self.world > 1:  # agreed at log steps only: a collective every step would cost a host sync each
            flags = torch.tensor([float(stop), float(over)], device='cuda' if dist.get_backend() == 'nccl' else 'cpu')
            if at_log:
                dist.all_reduce(flags, dist.ReduceOp.MAX)
            stop, over = (bool(f) for f in flags.tolist()) if at_log else (False, False)
        self.final = self.done == self.steps or over
        ckpt = stop or any(self.due(k) for k in self.every)
        if at_log or ckpt:
            self.last = {k: v.item() if torch.is_tensor(v) else float(v) for k, v in values.items()}  # the host sync
            bad = next((f'{k} is {v}' for k, v in self.last.items() if not math.isfinite(v)), None)
            if bad := bad or (self.check and self.check(self.last)):
                fail(f'{bad} at step {self.done}: the last good checkpoint'
                     f'{f" ({self.out}/ckpt.pt, step {self.saved})" if self.saved else ", if any,"} is kept; '
                     f'lower --lr, or check the data')
        if at_log or self.final:
            t = self.clock + time.perf_counter() - self.tick
            dt, self.t_last, self.n_last = (t - self.t_last) / max(self.done - self.n_last, 1), t, self.done
            self.bar.set_postfix({k: f'{v:.4g}' for k, v in list(self.last.items())[:4]}, refresh=False)
            self.write(' | '.join(f'{k} {v:.4g}' for k, v in self.last.items()) +
                       f' | ms/step {1000 * dt:.1f} | img/s {self.cfg.batch_size / dt:.0f}', echo=False)
        if ckpt:
            if torch.cuda.is_available():
                torch.cuda.synchronize()  # the queued steps belong to the training clock
            self.clock, self.tick = self.clock + time.perf_counter() - self.tick, None
            if self.rank == 0:
                self.save(self.done, self.clock)
            self.saved = self.done
            if stop:
                self.stopped()
        self.urgent = True  # what follows until the next step (outputs) is interrupted by a signal at once

    def write(self, text, echo=True):
        """'step N | text' into log.txt, and onto the console (rank 0): an evaluation's result, say."""
        if self.rank == 0:
            with open(self.out / 'log.txt', 'a') as f:
                print(f'step {self.done} | {text}', file=f)
            if echo:
                tqdm.write(f'step {self.done} | {text}')


# -----------------------------------------------------------------------------
# Datasets: official archives, verified, decoded once into cached uint8 .npy files that later runs load directly

IDX = [f'{s}-{k}-idx{d}-ubyte.gz' for s in ('train', 't10k') for k, d in (('images', 3), ('labels', 1))]  # MNIST's
DATASETS = {  # facts about the data, not hyperparameters; checksums: sha256 prefixes (64 bits) or md5
    'mnist': dict(size=28, channels=1, url='https://ossci-datasets.s3.amazonaws.com/mnist/', files=dict(zip(IDX, [
        'sha256:440fcabf73cc546f', 'sha256:3552534a0a558bbe', 'sha256:8d422c7b0a1c1c79', 'sha256:f7ae60f92e00ec6d']))),
    'fashion-mnist': dict(size=28, channels=1, url='http://fashion-mnist.s3-website.eu-central-1.amazonaws.com/',
                          files=dict(zip(IDX, ['sha256:3aede38d61863908', 'sha256:a04f17134ac03560',
                                               'sha256:346e55b948d973a9', 'sha256:67da17c76eaffca5']))),
    'cifar10': dict(size=32, channels=3, url='https://www.cs.toronto.edu/~kriz/', files={
        'cifar-10-python.tar.gz': 'md5:c58f30108f718f92721af3b95e74349a'}),
    # NOT CIFAR-10: 5,438 train / 1,017 test images with CIFAR-10's exact pixels (../shared/data/SOURCES.md), for
    # 32x32 RGB work where the full archive cannot be had; never report results on it as CIFAR-10 results
    'cifar10-subset': dict(size=32, channels=3, url='', files={'cifar10_prefix_subset.npz': 'md5:b3056ae479cf1c6a7'}),
}  # all four have ten classes


class DataError(ValueError):
    pass


def data_dir(path=None):
    return Path(path or os.environ.get('GENMODELS_DATA') or 'data')


def cache_dir():
    if (d := Path(os.environ.get('GENMODELS_CACHE') or 'data/cache')).exists() and not d.is_dir():
        fail(f'the cache folder {d} ($GENMODELS_CACHE, default data/cache) is a file: remove it or point it elsewhere')
    d.mkdir(parents=True, exist_ok=True)
    return d


def verify(path, checksum, data=None):
    """checksum ('md5:' or 'sha256:' + hex or a hex prefix) of the file path, or of data to be written there."""
    algo, want = checksum.split(':')
    digest = hashlib.new(algo, Path(path).read_bytes() if data is None else data).hexdigest()
    if not digest.startswith(want):
        raise DataError(f'{path}: {algo} is {digest}, expected {want}. The file is corrupt, truncated or not the '
                        f'official one: delete it and let the script download it again, or put the official one.')


def download(url, dest, checksum):
    """url into dest, verified before it is written (atomically): a failed download leaves nothing behind."""
    with urllib.request.urlopen(url, timeout=60) as r:
        data = r.read()
    verify(dest, checksum, data)
    atomic_write(dest, lambda f: f.write(data))


def archive(name, fname, root=None):
    """Path of a verified official archive file: from the data folder (or flat in it) if there, else downloaded."""
    info, path, flat = DATASETS[name], data_dir(root) / name / fname, data_dir(root) / fname
    if path.exists() or flat.exists():
        verify(path := path if path.exists() else flat, info['files'][fname])
        return path
    print0(f'{fname} not found under {data_dir(root)}; downloading it')
    try:
        download(info['url'] + fname, path, info['files'][fname])
    except (OSError, ValueError) as e:  # offline, or (ValueError) no official URL: the file must be put there
        raise DataError(f'could not get {info["url"] + fname} ({e}). Put the official file at {path} or point '
                        f'--data-dir (or $GENMODELS_DATA) at a folder that has it.') from None
    return path


def read_idx(path):
    """MNIST idx format: magic (2 zero bytes, dtype, ndim), big-endian dims, then uint8 data."""
    try:
        with gzip.open(path) as f:
            data = f.read()
        shape = [int.from_bytes(data[4 + 4 * i: 8 + 4 * i], 'big') for i in range(data[3])]
        return np.frombuffer(data, np.uint8, offset=4 + 4 * data[3]).reshape(shape)
    except (OSError, EOFError, ValueError) as e:
        raise DataError(f'{path}: cannot read this idx archive ({e}); delete it and download it again') from e


def read_cifar10(path):
    """The official python tarball: 5 pickled training batches + test_batch, rows of 1024 R, 1024 G, 1024 B."""
    out = {'train': ([], []), 'test': ([], [])}
    try:
        with tarfile.open(path) as tar:  # verified by its md5 before its pickles are read
            for m in sorted(tar.getmembers(), key=lambda m: m.name):
                if split := 'train' if '/data_batch_' in m.name else 'test' if m.name.endswith('/test_batch') else None:
                    d = pickle.load(tar.extractfile(m), encoding='bytes')
                    out[split][0].append(np.asarray(d[b'data'], np.uint8).reshape(-1, 3, 32, 32))
                    out[split][1].append(np.asarray(d[b'labels'], np.int64))
    except (OSError, EOFError, tarfile.TarError, pickle.UnpicklingError, KeyError) as e:
        raise DataError(f'{path}: cannot read this CIFAR-10 archive ({e}); delete it and download it again') from e
    if not out['train'][0] or not out['test'][0]:
        raise DataError(f'{path}: no data_batch_*/test_batch inside; is this cifar-10-python.tar.gz?')
    return {k: (np.concatenate(x), np.concatenate(y)) for k, (x, y) in out.items()}


def image_shape(cfg):
    """(C, H, W) of the images a run's Config trains on (its .dataset: a name, or an .npz of images)."""
    info = DATASETS.get(cfg.dataset)
    return (info['channels'], info['size'], info['size']) if info else tuple(load_dataset(cfg.dataset)[0].shape[1:])


def load_dataset(name, split='train', root=None):
    """(x uint8 (N, C, H, W), y int64 (N,) or None) of a dataset, decoded once into a cache (a --data-dir given, root,
    is checked anyway), or of your own images: an .npz of uint8 (N, H, W, C) in arr_0, as --mode sample writes."""
    if name.endswith('.npz') and name not in DATASETS:
        try:
            x = np.load(name)['arr_0']
            assert x.dtype == np.uint8 and x.ndim == 4 and x.shape[3] in (1, 3)
        except Exception:
            raise DataError(f'{name}: not an .npz of uint8 images (N, H, W, C) with C 1 or 3 in arr_0') from None
        return torch.from_numpy(x).permute(0, 3, 1, 2).contiguous(), None
    if name not in DATASETS:
        raise DataError(f'unknown dataset {name!r}: use one of {", ".join(DATASETS)} or an .npz of your own images')
    if split not in ('train', 'test'):
        raise DataError(f'unknown split {split!r} for {name}: use train or test')
    fx, fy = cache_dir() / f'{name}-{split}-x.npy', cache_dir() / f'{name}-{split}-y.npy'
    paths = {f: archive(name, f, root) for f in DATASETS[name]['files']} if root or not fx.exists() else {}
    if not (fx.exists() and fy.exists()):
        if name == 'cifar10':
            arrays = read_cifar10(paths['cifar-10-python.tar.gz'])
        elif name == 'cifar10-subset':
            d = np.load(paths['cifar10_prefix_subset.npz'])
            arrays = {s: (d[f'x_{s}'].reshape(-1, 3, 32, 32), d[f'y_{s}'].astype(np.int64)) for s in ('train', 'test')}
        else:
            arrays = {s: (read_idx(paths[f'{p}-images-idx3-ubyte.gz'])[:, None],
                          read_idx(paths[f'{p}-labels-idx1-ubyte.gz']).astype(np.int64))
                      for s, p in (('train', 'train'), ('test', 't10k'))}
        for s, xy in arrays.items():
            for a, f in zip(xy, 'xy'):
                atomic_write(cache_dir() / f'{name}-{s}-{f}.npy', lambda fh: np.save(fh, a))
    try:
        return torch.from_numpy(np.load(fx)), torch.from_numpy(np.load(fy))
    except (OSError, ValueError, EOFError) as e:
        raise DataError(f'{fx} or {fy}: unreadable cached array ({e}); delete both and run again to rebuild them')


def random_batch(x, y, batch_size, flip):
    """Draw a batch on x's device (uint8 (N, C, H, W)) scaled to [-1, 1], with random horizontal flips."""
    idx = torch.randint(len(x), (batch_size,), device=x.device)
    xb = x[idx].float() / 127.5 - 1
    if flip:
        xb = torch.where(torch.rand(batch_size, 1, 1, 1, device=x.device) < 0.5, xb.flip(3), xb)
    return xb, (y[idx] if y is not None else None)


# -----------------------------------------------------------------------------
# Run folders and checkpoints: one process per folder, atomic writes, loaded without unpickling code


def atomic_write(path, write):
    """write(file) into a temp file renamed over path: a kill mid-write leaves the old file; writers never collide."""
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=Path(path).parent, prefix=Path(path).name + '.', suffix='.tmp')
    try:
        with os.fdopen(fd, 'wb') as f:
            write(f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except OSError as e:  # disk full, quota, permissions: the previous file is still there
        fail(f'could not write {path} ({e.strerror or e}); the previous version, if any, is intact: free some space')
    finally:
        if os.path.exists(tmp):
            os.remove(tmp)


_claimed = {}  # run folder -> open lock file, held for the life of the process


def claim(out):
    """This process is the one run writing into out (training or sampling, rank 0); the OS drops the lock however the
    process ends. A second run gets a clear error. Temp files of a killed write are removed."""
    import fcntl
    if (out := Path(out)).exists() and not out.is_dir():
        fail(f'--out {out} is a file, not a folder: give another --out')
    out.mkdir(parents=True, exist_ok=True)
    if (key := str(out.resolve())) not in _claimed:
        f = open(out / '.lock', 'a+')
        try:
            fcntl.flock(f, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError:
            fail(f'{out} is in use by another run (pid {(out / ".lock").read_text().strip() or "?"}); wait for it to '
                 f'finish, stop it, or give another --out')
        f.truncate(0), f.write(str(os.getpid())), f.flush()
        _claimed[key] = f
        for tmp in out.glob('*.tmp'):
            tmp.unlink()


def nonfinite(state, prefix=''):
    """Names of the floating-point tensors in a (nested) checkpoint dict or list that hold NaN or inf."""
    items = state.items() if isinstance(state, dict) else enumerate(state) if isinstance(state, (list, tuple)) else ()
    bad = torch.is_tensor(state) and state.is_floating_point() and not state.isfinite().all()
    return [prefix[:-1]] if bad else [n for k, v in items for n in nonfinite(v, f'{prefix}{k}.')]


def save_ckpt(path, state):
    """Atomically; a state with NaN/inf weights never replaces the last good checkpoint."""
    if bad := nonfinite(state):
        fail(f'not saving {path}: {", ".join(bad[:3])} hold NaN/inf; the last good checkpoint is kept. Lower --lr')
    atomic_write(path, lambda f: torch.save(state, f))


def torch_load(path, what='checkpoint'):
    """torch.load(weights_only=True): no file can run code; a refused one gets a line that never suggests otherwise."""
    try:
        return torch.load(path, map_location='cpu', weights_only=True)
    except Exception as e:  # the reason only: torch's advice around it is to load with weights_only=False
        why = ' '.join(str(e).split()).split('WeightsUnpickler error:')[-1].split(' Please use')[0]
        fail(f'{path} is not a {what} ({type(e).__name__}: {why.split(" Check the doc")[0].strip()[:200] or "empty"})')


def load_ckpt(path, script):
    if not os.path.exists(path):
        fail(f'no checkpoint at {path}: train first, or point --out at the run folder that has ckpt.pt')
    if not isinstance(ckpt := torch_load(path), dict) or ckpt.get('script') != script:
        fail(f'{path} was not written by {script} (script: {ckpt.get("script") if isinstance(ckpt, dict) else None})')
    if bad := nonfinite(ckpt):
        fail(f'{path}: {", ".join(bad[:3])} hold NaN/inf; this checkpoint is unusable, train again')
    return ckpt


def resume(out, script, cfg, model_keys, recipe_keys=()):
    """The checkpoint --resume 1 continues (None for a fresh run, whose folder must not hold one). Another model
    (model_keys) is refused; a changed recipe (seed, lr, ...) is used, with a warning: the run is no longer exact."""
    if not cfg.resume and (path := Path(out) / 'ckpt.pt').exists():
        fail(f'{path} exists: pass --resume 1 to continue it, or another --out')
    ckpt = load_ckpt(Path(out) / 'ckpt.pt', script) if cfg.resume else None
    if changed := [k for k in model_keys if ckpt and ckpt['config'][k] != getattr(cfg, k)]:
        fail(f'--resume: the checkpoint has different {", ".join(changed)}; pass the same values, e.g. ' +
             ' '.join(f'--{k.replace("_", "-")} {ckpt["config"][k]}' for k in changed))
    if inexact := [k for k in recipe_keys if ckpt and ckpt['config'].get(k) != getattr(cfg, k)]:
        print0(f'warning: --resume with a different {", ".join(inexact)}: the new values apply, the run is not exact')
    return ckpt


def load_opt(opt, state):
    """An optimizer's moments from a checkpoint, with this run's lr, betas, ...: a changed --lr takes effect."""
    hyper = [{k: v for k, v in g.items() if k != 'params'} for g in opt.param_groups]
    opt.load_state_dict(state)
    for group, h in zip(opt.param_groups, hyper):
        group.update(h)


# -----------------------------------------------------------------------------
# Samples and image grids (PIL)


def write_samples(x, out, tag, save='png,npz'):
    """uint8 (N, C, H, W) -> out/tag.npz (uint8 (N, H, W, C) in arr_0) and/or PNGs in out/tag/, a grid out/tag.png.
    Old files of both formats go first, so no FID ever scores stale ones."""
    out, npz, folder = Path(out), Path(out) / f'{tag}.npz', Path(out) / tag
    for old in [npz] * npz.exists() + (sorted(folder.glob('*.png')) if folder.is_dir() else []):
        old.unlink()
    if 'npz' in save:
        atomic_write(npz, lambda f: np.savez(f, x.permute(0, 2, 3, 1).cpu().numpy()))
    if 'png' in save:
        folder.mkdir(parents=True, exist_ok=True)
        for i, im in enumerate(tqdm(x.cpu(), desc='writing PNGs', disable=len(x) < 1000)):
            grid_image(im[None], 1, pad=0).save(folder / f'{i:06d}.png')
    save_grid(x[:64], out / f'{tag}.png')
    for kept in out.glob(f'.{tag}.*'):  # sample_many's batches (see keep_dir): the .npz now holds them
        shutil.rmtree(kept)
    print(f'{len(x)} samples -> ' + ', '.join([str(npz)] * ('npz' in save) + [f'{folder}/'] * ('png' in save)) +
          f'; grid {out}/{tag}.png', flush=True)


def sample_many(draw, n, batch, seed, device, rank=0, world=1, desc='sampling', keep=None):
    """n samples, uint8 (N, C, H, W), on rank 0 (None elsewhere): draw(start, size, generator) makes images start ..
    start + size - 1, its generator seeded by (seed, start), so they are the same however many ranks share the work.
    keep (a keep_dir folder): each batch drawn is saved there, so the same command run again after a kill resumes."""
    def one(s, size):
        if keep and (f := Path(keep) / f'{s}-{size}.pt').exists():
            return torch_load(f, 'batch of samples')
        x = draw(s, size, torch.Generator(device).manual_seed(seed * 1_000_003 + s)).cpu()
        if keep:
            atomic_write(f, lambda h: torch.save(x, h))
        return x
    starts = range(0, n, batch)
    mine = [one(s, min(batch, n - s))
            for s in tqdm(starts[rank::world], desc=desc, disable=rank != 0 or len(starts) < 2, leave=False)]
    if world > 1:  # collect every rank's batches on rank 0, back in order
        parts = [None] * world
        dist.all_gather_object(parts, mine)
        mine = [parts[k % world][k // world] for k in range(len(starts))]
    return torch.cat(mine) if rank == 0 else None


def keep_dir(out, tag, cfg, ckpt):
    """sample_many's folder for out/tag.npz (write_samples removes it), named by a hash of the sampling Config and of
    the checkpoint's write time, so that no changed flag or newer model ever reuses a batch."""
    return Path(out) / f'.{tag}.{hashlib.sha1(repr((cfg, os.stat(ckpt).st_mtime_ns)).encode()).hexdigest()[:12]}'


def to_uint8(x):
    """[-1, 1] float (N, C, H, W) -> uint8."""
    return ((x.float() + 1) * 127.5).round().clamp(0, 255).to(torch.uint8)


def grid_image(x, nrow=None, pad=2):
    """uint8 (N, C, H, W) -> PIL image of an nrow-wide grid, pad white pixels around each image."""
    n, c, h, w = x.shape
    nrow = nrow or math.ceil(n ** 0.5)
    x = torch.cat([x.cpu(), torch.full((-n % nrow, c, h, w), 255, dtype=torch.uint8)])  # fill the last row
    x = torch.nn.functional.pad(x, (pad, 0, pad, 0), value=255).view(-1, nrow, c, h + pad, w + pad)
    g = torch.nn.functional.pad(x.permute(2, 0, 3, 1, 4).flatten(3).flatten(1, 2), (0, pad, 0, pad), value=255)
    return Image.fromarray(g[0].numpy() if c == 1 else g.permute(1, 2, 0).numpy())


def save_grid(x, path, nrow=None):
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    grid_image(x, nrow).save(path)
