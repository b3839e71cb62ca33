"""Process start-up settings that must be in place before the JAX backend starts.

XLA reads ``XLA_FLAGS`` once, when the first backend is created, and aborts on a flag it does not
know. So the flags below are keyed by the jaxlib release they were measured on, and applied only
there; ``configure_xla`` must run before the first computation (``main.py`` and the scripts call it
first thing).
"""

import importlib.metadata
import os

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
