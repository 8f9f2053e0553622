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

    /// ORs `words` (bit i of word w = page 64w + i) into the bitmap; bits past the last page
    /// and words past the end are ignored.
    pub fn or_words(&self, words: impl IntoIterator<Item = u64>) {
        for (i, (slot, w)) in self.words.iter().zip(words).enumerate() {
            let base = i as u64 * 64;
            let valid = (self.pages - base).min(64);
            let mask = if valid == 64 {
                u64::MAX
            } else {
                (1u64 << valid) - 1
            };
            if w & mask != 0 {
                slot.fetch_or(w & mask, Ordering::AcqRel);
            }
        }
    }

    /// A copy of the words (bit i = page i), the layout of the dirty-log bitmaps.
    pub fn to_words(&self) -> Vec<u64> {
        self.words
            .iter()
            .map(|w| w.load(Ordering::Acquire))
            .collect()
    }
}

/// The runs of set bits among the first `pages` bits of `bits`, as `(first, count)`, in
/// order; whole words are skipped or taken at once (a 16 GiB region is 65536 words).
pub fn set_runs(bits: &[u64], pages: u64) -> Vec<(u64, u64)> {
    let mut out = Vec::new();
    let mut start: Option<u64> = None;
    let words = usize::try_from(pages.div_ceil(64)).unwrap_or(usize::MAX);
    let covered = (bits.len().min(words) as u64 * 64).min(pages);
    for (wi, &word) in bits.iter().take(words).enumerate() {
        let base = wi as u64 * 64;
        let valid = (pages - base).min(64);
        if valid == 64 && word == u64::MAX {
            start.get_or_insert(base);
            continue;
        }
        if word == 0 {
            if let Some(s) = start.take() {
                out.push((s, base - s));
            }
            continue;
        }
        for b in 0..valid {
            let p = base + b;
            match (word & (1 << b) != 0, start) {
                (true, None) => start = Some(p),
                (false, Some(s)) => {
                    out.push((s, p - s));
                    start = None;
                }
                _ => {}
            }
        }
    }
    if let Some(s) = start {
        out.push((s, covered - s));
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn runs_of_set_bits_across_words_and_the_last_partial_word() {
        assert_eq!(set_runs(&[], 0), vec![]);
        assert_eq!(set_runs(&[0b1101], 64), vec![(0, 1), (2, 2)]);
        // A run through a full word into the next, ending at the page count (bits past it
        // ignored).
        assert_eq!(
            set_runs(&[1 << 63, u64::MAX, u64::MAX], 130),
            vec![(63, 130 - 63)]
        );
        assert_eq!(set_runs(&[u64::MAX, 0, 1], 129), vec![(0, 64), (128, 1)]);
        assert_eq!(set_runs(&[u64::MAX; 2], 100), vec![(0, 100)]);
        // A bitmap shorter than the pages: only what it covers.
        assert_eq!(set_runs(&[u64::MAX], 1000), vec![(0, 64)]);
        // Against the bit-by-bit answer.
        let bits = [0xf0f0_0000_ffff_0001u64, u64::MAX, 0, 0x8000_0000_0000_0001];
        let mut slow = Vec::new();
        let mut cur: Option<(u64, u64)> = None;
        for p in 0..250u64 {
            if bits[(p / 64) as usize] & (1 << (p % 64)) != 0 {
                cur = Some(cur.map_or((p, 1), |(s, n)| (s, n + 1)));
            } else if let Some(c) = cur.take() {
                slow.push(c);
            }
        }
        slow.extend(cur);
        assert_eq!(set_runs(&bits, 250), slow);
    }

    #[test]
    fn or_words_masks_past_the_end() {
        let b = PageBitmap::new(70);
        b.or_words([0b101, u64::MAX, u64::MAX]);
        assert_eq!(b.count(), 2 + 6);
        assert_eq!(b.to_words(), vec![0b101, 0b11_1111]);
    }

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
