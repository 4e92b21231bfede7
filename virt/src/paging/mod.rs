//! Nested page tables (guest-physical → host-physical), shared by Intel EPT and AMD NPT.
//!
//! Design: one four-level radix-tree builder, [`NestedPageTable`], generic over a [`PteFormat`] that knows how one
//! vendor encodes an entry (EPT in [`ept`], NPT in `npt`). The builder never touches memory itself: table frames are
//! allocated, read and written through [`TableMemory`], which the kernel implements with its frame allocator and
//! direct map and the host tests implement with a `Vec`-backed fake. That keeps this module unsafe-free and lets
//! every mapping rule be tested on the host.
//!
//! Levels are numbered as the SDM does: 4 = PML4 (GPA bits 47:39), 3 = PDPT (38:30), 2 = PD (29:21, 2 MiB leaves),
//! 1 = PT (20:12, 4 KiB leaves). Guest-physical addresses are limited to 48 bits (a 4-level walk); host-physical
//! addresses to 52 bits (the architectural maximum; the hardware's MAXPHYADDR may be lower, which the caller knows).
//!
//! Invariants:
//! - the root table exists for the table's lifetime and every table frame is reachable from it exactly once, so
//!   [`NestedPageTable::destroy`] frees each frame once;
//! - a request is validated completely (alignment, address width, rights, overlap with anything already mapped)
//!   before the first entry is written, so a refused request changes nothing. Only running out of table frames
//!   part-way can leave a prefix mapped; [`MapError::OutOfMemory`] says so and the caller tears the VM down;
//! - mappings are never silently replaced: mapping over an existing leaf, or a 2 MiB leaf over a 4 KiB table, is
//!   [`MapError::Overlap`].

pub mod ept;
pub mod npt;

/// Size of a 4 KiB page.
pub const SIZE_4K: u64 = 1 << 12;
/// Size of a 2 MiB page.
pub const SIZE_2M: u64 = 1 << 21;
/// Entries per table.
pub const ENTRIES: usize = 512;
/// Guest-physical addresses must be below this (4-level walk).
pub const GPA_LIMIT: u64 = 1 << 48;
/// Host-physical addresses must be below this (architectural MAXPHYADDR).
pub const HPA_LIMIT: u64 = 1 << 52;

/// Page size of one mapping.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum PageSize {
    /// 4 KiB (a level-1 leaf).
    Size4K,
    /// 2 MiB (a level-2 leaf).
    Size2M,
}

impl PageSize {
    /// Bytes.
    pub const fn bytes(self) -> u64 {
        match self {
            Self::Size4K => SIZE_4K,
            Self::Size2M => SIZE_2M,
        }
    }

    /// The level whose entries map pages of this size.
    pub const fn level(self) -> u8 {
        match self {
            Self::Size4K => 1,
            Self::Size2M => 2,
        }
    }
}

/// Access rights granted to the guest.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Access {
    pub read: bool,
    pub write: bool,
    pub execute: bool,
}

impl Access {
    /// Read, write and execute: ordinary guest RAM.
    pub const RWX: Self = Self {
        read: true,
        write: true,
        execute: true,
    };
    /// Read and write, no execute.
    pub const RW: Self = Self {
        read: true,
        write: true,
        execute: false,
    };
    /// Read only.
    pub const R: Self = Self {
        read: true,
        write: false,
        execute: false,
    };
    /// Read and execute.
    pub const RX: Self = Self {
        read: true,
        write: false,
        execute: true,
    };
}

/// Memory type of a mapping (Intel SDM Vol. 3A §12.3, Table 12-2; the same names as the PAT types).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum MemType {
    Uncacheable,
    WriteCombining,
    WriteThrough,
    WriteProtected,
    WriteBack,
}

/// What a leaf grants.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Attrs {
    pub access: Access,
    pub mem_type: MemType,
}

impl Attrs {
    /// Guest RAM: RWX, write-back.
    pub const RAM: Self = Self {
        access: Access::RWX,
        mem_type: MemType::WriteBack,
    };
}

/// One decoded entry.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Entry {
    /// Not present: the walk stops with a violation.
    Empty,
    /// Points to the next-level table at this host-physical address.
    Table(u64),
    /// Maps a page at this host-physical address.
    Leaf { hpa: u64, attrs: Attrs },
}

/// Why an entry cannot be encoded or decoded in a format.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum FormatError {
    /// The format cannot express these rights (e.g. EPT write without read, SDM Vol. 3C §29.3.3.1).
    UnsupportedAccess(Access),
    /// The format cannot express this memory type.
    UnsupportedMemType(MemType),
    /// The entry's bits are not a valid entry of this format at this level (e.g. a reserved memory type).
    Malformed(u64),
}

/// A vendor's page-table entry encoding.
pub trait PteFormat {
    /// Name for reports ("ept", "npt").
    const NAME: &'static str;

    /// A non-leaf entry pointing to the table at `table_hpa`, granting everything (rights are decided at the leaf).
    fn table(table_hpa: u64) -> u64;

    /// A leaf at `level` (1 or 2) mapping `hpa` with `attrs`.
    ///
    /// # Errors
    /// The format cannot express `attrs`.
    fn leaf(hpa: u64, level: u8, attrs: Attrs) -> Result<u64, FormatError>;

    /// Decodes an entry found at `level`.
    ///
    /// # Errors
    /// The bits are not a valid entry of this format.
    fn decode(entry: u64, level: u8) -> Result<Entry, FormatError>;
}

/// Table-frame memory: how the builder allocates, reads and writes 4 KiB tables by host-physical address.
pub trait TableMemory {
    /// A zeroed, 4 KiB-aligned frame; `None` when memory is exhausted.
    fn alloc_zeroed(&mut self) -> Option<u64>;

    /// Returns a frame obtained from [`Self::alloc_zeroed`].
    fn free(&mut self, frame: u64);

    /// Reads entry `index` (< 512) of the table at `table`.
    fn read(&self, table: u64, index: usize) -> u64;

    /// Writes entry `index` (< 512) of the table at `table`.
    fn write(&mut self, table: u64, index: usize, value: u64);
}

/// Why a mapping request was refused.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum MapError {
    /// The guest-physical or host-physical start, or the length, is not a multiple of the page size.
    Misaligned {
        gpa: u64,
        hpa: u64,
        len: u64,
        page: PageSize,
    },
    /// The length is zero.
    Empty,
    /// The range does not fit below [`GPA_LIMIT`] / [`HPA_LIMIT`].
    OutOfRange { gpa: u64, hpa: u64, len: u64 },
    /// Something is already mapped at this guest-physical address (a leaf, or a 4 KiB table under a 2 MiB request).
    Overlap { gpa: u64 },
    /// The format cannot express the attributes.
    Format(FormatError),
    /// No frame for a table. Pages before `mapped_until` (exclusive, guest-physical) may already be mapped.
    OutOfMemory { mapped_until: u64 },
}

/// A successful lookup.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Translation {
    /// Host-physical address of the looked-up byte.
    pub hpa: u64,
    /// Size of the page that maps it.
    pub size: PageSize,
    /// What the leaf grants.
    pub attrs: Attrs,
}

/// Index of `gpa` in a table at `level`.
const fn index(gpa: u64, level: u8) -> usize {
    // Masked to 9 bits: always < 512, lossless.
    ((gpa >> (12 + 9 * (level as u32 - 1))) & 0x1FF) as usize
}

/// A nested page table: a root table and the tables below it.
#[derive(Debug)]
pub struct NestedPageTable<F: PteFormat> {
    root: u64,
    _format: core::marker::PhantomData<F>,
}

impl<F: PteFormat> NestedPageTable<F> {
    /// An empty table (only the root, nothing mapped).
    ///
    /// # Errors
    /// [`MapError::OutOfMemory`] when no frame is left for the root.
    pub fn new(mem: &mut impl TableMemory) -> Result<Self, MapError> {
        let root = mem
            .alloc_zeroed()
            .ok_or(MapError::OutOfMemory { mapped_until: 0 })?;
        Ok(Self {
            root,
            _format: core::marker::PhantomData,
        })
    }

    /// Host-physical address of the root (PML4) table, for the EPT pointer or nCR3.
    pub fn root(&self) -> u64 {
        self.root
    }

    /// Maps `len` bytes at `gpa` to `hpa` with pages of `size`.
    ///
    /// # Errors
    /// See [`MapError`]; every error but `OutOfMemory` leaves the table unchanged.
    pub fn map(
        &mut self,
        mem: &mut impl TableMemory,
        gpa: u64,
        hpa: u64,
        len: u64,
        size: PageSize,
        attrs: Attrs,
    ) -> Result<(), MapError> {
        let page = size.bytes();
        if len == 0 {
            return Err(MapError::Empty);
        }
        if !gpa.is_multiple_of(page) || !hpa.is_multiple_of(page) || !len.is_multiple_of(page) {
            return Err(MapError::Misaligned {
                gpa,
                hpa,
                len,
                page: size,
            });
        }
        let fits = |start: u64, limit: u64| start.checked_add(len).is_some_and(|end| end <= limit);
        if !fits(gpa, GPA_LIMIT) || !fits(hpa, HPA_LIMIT) {
            return Err(MapError::OutOfRange { gpa, hpa, len });
        }
        // Encode once to validate the attributes before touching anything.
        F::leaf(hpa, size.level(), attrs).map_err(MapError::Format)?;
        let mut off = 0;
        while off < len {
            self.check_free(mem, gpa + off, size)?;
            off += page;
        }
        let mut off = 0;
        while off < len {
            let leaf = F::leaf(hpa + off, size.level(), attrs).map_err(MapError::Format)?;
            self.set_leaf(mem, gpa + off, size, leaf)
                .ok_or(MapError::OutOfMemory {
                    mapped_until: gpa + off,
                })?;
            off += page;
        }
        Ok(())
    }

    /// Maps `len` bytes at `gpa` to `hpa` using 2 MiB pages wherever both addresses allow, 4 KiB elsewhere.
    ///
    /// # Errors
    /// As [`Self::map`], with 4 KiB alignment required.
    pub fn map_range(
        &mut self,
        mem: &mut impl TableMemory,
        gpa: u64,
        hpa: u64,
        len: u64,
        attrs: Attrs,
    ) -> Result<(), MapError> {
        if len == 0 {
            return Err(MapError::Empty);
        }
        if !gpa.is_multiple_of(SIZE_4K)
            || !hpa.is_multiple_of(SIZE_4K)
            || !len.is_multiple_of(SIZE_4K)
        {
            return Err(MapError::Misaligned {
                gpa,
                hpa,
                len,
                page: PageSize::Size4K,
            });
        }
        // Validate the whole range first so a refusal changes nothing.
        let fits = |start: u64, limit: u64| start.checked_add(len).is_some_and(|end| end <= limit);
        if !fits(gpa, GPA_LIMIT) || !fits(hpa, HPA_LIMIT) {
            return Err(MapError::OutOfRange { gpa, hpa, len });
        }
        let chunks = || {
            let mut off = 0;
            core::iter::from_fn(move || {
                if off >= len {
                    return None;
                }
                let (g, h) = (gpa + off, hpa + off);
                let big =
                    g.is_multiple_of(SIZE_2M) && h.is_multiple_of(SIZE_2M) && len - off >= SIZE_2M;
                let size = if big {
                    PageSize::Size2M
                } else {
                    PageSize::Size4K
                };
                off += size.bytes();
                Some((g, h, size))
            })
        };
        for (g, _, size) in chunks() {
            F::leaf(0, size.level(), attrs).map_err(MapError::Format)?;
            self.check_free(mem, g, size)?;
        }
        for (g, h, size) in chunks() {
            let leaf = F::leaf(h, size.level(), attrs).map_err(MapError::Format)?;
            self.set_leaf(mem, g, size, leaf)
                .ok_or(MapError::OutOfMemory { mapped_until: g })?;
        }
        Ok(())
    }

    /// Looks up `gpa`: the host-physical address, page size and attributes, or `None` if unmapped (or if a
    /// malformed entry is met, which this builder never writes).
    pub fn translate(&self, mem: &impl TableMemory, gpa: u64) -> Option<Translation> {
        if gpa >= GPA_LIMIT {
            return None;
        }
        let mut table = self.root;
        for level in (1..=4u8).rev() {
            match F::decode(mem.read(table, index(gpa, level)), level).ok()? {
                Entry::Empty => return None,
                Entry::Table(next) if level > 1 => table = next,
                Entry::Table(_) => return None,
                Entry::Leaf { hpa, attrs } => {
                    let size = match level {
                        1 => PageSize::Size4K,
                        2 => PageSize::Size2M,
                        _ => return None,
                    };
                    return Some(Translation {
                        hpa: hpa + (gpa & (size.bytes() - 1)),
                        size,
                        attrs,
                    });
                }
            }
        }
        None
    }

    /// Number of table frames in use (root included), for reports and leak checks.
    pub fn table_frames(&self, mem: &impl TableMemory) -> usize {
        fn count<F: PteFormat>(mem: &impl TableMemory, table: u64, level: u8) -> usize {
            1 + (0..ENTRIES)
                .filter_map(|i| match F::decode(mem.read(table, i), level) {
                    Ok(Entry::Table(next)) if level > 1 => Some(count::<F>(mem, next, level - 1)),
                    _ => None,
                })
                .sum::<usize>()
        }
        count::<F>(mem, self.root, 4)
    }

    /// Frees every table frame. The mapped host frames are the caller's and are not touched.
    pub fn destroy(self, mem: &mut impl TableMemory) {
        fn free<F: PteFormat>(mem: &mut impl TableMemory, table: u64, level: u8) {
            if level > 1 {
                for i in 0..ENTRIES {
                    if let Ok(Entry::Table(next)) = F::decode(mem.read(table, i), level) {
                        free::<F>(mem, next, level - 1);
                    }
                }
            }
            mem.free(table);
        }
        free::<F>(mem, self.root, 4);
    }

    /// Whether a page of `size` at `gpa` can be mapped without replacing anything.
    fn check_free(&self, mem: &impl TableMemory, gpa: u64, size: PageSize) -> Result<(), MapError> {
        let mut table = self.root;
        for level in (size.level()..=4).rev() {
            let entry = F::decode(mem.read(table, index(gpa, level)), level);
            match entry {
                Ok(Entry::Empty) => return Ok(()),
                Ok(Entry::Table(next)) if level > size.level() => table = next,
                // A leaf above or at the target level, a table where the leaf would go, or garbage.
                _ => return Err(MapError::Overlap { gpa }),
            }
        }
        Ok(())
    }

    /// Writes `leaf` for `gpa` at the level of `size`, creating tables on the way. `None` when out of frames.
    /// The caller has checked with [`Self::check_free`].
    fn set_leaf(
        &mut self,
        mem: &mut impl TableMemory,
        gpa: u64,
        size: PageSize,
        leaf: u64,
    ) -> Option<()> {
        let mut table = self.root;
        for level in (size.level() + 1..=4).rev() {
            let i = index(gpa, level);
            table = match F::decode(mem.read(table, i), level) {
                Ok(Entry::Table(next)) => next,
                _ => {
                    let next = mem.alloc_zeroed()?;
                    mem.write(table, i, F::table(next));
                    next
                }
            };
        }
        mem.write(table, index(gpa, size.level()), leaf);
        Some(())
    }
}

#[cfg(test)]
pub(crate) mod fake {
    //! A `Vec`-backed [`TableMemory`] for host tests.
    use alloc::vec::Vec;

    use super::{TableMemory, ENTRIES, SIZE_4K};

    /// Frames start here so that address 0 is never a table.
    const BASE: u64 = 0x10_0000;

    pub struct FakeMemory {
        frames: Vec<[u64; ENTRIES]>,
        free: Vec<u64>,
        pub limit: usize,
        pub live: usize,
    }

    impl FakeMemory {
        pub fn new(limit: usize) -> Self {
            Self {
                frames: Vec::new(),
                free: Vec::new(),
                limit,
                live: 0,
            }
        }

        fn slot(frame: u64) -> usize {
            assert!(
                frame >= BASE && frame.is_multiple_of(SIZE_4K),
                "bad frame {frame:#x}"
            );
            usize::try_from((frame - BASE) / SIZE_4K).unwrap()
        }
    }

    impl TableMemory for FakeMemory {
        fn alloc_zeroed(&mut self) -> Option<u64> {
            if self.live >= self.limit {
                return None;
            }
            self.live += 1;
            if let Some(f) = self.free.pop() {
                self.frames[Self::slot(f)] = [0; ENTRIES];
                return Some(f);
            }
            self.frames.push([0; ENTRIES]);
            Some(BASE + u64::try_from(self.frames.len() - 1).unwrap() * SIZE_4K)
        }

        fn free(&mut self, frame: u64) {
            assert!(!self.free.contains(&frame), "double free of {frame:#x}");
            self.free.push(frame);
            self.live -= 1;
        }

        fn read(&self, table: u64, index: usize) -> u64 {
            self.frames[Self::slot(table)][index]
        }

        fn write(&mut self, table: u64, index: usize, value: u64) {
            assert!(
                !self.free.contains(&table),
                "write to freed table {table:#x}"
            );
            self.frames[Self::slot(table)][index] = value;
        }
    }
}
