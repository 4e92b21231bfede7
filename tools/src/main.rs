//! `cargo xtask`: the one build entry point of Creditvisor.

fn main() {
    eprintln!("xtask: not built yet");
    std::process::exit(2);
}
