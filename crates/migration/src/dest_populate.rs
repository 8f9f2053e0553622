//! The destination's hint before it places a verified RAM batch: the runs of consecutive
//! pages the batch writes with data, so the machine can back fresh guest memory in one call per
//! run instead of one page fault per page (decision 233).

use crate::wire::{PageData, RamBatch};

/// Calls `f(block, first, count)` for each run of consecutive NORMAL pages of one block in
/// `batch`, in table order.
pub(crate) fn normal_runs(batch: &RamBatch<'_>, f: impl FnMut(usize, u64, u64)) {
    runs(
        batch.pages().map(|p| {
            (
                usize::from(p.block),
                u64::from(p.page),
                matches!(p.data, PageData::Normal(_)),
            )
        }),
        f,
    );
}

/// The runs of `(block, page, normal)` entries: consecutive pages of one block, all normal. A
/// ZERO entry ends a run (a fresh page that stays zero is not written, so it must not be
/// backed either).
fn runs(entries: impl Iterator<Item = (usize, u64, bool)>, mut f: impl FnMut(usize, u64, u64)) {
    let mut run: Option<(usize, u64, u64)> = None;
    for (block, page, normal) in entries {
        let extends = run.is_some_and(|(b, first, n)| {
            normal && b == block && first.checked_add(n) == Some(page)
        });
        if extends {
            if let Some(r) = &mut run {
                r.2 += 1;
            }
            continue;
        }
        if let Some((b, first, n)) = run.take() {
            f(b, first, n);
        }
        if normal {
            run = Some((block, page, 1));
        }
    }
    if let Some((b, first, n)) = run {
        f(b, first, n);
    }
}

#[cfg(test)]
mod tests {
    use super::runs;

    fn runs_of(entries: &[(usize, u64, bool)]) -> Vec<(usize, u64, u64)> {
        let mut out = Vec::new();
        runs(entries.iter().copied(), |b, f, n| out.push((b, f, n)));
        out
    }

    #[test]
    fn runs_split_at_gaps_zero_pages_and_blocks() {
        let entries = [
            (0, 4, true),
            (0, 5, true),
            (0, 6, true),
            (0, 7, false),
            (0, 8, true),
            (0, 10, true),
            (1, 11, true),
            (0, 11, true),
            (0, 12, true),
        ];
        assert_eq!(
            runs_of(&entries),
            vec![(0, 4, 3), (0, 8, 1), (0, 10, 1), (1, 11, 1), (0, 11, 2)]
        );
    }

    #[test]
    fn zero_pages_make_no_run_and_a_page_number_cannot_overflow_a_run() {
        assert!(runs_of(&[(0, 1, false), (0, 2, false)]).is_empty());
        assert_eq!(
            runs_of(&[(0, u64::MAX, true), (0, 0, true)]),
            vec![(0, u64::MAX, 1), (0, 0, 1)]
        );
    }
}
