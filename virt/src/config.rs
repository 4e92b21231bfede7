//! The VM configuration file: a small human format (docs/vm-config.md), several VMs per file.
//!
//! ```text
//! # comment
//! [vm burn-a]
//! image    = burn          # boot module name
//! memory   = 16M
//! baseline = 50%           # or 5ms/10ms
//! weight   = 256
//! volume   = size=16M offset=8M iops=40%   # a virtio-blk volume on NVMe ([`volume`])
//!
//! [host]                   # optional, at most once, boot configuration only ([`parse_file`])
//! io_server = 300us/1ms    # the I/O server's reservation on each CPU that serves I/O ([`HostConfig`])
//! ```
//!
//! Design: a line-oriented parser with no allocation beyond the result. Every error carries the 1-based line
//! number and the field it is about ([`ConfigError`]), so an operator can fix the file from the message alone.
//! Values are checked here with the same rules the scheduler and the loader apply (period range, budget within
//! period, cap at least the baseline, launch balance within the balance cap, memory and vCPU limits of the guest
//! ABI); nothing is clamped silently. The result is plain data: the kernel turns [`SchedSpec`] into the
//! scheduler's vCPU configuration and admission control has the last word.
//!
//! Invariants of a parsed [`VmConfig`]: name of 1-31 characters from `[A-Za-z0-9._-]`, unique in the file;
//! `memory` a multiple of 4 KiB in [`MIN_MEMORY`, `loader::MAX_MEM`]; `1 <= vcpus <= loader::MAX_VCPUS`; args
//! printable ASCII of at most 255 bytes; `MIN_PERIOD_NS <= period <= MAX_PERIOD_NS`, `0 < budget <= period`,
//! `weight >= 1`, `baseline <= cap <= 100%`, `launch_balance <= balance_cap`.

use alloc::string::{String, ToString};
use alloc::vec::Vec;
use core::fmt;

use crate::loader::{MAX_MEM, MAX_VCPUS, NAME_BYTES};

/// Shortest baseline period (the scheduler's limit).
pub const MIN_PERIOD_NS: u64 = 100_000;
/// Longest baseline period (the scheduler's limit).
pub const MAX_PERIOD_NS: u64 = 1_000_000_000;
/// Period used with a percentage baseline when `period` is not given.
pub const DEFAULT_PERIOD_NS: u64 = 10_000_000;
/// Default weight.
pub const DEFAULT_WEIGHT: u32 = 256;
/// Smallest VM memory.
pub const MIN_MEMORY: u64 = 4 << 20;
/// One user-visible CPU credit (one vCPU at 100% for one minute), in ns.
pub const CREDIT_NS: u64 = 60_000_000_000;
/// Parts per million.
pub const PPM: u64 = 1_000_000;
/// The I/O server's default reservation ([`HostConfig::io_server`]): budget per period. Measured under QEMU TCG
/// (docs/vm-config.md, "Host section"): the hypervisor spends 35-100 us of CPU per request there, so 300 us per
/// 1 ms serves about 3 000-8 500 requests per second from one CPU's reservation; idle time adds more. The period
/// is the shortest a real-time VM typically uses (1 ms), so the I/O server does not shorten the CPU's `T_min`
/// (which would cost every CPU `O/T_min` of its admission bound) and a request waits at most about one period.
pub const DEFAULT_IO_SERVER_BUDGET_NS: u64 = 300_000;
/// See [`DEFAULT_IO_SERVER_BUDGET_NS`].
pub const DEFAULT_IO_SERVER_PERIOD_NS: u64 = 1_000_000;
/// Every field the `[host]` section accepts.
pub const HOST_FIELDS: &[&str] = &["io_server"];

/// Most VMs in one file.
pub const MAX_VMS: usize = 64;
/// Longest accepted line, bytes.
pub const MAX_LINE_LEN: usize = 1024;

/// Behaviour at zero balance.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Burst {
    /// Held to the baseline.
    Standard,
    /// May overdraw up to `overdraft_ns` of credit (repaid from a credit pool).
    Unlimited { overdraft_ns: u64 },
}

/// Per-vCPU scheduling parameters (every vCPU of the VM gets these).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct SchedSpec {
    pub budget_ns: u64,
    pub period_ns: u64,
    /// Credits added per period, credit-ns.
    pub accrual_ns: u64,
    pub balance_cap_ns: u64,
    pub launch_balance_ns: u64,
    pub burst: Burst,
    pub weight: u32,
    /// Largest total share, ppm.
    pub cap_ppm: Option<u32>,
}

impl SchedSpec {
    /// Baseline share in ppm, rounded up.
    pub fn baseline_ppm(&self) -> u64 {
        (u128::from(self.budget_ns) * u128::from(PPM))
            .div_ceil(u128::from(self.period_ns.max(1)))
            .try_into()
            .unwrap_or(u64::MAX)
    }
}

/// One VM of the file.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct VmConfig {
    pub name: String,
    /// Line of the `[vm ...]` header (for later messages about this VM).
    pub line: usize,
    /// Boot module holding the guest image.
    pub image: String,
    pub memory_bytes: u64,
    pub vcpus: u32,
    /// The guest's `BootInfo::cmdline`.
    pub args: String,
    pub sched: SchedSpec,
    /// Physical CPU to pin the vCPUs to.
    pub cpu: Option<u32>,
    /// virtio-blk volumes, in the order of their lines (= the guest's device table order).
    pub volumes: Vec<VolumeSpec>,
}

/// The I/O server's reservation: a real-time server of `budget_ns` per `period_ns` on every CPU that serves I/O.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct IoServerSpec {
    pub budget_ns: u64,
    pub period_ns: u64,
}

impl Default for IoServerSpec {
    fn default() -> Self {
        Self {
            budget_ns: DEFAULT_IO_SERVER_BUDGET_NS,
            period_ns: DEFAULT_IO_SERVER_PERIOD_NS,
        }
    }
}

/// The `[host]` section: settings of the whole host rather than of one VM.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct HostConfig {
    /// `io_server = <budget>/<period>` (or `<percent>`, over the default period); the default when absent.
    pub io_server: IoServerSpec,
    /// Line of the `[host]` header, `None` without one.
    pub line: Option<usize>,
}

/// A whole boot configuration file: the host section and the VMs.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct ConfigFile {
    pub host: HostConfig,
    pub vms: Vec<VmConfig>,
}

/// What is wrong with a line.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum ErrorKind {
    /// A line that is not a comment, a `[vm name]` header or `key = value`.
    Syntax,
    /// A `key = value` line before the first `[vm name]` or `[host]`.
    OutsideSection,
    /// The key is not a known field.
    UnknownField,
    /// The key is not a known field of the `[host]` section.
    UnknownHostField,
    /// The same field twice in one VM.
    DuplicateField,
    /// A second VM of the same name.
    DuplicateVm,
    /// A required field is missing from the VM that starts on this line.
    Missing,
    /// A value that does not parse; `expected` says what would.
    Invalid {
        expected: &'static str,
        found: String,
    },
    /// A value that parses but breaks a rule; the text says which.
    OutOfRange(String),
    /// Two fields that cannot go together.
    Conflict(&'static str),
    /// More than [`MAX_VMS`] VMs, or a line longer than [`MAX_LINE_LEN`].
    TooLarge,
    /// The file is not UTF-8.
    NotText,
}

/// A configuration error: where, which field, what.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ConfigError {
    /// 1-based line number.
    pub line: usize,
    /// The field (or `vm` for a header, `-` where no field applies).
    pub field: String,
    pub kind: ErrorKind,
}

impl fmt::Display for ConfigError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "line {}, field `{}`: ", self.line, self.field)?;
        match &self.kind {
            ErrorKind::Syntax => f.write_str(
                "expected `[vm <name>]`, `[host]`, `<field> = <value>`, a comment or a blank line",
            ),
            ErrorKind::OutsideSection => {
                f.write_str("field outside a `[vm <name>]` or `[host]` section")
            }
            ErrorKind::UnknownHostField => write!(
                f,
                "unknown field of `[host]` (known: {})",
                HOST_FIELDS.join(", ")
            ),
            ErrorKind::UnknownField => write!(f, "unknown field (known: {})", FIELDS.join(", ")),
            ErrorKind::DuplicateField => f.write_str("given twice for the same VM"),
            ErrorKind::DuplicateVm => f.write_str("a VM of this name is already defined"),
            ErrorKind::Missing => f.write_str("required, but missing from this VM"),
            ErrorKind::Invalid { expected, found } => {
                write!(f, "expected {expected}, found `{found}`")
            }
            ErrorKind::OutOfRange(why) => f.write_str(why),
            ErrorKind::Conflict(why) => f.write_str(why),
            ErrorKind::TooLarge => write!(
                f,
                "file too large (at most {MAX_VMS} VMs, {MAX_LINE_LEN} bytes per line)"
            ),
            ErrorKind::NotText => f.write_str("the file is not UTF-8 text"),
        }
    }
}

/// Every field a VM section accepts.
pub const FIELDS: &[&str] = &[
    "image",
    "memory",
    "vcpus",
    "args",
    "baseline",
    "period",
    "accrual",
    "balance_cap",
    "launch_balance",
    "burst",
    "weight",
    "cap",
    "cpu",
    "volume",
];

fn err(line: usize, field: &str, kind: ErrorKind) -> ConfigError {
    ConfigError {
        line,
        field: field.to_string(),
        kind,
    }
}

fn invalid(line: usize, field: &str, expected: &'static str, found: &str) -> ConfigError {
    let found: String = found.chars().take(64).collect();
    err(line, field, ErrorKind::Invalid { expected, found })
}

fn range(line: usize, field: &str, why: String) -> ConfigError {
    err(line, field, ErrorKind::OutOfRange(why))
}

/// The name of a boot module from its command line: the last word, without directories and without a trailing
/// `.elf` (GRUB `module2 /boot/burn.elf burn` and `module2 /boot/burn.elf`, and QEMU `-initrd "/x/burn.elf"`,
/// all name the module `burn`; docs/console.md).
pub fn module_name(cmdline: &str) -> &str {
    let word = cmdline.split_whitespace().last().unwrap_or("");
    let base = word.rsplit('/').next().unwrap_or(word);
    base.strip_suffix(".elf").unwrap_or(base)
}

/// Parses a whole boot configuration file (the `vms.conf` module): the optional `[host]` section and the VMs.
///
/// # Errors
/// The first error in file order, with its line and field.
pub fn parse_file_bytes(bytes: &[u8]) -> Result<ConfigFile, ConfigError> {
    let text = core::str::from_utf8(bytes).map_err(|e| {
        let line = bytes[..e.valid_up_to()]
            .iter()
            .filter(|&&b| b == b'\n')
            .count()
            + 1;
        err(line, "-", ErrorKind::NotText)
    })?;
    parse_file(text)
}

/// Parses VM sections only (a configuration sent at run time: a `[host]` section is refused there, since host
/// settings are fixed at boot).
///
/// # Errors
/// The first error in file order, with its line and field.
pub fn parse_bytes(bytes: &[u8]) -> Result<Vec<VmConfig>, ConfigError> {
    vms_only(parse_file_bytes(bytes)?)
}

/// Parses VM sections only; see [`parse_bytes`].
///
/// # Errors
/// The first error in file order, with its line and field.
pub fn parse(text: &str) -> Result<Vec<VmConfig>, ConfigError> {
    vms_only(parse_file(text)?)
}

fn vms_only(file: ConfigFile) -> Result<Vec<VmConfig>, ConfigError> {
    match file.host.line {
        Some(line) => Err(err(
            line,
            "host",
            ErrorKind::Conflict("a `[host]` section belongs in the boot configuration module only"),
        )),
        None => Ok(file.vms),
    }
}

/// One section being read (boxed: a VM section is large and there is only one at a time).
enum Current {
    Vm(alloc::boxed::Box<Section>),
    Host,
}

/// Parses a whole boot configuration file: at most one `[host]` section (anywhere) and the VM sections.
///
/// # Errors
/// The first error in file order, with its line and field.
pub fn parse_file(text: &str) -> Result<ConfigFile, ConfigError> {
    let mut vms: Vec<VmConfig> = Vec::new();
    let mut host = HostConfig::default();
    let mut io_server_line: Option<usize> = None;
    let mut current: Option<Current> = None;
    for (index, raw) in text.lines().enumerate() {
        let line = index + 1;
        if raw.len() > MAX_LINE_LEN {
            return Err(err(line, "-", ErrorKind::TooLarge));
        }
        let content = strip_comment(raw).trim();
        if content.is_empty() {
            continue;
        }
        if let Some(header) = content.strip_prefix('[') {
            if let Some(Current::Vm(section)) = current.take() {
                vms.push((*section).finish()?);
            }
            if header.strip_suffix(']').map(str::trim) == Some("host") {
                if host.line.is_some() {
                    return Err(err(
                        line,
                        "host",
                        ErrorKind::Conflict("only one `[host]` section"),
                    ));
                }
                host.line = Some(line);
                current = Some(Current::Host);
                continue;
            }
            if vms.len() == MAX_VMS {
                return Err(err(line, "vm", ErrorKind::TooLarge));
            }
            let name = parse_header(line, header)?;
            if vms.iter().any(|vm| vm.name == name) {
                return Err(err(line, "vm", ErrorKind::DuplicateVm));
            }
            current = Some(Current::Vm(alloc::boxed::Box::new(Section::new(
                name, line,
            ))));
            continue;
        }
        let Some((key, value)) = content.split_once('=') else {
            return Err(err(line, "-", ErrorKind::Syntax));
        };
        let (key, value) = (key.trim(), value.trim());
        match current.as_mut() {
            None => return Err(err(line, key, ErrorKind::OutsideSection)),
            Some(Current::Vm(section)) => section.set(line, key, value)?,
            Some(Current::Host) => match key {
                "io_server" => {
                    if io_server_line.replace(line).is_some() {
                        return Err(err(line, key, ErrorKind::DuplicateField));
                    }
                    host.io_server = parse_io_server(line, key, value)?;
                }
                _ => return Err(err(line, key, ErrorKind::UnknownHostField)),
            },
        }
    }
    if let Some(Current::Vm(section)) = current.take() {
        vms.push((*section).finish()?);
    }
    volume::check_extents(vms.iter().flat_map(|vm| vm.volumes.iter()))?;
    Ok(ConfigFile { host, vms })
}

/// `io_server = <budget>/<period>` or `<percent>` (over [`DEFAULT_IO_SERVER_PERIOD_NS`]), with the scheduler's
/// rules: period in [`MIN_PERIOD_NS`, `MAX_PERIOD_NS`], `0 < budget <= period`.
fn parse_io_server(line: usize, field: &str, value: &str) -> Result<IoServerSpec, ConfigError> {
    let (budget_ns, period_ns) = match parse_baseline(line, field, value)? {
        Baseline::Percent { ppm } => {
            let period = DEFAULT_IO_SERVER_PERIOD_NS;
            let budget = u128::from(ppm) * u128::from(period) / u128::from(PPM);
            (u64::try_from(budget).unwrap_or(u64::MAX), period)
        }
        Baseline::Budget {
            budget_ns,
            period_ns,
        } => (budget_ns, period_ns),
    };
    if !(MIN_PERIOD_NS..=MAX_PERIOD_NS).contains(&period_ns) {
        return Err(range(
            line,
            field,
            alloc::format!("period {period_ns} ns outside [{MIN_PERIOD_NS}, {MAX_PERIOD_NS}] ns"),
        ));
    }
    if budget_ns == 0 || budget_ns > period_ns {
        return Err(range(
            line,
            field,
            alloc::format!("budget {budget_ns} ns must be in (0, period {period_ns} ns]"),
        ));
    }
    Ok(IoServerSpec {
        budget_ns,
        period_ns,
    })
}

/// Drops a `#` comment: one at the start of the line or after whitespace (so `args = a#b` keeps its `#`).
fn strip_comment(line: &str) -> &str {
    let bytes = line.as_bytes();
    for (i, &b) in bytes.iter().enumerate() {
        if b == b'#' && (i == 0 || bytes[i - 1].is_ascii_whitespace()) {
            return &line[..i];
        }
    }
    line
}

fn parse_header(line: usize, header: &str) -> Result<String, ConfigError> {
    let Some(inner) = header.strip_suffix(']') else {
        return Err(invalid(line, "vm", "`[vm <name>]`", header));
    };
    let mut words = inner.split_whitespace();
    let (Some("vm"), Some(name), None) = (words.next(), words.next(), words.next()) else {
        return Err(invalid(line, "vm", "`[vm <name>]`", inner));
    };
    let valid = name.len() < NAME_BYTES
        && name
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || b"._-".contains(&b));
    if !valid {
        return Err(invalid(
            line,
            "vm",
            "a name of 1-31 characters from A-Z a-z 0-9 . _ -",
            name,
        ));
    }
    Ok(name.to_string())
}

/// One `[vm]` section while it is being read: each field with the line it was set on.
struct Section {
    name: String,
    line: usize,
    image: Option<(usize, String)>,
    memory: Option<(usize, u64)>,
    vcpus: Option<(usize, u32)>,
    args: Option<(usize, String)>,
    baseline: Option<(usize, Baseline)>,
    period: Option<(usize, u64)>,
    accrual: Option<(usize, u64)>,
    balance_cap: Option<(usize, u64)>,
    launch_balance: Option<(usize, u64)>,
    burst: Option<(usize, Burst)>,
    weight: Option<(usize, u32)>,
    cap: Option<(usize, u64)>,
    cpu: Option<(usize, u32)>,
    volumes: Vec<VolumeSpec>,
}

#[derive(Clone, Copy)]
enum Baseline {
    Percent { ppm: u64 },
    Budget { budget_ns: u64, period_ns: u64 },
}

fn put<T>(
    slot: &mut Option<(usize, T)>,
    line: usize,
    field: &str,
    value: T,
) -> Result<(), ConfigError> {
    if slot.is_some() {
        return Err(err(line, field, ErrorKind::DuplicateField));
    }
    *slot = Some((line, value));
    Ok(())
}

impl Section {
    fn new(name: String, line: usize) -> Self {
        Self {
            name,
            line,
            image: None,
            memory: None,
            vcpus: None,
            args: None,
            baseline: None,
            period: None,
            accrual: None,
            balance_cap: None,
            launch_balance: None,
            burst: None,
            weight: None,
            cap: None,
            cpu: None,
            volumes: Vec::new(),
        }
    }

    fn set(&mut self, line: usize, key: &str, value: &str) -> Result<(), ConfigError> {
        match key {
            "image" => {
                if value.is_empty()
                    || value.len() > 64
                    || !value.bytes().all(|b| b.is_ascii_graphic())
                {
                    return Err(invalid(
                        line,
                        key,
                        "a boot module name (1-64 printable characters, no spaces)",
                        value,
                    ));
                }
                put(&mut self.image, line, key, value.to_string())
            }
            "memory" => put(&mut self.memory, line, key, parse_memory(line, key, value)?),
            "vcpus" => {
                let n = parse_int(line, key, value, "a whole number of vCPUs")?;
                if n == 0 || n > u64::from(MAX_VCPUS) {
                    return Err(range(
                        line,
                        key,
                        alloc::format!("{n} vCPUs; a VM has 1 to {MAX_VCPUS}"),
                    ));
                }
                put(
                    &mut self.vcpus,
                    line,
                    key,
                    u32::try_from(n).unwrap_or(MAX_VCPUS),
                )
            }
            "args" => {
                if value.len() > 255 || !value.bytes().all(|b| (0x20..=0x7e).contains(&b)) {
                    return Err(invalid(
                        line,
                        key,
                        "at most 255 printable ASCII characters",
                        value,
                    ));
                }
                put(&mut self.args, line, key, value.to_string())
            }
            "baseline" => put(
                &mut self.baseline,
                line,
                key,
                parse_baseline(line, key, value)?,
            ),
            "period" => put(
                &mut self.period,
                line,
                key,
                parse_duration(line, key, value)?,
            ),
            "accrual" => put(
                &mut self.accrual,
                line,
                key,
                parse_credit(line, key, value)?,
            ),
            "balance_cap" => put(
                &mut self.balance_cap,
                line,
                key,
                parse_credit(line, key, value)?,
            ),
            "launch_balance" => put(
                &mut self.launch_balance,
                line,
                key,
                parse_credit(line, key, value)?,
            ),
            "burst" => put(&mut self.burst, line, key, parse_burst(line, key, value)?),
            "weight" => {
                let w = parse_int(line, key, value, "a whole number of at least 1")?;
                if w == 0 || w > u64::from(u32::MAX) {
                    return Err(range(
                        line,
                        key,
                        alloc::format!("weight {w}; must be 1 to {}", u32::MAX),
                    ));
                }
                put(
                    &mut self.weight,
                    line,
                    key,
                    u32::try_from(w).unwrap_or(u32::MAX),
                )
            }
            "cap" => {
                let ppm = parse_percent(line, key, value)?;
                if ppm == 0 || ppm > PPM {
                    return Err(range(
                        line,
                        key,
                        "a cap must be above 0% and at most 100%".to_string(),
                    ));
                }
                put(&mut self.cap, line, key, ppm)
            }
            "cpu" => {
                let n = parse_int(line, key, value, "a physical CPU number")?;
                let cpu = u32::try_from(n)
                    .map_err(|_| range(line, key, alloc::format!("CPU {n} does not exist")))?;
                put(&mut self.cpu, line, key, cpu)
            }
            "volume" => {
                self.volumes.push(volume::parse_volume(line, value)?);
                Ok(())
            }
            _ => Err(err(line, key, ErrorKind::UnknownField)),
        }
    }

    fn finish(self) -> Result<VmConfig, ConfigError> {
        let missing = |field: &str| err(self.line, field, ErrorKind::Missing);
        let (_, image) = self.image.clone().ok_or_else(|| missing("image"))?;
        let (_, memory_bytes) = self.memory.ok_or_else(|| missing("memory"))?;
        let (baseline_line, baseline) = self.baseline.ok_or_else(|| missing("baseline"))?;
        let vcpus = self.vcpus.map_or(1, |(_, n)| n);
        if memory_bytes
            < MIN_MEMORY
                .max(crate::loader::IMAGE_MIN + u64::from(vcpus) * crate::loader::STACK_PER_VCPU)
        {
            let line = self.memory.map_or(self.line, |(l, _)| l);
            return Err(range(
                line,
                "memory",
                alloc::format!("{memory_bytes} bytes is too small for {vcpus} vCPUs"),
            ));
        }

        let (budget_ns, period_ns, period_line) = match (baseline, self.period) {
            (Baseline::Budget { .. }, Some((line, _))) => {
                return Err(err(
                    line,
                    "period",
                    ErrorKind::Conflict("the baseline already names its period (budget/period)"),
                ));
            }
            (
                Baseline::Budget {
                    budget_ns,
                    period_ns,
                },
                None,
            ) => (budget_ns, period_ns, baseline_line),
            (Baseline::Percent { ppm }, period) => {
                let (line, period_ns) = period.unwrap_or((baseline_line, DEFAULT_PERIOD_NS));
                let budget =
                    u64::try_from(u128::from(period_ns) * u128::from(ppm) / u128::from(PPM))
                        .unwrap_or(u64::MAX);
                (budget, period_ns, line)
            }
        };
        if !(MIN_PERIOD_NS..=MAX_PERIOD_NS).contains(&period_ns) {
            let field = if self.period.is_some() {
                "period"
            } else {
                "baseline"
            };
            return Err(range(
                period_line,
                field,
                alloc::format!(
                    "period {period_ns} ns outside [{MIN_PERIOD_NS}, {MAX_PERIOD_NS}] ns"
                ),
            ));
        }
        if budget_ns == 0 || budget_ns > period_ns {
            return Err(range(
                baseline_line,
                "baseline",
                alloc::format!(
                    "budget {budget_ns} ns must be above 0 and at most the period {period_ns} ns"
                ),
            ));
        }
        let accrual_ns = self.accrual.map_or(budget_ns, |(_, v)| v);
        // Default cap: 24 hours of accrual (the scheduler's default too).
        let default_cap = accrual_ns.saturating_mul(86_400_000_000_000 / period_ns);
        let balance_cap_ns = self.balance_cap.map_or(default_cap, |(_, v)| v);
        let launch_balance_ns = self.launch_balance.map_or(0, |(_, v)| v);
        if launch_balance_ns > balance_cap_ns {
            let line = self.launch_balance.map_or(self.line, |(l, _)| l);
            return Err(range(
                line,
                "launch_balance",
                alloc::format!(
                    "{launch_balance_ns} ns is above the balance cap of {balance_cap_ns} ns"
                ),
            ));
        }
        let mut sched = SchedSpec {
            budget_ns,
            period_ns,
            accrual_ns,
            balance_cap_ns,
            launch_balance_ns,
            burst: self.burst.map_or(Burst::Standard, |(_, b)| b),
            weight: self.weight.map_or(DEFAULT_WEIGHT, |(_, w)| w),
            cap_ppm: None,
        };
        if let Some((line, cap)) = self.cap {
            if cap < sched.baseline_ppm() {
                return Err(range(
                    line,
                    "cap",
                    alloc::format!(
                        "cap {cap} ppm is below the baseline of {} ppm",
                        sched.baseline_ppm()
                    ),
                ));
            }
            sched.cap_ppm = Some(u32::try_from(cap).unwrap_or(u32::MAX));
        }
        volume::check_vm(&self.volumes, memory_bytes)?;
        Ok(VmConfig {
            name: self.name,
            line: self.line,
            image,
            memory_bytes,
            vcpus,
            args: self.args.map(|(_, a)| a).unwrap_or_default(),
            sched,
            cpu: self.cpu.map(|(_, c)| c),
            volumes: self.volumes,
        })
    }
}

/// A decimal number `int[.frac]` scaled by `unit / 10^frac_digits`, exactly; None if it does not parse, is not
/// a whole multiple of the smallest unit, or overflows.
fn scaled_decimal(text: &str, unit: u64) -> Option<u64> {
    let (int, frac) = text.split_once('.').unwrap_or((text, ""));
    if int.is_empty()
        || int.len() > 20
        || frac.len() > 9
        || !int.bytes().chain(frac.bytes()).all(|b| b.is_ascii_digit())
    {
        return None;
    }
    if text.contains('.') && frac.is_empty() {
        return None;
    }
    let mut mantissa: u128 = 0;
    for b in int.bytes().chain(frac.bytes()) {
        mantissa = mantissa
            .checked_mul(10)?
            .checked_add(u128::from(b - b'0'))?;
    }
    let scale = 10u128.pow(u32::try_from(frac.len()).ok()?);
    let value = mantissa.checked_mul(u128::from(unit))?;
    if value % scale != 0 {
        return None;
    }
    u64::try_from(value / scale).ok()
}

fn split_unit(text: &str) -> (&str, &str) {
    let at = text
        .find(|c: char| !(c.is_ascii_digit() || c == '.'))
        .unwrap_or(text.len());
    (&text[..at], text[at..].trim())
}

fn parse_int(
    line: usize,
    field: &str,
    value: &str,
    expected: &'static str,
) -> Result<u64, ConfigError> {
    value
        .parse::<u64>()
        .map_err(|_| invalid(line, field, expected, value))
}

fn parse_duration(line: usize, field: &str, value: &str) -> Result<u64, ConfigError> {
    const EXPECTED: &str = "a duration like 10ms (units ns, us, ms, s)";
    let (number, unit) = split_unit(value);
    let unit = match unit {
        "ns" => 1,
        "us" => 1_000,
        "ms" => 1_000_000,
        "s" => 1_000_000_000,
        _ => return Err(invalid(line, field, EXPECTED, value)),
    };
    scaled_decimal(number, unit).ok_or_else(|| invalid(line, field, EXPECTED, value))
}

/// A credit amount: CPU time (`5ms`) or credits (`2credits`, `0.5 credits`; one credit is 60 s of CPU).
fn parse_credit(line: usize, field: &str, value: &str) -> Result<u64, ConfigError> {
    const EXPECTED: &str = "CPU time like 5ms, or credits like 2credits (1 credit = 60 s), or 0";
    if value == "0" {
        return Ok(0);
    }
    let (number, unit) = split_unit(value);
    if unit == "credit" || unit == "credits" {
        return scaled_decimal(number, CREDIT_NS)
            .ok_or_else(|| invalid(line, field, EXPECTED, value));
    }
    parse_duration(line, field, value).map_err(|_| invalid(line, field, EXPECTED, value))
}

fn parse_percent(line: usize, field: &str, value: &str) -> Result<u64, ConfigError> {
    const EXPECTED: &str = "a percentage like 12.5%";
    let number = value
        .strip_suffix('%')
        .map(str::trim_end)
        .ok_or_else(|| invalid(line, field, EXPECTED, value))?;
    // 1% = 10_000 ppm; up to four decimals are exact.
    scaled_decimal(number, 10_000).ok_or_else(|| invalid(line, field, EXPECTED, value))
}

fn parse_memory(line: usize, field: &str, value: &str) -> Result<u64, ConfigError> {
    const EXPECTED: &str = "a size like 16M (units K, M, G, optionally KiB, MiB, GiB)";
    let (number, unit) = split_unit(value);
    let unit = match unit {
        "K" | "KiB" => 1 << 10,
        "M" | "MiB" => 1 << 20,
        "G" | "GiB" => 1 << 30,
        _ => return Err(invalid(line, field, EXPECTED, value)),
    };
    let bytes =
        scaled_decimal(number, unit).ok_or_else(|| invalid(line, field, EXPECTED, value))?;
    if bytes % 4096 != 0 || bytes > MAX_MEM {
        return Err(range(
            line,
            field,
            alloc::format!("{bytes} bytes; memory must be a multiple of 4 KiB and at most 4 GiB"),
        ));
    }
    Ok(bytes)
}

fn parse_baseline(line: usize, field: &str, value: &str) -> Result<Baseline, ConfigError> {
    if value.ends_with('%') {
        let ppm = parse_percent(line, field, value)?;
        if ppm == 0 || ppm > PPM {
            return Err(range(
                line,
                field,
                "a baseline must be above 0% and at most 100%".to_string(),
            ));
        }
        return Ok(Baseline::Percent { ppm });
    }
    let Some((budget, period)) = value.split_once('/') else {
        return Err(invalid(
            line,
            field,
            "a percentage like 20% or budget/period like 2ms/10ms",
            value,
        ));
    };
    Ok(Baseline::Budget {
        budget_ns: parse_duration(line, field, budget.trim())?,
        period_ns: parse_duration(line, field, period.trim())?,
    })
}

fn parse_burst(line: usize, field: &str, value: &str) -> Result<Burst, ConfigError> {
    const EXPECTED: &str =
        "`standard` or `unlimited <overdraft>` (overdraft as CPU time or credits)";
    let mut words = value.splitn(2, char::is_whitespace);
    match (words.next(), words.next()) {
        (Some("standard"), None) => Ok(Burst::Standard),
        (Some("unlimited"), Some(limit)) => {
            let overdraft_ns = parse_credit(line, field, limit.trim())
                .map_err(|_| invalid(line, field, EXPECTED, value))?;
            Ok(Burst::Unlimited { overdraft_ns })
        }
        _ => Err(invalid(line, field, EXPECTED, value)),
    }
}

#[cfg(test)]
mod tests;
pub mod volume;
#[cfg(test)]
mod volume_tests;

pub use volume::{
    BurstSpec, Overage, Rate, VolumeSpec, DEFAULT_VOLUME_WEIGHT, DEFAULT_WINDOW_BASE, MAX_VOLUMES,
    WINDOW_BYTES,
};
