//! The virtio-mmio transport, version 2 (virtio 1.2 section 4.2.2, "MMIO Device Register Layout"): feature
//! negotiation, device status, queue configuration and notifications, independent of the device type.
//!
//! Register accesses below 0x100 must be aligned 32-bit accesses (section 4.2.2.2); anything else reads as zero
//! and writes are ignored. Device configuration space (0x100 and up) is left to the device model.
//!
//! Invariants: a queue becomes usable only when the driver sets QueueReady and its layout passes
//! [`SplitQueue::new`]; FEATURES_OK sticks only if the driver accepted VIRTIO_F_VERSION_1 and nothing the device did
//! not offer; once the device is [`Transport::break_device`]d (DEVICE_NEEDS_RESET) it processes nothing until
//! the driver writes 0 to Status (reset).

use alloc::vec::Vec;

use super::queue::{ChainError, SplitQueue, MAX_QUEUE_SIZE};
use crate::memory::GuestMemory;

/// Register offsets (section 4.2.2, table "MMIO Device Register Layout").
pub mod reg {
    /// "virt" in little endian.
    pub const MAGIC: u64 = 0x000;
    /// Version: 2 for virtio 1.x.
    pub const VERSION: u64 = 0x004;
    /// Device type.
    pub const DEVICE_ID: u64 = 0x008;
    /// Vendor.
    pub const VENDOR_ID: u64 = 0x00C;
    /// Device feature bits, 32 at a time.
    pub const DEVICE_FEATURES: u64 = 0x010;
    /// Selects which 32 device feature bits DEVICE_FEATURES shows.
    pub const DEVICE_FEATURES_SEL: u64 = 0x014;
    /// Driver-accepted feature bits, 32 at a time.
    pub const DRIVER_FEATURES: u64 = 0x020;
    /// Selects which 32 bits DRIVER_FEATURES writes.
    pub const DRIVER_FEATURES_SEL: u64 = 0x024;
    /// Queue selector.
    pub const QUEUE_SEL: u64 = 0x030;
    /// Largest size of the selected queue (0: no such queue).
    pub const QUEUE_NUM_MAX: u64 = 0x034;
    /// Size the driver chose.
    pub const QUEUE_NUM: u64 = 0x038;
    /// Selected queue ready.
    pub const QUEUE_READY: u64 = 0x044;
    /// Queue notification (value: queue index).
    pub const QUEUE_NOTIFY: u64 = 0x050;
    /// Pending interrupt causes (bit 0 used buffer, bit 1 configuration change).
    pub const INTERRUPT_STATUS: u64 = 0x060;
    /// Acknowledges interrupt causes.
    pub const INTERRUPT_ACK: u64 = 0x064;
    /// Device status.
    pub const STATUS: u64 = 0x070;
    /// Descriptor table address, low and high.
    pub const QUEUE_DESC_LOW: u64 = 0x080;
    /// High half.
    pub const QUEUE_DESC_HIGH: u64 = 0x084;
    /// Available ring ("driver area"), low.
    pub const QUEUE_DRIVER_LOW: u64 = 0x090;
    /// High half.
    pub const QUEUE_DRIVER_HIGH: u64 = 0x094;
    /// Used ring ("device area"), low.
    pub const QUEUE_DEVICE_LOW: u64 = 0x0A0;
    /// High half.
    pub const QUEUE_DEVICE_HIGH: u64 = 0x0A4;
    /// Configuration generation counter.
    pub const CONFIG_GENERATION: u64 = 0x0FC;
    /// Start of device configuration space.
    pub const CONFIG: u64 = 0x100;
}

/// Magic value.
pub const MAGIC: u32 = 0x7472_6976;
/// Vendor ID reported ("CVSR").
pub const VENDOR: u32 = 0x5253_5643;
/// Size of the register window a device occupies.
pub const WINDOW: u64 = 0x200;

/// Device status bits (section 2.1).
pub mod status {
    /// The guest noticed the device.
    pub const ACKNOWLEDGE: u32 = 1;
    /// The guest has a driver.
    pub const DRIVER: u32 = 2;
    /// The driver is ready.
    pub const DRIVER_OK: u32 = 4;
    /// Feature negotiation complete.
    pub const FEATURES_OK: u32 = 8;
    /// The device hit an error it cannot recover from without a reset.
    pub const DEVICE_NEEDS_RESET: u32 = 64;
    /// The driver gave up.
    pub const FAILED: u32 = 128;
}

/// VIRTIO_F_VERSION_1 (section 6): the device is a virtio 1.x device.
pub const F_VERSION_1: u64 = 1 << 32;

/// Interrupt status: used buffer notification.
pub const INT_USED: u32 = 1;
/// Interrupt status: configuration change (also raised when the device breaks).
pub const INT_CONFIG: u32 = 2;

/// Per-queue registers as the driver programs them.
#[derive(Clone, Copy, Debug, Default)]
struct QueueRegs {
    num: u16,
    desc: u64,
    driver: u64,
    device: u64,
    active: Option<SplitQueue>,
}

/// What a register write asks the device model to do.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Effect {
    /// Nothing beyond the register update.
    None,
    /// The driver notified queue `n` (ready, device live).
    Notify(u16),
    /// The driver reset the device (Status written with 0).
    Reset,
}

/// Transport state for one device.
#[derive(Clone, Debug)]
pub struct Transport {
    device_id: u32,
    offered: u64,
    accepted: u64,
    device_sel: u32,
    driver_sel: u32,
    queue_sel: u32,
    queues: Vec<QueueRegs>,
    status: u32,
    interrupt: u32,
    generation: u32,
    broken: Option<ChainError>,
}

impl Transport {
    /// A device of type `device_id` with `queues` queues offering `features` (VERSION_1 is always added).
    pub fn new(device_id: u32, queues: usize, features: u64) -> Self {
        Self {
            device_id,
            offered: features | F_VERSION_1,
            accepted: 0,
            device_sel: 0,
            driver_sel: 0,
            queue_sel: 0,
            queues: alloc::vec![QueueRegs::default(); queues],
            status: 0,
            interrupt: 0,
            generation: 0,
            broken: None,
        }
    }

    /// Features the driver accepted (meaningful once FEATURES_OK is set).
    pub fn accepted_features(&self) -> u64 {
        self.accepted
    }
    /// Device status register.
    pub fn status(&self) -> u32 {
        self.status
    }
    /// Whether the driver has set DRIVER_OK and the device is not broken.
    pub fn live(&self) -> bool {
        self.status & status::DRIVER_OK != 0 && self.broken.is_none()
    }
    /// Why the device broke, if it did.
    pub fn broken(&self) -> Option<ChainError> {
        self.broken
    }
    /// Pending interrupt causes (the VM layer injects an interrupt while this is non-zero).
    pub fn interrupt_status(&self) -> u32 {
        self.interrupt
    }
    /// Marks used buffers available to the driver.
    pub fn raise_used(&mut self) {
        self.interrupt |= INT_USED;
    }
    /// The ready queue `n`.
    pub fn queue_mut(&mut self, n: u16) -> Option<&mut SplitQueue> {
        self.queues.get_mut(usize::from(n))?.active.as_mut()
    }

    /// Stops the device for this VM: DEVICE_NEEDS_RESET and a configuration-change interrupt (section 2.1.2);
    /// all queues are dropped, so nothing more is read from or written to guest memory until a reset.
    pub fn break_device(&mut self, why: ChainError) {
        if self.broken.is_none() {
            self.broken = Some(why);
        }
        self.status |= status::DEVICE_NEEDS_RESET;
        self.interrupt |= INT_CONFIG;
        for q in &mut self.queues {
            q.active = None;
        }
    }

    fn reset(&mut self) {
        let (id, offered, n) = (self.device_id, self.offered, self.queues.len());
        let generation = self.generation.wrapping_add(1);
        *self = Self::new(id, n, offered);
        self.generation = generation;
    }

    /// Reads a transport register (`offset` < 0x100, aligned 32-bit access).
    pub fn read(&self, offset: u64) -> u32 {
        let q = self
            .queues
            .get(usize::try_from(self.queue_sel).unwrap_or(usize::MAX));
        let half = |v: u64, high: bool| {
            if high {
                (v >> 32) as u32
            } else {
                (v & 0xFFFF_FFFF) as u32
            }
        };
        match offset {
            reg::MAGIC => MAGIC,
            reg::VERSION => 2,
            reg::DEVICE_ID => self.device_id,
            reg::VENDOR_ID => VENDOR,
            reg::DEVICE_FEATURES => match self.device_sel {
                0 => half(self.offered, false),
                1 => half(self.offered, true),
                _ => 0,
            },
            reg::QUEUE_NUM_MAX => q.map_or(0, |_| u32::from(MAX_QUEUE_SIZE)),
            reg::QUEUE_READY => u32::from(q.is_some_and(|q| q.active.is_some())),
            reg::INTERRUPT_STATUS => self.interrupt,
            reg::STATUS => self.status,
            reg::CONFIG_GENERATION => self.generation,
            _ => 0,
        }
    }

    /// Writes a transport register; returns what the device model must do.
    pub fn write(&mut self, mem: &dyn GuestMemory, offset: u64, value: u32) -> Effect {
        let sel = usize::try_from(self.queue_sel).unwrap_or(usize::MAX);
        let set_low = |v: &mut u64| *v = (*v & !0xFFFF_FFFF) | u64::from(value);
        let set_high = |v: &mut u64| *v = (*v & 0xFFFF_FFFF) | (u64::from(value) << 32);
        match offset {
            reg::DEVICE_FEATURES_SEL => self.device_sel = value,
            reg::DRIVER_FEATURES_SEL => self.driver_sel = value,
            reg::DRIVER_FEATURES if self.status & status::FEATURES_OK == 0 => match self.driver_sel
            {
                0 => set_low(&mut self.accepted),
                1 => set_high(&mut self.accepted),
                _ => {}
            },
            reg::QUEUE_SEL => self.queue_sel = value,
            reg::QUEUE_NUM => {
                if let Some(q) = self.queues.get_mut(sel) {
                    q.num = u16::try_from(value).unwrap_or(0);
                }
            }
            reg::QUEUE_DESC_LOW => self
                .queues
                .get_mut(sel)
                .into_iter()
                .for_each(|q| set_low(&mut q.desc)),
            reg::QUEUE_DESC_HIGH => self
                .queues
                .get_mut(sel)
                .into_iter()
                .for_each(|q| set_high(&mut q.desc)),
            reg::QUEUE_DRIVER_LOW => self
                .queues
                .get_mut(sel)
                .into_iter()
                .for_each(|q| set_low(&mut q.driver)),
            reg::QUEUE_DRIVER_HIGH => self
                .queues
                .get_mut(sel)
                .into_iter()
                .for_each(|q| set_high(&mut q.driver)),
            reg::QUEUE_DEVICE_LOW => self
                .queues
                .get_mut(sel)
                .into_iter()
                .for_each(|q| set_low(&mut q.device)),
            reg::QUEUE_DEVICE_HIGH => self
                .queues
                .get_mut(sel)
                .into_iter()
                .for_each(|q| set_high(&mut q.device)),
            reg::QUEUE_READY => {
                let Some(q) = self.queues.get_mut(sel) else {
                    return Effect::None;
                };
                if value == 0 {
                    q.active = None;
                } else if self.broken.is_none() {
                    match SplitQueue::new(q.num, q.desc, q.driver, q.device, mem) {
                        Ok(sq) => q.active = Some(sq),
                        Err(e) => self.break_device(e),
                    }
                }
            }
            reg::QUEUE_NOTIFY => {
                let n = u16::try_from(value).unwrap_or(u16::MAX);
                let ready = self
                    .queues
                    .get(usize::from(n))
                    .is_some_and(|q| q.active.is_some());
                if ready && self.live() {
                    return Effect::Notify(n);
                }
            }
            reg::INTERRUPT_ACK => self.interrupt &= !value,
            reg::STATUS => {
                if value == 0 {
                    self.reset();
                    return Effect::Reset;
                }
                let mut v = value & !status::DEVICE_NEEDS_RESET;
                if v & status::FEATURES_OK != 0 && self.status & status::FEATURES_OK == 0 {
                    let ok = self.accepted & !self.offered == 0 && self.accepted & F_VERSION_1 != 0;
                    if !ok {
                        v &= !status::FEATURES_OK;
                    }
                }
                // DRIVER_OK without a successful negotiation is a driver error: the device stays inert.
                if v & status::DRIVER_OK != 0 && v & status::FEATURES_OK == 0 {
                    v &= !status::DRIVER_OK;
                }
                let keep = self.status & status::DEVICE_NEEDS_RESET;
                self.status = v | keep;
            }
            _ => {}
        }
        Effect::None
    }
}
