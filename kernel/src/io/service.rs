//! The I/O service of the VM runtime: one partitioned NVMe engine shared by every VM's virtio-blk volumes, and the
//! small kernel API the management channel calls ([`set_commitment`], [`volume_stats`]).
//!
//! Life cycle: at boot, when a VM configuration has volumes, [`init`] brings the NVMe controller up, calibrates its
//! capacity C with the driver alone (4 KiB random reads at QD32, best of three, `CV:IOCAL`) and builds one
//! [`Engine`] on I/O queue 1 with C as the partitioner's capacity. [`add_volume`] then resolves each configured
//! volume's rates against C, checks its extent against the namespace and puts it through admission control (the
//! refusal names the partitioner's numbers); each volume becomes one `VirtioBlk` device. [`attach`] gives a VM's
//! devices its guest memory once the RAM exists; [`remove_vm`] undoes a VM whose build failed later.
//!
//! At run time guest accesses to a device window arrive through [`mmio`]. A queue notification (the hot access)
//! only marks the queue pending: no I/O work is ever done inside a vCPU's exit, so an exit's handling stays within
//! the scheduler's overrun bound and the I/O work is not charged to whichever vCPU happened to notify. The work
//! is done by [`serve`], called by the run loops only in the slices of the I/O server (a real-time server of
//! its own, admitted with the VMs: `io::server`) and in idle time, each call bounded by the end of that slice or
//! idle time (`Budget`): one pump after another, each processing pending queues a batch at a time (parse the
//! virtqueue, copy write data, enqueue with the partitioner), then the engine (reap NVMe completions into a
//! backlog, feed the device in the partitioner's order), then finishing completions from the backlog (scatter
//! read data into the guest, write the status, push the used ring). While a device has requests in flight it asks
//! its driver not to notify (VIRTQ_USED_F_NO_NOTIFY) and every pump looks at its queue instead (`poll_queues`);
//! the request is withdrawn when its last request completes, with one more look. Work left over (a pending queue,
//! requests on the engine, the backlog, a ring with more requests) keeps [`outstanding`] above 0, which keeps the
//! I/O server awake (polling every [`POLL_INTERVAL_NS`] while only the device has work) and an idle CPU polling
//! every [`IDLE_POLL_NS`]. Each pump's time is attributed to the volumes it served by their item counts
//! (`CV:IOVOL io_cpu_us=`). Closed telemetry windows are printed as `CV:IOWIN` lines and kept for
//! [`volume_stats`]. `CV:IOSUM` carries the longest pump and the longest MMIO exit (`max_pump_us`,
//! `max_mmio_us`).
//!
//! I/O credits (issue 8): an I/O credit is one unit I/O above a volume's commitment. [`grant_io`] applies a pool
//! grant to the volume's burst bucket through the partitioner (`Partitioner::top_up`: exactly once per grant id,
//! uncapped, never expiring, spent after the earned tokens), printing `CV:IOGRANT` with the volume's and the
//! service's applied totals; `CV:IOVOL` at the end carries each volume's granted and grant-spent I/Os. The request
//! side, [`credit_needs`]: a volume whose bucket holds less than one I/O while its last closed window's arrivals
//! exceeded its commitment asks for one window of its commitment or that window's excess demand if larger (at least 1,
//! at most the capacity C: a closed-loop guest's arrivals only show what it was served, so the commitment sets the
//! scale of a top-up), at most once per window; the management endpoint sends it as a `Resource::Io` credit request with an id from
//! [`IO_REQUEST_ID_BASE`] up (apart from the scheduler's CPU request ids).
//!
//! Stopping: [`detach_vm`] (called by `vm::runloop::stop_vm`, before any reclaim of the VM's memory) drops the
//! VM's guest-memory views and removes its volumes from the partitioner, releasing their commitments. Requests of
//! that VM still queued or on the device complete later into nothing: their bounce buffers are freed
//! ([`Router::discard`]) and no guest memory is touched. Because every access to guest memory from here happens
//! under the service lock, once `detach_vm` returns no CPU can touch that VM's RAM through this module.
//!
//! Locking: one spin lock for the whole service (engine, router, devices, memory views), then the controller's
//! lock inside it: order *service -> controller*; the window table (`WINDOWS`, a reader-writer lock written only
//! while VMs are built) is read by notifications without the service lock and by pumps under it: *service ->
//! windows*. A notification never waits for the service lock (see [`mmio`]). Neither is held while a guest runs; the run loop takes the
//! service lock after releasing its VM context lock, and [`serve`] only try-locks (a CPU that finds another serving
//! goes on with its own work instead of spinning). [`OUTSTANDING`] mirrors the work left (engine requests,
//! the completion backlog, a ring known to hold more) for lock-free checks.

use alloc::boxed::Box;
use alloc::collections::VecDeque;
use alloc::format;
use alloc::string::{String, ToString};
use alloc::vec::Vec;
use core::sync::atomic::{AtomicBool, AtomicU32, AtomicU64, AtomicUsize, Ordering};

use drivers::nvme::{Dma, Namespace};
use sched::iops::{
    BurstConfig, CostModel, DeviceConfig, OveragePolicy, TopUp, VolumeConfig, VolumeId,
    WindowReport,
};
use spin::{Mutex, Once, RwLock};
use virt::config::{Overage, Rate, VolumeSpec, WINDOW_BYTES};
use virt::virtio::blk::{BlkConfig, VirtioBlk, SECTOR};
use virt::GuestMemory;

use super::nvme::{controller, Device, Probe};
use super::virtio_blk::{Router, VolumeBackend};
use super::volumes::{Done, Engine, EngineError, Extent};
use crate::arch::x86_64::tsc;
use crate::console::Quoted;
use crate::marker;

/// How often an idle CPU with I/O outstanding wakes to serve it (reap completions).
pub const IDLE_POLL_NS: u64 = 50_000;
/// Commands the engine keeps on the device at once.
const MAX_INFLIGHT: usize = 32;
/// Calibration: reads per round (QD32), and rounds (best of).
const CALIBRATION_IOS: u64 = 10_000;
const CALIBRATION_ROUNDS: usize = 3;
/// Scratch pages for the calibration reads (random_reads uses 32).
const SCRATCH_PAGES: usize = 32;
/// The I/O queue the engine uses (queue n + 1 belongs to CPU n for the self-tests; the service runs after them).
const QID: u16 = 1;
/// Partitioner window (telemetry, capacity accounting, commitments averaged over it).
pub const WINDOW_NS: u64 = 1_000_000_000;
/// I/O credit request ids start here (the CPU scheduler's request ids count from 1 and stay far below).
pub const IO_REQUEST_ID_BASE: u64 = 1 << 62;

/// Why an I/O API call was refused.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum IoError {
    /// No VM has volumes, or the NVMe controller is not up.
    NoService,
    /// No volume `index` in VM `vm`.
    UnknownVolume { vm: String, index: usize },
    /// The volume's VM stopped.
    Detached,
    /// The partitioner refused (admission numbers inside).
    Refused(EngineError),
}

impl core::fmt::Display for IoError {
    fn fmt(&self, f: &mut core::fmt::Formatter<'_>) -> core::fmt::Result {
        match self {
            Self::NoService => {
                f.write_str("no I/O service (no volumes configured or no NVMe controller)")
            }
            Self::UnknownVolume { vm, index } => write!(f, "VM {vm} has no volume {index}"),
            Self::Detached => f.write_str("the volume's VM has stopped"),
            Self::Refused(EngineError::Iops(e)) => write!(f, "{e}"),
            Self::Refused(e) => write!(f, "{e:?}"),
        }
    }
}

/// A volume's figures for telemetry ([`volume_stats`]).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct VolumeStats {
    pub vm: String,
    /// Index of the volume in its VM (= device table index).
    pub index: usize,
    /// Commitment and limit in force, IOPS.
    pub committed_iops: u64,
    pub limit_iops: Option<u64>,
    /// The last closed window: its index, completed IOPS, and queue-wait / device-service latency quantile
    /// bounds in ns (p50, p99; `u64::MAX` = above the largest bucket; 0 = no sample).
    pub window: Option<u64>,
    pub completed_iops: u64,
    pub wait_p50_ns: u64,
    pub wait_p99_ns: u64,
    pub service_p50_ns: u64,
    pub service_p99_ns: u64,
    /// Requests completed to the guest (any status) and those failed, since boot.
    pub completed: u64,
    pub failed: u64,
    /// False once the VM stopped.
    pub attached: bool,
}

/// A scripted commitment change (the `iops_change=` test hook of docs/vm-config.md).
#[derive(Clone, Copy, Debug)]
struct Change {
    at_ns: u64,
    rate: Rate,
    done: bool,
}

struct Volume {
    vm: usize,
    vm_name: String,
    index: usize,
    base: u64,
    id: VolumeId,
    lba_size: u64,
    spec: VolumeSpec,
    dev: VirtioBlk,
    /// The VM's RAM; `None` before [`attach`] and after [`detach_vm`].
    mem: Option<Box<dyn GuestMemory + Send>>,
    detached: bool,
    last: Option<WindowReport>,
    change: Option<Change>,
    /// Requests the device failed (media or controller errors).
    failures: u64,
    /// The device's break (DEVICE_NEEDS_RESET) has been logged.
    broken_logged: bool,
    /// I/O credits applied from grants since boot.
    granted_ios: u64,
    /// The window the volume last asked for I/O credits after.
    asked_window: Option<u64>,
    /// Items (requests taken from its queue, completions finished into its guest) of the pump in progress: the
    /// key by which the pump's time is attributed ([`attribute`]).
    pump_items: u64,
    /// Hypervisor CPU time of pumps attributed to this volume (TSC ticks), for `CV:IOVOL io_cpu_us=`.
    io_ticks: u64,
}

/// Per-request overhead figures of the run (for `CV:IOSUM`).
#[derive(Default)]
struct Overhead {
    /// Queue notifications processed.
    notifies: u64,
    /// TSC ticks spent in register accesses and in pumps that did work (lock waits excluded).
    ticks: u64,
    /// Of which: register accesses served under the lock (driver initialisation, notifications that took the
    /// slow path) ...
    device_ticks: u64,
    /// ... and pumps: queue processing of notifications (virtqueue parsing, bounce copies of writes, enqueue),
    /// reaping, completion into the guest, submission.
    pump_ticks: u64,
    /// Of the pumps: engine (driver poll/submit/doorbells and partitioner), completions with data counted apart.
    engine_ticks: u64,
    /// Of the pumps: processing notified queues (virtqueue parsing, write copies, enqueue) and finishing
    /// completions (read copies, status, used ring), for `CV:IOPROF`.
    notify_ticks: u64,
    finish_ticks: u64,
    /// Run-loop pumps, and their ticks whether they found work or not; those that found nothing.
    pumps: u64,
    empty_pumps: u64,
    all_pump_ticks: u64,
    /// TSC ticks an MMIO exit on the slow path waited for the service lock.
    lock_wait_ticks: u64,
    completed: u64,
    discarded: u64,
    /// The longest pump (TSC ticks), any caller.
    max_pump_ticks: u64,
    /// Pump time that served no volume (pumps that found nothing: polling an idle device), TSC ticks.
    unattributed_ticks: u64,
}

struct Service {
    engine: Engine,
    router: Router,
    /// Engine results not yet finished into their guests (a pump finishes a budget's worth).
    backlog: VecDeque<Done>,
    volumes: Vec<Volume>,
    capacity: u64,
    namespaces: Vec<Namespace>,
    ctrl: &'static Mutex<Device>,
    ovh: Overhead,
    /// When the first request arrived (scripted changes count from here).
    started_ns: Option<u64>,
    /// The controller's register accesses when the service started (calibration and self-tests are not the
    /// guests' cost): see [`super::nvme::register_accesses`].
    regs_at_start: (u64, u64, u64),
    /// I/O credits applied from grants to any volume since boot, and credit requests made.
    granted_ios: u64,
    credit_requests: u64,
    /// Moving average (weight 1/8) of one item's cost, TSC ticks: a pump's time over its items. [`serve`] starts
    /// no item later than this before its deadline, so a slice ends near it (the overrun bound).
    item_ticks: u64,
}

static SERVICE: Once<Option<Mutex<Service>>> = Once::new();
/// Requests accepted by the engine and not yet completed (mirrors `Engine::outstanding`).
static OUTSTANDING: AtomicUsize = AtomicUsize::new(0);
/// One device window as the lock-free notify path sees it; index = the volume's index in `Service::volumes`.
struct WindowEntry {
    vm: usize,
    base: u64,
    /// The guest wrote QUEUE_NOTIFY and the queue has not been processed since.
    pending: AtomicBool,
    /// The device's `Status` register as of the end of the last locked operation on the service (see
    /// `mirror_status`): the `io` guest reads it every 100 ms while requests are in flight, and answering from here
    /// keeps that exit from waiting behind a pump for the service lock.
    status: AtomicU32,
}

/// The windows (written only while VMs are built, under the service lock: order service -> windows).
static WINDOWS: RwLock<Vec<WindowEntry>> = RwLock::new(Vec::new());
/// Some window has a pending notify.
static NOTIFY_PENDING: AtomicBool = AtomicBool::new(false);
/// MMIO exits served (both paths).
static MMIO_EXITS: AtomicU64 = AtomicU64::new(0);
/// Notifies left to the next run-loop pump (all of them: an exit never processes a queue).
static NOTIFIES_DEFERRED: AtomicU64 = AtomicU64::new(0);
/// The longest time (TSC ticks) one MMIO exit spent in this service: the I/O work a vCPU's slice pays for.
static MAX_MMIO_TICKS: AtomicU64 = AtomicU64::new(0);
/// Time (ns) of the last run-loop iteration ([`note_loop`]), any CPU, and the largest gap per window (ring of 64
/// windows, each slot tagged with its window); see `note_gap`.
static LAST_CALL_NS: AtomicU64 = AtomicU64::new(0);
static LAST_CALL_BUSY: AtomicBool = AtomicBool::new(false);
static STALL_NS: [AtomicU64; 64] = [const { AtomicU64::new(0) }; 64];
static STALL_WINDOW: [AtomicU64; 64] = [const { AtomicU64::new(u64::MAX) }; 64];
/// How long the I/O server sleeps after a [`serve`] that found nothing to do while requests are in flight on the
/// device (the device raises no interrupt: completions are polled), or that found another CPU serving.
pub const POLL_INTERVAL_NS: u64 = 100_000;
/// The largest sample of one item's cost that `Service::item_ticks` takes (ns): above the worst measured under
/// QEMU TCG (~200 us), far above hardware (~2 us).
const MAX_ITEM_NS: u64 = 250_000;
/// Serve calls that found another CPU serving (contention figure).
static CONTENDED: AtomicU64 = AtomicU64::new(0);
/// Volume windows closed so far, and the count [`credit_needs`] last looked at (it takes the service lock only after
/// a window closed).
static WINDOWS_CLOSED: AtomicU64 = AtomicU64::new(0);
static NEEDS_CHECKED: AtomicU64 = AtomicU64::new(0);

fn now_ns() -> u64 {
    let hz = u128::from(tsc::hz().max(1));
    u64::try_from(u128::from(tsc::rdtsc()) * 1_000_000_000 / hz).unwrap_or(u64::MAX)
}

fn service() -> Option<&'static Mutex<Service>> {
    SERVICE.get().and_then(Option::as_ref)
}

/// Brings the controller up and calibrates it (once). Returns the capacity C in 4 KiB IOPS.
///
/// # Errors
/// Why there is no I/O service: no controller, bring-up failure, no namespace, calibration failure.
pub fn init() -> Result<u64, String> {
    let s = SERVICE.call_once(|| match build() {
        Ok(s) => Some(Mutex::new(s)),
        Err(why) => {
            log::error!("io: no I/O service: {why}");
            marker!("IOCAL capacity=0 reason={}", Quoted(&why));
            None
        }
    });
    match s {
        Some(s) => Ok(s.lock().capacity),
        None => Err("no I/O service (NVMe controller missing or failed; see CV:IOCAL)".to_string()),
    }
}

fn build() -> Result<Service, String> {
    let dev = match controller() {
        Probe::Absent => return Err("no NVMe controller".to_string()),
        Probe::Failed(why) => return Err(format!("NVMe bring-up: {why}")),
        Probe::Up(dev) => &**dev,
    };
    let mut guard = dev.lock();
    let ctrl = &mut guard.ctrl;
    let namespaces = ctrl.namespaces().to_vec();
    let ns = *namespaces
        .first()
        .ok_or("the controller has no usable namespace")?;
    let scratch = ctrl
        .hal_mut()
        .alloc_pages(SCRATCH_PAGES)
        .ok_or("no memory for calibration buffers")?;
    let per_io = u32::try_from((4096 / u64::from(ns.lba_size)).max(1)).unwrap_or(1);
    let mut rounds = [0u64; CALIBRATION_ROUNDS];
    let mut result = Ok(());
    for (i, r) in (0u64..).zip(rounds.iter_mut()) {
        match super::selftest::random_reads_counting(
            ctrl,
            QID,
            &ns,
            scratch,
            32,
            CALIBRATION_IOS,
            per_io,
            tsc::rdtsc() ^ i,
        ) {
            Ok((iops, _, failed)) => {
                *r = iops;
                if failed > 0 {
                    log::warn!("io: calibration round {i}: {failed} reads failed (media errors); the device stays in use");
                }
            }
            Err(e) => {
                result = Err(format!("calibration: {e}"));
                break;
            }
        }
    }
    ctrl.hal_mut().free_pages(scratch, SCRATCH_PAGES);
    result?;
    // Under emulation single runs vary by 2-4x; the best round is what the device can deliver.
    let capacity = rounds.iter().copied().max().unwrap_or(0).max(1);
    marker!(
        "IOCAL capacity={capacity} rounds={},{},{} qd=32 size=4096 ns={} blocks={} lba_size={}",
        rounds[0],
        rounds[1],
        rounds[2],
        ns.nsid,
        ns.blocks,
        ns.lba_size
    );
    let device = DeviceConfig {
        capacity_iops: capacity,
        cost: CostModel {
            unit_bytes: 4096,
            read_cost: 1024,
            write_cost: 1024,
        },
        window_ns: WINDOW_NS,
        // C is measured once, with the driver alone; a refined estimate would drift with the guests' load.
        refine_capacity: false,
        ..DeviceConfig::default()
    };
    let engine = Engine::new(device, &namespaces, QID, MAX_INFLIGHT, now_ns())
        .map_err(|e| format!("engine: {e:?}"))?;
    drop(guard);
    Ok(Service {
        engine,
        router: Router::default(),
        backlog: VecDeque::new(),
        volumes: Vec::new(),
        capacity,
        namespaces,
        ctrl: dev,
        ovh: Overhead::default(),
        started_ns: None,
        regs_at_start: super::nvme::register_accesses(),
        granted_ios: 0,
        credit_requests: 0,
        item_ticks: 0,
    })
}

fn policy(o: Overage) -> OveragePolicy {
    match o {
        Overage::BestEffort => OveragePolicy::BestEffort,
        Overage::Borrow => OveragePolicy::Borrow,
        Overage::Boosted {
            boost_permille,
            horizon_ns,
        } => OveragePolicy::Boosted {
            boost_permille,
            horizon_ns,
        },
    }
}

/// The partitioner's configuration for `spec` on a device of `capacity` IOPS, with the commitment `committed`.
fn volume_config(spec: &VolumeSpec, committed: Rate, capacity: u64) -> VolumeConfig {
    VolumeConfig {
        committed_iops: committed.resolve(capacity),
        limit_iops: spec.limit.map(|l| l.resolve(capacity).max(1)),
        weight: spec.weight,
        burst: spec.burst.map(|b| BurstConfig {
            fill_iops: b.fill.resolve(capacity).max(1),
            size_ios: b.size_ios,
        }),
        policy: policy(spec.overage),
    }
}

/// A device's window for the guest's device table: (base, bytes, virtio device id).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Window {
    pub base: u64,
    pub size: u64,
    pub device_id: u32,
}

/// Adds volume `index` of VM `vm` (index into the runtime's VMs) named `vm_name`: extent and admission checked.
///
/// # Errors
/// A sentence for `CV:VMREFUSED` naming the volume's line and, for an admission refusal, the partitioner's
/// numbers.
pub fn add_volume(
    vm: usize,
    vm_name: &str,
    index: usize,
    spec: &VolumeSpec,
) -> Result<Window, String> {
    let Some(s) = service() else {
        return Err(format!(
            "volume on line {}: no I/O service (NVMe controller missing or failed; see CV:IOCAL)",
            spec.line
        ));
    };
    let mut s = s.lock();
    let s = &mut *s;
    let ns = s
        .namespaces
        .iter()
        .find(|n| n.nsid == spec.nsid)
        .copied()
        .ok_or_else(|| {
            format!(
                "volume on line {}: namespace {} does not exist",
                spec.line, spec.nsid
            )
        })?;
    let lba = u64::from(ns.lba_size).max(1);
    if !spec.offset_bytes.is_multiple_of(lba) || !spec.size_bytes.is_multiple_of(lba) {
        return Err(format!(
            "volume on line {}: offset and size must be multiples of namespace {}'s {lba}-byte blocks",
            spec.line, spec.nsid
        ));
    }
    let extent = Extent {
        nsid: spec.nsid,
        first_lba: spec.offset_bytes / lba,
        blocks: spec.size_bytes / lba,
    };
    let cfg = volume_config(spec, spec.committed, s.capacity);
    let now = now_ns();
    let id = match s.engine.add_volume(extent, cfg, now) {
        Ok(id) => id,
        Err(EngineError::BadExtent(_)) => {
            return Err(format!(
            "volume on line {}: bytes {:#x}..{:#x} do not fit namespace {} ({} blocks of {lba} B)",
            spec.line,
            spec.offset_bytes,
            spec.offset_bytes.saturating_add(spec.size_bytes),
            spec.nsid,
            ns.blocks
        ))
        }
        Err(EngineError::Iops(e)) => {
            return Err(format!("volume on line {}: {e}", spec.line));
        }
        Err(e) => return Err(format!("volume on line {}: {e:?}", spec.line)),
    };
    let limits = s.engine.admission_limits(0);
    log::info!(
        "io: vm {vm_name} volume {index} (line {}): ns {} blocks {}..{}, committed {} IOPS, limit {:?}, weight {}; device: capacity {} committable {} committed now {}",
        spec.line,
        spec.nsid,
        extent.first_lba,
        extent.first_lba + extent.blocks,
        cfg.committed_iops,
        cfg.limit_iops,
        cfg.weight,
        limits.capacity_iops,
        limits.committable_iops(),
        limits.committed_sum
    );
    let mut serial = [0u8; 20];
    let label = format!("cv-{vm_name}-{index}");
    let n = label.len().min(serial.len());
    serial[..n].copy_from_slice(&label.as_bytes()[..n]);
    let base = spec.window_base(index);
    WINDOWS.write().push(WindowEntry {
        vm,
        base,
        pending: AtomicBool::new(false),
        status: AtomicU32::new(0),
    });
    s.volumes.push(Volume {
        vm,
        vm_name: vm_name.to_string(),
        index,
        base,
        id,
        lba_size: lba,
        spec: *spec,
        dev: VirtioBlk::new(BlkConfig {
            sectors: spec.size_bytes / SECTOR,
            read_only: spec.read_only,
            block_size: ns.lba_size,
            serial,
        }),
        mem: None,
        detached: false,
        last: None,
        failures: 0,
        broken_logged: false,
        granted_ios: 0,
        asked_window: None,
        pump_items: 0,
        io_ticks: 0,
        change: spec.change.map(|(at_ns, rate)| Change {
            at_ns,
            rate,
            done: false,
        }),
    });
    Ok(Window {
        base,
        size: WINDOW_BYTES,
        device_id: virt::virtio::blk::DEVICE_ID,
    })
}

/// Gives VM `vm`'s devices its guest memory (one view per device).
pub fn attach(vm: usize, mut view: impl FnMut() -> Box<dyn GuestMemory + Send>) {
    let Some(s) = service() else { return };
    for v in s
        .lock()
        .volumes
        .iter_mut()
        .filter(|v| v.vm == vm && !v.detached)
    {
        v.mem = Some(view());
    }
}

/// Undoes [`add_volume`] for a VM whose build failed before it ran (no request can exist yet).
pub fn remove_vm(vm: usize) {
    let Some(s) = service() else { return };
    let mut s = s.lock();
    let now = now_ns();
    let ids: Vec<VolumeId> = s
        .volumes
        .iter()
        .filter(|v| v.vm == vm)
        .map(|v| v.id)
        .collect();
    for id in ids {
        // The id came from add_volume; a refusal here only means it is gone already.
        let _ = s.engine.remove_volume(id, now);
    }
    s.volumes.retain(|v| v.vm != vm);
    WINDOWS.write().retain(|w| w.vm != vm);
}

/// VM `vm` stopped: drop its memory views and its volumes' commitments. After this returns, this module never
/// touches the VM's memory again; its requests in flight complete into nothing.
pub fn detach_vm(vm: usize) {
    let Some(s) = service() else { return };
    let mut s = s.lock();
    let s = &mut *s;
    let now = now_ns();
    for v in s.volumes.iter_mut().filter(|v| v.vm == vm && !v.detached) {
        v.mem = None;
        v.detached = true;
        if let Err(e) = s.engine.remove_volume(v.id, now) {
            log::warn!(
                "io: vm {} volume {}: removal refused: {e:?}",
                v.vm_name,
                v.index
            );
        }
        log::info!(
            "io: vm {} volume {} detached ({} requests of all VMs in flight)",
            v.vm_name,
            v.index,
            s.router.in_flight()
        );
    }
    publish_outstanding(s, false);
}

/// A guest notified a queue that no pump has processed yet (lock-free hint for the run loops).
pub fn notify_pending() -> bool {
    NOTIFY_PENDING.load(Ordering::Acquire)
}

/// Requests accepted and not yet completed, plus one while a queue notification waits to be processed (a hint
/// for the run loops: serve while this is above 0; exact under the lock).
pub fn outstanding() -> usize {
    OUTSTANDING.load(Ordering::Acquire) + usize::from(NOTIFY_PENDING.load(Ordering::Acquire))
}

/// A guest access to VM `vm`'s device windows: `write` is `Some(value)` for a store. Returns the value read
/// (0 for a store), or `None` when no device of this VM covers `gpa`.
///
/// The hot access, a queue notification, never takes the service lock: it marks the queue pending and returns;
/// the I/O server (woken by the run loop at its next iteration) or idle time processes it. virtio
/// lets a device process its queue after the notification's write completes, so the guest sees no difference
/// but an exit that costs the same whatever the I/O load. A read of the `Status` register (the `io` guest's
/// periodic health check) is answered from a mirror without the lock too. Other registers (features, queue set-up:
/// driver initialisation) are served under the lock; they do no queue work.
pub fn mmio(vm: usize, gpa: u64, size: u8, write: Option<u64>) -> Option<u64> {
    let s = service()?;
    let entered = tsc::rdtsc();
    let r = serve_mmio(s, vm, gpa, size, write);
    MAX_MMIO_TICKS.fetch_max(tsc::rdtsc().saturating_sub(entered), Ordering::Relaxed);
    r
}

/// [`mmio`] itself.
fn serve_mmio(
    s: &'static Mutex<Service>,
    vm: usize,
    gpa: u64,
    size: u8,
    write: Option<u64>,
) -> Option<u64> {
    MMIO_EXITS.fetch_add(1, Ordering::Relaxed);
    if write.is_none() && size == 4 {
        let table = WINDOWS.read();
        let status = table
            .iter()
            .find(|e| e.vm == vm && gpa == e.base + virt::virtio::mmio::reg::STATUS);
        if let Some(e) = status {
            return Some(u64::from(e.status.load(Ordering::Acquire)));
        }
    }
    if write == Some(0) && size == 4 {
        let table = WINDOWS.read();
        let notify = table
            .iter()
            .find(|e| e.vm == vm && gpa == e.base + virt::virtio::mmio::reg::QUEUE_NOTIFY);
        if let Some(e) = notify {
            // Enqueue only: the queue is processed by the I/O server or in idle time (`serve`), never inside this
            // vCPU's exit.
            e.pending.store(true, Ordering::Release);
            NOTIFY_PENDING.store(true, Ordering::Release);
            NOTIFIES_DEFERRED.fetch_add(1, Ordering::Relaxed);
            return Some(0);
        }
    }
    let w0 = tsc::rdtsc();
    let mut guard = s.lock();
    let t0 = tsc::rdtsc();
    let s = &mut *guard;
    s.ovh.lock_wait_ticks += t0.saturating_sub(w0);
    let i = s.volumes.iter().position(|v| {
        v.vm == vm && !v.detached && (v.base..v.base + WINDOW_BYTES).contains(&gpa)
    })?;
    let offset = gpa - s.volumes[i].base;
    let r = match write {
        None => u64::from(s.volumes[i].dev.mmio_read(offset, size)),
        Some(value) => {
            // Registers are 32 bits wide (virtio 1.2 section 4.2.2); the device ignores other sizes.
            let value = u32::try_from(value & 0xFFFF_FFFF).unwrap_or(0);
            device_write(s, i, offset, size, value);
            0
        }
    };
    mirror_status(s);
    let t = tsc::rdtsc().saturating_sub(t0);
    s.ovh.ticks += t;
    s.ovh.device_ticks += t;
    Some(r)
}

/// A register write on volume `i`'s device (a notification parses its queue and enqueues the requests).
fn device_write(s: &mut Service, i: usize, offset: u64, size: u8, value: u32) {
    // Not attached (yet, or any more): the device must not touch memory; the write is dropped.
    with_device(s, i, |dev, mem, backend| {
        dev.mmio_write(mem, backend, offset, size, value);
    });
}

/// Runs `f` on volume `i`'s device with its guest memory and a backend onto the engine and the controller
/// (service -> controller lock order). Does nothing while the device is not attached to its VM's memory.
fn with_device(
    s: &mut Service,
    i: usize,
    f: impl FnOnce(&mut VirtioBlk, &mut dyn GuestMemory, &mut VolumeBackend<'_>),
) {
    let Service {
        volumes,
        engine,
        router,
        ctrl,
        ..
    } = s;
    let v = &mut volumes[i];
    let Some(mem) = v.mem.as_mut() else {
        return;
    };
    let mut ctrl = ctrl.lock();
    let mut backend = VolumeBackend {
        engine,
        ctrl: &mut ctrl.ctrl,
        router,
        device: i,
        volume: v.id,
        lba_size: v.lba_size,
        now: now_ns(),
    };
    f(&mut v.dev, &mut **mem, &mut backend);
}

/// The work one pump may do ([`pump_locked`]): a time budget (the end of the caller's slice or idle time),
/// checked between items. The first pump of a [`serve`] call has a floor of one item (a request taken from a
/// queue, or a completion finished into a guest; a batch counts as one) so a call makes progress when one item
/// alone costs more than what is left (under emulation one item costs ~20-200 us); otherwise items are taken
/// only while time is left. One item, not one of each kind: that bounds how far a slice overruns (measured with
/// one of each kind: up to 3 items, 9-20 % of the I/O server's slices past the overrun bound under QEMU). Work left over stays queued (notification pending, completion backlog, the available ring) and
/// [`outstanding`] stays above 0, so the I/O server stays runnable (or idle time pumps again).
struct Budget {
    until: u64,
    /// One item may still be taken however late it is (the first pump of a [`serve`] call: so every call makes
    /// progress); cleared by the first item taken.
    floor: core::cell::Cell<bool>,
    /// The average cost of one item (`Service::item_ticks`).
    item_ticks: u64,
}

impl Budget {
    fn spent(&self) -> bool {
        tsc::rdtsc() >= self.until
    }

    /// Whether one more item may be taken: while time is left, or once on the floor (any item taken uses the
    /// floor up).
    fn may_take(&self) -> bool {
        let floor = self.floor.replace(false);
        !self.spent() || floor
    }

    /// Requests to take from a queue in one look: a batch while the time left holds that many average items, one
    /// otherwise (so the look ends near the budget's end).
    fn batch(&self) -> usize {
        let left = self.until.saturating_sub(tsc::rdtsc());
        let batch = u64::try_from(INTAKE_BATCH).unwrap_or(1);
        if left >= self.item_ticks.saturating_mul(batch) {
            INTAKE_BATCH
        } else {
            1
        }
    }
}

/// Requests taken from one queue per look (between budget checks).
const INTAKE_BATCH: usize = 4;

/// Looks at the queue of every attached device that has requests in flight, or still asks its driver not to
/// notify (`VirtioBlk::poll_queue`: notification suppression). While a device has requests in flight the run
/// loops pump anyway (they are outstanding), so its driver need not notify: each notification is a trapped MMIO
/// store, an exit, and a pass through this service. Called at the end of every pump, after completions, so a
/// device whose last request just finished clears its no-notify request before the loops stop pumping. Every
/// polling device is looked at (its no-notify flag kept right); once the budget is spent a look takes no request
/// and only notes that the ring holds some. Returns (requests taken, whether any ring still holds requests).
fn poll_queues(s: &mut Service, budget: &Budget) -> (usize, bool) {
    let (mut taken, mut more) = (0, false);
    for i in 0..s.volumes.len() {
        if s.volumes[i].dev.polling() {
            let max = if budget.may_take() { budget.batch() } else { 0 };
            let mut got = virt::virtio::blk::Intake::default();
            with_device(s, i, |dev, mem, backend| {
                got = dev.poll_queue(mem, backend, max);
            });
            taken += got.taken;
            more |= got.more;
            s.volumes[i].pump_items += u64::try_from(got.taken).unwrap_or(u64::MAX);
        }
    }
    (taken, more)
}

/// Processes the queues whose notification is pending (under the service lock), a bounded batch each while the
/// budget lasts; a queue with requests left stays pending. Returns the requests taken.
fn take_notifies(s: &mut Service, budget: &Budget) -> usize {
    if !NOTIFY_PENDING.swap(false, Ordering::AcqRel) {
        return 0;
    }
    let mut n = 0;
    let table = WINDOWS.read();
    for (i, e) in table.iter().enumerate() {
        if i >= s.volumes.len() || !e.pending.load(Ordering::Acquire) {
            continue;
        }
        if !budget.may_take() {
            // Left for the next pump.
            NOTIFY_PENDING.store(true, Ordering::Release);
            continue;
        }
        e.pending.store(false, Ordering::Release);
        s.ovh.notifies += 1;
        let mut got = virt::virtio::blk::Intake::default();
        with_device(s, i, |dev, mem, backend| {
            got = dev.take_notified(mem, backend, budget.batch());
        });
        n += got.taken.max(1);
        if let Some(v) = s.volumes.get_mut(i) {
            v.pump_items += u64::try_from(got.taken).unwrap_or(u64::MAX);
        }
        if got.more {
            e.pending.store(true, Ordering::Release);
            NOTIFY_PENDING.store(true, Ordering::Release);
        }
    }
    n
}

/// What one [`serve`] call did.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Served {
    /// Requests taken from queues and completions handled (0: nothing to do but wait for the device).
    pub items: usize,
    /// Another CPU held the service lock: nothing was done.
    pub contended: bool,
    /// Pumps run.
    pub pumps: u64,
    /// The last pump found nothing to do: what is left waits for the device (or for a guest).
    pub drained: bool,
}

/// Serves I/O until TSC `until` or until nothing is left for the CPU to do: pending notifications, the engine
/// (reap completions, feed the device in the partitioner's order), completions into the guests, polled queues,
/// one [`pump_locked`] after another. Called by the run loop in the I/O server's slices (until the slice's end)
/// and in idle time (until the idle decision's end), never elsewhere (`vm::runloop`). Returns at once, with
/// `contended`, when another CPU is serving. No item is started later than one item's average cost
/// (`Service::item_ticks`) before `until`, so the call ends near `until` (an item that costs more than average
/// runs past it), except the one-item floor of the first pump (so every call makes progress).
pub fn serve(until: u64) -> Served {
    let mut out = Served::default();
    let Some(s) = service() else { return out };
    if tsc::rdtsc() >= until {
        return out;
    }
    let Some(mut guard) = s.try_lock() else {
        CONTENDED.fetch_add(1, Ordering::Relaxed);
        out.contended = true;
        return out;
    };
    let s = &mut *guard;
    let stop = until.saturating_sub(s.item_ticks);
    let mut floor = true;
    loop {
        let t0 = tsc::rdtsc();
        let budget = Budget {
            until: stop,
            floor: core::cell::Cell::new(floor),
            item_ticks: s.item_ticks,
        };
        let n = pump_locked(s, &budget);
        floor = false;
        out.pumps += 1;
        out.items += n;
        s.ovh.pumps += 1;
        s.ovh.empty_pumps += u64::from(n == 0);
        let t = tsc::rdtsc().saturating_sub(t0);
        s.ovh.all_pump_ticks += t;
        if n > 0 {
            // Pumps that found nothing are polling, not per-request work.
            s.ovh.ticks += t;
            s.ovh.pump_ticks += t;
            // A sample is capped at MAX_ITEM_NS: a pump stretched by a host stall (the emulator not scheduled)
            // must not make every later slice stop early for long.
            let per_item = (t / u64::try_from(n).unwrap_or(u64::MAX).max(1))
                .min(tsc::hz() / (1_000_000_000 / MAX_ITEM_NS));
            s.item_ticks = if s.item_ticks == 0 {
                per_item
            } else {
                (s.item_ticks * 7 + per_item) / 8
            };
        }
        if n == 0 || OUTSTANDING.load(Ordering::Acquire) == 0 {
            out.drained = true;
            break;
        }
        if tsc::rdtsc() >= stop {
            break;
        }
    }
    let now = now_ns();
    let elapsed = now.saturating_sub(*s.started_ns.get_or_insert(now));
    let due = due_changes(s, elapsed);
    drop(guard);
    if !due.is_empty() {
        apply_changes(due, elapsed);
    }
    out
}

/// Records that a run loop went round (every iteration, every CPU): the gap tracking behind `CV:IOWIN stall_us=`.
pub fn note_loop() {
    if service().is_some() {
        note_gap();
    }
}

/// Records the gap since the previous run-loop iteration of any CPU ([`note_loop`]) against the windows it
/// spans. Every CPU's loop goes round at the end of each slice, and an idle CPU with I/O outstanding at least
/// every [`IDLE_POLL_NS`], so a gap of milliseconds means no CPU ran the hypervisor: every vCPU overran its slice
/// at once, which under emulation means the host did not run the emulator. `CV:IOWIN stall_us=` reports the
/// largest such gap per window (gaps that began with requests outstanding), so a test can tell the partitioner's
/// shortfall from the host's.
fn note_gap() {
    let now = now_ns();
    let prev = LAST_CALL_NS.swap(now, Ordering::Relaxed);
    // Only gaps that began with requests on the engine: without any, the loops legitimately stop calling.
    let busy_before =
        LAST_CALL_BUSY.swap(OUTSTANDING.load(Ordering::Acquire) > 0, Ordering::Relaxed);
    let gap = now.saturating_sub(prev);
    if prev == 0 || !busy_before || gap < 1_000_000 {
        return;
    }
    let (first, last) = (prev / WINDOW_NS, now / WINDOW_NS);
    for w in first..=last.min(first + 4) {
        let slot = usize::try_from(w % 64).unwrap_or(0);
        if STALL_WINDOW[slot].swap(w, Ordering::Relaxed) != w {
            STALL_NS[slot].store(0, Ordering::Relaxed);
        }
        STALL_NS[slot].fetch_max(gap, Ordering::Relaxed);
    }
}

/// The largest gap between run-loop iterations recorded for window `w` (0 if none above 1 ms).
fn window_stall_ns(w: u64) -> u64 {
    let slot = usize::try_from(w % 64).unwrap_or(0);
    if STALL_WINDOW[slot].load(Ordering::Relaxed) == w {
        STALL_NS[slot].load(Ordering::Relaxed)
    } else {
        0
    }
}

/// One pump under the service lock, bounded by a [`Budget`]: pending notifications (a batch per queue), then
/// the engine (reap NVMe completions into the backlog, submit what the partitioner dispatches: at most the
/// device's in-flight limit), then completions from the backlog into the guests,
/// then the polled queues. Its time is attributed to the volumes it served ([`attribute`]). Returns the requests
/// taken and completions handled (0: the pump found nothing to do).
fn pump_locked(s: &mut Service, budget: &Budget) -> usize {
    let t0 = tsc::rdtsc();
    s.started_ns.get_or_insert_with(now_ns);
    let notified = take_notifies(s, budget);
    let mut ctrl = s.ctrl.lock();
    let e0 = tsc::rdtsc();
    s.ovh.notify_ticks += e0.saturating_sub(t0);
    let before = s.backlog.len();
    let backlog = &mut s.backlog;
    s.engine.pump_until(
        &mut ctrl.ctrl,
        &mut now_ns,
        &mut |d| backlog.push_back(d),
        budget.until,
    );
    let f0 = tsc::rdtsc();
    if s.backlog.len() > before {
        s.ovh.engine_ticks += f0.saturating_sub(e0);
    }
    let mut n = 0;
    while !s.backlog.is_empty() && budget.may_take() {
        let Some(d) = s.backlog.pop_front() else {
            break;
        };
        n += 1;
        let Some(i) = s.router.device_of(d.token) else {
            continue;
        };
        let v = &mut s.volumes[i];
        v.pump_items += 1;
        match v.mem.as_mut() {
            Some(mem) => {
                if !d.status.is_success() {
                    v.failures += 1;
                    // The first few one by one, then every 100th: a failing disk must not flood the console.
                    if v.failures <= 8 || v.failures.is_multiple_of(100) {
                        log::warn!(
                            "io: vm {} volume {}: NVMe request failed with status {:#x} ({} so far); the guest gets IOERR",
                            v.vm_name,
                            v.index,
                            d.status.raw(),
                            v.failures
                        );
                    }
                }
                s.router.finish(d, &mut ctrl.ctrl, &mut v.dev, &mut **mem);
                s.ovh.completed += 1;
            }
            None => {
                s.router.discard(d, &mut ctrl.ctrl);
                s.ovh.discarded += 1;
            }
        }
    }
    drop(ctrl);
    let p0 = tsc::rdtsc();
    s.ovh.finish_ticks += p0.saturating_sub(f0);
    let (polled, more) = poll_queues(s, budget);
    s.ovh.notify_ticks += tsc::rdtsc().saturating_sub(p0);
    let volumes = &mut s.volumes;
    s.engine.drain_reports(&mut |r| {
        if let Some(v) = volumes.iter_mut().find(|v| v.id == r.volume && !v.detached) {
            crate::console::write_line_deferred(format_args!(
                "CV:IOWIN vm={} vol={} window={} committed={} completed={} arrived={} wait_p99_us={} service_p99_us={} stall_us={} share={} burst={} borrow={} boost={}",
                v.vm_name,
                v.index,
                r.window,
                r.committed_iops,
                r.completed_iops,
                r.stats.arrived,
                r.stats.wait.quantile_bound(990).map_or(0, |b| b / 1000),
                r.stats.service.quantile_bound(990).map_or(0, |b| b / 1000),
                window_stall_ns(r.window) / 1000,
                r.stats.from_share,
                r.stats.from_burst,
                r.stats.from_borrow,
                r.stats.from_boost
            ));
            v.last = Some(r);
            WINDOWS_CLOSED.fetch_add(1, Ordering::Release);
        }
    });
    publish_outstanding(s, more);
    mirror_status(s);
    let t = tsc::rdtsc().saturating_sub(t0);
    s.ovh.max_pump_ticks = s.ovh.max_pump_ticks.max(t);
    attribute(s, t);
    n + notified + polled
}

/// Splits one pump's `ticks` between the volumes it served, in proportion to their items (requests taken from
/// their queues, completions finished into their guests); the engine's share (reaping, dispatch, submission)
/// follows the same key. A pump that served nobody (polling) goes to `unattributed_ticks`. Resets the counts.
fn attribute(s: &mut Service, ticks: u64) {
    let total: u64 = s.volumes.iter().map(|v| v.pump_items).sum();
    if total == 0 {
        s.ovh.unattributed_ticks += ticks;
        return;
    }
    for v in &mut s.volumes {
        let share = u128::from(ticks) * u128::from(v.pump_items) / u128::from(total);
        v.io_ticks += u64::try_from(share).unwrap_or(u64::MAX);
        v.pump_items = 0;
    }
}

/// Copies every device's `Status` register into its window entry (under the service lock, after anything that
/// may have changed one: a register write, a pump that broke or completed into a device), for the lock-free read
/// in [`mmio`]. A read racing with a locked operation sees the status from before it, as if it came first.
/// A device that broke (a virtqueue rule violated: DEVICE_NEEDS_RESET) is logged once, with the reason.
fn mirror_status(s: &mut Service) {
    let table = WINDOWS.read();
    for (e, v) in table.iter().zip(s.volumes.iter_mut()) {
        e.status.store(
            v.dev.mmio_read(virt::virtio::mmio::reg::STATUS, 4),
            Ordering::Release,
        );
        match v.dev.transport().broken() {
            Some(why) if !v.broken_logged => {
                v.broken_logged = true;
                log::warn!(
                    "io: vm {} volume {}: device broken ({why:?}); DEVICE_NEEDS_RESET until the driver resets it",
                    v.vm_name,
                    v.index
                );
            }
            None => v.broken_logged = false,
            Some(_) => {}
        }
    }
}

/// Mirrors the work left for the run loops into [`OUTSTANDING`]: requests on the engine, completions not yet
/// finished into their guests, and one if a polled queue still holds requests (`ring_more`).
fn publish_outstanding(s: &Service, ring_more: bool) {
    OUTSTANDING.store(
        s.engine.outstanding() + s.backlog.len() + usize::from(ring_more),
        Ordering::Release,
    );
}

/// The scripted commitment changes that are due (`elapsed` ns after the first request), marked done:
/// `(vm, volume, configuration)`.
fn due_changes(s: &mut Service, elapsed: u64) -> Vec<(String, usize, VolumeConfig)> {
    let capacity = s.capacity;
    let mut due = Vec::new();
    for v in s.volumes.iter_mut().filter(|v| !v.detached) {
        let Some(c) = v.change.as_mut().filter(|c| !c.done && elapsed >= c.at_ns) else {
            continue;
        };
        c.done = true;
        due.push((
            v.vm_name.clone(),
            v.index,
            volume_config(&v.spec, c.rate, capacity),
        ));
    }
    due
}

/// Applies scripted changes through [`set_commitment`], the management channel's own entry point.
fn apply_changes(due: Vec<(String, usize, VolumeConfig)>, elapsed: u64) {
    for (vm, index, cfg) in due {
        match set_commitment(&vm, index, cfg) {
            Ok(()) => marker!(
                "IOCHANGE vm={vm} vol={index} committed={} at_ms={}",
                cfg.committed_iops,
                elapsed / 1_000_000
            ),
            Err(e) => marker!(
                "IOCHANGE vm={vm} vol={index} at_ms={} refused={}",
                elapsed / 1_000_000,
                Quoted(format_args!("{e}"))
            ),
        }
    }
}

fn reconfigure(s: &mut Service, i: usize, cfg: VolumeConfig, now: u64) -> Result<(), IoError> {
    let v = &s.volumes[i];
    if v.detached {
        return Err(IoError::Detached);
    }
    s.engine
        .reconfigure(v.id, cfg, now)
        .map_err(IoError::Refused)
}

/// The configuration in force of volume `index` of VM `vm` (commitment, limit, weight, burst bucket, policy), so a
/// caller changing some fields keeps the others.
///
/// # Errors
/// [`IoError`]: no service, no such volume, or the volume's VM stopped.
pub fn config_in_force(vm: &str, index: usize) -> Result<VolumeConfig, IoError> {
    let s = service().ok_or(IoError::NoService)?;
    let s = s.lock();
    let v = s
        .volumes
        .iter()
        .find(|v| v.vm_name == vm && v.index == index)
        .ok_or_else(|| IoError::UnknownVolume {
            vm: vm.to_string(),
            index,
        })?;
    if v.detached {
        return Err(IoError::Detached);
    }
    s.engine.volume_config(v.id).map_err(IoError::Refused)
}

/// A burst bucket in log lines: `<fill>iops/<size>` or `none`.
struct BurstText(Option<BurstConfig>);

impl core::fmt::Display for BurstText {
    fn fmt(&self, f: &mut core::fmt::Formatter<'_>) -> core::fmt::Result {
        match self.0 {
            Some(b) => write!(f, "{}iops/{}", b.fill_iops, b.size_ios),
            None => f.write_str("none"),
        }
    }
}

/// Position in `s.volumes` of volume `index` of VM `vm`.
fn volume_index(s: &Service, vm: &str, index: usize) -> Result<usize, IoError> {
    s.volumes
        .iter()
        .position(|v| v.vm_name == vm && v.index == index)
        .ok_or_else(|| IoError::UnknownVolume {
            vm: vm.to_string(),
            index,
        })
}

/// Changes the commitment (and limit, weight, burst, policy) of volume `index` of VM `vm`, through admission
/// control. The partitioner applies it at once, so it is in force for the whole next window.
///
/// # Errors
/// [`IoError`]: no service, no such volume, VM stopped, or refused (with the admission numbers).
pub fn set_commitment(vm: &str, index: usize, cfg: VolumeConfig) -> Result<(), IoError> {
    let s = service().ok_or(IoError::NoService)?;
    let mut s = s.lock();
    let i = volume_index(&s, vm, index)?;
    let r = reconfigure(&mut s, i, cfg, now_ns());
    log::info!(
        "io: vm {vm} volume {index}: commitment {} IOPS, limit {:?}, weight {}, burst {}: {}",
        cfg.committed_iops,
        cfg.limit_iops,
        cfg.weight,
        BurstText(cfg.burst),
        if r.is_ok() { "in force" } else { "refused" }
    );
    r
}

/// What [`grant_io`] did.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct IoGrant {
    /// The grant id was applied before: nothing done now.
    pub duplicate: bool,
    /// Grant I/Os the volume holds after it.
    pub held_ios: u64,
}

/// Applies a pool grant of `ios` I/O credits to volume `index` of VM `vm`: its burst bucket gets `ios` unit I/Os of
/// grant tokens, exactly once per `grant_id` (a repeat answers `duplicate`). Prints `CV:IOGRANT`.
///
/// # Errors
/// [`IoError`]: no service, no such volume, VM stopped, or refused by the partitioner (0 or more than 2^40 I/Os,
/// an id below the remembered window).
pub fn grant_io(vm: &str, index: usize, grant_id: u64, ios: u64) -> Result<IoGrant, IoError> {
    let s = service().ok_or(IoError::NoService)?;
    let mut s = s.lock();
    let i = volume_index(&s, vm, index)?;
    if s.volumes[i].detached {
        return Err(IoError::Detached);
    }
    let id = s.volumes[i].id;
    match s
        .engine
        .top_up(id, grant_id, ios, now_ns())
        .map_err(IoError::Refused)?
    {
        TopUp::Duplicate => Ok(IoGrant {
            duplicate: true,
            held_ios: 0,
        }),
        TopUp::Applied { held_ios } => {
            s.volumes[i].granted_ios = s.volumes[i].granted_ios.saturating_add(ios);
            s.granted_ios = s.granted_ios.saturating_add(ios);
            marker!(
                "IOGRANT vm={vm} vol={index} grant={grant_id} ios={ios} held={held_ios} volume_granted={} granted_total={}",
                s.volumes[i].granted_ios,
                s.granted_ios
            );
            Ok(IoGrant {
                duplicate: false,
                held_ios,
            })
        }
    }
}

/// A volume's request for I/O credits ([`credit_needs`]).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct IoCreditNeed {
    /// Request id ([`IO_REQUEST_ID_BASE`] + n).
    pub request_id: u64,
    /// VM index (the runtime's, = the management channel's VM id) and volume index.
    pub vm: usize,
    pub index: usize,
    /// I/O credits asked for, and the I/Os (earned and granted) the bucket holds now.
    pub ios: u64,
    pub balance_ios: u64,
}

/// The volumes that need I/O credits now (see the module documentation): at most one request per volume per closed
/// window, so the caller may poll as often as it likes.
pub fn credit_needs() -> Vec<IoCreditNeed> {
    let Some(s) = service() else {
        return Vec::new();
    };
    let closed = WINDOWS_CLOSED.load(Ordering::Acquire);
    if NEEDS_CHECKED.swap(closed, Ordering::AcqRel) == closed {
        return Vec::new();
    }
    let mut s = s.lock();
    let Service {
        engine,
        volumes,
        capacity,
        credit_requests,
        ..
    } = &mut *s;
    let mut needs = Vec::new();
    for v in volumes.iter_mut().filter(|v| !v.detached) {
        let Some(r) = v.last else { continue };
        if v.asked_window == Some(r.window) || r.stats.arrived <= r.committed_iops {
            continue;
        }
        let held = engine
            .burst_bucket(v.id)
            .ok()
            .flatten()
            .map_or(0, |b| b.tokens().saturating_add(b.granted()));
        if held >= sched::iops::COST_ONE {
            continue;
        }
        v.asked_window = Some(r.window);
        *credit_requests += 1;
        needs.push(IoCreditNeed {
            request_id: IO_REQUEST_ID_BASE + *credit_requests,
            vm: v.vm,
            index: v.index,
            ios: (r.stats.arrived - r.committed_iops)
                .max(r.committed_iops)
                .clamp(1, (*capacity).max(1)),
            balance_ios: held / sched::iops::COST_ONE,
        });
    }
    needs
}

/// Every volume's figures: configuration in force and its last closed window.
pub fn volume_stats() -> Vec<VolumeStats> {
    let Some(s) = service() else {
        return Vec::new();
    };
    let s = s.lock();
    s.volumes
        .iter()
        .map(|v| {
            let cfg = s.engine.volume_config(v.id).ok();
            let q = |h: &sched::iops::LatencyHistogram, p| h.quantile_bound(p).unwrap_or(0);
            let st = v.dev.stats();
            VolumeStats {
                vm: v.vm_name.clone(),
                index: v.index,
                committed_iops: cfg.map_or(0, |c| c.committed_iops),
                limit_iops: cfg.and_then(|c| c.limit_iops),
                window: v.last.map(|r| r.window),
                completed_iops: v.last.map_or(0, |r| r.completed_iops),
                wait_p50_ns: v.last.map_or(0, |r| q(&r.stats.wait, 500)),
                wait_p99_ns: v.last.map_or(0, |r| q(&r.stats.wait, 990)),
                service_p50_ns: v.last.map_or(0, |r| q(&r.stats.service, 500)),
                service_p99_ns: v.last.map_or(0, |r| q(&r.stats.service, 990)),
                completed: st.completed,
                failed: st.failed,
                attached: !v.detached,
            }
        })
        .collect()
}

/// Prints `CV:IOSUM` (end of a run): requests, MMIO exits per request and the hypervisor's CPU time per request
/// in device emulation, partitioner, driver and copies.
pub fn summary() {
    let grants: Vec<(u64, u64, u64)> = service().map_or_else(Vec::new, |s| {
        let s = s.lock();
        s.volumes
            .iter()
            .map(|v| {
                let spent = s
                    .engine
                    .burst_bucket(v.id)
                    .ok()
                    .flatten()
                    .map_or(0, |b| b.granted_spent() / sched::iops::COST_ONE);
                (v.granted_ios, spent, tsc::ticks_to_us(v.io_ticks))
            })
            .collect()
    });
    for (i, v) in volume_stats().into_iter().enumerate() {
        let (granted, grant_spent, io_cpu_us) = grants.get(i).copied().unwrap_or((0, 0, 0));
        marker!(
            "IOVOL vm={} vol={} committed={} completed={} failed={} last_window={} last_iops={} wait_p99_us={} service_p99_us={} attached={} granted={granted} grant_spent={grant_spent} io_cpu_us={io_cpu_us}",
            v.vm,
            v.index,
            v.committed_iops,
            v.completed,
            v.failed,
            v.window.unwrap_or(0),
            v.completed_iops,
            v.wait_p99_ns / 1000,
            v.service_p99_ns / 1000,
            u8::from(v.attached)
        );
    }
    let Some(s) = service() else { return };
    let s = s.lock();
    let o = &s.ovh;
    let done = o.completed.max(1);
    let per_req = |ticks: u64| tsc::ticks_to_us(ticks.saturating_mul(1000)) / done;
    marker!(
        "IOSUM capacity={} completed={} discarded={} mmio_exits={} notifies={} notifies_deferred={} exits_per_req_x100={} ovh_ns_per_req={} device_ns_per_req={} pump_ns_per_req={} lock_wait_ns_per_req={} engine_ns_per_req={} refused={} pumps={} ns_per_pump={} contended_pumps={} max_pump_us={} max_mmio_us={} backlog={} unattributed_us={}",
        s.capacity,
        o.completed,
        o.discarded,
        MMIO_EXITS.load(Ordering::Relaxed),
        o.notifies,
        NOTIFIES_DEFERRED.load(Ordering::Relaxed),
        MMIO_EXITS.load(Ordering::Relaxed) * 100 / done,
        per_req(o.ticks),
        per_req(o.device_ticks),
        per_req(o.pump_ticks),
        per_req(o.lock_wait_ticks),
        per_req(o.engine_ticks),
        s.router.refused,
        o.pumps,
        tsc::ticks_to_us(o.all_pump_ticks.saturating_mul(1000)) / o.pumps.max(1),
        CONTENDED.load(Ordering::Relaxed),
        tsc::ticks_to_us(o.max_pump_ticks),
        tsc::ticks_to_us(MAX_MMIO_TICKS.load(Ordering::Relaxed)),
        s.backlog.len(),
        tsc::ticks_to_us(o.unattributed_ticks)
    );
    // The engine's share broken down (every engine pump, empty ones included, so polling shows), and the
    // controller's register accesses (doorbells, CSTS): each one an exit to the device model under emulation.
    let p = s.engine.profile();
    let (r0, w0, t0) = s.regs_at_start;
    let (r1, w1, t1) = super::nvme::register_accesses();
    marker!(
        "IOPROF engine_pumps={} empty_polls={} reaped={} submitted={} dispatch_calls={} poll_ns_per_req={} complete_ns_per_req={} dispatch_ns_per_req={} submit_ns_per_req={} flush_ns_per_req={} reg_reads_x100={} reg_writes_x100={} reg_ns_per_req={} notify_ns_per_req={} finish_ns_per_req={} copy_ns_per_req={} enqueue_ns_per_req={} copies={} run_loop_pumps={} empty_run_loop_pumps={}",
        p.pumps,
        p.empty_polls,
        p.reaped,
        p.submitted,
        p.dispatch_calls,
        per_req(p.poll_ticks),
        per_req(p.complete_ticks),
        per_req(p.dispatch_ticks),
        per_req(p.submit_ticks),
        per_req(p.flush_ticks),
        r1.saturating_sub(r0) * 100 / done,
        w1.saturating_sub(w0) * 100 / done,
        per_req(t1.saturating_sub(t0)),
        per_req(o.notify_ticks),
        per_req(o.finish_ticks),
        per_req(s.router.copy_ticks),
        per_req(s.router.enqueue_ticks),
        s.router.copies,
        o.pumps,
        o.empty_pumps
    );
}
