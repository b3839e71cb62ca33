"""PyTorch weights -> Flax variables for the DeepLabV3+ / IBN-ResNet models.

Name rule (torch key -> flax path), driven by the flax ``template``:

1. Split the key at '.'. Every purely numeric component is joined to the component before it
   with '_': ``backbone.layer1.0.downsample.1.weight`` -> module path
   ``backbone/layer1_0/downsample_1``, leaf ``weight``; ``decoder.bottlenecks.2.0.weight`` ->
   ``decoder/bottlenecks_2_0``; ``aspp.global_avg_pool.1.weight`` -> ``aspp/global_avg_pool_1``.
2. The leaf maps by name:

   ================  ===============================  =============================================
   torch leaf        flax variable                    layout
   ================  ===============================  =============================================
   weight (conv)     params/<path>/kernel             OIHW -> HWIO (transpose 2, 3, 1, 0)
   weight (norm)     params/<path>/scale              flattened to (C,) (SN stores (1, C, 1, 1))
   bias              params/<path>/bias               flattened to (C,)
   running_mean      batch_stats/<path>/mean          flattened to (C,) (SN stores (1, C, 1))
   running_var       batch_stats/<path>/var           flattened to (C,)
   mean_weight       params/<path>/mean_weight        as is (SN)
   var_weight        params/<path>/var_weight         as is (SN)
   num_batches_tracked  (dropped: no flax counterpart)
   ================  ===============================  =============================================

   A ``weight`` is a conv kernel when the template has ``<path>/kernel`` and a norm scale when it
   has ``<path>/scale``.

``state_dict_to_variables`` applies this rule strictly to any template (every key lands on a leaf
of the template's shape, every leaf is filled). On top of it, ``convert_file`` turns a checkpoint
file into a directory that ``load_variables`` reads:

* Files: ``.pth`` / ``.pt`` / ``.pth.tar`` (``torch.load(weights_only=True)``; torch is imported
  only for these) and ``.safetensors`` (numpy API, no torch). A ``{'state_dict': ...}`` or
  ``{'model': ...}`` wrapper is unwrapped (its other entries, e.g. ``epoch``, are ignored and
  reported) and a ``module.`` prefix on every key (DataParallel / DDP) is stripped.
* Layouts: an ImageNet backbone (torchvision ``conv1``, ``bn1``, ``layerL.i.*``, ``fc.*``; IBN-Net
  ``layerL.i.bn1.IN|BN.*``, IBN-b's ``layerL.i.IN.*`` and InstanceNorm stem ``bn1``) converts to
  the backbone only; a DeepLabV3+ checkpoint of the authors' code (``backbone.*``, ``aspp.*``,
  ``decoder.*``) converts to every variable.
* Which file a ``config.model.ibn_mode`` accepts (``ACCEPTED_BACKBONE_VARIANTS``):

  ========  ==========================  ================================================
  ibn_mode  ImageNet backbone file      left freshly initialised (listed in the report)
  ========  ==========================  ================================================
  none      torchvision ResNet          the DeepLabV3+ head
  a         IBN-Net IBN-a               the head
  b         IBN-Net IBN-b               the head
  s         IBN-a (or IBN-s)            the head; from IBN-a also every SwitchableNorm
                                        (the IBN-a IN|BN tensors there are ignored), as
                                        the authors' loader does
  ab        IBN-a (or IBN-ab)           the head; from IBN-a also the InstanceNorm after
                                        the add of the last block of stages 1 and 2
  ========  ==========================  ================================================

  A DeepLabV3+ checkpoint converts only to the ibn_mode it was trained with, and fills everything.
* A 3-channel file for an ``in_channels=4`` model: the first conv gets a 4th input filter (NIR)
  copied from its R filter (input order R, G, B, NIR), as the authors' ``convert_model``.
* Strict accounting: every source tensor is used or ignored for a stated reason (``fc.*``,
  ``num_batches_tracked``, InstanceNorm running statistics of PyTorch < 0.4 files, IBN-a norms
  where the model has SN); every flax leaf is filled or fresh for a stated reason. Any other
  unknown key, shape mismatch or missing key is one ValueError listing all of them, and nothing is
  written.

Output directory: ``variables.safetensors`` (the filled leaves, keys ``params/backbone/conv1/
kernel``...), ``manifest.json`` (model config it was converted for, source, filled and fresh
leaves), ``report.json`` and ``report.txt``. It is written to a temporary sibling and renamed.
"""

from agrivision_jax.convert.files import (SAFETENSORS_SUFFIXES, TORCH_SUFFIXES, SourceFile,
                                          read_checkpoint)
from agrivision_jax.convert.names import (flax_path_to_torch_key, state_dict_to_variables,
                                          torch_key_to_module_path)
from agrivision_jax.convert.output import (FORMAT_NAME, FORMAT_VERSION, MANIFEST_FILE,
                                           REPORT_JSON_FILE, REPORT_TEXT_FILE, VARIABLES_FILE,
                                           build_report, check_model_config, convert_file,
                                           format_report, load_variables, read_manifest)
from agrivision_jax.convert.plan import (ACCEPTED_BACKBONE_VARIANTS, VARIANT_NAMES, Conversion,
                                         Plan, SourceLayout, convert_state_dict, describe_source,
                                         model_config_dict, plan_conversion, variable_shapes)

__all__ = [
    'ACCEPTED_BACKBONE_VARIANTS', 'FORMAT_NAME', 'FORMAT_VERSION', 'MANIFEST_FILE',
    'REPORT_JSON_FILE', 'REPORT_TEXT_FILE', 'SAFETENSORS_SUFFIXES', 'TORCH_SUFFIXES',
    'VARIABLES_FILE', 'VARIANT_NAMES', 'Conversion', 'Plan', 'SourceFile', 'SourceLayout',
    'build_report', 'check_model_config', 'convert_file', 'convert_state_dict', 'describe_source',
    'flax_path_to_torch_key', 'format_report', 'load_variables', 'model_config_dict',
    'plan_conversion', 'read_checkpoint', 'read_manifest', 'state_dict_to_variables',
    'torch_key_to_module_path', 'variable_shapes',
]
