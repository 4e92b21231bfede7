//! Test 6 of issue 3: credit-pool requests only when needed and of the specified size; grants applied now,
//! at a rate per period, or after an event; a repeated grant id applies once.

use sched::cpu::harness::{Harness, VcpuSpec, Workload};
use sched::cpu::pool::GRANT_ID_WINDOW;
use sched::cpu::{
    BurstMode, Grant, GrantError, GrantOutcome, GrantSchedule, PoolPolicy, SchedParams, VcpuConfig,
};

const MS: u64 = 1_000_000;

fn policy() -> PoolPolicy {
    PoolPolicy {
        window_periods: 4,
        horizon_periods: 10,
        min_request_ns: 500_000,
        retry_periods: 5,
    }
}

fn unlimited(launch: u64) -> VcpuConfig {
    let mut cfg = VcpuConfig::baseline(2 * MS, 10 * MS);
    cfg.accrual_ns = 0;
    cfg.launch_balance_ns = launch;
    cfg.balance_cap_ns = 1_000 * MS;
    cfg.burst_mode = BurstMode::Unlimited {
        overdraft_limit_ns: 4 * MS,
    };
    cfg.pool = Some(policy());
    cfg
}

#[test]
fn requests_only_when_needed_and_sized_by_demand() {
    let mut standard = VcpuConfig::baseline(2 * MS, 10 * MS);
    standard.accrual_ns = 0;
    let specs = [
        // Standard, no pool: never asks even when throttled.
        VcpuSpec {
            cpu: 0,
            cfg: standard,
            workload: Workload::Busy,
        },
        // Unlimited with a balance covering its demand for the horizon: never asks.
        VcpuSpec {
            cpu: 1,
            cfg: unlimited(900 * MS),
            workload: Workload::OnOff {
                on_ns: 3 * MS,
                off_ns: 7 * MS,
                phase_ns: 0,
            },
        },
        // Unlimited, busy, empty balance: asks.
        VcpuSpec {
            cpu: 2,
            cfg: unlimited(0),
            workload: Workload::Busy,
        },
        // Unlimited but quiet (never above baseline): never asks.
        VcpuSpec {
            cpu: 3,
            cfg: unlimited(0),
            workload: Workload::OnOff {
                on_ns: MS,
                off_ns: 9 * MS,
                phase_ns: 0,
            },
        },
    ];
    let mut h = Harness::new(SchedParams::default(), 4, &specs, 0, 0).expect("admitted");
    h.run_until(30 * MS + 1).expect("runs");
    let reqs = h.sched.take_credit_requests();
    assert!(
        reqs.iter().all(|r| r.vcpu == h.id(2)),
        "only the needy vCPU asks: {reqs:?}"
    );
    assert_eq!(reqs.len(), 1, "one outstanding request at a time: {reqs:?}");
    let r = reqs[0];
    // Period 1: runs 2 ms baseline + 4 ms overdraft, then throttled 4 ms: demand above baseline 8 ms.
    let recs: Vec<_> = h
        .records()
        .iter()
        .filter(|x| x.vcpu == h.id(2))
        .copied()
        .collect();
    let first = recs[0];
    assert_eq!(
        (first.baseline_ns, first.burst_ns, first.throttled_ns),
        (2 * MS, 4 * MS, 4 * MS)
    );
    let demand = first.burst_ns + first.throttled_ns;
    assert_eq!(r.demand_per_period_ns, demand);
    assert_eq!(r.balance_ns, first.balance_ns);
    let need = i64::try_from(demand * 10).expect("fits");
    assert_eq!(
        i64::try_from(r.credits_ns).expect("fits"),
        need - first.balance_ns
    );
    // No new request while it is outstanding (retry after 5 periods).
    h.run_until(50 * MS + 1).expect("runs");
    assert!(h.sched.take_credit_requests().is_empty());
    h.run_until(60 * MS + 1).expect("runs");
    assert_eq!(
        h.sched.take_credit_requests().len(),
        1,
        "retried after retry_periods"
    );
}

#[test]
fn grants_apply_on_schedule_and_exactly_once() {
    let mut cfg = unlimited(0);
    cfg.pool = Some(policy());
    let specs = [VcpuSpec {
        cpu: 0,
        cfg,
        workload: Workload::Idle,
    }];
    let mut h = Harness::new(SchedParams::default(), 1, &specs, 0, 0).expect("admitted");
    let v = h.id(0);
    let bal = |h: &Harness| h.sched.status(v).expect("vcpu").balance_ns;
    let now = Grant {
        grant_id: 10,
        vcpu: v,
        credits_ns: 5 * MS,
        schedule: GrantSchedule::Now,
        request_id: None,
    };
    assert_eq!(h.sched.apply_grant(now, 0), Ok(GrantOutcome::Applied));
    assert_eq!(bal(&h), 5_000_000);
    assert_eq!(h.sched.apply_grant(now, 0), Ok(GrantOutcome::Duplicate));
    assert_eq!(bal(&h), 5_000_000);
    // 20 granted, 10 now and 10 after a migration finishes (the seed's example), plus 3 ms at 1 ms per period.
    let part_now = Grant {
        grant_id: 11,
        credits_ns: 10 * MS,
        ..now
    };
    let after = Grant {
        grant_id: 12,
        credits_ns: 10 * MS,
        schedule: GrantSchedule::AfterEvent { event: 77 },
        ..now
    };
    let rate = Grant {
        grant_id: 13,
        credits_ns: 3 * MS,
        schedule: GrantSchedule::PerPeriod { per_period_ns: MS },
        ..now
    };
    assert_eq!(h.sched.apply_grant(part_now, 0), Ok(GrantOutcome::Applied));
    assert_eq!(h.sched.apply_grant(after, 0), Ok(GrantOutcome::Staged));
    assert_eq!(h.sched.apply_grant(rate, 0), Ok(GrantOutcome::Staged));
    assert_eq!(h.sched.apply_grant(after, 0), Ok(GrantOutcome::Duplicate));
    assert_eq!(bal(&h), 15_000_000);
    for k in 1..=5u64 {
        h.run_until(k * 10 * MS + 1).expect("runs");
        assert_eq!(
            bal(&h),
            15_000_000 + i64::try_from(k.min(3) * MS).expect("fits"),
            "after period {k}"
        );
    }
    assert_eq!(
        h.sched.signal_event(76, h.now()),
        0,
        "other events release nothing"
    );
    assert_eq!(h.sched.signal_event(77, h.now()), 10 * MS);
    assert_eq!(
        h.sched.signal_event(77, h.now()),
        0,
        "event grants apply once"
    );
    assert_eq!(bal(&h), 28_000_000);
    let c = h.sched.ledger(v).expect("vcpu").counters();
    assert_eq!(c.granted, 28 * MS);
    assert_eq!(h.sched.ledger(v).expect("vcpu").conservation_error(), 0);
}

#[test]
fn grant_id_memory_is_bounded_and_never_double_applies() {
    let specs = [VcpuSpec {
        cpu: 0,
        cfg: unlimited(0),
        workload: Workload::Idle,
    }];
    let mut h = Harness::new(SchedParams::default(), 1, &specs, 0, 0).expect("admitted");
    let v = h.id(0);
    let g = |id| Grant {
        grant_id: id,
        vcpu: v,
        credits_ns: 1,
        schedule: GrantSchedule::Now,
        request_id: None,
    };
    for id in 0..3 * GRANT_ID_WINDOW {
        assert_eq!(h.sched.apply_grant(g(id), 0), Ok(GrantOutcome::Applied));
    }
    assert_eq!(
        h.sched.apply_grant(g(3 * GRANT_ID_WINDOW - 1), 0),
        Ok(GrantOutcome::Duplicate)
    );
    assert!(matches!(
        h.sched.apply_grant(g(5), 0),
        Err(GrantError::IdTooOld { .. })
    ));
    assert_eq!(
        h.sched.status(v).expect("vcpu").balance_ns,
        i64::try_from(3 * GRANT_ID_WINDOW).expect("fits")
    );
    let bad = Grant {
        vcpu: sched::cpu::VcpuId(99),
        ..g(1_000_000)
    };
    assert_eq!(
        h.sched.apply_grant(bad, 0),
        Err(GrantError::NoSuchVcpu(sched::cpu::VcpuId(99)))
    );
    // A refused grant is not remembered: the same id for the right vCPU still applies.
    assert_eq!(
        h.sched.apply_grant(g(1_000_000), 0),
        Ok(GrantOutcome::Applied)
    );
}

#[test]
fn grant_answers_request_and_lifts_the_throttle() {
    let specs = [VcpuSpec {
        cpu: 0,
        cfg: unlimited(0),
        workload: Workload::Busy,
    }];
    let mut h = Harness::new(SchedParams::default(), 1, &specs, 0, 0).expect("admitted");
    h.run_until(10 * MS + 1).expect("runs");
    let req = h.sched.take_credit_requests()[0];
    let grant = Grant {
        grant_id: 1,
        vcpu: req.vcpu,
        credits_ns: req.credits_ns,
        schedule: GrantSchedule::Now,
        request_id: Some(req.request_id),
    };
    assert_eq!(
        h.sched.apply_grant(grant, h.now()),
        Ok(GrantOutcome::Applied)
    );
    h.run_until(20 * MS + 1).expect("runs");
    // With credits the vCPU runs the whole second period.
    assert_eq!(h.trace(0).run_in(10 * MS, 20 * MS), 10 * MS);
}
