#!/usr/bin/env python3
"""Checks the deployment files that CI cannot run (no Docker engine, no cluster).

    check_manifests.py [--metrics-url http://127.0.0.1:9090/metrics]

- deploy/k8s/*.yaml, deploy/kserve/*.yaml parse, and each object has the fields its kind
  needs, with the cross-references between them consistent (selectors, port names, probe
  ports, HPA target, runtime name, termination grace > server shutdown grace).
- deploy/prometheus.yml scrapes the metrics port the compose file configures.
- The Grafana dashboard is valid JSON and, with --metrics-url, every metric it queries is
  one the live server exports.
"""
import argparse
import glob
import json
import re
import sys
import urllib.request

import yaml

errors = []


def need(cond, what):
    if not cond:
        errors.append(what)
    return cond


def get(obj, path, default=None):
    for key in path.split("."):
        if not isinstance(obj, dict) or key not in obj:
            return default
        obj = obj[key]
    return obj


def seconds(text):
    m = re.fullmatch(r"(\d+)s", str(text))
    return int(m.group(1)) if m else None


def load(pattern):
    docs = []
    for path in sorted(glob.glob(pattern)):
        with open(path) as f:
            for doc in yaml.safe_load_all(f):
                if doc is not None:
                    docs.append((path, doc))
    return docs


def check_container(where, c, probe_required=True):
    need(c.get("image"), f"{where}: container {c.get('name')} has no image")
    ports = {p.get("name"): p.get("containerPort") for p in c.get("ports", [])}
    need(ports, f"{where}: container {c.get('name')} declares no ports")
    if probe_required:
        rp = c.get("readinessProbe", {})
        need(rp, f"{where}: no readinessProbe")
        if "grpc" in rp:
            need(rp["grpc"].get("port") in ports.values(),
                 f"{where}: readiness gRPC port {rp['grpc'].get('port')} is not a container port")
    need(get(c, "resources.requests"), f"{where}: no resource requests")
    return ports


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--metrics-url")
    a = ap.parse_args()

    k8s = load("deploy/k8s/*.yaml")
    kserve = load("deploy/kserve/*.yaml")
    for path, doc in k8s + kserve:
        for f in ("apiVersion", "kind", "metadata"):
            need(f in doc, f"{path}: missing {f}")
        need(get(doc, "metadata.name"), f"{path}: missing metadata.name")
    by_kind = {}
    for path, doc in k8s + kserve:
        by_kind.setdefault(doc["kind"], []).append((path, doc))

    deployments = {d["metadata"]["name"]: (p, d) for p, d in by_kind.get("Deployment", [])}
    need("voxconv" in deployments, "deploy/k8s: no Deployment named voxconv")
    for name, (path, d) in deployments.items():
        need(d["apiVersion"] == "apps/v1", f"{path}: Deployment apiVersion")
        sel = get(d, "spec.selector.matchLabels", {})
        labels = get(d, "spec.template.metadata.labels", {})
        need(sel and all(labels.get(k) == v for k, v in sel.items()),
             f"{path}: selector {sel} does not match template labels {labels}")
        containers = get(d, "spec.template.spec.containers", [])
        need(containers, f"{path}: no containers")
        for c in containers:
            ports = check_container(f"{path} {name}", c)
            if name == "voxconv":
                need(get(c, "livenessProbe.grpc"), f"{path}: voxconv needs a gRPC liveness probe")
                need(get(c, "readinessProbe.grpc"), f"{path}: voxconv needs a gRPC readiness probe")
                need("grpc" in ports and "metrics" in ports, f"{path}: ports grpc and metrics")
                env = {e["name"]: e.get("value") for e in c.get("env", [])}
                grace = seconds(env.get("VOXCONV_SHUTDOWN_GRACE", "30s"))
                pre = get(c, "lifecycle.preStop.sleep.seconds", 0)
                term = get(d, "spec.template.spec.terminationGracePeriodSeconds", 30)
                need(grace is not None and term > grace + pre,
                     f"{path}: terminationGracePeriodSeconds {term} must exceed shutdown grace "
                     f"{grace} + preStop {pre}")
                need(get(c, "resources.limits.memory"), f"{path}: voxconv needs a memory limit")

    for path, s in by_kind.get("Service", []):
        sel = get(s, "spec.selector", {})
        targets = [dep for dep in deployments.values()
                   if all(get(dep[1], "spec.template.metadata.labels", {}).get(k) == v
                          for k, v in sel.items())]
        need(targets, f"{path}: Service {s['metadata']['name']} selects no Deployment")
        for port in get(s, "spec.ports", []):
            tp = port.get("targetPort")
            if isinstance(tp, str) and targets:
                names = {p.get("name") for c in get(targets[0][1], "spec.template.spec.containers")
                         for p in c.get("ports", [])}
                need(tp in names, f"{path}: targetPort {tp} is not a container port name")
        if s["metadata"]["name"] == "voxconv":
            need(get(s, "spec.clusterIP") == "None",
                 f"{path}: the voxconv Service must be headless (clusterIP: None)")

    for path, h in by_kind.get("HorizontalPodAutoscaler", []):
        ref = get(h, "spec.scaleTargetRef.name")
        need(ref in deployments, f"{path}: HPA targets unknown Deployment {ref}")
        need(get(h, "spec.minReplicas", 1) <= get(h, "spec.maxReplicas", 0),
             f"{path}: minReplicas > maxReplicas")
        need(get(h, "spec.metrics"), f"{path}: HPA without metrics")

    runtimes = {r["metadata"]["name"]: (p, r) for p, r in by_kind.get("ServingRuntime", [])}
    need(runtimes, "deploy/kserve: no ServingRuntime")
    for name, (path, r) in runtimes.items():
        need("grpc-v2" in get(r, "spec.protocolVersions", []), f"{path}: protocolVersions needs grpc-v2")
        formats = [f.get("name") for f in get(r, "spec.supportedModelFormats", [])]
        need(formats, f"{path}: supportedModelFormats")
        for c in get(r, "spec.containers", []):
            ports = check_container(f"{path} {name}", c)
            need("h2c" in ports, f"{path}: KServe needs the gRPC port named h2c")
            args = " ".join(c.get("args", []))
            need("/mnt/models" in args, f"{path}: models must come from /mnt/models")
            need(f"0.0.0.0:{ports.get('h2c')}" in args, f"{path}: --listen must use the h2c port")
    for path, isvc in by_kind.get("InferenceService", []):
        rt = get(isvc, "spec.predictor.model.runtime")
        need(rt in runtimes, f"{path}: runtime {rt} is not a ServingRuntime here")
        fmt = get(isvc, "spec.predictor.model.modelFormat.name")
        if rt in runtimes:
            need(fmt in [f["name"] for f in get(runtimes[rt][1], "spec.supportedModelFormats")],
                 f"{path}: modelFormat {fmt} not supported by runtime {rt}")
        need(get(isvc, "spec.predictor.model.storageUri"), f"{path}: storageUri")

    # Compose and Prometheus agree on the metrics port.
    compose = yaml.safe_load(open("deploy/docker-compose.yml"))
    env = get(compose, "services.voxconv.environment", {})
    mport = str(env.get("VOXCONV_METRICS_LISTEN", "")).rsplit(":", 1)[-1]
    prom = yaml.safe_load(open("deploy/prometheus.yml"))
    targets = [t for sc in prom["scrape_configs"] for st in sc["static_configs"] for t in st["targets"]]
    need(f"voxconv:{mport}" in targets, f"deploy/prometheus.yml scrapes {targets}, compose serves metrics on {mport}")
    need(env.get("VOXCONV_OTLP_ENDPOINT", "").startswith("http://otel-collector:"),
         "compose: voxconv must export traces to the otel-collector service")
    for svc in ("voxconv", "otel-collector", "jaeger", "prometheus", "grafana", "ghz"):
        need(svc in compose["services"], f"compose: service {svc} missing")
    need("loadtest" in compose["services"]["ghz"].get("profiles", []), "compose: ghz in profile loadtest")

    dash = json.load(open("deploy/grafana/dashboards/voxconv.json"))
    exprs = [t["expr"] for p in dash["panels"] for t in p.get("targets", [])]
    need(exprs, "grafana dashboard has no queries")
    used = sorted({m for e in exprs for m in re.findall(r"\bvoxconv_[a-z_]+", e)})
    if a.metrics_url:
        text = urllib.request.urlopen(a.metrics_url, timeout=5).read().decode()
        exported = set(re.findall(r"^(voxconv_[a-z_]+)", text, re.M))
        for m in used:
            need(m in exported, f"dashboard queries {m}, which the server does not export")
        print(f"dashboard: {len(used)} metrics queried, all exported by the live server")

    n = len(k8s) + len(kserve)
    if errors:
        for e in errors:
            print("FAIL:", e)
        sys.exit(1)
    print(f"manifests: {n} Kubernetes/KServe objects, compose, Prometheus and Grafana files consistent")


if __name__ == "__main__":
    main()
