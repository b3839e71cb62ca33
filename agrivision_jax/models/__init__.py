"""DeepLabV3+ with IBN-a/b/s ResNet backbones (the paper's network), in Flax linen, NHWC.

Public entry points: ``create_model``, ``init_variables``, ``backbone_layer_names``,
``capture_layer_outputs``. Parameter names follow the authors' PyTorch state_dict keys with
'.' -> '/' and every numeric component joined to the previous one with '_' (``layer1.0`` ->
``layer1_0``, ``downsample.1`` -> ``downsample_1``); see ``agrivision_jax.convert``. Every
convolution is built by one ``ModuleDef`` (``CONV_MODULES[resolve_conv_impl(conv_impl)]``), the
models' single seam for backend-specific kernels; the parameters are the same under each.
"""
import functools
from typing import Any, Mapping

import flax.linen as nn
import jax
import jax.numpy as jnp

from agrivision_jax.models.conv import CONV_MODULES
from agrivision_jax.models.deeplab import DeepLabV3Plus
from agrivision_jax.models.norms import IBN, BatchNorm, InstanceNorm, SwitchableNorm
from agrivision_jax.models.resize import resize_bilinear_align_corners
from agrivision_jax.models.resnet import ARCH_LAYERS, ResNet, layer_names

__all__ = [
    'BatchNorm', 'CONV_MODULES', 'DeepLabV3Plus', 'IBN', 'InstanceNorm', 'ResNet', 'SwitchableNorm',
    'backbone_layer_names', 'capture_layer_outputs', 'create_model', 'init_variables',
    'model_from_spec',
    'resize_bilinear_align_corners', 'resolve_conv_impl',
]

Array = jax.Array

DTYPES = {'float32': jnp.float32, 'bfloat16': jnp.bfloat16}
# Parameters do not depend on the spatial size, so init runs on one small image.
INIT_SIZE = 64

CONV_IMPLS = ('auto', *CONV_MODULES)


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


def create_model(model_config: Mapping[str, Any], *, in_channels: int,
                 num_classes: int) -> DeepLabV3Plus:
  """Builds the DeepLabV3+ module of ``config.model`` (validated by ``configuration.validate``).

  ``conv_impl`` is resolved here, once (``resolve_conv_impl``, 'auto' by the default backend),
  and its ``ModuleDef`` (``conv.CONV_MODULES``) builds every convolution of the model.

  Args:
    model_config: ``config.model`` (ConfigDict or mapping) with arch, ibn_mode, output_stride,
      multi_grid, num_low_level_features, dtype and optionally width (64), aspp_channels (256),
      decoder_channels (256), low_level_channels (48), conv_impl ('auto'), sn_group_size (0).
    in_channels: image channels (``configuration.in_channels(config)``): 4 for R,G,B,NIR.
    num_classes: logit channels (``configuration.num_classes(config)``).
  Returns:
    A ``DeepLabV3Plus``; ``apply(variables, images (B,H,W,in_channels), train=...)`` returns
    float32 logits (B,H,W,num_classes).
  """
  optional = {name: model_config.get(name, getattr(DeepLabV3Plus, name))
              for name in ('width', 'aspp_channels', 'decoder_channels', 'low_level_channels',
                           'sn_group_size')}
  conv_impl = resolve_conv_impl(model_config.get('conv_impl', 'auto'))
  return DeepLabV3Plus(arch=model_config['arch'], ibn_mode=model_config['ibn_mode'],
                       output_stride=model_config['output_stride'],
                       multi_grid=tuple(model_config['multi_grid']), in_channels=in_channels,
                       num_classes=num_classes,
                       num_low_level_features=model_config['num_low_level_features'],
                       dtype=DTYPES[model_config['dtype']], conv=CONV_MODULES[conv_impl],
                       **optional)


def model_from_spec(spec: Mapping[str, Any]) -> DeepLabV3Plus:
  """``create_model`` of a model spec: ``config.model``'s fields plus ``in_channels`` and
  ``num_classes`` in one mapping (``configuration.model_spec``; a converter manifest's
  ``model_config``)."""
  return create_model(spec, in_channels=spec['in_channels'], num_classes=spec['num_classes'])


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
  """['stem', 'layer1_0', ..., 'layer4_2']: 7 names for resnet20, 17 for resnet50, 34 for
  resnet101."""
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
    raise ValueError(f'images must be (B, H, W, in_channels={model.in_channels}), '
                     f'got shape {images.shape}')
  outputs = _capture(model, variables, images)  # jit returns dicts with sorted keys
  return {name: outputs[name] for name in backbone_layer_names(model.arch)}
