//! Simulator output: JSON report, CSV series, PNG plot and the stdout summary table.
//!
//! Design: the plot has two panels (share of each sampling interval, balance over time). Text needs a font:
//! DejaVu Sans is loaded at run time from the usual Debian path; without it the plot is drawn without text
//! rather than failing the run. Floating point appears only here, for display.
#![allow(clippy::cast_precision_loss)] // u64 -> f64 for display only; nanosecond totals fit f64's 53 bits.

use std::fmt::Write as _;
use std::path::{Path, PathBuf};

use plotters::prelude::*;

use super::RunReport;

fn pct(ppm: u64) -> f64 {
    ppm as f64 / 10_000.0
}

fn ms(ns: i128) -> f64 {
    ns as f64 / 1e6
}

/// Writes `report.json`, `samples.csv`, `periods.csv` and `plot.png` into `dir`.
///
/// # Errors
/// I/O or plotting errors, with the path.
pub fn write_all(r: &RunReport, dir: &Path) -> Result<Vec<PathBuf>, String> {
    std::fs::create_dir_all(dir).map_err(|e| format!("{}: {e}", dir.display()))?;
    let mut out = Vec::new();
    let json = serde_json::to_string_pretty(r).map_err(|e| e.to_string())?;
    let p = dir.join("report.json");
    std::fs::write(&p, json).map_err(|e| format!("{}: {e}", p.display()))?;
    out.push(p);
    let p = dir.join("samples.csv");
    std::fs::write(&p, samples_csv(r)).map_err(|e| format!("{}: {e}", p.display()))?;
    out.push(p);
    let p = dir.join("periods.csv");
    std::fs::write(&p, periods_csv(r)).map_err(|e| format!("{}: {e}", p.display()))?;
    out.push(p);
    let p = dir.join("plot.png");
    plot(r, &p)?;
    out.push(p);
    Ok(out)
}

/// `t_ms,vcpu,share_pct,balance_ms` per sample and vCPU.
#[must_use]
pub fn samples_csv(r: &RunReport) -> String {
    let mut s = String::from("t_ms,vcpu,share_pct,balance_ms\n");
    for smp in &r.samples {
        for (i, m) in r.scenario.members.iter().enumerate() {
            let _ = writeln!(
                s,
                "{:.3},{},{:.4},{:.6}",
                smp.t_ns as f64 / 1e6,
                m.label,
                pct(smp.share_ppm[i]),
                ms(i128::from(smp.balance_ns[i]))
            );
        }
    }
    s
}

/// One line per vCPU per closed period (the scheduler's telemetry records).
#[must_use]
pub fn periods_csv(r: &RunReport) -> String {
    let mut s = String::from(
        "vcpu,label,period,start_ns,end_ns,baseline_ns,burst_ns,earned_ns,spent_ns,discarded_ns,expired_ns,granted_ns,balance_ns,waiting_ns,throttled_ns,wakeups,max_wake_latency_ns\n",
    );
    for rec in &r.records {
        let label = usize::try_from(rec.vcpu.0)
            .ok()
            .and_then(|i| r.scenario.members.get(i))
            .map_or("?", |m| m.label.as_str());
        let _ = writeln!(
            s,
            "{},{},{},{},{},{},{},{},{},{},{},{},{},{},{},{},{}",
            rec.vcpu.0,
            label,
            rec.period,
            rec.start_ns,
            rec.end_ns,
            rec.baseline_ns,
            rec.burst_ns,
            rec.earned_ns,
            rec.spent_ns,
            rec.discarded_ns,
            rec.expired_ns,
            rec.granted_ns,
            rec.balance_ns,
            rec.waiting_ns,
            rec.throttled_ns,
            rec.wakeups,
            rec.max_wake_latency_ns
        );
    }
    s
}

/// The human summary table.
#[must_use]
pub fn summary(r: &RunReport) -> String {
    let mut s = String::new();
    let _ = writeln!(
        s,
        "scenario {} ({} s simulated, {} decisions, seed {}): {}",
        r.scenario.name,
        r.scenario.duration_ns as f64 / 1e9,
        r.decisions,
        r.seed,
        r.scenario.description
    );
    let _ = writeln!(
        s,
        "{:<11} {:>3} {:>7} {:>8} {:>8} {:>7} {:>10} {:>10} {:>10} {:>10} {:>10} {:>12} {:>10}",
        "vcpu",
        "cpu",
        "base%",
        "share%",
        "expect%",
        "err pp",
        "burst ms",
        "earned ms",
        "spent ms",
        "discard ms",
        "balance ms",
        "miss/checked",
        "job miss"
    );
    for m in &r.members {
        let _ = writeln!(
            s,
            "{:<11} {:>3} {:>7.2} {:>8.3} {:>8} {:>7} {:>10.1} {:>10.1} {:>10.1} {:>10.1} {:>10.1} {:>12} {:>10}",
            m.label,
            m.cpu,
            pct(m.baseline_ppm),
            pct(m.share_ppm),
            m.expected_ppm.map_or("-".into(), |e| format!("{:.3}", pct(e))),
            m.error_ppm.map_or("-".into(), |e| format!("{:.3}", pct(e))),
            ms(i128::from(m.burst_ns)),
            ms(i128::from(m.counters.earned)),
            ms(i128::from(m.counters.spent)),
            ms(i128::from(m.counters.discarded)),
            ms(i128::from(m.balance_end_ns)),
            format!("{}/{}", m.guarantee_misses, m.periods_checked),
            if m.job_deadlines > 0 { format!("{}/{}", m.job_misses, m.job_deadlines) } else { "-".into() },
        );
    }
    if let Some(p) = &r.pool {
        let _ = writeln!(
            s,
            "pool: start {:.1} ms, debited {:.1} ms, applied on host {:.1} ms + staged {:.1} ms, requests {} (declined {}), dry at {}",
            ms(i128::from(p.start_ns)),
            ms(i128::from(p.debited_ns)),
            ms(i128::from(p.applied_ns)),
            ms(i128::from(p.staged_ns)),
            p.requests,
            p.declined,
            p.dry_at_ns.map_or("never".into(), |t| format!("{:.0} ms", t as f64 / 1e6)),
        );
    }
    s
}

/// Draws shares (top) and balances (bottom) over time.
///
/// # Errors
/// Plotting or I/O errors.
pub fn plot(r: &RunReport, path: &Path) -> Result<(), String> {
    let labels = crate::plot_font::load();
    let root = BitMapBackend::new(path, (1200, 800)).into_drawing_area();
    root.fill(&WHITE).map_err(|e| e.to_string())?;
    let (top, bottom) = root.split_vertically(400);
    let t_end = r.scenario.duration_ns as f64 / 1e9;
    let n = r.scenario.members.len();
    let share = |i: usize| -> Vec<(f64, f64)> {
        r.samples
            .iter()
            .map(|s| (s.t_ns as f64 / 1e9, pct(s.share_ppm[i])))
            .collect()
    };
    let bal = |i: usize| -> Vec<(f64, f64)> {
        r.samples
            .iter()
            .map(|s| (s.t_ns as f64 / 1e9, ms(i128::from(s.balance_ns[i]))))
            .collect()
    };
    let (bmin, bmax) = r
        .samples
        .iter()
        .flat_map(|s| s.balance_ns.iter().map(|&b| ms(i128::from(b))))
        .fold((0f64, 1f64), |(lo, hi), b| (lo.min(b), hi.max(b)));
    // (area, title, y axis, y range, share panel?)
    let panels = [
        (
            &top,
            "CPU share per interval",
            "share (%)",
            (0.0, 105.0),
            true,
        ),
        (
            &bottom,
            "credit balance",
            "balance (ms of CPU)",
            (bmin * 1.05, bmax * 1.05),
            false,
        ),
    ];
    for (area, title, ydesc, (ylo, yhi), is_share) in panels {
        let mut b = ChartBuilder::on(area);
        b.margin(10);
        if labels {
            b.caption(format!("{}: {title}", r.scenario.name), ("sans-serif", 18))
                .x_label_area_size(30)
                .y_label_area_size(60);
        }
        let mut chart = b
            .build_cartesian_2d(0f64..t_end, ylo..yhi)
            .map_err(|e| e.to_string())?;
        if labels {
            chart
                .configure_mesh()
                .x_desc("time (s)")
                .y_desc(ydesc)
                .draw()
                .map_err(|e| e.to_string())?;
        } else {
            chart
                .configure_mesh()
                .disable_x_mesh()
                .disable_y_mesh()
                .x_labels(0)
                .y_labels(0)
                .draw()
                .map_err(|e| e.to_string())?;
        }
        for i in 0..n {
            let color = Palette99::pick(i).to_rgba();
            let pts = if is_share { share(i) } else { bal(i) };
            let series = chart
                .draw_series(LineSeries::new(pts, color.stroke_width(2)))
                .map_err(|e| e.to_string())?;
            if labels {
                let label = r.scenario.members[i].label.clone();
                series.label(label).legend(move |(x, y)| {
                    PathElement::new(vec![(x, y), (x + 20, y)], color.stroke_width(2))
                });
            }
        }
        if labels {
            chart
                .configure_series_labels()
                .background_style(WHITE.mix(0.8))
                .border_style(BLACK)
                .draw()
                .map_err(|e| e.to_string())?;
        }
    }
    root.present()
        .map_err(|e| format!("{}: {e}", path.display()))?;
    Ok(())
}
