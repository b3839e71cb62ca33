"""Staging folders: a SIGKILLed writer's folder is removed by the next writer; live ones stay."""
import os
import socket
import subprocess
import sys

from agrivision_jax import staging


def _dead_pid() -> int:
  process = subprocess.Popen([sys.executable, '-c', 'pass'])
  process.wait()
  return process.pid


def test_stale_staging_folders_of_dead_processes_are_removed(tmp_path):
  target = tmp_path / 'converted'
  host = socket.gethostname()
  stale = tmp_path / f'.converted.tmp-{host}-{_dead_pid()}-abcd'
  live = tmp_path / f'.converted.tmp-{host}-{os.getpid()}-abcd'
  other_host = tmp_path / f'.converted.tmp-elsewhere-{_dead_pid()}-abcd'
  other_target = tmp_path / f'.other.tmp-{host}-{_dead_pid()}-abcd'
  for folder in (stale, live, other_host, other_target):
    folder.mkdir()
    (folder / 'part.bin').write_bytes(b'x')
  new = staging.staging_dir(str(target))
  assert os.path.isdir(new) and not os.listdir(new)
  assert os.path.basename(new).startswith(f'.converted.tmp-{host}-{os.getpid()}-')
  assert not stale.exists()
  assert live.exists() and other_host.exists() and other_target.exists()


def test_killed_generation_leaves_nothing_after_the_next_run(tmp_path):
  """A synthetic-data writer killed with SIGKILL mid-write; the next call cleans up and writes."""
  from agrivision_jax.data import synthetic  # pylint: disable=g-import-not-at-top
  data_dir = tmp_path / 'synthetic'
  code = ('import os, signal\n'
          'from agrivision_jax.data import synthetic\n'
          'def killed(*args, **kwargs):\n'
          '  os.kill(os.getpid(), signal.SIGKILL)\n'
          'synthetic.generate = killed\n'
          f'synthetic.ensure_synthetic({str(data_dir)!r}, num_train=2, num_val=1, num_test=1, '
          'size=32, seed=0, version="2020")\n')
  result = subprocess.run([sys.executable, '-c', code], check=False)
  assert result.returncode == -9
  leftovers = [p for p in os.listdir(tmp_path) if '.tmp-' in p]
  assert len(leftovers) == 1
  synthetic.ensure_synthetic(str(data_dir), num_train=2, num_val=1, num_test=1, size=32, seed=0,
                             version='2020')
  assert [p for p in os.listdir(tmp_path) if '.tmp-' in p] == []
  assert (data_dir / synthetic.METADATA_FILE).exists()
