"""Builds the `agriculture_vision` TFDS dataset (ArrayRecord) from the downloaded folders.

  python -m agrivision_jax.data.prepare --manual_dir=ROOT --data_dir=OUT --version=2020 \
      [--image_size=512] [--on_bad_example=error|skip] [--num_threads=N]

ROOT holds train/, val/ and test/ as downloaded. Prints a progress line (tiles/s, ETA) per split;
no TensorFlow is needed. Read the result with config.data.source='tfds', data_dir=OUT.
"""
from __future__ import annotations

import argparse
import os
from typing import Sequence

import tensorflow_datasets as tfds

from agrivision_jax.data import layout
from agrivision_jax.data import tfds_builder


def prepare(manual_dir: str, data_dir: str, version: str, image_size: int = 512,
            on_bad_example: str = 'error', num_threads: int | None = None) -> str:
  """Builds agriculture_vision/<version> from manual_dir into data_dir.

  Returns:
    the folder holding the ArrayRecord files.
  """
  layout.class_names(version)
  if not os.path.isdir(manual_dir):
    raise FileNotFoundError(f'--manual_dir {manual_dir} does not exist')
  if on_bad_example not in layout.BAD_EXAMPLE_POLICIES:
    raise ValueError(f'--on_bad_example={on_bad_example!r} is unknown; expected one of '
                     f'{layout.BAD_EXAMPLE_POLICIES}')
  builder = tfds_builder.AgricultureVision(config=version, data_dir=data_dir,
                                           image_size=image_size, on_bad_example=on_bad_example,
                                           num_threads=num_threads)
  tfds.disable_progress_bar()
  builder.download_and_prepare(
      file_format='array_record',
      download_config=tfds.download.DownloadConfig(manual_dir=manual_dir))
  return os.fspath(builder.data_path)


def main(argv: Sequence[str] | None = None) -> None:
  """Command line entry."""
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument('--manual_dir', required=True, help='folder holding train/ val/ test/')
  parser.add_argument('--data_dir', required=True, help='TFDS data_dir to write')
  parser.add_argument('--version', default='2020', choices=sorted(layout.CLASS_NAMES))
  parser.add_argument('--image_size', type=int, default=512)
  parser.add_argument('--on_bad_example', default='error', choices=layout.BAD_EXAMPLE_POLICIES)
  parser.add_argument('--num_threads', type=int, default=None)
  args = parser.parse_args(argv)
  path = prepare(args.manual_dir, args.data_dir, args.version, args.image_size,
                 args.on_bad_example, args.num_threads)
  print(f'agriculture_vision/{args.version} written to {path}')


if __name__ == '__main__':
  main()
