"""Converts PyTorch weights into a directory that ``--config.init_from=DIR`` loads.

  python scripts/convert_torch_weights.py --config=configs/ibn_s.py:depth=101 \\
      --input=pretrained/resnet101_ibn_a.pth --output=converted/ibn101_s
  python scripts/convert_torch_weights.py --config=configs/ibn_a.py:depth=50 \\
      --input=runs/weight_epoch_40.pth --output=converted/ibn50_a_authors

Inputs: torchvision ResNet and IBN-Net ImageNet state_dicts (backbone only) and the authors'
DeepLabV3+ checkpoints (every variable), as .pth/.pt/.pth.tar (needs torch) or .safetensors (no
torch). The config (and any ``--config.model.x=...`` override) is the model the weights are
converted for; ``agrivision_jax.convert`` documents the accepted files per ibn_mode. The accounting
report is printed and saved as DIR/report.txt and DIR/report.json. On any error nothing is
written.
"""

import sys

from absl import app
from absl import flags
from ml_collections import config_flags

from agrivision_jax import runtime

_CONFIG = config_flags.DEFINE_config_file(
    'config', None, 'Config file of the target model, e.g. configs/ibn_s.py:depth=50.',
    lock_config=True)
_INPUT = flags.DEFINE_string('input', None, '.pth / .pt / .pth.tar / .safetensors file.')
_OUTPUT = flags.DEFINE_string('output', None, 'Directory to write (must not exist, or be empty).')
_OVERWRITE = flags.DEFINE_bool(
    'overwrite', False, 'Replace an earlier conversion in --output (a directory with a '
    'manifest.json).')
flags.mark_flags_as_required(['config', 'input', 'output'])


def main(argv: list[str]) -> None:
  """Converts --input for --config's model into --output and prints the report."""
  if len(argv) > 1:
    raise app.UsageError(f'Unexpected arguments: {argv[1:]}')
  from agrivision_jax import configuration  # pylint: disable=g-import-not-at-top (after XLA flags)
  from agrivision_jax import convert  # pylint: disable=g-import-not-at-top
  try:
    report = convert.convert_file(_INPUT.value, _OUTPUT.value,
                                  configuration.model_spec(_CONFIG.value),
                                  overwrite=_OVERWRITE.value)
  except (ValueError, OSError) as e:
    sys.exit(f'convert_torch_weights: {e}\nNothing was written to {_OUTPUT.value}.')
  print(convert.format_report(report), end='')


if __name__ == '__main__':
  runtime.configure_xla()
  app.run(main)
