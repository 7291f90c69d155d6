"""The command line runs numpy's BLAS on one thread unless the user chose (robaudit/cli/__init__.py).

Checked in fresh interpreters with threadpoolctl (a test dependency), which reads the thread
count from the loaded BLAS library itself, not from the environment.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest

PROBE = (
    "import json, robaudit.cli, numpy\n"
    "from threadpoolctl import threadpool_info\n"
    "print(json.dumps([p['num_threads'] for p in threadpool_info() if p['user_api'] == 'blas']))\n"
)


def _blas_threads(**env: str) -> list[int]:
    clean = {k: v for k, v in os.environ.items() if k not in ("OPENBLAS_NUM_THREADS", "MKL_NUM_THREADS")}
    proc = subprocess.run([sys.executable, "-c", PROBE], capture_output=True, text=True, env={**clean, **env})
    assert proc.returncode == 0, proc.stderr
    return json.loads(proc.stdout)


def test_one_blas_thread_by_default() -> None:
    threads = _blas_threads()
    assert threads and all(n == 1 for n in threads)


@pytest.mark.skipif((os.cpu_count() or 1) < 2, reason="needs two cores to tell the settings apart")
def test_the_users_setting_wins() -> None:
    assert all(n == 2 for n in _blas_threads(OPENBLAS_NUM_THREADS="2"))
