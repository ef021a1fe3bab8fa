//! Who is who: faces matched one-to-one to identities by the Euclidean distance of their dlib-ID
//! descriptors. The assignment minimises the summed distance over the pairs it makes, a pair
//! only allowed under the acceptance threshold, and it makes as many pairs as it can (a face
//! left over gets the base model). Exact, by dynamic programming over the sets of identities
//! already used: faces x 2^identities steps, a few thousand for a family album.

/// The most identities one restore matches at once (2^this states in the assignment).
pub const MAX_IDENTITIES: usize = 16;

/// Acceptance threshold of the automatic assignment, in dlib-ID distance, for faces embedded on
/// the degraded input. dlib's same-person threshold is 0.6 on clean photos; see the README
/// (*Who is who*) for the measurement on `pfstorer degrade`'s degradations that sets it.
pub const ASSIGN_THRESHOLD: f32 = 0.6;

/// For each face, the identity it is assigned, or `None`. `distances[f][i]` is face f's
/// distance to identity i (`None`: unknown, e.g. an identity without embeddings); only pairs
/// with a known distance strictly below `threshold` are made.
pub fn assign(distances: &[Vec<Option<f32>>], threshold: f32) -> Vec<Option<usize>> {
    let faces = distances.len();
    let ids = distances.iter().map(Vec::len).max().unwrap_or(0);
    assert!(ids <= MAX_IDENTITIES, "at most {MAX_IDENTITIES} identities");
    let states = 1usize << ids;
    // best[f][mask] = (pairs, -total distance) achievable from face f on with `mask` used;
    // compared lexicographically: more pairs first, then the smaller sum.
    let worst = (0usize, f64::NEG_INFINITY);
    let mut best = vec![vec![worst; states]; faces + 1];
    let mut choice = vec![vec![None; states]; faces];
    best[faces].fill((0, 0.0));
    let better = |a: (usize, f64), b: (usize, f64)| a.0 > b.0 || (a.0 == b.0 && a.1 > b.1);
    for f in (0..faces).rev() {
        for mask in 0..states {
            let mut top = best[f + 1][mask];
            let mut pick = None;
            for i in 0..ids {
                if mask & (1 << i) != 0 {
                    continue;
                }
                let Some(Some(d)) = distances[f].get(i) else {
                    continue;
                };
                // NaN never matches.
                if d.is_nan() || *d >= threshold {
                    continue;
                }
                let rest = best[f + 1][mask | (1 << i)];
                let cand = (rest.0 + 1, rest.1 - *d as f64);
                if better(cand, top) {
                    top = cand;
                    pick = Some(i);
                }
            }
            best[f][mask] = top;
            choice[f][mask] = pick;
        }
    }
    let mut out = Vec::with_capacity(faces);
    let mut mask = 0usize;
    for row in &choice {
        let pick = row[mask];
        if let Some(i) = pick {
            mask |= 1 << i;
        }
        out.push(pick);
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn optimal_one_to_one_under_the_threshold() {
        // Greedy would give face 0 identity 0 (0.30) and leave face 1 at 0.55 on identity 1;
        // the optimum pairs 0-1 and 1-0 (0.35 + 0.20).
        let d = vec![vec![Some(0.30), Some(0.35)], vec![Some(0.20), Some(0.55)]];
        assert_eq!(assign(&d, 0.6), vec![Some(1), Some(0)]);
        // Over the threshold: no pair.
        let d = vec![vec![Some(0.7)], vec![Some(0.61)]];
        assert_eq!(assign(&d, 0.6), vec![None, None]);
        // More faces than identities: the closest face wins, the other gets the base model.
        let d = vec![vec![Some(0.5)], vec![Some(0.2)], vec![Some(0.4)]];
        assert_eq!(assign(&d, 0.6), vec![None, Some(0), None]);
        // Unknown distances (identity without embeddings) are never matched.
        let d = vec![vec![None, Some(0.3)]];
        assert_eq!(assign(&d, 0.6), vec![Some(1)]);
        // As many pairs as possible before the smallest sum.
        let d = vec![vec![Some(0.1), Some(0.5)], vec![Some(0.2), None]];
        assert_eq!(assign(&d, 0.6), vec![Some(1), Some(0)]);
        assert!(assign(&[], 0.6).is_empty());
    }
}
