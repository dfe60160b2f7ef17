{{/* Names and labels only. */}}

{{- define "spegel.name" -}}
{{- .Chart.Name | trunc 63 | trimSuffix "-" -}}
{{- end -}}

{{/* The release name, prefixed with the chart name unless it contains it. */}}
{{- define "spegel.fullname" -}}
{{- if contains .Chart.Name .Release.Name -}}
{{- .Release.Name | trunc 50 | trimSuffix "-" -}}
{{- else -}}
{{- printf "%s-%s" .Release.Name .Chart.Name | trunc 50 | trimSuffix "-" -}}
{{- end -}}
{{- end -}}

{{- define "spegel.labels" -}}
helm.sh/chart: {{ printf "%s-%s" .Chart.Name .Chart.Version | replace "+" "_" }}
app.kubernetes.io/managed-by: {{ .Release.Service }}
app.kubernetes.io/part-of: fleetmirror
{{ include "spegel.selectorLabels" . }}
{{- end -}}

{{- define "spegel.selectorLabels" -}}
app.kubernetes.io/name: {{ include "spegel.name" . }}
app.kubernetes.io/instance: {{ .Release.Name }}
{{- end -}}

{{/* The agent image reference. */}}
{{- define "spegel.image" -}}
{{- $tag := .Values.image.tag | default .Chart.AppVersion -}}
{{- if hasPrefix "@" $tag -}}
{{- printf "%s%s" .Values.image.repository $tag -}}
{{- else -}}
{{- printf "%s:%s" .Values.image.repository $tag -}}
{{- end -}}
{{- end -}}

{{- define "spegel.prepImage" -}}
{{- .Values.containerdPrep.image | default (include "spegel.image" .) -}}
{{- end -}}

{{- define "spegel.waitImage" -}}
{{- .Values.cleanup.waitImage | default (printf "ghcr.io/fleetmirror/operator:%s" .Chart.AppVersion) -}}
{{- end -}}

{{/* The headless Service the agents find each other through. */}}
{{- define "spegel.bootstrapHost" -}}
{{- printf "%s-bootstrap.%s.svc.%s" (include "spegel.fullname" .) .Release.Namespace .Values.clusterDomain -}}
{{- end -}}

{{/* The Secret holding the cluster's network key: named, or the chart's own. */}}
{{- define "spegel.networkKeySecret" -}}
{{- .Values.networkKey.secretName | default (printf "%s-network-key" (include "spegel.fullname" .)) -}}
{{- end -}}

{{- define "spegel.mirrorTarget" -}}
{{- if .Values.mirrorTarget -}}
{{- .Values.mirrorTarget -}}
{{- else if .Values.hostNetwork -}}
{{- printf "http://127.0.0.1:%v" .Values.ports.registry -}}
{{- else -}}
{{- printf "http://$(NODE_IP):%v" .Values.ports.registry -}}
{{- end -}}
{{- end -}}

{{- define "spegel.imagePullSecrets" -}}
{{- with .Values.imagePullSecrets }}
imagePullSecrets:
  {{- toYaml . | nindent 2 }}
{{- end }}
{{- end -}}

{{/* Where the agent runs: every Linux node unless told otherwise. */}}
{{- define "spegel.placement" -}}
{{- with .Values.nodeSelector }}
nodeSelector:
  {{- toYaml . | nindent 2 }}
{{- end }}
{{- /* The operator's startup taint (node readiness) holds a new node until
its agent is ready, so the agent and prep pods tolerate it whatever the
tolerations value says. */}}
tolerations:
  - key: fleetmirror.dev/agent-not-ready
    operator: Exists
    effect: NoSchedule
  {{- with .Values.tolerations }}
  {{- toYaml . | nindent 2 }}
  {{- end }}
{{- with .Values.affinity }}
affinity:
  {{- toYaml . | nindent 2 }}
{{- end }}
{{- with .Values.priorityClassName }}
priorityClassName: {{ . }}
{{- end }}
{{- end -}}

{{/* Whether the agent removes the startup taint from its own node past a
bound (releaseTaintAfter set and not zero): non-empty when it does. */}}
{{- define "spegel.releasesTaint" -}}
{{- if and .Values.releaseTaintAfter (not (regexMatch "^0+(\\.0+)?(ms|s|m|h)?$" (toString .Values.releaseTaintAfter))) }}true{{ end }}
{{- end -}}
