//! `sim`: runs the scheduling simulators (`cargo xtask sim [cpu] <scenario>`, `cargo xtask sim io <scenario>`).

use std::process::ExitCode;

fn main() -> ExitCode {
    let args: Vec<String> = std::env::args().skip(1).collect();
    let result = match args.first().map(String::as_str) {
        Some("io") => sched::iops::sim::cli(&args[1..]),
        Some("cpu") => sched::cpu::sim::cli(&args[1..]),
        _ => sched::cpu::sim::cli(&args),
    };
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(message) => {
            eprintln!("sim: {message}");
            ExitCode::FAILURE
        }
    }
}
