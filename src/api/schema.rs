//! Regular expressions shared by the schema and the controller's own checks. They must be RE2
//! (the API server's Go regexp): no look-around, no back-references.

/// ISO 8601 durations in days, hours, minutes and seconds (as Defender's `maxRequestAccessDuration`):
/// `PT1H`, `PT30M`, `P1D`, `P1DT2H`. Not `P`, `PT`, or `P1DT`.
pub const ISO8601_DURATION: &str = r"^P(([0-9]+D)(T(([0-9]+H)([0-9]+M)?([0-9]+S)?|([0-9]+M)([0-9]+S)?|([0-9]+S)))?|T(([0-9]+H)([0-9]+M)?([0-9]+S)?|([0-9]+M)([0-9]+S)?|([0-9]+S)))$";

const IPV4: &str = r"(25[0-5]|2[0-4][0-9]|1[0-9][0-9]|[1-9]?[0-9])(\.(25[0-5]|2[0-4][0-9]|1[0-9][0-9]|[1-9]?[0-9])){3}";
const IPV4_LEN: &str = r"(3[0-2]|[12]?[0-9])";
const IPV6: &str = r"[0-9A-Fa-f]{0,4}(:[0-9A-Fa-f]{0,4}){2,7}";
const IPV6_LEN: &str = r"(12[0-8]|1[01][0-9]|[1-9]?[0-9])";

/// An IPv4/IPv6 address or CIDR, or the words `*` and `Internet` (which a policy must list
/// explicitly for a grant to use them). The controller parses the value properly as well.
pub fn address_prefix_pattern() -> String {
    format!(r"^(\*|Internet|{IPV4}(/{IPV4_LEN})?|{IPV6}(/{IPV6_LEN})?)$")
}

/// A full Azure VM resource ID.
pub const VM_RESOURCE_ID: &str = r"^/subscriptions/[^/]+/resourceGroups/[^/]+/providers/Microsoft\.Compute/virtualMachines/[^/]+$";

/// A VM name (Azure allows 1-64 characters of letters, digits, `_ . -`) or a full VM resource ID.
pub const VM_REFERENCE: &str = r"^([A-Za-z0-9_.-]{1,64}|/subscriptions/[^/]+/resourceGroups/[^/]+/providers/Microsoft\.Compute/virtualMachines/[^/]+)$";

/// A Kubernetes object name (DNS-1123 subdomain).
pub const OBJECT_NAME: &str = r"^[a-z0-9]([-a-z0-9.]{0,251}[a-z0-9])?$";
