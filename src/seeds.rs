//! Deriving seeds: one FNV-1a hash for names and one SplitMix64 mixer, so that a seed derived
//! from (base seed, name) or (seed, iteration) is stable across Rust versions and machines and
//! neighbouring inputs give unrelated streams.

/// The golden-ratio increment of SplitMix64.
pub const GOLDEN: u64 = 0x9e37_79b9_7f4a_7c15;

/// 64-bit FNV-1a of `bytes` (std's hasher is not stable across Rust versions).
pub fn fnv1a(bytes: &[u8]) -> u64 {
    bytes.iter().fold(0xcbf2_9ce4_8422_2325u64, |h, &b| {
        (h ^ b as u64).wrapping_mul(0x0000_0100_0000_01b3)
    })
}

/// The SplitMix64 output function (finalizer) of `z`.
pub fn mix64(z: u64) -> u64 {
    let z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
    let z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
    z ^ (z >> 31)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn known_values() {
        // FNV-1a test vectors.
        assert_eq!(fnv1a(b""), 0xcbf2_9ce4_8422_2325);
        assert_eq!(fnv1a(b"a"), 0xaf63_dc4c_8601_ec8c);
        // SplitMix64's first output for state 0 (state += GOLDEN, then the finalizer).
        assert_eq!(mix64(GOLDEN), 0xe220_a839_7b1d_cdaf);
    }
}
