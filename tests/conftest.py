import os, sys, tempfile
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))  # the scripts live at the top level
# the real archives and FID weights sit in ../shared/data beside the checkout (CI and development)
os.environ.setdefault('GENMODELS_DATA', str((ROOT.parent / 'shared' / 'data').resolve()))
os.environ.setdefault('GENMODELS_CACHE', tempfile.mkdtemp(prefix='genmodels-cache-'))  # never the user's cache
if not torch.cuda.is_available():  # Triton kernels run under the CPU interpreter; must be set before triton is imported
    os.environ.setdefault('TRITON_INTERPRET', '1')
torch.set_num_threads(1)


def pytest_configure(config):
    config.addinivalue_line('markers', 'slow: long CPU runs, skipped unless -m slow or RUN_SLOW=1')


def pytest_collection_modifyitems(config, items):
    if os.environ.get('RUN_SLOW') == '1' or 'slow' in config.getoption('markexpr', ''):
        return
    for item in items:
        if 'slow' in item.keywords:
            item.add_marker(pytest.mark.skip(reason='slow: run with -m slow or RUN_SLOW=1'))
