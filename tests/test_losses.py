"""Losses against independent references: PyTorch modules written here from the published
definitions (BCEWithLogitsLoss, the Dice formula, Berman et al.'s Lovasz hinge), a brute-force
Lovasz extension (maximum over all orderings, valid for the submodular Jaccard loss), finite
differences and hand-built invariances."""
import functools
import itertools

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import pytest
import torch

from agrivision_jax import losses


def _random_inputs(seed, shape=(3, 5, 7, 3), valid_fraction=0.8, scale=2.0):
  rng = np.random.default_rng(seed)
  logits = (rng.normal(size=shape) * scale).astype(np.float32)
  labels = (rng.random(shape) < 0.4).astype(np.float32)
  valid = rng.random(shape[:-1]) < valid_fraction
  return logits, labels, valid


# ----------------------------------------------------------------------------- PyTorch references


def _torch_lovasz_gradient(gt_sorted):
  """Berman et al., Alg. 1: gradient of the Lovasz extension of the Jaccard loss, sorted order."""
  positives = gt_sorted.sum()
  intersection = positives - gt_sorted.cumsum(0)
  union = positives + (1.0 - gt_sorted).cumsum(0)
  jaccard = 1.0 - intersection / union
  return torch.cat([jaccard[:1], jaccard[1:] - jaccard[:-1]])


def _torch_lovasz_flat(logits, labels):
  """Binary Lovasz hinge of 1-D logits and 0/1 labels: sort errors descending, dot with grad."""
  errors = 1.0 - logits * (2.0 * labels - 1.0)
  errors_sorted, permutation = torch.sort(errors, descending=True)
  return torch.dot(torch.relu(errors_sorted), _torch_lovasz_gradient(labels[permutation]))


def _torch_lovasz(logits, labels, valid, per_image):
  """Per class (whole batch, or per image over images with a valid pixel), mean over classes."""
  logits_t = torch.tensor(logits, dtype=torch.float64, requires_grad=True)
  labels_t = torch.tensor(labels, dtype=torch.float64)
  valid_t = torch.tensor(valid)
  class_losses = []
  for c in range(logits.shape[-1]):
    if per_image:
      images = [b for b in range(logits.shape[0]) if valid[b].any()]
      class_losses.append(torch.stack([
          _torch_lovasz_flat(logits_t[b, ..., c][valid_t[b]], labels_t[b, ..., c][valid_t[b]])
          for b in images]).mean())
    else:
      class_losses.append(_torch_lovasz_flat(logits_t[..., c][valid_t], labels_t[..., c][valid_t]))
  loss = torch.stack(class_losses).mean()
  loss.backward()
  return loss.item(), logits_t.grad.numpy()


@functools.partial(jax.jit, static_argnames=('function', 'options'))
def _jitted_value_and_grad(logits, labels, valid, function, options):
  return jax.value_and_grad(function)(logits, labels, valid, **dict(options))


def _jax_value_and_grad(function, logits, labels, valid, **kwargs):
  """(value, d value / d logits) of ``function(logits, labels, valid, **kwargs)``, jitted."""
  value, grad = _jitted_value_and_grad(logits, labels, valid, function=function,
                                       options=tuple(sorted(kwargs.items())))
  return float(value), np.asarray(grad)


@pytest.mark.parametrize('per_image', [False, True])
def test_lovasz_matches_torch_berman(per_image):
  logits, labels, valid = _random_inputs(0)
  labels[..., 2] = 0.0  # a class without positives
  if per_image:
    valid[1] = False  # an image without valid pixels is left out of the per-image mean
  expected_value, expected_grad = _torch_lovasz(logits, labels, valid, per_image)
  value, grad = _jax_value_and_grad(losses.lovasz_hinge, logits, labels, valid,
                                    per_image=per_image)
  np.testing.assert_allclose(value, expected_value, rtol=1e-5, atol=1e-6)
  np.testing.assert_allclose(grad, expected_grad, rtol=1e-5, atol=1e-7)
  value_only = jax.jit(losses.lovasz_hinge, static_argnames='per_image')(
      logits, labels, valid, per_image=per_image)  # the forward-only (single sort) path
  np.testing.assert_allclose(float(value_only), expected_value, rtol=1e-5, atol=1e-6)


# ----------------------------------------------------------------------------- brute force


def _jaccard_loss(mispredicted, positives):
  """Delta_J(M) = |M| / |positives u M| (Berman et al., eq. 3); 0 for an empty union."""
  union = positives | mispredicted
  return len(mispredicted) / len(union) if union else 0.0


def _brute_force_lovasz_extension(hinges, positives):
  """Lovasz extension of the submodular Jaccard loss at ``hinges``: the maximum over every
  ordering of sum_i hinge[s_i] * (Delta({s_1..s_i}) - Delta({s_1..s_i-1})) (Edmonds' greedy
  vertices of the base polytope), enumerated without sorting."""
  best = -np.inf
  for order in itertools.permutations(range(len(hinges))):
    total, previous, prefix = 0.0, 0.0, set()
    for index in order:
      prefix.add(index)
      current = _jaccard_loss(prefix, positives)
      total += hinges[index] * (current - previous)
      previous = current
    best = max(best, total)
  return best


def _brute_force_lovasz_hinge(logits, labels, valid, per_image):
  groups = [np.ones_like(valid)]
  if per_image:
    images = np.arange(len(valid))[:, None, None]
    groups = [images == b for b in range(len(valid)) if valid[b].any()]
  class_losses = []
  for c in range(logits.shape[-1]):
    group_losses = []
    for group in groups:
      mask = valid & group
      x, y = logits[..., c][mask], labels[..., c][mask]
      hinges = np.maximum(1.0 - x.astype(np.float64) * (2.0 * y - 1.0), 0.0)
      group_losses.append(_brute_force_lovasz_extension(hinges, set(np.flatnonzero(y > 0.5))))
    class_losses.append(np.mean(group_losses))
  return float(np.mean(class_losses))


@pytest.mark.parametrize('per_image', [False, True])
@pytest.mark.parametrize('seed', [1, 2, 3])
def test_lovasz_equals_brute_force_extension(per_image, seed):
  rng = np.random.default_rng(seed)
  shape = (2, 2, 3, 2)  # per class: 12 pixels, some invalid
  if seed == 3:  # ties and zero errors: logits on a coarse grid
    logits = rng.choice(np.float32([-1.0, 0.0, 0.5, 1.0, 2.0]), size=shape)
  else:
    logits = (rng.normal(size=shape) * 1.5).astype(np.float32)
  labels = (rng.random(shape) < 0.5).astype(np.float32)
  # 7 valid pixels (7! orderings per class) spread over both images
  valid = (rng.permutation(12) < 7).reshape(shape[:-1])
  expected = _brute_force_lovasz_hinge(logits, labels, valid, per_image)
  value = jax.jit(losses.lovasz_hinge, static_argnames='per_image')(
      logits, labels, valid, per_image=per_image)
  np.testing.assert_allclose(float(value), expected, rtol=1e-5, atol=1e-6)


# ----------------------------------------------------------------------------- gradients


def _separated_logits(rng, shape):
  """Logits 0.1 k + 0.037 with distinct k per class: errors of a class differ by >= 0.026 and lie
  >= 0.037 from 0, so +-0.01 perturbations cross no sort boundary or hinge kink."""
  count = int(np.prod(shape[:-1]))
  columns = [rng.permutation(count) - count // 2 for _ in range(shape[-1])]
  return (0.1 * np.stack(columns, axis=-1) + 0.037).reshape(shape).astype(np.float32)


@pytest.mark.parametrize('per_image', [False, True])
def test_lovasz_gradient_matches_finite_differences(per_image):
  rng = np.random.default_rng(4)
  shape = (2, 3, 4, 2)
  logits = _separated_logits(rng, shape)
  labels = (rng.random(shape) < 0.5).astype(np.float32)
  valid = rng.random(shape[:-1]) < 0.75
  loss = jax.jit(lambda x: losses.lovasz_hinge(x, labels, valid, per_image=per_image))
  grad = np.asarray(jax.jit(jax.grad(loss))(logits))
  step = 0.01
  numeric = np.zeros_like(grad)
  for index in np.ndindex(shape):
    plus, minus = logits.copy(), logits.copy()
    plus[index] += step
    minus[index] -= step
    numeric[index] = (float(loss(plus)) - float(loss(minus))) / (2 * step)
  np.testing.assert_allclose(grad, numeric, atol=2e-4)
  assert np.all(grad[~valid] == 0.0)
  assert np.abs(grad).max() > 1e-3


def _sequential_lovasz_gradient(errors, labels, order):
  """d loss / d error of one row for one tie-breaking ``order`` (Berman et al., Alg. 1)."""
  gradient = _torch_lovasz_gradient(torch.tensor(labels[order], dtype=torch.float64)).numpy()
  per_element = np.zeros_like(errors)
  per_element[order] = gradient * (errors[order] > 0)
  return per_element


def test_lovasz_gradient_at_ties_is_the_mean_over_tie_orders():
  # Logits from a few exact values, so many pixels share an error. The Lovasz extension is
  # piecewise linear; at ties its subgradients are the sequential gradients of every tie order,
  # and their mean is one of them (a valid subgradient). Reference: that mean by enumeration.
  rng = np.random.default_rng(11)
  logits = rng.choice(np.float32([-0.5, 1.0]), size=(1, 2, 5, 1))
  labels = (rng.random(logits.shape) < 0.5).astype(np.float32)
  labels.reshape(-1)[:2] = (0.0, 1.0)
  valid = np.ones(logits.shape[:-1], bool)
  valid[0, 1, 4] = False
  errors = (1.0 - logits * (2 * labels - 1)).reshape(-1)[valid.reshape(-1)].astype(np.float64)
  flat_labels = labels.reshape(-1)[valid.reshape(-1)]
  # Groups of equal (error, label), in the kernel's order: error descending, negatives first.
  groups = {}
  for i, key in enumerate(zip(-errors, flat_labels)):
    groups.setdefault(key, []).append(i)
  group_order = [groups[key] for key in sorted(groups)]
  assert max(len(group) for group in group_order) >= 3
  tie_orders = itertools.product(*(itertools.permutations(group) for group in group_order))
  sequential = [_sequential_lovasz_gradient(errors, flat_labels, list(itertools.chain(*order)))
                for order in tie_orders]
  expected_error_gradient = np.mean(sequential, axis=0)
  _, grad = _jax_value_and_grad(losses.lovasz_hinge, logits, labels, valid)
  sign = 2 * flat_labels - 1
  np.testing.assert_allclose(grad.reshape(-1)[valid.reshape(-1)],
                             -sign * expected_error_gradient, rtol=1e-5, atol=1e-7)


@pytest.mark.parametrize('per_image', [False, True])
def test_lovasz_ignores_invalid_pixels(per_image):
  logits, labels, valid = _random_inputs(5, shape=(2, 4, 5, 3))
  reference_value, reference_grad = _jax_value_and_grad(
      losses.lovasz_hinge, logits, labels, valid, per_image=per_image)
  rng = np.random.default_rng(6)
  extra_images = 1 if per_image else 0  # plus one image with no valid pixel at all
  padded_shape = (2 + extra_images, 4, 8, 3)
  for fill_scale in (3.0, 1e4):
    padded_logits = (rng.normal(size=padded_shape) * fill_scale).astype(np.float32)
    padded_labels = (rng.random(padded_shape) < 0.5).astype(np.float32)
    padded_valid = np.zeros(padded_shape[:-1], bool)
    padded_logits[:2, :, :5] = logits
    padded_labels[:2, :, :5] = labels
    padded_valid[:2, :, :5] = valid
    value, grad = _jax_value_and_grad(losses.lovasz_hinge, padded_logits, padded_labels,
                                      padded_valid, per_image=per_image)
    np.testing.assert_allclose(value, reference_value, rtol=1e-6)
    np.testing.assert_allclose(grad[:2, :, :5], reference_grad, rtol=1e-6, atol=1e-9)
    assert np.all(grad[~padded_valid] == 0.0)


def test_losses_of_an_all_invalid_batch():
  logits, labels, _ = _random_inputs(7, shape=(2, 3, 4, 2))
  valid = np.zeros(logits.shape[:-1], bool)
  for function in (losses.bce, losses.lovasz_hinge):
    value, grad = _jax_value_and_grad(function, logits, labels, valid)
    assert value == 0.0 and np.all(grad == 0.0)
  value, grad = _jax_value_and_grad(losses.dice, logits, labels, valid)
  assert value == 1.0 and np.all(grad == 0.0)


# ----------------------------------------------------------------------------- BCE and Dice


def test_bce_matches_torch_on_valid_elements():
  logits, labels, valid = _random_inputs(8, scale=4.0)
  logits_t = torch.tensor(logits, requires_grad=True)
  expected = torch.nn.BCEWithLogitsLoss()(logits_t[torch.tensor(valid)],
                                          torch.tensor(labels)[torch.tensor(valid)])
  expected.backward()
  value, grad = _jax_value_and_grad(losses.bce, logits, labels, valid)
  np.testing.assert_allclose(value, expected.item(), rtol=1e-6)
  np.testing.assert_allclose(grad, logits_t.grad.numpy(), rtol=1e-5, atol=1e-9)


def test_bce_over_all_pixels_reproduces_the_authors_recipe():
  """train.py: pred[~mask] = -2**15; label *= mask; BCEWithLogitsLoss() over every element."""
  logits, labels, valid = _random_inputs(9, scale=4.0)
  logits_t = torch.tensor(logits, requires_grad=True)
  mask = torch.tensor(valid)[..., None].expand(logits.shape)
  masked = logits_t.clone()
  masked[~mask] = -2.0**15
  expected = torch.nn.BCEWithLogitsLoss()(masked, torch.tensor(labels) * mask)
  expected.backward()
  value, grad = _jax_value_and_grad(losses.bce, logits, labels, valid, over_all_pixels=True)
  np.testing.assert_allclose(value, expected.item(), rtol=1e-6)
  np.testing.assert_allclose(grad, logits_t.grad.numpy(), rtol=1e-5, atol=1e-9)


@pytest.mark.parametrize('per_class', [False, True])
def test_dice_matches_formula(per_class):
  logits, labels, valid = _random_inputs(10)
  p = 1.0 / (1.0 + np.exp(-logits.astype(np.float64)))
  p, t = p[valid], labels.astype(np.float64)[valid]  # (valid pixels, C)
  axis = 0 if per_class else None
  expected = 1.0 - np.mean(2.0 * (p * t).sum(axis) / (p.sum(axis) + t.sum(axis) + 1e-7))
  value = jax.jit(losses.dice, static_argnames='per_class')(logits, labels, valid,
                                                             per_class=per_class)
  np.testing.assert_allclose(float(value), expected, rtol=1e-6)


def test_dice_gradient_matches_torch():
  logits, labels, valid = _random_inputs(11)
  logits_t = torch.tensor(logits, requires_grad=True)
  mask = torch.tensor(valid)[..., None].double()
  p = torch.sigmoid(logits_t.double()) * mask
  t = torch.tensor(labels).double() * mask
  expected = 1.0 - 2.0 * (p * t).sum() / (p.sum() + t.sum() + 1e-7)
  expected.backward()
  value, grad = _jax_value_and_grad(losses.dice, logits, labels, valid)
  np.testing.assert_allclose(value, expected.item(), rtol=1e-6)
  np.testing.assert_allclose(grad, logits_t.grad.numpy(), rtol=1e-4, atol=1e-9)


# ----------------------------------------------------------------------------- hybrid, config


def test_hybrid_combines_the_terms():
  logits, labels, valid = _random_inputs(12)
  terms = jax.jit(lambda x: (losses.bce(x, labels, valid),
                             losses.dice(x, labels, valid, per_class=True),
                             losses.lovasz_hinge(x, labels, valid, per_image=True)))(logits)
  bce, dice, lovasz = (float(term) for term in terms)
  for lambda_dice, lambda_lovasz in [(0, 0), (1, 0), (0, 1), (1, 1), (0.5, 2.0)]:
    value = jax.jit(lambda x: losses.hybrid(x, labels, valid, lambda_dice, lambda_lovasz,
                                            lovasz_per_image=True, dice_per_class=True))(logits)
    numerator = bce + lambda_dice * dice + lambda_lovasz * lovasz
    np.testing.assert_allclose(float(value), numerator / (1 + lambda_dice + lambda_lovasz),
                               rtol=1e-6)


def _loss_config(**overrides):
  fields = dict(lambda_dice=1.0, lambda_lovasz=1.0, lovasz_per_image=False,
                dice_per_class=False, bce_over_all_pixels=True, group_size=0)
  return ml_collections.ConfigDict({**fields, **overrides})


def test_make_loss_follows_the_config():
  logits, labels, valid = _random_inputs(13)
  loss = losses.make_loss(_loss_config(lambda_dice=0.5, lovasz_per_image=True))
  expected = jax.jit(lambda x, y, v: losses.hybrid(x, y, v, 0.5, 1.0, lovasz_per_image=True,
                                                   bce_over_all_pixels=True))
  np.testing.assert_allclose(float(jax.jit(loss)(logits, labels, valid)),
                             float(expected(logits, labels, valid)), rtol=1e-6)


# ----------------------------------------------------------------------------- loss groups


def _data_mesh():
  return jax.make_mesh((8,), ('data',), axis_types=(jax.sharding.AxisType.Auto,))


def _shard(mesh, *arrays):
  data = jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec('data'))
  return [jax.device_put(array, data) for array in arrays]


def _looped_group_loss(config, logits, labels, valid):
  """Reference: a Python loop over the groups, each group's ``hybrid`` and its gradient, then
  the mean over groups (value and d value / d logits)."""
  size = config.group_size or len(logits)
  group = jax.jit(jax.value_and_grad(functools.partial(
      losses.hybrid, lambda_dice=config.lambda_dice, lambda_lovasz=config.lambda_lovasz,
      lovasz_per_image=config.lovasz_per_image, dice_per_class=config.dice_per_class,
      bce_over_all_pixels=config.bce_over_all_pixels)))
  values, grads = [], []
  for start in range(0, len(logits), size):
    part = slice(start, start + size)
    value, grad = group(logits[part], labels[part], valid[part])
    values.append(float(value))
    grads.append(np.asarray(grad))
  return np.mean(values), np.concatenate(grads) / len(values)


@pytest.mark.parametrize('group_size, options', [
    (0, dict()),
    (2, dict()),                                                 # = the per-device batch
    (1, dict(lovasz_per_image=True, dice_per_class=True)),       # two groups per device
    (4, dict(bce_over_all_pixels=False, lambda_dice=0.5)),       # a group spans two devices
])
def test_group_loss_on_a_sharded_batch_equals_a_loop_over_groups(group_size, options):
  logits, labels, valid = _random_inputs(17, shape=(16, 5, 7, 3))
  valid[3] = False  # an image without a valid pixel
  config = _loss_config(group_size=group_size, **options)
  mesh = _data_mesh()
  loss = losses.make_loss(config, mesh)
  value, grad = jax.jit(jax.value_and_grad(loss))(*_shard(mesh, logits, labels, valid))
  expected_value, expected_grad = _looped_group_loss(config, logits, labels, valid)
  np.testing.assert_allclose(float(value), float(expected_value), rtol=1e-6)
  np.testing.assert_allclose(grad, expected_grad, rtol=1e-5, atol=1e-9)
  if group_size:  # the groups matter: one loss over the whole batch differs
    whole = float(jax.jit(losses.make_loss(_loss_config(**options)))(logits, labels, valid))
    assert abs(whole - float(value)) > 1e-4


def test_groups_within_device_shards_need_no_all_gather():
  logits, labels, valid = _random_inputs(18, shape=(16, 4, 6, 3))
  mesh = _data_mesh()
  sharded = _shard(mesh, logits, labels, valid)
  loss = losses.make_loss(_loss_config(group_size=2), mesh)
  compiled = jax.jit(jax.value_and_grad(loss)).lower(*sharded).compile().as_text()
  assert 'all-gather' not in compiled
  assert 'all-reduce' in compiled  # the one scalar pmean
  # The check can fail: one Lovasz sort over the whole batch gathers it.
  whole = jax.jit(jax.value_and_grad(losses.make_loss(_loss_config(), mesh)))
  assert 'all-gather' in whole.lower(*sharded).compile().as_text()


def test_group_loss_is_the_authors_ddp_objective():
  """Two GPUs of two images each, as the authors' train.py on each GPU: pred[~mask] = -2**15;
  label *= mask; (BCEWithLogitsLoss + DiceLoss + LovaszLossMultiLabel) / 3 over its own images,
  invalid pixels included; DDP averages the gradients, i.e. differentiates the mean loss."""
  logits, labels, valid = _random_inputs(19, shape=(4, 3, 5, 3), scale=3.0)
  logits_t = torch.tensor(logits, dtype=torch.float64, requires_grad=True)
  mask = torch.tensor(valid)[..., None].expand(logits.shape)
  gpu_losses = []
  for start in (0, 2):
    part = slice(start, start + 2)
    masked = logits_t[part].masked_fill(~mask[part], -2.0**15)
    target = torch.tensor(labels, dtype=torch.float64)[part] * mask[part]
    bce = torch.nn.functional.binary_cross_entropy_with_logits(masked, target)
    p = torch.sigmoid(masked)
    dice = 1.0 - 2.0 * (p * target).sum() / (p.sum() + target.sum() + 1e-7)
    lovasz = torch.stack([_torch_lovasz_flat(masked[..., c].reshape(-1),
                                             target[..., c].reshape(-1))
                          for c in range(logits.shape[-1])]).mean()
    gpu_losses.append((bce + dice + lovasz) / 3.0)
  expected = torch.stack(gpu_losses).mean()
  expected.backward()
  loss = losses.make_loss(_loss_config(group_size=2, bce_over_all_pixels=True))
  value, grad = jax.jit(jax.value_and_grad(loss))(logits, labels, valid)
  np.testing.assert_allclose(float(value), expected.item(), rtol=1e-5)
  np.testing.assert_allclose(grad, logits_t.grad.numpy(), rtol=1e-4, atol=1e-8)


def test_group_size_must_divide_the_batch():
  logits, labels, valid = _random_inputs(20, shape=(6, 3, 4, 2))
  with pytest.raises(ValueError, match='config.loss.group_size=4'):
    losses.make_loss(_loss_config(group_size=4))(logits, labels, valid)


def test_bfloat16_logits_are_computed_in_float32():
  logits, labels, valid = _random_inputs(14)
  logits_bf16 = jnp.asarray(logits, jnp.bfloat16)
  loss = jax.jit(lambda x: losses.hybrid(x, labels, valid, 1.0, 1.0))
  value = loss(logits_bf16)
  assert value.dtype == jnp.float32
  np.testing.assert_allclose(float(value), float(loss(logits_bf16.astype(jnp.float32))),
                             rtol=1e-6)


def test_shape_mismatches_are_rejected():
  logits, labels, valid = _random_inputs(15, shape=(2, 3, 4, 2))
  with pytest.raises(ValueError, match='labels'):
    losses.bce(logits, labels[..., :1], valid)
  with pytest.raises(ValueError, match='valid'):
    losses.lovasz_hinge(logits, labels, valid[:, :2])
  with pytest.raises(ValueError, match='logits'):
    losses.dice(logits[0], labels[0], valid[0])


def test_sharded_batch_gives_the_unsharded_loss_and_gradient():
  """As in the train step: batch split over 8 devices of an Auto mesh, jit partitions the sort."""
  logits, labels, valid = _random_inputs(16, shape=(8, 3, 5, 3))
  mesh = jax.make_mesh((8,), ('data',), axis_types=(jax.sharding.AxisType.Auto,))
  data = jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec('data'))
  sharded = [jax.device_put(array, data) for array in (logits, labels, valid)]
  for per_image in (False, True):
    loss = lambda x, y, v: losses.hybrid(x, y, v, 1.0, 1.0, lovasz_per_image=per_image)
    value_and_grad = jax.jit(jax.value_and_grad(loss))
    value, grad = value_and_grad(*sharded)
    expected_value, expected_grad = value_and_grad(logits, labels, valid)
    np.testing.assert_allclose(float(value), float(expected_value), rtol=1e-6)
    np.testing.assert_allclose(grad, expected_grad, rtol=1e-5, atol=1e-9)
