//! Portcullis: just-in-time network access to Azure VMs, as a Kubernetes operator.
//!
//! Layout: `api` (CRD types), `plan` (pure: validate, plan, diff), `azure` (the Azure edge),
//! `controller` (the reconcile loops), `defender` (to and from Defender for Cloud JIT policies).

pub mod admission;
pub mod api;
pub mod azure;
pub mod cli;
pub mod controller;
pub mod defender;
pub mod locks;
pub mod notify;
pub mod plan;
pub mod webhook;
