{{/*
Expand the name of the chart.
*/}}
{{- define "importwaves.name" -}}
{{- default .Chart.Name .Values.nameOverride | trunc 63 | trimSuffix "-" }}
{{- end }}

{{/*
Create a default fully qualified app name (at most 63 characters: some Kubernetes name fields
are limited to this by the DNS naming spec). If the release name contains the chart name it is
used as the full name.
*/}}
{{- define "importwaves.fullname" -}}
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
Chart name and version as used by the chart label.
*/}}
{{- define "importwaves.chart" -}}
{{- printf "%s-%s" .Chart.Name .Chart.Version | replace "+" "_" | trunc 63 | trimSuffix "-" }}
{{- end }}

{{/*
Common labels.
*/}}
{{- define "importwaves.labels" -}}
helm.sh/chart: {{ include "importwaves.chart" . }}
{{ include "importwaves.selectorLabels" . }}
{{- if .Chart.AppVersion }}
app.kubernetes.io/version: {{ .Chart.AppVersion | quote }}
{{- end }}
app.kubernetes.io/managed-by: {{ .Release.Service }}
app.kubernetes.io/part-of: importwaves
{{- end }}

{{/*
Selector labels.
*/}}
{{- define "importwaves.selectorLabels" -}}
app.kubernetes.io/name: {{ include "importwaves.name" . }}
app.kubernetes.io/instance: {{ .Release.Name }}
{{- end }}

{{/*
The name of the ServiceAccount to use.
*/}}
{{- define "importwaves.serviceAccountName" -}}
{{- if .Values.serviceAccount.create }}
{{- default (include "importwaves.fullname" .) .Values.serviceAccount.name }}
{{- else }}
{{- default "default" .Values.serviceAccount.name }}
{{- end }}
{{- end }}

{{/*
The operator image reference (the tag defaults to the chart's appVersion).
*/}}
{{- define "importwaves.image" -}}
{{- printf "%s:%s" .Values.image.repository (.Values.image.tag | default .Chart.AppVersion) }}
{{- end }}

{{/*
The metrics Service name.
*/}}
{{- define "importwaves.metricsServiceName" -}}
{{- printf "%s-metrics" (include "importwaves.fullname" .) | trunc 63 | trimSuffix "-" }}
{{- end }}

{{/*
True ("true") when the operator watches the whole cluster, empty otherwise.
*/}}
{{- define "importwaves.clusterWide" -}}
{{- if not .Values.watchNamespaces }}true{{- end }}
{{- end }}

{{/*
RBAC rules the operator needs in every namespace it watches: a Role in each watched namespace,
or part of the ClusterRole when it watches the whole cluster. "framework" rules are what kopf
itself does; "application" rules are what importwaves' own code does (k8s/operator.py,
launch/kubernetes.py, cli.py).
*/}}
{{- define "importwaves.watchedNamespaceRules" -}}
# application + framework: ImportJobs. kopf lists and watches them and patches its progress and
# diff-base annotations (and finalizers) onto them; the operator gets one to refresh its status
# after a worker Job ends.
- apiGroups: ["importwaves.io"]
  resources: ["importjobs"]
  verbs: ["get", "list", "watch", "patch"]
# application + framework: ImportJob status (conditions, wave and batch counters), written by
# kopf's handler patches and by the operator's status refresh (merge patch on /status).
- apiGroups: ["importwaves.io"]
  resources: ["importjobs/status"]
  verbs: ["patch"]
# application: worker Jobs, one work-queue Job per wave (launch/kubernetes.py). Watched (kopf
# on.event) so a pod's end promptly runs the engine's worker sync for its ImportJob, listed per
# ImportJob, created when a wave needs workers and none of its Jobs is active, deleted once the
# engine has recorded their pods' ends (the last failed one a while later). No update/patch:
# the operator never edits a Job.
- apiGroups: ["batch"]
  resources: ["jobs"]
  verbs: ["list", "watch", "create", "delete"]
# application: worker pods, listed per ImportJob (its owner-uid label) by the launcher's
# observe: which workers live, and an ended one's exit code and termination message (a failed
# batch's recorded error). No get/watch and no write access: pods are created and removed by
# the Job controller.
- apiGroups: [""]
  resources: ["pods"]
  verbs: ["list"]
# application: the tenant database Secret named by each ImportJob (spec.database.secretName),
# read one by name. No list/watch: the operator never enumerates Secrets.
- apiGroups: [""]
  resources: ["secrets"]
  verbs: ["get"]
# framework + application: Events. kopf posts handler progress and errors; the operator posts
# WaveDispatched, CompletionGuard, RecoveryAction, ... (create only).
- apiGroups: [""]
  resources: ["events"]
  verbs: ["create"]
{{- end }}

{{/*
RBAC rules for kopf's peering objects ("framework"): it lists and watches the peering objects
of its kind to see other operators, and patches its keep-alive into its own object only.
Argument: dict "root" (the chart context) "resource" (clusterkopfpeerings | kopfpeerings).
*/}}
{{- define "importwaves.peeringRules" -}}
{{- if .root.Values.peering.enabled }}
# framework: kopf peering, seeing the other operators (list and watch the peering objects).
- apiGroups: ["kopf.dev"]
  resources: [{{ .resource | quote }}]
  verbs: ["list", "watch"]
# framework: kopf peering, the keep-alive written into this operator's own peering object; and
# the startup check that this object exists (k8s/peering.py reads it: absent, run standalone).
- apiGroups: ["kopf.dev"]
  resources: [{{ .resource | quote }}]
  resourceNames: [{{ .root.Values.peering.name | quote }}]
  verbs: ["get", "patch"]
{{- end }}
{{- end }}

{{/*
Fail at install, with what to do, when a monitoring object's kind is unknown to the cluster (the
Prometheus Operator's CRDs are not installed): otherwise the install fails later with `no matches
for kind "ServiceMonitor"` and leaves a failed release. Called with (list $ "Kind" "value.path").
*/}}
{{- define "importwaves.requirePrometheusOperator" -}}
{{- $root := index . 0 -}}
{{- $kind := index . 1 -}}
{{- $value := index . 2 -}}
{{- if not ($root.Capabilities.APIVersions.Has (printf "monitoring.coreos.com/v1/%s" $kind)) -}}
{{- fail (printf "%s=true needs the Prometheus Operator's %s CRD (monitoring.coreos.com/v1), which this cluster does not have: install the Prometheus Operator (e.g. kube-prometheus-stack) first, or set %s=false (with `helm template`, pass --api-versions monitoring.coreos.com/v1/%s)" $value $kind $value $kind) -}}
{{- end -}}
{{- end -}}

{{/*
Checks values.schema.json cannot explain: a redis.url holding credentials is refused with a hint
to redis.existingSecret (the URL itself is never echoed: it holds a password).
*/}}
{{- define "importwaves.validateValues" -}}
{{- if regexMatch "(?i)(@|[?&]password=)" .Values.redis.url -}}
{{- fail "redis.url must not hold credentials (they would be stored in plain text in the release and the Deployment): put the full URL in a Secret (kubectl create secret generic redis --from-literal=url='redis://:PASSWORD@host:6379/0') and set redis.existingSecret=redis (the key is redis.existingSecretKey, default url)" -}}
{{- end -}}
{{- end -}}
