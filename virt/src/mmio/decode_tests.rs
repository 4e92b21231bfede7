//! Every decoder form against hand-assembled bytes, the error cases, the GNU assembler (when installed) on a
//! generated table of several hundred instructions, and arbitrary bytes.
extern crate std;

use alloc::format;
use alloc::string::String;
use alloc::vec::Vec;

use proptest::prelude::*;

use super::*;
use crate::exit::AccessSize::{Byte, Dword, Qword, Word};
use CpuMode::{Bits16, Bits32, Bits64};

fn load(reg: Gpr, high_byte: bool, width: AccessSize, extend: Extend) -> Op {
    Op::Load(Dest {
        reg,
        high_byte,
        width,
        extend,
    })
}

fn st(reg: Gpr) -> Op {
    Op::Store(Source::Reg {
        reg,
        high_byte: false,
    })
}

fn ok(len: u8, size: AccessSize, op: Op) -> Result<Decoded, DecodeError> {
    Ok(Decoded { len, size, op })
}

#[test]
#[allow(clippy::too_many_lines)] // one table
fn hand_assembled_forms() {
    use Gpr::*;
    let n = Extend::None;
    let cases: &[(&[u8], CpuMode, Result<Decoded, DecodeError>)] = &[
        // 89 /r: mov [rdx], eax; mov [rdx], rax; mov [rdx], ax; mov [r9+0x10], r10d
        (&[0x89, 0x02], Bits64, ok(2, Dword, st(Rax))),
        (&[0x48, 0x89, 0x02], Bits64, ok(3, Qword, st(Rax))),
        (&[0x66, 0x89, 0x02], Bits64, ok(3, Word, st(Rax))),
        (&[0x45, 0x89, 0x51, 0x10], Bits64, ok(4, Dword, st(R10))),
        // 88 /r: mov [rax], bh (no REX: high byte); mov [rax], dil (REX: low byte of RDI)
        (
            &[0x88, 0x38],
            Bits64,
            ok(
                2,
                Byte,
                Op::Store(Source::Reg {
                    reg: Rbx,
                    high_byte: true,
                }),
            ),
        ),
        (&[0x40, 0x88, 0x38], Bits64, ok(3, Byte, st(Rdi))),
        // 8B /r: mov eax, [rdi]; mov r15, [rsp+8] (SIB + disp8); mov ecx, [rip+0x1000]; mov edx, [rbp] (disp8 0)
        (
            &[0x8B, 0x07],
            Bits64,
            ok(2, Dword, load(Rax, false, Dword, n)),
        ),
        (
            &[0x4C, 0x8B, 0x7C, 0x24, 0x08],
            Bits64,
            ok(5, Qword, load(R15, false, Qword, n)),
        ),
        (
            &[0x8B, 0x0D, 0x00, 0x10, 0x00, 0x00],
            Bits64,
            ok(6, Dword, load(Rcx, false, Dword, n)),
        ),
        (
            &[0x8B, 0x55, 0x00],
            Bits64,
            ok(3, Dword, load(Rdx, false, Dword, n)),
        ),
        // mov eax, [rax+rbx*4+0x12345678] (SIB + disp32); mov eax, [0x1000] (SIB, no base: disp32)
        (
            &[0x8B, 0x84, 0x98, 0x78, 0x56, 0x34, 0x12],
            Bits64,
            ok(7, Dword, load(Rax, false, Dword, n)),
        ),
        (
            &[0x8B, 0x04, 0x25, 0x00, 0x10, 0x00, 0x00],
            Bits64,
            ok(7, Dword, load(Rax, false, Dword, n)),
        ),
        // 8A /r: mov ah, [rsi]; mov r8b, [rsi]
        (&[0x8A, 0x26], Bits64, ok(2, Byte, load(Rax, true, Byte, n))),
        (
            &[0x44, 0x8A, 0x06],
            Bits64,
            ok(3, Byte, load(R8, false, Byte, n)),
        ),
        // mov ax, fs:[rbx] (66 64 8B 03); mov eax, [eax] (67 8B 00)
        (
            &[0x66, 0x64, 0x8B, 0x03],
            Bits64,
            ok(4, Word, load(Rax, false, Word, n)),
        ),
        (
            &[0x67, 0x8B, 0x00],
            Bits64,
            ok(3, Dword, load(Rax, false, Dword, n)),
        ),
        // C6 /0: mov byte [rax], 0x5a; C7 /0: mov dword [rax+4], 0x11223344; mov word [rax], 0xbeef;
        // mov qword [rax], -2 (imm32 sign-extended)
        (
            &[0xC6, 0x00, 0x5A],
            Bits64,
            ok(3, Byte, Op::Store(Source::Imm(0x5A))),
        ),
        (
            &[0xC7, 0x40, 0x04, 0x44, 0x33, 0x22, 0x11],
            Bits64,
            ok(7, Dword, Op::Store(Source::Imm(0x1122_3344))),
        ),
        (
            &[0x66, 0xC7, 0x00, 0xEF, 0xBE],
            Bits64,
            ok(5, Word, Op::Store(Source::Imm(0xBEEF))),
        ),
        (
            &[0x48, 0xC7, 0x00, 0xFE, 0xFF, 0xFF, 0xFF],
            Bits64,
            ok(7, Qword, Op::Store(Source::Imm(u64::MAX - 1))),
        ),
        // A0-A3 moffs: 64-bit offsets in 64-bit mode, 32-bit with 67
        (
            &[0xA0, 1, 2, 3, 4, 5, 6, 7, 8],
            Bits64,
            ok(9, Byte, load(Rax, false, Byte, n)),
        ),
        (
            &[0x48, 0xA1, 1, 2, 3, 4, 5, 6, 7, 8],
            Bits64,
            ok(10, Qword, load(Rax, false, Qword, n)),
        ),
        (
            &[0xA2, 1, 2, 3, 4, 5, 6, 7, 8],
            Bits64,
            ok(9, Byte, st(Rax)),
        ),
        (&[0x67, 0xA3, 1, 2, 3, 4], Bits64, ok(6, Dword, st(Rax))),
        // MOVZX / MOVSX: movzx eax, byte [rdx]; movzx r9, word [rdx]; movsx ecx, byte [rdx]; movsx rax, word [rdx];
        // movzx ax, byte [rdx]
        (
            &[0x0F, 0xB6, 0x02],
            Bits64,
            ok(3, Byte, load(Rax, false, Dword, Extend::Zero)),
        ),
        (
            &[0x4C, 0x0F, 0xB7, 0x0A],
            Bits64,
            ok(4, Word, load(R9, false, Qword, Extend::Zero)),
        ),
        (
            &[0x0F, 0xBE, 0x0A],
            Bits64,
            ok(3, Byte, load(Rcx, false, Dword, Extend::Sign)),
        ),
        (
            &[0x48, 0x0F, 0xBF, 0x02],
            Bits64,
            ok(4, Word, load(Rax, false, Qword, Extend::Sign)),
        ),
        (
            &[0x66, 0x0F, 0xB6, 0x02],
            Bits64,
            ok(4, Byte, load(Rax, false, Word, Extend::Zero)),
        ),
        // A REX prefix followed by a legacy prefix is ignored: 48 66 89 02 is a 16-bit store.
        (&[0x48, 0x66, 0x89, 0x02], Bits64, ok(4, Word, st(Rax))),
        // 32-bit mode: 40 is INC, not REX; 66 selects 16 bits; 67 selects 16-bit addressing (disp16).
        (&[0x89, 0x02], Bits32, ok(2, Dword, st(Rax))),
        (&[0x40, 0x89, 0x02], Bits32, Err(DecodeError::Unsupported)),
        (
            &[0x67, 0x8B, 0x06, 0x34, 0x12],
            Bits32,
            ok(5, Dword, load(Rax, false, Dword, n)),
        ),
        (&[0xA3, 1, 2, 3, 4], Bits32, ok(5, Dword, st(Rax))),
        // 16-bit mode: operand 16 by default, 66 makes it 32; mod 10 is disp16; moffs16.
        (
            &[0x8B, 0x87, 0x34, 0x12],
            Bits16,
            ok(4, Word, load(Rax, false, Word, n)),
        ),
        (&[0x66, 0x89, 0x04], Bits16, ok(3, Dword, st(Rax))),
        (
            &[0xA1, 0x00, 0x10],
            Bits16,
            ok(3, Word, load(Rax, false, Word, n)),
        ),
        (
            &[0xC7, 0x06, 0x00, 0x10, 0x34, 0x12],
            Bits16,
            ok(6, Word, Op::Store(Source::Imm(0x1234))),
        ),
    ];
    for (bytes, mode, expect) in cases {
        assert_eq!(decode(bytes, *mode), *expect, "{bytes:02x?} in {mode:?}");
    }
}

#[test]
fn rejected_and_broken_encodings() {
    let cases: &[(&[u8], DecodeError)] = &[
        (&[0x89], DecodeError::Truncated),
        (&[0x8B, 0x84, 0x98, 0x78, 0x56], DecodeError::Truncated),
        (&[0xC7, 0x00, 0x01, 0x02], DecodeError::Truncated),
        (&[0x48, 0xA1, 1, 2, 3], DecodeError::Truncated),
        (&[], DecodeError::Truncated),
        (&[0xF3, 0xA5], DecodeError::Unsupported), // rep movsd
        (&[0xF2, 0x89, 0x02], DecodeError::Unsupported),
        (&[0xF0, 0x89, 0x02], DecodeError::Unsupported),
        (&[0x01, 0x02], DecodeError::Unsupported), // add [rdx], eax
        (&[0x0F, 0x10, 0x02], DecodeError::Unsupported), // movups
        (&[0xC7, 0x08, 0, 0, 0, 0], DecodeError::Unsupported), // C7 /1
        (&[0xC6, 0xF8, 0x00], DecodeError::NotMemory), // xabort is mod 11
        (&[0x89, 0xC0], DecodeError::NotMemory),   // mov eax, eax
        (
            &[
                0x66, 0x66, 0x66, 0x66, 0x66, 0x66, 0x66, 0x66, 0x66, 0x66, 0x66, 0x66, 0x66, 0x89,
                0x04, 0x24,
            ],
            DecodeError::TooLong,
        ),
    ];
    for (bytes, e) in cases {
        assert_eq!(decode(bytes, Bits64), Err(*e), "{bytes:02x?}");
    }
    // Exactly 15 bytes is legal: 11 prefixes + 48 C7 00 imm32 would be 18; 4 x 66 + C7 04 24 imm16... use 9 x 66.
    let mut fifteen = [0x66u8; 15];
    fifteen[9..].copy_from_slice(&[0xC7, 0x04, 0x24, 0x00, 0x10, 0x01]);
    // 9 prefixes + C7 04 24 + imm16 = 14 bytes, the 15th is the next instruction's.
    assert_eq!(
        decode(&fifteen, Bits64),
        ok(14, Word, Op::Store(Source::Imm(0x1000)))
    );
}

#[test]
fn string_io_forms() {
    let sio = |len, input, size, addr, seg, rep| {
        Ok(StringIo {
            len,
            input,
            size,
            addr,
            seg,
            rep,
        })
    };
    let cases: &[(&[u8], CpuMode, Result<StringIo, DecodeError>)] = &[
        // rep outsb; outsd; rep insw (66); REX.W does not make a 64-bit element; addr32 rep insd; fs outsb
        (
            &[0xF3, 0x6E],
            Bits64,
            sio(2, false, Byte, Qword, None, true),
        ),
        (&[0x6F], Bits64, sio(1, false, Dword, Qword, None, false)),
        (
            &[0x66, 0xF3, 0x6D],
            Bits64,
            sio(3, true, Word, Qword, None, true),
        ),
        (
            &[0x48, 0x6F],
            Bits64,
            sio(2, false, Dword, Qword, None, false),
        ),
        (
            &[0x67, 0xF3, 0x6D],
            Bits64,
            sio(3, true, Dword, Dword, None, true),
        ),
        (
            &[0x64, 0x6E],
            Bits64,
            sio(2, false, Byte, Qword, Some(0x64), false),
        ),
        (&[0xF2, 0x6C], Bits64, sio(2, true, Byte, Qword, None, true)),
        // 32-bit code: 66 makes words, 67 makes 16-bit addressing; 16-bit code: 66 makes doublewords
        (
            &[0x66, 0x6F],
            Bits32,
            sio(2, false, Word, Dword, None, false),
        ),
        (
            &[0x67, 0x6E],
            Bits32,
            sio(2, false, Byte, Word, None, false),
        ),
        (
            &[0x66, 0x6F],
            Bits16,
            sio(2, false, Dword, Word, None, false),
        ),
        (
            &[0x2E, 0xF3, 0x6F],
            Bits16,
            sio(3, false, Word, Word, Some(0x2E), true),
        ),
        (&[0xF0, 0x6E], Bits64, Err(DecodeError::Unsupported)),
        (&[0xA4], Bits64, Err(DecodeError::Unsupported)), // movsb
        (&[0xF3], Bits64, Err(DecodeError::Truncated)),
    ];
    for (bytes, mode, expect) in cases {
        assert_eq!(
            decode_string_io(bytes, *mode),
            *expect,
            "{bytes:02x?} in {mode:?}"
        );
    }
}

/// One generated instruction: its Intel-syntax text and what the decoder must say about it.
struct Case {
    text: String,
    size: AccessSize,
    op: Op,
}

const R64: [&str; 16] = [
    "rax", "rcx", "rdx", "rbx", "rsp", "rbp", "rsi", "rdi", "r8", "r9", "r10", "r11", "r12", "r13",
    "r14", "r15",
];
const R32: [&str; 16] = [
    "eax", "ecx", "edx", "ebx", "esp", "ebp", "esi", "edi", "r8d", "r9d", "r10d", "r11d", "r12d",
    "r13d", "r14d", "r15d",
];
const R16: [&str; 16] = [
    "ax", "cx", "dx", "bx", "sp", "bp", "si", "di", "r8w", "r9w", "r10w", "r11w", "r12w", "r13w",
    "r14w", "r15w",
];
const R8: [&str; 16] = [
    "al", "cl", "dl", "bl", "spl", "bpl", "sil", "dil", "r8b", "r9b", "r10b", "r11b", "r12b",
    "r13b", "r14b", "r15b",
];
const HIGH8: [&str; 4] = ["ah", "ch", "dh", "bh"];

/// Memory operands covering every ModRM/SIB/displacement shape (none uses r8-r15, so AH..BH stay encodable in the
/// `legacy` subset).
const MEM_LEGACY: [&str; 10] = [
    "[rax]",
    "[rsp]",
    "[rbp]",
    "[rsp+0x10]",
    "[rbx+0x12345678]",
    "[rax+rcx*4]",
    "[rax+rdi*8-0x80]",
    "[rip+0x1000]",
    "[0x2000]",
    "fs:[rdx+rsi*2+0x7fffffff]",
];
const MEM_REX: [&str; 6] = [
    "[r12]",
    "[r13]",
    "[r8+r15*2+0x40]",
    "[eax]",
    "[r9d+0x100]",
    "gs:[r11]",
];

fn widths() -> [(AccessSize, &'static str, &'static [&'static str; 16]); 4] {
    [
        (Byte, "byte", &R8),
        (Word, "word", &R16),
        (Dword, "dword", &R32),
        (Qword, "qword", &R64),
    ]
}

#[allow(clippy::too_many_lines)]
fn generated_cases() -> Vec<Case> {
    let mut cases = Vec::new();
    let mems: Vec<(&str, bool)> = MEM_LEGACY
        .iter()
        .map(|m| (*m, true))
        .chain(MEM_REX.iter().map(|m| (*m, false)))
        .collect();
    for &(mem, legacy) in &mems {
        for (size, ptr, regs) in widths() {
            for (i, name) in regs.iter().enumerate() {
                let reg = Gpr::ALL[i];
                cases.push(Case {
                    text: format!("mov {ptr} ptr {mem}, {name}"),
                    size,
                    op: st(reg),
                });
                cases.push(Case {
                    text: format!("mov {name}, {ptr} ptr {mem}"),
                    size,
                    op: load(reg, false, size, Extend::None),
                });
            }
            let imm: u64 = match size {
                Byte => 0x81,
                Word => 0x8123,
                Dword | Qword => 0x8123_4567,
            };
            let value = if size == Qword {
                crate::mmio::sign_extend(imm, Dword)
            } else {
                imm
            };
            // GNU as takes a qword immediate as the signed value it sign-extends from.
            let imm_text = if size == Qword {
                format!("-{:#x}", 0x1_0000_0000 - imm)
            } else {
                format!("{imm:#x}")
            };
            cases.push(Case {
                text: format!("mov {ptr} ptr {mem}, {imm_text}"),
                size,
                op: Op::Store(Source::Imm(value)),
            });
        }
        if legacy {
            for (i, name) in HIGH8.iter().enumerate() {
                let reg = Gpr::ALL[i];
                cases.push(Case {
                    text: format!("mov byte ptr {mem}, {name}"),
                    size: Byte,
                    op: Op::Store(Source::Reg {
                        reg,
                        high_byte: true,
                    }),
                });
                cases.push(Case {
                    text: format!("mov {name}, byte ptr {mem}"),
                    size: Byte,
                    op: load(reg, true, Byte, Extend::None),
                });
            }
        }
        for (ext, mnemonic) in [(Extend::Zero, "movzx"), (Extend::Sign, "movsx")] {
            for (src, sptr) in [(Byte, "byte"), (Word, "word")] {
                for (dst, _, regs) in widths() {
                    if dst.bytes() <= src.bytes() {
                        continue;
                    }
                    for (i, name) in regs.iter().enumerate() {
                        cases.push(Case {
                            text: format!("{mnemonic} {name}, {sptr} ptr {mem}"),
                            size: src,
                            op: load(Gpr::ALL[i], false, dst, ext),
                        });
                    }
                }
            }
        }
    }
    for (size, ptr, regs) in widths() {
        cases.push(Case {
            text: format!("movabs {}, {ptr} ptr [0x1122334455667788]", regs[0]),
            size,
            op: load(Gpr::Rax, false, size, Extend::None),
        });
        cases.push(Case {
            text: format!("movabs {ptr} ptr [0x1122334455667788], {}", regs[0]),
            size,
            op: st(Gpr::Rax),
        });
    }
    cases
}

/// Assembles `cases` with GNU as (Intel syntax, `mode`'s code size) into flat bytes; `None` if no assembler is
/// installed.
fn assemble(cases: &[Case], mode: CpuMode) -> Option<Vec<u8>> {
    use std::process::Command;
    let (code, arch) = match mode {
        Bits64 => (".code64", "--64"),
        Bits32 => (".code32", "--32"),
        Bits16 => (".code16", "--32"),
    };
    let dir = std::env::temp_dir().join(format!("cv-decode-{}-{code}", std::process::id()));
    std::fs::create_dir_all(&dir).ok()?;
    let src = dir.join("t.s");
    let obj = dir.join("t.o");
    let bin = dir.join("t.bin");
    let mut text = format!(".intel_syntax noprefix\n{code}\n");
    for c in cases {
        text.push_str(&c.text);
        text.push('\n');
    }
    std::fs::write(&src, text).ok()?;
    let status = Command::new("as")
        .args([arch, "-o"])
        .arg(&obj)
        .arg(&src)
        .status()
        .ok()?;
    assert!(
        status.success(),
        "as rejected the generated table ({src:?})"
    );
    let status = Command::new("objcopy")
        .args(["-O", "binary", "--only-section=.text"])
        .arg(&obj)
        .arg(&bin)
        .status()
        .ok()?;
    assert!(status.success(), "objcopy failed");
    let bytes = std::fs::read(&bin).ok()?;
    let _ = std::fs::remove_dir_all(&dir);
    Some(bytes)
}

/// Decodes the assembled stream instruction by instruction: every case must decode to its expectation, and the
/// lengths must add up to the stream (a wrong length would drift off the instruction boundaries).
fn check_against_assembler(cases: &[Case], mode: CpuMode) {
    let Some(bytes) = assemble(cases, mode) else {
        std::eprintln!("SKIPPED: GNU as/objcopy not installed; the hand-assembled table still ran");
        return;
    };
    let mut at = 0usize;
    for c in cases {
        let d = decode(&bytes[at..], mode)
            .unwrap_or_else(|e| panic!("{}: {e:?} at {at} ({:02x?})", c.text, &bytes[at..]));
        assert_eq!((d.size, d.op), (c.size, c.op), "{} ({mode:?})", c.text);
        at += usize::from(d.len);
    }
    assert_eq!(at, bytes.len(), "decoded lengths do not add up ({mode:?})");
    std::eprintln!(
        "{} instructions ({} bytes) assembled by GNU as and decoded in {mode:?}",
        cases.len(),
        bytes.len()
    );
}

#[test]
fn the_assembler_agrees_on_every_generated_form() {
    let cases = generated_cases();
    assert!(cases.len() > 500, "{} generated cases", cases.len());
    check_against_assembler(&cases, Bits64);
}

/// The same forms in 32-bit and 16-bit code, with 32-bit and 16-bit addressing (the assembler adds 66/67 as each
/// mode needs them).
fn legacy_cases() -> Vec<Case> {
    const MEM: [&str; 13] = [
        "[eax]",
        "[esp]",
        "[ebp]",
        "[esp+0x10]",
        "[ebx+0x12345678]",
        "[eax+ecx*4-0x80]",
        "[0x2000]",
        "fs:[edx+esi*2+0x7fffffff]",
        "[bx+si]",
        "[bp]",
        "[bp+di+0x10]",
        "[si+0x1234]",
        "es:[di]",
    ];
    let mut cases = Vec::new();
    for mem in MEM {
        for (size, ptr, regs) in widths().into_iter().take(3) {
            for (i, name) in regs.iter().take(8).enumerate() {
                let (reg, high_byte, name) = if size == Byte && i >= 4 {
                    (Gpr::ALL[i - 4], true, HIGH8[i - 4])
                } else {
                    (Gpr::ALL[i], false, *name)
                };
                cases.push(Case {
                    text: format!("mov {ptr} ptr {mem}, {name}"),
                    size,
                    op: Op::Store(Source::Reg { reg, high_byte }),
                });
                cases.push(Case {
                    text: format!("mov {name}, {ptr} ptr {mem}"),
                    size,
                    op: load(reg, high_byte, size, Extend::None),
                });
            }
            let imm = [0x81, 0x8123, 0x8123_4567][usize::from(size.bytes() / 2)];
            cases.push(Case {
                text: format!("mov {ptr} ptr {mem}, {imm:#x}"),
                size,
                op: Op::Store(Source::Imm(imm)),
            });
        }
        for (ext, mnemonic) in [(Extend::Zero, "movzx"), (Extend::Sign, "movsx")] {
            for (src, sptr) in [(Byte, "byte"), (Word, "word")] {
                for (dst, regs) in [(Word, &R16), (Dword, &R32)] {
                    if dst.bytes() <= src.bytes() {
                        continue;
                    }
                    for (i, name) in regs.iter().take(8).enumerate() {
                        cases.push(Case {
                            text: format!("{mnemonic} {name}, {sptr} ptr {mem}"),
                            size: src,
                            op: load(Gpr::ALL[i], false, dst, ext),
                        });
                    }
                }
            }
        }
    }
    cases
}

#[test]
fn the_assembler_agrees_in_32_and_16_bit_code() {
    let cases = legacy_cases();
    check_against_assembler(&cases, Bits32);
    check_against_assembler(&cases, Bits16);
}

proptest! {
    /// Arbitrary bytes never panic, and a decoded length never exceeds 15 or the bytes given.
    #[test]
    fn arbitrary_bytes_never_panic(bytes in proptest::collection::vec(any::<u8>(), 0..20), mode in 0u8..3) {
        let mode = [Bits16, Bits32, Bits64][usize::from(mode)];
        if let Ok(d) = decode(&bytes, mode) {
            prop_assert!(usize::from(d.len) <= bytes.len().min(MAX_LEN));
            prop_assert!(d.len >= 1);
        }
    }
}
