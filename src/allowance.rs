//! Reserve mode's output allowance for requests that set no `max_tokens`: learned from the
//! output recent responses of the same model actually used (SPEC 4).

use std::collections::HashMap;
use std::sync::{Arc, Mutex, PoisonError};

/// Recent outputs kept per model.
const WINDOW: usize = 32;
/// Outputs seen before the learned value replaces the configured start.
const MIN_SAMPLES: usize = 3;
/// Models tracked; past this, new models share one entry.
const MAX_MODELS: usize = 256;

/// Output allowances per model: the 90th percentile of the last 32 outputs, starting from
/// `default_output_tokens` until three are known. A high percentile, rather than the mean,
/// keeps the overshoot small; learning it, rather than a fixed guess, keeps clients that
/// never send `max_tokens` from being starved.
#[derive(Debug)]
pub(crate) struct Allowances {
    start: u64,
    models: Mutex<HashMap<Arc<str>, Recent>>,
}

#[derive(Debug, Default)]
struct Recent {
    values: Vec<u64>,
    next: usize,
}

impl Allowances {
    pub(crate) fn new(start: u64) -> Self {
        Self {
            start,
            models: Mutex::new(HashMap::new()),
        }
    }

    /// The allowance for a request of this model.
    pub(crate) fn get(&self, model: Option<&str>) -> u64 {
        let models = self.models.lock().unwrap_or_else(PoisonError::into_inner);
        match models.get(model.unwrap_or("")) {
            Some(r) if r.values.len() >= MIN_SAMPLES => {
                let mut sorted = r.values.clone();
                sorted.sort_unstable();
                sorted[(sorted.len() * 9).div_ceil(10) - 1]
            }
            _ => self.start,
        }
    }

    /// Learns from a response's actual output.
    pub(crate) fn record(&self, model: Option<&str>, output: u64) {
        let mut models = self.models.lock().unwrap_or_else(PoisonError::into_inner);
        let mut key = model.unwrap_or("");
        if !models.contains_key(key) && models.len() >= MAX_MODELS {
            key = "";
        }
        let r = models.entry(Arc::from(key)).or_default();
        if r.values.len() < WINDOW {
            r.values.push(output);
        } else {
            r.values[r.next] = output;
            r.next = (r.next + 1) % WINDOW;
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn starts_from_the_default_then_follows_a_high_percentile() {
        let a = Allowances::new(1000);
        assert_eq!(a.get(Some("m")), 1000);
        for v in [100, 120, 80] {
            a.record(Some("m"), v);
        }
        assert_eq!(a.get(Some("m")), 120);
        assert_eq!(a.get(Some("other")), 1000, "per model");
        for v in 0..100 {
            a.record(Some("m"), v);
        }
        // The last 32 values are 68..=99: the 90th percentile is 96.
        assert_eq!(a.get(Some("m")), 96);
    }
}
