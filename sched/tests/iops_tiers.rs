//! Issue 4, test 5: the automatic tier policy follows the seed's example trajectory (tiers 500 /
//! 350 / 200 IOPS, drop below 75% use, rise at or above 110%, asymmetric periods).

use sched::iops::{TierPolicy, TierState};

/// Down after 3 consecutive windows below 75%, up after 2 consecutive windows at or above 110%.
fn seed_policy() -> TierPolicy {
    TierPolicy::new(vec![500, 350, 200], 750, 3, 1100, 2).expect("valid policy")
}

#[test]
fn follows_seed_trajectory() {
    let p = seed_policy();
    let mut s = p.start(500).unwrap();
    // (observed IOPS, expected commitment after the window, expected proposal)
    let trajectory: &[(u64, u64, Option<u64>)] = &[
        (480, 500, None),      // 96%: stay
        (370, 500, None),      // 74% (< 375): streak 1
        (360, 500, None),      // streak 2
        (380, 500, None),      // 76%: streak broken
        (300, 500, None),      // streak 1
        (250, 500, None),      // streak 2
        (200, 350, Some(350)), // streak 3: drop to 350
        (260, 350, None),      // 74.3% of 350 (< 262.5): streak 1 at the new tier
        (250, 350, None),      // streak 2
        (240, 200, Some(200)), // streak 3: drop to 200
        (150, 200, None),      // 75% exactly is not below: no streak
        (149, 200, None),      // streak 1; lowest tier cannot drop
        (140, 200, None),
        (130, 200, None),      // streak 4 at the lowest tier: still 200
        (220, 200, None),      // 110% exactly: up streak 1
        (230, 350, Some(350)), // up streak 2: rise to 350
        (385, 350, None),      // 110% of 350: streak 1
        (384, 350, None),      // 109.7%: broken
        (400, 350, None),      // streak 1
        (420, 500, Some(500)), // streak 2: rise to 500
        (600, 500, None),      // highest tier cannot rise
        (560, 500, None),
    ];
    for (i, &(used, want, proposal)) in trajectory.iter().enumerate() {
        let (next, prop) = p.evaluate(s, used);
        assert_eq!(
            (next.current, prop),
            (want, proposal),
            "window {i}: used {used} from {s:?}"
        );
        s = next;
    }
}

#[test]
fn evaluate_is_pure() {
    let p = seed_policy();
    let s = TierState {
        current: 350,
        below: 2,
        above: 0,
    };
    assert_eq!(p.evaluate(s, 100), p.evaluate(s, 100));
    assert_eq!(p.evaluate(s, 100).0.current, 200);
    assert_eq!(s.below, 2, "input state untouched");
}

#[test]
fn rejects_bad_policies() {
    assert!(TierPolicy::new(vec![], 750, 3, 1100, 2).is_err());
    assert!(TierPolicy::new(vec![0, 100], 750, 3, 1100, 2).is_err());
    assert!(TierPolicy::new(vec![100], 1000, 3, 1100, 2).is_err());
    assert!(TierPolicy::new(vec![100], 750, 3, 900, 2).is_err());
    assert!(TierPolicy::new(vec![100], 750, 0, 1100, 2).is_err());
    assert!(seed_policy().start(300).is_err());
}
