"""The paper's schedule and SGD, against hand-computed values and torch.optim.SGD."""

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import optax
import pytest
import torch

from agrivision_jax import optim


def paper_optim(**overrides) -> ml_collections.ConfigDict:
  config = ml_collections.ConfigDict(dict(
      learning_rate=0.01, momentum=0.9, weight_decay=5e-4, warmup_steps=1000,
      constant_steps=7000, decay_steps=17000, power=0.9))
  config.update(overrides)
  return config


@pytest.mark.parametrize('it, expected', [
    (0, 0.01 * 1 / 1000),            # first warmup iteration: lr * (0 + 1) / 1000
    (499, 0.01 * 500 / 1000),
    (999, 0.01),                     # last warmup iteration reaches lr
    (1000, 0.01),                    # constant phase
    (7999, 0.01),                    # last constant iteration
    (8000, 0.01),                    # first poly iteration: (1 - 0/17000)**0.9
    (16500, 0.01 * 0.5 ** 0.9),      # half-way through the decay
    (24999, 0.01 * (1 / 17000) ** 0.9),  # last of the 25,000 iterations
])
def test_schedule_matches_hand_computed_values(it, expected):
  assert float(optim.schedule(paper_optim())(it)) == pytest.approx(expected, rel=1e-5)


def authors_lr(cur_iter: int, config) -> float:
  """The authors' adjust_learning_rate, re-stated in plain Python."""
  if cur_iter < config.warmup_steps:
    scale = (cur_iter + 1) / config.warmup_steps
  elif cur_iter < config.warmup_steps + config.constant_steps:
    scale = 1.0
  else:
    done = cur_iter - config.warmup_steps - config.constant_steps
    scale = (1.0 - done / config.decay_steps) ** config.power
  return config.learning_rate * scale


def test_schedule_equals_authors_formula_at_every_iteration_of_a_short_run():
  config = paper_optim(warmup_steps=7, constant_steps=5, decay_steps=11, learning_rate=0.3)
  lr = jax.jit(jax.vmap(optim.schedule(config)))(jnp.arange(23))
  expected = [authors_lr(i, config) for i in range(23)]
  np.testing.assert_allclose(np.asarray(lr), expected, rtol=1e-6)


def test_sgd_matches_torch_sgd_with_weight_decay_and_momentum_for_several_steps():
  config = paper_optim(warmup_steps=3, constant_steps=2, decay_steps=4, learning_rate=0.5,
                       weight_decay=0.05)
  rng = np.random.default_rng(0)
  params = {'conv': {'kernel': rng.normal(size=(3, 3, 2, 5)).astype(np.float32)},
            'bn': {'scale': rng.normal(size=(5,)).astype(np.float32)}}
  grads = [jax.tree.map(lambda p: rng.normal(size=p.shape).astype(np.float32), params)
           for _ in range(9)]

  tx = optim.create_optimizer(config)
  state = tx.init(params)
  jax_params = params
  for g in grads:
    updates, state = tx.update(g, state, jax_params)
    jax_params = optax.apply_updates(jax_params, updates)

  leaves = [torch.nn.Parameter(torch.tensor(p)) for p in jax.tree.leaves(params)]
  sgd = torch.optim.SGD(leaves, lr=config.learning_rate, momentum=config.momentum,
                        weight_decay=config.weight_decay)
  for it, g in enumerate(grads):
    for group in sgd.param_groups:
      group['lr'] = authors_lr(it, config)
    for leaf, grad in zip(leaves, jax.tree.leaves(g)):
      leaf.grad = torch.tensor(grad)
    sgd.step()
  for ours, theirs in zip(jax.tree.leaves(jax_params), leaves):
    np.testing.assert_allclose(np.asarray(ours), theirs.detach().numpy(), rtol=1e-5, atol=1e-6)
