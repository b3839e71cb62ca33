"""Bottleneck and (tiny-width) ResNet-50 vs the PyTorch references, for every ibn_mode, under both
conv implementations ('cpu_gemm' for every case, 'xla' for a covering subset); ResNet-20 at output
stride 8 and for one 'xla' case."""
import jax
import numpy as np
import pytest
import torch.nn as nn

import torch_reference as ref
from agrivision_jax.models import resnet
from agrivision_jax.models.conv import CONV_MODULES

IBN_MODES = ('none', 'a', 'b', 's', 'ab')


def _images(seed: int, shape) -> np.ndarray:
  return np.random.default_rng(seed).standard_normal(shape).astype(np.float32)


@pytest.mark.parametrize('conv_impl', tuple(CONV_MODULES))
@pytest.mark.parametrize('mode', IBN_MODES)
@pytest.mark.parametrize('stride,dilation,downsample', [(2, 1, True), (1, 2, False)])
def test_bottleneck_parity(mode, stride, dilation, downsample, conv_impl):
  planes = 8
  inplanes = 12 if downsample else planes * 4
  torch_down = None
  if downsample:
    torch_down = nn.Sequential(nn.Conv2d(inplanes, planes * 4, 1, stride=stride, bias=False),
                               nn.BatchNorm2d(planes * 4))
  torch_block = ref.randomize_(ref.Bottleneck(inplanes, planes, stride, dilation, torch_down,
                                              mode), seed=1)
  flax_block = resnet.Bottleneck(planes=planes, stride=stride, dilation=dilation,
                                 downsample=downsample, ibn_mode=mode,
                                 conv=CONV_MODULES[conv_impl])
  ref.check_parity(torch_block, flax_block, _images(2, (2, 13, 10, inplanes)),
                   _images(3, (2, 13, 10, inplanes)), lambda y: [y])


@pytest.mark.slow
@pytest.mark.parametrize('arch,mode,output_stride,multi_grid,in_channels,conv_impl', [
    *[('resnet50', mode, 16, (1, 2, 4), 4, 'cpu_gemm') for mode in IBN_MODES],
    # Output stride 8 dilates stage 3: ResNet-50 where IBN-b / IBN-ab place their post-add IN on
    # a stage's last block (not its first), ResNet-20 (one block per stage 1-3) elsewhere.
    *[('resnet50', mode, 8, (1, 2, 4), 4, 'cpu_gemm') for mode in ('b', 'ab')],
    *[('resnet20', mode, 8, (1, 2, 4), 4, 'cpu_gemm') for mode in ('none', 'a', 's', 'ab')],
    ('resnet50', 'none', 32, (1, 2, 4), 3, 'cpu_gemm'),
    ('resnet50', 'a', 16, (), 4, 'cpu_gemm'),
    ('resnet50', 's', 16, (1, 2, 4), 4, 'xla'),
    ('resnet50', 'ab', 8, (1, 2, 4), 4, 'xla'),
    ('resnet50', 'b', 32, (1, 2, 4), 3, 'xla'),
    ('resnet20', 's', 16, (1, 2, 4), 4, 'xla'),
])
def test_resnet_parity(arch, mode, output_stride, multi_grid, in_channels, conv_impl):
  torch_net = ref.randomize_(ref.ResNet(ref.ARCH_LAYERS[arch], mode, output_stride,
                                        multi_grid, in_channels, width=8), seed=4)
  flax_net = resnet.ResNet(layers=resnet.ARCH_LAYERS[arch], ibn_mode=mode,
                           output_stride=output_stride, multi_grid=multi_grid, width=8,
                           conv=CONV_MODULES[conv_impl])

  def outputs(y):
    top, low = y
    return [top, *low]

  x = _images(5, (2, 72, 88, in_channels))
  # float32 in eval mode; train mode (outputs and every running statistic) exactly in float64.
  top, low = ref.check_parity(torch_net, flax_net, x, x, outputs, modes=('eval',))
  ref.check_parity(torch_net, flax_net, x, x, outputs, float64=True, modes=('train',))
  assert top.shape[1:3] == tuple(-(-s // output_stride) for s in (72, 88))
  assert [f.shape[-1] for f in low] == [32, 64, 128] and top.shape[-1] == 256


def _variable_tree(mode: str) -> dict:
  net = resnet.ResNet(layers=resnet.ARCH_LAYERS['resnet50'], ibn_mode=mode, width=8)
  x = np.zeros((1, 64, 64, 3), np.float32)
  return jax.eval_shape(lambda: net.init(jax.random.key(0), x, train=False))


def test_ibn_placement_follows_the_authors_code():
  """Hand-written expectations from the authors' resnet.py for ResNet-50 (3, 4, 6, 3)."""
  blocks = [f'layer{s}_{i}' for s, n in zip((1, 2, 3, 4), (3, 4, 6, 3)) for i in range(n)]
  stage = lambda block: int(block[5])  # noqa: E731
  last = {'layer1_2', 'layer2_3'}

  def kind(tree, block):
    bn1 = tree[block]['bn1']
    if 'IN' in bn1:
      return 'ibn'
    return 'sn' if 'mean_weight' in bn1 else 'bn'

  expected_bn1 = {
      'none': lambda b: 'bn',
      'a': lambda b: 'ibn' if stage(b) < 4 else 'bn',
      's': lambda b: 'sn' if stage(b) < 4 else 'bn',
      'b': lambda b: 'bn',
      'ab': lambda b: 'ibn' if stage(b) < 4 else 'bn',
  }
  for mode in IBN_MODES:
    variables = _variable_tree(mode)
    tree = variables['params']
    assert [kind(tree, b) for b in blocks] == [expected_bn1[mode](b) for b in blocks], mode
    with_in = {b for b in blocks if 'IN' in tree[b]}
    assert with_in == (last if mode in ('b', 'ab') else set()), mode
    assert ('bn1' not in variables['batch_stats']) == (mode == 'b'), mode  # IN stem: no stats
    assert all('downsample_0' in tree[f'layer{s}_0'] for s in (1, 2, 3, 4))


@pytest.mark.parametrize('output_stride,multi_grid,expected', [
    (16, (1, 2, 4), [(1,) * 3, (1,) * 4, (1,) * 6, (2, 4, 8)]),
    (8, (1, 2, 4), [(1,) * 3, (1,) * 4, (2,) * 6, (4, 8, 16)]),
    (16, (), [(1,) * 3, (1,) * 4, (1,) * 6, (2, 2, 2)]),
    (32, (1, 2, 4), [(1,) * 3, (1,) * 4, (1,) * 6, (2, 4, 8)]),
])
def test_block_dilations(output_stride, multi_grid, expected):
  layers = resnet.ARCH_LAYERS['resnet50'][:3] + (3,)
  got = [resnet.block_dilations(s, n, output_stride, multi_grid)
         for s, n in zip((1, 2, 3, 4), layers)]
  assert got == expected
