//! The pure middle: validate -> plan -> diff. Nothing in here performs I/O.

pub mod rule;
