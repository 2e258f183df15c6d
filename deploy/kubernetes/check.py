"""Checks the Kubernetes manifests offline: every resource against the Kubernetes schemas
(kubernetes-validate bundles them, strict: unknown fields are errors), then the things the
schemas cannot know: the probes point at the port leasehold listens on, the drain fits in the
termination grace period, replicas and disruption budget keep the service up.

Prints the health services the probes ask for, as JSON, so the Rust test can check that a
running server answers them.

Usage: python check.py [KUBERNETES_VERSION]
"""

import json
import pathlib
import sys

import kubernetes_validate
import yaml

HERE = pathlib.Path(__file__).parent
KUBERNETES_VERSION = sys.argv[1] if len(sys.argv) > 1 else "1.30.0"


def load_resources():
    kustomization = yaml.safe_load((HERE / "kustomization.yaml").read_text())
    resources = []
    for name in kustomization["resources"]:
        for document in yaml.safe_load_all((HERE / name).read_text()):
            if document:
                resources.append((name, document))
    listed = set(kustomization["resources"])
    present = {path.name for path in HERE.glob("*.yaml")} - {"kustomization.yaml"}
    assert listed == present, f"kustomization lists {sorted(listed)}, folder has {sorted(present)}"
    return resources


def seconds(duration):
    units = {"ms": 0.001, "s": 1, "m": 60, "h": 3600}
    for unit in sorted(units, key=len, reverse=True):
        if duration.endswith(unit):
            return float(duration[: -len(unit)]) * units[unit]
    raise ValueError(f"not a duration: {duration}")


def only(resources, kind):
    found = [document for _, document in resources if document["kind"] == kind]
    assert found, f"no {kind}"
    return found


def main():
    resources = load_resources()
    for name, document in resources:
        kubernetes_validate.validate(document, KUBERNETES_VERSION, strict=True)
        print(f"valid: {name} {document['kind']}/{document['metadata']['name']}", file=sys.stderr)

    config = only(resources, "ConfigMap")[0]["data"]
    listen_port = int(config["LEASEHOLD_LISTEN"].rsplit(":", 1)[1])
    deployment = only(resources, "Deployment")[0]
    assert deployment["spec"]["replicas"] >= 2, "run at least two replicas"
    pod = deployment["spec"]["template"]["spec"]
    container = pod["containers"][0]
    ports = {port["name"]: port["containerPort"] for port in container["ports"]}
    assert ports["grpc"] == listen_port, "the grpc containerPort is not the listen port"

    health_port = int(config["LEASEHOLD_HEALTH_LISTEN"].rsplit(":", 1)[1])
    assert ports["health"] == health_port, "the health containerPort is not the health port"
    probes = {kind: container[kind]["grpc"] for kind in ("readinessProbe", "livenessProbe", "startupProbe")}
    for kind, probe in probes.items():
        assert probe["port"] == health_port, f"{kind} does not probe the plaintext health port"
    assert probes["readinessProbe"].get("service", "") == "", "readiness must use the overall status"
    assert probes["livenessProbe"].get("service", "") != "", "liveness must not follow readiness"

    args = container["args"]
    assert args[0] == "serve" and "--store" in args, "serve must name its store"
    assert args[args.index("--store") + 1] == "postgres", "a deployment runs on PostgreSQL"
    if "--migrate" in args and args[args.index("--migrate") + 1] == "skip":
        jobs = only(resources, "Job")
        migrate = [job for job in jobs if job["spec"]["template"]["spec"]["containers"][0]["args"] == ["migrate"]]
        assert migrate, "serve skips migrations but no Job runs `leasehold migrate`"
        job_container = migrate[0]["spec"]["template"]["spec"]["containers"][0]
        assert job_container["image"] == container["image"], "migrate with the image that serves"
        job_secrets = {source.get("secretRef", {}).get("name") for source in job_container["envFrom"]}
        assert "leasehold" in job_secrets, "the migrate Job does not get DATABASE_URL"

    grace = seconds(config["LEASEHOLD_SHUTDOWN_GRACE"])
    assert pod["terminationGracePeriodSeconds"] > grace, "the drain must fit in the grace period"
    assert pod["securityContext"]["runAsNonRoot"] is True
    assert container["securityContext"]["readOnlyRootFilesystem"] is True
    assert container["resources"]["requests"] and container["resources"]["limits"]
    envs = {source.get("configMapRef", source.get("secretRef", {})).get("name") for source in container["envFrom"]}
    assert {"leasehold"} == envs

    assert config["LEASEHOLD_AUTH"] == "token", "a deployment requires credentials"
    mounts = {mount["mountPath"]: mount["name"] for mount in container["volumeMounts"]}
    volumes = {volume["name"]: volume["secret"]["secretName"] for volume in pod["volumes"]}
    for variable in ("LEASEHOLD_ADMIN_TOKEN_FILE", "LEASEHOLD_TLS_CERT", "LEASEHOLD_TLS_KEY"):
        directory = config[variable].rsplit("/", 1)[0]
        assert directory in mounts, f"{variable} is not on a mounted Secret"
        assert volumes[mounts[directory]], f"{variable} is not on a mounted Secret"

    for service in only(resources, "Service"):
        targets = {port["targetPort"] for port in service["spec"]["ports"]}
        assert "grpc" in targets, f"{service['metadata']['name']} does not expose grpc"
        assert "metrics" not in targets, f"{service['metadata']['name']} exposes metrics"
    policy = only(resources, "NetworkPolicy")[0]
    admitted = {port["port"] for rule in policy["spec"]["ingress"] for port in rule["ports"]}
    assert admitted == {"grpc", "metrics", "health"}, f"the NetworkPolicy admits {admitted}"
    assert only(resources, "PodDisruptionBudget")[0]["spec"]["minAvailable"] >= 1

    print(json.dumps({
        "listen_port": listen_port,
        "health_port": health_port,
        "readiness_service": probes["readinessProbe"].get("service", ""),
        "liveness_service": probes["livenessProbe"]["service"],
    }))


if __name__ == "__main__":
    main()
