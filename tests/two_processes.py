"""Two Python processes on 127.0.0.1 that run one script together (jax.distributed over gloo)."""

import socket
import subprocess
import sys
from collections.abc import Callable


def free_address() -> str:
  """'127.0.0.1:<port>' of a port free right now (for the JAX coordinator)."""
  with socket.socket() as s:
    s.bind(('127.0.0.1', 0))
    return f'127.0.0.1:{s.getsockname()[1]}'


def run_two_processes(code: str, argv: Callable[[int], list[str]],
                      env: Callable[[int], dict[str, str]], timeout: float = 300,
                      cwd: str | None = None) -> list[str]:
  """Runs ``python -c code *argv(i)`` with environment ``env(i)`` for processes i = 0, 1.

  Returns:
    Each process's combined stdout and stderr; AssertionError (with the output's tail) when one
    exits non-zero. Both are killed when one times out.
  """
  workers = [subprocess.Popen([sys.executable, '-c', code, *argv(i)], env=env(i), cwd=cwd,
                              stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
             for i in range(2)]
  outputs = []
  for worker in workers:
    try:
      outputs.append(worker.communicate(timeout=timeout)[0])
    finally:
      worker.kill()
  for worker, output in zip(workers, outputs):
    assert worker.returncode == 0, output[-4000:]
  return outputs
