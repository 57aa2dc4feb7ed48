//! The CPUID a guest sees: what the hypervisor supports, with this vCPU's topology, the
//! hypervisor bit, and the features the VM's policy hides.

use hypervisor::x86::CpuidEntry;

/// A CPUID feature bit: leaf, register, bit.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Feature {
    pub name: &'static str,
    pub leaf: u32,
    pub register: Register,
    pub bit: u32,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Register {
    Ebx,
    Ecx,
    Edx,
}

/// Features a policy may hide, by the names Linux's `clearcpuid=` and /proc/cpuinfo use.
pub const FEATURES: &[Feature] = &[
    Feature {
        name: "cx16",
        leaf: 1,
        register: Register::Ecx,
        bit: 13,
    },
    Feature {
        name: "xsave",
        leaf: 1,
        register: Register::Ecx,
        bit: 26,
    },
    Feature {
        name: "osxsave",
        leaf: 1,
        register: Register::Ecx,
        bit: 27,
    },
    Feature {
        name: "smap",
        leaf: 7,
        register: Register::Ebx,
        bit: 20,
    },
    Feature {
        name: "smep",
        leaf: 7,
        register: Register::Ebx,
        bit: 7,
    },
];

pub fn feature(name: &str) -> Option<Feature> {
    FEATURES.iter().copied().find(|f| f.name == name)
}

const HYPERVISOR_BIT: u32 = 1 << 31;
const HTT_BIT: u32 = 1 << 28;
const XSAVE_LEAF: u32 = 0xd;

/// The CPUID of vCPU `id` of `vcpus`, from the hypervisor's `supported` table.
pub fn for_vcpu(
    supported: &[CpuidEntry],
    id: u32,
    vcpus: u32,
    hide: &[Feature],
) -> Vec<CpuidEntry> {
    let hides_xsave = hide.iter().any(|f| f.name == "xsave");
    let mut out: Vec<CpuidEntry> = supported
        .iter()
        .filter(|e| !(hides_xsave && e.function == XSAVE_LEAF))
        .copied()
        .collect();
    for entry in &mut out {
        match entry.function {
            1 => {
                entry.ebx = (entry.ebx & 0x0000_ffff) | (id << 24) | ((vcpus & 0xff) << 16);
                entry.ecx |= HYPERVISOR_BIT;
                if vcpus > 1 {
                    entry.edx |= HTT_BIT;
                } else {
                    entry.edx &= !HTT_BIT;
                }
            }
            0xb | 0x1f => entry.edx = id,
            _ => {}
        }
        for feature in hide
            .iter()
            .filter(|f| f.leaf == entry.function && entry.index == 0)
        {
            let register = match feature.register {
                Register::Ebx => &mut entry.ebx,
                Register::Ecx => &mut entry.ecx,
                Register::Edx => &mut entry.edx,
            };
            *register &= !(1 << feature.bit);
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    fn table() -> Vec<CpuidEntry> {
        vec![
            CpuidEntry {
                function: 1,
                ebx: 0xff00_0800,
                ecx: (1 << 13) | (1 << 26) | 1,
                edx: HTT_BIT,
                ..Default::default()
            },
            CpuidEntry {
                function: 7,
                ebx: (1 << 20) | (1 << 7) | 1,
                ..Default::default()
            },
            CpuidEntry {
                function: 0xb,
                index: 1,
                edx: 99,
                ..Default::default()
            },
            CpuidEntry {
                function: XSAVE_LEAF,
                eax: 7,
                ..Default::default()
            },
        ]
    }

    #[test]
    fn topology_and_hypervisor_bit_are_set_per_vcpu() {
        let out = for_vcpu(&table(), 2, 4, &[]);
        assert_eq!(out[0].ebx >> 24, 2, "APIC id");
        assert_eq!((out[0].ebx >> 16) & 0xff, 4);
        assert_eq!(out[0].ebx & 0xffff, 0x0800, "CLFLUSH size kept");
        assert_ne!(out[0].ecx & HYPERVISOR_BIT, 0);
        assert_eq!(out[2].edx, 2, "x2APIC id");
        assert_eq!(out.len(), 4);
        let single = for_vcpu(&table(), 0, 1, &[]);
        assert_eq!(single[0].edx & HTT_BIT, 0);
    }

    #[test]
    fn hidden_features_are_cleared_and_xsave_takes_its_leaf() {
        let hide: Vec<Feature> = ["cx16", "xsave", "smap"]
            .iter()
            .map(|n| feature(n).unwrap())
            .collect();
        let out = for_vcpu(&table(), 0, 1, &hide);
        assert_eq!(out[0].ecx, 1 | HYPERVISOR_BIT, "cx16 and xsave gone");
        assert_eq!(out[1].ebx, (1 << 7) | 1, "smap gone, smep kept");
        assert!(out.iter().all(|e| e.function != XSAVE_LEAF));
        assert!(feature("nonsense").is_none());
    }
}
