"""Converting a file into an output directory with its report, and loading it back."""
import dataclasses
import hashlib
import json
import os
import shutil
from typing import Any, Mapping

from agrivision_jax import staging as staging_lib
from agrivision_jax.convert.files import SourceFile, read_checkpoint, read_safetensors
from agrivision_jax.convert.names import (flat_variables, flax_path_to_torch_key, join_path,
                                          state_dict_to_variables, torch_key_to_module_path,
                                          unflatten)
from agrivision_jax.convert.plan import (ACCEPTED_BACKBONE_VARIANTS, BACKBONE_FIELDS, HEAD_FIELDS,
                                         Conversion, Plan, SourceLayout, convert_state_dict,
                                         describe_source, model_config_dict, plan_conversion,
                                         variable_shapes)


FORMAT_NAME = 'agrivision_jax.converted_variables'
FORMAT_VERSION = 1
VARIABLES_FILE = 'variables.safetensors'
MANIFEST_FILE = 'manifest.json'
REPORT_JSON_FILE = 'report.json'
REPORT_TEXT_FILE = 'report.txt'


def _sha256(path: str) -> str:
  digest = hashlib.sha256()
  with open(path, 'rb') as f:
    for chunk in iter(lambda: f.read(1 << 20), b''):
      digest.update(chunk)
  return digest.hexdigest()


def build_report(source: SourceFile, conversion: Conversion, model_config: Mapping[str, Any],
                 output_dir: str) -> dict[str, Any]:
  """The JSON accounting report: input, source layout, counts, used / ignored keys, fresh leaves.

  Returns:
    A JSON-able dict (``report.json``; ``format_report`` renders it as text).
  """
  plan = conversion.plan
  flat_template = variable_shapes(model_config)
  shapes = {key: list(value.shape) for key, value in source.tensors.items()}
  return {
      'input': {'path': os.path.abspath(source.path), 'sha256': _sha256(source.path),
                'container': source.container, 'wrapper': source.wrapper,
                'wrapper_entries_ignored': list(source.wrapper_entries),
                'prefix_stripped': source.prefix},
      'source': {**dataclasses.asdict(plan.layout), 'description': plan.layout.description()},
      'model_config': model_config_dict(model_config),
      'output': {'directory': os.path.abspath(output_dir), 'complete': conversion.complete},
      'counts': {'source_tensors': len(source.tensors), 'used': len(plan.used),
                 'ignored': len(plan.ignored), 'flax_leaves': len(flat_template),
                 'filled': len(plan.used), 'fresh': len(plan.fresh)},
      'notes': list(plan.notes),
      'used': [{'key': key, 'shape': shapes[key], 'leaf': join_path(path),
                'leaf_shape': list(flat_template[path].shape), 'transform': transform}
               for key, (path, transform) in plan.used.items()],
      'ignored': [{'key': key, 'shape': shapes[key], 'reason': reason}
                  for key, reason in plan.ignored.items()],
      'fresh': [{'leaf': join_path(path), 'shape': list(flat_template[path].shape),
                 'reason': reason}
                for path, reason in plan.fresh.items()],
  }


def _shape_text(shape) -> str:
  return str(tuple(shape))


def format_report(report: Mapping[str, Any]) -> str:
  """Renders ``build_report``'s dict as the text of report.txt (every key and leaf, one a line)."""
  source, counts, config = report['input'], report['counts'], report['model_config']
  wrapper = (f"{{'{source['wrapper']}': ...}} wrapper (ignored entries: "
             f"{', '.join(source['wrapper_entries_ignored']) or 'none'})"
             if source['wrapper'] else 'no wrapper')
  prefix = f"'{source['prefix_stripped']}' prefix stripped" if source['prefix_stripped'] else (
      'no prefix')
  what = 'every variable' if report['output']['complete'] else 'backbone only'
  lines = [
      f"{source['path']} -> {report['output']['directory']} ({what})",
      f"input: {source['container']} file, {wrapper}, {prefix}, sha256 {source['sha256']}",
      f"source: {report['source']['description']}",
      'model: ' + ', '.join(f'{k}={v}' for k, v in config.items()),
      f"source tensors {counts['source_tensors']}: used {counts['used']}, ignored "
      f"{counts['ignored']}",
      f"flax leaves {counts['flax_leaves']}: filled {counts['filled']}, fresh {counts['fresh']}",
  ]
  lines += [f'note: {note}' for note in report['notes']]
  lines.append(f"ignored source tensors ({counts['ignored']}):")
  lines += [f"  {e['key']} {_shape_text(e['shape'])}: {e['reason']}" for e in report['ignored']]
  lines.append(f"fresh flax leaves ({counts['fresh']}):")
  lines += [f"  {e['leaf']} {_shape_text(e['shape'])}: {e['reason']}" for e in report['fresh']]
  lines.append(f"used source tensors ({counts['used']}):")
  lines += [f"  {e['key']} {_shape_text(e['shape'])} -> {e['leaf']} "
            f"{_shape_text(e['leaf_shape'])} [{e['transform']}]" for e in report['used']]
  return '\n'.join(lines) + '\n'


# ----------------------------------------------------------------------------- output directory


def _write_directory(directory: str, conversion: Conversion, report: Mapping[str, Any]) -> None:
  import safetensors.numpy  # pylint: disable=g-import-not-at-top (as in files.read_safetensors)
  flat = {join_path(path): value for path, value in flat_variables(conversion.variables).items()}
  with open(os.path.join(directory, VARIABLES_FILE), 'wb') as f:
    f.write(safetensors.numpy.save(
        flat, metadata={'format': FORMAT_NAME, 'version': str(FORMAT_VERSION)}))
  manifest = {
      'format': FORMAT_NAME, 'version': FORMAT_VERSION,
      'model_config': report['model_config'],
      'complete': conversion.complete,
      'source': {'path': report['input']['path'], 'sha256': report['input']['sha256'],
                 **report['source']},
      'filled': sorted(flat),
      'fresh': {join_path(path): reason for path, reason in conversion.plan.fresh.items()},
  }
  for name, text in ((MANIFEST_FILE, json.dumps(manifest, indent=1)),
                     (REPORT_JSON_FILE, json.dumps(report, indent=1)),
                     (REPORT_TEXT_FILE, format_report(report))):
    with open(os.path.join(directory, name), 'w') as f:
      f.write(text)


def _prepare_output(output_dir: str, overwrite: bool) -> None:
  """Raises if ``output_dir`` may not be (re)placed."""
  if not os.path.exists(output_dir):
    return
  if not os.path.isdir(output_dir):
    raise FileExistsError(f'output directory {output_dir}: exists and is not a directory')
  if not os.listdir(output_dir):
    return
  if not overwrite:
    raise FileExistsError(f'output directory {output_dir}: exists and is not empty (overwrite '
                          'replaces an earlier conversion)')
  if not os.path.isfile(os.path.join(output_dir, MANIFEST_FILE)):
    raise FileExistsError(f'output directory {output_dir}: not an earlier conversion (no '
                          f'{MANIFEST_FILE}); refusing to replace it')


def convert_file(input_path: str, output_dir: str, model_config: Mapping[str, Any],
                 overwrite: bool = False) -> dict[str, Any]:
  """Converts a PyTorch / safetensors checkpoint into ``output_dir`` for ``load_variables``.

  Everything is checked before anything is written; the directory is written under a temporary
  name beside ``output_dir`` and renamed, so an error leaves no output.

  Args:
    input_path: .pth / .pt / .pth.tar / .safetensors file (module doc: accepted layouts).
    output_dir: the directory to create (may exist empty; with ``overwrite``, may hold an earlier
      conversion, which is replaced).
    model_config: ``config.model`` of the model the weights are for.
    overwrite: replace an earlier conversion in ``output_dir``.
  Returns:
    The report (``build_report``), also saved as report.json / report.txt in ``output_dir``.
  Raises:
    FileNotFoundError: no input file. FileExistsError: ``output_dir`` not replaceable.
    ValueError naming the file or config field for everything else (module doc).
  """
  _prepare_output(output_dir, overwrite)
  source = read_checkpoint(input_path)
  conversion = convert_state_dict(source.tensors, model_config, name=input_path)
  report = build_report(source, conversion, model_config, output_dir)
  staging = staging_lib.staging_dir(output_dir)
  try:
    _write_directory(staging, conversion, report)
    if os.path.exists(output_dir):
      retired = staging + '-old'
      os.rename(output_dir, retired)
      os.rename(staging, output_dir)
      shutil.rmtree(retired)
    else:
      os.rename(staging, output_dir)
  except BaseException:
    shutil.rmtree(staging, ignore_errors=True)
    raise
  return report


# ----------------------------------------------------------------------------- loading


def read_manifest(directory: str) -> dict[str, Any]:
  """The manifest.json of a converted directory (model_config, complete, source, filled, fresh).

  Raises:
    FileNotFoundError naming ``directory`` when it or its manifest is missing.
    ValueError naming the manifest when it is not one this version writes.
  """
  if not os.path.isdir(directory):
    raise FileNotFoundError(f'{directory}: no such converted-weights directory')
  path = os.path.join(directory, MANIFEST_FILE)
  if not os.path.isfile(path):
    raise FileNotFoundError(f'{directory}: no {MANIFEST_FILE}: not a directory written by '
                            'scripts/convert_torch_weights.py')
  try:
    with open(path) as f:
      manifest = json.load(f)
  except (OSError, ValueError) as e:
    raise ValueError(f'{path}: unreadable manifest: {e}') from e
  if (not isinstance(manifest, dict) or manifest.get('format') != FORMAT_NAME
      or manifest.get('version') != FORMAT_VERSION):
    raise ValueError(f'{path}: not a {FORMAT_NAME} manifest of version {FORMAT_VERSION}')
  return manifest


def check_model_config(manifest: Mapping[str, Any], model_config: Mapping[str, Any],
                       directory: str) -> None:
  """Raises ValueError naming each config.model field that differs from the converted one.

  Compared: arch, ibn_mode, in_channels, width; for a complete conversion also num_classes,
  num_low_level_features, aspp_channels, decoder_channels, low_level_channels.
  """
  converted = manifest['model_config']
  config = model_config_dict(model_config)
  fields = BACKBONE_FIELDS + (HEAD_FIELDS if manifest['complete'] else ())
  differ = [f'config.model.{field}={config.get(field)!r} (converted for '
            f'{converted.get(field)!r})' for field in fields
            if config.get(field) != converted.get(field)]
  if differ:
    raise ValueError(f'{directory}: converted for another model: ' + '; '.join(differ))


def load_variables(directory: str,
                   model_config: Mapping[str, Any] | None = None) -> dict[str, Any]:
  """Reads a directory written by ``convert_file`` / scripts/convert_torch_weights.py.

  Args:
    directory: the converted-weights directory.
    model_config: when given, ``check_model_config`` verifies the directory was converted for it.
  Returns:
    {'params': ..., 'batch_stats': ...} nested dicts of float32 numpy arrays: every variable of
    a full DeepLabV3+ checkpoint, or only the backbone's (fresh leaves are absent) for an
    ImageNet file; ``read_manifest(directory)['complete']`` tells which.
  Raises:
    FileNotFoundError naming the directory or file that is missing; ValueError for a corrupt
    directory or a config mismatch.
  """
  manifest = read_manifest(directory)
  if model_config is not None:
    check_model_config(manifest, model_config, directory)
  path = os.path.join(directory, VARIABLES_FILE)
  if not os.path.isfile(path):
    raise FileNotFoundError(f'{directory}: no {VARIABLES_FILE}')
  flat = read_safetensors(path)
  if set(flat) != set(manifest['filled']):
    extra = sorted(set(flat) - set(manifest['filled']))
    absent = sorted(set(manifest['filled']) - set(flat))
    raise ValueError(f'{path}: does not match {MANIFEST_FILE}: unlisted {extra}, absent {absent}')
  variables = {'params': {}, 'batch_stats': {}}
  variables.update(unflatten({tuple(key.split('/')): value for key, value in flat.items()}))
  return variables


__all__ = [
    'ACCEPTED_BACKBONE_VARIANTS', 'Conversion', 'Plan', 'SourceFile', 'SourceLayout',
    'build_report', 'check_model_config', 'convert_file', 'convert_state_dict', 'describe_source',
    'flax_path_to_torch_key', 'format_report', 'load_variables', 'model_config_dict',
    'plan_conversion', 'read_checkpoint', 'read_manifest', 'state_dict_to_variables',
    'torch_key_to_module_path', 'variable_shapes',
]
