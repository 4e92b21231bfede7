//! Kernel-facing API contract: decisions, idle slices, preemption hints and clear errors for misuse (never a
//! panic).

use sched::cpu::{Decision, SchedError, SchedParams, Scheduler, Tier, VcpuConfig, VcpuId};

const MS: u64 = 1_000_000;

#[test]
fn idle_decision_sleeps_until_the_next_release() {
    let mut s = Scheduler::new(2, SchedParams::default()).expect("params");
    let d = s.pick(1, 0).expect("cpu 1");
    assert_eq!(
        d,
        Decision {
            vcpu: None,
            slice_ns: u64::MAX,
            tier: Tier::Idle
        }
    );
    let v = s
        .add_vcpu(0, VcpuConfig::baseline(MS, 10 * MS), 0)
        .expect("fits");
    // Blocked vCPU: idle until its next release (a replenishment), so the kernel can arm a one-shot timer.
    let d = s.pick(0, 3 * MS).expect("cpu 0");
    assert_eq!((d.vcpu, d.slice_ns, d.tier), (None, 7 * MS, Tier::Idle));
    // Waking it on the idle CPU asks for a re-pick there.
    assert_eq!(s.wake(v, 3 * MS).expect("vcpu").preempt, Some(0));
    let d = s.pick(0, 3 * MS).expect("cpu 0");
    assert_eq!((d.vcpu, d.tier), (Some(v), Tier::Baseline));
    // Woken 3 ms into its period, its budget is clamped to its bandwidth over the 7 ms left, minus O.
    assert!(d.slice_ns <= MS * 7 / 10 && d.slice_ns > 600_000, "{d:?}");
}

#[test]
fn earlier_deadline_wake_preempts_later_one_does_not() {
    let mut s = Scheduler::new(1, SchedParams::default()).expect("params");
    let long = s
        .add_vcpu(0, VcpuConfig::baseline(5 * MS, 20 * MS), 0)
        .expect("fits");
    let short = s
        .add_vcpu(0, VcpuConfig::baseline(MS, 5 * MS), 0)
        .expect("fits");
    let _ = s.wake(long, 0).expect("vcpu");
    let d = s.pick(0, 0).expect("cpu 0");
    assert_eq!(d.vcpu, Some(long));
    // The slice is cut at the next release on the CPU (short's, at 5 ms).
    assert_eq!(d.slice_ns, 5 * MS);
    assert_eq!(
        s.wake(short, 100).expect("vcpu").preempt,
        Some(0),
        "deadline 5 ms < 20 ms"
    );
    s.charge(long, 100, 100).expect("running");
    let d = s.pick(0, 100).expect("cpu 0");
    assert_eq!(d.vcpu, Some(short));
}

#[test]
fn misuse_gets_errors_not_panics() {
    let mut s = Scheduler::new(1, SchedParams::default()).expect("params");
    let a = s
        .add_vcpu(0, VcpuConfig::baseline(MS, 10 * MS), 0)
        .expect("fits");
    let b = s
        .add_vcpu(0, VcpuConfig::baseline(MS, 10 * MS), 0)
        .expect("fits");
    assert_eq!(s.pick(7, 0), Err(SchedError::NoSuchCpu(7)));
    assert_eq!(s.charge(a, 10, 10), Err(SchedError::NotRunning(a)));
    assert_eq!(
        s.charge(VcpuId(42), 10, 10),
        Err(SchedError::NoSuchVcpu(VcpuId(42)))
    );
    assert_eq!(
        s.wake(VcpuId(42), 0),
        Err(SchedError::NoSuchVcpu(VcpuId(42)))
    );
    let _ = s.wake(a, 0).expect("vcpu");
    let _ = s.wake(b, 0).expect("vcpu");
    let d = s.pick(0, 0).expect("cpu 0");
    let other = if d.vcpu == Some(a) { b } else { a };
    assert_eq!(s.charge(other, 10, 10), Err(SchedError::NotRunning(other)));
    // A second pick without a charge is counted (a glue bug), not trusted.
    let _ = s.pick(0, 10).expect("cpu 0");
    assert_eq!(s.uncharged_picks(0), 1);
    // Removing the running vCPU clears the CPU's decision; its id is never reused.
    let d = s.pick(0, 20).expect("cpu 0");
    let running = d.vcpu.expect("someone runs");
    s.remove_vcpu(running).expect("exists");
    assert_eq!(
        s.charge(running, 10, 30),
        Err(SchedError::NoSuchVcpu(running))
    );
    assert_eq!(s.remove_vcpu(running), Err(SchedError::NoSuchVcpu(running)));
    let c = s
        .add_vcpu(0, VcpuConfig::baseline(MS, 10 * MS), 30)
        .expect("fits");
    assert_ne!(c, running);
    // Absurd charges saturate instead of overflowing.
    let _ = s.wake(c, 30).expect("vcpu");
    let d = s.pick(0, 30).expect("cpu 0");
    if let Some(v) = d.vcpu {
        s.charge(v, u64::MAX, 40).expect("running");
    }
    let _ = s.pick(0, 50).expect("cpu 0");
    assert!(s.utilisation()[0].used_ppm > 0);
}
