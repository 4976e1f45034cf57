//! Azure scopes per namespace: which VMs the policies of a namespace may name, from the
//! cluster-scoped `JitScope`s. Pure: the controller passes in what its reflector holds.
//!
//! A namespace that no `JitScope` names may name nothing (closed), unless the operator runs
//! with `--allow-unscoped-namespaces`. Several scopes naming one namespace add up. Azure ids
//! compare case-insensitively, segment by segment, so subscription `1` never matches `12`.

use kube::ResourceExt;
use std::sync::Arc;

use crate::api::{JitPolicy, JitPolicySpec, JitScope};
use crate::plan::validate::split_exact;

/// The scopes the operator knows of, and what a namespace none of them names may do.
#[derive(Clone, Copy, Debug)]
pub struct Scopes<'a> {
    pub scopes: &'a [JitScope],
    /// Open mode: a namespace no scope names may name any VM.
    pub allow_unscoped: bool,
}

/// A VM resource id split into its variable segments.
struct VmId<'a> {
    subscription: &'a str,
    resource_group: &'a str,
    name: &'a str,
}

fn parse_vm_id(id: &str) -> Option<VmId<'_>> {
    match split_exact::<9>(id, '/')? {
        ["", s, subscription, r, resource_group, p, c, v, name]
            if s.eq_ignore_ascii_case("subscriptions")
                && r.eq_ignore_ascii_case("resourceGroups")
                && p.eq_ignore_ascii_case("providers")
                && c.eq_ignore_ascii_case("Microsoft.Compute")
                && v.eq_ignore_ascii_case("virtualMachines")
                && !subscription.is_empty()
                && !resource_group.is_empty()
                && !name.is_empty() =>
        {
            Some(VmId {
                subscription,
                resource_group,
                name,
            })
        }
        _ => None,
    }
}

/// `(subscription, resource group)` of `/subscriptions/<id>/resourceGroups/<name>`.
pub fn parse_resource_group_id(id: &str) -> Option<(&str, &str)> {
    match split_exact::<5>(id, '/')? {
        ["", s, subscription, r, resource_group]
            if s.eq_ignore_ascii_case("subscriptions")
                && r.eq_ignore_ascii_case("resourceGroups")
                && !subscription.is_empty()
                && !resource_group.is_empty() =>
        {
            Some((subscription, resource_group))
        }
        _ => None,
    }
}

/// Whether `vm_id` matches a VM pattern: a full VM id, or one whose name ends in `*` (a prefix
/// of the name). The `*` is a wildcard only as the last character of the name; anywhere else
/// the pattern matches nothing.
fn matches_vm_pattern(pattern: &str, vm: &VmId<'_>) -> bool {
    let Some(p) = parse_vm_id(pattern) else {
        return false;
    };
    if !p.subscription.eq_ignore_ascii_case(vm.subscription)
        || !p.resource_group.eq_ignore_ascii_case(vm.resource_group)
    {
        return false;
    }
    match p.name.strip_suffix('*') {
        Some(prefix) if !prefix.contains('*') => {
            vm.name.len() >= prefix.len()
                && vm.name.as_bytes()[..prefix.len()].eq_ignore_ascii_case(prefix.as_bytes())
        }
        Some(_) => false,
        None => !p.name.contains('*') && p.name.eq_ignore_ascii_case(vm.name),
    }
}

/// Whether one scope covers `vm_id` (regardless of its namespaces).
fn covers(scope: &JitScope, vm: &VmId<'_>) -> bool {
    let spec = &scope.spec;
    spec.subscriptions
        .iter()
        .any(|s| s.eq_ignore_ascii_case(vm.subscription))
        || spec.resource_groups.iter().any(|rg| {
            parse_resource_group_id(rg).is_some_and(|(s, g)| {
                s.eq_ignore_ascii_case(vm.subscription) && g.eq_ignore_ascii_case(vm.resource_group)
            })
        })
        || spec
            .virtual_machines
            .iter()
            .any(|p| matches_vm_pattern(p, vm))
}

/// What [`Scopes::restrict`] appends to an out-of-scope VM id in its view (then the namespace
/// and `)`): no VM id contains a space, so a marked id never validates.
const MARK: &str = " (outside the Azure scopes of namespace ";

/// The VMs of a policy *as seen through [`Scopes::restrict`]* that were marked out of scope,
/// with their real ids. Empty for a policy in scope. For callers that read the world's view and
/// want to say `OutOfScope` rather than `PolicyInvalid`.
pub fn marked_out_of_scope(spec: &JitPolicySpec) -> Vec<&str> {
    spec.virtual_machines
        .iter()
        .filter_map(|vm| vm.id.find(MARK).map(|at| &vm.id[..at]))
        .collect()
}

impl Scopes<'_> {
    /// The scopes that name `namespace` (exact name). Deleting scopes no longer count.
    fn of<'s>(&'s self, namespace: &'s str) -> impl Iterator<Item = &'s JitScope> + 's {
        self.scopes.iter().filter(move |s| {
            s.metadata.deletion_timestamp.is_none()
                && s.spec.namespaces.iter().any(|n| n == namespace)
        })
    }

    /// Whether some scope names `namespace`.
    pub fn is_scoped(&self, namespace: &str) -> bool {
        self.of(namespace).next().is_some()
    }

    /// Whether a policy in `namespace` may name `vm_id`.
    pub fn allows(&self, namespace: &str, vm_id: &str) -> bool {
        if !self.is_scoped(namespace) {
            return self.allow_unscoped;
        }
        let Some(vm) = parse_vm_id(vm_id) else {
            return false;
        };
        self.of(namespace).any(|s| covers(s, &vm))
    }

    /// The VMs of `spec` that a policy in `namespace` may not name, in the spec's order.
    pub fn out_of_scope<'p>(&self, namespace: &str, spec: &'p JitPolicySpec) -> Vec<&'p str> {
        spec.virtual_machines
            .iter()
            .map(|vm| vm.id.as_str())
            .filter(|id| !self.allows(namespace, id))
            .collect()
    }

    /// The policies as the rest of the operator must see them: a policy whose spec names a VM
    /// outside its namespace's scopes gets, in this view only, a spec that does not validate
    /// (the out-of-scope VM ids are marked). So it is handled as an invalid policy: no grant
    /// activates under it, and only its last enforced spec (recorded in status, in scope when it
    /// was enforced) keeps its Deny rules. The objects in the API server are not changed.
    pub fn restrict(&self, policies: Vec<Arc<JitPolicy>>) -> Vec<Arc<JitPolicy>> {
        policies
            .into_iter()
            .map(|mut policy| {
                let ns = policy.namespace().unwrap_or_default();
                let out: Vec<String> = self
                    .out_of_scope(&ns, &policy.spec)
                    .into_iter()
                    .map(str::to_string)
                    .collect();
                // Copied only when something must be marked: the stores' objects are shared.
                if !out.is_empty() {
                    for vm in Arc::make_mut(&mut policy).spec.virtual_machines.iter_mut() {
                        if out.contains(&vm.id) {
                            vm.id = format!("{}{MARK}{ns})", vm.id);
                        }
                    }
                }
                policy
            })
            .collect()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::api::{JitScopeSpec, PolicyPort, PolicyVirtualMachine, Protocol};
    use crate::plan::validate::validate_policy;
    use proptest::prelude::*;

    fn vm(sub: &str, rg: &str, name: &str) -> String {
        format!(
            "/subscriptions/{sub}/resourceGroups/{rg}/providers/Microsoft.Compute/virtualMachines/{name}"
        )
    }

    fn rg(sub: &str, rg: &str) -> String {
        format!("/subscriptions/{sub}/resourceGroups/{rg}")
    }

    fn scope(namespaces: &[&str], subs: &[&str], rgs: &[String], vms: &[String]) -> JitScope {
        JitScope::new(
            "s",
            JitScopeSpec {
                namespaces: namespaces.iter().map(|s| s.to_string()).collect(),
                subscriptions: subs.iter().map(|s| s.to_string()).collect(),
                resource_groups: rgs.to_vec(),
                virtual_machines: vms.to_vec(),
            },
        )
    }

    fn spec(ids: &[String]) -> JitPolicySpec {
        JitPolicySpec {
            virtual_machines: ids
                .iter()
                .map(|id| PolicyVirtualMachine {
                    id: id.clone(),
                    ports: vec![PolicyPort {
                        number: 22,
                        protocol: Protocol::Tcp,
                        allowed_source_address_prefix: None,
                        allowed_source_address_prefixes: vec!["203.0.113.0/24".into()],
                        max_request_access_duration: "PT1H".into(),
                        approval: None,
                    }],
                })
                .collect(),
            ..Default::default()
        }
    }

    fn closed(scopes: &[JitScope]) -> Scopes<'_> {
        Scopes {
            scopes,
            allow_unscoped: false,
        }
    }

    #[test]
    fn unscoped_namespace_is_closed_unless_opened() {
        let none: Vec<JitScope> = Vec::new();
        let id = vm("s1", "rg", "vm1");
        assert!(!closed(&none).allows("team", &id));
        let open = Scopes {
            scopes: &none,
            allow_unscoped: true,
        };
        assert!(open.allows("team", &id));
        // A namespace some scope names is never opened by the flag.
        let other = [scope(&["team"], &["s2"], &[], &[])];
        let open = Scopes {
            scopes: &other,
            allow_unscoped: true,
        };
        assert!(!open.allows("team", &id));
        assert!(open.allows("elsewhere", &id));
    }

    #[test]
    fn subscription_resource_group_and_vm_scopes() {
        let scopes = [
            scope(&["a"], &["sub-1"], &[], &[]),
            scope(&["b"], &[], &[rg("sub-1", "rg-web")], &[]),
            scope(
                &["c"],
                &[],
                &[],
                &[vm("sub-1", "rg-web", "web-*"), vm("sub-1", "rg-db", "db1")],
            ),
        ];
        let s = closed(&scopes);
        assert!(s.allows("a", &vm("SUB-1", "anything", "x")));
        assert!(!s.allows("a", &vm("sub-12", "anything", "x")));
        assert!(s.allows("b", &vm("sub-1", "RG-WEB", "x")));
        assert!(!s.allows("b", &vm("sub-1", "rg-web2", "x")));
        assert!(!s.allows("b", &vm("sub-2", "rg-web", "x")));
        assert!(s.allows("c", &vm("sub-1", "rg-web", "WEB-01")));
        assert!(s.allows("c", &vm("sub-1", "rg-web", "web-")));
        assert!(!s.allows("c", &vm("sub-1", "rg-web", "api-01")));
        assert!(!s.allows("c", &vm("sub-1", "rg-web2", "web-01")));
        assert!(s.allows("c", &vm("sub-1", "rg-db", "DB1")));
        assert!(!s.allows("c", &vm("sub-1", "rg-db", "db10")));
        // Namespaces match exactly.
        assert!(!s.allows("a-b", &vm("sub-1", "rg", "x")));
    }

    #[test]
    fn scopes_naming_one_namespace_add_up() {
        let scopes = [
            scope(&["team", "x"], &[], &[rg("s", "rg1")], &[]),
            scope(&["y", "team"], &[], &[rg("s", "rg2")], &[]),
        ];
        let s = closed(&scopes);
        let p = spec(&[
            vm("s", "rg1", "a"),
            vm("s", "rg2", "b"),
            vm("s", "rg3", "c"),
        ]);
        assert_eq!(s.out_of_scope("team", &p), vec![vm("s", "rg3", "c")]);
    }

    #[test]
    fn a_star_is_a_wildcard_only_at_the_end_of_the_name() {
        let scopes = [scope(
            &["t"],
            &[],
            &[],
            &[
                "/subscriptions/*/resourceGroups/rg/providers/Microsoft.Compute/virtualMachines/vm"
                    .to_string(),
                vm("s", "rg-*", "vm"),
                vm("s", "rg", "a*b"),
            ],
        )];
        let s = closed(&scopes);
        assert!(!s.allows("t", &vm("s", "rg", "vm")));
        assert!(!s.allows("t", &vm("s", "rg-x", "vm")));
        assert!(!s.allows("t", &vm("s", "rg", "axb")));
        assert!(!s.allows("t", &vm("s", "rg", "a*b")));
    }

    #[test]
    fn deleting_scopes_no_longer_count() {
        let mut s = scope(&["t"], &["s"], &[], &[]);
        s.metadata.deletion_timestamp = Some(k8s_openapi::apimachinery::pkg::apis::meta::v1::Time(
            jiff::Timestamp::UNIX_EPOCH,
        ));
        let scopes = [s];
        assert!(!closed(&scopes).allows("t", &vm("s", "rg", "vm")));
    }

    #[test]
    fn restrict_makes_out_of_scope_policies_invalid_in_the_view_only() {
        let scopes = [scope(&["t"], &[], &[rg("s", "rg1")], &[])];
        let mk = |ids: &[String]| {
            let mut p = JitPolicy::new("p", spec(ids));
            p.metadata.namespace = Some("t".into());
            p
        };
        let inside = mk(&[vm("s", "rg1", "a")]);
        let outside = mk(&[vm("s", "rg1", "a"), vm("s", "rg2", "b")]);
        let view =
            closed(&scopes).restrict(vec![Arc::new(inside.clone()), Arc::new(outside.clone())]);
        assert_eq!(view[0].spec, inside.spec);
        assert!(validate_policy(&view[0].spec).is_ok());
        let denial = validate_policy(&view[1].spec).expect_err("out of scope is invalid");
        assert!(
            denial
                .message
                .contains("outside the Azure scopes of namespace t")
        );
        assert_eq!(view[1].spec.virtual_machines[0].id, vm("s", "rg1", "a"));
        assert!(marked_out_of_scope(&view[0].spec).is_empty());
        assert_eq!(
            marked_out_of_scope(&view[1].spec),
            vec![vm("s", "rg2", "b")]
        );
    }

    #[test]
    fn schema_patterns_admit_what_the_matcher_reads() {
        use crate::api::schema::{RESOURCE_GROUP_ID, SUBSCRIPTION_ID, VM_RESOURCE_ID_PATTERN};
        let re = |p: &str| regex_lite::Regex::new(p).expect("pattern");
        let (sub, group, vms) = (
            re(SUBSCRIPTION_ID),
            re(RESOURCE_GROUP_ID),
            re(VM_RESOURCE_ID_PATTERN),
        );
        assert!(sub.is_match("00000000-0000-0000-0000-000000000001"));
        assert!(!sub.is_match("/subscriptions/x") && !sub.is_match("*") && !sub.is_match(""));
        assert!(group.is_match(&rg("s", "rg-web")));
        assert!(parse_resource_group_id(&rg("s", "rg-web")).is_some());
        assert!(!group.is_match(&rg("s", "rg-*")) && !group.is_match(&rg("s", "rg.")));
        assert!(!group.is_match("/subscriptions/s/resourceGroups/rg/providers"));
        for ok in [
            vm("s", "rg", "web-01"),
            vm("s", "rg", "web-*"),
            vm("s", "rg", "*"),
        ] {
            assert!(vms.is_match(&ok), "{ok}");
        }
        for bad in [
            vm("s", "rg", "a*b"),
            vm("s", "rg", "**"),
            vm("s", "rg-*", "vm"),
            vm("*", "rg", "vm"),
            format!("{}/", vm("s", "rg", "vm")),
        ] {
            assert!(!vms.is_match(&bad), "{bad}");
        }
    }

    /// Segments drawn from tiny alphabets, so that prefixes (`1` and `12`) and case variants
    /// collide often.
    fn seg() -> impl Strategy<Value = String> {
        "[1-2aA]{1,3}"
    }

    proptest! {
        #[test]
        fn a_vm_matches_its_own_scopes_and_never_a_sibling(
            sub in seg(), group in seg(), name in seg(),
            other_sub in seg(), other_group in seg(), other_name in seg(),
        ) {
            let id = vm(&sub, &group, &name);
            let upper = id.to_ascii_uppercase().replace("SUBSCRIPTIONS", "subscriptions");
            for (s, rgs, vms) in [
                (vec![sub.as_str()], vec![], vec![]),
                (vec![], vec![rg(&sub, &group)], vec![]),
                (vec![], vec![], vec![id.clone()]),
                (vec![], vec![], vec![vm(&sub, &group, "*")]),
            ] {
                let scopes = [scope(&["t"], &s, &rgs, &vms)];
                let scopes = closed(&scopes);
                prop_assert!(scopes.allows("t", &id));
                prop_assert!(scopes.allows("t", &upper), "case-insensitive");
                prop_assert!(!scopes.allows("u", &id), "only the named namespace");
                let other = vm(&other_sub, &group, &name);
                if !other_sub.eq_ignore_ascii_case(&sub) {
                    prop_assert!(!scopes.allows("t", &other), "{other} across subscriptions");
                }
            }
            // A resource group scope never reaches a sibling group with a shared prefix.
            let scopes = [scope(&["t"], &[], &[rg(&sub, &group)], &[])];
            if !other_group.eq_ignore_ascii_case(&group) {
                prop_assert!(!closed(&scopes).allows("t", &vm(&sub, &other_group, &name)));
            }
            // An exact VM id matches that VM only; a `*` pattern, the names it prefixes.
            let scopes = [scope(&["t"], &[], &[], std::slice::from_ref(&id))];
            if !other_name.eq_ignore_ascii_case(&name) {
                prop_assert!(!closed(&scopes).allows("t", &vm(&sub, &group, &other_name)));
            }
            let pattern = vm(&sub, &group, &format!("{name}*"));
            let scopes = [scope(&["t"], &[], &[], &[pattern])];
            let longer = format!("{name}{other_name}");
            prop_assert!(closed(&scopes).allows("t", &vm(&sub, &group, &longer)));
            let prefixed = other_name.to_ascii_lowercase().starts_with(&name.to_ascii_lowercase());
            prop_assert_eq!(closed(&scopes).allows("t", &vm(&sub, &group, &other_name)), prefixed);
        }
    }
}
