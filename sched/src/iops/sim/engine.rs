//! Event-driven simulation of one scenario through one dispatcher, and the metrics it yields.
//!
//! Design: a virtual clock and a binary heap of events (arrivals, completions, dispatcher timers,
//! configuration changes). After the events of an instant are handled, the engine fills the
//! device's free slots from the dispatcher; when requests are queued but none may start, it arms a
//! timer at the dispatcher's `next_time`. Open-loop volumes have a bounded number of outstanding
//! requests (a guest's ring): arrivals beyond it are counted as offered demand but not issued.
//!
//! Metrics per volume and 1 s window: offered requests, completed requests (by completion time),
//! and whether the volume *demanded* at least its commitment: open loop: offered >= commitment;
//! closed loop: it had requests waiting in the dispatcher for >= 90% of the window. A window is
//! *short* when the volume demanded its commitment but completed fewer. Latencies are end to end
//! (arrival to completion).

use alloc::collections::{BTreeMap, BinaryHeap};
use alloc::string::{String, ToString};
use alloc::vec;
use alloc::vec::Vec;
use core::cmp::Reverse;

use super::dispatchers::SimDispatcher;
use super::model::{DeviceModel, Rng, Workload};
use crate::iops::{CostModel, IoOp, Request, ServiceClass, VolumeConfig};

/// A volume in a scenario.
#[derive(Clone, Debug)]
#[cfg_attr(feature = "std", derive(serde::Serialize))]
pub struct VolumeSpec {
    /// Display name.
    pub name: String,
    /// Partitioner configuration (the token bucket derives its cap from it).
    pub config: VolumeConfig,
    /// Request pattern.
    pub workload: Workload,
    /// Request size in bytes.
    pub bytes: u32,
    /// Maximum outstanding requests for open-loop workloads.
    pub max_outstanding: u32,
}

/// A scenario: device, volumes, duration, configuration changes.
#[derive(Clone, Debug)]
#[cfg_attr(feature = "std", derive(serde::Serialize))]
pub struct Scenario {
    /// Name (`sim io <name>`).
    pub name: &'static str,
    /// What it shows.
    pub description: &'static str,
    /// Simulated device.
    pub device: DeviceModel,
    /// Capacity the partitioner is configured with (unit I/Os per second).
    pub capacity_iops: u64,
    /// Cost model.
    pub cost: CostModel,
    /// Volumes.
    pub volumes: Vec<VolumeSpec>,
    /// Simulated time.
    pub duration_ns: u64,
    /// Telemetry window.
    pub window_ns: u64,
    /// RNG seed.
    pub seed: u64,
    /// `(time, volume, new configuration)` changes.
    pub changes: Vec<(u64, usize, VolumeConfig)>,
}

/// One window of one volume.
#[derive(Clone, Copy, Debug, Default)]
#[cfg_attr(feature = "std", derive(serde::Serialize))]
pub struct WindowRow {
    /// Requests offered.
    pub offered: u64,
    /// Requests completed.
    pub completed: u64,
    /// Commitment in force (I/Os in the window).
    pub committed: u64,
    /// Demanded at least the commitment.
    pub demanding: bool,
    /// Demanded the commitment but was served less.
    pub short: bool,
    /// Time with requests waiting in the dispatcher (ns).
    #[cfg_attr(feature = "std", serde(skip))]
    pub waiting_ns: u64,
}

/// A return from idle and how fast the owner got its commitment back.
#[derive(Clone, Debug)]
#[cfg_attr(feature = "std", derive(serde::Serialize))]
pub struct Reclaim {
    /// Return time (ns).
    pub at_ns: u64,
    /// The first full window after the return met the commitment (or the offered rate if lower).
    pub first_window_met: bool,
    /// Worst end-to-end latency of requests arriving in the first second after the return (ns).
    pub max_latency_ns: u64,
    /// 99th percentile of the same (ns).
    pub p99_latency_ns: u64,
}

/// Results for one volume.
#[derive(Clone, Debug)]
#[cfg_attr(feature = "std", derive(serde::Serialize))]
pub struct VolumeResult {
    /// Name.
    pub name: String,
    /// Commitment at the start (unit I/Os per second).
    pub committed_iops: u64,
    /// Full windows simulated.
    pub windows: u64,
    /// Windows where demand >= commitment.
    pub demanding_windows: u64,
    /// Of those, windows served below the commitment.
    pub short_windows: u64,
    /// Mean completed IOPS (rounded down).
    pub served_iops: u64,
    /// Mean offered IOPS (rounded down).
    pub offered_iops: u64,
    /// Median end-to-end latency (ns).
    pub p50_ns: u64,
    /// 99th-percentile end-to-end latency (ns).
    pub p99_ns: u64,
    /// Dispatches per class (reservation, share, burst, borrow, boost); partitioner only.
    pub classes: [u64; 5],
    /// Returns from idle.
    pub reclaims: Vec<Reclaim>,
    /// Per-window rows.
    pub rows: Vec<WindowRow>,
}

/// Results of one run.
#[derive(Clone, Debug)]
#[cfg_attr(feature = "std", derive(serde::Serialize))]
pub struct RunResult {
    /// Dispatcher name.
    pub dispatcher: String,
    /// Busy slot time / (parallelism x time) over full windows, parts per million.
    pub utilisation_ppm: u64,
    /// Per-window utilisation, parts per million.
    pub window_utilisation_ppm: Vec<u64>,
    /// Total completed IOPS (rounded down).
    pub total_iops: u64,
    /// Per-volume results.
    pub volumes: Vec<VolumeResult>,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord)]
enum Ev {
    Change(usize),
    Completion {
        vol: usize,
        id: u64,
        service: u64,
        cost: u64,
        bytes: u32,
    },
    Arrival(usize),
    Timer,
}

struct VolState {
    k: u64,
    outstanding: u32,
    waiting: u32,
    latencies: Vec<(u64, u64)>, // (arrival, latency)
    rows: Vec<WindowRow>,
    classes: [u64; 5],
    committed: u64,
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

fn count<T>(it: impl Iterator<Item = T>) -> u64 {
    u64::try_from(it.count()).unwrap_or(u64::MAX)
}

fn percentile(sorted: &[u64], permille: usize) -> u64 {
    if sorted.is_empty() {
        return 0;
    }
    let rank = (sorted.len() * permille).div_ceil(1000).max(1);
    sorted[rank - 1]
}

/// Runs `sc` through `d`.
#[allow(clippy::too_many_lines)] // One event loop, easier to read in one piece.
pub fn run(sc: &Scenario, d: &mut dyn SimDispatcher) -> Result<RunResult, String> {
    let w = sc.window_ns;
    let windows = usize::try_from(sc.duration_ns / w).map_err(|_| "duration too long")?;
    let mut rng = Rng::new(sc.seed);
    let mut heap: BinaryHeap<Reverse<(u64, u64, Ev)>> = BinaryHeap::new();
    let mut seq = 0u64;
    let mut push = |heap: &mut BinaryHeap<Reverse<(u64, u64, Ev)>>, t: u64, e: Ev| {
        seq += 1;
        heap.push(Reverse((t, seq, e)));
    };
    let mut vols: Vec<VolState> = sc
        .volumes
        .iter()
        .map(|v| VolState {
            k: 0,
            outstanding: 0,
            waiting: 0,
            latencies: Vec::new(),
            rows: vec![
                WindowRow {
                    committed: v.config.committed_iops * w / 1_000_000_000,
                    ..WindowRow::default()
                };
                windows + 1
            ],
            classes: [0; 5],
            committed: v.config.committed_iops,
        })
        .collect();
    let mut next_id = 0u64;
    let mut id_arrival: BTreeMap<u64, u64> = BTreeMap::new();
    let issue = |vols: &mut [VolState],
                 d: &mut dyn SimDispatcher,
                 id_arrival: &mut BTreeMap<u64, u64>,
                 i: usize,
                 now: u64,
                 next_id: &mut u64|
     -> Result<(), String> {
        let spec = &sc.volumes[i];
        let id = *next_id;
        *next_id += 1;
        let req = Request {
            id,
            bytes: spec.bytes,
            op: IoOp::Read,
        };
        let cost = sc.cost.cost(req.op, req.bytes);
        id_arrival.insert(id, now);
        let v = &mut vols[i];
        v.outstanding += 1;
        v.waiting += 1;
        d.enqueue(i, req, cost, now)
    };
    for (i, spec) in sc.volumes.iter().enumerate() {
        if let Some(depth) = spec.workload.closed_depth() {
            for _ in 0..depth {
                vols[i].rows[0].offered += 1;
                issue(&mut vols, d, &mut id_arrival, i, 0, &mut next_id)?;
            }
        } else if let Some(t) = spec.workload.arrival(0) {
            push(&mut heap, t, Ev::Arrival(i));
        }
    }
    // Closed loops queue requests before any event: pump once at t = 0.
    push(&mut heap, 0, Ev::Timer);
    for (ci, &(t, _, _)) in sc.changes.iter().enumerate() {
        push(&mut heap, t, Ev::Change(ci));
    }
    let slots = sc.device.parallelism;
    let mut in_flight = 0usize;
    let mut busy = vec![0u64; windows + 1];
    let mut timer_at: Option<u64> = None;
    let mut now = 0u64;
    while let Some(Reverse((t, _, ev))) = heap.pop() {
        if t >= sc.duration_ns {
            break;
        }
        // Integrate waiting time per window.
        for v in &mut vols {
            if v.waiting > 0 {
                let mut a = now;
                while a < t {
                    let wi = usize::try_from(a / w).unwrap_or(windows).min(windows);
                    let end = ((a / w) + 1) * w;
                    let b = end.min(t);
                    v.rows[wi].waiting_ns += b - a;
                    a = b;
                }
            }
        }
        now = t;
        let wi = usize::try_from(now / w).unwrap_or(windows).min(windows);
        match ev {
            Ev::Arrival(i) => {
                let spec = &sc.volumes[i];
                vols[i].rows[wi].offered += 1;
                if vols[i].outstanding < spec.max_outstanding {
                    issue(&mut vols, d, &mut id_arrival, i, now, &mut next_id)?;
                }
                vols[i].k += 1;
                if let Some(next) = spec.workload.arrival(vols[i].k) {
                    push(&mut heap, next, Ev::Arrival(i));
                }
            }
            Ev::Completion {
                vol,
                id,
                service,
                cost: _,
                bytes,
            } => {
                in_flight -= 1;
                let req = Request {
                    id,
                    bytes,
                    op: IoOp::Read,
                };
                d.complete(vol, &req, service, now);
                let v = &mut vols[vol];
                v.outstanding -= 1;
                v.rows[wi].completed += 1;
                let arrival = id_arrival.remove(&id).unwrap_or(now);
                v.latencies.push((arrival, now - arrival));
                if let Some(_depth) = sc.volumes[vol].workload.closed_depth() {
                    v.rows[wi].offered += 1;
                    issue(&mut vols, d, &mut id_arrival, vol, now, &mut next_id)?;
                }
            }
            Ev::Timer => {
                if timer_at == Some(now) {
                    timer_at = None;
                }
            }
            Ev::Change(ci) => {
                let (_, vol, cfg) = sc.changes[ci];
                d.reconfigure(vol, cfg, now)?;
                vols[vol].committed = cfg.committed_iops;
                for row in vols[vol].rows.iter_mut().skip(wi) {
                    row.committed = cfg.committed_iops * w / 1_000_000_000;
                }
            }
        }
        // Only pump once all events of this instant are handled.
        if heap.peek().is_some_and(|Reverse((t2, _, _))| *t2 == now) {
            continue;
        }
        while in_flight < slots {
            let Some((vol, req, class)) = d.dispatch(now) else {
                break;
            };
            let cost = sc.cost.cost(req.op, req.bytes);
            let service = sc.device.service_ns(cost, &mut rng);
            in_flight += 1;
            vols[vol].waiting -= 1;
            if let Some(c) = class {
                vols[vol].classes[class_index(c)] += 1;
            }
            // Busy time per window.
            let mut a = now;
            let end = now + service;
            while a < end {
                let bi = usize::try_from(a / w).unwrap_or(windows).min(windows);
                let b = (((a / w) + 1) * w).min(end);
                busy[bi] += b - a;
                a = b;
            }
            push(
                &mut heap,
                end,
                Ev::Completion {
                    vol,
                    id: req.id,
                    service,
                    cost,
                    bytes: req.bytes,
                },
            );
        }
        if in_flight < slots {
            if let Some(te) = d.next_time(now) {
                let te = te.max(now + 1);
                if timer_at.is_none_or(|t0| te < t0 || t0 <= now) {
                    timer_at = Some(te);
                    push(&mut heap, te, Ev::Timer);
                }
            }
        }
    }
    // Metrics over full windows.
    let slot_ns = u128::try_from(slots).unwrap_or(0) * u128::from(w);
    let ppm = |busy: u64| {
        u64::try_from(u128::from(busy) * 1_000_000 / slot_ns.max(1)).unwrap_or(u64::MAX)
    };
    let window_utilisation_ppm: Vec<u64> = busy[..windows].iter().map(|&b| ppm(b)).collect();
    let utilisation_ppm =
        window_utilisation_ppm.iter().sum::<u64>() / u64::try_from(windows.max(1)).unwrap_or(1);
    let full_ns = u128::from(u64::try_from(windows).unwrap_or(0)) * u128::from(w);
    let per_s = |count: u64| {
        u64::try_from(u128::from(count) * 1_000_000_000 / full_ns.max(1)).unwrap_or(u64::MAX)
    };
    let mut total = 0u64;
    let mut results = Vec::new();
    for (i, v) in vols.iter_mut().enumerate() {
        let spec = &sc.volumes[i];
        let closed = spec.workload.closed_depth().is_some();
        let mut rows = v.rows[..windows].to_vec();
        for r in &mut rows {
            r.demanding = if closed {
                r.waiting_ns * 10 >= w * 9
            } else {
                r.offered >= r.committed
            };
            r.demanding &= r.committed > 0;
            r.short = r.demanding && r.completed < r.committed;
        }
        let mut lat: Vec<u64> = v.latencies.iter().map(|&(_, l)| l).collect();
        lat.sort_unstable();
        let reclaims = spec
            .workload
            .returns(sc.duration_ns.saturating_sub(w))
            .into_iter()
            .map(|at| {
                let mut l: Vec<u64> = v
                    .latencies
                    .iter()
                    .filter(|&&(a, _)| a >= at && a < at + w)
                    .map(|&(_, l)| l)
                    .collect();
                l.sort_unstable();
                let first = usize::try_from(at.div_ceil(w)).unwrap_or(windows);
                let first_window_met = rows
                    .get(first)
                    .is_none_or(|r| r.completed >= r.committed.min(r.offered));
                Reclaim {
                    at_ns: at,
                    first_window_met,
                    max_latency_ns: l.last().copied().unwrap_or(0),
                    p99_latency_ns: percentile(&l, 990),
                }
            })
            .collect();
        let completed: u64 = rows.iter().map(|r| r.completed).sum();
        let offered: u64 = rows.iter().map(|r| r.offered).sum();
        total += completed;
        results.push(VolumeResult {
            name: spec.name.clone(),
            committed_iops: spec.config.committed_iops,
            windows: u64::try_from(windows).unwrap_or(u64::MAX),
            demanding_windows: count(rows.iter().filter(|r| r.demanding)),
            short_windows: count(rows.iter().filter(|r| r.short)),
            served_iops: per_s(completed),
            offered_iops: per_s(offered),
            p50_ns: percentile(&lat, 500),
            p99_ns: percentile(&lat, 990),
            classes: v.classes,
            reclaims,
            rows,
        });
    }
    Ok(RunResult {
        dispatcher: d.name().to_string(),
        utilisation_ppm,
        window_utilisation_ppm,
        total_iops: per_s(total),
        volumes: results,
    })
}
