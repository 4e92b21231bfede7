//! Issue 4, test 4 and the API contract: limits and burst buckets hold exactly (integer
//! accounting, conservation), no request is dropped or reordered within its volume (also across
//! reconfigurations), admission errors carry the numbers, idle volumes neither flood nor starve.

use proptest::prelude::*;
use sched::iops::{
    BurstConfig, DeviceConfig, Dispatch, IoOp, IopsError, OveragePolicy, Partitioner, Request,
    ServiceClass, VolumeConfig, VolumeId, COST_ONE,
};

const MS: u64 = 1_000_000;
const S: u64 = 1_000_000_000;

fn device(capacity: u64) -> DeviceConfig {
    DeviceConfig {
        capacity_iops: capacity,
        max_queue: 1 << 20,
        ..DeviceConfig::default()
    }
}

fn req(id: u64, units: u32) -> Request {
    Request {
        id,
        bytes: units * 16 * 1024,
        op: IoOp::Read,
    }
}

/// An in-flight request: (completion time, volume index, volume generation, request id, bytes).
type Completion = (u64, u32, u32, u64, u32);

/// Drives `p` with `arrivals` (time, volume, request) through a device with `slots` parallel slots
/// and a fixed `service_ns` (`slots == 0`: unbounded, instant). Returns every dispatch with its time.
fn drive(
    p: &mut Partitioner,
    ids: &[VolumeId],
    arrivals: &[(u64, usize, Request)],
    slots: usize,
    service_ns: u64,
    end: u64,
) -> Vec<(u64, Dispatch)> {
    let mut out = Vec::new();
    let mut completions: std::collections::BinaryHeap<std::cmp::Reverse<Completion>> =
        std::collections::BinaryHeap::new();
    let mut i = 0;
    let mut now = 0;
    loop {
        while let Some(&std::cmp::Reverse((t, idx, gen, id, bytes))) = completions.peek() {
            if t > now {
                break;
            }
            completions.pop();
            let r = Request {
                id,
                bytes,
                op: IoOp::Read,
            };
            let _ = p.complete(
                VolumeId {
                    index: idx,
                    generation: gen,
                },
                &r,
                service_ns,
                t,
            );
        }
        while i < arrivals.len() && arrivals[i].0 <= now {
            let (_, v, r) = arrivals[i];
            p.enqueue(ids[v], r, now).expect("enqueue");
            i += 1;
        }
        while slots == 0 || completions.len() < slots {
            let Some(d) = p.dispatch(now) else {
                // Work conservation: nothing may go now only when everything queued is throttled.
                assert!(
                    p.next_eligible_time(now).is_none_or(|t| t > now),
                    "idle with eligible work at {now}"
                );
                break;
            };
            if slots > 0 {
                completions.push(std::cmp::Reverse((
                    now + service_ns,
                    d.volume.index,
                    d.volume.generation,
                    d.request.id,
                    d.request.bytes,
                )));
            }
            out.push((now, d));
        }
        let next_arrival = arrivals.get(i).map(|a| a.0);
        let next_completion = completions.peek().map(|c| c.0 .0);
        let next_eligible = if slots == 0 || completions.len() < slots {
            p.next_eligible_time(now).filter(|&t| t > now)
        } else {
            None
        };
        let next = [next_arrival, next_completion, next_eligible]
            .into_iter()
            .flatten()
            .min();
        match next {
            Some(t) if t <= end => now = t,
            _ => break,
        }
    }
    out
}

fn arrivals_strategy(
    volumes: usize,
    n: usize,
) -> impl Strategy<Value = Vec<(u64, usize, Request)>> {
    prop::collection::vec((0u64..2 * S, 0..volumes, 1u32..=4), 1..n).prop_map(|mut v| {
        v.sort_by_key(|a| a.0);
        v.into_iter()
            .enumerate()
            .map(|(i, (t, vol, units))| (t, vol, req(i as u64, units)))
            .collect()
    })
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 48, ..ProptestConfig::default() })]

    /// Consecutive dispatches of a limited volume are at least exactly cost/limit apart, so over any
    /// interval [a, b] it is served at most limit x (b - a) plus one request.
    #[test]
    fn limits_hold_exactly(
        limits in prop::collection::vec(1u64..5000, 1..4),
        arrivals in arrivals_strategy(3, 400),
    ) {
        let mut p = Partitioner::new(device(1_000_000), 0).unwrap();
        let ids: Vec<_> = (0..3)
            .map(|v| {
                let cfg = VolumeConfig {
                    committed_iops: limits.get(v).map_or(0, |l| l / 2),
                    limit_iops: limits.get(v).copied(),
                    ..VolumeConfig::default()
                };
                p.add_volume(cfg, 0).unwrap()
            })
            .collect();
        let out = drive(&mut p, &ids, &arrivals, 0, 0, 10_000 * S);
        for (v, id) in ids.iter().enumerate() {
            let Some(&limit) = limits.get(v) else { continue };
            let mine: Vec<_> = out.iter().filter(|(_, d)| d.volume == *id).collect();
            for w in mine.windows(2) {
                let (t0, d0) = w[0];
                let (t1, _) = w[1];
                prop_assert!(
                    u128::from(t1 - t0) * u128::from(limit) * u128::from(COST_ONE) >= u128::from(d0.cost) * u128::from(S),
                    "volume {v} limit {limit}: {} cost units at {t0} then next at {t1}", d0.cost
                );
            }
            // Sliding window form, over every pair.
            for i in 0..mine.len() {
                let mut sum = 0u128;
                for j in i..mine.len() {
                    sum += u128::from(mine[j].1.cost);
                    let span = u128::from(mine[j].0 - mine[i].0);
                    prop_assert!(sum * u128::from(S) <= span * u128::from(limit) * u128::from(COST_ONE) + u128::from(mine[j].1.cost) * u128::from(S));
                }
            }
        }
        // Nothing lost: every request dispatched exactly once, in FIFO order within its volume.
        prop_assert_eq!(out.len(), arrivals.len());
        for id in &ids {
            let seq: Vec<u64> = out.iter().filter(|(_, d)| d.volume == *id).map(|(_, d)| d.request.id).collect();
            prop_assert!(seq.windows(2).all(|w| w[0] < w[1]));
        }
    }

    /// The burst bucket conserves tokens exactly: held = credited - spent, spent = cost served in the
    /// burst class, held <= size, and credit never exceeds the fill rate times the elapsed time.
    #[test]
    fn burst_buckets_conserve(
        fill in 1u64..2000,
        size in 1u64..500,
        arrivals in arrivals_strategy(2, 600),
    ) {
        let mut p = Partitioner::new(device(2000), 0).unwrap();
        let bursty = VolumeConfig {
            committed_iops: 200,
            burst: Some(BurstConfig { fill_iops: fill, size_ios: size }),
            ..VolumeConfig::default()
        };
        let ids = vec![p.add_volume(bursty, 0).unwrap(), p.add_volume(VolumeConfig::default(), 0).unwrap()];
        // Volume 1 floods so the device is contended; 4 slots of 2 ms = 2000 unit IOPS.
        let mut all = arrivals.clone();
        all.extend((0..2000u64).map(|k| (k * MS, 1, req(1_000_000 + k, 1))));
        all.sort_by_key(|a| (a.0, a.2.id));
        let end = 3 * S;
        let out = drive(&mut p, &ids, &all, 4, 2 * MS, end);
        let b = p.burst_bucket(ids[0]).unwrap().unwrap();
        let totals = p.totals(ids[0]).unwrap();
        prop_assert_eq!(b.tokens(), b.credited() - b.spent());
        prop_assert!(b.tokens() <= b.capacity());
        prop_assert_eq!(totals.burst_cost, b.spent());
        let burst_cost: u64 = out.iter().filter(|(_, d)| d.volume == ids[0] && d.class == ServiceClass::Burst).map(|(_, d)| d.cost).sum();
        prop_assert_eq!(burst_cost, b.spent());
        let last = out.last().map_or(0, |(t, _)| *t);
        prop_assert!(u128::from(b.credited()) * u128::from(S) <= u128::from(fill) * u128::from(COST_ONE) * u128::from(last.max(1)));
    }

    /// Reconfiguring commitments, weights and limits mid-run drops nothing and keeps per-volume order.
    #[test]
    fn reconfiguration_keeps_queues(
        arrivals in arrivals_strategy(3, 300),
        changes in prop::collection::vec((0u64..2 * S, 0usize..3, 0u64..3000, 1u32..1000), 0..8),
    ) {
        let mut p = Partitioner::new(device(10_000), 0).unwrap();
        let ids: Vec<_> = (0..3).map(|_| p.add_volume(VolumeConfig { committed_iops: 500, ..VolumeConfig::default() }, 0).unwrap()).collect();
        let mut changes = changes;
        changes.sort_by_key(|c| c.0);
        let mut out = Vec::new();
        let mut start = 0;
        let mut served = 0;
        for (t, v, commit, weight) in changes.iter().copied().chain(std::iter::once((2 * S, 0, 500, 100))) {
            let chunk: Vec<_> = arrivals.iter().copied().filter(|a| a.0 >= start && a.0 < t).collect();
            out.extend(drive(&mut p, &ids, &chunk, 8, 500_000, t).into_iter().map(|(at, d)| (at, d.volume, d.request.id)));
            let cfg = VolumeConfig { committed_iops: commit, weight, limit_iops: (weight % 2 == 0).then_some(commit.max(1) * 2), ..VolumeConfig::default() };
            match p.reconfigure(ids[v], cfg, t) {
                Ok(()) | Err(IopsError::Admission(_)) => {}
                Err(e) => prop_assert!(false, "unexpected {e}"),
            }
            served = out.len();
            start = t;
        }
        let _ = served;
        // Drain whatever is still queued.
        let mut now = 2 * S;
        while p.queued_total() > 0 {
            match p.dispatch(now) {
                Some(d) => out.push((now, d.volume, d.request.id)),
                None => now = p.next_eligible_time(now).unwrap(),
            }
        }
        prop_assert_eq!(out.len(), arrivals.len());
        let mut seen: Vec<u64> = out.iter().map(|o| o.2).collect();
        seen.sort_unstable();
        seen.dedup();
        prop_assert_eq!(seen.len(), arrivals.len());
        for id in &ids {
            let seq: Vec<u64> = out.iter().filter(|o| o.1 == *id).map(|o| o.2).collect();
            prop_assert!(seq.windows(2).all(|w| w[0] < w[1]));
        }
    }
}

#[test]
fn admission_errors_carry_the_numbers() {
    let mut p = Partitioner::new(device(10_000), 0).unwrap();
    let a = p
        .add_volume(
            VolumeConfig {
                committed_iops: 5000,
                ..VolumeConfig::default()
            },
            0,
        )
        .unwrap();
    let err = p
        .add_volume(
            VolumeConfig {
                committed_iops: 3001,
                ..VolumeConfig::default()
            },
            0,
        )
        .unwrap_err();
    let IopsError::Admission(l) = err else {
        panic!("{err:?}")
    };
    assert_eq!(
        (
            l.capacity_iops,
            l.committable_permille,
            l.overcommit_permille,
            l.committed_sum,
            l.requested
        ),
        (10_000, 800, 1000, 5000, 3001)
    );
    assert_eq!(l.committable_iops(), 8000);
    assert!(err.to_string().contains("committable 8000"), "{err}");
    p.add_volume(
        VolumeConfig {
            committed_iops: 3000,
            ..VolumeConfig::default()
        },
        0,
    )
    .unwrap();
    // Raising beyond the bound is refused with the others' sum; lowering always works.
    let IopsError::Admission(l) = p
        .reconfigure(
            a,
            VolumeConfig {
                committed_iops: 5001,
                ..VolumeConfig::default()
            },
            0,
        )
        .unwrap_err()
    else {
        panic!()
    };
    assert_eq!((l.committed_sum, l.requested), (3000, 5001));
    p.reconfigure(
        a,
        VolumeConfig {
            committed_iops: 1000,
            ..VolumeConfig::default()
        },
        0,
    )
    .unwrap();
    assert_eq!(p.committed_sum(), 4000);
    // Overcommit 125% admits up to 10,000.
    let mut q = Partitioner::new(
        DeviceConfig {
            overcommit_permille: 1250,
            ..device(10_000)
        },
        0,
    )
    .unwrap();
    q.add_volume(
        VolumeConfig {
            committed_iops: 10_000,
            ..VolumeConfig::default()
        },
        0,
    )
    .unwrap();
    assert!(q
        .add_volume(
            VolumeConfig {
                committed_iops: 1,
                ..VolumeConfig::default()
            },
            0
        )
        .is_err());
    // Invalid configurations are typed errors.
    assert_eq!(
        p.add_volume(
            VolumeConfig {
                committed_iops: 100,
                limit_iops: Some(50),
                ..VolumeConfig::default()
            },
            0
        ),
        Err(IopsError::LimitBelowCommitment {
            limit: 50,
            committed: 100
        })
    );
    assert!(matches!(
        p.add_volume(
            VolumeConfig {
                weight: 0,
                ..VolumeConfig::default()
            },
            0
        ),
        Err(IopsError::InvalidVolume(_))
    ));
    assert!(matches!(
        Partitioner::new(
            DeviceConfig {
                committable_permille: 0,
                ..device(1)
            },
            0
        ),
        Err(IopsError::InvalidDevice(_))
    ));
}

#[test]
fn queue_bound_and_removal() {
    let mut p = Partitioner::new(
        DeviceConfig {
            max_queue: 2,
            ..device(1000)
        },
        0,
    )
    .unwrap();
    let a = p.add_volume(VolumeConfig::default(), 0).unwrap();
    p.enqueue(a, req(1, 1), 0).unwrap();
    p.enqueue(a, req(2, 1), 0).unwrap();
    assert_eq!(
        p.enqueue(a, req(3, 1), 0),
        Err(IopsError::QueueFull {
            volume: a,
            depth: 2
        })
    );
    let back = p.remove_volume(a, 0).unwrap();
    assert_eq!(back.iter().map(|r| r.id).collect::<Vec<_>>(), vec![1, 2]);
    assert_eq!(p.queued_total(), 0);
    assert_eq!(p.enqueue(a, req(4, 1), 0), Err(IopsError::UnknownVolume(a)));
    // The slot is reused under a new generation; the old handle stays dead.
    let b = p.add_volume(VolumeConfig::default(), 0).unwrap();
    assert_eq!(b.index, a.index);
    assert_ne!(b, a);
    assert!(p.dispatch(0).is_none());
    assert_eq!(p.next_eligible_time(0), None);
}

/// A volume back from a long idle period starts at `now`: it is served at once (no starvation)
/// but gets no credit for its idle time (no flood above its commitment).
#[test]
fn idle_volume_neither_floods_nor_starves() {
    let mut p = Partitioner::new(device(10_000), 0).unwrap();
    let owner = p
        .add_volume(
            VolumeConfig {
                committed_iops: 1000,
                ..VolumeConfig::default()
            },
            0,
        )
        .unwrap();
    let flood = p
        .add_volume(
            VolumeConfig {
                committed_iops: 0,
                weight: 100,
                ..VolumeConfig::default()
            },
            0,
        )
        .unwrap();
    // The owner sends 1000 requests, then idles for 10 s while the flood keeps the device busy
    // (200,000 requests: 20 s of a 10,000 IOPS device).
    let mut now = 0;
    let mut id = 0;
    for _ in 0..200_000 {
        p.enqueue(flood, req(id, 1), now).unwrap();
        id += 1;
    }
    for _ in 0..1000 {
        p.enqueue(owner, req(id, 1), 0).unwrap();
        id += 1;
    }
    // A device of 10,000 IOPS: one dispatch every 100 us.
    while now < 11 * S {
        let _ = p.dispatch(now);
        now += 100_000;
    }
    // Back with 2000 requests at once (more than it can be served in 100 ms).
    for _ in 0..2000 {
        p.enqueue(owner, req(id, 1), now).unwrap();
        id += 1;
    }
    let back = now;
    let mut first = None;
    let mut owner_res = 0;
    while now < back + 100 * MS {
        if let Some(d) = p.dispatch(now) {
            if d.volume == owner {
                first.get_or_insert(now);
                if d.class == ServiceClass::Reservation {
                    owner_res += 1;
                }
            }
        }
        now += 100_000;
    }
    assert_eq!(first, Some(back), "served at once");
    // 1000 IOPS over 100 ms = 100 reservation dispatches (+1 for the first at t = back).
    assert!(owner_res <= 101, "no flood from old tags: {owner_res}");
    assert!(owner_res >= 99, "reservation honoured: {owner_res}");
}

/// Spare capacity is shared by weight among backlogged volumes.
#[test]
fn weights_share_spare_capacity() {
    let mut p = Partitioner::new(device(10_000), 0).unwrap();
    let a = p
        .add_volume(
            VolumeConfig {
                weight: 100,
                ..VolumeConfig::default()
            },
            0,
        )
        .unwrap();
    let b = p
        .add_volume(
            VolumeConfig {
                weight: 300,
                ..VolumeConfig::default()
            },
            0,
        )
        .unwrap();
    for i in 0..10_000 {
        p.enqueue(a, req(i, 1), 0).unwrap();
        p.enqueue(b, req(100_000 + i, 1), 0).unwrap();
    }
    let mut counts = [0u32; 2];
    for k in 0..8000 {
        let d = p.dispatch(k * 100_000).unwrap();
        counts[usize::from(d.volume == b)] += 1;
    }
    assert_eq!(counts, [2000, 6000]);
}

/// A commitment raised at run time governs the very next decision; queued requests stay.
#[test]
fn commitment_change_takes_effect_at_once() {
    let mut p = Partitioner::new(device(10_000), 0).unwrap();
    let t = p
        .add_volume(
            VolumeConfig {
                committed_iops: 10,
                weight: 1,
                ..VolumeConfig::default()
            },
            0,
        )
        .unwrap();
    let f = p
        .add_volume(
            VolumeConfig {
                weight: 1000,
                ..VolumeConfig::default()
            },
            0,
        )
        .unwrap();
    for i in 0..20_000 {
        p.enqueue(t, req(i, 1), 0).unwrap();
        p.enqueue(f, req(100_000 + i, 1), 0).unwrap();
    }
    let mut res = 0;
    let mut now = 0;
    while now < S {
        if p.dispatch(now)
            .is_some_and(|d| d.volume == t && d.class == ServiceClass::Reservation)
        {
            res += 1;
        }
        now += 100_000;
    }
    assert!((10..=11).contains(&res), "10 IOPS committed: {res}");
    let queued = p.queued(t).unwrap();
    p.reconfigure(
        t,
        VolumeConfig {
            committed_iops: 5000,
            weight: 1,
            ..VolumeConfig::default()
        },
        now,
    )
    .unwrap();
    assert_eq!(p.queued(t).unwrap(), queued);
    let start = now;
    res = 0;
    while now < start + 100 * MS {
        if p.dispatch(now)
            .is_some_and(|d| d.volume == t && d.class == ServiceClass::Reservation)
        {
            res += 1;
        }
        now += 100_000;
    }
    // 5000 IOPS over 100 ms = 500: every slot of a 10,000 IOPS device but the share phase's.
    assert!(res >= 499, "new commitment in force at once: {res}");
}

/// When every queued volume is limit-throttled, dispatch says no and names the wake-up time.
#[test]
fn next_eligible_time_for_throttled_volumes() {
    let mut p = Partitioner::new(device(10_000), 0).unwrap();
    let a = p
        .add_volume(
            VolumeConfig {
                committed_iops: 100,
                limit_iops: Some(100),
                ..VolumeConfig::default()
            },
            0,
        )
        .unwrap();
    for i in 0..3 {
        p.enqueue(a, req(i, 1), 0).unwrap();
    }
    assert_eq!(p.dispatch(0).map(|d| d.request.id), Some(0));
    assert!(p.dispatch(0).is_none());
    assert_eq!(p.next_eligible_time(1), Some(10 * MS));
    assert!(p.dispatch(10 * MS - 1).is_none());
    assert_eq!(p.dispatch(10 * MS).map(|d| d.request.id), Some(1));
    assert_eq!(p.next_eligible_time(10 * MS), Some(20 * MS));
}

/// Unused commitment is lent to a `Borrow` volume ahead of best effort, and only up to what is unused.
#[test]
fn borrowing_is_bounded_by_unused_commitment() {
    let mut p = Partitioner::new(device(10_000), 0).unwrap();
    let _idle = p
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
    let other = p
        .add_volume(
            VolumeConfig {
                weight: 1000,
                ..VolumeConfig::default()
            },
            0,
        )
        .unwrap();
    for i in 0..20_000 {
        p.enqueue(borrower, req(i, 1), 0).unwrap();
        p.enqueue(other, req(100_000 + i, 1), 0).unwrap();
    }
    let mut classes = std::collections::HashMap::new();
    for k in 0..10_000 {
        let d = p.dispatch(k * 100_000).unwrap();
        if d.volume == borrower {
            *classes.entry(d.class).or_insert(0u32) += 1;
        }
    }
    // Over 1 s: 1000 reservation, 2000 borrowed (the idle volume's commitment), plus a 1/11 share.
    assert_eq!(classes.get(&ServiceClass::Reservation), Some(&1000));
    let borrowed = classes[&ServiceClass::Borrow];
    assert!((1999..=2001).contains(&borrowed), "{borrowed}");
}

/// Telemetry: one report per volume per window; class counters and the histogram add up.
#[test]
fn window_reports_add_up() {
    let mut p = Partitioner::new(device(10_000), 0).unwrap();
    let a = p
        .add_volume(
            VolumeConfig {
                committed_iops: 100,
                limit_iops: Some(200),
                ..VolumeConfig::default()
            },
            0,
        )
        .unwrap();
    for i in 0..300 {
        p.enqueue(a, req(i, 1), 0).unwrap();
    }
    let mut now = 0;
    while now < S {
        if let Some(d) = p.dispatch(now) {
            p.complete(d.volume, &d.request, 100_000, now + 100_000)
                .unwrap();
        }
        now += MS;
    }
    let _ = p.dispatch(S);
    let reports: Vec<_> = p.drain_reports().collect();
    assert_eq!(reports.len(), 1);
    let r = reports[0];
    assert_eq!((r.window, r.volume, r.committed_iops), (0, a, 100));
    let s = r.stats;
    assert_eq!(s.arrived, 300);
    assert_eq!(s.dispatched, 200, "limit 200 IOPS");
    assert_eq!(
        s.from_reservation + s.from_share + s.from_burst + s.from_borrow + s.from_boost,
        s.dispatched
    );
    assert_eq!(s.wait.count(), s.dispatched);
    assert_eq!(s.service.count(), s.completed);
    assert_eq!(s.service.quantile_bound(500), Some(100_000));
    assert!(s.throttled > 0);
    assert_eq!(r.completed_iops, s.completed);
}

/// The capacity estimate is refined from saturated windows only.
#[test]
fn capacity_refined_from_saturated_windows() {
    let mut p = Partitioner::new(device(10_000), 0).unwrap();
    let a = p.add_volume(VolumeConfig::default(), 0).unwrap();
    for i in 0..20_000 {
        p.enqueue(a, req(i, 1), 0).unwrap();
    }
    // The device really does 5,000 unit IOPS: one completion every 200 us, always backlogged.
    let mut now = 0;
    while now < 3 * S {
        let d = p.dispatch(now).unwrap();
        p.complete(d.volume, &d.request, 200_000, now + 200_000)
            .unwrap();
        now += 200_000;
    }
    // Window 0 loses the one completion that lands on its end: 4,999, then 5,000 per window.
    assert!(
        (4999..=5000).contains(&p.capacity_iops()),
        "{}",
        p.capacity_iops()
    );
}

/// Burst credits earned while a volume leaves its reservation unused are spent above the
/// commitment ahead of best-effort traffic, and only as many as were earned.
#[test]
fn burst_credits_earned_idle_spent_ahead_of_best_effort() {
    let mut p = Partitioner::new(device(10_000), 0).unwrap();
    let cfg = VolumeConfig {
        committed_iops: 1000,
        burst: Some(BurstConfig {
            fill_iops: 500,
            size_ios: 300,
        }),
        ..VolumeConfig::default()
    };
    let bursty = p.add_volume(cfg, 0).unwrap();
    let flood = p
        .add_volume(
            VolumeConfig {
                weight: 10_000,
                ..VolumeConfig::default()
            },
            0,
        )
        .unwrap();
    for i in 0..50_000 {
        p.enqueue(flood, req(i, 1), 0).unwrap();
    }
    // Idle for 1 s: 500 credits earned, capped at 300.
    let mut now = 0;
    while now < S {
        let _ = p.dispatch(now);
        now += 100_000;
    }
    for i in 0..1000 {
        p.enqueue(bursty, req(100_000 + i, 1), now).unwrap();
    }
    let bucket = p.burst_bucket(bursty).unwrap().unwrap();
    assert_eq!(bucket.tokens(), 300 * COST_ONE);
    let mut classes = std::collections::HashMap::new();
    let start = now;
    while now < start + 100 * MS {
        if let Some(d) = p.dispatch(now) {
            if d.volume == bursty {
                *classes.entry(d.class).or_insert(0u32) += 1;
            }
        }
        now += 100_000;
    }
    // 100 ms: 100 reservation dispatches; the other 900 slots go to the burst bucket first (300
    // credits), the flood's huge weight leaves the bursty volume almost no share.
    assert_eq!(classes.get(&ServiceClass::Burst), Some(&300));
    assert!((100..=101).contains(&classes[&ServiceClass::Reservation]));
    assert_eq!(p.burst_bucket(bursty).unwrap().unwrap().tokens(), 0);
}

/// Boosted overage goes ahead of best effort at a rate that falls as the volume's lead grows.
#[test]
fn boost_is_ahead_of_best_effort_and_decays() {
    let mut p = Partitioner::new(device(10_000), 0).unwrap();
    let boosted = p
        .add_volume(
            VolumeConfig {
                committed_iops: 1000,
                policy: OveragePolicy::Boosted {
                    boost_permille: 1000,
                    horizon_ns: 500 * MS,
                },
                weight: 1,
                ..VolumeConfig::default()
            },
            0,
        )
        .unwrap();
    let flood = p
        .add_volume(
            VolumeConfig {
                weight: 10_000,
                ..VolumeConfig::default()
            },
            0,
        )
        .unwrap();
    for i in 0..50_000 {
        p.enqueue(flood, req(i, 1), 0).unwrap();
        p.enqueue(boosted, req(100_000 + i, 1), 0).unwrap();
    }
    let mut per_100ms = Vec::new();
    let mut now = 0;
    for _ in 0..10 {
        let mut boost = 0;
        let end = now + 100 * MS;
        while now < end {
            if p.dispatch(now)
                .is_some_and(|d| d.class == ServiceClass::Boost)
            {
                boost += 1;
            }
            now += 100_000;
        }
        per_100ms.push(boost);
    }
    // Starts near the full boost rate (1000/s = 100 per 100 ms) and decays as the lead grows.
    assert!(per_100ms[0] >= 60, "{per_100ms:?}");
    assert!(per_100ms[9] < per_100ms[0] / 2, "{per_100ms:?}");
    assert!(per_100ms.iter().sum::<u32>() > 0);
}
