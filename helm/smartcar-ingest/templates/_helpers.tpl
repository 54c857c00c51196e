{{/*
Expand the name of the chart.
*/}}
{{- define "smartcar-ingest.name" -}}
{{- default .Chart.Name .Values.nameOverride | trunc 63 | trimSuffix "-" }}
{{- end }}

{{/*
Create a default fully qualified app name.
We truncate at 63 chars because some Kubernetes name fields are limited to this (by the DNS naming spec).
If release name contains chart name it will be used as a full name.
*/}}
{{- define "smartcar-ingest.fullname" -}}
{{- if .Values.fullnameOverride }}
{{- .Values.fullnameOverride | trunc 63 | trimSuffix "-" }}
{{- else }}
{{- $name := default .Chart.Name .Values.nameOverride }}
{{- if contains $name .Release.Name }}
{{- .Release.Name | trunc 63 | trimSuffix "-" }}
{{- else }}
{{- printf "%s-%s" .Release.Name $name | trunc 63 | trimSuffix "-" }}
{{- end }}
{{- end }}
{{- end }}

{{/*
Create chart name and version as used by the chart label.
*/}}
{{- define "smartcar-ingest.chart" -}}
{{- printf "%s-%s" .Chart.Name .Chart.Version | replace "+" "_" | trunc 63 | trimSuffix "-" }}
{{- end }}

{{/*
Common labels
*/}}
{{- define "smartcar-ingest.labels" -}}
helm.sh/chart: {{ include "smartcar-ingest.chart" . }}
{{ include "smartcar-ingest.selectorLabels" . }}
{{- if .Chart.AppVersion }}
app.kubernetes.io/version: {{ .Chart.AppVersion | quote }}
{{- end }}
app.kubernetes.io/managed-by: {{ .Release.Service }}
{{- end }}

{{/*
Selector labels
*/}}
{{- define "smartcar-ingest.selectorLabels" -}}
app.kubernetes.io/name: {{ include "smartcar-ingest.name" . }}
app.kubernetes.io/instance: {{ .Release.Name }}
{{- end }}

{{/*
Create the name of the service account to use
*/}}
{{- define "smartcar-ingest.serviceAccountName" -}}
{{- if .Values.serviceAccount.create }}
{{- default (include "smartcar-ingest.fullname" .) .Values.serviceAccount.name }}
{{- else }}
{{- default "default" .Values.serviceAccount.name }}
{{- end }}
{{- end }}

{{/*
Per-component names and labels. Call with (dict "ctx" $ "component" "webhook"); the component
label keeps the webhook's Service and the worker's selectors apart.
*/}}
{{- define "smartcar-ingest.componentName" -}}
{{- $prefix := include "smartcar-ingest.fullname" .ctx | trunc (int (sub 62 (len .component))) | trimSuffix "-" }}
{{- printf "%s-%s" $prefix .component }}
{{- end }}

{{- define "smartcar-ingest.componentLabels" -}}
{{ include "smartcar-ingest.labels" .ctx }}
app.kubernetes.io/component: {{ .component }}
{{- end }}

{{- define "smartcar-ingest.componentSelectorLabels" -}}
{{ include "smartcar-ingest.selectorLabels" .ctx }}
app.kubernetes.io/component: {{ .component }}
{{- end }}

{{/*
The image reference: a digest pins it; otherwise the tag, defaulting to appVersion.
*/}}
{{- define "smartcar-ingest.image" -}}
{{- if .Values.image.digest }}
{{- printf "%s@%s" .Values.image.repository .Values.image.digest }}
{{- else }}
{{- printf "%s:%s" .Values.image.repository (.Values.image.tag | default .Chart.AppVersion) }}
{{- end }}
{{- end }}

{{/*
The Secret that holds the Redis URLs, DATABASE_URL, SMARTCAR_MANAGEMENT_TOKEN, SMARTCAR_CLIENT_SECRET
and CONNECT_STATE_SECRET.
*/}}
{{- define "smartcar-ingest.secretName" -}}
{{- .Values.secrets.existingSecret | default (include "smartcar-ingest.fullname" .) }}
{{- end }}

{{/*
Environment variables read from the Secret. Call with (dict "ctx" $ "keys" (list "DATABASE_URL" …)):
each pod receives only the secrets its process uses. An entry may also be a dict with the variable's
"name", the Secret's "key" and "optional" (a key the Secret need not hold).
*/}}
{{- define "smartcar-ingest.secretEnv" -}}
{{- $name := include "smartcar-ingest.secretName" .ctx }}
{{- range $index, $entry := .keys }}
{{- $entry = kindIs "map" $entry | ternary $entry (dict "name" $entry "key" $entry) }}
{{- if $index }}{{ "\n" }}{{ end -}}
- name: {{ $entry.name }}
  valueFrom:
    secretKeyRef:
      name: {{ $name }}
      key: {{ $entry.key }}
      {{- if $entry.optional }}
      optional: true
      {{- end }}
{{- end }}
{{- end }}

{{/*
The Secret key holding a role's REDIS_URL. Call with (dict "ctx" $ "role" "web"|"worker"). Each role
may log in to Redis as its own ACL user: an existing Secret names the key per role; the chart's own
Secret holds WEB_REDIS_URL / WORKER_REDIS_URL when secrets.webRedisUrl / workerRedisUrl are set,
and REDIS_URL (secrets.redisUrl) for a role without one.
*/}}
{{- define "smartcar-ingest.redisUrlKey" -}}
{{- $secrets := .ctx.Values.secrets }}
{{- if $secrets.existingSecret }}
{{- index $secrets.existingSecretRedisKeys .role }}
{{- else if index $secrets (printf "%sRedisUrl" .role) }}
{{- printf "%s_REDIS_URL" (upper .role) }}
{{- else }}
{{- print "REDIS_URL" }}
{{- end }}
{{- end }}

{{/*
A settings value as an environment string. Helm reads YAML numbers as floats, which print as
1e+06; whole numbers are printed as integers instead.
*/}}
{{- define "smartcar-ingest.envString" -}}
{{- if and (kindIs "float64" .) (eq (float64 (int64 .)) .) }}
{{- int64 . }}
{{- else }}
{{- toString . }}
{{- end }}
{{- end }}

{{/*
RQ keeps the ids of waiting jobs in the Redis list rq:queue:<INGEST_QUEUE>; KEDA scales on its length.
*/}}
{{- define "smartcar-ingest.queueKey" -}}
{{- printf "rq:queue:%s" (.Values.config.INGEST_QUEUE | default "smartcar-events") }}
{{- end }}

{{/*
The worker's termination grace: longer than the longest job, because SIGTERM starts RQ's warm
shutdown, which lets the job in flight finish (RQ stops a job at JOB_TIMEOUT_SECONDS, 120 by default).
*/}}
{{- define "smartcar-ingest.worker.terminationGracePeriodSeconds" -}}
{{- $timeout := include "smartcar-ingest.envString" (.Values.config.JOB_TIMEOUT_SECONDS | default 120) | int }}
{{- $grace := add $timeout .Values.worker.terminationGraceMarginSeconds | int }}
{{- if not (kindIs "invalid" .Values.worker.terminationGracePeriodSeconds) }}
{{- $grace = .Values.worker.terminationGracePeriodSeconds | int }}
{{- end }}
{{- if le $grace $timeout }}
{{- fail (printf "worker.terminationGracePeriodSeconds (%d) must exceed JOB_TIMEOUT_SECONDS (%d): SIGTERM lets the job in flight finish, and a job may run that long" $grace $timeout) }}
{{- end }}
{{- $grace }}
{{- end }}

{{/*
Pod-level settings shared by every pod of the chart.
*/}}
{{- define "smartcar-ingest.podCommon" -}}
automountServiceAccountToken: {{ .Values.serviceAccount.automount }}
# Service links would add an environment variable per Service in the namespace.
enableServiceLinks: false
{{- with .Values.imagePullSecrets }}
imagePullSecrets:
  {{- toYaml . | nindent 2 }}
{{- end }}
{{- with .Values.podSecurityContext }}
securityContext:
  {{- toYaml . | nindent 2 }}
{{- end }}
{{- end }}

{{/*
The writable /tmp of every container (the root filesystem is read-only).
*/}}
{{- define "smartcar-ingest.tmpVolume" -}}
- name: tmp
  emptyDir:
    {{- with .Values.tmpDir.sizeLimit }}
    sizeLimit: {{ . }}
    {{- end }}
{{- end }}

{{- define "smartcar-ingest.tmpVolumeMount" -}}
- name: tmp
  mountPath: /tmp
{{- end }}

{{/*
Fail at install or upgrade, with one line naming the value, when a setting the processes cannot
start without is missing. `helm lint` and plain rendering skip this, so the defaults render.
*/}}
{{- define "smartcar-ingest.validateValues" -}}
{{- if or .Release.IsInstall .Release.IsUpgrade }}
{{- $secrets := .Values.secrets }}
{{- if not $secrets.existingSecret }}
{{- range $key, $env := dict "databaseUrl" "DATABASE_URL" "smartcarManagementToken" "SMARTCAR_MANAGEMENT_TOKEN" "smartcarClientSecret" "SMARTCAR_CLIENT_SECRET" }}
{{- if not (index $secrets $key) }}
{{- fail (printf "secrets.%s (%s) is required: set it, or name a Secret holding it in secrets.existingSecret" $key $env) }}
{{- end }}
{{- end }}
{{- if not (or $secrets.redisUrl (and $secrets.webRedisUrl $secrets.workerRedisUrl)) }}
{{- fail "secrets.redisUrl (REDIS_URL) is required unless both secrets.webRedisUrl and secrets.workerRedisUrl are set: set it, or name a Secret holding it in secrets.existingSecret" }}
{{- end }}
{{- end }}
{{- if not .Values.config.SMARTCAR_CLIENT_ID }}
{{- fail "config.SMARTCAR_CLIENT_ID is required: the workers refuse to start without the client id" }}
{{- end }}
{{- end }}
{{- end }}

{{/*
One NetworkPolicy egress rule from a networkPolicy.egress entry ({to, ports}); an empty `to`
leaves the destination open and restricts the ports only.
*/}}
{{- define "smartcar-ingest.egressRule" -}}
- ports:
    {{- toYaml .ports | nindent 4 }}
  {{- with .to }}
  to:
    {{- toYaml . | nindent 4 }}
  {{- end }}
{{- end }}

{{/*
The egress rules of a role. Call with (dict "ctx" $ "database" bool "https" bool): every pod
resolves names and reaches Redis; PostgreSQL and HTTPS (Smartcar) only where the role uses them.
*/}}
{{- define "smartcar-ingest.egressRules" -}}
{{- $egress := .ctx.Values.networkPolicy.egress }}
{{- include "smartcar-ingest.egressRule" $egress.dns }}
{{ include "smartcar-ingest.egressRule" $egress.redis }}
{{- if .database }}
{{ include "smartcar-ingest.egressRule" $egress.postgresql }}
{{- end }}
{{- if .https }}
{{ include "smartcar-ingest.egressRule" $egress.https }}
{{- end }}
{{- with $egress.extra }}
{{ toYaml . }}
{{- end }}
{{- end }}
