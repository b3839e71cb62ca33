"""Reading checkpoint files: .pth/.pt/.pth.tar (torch, lazily imported) and .safetensors."""
import dataclasses
import os
from typing import Any, Mapping

import numpy as np



TORCH_SUFFIXES = ('.pth', '.pt', '.pth.tar')
SAFETENSORS_SUFFIXES = ('.safetensors',)
WRAPPER_KEYS = ('state_dict', 'model')
DDP_PREFIX = 'module.'



@dataclasses.dataclass(frozen=True)
class SourceFile:
  """A checkpoint file's state_dict and how it was unwrapped.

  Attributes:
    path: the file.
    container: 'torch' or 'safetensors'.
    wrapper: 'state_dict' / 'model' when the state_dict was wrapped in such a dict, else None.
    wrapper_entries: the wrapper's other top-level entries (e.g. 'epoch'), ignored.
    prefix: 'module.' when it was stripped from every key, else None.
    tensors: torch key -> numpy array (floating tensors as float32).
  """
  path: str
  container: str
  wrapper: str | None
  wrapper_entries: tuple[str, ...]
  prefix: str | None
  tensors: dict[str, np.ndarray]


def as_numpy(value: Any) -> np.ndarray | None:
  """A numpy array from a numpy or torch tensor (floating -> float32); None for anything else."""
  if isinstance(value, np.ndarray):
    return value.astype(np.float32) if np.issubdtype(value.dtype, np.floating) else value
  if type(value).__module__.startswith('torch') and hasattr(value, 'detach'):
    tensor = value.detach().cpu()
    return (tensor.float() if tensor.is_floating_point() else tensor).numpy()
  return None


def _read_torch(path: str) -> Any:
  try:
    import torch  # pylint: disable=g-import-not-at-top (optional dependency, .pth only)
  except ImportError as e:
    raise ValueError(f'{path}: reading a .pth/.pt file needs PyTorch (pip install '
                     "'agrivision_jax[torch]'), or convert the file to .safetensors") from e
  try:
    return torch.load(path, map_location='cpu', weights_only=True)
  except Exception as e:  # pylint: disable=broad-except (torch raises many types here)
    message = str(e).strip().splitlines()[0] if str(e).strip() else ''
    raise ValueError(f'{path}: not a checkpoint torch.load(weights_only=True) can read: '
                     f'{type(e).__name__}: {message}') from e


def read_safetensors(path: str) -> dict[str, np.ndarray]:
  """Every tensor of a .safetensors file as numpy; ValueError naming ``path`` if unreadable."""
  # Imported here: importing the package (tests/torch_reference.py does) needs no safetensors.
  import safetensors.numpy  # pylint: disable=g-import-not-at-top
  try:
    return safetensors.numpy.load_file(path)
  except Exception as e:  # pylint: disable=broad-except (safetensors raises its own types)
    raise ValueError(f'{path}: not a readable .safetensors file: {type(e).__name__}: {e}') from e


def read_checkpoint(path: str) -> SourceFile:
  """Reads a .pth/.pt/.pth.tar (torch) or .safetensors file into a flat state_dict.

  Args:
    path: the checkpoint file.
  Returns:
    A ``SourceFile`` (wrapper removed, 'module.' prefix stripped, tensors as numpy).
  Raises:
    FileNotFoundError: no such file.
    ValueError naming the file: unknown suffix, unreadable file, or content that is not a
      state_dict (a mapping of str keys to tensors, possibly wrapped).
  """
  if not os.path.isfile(path):
    raise FileNotFoundError(f'{path}: no such checkpoint file')
  lower = path.lower()
  if lower.endswith(SAFETENSORS_SUFFIXES):
    container, content = 'safetensors', read_safetensors(path)
  elif lower.endswith(TORCH_SUFFIXES):
    container, content = 'torch', _read_torch(path)
  else:
    raise ValueError(f'{path}: unknown checkpoint type; expected a file ending in one of '
                     f'{TORCH_SUFFIXES + SAFETENSORS_SUFFIXES}')
  if not isinstance(content, Mapping):
    raise ValueError(f'{path}: not a checkpoint: it holds a {type(content).__name__}, not a '
                     'state_dict (a mapping of names to tensors)')
  wrapper, entries = None, ()
  if not all(as_numpy(v) is not None for v in content.values()):
    inner = [name for name in WRAPPER_KEYS if isinstance(content.get(name), Mapping)]
    if len(inner) == 1:
      wrapper = inner[0]
      entries = tuple(sorted(str(k) for k in content if k != wrapper))
      content = content[wrapper]
  tensors, bad = {}, []
  for key, value in content.items():
    array = as_numpy(value)
    if not isinstance(key, str) or array is None:
      bad.append(f'{key!r} ({type(value).__name__})')
    else:
      tensors[key] = array
  if bad:
    raise ValueError(f'{path}: not a state_dict: {len(bad)} entries are not tensors: '
                     + ', '.join(bad))
  if not tensors:
    raise ValueError(f'{path}: not a checkpoint: the state_dict is empty')
  prefix = None
  if all(key.startswith(DDP_PREFIX) for key in tensors):
    prefix = DDP_PREFIX
    tensors = {key[len(DDP_PREFIX):]: value for key, value in tensors.items()}
  return SourceFile(path, container, wrapper, entries, prefix, tensors)


# ----------------------------------------------------------------------------- layouts
