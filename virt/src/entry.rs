//! The register and segment state a vCPU starts with (guest ABI v1, docs/guest-abi.md "Entry state"), as plain
//! data the backends load into a VMCS or VMCB.
//!
//! Design: segment attributes are kept in the VMX "access rights" layout (SDM Vol. 3C §25.4.1, Table 25-2: type
//! bits 3:0, S 4, DPL 6:5, P 7, AVL 12, L 13, D/B 14, G 15, unusable 16); [`Segment::svm_attrib`] converts to the
//! VMCB's packed 12-bit form (APM Vol. 2 §15.5.1: the same fields with bits 15:12 moved to 11:8). Values here
//! must match the descriptors the loader writes into the guest GDT, so the hidden segment state and the table
//! agree.

use crate::loader::{
    BOOT_INFO_GPA, BOOT_INFO_STRIDE, GDT_GPA, GDT_LIMIT, PML4_GPA, STACK_PER_VCPU,
};

/// CR0: PE, ET, NE, PG.
pub const CR0: u64 = (1 << 0) | (1 << 4) | (1 << 5) | (1 << 31);
/// CR4: PAE, OSFXSR, OSXMMEXCPT.
pub const CR4: u64 = (1 << 5) | (1 << 9) | (1 << 10);
/// EFER: LME, LMA, NXE.
pub const EFER: u64 = (1 << 8) | (1 << 10) | (1 << 11);
/// RFLAGS: the reserved bit 1 and IF. ABI v1 never delivers an interrupt to a guest (the hypervisor preempts
/// through its own exits, whatever the guest's IF), so IF = 1 changes nothing a guest sees but lets CPUs that
/// hold physical interrupts for a guest with IF = 0 (Bochs 2.7 SVM) still preempt it.
pub const RFLAGS: u64 = 0x202;
/// Code selector (GDT entry 1).
pub const CODE_SELECTOR: u16 = 0x08;
/// Data selector (GDT entry 2).
pub const DATA_SELECTOR: u16 = 0x10;
/// 64-bit code descriptor: base 0, limit 0xfffff pages, type 0xb (execute/read, accessed), S, P, L, G.
pub const CODE_DESCRIPTOR: u64 = 0x00af_9b00_0000_ffff;
/// Data descriptor: base 0, limit 0xfffff pages, type 0x3 (read/write, accessed), S, P, D/B, G.
pub const DATA_DESCRIPTOR: u64 = 0x00cf_9300_0000_ffff;

/// One segment register's selector and hidden part.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Segment {
    pub selector: u16,
    pub base: u64,
    pub limit: u32,
    /// VMX access-rights layout, bits 15:0.
    pub access: u16,
    /// VMX "unusable" (bit 16): a null selector in a data segment register, or an absent LDT.
    pub unusable: bool,
}

impl Segment {
    /// The VMCS access-rights field value (with bit 16 for unusable).
    pub const fn vmx_access_rights(&self) -> u32 {
        if self.unusable {
            1 << 16
        } else {
            self.access as u32
        }
    }

    /// The VMCB attribute field value (APM Vol. 2 §15.5.1: access bits 7:0 and 15:12 packed into 11:0).
    pub const fn svm_attrib(&self) -> u16 {
        if self.unusable {
            0
        } else {
            (self.access & 0xff) | ((self.access >> 4) & 0x0f00)
        }
    }
}

/// GDTR or IDTR.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct DescriptorTable {
    pub base: u64,
    pub limit: u16,
}

/// Everything a backend must load before the first entry of a vCPU. General-purpose registers not named here
/// are zero.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct EntryState {
    pub rip: u64,
    pub rsp: u64,
    /// Address of this vCPU's `BootInfo`.
    pub rdi: u64,
    pub rflags: u64,
    pub cr0: u64,
    pub cr3: u64,
    pub cr4: u64,
    pub efer: u64,
    pub cs: Segment,
    pub ds: Segment,
    pub es: Segment,
    pub ss: Segment,
    pub fs: Segment,
    pub gs: Segment,
    pub tr: Segment,
    pub ldtr: Segment,
    pub gdtr: DescriptorTable,
    pub idtr: DescriptorTable,
}

impl EntryState {
    /// The ABI entry state of vCPU `vcpu_id` of a VM with `mem_bytes` of RAM whose image starts at `entry`.
    pub fn long_mode(entry: u64, vcpu_id: u32, mem_bytes: u64) -> Self {
        let code = Segment {
            selector: CODE_SELECTOR,
            base: 0,
            limit: 0xffff_ffff,
            access: 0xa09b,
            unusable: false,
        };
        let data = Segment {
            selector: DATA_SELECTOR,
            base: 0,
            limit: 0xffff_ffff,
            access: 0xc093,
            unusable: false,
        };
        // VM entry requires a usable TR of type "busy 64-bit TSS" (SDM Vol. 3C §27.3.1.2); the guest never uses it.
        let tr = Segment {
            selector: 0,
            base: 0,
            limit: 0x67,
            access: 0x008b,
            unusable: false,
        };
        let ldtr = Segment {
            selector: 0,
            base: 0,
            limit: 0,
            access: 0,
            unusable: true,
        };
        let rsp = mem_bytes.saturating_sub(u64::from(vcpu_id) * STACK_PER_VCPU) & !0xf;
        Self {
            rip: entry,
            rsp,
            rdi: BOOT_INFO_GPA + u64::from(vcpu_id) * BOOT_INFO_STRIDE,
            rflags: RFLAGS,
            cr0: CR0,
            cr3: PML4_GPA,
            cr4: CR4,
            efer: EFER,
            cs: code,
            ds: data,
            es: data,
            ss: data,
            fs: data,
            gs: data,
            tr,
            ldtr,
            gdtr: DescriptorTable {
                base: GDT_GPA,
                limit: GDT_LIMIT,
            },
            idtr: DescriptorTable { base: 0, limit: 0 },
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Decodes a GDT descriptor's access byte and flags into the VMX access-rights layout.
    fn descriptor_access(desc: u64) -> u16 {
        let access = (desc >> 40) & 0xff;
        let flags = (desc >> 52) & 0xf;
        u16::try_from(access | (flags << 12)).unwrap()
    }

    #[test]
    fn hidden_state_matches_the_gdt() {
        let s = EntryState::long_mode(0x20_0000, 0, 16 << 20);
        assert_eq!(s.cs.access, descriptor_access(CODE_DESCRIPTOR));
        assert_eq!(s.ds.access, descriptor_access(DATA_DESCRIPTOR));
        assert_eq!(s.cs.svm_attrib(), 0xa9b);
        assert_eq!(s.ds.svm_attrib(), 0xc93);
        assert_eq!(s.ldtr.vmx_access_rights(), 1 << 16);
        assert_eq!(s.tr.vmx_access_rights(), 0x8b);
    }

    #[test]
    fn stacks_and_boot_info_are_per_vcpu() {
        let mem = 16 << 20;
        let s0 = EntryState::long_mode(0x20_0000, 0, mem);
        let s2 = EntryState::long_mode(0x20_0000, 2, mem);
        assert_eq!(s0.rsp, mem);
        assert_eq!(s2.rsp, mem - 2 * 64 * 1024);
        assert_eq!(s0.rdi, 0x8000);
        assert_eq!(s2.rdi, 0x8000 + 2 * BOOT_INFO_STRIDE);
        assert_eq!(s0.rip, 0x20_0000);
        assert_eq!(s0.cr0 & 0x8000_0001, 0x8000_0001);
        assert_eq!(s0.efer & (1 << 10), 1 << 10);
        assert_eq!(s0.rflags, 0x202, "reserved bit 1 and IF");
    }
}
