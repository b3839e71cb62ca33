"""The paper's base set-up (plain ResNet-101 DeepLabV3+, BCE + Dice) with the shared variants.

The row files (``resnet.py``, ``ibn_a.py``, ``ibn_b.py``, ``ibn_s.py``) are the ones to train; the
variants are listed in ``agrivision_jax/configs/common.py``.
"""

from agrivision_jax.configs import common


def get_config(arg=None):
  """Returns the base config with the variants in `arg` applied."""
  return common.get_config(arg)
