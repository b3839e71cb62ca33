"""DeepLabV3+ with IBN-a/b/s ResNet backbones (the paper's network), in Flax linen, NHWC.

Public entry points: ``create_model``, ``init_variables``, ``backbone_layer_names``,
``capture_layer_outputs``. Parameter names follow the authors' PyTorch state_dict keys with
'.' -> '/' and every numeric component joined to the previous one with '_' (``layer1.0`` ->
``layer1_0``, ``downsample.1`` -> ``downsample_1``); see ``agrivision_jax.convert``.
"""
import functools
from typing import Any, Mapping

import flax.linen as nn
import jax
import jax.numpy as jnp

from agrivision_jax.models.deeplab import DeepLabV3Plus
from agrivision_jax.models.norms import IBN, BatchNorm, InstanceNorm, SwitchableNorm
from agrivision_jax.models.resize import resize_bilinear_align_corners
from agrivision_jax.models.resnet import ARCH_LAYERS, IBN_MODES, ResNet, layer_names

__all__ = [
    'BatchNorm', 'DeepLabV3Plus', 'IBN', 'InstanceNorm', 'ResNet', 'SwitchableNorm',
    'backbone_layer_names', 'capture_layer_outputs', 'create_model', 'init_variables',
    'resize_bilinear_align_corners', 'resolve_conv_impl',
]

Array = jax.Array

DTYPES = {'float32': jnp.float32, 'bfloat16': jnp.bfloat16}
# Parameters do not depend on the spatial size, so init runs on one small image.
INIT_SIZE = 64

_CHOICES = {
    'arch': tuple(ARCH_LAYERS),
    'ibn_mode': IBN_MODES,
    'output_stride': (8, 16, 32),
    'in_channels': (3, 4),
    'num_low_level_features': (1, 3),
    'dtype': tuple(DTYPES),
}
_POSITIVE_INTS = {  # field -> default when absent
    'num_classes': None,
    'width': 64,
    'aspp_channels': 256,
    'decoder_channels': 256,
    'low_level_channels': 48,
}


def _field(model_config: Mapping[str, Any], name: str, default: Any = None) -> Any:
  if name in model_config:
    return model_config[name]
  if default is None:
    raise ValueError(f'config.model.{name} is missing')
  return default


def _is_int(value: Any) -> bool:
  return isinstance(value, int) and not isinstance(value, bool)


CONV_IMPLS = ('auto', 'xla', 'cpu_gemm')


def resolve_conv_impl(conv_impl: str, backend: str | None = None) -> str:
  """'auto' -> 'cpu_gemm' on the CPU backend and 'xla' on every other; others unchanged.

  Args:
    conv_impl: ``config.model.conv_impl``.
    backend: ``jax.default_backend()`` when None.
  """
  if conv_impl not in CONV_IMPLS:
    raise ValueError(f'config.model.conv_impl must be one of {CONV_IMPLS}, got {conv_impl!r}')
  if conv_impl != 'auto':
    return conv_impl
  return 'cpu_gemm' if (backend or jax.default_backend()) == 'cpu' else 'xla'


def create_model(model_config: Mapping[str, Any]) -> nn.Module:
  """Validates ``config.model`` and builds the DeepLabV3+ module.

  Args:
    model_config: ``config.model`` (ConfigDict or mapping) with arch, ibn_mode, output_stride,
      multi_grid, in_channels, num_classes, num_low_level_features, dtype and optionally width
      (64), aspp_channels (256), decoder_channels (256), low_level_channels (48).
  Returns:
    A ``DeepLabV3Plus``; ``apply(variables, images (B,H,W,in_channels), train=...)`` returns
    float32 logits (B,H,W,num_classes).
  Raises:
    ValueError naming the field and its allowed values for a missing or bad field.
  """
  values = {}
  for name, allowed in _CHOICES.items():
    value = _field(model_config, name)
    if value not in allowed or isinstance(value, bool):
      raise ValueError(f'config.model.{name} must be one of {allowed}, got {value!r}')
    values[name] = value
  for name, default in _POSITIVE_INTS.items():
    value = _field(model_config, name, default)
    if not _is_int(value) or value < 1:
      raise ValueError(f'config.model.{name} must be a positive int, got {value!r}')
    values[name] = value
  multi_grid = _field(model_config, 'multi_grid')
  if (not isinstance(multi_grid, (tuple, list)) or len(multi_grid) not in (0, 3)
      or not all(_is_int(g) and g >= 1 for g in multi_grid)):
    raise ValueError(f'config.model.multi_grid must be () or 3 positive ints such as (1, 2, 4), '
                     f'got {multi_grid!r}')
  values['multi_grid'] = tuple(multi_grid)
  values['dtype'] = DTYPES[values['dtype']]
  return DeepLabV3Plus(**values)


@functools.partial(jax.jit, static_argnums=0)
def _init(model: nn.Module, key: Array, images: Array) -> dict:
  # Threefry-derived initialisation of ~600 leaves compiles slowly on CPU (one expanded
  # threefry per leaf); an 'unsafe_rbg' key derived from ``key`` halves the compile time.
  data = jax.random.key_data(key).reshape(-1)[:2]
  rbg_key = jax.random.wrap_key_data(
      jnp.concatenate([data, data ^ jnp.uint32(0x9E3779B9)]), impl='unsafe_rbg')
  return model.init(rbg_key, images, train=False)


def init_variables(model: nn.Module, key: Array, image_shape: tuple[int, ...]) -> dict:
  """Initial variables {'params', 'batch_stats'} of ``model`` (one jitted init).

  Args:
    model: a module from ``create_model``.
    key: typed PRNG key (``jax.random.key``); the draws use an 'unsafe_rbg' key derived from
      it, so they are deterministic per backend but differ from a threefry ``model.init``.
    image_shape: shape of an images batch, (B, H, W, C) (or (H, W, C)); only C is used since the
      parameters do not depend on the batch or spatial size (init runs on 1 x 64 x 64 x C).
  Returns:
    {'params': ..., 'batch_stats': ...} of float32 arrays (nested dicts).
  """
  images = jnp.zeros((1, INIT_SIZE, INIT_SIZE, image_shape[-1]), jnp.float32)
  return _init(model, key, images)


def backbone_layer_names(arch: str) -> list[str]:
  """['stem', 'layer1_0', ..., 'layer4_2']: 17 names for resnet50, 34 for resnet101."""
  if arch not in ARCH_LAYERS:
    raise ValueError(f'config.model.arch must be one of {tuple(ARCH_LAYERS)}, got {arch!r}')
  return layer_names(ARCH_LAYERS[arch])


def _backbone_forward(module: DeepLabV3Plus, images: Array) -> Array:
  return module.backbone(images, False)[0]


@functools.partial(jax.jit, static_argnums=0)
def _capture(model: nn.Module, variables: Mapping[str, Any], images: Array) -> dict[str, Array]:
  _, state = model.apply(variables, images, method=_backbone_forward, mutable=['intermediates'])
  sown = state['intermediates']['backbone']
  return {name: sown['stem'][0] if name == 'stem' else sown[name]['output'][0]
          for name in backbone_layer_names(model.arch)}


def capture_layer_outputs(model: nn.Module, variables: Mapping[str, Any],
                          images: Array) -> dict[str, Array]:
  """Eval-mode post-ReLU outputs of the stem and of every bottleneck (jitted).

  Args:
    model: a module from ``create_model``.
    variables: {'params', 'batch_stats'}.
    images: (B, H, W, in_channels) float.
  Returns:
    {name: (B, h, w, c) array in the compute dtype}, keyed and ordered as
    ``backbone_layer_names(model.arch)``; the stem output is taken before the max pool.
  """
  if images.ndim != 4 or images.shape[-1] != model.in_channels:
    raise ValueError(f'images must be (B, H, W, in_channels={model.in_channels}) '
                     f'(config.model.in_channels), got shape {images.shape}')
  outputs = _capture(model, variables, images)  # jit returns dicts with sorted keys
  return {name: outputs[name] for name in backbone_layer_names(model.arch)}
