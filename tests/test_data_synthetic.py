"""Synthetic Agriculture-Vision: exact layout and formats, determinism, learnability, atomicity."""

import concurrent.futures
import filecmp
import hashlib
import json
import re

import numpy as np
import pytest
from PIL import Image
from scipy import ndimage

from agrivision_jax import data
from agrivision_jax.data import synthetic

SIZE = 40


def generate_cli(out_dir, seed, version='2020', counts=(6, 3, 2)):
  synthetic.main([f'--out_dir={out_dir}', f'--num_train={counts[0]}', f'--num_val={counts[1]}',
                  f'--num_test={counts[2]}', f'--size={SIZE}', f'--seed={seed}',
                  f'--version={version}'])
  return out_dir


def all_files(root):
  return sorted(str(p.relative_to(root)) for p in root.rglob('*') if p.is_file())


@pytest.mark.parametrize('version', ['2020', '2021'])
def test_layout_and_file_formats(tmp_path, version):
  root = generate_cli(tmp_path / 'av', seed=0, version=version)
  names = data.class_names(version)
  ids = {}
  for split, count in (('train', 6), ('val', 3), ('test', 2)):
    rgb_dir = root / split / 'images' / 'rgb'
    ids[split] = sorted(p.stem for p in rgb_dir.iterdir())
    assert len(ids[split]) == count
    expected = {f'images/rgb/{i}.jpg' for i in ids[split]} | {
        f'images/nir/{i}.jpg' for i in ids[split]} | {
        f'boundaries/{i}.png' for i in ids[split]} | {f'masks/{i}.png' for i in ids[split]}
    if split != 'test':
      expected |= {f'labels/{c}/{i}.png' for c in names[1:] for i in ids[split]}
    assert set(all_files(root / split)) == expected
    for tile_id in ids[split]:
      match = re.fullmatch(r'[A-Z0-9]{9}_(\d+)-(\d+)-(\d+)-(\d+)', tile_id)
      assert match, tile_id
      x1, y1, x2, y2 = map(int, match.groups())
      assert (x2 - x1, y2 - y1) == (SIZE, SIZE)
    tile_id = ids[split][0]
    rgb = Image.open(rgb_dir / f'{tile_id}.jpg')
    nir = Image.open(root / split / 'images' / 'nir' / f'{tile_id}.jpg')
    assert (rgb.format, rgb.mode, rgb.size) == ('JPEG', 'RGB', (SIZE, SIZE))
    assert (nir.format, nir.mode, nir.size) == ('JPEG', 'L', (SIZE, SIZE))
    pngs = [root / split / 'boundaries' / f'{tile_id}.png',
            root / split / 'masks' / f'{tile_id}.png']
    if split != 'test':
      pngs += [root / split / 'labels' / c / f'{tile_id}.png' for c in names[1:]]
    for path in pngs:
      png = Image.open(path)
      assert (png.format, png.mode, png.size) == ('PNG', 'L', (SIZE, SIZE))
      assert set(np.unique(np.asarray(png))) <= {0, 255}
  every_id = [i for split in ids.values() for i in split]
  assert len(set(every_id)) == len(every_id)


def test_generation_is_deterministic(tmp_path):
  first = generate_cli(tmp_path / 'a', seed=4)
  second = generate_cli(tmp_path / 'b', seed=4)
  other = generate_cli(tmp_path / 'c', seed=5)
  files = all_files(first)
  assert files == all_files(second)
  match, mismatch, errors = filecmp.cmpfiles(first, second, files, shallow=False)
  assert len(match) == len(files) and not mismatch and not errors
  assert all_files(other) != files  # other seed, other field ids


@pytest.mark.parametrize('version', ['2020', '2021'])
def test_every_class_is_present_and_learnable(tmp_path, version):
  """A pixel MLP on local colour / NIR statistics, trained in numpy, separates every class."""
  root = tmp_path / 'av'
  synthetic.ensure_synthetic(str(root), 32, 8, 1, SIZE, seed=0, version=version)
  names = data.class_names(version)

  def features_and_targets(split):
    source = data.DirectorySource(str(root), split, version, SIZE)
    features, labels, valid = [], [], []
    for i in range(len(source)):
      example = source[i]
      x = example['image'].astype(np.float32) / 255
      mean = ndimage.uniform_filter(x, size=(5, 5, 1))
      std = np.sqrt(np.maximum(ndimage.uniform_filter(x * x, size=(5, 5, 1)) - mean ** 2, 0))
      features.append(np.concatenate([x, mean, std], -1))
      labels.append(example['labels'])
      valid.append(example['valid'])
    valid = np.stack(valid)
    return np.stack(features)[valid], np.stack(labels)[valid].astype(np.float32), valid

  x, y, valid = features_and_targets('train')
  assert (y.sum(0) > 0).all()  # every class occurs
  assert (y[:, 1:].sum(1) >= 2).any()  # overlapping patterns
  assert not valid.all()  # invalid regions
  x_val, y_val, _ = features_and_targets('val')
  mu, sigma = x.mean(0), x.std(0) + 1e-6
  x, x_val = (x - mu) / sigma, (x_val - mu) / sigma
  rng = np.random.default_rng(0)
  w1, b1 = rng.normal(0, 0.3, (x.shape[1], 32)), np.zeros(32)
  w2, b2 = rng.normal(0, 0.3, (32, y.shape[1])), np.zeros(y.shape[1])
  for _ in range(200):
    index = rng.integers(0, len(x), 2048)
    h = np.maximum(x[index] @ w1 + b1, 0)
    grad = (1 / (1 + np.exp(-(h @ w2 + b2))) - y[index]) / len(index)
    grad_h = grad @ w2.T * (h > 0)
    w2 -= 0.5 * h.T @ grad
    b2 -= 0.5 * grad.sum(0)
    w1 -= 0.5 * x[index].T @ grad_h
    b1 -= 0.5 * grad_h.sum(0)
  predicted = (np.maximum(x_val @ w1 + b1, 0) @ w2 + b2) > 0
  target = y_val > 0
  iou = (predicted & target).sum(0) / np.maximum((predicted | target).sum(0), 1)
  assert (iou > 0.5).all(), dict(zip(names, iou.round(3)))


def test_labels_only_on_valid_pixels_and_no_data_is_black(tmp_path):
  root = tmp_path / 'av'
  synthetic.ensure_synthetic(str(root), 16, 1, 1, SIZE, seed=2)
  source = data.DirectorySource(str(root), 'train', '2020', SIZE)
  saw_no_data = False
  for i in range(len(source)):
    tile_id = source.ids[i]
    labels = np.stack([np.asarray(Image.open(root / 'train' / 'labels' / c / f'{tile_id}.png'))
                       for c in data.class_names('2020')[1:]], -1)
    mask = np.asarray(Image.open(root / 'train' / 'masks' / f'{tile_id}.png')) > 0
    boundary = np.asarray(Image.open(root / 'train' / 'boundaries' / f'{tile_id}.png')) > 0
    assert not labels[~(mask & boundary)].any()
    if not mask.all():
      saw_no_data = True
      assert source[i]['image'][~mask].max() < 40  # black up to JPEG ringing
  assert saw_no_data


def test_concurrent_generation_is_atomic(tmp_path):
  target = tmp_path / 'shared'
  with concurrent.futures.ThreadPoolExecutor(3) as pool:
    list(pool.map(lambda _: synthetic.ensure_synthetic(str(target), 3, 2, 1, 16, 0), range(3)))
  assert [p.name for p in tmp_path.iterdir()] == ['shared']  # no temporary folder left
  assert len(list((target / 'train' / 'images' / 'rgb').iterdir())) == 3


def test_existing_folders_are_never_overwritten(tmp_path):
  root = tmp_path / 'av'
  synthetic.ensure_synthetic(str(root), 3, 2, 1, 16, 0)
  with pytest.raises(ValueError, match=r'data\.data_dir=.*num_train.: 3'):
    synthetic.ensure_synthetic(str(root), 4, 2, 1, 16, 0)
  other = tmp_path / 'mine'
  other.mkdir()
  (other / 'notes.txt').write_text('keep')
  with pytest.raises(ValueError, match=r'data\.data_dir=.*not a synthetic dataset'):
    synthetic.ensure_synthetic(str(other), 3, 2, 1, 16, 0)
  assert (other / 'notes.txt').read_text() == 'keep'
  with pytest.raises(ValueError, match=r'data\.synthetic\.num_val=0'):
    synthetic.ensure_synthetic(str(tmp_path / 'new'), 3, 0, 1, 16, 0)


def test_metadata_records_every_file_and_its_checksum(tmp_path):
  root = tmp_path / 'av'
  synthetic.ensure_synthetic(str(root), 3, 2, 1, 16, 0)
  metadata = json.loads((root / 'synthetic.json').read_text())
  on_disk = [name for name in all_files(root) if name != 'synthetic.json']
  assert metadata['file_count'] == len(on_disk) == 3 * 10 + 2 * 10 + 1 * 4
  assert sorted(metadata['sha256']) == sorted(name.replace('\\', '/') for name in on_disk)
  some = on_disk[7]
  assert metadata['sha256'][some] == hashlib.sha256((root / some).read_bytes()).hexdigest()


@pytest.mark.parametrize('damage, message', [
    ('change', 'differs from its recorded SHA-256'),
    ('delete', 'is missing'),
    ('add', 'is not part of it'),
    ('old_metadata', 'records no file checksums'),
])
def test_a_tampered_dataset_is_refused_not_used(tmp_path, damage, message):
  root = tmp_path / 'av'
  synthetic.ensure_synthetic(str(root), 3, 2, 1, 16, 0)
  target = root / 'val' / 'masks' / sorted(p.name for p in (root / 'val' / 'masks').iterdir())[1]
  if damage == 'change':
    target.write_bytes(target.read_bytes()[:-1] + b'\0')
  elif damage == 'delete':
    target.unlink()
  elif damage == 'add':
    (root / 'train' / 'images' / 'rgb' / 'ZZZZZZZZZ_0-0-16-16.jpg').write_bytes(b'x')
  else:
    metadata = json.loads((root / 'synthetic.json').read_text())
    del metadata['sha256'], metadata['file_count']
    (root / 'synthetic.json').write_text(json.dumps(metadata))
  with pytest.raises(ValueError, match=re.escape(message)) as info:
    synthetic.ensure_synthetic(str(root), 3, 2, 1, 16, 0)
  assert f'data.data_dir={str(root)!r}' in str(info.value)
  assert 'delete the folder' in str(info.value)
  if damage != 'old_metadata':
    assert ('ZZZZZZZZZ' if damage == 'add' else target.name) in str(info.value)
