"""Feature divergence between RGB and NIR inputs, layer by layer (the paper's Figure 2).

For every captured layer (stem and each bottleneck, post-ReLU, eval mode) each channel is pooled
into samples (optionally over valid pixels only), with ``pooling``:
  'image': one sample per image, the image's spatial mean (independent of the batch size);
  'batch': one sample per batch, the mean over all of the batch's images and pixels: the authors'
    get_feature_distribution.py (``feat.mean(dim=[0, 2, 3])`` per batch, then the mean and
    ``var`` over the batches), which depends on the batch size (theirs: each GPU's batch).
Each channel's samples are fitted with a Gaussian, once for modality A (RGB) and once for modality
B (NIR repeated). The divergence of a layer is the mean over its channels of the symmetric KL
divergence between the two Gaussians:
  KL(A||B) + KL(B||A),  KL(A||B) = log(s_B/s_A) + (s_A^2 + (m_A - m_B)^2) / (2 s_B^2) - 1/2.
The Gaussian fit streams: per-channel count, mean and sum of squared deviations are merged batch by
batch in float64 on the host (Chan et al.'s pairwise update), so no feature is kept in memory.
"""

import dataclasses
import functools
import io
import json
import os
from typing import Any, Callable, Iterable, Mapping, Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
from absl import logging
from jax.sharding import NamedSharding
from jax.sharding import PartitionSpec as P
from matplotlib.figure import Figure

from agrivision_jax import configuration
from agrivision_jax import data as data_lib
from agrivision_jax import experiment
from agrivision_jax import models
from agrivision_jax import overlay
from agrivision_jax import workdir as workdir_lib
from agrivision_jax.progress import Progress

PAIRINGS = ('replicate', 'zero')
POOLINGS = ('image', 'batch')
# Input channels of A and B, by (model in_channels, pairing), for the record in divergence.json.
PAIRING_CHANNELS = {
    (3, 'replicate'): ('R,G,B', 'N,N,N'), (3, 'zero'): ('R,G,B', 'N,N,N'),
    (4, 'replicate'): ('R,G,B,R', 'N,N,N,N'), (4, 'zero'): ('R,G,B,0', 'N,N,N,0'),
}


def gaussian_kl(mean_p: np.ndarray, var_p: np.ndarray, mean_q: np.ndarray,
                var_q: np.ndarray) -> np.ndarray:
  """KL(P||Q) of 1-D Gaussians P = N(mean_p, var_p), Q = N(mean_q, var_q), elementwise (float64).

  KL(P||Q) = log(s_q/s_p) + (s_p^2 + (m_p - m_q)^2) / (2 s_q^2) - 1/2, with s = sqrt(var).
  """
  mean_p, var_p, mean_q, var_q = (np.asarray(a, np.float64) for a in (mean_p, var_p, mean_q, var_q))
  return 0.5 * np.log(var_q / var_p) + (var_p + (mean_p - mean_q) ** 2) / (2.0 * var_q) - 0.5


def symmetric_kl(mean_a: np.ndarray, var_a: np.ndarray, mean_b: np.ndarray,
                 var_b: np.ndarray) -> np.ndarray:
  """KL(A||B) + KL(B||A) of 1-D Gaussians, elementwise (float64); arrays of any common shape."""
  return gaussian_kl(mean_a, var_a, mean_b, var_b) + gaussian_kl(mean_b, var_b, mean_a, var_a)


@dataclasses.dataclass
class ChannelStats:
  """Streaming per-channel Gaussian fit: count, mean (C,) and sum of squared deviations (C,), float64.

  ``update`` adds a batch of samples; ``merge`` combines two partial fits exactly (up to rounding),
  so the result does not depend on how the samples were batched.
  """
  count: int
  mean: np.ndarray
  m2: np.ndarray

  @classmethod
  def empty(cls, num_channels: int) -> 'ChannelStats':
    """No samples yet, for ``num_channels`` channels."""
    return cls(0, np.zeros(num_channels, np.float64), np.zeros(num_channels, np.float64))

  @classmethod
  def from_samples(cls, samples: np.ndarray) -> 'ChannelStats':
    """Fit of samples (N, C) computed directly (two-pass, float64)."""
    samples = np.asarray(samples, np.float64)
    mean = samples.mean(axis=0) if len(samples) else np.zeros(samples.shape[1])
    return cls(len(samples), mean, ((samples - mean) ** 2).sum(axis=0))

  def merge(self, other: 'ChannelStats') -> 'ChannelStats':
    """Returns the fit of the union of both sample sets (Chan, Golub and LeVeque's pairwise rule)."""
    count = self.count + other.count
    if count == 0:
      return ChannelStats(0, self.mean.copy(), self.m2.copy())
    delta = other.mean - self.mean
    mean = self.mean + delta * (other.count / count)
    m2 = self.m2 + other.m2 + delta ** 2 * (self.count * other.count / count)
    return ChannelStats(count, mean, m2)

  def update(self, samples: np.ndarray) -> 'ChannelStats':
    """Returns the fit with samples (N, C) added."""
    return self.merge(ChannelStats.from_samples(samples))

  def variance(self) -> np.ndarray:
    """Unbiased per-channel variance (C,) (ddof=1, as torch.var in the authors' statistics dump)."""
    if self.count < 2:
      raise ValueError(f'a Gaussian fit needs at least 2 samples (images, or batches with '
                       f'pooling=batch), got {self.count} (config.divergence.num_images, '
                       'batch_size / the split size)')
    return self.m2 / (self.count - 1)


def layer_divergence(stats_a: ChannelStats, stats_b: ChannelStats,
                     var_floor: float) -> tuple[float | None, int]:
  """Mean over channels of the symmetric KL between the A and B fits of one layer.

  A channel that is (nearly) constant over the samples under one input, such as a ReLU output
  that is 0 on every RGB image but not on the NIR ones, has a KL that grows without bound as its
  variance goes to 0, so one such channel would swamp the layer's mean. Every variance therefore
  gets a floor added: ``var_floor`` times the layer's mean variance (over channels and both
  inputs). The floor scales with the layer, so the divergence stays invariant to rescaling a
  layer's activations, as the KL itself is; identical fits still give exactly 0.

  ``var_floor=0`` is exactly the paper's formula: no floor, the plain mean of the channels'
  symmetric KL. The formula is infinite (or undefined) when a channel's variance is 0 under A or
  B; the layer's divergence is then None (JSON has no infinity), and those channels are counted.

  Args:
    stats_a, stats_b: per-channel fits of the same layer under inputs A and B.
    var_floor: the floor relative to the layer's mean variance (0: the plain formula).

  Returns:
    (divergence, or None when a floored variance is 0; number of channels whose variance under
     A or B is at or below the floor).
  """
  var_a, var_b = stats_a.variance(), stats_b.variance()
  floor = var_floor * float(np.mean(var_a + var_b)) / 2
  below = int(np.sum((var_a <= floor) | (var_b <= floor)))
  if not np.all((var_a + floor > 0) & (var_b + floor > 0)):
    return None, below
  kl = symmetric_kl(stats_a.mean, var_a + floor, stats_b.mean, var_b + floor)
  return float(np.mean(kl)), below


def area_matrix(out_size: int, in_size: int) -> np.ndarray:
  """(out_size, in_size) float32: row i holds the fraction of output cell i's extent
  [i * in/out, (i + 1) * in/out) that each input pixel [y, y + 1) covers (rows sum to 1)."""
  scale = in_size / out_size
  low = np.arange(out_size)[:, None] * scale
  pixel = np.arange(in_size)[None, :]
  overlap = np.minimum(low + scale, pixel + 1) - np.maximum(low, pixel)
  return (np.maximum(overlap, 0) / scale).astype(np.float32)


def downsample_valid(valid: jax.Array, size: tuple[int, int]) -> jax.Array:
  """Fraction of valid input area under each feature pixel: valid (B, H, W) bool -> (B, h, w)
  float32 in [0, 1]; feature pixel (i, j) covers the input cell [i H/h, (i+1) H/h) x
  [j W/w, (j+1) W/w) (the block of a stride-H/h layer when it divides)."""
  rows = jnp.asarray(area_matrix(size[0], valid.shape[1]))
  cols = jnp.asarray(area_matrix(size[1], valid.shape[2]))
  return jnp.einsum('iy,byx,jx->bij', rows, valid.astype(jnp.float32), cols,
                    precision=jax.lax.Precision.HIGHEST)


def spatial_channel_means(features: jax.Array, valid: jax.Array | None = None) -> jax.Array:
  """Per-image, per-channel spatial mean of features (B, h, w, C) -> (B, C) float32.

  With ``valid`` (B, H, W) bool at the input resolution, the mean is weighted by the fraction of
  valid input area under each feature pixel (``downsample_valid``); an image without any valid
  pixel gets NaN (callers drop it).
  """
  features = features.astype(jnp.float32)
  if valid is None:
    return jnp.mean(features, axis=(1, 2))
  weights = downsample_valid(valid, features.shape[1:3])[..., None]
  return jnp.sum(features * weights, axis=(1, 2)) / jnp.sum(weights, axis=(1, 2))


def pooled_area(valid: jax.Array | None, batch: int, size: tuple[int, int]) -> jax.Array:
  """The area each image's spatial mean covers at a (h, w) feature resolution, in feature pixels:
  (B,) float32, h * w for every image, or with ``valid`` (B, H, W) bool the valid input area
  under the feature map (``downsample_valid`` summed). The weight of an image's mean in a pooled
  batch mean."""
  if valid is None:
    return jnp.full((batch,), float(size[0] * size[1]), jnp.float32)
  return jnp.sum(downsample_valid(valid, size), axis=(1, 2))


def modality_inputs(images: jax.Array, in_channels: int,
                    pairing: str) -> tuple[jax.Array, jax.Array]:
  """Builds the two inputs A (RGB) and B (NIR) from normalised images (B, H, W, 4) R, G, B, NIR.

  in_channels 3: A = (R, G, B), B = (N, N, N), as in the paper.
  in_channels 4, pairing 'replicate': A = (R, G, B, R), B = (N, N, N, N): each input is one
    modality filling every slot, the missing NIR slot of A taking R as the first conv's NIR filter
    was initialised from R (the authors' 'rgbr' and 'nir4' inputs).
  in_channels 4, pairing 'zero': A = (R, G, B, 0), B = (N, N, N, 0): the 3-channel experiment with
    the NIR slot held at the dataset mean (0 after normalisation).

  Returns:
    (A, B), each (B, H, W, in_channels) float32.
  """
  if pairing not in PAIRINGS:
    raise ValueError(f'config.divergence.pairing must be one of {PAIRINGS}, got {pairing!r}')
  if in_channels not in (3, 4):
    raise ValueError(f'config.model.in_channels must be 3 or 4, got {in_channels}')
  rgb, nir = images[..., :3], images[..., 3:4]
  if in_channels == 3:
    return rgb, jnp.repeat(nir, 3, axis=-1)
  if pairing == 'replicate':
    return (jnp.concatenate([rgb, images[..., :1]], axis=-1), jnp.repeat(nir, 4, axis=-1))
  zero = jnp.zeros_like(nir)
  return (jnp.concatenate([rgb, zero], axis=-1),
          jnp.concatenate([jnp.repeat(nir, 3, axis=-1), zero], axis=-1))


def plot_divergence(runs: Sequence[tuple[str, Sequence[Mapping[str, Any]]]],
                    path: str | os.PathLike,
                    title: str = 'RGB vs NIR feature divergence') -> None:
  """Saves a Figure-2-style plot: divergence against layer index, one line per run.

  Args:
    runs: (label, layers) pairs; layers as in divergence.json: dicts with 'index', 'name',
      'divergence' (None: not plotted).
    path: output image path (PNG), local or a URL (gs://...); its folder is created.
    title: the plot title.
  """
  figure = Figure(figsize=(9, 4.2), dpi=120)
  axis = figure.subplots()
  for label, layers in runs:
    axis.plot([layer['index'] for layer in layers],
              [np.nan if layer['divergence'] is None else layer['divergence'] for layer in layers],
              marker='o', markersize=3, linewidth=1.2, label=label)
  names = [layer['name'] for layer in max((layers for _, layers in runs), key=len)]
  # Stage boundaries: a dotted line before the first block of each stage.
  for index, name in enumerate(names):
    if name.endswith('_0'):
      axis.axvline(index - 0.5, color='0.8', linestyle=':', linewidth=0.8)
      axis.text(index - 0.4, 1.0, name.split('_')[0], transform=axis.get_xaxis_transform(),
                va='top', fontsize=7, color='0.4')
  axis.set_xticks(range(len(names)))
  axis.set_xticklabels(names, rotation=90, fontsize=6)
  axis.set_xlabel('layer')
  axis.set_ylabel('symmetric KL divergence (mean over channels)')
  axis.set_title(title)
  axis.grid(axis='y', alpha=0.3)
  if any(label for label, _ in runs):
    axis.legend(fontsize=8)
  figure.tight_layout()
  overlay.save_figure(path, figure)


def channel_means(model: nn.Module, variables: Mapping[str, Any], images: jax.Array,
                  valid: jax.Array, *, pairing: str, valid_only: bool
                  ) -> tuple[dict[str, jax.Array], dict[str, jax.Array], dict[str, jax.Array]]:
  """Per-image channel means of every captured layer under inputs A (RGB) and B (NIR).

  Args:
    model: a module from ``models.create_model``.
    variables: {'params', 'batch_stats'}.
    images: (B, H, W, 4) normalised R, G, B, NIR.
    valid: (B, H, W) bool.
    pairing: how a 4-channel model is fed (``modality_inputs``).
    valid_only: average over valid pixels only.

  Returns:
    (means_a, means_b, areas): means {layer name: (B, C_layer) float32}, ordered as
    ``models.backbone_layer_names``, and {layer name: (B,) float32} the area each mean covers
    (``pooled_area``, the same under A and B). A and B go through the network as one batch of
    2B images (eval mode: every image is normalised independently of the others).
  """
  images_a, images_b = modality_inputs(images, model.in_channels, pairing)
  outputs = models.capture_layer_outputs(
      model, variables, jnp.concatenate([images_a, images_b], axis=0))
  weights = jnp.concatenate([valid, valid], axis=0) if valid_only else None
  batch = images.shape[0]
  means_a, means_b, areas = {}, {}, {}
  for name, features in outputs.items():
    means = spatial_channel_means(features, weights)
    means_a[name], means_b[name] = means[:batch], means[batch:]
    areas[name] = pooled_area(valid if valid_only else None, batch, features.shape[1:3])
  return means_a, means_b, areas


@functools.lru_cache(maxsize=8)
def _statistics_step(model: nn.Module, mesh: jax.sharding.Mesh, pairing: str,
                     valid_only: bool) -> Callable:
  """Jitted (variables, images, valid, real) -> (means_a, means_b, areas, keep (B,) bool),
  replicated; cached so that repeated passes with the same model and shapes compile once."""
  data, replicated = NamedSharding(mesh, P('data')), NamedSharding(mesh, P())

  def step(variables, images, valid, real):
    means_a, means_b, areas = channel_means(model, variables, images, valid, pairing=pairing,
                                            valid_only=valid_only)
    keep = real & jnp.any(valid, axis=(1, 2)) if valid_only else real
    return means_a, means_b, areas, keep

  return jax.jit(step, in_shardings=(replicated, data, data, data), out_shardings=replicated)


def pool_samples(means: np.ndarray, areas: np.ndarray, pooling: str) -> np.ndarray:
  """The Gaussian-fit samples of one batch of one layer.

  Args:
    means: (b, C) the kept images' channel means.
    areas: (b,) the area each mean covers (``pooled_area``).
    pooling: 'image': every image is a sample; 'batch': the batch is one sample, the mean over
      its images' pixels (the means weighted by their areas).

  Returns:
    (b, C) for 'image'; (1, C) float64 for 'batch', or (0, C) when no image (or area) is left.
  """
  if pooling == 'image':
    return means
  total = float(np.sum(areas, dtype=np.float64))
  if not len(means) or total <= 0:
    return np.zeros((0, means.shape[1]))
  return (np.asarray(areas, np.float64) @ np.asarray(means, np.float64) / total)[None]


def accumulate_statistics(model: nn.Module, variables: Mapping[str, Any],
                          batches: Iterable[Mapping[str, np.ndarray]], mesh: jax.sharding.Mesh,
                          *, pairing: str, valid_only: bool, pooling: str = 'image',
                          num_images: int = 0,
                          progress: Callable[[int], None] = lambda count: None
                          ) -> tuple[dict[str, ChannelStats], dict[str, ChannelStats], int]:
  """Streams a split through the network, fitting per-channel Gaussians under inputs A and B.

  Args:
    model, variables: the network and its {'params', 'batch_stats'} (replicated over ``mesh``).
    batches: this process's batches of {'image': (b, H, W, 4) float32 normalised R, G, B, NIR,
      'valid': (b, H, W) bool, 'id': (b,) str ('' = padding)}; b * process_count must be
      divisible by the mesh size.
    mesh: 1-D 'data' mesh over which the global batch is split.
    pairing, valid_only: see ``channel_means``.
    pooling: 'image' | 'batch' (``pool_samples``); a batch is the global batch, its padding
      images (and with ``valid_only`` its images without any valid pixel) left out.
    num_images: stop after this many images (0: all). Padding images, and with ``valid_only``
      images without any valid pixel, are not counted.
    progress: called with the number of images taken from each batch.

  Returns:
    (stats_a, stats_b, images): {layer name: ChannelStats} fitted to the samples, the same on
    every process, and the number of images used.
  """
  data = NamedSharding(mesh, P('data'))
  step = _statistics_step(model, mesh, pairing, valid_only)
  names = models.backbone_layer_names(model.arch)
  stats_a: dict[str, ChannelStats] = {}
  stats_b: dict[str, ChannelStats] = {}
  used = 0
  for batch in batches:
    inputs = [jax.make_array_from_process_local_data(data, np.asarray(x)) for x in (
        batch['image'], batch['valid'], np.asarray(batch['id']) != '')]
    means_a, means_b, areas, keep = jax.device_get(step(variables, *inputs))
    rows = np.flatnonzero(keep)
    if num_images:
      rows = rows[:num_images - used]
    for name in names:  # jit outputs come back with sorted keys: restore the layer order
      for stats, means in ((stats_a, means_a[name]), (stats_b, means_b[name])):
        samples = pool_samples(means[rows], areas[name][rows], pooling)
        stats[name] = stats.get(name, ChannelStats.empty(means.shape[1])).update(samples)
    used += len(rows)
    progress(len(rows))
    if num_images and used >= num_images:
      break
  return stats_a, stats_b, used


def summarize(stats_a: Mapping[str, ChannelStats], stats_b: Mapping[str, ChannelStats],
              var_floor: float) -> list[dict[str, Any]]:
  """Per-layer records [{'index', 'name', 'channels', 'divergence', 'low_variance_channels'}]
  (``layer_divergence``)."""
  layers = []
  for index, name in enumerate(stats_a):
    value, below = layer_divergence(stats_a[name], stats_b[name], var_floor)
    layers.append({'index': index, 'name': name, 'channels': int(stats_a[name].mean.shape[0]),
                   'divergence': value, 'low_variance_channels': below})
  return layers


def run(config: ml_collections.ConfigDict, workdir: str) -> dict[str, Any]:
  """``--mode=divergence``: RGB-vs-NIR divergence of every backbone layer of a workdir's model.

  Loads the workdir's latest checkpoint (else ``config.init_from``; or a fresh initialisation with
  ``config.divergence.random_init``), streams ``config.divergence.split`` through it and writes,
  on process 0, into ``workdir`` (local or a URL such as gs://..., through ``etils.epath``):
  ``divergence.json`` (settings and per-layer name, channels, divergence),
  ``divergence_stats.npz`` (the per-channel fits: '<layer>/mean_a', 'var_a',
  'mean_b', 'var_b', and 'count', the number of samples: images, or batches with
  ``config.divergence.pooling='batch'``) and ``divergence.png`` (divergence against layer index).

  Returns:
    The content of divergence.json: {'settings': {...}, 'layers': [...], 'mean_divergence'}.

  Raises:
    FileNotFoundError: the workdir has no checkpoint and neither init_from nor random_init is set.
    ValueError: a bad config field, named.
  """
  settings = config.divergence
  mesh, model = experiment.setup_inference(config, settings.batch_size,
                                           'config.divergence.batch_size')
  if settings.random_init:
    size = config.data.image_size
    variables = jax.device_put(
        models.init_variables(model, jax.random.key(config.seed),
                              (1, size, size, configuration.in_channels(config))),
        NamedSharding(mesh, P()))
    weights = f'random initialisation (seed {config.seed})'
  else:
    variables = experiment.restore_variables(config, workdir, mesh)
    weights = (f'checkpoint {config.restore!r} of {workdir} (latest: else '
               f'config.init_from={config.init_from!r})')
  data_config = config.data.copy_and_resolve_references()
  data_config.modality = 'nrgb'
  data_config.eval_batch_size = settings.batch_size
  batches = data_lib.create_eval_iterator(data_config, settings.split, jax.process_index(),
                                          jax.process_count())
  total = len(data_lib.create_source(data_config, settings.split))
  if settings.num_images:
    total = min(total, settings.num_images)
  progress = Progress(f'divergence {settings.split}', total)
  stats_a, stats_b, num_images = accumulate_statistics(
      model, variables, batches, mesh, pairing=settings.pairing, valid_only=settings.valid_only,
      pooling=settings.pooling, num_images=settings.num_images, progress=progress.update)
  progress.finish()
  layers = summarize(stats_a, stats_b, settings.var_floor)
  input_a, input_b = PAIRING_CHANNELS[(configuration.in_channels(config), settings.pairing)]
  result = {
      'settings': {
          'split': settings.split, 'num_images': num_images,
          'num_images_requested': settings.num_images, 'pooling': settings.pooling,
          'num_samples': next(iter(stats_a.values())).count, 'valid_only': settings.valid_only,
          'random_init': settings.random_init, 'pairing': settings.pairing,
          'input_a': input_a, 'input_b': input_b, 'var_floor': settings.var_floor,
          'variance': 'unbiased (ddof=1)', 'arch': config.model.arch,
          'ibn_mode': config.model.ibn_mode, 'in_channels': configuration.in_channels(config),
          'width': config.model.width, 'image_size': config.data.image_size,
          'data_dir': config.data.data_dir, 'weights': weights,
      },
      'layers': layers,
      'mean_divergence': float(np.mean(
          [layer['divergence'] for layer in layers if layer['divergence'] is not None])),
  }
  if jax.process_index() == 0:
    _write_outputs(workdir, result, stats_a, stats_b)
  logging.info('divergence of %d layers over %d images (%s pooling): %s', len(layers),
               num_images, settings.pooling,
               ' '.join(f"{layer['name']}={layer['divergence']}" if layer['divergence'] is None
                        else f"{layer['name']}={layer['divergence']:.4f}" for layer in layers))
  return result


def _write_outputs(workdir: str | os.PathLike, result: Mapping[str, Any],
                   stats_a: Mapping[str, ChannelStats],
                   stats_b: Mapping[str, ChannelStats]) -> None:
  """Writes divergence.json, divergence_stats.npz and divergence.png into ``workdir`` (local or a
  URL, through ``etils.epath``)."""
  out = workdir_lib.path(workdir)
  out.mkdir(parents=True, exist_ok=True)
  (out / 'divergence.json').write_text(json.dumps(result, indent=2))
  arrays = {'count': np.asarray(next(iter(stats_a.values())).count)}
  for name in stats_a:
    arrays.update({f'{name}/mean_a': stats_a[name].mean, f'{name}/var_a': stats_a[name].variance(),
                   f'{name}/mean_b': stats_b[name].mean, f'{name}/var_b': stats_b[name].variance()})
  buffer = io.BytesIO()   # zip seeks back when it can; object stores' write streams cannot
  np.savez(buffer, **arrays)
  with (out / 'divergence_stats.npz').open('wb') as f:
    f.write(buffer.getvalue())
  settings = result['settings']
  title = (f"{settings['arch']} ibn={settings['ibn_mode']}: A={settings['input_a']} vs "
           f"B={settings['input_b']}, {settings['split']} ({settings['num_images']} images)")
  plot_divergence([('', result['layers'])], out / 'divergence.png', title=title)
