//! Retirement of a stopped VM's vCPUs (`Scheduler::retire`): the admitted utilisation goes back to its CPU (at
//! once, or at the deadline of a job that already ran), a retired vCPU is never picked or woken again (errors, not
//! panics), its pending credit request is withdrawn, and its ledger, status and configuration stay readable.
//! Property: after any sequence of admits, runs, retires and removals, each CPU's admitted utilisation is the sum
//! over the vCPUs still holding load, which is the live ones once the deferred releases passed; and a
//! configuration admission refused fits once enough vCPUs of its CPU are retired.

use proptest::prelude::*;
use sched::cpu::admission::server_ppm;
use sched::cpu::harness::{Harness, VcpuSpec, Workload};
use sched::cpu::{
    BurstMode, Grant, GrantError, GrantSchedule, PoolPolicy, SchedError, SchedParams, Scheduler,
    VcpuConfig, VcpuId,
};

const MS: u64 = 1_000_000;

fn pct(p: u64) -> VcpuConfig {
    VcpuConfig::baseline(p * MS / 10, 10 * MS)
}

fn used(s: &Scheduler, cpu: usize) -> u64 {
    s.utilisation()[cpu].used_ppm
}

#[test]
fn a_vcpu_that_ran_gives_its_load_back_at_its_deadline() {
    let params = SchedParams::default();
    let mut s = Scheduler::new(1, params).expect("params");
    let a = s.add_vcpu(0, pct(60), 0).expect("fits");
    let held = server_ppm(&pct(60), &params);
    assert_eq!(used(&s, 0), held);
    // A second 60% VM does not fit next to it, and says why.
    match s.add_vcpu(0, pct(60), 0) {
        Err(SchedError::Admission(e)) => {
            assert_eq!((e.cpu, e.current_ppm, e.requested_ppm), (0, held, held));
        }
        other => panic!("expected an admission refusal, got {other:?}"),
    }
    let _ = s.wake(a, 0).expect("vcpu");
    let d = s.pick(0, 0).expect("cpu 0");
    assert_eq!(d.vcpu, Some(a));
    s.charge(a, 2 * MS, 2 * MS).expect("running");
    let before = s.status(a).expect("vcpu");
    let ledger_before = s.ledger(a).expect("vcpu").counters();
    // Retired 2 ms into its first period, after 2 ms of baseline time: free at the release (10 ms).
    let r = s
        .retire(a, 2 * MS)
        .expect("vcpu")
        .expect("first retirement");
    assert_eq!(
        (r.cpu, r.released_ppm, r.admissible_at_ns),
        (0, held, 10 * MS)
    );
    assert_eq!(s.retire(a, 3 * MS), Ok(None), "retiring twice is a no-op");
    assert_eq!(s.utilisation()[0].vcpus, 0);
    assert_eq!(used(&s, 0), held, "its job counts until its deadline");
    assert!(matches!(
        s.add_vcpu(0, pct(60), 3 * MS),
        Err(SchedError::Admission(_))
    ));
    // The CPU idles until that release (the decision wakes it then), which settles the retirement.
    let d = s.pick(0, 3 * MS).expect("cpu 0");
    assert_eq!((d.vcpu, d.slice_ns), (None, 7 * MS));
    let d = s.pick(0, 10 * MS).expect("cpu 0");
    assert_eq!(
        (d.vcpu, d.slice_ns),
        (None, u64::MAX),
        "nothing left to wait for"
    );
    assert_eq!(used(&s, 0), 0);
    let b = s
        .add_vcpu(0, pct(60), 10 * MS)
        .expect("fits after the retirement");
    assert_ne!(a, b, "ids are never reused");
    // The retired vCPU's records are final and still readable.
    let after = s.status(a).expect("still described");
    assert!(after.retired && !after.runnable);
    assert_eq!(
        (after.period, after.total_baseline_ns, after.balance_ns),
        (before.period, before.total_baseline_ns, before.balance_ns)
    );
    let ledger = s.ledger(a).expect("vcpu");
    assert_eq!(ledger.counters(), ledger_before);
    assert_eq!(ledger.conservation_error(), 0);
    assert_eq!(s.config(a).expect("vcpu"), pct(60));
    assert_eq!(s.is_retired(a), Ok(true));
    assert_eq!(s.is_retired(b), Ok(false));
}

#[test]
fn a_vcpu_idle_in_its_period_gives_its_load_back_at_once() {
    let params = SchedParams::default();
    let mut s = Scheduler::new(2, params).expect("params");
    let a = s.add_vcpu(1, pct(70), 0).expect("fits");
    let _ = s.wake(a, 0).expect("vcpu");
    let _ = s.pick(1, 0).expect("cpu 1");
    s.charge(a, MS, MS).expect("running");
    s.block(a, MS).expect("vcpu");
    // A new period opened at 10 ms and it ran nothing since: nothing of its job is left to protect.
    let _ = s.pick(1, 15 * MS).expect("cpu 1");
    let r = s.retire(a, 15 * MS).expect("vcpu").expect("retired");
    assert_eq!(r.admissible_at_ns, 15 * MS);
    assert_eq!(r.released_ppm, server_ppm(&pct(70), &params));
    assert_eq!(used(&s, 1), 0);
    let placed = s.place(&[pct(70)]).expect("room again");
    assert_eq!(placed.len(), 1);
    s.add_vcpu(1, pct(70), 15 * MS).expect("fits at once");
}

#[test]
fn a_retired_vcpu_is_never_run_again() {
    let mut s = Scheduler::new(1, SchedParams::default()).expect("params");
    let a = s.add_vcpu(0, pct(30), 0).expect("fits");
    let b = s.add_vcpu(0, pct(30), 0).expect("fits");
    let _ = s.wake(a, 0).expect("vcpu");
    let _ = s.wake(b, 0).expect("vcpu");
    let d = s.pick(0, 0).expect("cpu 0");
    let running = d.vcpu.expect("a decision");
    let other = if running == a { b } else { a };
    // Retired while its decision was still uncharged: the decision is dropped, not charged later.
    s.retire(running, 100).expect("vcpu").expect("retired");
    assert_eq!(
        s.charge(running, 100, 100),
        Err(SchedError::NotRunning(running))
    );
    assert_eq!(s.wake(running, 200), Err(SchedError::NoSuchVcpu(running)));
    assert_eq!(
        s.reconfigure(running, pct(10), 200),
        Err(SchedError::NoSuchVcpu(running))
    );
    assert_eq!(s.block(running, 200), Ok(()));
    let grant = Grant {
        grant_id: 1,
        vcpu: running,
        credits_ns: MS,
        schedule: GrantSchedule::Now,
        request_id: None,
    };
    assert_eq!(
        s.apply_grant(grant, 200),
        Err(GrantError::NoSuchVcpu(running))
    );
    assert_eq!(s.uncharged_picks(0), 0);
    // Over many periods only the other vCPU ever runs; the retired one's figures do not move.
    let frozen = s.status(running).expect("vcpu");
    let mut now = 200;
    for _ in 0..200 {
        let d = s.pick(0, now).expect("cpu 0");
        assert_ne!(d.vcpu, Some(running));
        let step = d.slice_ns.min(MS);
        now += step;
        if let Some(v) = d.vcpu {
            s.charge(v, step, now).expect("running");
        }
    }
    assert!(now > 50 * MS);
    assert_eq!(s.status(running).expect("vcpu"), frozen);
    assert!(s.status(other).expect("vcpu").total_baseline_ns > 0);
    // Removing it afterwards is allowed and does not give its load back twice.
    s.remove_vcpu(running).expect("exists");
    assert_eq!(used(&s, 0), server_ppm(&pct(30), &SchedParams::default()));
    assert_eq!(s.retire(running, now), Err(SchedError::NoSuchVcpu(running)));
    assert_eq!(s.utilisation()[0].vcpus, 1);
}

#[test]
fn retiring_withdraws_the_pending_credit_request() {
    let mut cfg = VcpuConfig::baseline(2 * MS, 10 * MS);
    cfg.accrual_ns = 0;
    cfg.balance_cap_ns = 1_000 * MS;
    cfg.burst_mode = BurstMode::Unlimited {
        overdraft_limit_ns: 4 * MS,
    };
    cfg.pool = Some(PoolPolicy {
        window_periods: 4,
        horizon_periods: 10,
        min_request_ns: 500_000,
        retry_periods: 5,
    });
    let specs = [
        VcpuSpec {
            cpu: 0,
            cfg,
            workload: Workload::Busy,
        },
        VcpuSpec {
            cpu: 0,
            cfg,
            workload: Workload::Busy,
        },
    ];
    let mut h = Harness::new(SchedParams::default(), 1, &specs, 0, 0).expect("admitted");
    h.run_until(30 * MS + 1).expect("runs");
    // Both ask; only the survivor's request is still to be sent after the other is retired.
    let (gone, kept) = (h.id(0), h.id(1));
    let now = 30 * MS + 1;
    let r = h.sched.retire(gone, now).expect("vcpu").expect("retired");
    assert_eq!(r.cpu, 0);
    let reqs = h.sched.take_credit_requests();
    assert!(!reqs.is_empty(), "the survivor asked");
    assert!(reqs.iter().all(|r| r.vcpu == kept), "{reqs:?}");
}

#[test]
fn unknown_vcpus_get_errors() {
    let mut s = Scheduler::new(1, SchedParams::default()).expect("params");
    assert_eq!(
        s.retire(VcpuId(3), 0),
        Err(SchedError::NoSuchVcpu(VcpuId(3)))
    );
    assert_eq!(
        s.is_retired(VcpuId(3)),
        Err(SchedError::NoSuchVcpu(VcpuId(3)))
    );
}

/// One step of the property's random scenario.
#[derive(Clone, Debug)]
enum Op {
    /// Admit a vCPU (budget in 0.1 ms units, period in ms) on a CPU, woken at once.
    Add { cpu: u32, budget: u64, period: u64 },
    /// Pick on a CPU and run the decision for up to `ran` microseconds.
    Run { cpu: u32, ran: u64 },
    /// Let time pass (microseconds).
    Sleep { us: u64 },
    /// Retire the n-th vCPU ever admitted (modulo their number).
    Retire { n: usize },
    /// Remove the n-th vCPU ever admitted.
    Remove { n: usize },
}

fn op() -> impl Strategy<Value = Op> {
    prop_oneof![
        3 => (0u32..2, 1u64..60, 1u64..40).prop_map(|(cpu, budget, period)| Op::Add { cpu, budget, period }),
        4 => (0u32..2, 1u64..5_000).prop_map(|(cpu, ran)| Op::Run { cpu, ran }),
        1 => (1u64..50_000).prop_map(|us| Op::Sleep { us }),
        2 => (0usize..64).prop_map(|n| Op::Retire { n }),
        1 => (0usize..64).prop_map(|n| Op::Remove { n }),
    ]
}

/// What the test knows of each admitted vCPU.
#[derive(Clone, Copy, Debug)]
struct Known {
    id: VcpuId,
    cpu: u32,
    ppm: u64,
    /// `None` while live; the instant its load goes once retired.
    retired_until: Option<u64>,
    /// Its load already left (retirement settled, or removed).
    released: bool,
    removed: bool,
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(512))]

    #[test]
    fn admitted_load_is_the_live_vcpus_and_retiring_makes_room(
        ops in proptest::collection::vec(op(), 1..120),
        probe_budget in 1u64..95,
        probe_period in 1u64..40,
    ) {
        let params = SchedParams::default();
        let mut s = Scheduler::new(2, params).expect("params");
        let mut known: Vec<Known> = Vec::new();
        let mut now = 0u64;
        for op in ops {
            match op {
                Op::Add { cpu, budget, period } => {
                    let cfg = VcpuConfig::baseline(budget * 100_000, period * MS);
                    if let Ok(id) = s.add_vcpu(cpu, cfg, now) {
                        let _ = s.wake(id, now).expect("fresh vcpu");
                        known.push(Known {
                            id,
                            cpu,
                            ppm: server_ppm(&cfg, &params),
                            retired_until: None,
                            released: false,
                            removed: false,
                        });
                    }
                }
                Op::Run { cpu, ran } => {
                    let d = s.pick(cpu, now).expect("cpu");
                    for k in known.iter_mut().filter(|k| k.cpu == cpu) {
                        if k.retired_until.is_some_and(|t| t <= now) {
                            k.released = true;
                        }
                    }
                    prop_assert!(d.vcpu.is_none_or(|v| known.iter().any(|k| k.id == v && k.retired_until.is_none() && !k.removed)),
                        "picked a retired or removed vCPU: {:?}", d);
                    let step = (ran * 1000).min(d.slice_ns);
                    now += step;
                    if let Some(v) = d.vcpu {
                        s.charge(v, step, now).expect("picked");
                    }
                }
                Op::Sleep { us } => now += us * 1000,
                Op::Retire { n } => {
                    if known.is_empty() { continue; }
                    let i = n % known.len();
                    let k = known[i];
                    let r = s.retire(k.id, now);
                    if k.removed {
                        prop_assert_eq!(r, Err(SchedError::NoSuchVcpu(k.id)));
                    } else if k.retired_until.is_some() {
                        prop_assert_eq!(r, Ok(None));
                    } else {
                        let r = r.expect("live").expect("first retirement");
                        prop_assert_eq!((r.cpu, r.released_ppm), (k.cpu, k.ppm));
                        prop_assert!(r.admissible_at_ns >= now);
                        known[i].retired_until = Some(r.admissible_at_ns);
                        known[i].released = r.admissible_at_ns == now;
                        prop_assert_eq!(s.wake(k.id, now), Err(SchedError::NoSuchVcpu(k.id)));
                    }
                }
                Op::Remove { n } => {
                    if known.is_empty() { continue; }
                    let i = n % known.len();
                    let r = s.remove_vcpu(known[i].id);
                    prop_assert_eq!(r.is_ok(), !known[i].removed);
                    known[i].removed = true;
                    known[i].released = true;
                }
            }
            // Invariant after every step: admitted = what the vCPUs still hold.
            for cpu in 0..2u32 {
                let held: u64 = known.iter().filter(|k| k.cpu == cpu && !k.released).map(|k| k.ppm).sum();
                let live = known.iter().filter(|k| k.cpu == cpu && !k.removed && k.retired_until.is_none()).count();
                let u = s.utilisation()[cpu as usize];
                prop_assert_eq!(u.used_ppm, held, "cpu {} at {}: {:?}", cpu, now, known);
                prop_assert_eq!(u.vcpus, live);
            }
        }
        // Once every deferred release passed, the admitted load is exactly the live vCPUs'.
        now += 2_000 * MS;
        for cpu in 0..2u32 {
            let d = s.pick(cpu, now).expect("cpu");
            if let Some(v) = d.vcpu {
                s.charge(v, 0, now).expect("picked");
            }
            let live: u64 = known.iter().filter(|k| k.cpu == cpu && !k.removed && k.retired_until.is_none()).map(|k| k.ppm).sum();
            prop_assert_eq!(s.utilisation()[cpu as usize].used_ppm, live);
        }
        // A configuration that fits an empty CPU but is refused now fits after retiring enough of CPU 0's vCPUs.
        let probe = VcpuConfig::baseline(probe_budget * 100_000, probe_period * MS);
        let fits_empty = Scheduler::new(1, params).expect("params").add_vcpu(0, probe, 0).is_ok();
        if fits_empty && s.clone().add_vcpu(0, probe, now).is_err() {
            let mut fitted = false;
            for k in known.iter().filter(|k| k.cpu == 0 && !k.removed && k.retired_until.is_none()) {
                let r = s.retire(k.id, now).expect("live").expect("retired");
                prop_assert_eq!(r.admissible_at_ns, now, "ran nothing since the last release");
                if s.clone().add_vcpu(0, probe, now).is_ok() {
                    fitted = true;
                    break;
                }
            }
            prop_assert!(fitted, "an empty CPU admits the probe");
            s.add_vcpu(0, probe, now).expect("fits after retiring");
        }
    }
}
