//! Telemetry per vCPU per period: baseline and burst time, credits earned/spent/discarded, balance, time
//! runnable but not running (and throttled), wake-ups and wake-to-run latency.

use sched::cpu::harness::{Harness, VcpuSpec, Workload};
use sched::cpu::{SchedParams, VcpuConfig};

const MS: u64 = 1_000_000;
const US: u64 = 1_000;

#[test]
fn records_account_every_nanosecond_of_a_period() {
    let mut a = VcpuConfig::baseline(5 * MS, 10 * MS);
    a.accrual_ns = 0;
    let mut b = VcpuConfig::baseline(3 * MS, 10 * MS);
    b.accrual_ns = MS;
    let specs = [
        VcpuSpec {
            cpu: 0,
            cfg: a,
            workload: Workload::Busy,
        },
        VcpuSpec {
            cpu: 0,
            cfg: b,
            workload: Workload::Busy,
        },
    ];
    let mut h = Harness::new(SchedParams::default(), 1, &specs, 0, 0).expect("admitted");
    h.run_until(100 * MS + 1).expect("runs");
    let recs = h.records();
    assert_eq!(recs.len(), 20, "one record per vCPU per closed period");
    for r in recs {
        assert_eq!(r.end_ns - r.start_ns, 10 * MS);
        let used = r.baseline_ns + r.burst_ns;
        // Runnable throughout: every ns is either run or waited.
        assert_eq!(used + r.waiting_ns, 10 * MS, "{r:?}");
        if r.vcpu == h.id(0) {
            // No credits ever: held to 5 ms, throttled the rest.
            assert_eq!(
                (r.baseline_ns, r.burst_ns, r.throttled_ns),
                (5 * MS, 0, 5 * MS)
            );
        } else {
            assert_eq!(r.baseline_ns, 3 * MS);
            assert_eq!(r.earned_ns, MS);
            assert_eq!(r.spent_ns, r.burst_ns);
        }
    }
    // b spends in period k+1 the 1 ms it earned in period k.
    let b_recs: Vec<_> = recs.iter().filter(|r| r.vcpu == h.id(1)).collect();
    assert_eq!(b_recs[0].burst_ns, 0);
    assert!(b_recs[1..]
        .iter()
        .all(|r| r.burst_ns == MS && r.balance_ns == 1_000_000));
}

#[test]
fn wakeups_and_latency_are_reported() {
    // A periodic job waking 4 times per 10 ms period next to a burner running in the burst tier.
    let rt = VcpuConfig::baseline(2 * MS, 10 * MS);
    let mut burner = VcpuConfig::baseline(MS, 10 * MS);
    burner.launch_balance_ns = 1_000 * MS;
    burner.balance_cap_ns = 1_000 * MS;
    let specs = [
        VcpuSpec {
            cpu: 0,
            cfg: rt,
            workload: Workload::Periodic {
                period_ns: 2_500 * US,
                work_ns: 300 * US,
                offset_ns: 0,
            },
        },
        VcpuSpec {
            cpu: 0,
            cfg: burner,
            workload: Workload::Busy,
        },
    ];
    let noise = 2 * US;
    let mut h = Harness::new(SchedParams::default(), 1, &specs, 3, noise).expect("admitted");
    h.run_until(101 * MS).expect("runs");
    let rt_recs: Vec<_> = h.records().iter().filter(|r| r.vcpu == h.id(0)).collect();
    assert_eq!(rt_recs.len(), 10);
    assert!(rt_recs.iter().all(|r| r.period <= 10));
    for r in &rt_recs {
        assert_eq!(r.wakeups, 4, "{r:?}");
        assert_eq!(r.baseline_ns + r.burst_ns, 1_200 * US);
        // A wake with budget preempts the burst tier within the overrun noise.
        assert!(r.max_wake_latency_ns <= noise, "{r:?}");
        assert!(r.total_wake_latency_ns <= 4 * noise);
    }
}
