"""DeepLabV3+ head as the authors' ``model/aspp.py``, ``model/decoder.py`` and ``model/deeplab.py``.

ASPP (submodule ``aspp``): branches ``aspp1`` (1x1) and ``aspp2..4`` (3x3, dilation 6/12/18 at
output stride 16, doubled at 8, halved at 32), each ``atrous_conv`` + ``bn`` + ReLU; image pooling
``global_avg_pool_1`` (1x1 conv) + ``global_avg_pool_2`` (BN) + ReLU, resized back to the feature
size; concatenation [aspp1..4, pool]; ``conv1`` (1x1) + ``bn1`` + ReLU + dropout 0.5.

Decoder (submodule ``decoder``): low-level feature i (stage i+1 output, i < num_low_level_features)
goes through ``bottlenecks_{i}_0`` (1x1 conv to low_level_channels) + ``bottlenecks_{i}_1`` (BN)
+ ReLU and is resized to the stage-1 size; the ASPP output is resized to the stage-1 size;
concatenation [aspp, low_0, low_1, ...]; ``last_conv_0`` (3x3) + ``last_conv_1`` (BN) + ReLU +
dropout 0.5 + ``last_conv_4`` (3x3) + ``last_conv_5`` (BN) + ReLU + dropout 0.1 + ``last_conv_8``
(1x1 classifier with bias). The logits are cast to float32 and resized to the input size.

Every resize is bilinear with align_corners=True. Head convs are kaiming-normal (fan-in, gain
sqrt(2)); the classifier bias is PyTorch's default uniform(+-1/sqrt(fan_in)). Every convolution,
the classifier included, is built by the ``conv`` field (a ``ModuleDef``, see
``models.conv.CONV_MODULES``).
"""
from typing import Any, Callable, Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from agrivision_jax.models import norms
from agrivision_jax.models import resnet
from agrivision_jax.models.resize import resize_bilinear_align_corners

Array = jax.Array
Dtype = Any
ModuleDef = Callable[..., nn.Module]

ASPP_RATES_OS16 = (6, 12, 18)

head_conv_init = nn.initializers.variance_scaling(2.0, 'fan_in', 'normal')


def aspp_rates(output_stride: int) -> tuple[int, ...]:
  """Dilations of the three 3x3 ASPP branches: (6, 12, 18) * 16 / output_stride."""
  return tuple(r * 16 // output_stride for r in ASPP_RATES_OS16)


def _torch_bias_init(fan_in: int):
  """PyTorch's default conv bias init, uniform(-1/sqrt(fan_in), 1/sqrt(fan_in))."""
  bound = 1.0 / np.sqrt(fan_in)

  def init(key: Array, shape: Sequence[int], dtype: Dtype = jnp.float32) -> Array:
    return jax.random.uniform(key, shape, dtype, -bound, bound)

  return init


def _conv(conv: ModuleDef, features: int, kernel: int, dilation: int, name: str,
          dtype: Dtype) -> nn.Module:
  """Bias-free stride-1 head conv with symmetric padding ``dilation * (kernel - 1) // 2``."""
  pad = dilation * (kernel - 1) // 2
  return conv(features, (kernel, kernel), padding=((pad, pad), (pad, pad)),
              kernel_dilation=(dilation, dilation), use_bias=False, dtype=dtype,
              param_dtype=jnp.float32, kernel_init=head_conv_init, name=name)


class ASPPModule(nn.Module):
  """One ASPP branch: ``atrous_conv`` (kernel x kernel, dilation) + ``bn`` + ReLU."""
  features: int
  kernel: int
  dilation: int
  conv: ModuleDef = nn.Conv
  dtype: Dtype = jnp.float32

  @nn.compact
  def __call__(self, x: Array, train: bool) -> Array:
    """x (B,h,w,Cin) -> (B,h,w,features)."""
    x = _conv(self.conv, self.features, self.kernel, self.dilation, 'atrous_conv', self.dtype)(x)
    return nn.relu(norms.BatchNorm(dtype=self.dtype, name='bn')(x, train))


class ASPP(nn.Module):
  """Atrous spatial pyramid pooling with image pooling (see the module docstring)."""
  output_stride: int = 16
  channels: int = 256
  dropout_rate: float = 0.5
  conv: ModuleDef = nn.Conv
  dtype: Dtype = jnp.float32

  @nn.compact
  def __call__(self, x: Array, train: bool) -> Array:
    """x (B,h,w,Cin) -> (B,h,w,channels)."""
    branches = [ASPPModule(self.channels, 1, 1, self.conv, self.dtype, name='aspp1')(x, train)]
    for index, rate in enumerate(aspp_rates(self.output_stride), start=2):
      branches.append(ASPPModule(self.channels, 3, rate, self.conv, self.dtype,
                                 name=f'aspp{index}')(x, train))
    pooled = jnp.mean(x.astype(jnp.promote_types(x.dtype, jnp.float32)), axis=(1, 2),
                      keepdims=True).astype(self.dtype)
    pooled = _conv(self.conv, self.channels, 1, 1, 'global_avg_pool_1', self.dtype)(pooled)
    pooled = nn.relu(norms.BatchNorm(dtype=self.dtype, name='global_avg_pool_2')(pooled, train))
    branches.append(resize_bilinear_align_corners(pooled, x.shape[1:3]))
    x = jnp.concatenate(branches, axis=-1)
    x = _conv(self.conv, self.channels, 1, 1, 'conv1', self.dtype)(x)
    x = nn.relu(norms.BatchNorm(dtype=self.dtype, name='bn1')(x, train))
    return nn.Dropout(self.dropout_rate, deterministic=not train)(x)


class Decoder(nn.Module):
  """DeepLabV3+ decoder with 1 or 3 low-level features (see the module docstring)."""
  num_classes: int
  num_low_level_features: int = 3
  low_level_channels: int = 48
  channels: int = 256
  dropout_rates: tuple[float, float] = (0.5, 0.1)
  conv: ModuleDef = nn.Conv
  dtype: Dtype = jnp.float32

  @nn.compact
  def __call__(self, x: Array, low_level_features: Sequence[Array], train: bool) -> Array:
    """x (B,h,w,C) and low-level features [(B,H4,W4,C1), ...] -> logits (B,H4,W4,num_classes)
    in ``dtype``, at the size of the first low-level feature."""
    size = low_level_features[0].shape[1:3]
    parts = [resize_bilinear_align_corners(x, size)]
    for index, feature in enumerate(low_level_features[:self.num_low_level_features]):
      feature = _conv(self.conv, self.low_level_channels, 1, 1, f'bottlenecks_{index}_0',
                      self.dtype)(feature)
      feature = norms.BatchNorm(dtype=self.dtype, name=f'bottlenecks_{index}_1')(feature, train)
      parts.append(resize_bilinear_align_corners(nn.relu(feature), size))
    x = jnp.concatenate(parts, axis=-1)
    x = _conv(self.conv, self.channels, 3, 1, 'last_conv_0', self.dtype)(x)
    x = nn.relu(norms.BatchNorm(dtype=self.dtype, name='last_conv_1')(x, train))
    x = nn.Dropout(self.dropout_rates[0], deterministic=not train)(x)
    x = _conv(self.conv, self.channels, 3, 1, 'last_conv_4', self.dtype)(x)
    x = nn.relu(norms.BatchNorm(dtype=self.dtype, name='last_conv_5')(x, train))
    x = nn.Dropout(self.dropout_rates[1], deterministic=not train)(x)
    return self.conv(self.num_classes, (1, 1), padding=((0, 0), (0, 0)), use_bias=True,
                     dtype=self.dtype, param_dtype=jnp.float32, kernel_init=head_conv_init,
                     bias_init=_torch_bias_init(self.channels), name='last_conv_8')(x)


class DeepLabV3Plus(nn.Module):
  """DeepLabV3+ on an (IBN) ResNet: submodules ``backbone``, ``aspp``, ``decoder``.

  Call as ``apply(variables, images, train=...)`` (train needs ``mutable=['batch_stats']`` and a
  'dropout' rng). Params are float32; ``dtype`` is the compute dtype (float32 or bfloat16; the
  parity tests also run float64); logits are float32 (float64 for float64). ``conv`` builds every
  convolution (``models.conv.CONV_MODULES``); ``sn_group_size`` is the SwitchableNorm statistics
  group (0 = the whole batch).
  """
  arch: str = 'resnet101'
  ibn_mode: str = 'none'
  output_stride: int = 16
  multi_grid: tuple[int, ...] = (1, 2, 4)
  in_channels: int = 4
  num_classes: int = 7
  num_low_level_features: int = 3
  width: int = 64
  aspp_channels: int = 256
  decoder_channels: int = 256
  low_level_channels: int = 48
  aspp_dropout: float = 0.5
  decoder_dropouts: tuple[float, float] = (0.5, 0.1)
  sn_group_size: int = 0
  conv: ModuleDef = nn.Conv
  dtype: Dtype = jnp.float32

  def setup(self):
    self.backbone = resnet.ResNet(layers=resnet.ARCH_LAYERS[self.arch], ibn_mode=self.ibn_mode,
                                  output_stride=self.output_stride,
                                  multi_grid=tuple(self.multi_grid), width=self.width,
                                  sn_group_size=self.sn_group_size, conv=self.conv,
                                  dtype=self.dtype)
    self.aspp = ASPP(output_stride=self.output_stride, channels=self.aspp_channels,
                     dropout_rate=self.aspp_dropout, conv=self.conv, dtype=self.dtype)
    self.decoder = Decoder(num_classes=self.num_classes,
                           num_low_level_features=self.num_low_level_features,
                           low_level_channels=self.low_level_channels,
                           channels=self.decoder_channels,
                           dropout_rates=tuple(self.decoder_dropouts), conv=self.conv,
                           dtype=self.dtype)

  def __call__(self, images: Array, train: bool = False) -> Array:
    """images (B,H,W,in_channels) float -> logits (B,H,W,num_classes) float32."""
    if images.ndim != 4 or images.shape[-1] != self.in_channels:
      raise ValueError(f'images must be (B, H, W, in_channels={self.in_channels}), '
                       f'got shape {images.shape}')
    x, low_level_features = self.backbone(images, train)
    x = self.aspp(x, train)
    x = self.decoder(x, low_level_features, train)
    logits = x.astype(jnp.promote_types(self.dtype, jnp.float32))
    return resize_bilinear_align_corners(logits, images.shape[1:3])
