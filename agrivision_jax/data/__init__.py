"""Agriculture-Vision data: layout, sources (directory, TFDS), grain pipelines, synthetic data."""
from agrivision_jax.data.layout import BadFileError
from agrivision_jax.data.layout import class_names
from agrivision_jax.data.pipeline import create_eval_iterator
from agrivision_jax.data.pipeline import create_train_iterator
from agrivision_jax.data.pipeline import normalize
from agrivision_jax.data.sources import create_source
from agrivision_jax.data.sources import DirectorySource
from agrivision_jax.data.sources import TfdsSource

__all__ = [
    'BadFileError', 'DirectorySource', 'TfdsSource', 'class_names', 'create_eval_iterator',
    'create_source', 'create_train_iterator', 'normalize',
]
