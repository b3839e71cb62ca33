"""Converter: torchvision / IBN-Net ImageNet files and the authors' DeepLabV3+ checkpoints -> Flax.

Parity against the PyTorch references of tests/torch_reference.py (torchvision / IBN-Net / authors'
key names) with random weights and running statistics, tiny widths, non-square inputs.
"""
import json
import os
import subprocess
import sys

import flax
import jax
import numpy as np
import pytest
import safetensors.numpy
import torch

import torch_reference as ref
from agrivision_jax import convert
from agrivision_jax import models

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
WIDTH = 8
STAGE_OUTPUTS = ('layer1_2', 'layer2_3', 'layer3_5', 'layer4_2')  # ResNet-50 stage ends


def _model_config(**overrides) -> dict:
  config = dict(arch='resnet50', ibn_mode='none', output_stride=16, multi_grid=(1, 2, 4),
                in_channels=4, num_classes=7, num_low_level_features=3, dtype='float32',
                width=WIDTH, aspp_channels=16, decoder_channels=16, low_level_channels=8)
  config.update(overrides)
  return config


def _images(seed: int, shape) -> np.ndarray:
  return np.random.default_rng(seed).standard_normal(shape).astype(np.float32)


def _backbone(mode: str, in_channels: int = 3, seed: int = 1, arch: str = 'resnet50'):
  net = ref.ResNet(ref.ARCH_LAYERS[arch], mode, 16, (1, 2, 4), in_channels, WIDTH)
  return ref.randomize_(net, seed).eval()


def _imagenet_state_dict(net) -> dict[str, torch.Tensor]:
  """The backbone's state_dict plus an ImageNet classifier, as torchvision / IBN-Net save it."""
  state = dict(net.state_dict())
  gen = torch.Generator().manual_seed(7)
  state['fc.weight'] = torch.randn(10, net.inplanes, generator=gen)
  state['fc.bias'] = torch.randn(10, generator=gen)
  return state


def _flat(tree) -> dict[str, np.ndarray]:
  return {k: np.asarray(v) for k, v in flax.traverse_util.flatten_dict(tree, sep='/').items()}


def _assert_nothing_written(directory, before: set[str], output: str):
  assert not os.path.exists(output)
  assert set(os.listdir(directory)) == before  # no staging directory left behind


def _save_safetensors(state: dict, path: str) -> None:
  safetensors.numpy.save_file({k: np.ascontiguousarray(v.numpy()) for k, v in state.items()},
                              path)


# ------------------------------------------------------------------------------- parity


@pytest.mark.parametrize('mode,container', [('none', 'pth'), ('a', 'wrapped'),
                                            ('b', 'safetensors')])
def test_imagenet_backbone_parity(mode, container, tmp_path):
  """ResNet-50 plain / IBN-a / IBN-b ImageNet files -> 4-channel backbone == the authors' torch
  model after convert_model (NIR filter = R filter); a zero NIR gives the 3-channel features."""
  net = _backbone(mode)
  state = _imagenet_state_dict(net)
  if container == 'pth':  # torchvision: a plain state_dict
    path = str(tmp_path / 'resnet50.pth')
    torch.save(state, path)
  elif container == 'wrapped':  # older IBN-Net release: DataParallel prefix inside a wrapper
    path = str(tmp_path / 'resnet50_ibn_a.pth.tar')
    torch.save({'state_dict': {f'module.{k}': v for k, v in state.items()}, 'epoch': 100,
                'arch': 'resnet50_ibn_a', 'best_prec1': 77.5}, path)
  else:  # IBN-b as safetensors, with PyTorch < 0.4 InstanceNorm running statistics
    state['bn1.running_mean'] = torch.rand(WIDTH)
    state['bn1.running_var'] = torch.rand(WIDTH) + 0.5
    state['layer1.2.IN.running_mean'] = torch.rand(4 * WIDTH)
    state['layer1.2.IN.running_var'] = torch.rand(4 * WIDTH) + 0.5
    path = str(tmp_path / 'resnet50_ibn_b.safetensors')
    _save_safetensors(state, path)
  config = _model_config(ibn_mode=mode)
  report = convert.convert_file(path, str(tmp_path / 'out'), config)
  variables = convert.load_variables(str(tmp_path / 'out'), config)

  assert not report['output']['complete']
  assert report['counts']['used'] + report['counts']['ignored'] == len(state)
  ignored = {e['key']: e['reason'] for e in report['ignored']}
  assert ignored.keys() >= {'fc.weight', 'fc.bias'}
  assert all(k.startswith('fc.') or k.endswith('num_batches_tracked') or 'running' in k
             for k in ignored)
  if container == 'safetensors':
    assert 'InstanceNorm running statistic' in ignored['layer1.2.IN.running_mean']
    assert 'InstanceNorm running statistic' in ignored['bn1.running_var']
  fresh = {e['leaf'] for e in report['fresh']}
  template = convert.variable_shapes(config)
  assert fresh == {'/'.join(p) for p in template if p[1] != 'backbone'}
  loaded = _flat(variables)
  assert loaded.keys() == {'/'.join(p) for p in template if p[1] == 'backbone'}
  assert all(loaded[k].shape == template[tuple(k.split('/'))].shape for k in loaded)

  net4 = ref.ResNet(ref.ARCH_LAYERS['resnet50'], mode, 16, (1, 2, 4), 4, WIDTH).eval()
  state4 = dict(net.state_dict())
  state4['conv1.weight'] = torch.cat([state4['conv1.weight'], state4['conv1.weight'][:, :1]], 1)
  net4.load_state_dict(state4)  # the authors' utils.convert_model
  model = models.model_from_spec(config)
  x = _images(2, (2, 72, 88, 4))
  no_nir = x.copy()
  no_nir[..., 3] = 0
  with torch.no_grad():
    top, low = net4(ref.to_nchw(x))
    top3, low3 = net(ref.to_nchw(x[..., :3]))
  for inputs, expected in ((x, [*low, top]), (no_nir, [*low3, top3])):
    outputs = models.capture_layer_outputs(model, variables, inputs)
    for name, want in zip(STAGE_OUTPUTS, expected, strict=True):
      ref.assert_close(outputs[name], ref.to_nhwc(want), what=f'{mode} {name}')


@pytest.mark.slow
@pytest.mark.parametrize('mode,prefix', [('a', ''), ('s', 'module.')])
def test_deeplab_checkpoint_logits_parity(mode, prefix, tmp_path):
  """An authors' DeepLabV3+ checkpoint (3 low-level features, OS16, 4 channels) converts
  completely and gives the torch logits."""
  torch_model = ref.randomize_(ref.DeepLab(
      'resnet50', mode, 16, (1, 2, 4), in_channels=4, num_classes=7, num_low_level_feat=3,
      width=WIDTH, aspp_channels=16, decoder_channels=16, low_level_channels=8), seed=3).eval()
  state = {prefix + k: v for k, v in torch_model.state_dict().items()}
  path = str(tmp_path / 'weight_epoch_40.pth')
  torch.save(state, path)  # the authors' checkpoint(): torch.save(model.state_dict())
  config = _model_config(ibn_mode=mode)
  report = convert.convert_file(path, str(tmp_path / 'out'), config)
  assert report['output']['complete'] and report['fresh'] == []
  assert report['input']['prefix_stripped'] == (prefix or None)
  assert all(e['key'].endswith('num_batches_tracked') for e in report['ignored'])
  assert report['counts']['filled'] == report['counts']['flax_leaves']
  variables = convert.load_variables(str(tmp_path / 'out'), config)
  x = _images(4, (2, 72, 88, 4))
  logits = jax.jit(lambda v, images: models.model_from_spec(config).apply(v, images, train=False))(
      variables, x)
  with torch.no_grad():
    expected = ref.to_nhwc(torch_model(ref.to_nchw(x)))
  ref.assert_close(logits, expected, what=f'DeepLabV3+ {mode} logits')


def test_three_to_four_channel_rule():
  """4-channel conv1 = 3-channel conv1 plus the R filter applied to NIR."""
  net = _backbone('none', seed=5)
  state = _imagenet_state_dict(net)
  k3 = convert.convert_state_dict(state, _model_config(in_channels=3)).variables
  k4 = convert.convert_state_dict(state, _model_config(in_channels=4)).variables
  k3 = k3['params']['backbone']['conv1']['kernel']
  k4 = k4['params']['backbone']['conv1']['kernel']
  np.testing.assert_array_equal(k3, np.transpose(state['conv1.weight'].numpy(), (2, 3, 1, 0)))
  np.testing.assert_array_equal(k4[:, :, :3], k3)
  np.testing.assert_array_equal(k4[:, :, 3], k3[:, :, 0])

  def conv(x, kernel):
    return jax.lax.conv_general_dilated(x, kernel, (2, 2), ((3, 3), (3, 3)),
                                        dimension_numbers=('NHWC', 'HWIO', 'NHWC'))

  x = _images(6, (2, 37, 50, 4))
  ref.assert_close(conv(x, k4), conv(x[..., :3], k3) + conv(x[..., 3:], k3[:, :, :1]),
                   rel=1e-6, what='RGBN conv')
  x[..., 3] = 0
  ref.assert_close(conv(x, k4), conv(x[..., :3], k3), rel=1e-6, what='zero-NIR conv')


def test_ibn_s_and_ab_from_ibn_a_leave_the_new_norms_fresh():
  """IBN-a ImageNet weights for ibn_mode 's' (SN fresh, IBN-a norms ignored) and 'ab' (the
  post-add InstanceNorms fresh); every other tensor lands unchanged."""
  state = {k: v.numpy() for k, v in _imagenet_state_dict(_backbone('a', seed=8)).items()}
  conversion = convert.convert_state_dict(state, _model_config(ibn_mode='s'))
  plan = conversion.plan
  sn_blocks = [f'layer{s}_{i}' for s, n in zip((1, 2, 3), (3, 4, 6)) for i in range(n)]
  sn_leaves = {(c, 'backbone', b, 'bn1', leaf) for b in sn_blocks
               for c, leaf in [('params', 'scale'), ('params', 'bias'), ('params', 'mean_weight'),
                               ('params', 'var_weight'), ('batch_stats', 'mean'),
                               ('batch_stats', 'var')]}
  assert {p for p in plan.fresh if p[1] == 'backbone'} == sn_leaves
  ibn_keys = {k for k in state if '.bn1.IN.' in k or '.bn1.BN.' in k}
  assert len(ibn_keys) == 13 * 7  # IN weight, bias; BN weight, bias, mean, var, counter
  assert {k for k, r in plan.ignored.items() if 'SwitchableNorm' in r} == {
      k for k in ibn_keys if not k.endswith('num_batches_tracked')}
  flat = _flat(conversion.variables)
  np.testing.assert_array_equal(flat['params/backbone/layer4_0/bn1/scale'],
                                state['layer4.0.bn1.weight'])
  np.testing.assert_array_equal(flat['batch_stats/backbone/layer2_1/bn2/var'],
                                state['layer2.1.bn2.running_var'])
  np.testing.assert_array_equal(flat['params/backbone/layer3_5/conv2/kernel'],
                                np.transpose(state['layer3.5.conv2.weight'], (2, 3, 1, 0)))

  plan = convert.convert_state_dict(state, _model_config(ibn_mode='ab')).plan
  assert {p for p in plan.fresh if p[1] == 'backbone'} == {
      ('params', 'backbone', b, 'IN', leaf) for b in ('layer1_2', 'layer2_3')
      for leaf in ('scale', 'bias')}
  assert all(k.startswith('fc.') or k.endswith('num_batches_tracked') for k in plan.ignored)


@pytest.mark.slow
@pytest.mark.parametrize('arch', ['resnet20', 'resnet50', 'resnet101'])
def test_full_width_key_coverage(arch):
  """Full-width ImageNet files (torchvision key count by formula) and DeepLabV3+ checkpoints plan
  without error for every ibn_mode, shapes only (meta tensors, jax.eval_shape)."""
  full_width = dict(arch=arch, width=64, aspp_channels=256, decoder_channels=256,
                    low_level_channels=48)
  blocks = sum(ref.ARCH_LAYERS[arch])
  num_convs = 1 + 3 * blocks + 4  # stem, 3 per bottleneck, 4 downsamples; each with a BN
  for source in ('none', 'a', 'b'):
    with torch.device('meta'):
      net = ref.ResNet(ref.ARCH_LAYERS[arch], source, 16, (1, 2, 4), 3, 64)
    shapes = {k: tuple(v.shape) for k, v in net.state_dict().items()}
    shapes.update({'fc.weight': (1000, 2048), 'fc.bias': (1000,)})
    if source == 'none':
      assert len(shapes) == num_convs * 6 + 2  # conv weight + BN weight, bias, mean, var, counter
    for mode, accepted in convert.ACCEPTED_BACKBONE_VARIANTS.items():
      if source not in accepted:
        with pytest.raises(ValueError, match=f"ibn_mode='{mode}'"):
          convert.plan_conversion(shapes, _model_config(ibn_mode=mode, **full_width))
        continue
      plan = convert.plan_conversion(shapes, _model_config(ibn_mode=mode, **full_width))
      template = convert.variable_shapes(_model_config(ibn_mode=mode, **full_width))
      assert len(plan.used) + len(plan.ignored) == len(shapes)
      assert len(plan.used) + len(plan.fresh) == len(template)
      assert len({p for p, _ in plan.used.values()}) == len(plan.used)
  for mode in ('none', 's', 'ab'):
    with torch.device('meta'):
      deeplab = ref.DeepLab(arch, mode, 16, (1, 2, 4), in_channels=4)
    shapes = {k: tuple(v.shape) for k, v in deeplab.state_dict().items()}
    plan = convert.plan_conversion(shapes, _model_config(ibn_mode=mode, **full_width))
    assert not plan.fresh and len(plan.used) + len(plan.ignored) == len(shapes)
    assert plan.layout.arch == arch


# ------------------------------------------------------------------------------- errors


@pytest.fixture(scope='module')
def plain_state():
  return _imagenet_state_dict(_backbone('none', seed=9))


def _wrong_shape(state):
  state['layer2.1.conv2.weight'] = torch.zeros(16, 16, 1, 3)
  return state


@pytest.mark.parametrize('edit,match', [
    (lambda s: {k: v for k, v in s.items() if k != 'layer3.2.bn2.running_var'},
     r'missing key: layer3\.2\.bn2\.running_var'),
    (lambda s: {**s, 'layer1.0.attention.weight': torch.zeros(3)},
     r'unknown key: layer1\.0\.attention\.weight'),
    (_wrong_shape, r'shape mismatch: layer2\.1\.conv2\.weight \(16, 16, 1, 3\)'),
])
def test_bad_state_dict_is_an_error_and_writes_nothing(plain_state, edit, match, tmp_path):
  state = edit(dict(plain_state))
  state['layer4.0.bn3.bias'] = torch.zeros(5)  # a second problem: both must be listed
  path = str(tmp_path / 'resnet50.pth')
  torch.save(state, path)
  before = set(os.listdir(tmp_path))
  with pytest.raises(ValueError, match=match) as error:
    convert.convert_file(path, str(tmp_path / 'out'), _model_config())
  assert 'layer4.0.bn3.bias (5,)' in str(error.value) and path in str(error.value)
  _assert_nothing_written(tmp_path, before, str(tmp_path / 'out'))


def _write_garbage(path):
  with open(path, 'wb') as f:
    f.write(b'\x00this is not a checkpoint' * 10)


@pytest.mark.parametrize('name,write,match', [
    ('bytes.pth', _write_garbage, 'not a checkpoint torch.load'),
    ('bytes.safetensors', _write_garbage, 'not a readable .safetensors'),
    ('list.pth', lambda p: torch.save([torch.zeros(2)], p), 'holds a list'),
    ('strings.pt', lambda p: torch.save({'a': 'b', 'c': torch.zeros(1)}, p),
     "not a state_dict: 1 entries are not tensors: 'a'"),
    ('empty.pth', lambda p: torch.save({}, p), 'state_dict is empty'),
    ('other.pth', lambda p: torch.save({'encoder.weight': torch.zeros(2)}, p),
     'no recognised layout'),
    ('weights.npz', lambda p: np.savez(p, a=np.zeros(2)), 'unknown checkpoint type'),
])
def test_not_a_checkpoint_is_an_error_and_writes_nothing(name, write, match, tmp_path):
  path = str(tmp_path / name)
  write(path)
  before = set(os.listdir(tmp_path))
  with pytest.raises(ValueError, match=match) as error:
    convert.convert_file(path, str(tmp_path / 'out'), _model_config())
  assert path in str(error.value)
  _assert_nothing_written(tmp_path, before, str(tmp_path / 'out'))


def test_format_and_config_mismatches(plain_state, tmp_path):
  """Wrong ibn_mode for a file, a missing file, loading for another model, overwriting."""
  path = str(tmp_path / 'resnet50.pth')
  torch.save(plain_state, path)
  with pytest.raises(ValueError, match="ibn_mode='s', which accepts IBN-a"):
    convert.convert_file(path, str(tmp_path / 'out'), _model_config(ibn_mode='s'))
  with pytest.raises(FileNotFoundError, match='missing.pth'):
    convert.convert_file(str(tmp_path / 'missing.pth'), str(tmp_path / 'out'), _model_config())
  assert not os.path.exists(tmp_path / 'out')
  out = str(tmp_path / 'out')
  convert.convert_file(path, out, _model_config())
  with pytest.raises(ValueError, match=r"config.model.ibn_mode='a' \(converted for 'none'\)"):
    convert.load_variables(out, _model_config(ibn_mode='a'))
  with pytest.raises(FileNotFoundError, match='nowhere'):
    convert.load_variables(str(tmp_path / 'nowhere'))
  with pytest.raises(FileExistsError, match='not empty'):
    convert.convert_file(path, out, _model_config())
  convert.convert_file(path, out, _model_config(in_channels=3), overwrite=True)
  assert convert.read_manifest(out)['model_config']['in_channels'] == 3
  assert sorted(os.listdir(tmp_path)) == ['out', 'resnet50.pth']
  deeplab = ref.DeepLab('resnet50', 'a', 16, (1, 2, 4), 4, 7, 3, WIDTH, 16, 16, 8)
  torch.save(deeplab.state_dict(), str(tmp_path / 'deeplab.pth'))
  with pytest.raises(ValueError, match="IBN-a.*ibn_mode='s'.*trained with"):
    convert.convert_file(str(tmp_path / 'deeplab.pth'), str(tmp_path / 'out2'),
                         _model_config(ibn_mode='s'))


@pytest.mark.slow
def test_cli_converts_safetensors_without_torch(plain_state, tmp_path):
  """scripts/convert_torch_weights.py with ``import torch`` blocked: .safetensors converts; a
  .pth is a clear error."""
  source = str(tmp_path / 'resnet50.safetensors')
  _save_safetensors(plain_state, source)
  torch.save(plain_state, str(tmp_path / 'resnet50.pth'))
  out = str(tmp_path / 'converted')
  code = f"""
import runpy, sys
sys.modules['torch'] = None
from agrivision_jax import convert
try:
  convert.read_checkpoint({str(tmp_path / 'resnet50.pth')!r})
  raise AssertionError('a .pth without torch must fail')
except ValueError as e:
  assert 'needs PyTorch' in str(e), e
sys.argv = ['convert_torch_weights.py', '--config=configs/resnet.py:depth=50,modality=rgb',
            '--config.model.width={WIDTH}', '--input={source}', '--output={out}']
runpy.run_path('scripts/convert_torch_weights.py', run_name='__main__')
"""
  env = {**os.environ, 'PYTHONPATH': REPO, 'JAX_PLATFORMS': 'cpu'}
  result = subprocess.run([sys.executable, '-c', code], cwd=REPO, env=env, capture_output=True,
                          text=True, timeout=300)
  assert result.returncode == 0, result.stderr[-3000:]
  assert 'flax leaves' in result.stdout and 'fc.weight (10, 256): ImageNet classifier' in (
      result.stdout)
  with open(os.path.join(out, 'report.txt')) as f:
    assert f.read() == result.stdout
  with open(os.path.join(out, 'report.json')) as f:
    report = json.load(f)
  assert report['input']['container'] == 'safetensors'
  assert report['model_config']['in_channels'] == 3 and report['model_config']['width'] == WIDTH
  variables = convert.load_variables(out, report['model_config'])
  np.testing.assert_array_equal(variables['batch_stats']['backbone']['layer1_0']['bn1']['mean'],
                                plain_state['layer1.0.bn1.running_mean'].numpy())


# ------------------------------------------------------------------ published ImageNet key sets
# The files users download: torchvision's resnet50-19c8e357.pth / resnet101-5d3b4d8f.pth (saved
# before BatchNorm had a num_batches_tracked counter) and IBN-Net's v1.0 release
# resnet{50,101}_ibn_{a,b}.pth (with counters). Their modules, restated from torchvision's
# resnet.py and IBN-Net's ibnnet/resnet_ibn.py + ibnnet/modules.py (XingangPan/IBN-Net).


class _PublishedIBN(torch.nn.Module):
  """IBN-Net's IBN: InstanceNorm2d(half, affine=True) 'IN' | BatchNorm2d(rest) 'BN'."""

  def __init__(self, planes):
    super().__init__()
    self.IN = torch.nn.InstanceNorm2d(planes // 2, affine=True)
    self.BN = torch.nn.BatchNorm2d(planes - planes // 2)


class _PublishedBottleneck(torch.nn.Module):
  """IBN-Net's Bottleneck_IBN (torchvision's Bottleneck when ibn is None)."""

  def __init__(self, inplanes, planes, ibn, downsample):
    super().__init__()
    self.conv1 = torch.nn.Conv2d(inplanes, planes, 1, bias=False)
    self.bn1 = _PublishedIBN(planes) if ibn == 'a' else torch.nn.BatchNorm2d(planes)
    self.conv2 = torch.nn.Conv2d(planes, planes, 3, padding=1, bias=False)
    self.bn2 = torch.nn.BatchNorm2d(planes)
    self.conv3 = torch.nn.Conv2d(planes, planes * 4, 1, bias=False)
    self.bn3 = torch.nn.BatchNorm2d(planes * 4)
    if ibn == 'b':
      self.IN = torch.nn.InstanceNorm2d(planes * 4, affine=True)
    self.downsample = downsample


class _PublishedResNet(torch.nn.Module):
  """IBN-Net's ResNet_IBN(Bottleneck_IBN, layers, ibn_cfg) with a stem ``width`` (64 there);
  ibn_cfg (None,) * 4 is torchvision's ResNet, ('a', 'a', 'a', None) IBN-a, ('b', 'b', None,
  None) IBN-b."""

  def __init__(self, layers, ibn_cfg, width=64, num_classes=1000):
    super().__init__()
    self.inplanes = width
    self.conv1 = torch.nn.Conv2d(3, width, 7, stride=2, padding=3, bias=False)
    self.bn1 = (torch.nn.InstanceNorm2d(width, affine=True) if ibn_cfg[0] == 'b'
                else torch.nn.BatchNorm2d(width))
    for stage, (blocks, ibn) in enumerate(zip(layers, ibn_cfg)):
      planes = width * 2 ** stage
      downsample = torch.nn.Sequential(
          torch.nn.Conv2d(self.inplanes, planes * 4, 1, stride=1 if stage == 0 else 2,
                          bias=False),
          torch.nn.BatchNorm2d(planes * 4))
      modules = [_PublishedBottleneck(self.inplanes, planes, None if ibn == 'b' else ibn,
                                      downsample)]
      self.inplanes = planes * 4
      modules += [_PublishedBottleneck(self.inplanes, planes,
                                       None if (ibn == 'b' and i < blocks - 1) else ibn, None)
                  for i in range(1, blocks)]
      setattr(self, f'layer{stage + 1}', torch.nn.Sequential(*modules))
    self.fc = torch.nn.Linear(self.inplanes, num_classes)


_PUBLISHED_FILES = {  # file -> (ibn_cfg, has num_batches_tracked)
    'torchvision': ((None,) * 4, False),
    'ibn_a': (('a', 'a', 'a', None), True),
    'ibn_b': (('b', 'b', None, None), True),
}
_TARGETS = {'torchvision': ('none',), 'ibn_a': ('a', 's'), 'ibn_b': ('b',)}


def _published_state(arch: str, source: str, device: str = 'cpu') -> dict[str, torch.Tensor]:
  ibn_cfg, counters = _PUBLISHED_FILES[source]
  with torch.device(device):
    net = _PublishedResNet(ref.ARCH_LAYERS[arch], ibn_cfg)
  state = net.state_dict()
  if device != 'meta':
    gen = torch.Generator().manual_seed(11)
    state = {k: torch.rand(v.shape, generator=gen) + 0.5 if v.is_floating_point() else v
             for k, v in state.items()}
  return {k: v for k, v in state.items() if counters or not k.endswith('num_batches_tracked')}


def _expected_ignored(key: str, mode: str) -> bool:
  return (key.startswith('fc.') or key.endswith('num_batches_tracked')
          or (mode == 's' and ('.bn1.IN.' in key or '.bn1.BN.' in key)))


def _check_accounting(plan, state_keys, config, mode):
  """Every source tensor used or ignored for its reason; every leaf filled or fresh for its."""
  assert plan.used.keys() | plan.ignored.keys() == set(state_keys)
  assert not plan.used.keys() & plan.ignored.keys()
  assert set(plan.ignored) == {k for k in state_keys if _expected_ignored(k, mode)}
  template = convert.variable_shapes(config)
  filled = [path for path, _ in plan.used.values()]
  assert len(set(filled)) == len(filled)
  assert set(filled) | set(plan.fresh) == set(template) and not set(filled) & set(plan.fresh)
  sn = {p for p in template if ('params',) + p[1:-1] + ('mean_weight',) in template}
  assert set(plan.fresh) == {p for p in template if p[1] != 'backbone'} | (
      sn if mode == 's' else set())
  assert sn if mode == 's' else not sn


@pytest.mark.slow
@pytest.mark.parametrize('arch', ['resnet50', 'resnet101'])
def test_published_imagenet_key_sets_full_width(arch):
  """The exact key set and shapes of each downloadable file (shapes only) plans for its rows:
  torchvision -> none, IBN-a -> a and s (SN fresh), IBN-b -> b, with in_channels 4."""
  blocks = sum(ref.ARCH_LAYERS[arch])
  for source, modes in _TARGETS.items():
    shapes = {k: tuple(v.shape) for k, v in _published_state(arch, source, 'meta').items()}
    if source == 'torchvision':  # conv weight + 4 BN tensors per conv; fc weight and bias
      assert len(shapes) == (1 + 3 * blocks + 4) * 5 + 2
      assert shapes['fc.weight'] == (1000, 2048) and shapes['conv1.weight'] == (64, 3, 7, 7)
    if source == 'ibn_a':
      assert shapes['layer3.5.bn1.IN.weight'] == (128,)
      assert shapes['layer3.5.bn1.BN.running_var'] == (128,)
      assert 'layer4.0.bn1.running_mean' in shapes and 'bn1.running_mean' in shapes
    if source == 'ibn_b':
      assert shapes['bn1.weight'] == (64,) and 'bn1.running_mean' not in shapes
      assert shapes['layer1.2.IN.weight'] == (256,) and shapes['layer2.3.IN.bias'] == (512,)
      assert not any('.IN.' in k for k in shapes if k.startswith(('layer1.1.', 'layer3.')))
    for mode in modes:
      config = _model_config(arch=arch, ibn_mode=mode, width=64, aspp_channels=256,
                             decoder_channels=256, low_level_channels=48)
      plan = convert.plan_conversion(shapes, config, name=f'{source}.pth')
      _check_accounting(plan, shapes, config, mode)
      assert plan.layout.arch == arch and plan.layout.in_channels == 3
      assert plan.used['conv1.weight'][1].endswith('(NIR) = R filter')


@pytest.mark.slow
@pytest.mark.parametrize('container', ['pth', 'safetensors'])
def test_published_imagenet_files_convert_every_tensor(container, tmp_path):
  """Full-size ResNet-50 files with each published key set, random values, as .pth and
  .safetensors: every tensor is converted (values moved exactly) or ignored for its reason."""
  for source, modes in _TARGETS.items():
    state = _published_state('resnet50', source)
    path = str(tmp_path / f'{source}.{container}')
    if container == 'pth':
      torch.save(state, path)
    else:
      _save_safetensors(state, path)
    tensors = convert.read_checkpoint(path).tensors
    assert tensors.keys() == state.keys()
    for mode in modes:
      config = _model_config(ibn_mode=mode, width=64, aspp_channels=256, decoder_channels=256,
                             low_level_channels=48)
      conversion = convert.convert_state_dict(tensors, config, name=path)
      _check_accounting(conversion.plan, state, config, mode)
      flat = _flat(conversion.variables)
      for key, (leaf, transform) in conversion.plan.used.items():
        value = state[key].numpy()
        if transform.startswith('OIHW->HWIO'):
          if 'NIR' in transform:
            value = np.concatenate([value, value[:, :1]], axis=1)
          value = np.transpose(value, (2, 3, 1, 0))
        np.testing.assert_array_equal(flat['/'.join(leaf)], value, err_msg=key)
    os.remove(path)
