//! What the emulator tests of guest volumes share (tests/blk.rs, tests/blk_policy.rs, tests/mgmt.rs): the boot
//! modules and `vms.conf` handed to the kernel, the NVMe disk image and its QEMU drive, and the reading of the
//! markers the I/O service prints (`CV:VM` guest counters, `CV:IOWIN` partitioner windows, docs/console.md).
//!
//! Design: a [`VolumeBoot`] describes the boot's files (guest images as boot modules, the `vms.conf` text, an
//! optional disk and how it is filled and throttled); [`VolumeBoot::prepare`] writes them into the test's work
//! directory and returns the QEMU arguments, so each test still chooses its own kernel command line, machine and
//! supervision (a plain boot, or one with the management channel). The marker readers take the markers of a
//! finished run and return values or [`HarnessError::Config`] naming the offending line: the tests turn those into
//! assertion failures, the library never panics.
//!
//! Invariants: a prepared disk image is exactly [`DISK_BYTES`] long and, with [`Fill::Pattern`], byte `o` holds
//! [`pattern`]`(o)`; the drive is always `id=nv0` behind `-device nvme,serial=cv0` (the kernel finds one NVMe
//! controller); window tables hold one entry per (volume, window) as the kernel printed it, the last line winning.

use std::collections::BTreeMap;
use std::io::Write as _;
use std::path::{Path, PathBuf};

use crate::judge::{Expect, VirtExpect};
use crate::marker::Marker;
use crate::suite::workspace_root;
use crate::HarnessError;

/// Size of every test disk image (64 MiB: room for a few 8 MiB volumes at distinct offsets).
pub const DISK_BYTES: u64 = 64 << 20;

/// `io` guest counters reported in `CV:VM` lines as `c<N>=` (docs/guest-abi.md): completions in the last second
/// of guest time, completed requests, requests that failed with IOERR, and read-backs that differed.
pub const IO_IOPS: u32 = 8;
/// See [`IO_IOPS`].
pub const IO_OK: u32 = 9;
/// See [`IO_IOPS`].
pub const IO_ERR: u32 = 10;
/// See [`IO_IOPS`].
pub const IO_VERIFY_FAIL: u32 = 11;

/// Directory of the built guest images (`CV_GUEST_DIR`, else the workspace's release output).
#[must_use]
pub fn guest_dir() -> PathBuf {
    std::env::var_os("CV_GUEST_DIR").map_or_else(
        || workspace_root().join("target/x86_64-unknown-none/release"),
        PathBuf::from,
    )
}

/// The built guest image `name`.
///
/// # Errors
/// [`HarnessError::MissingFile`] when it was not built.
pub fn guest_image(name: &str) -> Result<PathBuf, HarnessError> {
    let path = guest_dir().join(name);
    if path.exists() {
        Ok(path)
    } else {
        Err(HarnessError::MissingFile {
            path,
            hint: "build the guests (`cargo xtask build`)",
        })
    }
}

/// The byte a [`Fill::Pattern`] disk holds at `offset`: a pattern no guest writes (the `io` guest stamps sector
/// numbers and seeds into its blocks), so an unchanged byte was never written.
#[must_use]
pub fn pattern(offset: u64) -> u8 {
    let x = offset.wrapping_mul(0x9E37_79B9_7F4A_7C15).rotate_left(17);
    x.to_be_bytes()[0] ^ 0xA5
}

/// How a fresh disk image is filled.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Fill {
    /// Zeros (a sparse file).
    Zeros,
    /// [`pattern`], byte by byte.
    Pattern,
}

/// The NVMe drive of a boot: a fresh image of [`DISK_BYTES`] in the work directory.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Disk {
    /// How the image is filled.
    pub fill: Fill,
    /// QEMU's `throttling.iops-total` for the drive, so C is a device figure and not an emulated-CPU one.
    pub throttle_iops: Option<u64>,
    /// A `blkdebug` rules file to put in front of the image (fault injection).
    pub blkdebug: Option<PathBuf>,
}

impl Disk {
    /// A zero-filled, unthrottled disk.
    #[must_use]
    pub fn zeroed() -> Self {
        Self {
            fill: Fill::Zeros,
            throttle_iops: None,
            blkdebug: None,
        }
    }
}

/// The files of a boot with volume guests (see the module documentation).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct VolumeBoot {
    /// Boot modules before `vms.conf`: (guest image name, module name).
    pub modules: Vec<(String, String)>,
    /// The `vms.conf` text.
    pub conf: String,
    /// The NVMe drive, if any.
    pub disk: Option<Disk>,
}

/// What [`VolumeBoot::prepare`] wrote and the QEMU arguments that use it.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Prepared {
    /// `-initrd` with the modules and `vms.conf`, then the drive and its NVMe controller when there is a disk.
    pub args: Vec<String>,
    /// The disk image, if any.
    pub disk: Option<PathBuf>,
}

impl VolumeBoot {
    /// `io` guests described by `conf`, on a zero-filled, unthrottled disk.
    #[must_use]
    pub fn io(conf: &str) -> Self {
        Self {
            modules: vec![("io".into(), "io".into())],
            conf: conf.into(),
            disk: Some(Disk::zeroed()),
        }
    }

    /// Writes `vms.conf` and the disk image into `work` (created if needed) and returns the QEMU arguments.
    ///
    /// # Errors
    /// A guest image is missing, or a file cannot be written.
    pub fn prepare(&self, work: &Path) -> Result<Prepared, HarnessError> {
        std::fs::create_dir_all(work).map_err(|e| HarnessError::io(work, e))?;
        let conf = work.join("vms.conf");
        std::fs::write(&conf, &self.conf).map_err(|e| HarnessError::io(&conf, e))?;
        let mut initrd = String::new();
        for (guest, module) in &self.modules {
            initrd.push_str(&format!("{} {module},", guest_image(guest)?.display()));
        }
        initrd.push_str(&format!("{} vms.conf", conf.display()));
        let mut args = vec!["-initrd".to_string(), initrd];
        let Some(disk) = &self.disk else {
            return Ok(Prepared { args, disk: None });
        };
        let image = work.join("nvme.img");
        write_image(&image, disk.fill)?;
        let file = match &disk.blkdebug {
            Some(rules) => format!("blkdebug:{}:{}", rules.display(), image.display()),
            None => image.display().to_string(),
        };
        let throttle = disk
            .throttle_iops
            .map_or_else(String::new, |t| format!(",throttling.iops-total={t}"));
        args.extend([
            "-drive".to_string(),
            format!("file={file},if=none,id=nv0,format=raw{throttle}"),
            "-device".to_string(),
            "nvme,serial=cv0,drive=nv0".to_string(),
        ]);
        Ok(Prepared {
            args,
            disk: Some(image),
        })
    }
}

/// Creates (or truncates) the image at `path`, [`DISK_BYTES`] long, filled as `fill` says.
fn write_image(path: &Path, fill: Fill) -> Result<(), HarnessError> {
    let io = |e| HarnessError::io(path, e);
    let file = std::fs::File::create(path).map_err(io)?;
    match fill {
        Fill::Zeros => file.set_len(DISK_BYTES).map_err(io),
        Fill::Pattern => {
            let mut out = std::io::BufWriter::new(file);
            let mut chunk = vec![0u8; 1 << 20];
            let mut offset = 0u64;
            while offset < DISK_BYTES {
                for (o, b) in (offset..).zip(chunk.iter_mut()) {
                    *b = pattern(o);
                }
                out.write_all(&chunk).map_err(io)?;
                offset += 1 << 20;
            }
            out.flush().map_err(io)
        }
    }
}

/// What a healthy boot of the volume tests looks like: two CPUs, SVM with nested paging (QEMU `-cpu EPYC`).
#[must_use]
pub fn two_cpu_svm() -> Expect {
    Expect {
        cpus: 2,
        virt: VirtExpect::svm_npt(),
        selftests: Vec::new(),
    }
}

/// The markers of kind `kind` (`VM`, `IOWIN`, ...), in order.
pub fn of_kind<'a>(markers: &'a [Marker], kind: &'a str) -> impl Iterator<Item = &'a Marker> + 'a {
    markers.iter().filter(move |m| m.kind == kind)
}

/// The numeric field `key` of `m`.
///
/// # Errors
/// [`HarnessError::Config`] naming the line when the field is absent or not a number.
pub fn field(m: &Marker, key: &str) -> Result<u64, HarnessError> {
    m.get_u64(key)
        .ok_or_else(|| HarnessError::Config(format!("no numeric {key}= in {}", m.line)))
}

/// An `io` guest counter (`c<key>=`, e.g. [`IO_OK`]) of a `CV:VM` line, 0 when the guest never reported it.
#[must_use]
pub fn counter(m: &Marker, key: u32) -> u64 {
    m.get_u64(&format!("c{key}")).unwrap_or(0)
}

/// The last `CV:VM` line of each VM, by name.
#[must_use]
pub fn last_vm_lines(markers: &[Marker]) -> BTreeMap<String, Marker> {
    of_kind(markers, "VM")
        .filter_map(|m| Some((m.get("name")?.to_string(), m.clone())))
        .collect()
}

/// The last `CV:VM` line of `vm`, which must say `state=running`.
///
/// # Errors
/// [`HarnessError::Config`] when `vm` printed no `CV:VM` line or was no longer running.
pub fn still_running(markers: &[Marker], vm: &str) -> Result<Marker, HarnessError> {
    let m = of_kind(markers, "VM")
        .filter(|m| m.get("name") == Some(vm))
        .last()
        .ok_or_else(|| HarnessError::Config(format!("no CV:VM line for {vm}")))?;
    if m.get("state") == Some("running") {
        Ok(m.clone())
    } else {
        Err(HarnessError::Config(format!(
            "{vm} did not keep running: {}",
            m.line
        )))
    }
}

/// The partitioner's dispatches of one window by class (`CV:IOWIN share= burst= borrow= boost=`): above the
/// commitment, by weight, from the burst bucket, from other volumes' unused commitment, and at the boost rate.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Classes {
    /// Weight-proportional (best-effort) dispatches.
    pub share: u64,
    /// Dispatches spending burst credits.
    pub burst: u64,
    /// Dispatches borrowing unused commitment.
    pub borrow: u64,
    /// Dispatches at the boosted overage rate.
    pub boost: u64,
}

/// One volume's view of one closed partitioner window (`CV:IOWIN`).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Window {
    /// Commitment in force at the window's end (IOPS).
    pub committed: u64,
    /// I/Os completed in the window.
    pub completed: u64,
    /// Requests that arrived in the window.
    pub arrived: u64,
    /// Longest time (us) no CPU ran the hypervisor's loops while I/O was outstanding.
    pub stall_us: u64,
    /// Dispatches by class, when the kernel prints them.
    pub classes: Option<Classes>,
}

/// Every `CV:IOWIN` window of a run.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Windows {
    /// VM name -> window index -> the window.
    pub by_vm: BTreeMap<String, BTreeMap<u64, Window>>,
    /// Window index -> the largest `stall_us` any volume reported for it.
    pub stall_us: BTreeMap<u64, u64>,
}

impl Windows {
    /// Reads the `CV:IOWIN` lines of `markers`.
    ///
    /// # Errors
    /// [`HarnessError::Config`] naming a line that lacks a field.
    pub fn from_markers(markers: &[Marker]) -> Result<Self, HarnessError> {
        let mut out = Self::default();
        for m in of_kind(markers, "IOWIN") {
            let index = field(m, "window")?;
            let vm = m
                .get("vm")
                .ok_or_else(|| HarnessError::Config(format!("no vm= in {}", m.line)))?;
            let classes = match m.get("share") {
                None => None,
                Some(_) => Some(Classes {
                    share: field(m, "share")?,
                    burst: field(m, "burst")?,
                    borrow: field(m, "borrow")?,
                    boost: field(m, "boost")?,
                }),
            };
            let w = Window {
                committed: field(m, "committed")?,
                completed: field(m, "completed")?,
                arrived: field(m, "arrived")?,
                stall_us: field(m, "stall_us")?,
                classes,
            };
            let stall = out.stall_us.entry(index).or_default();
            *stall = (*stall).max(w.stall_us);
            out.by_vm
                .entry(vm.to_string())
                .or_default()
                .insert(index, w);
        }
        Ok(out)
    }

    /// The windows of `vm`.
    ///
    /// # Errors
    /// [`HarnessError::Config`] when `vm` has no window.
    pub fn of(&self, vm: &str) -> Result<&BTreeMap<u64, Window>, HarnessError> {
        self.by_vm
            .get(vm)
            .ok_or_else(|| HarnessError::Config(format!("no CV:IOWIN window of {vm}")))
    }

    /// The largest run-loop gap (us) of window `index` over all volumes, 0 when none was reported.
    #[must_use]
    pub fn stall(&self, index: u64) -> u64 {
        self.stall_us.get(&index).copied().unwrap_or(0)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::marker::parse_line;

    fn parse(lines: &[&str]) -> Vec<Marker> {
        lines
            .iter()
            .map(|l| parse_line(l).expect("a marker").expect("well formed"))
            .collect()
    }

    #[test]
    fn windows_keep_classes_and_the_largest_stall() {
        let ms = parse(&[
            "CV:IOWIN vm=a vol=0 window=3 committed=400 completed=410 arrived=500 wait_p99_us=1 service_p99_us=2 stall_us=0 share=1 burst=2 borrow=3 boost=4",
            "CV:IOWIN vm=b vol=0 window=3 committed=100 completed=90 arrived=90 wait_p99_us=1 service_p99_us=2 stall_us=25000",
        ]);
        let w = Windows::from_markers(&ms).expect("windows");
        let a = w.of("a").expect("a")[&3];
        assert_eq!(
            a.classes,
            Some(Classes {
                share: 1,
                burst: 2,
                borrow: 3,
                boost: 4
            })
        );
        assert_eq!((a.committed, a.completed, a.arrived), (400, 410, 500));
        assert_eq!(w.of("b").expect("b")[&3].classes, None);
        assert_eq!((w.stall(3), w.stall(4)), (25_000, 0));
        assert!(w.of("c").is_err());
    }

    #[test]
    fn a_window_line_without_a_field_is_an_error_naming_it() {
        let ms = parse(&["CV:IOWIN vm=a vol=0 window=3 committed=400 completed=1"]);
        let e = Windows::from_markers(&ms).expect_err("arrived= is missing");
        assert!(e.to_string().contains("arrived="), "{e}");
    }

    #[test]
    fn running_and_counters_come_from_the_last_vm_line() {
        let ms = parse(&[
            "CV:VM name=x state=running c9=5",
            "CV:VM name=x state=running c9=7 c10=1",
            "CV:VM name=y state=stopped",
        ]);
        let x = still_running(&ms, "x").expect("running");
        assert_eq!((counter(&x, IO_OK), counter(&x, IO_ERR)), (7, 1));
        assert_eq!(counter(&x, IO_VERIFY_FAIL), 0);
        assert!(still_running(&ms, "y").is_err());
        assert!(still_running(&ms, "z").is_err());
        assert_eq!(last_vm_lines(&ms).len(), 2);
    }

    #[test]
    fn prepare_writes_the_conf_the_pattern_disk_and_the_drive_arguments() {
        let work = std::env::temp_dir().join(format!("cv-volumes-test-{}", std::process::id()));
        let boot = VolumeBoot {
            modules: Vec::new(),
            conf: "[vm a]\n".into(),
            disk: Some(Disk {
                fill: Fill::Pattern,
                throttle_iops: Some(4000),
                blkdebug: Some(PathBuf::from("/r.conf")),
            }),
        };
        let p = boot.prepare(&work).expect("prepared");
        let image = std::fs::read(p.disk.as_ref().expect("disk")).expect("image");
        assert_eq!(u64::try_from(image.len()).ok(), Some(DISK_BYTES));
        assert!(image.iter().zip(0u64..).all(|(&b, o)| b == pattern(o)));
        assert_eq!(
            std::fs::read_to_string(work.join("vms.conf")).expect("conf"),
            "[vm a]\n"
        );
        assert_eq!(p.args[0], "-initrd");
        assert_eq!(
            p.args[1],
            format!("{} vms.conf", work.join("vms.conf").display())
        );
        assert_eq!(
            p.args[3],
            format!(
                "file=blkdebug:/r.conf:{},if=none,id=nv0,format=raw,throttling.iops-total=4000",
                work.join("nvme.img").display()
            )
        );
        assert_eq!(p.args[5], "nvme,serial=cv0,drive=nv0");
        let _ = std::fs::remove_dir_all(&work);
    }
}
