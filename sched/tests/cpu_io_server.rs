//! The I/O server (issue 7 follow-up): the hypervisor's I/O service time is one more real-time server on its CPU
//! (`VcpuConfig::io_server`), admitted with the vCPUs' servers by the same check. These tests check, on a
//! virtual clock, what the kernel relies on:
//! - over random admitted sets of one I/O server plus vCPUs, with random demand for both (a flood keeps the I/O
//!   server busy; notifications and completions wake it and it blocks when the work is done) and random overrun
//!   in `[0, O]`, every server, the I/O server included, gets at least `Q - O` in each period it is runnable
//!   throughout (the theorem of `sched::cpu`);
//! - the I/O server never runs more than `Q_io + O` in any of its periods, however much work it has: it holds no
//!   credits and never enters the burst tier, so an I/O flood cannot take more than its reservation from the
//!   vCPUs (idle time aside, which the kernel uses without the scheduler);
//! - a set whose vCPUs plus the I/O server do not fit is refused, with the numbers.

use proptest::prelude::*;
use proptest::test_runner::{Config, TestRunner};
use sched::cpu::harness::{Harness, VcpuSpec, Workload};
use sched::cpu::scheduler::SchedError;
use sched::cpu::{SchedParams, Scheduler, VcpuConfig, PPM};

const US: u64 = 1_000;
const PERIODS: [u64; 5] = [200 * US, 250 * US, 500 * US, 1_000 * US, 2_000 * US];

/// The kernel's parameters (kernel/src/vm/mod.rs: OVERRUN_BOUND_NS, RESERVE_PPM).
fn kernel_params() -> SchedParams {
    SchedParams {
        overrun_bound_ns: 50 * US,
        reserve_ppm: 20_000,
        ..SchedParams::default()
    }
}

/// One vCPU of a generated case: period index, share of the fill, demand pattern, seed.
type VcpuGen = (usize, u32, u8, u64);

/// The bound of a CPU whose shortest period is `tmin`, ppm.
fn bound_ppm(params: &SchedParams, tmin: u64) -> u64 {
    PPM - params.reserve_ppm - (params.overrun_bound_ns * PPM).div_ceil(tmin)
}

/// The largest budget whose server `(Q + O) / T` stays just under `u_ppm`.
fn budget_for(u_ppm: u64, period: u64, params: &SchedParams) -> u64 {
    (u_ppm * period / PPM).saturating_sub(params.overrun_bound_ns + 1)
}

fn workload(demand: u8, seed: u64, period: u64, q: u64) -> Workload {
    match demand {
        0 => Workload::Busy,
        1 => Workload::Random {
            seed,
            max_on_ns: 2 * period,
            max_off_ns: period,
        },
        2 => Workload::Periodic {
            period_ns: period / 2 + 1,
            work_ns: q / 2 + 1,
            offset_ns: seed % period,
        },
        _ => Workload::OnOff {
            on_ns: period / 3 + 1,
            off_ns: period / 4 + 1,
            phase_ns: seed % period,
        },
    }
}

/// Builds the case: the I/O server first (index 0), then the vCPUs, splitting `fill_ppm` of the bound between
/// them by their shares (`io_share` for the I/O server).
fn build(
    io: (usize, u32, u8, u64),
    vcpus: &[VcpuGen],
    fill_ppm: u64,
    params: &SchedParams,
) -> Vec<VcpuSpec> {
    let tmin = vcpus
        .iter()
        .map(|g| PERIODS[g.0])
        .chain([PERIODS[io.0]])
        .min()
        .unwrap_or(PERIODS[0]);
    let target = bound_ppm(params, tmin) * fill_ppm / PPM;
    let total: u64 = vcpus.iter().map(|g| u64::from(g.1)).sum::<u64>() + u64::from(io.1);
    let mut out = Vec::new();
    let io_period = PERIODS[io.0];
    // At least 10 us: a small share of a short period leaves nothing once O is paid.
    let io_q = budget_for(target * u64::from(io.1) / total, io_period, params).max(10 * US);
    out.push(VcpuSpec {
        cpu: 0,
        cfg: VcpuConfig::io_server(io_q, io_period),
        workload: workload(io.2, io.3, io_period, io_q),
    });
    for &(pidx, share, demand, seed) in vcpus {
        let period = PERIODS[pidx];
        let q = budget_for(target * u64::from(share) / total, period, params);
        if q == 0 {
            continue;
        }
        let mut cfg = VcpuConfig::baseline(q, period);
        cfg.launch_balance_ns = seed % 1_000_000;
        out.push(VcpuSpec {
            cpu: 0,
            cfg,
            workload: workload(demand, seed, period, q),
        });
    }
    out
}

fn check_case(
    io: (usize, u32, u8, u64),
    vcpus: &[VcpuGen],
    fill_ppm: u64,
    noise: u64,
) -> Result<(u64, u64), TestCaseError> {
    let params = kernel_params();
    let specs = build(io, vcpus, fill_ppm, &params);
    let mut admitted = Vec::new();
    {
        let mut probe =
            Scheduler::new(1, params).map_err(|e| TestCaseError::fail(e.to_string()))?;
        for s in &specs {
            if probe.add_vcpu(0, s.cfg, 0).is_ok() {
                admitted.push(*s);
            }
        }
    }
    // The I/O server is admitted first, on an empty CPU: it is always in the set, the subject of the test.
    prop_assert!(
        admitted.first().is_some_and(|s| s.cfg.accrual_ns == 0),
        "the I/O server alone was refused: {specs:?}"
    );
    let horizon = 4 * admitted.iter().map(|s| s.cfg.period_ns).max().unwrap_or(0);
    let o = params.overrun_bound_ns;
    let mut h = Harness::new(params, 1, &admitted, noise, o)
        .map_err(|e| TestCaseError::fail(e.to_string()))?;
    h.run_until(horizon)
        .map_err(|e| TestCaseError::fail(e.to_string()))?;
    let (mut checked, mut io_checked) = (0u64, 0u64);
    for (i, s) in admitted.iter().enumerate() {
        let t = s.cfg.period_ns;
        let mut a = 0;
        while a + t <= horizon {
            let got = h.trace(i).run_in(a, a + t);
            if h.trace(i).runnable_throughout(a, a + t) {
                prop_assert!(
                    got + o >= s.cfg.budget_ns,
                    "server {i} (I/O server: {}) got {got} ns in period [{a}, {}) of budget {} ns (O = {o} ns); \
                     config {admitted:?}",
                    i == 0,
                    a + t,
                    s.cfg.budget_ns
                );
                checked += 1;
                io_checked += u64::from(i == 0);
            }
            if i == 0 {
                prop_assert!(
                    got <= s.cfg.budget_ns + o,
                    "the I/O server ran {got} ns in period [{a}, {}), more than its budget {} ns + O {o} ns",
                    a + t,
                    s.cfg.budget_ns
                );
            }
            a += t;
        }
    }
    Ok((checked, io_checked))
}

#[test]
fn every_server_keeps_its_guarantee_beside_the_io_server() {
    let mut runner = TestRunner::new(Config {
        cases: 20_000,
        failure_persistence: None,
        ..Config::default()
    });
    let vcpu = (0..PERIODS.len(), 1u32..1000, 0u8..4, any::<u64>());
    let strategy = (
        (0..PERIODS.len(), 50u32..1000, 0u8..4, any::<u64>()),
        prop::collection::vec(vcpu, 1..=4),
        600_000u64..=1_000_000,
        any::<u64>(),
    );
    let totals = std::cell::Cell::new((0u64, 0u64, 0u64));
    let result = runner.run(&strategy, |(io, vcpus, fill, noise)| {
        let (n, n_io) = check_case(io, &vcpus, fill, noise)?;
        let (runs, all, ios) = totals.get();
        totals.set((runs + 1, all + n, ios + n_io));
        Ok(())
    });
    if let Err(e) = result {
        panic!("{e}");
    }
    let (runs, all, ios) = totals.get();
    println!("io server: {runs} admitted sets, {all} periods checked, {ios} of the I/O server");
    assert!(runs >= 10_000, "only {runs} cases ran (too many rejected)");
    assert!(
        ios > runs,
        "too few runnable-throughout periods of the I/O server were checked ({ios})"
    );
}

/// A busy I/O server beside a busy vCPU with credits: the I/O server gets exactly its reservation per period
/// (never burst time), and everything else the CPU has goes to the vCPU.
#[test]
fn a_flooded_io_server_takes_its_reservation_and_no_more() {
    let params = kernel_params();
    let io = VcpuConfig::io_server(300 * US, 1_000 * US);
    let mut vm = VcpuConfig::baseline(200 * US, 1_000 * US);
    vm.launch_balance_ns = 100_000 * US;
    vm.balance_cap_ns = vm.launch_balance_ns;
    let specs = [
        VcpuSpec {
            cpu: 0,
            cfg: io,
            workload: Workload::Busy,
        },
        VcpuSpec {
            cpu: 0,
            cfg: vm,
            workload: Workload::Busy,
        },
    ];
    let mut h = Harness::new(params, 1, &specs, 7, 0).expect("admitted");
    let horizon = 100 * 1_000 * US;
    h.run_until(horizon).expect("runs");
    let io_ran = h.trace(0).run_in(0, horizon);
    let vm_ran = h.trace(1).run_in(0, horizon);
    assert_eq!(io_ran, 100 * 300 * US, "I/O server: its budget per period");
    assert_eq!(
        io_ran + vm_ran,
        horizon,
        "the vCPU bursts into the rest (work-conserving)"
    );
}

/// Admission counts the I/O server: a vCPU that fits alone but not beside it is refused with the numbers.
#[test]
fn vcpus_that_do_not_fit_beside_the_io_server_are_refused_with_the_numbers() {
    let params = kernel_params();
    let mut s = Scheduler::new(1, params).expect("params");
    let io = VcpuConfig::io_server(300 * US, 1_000 * US);
    s.add_vcpu(0, io, 0).expect("the I/O server alone fits");
    let big = VcpuConfig::baseline(600 * US, 1_000 * US);
    let err = s.add_vcpu(0, big, 0).expect_err("does not fit beside it");
    let SchedError::Admission(a) = err else {
        panic!("expected an admission refusal, got {err:?}");
    };
    // I/O server (300 + 50) us / 1 ms; the vCPU (600 + 50) us / 1 ms; bound 1 - 2 % - O / 1 ms.
    assert_eq!(a.current_ppm, 350_000);
    assert_eq!(a.requested_ppm, 650_000);
    assert_eq!(a.bound_ppm, PPM - params.reserve_ppm - 50_000);
    let text = err.to_string();
    assert!(
        text.contains("350000") && text.contains("650000"),
        "the refusal names the numbers: {text}"
    );
    // Without the I/O server the same vCPU fits.
    let mut alone = Scheduler::new(1, params).expect("params");
    alone.add_vcpu(0, big, 0).expect("fits alone");
}
