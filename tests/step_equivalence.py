"""One train step on two device layouts (1 vs 8 devices, 2 processes vs 1): run it, compare it.

Shared by test_train (8 devices against one) and test_multiprocess (two processes against one
with four devices).
"""

import jax
import ml_collections
import numpy as np

from agrivision_jax import experiment
from agrivision_jax import optim
from agrivision_jax import train


def flat(variables) -> dict[str, np.ndarray]:
  """{keystr(path): numpy leaf} of a (possibly sharded) pytree."""
  return {jax.tree_util.keystr(k): np.asarray(v)
          for k, v in jax.tree_util.tree_leaves_with_path(jax.device_get(variables))}


def relative_difference(a: dict, b: dict, reference: dict, keys: list[str]) -> float:
  """||a - b|| / ||reference|| over the leaves ``keys`` (all leaves as one vector)."""
  norm = lambda f: np.sqrt(sum(np.sum(np.square(f(k)), dtype=np.float64) for k in keys))
  return norm(lambda k: a[k] - b[k]) / norm(lambda k: reference[k])


def assert_same_step(loss: float, variables: dict, ref_loss: float, ref_variables: dict,
                     init: dict) -> None:
  """One train step on two device layouts agrees up to float32 reduction-order noise.

  The loss to 1e-5 relative, the norm statistics to 1e-4 of their norm, and the gradient
  all-reduce through the logits layer's bias (its gradient is the pixel mean of d loss / d logits,
  which depends on the forward only) to 1e-3 of its update. The whole parameter update only to
  0.25 of its norm: this width-8 network at 32 px switches a few ReLU / max-pool / Lovasz-order
  choices under 1e-7 forward noise, which moved the update by 1e-4 to 8e-2 across seeds 0-2
  (two processes against one); a missing all-reduce or per-device statistics give differences of
  order 1.
  """
  np.testing.assert_allclose(loss, ref_loss, rtol=1e-5)
  assert variables.keys() == ref_variables.keys() == init.keys()
  params = [k for k in init if k.startswith("['params']")]
  stats = [k for k in init if k.startswith("['batch_stats']")]
  head = [k for k in params if "['last_conv_8']['bias']" in k]
  assert params and stats and head
  assert relative_difference(variables, ref_variables, ref_variables, stats) < 1e-4
  update = {k: ref_variables[k] - init[k] for k in params}
  assert relative_difference(ref_variables, init, init, params) > 1e-3  # the step moved them
  assert relative_difference(variables, ref_variables, update, head) < 1e-3
  assert relative_difference(variables, ref_variables, update, params) < 0.25


def initial_variables(config: ml_collections.ConfigDict) -> dict[str, np.ndarray]:
  """The flat initial variables of ``config``'s model."""
  return flat(experiment.initial_variables(config, experiment.create_model(config)))


def one_step(config: ml_collections.ConfigDict, devices: list, batch: dict[str, np.ndarray]
             ) -> tuple[float, dict[str, np.ndarray]]:
  """(loss, flat variables) after one train step of the global ``batch`` on ``devices``."""
  model = experiment.create_model(config)
  tx = optim.create_optimizer(config.optim)
  mesh = experiment.create_mesh(devices)
  state = experiment.create_train_state(config, model, tx, mesh)
  step = train.make_train_step(config, model, mesh)
  state, (metrics, _) = step(state, experiment.shard_batch(batch, mesh))
  return float(metrics.compute()['loss']), flat({'params': state.params,
                                                 'batch_stats': state.batch_stats})
