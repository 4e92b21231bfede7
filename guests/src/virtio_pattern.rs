//! Data patterns for block I/O verification (the `io` guest): every 512-byte sector written carries its own sector
//! number, the run's seed and the write pass, so a read-back detects a misplaced block (wrong sector), data from
//! another run (wrong seed), a stale block (an older pass) and any corruption of the rest of the sector.
//!
//! Layout of a sector, as 64 little-endian u64 words: word 0 = sector number XOR [`SECTOR_TAG`], word 1 = seed,
//! word 2 = pass, words 3..64 = a SplitMix64 stream keyed by (sector, seed, pass). The header words make a mismatch
//! self-describing ([`Found`]); the stream makes every byte depend on all three.
//!
//! Invariant: [`fill`] and [`check`] agree for every (sector, seed, pass); `check` reports the first mismatching
//! sector only, with what it found there.

/// XORed into word 0 so that a zeroed sector never looks like sector 0.
pub const SECTOR_TAG: u64 = 0x5345_4354_4f52_2d31; // "1-ROTCES"

const WORDS: usize = 64;
/// Bytes of one pattern unit.
pub const SECTOR_BYTES: usize = 8 * WORDS;

fn splitmix(state: &mut u64) -> u64 {
    *state = state.wrapping_add(0x9e37_79b9_7f4a_7c15);
    let mut z = *state;
    z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
    z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
    z ^ (z >> 31)
}

fn key(sector: u64, seed: u64, pass: u32) -> u64 {
    let mut k = sector.wrapping_mul(0xd6e8_feb8_6659_fd93)
        ^ seed.rotate_left(17)
        ^ u64::from(pass).wrapping_mul(0xa076_1d64_78bd_642f);
    splitmix(&mut k)
}

fn word(buf: &[u8], i: usize) -> u64 {
    let mut w = [0u8; 8];
    w.copy_from_slice(&buf[8 * i..8 * i + 8]);
    u64::from_le_bytes(w)
}

/// Fills `buf` (whole sectors; a trailing partial sector is left alone) with the pattern of the sectors starting
/// at `first_sector`, for `seed` and `pass`.
pub fn fill(buf: &mut [u8], first_sector: u64, seed: u64, pass: u32) {
    for (sector, chunk) in (first_sector..).zip(buf.chunks_exact_mut(SECTOR_BYTES)) {
        let mut state = key(sector, seed, pass);
        for (i, w) in chunk.chunks_exact_mut(8).enumerate() {
            let v = match i {
                0 => sector ^ SECTOR_TAG,
                1 => seed,
                2 => u64::from(pass),
                _ => splitmix(&mut state),
            };
            w.copy_from_slice(&v.to_le_bytes());
        }
    }
}

/// What a sector that failed verification holds.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Found {
    /// The sector that mismatched.
    pub sector: u64,
    /// Its header: the sector number, seed and pass it claims (meaningless if the header itself is garbage).
    pub claims_sector: u64,
    pub claims_seed: u64,
    pub claims_pass: u64,
    /// First mismatching byte within the sector.
    pub offset: usize,
}

/// Checks that `buf` holds the pattern of the sectors starting at `first_sector` for `seed` and `pass`.
///
/// # Errors
/// The first sector that differs, with what it holds.
pub fn check(buf: &[u8], first_sector: u64, seed: u64, pass: u32) -> Result<(), Found> {
    let mut expected = [0u8; SECTOR_BYTES];
    for (sector, chunk) in (first_sector..).zip(buf.chunks_exact(SECTOR_BYTES)) {
        fill(&mut expected, sector, seed, pass);
        if let Some(offset) = chunk.iter().zip(&expected).position(|(a, b)| a != b) {
            return Err(Found {
                sector,
                claims_sector: word(chunk, 0) ^ SECTOR_TAG,
                claims_seed: word(chunk, 1),
                claims_pass: word(chunk, 2),
                offset,
            });
        }
    }
    Ok(())
}

/// A small, fast PRNG (xorshift64*) for choosing blocks and operations; never yields the zero state.
#[derive(Clone, Debug)]
pub struct Rng(u64);

impl Rng {
    /// A generator seeded from `seed` (any value, 0 included).
    pub fn new(seed: u64) -> Self {
        let mut s = seed;
        Self(splitmix(&mut s) | 1)
    }

    /// The next 64 random bits.
    pub fn next_u64(&mut self) -> u64 {
        self.0 ^= self.0 >> 12;
        self.0 ^= self.0 << 25;
        self.0 ^= self.0 >> 27;
        self.0.wrapping_mul(0x2545_f491_4f6c_dd1d)
    }

    /// A value in `[0, n)` (0 when `n` is 0), by multiply-shift.
    pub fn below(&mut self, n: u64) -> u64 {
        u64::try_from((u128::from(self.next_u64()) * u128::from(n)) >> 64).unwrap_or(0)
    }
}
