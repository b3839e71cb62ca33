"""Tests of the start-up XLA flag selection."""

from agrivision_jax import runtime


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
