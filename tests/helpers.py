"""Helpers shared by the test files (pytest puts tests/ on sys.path)."""
import os, signal, subprocess, sys, time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]


def sigterm_run(script, args, out, at='step 3 ', delay=0.0, wait=60):
    """Run `python <script> <args>`, send SIGTERM `delay` s after out/log.txt shows `at`, check that it exits with 130
    within `wait` s, and return the step of the checkpoint it saved. The child is killed however the test ends, so a
    run that ignores the signal cannot outlive it."""
    env = dict(os.environ, PYTHONUNBUFFERED='1', OMP_NUM_THREADS='1')
    p = subprocess.Popen([sys.executable, str(ROOT / script), *map(str, args)], env=env, stdout=subprocess.PIPE,
                         stderr=subprocess.STDOUT, text=True)
    log = Path(out) / 'log.txt'
    try:
        deadline = time.time() + 120
        while not log.exists() or at not in log.read_text():
            assert p.poll() is None and time.time() < deadline, p.stdout.read()
            time.sleep(0.2)
        time.sleep(delay)
        p.send_signal(signal.SIGTERM)
        assert p.wait(wait) == 130
    finally:
        p.kill()
    return torch.load(Path(out) / 'ckpt.pt', weights_only=True)['step']


def ctrl_c_on_call(fn, n):
    """fn, sending this process a SIGINT (Ctrl-C) when it is called for the n-th time: a step interrupted midway."""
    calls = []

    def wrapped(*args):
        calls.append(1)
        if len(calls) == n:
            signal.raise_signal(signal.SIGINT)
        return fn(*args)
    return wrapped
