//! `volume = ...` lines of the VM configuration: a guest's virtio-blk volumes on the host's NVMe namespaces.
//!
//! ```text
//! volume = size=16M offset=8M iops=40% limit=60% weight=200 burst=500iops/2000 overage=borrow
//! volume = ns=2 size=1G iops=4000iops readonly base=0xE0000000
//! ```
//!
//! Design: one line per volume, `key=value` words (and the flag `readonly`) in any order. Each becomes one
//! virtio-blk device on its own virtio-mmio window of [`WINDOW_BYTES`], listed in the guest's device table in the
//! order of the lines (docs/guest-abi.md). The parser checks everything it can know from the file alone (units,
//! ranges, alignment, limits not below commitments of the same unit, windows clear of RAM and of each other,
//! extents of two volumes on one namespace disjoint, at most [`MAX_VOLUMES`] per VM); the namespace's real size
//! and the device's capacity are only known at boot, where the kernel checks the extent and admission control
//! has the last word on commitments (docs/vm-config.md says what a refusal does).
//!
//! Rates are either absolute (`4000iops`) or a share of the device's capacity C calibrated at boot (`40%`), so
//! a configuration can say "40 % of whatever this disk does" and stay valid on another machine.
//!
//! Invariants of a parsed [`VolumeSpec`]: `size_bytes > 0`, offset and size multiples of 4 KiB, offset + size
//! without overflow; `1 <= weight <= 65535`; a limit is above 0 and, in the commitment's unit, not below it;
//! burst fill and size above 0; a boosted overage has a commitment above 0, a boost above 0 and a horizon
//! above 0; a window base is 4 KiB aligned and the window lies below 4 GiB.

use alloc::string::ToString;
use alloc::vec::Vec;

use super::{err, invalid, parse_duration, parse_int, range, ConfigError, ErrorKind};

/// Most volumes (virtio devices) per VM: the guest ABI's device table holds 8.
pub const MAX_VOLUMES: usize = 8;
/// Bytes of guest-physical space each device's register window occupies (one page; the virtio-mmio registers
/// use the first 0x200 bytes).
pub const WINDOW_BYTES: u64 = 0x1000;
/// Where device `i` goes without an explicit `base`: `DEFAULT_WINDOW_BASE + i * WINDOW_BYTES`.
pub const DEFAULT_WINDOW_BASE: u64 = 0xD000_0000;
/// Windows must end at or below this (the guest's identity map).
pub const WINDOW_LIMIT: u64 = 1 << 32;
/// Default weight of a volume (the partitioner's default).
pub const DEFAULT_VOLUME_WEIGHT: u32 = 100;
/// Largest absolute rate accepted (the partitioner's `MAX_RATE_IOPS`).
pub const MAX_IOPS: u64 = 1 << 40;
/// Every key a volume line accepts.
pub const VOLUME_KEYS: &str =
    "ns, offset, size, iops, limit, weight, burst, overage, readonly, base, iops_change";

/// An I/O rate.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Rate {
    /// Unit I/Os per second.
    Iops(u64),
    /// A share of the device's calibrated capacity, ppm.
    Share { ppm: u64 },
}

impl Rate {
    /// The rate in IOPS on a device of `capacity_iops` (shares round down).
    pub fn resolve(self, capacity_iops: u64) -> u64 {
        match self {
            Rate::Iops(n) => n,
            Rate::Share { ppm } => {
                u64::try_from(u128::from(capacity_iops) * u128::from(ppm) / 1_000_000)
                    .unwrap_or(u64::MAX)
            }
        }
    }

    /// Zero in either unit.
    pub fn is_zero(self) -> bool {
        matches!(self, Rate::Iops(0) | Rate::Share { ppm: 0 })
    }
}

/// A burst bucket: fills at `fill` while the volume runs under its commitment, holds `size_ios` unit I/Os.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct BurstSpec {
    pub fill: Rate,
    pub size_ios: u64,
}

/// What happens to demand above the commitment (the partitioner's overage policies).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Overage {
    /// Spare capacity shared by weight (`best-effort`, the default).
    BestEffort,
    /// Treated as committed while other volumes leave commitment unused (`borrow`).
    Borrow,
    /// Ahead of best effort at `boost_permille` of the commitment, fading to nothing at a lead of `horizon_ns`
    /// (`boost:150%:100ms`).
    Boosted {
        boost_permille: u32,
        horizon_ns: u64,
    },
}

/// One volume of a VM.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct VolumeSpec {
    /// Line of the `volume =` entry.
    pub line: usize,
    /// NVMe namespace id (1-based, default 1).
    pub nsid: u32,
    /// First byte of the volume on the namespace.
    pub offset_bytes: u64,
    /// Length in bytes.
    pub size_bytes: u64,
    /// Committed rate (default 0: uncommitted, best effort only).
    pub committed: Rate,
    /// Cap on all its service.
    pub limit: Option<Rate>,
    /// Share of spare capacity.
    pub weight: u32,
    pub burst: Option<BurstSpec>,
    pub overage: Overage,
    /// The guest may not write.
    pub read_only: bool,
    /// Guest-physical base of the register window; `None`: the default placement.
    pub base: Option<u64>,
    /// Test hook `iops_change=<after>:<rate>`: this long after the first request of any volume reached the
    /// hypervisor, the commitment becomes `rate`,
    /// through the same kernel call the management channel uses (`io::set_commitment`).
    pub change: Option<(u64, Rate)>,
}

impl VolumeSpec {
    /// The window base of device `index` of its VM.
    pub fn window_base(&self, index: usize) -> u64 {
        self.base.unwrap_or_else(|| {
            DEFAULT_WINDOW_BASE + u64::try_from(index).unwrap_or(u64::MAX / 2) * WINDOW_BYTES
        })
    }
}

fn field(key: &str) -> alloc::string::String {
    alloc::format!("volume.{key}")
}

/// `4000iops`, `4000 iops`, `40%` (of capacity, up to four decimals) or `0`.
fn parse_rate(line: usize, key: &str, value: &str) -> Result<Rate, ConfigError> {
    const EXPECTED: &str = "a rate like 4000iops or a share of capacity like 40%";
    let f = field(key);
    if value == "0" {
        return Ok(Rate::Iops(0));
    }
    if let Some(pct) = value.strip_suffix('%') {
        let ppm = super::scaled_decimal(pct.trim_end(), 10_000)
            .ok_or_else(|| invalid(line, &f, EXPECTED, value))?;
        if ppm > 1_000_000 {
            return Err(range(
                line,
                &f,
                alloc::format!("{value} of the device's capacity; at most 100%"),
            ));
        }
        return Ok(Rate::Share { ppm });
    }
    let (number, unit) = super::split_unit(value);
    if unit != "iops" || number.contains('.') {
        return Err(invalid(line, &f, EXPECTED, value));
    }
    let n = parse_int(line, &f, number, EXPECTED)?;
    if n > MAX_IOPS {
        return Err(range(
            line,
            &f,
            alloc::format!("{n} IOPS; at most {MAX_IOPS}"),
        ));
    }
    Ok(Rate::Iops(n))
}

fn parse_hex_or_dec(line: usize, key: &str, value: &str) -> Result<u64, ConfigError> {
    const EXPECTED: &str = "an address like 0xD0000000";
    let f = field(key);
    let parsed = match value
        .strip_prefix("0x")
        .or_else(|| value.strip_prefix("0X"))
    {
        Some(hex) => u64::from_str_radix(&hex.replace('_', ""), 16).ok(),
        None => value.parse::<u64>().ok(),
    };
    parsed.ok_or_else(|| invalid(line, &f, EXPECTED, value))
}

/// A size (`16M`) that must be a multiple of 4 KiB; `0` allowed where `zero_ok`.
fn parse_extent_bytes(
    line: usize,
    key: &str,
    value: &str,
    zero_ok: bool,
) -> Result<u64, ConfigError> {
    let f = field(key);
    if value == "0" {
        return if zero_ok {
            Ok(0)
        } else {
            Err(range(line, &f, "a volume must not be empty".to_string()))
        };
    }
    const EXPECTED: &str = "a size like 16M (units K, M, G, T, optionally KiB, MiB, GiB, TiB)";
    let (number, unit) = super::split_unit(value);
    let unit: u64 = match unit {
        "K" | "KiB" => 1 << 10,
        "M" | "MiB" => 1 << 20,
        "G" | "GiB" => 1 << 30,
        "T" | "TiB" => 1 << 40,
        _ => return Err(invalid(line, &f, EXPECTED, value)),
    };
    let bytes =
        super::scaled_decimal(number, unit).ok_or_else(|| invalid(line, &f, EXPECTED, value))?;
    if bytes % 4096 != 0 {
        return Err(range(
            line,
            &f,
            alloc::format!("{bytes} bytes is not a multiple of 4 KiB"),
        ));
    }
    if bytes == 0 && !zero_ok {
        return Err(range(line, &f, "a volume must not be empty".to_string()));
    }
    Ok(bytes)
}

fn parse_overage(line: usize, value: &str) -> Result<Overage, ConfigError> {
    const EXPECTED: &str =
        "`best-effort`, `borrow` or `boost:<rate>%:<horizon>` like boost:150%:100ms";
    let f = field("overage");
    match value {
        "best-effort" => return Ok(Overage::BestEffort),
        "borrow" => return Ok(Overage::Borrow),
        _ => {}
    }
    let Some(rest) = value.strip_prefix("boost:") else {
        return Err(invalid(line, &f, EXPECTED, value));
    };
    let Some((pct, horizon)) = rest.split_once(':') else {
        return Err(invalid(line, &f, EXPECTED, value));
    };
    let ppm = pct
        .strip_suffix('%')
        .and_then(|p| super::scaled_decimal(p, 10_000))
        .ok_or_else(|| invalid(line, &f, EXPECTED, value))?;
    let horizon_ns =
        parse_duration(line, &f, horizon).map_err(|_| invalid(line, &f, EXPECTED, value))?;
    let boost_permille = u32::try_from(ppm / 1000).unwrap_or(u32::MAX);
    if boost_permille == 0 || horizon_ns == 0 {
        return Err(range(
            line,
            &f,
            "the boost rate must be at least 0.1% and the horizon above 0".to_string(),
        ));
    }
    Ok(Overage::Boosted {
        boost_permille,
        horizon_ns,
    })
}

fn parse_burst(line: usize, value: &str) -> Result<BurstSpec, ConfigError> {
    const EXPECTED: &str = "<fill rate>/<bucket size in I/Os> like 500iops/2000 or 5%/2000";
    let f = field("burst");
    let Some((fill, size)) = value.split_once('/') else {
        return Err(invalid(line, &f, EXPECTED, value));
    };
    let fill = parse_rate(line, "burst", fill).map_err(|_| invalid(line, &f, EXPECTED, value))?;
    let size_ios = parse_int(line, &f, size, EXPECTED)?;
    if fill.is_zero() || size_ios == 0 || size_ios > MAX_IOPS {
        return Err(range(
            line,
            &f,
            alloc::format!("burst fill and size must be above 0 (size at most {MAX_IOPS})"),
        ));
    }
    Ok(BurstSpec { fill, size_ios })
}

/// Parses the value of one `volume =` line.
pub(super) fn parse_volume(line: usize, value: &str) -> Result<VolumeSpec, ConfigError> {
    let mut seen: Vec<&str> = Vec::new();
    let mut spec = VolumeSpec {
        line,
        nsid: 1,
        offset_bytes: 0,
        size_bytes: 0,
        committed: Rate::Iops(0),
        limit: None,
        weight: DEFAULT_VOLUME_WEIGHT,
        burst: None,
        overage: Overage::BestEffort,
        read_only: false,
        base: None,
        change: None,
    };
    for word in value.split_whitespace() {
        let (key, v) = match word.split_once('=') {
            Some((k, v)) => (k, v),
            None if word == "readonly" => ("readonly", ""),
            None => {
                return Err(invalid(
                    line,
                    "volume",
                    "`key=value` words (keys: ns, offset, size, iops, limit, weight, burst, overage, base, iops_change) or `readonly`",
                    word,
                ))
            }
        };
        if seen.contains(&key) {
            return Err(err(line, &field(key), ErrorKind::DuplicateField));
        }
        seen.push(key);
        match key {
            "ns" => {
                let n = parse_int(line, &field(key), v, "a namespace id (1, 2, ...)")?;
                spec.nsid = u32::try_from(n)
                    .ok()
                    .filter(|&n| n >= 1)
                    .ok_or_else(|| range(line, &field(key), alloc::format!("namespace {n} does not exist (ids start at 1)")))?;
            }
            "offset" => spec.offset_bytes = parse_extent_bytes(line, key, v, true)?,
            "size" => spec.size_bytes = parse_extent_bytes(line, key, v, false)?,
            "iops" => spec.committed = parse_rate(line, key, v)?,
            "limit" => {
                let r = parse_rate(line, key, v)?;
                if r.is_zero() {
                    return Err(range(line, &field(key), "a limit must be above 0".to_string()));
                }
                spec.limit = Some(r);
            }
            "weight" => {
                let w = parse_int(line, &field(key), v, "a whole number from 1 to 65535")?;
                if w == 0 || w > 65_535 {
                    return Err(range(
                        line,
                        &field(key),
                        alloc::format!("weight {w}; must be 1 to 65535"),
                    ));
                }
                spec.weight = u32::try_from(w).unwrap_or(DEFAULT_VOLUME_WEIGHT);
            }
            "burst" => spec.burst = Some(parse_burst(line, v)?),
            "iops_change" => {
                const EXPECTED: &str = "<after>:<rate> like 4s:25% or 2500ms:4000iops";
                let f = field(key);
                let (after, rate) = v
                    .split_once(':')
                    .ok_or_else(|| invalid(line, &f, EXPECTED, v))?;
                let after = parse_duration(line, &f, after).map_err(|_| invalid(line, &f, EXPECTED, v))?;
                spec.change = Some((after, parse_rate(line, key, rate)?));
            }
            "overage" => spec.overage = parse_overage(line, v)?,
            "readonly" => spec.read_only = true,
            "base" => {
                let base = parse_hex_or_dec(line, key, v)?;
                if base % 4096 != 0
                    || base
                        .checked_add(WINDOW_BYTES)
                        .is_none_or(|end| end > WINDOW_LIMIT)
                {
                    return Err(range(
                        line,
                        &field(key),
                        alloc::format!(
                            "window base {base:#x} must be 4 KiB aligned and the window must end at or below 4 GiB"
                        ),
                    ));
                }
                spec.base = Some(base);
            }
            _ => {
                return Err(invalid(
                    line,
                    &field(key),
                    "a volume key (ns, offset, size, iops, limit, weight, burst, overage, readonly, base, iops_change)",
                    key,
                ))
            }
        }
    }
    if spec.size_bytes == 0 {
        return Err(err(line, &field("size"), ErrorKind::Missing));
    }
    if spec.offset_bytes.checked_add(spec.size_bytes).is_none() {
        return Err(range(
            line,
            &field("size"),
            "offset + size overflows".to_string(),
        ));
    }
    if let Some(limit) = spec.limit {
        let below = match (limit, spec.committed) {
            (Rate::Iops(l), Rate::Iops(c)) => l < c,
            (Rate::Share { ppm: l }, Rate::Share { ppm: c }) => l < c,
            // Mixed units: only known against the calibrated capacity; the kernel checks at boot.
            _ => false,
        };
        if below {
            return Err(range(
                line,
                &field("limit"),
                "the limit is below the commitment (`iops`)".to_string(),
            ));
        }
    }
    if let (Some(limit), Some((_, to))) = (spec.limit, spec.change) {
        if matches!((limit, to), (Rate::Iops(l), Rate::Iops(c)) if l < c)
            || matches!((limit, to), (Rate::Share { ppm: l }, Rate::Share { ppm: c }) if l < c)
        {
            return Err(range(
                line,
                &field("iops_change"),
                "the new commitment is above the limit".to_string(),
            ));
        }
    }
    if let Overage::Boosted { .. } = spec.overage {
        if spec.committed.is_zero() {
            return Err(err(
                line,
                &field("overage"),
                ErrorKind::Conflict("a boosted overage needs a commitment (`iops` above 0)"),
            ));
        }
    }
    Ok(spec)
}

/// Checks a VM's volumes together: count, windows clear of RAM (`[0, memory)`) and of each other, extents on
/// one namespace disjoint.
pub(super) fn check_vm(volumes: &[VolumeSpec], memory: u64) -> Result<(), ConfigError> {
    if let Some(v) = volumes.get(MAX_VOLUMES) {
        return Err(range(
            v.line,
            "volume",
            alloc::format!("more than {MAX_VOLUMES} volumes in one VM (the guest's device table holds {MAX_VOLUMES})"),
        ));
    }
    for (i, v) in volumes.iter().enumerate() {
        let base = v.window_base(i);
        let end = base + WINDOW_BYTES;
        if base < memory {
            let why = if v.base.is_some() {
                alloc::format!("window {base:#x}..{end:#x} overlaps the VM's RAM (0..{memory:#x})")
            } else {
                alloc::format!(
                    "the default window {base:#x}..{end:#x} overlaps the VM's RAM (0..{memory:#x}); give `base=` above the RAM"
                )
            };
            return Err(range(v.line, &field("base"), why));
        }
        if end > WINDOW_LIMIT {
            return Err(range(
                v.line,
                &field("base"),
                alloc::format!("window {base:#x}..{end:#x} ends above 4 GiB"),
            ));
        }
        for (j, w) in volumes[..i].iter().enumerate() {
            let other = w.window_base(j);
            if base < other + WINDOW_BYTES && other < end {
                return Err(range(
                    v.line,
                    &field("base"),
                    alloc::format!(
                        "window {base:#x} overlaps the window of the volume on line {}",
                        w.line
                    ),
                ));
            }
        }
    }
    Ok(())
}

/// Two volumes anywhere in the file must not share blocks of one namespace (a VM's data would be another's).
pub(super) fn check_extents<'a>(
    all: impl Iterator<Item = &'a VolumeSpec>,
) -> Result<(), ConfigError> {
    let list: Vec<&VolumeSpec> = all.collect();
    for (i, v) in list.iter().enumerate() {
        let (a0, a1) = (v.offset_bytes, v.offset_bytes + v.size_bytes);
        for w in &list[..i] {
            let (b0, b1) = (w.offset_bytes, w.offset_bytes + w.size_bytes);
            if v.nsid == w.nsid && a0 < b1 && b0 < a1 {
                return Err(range(
                    v.line,
                    &field("offset"),
                    alloc::format!(
                        "bytes {a0:#x}..{a1:#x} of namespace {} overlap the volume on line {}",
                        v.nsid,
                        w.line
                    ),
                ));
            }
        }
    }
    Ok(())
}
