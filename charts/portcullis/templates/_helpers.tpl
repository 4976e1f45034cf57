{{/* Chart name. */}}
{{- define "portcullis.name" -}}
{{- default .Chart.Name .Values.nameOverride | trunc 63 | trimSuffix "-" }}
{{- end }}

{{/*
Full name: the release name, with the chart name appended unless the release name contains it.
Used for every object, cluster-scoped ones included, so two releases never collide.
*/}}
{{- define "portcullis.fullname" -}}
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

{{/* The inventory ConfigMap (NSGs the operator has written), one per release. */}}
{{- define "portcullis.inventoryName" -}}
{{- printf "%s-inventory" (include "portcullis.fullname" .) }}
{{- end }}

{{/* Name for cluster-scoped objects: always carries the release name and namespace. */}}
{{- define "portcullis.clusterName" -}}
{{- printf "%s-%s" (include "portcullis.fullname" .) .Release.Namespace | trunc 63 | trimSuffix "-" }}
{{- end }}

{{- define "portcullis.chart" -}}
{{- printf "%s-%s" .Chart.Name .Chart.Version | replace "+" "_" | trunc 63 | trimSuffix "-" }}
{{- end }}

{{- define "portcullis.selectorLabels" -}}
app.kubernetes.io/name: {{ include "portcullis.name" . }}
app.kubernetes.io/instance: {{ .Release.Name }}
{{- end }}

{{- define "portcullis.labels" -}}
helm.sh/chart: {{ include "portcullis.chart" . }}
{{ include "portcullis.selectorLabels" . }}
app.kubernetes.io/version: {{ .Chart.AppVersion | quote }}
app.kubernetes.io/managed-by: {{ .Release.Service }}
app.kubernetes.io/component: operator
{{- end }}

{{- define "portcullis.serviceAccountName" -}}
{{- if .Values.serviceAccount.create }}
{{- default (include "portcullis.fullname" .) .Values.serviceAccount.name }}
{{- else }}
{{- required "serviceAccount.name is required when serviceAccount.create=false" .Values.serviceAccount.name }}
{{- end }}
{{- end }}

{{- define "portcullis.image" -}}
{{- $repo := required "image.repository is required: build the image from the Dockerfile and push it to a registry the cluster can pull from (e.g. --set image.repository=myregistry.azurecr.io/portcullis)" .Values.image.repository }}
{{- if .Values.image.digest }}
{{- printf "%s@%s" $repo .Values.image.digest }}
{{- else }}
{{- printf "%s:%s" $repo (default .Chart.AppVersion .Values.image.tag) }}
{{- end }}
{{- end }}

{{/*
Leader election is always on: with it, any number of pods (kubectl scale, an HPA, a rolling
update's surge) has one writer; without it, a second pod would be a second writer.
*/}}
{{- define "portcullis.leaderElection" -}}
true
{{- end }}

{{/*
Checks that a schema cannot express: what each credential mode requires, and the priority
bands' bounds and order. Included by the Deployment; renders nothing.
*/}}
{{- define "portcullis.validate" -}}
{{- if not .Values.leaderElection.enabled }}
{{- fail "leaderElection.enabled cannot be false: without leader election a second pod (kubectl scale, a rolling update) would write to Azure alongside the first" }}
{{- end }}
{{- $az := .Values.azure }}
{{- if eq $az.credentialMode "workloadIdentity" }}
{{- $_ := required "azure.tenantId is required when azure.credentialMode=workloadIdentity (the Entra ID tenant of the managed identity)" $az.tenantId }}
{{- $_ := required "azure.clientId is required when azure.credentialMode=workloadIdentity (the client ID of the user-assigned managed identity with the federated credential)" $az.clientId }}
{{- if $az.existingSecret }}
{{- fail "azure.existingSecret is only used with azure.credentialMode=clientSecret; unset it for workloadIdentity" }}
{{- end }}
{{- else if eq $az.credentialMode "clientSecret" }}
{{- $_ := required "azure.tenantId is required when azure.credentialMode=clientSecret" $az.tenantId }}
{{- $_ := required "azure.clientId is required when azure.credentialMode=clientSecret (the app registration's client ID)" $az.clientId }}
{{- $_ := required "azure.existingSecret is required when azure.credentialMode=clientSecret (name of a Secret in the release namespace holding the client secret under azure.secretKey)" $az.existingSecret }}
{{- else if eq $az.credentialMode "managedIdentity" }}
{{- if $az.existingSecret }}
{{- fail "azure.existingSecret is only used with azure.credentialMode=clientSecret; unset it for managedIdentity" }}
{{- end }}
{{- else }}
{{- fail (printf "azure.credentialMode must be one of workloadIdentity, clientSecret, managedIdentity (got %q)" (toString $az.credentialMode)) }}
{{- end }}
{{- $bands := dict }}
{{- range $key := list "allow" "deny" }}
{{- $raw := toString (get $.Values.priorityBands $key) }}
{{- if not (regexMatch "^[0-9]{3,4}-[0-9]{3,4}$" $raw) }}
{{- fail (printf "priorityBands.%s must be FIRST-LAST, e.g. 100-199 (got %q)" $key $raw) }}
{{- end }}
{{- $parts := splitList "-" $raw }}
{{- $first := atoi (index $parts 0) }}
{{- $last := atoi (index $parts 1) }}
{{- if or (lt $first 100) (gt $last 4096) (gt $first $last) }}
{{- fail (printf "priorityBands.%s %q must satisfy 100 <= FIRST <= LAST <= 4096 (NSG priorities)" $key $raw) }}
{{- end }}
{{- $_ := set $bands $key (list $first $last) }}
{{- end }}
{{- $a := $bands.allow }}
{{- $d := $bands.deny }}
{{- if ge (index $a 1) (index $d 0) }}
{{- fail (printf "priorityBands.allow %q must end below priorityBands.deny %q (Allow rules need the lower priority numbers to win over the Deny rules)" .Values.priorityBands.allow .Values.priorityBands.deny) }}
{{- end }}
{{- $_ := include "portcullis.watchNamespaces" . }}
{{- end }}

{{/*
The watched namespaces as a comma-separated list (PORTCULLIS_NAMESPACES); empty = all
namespaces. Fails on the removed single-namespace key and on anything but a list of unique
namespace names (the schema says the same; this also holds under --skip-schema-validation).
*/}}
{{- define "portcullis.watchNamespaces" -}}
{{- if hasKey .Values "watchNamespace" }}
{{- fail (printf "watchNamespace was replaced by watchNamespaces, a list (e.g. --set watchNamespaces={%s}); unset watchNamespace" (toString .Values.watchNamespace)) }}
{{- end }}
{{- $list := .Values.watchNamespaces | default list }}
{{- if not (kindIs "slice" $list) }}
{{- fail (printf "watchNamespaces must be a list of namespace names, e.g. --set watchNamespaces={team-a,team-b} (got %q)" (toString $list)) }}
{{- end }}
{{- range $list }}
{{- if not (and (kindIs "string" .) (le (len .) 63) (regexMatch "^[a-z0-9]([-a-z0-9]*[a-z0-9])?$" .)) }}
{{- fail (printf "watchNamespaces: %q is not a namespace name" (toString .)) }}
{{- end }}
{{- end }}
{{- if ne (len $list) (len (uniq $list)) }}
{{- fail (printf "watchNamespaces lists a namespace twice: %s" (join "," $list)) }}
{{- end }}
{{- join "," $list }}
{{- end }}

{{/* The operator's rules on its own resources and Events (Role or ClusterRole). */}}
{{- /*
JitScopes are cluster-scoped: the operator reads them cluster-wide in either mode (a Role in a
watched namespace cannot grant reads of cluster-scoped objects). Read only: JitScopes are
written by cluster administrators alone.
*/ -}}
{{- define "portcullis.scopeRules" -}}
- apiGroups: ["portcullis.dev"]
  resources: ["jitscopes"]
  verbs: ["get", "list", "watch"]
{{- end }}
{{- define "portcullis.rbacRules" -}}
- apiGroups: ["portcullis.dev"]
  resources: ["jitpolicies", "accessgrants"]
  verbs: ["get", "list", "watch", "patch", "update"]
{{- if include "portcullis.finishedGrantTTL" . }}
# The finished-grant TTL: the operator deletes AccessGrants that finished that long ago.
- apiGroups: ["portcullis.dev"]
  resources: ["accessgrants"]
  verbs: ["delete"]
{{- end }}
- apiGroups: ["portcullis.dev"]
  resources: ["accessapprovals"]
  verbs: ["get", "list", "watch"]
- apiGroups: ["portcullis.dev"]
  resources: ["jitpolicies/status", "accessgrants/status"]
  verbs: ["patch"]
- apiGroups: ["events.k8s.io"]
  resources: ["events"]
  verbs: ["create", "patch"]
{{- if (.Values.notifications).enabled }}
# Notifications: the operator watches Secrets labelled portcullis.dev/notification-target (RBAC
# cannot be limited by label, so this reads every Secret in the watched namespaces).
- apiGroups: [""]
  resources: ["secrets"]
  verbs: ["get", "list", "watch"]
{{- end }}
{{- end }}

{{/* The webhook's Service (its DNS names are in the certificate). */}}
{{- define "portcullis.webhookServiceName" -}}
{{- printf "%s-webhook" (include "portcullis.fullname" .) | trunc 63 | trimSuffix "-" }}
{{- end }}

{{/* The Mutating- and ValidatingWebhookConfiguration (cluster-scoped, one name for both). */}}
{{- define "portcullis.webhookConfigurationName" -}}
{{- include "portcullis.clusterName" . }}
{{- end }}

{{/* The Secret with the serving certificate: the operator's own, or cert-manager's. */}}
{{- define "portcullis.webhookCertSecret" -}}
{{- if .Values.webhook.certManager.enabled }}
{{- printf "%s-webhook-tls" (include "portcullis.fullname" .) }}
{{- else }}
{{- default (printf "%s-webhook-cert" (include "portcullis.fullname" .)) .Values.webhook.certSecretName }}
{{- end }}
{{- end }}

{{/* The Secret with the key that signs the webhook's stamps. */}}
{{- define "portcullis.stampKeySecret" -}}
{{- default (printf "%s-stamp-key" (include "portcullis.fullname" .)) .Values.stampKeySecretName }}
{{- end }}

{{/*
Which namespaces' objects go through the webhooks: webhook.namespaceSelector when set, else
the watched namespaces by their kubernetes.io/metadata.name label (Kubernetes 1.21+), else all.
*/}}
{{- define "portcullis.webhookNamespaceSelector" -}}
{{- if .Values.webhook.namespaceSelector }}
{{- toYaml .Values.webhook.namespaceSelector }}
{{- else }}
{{- with include "portcullis.watchNamespaces" . }}
matchExpressions:
  - key: kubernetes.io/metadata.name
    operator: In
    values: {{ splitList "," . | toJson }}
{{- else }}
{}
{{- end }}
{{- end }}
{{- end }}

{{/*
finishedGrantTTL as the operator reads it (PORTCULLIS_FINISHED_GRANT_TTL); empty = off. An
integer (`--set finishedGrantTTL=3600`) is seconds, and 0 is a TTL of zero, not "off".
*/}}
{{- define "portcullis.finishedGrantTTL" -}}
{{- $ttl := .Values.finishedGrantTTL }}
{{- if kindIs "string" $ttl }}
{{- $ttl }}
{{- else if not (kindIs "invalid" $ttl) }}
{{- int64 $ttl }}
{{- end }}
{{- end }}
