//! A VM's virtio-blk devices as the run loop sees them: building them from the configuration's volumes,
//! decoding-side glue for `ExitAction::Mmio`, and the guest-memory view the I/O service writes completions through.
//!
//! Design: the devices themselves live in the I/O service (`crate::io::service`, one lock with the NVMe engine),
//! because a completion needs the engine, the controller and the device at once. This module only turns the VM
//! configuration into service volumes plus the guest's device table ([`build`]), routes a decoded access to the
//! service ([`dispatch`]), and provides [`RamView`]: a `GuestMemory` over the VM's RAM frames that the service can
//! own (the runtime's `GuestRam` is shared and immutable once the VM runs).
//!
//! Invariant: a [`RamView`] covers exactly the VM's RAM, frame runs taken from `GuestRam::ranges` when the VM is
//! built (frames never move); it is dropped by `io::service::detach_vm` when the VM stops, before anything may
//! reclaim those frames.

use alloc::boxed::Box;
use alloc::string::String;
use alloc::vec::Vec;

use virt::config::VmConfig;
use virt::loader::MmioDeviceInfo;
use virt::memory::{check_range, OutOfRange};
use virt::mmio::{MmioAccess, MmioKind};
use virt::GuestMemory;

use super::ram::GuestRam;
use crate::arch::x86_64::paging;
use crate::io::service;

/// Guest RAM reached by host-physical frame runs through the direct map.
pub struct RamView {
    /// `(gpa, hpa, len)` runs in ascending gpa order, covering `[0, size)`.
    runs: Vec<(u64, u64, u64)>,
    size: u64,
}

impl RamView {
    /// A view of `ram`.
    pub fn new(ram: &GuestRam) -> Self {
        Self {
            runs: ram.ranges().collect(),
            size: GuestMemory::size(ram),
        }
    }

    /// Calls `f(host pointer, offset into the access, length)` for each piece of `[gpa, gpa + len)`.
    fn pieces(
        &self,
        gpa: u64,
        len: u64,
        mut f: impl FnMut(*mut u8, usize, usize),
    ) -> Result<(), OutOfRange> {
        check_range(gpa, len, self.size)?;
        let mut done = 0u64;
        while done < len {
            let at = gpa + done;
            // Runs are sorted by gpa and cover the RAM: the last run starting at or below `at` holds it.
            let i = self.runs.partition_point(|&(g, _, _)| g <= at);
            let Some(&(g, h, l)) = i.checked_sub(1).and_then(|i| self.runs.get(i)) else {
                return Err(OutOfRange { gpa, len });
            };
            if at >= g + l {
                return Err(OutOfRange { gpa, len });
            }
            let chunk = (g + l - at).min(len - done);
            f(
                paging::phys_to_virt(h + (at - g)),
                usize::try_from(done).unwrap_or(0),
                usize::try_from(chunk).unwrap_or(0),
            );
            done += chunk;
        }
        Ok(())
    }
}

impl GuestMemory for RamView {
    fn size(&self) -> u64 {
        self.size
    }

    fn read(&self, gpa: u64, buf: &mut [u8]) -> Result<(), OutOfRange> {
        let dst = buf.as_mut_ptr();
        let len = u64::try_from(buf.len()).unwrap_or(u64::MAX);
        self.pieces(gpa, len, |host, off, n| {
            // SAFETY: `host..host+n` lies inside one run of this VM's RAM frames (range-checked above, runs taken
            // from the VM's RAM), mapped by the direct map; `dst+off..+n` lies inside `buf`; they never overlap.
            unsafe { core::ptr::copy_nonoverlapping(host, dst.add(off), n) };
        })
    }

    fn write(&mut self, gpa: u64, data: &[u8]) -> Result<(), OutOfRange> {
        let src = data.as_ptr();
        let len = u64::try_from(data.len()).unwrap_or(u64::MAX);
        self.pieces(gpa, len, |host, off, n| {
            // SAFETY: as in `read`, in the other direction.
            unsafe { core::ptr::copy_nonoverlapping(src.add(off), host, n) };
        })
    }
}

/// Adds VM `vm`'s volumes to the I/O service and returns its device table. On error nothing of it stays added.
///
/// # Errors
/// The reason for `CV:VMREFUSED` (no I/O service, extent, admission with the partitioner's numbers).
pub fn build(vm: usize, cfg: &VmConfig) -> Result<Vec<MmioDeviceInfo>, String> {
    if cfg.volumes.is_empty() {
        return Ok(Vec::new());
    }
    service::init()?;
    let mut table = Vec::new();
    for (i, spec) in cfg.volumes.iter().enumerate() {
        match service::add_volume(vm, &cfg.name, i, spec) {
            Ok(w) => table.push(MmioDeviceInfo {
                base: w.base,
                size: u32::try_from(w.size).unwrap_or(u32::MAX),
                device_id: w.device_id,
            }),
            Err(why) => {
                service::remove_vm(vm);
                return Err(why);
            }
        }
    }
    Ok(table)
}

/// Hands the VM's RAM to its devices (after the RAM exists and before the VM runs).
pub fn attach(vm: usize, ram: &GuestRam) {
    service::attach(vm, || Box::new(RamView::new(ram)));
}

/// Serves a decoded access of VM `vm`; returns the value read (0 for a write) or `None` when no device of the
/// VM covers the address.
pub fn dispatch(vm: usize, access: &MmioAccess) -> Option<u64> {
    let write = match access.kind {
        MmioKind::Read => None,
        MmioKind::Write(v) => Some(v),
    };
    service::mmio(vm, access.gpa, access.size.bytes(), write)
}
