"""Tests of the start-up XLA flags and huge-page malloc relaunch."""

import os
import platform
import subprocess
import sys

from agrivision_jax import runtime

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def test_flags_keyed_by_jaxlib_release():
  assert runtime.cpu_flags('0.10.2') == runtime.CPU_FLAGS_BY_JAXLIB['0.10.']
  assert runtime.cpu_flags('0.11.0') == ()


def test_user_flags_win_and_others_are_appended(monkeypatch):
  monkeypatch.setattr(runtime.importlib.metadata, 'version', lambda name: '0.10.2')
  env = {'XLA_FLAGS': '--xla_cpu_experimental_ynn_fusion_type=default --foo=1'}
  assert runtime.configure_xla(env) == ()
  assert env['XLA_FLAGS'] == '--xla_cpu_experimental_ynn_fusion_type=default --foo=1'
  env = {'XLA_FLAGS': '--foo=1'}
  added = runtime.configure_xla(env)
  assert added == runtime.CPU_FLAGS_BY_JAXLIB['0.10.']
  assert env['XLA_FLAGS'] == '--foo=1 ' + ' '.join(added)
  env = {'AGRIVISION_DEFAULT_XLA': '1'}
  assert runtime.configure_xla(env) == () and 'XLA_FLAGS' not in env



FAULTS_OF_REPEATED_ALLOCATIONS = """
import resource, sys
import numpy as np
from agrivision_jax import runtime
configured = runtime.configure_host_memory()
import jax
async_dispatch = jax.config.values['jax_cpu_enable_async_dispatch']
np.ones(1 << 24, np.float32)  # 64 MiB: first use of the heap
before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
for _ in range(5):
  np.ones(1 << 24, np.float32)
print(configured, async_dispatch, resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before)
"""


def _faults(environ_update: dict[str, str]) -> tuple[str, str, int]:
  env = dict(os.environ, PYTHONPATH=REPO + os.pathsep + os.environ.get('PYTHONPATH', ''),
             **environ_update)
  out = subprocess.run([sys.executable, '-c', FAULTS_OF_REPEATED_ALLOCATIONS], env=env,
                       check=True, capture_output=True, text=True).stdout.split()
  return out[0], out[1], int(out[2])


def test_host_memory_is_kept_mapped_between_large_allocations():
  if platform.libc_ver()[0] != 'glibc':
    assert runtime.configure_host_memory({}) is False
    return
  default = _faults({'AGRIVISION_DEFAULT_MALLOC': '1'})
  kept = _faults({'AGRIVISION_DEFAULT_MALLOC': '0'})
  assert default[:2] == ('False', 'True') and kept[:2] == ('True', 'False')
  # 5 x 64 MiB: 16384 4-KiB pages each when every allocation is a fresh mapping (fewer with
  # transparent huge pages); the kept heap reuses the first allocation's pages.
  assert kept[2] < 1000 < default[2] or (default[2] < 1000 and kept[2] <= default[2]), (
      default, kept)
