//! Regular expressions shared by the schema and the controller's own checks. They must be RE2
//! (the API server's Go regexp): no look-around, no back-references.

/// ISO 8601 durations in days, hours, minutes and seconds (as Defender's `maxRequestAccessDuration`):
/// `PT1H`, `PT30M`, `P1D`, `P1DT2H`. Not `P`, `PT`, or `P1DT`.
pub const ISO8601_DURATION: &str = r"^P(([0-9]+D)(T(([0-9]+H)([0-9]+M)?([0-9]+S)?|([0-9]+M)([0-9]+S)?|([0-9]+S)))?|T(([0-9]+H)([0-9]+M)?([0-9]+S)?|([0-9]+M)([0-9]+S)?|([0-9]+S)))$";

const IPV4: &str = r"(25[0-5]|2[0-4][0-9]|1[0-9][0-9]|[1-9]?[0-9])(\.(25[0-5]|2[0-4][0-9]|1[0-9][0-9]|[1-9]?[0-9])){3}";
const IPV4_LEN: &str = r"(3[0-2]|[12]?[0-9])";
// Up to 8 colons: `::1:2:3:4:5:6:7` is a valid address with 8.
const IPV6: &str = r"[0-9A-Fa-f]{0,4}(:[0-9A-Fa-f]{0,4}){2,8}";
const IPV6_LEN: &str = r"(12[0-8]|1[01][0-9]|[1-9]?[0-9])";

/// An IPv4/IPv6 address or CIDR, or the words `*` and `Internet` (which a policy must list
/// explicitly for a grant to use them). The controller parses the value properly as well.
pub fn address_prefix_pattern() -> String {
    format!(r"^(\*|Internet|{IPV4}(/{IPV4_LEN})?|{IPV6}(/{IPV6_LEN})?)$")
}

/// A full Azure VM resource ID. Each segment is limited to the characters Azure allows in it
/// (ASCII only), so no value can carry `?`, `#`, `%`, spaces or control characters into an ARM
/// URL, and a name never ends with a period (which also rules out `.` and `..`). Subscription:
/// letters, digits, `-` (a GUID in practice); resource group: 1-90 of letters, digits, `_ . ( ) -`;
/// VM: 1-64 of letters, digits, `_ . -`. `validate::is_vm_resource_id` checks the same.
pub const VM_RESOURCE_ID: &str = r"^/subscriptions/[0-9A-Za-z-]{1,64}/resourceGroups/[-A-Za-z0-9_.()]{0,89}[-A-Za-z0-9_()]/providers/Microsoft\.Compute/virtualMachines/[A-Za-z0-9_.-]{0,63}[A-Za-z0-9_-]$";

/// A Kubernetes namespace name (DNS-1123 label).
pub const NAMESPACE_NAME: &str = r"^[a-z0-9]([-a-z0-9]{0,61}[a-z0-9])?$";

/// A subscription id, as the subscription segment of [`VM_RESOURCE_ID`].
pub const SUBSCRIPTION_ID: &str = r"^[0-9A-Za-z-]{1,64}$";

/// A resource group id, `/subscriptions/<id>/resourceGroups/<name>`, with the segments of
/// [`VM_RESOURCE_ID`]. `scope::parse_resource_group_id` checks the same.
pub const RESOURCE_GROUP_ID: &str =
    r"^/subscriptions/[0-9A-Za-z-]{1,64}/resourceGroups/[-A-Za-z0-9_.()]{0,89}[-A-Za-z0-9_()]$";

/// A full VM resource ID as [`VM_RESOURCE_ID`], or one whose name is a prefix followed by a
/// single trailing `*` (`.../virtualMachines/web-*`, or `.../virtualMachines/*` for the whole
/// resource group). `scope::parse_vm_pattern` checks the same.
pub const VM_RESOURCE_ID_PATTERN: &str = r"^/subscriptions/[0-9A-Za-z-]{1,64}/resourceGroups/[-A-Za-z0-9_.()]{0,89}[-A-Za-z0-9_()]/providers/Microsoft\.Compute/virtualMachines/([A-Za-z0-9_.-]{0,63}[A-Za-z0-9_-]|[A-Za-z0-9_.-]{0,63}\*)$";

/// A VM name (as in [`VM_RESOURCE_ID`]) or a full VM resource ID.
pub const VM_REFERENCE: &str = r"^([A-Za-z0-9_.-]{0,63}[A-Za-z0-9_-]|/subscriptions/[0-9A-Za-z-]{1,64}/resourceGroups/[-A-Za-z0-9_.()]{0,89}[-A-Za-z0-9_()]/providers/Microsoft\.Compute/virtualMachines/[A-Za-z0-9_.-]{0,63}[A-Za-z0-9_-])$";

/// Free text shown in `kubectl`, Events and logs (`justification`): no C0/C1 control characters
/// (a newline would forge a log line), no Unicode line separators and no bidirectional overrides
/// (which make the displayed text differ from the stored one). `validate::is_display_safe` agrees.
pub const DISPLAY_SAFE_TEXT: &str =
    r"^[^\x00-\x1F\x7F-\x{9F}\x{2028}\x{2029}\x{202A}-\x{202E}\x{2066}-\x{2069}]*$";

/// The longest duration string the schema admits (`P1DT23H59M59S` is 13 characters).
pub const MAX_DURATION_LEN: u32 = 32;

/// A Kubernetes object name (DNS-1123 subdomain).
pub const OBJECT_NAME: &str = r"^[a-z0-9]([-a-z0-9.]{0,251}[a-z0-9])?$";

/// An RFC 3339 date-time that `jiff` (and so `k8s_openapi`'s `Time`) can decode. The API server's
/// `format: date-time` alone is looser (v1.20's strfmt): it splits on any `t`, ignores what
/// follows a second one, takes any character before the fraction, any number of fraction digits
/// and any two-digit offset (`+99:99`). Each of those would make the object undecodable for the
/// operator, so the schema pairs the format with this pattern. Year 9999 is out: a
/// `jiff::Timestamp` ends on 9999-12-30.
pub const RFC3339_DATE_TIME: &str = r"^([0-8][0-9]{3}|9[0-8][0-9]{2}|99[0-8][0-9]|999[0-8])-(0[1-9]|1[0-2])-(0[1-9]|[12][0-9]|3[01])[Tt]([01][0-9]|2[0-3]):[0-5][0-9]:[0-5][0-9](\.[0-9]{1,9})?([Zz]|[+-]([01][0-9]|2[0-3]):[0-5][0-9])$";

/// `status.conditions` as `metav1.Condition`, with [`RFC3339_DATE_TIME`] on
/// `lastTransitionTime` (anyone who may write status could otherwise store a time the operator
/// cannot decode) and bounds on the strings and the list.
pub fn conditions(_: &mut schemars::SchemaGenerator) -> schemars::Schema {
    schemars::json_schema!({
        "description": "The latest observations of the object's state (Ready, with a reason and a message).",
        "type": "array",
        "maxItems": 16,
        "items": {
            "description": "Condition contains details for one aspect of the current state of this API Resource.",
            "type": "object",
            "properties": {
                "lastTransitionTime": {
                    "description": "lastTransitionTime is the last time the condition transitioned from one status to another.",
                    "type": "string",
                    "format": "date-time",
                    "pattern": RFC3339_DATE_TIME,
                },
                "message": { "description": "A human readable message about the transition.", "type": "string", "maxLength": 32768 },
                "observedGeneration": { "description": "The .metadata.generation the condition was set based upon.", "type": "integer", "format": "int64", "minimum": 0 },
                "reason": { "description": "A CamelCase reason for the condition's last transition.", "type": "string", "maxLength": 1024 },
                "status": { "description": "True, False or Unknown.", "type": "string", "enum": ["True", "False", "Unknown"] },
                "type": { "description": "The condition's type, in CamelCase.", "type": "string", "maxLength": 316 },
            },
            "required": ["lastTransitionTime", "message", "reason", "status", "type"],
        },
    })
}

#[cfg(test)]
mod tests {
    //! The schema's patterns against the Rust parsers they stand in front of. Property runs take
    //! `PROPTEST_CASES` (default 256) for longer runs.

    use super::*;
    use crate::api::duration::parse_iso8601;
    use crate::plan::validate::{AddressPrefix, is_display_safe, is_vm_resource_id};
    use k8s_openapi::apimachinery::pkg::apis::meta::v1::Time;
    use proptest::prelude::*;
    use regex_lite::Regex;

    fn re(p: &str) -> Regex {
        Regex::new(p).expect("valid pattern")
    }

    fn decodes_as_time(s: &str) -> bool {
        serde_json::from_value::<Time>(serde_json::Value::String(s.to_string())).is_ok()
    }

    /// `time.Parse("2006-01-02", s)` in Go: four-digit year, two-digit month and day, the day
    /// within its month.
    fn go_full_date(s: &str) -> bool {
        let b = s.as_bytes();
        if b.len() != 10 || b[4] != b'-' || b[7] != b'-' {
            return false;
        }
        let num = |r: std::ops::Range<usize>| -> Option<u32> {
            s.get(r.clone())
                .filter(|t| t.bytes().all(|c| c.is_ascii_digit()))?
                .parse()
                .ok()
        };
        let (Some(y), Some(m), Some(d)) = (num(0..4), num(5..7), num(8..10)) else {
            return false;
        };
        let leap = (y % 4 == 0 && y % 100 != 0) || y % 400 == 0;
        let days = match m {
            1 | 3 | 5 | 7 | 8 | 10 | 12 => 31,
            4 | 6 | 9 | 11 => 30,
            2 if leap => 29,
            2 => 28,
            _ => return false,
        };
        (1..=days).contains(&d)
    }

    /// kube-apiserver v1.20's `format: date-time` check (kube-openapi `strfmt.IsDateTime`),
    /// ported line for line: lower-case, split on every `t`, check only the first two pieces.
    fn apiserver_admits_date_time(s: &str) -> bool {
        if s.len() < 4 {
            return false;
        }
        let lower = s.to_lowercase();
        let parts: Vec<&str> = lower.split('t').collect();
        if parts.len() < 2 || !go_full_date(parts[0]) {
            return false;
        }
        let rx = re(r"^([0-9]{2}):([0-9]{2}):([0-9]{2})(.[0-9]+)?(z|([+-][0-9]{2}:[0-9]{2}))$");
        match rx.captures(parts[1]) {
            Some(c) => &c[1] <= "23" && &c[2] <= "59" && &c[3] <= "59",
            None => false,
        }
    }

    #[test]
    fn date_times_the_api_server_admits_but_the_types_cannot_decode_are_refused_by_the_pattern() {
        let p = re(RFC3339_DATE_TIME);
        for s in [
            "2030-01-01T00:00:00+99:00",
            "2030-01-01T00:00:00+00:99",
            "2030-01-01T00:00:00.1234567890Z",
            "2030-01-01T00:00:00x5Z",
            "2030-01-01T00:00:00ZTrailing",
            "2030-01-01T00:00:00Zt",
            "9999-12-31T23:59:59Z",
        ] {
            assert!(
                apiserver_admits_date_time(s),
                "{s}: admitted by the API server"
            );
            assert!(!decodes_as_time(s), "{s}: jiff refuses it");
            assert!(!p.is_match(s), "{s}: the pattern must refuse it");
        }
        for s in [
            "2030-01-01T00:00:00Z",
            "2030-01-01t00:00:00z",
            "2030-01-01T00:00:00.123456789+14:00",
            "2030-01-01T00:00:00-12:00",
            "0000-01-01T00:00:00Z",
            "9998-12-31T23:59:59Z",
            "2024-02-29T12:00:00Z",
        ] {
            assert!(apiserver_admits_date_time(s), "{s}");
            assert!(p.is_match(s), "{s}: the pattern admits it");
            assert!(decodes_as_time(s), "{s}: decodes");
        }
        // Refused by the API server's format already.
        for s in [
            "2030-01-01 00:00:00Z",
            "2030-01-01T00:00:60Z",
            "2030-02-30T00:00:00Z",
            "2030-01-01T00:00:00",
            "2030-01-01T24:00:00Z",
        ] {
            assert!(!apiserver_admits_date_time(s), "{s}");
        }
    }

    /// Found by `admitted_prefixes_parse_to_a_stable_canonical_form`: `ipnet` parsed a CIDR with a
    /// zero-padded octet or length, which the schema refuses (and some tools read as octal).
    #[test]
    fn regression_zero_padded_cidr_parts_are_refused_like_the_schema() {
        let p = re(&address_prefix_pattern());
        for s in [
            "0.0.0.00/0",
            "10.0.0.01/8",
            "10.0.0.1/08",
            "2001:db8::/032",
            "10.0.0.1/+8",
        ] {
            assert!(!p.is_match(s), "{s}");
            assert_eq!(AddressPrefix::parse(s), None, "{s}");
        }
        // And the schema refused valid addresses with a `::` at either end of eight groups.
        for s in [
            "0.0.0.0/0",
            "10.0.0.1/8",
            "::/0",
            "2001:db8::/32",
            "::1:2:3:4:5:6:7",
            "1:2:3:4:5:6:7::/64",
        ] {
            assert!(p.is_match(s) && AddressPrefix::parse(s).is_some(), "{s}");
        }
    }

    fn arb_apiserverish_date_time() -> impl Strategy<Value = String> {
        let two = |max: u32| (0..=max).prop_map(|n| format!("{n:02}"));
        let frac = proptest::option::of((
            proptest::sample::select(vec![".", ",", "x"]),
            proptest::collection::vec(0u8..10, 0..13),
        ))
        .prop_map(|f| match f {
            None => String::new(),
            Some((sep, digits)) => {
                let d: String = digits.iter().map(|d| char::from(b'0' + d)).collect();
                format!("{sep}{d}")
            }
        });
        let zone = prop_oneof![
            Just("Z".to_string()),
            Just("z".to_string()),
            Just(String::new()),
            (
                proptest::sample::select(vec!['+', '-']),
                two(99),
                two(99),
                any::<bool>()
            )
                .prop_map(|(sign, h, m, colon)| if colon {
                    format!("{sign}{h}:{m}")
                } else {
                    format!("{sign}{h}{m}")
                }),
        ];
        (
            prop_oneof![0u32..=9999, 1990u32..2100],
            two(13),
            two(32),
            proptest::sample::select(vec!["T", "t", " ", "TT"]),
            two(25),
            two(61),
            two(61),
            frac,
            zone,
            proptest::sample::select(vec!["", "", "", "t", "Tjunk", "T00:00:00Z"]),
        )
            .prop_map(|(y, mo, d, sep, h, mi, s, frac, zone, suffix)| {
                format!("{y:04}-{mo}-{d}{sep}{h}:{mi}:{s}{frac}{zone}{suffix}")
            })
    }

    proptest! {
        /// Every date-time that passes both the API server's format and the schema's pattern
        /// decodes as `Time`, so no admitted `notAfter`/`expiresAt`/`activatedAt`/
        /// `lastTransitionTime` can stop the operator.
        #[test]
        fn admitted_date_times_decode(s in arb_apiserverish_date_time()) {
            let p = re(RFC3339_DATE_TIME);
            if apiserver_admits_date_time(&s) && p.is_match(&s) {
                prop_assert!(decodes_as_time(&s), "{} is admitted but does not decode", s);
            }
        }

        /// The duration pattern and parser agree: whatever parses matches the pattern; what the
        /// pattern admits and the parser refuses is only an overflow (then `InvalidDuration`).
        #[test]
        fn duration_pattern_and_parser_agree(
            s in "P[0-9DTHMSW.,-]{0,12}|P([0-9]{1,22}D)?(T([0-9]{1,22}H)?([0-9]{1,22}M)?([0-9]{1,22}S)?)?"
        ) {
            let p = re(ISO8601_DURATION);
            match parse_iso8601(&s) {
                Ok(_) => prop_assert!(p.is_match(&s), "{} parses but the pattern refuses it", s),
                Err(e) => prop_assert!(!p.is_match(&s) || e.why.contains("too large"), "{}: {}", s, e),
            }
        }

        #[test]
        fn vm_id_pattern_and_check_agree(
            sub in "[0-9a-f-]{0,66}|[a-z ?#%/.]{1,4}",
            rg in "[-A-Za-z0-9_.()]{0,92}|[a-z ?#%.é\\x00]{1,4}",
            name in "[-A-Za-z0-9_.]{0,66}|[a-z ?#%.é\\n]{1,4}|\\.\\.?",
            provider in proptest::sample::select(vec!["Microsoft.Compute", "microsoft.compute", "Microsoft.Network"]),
        ) {
            let id = format!("/subscriptions/{sub}/resourceGroups/{rg}/providers/{provider}/virtualMachines/{name}");
            let by_pattern = re(VM_RESOURCE_ID).is_match(&id) && id.chars().count() <= 512;
            prop_assert_eq!(by_pattern, is_vm_resource_id(&id), "{:?}", id);
            if by_pattern {
                prop_assert!(re(VM_REFERENCE).is_match(&id));
            }
        }

        #[test]
        fn display_text_pattern_and_check_agree(s in any::<String>()) {
            prop_assert_eq!(re(DISPLAY_SAFE_TEXT).is_match(&s), is_display_safe(&s), "{:?}", s);
        }

        /// Every source the schema admits either parses (and its canonical form parses back to
        /// the same set, host bits cleared) or is refused by the controller; nothing panics.
        #[test]
        fn admitted_prefixes_parse_to_a_stable_canonical_form(
            s in "[0-9]{1,3}\\.[0-9]{1,3}\\.[0-9]{1,3}\\.[0-9]{1,3}(/[0-9]{1,2})?|[0-9a-fA-F:]{2,39}(/[0-9]{1,3})?|\\*|Internet|::|::/0|0\\.0\\.0\\.0/0",
        ) {
            let admitted = re(&address_prefix_pattern()).is_match(&s);
            if let Some(p) = AddressPrefix::parse(&s) {
                let again = AddressPrefix::parse(&p.canonical()).expect("canonical form parses");
                prop_assert!(again.same_set(&p), "{} -> {}", s, p.canonical());
                prop_assert!(p.contains(&p));
                prop_assert!(admitted, "{} parses but the schema refuses it", s);
            }
        }
    }
}
