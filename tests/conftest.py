"""Test-session set-up: 8 virtual CPU devices, float32 matmuls, absl flags parsed."""
import jax
from absl import flags

# Must run before the JAX backend starts: multi-device tests shard over 8 CPU devices.
jax.config.update('jax_num_cpu_devices', 8)
jax.config.update('jax_default_matmul_precision', 'highest')
# grain worker processes and absl-logging code expect parsed flags.
flags.FLAGS.mark_as_parsed()
