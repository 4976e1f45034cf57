//! The minimal change that makes one NSG hold exactly the desired rules: guarantees 5 ("own only
//! its rules"), 6 ("heal drift") and 7 ("write nothing when Azure already matches").
//!
//! Rules this installation does not own by its exact name grammar (see [`super::naming`]) are
//! never written or deleted: people's rules, look-alikes such as `Portcullis-Bastion`, and other
//! installations' rules are read only so that their priorities are avoided. Priorities are picked inside configurable bands (Allow
//! rules must win over the Deny rules, so the Allow band sits below the Deny band), an existing
//! rule keeps its priority when it can, and an intent that finds no free priority is reported as
//! unplaced rather than squeezed in. Pure: the caller applies the plan rule by rule.

use std::collections::{HashMap, HashSet};
use std::ops::RangeInclusive;

use super::desired::RuleIntent;
use super::naming::{Naming, is_valid_rule_name};
use super::rule::{Access, Direction, NsgRule};

/// Azure's priority range for security rules.
pub const PRIORITY_RANGE: RangeInclusive<u16> = 100..=4096;
/// Azure's limit on the security rules of one NSG.
pub const MAX_RULES_PER_NSG: usize = 1000;

/// The priority bands Portcullis may use.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Bands {
    /// Where grants' Allow rules go. Default 100..=199.
    pub allow: RangeInclusive<u16>,
    /// Where policies' Deny rules go. Default 4000..=4096.
    pub deny: RangeInclusive<u16>,
}

impl Default for Bands {
    fn default() -> Self {
        Bands {
            allow: 100..=199,
            deny: 4000..=4096,
        }
    }
}

#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
pub enum BandsError {
    #[error("the {band} band {start}-{end} is empty")]
    Empty {
        band: &'static str,
        start: u16,
        end: u16,
    },
    #[error("the {band} band {start}-{end} is outside Azure's priority range 100-4096")]
    OutOfRange {
        band: &'static str,
        start: u16,
        end: u16,
    },
    #[error(
        "the allow band {allow_start}-{allow_end} must lie entirely below the deny band {deny_start}-{deny_end} (lower numbers win, and grants must win over the policy's Deny rules)"
    )]
    AllowNotBelowDeny {
        allow_start: u16,
        allow_end: u16,
        deny_start: u16,
        deny_end: u16,
    },
}

impl Bands {
    /// Each band non-empty and inside 100..=4096, and the Allow band entirely below the Deny band
    /// (so they cannot overlap and a grant's Allow rule takes precedence over the Deny rule).
    pub fn validate(&self) -> Result<(), BandsError> {
        for (band, r) in [("allow", &self.allow), ("deny", &self.deny)] {
            let (start, end) = (*r.start(), *r.end());
            if start > end {
                return Err(BandsError::Empty { band, start, end });
            }
            if !PRIORITY_RANGE.contains(&start) || !PRIORITY_RANGE.contains(&end) {
                return Err(BandsError::OutOfRange { band, start, end });
            }
        }
        if self.allow.end() >= self.deny.start() {
            return Err(BandsError::AllowNotBelowDeny {
                allow_start: *self.allow.start(),
                allow_end: *self.allow.end(),
                deny_start: *self.deny.start(),
                deny_end: *self.deny.end(),
            });
        }
        Ok(())
    }

    /// The band for rules of this access.
    pub fn for_access(&self, access: Access) -> &RangeInclusive<u16> {
        match access {
            Access::Allow => &self.allow,
            Access::Deny => &self.deny,
        }
    }
}

/// What to do to one NSG.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct NsgPlan {
    /// Names of owned rules to delete (orphans, and rules of ours that lost their place), sorted.
    pub deletes: Vec<String>,
    /// Rules to create or correct (per-rule PUT), sorted by name, except that a Deny rule that
    /// gives up addresses or ports it covered comes after the others: written one by one in this
    /// order, a Deny rule taking them over stands before that one lets them go.
    pub puts: Vec<NsgRule>,
    /// Every desired rule that will exist once the plan is applied, with its priority, sorted by
    /// name. This is what status reports.
    pub placed: Vec<NsgRule>,
    /// Desired rules that found no free priority in their band (or no room in the NSG: Azure's
    /// 1,000 rules, or its 4,000 addresses, see [`MAX_ADDRESSES_PER_NSG`]; or an unusable name):
    /// report them, e.g. as `BandFull`.
    pub unplaced: Vec<RuleIntent>,
}

impl NsgPlan {
    /// Nothing to write.
    pub fn is_noop(&self) -> bool {
        self.deletes.is_empty() && self.puts.is_empty()
    }

    /// Leaves alone the rules of policies that exist but cannot be read right now (they do not
    /// decode): their Deny rules stay as they stand, never deleted, until the policy reads again
    /// or is gone. Priorities stay safe: a planned put never takes a priority an existing rule
    /// holds, deleted or not.
    pub fn keep_rules_of_policies(&mut self, naming: &Naming, policy_uids: &[String]) {
        self.deletes.retain(|name| {
            !policy_uids
                .iter()
                .any(|uid| naming.is_policy_rule_of(name, uid))
        });
    }
}

/// How full an NSG's bands are once a plan is applied, as a share of each band's size: inbound
/// priorities held by anyone (other people's rules in the band count), plus rules of ours that
/// found no priority. 1.0 is full; above it, some rules are not placed.
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct BandUsage {
    pub allow: f64,
    pub deny: f64,
}

impl NsgPlan {
    pub fn band_usage(&self, existing: &[NsgRule], bands: &Bands) -> BandUsage {
        let key = |s: &str| s.to_ascii_lowercase();
        let replaced: HashSet<String> = self
            .deletes
            .iter()
            .map(|n| key(n))
            .chain(self.placed.iter().map(|r| key(&r.name)))
            .collect();
        let held: HashSet<u16> = existing
            .iter()
            .filter(|r| !replaced.contains(&key(&r.name)))
            .chain(&self.placed)
            .filter(|r| r.direction == Direction::Inbound)
            .map(|r| r.priority)
            .collect();
        let share = |access: Access| {
            let band = bands.for_access(access);
            let size = band.clone().count().max(1);
            let used = held.iter().filter(|p| band.contains(p)).count();
            let unplaced = self.unplaced.iter().filter(|i| i.access == access).count();
            (used + unplaced) as f64 / size as f64
        };
        BandUsage {
            allow: share(Access::Allow),
            deny: share(Access::Deny),
        }
    }
}

/// Azure's limit on the IP addresses and ranges of one NSG, summed over all its rules and
/// counted apart for sources and destinations: beyond it Azure refuses the write
/// (`SecurityRuleAddressesOrPortsPerSecurityGroupLimitReached`).
pub const MAX_ADDRESSES_PER_NSG: usize = 4000;

/// Addresses rules put towards Azure's per-NSG limit. Every prefix but `*` counts (a service tag
/// too: refused by this count, a rule is reported; refused by Azure, the whole write fails).
/// Port ranges are not counted: the limit's error name says "AddressesOrPorts", but no document
/// gives a number for ports.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
struct Addresses {
    source: usize,
    destination: usize,
}

impl Addresses {
    fn of(source: &[String], destination: &[String]) -> Addresses {
        let count = |v: &[String]| v.iter().filter(|p| p.as_str() != "*").count();
        Addresses {
            source: count(source),
            destination: count(destination),
        }
    }

    fn of_rule(r: &NsgRule) -> Addresses {
        Addresses::of(&r.source_address_prefixes, &r.destination_address_prefixes)
    }

    fn of_intent(i: &RuleIntent) -> Addresses {
        Addresses::of(&i.source_address_prefixes, &i.destination_address_prefixes)
    }

    fn plus(self, other: Addresses) -> Addresses {
        Addresses {
            source: self.source + other.source,
            destination: self.destination + other.destination,
        }
    }

    fn fits(self) -> bool {
        self.source <= MAX_ADDRESSES_PER_NSG && self.destination <= MAX_ADDRESSES_PER_NSG
    }
}

/// Whether `new` leaves out an address, a port or the protocol that `old` covered: written alone,
/// it would give up coverage.
fn gives_up_coverage(old: &NsgRule, new: &NsgRule) -> bool {
    old.protocol != new.protocol
        || old
            .destination_address_prefixes
            .iter()
            .any(|a| !new.destination_address_prefixes.contains(a))
        || old
            .destination_port_ranges
            .iter()
            .any(|p| !new.destination_port_ranges.contains(p))
}

/// The minimal change for one NSG. See the module documentation; in short:
/// - a rule `naming` does not own is never put or deleted, and an intent whose name is not
///   `naming`'s own current name is refused (unplaced);
/// - an owned rule no intent names is deleted (legacy names when adopted: migrated), except
///   that a policy's Deny rule (aggregated, per-VM of older versions, or legacy) that is no
///   longer wanted stays while any wanted Deny rule of the same policy does not stand yet
///   (written by this plan, or without room): no port of the policy is left without a Deny rule
///   in between, whether the plan is written in one PUT or rule by rule, and the next sync
///   deletes it;
/// - when the policy's new Deny rules find no room (no free priority, or over Azure's 4,000
///   addresses) while its old ones stand, the old ones give way in this same plan (deleted, their
///   priorities and addresses handed to the new rules), only if all the new ones then fit. In one
///   write of the NSG that is atomic; written rule by rule (deletes first), the old rules' ports
///   are uncovered from their DELETE until the new rule's PUT;
/// - an intent whose rule exists keeps that rule's priority when it is inside the intent's band
///   and no other rule in the same direction holds it; it is put back only if its content drifted;
/// - any other intent gets the lowest priority of its band that no existing rule in that
///   direction holds (including rules deleted by this same plan, since a delete may fail, except
///   the old Deny rules giving way above) and that this plan has not handed out; none free ->
///   `unplaced` (and an out-of-place rule of ours for it is deleted: an Allow rule in the wrong
///   place must not stay open);
/// - an intent is placed only while the NSG's addresses (other people's rules, ours that stay,
///   and the intents placed before it, existing rules first) stay within
///   [`MAX_ADDRESSES_PER_NSG`]; beyond, it is unplaced, and a Deny rule of it that stands in
///   place stays as it is (fails closed);
/// - applying the plan and planning again gives a no-op, except that intents unplaced the first
///   time may be placed into priorities the first plan's deletes freed, and no-longer-wanted
///   Deny rules are deleted once their policy's new ones stand.
pub fn plan_nsg(
    existing: &[NsgRule],
    desired: &[RuleIntent],
    bands: &Bands,
    naming: &Naming,
) -> NsgPlan {
    let first = plan_with(existing, desired, bands, naming, &HashSet::new());
    // Policies whose new Deny rules found no room while old ones of theirs wait.
    let mut giving_way: HashSet<String> = first
        .unplaced
        .iter()
        .filter_map(|i| deny_policy(naming, &i.name))
        .filter(|policy| {
            existing.iter().any(|r| {
                deny_policy(naming, &r.name).as_ref() == Some(policy)
                    && !desired.iter().any(|i| i.name.eq_ignore_ascii_case(&r.name))
                    && !first.deletes.contains(&r.name)
            })
        })
        .collect();
    // Only policies all of whose rules then fit; fewer policies each round, so this ends.
    while !giving_way.is_empty() {
        let attempt = plan_with(existing, desired, bands, naming, &giving_way);
        let unfit: HashSet<String> = attempt
            .unplaced
            .iter()
            .filter_map(|i| deny_policy(naming, &i.name))
            .collect();
        if giving_way.iter().all(|p| !unfit.contains(p)) {
            return attempt;
        }
        giving_way.retain(|p| !unfit.contains(p));
    }
    first
}

/// The policy hash of one of `naming`'s Deny rules, of any form.
fn deny_policy(naming: &Naming, name: &str) -> Option<String> {
    naming
        .owned(name)
        .and_then(|n| n.kind.policy().map(str::to_string))
}

/// [`plan_nsg`] with the no-longer-wanted Deny rules of the policies in `giving_way` deleted
/// at once, their priorities and addresses free for this plan.
fn plan_with(
    existing: &[NsgRule],
    desired: &[RuleIntent],
    bands: &Bands,
    naming: &Naming,
    giving_way: &HashSet<String>,
) -> NsgPlan {
    let key = |s: &str| s.to_ascii_lowercase();
    let mut plan = NsgPlan::default();

    // Intents, by name, first of each name wins; unusable names are refused outright.
    let mut intents: Vec<&RuleIntent> = desired.iter().collect();
    intents.sort_by_key(|i| key(&i.name));
    intents.dedup_by(|b, a| a.name.eq_ignore_ascii_case(&b.name));
    intents.retain(|i| {
        let usable = naming.is_writable(&i.name) && is_valid_rule_name(&i.name);
        if !usable {
            plan.unplaced.push((*i).clone());
        }
        usable
    });
    let wanted: HashSet<String> = intents.iter().map(|i| key(&i.name)).collect();
    let superseded =
        |r: &NsgRule| !wanted.contains(&key(&r.name)) && deny_policy(naming, &r.name).is_some();
    let gives_way = |r: &NsgRule| {
        superseded(r) && deny_policy(naming, &r.name).is_some_and(|p| giving_way.contains(&p))
    };

    // Existing rules: ours by name, and who holds each (direction, priority). A rule whose name
    // differs from a wanted one only in case is the same Azure resource (names are
    // case-insensitive), so it is the one the put will write. The addresses of the rules that
    // stay whatever this plan does: other people's, and our Deny rules that may wait for their
    // replacement.
    let mut ours: HashMap<String, &NsgRule> = HashMap::new();
    let mut holders: HashMap<(Direction, u16), Vec<String>> = HashMap::new();
    let mut addresses = Addresses::default();
    for r in existing {
        if !gives_way(r) {
            holders
                .entry((r.direction, r.priority))
                .or_default()
                .push(key(&r.name));
        }
        let is_ours = naming.is_owned(&r.name) || wanted.contains(&key(&r.name));
        if is_ours {
            ours.entry(key(&r.name)).or_insert(r);
        }
        if !is_ours || (superseded(r) && !gives_way(r)) {
            addresses = addresses.plus(Addresses::of_rule(r));
        }
    }
    let mut deletes: Vec<String> = Vec::new();
    let mut deleted: HashSet<String> = HashSet::new();
    for r in existing {
        let k = key(&r.name);
        if naming.is_owned(&r.name) && !wanted.contains(&k) && deleted.insert(k) {
            deletes.push(r.name.clone());
        }
    }

    // Pass 1: existing rules keep their priority where they can. A Deny rule standing in place
    // whose new content no longer fits the NSG's addresses stays as it is.
    let mut assigned: HashSet<(Direction, u16)> = HashSet::new();
    let mut priority_of: HashMap<String, u16> = HashMap::new();
    let mut kept_as_is: HashSet<String> = HashSet::new();
    for i in &intents {
        let k = key(&i.name);
        let Some(r) = ours.get(&k) else { continue };
        let slot = (i.direction, r.priority);
        let only_itself = holders.get(&slot).is_none_or(|h| h.iter().all(|n| *n == k));
        if bands.for_access(i.access).contains(&r.priority)
            && only_itself
            && !assigned.contains(&slot)
        {
            assigned.insert(slot);
            let with = addresses.plus(Addresses::of_intent(i));
            if with.fits() {
                addresses = with;
                priority_of.insert(k, r.priority);
            } else if i.access == Access::Deny {
                addresses = addresses.plus(Addresses::of_rule(r));
                kept_as_is.insert(k);
                plan.unplaced.push((*i).clone());
            }
        }
    }

    // Pass 2: everything else takes the lowest free priority of its band.
    let mut rule_count = existing.iter().filter(|r| !gives_way(r)).count();
    for i in &intents {
        let k = key(&i.name);
        if priority_of.contains_key(&k) || kept_as_is.contains(&k) {
            continue;
        }
        let exists = ours.contains_key(&k);
        let with = addresses.plus(Addresses::of_intent(i));
        let free = if (!exists && rule_count >= MAX_RULES_PER_NSG) || !with.fits() {
            None
        } else {
            bands.for_access(i.access).clone().find(|p| {
                !holders.contains_key(&(i.direction, *p)) && !assigned.contains(&(i.direction, *p))
            })
        };
        match free {
            Some(p) => {
                assigned.insert((i.direction, p));
                priority_of.insert(k, p);
                addresses = with;
                if !exists {
                    rule_count += 1;
                }
            }
            None => {
                if let Some(r) = ours.get(&k)
                    && deleted.insert(k)
                {
                    deletes.push(r.name.clone());
                }
                plan.unplaced.push((*i).clone());
            }
        }
    }

    // Puts: new rules, moved rules, drifted rules.
    for i in &intents {
        let k = key(&i.name);
        let Some(p) = priority_of.get(&k) else {
            continue;
        };
        let rule = i.with_priority(*p);
        if !ours.get(&k).is_some_and(|r| r.same_content(&rule)) {
            plan.puts.push(rule.clone());
        }
        plan.placed.push(rule);
    }
    // Written one by one, a Deny rule that hands addresses or ports to another goes last.
    plan.puts.sort_by_key(|p| {
        p.access == Access::Deny
            && ours
                .get(&key(&p.name))
                .is_some_and(|old| gives_up_coverage(old, p))
    });

    // A policy's Deny rule that is no longer wanted stays while a wanted Deny rule of the same
    // policy does not stand yet (being written now, or without room): the policy's ports keep a
    // Deny rule throughout, and the next sync deletes it. Unless it gives way (above).
    let pending: HashSet<String> = plan
        .puts
        .iter()
        .map(|r| r.name.as_str())
        .chain(plan.unplaced.iter().map(|i| i.name.as_str()))
        .filter_map(|n| deny_policy(naming, n))
        .collect();
    deletes.retain(|name| {
        if wanted.contains(&key(name)) {
            return true;
        }
        match deny_policy(naming, name) {
            Some(policy) => giving_way.contains(&policy) || !pending.contains(&policy),
            None => true,
        }
    });
    deletes.sort_by_key(|n| key(n));
    plan.deletes = deletes;
    plan.unplaced.sort_by_key(|i| key(&i.name));
    plan
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::api::Protocol;
    use crate::plan::desired::Owner;
    use crate::plan::naming::Family;
    use crate::plan::rule::RuleProtocol;

    /// A current Allow rule name of the default installation.
    fn allow_name(n: u32) -> String {
        format!("portcullis-default-a-{n:010}-tcp")
    }

    /// A current Deny rule name of the default installation.
    fn deny_name(n: u32) -> String {
        format!("portcullis-default-d-{n:010}-ab12cd-22-tcp")
    }

    fn plan_default(existing: &[NsgRule], desired: &[RuleIntent], bands: &Bands) -> NsgPlan {
        plan_nsg(existing, desired, bands, &Naming::default())
    }

    fn intent(name: &str, access: Access, port: u16) -> RuleIntent {
        RuleIntent {
            owner: Owner::Grant {
                uid: "u".into(),
                namespace: "ns".into(),
                name: "g".into(),
            },
            name: name.to_string(),
            description: format!("portcullis test {name}"),
            access,
            direction: Direction::Inbound,
            protocol: RuleProtocol::Tcp,
            source_address_prefixes: vec![if access == Access::Allow {
                "203.0.113.7".into()
            } else {
                "*".into()
            }],
            source_port_ranges: vec!["*".into()],
            destination_address_prefixes: vec!["10.0.1.4".into()],
            destination_port_ranges: vec![port.to_string()],
        }
    }

    fn foreign(name: &str, priority: u16, direction: Direction) -> NsgRule {
        NsgRule {
            name: name.to_string(),
            description: String::new(),
            priority,
            direction,
            access: Access::Allow,
            protocol: RuleProtocol::Tcp,
            source_address_prefixes: vec!["*".into()],
            source_port_ranges: vec!["*".into()],
            destination_address_prefixes: vec!["*".into()],
            destination_port_ranges: vec!["443".into()],
            provisioning_failed: false,
        }
    }

    fn apply(existing: &[NsgRule], plan: &NsgPlan) -> Vec<NsgRule> {
        let mut out: Vec<NsgRule> = existing
            .iter()
            .filter(|r| !plan.deletes.iter().any(|d| d.eq_ignore_ascii_case(&r.name)))
            .cloned()
            .collect();
        for p in &plan.puts {
            match out
                .iter_mut()
                .find(|r| r.name.eq_ignore_ascii_case(&p.name))
            {
                Some(r) => *r = p.clone(),
                None => out.push(p.clone()),
            }
        }
        out
    }

    #[test]
    fn default_bands_are_valid_and_validation_refuses_bad_ones() {
        assert_eq!(Bands::default().validate(), Ok(()));
        #[allow(clippy::reversed_empty_ranges)]
        let empty = Bands {
            allow: 150..=149,
            deny: 4000..=4096,
        };
        assert!(matches!(
            empty.validate(),
            Err(BandsError::Empty { band: "allow", .. })
        ));
        let low = Bands {
            allow: 99..=199,
            deny: 4000..=4096,
        };
        assert!(matches!(
            low.validate(),
            Err(BandsError::OutOfRange { band: "allow", .. })
        ));
        let high = Bands {
            allow: 100..=199,
            deny: 4000..=4097,
        };
        assert!(matches!(
            high.validate(),
            Err(BandsError::OutOfRange { band: "deny", .. })
        ));
        let overlap = Bands {
            allow: 100..=4000,
            deny: 4000..=4096,
        };
        assert!(matches!(
            overlap.validate(),
            Err(BandsError::AllowNotBelowDeny { .. })
        ));
        let inverted = Bands {
            allow: 4000..=4096,
            deny: 100..=199,
        };
        assert!(inverted.validate().is_err());
        assert_eq!(
            Bands {
                allow: 100..=100,
                deny: 101..=101
            }
            .validate(),
            Ok(())
        );
    }

    #[test]
    fn empty_nsg_gets_lowest_priorities_in_each_band() {
        let desired = [
            intent(&allow_name(1), Access::Allow, 22),
            intent(&allow_name(2), Access::Allow, 22),
            intent(&deny_name(1), Access::Deny, 22),
        ];
        let plan = plan_default(&[], &desired, &Bands::default());
        assert!(plan.deletes.is_empty() && plan.unplaced.is_empty());
        let prios: Vec<(String, u16)> = plan
            .puts
            .iter()
            .map(|r| (r.name.clone(), r.priority))
            .collect();
        assert_eq!(
            prios,
            vec![
                (allow_name(1), 100),
                (allow_name(2), 101),
                (deny_name(1), 4000)
            ]
        );
        assert_eq!(plan.placed, plan.puts);
        let after = apply(&[], &plan);
        assert!(plan_default(&after, &desired, &Bands::default()).is_noop());
    }

    #[test]
    fn foreign_rules_are_avoided_and_never_touched() {
        let existing = [
            foreign("AllowSSH", 100, Direction::Inbound),
            foreign("AllowWeb", 101, Direction::Outbound),
            foreign("DenyAll", 4000, Direction::Inbound),
            // A look-alike that is not ours.
            foreign(&format!("my-{}", allow_name(1)), 102, Direction::Inbound),
        ];
        let desired = [
            intent(&allow_name(1), Access::Allow, 22),
            intent(&allow_name(2), Access::Allow, 22),
            intent(&deny_name(1), Access::Deny, 22),
        ];
        let plan = plan_default(&existing, &desired, &Bands::default());
        assert!(plan.deletes.is_empty());
        let prios: Vec<u16> = plan.puts.iter().map(|r| r.priority).collect();
        assert_eq!(prios, vec![101, 103, 4001], "101 is taken only Outbound");
    }

    #[test]
    fn in_sync_nsg_is_a_noop() {
        let desired = [
            intent(&allow_name(1), Access::Allow, 22),
            intent(&deny_name(1), Access::Deny, 22),
        ];
        let existing = [
            desired[0].with_priority(150),
            desired[1].with_priority(4050),
            foreign("x", 100, Direction::Inbound),
        ];
        let plan = plan_default(&existing, &desired, &Bands::default());
        assert!(plan.is_noop(), "{plan:?}");
        assert_eq!(
            plan.placed.iter().map(|r| r.priority).collect::<Vec<_>>(),
            vec![150, 4050]
        );
    }

    #[test]
    fn list_order_and_name_case_do_not_count_as_drift() {
        let mut i = intent(&allow_name(1), Access::Allow, 22);
        i.destination_address_prefixes = vec!["10.0.1.4".into(), "10.0.1.5".into()];
        let mut r = i.with_priority(120);
        r.destination_address_prefixes.reverse();
        r.name = allow_name(1).to_uppercase();
        assert!(plan_default(&[r], &[i], &Bands::default()).is_noop());
    }

    #[test]
    fn drift_is_put_back_at_the_same_priority() {
        let i = intent(&allow_name(1), Access::Allow, 22);
        let mut hacked = i.with_priority(130);
        hacked.source_address_prefixes = vec!["*".into()];
        let plan = plan_default(&[hacked], std::slice::from_ref(&i), &Bands::default());
        assert!(plan.deletes.is_empty());
        assert_eq!(plan.puts, vec![i.with_priority(130)]);
    }

    #[test]
    fn deleted_by_hand_is_recreated() {
        let i = intent(&deny_name(1), Access::Deny, 22);
        let plan = plan_default(&[], std::slice::from_ref(&i), &Bands::default());
        assert_eq!(plan.puts, vec![i.with_priority(4000)]);
    }

    #[test]
    fn orphans_are_deleted_and_their_priority_not_reused() {
        let orphan = intent(&allow_name(998), Access::Allow, 22).with_priority(100);
        let i = intent(&allow_name(999), Access::Allow, 22);
        let plan = plan_default(&[orphan], std::slice::from_ref(&i), &Bands::default());
        assert_eq!(plan.deletes, vec![allow_name(998)]);
        assert_eq!(plan.puts, vec![i.with_priority(101)]);
    }

    #[test]
    fn a_rule_moved_out_of_its_band_is_moved_back() {
        let i = intent(&allow_name(1), Access::Allow, 22);
        let moved = i.with_priority(300);
        let plan = plan_default(
            &[moved, foreign("x", 100, Direction::Inbound)],
            std::slice::from_ref(&i),
            &Bands::default(),
        );
        assert!(plan.deletes.is_empty());
        assert_eq!(plan.puts, vec![i.with_priority(101)]);
        // A deny rule moved into the allow band goes back to the deny band.
        let d = intent(&deny_name(1), Access::Deny, 22);
        let plan = plan_default(
            &[d.with_priority(150)],
            std::slice::from_ref(&d),
            &Bands::default(),
        );
        assert_eq!(plan.puts, vec![d.with_priority(4000)]);
    }

    #[test]
    fn a_rule_whose_direction_was_flipped_by_hand_keeps_a_free_priority() {
        let i = intent(&allow_name(1), Access::Allow, 22);
        let mut flipped = i.with_priority(120);
        flipped.direction = Direction::Outbound;
        // Priority 120 is free inbound: keep it, put the rule back Inbound.
        let plan = plan_default(
            std::slice::from_ref(&flipped),
            std::slice::from_ref(&i),
            &Bands::default(),
        );
        assert_eq!(plan.puts, vec![i.with_priority(120)]);
        // But not if a foreign inbound rule holds 120.
        let plan = plan_default(
            &[flipped, foreign("x", 120, Direction::Inbound)],
            std::slice::from_ref(&i),
            &Bands::default(),
        );
        assert_eq!(plan.puts, vec![i.with_priority(100)]);
    }

    #[test]
    fn band_full_is_reported_not_squeezed() {
        let bands = Bands {
            allow: 100..=101,
            deny: 4000..=4000,
        };
        let existing = [
            foreign("x", 100, Direction::Inbound),
            foreign("y", 4000, Direction::Inbound),
        ];
        let desired = [
            intent(&allow_name(1), Access::Allow, 22),
            intent(&allow_name(2), Access::Allow, 22),
            intent(&deny_name(1), Access::Deny, 22),
        ];
        let plan = plan_default(&existing, &desired, &bands);
        assert_eq!(plan.puts, vec![desired[0].with_priority(101)]);
        let unplaced: Vec<&str> = plan.unplaced.iter().map(|i| i.name.as_str()).collect();
        assert_eq!(
            unplaced,
            vec![allow_name(2).as_str(), deny_name(1).as_str()]
        );
    }

    #[test]
    fn band_usage_counts_everyone_in_the_band_and_what_found_no_room() {
        let bands = Bands {
            allow: 100..=103,
            deny: 4000..=4001,
        };
        let existing = [
            foreign("x", 100, Direction::Inbound),
            // Outbound priorities and rules outside the bands take no inbound slot.
            foreign("out", 101, Direction::Outbound),
            foreign("low", 300, Direction::Inbound),
            foreign("y", 4000, Direction::Inbound),
            // An orphan of ours: deleted by the plan, so its slot is free again.
            foreign(&allow_name(9), 102, Direction::Inbound),
        ];
        let desired = [
            intent(&allow_name(1), Access::Allow, 22),
            intent(&deny_name(1), Access::Deny, 22),
            intent(&deny_name(2), Access::Deny, 23),
        ];
        let plan = plan_default(&existing, &desired, &bands);
        assert_eq!(plan.deletes, vec![allow_name(9)]);
        let usage = plan.band_usage(&existing, &bands);
        // x and the new allow rule: 2 of 4. y, one placed Deny and one unplaced: 3 of 2.
        assert_eq!(usage.allow, 0.5);
        assert_eq!(usage.deny, 1.5);
        // Once applied, planning again sees the same fullness.
        let after = apply(&existing, &plan);
        let again = plan_default(&after, &desired, &bands);
        assert_eq!(again.band_usage(&after, &bands), usage);
    }

    #[test]
    fn an_unplaceable_rule_of_ours_out_of_band_is_removed() {
        let bands = Bands {
            allow: 100..=100,
            deny: 4000..=4096,
        };
        let i = intent(&allow_name(1), Access::Allow, 22);
        let existing = [foreign("x", 100, Direction::Inbound), i.with_priority(300)];
        let plan = plan_default(&existing, std::slice::from_ref(&i), &bands);
        assert_eq!(plan.deletes, vec![allow_name(1)]);
        assert!(plan.puts.is_empty() && plan.placed.is_empty());
        assert_eq!(plan.unplaced, vec![i]);
    }

    #[test]
    fn nsg_rule_limit_is_respected() {
        let existing: Vec<NsgRule> = (0..MAX_RULES_PER_NSG)
            .map(|n| foreign(&format!("r{n}"), 1000 + n as u16, Direction::Outbound))
            .collect();
        let i = intent(&allow_name(1), Access::Allow, 22);
        let plan = plan_default(&existing, std::slice::from_ref(&i), &Bands::default());
        assert!(plan.puts.is_empty());
        assert_eq!(plan.unplaced.len(), 1);
    }

    #[test]
    fn foreign_names_in_intents_are_refused() {
        let bad = intent("AllowSSH", Access::Allow, 22);
        let existing = [foreign("AllowSSH", 100, Direction::Inbound)];
        let plan = plan_default(&existing, std::slice::from_ref(&bad), &Bands::default());
        assert!(plan.is_noop());
        assert_eq!(plan.unplaced, vec![bad]);
        let invalid = intent("portcullis-a-", Access::Allow, 22);
        assert_eq!(
            plan_default(&[], std::slice::from_ref(&invalid), &Bands::default()).unplaced,
            vec![invalid]
        );
    }

    #[test]
    fn duplicate_intent_names_are_planned_once() {
        let a = intent(&allow_name(1), Access::Allow, 22);
        let b = intent(&allow_name(1).to_uppercase(), Access::Allow, 80);
        let plan = plan_default(&[], &[a, b], &Bands::default());
        assert_eq!(plan.puts.len(), 1);
    }

    #[test]
    fn look_alikes_and_other_installations_are_never_touched() {
        let blue = Naming {
            installation: crate::plan::Installation::new("blue").expect("valid"),
            adopt_legacy: false,
        };
        let mut blue_rule =
            intent(&blue.grant_rule_name("g", Protocol::Tcp), Access::Allow, 22).with_priority(100);
        blue_rule.description = "blue's".into();
        let existing = [
            foreign("Portcullis-Bastion", 101, Direction::Inbound),
            foreign("portcullis-bastion", 102, Direction::Inbound),
            foreign("portcullis-foo", 103, Direction::Inbound),
            foreign(&format!("{}-x", allow_name(7)), 104, Direction::Inbound),
            blue_rule,
            intent(
                &blue.policy_rule_name("p", "vm", 22, Protocol::Tcp),
                Access::Deny,
                22,
            )
            .with_priority(4000),
        ];
        let own = Naming::default();
        let desired = [
            intent(&own.grant_rule_name("g", Protocol::Tcp), Access::Allow, 22),
            intent(
                &own.policy_rule_name("p", "vm", 22, Protocol::Tcp),
                Access::Deny,
                22,
            ),
        ];
        for wanted in [&desired[..], &[]] {
            let plan = plan_nsg(&existing, wanted, &Bands::default(), &own);
            assert!(plan.deletes.is_empty(), "{:?}", plan.deletes);
            for p in &plan.puts {
                assert!(own.is_writable(&p.name), "{}", p.name);
                assert!(
                    !existing
                        .iter()
                        .any(|e| e.name.eq_ignore_ascii_case(&p.name))
                );
            }
            let prios: Vec<u16> = plan.puts.iter().map(|r| r.priority).collect();
            assert_eq!(prios, &[105, 4001][..2 * wanted.len() / 2]);
        }
        // Blue, for its part, keeps its rules and leaves ours alone.
        let ours = plan_nsg(&existing, &desired, &Bands::default(), &own);
        let mut both = existing.to_vec();
        both.extend(ours.placed);
        let plan = plan_nsg(&both, &[], &Bands::default(), &blue);
        assert_eq!(
            plan.deletes,
            vec![existing[4].name.clone(), existing[5].name.clone()]
        );
    }

    #[test]
    fn legacy_rules_are_migrated_only_when_adopted() {
        use crate::plan::naming::{legacy_grant_rule_name, legacy_policy_rule_name};
        let own = Naming::default();
        let live = intent(&own.grant_rule_name("g", Protocol::Tcp), Access::Allow, 22);
        let legacy_live = {
            let mut r = live.with_priority(100);
            r.name = legacy_grant_rule_name("g", Protocol::Tcp);
            r
        };
        let legacy_orphan = {
            let mut r = live.with_priority(101);
            r.name = legacy_grant_rule_name("gone", Protocol::Udp);
            r
        };
        let deny = intent(
            &own.policy_group_rule_name("p", Protocol::Tcp, Family::V4, &[22], 0),
            Access::Deny,
            22,
        );
        let legacy_deny = {
            let mut r = deny.with_priority(4000);
            r.name = legacy_policy_rule_name("p", "vm", 22, Protocol::Tcp);
            r
        };
        let existing = vec![
            legacy_live.clone(),
            legacy_orphan.clone(),
            legacy_deny.clone(),
        ];
        let desired = [live.clone(), deny.clone()];

        // Adopted: the Allow rules go at once, the new-named rules are written; the legacy Deny
        // rule stays until its replacement stands, then goes.
        let plan = plan_nsg(&existing, &desired, &Bands::default(), &own);
        assert_eq!(
            plan.deletes,
            vec![legacy_orphan.name.clone(), legacy_live.name.clone()]
        );
        assert_eq!(
            plan.puts,
            vec![live.with_priority(102), deny.with_priority(4001)]
        );
        let after = apply(&existing, &plan);
        let plan = plan_nsg(&after, &desired, &Bands::default(), &own);
        assert_eq!(plan.deletes, vec![legacy_deny.name.clone()]);
        assert!(plan.puts.is_empty());
        let after = apply(&after, &plan);
        assert!(plan_nsg(&after, &desired, &Bands::default(), &own).is_noop());
        let names: Vec<&str> = after.iter().map(|r| r.name.as_str()).collect();
        assert_eq!(names, vec![live.name.as_str(), deny.name.as_str()]);

        // A legacy Deny rule of a policy that is gone is an orphan like any other.
        let plan = plan_nsg(
            std::slice::from_ref(&legacy_deny),
            &[],
            &Bands::default(),
            &own,
        );
        assert_eq!(plan.deletes, vec![legacy_deny.name.clone()]);

        // Not adopted: legacy rules are someone else's.
        let not_adopting = Naming {
            adopt_legacy: false,
            ..Naming::default()
        };
        let plan = plan_nsg(&existing, &desired, &Bands::default(), &not_adopting);
        assert!(plan.deletes.is_empty());
        assert_eq!(
            plan.puts,
            vec![live.with_priority(102), deny.with_priority(4001)]
        );
    }

    /// A Deny intent of policy `uid` for `ports`, over `addresses`.
    fn group_intent(uid: &str, ports: &[u16], chunk: u16, addresses: &[String]) -> RuleIntent {
        let own = Naming::default();
        RuleIntent {
            owner: Owner::Policy {
                uid: uid.into(),
                namespace: "ns".into(),
                name: "p".into(),
            },
            name: own.policy_group_rule_name(uid, Protocol::Tcp, Family::V4, ports, chunk),
            description: format!("portcullis policy ns/p deny {ports:?}"),
            access: Access::Deny,
            direction: Direction::Inbound,
            protocol: RuleProtocol::Tcp,
            source_address_prefixes: vec!["*".into()],
            source_port_ranges: vec!["*".into()],
            destination_address_prefixes: addresses.to_vec(),
            destination_port_ranges: ports.iter().map(u16::to_string).collect(),
        }
    }

    /// The per-VM Deny rules an older version wrote for policy `uid`: one per address, port 22.
    fn per_vm_rules(uid: &str, addresses: &[String], first_priority: u16) -> Vec<NsgRule> {
        let own = Naming::default();
        addresses
            .iter()
            .enumerate()
            .map(|(n, a)| {
                let mut r = intent("x", Access::Deny, 22).with_priority(first_priority + n as u16);
                r.name = own.policy_rule_name(uid, &format!("vm{n}"), 22, Protocol::Tcp);
                r.destination_address_prefixes = vec![a.clone()];
                r
            })
            .collect()
    }

    fn ips(n: usize) -> Vec<String> {
        (0..n)
            .map(|i| format!("10.0.{}.{}", i / 250, i % 250 + 4))
            .collect()
    }

    #[test]
    fn per_vm_deny_rules_stay_until_the_aggregated_rule_stands() {
        let own = Naming::default();
        let addresses = ips(3);
        let old = per_vm_rules("p", &addresses, 4000);
        let group = group_intent("p", &[22], 0, &addresses);
        let desired = [group.clone()];
        // Round 1: the aggregated rule is written at a free priority; the old rules stay.
        let plan = plan_nsg(&old, &desired, &Bands::default(), &own);
        assert_eq!(plan.puts, vec![group.with_priority(4003)]);
        assert!(plan.deletes.is_empty(), "{:?}", plan.deletes);
        // Round 2: it stands, so the old rules go.
        let after = apply(&old, &plan);
        let plan = plan_nsg(&after, &desired, &Bands::default(), &own);
        assert!(plan.puts.is_empty());
        let mut names: Vec<String> = old.iter().map(|r| r.name.clone()).collect();
        names.sort_by_key(|n| n.to_ascii_lowercase());
        assert_eq!(plan.deletes, names);
        let after = apply(&after, &plan);
        assert!(plan_nsg(&after, &desired, &Bands::default(), &own).is_noop());
        // Another policy's pending rule does not hold back this one's orphans, and the rules of
        // a policy that is gone go at once.
        let other = group_intent("q", &[22], 0, &addresses);
        let plan = plan_nsg(&old, &[other], &Bands::default(), &own);
        assert_eq!(plan.deletes, names);
    }

    #[test]
    fn old_deny_rules_give_way_in_the_same_plan_when_the_band_is_full() {
        let own = Naming::default();
        let bands = Bands {
            allow: 100..=199,
            deny: 4000..=4002,
        };
        let addresses = ips(3);
        let old = per_vm_rules("p", &addresses, 4000);
        let group = group_intent("p", &[22], 0, &addresses);
        let plan = plan_nsg(&old, std::slice::from_ref(&group), &bands, &own);
        assert!(plan.unplaced.is_empty(), "{:?}", plan.unplaced);
        assert_eq!(plan.puts, vec![group.with_priority(4000)]);
        assert_eq!(
            plan.deletes.len(),
            3,
            "every old rule goes in the same write"
        );
        let after = apply(&old, &plan);
        assert!(plan_nsg(&after, &[group], &bands, &own).is_noop());

        // When even that would not make room for all the policy's new rules, nothing gives way:
        // the old rules stay, and the new ones are reported.
        let mut crowded = per_vm_rules("p", &addresses[..1], 4000);
        crowded.push(foreign("someone", 4001, Direction::Inbound));
        crowded.push(foreign("someone-else", 4002, Direction::Inbound));
        let desired = [
            group_intent("p", &[22], 0, &addresses),
            group_intent("p", &[22, 80], 0, &addresses),
        ];
        let plan = plan_nsg(&crowded, &desired, &bands, &own);
        assert!(plan.is_noop(), "{plan:?}");
        assert_eq!(plan.unplaced.len(), 2);
    }

    #[test]
    fn the_nsgs_address_limit_is_respected_and_reported() {
        let own = Naming::default();
        let mut big = foreign("someone-big", 300, Direction::Inbound);
        big.destination_address_prefixes = ips(MAX_ADDRESSES_PER_NSG - 100);
        // Sources count apart: a rule with many sources does not use up destinations.
        let mut sources = foreign("many-sources", 301, Direction::Inbound);
        sources.source_address_prefixes = ips(MAX_ADDRESSES_PER_NSG);
        let existing = vec![big.clone(), sources];
        let fits = group_intent("p", &[22], 0, &ips(100));
        let plan = plan_nsg(
            &existing,
            std::slice::from_ref(&fits),
            &Bands::default(),
            &own,
        );
        assert_eq!(plan.puts, vec![fits.with_priority(4000)]);
        let too_many = group_intent("p", &[22], 0, &ips(101));
        let plan = plan_nsg(
            &existing,
            std::slice::from_ref(&too_many),
            &Bands::default(),
            &own,
        );
        assert!(plan.is_noop());
        assert_eq!(plan.unplaced, vec![too_many.clone()]);
        // `*` does not count.
        let mut open = big.clone();
        open.destination_address_prefixes = vec!["*".into()];
        let plan = plan_nsg(
            &[open],
            std::slice::from_ref(&too_many),
            &Bands::default(),
            &own,
        );
        assert!(plan.unplaced.is_empty());

        // A Deny rule that stands but whose new content would no longer fit stays as it is
        // (fails closed) and is reported.
        let standing = fits.with_priority(4000);
        let existing = vec![big, standing.clone()];
        let grown = group_intent("p", &[22], 0, &ips(150));
        let plan = plan_nsg(
            &existing,
            std::slice::from_ref(&grown),
            &Bands::default(),
            &own,
        );
        assert!(plan.is_noop(), "{plan:?}");
        assert_eq!(plan.unplaced, vec![grown]);
        let usage = plan.band_usage(&existing, &Bands::default());
        assert!(usage.deny > 0.0);
    }

    #[test]
    fn a_deny_rule_taking_over_addresses_is_written_before_the_one_giving_them_up() {
        let own = Naming::default();
        let addresses = ips(4);
        // Chunk 0 held a, b; chunk 1 held c, d. Now chunk 0 holds a only and chunk 1 b, c, d.
        let a0 = group_intent("p", &[22], 0, &addresses[..2]).with_priority(4000);
        let a1 = group_intent("p", &[22], 1, &addresses[2..]).with_priority(4001);
        let new0 = group_intent("p", &[22], 0, &addresses[..1]);
        let new1 = group_intent("p", &[22], 1, &addresses[1..]);
        let plan = plan_nsg(
            &[a0, a1],
            &[new0.clone(), new1.clone()],
            &Bands::default(),
            &own,
        );
        assert_eq!(
            plan.puts,
            vec![new1.with_priority(4001), new0.with_priority(4000)]
        );
        assert!(plan.deletes.is_empty());
    }

    #[test]
    fn rules_of_unreadable_policies_are_kept_by_exact_name() {
        let own = Naming::default();
        let mine = own.policy_rule_name("p", "vm", 22, Protocol::Tcp);
        let other = own.policy_rule_name("q", "vm", 22, Protocol::Tcp);
        let mut plan = NsgPlan {
            deletes: vec![mine.clone(), other.clone(), mine.to_uppercase()],
            ..NsgPlan::default()
        };
        plan.keep_rules_of_policies(&own, &["p".to_string()]);
        assert_eq!(plan.deletes, vec![other, mine.to_uppercase()]);
    }

    /// A policy that cannot be read keeps its Deny rules (`keep_rules_of_policies`), so their
    /// addresses still count towards Azure's 4,000: a plan that spent them would be refused.
    #[test]
    fn kept_rules_of_unreadable_policies_count_towards_the_address_limit() {
        let own = Naming::default();
        let kept = group_intent("q", &[22], 0, &ips(MAX_ADDRESSES_PER_NSG - 5)).with_priority(4000);
        let plan_with_kept = |intent: &RuleIntent| {
            let mut plan = plan_nsg(
                std::slice::from_ref(&kept),
                std::slice::from_ref(intent),
                &Bands::default(),
                &own,
            );
            plan.keep_rules_of_policies(&own, &["q".to_string()]);
            plan
        };
        let too_many = group_intent("p", &[22], 0, &ips(6));
        let plan = plan_with_kept(&too_many);
        assert!(plan.is_noop(), "{plan:?}");
        assert_eq!(plan.unplaced, vec![too_many]);
        let fits = group_intent("p", &[22], 0, &ips(5));
        let plan = plan_with_kept(&fits);
        assert!(plan.deletes.is_empty(), "{plan:?}");
        assert_eq!(plan.puts, vec![fits.with_priority(4001)]);
    }

    mod props {
        use super::*;
        use proptest::prelude::*;

        #[derive(Clone, Debug)]
        enum Seed {
            Foreign {
                dir: Direction,
                prio: u16,
            },
            /// A name that looks like ours but is not this installation's, or a legacy name.
            LookAlike {
                kind: u8,
                idx: usize,
                dir: Direction,
                prio: u16,
            },
            Ours {
                idx: usize,
                dir: Direction,
                prio: u16,
                drift: u8,
            },
        }

        fn pool_intent(idx: usize) -> RuleIntent {
            // Even: Allow, odd: Deny. Indices 0..12; intents draw from 0..8, existing from 0..12
            // (so 8..12 are orphans). Deny rules of 0..8 are aggregated rules of two policies
            // (1 and 3 of policy 0, 5 and 7 of policy 1); 9 is an older per-VM Deny rule of
            // policy 0 (it waits for policy 0's rules), 11 one of policy 2 (wanted by nobody).
            if idx.is_multiple_of(2) {
                return intent(&allow_name(idx as u32), Access::Allow, 22);
            }
            let policy = match idx {
                1 | 3 | 9 => 0,
                5 | 7 => 1,
                _ => 2,
            };
            let name = if idx < 8 {
                format!("portcullis-default-g-{policy:010}-{idx:010}-0-tcp")
            } else {
                format!("portcullis-default-d-{policy:010}-ab12cd-{idx}-tcp")
            };
            intent(&name, Access::Deny, 22)
        }

        fn arb_priority() -> impl Strategy<Value = u16> {
            prop_oneof![95u16..=115, 190u16..=210, 3990u16..=4096, 100u16..=4096]
        }

        fn arb_dir() -> impl Strategy<Value = Direction> {
            prop_oneof![3 => Just(Direction::Inbound), 1 => Just(Direction::Outbound)]
        }

        fn arb_seed() -> impl Strategy<Value = Seed> {
            prop_oneof![
                (arb_dir(), arb_priority()).prop_map(|(dir, prio)| Seed::Foreign { dir, prio }),
                (0u8..5, 0usize..12, arb_dir(), arb_priority()).prop_map(
                    |(kind, idx, dir, prio)| Seed::LookAlike {
                        kind,
                        idx,
                        dir,
                        prio
                    }
                ),
                (0usize..12, arb_dir(), arb_priority(), 0u8..4).prop_map(
                    |(idx, dir, prio, drift)| Seed::Ours {
                        idx,
                        dir,
                        prio,
                        drift
                    }
                ),
            ]
        }

        /// An NSG as Azure would hold it: unique names, unique (direction, priority).
        fn build_existing(seeds: &[Seed]) -> Vec<NsgRule> {
            let mut out: Vec<NsgRule> = Vec::new();
            for (n, s) in seeds.iter().enumerate() {
                let rule = match s {
                    Seed::Foreign { dir, prio } => foreign(&format!("user-rule-{n}"), *prio, *dir),
                    Seed::LookAlike {
                        kind,
                        idx,
                        dir,
                        prio,
                    } => {
                        let own = pool_intent(*idx).name;
                        let name = match kind {
                            0 => format!("Portcullis-Bastion-{n}"),
                            1 => format!("portcullis-foo-{n}"),
                            // Another installation's rule for the same objects.
                            2 => own.replacen("-default-", "-blue-", 1),
                            // Names from before installation ids.
                            _ => own.replacen("-default-", "-", 1),
                        };
                        let mut r = pool_intent(*idx).with_priority(*prio);
                        r.name = name;
                        r.direction = *dir;
                        r
                    }
                    Seed::Ours {
                        idx,
                        dir,
                        prio,
                        drift,
                    } => {
                        let mut r = pool_intent(*idx).with_priority(*prio);
                        r.direction = *dir;
                        match drift {
                            1 => r.source_address_prefixes = vec!["*".into()],
                            2 => {
                                r.access = if r.access == Access::Allow {
                                    Access::Deny
                                } else {
                                    Access::Allow
                                }
                            }
                            3 => r.description = "edited by hand".into(),
                            _ => {}
                        }
                        r
                    }
                };
                let clash = out.iter().any(|o| {
                    o.name.eq_ignore_ascii_case(&rule.name)
                        || (o.direction == rule.direction && o.priority == rule.priority)
                });
                if !clash {
                    out.push(rule);
                }
            }
            out
        }

        fn arb_bands() -> impl Strategy<Value = Bands> {
            prop_oneof![
                Just(Bands::default()),
                Just(Bands {
                    allow: 100..=104,
                    deny: 4094..=4096
                }),
                Just(Bands {
                    allow: 200..=202,
                    deny: 203..=205
                }),
            ]
        }

        fn check_invariants(
            existing: &[NsgRule],
            desired: &[RuleIntent],
            plan: &NsgPlan,
            bands: &Bands,
            naming: &Naming,
        ) -> Result<(), TestCaseError> {
            let is_owned = |name: &str| naming.is_owned(name);
            // (a) only owned names are written or deleted.
            for p in &plan.puts {
                prop_assert!(naming.is_writable(&p.name), "put of foreign {}", p.name);
            }
            for d in &plan.deletes {
                prop_assert!(is_owned(d), "delete of foreign {}", d);
            }
            // (b) put priorities never collide with each other, nor with an existing rule of
            // the same direction other than the same-named rule, or a no-longer-wanted Deny
            // rule this plan deletes (giving way to its policy's new rules).
            let mut seen = HashSet::new();
            for p in &plan.puts {
                prop_assert!(
                    seen.insert((p.direction, p.priority)),
                    "two puts at {}",
                    p.priority
                );
                for e in existing {
                    if e.direction == p.direction && e.priority == p.priority {
                        let gives_way = plan.deletes.contains(&e.name)
                            && deny_policy(naming, &e.name).is_some()
                            && !desired.iter().any(|i| i.name.eq_ignore_ascii_case(&e.name));
                        prop_assert!(
                            e.name.eq_ignore_ascii_case(&p.name) || gives_way,
                            "{} collides with {}",
                            p.name,
                            e.name
                        );
                    }
                }
            }
            // (c) every put priority is in its band.
            for p in &plan.puts {
                prop_assert!(
                    bands.for_access(p.access).contains(&p.priority),
                    "{} at {}",
                    p.name,
                    p.priority
                );
            }
            // Placed rules are unique per slot and in band; the NSG after applying keeps
            // priorities unique per direction, and foreign rules are exactly as before.
            let mut slots = HashSet::new();
            for p in &plan.placed {
                prop_assert!(slots.insert((p.direction, p.priority)));
                prop_assert!(bands.for_access(p.access).contains(&p.priority));
            }
            let after = apply(existing, plan);
            let mut slots = HashSet::new();
            for r in &after {
                prop_assert!(
                    slots.insert((r.direction, r.priority)),
                    "duplicate priority {} after apply",
                    r.priority
                );
            }
            let foreign_before: Vec<&NsgRule> =
                existing.iter().filter(|r| !is_owned(&r.name)).collect();
            let foreign_after: Vec<&NsgRule> =
                after.iter().filter(|r| !is_owned(&r.name)).collect();
            prop_assert_eq!(foreign_before, foreign_after);
            Ok(())
        }

        proptest! {
            // At least 512 cases; PROPTEST_CASES asks for more.
            #![proptest_config(ProptestConfig { cases: ProptestConfig::default().cases.max(512), ..ProptestConfig::default() })]

            #[test]
            fn plans_are_safe_and_idempotent(
                seeds in proptest::collection::vec(arb_seed(), 0..24),
                wanted in proptest::sample::subsequence((0usize..8).collect::<Vec<_>>(), 0..8),
                bands in arb_bands(),
                adopt_legacy in any::<bool>(),
            ) {
                let naming = Naming { adopt_legacy, ..Naming::default() };
                let is_owned = |name: &str| naming.is_owned(name);
                let existing = build_existing(&seeds);
                let desired: Vec<RuleIntent> = wanted.iter().map(|i| pool_intent(*i)).collect();
                let plan1 = plan_nsg(&existing, &desired, &bands, &naming);
                check_invariants(&existing, &desired, &plan1, &bands, &naming)?;

                // Every intent is placed or unplaced, exactly once; every placed intent's rule
                // matches the intent; orphans are deleted, except legacy Deny rules whose
                // replacement does not stand yet.
                prop_assert_eq!(plan1.placed.len() + plan1.unplaced.len(), desired.len());
                for i in &desired {
                    let placed = plan1.placed.iter().find(|r| r.name == i.name);
                    let unplaced = plan1.unplaced.iter().any(|u| u.name == i.name);
                    prop_assert!(placed.is_some() != unplaced);
                    if let Some(r) = placed {
                        prop_assert_eq!(r, &i.with_priority(r.priority));
                    }
                }
                // A no-longer-wanted Deny rule of a policy that has wanted rules may wait for them.
                let policy_of = |name: &str| deny_policy(&naming, name);
                let waits_for_replacement = |name: &str| {
                    !desired.iter().any(|i| i.name.eq_ignore_ascii_case(name))
                        && policy_of(name).is_some_and(|p| {
                            desired.iter().any(|i| policy_of(&i.name).as_ref() == Some(&p))
                        })
                };
                for e in existing.iter().filter(|r| is_owned(&r.name)) {
                    if !desired.iter().any(|i| i.name.eq_ignore_ascii_case(&e.name)) {
                        prop_assert!(
                            plan1.deletes.contains(&e.name) || waits_for_replacement(&e.name),
                            "orphan {} kept", e.name
                        );
                    }
                }

                // (d) applying and planning again: nothing left, except placing what the
                // previous plan could not place (into priorities its deletes freed) and deleting
                // Deny rules once their policy's new rules stand; a no-op within six rounds.
                let after1 = apply(&existing, &plan1);
                let mut afters = vec![after1.clone()];
                let mut previous = plan1.clone();
                let mut converged = false;
                for round in 2..=7 {
                    let current = afters.last().expect("one round at least").clone();
                    let plan = plan_nsg(&current, &desired, &bands, &naming);
                    check_invariants(&current, &desired, &plan, &bands, &naming)?;
                    if plan.is_noop() {
                        converged = true;
                        break;
                    }
                    prop_assert!(round <= 6, "round {} plans {:?}", round, plan);
                    prop_assert!(plan.deletes.iter().all(|d| waits_for_replacement(d)), "round {} deletes {:?}", round, plan.deletes);
                    for p in &plan.puts {
                        prop_assert!(previous.unplaced.iter().any(|u| u.name == p.name), "round {} re-puts {}", round, p.name);
                    }
                    if previous.unplaced.is_empty() {
                        prop_assert!(plan.puts.is_empty());
                    }
                    afters.push(apply(&current, &plan));
                    previous = plan;
                }
                prop_assert!(converged);
                // A no-longer-wanted Deny rule never goes before every wanted rule of its policy
                // stands.
                for after in &afters {
                    for e in existing.iter().filter(|r| waits_for_replacement(&r.name)) {
                        let policy = policy_of(&e.name);
                        let missing: Vec<&str> = desired
                            .iter()
                            .filter(|i| policy_of(&i.name) == policy)
                            .filter(|i| !after.iter().any(|r| r.name.eq_ignore_ascii_case(&i.name)))
                            .map(|i| i.name.as_str())
                            .collect();
                        prop_assert!(
                            after.iter().any(|r| r.name == e.name) || missing.is_empty(),
                            "{} gone before {:?}", e.name, missing
                        );
                    }
                }
            }
        }
    }
}
