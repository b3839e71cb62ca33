"""workdir.lock: one holder at a time; a SIGKILLed holder's lock is taken over."""

import os
import signal
import socket
import subprocess
import sys
import textwrap

import pytest

from agrivision_jax import workdir as workdir_lib

_HOLDER = textwrap.dedent('''
    import sys, time
    from agrivision_jax import workdir
    with workdir.lock(sys.argv[1]):
      print('LOCKED', flush=True)
      time.sleep(600)
''')


@pytest.mark.slow
def test_second_holder_is_refused_until_the_first_is_killed(tmp_path):
  workdir = str(tmp_path / 'run')
  holder = subprocess.Popen([sys.executable, '-c', _HOLDER, workdir], stdout=subprocess.PIPE,
                            text=True, env={**os.environ, 'PYTHONPATH': os.getcwd()})
  try:
    assert holder.stdout.readline().strip() == 'LOCKED'
    with pytest.raises(workdir_lib.WorkdirBusyError) as busy:
      with workdir_lib.lock(workdir):
        pass
    assert str(busy.value).startswith(
        f'workdir {workdir} is in use by pid {holder.pid} on host {socket.gethostname()} ')
  finally:
    holder.send_signal(signal.SIGKILL)
    holder.wait()
  assert holder.returncode == -signal.SIGKILL
  with workdir_lib.lock(workdir):
    with open(os.path.join(workdir, '.lock')) as f:
      assert f.read() == f'{os.getpid()} {socket.gethostname()}\n'
    with pytest.raises(workdir_lib.WorkdirBusyError, match=f'pid {os.getpid()} '):
      with workdir_lib.lock(workdir):   # also refused within one process (a new open file)
        pass
  with workdir_lib.lock(workdir):   # released on exit
    pass
