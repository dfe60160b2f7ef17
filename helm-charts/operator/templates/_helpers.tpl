{{/* Names, labels, and the operator's own image. */}}

{{- define "operator.name" -}}
{{- .Chart.Name | trunc 63 | trimSuffix "-" -}}
{{- end -}}

{{- define "operator.fullname" -}}
{{- if contains "fleetmirror" .Release.Name -}}
{{- printf "%s-operator" .Release.Name | trunc 63 | trimSuffix "-" -}}
{{- else -}}
{{- printf "%s-fleetmirror-operator" .Release.Name | trunc 63 | trimSuffix "-" -}}
{{- end -}}
{{- end -}}

{{- define "operator.labels" -}}
helm.sh/chart: {{ printf "%s-%s" .Chart.Name .Chart.Version | replace "+" "_" }}
app.kubernetes.io/managed-by: {{ .Release.Service }}
{{ include "operator.selectorLabels" . }}
{{- end -}}

{{- define "operator.selectorLabels" -}}
app.kubernetes.io/name: {{ include "operator.name" . }}
app.kubernetes.io/instance: {{ .Release.Name }}
{{- end -}}

{{/*
The operator's image from the images map, placed under imageMirror. The
operator rewrites every other image with operator/imageref.Mirror; this is
the same layout for the one image Helm itself renders (images are full
canonical references, which the schema enforces, so only the registry's
port needs rewriting). A test checks it against imageref.Mirror.
*/}}
{{- define "operator.image" -}}
{{- $ref := .Values.images.operator -}}
{{- $mirror := regexReplaceAll "/+$" .Values.imageMirror "" -}}
{{- if and $mirror (not (hasPrefix (printf "%s/" $mirror) $ref)) -}}
{{- $parts := splitn "/" 2 $ref -}}
{{- printf "%s/%s/%s" $mirror (replace ":" "_" $parts._0) $parts._1 -}}
{{- else -}}
{{- $ref -}}
{{- end -}}
{{- end -}}

{{- define "operator.spegelNamespace" -}}
{{- .Values.components.spegel.namespace | default .Release.Namespace -}}
{{- end -}}

{{/*
The namespaces the operator manages, as a JSON list: managedNamespaces,
or the default Spegel resource's namespace. The default resource must be
in one of them, or the operator would refuse its own chart's resource.
*/}}
{{- define "operator.managedNamespaces" -}}
{{- $ns := .Values.managedNamespaces | default (list (include "operator.spegelNamespace" .)) | uniq -}}
{{- if and .Values.components.spegel.enabled (not (has (include "operator.spegelNamespace" .) $ns)) -}}
{{- fail (printf "components.spegel.namespace %s is not among managedNamespaces %s: add it, or the operator has no rights there" (include "operator.spegelNamespace" .) (join "," $ns)) -}}
{{- end -}}
{{- $ns | toJson -}}
{{- end -}}
