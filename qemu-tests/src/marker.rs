//! Parser for the machine-readable `CV:` lines of the serial console (docs/console.md).
//!
//! Design: a marker is a whole line `CV:<WORD> key=value key="value with spaces" flag ...`, where a
//! flag is a bare word (`online` in `CV:CPU`). The parser is
//! tolerant of what firmware and GRUB leave on the same serial port (ANSI escape sequences, carriage
//! returns, other control bytes): those are stripped before the line is examined, and only a line that
//! then *begins* with `CV:` is a marker. Everything else is an ordinary log line and yields `None`.
//!
//! Invariants: parsing never panics on any input; a line that begins with `CV:` but is malformed
//! (no word, unterminated quote, a pair without a key) is reported as a [`MarkerError`] so a garbled
//! marker is seen as a failure, not silently skipped.

use std::fmt;

/// One parsed `CV:` marker: its word (e.g. `DONE`) and its `key=value` pairs in order.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Marker {
    /// The word after `CV:`, e.g. `BOOT`, `TEST`, `DONE`.
    pub kind: String,
    /// `key=value` pairs in the order they appeared; quoted values are unquoted.
    pub fields: Vec<(String, String)>,
    /// Bare words among the pairs, e.g. `online` in `CV:CPU id=1 apic=1 online`.
    pub flags: Vec<String>,
    /// The cleaned line the marker was parsed from (for messages).
    pub line: String,
}

impl Marker {
    /// The value of `key`, if present (first occurrence).
    #[must_use]
    pub fn get(&self, key: &str) -> Option<&str> {
        self.fields
            .iter()
            .find(|(k, _)| k == key)
            .map(|(_, v)| v.as_str())
    }

    /// True if the bare word `flag` appeared.
    #[must_use]
    pub fn has_flag(&self, flag: &str) -> bool {
        self.flags.iter().any(|f| f == flag)
    }

    /// The value of `key` parsed as an unsigned integer (decimal, or hex with `0x`).
    #[must_use]
    pub fn get_u64(&self, key: &str) -> Option<u64> {
        let v = self.get(key)?;
        match v.strip_prefix("0x") {
            Some(hex) => u64::from_str_radix(hex, 16).ok(),
            None => v.parse().ok(),
        }
    }
}

impl fmt::Display for Marker {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.line)
    }
}

/// A line that starts with `CV:` but does not follow the marker grammar.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("malformed marker line {line:?}: {reason}")]
pub struct MarkerError {
    /// The cleaned line.
    pub line: String,
    /// What is wrong with it.
    pub reason: &'static str,
}

/// Removes ANSI escape sequences (CSI `ESC [ ... final`, and two-byte `ESC x`) and every other control
/// character, leaving printable text. Tabs become spaces.
#[must_use]
pub fn clean_line(raw: &str) -> String {
    let mut out = String::with_capacity(raw.len());
    let mut chars = raw.chars().peekable();
    while let Some(c) = chars.next() {
        match c {
            '\u{1b}' => {
                // CSI: parameters and intermediates, then one final byte in 0x40..=0x7e. Any other
                // escape is two bytes (e.g. `ESC c`); its second byte is consumed by `next()`.
                if chars.next() == Some('[') {
                    for c in chars.by_ref() {
                        if ('\u{40}'..='\u{7e}').contains(&c) {
                            break;
                        }
                    }
                }
            }
            '\t' => out.push(' '),
            c if c.is_control() => {}
            c => out.push(c),
        }
    }
    out
}

/// Parses one line of serial output. `None`: not a marker. `Some(Err)`: a garbled marker.
#[must_use]
pub fn parse_line(raw: &str) -> Option<Result<Marker, MarkerError>> {
    let line = clean_line(raw);
    let trimmed = line.trim_end();
    let rest = trimmed.strip_prefix("CV:")?;
    Some(
        parse_body(rest)
            .map_err(|reason| MarkerError {
                line: trimmed.to_string(),
                reason,
            })
            .map(|(kind, fields, flags)| Marker {
                kind,
                fields,
                flags,
                line: trimmed.to_string(),
            }),
    )
}

type Body = (String, Vec<(String, String)>, Vec<String>);

fn parse_body(rest: &str) -> Result<Body, &'static str> {
    let (kind, mut tail) = match rest.find(' ') {
        Some(i) => (&rest[..i], &rest[i..]),
        None => (rest, ""),
    };
    if kind.is_empty() || !kind.chars().all(|c| c.is_ascii_uppercase() || c == '_') {
        return Err("marker word must be upper-case letters right after `CV:`");
    }
    let mut fields = Vec::new();
    let mut flags = Vec::new();
    loop {
        tail = tail.trim_start_matches(' ');
        if tail.is_empty() {
            break;
        }
        let word_end = tail.find(' ').unwrap_or(tail.len());
        let Some(eq) = tail[..word_end].find('=') else {
            let flag = &tail[..word_end];
            if flag.contains('"') {
                return Err("stray quote in a bare word");
            }
            flags.push(flag.to_string());
            tail = &tail[word_end..];
            continue;
        };
        let key = &tail[..eq];
        if key.is_empty() {
            return Err("pair without a key");
        }
        let after = &tail[eq + 1..];
        let (value, next) = if let Some(quoted) = after.strip_prefix('"') {
            let close = quoted.find('"').ok_or("unterminated quoted value")?;
            let next = &quoted[close + 1..];
            if !(next.is_empty() || next.starts_with(' ')) {
                return Err("text directly after a closing quote");
            }
            (&quoted[..close], next)
        } else {
            match after.find(' ') {
                Some(i) => (&after[..i], &after[i..]),
                None => (after, ""),
            }
        };
        fields.push((key.to_string(), value.to_string()));
        tail = next;
    }
    Ok((kind.to_string(), fields, flags))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ok(line: &str) -> Marker {
        parse_line(line).expect("is a marker").expect("parses")
    }

    #[test]
    fn ordinary_log_lines_are_not_markers() {
        assert!(parse_line("[    0.000000] INFO  cpu0 boot: hello").is_none());
        assert!(parse_line("").is_none());
        assert!(
            parse_line("  CV:DONE status=pass").is_none(),
            "must begin the line"
        );
    }

    #[test]
    fn parses_plain_and_quoted_values() {
        let m = ok("CV:BOOT loader=multiboot2 firmware=uefi cmdline=\"selftest=all exit=emu\"");
        assert_eq!(m.kind, "BOOT");
        assert_eq!(m.get("loader"), Some("multiboot2"));
        assert_eq!(m.get("firmware"), Some("uefi"));
        assert_eq!(m.get("cmdline"), Some("selftest=all exit=emu"));
        assert_eq!(m.get("missing"), None);
    }

    #[test]
    fn parses_empty_quoted_value_and_word_only_marker() {
        let m = ok("CV:BOOT cmdline=\"\" loader=multiboot1");
        assert_eq!(m.get("cmdline"), Some(""));
        assert_eq!(m.get("loader"), Some("multiboot1"));
        let m = ok("CV:DONE");
        assert_eq!(m.kind, "DONE");
        assert!(m.fields.is_empty());
        let m = ok("CV:CPU id=1 apic=2 online");
        assert!(m.has_flag("online"));
        assert_eq!(m.get_u64("apic"), Some(2));
    }

    #[test]
    fn numbers_decimal_and_hex() {
        let m =
            ok("CV:EXCEPTION cpu=1 vector=14 name=#PF error=0x2 rip=0xffff800000101234 cr2=0x0");
        assert_eq!(m.get_u64("cpu"), Some(1));
        assert_eq!(m.get_u64("vector"), Some(14));
        assert_eq!(m.get_u64("rip"), Some(0xffff_8000_0010_1234));
        assert_eq!(m.get_u64("name"), None);
    }

    #[test]
    fn strips_escape_sequences_and_carriage_returns() {
        let m = ok("\u{1b}[2J\u{1b}[0;0HCV:SMP online=2 expected=2\r");
        assert_eq!(m.kind, "SMP");
        assert_eq!(m.get_u64("online"), Some(2));
        assert_eq!(m.line, "CV:SMP online=2 expected=2");
    }

    #[test]
    fn garbled_markers_are_errors_not_ignored() {
        for bad in [
            "CV:",
            "CV: DONE",
            "CV:done status=pass",
            "CV:DONE st\"atus",
            "CV:PANIC message=\"no end",
            "CV:PANIC message=\"x\"y",
            "CV:DONE =pass",
        ] {
            assert!(
                matches!(parse_line(bad), Some(Err(_))),
                "{bad:?} should be an error"
            );
        }
    }

    #[test]
    fn never_panics_on_arbitrary_bytes() {
        let samples = [
            "CV:A=\"",
            "CV:\u{1b}",
            "\u{1b}[",
            "CV:X a=b=c",
            "CV:X a=\"\" b",
            "CV:X 🦀=1",
        ];
        for s in samples {
            let _ = parse_line(s);
        }
        let m = ok("CV:X a=b=c");
        assert_eq!(m.get("a"), Some("b=c"));
    }
}
