#!/usr/bin/env python3
"""Asserts wagate's deployment policies on rendered Kubernetes manifests.

    kubectl kustomize deploy/kubernetes/overlays/production > prod.yaml
    python3 deploy/kubernetes/check_manifests.py --overlay production prod.yaml

Every pod of every workload: non-root, seccomp RuntimeDefault, no service-account token; every
container: read-only root filesystem, no privilege escalation, all capabilities dropped,
requests and limits for CPU and memory, /healthz liveness and /readyz readiness probes on the
port its listener is configured to; a termination grace period longer than wagate's drain
(WAGATE_SHUTDOWN_GRACE_MS + 1 s + any preStop pause); secrets only by secretKeyRef (no Secret
object, no literal secret value, no credentials in a ConfigMap URL); a PodDisruptionBudget for
each workload; the ingress spool on a PersistentVolumeClaim. Production: WAGATE_NATS_REPLICAS=3
and a KEDA ScaledObject on the real stream and consumer, with no second HPA on the workers.
Exits 1 and lists every violation; needs PyYAML.
"""

import argparse
import math
import re
import sys

import yaml

WORKLOAD_KINDS = {"Deployment", "StatefulSet", "DaemonSet"}
SECRET_ENV = re.compile(r"(KEY|TOKEN|SECRET|PASSWORD|CREDS)", re.I)
URL_WITH_PASSWORD = re.compile(r"^[a-z]+://[^/@\s]*:[^/@\s]+@", re.I)
ROLES = {"ingress", "worker", "sender"}
# shared/src/bus/jetstream.rs: streams "<PREFIX>_INBOUND", consumers "<prefix>-inbound",
# with WAGATE_PREFIX's default "wagate".
INBOUND_STREAM = "WAGATE_INBOUND"
INBOUND_CONSUMER = "wagate-inbound"


def port_of(listen):
    return int(str(listen).rsplit(":", 1)[1])


class Checker:
    def __init__(self, docs, overlay):
        self.docs = [d for d in docs if d]
        self.overlay = overlay
        self.errors = []

    def fail(self, where, what):
        self.errors.append(f"{where}: {what}")

    def of_kind(self, kind):
        return [d for d in self.docs if d.get("kind") == kind]

    def config(self):
        data = {}
        for cm in self.of_kind("ConfigMap"):
            data.update(cm.get("data") or {})
        return data

    def run(self):
        config = self.config()
        self.check_no_secrets(config)
        grace_ms = int(config.get("WAGATE_SHUTDOWN_GRACE_MS", "20000"))
        workloads = [d for d in self.docs if d.get("kind") in WORKLOAD_KINDS]
        roles_seen = set()
        for w in workloads:
            role = w["metadata"].get("labels", {}).get("app.kubernetes.io/component")
            roles_seen.add(role)
            self.check_workload(w, role, grace_ms, config)
        if roles_seen != ROLES:
            self.fail("workloads", f"expected roles {sorted(ROLES)}, found {sorted(map(str, roles_seen))}")
        self.check_pdbs(workloads)
        self.check_scaling(config)
        return self.errors

    def check_no_secrets(self, config):
        for s in self.of_kind("Secret"):
            self.fail(f"Secret/{s['metadata']['name']}", "a Secret in the manifests: the operator creates it, never git")
        for key, value in config.items():
            if SECRET_ENV.search(key):
                self.fail(f"ConfigMap key {key}", "a secret setting in a ConfigMap")
            if URL_WITH_PASSWORD.match(str(value)):
                self.fail(f"ConfigMap key {key}", "a URL with credentials in a ConfigMap")

    def check_workload(self, w, role, grace_ms, config):
        name = f"{w['kind']}/{w['metadata']['name']}"
        pod = w["spec"]["template"]["spec"]
        psc = pod.get("securityContext") or {}
        if psc.get("runAsNonRoot") is not True:
            self.fail(name, "pod securityContext.runAsNonRoot is not true")
        if not psc.get("runAsUser"):
            self.fail(name, "pod securityContext.runAsUser unset or 0")
        if (psc.get("seccompProfile") or {}).get("type") != "RuntimeDefault":
            self.fail(name, "pod seccompProfile is not RuntimeDefault")
        if pod.get("automountServiceAccountToken") is not False:
            self.fail(name, "automountServiceAccountToken is not false")
        if pod.get("hostNetwork") or pod.get("hostPID") or pod.get("hostIPC"):
            self.fail(name, "uses the host's network, PID or IPC namespace")

        containers = pod.get("containers", []) + pod.get("initContainers", [])
        max_pre_stop = 0
        for c in containers:
            cname = f"{name} container {c['name']}"
            self.check_container(cname, c)
            env = {e["name"]: e for e in c.get("env", [])}
            self.check_env(cname, env)
            pre_stop = ((c.get("lifecycle") or {}).get("preStop") or {}).get("sleep") or {}
            max_pre_stop = max(max_pre_stop, int(pre_stop.get("seconds", 0)))
            if c in pod.get("containers", []):
                self.check_probes(cname, c, role, env)
                self.check_data_dir(name, w, c, role, env)

        need = math.ceil(grace_ms / 1000) + 1 + max_pre_stop
        have = pod.get("terminationGracePeriodSeconds", 30)
        if have <= need:
            self.fail(name, f"terminationGracePeriodSeconds {have} s does not exceed wagate's drain of {need} s "
                            f"(WAGATE_SHUTDOWN_GRACE_MS {grace_ms} + 1 s + preStop {max_pre_stop} s)")

    def check_container(self, cname, c):
        sc = c.get("securityContext") or {}
        if sc.get("readOnlyRootFilesystem") is not True:
            self.fail(cname, "readOnlyRootFilesystem is not true")
        if sc.get("allowPrivilegeEscalation") is not False:
            self.fail(cname, "allowPrivilegeEscalation is not false")
        if sc.get("privileged"):
            self.fail(cname, "privileged")
        if "ALL" not in ((sc.get("capabilities") or {}).get("drop") or []):
            self.fail(cname, "capabilities do not drop ALL")
        if (sc.get("capabilities") or {}).get("add"):
            self.fail(cname, "adds capabilities")
        if sc.get("runAsUser") == 0:
            self.fail(cname, "runs as root")
        res = c.get("resources") or {}
        for kind in ("requests", "limits"):
            for r in ("cpu", "memory") if kind == "requests" else ("memory",):
                if r not in (res.get(kind) or {}):
                    self.fail(cname, f"no resources.{kind}.{r}")
        image = str(c.get("image", ""))
        if image.endswith(":latest") or (":" not in image.rsplit("/", 1)[-1] and "@" not in image):
            self.fail(cname, f"image {image!r} has no pinned tag")

    def check_env(self, cname, env):
        for n, e in env.items():
            if SECRET_ENV.search(n) and "value" in e:
                self.fail(cname, f"{n} has a literal value; use valueFrom.secretKeyRef")
            if "value" in e and URL_WITH_PASSWORD.match(str(e["value"])):
                self.fail(cname, f"{n} is a URL with credentials in the manifest")
        for required in ("WAGATE_MASTER_KEY",):
            ref = (env.get(required, {}).get("valueFrom") or {}).get("secretKeyRef")
            if not ref:
                self.fail(cname, f"{required} does not come from a secretKeyRef")

    def check_probes(self, cname, c, role, env):
        if role == "ingress":
            listen = (env.get("WAGATE_LISTEN") or {}).get("value", "0.0.0.0:8080")
            admin = (env.get("WAGATE_ADMIN_LISTEN") or {}).get("value", "127.0.0.1:8081")
            if not admin.startswith(("0.0.0.0:", "[::]:")):
                self.fail(cname, "WAGATE_ADMIN_LISTEN is loopback: Prometheus cannot scrape /metrics")
            ref = (env.get("WAGATE_ADMIN_TOKEN", {}).get("valueFrom") or {}).get("secretKeyRef")
            if not ref:
                self.fail(cname, "WAGATE_ADMIN_TOKEN does not come from a secretKeyRef")
        else:
            listen = (env.get("WAGATE_METRICS_LISTEN") or {}).get("value")
            if not listen:
                self.fail(cname, "no WAGATE_METRICS_LISTEN: nothing serves its probes")
                return
            if "WAGATE_ADMIN_TOKEN" in env:
                self.fail(cname, "gets the admin token, which only ingress needs")
        port = port_of(listen)
        named = {p.get("name"): p["containerPort"] for p in c.get("ports", [])}
        for probe, path in (("livenessProbe", "/healthz"), ("readinessProbe", "/readyz")):
            get = (c.get(probe) or {}).get("httpGet")
            if not get:
                self.fail(cname, f"no {probe} (httpGet {path})")
                continue
            if get.get("path") != path:
                self.fail(cname, f"{probe} path {get.get('path')} is not {path}")
            p = get.get("port")
            p = named.get(p, p)
            if p != port:
                self.fail(cname, f"{probe} port {p} is not the listener's port {port}")

    def check_data_dir(self, name, w, c, role, env):
        data_dir = (env.get("WAGATE_DATA_DIR") or {}).get("value")
        mounts = {m["mountPath"]: m["name"] for m in c.get("volumeMounts", [])}
        if not data_dir or data_dir not in mounts:
            self.fail(name, "WAGATE_DATA_DIR is not a mounted volume (read-only root filesystem)")
            return
        if role == "ingress":
            claims = {t["metadata"]["name"] for t in w["spec"].get("volumeClaimTemplates", [])}
            if w["kind"] != "StatefulSet" or mounts[data_dir] not in claims:
                self.fail(name, "the ingress spool (WAGATE_DATA_DIR) is not on a PersistentVolumeClaim")

    def check_pdbs(self, workloads):
        pdbs = self.of_kind("PodDisruptionBudget")
        for w in workloads:
            labels = w["spec"]["template"]["metadata"].get("labels", {})
            covering = [p for p in pdbs
                        if all(labels.get(k) == v for k, v in p["spec"]["selector"].get("matchLabels", {}).items())]
            if len(covering) != 1:
                self.fail(f"{w['kind']}/{w['metadata']['name']}", f"{len(covering)} PodDisruptionBudgets select it (want 1)")

    def check_scaling(self, config):
        hpas = [h for h in self.of_kind("HorizontalPodAutoscaler")
                if h["spec"]["scaleTargetRef"]["name"] == "wagate-worker"]
        scaled = [s for s in self.of_kind("ScaledObject")
                  if s["spec"]["scaleTargetRef"]["name"] == "wagate-worker"]
        if len(hpas) + len(scaled) != 1:
            self.fail("worker scaling", f"{len(hpas)} HPAs and {len(scaled)} ScaledObjects target wagate-worker (want one)")
        for s in scaled:
            for t in s["spec"]["triggers"]:
                if t["type"] == "nats-jetstream":
                    md = t["metadata"]
                    if md.get("stream") != INBOUND_STREAM or md.get("consumer") != INBOUND_CONSUMER:
                        self.fail("ScaledObject/wagate-worker", f"scales on {md.get('stream')}/{md.get('consumer')}, "
                                                                f"not {INBOUND_STREAM}/{INBOUND_CONSUMER}")
        if self.overlay == "production":
            if config.get("WAGATE_NATS_REPLICAS") != "3":
                self.fail("production", "WAGATE_NATS_REPLICAS is not 3")
            if not scaled:
                self.fail("production", "no KEDA ScaledObject for the workers")


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--overlay", default="")
    ap.add_argument("files", nargs="+")
    args = ap.parse_args()
    docs = []
    for f in args.files:
        with open(f) as fh:
            docs += list(yaml.safe_load_all(fh))
    errors = Checker(docs, args.overlay).run()
    for e in errors:
        print(f"check_manifests {args.overlay}: {e}", file=sys.stderr)
    if errors:
        sys.exit(1)
    print(f"check_manifests {args.overlay}: {len(docs)} objects, policies hold")


if __name__ == "__main__":
    main()
