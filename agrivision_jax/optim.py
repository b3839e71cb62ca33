"""The paper's optimiser: SGD with momentum, weight decay on every parameter, warmup-constant-poly lr.

Matches the authors' PyTorch ``torch.optim.SGD(lr, momentum, weight_decay)`` step by step: the decay
term ``weight_decay * param`` is added to the gradient *before* the momentum buffer
(``buf = momentum * buf + grad + wd * param``; ``param -= lr * buf``), and the learning rate of
iteration ``it`` (0-based, the number of updates already applied) is set before that update.
"""

import jax.numpy as jnp
import ml_collections
import optax


def schedule(optim_config: ml_collections.ConfigDict) -> optax.Schedule:
  """The authors' per-iteration learning rate.

  For iteration ``it`` (0-based): ``lr * (it + 1) / warmup`` while ``it < warmup``; ``lr`` while
  ``it < warmup + constant``; then ``lr * (1 - (it - warmup - constant) / decay) ** power`` (0 once the decay is over).

  Args:
    optim_config: ``config.optim`` (learning_rate, warmup_steps, constant_steps, decay_steps, power).

  Returns:
    An optax schedule: int scalar step -> float32 scalar learning rate.
  """
  lr = optim_config.learning_rate
  warmup = optim_config.warmup_steps
  constant = optim_config.constant_steps
  decay = optim_config.decay_steps
  power = optim_config.power

  def learning_rate(step):
    it = jnp.asarray(step, jnp.float32)
    warm = (it + 1.0) / max(warmup, 1)
    # (decay - done) / decay rather than 1 - done / decay: exact numerator near the end.
    poly = jnp.maximum((decay - (it - warmup - constant)) / max(decay, 1), 0.0) ** power
    scale = jnp.where(it < warmup, warm, jnp.where(it < warmup + constant, 1.0, poly))
    return lr * scale

  return learning_rate


def create_optimizer(optim_config: ml_collections.ConfigDict) -> optax.GradientTransformation:
  """SGD + momentum with L2 weight decay on every parameter, in PyTorch's order.

  Args:
    optim_config: ``config.optim`` (the schedule's fields plus momentum and weight_decay).

  Returns:
    ``optax.chain(add_decayed_weights(weight_decay), sgd(schedule, momentum))``; its state holds the
    momentum buffer (zeros at start, so the first step uses ``grad + wd * param`` as PyTorch does)
    and the update count that indexes the schedule.
  """
  return optax.chain(
      optax.add_decayed_weights(optim_config.weight_decay),
      optax.sgd(schedule(optim_config), momentum=optim_config.momentum),
  )
