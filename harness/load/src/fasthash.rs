//! The hasher of the users' hot maps (sends awaiting their ack by client message id,
//! conversation ids to indices): FNV-1a. The keys are a few bytes long and chosen by this
//! process or by the system under test, never by an adversary, so SipHash's protection
//! against collision flooding buys nothing here; its cost per lookup (a few per frame) was
//! visible in squall's profile.

use std::collections::HashMap;
use std::hash::{BuildHasherDefault, Hasher};

/// A `HashMap` with [`Fnv`].
pub type FastMap<K, V> = HashMap<K, V, BuildHasherDefault<Fnv>>;

/// 64-bit FNV-1a.
pub struct Fnv(u64);

impl Default for Fnv {
    fn default() -> Self {
        Fnv(0xcbf2_9ce4_8422_2325)
    }
}

impl Hasher for Fnv {
    fn finish(&self) -> u64 {
        self.0
    }

    fn write(&mut self, bytes: &[u8]) {
        let mut h = self.0;
        for &b in bytes {
            h ^= u64::from(b);
            h = h.wrapping_mul(0x0100_0000_01b3);
        }
        self.0 = h;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_fast_map_is_a_map() {
        let mut m: FastMap<String, u32> = FastMap::default();
        for i in 0..1000u32 {
            m.insert(format!("{}-{}", i % 7, i), i);
        }
        assert_eq!(m.len(), 1000);
        assert_eq!(m.get("3-10"), Some(&10));
        assert_eq!(m.remove("6-13"), Some(13));
        assert_eq!(m.get("6-13"), None);
    }
}
