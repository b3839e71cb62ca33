"""Process start-up settings that must be in place before the JAX backend starts.

XLA reads ``XLA_FLAGS`` once, when the first backend is created, and aborts on a flag it does not
know. So the flags below are keyed by the jaxlib release they were measured on, and applied only
there; ``configure_xla`` must run before the first computation (``main.py`` and the scripts call it
first thing).

glibc reads ``GLIBC_TUNABLES`` only when a process starts, so ``relaunch_with_hugepage_malloc``
re-executes the program (same interpreter, same arguments, same PID) with transparent huge pages
enabled for malloc; entry points call it before anything else.
"""

import importlib.metadata
import os
import platform
import sys

# Measured on a 2-core AMD EPYC with jaxlib 0.10.2 (docs/benchmarks.md): XLA:CPU's default YNNPACK
# path is slow for weight-gradient and large-dilation convolutions; keeping YNNPACK for everything
# but individual convolutions (those go to Eigen) takes the DeepLabV3+ IBN-s R50 train step
# (batch 2, 256 px; fastest steps of two loaded runs) from 2.52 s to 1.95 s. Also routing dots away from YNNPACK
# ('-individual_dot') or convolutions to XNNPACK measured slower.
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


# XLA:CPU allocates each step's temporary buffer (about 0.5 GB for the R50 step at batch 2, 256 px)
# with malloc, which glibc serves with a fresh mmap and unmaps after the step: ~135k 4 KiB page
# faults and 0.3-0.5 s of kernel time per step. With glibc.malloc.hugetlb=1 malloc madvises its
# mappings for transparent huge pages (2 MiB), which needs glibc >= 2.35 and the kernel's THP mode
# 'madvise' ('always' already gives them; 'never' refuses). Measured on the 2-core benchmark
# machine: ~700 faults per step and a 10% faster train step (docs/benchmarks.md).
HUGEPAGE_TUNABLE = 'glibc.malloc.hugetlb'
MIN_GLIBC_FOR_HUGETLB = (2, 35)
THP_MODE_FILE = '/sys/kernel/mm/transparent_hugepage/enabled'


def thp_mode(path: str = THP_MODE_FILE) -> str | None:
  """Returns the kernel's transparent-huge-page mode ('always', 'madvise', 'never') or None."""
  try:
    with open(path) as f:
      text = f.read()
  except OSError:
    return None
  start, end = text.find('['), text.find(']')
  return text[start + 1:end] if 0 <= start < end else None


def hugepage_tunables(environ: dict[str, str], libc: tuple[str, str],
                      mode: str | None) -> str | None:
  """The ``GLIBC_TUNABLES`` value to relaunch with, or None when a relaunch would not help.

  Args:
    environ: the process environment. A ``glibc.malloc.hugetlb`` entry already in
      ``GLIBC_TUNABLES`` is the user's choice (``=0`` opts out) and is kept, so no relaunch.
    libc: ``platform.libc_ver()``, e.g. ``('glibc', '2.36')``.
    mode: the kernel's THP mode (``thp_mode()``); only 'madvise' needs the tunable.

  Returns:
    The existing tunables with ``glibc.malloc.hugetlb=1`` appended, or None.
  """
  name, version = libc
  if name != 'glibc' or mode != 'madvise':
    return None
  try:
    if tuple(int(part) for part in version.split('.')[:2]) < MIN_GLIBC_FOR_HUGETLB:
      return None
  except ValueError:
    return None
  current = environ.get('GLIBC_TUNABLES', '')
  if HUGEPAGE_TUNABLE in current:
    return None
  return ':'.join(filter(None, [current, f'{HUGEPAGE_TUNABLE}=1']))


def relaunch_with_hugepage_malloc() -> None:
  """Re-executes this program with ``glibc.malloc.hugetlb=1`` when that helps; else returns.

  Call it first thing in ``__main__`` (before threads or JAX start): on relaunch nothing after the
  call runs in this process image. The relaunched process finds the tunable set and returns.
  """
  tunables = hugepage_tunables(os.environ, platform.libc_ver(), thp_mode())
  if tunables is None or not getattr(sys, 'orig_argv', None):
    return
  os.environ['GLIBC_TUNABLES'] = tunables
  sys.stdout.flush()
  sys.stderr.flush()
  os.execv(sys.executable, [sys.executable, *sys.orig_argv[1:]])
