//! Configuration parser tests: a full example, every error with its line and field, and fuzzing.

use alloc::string::String;
use alloc::vec;

use proptest::prelude::*;

use super::*;

const EXAMPLE: &str = "\
# Three burners sharing CPU 0.
[vm burn-a]
image    = burn
memory   = 16M
args     = report_ms=100 gap_us=20   # two arguments
baseline = 50%

[vm burn-b]
image = burn
memory = 8MiB
baseline = 3ms/10ms
accrual = 1.5ms
balance_cap = 2credits
launch_balance = 0.5 credits
burst = unlimited 100ms
weight = 512
cap = 80%
cpu = 0
vcpus = 2
";

#[test]
fn parses_the_example() {
    let vms = parse(EXAMPLE).unwrap();
    assert_eq!(vms.len(), 2);
    let a = &vms[0];
    assert_eq!(
        (a.name.as_str(), a.line, a.image.as_str()),
        ("burn-a", 2, "burn")
    );
    assert_eq!(a.memory_bytes, 16 << 20);
    assert_eq!(a.vcpus, 1);
    assert_eq!(a.args, "report_ms=100 gap_us=20");
    assert_eq!(a.sched.budget_ns, 5_000_000);
    assert_eq!(a.sched.period_ns, 10_000_000);
    assert_eq!(a.sched.accrual_ns, 5_000_000);
    assert_eq!(a.sched.balance_cap_ns, 5_000_000 * 8_640_000);
    assert_eq!(
        (
            a.sched.launch_balance_ns,
            a.sched.burst,
            a.sched.weight,
            a.sched.cap_ppm
        ),
        (0, Burst::Standard, 256, None)
    );
    assert_eq!(a.cpu, None);
    let b = &vms[1];
    assert_eq!(b.memory_bytes, 8 << 20);
    assert_eq!(
        (b.sched.budget_ns, b.sched.period_ns),
        (3_000_000, 10_000_000)
    );
    assert_eq!(b.sched.accrual_ns, 1_500_000);
    assert_eq!(b.sched.balance_cap_ns, 120_000_000_000);
    assert_eq!(b.sched.launch_balance_ns, 30_000_000_000);
    assert_eq!(
        b.sched.burst,
        Burst::Unlimited {
            overdraft_ns: 100_000_000
        }
    );
    assert_eq!(
        (b.sched.weight, b.sched.cap_ppm, b.cpu, b.vcpus),
        (512, Some(800_000), Some(0), 2)
    );
    assert_eq!(b.sched.baseline_ppm(), 300_000);
}

#[test]
fn percent_with_period_and_fractions() {
    let vms = parse("[vm x]\nimage=burn\nmemory=4M\nbaseline=12.5%\nperiod=1ms\n").unwrap();
    assert_eq!(
        (vms[0].sched.budget_ns, vms[0].sched.period_ns),
        (125_000, 1_000_000)
    );
    let vms = parse("[vm x]\nimage=burn\nmemory=0.5G\nbaseline=200us/1ms\n").unwrap();
    assert_eq!(vms[0].memory_bytes, 512 << 20);
    assert_eq!(vms[0].sched.budget_ns, 200_000);
    assert!(parse("").unwrap().is_empty());
    assert!(parse("# only comments\n\n   \n").unwrap().is_empty());
    // `#` inside a value (not after whitespace) is kept.
    let vms = parse("[vm x]\nimage=burn\nmemory=4M\nbaseline=10%\nargs=a#b\n").unwrap();
    assert_eq!(vms[0].args, "a#b");
}

fn error(text: &str) -> ConfigError {
    parse(text).expect_err("must be refused")
}

fn at(text: &str, line: usize, field: &str) -> ErrorKind {
    let e = error(text);
    assert_eq!((e.line, e.field.as_str()), (line, field), "{e}");
    e.kind
}

const OK: &str = "[vm a]\nimage=burn\nmemory=16M\nbaseline=10%\n";

#[test]
fn errors_name_the_line_and_the_field() {
    assert_eq!(at("image = burn\n", 1, "image"), ErrorKind::OutsideSection);
    assert_eq!(at("[vm a]\nimage burn\n", 2, "-"), ErrorKind::Syntax);
    assert_eq!(
        at("[vm a]\ncolour = red\n", 2, "colour"),
        ErrorKind::UnknownField
    );
    assert_eq!(
        at("[vm a]\nimage=burn\nimage=burn\n", 3, "image"),
        ErrorKind::DuplicateField
    );
    assert_eq!(
        at(&alloc::format!("{OK}[vm a]\n"), 5, "vm"),
        ErrorKind::DuplicateVm
    );
    assert_eq!(
        at("[vm a]\nmemory=16M\nbaseline=10%\n", 1, "image"),
        ErrorKind::Missing
    );
    assert_eq!(
        at("[vm a]\nimage=burn\nbaseline=10%\n", 1, "memory"),
        ErrorKind::Missing
    );
    assert_eq!(
        at("[vm a]\nimage=burn\nmemory=16M\n\n[vm b]\n", 1, "baseline"),
        ErrorKind::Missing
    );
    assert!(matches!(at("[vm]\n", 1, "vm"), ErrorKind::Invalid { .. }));
    assert!(matches!(
        at("[vm a b]\n", 1, "vm"),
        ErrorKind::Invalid { .. }
    ));
    assert!(matches!(at("[vm a\n", 1, "vm"), ErrorKind::Invalid { .. }));
    assert!(matches!(
        at("[vm bad/name]\n", 1, "vm"),
        ErrorKind::Invalid { .. }
    ));
    assert!(matches!(
        at("[vm a-name-that-is-thirty-two-charsx]\n", 1, "vm"),
        ErrorKind::Invalid { .. }
    ));
    assert!(matches!(
        at("[vm a]\nmemory=lots\n", 2, "memory"),
        ErrorKind::Invalid { .. }
    ));
    assert!(matches!(
        at("[vm a]\nmemory=16\n", 2, "memory"),
        ErrorKind::Invalid { .. }
    ));
    assert!(matches!(
        at("[vm a]\nmemory=5G\n", 2, "memory"),
        ErrorKind::OutOfRange(_)
    ));
    assert!(matches!(
        at("[vm a]\nmemory=1.0001K\n", 2, "memory"),
        ErrorKind::Invalid { .. }
    ));
    assert!(matches!(
        at("[vm a]\nmemory=6K\n", 2, "memory"),
        ErrorKind::OutOfRange(_)
    ));
    assert!(matches!(
        at("[vm a]\nimage=burn\nmemory=1M\nbaseline=10%\n", 3, "memory"),
        ErrorKind::OutOfRange(_)
    ));
    assert!(matches!(
        at("[vm a]\nvcpus=0\n", 2, "vcpus"),
        ErrorKind::OutOfRange(_)
    ));
    assert!(matches!(
        at("[vm a]\nvcpus=17\n", 2, "vcpus"),
        ErrorKind::OutOfRange(_)
    ));
    assert!(matches!(
        at("[vm a]\nvcpus=-1\n", 2, "vcpus"),
        ErrorKind::Invalid { .. }
    ));
    assert!(matches!(
        at("[vm a]\nargs=\u{7f}\n", 2, "args"),
        ErrorKind::Invalid { .. }
    ));
    assert!(matches!(
        at(
            &alloc::format!("[vm a]\nargs={}\n", "x".repeat(256)),
            2,
            "args"
        ),
        ErrorKind::Invalid { .. }
    ));
    assert!(matches!(
        at("[vm a]\nimage=\n", 2, "image"),
        ErrorKind::Invalid { .. }
    ));
    assert!(matches!(
        at("[vm a]\nbaseline=0%\n", 2, "baseline"),
        ErrorKind::OutOfRange(_)
    ));
    assert!(matches!(
        at("[vm a]\nbaseline=101%\n", 2, "baseline"),
        ErrorKind::OutOfRange(_)
    ));
    assert!(matches!(
        at("[vm a]\nbaseline=half\n", 2, "baseline"),
        ErrorKind::Invalid { .. }
    ));
    assert!(matches!(
        at("[vm a]\nbaseline=5ms/10 ms/1\n", 2, "baseline"),
        ErrorKind::Invalid { .. }
    ));
    assert!(matches!(
        at(
            "[vm a]\nimage=b\nmemory=16M\nbaseline=20ms/10ms\n",
            4,
            "baseline"
        ),
        ErrorKind::OutOfRange(_)
    ));
    assert!(matches!(
        at(
            "[vm a]\nimage=b\nmemory=16M\nbaseline=1us/10us\n",
            4,
            "baseline"
        ),
        ErrorKind::OutOfRange(_)
    ));
    assert!(matches!(
        at(
            "[vm a]\nimage=b\nmemory=16M\nbaseline=10%\nperiod=2s\n",
            5,
            "period"
        ),
        ErrorKind::OutOfRange(_)
    ));
    assert!(matches!(
        at(
            "[vm a]\nimage=b\nmemory=16M\nbaseline=1ms/10ms\nperiod=10ms\n",
            5,
            "period"
        ),
        ErrorKind::Conflict(_)
    ));
    // 0.0001% of 100 us is 0.1 ns: a zero budget.
    assert!(matches!(
        at(
            "[vm a]\nimage=b\nmemory=16M\nbaseline=0.0001%\nperiod=100us\n",
            4,
            "baseline"
        ),
        ErrorKind::OutOfRange(_)
    ));
    assert!(matches!(
        at("[vm a]\nperiod=10 weeks\n", 2, "period"),
        ErrorKind::Invalid { .. }
    ));
    assert!(matches!(
        at("[vm a]\naccrual=lots\n", 2, "accrual"),
        ErrorKind::Invalid { .. }
    ));
    assert!(matches!(
        at("[vm a]\nbalance_cap=1.5ns\n", 2, "balance_cap"),
        ErrorKind::Invalid { .. }
    ));
    assert!(matches!(
        at(
            "[vm a]\nimage=b\nmemory=16M\nbaseline=10%\nbalance_cap=1ms\nlaunch_balance=2ms\n",
            6,
            "launch_balance"
        ),
        ErrorKind::OutOfRange(_)
    ));
    assert!(matches!(
        at("[vm a]\nburst=sometimes\n", 2, "burst"),
        ErrorKind::Invalid { .. }
    ));
    assert!(matches!(
        at("[vm a]\nburst=unlimited\n", 2, "burst"),
        ErrorKind::Invalid { .. }
    ));
    assert!(matches!(
        at("[vm a]\nburst=unlimited forever\n", 2, "burst"),
        ErrorKind::Invalid { .. }
    ));
    assert!(matches!(
        at("[vm a]\nweight=0\n", 2, "weight"),
        ErrorKind::OutOfRange(_)
    ));
    assert!(matches!(
        at("[vm a]\nweight=99999999999\n", 2, "weight"),
        ErrorKind::OutOfRange(_)
    ));
    assert!(matches!(
        at("[vm a]\ncap=0%\n", 2, "cap"),
        ErrorKind::OutOfRange(_)
    ));
    assert!(matches!(
        at("[vm a]\ncap=50\n", 2, "cap"),
        ErrorKind::Invalid { .. }
    ));
    assert!(matches!(
        at(
            "[vm a]\nimage=b\nmemory=16M\nbaseline=30%\ncap=20%\n",
            5,
            "cap"
        ),
        ErrorKind::OutOfRange(_)
    ));
    assert!(matches!(
        at("[vm a]\ncpu=4294967296\n", 2, "cpu"),
        ErrorKind::OutOfRange(_)
    ));
    assert!(matches!(
        at("[vm a]\ncpu=first\n", 2, "cpu"),
        ErrorKind::Invalid { .. }
    ));
    assert!(matches!(
        at("[vm a]\nmemory=99999999999999999999999G\n", 2, "memory"),
        ErrorKind::Invalid { .. }
    ));
    assert_eq!(
        at(
            &alloc::format!("[vm a]\nargs={}\n", "x".repeat(2000)),
            2,
            "-"
        ),
        ErrorKind::TooLarge
    );
    assert_eq!(
        parse_bytes(b"[vm a]\n\xff\n").unwrap_err(),
        ConfigError {
            line: 2,
            field: String::from("-"),
            kind: ErrorKind::NotText
        }
    );
}

#[test]
fn module_names() {
    assert_eq!(module_name("burn"), "burn");
    assert_eq!(module_name("/boot/burn.elf burn"), "burn");
    assert_eq!(module_name("/boot/burn.elf"), "burn");
    assert_eq!(module_name("/tmp/x/vms.conf"), "vms.conf");
    assert_eq!(module_name("/tmp/x/vms.conf vms.conf"), "vms.conf");
    assert_eq!(module_name(""), "");
    assert_eq!(module_name("dir/"), "");
}

#[test]
fn messages_are_readable() {
    let e = error("[vm a]\nimage=b\nmemory=lots\n");
    assert_eq!(alloc::format!("{e}"), "line 3, field `memory`: expected a size like 16M (units K, M, G, optionally KiB, MiB, GiB), found `lots`");
    let e = error("[vm a]\nmemory=16M\nbaseline=10%\n");
    assert_eq!(
        alloc::format!("{e}"),
        "line 1, field `image`: required, but missing from this VM"
    );
}

#[test]
fn too_many_vms_are_refused() {
    let mut text = String::new();
    for i in 0..=MAX_VMS {
        text.push_str(&alloc::format!(
            "[vm v{i}]\nimage=b\nmemory=4M\nbaseline=1%\n"
        ));
    }
    assert_eq!(at(&text, 4 * MAX_VMS + 1, "vm"), ErrorKind::TooLarge);
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(3000))]

    #[test]
    fn arbitrary_bytes_never_panic(bytes in proptest::collection::vec(any::<u8>(), 0..400)) {
        let _ = parse_bytes(&bytes);
    }

    /// Lines drawn from the grammar's vocabulary with random values: errors or valid configs, never a panic, and
    /// every accepted VM satisfies the documented invariants.
    #[test]
    fn grammar_shaped_input_never_panics(lines in proptest::collection::vec(
        (prop::sample::select(vec!["[vm a]", "[vm b]", "image", "memory", "vcpus", "args", "baseline", "period",
            "accrual", "balance_cap", "launch_balance", "burst", "weight", "cap", "cpu", "#", "", "[vm"]),
         prop::sample::select(vec!["", "0", "1", "16M", "4K", "10%", "100%", "0.5%", "1ms/10ms", "10ms", "1.5s",
            "2credits", "unlimited 1ms", "standard", "x", "-1", "18446744073709551616", "99999999999G", "1e3", "."])),
        0..16)) {
        let mut text = String::new();
        for (key, value) in lines {
            if key.starts_with('[') || key.starts_with('#') || key.is_empty() {
                text.push_str(key);
            } else {
                text.push_str(&alloc::format!("{key} = {value}"));
            }
            text.push('\n');
        }
        if let Ok(vms) = parse(&text) {
            for vm in vms {
                let s = vm.sched;
                prop_assert!((MIN_PERIOD_NS..=MAX_PERIOD_NS).contains(&s.period_ns));
                prop_assert!(s.budget_ns > 0 && s.budget_ns <= s.period_ns);
                prop_assert!(s.weight >= 1);
                prop_assert!(s.launch_balance_ns <= s.balance_cap_ns);
                prop_assert!(vm.memory_bytes >= MIN_MEMORY && vm.memory_bytes % 4096 == 0);
                prop_assert!(vm.vcpus >= 1 && vm.vcpus <= MAX_VCPUS);
                if let Some(cap) = s.cap_ppm {
                    prop_assert!(u64::from(cap) >= s.baseline_ppm() && u64::from(cap) <= PPM);
                }
            }
        }
    }
}

fn file_error(text: &str) -> ConfigError {
    match parse_file(text) {
        Ok(f) => panic!("accepted: {f:?}"),
        Err(e) => e,
    }
}

#[test]
fn the_host_section_sets_the_io_server() {
    // Absent: the defaults.
    let f = parse_file(OK).unwrap();
    assert_eq!(f.host, HostConfig::default());
    assert_eq!(
        (f.host.io_server.budget_ns, f.host.io_server.period_ns),
        (DEFAULT_IO_SERVER_BUDGET_NS, DEFAULT_IO_SERVER_PERIOD_NS)
    );
    // Before or after the VMs, as budget/period or as a percentage of the default period.
    let text = alloc::format!("[host]\nio_server = 200us/500us # two fifths\n{OK}");
    let f = parse_file(&text).unwrap();
    assert_eq!(f.vms.len(), 1);
    assert_eq!(f.host.line, Some(1));
    assert_eq!(
        f.host.io_server,
        IoServerSpec {
            budget_ns: 200_000,
            period_ns: 500_000
        }
    );
    let f = parse_file(&alloc::format!("{OK}[host]\nio_server = 25%\n")).unwrap();
    assert_eq!(
        f.host.io_server,
        IoServerSpec {
            budget_ns: 250_000,
            period_ns: DEFAULT_IO_SERVER_PERIOD_NS
        }
    );
}

#[test]
fn host_section_errors_name_the_line_and_the_field() {
    let e = file_error("[host]\nio_server = 2ms/1ms\n");
    assert_eq!((e.line, e.field.as_str()), (2, "io_server"));
    assert!(matches!(e.kind, ErrorKind::OutOfRange(_)), "{e}");
    assert!(e.to_string().contains("budget 2000000 ns"), "{e}");
    let e = file_error("[host]\nio_server = 10us/50us\n");
    assert!(e.to_string().contains("period 50000 ns outside"), "{e}");
    let e = file_error("[host]\nio_server = fast\n");
    assert!(matches!(e.kind, ErrorKind::Invalid { .. }), "{e}");
    let e = file_error("[host]\nio_server = 1ms/2ms\nio_server = 1ms/2ms\n");
    assert_eq!((e.line, e.kind), (3, ErrorKind::DuplicateField));
    let e = file_error("[host]\nimage = burn\n");
    assert_eq!((e.line, e.kind.clone()), (2, ErrorKind::UnknownHostField));
    assert!(e.to_string().contains("io_server"), "{e}");
    let e = file_error("[host]\n[host]\n");
    assert_eq!((e.line, e.field.as_str()), (2, "host"));
    // A VM section's field after the host section belongs to no VM.
    let e = file_error(&alloc::format!("{OK}[host]\nmemory = 16M\n"));
    assert_eq!((e.line, e.kind), (6, ErrorKind::UnknownHostField));
}

#[test]
fn run_time_configurations_refuse_a_host_section() {
    let e = parse(&alloc::format!("{OK}[host]\nio_server = 25%\n")).unwrap_err();
    assert_eq!((e.line, e.field.as_str()), (5, "host"));
    assert!(e.to_string().contains("boot configuration"), "{e}");
    // The boot path takes it.
    assert!(parse_file_bytes(alloc::format!("{OK}[host]\n").as_bytes()).is_ok());
}
