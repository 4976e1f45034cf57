//! Defender JSON -> `JitPolicy` manifests.
//!
//! Input shapes: one policy, a JSON array of them (`az security jit-policy list -o json`), a
//! list page `{"value": [...], "nextLink": ...}` (the REST API), or several such documents one
//! after the other. A policy may come as the REST API writes it (`properties.virtualMachines`)
//! or flattened as the Azure CLI prints it (`virtualMachines` beside `id`, plus `resourceGroup`).
//!
//! A `JitPolicySpec` has Defender's per-VM, per-port shape, so each Defender policy becomes one
//! `JitPolicy` with the same VMs and ports, whatever ports each VM has: nothing is split.

use std::collections::{BTreeMap, BTreeSet};

use k8s_openapi::apimachinery::pkg::apis::meta::v1::ObjectMeta;
use serde_json::Value;
use sha2::{Digest, Sha256};

use super::model::{self, JitNetworkAccessPolicy, PolicyId};
use super::{Finding, Severity, annotations, one_line};
use crate::api::{JitPolicy, JitPolicySpec, PolicyPort, PolicyVirtualMachine, Protocol};
use crate::plan::validate::validate_policy;

/// Longest `metadata.name` the import writes: a DNS-1123 label, the strictest Kubernetes name.
pub const MAX_NAME_LEN: usize = 63;

#[derive(Debug, thiserror::Error)]
pub enum ImportError {
    #[error("the input is not JSON: {0}")]
    Json(#[source] serde_json::Error),
    #[error("the input holds no Defender JIT policy")]
    Empty,
    #[error("{at}: not a Defender JIT policy: {why}")]
    NotAPolicy { at: String, why: String },
    #[error("{at}: malformed Defender JIT policy at `{path}`: {message}")]
    Malformed {
        at: String,
        path: String,
        message: String,
    },
    #[error(
        "{policy}: `{field}`: protocol `{value}` is none of TCP, UDP and `*`, the protocols Portcullis serves"
    )]
    Protocol {
        policy: String,
        field: String,
        value: String,
    },
    #[error("{policy}: Portcullis cannot express this policy ({reason}): {message}{hint}")]
    Unexpressible {
        policy: String,
        reason: &'static str,
        message: String,
        hint: &'static str,
    },
    #[error(
        "namespace `{0}` is not a Kubernetes namespace name (lowercase letters, digits and `-`, at most 63)"
    )]
    Namespace(String),
    #[error("rendering YAML: {0}")]
    Yaml(#[from] serde_yaml::Error),
}

/// What the import needs besides the input.
#[derive(Clone, Debug)]
pub struct ImportOptions {
    /// `metadata.namespace` of every manifest.
    pub namespace: String,
}

impl Default for ImportOptions {
    fn default() -> Self {
        ImportOptions {
            namespace: "default".to_string(),
        }
    }
}

/// One Defender policy, imported.
#[derive(Clone, Debug)]
pub struct ImportedPolicy {
    pub manifest: JitPolicy,
    /// Which Defender policy it came from, as findings name it.
    pub source: String,
    pub findings: Vec<Finding>,
}

/// The whole input, imported.
#[derive(Clone, Debug, Default)]
pub struct Imported {
    pub policies: Vec<ImportedPolicy>,
    /// Findings about the input as a whole (a `nextLink`: more pages than given).
    pub findings: Vec<Finding>,
}

impl Imported {
    /// Every finding, the input's first.
    pub fn all_findings(&self) -> impl Iterator<Item = &Finding> {
        self.findings
            .iter()
            .chain(self.policies.iter().flat_map(|p| p.findings.iter()))
    }

    /// The manifests as a multi-document YAML stream, each preceded by comments naming its
    /// source and every finding about it.
    pub fn to_yaml(&self) -> Result<String, ImportError> {
        let mut out = String::new();
        for p in &self.policies {
            out.push_str("---\n");
            out.push_str(&format!(
                "# Imported from Defender for Cloud JIT policy {}\n",
                one_line(&p.source)
            ));
            for f in &p.findings {
                out.push_str(&format!(
                    "# {}: {}: {}\n",
                    f.severity,
                    one_line(&f.field),
                    one_line(&f.message)
                ));
            }
            out.push_str(&serde_yaml::to_string(&p.manifest)?);
        }
        Ok(out)
    }
}

/// Imports every Defender policy in `input` (see the module's documentation for the shapes).
pub fn import(input: &str, options: &ImportOptions) -> Result<Imported, ImportError> {
    if !is_namespace_name(&options.namespace) {
        return Err(ImportError::Namespace(options.namespace.clone()));
    }
    let mut imported = Imported::default();
    let policies = policies_in(input, &mut imported.findings)?;
    if policies.is_empty() {
        return Err(ImportError::Empty);
    }
    let mut used = BTreeSet::new();
    for (at, raw) in policies {
        let policy = decode_policy(&at, raw)?;
        let source = policy
            .id
            .clone()
            .or_else(|| policy.name.clone())
            .unwrap_or(at);
        let MappedPolicy {
            spec,
            annotations,
            findings,
        } = import_policy(&policy, &source)?;
        let name = kubernetes_name(&name_base(&policy, &spec), &mut used);
        let mut manifest = JitPolicy::new(&name, spec);
        manifest.metadata = ObjectMeta {
            name: Some(name),
            namespace: Some(options.namespace.clone()),
            annotations: (!annotations.is_empty()).then_some(annotations),
            ..Default::default()
        };
        imported.policies.push(ImportedPolicy {
            manifest,
            source,
            findings,
        });
    }
    Ok(imported)
}

/// The policy objects in the input, each with where it sits (`value[1]`, `document 2: [0]`).
fn policies_in(
    input: &str,
    findings: &mut Vec<Finding>,
) -> Result<Vec<(String, Value)>, ImportError> {
    let input = input.strip_prefix('\u{feff}').unwrap_or(input);
    let documents: Vec<Value> = serde_json::Deserializer::from_str(input)
        .into_iter::<Value>()
        .collect::<Result<_, _>>()
        .map_err(ImportError::Json)?;
    let many = documents.len() > 1;
    let mut out = Vec::new();
    for (d, doc) in documents.into_iter().enumerate() {
        let prefix = if many {
            format!("document {}: ", d + 1)
        } else {
            String::new()
        };
        match doc {
            Value::Array(items) => {
                for (i, item) in items.into_iter().enumerate() {
                    out.push((format!("{prefix}[{i}]"), item));
                }
            }
            Value::Object(mut map) if map.get("value").is_some_and(Value::is_array) => {
                if let Some(next) = map.get("nextLink").and_then(Value::as_str) {
                    findings.push(Finding::new(
                        Severity::NotCarried,
                        &format!("{prefix}list page"),
                        "nextLink",
                        format!(
                            "the list has more pages ({}); only the policies on this page are imported: fetch the others (`az security jit-policy list` follows the links) and import them too",
                            one_line(next)
                        ),
                    ));
                }
                for key in map.keys().filter(|k| *k != "value" && *k != "nextLink") {
                    findings.push(Finding::new(
                        Severity::NotCarried,
                        &format!("{prefix}list page"),
                        key.clone(),
                        "not a field of a Defender policy list; ignored",
                    ));
                }
                if let Some(Value::Array(items)) = map.remove("value") {
                    for (i, item) in items.into_iter().enumerate() {
                        out.push((format!("{prefix}value[{i}]"), item));
                    }
                }
            }
            other => out.push((format!("{prefix}policy"), other)),
        }
    }
    Ok(out)
}

/// One policy object, in either shape, decoded per the spec.
fn decode_policy(at: &str, raw: Value) -> Result<JitNetworkAccessPolicy, ImportError> {
    let not_a_policy = |why: &str| ImportError::NotAPolicy {
        at: at.to_string(),
        why: why.to_string(),
    };
    let Value::Object(mut map) = raw else {
        return Err(not_a_policy("expected a JSON object"));
    };
    if !map.contains_key("properties") {
        if !map.contains_key("virtualMachines") {
            return Err(not_a_policy(
                "it has neither `properties.virtualMachines` (REST API) nor `virtualMachines` (Azure CLI)",
            ));
        }
        // An initiate request (and the request it answers with) also lists `virtualMachines`,
        // with ports that carry `endTimeUtc` instead of a protocol and a maximum duration.
        if ["requestor", "startTimeUtc", "justification"]
            .iter()
            .any(|k| map.contains_key(*k))
        {
            return Err(not_a_policy(
                "it looks like a JIT access request (`initiate`), not a policy",
            ));
        }
        // The Azure CLI prints the policy flattened: move the properties back where the spec has them.
        let mut properties = serde_json::Map::new();
        for key in ["virtualMachines", "requests", "provisioningState"] {
            if let Some(v) = map.remove(key) {
                properties.insert(key.to_string(), v);
            }
        }
        map.insert("properties".to_string(), Value::Object(properties));
    }
    serde_path_to_error::deserialize::<_, JitNetworkAccessPolicy>(Value::Object(map)).map_err(|e| {
        ImportError::Malformed {
            at: at.to_string(),
            path: e.path().to_string(),
            message: e.inner().to_string(),
        }
    })
}

/// One Defender policy mapped onto a spec, before it gets a name.
#[derive(Clone, Debug)]
pub struct MappedPolicy {
    pub spec: JitPolicySpec,
    /// The annotations to put on the manifest (see [`annotations`]).
    pub annotations: BTreeMap<String, String>,
    pub findings: Vec<Finding>,
}

/// Maps one decoded Defender policy onto a spec; `source` names it in findings and errors.
pub fn import_policy(
    policy: &JitNetworkAccessPolicy,
    source: &str,
) -> Result<MappedPolicy, ImportError> {
    let mut findings = Vec::new();
    let mut notes = Vec::new();
    let mut ann = BTreeMap::new();
    let note = |findings: &mut Vec<Finding>, field: &str, message: String| {
        findings.push(Finding::new(Severity::Note, source, field, message));
    };
    let not_carried = |findings: &mut Vec<Finding>, field: String, message: String| {
        findings.push(Finding::new(Severity::NotCarried, source, field, message));
    };

    // Resource fields: identity, kept for the export.
    if let Some(id) = &policy.id {
        ann.insert(annotations::ID.to_string(), id.clone());
        notes.push("id");
        if PolicyId::parse(id).is_none() {
            note(
                &mut findings,
                "id",
                "not a jitNetworkAccessPolicies resource id; kept as is".to_string(),
            );
        }
    }
    let parsed_id = policy.id.as_deref().and_then(PolicyId::parse);
    if let Some(name) = &policy.name {
        if parsed_id.as_ref().is_none_or(|p| &p.name != name) {
            ann.insert(annotations::NAME.to_string(), name.clone());
        }
        notes.push("name");
    }
    if let Some(location) = &policy.location {
        if parsed_id
            .as_ref()
            .is_none_or(|p| !p.location.eq_ignore_ascii_case(location))
        {
            ann.insert(annotations::LOCATION.to_string(), location.clone());
        }
        notes.push("location");
    }
    if let Some(kind) = &policy.kind {
        ann.insert(annotations::KIND.to_string(), kind.clone());
        notes.push("kind");
    }
    if let Some(t) = &policy.type_ {
        if t.eq_ignore_ascii_case(model::RESOURCE_TYPE) {
            notes.push("type");
        } else {
            not_carried(
                &mut findings,
                "type".to_string(),
                format!("`{}` is not {}; ignored", one_line(t), model::RESOURCE_TYPE),
            );
        }
    }
    if !notes.is_empty() {
        note(
            &mut findings,
            &notes.join(", "),
            "resource identity, kept as portcullis.dev/defender-* annotations for `portcullis export defender`".to_string(),
        );
    }
    for (key, value) in &policy.extra {
        if key == "resourceGroup" {
            // The Azure CLI adds it; the id says the same.
            note(
                &mut findings,
                key,
                format!(
                    "`{}` (added by the Azure CLI): the resource group of the policy, also in its id; not carried",
                    one_line(&value.to_string())
                ),
            );
        } else {
            not_carried(
                &mut findings,
                key.clone(),
                "not a field of a Defender JIT policy (2020-01-01); ignored".to_string(),
            );
        }
    }
    let props = &policy.properties;
    for key in props.extra.keys() {
        not_carried(
            &mut findings,
            format!("properties.{key}"),
            "not a field of a Defender JIT policy (2020-01-01); ignored".to_string(),
        );
    }
    if let Some(state) = &props.provisioning_state {
        note(
            &mut findings,
            "properties.provisioningState",
            format!(
                "`{}`: Defender's read-only state, not carried (the JitPolicy's status says whether the operator enforces it)",
                one_line(state)
            ),
        );
    }
    if let Some(requests) = props.requests.as_ref().filter(|r| !r.is_empty()) {
        let open: Vec<String> = requests
            .iter()
            .flat_map(|r| {
                r.virtual_machines.iter().flat_map(move |vm| {
                    vm.ports
                        .iter()
                        .filter(|p| {
                            p.status.eq_ignore_ascii_case("Initiated")
                                || p.status.eq_ignore_ascii_case("Initiating")
                        })
                        .map(move |p| {
                            format!(
                                "{} port {} for {} until {}",
                                crate::plan::validate::vm_name(&vm.id),
                                p.number,
                                r.requestor,
                                p.end_time_utc
                            )
                        })
                })
            })
            .map(|s| one_line(&s))
            .collect();
        let mut message = format!(
            "{} access request(s) recorded by Defender are not imported: they are Defender's history (requestor, justification, times, status, Azure Firewall mappedPort); in Portcullis a request is an AccessGrant",
            requests.len()
        );
        if !open.is_empty() {
            message.push_str(&format!(
                "; still open in Defender's record: {} (Defender, not Portcullis, closes those)",
                open.join("; ")
            ));
        }
        not_carried(&mut findings, "properties.requests".to_string(), message);
    }

    let mut public_ips = BTreeMap::new();
    let mut vms = Vec::with_capacity(props.virtual_machines.len());
    for (v, vm) in props.virtual_machines.iter().enumerate() {
        let vm_at = format!("properties.virtualMachines[{v}]");
        if let Some(ip) = &vm.public_ip_address {
            public_ips.insert(vm.id.clone(), ip.clone());
            not_carried(
                &mut findings,
                format!("{vm_at}.publicIpAddress"),
                format!(
                    "`{}`: access through an Azure Firewall (DNAT) is not served: Portcullis opens NSG rules to the VM's private addresses only; kept in the annotation {} for the export",
                    one_line(ip),
                    annotations::PUBLIC_IP_ADDRESSES
                ),
            );
        }
        for key in vm.extra.keys() {
            not_carried(
                &mut findings,
                format!("{vm_at}.{key}"),
                "not a field of a Defender JIT policy (2020-01-01); ignored".to_string(),
            );
        }
        let mut ports = Vec::with_capacity(vm.ports.len());
        for (p, port) in vm.ports.iter().enumerate() {
            let port_at = format!("{vm_at}.ports[{p}]");
            for key in port.extra.keys() {
                not_carried(
                    &mut findings,
                    format!("{port_at}.{key}"),
                    "not a field of a Defender JIT policy (2020-01-01); ignored".to_string(),
                );
            }
            let protocol = match port.protocol.as_str() {
                "TCP" => Protocol::Tcp,
                "UDP" => Protocol::Udp,
                "*" => Protocol::Any,
                other => {
                    let p = match other.to_ascii_uppercase().as_str() {
                        "TCP" => Protocol::Tcp,
                        "UDP" => Protocol::Udp,
                        _ => {
                            return Err(ImportError::Protocol {
                                policy: source.to_string(),
                                field: format!("{port_at}.protocol"),
                                value: one_line(other),
                            });
                        }
                    };
                    note(
                        &mut findings,
                        &format!("{port_at}.protocol"),
                        format!(
                            "`{}` written as {}",
                            one_line(other),
                            crate::plan::validate::protocol_str(p)
                        ),
                    );
                    p
                }
            };
            let plural = port
                .allowed_source_address_prefixes
                .clone()
                .unwrap_or_default();
            let (singular, plural) = match (&port.allowed_source_address_prefix, plural) {
                (Some(s), plural) if !plural.is_empty() => {
                    // Defender calls the two forms mutually exclusive; Portcullis refuses both
                    // at once. Their union is what either form alone would allow.
                    note(
                        &mut findings,
                        &format!("{port_at}.allowedSourceAddressPrefix"),
                        "set together with allowedSourceAddressPrefixes (the spec makes them mutually exclusive): merged into allowedSourceAddressPrefixes".to_string(),
                    );
                    let mut all = vec![s.clone()];
                    all.extend(plural.into_iter().filter(|p| p != s));
                    (None, all)
                }
                (s, plural) => (s.clone(), plural),
            };
            ports.push(PolicyPort {
                number: port.number,
                protocol,
                allowed_source_address_prefix: singular,
                allowed_source_address_prefixes: plural,
                max_request_access_duration: port.max_request_access_duration.clone(),
                approval: None,
            });
        }
        vms.push(PolicyVirtualMachine {
            id: vm.id.clone(),
            ports,
        });
    }
    if !public_ips.is_empty() {
        // A JSON object of strings cannot fail to serialise.
        ann.insert(
            annotations::PUBLIC_IP_ADDRESSES.to_string(),
            serde_json::to_string(&public_ips).unwrap_or_default(),
        );
    }
    let spec = JitPolicySpec {
        virtual_machines: vms,
        requesters: None,
        approval: None,
        notifications: None,
    };
    if let Err(denial) = validate_policy(&spec) {
        use crate::plan::validate::DenialReason as R;
        let hint = match denial.reason {
            R::NoAllowedSource => {
                " (Defender's portal writes allowedSourceAddressPrefix \"*\" for \"per request\"; Portcullis wants the allowed sources spelled out)"
            }
            R::InvalidMaxRequestAccessDuration => {
                " (Portcullis takes days, hours, minutes and seconds, at most P1D, as Defender)"
            }
            _ => "",
        };
        return Err(ImportError::Unexpressible {
            policy: source.to_string(),
            reason: denial.reason.as_str(),
            message: denial.message,
            hint,
        });
    }
    let not_carried_fields: Vec<&str> = findings
        .iter()
        .filter(|f| f.severity == Severity::NotCarried)
        .map(|f| f.field.as_str())
        .collect();
    if !not_carried_fields.is_empty() {
        ann.insert(
            annotations::NOT_CARRIED.to_string(),
            not_carried_fields.join(", "),
        );
    }
    Ok(MappedPolicy {
        spec,
        annotations: ann,
        findings,
    })
}

/// What the Kubernetes name is made from: the resource group and name from the policy id
/// (Defender names most policies `default`, one per resource group and location), else the
/// name, else the first VM's resource group.
fn name_base(policy: &JitNetworkAccessPolicy, spec: &JitPolicySpec) -> String {
    if let Some(id) = policy.id.as_deref().and_then(PolicyId::parse) {
        return format!("{}-{}", id.resource_group, id.name);
    }
    if let Some(name) = policy.name.as_deref().filter(|n| !n.is_empty()) {
        return name.to_string();
    }
    spec.virtual_machines
        .first()
        .and_then(|vm| model::vm_subscription_and_group(&vm.id))
        .map(|(_, rg)| format!("{rg}-jit"))
        .unwrap_or_else(|| "defender-jit".to_string())
}

/// A DNS-1123 label made from `base`: lowercased, every other character a `-`, at most
/// [`MAX_NAME_LEN`] (a long one truncated and suffixed with a hash of `base`, so it stays
/// distinct and stable), and not yet in `used` (a taken one gets a hash of `base` and a
/// counter). The name is added to `used`.
pub fn kubernetes_name(base: &str, used: &mut BTreeSet<String>) -> String {
    let mut clean = String::with_capacity(base.len());
    for c in base.chars() {
        let c = c.to_ascii_lowercase();
        if c.is_ascii_lowercase() || c.is_ascii_digit() {
            clean.push(c);
        } else if !clean.ends_with('-') {
            clean.push('-');
        }
    }
    let clean = clean.trim_matches('-');
    let clean = if clean.is_empty() {
        "defender-jit"
    } else {
        clean
    };
    let with_hash = |salt: &str| {
        let digest = Sha256::digest(format!("{base}{salt}").as_bytes());
        let hash: String = digest.iter().take(3).map(|b| format!("{b:02x}")).collect();
        let keep = MAX_NAME_LEN - hash.len() - 1;
        let stem: String = clean.chars().take(keep).collect();
        format!("{}-{hash}", stem.trim_end_matches('-'))
    };
    let mut name = if clean.len() > MAX_NAME_LEN {
        with_hash("")
    } else {
        clean.to_string()
    };
    let mut n = 1;
    while used.contains(&name) {
        n += 1;
        name = with_hash(&format!("#{n}"));
    }
    used.insert(name.clone());
    name
}

fn is_namespace_name(s: &str) -> bool {
    let b = s.as_bytes();
    !b.is_empty()
        && b.len() <= 63
        && b.iter()
            .all(|c| c.is_ascii_lowercase() || c.is_ascii_digit() || *c == b'-')
        && b[0] != b'-'
        && b[b.len() - 1] != b'-'
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn names_are_dns_labels_stable_and_unique() {
        let mut used = BTreeSet::new();
        assert_eq!(kubernetes_name("myRg1-default", &mut used), "myrg1-default");
        let again = kubernetes_name("myRg1-default", &mut used);
        assert_ne!(again, "myrg1-default", "a second one gets a suffix");
        assert!(again.starts_with("myrg1-default-"), "{again}");
        assert_eq!(
            kubernetes_name("Rg_(x).Y--default", &mut used),
            "rg-x-y-default"
        );
        assert_eq!(kubernetes_name("__", &mut used), "defender-jit");
        let long = "a".repeat(90);
        let a = kubernetes_name(&long, &mut BTreeSet::new());
        let b = kubernetes_name(&long, &mut BTreeSet::new());
        assert_eq!(a, b, "stable");
        assert_eq!(a.len(), MAX_NAME_LEN);
        let other = kubernetes_name(&format!("{long}b"), &mut BTreeSet::new());
        assert_ne!(a, other, "distinct long names stay distinct");
        for n in [a, other, again] {
            assert!(is_namespace_name(&n), "{n} is a DNS-1123 label");
        }
    }

    #[test]
    fn bad_namespace_is_refused() {
        let err = import(
            "{}",
            &ImportOptions {
                namespace: "Team_A".into(),
            },
        )
        .expect_err("refused");
        assert!(matches!(err, ImportError::Namespace(_)), "{err}");
    }
}
