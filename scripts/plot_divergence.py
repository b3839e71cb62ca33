"""Overlays several divergence.json runs in one Figure-2-style plot with a legend.

Example (ResNet-101 vs IBN-Net101-a vs IBN-Net101-s):
  python scripts/plot_divergence.py workdirs/r101 workdirs/ibn101_a workdirs/ibn101_s \
      --labels=ResNet-101,IBN-Net101-a,IBN-Net101-s --out=divergence_r101.png
Each argument is a divergence.json file or a workdir holding one; runs and --out may be local
paths or URLs (gs://...), read and written through etils.epath.
"""

import argparse
import json
import os
import sys

from etils import epath

from agrivision_jax import divergence


def load_run(path: str) -> dict:
  """Reads divergence.json from ``path`` (the file, or a workdir containing it; local or a URL)."""
  file = epath.Path(path)
  if file.is_dir():
    file = file / 'divergence.json'
  if not file.is_file():
    raise FileNotFoundError(f'{file}: no such divergence.json (run --mode=divergence first)')
  run = json.loads(file.read_text())
  if 'layers' not in run or 'settings' not in run:
    raise ValueError(f'{file}: not a divergence.json (needs "layers" and "settings")')
  return run


def default_label(run: dict, path: str) -> str:
  """'<arch> ibn=<mode>[ per batch] (<workdir name>)' from a run's settings."""
  settings = run['settings']
  name = os.path.basename(os.path.normpath(os.path.dirname(path) if path.endswith('.json')
                                           else path))
  pooling = ' per batch' if settings.get('pooling') == 'batch' else ''
  return f"{settings['arch']} ibn={settings['ibn_mode']}{pooling} ({name})"


def describe(values: list[float | None]) -> str:
  """'N layers, mean divergence M, last layer L' over the layers with a divergence (None: a
  layer whose plain formula is infinite, var_floor=0)."""
  defined = [value for value in values if value is not None]
  mean = f'{sum(defined) / len(defined):.4f}' if defined else 'null'
  last = 'null' if values[-1] is None else f'{values[-1]:.4f}'
  return (f'{len(values)} layers ({len(values) - len(defined)} null), mean divergence {mean}, '
          f'last layer {last}')


def main(argv: list[str]) -> None:
  parser = argparse.ArgumentParser(description=__doc__,
                                   formatter_class=argparse.RawDescriptionHelpFormatter)
  parser.add_argument('runs', nargs='+', help='divergence.json files or workdirs')
  parser.add_argument('--labels', default='', help='comma-separated legend labels, one per run')
  parser.add_argument('--out', required=True, help='output PNG path (local or a URL)')
  parser.add_argument('--title', default='RGB vs NIR feature divergence')
  args = parser.parse_args(argv)
  runs = [load_run(path) for path in args.runs]
  labels = args.labels.split(',') if args.labels else [
      default_label(run, path) for run, path in zip(runs, args.runs)]
  if len(labels) != len(runs):
    raise ValueError(f'--labels has {len(labels)} labels for {len(runs)} runs')
  divergence.plot_divergence([(label, run['layers']) for label, run in zip(labels, runs)],
                             args.out, title=args.title)
  for label, run in zip(labels, runs):
    print(f"{label}: {describe([layer['divergence'] for layer in run['layers']])}")
  print(f'wrote {args.out}')


if __name__ == '__main__':
  main(sys.argv[1:])
