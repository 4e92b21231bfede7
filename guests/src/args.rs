//! `key=value` arguments from the VM configuration's `args` (docs/guest-abi.md, `BootInfo::cmdline`).

/// The value of `key` in a space-separated `key=value` list.
pub fn get<'a>(cmdline: &'a str, key: &str) -> Option<&'a str> {
    cmdline.split_ascii_whitespace().find_map(|word| {
        let (k, v) = word.split_once('=')?;
        (k == key).then_some(v)
    })
}

/// A numeric argument, or `default` when absent; a malformed number stops the guest with a message.
pub fn u64_or(cmdline: &str, key: &str, default: u64) -> u64 {
    match get(cmdline, key) {
        None => default,
        Some(text) => text.parse().unwrap_or_else(|_| {
            crate::println!("guest: argument {key}={text} is not a number");
            crate::exit(0xa49)
        }),
    }
}
