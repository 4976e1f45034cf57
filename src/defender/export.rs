//! `JitPolicy` manifests -> Defender JSON: the PUT body of
//! `.../providers/Microsoft.Security/locations/{location}/jitNetworkAccessPolicies/{name}`
//! (api-version 2020-01-01), `kind` and `properties` only (the rest is read-only).

use std::collections::BTreeMap;

use kube::ResourceExt;
use serde::Deserialize;

use super::model::{
    self, JitNetworkAccessPolicy, JitNetworkAccessPolicyProperties,
    JitNetworkAccessPolicyVirtualMachine, JitNetworkAccessPortRule, PolicyId,
};
use super::{Finding, Severity, annotations};
use crate::api::{JitPolicy, JitPolicySpec};
use crate::plan::validate::{protocol_str, validate_policy};

/// Defender's shortest `maxRequestAccessDuration`.
const DEFENDER_MIN_DURATION: std::time::Duration = std::time::Duration::from_secs(300);

#[derive(Debug, thiserror::Error)]
pub enum ExportError {
    #[error("document {document}: not YAML: {source}")]
    Yaml {
        document: usize,
        #[source]
        source: serde_yaml::Error,
    },
    #[error("document {document}: not a JitPolicy manifest: {source}")]
    Manifest {
        document: usize,
        #[source]
        source: serde_yaml::Error,
    },
    #[error("the input holds no JitPolicy manifest")]
    Empty,
    #[error("JitPolicy {name}: invalid ({reason}): {message}")]
    Invalid {
        name: String,
        reason: &'static str,
        message: String,
    },
    #[error("rendering JSON: {0}")]
    Json(#[from] serde_json::Error),
}

/// One JitPolicy, exported.
#[derive(Clone, Debug)]
pub struct ExportedPolicy {
    /// `namespace/name` of the manifest.
    pub source: String,
    /// The ARM path to PUT the body to (`<location>` where the manifest does not say).
    pub target: String,
    pub body: JitNetworkAccessPolicy,
    pub findings: Vec<Finding>,
}

#[derive(Clone, Debug, Default)]
pub struct Exported {
    pub policies: Vec<ExportedPolicy>,
    /// Findings about the input as a whole (documents of other kinds, skipped).
    pub findings: Vec<Finding>,
}

impl Exported {
    pub fn all_findings(&self) -> impl Iterator<Item = &Finding> {
        self.findings
            .iter()
            .chain(self.policies.iter().flat_map(|p| p.findings.iter()))
    }

    /// One PUT body as a JSON object; several as a JSON array of them, in input order.
    pub fn to_json(&self) -> Result<String, ExportError> {
        let text = match self.policies.as_slice() {
            [one] => serde_json::to_string_pretty(&one.body)?,
            many => {
                serde_json::to_string_pretty(&many.iter().map(|p| &p.body).collect::<Vec<_>>())?
            }
        };
        Ok(text + "\n")
    }
}

/// Exports every JitPolicy in a YAML stream (documents of other kinds are skipped and reported;
/// a `kind: List`, as `kubectl get -o yaml` prints, is read item by item).
pub fn export(input: &str) -> Result<Exported, ExportError> {
    let mut out = Exported::default();
    for (i, doc) in serde_yaml::Deserializer::from_str(input).enumerate() {
        let document = i + 1;
        let value = serde_yaml::Value::deserialize(doc)
            .map_err(|source| ExportError::Yaml { document, source })?;
        let items = match value {
            serde_yaml::Value::Null => continue,
            serde_yaml::Value::Mapping(ref m)
                if m.get("kind").and_then(serde_yaml::Value::as_str) == Some("List") =>
            {
                match m.get("items") {
                    Some(serde_yaml::Value::Sequence(items)) => items.clone(),
                    _ => Vec::new(),
                }
            }
            other => vec![other],
        };
        for item in items {
            let kind = item.get("kind").and_then(serde_yaml::Value::as_str);
            let api_version = item.get("apiVersion").and_then(serde_yaml::Value::as_str);
            if kind != Some("JitPolicy") || api_version != Some("portcullis.dev/v1alpha1") {
                out.findings.push(Finding::new(
                    Severity::Note,
                    &format!("document {document}"),
                    "kind",
                    format!(
                        "{} {}: not a portcullis.dev/v1alpha1 JitPolicy; skipped",
                        api_version.unwrap_or("(no apiVersion)"),
                        kind.unwrap_or("(no kind)")
                    ),
                ));
                continue;
            }
            let policy: JitPolicy = serde_yaml::from_value(item)
                .map_err(|source| ExportError::Manifest { document, source })?;
            out.policies.push(export_manifest(&policy)?);
        }
    }
    if out.policies.is_empty() {
        return Err(ExportError::Empty);
    }
    Ok(out)
}

fn export_manifest(policy: &JitPolicy) -> Result<ExportedPolicy, ExportError> {
    let source = match policy.namespace() {
        Some(ns) => format!("{ns}/{}", policy.name_any()),
        None => policy.name_any(),
    };
    validate_policy(&policy.spec).map_err(|d| ExportError::Invalid {
        name: source.clone(),
        reason: d.reason.as_str(),
        message: d.message,
    })?;
    let (body, findings) = export_policy(&policy.spec, policy.annotations(), &source);
    Ok(ExportedPolicy {
        target: target(policy, &body),
        source,
        body,
        findings,
    })
}

/// Maps a spec (and the annotations an import left) onto a Defender PUT body; `source` names it
/// in findings.
pub fn export_policy(
    spec: &JitPolicySpec,
    annotations: &BTreeMap<String, String>,
    source: &str,
) -> (JitNetworkAccessPolicy, Vec<Finding>) {
    let mut findings = Vec::new();
    let mut not_carried = |field: String, message: String| {
        findings.push(Finding::new(Severity::NotCarried, source, field, message));
    };
    if spec.requesters.is_some() {
        not_carried(
            "spec.requesters".into(),
            "Defender has no list of requesters: whoever holds Defender's initiate permission on the VM may request".into(),
        );
    }
    if spec.approval.is_some() {
        not_carried(
            "spec.approval".into(),
            "Defender has no approvals: a request opens at once".into(),
        );
    }
    if spec.notifications.is_some() {
        not_carried(
            "spec.notifications".into(),
            "Defender has no notification targets of its own (use Azure Monitor alerts on its activity log)".into(),
        );
    }
    let public_ips: BTreeMap<String, String> = annotations
        .get(annotations::PUBLIC_IP_ADDRESSES)
        .and_then(|s| serde_json::from_str(s).ok())
        .unwrap_or_default();
    let mut vms = Vec::with_capacity(spec.virtual_machines.len());
    for (v, vm) in spec.virtual_machines.iter().enumerate() {
        let mut ports = Vec::with_capacity(vm.ports.len());
        for (p, port) in vm.ports.iter().enumerate() {
            let at = format!("spec.virtualMachines[{v}].ports[{p}]");
            if port.approval.is_some() {
                not_carried(
                    format!("{at}.approval"),
                    "Defender has no approvals: a request opens at once".into(),
                );
            }
            if crate::api::duration::parse_iso8601(&port.max_request_access_duration)
                .is_ok_and(|d| d < DEFENDER_MIN_DURATION)
            {
                not_carried(
                    format!("{at}.maxRequestAccessDuration"),
                    format!(
                        "{} is under Defender's minimum of 5 minutes: Defender will refuse it",
                        port.max_request_access_duration
                    ),
                );
            }
            ports.push(JitNetworkAccessPortRule {
                number: port.number,
                protocol: protocol_str(port.protocol).to_string(),
                allowed_source_address_prefix: port.allowed_source_address_prefix.clone(),
                allowed_source_address_prefixes: (!port.allowed_source_address_prefixes.is_empty())
                    .then(|| port.allowed_source_address_prefixes.clone()),
                max_request_access_duration: port.max_request_access_duration.clone(),
                extra: BTreeMap::new(),
            });
        }
        let public_ip_address = public_ips
            .iter()
            .find(|(id, _)| id.eq_ignore_ascii_case(&vm.id))
            .map(|(_, ip)| ip.clone());
        vms.push(JitNetworkAccessPolicyVirtualMachine {
            id: vm.id.clone(),
            ports,
            public_ip_address,
            extra: BTreeMap::new(),
        });
    }
    let groups: std::collections::BTreeSet<String> = spec
        .virtual_machines
        .iter()
        .filter_map(|vm| model::vm_subscription_and_group(&vm.id))
        .map(|(s, rg)| format!("{s}/{rg}").to_ascii_lowercase())
        .collect();
    if groups.len() > 1 {
        not_carried(
            "spec.virtualMachines".into(),
            format!(
                "the VMs are in {} resource groups; a Defender policy governs the VMs of its own resource group: split the body per resource group before the PUT",
                groups.len()
            ),
        );
    }
    let body = JitNetworkAccessPolicy {
        kind: Some(
            annotations
                .get(annotations::KIND)
                .cloned()
                .unwrap_or_else(|| "Basic".to_string()),
        ),
        properties: JitNetworkAccessPolicyProperties {
            virtual_machines: vms,
            ..Default::default()
        },
        ..Default::default()
    };
    (body, findings)
}

/// Where the body goes: the id an import recorded, else one built from the first VM's
/// subscription and resource group, the recorded location and name (or the manifest's name).
fn target(policy: &JitPolicy, body: &JitNetworkAccessPolicy) -> String {
    let ann = policy.annotations();
    let path = match ann.get(annotations::ID).and_then(|id| PolicyId::parse(id)) {
        Some(id) => id.path(),
        None => {
            let (sub, rg) = body
                .properties
                .virtual_machines
                .first()
                .and_then(|vm| model::vm_subscription_and_group(&vm.id))
                .unwrap_or(("<subscription>", "<resource-group>"));
            PolicyId {
                subscription: sub.to_string(),
                resource_group: rg.to_string(),
                location: ann
                    .get(annotations::LOCATION)
                    .cloned()
                    .unwrap_or_else(|| "<location>".to_string()),
                name: ann
                    .get(annotations::NAME)
                    .cloned()
                    .unwrap_or_else(|| policy.name_any()),
            }
            .path()
        }
    };
    format!("{path}?api-version={}", model::API_VERSION)
}
