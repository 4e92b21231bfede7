//! Kernel command line (docs/console.md): space-separated `key=value` words.
//!
//! Design: parsing is pure and never fails; anything it does not understand becomes a [`Warning`] that the boot
//! path logs once the logger is up, and the setting keeps its default. The first word is skipped when it has no
//! `=`: QEMU and GRUB put the kernel's path there.

use bitflags::bitflags;
use log::LevelFilter;

bitflags! {
    /// Self-tests selected by `selftest=`.
    #[derive(Clone, Copy, Debug, PartialEq, Eq)]
    pub struct SelfTests: u32 {
        /// Physical frame allocator.
        const FRAMES = 1 << 0;
        /// Kernel heap.
        const HEAP = 1 << 1;
        /// Kernel page tables.
        const PAGING = 1 << 2;
        /// LAPIC one-shot and TSC-deadline timers.
        const TIMER = 1 << 3;
        /// All CPUs online and answering IPIs.
        const SMP = 1 << 4;
        /// ACPI tables, MADT and IOAPICs.
        const ACPI = 1 << 5;
        /// Boot-information parsers against garbled structures.
        const BOOTINFO = 1 << 8;
        /// Destructive: forced panic.
        const PANIC = 1 << 6;
        /// Destructive: forced page fault.
        const PAGEFAULT = 1 << 7;
        /// NVMe bring-up, pattern write/read-back and QD1/QD32 calibration. Overwrites the first 64 KiB of the
        /// first namespace, so only on request (not part of `all`).
        const NVME = 1 << 16;
        /// NVMe under the IOPS partitioner: calibration, three committed volumes, a run-time commitment change
        /// (about 7 s of read traffic; not part of `all`).
        const NVME_IOPS = 1 << 17;
        /// NVMe media errors injected by QEMU blkdebug at sector 4096 reach the requester; needs that setup.
        const NVME_FAULTS = 1 << 18;
        /// virtio-blk devices routed through the IOPS partitioner to NVMe, with a malicious chain (opt-in).
        const VIRTIO_BLK = 1 << 19;
        /// VMX backend bring-up: a tiny EPT guest, every exit kind decoded, the exit round trip measured.
        const VMX = 1 << 9;
        /// SVM backend bring-up: a tiny NPT guest, every exit kind decoded, preemption, the exit round trip measured.
        const SVM = 1 << 10;
    }
}

impl SelfTests {
    /// What `selftest=all` selects: every non-destructive test.
    pub const ALL_SAFE: Self = Self::FRAMES
        .union(Self::HEAP)
        .union(Self::PAGING)
        .union(Self::TIMER)
        .union(Self::SMP)
        .union(Self::ACPI)
        .union(Self::BOOTINFO)
        .union(Self::VMX)
        .union(Self::SVM);

    /// Test names in run order, as used on the command line and in `CV:TEST name=`.
    pub const NAMES: [(&'static str, Self); 15] = [
        ("frames", Self::FRAMES),
        ("heap", Self::HEAP),
        ("paging", Self::PAGING),
        ("timer", Self::TIMER),
        ("smp", Self::SMP),
        ("acpi", Self::ACPI),
        ("bootinfo", Self::BOOTINFO),
        ("vmx", Self::VMX),
        ("svm", Self::SVM),
        ("nvme", Self::NVME),
        ("nvme-iops", Self::NVME_IOPS),
        ("nvme-faults", Self::NVME_FAULTS),
        ("virtio-blk", Self::VIRTIO_BLK),
        ("panic", Self::PANIC),
        ("pagefault", Self::PAGEFAULT),
    ];
}

/// What the kernel does once boot (and self-tests) are over.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum ExitMode {
    /// Idle all CPUs.
    Halt,
    /// Shut the emulator down (QEMU isa-debug-exit, Bochs "Shutdown" port).
    Emu,
}

/// Settings from the command line.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Config {
    /// Console log level.
    pub log: LevelFilter,
    /// Self-tests to run after boot.
    pub selftests: SelfTests,
    /// Behaviour after boot.
    pub exit: ExitMode,
    /// Run the VMs for this many milliseconds, then report and stop (`run_ms=`); `None` = run forever.
    pub run_ms: Option<u64>,
    /// Management channel on COM2 (`mgmt=com2`; docs/console.md).
    pub mgmt: bool,
    /// Telemetry period of the management channel in ms (`mgmt_telemetry_ms=`, 0 = off until the agent sets it).
    pub mgmt_telemetry_ms: u32,
}

impl Default for Config {
    fn default() -> Self {
        Self {
            log: LevelFilter::Info,
            selftests: SelfTests::empty(),
            exit: ExitMode::Halt,
            run_ms: None,
            mgmt: false,
            mgmt_telemetry_ms: DEFAULT_MGMT_TELEMETRY_MS,
        }
    }
}

/// Default telemetry period of the management channel, ms.
pub const DEFAULT_MGMT_TELEMETRY_MS: u32 = 1000;
/// Accepted range of `mgmt_telemetry_ms=` besides 0 (off).
pub const MGMT_TELEMETRY_MS_RANGE: core::ops::RangeInclusive<u32> = 50..=60_000;

/// Something on the command line that was ignored.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Warning<'a> {
    /// A key this kernel does not know (or a word without `=`).
    UnknownKey(&'a str),
    /// A known key with a value it does not accept.
    BadValue { key: &'a str, value: &'a str },
}

/// Most warnings kept; further ones are dropped (the count is still reported).
pub const MAX_WARNINGS: usize = 8;

/// Parse result: the settings and what was ignored.
#[derive(Debug)]
pub struct Parsed<'a> {
    /// Effective settings.
    pub config: Config,
    /// Ignored words (first [`MAX_WARNINGS`]).
    pub warnings: heapless::Vec<Warning<'a>, MAX_WARNINGS>,
    /// Total number of ignored words.
    pub ignored: usize,
}

/// Parses a command line.
pub fn parse(cmdline: &str) -> Parsed<'_> {
    let mut parsed = Parsed {
        config: Config::default(),
        warnings: heapless::Vec::new(),
        ignored: 0,
    };
    for (index, word) in cmdline.split_ascii_whitespace().enumerate() {
        let Some((key, value)) = word.split_once('=') else {
            if index != 0 {
                parsed.warn(Warning::UnknownKey(word));
            }
            continue;
        };
        let ok = match key {
            "log" => parse_level(value).map(|l| parsed.config.log = l).is_some(),
            "selftest" => parse_tests(value)
                .map(|t| parsed.config.selftests = t)
                .is_some(),
            "exit" => match value {
                "halt" => {
                    parsed.config.exit = ExitMode::Halt;
                    true
                }
                "emu" => {
                    parsed.config.exit = ExitMode::Emu;
                    true
                }
                _ => false,
            },
            "run_ms" => value
                .parse::<u64>()
                .ok()
                .filter(|&ms| ms > 0)
                .map(|ms| parsed.config.run_ms = Some(ms))
                .is_some(),
            "mgmt" => match value {
                "com2" => {
                    parsed.config.mgmt = true;
                    true
                }
                "off" => {
                    parsed.config.mgmt = false;
                    true
                }
                _ => false,
            },
            "mgmt_telemetry_ms" => value
                .parse::<u32>()
                .ok()
                .filter(|ms| *ms == 0 || MGMT_TELEMETRY_MS_RANGE.contains(ms))
                .map(|ms| parsed.config.mgmt_telemetry_ms = ms)
                .is_some(),
            _ => {
                parsed.warn(Warning::UnknownKey(key));
                continue;
            }
        };
        if !ok {
            parsed.warn(Warning::BadValue { key, value });
        }
    }
    parsed
}

impl<'a> Parsed<'a> {
    fn warn(&mut self, w: Warning<'a>) {
        self.ignored += 1;
        // Beyond MAX_WARNINGS only the count is kept.
        let _ = self.warnings.push(w);
    }
}

fn parse_level(value: &str) -> Option<LevelFilter> {
    Some(match value {
        "error" => LevelFilter::Error,
        "warn" => LevelFilter::Warn,
        "info" => LevelFilter::Info,
        "debug" => LevelFilter::Debug,
        "trace" => LevelFilter::Trace,
        _ => return None,
    })
}

/// `all` or a comma list of names; any unknown name rejects the whole value.
fn parse_tests(value: &str) -> Option<SelfTests> {
    let mut tests = SelfTests::empty();
    for name in value.split(',').filter(|n| !n.is_empty()) {
        if name == "all" {
            tests |= SelfTests::ALL_SAFE;
            continue;
        }
        let (_, t) = SelfTests::NAMES.iter().find(|(n, _)| *n == name)?;
        tests |= *t;
    }
    Some(tests)
}
