//! Guest-physical memory as the exit handlers and the loader see it.
//!
//! Design: the kernel backs a VM's RAM with host frames that need not be contiguous, so the layer above only sees
//! byte copies in and out at guest-physical addresses. Every access is bounds-checked against the VM's RAM size
//! with overflow-safe arithmetic ([`check_range`]); an access that touches any byte outside RAM fails as a whole
//! and copies nothing. Guest RAM starts at guest-physical 0 and is `size()` bytes long (guest ABI v1).

/// A guest-physical range was outside the VM's RAM (or wrapped the address space).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct OutOfRange {
    pub gpa: u64,
    pub len: u64,
}

/// A VM's RAM.
pub trait GuestMemory {
    /// RAM size in bytes (guest-physical `[0, size)`).
    fn size(&self) -> u64;

    /// Copies `buf.len()` bytes from guest-physical `gpa`.
    ///
    /// # Errors
    /// [`OutOfRange`] if any byte lies outside RAM; nothing is copied then.
    fn read(&self, gpa: u64, buf: &mut [u8]) -> Result<(), OutOfRange>;

    /// Copies `data` to guest-physical `gpa`.
    ///
    /// # Errors
    /// [`OutOfRange`] if any byte lies outside RAM; nothing is written then.
    fn write(&mut self, gpa: u64, data: &[u8]) -> Result<(), OutOfRange>;

    /// Writes `len` zero bytes at `gpa`.
    ///
    /// # Errors
    /// As [`GuestMemory::write`].
    fn zero(&mut self, gpa: u64, len: u64) -> Result<(), OutOfRange> {
        check_range(gpa, len, self.size())?;
        let zeros = [0u8; 512];
        let mut done = 0u64;
        while done < len {
            let chunk = (len - done).min(512);
            // `chunk` <= 512, so the index is in bounds and the conversion exact.
            let n = usize::try_from(chunk).unwrap_or(512);
            self.write(gpa + done, &zeros[..n])?;
            done += chunk;
        }
        Ok(())
    }
}

/// Checks that `[gpa, gpa + len)` lies inside `[0, size)` without wrapping.
///
/// # Errors
/// [`OutOfRange`] otherwise.
pub fn check_range(gpa: u64, len: u64, size: u64) -> Result<(), OutOfRange> {
    match gpa.checked_add(len) {
        Some(end) if end <= size => Ok(()),
        _ => Err(OutOfRange { gpa, len }),
    }
}

/// Byte-vector guest memory, for host tests and tools.
#[derive(Clone, Debug)]
pub struct VecMemory {
    bytes: alloc::vec::Vec<u8>,
}

impl VecMemory {
    /// `size` bytes of zeroed RAM.
    pub fn new(size: usize) -> Self {
        Self {
            bytes: alloc::vec![0; size],
        }
    }

    /// The whole RAM.
    pub fn bytes(&self) -> &[u8] {
        &self.bytes
    }
}

impl GuestMemory for VecMemory {
    fn size(&self) -> u64 {
        self.bytes.len() as u64
    }

    fn read(&self, gpa: u64, buf: &mut [u8]) -> Result<(), OutOfRange> {
        let len = buf.len() as u64;
        check_range(gpa, len, self.size())?;
        let start = usize::try_from(gpa).map_err(|_| OutOfRange { gpa, len })?;
        buf.copy_from_slice(&self.bytes[start..start + buf.len()]);
        Ok(())
    }

    fn write(&mut self, gpa: u64, data: &[u8]) -> Result<(), OutOfRange> {
        let len = data.len() as u64;
        check_range(gpa, len, self.size())?;
        let start = usize::try_from(gpa).map_err(|_| OutOfRange { gpa, len })?;
        self.bytes[start..start + data.len()].copy_from_slice(data);
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ranges_are_checked_without_wrapping() {
        assert!(check_range(0, 16, 16).is_ok());
        assert!(check_range(16, 0, 16).is_ok());
        assert!(check_range(1, 16, 16).is_err());
        assert!(check_range(u64::MAX - 4, 16, u64::MAX).is_err());
        assert!(check_range(17, 0, 16).is_err());
    }

    #[test]
    fn out_of_range_copies_nothing() {
        let mut mem = VecMemory::new(32);
        assert_eq!(
            mem.write(30, &[1, 2, 3]),
            Err(OutOfRange { gpa: 30, len: 3 })
        );
        assert!(mem.bytes().iter().all(|&b| b == 0));
        mem.write(29, &[1, 2, 3]).unwrap();
        let mut buf = [0u8; 3];
        mem.read(29, &mut buf).unwrap();
        assert_eq!(buf, [1, 2, 3]);
        mem.zero(28, 4).unwrap();
        assert!(mem.bytes().iter().all(|&b| b == 0));
        assert!(mem.zero(28, 5).is_err());
    }
}
