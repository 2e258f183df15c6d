//! Input rules shared by every entry point. Each failure names the offending field.

use super::error::{Error, Result};

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
    Ok(())
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
    fn queue_names_follow_the_spec_alphabet_and_length() {
        assert!(queue_name("queue", "emails.high:v2_x-1").is_ok());
        assert!(queue_name("queue", "").is_err());
        assert!(queue_name("queue", "has space").is_err());
        assert!(queue_name("queue", "slash/no").is_err());
        assert!(queue_name("queue", &"a".repeat(128)).is_ok());
        assert!(queue_name("queue", &"a".repeat(129)).is_err());
    }
}
