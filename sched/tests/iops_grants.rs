//! I/O credit grants ([`Partitioner::top_up`]): a pool grant of N I/O credits tops up a volume's
//! burst bucket by N unit I/Os exactly once per grant id; the tokens are spent only by service
//! above the commitment, after the earned tokens, beyond the bucket size, and are conserved
//! (granted == spent + held) across reconfigurations.

use proptest::prelude::*;
use sched::iops::{
    BurstConfig, DeviceConfig, IoOp, IopsError, Partitioner, Request, ServiceClass, TopUp,
    VolumeConfig, VolumeId, COST_ONE,
};

const MS: u64 = 1_000_000;
const STEP: u64 = 100_000;

fn device() -> DeviceConfig {
    DeviceConfig {
        capacity_iops: 10_000,
        max_queue: 1 << 20,
        ..DeviceConfig::default()
    }
}

fn req(id: u64) -> Request {
    Request {
        id,
        bytes: 4096,
        op: IoOp::Read,
    }
}

/// A committed volume (`burst` as given) beside a best-effort flood with a huge weight, both
/// backlogged: above its commitment the volume gets almost no share, so what it gets above its
/// commitment is burst service.
fn setup(burst: Option<BurstConfig>, backlog: u64) -> (Partitioner, VolumeId, VolumeId) {
    let mut p = Partitioner::new(device(), 0).unwrap();
    let vol = p
        .add_volume(
            VolumeConfig {
                committed_iops: 1000,
                burst,
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
        p.enqueue(flood, req(i), 0).unwrap();
    }
    for i in 0..backlog {
        p.enqueue(vol, req(1_000_000 + i), 0).unwrap();
    }
    (p, vol, flood)
}

/// Dispatches one request every `STEP` from `*now` for `span` ns; counts `vol`'s classes.
fn run(
    p: &mut Partitioner,
    vol: VolumeId,
    now: &mut u64,
    span: u64,
) -> std::collections::HashMap<ServiceClass, u64> {
    let mut classes = std::collections::HashMap::new();
    let end = *now + span;
    while *now < end {
        if let Some(d) = p.dispatch(*now) {
            p.complete(d.volume, &d.request, 0, *now).unwrap();
            if d.volume == vol {
                *classes.entry(d.class).or_insert(0) += 1;
            }
        }
        *now += STEP;
    }
    classes
}

#[test]
fn grant_applies_once_and_is_spent_above_the_commitment() {
    let (mut p, vol, _) = setup(None, 10_000);
    assert_eq!(
        p.top_up(vol, 7, 250, 0).unwrap(),
        TopUp::Applied { held_ios: 250 }
    );
    // The same id again (a retry): nothing more.
    assert_eq!(p.top_up(vol, 7, 250, 0).unwrap(), TopUp::Duplicate);
    let b = p.burst_bucket(vol).unwrap().unwrap();
    assert_eq!(
        (b.granted(), b.granted_total()),
        (250 * COST_ONE, 250 * COST_ONE)
    );
    assert_eq!(b.capacity(), 0, "a grants-only bucket has no size");
    let mut now = 0;
    let classes = run(&mut p, vol, &mut now, 100 * MS);
    // 100 ms at 1000 IOPS committed: 100 reservation dispatches; exactly the 250 granted I/Os
    // above that, then (the flood's weight) almost nothing.
    assert_eq!(classes.get(&ServiceClass::Burst), Some(&250));
    assert!((100..=101).contains(&classes[&ServiceClass::Reservation]));
    let b = p.burst_bucket(vol).unwrap().unwrap();
    assert_eq!(b.granted(), 0);
    assert_eq!(b.granted_spent(), 250 * COST_ONE);
    assert_eq!(p.totals(vol).unwrap().burst_cost, b.granted_spent());
    // Without the grant the same run gives no burst service at all.
    let (mut q, vol2, _) = setup(None, 10_000);
    let mut now = 0;
    assert_eq!(
        run(&mut q, vol2, &mut now, 100 * MS).get(&ServiceClass::Burst),
        None
    );
}

#[test]
fn grant_is_not_spent_within_the_commitment() {
    // Demand exactly at the commitment (one request per ms at 1000 IOPS): every request is a
    // reservation, the grant stays whole.
    let mut p = Partitioner::new(device(), 0).unwrap();
    let vol = p
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
                weight: 10_000,
                ..VolumeConfig::default()
            },
            0,
        )
        .unwrap();
    for i in 0..50_000 {
        p.enqueue(flood, req(i), 0).unwrap();
    }
    p.top_up(vol, 1, 50, 0).unwrap();
    let mut now = 0;
    let mut mine = 0;
    while now < 200 * MS {
        if now % MS == 0 {
            p.enqueue(vol, req(1_000_000 + now / MS), now).unwrap();
        }
        if let Some(d) = p.dispatch(now) {
            p.complete(d.volume, &d.request, 0, now).unwrap();
            if d.volume == vol {
                assert_eq!(d.class, ServiceClass::Reservation, "at {now}");
                mine += 1;
            }
        }
        now += STEP;
    }
    assert_eq!(mine, 200);
    assert_eq!(
        p.burst_bucket(vol).unwrap().unwrap().granted(),
        50 * COST_ONE
    );
}

#[test]
fn grant_exceeds_the_size_earned_tokens_go_first_and_reconfiguration_keeps_it() {
    let burst = BurstConfig {
        fill_iops: 500,
        size_ios: 30,
    };
    let (mut p, vol, _) = setup(Some(burst), 0);
    // Idle 100 ms: 30 earned (the size), then a grant of 100 on top, beyond the size.
    let mut now = 0;
    run(&mut p, vol, &mut now, 100 * MS);
    p.top_up(vol, 1, 100, now).unwrap();
    let b = p.burst_bucket(vol).unwrap().unwrap();
    assert_eq!((b.tokens(), b.granted()), (30 * COST_ONE, 100 * COST_ONE));
    for i in 0..10_000 {
        p.enqueue(vol, req(1_000_000 + i), now).unwrap();
    }
    // 10 ms: 10 reservations, and 80 burst dispatches: the 30 earned first, then 50 granted.
    let classes = run(&mut p, vol, &mut now, 10 * MS);
    let burst_n = classes[&ServiceClass::Burst];
    let b = p.burst_bucket(vol).unwrap().unwrap();
    assert!(burst_n > 30, "{classes:?}");
    assert_eq!(b.tokens(), 0, "earned tokens are spent first");
    assert_eq!(b.granted_spent(), (burst_n - 30) * COST_ONE);
    // Removing the burst configuration forfeits nothing granted; the rest is still spent.
    let cfg = VolumeConfig {
        burst: None,
        ..p.volume_config(vol).unwrap()
    };
    p.reconfigure(vol, cfg, now).unwrap();
    let held = p.burst_bucket(vol).unwrap().unwrap().granted();
    assert_eq!(held, (130 - burst_n) * COST_ONE);
    let more = run(&mut p, vol, &mut now, 200 * MS);
    assert_eq!(more[&ServiceClass::Burst] + burst_n, 130);
    let b = p.burst_bucket(vol).unwrap().unwrap();
    assert_eq!(b.granted_total(), 100 * COST_ONE);
    assert_eq!(b.granted_spent(), 100 * COST_ONE);
    assert_eq!(p.totals(vol).unwrap().burst_cost, 130 * COST_ONE);
}

#[test]
fn bad_grants_are_refused_and_change_nothing() {
    let (mut p, vol, _) = setup(None, 0);
    assert!(matches!(
        p.top_up(vol, 1, 0, 0),
        Err(IopsError::InvalidGrant(_))
    ));
    // The refused id was not remembered: a valid grant with it applies.
    assert!(matches!(
        p.top_up(vol, 1, 5, 0),
        Ok(TopUp::Applied { held_ios: 5 })
    ));
    let gone = VolumeId {
        index: 99,
        generation: 0,
    };
    assert_eq!(p.top_up(gone, 2, 5, 0), Err(IopsError::UnknownVolume(gone)));
    // Ids far below the newest are refused, never applied twice.
    p.top_up(vol, 100_000, 5, 0).unwrap();
    assert!(matches!(
        p.top_up(vol, 1, 5, 0),
        Err(IopsError::GrantIdTooOld { grant_id: 1, .. })
    ));
    let b = p.burst_bucket(vol).unwrap().unwrap();
    assert_eq!(b.granted_total(), 10 * COST_ONE);
}

proptest! {
    /// Any sequence of grants (with repeated ids) and backlogs: every id applies once, and
    /// granted == spent + held, with burst service equal to what the bucket spent.
    #[test]
    fn grants_are_conserved(
        ops in proptest::collection::vec((0u64..8, 1u64..200, 0u64..300, 1u64..20), 1..12)
    ) {
        let (mut p, vol, _) = setup(None, 0);
        let mut now = 0;
        let mut applied = std::collections::BTreeMap::new();
        let mut next_req = 1_000_000;
        for (id, ios, backlog, ms) in ops {
            match p.top_up(vol, id, ios, now).unwrap() {
                TopUp::Applied { .. } => {
                    prop_assert!(applied.insert(id, ios).is_none());
                }
                TopUp::Duplicate => prop_assert!(applied.contains_key(&id)),
            }
            for _ in 0..backlog {
                p.enqueue(vol, req(next_req), now).unwrap();
                next_req += 1;
            }
            run(&mut p, vol, &mut now, ms * MS);
            let b = p.burst_bucket(vol).unwrap().unwrap();
            let total: u64 = applied.values().sum();
            prop_assert_eq!(b.granted_total(), total * COST_ONE);
            prop_assert_eq!(b.granted_total(), b.granted_spent() + b.granted());
            prop_assert_eq!(p.totals(vol).unwrap().burst_cost, b.granted_spent());
        }
    }
}
