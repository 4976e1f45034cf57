//! What happens to objects that do not decode (see `decode`): each is reported once per
//! version (a Warning Event on it, a log line, the `portcullis_undecodable_objects` gauge), a
//! grant's NSGs are synced at once so what it opened closes, and a policy's rules are kept.

use std::collections::HashMap;

use jiff::Timestamp;
use tokio::sync::mpsc::UnboundedReceiver;
use tracing::{info, warn};

use super::context::Ctx;
use super::decode::{Seen, Undecodable};

/// Runs until every sender is gone (the controllers stopped).
pub async fn run(mut seen: UnboundedReceiver<Seen>, ctx: Ctx) {
    let mut undecodable: HashMap<String, Undecodable> = HashMap::new();
    while let Some(event) = seen.recv().await {
        match event {
            Seen::Undecodable(report) => {
                let uid = report.reference.uid.clone().unwrap_or_default();
                let is_new = undecodable.get(&uid).is_none_or(|known| {
                    known.reference.resource_version != report.reference.resource_version
                });
                ctx.world
                    .set_undecodable(&uid, Some(report.kind == "JitPolicy"));
                if is_new {
                    quarantined(&ctx, &report).await;
                }
                undecodable.insert(uid, *report);
            }
            Seen::Decoded { uid } => {
                if undecodable.remove(&uid).is_some() {
                    ctx.world.set_undecodable(&uid, None);
                    info!(uid, "object decodes again");
                }
            }
            Seen::Deleted { uid } => {
                undecodable.remove(&uid);
                ctx.world.set_undecodable(&uid, None);
                // A copy kept in memory must never keep a deleted object's rules alive.
                ctx.world.forget(&uid);
            }
        }
        for kind in ["AccessGrant", "JitPolicy", "AccessApproval", "JitScope"] {
            let n = undecodable.values().filter(|u| u.kind == kind).count();
            ctx.telemetry.set_undecodable(kind, n);
        }
    }
}

async fn quarantined(ctx: &Ctx, report: &Undecodable) {
    let consequence = match report.kind {
        "JitPolicy" => "its Deny rules stay as they stand; no grant activates under it",
        "AccessApproval" => "it does not count as a decision",
        "JitScope" => "it allows nothing: a policy only it allowed is refused (OutOfScope)",
        _ => "it is treated as gone: whatever it opened is closed",
    };
    let note = format!(
        "cannot decode this object ({}); {consequence}. Fix or delete it.",
        report.error
    );
    warn!(
        kind = report.kind,
        namespace = report.reference.namespace.as_deref().unwrap_or_default(),
        name = report.reference.name.as_deref().unwrap_or_default(),
        error = %report.error,
        "object does not decode"
    );
    ctx.event_for(&report.reference, true, "Undecodable", "Decode", note)
        .await;
    // Off this loop: a slow NSG must not delay what the streams report next.
    let (ctx, nsgs) = (ctx.clone(), report.nsgs.clone());
    tokio::spawn(async move {
        let now = Timestamp::now();
        for nsg in &nsgs {
            if let Err(e) = ctx.nsgs.sync(nsg, || ctx.world.for_nsg(nsg), now).await {
                warn!(nsg, error = %e, "could not close the rules of an undecodable grant; the resync retries");
            }
        }
    });
}
