//! Creditvisor kernel: a bare-metal x86_64 hypervisor.
//!
//! Boot sequence on the BSP ([`kernel_main`], entered from the 32-bit Multiboot stub in long mode on early
//! identity page tables): console, per-CPU area, GDT/TSS/IDT, PIC off, boot information, command line, TSC
//! calibration, frame allocator, kernel page tables, heap, ACPI (MADT), I/O APICs, LAPIC and timer, APs, virtual-
//! isation detection, banner, self-tests, then halt or emulator exit. Each step prints the markers of
//! docs/console.md; anything unusable stops cleanly with `CV:FATAL`.
//!
//! Design principles: fail loudly and stop cleanly (never a triple fault or a silent hang); hardware tables are
//! validated before use; policy lives in `sched`, which the kernel only feeds with time.
#![no_std]
#![no_main]

extern crate alloc;

mod acpi;
mod arch;
mod boot;
mod cmdline;
mod console;
mod io;
mod mgmt;
mod mm;
mod selftest;
mod virt;
mod vm;

use core::fmt::Display;
use core::sync::atomic::{AtomicBool, AtomicU64, Ordering};

use spin::Once;

use arch::x86_64::{cpu, entry, gdt, idt, ioapic, lapic, paging, percpu, pic, smp, stop, tsc};
use boot::{BootInfo, Firmware, Loader, RegionKind};
use cmdline::{Config, ExitMode, Warning};
use console::Quoted;
use mm::PAGE_SIZE;

/// Kernel version printed in the banner.
pub const VERSION: &str = env!("CARGO_PKG_VERSION");

static CONFIG: Once<Config> = Once::new();
static BOOT_INFO: Once<BootInfo> = Once::new();
static ACPI_INFO: Once<acpi::AcpiInfo> = Once::new();
static IOAPICS: Once<heapless::Vec<ioapic::IoApic, { acpi::MAX_IOAPICS }>> = Once::new();
static SMP_RESULT: Once<smp::SmpResult> = Once::new();
/// Physical page reserved below 1 MiB for the AP trampoline (0 = none found).
static TRAMPOLINE_PAGE: AtomicU64 = AtomicU64::new(0);

extern "C" {
    static __kernel_start: u8;
    static __kernel_end: u8;
}

/// Settings in force (defaults until the command line is parsed).
pub fn config() -> Config {
    CONFIG.get().copied().unwrap_or_default()
}

/// Physical range of the kernel image (identity-linked, so link addresses are physical).
pub fn kernel_image() -> (u64, u64) {
    (
        core::ptr::addr_of!(__kernel_start) as u64,
        core::ptr::addr_of!(__kernel_end) as u64,
    )
}

/// Reports unusable boot information or hardware and stops.
fn fatal(reason: impl Display) -> ! {
    console::write_line_fatal(format_args!("CV:FATAL reason={}", Quoted(reason)));
    stop::stop(stop::Status::Fail)
}

/// Highest free page in usable memory below 1 MiB that nothing else claims (not page 0).
fn choose_trampoline_page(bi: &BootInfo) -> Option<u64> {
    let claimed = |page: u64| {
        let end = page + PAGE_SIZE;
        let overlaps = |s: u64, e: u64| s < end && page < e;
        bi.regions
            .iter()
            .any(|r| r.kind != RegionKind::Usable && overlaps(r.start, r.end))
            || bi.reserved.iter().any(|&(s, e)| overlaps(s, e))
            || bi.modules.iter().any(|m| overlaps(m.start, m.end))
    };
    let mut best = None;
    for r in bi.regions.iter().filter(|r| r.kind == RegionKind::Usable) {
        let first = r.start.max(PAGE_SIZE).next_multiple_of(PAGE_SIZE);
        let last = r.end.min(mm::frame::LOW_MEMORY_END) & !(PAGE_SIZE - 1);
        let mut page = first;
        while page < last {
            if !claimed(page) {
                best = best.max(Some(page));
            }
            page += PAGE_SIZE;
        }
    }
    best
}

/// Entered from the boot stub with the loader's magic and boot-information address.
extern "C" fn kernel_main(magic: u32, info: u32) -> ! {
    tsc::mark_boot();
    console::init();
    percpu::install(&percpu::BSP);
    percpu::register(&percpu::BSP);
    gdt::init_bsp();
    idt::load();
    pic::disable();
    console::init_logger(log::LevelFilter::Info);

    let bi = match boot::parse(magic, u64::from(info)) {
        Ok(bi) => BOOT_INFO.call_once(|| bi),
        Err(e) => fatal(e),
    };
    let parsed = cmdline::parse(&bi.cmdline);
    let config = *CONFIG.call_once(|| parsed.config);
    console::init_logger(config.log);

    let tsc_source = tsc::calibrate();
    marker!(
        "BOOT loader={} firmware={} cmdline={}",
        match bi.loader {
            Loader::Multiboot1 => "multiboot1",
            Loader::Multiboot2 => "multiboot2",
        },
        match bi.firmware {
            Firmware::Bios => "bios",
            Firmware::Uefi => "uefi",
        },
        Quoted(bi.cmdline.as_str())
    );
    for w in &parsed.warnings {
        match w {
            Warning::UnknownKey(k) => log::warn!("cmdline: unknown key '{k}' ignored"),
            Warning::BadValue { key, value } => {
                log::warn!("cmdline: bad value '{value}' for '{key}' ignored")
            }
        }
    }
    if parsed.ignored > parsed.warnings.len() {
        log::warn!(
            "cmdline: {} more ignored words",
            parsed.ignored - parsed.warnings.len()
        );
    }
    match tsc_source {
        Some(cal) => {
            let hz = cal.hz;
            log::info!(
                "tsc: {}.{:03} MHz from {:?}",
                hz / 1_000_000,
                hz / 1000 % 1000,
                cal.source
            );
            if let Some(c) = cal.rejected_cpuid_hz {
                log::warn!(
                    "tsc: CPUID states {} MHz but the PIT measures {} MHz; using the PIT",
                    c / 1_000_000,
                    hz / 1_000_000
                );
            }
        }
        None => {
            fatal("TSC frequency unknown: CPUID 0x15/0x16 give none and the PIT does not count")
        }
    }
    for r in &bi.regions {
        log::debug!("memory: {:#014x}-{:#014x} {:?}", r.start, r.end, r.kind);
    }
    for m in &bi.modules {
        log::info!("module: {:#x}-{:#x} '{}'", m.start, m.end, m.cmdline);
    }

    // Physical memory.
    let tramp = choose_trampoline_page(bi);
    TRAMPOLINE_PAGE.store(tramp.unwrap_or(0), Ordering::Relaxed);
    let (kstart, kend) = kernel_image();
    let allocator = match mm::frame::FrameAllocator::new(bi, &[(kstart, kend)]) {
        Ok(a) => a,
        Err(e) => fatal(format_args!("frame allocator: {e:?}")),
    };
    mm::frame::init(allocator);
    if let Err(e) = paging::init(bi) {
        fatal(format_args!("kernel page tables: {e:?}"));
    }
    let heap = match mm::heap::init() {
        Ok(size) => size,
        Err(e) => fatal(format_args!(
            "no contiguous memory for a {} KiB heap",
            e.wanted / 1024
        )),
    };
    log::info!(
        "memory: {} frames managed, heap {} KiB, kernel image {kstart:#x}-{kend:#x}",
        mm::frame::total_frames(),
        heap / 1024
    );
    marker!(
        "MEM usable_mib={} free_frames={}",
        bi.usable_bytes() >> 20,
        mm::frame::free_frames()
    );

    // Platform tables and interrupt controllers.
    let acpi = match acpi::init(bi) {
        Ok(a) => ACPI_INFO.call_once(|| a),
        Err(e) => fatal(e),
    };
    let enabled = acpi.cpus.iter().filter(|c| c.enabled).count();
    log::info!(
        "acpi: revision {} via {}, {} tables, {} CPU entries ({} enabled), 8259 {}",
        acpi.revision,
        acpi.rsdp_source,
        acpi.tables,
        acpi.cpus.len(),
        enabled,
        if acpi.has_8259 {
            "present (masked)"
        } else {
            "absent"
        }
    );
    marker!("ACPI cpus={} ioapics={}", enabled, acpi.ioapics.len());
    let mut ioapics = heapless::Vec::new();
    for e in &acpi.ioapics {
        match ioapic::IoApic::map(e.address, e.gsi_base) {
            Ok(io) => {
                io.mask_all();
                log::info!(
                    "ioapic: id {} (MADT {}) at {:#x}, version {:#x}, {} pins from GSI {}, all masked",
                    io.id(),
                    e.id,
                    io.phys,
                    io.version(),
                    io.pins(),
                    io.gsi_base
                );
                // Capacity equals the MADT list's.
                let _ = ioapics.push(io);
            }
            Err(err) => fatal(format_args!(
                "cannot map I/O APIC at {:#x}: {err:?}",
                e.address
            )),
        }
    }
    IOAPICS.call_once(|| ioapics);

    let mode = match lapic::init_bsp() {
        Ok(m) => m,
        Err(e) => fatal(format_args!("cannot map the local APIC: {e:?}")),
    };
    let Some(timer_hz) = lapic::calibrate_timer() else {
        fatal("LAPIC timer does not count")
    };
    log::info!(
        "lapic: {} mode, id {}, timer {} kHz (divide 16), TSC-deadline {}",
        match mode {
            lapic::Mode::X2Apic => "x2APIC",
            lapic::Mode::XApic(_) => "xAPIC",
        },
        lapic::id(),
        timer_hz / 1000,
        if lapic::has_tsc_deadline() {
            "yes"
        } else {
            "no"
        }
    );
    percpu::BSP.apic_id.store(lapic::id(), Ordering::Relaxed);
    if !smp::bring_up_local(&percpu::BSP) {
        fatal("LAPIC timer interrupt never arrived on the BSP");
    }

    // Application processors.
    let result = match tramp {
        Some(page) => smp::start_aps(&acpi.cpus, page),
        None => {
            log::error!(
                "smp: no free page below 1 MiB for the AP trampoline; running on the BSP only"
            );
            smp::SmpResult {
                online: 1,
                expected: enabled.max(1),
            }
        }
    };
    SMP_RESULT.call_once(|| result);
    marker!("SMP online={} expected={}", result.online, result.expected);

    // Virtualisation.
    let virt = virt::detect::detect();
    match virt {
        virt::detect::VirtSupport::Vmx(c) => marker!(
            "VIRT vendor=vmx ept={} vpid={} unrestricted={} preemption_timer={}",
            u8::from(c.ept),
            u8::from(c.vpid),
            u8::from(c.unrestricted),
            u8::from(c.preemption_timer)
        ),
        virt::detect::VirtSupport::Svm(c) => {
            marker!(
                "VIRT vendor=svm npt={} nrips={} asids={}",
                u8::from(c.npt),
                u8::from(c.nrips),
                c.asids
            )
        }
        virt::detect::VirtSupport::None(reason) => {
            marker!("VIRT vendor=none reason={}", Quoted(reason))
        }
    }

    let mem_mib = bi.usable_bytes() >> 20;
    marker!(
        "BANNER version={} cpus={} mem_mib={} virt={}",
        VERSION,
        result.online,
        mem_mib,
        virt.name()
    );
    console::write_line(format_args!(
        "Creditvisor {} ready: {} of {} CPUs online, {} MiB RAM, virtualisation: {}",
        VERSION,
        result.online,
        result.expected,
        mem_mib,
        selftest::describe_virt(&virt)
    ));

    let mut passed = selftest::run(config.selftests);
    if let Some(vms_ok) = vm::start(bi, &virt, result.online, config.run_ms) {
        passed &= vms_ok;
    }
    let stack_used = entry::boot_stack_used();
    if stack_used > entry::BOOT_STACK_HEALTHY {
        log::error!(
            "boot stack: used {stack_used} of {} bytes, too close to overflowing into the statics below it",
            entry::BOOT_STACK_SIZE
        );
        passed = false;
    } else {
        log::info!(
            "boot stack: used {} of {} KiB",
            stack_used / 1024,
            entry::BOOT_STACK_SIZE / 1024
        );
    }
    marker!("DONE status={}", if passed { "pass" } else { "fail" });
    match config.exit {
        ExitMode::Emu => stop::stop(if passed {
            stop::Status::Pass
        } else {
            stop::Status::Fail
        }),
        ExitMode::Halt => cpu::idle_forever(),
    }
}

static PANICKING: AtomicBool = AtomicBool::new(false);

#[panic_handler]
fn panic(info: &core::panic::PanicInfo<'_>) -> ! {
    if PANICKING.swap(true, Ordering::AcqRel) {
        cpu::halt_forever();
    }
    let (file, line) = info.location().map_or(("?", 0), |l| (l.file(), l.line()));
    console::write_line_fatal(format_args!(
        "CV:PANIC cpu={} location={}:{} message={}",
        percpu::current_id(),
        file,
        line,
        Quoted(info.message())
    ));
    stop::stop(stop::Status::Fail)
}
