//! `selftest=nvme-iops`: the IOPS partitioner driving the real NVMe queue (issue 7, tests 1-3 without VMs).
//!
//! 1. Calibrate the device's capacity C with the driver alone (4 KiB random reads at QD32, best of three).
//! 2. Three volumes on the first namespace, committed at 40%, 20% and 10% of C (best effort above): volume A
//!    floods (always 64 requests queued), B and C arrive open-loop at 1.5x their commitments. After 2 s of warm-up,
//!    every volume must get >= 95% of its commitment in each 1 s window, and the total must reach >= 90% of C.
//! 3. At t = 4 s volume B's commitment rises to 25% of C (and its arrival rate with it); the window starting one
//!    window later must already honour the new commitment.
//!
//! Under QEMU TCG the emulated CPU makes the partitioned path CPU-bound (about 15 us of emulated CPU per request,
//! against a raw device that reaches 50k-180k IOPS), which no policy can fix; real hardware is device-bound. Run it
//! with the device throttled below the CPU bound:
//! `-drive file=disk.img,if=none,id=nv0,format=raw,throttling.iops-total=20000`.
//!
//! Read-only traffic (4 KiB reads into scratch pages). The detail reports the worst window ratio per volume in
//! per cent of its commitment, the total in per cent of C, and C itself.

// Details are fixed-size strings returned once per step, as in crate::selftest.
#![allow(clippy::result_large_err)]

use alloc::vec;
use alloc::vec::Vec;
use core::fmt::Write;

use drivers::nvme::{Dma, IoOp, PAGE_SIZE};
use sched::iops::{CostModel, DeviceConfig, IopsError, VolumeConfig, VolumeId};

use super::nvme::{controller, Probe};
use super::selftest::{own_queue, random_reads};
use super::volumes::{Done, Engine, EngineError, Extent};
use crate::arch::x86_64::tsc;

type Detail = heapless::String<160>;

macro_rules! detail {
    ($($arg:tt)*) => {{
        let mut d = Detail::new();
        // Overflow only truncates the explanation.
        let _ = write!(d, $($arg)*);
        d
    }};
}

const WINDOW_NS: u64 = 1_000_000_000;
const WARMUP_WINDOWS: usize = 2;
const WINDOWS: usize = 6;
/// Window at whose start B's commitment changes, and the first window that must honour it.
const CHANGE_AT: usize = 4;
const CHECK_CHANGED_FROM: usize = 5;
const SCRATCH_PAGES: usize = 64;
/// Reads per calibration round (QD32).
const CALIBRATION_IOS: u64 = 20_000;
/// Volume A keeps this many requests outstanding.
const FLOOD_DEPTH: usize = 64;

fn now_ns() -> u64 {
    let hz = u128::from(tsc::hz().max(1));
    u64::try_from(u128::from(tsc::rdtsc()) * 1_000_000_000 / hz).unwrap_or(u64::MAX)
}

/// Runs the test.
pub fn run() -> Result<Detail, Detail> {
    let dev = match controller() {
        Probe::Absent => return Ok(detail!("skipped: no nvme controller")),
        Probe::Failed(why) => return Err(detail!("bring-up: {why}")),
        Probe::Up(dev) => dev,
    };
    let mut dev = dev.lock();
    let ctrl = &mut dev.ctrl;
    let ns = *ctrl
        .namespaces()
        .first()
        .ok_or_else(|| detail!("no usable namespace"))?;
    let qid = own_queue(ctrl);
    let scratch = ctrl
        .hal_mut()
        .alloc_pages(SCRATCH_PAGES)
        .ok_or_else(|| detail!("no memory for scratch pages"))?;
    let per_io = u32::try_from((4096 / u64::from(ns.lba_size)).max(1)).unwrap_or(1);
    // Under emulation single runs vary by 2-4x; the best of three is the capacity the device can deliver.
    let mut cap = 0;
    for round in 0..3u64 {
        match random_reads(
            ctrl,
            qid,
            &ns,
            scratch,
            32,
            CALIBRATION_IOS,
            per_io,
            tsc::rdtsc() ^ round,
        ) {
            Ok((iops, _)) => cap = cap.max(iops),
            Err(e) => {
                ctrl.hal_mut().free_pages(scratch, SCRATCH_PAGES);
                return Err(e);
            }
        }
    }
    let result = partitioned(ctrl, qid, &ns, scratch, per_io, cap);
    ctrl.hal_mut().free_pages(scratch, SCRATCH_PAGES);
    result
}

struct Load {
    id: VolumeId,
    /// Committed IOPS per window index (changes at CHANGE_AT for B).
    committed: [u64; WINDOWS],
    /// Open-loop arrival rate per window (0 = flood).
    rate: [u64; WINDOWS],
    arrived: u64,
    outstanding: usize,
    done: [u64; WINDOWS],
}

fn partitioned(
    ctrl: &mut drivers::nvme::Controller<super::nvme::KernelHal>,
    qid: u16,
    ns: &drivers::nvme::Namespace,
    scratch: u64,
    per_io: u32,
    cap: u64,
) -> Result<Detail, Detail> {
    let device = DeviceConfig {
        capacity_iops: cap.max(1),
        cost: CostModel {
            unit_bytes: 4096,
            read_cost: 1024,
            write_cost: 1024,
        },
        refine_capacity: false,
        ..DeviceConfig::default()
    };
    let start = now_ns();
    let mut engine = Engine::new(device, core::slice::from_ref(ns), qid, 32, start)
        .map_err(|e| detail!("engine: {e:?}"))?;
    // Three disjoint extents of a third of the namespace each.
    let third = ns.blocks / 3;
    let mut loads: Vec<Load> = Vec::new();
    for (i, permille) in [400u64, 200, 100].into_iter().enumerate() {
        let committed = cap * permille / 1000;
        let extent = Extent {
            nsid: ns.nsid,
            first_lba: third * u64::try_from(i).unwrap_or(0),
            blocks: third,
        };
        let cfg = VolumeConfig {
            committed_iops: committed,
            ..VolumeConfig::default()
        };
        let id = engine
            .add_volume(extent, cfg, start)
            .map_err(|e| detail!("admission of {permille} per mille refused: {e:?}"))?;
        let mut c = [committed; WINDOWS];
        if i == 1 {
            c[CHANGE_AT..].fill(cap * 250 / 1000);
        }
        let rate = if i == 0 {
            [0; WINDOWS]
        } else {
            c.map(|x| x * 3 / 2)
        };
        loads.push(Load {
            id,
            committed: c,
            rate,
            arrived: 0,
            outstanding: 0,
            done: [0; WINDOWS],
        });
    }
    let slots = (third / u64::from(per_io)).max(1);
    let mut rng = start | 1;
    let mut errors = 0u64;
    let mut refused = 0u64;
    let mut overhead_ticks = 0u64;
    let mut completed = 0u64;
    let mut next_page = 0u64;
    let mut changed = false;
    // Arrivals of open-loop volumes are counted from the start of the current rate's window.
    let mut window_base = [0u64; 3];
    let end = start + WINDOW_NS * u64::try_from(WINDOWS).unwrap_or(0);
    loop {
        let now = now_ns();
        if now >= end {
            break;
        }
        let w = usize::try_from((now - start) / WINDOW_NS)
            .unwrap_or(WINDOWS - 1)
            .min(WINDOWS - 1);
        if w >= CHANGE_AT && !changed {
            let cfg = VolumeConfig {
                committed_iops: loads[1].committed[CHANGE_AT],
                ..VolumeConfig::default()
            };
            engine
                .reconfigure(loads[1].id, cfg, now)
                .map_err(|e| detail!("commitment change refused: {e:?}"))?;
            changed = true;
        }
        for (i, l) in loads.iter_mut().enumerate() {
            let want = if l.rate[w] == 0 {
                FLOOD_DEPTH.saturating_sub(l.outstanding)
            } else {
                let wstart = start + WINDOW_NS * u64::try_from(w).unwrap_or(0);
                if window_base[i] != wstart {
                    window_base[i] = wstart;
                    l.arrived = 0;
                }
                let due = l.rate[w] * (now - wstart) / WINDOW_NS;
                usize::try_from(due.saturating_sub(l.arrived)).unwrap_or(0)
            };
            for _ in 0..want.min(64) {
                rng ^= rng << 13;
                rng ^= rng >> 7;
                rng ^= rng << 17;
                let lba = (rng % slots) * u64::from(per_io);
                let page =
                    scratch + (next_page % u64::try_from(SCRATCH_PAGES).unwrap_or(1)) * PAGE_SIZE;
                next_page += 1;
                let token = u64::try_from(i).unwrap_or(0);
                let t0 = tsc::rdtsc();
                let r = engine.enqueue(l.id, IoOp::Read, lba, per_io, vec![page], token, now);
                overhead_ticks += tsc::rdtsc() - t0;
                match r {
                    Ok(()) => {}
                    // Demand above what the volume is served backs up to the partitioner's queue bound: the
                    // arrival is refused (a guest would see its queue full), which is the point of the test.
                    Err(EngineError::Iops(IopsError::QueueFull { .. })) => {
                        l.arrived += 1;
                        refused += 1;
                        break;
                    }
                    Err(e) => return Err(detail!("enqueue: {e:?}")),
                }
                l.arrived += 1;
                l.outstanding += 1;
            }
        }
        let mut finished: Vec<Done> = Vec::new();
        let t0 = tsc::rdtsc();
        engine.pump(ctrl, &mut now_ns, &mut |d| finished.push(d));
        if !finished.is_empty() {
            // Pumps that found nothing are polling, not per-request work.
            overhead_ticks += tsc::rdtsc() - t0;
            completed += u64::try_from(finished.len()).unwrap_or(0);
        }
        let t = now_ns();
        let cw = usize::try_from(t.saturating_sub(start) / WINDOW_NS).unwrap_or(WINDOWS);
        for d in finished {
            let i = usize::try_from(d.token).unwrap_or(0).min(2);
            loads[i].outstanding = loads[i].outstanding.saturating_sub(1);
            if !d.status.is_success() {
                errors += 1;
            } else if cw < WINDOWS {
                loads[i].done[cw] += 1;
            }
        }
    }
    // Drain what is still queued or on the device.
    let drain_until = now_ns() + 10 * WINDOW_NS;
    while engine.outstanding() > 0 && now_ns() < drain_until {
        engine.pump(ctrl, &mut now_ns, &mut |d| {
            if !d.status.is_success() {
                errors += 1;
            }
        });
    }
    if engine.outstanding() > 0 {
        return Err(detail!("{} requests never completed", engine.outstanding()));
    }
    if errors > 0 {
        return Err(detail!("{errors} requests failed"));
    }
    // Worst window per volume (per cent of its commitment), from warm-up on; B after the change from
    // CHECK_CHANGED_FROM (the window the change happened in is a transition).
    let mut worst = [u64::MAX; 3];
    let mut worst_total = u64::MAX;
    for w in WARMUP_WINDOWS..WINDOWS {
        let total: u64 = loads.iter().map(|l| l.done[w]).sum();
        worst_total = worst_total.min(total * 100 / cap.max(1));
        for (i, l) in loads.iter().enumerate() {
            if i == 1 && w == CHANGE_AT {
                continue;
            }
            worst[i] = worst[i].min(l.done[w] * 100 / l.committed[w].max(1));
        }
        log::info!(
            "nvme-iops: window {w}: A {} (commit {}), B {} (commit {}), C {} (commit {}), total {} of C {cap}; {refused} arrivals refused so far",
            loads[0].done[w],
            loads[0].committed[w],
            loads[1].done[w],
            loads[1].committed[w],
            loads[2].done[w],
            loads[2].committed[w],
            total
        );
    }
    // Per-request CPU cost of the partitioned path (enqueue, dispatch, submit, reap, charge back), driver
    // included, measured on this CPU.
    let ovh_ns = tsc::ticks_to_us(overhead_ticks.saturating_mul(1000)) / completed.max(1);
    log::info!("nvme-iops: {completed} requests, {ovh_ns} ns of CPU per request in engine + partitioner + driver");
    let d = detail!(
        "cap={cap} ovh_ns={ovh_ns} worst_pct_of_commit a={} b={} c={} b_new={} total_pct_of_cap={worst_total}",
        worst[0],
        loads[1].done[WARMUP_WINDOWS..CHANGE_AT].iter().map(|&x| x * 100 / loads[1].committed[2].max(1)).min().unwrap_or(0),
        worst[2],
        loads[1].done[CHECK_CHANGED_FROM..].iter().map(|&x| x * 100 / loads[1].committed[CHECK_CHANGED_FROM].max(1)).min().unwrap_or(0)
    );
    let ok = worst.iter().all(|&p| p >= 95) && worst_total >= 90;
    if ok {
        Ok(d)
    } else {
        Err(d)
    }
}
