//! A fixed-size bitmap of pages that several threads set concurrently (the fault thread marks
//! pages requested, placing threads mark them received). Bits are only ever set, never
//! cleared, for the life of a pager: "requested" and "received" are monotonic facts.

use std::sync::atomic::{AtomicU64, Ordering};

/// One bit per page; bit `p` of word `p / 64`.
#[derive(Debug)]
pub struct PageBitmap {
    words: Vec<AtomicU64>,
    pages: u64,
}

impl PageBitmap {
    /// A bitmap of `pages` clear bits.
    pub fn new(pages: u64) -> Self {
        let words = usize::try_from(pages.div_ceil(64)).unwrap_or(usize::MAX);
        PageBitmap {
            words: (0..words).map(|_| AtomicU64::new(0)).collect(),
            pages,
        }
    }

    /// Number of pages covered.
    pub fn pages(&self) -> u64 {
        self.pages
    }

    fn slot(&self, page: u64) -> Option<(&AtomicU64, u64)> {
        if page >= self.pages {
            return None;
        }
        let word = self.words.get(usize::try_from(page / 64).ok()?)?;
        Some((word, 1u64 << (page % 64)))
    }

    /// Whether `page` is set (a page outside the bitmap reads as clear).
    pub fn get(&self, page: u64) -> bool {
        self.slot(page)
            .is_some_and(|(w, bit)| w.load(Ordering::Acquire) & bit != 0)
    }

    /// Sets `page`; returns whether it was already set. `None` for a page outside the bitmap.
    pub fn set(&self, page: u64) -> Option<bool> {
        let (w, bit) = self.slot(page)?;
        Some(w.fetch_or(bit, Ordering::AcqRel) & bit != 0)
    }

    /// Number of set bits.
    pub fn count(&self) -> u64 {
        self.words
            .iter()
            .map(|w| u64::from(w.load(Ordering::Acquire).count_ones()))
            .sum()
    }

    /// A copy of the words (bit i = page i), the layout of the dirty-log bitmaps.
    pub fn to_words(&self) -> Vec<u64> {
        self.words
            .iter()
            .map(|w| w.load(Ordering::Acquire))
            .collect()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn set_reports_the_previous_value_and_counts() {
        let b = PageBitmap::new(130);
        assert_eq!(b.set(0), Some(false));
        assert_eq!(b.set(0), Some(true));
        assert_eq!(b.set(129), Some(false));
        assert_eq!(b.set(130), None, "page past the end");
        assert!(b.get(129) && b.get(0) && !b.get(1) && !b.get(130));
        assert_eq!(b.count(), 2);
        assert_eq!(b.to_words(), vec![1, 0, 2]);
    }

    #[test]
    fn concurrent_setters_each_page_claimed_once() {
        let b = std::sync::Arc::new(PageBitmap::new(10_000));
        let claimed: u64 = std::thread::scope(|s| {
            let hs: Vec<_> = (0..4)
                .map(|_| {
                    let b = &b;
                    s.spawn(move || (0..10_000).filter(|&p| b.set(p) == Some(false)).count())
                })
                .collect();
            hs.into_iter().map(|h| h.join().unwrap() as u64).sum()
        });
        assert_eq!(claimed, 10_000, "every page claimed by exactly one thread");
        assert_eq!(b.count(), 10_000);
    }
}
