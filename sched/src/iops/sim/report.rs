//! Output of a simulation: printed comparison table, JSON, CSV and a PNG plot.
//!
//! The PNG plots completed IOPS per window for each volume, one panel per dispatcher, with each
//! volume's commitment as a thin line. Text needs a font ([`crate::plot_font`]); without it the plot is drawn
//! unlabelled (never an error).

use std::fmt::Write as _;
use std::path::Path;

use plotters::prelude::*;

use super::engine::{RunResult, Scenario};

/// Met fraction of demanding windows (1.0 when none demanded).
#[must_use]
pub fn met_fraction(demanding: u64, short: u64) -> f64 {
    if demanding == 0 {
        1.0
    } else {
        #[allow(clippy::cast_precision_loss)]
        let f = (demanding - short) as f64 / demanding as f64;
        f
    }
}

/// The comparison table.
#[must_use]
pub fn table(sc: &Scenario, runs: &[RunResult]) -> String {
    let mut s = String::new();
    let _ = writeln!(s, "scenario {}: {}", sc.name, sc.description);
    let _ = writeln!(
        s,
        "device model capacity ~{} IOPS, partitioner told {} IOPS; {} s, {} ms windows",
        sc.device.capacity_iops(),
        sc.capacity_iops,
        sc.duration_ns / 1_000_000_000,
        sc.window_ns / 1_000_000
    );
    let _ = writeln!(
        s,
        "{:<14} {:<9} {:>7} {:>8} {:>8} {:>8} {:>6} {:>6} {:>8} {:>8} {:>8}",
        "dispatcher",
        "volume",
        "commit",
        "offered",
        "served",
        "%commit",
        "dem-w",
        "short",
        "met%",
        "p50 ms",
        "p99 ms"
    );
    for r in runs {
        for v in &r.volumes {
            let _ = writeln!(
                s,
                "{:<14} {:<9} {:>7} {:>8} {:>8} {:>8} {:>6} {:>6} {:>7.2}% {:>8.2} {:>8.2}",
                r.dispatcher,
                v.name,
                v.committed_iops,
                v.offered_iops,
                v.served_iops,
                served_of_commitment(v.served_iops, v.committed_iops),
                v.demanding_windows,
                v.short_windows,
                100.0 * met_fraction(v.demanding_windows, v.short_windows),
                ns_ms(v.p50_ns),
                ns_ms(v.p99_ns)
            );
        }
    }
    for r in runs {
        let (dem, short) = r.volumes.iter().fold((0, 0), |(d, s), v| {
            (d + v.demanding_windows, s + v.short_windows)
        });
        let _ = writeln!(
            s,
            "{:<14} utilisation {:>6.2}%  total {:>7} IOPS  commitment met in {:>7.2}% of demanding windows ({} of {})",
            r.dispatcher,
            ppm_pct(r.utilisation_ppm),
            r.total_iops,
            100.0 * met_fraction(dem, short),
            dem - short,
            dem
        );
    }
    for r in runs {
        for v in &r.volumes {
            for c in &v.reclaims {
                let _ = writeln!(
                    s,
                    "{:<14} {:<9} back at {:>5.1} s: first window met {:<5} max latency {:>8.2} ms p99 {:>8.2} ms",
                    r.dispatcher,
                    v.name,
                    ns_ms(c.at_ns) / 1000.0,
                    c.first_window_met,
                    ns_ms(c.max_latency_ns),
                    ns_ms(c.p99_latency_ns)
                );
            }
        }
    }
    if let Some(r) = runs.first() {
        let classes: Vec<String> = r
            .volumes
            .iter()
            .map(|v| {
                format!(
                    "{} res {} share {} burst {} borrow {} boost {}",
                    v.name, v.classes[0], v.classes[1], v.classes[2], v.classes[3], v.classes[4]
                )
            })
            .collect();
        let _ = writeln!(
            s,
            "{} dispatch classes: {}",
            r.dispatcher,
            classes.join("; ")
        );
    }
    s
}

/// Served IOPS in per cent of the commitment (`-` without a commitment): under overload every
/// volume demanding more than its share should show the same figure.
fn served_of_commitment(served: u64, committed: u64) -> String {
    if committed == 0 {
        "-".into()
    } else {
        #[allow(clippy::cast_precision_loss)]
        let pct = 100.0 * served as f64 / committed as f64;
        format!("{pct:.1}%")
    }
}

fn ppm_pct(ppm: u64) -> f64 {
    #[allow(clippy::cast_precision_loss)]
    let pct = ppm as f64 / 10_000.0;
    pct
}

fn ns_ms(ns: u64) -> f64 {
    #[allow(clippy::cast_precision_loss)]
    let ms = ns as f64 / 1e6;
    ms
}

/// Per-window CSV.
#[must_use]
pub fn csv(runs: &[RunResult]) -> String {
    let mut s = String::from(
        "dispatcher,volume,window,offered,completed,committed,demanding,short,utilisation_ppm\n",
    );
    for r in runs {
        for v in &r.volumes {
            for (i, row) in v.rows.iter().enumerate() {
                let _ = writeln!(
                    s,
                    "{},{},{},{},{},{},{},{},{}",
                    r.dispatcher,
                    v.name,
                    i,
                    row.offered,
                    row.completed,
                    row.committed,
                    row.demanding,
                    row.short,
                    r.window_utilisation_ppm.get(i).copied().unwrap_or(0)
                );
            }
        }
    }
    s
}

/// Writes the PNG plot to `path`.
pub fn plot(sc: &Scenario, runs: &[RunResult], path: &Path) -> Result<(), String> {
    let labels = crate::plot_font::load();
    let height = 320 * u32::try_from(runs.len().max(1)).map_err(|_| "too many runs")?;
    let root = BitMapBackend::new(path, (1200, height)).into_drawing_area();
    root.fill(&WHITE).map_err(|e| e.to_string())?;
    let panels = root.split_evenly((runs.len().max(1), 1));
    let windows = runs
        .first()
        .and_then(|r| r.volumes.first())
        .map_or(1, |v| v.rows.len().max(1));
    #[allow(clippy::cast_precision_loss)]
    let ymax = runs
        .iter()
        .flat_map(|r| {
            r.volumes
                .iter()
                .flat_map(|v| v.rows.iter().map(|row| row.completed.max(row.committed)))
        })
        .max()
        .unwrap_or(1) as f64
        * 1.1
        * 1e9
        / sc.window_ns as f64;
    for (panel, r) in panels.iter().zip(runs) {
        let mut b = ChartBuilder::on(panel);
        b.margin(10);
        if labels {
            b.caption(
                format!(
                    "{}: {} (util {:.1}%)",
                    sc.name,
                    r.dispatcher,
                    ppm_pct(r.utilisation_ppm)
                ),
                ("sans-serif", 18),
            )
            .x_label_area_size(30)
            .y_label_area_size(60);
        }
        #[allow(clippy::cast_precision_loss)]
        let mut chart = b
            .build_cartesian_2d(0f64..windows as f64, 0f64..ymax)
            .map_err(|e| e.to_string())?;
        if labels {
            chart
                .configure_mesh()
                .x_desc("time (s)")
                .y_desc("completed IOPS")
                .draw()
                .map_err(|e| e.to_string())?;
        }
        for (i, v) in r.volumes.iter().enumerate() {
            let color = Palette99::pick(i).to_rgba();
            #[allow(clippy::cast_precision_loss)]
            let per_s = 1e9 / sc.window_ns as f64;
            #[allow(clippy::cast_precision_loss)]
            let pts: Vec<(f64, f64)> = v
                .rows
                .iter()
                .enumerate()
                .map(|(w, row)| (w as f64 + 0.5, row.completed as f64 * per_s))
                .collect();
            let series = chart
                .draw_series(LineSeries::new(pts, color.stroke_width(2)))
                .map_err(|e| e.to_string())?;
            if labels {
                series.label(v.name.clone()).legend(move |(x, y)| {
                    PathElement::new(vec![(x, y), (x + 20, y)], color.stroke_width(2))
                });
            }
            #[allow(clippy::cast_precision_loss)]
            let commit: Vec<(f64, f64)> = v
                .rows
                .iter()
                .enumerate()
                .map(|(w, row)| (w as f64 + 0.5, row.committed as f64 * per_s))
                .collect();
            chart
                .draw_series(LineSeries::new(commit, color.mix(0.5).stroke_width(1)))
                .map_err(|e| e.to_string())?;
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
    root.present().map_err(|e| e.to_string())?;
    Ok(())
}
