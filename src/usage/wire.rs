//! JSON shapes shared by the provider formats, read leniently.
//!
//! A response is metered, not validated: a count of the wrong type or out of range reads as
//! "not reported", and an object where a number was expected (or the reverse) is skipped,
//! instead of failing the whole event.

use std::fmt;
use std::marker::PhantomData;
use std::num::NonZeroU64;

use serde::Deserialize;
use serde::de::value::MapAccessDeserializer;
use serde::de::{Deserializer, IgnoredAny, MapAccess, SeqAccess, Visitor};

use super::anthropic::Iterations;

/// Largest count taken as reported (2^53, the largest integer every JSON reader keeps exact).
/// Anything larger is absurd for a token count and reads as not reported.
pub(crate) const MAX_COUNT: u64 = 1 << 53;

/// A type read from any JSON value: each hook gets the kinds of value it accepts, everything
/// else (skipped without allocating) gives `Default`.
pub(crate) trait Lenient<'de>: Default {
    fn on_bool(value: bool) -> Self {
        let _ = value;
        Self::default()
    }

    fn on_u64(value: u64) -> Self {
        let _ = value;
        Self::default()
    }

    fn on_i64(value: i64) -> Self {
        let _ = value;
        Self::default()
    }

    fn on_f64(value: f64) -> Self {
        let _ = value;
        Self::default()
    }

    fn on_str(value: &str) -> Self {
        let _ = value;
        Self::default()
    }

    /// A string borrowed from the input (no escapes in it).
    fn on_borrowed_str(value: &'de str) -> Self {
        Self::on_str(value)
    }

    fn on_seq<A: SeqAccess<'de>>(mut seq: A) -> Result<Self, A::Error> {
        while seq.next_element::<IgnoredAny>()?.is_some() {}
        Ok(Self::default())
    }

    fn on_map<A: MapAccess<'de>>(mut map: A) -> Result<Self, A::Error> {
        while map.next_entry::<IgnoredAny, IgnoredAny>()?.is_some() {}
        Ok(Self::default())
    }
}

/// `Deserialize::deserialize` for a [`Lenient`] type.
pub(crate) fn deserialize_lenient<'de, D, T>(deserializer: D) -> Result<T, D::Error>
where
    D: Deserializer<'de>,
    T: Lenient<'de>,
{
    deserializer.deserialize_any(LenientVisitor(PhantomData))
}

struct LenientVisitor<T>(PhantomData<T>);

impl<'de, T: Lenient<'de>> Visitor<'de> for LenientVisitor<T> {
    type Value = T;

    fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("any JSON value")
    }

    fn visit_bool<E>(self, value: bool) -> Result<T, E> {
        Ok(T::on_bool(value))
    }

    fn visit_i64<E>(self, value: i64) -> Result<T, E> {
        Ok(T::on_i64(value))
    }

    fn visit_u64<E>(self, value: u64) -> Result<T, E> {
        Ok(T::on_u64(value))
    }

    fn visit_f64<E>(self, value: f64) -> Result<T, E> {
        Ok(T::on_f64(value))
    }

    fn visit_str<E>(self, value: &str) -> Result<T, E> {
        Ok(T::on_str(value))
    }

    fn visit_borrowed_str<E>(self, value: &'de str) -> Result<T, E> {
        Ok(T::on_borrowed_str(value))
    }

    fn visit_unit<E>(self) -> Result<T, E> {
        Ok(T::default())
    }

    fn visit_none<E>(self) -> Result<T, E> {
        Ok(T::default())
    }

    fn visit_some<D: Deserializer<'de>>(self, deserializer: D) -> Result<T, D::Error> {
        deserialize_lenient(deserializer)
    }

    fn visit_seq<A: SeqAccess<'de>>(self, seq: A) -> Result<T, A::Error> {
        T::on_seq(seq)
    }

    fn visit_map<A: MapAccess<'de>>(self, map: A) -> Result<T, A::Error> {
        T::on_map(map)
    }
}

/// A token count: a non-negative integer up to [`MAX_COUNT`]. Negative, fractional, absurd or
/// non-numeric values read as not reported.
///
/// Eight bytes (the count plus one; zero is "not reported"), half an `Option<u64>`: a usage
/// object is read into a struct of a dozen of these for every report, and its size is copied
/// around with it.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub(crate) struct Count(Option<NonZeroU64>);

impl Count {
    /// The count, or `None` when not reported.
    pub(crate) fn get(self) -> Option<u64> {
        self.0.map(|n| n.get() - 1)
    }

    fn of(value: u64) -> Self {
        Self(
            (value <= MAX_COUNT)
                .then(|| NonZeroU64::new(value + 1))
                .flatten(),
        )
    }
}

impl Lenient<'_> for Count {
    fn on_u64(value: u64) -> Self {
        Self::of(value)
    }

    fn on_i64(value: i64) -> Self {
        u64::try_from(value).map_or(Self(None), Self::of)
    }

    // serde_json reads `12.0` and integers beyond u64 as floats.
    #[allow(clippy::cast_possible_truncation, clippy::cast_sign_loss)]
    fn on_f64(value: f64) -> Self {
        let whole = value >= 0.0 && value <= MAX_COUNT as f64 && value.fract() == 0.0;
        if whole {
            Self::of(value as u64)
        } else {
            Self(None)
        }
    }
}

impl<'de> Deserialize<'de> for Count {
    fn deserialize<D: Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
        deserialize_lenient(deserializer)
    }
}

/// A JSON object read as `T`; any other value (null included) is `None`.
#[derive(Debug)]
pub(crate) struct Obj<T>(pub(crate) Option<T>);

impl<T> Default for Obj<T> {
    fn default() -> Self {
        Self(None)
    }
}

impl<'de, T: Deserialize<'de>> Lenient<'de> for Obj<T> {
    fn on_map<A: MapAccess<'de>>(map: A) -> Result<Self, A::Error> {
        T::deserialize(MapAccessDeserializer::new(map)).map(|value| Self(Some(value)))
    }
}

impl<'de, T: Deserialize<'de>> Deserialize<'de> for Obj<T> {
    fn deserialize<D: Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
        deserialize_lenient(deserializer)
    }
}

/// The top-level `type` of an event or body, as far as metering cares: Anthropic's.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub(crate) enum Kind {
    /// Anything else, or no `type`.
    #[default]
    Other,
    /// Anthropic `message_start`: the usage is in `message.usage`.
    MessageStart,
    /// Anthropic `message_delta`.
    MessageDelta,
    /// An Anthropic non-streaming message body.
    Message,
}

impl Lenient<'_> for Kind {
    fn on_str(value: &str) -> Self {
        match value {
            "message_start" => Self::MessageStart,
            "message_delta" => Self::MessageDelta,
            "message" => Self::Message,
            _ => Self::Other,
        }
    }
}

impl<'de> Deserialize<'de> for Kind {
    fn deserialize<D: Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
        deserialize_lenient(deserializer)
    }
}

/// A `usage` object in every vocabulary that uses that key: OpenAI Chat/Completions/Embeddings
/// (`prompt_tokens`, …), OpenAI Responses (`input_tokens`, …) and Anthropic (`input_tokens`,
/// `cache_*_input_tokens`, `iterations`). One struct, because the event `type` that tells
/// Anthropic apart may come after the `usage` in the object; `openai` and `anthropic` map it.
#[derive(Debug, Default, Deserialize)]
#[serde(default)]
pub(crate) struct WireUsage {
    pub(crate) prompt_tokens: Count,
    pub(crate) completion_tokens: Count,
    pub(crate) input_tokens: Count,
    pub(crate) output_tokens: Count,
    pub(crate) total_tokens: Count,
    pub(crate) prompt_tokens_details: Obj<InputDetails>,
    pub(crate) input_tokens_details: Obj<InputDetails>,
    pub(crate) completion_tokens_details: Obj<OutputDetails>,
    pub(crate) output_tokens_details: Obj<OutputDetails>,
    pub(crate) cache_creation_input_tokens: Count,
    pub(crate) cache_read_input_tokens: Count,
    pub(crate) iterations: Iterations,
}

/// `prompt_tokens_details` / `input_tokens_details`.
#[derive(Debug, Default, Deserialize)]
#[serde(default)]
pub(crate) struct InputDetails {
    pub(crate) cached_tokens: Count,
}

/// `completion_tokens_details` / `output_tokens_details`.
#[derive(Debug, Default, Deserialize)]
#[serde(default)]
pub(crate) struct OutputDetails {
    /// OpenAI.
    pub(crate) reasoning_tokens: Count,
    /// Anthropic.
    pub(crate) thinking_tokens: Count,
}

/// The first present count of `details` read with `field`.
pub(crate) fn detail<T>(details: [&Obj<T>; 2], field: impl Fn(&T) -> Count) -> Option<u64> {
    details
        .into_iter()
        .filter_map(|d| d.0.as_ref())
        .find_map(|d| field(d).get())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn count(json: &str) -> Option<u64> {
        serde_json::from_str::<Count>(json).unwrap().get()
    }

    #[test]
    fn counts_are_non_negative_integers_up_to_2_pow_53() {
        assert_eq!(count("0"), Some(0));
        assert_eq!(count("42"), Some(42));
        assert_eq!(count("9007199254740992"), Some(MAX_COUNT));
        assert_eq!(count("9007199254740993"), None);
        assert_eq!(count("18446744073709551615"), None);
        assert_eq!(count("1000000000000000000000000000000"), None);
        assert_eq!(count("-1"), None);
        assert_eq!(count("-9223372036854775808"), None);
        assert_eq!(count("12.5"), None);
        assert_eq!(count("12.0"), Some(12));
        assert_eq!(count("1e3"), Some(1000));
        assert_eq!(count("1e300"), None);
        assert_eq!(count("-0.0"), Some(0));
        assert_eq!(count("null"), None);
        assert_eq!(count("\"12\""), None);
        assert_eq!(count("true"), None);
        assert_eq!(count("[1, 2]"), None);
        assert_eq!(count("{\"a\": [1, {\"b\": 2}]}"), None);
    }

    #[test]
    fn a_usage_object_is_read_into_a_small_struct() {
        // Read for every report and moved with it: a count is 8 bytes, the iteration sum boxed.
        assert_eq!(std::mem::size_of::<Count>(), 8);
        assert!(std::mem::size_of::<Obj<WireUsage>>() <= 160);
    }

    #[test]
    fn obj_reads_objects_only() {
        let read = |json: &str| serde_json::from_str::<Obj<InputDetails>>(json).unwrap().0;
        assert_eq!(
            read(r#"{"cached_tokens": 7}"#).unwrap().cached_tokens.get(),
            Some(7)
        );
        assert!(read("null").is_none());
        assert!(read("[{\"cached_tokens\": 7}]").is_none());
        assert!(read("\"x\"").is_none());
        assert_eq!(read("{}").unwrap().cached_tokens.get(), None);
    }

    #[test]
    fn kind_reads_anthropic_types() {
        let read = |json: &str| serde_json::from_str::<Kind>(json).unwrap();
        assert_eq!(read("\"message_start\""), Kind::MessageStart);
        assert_eq!(read("\"message_delta\""), Kind::MessageDelta);
        assert_eq!(read("\"message\""), Kind::Message);
        assert_eq!(read("\"message\\u005fstart\""), Kind::MessageStart);
        assert_eq!(read("\"response.completed\""), Kind::Other);
        assert_eq!(read("3"), Kind::Other);
        assert_eq!(read("{\"x\": 1}"), Kind::Other);
    }
}
