//! Virtio devices for guests: the virtio-mmio transport ([`mmio`]), split virtqueues ([`queue`]) and a
//! virtio-blk device model ([`blk`]), per the virtio 1.2 specification (OASIS, sections cited in each module).
//!
//! Design: guest memory is reached only through [`crate::GuestMemory`], so every byte a device touches is
//! bounds-checked against the VM's RAM, and this code (like the rest of the crate) is unsafe-free. A device is
//! driven by the VM layer: MMIO exits on its register window become [`blk::VirtioBlk::mmio_read`] /
//! [`blk::VirtioBlk::mmio_write`]; queue notifications run the request parser synchronously and hand requests to
//! a [`blk::BlockBackend`]; completions come back through [`blk::VirtioBlk::complete`]. Interrupt delivery is the
//! VM layer's job ([`mmio::Transport::interrupt_status`] says when one is pending).
//!
//! Announcement to guests (guest ABI version 2, docs/guest-abi.md "Devices"): each virtio-mmio device occupies
//! a [`mmio::WINDOW`]-byte window at a guest-physical address from the VM configuration (`volume = ... base=`, or
//! the default `0xD000_0000 + i * 0x1000`), left unmapped in the nested page tables so accesses exit and are
//! decoded by `crate::mmio`; the guest finds it in its BootInfo device table and checks the magic value "virt",
//! version 2 and device ID 2.
//!
//! Invariant: a malicious or broken descriptor chain marks that device DEVICE_NEEDS_RESET for that VM and the
//! device then touches no guest memory until the driver resets it; the hypervisor itself is never affected.

pub mod blk;
pub mod mmio;
pub mod queue;

#[cfg(test)]
mod tests;
