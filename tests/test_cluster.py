"""cluster.yaml against Ray's autoscaler schema, the KubeRay manifests' structure, and
autoscaling for real: cluster.yaml's worker types, shrunk, on Ray's fake multi-node provider
(nodes are local processes) scale up for a job that the head cannot run, then down when idle."""

import copy
import json
import shlex
import string
import subprocess
import sys

import jsonschema
import pytest
import yaml
from ray.autoscaler._private.util import prepare_config, validate_config

from tests.local_ray import REPO, LocalHead

CLUSTER = REPO / "cluster.yaml"
KUBERAY = REPO / "deploy" / "kuberay"


@pytest.fixture(scope="module")
def cluster():
    return yaml.safe_load(CLUSTER.read_text())


def test_cluster_yaml_passes_the_autoscaler_schema(cluster):
    validate_config(cluster)  # as written
    full = prepare_config(cluster)  # merged with the provider's defaults, as `ray up` does
    validate_config(full)
    types = full["available_node_types"]
    assert types[full["head_node_type"]]["resources"] == {"CPU": 0}
    assert "--num-cpus=0" in " ".join(full["head_start_ray_commands"])
    gpu = [t for t in types.values() if t["resources"].get("GPU")]
    cpu = [t for n, t in types.items() if n != full["head_node_type"] and t not in gpu]
    assert len(gpu) == 1 and len(cpu) == 1
    for worker in (*gpu, *cpu):
        assert worker["min_workers"] == 0 < worker["max_workers"]
    assert any("'.[gpu]'" in c for c in gpu[0]["worker_setup_commands"])
    assert any("pip install -q -e ." in c for c in full["worker_setup_commands"])


def test_schema_check_catches_a_broken_node_type(cluster):
    broken = copy.deepcopy(cluster)
    broken["available_node_types"]["worker.gpu"]["resources"]["GPU"] = "one"
    with pytest.raises(jsonschema.ValidationError, match="'one' is not of type 'integer'"):
        validate_config(broken)
    del broken["available_node_types"]["worker.cpu"]["node_config"]
    with pytest.raises(jsonschema.ValidationError, match="'node_config' is a required property"):
        validate_config(broken)


# ---------------------------------------------------------------------------- KubeRay


def manifest(name: str) -> dict:
    return yaml.safe_load((KUBERAY / name).read_text())


def check_ray_cluster_spec(spec: dict) -> list[dict]:
    """The RayCluster part of a RayJob / RayService; returns the worker groups."""
    assert spec["rayVersion"] and spec["enableInTreeAutoscaling"] is True
    head = spec["headGroupSpec"]
    groups = spec["workerGroupSpecs"]
    for group in (head, *groups):
        assert isinstance(group["rayStartParams"], dict)
        (container,) = group["template"]["spec"]["containers"]
        assert container["image"] and container["name"]
        resources = container["resources"]
        assert resources["requests"] == resources["limits"]  # guaranteed QoS, as Ray advises
        assert {"cpu", "memory"} <= set(resources["limits"])
    assert head["rayStartParams"]["num-cpus"] == "0"
    for group in groups:
        assert group["groupName"]
        assert 0 <= group["minReplicas"] <= group["replicas"] <= group["maxReplicas"]
    return groups


def expand(text: str, env: dict) -> list[str]:
    """An entrypoint as the job's shell runs it, with the runtime env's variables."""
    return shlex.split(string.Template(text).substitute(env))


def test_rayjob_runs_the_pipeline_on_an_autoscaling_cluster():
    job = manifest("rayjob.yaml")
    assert job["apiVersion"] == "ray.io/v1" and job["kind"] == "RayJob"
    spec = job["spec"]
    assert spec["shutdownAfterJobFinishes"] is True
    groups = check_ray_cluster_spec(spec["rayClusterSpec"])
    gpu = [g for g in groups if "nvidia.com/gpu" in g["template"]["spec"]["containers"][0][
        "resources"]["limits"]]  # fmt: skip
    assert len(gpu) == 1 and gpu[0]["minReplicas"] == 0
    runtime_env = yaml.safe_load(spec["runtimeEnvYAML"])
    argv = expand(spec["entrypoint"], runtime_env["env_vars"])
    assert argv[:3] == ["python", "-m", "jobs.pipeline"]
    from jobs.pipeline import parse_args

    args = parse_args(argv[3:])  # every flag exists and parses
    assert args.workdir.startswith("s3://") and args.use_gpu is True
    assert (REPO / args.config).exists()


def test_rayservice_deploys_the_serve_app():
    service = manifest("rayservice.yaml")
    assert service["apiVersion"] == "ray.io/v1" and service["kind"] == "RayService"
    check_ray_cluster_spec(service["spec"]["rayClusterConfig"])
    serve_config = yaml.safe_load(service["spec"]["serveConfigV2"])
    (app,) = serve_config["applications"]
    module, attr = app["import_path"].split(":")
    assert (module, attr) == ("serve.app", "build_app")
    from serve.app import AppArgs, QueryEncoder

    args = AppArgs.from_dict(app["args"])  # the builder accepts these args
    assert args.workdir.startswith("s3://")
    (encoder,) = app["deployments"]
    assert encoder["name"] == QueryEncoder.name
    scaling = encoder["autoscaling_config"]
    assert 1 <= scaling["min_replicas"] < scaling["max_replicas"]


# ---------------------------------------------------------------------------- autoscaling

IDLE_TIMEOUT_MINUTES = 0.05  # 3 s
EMPTY_LISTS = (
    "initialization_commands", "setup_commands", "head_setup_commands", "worker_setup_commands",
    "head_start_ray_commands", "worker_start_ray_commands", "cluster_synced_files",
)  # fmt: skip

DRIVER = """
import json, sys, time
import ray

ray.init()
t0 = time.monotonic()

@ray.remote(num_cpus=0)
class Barrier:
    def __init__(self): self.n = 0
    def arrive(self): self.n += 1
    def count(self): return self.n

@ray.remote(num_cpus=1)
def data_task(barrier, parties):
    # Both at once: the job needs two CPU slots together, the head has none.
    ray.get(barrier.arrive.remote())
    while ray.get(barrier.count.remote()) < parties:
        time.sleep(0.2)
    return ray.get_runtime_context().get_assigned_resources()

@ray.remote(num_cpus=0, num_gpus=1)
def train_task():
    return ray.get_runtime_context().get_assigned_resources()

def workers():
    return {n["NodeID"]: n["Resources"] for n in ray.nodes()
            if n["Alive"] and "node:__internal_head__" not in n["Resources"]}

seen, events = {}, []
def watch():
    now = workers()
    for node, res in now.items():
        if node not in seen:
            seen[node] = res
            events.append(("added", "gpu" if res.get("GPU") else "cpu", time.monotonic() - t0))
    return now

barrier = Barrier.remote()
refs = [data_task.remote(barrier, 2), data_task.remote(barrier, 2), train_task.remote()]
pending = refs
while pending:
    _, pending = ray.wait(pending, timeout=0.5)
    watch()
finished = time.monotonic() - t0
assigned = ray.get(refs)
while watch():
    if time.monotonic() - t0 > float(sys.argv[1]):
        break
    time.sleep(0.5)
print("REPORT", json.dumps({
    "assigned": assigned, "seen": seen, "events": events, "finished": finished,
    "left": list(workers()), "drained": time.monotonic() - t0,
    "ever": len([n for n in ray.nodes() if not n["Alive"] or
                 "node:__internal_head__" not in n["Resources"]]),
}))
"""


def fake_cluster_config(cluster: dict, gcs_address: str) -> dict:
    """cluster.yaml's worker types on the fake multi-node provider, at most 2 nodes per type:
    a CPU type node has 1 CPU, a GPU type node 1 logical GPU and no CPU (on the real type Ray
    Data tasks may also use the GPU nodes' CPUs; here CPU work has one place to go). The head
    keeps its 0 CPUs."""
    types = {}
    for name, node_type in cluster["available_node_types"].items():
        if name == cluster["head_node_type"]:
            continue
        gpu = node_type["resources"].get("GPU", 0) > 0
        types[name] = {
            "resources": {"GPU": 1} if gpu else {"CPU": 1},
            "node_config": {},
            "min_workers": node_type["min_workers"],
            "max_workers": min(2, node_type["max_workers"]),
        }
    head = cluster["available_node_types"][cluster["head_node_type"]]
    types["ray.head.default"] = {
        "resources": head["resources"],
        "node_config": {},
        "max_workers": 0,
    }
    return {
        "cluster_name": cluster["cluster_name"],
        "max_workers": 4,
        "upscaling_speed": cluster["upscaling_speed"],
        "idle_timeout_minutes": IDLE_TIMEOUT_MINUTES,
        "provider": {
            "type": "fake_multinode",
            "use_node_id_as_ip": True,
            "disable_node_updaters": True,
            "disable_launch_config_check": True,
            "gcs_address": gcs_address,
        },
        "available_node_types": types,
        "head_node_type": "ray.head.default",
        "auth": {},
        "docker": {},
        **dict.fromkeys(EMPTY_LISTS, []),
        "file_mounts": {},
        "file_mounts_sync_continuously": False,
    }


@pytest.fixture(scope="module")
def autoscaled(cluster, tmp_path_factory):
    """Run the driver against a head started with the fake provider; its report."""
    config_path = tmp_path_factory.mktemp("autoscaler") / "fake.yaml"
    head = LocalHead(
        num_cpus=0,
        args=("--include-dashboard=false", f"--autoscaling-config={config_path}"),
        env={"RAY_FAKE_CLUSTER": "1", "AUTOSCALER_UPDATE_INTERVAL_S": "1"},
    )
    config_path.write_text(json.dumps(fake_cluster_config(cluster, head.address)))
    try:
        head.start()
        cmd = [sys.executable, "-c", DRIVER, "150"]
        env = head.env(RAY_ADDRESS=head.address)
        done = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=240)
        assert done.returncode == 0, done.stderr[-4000:]
        (line,) = [x for x in done.stdout.splitlines() if x.startswith("REPORT ")]
        report = json.loads(line.removeprefix("REPORT "))
    finally:
        killed = head.stop()
    print("autoscaling:", json.dumps(report["events"]), "finished", round(report["finished"], 1),
          "drained", round(report["drained"], 1), "needed SIGKILL", len(killed))  # fmt: skip
    return report


@pytest.mark.ray
def test_worker_types_scale_up_for_the_job_and_down_when_idle(autoscaled):
    # The head has no CPU and GPU nodes none either: the two CPU tasks, which wait for each
    # other (the barrier), can only have run on two 1-CPU nodes of the CPU type at once; the
    # GPU task on a node of the GPU type. Both types were seen added. (How many worker nodes
    # ray.nodes() still lists at the end varies: the GCS may drop removed ones.)
    assert autoscaled["assigned"] == [{"CPU": 1.0}, {"CPU": 1.0}, {"GPU": 1.0}]
    assert {kind for _, kind, _ in autoscaled["events"]} == {"cpu", "gpu"}, autoscaled
    assert autoscaled["ever"] >= 2, autoscaled
    assert autoscaled["left"] == []  # every worker node removed once idle
