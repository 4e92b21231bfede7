//! Criterion benchmarks for the CPU scheduler: the cost of one `pick` + `charge` with 8, 64, 512 and 4096
//! always-runnable vCPUs on one physical CPU.
//!
//! Each vCPU has a 100 ms period and an equal part of a 50% total baseline, a large launch balance (so the
//! burst tier is populated, half of the time) and one of 64 weights; every iteration picks, "runs" the decision
//! for min(slice, 50 us) of virtual time and charges it. The mix covers EDF picks, burst picks, period releases
//! (lazy roll-over, amortised: 4096 vCPUs release once per 2000 decisions each) and budget exhaustion as they
//! occur in steady state.
//!
//! Two groups: `pick_charge` is criterion's usual wall-clock measurement; `pick_charge_cpu` measures the same
//! loop in this thread's CPU time (`/proc/thread-self/schedstat`, Linux), which excludes the time other
//! processes hold the core on a shared, oversubscribed build machine. Where schedstat is unavailable the second
//! group falls back to wall-clock time.

use std::time::Duration;

use criterion::{black_box, criterion_group, criterion_main, BenchmarkId, Criterion};
use sched::cpu::{SchedParams, Scheduler, VcpuConfig};

fn setup(n: u64) -> Scheduler {
    let params = SchedParams::default();
    let mut s = Scheduler::new(1, params).expect("valid params");
    let period = 100_000_000u64;
    let budget = (period / 2) / n - params.overrun_bound_ns;
    for i in 0..n {
        let mut cfg = VcpuConfig::baseline(budget, period);
        cfg.launch_balance_ns = 1_000_000_000_000;
        cfg.balance_cap_ns = cfg.launch_balance_ns;
        cfg.weight = u32::try_from(1 + i % 64).unwrap_or(1);
        let id = s.add_vcpu(0, cfg, 0).expect("admitted");
        let _ = s.wake(id, 0).expect("exists");
    }
    s
}

/// This thread's CPU time (ns) from `/proc/thread-self/schedstat`, if available.
fn thread_cpu_ns() -> Option<u64> {
    let s = std::fs::read_to_string("/proc/thread-self/schedstat").ok()?;
    s.split_whitespace().next()?.parse().ok()
}

/// One decision: pick, "run" for min(slice, 50 us), charge.
fn step(s: &mut Scheduler, now: &mut u64) {
    let d = s.pick(0, black_box(*now)).expect("cpu 0");
    let ran = d.slice_ns.min(50_000);
    if let Some(v) = d.vcpu {
        s.charge(v, ran, *now + ran).expect("picked");
    }
    *now += ran;
    let _ = black_box(d);
}

fn warmed(n: u64) -> (Scheduler, u64) {
    let mut s = setup(n);
    let mut now = 0u64;
    // Warm up into steady state (past the first releases and lot coalescing).
    for _ in 0..(n * 40).max(200_000) {
        step(&mut s, &mut now);
    }
    (s, now)
}

fn pick_charge(c: &mut Criterion) {
    let mut group = c.benchmark_group("pick_charge");
    for n in [8u64, 64, 512, 4096] {
        let (mut s, mut now) = warmed(n);
        group.bench_with_input(BenchmarkId::from_parameter(n), &n, |b, _| {
            b.iter(|| step(&mut s, &mut now));
        });
    }
    group.finish();
    let mut group = c.benchmark_group("pick_charge_cpu");
    for n in [8u64, 64, 512, 4096] {
        let (mut s, mut now) = warmed(n);
        group.bench_with_input(BenchmarkId::from_parameter(n), &n, |b, _| {
            b.iter_custom(|iters| {
                let wall = std::time::Instant::now();
                let t0 = thread_cpu_ns();
                for _ in 0..iters {
                    step(&mut s, &mut now);
                }
                match (t0, thread_cpu_ns()) {
                    (Some(a), Some(b)) if b > a => Duration::from_nanos(b - a),
                    _ => wall.elapsed(),
                }
            });
        });
    }
    group.finish();
}

criterion_group!(benches, pick_charge);
criterion_main!(benches);
