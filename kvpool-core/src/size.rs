//! Byte sizes as people write them in configuration: `1073741824`, `"1GB"`, `"512 KiB"`.
//!
//! Mooncake's `mooncake.json` (and Ascend Store's `_parse_global_segment_size`) reads
//! `GB`/`MB`/`KB` as powers of 1024, and the deployment guides rely on
//! `"1GB" == "1024MB" == "1073741824"`. We follow that: every unit here is binary, whether it is
//! spelled `GB` or `GiB`, so a value copied from a Mooncake config means the same bytes in ours.

use std::fmt;
use std::str::FromStr;

use serde::de::{self, Deserializer, Visitor};
use serde::{Deserialize, Serialize, Serializer};

use crate::error::{Error, Result};

const KIB: u64 = 1 << 10;
const MIB: u64 = 1 << 20;
const GIB: u64 = 1 << 30;
const TIB: u64 = 1 << 40;

/// A number of bytes.
///
/// Deserializes from a non-negative integer or from a string [`parse_size`] accepts, and
/// serializes as a plain integer so that machines reading our output never parse units.
/// [`Display`](fmt::Display) gives the human form, which [`parse_size`] reads back.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash, Default)]
pub struct ByteSize(pub u64);

impl ByteSize {
    /// The size in bytes.
    pub const fn as_u64(self) -> u64 {
        self.0
    }
}

impl From<u64> for ByteSize {
    fn from(bytes: u64) -> Self {
        ByteSize(bytes)
    }
}

impl From<ByteSize> for u64 {
    fn from(size: ByteSize) -> Self {
        size.0
    }
}

/// Parses a byte size: a plain integer, or a number followed by a unit.
///
/// Units are case-insensitive and binary: `B`; `K`, `KB`, `KiB`; `M`, `MB`, `MiB`;
/// `G`, `GB`, `GiB`; `T`, `TB`, `TiB`. Whitespace may separate number and unit. A decimal
/// number (`"1.5GB"`) is accepted when it comes to a whole number of bytes.
///
/// # Errors
/// [`ErrorKind::ConfigInvalid`](crate::error::ErrorKind::ConfigInvalid) naming the input when
/// it is empty, negative, has an unknown unit, is fractional in bytes, or overflows `u64`.
pub fn parse_size(s: &str) -> Result<u64> {
    parse_inner(s).map_err(|why| Error::config_invalid(format!("invalid size {s:?}: {why}")))
}

fn parse_inner(input: &str) -> std::result::Result<u64, String> {
    let s = input.trim();
    if s.is_empty() {
        return Err("it is empty; write a number of bytes or a number with a unit like 1GB".into());
    }
    if s.starts_with('-') {
        return Err("a size cannot be negative".into());
    }
    let s = s.strip_prefix('+').unwrap_or(s);

    let number_end = s
        .find(|c: char| !(c.is_ascii_digit() || c == '.'))
        .unwrap_or(s.len());
    let (number, unit) = s.split_at(number_end);
    let (whole, fraction) = match number.split_once('.') {
        Some((w, f)) => (w, f),
        None => (number, ""),
    };
    let valid_digits = |d: &str| !d.is_empty() && d.bytes().all(|b| b.is_ascii_digit());
    if !valid_digits(whole) || (number.contains('.') && !valid_digits(fraction)) {
        return Err("expected a number, optionally followed by a unit like GB".into());
    }
    let unit = unit.trim_start();
    let multiplier = unit_multiplier(unit).ok_or_else(|| {
        format!("unknown unit {unit:?}; use B, KB, MB, GB or TB (1024-based; KiB etc. also work)")
    })?;
    // u128 holds any u64 times a unit with room to spare, so overflow is checked once at the
    // end; beyond 19 fractional digits the scale itself would not fit.
    if fraction.len() > 19 {
        return Err("too many decimal places".into());
    }
    let overflow = || "it does not fit in 64 bits".to_string();
    let scale = 10u128.pow(fraction.len() as u32);
    let whole: u128 = whole.parse().map_err(|_| overflow())?;
    let fraction: u128 = if fraction.is_empty() {
        0
    } else {
        fraction.parse().map_err(|_| overflow())?
    };
    let scaled = whole
        .checked_mul(scale)
        .and_then(|w| w.checked_add(fraction))
        .and_then(|n| n.checked_mul(u128::from(multiplier)))
        .ok_or_else(overflow)?;
    if scaled % scale != 0 {
        return Err("it is not a whole number of bytes".into());
    }
    u64::try_from(scaled / scale).map_err(|_| overflow())
}

fn unit_multiplier(unit: &str) -> Option<u64> {
    let multiplier = match unit.to_ascii_lowercase().as_str() {
        "" | "b" => 1,
        "k" | "kb" | "kib" => KIB,
        "m" | "mb" | "mib" => MIB,
        "g" | "gb" | "gib" => GIB,
        "t" | "tb" | "tib" => TIB,
        _ => return None,
    };
    Some(multiplier)
}

impl FromStr for ByteSize {
    type Err = Error;

    fn from_str(s: &str) -> Result<Self> {
        parse_size(s).map(ByteSize)
    }
}

impl fmt::Display for ByteSize {
    /// The largest binary unit that divides the size exactly: `1 GiB`, `512 KiB`, `1000 B`.
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let bytes = self.0;
        for (unit, name) in [(TIB, "TiB"), (GIB, "GiB"), (MIB, "MiB"), (KIB, "KiB")] {
            if bytes != 0 && bytes % unit == 0 {
                return write!(f, "{} {name}", bytes / unit);
            }
        }
        write!(f, "{bytes} B")
    }
}

impl Serialize for ByteSize {
    fn serialize<S: Serializer>(&self, serializer: S) -> std::result::Result<S::Ok, S::Error> {
        serializer.serialize_u64(self.0)
    }
}

impl<'de> Deserialize<'de> for ByteSize {
    fn deserialize<D: Deserializer<'de>>(deserializer: D) -> std::result::Result<Self, D::Error> {
        deserializer.deserialize_any(ByteSizeVisitor)
    }
}

struct ByteSizeVisitor;

impl Visitor<'_> for ByteSizeVisitor {
    type Value = ByteSize;

    fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("a byte size: a non-negative integer or a string like \"1GB\"")
    }

    fn visit_u64<E: de::Error>(self, v: u64) -> std::result::Result<ByteSize, E> {
        Ok(ByteSize(v))
    }

    fn visit_i64<E: de::Error>(self, v: i64) -> std::result::Result<ByteSize, E> {
        u64::try_from(v)
            .map(ByteSize)
            .map_err(|_| E::invalid_value(de::Unexpected::Signed(v), &self))
    }

    fn visit_u128<E: de::Error>(self, v: u128) -> std::result::Result<ByteSize, E> {
        u64::try_from(v)
            .map(ByteSize)
            .map_err(|_| E::custom(format!("byte size {v} does not fit in 64 bits")))
    }

    fn visit_i128<E: de::Error>(self, v: i128) -> std::result::Result<ByteSize, E> {
        u64::try_from(v).map(ByteSize).map_err(|_| {
            E::custom(format!(
                "byte size {v} is negative or does not fit in 64 bits"
            ))
        })
    }

    fn visit_f64<E: de::Error>(self, v: f64) -> std::result::Result<ByteSize, E> {
        // JSON writers (Python's among them) may emit 1073741824.0; accept it when it is
        // exactly a byte count. 2^64 is the first value that does not fit.
        if v.is_finite() && v >= 0.0 && v.fract() == 0.0 && v < 18_446_744_073_709_551_616.0 {
            Ok(ByteSize(v as u64))
        } else {
            Err(E::invalid_value(de::Unexpected::Float(v), &self))
        }
    }

    fn visit_str<E: de::Error>(self, v: &str) -> std::result::Result<ByteSize, E> {
        // The bare message: the deserializer adds the key it was reading.
        parse_inner(v)
            .map(ByteSize)
            .map_err(|why| E::custom(format!("invalid size {v:?}: {why}")))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::error::ErrorKind;

    #[test]
    fn mooncake_spellings_of_one_gib_agree() {
        for s in ["1GB", "1024MB", "1048576KB", "1073741824B", "1073741824"] {
            assert_eq!(parse_size(s).unwrap(), GIB, "{s}");
        }
    }

    #[test]
    fn units_are_binary_case_insensitive_and_may_be_spaced() {
        let cases = [
            ("1KiB", KIB),
            ("1k", KIB),
            ("1 kb", KIB),
            ("2MiB", 2 * MIB),
            ("2 M", 2 * MIB),
            ("3gib", 3 * GIB),
            ("3 G", 3 * GIB),
            ("1TB", TIB),
            ("1 TiB", TIB),
            ("1t", TIB),
            ("  7  b ", 7),
            ("0", 0),
            ("0GB", 0),
            ("+5", 5),
        ];
        for (s, want) in cases {
            assert_eq!(parse_size(s).unwrap(), want, "{s}");
        }
    }

    #[test]
    fn decimals_are_accepted_only_when_whole_bytes() {
        assert_eq!(parse_size("1.5GB").unwrap(), GIB + GIB / 2);
        assert_eq!(parse_size("0.5 KiB").unwrap(), 512);
        assert_eq!(parse_size("2.0").unwrap(), 2);
        let err = parse_size("1.5B").unwrap_err();
        assert!(err.to_string().contains("whole number of bytes"), "{err}");
        assert!(err.to_string().contains("\"1.5B\""), "{err}");
        assert!(parse_size("0.1KB").is_err()); // 102.4 bytes
    }

    #[test]
    fn errors_name_the_input_and_are_config_invalid() {
        for s in [
            "", "  ", "-1", "-1GB", "1XB", "GB", "1.GB", ".5GB", "1..5GB", "1 G B",
        ] {
            let err = parse_size(s).unwrap_err();
            assert_eq!(err.kind(), ErrorKind::ConfigInvalid, "{s}");
            assert!(err.to_string().contains(&format!("{s:?}")), "{s}: {err}");
            assert!(!err.to_string().contains('\n'));
        }
        assert!(parse_size("1XB")
            .unwrap_err()
            .to_string()
            .contains("unknown unit"));
        assert!(parse_size("-1")
            .unwrap_err()
            .to_string()
            .contains("negative"));
    }

    #[test]
    fn overflow_is_an_error() {
        assert_eq!(parse_size("18446744073709551615").unwrap(), u64::MAX);
        for s in [
            "18446744073709551616",
            "16777216TB",
            "99999999999999999999999999999999999999999GB",
            "1.00000000000000000001GB",
        ] {
            let err = parse_size(s).unwrap_err();
            assert!(err.to_string().contains(s), "{s}: {err}");
        }
        assert_eq!(parse_size("16777215TB").unwrap(), 16_777_215 * TIB);
    }

    #[test]
    fn display_uses_the_largest_exact_unit_and_round_trips() {
        let cases = [
            (GIB, "1 GiB"),
            (512 * KIB, "512 KiB"),
            (1000, "1000 B"),
            (0, "0 B"),
            (1536, "1536 B"),
            (3 * MIB, "3 MiB"),
            (2 * TIB, "2 TiB"),
            (GIB + MIB, "1025 MiB"),
        ];
        for (bytes, want) in cases {
            let shown = ByteSize(bytes).to_string();
            assert_eq!(shown, want);
            assert_eq!(shown.parse::<ByteSize>().unwrap(), ByteSize(bytes));
        }
    }

    #[test]
    fn from_str_parses_and_reports_errors() {
        assert_eq!("1GB".parse::<ByteSize>().unwrap(), ByteSize(GIB));
        assert!("lots".parse::<ByteSize>().is_err());
    }

    #[test]
    fn deserializes_from_integers_and_strings() {
        let from = |v: serde_json::Value| serde_json::from_value::<ByteSize>(v);
        assert_eq!(from(serde_json::json!(1073741824)).unwrap(), ByteSize(GIB));
        assert_eq!(from(serde_json::json!("1GB")).unwrap(), ByteSize(GIB));
        assert_eq!(from(serde_json::json!("1024MB")).unwrap(), ByteSize(GIB));
        assert_eq!(
            from(serde_json::json!(1073741824.0)).unwrap(),
            ByteSize(GIB)
        );
        assert_eq!(from(serde_json::json!(0)).unwrap(), ByteSize(0));
    }

    #[test]
    fn deserialize_rejects_negative_fractional_and_junk() {
        let from = |v: serde_json::Value| serde_json::from_value::<ByteSize>(v);
        assert!(from(serde_json::json!(-1)).is_err());
        assert!(from(serde_json::json!(1.5)).is_err());
        assert!(from(serde_json::json!(-0.5)).is_err());
        assert!(from(serde_json::json!(true)).is_err());
        assert!(from(serde_json::json!([1])).is_err());
        let err = from(serde_json::json!("1 parsec")).unwrap_err().to_string();
        assert!(err.contains("1 parsec"), "{err}");
    }

    #[test]
    fn serializes_as_an_integer() {
        assert_eq!(
            serde_json::to_value(ByteSize(GIB)).unwrap(),
            serde_json::json!(1073741824u64)
        );
        #[derive(Serialize, Deserialize, PartialEq, Debug)]
        struct S {
            size: ByteSize,
        }
        let s: S = serde_json::from_str(r#"{"size": "2 MiB"}"#).unwrap();
        assert_eq!(serde_json::to_string(&s).unwrap(), r#"{"size":2097152}"#);
    }
}
