"""DeepLabV3+ on a plain ResNet (Table 2 rows ResNet-50 / ResNet-101; Table 1 runs).

Variants (configs/default.py): depth=50|101 (default 101), loss=bce|bce_dice|bce_lovasz|hybrid
(default bce_dice), modality=nrgb|rgb|nir, demo. Example:
`python -m agrivision_jax.main --config=configs/resnet.py:depth=50 --workdir=workdirs/r50`
"""

import importlib.util
import pathlib

_SPEC = importlib.util.spec_from_file_location(
    'agrivision_configs_default', pathlib.Path(__file__).with_name('default.py'))
default = importlib.util.module_from_spec(_SPEC)
_SPEC.loader.exec_module(default)


def get_config(arg=None):
  """Returns the plain-ResNet DeepLabV3+ config with the variants in `arg` applied."""
  return default.get_config(arg, ibn_mode='none', default_loss='bce_dice')
