"""Paper hyperparameters (Yang et al., CVPR 2020 workshop) and the shared variant parser.

Every row config (``resnet.py``, ``ibn_a.py``, ``ibn_b.py``, ``ibn_s.py``) starts from
``get_config`` here and differs only in ``model.ibn_mode`` and its default loss. Variants are
comma-separated after the file name, e.g. ``--config=configs/ibn_s.py:depth=50,loss=bce_dice,demo``:

  depth=20|50|101                     model.arch resnet20 | resnet50 | resnet101 (default 101;
                                      resnet20 has no ImageNet weights: init_from=scratch)
  loss=bce|bce_dice|bce_lovasz|hybrid (lambda_dice, lambda_lovasz) = (0,0) | (1,0) | (0,1) | (1,1)
  modality=nrgb|rgb|nir               data.modality (the model reads 4 | 3 | 3 channels)
  authors                             the authors' released code where it differs from the paper
                                      text (``AUTHORS`` below: 30k schedule, groups of 16, ...)
  demo                                synthetic data, tiny model, 1500 steps: learns on 2 CPU cores

Any field can then be overridden on the command line with ``--config.a.b=value``; the result is
checked by ``agrivision_jax.configuration.validate`` before anything is computed.
"""

import math
import os

import ml_collections

DEPTHS = {'20': 'resnet20', '50': 'resnet50', '101': 'resnet101'}
# (lambda_dice, lambda_lovasz) of L = (BCE + l1*Dice + l2*Lovasz) / (1 + l1 + l2); Table 3's grid.
LOSSES = {'bce': (0.0, 0.0), 'bce_dice': (1.0, 0.0), 'bce_lovasz': (0.0, 1.0), 'hybrid': (1.0, 1.0)}
MODALITIES = ('nrgb', 'rgb', 'nir')
FLAG_VARIANTS = ('authors', 'demo')
VALUE_VARIANTS = {'depth': DEPTHS, 'loss': LOSSES, 'modality': MODALITIES}

# The authors' released code (github.com/LAOS-Y/AgriVision) where it differs from the paper's
# text, which the defaults follow: (field, paper default, authors' value, where in their code).
# Their run: 2 GPUs (train.sh: torch.distributed.launch) x 16 images, 12,901 train tiles
# (Agriculture-Vision 2020); an epoch is len(loader_train) = ceil(12,901 / 2) // 16 = 403
# iterations (DistributedSampler, drop_last=True).
_YAML = 'config/agri-resnet101dilated-ibn@a-deeplab-low_feat@3-bce+dice+lovasz-aug-warmup@2000.yaml'
AUTHORS_TRAIN_TILES = 12901
AUTHORS_GPUS, AUTHORS_BATCH_PER_GPU = 2, 16
AUTHORS_EPOCH_STEPS = math.ceil(AUTHORS_TRAIN_TILES / AUTHORS_GPUS) // AUTHORS_BATCH_PER_GPU
AUTHORS = (
    ('optim.warmup_steps', 1000, 2000, f'{_YAML}: TRAIN.iter_warmup'),
    ('optim.constant_steps', 7000, 8000, f'{_YAML}: TRAIN.iter_static'),
    ('optim.decay_steps', 17000, 20000, f'{_YAML}: TRAIN.iter_decay'),
    ('num_train_steps', 25000, (2000 + 8000 + 20000) // AUTHORS_EPOCH_STEPS * AUTHORS_EPOCH_STEPS,
     'train.py main(): num_epoch = (iter_warmup + iter_static + iter_decay) // epoch_iters '
     '= 30000 // 403 = 74 whole epochs of 403 iterations'),
    ('eval_every_steps', 2500, AUTHORS_EPOCH_STEPS,
     'train.py main(): val() after every epoch'),
    ('checkpoint_every_steps', 1000, AUTHORS_EPOCH_STEPS,
     'train.py main(): checkpoint() after every epoch'),
    ('loss.bce_over_all_pixels', False, True,
     'train.py train(): pred[~mask] = -INF_FP16 before loss_fn, so the BCE mean counts every '
     'element'),
    ('loss.group_size', 0, AUTHORS_BATCH_PER_GPU,
     'train.py: DDP, the loss of each GPU over its TRAIN.batch_size_per_gpu = 16 images'),
    ('model.sn_group_size', 0, AUTHORS_BATCH_PER_GPU,
     'train.py: apex convert_syncbn_model syncs BatchNorm only; the SwitchNorm of '
     'model/backbone/resnet.py uses each GPU\'s 16 images'),
    ('data.eval_batch_size', 32, 16, f'{_YAML}: VAL.batch_size_per_gpu 8 on 2 GPUs'),
    ('log_every_steps', 50, 20, f'{_YAML}: TRAIN.disp_iter'),
)
# Not switched: MODEL.fp16 (apex amp O1 float16; float16 is no dtype choice here) and keeping
# every epoch's checkpoint (74 full-size checkpoints).
DEMO_DATA_DIR = os.path.join(
    os.environ.get('XDG_CACHE_HOME') or os.path.join(os.path.expanduser('~'), '.cache'),
    'agrivision_jax', 'synthetic_demo_64px_512')


def parse_variants(arg: str) -> dict[str, str]:
  """Parses ``'depth=50,loss=hybrid,demo'`` into ``{'depth': '50', 'loss': 'hybrid', 'demo': ''}``.

  Args:
    arg: the text after ``:`` in ``--config=FILE:arg``; '' or None means no variants.

  Returns:
    Variant name -> value ('' for the flag variant ``demo``).

  Raises:
    ValueError: naming an unknown variant, an unknown value, or a repeated variant.
  """
  variants: dict[str, str] = {}
  for token in filter(None, (t.strip() for t in (arg or '').split(','))):
    name, has_value, value = token.partition('=')
    if name in FLAG_VARIANTS and not has_value:
      pass
    elif name in VALUE_VARIANTS and has_value:
      if value not in VALUE_VARIANTS[name]:
        raise ValueError(f"config variant '{name}={value}': {name} must be one of "
                         f"{sorted(VALUE_VARIANTS[name])}")
    else:
      known = [*FLAG_VARIANTS, *(f'{k}=...' for k in VALUE_VARIANTS)]
      raise ValueError(f"unknown config variant '{token}'; known variants: {known}")
    if name in variants:
      raise ValueError(f"config variant '{name}' given twice in '{arg}'")
    variants[name] = value
  return variants


def base_config() -> ml_collections.ConfigDict:
  """The paper's full-size set-up: ResNet-101, 512x512 NRGB, batch 32, 25,000 SGD iterations."""
  config = ml_collections.ConfigDict()
  config.seed = 42

  config.model = ml_collections.ConfigDict()
  config.model.arch = 'resnet101'
  config.model.ibn_mode = 'none'
  config.model.output_stride = 16
  config.model.multi_grid = (1, 2, 4)
  config.model.num_low_level_features = 3
  config.model.dtype = 'float32'
  config.model.width = 64
  config.model.aspp_channels = 256
  config.model.decoder_channels = 256
  config.model.low_level_channels = 48
  # Convolution kernels: 'auto' = 'cpu_gemm' on the CPU backend, 'xla' on GPU / TPU.
  config.model.conv_impl = 'auto'
  # Images per SwitchableNorm statistics group in training (0 = the whole global batch, synced);
  # the authors' DDP run had 16 per GPU, unsynced. BatchNorm always uses the global batch.
  config.model.sn_group_size = 0

  config.data = ml_collections.ConfigDict()
  config.data.source = 'directory'
  config.data.data_dir = ''
  config.data.version = '2020'
  config.data.modality = 'nrgb'
  config.data.image_size = 512
  config.data.batch_size = 32
  config.data.eval_batch_size = 32
  config.data.num_workers = 8
  config.data.on_bad_example = 'error'
  config.data.augment = ml_collections.ConfigDict(
      dict(shift_scale_aspect=True, hflip=True, vflip=True, rot90=True))
  config.data.synthetic = ml_collections.ConfigDict(
      dict(num_train=64, num_val=16, num_test=16, size=512, seed=0))

  config.loss = ml_collections.ConfigDict()
  config.loss.lambda_dice = 1.0
  config.loss.lambda_lovasz = 0.0
  config.loss.lovasz_per_image = False
  config.loss.dice_per_class = False
  config.loss.bce_over_all_pixels = False
  # Images per loss group (0 = the whole global batch): the loss is the mean over groups of the
  # hybrid loss of each group; 16 = the authors' 2-GPU x 16 DDP objective.
  config.loss.group_size = 0

  config.optim = ml_collections.ConfigDict()
  config.optim.learning_rate = 0.01
  config.optim.momentum = 0.9
  config.optim.weight_decay = 5e-4
  config.optim.warmup_steps = 1000
  config.optim.constant_steps = 7000
  config.optim.decay_steps = 17000
  config.optim.power = 0.9

  config.num_train_steps = 25000
  config.log_every_steps = 50
  config.eval_every_steps = 2500
  config.checkpoint_every_steps = 1000
  config.max_checkpoints_to_keep = 3
  # A converted ImageNet (or full) weights directory, or 'scratch' for random initialisation;
  # required unless data.source='synthetic' (configuration.imagenet_weights names the file).
  config.init_from = ''
  # Which checkpoint --mode=evaluate|divergence|predict|field restore: 'latest', 'best' or a step.
  config.restore = 'latest'
  # Multi-host: call jax.distributed.initialize() (auto-detected on TPU pods, SLURM, Open MPI,
  # Kubernetes; or set JAX_COORDINATOR_ADDRESS, JAX_NUM_PROCESSES, JAX_PROCESS_ID).
  config.distributed = False

  # --mode=divergence (Figure 2); num_images=0 means the whole split.
  config.divergence = ml_collections.ConfigDict(dict(
      split='val', num_images=0, batch_size=8, valid_only=False, random_init=False,
      pairing='replicate', var_floor=0.01, pooling='image'))
  # --mode=predict: submission PNGs, TTA ('none' | 'flips' | 'd4'), overlays.
  config.predict = ml_collections.ConfigDict(dict(
      split='val', tta='none', num_overlays=8, batch_size=8))
  # --mode=field: whole-field sliding-window inference on GeoTIFF or RGB + NIR image files.
  config.field = ml_collections.ConfigDict(dict(
      inputs='', output_dir='', band_order='RGBN', overlap=128, tta='none', batch_size=8,
      nodata=-1.0, preview_size=2048))
  return config


def apply_demo(config: ml_collections.ConfigDict) -> None:
  """Shrinks ``config`` in place to the demo: synthetic 64 px tiles and a width-8 model.

  Two CPU cores train it to a clearly learned model within 10 minutes, compilation included
  (docs/reproduce.md states the measured time and val mIoU).
  """
  config.model.width = 8
  config.model.aspp_channels = 32
  config.model.decoder_channels = 32
  config.model.low_level_channels = 8
  config.data.source = 'synthetic'
  # A per-user cache folder (not the shared temp folder); its files are checked against the
  # checksums in its synthetic.json before every use.
  config.data.data_dir = DEMO_DATA_DIR
  config.data.image_size = 64
  config.data.batch_size = 8
  config.data.eval_batch_size = 8
  config.data.num_workers = 0
  config.field.overlap = 16  # a quarter of the 64 px window, as 128 of 512
  config.data.synthetic.update(dict(num_train=512, num_val=32, num_test=16, size=64, seed=0))
  config.optim.learning_rate = 0.05
  config.optim.warmup_steps = 50
  config.optim.constant_steps = 700
  config.optim.decay_steps = 750
  config.num_train_steps = 1500
  config.log_every_steps = 50
  config.eval_every_steps = 500
  config.checkpoint_every_steps = 500


def apply_authors(config: ml_collections.ConfigDict) -> None:
  """Sets every field of ``AUTHORS`` to the authors' value, in place."""
  for field, _, value, _ in AUTHORS:
    *groups, name = field.split('.')
    parent = config
    for group in groups:
      parent = parent[group]
    parent[name] = value


def get_config(arg: str | None = None, *, ibn_mode: str = 'none',
               default_loss: str = 'bce_dice') -> ml_collections.ConfigDict:
  """Builds the config of one paper row.

  Args:
    arg: comma-separated variants (module docstring), e.g. 'depth=50,demo'.
    ibn_mode: 'none' | 'a' | 'b' | 's' | 'ab' (the row files pass theirs).
    default_loss: the loss variant used when ``arg`` names none.

  Returns:
    The ConfigDict with the contract's fields.
  """
  variants = parse_variants(arg or '')
  config = base_config()
  config.model.ibn_mode = ibn_mode
  config.model.arch = DEPTHS[variants.get('depth', '101')]
  config.loss.lambda_dice, config.loss.lambda_lovasz = LOSSES[variants.get('loss', default_loss)]
  config.data.modality = variants.get('modality', 'nrgb')
  if 'authors' in variants:
    apply_authors(config)
  if 'demo' in variants:
    apply_demo(config)
    if 'authors' in variants:  # two groups per batch, as the authors' two GPUs
      config.model.sn_group_size = config.loss.group_size = config.data.batch_size // 2
  return config
