"""DeepLabV3+ vs the PyTorch reference under both conv implementations; resize, capture, init,
create_model's field mapping, param counts."""
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
CONV_IMPLS = ('xla', 'cpu_gemm')
TINY = dict(arch='resnet50', ibn_mode='s', output_stride=16, multi_grid=(1, 2, 4),
            num_low_level_features=3, dtype='float32', width=8, aspp_channels=16,
            decoder_channels=16, low_level_channels=8, conv_impl='auto', sn_group_size=0)
IN_CHANNELS, NUM_CLASSES = 4, 7


def _model(config: dict, in_channels: int = IN_CHANNELS) -> models.DeepLabV3Plus:
  return models.create_model(config, in_channels=in_channels, num_classes=NUM_CLASSES)


def _images(seed: int, shape) -> np.ndarray:
  return np.random.default_rng(seed).standard_normal(shape).astype(np.float32)


def _torch_deeplab(config: dict, **dropouts) -> ref.DeepLab:
  return ref.randomize_(ref.DeepLab(
      config['arch'], config['ibn_mode'], config['output_stride'], config['multi_grid'],
      IN_CHANNELS, NUM_CLASSES, config['num_low_level_features'],
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


@pytest.mark.slow
@pytest.mark.parametrize('conv_impl', CONV_IMPLS)
@pytest.mark.parametrize('arch,num_low_level_features,ibn_mode,output_stride',
                         [('resnet50', 1, 'a', 16), ('resnet20', 3, 's', 8)])
def test_deeplab_logits_parity(arch, num_low_level_features, ibn_mode, output_stride, conv_impl):
  config = dict(TINY, arch=arch, num_low_level_features=num_low_level_features,
                ibn_mode=ibn_mode, output_stride=output_stride, conv_impl=conv_impl)
  x = _images(4, (2, 72, 88, 4))
  # float32 eval mode with the default dropout rates (inactive in eval) ...
  logits = ref.check_parity(_torch_deeplab(config), _model(config), x, x,
                            lambda y: [y], modes=('eval',))
  assert logits.shape == (2, 72, 88, 7) and logits.dtype == jnp.float32
  # ... and train mode (logits, every running statistic) exactly in float64, dropout off in both.
  torch_model = _torch_deeplab(config, aspp_dropout=0.0, decoder_dropouts=(0.0, 0.0))
  flax_model = _model(config).clone(aspp_dropout=0.0, decoder_dropouts=(0.0, 0.0))
  ref.check_parity(torch_model, flax_model, x, x, lambda y: [y], float64=True, modes=('train',))


def test_capture_layer_outputs_match_reference_hooks():
  config = dict(TINY, ibn_mode='b')
  torch_model = _torch_deeplab(config).eval()
  captured = []
  torch_model.backbone.relu.register_forward_hook(lambda m, i, o: captured.append(o))
  for stage in range(1, 5):
    for block in getattr(torch_model.backbone, f'layer{stage}'):
      block.register_forward_hook(lambda m, i, o: captured.append(o))
  model = _model(config)
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
  assert models.backbone_layer_names('resnet20') == [
      'stem', 'layer1_0', 'layer2_0', 'layer3_0', 'layer4_0', 'layer4_1', 'layer4_2']
  with pytest.raises(ValueError, match='arch'):
    models.backbone_layer_names('resnet18')


@pytest.mark.slow
def test_init_variables():
  model = _model(dict(TINY, arch='resnet20'))
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
  model = _model(dict(TINY, dtype='bfloat16'))
  x = jnp.zeros((2, 40, 56, 4), jnp.float32)
  variables = jax.eval_shape(lambda: model.init(jax.random.key(0), x))
  assert all(leaf.dtype == jnp.float32 for leaf in jax.tree_util.tree_leaves(variables))
  logits = jax.eval_shape(lambda v: model.apply(v, x), variables)
  assert logits.shape == (2, 40, 56, 7) and logits.dtype == jnp.float32
  features = jax.eval_shape(lambda v: models.capture_layer_outputs(model, v, x), variables)
  assert features['layer4_2'].dtype == jnp.bfloat16


def test_create_model_maps_the_config_fields():
  model = _model(dict(TINY, output_stride=8, multi_grid=[1, 2, 4], sn_group_size=2,
                      conv_impl='xla'), in_channels=3)
  assert (model.arch, model.ibn_mode, model.output_stride, model.multi_grid) == (
      'resnet50', 's', 8, (1, 2, 4))
  assert (model.in_channels, model.num_classes, model.num_low_level_features) == (3, 7, 3)
  assert (model.width, model.aspp_channels, model.decoder_channels,
          model.low_level_channels) == (8, 16, 16, 8)
  assert model.sn_group_size == 2 and model.dtype == jnp.float32
  assert model.conv is models.CONV_MODULES['xla']
  # 'auto' resolves by the backend: the tests run on CPU.
  assert _model(TINY).conv is models.CONV_MODULES['cpu_gemm']
  assert _model(TINY) == _model(TINY)  # equal modules share jit caches
  # Optional fields take the paper's defaults.
  required = {k: v for k, v in TINY.items() if k in (
      'arch', 'ibn_mode', 'output_stride', 'multi_grid', 'num_low_level_features', 'dtype')}
  model = _model(required)
  assert (model.width, model.aspp_channels, model.decoder_channels, model.low_level_channels,
          model.sn_group_size) == (64, 256, 256, 48, 0)
  assert model.conv is models.CONV_MODULES['cpu_gemm']
  with pytest.raises(ValueError, match='config.model.conv_impl'):
    _model(dict(TINY, conv_impl='cudnn'))


def test_bad_images_raise_value_error():
  model = _model(TINY)
  with pytest.raises(ValueError, match='in_channels=4'):
    jax.eval_shape(lambda: model.init(jax.random.key(0), jnp.zeros((1, 32, 32, 3))))


@pytest.mark.slow
def test_conv_impls_build_the_same_model():
  """'xla' and 'cpu_gemm': the same variables (names, shapes), train-mode logits, batch statistics
  and parameter gradients. Compared in float64 (to 1e-9): in float32 the gradients of a
  train-mode net at init carry float32 noise amplified through the norms (up to a few % of a
  leaf's scale), which would hide a real difference; the float32 forward of each implementation
  is checked against PyTorch in test_deeplab_logits_parity. On ResNet-20, which has every kind
  of convolution ResNet-50 has (strided, dilated, multi-grid, ASPP rates past the map)."""
  x = _images(8, (2, 40, 56, 4)).astype(np.float64)
  labels = _images(9, (2, 40, 56, NUM_CLASSES)).astype(np.float64)
  built = {impl: _model(dict(TINY, arch='resnet20', conv_impl=impl)) for impl in CONV_IMPLS}
  shapes = {impl: jax.eval_shape(lambda m=m: m.init(jax.random.key(0), x))
            for impl, m in built.items()}
  assert (jax.tree_util.tree_structure(shapes['xla'])
          == jax.tree_util.tree_structure(shapes['cpu_gemm']))
  assert all(jax.tree.leaves(jax.tree.map(lambda a, b: a.shape == b.shape,
                                          shapes['xla'], shapes['cpu_gemm'])))
  variables = models.init_variables(built['xla'], jax.random.key(1), x.shape)

  def loss(params, model):
    logits, updates = model.apply({**variables, 'params': params}, x, train=True,
                                  mutable=['batch_stats'])
    return jnp.mean(jnp.square(logits - labels)), (logits, updates['batch_stats'])

  with jax.enable_x64(True):
    variables = jax.tree.map(lambda a: np.asarray(a, np.float64), variables)
    results = {impl: jax.jit(jax.value_and_grad(loss, has_aux=True), static_argnums=1)(
        variables['params'], model.clone(dtype=jnp.float64, aspp_dropout=0.0,
                                         decoder_dropouts=(0.0, 0.0)))
               for impl, model in built.items()}
  (_, (logits_x, stats_x)), grads_x = results['xla']
  (_, (logits_c, stats_c)), grads_c = results['cpu_gemm']
  assert logits_x.dtype == jnp.float64
  ref.assert_close(logits_c, logits_x, rel=1e-9, what='logits')
  for tree_x, tree_c in ((stats_x, stats_c), (grads_x, grads_c)):
    leaves = jax.tree_util.tree_leaves_with_path(tree_x)
    assert len(leaves) == len(jax.tree.leaves(tree_c)) > 0
    for path, value in leaves:
      ref.assert_close(_leaf(tree_c, path), value, rel=1e-9, what=jax.tree_util.keystr(path))


def _leaf(tree, path):
  for key in path:
    tree = tree[key.key]
  return tree


def test_converter_is_strict_and_lists_every_problem():
  torch_model = _torch_deeplab(dict(TINY, num_low_level_features=1))
  model = _model(dict(TINY, num_low_level_features=1))
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
  model = _model(dict(TINY, arch=arch, ibn_mode=ibn_mode, width=64, aspp_channels=256,
                      decoder_channels=256, low_level_channels=48))
  shapes = jax.eval_shape(lambda: model.init(jax.random.key(0), jnp.zeros((1, 64, 64, 4))))
  return sum(math.prod(leaf.shape) for leaf in jax.tree_util.tree_leaves(shapes['params']))


def _torch_param_count(arch: str, ibn_mode: str) -> int:
  with torch.device('meta'):
    net = ref.DeepLab(arch, ibn_mode, 16, (1, 2, 4), 4, 7, 3)
  return sum(p.numel() for p in net.parameters())


@pytest.mark.slow
def test_parameter_counts_equal_the_reference():
  rows = []
  for arch in ('resnet50', 'resnet101'):
    for ibn_mode in IBN_MODES:
      flax_count = _flax_param_count(arch, ibn_mode)
      torch_count = _torch_param_count(arch, ibn_mode)
      rows.append(f'{arch:10s} {ibn_mode:5s} {flax_count:>12,d} {torch_count:>12,d}')
      assert flax_count == torch_count, rows[-1]
  print('\narch       ibn        flax count  torch count\n' + '\n'.join(rows))
