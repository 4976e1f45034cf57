//! Management locks (`Microsoft.Authorization/locks`) as ARM enforces them: a lock on a scope
//! (a resource group or a resource) is inherited by everything under it. `CanNotDelete` refuses
//! DELETEs; `ReadOnly` refuses every write. Both answer 409 `ScopeLocked`. A PUT of a whole NSG
//! that leaves a rule out is not a DELETE, so `CanNotDelete` lets it through (as Azure does).

use axum::http::StatusCode;
use serde::{Deserialize, Serialize};

use crate::error::ArmError;

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub enum LockLevel {
    CanNotDelete,
    ReadOnly,
}

/// One lock, set with `POST /_emulator/locks`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Lock {
    /// A resource group id or a resource id (`/subscriptions/…`), matched case-insensitively.
    pub scope: String,
    pub level: LockLevel,
}

impl Lock {
    /// Whether `resource_id` is the lock's scope or lies under it.
    pub fn covers(&self, resource_id: &str) -> bool {
        let scope = normalise(&self.scope);
        let id = normalise(resource_id);
        id == scope || id.starts_with(&format!("{scope}/"))
    }
}

pub fn normalise(id: &str) -> String {
    id.trim().trim_end_matches('/').to_ascii_lowercase()
}

/// Checks a write on `resource_id` against `locks`: `Err(409 ScopeLocked)` when a lock forbids it.
pub fn check(locks: &[Lock], resource_id: &str, is_delete: bool) -> Result<(), ArmError> {
    let mut scopes: Vec<&str> = Vec::new();
    for l in locks {
        let forbids = is_delete || l.level == LockLevel::ReadOnly;
        if forbids && l.covers(resource_id) && !scopes.contains(&l.scope.as_str()) {
            scopes.push(l.scope.as_str());
        }
    }
    if scopes.is_empty() {
        return Ok(());
    }
    let operation = if is_delete { "delete" } else { "write" };
    Err(ArmError::new(
        StatusCode::CONFLICT,
        "ScopeLocked",
        format!(
            "The scope '{resource_id}' cannot perform {operation} operation because following scope(s) are locked: '{}'. Please remove the lock and try again.",
            scopes.join("', '")
        ),
    ))
}

#[cfg(test)]
mod tests {
    use super::*;

    const RG: &str = "/subscriptions/s/resourceGroups/rg";

    fn lock(scope: &str, level: LockLevel) -> Lock {
        Lock {
            scope: scope.into(),
            level,
        }
    }

    #[test]
    fn inheritance_is_by_path_segment() {
        let l = lock(RG, LockLevel::CanNotDelete);
        assert!(l.covers(RG));
        assert!(l.covers("/SUBSCRIPTIONS/s/resourcegroups/RG/providers/x/y/z"));
        assert!(!l.covers("/subscriptions/s/resourceGroups/rg2/providers/x/y/z"));
        assert!(!l.covers("/subscriptions/s"));
    }

    #[test]
    fn levels() {
        let rule =
            format!("{RG}/providers/Microsoft.Network/networkSecurityGroups/n/securityRules/r");
        let cnd = [lock(RG, LockLevel::CanNotDelete)];
        assert!(check(&cnd, &rule, false).is_ok());
        let e = check(&cnd, &rule, true).unwrap_err();
        assert_eq!((e.status.as_u16(), e.code.as_str()), (409, "ScopeLocked"));
        assert_eq!(
            e.message,
            format!(
                "The scope '{rule}' cannot perform delete operation because following scope(s) are locked: '{RG}'. Please remove the lock and try again."
            )
        );
        let ro = [lock(RG, LockLevel::ReadOnly)];
        let e = check(&ro, &rule, false).unwrap_err();
        assert!(
            e.message.contains("cannot perform write operation"),
            "{}",
            e.message
        );
        assert!(check(&ro, "/subscriptions/s/resourceGroups/other", false).is_ok());
    }
}
