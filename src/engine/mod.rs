//! Engines execute a launch plan: the norm pass and the update pass.

pub mod cpu;
