//! In-kernel self-tests selected by `selftest=` (docs/console.md), one `CV:TEST` line each.
//!
//! Each test exercises the real subsystem on the running machine and checks observable effects (frames distinct
//! and outside reserved memory, heap accounting restored, page-table walks, timer interrupts arriving no earlier
//! than armed, IPIs answered, MADT consistent with the running CPU). `panic` and `pagefault` are destructive: they
//! end the boot with `CV:PANIC` / `CV:EXCEPTION`, which the test harness must then report as a failure.

// Details are fixed-size strings returned once per test; boxing them would only add heap traffic to a heap test.
#![allow(clippy::result_large_err)]

use alloc::boxed::Box;
use alloc::vec::Vec;
use core::fmt::Write;
use core::sync::atomic::Ordering;

use crate::arch::x86_64::{lapic, paging, percpu, tsc};
use crate::cmdline::SelfTests;
use crate::console::Quoted;
use crate::mm::{frame, heap, PAGE_SIZE};
use crate::virt::detect::VirtSupport;

/// A test's explanation, pass or fail.
type Detail = heapless::String<160>;
type Outcome = Result<Detail, Detail>;

/// Builds a [`Detail`] (truncated if long).
macro_rules! detail {
    ($($arg:tt)*) => {{
        let mut d = Detail::new();
        // Overflowing the buffer only truncates the explanation.
        let _ = write!(d, $($arg)*);
        d
    }};
}

/// Fails the test with a formatted detail unless `cond` holds.
macro_rules! ensure {
    ($cond:expr, $($arg:tt)*) => {
        if !$cond {
            return Err(detail!($($arg)*));
        }
    };
}

/// Runs the selected tests in the documented order; true when all passed.
pub fn run(tests: SelfTests) -> bool {
    let mut all_passed = true;
    for (name, flag) in SelfTests::NAMES {
        if !tests.contains(flag) {
            continue;
        }
        let outcome = match flag {
            SelfTests::FRAMES => frames(),
            SelfTests::HEAP => heap_test(),
            SelfTests::PAGING => paging_test(),
            SelfTests::TIMER => timer(),
            SelfTests::SMP => smp(),
            SelfTests::ACPI => acpi(),
            SelfTests::BOOTINFO => crate::boot::selftest::run()
                .map(|n| detail!("{n} garbled/valid Multiboot 1 and 2 structures judged correctly"))
                .map_err(|e| detail!("{e}")),
            SelfTests::NVME => crate::io::selftest::run(),
            SelfTests::NVME_IOPS => crate::io::iops_test::run(),
            SelfTests::NVME_FAULTS => crate::io::faults_test::run(),
            SelfTests::VIRTIO_BLK => crate::io::virtio_test::run(),
            SelfTests::PANIC => panic!("forced panic (selftest=panic)"),
            SelfTests::PAGEFAULT => pagefault(),
            SelfTests::VMX => crate::virt::vmx::selftest::run(),
            SelfTests::SVM => crate::virt::svm::selftest::outcome(),
            _ => Err(detail!("no such test")),
        };
        let (result, detail) = match &outcome {
            Ok(d) => ("pass", d),
            Err(d) => ("fail", d),
        };
        all_passed &= outcome.is_ok();
        crate::marker!(
            "TEST name={} result={} detail={}",
            name,
            result,
            Quoted(detail.as_str())
        );
    }
    all_passed
}

/// Human description of the virtualisation features for the banner.
pub fn describe_virt(v: &VirtSupport) -> Detail {
    let yn = |b: bool| if b { "yes" } else { "no" };
    match v {
        VirtSupport::Vmx(c) => detail!(
            "Intel VT-x (EPT {}, VPID {}, unrestricted guest {}, preemption timer {})",
            yn(c.ept),
            yn(c.vpid),
            yn(c.unrestricted),
            yn(c.preemption_timer)
        ),
        VirtSupport::Svm(c) => {
            detail!(
                "AMD-V (nested paging {}, next-RIP save {}, {} ASIDs)",
                yn(c.npt),
                yn(c.nrips),
                c.asids
            )
        }
        VirtSupport::None(reason) => detail!("none ({reason})"),
    }
}

fn frames() -> Outcome {
    const N: usize = 64;
    let before = frame::free_frames();
    let (kstart, kend) = crate::kernel_image();
    let tramp = crate::TRAMPOLINE_PAGE.load(Ordering::Relaxed);
    let mut got: heapless::Vec<u64, N> = heapless::Vec::new();
    for i in 0..N {
        let f = frame::alloc()
            .ok_or_else(|| detail!("allocation {i} failed with {before} frames free"))?;
        ensure!(f % PAGE_SIZE == 0, "frame {f:#x} not page aligned");
        ensure!(f >= frame::LOW_MEMORY_END, "frame {f:#x} below 1 MiB");
        ensure!(
            !(kstart..kend).contains(&f),
            "frame {f:#x} inside the kernel image"
        );
        ensure!(f != tramp, "frame {f:#x} is the AP trampoline page");
        ensure!(!got.contains(&f), "frame {f:#x} handed out twice");
        ensure!(
            !frame::in_free_range(f),
            "frame {f:#x} still inside a free range"
        );
        let p = paging::phys_to_virt(f).cast::<u64>();
        for w in 0..512u64 {
            // SAFETY: the frame was just allocated to this test and is mapped by the direct map.
            unsafe { p.add(usize::try_from(w).unwrap_or(0)).write_volatile(f ^ w) };
        }
        // Capacity N is exactly the number of iterations.
        let _ = got.push(f);
    }
    ensure!(
        frame::free_frames() == before - N as u64,
        "free count did not drop by {N}"
    );
    for &f in &got {
        let p = paging::phys_to_virt(f).cast::<u64>();
        for w in 0..512u64 {
            // SAFETY: as above; still owned by this test.
            let v = unsafe { p.add(usize::try_from(w).unwrap_or(0)).read_volatile() };
            ensure!(v == f ^ w, "frame {f:#x} word {w} corrupted ({v:#x})");
        }
    }
    for &f in &got {
        // SAFETY: each frame came from the allocator above and is freed exactly once.
        unsafe { frame::free(f) };
    }
    ensure!(
        frame::free_frames() == before,
        "free count {} != {before} after freeing",
        frame::free_frames()
    );
    Ok(detail!("{N} frames distinct, outside reserved memory, patterns intact; {before} free before and after"))
}

fn heap_test() -> Outcome {
    let before = heap::used_bytes();
    {
        let mut boxes: Vec<Box<[u64]>> = Vec::new();
        for n in 1..=128usize {
            let tag = u64::try_from(n).unwrap_or(0);
            boxes.push(alloc::vec![tag; n * 3].into_boxed_slice());
        }
        let big = alloc::vec![0xA5u8; 1 << 20];
        for (i, b) in boxes.iter().enumerate() {
            let tag = u64::try_from(i + 1).unwrap_or(0);
            ensure!(
                b.len() == (i + 1) * 3 && b.iter().all(|&v| v == tag),
                "box {i} corrupted"
            );
        }
        ensure!(big.iter().all(|&v| v == 0xA5), "1 MiB vector corrupted");
        ensure!(
            heap::used_bytes() > before + (1 << 20),
            "heap accounting did not grow"
        );
    }
    let after = heap::used_bytes();
    ensure!(after == before, "{} bytes leaked", after.abs_diff(before));
    Ok(detail!(
        "128 boxes + 1 MiB vector intact, all freed; {} KiB free",
        heap::free_bytes() / 1024
    ))
}

/// A canonical address in a PML4 slot nothing else uses.
const PAGING_TEST_VA: u64 = 0xFFFF_FE00_0000_0000;

fn paging_test() -> Outcome {
    let f = frame::alloc().ok_or_else(|| detail!("no frame"))?;
    let result = paging_with_frame(f);
    // SAFETY: the frame came from the allocator above, its mapping is gone, and it is freed once.
    unsafe { frame::free(f) };
    result
}

fn paging_with_frame(f: u64) -> Outcome {
    let va = PAGING_TEST_VA;
    paging::map_4k(va, f, paging::flags::RW).map_err(|e| detail!("map failed: {e:?}"))?;
    ensure!(
        paging::translate(va) == Some(f),
        "translate after map gave {:?}",
        paging::translate(va)
    );
    ensure!(
        paging::translate(va + 0x123) == Some(f + 0x123),
        "offset within page lost"
    );
    // SAFETY: va was just mapped to f, which this test owns.
    unsafe { (va as *mut u64).write_volatile(0xC0FF_EE00_DEAD_BEEF) };
    // SAFETY: f is owned by this test and mapped by the direct map.
    let seen = unsafe { paging::phys_to_virt(f).cast::<u64>().read_volatile() };
    ensure!(
        seen == 0xC0FF_EE00_DEAD_BEEF,
        "write through new mapping not seen in direct map ({seen:#x})"
    );
    ensure!(
        matches!(
            paging::map_4k(va, f, paging::flags::RW),
            Err(paging::PagingError::AlreadyMapped(_))
        ),
        "double map not refused"
    );
    ensure!(
        paging::unmap_4k(va) == Some(f),
        "unmap did not return the frame"
    );
    ensure!(paging::translate(va).is_none(), "still mapped after unmap");
    ensure!(paging::translate(0).is_none(), "null page is mapped");
    let (kstart, _) = crate::kernel_image();
    ensure!(
        paging::translate(kstart) == Some(kstart),
        "kernel image not identity mapped"
    );
    let probe = paging::PHYS_OFFSET + f + 8;
    ensure!(
        paging::translate(probe) == Some(f + 8),
        "direct map does not translate {probe:#x}"
    );
    Ok(detail!("map/translate/write/unmap at {va:#x} via frame {f:#x}; identity, direct map and null page ok"))
}

/// Waits for the next timer interrupt on this CPU after arming with `arm`; returns elapsed microseconds.
fn timed_interrupt(arm: impl FnOnce()) -> Option<u64> {
    let me = percpu::try_current()?;
    let before = me.timer_ticks.load(Ordering::Relaxed);
    x86_64::instructions::interrupts::enable();
    let t0 = tsc::rdtsc();
    arm();
    let fired = tsc::wait_until(1_000_000, || {
        me.timer_ticks.load(Ordering::Relaxed) != before
    });
    let t1 = tsc::rdtsc();
    lapic::disarm();
    fired.then(|| tsc::ticks_to_us(t1 - t0))
}

fn timer() -> Outcome {
    const PERIOD_US: u64 = 5_000;
    // The LAPIC clock is calibrated against the TSC over 10 ms; allow 10% calibration error early, and generous
    // lateness for emulators that deliver interrupts at their own pace.
    const EARLIEST_US: u64 = PERIOD_US * 9 / 10;
    const LATEST_US: u64 = PERIOD_US + 500_000;
    let oneshot = timed_interrupt(|| lapic::arm_oneshot_us(PERIOD_US))
        .ok_or_else(|| detail!("one-shot {PERIOD_US} us never fired"))?;
    ensure!(
        (EARLIEST_US..=LATEST_US).contains(&oneshot),
        "one-shot {PERIOD_US} us fired after {oneshot} us"
    );
    if !lapic::has_tsc_deadline() {
        return Ok(detail!(
            "one-shot {PERIOD_US} us -> {oneshot} us; TSC-deadline not supported by this CPU"
        ));
    }
    let deadline = timed_interrupt(|| {
        lapic::arm_deadline(tsc::rdtsc() + tsc::us_to_ticks(PERIOD_US));
    })
    .ok_or_else(|| detail!("TSC-deadline {PERIOD_US} us never fired"))?;
    // A deadline fires when the TSC reaches it: never early (1 us of rounding).
    ensure!(
        (PERIOD_US - 1..=LATEST_US).contains(&deadline),
        "TSC-deadline {PERIOD_US} us fired after {deadline} us"
    );
    Ok(detail!(
        "one-shot {PERIOD_US} us -> {oneshot} us; TSC-deadline {PERIOD_US} us -> {deadline} us"
    ))
}

fn smp() -> Outcome {
    let r = crate::SMP_RESULT
        .get()
        .ok_or_else(|| detail!("SMP start-up did not run"))?;
    ensure!(
        r.online == r.expected,
        "{} of {} CPUs online",
        r.online,
        r.expected
    );
    let mut answered = 0;
    for id in 1..percpu::count() {
        let Some(cpu) = percpu::get(id) else { continue };
        if !cpu.online.load(Ordering::Acquire) {
            continue;
        }
        let before = cpu.ipis.load(Ordering::Acquire);
        lapic::send_fixed(cpu.apic_id.load(Ordering::Relaxed), lapic::IPI_VECTOR);
        ensure!(
            tsc::wait_until(1_000_000, || cpu.ipis.load(Ordering::Acquire) != before),
            "cpu{id} did not answer an IPI"
        );
        answered += 1;
    }
    ensure!(answered + 1 == r.online, "only {answered} APs answered");
    Ok(detail!(
        "{}/{} CPUs online; {answered} APs answered a fixed IPI",
        r.online,
        r.expected
    ))
}

fn acpi() -> Outcome {
    let info = crate::ACPI_INFO
        .get()
        .ok_or_else(|| detail!("ACPI not parsed"))?;
    let ioapics = crate::IOAPICS
        .get()
        .ok_or_else(|| detail!("I/O APICs not mapped"))?;
    let bsp = lapic::id();
    ensure!(
        info.cpus.iter().any(|c| c.apic_id == bsp && c.enabled),
        "running CPU (APIC {bsp}) not an enabled MADT processor"
    );
    ensure!(!ioapics.is_empty(), "MADT lists no I/O APIC");
    for io in ioapics {
        let (v, pins) = (io.version(), io.pins());
        ensure!(
            (0x10..=0x2F).contains(&v),
            "I/O APIC at {:#x}: version {v:#x} out of range",
            io.phys
        );
        ensure!(
            (1..=240).contains(&pins),
            "I/O APIC at {:#x}: {pins} pins",
            io.phys
        );
        ensure!(
            (0..pins).all(|p| io.is_masked(p)),
            "I/O APIC at {:#x}: unmasked pin",
            io.phys
        );
    }
    Ok(detail!(
        "rev {} via {}: {} CPUs, BSP APIC {bsp} listed; {} I/O APIC(s) answer, all pins masked",
        info.revision,
        info.rsdp_source,
        info.cpus.len(),
        ioapics.len()
    ))
}

fn pagefault() -> Outcome {
    // Far above the identity map and below the direct map: never mapped.
    let addr = 0x0000_7FFF_DEAD_0000u64;
    // SAFETY: deliberately unsound: this read must fault, and the exception handler stops the machine.
    let v = unsafe { (addr as *const u64).read_volatile() };
    Err(detail!(
        "read of unmapped {addr:#x} returned {v:#x} instead of faulting"
    ))
}
