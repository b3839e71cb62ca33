"""Our val mIoU beside the paper's, Tables 1-3, for any set of finished workdirs.

  python scripts/paper_tables.py workdirs/*  [--select=best|final] [--out=tables.md]

Each workdir is identified from its config.json (written by training): model.arch,
model.ibn_mode, loss.lambda_dice / loss.lambda_lovasz and data.modality (the training input).
Its figures are the 'val' rows of metrics.jsonl (written by process 0 only; a row with a 'process'
field other than 0 is skipped), grouped by the row's 'modality' (the evaluation input: training
writes the training modality, ``--mode=evaluate`` and scripts/cross_modality_table.py the
modality they evaluated on). ``--select=best`` (default) takes the highest 'miou' (or
'best_miou', where a row has one) of a group, ``--select=final`` the row of the largest step.
Table 1's cross cells usually come from one evaluation of the final checkpoint
(scripts/cross_modality_table.py), so ``--select=final`` compares one checkpoint on both inputs.

  Table 1 (cross-modality): trained on data.modality rgb / nir, evaluated on rgb / nir; any
    model and loss. Paper: RGB->RGB 46.05, RGB->NIR 18.29, NIR->NIR 44.22, NIR->RGB 23.39.
  Table 2 (BCE + Dice, RGB+NIR): (l_dice, l_lovasz) = (1, 0), modality nrgb, per arch and
    ibn_mode none / a / b / s.
  Table 3 (IBN101-a, RGB+NIR): resnet101, ibn_mode a, (l_dice, l_lovasz) in {0, 1}^2.

A workdir may fill a row of two tables (IBN101-a BCE + Dice is in Tables 2 and 3); several
workdirs of one row are all listed. Each line gives ours, the paper's value and ours - paper in
points, and, where the run's set-up differs from the paper's (stem width 64, 512 px tiles, batch
32, 25,000 steps, the real data), what differs. Workdirs that fill no row are listed with the
reason. With ``--out``, the tables are also written there (Markdown) with a .json beside it.
"""
import argparse
import json
import math
import os
import sys
from typing import Any

MODALITY_NAMES = {'rgb': 'RGB', 'nir': 'NIR', 'nrgb': 'RGB+NIR'}
ARCH_NAMES = {'resnet50': '50', 'resnet101': '101'}
IBN_NAMES = {'none': 'ResNet{d}', 'a': 'IBN-Net{d}-a', 'b': 'IBN-Net{d}-b', 's': 'IBN-Net{d}-s',
             'ab': 'IBN-Net{d}-ab'}

# Paper values, val mIoU (%).
TABLE1 = {('rgb', 'rgb'): 46.05, ('rgb', 'nir'): 18.29, ('nir', 'nir'): 44.22,
          ('nir', 'rgb'): 23.39}  # (trained on, tested on)
TABLE2 = {('resnet50', 'none'): 47.16, ('resnet50', 'a'): 50.39, ('resnet50', 'b'): 49.50,
          ('resnet50', 's'): 51.15, ('resnet101', 'none'): 48.72, ('resnet101', 'a'): 50.35,
          ('resnet101', 'b'): 50.29, ('resnet101', 's'): 51.46}
TABLE3 = {(0.0, 0.0): 49.55, (1.0, 0.0): 50.35, (0.0, 1.0): 51.05, (1.0, 1.0): 53.52}
TABLE_TITLES = {
    1: 'Table 1: cross-modality (trained on -> tested on)',
    2: 'Table 2: BCE + Dice, RGB+NIR',
    3: 'Table 3: IBN-Net101-a, RGB+NIR, (l_dice, l_lovasz)',
}
# The paper's set-up: config field -> (value, how a difference is described).
PAPER_SETUP = {
    ('model', 'width'): (64, 'width {}'),
    ('data', 'image_size'): (512, '{} px'),
    ('data', 'batch_size'): (32, 'batch {}'),
    ('num_train_steps',): (25000, '{} steps'),
    ('data', 'source'): (None, '{} data'),  # any real source; 'synthetic' is noted
}


def _field(config: dict, path: tuple[str, ...], file: str) -> Any:
  node = config
  for name in path:
    if not isinstance(node, dict) or name not in node:
      raise ValueError(f'{file}: no {".".join(path)}')
    node = node[name]
  return node


def read_workdir(workdir: str) -> dict[str, Any]:
  """A finished workdir's identity and val results.

  Returns:
    {'workdir', 'arch', 'ibn_mode', 'lambdas' (l_dice, l_lovasz), 'modality', 'setup' (list of
    differences from the paper's set-up), 'val': {evaluated modality: [val rows]}}.
  Raises:
    FileNotFoundError naming a missing config.json / metrics.jsonl; ValueError naming the file
    and line of an unreadable one or a missing field.
  """
  path = os.path.join(workdir, 'config.json')
  if not os.path.isfile(path):
    raise FileNotFoundError(f'{path}: no config.json (not a training workdir)')
  try:
    with open(path) as f:
      config = json.load(f)
  except ValueError as e:
    raise ValueError(f'{path}: not JSON: {e}') from e
  identity = {
      'workdir': workdir,
      'arch': _field(config, ('model', 'arch'), path),
      'ibn_mode': _field(config, ('model', 'ibn_mode'), path),
      'lambdas': (float(_field(config, ('loss', 'lambda_dice'), path)),
                  float(_field(config, ('loss', 'lambda_lovasz'), path))),
      'modality': _field(config, ('data', 'modality'), path),
  }
  setup = []
  for field, (paper, text) in PAPER_SETUP.items():
    try:
      value = _field(config, field, path)
    except ValueError:
      continue
    if (value == 'synthetic') if paper is None else (value != paper):
      setup.append(text.format(value))
  identity['setup'] = setup
  metrics_path = os.path.join(workdir, 'metrics.jsonl')
  if not os.path.isfile(metrics_path):
    raise FileNotFoundError(f'{metrics_path}: no metrics.jsonl')
  val: dict[str, list[dict]] = {}
  with open(metrics_path) as f:
    for number, line in enumerate(f, 1):
      if not line.strip():
        continue
      try:
        row = json.loads(line)
      except ValueError as e:
        raise ValueError(f'{metrics_path}:{number}: not JSON: {e}') from e
      if row.get('split') != 'val' or row.get('process', 0) != 0:
        continue
      if not isinstance(row.get('miou'), (int, float)) or 'step' not in row:
        raise ValueError(f'{metrics_path}:{number}: a val row without a number miou and a step')
      val.setdefault(row.get('modality', identity['modality']), []).append(row)
  identity['val'] = val
  return identity


def select_miou(rows: list[dict], select: str) -> tuple[float, int]:
  """(mIoU in %, step) of a group of val rows: the best, or the final (largest step) row."""
  if select == 'final':
    row = max(rows, key=lambda r: r['step'])  # the last written wins a tie
    return 100.0 * row['miou'], int(row['step'])
  best = max(rows, key=lambda r: max(r['miou'], r.get('best_miou', -math.inf)))
  return 100.0 * max(best['miou'], best.get('best_miou', -math.inf)), int(best['step'])


def model_name(arch: str, ibn_mode: str) -> str:
  """'resnet101', 'a' -> 'IBN-Net101-a'."""
  return IBN_NAMES.get(ibn_mode, ibn_mode).format(d=ARCH_NAMES.get(arch, arch))


def table_entries(run: dict[str, Any], select: str) -> tuple[list[dict], str | None]:
  """The table lines a workdir fills, or the reason it fills none."""
  entries = []
  lambdas = run['lambdas']

  def add(table, key, label, paper, rows):
    miou, step = select_miou(rows, select)
    entries.append({'table': table, 'key': key, 'row': label, 'workdir': run['workdir'],
                    'model': model_name(run['arch'], run['ibn_mode']), 'ours': miou,
                    'step': step, 'paper': paper, 'difference': miou - paper,
                    'setup': run['setup']})

  if run['modality'] in ('rgb', 'nir'):
    for tested_on, rows in sorted(run['val'].items()):
      key = (run['modality'], tested_on)
      if key in TABLE1:
        add(1, list(key), f'{MODALITY_NAMES[key[0]]} -> {MODALITY_NAMES[key[1]]}', TABLE1[key],
            rows)
  rows = run['val'].get('nrgb')
  if run['modality'] == 'nrgb' and rows:
    if lambdas == (1.0, 0.0) and (run['arch'], run['ibn_mode']) in TABLE2:
      add(2, [run['arch'], run['ibn_mode']], model_name(run['arch'], run['ibn_mode']),
          TABLE2[(run['arch'], run['ibn_mode'])], rows)
    if (run['arch'], run['ibn_mode']) == ('resnet101', 'a') and lambdas in TABLE3:
      add(3, list(lambdas), f'({lambdas[0]:g}, {lambdas[1]:g})', TABLE3[lambdas], rows)
  if entries:
    return entries, None
  if not run['val']:
    return [], 'no val rows in metrics.jsonl'
  return [], (f'{model_name(run["arch"], run["ibn_mode"])}, trained on '
              f'{run["modality"]}, (l_dice, l_lovasz) = ({lambdas[0]:g}, {lambdas[1]:g}), '
              f'evaluated on {", ".join(sorted(run["val"]))}: no paper row')


def format_tables(entries: list[dict], unmatched: list[tuple[str, str]], select: str) -> str:
  """The tables as Markdown, one per table with entries, then the unmatched workdirs."""
  lines = []
  for table in (1, 2, 3):
    order = list({1: TABLE1, 2: TABLE2, 3: TABLE3}[table])
    mine = sorted((e for e in entries if e['table'] == table),
                  key=lambda e: (order.index(tuple(e['key'])), e['workdir']))
    if not mine:
      continue
    lines += [f'{TABLE_TITLES[table]}; val mIoU (%), ours = {select}',
              '| row | model | ours | paper | ours - paper | step | workdir | set-up differs |',
              '|---|---|---:|---:|---:|---:|---|---|']
    for e in mine:
      lines.append(f"| {e['row']} | {e['model']} | {e['ours']:.2f} | {e['paper']:.2f} | "
                   f"{e['difference']:+.2f} | {e['step']} | {e['workdir']} | "
                   f"{', '.join(e['setup']) or '-'} |")
    lines.append('')
  if unmatched:
    lines.append('Workdirs in no table:')
    lines += [f'  {workdir}: {reason}' for workdir, reason in unmatched]
  if not lines:
    lines.append('No workdirs given.')
  return '\n'.join(lines).rstrip('\n')


def main(argv: list[str]) -> None:
  parser = argparse.ArgumentParser(description=__doc__,
                                   formatter_class=argparse.RawDescriptionHelpFormatter)
  parser.add_argument('workdirs', nargs='+', help='finished training workdirs')
  parser.add_argument('--select', default='best', choices=('best', 'final'),
                      help="each group's best val mIoU, or that of the last evaluation")
  parser.add_argument('--out', default='', help='also write the Markdown here (.json beside)')
  args = parser.parse_args(argv)
  entries, unmatched = [], []
  try:
    for workdir in args.workdirs:
      found, reason = table_entries(read_workdir(workdir), args.select)
      entries += found
      if reason:
        unmatched.append((workdir, reason))
  except (OSError, ValueError) as e:
    sys.exit(f'paper_tables: {e}')
  text = format_tables(entries, unmatched, args.select)
  print(text)
  if args.out:
    os.makedirs(os.path.dirname(os.path.abspath(args.out)), exist_ok=True)
    with open(args.out, 'w') as f:
      f.write(text + '\n')
    with open(os.path.splitext(args.out)[0] + '.json', 'w') as f:
      json.dump({'select': args.select, 'entries': entries,
                 'unmatched': [{'workdir': w, 'reason': r} for w, r in unmatched]}, f, indent=1)


if __name__ == '__main__':
  main(sys.argv[1:])
