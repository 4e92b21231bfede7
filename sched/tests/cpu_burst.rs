//! Burst tier: shares follow weights within 1% over 1 s of simulated time; caps hold; the CPU is work-conserving.

use sched::cpu::harness::{Harness, VcpuSpec, Workload};
use sched::cpu::{SchedParams, VcpuConfig, PPM};

const MS: u64 = 1_000_000;

fn burner(budget_ms: u64, weight: u32, cap_ppm: Option<u32>) -> VcpuSpec {
    let mut cfg = VcpuConfig::baseline(budget_ms * MS / 10, MS);
    cfg.weight = weight;
    cfg.cap_ppm = cap_ppm;
    cfg.launch_balance_ns = 10_000 * MS;
    cfg.balance_cap_ns = 10_000 * MS;
    VcpuSpec {
        cpu: 0,
        cfg,
        workload: Workload::Busy,
    }
}

/// Share of `[a, b)` received by spec `i`, ppm.
fn share(h: &Harness, i: usize, a: u64, b: u64) -> u64 {
    h.trace(i).run_in(a, b) * PPM / (b - a)
}

#[test]
fn burst_follows_weights_within_one_percent() {
    // Baselines 10/20/10 % (of 1 ms periods), weights 1:2:5; spare 60% minus overrun allowances split by weight.
    let specs = [
        burner(1, 100, None),
        burner(2, 200, None),
        burner(1, 500, None),
    ];
    let mut h = Harness::new(SchedParams::default(), 1, &specs, 7, 0).expect("admitted");
    h.run_until(1_000 * MS).expect("runs");
    let total_burst: u64 = (0..3)
        .map(|i| h.sched.status(h.id(i)).expect("vcpu").total_burst_ns)
        .sum();
    let weights = [100u64, 200, 500];
    for (i, w) in weights.iter().enumerate() {
        let burst = h.sched.status(h.id(i)).expect("vcpu").total_burst_ns;
        let want = total_burst * w / 800;
        let err = burst.abs_diff(want);
        assert!(
            err * 100 <= want,
            "vcpu {i}: burst {burst} ns, weighted target {want} ns"
        );
    }
    // Work-conserving: three burners keep the CPU busy all the time.
    let busy: u64 = (0..3).map(|i| h.trace(i).run_in(0, 1_000 * MS)).sum();
    assert_eq!(busy, 1_000 * MS);
}

#[test]
fn caps_hold_and_capped_time_goes_to_others() {
    let specs = [burner(1, 500, Some(200_000)), burner(1, 100, None)];
    let mut h = Harness::new(SchedParams::default(), 1, &specs, 1, 0).expect("admitted");
    h.run_until(200 * MS).expect("runs");
    for k in 0..200 {
        let (a, b) = (k * MS, (k + 1) * MS);
        assert!(
            h.trace(0).run_in(a, b) <= 200_000,
            "cap broken in period {k}"
        );
    }
    assert!(share(&h, 1, 0, 200 * MS) >= 790_000);
}
