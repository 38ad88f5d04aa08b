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


def _schema_errors(config: dict[str, Any]) -> list[str]:
    schema_path = Path(ray.autoscaler.__file__).parent / "ray-schema.json"
    schema = json.loads(schema_path.read_text())
    validator_cls = jsonschema.validators.validator_for(schema)
    validator_cls.check_schema(schema)
    errors = sorted(validator_cls(schema).iter_errors(config), key=lambda e: list(e.path))
    return [f"{'/'.join(map(str, e.path)) or '<root>'}: {e.message}" for e in errors]


# Each check returns the broken promises it finds in a config, empty when there are none; the
# tests below run every check on cluster.yaml, and on a copy broken on purpose to show it fails.


def _dashboard_problems(config: dict[str, Any]) -> list[str]:
    start = _head_start(config)
    problems = []
    hosts = re.findall(r"--dashboard-host[= ](\S+)", start)
    if hosts != ["127.0.0.1"]:
        problems.append(f"dashboard must bind 127.0.0.1 only, got {hosts} in {start!r}")
    for flag in ("--head", "--autoscaling-config=~/ray_bootstrap_config.yaml"):
        if flag not in start:
            problems.append(f"{flag} missing from {start!r}")
    commands = _commands(config, "head_start_ray_commands")
    if "ray stop" not in commands or commands.index("ray stop") > commands.index(start):
        problems.append(f"stop a running ray before start: {commands}")
    return problems


def _join_problems(config: dict[str, Any]) -> list[str]:
    head_ports = re.findall(r"--port[= ](\d+)", _head_start(config))
    starts = [c for c in _commands(config, "worker_start_ray_commands") if "ray start" in c]
    if len(starts) != 1 or len(head_ports) != 1:
        return [f"expected one worker `ray start` and one head --port, got {starts} and {head_ports}"]
    want = f"--address=$RAY_HEAD_IP:{head_ports[0]}"
    return [] if want in starts[0] else [f"workers must join the head's port: {want} not in {starts[0]!r}"]


def _security_group_problems(config: dict[str, Any]) -> list[str]:
    rules = config["provider"].get("security_group", {}).get("IpPermissions", [])
    from_outside = [r for r in rules if r.get("IpRanges") or r.get("Ipv6Ranges")]
    not_ssh = [r for r in from_outside if (r.get("FromPort"), r.get("ToPort")) != (22, 22)]
    return [f"only SSH (22) may be open beyond the cluster, got {not_ssh}"] if not_ssh else []


def _gpu_worker_problems(config: dict[str, Any]) -> list[str]:
    gpu_types = _gpu_worker_types(config)
    if not gpu_types:
        return [f"no worker type with GPU >= 1 in {list(config['available_node_types'])}"]
    problems = []
    for name, node in gpu_types.items():
        if node["min_workers"] != 0:
            problems.append(f"{name}: min_workers={node['min_workers']}, want 0")
        if not 0 < node["max_workers"] <= config["max_workers"]:
            problems.append(f"{name}: max_workers={node['max_workers']} must be in (0, {config['max_workers']}]")
    return problems


def _head_problems(config: dict[str, Any]) -> list[str]:
    head = config["available_node_types"][config["head_node_type"]]
    problems = []
    if (head["min_workers"], head["max_workers"]) != (0, 0):
        problems.append(f"the head type must not scale: {head}")
    if head["resources"].get("GPU", 0) != 0:
        problems.append(f"the head must be CPU-only: {head['resources']}")
    return problems


def _image_problems(config: dict[str, Any]) -> list[str]:
    # One AMI means one Python on head and workers: Ray needs matching versions across nodes.
    images = {n["node_config"]["ImageId"] for n in config["available_node_types"].values()}
    return [f"node types use different images: {images}"] if len(images) != 1 else []


def _idle_problems(config: dict[str, Any]) -> list[str]:
    problems = []
    if config["provider"].get("cache_stopped_nodes") is not False:
        problems.append(f"stopped nodes would be kept: {config['provider']}")
    if not config.get("idle_timeout_minutes", 0) > 0:
        problems.append(f"idle_timeout_minutes={config.get('idle_timeout_minutes')} must be > 0")
    return problems


def _setup_problems(config: dict[str, Any]) -> list[str]:
    commands = _commands(config, "setup_commands")
    clone = [i for i, c in enumerate(commands) if "git clone" in c]
    install = [i for i, c in enumerate(commands) if "pip install -c constraints.txt -e ." in c]
    if not (clone and install and clone[0] < install[0]):
        return [f"clone, then install: {commands}"]
    problems = []
    if "cd ~/prunesearch" not in commands[install[0]]:
        problems.append(f"install from the clone: {commands[install[0]]}")
    if "$PRUNESEARCH_REPO" not in commands[clone[0]] and "${PRUNESEARCH_REPO" not in commands[clone[0]]:
        problems.append(f"clone $PRUNESEARCH_REPO: {commands[clone[0]]}")
    return problems


def _settings_problems(config: dict[str, Any]) -> list[str]:
    commands = _commands(config, "setup_commands")
    problems = []
    for name in ("PRUNESEARCH_REPO", "PRUNESEARCH_EFS", "PRUNESEARCH_DATA", "PRUNESEARCH_STORAGE"):
        setters = [c for c in commands if re.search(rf"\b{name}=", c)]
        if len(setters) != 1:
            problems.append(f"{name} should be set by exactly one setup command: {setters}")
    mounts = [c for c in commands if "mount -t" in c]
    if not mounts or not all(c.startswith('if [ -n "$PRUNESEARCH_EFS" ]') for c in mounts):
        problems.append(f"mount only when PRUNESEARCH_EFS is set: {mounts}")
    return problems


def test_config_matches_rays_json_schema(config: dict[str, Any]) -> None:
    errors = _schema_errors(config)
    assert not errors, "cluster.yaml breaks ray-schema.json:\n" + "\n".join(f"  {e}" for e in errors)


def test_ray_cluster_launcher_accepts_config(config: dict[str, Any], no_network: None) -> None:
    original = copy.deepcopy(config)
    prepared = prepare_config(copy.deepcopy(config))
    validate_config(prepared)  # raises with the offending field
    assert config == original, "prepare_config must not see (or change) the shared fixture"


def _set(path: str, value: Any):
    """A mutation: set the field at the '/'-separated ``path`` to ``value``."""

    def mutate(config: dict[str, Any]) -> None:
        *parents, last = path.split("/")
        node = config
        for key in parents:
            node = node[key]
        node[last] = value

    mutate.__name__ = f"{path}={value!r}"
    return mutate


BROKEN_FIELDS = [
    (_set("head_node_type", "head.gpu"), ValueError, "head_node_type"),
    (_set("available_node_types/worker.gpu/min_workers", 5), ValueError, "min_workers"),
    (_set("max_workers", "four"), jsonschema.ValidationError, "'four' is not of type 'integer'"),
    (_set("idle_timeout_minute", 10), jsonschema.ValidationError, "'idle_timeout_minute' was unexpected"),
    (_set("available_node_types/worker.gpu/resources", "GPU"), jsonschema.ValidationError, "'GPU' is not of type"),
    (_set("provider/cache_stopped_nodes", "no"), jsonschema.ValidationError, "'no' is not of type 'boolean'"),
]


@pytest.mark.parametrize(("mutate", "error", "match"), BROKEN_FIELDS, ids=lambda x: getattr(x, "__name__", None))
def test_ray_cluster_launcher_rejects_a_broken_field(
    config: dict[str, Any], no_network: None, mutate: Any, error: type[Exception], match: str
) -> None:
    # The acceptance test above only means something if the same call refuses a broken file.
    broken = copy.deepcopy(config)
    mutate(broken)
    with pytest.raises(error, match=re.escape(match)):
        validate_config(prepare_config(broken))
    if error is jsonschema.ValidationError:
        assert any(match in e for e in _schema_errors(broken)), "the schema test misses it"


def test_ray_defaults_do_not_reopen_the_dashboard(config: dict[str, Any], no_network: None) -> None:
    # prepare_config fills every key cluster.yaml leaves out from ray's AWS defaults.yaml,
    # whose head_start_ray_commands bind the dashboard to all interfaces. So check the merged
    # result, not only the file.
    prepared = prepare_config(copy.deepcopy(config))
    assert "0.0.0.0" not in json.dumps(prepared), "a ray default binds a port to all interfaces"
    assert _commands(prepared, "head_start_ray_commands") == _commands(
        config, "head_start_ray_commands"
    )
    # Without our own head start commands, the merge does bring the all-interfaces default in.
    bare = {k: v for k, v in copy.deepcopy(config).items() if k != "head_start_ray_commands"}
    assert "0.0.0.0" in json.dumps(prepare_config(bare)), "ray's default changed: revisit this test"


def test_no_port_is_bound_to_all_interfaces(raw: str) -> None:
    lines = [f"line {i}: {line.strip()}" for i, line in enumerate(raw.splitlines(), 1)]
    offending = [line for line in lines if "0.0.0.0" in line]
    assert not offending, f"cluster.yaml mentions 0.0.0.0: {offending}"


CHECKS = {
    "dashboard": _dashboard_problems,
    "join": _join_problems,
    "security_group": _security_group_problems,
    "gpu_workers": _gpu_worker_problems,
    "head": _head_problems,
    "image": _image_problems,
    "idle": _idle_problems,
    "setup": _setup_problems,
    "settings": _settings_problems,
}


def test_head_keeps_the_dashboard_on_loopback(config: dict[str, Any]) -> None:
    assert _dashboard_problems(config) == []


def test_workers_join_the_head(config: dict[str, Any]) -> None:
    assert _join_problems(config) == []


def test_security_group_opens_only_ssh(config: dict[str, Any]) -> None:
    assert _security_group_problems(config) == []


def test_gpu_workers_autoscale_from_zero(config: dict[str, Any]) -> None:
    assert _gpu_worker_problems(config) == []


def test_head_node_is_cpu_only_and_alone(config: dict[str, Any]) -> None:
    assert _head_problems(config) == []


def test_all_nodes_share_one_image(config: dict[str, Any]) -> None:
    assert _image_problems(config) == []


def test_idle_nodes_are_terminated(config: dict[str, Any]) -> None:
    assert _idle_problems(config) == []


def test_setup_installs_the_project_with_its_constraints(config: dict[str, Any]) -> None:
    assert _setup_problems(config) == []


def test_settings_are_set_in_one_place(config: dict[str, Any]) -> None:
    assert _settings_problems(config) == []


def _edit_commands(key: str, old: str, new: str):
    def mutate(config: dict[str, Any]) -> None:
        config[key] = [c.replace(old, new) for c in config[key]]

    mutate.__name__ = f"{key}:{old}->{new}"
    return mutate


def _swap_clone_and_install(config: dict[str, Any]) -> None:
    commands = config["setup_commands"]
    clone = next(i for i, c in enumerate(commands) if "git clone" in c)
    install = next(i for i, c in enumerate(commands) if "pip install -c constraints.txt" in c)
    commands[clone], commands[install] = commands[install], commands[clone]


def _open_the_dashboard(config: dict[str, Any]) -> None:
    rules = config["provider"].setdefault("security_group", {}).setdefault("IpPermissions", [])
    rules.append({"FromPort": 8265, "ToPort": 8265, "IpProtocol": "tcp", "IpRanges": [{"CidrIp": "0.0.0.0/0"}]})


def _second_image(config: dict[str, Any]) -> None:
    config["available_node_types"]["worker.gpu"]["node_config"]["ImageId"] = "ami-other"


def _unguarded_mount(config: dict[str, Any]) -> None:
    config["setup_commands"].append("sudo mount -t nfs4 fs-1:/ /mnt/efs")


def _second_repo_setter(config: dict[str, Any]) -> None:
    config["setup_commands"].append("export PRUNESEARCH_REPO=https://example.invalid/fork")


BROKEN_PROMISES = [
    ("dashboard", _edit_commands("head_start_ray_commands", "--dashboard-host=127.0.0.1", "--dashboard-host=0.0.0.0")),
    ("dashboard", _edit_commands("head_start_ray_commands", "ray stop", "true")),
    ("join", _edit_commands("worker_start_ray_commands", ":6379", ":6380")),
    ("security_group", _open_the_dashboard),
    ("gpu_workers", _set("available_node_types/worker.gpu/min_workers", 1)),
    ("gpu_workers", _set("available_node_types/worker.gpu/max_workers", 8)),
    ("gpu_workers", _set("available_node_types/worker.gpu/resources", {"CPU": 4})),
    ("head", _set("available_node_types/head.cpu/max_workers", 2)),
    ("head", _set("available_node_types/head.cpu/resources", {"CPU": 8, "GPU": 1})),
    ("image", _second_image),
    ("idle", _set("provider/cache_stopped_nodes", True)),
    ("idle", _set("idle_timeout_minutes", 0)),
    ("setup", _swap_clone_and_install),
    ("setup", _edit_commands("setup_commands", "${PRUNESEARCH_REPO:?", "${OTHER_REPO:?")),
    ("settings", _unguarded_mount),
    ("settings", _second_repo_setter),
]


@pytest.mark.parametrize(("check", "mutate"), BROKEN_PROMISES, ids=lambda x: getattr(x, "__name__", x))
def test_each_check_catches_the_promise_broken(config: dict[str, Any], check: str, mutate: Any) -> None:
    broken = copy.deepcopy(config)
    mutate(broken)
    assert broken != config, "the mutation changed nothing: it no longer matches cluster.yaml"
    assert CHECKS[check](broken), f"{check} check passed a config with {getattr(mutate, '__name__', mutate)}"
    # Only the promise broken on purpose is reported.
    assert not [name for name, fn in CHECKS.items() if name != check and fn(broken)]


def test_nodes_run_the_ray_that_validated_this_config() -> None:
    # The nodes install ray from constraints.txt; this test validated against the installed ray.
    pins = re.findall(r"^ray==(\S+)$", (ROOT / "constraints.txt").read_text(), re.MULTILINE)
    assert pins == [ray.__version__], (
        f"constraints.txt pins ray {pins}, installed {ray.__version__}"
    )


@pytest.mark.skipif(shutil.which("bash") is None, reason="needs bash to parse the commands")
def test_every_command_is_valid_bash(config: dict[str, Any]) -> None:
    # Ray runs each command as `bash --login -c -i '...; (<command>)'`; -n parses without running.
    for key in COMMAND_LISTS:
        for command in _commands(config, key):
            result = subprocess.run(
                ["bash", "-n", "-c", f"({command})"], capture_output=True, text=True, check=False
            )
            assert result.returncode == 0, f"{key}: {command!r}: {result.stderr.strip()}"
    # ... and bash -n does refuse a broken one (an unclosed quote).
    broken = subprocess.run(["bash", "-n", "-c", "(echo 'oops)"], capture_output=True, text=True, check=False)
    assert broken.returncode != 0
