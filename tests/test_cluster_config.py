"""cluster.yaml is a valid Ray cluster-launcher config and keeps its promises.

Validation runs offline. `ray up` does three things with the file:
  1. prepare_config + validate_config (ray.autoscaler._private.util): merge with the AWS
     defaults.yaml shipped inside ray, then check against ray-schema.json plus cross-field
     rules (head_node_type exists, sum of min_workers <= max_workers, ...). Local files only.
  2. AWSNodeProvider.fillout_available_node_types_resources: asks EC2 for instance types.
  3. AWSNodeProvider.bootstrap_config: IAM role, key pair, subnets, security groups.
Steps 2 and 3 need AWS credentials and the network, so the tests stop after step 1 and a
fixture makes any socket use fail, so a future ray that reached out here would fail loudly
instead of hanging. Step 2 only matters for node types without `resources`; ours set them.
"""

from __future__ import annotations

import copy
import json
import re
import shutil
import socket
import subprocess
from pathlib import Path
from typing import Any

import jsonschema
import pytest
import ray
import ray.autoscaler
import yaml
from ray.autoscaler._private.util import prepare_config, validate_config

ROOT = Path(__file__).resolve().parents[1]
CLUSTER_YAML = ROOT / "cluster.yaml"
COMMAND_LISTS = (
    "initialization_commands",
    "setup_commands",
    "head_setup_commands",
    "worker_setup_commands",
    "head_start_ray_commands",
    "worker_start_ray_commands",
)


@pytest.fixture(scope="module")
def raw() -> str:
    return CLUSTER_YAML.read_text()


@pytest.fixture(scope="module")
def config(raw: str) -> dict[str, Any]:
    return yaml.safe_load(raw)


@pytest.fixture
def no_network(monkeypatch: pytest.MonkeyPatch) -> None:
    """Make every outbound connection and DNS lookup raise."""

    def refuse(*args: object, **kwargs: object) -> None:
        raise AssertionError(f"cluster config test tried to use the network: {args!r}")

    monkeypatch.setattr(socket.socket, "connect", refuse)
    monkeypatch.setattr(socket.socket, "connect_ex", refuse)
    monkeypatch.setattr(socket, "create_connection", refuse)
    monkeypatch.setattr(socket, "getaddrinfo", refuse)


def _commands(config: dict[str, Any], key: str) -> list[str]:
    return list(config.get(key) or [])


def _head_start(config: dict[str, Any]) -> str:
    starts = [c for c in _commands(config, "head_start_ray_commands") if "ray start" in c]
    assert len(starts) == 1, f"expected one `ray start` in head_start_ray_commands, got {starts}"
    return starts[0]


def _gpu_worker_types(config: dict[str, Any]) -> dict[str, dict[str, Any]]:
    head = config["head_node_type"]
    return {
        name: node
        for name, node in config["available_node_types"].items()
        if name != head and node.get("resources", {}).get("GPU", 0) >= 1
    }


def test_config_matches_rays_json_schema(config: dict[str, Any]) -> None:
    schema_path = Path(ray.autoscaler.__file__).parent / "ray-schema.json"
    schema = json.loads(schema_path.read_text())
    validator_cls = jsonschema.validators.validator_for(schema)
    validator_cls.check_schema(schema)
    errors = sorted(validator_cls(schema).iter_errors(config), key=lambda e: list(e.path))
    assert not errors, "cluster.yaml breaks ray-schema.json:\n" + "\n".join(
        f"  {'/'.join(map(str, e.path)) or '<root>'}: {e.message}" for e in errors
    )


def test_ray_cluster_launcher_accepts_config(config: dict[str, Any], no_network: None) -> None:
    original = copy.deepcopy(config)
    prepared = prepare_config(copy.deepcopy(config))
    validate_config(prepared)  # raises with the offending field
    assert config == original, "prepare_config must not see (or change) the shared fixture"


def test_ray_defaults_do_not_reopen_the_dashboard(config: dict[str, Any], no_network: None) -> None:
    # prepare_config fills every key cluster.yaml leaves out from ray's AWS defaults.yaml,
    # whose head_start_ray_commands bind the dashboard to all interfaces. So check the merged
    # result, not only the file.
    prepared = prepare_config(copy.deepcopy(config))
    assert "0.0.0.0" not in json.dumps(prepared), "a ray default binds a port to all interfaces"
    assert _commands(prepared, "head_start_ray_commands") == _commands(
        config, "head_start_ray_commands"
    )


def test_no_port_is_bound_to_all_interfaces(raw: str) -> None:
    lines = [f"line {i}: {line.strip()}" for i, line in enumerate(raw.splitlines(), 1)]
    offending = [line for line in lines if "0.0.0.0" in line]
    assert not offending, f"cluster.yaml mentions 0.0.0.0: {offending}"


def test_head_keeps_the_dashboard_on_loopback(config: dict[str, Any]) -> None:
    start = _head_start(config)
    hosts = re.findall(r"--dashboard-host[= ](\S+)", start)
    assert hosts == ["127.0.0.1"], f"dashboard must bind 127.0.0.1 only, got {hosts} in {start!r}"
    assert "--head" in start and "--port=6379" in start, start
    assert "--autoscaling-config=~/ray_bootstrap_config.yaml" in start, start
    commands = _commands(config, "head_start_ray_commands")
    assert commands.index("ray stop") < commands.index(start), "stop a running ray before start"


def test_workers_join_the_head(config: dict[str, Any]) -> None:
    starts = [c for c in _commands(config, "worker_start_ray_commands") if "ray start" in c]
    assert len(starts) == 1, starts
    assert "--address=$RAY_HEAD_IP:6379" in starts[0], starts[0]


def test_security_group_opens_only_ssh(config: dict[str, Any]) -> None:
    rules = config["provider"].get("security_group", {}).get("IpPermissions", [])
    from_outside = [r for r in rules if r.get("IpRanges") or r.get("Ipv6Ranges")]
    not_ssh = [r for r in from_outside if (r.get("FromPort"), r.get("ToPort")) != (22, 22)]
    assert not not_ssh, f"only SSH (22) may be open beyond the cluster, got {not_ssh}"


def test_gpu_workers_autoscale_from_zero(config: dict[str, Any]) -> None:
    gpu_types = _gpu_worker_types(config)
    assert gpu_types, f"no worker type with GPU >= 1 in {list(config['available_node_types'])}"
    for name, node in gpu_types.items():
        assert node["min_workers"] == 0, f"{name}: min_workers={node['min_workers']}, want 0"
        assert 0 < node["max_workers"] <= config["max_workers"], (
            f"{name}: max_workers={node['max_workers']} must be in (0, {config['max_workers']}]"
        )


def test_head_node_is_cpu_only_and_alone(config: dict[str, Any]) -> None:
    head = config["available_node_types"][config["head_node_type"]]
    assert (head["min_workers"], head["max_workers"]) == (0, 0), head
    assert head["resources"].get("GPU", 0) == 0, head["resources"]


def test_all_nodes_share_one_image(config: dict[str, Any]) -> None:
    # One AMI means one Python on head and workers: Ray needs matching versions across nodes.
    images = {n["node_config"]["ImageId"] for n in config["available_node_types"].values()}
    assert len(images) == 1, f"node types use different images: {images}"


def test_idle_nodes_are_terminated(config: dict[str, Any]) -> None:
    assert config["provider"]["cache_stopped_nodes"] is False, config["provider"]
    assert config["idle_timeout_minutes"] > 0, config["idle_timeout_minutes"]


def test_setup_installs_the_project_with_its_constraints(config: dict[str, Any]) -> None:
    commands = _commands(config, "setup_commands")
    clone = [i for i, c in enumerate(commands) if "git clone" in c]
    install = [i for i, c in enumerate(commands) if "pip install -c constraints.txt -e ." in c]
    assert clone and install and clone[0] < install[0], f"clone, then install: {commands}"
    assert "cd ~/prunesearch" in commands[install[0]], commands[install[0]]
    assert "$PRUNESEARCH_REPO" in commands[clone[0]] or "${PRUNESEARCH_REPO" in commands[clone[0]]


def test_nodes_run_the_ray_that_validated_this_config() -> None:
    # The nodes install ray from constraints.txt; this test validated against the installed ray.
    pins = re.findall(r"^ray==(\S+)$", (ROOT / "constraints.txt").read_text(), re.MULTILINE)
    assert pins == [ray.__version__], (
        f"constraints.txt pins ray {pins}, installed {ray.__version__}"
    )


def test_settings_are_set_in_one_place(config: dict[str, Any]) -> None:
    commands = _commands(config, "setup_commands")
    for name in ("PRUNESEARCH_REPO", "PRUNESEARCH_EFS", "PRUNESEARCH_DATA", "PRUNESEARCH_STORAGE"):
        setters = [c for c in commands if re.search(rf"\b{name}=", c)]
        assert len(setters) == 1, f"{name} should be set by exactly one setup command: {setters}"
    mounts = [c for c in commands if "mount -t" in c]
    assert mounts and all(c.startswith('if [ -n "$PRUNESEARCH_EFS" ]') for c in mounts), mounts


@pytest.mark.skipif(shutil.which("bash") is None, reason="needs bash to parse the commands")
def test_every_command_is_valid_bash(config: dict[str, Any]) -> None:
    # Ray runs each command as `bash --login -c -i '...; (<command>)'`; -n parses without running.
    for key in COMMAND_LISTS:
        for command in _commands(config, key):
            result = subprocess.run(
                ["bash", "-n", "-c", f"({command})"], capture_output=True, text=True, check=False
            )
            assert result.returncode == 0, f"{key}: {command!r}: {result.stderr.strip()}"
