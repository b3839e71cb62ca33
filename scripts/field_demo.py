"""Whole-field inference on a synthetic field: the measurement of docs/field.md.

  python -m agrivision_jax.main --config=configs/ibn_s.py:demo --config.num_train_steps=1 \\
      --workdir=/tmp/field_demo                     # a checkpoint of the demo model
  /usr/bin/time -v python scripts/field_demo.py --config=configs/ibn_s.py:demo \\
      --config.field.overlap=16 --workdir=/tmp/field_demo --field=/tmp/field_4096.tif --size=4096

Writes ``--field`` (when missing) as a size x size 4-band uint8 GeoTIFF (tiled, uncompressed, a
0.5 m UTM grid; smooth patterns plus noise, a nodata border of zeros), one tile row at a time,
then runs ``agrivision_jax.field.run`` on it exactly as ``--mode=field`` does.
"""

import os

from absl import app
from absl import flags
from ml_collections import config_flags

from agrivision_jax import runtime

_CONFIG = config_flags.DEFINE_config_file('config', None, 'Config file, e.g. configs/ibn_s.py:demo.')
_WORKDIR = flags.DEFINE_string('workdir', None, 'Training workdir with a checkpoint.')
_FIELD = flags.DEFINE_string('field', '/tmp/field_4096.tif', 'Synthetic field (made if missing).')
_SIZE = flags.DEFINE_integer('size', 4096, 'Side of the synthetic field in pixels.')
flags.mark_flags_as_required(['config', 'workdir'])
TILE = 256


def write_synthetic_field(path: str, size: int, seed: int = 0) -> None:
  """Writes a size x size x 4 uint8 GeoTIFF tile row by tile row (bounded memory)."""
  import numpy as np  # pylint: disable=g-import-not-at-top
  import tifffile  # pylint: disable=g-import-not-at-top
  rng = np.random.default_rng(seed)

  def tiles():
    for top in range(0, size, TILE):
      y, x = np.mgrid[top:top + TILE, :size]
      rows = 110 + 70 * np.sin(y[..., None] / 91.0 + np.arange(4)) * np.cos(x[..., None] / 57.0)
      rows = np.clip(rows + rng.normal(0, 12, rows.shape), 1, 255).astype(np.uint8)
      rows[:, :size // 20] = 0       # nodata strip on the left
      for left in range(0, size, TILE):
        yield rows[:, left:left + TILE]

  tags = [(33550, 'd', 3, (0.5, 0.5, 0.0), True),
          (33922, 'd', 6, (0.0, 0.0, 0.0, 500000.0, 4500000.0, 0.0), True),
          (34735, 'H', 20, (1, 1, 0, 4, 1024, 0, 1, 1, 1025, 0, 1, 1, 3072, 0, 1, 32615,
                            3076, 0, 1, 9001), True)]
  with tifffile.TiffWriter(path, bigtiff=size * size * 4 > 2**31) as tif:
    tif.write(tiles(), shape=(size, size, 4), dtype=np.uint8, tile=(TILE, TILE),
              photometric='minisblack', planarconfig='contig', extratags=tags, metadata=None)


def main(argv: list[str]) -> None:
  del argv
  import jax  # pylint: disable=g-import-not-at-top (after the XLA flags are set)
  runtime.configure_host_memory()
  from agrivision_jax import field  # pylint: disable=g-import-not-at-top
  if not os.path.exists(_FIELD.value):
    write_synthetic_field(_FIELD.value, _SIZE.value)
  config = _CONFIG.value
  if not config.field.inputs:
    config.field.inputs = _FIELD.value
  result = field.run(config, _WORKDIR.value)
  for summary in result['fields']:
    print(f"{summary['class_map']}: {summary['width']}x{summary['height']} px, "
          f"{summary['windows']} windows, {summary['seconds']:.1f} s, "
          f"{summary['windows_per_second']:.1f} windows/s on {jax.device_count()} device(s)")


if __name__ == '__main__':
  runtime.configure_xla()
  app.run(main)
