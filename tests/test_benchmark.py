"""Smoke test of scripts/benchmark.py's command line (no timing; the benchmark itself is a script)."""
import os
import subprocess
import sys

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _run(*args: str) -> subprocess.CompletedProcess:
  env = {**os.environ, 'JAX_PLATFORMS': 'cpu', 'AGRIVISION_DEFAULT_XLA': '1'}
  return subprocess.run([sys.executable, os.path.join(REPO, 'scripts', 'benchmark.py'), *args],
                        cwd=REPO, env=env, capture_output=True, text=True, timeout=120,
                        check=False)


def test_rejects_bad_arguments_before_any_compute():
  result = _run('--config=configs/ibn_s.py:depth=50,demo', '--steps=0')
  assert result.returncode != 0
  assert '--steps must be >= 1, got 0' in result.stderr
  result = _run('--config=configs/ibn_s.py:demo', '--peer=tensorflow')
  assert result.returncode != 0
  assert 'flag --peer=tensorflow: value should be one of <|torch>' in result.stderr
