//! Guest RAM: host frames owned by one VM, reached by the hypervisor through the direct map.
//!
//! Design: a VM's RAM is allocated at creation, zeroed, and never grows. It is taken as one physically contiguous
//! run when the frame allocator has one (so nested paging can use 2 MiB pages), else frame by frame. The frames
//! are mapped into exactly one VM's nested page table ([`GuestRam::ranges`] feeds the backend), and into the
//! hypervisor only through the direct map, which is how [`virt::GuestMemory`] copies in and out.
//!
//! Invariants: `frames[i]` backs guest-physical `[i * 4 KiB, (i + 1) * 4 KiB)`; every access is bounds-checked by
//! `virt::memory::check_range` before any byte is touched. Guest vCPUs may write the same bytes concurrently; the
//! hypervisor only copies plain bytes out (never forms references into guest memory), so a racing guest can only
//! change what it logs. [`RamWriter`] lets exit handling write through a shared reference (`INS`). Frames are returned to the allocator only by [`GuestRam::release`] (a VM that never ran) or
//! [`GuestRam::reclaim`] (a stopped VM, once its vCPUs and nested page table are gone: `runloop`'s reclaim).
//! The frame list sits behind a reader-writer lock: accesses hold it shared for the copy, [`GuestRam::reclaim`]
//! takes it exclusively and empties it, so an access racing with a reclaim either completes before the frames are
//! freed or finds no RAM (`OutOfRange`), never a freed frame.

use alloc::vec::Vec;

use spin::RwLock;
use virt::memory::{check_range, GuestMemory, OutOfRange};

use crate::arch::x86_64::paging;
use crate::mm::{frame, PAGE_SIZE};

/// Not enough free frames for the requested RAM.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct OutOfFrames {
    pub wanted_pages: u64,
    pub free_pages: u64,
}

/// One VM's RAM.
#[derive(Debug)]
pub struct GuestRam {
    /// Empty once reclaimed.
    frames: RwLock<Vec<u64>>,
    size: u64,
}

impl GuestRam {
    /// `size` bytes (a multiple of 4 KiB) of zeroed RAM.
    ///
    /// # Errors
    /// [`OutOfFrames`]; nothing stays allocated then.
    pub fn new(size: u64) -> Result<Self, OutOfFrames> {
        let pages = size / PAGE_SIZE;
        let mut frames = Vec::with_capacity(usize::try_from(pages).unwrap_or(0));
        if let Some(base) = frame::alloc_contiguous(pages) {
            frames.extend((0..pages).map(|i| base + i * PAGE_SIZE));
        } else {
            for _ in 0..pages {
                match frame::alloc() {
                    Some(f) => frames.push(f),
                    None => {
                        let free_pages = frame::free_frames();
                        for f in frames {
                            // SAFETY: allocated just above, never mapped or shared.
                            unsafe { frame::free(f) };
                        }
                        return Err(OutOfFrames {
                            wanted_pages: pages,
                            free_pages,
                        });
                    }
                }
            }
        }
        for &f in &frames {
            // SAFETY: the frame is ours (just allocated) and mapped by the direct map.
            unsafe { core::ptr::write_bytes(paging::phys_to_virt(f), 0, 4096) };
        }
        Ok(Self {
            frames: RwLock::new(frames),
            size,
        })
    }

    /// Maximal runs of physically contiguous frames: `(gpa, hpa, len)` (none once reclaimed).
    pub fn ranges(&self) -> impl Iterator<Item = (u64, u64, u64)> {
        let frames = self.frames.read();
        let mut runs = Vec::new();
        let mut i = 0usize;
        while let Some(&start) = frames.get(i) {
            let first = i;
            i += 1;
            while frames.get(i) == Some(&(start + (i - first) as u64 * PAGE_SIZE)) {
                i += 1;
            }
            runs.push((
                first as u64 * PAGE_SIZE,
                start,
                (i - first) as u64 * PAGE_SIZE,
            ));
        }
        runs.into_iter()
    }

    /// Returns the frames to the allocator.
    ///
    /// # Safety
    /// No nested page table maps these frames any more and no vCPU of the VM exists.
    pub unsafe fn release(self) {
        // SAFETY: forwarded to the caller.
        unsafe { self.reclaim() };
    }

    /// Returns the frames to the allocator and leaves this RAM empty (every later access is `OutOfRange`);
    /// idempotent. Returns the number of frames freed (0 the second time).
    ///
    /// # Safety
    /// As [`Self::take_frames`].
    pub unsafe fn reclaim(&self) -> u64 {
        // SAFETY: forwarded to the caller.
        let mut frames = unsafe { self.take_frames() };
        frames.free_batch(usize::MAX)
    }

    /// Empties this RAM (every later access is `OutOfRange`) and hands its frames over for freeing, in batches
    /// the caller chooses ([`ReclaimedFrames::free_batch`]), so a large VM's reclaim need not stall a run loop.
    /// Idempotent: the second call hands over nothing.
    ///
    /// # Safety
    /// No nested page table maps these frames any more, no vCPU of the VM exists, and no device model holds a
    /// view of them (`io::service::detach_vm`): nothing but this value can reach them.
    pub unsafe fn take_frames(&self) -> ReclaimedFrames {
        // The write lock waits for every access in progress; the list is empty for every later one.
        ReclaimedFrames(core::mem::take(&mut *self.frames.write()))
    }

    /// Calls `f(host pointer, offset in buf, len)` for each page-bounded piece of `[gpa, gpa + len)`.
    fn pieces(
        &self,
        gpa: u64,
        len: u64,
        mut f: impl FnMut(*mut u8, usize, usize),
    ) -> Result<(), OutOfRange> {
        check_range(gpa, len, self.size)?;
        let frames = self.frames.read();
        if frames.is_empty() {
            return Err(OutOfRange { gpa, len });
        }
        let mut done = 0u64;
        while done < len {
            let at = gpa + done;
            let page = usize::try_from(at / PAGE_SIZE).map_err(|_| OutOfRange { gpa, len })?;
            let in_page = at % PAGE_SIZE;
            let chunk = (PAGE_SIZE - in_page).min(len - done);
            let frame = *frames.get(page).ok_or(OutOfRange { gpa, len })?;
            // In bounds: `check_range` above, and `frames` covers `size`.
            let host = paging::phys_to_virt(frame + in_page);
            f(
                host,
                usize::try_from(done).unwrap_or(0),
                usize::try_from(chunk).unwrap_or(0),
            );
            done += chunk;
        }
        Ok(())
    }
}

/// Frames taken from a reclaimed [`GuestRam`], not yet returned to the allocator (dropping it leaks the rest).
#[derive(Debug, Default)]
pub struct ReclaimedFrames(Vec<u64>);

impl ReclaimedFrames {
    /// Frames still to free.
    pub fn remaining(&self) -> u64 {
        self.0.len() as u64
    }

    /// Frees up to `max` frames; returns how many.
    pub fn free_batch(&mut self, max: usize) -> u64 {
        let keep = self.0.len().saturating_sub(max);
        let n = (self.0.len() - keep) as u64;
        for f in self.0.drain(keep..) {
            // SAFETY: the frames left their `GuestRam` through `take_frames`, whose caller guaranteed nothing
            // else reaches them; each is freed once (drained from the list).
            unsafe { frame::free(f) };
        }
        n
    }
}

impl GuestMemory for GuestRam {
    fn size(&self) -> u64 {
        self.size
    }

    fn read(&self, gpa: u64, buf: &mut [u8]) -> Result<(), OutOfRange> {
        let dst = buf.as_mut_ptr();
        self.pieces(gpa, buf.len() as u64, |host, off, len| {
            // SAFETY: `host..host+len` lies inside one frame of this VM's RAM (mapped by the direct map) and
            // `dst+off..+len` inside `buf`; guest RAM and `buf` never overlap.
            unsafe { core::ptr::copy_nonoverlapping(host, dst.add(off), len) };
        })
    }

    fn write(&mut self, gpa: u64, data: &[u8]) -> Result<(), OutOfRange> {
        let src = data.as_ptr();
        self.pieces(gpa, data.len() as u64, |host, off, len| {
            // SAFETY: as in `read`, in the other direction.
            unsafe { core::ptr::copy_nonoverlapping(src.add(off), host, len) };
        })
    }
}

/// A writable view of a VM's [`GuestRam`] through a shared reference, for exit handling that stores into guest
/// memory (`INS` through `virt::VmContext::handle_exit_rw`). Writing needs no exclusive access: the frames are
/// reached through the direct map under the frame list's read lock, exactly as the guest's own vCPUs write them,
/// and the I/O service's `devices::RamView` writes the same frames the same way.
pub struct RamWriter<'a>(pub &'a GuestRam);

impl GuestMemory for RamWriter<'_> {
    fn size(&self) -> u64 {
        self.0.size
    }

    fn read(&self, gpa: u64, buf: &mut [u8]) -> Result<(), OutOfRange> {
        self.0.read(gpa, buf)
    }

    fn write(&mut self, gpa: u64, data: &[u8]) -> Result<(), OutOfRange> {
        let src = data.as_ptr();
        self.0.pieces(gpa, data.len() as u64, |host, off, len| {
            // SAFETY: as in `GuestRam::write`: `host..host+len` lies inside one frame of the VM's RAM, `src+off..+len`
            // inside `data`; they never overlap.
            unsafe { core::ptr::copy_nonoverlapping(src.add(off), host, len) };
        })
    }
}
