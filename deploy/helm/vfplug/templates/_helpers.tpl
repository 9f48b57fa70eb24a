{{/* The release's full name, 63 characters at most (a DNS label). */}}
{{- define "vfplug.fullname" -}}
{{- if contains .Chart.Name .Release.Name -}}
{{- .Release.Name | trunc 63 | trimSuffix "-" -}}
{{- else -}}
{{- printf "%s-%s" .Release.Name .Chart.Name | trunc 63 | trimSuffix "-" -}}
{{- end -}}
{{- end -}}

{{- define "vfplug.labels" -}}
app.kubernetes.io/name: {{ .Chart.Name }}
app.kubernetes.io/instance: {{ .Release.Name }}
app.kubernetes.io/version: {{ .Chart.AppVersion | quote }}
app.kubernetes.io/managed-by: {{ .Release.Service }}
helm.sh/chart: {{ printf "%s-%s" .Chart.Name .Chart.Version }}
{{- end -}}

{{- define "vfplug.selectorLabels" -}}
app.kubernetes.io/name: {{ .Chart.Name }}
app.kubernetes.io/instance: {{ .Release.Name }}
app.kubernetes.io/component: vfplugd
{{- end -}}

{{- define "vfplug.serviceAccountName" -}}
{{- default (include "vfplug.fullname" .) .Values.serviceAccount.name -}}
{{- end -}}

{{- define "vfplug.configMapName" -}}
{{- default (include "vfplug.fullname" .) .Values.existingConfigMap -}}
{{- end -}}

{{- define "vfplug.devicePluginDir" -}}
{{- default (printf "%s/device-plugins" (trimSuffix "/" .Values.paths.kubeletDir)) .Values.paths.devicePluginDir -}}
{{- end -}}

{{/* Refuses values the schema cannot express, naming them. */}}
{{- define "vfplug.validate" -}}
{{- if and (empty .Values.config) (empty .Values.existingConfigMap) -}}
{{- fail "values: set `config` (the pool config, docs/config.md) or `existingConfigMap`; vfplugd has no pools without one" -}}
{{- end -}}
{{- if and (not (empty .Values.config)) (not (empty .Values.existingConfigMap)) -}}
{{- fail "values: `config` and `existingConfigMap` are both set; set one" -}}
{{- end -}}
{{- if and (eq (toString .Values.controller) "on") (not .Values.rbac.create) (not .Values.serviceAccount.name) -}}
{{- fail "values: `controller: on` needs RBAC: keep `rbac.create` or name a `serviceAccount.name` you have bound" -}}
{{- end -}}
{{- end -}}
