"""Tests of the start-up XLA flags and huge-page malloc relaunch."""

import os
import platform
import subprocess
import sys

from agrivision_jax import runtime

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def test_flags_keyed_by_jaxlib_release():
  assert runtime.cpu_flags('0.10.2') == runtime.CPU_FLAGS_BY_JAXLIB['0.10.']
  assert runtime.cpu_flags('0.11.0') == ()


def test_user_flags_win_and_others_are_appended(monkeypatch):
  monkeypatch.setattr(runtime.importlib.metadata, 'version', lambda name: '0.10.2')
  env = {'XLA_FLAGS': '--xla_cpu_experimental_ynn_fusion_type=default --foo=1'}
  assert runtime.configure_xla(env) == ()
  assert env['XLA_FLAGS'] == '--xla_cpu_experimental_ynn_fusion_type=default --foo=1'
  env = {'XLA_FLAGS': '--foo=1'}
  added = runtime.configure_xla(env)
  assert added == runtime.CPU_FLAGS_BY_JAXLIB['0.10.']
  assert env['XLA_FLAGS'] == '--foo=1 ' + ' '.join(added)
  env = {'AGRIVISION_DEFAULT_XLA': '1'}
  assert runtime.configure_xla(env) == () and 'XLA_FLAGS' not in env


def test_hugepage_tunables_only_where_they_help():
  env = {}
  assert runtime.hugepage_tunables(env, ('glibc', '2.36'), 'madvise') == 'glibc.malloc.hugetlb=1'
  env = {'GLIBC_TUNABLES': 'glibc.malloc.arena_max=2'}
  assert (runtime.hugepage_tunables(env, ('glibc', '2.35'), 'madvise') ==
          'glibc.malloc.arena_max=2:glibc.malloc.hugetlb=1')
  assert runtime.hugepage_tunables({}, ('glibc', '2.34'), 'madvise') is None  # no tunable yet
  assert runtime.hugepage_tunables({}, ('glibc', '2.36'), 'always') is None  # THP already on
  assert runtime.hugepage_tunables({}, ('glibc', '2.36'), 'never') is None
  assert runtime.hugepage_tunables({}, ('glibc', '2.36'), None) is None
  assert runtime.hugepage_tunables({}, ('', ''), 'madvise') is None  # musl, macOS
  opt_out = {'GLIBC_TUNABLES': 'glibc.malloc.hugetlb=0'}
  assert runtime.hugepage_tunables(opt_out, ('glibc', '2.36'), 'madvise') is None


def test_thp_mode_reads_the_bracketed_choice(tmp_path):
  path = tmp_path / 'enabled'
  path.write_text('always [madvise] never\n')
  assert runtime.thp_mode(str(path)) == 'madvise'
  path.write_text('[always] madvise never\n')
  assert runtime.thp_mode(str(path)) == 'always'
  assert runtime.thp_mode(str(tmp_path / 'missing')) is None


def test_relaunch_keeps_arguments_and_sets_the_tunable_once():
  code = ('import os, sys; from agrivision_jax import runtime; '
          'print("start", flush=True); runtime.relaunch_with_hugepage_malloc(); '
          'print(repr(sys.argv[1:]), os.environ.get("GLIBC_TUNABLES"))')
  env = {k: v for k, v in os.environ.items() if k != 'GLIBC_TUNABLES'}
  env['PYTHONPATH'] = REPO + os.pathsep + env.get('PYTHONPATH', '')
  out = subprocess.run([sys.executable, '-c', code, 'a b', '--c=1'], env=env, check=True,
                       capture_output=True, text=True).stdout.splitlines()
  expected = runtime.hugepage_tunables({}, platform.libc_ver(), runtime.thp_mode())
  assert out[-1] == f"['a b', '--c=1'] {expected}"
  assert out.count('start') == (1 if expected is None else 2)  # relaunched at most once
