"""Bottleneck ResNet-20/50/101 with IBN-a / IBN-b / IBN-s / IBN-ab blocks, dilated DeepLab-style.

Follows the authors' ``model/backbone/resnet.py`` (LAOS-Y/AgriVision):

* stem: 7x7/2 conv, BN (InstanceNorm for ``ibn_mode == 'b'`` only), ReLU, 3x3/2 max pool (pad 1);
* bottleneck: 1x1 conv, ``bn1``, ReLU, 3x3 conv (stride and dilation here), BN, ReLU, 1x1 conv
  (x4), BN, + shortcut (1x1 conv with the block stride + BN on the first block of each stage),
  optional InstanceNorm ``IN`` after the add, ReLU;
* per block ``bn1`` and ``IN`` by ``ibn_mode`` (stages numbered 1-4):

  ========  ===========================================  ==================================
  mode      ``bn1``                                      ``IN`` after the add
  ========  ===========================================  ==================================
  none      BN everywhere                                never
  a         IBN (IN|BN) in stages 1-3                    never
  s         SwitchableNorm in stages 1-3                 never
  b         BN everywhere                                last block of stages 1 and 2
  ab        IBN in stages 1-3                            last block of stages 1 and 2
  ========  ===========================================  ==================================

  Stage 4 is always plain.
* output stride by (stride, dilation) per stage: 32 -> strides (1,2,2,2), dilations (1,1,1,2);
  16 -> (1,2,2,1), (1,1,1,2); 8 -> (1,2,1,1), (1,1,2,4). Stage 4 has 3 blocks whose dilations
  are ``multi_grid[i] * dilation`` (authors' multi-grid unit, default (1,2,4)) or all
  ``dilation`` when ``multi_grid == ()``.

Every conv and the max pool use explicit symmetric padding (PyTorch's), never 'SAME'. Every
convolution is built by the ``conv`` field (a ``ModuleDef``: ``nn.Conv`` or a partial of it with
another ``conv_general_dilated``; see ``models.conv.CONV_MODULES``). Convs are initialised
normal(0, sqrt(2 / (k*k*out_channels))), norms scale 1 and bias 0. Channels are
``width * (1, 2, 4, 8)`` per stage with expansion 4 (``width=64`` is the standard ResNet).
"""
from typing import Any, Callable

import flax.linen as nn
import jax
import jax.numpy as jnp

from agrivision_jax.models import norms
from agrivision_jax.models import pooling

Array = jax.Array
Dtype = Any
ModuleDef = Callable[..., nn.Module]

# Blocks per stage. ResNet-50/101 are the paper's backbones (ImageNet weights published);
# ResNet-20 has one block in stages 1-3 and the 3 multi-grid blocks of stage 4, every kind of
# layer the deeper nets have (strided, dilated, multi-grid, each IBN placement) in 6 blocks
# instead of 16: for fast experiments from scratch, and the test suite's training runs.
ARCH_LAYERS = {'resnet20': (1, 1, 1, 3), 'resnet50': (3, 4, 6, 3), 'resnet101': (3, 4, 23, 3)}
IBN_MODES = ('none', 'a', 'b', 's', 'ab')
EXPANSION = 4
NUM_MULTI_GRID_BLOCKS = 3  # stage 4 always has 3 blocks
# output_stride -> (per-stage strides, per-stage dilations), as the authors' ResNet.
STAGE_STRIDES_DILATIONS = {
    32: ((1, 2, 2, 2), (1, 1, 1, 2)),
    16: ((1, 2, 2, 1), (1, 1, 1, 2)),
    8: ((1, 2, 1, 1), (1, 1, 2, 4)),
}

# normal(0, sqrt(2 / (k * k * out_channels))): fan_out of an HWIO kernel is k*k*out.
backbone_conv_init = nn.initializers.variance_scaling(2.0, 'fan_out', 'normal')


def block_ibn_modes(stage: int, num_blocks: int, ibn_mode: str) -> tuple[str, ...]:
  """Per-block ibn mode of stage ``stage`` (1-4) exactly as the authors' ``_make_layer``.

  Returns a tuple of 'none' | 'a' | 's' | 'b' | 'ab', one per block: 'b' means a plain block with
  an IN after the add; 'ab' an IBN block with an IN after the add.
  """
  if ibn_mode not in IBN_MODES:
    raise ValueError(f'ibn_mode must be one of {IBN_MODES}, got {ibn_mode!r}')
  if stage == 4 or (stage == 3 and ibn_mode == 'b'):
    ibn_mode = 'none'
  elif stage == 3 and ibn_mode == 'ab':
    ibn_mode = 'a'
  if ibn_mode == 'b':
    return ('none',) * (num_blocks - 1) + ('b',)
  if ibn_mode == 'ab':
    return ('a',) * (num_blocks - 1) + ('ab',)
  return (ibn_mode,) * num_blocks


def block_dilations(stage: int, num_blocks: int, output_stride: int,
                    multi_grid: tuple[int, ...]) -> tuple[int, ...]:
  """Per-block dilations of stage ``stage`` (1-4): the stage dilation of the output stride, times
  ``multi_grid`` in stage 4 (``()`` = no multi-grid)."""
  dilation = STAGE_STRIDES_DILATIONS[output_stride][1][stage - 1]
  if stage == 4 and multi_grid:
    return tuple(g * dilation for g in multi_grid)
  return (dilation,) * num_blocks


def _conv(conv: ModuleDef, features: int, kernel: int, stride: int, dilation: int, name: str,
          dtype: Dtype) -> nn.Module:
  """Bias-free backbone conv with PyTorch's symmetric padding ``dilation * (kernel - 1) // 2``."""
  pad = dilation * (kernel - 1) // 2
  return conv(features, (kernel, kernel), strides=(stride, stride),
              padding=((pad, pad), (pad, pad)), kernel_dilation=(dilation, dilation),
              use_bias=False, dtype=dtype, param_dtype=jnp.float32,
              kernel_init=backbone_conv_init, name=name)


def _bn1(mode: str, dtype: Dtype, sn_group_size: int) -> nn.Module:
  """The norm after a bottleneck's conv1 for a per-block mode (see ``block_ibn_modes``)."""
  if mode in ('a', 'ab'):
    return norms.IBN(dtype=dtype, name='bn1')
  if mode == 's':
    return norms.SwitchableNorm(group_size=sn_group_size, dtype=dtype, name='bn1')
  return norms.BatchNorm(dtype=dtype, name='bn1')


class Bottleneck(nn.Module):
  """ResNet bottleneck (expansion 4) with the IBN variants of the authors' code.

  Submodules: conv1, bn1, conv2, bn2, conv3, bn3, [downsample_0 (conv), downsample_1 (BN)],
  [IN]. ``ibn_mode`` is the per-block mode of ``block_ibn_modes``; ``sn_group_size`` the
  SwitchableNorm statistics group (0 = whole batch); ``conv`` builds the convolutions. Sows its
  output as 'output' into 'intermediates' when that collection is mutable.
  """
  planes: int
  stride: int = 1
  dilation: int = 1
  downsample: bool = False
  ibn_mode: str = 'none'
  sn_group_size: int = 0
  conv: ModuleDef = nn.Conv
  dtype: Dtype = jnp.float32

  @nn.compact
  def __call__(self, x: Array, train: bool) -> Array:
    """x (B,H,W,Cin) -> post-ReLU (B,H/stride,W/stride,4*planes) in ``dtype``."""
    out = _conv(self.conv, self.planes, 1, 1, 1, 'conv1', self.dtype)(x)
    out = nn.relu(_bn1(self.ibn_mode, self.dtype, self.sn_group_size)(out, train))
    out = _conv(self.conv, self.planes, 3, self.stride, self.dilation, 'conv2', self.dtype)(out)
    out = nn.relu(norms.BatchNorm(dtype=self.dtype, name='bn2')(out, train))
    out = _conv(self.conv, self.planes * EXPANSION, 1, 1, 1, 'conv3', self.dtype)(out)
    out = norms.BatchNorm(dtype=self.dtype, name='bn3')(out, train)
    if self.downsample:
      residual = _conv(self.conv, self.planes * EXPANSION, 1, self.stride, 1, 'downsample_0',
                       self.dtype)(x)
      residual = norms.BatchNorm(dtype=self.dtype, name='downsample_1')(residual, train)
    else:
      residual = x
    out = out + residual
    if self.ibn_mode in ('b', 'ab'):
      out = norms.InstanceNorm(dtype=self.dtype, name='IN')(out)
    out = nn.relu(out)
    self.sow('intermediates', 'output', out)
    return out


class ResNet(nn.Module):
  """Dilated bottleneck ResNet backbone (see the module docstring).

  Submodules: conv1, bn1, layer{s}_{i} (Bottleneck). When the 'intermediates' collection is
  mutable, the post-ReLU stem output is sown as 'stem' and each block sows its output as
  'layer{s}_{i}/output'. ``conv`` builds every convolution; ``sn_group_size`` is passed to the
  SwitchableNorms.
  """
  layers: tuple[int, ...] = ARCH_LAYERS['resnet50']
  ibn_mode: str = 'none'
  output_stride: int = 16
  multi_grid: tuple[int, ...] = (1, 2, 4)
  width: int = 64
  sn_group_size: int = 0
  conv: ModuleDef = nn.Conv
  dtype: Dtype = jnp.float32

  @nn.compact
  def __call__(self, x: Array, train: bool) -> tuple[Array, list[Array]]:
    """x (B,H,W,Cin) -> (layer4 (B,H/os,W/os,32*width), [layer1 (B,H/4,W/4,4*width),
    layer2 (8*width), layer3 (16*width)]), all in ``dtype``."""
    x = _conv(self.conv, self.width, 7, 2, 1, 'conv1', self.dtype)(x)
    if self.ibn_mode == 'b':
      x = norms.InstanceNorm(dtype=self.dtype, name='bn1')(x)
    else:
      x = norms.BatchNorm(dtype=self.dtype, name='bn1')(x, train)
    x = nn.relu(x)
    self.sow('intermediates', 'stem', x)
    x = pooling.max_pool(x, window=3, stride=2, padding=1)

    strides = STAGE_STRIDES_DILATIONS[self.output_stride][0]
    features = []
    for stage in range(1, 5):
      num_blocks = NUM_MULTI_GRID_BLOCKS if stage == 4 else self.layers[stage - 1]
      modes = block_ibn_modes(stage, num_blocks, self.ibn_mode)
      dilations = block_dilations(stage, num_blocks, self.output_stride, self.multi_grid)
      planes = self.width * 2 ** (stage - 1)
      for index in range(num_blocks):
        x = Bottleneck(planes=planes,
                       stride=strides[stage - 1] if index == 0 else 1,
                       dilation=dilations[index],
                       downsample=index == 0,
                       ibn_mode=modes[index],
                       sn_group_size=self.sn_group_size,
                       conv=self.conv,
                       dtype=self.dtype,
                       name=f'layer{stage}_{index}')(x, train)
      features.append(x)
    return features[3], features[:3]


def layer_names(layers: tuple[int, ...]) -> list[str]:
  """['stem', 'layer1_0', ...] for a ResNet with per-stage block counts ``layers`` (stage 4
  always has 3 blocks)."""
  names = ['stem']
  for stage, num_blocks in enumerate(layers[:3] + (NUM_MULTI_GRID_BLOCKS,), start=1):
    names.extend(f'layer{stage}_{index}' for index in range(num_blocks))
  return names

