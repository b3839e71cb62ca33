"""Submission PNGs and Figure-3-style overlays (RGB | NIR | ground truth | prediction, with legend).

Output paths may be local paths or URLs (gs://...): files are written through ``etils.epath``.
"""

import os
from typing import Sequence

import matplotlib
import numpy as np
from matplotlib import patches
from etils import epath
from matplotlib.figure import Figure
from PIL import Image

# Pixels outside the boundary map or the mask (not scored) are drawn in this colour.
NOT_SCORED_COLOUR = (128, 128, 128)


def class_colours(num_classes: int) -> np.ndarray:
  """Returns (num_classes, 3) uint8 colours: black for background (class 0), then the tab10
  colours without its grey, which marks the pixels that are not scored."""
  palette = [colour for index, colour in enumerate(matplotlib.colormaps['tab10'].colors)
             if index != 7]
  if num_classes - 1 > len(palette):
    raise ValueError(f'config.model.num_classes={num_classes}: at most {len(palette) + 1} classes '
                     'can be coloured')
  colours = [(0.0, 0.0, 0.0)] + palette[:num_classes - 1]
  return np.round(np.asarray(colours) * 255).astype(np.uint8)


def label_index_map(labels: np.ndarray) -> np.ndarray:
  """Turns multi-hot labels (H, W, C) 0/1 into one class index per pixel (H, W) int32 for display:
  the highest-index class that is set (overlaps are rare), 0 where none or only background is."""
  classes = np.arange(labels.shape[-1], dtype=np.int32)
  return np.max(np.where(labels > 0, classes, 0), axis=-1).astype(np.int32)


def colourise(index_map: np.ndarray, num_classes: int,
              valid: np.ndarray | None = None) -> np.ndarray:
  """Colours a class index map (H, W) into (H, W, 3) uint8; pixels with ``valid`` False are grey."""
  rgb = class_colours(num_classes)[index_map]
  if valid is not None:
    rgb = np.where(valid[..., None], rgb, np.asarray(NOT_SCORED_COLOUR, np.uint8))
  return rgb


def save_png(path: str | os.PathLike, image: Image.Image) -> None:
  """Saves ``image`` as a PNG at ``path`` (local or a URL) through ``epath``; the folder must
  exist."""
  with epath.Path(path).open('wb') as f:
    image.save(f, format='PNG')


def write_index_png(path: str | os.PathLike, index_map: np.ndarray) -> None:
  """Writes a class index map (H, W) with values in [0, 255] as a single-channel uint8 PNG (the
  folder must exist)."""
  if index_map.ndim != 2 or index_map.min(initial=0) < 0 or index_map.max(initial=0) > 255:
    raise ValueError(f'{path}: expected a (H, W) map of values in [0, 255], got shape '
                     f'{index_map.shape}')
  save_png(path, Image.fromarray(index_map.astype(np.uint8), mode='L'))


def save_figure(path: str | os.PathLike, figure: Figure) -> None:
  """Saves a matplotlib ``figure`` as a PNG at ``path`` (local or URL), creating its folder."""
  path = epath.Path(path)
  path.parent.mkdir(parents=True, exist_ok=True)
  with path.open('wb') as f:
    figure.savefig(f, format='png')


def save_overlay(path: str | os.PathLike, image: np.ndarray, prediction: np.ndarray,
                 valid: np.ndarray, class_names: Sequence[str], labels: np.ndarray | None = None,
                 title: str = '') -> None:
  """Saves a side-by-side figure: RGB, NIR, ground truth (if ``labels``), prediction, and a legend.

  Args:
    path: output PNG path, local or a URL (its folder is created).
    image: (H, W, 4) uint8 R, G, B, NIR.
    prediction: (H, W) int class indices.
    valid: (H, W) bool; pixels outside the boundary or mask are grey in the label panels.
    class_names: C names, index = class.
    labels: (H, W, C) 0/1 multi-hot ground truth, or None for an unlabelled split.
    title: figure title (e.g. the tile id).
  """
  num_classes = len(class_names)
  panels = [('RGB', image[..., :3]), ('NIR', np.repeat(image[..., 3:], 3, axis=-1))]
  if labels is not None:
    panels.append(('ground truth', colourise(label_index_map(labels), num_classes, valid)))
  panels.append(('prediction', colourise(prediction, num_classes, valid)))
  height, width = prediction.shape
  figure = Figure(figsize=(3 * len(panels), 3 * height / width + 0.8), dpi=100)
  axes = figure.subplots(1, len(panels))
  for axis, (name, picture) in zip(axes, panels):
    axis.imshow(picture, interpolation='nearest')
    axis.set_title(name, fontsize=10)
    axis.set_axis_off()
  colours = class_colours(num_classes) / 255.0
  handles = [patches.Patch(facecolor=colours[c], edgecolor='black', label=name)
             for c, name in enumerate(class_names)]
  handles.append(patches.Patch(facecolor=np.asarray(NOT_SCORED_COLOUR) / 255.0, edgecolor='black',
                               label='not scored'))
  figure.legend(handles=handles, loc='lower center', ncol=min(len(handles), 5), fontsize=8,
                frameon=False)
  if title:
    figure.suptitle(title, fontsize=10)
  figure.subplots_adjust(left=0.01, right=0.99, top=0.88, bottom=0.15, wspace=0.04)
  save_figure(path, figure)
