//! SHA-256 fingerprints of model weights and reference photos, on the `sha2` crate (which uses
//! the CPU's SHA extensions when present), as lower-case hex.

pub use sha2::{Digest, Sha256};

/// Lower-case hex of a digest.
pub fn to_hex(digest: &[u8]) -> String {
    digest.iter().map(|b| format!("{b:02x}")).collect()
}

/// Hex SHA-256 of `data`.
pub fn sha256_hex(data: &[u8]) -> String {
    to_hex(&Sha256::digest(data))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn known_vectors_and_streaming() {
        assert_eq!(
            sha256_hex(b"abc"),
            "ba7816bf8f01cfea414140de5dae2223b00361a396177a9cb410ff61f20015ad"
        );
        let long = b"abcdbcdecdefdefgefghfghighijhijkijkljklmklmnlmnomnopnopq";
        let mut split = Sha256::new();
        split.update(&long[..10]);
        split.update(&long[10..]);
        assert_eq!(to_hex(&split.finalize()), sha256_hex(long));
        // Throughput, for the note (not asserted): the full-size fingerprint hashes ~5 GB.
        let data = vec![7u8; 256 << 20];
        let start = std::time::Instant::now();
        let _ = sha256_hex(&data);
        let secs = start.elapsed().as_secs_f64();
        println!("sha2: {:.0} MB/s", data.len() as f64 / 1e6 / secs);
    }
}
