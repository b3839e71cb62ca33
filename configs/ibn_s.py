"""DeepLabV3+ on IBN-Net-s, the paper's model (Table 2 rows IBN-Net50/101-s; final hybrid-loss model).

Variants (agrivision_jax/configs/common.py): depth=20|50|101 (default 101),
loss=bce|bce_dice|bce_lovasz|hybrid (default hybrid),
modality=nrgb|rgb|nir, authors, demo. Example:
`python -m agrivision_jax.main --config=configs/ibn_s.py:depth=50 --workdir=workdirs/ibn50_s`
"""

from agrivision_jax.configs import common


def get_config(arg=None):
  """Returns the config of this row with the variants in `arg` applied."""
  return common.get_config(arg, ibn_mode='s', default_loss='hybrid')
