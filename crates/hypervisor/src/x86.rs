//! x86_64 register state in plain structs, independent of any backend's bindings.

use serde::{Deserialize, Serialize};

#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct Regs {
    pub rax: u64,
    pub rbx: u64,
    pub rcx: u64,
    pub rdx: u64,
    pub rsi: u64,
    pub rdi: u64,
    pub rsp: u64,
    pub rbp: u64,
    pub r8: u64,
    pub r9: u64,
    pub r10: u64,
    pub r11: u64,
    pub r12: u64,
    pub r13: u64,
    pub r14: u64,
    pub r15: u64,
    pub rip: u64,
    pub rflags: u64,
}

/// A segment register as the hardware caches it.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct Segment {
    pub base: u64,
    pub limit: u32,
    pub selector: u16,
    /// Type field (4 bits) of the descriptor.
    pub type_: u8,
    pub present: bool,
    pub dpl: u8,
    /// Default operation size (32-bit).
    pub db: bool,
    /// Descriptor type: code/data (true) or system.
    pub s: bool,
    /// 64-bit code.
    pub l: bool,
    /// Granularity: limit in 4 KiB units.
    pub g: bool,
    pub unusable: bool,
}

impl Segment {
    /// A flat 4 GiB segment of `type_` in protected mode (32-bit, as PVH entry wants).
    pub fn flat32(selector: u16, type_: u8) -> Segment {
        Segment {
            base: 0,
            limit: 0xffff_ffff,
            selector,
            type_,
            present: true,
            dpl: 0,
            db: true,
            s: true,
            l: false,
            g: true,
            unusable: false,
        }
    }
}

#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct DescriptorTable {
    pub base: u64,
    pub limit: u16,
}

#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct Sregs {
    pub cs: Segment,
    pub ds: Segment,
    pub es: Segment,
    pub fs: Segment,
    pub gs: Segment,
    pub ss: Segment,
    pub tr: Segment,
    pub ldt: Segment,
    pub gdt: DescriptorTable,
    pub idt: DescriptorTable,
    pub cr0: u64,
    pub cr2: u64,
    pub cr3: u64,
    pub cr4: u64,
    pub cr8: u64,
    pub efer: u64,
    pub apic_base: u64,
}

/// One CPUID leaf/subleaf and the registers it returns.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct CpuidEntry {
    pub function: u32,
    pub index: u32,
    /// KVM_CPUID_FLAG_* (significant index, …).
    pub flags: u32,
    pub eax: u32,
    pub ebx: u32,
    pub ecx: u32,
    pub edx: u32,
}

/// Exception vectors the VMM may inject.
pub const VECTOR_BREAKPOINT: u8 = 3;
