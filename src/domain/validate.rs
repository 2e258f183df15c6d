//! Input rules shared by every entry point (spec §10). Each failure names the offending field.

use std::collections::BTreeMap;
use std::time::Duration;

use super::error::{Error, Result};

/// Most entries of a `metadata` or `labels` map.
pub const MAX_MAP_ENTRIES: usize = 64;
pub const MAX_MAP_KEY_BYTES: usize = 128;
pub const MAX_MAP_VALUE_BYTES: usize = 4 * 1024;
/// Keys and values of one map together.
pub const MAX_MAP_BYTES: usize = 64 * 1024;
/// Most queues one runtime serves.
pub const MAX_RUNTIME_QUEUES: usize = 64;
/// Every duration a client sends (delay, execution timeout, wait, lease extension, key
/// expiry): longer ones are typos or attacks, and would overflow timestamps.
pub const MAX_DURATION: Duration = Duration::from_secs(365 * 24 * 60 * 60);

pub const MAX_QUEUE_NAME_LEN: usize = 128;
/// Bounds for free-form keys (concurrency and idempotency keys, runtime names).
pub const MAX_KEY_LEN: usize = 256;

/// A queue name is 1–128 characters of `[A-Za-z0-9._:-]`.
pub fn queue_name(field: &str, name: &str) -> Result<()> {
    if name.is_empty() {
        return Err(Error::invalid(field, "a queue name is required"));
    }
    if name.len() > MAX_QUEUE_NAME_LEN {
        return Err(Error::invalid(
            field,
            format!("a queue name is at most {MAX_QUEUE_NAME_LEN} characters"),
        ));
    }
    let allowed = |c: char| c.is_ascii_alphanumeric() || matches!(c, '.' | '_' | ':' | '-');
    if !name.chars().all(allowed) {
        return Err(Error::invalid(
            field,
            "a queue name may only contain letters, digits and . _ : -",
        ));
    }
    Ok(())
}

/// An optional free-form key: empty means "none".
pub fn optional_key(field: &str, key: &str) -> Result<Option<String>> {
    if key.is_empty() {
        return Ok(None);
    }
    bounded_text(field, key)?;
    Ok(Some(key.to_owned()))
}

pub fn required_text(field: &str, text: &str) -> Result<()> {
    if text.is_empty() {
        return Err(Error::invalid(field, "is required"));
    }
    bounded_text(field, text)
}

fn bounded_text(field: &str, text: &str) -> Result<()> {
    if text.len() > MAX_KEY_LEN {
        return Err(Error::invalid(
            field,
            format!("must be at most {MAX_KEY_LEN} bytes"),
        ));
    }
    no_nul(field, text)
}

/// PostgreSQL text cannot hold U+0000; neither does the memory store accept it, so both agree.
pub fn no_nul(field: &str, text: &str) -> Result<()> {
    if text.contains('\0') {
        return Err(Error::invalid(field, "must not contain NUL (U+0000)"));
    }
    Ok(())
}

/// `metadata` and `labels`: at most 64 entries, keys 1–128 bytes, values up to 4 KiB, 64 KiB in
/// all, no NUL anywhere.
pub fn string_map(field: &str, map: &BTreeMap<String, String>) -> Result<()> {
    if map.len() > MAX_MAP_ENTRIES {
        return Err(Error::invalid(
            field,
            format!("at most {MAX_MAP_ENTRIES} entries"),
        ));
    }
    let mut total = 0;
    for (key, value) in map {
        if key.is_empty() || key.len() > MAX_MAP_KEY_BYTES {
            return Err(Error::invalid(
                field,
                format!("keys are 1 to {MAX_MAP_KEY_BYTES} bytes"),
            ));
        }
        if value.len() > MAX_MAP_VALUE_BYTES {
            return Err(Error::invalid(
                field,
                format!("the value of {key:?} is over {MAX_MAP_VALUE_BYTES} bytes"),
            ));
        }
        no_nul(field, key)?;
        no_nul(field, value)?;
        total += key.len() + value.len();
    }
    if total > MAX_MAP_BYTES {
        return Err(Error::invalid(
            field,
            format!("over {MAX_MAP_BYTES} bytes of keys and values in all"),
        ));
    }
    Ok(())
}

pub fn duration(field: &str, duration: Duration) -> Result<()> {
    if duration > MAX_DURATION {
        return Err(Error::invalid(field, "must be at most 365 days"));
    }
    Ok(())
}

/// `FailTask.error` is never refused for its content (a refused failure would strand the task
/// RUNNING): NUL becomes U+FFFD and text over `max_bytes` keeps its end, where the cause
/// usually is, behind a marker.
pub fn failure_text(error: &str, max_bytes: usize) -> String {
    let clean = error.replace('\0', "\u{FFFD}");
    if clean.len() <= max_bytes {
        return clean;
    }
    const MARKER: &str = "[…cut] ";
    let keep = max_bytes.saturating_sub(MARKER.len());
    let mut start = clean.len() - keep;
    while !clean.is_char_boundary(start) {
        start += 1;
    }
    format!("{MARKER}{}", &clean[start..])
}

pub fn payload_size(field: &str, payload: &[u8], max_bytes: usize) -> Result<()> {
    if payload.len() > max_bytes {
        return Err(Error::invalid(
            field,
            format!(
                "{} bytes is over the limit of {max_bytes} bytes",
                payload.len()
            ),
        ));
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn maps_are_bounded_and_free_of_nul() {
        let map = |entries: &[(&str, &str)]| -> BTreeMap<String, String> {
            entries
                .iter()
                .map(|(key, value)| (key.to_string(), value.to_string()))
                .collect()
        };
        assert!(string_map("metadata", &map(&[("to", "ada")])).is_ok());
        assert!(string_map("metadata", &map(&[("to", "a\0b")])).is_err());
        assert!(string_map("metadata", &map(&[("", "x")])).is_err());
        let big = "v".repeat(MAX_MAP_VALUE_BYTES + 1);
        assert!(string_map("metadata", &map(&[("k", &big)])).is_err());
        let many: BTreeMap<String, String> = (0..=MAX_MAP_ENTRIES)
            .map(|index| (index.to_string(), String::new()))
            .collect();
        assert!(string_map("metadata", &many).is_err());
        let wide: BTreeMap<String, String> = (0..20)
            .map(|index| (index.to_string(), "v".repeat(4000)))
            .collect();
        assert!(string_map("metadata", &wide).is_err());
    }

    #[test]
    fn failure_text_is_cleaned_and_cut_keeping_its_end() {
        assert_eq!(failure_text("a\0b", 100), "a\u{FFFD}b");
        let long = format!("{}the cause", "x".repeat(1000));
        let cut = failure_text(&long, 100);
        assert!(cut.len() <= 100, "{}", cut.len());
        assert!(cut.ends_with("the cause") && cut.starts_with("[…cut]"));
        // Never splits a character.
        let wide = "é".repeat(200);
        assert!(failure_text(&wide, 101).len() <= 101);
    }

    #[test]
    fn durations_stop_at_a_year() {
        assert!(duration("delay", MAX_DURATION).is_ok());
        assert!(duration("delay", MAX_DURATION + Duration::from_secs(1)).is_err());
    }

    #[test]
    fn queue_names_follow_the_spec_alphabet_and_length() {
        assert!(queue_name("queue", "emails.high:v2_x-1").is_ok());
        assert!(queue_name("queue", "").is_err());
        assert!(queue_name("queue", "has space").is_err());
        assert!(queue_name("queue", "slash/no").is_err());
        assert!(queue_name("queue", &"a".repeat(128)).is_ok());
        assert!(queue_name("queue", &"a".repeat(129)).is_err());
    }
}
