//! Guests' virtio-blk volumes end to end (issue 7, tests 1-5 with real guests): QEMU TCG `-cpu EPYC`, two CPUs,
//! an emulated NVMe controller, and `io` guests (guests/src/bin/io.rs) driving their volumes through virtio-mmio,
//! the MMIO decoder, the kernel's I/O service and the `sched::iops` partitioner.
//!
//! 1. `partitioned_volumes_with_integrity_and_a_runtime_change` (one boot): the kernel calibrates the device's
//!    capacity C with the driver alone (`CV:IOCAL`, the raw figure); three `io` VMs have volumes committed at 40 %,
//!    20 % and 10 % of C. A floods (queue depth 32, no rate); B arrives at 2x its commitment and C at 1.5x. For every
//!    closed partitioner window after 2 s of warm-up (`CV:IOWIN`), every volume whose arrivals reached its
//!    commitment got >= 95 % of it, and the total is >= 90 % of C (the exact ratio is printed). B's commitment rises
//!    to 25 % of C at t = 5 s through `io::set_commitment` (the volume's `iops_change=` hook, `CV:IOCHANGE`); the
//!    first window that starts after the change must honour the new commitment. Every pattern the guests wrote
//!    and read back verified (`IO_VERIFY_FAIL` = 0, no `IO_ERR`); each guest's own count of completions trails the
//!    hypervisor's by no more than its report period (and the per-second medians are printed side by side); the
//!    per-request hypervisor overhead is printed from `CV:IOSUM`.
//! 2. `injected_media_error_fails_only_the_affected_requests`: QEMU's `blkdebug` fails every read of disk sector
//!    4096; VM `victim`'s small volume covers that sector, VM `bystander`'s does not. The victim's guest sees IOERR
//!    on some reads and no verification failure, the bystander sees no error at all, both keep running, and the
//!    hypervisor logs the failed request and finishes the run. In the same boot VM `quitter` stops (its guest gives
//!    up) with requests still queued in the partitioner: they complete into nothing (`discarded` in `CV:IOSUM`), its
//!    volume is detached, and nobody else notices.
//! 3. `a_volume_refused_by_admission_control_refuses_its_vm_only`: commitments of 10 % and 75 % of C exceed the
//!    committable 80 %: the second VM is refused (`CV:VMREFUSED` naming its volume's line and the partitioner's
//!    numbers) and the first runs (docs/vm-config.md: a VM whose volume cannot be honoured does not start).
//!
//! Windows in which the hypervisor itself did not run for 20 ms or more (`CV:IOWIN stall_us=`: every CPU's run loop
//! silent at once, which under TCG means the loaded host did not schedule the emulator; measured up to 90 ms on
//! this 2-core machine at load 8-10) are printed and not judged; at least three judged windows must remain.
//!
//! The disk is throttled (`throttling.iops-total`) for test 1: under TCG the request path through guest, exits
//! and hypervisor costs more emulated CPU per request than QEMU's unthrottled disk, which would make C a CPU
//! figure rather than a device one (the issue 7 notes). Both boots take the same lock so they never compete for
//! the two cores with each other.

mod common;

use std::collections::BTreeMap;
use std::time::Duration;

use common::{assert_pass, boot_volumes, must, setup};
use qemu_tests::marker::Marker;
use qemu_tests::run::Report;
use qemu_tests::suite::{Artefacts, Family};
use qemu_tests::volumes::{
    counter, field, last_vm_lines, of_kind, Disk, VolumeBoot, Windows, IO_ERR, IO_IOPS, IO_OK,
    IO_VERIFY_FAIL,
};

const TIMEOUT: Duration = Duration::from_secs(150);
/// Device throttle for the partitioning boot (IOPS).
const THROTTLE_IOPS: u64 = 4_000;
/// Windows after the first (partial) one that are warm-up.
const WARMUP_WINDOWS: u64 = 2;
/// A gap in the hypervisor's run loops this long (us) means the host did not run the emulator (see the test).
const STALL_US: u64 = 20_000;

/// Boots the `io` guest with `conf` as `vms.conf` on the NVMe drive `disk`; the boot must pass.
fn run(a: &Artefacts, name: &str, conf: &str, disk: Disk, run_ms: u64) -> Report {
    let report = run_any(a, name, conf, disk, run_ms);
    assert_pass(&report);
    report
}

/// As [`run`], whatever the verdict.
fn run_any(a: &Artefacts, name: &str, conf: &str, disk: Disk, run_ms: u64) -> Report {
    let files = VolumeBoot {
        disk: Some(disk),
        ..VolumeBoot::io(conf)
    };
    boot_volumes(
        a,
        name,
        &files,
        &format!("run_ms={run_ms} exit=emu"),
        TIMEOUT,
    )
    .0
}

fn markers<'a>(report: &'a Report, kind: &'a str) -> impl Iterator<Item = &'a Marker> + 'a {
    of_kind(&report.markers, kind)
}

fn num(m: &Marker, key: &str) -> u64 {
    must(field(m, key))
}

/// The last `CV:VM` line of each VM.
fn final_vms(report: &Report) -> BTreeMap<String, Marker> {
    last_vm_lines(&report.markers)
}

/// The guests' data checks: every VM's guest completed requests, verified everything it read back, and (unless
/// `errors_ok`) saw no I/O error. Each guest's string port input check passed too (`io: ins check ok`: `REP INSB`
/// from its COM1 scratch register stored into its memory by the hypervisor's exit handling).
fn check_guests(report: &Report, vms: &[&str], errors_ok: &[&str]) {
    let serial = std::fs::read_to_string(&report.serial_log).expect("read the serial log");
    for vm in vms {
        assert!(
            serial.contains(&format!("{vm}: io: ins check ok")),
            "{vm}: no 'io: ins check ok' line (INS emulation)"
        );
    }
    let last = final_vms(report);
    for vm in vms {
        let m = last
            .get(*vm)
            .unwrap_or_else(|| panic!("no CV:VM line for {vm}"));
        assert_eq!(
            m.get("state"),
            Some("running"),
            "{vm} did not keep running: {}",
            m.line
        );
        let (ok, err, bad) = (
            counter(m, IO_OK),
            counter(m, IO_ERR),
            counter(m, IO_VERIFY_FAIL),
        );
        println!("[cv-figure] {vm}: guest ok={ok} io_err={err} verify_fail={bad}");
        assert!(ok > 0, "{vm}: its guest completed no request: {}", m.line);
        assert_eq!(
            bad, 0,
            "{vm}: read-back differed from what was written: {}",
            m.line
        );
        if !errors_ok.contains(vm) {
            assert_eq!(err, 0, "{vm}: unexpected I/O errors: {}", m.line);
        }
    }
}

#[test]
fn partitioned_volumes_with_integrity_and_a_runtime_change() {
    let Some(a) = setup(Family::Qemu) else { return };
    // Volumes of 8 MiB at 0, 16 and 32 MiB. B arrives at 2x its first commitment (1.6x its raised one) and C at
    // 1.5x, taking C = the throttle; the check below only judges a window against a volume's commitment where its
    // arrivals reached it.
    let (b_rate, c_rate) = (THROTTLE_IOPS * 4 / 10, THROTTLE_IOPS * 15 / 100);
    let conf = format!(
        "
[vm vol-a]
image = io
memory = 8M
baseline = 20%
cpu = 1
args = depth=32 iops=0 read_pct=50 seed=1 poll_us=50
volume = size=8M offset=0 iops=40%

[vm vol-b]
image = io
memory = 8M
baseline = 20%
cpu = 0
args = depth=16 iops={b_rate} read_pct=50 seed=2 poll_us=50
volume = size=8M offset=16M iops=20% iops_change=5s:25%

[vm vol-c]
image = io
memory = 8M
baseline = 20%
cpu = 0
args = depth=16 iops={c_rate} read_pct=50 seed=3 poll_us=50
volume = size=8M offset=32M iops=10%
"
    );
    let disk = Disk {
        throttle_iops: Some(THROTTLE_IOPS),
        ..Disk::zeroed()
    };
    let report = run(&a, "qemu-blk-partitioned", &conf, disk, 10_000);
    let cal = markers(&report, "IOCAL").next().expect("CV:IOCAL");
    let cap = num(cal, "capacity");
    assert!(cap > 0, "calibration failed: {}", cal.line);
    println!(
        "[cv-figure] raw driver capacity C = {cap} IOPS (QD32, 4 KiB, best of three; {})",
        cal.line
    );

    // Windows by index: vm -> (committed, completed, arrived); the largest gap in the hypervisor's run loops per
    // window (`stall_us`, see io::service::note_gap).
    let all = must(Windows::from_markers(&report.markers));
    let mut windows: BTreeMap<u64, BTreeMap<String, (u64, u64, u64)>> = BTreeMap::new();
    for (vm, wins) in &all.by_vm {
        for (&w, v) in wins {
            windows
                .entry(w)
                .or_default()
                .insert(vm.clone(), (v.committed, v.completed, v.arrived));
        }
    }
    let stalls = &all.stall_us;
    let first = *windows.keys().next().expect("no CV:IOWIN window closed");
    // The first window is partial (it started before the VMs); two more are warm-up.
    let judged: Vec<u64> = windows
        .keys()
        .copied()
        .filter(|&w| w > first + WARMUP_WINDOWS)
        .filter(|w| {
            // A window in which no CPU ran the hypervisor for STALL_US measures the host, not the partitioner:
            // every vCPU overran its slice at once, which only happens when the emulator itself is not run.
            let stall = stalls.get(w).copied().unwrap_or(0);
            if stall >= STALL_US {
                println!(
                    "[cv-figure] window {w} not judged: the hypervisor did not run for {} ms (host starvation of the emulator)",
                    stall / 1000
                );
            }
            stall < STALL_US
        })
        .collect();
    assert!(
        judged.len() >= 3,
        "only {} windows after warm-up",
        judged.len()
    );
    let change = markers(&report, "IOCHANGE").next().expect("CV:IOCHANGE");
    assert!(
        change.get("refused").is_none(),
        "change refused: {}",
        change.line
    );
    let new_commit = num(change, "committed");
    // The first window whose commitment (at its end) is the new one is the transition window; B must honour the
    // new commitment from the next one on.
    let transition = windows
        .iter()
        .find(|(_, v)| v.get("vol-b").is_some_and(|&(c, _, _)| c == new_commit))
        .map(|(&w, _)| w)
        .expect("no window with B's new commitment");
    println!("[cv-figure] window  A(commit/done)  B(commit/done)  C(commit/done)  total/C");
    let mut worst_total = f64::MAX;
    let mut failures = Vec::new();
    let mut honoured_after_change = 0;
    for w in &judged {
        let v = &windows[w];
        let mut total = 0;
        let mut row = format!("[cv-figure] {w:>6}");
        for vm in ["vol-a", "vol-b", "vol-c"] {
            let Some(&(commit, done, arrived)) = v.get(vm) else {
                failures.push(format!("window {w}: no report for {vm}"));
                continue;
            };
            total += done;
            row.push_str(&format!("  {commit:>5}/{done:<5}"));
            if vm == "vol-b" && *w == transition {
                continue;
            }
            let ratio = done as f64 / commit.max(1) as f64;
            if arrived >= commit && ratio < 0.95 {
                failures.push(format!(
                    "window {w}: {vm} got {done} of its {commit} IOPS commitment ({:.1} %) with {arrived} arrivals",
                    ratio * 100.0
                ));
            }
            if vm == "vol-b" && *w > transition && commit == new_commit && ratio >= 0.95 {
                honoured_after_change += 1;
            }
        }
        let t = total as f64 / cap as f64;
        worst_total = worst_total.min(t);
        row.push_str(&format!("  {:.3}", t));
        println!("{row}");
        if t < 0.90 {
            failures.push(format!(
                "window {w}: total {total} IOPS is {:.1} % of C = {cap}",
                t * 100.0
            ));
        }
    }
    println!("[cv-figure] worst window total/C = {worst_total:.4}; B's commitment -> {new_commit} IOPS in window {transition}");
    if let Some(sum) = markers(&report, "IOSUM").next() {
        let per = num(sum, "exits_per_req_x100") as f64 / 100.0;
        println!(
            "[cv-figure] hypervisor overhead: {per:.2} MMIO exits per request, {} ns of hypervisor CPU per request (device model, partitioner, driver, copies); {}",
            num(sum, "ovh_ns_per_req"),
            sum.line
        );
    }
    if let Some(s) = markers(&report, "VMSUM").next() {
        println!("[cv-figure] run: {}", s.line);
    }
    check_guests(&report, &["vol-a", "vol-b", "vol-c"], &[]);
    // The guests' own count (IO_IOPS, each second of guest TSC) must tell the same story as the partitioner's
    // windows: medians over the judged period within 10 %.
    for vm in ["vol-a", "vol-b", "vol-c"] {
        let median = |mut v: Vec<u64>| {
            v.sort_unstable();
            v.get(v.len() / 2).copied().unwrap_or(0)
        };
        let hv = median(
            judged
                .iter()
                .filter_map(|w| windows[w].get(vm))
                .map(|&(_, d, _)| d)
                .collect(),
        );
        let lines: Vec<u64> = markers(&report, "VM")
            .filter(|m| m.get("name") == Some(vm))
            .map(|m| counter(m, IO_IOPS))
            .collect();
        let guest = median(lines[lines.len().saturating_sub(judged.len())..].to_vec());
        println!("[cv-figure] {vm}: median IOPS by the partitioner {hv}, by the guest {guest}");
        // Whole run: the hypervisor counts a completion when it writes it, the guest when it sees it and reports
        // once a second, so the guest's count trails by at most about a second of I/O plus its queue depth.
        let io = markers(&report, "IOVOL")
            .find(|m| m.get("vm") == Some(vm))
            .expect("CV:IOVOL");
        let last = &final_vms(&report)[vm];
        let seen = counter(last, IO_OK) + counter(last, IO_ERR);
        let written = num(io, "completed");
        let second = lines.iter().copied().max().unwrap_or(0);
        println!("[cv-figure] {vm}: {written} completions written by the hypervisor, {seen} seen by the guest");
        assert!(
            seen <= written && written - seen <= 2 * second + 64,
            "{vm}: the guest saw {seen} completions, the hypervisor wrote {written} (a second is {second})"
        );
    }
    assert!(
        judged.iter().any(|&w| w > transition),
        "no judged window after the change (transition window {transition})"
    );
    assert!(
        honoured_after_change > 0,
        "B never honoured its new commitment {new_commit} after window {transition}"
    );
    assert!(failures.is_empty(), "{}", failures.join("\n"));
}

#[test]
fn injected_media_error_fails_only_the_affected_requests() {
    let Some(a) = setup(Family::Qemu) else { return };
    let dir = a.workdir.join("qemu-blk-faults");
    std::fs::create_dir_all(&dir).expect("work directory");
    let rules = dir.join("blkdebug.conf");
    // Every read touching disk sector 4096 (byte 2 MiB) fails with EIO.
    std::fs::write(
        &rules,
        "[inject-error]\nevent = \"read_aio\"\nerrno = \"5\"\nsector = \"4096\"\n",
    )
    .expect("write the blkdebug rules");
    // The victim's 128 KiB volume (32 units of 4 KiB) starts 64 KiB below the bad sector; the bystander's is far.
    let conf = "
[vm victim]
image = io
memory = 8M
baseline = 20%
args = depth=4 iops=400 read_pct=70 seed=7 poll_us=100
volume = size=128K offset=1984K

[vm bystander]
image = io
memory = 8M
baseline = 20%
args = depth=4 iops=400 read_pct=70 seed=8 poll_us=100
volume = size=4M offset=8M

# 128 KiB requests cost 32 I/Os each: at a limit of 1 IOPS the second waits 32 s in the partitioner, so the guest
# gives up (stall) and exits with requests in flight.
[vm quitter]
image = io
memory = 8M
baseline = 20%
args = depth=4 bytes=131072 read_pct=0 seed=9 stall_s=2
volume = size=1M offset=16M limit=1iops
";
    let disk = Disk {
        blkdebug: Some(rules),
        ..Disk::zeroed()
    };
    let report = run(&a, "qemu-blk-faults", conf, disk, 5_000);
    check_guests(&report, &["victim", "bystander"], &["victim"]);
    let victim = &final_vms(&report)["victim"];
    let err = counter(victim, IO_ERR);
    println!(
        "[cv-figure] victim: {err} reads failed with IOERR, {} requests ok",
        counter(victim, IO_OK)
    );
    assert!(
        err > 0,
        "the victim never read the bad sector: {}",
        victim.line
    );
    let sum = markers(&report, "IOVOL")
        .find(|m| m.get("vm") == Some("victim"))
        .expect("CV:IOVOL for the victim");
    assert!(
        num(sum, "failed") > 0,
        "the hypervisor counted no failed request: {}",
        sum.line
    );
    // The quitter stopped with requests in flight: they completed into nothing (no guest memory touched after
    // its detach), its volume let go of the device, and the others were not affected (checked above).
    let stop = markers(&report, "VMSTOP")
        .find(|m| m.get("name") == Some("quitter"))
        .expect("the quitter never stopped");
    println!("[cv-figure] {}", stop.line);
    let io = markers(&report, "IOSUM").next().expect("CV:IOSUM");
    assert!(
        num(io, "discarded") > 0,
        "no request of the stopped VM was retired: {}",
        io.line
    );
    let q = markers(&report, "IOVOL")
        .find(|m| m.get("vm") == Some("quitter"))
        .expect("CV:IOVOL for the quitter");
    assert_eq!(q.get("attached"), Some("0"), "{}", q.line);
    assert_eq!(
        markers(&report, "VMSTOP").count(),
        1,
        "only the quitter stops"
    );
}

#[test]
fn a_volume_refused_by_admission_control_refuses_its_vm_only() {
    let Some(a) = setup(Family::Qemu) else { return };
    // 10 % + 75 % of C is above the 80 % the partitioner lets be committed: the second VM must not start, with the
    // partitioner's numbers in its refusal, and the first must run normally.
    let conf = "
[vm modest]
image = io
memory = 8M
baseline = 20%
args = depth=4 iops=200 seed=5 poll_us=200
volume = size=1M iops=10%

[vm greedy]
image = io
memory = 8M
baseline = 20%
args = depth=4 iops=200 seed=6 poll_us=200
volume = size=1M offset=1M iops=75%
";
    // A refused VM makes the run report `CV:DONE status=fail` (not every configured VM started); the kernel
    // must still finish the run cleanly.
    let report = run_any(&a, "qemu-blk-admission", conf, Disk::zeroed(), 3_000);
    assert!(
        markers(&report, "DONE").any(|m| m.get("status") == Some("fail")),
        "the run did not end with CV:DONE status=fail: {}",
        report.details()
    );
    assert!(
        markers(&report, "PANIC").next().is_none()
            && markers(&report, "EXCEPTION").next().is_none(),
        "{}",
        report.details()
    );
    let refused: Vec<&Marker> = markers(&report, "VMREFUSED").collect();
    assert_eq!(refused.len(), 1, "expected one refusal: {refused:?}");
    let reason = refused[0].get("reason").unwrap_or("");
    println!("[cv-figure] refusal: {}", refused[0].line);
    assert_eq!(refused[0].get("name"), Some("greedy"));
    assert!(
        reason.contains("line 14") && reason.contains("committable") && reason.contains("capacity"),
        "the refusal should name the volume's line and the partitioner's numbers: {reason}"
    );
    assert!(!final_vms(&report).contains_key("greedy"));
    check_guests(&report, &["modest"], &[]);
}
