//! Test 5 of issue 3: admission refuses over-subscription with an error naming the CPU and the utilisation;
//! reconfiguration goes through admission; worst-fit-decreasing placement (first fit as its fallback).

use sched::cpu::{AdmissionError, SchedError, SchedParams, Scheduler, VcpuConfig, PPM};

const MS: u64 = 1_000_000;

fn pct(p: u64) -> VcpuConfig {
    VcpuConfig::baseline(p * MS / 100, MS)
}

#[test]
fn oversubscription_is_refused_with_the_numbers() {
    let params = SchedParams::default();
    let mut s = Scheduler::new(2, params).expect("params");
    for p in [50, 30, 10] {
        s.add_vcpu(1, pct(p), 0).expect("fits");
    }
    // u' = (Q + 2 us) / 1 ms: 502 000 + 302 000 + 102 000 ppm; bound 1e6 - 2 us / 1 ms = 998 000 ppm.
    let err = s.add_vcpu(1, pct(10), 0).expect_err("over-subscribed");
    let want = AdmissionError {
        cpu: 1,
        current_ppm: 906_000,
        requested_ppm: 102_000,
        bound_ppm: 998_000,
    };
    assert_eq!(err, SchedError::Admission(want));
    let text = err.to_string();
    assert!(
        text.contains("cpu 1") && text.contains("906000") && text.contains("998000"),
        "{text}"
    );
    // 9% still fits: 906 000 + 92 000 = 998 000.
    s.add_vcpu(1, pct(9), 0).expect("exactly at the bound");
    assert_eq!(s.utilisation()[1].used_ppm, 998_000);
    assert_eq!(s.utilisation()[0].used_ppm, 0);
}

#[test]
fn shorter_period_tightens_the_bound() {
    let params = SchedParams::default();
    let mut s = Scheduler::new(1, params).expect("params");
    s.add_vcpu(0, pct(92), 0).expect("fits");
    // A 100 us period raises the reserve to O / 100 us = 2%.
    let short = VcpuConfig::baseline(5_000, 100_000);
    let err = s.add_vcpu(0, short, 0).expect_err("bound tightened");
    match err {
        SchedError::Admission(e) => {
            assert_eq!(e.bound_ppm, PPM - 20_000);
            assert_eq!(e.requested_ppm, 70_000);
        }
        other => panic!("unexpected {other:?}"),
    }
}

#[test]
fn reconfiguration_goes_through_admission() {
    let mut s = Scheduler::new(1, SchedParams::default()).expect("params");
    let a = s.add_vcpu(0, pct(50), 0).expect("fits");
    s.add_vcpu(0, pct(40), 0).expect("fits");
    assert!(matches!(
        s.reconfigure(a, pct(60), 0),
        Err(SchedError::Admission(_))
    ));
    assert_eq!(s.config(a).expect("vcpu").budget_ns, 50 * MS / 100);
    s.reconfigure(a, pct(55), 0).expect("fits");
    assert_eq!(s.utilisation()[0].used_ppm, 552_000 + 402_000);
}

#[test]
fn freed_bandwidth_is_admissible_from_the_next_release() {
    let mut s = Scheduler::new(1, SchedParams::default()).expect("params");
    let a = s.add_vcpu(0, pct(60), 0).expect("fits");
    s.add_vcpu(0, pct(30), 0).expect("fits");
    s.reconfigure(a, pct(20), 100_000)
        .expect("a decrease always fits");
    // Until a's period (started at 0) ends at 1 ms, a is still accounted at 60%.
    assert_eq!(s.utilisation()[0].used_ppm, 602_000 + 302_000);
    assert!(matches!(
        s.add_vcpu(0, pct(30), 100_000),
        Err(SchedError::Admission(_))
    ));
    let _ = s.pick(0, MS).expect("cpu 0");
    assert_eq!(s.utilisation()[0].used_ppm, 202_000 + 302_000);
    s.add_vcpu(0, pct(30), MS).expect("fits after the release");
}

#[test]
fn invalid_configurations_are_refused() {
    let mut s = Scheduler::new(1, SchedParams::default()).expect("params");
    assert!(matches!(
        s.add_vcpu(0, VcpuConfig::baseline(10, 50_000), 0),
        Err(SchedError::Config(_))
    ));
    assert!(matches!(
        s.add_vcpu(0, VcpuConfig::baseline(0, MS), 0),
        Err(SchedError::Config(_))
    ));
    assert!(matches!(
        s.add_vcpu(3, pct(10), 0),
        Err(SchedError::NoSuchCpu(3))
    ));
    let mut capped = pct(20);
    capped.cap_ppm = Some(100_000);
    assert!(matches!(
        s.add_vcpu(0, capped, 0),
        Err(SchedError::Config(_))
    ));
}

#[test]
fn worst_fit_decreasing_spreads_and_reports() {
    let mut s = Scheduler::new(3, SchedParams::default()).expect("params");
    let batch = [pct(30), pct(60), pct(30), pct(60), pct(30)];
    let placed = s.place(&batch).expect("fits");
    // Decreasing, each to the least-loaded CPU that admits it (ties: lowest number): 60 -> cpu0, 60 -> cpu1,
    // 30 -> cpu2, 30 -> cpu2 (302 000 ppm < 602 000), 30 -> cpu0 (602 000 ppm, tied with cpu1).
    assert_eq!(placed, vec![2, 0, 2, 1, 0]);
    for (cfg, cpu) in batch.iter().zip(&placed) {
        s.add_vcpu(*cpu, *cfg, 0).expect("placement is admissible");
    }
    let used: Vec<u64> = s.utilisation().iter().map(|u| u.used_ppm).collect();
    assert_eq!(used, vec![904_000, 602_000, 604_000]);
    let err = s.place(&[pct(70)]).expect_err("no room for 70% anywhere");
    match err {
        SchedError::Placement(p) => assert_eq!(p.closest.map(|e| e.cpu), Some(1)),
        other => panic!("unexpected {other:?}"),
    }
    let id = s.add_vcpu_placed(pct(20), 0).expect("cpu 1 has room");
    assert_eq!(s.status(id).expect("vcpu").cpu, 1);
}

#[test]
fn worst_fit_falls_back_to_first_fit_when_spreading_strands_a_vcpu() {
    // 79, 78, 17, 16, 5 % on two CPUs (u' = p * 10 000 + 2 000 ppm, bound 998 000): spreading ends with
    // 954 000 ppm on each CPU and no room for the 52 000 of the 5 %; first fit ends with 964 000 and 944 000,
    // and the 5 % fits on cpu1.
    let s = Scheduler::new(2, SchedParams::default()).expect("params");
    let batch = [pct(79), pct(78), pct(17), pct(16), pct(5)];
    let placed = s.place(&batch).expect("first fit places it");
    assert_eq!(placed, vec![0, 1, 0, 1, 1]);
}
