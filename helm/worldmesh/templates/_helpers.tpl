{{/* The chart name, for app.kubernetes.io/name. */}}
{{- define "worldmesh.name" -}}
{{- default .Chart.Name .Values.nameOverride | trunc 63 | trimSuffix "-" }}
{{- end }}

{{/* The release's resource name prefix, 63 characters at most (a DNS label). */}}
{{- define "worldmesh.fullname" -}}
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

{{/* name-version, for the helm.sh/chart label. */}}
{{- define "worldmesh.chart" -}}
{{- printf "%s-%s" .Chart.Name .Chart.Version | replace "+" "_" | trunc 63 | trimSuffix "-" }}
{{- end }}

{{/* Labels of every object of the release. */}}
{{- define "worldmesh.labels" -}}
helm.sh/chart: {{ include "worldmesh.chart" . }}
{{ include "worldmesh.selectorLabels" . }}
app.kubernetes.io/version: {{ .Chart.AppVersion | quote }}
app.kubernetes.io/managed-by: {{ .Release.Service }}
app.kubernetes.io/part-of: worldmesh
{{- end }}

{{/* The operator pods' selector: stable across upgrades, so no version. */}}
{{- define "worldmesh.selectorLabels" -}}
app.kubernetes.io/name: {{ include "worldmesh.name" . }}
app.kubernetes.io/instance: {{ .Release.Name }}
app.kubernetes.io/component: operator
{{- end }}

{{/* The operator's ServiceAccount. */}}
{{- define "worldmesh.serviceAccountName" -}}
{{- if .Values.serviceAccount.create }}
{{- default (include "worldmesh.fullname" .) .Values.serviceAccount.name }}
{{- else }}
{{- default "default" .Values.serviceAccount.name }}
{{- end }}
{{- end }}

{{/* repository:tag of an image value; the tag defaults to the appVersion. */}}
{{- define "worldmesh.image" -}}
{{- printf "%s:%s" .image.repository (default .root.Chart.AppVersion .image.tag) }}
{{- end }}

{{/* The namespaces served, as a JSON list: watchNamespaces, or the release namespace for
objects that need one namespace (NetworkPolicy, peering) when every namespace is served. */}}
{{- define "worldmesh.policyNamespaces" -}}
{{- if .Values.watchNamespaces }}
{{- toJson .Values.watchNamespaces }}
{{- else }}
{{- toJson (list .Release.Namespace) }}
{{- end }}
{{- end }}

{{/* The kopf peering name shared by the operator replicas. */}}
{{- define "worldmesh.peeringName" -}}
{{- include "worldmesh.fullname" . }}
{{- end }}

{{/* Whether to render the PodMonitor: asked for, or auto-detected. */}}
{{- define "worldmesh.podMonitor" -}}
{{- $pm := .Values.monitoring.podMonitor }}
{{- if or $pm.enabled (and $pm.autoDetect (.Capabilities.APIVersions.Has "monitoring.coreos.com/v1/PodMonitor")) }}true{{ end }}
{{- end }}
