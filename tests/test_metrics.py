"""Official Agriculture-Vision confusion matrix and mIoU against a literal per-pixel loop, a
hand-computed example, hypothesis-generated overlapping labels, and int64 accumulation."""
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from jax.sharding import AxisType, NamedSharding, PartitionSpec as P

from agrivision_jax import metrics

_confusion = jax.jit(metrics.confusion_matrix)


def _literal_confusion(logits, labels, valid):
  """The challenge rule applied pixel by pixel in Python."""
  num_classes = logits.shape[-1]
  matrix = np.zeros((num_classes, num_classes), np.int64)
  for index in np.ndindex(valid.shape):
    if not valid[index]:
      continue
    scores = [float(s) for s in logits[index]]
    prediction = scores.index(max(scores))  # first maximum
    label_set = [c for c in range(num_classes) if labels[index][c] > 0.5] or [0]
    for y in label_set:
      if prediction in label_set:
        matrix[y, y] += 1
      else:
        matrix[prediction, y] += 1
  return matrix


def _random_batch(seed, shape, label_probability=0.5, valid_fraction=0.8):
  rng = np.random.default_rng(seed)
  logits = rng.normal(size=shape).astype(np.float32)
  labels = (rng.random(shape) < label_probability).astype(np.float32)
  valid = rng.random(shape[:-1]) < valid_fraction
  return logits, labels, valid


def _names(num_classes):
  return tuple(f'class{c}' for c in range(num_classes))


def test_confusion_matrix_matches_the_literal_rule_on_random_batches():
  for seed, shape in ((0, (3, 5, 7, 7)), (1, (2, 9, 4, 9)), (2, (1, 6, 11, 3))):
    logits, labels, valid = _random_batch(seed, shape)
    matrix = _confusion(logits, labels, valid)
    assert matrix.dtype == jnp.int32
    np.testing.assert_array_equal(matrix, _literal_confusion(logits, labels, valid))


@st.composite
def _batches(draw):
  shape = (draw(st.sampled_from([1, 2])), draw(st.sampled_from([1, 3])),
           draw(st.sampled_from([2, 5])), draw(st.sampled_from([3, 7])))
  size = int(np.prod(shape))
  # Few distinct scores: argmax ties; high label probability: heavy overlap (and empty sets).
  logits = np.asarray(draw(st.lists(st.integers(-2, 2), min_size=size, max_size=size)),
                      np.float32).reshape(shape)
  probability = draw(st.sampled_from([0.0, 0.3, 0.7, 1.0]))
  draws = np.asarray(draw(st.lists(st.floats(0, 1, exclude_max=True), min_size=size,
                                   max_size=size)))
  labels = (draws.reshape(shape) < probability).astype(np.float32)
  valid = np.asarray(draw(st.lists(st.booleans(), min_size=size // shape[-1],
                                   max_size=size // shape[-1]))).reshape(shape[:-1])
  return logits, labels, valid


@settings(max_examples=40, deadline=None, database=None)
@given(_batches())
def test_confusion_matrix_matches_the_literal_rule_on_generated_batches(batch):
  logits, labels, valid = batch
  np.testing.assert_array_equal(_confusion(logits, labels, valid),
                                _literal_confusion(logits, labels, valid))


def test_hand_computed_3x3_example():
  # Pixels (row-major) as (prediction, label set, valid); classes 0 background, 1, 2.
  pixels = [(0, set(), True),      # no class set -> background; hit: M[0,0] += 1
            (1, {1}, True),        # hit: M[1,1] += 1
            (2, {1, 2}, True),     # hit: M[1,1] += 1, M[2,2] += 1
            (0, {1, 2}, True),     # miss: M[0,1] += 1, M[0,2] += 1
            (1, {2}, True),        # miss: M[1,2] += 1
            (2, {0}, True),        # miss: M[2,0] += 1
            (0, {1}, False),       # not scored
            (2, {2}, True),        # hit: M[2,2] += 1
            (1, set(), True)]      # background; miss: M[1,0] += 1
  logits = np.zeros((1, 3, 3, 3), np.float32)
  labels = np.zeros((1, 3, 3, 3), np.float32)
  valid = np.zeros((1, 3, 3), bool)
  for index, (prediction, label_set, is_valid) in enumerate(pixels):
    row, col = divmod(index, 3)
    logits[0, row, col, prediction] = 1.0
    labels[0, row, col, sorted(label_set)] = 1.0
    valid[0, row, col] = is_valid
  expected = np.array([[1, 1, 1],
                       [1, 2, 1],
                       [1, 0, 2]])
  np.testing.assert_array_equal(_confusion(logits, labels, valid), expected)
  # IoU_c = M[c,c] / (row_c + col_c - M[c,c]): 1/(3+3-1), 2/(4+3-2), 2/(3+4-2).
  per_class, miou = metrics.iou_from_confusion(expected)
  np.testing.assert_allclose(per_class, [0.2, 0.4, 0.4])
  assert miou == pytest.approx(1 / 3)
  result = metrics.ConfusionMetric(3, ('background', 'a', 'b')).update(
      _confusion(logits, labels, valid)).compute()
  assert result == pytest.approx({'miou': 1 / 3, 'iou/background': 0.2, 'iou/a': 0.4,
                                  'iou/b': 0.4})


def test_accumulating_many_batches_equals_one_big_batch():
  logits, labels, valid = _random_batch(3, (12, 4, 6, 7), label_probability=0.6)
  names = _names(7)
  whole = metrics.ConfusionMetric(7, names).update(_confusion(logits, labels, valid))
  updated = metrics.ConfusionMetric(7, names)
  merged = metrics.ConfusionMetric(7, names)
  for start in range(0, 12, 2):
    part = slice(start, start + 2)
    updated.update(_confusion(logits[part], labels[part], valid[part]))
    merged = merged.merge(metrics.ConfusionMetric(7, names).update(
        _confusion(logits[part], labels[part], valid[part])))
  np.testing.assert_array_equal(whole.matrix, _literal_confusion(logits, labels, valid))
  for metric in (updated, merged):
    np.testing.assert_array_equal(metric.matrix, whole.matrix)
    assert metric.compute() == whole.compute()


@pytest.mark.parametrize('axis_type', [AxisType.Auto, AxisType.Explicit])
def test_sharded_batch_and_per_device_stacks_give_the_same_matrix(axis_type):
  logits, labels, valid = _random_batch(4, (8, 3, 5, 7))
  mesh = jax.make_mesh((8,), ('data',), axis_types=(axis_type,))
  data = NamedSharding(mesh, P('data'))
  sharded = jax.jit(metrics.confusion_matrix, out_shardings=NamedSharding(mesh, P()))(
      *(jax.device_put(array, data) for array in (logits, labels, valid)))
  expected = _literal_confusion(logits, labels, valid)
  np.testing.assert_array_equal(sharded, expected)
  per_device = jax.vmap(lambda x, y, v: metrics.confusion_matrix(x[None], y[None], v[None]))(
      logits, labels, valid)  # (8, C, C), one matrix per image
  stacked = metrics.ConfusionMetric(7, _names(7)).update(per_device)
  np.testing.assert_array_equal(stacked.matrix, expected)


def test_host_accumulation_is_int64_beyond_2_to_the_31():
  near_limit = np.full((3, 3), 2**31 - 1, np.int32)
  metric = metrics.ConfusionMetric(3, _names(3))
  for _ in range(3):
    metric.update(jnp.asarray(near_limit))
  assert metric.matrix.dtype == np.int64
  np.testing.assert_array_equal(metric.matrix, np.full((3, 3), 3 * (2**31 - 1), np.int64))
  merged = metric.merge(metrics.ConfusionMetric(3, _names(3)).update(near_limit))
  assert merged.matrix[0, 0] == 4 * (2**31 - 1)
  result = merged.compute()
  assert result['miou'] == pytest.approx(0.2)  # a / (3a + 3a - a)
  assert result['iou/class2'] == pytest.approx(0.2)


def test_iou_of_absent_classes_is_nan_and_left_out_of_the_mean():
  matrix = np.array([[4, 1, 0], [2, 3, 0], [0, 0, 0]])
  per_class, miou = metrics.iou_from_confusion(matrix)
  np.testing.assert_allclose(per_class[:2], [4 / 7, 3 / 6])
  assert np.isnan(per_class[2])
  assert miou == pytest.approx((4 / 7 + 3 / 6) / 2)
  per_class, miou = metrics.iou_from_confusion(np.zeros((2, 2), np.int64))
  assert np.all(np.isnan(per_class)) and np.isnan(miou)


def test_bad_inputs_are_rejected():
  logits, labels, valid = _random_batch(5, (1, 2, 3, 3))
  with pytest.raises(ValueError, match='valid'):
    metrics.confusion_matrix(logits, labels, valid[:, :1])
  with pytest.raises(ValueError, match='class_names'):
    metrics.ConfusionMetric(3, ('a', 'b'))
  metric = metrics.ConfusionMetric(3, _names(3))
  with pytest.raises(ValueError, match='integer'):
    metric.update(np.zeros((2, 2), np.int32))
  with pytest.raises(ValueError, match='integer'):
    metric.update(np.zeros((3, 3), np.float32))
  with pytest.raises(ValueError, match='overflow'):
    metric.update(np.full((3, 3), -1, np.int32))
  with pytest.raises(ValueError, match='merge'):
    metric.merge(metrics.ConfusionMetric(3, ('x', 'y', 'z')))


# ----------------------------------------------------------------------------- the authors' IoU


def _authors_validation_iou(batches):
  """The authors' validation IoU, a literal NumPy transcription (NCHW, float64) of
  LAOS-Y/AgriVision train.py ``val()``::

      label *= mask.unsqueeze(1)
      pred = model(img)
      pred[~mask.unsqueeze(1).expand_as(pred).bool()] = -INF_FP16      # INF_FP16 = 2 ** 15
      intersection, union = intersectionAndUnion(pred.data, label.data, 0)
      intersection_meter.update(intersection)
      union_meter.update(union)
      ...
      reduced_inter = intersection_meter.sum.cpu()
      reduced_union = union_meter.sum.cpu()
      iou = reduced_inter / (reduced_union + 1e-10)
      ... iou.mean()

  and utils.py ``intersectionAndUnion(pr, gt, threshold)``::

      pr = _threshold(pr, threshold=threshold)       # (x > threshold).type(x.dtype)
      intersection = torch.sum(gt * pr, dim=[0, 2, 3])
      union = torch.sum(gt, dim=[0, 2, 3]) + torch.sum(pr, dim=[0, 2, 3]) - intersection
      return intersection, union

  (AverageMeter.update(val) with weight 1 keeps ``sum`` = the sum of every update.)
  """
  intersection_sum, union_sum = None, None
  for logits, labels, valid in batches:
    pred = np.transpose(logits, (0, 3, 1, 2)).astype(np.float64).copy()   # (B, C, H, W)
    label = np.transpose(labels, (0, 3, 1, 2)).astype(np.float64).copy()
    mask = valid.astype(np.float64)
    label *= mask[:, None]
    pred[~np.broadcast_to(mask[:, None].astype(bool), pred.shape)] = -2.0**15
    pr = (pred > 0).astype(pred.dtype)
    intersection = np.sum(label * pr, axis=(0, 2, 3))
    union = np.sum(label, axis=(0, 2, 3)) + np.sum(pr, axis=(0, 2, 3)) - intersection
    intersection_sum = intersection if intersection_sum is None else intersection_sum + intersection
    union_sum = union if union_sum is None else union_sum + union
  iou = intersection_sum / (union_sum + 1e-10)
  return iou, iou.mean()


def _background_labels(labels):
  """Background (class 0) set exactly where no pattern is, as the data pipeline builds it."""
  labels = labels.copy()
  labels[..., 0] = ~labels[..., 1:].any(axis=-1)
  return labels


def test_segmentation_metric_matches_both_rules_over_several_batches():
  names = _names(5)
  batches = []
  for seed, size in ((6, 3), (7, 2), (8, 4)):
    logits, labels, valid = _random_batch(seed, (size, 6, 9, 5), label_probability=0.3)
    logits[..., 3] = -np.abs(logits[..., 3]) - 9.0  # class 3: never predicted (nor argmax) ...
    labels[..., 3] = 0.0                            # ... nor labelled
    batches.append((logits, _background_labels(labels), valid))
  metric = metrics.SegmentationMetric(names)
  counts = jax.jit(metrics.batch_counts)
  for batch in batches:
    metric.update(jax.device_get(counts(*batch)))
  result = metric.compute()
  assert set(result) == ({'miou', 'miou_authors'} | {f'iou/{n}' for n in names}
                         | {f'iou_authors/{n}' for n in names})
  expected_iou, expected_miou = _authors_validation_iou(batches)
  np.testing.assert_allclose([result[f'iou_authors/{n}'] for n in names], expected_iou,
                             rtol=1e-12)
  assert result['miou_authors'] == pytest.approx(expected_miou, rel=1e-12)
  assert result['iou_authors/class3'] == 0.0  # their 1e-10: 0, counted in their mean
  # The official rule on the same batches: the literal per-pixel loop; class 3 stays NaN.
  matrix = sum(_literal_confusion(*batch) for batch in batches)
  per_class, miou = metrics.iou_from_confusion(matrix)
  assert np.isnan(result['iou/class3']) and np.isnan(per_class[3])
  np.testing.assert_allclose([result[f'iou/{n}'] for n in names], per_class)
  assert result['miou'] == pytest.approx(miou)
  assert abs(result['miou'] - result['miou_authors']) > 1e-3  # two different rules


def test_authors_counts_hand_computed():
  # One image, 1 x 4 pixels, classes (background, a): logits > 0 predict; pixel 3 invalid.
  logits = np.float32([[[[1, -1], [1, 2], [-1, 3], [5, 5]]]])
  labels = np.float32([[[[1, 0], [0, 1], [1, 0], [1, 1]]]])
  valid = np.array([[[True, True, True, False]]])
  counts = jax.jit(metrics.batch_counts)(logits, labels, valid)
  # background: predicted {0, 1}, labelled {0, 2}: I = 1, U = 3; a: predicted {1, 2}, labelled
  # {1}: I = 1, U = 2.
  np.testing.assert_array_equal(counts['intersection'], [1, 1])
  np.testing.assert_array_equal(counts['union'], [3, 2])
  assert counts['intersection'].dtype == counts['union'].dtype == jnp.int32


def test_batch_counts_of_a_sharded_batch_need_no_gather():
  logits, labels, valid = _random_batch(9, (8, 3, 5, 7))
  mesh = jax.make_mesh((8,), ('data',), axis_types=(AxisType.Auto,))
  data = NamedSharding(mesh, P('data'))
  sharded = [jax.device_put(array, data) for array in (logits, labels, valid)]
  step = jax.jit(metrics.batch_counts, out_shardings=NamedSharding(mesh, P()))
  assert 'all-gather' not in step.lower(*sharded).compile().as_text()
  result = step(*sharded)
  expected = jax.jit(metrics.batch_counts)(logits, labels, valid)
  for name in ('confusion', 'intersection', 'union'):
    np.testing.assert_array_equal(result[name], expected[name])


def test_segmentation_metric_rejects_bad_counts():
  metric = metrics.SegmentationMetric(_names(3))
  good = {'confusion': np.zeros((3, 3), np.int32), 'intersection': np.zeros(3, np.int32),
          'union': np.zeros(3, np.int32)}
  with pytest.raises(ValueError, match="'union'"):
    metric.update({**good, 'union': np.zeros(2, np.int32)})
  with pytest.raises(ValueError, match="'intersection'"):
    metric.update({**good, 'intersection': np.full(3, -1, np.int32)})
