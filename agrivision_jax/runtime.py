"""Process start-up settings for CPU runs, which must be in place before the JAX backend starts.

XLA reads ``XLA_FLAGS`` once, when the first backend is created, and aborts on a flag it does not
know. So the XLA:CPU flags below are keyed by the jaxlib release they were measured on, and
applied only there; ``configure_xla`` must run before the first computation (``main.py`` and the
scripts call it first thing). ``configure_host_memory`` sets how the CPU backend's memory is
allocated; it must run before the backend starts too.

Both apply only to a CPU run, which ``is_cpu_run`` decides without starting a backend: from
``JAX_PLATFORMS`` (or ``jax.config.jax_platforms`` once jax is imported) when set, else from
whether a GPU / TPU plugin for jax is installed. Each can be turned off for A/B measurements:
``AGRIVISION_CPU_XLA_FLAGS=0`` and ``AGRIVISION_CPU_HOST_MEMORY=0`` (unset or ``1``: on). What
the settings do to the train step is measured in docs/benchmarks.md.
"""

import ctypes
import importlib.metadata
import importlib.util
import os
import pkgutil
import platform
import re
import sys
from collections.abc import Mapping

# XLA:CPU's default YNNPACK path is slow for weight-gradient and large-dilation convolutions:
# keep YNNPACK for everything but individual convolutions (those go to Eigen).
CPU_FLAGS_BY_JAXLIB = {
    '0.10.': ('--xla_cpu_experimental_ynn_fusion_type=-individual_convolution',),
}
XLA_FLAGS_SWITCH = 'AGRIVISION_CPU_XLA_FLAGS'
HOST_MEMORY_SWITCH = 'AGRIVISION_CPU_HOST_MEMORY'
# Distributions that provide a non-CPU jax backend (besides 'jax_plugins' entry points and
# modules of the 'jax_plugins' namespace package, which jax itself discovers plugins by):
# libtpu, jax-cuda12-plugin, jax-rocm7-plugin, ...
ACCELERATOR_PACKAGE = re.compile(r'libtpu([-_.]nightly)?|jax[-_.](cuda|rocm)\d*[-_.]plugin',
                                 re.IGNORECASE)


def cpu_flags(jaxlib_version: str) -> tuple[str, ...]:
  """Returns the XLA:CPU flags known to help on ``jaxlib_version`` (empty if none are known)."""
  for prefix, flags in CPU_FLAGS_BY_JAXLIB.items():
    if jaxlib_version.startswith(prefix):
      return flags
  return ()


def _switch_on(environ: Mapping[str, str], name: str) -> bool:
  """Reads an on/off environment switch: unset or '1' -> True, '0' -> False."""
  value = environ.get(name, '1')
  if value not in ('0', '1'):
    raise ValueError(f'environment variable {name} must be 0 or 1, got {value!r}')
  return value == '1'


def accelerator_plugins() -> tuple[str, ...]:
  """Names of the installed jax GPU / TPU backends (plugins and libtpu), found without importing
  jax: 'jax_plugins' entry points, modules of the 'jax_plugins' namespace package and the
  distributions matching ``ACCELERATOR_PACKAGE``."""
  found = [entry.name for entry in importlib.metadata.entry_points(group='jax_plugins')]
  if importlib.util.find_spec('jax_plugins') is not None:
    namespace = importlib.import_module('jax_plugins')
    found += [module.name for module in pkgutil.iter_modules(namespace.__path__)]
  found += [dist.metadata['Name'] for dist in importlib.metadata.distributions()
            if ACCELERATOR_PACKAGE.fullmatch(dist.metadata['Name'] or '')]
  return tuple(sorted(set(found)))


def _jax_platforms_setting() -> str | None:
  """``jax.config.jax_platforms`` if jax is already imported (reading it starts no backend)."""
  jax = sys.modules.get('jax')
  return jax.config.jax_platforms if jax is not None else None


def is_cpu_run(environ: Mapping[str, str] | None = None) -> bool:
  """Whether JAX's default backend will be the CPU, decided without starting a backend.

  The first entry of ``jax.config.jax_platforms`` (when jax is already imported) or of
  ``JAX_PLATFORMS`` decides when set (``'cpu'`` -> True; ``'cuda,cpu'`` -> False); otherwise the
  run is a CPU run exactly when no GPU / TPU backend is installed (``accelerator_plugins``). A
  machine with a GPU plugin but no GPU then counts as not a CPU run: set ``JAX_PLATFORMS=cpu``.

  Args:
    environ: the environment to read; ``os.environ`` by default.
  """
  environ = os.environ if environ is None else environ
  platforms = _jax_platforms_setting() or environ.get('JAX_PLATFORMS', '')
  if platforms.strip():
    return platforms.split(',')[0].strip().lower() == 'cpu'
  return not accelerator_plugins()


def configure_xla(environ: dict[str, str] | None = None) -> tuple[str, ...]:
  """On a CPU run, adds the tuned XLA:CPU flags to ``XLA_FLAGS`` unless the user already set them.

  Flags whose name already appears in ``XLA_FLAGS`` are left as the user wrote them. Nothing is
  added on a GPU / TPU run (``is_cpu_run``) or with ``AGRIVISION_CPU_XLA_FLAGS=0``.

  Args:
    environ: the environment to edit; ``os.environ`` by default.

  Returns:
    The flags that were added.
  """
  environ = os.environ if environ is None else environ
  if not _switch_on(environ, XLA_FLAGS_SWITCH) or not is_cpu_run(environ):
    return ()
  current = environ.get('XLA_FLAGS', '')
  present = {token.split('=')[0] for token in current.split()}
  added = tuple(flag for flag in cpu_flags(importlib.metadata.version('jaxlib'))
                if flag.split('=')[0] not in present)
  if added:
    environ['XLA_FLAGS'] = ' '.join([current, *added]).strip()
  return added


# glibc <malloc.h> mallopt parameters.
M_TRIM_THRESHOLD = -1
M_MMAP_MAX = -4
# The most free memory (bytes) kept at the top of the heap; mallopt takes a C int.
TRIM_THRESHOLD = 2**31 - 1


def configure_host_memory(environ: Mapping[str, str] | None = None) -> bool:
  """On a CPU run, keeps the train step's working memory mapped from one step to the next (glibc).

  XLA:CPU mallocs each step's large temporary buffer. By default glibc serves it with a fresh
  mmap and unmaps it after the step, so every step pays a page fault per page and the kernel
  zeroing the pages again. Here malloc never uses mmap (``M_MMAP_MAX=0``) and keeps up to 2 GiB
  of freed heap (``M_TRIM_THRESHOLD``), and single-device CPU computations run inline on the
  calling thread instead of a dispatch thread (``jax_cpu_enable_async_dispatch=False``), so the
  buffer comes from the main heap and is reused (multi-device computations are dispatched
  asynchronously as before). Call it before the JAX backend starts. Nothing is changed on a
  GPU / TPU run (``is_cpu_run``), on a non-glibc C library, or with
  ``AGRIVISION_CPU_HOST_MEMORY=0``.

  Args:
    environ: the environment to read; ``os.environ`` by default.

  Returns:
    Whether the settings were applied.
  """
  environ = os.environ if environ is None else environ
  if (not _switch_on(environ, HOST_MEMORY_SWITCH) or platform.libc_ver()[0] != 'glibc'
      or not is_cpu_run(environ)):
    return False
  mallopt = ctypes.CDLL(None).mallopt
  if mallopt(M_MMAP_MAX, 0) != 1 or mallopt(M_TRIM_THRESHOLD, TRIM_THRESHOLD) != 1:
    raise RuntimeError('glibc mallopt rejected M_MMAP_MAX=0 or M_TRIM_THRESHOLD')
  import jax  # pylint: disable=g-import-not-at-top (after configure_xla has set the flags)
  jax.config.update('jax_cpu_enable_async_dispatch', False)
  return True
