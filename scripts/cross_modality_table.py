"""Table 1 of the paper: a model trained on one modality, tested on both (cross-modality decay).

Takes an RGB-trained and a NIR-trained workdir (e.g. `--config=configs/resnet.py:modality=rgb`
and `:modality=nir`), evaluates each one's latest checkpoint on the split with RGB input and with
NIR input (NIR repeated to 3 channels) using the config saved in the workdir (config.json), and
prints and saves the 2x2 mIoU table with the performance-decay row:

  decay = mIoU on the training modality - mIoU on the other modality (points, and relative %).

Example:
  python scripts/cross_modality_table.py --rgb_workdir=workdirs/r101_rgb \
      --nir_workdir=workdirs/r101_nir --out=table1.md
Writes OUT (Markdown) and OUT with the suffix .json; each evaluation is also appended to the
workdir's metrics.jsonl with its modality (as `--mode=evaluate` does), from which
scripts/paper_tables.py puts the four cells beside the paper's Table 1.
"""

import argparse
import json
import os
import sys

from agrivision_jax import runtime

MODALITIES = ('rgb', 'nir')
NAMES = {'rgb': 'RGB', 'nir': 'NIR'}


def load_workdir_config(workdir: str, trained_on: str):
  """The ConfigDict saved by training in ``workdir/config.json``, checked to be ``trained_on``."""
  import ml_collections  # pylint: disable=g-import-not-at-top
  path = os.path.join(workdir, 'config.json')
  if not os.path.isfile(path):
    raise FileNotFoundError(f'{path}: no config.json; train into {workdir} first')
  with open(path) as f:
    config = ml_collections.ConfigDict(json.load(f))
  if config.data.modality != trained_on:
    raise ValueError(f'{path}: data.modality is {config.data.modality!r}, expected the '
                     f'{trained_on!r}-trained workdir here')
  config.model.multi_grid = tuple(config.model.multi_grid)
  return config


def cross_modality(workdirs: dict[str, str], split: str) -> dict[str, dict[str, float]]:
  """{trained_on: {tested_on: mIoU}} for trained_on, tested_on in ('rgb', 'nir')."""
  from agrivision_jax import train  # pylint: disable=g-import-not-at-top (after XLA flags)
  table = {}
  for trained_on, workdir in workdirs.items():
    config = load_workdir_config(workdir, trained_on)
    table[trained_on] = {}
    for tested_on in MODALITIES:
      config.data.modality = tested_on
      table[trained_on][tested_on] = float(train.evaluate(config, workdir, split)['miou'])
  return table


def decay(table: dict[str, dict[str, float]], trained_on: str) -> tuple[float, float]:
  """(points, relative %) lost when a ``trained_on`` model is tested on the other modality."""
  other = 'nir' if trained_on == 'rgb' else 'rgb'
  same, cross = table[trained_on][trained_on], table[trained_on][other]
  return 100 * (same - cross), 100 * (same - cross) / same if same else float('nan')


def format_table(table: dict[str, dict[str, float]], split: str) -> str:
  """The Markdown table: rows tested on RGB / NIR / decay, columns trained on RGB / NIR."""
  lines = [f'| {split} mIoU (%) | trained on RGB | trained on NIR |', '|---|---:|---:|']
  for tested_on in MODALITIES:
    cells = [f'{100 * table[trained_on][tested_on]:.2f}' for trained_on in MODALITIES]
    lines.append(f'| tested on {NAMES[tested_on]} | ' + ' | '.join(cells) + ' |')
  cells = ['{:.2f} ({:.1f}%)'.format(*decay(table, trained_on)) for trained_on in MODALITIES]
  lines.append('| performance decay | ' + ' | '.join(cells) + ' |')
  return '\n'.join(lines)


def main(argv: list[str]) -> None:
  parser = argparse.ArgumentParser(description=__doc__,
                                   formatter_class=argparse.RawDescriptionHelpFormatter)
  parser.add_argument('--rgb_workdir', required=True, help='workdir trained with modality=rgb')
  parser.add_argument('--nir_workdir', required=True, help='workdir trained with modality=nir')
  parser.add_argument('--split', default='val', choices=('train', 'val'))
  parser.add_argument('--out', required=True, help='Markdown output path (JSON next to it)')
  args = parser.parse_args(argv)
  table = cross_modality({'rgb': args.rgb_workdir, 'nir': args.nir_workdir}, args.split)
  text = format_table(table, args.split)
  print(text)
  os.makedirs(os.path.dirname(os.path.abspath(args.out)), exist_ok=True)
  with open(args.out, 'w') as f:
    f.write(text + '\n')
  record = {'split': args.split, 'workdirs': {'rgb': args.rgb_workdir, 'nir': args.nir_workdir},
            'miou': {f'trained_{t}': {f'tested_{s}': table[t][s] for s in MODALITIES}
                     for t in MODALITIES},
            'decay_points': {f'trained_{t}': decay(table, t)[0] for t in MODALITIES},
            'decay_relative_percent': {f'trained_{t}': decay(table, t)[1] for t in MODALITIES}}
  with open(os.path.splitext(args.out)[0] + '.json', 'w') as f:
    json.dump(record, f, indent=2)
  print(f'wrote {args.out} and {os.path.splitext(args.out)[0]}.json')


if __name__ == '__main__':
  runtime.configure_xla()
  main(sys.argv[1:])
