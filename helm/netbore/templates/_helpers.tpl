{{/* Chart name, overridable. */}}
{{- define "netbore.name" -}}
{{- default .Chart.Name .Values.nameOverride | trunc 63 | trimSuffix "-" -}}
{{- end -}}

{{/* "<release>-<chart>", or the release name when it already contains the chart name. */}}
{{- define "netbore.fullname" -}}
{{- if .Values.fullnameOverride -}}
{{- .Values.fullnameOverride | trunc 63 | trimSuffix "-" -}}
{{- else -}}
{{- $name := default .Chart.Name .Values.nameOverride -}}
{{- if contains $name .Release.Name -}}
{{- .Release.Name | trunc 63 | trimSuffix "-" -}}
{{- else -}}
{{- printf "%s-%s" .Release.Name $name | trunc 63 | trimSuffix "-" -}}
{{- end -}}
{{- end -}}
{{- end -}}

{{/* Per-component names. The headless name is kept short: pod DNS names are
     <pod>.<service>.<namespace>.svc.cluster.local. */}}
{{- define "netbore.controlName" -}}{{ include "netbore.fullname" . | trunc 55 | trimSuffix "-" }}-control{{- end -}}
{{- define "netbore.edgeName" -}}{{ include "netbore.fullname" . | trunc 58 | trimSuffix "-" }}-edge{{- end -}}
{{- define "netbore.edgeHeadlessName" -}}{{ include "netbore.fullname" . | trunc 49 | trimSuffix "-" }}-edge-headless{{- end -}}
{{- define "netbore.controlMetricsName" -}}{{ include "netbore.fullname" . | trunc 47 | trimSuffix "-" }}-control-metrics{{- end -}}
{{- define "netbore.redisName" -}}{{ include "netbore.fullname" . | trunc 57 | trimSuffix "-" }}-redis{{- end -}}
{{- define "netbore.controlConfigName" -}}{{ include "netbore.controlName" . }}-config{{- end -}}
{{- define "netbore.edgeConfigName" -}}{{ include "netbore.edgeName" . }}-config{{- end -}}

{{- define "netbore.chart" -}}
{{- printf "%s-%s" .Chart.Name .Chart.Version | replace "+" "_" | trunc 63 | trimSuffix "-" -}}
{{- end -}}

{{/* Labels every resource carries. Call with (dict "ctx" $ "component" "edge"). */}}
{{- define "netbore.labels" -}}
helm.sh/chart: {{ include "netbore.chart" .ctx }}
{{ include "netbore.selectorLabels" . }}
app.kubernetes.io/version: {{ .ctx.Chart.AppVersion | quote }}
app.kubernetes.io/managed-by: {{ .ctx.Release.Service }}
app.kubernetes.io/part-of: netbore
{{- with .ctx.Values.commonLabels }}
{{ toYaml . }}
{{- end }}
{{- end -}}

{{/* Labels that select a component's pods. Never change them after a release exists:
     selectors are immutable. */}}
{{- define "netbore.selectorLabels" -}}
app.kubernetes.io/name: {{ include "netbore.name" .ctx }}
app.kubernetes.io/instance: {{ .ctx.Release.Name }}
app.kubernetes.io/component: {{ .component }}
{{- end -}}

{{- define "netbore.serviceAccountName" -}}
{{- if .Values.serviceAccount.create -}}
{{- default (include "netbore.fullname" .) .Values.serviceAccount.name -}}
{{- else -}}
{{- default "default" .Values.serviceAccount.name -}}
{{- end -}}
{{- end -}}

{{/* repository@digest, or repository:tag (tag defaults to appVersion). */}}
{{- define "netbore.image" -}}
{{- $img := .image -}}
{{- if $img.digest -}}
{{- printf "%s@%s" $img.repository $img.digest -}}
{{- else -}}
{{- printf "%s:%s" $img.repository (default .ctx.Chart.AppVersion $img.tag) -}}
{{- end -}}
{{- end -}}

{{- define "netbore.secretName" -}}
{{- default (printf "%s-secrets" (include "netbore.fullname" .)) .Values.secrets.existingSecret -}}
{{- end -}}

{{/* The Secret with the edges' shared internal credential (NETBORE_INTERNAL_SECRET). */}}
{{- define "netbore.edgeInternalSecretName" -}}
{{- default (printf "%s-internal" (include "netbore.edgeName" .)) .Values.edge.internalSecret.existingSecret -}}
{{- end -}}

{{/* The chart-generated internal credential: the value already in the cluster (lookup)
     or 48 random characters, computed once per render and shared by the Secret and the
     edges' checksum annotation, so they agree and an upgrade rolls nothing. */}}
{{- define "netbore.edgeInternalSecretValue" -}}
{{- $s := .Values.edge.internalSecret -}}
{{- if not (hasKey $s "generated") -}}
{{- $existing := (lookup "v1" "Secret" .Release.Namespace (include "netbore.edgeInternalSecretName" .)).data | default dict -}}
{{- $_ := set $s "generated" ((get $existing $s.key | b64dec) | default (randAlphaNum 48)) -}}
{{- end -}}
{{- get $s "generated" -}}
{{- end -}}

{{/* The Secret with the edges' credential for control's link (NETBORE_EDGE_TOKEN). */}}
{{- define "netbore.edgeControlTokenSecretName" -}}
{{- default (printf "%s-control-token" (include "netbore.edgeName" .)) .Values.edge.controlToken.existingSecret -}}
{{- end -}}

{{/* The chart-generated edge token: the value already in the cluster (lookup) or 48
     random characters, computed once per render (the Secret and control's digest agree). */}}
{{- define "netbore.edgeControlTokenValue" -}}
{{- $s := .Values.edge.controlToken -}}
{{- if not (hasKey $s "generated") -}}
{{- $existing := (lookup "v1" "Secret" .Release.Namespace (include "netbore.edgeControlTokenSecretName" .)).data | default dict -}}
{{- $_ := set $s "generated" ((get $existing $s.key | b64dec) | default (randAlphaNum 48)) -}}
{{- end -}}
{{- get $s "generated" -}}
{{- end -}}

{{/* What control accepts (NETBORE_EDGE_CREDENTIALS): the edge token's SHA-256, bound to
     this release's edge pod names. */}}
{{- define "netbore.edgeCredentials" -}}
{{- $s := .Values.edge.controlToken -}}
{{- $digest := ternary $s.sha256 (include "netbore.edgeControlTokenValue" . | sha256sum) (ne $s.existingSecret "") -}}
{{- printf "%s-*=sha256:%s" (include "netbore.edgeName" .) $digest -}}
{{- end -}}

{{- define "netbore.edgeTlsSecretName" -}}
{{- default (printf "%s-tls" (include "netbore.edgeName" .)) .Values.edge.tls.secretName -}}
{{- end -}}

{{/* Where control finds its credentials. */}}
{{- define "netbore.secretsDir" -}}/etc/netbore/secrets{{- end -}}

{{/* Keys of the Secret that hold signing keys, signing key first. */}}
{{- define "netbore.signingKeyKeys" -}}
{{- if .Values.secrets.existingSecret -}}
{{- join "," .Values.secrets.existingSecretKeys.signingKeys -}}
{{- else -}}
{{- $keys := list -}}
{{- range $i, $_ := (default (list "generated") .Values.secrets.signingKeys) -}}
{{- $keys = append $keys (printf "signing-key-%d.pem" $i) -}}
{{- end -}}
{{- join "," $keys -}}
{{- end -}}
{{- end -}}

{{- define "netbore.bootstrapKey" -}}
{{- if .Values.secrets.existingSecret -}}
{{- .Values.secrets.existingSecretKeys.bootstrapToken -}}
{{- else -}}
bootstrap-token
{{- end -}}
{{- end -}}

{{/* NETBORE_SIGNING_KEYS: comma-separated file paths, signing key first. */}}
{{- define "netbore.signingKeyPaths" -}}
{{- $dir := include "netbore.secretsDir" . -}}
{{- $paths := list -}}
{{- range (splitList "," (include "netbore.signingKeyKeys" .)) -}}
{{- $paths = append $paths (printf "%s/%s" $dir .) -}}
{{- end -}}
{{- join "," $paths -}}
{{- end -}}

{{/* The Redis URL when it is not taken from a Secret. */}}
{{- define "netbore.redisUrl" -}}
{{- if .Values.redis.enabled -}}
{{- printf "redis://%s:6379" (include "netbore.redisName" .) -}}
{{- else -}}
{{- required "redis.url (or redis.urlSecret.name) is required when redis.enabled is false" .Values.redis.url -}}
{{- end -}}
{{- end -}}

{{/* NETBORE_REDIS_URL as an env entry (from the Secret when one is named). */}}
{{- define "netbore.redisEnv" -}}
- name: NETBORE_REDIS_URL
{{- if and (not .Values.redis.enabled) .Values.redis.urlSecret.name }}
  valueFrom:
    secretKeyRef:
      name: {{ .Values.redis.urlSecret.name }}
      key: {{ .Values.redis.urlSecret.key }}
{{- else }}
  value: {{ include "netbore.redisUrl" . | quote }}
{{- end }}
{{- end -}}

{{/* The public URL template handed to users. */}}
{{- define "netbore.publicUrlTemplate" -}}
{{- if .Values.control.publicUrlTemplate -}}
{{- .Values.control.publicUrlTemplate -}}
{{- else -}}
{{- $tls := .Values.edge.tls.enabled -}}
{{- $port := int .Values.edge.service.publicPort -}}
{{- $scheme := ternary "https" "http" $tls -}}
{{- $default := ternary 443 80 $tls -}}
{{- if eq $port $default -}}
{{- printf "%s://{name}.%s" $scheme .Values.domain -}}
{{- else -}}
{{- printf "%s://{name}.%s:%d" $scheme .Values.domain $port -}}
{{- end -}}
{{- end -}}
{{- end -}}

{{/* The URL each edge advertises to agents. */}}
{{- define "netbore.advertiseUrl" -}}
{{- if .Values.edge.advertiseUrl -}}
{{- .Values.edge.advertiseUrl -}}
{{- else if .Values.edge.tls.enabled -}}
{{- printf "wss://edge.%s:%d/v1/connect" .Values.domain (int .Values.edge.service.agentPort) -}}
{{- else -}}
{{- printf "ws://$(POD_NAME).%s.$(POD_NAMESPACE).svc.cluster.local:8001/v1/connect" (include "netbore.edgeHeadlessName" .) -}}
{{- end -}}
{{- end -}}

{{/* Default topology spread: zones, then nodes, both best-effort. */}}
{{- define "netbore.topologySpread" -}}
{{- if .constraints -}}
{{ toYaml .constraints }}
{{- else -}}
- maxSkew: 1
  topologyKey: topology.kubernetes.io/zone
  whenUnsatisfiable: ScheduleAnyway
  labelSelector:
    matchLabels:
      {{- include "netbore.selectorLabels" . | nindent 6 }}
- maxSkew: 1
  topologyKey: kubernetes.io/hostname
  whenUnsatisfiable: ScheduleAnyway
  labelSelector:
    matchLabels:
      {{- include "netbore.selectorLabels" . | nindent 6 }}
{{- end -}}
{{- end -}}

{{/* Checks that can only be made on the combination of values. */}}
{{- define "netbore.validate" -}}
{{- $e := .Values.edge -}}
{{- $drain := add (int $e.preStopSleepSeconds) (int $e.drainDelaySeconds) (int $e.drainGraceSeconds) -}}
{{- if le (int $e.terminationGracePeriodSeconds) $drain -}}
{{- fail (printf "edge.terminationGracePeriodSeconds (%d) must exceed edge.preStopSleepSeconds + edge.drainDelaySeconds + edge.drainGraceSeconds (%d), or edges are killed mid-drain" (int $e.terminationGracePeriodSeconds) $drain) -}}
{{- end -}}
{{- if le (int .Values.control.terminationGracePeriodSeconds) (add (int .Values.control.preStopSleepSeconds) 10) -}}
{{- fail "control.terminationGracePeriodSeconds must exceed control.preStopSleepSeconds + 10 (control's own drain)" -}}
{{- end -}}
{{- if and $e.autoscaling.enabled (lt (int $e.autoscaling.maxReplicas) (int $e.autoscaling.minReplicas)) -}}
{{- fail "edge.autoscaling.maxReplicas must be at least edge.autoscaling.minReplicas" -}}
{{- end -}}
{{- if and (not .Values.redis.enabled) (not .Values.redis.url) (not .Values.redis.urlSecret.name) -}}
{{- fail "redis.enabled is false: set redis.url or redis.urlSecret.name to an external Redis" -}}
{{- end -}}
{{- if and $e.controlToken.existingSecret (not $e.controlToken.sha256) -}}
{{- fail "edge.controlToken.existingSecret is set: set edge.controlToken.sha256 to the token's SHA-256 (printf %s \"$TOKEN\" | sha256sum), which control is given" -}}
{{- end -}}
{{- range .Values.control.extraEnv -}}
{{- if has .name (list "NETBORE_EDGE_CREDENTIALS" "NETBORE_EDGE_CREDENTIALS_FILE") -}}
{{- fail (printf "control.extraEnv must not set %s: the chart sets it from edge.controlToken" .name) -}}
{{- end -}}
{{- end -}}
{{- range $e.extraEnv -}}
{{- if has .name (list "NETBORE_EDGE_TOKEN" "NETBORE_EDGE_TOKEN_FILE") -}}
{{- fail (printf "edge.extraEnv must not set %s: the chart sets it (edge.controlToken.existingSecret, never a literal)" .name) -}}
{{- end -}}
{{- if has .name (list "NETBORE_INTERNAL_SECRET" "NETBORE_INTERNAL_ADVERTISE" "POD_IP") -}}
{{- fail (printf "edge.extraEnv must not set %s: the chart sets it (the internal secret: edge.internalSecret.existingSecret, never a literal)" .name) -}}
{{- end -}}
{{- end -}}
{{- range (concat .Values.control.extraEnv $e.extraEnv) -}}
{{- if and (has .name (list "OTEL_EXPORTER_OTLP_ENDPOINT" "OTEL_EXPORTER_OTLP_TRACES_ENDPOINT")) (hasPrefix "https://" (toString .value)) -}}
{{- fail (printf "%s=%s: the binaries speak OTLP/gRPC without TLS and stop at start on https://; use http://HOST:4317 of a collector in the cluster (otel.endpoint)" .name .value) -}}
{{- end -}}
{{- end -}}
{{- if and .Values.secrets.existingSecret (not .Values.secrets.existingSecretKeys.signingKeys) -}}
{{- fail "secrets.existingSecretKeys.signingKeys must name at least one key of secrets.existingSecret" -}}
{{- end -}}
{{- end -}}
