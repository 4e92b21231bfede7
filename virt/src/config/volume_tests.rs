//! `volume =` lines: every field, the defaults, and every error with its line and field.

use alloc::string::String;
use alloc::vec::Vec;

use super::volume::{BurstSpec, Overage, Rate, VolumeSpec};
use super::*;

fn vm_with(volumes: &[&str]) -> String {
    let mut s = String::from("[vm v]\nimage = io\nmemory = 16M\nbaseline = 10%\n");
    for v in volumes {
        s.push_str("volume = ");
        s.push_str(v);
        s.push('\n');
    }
    s
}

fn volumes(lines: &[&str]) -> Vec<VolumeSpec> {
    parse(&vm_with(lines)).unwrap().remove(0).volumes
}

/// The error for a VM whose volume lines start at line 5.
fn error(lines: &[&str]) -> ConfigError {
    parse(&vm_with(lines)).unwrap_err()
}

#[test]
fn every_field_parses_one_word_each() {
    let v = volumes(&[
        "ns=2 offset=8M size=16M iops=4000iops limit=6000iops weight=300 burst=500iops/2000 overage=borrow readonly base=0xE0000000 iops_change=4s:25%",
    ]);
    assert_eq!(
        v,
        [VolumeSpec {
            line: 5,
            nsid: 2,
            offset_bytes: 8 << 20,
            size_bytes: 16 << 20,
            committed: Rate::Iops(4000),
            limit: Some(Rate::Iops(6000)),
            weight: 300,
            burst: Some(BurstSpec {
                fill: Rate::Iops(500),
                size_ios: 2000
            }),
            overage: Overage::Borrow,
            read_only: true,
            base: Some(0xE000_0000),
            change: Some((4_000_000_000, Rate::Share { ppm: 250_000 })),
        }]
    );
}

#[test]
fn defaults_and_shares() {
    let v = volumes(&[
        "size=4K",
        "size=1G offset=1G iops=40% limit=62.5% overage=boost:150%:100ms",
    ]);
    assert_eq!(v[0].nsid, 1);
    assert_eq!(v[0].offset_bytes, 0);
    assert_eq!(v[0].committed, Rate::Iops(0));
    assert_eq!(v[0].weight, DEFAULT_VOLUME_WEIGHT);
    assert_eq!(v[0].overage, Overage::BestEffort);
    assert!(!v[0].read_only);
    assert_eq!(v[0].window_base(0), DEFAULT_WINDOW_BASE);
    assert_eq!(v[1].window_base(1), DEFAULT_WINDOW_BASE + WINDOW_BYTES);
    assert_eq!(v[1].committed, Rate::Share { ppm: 400_000 });
    assert_eq!(v[1].limit, Some(Rate::Share { ppm: 625_000 }));
    assert_eq!(
        v[1].overage,
        Overage::Boosted {
            boost_permille: 1500,
            horizon_ns: 100_000_000
        }
    );
    assert_eq!(Rate::Share { ppm: 400_000 }.resolve(20_000), 8000);
    assert_eq!(Rate::Iops(7).resolve(20_000), 7);
}

#[track_caller]
fn expect(lines: &[&str], line: usize, field: &str, contains: &str) {
    let e = error(lines);
    let text = alloc::format!("{e}");
    assert_eq!((e.line, e.field.as_str()), (line, field), "{text}");
    assert!(text.contains(contains), "`{text}` lacks `{contains}`");
}

#[test]
fn errors_name_line_and_field() {
    expect(&["offset=8M"], 5, "volume.size", "required");
    expect(&["size=0"], 5, "volume.size", "empty");
    expect(&["size=6K"], 5, "volume.size", "multiple of 4 KiB");
    expect(&["size=lots"], 5, "volume.size", "a size like 16M");
    expect(
        &["size=4K offset=1K"],
        5,
        "volume.offset",
        "multiple of 4 KiB",
    );
    expect(&["size=4K size=8K"], 5, "volume.size", "given twice");
    expect(&["size=4K ns=0"], 5, "volume.ns", "does not exist");
    expect(&["size=4K ns=x"], 5, "volume.ns", "namespace id");
    expect(
        &["size=4K iops=fast"],
        5,
        "volume.iops",
        "a rate like 4000iops",
    );
    expect(
        &["size=4K iops=40"],
        5,
        "volume.iops",
        "a rate like 4000iops",
    );
    expect(&["size=4K iops=1.5iops"], 5, "volume.iops", "a rate like");
    expect(&["size=4K iops=101%"], 5, "volume.iops", "at most 100%");
    expect(
        &["size=4K iops=2000000000000iops"],
        5,
        "volume.iops",
        "at most",
    );
    expect(&["size=4K limit=0"], 5, "volume.limit", "above 0");
    expect(
        &["size=4K iops=500iops limit=400iops"],
        5,
        "volume.limit",
        "below the commitment",
    );
    expect(
        &["size=4K iops=50% limit=40%"],
        5,
        "volume.limit",
        "below the commitment",
    );
    expect(&["size=4K weight=0"], 5, "volume.weight", "1 to 65535");
    expect(&["size=4K weight=65536"], 5, "volume.weight", "1 to 65535");
    expect(
        &["size=4K burst=500iops"],
        5,
        "volume.burst",
        "<fill rate>/",
    );
    expect(&["size=4K burst=0/10"], 5, "volume.burst", "above 0");
    expect(&["size=4K burst=5iops/0"], 5, "volume.burst", "above 0");
    expect(
        &["size=4K overage=lots"],
        5,
        "volume.overage",
        "best-effort",
    );
    expect(
        &["size=4K overage=boost:150%"],
        5,
        "volume.overage",
        "boost:",
    );
    expect(
        &["size=4K iops=10iops overage=boost:0%:1ms"],
        5,
        "volume.overage",
        "at least 0.1%",
    );
    expect(
        &["size=4K overage=boost:150%:1ms"],
        5,
        "volume.overage",
        "needs a commitment",
    );
    expect(
        &["size=4K base=0xD0000010"],
        5,
        "volume.base",
        "4 KiB aligned",
    );
    expect(
        &["size=4K base=0x100000000"],
        5,
        "volume.base",
        "end at or below 4 GiB",
    );
    expect(&["size=4K base=zz"], 5, "volume.base", "an address");
    expect(
        &["size=4K base=0x100000"],
        5,
        "volume.base",
        "overlaps the VM's RAM",
    );
    expect(
        &["size=4K iops_change=4s"],
        5,
        "volume.iops_change",
        "<after>:<rate>",
    );
    expect(
        &["size=4K iops_change=soon:5%"],
        5,
        "volume.iops_change",
        "<after>:<rate>",
    );
    expect(
        &["size=4K iops_change=1s:fast"],
        5,
        "volume.iops_change",
        "a rate like",
    );
    expect(
        &["size=4K limit=10% iops_change=1s:20%"],
        5,
        "volume.iops_change",
        "above the limit",
    );
    expect(&["size=4K colour=red"], 5, "volume.colour", "a volume key");
    expect(&["size=4K fast"], 5, "volume", "key=value");
    expect(
        &[
            "size=4K base=0xE0000000",
            "size=4K offset=4K base=0xE0000000",
        ],
        6,
        "volume.base",
        "line 5",
    );
    // The default window of the second volume is the first's explicit one.
    expect(
        &["size=4K base=0xD0001000", "size=4K offset=4K"],
        6,
        "volume.base",
        "line 5",
    );
    expect(
        &["size=8K", "size=8K offset=4K"],
        6,
        "volume.offset",
        "overlap the volume on line 5",
    );
    let nine: Vec<String> = (0..9)
        .map(|i| alloc::format!("size=4K offset={}K", 4 * i))
        .collect();
    let nine: Vec<&str> = nine.iter().map(String::as_str).collect();
    expect(&nine, 13, "volume", "more than 8 volumes");
}

#[test]
fn ram_reaching_the_default_windows_needs_explicit_bases() {
    let text = "[vm big]\nimage = io\nmemory = 3500M\nbaseline = 10%\nvolume = size=4K\n";
    let e = parse(text).unwrap_err();
    assert_eq!((e.line, e.field.as_str()), (5, "volume.base"));
    assert!(alloc::format!("{e}").contains("give `base=` above the RAM"));
    let ok =
        "[vm big]\nimage = io\nmemory = 3500M\nbaseline = 10%\nvolume = size=4K base=0xF0000000\n";
    assert_eq!(parse(ok).unwrap()[0].volumes[0].base, Some(0xF000_0000));
}

#[test]
fn extents_of_different_vms_must_not_overlap() {
    let text = "[vm a]\nimage = io\nmemory = 8M\nbaseline = 10%\nvolume = size=16M\n\
                [vm b]\nimage = io\nmemory = 8M\nbaseline = 10%\nvolume = size=16M offset=8M\n";
    let e = parse(text).unwrap_err();
    assert_eq!((e.line, e.field.as_str()), (10, "volume.offset"));
    // Another namespace is another disk.
    let ok = text.replace("offset=8M", "offset=8M ns=2");
    assert_eq!(parse(&ok).unwrap().len(), 2);
}

#[test]
fn a_vm_without_volumes_has_none() {
    let vms = parse("[vm a]\nimage = burn\nmemory = 8M\nbaseline = 10%\n").unwrap();
    assert!(vms[0].volumes.is_empty());
}
