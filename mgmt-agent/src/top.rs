//! `cvctl top`: a live terminal view in the spirit of xentop.
//!
//! Design: each refresh pulls the latest telemetry, pools and the ledger summary from the agent's API and turns
//! them into plain rows ([`gather`]); [`draw`] lays the rows out with ratatui. `--once` renders one frame into an
//! off-screen buffer and prints it, so the same view works in scripts and tests.
//!
//! Per VM: CPU % of one CPU split into baseline and burst, throttled %, balance (credits), mode; per volume:
//! IOPS against commitment and limit, p99 latency, throttled requests; per pool: balance and grants.

use std::time::Duration;

use ratatui::backend::TestBackend;
use ratatui::layout::{Constraint, Layout};
use ratatui::style::{Modifier, Style};
use ratatui::widgets::{Block, Paragraph, Row, Table};
use ratatui::{Frame, Terminal};
use serde_json::Value;

use crate::client::{field, Client, ClientError};
use crate::policy::fmt_credits;

/// Rows of one refresh.
#[derive(Debug, Clone, Default)]
pub struct TopData {
    /// Summary line.
    pub header: String,
    /// VM rows.
    pub vms: Vec<Vec<String>>,
    /// Volume rows.
    pub volumes: Vec<Vec<String>>,
    /// Pool rows.
    pub pools: Vec<Vec<String>>,
}

/// VM table columns.
pub const VM_COLS: [&str; 10] = [
    "HOST", "VM", "NAME", "VCPUS", "CPU%", "BASE%", "BURST%", "THROTL%", "BALANCE", "MODE",
];
/// Volume table columns.
pub const VOL_COLS: [&str; 9] = [
    "HOST",
    "VM",
    "VOL",
    "IOPS",
    "COMMIT",
    "LIMIT",
    "USE%",
    "P99(us)",
    "THROTTLED",
];
/// Pool table columns.
pub const POOL_COLS: [&str; 6] = ["POOL", "RES", "BALANCE", "STRATEGY", "REPLENISH", "MEMBERS"];

fn u(v: &Value, k: &str) -> u64 {
    v.get(k).and_then(Value::as_u64).unwrap_or(0)
}

fn pct(part: u64, whole: u64) -> String {
    if whole == 0 {
        return "0.0".into();
    }
    let x10 = u128::from(part) * 1000 / u128::from(whole);
    format!("{}.{}", x10 / 10, x10 % 10)
}

/// Pulls one refresh from the agent.
///
/// # Errors
/// When the agent cannot be reached or answers with an error.
pub fn gather(c: &Client) -> Result<TopData, ClientError> {
    let tel = c.get("/v1/telemetry")?;
    let vms = c.get("/v1/vms")?;
    let pools = c.get("/v1/pools")?;
    let ledger = c.get("/v1/ledger")?;
    let name_of = |host: &str, vm: u64| {
        vms["vms"]
            .as_array()
            .and_then(|a| {
                a.iter()
                    .find(|v| v["host_id"] == host && v["vm"].as_u64() == Some(vm))
            })
            .map_or_else(|| "-".to_string(), |v| field(v, "name"))
    };
    let mut d = TopData {
        header: format!(
            "pool credits debited {}  applied on hosts {}  in flight {}  ({} grants applied)",
            fmt_credits(i128::from(u(&ledger, "debited_ns"))),
            fmt_credits(i128::from(u(&ledger, "applied_ns"))),
            fmt_credits(i128::from(u(&ledger, "in_flight_ns"))),
            u(&ledger, "grants_applied"),
        ),
        ..TopData::default()
    };
    for e in tel["telemetry"].as_array().into_iter().flatten() {
        let host = field(e, "host_id");
        let s = &e["snapshot"];
        let vm = u(s, "vm");
        let window = u(s, "window_ns");
        let vcpus = s["vcpus"].as_array().cloned().unwrap_or_default();
        let sum = |k: &str| vcpus.iter().map(|c| u(c, k)).sum::<u64>();
        let balance: i128 = vcpus
            .iter()
            .map(|c| i128::from(c["balance_ns"].as_i64().unwrap_or(0)))
            .sum();
        let unlimited = vcpus.iter().any(|c| c["unlimited"].as_bool() == Some(true));
        d.vms.push(vec![
            host.clone(),
            vm.to_string(),
            name_of(&host, vm),
            vcpus.len().to_string(),
            pct(sum("baseline_ns") + sum("burst_ns"), window),
            pct(sum("baseline_ns"), window),
            pct(sum("burst_ns"), window),
            pct(sum("throttled_ns"), window),
            fmt_credits(balance),
            if unlimited {
                "unlimited".into()
            } else {
                "standard".into()
            },
        ]);
        for v in s["volumes"].as_array().into_iter().flatten() {
            let limit = u(v, "limit_iops");
            d.volumes.push(vec![
                host.clone(),
                vm.to_string(),
                u(v, "volume").to_string(),
                u(v, "iops").to_string(),
                u(v, "committed_iops").to_string(),
                if limit == 0 {
                    "-".into()
                } else {
                    limit.to_string()
                },
                pct(u(v, "iops"), u(v, "committed_iops")),
                (u(v, "latency_p99_ns") / 1000).to_string(),
                u(v, "throttled").to_string(),
            ]);
        }
    }
    for p in pools["pools"].as_array().into_iter().flatten() {
        d.pools.push(vec![
            field(p, "name"),
            field(p, "resource"),
            fmt_credits(i128::from(u(p, "balance_ns"))),
            p["strategy"]["kind"].as_str().unwrap_or("-").into(),
            p["replenish"]["kind"].as_str().unwrap_or("-").into(),
            p["members"].as_array().map_or(0, Vec::len).to_string(),
        ]);
    }
    Ok(d)
}

fn table<'a>(title: &'a str, cols: &'a [&'a str], rows: &'a [Vec<String>]) -> Table<'a> {
    let widths: Vec<Constraint> = cols
        .iter()
        .enumerate()
        .map(|(i, h)| {
            let w = rows
                .iter()
                .map(|r| r.get(i).map_or(0, String::len))
                .max()
                .unwrap_or(0)
                .max(h.len());
            Constraint::Length(u16::try_from(w).unwrap_or(u16::MAX))
        })
        .collect();
    Table::new(rows.iter().map(|r| Row::new(r.clone())), widths)
        .header(Row::new(cols.to_vec()).style(Style::default().add_modifier(Modifier::BOLD)))
        .block(Block::bordered().title(title))
}

/// Draws one frame.
pub fn draw(f: &mut Frame<'_>, d: &TopData) {
    let h = |n: usize| Constraint::Length(u16::try_from(n + 3).unwrap_or(u16::MAX));
    let [head, vms, vols, pools] = Layout::vertical([
        Constraint::Length(1),
        h(d.vms.len()),
        h(d.volumes.len()),
        Constraint::Min(3),
    ])
    .areas(f.area());
    f.render_widget(
        Paragraph::new(format!("cvctl top — {}  (q to quit)", d.header)),
        head,
    );
    f.render_widget(
        table(
            "VMs (CPU % of one CPU over the last window)",
            &VM_COLS,
            &d.vms,
        ),
        vms,
    );
    f.render_widget(
        table("Volumes (IOPS vs commitment)", &VOL_COLS, &d.volumes),
        vols,
    );
    f.render_widget(table("Credit pools", &POOL_COLS, &d.pools), pools);
}

/// Renders one frame off-screen and returns it as text.
#[must_use]
pub fn render_text(d: &TopData, width: u16, height: u16) -> String {
    let Ok(mut t) = Terminal::new(TestBackend::new(width, height)) else {
        return String::new();
    };
    if t.draw(|f| draw(f, d)).is_err() {
        return String::new();
    }
    let buf = t.backend().buffer();
    let mut out = String::new();
    for y in 0..buf.area.height {
        let line: String = (0..buf.area.width)
            .map(|x| buf[(x, y)].symbol().to_string())
            .collect();
        out.push_str(line.trim_end());
        out.push('\n');
    }
    out
}

/// Runs the live view until `q`/Esc (or prints one frame with `once`).
///
/// # Errors
/// Agent or terminal errors.
pub fn run(c: &Client, interval: Duration, once: bool) -> Result<(), Box<dyn std::error::Error>> {
    if once {
        let d = gather(c)?;
        let rows = d.vms.len() + d.volumes.len() + d.pools.len() + 10;
        print!(
            "{}",
            render_text(&d, 120, u16::try_from(rows).unwrap_or(u16::MAX))
        );
        return Ok(());
    }
    use ratatui::crossterm::event::{self, Event, KeyCode};
    let mut term = ratatui::init();
    let result = (|| -> Result<(), Box<dyn std::error::Error>> {
        loop {
            let d = gather(c).unwrap_or_else(|e| TopData {
                header: format!("agent unreachable: {e}"),
                ..TopData::default()
            });
            term.draw(|f| draw(f, &d))?;
            if event::poll(interval)? {
                if let Event::Key(k) = event::read()? {
                    if matches!(k.code, KeyCode::Char('q') | KeyCode::Esc) {
                        return Ok(());
                    }
                }
            }
        }
    })();
    ratatui::restore();
    result
}
