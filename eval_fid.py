"""FID (Heusel et al. 2017, arXiv:1706.08500) with the TF Inception of the original paper, matching pytorch-fid and
clean-fid; also KID (Binkowski et al. 2018, arXiv:1801.01401), IS (Salimans et al. 2016, arXiv:1606.03498) and
improved precision and recall (Kynkaanniemi et al. 2019, arXiv:1904.06991).
    python eval_fid.py samples/ cifar10:train    # inputs: image folder | uint8 images .npz | stats .npz | dataset:split
    python eval_fid.py samples.npz stats.npz --mode clean --kid
    python eval_fid.py cifar10:train --save-stats cifar10-train.npz     # mu, sigma in pytorch-fid's format
Modes (their FIDs differ: say which one you report):
  pytorch-fid  default: [0, 1], bilinear resize to 299 without antialiasing, 2x - 1. What DDPM, ADM, EDM report.
  clean        clean-fid (Parmar et al. 2022, arXiv:2104.11222): PIL bicubic resize of each channel as float32, clip
               to [0, 255], (x - 128) / 128.
Network: pytorch-fid's port of the TF 2015-12-05 graph (pt_inception-2015-12-05-6726825d.pth, downloaded once, or
--weights / $FID_WEIGHTS), always exact fp32. Speed: python bench.py fid. Conformance (tests/test_fid.py): FID of 500
vs 500 images within 6e-5 of pytorch-fid 0.3.0 and clean-fid 0.1.35 in each mode.
"""
import argparse, contextlib, hashlib, os, time
from concurrent.futures import ThreadPoolExecutor
from functools import lru_cache
from pathlib import Path

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F
from PIL import Image
from tqdm import tqdm

import common

WEIGHTS_URL = 'https://github.com/mseitzer/pytorch-fid/releases/download/fid_weights/'
WEIGHTS_FILE, WEIGHTS_SHA256 = 'pt_inception-2015-12-05-6726825d.pth', '6726825d'
MODES = ('pytorch-fid', 'clean')
IMAGE_EXTS = ('.png', '.jpg', '.jpeg', '.bmp', '.webp', '.tif', '.tiff')

# -----------------------------------------------------------------------------
# The metrics: the Frechet distance (eq. 6 of the paper), KID and IS, on Inception features or their statistics


def psd_eigenvalues(lam):
    """Eigenvalues of a PSD matrix with those at rounding level (< d eps max, including negative ones) set to 0."""
    return np.where(lam < len(lam) * np.finfo(np.float64).eps * lam.max(), 0, lam)


def frechet_distance(mu1, sigma1, mu2, sigma2):
    """|mu1 - mu2|^2 + tr(S1 + S2 - 2 (S1 S2)^1/2), eq. (6) of the paper, in float64 and without scipy."""
    mu1, sigma1, mu2, sigma2 = (np.asarray(a, np.float64) for a in (mu1, sigma1, mu2, sigma2))
    d = len(mu1)
    if mu1.shape != (d,) or mu2.shape != (d,) or sigma1.shape != (d, d) or sigma2.shape != (d, d):
        raise ValueError(f'statistics do not match: mu {mu1.shape} {mu2.shape}, sigma {sigma1.shape} {sigma2.shape}')
    if not all(np.isfinite(a).all() for a in (mu1, sigma1, mu2, sigma2)):
        raise ValueError('the statistics contain NaN/inf')
    # tr (S1 S2)^1/2 = tr (A S2 A)^1/2 with A = S1^1/2: the same eigenvalues, now of a symmetric PSD matrix, so eigh
    # replaces scipy's sqrtm. N <= 2048 samples make the covariances singular; the square roots of their ~1500 null
    # eigenvalues, rounding noise of ~eps * |S|^2, would add 1e-5 to 1e-3 to FID: psd_eigenvalues zeroes them.
    lam, V = np.linalg.eigh(sigma1)
    A = (V * np.sqrt(psd_eigenvalues(lam))) @ V.T
    M = A @ sigma2 @ A
    tr_covmean = np.sqrt(psd_eigenvalues(np.linalg.eigvalsh((M + M.T) / 2))).sum()
    fid = ((mu1 - mu2) ** 2).sum() + np.trace(sigma1) + np.trace(sigma2) - 2 * tr_covmean
    if fid < -1e-6 * (np.trace(sigma1) + np.trace(sigma2)):
        raise ValueError(f'negative FID {fid}: a covariance is not positive semi-definite')
    return float(max(fid, 0.0))  # identical statistics leave a rounding error of ~1e-12 * trace


def kernel_distance(f1, f2, num_subsets=100, max_subset_size=1000, seed=0):
    """KID: unbiased MMD^2 with k(x, y) = (x.y / d + 1)^3, averaged over random subsets as clean-fid does."""
    d, m = f1.shape[1], min(len(f1), len(f2), max_subset_size)
    rng, mmd = np.random.default_rng(seed), []
    for _ in range(num_subsets):
        x, y = f1[rng.choice(len(f1), m, replace=False)], f2[rng.choice(len(f2), m, replace=False)]
        kxx, kyy, kxy = (x @ x.T / d + 1) ** 3, (y @ y.T / d + 1) ** 3, (x @ y.T / d + 1) ** 3
        within = (kxx.sum() - np.trace(kxx) + kyy.sum() - np.trace(kyy)) / (m * (m - 1))  # unbiased: no k(x_i, x_i)
        mmd.append(within - 2 * kxy.mean())
    return float(np.mean(mmd))


def inception_score(logits, splits=10):
    """IS = exp E_x KL(p(y|x) || p(y)) over the 1008 TF classes; mean and std over splits."""
    logp = logits - logits.max(1, keepdims=True)
    logp = logp - np.log(np.exp(logp).sum(1, keepdims=True))
    kl = [(np.exp(lp) * (lp - np.log(np.exp(lp).mean(0)))).sum(1).mean() for lp in np.array_split(logp, splits)]
    return float(np.mean(np.exp(kl))), float(np.std(np.exp(kl)))


def precision_recall(real, fake, k=3, batch=500):
    """Improved precision and recall (Kynkaanniemi et al. 2019): a set's manifold is the union of balls around its
    features, each reaching its k-th nearest neighbour in the set; precision is the share of fake features inside the
    real manifold (quality), recall the share of real ones inside the fake manifold (coverage)."""
    if min(len(real), len(fake)) <= k:
        raise ValueError(f'precision and recall with k = {k} need more than {k} images in each set')
    real, fake = torch.from_numpy(real), torch.from_numpy(fake)
    radii = lambda f: torch.cat([torch.cdist(b, f).kthvalue(k + 1, 1).values for b in f.split(batch)])  # + itself
    inside = lambda x, f, r: torch.cat([(torch.cdist(b, f) <= r).any(1) for b in x.split(batch)]).double().mean()
    return inside(fake, real, radii(real)).item(), inside(real, fake, radii(fake)).item()


# -----------------------------------------------------------------------------
# InceptionV3 as in the TF 2015-12-05 graph (pytorch-fid's FIDInception*); names follow its state dict


class Conv(nn.Module):  # pytorch-fid's BasicConv2d
    def __init__(self, cin, cout, kernel, stride=1, padding=0):
        super().__init__()
        self.conv = nn.Conv2d(cin, cout, kernel, stride, padding, bias=False)
        self.bn = nn.BatchNorm2d(cout, eps=0.001)  # TF's epsilon

    def forward(self, x):
        return F.relu(self.bn(self.conv(x)))


def avg_pool(x):  # TF averages over the pixels inside the image only, at the borders too
    return F.avg_pool2d(x, 3, 1, 1, count_include_pad=False)


class InceptionA(nn.Module):  # 35x35: 1x1 | 5x5 | two 3x3 | pool
    def __init__(self, cin, pool_features):
        super().__init__()
        self.branch1x1 = Conv(cin, 64, 1)
        self.branch5x5_1, self.branch5x5_2 = Conv(cin, 48, 1), Conv(48, 64, 5, padding=2)
        self.branch3x3dbl_1, self.branch3x3dbl_2 = Conv(cin, 64, 1), Conv(64, 96, 3, padding=1)
        self.branch3x3dbl_3 = Conv(96, 96, 3, padding=1)
        self.branch_pool = Conv(cin, pool_features, 1)

    def forward(self, x):
        b5 = self.branch5x5_2(self.branch5x5_1(x))
        b3 = self.branch3x3dbl_3(self.branch3x3dbl_2(self.branch3x3dbl_1(x)))
        return torch.cat([self.branch1x1(x), b5, b3, self.branch_pool(avg_pool(x))], 1)


class InceptionB(nn.Module):  # 35x35 -> 17x17
    def __init__(self, cin):
        super().__init__()
        self.branch3x3 = Conv(cin, 384, 3, stride=2)
        self.branch3x3dbl_1, self.branch3x3dbl_2 = Conv(cin, 64, 1), Conv(64, 96, 3, padding=1)
        self.branch3x3dbl_3 = Conv(96, 96, 3, stride=2)

    def forward(self, x):
        b3 = self.branch3x3dbl_3(self.branch3x3dbl_2(self.branch3x3dbl_1(x)))
        return torch.cat([self.branch3x3(x), b3, F.max_pool2d(x, 3, 2)], 1)


class InceptionC(nn.Module):  # 17x17, 7x7 convolutions factored into 1x7 and 7x1
    def __init__(self, cin, c7):
        super().__init__()
        self.branch1x1 = Conv(cin, 192, 1)
        self.branch7x7_1, self.branch7x7_2 = Conv(cin, c7, 1), Conv(c7, c7, (1, 7), padding=(0, 3))
        self.branch7x7_3 = Conv(c7, 192, (7, 1), padding=(3, 0))
        self.branch7x7dbl_1, self.branch7x7dbl_2 = Conv(cin, c7, 1), Conv(c7, c7, (7, 1), padding=(3, 0))
        self.branch7x7dbl_3 = Conv(c7, c7, (1, 7), padding=(0, 3))
        self.branch7x7dbl_4 = Conv(c7, c7, (7, 1), padding=(3, 0))
        self.branch7x7dbl_5 = Conv(c7, 192, (1, 7), padding=(0, 3))
        self.branch_pool = Conv(cin, 192, 1)

    def forward(self, x):
        b7 = self.branch7x7_3(self.branch7x7_2(self.branch7x7_1(x)))
        bd = self.branch7x7dbl_3(self.branch7x7dbl_2(self.branch7x7dbl_1(x)))
        bd = self.branch7x7dbl_5(self.branch7x7dbl_4(bd))
        return torch.cat([self.branch1x1(x), b7, bd, self.branch_pool(avg_pool(x))], 1)


class InceptionD(nn.Module):  # 17x17 -> 8x8
    def __init__(self, cin):
        super().__init__()
        self.branch3x3_1, self.branch3x3_2 = Conv(cin, 192, 1), Conv(192, 320, 3, stride=2)
        self.branch7x7x3_1, self.branch7x7x3_2 = Conv(cin, 192, 1), Conv(192, 192, (1, 7), padding=(0, 3))
        self.branch7x7x3_3, self.branch7x7x3_4 = Conv(192, 192, (7, 1), padding=(3, 0)), Conv(192, 192, 3, stride=2)

    def forward(self, x):
        b3 = self.branch3x3_2(self.branch3x3_1(x))
        b7 = self.branch7x7x3_4(self.branch7x7x3_3(self.branch7x7x3_2(self.branch7x7x3_1(x))))
        return torch.cat([b3, b7, F.max_pool2d(x, 3, 2)], 1)


class InceptionE(nn.Module):  # 8x8, 3x3 convolutions split into parallel 1x3 and 3x1
    def __init__(self, cin, max_pool):
        super().__init__()
        self.max_pool = max_pool  # the TF graph max-pools in its last block (pytorch-fid's FIDInceptionE_2)
        self.branch1x1 = Conv(cin, 320, 1)
        self.branch3x3_1 = Conv(cin, 384, 1)
        self.branch3x3_2a = Conv(384, 384, (1, 3), padding=(0, 1))
        self.branch3x3_2b = Conv(384, 384, (3, 1), padding=(1, 0))
        self.branch3x3dbl_1, self.branch3x3dbl_2 = Conv(cin, 448, 1), Conv(448, 384, 3, padding=1)
        self.branch3x3dbl_3a = Conv(384, 384, (1, 3), padding=(0, 1))
        self.branch3x3dbl_3b = Conv(384, 384, (3, 1), padding=(1, 0))
        self.branch_pool = Conv(cin, 192, 1)

    def forward(self, x):
        b3, bd = self.branch3x3_1(x), self.branch3x3dbl_2(self.branch3x3dbl_1(x))
        pool = F.max_pool2d(x, 3, 1, 1) if self.max_pool else avg_pool(x)
        return torch.cat([self.branch1x1(x), self.branch3x3_2a(b3), self.branch3x3_2b(b3),
                          self.branch3x3dbl_3a(bd), self.branch3x3dbl_3b(bd), self.branch_pool(pool)], 1)


class InceptionV3(nn.Module):
    def __init__(self, fc=False):
        super().__init__()
        self.Conv2d_1a_3x3, self.Conv2d_2a_3x3 = Conv(3, 32, 3, stride=2), Conv(32, 32, 3)
        self.Conv2d_2b_3x3, self.Conv2d_3b_1x1 = Conv(32, 64, 3, padding=1), Conv(64, 80, 1)
        self.Conv2d_4a_3x3 = Conv(80, 192, 3)
        self.Mixed_5b, self.Mixed_5c, self.Mixed_5d = InceptionA(192, 32), InceptionA(256, 64), InceptionA(288, 64)
        self.Mixed_6a = InceptionB(288)
        self.Mixed_6b, self.Mixed_6c = InceptionC(768, 128), InceptionC(768, 160)
        self.Mixed_6d, self.Mixed_6e = InceptionC(768, 160), InceptionC(768, 192)
        self.Mixed_7a, self.Mixed_7b, self.Mixed_7c = InceptionD(768), InceptionE(1280, False), InceptionE(2048, True)
        self.fc = nn.Linear(2048, 1008) if fc else None  # the TF graph's 1008 class logits, only for IS

    def forward(self, x):  # (B, 3, 299, 299) from preprocess() -> pool3 features (B, 2048)
        x = F.max_pool2d(self.Conv2d_2b_3x3(self.Conv2d_2a_3x3(self.Conv2d_1a_3x3(x))), 3, 2)
        x = F.max_pool2d(self.Conv2d_4a_3x3(self.Conv2d_3b_1x1(x)), 3, 2)
        for block in (self.Mixed_5b, self.Mixed_5c, self.Mixed_5d, self.Mixed_6a, self.Mixed_6b, self.Mixed_6c,
                      self.Mixed_6d, self.Mixed_6e, self.Mixed_7a, self.Mixed_7b, self.Mixed_7c):
            x = block(x)
        return x.mean((2, 3))


def load_inception(weights=None, device=None):
    """The FID Inception, eval, fp32, on device (default: any GPU); weights: a path, $FID_WEIGHTS or pytorch-fid's."""
    device = device or ('cuda' if torch.cuda.is_available() else 'cpu')
    path = Path(weights or os.environ.get('FID_WEIGHTS') or common.cache_dir() / WEIGHTS_FILE)
    if not (weights or os.environ.get('FID_WEIGHTS') or path.exists()):
        print(f'downloading the FID Inception weights to {path}')
        try:
            common.download(WEIGHTS_URL + WEIGHTS_FILE, path, 'sha256:' + WEIGHTS_SHA256)
        except OSError as e:  # offline, or the release moved
            raise ValueError(f'could not download {WEIGHTS_URL + WEIGHTS_FILE} ({e}); fetch it by hand and give its '
                             f'path to --weights or $FID_WEIGHTS') from None
    if not path.is_file():
        raise ValueError(f'{path}: no such weights file; give --weights (or $FID_WEIGHTS) the path of pytorch-fid\'s '
                         f'{WEIGHTS_FILE}, or leave both unset to download it')
    try:
        sd = torch.load(path, map_location='cpu', weights_only=True)
        model = InceptionV3(fc='fc.weight' in sd)
        missing, unexpected = model.load_state_dict(sd, strict=False)
    except Exception as e:
        raise ValueError(f'{path}: not a readable Inception state dict ({type(e).__name__}: {str(e)[:200]})') from None
    if [k for k in missing if not k.endswith('num_batches_tracked')] or unexpected:
        raise ValueError(f'{path}: not pytorch-fid\'s key layout (missing {missing[:3]}, unexpected {unexpected[:3]})')
    # cached reference statistics are keyed by the weights that made them: a hash of the tensors without fc (the
    # -nofc file and the full one give the same pool3 features, so they share statistics)
    h = hashlib.sha256()
    for k in sorted(k for k in sd if not k.startswith('fc.') and torch.is_tensor(sd[k])):
        h.update(k.encode() + sd[k].contiguous().numpy().tobytes())
    model.weights_id = h.hexdigest()[:12]
    return model.to(device, memory_format=torch.channels_last if torch.device(device).type == 'cuda' else
                    torch.preserve_format).eval()  # NHWC: faster convolutions on the GPU


# -----------------------------------------------------------------------------
# Preprocessing, features and their statistics


@lru_cache
def pil_bicubic(n_out, n_in):
    """PIL's BICUBIC resize (a = -0.5) of one axis as an (n_out, n_in) matrix: the kernel widens on downscaling
    (antialiasing) and, at the borders, the taps that fall outside are dropped and the rest renormalised."""
    scale = n_in / n_out
    stretch = max(scale, 1.0)
    W = np.zeros((n_out, n_in))
    for i in range(n_out):
        center = (i + 0.5) * scale
        lo, hi = max(int(center - 2 * stretch + 0.5), 0), min(int(center + 2 * stretch + 0.5), n_in)
        t = np.abs((np.arange(lo, hi) - center + 0.5) / stretch)
        w = np.where(t < 1, (1.5 * t - 2.5) * t * t + 1, np.where(t < 2, -0.5 * (((t - 5) * t + 8) * t - 4), 0))
        W[i, lo:hi] = w / w.sum()
    return torch.from_numpy(W)


def preprocess(x, mode):
    """uint8 (B, 3, H, W) -> float32 (B, 3, 299, 299) network input, made the way each reference tool makes it."""
    if mode == 'pytorch-fid':  # ToTensor, then the resize and normalize_input of its InceptionV3
        return 2 * F.interpolate(x.float() / 255, size=(299, 299), mode='bilinear', align_corners=False) - 1
    Wh, Ww = pil_bicubic(299, x.shape[2]).to(x.device), pil_bicubic(299, x.shape[3]).to(x.device)
    x = (Wh @ x.double() @ Ww.T).clamp(0, 255).float()  # PIL resizes 'F' images in double, stores float32
    return (x - 128) / 128


@contextlib.contextmanager
def exact_fp32():
    """TF32 off (PyTorch's cuDNN default is on: FID would move), cuDNN autotuning on; the flags restored after."""
    old = torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32, torch.backends.cudnn.benchmark
    torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = False
    torch.backends.cudnn.benchmark = True
    try:
        yield
    finally:
        torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32, torch.backends.cudnn.benchmark = old


@torch.no_grad()
def compute_features(images, mode='pytorch-fid', device=None, model=None, batch_size=200):
    """Pool3 features, float64 (N, 2048), of uint8 images (N, C, H, W) with C in {1, 3} (1 is replicated to RGB)."""
    if mode not in MODES:
        raise ValueError(f'unknown mode {mode!r}: use one of {", ".join(MODES)}')
    if images.dtype != torch.uint8 or images.ndim != 4 or images.shape[1] not in (1, 3):
        raise ValueError(f'expected uint8 images (N, C, H, W) with C 1 or 3, got {images.dtype} {tuple(images.shape)}')
    model = model or load_inception(device=device)
    device, feats = next(model.parameters()).device, []
    with exact_fp32():
        for x in tqdm(images.split(batch_size), 'Inception features', disable=len(images) <= batch_size):
            x = x.to(device, non_blocking=True).expand(-1, 3, -1, -1)  # PIL's convert('RGB') copies L to R, G, B
            x = preprocess(x, mode)
            feats.append(model(x.contiguous(memory_format=torch.channels_last) if x.is_cuda else x).float())
    f = torch.cat(feats).cpu().double().numpy()
    if not np.isfinite(f).all():
        raise ValueError('the Inception features contain NaN/inf: check the weights file')
    return f


def stats_of(features):
    """mu and the unbiased covariance (np.cov's) of float64 features (N, d), on the GPU if there is one (50k x 2048)."""
    f = torch.from_numpy(features).to('cuda' if torch.cuda.is_available() else 'cpu')
    f_centred = f - f.mean(0)
    return f.mean(0).cpu().numpy(), (f_centred.T @ f_centred / (len(f) - 1)).cpu().numpy()


# -----------------------------------------------------------------------------
# Inputs: image folders, .npz files (images or statistics), dataset:split; reference statistics, cached


def read_image(path):
    """uint8 (H, W, 3): grayscale, palette and RGBA become RGB as pytorch-fid and clean-fid do (PIL convert('RGB')),
    and 16-bit grey PNGs are scaled to 8 bits, not saturated as convert() does."""
    try:
        with Image.open(path) as im:
            if im.mode not in ('I;16', 'I;16B', 'I;16L', 'I'):
                return np.asarray(im.convert('RGB'))
            a = np.asarray(im, np.float64)
            a = a / 257 if im.mode.startswith('I;16') or a.max() > 255 else a
            return np.repeat(a.round().clip(0, 255).astype(np.uint8)[..., None], 3, 2)
    except Exception as e:  # PIL raises OSError, SyntaxError, ValueError, ... on broken files
        raise ValueError(f'cannot read image {path} ({type(e).__name__}: {e}): delete or replace it') from None


def read_npz(path, mode=None):
    """A stats file -> (mu, sigma); images (uint8 (N, H, W, C) in arr_0 or a single array) -> uint8 (N, C, H, W).
    Stats files written here record their mode; using one in the other mode is an error, not a wrong number."""
    try:
        with np.load(path) as f:
            arrays = {k: f[k] for k in f.files}
    except Exception as e:
        why = e.strerror if isinstance(e, OSError) and e.strerror else 'not an .npz archive of arrays'  # not numpy's
        raise ValueError(f'cannot read {path}: {why}') from None  # allow_pickle advice: a pickle could run code
    if 'mu' in arrays and 'sigma' in arrays:  # pytorch-fid's keys: its stats files work here and ours there
        made = str(arrays.get('mode', 'pytorch-fid'))  # a file without a mode is pytorch-fid's own: that preprocessing
        if mode and made != mode:
            raise ValueError(f'{path} holds statistics computed in --mode {made}' +
                             (' (no mode key: pytorch-fid\'s own format)' if 'mode' not in arrays else '') +
                             f', not {mode}: recompute them in --mode {mode}, or pass --mode {made}')
        return arrays['mu'], arrays['sigma']
    x = arrays.get('arr_0', next(iter(arrays.values())) if len(arrays) == 1 else None)
    if x is None or x.dtype != np.uint8 or x.ndim != 4 or x.shape[3] not in (1, 3, 4):
        found = ', '.join(f'{k}: {a.dtype} {a.shape}' for k, a in arrays.items()) or 'nothing'
        raise ValueError(f'{path} holds {found}; expected statistics (mu, sigma) or uint8 images (N, H, W, C) in arr_0 '
                         f'(from floats in [0, 1]: np.savez(path, (x * 255).round().astype(np.uint8)))')
    return torch.from_numpy(x[..., :3]).permute(0, 3, 1, 2)  # RGBA: drop alpha, as PIL's convert('RGB') does


def is_dataset(spec):
    return ':' in str(spec) and not os.path.exists(spec)


def image_chunks(spec, chunk=200):
    """Yield uint8 (n, C, H, W) tensors, one image size each, from a folder, an images .npz or a dataset:split."""
    if os.path.isdir(spec):
        files = sorted(p for p in Path(spec).rglob('*') if p.suffix.lower() in IMAGE_EXTS)
        if len(files) < 2:
            raise ValueError(f'{spec}: {len(files)} images ({"/".join(IMAGE_EXTS)}, searched recursively); '
                             f'statistics need at least 2, and a meaningful FID thousands')
        with ThreadPoolExecutor(8) as pool, tqdm(total=len(files), desc=f'features of {spec}', unit='img') as bar:
            ahead = pool.map(read_image, files[:chunk])
            for i in range(0, len(files), chunk):
                imgs = list(ahead)
                ahead = pool.map(read_image, files[i + chunk:i + 2 * chunk])  # decoded while this chunk runs
                for shape in dict.fromkeys(a.shape for a in imgs):  # mixed sizes: each is resized as the mode does
                    yield torch.from_numpy(np.stack([a for a in imgs if a.shape == shape])).permute(0, 3, 1, 2)
                bar.update(len(imgs))
        return
    if str(spec).endswith('.npz'):
        x = read_npz(spec)
        if isinstance(x, tuple):
            raise ValueError(f'{spec} holds statistics (mu, sigma), not images: KID and IS need images')
    elif is_dataset(spec):
        x = common.load_dataset(*str(spec).split(':', 1))[0]
    else:
        raise ValueError(f'{spec}: not a folder, an .npz or a dataset:split ({", ".join(common.DATASETS)}; e.g. '
                         f'cifar10:train)')
    if len(x) < 2:
        raise ValueError(f'{spec}: {len(x)} images; statistics need at least 2')
    yield x


def input_features(spec, mode='pytorch-fid', device=None, model=None, batch_size=200):
    """Pool3 features (N, 2048) of all images of a folder, an images .npz or a dataset:split."""
    model = model or load_inception(device=device)
    return np.concatenate([compute_features(x, mode, model=model, batch_size=batch_size)
                           for x in image_chunks(spec, batch_size)])


def reference_stats(spec, mode='pytorch-fid', device=None, model=None, batch_size=200):
    """(mu, sigma) of any CLI input; a dataset:split's are computed once, in exact fp32, and cached."""
    if str(spec).endswith('.npz') and isinstance(stats := read_npz(spec, mode), tuple):
        return stats
    if not is_dataset(spec):
        return stats_of(input_features(spec, mode, device, model, batch_size))
    model = model or load_inception(device=device)
    cache = common.cache_dir() / f'fid-stats-{spec.replace(":", "-")}-{mode}-{model.weights_id}.npz'
    if not cache.exists():
        x = next(image_chunks(spec))
        t0 = time.perf_counter()
        compute_features(x[:50], mode, model=model)
        eta = (time.perf_counter() - t0) / 50 * len(x)
        print(f'FID reference: Inception statistics of {spec} ({len(x)} images) on {next(model.parameters()).device}, '
              f'about {eta / 60:.0f} min, computed once and cached in {cache}. A smaller reference (e.g. the test '
              f'split, or a stats .npz) is quicker, but its FIDs are only comparable with each other.', flush=True)
        mu, sigma = stats_of(compute_features(x, mode, model=model, batch_size=batch_size))
        common.atomic_write(cache, lambda f: np.savez(f, mu=mu, sigma=sigma, mode=mode, weights=model.weights_id))
    return read_npz(cache, mode)


class Scorer:
    """FID of uint8 sample batches (N, C, H, W) against one reference, with the Inception loaded once: for FID during
    training. ref: a dataset:split, folder, images or stats .npz; or images=uint8 (N, C, H, W) already in memory (an
    image-folder dataset), whose statistics are computed here and not cached."""

    def __init__(self, ref, device, mode='pytorch-fid', images=None):
        try:
            self.model, self.mode = load_inception(device=device), mode
            self.ref = (stats_of(compute_features(images, mode, model=self.model)) if images is not None else
                        reference_stats(ref, mode, model=self.model))
        except ValueError as e:  # a script's common.script_guard turns this into one error line
            raise common.DataError(f'FID reference {ref if images is None else "(images in memory)"}: {e}') from None

    def __call__(self, x):
        return frechet_distance(*stats_of(compute_features(x, self.mode, model=self.model)), *self.ref)


def run_scorer(ref, dataset, x, device):
    """The Scorer of a training run: ref (--fid-ref: train or test of its dataset, or any reference) if given, else
    the run's training set: a dataset's cached statistics, or an image folder's images x as trained on, from memory."""
    if ref in ('train', 'test') and dataset in common.DATASETS:
        ref = f'{dataset}:{ref}'
    if ref or dataset in common.DATASETS:
        return Scorer(ref or f'{dataset}:train', device)
    return Scorer(None, device, images=x)


# -----------------------------------------------------------------------------
# Command line


def run(args):
    if args.batch_size < 1:
        raise ValueError(f'--batch-size {args.batch_size} must be >= 1')
    if args.save_stats and not Path(args.save_stats).resolve().parent.is_dir():
        raise ValueError(f'--save-stats {args.save_stats}: the folder {Path(args.save_stats).parent} does not exist')
    model = load_inception(args.weights, args.device)
    if len(args.paths) != (1 if args.save_stats else 2):
        raise ValueError('give two inputs to compare, or one input and --save-stats OUT.npz (see --help)')
    if args.inception_score and model.fc is None:
        raise ValueError(f'--is needs the 1008-class fc layer, which these weights lack: use pytorch-fid\'s complete '
                         f'{WEIGHTS_FILE} (--weights or $FID_WEIGHTS, or unset both to download it)')
    kw = dict(mode=args.mode, model=model, batch_size=args.batch_size)
    feats = [input_features(p, **kw) for p in args.paths] if args.kid or args.inception_score or args.pr else None
    stats = [stats_of(f) for f in feats] if feats else [reference_stats(p, **kw) for p in args.paths]
    if args.save_stats:
        np.savez(args.save_stats, mu=stats[0][0], sigma=stats[0][1], mode=args.mode)
        return print(f'wrote {args.save_stats}: mu and sigma of {args.paths[0]}, mode {args.mode}')
    for p, f in zip(args.paths, feats if args.inception_score else [], strict=False):
        logits = f @ model.fc.weight.double().cpu().numpy().T + model.fc.bias.double().cpu().numpy()
        print('IS of %s: %.3f +- %.3f' % (p, *inception_score(logits)))
    if args.kid:
        print(f'KID: {kernel_distance(*feats):.6f}')
    if args.pr:
        print('precision %.4f, recall %.4f (k = 3; the first input is the real set)' % precision_recall(*feats))
    print(f'FID: {frechet_distance(*stats[0], *stats[1]):.6f}')


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument('paths', nargs='*', help='two inputs to compare, or one with --save-stats')
    p.add_argument('--mode', choices=MODES, default='pytorch-fid', help='preprocessing, see above')
    p.add_argument('--weights', help='Inception .pth in pytorch-fid\'s layout (default: $FID_WEIGHTS, else download)')
    p.add_argument('--device', help='default: cuda if there is a GPU, else cpu')
    p.add_argument('--batch-size', type=int, default=200, help='images per Inception forward pass (default: 200)')
    p.add_argument('--save-stats', metavar='OUT.npz', help='write mu and sigma of the one input (pytorch-fid\'s keys)')
    p.add_argument('--kid', action='store_true', help='also KID, on 100 subsets of min(1000, N) images as clean-fid')
    p.add_argument('--pr', action='store_true', help='also improved precision and recall (k = 3), first input real')
    p.add_argument('--is', dest='inception_score', action='store_true', help='also IS (needs weights with fc)')
    args = p.parse_args(argv)
    try:
        run(args)
    except (ValueError, OSError) as e:  # bad input: one line that names the problem and the fix, not a traceback
        common.fail(e)


if __name__ == '__main__':
    main()
