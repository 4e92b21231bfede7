//! CPU scheduler simulator (std only): `sim cpu <scenario> [--out DIR] [--seed N] [--duration-ms N]`.
//!
//! Design: a scenario ([`scenarios`]) is run on the no_std [`crate::cpu::harness`] (the same driver the
//! property tests use), sampled every `sample_ns` of virtual time; an optional simulated credit pool answers the
//! scheduler's credit requests with grants staged half now, half per period. The run produces a report
//! ([`report`]): `report.json` (configuration, per-vCPU results, samples), `samples.csv`, `periods.csv`
//! (per-vCPU per-period telemetry) and `plot.png` (shares and balances over time), plus a summary table on
//! stdout. Everything is deterministic for a given scenario and seed.

pub mod report;
pub mod scenarios;

use std::path::PathBuf;

use crate::cpu::config::{SchedParams, PPM};
use crate::cpu::harness::{Harness, Workload};
use crate::cpu::ledger::LedgerCounters;
use crate::cpu::pool::{Grant, GrantSchedule};
use crate::cpu::scheduler::Scheduler;
use crate::cpu::telemetry::PeriodRecord;
use crate::cpu::CpuId;

use scenarios::Scenario;

/// Results for one vCPU.
#[derive(Clone, Debug, serde::Serialize)]
pub struct MemberResult {
    /// Label.
    pub label: String,
    /// Physical CPU.
    pub cpu: CpuId,
    /// Configuration.
    pub config: crate::cpu::config::VcpuConfig,
    /// Workload.
    pub workload: Workload,
    /// Baseline share, ppm.
    pub baseline_ppm: u64,
    /// CPU time received.
    pub received_ns: u64,
    /// Share of the simulated time, ppm.
    pub share_ppm: u64,
    /// Expected share, if the model gives it in closed form.
    pub expected_ppm: Option<u64>,
    /// |share - expected|, ppm.
    pub error_ppm: Option<u64>,
    /// Time charged to the baseline server.
    pub baseline_ns: u64,
    /// Time charged to the burst tier.
    pub burst_ns: u64,
    /// Final balance.
    pub balance_end_ns: i64,
    /// Ledger counters.
    pub counters: LedgerCounters,
    /// Periods in which the vCPU was runnable throughout.
    pub periods_checked: u64,
    /// Of those, periods with less than budget minus the overrun bound.
    pub guarantee_misses: u64,
    /// For periodic jobs: deadlines by which the released work was not done.
    pub job_deadlines: u64,
    /// Of those, missed.
    pub job_misses: u64,
    /// Largest wake-to-run latency.
    pub max_wake_latency_ns: u64,
    /// Mean wake-to-run latency.
    pub mean_wake_latency_ns: u64,
}

/// One sample of the time series.
#[derive(Clone, Debug, serde::Serialize)]
pub struct Sample {
    /// End of the sampled interval.
    pub t_ns: u64,
    /// Share of the interval per member, ppm.
    pub share_ppm: Vec<u64>,
    /// Balance per member at `t_ns`.
    pub balance_ns: Vec<i64>,
}

/// Simulated credit-pool outcome.
#[derive(Clone, Debug, Default, serde::Serialize)]
pub struct PoolResult {
    /// Pool credits at start.
    pub start_ns: u64,
    /// Debited from the pool (before each grant was sent).
    pub debited_ns: u64,
    /// Credited on the host (applied grants).
    pub applied_ns: u64,
    /// Still staged on the host at the end.
    pub staged_ns: u64,
    /// Requests received.
    pub requests: u64,
    /// Requests declined (pool empty).
    pub declined: u64,
    /// When the pool ran dry.
    pub dry_at_ns: Option<u64>,
}

/// A whole run.
#[derive(Clone, Debug, serde::Serialize)]
pub struct RunReport {
    /// The scenario.
    pub scenario: Scenario,
    /// Scheduler parameters.
    pub params: SchedParams,
    /// Seed.
    pub seed: u64,
    /// Scheduling decisions taken.
    pub decisions: u64,
    /// Per-vCPU results.
    pub members: Vec<MemberResult>,
    /// Time series.
    pub samples: Vec<Sample>,
    /// Pool outcome, if the scenario has a pool.
    pub pool: Option<PoolResult>,
    /// Per-period telemetry.
    #[serde(skip)]
    pub records: Vec<PeriodRecord>,
}

/// Places the members of a scenario worst-fit decreasing (`Scheduler::place`) where they have no fixed CPU (the
/// `random` scenario); members that fit nowhere are dropped with a note.
fn place(sc: &mut Scenario, params: SchedParams) -> Result<Vec<String>, String> {
    if sc.name != "random" {
        return Ok(Vec::new());
    }
    let mut probe = Scheduler::new(sc.cpus, params).map_err(|e| e.to_string())?;
    let mut notes = Vec::new();
    let mut kept = Vec::new();
    for mut m in std::mem::take(&mut sc.members) {
        match probe.add_vcpu_placed(m.spec.cfg, 0) {
            Ok(id) => {
                m.spec.cpu = probe.status(id).map_err(|e| e.to_string())?.cpu;
                kept.push(m);
            }
            Err(e) => notes.push(format!("{} not admitted: {e}", m.label)),
        }
    }
    sc.members = kept;
    Ok(notes)
}

/// Runs a scenario.
///
/// # Errors
/// Configuration or scheduler errors, with the reason.
pub fn run(mut sc: Scenario, seed: u64) -> Result<(RunReport, Vec<String>), String> {
    let params = SchedParams::default();
    let notes = place(&mut sc, params)?;
    let specs: Vec<_> = sc.members.iter().map(|m| m.spec).collect();
    let mut h =
        Harness::new(params, sc.cpus, &specs, seed, sc.noise_ns).map_err(|e| e.to_string())?;
    let mut samples = Vec::new();
    let mut pool = sc.pool.map(|p| PoolResult {
        start_ns: p.credits_ns,
        ..PoolResult::default()
    });
    let mut pool_left = sc.pool.map_or(0, |p| p.credits_ns);
    let mut next_grant_id = 1u64;
    let step = sc.sample_ns.max(1);
    let mut t = 0;
    while t < sc.duration_ns {
        let prev = t;
        t = (t + step).min(sc.duration_ns);
        h.run_until(t).map_err(|e| e.to_string())?;
        if let (Some(cfg), Some(res)) = (sc.pool, pool.as_mut()) {
            for req in h.sched.take_credit_requests() {
                res.requests += 1;
                let grant = req.credits_ns.min(pool_left);
                if grant == 0 {
                    res.declined += 1;
                    h.sched.request_declined(req.vcpu, req.request_id);
                    continue;
                }
                // Debit first (the pool's ledger is authoritative), then send.
                pool_left -= grant;
                res.debited_ns += grant;
                if pool_left == 0 && res.dry_at_ns.is_none() {
                    res.dry_at_ns = Some(t);
                }
                let now_part =
                    u64::try_from(u128::from(grant) * u128::from(cfg.now_ppm) / u128::from(PPM))
                        .unwrap_or(grant);
                let rest = grant - now_part;
                let mut send = |credits_ns: u64, schedule: GrantSchedule| -> Result<(), String> {
                    if credits_ns == 0 {
                        return Ok(());
                    }
                    let g = Grant {
                        grant_id: next_grant_id,
                        vcpu: req.vcpu,
                        credits_ns,
                        schedule,
                        request_id: Some(req.request_id),
                    };
                    next_grant_id += 1;
                    h.sched
                        .apply_grant(g, t)
                        .map(|_| ())
                        .map_err(|e| e.to_string())
                };
                send(now_part, GrantSchedule::Now)?;
                send(
                    rest,
                    GrantSchedule::PerPeriod {
                        per_period_ns: rest.div_ceil(cfg.instalments.max(1)),
                    },
                )?;
            }
        }
        let mut share = Vec::new();
        let mut bal = Vec::new();
        for i in 0..h.len() {
            share.push(h.trace(i).run_in(prev, t) * PPM / (t - prev).max(1));
            bal.push(
                h.sched
                    .status(h.id(i))
                    .map_err(|e| e.to_string())?
                    .balance_ns,
            );
        }
        samples.push(Sample {
            t_ns: t,
            share_ppm: share,
            balance_ns: bal,
        });
    }
    if let Some(res) = pool.as_mut() {
        for i in 0..h.len() {
            let st = h.sched.status(h.id(i)).map_err(|e| e.to_string())?;
            res.applied_ns += st.counters.granted;
            res.staged_ns += st.staged_grant_ns;
        }
    }
    let members = results(&sc, &h, params)?;
    let report = RunReport {
        decisions: h.decisions(),
        records: h.records().to_vec(),
        scenario: sc,
        params,
        seed,
        members,
        samples,
        pool,
    };
    Ok((report, notes))
}

fn results(sc: &Scenario, h: &Harness, params: SchedParams) -> Result<Vec<MemberResult>, String> {
    let o = params.overrun_bound_ns;
    let dur = sc.duration_ns.max(1);
    let mut out = Vec::new();
    for (i, m) in sc.members.iter().enumerate() {
        let st = h.sched.status(h.id(i)).map_err(|e| e.to_string())?;
        let c = m.spec.cfg;
        let tr = h.trace(i);
        let received = tr.run_in(0, dur);
        let share = received * PPM / dur;
        let (mut checked, mut misses) = (0, 0);
        let mut a = 0;
        while a + c.period_ns <= dur {
            if tr.runnable_throughout(a, a + c.period_ns) {
                checked += 1;
                if tr.run_in(a, a + c.period_ns) + o < c.budget_ns {
                    misses += 1;
                }
            }
            a += c.period_ns;
        }
        let (mut deadlines, mut job_misses) = (0, 0);
        if let Workload::Periodic {
            period_ns,
            work_ns,
            offset_ns,
        } = m.spec.workload
        {
            let mut k = 1u64;
            while offset_ns + k * period_ns <= dur {
                let d = offset_ns + k * period_ns;
                deadlines += 1;
                if tr.run_in(0, d) < k * work_ns {
                    job_misses += 1;
                }
                k += 1;
            }
        }
        let recs = h.records().iter().filter(|r| r.vcpu == h.id(i));
        let (mut max_lat, mut sum_lat, mut wakes) = (0u64, 0u64, 0u64);
        for r in recs {
            max_lat = max_lat.max(r.max_wake_latency_ns);
            sum_lat += r.total_wake_latency_ns;
            wakes += u64::from(r.wakeups);
        }
        out.push(MemberResult {
            label: m.label.clone(),
            cpu: m.spec.cpu,
            config: c,
            workload: m.spec.workload,
            baseline_ppm: c.budget_ns * PPM / c.period_ns,
            received_ns: received,
            share_ppm: share,
            expected_ppm: m.expected_ppm,
            error_ppm: m.expected_ppm.map(|e| e.abs_diff(share)),
            baseline_ns: st.total_baseline_ns,
            burst_ns: st.total_burst_ns,
            balance_end_ns: st.balance_ns,
            counters: st.counters,
            periods_checked: checked,
            guarantee_misses: misses,
            job_deadlines: deadlines,
            job_misses,
            max_wake_latency_ns: max_lat,
            mean_wake_latency_ns: sum_lat / wakes.max(1),
        });
    }
    Ok(out)
}

struct Args {
    scenario: String,
    out: Option<PathBuf>,
    seed: u64,
    duration_ms: Option<u64>,
}

fn parse(args: &[String]) -> Result<Args, String> {
    let mut a = Args {
        scenario: String::new(),
        out: None,
        seed: 1,
        duration_ms: None,
    };
    let mut it = args.iter();
    while let Some(arg) = it.next() {
        let mut value = |flag: &str| {
            it.next()
                .cloned()
                .ok_or_else(|| format!("{flag} needs a value"))
        };
        match arg.as_str() {
            "--out" => a.out = Some(PathBuf::from(value("--out")?)),
            "--seed" => {
                a.seed = value("--seed")?
                    .parse()
                    .map_err(|e| format!("--seed: {e}"))?
            }
            "--duration-ms" => {
                let v: u64 = value("--duration-ms")?
                    .parse()
                    .map_err(|e| format!("--duration-ms: {e}"))?;
                if v == 0 || v > 3_600_000 {
                    return Err("--duration-ms must be in 1..=3600000".into());
                }
                a.duration_ms = Some(v);
            }
            "-h" | "--help" => a.scenario = "help".into(),
            s if s.starts_with('-') => return Err(format!("unknown option '{s}'")),
            s if a.scenario.is_empty() => a.scenario = s.to_string(),
            s => return Err(format!("unexpected argument '{s}'")),
        }
    }
    Ok(a)
}

const USAGE: &str = "usage: sim cpu <scenario|list> [--out DIR] [--seed N] [--duration-ms N]";

/// Runs the simulator with command-line arguments (after the `cpu`/`io` selector).
///
/// # Errors
/// Bad arguments, an unknown scenario, a scheduler error or an I/O error, as a message.
pub fn cli(args: &[String]) -> Result<(), String> {
    let a = parse(args)?;
    match a.scenario.as_str() {
        "" | "help" => {
            println!("{USAGE}");
            return Ok(());
        }
        "list" => {
            for (n, d) in scenarios::LIST {
                println!("{n:<10} {d}");
            }
            return Ok(());
        }
        _ => {}
    }
    let mut sc = scenarios::build(&a.scenario, a.seed)?;
    if let Some(ms) = a.duration_ms {
        sc.duration_ns = ms * 1_000_000;
    }
    let out = a
        .out
        .unwrap_or_else(|| PathBuf::from("sim-out/cpu").join(sc.name));
    let (report, notes) = run(sc, a.seed)?;
    for n in &notes {
        println!("note: {n}");
    }
    let written = report::write_all(&report, &out)?;
    print!("{}", report::summary(&report));
    for w in written {
        println!("wrote {}", w.display());
    }
    Ok(())
}
