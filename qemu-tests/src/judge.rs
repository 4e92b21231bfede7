//! Deciding a boot from its `CV:` markers.
//!
//! Design: a [`Judge`] is fed serial lines as they arrive. It records every marker, and reports as soon
//! as a *terminal* marker (`CV:DONE`, `CV:PANIC`, `CV:EXCEPTION`, `CV:FATAL`) is seen, so the runner can
//! stop the emulator at once instead of waiting for a timeout. When the run ends (terminal marker,
//! emulator exit or hard timeout) [`Judge::finish`] compares what was seen with an [`Expect`] describing
//! a healthy boot and gives a [`Verdict`].
//!
//! Invariants: a verdict is `Pass` only if the run ended on `CV:DONE status=pass` and every expectation
//! holds; any panic, exception, fatal marker, failed or missing self-test, garbled marker, timeout or
//! early emulator exit makes it `Fail`, and the failure reasons quote the kernel's own marker line.

use std::fmt;
use std::time::Duration;

use crate::marker::{parse_line, Marker};

/// Markers after which the kernel stops: the verdict is known.
pub const TERMINAL_MARKERS: [&str; 4] = ["DONE", "PANIC", "EXCEPTION", "FATAL"];

/// The non-destructive self-tests that `selftest=all` runs (docs/console.md).
pub const ALL_SELFTESTS: [&str; 6] = ["frames", "heap", "paging", "timer", "smp", "acpi"];

/// The virtualisation report a boot must produce.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct VirtExpect {
    /// `vmx`, `svm` or `none`.
    pub vendor: &'static str,
    /// Fields of the `CV:VIRT` marker that must have exactly these values.
    pub fields: Vec<(&'static str, &'static str)>,
}

impl VirtExpect {
    /// Intel VMX with EPT, VPID, unrestricted guest and the preemption timer (Bochs `corei7_skylake_x`).
    #[must_use]
    pub fn vmx_full() -> Self {
        Self {
            vendor: "vmx",
            fields: vec![
                ("ept", "1"),
                ("vpid", "1"),
                ("unrestricted", "1"),
                ("preemption_timer", "1"),
            ],
        }
    }

    /// AMD SVM with nested paging (QEMU TCG `-cpu EPYC`, Bochs `ryzen`).
    #[must_use]
    pub fn svm_npt() -> Self {
        Self {
            vendor: "svm",
            fields: vec![("npt", "1")],
        }
    }
}

/// What a healthy boot looks like.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Expect {
    /// Number of CPUs the machine has; `CV:SMP online` and `expected` must both equal it.
    pub cpus: u64,
    /// The `CV:VIRT` report.
    pub virt: VirtExpect,
    /// Self-tests that must each report `result=pass`.
    pub selftests: Vec<&'static str>,
}

impl Expect {
    /// A boot with `selftest=all` on `cpus` CPUs reporting `virt`.
    #[must_use]
    pub fn selftest_all(cpus: u64, virt: VirtExpect) -> Self {
        Self {
            cpus,
            virt,
            selftests: ALL_SELFTESTS.to_vec(),
        }
    }
}

/// How a run ended.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum End {
    /// A terminal marker was seen (the emulator was then stopped by the runner).
    Terminal,
    /// The emulator exited on its own before any terminal marker; the status if it had one.
    Exited(Option<i32>),
    /// The hard timeout expired.
    Timeout(Duration),
    /// The caller stopped the run (Ctrl-C in `cargo xtask run`).
    Stopped,
}

/// The decision about one run.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Verdict {
    /// Every expectation held.
    Pass,
    /// At least one did not; each reason is one human-readable line.
    Fail(Vec<String>),
}

impl Verdict {
    /// True for [`Verdict::Pass`].
    #[must_use]
    pub fn is_pass(&self) -> bool {
        matches!(self, Self::Pass)
    }
}

impl fmt::Display for Verdict {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Self::Pass => f.write_str("PASS"),
            Self::Fail(reasons) => {
                f.write_str("FAIL")?;
                for r in reasons {
                    write!(f, "\n  - {r}")?;
                }
                Ok(())
            }
        }
    }
}

/// Accumulates markers of one run and decides it.
#[derive(Debug, Default)]
pub struct Judge {
    markers: Vec<Marker>,
    garbled: Vec<String>,
    terminal: Option<usize>,
}

impl Judge {
    /// A judge that has seen nothing.
    #[must_use]
    pub fn new() -> Self {
        Self::default()
    }

    /// Feeds one serial line. Returns the terminal marker when this line is the first one seen.
    pub fn feed(&mut self, line: &str) -> Option<&Marker> {
        match parse_line(line)? {
            Ok(marker) => {
                let terminal = TERMINAL_MARKERS.contains(&marker.kind.as_str());
                self.markers.push(marker);
                if terminal && self.terminal.is_none() {
                    self.terminal = Some(self.markers.len() - 1);
                    return self.markers.last();
                }
                None
            }
            Err(e) => {
                self.garbled.push(e.to_string());
                None
            }
        }
    }

    /// True once a terminal marker has been seen.
    #[must_use]
    pub fn is_decided(&self) -> bool {
        self.terminal.is_some()
    }

    /// Every marker seen so far, in order.
    #[must_use]
    pub fn markers(&self) -> &[Marker] {
        &self.markers
    }

    fn first(&self, kind: &str) -> Option<&Marker> {
        self.markers.iter().find(|m| m.kind == kind)
    }

    /// Decides the run that ended with `end` against `expect`.
    #[must_use]
    pub fn finish(&self, end: &End, expect: &Expect) -> Verdict {
        let mut why = Vec::new();
        match end {
            End::Terminal => {}
            End::Exited(status) => why.push(format!(
                "emulator exited (status {}) before a terminal CV: marker",
                status.map_or_else(|| "by signal".to_string(), |s| s.to_string())
            )),
            End::Stopped => why.push("run stopped before a terminal CV: marker".to_string()),
            End::Timeout(t) => why.push(format!(
                "no terminal CV: marker within the hard timeout of {} s (last marker: {})",
                t.as_secs(),
                self.markers.last().map_or("none", |m| m.line.as_str())
            )),
        }
        // The kernel's own failure reports come first: they are what a developer needs to read.
        for m in &self.markers {
            match m.kind.as_str() {
                "PANIC" => why.push(format!("kernel panic: {}", m.line)),
                "EXCEPTION" => why.push(format!("CPU exception: {}", m.line)),
                "FATAL" => why.push(format!("fatal boot error: {}", m.line)),
                _ => {}
            }
        }
        for g in &self.garbled {
            why.push(g.clone());
        }
        self.check_done(&mut why);
        self.check_smp(expect, &mut why);
        self.check_virt(expect, &mut why);
        self.check_banner(expect, &mut why);
        self.check_selftests(expect, &mut why);
        if why.is_empty() {
            Verdict::Pass
        } else {
            Verdict::Fail(why)
        }
    }

    fn check_done(&self, why: &mut Vec<String>) {
        match self.terminal.map(|i| &self.markers[i]) {
            Some(m) if m.kind == "DONE" => {
                if m.get("status") != Some("pass") {
                    why.push(format!("kernel reported failure: {}", m.line));
                }
            }
            Some(_) => {}
            None => why.push("no CV:DONE marker".to_string()),
        }
    }

    fn check_smp(&self, expect: &Expect, why: &mut Vec<String>) {
        match self.first("SMP") {
            None => why.push("no CV:SMP marker".to_string()),
            Some(m) => {
                let online = m.get_u64("online");
                let expected = m.get_u64("expected");
                if online != Some(expect.cpus) || expected != Some(expect.cpus) {
                    why.push(format!(
                        "expected {} CPUs online and expected, got: {}",
                        expect.cpus, m.line
                    ));
                }
            }
        }
        let mut ids: Vec<&str> = self
            .markers
            .iter()
            .filter(|m| m.kind == "CPU" && m.has_flag("online"))
            .filter_map(|m| m.get("id"))
            .collect();
        ids.sort_unstable();
        ids.dedup();
        if u64::try_from(ids.len()).ok() != Some(expect.cpus) {
            why.push(format!(
                "expected {} distinct CV:CPU reports, got {} (ids {:?})",
                expect.cpus,
                ids.len(),
                ids
            ));
        }
    }

    fn check_virt(&self, expect: &Expect, why: &mut Vec<String>) {
        let Some(m) = self.first("VIRT") else {
            why.push("no CV:VIRT marker".to_string());
            return;
        };
        if m.get("vendor") != Some(expect.virt.vendor) {
            why.push(format!(
                "expected virtualisation vendor={}, got: {}",
                expect.virt.vendor, m.line
            ));
            return;
        }
        for (key, value) in &expect.virt.fields {
            if m.get(key) != Some(value) {
                why.push(format!("expected {key}={value} in: {}", m.line));
            }
        }
    }

    fn check_banner(&self, expect: &Expect, why: &mut Vec<String>) {
        let Some(m) = self.first("BANNER") else {
            why.push("no CV:BANNER marker".to_string());
            return;
        };
        if m.get_u64("cpus") != Some(expect.cpus) {
            why.push(format!(
                "banner CPU count is not {}: {}",
                expect.cpus, m.line
            ));
        }
        if m.get("virt") != Some(expect.virt.vendor) {
            why.push(format!(
                "banner virt is not {}: {}",
                expect.virt.vendor, m.line
            ));
        }
        if m.get_u64("mem_mib").is_none_or(|mib| mib == 0) {
            why.push(format!("banner reports no memory: {}", m.line));
        }
    }

    fn check_selftests(&self, expect: &Expect, why: &mut Vec<String>) {
        let tests: Vec<&Marker> = self.markers.iter().filter(|m| m.kind == "TEST").collect();
        for t in &tests {
            if t.get("result") != Some("pass") {
                why.push(format!("self-test failed: {}", t.line));
            }
        }
        for name in &expect.selftests {
            if !tests.iter().any(|t| t.get("name") == Some(name)) {
                why.push(format!("self-test {name} did not report"));
            }
        }
        // The `vmx` and `svm` self-tests pass with a "skipped: ..." detail on the other vendor's machines; on the
        // vendor this boot expects, a skip would prove nothing, so it counts as a failure.
        let own = expect.virt.vendor;
        for t in &tests {
            if t.get("name") == Some(own)
                && t.get("detail").is_some_and(|d| d.starts_with("skipped"))
            {
                why.push(format!(
                    "self-test {own} skipped on a {own} machine: {}",
                    t.line
                ));
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const HEALTHY_SVM_2: &str = "\
[    0.000000] INFO  cpu0 boot: Creditvisor starting
CV:BOOT loader=multiboot1 firmware=bios cmdline=\"selftest=all exit=emu\"
CV:MEM usable_mib=500 free_frames=120000
CV:ACPI cpus=2 ioapics=1
CV:CPU id=0 apic=0 online
CV:CPU id=1 apic=1 online
CV:SMP online=2 expected=2
CV:VIRT vendor=svm npt=1 nrips=0 asids=16
CV:BANNER version=0.1.0 cpus=2 mem_mib=511 virt=svm
Creditvisor 0.1.0: 2 CPUs, 511 MiB, AMD-V with nested paging
CV:TEST name=frames result=pass detail=\"ok\"
CV:TEST name=heap result=pass detail=\"ok\"
CV:TEST name=paging result=pass detail=\"ok\"
CV:TEST name=timer result=pass detail=\"ok\"
CV:TEST name=smp result=pass detail=\"ok\"
CV:TEST name=acpi result=pass detail=\"ok\"
CV:DONE status=pass
";

    fn judge(log: &str) -> (Judge, bool) {
        let mut j = Judge::new();
        let mut decided_at_end = false;
        for line in log.lines() {
            if j.feed(line).is_some() {
                decided_at_end = true;
            }
        }
        (j, decided_at_end)
    }

    fn expect2() -> Expect {
        Expect::selftest_all(2, VirtExpect::svm_npt())
    }

    fn reasons(v: Verdict) -> Vec<String> {
        match v {
            Verdict::Pass => panic!("expected a failure"),
            Verdict::Fail(r) => r,
        }
    }

    #[test]
    fn healthy_boot_passes() {
        let (j, decided) = judge(HEALTHY_SVM_2);
        assert!(decided);
        assert_eq!(j.finish(&End::Terminal, &expect2()), Verdict::Pass);
    }

    #[test]
    fn terminal_marker_is_reported_once() {
        let mut j = Judge::new();
        assert!(j.feed("CV:BOOT loader=multiboot2").is_none());
        assert!(!j.is_decided());
        assert_eq!(
            j.feed("CV:DONE status=pass").map(|m| m.kind.clone()),
            Some("DONE".into())
        );
        assert!(j.is_decided());
        assert!(j.feed("CV:DONE status=pass").is_none());
    }

    #[test]
    fn panic_fails_and_quotes_the_kernel() {
        let log = "CV:BOOT loader=multiboot1\nCV:PANIC cpu=0 location=kernel/src/selftest.rs:10 message=\"forced panic\"\n";
        let (j, decided) = judge(log);
        assert!(decided);
        let r = reasons(j.finish(&End::Terminal, &expect2()));
        assert!(r[0].contains("CV:PANIC cpu=0"), "{r:?}");
        assert!(r[0].contains("forced panic"));
    }

    #[test]
    fn exception_fails_and_quotes_the_kernel() {
        let log = "CV:EXCEPTION cpu=1 vector=14 name=#PF error=0x2 rip=0x1000 cr2=0xdead0000\n";
        let (j, _) = judge(log);
        let r = reasons(j.finish(&End::Terminal, &expect2()));
        assert!(
            r.iter().any(|x| x.contains("CV:EXCEPTION cpu=1 vector=14")),
            "{r:?}"
        );
    }

    #[test]
    fn wrong_cpu_count_fails() {
        let log = HEALTHY_SVM_2.replace("CV:SMP online=2", "CV:SMP online=1");
        let (j, _) = judge(&log);
        let r = reasons(j.finish(&End::Terminal, &expect2()));
        assert!(r.iter().any(|x| x.contains("online=1")), "{r:?}");
    }

    #[test]
    fn wrong_virt_fails() {
        let (j, _) = judge(HEALTHY_SVM_2);
        let r = reasons(j.finish(
            &End::Terminal,
            &Expect::selftest_all(2, VirtExpect::vmx_full()),
        ));
        assert!(r.iter().any(|x| x.contains("vendor=vmx")), "{r:?}");
        let log = HEALTHY_SVM_2.replace("npt=1", "npt=0");
        let (j, _) = judge(&log);
        let r = reasons(j.finish(&End::Terminal, &expect2()));
        assert!(r.iter().any(|x| x.contains("npt=1")), "{r:?}");
    }

    #[test]
    fn failed_or_missing_selftest_fails() {
        let log = HEALTHY_SVM_2.replace(
            "name=heap result=pass detail=\"ok\"",
            "name=heap result=fail detail=\"alloc returned null\"",
        );
        let (j, _) = judge(&log);
        let r = reasons(j.finish(&End::Terminal, &expect2()));
        assert!(r.iter().any(|x| x.contains("alloc returned null")), "{r:?}");
        let log = HEALTHY_SVM_2.replace("CV:TEST name=acpi result=pass detail=\"ok\"\n", "");
        let (j, _) = judge(&log);
        let r = reasons(j.finish(&End::Terminal, &expect2()));
        assert_eq!(r, vec!["self-test acpi did not report".to_string()]);
    }

    #[test]
    fn own_vendor_backend_test_may_not_skip() {
        let with = |line: &str| HEALTHY_SVM_2.replace("CV:DONE", &format!("{line}\nCV:DONE"));
        let other = with("CV:TEST name=vmx result=pass detail=\"skipped: no vmx\"");
        let (j, _) = judge(&other);
        assert_eq!(j.finish(&End::Terminal, &expect2()), Verdict::Pass);
        let own = with("CV:TEST name=svm result=pass detail=\"skipped: not an SVM machine\"");
        let (j, _) = judge(&own);
        let r = reasons(j.finish(&End::Terminal, &expect2()));
        assert!(
            r.iter().any(|x| x.contains("svm skipped on a svm machine")),
            "{r:?}"
        );
    }

    #[test]
    fn done_fail_fails() {
        let log = HEALTHY_SVM_2.replace("CV:DONE status=pass", "CV:DONE status=fail");
        let (j, _) = judge(&log);
        let r = reasons(j.finish(&End::Terminal, &expect2()));
        assert!(r.iter().any(|x| x.contains("CV:DONE status=fail")), "{r:?}");
    }

    #[test]
    fn timeout_and_early_exit_fail() {
        let log = HEALTHY_SVM_2.replace("CV:DONE status=pass\n", "");
        let (j, decided) = judge(&log);
        assert!(!decided);
        let r = reasons(j.finish(&End::Timeout(Duration::from_secs(9)), &expect2()));
        assert!(r[0].contains("9 s"), "{r:?}");
        assert!(r[0].contains("CV:TEST name=smp") || r[0].contains("CV:TEST name=acpi"));
        let r = reasons(j.finish(&End::Exited(Some(1)), &expect2()));
        assert!(r[0].contains("status 1"), "{r:?}");
    }

    #[test]
    fn garbled_marker_fails() {
        let log = HEALTHY_SVM_2.replace("CV:MEM usable_mib=500", "CV:MEM =500");
        let (j, _) = judge(&log);
        let r = reasons(j.finish(&End::Terminal, &expect2()));
        assert!(r.iter().any(|x| x.contains("malformed")), "{r:?}");
    }
}
