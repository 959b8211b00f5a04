#!/usr/bin/env python3
"""Invariant checks for Netbore's deployment files (run by scripts/validate-deploy.sh).

Subcommands:
  invariants LABEL FILE [--external A,B] [--no-pdb]   checks a set of manifests (A, B: objects
                                                     the operator creates; --no-pdb: no
                                                     PodDisruptionBudget expected)
  broken LABEL FILE [--external A,B]                 breaks a passing edge set in known ways
                                                     (literal secret, no NetworkPolicy, wrong
                                                     port, ...); each must fail the invariants
  helm-render CHART OUTDIR                           renders the chart for several value
                                                     sets (helm-python-sdk, Helm's own Go
                                                     engine), lints it, and runs the
                                                     schema and refusal tests
  dockerfiles DIR                                    checks the Dockerfiles' invariants
  values-comments VALUES_YAML                        every chart value has a comment
  crds FILE [CORE_FILE]                              structural checks of cert-manager and
                                                     Prometheus Operator objects; with
                                                     CORE_FILE, ServiceMonitors against the
                                                     Services and admin addresses there

Every check prints one line, "ok    ..." or "FAIL  ..." (with the reason); the counts
are appended to $CHECK_COUNTS_FILE as "passed failed skipped" when it is set. The exit
status is 1 when anything failed.
"""

from __future__ import annotations

import copy
import os
import re
import sys
from pathlib import Path

import yaml

# What the binaries listen on by default (services/*/src/main.rs), by component.
EXPECTED_PORTS = {
    "control": {"http": 8080, "grpc": 50051, "admin": 9090},
    "edge": {"public": 8000, "agents": 8001, "admin": 9090, "internal": 8002},
    "redis": {"redis": 6379},
}
# The address variables that move those listeners, and the port each must keep.
ADDR_VARS = {
    "control": {"NETBORE_REST_ADDR": 8080, "NETBORE_GRPC_ADDR": 50051, "NETBORE_ADMIN_ADDR": 9090},
    "edge": {"NETBORE_PUBLIC_ADDR": 8000, "NETBORE_AGENT_ADDR": 8001, "NETBORE_ADMIN_ADDR": 9090,
             "NETBORE_INTERNAL_ADDR": 8002},
}
EDGE_DRAIN_DEFAULT = 30  # DEFAULT_DRAIN_GRACE in services/edge/src/config.rs
INTERNAL_PORT = 8002  # --internal-addr default (0.0.0.0:8002) in services/edge/src/main.rs
MIN_INTERNAL_SECRET_LEN = 16  # MIN_INTERNAL_SECRET_LEN in services/edge/src/main.rs
# Edge ports that must stay open to every source under a NetworkPolicy (viewers, agents).
EDGE_PUBLIC_PORTS = {"public": 8000, "agents": 8001}
CONTROL_DRAIN = 10  # DRAIN_GRACE in services/control/src/main.rs
AGENT_DRAIN = 30  # DEFAULT_DRAIN_GRACE of the agent
CRD_KINDS = {"Certificate", "ServiceMonitor"}
# Trace export (crates/telemetry check_endpoint): OTLP/gRPC over plain http:// only.
OTLP_ENDPOINT_VARS = ("OTEL_EXPORTER_OTLP_ENDPOINT", "OTEL_EXPORTER_OTLP_TRACES_ENDPOINT")
OTLP_ENDPOINT_RE = re.compile(r"^http://[^/\s]+")
CLUSTER_SCOPED = {"Namespace", "ClusterRole", "ClusterRoleBinding", "CustomResourceDefinition"}


class Checker:
    def __init__(self) -> None:
        self.passed = 0
        self.failed = 0
        self.skipped = 0

    def check(self, ok: bool, what: str, why: str = "") -> bool:
        if ok:
            self.passed += 1
            print(f"ok    {what}")
        else:
            self.failed += 1
            print(f"FAIL  {what}" + (f": {why}" if why else ""))
        return ok

    def skip(self, what: str, why: str) -> None:
        self.skipped += 1
        print(f"skip  {what}: {why}")

    def finish(self) -> int:
        f = os.environ.get("CHECK_COUNTS_FILE")
        if f:
            with open(f, "a") as fh:
                fh.write(f"{self.passed} {self.failed} {self.skipped}\n")
        return 1 if self.failed else 0


def load_docs(path: str | Path) -> list[dict]:
    with open(path) as fh:
        return [d for d in yaml.safe_load_all(fh) if isinstance(d, dict) and d.get("kind")]


def name_of(d: dict) -> str:
    return f"{d['kind']}/{d.get('metadata', {}).get('name', '?')}"


def pod_spec(d: dict) -> dict | None:
    if d["kind"] in ("Deployment", "StatefulSet", "DaemonSet", "ReplicaSet", "Job"):
        return d.get("spec", {}).get("template", {}).get("spec")
    return None


def pod_labels(d: dict) -> dict:
    return d.get("spec", {}).get("template", {}).get("metadata", {}).get("labels", {}) or {}


def component(d: dict) -> str:
    return pod_labels(d).get("app.kubernetes.io/component", "") or d.get("metadata", {}).get("labels", {}).get(
        "app.kubernetes.io/component", ""
    )


def sidecars(spec: dict) -> list[dict]:
    return [c for c in spec.get("initContainers", []) or [] if c.get("restartPolicy") == "Always"]


def selects(selector: dict, labels: dict) -> bool:
    """matchLabels / matchExpressions semantics (an empty selector matches nothing here)."""
    if not selector:
        return False
    ml = selector.get("matchLabels", {}) or {}
    if any(labels.get(k) != v for k, v in ml.items()):
        return False
    for e in selector.get("matchExpressions", []) or []:
        k, op, vals = e["key"], e["operator"], e.get("values", [])
        if op == "In" and labels.get(k) not in vals:
            return False
        if op == "NotIn" and labels.get(k) in vals:
            return False
        if op == "Exists" and k not in labels:
            return False
        if op == "DoesNotExist" and k in labels:
            return False
    return bool(ml or selector.get("matchExpressions"))


def port_of(container: dict, ref) -> int | None:
    """The container port a probe or Service targetPort refers to (name or number)."""
    for p in container.get("ports", []) or []:
        if ref == p.get("name") or ref == p.get("containerPort"):
            return p["containerPort"]
    return None


def probe_port(probe: dict):
    for k in ("httpGet", "tcpSocket", "grpc"):
        if k in probe:
            return probe[k].get("port")
    return None


def config_values(docs: list[dict], container: dict) -> dict:
    """The environment a container gets from env values and the ConfigMaps it loads."""
    cms = {d["metadata"]["name"]: d.get("data", {}) or {} for d in docs if d["kind"] == "ConfigMap"}
    env: dict = {}
    for ef in container.get("envFrom", []) or []:
        ref = ef.get("configMapRef")
        if ref and ref.get("name") in cms:
            env.update(cms[ref["name"]])
    for e in container.get("env", []) or []:
        env[e["name"]] = e.get("value", "<from " + ",".join(e.get("valueFrom", {}).keys()) + ">")
    return env


def config_known(docs: list[dict], container: dict) -> bool:
    """True when every ConfigMap the container loads is in the set (not generated elsewhere)."""
    cms = {d["metadata"]["name"] for d in docs if d["kind"] == "ConfigMap"}
    return all(ef["configMapRef"]["name"] in cms for ef in container.get("envFrom", []) or [] if "configMapRef" in ef)


def effective(container: dict, spec: dict, key: str):
    c = (container.get("securityContext") or {}).get(key)
    return c if c is not None else (spec.get("securityContext") or {}).get(key)


# --------------------------------------------------------------------------------------
# invariants


def check_container(ck: Checker, where: str, c: dict, spec: dict, sidecar: bool, env: dict) -> None:
    w = f"{where} container {c['name']}"
    ck.check("readinessProbe" in c and "livenessProbe" in c, f"{w}: readiness and liveness probes",
             "missing " + ", ".join(p for p in ("readinessProbe", "livenessProbe") if p not in c))
    if sidecar:
        ck.check("startupProbe" in c, f"{w}: native sidecar has a startupProbe")
    for pk in ("startupProbe", "readinessProbe", "livenessProbe"):
        if pk in c and "exec" not in c[pk]:
            ref = probe_port(c[pk])
            ck.check(port_of(c, ref) is not None, f"{w}: {pk} port {ref!r} is a declared container port")
    res = c.get("resources") or {}
    req, lim = res.get("requests") or {}, res.get("limits") or {}
    ck.check("cpu" in req and "memory" in req and "memory" in lim, f"{w}: resources (cpu/memory requests, memory limit)",
             f"requests={req} limits={lim}")
    sc = c.get("securityContext") or {}
    problems = []
    if effective(c, spec, "runAsNonRoot") is not True:
        problems.append("runAsNonRoot")
    uid = effective(c, spec, "runAsUser")
    if uid is not None and uid == 0:
        problems.append("runAsUser 0")
    if sc.get("readOnlyRootFilesystem") is not True:
        problems.append("readOnlyRootFilesystem")
    if sc.get("allowPrivilegeEscalation") is not False:
        problems.append("allowPrivilegeEscalation")
    if sc.get("privileged"):
        problems.append("privileged")
    if "ALL" not in ((sc.get("capabilities") or {}).get("drop") or []):
        problems.append("capabilities.drop ALL")
    if (sc.get("capabilities") or {}).get("add"):
        problems.append("capabilities.add")
    seccomp = (effective(c, spec, "seccompProfile") or {}).get("type")
    if seccomp not in ("RuntimeDefault", "Localhost"):
        problems.append("seccompProfile RuntimeDefault")
    ck.check(not problems, f"{w}: restrictive securityContext", "missing/bad: " + ", ".join(problems))
    image = c.get("image", "")
    ck.check(("@sha256:" in image) or (re.search(r":[^/:]+$", image) is not None and not image.endswith(":latest")),
             f"{w}: image {image!r} is pinned to a tag or digest")
    vols = {v["name"] for v in spec.get("volumes", []) or []}
    for m in c.get("volumeMounts", []) or []:
        ck.check(m["name"] in vols, f"{w}: volumeMount {m['name']} names a pod volume")
    # Trace export: an https:// collector URL or another protocol stops the binary at start.
    for var in OTLP_ENDPOINT_VARS:
        v = env.get(var)
        if v is not None and not str(v).startswith("<from "):
            ck.check(OTLP_ENDPOINT_RE.match(str(v)) is not None,
                     f"{w}: {var}={v} is a plain http:// collector URL (OTLP/gRPC without TLS)",
                     "https:// or a non-URL stops the process at start (crates/telemetry)")
    if "OTEL_EXPORTER_OTLP_PROTOCOL" in env:
        ck.check(env["OTEL_EXPORTER_OTLP_PROTOCOL"] == "grpc", f"{w}: OTEL_EXPORTER_OTLP_PROTOCOL is grpc (the only one built in)",
                 f"{env['OTEL_EXPORTER_OTLP_PROTOCOL']!r}")
    # $(VAR) in command/args is expanded only from the container's own environment.
    defined = {e["name"] for e in c.get("env", []) or []} | set(env)
    for a in (c.get("command") or []) + (c.get("args") or []):
        for var in re.findall(r"\$\(([A-Za-z_][A-Za-z0-9_]*)\)", str(a)):
            ck.check(var in defined, f"{w}: $({var}) in args is defined in env")


def check_workload(ck: Checker, docs: list[dict], d: dict, external_secrets: set[str]) -> None:
    where = name_of(d)
    spec = pod_spec(d)
    labels = pod_labels(d)
    sel = d["spec"].get("selector", {})
    ck.check(selects(sel, labels), f"{where}: selector matches its own pod template labels", f"{sel} vs {labels}")
    ck.check(spec.get("automountServiceAccountToken") is False, f"{where}: no service account token mounted")
    psc = spec.get("securityContext") or {}
    ck.check(psc.get("runAsNonRoot") is True and (psc.get("seccompProfile") or {}).get("type") == "RuntimeDefault",
             f"{where}: pod securityContext runAsNonRoot + seccomp RuntimeDefault")
    sa = spec.get("serviceAccountName")
    if sa and sa != "default":
        ck.check(any(x["kind"] == "ServiceAccount" and x["metadata"]["name"] == sa for x in docs) or sa in external_secrets,
                 f"{where}: ServiceAccount {sa} exists")
    # A StatefulSet's volumeClaimTemplates are pod volumes too (one claim per pod).
    claims = [{"name": t["metadata"]["name"]} for t in d["spec"].get("volumeClaimTemplates", []) or []]
    mountable = dict(spec, volumes=(spec.get("volumes") or []) + claims)
    for c in spec.get("containers", []):
        check_container(ck, where, c, mountable, False, config_values(docs, c))
    for c in sidecars(spec):
        check_container(ck, where, c, mountable, True, config_values(docs, c))
    for c in spec.get("initContainers", []) or []:
        if c.get("restartPolicy") != "Always":
            ck.check((c.get("securityContext") or {}).get("allowPrivilegeEscalation") is False,
                     f"{where} init container {c['name']}: restrictive securityContext")

    # References to ConfigMaps and Secrets must resolve (or be optional / external).
    have = {(x["kind"], x["metadata"]["name"]) for x in docs}
    refs = []
    for c in spec.get("containers", []) + (spec.get("initContainers", []) or []):
        for ef in c.get("envFrom", []) or []:
            for kind, key in (("ConfigMap", "configMapRef"), ("Secret", "secretRef")):
                if key in ef:
                    refs.append((kind, ef[key]["name"], ef[key].get("optional", False)))
        for e in c.get("env", []) or []:
            vf = e.get("valueFrom") or {}
            for kind, key in (("ConfigMap", "configMapKeyRef"), ("Secret", "secretKeyRef")):
                if key in vf:
                    refs.append((kind, vf[key]["name"], vf[key].get("optional", False)))
    for v in spec.get("volumes", []) or []:
        if "secret" in v:
            refs.append(("Secret", v["secret"]["secretName"], v["secret"].get("optional", False)))
        if "configMap" in v:
            refs.append(("ConfigMap", v["configMap"]["name"], v["configMap"].get("optional", False)))
        if "persistentVolumeClaim" in v:
            refs.append(("PersistentVolumeClaim", v["persistentVolumeClaim"]["claimName"], False))
    for kind, n, optional in refs:
        if optional:
            ck.check(True, f"{where}: {kind} {n} is optional")
        elif n in external_secrets:
            ck.check(True, f"{where}: {kind} {n} is supplied by the operator (external)")
        else:
            ck.check((kind, n) in have, f"{where}: referenced {kind} {n} exists")

    comp = component(d)
    main = spec["containers"][0]
    env = config_values(docs, main)
    if comp in EXPECTED_PORTS:
        declared = {p.get("name"): p["containerPort"] for p in main.get("ports", [])}
        ck.check(declared == EXPECTED_PORTS[comp], f"{where}: container ports are the binary's defaults {EXPECTED_PORTS[comp]}",
                 f"declared {declared}")
    for var, port in ADDR_VARS.get(comp, {}).items():
        if var in env:
            ck.check(str(env[var]).endswith(f":{port}"), f"{where}: {var}={env[var]} listens on the declared port {port}")
    ann = d["spec"].get("template", {}).get("metadata", {}).get("annotations", {}) or {}
    if ann.get("prometheus.io/scrape") == "true":
        aport = ann.get("prometheus.io/port")
        every = spec.get("containers", []) + sidecars(spec)
        ck.check(aport is not None and any(port_of(c, int(aport)) is not None for c in every)
                 and ann.get("prometheus.io/path", "/metrics") == "/metrics",
                 f"{where}: prometheus.io/port {aport} (path {ann.get('prometheus.io/path', '/metrics')}) is a declared port serving /metrics")
        if comp in ("control", "edge"):
            addr = env.get("NETBORE_ADMIN_ADDR")
            if addr is not None:
                ck.check(str(addr).rsplit(":", 1)[-1] == str(aport),
                         f"{where}: prometheus.io/port {aport} is the NETBORE_ADMIN_ADDR port ({addr})")
        for sc in sidecars(spec):  # a pod whose only metrics are the agent's
            addr = config_values(docs, sc).get("NETBORE_ADMIN_ADDR")
            if addr is not None and not any(port_of(c, int(aport)) for c in spec.get("containers", [])):
                ck.check(str(addr).rsplit(":", 1)[-1] == str(aport),
                         f"{where}: prometheus.io/port {aport} is the agent's NETBORE_ADMIN_ADDR port ({addr})")
    if comp == "edge":
        check_edge(ck, docs, d, spec, main, env)
        check_edge_cluster(ck, docs, d, main, env, config_known(docs, main), external_secrets)
    if comp == "control":
        check_control(ck, docs, d, spec, main, env, config_known(docs, main))
    for sc in sidecars(spec):
        check_agent_sidecar(ck, where, spec, sc, config_values(docs, sc))


def prestop_sleep(c: dict) -> int:
    return int(((c.get("lifecycle") or {}).get("preStop") or {}).get("sleep", {}).get("seconds", 0))


def check_edge(ck: Checker, docs, d, spec, main, env) -> None:
    where = name_of(d)
    ck.check(d["kind"] == "StatefulSet", f"{where}: edges run as a StatefulSet (per-pod DNS)")
    drain = int(env.get("NETBORE_DRAIN_GRACE_SECS", EDGE_DRAIN_DEFAULT))
    delay = int(env.get("NETBORE_DRAIN_DELAY_SECS", 0))
    grace = int(spec.get("terminationGracePeriodSeconds", 30))
    sleep = prestop_sleep(main)
    ck.check(grace > sleep + delay + drain,
             f"{where}: terminationGracePeriodSeconds {grace} > preStop {sleep} + drain delay {delay} + drain grace {drain}")
    ck.check(sleep + delay >= 5, f"{where}: load balancers get >= 5 s to stop routing (preStop {sleep} + drain delay {delay})")
    probes = {k: (main.get(k) or {}).get("httpGet", {}) for k in ("readinessProbe", "livenessProbe")}
    ck.check(probes["readinessProbe"].get("path") == "/readyz" and port_of(main, probes["readinessProbe"].get("port")) == 9090,
             f"{where}: readiness is GET /readyz on the admin port 9090")
    ck.check(probes["livenessProbe"].get("path") == "/livez" and port_of(main, probes["livenessProbe"].get("port")) == 9090,
             f"{where}: liveness is GET /livez on the admin port 9090")
    args = main.get("args", []) or []
    ck.check("--edge-id=$(POD_NAME)" in args, f"{where}: edge id is the pod name")
    adv = [a.split("=", 1)[1] for a in args if a.startswith("--advertise-url=")]
    pod_env = {e["name"]: (e.get("valueFrom") or {}).get("fieldRef", {}).get("fieldPath") for e in main.get("env", []) or []}
    ck.check(pod_env.get("POD_NAME") == "metadata.name", f"{where}: POD_NAME comes from the downward API")
    if ck.check(len(adv) == 1, f"{where}: exactly one --advertise-url"):
        url = adv[0]
        ck.check(url.endswith("/v1/connect") and re.match(r"^wss?://", url) is not None,
                 f"{where}: advertise URL {url} is a ws(s):// URL ending in /v1/connect")
        if "$(POD_NAME)" in url:
            svc = d["spec"].get("serviceName")
            ck.check(url.startswith(f"ws://$(POD_NAME).{svc}.") and ":8001/" in url,
                     f"{where}: per-pod advertise URL uses the headless Service {svc} and agent port 8001")
    svc = d["spec"].get("serviceName")
    headless = [s for s in docs if s["kind"] == "Service" and s["metadata"]["name"] == svc]
    if ck.check(bool(headless), f"{where}: serviceName {svc} is a Service in the set"):
        h = headless[0]["spec"]
        ck.check(h.get("clusterIP") == "None" and selects({"matchLabels": h.get("selector", {})}, pod_labels(d)),
                 f"{where}: {svc} is headless and selects the edge pods")
    check_edge_credential(ck, docs, d, main)
    if "NETBORE_TLS_CERT" in env:
        mounts = [m["mountPath"] for m in main.get("volumeMounts", []) or []]
        ck.check(any(env["NETBORE_TLS_CERT"].startswith(m.rstrip("/") + "/") for m in mounts),
                 f"{where}: NETBORE_TLS_CERT {env['NETBORE_TLS_CERT']} is on a mounted volume")
        ck.check(not any(m.get("subPath") for m in main.get("volumeMounts", []) or []),
                 f"{where}: certificate mounted without subPath (renewals reach the pod)")


def check_edge_credential(ck: Checker, docs, d, main) -> None:
    """Edges authenticate to control's gRPC link with a token from a Secret; control
    holds only its SHA-256, bound to a pattern that covers these edge pods' names."""
    import hashlib

    where = name_of(d)
    entries = env_entries(main, "NETBORE_EDGE_TOKEN")
    refs = [(e.get("valueFrom") or {}).get("secretKeyRef") for e in entries]
    ok = len(entries) == 1 and "value" not in entries[0] and bool(refs[0])
    ck.check(ok, f"{where}: NETBORE_EDGE_TOKEN comes from a Secret (secretKeyRef), not a literal",
             f"env entries {entries}" if entries else "not set (control refuses the edge's link and never offers it to agents)")
    ck.check("NETBORE_EDGE_TOKEN" not in loaded_configmap_keys(docs, main),
             f"{where}: NETBORE_EDGE_TOKEN is not in a ConfigMap")
    args = (main.get("command") or []) + (main.get("args") or [])
    ck.check(not any("edge-token" in str(a) and not str(a).startswith("--control-token-file") for a in args),
             f"{where}: no edge token on the command line")
    controls = [w for w in docs if pod_spec(w) is not None and component(w) == "control"]
    if not controls:
        ck.skip(f"{where}: control accepts this edge's credential", "no control workload in this set")
        return
    cmain = pod_spec(controls[0])["containers"][0]
    cenv = config_values(docs, cmain)
    creds = [e.get("value") for e in env_entries(cmain, "NETBORE_EDGE_CREDENTIALS") if "value" in e]
    creds += [cenv["NETBORE_EDGE_CREDENTIALS"]] if "NETBORE_EDGE_CREDENTIALS" in cenv and not creds else []
    if not config_known(docs, cmain) and not creds:
        ck.skip(f"{where}: control accepts this edge's credential", "control's ConfigMap is generated elsewhere")
        return
    if not ck.check(len(creds) == 1, f"{where}: control is given the edges' credential digest (NETBORE_EDGE_CREDENTIALS)",
                    "not set: control refuses every edge link"):
        return
    entries = [c for c in str(creds[0]).split(";") if c.strip()]
    pod_prefix = f"{name_of(d).split('/')[-1]}-"
    covering = []
    for c in entries:
        pattern, _, digest = c.strip().partition("=")
        if pattern == "*" or (pattern.endswith("*") and pod_prefix.startswith(pattern[:-1])) or pattern == pod_prefix + "0":
            covering.append(digest)
    ck.check(bool(covering), f"{where}: control's edge credential pattern covers the pod names {pod_prefix}N",
             f"patterns {[c.partition('=')[0] for c in entries]}")
    ck.check(all(c.startswith("sha256:") for c in covering),
             f"{where}: control holds only the token's SHA-256 (sha256:HEX), never the token")
    if ok and covering:
        ref = refs[0]
        token = secret_value(docs, ref.get("name"), ref.get("key"))
        if token is None:
            ck.skip(f"{where}: the edge token's digest matches control's", f"Secret {ref.get('name')} is not in this set")
        elif "REPLACE" in token:
            ck.check(any("REPLACE" in c for c in covering),
                     f"{where}: placeholder edge token pairs with a placeholder digest control refuses at start")
        else:
            digest = "sha256:" + hashlib.sha256(token.encode()).hexdigest()
            ck.check(digest in covering, f"{where}: the edge token's SHA-256 is the digest control accepts",
                     "the edges would be refused")


def env_entries(c: dict, name: str) -> list[dict]:
    return [e for e in c.get("env", []) or [] if e.get("name") == name]


def loaded_configmap_keys(docs: list[dict], c: dict) -> set[str]:
    cms = {d["metadata"]["name"]: d.get("data", {}) or {} for d in docs if d["kind"] == "ConfigMap"}
    keys: set[str] = set()
    for ef in c.get("envFrom", []) or []:
        ref = ef.get("configMapRef")
        if ref and ref.get("name") in cms:
            keys |= set(cms[ref["name"]])
    return keys


def secret_value(docs: list[dict], name: str, key: str) -> str | None:
    """The value of key in the Secret name when the set holds it (None: no such key)."""
    import base64

    for d in docs:
        if d["kind"] == "Secret" and d["metadata"]["name"] == name:
            if key in (d.get("stringData") or {}):
                return str(d["stringData"][key])
            if key in (d.get("data") or {}):
                return base64.b64decode(d["data"][key]).decode(errors="replace")
    return None


def np_selects(selector: dict | None, labels: dict) -> bool:
    """NetworkPolicy podSelector semantics: an empty selector selects every pod."""
    if not (selector or {}).get("matchLabels") and not (selector or {}).get("matchExpressions"):
        return True
    return selects(selector, labels)


def rule_ports(rule: dict, container: dict) -> set[int] | None:
    """Container ports a NetworkPolicy rule admits (None: every port)."""
    ports = rule.get("ports") or []
    if not ports:
        return None
    out: set[int] = set()
    for p in ports:
        ref = p.get("port")
        if ref is None:
            return None
        if isinstance(ref, str):
            n = port_of(container, ref)
            if n is not None:
                out.add(n)
        else:
            out |= set(range(int(ref), int(p.get("endPort", ref)) + 1))
    return out


def check_edge_cluster(ck: Checker, docs, d, main, env, known: bool, external: set[str]) -> None:
    """Edges that share a Redis registry forward to each other's internal listener."""
    where = name_of(d)
    if "NETBORE_REDIS_URL" not in env:
        if known:
            ck.skip(f"{where}: scale-out settings", "no NETBORE_REDIS_URL: a standalone edge")
            return
        # The ConfigMap is generated elsewhere: hold the pod spec to the clustered rules.
    # The shared secret: exactly one env entry, from a Secret; never a literal, a
    # ConfigMap value or a command-line argument.
    entries = env_entries(main, "NETBORE_INTERNAL_SECRET")
    refs = [(e.get("valueFrom") or {}).get("secretKeyRef") for e in entries]
    ok = len(entries) == 1 and "value" not in entries[0] and bool(refs[0])
    ck.check(ok, f"{where}: NETBORE_INTERNAL_SECRET comes from a Secret (secretKeyRef), not a literal",
             f"env entries {entries}" if entries else "not set (the edge refuses to start with NETBORE_REDIS_URL and no secret)")
    ck.check("NETBORE_INTERNAL_SECRET" not in loaded_configmap_keys(docs, main),
             f"{where}: NETBORE_INTERNAL_SECRET is not in a ConfigMap")
    args = (main.get("command") or []) + (main.get("args") or [])
    ck.check(not any(str(a).startswith("--internal-secret") for a in args),
             f"{where}: no --internal-secret on the command line (visible in the pod spec and ps)")
    if ok:
        ref = refs[0]
        if ref.get("name") in external:
            ck.check(True, f"{where}: internal secret {ref.get('name')}/{ref.get('key')} is supplied by the operator (external)")
        else:
            v = secret_value(docs, ref.get("name"), ref.get("key"))
            if ck.check(v is not None, f"{where}: Secret {ref.get('name')} has the key {ref.get('key')!r}"):
                ck.check(len(v) >= MIN_INTERNAL_SECRET_LEN or "REPLACE" in v,
                         f"{where}: internal secret has >= {MIN_INTERNAL_SECRET_LEN} characters (or is a marked placeholder the edge refuses)",
                         f"{len(v)} characters")
    # The internal listener: declared as "internal" on the binary's default port, and
    # NETBORE_INTERNAL_ADDR (when set) on that port.
    declared = port_of(main, "internal")
    ck.check(declared == INTERNAL_PORT, f"{where}: containerPort 'internal' is {INTERNAL_PORT} (--internal-addr default)",
             f"declared {declared}")
    addr = env.get("NETBORE_INTERNAL_ADDR", f"0.0.0.0:{INTERNAL_PORT}")
    ck.check(str(addr).rsplit(":", 1)[-1] == str(declared),
             f"{where}: NETBORE_INTERNAL_ADDR {addr} listens on the declared internal port {declared}")
    # The advertised address: set (the edge listens on 0.0.0.0), on the internal port, and
    # every $(VAR) in it defined earlier in env (Kubernetes expands only those).
    adv = env_entries(main, "NETBORE_INTERNAL_ADVERTISE")
    adv_args = [str(a).split("=", 1)[1] for a in args if str(a).startswith("--internal-advertise=")]
    values = [e.get("value") for e in adv if "value" in e] + adv_args
    if ck.check(len(values) == 1, f"{where}: NETBORE_INTERNAL_ADVERTISE is set once (required when listening on 0.0.0.0)",
                f"found {adv + adv_args}"):
        value = str(values[0])
        host, _, port = value.rpartition(":")
        ck.check(port == str(INTERNAL_PORT) and port == str(declared),
                 f"{where}: internal advertise {value} names the internal port {INTERNAL_PORT}")
        ck.check(host not in ("", "0.0.0.0", "[::]", "::", "localhost", "127.0.0.1"),
                 f"{where}: internal advertise {value} names an address other pods can reach")
        names = [e.get("name") for e in main.get("env", []) or []]
        pos = names.index("NETBORE_INTERNAL_ADVERTISE") if adv else len(names)
        for var in re.findall(r"\$\(([A-Za-z_][A-Za-z0-9_]*)\)", value):
            ck.check(var in names[:pos], f"{where}: $({var}) in the internal advertise address is defined before it in env",
                     f"env order {names}")
        if "$(POD_IP)" in value:
            pod_ip = env_entries(main, "POD_IP")
            ck.check(len(pod_ip) == 1 and ((pod_ip[0].get("valueFrom") or {}).get("fieldRef") or {}).get("fieldPath") == "status.podIP",
                     f"{where}: POD_IP comes from the downward API (status.podIP)")
    # The NetworkPolicy: the internal port admits edge pods of this namespace only, and
    # the policy does not cut viewers, agents or probes off.
    labels = pod_labels(d)
    others = [w for w in docs if pod_spec(w) is not None and w is not d]
    pols = [n for n in docs if n["kind"] == "NetworkPolicy" and np_selects((n.get("spec") or {}).get("podSelector"), labels)
            and "Ingress" in ((n.get("spec") or {}).get("policyTypes") or ["Ingress"])]
    if not ck.check(bool(pols), f"{where}: a NetworkPolicy selects the edge pods for ingress (internal port {INTERNAL_PORT})"):
        return
    rules = [r for n in pols for r in (n["spec"].get("ingress") or [])]
    admits_internal, leaks = [], []
    for r in rules:
        ports = rule_ports(r, main)
        if ports is not None and declared not in ports:
            continue
        peers = r.get("from") or []
        if not peers:
            leaks.append("a rule without 'from' (every source)")
            continue
        for peer in peers:
            ps = peer.get("podSelector")
            if "ipBlock" in peer or "namespaceSelector" in peer or ps is None:
                leaks.append(f"peer {peer}")
            elif not np_selects(ps, labels):
                leaks.append(f"peer {peer} does not select the edge pods")
            elif any(np_selects(ps, pod_labels(w)) for w in others):
                leaks.append(f"peer {peer} also selects {[name_of(w) for w in others if np_selects(ps, pod_labels(w))]}")
            else:
                admits_internal.append(peer)
    ck.check(bool(admits_internal), f"{where}: the NetworkPolicy admits edge pods to the internal port {declared}")
    ck.check(not leaks, f"{where}: only edge pods may reach the internal port {declared}", "; ".join(leaks))
    for pname, pnum in EDGE_PUBLIC_PORTS.items():
        open_all = any(not r.get("from") and (rule_ports(r, main) is None or pnum in rule_ports(r, main)) for r in rules)
        ck.check(open_all, f"{where}: the NetworkPolicy leaves port {pnum} ({pname}) open to every source")
    admin = port_of(main, "admin")
    ck.check(any(rule_ports(r, main) is None or admin in rule_ports(r, main) for r in rules),
             f"{where}: the NetworkPolicy admits the admin port {admin} (probes, /metrics)")


def check_control(ck: Checker, docs, d, spec, main, env, known: bool) -> None:
    where = name_of(d)
    # The database: a URL (which may carry a password) only from a Secret, and a shared
    # one (PostgreSQL) for more than one replica: SQLite files are one replica's each.
    entries = env_entries(main, "NETBORE_DATABASE_URL")
    ck.check("NETBORE_DATABASE_URL" not in loaded_configmap_keys(docs, main),
             f"{where}: NETBORE_DATABASE_URL is not in a ConfigMap (it may carry a password; use a Secret)")
    refs = [(e.get("valueFrom") or {}).get("secretKeyRef") for e in entries]
    shared = len(entries) == 1 and bool(refs[0])
    literal = [e.get("value") for e in entries if "value" in e]
    ck.check(all(str(v).startswith("sqlite:") for v in literal),
             f"{where}: NETBORE_DATABASE_URL as a literal is only an SQLite path (a server URL comes from a Secret)", f"{literal}")
    replicas = d["spec"].get("replicas", 1)
    ck.check(int(replicas) <= 1 or shared,
             f"{where}: {replicas} replicas share one database (NETBORE_DATABASE_URL from a Secret, PostgreSQL)",
             f"env entries {entries}" if entries else "not set: each replica would keep its own SQLite file and hand out the same names")
    grace = int(spec.get("terminationGracePeriodSeconds", 30))
    sleep = prestop_sleep(main)
    ck.check(grace > sleep + CONTROL_DRAIN, f"{where}: terminationGracePeriodSeconds {grace} > preStop {sleep} + drain {CONTROL_DRAIN}")
    rp = (main.get("readinessProbe") or {}).get("httpGet", {})
    ck.check(rp.get("path") == "/readyz" and port_of(main, rp.get("port")) == 8080, f"{where}: readiness is GET /readyz on 8080")
    # The admin listener (/metrics, /livez) exists only with NETBORE_ADMIN_ADDR, which
    # must listen on the containerPort "admin" that scrapes and probes go to.
    admin = port_of(main, "admin")
    if not known and "NETBORE_ADMIN_ADDR" not in env:
        ck.skip(f"{where}: NETBORE_ADMIN_ADDR", "its ConfigMap is generated by kustomize, not in this set")
    elif ck.check("NETBORE_ADMIN_ADDR" in env, f"{where}: NETBORE_ADMIN_ADDR is set (control serves /metrics only then)"):
        addr = str(env["NETBORE_ADMIN_ADDR"])
        ck.check(admin is not None and addr.rsplit(":", 1)[-1] == str(admin),
                 f"{where}: NETBORE_ADMIN_ADDR {addr} listens on the containerPort 'admin' ({admin})")
        ck.check(addr.startswith("0.0.0.0:") or addr.startswith("[::]:"),
                 f"{where}: NETBORE_ADMIN_ADDR {addr} is reachable by the kubelet and scrapers (not loopback)")
    for pk in ("startupProbe", "readinessProbe", "livenessProbe"):
        hg = (main.get(pk) or {}).get("httpGet") or {}
        if hg.get("path") in ("/livez", "/metrics"):
            ck.check(admin is not None and port_of(main, hg.get("port")) == admin,
                     f"{where}: {pk} GET {hg.get('path')} goes to the admin port {admin} (only it serves {hg.get('path')})")
    mounts = [m["mountPath"].rstrip("/") + "/" for m in main.get("volumeMounts", []) or []]
    for var in ("NETBORE_SIGNING_KEYS", "NETBORE_BOOTSTRAP_TOKEN_FILE"):
        if not known and var not in env:
            ck.skip(f"{where}: {var}", "its ConfigMap is generated by kustomize, not in this set")
            continue
        if ck.check(var in env, f"{where}: {var} is set"):
            for path in str(env[var]).split(","):
                ck.check(any(path.startswith(m) for m in mounts), f"{where}: {var} file {path} is on a mounted volume")


def check_agent_sidecar(ck: Checker, where: str, spec: dict, sc: dict, env: dict) -> None:
    w = f"{where} sidecar {sc['name']}"
    args = sc.get("args", []) or []
    if not ck.check(len(args) >= 2 and args[0] == "http", f"{w}: runs `netbore http TARGET`"):
        return
    target = args[1]
    m = re.search(r"(\d+)/?$", target.split("://")[-1].split("/")[0])
    port = int(m.group(1)) if m else None
    app_ports = {p["containerPort"] for c in spec["containers"] for p in c.get("ports", []) or []}
    ck.check(port in app_ports, f"{w}: forwards to port {port}, which an app container declares", f"app ports {sorted(app_ports)}")
    admin = env.get("NETBORE_ADMIN_ADDR") or next((a.split("=", 1)[1] for a in args if a.startswith("--admin-addr=")), None)
    if ck.check(admin is not None, f"{w}: serves probes (--admin-addr / NETBORE_ADMIN_ADDR)"):
        aport = int(str(admin).rsplit(":", 1)[1])
        ck.check(port_of(sc, aport) == aport, f"{w}: admin port {aport} is declared")
        ck.check(str(admin).startswith("0.0.0.0:") or str(admin).startswith("[::]:"),
                 f"{w}: admin address {admin} is reachable by the kubelet (not loopback)")
    ck.check("NETBORE_CONTROL_URL" in env or any(a.startswith("--control") for a in args), f"{w}: control URL is set")
    state = env.get("NETBORE_STATE_DIR")
    mounts = [m["mountPath"] for m in sc.get("volumeMounts", []) or []]
    ck.check(state in mounts, f"{w}: state directory {state} is a writable volume (read-only root filesystem)")
    grace = int(spec.get("terminationGracePeriodSeconds", 30))
    ck.check(grace > AGENT_DRAIN, f"{w}: pod grace period {grace} s covers the agent's {AGENT_DRAIN} s drain")


def check_service(ck: Checker, docs, s: dict) -> None:
    where = name_of(s)
    sel = s["spec"].get("selector") or {}
    targets = [w for w in docs if pod_spec(w) is not None and selects({"matchLabels": sel}, pod_labels(w))]
    if not ck.check(bool(targets), f"{where}: selector matches a workload's pods", f"selector {sel}"):
        return
    for p in s["spec"].get("ports", []):
        tp = p.get("targetPort", p["port"])
        ok = all(any(port_of(c, tp) for c in pod_spec(w)["containers"]) for w in targets)
        ck.check(ok, f"{where}: port {p.get('name', p['port'])} targets container port {tp!r}")


def check_pdb(ck: Checker, docs, p: dict) -> None:
    where = name_of(p)
    targets = [w for w in docs if pod_spec(w) is not None and selects(p["spec"].get("selector"), pod_labels(w))]
    ck.check(len(targets) == 1, f"{where}: selector matches exactly one workload's pods", f"matches {[name_of(t) for t in targets]}")
    ck.check("maxUnavailable" in p["spec"], f"{where}: uses maxUnavailable (never blocks node drains at 1 replica)")


def check_hpa(ck: Checker, docs, h: dict) -> None:
    where = name_of(h)
    ref = h["spec"]["scaleTargetRef"]
    targets = [w for w in docs if w["kind"] == ref["kind"] and w["metadata"]["name"] == ref["name"]]
    if not ck.check(len(targets) == 1 and ref.get("apiVersion") == "apps/v1", f"{where}: scaleTargetRef {ref['kind']}/{ref['name']} exists"):
        return
    t = targets[0]
    ck.check("replicas" not in t["spec"], f"{where}: {name_of(t)} leaves replicas to the HPA (apply does not reset the scale)")
    ck.check(h["spec"].get("minReplicas", 1) >= 2, f"{where}: minReplicas >= 2")
    sd = ((h["spec"].get("behavior") or {}).get("scaleDown") or {})
    ck.check(sd.get("stabilizationWindowSeconds", 300) >= 600, f"{where}: scale-down stabilization >= 600 s")
    uses_cpu = any((m.get("resource") or {}).get("name") == "cpu" for m in h["spec"].get("metrics", []))
    if uses_cpu:
        ck.check(all("cpu" in ((c.get("resources") or {}).get("requests") or {}) for c in pod_spec(t)["containers"]),
                 f"{where}: CPU utilisation target has CPU requests to measure against")


def invariants(label: str, path: str, external: set[str], expect_pdbs: bool) -> Checker:
    ck = Checker()
    docs = load_docs(path)
    ck.check(bool(docs), f"[{label}] {path} has manifests")
    print(f"--- [{label}] {len(docs)} objects")
    return check_docs(ck, label, docs, external, expect_pdbs)


def check_docs(ck: Checker, label: str, docs: list[dict], external: set[str], expect_pdbs: bool) -> Checker:
    for d in docs:
        ck.check(bool(d.get("metadata", {}).get("labels", {}).get("app.kubernetes.io/name")),
                 f"[{label}] {name_of(d)}: has app.kubernetes.io/name")
    workloads = [d for d in docs if pod_spec(d) is not None]
    for d in workloads:
        _prefix(ck, label, lambda: check_workload(ck, docs, d, external))
    for s in (d for d in docs if d["kind"] == "Service"):
        _prefix(ck, label, lambda: check_service(ck, docs, s))
    for p in (d for d in docs if d["kind"] == "PodDisruptionBudget"):
        _prefix(ck, label, lambda: check_pdb(ck, docs, p))
    for h in (d for d in docs if d["kind"] == "HorizontalPodAutoscaler"):
        _prefix(ck, label, lambda: check_hpa(ck, docs, h))
    if expect_pdbs:
        for w in workloads:
            if component(w) in ("control", "edge"):
                ck.check(any(selects(p["spec"].get("selector"), pod_labels(w)) for p in docs if p["kind"] == "PodDisruptionBudget"),
                         f"[{label}] {name_of(w)}: covered by a PodDisruptionBudget")
    ns = {d.get("metadata", {}).get("namespace") for d in docs if d["kind"] not in CLUSTER_SCOPED}
    if ns != {None}:
        ck.check(len(ns) == 1 and None not in ns, f"[{label}] all namespaced objects share one namespace", f"{ns}")
    return ck


class QuietChecker(Checker):
    """Collects failures without printing (for the broken-manifest tests)."""

    def __init__(self) -> None:
        super().__init__()
        self.failures: list[str] = []

    def check(self, ok: bool, what: str, why: str = "") -> bool:
        if ok:
            self.passed += 1
        else:
            self.failed += 1
            self.failures.append(what + (f": {why}" if why else ""))
        return ok

    def skip(self, what: str, why: str) -> None:
        self.skipped += 1


def _edge(docs: list[dict]) -> tuple[dict, dict]:
    d = next(x for x in docs if pod_spec(x) is not None and component(x) == "edge")
    return d, pod_spec(d)["containers"][0]


def _env(c: dict, name: str) -> dict:
    return next(e for e in c["env"] if e["name"] == name)


def _drop_env(c: dict, name: str) -> None:
    c["env"] = [e for e in c["env"] if e["name"] != name]


def _edge_policies(docs: list[dict]) -> list[dict]:
    d, _ = _edge(docs)
    return [n for n in docs if n["kind"] == "NetworkPolicy" and np_selects(n["spec"].get("podSelector"), pod_labels(d))]


def _internal_rule(docs: list[dict]) -> dict:
    d, c = _edge(docs)
    return next(r for n in _edge_policies(docs) for r in n["spec"]["ingress"]
                if r.get("from") and INTERNAL_PORT in (rule_ports(r, c) or set()))


def _m_secret_literal(docs):
    e = _env(_edge(docs)[1], "NETBORE_INTERNAL_SECRET")
    e.pop("valueFrom")
    e["value"] = "0123456789abcdef0123456789abcdef"


def _m_secret_configmap(docs):
    d, c = _edge(docs)
    name = c["envFrom"][0]["configMapRef"]["name"]
    cm = next((x for x in docs if x["kind"] == "ConfigMap" and x["metadata"]["name"] == name), None)
    if cm is None:  # generated elsewhere (no kustomize): nothing to break here
        return False
    # The secretKeyRef stays; a copy in the ConfigMap is a leak all the same.
    cm.setdefault("data", {})["NETBORE_INTERNAL_SECRET"] = "0123456789abcdef0123456789abcdef"
    return True


def _m_secret_missing_key(docs):
    ref = _env(_edge(docs)[1], "NETBORE_INTERNAL_SECRET")["valueFrom"]["secretKeyRef"]
    if any(x["kind"] == "Secret" and x["metadata"]["name"] == ref["name"] for x in docs):
        ref["key"] = "no-such-key"
    else:  # the operator's Secret: point at one nobody creates
        ref["name"] = "no-such-secret"


def _m_port(docs):
    c = _edge(docs)[1]
    next(p for p in c["ports"] if p["name"] == "internal")["containerPort"] = 8003


def _m_addr(docs):
    c = _edge(docs)[1]
    c["env"].append({"name": "NETBORE_INTERNAL_ADDR", "value": "0.0.0.0:8003"})


def _m_pod_ip_after(docs):
    c = _edge(docs)[1]
    pod_ip = _env(c, "POD_IP")
    _drop_env(c, "POD_IP")
    c["env"].append(pod_ip)


def _m_no_policy(docs):
    for n in _edge_policies(docs):
        docs.remove(n)


def _m_open_internal(docs):
    _internal_rule(docs).pop("from")


def _m_all_netbore_pods(docs):
    peer = _internal_rule(docs)["from"][0]["podSelector"]["matchLabels"]
    peer.pop("app.kubernetes.io/component")


def _m_other_namespaces(docs):
    _internal_rule(docs)["from"][0]["namespaceSelector"] = {}


def _m_viewers_cut_off(docs):
    d, c = _edge(docs)
    for n in _edge_policies(docs):
        for r in n["spec"]["ingress"]:
            if not r.get("from"):
                r["ports"] = [p for p in r.get("ports") or [] if p.get("port") not in ("public", 8000)]


def _control(docs: list[dict]) -> tuple[dict, dict]:
    d = next(x for x in docs if pod_spec(x) is not None and component(x) == "control")
    return d, pod_spec(d)["containers"][0]


def _m_control_database_literal(docs):
    c = _control(docs)[1]
    _drop_env(c, "NETBORE_DATABASE_URL")
    c.setdefault("env", []).append({"name": "NETBORE_DATABASE_URL", "value": "postgres://netbore:pw@db:5432/netbore"})


def _m_control_database_missing(docs):
    d, c = _control(docs)
    _drop_env(c, "NETBORE_DATABASE_URL")
    d["spec"]["replicas"] = 2


def _m_control_admin_addr(docs):
    _control(docs)[1].setdefault("env", []).append({"name": "NETBORE_ADMIN_ADDR", "value": "0.0.0.0:9091"})


def _m_control_admin_port(docs):
    c = _control(docs)[1]
    next(p for p in c["ports"] if p["name"] == "admin")["containerPort"] = 9091


def _m_control_no_admin(docs):
    c = _control(docs)[1]
    names = {ef["configMapRef"]["name"] for ef in c.get("envFrom", []) or [] if "configMapRef" in ef}
    cms = [x for x in docs if x["kind"] == "ConfigMap" and x["metadata"]["name"] in names]
    if not cms:  # generated elsewhere (no kustomize): nothing to break here
        return False
    for cm in cms:
        (cm.get("data") or {}).pop("NETBORE_ADMIN_ADDR", None)
    return True


def _m_otel_https(docs):
    _edge(docs)[1].setdefault("env", []).append({"name": "OTEL_EXPORTER_OTLP_ENDPOINT", "value": "https://otel-collector:4317"})


# name: (mutation, text the failure must contain)
BROKEN = {
    "control's database URL as a literal": (_m_control_database_literal, "NETBORE_DATABASE_URL as a literal"),
    "two control replicas without a shared database": (_m_control_database_missing, "replicas share one database"),
    "NETBORE_INTERNAL_SECRET as a literal value": (_m_secret_literal, "NETBORE_INTERNAL_SECRET comes from a Secret"),
    "NETBORE_INTERNAL_SECRET missing": (lambda docs: _drop_env(_edge(docs)[1], "NETBORE_INTERNAL_SECRET"),
                                        "NETBORE_INTERNAL_SECRET comes from a Secret"),
    "NETBORE_INTERNAL_SECRET in the ConfigMap": (_m_secret_configmap, "NETBORE_INTERNAL_SECRET is not in a ConfigMap"),
    "internal secret from a key or Secret that does not exist": (_m_secret_missing_key, "Secret"),
    "NETBORE_INTERNAL_ADVERTISE missing": (lambda docs: _drop_env(_edge(docs)[1], "NETBORE_INTERNAL_ADVERTISE"),
                                           "NETBORE_INTERNAL_ADVERTISE is set once"),
    "internal advertise on another port": (lambda docs: _env(_edge(docs)[1], "NETBORE_INTERNAL_ADVERTISE").update(value="$(POD_IP):9002"),
                                           "names the internal port"),
    "internal advertise 0.0.0.0": (lambda docs: _env(_edge(docs)[1], "NETBORE_INTERNAL_ADVERTISE").update(value="0.0.0.0:8002"),
                                   "other pods can reach"),
    "POD_IP defined after the advertise address": (_m_pod_ip_after, "defined before it in env"),
    "internal containerPort 8003": (_m_port, "containerPort 'internal' is 8002"),
    "NETBORE_INTERNAL_ADDR on port 8003": (_m_addr, "NETBORE_INTERNAL_ADDR"),
    "no NetworkPolicy for the edges": (_m_no_policy, "a NetworkPolicy selects the edge pods"),
    "NetworkPolicy opens 8002 to every source": (_m_open_internal, "only edge pods may reach the internal port"),
    "NetworkPolicy admits every netbore pod to 8002": (_m_all_netbore_pods, "only edge pods may reach the internal port"),
    "NetworkPolicy admits edge-labelled pods of any namespace": (_m_other_namespaces, "only edge pods may reach the internal port"),
    "NetworkPolicy cuts viewers off (no port 8000)": (_m_viewers_cut_off, "open to every source"),
    "control NETBORE_ADMIN_ADDR on port 9091": (_m_control_admin_addr, "NETBORE_ADMIN_ADDR"),
    "control admin containerPort 9091": (_m_control_admin_port, "9091"),  # the only thing it changes
    "control without NETBORE_ADMIN_ADDR": (_m_control_no_admin, "NETBORE_ADMIN_ADDR is set"),
    "OTEL_EXPORTER_OTLP_ENDPOINT over https://": (_m_otel_https, "plain http:// collector URL"),
}


def broken(label: str, path: str, external: set[str], expect_pdbs: bool) -> Checker:
    """Each mutation of a good manifest set must make the invariants fail, for the reason given."""
    ck = Checker()
    docs = load_docs(path)
    base = QuietChecker()
    check_docs(base, label, copy.deepcopy(docs), external, expect_pdbs)
    if not ck.check(base.failed == 0, f"[{label}] broken-manifest tests start from a set that passes", "; ".join(base.failures)):
        return ck
    for what, (mutate, expect) in BROKEN.items():
        mutated = copy.deepcopy(docs)
        try:
            if mutate(mutated) is False:
                ck.skip(f"[{label}] broken: {what}", "does not apply to this set")
                continue
        except (StopIteration, KeyError, IndexError) as e:
            ck.check(False, f"[{label}] broken: {what}: the mutation applies", repr(e))
            continue
        q = QuietChecker()
        check_docs(q, label, mutated, external, expect_pdbs)
        hit = [f for f in q.failures if expect in f]
        ck.check(bool(hit), f"[{label}] broken: {what} -> fails" + (f" ({hit[0][:110]})" if hit else ""),
                 "not caught; failures: " + ("; ".join(q.failures) or "none"))
    return ck


def _prefix(ck: Checker, label: str, fn) -> None:
    orig = ck.check

    def labelled(ok, what, why=""):
        return orig(ok, f"[{label}] {what}", why)

    ck.check = labelled  # type: ignore[method-assign]
    try:
        fn()
    finally:
        ck.check = orig  # type: ignore[method-assign]


# --------------------------------------------------------------------------------------
# helm


def deep_merge(base: dict, over: dict) -> dict:
    out = copy.deepcopy(base)
    for k, v in over.items():
        out[k] = deep_merge(out[k], v) if isinstance(v, dict) and isinstance(out.get(k), dict) else v
    return out


PEM = "-----BEGIN PRIVATE KEY-----\nMC4CAQAwBQYDK2VwBCIEIB2c0iR1x9yN0Zq4wq2a1V7P9yQ1c6Q2bqJ1m0b3Q0Zx\n-----END PRIVATE KEY-----\n"

SCENARIOS: dict[str, tuple[dict, set[str]]] = {
    # name: (values, Secrets the operator creates)
    "default": ({}, set()),
    "production": ({
        "domain": "t.example.org",
        "imagePullSecrets": [{"name": "regcred"}],
        "secrets": {"existingSecret": "netbore-creds",
                    "existingSecretKeys": {"bootstrapToken": "boot", "signingKeys": ["k2.pem", "k1.pem"]}},
        "control": {"replicaCount": 2, "requireToken": True, "staticEdges": ["id=e1,url=wss://e1.t.example.org/v1/connect,region=eu"],
                    "image": {"digest": "sha256:" + "a" * 64},
                    "ingress": {"enabled": True, "className": "nginx", "host": "control.t.example.org",
                                "tls": {"enabled": True, "secretName": ""}},
                    "nodeSelector": {"kubernetes.io/os": "linux"},
                    "tolerations": [{"key": "dedicated", "operator": "Equal", "value": "netbore", "effect": "NoSchedule"}]},
        "edge": {"region": "eu", "trustedProxies": ["10.0.0.0/8"], "maxBodyBytes": 104857600,
                 "tls": {"enabled": True, "certManager": {"enabled": True}},
                 "service": {"publicPort": 443, "loadBalancerSourceRanges": ["0.0.0.0/0"]},
                 "extraEnv": [{"name": "RUST_BACKTRACE", "value": "1"}],
                 "registryRefreshSeconds": 3,
                 "internalSecret": {"existingSecret": "netbore-edge-internal-ext", "key": "secret"}},
        "redis": {"enabled": False, "urlSecret": {"name": "netbore-redis-url", "key": "url"}},
        "database": {"existingSecret": "netbore-db"},
        "serviceMonitor": {"enabled": True, "labels": {"release": "prometheus"}},
        "otel": {"endpoint": "http://otel-collector.observability:4317"},
    }, {"netbore-creds", "netbore-redis-url", "regcred", "netbore-edge-internal-ext", "netbore-db"}),
    "single-node": ({
        "control": {"replicaCount": 1, "preStopSleepSeconds": 0},
        "edge": {"autoscaling": {"enabled": False}, "replicaCount": 2, "preStopSleepSeconds": 0, "drainDelaySeconds": 10,
                 "advertiseUrl": "ws://edge.tunnels.example.com:8001/v1/connect"},
        "secrets": {"bootstrapToken": "a-real-secret-from-a-vault", "signingKeys": [PEM, PEM]},
        "redis": {"persistence": {"enabled": True}},
        "serviceAccount": {"create": False},
    }, set()),
}

# Values the schema or the templates must refuse, with the reason.
REFUSED = {
    "unknown top-level key": {"bogus": 1},
    "unknown nested key (typo)": {"edge": {"autoscalling": {"enabled": False}}},
    "grace period shorter than preStop + drain": {"edge": {"terminationGracePeriodSeconds": 30}},
    "grace period shorter than preStop + delay + drain": {"edge": {"drainDelaySeconds": 10}},
    "external Redis without a URL": {"redis": {"enabled": False}},
    "domain that is not a DNS name": {"domain": "Not A Domain"},
    "port out of range": {"edge": {"service": {"publicPort": 70000}}},
    "bad pull policy": {"control": {"image": {"pullPolicy": "Sometimes"}}},
    "maxReplicas below minReplicas": {"edge": {"autoscaling": {"minReplicas": 5, "maxReplicas": 3}}},
    "advertise URL that is not ws(s)": {"edge": {"advertiseUrl": "http://edge:8001/v1/connect"}},
    "registry refresh of 0 s": {"edge": {"registryRefreshSeconds": 0}},
    "internal secret key that is not a Secret key": {"edge": {"internalSecret": {"key": "a key"}}},
    "unknown key under edge.internalSecret (a literal value)": {"edge": {"internalSecret": {"value": "a-literal-in-values"}}},
    "a literal NETBORE_INTERNAL_SECRET in edge.extraEnv": {"edge": {"extraEnv": [{"name": "NETBORE_INTERNAL_SECRET",
                                                                               "value": "0123456789abcdef0123"}]}},
    "edge.networkPolicy.enabled that is not a boolean": {"edge": {"networkPolicy": {"enabled": "yes"}}},
    "an https:// OTLP endpoint (no TLS to the collector)": {"otel": {"endpoint": "https://otel-collector:4317"}},
    "an OTLP endpoint that is not a URL": {"otel": {"endpoint": "otel-collector:4317"}},
    "an https:// OTEL_EXPORTER_OTLP_ENDPOINT in control.extraEnv": {"control": {"extraEnv": [
        {"name": "OTEL_EXPORTER_OTLP_ENDPOINT", "value": "https://otel-collector:4317"}]}},
}


def helm_render(chart: str, outdir: str) -> Checker:
    ck = Checker()
    try:
        import helm_python as helm  # type: ignore
    except ImportError as e:  # the shell installs it; reaching this is a failure
        ck.check(False, "helm-python-sdk is importable", str(e))
        return ck
    print(f"--- helm SDK {helm.helm_sdk_version()} (helm-python-sdk, libhelm_c {helm.helm_c_version()})")
    out = Path(outdir)
    out.mkdir(parents=True, exist_ok=True)
    for kube in ("v1.29.0", "v1.32.0"):
        r = helm.lint(chart, strict=True, kube_version=kube)
        bad = [m for m in r["messages"] if m["severity"] >= 2] + [{"error": e} for e in r["errors"]]
        ck.check(not bad, f"helm lint --strict (kube {kube})", "; ".join(m["error"] for m in bad))
    with helm.Chart.load(chart) as c:
        defaults = c.values
        for name, (vals, external) in SCENARIOS.items():
            try:
                c.validate_schema(deep_merge(defaults, vals))
                ck.check(True, f"helm values [{name}] pass values.schema.json")
            except Exception as e:  # noqa: BLE001
                ck.check(False, f"helm values [{name}] pass values.schema.json", str(e))
                continue
            try:
                rendered = c.render(vals, name="netbore", namespace="netbore", is_install=True)
            except Exception as e:  # noqa: BLE001
                ck.check(False, f"helm template [{name}] renders", str(e))
                continue
            ck.check(True, f"helm template [{name}] renders ({len(rendered)} templates)")
            core, crds = [], []
            for path, text in sorted(rendered.items()):
                if path.endswith("NOTES.txt"):
                    ck.check("grpcurl -plaintext" in text and " list" in text, f"helm NOTES [{name}] include the grpcurl smoke command")
                    continue
                for d in yaml.safe_load_all(text):
                    if isinstance(d, dict) and d.get("kind"):
                        (crds if d["kind"] in CRD_KINDS else core).append(d)
            for d in core:  # helm install puts everything in the release namespace
                if d["kind"] not in CLUSTER_SCOPED:
                    d.setdefault("metadata", {}).setdefault("namespace", "netbore")
            with open(out / f"{name}.yaml", "w") as fh:
                yaml.safe_dump_all(core, fh, sort_keys=False)
            with open(out / f"{name}.crds.yaml", "w") as fh:
                yaml.safe_dump_all(crds, fh, sort_keys=False)
            # Secrets that cert-manager creates from a Certificate are not in the chart.
            external = external | {d["spec"]["secretName"] for d in crds if d["kind"] == "Certificate"}
            with open(out / f"{name}.external", "w") as fh:
                fh.write("\n".join(sorted(external)))
            check_helm_annotations(ck, name, core, vals)
        # Pods must roll when configuration changes: the checksum annotation follows it.
        a = c.render({}, name="netbore", namespace="netbore")
        b = c.render({"domain": "other.example.org", "edge": {"drainGraceSeconds": 20}}, name="netbore", namespace="netbore")
        for tpl, kind in (("control-deployment.yaml", "Deployment"), ("edge-statefulset.yaml", "StatefulSet")):
            ca = _checksum(a, tpl)
            cb = _checksum(b, tpl)
            ck.check(ca is not None and cb is not None and ca != cb, f"helm {kind}: checksum/config changes with the configuration")
        for what, vals in REFUSED.items():
            refused, why = False, ""
            try:
                c.validate_schema(deep_merge(defaults, vals))
            except Exception as e:  # noqa: BLE001
                refused, why = True, str(e).splitlines()[-1].strip()
            if not refused:
                try:
                    c.render(vals, name="netbore", namespace="netbore")
                except Exception as e:  # noqa: BLE001
                    refused, why = True, str(e).splitlines()[-1].strip()
            ck.check(refused, f"helm refuses {what}" + (f" ({why[:90]})" if why else ""))
    return ck


def _checksum(rendered: dict, tpl: str):
    for path, text in rendered.items():
        if path.endswith("/" + tpl):
            d = yaml.safe_load(text)
            return d["spec"]["template"]["metadata"].get("annotations", {}).get("checksum/config")
    return None


def check_helm_annotations(ck: Checker, name: str, docs: list[dict], vals: dict) -> None:
    for d in docs:
        if d["kind"] in ("Deployment", "StatefulSet") and component(d) in ("control", "edge"):
            ann = d["spec"]["template"]["metadata"].get("annotations", {}) or {}
            ck.check("checksum/config" in ann, f"helm [{name}] {name_of(d)}: checksum/config annotation (rolls on config change)")
            # otel.endpoint reaches control and the edges as OTEL_EXPORTER_OTLP_ENDPOINT, or nothing.
            ep = (vals.get("otel") or {}).get("endpoint") or None
            got = config_values(docs, pod_spec(d)["containers"][0]).get("OTEL_EXPORTER_OTLP_ENDPOINT")
            ck.check(got == ep, f"helm [{name}] {name_of(d)}: OTEL_EXPORTER_OTLP_ENDPOINT is otel.endpoint ({ep or 'unset'})", f"got {got!r}")
            if component(d) == "control" and not (vals.get("secrets") or {}).get("existingSecret"):
                ck.check("checksum/secret" in ann, f"helm [{name}] {name_of(d)}: checksum/secret annotation")
            if component(d) == "edge" and not ((vals.get("edge") or {}).get("internalSecret") or {}).get("existingSecret"):
                # Hashed from the very value in the Secret (computed once per render), so
                # the first upgrade, which reads the Secret back, does not roll the edges.
                import hashlib

                ref = (_env(pod_spec(d)["containers"][0], "NETBORE_INTERNAL_SECRET").get("valueFrom") or {}).get("secretKeyRef") or {}
                v = secret_value(docs, ref.get("name", ""), ref.get("key", ""))
                want = hashlib.sha256(v.encode()).hexdigest() if v is not None else None
                ck.check(want is not None and ann.get("checksum/internal-secret") == want,
                         f"helm [{name}] {name_of(d)}: checksum/internal-secret is the hash of the generated internal secret",
                         f"annotation {ann.get('checksum/internal-secret')}, secret {want}")


# --------------------------------------------------------------------------------------
# CRD objects kubernetes-validate has no schema for


def crds(path: str) -> Checker:
    ck = Checker()
    docs = load_docs(path)
    if not docs:
        ck.check(True, f"{path}: no custom resources to check")
    for d in docs:
        w = name_of(d)
        if d["kind"] == "Certificate":
            s = d.get("spec", {})
            ck.check(d.get("apiVersion") == "cert-manager.io/v1", f"{w}: apiVersion cert-manager.io/v1")
            ck.check(bool(s.get("secretName")) and bool(s.get("dnsNames")) and bool((s.get("issuerRef") or {}).get("name")),
                     f"{w}: secretName, dnsNames and issuerRef set")
            ck.check(any(n.startswith("*.") for n in s.get("dnsNames", [])), f"{w}: includes the wildcard name")
        elif d["kind"] == "ServiceMonitor":
            s = d.get("spec", {})
            ck.check(d.get("apiVersion") == "monitoring.coreos.com/v1", f"{w}: apiVersion monitoring.coreos.com/v1")
            eps = s.get("endpoints") or []
            ck.check(bool(eps) and all(e.get("port") == "admin" and e.get("path") == "/metrics" for e in eps),
                     f"{w}: scrapes /metrics on the admin port")
            ck.check(bool((s.get("selector") or {}).get("matchLabels")), f"{w}: has a selector")
    return ck


def crds_against(ck: Checker, crd_path: str, core_path: str) -> None:
    core = load_docs(core_path)
    crd_docs = load_docs(crd_path)
    check_crds_against(ck, crd_docs, core)
    # The other way round: a ServiceMonitor whose Service leads to a port other than the
    # admin listener's, or a control nobody scrapes, must fail.
    if not any(d["kind"] == "ServiceMonitor" for d in crd_docs):
        return
    for what, mutate in (("control's metrics Service targets the REST port", _m_sm_target),
                         ("no ServiceMonitor for control", _m_sm_no_control)):
        c2, k2 = copy.deepcopy(crd_docs), copy.deepcopy(core)
        mutate(c2, k2)
        q = QuietChecker()
        check_crds_against(q, c2, k2)
        ck.check(q.failed > 0, f"broken: {what} -> fails" + (f" ({q.failures[0][:100]})" if q.failures else ""), "not caught")


def _m_sm_target(crd_docs, core):
    svc = next(s for s in core if s["kind"] == "Service" and (s["metadata"].get("labels") or {}).get("netbore.dev/service") == "control-metrics")
    next(p for p in svc["spec"]["ports"] if p["name"] == "admin")["targetPort"] = "http"


def _m_sm_no_control(crd_docs, core):
    crd_docs[:] = [d for d in crd_docs if not (d["kind"] == "ServiceMonitor" and component(d) == "control")]


def check_crds_against(ck: Checker, crd_docs: list[dict], core: list[dict]) -> None:
    """A ServiceMonitor must select a Service that exposes the port it scrapes."""
    scraped: set[str] = set()
    for d in crd_docs:
        if d["kind"] == "ServiceMonitor":
            sel = d["spec"]["selector"]
            svcs = [s for s in core if s["kind"] == "Service" and selects(sel, s["metadata"].get("labels", {}))]
            if not ck.check(len(svcs) == 1 and any(p.get("name") == "admin" for p in svcs[0]["spec"]["ports"]),
                            f"{name_of(d)}: selects one Service with an 'admin' port", f"selects {[name_of(s) for s in svcs]}"):
                continue
            # The Service's admin port must lead to the port the binary's admin listener is on.
            sp = next(p for p in svcs[0]["spec"]["ports"] if p.get("name") == "admin")
            pods = [w for w in core if pod_spec(w) and selects({"matchLabels": svcs[0]["spec"].get("selector", {})}, pod_labels(w))]
            for w in pods:
                main = pod_spec(w)["containers"][0]
                target = port_of(main, sp.get("targetPort", sp["port"]))
                addr = config_values(core, main).get("NETBORE_ADMIN_ADDR")
                ck.check(target is not None and addr is not None and str(addr).rsplit(":", 1)[-1] == str(target),
                         f"{name_of(d)}: scrapes {name_of(w)} on port {target}, where NETBORE_ADMIN_ADDR ({addr}) listens")
            scraped.update(name_of(w) for w in pods)
        if d["kind"] == "Certificate":
            secret = d["spec"]["secretName"]
            used = any(v.get("secret", {}).get("secretName") == secret
                       for w in core if pod_spec(w) for v in pod_spec(w).get("volumes", []) or [])
            ck.check(used, f"{name_of(d)}: its Secret {secret} is mounted by the edges")
    if any(d["kind"] == "ServiceMonitor" for d in crd_docs):
        for w in core:
            if pod_spec(w) and component(w) in ("control", "edge"):
                ck.check(name_of(w) in scraped, f"ServiceMonitors scrape {name_of(w)} (component {component(w)})")


# --------------------------------------------------------------------------------------
# Dockerfiles

DOCKERFILES = {
    "Dockerfile.control": ("netbore-control", {8080, 50051}),
    "Dockerfile.edge": ("netbore-edge", {8000, 8001, 8002, 9090}),
    "Dockerfile.agent": ("netbore", {9091}),
}


def dockerfiles(d: str) -> Checker:
    ck = Checker()
    for f, (binary, ports) in DOCKERFILES.items():
        p = Path(d) / f
        if not ck.check(p.exists(), f"{p} exists"):
            continue
        text = p.read_text()
        stages = re.split(r"(?m)^FROM\s", text)
        final = stages[-1]
        ck.check(len(stages) >= 3, f"{f}: multi-stage build")
        ck.check(f"cargo build --release --locked --bin {binary}" in text, f"{f}: cargo build --release --locked --bin {binary}")
        ck.check("--mount=type=cache" in text, f"{f}: cargo caches in BuildKit cache mounts")
        user = re.findall(r"(?m)^USER\s+(\S+)", final)
        ck.check(bool(user) and re.fullmatch(r"[1-9][0-9]*(:[0-9]+)?", user[-1]) is not None,
                 f"{f}: runtime USER is numeric and not root", f"USER {user}")
        exposed = {int(x) for line in re.findall(r"(?m)^EXPOSE\s+(.+)$", final) for x in re.findall(r"\d+", line)}
        ck.check(exposed == ports, f"{f}: EXPOSE {sorted(ports)}", f"EXPOSE {sorted(exposed)}")
        ck.check(re.search(r'(?m)^ENTRYPOINT\s+\["/', final) is not None, f"{f}: exec-form ENTRYPOINT (no shell at runtime)")
        ck.check(re.search(r"(?m)^RUN\s", final) is None, f"{f}: runtime stage runs nothing at build time (no shell needed)")
        ign = Path(d) / f"{f}.dockerignore"
        ck.check(ign.exists() and "target/" in ign.read_text(), f"{f}.dockerignore keeps target/ out of the build context")
    return ck


# Keys whose values are Kubernetes objects passed through as they are: their inner keys
# are Kubernetes' own and documented there.
PASSTHROUGH = {"resources", "podSecurityContext", "containerSecurityContext"}


def values_comments(path: str) -> Checker:
    """Every chart value in values.yaml has a comment line directly above it."""
    ck = Checker()
    lines = Path(path).read_text().splitlines()
    stack: list[tuple[int, str]] = []  # (indent, key) of the enclosing keys
    missing = []
    keys = 0
    for i, line in enumerate(lines):
        m = re.match(r"^( *)([A-Za-z][A-Za-z0-9]*):", line)
        if not m:
            continue
        indent, key = len(m.group(1)), m.group(2)
        while stack and stack[-1][0] >= indent:
            stack.pop()
        inside_passthrough = any(k in PASSTHROUGH for _, k in stack)
        stack.append((indent, key))
        if inside_passthrough:
            continue
        keys += 1
        if i == 0 or not lines[i - 1].strip().startswith("#"):
            missing.append(f"line {i + 1}: {'.'.join(k for _, k in stack)}")
    ck.check(not missing and keys > 0, f"{path}: all {keys} keys have a comment directly above them",
             "uncommented: " + ", ".join(missing))
    return ck


def main(argv: list[str]) -> int:
    if len(argv) < 2:
        print(__doc__)
        return 2
    cmd = argv[1]
    if cmd == "invariants":
        label, path = argv[2], argv[3]
        external: set[str] = set()
        rest = argv[4:]
        expect_pdbs = True
        while rest:
            if rest[0] == "--external" and len(rest) > 1:
                external |= {x for x in rest[1].split(",") if x}
                rest = rest[2:]
            elif rest[0] == "--no-pdb":
                expect_pdbs = False
                rest = rest[1:]
            else:
                print(f"unknown argument {rest[0]}")
                return 2
        return invariants(label, path, external, expect_pdbs).finish()
    if cmd == "broken":
        label, path = argv[2], argv[3]
        external = set()
        if len(argv) > 5 and argv[4] == "--external":
            external = {x for x in argv[5].split(",") if x}
        return broken(label, path, external, True).finish()
    if cmd == "helm-render":
        return helm_render(argv[2], argv[3]).finish()
    if cmd == "crds":
        ck = crds(argv[2])
        if len(argv) > 3:
            crds_against(ck, argv[2], argv[3])
        return ck.finish()
    if cmd == "values-comments":
        return values_comments(argv[2]).finish()
    if cmd == "dockerfiles":
        return dockerfiles(argv[2]).finish()
    print(__doc__)
    return 2


if __name__ == "__main__":
    sys.exit(main(sys.argv))
