//! The search for fixed JSON keys in response bytes.

use memchr::memmem::Finder;

/// A fixed key searched for in response bytes: with memchr's AVX2 pair search called directly
/// where the CPU has AVX2 and the bytes are long enough for it, with `memmem::Finder`
/// otherwise.
///
/// The usage key comes every few hundred bytes in an SSE stream (OpenAI's `"usage":null` in
/// every chunk), so its search restarts that often. `memmem::Finder` reaches the same pair
/// search through its own dispatch; called directly, a loop finding every `"usage` in each
/// format's fixtures (repeated to 1 MB, as in `benches/scanner.rs`) ran 15–55 % faster.
pub(crate) struct Needle {
    needle: &'static [u8],
    finder: Finder<'static>,
    #[cfg(target_arch = "x86_64")]
    pair: Option<memchr::arch::x86_64::avx2::packedpair::Finder>,
}

impl Needle {
    pub(crate) fn new(needle: &'static [u8]) -> Self {
        Self {
            needle,
            finder: Finder::new(needle),
            #[cfg(target_arch = "x86_64")]
            pair: memchr::arch::x86_64::avx2::packedpair::Finder::new(needle),
        }
    }

    /// The length of the key.
    pub(crate) fn len(&self) -> usize {
        self.needle.len()
    }

    /// Where the key first starts in `haystack`.
    #[inline]
    pub(crate) fn find(&self, haystack: &[u8]) -> Option<usize> {
        #[cfg(target_arch = "x86_64")]
        if let Some(pair) = self
            .pair
            .as_ref()
            .filter(|p| haystack.len() >= p.min_haystack_len())
        {
            return pair.find(haystack, self.needle);
        }
        self.finder.find(haystack)
    }

    /// Where the key starts in `bytes`, in order (non-overlapping).
    pub(crate) fn positions<'a>(&'a self, bytes: &'a [u8]) -> impl Iterator<Item = usize> + 'a {
        let mut from = 0;
        std::iter::from_fn(move || {
            let at = from + self.find(bytes.get(from..)?)?;
            from = at + self.needle.len();
            Some(at)
        })
    }
}

#[cfg(test)]
mod tests {
    use proptest::prelude::*;

    use super::Needle;

    proptest! {
        /// Both searches (the pair search on long inputs, memmem on short ones, and memmem
        /// alone where there is no AVX2) find every occurrence, at every length.
        #[test]
        fn finds_what_memmem_finds(
            parts in proptest::collection::vec(
                prop_oneof![
                    Just(b"\"usage".to_vec()),
                    Just(b"\"usag".to_vec()),
                    Just(b"usage\"".to_vec()),
                    proptest::collection::vec(prop_oneof![Just(b'"'), Just(b'u'), Just(b'g'), any::<u8>()], 0..40),
                ],
                0..12,
            )
        ) {
            let bytes = parts.concat();
            let needle = Needle::new(b"\"usage");
            let expected: Vec<usize> = memchr::memmem::find_iter(&bytes, b"\"usage").collect();
            prop_assert_eq!(needle.positions(&bytes).collect::<Vec<_>>(), expected.clone());
            for start in 0..bytes.len() {
                prop_assert_eq!(
                    needle.find(&bytes[start..]).map(|at| at + start),
                    expected.iter().copied().find(|&at| at >= start)
                );
            }
        }
    }
}
