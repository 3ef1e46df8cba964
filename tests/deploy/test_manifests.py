"""Checks of everything under deploy/ that no test can run here (no Docker engine, no
Kubernetes, no cloud): docker-compose.yml through `docker-compose config` and its structure;
the Kubernetes manifests against the real API schemas (offline, from kubernetes-validate);
the KubeRay RayJob's structure and its pod templates against the core/v1 schema; the Ray
cluster launcher config through Ray's own validation; and that compose and the multi-node
namespace test run the same deploy/ entrypoints.
"""

from __future__ import annotations

import copy
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path
from typing import Any

import dockerfile
import kubernetes_validate
import pytest
import yaml

from tests.deploy import test_multinode

REPO = Path(__file__).resolve().parents[2]
DEPLOY = REPO / "deploy"
K8S = DEPLOY / "k8s"
K8S_VERSION = "1.30.0"
# The one compose service that does not run the hardbatch image.
THIRD_PARTY = {"prometheus"}


def _in_ci() -> bool:
    return os.environ.get("CI", "").lower() not in ("", "0", "false", "no")


def _compose() -> dict[str, Any]:
    data: dict[str, Any] = yaml.safe_load((REPO / "docker-compose.yml").read_text())
    return data


def _script(command: Any) -> str:
    """The deploy/ script a compose `command` (or healthcheck test) runs."""
    assert isinstance(command, list) and command, f"command must be an exec-form list: {command}"
    words = command[1:] if command[0] in ("CMD", "CMD-SHELL") else command
    assert re.fullmatch(r"deploy/[\w.-]+\.sh", words[0]), f"not a deploy/ script: {command}"
    path = REPO / words[0]
    assert path.is_file() and os.access(path, os.X_OK), f"{path} missing or not executable"
    return path.name


# -- docker-compose ------------------------------------------------------------------------

@pytest.fixture(scope="module")
def env_file(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A compose env file made by deploy/make-env.sh, as a user makes theirs."""
    path = tmp_path_factory.mktemp("compose") / "hardbatch.env"
    subprocess.run([str(DEPLOY / "make-env.sh"), str(path)], check=True, capture_output=True)
    return path


def test_make_env_writes_private_random_tokens_and_never_overwrites(env_file: Path) -> None:
    values = dict(line.split("=", 1) for line in env_file.read_text().splitlines()
                  if line and not line.startswith("#"))
    assert values["RAY_AUTH_MODE"] == "token"
    assert re.fullmatch(r"[0-9a-f]{64}", values["RAY_AUTH_TOKEN"])
    assert re.fullmatch(r"[0-9a-f]{64}", values["HARDBATCH_API_TOKEN"])
    assert values["RAY_AUTH_TOKEN"] != values["HARDBATCH_API_TOKEN"]
    assert env_file.stat().st_mode & 0o077 == 0, "the env file must be private to its owner"
    again = subprocess.run([str(DEPLOY / "make-env.sh"), str(env_file)], capture_output=True,
                           text=True)
    assert again.returncode != 0 and "exists" in again.stderr


def test_docker_compose_config_accepts_the_file(env_file: Path) -> None:
    exe = shutil.which("docker-compose")
    if exe is None:
        if _in_ci():
            pytest.fail("docker-compose is not installed (make test installs it: "
                        "scripts/test-deps.sh)")
        pytest.skip("docker-compose not installed: apt-get install docker-compose")
    env = {**os.environ, "HARDBATCH_ENV_FILE": str(env_file)}
    for args in (["config", "-q"], ["--profile", "monitoring", "config", "--services"]):
        r = subprocess.run([exe, "-f", str(REPO / "docker-compose.yml"), *args], env=env,
                           capture_output=True, text=True, timeout=120, cwd=REPO)
        assert r.returncode == 0, f"docker-compose {' '.join(args)}: {r.stderr}"
    assert set(r.stdout.split()) == {"redis", "sampler", "ray-head", "ray-worker", "train",
                                     "prometheus"}


def test_every_hardbatch_service_runs_a_deploy_script_the_namespace_test_runs_too() -> None:
    services = _compose()["services"]
    commands = {name: _script(s["command"]) for name, s in services.items()
                if name not in THIRD_PARTY}
    assert commands == {"redis": "redis.sh", "sampler": "sampler.sh", "ray-head": "ray-head.sh",
                        "ray-worker": "ray-worker.sh", "train": "train-job.sh"}
    # The multi-node test starts exactly these scripts (and says so in its source).
    assert set(test_multinode.ENTRYPOINTS) == set(commands.values())
    source = Path(test_multinode.__file__).read_text()
    for script in commands.values():
        assert f'DEPLOY / "{script}"' in source, f"the namespace test does not run {script}"
    # Healthchecks too: compose and the namespace test ask deploy/healthcheck.sh.
    checks = {name: s["healthcheck"]["test"] for name, s in services.items()
              if "healthcheck" in s}
    assert set(checks) == {"redis", "sampler", "ray-head"}
    for name, test in checks.items():
        assert _script(test) == "healthcheck.sh" and test[-1] == name
        assert f'_wait_healthy(net, head, "{name}"' in source


def test_compose_publishes_ports_on_loopback_only() -> None:
    for name, s in _compose()["services"].items():
        for port in s.get("ports", []):
            assert str(port).startswith("127.0.0.1:"), f"{name} publishes {port} beyond loopback"


def test_compose_topology() -> None:
    services = _compose()["services"]
    redis, sampler = services["redis"], services["sampler"]
    # Redis: AOF on (redis.sh always sets it) in a named volume, checked for health.
    assert "appendonly yes" in (DEPLOY / "redis.sh").read_text()
    data_dir = redis["environment"]["HARDBATCH_REDIS_DATA"]
    assert any(v.split(":")[1] == data_dir and v.split(":")[0] in _compose()["volumes"]
               for v in redis["volumes"])
    assert redis["env_file"] == sampler["env_file"], "Redis gets its password from the env file"
    # The sampler waits for a healthy Redis, is healthy once /readyz is, reads the tokens.
    assert sampler["depends_on"]["redis"]["condition"] == "service_healthy"
    assert "/readyz" in (DEPLOY / "healthcheck.sh").read_text()
    assert sampler["environment"]["HARDBATCH_REDIS_URL"] == "redis://redis:6380/0"
    for name in ("sampler", "ray-head", "ray-worker", "train"):
        assert services[name]["env_file"] == "${HARDBATCH_ENV_FILE:-deploy/hardbatch.env}"
    # Workers scale: no fixed name, no host port; they join the head once it is healthy.
    worker = services["ray-worker"]
    assert "container_name" not in worker and "ports" not in worker
    assert worker["environment"]["HARDBATCH_RAY_HEAD"] == "ray-head:6379"
    assert worker["depends_on"]["ray-head"]["condition"] == "service_healthy"
    # Every Ray node shares the checkpoint volume and has a real /dev/shm.
    for name in ("ray-head", "ray-worker"):
        assert "ray-storage:/data/ray" in services[name]["volumes"]
        assert services[name]["shm_size"]
    # The job runs once and exits, against the head's job server, the sampler and Redis.
    train = services["train"]
    assert train["restart"] == "no"
    env = train["environment"]
    assert env["HARDBATCH_JOB_ADDRESS"] == "http://ray-head:8265"
    assert env["HARDBATCH_SERVICE_URL"] == "http://sampler:8000"
    assert env["HARDBATCH_STORAGE"].startswith("/data/ray/")
    assert train["depends_on"]["sampler"]["condition"] == "service_healthy"
    # Prometheus is optional (a profile) and scrapes what compose exposes.
    prom = services["prometheus"]
    assert prom["profiles"] == ["monitoring"]
    config = yaml.safe_load((DEPLOY / "prometheus.yml").read_text())
    targets = {t for job in config["scrape_configs"]
               for sc in job.get("static_configs", []) for t in sc["targets"]}
    assert targets == {"sampler:8000", "ray-head:8080"}
    dns = [d for job in config["scrape_configs"] for d in job.get("dns_sd_configs", [])]
    assert dns == [{"names": ["ray-worker"], "type": "A", "port": 8080,
                    "refresh_interval": "30s"}]
    assert services["ray-head"]["environment"]["HARDBATCH_METRICS_PORT"] == "8080"
    assert worker["environment"]["HARDBATCH_METRICS_PORT"] == "8080"


# -- image ---------------------------------------------------------------------------------

def test_dockerfile_one_non_root_image_with_a_cuda_build_arg() -> None:
    steps = dockerfile.parse_file(str(DEPLOY / "Dockerfile"))  # Docker's own parser
    cmds = [s.cmd.upper() for s in steps]
    assert set(cmds) <= {"ARG", "FROM", "ENV", "RUN", "WORKDIR", "COPY", "USER", "EXPOSE",
                         "ENTRYPOINT", "CMD", "LABEL"}, cmds
    assert cmds.count("FROM") == 1, "one image for the service and the Ray nodes"
    first_from = cmds.index("FROM")
    args = {s.value[0].split("=", 1)[0]: s.value[0].split("=", 1)[-1] for s in steps
            if s.cmd.upper() == "ARG"}
    assert steps[first_from].value[0] == "${BASE_IMAGE}"
    assert args["BASE_IMAGE"].startswith("python:3.")  # CPU by default; CUDA via --build-arg
    assert args["TORCH_INDEX_URL"].endswith("/whl/cpu")
    users = [s.value[0] for s in steps if s.cmd.upper() == "USER"]
    assert users and users[-1] not in ("root", "0"), "the image must not run as root"
    (entry,) = [s for s in steps if s.cmd.upper() == "ENTRYPOINT"]
    assert entry.value[0] == "/usr/bin/tini", "PID 1 must reap the processes Ray orphans"
    (cmd,) = [s for s in steps if s.cmd.upper() == "CMD"]
    assert _script(list(cmd.value)) == "sampler.sh"

    # Every COPY source exists and is not excluded by .dockerignore; secrets are excluded.
    ignore = [line.strip() for line in (REPO / ".dockerignore").read_text().splitlines()
              if line.strip() and not line.startswith("#")]
    for path in (".git", ".venv", "deploy/hardbatch.env", "runs"):
        assert path in ignore, f".dockerignore must exclude {path}"
    for step in steps:
        if step.cmd.upper() == "COPY":
            for src in step.value[:-1]:
                assert (REPO / src).exists(), f"COPY {src}: no such file"
                assert src not in ignore, f"COPY {src} is excluded by .dockerignore"
    build = _compose()["x-hardbatch"]["build"]
    assert (REPO / build["context"] / build["dockerfile"]) == DEPLOY / "Dockerfile"


# -- Ray cluster launcher ------------------------------------------------------------------

def test_ray_cluster_yaml_passes_rays_own_validation() -> None:
    from ray.autoscaler._private.util import prepare_config, validate_config

    config = yaml.safe_load((DEPLOY / "ray-cluster.yaml").read_text())
    validate_config(prepare_config(copy.deepcopy(config)))
    head = " ".join(config["head_start_ray_commands"])
    # Redis and the sampler service live on the head, started by the compose entrypoints.
    assert "deploy/redis.sh" in head and "deploy/sampler.sh" in head
    assert "ray start --head" in head and "RAY_AUTH_MODE=token" in head
    worker = " ".join(config["worker_start_ray_commands"])
    assert "--address=$RAY_HEAD_IP:6379" in worker and "RAY_AUTH_MODE=token" in worker
    assert config["file_mounts"]["~/.ray/auth_token"] == "~/.ray/auth_token"


# -- Kubernetes ----------------------------------------------------------------------------

def _k8s_docs() -> dict[str, list[dict[str, Any]]]:
    return {p.name: [d for d in yaml.safe_load_all(p.read_text()) if d]
            for p in sorted(K8S.glob("*.yaml"))}


def _by_kind(kind: str) -> list[dict[str, Any]]:
    return [d for docs in _k8s_docs().values() for d in docs if d.get("kind") == kind]


def _validate_core(doc: dict[str, Any]) -> None:
    kubernetes_validate.validate(doc, K8S_VERSION, strict=True)


def _pod_templates(job: dict[str, Any]) -> dict[str, dict[str, Any]]:
    cluster = job["spec"]["rayClusterSpec"]
    out = {"head": cluster["headGroupSpec"]["template"],
           "submitter": job["spec"]["submitterPodTemplate"]}
    out.update({g["groupName"]: g["template"] for g in cluster["workerGroupSpecs"]})
    return out


def test_builtin_kubernetes_objects_match_the_api_schema() -> None:
    docs = [d for d in (d for ds in _k8s_docs().values() for d in ds)
            if d.get("apiVersion") != "ray.io/v1" and d.get("kind") != "Kustomization"]
    kinds = sorted(d["kind"] for d in docs)
    assert kinds == ["Deployment", "PersistentVolumeClaim", "Secret", "Service", "Service",
                     "StatefulSet"]
    for doc in docs:
        _validate_core(doc)


def test_the_schema_check_catches_a_misspelt_field() -> None:
    deployment = copy.deepcopy(_by_kind("Deployment")[0])
    deployment["spec"]["template"]["spec"]["containers"][0]["imagePullPolicyy"] = "Always"
    with pytest.raises(kubernetes_validate.ValidationError):
        _validate_core(deployment)


# The RayJob fields KubeRay v1.6 (ray.io/v1) knows: its CRD is not available offline, so the
# structure is checked here and every pod template against the core/v1 schema.
RAYJOB_SPEC = {"activeDeadlineSeconds", "backoffLimit", "clusterSelector", "deletionStrategy",
               "entrypoint", "entrypointNumCpus", "entrypointNumGpus", "entrypointResources",
               "jobId", "managedBy", "metadata", "rayClusterSpec", "runtimeEnvYAML",
               "shutdownAfterJobFinishes", "submissionMode", "submitterConfig",
               "submitterPodTemplate", "suspend", "ttlSecondsAfterFinished"}
RAYCLUSTER_SPEC = {"authOptions", "autoscalerOptions", "enableInTreeAutoscaling",
                   "gcsFaultToleranceOptions", "headGroupSpec", "headServiceAnnotations",
                   "managedBy", "rayVersion", "suspend", "workerGroupSpecs"}
HEAD_GROUP = {"enableIngress", "headService", "rayStartParams", "serviceType", "template"}
WORKER_GROUP = {"groupName", "idleTimeoutSeconds", "maxReplicas", "minReplicas", "numOfHosts",
                "rayStartParams", "replicas", "scaleStrategy", "suspend", "template"}


def test_rayjob_structure() -> None:
    (job,) = _by_kind("RayJob")
    assert job["apiVersion"] == "ray.io/v1"
    spec = job["spec"]
    assert set(spec) <= RAYJOB_SPEC, set(spec) - RAYJOB_SPEC
    assert spec["shutdownAfterJobFinishes"] is True
    assert isinstance(spec["ttlSecondsAfterFinished"], int)
    assert spec["submissionMode"] in ("K8sJobMode", "HTTPMode", "SidecarMode")
    entry = spec["entrypoint"].split()
    assert entry[:4] == ["hardbatch", "train", "--address", "auto"]
    cluster = spec["rayClusterSpec"]
    assert set(cluster) <= RAYCLUSTER_SPEC, set(cluster) - RAYCLUSTER_SPEC
    assert cluster["rayVersion"] == __import__("ray").__version__
    assert cluster["authOptions"]["mode"] == "token"
    head = cluster["headGroupSpec"]
    assert set(head) <= HEAD_GROUP and "template" in head
    groups = cluster["workerGroupSpecs"]
    assert groups
    for g in groups:
        assert set(g) <= WORKER_GROUP, set(g) - WORKER_GROUP
        assert {"groupName", "minReplicas", "maxReplicas", "template"} <= set(g)
        assert 0 <= g["minReplicas"] <= g["replicas"] <= g["maxReplicas"]
    # rayStartParams is a map of strings in the CRD: `num-cpus: 1` would be refused.
    for params in [head["rayStartParams"], *(g["rayStartParams"] for g in groups)]:
        assert all(isinstance(v, str) for v in params.values()), params
    # STRICT_SPREAD needs as many nodes as workers.
    workers = int(entry[entry.index("--workers") + 1])
    assert 1 + sum(g["maxReplicas"] for g in groups) >= workers


def test_rayjob_pod_templates_match_the_core_schema() -> None:
    (job,) = _by_kind("RayJob")
    for name, template in _pod_templates(job).items():
        _validate_core({"apiVersion": "v1", "kind": "PodTemplate",
                        "metadata": {"name": name}, "template": template})


def test_kubernetes_objects_refer_to_each_other_correctly() -> None:
    (secret,) = _by_kind("Secret")
    (job,) = _by_kind("RayJob")
    (redis,) = _by_kind("StatefulSet")
    (sampler,) = _by_kind("Deployment")
    (pvc,) = _by_kind("PersistentVolumeClaim")
    services = {s["metadata"]["name"]: s for s in _by_kind("Service")}
    keys = set(secret["stringData"])
    assert keys == {"auth_token", "api_token", "redis_password"}
    assert all(v.startswith("REPLACE-") for v in secret["stringData"].values()), \
        "secret.yaml must hold placeholders, never real tokens"
    assert job["spec"]["rayClusterSpec"]["authOptions"]["secretName"] == secret["metadata"]["name"]

    # Every secretKeyRef names this Secret and one of its keys.
    pods = {"redis": redis["spec"]["template"], "sampler": sampler["spec"]["template"],
            **_pod_templates(job)}
    for name, pod in pods.items():
        for c in pod["spec"]["containers"]:
            for e in c.get("env", []):
                ref = e.get("valueFrom", {}).get("secretKeyRef")
                if ref:
                    assert ref["name"] == secret["metadata"]["name"] and ref["key"] in keys, \
                        (name, e)
        for v in pod["spec"].get("volumes", []):
            if "persistentVolumeClaim" in v:
                assert v["persistentVolumeClaim"]["claimName"] == pvc["metadata"]["name"]
    assert "ReadWriteMany" in pvc["spec"]["accessModes"], "every Ray node mounts the storage"

    # Redis: deploy/redis.sh on a persistent claim mounted where it keeps the AOF.
    (rc,) = redis["spec"]["template"]["spec"]["containers"]
    assert rc["command"][-1] == "deploy/redis.sh"
    env = {e["name"]: e.get("value") for e in rc["env"]}
    claims = [t["metadata"]["name"] for t in redis["spec"]["volumeClaimTemplates"]]
    assert any(m["name"] in claims and m["mountPath"] == env["HARDBATCH_REDIS_DATA"]
               for m in rc["volumeMounts"])
    # The sampler: deploy/sampler.sh, ready on /readyz.
    (sc,) = sampler["spec"]["template"]["spec"]["containers"]
    assert sc["command"][-1] == "deploy/sampler.sh"
    assert sc["readinessProbe"]["httpGet"]["path"] == "/readyz"

    # Services select their pods, and the job's URLs name those services and ports.
    for workload, svc in ((redis, services["hardbatch-redis"]),
                          (sampler, services["hardbatch-sampler"])):
        labels = workload["spec"]["template"]["metadata"]["labels"]
        assert svc["spec"]["selector"].items() <= labels.items()
        assert workload["spec"]["selector"]["matchLabels"].items() <= labels.items()
    entry = job["spec"]["entrypoint"]
    for name, svc in services.items():
        port = svc["spec"]["ports"][0]["port"]
        assert re.search(rf"//{name}:{port}\b", entry), f"entrypoint does not use {name}:{port}"

    kustomization = yaml.safe_load((K8S / "kustomization.yaml").read_text())
    listed = set(kustomization["resources"])
    assert listed == {p.name for p in K8S.glob("*.yaml")} - {"kustomization.yaml", "secret.yaml"}


# -- the entrypoints themselves --------------------------------------------------------------

def test_entrypoint_scripts_parse_and_exec_their_server() -> None:
    for script in sorted(DEPLOY.glob("*.sh")):
        r = subprocess.run(["bash", "-n", str(script)], capture_output=True, text=True)
        assert r.returncode == 0, f"{script.name}: {r.stderr}"
    for name in test_multinode.ENTRYPOINTS:
        lines = (DEPLOY / name).read_text().splitlines()
        assert lines[0] == "#!/usr/bin/env bash" and "set -euo pipefail" in lines
        # The server replaces the script, so a stop signal reaches it and PIDs stay clean.
        assert any(line.startswith("exec ") for line in lines), f"{name} does not exec"


def _run(script: str, env: dict[str, str], tmp_path: Path) -> subprocess.CompletedProcess[str]:
    base = {"PATH": f"{Path(sys.executable).parent}:{os.environ['PATH']}", "HOME": str(tmp_path)}
    return subprocess.run([str(DEPLOY / script)], env={**base, **env}, capture_output=True,
                          text=True, timeout=60)


def test_ray_nodes_refuse_to_start_without_a_token(tmp_path: Path) -> None:
    for script in ("ray-head.sh", "ray-worker.sh"):
        r = _run(script, {"HARDBATCH_RAY_HEAD": "127.0.0.1:1"}, tmp_path)
        assert r.returncode == 2 and "RAY_AUTH_TOKEN" in r.stderr, r.stderr


@pytest.mark.parametrize(("env", "message"), [
    ({"HARDBATCH_REDIS_FSYNC": "sometimes"}, "HARDBATCH_REDIS_FSYNC"),
    ({"HARDBATCH_REDIS_PORT": "63x"}, "HARDBATCH_REDIS_PORT"),
    ({"HARDBATCH_REDIS_PASSWORD": "a b"}, "HARDBATCH_REDIS_PASSWORD"),
])
def test_redis_entrypoint_rejects_bad_settings(env: dict[str, str], message: str,
                                               tmp_path: Path) -> None:
    r = _run("redis.sh", {"HARDBATCH_REDIS_DATA": str(tmp_path / "data"), **env}, tmp_path)
    assert r.returncode == 2 and message in r.stderr, r.stderr


def test_sampler_entrypoint_refuses_an_embedded_store(tmp_path: Path) -> None:
    r = _run("sampler.sh", {"HARDBATCH_REDIS_URL": "unix:///tmp/x.sock"}, tmp_path)
    assert r.returncode == 2 and "redis://" in r.stderr, r.stderr


def test_train_job_rejects_a_bad_run_name(tmp_path: Path) -> None:
    r = _run("train-job.sh", {"RAY_AUTH_MODE": "disabled", "HARDBATCH_RUN": "a b/c"}, tmp_path)
    assert r.returncode == 2 and "HARDBATCH_RUN" in r.stderr, r.stderr


def test_make_env_writes_a_redis_password_and_redis_refuses_to_run_open(tmp_path: Path) -> None:
    env_file = tmp_path / "hb.env"
    r = subprocess.run([str(DEPLOY / "make-env.sh"), str(env_file)], capture_output=True,
                       text=True, timeout=30)
    assert r.returncode == 0, r.stderr
    values = dict(line.split("=", 1) for line in env_file.read_text().splitlines()
                  if line and not line.startswith("#"))
    assert len(values["HARDBATCH_REDIS_PASSWORD"]) == 64
    assert env_file.stat().st_mode & 0o077 == 0
    r = _run("redis.sh", {"HARDBATCH_REDIS_DATA": str(tmp_path / "data"),
                          "HARDBATCH_REDIS_BIND": "0.0.0.0"}, tmp_path)
    assert r.returncode == 2 and "HARDBATCH_REDIS_PASSWORD" in r.stderr, r.stderr


# -- placeholders of the templates refused ------------------------------------------------------

def _template_placeholders() -> list[tuple[str, str]]:
    """(value, the file its message must name) for every secret the templates ship, and more."""
    secret = yaml.safe_load((K8S / "secret.yaml").read_text())["stringData"]
    example = dict(line.split("=", 1) for line in
                   (DEPLOY / "hardbatch.env.example").read_text().splitlines()
                   if "=" in line and not line.startswith("#"))
    return ([(v, "deploy/k8s/secret.yaml") for v in secret.values()]
            + [(v, "deploy/hardbatch.env.example") for k, v in example.items()
               if k != "RAY_AUTH_MODE"]
            + [("change-me", "deploy/make-env.sh"), ("", "deploy/make-env.sh")])


@pytest.mark.parametrize(("value", "file"), _template_placeholders())
def test_deploy_scripts_refuse_a_template_placeholder_or_empty_secret(
        value: str, file: str, tmp_path: Path) -> None:
    cases = [("sampler.sh", "HARDBATCH_API_TOKEN",
              {"HARDBATCH_REDIS_URL": "redis://127.0.0.1:1/0", "HARDBATCH_WAIT_S": "1"}),
             ("sampler.sh", "HARDBATCH_REDIS_PASSWORD",
              {"HARDBATCH_REDIS_URL": "redis://127.0.0.1:1/0", "HARDBATCH_WAIT_S": "1"}),
             ("redis.sh", "HARDBATCH_REDIS_PASSWORD",
              {"HARDBATCH_REDIS_DATA": str(tmp_path / "data")}),
             ("ray-head.sh", "RAY_AUTH_TOKEN", {}),
             ("train-job.sh", "HARDBATCH_API_TOKEN", {"RAY_AUTH_MODE": "disabled"})]
    for script, name, env in cases:
        r = _run(script, {**env, name: value}, tmp_path)
        assert r.returncode == 2 and name in r.stderr and file in r.stderr, (script, r.stderr)


@pytest.mark.parametrize(("value", "file"), _template_placeholders())
def test_service_settings_refuse_a_template_placeholder_or_empty_secret(
        value: str, file: str) -> None:
    from hardbatch.services.core.config import Settings

    for kwargs in ({"api_token": value}, {"redis_password": value},
                   {"redis_url": f"redis://:{value}@127.0.0.1:6380/0"} if value else {}):
        if not kwargs:
            continue
        with pytest.raises(ValueError, match=re.escape(file)) as e:
            Settings(**kwargs)
        # Errors never echo the settings given (the other secrets among them).
        assert "input_value" not in str(e.value)
