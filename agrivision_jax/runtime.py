"""Process start-up settings that must be in place before the JAX backend starts.

XLA reads ``XLA_FLAGS`` once, when the first backend is created, and aborts on a flag it does not
know. So the flags below are keyed by the jaxlib release they were measured on, and applied only
there; ``configure_xla`` must run before the first computation (``main.py`` and the scripts call it
first thing).

``configure_host_memory`` sets how the CPU backend's memory is allocated; it must run before the
backend starts too.
"""

import ctypes
import importlib.metadata
import os
import platform

# Measured on a 2-core AMD EPYC with jaxlib 0.10.2 (docs/benchmarks.md): XLA:CPU's default YNNPACK
# path is slow for weight-gradient and large-dilation convolutions; keeping YNNPACK for everything
# but individual convolutions (those go to Eigen) takes the DeepLabV3+ IBN-s R50 train step
# (batch 2, 256 px; fastest steps of two loaded runs) from 2.52 s to 1.95 s. Also routing dots
# away from YNNPACK ('-individual_dot') or convolutions to XNNPACK measured slower.
CPU_FLAGS_BY_JAXLIB = {
    '0.10.': ('--xla_cpu_experimental_ynn_fusion_type=-individual_convolution',),
}


def cpu_flags(jaxlib_version: str) -> tuple[str, ...]:
  """Returns the XLA:CPU flags known to help on ``jaxlib_version`` (empty if none are known)."""
  for prefix, flags in CPU_FLAGS_BY_JAXLIB.items():
    if jaxlib_version.startswith(prefix):
      return flags
  return ()


def configure_xla(environ: dict[str, str] | None = None) -> tuple[str, ...]:
  """Adds the tuned XLA:CPU flags to ``XLA_FLAGS`` unless the user already set them.

  Flags whose name already appears in ``XLA_FLAGS`` are left as the user wrote them. Setting
  ``AGRIVISION_DEFAULT_XLA=1`` disables the tuning (for A/B measurements).

  Args:
    environ: the environment to edit; ``os.environ`` by default.

  Returns:
    The flags that were added.
  """
  environ = os.environ if environ is None else environ
  if environ.get('AGRIVISION_DEFAULT_XLA') == '1':
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


def configure_host_memory(environ: dict[str, str] | None = None) -> bool:
  """Keeps the CPU train step's working memory mapped from one step to the next (glibc only).

  XLA:CPU mallocs each step's temporary buffer (~0.5 GB for the R50 step at batch 2, 256 px).
  By default glibc serves it with a fresh mmap and unmaps it after the step, so every step pays
  ~135k page faults and the kernel zeroing the pages again (0.3-0.5 s of system time per step on
  the 2-core benchmark machine). Here malloc never uses mmap (``M_MMAP_MAX=0``) and keeps up to
  2 GiB of freed heap (``M_TRIM_THRESHOLD``), and single-device CPU computations run inline on the
  calling thread instead of a dispatch thread (``jax_cpu_enable_async_dispatch=False``), so the
  buffer comes from the main heap and is reused (multi-device computations are dispatched
  asynchronously as before). Measured in docs/benchmarks.md. Call it before the JAX backend
  starts; ``AGRIVISION_DEFAULT_MALLOC=1`` disables it (for A/B measurements).

  Args:
    environ: the environment to read; ``os.environ`` by default.

  Returns:
    Whether the settings were applied (False on a non-glibc C library or when disabled).
  """
  environ = os.environ if environ is None else environ
  if environ.get('AGRIVISION_DEFAULT_MALLOC') == '1' or platform.libc_ver()[0] != 'glibc':
    return False
  mallopt = ctypes.CDLL(None).mallopt
  if mallopt(M_MMAP_MAX, 0) != 1 or mallopt(M_TRIM_THRESHOLD, TRIM_THRESHOLD) != 1:
    raise RuntimeError('glibc mallopt rejected M_MMAP_MAX=0 or M_TRIM_THRESHOLD')
  import jax  # pylint: disable=g-import-not-at-top (after configure_xla has set the flags)
  jax.config.update('jax_cpu_enable_async_dispatch', False)
  return True
