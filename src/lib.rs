//! Portcullis: just-in-time network access to Azure VMs, as a Kubernetes operator.
//!
//! Layout: `api` (CRD types), `plan` (pure: validate, plan, diff), `azure` (the Azure edge),
//! `controller` (the reconcile loops).

pub mod admission;
pub mod api;
pub mod azure;
pub mod cli;
pub mod controller;
pub mod notify;
pub mod plan;
pub mod webhook;
