"""Tests of the start-up XLA:CPU flags, the host-memory settings and the CPU-run decision."""

import os
import platform
import subprocess
import sys

import pytest

from agrivision_jax import runtime

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def test_flags_keyed_by_jaxlib_release():
  assert runtime.cpu_flags('0.10.2') == runtime.CPU_FLAGS_BY_JAXLIB['0.10.']
  assert runtime.cpu_flags('0.11.0') == ()


def test_user_flags_win_and_others_are_appended(monkeypatch):
  monkeypatch.setattr(runtime.importlib.metadata, 'version', lambda name: '0.10.2')
  env = {'JAX_PLATFORMS': 'cpu',
         'XLA_FLAGS': '--xla_cpu_experimental_ynn_fusion_type=default --foo=1'}
  assert runtime.configure_xla(env) == ()
  assert env['XLA_FLAGS'] == '--xla_cpu_experimental_ynn_fusion_type=default --foo=1'
  env = {'JAX_PLATFORMS': 'cpu', 'XLA_FLAGS': '--foo=1'}
  added = runtime.configure_xla(env)
  assert added == runtime.CPU_FLAGS_BY_JAXLIB['0.10.']
  assert env['XLA_FLAGS'] == '--foo=1 ' + ' '.join(added)
  env = {'JAX_PLATFORMS': 'cpu', 'AGRIVISION_CPU_XLA_FLAGS': '0'}
  assert runtime.configure_xla(env) == () and 'XLA_FLAGS' not in env
  env = {'JAX_PLATFORMS': 'cpu', 'AGRIVISION_CPU_XLA_FLAGS': '1'}
  assert runtime.configure_xla(env) == added and env['XLA_FLAGS'] == ' '.join(added)
  with pytest.raises(ValueError, match='AGRIVISION_CPU_XLA_FLAGS must be 0 or 1'):
    runtime.configure_xla({'JAX_PLATFORMS': 'cpu', 'AGRIVISION_CPU_XLA_FLAGS': 'yes'})


def test_nothing_is_configured_on_an_accelerator_run(monkeypatch):
  monkeypatch.setattr(runtime.importlib.metadata, 'version', lambda name: '0.10.2')
  env = {'JAX_PLATFORMS': 'cuda,cpu'}
  assert runtime.configure_xla(env) == () and 'XLA_FLAGS' not in env
  assert runtime.configure_host_memory(env) is False


def test_cpu_run_decision(monkeypatch):
  # jax.config.jax_platforms (once jax is imported) or JAX_PLATFORMS decides when set ...
  monkeypatch.setattr(runtime, '_jax_platforms_setting', lambda: None)
  assert runtime.is_cpu_run({'JAX_PLATFORMS': 'cpu'})
  assert runtime.is_cpu_run({'JAX_PLATFORMS': ' CPU , cuda'})
  assert not runtime.is_cpu_run({'JAX_PLATFORMS': 'tpu'})
  # ... else whether a GPU / TPU backend is installed.
  monkeypatch.setattr(runtime, 'accelerator_plugins', lambda: ())
  assert runtime.is_cpu_run({})
  monkeypatch.setattr(runtime, 'accelerator_plugins', lambda: ('xla_cuda12',))
  assert not runtime.is_cpu_run({})
  assert runtime.is_cpu_run({'JAX_PLATFORMS': 'cpu'})
  monkeypatch.setattr(runtime, '_jax_platforms_setting', lambda: 'cuda')
  assert not runtime.is_cpu_run({'JAX_PLATFORMS': 'cpu'})


def test_accelerator_packages_are_recognised():
  for name in ('libtpu', 'libtpu-nightly', 'jax-cuda12-plugin', 'jax_cuda13_plugin',
               'jax-rocm7-plugin'):
    assert runtime.ACCELERATOR_PACKAGE.fullmatch(name), name
  for name in ('jax', 'jaxlib', 'jax-cuda12-pjrt', 'flax'):
    assert not runtime.ACCELERATOR_PACKAGE.fullmatch(name), name


# glibc's mallinfo2 (glibc >= 2.33): hblkhd = bytes in mmapped chunks, arena = bytes of the main
# heap. A 64 MiB allocation is above glibc's largest dynamic mmap threshold (32 MiB on 64-bit).
HEAP_OF_A_LARGE_ALLOCATION = """
import ctypes, resource
import numpy as np
from agrivision_jax import runtime
configured = runtime.configure_host_memory()
import jax
class Info(ctypes.Structure):
  _fields_ = [(name, ctypes.c_size_t) for name in (
      'arena', 'ordblks', 'smblks', 'hblks', 'hblkhd', 'usmblks', 'fsmblks', 'uordblks',
      'fordblks', 'keepcost')]
mallinfo2 = ctypes.CDLL(None).mallinfo2
mallinfo2.restype = Info
array = np.ones(1 << 24, np.float32)  # 64 MiB
mmapped_while_alive = mallinfo2().hblkhd
del array
heap_after_free = mallinfo2().arena
before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
for _ in range(5):
  np.ones(1 << 24, np.float32)
faults = resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before
print(configured, jax.config.values['jax_cpu_enable_async_dispatch'], mmapped_while_alive,
      heap_after_free, faults)
"""


def _heap(environ_update: dict[str, str]) -> tuple[str, str, int, int, int]:
  env = dict(os.environ, PYTHONPATH=REPO + os.pathsep + os.environ.get('PYTHONPATH', ''),
             JAX_PLATFORMS='cpu', **environ_update)
  out = subprocess.run([sys.executable, '-c', HEAP_OF_A_LARGE_ALLOCATION], env=env,
                       check=True, capture_output=True, text=True).stdout.split()
  return out[0], out[1], int(out[2]), int(out[3]), int(out[4])


def test_host_memory_is_kept_mapped_between_large_allocations():
  if platform.libc_ver()[0] != 'glibc':
    assert runtime.configure_host_memory({'JAX_PLATFORMS': 'cpu'}) is False
    return
  size = 64 << 20
  default = _heap({'AGRIVISION_CPU_HOST_MEMORY': '0'})
  kept = _heap({'AGRIVISION_CPU_HOST_MEMORY': '1'})
  assert default[:2] == ('False', 'True') and kept[:2] == ('True', 'False'), (default, kept)
  # glibc's default: the 64 MiB array is its own mapping, unmapped (not kept in the heap) on free.
  assert default[2] >= size and default[3] < size, default
  # Configured: the array comes from the heap, which keeps it after the free ...
  assert kept[2] < size and kept[3] >= size, kept
  # ... so the next allocations reuse mapped pages: far fewer page faults (at least 32 per fresh
  # 64 MiB mapping even with 2 MiB transparent huge pages; 16384 with 4 KiB pages).
  assert kept[4] * 4 < default[4], (default, kept)
