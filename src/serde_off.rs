//! Optional numbers in settings files, where "none" must survive a round trip: TOML has no
//! null, and a missing key means "the default", which for a clip is a number. `None` is written
//! as the string `"off"`; a number, or `"off"`, is read (`#[serde(with = "crate::serde_off")]`).

use serde::{Deserialize, Deserializer, Serialize, Serializer};

/// Writes `None` as `"off"`, `Some(x)` as the number.
pub fn serialize<S: Serializer>(v: &Option<f64>, s: S) -> Result<S::Ok, S::Error> {
    match v {
        Some(x) => x.serialize(s),
        None => s.serialize_str("off"),
    }
}

/// Reads a number (integer or float), `"off"`, or null as `None`.
pub fn deserialize<'de, D: Deserializer<'de>>(d: D) -> Result<Option<f64>, D::Error> {
    #[derive(Deserialize)]
    #[serde(untagged)]
    enum NumberOrOff {
        Number(f64),
        Int(i64),
        Word(String),
        Null(()),
    }
    match NumberOrOff::deserialize(d)? {
        NumberOrOff::Number(x) => Ok(Some(x)),
        NumberOrOff::Int(x) => Ok(Some(x as f64)),
        NumberOrOff::Word(w) if w == "off" => Ok(None),
        NumberOrOff::Word(w) => Err(serde::de::Error::custom(format!("expected a number or \"off\", got \"{w}\""))),
        NumberOrOff::Null(()) => Ok(None),
    }
}
