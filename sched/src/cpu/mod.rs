//! Hard-real-time rolling-credit vCPU scheduler (issue 3).

#[cfg(feature = "std")]
pub mod sim;
