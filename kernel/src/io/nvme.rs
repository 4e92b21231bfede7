//! NVMe glue: the platform side of `drivers::nvme` (uncached BAR0 mapping, DMA pages from the frame allocator,
//! TSC clock) and bring-up of the first NVMe controller found on PCI.
//!
//! DMA: pages come from `frame::alloc_contiguous` and are reached through the direct map (physical = the address
//! the device sees; no IOMMU is programmed). x86 DMA is cache coherent, so write-back memory is fine; accesses are
//! volatile so the compiler neither elides nor reorders them around doorbell writes, and x86 keeps stores in order.
//!
//! Locking: the controller lives behind one spin lock ([`controller`]). Only the self-test uses it today; the
//! per-CPU I/O path will take it per batch (queue `cpu + 1` belongs to CPU `cpu`).

use alloc::boxed::Box;
use core::sync::atomic::{compiler_fence, AtomicU64, Ordering};

use drivers::nvme::{self, Clock, Controller, Dma, Mmio};
use drivers::pci::{self, Bar};
use spin::{Mutex, Once};

use crate::arch::x86_64::{paging, tsc};
use crate::mm::{frame, PAGE_SIZE};

/// Register accesses to the controller (reads, writes) and the TSC ticks they took: under QEMU each one is an exit
/// to the device model, so these are what the I/O service's `CV:IOSUM` reports as the BAR's cost.
static REG_READS: AtomicU64 = AtomicU64::new(0);
static REG_WRITES: AtomicU64 = AtomicU64::new(0);
static REG_TICKS: AtomicU64 = AtomicU64::new(0);

/// Register accesses since boot: `(reads, writes, TSC ticks spent in them)`.
pub fn register_accesses() -> (u64, u64, u64) {
    (
        REG_READS.load(Ordering::Relaxed),
        REG_WRITES.load(Ordering::Relaxed),
        REG_TICKS.load(Ordering::Relaxed),
    )
}

/// How often a busy queue's poll reads CSTS and scans deadlines. Every CSTS read is an exit to the device model
/// under QEMU (~15 us measured, `CV:IOPROF`); at the driver's default of 1 ms these reads were 0.2 per request
/// at 4000 IOPS. 10 ms still notices a fatal controller status long before the 2 s command timeout matters.
const HEALTH_INTERVAL_US: u64 = 10_000;

/// The kernel's hardware access for one controller.
pub struct KernelHal {
    /// Virtual address of BAR0 (uncached).
    regs: u64,
    /// Size of the BAR0 mapping.
    size: u64,
}

impl Mmio for KernelHal {
    fn read32(&mut self, off: usize) -> u32 {
        let off = u64::try_from(off).unwrap_or(u64::MAX);
        if off.saturating_add(4) > self.size {
            return u32::MAX;
        }
        let t0 = tsc::rdtsc();
        // SAFETY: regs..regs+size is BAR0 mapped uncached by map_mmio; off is in range and dword aligned by the
        // driver's register map.
        let v = unsafe { ((self.regs + off) as *const u32).read_volatile() };
        REG_READS.fetch_add(1, Ordering::Relaxed);
        REG_TICKS.fetch_add(tsc::rdtsc().saturating_sub(t0), Ordering::Relaxed);
        v
    }

    fn write32(&mut self, off: usize, value: u32) {
        let off = u64::try_from(off).unwrap_or(u64::MAX);
        if off.saturating_add(4) > self.size {
            return;
        }
        // Queue entries written before this doorbell must be in memory first (x86 keeps store order; this stops
        // the compiler from sinking them).
        compiler_fence(Ordering::SeqCst);
        let t0 = tsc::rdtsc();
        // SAFETY: as in read32.
        unsafe { ((self.regs + off) as *mut u32).write_volatile(value) }
        REG_WRITES.fetch_add(1, Ordering::Relaxed);
        REG_TICKS.fetch_add(tsc::rdtsc().saturating_sub(t0), Ordering::Relaxed);
    }
}

impl Dma for KernelHal {
    fn alloc_pages(&mut self, count: usize) -> Option<u64> {
        let n = u64::try_from(count).ok()?;
        let phys = frame::alloc_contiguous(n)?;
        // SAFETY: the frames were just allocated to us and the direct map covers them.
        unsafe {
            core::ptr::write_bytes(paging::phys_to_virt(phys), 0, count * 4096);
        }
        Some(phys)
    }

    fn free_pages(&mut self, phys: u64, count: usize) {
        for i in 0..u64::try_from(count).unwrap_or(0) {
            // SAFETY: the driver returns each allocation once, with the count it asked for.
            unsafe { frame::free(phys + i * PAGE_SIZE) };
        }
    }

    fn read(&mut self, phys: u64, buf: &mut [u8]) {
        let src = paging::phys_to_virt(phys);
        compiler_fence(Ordering::SeqCst);
        if phys.is_multiple_of(4) && buf.len().is_multiple_of(4) {
            for (i, chunk) in buf.chunks_exact_mut(4).enumerate() {
                // SAFETY: the range lies in one DMA allocation (trait contract), mapped by the direct map; aligned.
                let v = unsafe { src.add(i * 4).cast::<u32>().read_volatile() };
                chunk.copy_from_slice(&v.to_le_bytes());
            }
        } else {
            for (i, b) in buf.iter_mut().enumerate() {
                // SAFETY: as above.
                *b = unsafe { src.add(i).read_volatile() };
            }
        }
        compiler_fence(Ordering::SeqCst);
    }

    fn write(&mut self, phys: u64, data: &[u8]) {
        let dst = paging::phys_to_virt(phys);
        if phys.is_multiple_of(4) && data.len().is_multiple_of(4) {
            for (i, chunk) in data.chunks_exact(4).enumerate() {
                let v = u32::from_le_bytes([chunk[0], chunk[1], chunk[2], chunk[3]]);
                // SAFETY: the range lies in one DMA allocation, mapped by the direct map; aligned.
                unsafe { dst.add(i * 4).cast::<u32>().write_volatile(v) };
            }
        } else {
            for (i, b) in data.iter().enumerate() {
                // SAFETY: as above.
                unsafe { dst.add(i).write_volatile(*b) };
            }
        }
        compiler_fence(Ordering::SeqCst);
    }
}

impl Clock for KernelHal {
    /// No PAUSE here: the driver's hot path reads the clock once per submission and per poll, and under QEMU's
    /// multi-threaded TCG a PAUSE leaves the vCPU's execution loop and takes the emulator's global lock again
    /// (measured, `CV:IOPROF`: an empty poll cost ~9 us). The driver's wait loops pause themselves.
    fn now_us(&mut self) -> u64 {
        tsc::ticks_to_us(tsc::rdtsc())
    }
}

/// A controller that is up, with where it sits.
#[allow(dead_code)] // bdf and mechanism are for the I/O path and diagnostics
pub struct Device {
    /// PCI address.
    pub bdf: pci::Bdf,
    /// Configuration mechanism used ("ecam" or "ports").
    pub mechanism: &'static str,
    /// The driver.
    pub ctrl: Controller<KernelHal>,
}

/// Outcome of looking for and bringing up the controller.
pub enum Probe {
    /// No NVMe function on PCI.
    Absent,
    /// Found but unusable.
    Failed(heapless::String<120>),
    /// Running (boxed: the driver state dwarfs the other variants).
    Up(Box<Mutex<Device>>),
}

static DEVICE: Once<Probe> = Once::new();

/// The first NVMe controller, brought up on first call.
pub fn controller() -> &'static Probe {
    DEVICE.call_once(probe)
}

fn failed(args: core::fmt::Arguments<'_>) -> Probe {
    let mut s = heapless::String::new();
    // Truncation only shortens the explanation.
    let _ = core::fmt::write(&mut s, args);
    log::error!("nvme: {s}");
    Probe::Failed(s)
}

fn probe() -> Probe {
    let functions = super::pci::functions();
    let mechanism = super::pci::with(|c| c.name());
    let Some(f) = functions.iter().find(|f| f.is_nvme()) else {
        log::info!(
            "pci: {} functions via {mechanism}, no NVMe controller",
            functions.len()
        );
        return Probe::Absent;
    };
    let bdf = f.bdf;
    let bar = super::pci::with(|c| pci::read_bar(c, bdf, 0));
    let (base, size) = match bar {
        Ok(Bar::Memory { base, size, .. }) if base != 0 => (base, size),
        other => return failed(format_args!("{bdf}: BAR0 unusable: {other:?}")),
    };
    // Memory decoding and bus mastering (the controller DMAs queues and data); legacy INTx off: we poll.
    super::pci::with(|c| {
        pci::enable(
            c,
            bdf,
            pci::command::MEMORY | pci::command::BUS_MASTER | pci::command::INTX_DISABLE,
        )
    });
    // Registers plus doorbells for the queues we create fit in 16 KiB; map no more than the BAR.
    let map = size.min(0x4000);
    let regs = match paging::map_mmio(base, map) {
        Ok(va) => va,
        Err(e) => return failed(format_args!("{bdf}: cannot map BAR0 {base:#x}: {e:?}")),
    };
    let cpus = crate::SMP_RESULT.get().map_or(1, |r| r.online).max(1);
    let cfg = nvme::Config {
        io_queue_pairs: u16::try_from(cpus).unwrap_or(u16::MAX),
        health_interval_us: HEALTH_INTERVAL_US,
        ..nvme::Config::default()
    };
    let hal = KernelHal { regs, size: map };
    match Controller::new(hal, cfg) {
        Ok(ctrl) => {
            let info = ctrl.info();
            log::info!(
                "nvme: {bdf} via {mechanism}, BAR0 {base:#x} ({} KiB), NVMe {}.{}, '{}' serial '{}', {} namespace(s), {} I/O queue pair(s) x {} commands, max transfer {} KiB",
                size / 1024,
                ctrl.version().major(),
                ctrl.version().minor(),
                info.model,
                info.serial,
                ctrl.namespaces().len(),
                ctrl.io_queues(),
                ctrl.queue_capacity(),
                ctrl.max_transfer_bytes() / 1024
            );
            Probe::Up(Box::new(Mutex::new(Device {
                bdf,
                mechanism,
                ctrl,
            })))
        }
        Err((e, _hal)) => failed(format_args!("{bdf}: bring-up failed: {e:?}")),
    }
}
