//! Placement without pins (issue 6): worst fit decreasing keeps admission exact and spreads the load.
//!
//! Properties, over random machines (1-4 CPUs) and random sequences of VMs (1-3 vCPUs each, periods 1-10 ms,
//! baselines up to 60 %), placed one VM at a time as the runtime does:
//! - exact admission: every placement is accepted by `add_vcpu` (which re-checks), every CPU stays within its
//!   admission bound (`sum(u') <= bound`, the condition under which `tests/cpu_guarantee.rs` proves every
//!   baseline is met), and a VM is refused only when first fit decreasing refuses it too;
//! - spreading: each single vCPU goes to the least-loaded CPU that admits it; an empty CPU is used while one
//!   exists, so worst fit never uses fewer CPUs than first fit on the same sequence; and while every vCPU has
//!   landed on the least-loaded CPU, `max - min` of the loads stays within the largest `u'` placed.

use proptest::prelude::*;
use sched::cpu::admission::{server_ppm, CpuLoad};
use sched::cpu::placement::{first_fit_decreasing, worst_fit_decreasing};
use sched::cpu::{SchedError, SchedParams, Scheduler, VcpuConfig};

const MS: u64 = 1_000_000;

fn vcpu() -> impl Strategy<Value = VcpuConfig> {
    (prop::sample::select(vec![1u64, 2, 5, 10]), 1u64..=60).prop_map(|(period_ms, pct)| {
        VcpuConfig::baseline(period_ms * MS * pct / 100, period_ms * MS)
    })
}

fn vms() -> impl Strategy<Value = Vec<Vec<VcpuConfig>>> {
    prop::collection::vec(prop::collection::vec(vcpu(), 1..=3), 1..=12)
}

/// The shadow loads of `s` rebuilt from what was added (the scheduler keeps its own private copy).
fn add(loads: &mut [CpuLoad], cpu: u32, cfg: &VcpuConfig, params: &SchedParams) {
    loads[usize::try_from(cpu).expect("cpu index")].add(cfg, params);
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 3000, failure_persistence: None, ..ProptestConfig::default() })]

    #[test]
    fn admission_stays_exact(cpus in 1usize..=4, vms in vms()) {
        let params = SchedParams::default();
        let mut s = Scheduler::new(cpus, params).expect("params");
        let mut loads = vec![CpuLoad::default(); cpus];
        for vm in &vms {
            match s.place(vm) {
                Ok(placed) => {
                    prop_assert_eq!(placed.len(), vm.len());
                    for (cfg, &cpu) in vm.iter().zip(&placed) {
                        let added = s.add_vcpu(cpu, *cfg, 0);
                        prop_assert!(added.is_ok(), "placed on cpu{} but refused: {:?}", cpu, added);
                        add(&mut loads, cpu, cfg, &params);
                    }
                }
                Err(SchedError::Placement(_)) => {
                    prop_assert!(
                        first_fit_decreasing(&loads, vm, &params).is_err(),
                        "worst fit refused a VM first fit places: {:?} on {:?}", vm, s.utilisation()
                    );
                }
                Err(e) => prop_assert!(false, "unexpected error {}", e),
            }
            for u in s.utilisation() {
                prop_assert!(u.used_ppm <= u.bound_ppm, "cpu{} over its bound: {:?}", u.cpu, u);
                let shadow = loads[usize::try_from(u.cpu).expect("cpu")].used_ppm();
                prop_assert_eq!(u.used_ppm, shadow);
            }
        }
    }

    #[test]
    fn single_vcpus_spread(cpus in 2usize..=4, seq in prop::collection::vec(vcpu(), 1..=16)) {
        let params = SchedParams::default();
        let mut loads = vec![CpuLoad::default(); cpus];
        let mut ffd_loads = vec![CpuLoad::default(); cpus];
        let mut on_least_loaded = true;
        let mut largest = 0u64;
        for cfg in &seq {
            let batch = [*cfg];
            let least = loads.iter().map(CpuLoad::used_ppm).min().expect("cpus");
            let least_cpu = loads.iter().position(|l| l.used_ppm() == least).expect("a least-loaded cpu");
            let least_admits = loads[least_cpu]
                .check(u32::try_from(least_cpu).expect("cpu"), cfg, None, &params)
                .is_ok();
            let (Ok(w), Ok(f)) = (
                worst_fit_decreasing(&loads, &batch, &params),
                first_fit_decreasing(&ffd_loads, &batch, &params),
            ) else {
                break;
            };
            let cpu = usize::try_from(w[0]).expect("cpu");
            // The chosen CPU is a least-loaded one among those that admit the vCPU.
            for (c, l) in loads.iter().enumerate() {
                if l.check(u32::try_from(c).expect("cpu"), cfg, None, &params).is_ok() {
                    prop_assert!(loads[cpu].used_ppm() <= l.used_ppm(), "cpu{} chosen over less-loaded cpu{}", cpu, c);
                }
            }
            if least_admits {
                prop_assert_eq!(cpu, least_cpu);
            } else {
                on_least_loaded = false;
            }
            loads[cpu].add(cfg, &params);
            add(&mut ffd_loads, f[0], cfg, &params);
            largest = largest.max(server_ppm(cfg, &params));
            let used = |ls: &[CpuLoad]| ls.iter().filter(|l| l.used_ppm() > 0).count();
            prop_assert!(used(&loads) >= used(&ffd_loads), "worst fit uses fewer cpus than first fit");
            if on_least_loaded {
                let max = loads.iter().map(CpuLoad::used_ppm).max().expect("cpus");
                let min = loads.iter().map(CpuLoad::used_ppm).min().expect("cpus");
                prop_assert!(max - min <= largest, "spread {} ppm > largest u' {} ppm", max - min, largest);
            }
        }
    }
}

#[test]
fn two_single_vcpu_vms_land_on_two_cpus() {
    // The emulator check's configuration (`vms.rs`): two unpinned VMs on a two-CPU machine.
    let params = SchedParams::default();
    let mut s = Scheduler::new(2, params).expect("params");
    let a = VcpuConfig::baseline(30 * MS / 100, MS);
    let b = VcpuConfig::baseline(20 * MS / 100, MS);
    let pa = s.place(&[a]).expect("fits");
    s.add_vcpu(pa[0], a, 0).expect("admitted");
    let pb = s.place(&[b]).expect("fits");
    assert_eq!((pa[0], pb[0]), (0, 1));
}
