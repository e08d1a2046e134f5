//! Splitting elementwise work over scoped threads.

/// Calls `f(first_block, part)` on `groups` parts of `v`, each a run of whole `block`-value
/// blocks (the last part takes the rest), the first part on the calling thread and the others
/// on scoped threads. For work where each value's result does not depend on the split (a
/// copy, an elementwise op, independent channels): the same bits with any `groups`.
pub fn par_blocks<F>(v: &mut [f32], block: usize, groups: usize, f: F)
where
    F: Fn(usize, &mut [f32]) + Sync,
{
    let block = block.max(1);
    let blocks = v.len().div_ceil(block);
    let groups = groups.min(blocks).max(1);
    if groups <= 1 {
        f(0, v);
        return;
    }
    let per = blocks.div_ceil(groups);
    std::thread::scope(|scope| {
        let mut parts = v.chunks_mut(per * block).enumerate();
        let first = parts.next();
        for (g, part) in parts {
            let f = &f;
            scope.spawn(move || f(g * per, part));
        }
        if let Some((_, part)) = first {
            f(0, part);
        }
    });
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_block_once_with_its_index() {
        for (len, block, groups) in [(10, 3, 2), (12, 4, 3), (5, 1, 8), (7, 7, 2), (0, 3, 2)] {
            let mut v = vec![-1f32; len];
            par_blocks(&mut v, block, groups, |first, part| {
                for (i, x) in part.iter_mut().enumerate() {
                    *x = (first * block + i) as f32;
                }
            });
            let want: Vec<f32> = (0..len).map(|i| i as f32).collect();
            assert_eq!(v, want, "{len} {block} {groups}");
        }
    }
}
