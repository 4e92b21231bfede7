//! IOPS simulator: `sim io list`, `sim io <scenario> [--out DIR] [--seed N] [--duration SECONDS]`.
//!
//! The engine, device model, workloads, dispatchers and scenarios need only `alloc` (integer
//! arithmetic), so the guarantee tests run them under plain `cargo test`; the command line and the
//! report writers (JSON, CSV, PNG) need the `std` feature.
//!
//! Runs one scenario's trace through four dispatchers side by side — this crate's partitioner,
//! per-volume token buckets (blk-throttle style), plain FIFO, and textbook mClock with
//! arrival-anchored reservation tags (the partitioner's rule before the overload fix, see
//! [`dispatchers`]) — on the same simulated device, and
//! writes `table.txt`, `results.json`, `windows.csv` and `plot.png` to `--out` (default
//! `sim-out/io/<scenario>`), printing the table.
//!
//! Modules: [`model`] (RNG, device, workloads), [`dispatchers`], [`engine`] (event loop, metrics),
//! [`scenarios`], `report` (`std` feature).

pub mod dispatchers;
pub mod engine;
pub mod model;
#[cfg(feature = "std")]
pub mod report;
pub mod scenarios;

use alloc::string::{String, ToString};
use alloc::vec::Vec;

use dispatchers::{
    ArrivalMclockDispatcher, FifoDispatcher, PartitionerDispatcher, SimDispatcher,
    TokenBucketDispatcher,
};
use engine::{RunResult, Scenario};

use crate::iops::DeviceConfig;

/// The partitioner's device configuration for a scenario.
#[must_use]
pub fn device_config(sc: &Scenario) -> DeviceConfig {
    DeviceConfig {
        capacity_iops: sc.capacity_iops,
        cost: sc.cost,
        window_ns: sc.window_ns,
        max_queue: 1 << 16,
        ..DeviceConfig::default()
    }
}

/// Runs `sc` through the four dispatchers, in this order: partitioner, token bucket, FIFO, and
/// textbook mClock with arrival-anchored reservation tags (the partitioner's rule before its
/// overload fix).
pub fn run_all(sc: &Scenario) -> Result<Vec<RunResult>, String> {
    let configs: Vec<_> = sc.volumes.iter().map(|v| v.config).collect();
    let mut part =
        PartitionerDispatcher::new(device_config(sc), &configs).map_err(|e| e.to_string())?;
    let mut tb = TokenBucketDispatcher::new(sc.capacity_iops, &configs);
    let mut fifo = FifoDispatcher::default();
    let mut mclock = ArrivalMclockDispatcher::new(&configs);
    let dispatchers: [&mut dyn SimDispatcher; 4] = [&mut part, &mut tb, &mut fifo, &mut mclock];
    dispatchers
        .into_iter()
        .map(|d| engine::run(sc, d))
        .collect()
}

/// Command-line entry (arguments after `io`).
#[cfg(feature = "std")]
pub fn cli(args: &[String]) -> Result<(), String> {
    let usage =
        "usage: sim io list | sim io <scenario> [--out DIR] [--seed N] [--duration SECONDS]";
    let Some(name) = args.first() else {
        return Err(usage.into());
    };
    if name == "list" {
        for (n, d) in scenarios::list() {
            println!("{n:<12} {d}");
        }
        return Ok(());
    }
    let mut sc = scenarios::by_name(name)
        .ok_or_else(|| format!("unknown scenario {name:?} (try `sim io list`)"))?;
    use std::path::PathBuf;
    let mut out = PathBuf::from("sim-out/io").join(name);
    let mut it = args[1..].iter();
    while let Some(a) = it.next() {
        match a.as_str() {
            "--out" => out = PathBuf::from(it.next().ok_or("--out needs a directory")?),
            "--seed" => {
                sc.seed = it
                    .next()
                    .ok_or("--seed needs a number")?
                    .parse()
                    .map_err(|e| format!("--seed: {e}"))?;
            }
            "--duration" => {
                let secs: u64 = it
                    .next()
                    .ok_or("--duration needs seconds")?
                    .parse()
                    .map_err(|e| format!("--duration: {e}"))?;
                if secs == 0 || secs > 100_000 {
                    return Err("--duration must be 1..=100000 seconds".into());
                }
                sc.duration_ns = secs * sc.window_ns;
            }
            other => return Err(format!("unknown argument {other:?}; {usage}")),
        }
    }
    let runs = run_all(&sc)?;
    std::fs::create_dir_all(&out).map_err(|e| format!("{}: {e}", out.display()))?;
    let table = report::table(&sc, &runs);
    print!("{table}");
    let write = |file: &str, text: &str| -> Result<(), String> {
        let p = out.join(file);
        std::fs::write(&p, text).map_err(|e| format!("{}: {e}", p.display()))
    };
    write("table.txt", &table)?;
    let json = serde_json::json!({ "scenario": sc, "runs": runs });
    write(
        "results.json",
        &serde_json::to_string_pretty(&json).map_err(|e| e.to_string())?,
    )?;
    write("windows.csv", &report::csv(&runs))?;
    report::plot(&sc, &runs, &out.join("plot.png"))?;
    println!(
        "wrote {}/{{table.txt,results.json,windows.csv,plot.png}}",
        out.display()
    );
    Ok(())
}
