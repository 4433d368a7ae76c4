//! GPU architectures as NVRTC names them (`sm_80`, `sm_90a`): one type instead of strings.

use std::fmt;

use serde::{Serialize, Serializer};

use crate::cuda::error::CudaError;

/// A compilation target: a compute capability, optionally the architecture-specific
/// variant (`sm_90a`: `wgmma` and `setmaxnreg` need it; its code runs on that exact
/// capability only).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct Arch {
    major: u32,
    minor: u32,
    specific: bool,
}

impl Arch {
    /// Ampere, the oldest target of these kernels (`mma.sync`, `cp.async`, `ldmatrix`).
    pub const SM_80: Arch = Arch::new(8, 0, false);
    /// Hopper without its architecture-specific instructions.
    pub const SM_90: Arch = Arch::new(9, 0, false);
    /// Hopper with `wgmma` (H100, H200).
    pub const SM_90A: Arch = Arch::new(9, 0, true);
    /// What a build machine without a GPU compiles for when no target is named.
    pub const DEFAULT: Arch = Arch::SM_90A;

    /// `sm_{major}{minor}`, with the `a` suffix when `specific`.
    pub const fn new(major: u32, minor: u32, specific: bool) -> Arch {
        Arch { major, minor, specific }
    }

    /// The target the kernels are compiled for on a device of compute capability
    /// `major.minor`: the architecture-specific one from Hopper on, the plain one before.
    pub fn for_device(major: i32, minor: i32) -> Arch {
        let (major, minor) = (major.max(0) as u32, minor.max(0) as u32);
        Arch::new(major, minor, major >= 9)
    }

    /// Parses `sm_80`, `sm_90a`, `sm_100a`, ...
    pub fn parse(name: &str) -> Result<Arch, CudaError> {
        let bad = || CudaError::UnknownArch(name.to_string());
        let digits = name.strip_prefix("sm_").ok_or_else(bad)?;
        let (digits, specific) = match digits.strip_suffix('a') {
            Some(d) => (d, true),
            None => (digits, false),
        };
        if digits.len() < 2 || !digits.bytes().all(|b| b.is_ascii_digit()) {
            return Err(bad());
        }
        let (major, minor) = digits.split_at(digits.len() - 1);
        Ok(Arch::new(major.parse().map_err(|_| bad())?, minor.parse().map_err(|_| bad())?, specific))
    }

    /// Compute capability, major.
    pub fn major(&self) -> u32 {
        self.major
    }

    /// Compute capability, minor.
    pub fn minor(&self) -> u32 {
        self.minor
    }

    /// Whether this is an architecture-specific (`a`) target.
    pub fn is_specific(&self) -> bool {
        self.specific
    }

    /// Whether code that needs `min` compiles for this target: an architecture-specific
    /// minimum only for exactly that target (its instructions are not carried forward),
    /// a plain one for every capability at or above it.
    pub fn supports(&self, min: Arch) -> bool {
        if min.specific { *self == min } else { (self.major, self.minor) >= (min.major, min.minor) }
    }
}

impl fmt::Display for Arch {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "sm_{}{}{}", self.major, self.minor, if self.specific { "a" } else { "" })
    }
}

impl Serialize for Arch {
    fn serialize<S: Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        s.collect_str(self)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn names_round_trip() {
        for name in ["sm_80", "sm_86", "sm_90", "sm_90a", "sm_100a", "sm_120"] {
            assert_eq!(Arch::parse(name).unwrap().to_string(), name);
        }
        for bad in ["", "sm_", "sm_9", "90a", "sm_9x", "sm_a", "compute_90"] {
            assert!(Arch::parse(bad).is_err(), "{bad}");
        }
        assert_eq!(Arch::for_device(9, 0), Arch::SM_90A);
        assert_eq!(Arch::for_device(8, 6).to_string(), "sm_86");
        assert_eq!(Arch::for_device(10, 0).to_string(), "sm_100a");
    }

    #[test]
    fn specific_targets_are_not_carried_forward() {
        assert!(Arch::SM_90A.supports(Arch::SM_80));
        assert!(Arch::SM_90A.supports(Arch::SM_90A));
        assert!(!Arch::SM_90.supports(Arch::SM_90A));
        assert!(!Arch::parse("sm_100a").unwrap().supports(Arch::SM_90A));
        assert!(!Arch::SM_80.supports(Arch::SM_90));
        assert!(Arch::parse("sm_89").unwrap().supports(Arch::SM_80));
    }
}
