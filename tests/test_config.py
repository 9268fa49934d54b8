"""Config: the default file equals the built-in defaults; env and flags override; bad values
name their key."""

from pathlib import Path

import pytest

from shardcompute.config import ClusterConfig, load_config, resolve_cluster_token
from shardcompute.errors import ConfigError

DEFAULT_YAML = Path(__file__).resolve().parents[1] / "config" / "default.yaml"


def test_default_file_matches_builtin_defaults():
    assert load_config(DEFAULT_YAML, env={}) == ClusterConfig()


def test_seed_keys_present():
    c = load_config(DEFAULT_YAML, env={})
    assert c.coordinator.heartbeat_interval_seconds < c.coordinator.heartbeat_timeout_seconds
    assert c.worker.collective_port_base and c.worker.stall_seconds
    assert c.parallelism.tensor_parallel_size == 2 and c.parallelism.topology == "ring"
    assert c.model.name == "smollm2-135m"


def test_env_overrides_file_and_flags_override_env(tmp_path):
    f = tmp_path / "c.yaml"
    f.write_text("coordinator:\n  port: 9000\nmodel:\n  weights: [2, 1]\n")
    env = {"SHARDCOMPUTE_COORDINATOR__PORT": "9100", "SHARDCOMPUTE_HOME": "/ignored"}
    assert load_config(f, env=env).coordinator.port == 9100
    assert load_config(f, {"coordinator.port": 9200}, env=env).coordinator.port == 9200
    assert load_config(f, {"coordinator.port": None}, env=env).coordinator.port == 9100
    assert load_config(f, env={}).model.weights == [2.0, 1.0]


def test_weights_from_a_flag_string():
    assert load_config(None, {"model.weights": "3,1"}, env={}).model.weights == [3.0, 1.0]
    assert load_config(None, {"model.weights": "memory"}, env={}).model.weights == "memory"


@pytest.mark.parametrize(
    "overrides, env, needle",
    [
        ({}, {"SHARDCOMPUTE_COORDINATOR__PORT": "abc"}, "coordinator.port"),
        ({}, {"SHARDCOMPUTE_COORDINATOR__PORT": "abc"}, "SHARDCOMPUTE_COORDINATOR__PORT"),
        ({"coordinator.port": 70000}, {}, "coordinator.port"),
        ({"model.dtype": "int3"}, {}, "model.dtype"),
        ({"model.weights": "2,x"}, {}, "model.weights"),
        ({"model.weights": "2,1,1"}, {}, "tensor_parallel_size=2"),
        ({"parallelism.topology": "mesh"}, {}, "parallelism.topology"),
        ({"coordinator.heartbeat_timeout_seconds": 1}, {}, "heartbeat_interval_seconds"),
        ({}, {"SHARDCOMPUTE_WORKER__NOPE": "1"}, "worker.nope"),
        ({"coordinator.port.x": 1}, {}, "coordinator.port: .* from command line"),
        ({"security.tls_cert": "c.pem"}, {}, "security.tls_cert and security.tls_key go together"),
    ],
)
def test_bad_values_name_their_key(overrides, env, needle):
    with pytest.raises(ConfigError, match=needle):
        load_config(None, overrides, env=env)


def test_bad_files(tmp_path):
    with pytest.raises(ConfigError, match="cannot read config file"):
        load_config(tmp_path / "missing.yaml", env={})
    bad = tmp_path / "bad.yaml"
    bad.write_text("coordinator: [unclosed\n")
    with pytest.raises(ConfigError, match="not valid YAML"):
        load_config(bad, env={})
    bad.write_text("- a list\n")
    with pytest.raises(ConfigError, match="must hold a mapping"):
        load_config(bad, env={})


def test_cluster_token_file_created_once_and_read(tmp_path):
    cfg = load_config(None, {"security.cluster_token_file": str(tmp_path / "t")}, env={})
    assert resolve_cluster_token(cfg.security, create=False) is None
    token = resolve_cluster_token(cfg.security, create=True)
    assert token and (tmp_path / "t").stat().st_mode & 0o777 == 0o600
    assert resolve_cluster_token(cfg.security, create=False) == token
    explicit = load_config(None, {"security.cluster_token": "abc"}, env={})
    assert resolve_cluster_token(explicit.security, create=True) == "abc"
