"""Staging folders for atomic writes: built next to their target, renamed into place at the end.

A staging folder is named ``.<target name>.tmp-<host>-<pid>-<random>``, so that the folders of a
process killed with SIGKILL (which no ``finally`` can remove) are recognised and removed by the
next writer on the same host: ``staging_dir`` deletes every sibling staging folder of the same
target whose process no longer runs on this host. Folders of other hosts (a shared filesystem)
are left alone.
"""

import os
import re
import secrets
import shutil
import socket


def _pid_alive(pid: int) -> bool:
  try:
    os.kill(pid, 0)
  except ProcessLookupError:
    return False
  except PermissionError:  # another user's live process
    return True
  return True


def remove_stale(target: str) -> list[str]:
  """Deletes the staging folders of ``target`` left by dead processes of this host.

  Args:
    target: the folder the staging folders were for.

  Returns:
    The paths removed.
  """
  target = os.path.abspath(target)
  parent, name = os.path.dirname(target), os.path.basename(target)
  if not os.path.isdir(parent):
    return []
  pattern = re.compile(rf'\.{re.escape(name)}\.tmp-{re.escape(socket.gethostname())}-(\d+)-')
  removed = []
  for entry in os.listdir(parent):
    match = pattern.match(entry)
    if match and not _pid_alive(int(match.group(1))):
      path = os.path.join(parent, entry)
      shutil.rmtree(path, ignore_errors=True)
      removed.append(path)
  return removed


def staging_dir(target: str) -> str:
  """Creates and returns a new empty staging folder next to ``target`` (after ``remove_stale``).

  Args:
    target: the folder the caller will rename the staging folder to.
  """
  target = os.path.abspath(target)
  parent = os.path.dirname(target)
  os.makedirs(parent, exist_ok=True)
  remove_stale(target)
  path = os.path.join(parent, f'.{os.path.basename(target)}.tmp-{socket.gethostname()}-'
                              f'{os.getpid()}-{secrets.token_hex(4)}')
  os.mkdir(path)
  return path
