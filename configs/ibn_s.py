"""DeepLabV3+ on IBN-Net-s, the paper's model (Table 2 rows IBN-Net50/101-s; final hybrid-loss model).

Variants (configs/default.py): depth=50|101 (default 101), loss=bce|bce_dice|bce_lovasz|hybrid
(default hybrid), modality=nrgb|rgb|nir, demo. Example:
`python -m agrivision_jax.main --config=configs/ibn_s.py:depth=50 --workdir=workdirs/ibn50_s`
"""

import importlib.util
import pathlib

_SPEC = importlib.util.spec_from_file_location(
    'agrivision_configs_default', pathlib.Path(__file__).with_name('default.py'))
default = importlib.util.module_from_spec(_SPEC)
_SPEC.loader.exec_module(default)


def get_config(arg=None):
  """Returns the IBN-s DeepLabV3+ config with the variants in `arg` applied."""
  return default.get_config(arg, ibn_mode='s', default_loss='hybrid')
