//! `cvctl`: the Creditvisor management agent (daemon and CLI). It owns what outlives one host: credit
//! pools, IOPS commitments and usage records.

fn main() {
    eprintln!("cvctl: not built yet (see issue 8)");
    std::process::exit(2);
}
