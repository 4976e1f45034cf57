//! Defender for Cloud's just-in-time policies (`jitNetworkAccessPolicies`) to and from
//! `JitPolicy` manifests: `portcullis import defender` and `portcullis export defender`.
//! Pure: text in, manifests or JSON and a report out. What Portcullis cannot serve is never
//! dropped unseen: it becomes a [`Finding`], printed by the CLI and written into the manifest as
//! a YAML comment and annotation.

pub mod export;
pub mod import;
pub mod model;

use std::fmt;

pub use export::{ExportError, Exported, ExportedPolicy, export, export_policy};
pub use import::{
    ImportError, ImportOptions, Imported, ImportedPolicy, MappedPolicy, import, import_policy,
};

/// Annotations an import writes and an export reads back.
pub mod annotations {
    /// The Defender policy's resource id: the export's PUT target.
    pub const ID: &str = "portcullis.dev/defender-id";
    /// The Defender policy's name, when there was no id.
    pub const NAME: &str = "portcullis.dev/defender-name";
    /// Its `kind` (`Basic`).
    pub const KIND: &str = "portcullis.dev/defender-kind";
    /// Its `location`, when there was no id.
    pub const LOCATION: &str = "portcullis.dev/defender-location";
    /// `publicIpAddress` per VM, a JSON object from VM id to address: not served, kept for the
    /// export.
    pub const PUBLIC_IP_ADDRESSES: &str = "portcullis.dev/defender-public-ip-addresses";
    /// The Defender fields the import did not carry into the spec, comma-separated.
    pub const NOT_CARRIED: &str = "portcullis.dev/defender-not-carried";
}

/// How much a finding matters.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord)]
pub enum Severity {
    /// Kept outside the spec (an annotation) or read-only state: nothing a grant depends on.
    Note,
    /// Something the source says that the result does not do.
    NotCarried,
}

impl fmt::Display for Severity {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            Severity::Note => "note",
            Severity::NotCarried => "NOT CARRIED",
        })
    }
}

/// One line of the report: a field of one policy and what became of it.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Finding {
    pub severity: Severity,
    /// Which policy (its Defender id or name, or where it sits in the input).
    pub policy: String,
    /// The field, as a JSON path inside that policy (`properties.virtualMachines[0].publicIpAddress`).
    pub field: String,
    pub message: String,
}

impl Finding {
    pub(crate) fn new(
        severity: Severity,
        policy: &str,
        field: impl Into<String>,
        message: impl Into<String>,
    ) -> Finding {
        Finding {
            severity,
            policy: policy.to_string(),
            field: field.into(),
            message: message.into(),
        }
    }
}

impl fmt::Display for Finding {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "{}: {}: {}: {}",
            self.severity, self.policy, self.field, self.message
        )
    }
}

/// Text from the input, safe for a one-line report or a YAML comment: control characters (a
/// newline would end the comment and inject YAML) are escaped.
pub(crate) fn one_line(s: &str) -> String {
    s.chars()
        .flat_map(|c| {
            if c.is_control() || c == '\u{2028}' || c == '\u{2029}' {
                c.escape_default().collect::<Vec<_>>()
            } else {
                vec![c]
            }
        })
        .collect()
}

#[cfg(test)]
mod tests;
