{{/*
Names, labels and the few computed values that several templates share.
*/}}

{{/* Chart name, overridable. */}}
{{- define "pgfanout.name" -}}
{{- default .Chart.Name .Values.nameOverride | trunc 63 | trimSuffix "-" }}
{{- end }}

{{/*
Fully qualified object name: the release name when it already contains the
chart name, release-chart otherwise; 63 characters at most (DNS label).
*/}}
{{- define "pgfanout.fullname" -}}
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

{{/* chart-version label value. */}}
{{- define "pgfanout.chart" -}}
{{- printf "%s-%s" .Chart.Name .Chart.Version | replace "+" "_" | trunc 63 | trimSuffix "-" }}
{{- end }}

{{/* Labels on every object. */}}
{{- define "pgfanout.labels" -}}
helm.sh/chart: {{ include "pgfanout.chart" . }}
{{ include "pgfanout.selectorLabels" . }}
app.kubernetes.io/version: {{ .Values.image.tag | default .Chart.AppVersion | quote }}
app.kubernetes.io/managed-by: {{ .Release.Service }}
app.kubernetes.io/component: gateway
{{- end }}

{{/* Labels that select the pods: never change them after the first install. */}}
{{- define "pgfanout.selectorLabels" -}}
app.kubernetes.io/name: {{ include "pgfanout.name" . }}
app.kubernetes.io/instance: {{ .Release.Name }}
{{- end }}

{{/* ServiceAccount the pods run as. */}}
{{- define "pgfanout.serviceAccountName" -}}
{{- if .Values.serviceAccount.create }}
{{- default (include "pgfanout.fullname" .) .Values.serviceAccount.name }}
{{- else }}
{{- default "default" .Values.serviceAccount.name }}
{{- end }}
{{- end }}

{{/* Image reference; the tag defaults to the chart's appVersion. */}}
{{- define "pgfanout.image" -}}
{{- printf "%s:%s" .Values.image.repository (.Values.image.tag | default .Chart.AppVersion) }}
{{- end }}

{{/*
Key/value pairs of the chart-managed Secret, as YAML (empty when none): only
the settings that are set, so an unset URL stays unset in the pod.
*/}}
{{- define "pgfanout.secretData" -}}
{{- $data := dict }}
{{- with .Values.secret.databaseUrl }}{{ $_ := set $data "PGFANOUT_DATABASE_URL" . }}{{ end }}
{{- with .Values.secret.redisUrl }}{{ $_ := set $data "PGFANOUT_REDIS_URL" . }}{{ end }}
{{- range $k, $v := .Values.secret.extra }}{{ $_ := set $data $k (toString $v) }}{{ end }}
{{- if $data }}{{ toYaml $data }}{{ end }}
{{- end }}

{{/*
Name of the Secret the pods load with envFrom: the existing one, the
chart-managed one when it has any key, or empty (no Secret at all).
*/}}
{{- define "pgfanout.secretName" -}}
{{- if .Values.secret.existingSecret }}
{{- .Values.secret.existingSecret }}
{{- else if include "pgfanout.secretData" . }}
{{- include "pgfanout.fullname" . }}
{{- end }}
{{- end }}

{{/*
Whether Redis is configured, as far as the chart can tell: an existing Secret
may hold PGFANOUT_REDIS_URL, so it counts as configured.
*/}}
{{- define "pgfanout.hasRedis" -}}
{{- if or .Values.secret.existingSecret .Values.secret.redisUrl (hasKey .Values.secret.extra "PGFANOUT_REDIS_URL") }}true{{ end }}
{{- end }}

{{/*
Shortest terminationGracePeriodSeconds that lets pgfanout finish on its own:
preStop sleep + drain window + shutdown grace (see values.yaml, shutdown).
*/}}
{{- define "pgfanout.minTerminationGrace" -}}
{{- $s := .Values.shutdown }}
{{- add (int $s.preStopSleepSeconds) (int $s.drainWindowSeconds) (int $s.shutdownGraceSeconds) }}
{{- end }}

{{/*
terminationGracePeriodSeconds: computed as the minimum plus slack, or the
explicit value, which may not be below the minimum. Also refuses a drain window
that does not fit in the shutdown grace.
*/}}
{{- define "pgfanout.terminationGracePeriodSeconds" -}}
{{- $s := .Values.shutdown }}
{{- if ge (int $s.drainWindowSeconds) (int $s.shutdownGraceSeconds) }}
{{- fail (printf "shutdown.drainWindowSeconds (%d) must be shorter than shutdown.shutdownGraceSeconds (%d): the drain happens inside the grace" (int $s.drainWindowSeconds) (int $s.shutdownGraceSeconds)) }}
{{- end }}
{{- $min := include "pgfanout.minTerminationGrace" . | int }}
{{- if kindIs "invalid" $s.terminationGracePeriodSeconds }}
{{- add $min (int $s.slackSeconds) }}
{{- else if lt (int $s.terminationGracePeriodSeconds) $min }}
{{- fail (printf "shutdown.terminationGracePeriodSeconds (%d) is below preStopSleepSeconds + drainWindowSeconds + shutdownGraceSeconds (%d): the kubelet would kill pgfanout mid-drain" (int $s.terminationGracePeriodSeconds) $min) }}
{{- else }}
{{- int $s.terminationGracePeriodSeconds }}
{{- end }}
{{- end }}
