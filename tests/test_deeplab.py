"""DeepLabV3+ vs the PyTorch reference; resize, capture, init, config validation, param counts."""
import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
import torch.nn.functional as F

import torch_reference as ref
from agrivision_jax import models
from agrivision_jax.convert import state_dict_to_variables
from agrivision_jax.models.resize import interpolation_matrix, resize_bilinear_align_corners

IBN_MODES = ('none', 'a', 'b', 's', 'ab')
TINY = dict(arch='resnet50', ibn_mode='s', output_stride=16, multi_grid=(1, 2, 4), in_channels=4,
            num_classes=7, num_low_level_features=3, dtype='float32', width=8, aspp_channels=16,
            decoder_channels=16, low_level_channels=8)


def _images(seed: int, shape) -> np.ndarray:
  return np.random.default_rng(seed).standard_normal(shape).astype(np.float32)


def _torch_deeplab(config: dict, **dropouts) -> ref.DeepLab:
  return ref.randomize_(ref.DeepLab(
      config['arch'], config['ibn_mode'], config['output_stride'], config['multi_grid'],
      config['in_channels'], config['num_classes'], config['num_low_level_features'],
      config['width'], config['aspp_channels'], config['decoder_channels'],
      config['low_level_channels'], **dropouts), seed=3)


@pytest.mark.parametrize('in_size,out_size', [
    ((5, 6), (18, 22)), ((18, 22), (72, 88)), ((9, 11), (5, 6)), ((1, 1), (7, 3)),
    ((4, 7), (1, 5)), ((6, 6), (6, 9)), ((3, 8), (3, 8))])
def test_resize_matches_torch_align_corners(in_size, out_size):
  x = _images(1, (2, *in_size, 3))
  expected = F.interpolate(ref.to_nchw(x), size=out_size, mode='bilinear', align_corners=True)
  ref.assert_close(resize_bilinear_align_corners(jnp.asarray(x), out_size), ref.to_nhwc(expected))


def test_interpolation_matrix_rows():
  matrix = interpolation_matrix(9, 4)
  np.testing.assert_allclose(matrix.sum(1), 1.0, rtol=1e-6)
  assert (np.count_nonzero(matrix, axis=1) <= 2).all()
  np.testing.assert_array_equal(matrix[[0, -1]], np.eye(4)[[0, -1]])  # corners align


@pytest.mark.parametrize('num_low_level_features,ibn_mode,output_stride',
                         [(1, 'a', 16), (3, 's', 8)])
def test_deeplab_logits_parity(num_low_level_features, ibn_mode, output_stride):
  config = dict(TINY, num_low_level_features=num_low_level_features, ibn_mode=ibn_mode,
                output_stride=output_stride)
  x = _images(4, (2, 72, 88, 4))
  # float32 eval mode with the default dropout rates (inactive in eval) ...
  logits = ref.check_parity(_torch_deeplab(config), models.create_model(config), x, x,
                            lambda y: [y], modes=('eval',))
  assert logits.shape == (2, 72, 88, 7) and logits.dtype == jnp.float32
  # ... and train mode (logits, every running statistic) exactly in float64, dropout off in both.
  torch_model = _torch_deeplab(config, aspp_dropout=0.0, decoder_dropouts=(0.0, 0.0))
  flax_model = models.create_model(config).clone(aspp_dropout=0.0, decoder_dropouts=(0.0, 0.0))
  ref.check_parity(torch_model, flax_model, x, x, lambda y: [y], float64=True, modes=('train',))


def test_capture_layer_outputs_match_reference_hooks():
  config = dict(TINY, ibn_mode='b')
  torch_model = _torch_deeplab(config).eval()
  captured = []
  torch_model.backbone.relu.register_forward_hook(lambda m, i, o: captured.append(o))
  for stage in range(1, 5):
    for block in getattr(torch_model.backbone, f'layer{stage}'):
      block.register_forward_hook(lambda m, i, o: captured.append(o))
  model = models.create_model(config)
  x = _images(7, (2, 72, 88, 4))
  variables = ref.flax_variables(torch_model, model, x, train=False)
  outputs = models.capture_layer_outputs(model, variables, jnp.asarray(x))
  with torch.no_grad():
    torch_model.backbone(ref.to_nchw(x))
  names = models.backbone_layer_names('resnet50')
  assert list(outputs) == names and len(names) == len(captured) == 17
  for name, expected in zip(names, captured):
    ref.assert_close(outputs[name], ref.to_nhwc(expected), what=name)
  with pytest.raises(ValueError, match='in_channels'):
    models.capture_layer_outputs(model, variables, jnp.zeros((1, 32, 32, 3)))


def test_backbone_layer_names():
  names = models.backbone_layer_names('resnet101')
  assert len(names) == 34 and names[:2] == ['stem', 'layer1_0']
  assert names[-4:] == ['layer3_22', 'layer4_0', 'layer4_1', 'layer4_2']
  assert len(models.backbone_layer_names('resnet50')) == 17
  with pytest.raises(ValueError, match='arch'):
    models.backbone_layer_names('resnet18')


def test_init_variables():
  model = models.create_model(TINY)
  variables = models.init_variables(model, jax.random.key(0), (2, 72, 88, 4))
  template = jax.eval_shape(lambda: model.init(jax.random.key(0), jnp.zeros((1, 72, 88, 4))))
  assert (jax.tree_util.tree_structure(variables) == jax.tree_util.tree_structure(template))
  for got, want in zip(jax.tree_util.tree_leaves(variables), jax.tree_util.tree_leaves(template)):
    assert got.shape == want.shape and got.dtype == jnp.float32
  again = models.init_variables(model, jax.random.key(0), (1, 16, 16, 4))
  other = models.init_variables(model, jax.random.key(1), (1, 16, 16, 4))
  kernel = lambda v, *path: v['params'][path[0]][path[1]][path[2]]['kernel']  # noqa: E731
  np.testing.assert_array_equal(kernel(variables, 'backbone', 'layer3_0', 'conv2'),
                                kernel(again, 'backbone', 'layer3_0', 'conv2'))
  assert not np.array_equal(kernel(variables, 'backbone', 'layer3_0', 'conv2'),
                            kernel(other, 'backbone', 'layer3_0', 'conv2'))
  # Backbone: normal(0, sqrt(2 / (k*k*out))); head: kaiming normal, fan-in.
  backbone_kernel = np.asarray(kernel(variables, 'backbone', 'layer4_0', 'conv2'))  # 3x3x64x64
  np.testing.assert_allclose(backbone_kernel.std(), math.sqrt(2 / (9 * 64)), rtol=0.1)
  head_kernel = np.asarray(variables['params']['aspp']['aspp2']['atrous_conv']['kernel'])
  np.testing.assert_allclose(head_kernel.std(), math.sqrt(2 / (9 * 256)), rtol=0.1)
  layer1 = variables['params']['backbone']['layer1_0']
  np.testing.assert_array_equal(layer1['bn1']['mean_weight'], 1.0)
  np.testing.assert_array_equal(layer1['bn2']['scale'], 1.0)
  np.testing.assert_array_equal(layer1['bn2']['bias'], 0.0)
  stats = variables['batch_stats']['backbone']['layer1_0']
  np.testing.assert_array_equal(stats['bn1']['var'], 0.0)  # SN running stats start at zero
  np.testing.assert_array_equal(stats['bn2']['var'], 1.0)
  bias = np.asarray(variables['params']['decoder']['last_conv_8']['bias'])
  assert 0 < np.abs(bias).max() <= 1 / math.sqrt(16)


def test_bfloat16_compute_returns_float32_logits():
  model = models.create_model(dict(TINY, dtype='bfloat16'))
  x = jnp.zeros((2, 40, 56, 4), jnp.float32)
  variables = jax.eval_shape(lambda: model.init(jax.random.key(0), x))
  assert all(leaf.dtype == jnp.float32 for leaf in jax.tree_util.tree_leaves(variables))
  logits = jax.eval_shape(lambda v: model.apply(v, x), variables)
  assert logits.shape == (2, 40, 56, 7) and logits.dtype == jnp.float32
  features = jax.eval_shape(lambda v: models.capture_layer_outputs(model, v, x), variables)
  assert features['layer4_2'].dtype == jnp.bfloat16


@pytest.mark.parametrize('field,value,allowed', [
    ('arch', 'resnet18', 'resnet50'), ('ibn_mode', 'c', "'ab'"), ('output_stride', 12, '16'),
    ('num_low_level_features', 2, '(1, 3)'), ('in_channels', 5, '(3, 4)'),
    ('dtype', 'float16', 'bfloat16'), ('multi_grid', (1, 2), '(1, 2, 4)'),
    ('num_classes', 0, 'positive'), ('width', 8.0, 'positive')])
def test_bad_config_raises_value_error_naming_field(field, value, allowed):
  with pytest.raises(ValueError, match=f'config.model.{field}') as info:
    models.create_model(dict(TINY, **{field: value}))
  assert allowed in str(info.value)


def test_missing_config_field_and_bad_images():
  config = dict(TINY)
  del config['ibn_mode']
  with pytest.raises(ValueError, match='config.model.ibn_mode'):
    models.create_model(config)
  model = models.create_model(TINY)
  with pytest.raises(ValueError, match='in_channels'):
    jax.eval_shape(lambda: model.init(jax.random.key(0), jnp.zeros((1, 32, 32, 3))))


def test_converter_is_strict_and_lists_every_problem():
  torch_model = _torch_deeplab(dict(TINY, num_low_level_features=1))
  model = models.create_model(dict(TINY, num_low_level_features=1))
  template = jax.eval_shape(lambda: model.init(jax.random.key(0), jnp.zeros((1, 32, 32, 4))))
  state = ref.numpy_state_dict(torch_model)
  state_dict_to_variables(state, template)  # complete: no error
  broken = dict(state)
  broken['backbone.fc.weight'] = np.zeros((3, 3), np.float32)
  del broken['aspp.bn1.running_var']
  broken['decoder.last_conv.8.weight'] = np.zeros((5, 16, 1, 1), np.float32)
  with pytest.raises(ValueError) as info:
    state_dict_to_variables(broken, template)
  message = str(info.value)
  assert 'unmatched torch key: backbone.fc.weight' in message
  assert 'unfilled flax leaf: batch_stats/aspp/bn1/var' in message
  assert 'shape mismatch: decoder.last_conv.8.weight' in message
  assert 'unfilled flax leaf: params/decoder/last_conv_8/kernel' in message


def _flax_param_count(arch: str, ibn_mode: str) -> int:
  model = models.create_model(dict(TINY, arch=arch, ibn_mode=ibn_mode, width=64,
                                   aspp_channels=256, decoder_channels=256,
                                   low_level_channels=48))
  shapes = jax.eval_shape(lambda: model.init(jax.random.key(0), jnp.zeros((1, 64, 64, 4))))
  return sum(math.prod(leaf.shape) for leaf in jax.tree_util.tree_leaves(shapes['params']))


def _torch_param_count(arch: str, ibn_mode: str) -> int:
  with torch.device('meta'):
    net = ref.DeepLab(arch, ibn_mode, 16, (1, 2, 4), 4, 7, 3)
  return sum(p.numel() for p in net.parameters())


def test_parameter_counts_equal_the_reference():
  rows = []
  for arch in ('resnet50', 'resnet101'):
    for ibn_mode in IBN_MODES:
      flax_count = _flax_param_count(arch, ibn_mode)
      torch_count = _torch_param_count(arch, ibn_mode)
      rows.append(f'{arch:10s} {ibn_mode:5s} {flax_count:>12,d} {torch_count:>12,d}')
      assert flax_count == torch_count, rows[-1]
  print('\narch       ibn        flax count  torch count\n' + '\n'.join(rows))
