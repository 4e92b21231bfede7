//! The CPUID a guest sees: the host's values filtered through allow masks, plus the hypervisor leaves.
//!
//! Design: the kernel captures the host leaves once per VM ([`CpuidPolicy::from_host`], with a closure that
//! executes CPUID), so answering a guest is a pure table lookup that the host tests drive with fake values.
//! Feature bits are *allowed*, not *denied*: a bit not named in a mask below reads as zero, so a new feature of a
//! future CPU stays hidden until someone decides the guest may use it. Hidden on purpose (SDM Vol. 2A, CPUID):
//! VMX/SVM/SMX (no nested virtualisation), MONITOR/MWAIT, the local APIC, x2APIC and TSC-deadline (no interrupt
//! controller in guest ABI v1), MTRR/MCE/MCA (their MSRs are not emulated), XSAVE/AVX (XSETBV is not handled),
//! PCID/INVPCID, performance monitoring, RDTSCP/TSC_AUX, TSX, SGX, MPX, PT, AVX-512 and the speculation-control
//! MSR features. The initial APIC ID in leaf 1 is the vCPU index and the "logical processors" count the VM's
//! vCPUs. Leaf `0x4000_0000` announces Creditvisor; leaf `0x4000_0001` gives the guest ABI version and the
//! guest TSC frequency in kHz (docs/guest-abi.md).

/// One CPUID answer.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct CpuidResult {
    pub eax: u32,
    pub ebx: u32,
    pub ecx: u32,
    pub edx: u32,
}

/// Guest ABI version announced in leaf `0x4000_0001` (docs/guest-abi.md).
pub const GUEST_ABI_VERSION: u32 = 2;
/// First hypervisor leaf.
pub const HV_LEAF: u32 = 0x4000_0000;
/// Last hypervisor leaf.
pub const HV_MAX_LEAF: u32 = 0x4000_0001;
/// The signature in EBX, ECX, EDX of leaf `0x4000_0000`.
pub const SIGNATURE: &[u8; 12] = b"CreditvisorV";

/// Highest basic leaf a guest sees.
const MAX_BASIC: u32 = 7;
/// Highest extended leaf a guest sees.
const MAX_EXTENDED: u32 = 0x8000_0008;

const fn bits(list: &[u32]) -> u32 {
    let mut mask = 0;
    let mut i = 0;
    while i < list.len() {
        mask |= 1 << list[i];
        i += 1;
    }
    mask
}

/// Leaf 1 ECX: SSE3, PCLMULQDQ, SSSE3, CX16, SSE4.1, SSE4.2, MOVBE, POPCNT, AES, RDRAND.
pub const LEAF1_ECX_ALLOW: u32 = bits(&[0, 1, 9, 13, 19, 20, 22, 23, 25, 30]);
/// Leaf 1 ECX bit 31: "running under a hypervisor".
pub const LEAF1_ECX_HYPERVISOR: u32 = 1 << 31;
/// Leaf 1 ECX bit 5 (VMX): never set for a guest.
pub const LEAF1_ECX_VMX: u32 = 1 << 5;
/// Leaf 1 EDX: FPU, VME, DE, PSE, TSC, MSR, PAE, CX8, SEP, PGE, CMOV, PAT, PSE36, CLFSH, MMX, FXSR, SSE, SSE2.
pub const LEAF1_EDX_ALLOW: u32 = bits(&[
    0, 1, 2, 3, 4, 5, 6, 8, 11, 13, 15, 16, 17, 19, 23, 24, 25, 26,
]);
/// Leaf 7.0 EBX: BMI1, SMEP, BMI2, ERMS, RDSEED, ADX, SMAP, CLFLUSHOPT, SHA.
pub const LEAF7_EBX_ALLOW: u32 = bits(&[3, 7, 8, 9, 18, 19, 20, 23, 29]);
/// Leaf 0x8000_0001 ECX: LAHF/SAHF, ABM, SSE4A, MisAlignSse, PREFETCHW (SVM, bit 2, is not among them).
pub const EXT1_ECX_ALLOW: u32 = bits(&[0, 5, 6, 7, 8]);
/// Leaf 0x8000_0001 ECX bit 2 (SVM): never set for a guest.
pub const EXT1_ECX_SVM: u32 = 1 << 2;
/// Leaf 0x8000_0001 EDX: the leaf-1 mirrors above, SYSCALL, NX, MmxExt, FFXSR, 1 GiB pages, long mode.
pub const EXT1_EDX_ALLOW: u32 = bits(&[
    0, 1, 2, 3, 4, 5, 6, 8, 11, 13, 15, 16, 17, 20, 22, 23, 24, 25, 26, 29,
]);
/// Leaf 0x8000_0007 EDX: invariant TSC only (the guest TSC is the host TSC plus an offset).
pub const EXT7_EDX_ALLOW: u32 = 1 << 8;

/// The host leaves a guest's CPUID is derived from.
#[derive(Clone, Debug)]
pub struct CpuidPolicy {
    basic: [CpuidResult; MAX_BASIC as usize + 1],
    extended: [CpuidResult; (MAX_EXTENDED - 0x8000_0000) as usize + 1],
    max_basic: u32,
    max_extended: u32,
    tsc_khz: u32,
}

impl CpuidPolicy {
    /// Captures the host leaves with `host(leaf, subleaf)`; `tsc_khz` is the guest TSC frequency.
    pub fn from_host(host: &mut dyn FnMut(u32, u32) -> CpuidResult, tsc_khz: u32) -> Self {
        let mut policy = Self {
            basic: [CpuidResult::default(); MAX_BASIC as usize + 1],
            extended: [CpuidResult::default(); (MAX_EXTENDED - 0x8000_0000) as usize + 1],
            max_basic: 0,
            max_extended: 0,
            tsc_khz,
        };
        let leaf0 = host(0, 0);
        policy.max_basic = leaf0.eax.min(MAX_BASIC);
        for (leaf, slot) in (0..=policy.max_basic).zip(policy.basic.iter_mut()) {
            *slot = host(leaf, 0);
        }
        let ext0 = host(0x8000_0000, 0);
        policy.max_extended = if ext0.eax >= 0x8000_0000 {
            ext0.eax.min(MAX_EXTENDED)
        } else {
            0
        };
        if policy.max_extended != 0 {
            for (leaf, slot) in (0x8000_0000..=policy.max_extended).zip(policy.extended.iter_mut())
            {
                *slot = host(leaf, 0);
            }
        }
        policy
    }

    /// The guest's answer for `leaf`/`subleaf` on vCPU `vcpu_id` of a VM with `vcpu_count` vCPUs.
    pub fn query(&self, leaf: u32, subleaf: u32, vcpu_id: u32, vcpu_count: u32) -> CpuidResult {
        match leaf {
            0..=MAX_BASIC if leaf <= self.max_basic => {
                self.basic_leaf(leaf, subleaf, vcpu_id, vcpu_count)
            }
            HV_LEAF => {
                let sig = |i: usize| {
                    u32::from_le_bytes([
                        SIGNATURE[i],
                        SIGNATURE[i + 1],
                        SIGNATURE[i + 2],
                        SIGNATURE[i + 3],
                    ])
                };
                CpuidResult {
                    eax: HV_MAX_LEAF,
                    ebx: sig(0),
                    ecx: sig(4),
                    edx: sig(8),
                }
            }
            HV_MAX_LEAF => CpuidResult {
                eax: GUEST_ABI_VERSION,
                ebx: self.tsc_khz,
                ecx: 0,
                edx: 0,
            },
            0x8000_0000..=MAX_EXTENDED if self.max_extended != 0 && leaf <= self.max_extended => {
                self.extended_leaf(leaf)
            }
            _ => CpuidResult::default(),
        }
    }

    fn basic_leaf(&self, leaf: u32, subleaf: u32, vcpu_id: u32, vcpu_count: u32) -> CpuidResult {
        let host = self.basic[leaf as usize];
        match leaf {
            0 => CpuidResult {
                eax: self.max_basic,
                ..host
            },
            1 => {
                let count = vcpu_count.min(255);
                let apic_id = vcpu_id.min(255);
                CpuidResult {
                    eax: host.eax,
                    ebx: (host.ebx & 0xffff) | (count << 16) | (apic_id << 24),
                    ecx: (host.ecx & LEAF1_ECX_ALLOW) | LEAF1_ECX_HYPERVISOR,
                    edx: host.edx & LEAF1_EDX_ALLOW,
                }
            }
            2 => host,
            7 if subleaf == 0 => CpuidResult {
                eax: 0,
                ebx: host.ebx & LEAF7_EBX_ALLOW,
                ecx: 0,
                edx: 0,
            },
            _ => CpuidResult::default(),
        }
    }

    fn extended_leaf(&self, leaf: u32) -> CpuidResult {
        let host = self.extended[(leaf - 0x8000_0000) as usize];
        match leaf {
            0x8000_0000 => CpuidResult {
                eax: self.max_extended,
                ..host
            },
            0x8000_0001 => CpuidResult {
                eax: host.eax,
                ebx: 0,
                ecx: host.ecx & EXT1_ECX_ALLOW,
                edx: host.edx & EXT1_EDX_ALLOW,
            },
            0x8000_0002..=0x8000_0006 => host,
            0x8000_0007 => CpuidResult {
                edx: host.edx & EXT7_EDX_ALLOW,
                ..CpuidResult::default()
            },
            0x8000_0008 => CpuidResult {
                eax: host.eax & 0xffff,
                ..CpuidResult::default()
            },
            _ => CpuidResult::default(),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A host with every feature bit set and max leaves beyond what guests see.
    fn everything(leaf: u32, _sub: u32) -> CpuidResult {
        match leaf {
            0 => CpuidResult {
                eax: 0x20,
                ebx: 0x756e_6547,
                ecx: 0x6c65_746e,
                edx: 0x4965_6e69,
            },
            0x8000_0000 => CpuidResult {
                eax: 0x8000_0021,
                ..CpuidResult::default()
            },
            _ => CpuidResult {
                eax: 0xffff_ffff,
                ebx: 0xffff_ffff,
                ecx: 0xffff_ffff,
                edx: 0xffff_ffff,
            },
        }
    }

    #[test]
    fn virtualisation_and_unemulated_features_are_hidden() {
        let p = CpuidPolicy::from_host(&mut everything, 2_000_000);
        let l1 = p.query(1, 0, 0, 1);
        assert_eq!(l1.ecx & LEAF1_ECX_VMX, 0, "VMX visible");
        assert_ne!(l1.ecx & LEAF1_ECX_HYPERVISOR, 0);
        for (bit, what) in [
            (3, "MONITOR"),
            (6, "SMX"),
            (21, "x2APIC"),
            (24, "TSC-deadline"),
            (26, "XSAVE"),
            (28, "AVX"),
        ] {
            assert_eq!(l1.ecx & (1 << bit), 0, "{what} visible");
        }
        for (bit, what) in [
            (9, "APIC"),
            (12, "MTRR"),
            (7, "MCE"),
            (14, "MCA"),
            (28, "HTT"),
        ] {
            assert_eq!(l1.edx & (1 << bit), 0, "{what} visible");
        }
        assert_eq!(
            p.query(0x8000_0001, 0, 0, 1).ecx & EXT1_ECX_SVM,
            0,
            "SVM visible"
        );
        assert_eq!(
            p.query(0x8000_0001, 0, 0, 1).edx & (1 << 27),
            0,
            "RDTSCP visible"
        );
        let l7 = p.query(7, 0, 0, 1);
        assert_eq!(l7.ebx & (1 << 5), 0, "AVX2 visible");
        assert_eq!(l7.ebx & (1 << 16), 0, "AVX-512 visible");
        assert_eq!((l7.eax, l7.ecx, l7.edx), (0, 0, 0));
        assert_eq!(p.query(7, 1, 0, 1), CpuidResult::default());
        assert_eq!(
            p.query(0xd, 0, 0, 1),
            CpuidResult::default(),
            "XSAVE leaf visible"
        );
        assert_eq!(
            p.query(0x8000_000a, 0, 0, 1),
            CpuidResult::default(),
            "SVM leaf visible"
        );
        assert_eq!(p.query(0, 0, 0, 1).eax, MAX_BASIC);
        assert_eq!(p.query(0x8000_0000, 0, 0, 1).eax, MAX_EXTENDED);
    }

    #[test]
    fn vendor_passes_and_hypervisor_leaves_announce_creditvisor() {
        let p = CpuidPolicy::from_host(&mut everything, 2_500_000);
        let l0 = p.query(0, 0, 0, 1);
        assert_eq!(
            (l0.ebx, l0.edx, l0.ecx),
            (0x756e_6547, 0x4965_6e69, 0x6c65_746e)
        );
        let hv = p.query(HV_LEAF, 0, 0, 1);
        assert_eq!(hv.eax, HV_MAX_LEAF);
        let mut sig = [0u8; 12];
        sig[..4].copy_from_slice(&hv.ebx.to_le_bytes());
        sig[4..8].copy_from_slice(&hv.ecx.to_le_bytes());
        sig[8..].copy_from_slice(&hv.edx.to_le_bytes());
        assert_eq!(&sig, SIGNATURE);
        assert_eq!(
            p.query(HV_MAX_LEAF, 0, 0, 1),
            CpuidResult {
                eax: GUEST_ABI_VERSION,
                ebx: 2_500_000,
                ecx: 0,
                edx: 0
            }
        );
        assert_eq!(p.query(0x4000_0002, 0, 0, 1), CpuidResult::default());
        assert_eq!(p.query(0xffff_ffff, 0, 0, 1), CpuidResult::default());
    }

    #[test]
    fn topology_names_the_vcpu() {
        let p = CpuidPolicy::from_host(&mut everything, 1);
        let l1 = p.query(1, 0, 3, 4);
        assert_eq!(l1.ebx >> 24, 3);
        assert_eq!((l1.ebx >> 16) & 0xff, 4);
        assert_eq!(l1.ebx & 0xffff, 0xffff);
    }

    #[test]
    fn small_host_limits_are_respected() {
        let mut small = |leaf: u32, _| match leaf {
            0 => CpuidResult {
                eax: 1,
                ..CpuidResult::default()
            },
            0x8000_0000 => CpuidResult::default(), // no extended leaves at all
            _ => CpuidResult {
                edx: 0xffff_ffff,
                ..CpuidResult::default()
            },
        };
        let p = CpuidPolicy::from_host(&mut small, 1);
        assert_eq!(p.query(0, 0, 0, 1).eax, 1);
        assert_eq!(p.query(7, 0, 0, 1), CpuidResult::default());
        assert_eq!(p.query(0x8000_0001, 0, 0, 1), CpuidResult::default());
        assert_eq!(p.query(0x8000_0000, 0, 0, 1), CpuidResult::default());
    }
}
