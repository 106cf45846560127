//! What a response costs in tokens, from the usage its provider reported (SPEC 3.3).
//!
//! | category | OpenAI chat / Responses | Anthropic | Gemini | xAI chat |
//! |---|---|---|---|---|
//! | `input` (uncached) | `prompt_tokens` − `cached_tokens` | `input_tokens` | `promptTokenCount` − `cachedContentTokenCount` | `prompt_tokens` − `cached_tokens` |
//! | `cached_input` | `prompt_tokens_details.cached_tokens` | `cache_read_input_tokens` | `cachedContentTokenCount` | `cached_tokens` |
//! | `cache_creation` | — | `cache_creation_input_tokens` | — | — |
//! | `output` (without reasoning) | `completion_tokens` − `reasoning_tokens` | `output_tokens` | `candidatesTokenCount` | `completion_tokens` |
//! | `reasoning` | `completion_tokens_details.reasoning_tokens` | `output_tokens_details.thinking_tokens` | `thoughtsTokenCount` | `reasoning_tokens` |
//!
//! Whether a provider's output count includes its reasoning tokens is read from the usage
//! itself: when `input + output` equals the reported total, it does (OpenAI); when
//! `input + output + reasoning` does, it does not (Gemini, xAI). Anthropic is recognised by its
//! cache-creation count: its input leaves out cache reads and writes.

use serde::Deserialize;

use crate::usage::Usage;

/// How usage becomes the number of tokens debited.
#[derive(Debug, Clone, Copy, PartialEq, Default)]
pub enum Cost {
    /// Every token the provider reports processing: its total, or the sum of the categories
    /// (the default).
    #[default]
    Total,
    /// Higress's formula: the provider's input field plus its output field.
    InputOutput,
    /// A weight per category (see the module docs); the result is rounded up.
    Weights(CostWeights),
}

/// Weights per token category, for [`Cost::Weights`]. Each defaults to 1.0.
#[derive(Debug, Clone, Copy, PartialEq, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct CostWeights {
    /// Uncached input tokens.
    pub input: f64,
    /// Input tokens read from a cache.
    pub cached_input: f64,
    /// Input tokens written to a cache (Anthropic).
    pub cache_creation: f64,
    /// Output tokens other than reasoning.
    pub output: f64,
    /// Reasoning ("thinking") tokens.
    pub reasoning: f64,
}

impl Default for CostWeights {
    fn default() -> Self {
        Self {
            input: 1.0,
            cached_input: 1.0,
            cache_creation: 1.0,
            output: 1.0,
            reasoning: 1.0,
        }
    }
}

/// The `cost:` block of the configuration: `{preset: total | input_output}` or
/// `{weights: {input, cached_input, cache_creation, output, reasoning}}`.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
#[non_exhaustive]
pub struct CostConfig {
    /// `total` or `input_output`.
    #[serde(default)]
    pub preset: Option<String>,
    /// Weights per category.
    #[serde(default)]
    pub weights: Option<CostWeights>,
}

/// Disjoint token categories of one usage report.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) struct Categories {
    pub(crate) input: u64,
    pub(crate) cached_input: u64,
    pub(crate) cache_creation: u64,
    pub(crate) output: u64,
    pub(crate) reasoning: u64,
}

impl Categories {
    pub(crate) fn of(u: &Usage) -> Self {
        let n = |v: Option<u64>| v.unwrap_or(0);
        let (input, output) = (n(u.input_tokens), n(u.output_tokens));
        let (cached, created, reasoning) = (
            n(u.cached_input_tokens),
            n(u.cache_creation_input_tokens),
            n(u.reasoning_tokens),
        );
        let anthropic = u.cache_creation_input_tokens.is_some();
        let uncached = if anthropic {
            input
        } else {
            input.saturating_sub(cached)
        };
        let reasoning_in_output = match u.total_tokens {
            Some(total) => input.saturating_add(output) == total,
            None => true,
        };
        let visible = if reasoning_in_output {
            output.saturating_sub(reasoning)
        } else {
            output
        };
        // What a reported total holds beyond the categories is input the provider counts
        // apart (Gemini's `toolUsePromptTokenCount`: tool results read back into the prompt).
        let counted = [uncached, cached, created, visible, reasoning]
            .into_iter()
            .fold(0u64, u64::saturating_add);
        let beyond = u.total_tokens.map_or(0, |t| t.saturating_sub(counted));
        Self {
            input: uncached.saturating_add(beyond),
            cached_input: cached,
            cache_creation: created,
            output: visible,
            reasoning,
        }
    }
}

impl Cost {
    /// The tokens to debit for this usage.
    pub fn tokens(&self, usage: &Usage) -> u64 {
        match self {
            Cost::Total => usage.total(),
            Cost::InputOutput => usage.input_output(),
            Cost::Weights(w) => {
                let c = Categories::of(usage);
                let sum = c.input as f64 * w.input
                    + c.cached_input as f64 * w.cached_input
                    + c.cache_creation as f64 * w.cache_creation
                    + c.output as f64 * w.output
                    + c.reasoning as f64 * w.reasoning;
                // `as` saturates: NaN → 0, huge → u64::MAX.
                sum.ceil() as u64
            }
        }
    }
}

impl CostConfig {
    /// Validates the block; problems go to `p` with their paths.
    pub(crate) fn compile(&self, p: &mut crate::error::Problems) -> Cost {
        match (&self.preset, &self.weights) {
            (Some(_), Some(_)) => {
                p.push("cost", "set either preset or weights, not both");
                Cost::Total
            }
            (Some(preset), None) => match preset.as_str() {
                "total" => Cost::Total,
                "input_output" => Cost::InputOutput,
                other => {
                    p.push(
                        "cost.preset",
                        format!("`{other}` is not a preset; use `total` or `input_output`"),
                    );
                    Cost::Total
                }
            },
            (None, Some(w)) => {
                for (name, v) in [
                    ("input", w.input),
                    ("cached_input", w.cached_input),
                    ("cache_creation", w.cache_creation),
                    ("output", w.output),
                    ("reasoning", w.reasoning),
                ] {
                    if !v.is_finite() || v < 0.0 {
                        p.push(
                            format!("cost.weights.{name}"),
                            "must be a finite number ≥ 0",
                        );
                    }
                }
                Cost::Weights(*w)
            }
            (None, None) => {
                p.push("cost", "empty; set preset (total, input_output) or weights");
                Cost::Total
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn usage(i: u64, o: u64, t: Option<u64>, cached: u64, created: Option<u64>, r: u64) -> Usage {
        Usage {
            input_tokens: Some(i),
            output_tokens: Some(o),
            total_tokens: t,
            cached_input_tokens: Some(cached),
            cache_creation_input_tokens: created,
            reasoning_tokens: Some(r),
        }
    }

    #[test]
    fn categories_per_provider_convention() {
        // OpenAI: cached in input, reasoning in output.
        let c = Categories::of(&usage(31073, 4416, Some(35489), 3712, None, 3712));
        assert_eq!(
            (c.input, c.cached_input, c.output, c.reasoning),
            (27361, 3712, 704, 3712)
        );
        // Gemini: reasoning outside output.
        let c = Categories::of(&usage(9, 23, Some(217), 0, None, 185));
        assert_eq!((c.input, c.output, c.reasoning), (9, 23, 185));
        // Anthropic: input excludes cache reads and writes.
        let c = Categories::of(&usage(12, 30, None, 100, Some(50), 0));
        assert_eq!(
            (c.input, c.cached_input, c.cache_creation, c.output),
            (12, 100, 50, 30)
        );
    }

    #[test]
    fn weights_round_up_and_never_panic() {
        let w = Cost::Weights(CostWeights {
            input: 1.0,
            cached_input: 0.1,
            cache_creation: 1.25,
            output: 4.0,
            reasoning: 2.0,
        });
        assert_eq!(
            w.tokens(&usage(31073, 4416, Some(35489), 3712, None, 3712)),
            37973
        );
        let huge = Cost::Weights(CostWeights {
            output: 1e300,
            ..Default::default()
        });
        assert_eq!(huge.tokens(&usage(1, u64::MAX, None, 0, None, 0)), u64::MAX);
    }
}
