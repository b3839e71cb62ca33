"""DeepLabV3+ on a plain ResNet (Table 2 rows ResNet-50 / ResNet-101; Table 1 runs).

Variants (agrivision_jax/configs/common.py): depth=20|50|101 (default 101),
loss=bce|bce_dice|bce_lovasz|hybrid (default bce_dice),
modality=nrgb|rgb|nir, authors, demo. Example:
`python -m agrivision_jax.main --config=configs/resnet.py:depth=50 --workdir=workdirs/r50`
"""

from agrivision_jax.configs import common


def get_config(arg=None):
  """Returns the config of this row with the variants in `arg` applied."""
  return common.get_config(arg, ibn_mode='none', default_loss='bce_dice')
