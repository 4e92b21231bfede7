//! Simulator (std only).

/// Runs the simulator with command-line arguments (after the `io` selector).
pub fn cli(_args: &[String]) -> Result<(), String> {
    Err("not built yet".into())
}
