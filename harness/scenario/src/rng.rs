//! A tiny deterministic generator (splitmix64) for the few draws the scenario model makes
//! itself (random fault times), so the same seed gives the same schedule everywhere
//! without a random number library.

pub struct SplitMix64 {
    state: u64,
}

impl SplitMix64 {
    /// A stream for one purpose (`stream`, e.g. a fault's index) under one scenario seed.
    pub fn new(seed: u64, stream: u64) -> Self {
        let mut generator = SplitMix64 {
            state: seed ^ stream.wrapping_add(1).wrapping_mul(0xD1B5_4A32_D192_ED03),
        };
        // One discarded draw separates streams whose states start close together.
        generator.next_u64();
        generator
    }

    pub fn next_u64(&mut self) -> u64 {
        self.state = self.state.wrapping_add(0x9E37_79B9_7F4A_7C15);
        let mut z = self.state;
        z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
        z ^ (z >> 31)
    }

    /// A uniform draw in `0..=bound`.
    pub fn up_to(&mut self, bound: u64) -> u64 {
        match bound.checked_add(1) {
            // Modulo bias is below 2^-20 for the bounds used here (nanoseconds up to days).
            Some(span) => self.next_u64() % span,
            None => self.next_u64(),
        }
    }
}
