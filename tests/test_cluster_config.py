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
    # Every node clones; the head installs with the pins (the workers copy the head: _lock_problems).
    commands = _commands(config, "setup_commands")
    clone = [c for c in commands if "git clone" in c]
    install = [c for c in _commands(config, "head_setup_commands") if "pip install -c constraints.txt -e ." in c]
    if len(clone) != 1 or len(install) != 1:
        return [f"one clone in setup_commands and one pinned install on the head, got {clone} and {install}"]
    problems = []
    if "cd ~/prunesearch" not in install[0]:
        problems.append(f"install from the clone: {install[0]}")
    if "$PRUNESEARCH_REPO" not in clone[0] and "${PRUNESEARCH_REPO" not in clone[0]:
        problems.append(f"clone $PRUNESEARCH_REPO: {clone[0]}")
    return problems


LOCK = '"$PRUNESEARCH_STORAGE/cluster/head.lock"'


def _index(commands: list[str], *needles: str) -> int | None:
    return next((i for i, c in enumerate(commands) if all(n in c for n in needles)), None)


def _lock_problems(config: dict[str, Any]) -> list[str]:
    """The head checks its packages against constraints.txt and publishes its commit and
    `pip freeze` on shared storage after installing; each worker installs exactly that and
    compares its own `pip freeze` with it after installing."""
    head, worker = _commands(config, "head_setup_commands"), _commands(config, "worker_setup_commands")
    steps = {
        "head install": _index(head, "pip install -c constraints.txt -e ."),
        "head check": _index(head, "pip freeze --exclude-editable", "comm -13", "constraints.txt"),
        "head publish": _index(head, "rev-parse HEAD", "installed.txt", LOCK),
        "worker fetch": _index(worker, LOCK, "prunesearch_head.lock"),
        "worker install": _index(worker, 'checkout -q --detach "$(head -n 1 ~/prunesearch_head.lock)"',
                                 "pip install -r <(tail -n +2 ~/prunesearch_head.lock)", "pip install --no-deps -e ."),
        "worker compare": _index(worker, "pip freeze --exclude-editable", "diff <(tail -n +2 ~/prunesearch_head.lock)"),
    }
    missing = [k for k, v in steps.items() if v is None]
    if missing:
        return [f"lock steps missing: {missing}"]
    order = [("head install", "head check"), ("head check", "head publish"),
             ("worker fetch", "worker install"), ("worker install", "worker compare")]
    return [f"{a} must come before {b}" for a, b in order if steps[a] > steps[b]]


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
    "lock": _lock_problems,
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


def test_workers_reproduce_the_heads_packages(config: dict[str, Any]) -> None:
    assert _lock_problems(config) == []


def _edit_commands(key: str, old: str, new: str):
    def mutate(config: dict[str, Any]) -> None:
        config[key] = [c.replace(old, new) for c in config[key]]

    mutate.__name__ = f"{key}:{old}->{new}"
    return mutate


def _install_outside_the_clone(config: dict[str, Any]) -> None:
    config["head_setup_commands"] = [c.replace("cd ~/prunesearch && pip install -c", "pip install -c")
                                     for c in config["head_setup_commands"]]


def _drop(key: str, needle: str):
    def mutate(config: dict[str, Any]) -> None:
        config[key] = [c for c in config[key] if needle not in c]

    mutate.__name__ = f"{key}:drop {needle}"
    return mutate


def _swap(key: str, first: str, second: str):
    def mutate(config: dict[str, Any]) -> None:
        commands = config[key]
        i = next(i for i, c in enumerate(commands) if first in c)
        j = next(i for i, c in enumerate(commands) if second in c)
        commands[i], commands[j] = commands[j], commands[i]

    mutate.__name__ = f"{key}:swap {first}<->{second}"
    return mutate


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
    ("setup", _install_outside_the_clone),
    ("setup", _edit_commands("setup_commands", "${PRUNESEARCH_REPO:?", "${OTHER_REPO:?")),
    ("settings", _unguarded_mount),
    ("settings", _second_repo_setter),
    ("lock", _drop("worker_setup_commands", "diff <(")),
    ("lock", _edit_commands("worker_setup_commands", "pip install -r <(tail -n +2 ~/prunesearch_head.lock)",
                            "pip install -c constraints.txt -e .")),
    ("lock", _edit_commands("head_setup_commands", "/cluster/head.lock", "/cluster/lock.txt")),
    ("lock", _swap("head_setup_commands", "comm -13", "rev-parse HEAD")),
    ("lock", _swap("worker_setup_commands", "diff <(", "pip install -r")),
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


@pytest.mark.skipif(shutil.which("bash") is None or shutil.which("git") is None, reason="needs bash and git")
def _python_stand_in(path: Path) -> None:
    """A ``python`` on a test's PATH that is the interpreter running the tests.

    A script that execs ``sys.executable``, not a symlink to it: a virtualenv's python reached
    through a symlink in another folder finds no ``pyvenv.cfg`` beside it, starts as the base
    interpreter and misses the venv's packages (pyarrow, for the lock commands).
    """
    import shlex
    import sys

    path.write_text(f'#!/bin/sh\nexec {shlex.quote(sys.executable)} "$@"\n')
    path.chmod(0o755)


def test_lock_commands_round_trip_on_this_machine(config: dict[str, Any], tmp_path: Path) -> None:
    # The head's check and publish and the worker's fetch and compare, run for real (pyarrow,
    # git, bash) with a stand-in `pip` whose `freeze` prints a fixed package list (the installs
    # are not run): a worker with the head's packages passes, one whose packages differ is
    # refused, and so is a head with a package constraints.txt does not pin.
    import sys

    home, storage, bin_dir = tmp_path / "home", tmp_path / "shared", tmp_path / "bin"
    repo = home / "prunesearch"
    repo.mkdir(parents=True)
    bin_dir.mkdir()
    freeze = ["Jinja2==3.1.6", "numpy==2.4.1", "ray==2.60.0", "torch==2.14.1"]
    installed = tmp_path / "installed.txt"
    installed.write_text("\n".join(freeze) + "\n")
    (bin_dir / "pip").write_text(f'#!/bin/bash\n[ "$*" = "freeze --exclude-editable" ] && cat {installed}\n')
    (bin_dir / "pip").chmod(0o755)
    _python_stand_in(bin_dir / "python")
    (repo / "constraints.txt").write_text("\n".join(["attrs==26.1.0", *freeze]) + "\n")
    git = ["git", "-C", str(repo), "-c", "user.name=t", "-c", "user.email=t@t"]
    subprocess.run([*git, "init", "-q"], check=True)
    subprocess.run([*git, "add", "constraints.txt"], check=True)
    subprocess.run([*git, "commit", "-q", "-m", "pins"], check=True)
    commit = subprocess.run([*git, "rev-parse", "HEAD"], capture_output=True, text=True, check=True).stdout.strip()
    env = {"PATH": f"{bin_dir}:/usr/bin:/bin", "HOME": str(home), "PRUNESEARCH_STORAGE": str(storage)}
    # The commands' `python` is this interpreter with its own packages (a venv's too).
    probe = subprocess.run(["python", "-c", "import sys; print(sys.prefix)"], env=env, capture_output=True,
                           text=True, check=True)
    assert probe.stdout.strip() == sys.prefix

    def run(key: str, needle: str) -> subprocess.CompletedProcess:
        [command] = [c for c in config[key] if needle in c]
        return subprocess.run(["bash", "-c", command], env=env, cwd=home, capture_output=True, text=True, check=False)

    assert run("head_setup_commands", "comm -13").returncode == 0
    assert run("head_setup_commands", "rev-parse HEAD").returncode == 0
    lock = (storage / "cluster" / "head.lock").read_text().splitlines()
    assert lock[0] == commit and sorted(lock[1:]) == sorted(freeze)
    (home / "prunesearch_head.lock").unlink()  # the worker's copy must come from the storage
    assert run("worker_setup_commands", "copy_files").returncode == 0
    assert (home / "prunesearch_head.lock").read_text().splitlines() == lock
    compared = run("worker_setup_commands", "diff <(")
    assert compared.returncode == 0, compared.stderr
    # The worker got another numpy than the head: refused, naming both.
    installed.write_text("\n".join(f.replace("numpy==2.4.1", "numpy==2.3.0") for f in freeze) + "\n")
    refused = run("worker_setup_commands", "diff <(")
    assert refused.returncode != 0 and "< numpy==2.4.1" in refused.stdout and "> numpy==2.3.0" in refused.stdout
    assert "packages differ from the head's" in refused.stderr
    # A head package that constraints.txt does not pin at that version: the head stops, naming it.
    unpinned = run("head_setup_commands", "comm -13")
    assert unpinned.returncode != 0 and "numpy==2.3.0" in unpinned.stdout and "not pinned" in unpinned.stderr


def test_lock_commands_round_trip_from_a_virtualenv(tmp_path: Path) -> None:
    # How many users install: into a virtualenv. The round trip above, run by a fresh venv's
    # python, whose `python` stand-in must still be that venv (its sys.prefix). The venv sees
    # this interpreter's packages through a .pth file (no install): that works from the system
    # python and from a venv alike, where --system-site-packages would reach only the base's.
    import site
    import sys

    venv = tmp_path / "venv"
    subprocess.run([sys.executable, "-m", "venv", "--without-pip", str(venv)], check=True)
    python = venv / "bin" / "python"
    [purelib] = subprocess.run([str(python), "-c", "import sysconfig; print(sysconfig.get_path('purelib'))"],
                               capture_output=True, text=True, check=True).stdout.split()
    # addsitedir, not a bare path line: it also runs those folders' .pth files (the editable install).
    lines = [f"import site; site.addsitedir({d!r})" for d in site.getsitepackages()]
    (Path(purelib) / "outer_site.pth").write_text("\n".join(lines) + "\n")
    node = f"{Path(__file__).name}::test_lock_commands_round_trip_on_this_machine"
    done = subprocess.run(
        [str(python), "-m", "pytest", "-q", "-p", "no:cacheprovider", node],
        cwd=Path(__file__).parent, capture_output=True, text=True, check=False, timeout=300,
    )
    assert done.returncode == 0 and "1 passed" in done.stdout, done.stdout[-3000:] + done.stderr[-2000:]
