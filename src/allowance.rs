//! Reserve mode's output allowance for requests that set no `max_tokens`: learned from the
//! output recent responses of the same rules and model actually used (SPEC 4).

use crate::lock;
use std::collections::HashMap;
use std::sync::{Arc, Mutex};

/// Recent outputs kept per rules and model.
const WINDOW: usize = 32;
/// Outputs seen before the learned value replaces the configured start.
const MIN_SAMPLES: usize = 3;
/// Rules × models tracked; past this, new ones share one entry per rules.
const MAX_ENTRIES: usize = 1024;

/// Output allowances per matched rules and model: the 90th percentile of the last 32 outputs
/// of requests that set no output limit, starting from `default_output_tokens` until three are
/// known. A high percentile, rather than the mean, keeps the overshoot small; learning it,
/// rather than a fixed guess, keeps clients that never send `max_tokens` from being starved.
/// Responses to requests that set `max_tokens` are not learned from: their output is the
/// client's cap, not what an uncapped request uses.
#[derive(Debug, Default)]
pub(crate) struct Allowances {
    learned: Mutex<Learned>,
}

#[derive(Debug, Default)]
struct Learned {
    /// By the matched rules' names, then by model (`""`: none, or past the cap).
    by_rules: HashMap<Arc<str>, HashMap<Arc<str>, Recent>>,
    entries: usize,
}

#[derive(Debug, Default)]
struct Recent {
    values: Vec<u64>,
    next: usize,
}

impl Allowances {
    /// The allowance for a request under these rules of this model; `start` until learned.
    pub(crate) fn get(&self, rules: &str, model: Option<&str>, start: u64) -> u64 {
        let learned = lock(&self.learned);
        let recent = learned
            .by_rules
            .get(rules)
            .and_then(|models| models.get(model.unwrap_or("")));
        match recent {
            Some(r) if r.values.len() >= MIN_SAMPLES => {
                let mut sorted = r.values.clone();
                sorted.sort_unstable();
                sorted[(sorted.len() * 9).div_ceil(10) - 1]
            }
            _ => start,
        }
    }

    /// Learns from the actual output of a response to a request that set no output limit.
    pub(crate) fn record(&self, rules: &Arc<str>, model: Option<&str>, output: u64) {
        let mut guard = lock(&self.learned);
        let learned = &mut *guard;
        let full = learned.entries >= MAX_ENTRIES;
        let models = learned.by_rules.entry(rules.clone()).or_default();
        let mut key = model.unwrap_or("");
        if full && !models.contains_key(key) {
            key = "";
        }
        let r = match models.get_mut(key) {
            Some(r) => r,
            None => {
                learned.entries += 1;
                models.entry(Arc::from(key)).or_default()
            }
        };
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
        let a = Allowances::default();
        let rules: Arc<str> = Arc::from("r#0");
        assert_eq!(a.get("r#0", Some("m"), 1000), 1000);
        for v in [100, 120, 80] {
            a.record(&rules, Some("m"), v);
        }
        assert_eq!(a.get("r#0", Some("m"), 1000), 120);
        assert_eq!(a.get("r#0", Some("other"), 1000), 1000, "per model");
        assert_eq!(a.get("r#1", Some("m"), 1000), 1000, "per rules");
        assert_eq!(a.get("r#1", Some("m"), 7), 7, "the start as configured now");
        for v in 0..100 {
            a.record(&rules, Some("m"), v);
        }
        // The last 32 values are 68..=99: the 90th percentile is 96.
        assert_eq!(a.get("r#0", Some("m"), 1000), 96);
    }

    #[test]
    fn past_the_cap_new_models_share_one_entry() {
        let a = Allowances::default();
        let rules: Arc<str> = Arc::from("r#0");
        for i in 0..MAX_ENTRIES + 10 {
            a.record(&rules, Some(&format!("m{i}")), 5);
        }
        assert_eq!(a.learned.lock().unwrap().entries, MAX_ENTRIES + 1);
    }
}
