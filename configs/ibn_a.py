"""DeepLabV3+ on IBN-Net-a (Table 2 rows IBN-Net50/101-a; Table 3 grid on IBN-Net101-a).

Variants (configs/default.py): depth=50|101 (default 101), loss=bce|bce_dice|bce_lovasz|hybrid
(default bce_dice), modality=nrgb|rgb|nir, demo. Example:
`python -m agrivision_jax.main --config=configs/ibn_a.py:depth=50 --workdir=workdirs/ibn50_a`
"""

import importlib.util
import pathlib

_SPEC = importlib.util.spec_from_file_location(
    'agrivision_configs_default', pathlib.Path(__file__).with_name('default.py'))
default = importlib.util.module_from_spec(_SPEC)
_SPEC.loader.exec_module(default)


def get_config(arg=None):
  """Returns the IBN-a DeepLabV3+ config with the variants in `arg` applied."""
  return default.get_config(arg, ibn_mode='a', default_loss='bce_dice')
