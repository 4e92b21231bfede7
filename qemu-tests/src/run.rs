//! Running one emulator boot to a verdict.
//!
//! Design: the emulator writes the serial console into a file; [`run`] tails that file, optionally
//! echoes it to standard output, feeds complete lines to a [`Judge`], and stops the emulator the
//! moment a terminal marker arrives, the emulator exits, the hard timeout expires, or the caller's
//! stop flag is raised (Ctrl-C in `cargo xtask run`). The loop polls the file every few milliseconds
//! while it is idle; it never sleeps to *decide* anything.
//!
//! Invariants: the emulator runs in its own process group (a terminal Ctrl-C reaches only the harness,
//! which then stops it) and is always killed and reaped before [`run`] returns, on every path.

use std::fs::{self, File};
use std::io::{Read, Write};
use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant};

use crate::emulator::{Bochs, Qemu, Serial};
use crate::judge::{End, Expect, Judge, Verdict};
use crate::marker::Marker;
use crate::HarnessError;

const POLL: Duration = Duration::from_millis(10);
/// Serial lines shown when a run fails.
pub const TAIL_LINES: usize = 40;

/// The emulator and machine to boot.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Emulator {
    /// QEMU (TCG).
    Qemu(Qemu),
    /// Bochs.
    Bochs(Bochs),
}

/// How to run.
#[derive(Debug)]
pub struct RunOptions<'a> {
    /// Short name for messages, e.g. `qemu-q35-smp2-kernel`.
    pub name: String,
    /// Directory for the serial log and emulator files (created; previous files overwritten).
    pub workdir: PathBuf,
    /// Hard limit on the whole run.
    pub timeout: Duration,
    /// Echo the serial console to standard output as it arrives.
    pub echo: bool,
    /// Raised by the caller to stop the run (e.g. from a Ctrl-C handler).
    pub stop: Option<&'a AtomicBool>,
}

/// The result of one run.
#[derive(Debug)]
pub struct Report {
    /// The run's name.
    pub name: String,
    /// The decision.
    pub verdict: Verdict,
    /// How the run ended.
    pub end: End,
    /// Wall time from spawning the emulator to the verdict.
    pub elapsed: Duration,
    /// The captured serial console.
    pub serial_log: PathBuf,
    /// The emulator's own stdout/stderr.
    pub emulator_output: PathBuf,
    /// Bochs's log file (Bochs runs only).
    pub bochs_log: Option<PathBuf>,
    /// Every marker seen.
    pub markers: Vec<Marker>,
}

impl Report {
    /// The verdict plus, for a failure, the tail of the serial log, the emulator's output and the
    /// VM-entry / panic lines of `bochs.log`.
    #[must_use]
    pub fn details(&self) -> String {
        let mut s = format!(
            "{}: run ended after {:.1} s ({:?}): {}\n",
            self.name,
            self.elapsed.as_secs_f64(),
            self.end,
            self.verdict
        );
        if self.verdict.is_pass() {
            return s;
        }
        s.push_str(&format!(
            "--- last {TAIL_LINES} serial lines ({}) ---\n",
            self.serial_log.display()
        ));
        s.push_str(&tail(&self.serial_log, TAIL_LINES));
        let out = tail(&self.emulator_output, 15);
        if !out.trim().is_empty() {
            s.push_str(&format!(
                "--- emulator output ({}) ---\n{out}",
                self.emulator_output.display()
            ));
        }
        if let Some(log) = &self.bochs_log {
            let text = fs::read(log)
                .map(|b| String::from_utf8_lossy(&b).into_owned())
                .unwrap_or_default();
            let hits: Vec<&str> = text
                .lines()
                .filter(|l| {
                    // Bochs reports its normal `exit=emu` shutdown as a "panic": not news.
                    !l.contains("Shutdown port")
                        && (l.contains("VMENTER")
                            || l.contains("VMFAIL")
                            || l.contains("PANIC")
                            || l.contains("FATAL")
                            || l.contains("triple fault"))
                })
                .collect();
            let start = hits.len().saturating_sub(20);
            s.push_str(&format!(
                "--- VMENTER/panic lines of {} ({} found) ---\n",
                log.display(),
                hits.len()
            ));
            for l in &hits[start..] {
                s.push_str(l);
                s.push('\n');
            }
        }
        s
    }
}

/// The last `n` lines of a file (lossy UTF-8), or a note that it cannot be read.
#[must_use]
pub fn tail(path: &Path, n: usize) -> String {
    match fs::read(path) {
        Ok(bytes) => {
            let text = String::from_utf8_lossy(&bytes);
            let lines: Vec<&str> = text.lines().collect();
            let start = lines.len().saturating_sub(n);
            let mut out = lines[start..].join("\n");
            out.push('\n');
            out
        }
        Err(e) => format!("(cannot read {}: {e})\n", path.display()),
    }
}

/// Boots `emulator`, streams and judges its serial console against `expect`, and stops it as soon
/// as the verdict is known.
///
/// # Errors
/// The work directory cannot be prepared or the emulator cannot be started (not installed, missing
/// firmware or image). A boot that goes wrong is not an error: it is a [`Verdict::Fail`].
pub fn run(
    emulator: &Emulator,
    expect: &Expect,
    opts: &RunOptions<'_>,
) -> Result<Report, HarnessError> {
    fs::create_dir_all(&opts.workdir).map_err(|e| HarnessError::io(&opts.workdir, e))?;
    let workdir =
        fs::canonicalize(&opts.workdir).map_err(|e| HarnessError::io(&opts.workdir, e))?;
    let serial_log = workdir.join("serial.log");
    let emulator_output = workdir.join("emulator.out");
    // Create the serial file first so tailing can start at once; the emulator truncates it.
    File::create(&serial_log).map_err(|e| HarnessError::io(&serial_log, e))?;
    let (mut command, program, bochs_log) = match emulator {
        Emulator::Qemu(q) => (
            q.command(&Serial::File(serial_log.clone()))?,
            "qemu-system-x86_64",
            None,
        ),
        Emulator::Bochs(b) => {
            let log = workdir.join("bochs.log");
            (b.command(&workdir, &serial_log, &log)?, "bochs", Some(log))
        }
    };
    let out = File::create(&emulator_output).map_err(|e| HarnessError::io(&emulator_output, e))?;
    let err = out
        .try_clone()
        .map_err(|e| HarnessError::io(&emulator_output, e))?;
    command
        .stdin(Stdio::null())
        .stdout(out)
        .stderr(err)
        .process_group(0);
    let started = Instant::now();
    let mut child = command.spawn().map_err(|e| HarnessError::Spawn {
        program: program.into(),
        source: e,
    })?;
    let result = supervise(&mut child, &serial_log, opts, started);
    stop_emulator(&mut child);
    let (judge, end) = result?;
    let verdict = judge.finish(&end, expect);
    Ok(Report {
        name: opts.name.clone(),
        verdict,
        end,
        elapsed: started.elapsed(),
        serial_log,
        emulator_output,
        bochs_log,
        markers: judge.markers().to_vec(),
    })
}

/// Whatever happened, the emulator does not outlive the run. It leads its own process group, so the
/// group is signalled too (a wrapper script's children go with it) — but only while the child is
/// still unreaped, so its id cannot have been reused.
fn stop_emulator(child: &mut Child) {
    if let Ok(None) = child.try_wait() {
        let _ = Command::new("kill")
            .args(["-KILL", "--", &format!("-{}", child.id())])
            .stderr(Stdio::null())
            .status();
        let _ = child.kill();
    }
    let _ = child.wait();
}

fn supervise(
    child: &mut Child,
    serial_log: &Path,
    opts: &RunOptions<'_>,
    started: Instant,
) -> Result<(Judge, End), HarnessError> {
    let mut file = File::open(serial_log).map_err(|e| HarnessError::io(serial_log, e))?;
    let mut judge = Judge::new();
    let mut pending: Vec<u8> = Vec::new();
    let mut buf = vec![0u8; 64 * 1024];
    let mut stdout = std::io::stdout();
    loop {
        let n = file
            .read(&mut buf)
            .map_err(|e| HarnessError::io(serial_log, e))?;
        if n > 0 {
            if opts.echo {
                let _ = stdout.write_all(&buf[..n]);
                let _ = stdout.flush();
            }
            pending.extend_from_slice(&buf[..n]);
            while let Some(pos) = pending.iter().position(|&b| b == b'\n') {
                let line: Vec<u8> = pending.drain(..=pos).collect();
                if judge.feed(&String::from_utf8_lossy(&line)).is_some() {
                    return Ok((judge, End::Terminal));
                }
            }
            continue;
        }
        if let Some(status) = child
            .try_wait()
            .map_err(|e| HarnessError::io(Path::new("emulator"), e))?
        {
            // Drain what the emulator wrote just before exiting, including a last unterminated line.
            let mut rest = Vec::new();
            let _ = file.read_to_end(&mut rest);
            if opts.echo {
                let _ = stdout.write_all(&rest);
            }
            pending.extend_from_slice(&rest);
            for line in String::from_utf8_lossy(&pending).lines() {
                if judge.feed(line).is_some() {
                    return Ok((judge, End::Terminal));
                }
            }
            return Ok((judge, End::Exited(status.code())));
        }
        if opts.stop.is_some_and(|s| s.load(Ordering::Relaxed)) {
            return Ok((judge, End::Stopped));
        }
        if started.elapsed() >= opts.timeout {
            return Ok((judge, End::Timeout(opts.timeout)));
        }
        std::thread::sleep(POLL);
    }
}
