//! Volume policies end to end (issue 7 leftovers), run by `io` guests (guests/src/bin/io.rs) on QEMU TCG
//! `-cpu EPYC`, two CPUs and an emulated NVMe controller.
//!
//! `read_only_volume_fails_every_write_and_serves_reads`: the disk image is filled with a known pattern before
//! the boot. VM `ro-writer` has a `readonly` volume and is told to ignore `VIRTIO_BLK_F_RO` and write
//! (`ro_writes=1 read_pct=0`): every one of its requests must complete with IOERR (guest: `ok = 0`, `err > 0`).
//! VM `ro-reader` has a `readonly` volume and behaves: the device announces `VIRTIO_BLK_F_RO`, its guest switches
//! to reads only, and every read succeeds. VM `rw-control` writes and verifies a writable volume. After the run
//! the image holds the pattern, byte for byte, over both read-only volumes, and no longer holds it over the
//! writable one (so writes do reach the disk, and the check is not vacuous); every VM is still running at the end.
//!
//! The burst bucket and the overage policies are checked on the partitioner itself in
//! `sched/tests/iops_policies.rs` (same configurations); their emulator version is not here yet: on this shared
//! host (load 20) the boots stalled for up to 670 ms per window and calibration failed once, so no window was
//! judgeable.
//!
//! Helpers: the boot and counter helpers here parallel the private ones of blk.rs (owned elsewhere); they differ
//! in the disk (pre-filled with a pattern here) and are kept local until both files can share a module.

mod common;

use std::path::PathBuf;
use std::time::Duration;

use common::{assert_pass, boot, direct, setup};
use qemu_tests::emulator::{Machine, Qemu};
use qemu_tests::judge::{Expect, VirtExpect};
use qemu_tests::marker::Marker;
use qemu_tests::run::{Emulator, Report};
use qemu_tests::suite::{workspace_root, Artefacts, Family};

const TIMEOUT: Duration = Duration::from_secs(120);
/// Disk image size.
const DISK_BYTES: u64 = 64 << 20;

/// Guest counters (docs/guest-abi.md, `io` guest).
const IO_OK: u32 = 9;
const IO_ERR: u32 = 10;
const IO_VERIFY_FAIL: u32 = 11;

fn guest_dir() -> PathBuf {
    std::env::var_os("CV_GUEST_DIR").map_or_else(
        || workspace_root().join("target/x86_64-unknown-none/release"),
        PathBuf::from,
    )
}

/// The byte the pre-filled disk holds at `offset` (a pattern no guest writes: the `io` guest stamps sector
/// numbers and seeds into its blocks).
fn pattern(offset: u64) -> u8 {
    let x = offset.wrapping_mul(0x9E37_79B9_7F4A_7C15).rotate_left(17);
    x.to_be_bytes()[0] ^ 0xA5
}

/// Boots the `io` guest image with `conf` as `vms.conf` on a 64 MiB NVMe disk (pre-filled with [`pattern`] when
/// `prefill`); the boot must pass. Returns the report and the disk image's path.
fn run(a: &Artefacts, name: &str, conf: &str, prefill: bool, run_ms: u64) -> (Report, PathBuf) {
    let work = a.workdir.join(name);
    std::fs::create_dir_all(&work).expect("work directory");
    let conf_path = work.join("vms.conf");
    std::fs::write(&conf_path, conf).expect("write vms.conf");
    let disk = work.join("nvme.img");
    if prefill {
        let bytes: Vec<u8> = (0..DISK_BYTES).map(pattern).collect();
        std::fs::write(&disk, bytes).expect("write the disk image");
    } else {
        let file = std::fs::File::create(&disk).expect("create the disk image");
        file.set_len(DISK_BYTES).expect("size the disk image");
    }
    let io = guest_dir().join("io");
    assert!(
        io.exists(),
        "{} missing: build the guests (`cargo xtask build`)",
        io.display()
    );
    let mut q = Qemu::epyc(
        Machine::Q35,
        2,
        direct(a, &format!("run_ms={run_ms} exit=emu")),
    );
    q.extra_args = vec![
        "-initrd".into(),
        format!("{} io,{} vms.conf", io.display(), conf_path.display()),
        "-drive".into(),
        format!("file={},if=none,id=nv0,format=raw", disk.display()),
        "-device".into(),
        "nvme,serial=cv0,drive=nv0".into(),
    ];
    let expect = Expect {
        cpus: 2,
        virt: VirtExpect::svm_npt(),
        selftests: Vec::new(),
    };
    let report = boot(a, name, Emulator::Qemu(q), &expect, TIMEOUT);
    assert_pass(&report);
    (report, disk)
}

fn markers<'a>(report: &'a Report, kind: &'a str) -> impl Iterator<Item = &'a Marker> + 'a {
    report.markers.iter().filter(move |m| m.kind == kind)
}

/// The last `CV:VM` line of `vm`, which must say it is still running.
fn running(report: &Report, vm: &str) -> Marker {
    let m = markers(report, "VM")
        .filter(|m| m.get("name") == Some(vm))
        .last()
        .unwrap_or_else(|| panic!("no CV:VM line for {vm}"))
        .clone();
    assert_eq!(
        m.get("state"),
        Some("running"),
        "{vm} did not keep running: {}",
        m.line
    );
    m
}

/// A guest counter from a `CV:VM` line, 0 when never reported.
fn counter(m: &Marker, key: u32) -> u64 {
    m.get_u64(&format!("c{key}")).unwrap_or(0)
}

#[test]
fn read_only_volume_fails_every_write_and_serves_reads() {
    let Some(a) = setup(Family::Qemu) else { return };
    // 1 MiB volumes at 0 (read-only, written to anyway), 1 MiB (read-only, read) and 2 MiB (writable).
    let conf = "
[vm ro-writer]
image = io
memory = 8M
baseline = 20%
args = depth=4 iops=400 read_pct=0 ro_writes=1 seed=21 poll_us=100
volume = size=1M offset=0 readonly

[vm ro-reader]
image = io
memory = 8M
baseline = 20%
args = depth=4 iops=400 seed=22 poll_us=100
volume = size=1M offset=1M readonly

[vm rw-control]
image = io
memory = 8M
baseline = 20%
args = depth=4 iops=400 read_pct=50 seed=23 poll_us=100
volume = size=1M offset=2M
";
    let (report, disk) = run(&a, "qemu-blk-readonly", conf, true, 4_000);
    let serial = std::fs::read_to_string(&report.serial_log).expect("read the serial log");
    // The device announced VIRTIO_BLK_F_RO to both read-only guests (each logs what it saw).
    assert!(
        serial.contains("ro-writer: io: the volume is read-only (VIRTIO_BLK_F_RO); ro_writes=1"),
        "ro-writer's guest did not see VIRTIO_BLK_F_RO"
    );
    assert!(
        serial.contains("ro-reader: io: the volume is read-only: reads only"),
        "ro-reader's guest did not see VIRTIO_BLK_F_RO"
    );
    assert!(
        !serial.contains("rw-control: io: the volume is read-only"),
        "the writable volume was announced read-only"
    );
    let writer = running(&report, "ro-writer");
    let reader = running(&report, "ro-reader");
    let control = running(&report, "rw-control");
    for (vm, m) in [
        ("ro-writer", &writer),
        ("ro-reader", &reader),
        ("rw-control", &control),
    ] {
        println!(
            "[cv-figure] {vm}: ok={} io_err={} verify_fail={}",
            counter(m, IO_OK),
            counter(m, IO_ERR),
            counter(m, IO_VERIFY_FAIL)
        );
    }
    // Every request of the writer is a write: all of them must fail, none may succeed.
    assert!(
        counter(&writer, IO_ERR) >= 100,
        "too few writes refused: {}",
        writer.line
    );
    assert_eq!(
        counter(&writer, IO_OK),
        0,
        "a write to a read-only volume succeeded: {}",
        writer.line
    );
    assert!(
        counter(&reader, IO_OK) >= 100 && counter(&reader, IO_ERR) == 0,
        "reads of a read-only volume failed: {}",
        reader.line
    );
    assert!(
        counter(&control, IO_OK) >= 100
            && counter(&control, IO_ERR) == 0
            && counter(&control, IO_VERIFY_FAIL) == 0,
        "the writable control volume misbehaved: {}",
        control.line
    );
    if let Some(io) = markers(&report, "IOVOL").find(|m| m.get("vm") == Some("ro-writer")) {
        println!("[cv-figure] {}", io.line);
    }
    // The disk, after QEMU exited: the read-only ranges still hold the pattern byte for byte.
    let image = std::fs::read(&disk).expect("read the disk image back");
    let differs = |range: std::ops::Range<u64>| {
        range
            .clone()
            .filter(|&o| image[usize::try_from(o).expect("offset")] != pattern(o))
            .count()
    };
    let mib = 1u64 << 20;
    assert_eq!(
        differs(0..2 * mib),
        0,
        "bytes of a read-only volume changed on disk"
    );
    let written = differs(2 * mib..3 * mib);
    println!("[cv-figure] disk: read-only ranges unchanged (2 MiB); {written} bytes of the writable 1 MiB rewritten");
    assert!(
        written > 0,
        "the control VM's writes never reached the disk, so the check above proves nothing"
    );
}
