//! The partitioner under overload: the device delivers less than the sum of the commitments it
//! admitted (its stated capacity was too high, or the path to it is slower than the device).
//! Then every volume that demands more than its commitment-proportional share of what the device
//! delivers must get that share (each the same fraction of its commitment), whether its requests
//! wait in the partitioner (a backlog) or are mostly on the device (a shallow closed loop, whose
//! queue is empty whenever its next request arrives), and a volume back from idle restarts level
//! with the backlogged ones: neither starved nor flooding.
//!
//! The harness is a virtual clock, a device with `slots` parallel slots and a service time
//! proportional to cost, and two workload shapes: `Backlog` keeps a fixed number of requests
//! queued in the partitioner, `Closed` keeps a fixed number outstanding (queued + on the device).

use proptest::prelude::*;
use sched::iops::{
    DeviceConfig, IoOp, OveragePolicy, Partitioner, Request, ServiceClass, VolumeConfig, VolumeId,
    COST_ONE,
};

const MS: u64 = 1_000_000;
const S: u64 = 1_000_000_000;
const UNIT: u32 = 4096;

#[derive(Clone, Copy, Debug)]
enum Load {
    /// Keeps this many requests queued in the partitioner (open loop far above its share).
    Backlog(usize),
    /// Keeps this many requests outstanding, queued or on the device (closed loop).
    Closed(usize),
    /// Sends nothing before `from`, then behaves as `Closed(depth)`.
    ClosedFrom { from: u64, depth: usize },
    /// Behaves as `Closed(depth)` before `until`, then sends nothing more.
    ClosedUntil { until: u64, depth: usize },
}

#[derive(Clone, Copy, Debug)]
struct Spec {
    committed: u64,
    units: u32,
    load: Load,
}

struct Run {
    /// Completed cost per volume in [`Run::from`, `Run::to`).
    completed_cost: Vec<u64>,
    /// First dispatch time per volume.
    first_dispatch: Vec<Option<u64>>,
    /// Dispatch times per volume.
    dispatch_times: Vec<Vec<u64>>,
    /// Dispatches per volume and class (reservation, share, burst, borrow, boost).
    classes: Vec<[u64; 5]>,
}

/// A device that told the partitioner it does 100,000 IOPS (so every commitment is admitted),
/// without refining that from completions: the overload stays.
fn partitioner() -> Partitioner {
    let cfg = DeviceConfig {
        capacity_iops: 100_000,
        cost: sched::iops::CostModel {
            unit_bytes: UNIT,
            read_cost: 1024,
            write_cost: 1024,
        },
        max_queue: 1 << 16,
        refine_capacity: false,
        ..DeviceConfig::default()
    };
    Partitioner::new(cfg, 0).unwrap()
}

fn class_index(c: ServiceClass) -> usize {
    match c {
        ServiceClass::Reservation => 0,
        ServiceClass::Share => 1,
        ServiceClass::Burst => 2,
        ServiceClass::Borrow => 3,
        ServiceClass::Boost => 4,
    }
}

/// Runs `specs` (with per-volume policies from `policy`) on a device with `slots` slots and
/// `unit_ns` of service per unit I/O until `end`, counting completions in `[from, to)`.
fn run(
    specs: &[Spec],
    policy: impl Fn(usize) -> OveragePolicy,
    slots: usize,
    unit_ns: u64,
    (from, to, end): (u64, u64, u64),
) -> Run {
    let mut p = partitioner();
    let ids: Vec<VolumeId> = specs
        .iter()
        .enumerate()
        .map(|(i, s)| {
            p.add_volume(
                VolumeConfig {
                    committed_iops: s.committed,
                    policy: policy(i),
                    ..VolumeConfig::default()
                },
                0,
            )
            .unwrap()
        })
        .collect();
    let n = specs.len();
    let mut queued = vec![0usize; n];
    let mut outstanding = vec![0usize; n];
    let mut out = Run {
        completed_cost: vec![0; n],
        first_dispatch: vec![None; n],
        dispatch_times: vec![Vec::new(); n],
        classes: vec![[0; 5]; n],
    };
    // (completion time, volume, request)
    let mut device: std::collections::BinaryHeap<std::cmp::Reverse<(u64, usize, u64)>> =
        std::collections::BinaryHeap::new();
    let mut next_id = 0u64;
    let mut now = 0u64;
    loop {
        // Completions due now.
        while let Some(&std::cmp::Reverse((t, v, id))) = device.peek() {
            if t > now {
                break;
            }
            device.pop();
            let r = Request {
                id,
                bytes: specs[v].units * UNIT,
                op: IoOp::Read,
            };
            p.complete(ids[v], &r, 0, t).unwrap();
            outstanding[v] -= 1;
            if (from..to).contains(&t) {
                out.completed_cost[v] += u64::from(specs[v].units) * COST_ONE;
            }
        }
        // Top every workload up.
        for (v, s) in specs.iter().enumerate() {
            let want = match s.load {
                Load::Backlog(depth) => depth.saturating_sub(queued[v]),
                Load::Closed(depth) => depth.saturating_sub(outstanding[v]),
                Load::ClosedFrom { from, depth } if now >= from => {
                    depth.saturating_sub(outstanding[v])
                }
                Load::ClosedUntil { until, depth } if now < until => {
                    depth.saturating_sub(outstanding[v])
                }
                Load::ClosedFrom { .. } | Load::ClosedUntil { .. } => 0,
            };
            for _ in 0..want {
                let r = Request {
                    id: next_id,
                    bytes: s.units * UNIT,
                    op: IoOp::Read,
                };
                next_id += 1;
                p.enqueue(ids[v], r, now).unwrap();
                queued[v] += 1;
                outstanding[v] += 1;
            }
        }
        // Fill the device.
        while device.len() < slots {
            let Some(d) = p.dispatch(now) else { break };
            let v = ids.iter().position(|&i| i == d.volume).unwrap();
            queued[v] -= 1;
            out.first_dispatch[v].get_or_insert(now);
            out.dispatch_times[v].push(now);
            out.classes[v][class_index(d.class)] += 1;
            let service = unit_ns * d.cost / COST_ONE;
            device.push(std::cmp::Reverse((now + service, v, d.request.id)));
        }
        let next_start = specs
            .iter()
            .filter_map(|s| match s.load {
                Load::ClosedFrom { from, .. } if from > now => Some(from),
                Load::ClosedUntil { until, .. } if until > now => Some(until),
                _ => None,
            })
            .min();
        let next = [device.peek().map(|c| c.0 .0), next_start]
            .into_iter()
            .flatten()
            .min();
        match next {
            Some(t) if t < end => now = t,
            _ => break,
        }
    }
    out
}

/// Each volume's completed cost as a fraction of its commitment over `secs` seconds, in per mille
/// of its commitment.
fn fractions_permille(specs: &[Spec], r: &Run, secs: u64) -> Vec<u64> {
    specs
        .iter()
        .zip(&r.completed_cost)
        .map(|(s, &c)| c * 1000 / (s.committed * COST_ONE * secs))
        .collect()
}

/// The issue-7 case: a backlogged volume and a shallow closed loop whose requests are usually all
/// on the device. Textbook mClock tags the closed loop's next request `now`, far behind the
/// backlog's lagging tags, and it starves (measured before the fix: 3.1% of its commitment,
/// the backlog 98.4%).
#[test]
fn volume_with_requests_in_flight_is_not_starved() {
    // 8 slots x 1 ms = 8,000 IOPS against 12,000 committed: each gets 2/3 of its commitment.
    let specs = [
        Spec {
            committed: 8000,
            units: 1,
            load: Load::Backlog(256),
        },
        Spec {
            committed: 4000,
            units: 1,
            load: Load::Closed(4),
        },
    ];
    let r = run(
        &specs,
        |_| OveragePolicy::BestEffort,
        8,
        MS,
        (S, 3 * S, 3 * S),
    );
    let f = fractions_permille(&specs, &r, 2);
    println!("per mille of commitment: {f:?}");
    for x in &f {
        assert!((656..=677).contains(x), "expected 2/3 each (±1%): {f:?}");
    }
}

/// A volume idle while the others run overloaded comes back level with them: served at once,
/// and from then on at the same fraction of its commitment (no flood from its own old tags, no
/// starvation behind theirs).
#[test]
fn volume_back_from_idle_under_overload_gets_its_proportional_share() {
    let specs = [
        Spec {
            committed: 6000,
            units: 1,
            load: Load::Backlog(512),
        },
        Spec {
            committed: 3000,
            units: 2,
            load: Load::Closed(16),
        },
        Spec {
            committed: 3000,
            units: 1,
            load: Load::ClosedFrom {
                from: 2 * S + 7,
                depth: 16,
            },
        },
    ];
    // 8,000 IOPS; 12,000 committed once the third volume is back: 2/3 each.
    let r = run(
        &specs,
        |_| OveragePolicy::BestEffort,
        8,
        MS,
        (3 * S, 5 * S, 5 * S),
    );
    let back = r.first_dispatch[2].unwrap();
    assert!(
        back <= 2 * S + 7 + 2 * MS,
        "served within a couple of service times of its return: {back}"
    );
    let f = fractions_permille(&specs, &r, 2);
    println!("per mille of commitment: {f:?}");
    for x in &f {
        assert!((656..=677).contains(x), "expected 2/3 each (±1%): {f:?}");
    }
}

/// The debt an overload leaves is at most one window of commitment: after 10 s in which two
/// volumes committed 6,000 each share an 8,000 IOPS device (their reservation tags 3.3 s behind),
/// one stops; the other, now alone under its commitment, makes up at most one window of it
/// before best-effort traffic is served again (without the bound: 10 s of catching up).
#[test]
fn overload_debt_is_bounded_by_one_window() {
    let specs = [
        Spec {
            committed: 6000,
            units: 1,
            load: Load::Backlog(256),
        },
        Spec {
            committed: 6000,
            units: 1,
            load: Load::ClosedUntil {
                until: 10 * S,
                depth: 32,
            },
        },
        Spec {
            committed: 0,
            units: 1,
            load: Load::Backlog(256),
        },
    ];
    let r = run(
        &specs,
        |_| OveragePolicy::BestEffort,
        8,
        MS,
        (0, 20 * S, 20 * S),
    );
    // During the overload the best-effort volume gets nothing but the first instant's slots.
    let early = r.dispatch_times[2].iter().filter(|&&t| t < 10 * S).count();
    assert!(early <= 8, "{early}");
    // Served again after at most one window of debt: A's tag is at most ~2 windows behind at the
    // stop and catches up at 8,000 / 6,000 - 1 = 1/3 s per s: within 6 s, and then it gets its
    // weight's half of the 2,000 spare IOPS.
    let back = r.dispatch_times[2]
        .iter()
        .copied()
        .find(|&t| t >= 10 * S)
        .expect("best effort served again");
    println!("best effort back at {back} ns");
    assert!(back <= 16 * S, "best effort starved until {back}");
    let late = r.dispatch_times[2].iter().filter(|&&t| t >= 18 * S).count();
    assert!(
        late >= 1900,
        "best effort share after the catch-up: {late} in 2 s"
    );
}

/// A volume whose requests are all on the device is using its commitment: a `Borrow` volume may
/// borrow only the commitment of volumes with no outstanding work at all.
#[test]
fn commitment_in_flight_is_not_lent() {
    let mut p = partitioner();
    let owner = p
        .add_volume(
            VolumeConfig {
                committed_iops: 2000,
                ..VolumeConfig::default()
            },
            0,
        )
        .unwrap();
    let borrower = p
        .add_volume(
            VolumeConfig {
                committed_iops: 1000,
                policy: OveragePolicy::Borrow,
                ..VolumeConfig::default()
            },
            0,
        )
        .unwrap();
    let r = |id| Request {
        id,
        bytes: UNIT,
        op: IoOp::Read,
    };
    p.enqueue(owner, r(0), 0).unwrap();
    let d = p.dispatch(0).unwrap();
    assert_eq!(d.volume, owner);
    for i in 1..=1000 {
        p.enqueue(borrower, r(i), 0).unwrap();
    }
    // The owner's request is on the device: the borrower gets its reservation and share, never
    // the owner's commitment.
    let mut t = 0;
    while t < 10 * MS {
        if let Some(d) = p.dispatch(t) {
            assert_ne!(d.class, ServiceClass::Borrow, "borrowed at {t} while busy");
        }
        t += 100_000;
    }
    // Once it completes the owner is idle and lends again.
    p.complete(owner, &r(0), 0, t).unwrap();
    let mut borrowed = 0;
    for k in 0..20 {
        if let Some(d) = p.dispatch(t + k * 100_000) {
            borrowed += u32::from(d.class == ServiceClass::Borrow);
        }
    }
    assert!(borrowed > 0, "lends after the completion");
}

/// One volume of a generated case: (commitment weight, request size in units, backlogged rather
/// than a closed loop, extra closed-loop depth).
type VolumeCase = (u64, u32, bool, usize);

fn overload_case() -> impl Strategy<Value = (usize, u64, Vec<VolumeCase>)> {
    (
        prop::sample::select(vec![4usize, 8, 16]),
        1200u64..=3000,
        prop::collection::vec((1u64..=8, 1u32..=2, any::<bool>(), 0usize..=4), 2..=5),
    )
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 32, ..ProptestConfig::default() })]

    /// Under overload (the commitments sum to 1.2x-3x what the device delivers), every volume that
    /// demands more than its commitment-proportional share — backlogged in the partitioner, or a
    /// closed loop deep enough for that share but often entirely on the device — completes the
    /// same fraction of its commitment as the others, within ±3% (relative) over 2 s.
    #[test]
    fn overload_degrades_in_proportion_to_commitments(
        (slots, overload_permille, vols) in overload_case()
    ) {
        // 1 ms per unit I/O: the device does `slots` x 1,000 unit I/Os per second.
        let capacity = u64::try_from(slots).unwrap() * 1000;
        let weights: u64 = vols.iter().map(|v| v.0).sum();
        let specs: Vec<Spec> = vols
            .iter()
            .map(|&(w, units, backlog, extra)| {
                let committed = capacity * overload_permille * w / (1000 * weights);
                // Its share in requests per second (unit I/Os over request size), and the depth
                // a closed loop needs for it with the device's 1 ms per unit (+50%, rounded up, at
                // least 2). Rounded down, a share of 2.67 in flight got depth 3 (+12%), and the
                // volume, often entirely queued, fell 5% short: a test case with too little demand.
                let share = capacity * w / weights / u64::from(units);
                let needed = usize::try_from((share * u64::from(units) * 3).div_ceil(2000)).unwrap();
                let load = if backlog {
                    Load::Backlog(64)
                } else {
                    Load::Closed(needed.max(2) + extra)
                };
                Spec { committed: committed.max(1), units, load }
            })
            .collect();
        let r = run(&specs, |_| OveragePolicy::BestEffort, slots, MS, (S / 2, 5 * S / 2, 5 * S / 2));
        let f = fractions_permille(&specs, &r, 2);
        let total: u64 = r.completed_cost.iter().sum();
        let committed: u64 = specs.iter().map(|s| s.committed).sum();
        // The fraction every volume should get: what the device delivered over what was committed.
        let expect = total * 1000 / (committed * COST_ONE * 2);
        for (i, x) in f.iter().enumerate() {
            prop_assert!(
                x * 100 >= expect * 97 && x * 100 <= expect * 103,
                "volume {i} got {x} per mille of its commitment, expected {expect} ± 3%: {f:?} {specs:?}"
            );
        }
        // Nothing but reservations is served while they are overdue: only the first instant, when
        // the device's slots are filled before any tag lags, may see other classes.
        let others: u64 = r.classes.iter().map(|c| c[1] + c[2] + c[3] + c[4]).sum();
        prop_assert!(others <= u64::try_from(slots).unwrap(), "{:?}", r.classes);
    }
}

/// `sim io overload` (the simulator's device model, jittered service times, 20 s): the partitioner
/// serves every volume the same fraction of its commitment within ±2% (relative), utilisation
/// stays at 100%, and the textbook arrival-anchored rule it replaced starves the closed loop.
#[test]
fn sim_overload_scenario_degrades_in_proportion() {
    use sched::iops::sim::{run_all, scenarios};
    let sc = scenarios::overload();
    let runs = run_all(&sc).unwrap();
    let part = &runs[0];
    let before = &runs[3];
    assert_eq!(
        (part.dispatcher.as_str(), before.dispatcher.as_str()),
        ("partitioner", "mclock-arrival")
    );
    let committed: u64 = sc.volumes.iter().map(|v| v.config.committed_iops).sum();
    assert!(
        part.total_iops * 10 < committed * 8,
        "the scenario is an overload"
    );
    assert!(part.utilisation_ppm >= 990_000, "{}", part.utilisation_ppm);
    let expect = part.total_iops * 1000 / committed;
    for v in &part.volumes {
        let f = v.served_iops * 1000 / v.committed_iops;
        println!("partitioner {}: {f} per mille of its commitment", v.name);
        assert!(
            f * 100 >= expect * 98 && f * 100 <= expect * 102,
            "{}: {f} per mille, expected {expect}",
            v.name
        );
    }
    let qd8 = &before.volumes[2];
    assert_eq!(qd8.name, "qd8");
    assert!(
        qd8.served_iops * 5 < qd8.committed_iops * expect / 1000,
        "arrival anchoring starves the closed loop: {} IOPS",
        qd8.served_iops
    );
}
