//! JSON representations of bit patterns.
//!
//! Register values, TSC readings, random numbers and hashes are written as
//! `"0x…"` strings because JSON tools such as `jq` read numbers as doubles and
//! would silently round anything above 2^53. Reading accepts a hex string, a
//! decimal string or a plain JSON number, so hand edits need not be careful.

use serde::de::{self, Deserializer, Visitor};
use serde::{Deserialize, Serialize, Serializer};
use std::fmt;

/// Integers that are bit patterns rather than counts.
pub(crate) mod int {
    use super::*;

    pub(crate) fn serialize<T, S>(value: &T, s: S) -> Result<S::Ok, S::Error>
    where
        T: fmt::LowerHex,
        S: Serializer,
    {
        s.collect_str(&format_args!("{value:#x}"))
    }

    pub(crate) fn deserialize<'de, T, D>(d: D) -> Result<T, D::Error>
    where
        T: TryFrom<u64>,
        D: Deserializer<'de>,
    {
        let value = d.deserialize_any(IntVisitor)?;
        T::try_from(value).map_err(|_| {
            de::Error::custom(format_args!(
                "{value:#x} does not fit in {} bytes",
                std::mem::size_of::<T>()
            ))
        })
    }
}

/// `Option<u64>` bit patterns: `null` or a hex string.
pub(crate) mod opt {
    use super::*;

    #[derive(Serialize, Deserialize)]
    struct Hex(#[serde(with = "int")] u64);

    pub(crate) fn serialize<S: Serializer>(value: &Option<u64>, s: S) -> Result<S::Ok, S::Error> {
        value.map(Hex).serialize(s)
    }

    pub(crate) fn deserialize<'de, D: Deserializer<'de>>(d: D) -> Result<Option<u64>, D::Error> {
        Ok(Option::<Hex>::deserialize(d)?.map(|h| h.0))
    }
}

/// Byte strings (packet contents, the image hash) as one lowercase hex
/// string, which stays greppable and is a third of the size of a JSON array.
pub(crate) mod bytes {
    use super::*;

    pub(crate) fn serialize<T: AsRef<[u8]>, S: Serializer>(
        value: &T,
        s: S,
    ) -> Result<S::Ok, S::Error> {
        let text: String = value.as_ref().iter().map(|b| format!("{b:02x}")).collect();
        s.serialize_str(&text)
    }

    pub(crate) fn deserialize<'de, T, D>(d: D) -> Result<T, D::Error>
    where
        T: TryFrom<Vec<u8>>,
        D: Deserializer<'de>,
    {
        let text = String::deserialize(d)?;
        let raw = parse(&text).map_err(de::Error::custom)?;
        let len = raw.len();
        T::try_from(raw).map_err(|_| de::Error::custom(format_args!("wrong length: {len} bytes")))
    }

    fn parse(text: &str) -> Result<Vec<u8>, String> {
        if !text.len().is_multiple_of(2) {
            return Err(format!("odd number of hex digits ({})", text.len()));
        }
        text.as_bytes()
            .chunks(2)
            .map(|pair| {
                std::str::from_utf8(pair)
                    .ok()
                    .and_then(|p| u8::from_str_radix(p, 16).ok())
                    .ok_or_else(|| format!("not a hex byte: {:?}", String::from_utf8_lossy(pair)))
            })
            .collect()
    }
}

struct IntVisitor;

impl Visitor<'_> for IntVisitor {
    type Value = u64;

    fn expecting(&self, f: &mut fmt::Formatter) -> fmt::Result {
        f.write_str("an unsigned integer or a string such as \"0x1f\"")
    }

    fn visit_u64<E: de::Error>(self, v: u64) -> Result<u64, E> {
        Ok(v)
    }

    fn visit_i64<E: de::Error>(self, v: i64) -> Result<u64, E> {
        u64::try_from(v).map_err(|_| E::custom(format_args!("negative value {v}")))
    }

    fn visit_str<E: de::Error>(self, v: &str) -> Result<u64, E> {
        let parsed = match v.strip_prefix("0x").or_else(|| v.strip_prefix("0X")) {
            Some(hex) => u64::from_str_radix(hex, 16),
            None => v.parse(),
        };
        parsed.map_err(|e| E::custom(format_args!("{v:?}: {e}")))
    }
}
