"""PyTorch reference modules (NCHW), written for the tests from the published definitions.

* ``SwitchNorm2d``: the Switchable Normalization layer of Luo et al. (switchable_norm.py).
* ``IBN`` and ``Bottleneck``: IBN-Net's (Pan et al.) IBN-a split and bottleneck, with the
  authors' (LAOS-Y/AgriVision) IBN-b / IBN-ab placement and IBN-s (SN instead of IBN).
* ``ResNet``: the authors' dilated ResNet with the multi-grid stage 4; key names as torchvision /
  IBN-Net (conv1, bn1, layer1.0.conv1, layer1.0.downsample.0, bn1.IN, bn1.BN, ...).
* ``ASPP``, ``Decoder``, ``DeepLab``: the authors' DeepLabV3+ head and key names (aspp.aspp1.
  atrous_conv, aspp.global_avg_pool.1, decoder.bottlenecks.0.0, decoder.last_conv.8, ...).

Channel counts take a ``width`` (stem width) so tests can build tiny models; the dropout rates are
arguments so train-mode outputs can be compared with dropout off. ``flax_variables`` copies a
reference's weights into a flax module with the project's converter; ``assert_close`` is the
parity criterion.
"""
import math

import jax
import jax.numpy as jnp
import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F

from agrivision_jax.convert import state_dict_to_variables

ARCH_LAYERS = {'resnet20': (1, 1, 1, 3), 'resnet50': (3, 4, 6, 3), 'resnet101': (3, 4, 23, 3)}


class SwitchNorm2d(nn.Module):
  """Switchable Normalization: mix of IN, LN, BN mean/variance with softmax weights."""

  def __init__(self, num_features, eps=1e-5, momentum=0.9, using_moving_average=True,
               using_bn=True):
    super().__init__()
    self.eps = eps
    self.momentum = momentum
    self.using_moving_average = using_moving_average
    self.using_bn = using_bn
    self.weight = nn.Parameter(torch.ones(1, num_features, 1, 1))
    self.bias = nn.Parameter(torch.zeros(1, num_features, 1, 1))
    num_terms = 3 if using_bn else 2
    self.mean_weight = nn.Parameter(torch.ones(num_terms))
    self.var_weight = nn.Parameter(torch.ones(num_terms))
    if using_bn:
      self.register_buffer('running_mean', torch.zeros(1, num_features, 1))
      self.register_buffer('running_var', torch.zeros(1, num_features, 1))

  def forward(self, x):
    n, c, h, w = x.shape
    x = x.view(n, c, -1)
    mean_in = x.mean(-1, keepdim=True)
    var_in = x.var(-1, keepdim=True)  # unbiased
    mean_ln = mean_in.mean(1, keepdim=True)
    temp = var_in + mean_in ** 2
    var_ln = temp.mean(1, keepdim=True) - mean_ln ** 2
    mean_weight = torch.softmax(self.mean_weight, 0)
    var_weight = torch.softmax(self.var_weight, 0)
    mean = mean_weight[0] * mean_in + mean_weight[1] * mean_ln
    var = var_weight[0] * var_in + var_weight[1] * var_ln
    if self.using_bn:
      if self.training:
        mean_bn = mean_in.mean(0, keepdim=True)
        var_bn = temp.mean(0, keepdim=True) - mean_bn ** 2
        with torch.no_grad():
          if self.using_moving_average:
            self.running_mean.mul_(self.momentum).add_((1 - self.momentum) * mean_bn)
            self.running_var.mul_(self.momentum).add_((1 - self.momentum) * var_bn)
          else:
            self.running_mean.add_(mean_bn)
            self.running_var.add_(mean_bn ** 2 + var_bn)
      else:
        mean_bn, var_bn = self.running_mean, self.running_var
      mean = mean + mean_weight[2] * mean_bn
      var = var + var_weight[2] * var_bn
    x = (x - mean) / (var + self.eps).sqrt()
    return x.view(n, c, h, w) * self.weight + self.bias


class IBN(nn.Module):
  """IBN-a: InstanceNorm on the first int(planes/2) channels, BatchNorm on the rest."""

  def __init__(self, planes):
    super().__init__()
    self.half = int(planes / 2)
    self.IN = nn.InstanceNorm2d(self.half, affine=True)
    self.BN = nn.BatchNorm2d(planes - self.half)

  def forward(self, x):
    first, rest = torch.split(x, [self.half, x.shape[1] - self.half], 1)
    return torch.cat((self.IN(first.contiguous()), self.BN(rest.contiguous())), 1)


def _bn1(planes, ibn_mode):
  if ibn_mode in ('a', 'ab'):
    return IBN(planes)
  if ibn_mode == 's':
    return SwitchNorm2d(planes)
  return nn.BatchNorm2d(planes)


class Bottleneck(nn.Module):
  """Bottleneck; ibn_mode per block: none | a | s | b (IN after add) | ab (IBN + IN after add)."""
  expansion = 4

  def __init__(self, inplanes, planes, stride=1, dilation=1, downsample=None, ibn_mode='none'):
    super().__init__()
    self.conv1 = nn.Conv2d(inplanes, planes, 1, bias=False)
    self.bn1 = _bn1(planes, ibn_mode)
    self.conv2 = nn.Conv2d(planes, planes, 3, stride=stride, dilation=dilation, padding=dilation,
                           bias=False)
    self.bn2 = nn.BatchNorm2d(planes)
    self.conv3 = nn.Conv2d(planes, planes * 4, 1, bias=False)
    self.bn3 = nn.BatchNorm2d(planes * 4)
    self.IN = nn.InstanceNorm2d(planes * 4, affine=True) if ibn_mode in ('b', 'ab') else None
    self.relu = nn.ReLU()
    self.downsample = downsample

  def forward(self, x):
    out = self.relu(self.bn1(self.conv1(x)))
    out = self.relu(self.bn2(self.conv2(out)))
    out = self.bn3(self.conv3(out))
    residual = x if self.downsample is None else self.downsample(x)
    out = out + residual
    if self.IN is not None:
      out = self.IN(out)
    return self.relu(out)


def stage_block_modes(stage, num_blocks, ibn_mode):
  """Authors' per-block modes: stage 4 plain; 'b' plain in stage 3; 'ab' is 'a' in stage 3;
  'b'/'ab' put the IN after the add of the last block only."""
  if stage == 4 or (stage == 3 and ibn_mode == 'b'):
    ibn_mode = 'none'
  if stage == 3 and ibn_mode == 'ab':
    ibn_mode = 'a'
  if ibn_mode == 'b':
    return ['none'] * (num_blocks - 1) + ['b']
  if ibn_mode == 'ab':
    return ['a'] * (num_blocks - 1) + ['ab']
  return [ibn_mode] * num_blocks


class ResNet(nn.Module):
  """Authors' dilated ResNet: returns (layer4, [layer1, layer2, layer3])."""

  def __init__(self, layers=(3, 4, 6, 3), ibn_mode='none', output_stride=16,
               multi_grid=(1, 2, 4), in_channels=3, width=64):
    super().__init__()
    strides, dilations = {32: ((1, 2, 2, 2), (1, 1, 1, 2)), 16: ((1, 2, 2, 1), (1, 1, 1, 2)),
                          8: ((1, 2, 1, 1), (1, 1, 2, 4))}[output_stride]
    self.inplanes = width
    self.conv1 = nn.Conv2d(in_channels, width, 7, stride=2, padding=3, bias=False)
    self.bn1 = nn.InstanceNorm2d(width, affine=True) if ibn_mode == 'b' else nn.BatchNorm2d(width)
    self.relu = nn.ReLU()
    self.maxpool = nn.MaxPool2d(3, stride=2, padding=1)
    grid = tuple(multi_grid) if multi_grid else (1, 1, 1)
    for stage in range(1, 5):
      num_blocks = len(grid) if stage == 4 else layers[stage - 1]
      block_dilations = ([g * dilations[3] for g in grid] if stage == 4
                         else [dilations[stage - 1]] * num_blocks)
      setattr(self, f'layer{stage}', self._make_layer(
          width * 2 ** (stage - 1), strides[stage - 1], block_dilations,
          stage_block_modes(stage, num_blocks, ibn_mode)))
    for m in self.modules():
      if isinstance(m, nn.Conv2d):
        n = m.kernel_size[0] * m.kernel_size[1] * m.out_channels
        m.weight.data.normal_(0, math.sqrt(2. / n))

  def _make_layer(self, planes, stride, dilations, modes):
    downsample = nn.Sequential(
        nn.Conv2d(self.inplanes, planes * 4, 1, stride=stride, bias=False),
        nn.BatchNorm2d(planes * 4))
    blocks = [Bottleneck(self.inplanes, planes, stride, dilations[0], downsample, modes[0])]
    self.inplanes = planes * 4
    for dilation, mode in zip(dilations[1:], modes[1:]):
      blocks.append(Bottleneck(self.inplanes, planes, 1, dilation, None, mode))
    return nn.Sequential(*blocks)

  def forward(self, x):
    x = self.maxpool(self.relu(self.bn1(self.conv1(x))))
    low_level = []
    for stage in (self.layer1, self.layer2, self.layer3):
      x = stage(x)
      low_level.append(x)
    return self.layer4(x), low_level


class _ASPPModule(nn.Module):

  def __init__(self, inplanes, planes, kernel_size, dilation):
    super().__init__()
    padding = 0 if kernel_size == 1 else dilation
    self.atrous_conv = nn.Conv2d(inplanes, planes, kernel_size, padding=padding,
                                 dilation=dilation, bias=False)
    self.bn = nn.BatchNorm2d(planes)
    self.relu = nn.ReLU()

  def forward(self, x):
    return self.relu(self.bn(self.atrous_conv(x)))


class ASPP(nn.Module):

  def __init__(self, inplanes, output_stride=16, channels=256, dropout=0.5):
    super().__init__()
    rates = [r * 16 // output_stride for r in (6, 12, 18)]
    self.aspp1 = _ASPPModule(inplanes, channels, 1, 1)
    self.aspp2 = _ASPPModule(inplanes, channels, 3, rates[0])
    self.aspp3 = _ASPPModule(inplanes, channels, 3, rates[1])
    self.aspp4 = _ASPPModule(inplanes, channels, 3, rates[2])
    self.global_avg_pool = nn.Sequential(nn.AdaptiveAvgPool2d((1, 1)),
                                         nn.Conv2d(inplanes, channels, 1, bias=False),
                                         nn.BatchNorm2d(channels), nn.ReLU())
    self.conv1 = nn.Conv2d(channels * 5, channels, 1, bias=False)
    self.bn1 = nn.BatchNorm2d(channels)
    self.relu = nn.ReLU()
    self.dropout = nn.Dropout(dropout)

  def forward(self, x):
    x1, x2, x3, x4 = self.aspp1(x), self.aspp2(x), self.aspp3(x), self.aspp4(x)
    x5 = F.interpolate(self.global_avg_pool(x), size=x4.shape[2:], mode='bilinear',
                       align_corners=True)
    x = torch.cat((x1, x2, x3, x4, x5), dim=1)
    return self.dropout(self.relu(self.bn1(self.conv1(x))))


class Decoder(nn.Module):

  def __init__(self, num_classes, low_level_inplanes, num_low_level_feat, low_level_channels=48,
               aspp_channels=256, channels=256, dropouts=(0.5, 0.1)):
    super().__init__()
    self.bottlenecks = nn.ModuleList([
        nn.Sequential(nn.Conv2d(low_level_inplanes * 2 ** i, low_level_channels, 1, bias=False),
                      nn.BatchNorm2d(low_level_channels), nn.ReLU())
        for i in range(num_low_level_feat)])
    self.last_conv = nn.Sequential(
        nn.Conv2d(aspp_channels + low_level_channels * num_low_level_feat, channels, 3,
                  padding=1, bias=False),
        nn.BatchNorm2d(channels), nn.ReLU(), nn.Dropout(dropouts[0]),
        nn.Conv2d(channels, channels, 3, padding=1, bias=False),
        nn.BatchNorm2d(channels), nn.ReLU(), nn.Dropout(dropouts[1]),
        nn.Conv2d(channels, num_classes, 1))

  def forward(self, x, low_level_feats):
    size = low_level_feats[0].shape[2:]
    feats = [F.interpolate(b(f), size=size, mode='bilinear', align_corners=True)
             for b, f in zip(self.bottlenecks, low_level_feats)]
    x = F.interpolate(x, size=size, mode='bilinear', align_corners=True)
    return self.last_conv(torch.cat((x, *feats), dim=1))


class DeepLab(nn.Module):
  """DeepLabV3+ (authors' naming): backbone, aspp, decoder; logits at the input size."""

  def __init__(self, arch='resnet101', ibn_mode='none', output_stride=16, multi_grid=(1, 2, 4),
               in_channels=4, num_classes=7, num_low_level_feat=3, width=64, aspp_channels=256,
               decoder_channels=256, low_level_channels=48, aspp_dropout=0.5,
               decoder_dropouts=(0.5, 0.1)):
    super().__init__()
    self.backbone = ResNet(ARCH_LAYERS[arch], ibn_mode, output_stride, multi_grid, in_channels,
                           width)
    self.aspp = ASPP(width * 32, output_stride, aspp_channels, aspp_dropout)
    self.decoder = Decoder(num_classes, width * 4, num_low_level_feat, low_level_channels,
                           aspp_channels, decoder_channels, decoder_dropouts)
    for module in (self.aspp, self.decoder):
      for m in module.modules():
        if isinstance(m, nn.Conv2d):
          nn.init.kaiming_normal_(m.weight)

  def forward(self, x):
    feats, low_level = self.backbone(x)
    out = self.decoder(self.aspp(feats), low_level)
    return F.interpolate(out, size=x.shape[2:], mode='bilinear', align_corners=True)


def randomize_(module: nn.Module, seed: int) -> nn.Module:
  """Draws every norm parameter and running statistic at random (conv weights keep their init),
  so that parity tests see non-trivial affine parameters, SN weights and running values."""
  gen = torch.Generator().manual_seed(seed)

  def uniform(t, low, high):
    t.copy_(torch.rand(t.shape, generator=gen) * (high - low) + low)

  norms = (nn.BatchNorm2d, nn.InstanceNorm2d, SwitchNorm2d)
  with torch.no_grad():
    for m in module.modules():
      if not isinstance(m, norms):
        continue
      for leaf, tensor in [*m.named_parameters(recurse=False), *m.named_buffers(recurse=False)]:
        if leaf in ('weight', 'running_var'):
          uniform(tensor, 0.5, 1.5)
        elif leaf in ('bias', 'running_mean'):
          uniform(tensor, -0.3, 0.3)
        elif leaf in ('mean_weight', 'var_weight'):
          uniform(tensor, -1.0, 1.0)
  return module


def numpy_state_dict(module: nn.Module) -> dict[str, np.ndarray]:
  """state_dict as float32 numpy arrays (num_batches_tracked included, as torch saves it)."""
  return {k: v.detach().cpu().numpy() for k, v in module.state_dict().items()}


def to_nchw(x: np.ndarray) -> torch.Tensor:
  """(B,H,W,C) numpy -> (B,C,H,W) torch tensor of the same float dtype."""
  return torch.from_numpy(np.ascontiguousarray(np.transpose(x, (0, 3, 1, 2))))


def to_nhwc(x: torch.Tensor) -> np.ndarray:
  """(B,C,H,W) torch tensor -> (B,H,W,C) numpy."""
  return np.transpose(x.detach().cpu().numpy(), (0, 2, 3, 1))


def flax_variables(torch_module: nn.Module, flax_module, images_nhwc: np.ndarray,
                   **call_kwargs) -> dict:
  """Copies ``torch_module``'s weights into ``flax_module``'s variable tree with
  ``agrivision_jax.convert.state_dict_to_variables`` (template from ``jax.eval_shape``)."""
  template = jax.eval_shape(
      lambda x: flax_module.init(jax.random.key(0), x, **call_kwargs), images_nhwc)
  return state_dict_to_variables(numpy_state_dict(torch_module), template)


def assert_close(actual, expected, rel: float = 1e-4, what: str = '') -> None:
  """max |actual - expected| <= rel * max |expected| (the output's scale)."""
  actual = np.asarray(actual, np.float64)
  expected = np.asarray(expected, np.float64)
  assert actual.shape == expected.shape, (what, actual.shape, expected.shape)
  scale = np.max(np.abs(expected))
  err = np.max(np.abs(actual - expected))
  assert err <= rel * scale, f'{what}: max abs err {err:.3g} > {rel} * scale {scale:.3g}'


def ref_to_numpy(value) -> np.ndarray:
  """A torch NCHW tensor -> NHWC numpy; a jax / numpy NHWC array -> numpy."""
  if isinstance(value, torch.Tensor):
    return to_nhwc(value) if value.dim() == 4 else value.detach().cpu().numpy()
  return np.asarray(value)


def check_parity(torch_module: nn.Module, flax_module, x_train: np.ndarray, x_eval: np.ndarray,
                 outputs, float64: bool = False, modes: tuple[str, ...] = ('train', 'eval')
                 ) -> object:
  """Parity of a train-mode forward (outputs and every updated running statistic), then of an
  eval-mode forward with the updated statistics (each when in ``modes``).

  Weights are copied from ``torch_module`` with the project's converter. In float32 the
  criterion is ``assert_close`` at 1e-4 of the output scale. With ``float64`` both sides run in
  float64 (torch ``.double()``, flax ``dtype=float64`` under ``jax.enable_x64``) and must agree
  to 1e-9: this checks the definitions exactly where float32 train-mode outputs of a deep net
  are already at the float32 noise floor (torch float32 differs from torch float64 by 1e-4).

  Args:
    torch_module, flax_module: the reference and the flax module (``apply(v, x, train=...)``).
    x_train, x_eval: NHWC float32 inputs.
    outputs: maps a module output (torch or flax) to a list of arrays to compare.
  Returns:
    The flax output of the last mode run.
  """
  variables = flax_variables(torch_module, flax_module, x_train, train=False)
  template = jax.eval_shape(lambda: variables)
  rel = 1e-9 if float64 else 1e-4
  dtype = np.float64 if float64 else np.float32
  with jax.enable_x64(float64):
    if float64:
      torch_module = torch_module.double()
      flax_module = flax_module.clone(dtype=jnp.float64)
      variables = jax.tree.map(lambda a: np.asarray(a, np.float64), variables)
    for is_train, x in [(mode == 'train', x_train if mode == 'train' else x_eval)
                        for mode in modes]:
      x = x.astype(dtype)
      torch_module.train(is_train)
      if is_train:
        y, updates = flax_module.apply(variables, x, train=True, mutable=['batch_stats'])
        variables = {**variables, **updates}
      else:
        y = flax_module.apply(variables, x, train=False)
      expected = torch_module(to_nchw(x).to(torch.float64 if float64 else torch.float32))
      mode = 'train' if is_train else 'eval'
      for index, (actual, want) in enumerate(zip(outputs(y), outputs(expected), strict=True)):
        assert_close(ref_to_numpy(actual), ref_to_numpy(want), rel, f'{mode} output {index}')
      if is_train:
        stats = state_dict_to_variables(numpy_state_dict(torch_module), template)['batch_stats']
        flat_actual = dict(jax.tree_util.tree_leaves_with_path(variables['batch_stats']))
        flat_expected = jax.tree_util.tree_leaves_with_path(stats)
        assert len(flat_expected) == len(flat_actual) > 0
        for path, value in flat_expected:
          # The converter stores float32: compare float64 statistics to that precision.
          assert_close(flat_actual[path], value, max(rel, 1e-6), jax.tree_util.keystr(path))
  return y


def torch_hybrid_loss(logits, labels, valid, lambda_dice: float = 1.0,
                      lambda_lovasz: float = 1.0):
  """The paper's hybrid loss in PyTorch, invalid pixels excluded from every term (the project's
  default): ``(BCE + l1 * Dice + l2 * Lovasz) / (1 + l1 + l2)``.

  BCE is ``BCEWithLogitsLoss`` averaged over valid elements; Dice one global soft Dice over valid
  pixels (eps 1e-7); Lovasz the binary Lovasz hinge (Berman et al.) per class over the whole
  batch, mean over classes, computed for all classes at once with one sort along the pixel axis.
  Invalid pixels are given error -inf and label 0, so they sort last with zero hinge and leave
  the Jaccard prefix terms of the valid pixels unchanged.

  Args:
    logits: (B, C, H, W) float tensor (any memory format).
    labels: (B, C, H, W) 0/1 float tensor.
    valid: (B, H, W) bool tensor.
  Returns:
    scalar float32 tensor.
  """
  logits = logits.float()
  mask = valid[:, None].expand_as(logits)
  maskf = mask.float()
  elements = F.binary_cross_entropy_with_logits(logits, labels, reduction='none')
  total = (elements * maskf).sum() / maskf.sum().clamp(min=1.0)
  if lambda_dice:
    probabilities = torch.sigmoid(logits) * maskf
    targets = labels * maskf
    dice = 1.0 - 2.0 * (probabilities * targets).sum() / (
        probabilities.sum() + targets.sum() + 1e-7)
    total = total + lambda_dice * dice
  if lambda_lovasz:
    classes = logits.shape[1]
    rows = lambda t: t.transpose(0, 1).reshape(classes, -1)
    errors = 1.0 - rows(logits) * (2.0 * rows(labels) - 1.0)
    errors = torch.where(rows(mask), errors, torch.full_like(errors, -math.inf))
    errors_sorted, permutation = torch.sort(errors, dim=1, descending=True)
    gt_sorted = torch.gather(rows(labels * maskf), 1, permutation)
    positives = gt_sorted.sum(1, keepdim=True)
    intersection = positives - gt_sorted.cumsum(1)
    union = positives + (1.0 - gt_sorted).cumsum(1)
    jaccard = 1.0 - intersection / union.clamp(min=1.0)
    gradient = torch.cat([jaccard[:, :1], jaccard[:, 1:] - jaccard[:, :-1]], 1)
    lovasz = (torch.relu(errors_sorted) * gradient).sum(1).mean()
    total = total + lambda_lovasz * lovasz
  return total / (1.0 + lambda_dice + lambda_lovasz)
