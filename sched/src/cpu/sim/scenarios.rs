//! Named simulator scenarios for the CPU scheduler.
//!
//! Each scenario is plain data: CPUs, duration, sampling interval, overrun noise and labelled vCPU specs
//! (configuration + workload), plus an optional simulated credit pool. Expected shares are stated where the
//! model gives them in closed form (every vCPU always busy, ample credits, no caps): baseline plus the
//! weight-proportional part of what the baselines leave.

use crate::cpu::config::{BurstMode, PoolPolicy, VcpuConfig, PPM};
use crate::cpu::harness::{Rng, VcpuSpec, Workload};

const US: u64 = 1_000;
const MS: u64 = 1_000_000;

/// A simulated credit pool answering the scheduler's requests.
#[derive(Clone, Copy, Debug, serde::Serialize)]
pub struct PoolSim {
    /// Credits in the pool at start, credit-ns.
    pub credits_ns: u64,
    /// Share of each grant applied at once (ppm); the rest is staged at `rate_divisor` instalments per period.
    pub now_ppm: u64,
    /// Number of per-period instalments for the staged part.
    pub instalments: u64,
}

/// One labelled vCPU.
#[derive(Clone, Debug, serde::Serialize)]
pub struct Member {
    /// Label used in reports and plots.
    pub label: String,
    /// Spec handed to the harness.
    #[serde(skip)]
    pub spec: VcpuSpec,
    /// Expected long-run share, ppm, when the model gives it in closed form.
    pub expected_ppm: Option<u64>,
}

/// A scenario.
#[derive(Clone, Debug, serde::Serialize)]
pub struct Scenario {
    /// Name (`sim cpu <name>`).
    pub name: &'static str,
    /// One-line description.
    pub description: &'static str,
    /// Physical CPUs.
    pub cpus: usize,
    /// Simulated time.
    pub duration_ns: u64,
    /// Sampling interval of the time series.
    pub sample_ns: u64,
    /// Overrun noise bound (uniform in `[0, noise]`, at most the overrun bound).
    pub noise_ns: u64,
    /// vCPUs.
    pub members: Vec<Member>,
    /// Optional credit pool.
    pub pool: Option<PoolSim>,
}

/// Names and descriptions of every scenario.
pub const LIST: [(&str, &str); 7] = [
    ("shares", "3 always-busy vCPUs with baselines 50/30/10% on one CPU; spare split by equal weights"),
    ("rolling", "a bursty vCPU earns credits while quiet and spends them in bursts, next to a steady burner"),
    ("realtime", "a periodic 20%-at-1ms real-time job next to three hostile unlimited burners, with overrun noise"),
    ("weights", "3 busy vCPUs with 10% baselines and weights 1:2:4 share the spare 70% by weight"),
    ("caps", "a high-weight vCPU capped at 30% next to a low-weight burner that gets the rest"),
    ("pool", "an unlimited vCPU bursts past its balance, asks a finite pool for credits, is held once it runs dry"),
    ("random", "random configurations and workloads on 2 CPUs, placed worst-fit decreasing"),
];

fn cfg(budget_ns: u64, period_ns: u64, weight: u32, launch_ns: u64) -> VcpuConfig {
    let mut c = VcpuConfig::baseline(budget_ns, period_ns);
    c.weight = weight;
    c.balance_cap_ns = c.balance_cap_ns.max(launch_ns);
    c.launch_balance_ns = launch_ns;
    c
}

fn member(label: &str, cpu: u32, cfg: VcpuConfig, workload: Workload) -> Member {
    Member {
        label: label.to_string(),
        spec: VcpuSpec { cpu, cfg, workload },
        expected_ppm: None,
    }
}

/// Fills `expected_ppm` for always-busy members with ample credits and no cap, per CPU.
fn expect_weighted(members: &mut [Member]) {
    let cpus: Vec<u32> = members.iter().map(|m| m.spec.cpu).collect();
    for cpu in cpus.iter().copied() {
        let on: Vec<usize> = (0..members.len())
            .filter(|&i| members[i].spec.cpu == cpu)
            .collect();
        let base: u64 = on
            .iter()
            .map(|&i| members[i].spec.cfg.budget_ns * PPM / members[i].spec.cfg.period_ns)
            .sum();
        let spare = PPM.saturating_sub(base);
        let wsum: u64 = on
            .iter()
            .map(|&i| u64::from(members[i].spec.cfg.weight))
            .sum();
        for &i in &on {
            let c = members[i].spec.cfg;
            members[i].expected_ppm =
                Some(c.budget_ns * PPM / c.period_ns + spare * u64::from(c.weight) / wsum.max(1));
        }
    }
}

/// Builds scenario `name` (`seed` drives the random ones).
///
/// # Errors
/// Unknown name.
pub fn build(name: &str, seed: u64) -> Result<Scenario, String> {
    let big = 100_000 * MS;
    let mut sc = Scenario {
        name: "",
        description: "",
        cpus: 1,
        duration_ns: 1_000 * MS,
        sample_ns: 10 * MS,
        noise_ns: 0,
        members: Vec::new(),
        pool: None,
    };
    match name {
        "shares" => {
            for (l, p) in [("vm50", 50), ("vm30", 30), ("vm10", 10)] {
                sc.members.push(member(
                    l,
                    0,
                    cfg(p * 100 * US, 10 * MS, 256, big),
                    Workload::Busy,
                ));
            }
            expect_weighted(&mut sc.members);
        }
        "rolling" => {
            let mut bursty = cfg(2 * MS, 10 * MS, 256, 0);
            bursty.accrual_ns = 2 * MS;
            bursty.balance_cap_ns = 400 * MS;
            let mut steady = cfg(3 * MS, 10 * MS, 256, 0);
            steady.accrual_ns = 0;
            sc.members.push(member(
                "bursty",
                0,
                bursty,
                Workload::OnOff {
                    on_ns: 500 * MS,
                    off_ns: 700 * MS,
                    phase_ns: 600 * MS,
                },
            ));
            sc.members
                .push(member("steady30", 0, steady, Workload::Busy));
            sc.duration_ns = 4_000 * MS;
        }
        "realtime" => {
            let rt = cfg(200 * US, MS, 64, 0);
            sc.members.push(member(
                "periodic20",
                0,
                rt,
                Workload::Periodic {
                    period_ns: MS,
                    work_ns: 200 * US - 2 * US,
                    offset_ns: 0,
                },
            ));
            for l in ["hostile1", "hostile2", "hostile3"] {
                let mut h = cfg(100 * US, MS, 10_000, big);
                h.burst_mode = BurstMode::Unlimited {
                    overdraft_limit_ns: big,
                };
                sc.members.push(member(l, 0, h, Workload::Busy));
            }
            sc.noise_ns = 2 * US;
        }
        "weights" => {
            for (l, w) in [("w1", 100), ("w2", 200), ("w4", 400)] {
                sc.members
                    .push(member(l, 0, cfg(MS, 10 * MS, w, big), Workload::Busy));
            }
            expect_weighted(&mut sc.members);
        }
        "caps" => {
            let mut capped = cfg(MS, 10 * MS, 1_000, big);
            capped.cap_ppm = Some(300_000);
            sc.members
                .push(member("capped30", 0, capped, Workload::Busy));
            sc.members.push(member(
                "burner",
                0,
                cfg(MS, 10 * MS, 100, big),
                Workload::Busy,
            ));
        }
        "pool" => {
            let mut u = cfg(2 * MS, 10 * MS, 256, 0);
            u.accrual_ns = 500 * US;
            u.burst_mode = BurstMode::Unlimited {
                overdraft_limit_ns: 5 * MS,
            };
            u.pool = Some(PoolPolicy {
                window_periods: 4,
                horizon_periods: 20,
                min_request_ns: MS,
                retry_periods: 10,
            });
            sc.members.push(member(
                "unlimited",
                0,
                u,
                Workload::SleepThenBurst { sleep_ns: 200 * MS },
            ));
            sc.pool = Some(PoolSim {
                credits_ns: 800 * MS,
                now_ppm: 500_000,
                instalments: 10,
            });
            sc.duration_ns = 3_000 * MS;
        }
        "random" => {
            let mut rng = Rng::new(seed);
            sc.cpus = 2;
            let n = rng.range(6, 12);
            let mut specs = Vec::new();
            for i in 0..n {
                let period =
                    [MS, 2 * MS, 5 * MS, 10 * MS][usize::try_from(rng.range(0, 3)).unwrap_or(0)];
                let budget = period * rng.range(5, 40) / 100;
                let mut c = cfg(
                    budget,
                    period,
                    u32::try_from(rng.range(1, 1000)).unwrap_or(1),
                    rng.range(0, 50) * MS,
                );
                c.accrual_ns = budget * rng.range(0, 100) / 100;
                if rng.range(0, 3) == 0 {
                    c.cap_ppm = u32::try_from(c.baseline_ppm() + rng.range(0, 300_000)).ok();
                }
                let wl = match rng.range(0, 4) {
                    0 => Workload::Busy,
                    1 => Workload::OnOff {
                        on_ns: rng.range(1, 100) * MS,
                        off_ns: rng.range(1, 100) * MS,
                        phase_ns: 0,
                    },
                    2 => Workload::Periodic {
                        period_ns: period,
                        work_ns: budget / 2,
                        offset_ns: 0,
                    },
                    3 => Workload::Random {
                        seed: rng.next_u64(),
                        max_on_ns: 50 * MS,
                        max_off_ns: 50 * MS,
                    },
                    _ => Workload::SleepThenBurst {
                        sleep_ns: rng.range(0, 500) * MS,
                    },
                };
                specs.push((format!("r{i}"), c, wl));
            }
            // Placement happens in the runner (worst fit decreasing); cpu 0 is a placeholder here.
            for (l, c, wl) in specs {
                sc.members.push(member(&l, 0, c, wl));
            }
            sc.noise_ns = 2 * US;
        }
        other => return Err(format!("unknown scenario '{other}' (try `sim cpu list`)")),
    }
    let (n, d) = LIST
        .iter()
        .find(|(n, _)| *n == name)
        .copied()
        .unwrap_or(("", ""));
    sc.name = n;
    sc.description = d;
    Ok(sc)
}
