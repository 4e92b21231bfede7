//! Tests 2 and 3 of issue 3: exact credit conservation in every run, and the rolling-credit behaviour
//! (earn while quiet, burst above baseline paid ns for ns, exactly the baseline at zero balance).

use proptest::prelude::*;
use sched::cpu::harness::{Harness, VcpuSpec, Workload};
use sched::cpu::{BurstMode, Grant, GrantSchedule, PeriodRecord, SchedParams, VcpuConfig};

const MS: u64 = 1_000_000;

fn records_of(h: &Harness, i: usize) -> Vec<PeriodRecord> {
    h.records()
        .iter()
        .filter(|r| r.vcpu == h.id(i))
        .copied()
        .collect()
}

/// Conservation over the telemetry of one vCPU: launch + sum(earned - discarded - expired + granted - spent)
/// equals the balance reported at every period close, and the ledger's counters balance exactly.
fn assert_conserved(h: &Harness, i: usize, launch: u64) {
    let mut bal = i128::from(launch);
    for r in records_of(h, i) {
        bal += i128::from(r.earned_ns) - i128::from(r.discarded_ns) - i128::from(r.expired_ns)
            + i128::from(r.granted_ns)
            - i128::from(r.spent_ns);
        assert_eq!(
            bal,
            i128::from(r.balance_ns),
            "vcpu {i} period {}",
            r.period
        );
    }
    let ledger = h.sched.ledger(h.id(i)).expect("vcpu");
    assert_eq!(ledger.conservation_error(), 0);
    let period = h.sched.status(h.id(i)).expect("vcpu").period;
    assert!(
        ledger.lots().all(|l| l.period < period),
        "a lot is not from an earlier period"
    );
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 2000, failure_persistence: None, ..ProptestConfig::default() })]

    #[test]
    fn credits_are_conserved_exactly(
        vcpus in prop::collection::vec(
            (1u64..4, prop::sample::select(vec![1u64, 2, 5]), 0u64..3, 0u64..20, prop::option::of(1u32..6),
             any::<bool>(), 0u8..4, any::<u64>()),
            1..5),
        grants in prop::collection::vec((0usize..5, 1u64..5_000_000, 0u8..3, 0u64..4), 0..6),
        noise in any::<u64>(),
    ) {
        let params = SchedParams::default();
        let specs: Vec<VcpuSpec> = vcpus.iter().map(|&(q, t, acc, launch, life, unl, wl, seed)| {
            let period = t * MS;
            let mut cfg = VcpuConfig::baseline(q * period / 20, period);
            cfg.accrual_ns = acc * MS / 2;
            cfg.balance_cap_ns = 3 * MS;
            cfg.launch_balance_ns = (launch * MS / 10).min(cfg.balance_cap_ns);
            cfg.credit_lifetime_periods = life;
            if unl {
                cfg.burst_mode = BurstMode::Unlimited { overdraft_limit_ns: MS };
            }
            let workload = match wl {
                0 => Workload::Busy,
                1 => Workload::Random { seed, max_on_ns: 3 * period, max_off_ns: 4 * period },
                2 => Workload::SleepThenBurst { sleep_ns: 4 * period },
                _ => Workload::OnOff { on_ns: period, off_ns: 2 * period, phase_ns: 0 },
            };
            VcpuSpec { cpu: 0, cfg, workload }
        }).collect();
        let mut h = Harness::new(params, 1, &specs, noise, params.overrun_bound_ns)
            .map_err(|e| TestCaseError::fail(e.to_string()))?;
        for (step, &(who, amount, kind, id)) in grants.iter().enumerate() {
            let t = (u64::try_from(step).unwrap_or(0) + 1) * 7 * MS;
            h.run_until(t).map_err(|e| TestCaseError::fail(e.to_string()))?;
            let schedule = match kind {
                0 => GrantSchedule::Now,
                1 => GrantSchedule::PerPeriod { per_period_ns: amount / 3 + 1 },
                _ => GrantSchedule::AfterEvent { event: 9 },
            };
            let g = Grant { grant_id: id, vcpu: h.id(who % specs.len()), credits_ns: amount, schedule, request_id: None };
            let _ = h.sched.apply_grant(g, h.now());
        }
        h.sched.signal_event(9, h.now());
        h.run_until(80 * MS).map_err(|e| TestCaseError::fail(e.to_string()))?;
        for (i, s) in specs.iter().enumerate() {
            assert_conserved(&h, i, s.cfg.launch_balance_ns);
        }
    }
}

#[test]
fn quiet_then_burst_spends_exactly_the_time_above_baseline() {
    // 2 ms per 10 ms baseline, 1 ms accrual per period; quiet for 5 periods, then always busy.
    let mut cfg = VcpuConfig::baseline(2 * MS, 10 * MS);
    cfg.accrual_ns = MS;
    let spec = VcpuSpec {
        cpu: 0,
        cfg,
        workload: Workload::SleepThenBurst { sleep_ns: 50 * MS },
    };
    let mut h = Harness::new(SchedParams::default(), 1, &[spec], 0, 0).expect("admitted");
    h.run_until(120 * MS).expect("runs");
    let recs = records_of(&h, 0);
    // Quiet periods 1..=5: no CPU, 1 ms earned each.
    for r in &recs[..5] {
        assert_eq!(r.baseline_ns + r.burst_ns, 0);
        assert_eq!(r.earned_ns, MS);
    }
    assert_eq!(recs[4].balance_ns, 5_000_000);
    let mut balance = recs[4].balance_ns;
    for r in &recs[5..] {
        let used = r.baseline_ns + r.burst_ns;
        let above = used.saturating_sub(cfg.budget_ns);
        assert!(used >= cfg.budget_ns, "period {} below baseline", r.period);
        assert_eq!(
            r.spent_ns, above,
            "period {}: spent must equal the time above baseline",
            r.period
        );
        assert_eq!(
            r.balance_ns,
            balance - i64::try_from(above).expect("fits")
                + i64::try_from(r.earned_ns).expect("fits")
        );
        balance = r.balance_ns;
    }
    // Period 6: baseline + the whole 5 ms balance; later: baseline + the previous period's accrual.
    assert_eq!(recs[5].baseline_ns + recs[5].burst_ns, 7 * MS);
    assert!(recs[6..]
        .iter()
        .all(|r| r.baseline_ns + r.burst_ns == 3 * MS));
    // Every spent credit came from an earlier period.
    assert!(h
        .sched
        .ledger(h.id(0))
        .expect("vcpu")
        .lots()
        .all(|l| l.period < h.sched.status(h.id(0)).expect("vcpu").period));
}

#[test]
fn zero_balance_standard_vcpu_gets_exactly_its_baseline() {
    let mut held = VcpuConfig::baseline(2 * MS, 10 * MS);
    held.accrual_ns = 0;
    let mut other = VcpuConfig::baseline(3 * MS, 10 * MS);
    other.launch_balance_ns = 0;
    other.accrual_ns = 0;
    // Alone first (the CPU idles rather than run a vCPU without credits), then next to a bursting neighbour.
    for specs in [
        vec![VcpuSpec {
            cpu: 0,
            cfg: held,
            workload: Workload::Busy,
        }],
        vec![
            VcpuSpec {
                cpu: 0,
                cfg: held,
                workload: Workload::Busy,
            },
            VcpuSpec {
                cpu: 0,
                cfg: VcpuConfig {
                    accrual_ns: 3 * MS,
                    ..other
                },
                workload: Workload::Busy,
            },
        ],
    ] {
        let mut h = Harness::new(SchedParams::default(), 1, &specs, 0, 0).expect("admitted");
        h.run_until(200 * MS).expect("runs");
        for k in 0..20 {
            assert_eq!(
                h.trace(0).run_in(k * 10 * MS, (k + 1) * 10 * MS),
                2 * MS,
                "period {k}"
            );
        }
    }
}

#[test]
fn cap_discards_and_expiry_are_counted_separately() {
    let mut cfg = VcpuConfig::baseline(MS, 10 * MS);
    cfg.accrual_ns = MS;
    cfg.balance_cap_ns = 3 * MS;
    let spec = VcpuSpec {
        cpu: 0,
        cfg,
        workload: Workload::Idle,
    };
    let mut h = Harness::new(SchedParams::default(), 1, &[spec], 0, 0).expect("admitted");
    h.run_until(100 * MS + 1).expect("runs");
    let c = h.sched.ledger(h.id(0)).expect("vcpu").counters();
    assert_eq!((c.earned, c.discarded, c.expired), (10 * MS, 7 * MS, 0));
    let mut cfg2 = cfg;
    cfg2.balance_cap_ns = 100 * MS;
    cfg2.credit_lifetime_periods = Some(2);
    let spec = VcpuSpec {
        cpu: 0,
        cfg: cfg2,
        workload: Workload::Idle,
    };
    let mut h = Harness::new(SchedParams::default(), 1, &[spec], 0, 0).expect("admitted");
    h.run_until(100 * MS + 1).expect("runs");
    let c = h.sched.ledger(h.id(0)).expect("vcpu").counters();
    assert_eq!(c.discarded, 0);
    // 10 lots earned, each lives 2 periods: after the 10th close only lots 9 and 10 remain.
    assert_eq!(c.expired, 8 * MS);
    assert_eq!(h.sched.status(h.id(0)).expect("vcpu").balance_ns, 2_000_000);
    assert_eq!(
        h.sched.ledger(h.id(0)).expect("vcpu").conservation_error(),
        0
    );
}
