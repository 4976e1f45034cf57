//! The pure middle: validate -> desired -> diff. Nothing in here performs I/O.
//!
//! - [`validate`]: is a policy well formed; may a grant be honoured under its policy?
//! - [`approval`]: who must approve a grant, and where its approvals stand.
//! - [`scope`]: which VMs a namespace's policies may name (the cluster's `JitScope`s).
//! - [`naming`]: rule names that encode ownership, and their descriptions.
//! - [`desired`]: the rules one NSG should hold, from every policy and grant in the cluster.
//! - [`diff`]: the minimal per-rule change that gets an NSG there, never touching others' rules.

pub mod approval;
pub mod desired;
pub mod diff;
pub mod naming;
pub mod retention;
pub mod rule;
pub mod scope;
pub mod validate;

pub use desired::{
    GrantKey, LiveGrant, Owner, PolicyCheck, RuleIntent, check_address_family, desired_rules,
    effective_spec, grant_keys_behind, granted_access, live_grant, live_grant_checked,
    nsgs_of_grant, nsgs_of_policy, policy_of,
};
pub use diff::{BandUsage, Bands, BandsError, NsgPlan, plan_nsg};
pub use naming::{Installation, InvalidInstallation, Naming, RULE_PREFIX, RuleName};
pub use rule::{Access, Direction, NsgRule, RuleProtocol};
pub use scope::Scopes;
pub use validate::{
    AccessWindow, AddressPrefix, Denial, DenialReason, ValidatedGrant, validate_grant,
    validate_grant_checked, validate_policy,
};
