"""Feature divergence between RGB and NIR inputs, layer by layer (the paper's Figure 2).

For every captured layer (stem and each bottleneck, post-ReLU, eval mode) and every image, the
spatial mean of each channel is taken (optionally over valid pixels only). Across images, each
channel's per-image means are fitted with a Gaussian, once for modality A (RGB) and once for
modality B (NIR repeated). The divergence of a layer is the mean over its channels of the symmetric
KL divergence between the two Gaussians:
  KL(A||B) + KL(B||A),  KL(A||B) = log(s_B/s_A) + (s_A^2 + (m_A - m_B)^2) / (2 s_B^2) - 1/2.
The Gaussian fit streams: per-channel count, mean and sum of squared deviations are merged batch by
batch in float64 on the host (Chan et al.'s pairwise update), so no feature is kept in memory and
the result does not depend on the batch size.
"""

import dataclasses
import json
import os
import time
from typing import Any, Iterable, Mapping, Sequence

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
from absl import logging
from matplotlib.figure import Figure

PAIRINGS = ('replicate', 'zero')


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
      raise ValueError(f'a Gaussian fit needs at least 2 images, got {self.count} '
                       '(config.divergence.num_images / the split size)')
    return self.m2 / (self.count - 1)


def layer_divergence(stats_a: ChannelStats, stats_b: ChannelStats,
                     var_eps: float) -> tuple[float, int]:
  """Mean over channels of the symmetric KL between the A and B fits of one layer.

  Args:
    stats_a, stats_b: per-channel fits of the same layer under inputs A and B.
    var_eps: added to every variance; a channel that is constant over the images (e.g. a ReLU
      output that is 0 on every image) would otherwise give 0/0.

  Returns:
    (divergence, number of channels whose variance is below var_eps under A or B).
  """
  var_a, var_b = stats_a.variance(), stats_b.variance()
  kl = symmetric_kl(stats_a.mean, var_a + var_eps, stats_b.mean, var_b + var_eps)
  degenerate = int(np.sum((var_a < var_eps) | (var_b < var_eps)))
  return float(np.mean(kl)), degenerate


def downsample_valid(valid: jax.Array, size: tuple[int, int]) -> jax.Array:
  """Fraction-of-valid weights of a feature map: valid (B, H, W) bool -> (B, h, w) float32 in [0, 1]
  (antialiased linear resize, so every input pixel contributes to some output pixel)."""
  batch = valid.shape[0]
  return jax.image.resize(valid.astype(jnp.float32), (batch, *size), method='linear',
                          antialias=True)


def spatial_channel_means(features: jax.Array, valid: jax.Array | None = None) -> jax.Array:
  """Per-image, per-channel spatial mean of features (B, h, w, C) -> (B, C) float32.

  With ``valid`` (B, H, W) bool at the input resolution, the mean is weighted by the fraction of
  valid input pixels under each feature pixel (``downsample_valid``); an image without any valid
  pixel gets NaN (callers drop it).
  """
  features = features.astype(jnp.float32)
  if valid is None:
    return jnp.mean(features, axis=(1, 2))
  weights = downsample_valid(valid, features.shape[1:3])[..., None]
  return jnp.sum(features * weights, axis=(1, 2)) / jnp.sum(weights, axis=(1, 2))


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


def plot_divergence(runs: Sequence[tuple[str, Sequence[Mapping[str, Any]]]], path: str,
                    title: str = 'RGB vs NIR feature divergence') -> None:
  """Saves a Figure-2-style plot: divergence against layer index, one line per run.

  Args:
    runs: (label, layers) pairs; layers as in divergence.json: dicts with 'index', 'name',
      'divergence'.
    path: output image path (PNG).
    title: the plot title.
  """
  figure = Figure(figsize=(9, 4.2), dpi=120)
  axis = figure.subplots()
  for label, layers in runs:
    axis.plot([layer['index'] for layer in layers], [layer['divergence'] for layer in layers],
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
  os.makedirs(os.path.dirname(path) or '.', exist_ok=True)
  figure.savefig(path)
